//! `arbiter convert` on a small model in exactly the released layout (tests/fixtures/released,
//! made by tests/fixtures/make_released.py from the golden fixture nemotron-released): the
//! converted folder reproduces HF transformers' outputs, and every malformed checkpoint is refused
//! with an error naming the tensor or file.

use std::path::{Path, PathBuf};

use arbiter_convert::{
    convert, tokenizer, ConvertOptions, ConvertReport, TokenizerOutcome, TokenizerSource, Verification,
};
use arbiter_engine::cpu::CpuBackend;
use arbiter_engine::weights::WeightStore;
use arbiter_engine::{Model, PackedBatch};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn released() -> PathBuf {
    fixtures().join("released/nemotron-tiny")
}

fn options(input: &Path, output: &Path) -> ConvertOptions {
    ConvertOptions {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        tokenizer_model: None,
        tokenizer: TokenizerSource::Dir(released().join("tokenizer")),
        max_shard_bytes: arbiter_convert::writer::DEFAULT_MAX_SHARD_BYTES,
        progress: false,
        fp8: false,
    }
}

fn run(input: &Path, output: &Path) -> arbiter_convert::Result<ConvertReport> {
    convert(&options(input, output))
}

struct Golden {
    sequences: Vec<Vec<u32>>,
    outputs: Vec<Vec<f32>>,
}

fn golden() -> Golden {
    let text = std::fs::read_to_string(fixtures().join("golden/nemotron-released/expected.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let list = |k: &str| -> Vec<Vec<f64>> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
            .collect()
    };
    Golden {
        sequences: list("sequences").into_iter().map(|s| s.into_iter().map(|x| x as u32).collect()).collect(),
        outputs: list("outputs").into_iter().map(|s| s.into_iter().map(|x| x as f32).collect()).collect(),
    }
}

/// max|got - ref| / max(max|ref|, 1e-3), DESIGN.md's error of a result.
fn rel_error(got: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(got.len(), reference.len());
    let scale = reference.iter().map(|r| r.abs() as f64).fold(1e-3, f64::max);
    got.iter().zip(reference).map(|(g, r)| (*g as f64 - *r as f64).abs()).fold(0.0, f64::max) / scale
}

fn outputs(dir: &Path) -> Vec<Vec<f32>> {
    // The converted head keeps its bias (parity with the reference outputs covers its values).
    assert!(arbiter_engine::weights::WeightStore::open(dir).unwrap().contains("score.bias"));
    let model = Model::load(dir, CpuBackend::new()).unwrap();
    golden()
        .sequences
        .iter()
        .map(|s| model.forward(&PackedBatch::from_sequences(&[s]).unwrap()).unwrap().remove(0))
        .collect()
}

#[test]
fn the_converted_model_reproduces_transformers() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("model");
    let report = run(&released(), &dir).unwrap();
    assert_eq!((report.shards, report.tokenizer), (1, TokenizerOutcome::Verified(29)));
    // Every tensor is bit for bit the one transformers saved (the head exactly widened to fp32):
    // q/k/v unfused per group, TP chunks joined, layers unstacked.
    let ours = WeightStore::open(&dir).unwrap();
    let theirs = WeightStore::open(&fixtures().join("golden/nemotron-released")).unwrap();
    assert_eq!(ours.names(), theirs.names());
    for name in theirs.names() {
        let (a, b) = (ours.get(name).unwrap(), theirs.get(name).unwrap());
        assert_eq!(a.shape, b.shape, "{name}");
        assert_eq!(a.to_f32(), b.to_f32(), "{name}");
    }
    assert_eq!(ours.get("score.weight").unwrap().dtype, arbiter_engine::weights::Dtype::F32);
    let g = golden();
    for (s, (got, reference)) in outputs(&dir).iter().zip(&g.outputs).enumerate() {
        let err = rel_error(got, reference);
        assert!(err <= 1e-4, "sequence {s}: error {err:.3e}\n got {got:?}\n ref {reference:?}");
    }
    // The head's names, exposure and default reward of Nemotron-4-340B-Reward.
    let spec = arbiter_engine::config::load_config(&dir.join("config.json")).unwrap();
    assert_eq!(spec.head.labels.len(), 9);
    let exposed: Vec<&str> = spec.head.exposed.iter().map(|&i| spec.head.labels[i].as_str()).collect();
    assert_eq!(exposed, ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]);
    assert_eq!(spec.head.reward_weights, [0.3, 0.74, 0.46, 0.47, -0.33]);
    assert_eq!((spec.heads, spec.kv_heads, spec.head_dim, spec.hidden, spec.vocab), (8, 4, 16, 64, 512));
    assert_eq!(spec.chat_template.as_deref(), Some("nemotron-reward"));
}

