//! vLLM's pooling classify API (`POST /classify`, `POST /v1/classify`), the call verl's
//! discriminative reward path makes to a vLLM reward-model server.
//!
//! Followed: vLLM's `vllm/entrypoints/pooling/classify/protocol.py` (`ClassificationCompletionRequest`,
//! `ClassificationChatRequest`, `ClassificationData`, `ClassificationResponse`) and
//! `vllm/entrypoints/pooling/base/protocol.py` (`PoolingBasicRequestMixin`, `CompletionRequestMixin`,
//! `ChatRequestMixin`), read from a copy of vLLM's main branch with no release tag recorded; its
//! field set (the `softmax` / `activation` / `use_activation` trio, `add_special_tokens` on
//! completion requests) is that of vLLM 0.11.2 and later, going by verl's note in
//! `verl/experimental/reward_loop/reward_loop.py` that `add_special_tokens` arrived in 0.11.2.
//!
//! Request: `{"model", "input": str | [str] | [int] | [[int]], "use_activation", "add_special_tokens",
//! "truncate_prompt_tokens", "request_id"}` or `{"model", "messages": [{"role", "content"}], ...}`.
//! Response: `{"id", "object": "list", "created", "model", "data": [{"index", "label", "probs",
//! "num_classes"}], "usage": {"prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details"}}`.
//!
//! - `probs` are the model's exposed attributes in model order, then the weighted reward last:
//!   verl reads `data[-1].probs[-1]` as the reward. `label` is the name of the largest of them
//!   (vLLM's rule: the label of the argmax), `"reward"` for the last.
//! - Reward heads are regressions: `probs` are raw head values whatever `use_activation`
//!   (older: `activation`, `softmax`) says; the flags are type-checked and otherwise ignored.
//! - Text is tokenized as vLLM tokenizes it for this model: `add_special_tokens` (default true
//!   for `input`) adds what the tokenizer.json post-processor adds around the text, as HF
//!   `tokenizer(text)` does: BOS in front for Llama-family tokenizers, nothing for the Nemotron
//!   and demo tokenizers (no BOS-adding post-processor). Special-token strings written in the
//!   text are recognized either way. Token-id inputs are scored as given. `messages` are
//!   rendered with the model's own template, which places the model's special tokens itself
//!   (vLLM's chat default, `add_special_tokens: false`; `true` is refused rather than doubling
//!   BOS).
//! - `model` is not checked: the server has one model, and trainers send their own path for it.
//! - Unknown fields are ignored, as vLLM ignores them; known ones that would change the scores
//!   in a way arbiter does not support (`chat_template`, `add_generation_prompt`,
//!   `continue_final_message`, `truncate_prompt_tokens` below the model's limit) get 400.
//! - Errors: `{"error": {"message", "type", "param", "code"}}` (vLLM's `ErrorResponse`), the
//!   message starting with the field path (`input[2]: ...`), `type` the gRPC code name.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use arbiter_engine::text::{Input, Message, Role, TruncationPolicy};
use arbiter_scoring::error::Place;
use arbiter_scoring::{Item, Options, RequestError, Scored};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use tracing::Instrument;

use super::{metadata, App};
use crate::error::{code_name, ServiceError};
pub use crate::field::BadField;
use crate::gate::Ready;

/// Fields of vLLM's classify requests that arbiter reads; others are ignored (logged at debug).
const KNOWN: [&str; 14] = [
    "model",
    "input",
    "messages",
    "use_activation",
    "activation",
    "softmax",
    "add_special_tokens",
    "truncate_prompt_tokens",
    "request_id",
    "chat_template",
    "add_generation_prompt",
    "continue_final_message",
    "user",
    "priority",
];

/// How the items of a request are named in messages about one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Names {
    /// `input` was a list of texts or token-id lists: `input[i]`.
    Indexed,
    /// One item, the whole field (`input` or `messages`).
    Whole(&'static str),
}

