//! The tokenizer's fidelity check: the built-in corpus encoded by SentencePiece itself (the
//! reference that the Python script `scripts/spm_to_tokenizer_json.py`, embedded here, writes)
//! and by arbiter, with the tokenizer.json and the same template code the server uses, must agree
//! id for id. tokenizer.json itself is built in Rust (`crate::sentencepiece`); the script's own
//! tokenizer.json is only read with `--tokenizer-dir`.

use std::path::{Path, PathBuf};
use std::process::Command;

use arbiter_engine::config::load_config;
use arbiter_engine::text::{Message, Preprocessor, Role};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{io, ConvertError, Result};

/// The converter script, as committed in `scripts/`.
pub const SCRIPT: &str = include_str!("../../scripts/spm_to_tokenizer_json.py");
/// The fidelity corpus.
pub const CORPUS: &str = include_str!("fidelity_corpus.json");
/// The file the script writes next to tokenizer.json.
pub const REFERENCE_FILE: &str = "sentencepiece_reference.json";

/// A corpus message.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CorpusMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Text.
    pub content: String,
}

/// A plain text of the corpus and, in the reference, SentencePiece's ids for it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TextEntry {
    /// Short description, shown on failure.
    pub name: String,
    /// The text.
    pub text: String,
    /// SentencePiece's ids (reference only).
    #[serde(default)]
    pub ids: Vec<u32>,
}

/// A conversation of the corpus and, in the reference, NeMo-Aligner's rendering and its ids.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ChatEntry {
    /// Short description, shown on failure.
    pub name: String,
    /// The conversation.
    pub messages: Vec<CorpusMessage>,
    /// The templated text (reference only).
    #[serde(default)]
    pub text: String,
    /// SentencePiece's ids of the templated text (reference only).
    #[serde(default)]
    pub ids: Vec<u32>,
}

/// The corpus, or the script's reference encodings of it.
#[derive(Debug, Clone, Deserialize)]
pub struct Corpus {
    /// Plain texts.
    pub texts: Vec<TextEntry>,
    /// Conversations.
    pub chats: Vec<ChatEntry>,
    /// sha256 of the SentencePiece model (reference only).
    #[serde(default)]
    pub model_sha256: String,
    /// Number of pieces of the SentencePiece model (reference only).
    #[serde(default)]
    pub pieces: usize,
}

/// The built-in corpus.
pub fn builtin_corpus() -> Corpus {
    serde_json::from_str(CORPUS).expect("the embedded corpus is valid JSON (checked by a test)")
}

/// The interpreter tried when `--python` is not given.
pub const DEFAULT_PYTHON: &str = "python3";

/// Checks that `python` runs and imports `sentencepiece`; the error says why not, for the
/// "tokenizer not verified" message.
pub fn probe_sentencepiece(python: &Path) -> std::result::Result<(), String> {
    match Command::new(python).args(["-c", "import sentencepiece"]).output() {
        Err(e) => Err(format!("cannot run {} ({e})", python.display())),
        Ok(o) if !o.status.success() => Err(format!("{} has no `sentencepiece` module", python.display())),
        Ok(_) => Ok(()),
    }
}

/// Runs the embedded script with `python` on `model`, writing SentencePiece's encodings of the
/// corpus (the reference) into `out`. Needs only the `sentencepiece` package.
pub fn run_script(python: &Path, model: &Path, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let script = out.join("spm_to_tokenizer_json.py");
    let corpus = out.join("fidelity_corpus.json");
    std::fs::write(&script, SCRIPT).map_err(io(&script))?;
    std::fs::write(&corpus, CORPUS).map_err(io(&corpus))?;
    let output = Command::new(python)
        .arg(&script)
        .arg("--model")
        .arg(model)
        .arg("--corpus")
        .arg(&corpus)
        .arg("--out")
        .arg(out)
        .arg("--reference-only")
        .output()
        .map_err(|e| {
            ConvertError::Tokenizer(format!(
                "cannot run {} ({e}); checking the tokenizer against SentencePiece needs Python with `pip install sentencepiece` \
                 (choose the interpreter with --python)",
                python.display()
            ))
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(12).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let hint = if stderr.contains("ModuleNotFoundError") {
            "\n(install the package: pip install sentencepiece)"
        } else {
            ""
        };
        return Err(ConvertError::Tokenizer(format!(
            "{} {} failed ({}):\n{}{hint}",
            python.display(),
            script.display(),
            output.status,
            tail.join("\n")
        )));
    }
    Ok(())
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io(path))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Reads the script's reference from `dir` and checks it was made from `model` and from the built-in corpus.
pub fn load_reference(dir: &Path, model: &Path) -> Result<Corpus> {
    let path = dir.join(REFERENCE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ConvertError::MissingFile {
            path: path.clone(),
            why: "scripts/spm_to_tokenizer_json.py writes SentencePiece's own encodings there".into(),
        },
        _ => io(&path)(e),
    })?;
    let reference: Corpus = serde_json::from_str(&text)
        .map_err(|e| ConvertError::Tokenizer(format!("{}: not a reference file: {e}", path.display())))?;
    let sha = sha256_file(model)?;
    if reference.model_sha256 != sha {
        return Err(ConvertError::Tokenizer(format!(
            "{} was made from a SentencePiece model with sha256 {}, but {} has sha256 {sha}",
            path.display(),
            reference.model_sha256,
            model.display()
        )));
    }
    let corpus = builtin_corpus();
    let same_texts =
        corpus.texts.iter().map(|t| (&t.name, &t.text)).eq(reference.texts.iter().map(|t| (&t.name, &t.text)));
    let same_chats =
        corpus.chats.iter().map(|c| (&c.name, &c.messages)).eq(reference.chats.iter().map(|c| (&c.name, &c.messages)));
    if !same_texts || !same_chats {
        return Err(ConvertError::Tokenizer(format!(
            "{} was made from another fidelity corpus than this arbiter's; run scripts/spm_to_tokenizer_json.py \
             with --corpus convert/src/fidelity_corpus.json of this version",
            path.display()
        )));
    }
    Ok(reference)
}