#[test]
fn small_shards_get_an_index_and_load_the_same() {
    let out = tempfile::tempdir().unwrap();
    let (one, many) = (out.path().join("one"), out.path().join("many"));
    run(&released(), &one).unwrap();
    let mut opts = options(&released(), &many);
    opts.max_shard_bytes = 40_000;
    let report = convert(&opts).unwrap();
    assert!(report.shards > 5, "{} shards", report.shards);
    assert!(many.join("model.safetensors.index.json").exists() && !many.join("model.safetensors").exists());
    for entry in std::fs::read_dir(&many).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            // Data at most the limit, unless one tensor is bigger (the 65 536-byte embedding): then alone.
            let bytes = std::fs::read(&p).unwrap();
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
            let tensors = header.as_object().unwrap().keys().filter(|k| *k != "__metadata__").count();
            let data = bytes.len() - 8 - n;
            assert!(data <= 40_000 || tensors == 1, "{}: {data} bytes in {tensors} tensors", p.display());
        }
    }
    assert_eq!(outputs(&one), outputs(&many));
}

#[test]
fn converting_to_fp8_equals_quantizing_the_converted_folder() {
    // Two routes to the same bytes: the zarr rows (q/k/v unfused on the fly) quantized as they
    // stream, and `arbiter quantize` over the bf16 folder.
    let out = tempfile::tempdir().unwrap();
    let (bf16, direct, two_step) = (out.path().join("bf16"), out.path().join("direct"), out.path().join("two"));
    run(&released(), &bf16).unwrap();
    let mut opts = options(&released(), &direct);
    opts.fp8 = true;
    let report = convert(&opts).unwrap();
    arbiter_convert::quantize::quantize(&arbiter_convert::quantize::QuantizeOptions {
        input: bf16.clone(),
        output: two_step.clone(),
        max_shard_bytes: u64::MAX,
        progress: false,
    })
    .unwrap();
    let (a, b) = (WeightStore::open(&direct).unwrap(), WeightStore::open(&two_step).unwrap());
    assert_eq!(a.names(), b.names());
    assert_eq!(report.tensors, a.names().len());
    for name in a.names() {
        let (x, y) = (a.get(name).unwrap(), b.get(name).unwrap());
        assert_eq!((x.dtype, x.shape, x.bytes), (y.dtype, y.shape, y.bytes), "{name}");
    }
    assert_eq!(a.get("model.layers.0.self_attn.k_proj.weight").unwrap().dtype, arbiter_engine::weights::Dtype::F8E4M3);
    let config = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap()
    };
    assert_eq!(config(&direct), config(&two_step));
    // And it scores like the golden outputs, within FP8's error (convert/tests/quantize.rs).
    let g = golden();
    let worst = outputs(&direct).iter().zip(&g.outputs).map(|(o, r)| rel_error(o, r)).fold(0.0, f64::max);
    assert!(worst > 1e-3 && worst < 0.25, "FP8 error {worst:.3e}");
}

/// A writable copy of the fixture.
fn copy_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&released(), &dir.path().join("in"));
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Breaks a copy of the fixture with `edit` and returns the conversion's error message.
fn refused(edit: impl FnOnce(&Path)) -> String {
    let dir = copy_fixture();
    let input = dir.path().join("in");
    edit(&input);
    let out = dir.path().join("out");
    let e = run(&input, &out).expect_err("a broken checkpoint must be refused").to_string();
    assert!(!out.join("config.json").exists(), "nothing that looks converted is left behind: {e}");
    e
}

const W: &str = "model_weights";
const FC1: &str = "model.decoder.layers.mlp.linear_fc1.weight";
const FC2: &str = "model.decoder.layers.mlp.linear_fc2.weight";