impl Names {
    fn place(self, i: usize) -> String {
        match self {
            Names::Indexed => format!("input[{i}]"),
            Names::Whole(field) => field.to_string(),
        }
    }

    fn field(self) -> &'static str {
        match self {
            Names::Indexed => "input",
            Names::Whole(field) => field,
        }
    }
}

/// A classify request in the scoring core's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// One per result, in order.
    pub inputs: Vec<Input>,
    /// How to name them in errors.
    pub names: Names,
    /// `truncate_prompt_tokens` as a policy; `None`: the server's default.
    pub truncation: Option<TruncationPolicy>,
    /// The caller's `request_id`, echoed in the response's `id`.
    pub request_id: Option<String>,
}

/// Reads a classify body; `max_tokens` is the model's input limit (for `truncate_prompt_tokens`).
pub fn parse(body: &[u8], max_tokens: usize) -> Result<Request, BadField> {
    let v: Value = serde_json::from_slice(body).map_err(|e| BadField::new("body", format!("not valid JSON: {e}")))?;
    let obj =
        v.as_object().ok_or_else(|| BadField::new("body", "must be a JSON object with \"input\" or \"messages\""))?;
    let field = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let ignored: Vec<&String> = obj.keys().filter(|k| !KNOWN.contains(&k.as_str())).collect();
    if !ignored.is_empty() {
        tracing::debug!(fields = ?ignored, "classify: fields ignored, as vLLM ignores them");
    }
    if field("model").is_some_and(|m| !m.is_string()) {
        return Err(BadField::new("model", "must be a string"));
    }
    for k in ["use_activation", "activation", "softmax"] {
        if field(k).is_some_and(|x| !x.is_boolean()) {
            return Err(BadField::new(k, "must be true, false or null"));
        }
    }
    let add_special = match field("add_special_tokens") {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return Err(BadField::new("add_special_tokens", "must be true, false or null")),
    };
    let request_id = match field("request_id") {
        None => None,
        Some(Value::String(s)) => Some(s.chars().take(64).collect()),
        Some(_) => return Err(BadField::new("request_id", "must be a string")),
    };
    let truncation = truncation(field("truncate_prompt_tokens"), max_tokens)?;
    let (inputs, names) = match (field("input"), field("messages")) {
        (Some(_), Some(_)) => return Err(BadField::new("messages", "send \"input\" or \"messages\", not both")),
        (None, None) => {
            return Err(BadField::new(
                "input",
                "missing: send \"input\" (text or token ids) or \"messages\" (a conversation)",
            ))
        }
        (Some(input), None) => inputs(input, add_special.unwrap_or(true))?,
        (None, Some(messages)) => {
            if add_special == Some(true) {
                return Err(BadField::new(
                    "add_special_tokens",
                    "true is not supported with \"messages\": the model's chat template places its special tokens",
                ));
            }
            if field("chat_template").is_some() {
                return Err(BadField::new(
                    "chat_template",
                    "arbiter scores with the model's own template; leave it unset",
                ));
            }
            for k in ["add_generation_prompt", "continue_final_message"] {
                match field(k) {
                    None | Some(Value::Bool(false)) => {}
                    Some(Value::Bool(true)) => {
                        return Err(BadField::new(k, "a reward model scores finished conversations; leave it false"))
                    }
                    Some(_) => return Err(BadField::new(k, "must be true, false or null")),
                }
            }
            (vec![Input::Messages(chat(messages)?)], Names::Whole("messages"))
        }
    };
    Ok(Request { inputs, names, truncation, request_id })
}

