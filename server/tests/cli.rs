//! `arbiter score`, `arbiter demo-model`, `arbiter quantize` and the memory plan of `arbiter serve`, end to end, as a user runs them.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{json, Value};

fn arbiter(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .args(args)
        .env("XDG_CACHE_HOME", cache)
        .env_remove("ARBITER_MODEL")
        .output()
        .expect("the arbiter binary runs")
}

fn lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("JSON result line")).collect()
}

fn conversation() -> Value {
    json!([{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}])
}

#[test]
fn mixed_inputs_with_a_bad_line_on_the_demo_model() {
    let tmp = tempfile::tempdir().unwrap();
    let sys = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";
    let templated =
        format!("<extra_id_0>System\n{sys}\n<extra_id_1>User\nWhat is 2+2?\n<extra_id_1>Assistant\n4\n<extra_id_2>");
    let input = [
        json!({"id": "a", "messages": conversation()}).to_string(),
        json!({"id": "b", "text": templated}).to_string(),
        r#"{"id": "c", "messages": [{"role": "user", "content": "no answer"}]}"#.to_string(),
        "this is not json".to_string(),
        String::new(),
        json!({"id": "e", "token_ids": [5, 100, 200, 6]}).to_string(),
        json!({"id": "f", "messages": conversation(), "reward_weights": {"verbosity": 1.0}}).to_string(),
    ]
    .join("\n");
    let path = tmp.path().join("in.jsonl");
    std::fs::write(&path, input).unwrap();
    let out = arbiter(&["score", "--demo", "--input", path.to_str().unwrap()], tmp.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "some lines failed: {stderr}");
    assert!(stderr.contains("meaningless"), "the demo is labelled: {stderr}");
    assert!(stderr.contains("4 lines scored, 2 failed"), "{stderr}");
    let r = lines(&out);
    assert_eq!(r.iter().map(|v| v["line"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3, 4, 6, 7]);
    // Good lines: five named attributes, a reward, the demo label.
    for v in [&r[0], &r[1], &r[4], &r[5]] {
        let attrs = v["attributes"].as_object().unwrap();
        assert_eq!(
            attrs.keys().collect::<Vec<_>>(),
            ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
        );
        assert!(v["reward"].as_f64().unwrap().is_finite());
        assert_eq!(v["warning"], json!("demo model with random weights: its scores are meaningless"));
        assert_eq!(v["truncated"], json!(false));
    }
    // The conversation and its templated text are the same tokens, so the same bits.
    assert_eq!(r[0]["id"], json!("a"));
    assert_eq!(r[0]["attributes"], r[1]["attributes"]);
    assert_eq!(r[0]["reward"], r[1]["reward"]);
    assert_eq!(r[0]["tokens"], r[1]["tokens"]);
    // Bad lines name their line and problem.
    assert_eq!(r[2]["id"], json!("c"));
    assert!(r[2]["error"].as_str().unwrap().starts_with("line 3: "));
    assert!(r[2]["error"].as_str().unwrap().contains("must end with the assistant response"));
    assert!(r[3]["error"].as_str().unwrap().contains("line 4: not valid JSON"));
    assert_eq!(r[4]["tokens"], json!(4));
    // Weight override: same attributes, reward recomputed with verbosity weight 1.
    assert_eq!(r[5]["attributes"], r[0]["attributes"]);
    let a = r[0]["attributes"].as_object().unwrap();
    let w = [0.3, 0.74, 0.46, 0.47, 1.0];
    let expect: f64 = a.values().zip(w).map(|(v, w)| v.as_f64().unwrap() * w).sum();
    assert!((r[5]["reward"].as_f64().unwrap() - expect).abs() < 1e-5);
}

#[test]
fn per_turn_lines_get_a_result_per_assistant_turn_equal_to_the_stopped_conversations() {
    let tmp = tempfile::tempdir().unwrap();
    let conv = json!([
        {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Blue, like the sky."},
        {"role": "user", "content": "And a third?"}, {"role": "assistant", "content": "Green."},
    ]);
    let m = conv.as_array().unwrap();
    let input = [
        json!({"id": "whole", "messages": conv, "per_turn": true}).to_string(),
        json!({"messages": m[..2]}).to_string(),
        json!({"messages": m[..4]}).to_string(),
        json!({"messages": conv}).to_string(),
        json!({"text": "hello", "per_turn": true}).to_string(),
    ]
    .join("\n");
    let path = tmp.path().join("in.jsonl");
    std::fs::write(&path, input).unwrap();
    let out = arbiter(&["score", "--demo", "--input", path.to_str().unwrap()], tmp.path());
    let r = lines(&out);
    let turns = r[0]["turns"].as_array().unwrap();
    assert_eq!(turns.iter().map(|t| t["message"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 3, 5]);
    for (t, alone) in turns.iter().zip(&r[1..4]) {
        assert_eq!(
            (&t["reward"], &t["attributes"], &t["tokens"]),
            (&alone["reward"], &alone["attributes"], &alone["tokens"])
        );
        assert_eq!((&t["scored"], &t["on_spine"]), (&json!(true), &json!(true)));
    }
    assert!(r[1].get("turns").is_none(), "only per-turn lines have turns");
    assert!(
        r[4]["error"].as_str().unwrap().contains("line 5: per_turn scores the turns of a conversation"),
        "{}",
        r[4]
    );
    // --per-turn asks it for every line.
    std::fs::write(&path, json!({"messages": conv}).to_string()).unwrap();
    let all = lines(&arbiter(&["score", "--demo", "--per-turn", "--input", path.to_str().unwrap()], tmp.path()));
    assert_eq!(all[0]["turns"], r[0]["turns"]);
}

#[test]
fn scores_do_not_depend_on_what_else_is_in_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let one = tmp.path().join("one.jsonl");
    std::fs::write(&one, json!({"messages": conversation()}).to_string()).unwrap();
    let many = tmp.path().join("many.jsonl");
    let mut text = String::new();
    for i in 0..20 {
        let c = json!([{"role": "user", "content": format!("question {i} ").repeat(i + 1)}, {"role": "assistant", "content": "answer"}]);
        text.push_str(&json!({"messages": c}).to_string());
        text.push('\n');
    }
    text.push_str(&json!({"messages": conversation()}).to_string());
    std::fs::write(&many, text).unwrap();
    let a = lines(&arbiter(&["score", "--demo", "--input", one.to_str().unwrap()], tmp.path()));
    let out = arbiter(&["score", "--demo", "--batch-tokens", "300", "--input", many.to_str().unwrap()], tmp.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b = lines(&out);
    assert_eq!(b.len(), 21);
    assert_eq!(a[0]["attributes"], b[20]["attributes"]);
    assert_eq!(a[0]["reward"], b[20]["reward"]);
}

#[test]
fn demo_model_command_writes_a_loadable_folder_and_output_goes_to_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let out = arbiter(&["demo-model", "--out", dir.to_str().unwrap()], tmp.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(dir.join(f).exists(), "{f}");
    }
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, json!({"messages": conversation()}).to_string()).unwrap();
    let result = tmp.path().join("out.jsonl");
    let out = arbiter(
        &[
            "score",
            "--model",
            dir.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            result.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty());
    let v: Value = serde_json::from_str(std::fs::read_to_string(&result).unwrap().trim()).unwrap();
    // Same model bytes as --demo: same score.
    let demo = lines(&arbiter(&["score", "--demo", "--input", input.to_str().unwrap()], tmp.path()));
    assert_eq!(v["reward"], demo[0]["reward"]);
}

#[test]
fn bad_flags_and_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = arbiter(&["score", "--model", "/no/such/model", "--input", "x.jsonl"], tmp.path());
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("/no/such/model") && e.contains("does not exist"), "{e}");
    let out = arbiter(&["score", "--demo", "--input", "/no/such/input.jsonl"], tmp.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("opening /no/such/input.jsonl"));
    let out = arbiter(&["score", "--demo", "--truncation", "sometimes", "--input", "x"], tmp.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown truncation policy \"sometimes\""));
}

