//! `arbiter quantize` on the golden fixtures: every linear weight within half an e4m3 step of
//! the original, everything else copied bit for bit, and the FP8 model within FP8's error of
//! HF transformers' outputs.

#[path = "../../engine/tests/common/mod.rs"]
mod common;

use std::path::Path;

use arbiter_convert::quantize::{quantize, QuantizeOptions};
use arbiter_engine::cpu::CpuBackend;
use arbiter_engine::fp8;
use arbiter_engine::weights::{Dtype, WeightStore};
use arbiter_engine::{Model, PackedBatch};
use common::{fixture, golden, FIXTURES};

fn run(
    input: &Path,
    output: &Path,
    max_shard_bytes: u64,
) -> arbiter_convert::Result<arbiter_convert::quantize::QuantizeReport> {
    quantize(&QuantizeOptions {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        max_shard_bytes,
        progress: false,
    })
}

/// Worst error over a fixture's sequences, each scored alone, in units of the fixture's output
/// scale (the largest |output| over all its sequences). DESIGN.md's per-sequence measure divides
/// by that sequence's own largest output instead, which for a one-output head near zero on some
/// sequence (llama3-scaled's first is -0.13 where others reach 2.6) measures that sequence's
/// luck rather than FP8's error.
fn worst_error(dir: &Path, name: &str) -> f64 {
    let model = Model::load(dir, CpuBackend::new()).unwrap();
    let g = golden(name);
    let scale = g.outputs.iter().flatten().fold(1e-3f64, |m, r| m.max(r.abs() as f64));
    g.sequences
        .iter()
        .zip(&g.outputs)
        .map(|(s, r)| {
            let got = model.forward(&PackedBatch::from_sequences(&[s]).unwrap()).unwrap().remove(0);
            got.iter().zip(r).map(|(g, r)| (*g as f64 - *r as f64).abs()).fold(0.0, f64::max) / scale
        })
        .fold(0.0, f64::max)
}

#[test]
fn quantized_golden_fixtures_stay_within_fp8_error_of_transformers() {
    for name in FIXTURES.into_iter().chain(["nemotron-released"]) {
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join("fp8");
        let report = run(&fixture(name), &dir, u64::MAX).unwrap();
        let spec = arbiter_engine::config::load_config(&dir.join("config.json")).unwrap();
        assert!(spec.fp8.is_some(), "{name}: config.json says FP8");
        let linear_per_layer = if spec.mlp.has_gate() { 7 } else { 6 };
        assert_eq!(report.quantized, spec.layers * linear_per_layer, "{name}");
        let err = worst_error(&dir, name);
        eprintln!("{name}: FP8 worst error vs transformers {err:.3e}");
        // The unquantized fixtures match transformers to 1e-4; FP8 rounding must show (> 1e-3)
        // and stay within TOLERANCE (see docs/fp8.md for the derivation).
        assert!(err > 1e-3, "{name}: {err:.1e}: no FP8 rounding visible");
        assert!(err < TOLERANCE, "{name}: FP8 error {err:.3e} exceeds {TOLERANCE}");
    }
}

/// Worst error of an FP8 golden fixture against transformers, in units of its output scale.
///
/// e4m3 rounds each weight and activation to within 1/16 of itself (RMS 1/16/sqrt(3), 3.6%).
/// In a random-weight network nothing averages this away: each GEMM output moves by about
/// sqrt(2) x 3.6% = 5% RMS of its typical size, the fixtures' widths (64..160) give few terms
/// per dot product, and 4 layers of random relu2/SwiGLU blocks amplify rather than damp. Measured
/// worst over the eight fixtures: 0.132 (qwen2, whose q/k/v biases are added after the scales),
/// 0.116 (inform-head), 0.107 (nemotron-v5 and -v4-gqa), 0.048 to 0.060 for the others
/// (docs/fp8.md). The bound leaves a factor 1.9 over that; a wrong scale (a factor of 448, or
/// another row's) or a missing rounding step fails it one way or the other (the > 1e-3 floor).
const TOLERANCE: f64 = 0.25;

#[test]
fn every_weight_is_within_half_a_step_and_everything_else_is_copied() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("fp8");
    let input = fixture("llama3-scaled");
    run(&input, &dir, 200_000).unwrap();
    assert!(dir.join("model.safetensors.index.json").exists(), "small shards give an index");
    let (src, dst) = (WeightStore::open(&input).unwrap(), WeightStore::open(&dir).unwrap());
    let mut quantized = 0;
    for name in src.names() {
        let original = src.get(name).unwrap();
        let stored = dst.get(name).unwrap();
        assert_eq!(stored.shape, original.shape, "{name}");
        if !fp8::is_linear_weight(name) {
            assert_eq!((stored.dtype, stored.bytes), (original.dtype, original.bytes), "{name} copied");
            continue;
        }
        quantized += 1;
        assert_eq!(stored.dtype, Dtype::F8E4M3, "{name}");
        let scale = dst.get_shaped(&fp8::scale_name(name), &[original.shape[0], 1]).unwrap().to_f32();
        let (w, codes) = (original.to_f32(), stored.bytes);
        let k = original.shape[1];
        for (r, s) in scale.iter().enumerate() {
            let row = &w[r * k..(r + 1) * k];
            let absmax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert_eq!(*s, absmax / 448.0, "{name} row {r}: scale = absmax / 448");
            for (c, &v) in row.iter().enumerate() {
                let back = fp8::decode(codes[r * k + c]) * s;
                // Half a step: 1/16 relative in e4m3's normal range, 2^-10 x scale below it.
                let bound = (v.abs() / 16.0).max(s * 2f32.powi(-10)) * 1.000_01;
                assert!((back - v).abs() <= bound, "{name}[{r}, {c}]: {v} -> {back}");
            }
        }
    }
    assert_eq!(quantized, 4 * 7, "4 layers of q, k, v, o, gate, up, down");
    assert!(dst.names().iter().all(|n| src.contains(n) || n.ends_with(".weight_scale")));
    assert_eq!(
        std::fs::read(input.join("expected.json")).unwrap(),
        std::fs::read(dir.join("expected.json")).unwrap(),
        "side files are copied"
    );
}

#[test]
fn an_fp8_folder_is_not_quantized_twice_and_the_output_must_be_new() {
    let out = tempfile::tempdir().unwrap();
    let once = out.path().join("once");
    run(&fixture("nemotron-v5"), &once, u64::MAX).unwrap();
    let e = run(&once, &out.path().join("twice"), u64::MAX).unwrap_err().to_string();
    assert!(e.contains("already quantized"), "{e}");
    let e = run(&fixture("nemotron-v5"), &once, u64::MAX).unwrap_err().to_string();
    assert!(e.contains("not empty"), "{e}");
}
