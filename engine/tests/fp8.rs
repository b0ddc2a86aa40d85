//! FP8 folders (compressed-tensors float-quantized): they load, score close to the unquantized
//! model with the reference semantics, split across tensor-parallel ranks, and every bad FP8
//! folder is refused naming the tensor or field.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use arbiter_engine::backend::SingleRank;
use arbiter_engine::cpu::CpuBackend;
use arbiter_engine::fp8::{self, Fp8Scheme};
use arbiter_engine::graph::open_folder;
use arbiter_engine::parallel::runner::ParallelEngine;
use arbiter_engine::parallel::{Parallelism, RankPlan};
use arbiter_engine::synth::{write_random_model, write_safetensors};
use arbiter_engine::weights::{narrow, Dtype, WeightStore};
use arbiter_engine::{Model, PackedBatch};
use common::rel_error;
use serde_json::{json, Value};

/// Nemotron (relu2) or Llama (SwiGLU: gate and up fused), GQA, shapes divisible by 4.
fn config(llama: bool) -> Value {
    let mut c = json!({
        "architectures": ["NemotronForSequenceClassification"],
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8,
        "vocab_size": 96, "max_position_embeddings": 256,
        "hidden_act": "relu2", "norm_eps": 1e-5, "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "id2label": {"0": "a", "1": "b"},
        "arbiter": {"reward_weights": {"a": 1.0, "b": -0.5}}
    });
    if llama {
        c["architectures"] = json!(["LlamaForSequenceClassification"]);
        c["hidden_act"] = json!("silu");
        c.as_object_mut().unwrap().remove("norm_eps");
        c.as_object_mut().unwrap().remove("partial_rotary_factor");
    }
    c
}

fn fp8_config(llama: bool) -> Value {
    let mut c = config(llama);
    c["quantization_config"] = Fp8Scheme::default().to_config();
    c
}

/// The same random weights (same seed), unquantized and FP8.
fn pair(llama: bool) -> (tempfile::TempDir, tempfile::TempDir) {
    let (dense, quant) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_random_model(dense.path(), &config(llama), Dtype::F32, 9, true).unwrap();
    write_random_model(quant.path(), &fp8_config(llama), Dtype::F32, 9, true).unwrap();
    (dense, quant)
}

fn sequences() -> Vec<Vec<u32>> {
    (0..12u32).map(|i| (0..(1 + i * 13) % 120 + 1).map(|t| (t * 7 + i * 5) % 96).collect()).collect()
}

fn cpu() -> CpuBackend {
    CpuBackend::with_threads(1).unwrap()
}

#[test]
fn an_fp8_folder_scores_like_the_dequantized_weights_with_rounded_activations() {
    for llama in [false, true] {
        let (dense, quant) = pair(llama);
        let batch = PackedBatch::from_sequences(&sequences()).unwrap();
        let exact = Model::load(dense.path(), cpu()).unwrap().forward(&batch).unwrap();
        let model = Model::load(quant.path(), cpu()).unwrap();
        assert!(model.spec().fp8.is_some());
        let got = model.forward(&batch).unwrap();
        let worst = got.iter().zip(&exact).map(|(g, e)| rel_error(g, e)).fold(0.0, f64::max);
        eprintln!("llama={llama}: FP8 vs f32 worst error {worst:.3e}");
        // e4m3 keeps 3 mantissa bits: each weight and activation is off by up to 1/16 of itself
        // (RMS about 1/16/sqrt(3) = 3.6%), and random-weight models amplify rather than damp it.
        // The outputs must move (the rounding is applied) yet stay within 15%.
        assert!(worst > 1e-3, "llama={llama}: FP8 outputs equal the f32 ones ({worst:.1e}); nothing was rounded");
        assert!(worst < 0.15, "llama={llama}: FP8 error {worst:.3e} is too large for e4m3 rounding");
    }
}