#[test]
fn device_flag_is_checked_and_cuda_without_the_feature_says_how_to_get_it() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("in.jsonl");
    std::fs::write(&path, json!({"token_ids": [5, 6, 7]}).to_string()).unwrap();
    let input = path.to_str().unwrap();
    let out = arbiter(&["score", "--demo", "--device", "tpu", "--input", input], tmp.path());
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--device") && e.contains("expected cpu, cuda or cuda:N"), "{e}");

    let out = arbiter(&["score", "--demo", "--device", "cuda:1", "--input", input], tmp.path());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!e.contains("panicked"), "{e}");
    if cfg!(feature = "cuda") {
        // With CUDA compiled in, this machine either has GPU 1 or says what is missing.
        assert!(out.status.success() || (out.status.code() == Some(2) && e.contains("cuda")), "{e}");
    } else {
        assert_eq!(out.status.code(), Some(2), "{e}");
        assert!(e.contains("device cuda:1") && e.contains("rebuild with --features cuda"), "{e}");
    }
}

#[test]
fn tensor_and_pipeline_parallel_scoring_matches_the_unsplit_model() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    let mut text = String::new();
    for i in 0..6 {
        let c = json!([{"role": "user", "content": format!("question {i} ").repeat(3 * i + 1)}, {"role": "assistant", "content": "an answer"}]);
        text.push_str(&json!({"messages": c}).to_string());
        text.push('\n');
    }
    std::fs::write(&input, text).unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["score", "--demo", "--input", input.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = arbiter(&args, tmp.path());
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        lines(&out)
    };
    let unsplit = run(&[]);
    for layout in [&["--tp", "2"][..], &["--pp", "2"], &["--tp", "2", "--pp", "2"]] {
        let split = run(layout);
        assert_eq!(split.len(), unsplit.len());
        for (a, b) in unsplit.iter().zip(&split) {
            let (ra, rb) = (a["reward"].as_f64().unwrap(), b["reward"].as_f64().unwrap());
            assert!((ra - rb).abs() <= 1e-4 * ra.abs().max(1e-3), "{layout:?}: reward {rb} vs unsplit {ra}");
        }
    }
    // The demo model has 8 heads and 4 layers.
    let out = arbiter(&["score", "--demo", "--tp", "3", "--input", input.to_str().unwrap()], tmp.path());
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--tp 3 does not divide the 8 attention heads"), "{e}");
    let out = arbiter(&["score", "--demo", "--pp", "0", "--input", input.to_str().unwrap()], tmp.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pp"), "{}", String::from_utf8_lossy(&out.stderr));
}

