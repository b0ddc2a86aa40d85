//! Items as JSON objects (the input lines of `arbiter score`) and results as JSON objects.
//!
//! An item has exactly one of `messages` (a list of `{"role", "content"}`), `text` or
//! `token_ids`, and optionally `id` (echoed back), `truncation` (`"error"`, `"truncate"` or `"truncate_content"`),
//! `reward_weights` (`{attribute: weight}` overriding the model's defaults) and `per_turn` (a
//! result after every assistant turn too, in `"turns"`).

use arbiter_engine::demo::DEMO_WARNING;
use arbiter_engine::spec::HeadSpec;
use arbiter_engine::text::{Input, Message, Role, TruncationPolicy};
use arbiter_engine::RewardWeights;
use arbiter_scoring::{ItemScore, TurnScore};
use serde_json::{json, Map, Value};

/// One parsed item.
#[derive(Debug, Clone)]
pub struct Item {
    /// The caller's id, echoed in the result.
    pub id: Option<Value>,
    /// What to score.
    pub input: Input,
    /// Truncation policy, if the item sets one.
    pub truncation: Option<TruncationPolicy>,
    /// Reward weight overrides by attribute name.
    pub weights: Vec<(String, f32)>,
    /// Whether to score after every assistant turn, if the item says.
    pub per_turn: Option<bool>,
}

use crate::field::BadField;

/// Parses one JSON line into an item; the error names the field that is wrong.
pub fn parse_item(line: &str) -> Result<Item, BadField> {
    let v: Value = serde_json::from_str(line).map_err(|e| BadField::whole(format!("not valid JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| BadField::whole("expected a JSON object"))?;
    const KNOWN: [&str; 7] = ["messages", "text", "token_ids", "id", "truncation", "reward_weights", "per_turn"];
    if let Some(k) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(BadField::new(k.as_str(), format!("unknown field; fields are {}", KNOWN.join(", "))));
    }
    let kinds: Vec<&str> = ["messages", "text", "token_ids"].into_iter().filter(|k| obj.contains_key(*k)).collect();
    let input = match kinds.as_slice() {
        ["messages"] => Input::Messages(parse_messages(&obj["messages"])?),
        ["text"] => {
            Input::Text(obj["text"].as_str().ok_or_else(|| BadField::new("text", "must be a string"))?.to_string())
        }
        ["token_ids"] => Input::TokenIds(
            obj["token_ids"]
                .as_array()
                .ok_or_else(|| BadField::new("token_ids", "must be a list of integers"))?
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    t.as_u64()
                        .and_then(|t| u32::try_from(t).ok())
                        .ok_or_else(|| BadField::new(format!("token_ids[{i}]"), format!("{t} is not a token id")))
                })
                .collect::<Result<_, _>>()?,
        ),
        [] => return Err(BadField::whole("the item needs one of \"messages\", \"text\" or \"token_ids\"")),
        many => return Err(BadField::whole(format!("the item has {}; give exactly one", many.join(" and ")))),
    };
    let truncation = match obj.get("truncation") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.parse().map_err(|e| BadField::new("truncation", format!("{e}")))?),
        Some(v) => {
            return Err(BadField::new(
                "truncation",
                format!("must be \"error\", \"truncate\" or \"truncate_content\", found {v}"),
            ))
        }
    };
    let weights = match obj.get("reward_weights") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                v.as_f64()
                    .map(|w| (k.clone(), w as f32))
                    .ok_or_else(|| BadField::new(format!("reward_weights.{k}"), "must be a number"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(BadField::new("reward_weights", "must be an object of attribute -> weight")),
    };
    let per_turn = match obj.get("per_turn") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(v) => return Err(BadField::new("per_turn", format!("must be true or false, found {v}"))),
    };
    Ok(Item { id: obj.get("id").cloned(), input, truncation, weights, per_turn })
}

fn parse_messages(v: &Value) -> Result<Vec<Message>, BadField> {
    let list =
        v.as_array().ok_or_else(|| BadField::new("messages", "must be a list of {\"role\", \"content\"} objects"))?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| BadField::new(format!("messages[{i}].role"), "must be a string"))?;
            let role = Role::parse(role).map_err(|e| BadField::new(format!("messages[{i}].role"), e.to_string()))?;
            let content = m
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| BadField::new(format!("messages[{i}].content"), "must be a string"))?;
            Ok(Message::new(role, content))
        })
        .collect()
}

