//! RewardBench files: v1 (`prompt`, `chosen`, `rejected`, `subset`, `id`) and RewardBench 2
//! (`chosen` and `rejected` are lists), as JSON (an array of rows), JSON lines or Parquet.

use std::path::Path;

use serde_json::Value;

/// Which benchmark a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// RewardBench: one chosen and one rejected response.
    V1,
    /// RewardBench 2: lists of chosen and rejected responses (best-of-4; Ties has several chosen).
    V2,
}

/// One example: a prompt and its candidate responses, the correct ones first.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The row's id, as a string (v1 ids are integers).
    pub id: String,
    /// Subset name.
    pub subset: String,
    /// The user prompt.
    pub prompt: String,
    /// Chosen responses, then rejected ones.
    pub candidates: Vec<String>,
    /// How many leading candidates are chosen (correct).
    pub num_correct: usize,
}

/// A file that cannot be read as RewardBench data; the message names the row and the field the
/// way every arbiter error names a place in its input (`rows[3].chosen[1]: must be a string`).
/// Rows count from 0 in file order (blank JSONL lines are skipped).
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct DatasetError {
    /// The file.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// Reads a RewardBench file; the format comes from the extension (.json, .jsonl, .parquet) and
/// the version from the rows (string `chosen`: v1, list: v2).
pub fn read(path: &Path) -> Result<(Version, Vec<Example>), DatasetError> {
    let err = |message: String| DatasetError { path: path.display().to_string(), message };
    let rows: Vec<Value> = match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => {
            let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
            text.lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| serde_json::from_str(l).map_err(|e| err(format!("line {}: not valid JSON: {e}", i + 1))))
                .collect::<Result<_, _>>()?
        }
        Some("json") => {
            let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
            match serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))? {
                Value::Array(rows) => rows,
                _ => return Err(err("a .json file must hold an array of rows".into())),
            }
        }
        Some("parquet") => read_parquet(path).map_err(err)?,
        _ => return Err(err("unknown extension: expected .json, .jsonl or .parquet".into())),
    };
    if rows.is_empty() {
        return Err(err("no rows".into()));
    }
    let version = match rows[0].get("chosen") {
        Some(Value::String(_)) => Version::V1,
        Some(Value::Array(_)) => Version::V2,
        _ => return Err(err("rows[0].chosen: must be a string (v1) or a list of strings (v2)".into())),
    };
    let examples: Vec<Example> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| example(r, version).map_err(|m| err(format!("rows[{i}]{m}"))))
        .collect::<Result<_, _>>()?;
    // Saved scores are keyed by (subset, id): a repeated key would let one saved result stand
    // for two examples, and the report would count it twice.
    let mut first = std::collections::HashMap::new();
    for (i, e) in examples.iter().enumerate() {
        if let Some(j) = first.insert((&e.subset, &e.id), i) {
            return Err(err(format!(
                "rows[{i}].id: {:?} of subset {:?} is also the id of rows[{j}]; examples are told apart by (subset, id)",
                e.id, e.subset
            )));
        }
    }
    Ok((version, examples))
}

fn read_parquet(path: &Path) -> Result<Vec<Value>, String> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let reader = SerializedFileReader::new(file).map_err(|e| format!("not a Parquet file: {e}"))?;
    let rows = reader.get_row_iter(None).map_err(|e| e.to_string())?;
    rows.map(|r| r.map(|row| row.to_json_value()).map_err(|e| format!("bad Parquet row: {e}"))).collect()
}

/// Field readers answer with the rest of the path after `rows[i]` (`.field: message`).
fn text(row: &Value, field: &str) -> Result<String, String> {
    match row.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) if field == "id" => Ok(n.to_string()),
        Some(v) => Err(format!(".{field}: must be a string, found {v}")),
        None => Err(format!(".{field}: missing")),
    }
}

fn texts(row: &Value, field: &str) -> Result<Vec<String>, String> {
    match row.get(field) {
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| v.as_str().map(str::to_string).ok_or_else(|| format!(".{field}[{i}]: must be a string")))
            .collect(),
        Some(v) => Err(format!(".{field}: must be a list of strings, found {v}")),
        None => Err(format!(".{field}: missing")),
    }
}

fn example(row: &Value, version: Version) -> Result<Example, String> {
    let (chosen, rejected) = match version {
        Version::V1 => (vec![text(row, "chosen")?], vec![text(row, "rejected")?]),
        Version::V2 => (texts(row, "chosen")?, texts(row, "rejected")?),
    };
    if chosen.is_empty() || rejected.is_empty() {
        return Err(": needs at least one chosen and one rejected response".into());
    }
    let num_correct = chosen.len();
    Ok(Example {
        id: text(row, "id")?,
        subset: text(row, "subset")?,
        prompt: text(row, "prompt")?,
        candidates: chosen.into_iter().chain(rejected).collect(),
        num_correct,
    })
}
