//! Every way a model folder can be wrong gets an error that names the problem; nothing panics.
//! Also: sharded folders load and give the same outputs as single-file ones.

mod common;
#[path = "common/shards.rs"]
mod shards;

use std::collections::BTreeMap;
use std::path::Path;

use arbiter_engine::cpu::CpuBackend;
use arbiter_engine::synth::write_random_model;
use arbiter_engine::weights::Dtype;
use arbiter_engine::{EngineError, Model, PackedBatch};
use serde_json::json;

fn config() -> serde_json::Value {
    json!({
        "architectures": ["NemotronForSequenceClassification"],
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 8,
        "vocab_size": 64, "max_position_embeddings": 128,
        "hidden_act": "relu2", "norm_eps": 1e-5, "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "id2label": {"0": "reward"}
    })
}

fn good_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &config(), Dtype::BF16, 5, true).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir, CpuBackend::with_threads(1).unwrap()) {
        Ok(_) => panic!("{} loaded but should not have", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites model.safetensors after `edit` changes its tensors (name -> (dtype, shape, bytes)).
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut map: BTreeMap<_, _> =
        st.tensors().into_iter().map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect();
    edit(&mut map);
    let views: Vec<_> = map
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
}

#[test]
fn the_good_folder_loads() {
    let dir = good_folder();
    let m = Model::load(dir.path(), CpuBackend::with_threads(1).unwrap()).unwrap();
    assert_eq!(m.spec().layers, 2);
}

#[test]
fn missing_folder() {
    let e = load_err(Path::new("/nonexistent/arbiter-model"));
    assert!(e.contains("/nonexistent/arbiter-model") && e.contains("does not exist"), "{e}");
}

#[test]
fn missing_config() {
    let dir = good_folder();
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("missing file") && e.contains("config.json"), "{e}");
}

#[test]
fn config_that_is_not_json() {
    let dir = good_folder();
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("config.json") && e.contains("not valid JSON"), "{e}");
}

#[test]
fn missing_weights_file() {
    let dir = good_folder();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("missing file") && e.contains("model.safetensors"), "{e}");
}

#[test]
fn index_names_a_missing_shard() {
    let dir = good_folder();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        json!({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}).to_string(),
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model-00002-of-00002.safetensors") && e.contains("missing file"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = good_folder();
    edit_weights(dir.path(), |m| {
        m.remove("model.layers.1.mlp.down_proj.weight");
    });
    let e = load_err(dir.path());
    assert!(e.contains("missing tensor \"model.layers.1.mlp.down_proj.weight\""), "{e}");
}

#[test]
fn wrong_shape_says_expected_and_found() {
    let dir = good_folder();
    edit_weights(dir.path(), |m| {
        let t = m.get_mut("model.layers.0.self_attn.k_proj.weight").unwrap();
        t.1 = vec![16, 64]; // same number of bytes as [32, 32]
    });
    let e = load_err(dir.path());
    assert!(
        e.contains("model.layers.0.self_attn.k_proj.weight") && e.contains("[16, 64]") && e.contains("[32, 32]"),
        "{e}"
    );
}

#[test]
fn unsupported_architecture() {
    let dir = good_folder();
    edit_config(dir.path(), |c| c["architectures"] = json!(["GPT2LMHeadModel"]));
    let e = load_err(dir.path());
    assert!(e.contains("unsupported architecture \"GPT2LMHeadModel\""), "{e}");
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = good_folder();
    edit_weights(dir.path(), |m| {
        let t = m.get_mut("model.norm.weight").unwrap();
        t.0 = safetensors::Dtype::I16;
    });
    let e = load_err(dir.path());
    assert!(e.contains("model.norm.weight") && e.contains("unsupported dtype I16"), "{e}");
}

/// A random Qwen2 or Qwen3 folder (`arch`), to break one family-specific thing in.
fn qwen_folder(arch: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let config = json!({
        "architectures": [arch], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 64,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "use_sliding_window": false,
        "layer_types": ["full_attention", "full_attention"]
    });
    write_random_model(dir.path(), &config, Dtype::BF16, 5, true).unwrap();
    dir
}