/// The two rules at the level of one matrix: weights are code x row scale, and each token's
/// input is rounded to e4m3 with its own scale; checked against an oracle that finds the nearest
/// e4m3 value by search over all 256 codes.
#[test]
fn a_quantized_matmul_is_dequantized_weights_times_per_token_rounded_inputs() {
    use arbiter_engine::backend::{Backend, MatrixPart};
    use arbiter_engine::weights::TensorView;
    let (n, k) = (5usize, 16usize);
    let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
    let (codes, scales) = fp8::quantize_matrix(&w, k);
    let shape = [n, k];
    let view = TensorView::new("m.weight", Dtype::F8E4M3, &shape, &codes);
    let b = cpu();
    let part = MatrixPart { scales: Some(scales[1..4].to_vec()), ..MatrixPart::block(view, 1..4, 0..k) };
    let m = b.matrix(&[part]).unwrap();
    let x: Vec<f32> = (0..2 * k).map(|i| ((i * 11 % 17) as f32 - 8.0) * if i < k { 0.01 } else { 300.0 }).collect();
    let got = b.matmul(&b.upload(&x, 2, k).unwrap(), &m).unwrap().into_data();
    // Oracle: the nearest e4m3 value by search over all 256 codes (ties never occur here).
    let nearest = |v: f32| {
        (0u8..=255)
            .map(fp8::decode)
            .filter(|c| c.is_finite())
            .min_by(|a, b| (a - v).abs().total_cmp(&(b - v).abs()))
            .unwrap()
    };
    for t in 0..2 {
        let row = &x[t * k..(t + 1) * k];
        let sx = row.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 448.0;
        for o in 0..3 {
            let want: f64 = (0..k)
                .map(|c| {
                    nearest(row[c] / sx) as f64
                        * sx as f64
                        * fp8::decode(codes[(o + 1) * k + c]) as f64
                        * scales[o + 1] as f64
                })
                .sum();
            let g = got[t * 3 + o] as f64;
            assert!((g - want).abs() <= 1e-5 * want.abs().max(1.0), "token {t} output {o}: {g} vs {want}");
        }
    }
}

/// Linear layers that `quantization_config.ignore` lists are stored full precision and computed
/// without activation rounding: ignoring every linear layer gives the unquantized model's scores
/// bit for bit, and ignoring some gives scores different from both the unquantized and the fully
/// quantized folder (the rest is still rounded, the kept layers are not).
#[test]
fn layers_the_scheme_ignores_load_full_precision_and_are_not_rounded() {
    for llama in [false, true] {
        let (dense, quant) = pair(llama);
        let spec = open_folder(dense.path()).unwrap().0;
        let linear: Vec<String> = arbiter_engine::tensors::tensor_shapes(&spec)
            .into_iter()
            .map(|(name, _)| name)
            .filter(|n| fp8::is_linear_weight(n))
            .map(|n| fp8::module_of(&n).to_string())
            .collect();
        assert!(linear.len() >= 8, "llama={llama}: {linear:?}");
        let with_ignored = |ignore: Vec<String>| {
            let dir = tempfile::tempdir().unwrap();
            let mut c = fp8_config(llama);
            c["quantization_config"]["ignore"] = json!(ignore);
            write_random_model(dir.path(), &c, Dtype::F32, 9, true).unwrap();
            dir
        };
        let batch = PackedBatch::from_sequences(&sequences()).unwrap();
        let scores = |dir: &Path| Model::load(dir, cpu()).unwrap().forward(&batch).unwrap();
        let exact = scores(dense.path());
        let fp8_all = scores(quant.path());

        let mut everything = vec!["score".to_string()];
        everything.extend(linear.iter().cloned());
        let none_quantized = with_ignored(everything);
        let store = WeightStore::open(none_quantized.path()).unwrap();
        assert!(store.names().iter().all(|n| store.get(n).unwrap().dtype == Dtype::F32), "llama={llama}");
        assert_eq!(scores(none_quantized.path()), exact, "llama={llama}: every layer kept is the unquantized model");

        // Layer 0 kept, layer 1 quantized.
        let mut first = vec!["score".to_string()];
        first.extend(linear.iter().filter(|m| m.starts_with("model.layers.0.")).cloned());
        let kept = with_ignored(first);
        let store = WeightStore::open(kept.path()).unwrap();
        for m in &linear {
            let dtype = store.get(&format!("{m}.weight")).unwrap().dtype;
            let want = if m.starts_with("model.layers.0.") { Dtype::F32 } else { Dtype::F8E4M3 };
            assert_eq!(dtype, want, "llama={llama}: {m}");
        }
        let partial = scores(kept.path());
        let worst = |a: &[Vec<f32>], b: &[Vec<f32>]| a.iter().zip(b).map(|(g, e)| rel_error(g, e)).fold(0.0, f64::max);
        assert!(worst(&partial, &exact) > 1e-4, "llama={llama}: layer 1 is not rounded");
        assert!(worst(&partial, &fp8_all) > 1e-4, "llama={llama}: layer 0 is rounded although kept");
    }
}