/// Checks the model folder `dir` (config.json + tokenizer.json) against the reference: every
/// chat rendered by arbiter's template must give NeMo-Aligner's text and SentencePiece's ids,
/// every text SentencePiece's ids. Returns the number of entries checked.
pub fn check_fidelity(dir: &Path, reference: &Corpus) -> Result<usize> {
    let spec = load_config(&dir.join("config.json"))?;
    let pre = Preprocessor::from_model_dir(dir, &spec, None)?;
    let tok =
        pre.tokenizer().ok_or_else(|| ConvertError::Tokenizer("the model folder has no tokenizer.json".into()))?;
    let piece = |id: u32| tok.token(id).unwrap_or_else(|| format!("<id {id}>"));
    let compare = |name: &str, text: &str, want: &[u32], got: &[u32]| -> Result<()> {
        if want == got {
            return Ok(());
        }
        let i = want.iter().zip(got).position(|(a, b)| a != b).unwrap_or(want.len().min(got.len()));
        let window = |ids: &[u32]| -> String {
            let lo = i.saturating_sub(3);
            let hi = (i + 6).min(ids.len());
            let shown: Vec<String> = ids[lo..hi].iter().map(|&t| format!("{t}:{:?}", piece(t))).collect();
            format!("[{}{}]", if lo > 0 { "... " } else { "" }, shown.join(", "))
        };
        Err(ConvertError::Fidelity {
            name: name.to_string(),
            message: format!(
                "text {}\nfirst difference at token {i} (SentencePiece {} ids, tokenizer.json {} ids)\n  SentencePiece:  {}\n  tokenizer.json: {}",
                shorten(text),
                want.len(),
                got.len(),
                window(want),
                window(got)
            ),
        })
    };
    for c in &reference.chats {
        let messages = c
            .messages
            .iter()
            .map(|m| Ok(Message::new(Role::parse(&m.role)?, m.content.clone())))
            .collect::<std::result::Result<Vec<_>, arbiter_engine::EngineError>>()?;
        let (text, ids) = pre.render(&messages)?;
        if text != c.text {
            let at = text.chars().zip(c.text.chars()).position(|(a, b)| a != b).unwrap_or(text.len().min(c.text.len()));
            return Err(ConvertError::Fidelity {
                name: c.name.clone(),
                message: format!(
                    "arbiter's template renders {} but NeMo-Aligner's renders {} (first difference at character {at})",
                    shorten(&text),
                    shorten(&c.text)
                ),
            });
        }
        compare(&c.name, &text, &c.ids, &ids)?;
    }
    for t in &reference.texts {
        compare(&t.name, &t.text, &t.ids, &tok.encode(&t.text)?)?;
    }
    Ok(reference.chats.len() + reference.texts.len())
}

/// The text as a Rust string literal, cut in the middle when long.
fn shorten(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= 160 {
        return format!("{text:?}");
    }
    let head: String = chars[..100].iter().collect();
    let tail: String = chars[chars.len() - 50..].iter().collect();
    format!("{head:?} ... {tail:?}")
}

/// Finds the SentencePiece model: `--tokenizer-model`, else the one model_config.yaml names, in `input`.
pub fn find_model(input: &Path, named: Option<&str>, explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(ConvertError::MissingFile { path: p.to_path_buf(), why: "--tokenizer-model names it".into() })
        };
    }
    let name = named.ok_or_else(|| ConvertError::Config {
        path: input.join("model_config.yaml"),
        message: "tokenizer.model is not set; name the SentencePiece file with --tokenizer-model".into(),
    })?;
    let p = input.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(ConvertError::MissingFile {
            path: p,
            why: "model_config.yaml's tokenizer.model names it (or pass --tokenizer-model)".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_corpus_covers_what_the_issue_lists() {
        let c = builtin_corpus();
        let all: String = c.texts.iter().map(|t| t.text.as_str()).collect();
        assert!(!all.is_ascii(), "unicode");
        let cjk_emoji_marks = ['\u{65e5}', '\u{1f642}', '\u{301}'];
        assert!(cjk_emoji_marks.iter().all(|&c| all.contains(c)), "CJK, emoji, combining marks");
        assert!(all.contains('\u{10fffd}') && all.contains("<extra_id_1>"), "byte-fallback only, markers");
        assert!(
            all.contains("1234") && all.contains("  ") && all.contains("\t") && all.contains("def "),
            "digits, runs, code"
        );
        assert!(c.chats.iter().any(|ch| ch.messages.iter().filter(|m| m.role == "user").count() >= 3), "multi-turn");
        assert!(
            c.chats.iter().any(|ch| ch.messages[0].role == "system")
                && c.chats.iter().any(|ch| ch.messages[0].role == "user")
        );
    }
}