// ---- arbiter quantize and the memory plan of arbiter serve ----

fn reward(model: &Path, input: &Path, cache: &Path) -> f64 {
    let out = arbiter(&["score", "--model", model.to_str().unwrap(), "--input", input.to_str().unwrap()], cache);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    v["reward"].as_f64().unwrap()
}

#[test]
fn quantize_writes_an_fp8_folder_that_scores_close_to_the_original() {
    let tmp = tempfile::tempdir().unwrap();
    let (dense, fp8) = (tmp.path().join("demo"), tmp.path().join("demo-fp8"));
    assert!(arbiter(&["demo-model", "--out", dense.to_str().unwrap()], tmp.path()).status.success());
    let out = arbiter(&["quantize", "--input", dense.to_str().unwrap(), "--output", fp8.to_str().unwrap()], tmp.path());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && e.contains("matrices in FP8"), "{e}");
    assert!(fp8.join("tokenizer.json").exists(), "the tokenizer comes along");
    let input = tmp.path().join("in.jsonl");
    let messages = json!([{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]);
    std::fs::write(&input, json!({ "messages": messages }).to_string()).unwrap();
    let (a, b) = (reward(&dense, &input, tmp.path()), reward(&fp8, &input, tmp.path()));
    assert!(a != b && (a - b).abs() <= 0.25 * a.abs().max(1.0), "unquantized {a}, FP8 {b}");
    // Quantizing twice is refused.
    let out = arbiter(&["quantize", "--input", fp8.to_str().unwrap(), "--output", "/tmp/never"], tmp.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already quantized"));
}

#[test]
fn serve_refuses_a_memory_plan_that_does_not_fit_before_loading() {
    let tmp = tempfile::tempdir().unwrap();
    // 10^11 tokens per batch: terabytes of activations on any machine.
    let out = arbiter(
        &[
            "serve",
            "--demo",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "none",
            "--max-batch-tokens",
            "100000000000",
        ],
        tmp.path(),
    );
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(
        e.contains("available host memory") && e.contains("--max-batch-tokens") && e.contains("stage 0 rank 0"),
        "{e}"
    );
    assert!(!e.contains("model loaded"), "refused before loading: {e}");
}