/// Reward weights for an item: the model's defaults with the item's overrides.
pub fn item_weights(head: &HeadSpec, item: &Item) -> Result<RewardWeights, BadField> {
    RewardWeights::with_overrides(head, item.weights.iter().map(|(k, w)| (k.as_str(), *w)))
        .map_err(|e| BadField::new("reward_weights", e.to_string()))
}

/// The JSON result of a scored item.
pub fn result_json(line: usize, id: Option<&Value>, scored: &ItemScore, demo: bool) -> Value {
    let (score, truncation) = (&scored.score, &scored.truncation);
    let mut o = Map::new();
    o.insert("line".into(), json!(line));
    if let Some(id) = id {
        o.insert("id".into(), id.clone());
    }
    let attrs: Map<String, Value> = score.attributes.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    o.insert("attributes".into(), Value::Object(attrs));
    o.insert("reward".into(), json!(score.reward));
    o.insert("tokens".into(), json!(scored.tokens));
    o.insert("truncated".into(), json!(truncation.truncated()));
    if truncation.truncated() {
        o.insert(
            "truncation".into(),
            json!({
                "original_tokens": truncation.original_tokens,
                "dropped_messages": truncation.dropped_messages,
                "dropped_tokens": truncation.dropped_tokens,
            }),
        );
    }
    if !scored.turns.is_empty() {
        let turns: Vec<Value> = scored.turns.iter().map(turn_json).collect();
        o.insert("turns".into(), Value::Array(turns));
    }
    if demo {
        o.insert("warning".into(), json!(DEMO_WARNING));
    }
    Value::Object(o)
}

/// One turn of a per-turn result: `{"message", "attributes", "reward", "tokens", "on_spine"}`, or
/// `{"message", "scored": false}` for a turn truncation cut away.
fn turn_json(t: &TurnScore) -> Value {
    match &t.score {
        Some(s) => {
            let attrs: Map<String, Value> = s.attributes.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            json!({"message": t.message, "scored": true, "attributes": attrs, "reward": s.reward,
                   "tokens": t.tokens, "on_spine": t.on_spine})
        }
        None => json!({"message": t.message, "scored": false}),
    }
}

/// The JSON result of an item that could not be scored.
pub fn error_json(line: usize, id: Option<&Value>, error: &dyn std::fmt::Display) -> Value {
    let mut o = Map::new();
    o.insert("line".into(), json!(line));
    if let Some(id) = id {
        o.insert("id".into(), id.clone());
    }
    o.insert("error".into(), json!(format!("line {line}: {error}")));
    Value::Object(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_input_kinds() {
        let i = parse_item(
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "id": 7}"#,
        )
        .unwrap();
        assert!(matches!(i.input, Input::Messages(ref m) if m.len() == 2));
        assert_eq!(i.id, Some(json!(7)));
        assert!(matches!(parse_item(r#"{"text": "x"}"#).unwrap().input, Input::Text(_)));
        let i = parse_item(r#"{"token_ids": [1, 2], "truncation": "truncate", "reward_weights": {"a": 2}}"#).unwrap();
        assert_eq!(i.input, Input::TokenIds(vec![1, 2]));
        assert_eq!(i.truncation, Some(TruncationPolicy::Truncate));
        assert_eq!(i.weights, vec![("a".to_string(), 2.0)]);
    }

    #[test]
    fn malformed_items_say_what_is_wrong() {
        for (line, want) in [
            ("nope", "not valid JSON"),
            ("[1]", "expected a JSON object"),
            ("{}", "needs one of"),
            (r#"{"text": "a", "token_ids": [1]}"#, "has text and token_ids"),
            (r#"{"token_ids": [1, -3]}"#, "token_ids[1]: -3 is not a token id"),
            (r#"{"messages": [{"role": "robot", "content": "x"}]}"#, "messages[0].role: unknown role \"robot\""),
            (r#"{"messages": [{"role": "user"}]}"#, "messages[0].content: must be a string"),
            (r#"{"text": "a", "truncation": "cut"}"#, "truncation: unknown truncation policy \"cut\""),
            (r#"{"text": "a", "colour": 1}"#, "colour: unknown field"),
            (r#"{"text": "a", "per_turn": "yes"}"#, "per_turn: must be true or false, found \"yes\""),
        ] {
            let e = parse_item(line).unwrap_err().to_string();
            assert!(e.contains(want), "{line}: {e}");
        }
    }
}