/// `truncate_prompt_tokens`: vLLM keeps the last N tokens (-1: the model's limit). arbiter keeps
/// the last tokens up to the model's limit only, so N below it is refused rather than ignored.
fn truncation(v: Option<&Value>, max_tokens: usize) -> Result<Option<TruncationPolicy>, BadField> {
    let Some(v) = v else { return Ok(None) };
    let bad = |m: String| Err(BadField::new("truncate_prompt_tokens", m));
    match v.as_i64() {
        Some(-1) => Ok(Some(TruncationPolicy::Truncate)),
        Some(n) if n >= 0 && n as u64 >= max_tokens as u64 => Ok(Some(TruncationPolicy::Truncate)),
        Some(n) if n >= 0 => bad(format!(
            "{n} is below the model's input limit ({max_tokens} tokens); arbiter can only keep the last \
             {max_tokens} (send -1 or null)"
        )),
        _ => bad("must be -1 or a non-negative integer".into()),
    }
}

/// `input`: a text, a list of texts, a list of token ids, or a list of token-id lists.
fn inputs(v: &Value, add_special: bool) -> Result<(Vec<Input>, Names), BadField> {
    let text = |s: &str| {
        if add_special {
            Input::TextWithSpecialTokens(s.to_string())
        } else {
            Input::Text(s.to_string())
        }
    };
    let list = match v {
        Value::String(s) => return Ok((vec![text(s)], Names::Whole("input"))),
        Value::Array(list) => list,
        _ => {
            return Err(BadField::new(
                "input",
                "must be a string, a list of strings, a list of token ids or a list of token-id lists",
            ))
        }
    };
    let first = list.first().ok_or_else(|| BadField::new("input", "is empty"))?;
    match first {
        Value::String(_) => {
            let texts = list.iter().enumerate().map(|(i, x)| {
                x.as_str()
                    .map(text)
                    .ok_or_else(|| BadField::new(format!("input[{i}]"), "must be a string, as input[0] is"))
            });
            Ok((texts.collect::<Result<_, _>>()?, Names::Indexed))
        }
        Value::Number(_) => Ok((vec![Input::TokenIds(token_ids(list, "input")?)], Names::Whole("input"))),
        Value::Array(_) => {
            let lists = list.iter().enumerate().map(|(i, x)| {
                let place = format!("input[{i}]");
                match x.as_array() {
                    Some(ids) => token_ids(ids, &place).map(Input::TokenIds),
                    None => Err(BadField::new(place, "must be a list of token ids, as input[0] is")),
                }
            });
            Ok((lists.collect::<Result<_, _>>()?, Names::Indexed))
        }
        _ => Err(BadField::new("input[0]", "must be a string, a token id or a list of token ids")),
    }
}

fn token_ids(list: &[Value], place: &str) -> Result<Vec<u32>, BadField> {
    if list.is_empty() {
        return Err(BadField::new(place, "has no token ids"));
    }
    list.iter()
        .enumerate()
        .map(|(j, x)| {
            x.as_u64().and_then(|t| u32::try_from(t).ok()).ok_or_else(|| {
                BadField::new(format!("{place}[{j}]"), "must be a token id (an integer from 0 to 2^32-1)")
            })
        })
        .collect()
}

/// `messages`: OpenAI chat messages; `content` a string or a list of text parts, which vLLM
/// joins with newlines.
fn chat(v: &Value) -> Result<Vec<Message>, BadField> {
    let list =
        v.as_array().ok_or_else(|| BadField::new("messages", "must be a list of {\"role\", \"content\"} objects"))?;
    if list.is_empty() {
        return Err(BadField::new("messages", "is empty"));
    }
    list.iter()
        .enumerate()
        .map(|(j, m)| {
            let place = format!("messages[{j}]");
            let obj = m
                .as_object()
                .ok_or_else(|| BadField::new(&place, "must be an object with \"role\" and \"content\""))?;
            let role = obj
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| BadField::new(format!("{place}.role"), "must be a string"))?;
            let role = Role::parse(role).map_err(|e| BadField::new(format!("{place}.role"), e.to_string()))?;
            let content = match obj.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => text_parts(parts, &format!("{place}.content"))?,
                _ => return Err(BadField::new(format!("{place}.content"), "must be a string or a list of text parts")),
            };
            Ok(Message::new(role, content))
        })
        .collect()
}