#[test]
fn tensor_parallel_fp8_matches_one_rank_within_tolerance() {
    for llama in [false, true] {
        let (_dense, quant) = pair(llama);
        let batch = PackedBatch::from_sequences(&sequences()).unwrap();
        let score = |dir: &Path| Model::load(dir, cpu()).unwrap().forward(&batch).unwrap();
        let plain = score(quant.path());
        // Rows of very different sizes (scales x 1/4 .. x 4, by row): a rank that took another
        // row's scale would be off by up to 16x, far outside the rounding differences below.
        edit_weights(quant.path(), |m| {
            for (name, (_, _, bytes)) in m.iter_mut().filter(|(n, _)| n.ends_with("weight_scale")) {
                assert!(name.contains("proj"));
                for (r, b) in bytes.chunks_exact_mut(4).enumerate() {
                    let v = f32::from_le_bytes(b.try_into().unwrap()) * 2f32.powi((r % 5) as i32 - 2);
                    b.copy_from_slice(&v.to_le_bytes());
                }
            }
        });
        let one = score(quant.path());
        let moved = one.iter().zip(&plain).map(|(g, e)| rel_error(g, e)).fold(0.0, f64::max);
        assert!(moved > 0.2, "llama={llama}: the row scales must matter ({moved:.2e})");
        for tp in [2, 4] {
            let engine = ParallelEngine::load(quant.path(), Parallelism { tp, pp: 1 }, Duration::from_secs(60), |_| {
                CpuBackend::with_threads(1)
            })
            .unwrap();
            let got = engine.forward(&batch).unwrap();
            let worst = got.iter().zip(&one).map(|(g, e)| rel_error(g, e)).fold(0.0, f64::max);
            eprintln!("llama={llama} tp={tp}: vs tp=1 {worst:.3e}");
            // Row-parallel inputs (o, down) get per-token scales from each rank's slice, so
            // their rounding differs from TP=1's: as much as FP8 differs from f32 (< 15%, see
            // above), twice over at most, and far from 1e-4 (unquantized TP) or a wrong slice.
            assert!(worst > 1e-5 && worst < 0.3, "llama={llama} tp={tp}: {worst:.3e}");
        }
    }
}

#[test]
fn column_parallel_ranks_read_their_rows_scales_and_row_parallel_ranks_all_of_them() {
    let (_dense, quant) = pair(true);
    let par = Parallelism { tp: 4, pp: 1 };
    for rank in par.ranks() {
        let (store, log) = common::read_log::open_logged(quant.path());
        let (spec, _) = open_folder(quant.path()).unwrap();
        Model::load_rank(spec.clone(), &store, cpu(), rank, Box::new(SingleRank)).unwrap();
        let reads = log.merged();
        let t = rank.tp_rank;
        // f32 scales, 4 bytes per row.
        let q_rows = RankPlan::share_scaled(&rank, spec.heads, spec.head_dim);
        let ffn = rank.share(spec.ffn);
        for (name, rows) in [
            ("model.layers.1.self_attn.q_proj.weight_scale", q_rows.clone()),
            ("model.layers.1.mlp.gate_proj.weight_scale", ffn.clone()),
            ("model.layers.1.mlp.up_proj.weight_scale", ffn.clone()),
            ("model.layers.1.self_attn.o_proj.weight_scale", 0..spec.hidden),
            ("model.layers.1.mlp.down_proj.weight_scale", 0..spec.hidden),
        ] {
            assert_eq!(reads[name], vec![rows.start * 4..rows.end * 4], "rank {t}: {name}");
        }
    }
}

// ---- bad folders ----

fn good_fp8_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &fp8_config(false), Dtype::BF16, 5, true).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir, cpu()) {
        Ok(_) => panic!("{} loaded but should not have", dir.display()),
        Err(e) => e.to_string(),
    }
}

type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// Rewrites model.safetensors after `edit` changes its tensors.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut Tensors)) {
    let store = WeightStore::open(dir).unwrap();
    let mut map: Tensors = store
        .names()
        .into_iter()
        .map(|n| {
            let t = store.get(n).unwrap();
            (n.to_string(), (t.dtype, t.shape.to_vec(), t.bytes.to_vec()))
        })
        .collect();
    drop(store);
    edit(&mut map);
    write_safetensors(&dir.join("model.safetensors"), &map).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
}

const UP: &str = "model.layers.1.mlp.up_proj.weight";
const UP_SCALE: &str = "model.layers.1.mlp.up_proj.weight_scale";

#[test]
fn the_good_fp8_folder_loads() {
    Model::load(good_fp8_folder().path(), cpu()).unwrap();
}

#[test]
fn a_missing_scale_is_named() {
    let dir = good_fp8_folder();
    edit_weights(dir.path(), |m| {
        m.remove(UP_SCALE);
    });
    let e = load_err(dir.path());
    assert!(e.contains("missing tensor") && e.contains(UP_SCALE), "{e}");
}

