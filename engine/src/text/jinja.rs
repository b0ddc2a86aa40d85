//! A model's own HF chat template (`chat_template` in tokenizer_config.json), rendered with
//! minijinja configured the way transformers configures jinja2: `trim_blocks`, `lstrip_blocks`,
//! Python string methods, `raise_exception`, `strftime_now`, and a `tojson` that writes what
//! Python's `json.dumps(ensure_ascii=False)` writes.

use std::path::Path;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde_json::Value as Json;

use super::chat::Message;
use crate::error::{EngineError, Result};

/// A compiled chat template and the special tokens it may refer to.
pub struct JinjaTemplate {
    env: Environment<'static>,
    /// Special tokens passed to the template (`bos_token`, `eos_token`, ...).
    tokens: Vec<(String, String)>,
}

impl std::fmt::Debug for JinjaTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JinjaTemplate").field("tokens", &self.tokens).finish()
    }
}

impl JinjaTemplate {
    /// Reads the chat template of `tokenizer_config.json`, if it has one.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<Self>> {
        let bad = |message: String| EngineError::Config { path: path.to_path_buf(), message };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(EngineError::Io { path: path.to_path_buf(), source: e }),
        };
        let cfg: Json = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let source = match cfg.get("chat_template") {
            None | Some(Json::Null) => return Ok(None),
            Some(Json::String(s)) => s.clone(),
            // Several named templates: the one called "default", else the first.
            Some(Json::Array(list)) => {
                let pick = list
                    .iter()
                    .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                    .or_else(|| list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(Json::as_str)
                    .ok_or_else(|| bad("chat_template is a list without a {\"name\", \"template\"} entry".into()))?;
                pick.to_string()
            }
            Some(_) => return Err(bad("chat_template must be a string or a list of named templates".into())),
        };
        let mut tokens = Vec::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"] {
            let value = match cfg.get(key) {
                Some(Json::String(s)) => Some(s.clone()),
                Some(Json::Object(o)) => o.get("content").and_then(Json::as_str).map(str::to_string),
                _ => None,
            };
            if let Some(v) = value {
                tokens.push((key.to_string(), v));
            }
        }
        Self::new(source, tokens).map(Some).map_err(|e| match e {
            EngineError::InvalidInput(m) => bad(m),
            e => e,
        })
    }

    /// Compiles `source` with the given special tokens.
    pub fn new(source: String, tokens: Vec<(String, String)>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> std::result::Result<String, JinjaError> {
            strftime_now(&fmt)
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source)
            .map_err(|e| EngineError::InvalidInput(format!("the chat template does not compile: {e:#}")))?;
        Ok(JinjaTemplate { env, tokens })
    }

    /// Renders `messages` with `add_generation_prompt = false` (the response is part of the
    /// conversation being scored).
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| Value::from_serialize(serde_json::json!({"role": m.role.as_str(), "content": m.content})))
            .collect();
        let mut ctx: Vec<(String, Value)> =
            vec![("messages".into(), Value::from(msgs)), ("add_generation_prompt".into(), Value::from(false))];
        for (k, v) in &self.tokens {
            ctx.push((k.clone(), Value::from(v.as_str())));
        }
        let ctx: Value = ctx.into_iter().collect::<std::collections::BTreeMap<_, _>>().into();
        let tmpl = self.env.get_template("chat").expect("added at construction");
        tmpl.render(ctx).map_err(|e| EngineError::InvalidInput(format!("the chat template failed: {e:#}")))
    }
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// sort_keys=sort_keys)`, so non-ASCII stays as is and separators are Python's.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    python_json(&json, indent, sort_keys.unwrap_or(false), 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn python_json(v: &Json, indent: Option<usize>, sort: bool, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (_, Some(u), _) => out.push_str(&u.to_string()),
            (_, _, Some(f)) if f.fract() == 0.0 && f.abs() < 1e16 => out.push_str(&format!("{f:.1}")),
            (_, _, Some(f)) => out.push_str(&f.to_string()),
            _ => out.push_str("null"),
        },
        Json::String(s) => {
            out.push('"');
            for c in s.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    '\u{8}' => out.push_str("\\b"),
                    '\u{c}' => out.push_str("\\f"),
                    c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        Json::Array(a) if a.is_empty() => out.push_str("[]"),
        Json::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                python_json(x, indent, sort, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Json::Object(o) if o.is_empty() => out.push_str("{}"),
        Json::Object(o) => {
            let mut entries: Vec<(&String, &Json)> = o.iter().collect();
            if sort {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                python_json(&Json::String(k.clone()), None, sort, 0, out);
                out.push_str(": ");
                python_json(x, indent, sort, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
    }
}

/// `datetime.now().strftime(fmt)` for the directives chat templates use (UTC).
fn strftime_now(fmt: &str) -> std::result::Result<String, JinjaError> {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = ((secs % 86_400) / 3600, (secs % 3600) / 60, secs % 60);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"];
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:>2}")),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('%') => out.push('%'),
            other => {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported directive %{}", other.map(String::from).unwrap_or_default()),
                ))
            }
        }
    }
    Ok(out)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_418), (2025, 11, 26));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn tojson_writes_what_python_writes() {
        let t = JinjaTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=2) }}".into(), vec![]).unwrap();
        let env = &t.env;
        let out = env
            .get_template("chat")
            .unwrap()
            .render(minijinja::context! { x => serde_json::json!({"a": [1, 2.5, "é<\n"], "b": {}}) })
            .unwrap();
        assert_eq!(out, "{\"a\": [1, 2.5, \"é<\\n\"], \"b\": {}}|{\n  \"a\": [\n    1,\n    2.5,\n    \"é<\\n\"\n  ],\n  \"b\": {}\n}");
    }

    #[test]
    fn raise_exception_becomes_an_input_error() {
        let t = JinjaTemplate::new("{{ raise_exception('roles must alternate') }}".into(), vec![]).unwrap();
        let e = t.render(&[]).unwrap_err().to_string();
        assert!(e.contains("roles must alternate"), "{e}");
    }
}
