//! The scores file (`scores.jsonl`): one JSON line per scored example, appended as results
//! arrive, so that a killed run resumes where it stopped.
//!
//! A kill can land in the middle of an append. Each line goes out as one write of the JSON and its
//! newline, so the only damage a kill can do is a last line without its newline (complete JSON or
//! part of it). [`load`] cuts such a line off the file before anything is appended (appending
//! onto it would merge two results into one unreadable line) and leaves its example unscored, so
//! the rerun scores it again.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::scoring::Scored;

/// A scores file that cannot be used; the message says which and why.
#[derive(Debug, thiserror::Error)]
pub enum SavedError {
    /// Reading, cutting or appending failed.
    #[error("{path}: {source}")]
    Io {
        /// The scores file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file holds scores of another model.
    #[error("{path} holds scores of model {found} but the server serves {expected}; use another --out")]
    OtherModel {
        /// The scores file.
        path: PathBuf,
        /// The fingerprint in the file.
        found: String,
        /// The server's fingerprint.
        expected: String,
    },
}

/// One saved result.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedResult {
    /// The example's scores.
    pub scored: Scored,
    /// Whether the server cut any of its candidates to fit the model.
    pub truncated: bool,
}

/// What [`load`] found.
#[derive(Debug, Default)]
pub struct Saved {
    /// Results by (subset, id); a later line for the same key replaces an earlier one.
    pub results: HashMap<(String, String), SavedResult>,
    /// Bytes of a last line without its newline, cut off the file (its example is scored again).
    pub torn_bytes: Option<usize>,
    /// Line numbers (from 1) that could not be read; their examples are scored again.
    pub unreadable: Vec<usize>,
}

/// The line saved for one example.
pub fn line(id: &str, subset: &str, scores: &[f32], num_correct: usize, truncated: bool, fingerprint: &str) -> String {
    let v = json!({"id": id, "subset": subset, "scores": scores, "num_correct": num_correct,
        "truncated": truncated, "model_fingerprint": fingerprint});
    v.to_string() + "\n"
}

/// Appends one line with a single write, so a kill leaves it whole or torn, never split around
/// another line.
pub fn append(file: &mut File, path: &Path, line: &str) -> Result<(), SavedError> {
    file.write_all(line.as_bytes()).map_err(|source| SavedError::Io { path: path.to_path_buf(), source })
}

fn parse(line: &str) -> Option<(String, SavedResult)> {
    let v: Value = serde_json::from_str(line).ok()?;
    let fingerprint = v.get("model_fingerprint")?.as_str()?.to_string();
    let scores = v.get("scores")?.as_array()?.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>()?;
    let num_correct = usize::try_from(v.get("num_correct")?.as_u64()?).ok()?;
    // The scoring reads the first two scores and splits at num_correct: a line that cannot be an
    // example's (hand-edited, say) is unreadable rather than a panic later.
    if scores.len() < 2 || num_correct == 0 || num_correct >= scores.len() {
        return None;
    }
    let scored = Scored {
        id: v.get("id")?.as_str()?.to_string(),
        subset: v.get("subset")?.as_str()?.to_string(),
        scores,
        num_correct,
    };
    // Files written before the field existed: nothing was reported as cut.
    let truncated = v.get("truncated").and_then(Value::as_bool).unwrap_or(false);
    Some((fingerprint, SavedResult { scored, truncated }))
}

/// Reads the scores file of a run (none yet: nothing saved), refuses one of another model, and
/// cuts a torn last line off it.
pub fn load(path: &Path, fingerprint: &str) -> Result<Saved, SavedError> {
    let io = |source| SavedError::Io { path: path.to_path_buf(), source };
    let mut saved = Saved::default();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(saved),
        Err(e) => return Err(io(e)),
    };
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if whole < bytes.len() {
        let file = std::fs::OpenOptions::new().write(true).open(path).map_err(io)?;
        file.set_len(whole as u64).map_err(io)?;
        file.sync_all().map_err(io)?;
        saved.torn_bytes = Some(bytes.len() - whole);
    }
    for (i, raw) in bytes[..whole].split(|&b| b == b'\n').enumerate() {
        if raw.is_empty() {
            continue;
        }
        let Some((found, result)) = std::str::from_utf8(raw).ok().and_then(parse) else {
            saved.unreadable.push(i + 1);
            continue;
        };
        if found != fingerprint {
            return Err(SavedError::OtherModel { path: path.to_path_buf(), found, expected: fingerprint.to_string() });
        }
        saved.results.insert((result.scored.subset.clone(), result.scored.id.clone()), result);
    }
    Ok(saved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("scores.jsonl");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_its_example_left_unscored() {
        let dir = tempfile::tempdir().unwrap();
        let a = line("1", "s", &[1.0, 0.5], 1, false, "fp");
        let b = line("2", "s", &[0.0, 2.0], 1, true, "fp");
        // Complete JSON without its newline, then half a line.
        for torn in [b.trim_end().to_string(), b[..b.len() / 2].to_string()] {
            let p = write(dir.path(), &format!("{a}{torn}"));
            let s = load(&p, "fp").unwrap();
            assert_eq!(s.torn_bytes, Some(torn.len()));
            assert_eq!(s.results.keys().cloned().collect::<Vec<_>>(), vec![("s".to_string(), "1".to_string())]);
            assert_eq!(std::fs::read_to_string(&p).unwrap(), a, "the file ends at the last whole line");
            // Appending now gives whole lines only.
            let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
            append(&mut f, &p, &b).unwrap();
            let s = load(&p, "fp").unwrap();
            assert_eq!((s.torn_bytes, s.unreadable.len(), s.results.len()), (None, 0, 2));
            assert!(s.results[&("s".to_string(), "2".to_string())].truncated);
        }
    }

    #[test]
    fn unreadable_lines_are_listed_and_another_model_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = line("1", "s", &[1.0, 0.5], 1, false, "fp");
        let one_score = line("3", "s", &[1.0], 1, false, "fp");
        let p = write(dir.path(), &format!("{a}{{\"id\": \"2\"}}\nnot json\n{one_score}"));
        let s = load(&p, "fp").unwrap();
        assert_eq!((s.unreadable, s.results.len(), s.torn_bytes), (vec![2, 3, 4], 1, None));
        let e = load(&p, "other").unwrap_err().to_string();
        assert!(e.contains("holds scores of model fp but the server serves other"), "{e}");
        assert!(load(&dir.path().join("none.jsonl"), "fp").unwrap().results.is_empty());
    }
}
