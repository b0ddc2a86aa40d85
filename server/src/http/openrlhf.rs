//! OpenRLHF's remote reward protocol over HTTP, through the same gate and scoring core as gRPC.
//!
//! `POST /get_reward` (or `/`) with `{"query": [...], "prompts": [...], "labels": [...]}` answers
//! `{"rewards": [...], "scores": [...], "extra_logs": {attribute: [...]}}`.
//!
//! `query[i]` is the policy's prompt followed by its response, both in the *policy's* chat
//! template; `prompts[i]` is the prompt alone. In `split` mode (the default) the response is
//! `query[i][len(prompts[i])..]` with the policy's end-of-turn marker (`--openrlhf-eot`, e.g.
//! `<|im_end|>`) and trailing whitespace stripped from its end, and the reward model scores the
//! conversation `[user: prompts[i], assistant: response]` in its own template: the prompt text,
//! policy template and all, becomes the user turn. In `raw` mode `query[i]` is scored as
//! pre-templated text, as is. `labels` are accepted and ignored. An empty batch (all three lists
//! empty) gets empty lists back: OpenRLHF's sharding over several servers sends those.

use arbiter_engine::text::{Input, Message, Role};
use arbiter_scoring::{Item, Options};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use tracing::Instrument;

use super::{metadata, App};
use crate::error::ServiceError;

/// How a query becomes an input of the reward model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Prompt as the user turn, the response (end-of-turn marker stripped) as the assistant turn.
    Split,
    /// The policy-templated query, scored as text as is.
    Raw,
}

/// Settings of the endpoint.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Split or raw.
    pub mode: Mode,
    /// End-of-turn markers stripped from the end of responses (split mode).
    pub eot: Vec<String>,
}

/// OpenRLHF's own error body: `{"error": "..."}`.
fn reject(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

fn strings(v: &Value, field: &str) -> Result<Vec<String>, String> {
    let list = v.as_array().ok_or_else(|| format!("{field}: must be a list of strings"))?;
    list.iter()
        .enumerate()
        .map(|(i, s)| s.as_str().map(str::to_string).ok_or_else(|| format!("{field}[{i}]: must be a string")))
        .collect()
}

/// Turns a request body into reward-model inputs (one per query, in order), or says what is
/// wrong with it.
pub fn inputs(body: &[u8], settings: &Settings) -> Result<Vec<Input>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("the body is not valid JSON: {e}"))?;
    let obj = v.as_object().ok_or("the body must be a JSON object with \"query\" and \"prompts\"")?;
    let query = strings(obj.get("query").ok_or("missing \"query\"")?, "query")?;
    if let Some(labels) = obj.get("labels").filter(|l| !l.is_null()) {
        let n = labels.as_array().ok_or("labels: must be a list")?.len();
        if n != query.len() {
            return Err(format!("\"labels\" has {n} entries but \"query\" has {}", query.len()));
        }
    }
    match settings.mode {
        Mode::Raw => Ok(query.into_iter().map(Input::Text).collect()),
        Mode::Split => {
            let prompts =
                strings(obj.get("prompts").ok_or("missing \"prompts\" (needed to split queries)")?, "prompts")?;
            if prompts.len() != query.len() {
                return Err(format!("\"prompts\" has {} entries but \"query\" has {}", prompts.len(), query.len()));
            }
            query
                .into_iter()
                .zip(prompts)
                .enumerate()
                .map(|(i, (q, p))| {
                    let response =
                        q.strip_prefix(p.as_str()).ok_or(format!("query[{i}] does not start with prompts[{i}]"))?;
                    let mut response = response.trim_end();
                    while let Some(r) = settings.eot.iter().find_map(|m| response.strip_suffix(m.as_str())) {
                        response = r.trim_end();
                    }
                    let conv = vec![Message::new(Role::User, p), Message::new(Role::Assistant, response)];
                    Ok(Input::Messages(conv))
                })
                .collect()
        }
    }
}