#[test]
fn a_mis_shaped_scale_is_named_and_both_accepted_shapes_load() {
    let dir = good_fp8_folder();
    // [out] is accepted as well as [out, 1], in BF16 and F16 as well as F32.
    for (dtype, flat) in [(Dtype::BF16, true), (Dtype::F16, false)] {
        edit_weights(dir.path(), |m| {
            let (_, shape, bytes) = m.remove(UP_SCALE).unwrap();
            let values: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            let new_shape = if flat { vec![shape[0]] } else { shape };
            m.insert(UP_SCALE.into(), (dtype, new_shape, narrow(&values, dtype)));
        });
        Model::load(dir.path(), cpu()).unwrap_or_else(|e| panic!("{dtype:?} flat={flat}: {e}"));
        edit_weights(dir.path(), |m| {
            let (d, _, bytes) = m.remove(UP_SCALE).unwrap();
            let values: Vec<f32> =
                arbiter_engine::weights::TensorView::new("s", d, &[bytes.len() / d.size()], &bytes).to_f32();
            m.insert(UP_SCALE.into(), (Dtype::F32, vec![values.len(), 1], narrow(&values, Dtype::F32)));
        });
    }
    edit_weights(dir.path(), |m| {
        let (d, shape, bytes) = m.remove(UP_SCALE).unwrap();
        m.insert(UP_SCALE.into(), (d, vec![1, shape[0]], bytes));
    });
    let e = load_err(dir.path());
    assert!(e.contains(UP_SCALE) && e.contains("[1, 128]") && e.contains("[128, 1]"), "{e}");
}

#[test]
fn non_finite_zero_and_negative_scales_are_named_with_their_row() {
    for (bad, shown) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf"), (0.0, "scale 0 "), (-0.5, "-0.5")] {
        let dir = good_fp8_folder();
        edit_weights(dir.path(), |m| {
            let (_, _, bytes) = m.get_mut(UP_SCALE).unwrap();
            bytes[7 * 4..8 * 4].copy_from_slice(&bad.to_le_bytes());
        });
        let e = load_err(dir.path());
        assert!(e.contains(UP_SCALE) && e.contains("row 7") && e.contains(shown), "{bad}: {e}");
    }
}

#[test]
fn an_f8_tensor_in_the_head_the_embedding_or_a_norm_is_refused() {
    for name in ["score.weight", "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"] {
        let dir = good_fp8_folder();
        edit_weights(dir.path(), |m| {
            let (d, shape, bytes) = m.remove(name).unwrap();
            let values = arbiter_engine::weights::TensorView::new(name, d, &shape, &bytes).to_f32();
            m.insert(name.into(), (Dtype::F8E4M3, shape, narrow(&values, Dtype::F8E4M3)));
        });
        let e = load_err(dir.path());
        assert!(e.contains(name) && e.contains("F8_E4M3") && e.contains("reward head stay"), "{name}: {e}");
    }
}

#[test]
fn storage_that_disagrees_with_the_scheme_is_refused() {
    // A full-precision weight where the scheme expects e4m3.
    let dir = good_fp8_folder();
    edit_weights(dir.path(), |m| {
        let (_, shape, bytes) = m.remove(UP).unwrap();
        m.insert(UP.into(), (Dtype::BF16, shape, bytes.iter().flat_map(|&b| [b, 0]).collect()));
    });
    let e = load_err(dir.path());
    assert!(e.contains(UP) && e.contains("is BF16 but quantization_config quantizes it"), "{e}");
    // An e4m3 weight in a folder without quantization_config.
    let dir = good_fp8_folder();
    edit_config(dir.path(), |c| {
        c.as_object_mut().unwrap().remove("quantization_config");
    });
    let e = load_err(dir.path());
    assert!(e.contains("F8_E4M3 but config.json has no quantization_config"), "{e}");
    // An e4m3 weight the scheme says to ignore.
    let dir = good_fp8_folder();
    edit_config(dir.path(), |c| {
        c["quantization_config"]["ignore"] = json!(["score", "model.layers.1.mlp.up_proj"]);
    });
    let e = load_err(dir.path());
    assert!(e.contains(UP) && e.contains("ignore lists"), "{e}");
}

#[test]
fn unknown_quantization_schemes_are_refused_by_name() {
    for (edit, needle) in [
        (json!({"quant_method": "gptq", "bits": 4}), "quant_method \"gptq\""),
        (json!({"quant_method": "fp8", "activation_scheme": "dynamic"}), "quant_method \"fp8\""),
        (json!({"quant_method": "bitsandbytes"}), "quant_method \"bitsandbytes\""),
    ] {
        let dir = good_fp8_folder();
        edit_config(dir.path(), |c| c["quantization_config"] = edit.clone());
        let e = load_err(dir.path());
        assert!(e.contains("config.json") && e.contains(needle), "{e}");
    }
    let dir = good_fp8_folder();
    edit_config(dir.path(), |c| {
        c["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = json!("block")
    });
    let e = load_err(dir.path());
    assert!(e.contains("quantization_config.config_groups.group_0.weights.strategy"), "{e}");
}