fn text_parts(parts: &[Value], place: &str) -> Result<String, BadField> {
    let texts = parts.iter().enumerate().map(|(k, p)| {
        let text = p.get("text").and_then(Value::as_str);
        match (p.get("type").and_then(Value::as_str), text) {
            (Some("text"), Some(t)) => Ok(t),
            _ => Err(BadField::new(
                format!("{place}[{k}]"),
                "only {\"type\": \"text\", \"text\": ...} parts can be scored",
            )),
        }
    });
    Ok(texts.collect::<Result<Vec<_>, _>>()?.join("\n"))
}

/// Seconds since the epoch, for `created`.
pub(super) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// vLLM's error body: `{"error": {"message", "type", "param", "code"}}`.
pub(super) fn reject(e: &ServiceError, param: Option<&str>) -> Response {
    let status = e.http_status();
    let body = json!({"error": {
        "message": e.to_string(), "type": code_name(e.code()), "param": param, "code": status.as_u16(),
    }});
    (status, axum::Json(body)).into_response()
}

/// The response body; `probs` per item are its attributes in model order, then the reward.
fn response(ready: &Ready, model: &str, id: &str, scored: Scored) -> Value {
    let mut tokens = 0;
    let data: Vec<Value> = scored
        .items
        .into_iter()
        .enumerate()
        .map(|(index, s)| {
            tokens += s.tokens;
            let mut labels: Vec<&str> = s.score.attributes.iter().map(|(name, _)| name.as_str()).collect();
            labels.push("reward");
            // f64 so that the JSON numbers are exactly the f32 scores gRPC returns.
            let mut probs: Vec<f64> = s.score.attributes.iter().map(|&(_, v)| f64::from(v)).collect();
            probs.push(f64::from(s.score.reward));
            let best = (1..probs.len()).fold(0, |b, k| if probs[k] > probs[b] { k } else { b });
            json!({"index": index, "label": labels[best], "probs": probs, "num_classes": probs.len()})
        })
        .collect();
    let mut body = Map::new();
    body.insert("id".into(), json!(format!("classify-{id}")));
    body.insert("object".into(), json!("list"));
    body.insert("created".into(), json!(unix_now()));
    body.insert("model".into(), json!(model));
    body.insert("data".into(), json!(data));
    body.insert(
        "usage".into(),
        json!({"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0, "prompt_tokens_details": null}),
    );
    let warning = ready.warning();
    if !warning.is_empty() {
        body.insert("warning".into(), json!(warning)); // the demo model's scores are meaningless
    }
    Value::Object(body)
}

/// A failed request's error, named by where in the body the problem is.
fn request_error(e: RequestError, names: Names, param: &OnceLock<String>) -> ServiceError {
    let place = match e.place {
        Place::Item(i) => Some(names.place(i)),
        Place::Request | Place::Prompt => None,
    };
    if let (Some(p), arbiter_scoring::ScoreError::Invalid(_)) = (&place, &e.error) {
        param.set(p.clone()).ok();
    }
    ServiceError::from_score(e.error, place)
}

/// `POST /classify`, `POST /v1/classify`.
pub(super) async fn handle(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let metadata = metadata(headers);
    let fallback_id = app.gate.request_id(&metadata);
    let param = OnceLock::new();
    let (body, bad) = (&body, &param);
    let model = app.settings.served_model_name.as_str();
    let span = tracing::info_span!("request", request_id = %fallback_id, rpc = "Classify");
    let answer = app
        .gate
        .run("Classify", &metadata, None, |ready| async move {
            let req = parse(body, ready.scorer.model().preprocessor.max_tokens()).map_err(|b| {
                bad.set(b.param.clone()).ok();
                ServiceError::InvalidArgument(b.to_string())
            })?;
            let names = req.names;
            ready.check_count(req.inputs.len(), "inputs").inspect_err(|_| {
                bad.set(names.field().to_string()).ok();
            })?;
            let truncation = req.truncation.unwrap_or(ready.limits.default_truncation);
            let items = req.inputs.into_iter().map(|input| Item::new(input, truncation)).collect();
            let scored =
                ready.scorer.score(items, Options::default()).await.map_err(|e| request_error(e, names, bad))?;
            Ok(response(&ready, model, req.request_id.as_deref().unwrap_or(&fallback_id), scored))
        })
        .instrument(span)
        .await;
    match answer {
        Ok(body) => axum::Json(body).into_response(),
        Err(e) => reject(&e, param.get().map(String::as_str)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 4096;

    fn ok(body: Value) -> Request {
        parse(body.to_string().as_bytes(), MAX).unwrap_or_else(|e| panic!("{body}: {e}"))
    }

    fn bad(body: &str) -> BadField {
        parse(body.as_bytes(), MAX).expect_err(body)
    }

    #[test]
    fn the_input_forms_of_vllms_completion_request() {
        // `input: list[int] | list[list[int]] | str | list[str]` (CompletionRequestMixin).
        let r = ok(json!({"model": "m", "input": "hello"}));
        assert_eq!((r.inputs, r.names), (vec![Input::TextWithSpecialTokens("hello".into())], Names::Whole("input")));
        let r = ok(json!({"model": "m", "input": ["a", "b"]}));
        assert_eq!(r.inputs, vec![Input::TextWithSpecialTokens("a".into()), Input::TextWithSpecialTokens("b".into())]);
        assert_eq!(r.names, Names::Indexed);
        let r = ok(json!({"input": [1, 2, 3]}));
        assert_eq!((r.inputs, r.names), (vec![Input::TokenIds(vec![1, 2, 3])], Names::Whole("input")));
        let r = ok(json!({"input": [[1, 2], [3]]}));
        assert_eq!(r.inputs, vec![Input::TokenIds(vec![1, 2]), Input::TokenIds(vec![3])]);
        // add_special_tokens defaults to true for input; false keeps the text's own tokens only.
        let r = ok(json!({"input": "x", "add_special_tokens": false}));
        assert_eq!(r.inputs, vec![Input::Text("x".into())]);
    }

    #[test]
    fn activation_flags_of_every_vintage_are_accepted_and_change_nothing() {
        let plain = ok(json!({"input": "x"}));
        for k in ["use_activation", "activation", "softmax"] {
            for v in [json!(true), json!(false), Value::Null] {
                assert_eq!(ok(json!({"input": "x", k: v})), plain, "{k}: {v}");
            }
        }
    }

    #[test]
    fn a_chat_request_is_one_conversation() {
        let r = ok(json!({"model": "m", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c"}]}));
        let want = vec![
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "a\nb"),
            Message::new(Role::Assistant, "c"),
        ];
        assert_eq!((r.inputs, r.names), (vec![Input::Messages(want)], Names::Whole("messages")));
    }

    #[test]
    fn truncate_prompt_tokens_maps_to_keeping_the_end() {
        assert_eq!(ok(json!({"input": "x"})).truncation, None);
        assert_eq!(
            ok(json!({"input": "x", "truncate_prompt_tokens": -1})).truncation,
            Some(TruncationPolicy::Truncate)
        );
        assert_eq!(
            ok(json!({"input": "x", "truncate_prompt_tokens": MAX})).truncation,
            Some(TruncationPolicy::Truncate)
        );
        let e = bad(r#"{"input": "x", "truncate_prompt_tokens": 10}"#);
        assert_eq!(e.param, "truncate_prompt_tokens");
        assert!(e.message.contains("below the model's input limit (4096 tokens)"), "{e}");
    }

    #[test]
    fn unknown_fields_are_ignored_as_vllm_ignores_them() {
        let r = ok(json!({"input": "x", "encoding_format": "float", "dimensions": 3, "priority": 0, "x-anything": {}}));
        assert_eq!(r, ok(json!({"input": "x"})));
        assert_eq!(ok(json!({"input": "x", "request_id": "abc"})).request_id.as_deref(), Some("abc"));
    }

    #[test]
    fn bad_bodies_name_the_field() {
        for (body, param, want) in [
            ("{not json", "body", "not valid JSON"),
            ("[1]", "body", "must be a JSON object"),
            ("{}", "input", "missing"),
            (r#"{"input": "x", "messages": []}"#, "messages", "not both"),
            (r#"{"input": 3}"#, "input", "must be a string, a list"),
            (r#"{"input": []}"#, "input", "is empty"),
            (r#"{"input": ["a", 2]}"#, "input[1]", "must be a string"),
            (r#"{"input": [1, -2]}"#, "input[1]", "must be a token id"),
            (r#"{"input": [1, 4294967296]}"#, "input[1]", "must be a token id"),
            (r#"{"input": [[1], 2]}"#, "input[1]", "must be a list of token ids"),
            (r#"{"input": [[1], []]}"#, "input[1]", "has no token ids"),
            (r#"{"input": [[1], [2, "x"]]}"#, "input[1][1]", "must be a token id"),
            (r#"{"input": [{}]}"#, "input[0]", "must be a string, a token id"),
            (r#"{"input": "x", "model": 1}"#, "model", "must be a string"),
            (r#"{"input": "x", "use_activation": "yes"}"#, "use_activation", "true, false or null"),
            (r#"{"input": "x", "add_special_tokens": 1}"#, "add_special_tokens", "true, false or null"),
            (r#"{"input": "x", "truncate_prompt_tokens": -2}"#, "truncate_prompt_tokens", "-1 or a non-negative"),
            (r#"{"input": "x", "request_id": 5}"#, "request_id", "must be a string"),
            (r#"{"messages": {}}"#, "messages", "must be a list"),
            (r#"{"messages": []}"#, "messages", "is empty"),
            (r#"{"messages": [{"role": "user", "content": "a"}, 3]}"#, "messages[1]", "must be an object"),
            (r#"{"messages": [{"content": "a"}]}"#, "messages[0].role", "must be a string"),
            (r#"{"messages": [{"role": "tool", "content": "a"}]}"#, "messages[0].role", "unknown role \"tool\""),
            (r#"{"messages": [{"role": "user"}]}"#, "messages[0].content", "a string or a list of text parts"),
            (
                r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
                "messages[0].content[0]",
                "text",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "a"}], "add_special_tokens": true}"#,
                "add_special_tokens",
                "not supported",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "a"}], "chat_template": "{{x}}"}"#,
                "chat_template",
                "own template",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "a"}], "add_generation_prompt": true}"#,
                "add_generation_prompt",
                "leave it false",
            ),
        ] {
            let e = bad(body);
            assert_eq!(e.param, param, "{body}: {e}");
            assert!(e.message.contains(want), "{body}: {e}");
            assert!(e.to_string().starts_with(&format!("{param}: ")), "{e}");
        }
    }

    #[test]
    fn item_errors_are_named_by_their_place_in_the_body() {
        let invalid =
            |i| RequestError { place: Place::Item(i), error: arbiter_scoring::ScoreError::Invalid("too long".into()) };
        let param = OnceLock::new();
        let e = request_error(invalid(2), Names::Indexed, &param);
        assert_eq!((e.to_string(), param.get().map(String::as_str)), ("input[2]: too long".into(), Some("input[2]")));
        let param = OnceLock::new();
        let e = request_error(invalid(0), Names::Whole("messages"), &param);
        assert_eq!((e.to_string(), param.get().map(String::as_str)), ("messages: too long".into(), Some("messages")));
    }
}