#[test]
fn an_unknown_tensor_is_refused_by_name() {
    let e = refused(|i| {
        let d = i.join(W).join("model.decoder.layers.mlp.router.weight");
        std::fs::create_dir(&d).unwrap();
        std::fs::copy(i.join(W).join(FC1).join(".zarray"), d.join(".zarray")).unwrap();
    });
    assert!(e.contains("unknown tensor \"model.decoder.layers.mlp.router.weight\""), "{e}");
}

#[test]
fn a_shape_that_disagrees_with_model_config_is_refused() {
    let e = refused(|i| {
        let p = i.join("model_config.yaml");
        let text = std::fs::read_to_string(&p).unwrap().replace("ffn_hidden_size: 128", "ffn_hidden_size: 256");
        std::fs::write(p, text).unwrap();
    });
    assert!(
        e.contains(FC1) && e.contains("[4, 128, 64]") && e.contains("[4, 256, 64]") && e.contains("ffn_hidden_size"),
        "{e}"
    );
    let e = refused(|i| {
        let p = i.join("model_config.yaml");
        let text = std::fs::read_to_string(&p).unwrap().replace("num_query_groups: 4", "num_query_groups: 2");
        std::fs::write(p, text).unwrap();
    });
    assert!(
        e.contains("model.decoder.layers.self_attention.linear_qkv.weight") && e.contains("num_query_groups"),
        "{e}"
    );
}

#[test]
fn a_missing_chunk_is_refused_naming_the_file() {
    let e = refused(|i| std::fs::remove_file(i.join(W).join(FC2).join("3.0.1")).unwrap());
    assert!(e.contains(FC2) && e.contains("missing chunk file") && e.contains(&format!("{FC2}/3.0.1")), "{e}");
}

#[test]
fn a_chunk_of_the_wrong_size_is_refused_naming_the_file() {
    let e = refused(|i| {
        let p = i.join(W).join(FC1).join("2.1.0");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 2]).unwrap();
    });
    assert!(e.contains(&format!("{FC1}/2.1.0 is 8190 bytes")) && e.contains("are 8192 bytes"), "{e}");
}

#[test]
fn a_compressed_array_is_refused_naming_the_tensor() {
    let e = refused(|i| {
        let p = i.join(W).join("model.rm_head.weight/.zarray");
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("\"compressor\": null", "\"compressor\": {\"id\": \"zstd\", \"level\": 3}");
        std::fs::write(p, text).unwrap();
    });
    assert!(
        e.contains("\"model.rm_head.weight\"")
            && e.contains("compressor {\"id\":\"zstd\",\"level\":3} is not supported"),
        "{e}"
    );
}

#[test]
fn missing_files_are_refused_by_name() {
    let e = refused(|i| std::fs::remove_file(i.join("model_config.yaml")).unwrap());
    assert!(e.contains("missing") && e.contains("model_config.yaml"), "{e}");
    let e = refused(|i| std::fs::remove_file(i.join(W).join("metadata.json")).unwrap());
    assert!(e.contains("missing") && e.contains("metadata.json"), "{e}");
    let e = refused(|i| std::fs::remove_dir_all(i.join(W).join("model.decoder.final_layernorm.bias")).unwrap());
    assert!(e.contains("missing tensor \"model.decoder.final_layernorm.bias\""), "{e}");
    let e =
        refused(|i| std::fs::remove_file(i.join(W).join("model.embedding.word_embeddings.weight/.zarray")).unwrap());
    assert!(e.contains("model.embedding.word_embeddings.weight/.zarray"), "{e}");
    let e = refused(|i| std::fs::remove_file(i.join("tiny_nemotron.model")).unwrap());
    assert!(e.contains("missing") && e.contains("tiny_nemotron.model"), "{e}");
    let e = refused(|i| std::fs::remove_dir_all(i.join(W)).unwrap());
    assert!(e.contains("missing") && e.contains("model_weights"), "{e}");
}