#[test]
fn qwen_folders_load_and_their_unsupported_options_are_named() {
    for arch in ["Qwen2ForSequenceClassification", "Qwen3ForSequenceClassification"] {
        let dir = qwen_folder(arch);
        Model::load(dir.path(), CpuBackend::with_threads(1).unwrap()).unwrap_or_else(|e| panic!("{arch}: {e}"));
        edit_config(dir.path(), |c| c["use_sliding_window"] = json!(true));
        let e = load_err(dir.path());
        assert!(e.contains("use_sliding_window = true is not supported"), "{arch}: {e}");
        edit_config(dir.path(), |c| {
            c["use_sliding_window"] = json!(false);
            c["layer_types"] = json!(["full_attention", "sliding_attention"]);
        });
        let e = load_err(dir.path());
        assert!(e.contains("layer_types[1] = \"sliding_attention\""), "{arch}: {e}");
        edit_config(dir.path(), |c| {
            c["layer_types"] = json!(null);
            c["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        });
        let e = load_err(dir.path());
        assert!(e.contains("unsupported rope type \"yarn\""), "{arch}: {e}");
    }
    // Qwen3 with biases on all four attention projections is not a model arbiter computes.
    let dir = qwen_folder("Qwen3ForSequenceClassification");
    edit_config(dir.path(), |c| c["attention_bias"] = json!(true));
    assert!(load_err(dir.path()).contains("attention_bias = true is not supported"));
}

#[test]
fn gemma2_folders_load_and_their_unsupported_options_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = json!({
        "architectures": ["Gemma2ForSequenceClassification"], "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 64, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": 16, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]
    });
    write_random_model(dir.path(), &config, Dtype::BF16, 5, false).unwrap();
    Model::load(dir.path(), CpuBackend::with_threads(1).unwrap()).unwrap();
    edit_config(dir.path(), |c| c["hidden_activation"] = json!("gelu"));
    let e = load_err(dir.path());
    assert!(e.contains("hidden_activation \"gelu\" is not supported") && e.contains("gelu_pytorch_tanh"), "{e}");
    edit_config(dir.path(), |c| {
        c["hidden_activation"] = json!("gelu_pytorch_tanh");
        c["attn_logit_softcapping"] = json!(-1.0);
    });
    assert!(load_err(dir.path()).contains("\"attn_logit_softcapping\" must be positive"));
    edit_config(dir.path(), |c| {
        c["attn_logit_softcapping"] = json!(50.0);
        c["layer_types"] = json!(["sliding_attention", "chunked_attention"]);
    });
    assert!(load_err(dir.path()).contains("layer_types[1] = \"chunked_attention\""));
    edit_config(dir.path(), |c| c["layer_types"] = json!(["full_attention"]));
    assert!(load_err(dir.path()).contains("layer_types has 1 entries for 2 layers"));
    // The branch norms are part of the architecture.
    edit_config(dir.path(), |c| c["layer_types"] = json!(null));
    edit_weights(dir.path(), |t| {
        t.remove("model.layers.1.post_feedforward_layernorm.weight");
    });
    assert!(load_err(dir.path()).contains("missing tensor \"model.layers.1.post_feedforward_layernorm.weight\""));
}

#[test]
fn family_tensors_that_are_missing_or_extra_are_named() {
    let dir = qwen_folder("Qwen2ForSequenceClassification");
    edit_weights(dir.path(), |t| {
        t.remove("model.layers.1.self_attn.k_proj.bias");
    });
    let e = load_err(dir.path());
    assert!(e.contains("missing tensor \"model.layers.1.self_attn.k_proj.bias\""), "{e}");

    let dir = qwen_folder("Qwen3ForSequenceClassification");
    edit_weights(dir.path(), |t| {
        let (d, _, b) = t.remove("model.layers.0.self_attn.q_norm.weight").unwrap();
        t.insert("model.layers.0.self_attn.q_norm.weight".into(), (d, vec![8], b[..16].to_vec()));
    });
    let e = load_err(dir.path());
    assert!(e.contains("q_norm.weight") && e.contains("expected [16]"), "{e}");

    // A head of another layout: a Linear head with an extra score.2 tensor.
    let dir = good_folder();
    edit_weights(dir.path(), |t| {
        let head = t["score.weight"].clone();
        t.insert("score.2.weight".into(), head);
    });
    let e = load_err(dir.path());
    assert!(
        e.contains("tensor \"score.2.weight\" is not part of the NemotronForSequenceClassification reward head")
            && e.contains("score.weight (and optionally score.bias)"),
        "{e}"
    );
    // The two-layer head needs both of its matrices.
    let dir = tempfile::tempdir().unwrap();
    let mut c = config();
    c["architectures"] = json!(["INFORMForSequenceClassification"]);
    c["hidden_act"] = json!("silu");
    write_random_model(dir.path(), &c, Dtype::BF16, 5, false).unwrap();
    Model::load(dir.path(), CpuBackend::with_threads(1).unwrap()).unwrap();
    edit_weights(dir.path(), |t| {
        t.remove("score.0.weight");
    });
    assert!(load_err(dir.path()).contains("missing tensor \"score.0.weight\""));
}

#[test]
fn unsupported_rope_type() {
    let dir = good_folder();
    edit_config(dir.path(), |c| c["rope_scaling"] = json!({"rope_type": "dynamic", "factor": 2.0}));
    let e = load_err(dir.path());
    assert!(e.contains("unsupported rope type \"dynamic\""), "{e}");
}

#[test]
fn truncated_weights_file() {
    let dir = good_folder();
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 100).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
    // Cut inside the header too.
    f.set_len(20).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn tokens_outside_the_vocabulary_and_overlong_sequences_are_refused() {
    let dir = good_folder();
    let m = Model::load(dir.path(), CpuBackend::with_threads(1).unwrap()).unwrap();
    let e = m.forward(&PackedBatch::from_sequences(&[vec![1, 2], vec![3, 64]]).unwrap()).unwrap_err();
    assert!(matches!(e, EngineError::InvalidBatch(_)));
    assert!(e.to_string().contains("sequence 1, token 1: id 64 is outside the vocabulary of 64"), "{e}");
    let e = m.forward(&PackedBatch::from_sequences(&[vec![1u32; 129]]).unwrap()).unwrap_err();
    assert!(e.to_string().contains("129 tokens") && e.to_string().contains("at most 128"), "{e}");
}

#[test]
fn sharded_folder_gives_the_same_outputs_as_one_file() {
    let dir = good_folder();
    let seqs = [vec![5u32, 9, 13, 2], vec![7]];
    let one = Model::load(dir.path(), CpuBackend::with_threads(1).unwrap())
        .unwrap()
        .forward(&PackedBatch::from_sequences(&seqs).unwrap())
        .unwrap();
    shards::split_into_two_shards(dir.path());
    let sharded = Model::load(dir.path(), CpuBackend::with_threads(1).unwrap())
        .unwrap()
        .forward(&PackedBatch::from_sequences(&seqs).unwrap())
        .unwrap();
    assert_eq!(one, sharded);
}
