//! `arbiter convert` then `arbiter score`, as a user runs them, on the released-layout fixture
//! (tests/fixtures/make_released.py): the scores are HF transformers' (golden nemotron-released).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn arbiter(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_arbiter")).args(args).env_remove("ARBITER_MODEL").output().expect("arbiter runs")
}

/// `arbiter` with nothing on PATH but `path` (where convert looks for python3).
fn arbiter_with_path(path: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .args(args)
        .env("PATH", path)
        .env_remove("ARBITER_MODEL")
        .output()
        .expect("arbiter runs")
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn convert_then_score_gives_the_transformers_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let released = fixtures().join("released/nemotron-tiny");
    let out = arbiter(&[
        "convert",
        "--input",
        s(&released),
        "--output",
        s(&model),
        "--tokenizer-dir",
        s(&released.join("tokenizer")),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("tokenizer.json matches SentencePiece on all 29 corpus entries"), "{stderr}");

    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("golden/nemotron-released/expected.json")).unwrap(),
    )
    .unwrap();
    let input = tmp.path().join("in.jsonl");
    let lines: Vec<String> = expected["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| serde_json::json!({"token_ids": s}).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = arbiter(&["score", "--model", s(&model), "--input", s(&input)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let results: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(results.len(), lines.len());
    let names = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"];
    for (i, (r, reference)) in results.iter().zip(expected["outputs"].as_array().unwrap()).enumerate() {
        let reference: Vec<f64> = reference.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        // DESIGN.md's error of a result, over the full head output.
        let scale = reference.iter().fold(1e-3f64, |m, x| m.max(x.abs()));
        for (k, name) in names.iter().enumerate() {
            let got = r["attributes"][name].as_f64().unwrap();
            let err = (got - reference[4 + k]).abs() / scale;
            assert!(err <= 1e-4, "line {i} {name}: {got} vs {} (error {err:.2e})", reference[4 + k]);
        }
        let want: f64 = [0.3, 0.74, 0.46, 0.47, -0.33].iter().zip(&reference[4..]).map(|(w, x)| w * x).sum();
        assert!((r["reward"].as_f64().unwrap() - want).abs() <= 1e-4 * scale.max(1.0), "line {i}: reward");
    }

    // Messages go through the converted tokenizer and the Nemotron reward template.
    let chat = tmp.path().join("chat.jsonl");
    std::fs::write(
        &chat,
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}"#,
    )
    .unwrap();
    let out = arbiter(&["score", "--model", s(&model), "--input", s(&chat)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    assert!(r["tokens"].as_u64().unwrap() > 20, "{r}");
}

#[test]
fn a_broken_checkpoint_fails_with_the_file_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = arbiter(&["convert", "--input", s(tmp.path()), "--output", s(&tmp.path().join("o")), "--weights-only"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("model_config.yaml"), "{stderr}");
}

#[test]
fn convert_with_no_python_on_path_scores_like_the_script_made_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let released = fixtures().join("released/nemotron-tiny");
    let empty = tmp.path().join("empty-path");
    std::fs::create_dir(&empty).unwrap();
    let rust = tmp.path().join("rust");
    let out = arbiter_with_path(&empty, &["convert", "--input", s(&released), "--output", s(&rust)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("tokenizer not verified against SentencePiece: cannot run python3"), "{stderr}");

    // A python3 without the sentencepiece module (here: one that fails every import) is no check either.
    let fake = tmp.path().join("fake-python");
    std::fs::create_dir(&fake).unwrap();
    let python3 = fake.join("python3");
    std::fs::write(&python3, "#!/bin/sh\nexit 1\n").unwrap();
    let mut perms = std::fs::metadata(&python3).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&python3, perms).unwrap();
    let out = arbiter_with_path(&fake, &["convert", "--input", s(&released), "--output", s(&tmp.path().join("fake"))]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("tokenizer not verified against SentencePiece: python3 has no `sentencepiece` module"),
        "{stderr}"
    );

    // Today's folder: the tokenizer.json scripts/spm_to_tokenizer_json.py made, checked against SentencePiece.
    let script = tmp.path().join("script");
    let out = arbiter(&[
        "convert",
        "--input",
        s(&released),
        "--output",
        s(&script),
        "--tokenizer-dir",
        s(&released.join("tokenizer")),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(weights(&rust) == weights(&script), "the weights do not depend on the tokenizer step");

    // Every conversation and text of the fidelity corpus scores the same in both folders.
    let corpus: Value = serde_json::from_str(
        &std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../convert/src/fidelity_corpus.json"))
            .unwrap(),
    )
    .unwrap();
    let mut lines: Vec<String> = corpus["chats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| serde_json::json!({"messages": c["messages"]}).to_string())
        .collect();
    lines
        .extend(corpus["texts"].as_array().unwrap().iter().map(|t| serde_json::json!({"text": t["text"]}).to_string()));
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, lines.join("\n")).unwrap();
    let score = |model: &Path| {
        let out = arbiter(&["score", "--model", s(model), "--input", s(&input)]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let (ours, theirs) = (score(&rust), score(&script));
    assert_eq!(ours.lines().count(), lines.len());
    assert!(ours.lines().all(|l| serde_json::from_str::<Value>(l).unwrap()["tokens"].as_u64().unwrap() > 0), "{ours}");
    assert_eq!(ours, theirs);
}