#[test]
fn an_altered_tokenizer_fails_the_fidelity_check() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok");
    copy_dir(&released().join("tokenizer"), &tok);
    // The classic conversion mistake: the dummy prefix dropped from the normalizer.
    let path = tok.join("tokenizer.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let steps = json["normalizer"]["normalizers"].as_array_mut().unwrap();
    let before = steps.len();
    steps.retain(|s| s["type"] != "Prepend");
    assert_eq!(steps.len(), before - 1);
    std::fs::write(&path, json.to_string()).unwrap();
    let out = dir.path().join("out");
    let mut opts = options(&released(), &out);
    opts.tokenizer = TokenizerSource::Dir(tok.clone());
    let e = convert(&opts).unwrap_err().to_string();
    assert!(e.starts_with("tokenizer fidelity check failed on \"one turn, default system\""), "{e}");
    assert!(e.contains("first difference at token 0") && e.contains("\"<extra_id_0>System\\nA chat"), "{e}");
    assert!(!out.join("config.json").exists() && !out.join("tokenizer.json").exists());

    // A vocabulary entry renumbered: caught on the text that uses it.
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(released().join("tokenizer/tokenizer.json")).unwrap()).unwrap();
    let vocab = json["model"]["vocab"].as_object_mut().unwrap();
    let (a, b) = (vocab["▁the"].clone(), vocab["▁a"].clone());
    vocab.insert("▁the".into(), b);
    vocab.insert("▁a".into(), a);
    std::fs::write(&path, json.to_string()).unwrap();
    let out = dir.path().join("out2");
    let mut opts = options(&released(), &out);
    opts.tokenizer = TokenizerSource::Dir(tok);
    let e = convert(&opts).unwrap_err().to_string();
    assert!(e.contains("tokenizer fidelity check failed on") && e.contains("first difference at token"), "{e}");
}

#[test]
fn a_reference_made_from_another_model_is_refused() {
    let e = refused(|i| {
        let p = i.join("tiny_nemotron.model");
        let mut bytes = std::fs::read(&p).unwrap();
        // Field 200 (SentencePiece's extension range), varint 1: still a valid model, another sha256.
        bytes.extend([0xc0, 0x0c, 0x01]);
        std::fs::write(&p, bytes).unwrap();
    });
    assert!(e.contains("was made from a SentencePiece model with sha256"), "{e}");
}

#[test]
fn the_output_folder_must_be_new_or_empty() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keep.txt"), "x").unwrap();
    let e = run(&released(), dir.path()).unwrap_err().to_string();
    assert!(e.contains("not empty"), "{e}");
    assert!(std::fs::read_to_string(dir.path().join("keep.txt")).unwrap() == "x");
}

#[test]
fn the_tokenizer_built_in_rust_encodes_like_sentencepiece() {
    // The tokenizer step without the script: tokenizer.json from the .model file, in Rust. Whether
    // it was verified depends on this machine's python3; the check against the committed
    // reference (SentencePiece's own ids, written by scripts/spm_to_tokenizer_json.py) does not.
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("model");
    let mut opts = options(&released(), &dir);
    opts.tokenizer = TokenizerSource::Build(Verification::IfAvailable);
    let report = convert(&opts).unwrap();
    assert!(
        matches!(report.tokenizer, TokenizerOutcome::Verified(29) | TokenizerOutcome::NotVerified(_)),
        "{:?}",
        report.tokenizer
    );
    let model = released().join("tiny_nemotron.model");
    let reference = tokenizer::load_reference(&released().join("tokenizer"), &model).unwrap();
    assert_eq!(tokenizer::check_fidelity(&dir, &reference).unwrap(), 29);
    // And it is the very file the Python converter writes.
    let read =
        |p: PathBuf| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    assert_eq!(read(dir.join("tokenizer.json")), read(released().join("tokenizer/tokenizer.json")));
}

#[test]
fn an_interpreter_that_cannot_run_sentencepiece_refuses_the_conversion() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("model");
    let mut opts = options(&released(), &dir);
    opts.tokenizer = TokenizerSource::Build(Verification::Python(out.path().join("no-such-python")));
    let e = convert(&opts).unwrap_err().to_string();
    assert!(e.contains("no-such-python") && e.contains("pip install sentencepiece"), "{e}");
    assert!(!dir.join("config.json").exists() && !dir.join("tokenizer.json").exists());
}