/// `POST /get_reward` (and `/`).
pub(super) async fn handle(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let metadata = metadata(headers);
    let settings = &app.settings.openrlhf;
    let span = tracing::info_span!("request", request_id = %app.gate.request_id(&metadata), rpc = "OpenRLHF");
    let answer = app
        .gate
        .run("OpenRLHF", &metadata, None, |ready| async move {
            // Read inside the gate: the token is checked first, and refusals are counted.
            let inputs = inputs(&body, settings).map_err(ServiceError::InvalidArgument)?;
            if inputs.is_empty() {
                // OpenRLHF shards a batch over its servers with ceil(n / servers) queries each
                // (openrlhf/utils/agent.py, SingleTurnAgentExecutor._fetch_rewards_via_http), so
                // with one query and two servers the second gets empty lists; refusing them
                // would fail the whole sample after its retries.
                let none = arbiter_scoring::Scored { items: Vec::new(), tokenize: std::time::Duration::ZERO };
                return Ok(body_json(&ready, none));
            }
            ready.check_count(inputs.len(), "queries")?;
            let truncation = ready.limits.default_truncation;
            let items = inputs.into_iter().map(|input| Item::new(input, truncation)).collect();
            let scored = ready
                .scorer
                .score(items, Options::default())
                .await
                .map_err(|e| ServiceError::from_request(e, "query"))?;
            Ok(body_json(&ready, scored))
        })
        .instrument(span)
        .await;
    match answer {
        Ok(body) => axum::Json(body).into_response(),
        Err(e) => reject(e.http_status(), e.to_string()),
    }
}

/// `{"rewards", "scores", "extra_logs": {attribute: [...]}}` (and the demo model's warning).
fn body_json(ready: &crate::gate::Ready, scored: arbiter_scoring::Scored) -> Value {
    let rewards: Vec<f32> = scored.items.iter().map(|s| s.score.reward).collect();
    let head = &ready.scorer.model().spec().head;
    let logs: Map<String, Value> = head
        .exposed
        .iter()
        .enumerate()
        .map(|(k, &i)| {
            (head.labels[i].clone(), json!(scored.items.iter().map(|s| s.score.attributes[k].1).collect::<Vec<_>>()))
        })
        .collect();
    let mut body = json!({"rewards": rewards, "scores": rewards, "extra_logs": logs});
    let warning = ready.warning();
    if !warning.is_empty() {
        body["warning"] = json!(warning); // the demo model's scores are meaningless
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split() -> Settings {
        Settings { mode: Mode::Split, eot: vec!["<|im_end|>".into()] }
    }

    #[test]
    fn split_mode_takes_the_response_after_the_prompt_and_strips_the_marker() {
        let body = json!({"query": ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"],
                          "prompts": ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"], "labels": ["x"]});
        let got = inputs(body.to_string().as_bytes(), &split()).unwrap();
        let Input::Messages(m) = &got[0] else { panic!("messages") };
        assert_eq!(m[0].content, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(m[1].content, "hello");
    }

    #[test]
    fn malformed_requests_say_what_is_wrong() {
        for (body, want) in [
            ("{not json", "not valid JSON"),
            ("[1]", "must be a JSON object"),
            (r#"{"prompts": []}"#, "missing \"query\""),
            (r#"{"query": ["a", "b"], "prompts": ["a"]}"#, "\"prompts\" has 1 entries but \"query\" has 2"),
            (r#"{"query": ["ab"], "prompts": ["x"]}"#, "query[0] does not start with prompts[0]"),
            (r#"{"query": ["a"], "prompts": ["a"], "labels": [1, 2]}"#, "\"labels\" has 2 entries"),
            (r#"{"query": [3]}"#, "query[0]: must be a string"),
        ] {
            let e = inputs(body.as_bytes(), &split()).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn an_empty_batch_is_no_error() {
        // OpenRLHF's sharding sends one: see `handle`.
        let got = inputs(br#"{"query": [], "prompts": [], "labels": []}"#, &split()).unwrap();
        assert!(got.is_empty());
    }

    #[test]
    fn raw_mode_scores_the_query_as_text() {
        let s = Settings { mode: Mode::Raw, eot: vec![] };
        let got = inputs(br#"{"query": ["<x>text"]}"#, &s).unwrap();
        assert_eq!(got[0], Input::Text("<x>text".into()));
    }
}
