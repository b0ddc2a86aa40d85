//! Section `fp8` of the GPU check (issue 19, docs/gpu-owed.md item 15): the FP8 path of the CUDA
//! backend against the CPU reference (engine/src/fp8.rs) and against bf16 on the same GPU.
//!
//! 1. kernels through the `Backend` trait against the CPU backend, fresh random inputs: the norm
//!    and the activations whose output feeds an FP8 matrix (fused quantization: codes must equal
//!    the CPU's rounding except where the f32 values differ in their last bits and land across a
//!    rounding boundary, at most 0.1% of them, each one e4m3 step away), an e4m3 tensor into a
//!    bf16 matrix (dequantization), FP8 GEMMs from bf16 input (standalone quantization) on the
//!    device's default path and on the tensor-wide path, with bias;
//! 2. GEMM throughput at the 340B model's TP=8 rank shapes (q/k/v 2688 x 18432, o 18432 x 2304,
//!    up 9216 x 18432, down 18432 x 9216; 8k and 16k tokens): bf16, FP8 with slow and with fast
//!    accumulation, and the error of each FP8 variant against the CPU at K = 18432 and 9216;
//!    target FP8 (slow, the default) >= 1.7x bf16 over the four GEMMs;
//! 3. gpu-1b in FP8 (the same random weights quantized) against gpu-1b in bf16 and the CPU's FP8
//!    reference: scores, tokens/s at 2k/8k/16k tokens, and the standalone `quantize_rows`' share
//!    of the FP8 forward.

use std::path::Path;
use std::time::Instant;

use arbiter_engine::backend::{Activation, Backend, MatrixPart};
use arbiter_engine::cpu::CpuBackend;
use arbiter_engine::cuda::{CudaBackend, Fp8Path, Fp8Settings};
use arbiter_engine::fp8::{self, Fp8Scheme};
use arbiter_engine::spec::NormKind;
use arbiter_engine::synth::{gpu_1b_config, tensor_shapes, write_random_model, SplitMix};
use arbiter_engine::weights::{Dtype, TensorView};
use arbiter_engine::{Model, PackedBatch};
use serde_json::json;

use super::{bf16_bytes, draw_lengths, f32_bytes, random_bf16, random_f32, rel_error, Report, Res, GPU1B_LENGTHS};

/// Activation codes that may differ from the CPU's (f32 values a few ulps apart, across a
/// rounding boundary), as a fraction of all of them.
const MAX_CODE_MISMATCH: f64 = 1e-3;
/// Speed-up of the FP8 GEMMs over bf16 at the 340B rank shapes that issue 19 asks for.
const TARGET_SPEEDUP: f64 = 1.7;

/// Compares dequantized per-token FP8 values from the GPU with the CPU reference's rounding of
/// the same rows: the same code (equal up to the last bits of the row's scale, which comes from
/// f32 values computed in another order) except at most [`MAX_CODE_MISMATCH`] of them, each
/// within one e4m3 step (1/8 of the larger magnitude, or the subnormal step of the row's scale).
fn check_rounded(r: &mut Report, what: &str, got: &[f32], want: &[f32], cols: usize) {
    let mut mismatched = 0usize;
    let mut worst_steps = 0.0f64;
    let nan = got.iter().any(|v| !v.is_finite());
    for (row_g, row_w) in got.chunks(cols).zip(want.chunks(cols)) {
        let s = fp8::activation_scale(row_w) as f64;
        for (&g, &w) in row_g.iter().zip(row_w) {
            if (g as f64 - w as f64).abs() > 1e-5 * (g.abs().max(w.abs()) as f64) {
                mismatched += 1;
                let step = (g.abs().max(w.abs()) as f64 / 8.0).max(s / 512.0);
                worst_steps = worst_steps.max((g as f64 - w as f64).abs() / step);
            }
        }
    }
    let frac = if got.len() == want.len() { mismatched as f64 / want.len().max(1) as f64 } else { f64::INFINITY };
    let ok = !nan && frac <= MAX_CODE_MISMATCH && worst_steps <= 1.0 + 1e-6;
    let verdict = if ok { "ok" } else { "FAIL" };
    r.line(format!(
        "| {what} | {frac:.2e} of codes differ, worst {worst_steps:.2} steps | {MAX_CODE_MISMATCH:.0e}, 1 step | {verdict} |"
    ));
    if !ok {
        r.failures.push(format!("{what}: {frac:.3e} of codes differ, worst {worst_steps:.2} e4m3 steps"));
    }
}

/// `w` (`[n, k]`) quantized as `arbiter quantize` does: e4m3 bytes and per-row scales.
fn quantized(w: &[f32], k: usize) -> (Vec<u8>, Vec<f32>) {
    fp8::quantize_matrix(w, k)
}

/// The CPU reference of per-token rounding of `x` (`cols` per row).
fn rounded(x: &[f32], cols: usize) -> Vec<f32> {
    let mut v = x.to_vec();
    fp8::round_per_token(&mut v, cols);
    v
}

pub(super) fn fp8(r: &mut Report, gpu: &CudaBackend, cpu: &CpuBackend, work: &Path) -> Res<serde_json::Value> {
    let Some(path) = gpu.fp8_path() else {
        return Err(format!(
            "{} ({}) has no FP8 tensor cores (sm_89+): nothing to check",
            gpu.device_name(),
            gpu.arch()
        )
        .into());
    };
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64;
    let mut rng = SplitMix::new(seed);
    r.line(format!(
        "\n## FP8 (e4m3) against the CPU reference (seed {seed}; default path {path:?}, slow accumulation)"
    ));
    r.line("| op | error | tolerance | |");
    r.line("|---|---|---|---|");

    // An FP8 matrix to hand to the *_for ops, so that they quantize (its values do not matter).
    let (h, n) = (2048, 256);
    let w = random_bf16(&mut rng, n * h, 1.0 / (h as f32).sqrt());
    let (codes, scales) = quantized(&w, h);
    let shape = [n, h];
    let view = TensorView::new("w", Dtype::F8E4M3, &shape, &codes);
    let part = MatrixPart { scales: Some(scales.clone()), ..MatrixPart::whole(view) };
    let mg = gpu.matrix(std::slice::from_ref(&part))?;
    let gpu_fp8_input = |t: &arbiter_engine::cuda::CudaTensor| t.dtype() == arbiter_engine::cuda::ActDtype::E4m3;

    // Fused norm + quantization, with and without the residual add.
    for (kind, rows) in [(NormKind::LayerNorm1P, 77), (NormKind::RmsNorm, 300)] {
        let (pg, pc) = super::random_norm(gpu, cpu, &mut rng, kind, h)?;
        let x: Vec<f32> = random_f32(&mut rng, rows * h, 3.0).iter().map(|v| v + 1.5).collect();
        let (xg, xc) = (gpu.upload(&x, rows, h)?, cpu.upload(&x, rows, h)?);
        let q = gpu.norm_for(&xg, &pg, &mg)?;
        if !gpu_fp8_input(&q) {
            r.fail(format!("norm_for an FP8 matrix returned {:?}, not e4m3", q.dtype()));
        }
        let want = rounded(&cpu.to_host(&cpu.norm(&xc, &pc)?)?, h);
        check_rounded(r, &format!("norm {kind:?} [{rows}, {h}] -> e4m3"), &gpu.to_host(&q)?, &want, h);

        let delta = random_bf16(&mut rng, rows * h, 2.0);
        let (mut xg2, mut xc2) = (gpu.upload(&x, rows, h)?, cpu.upload(&x, rows, h)?);
        let (dg, dc) = (gpu.upload_bf16(&delta, rows, h)?, cpu.upload(&delta, rows, h)?);
        let q = gpu.add_norm_for(&mut xg2, &dg, &pg, &mg)?;
        let want = rounded(&cpu.to_host(&cpu.add_norm(&mut xc2, &dc, &pc)?)?, h);
        check_rounded(r, &format!("add_norm {kind:?} [{rows}, {h}] -> e4m3"), &gpu.to_host(&q)?, &want, h);
        r.check(
            &format!("add_norm {kind:?} -> e4m3: residual x += delta"),
            &gpu.to_host(&xg2)?,
            &cpu.to_host(&xc2)?,
            1e-6,
        );

        // An e4m3 tensor into a bf16 matrix goes through dequantize_rows.
        let wb = random_bf16(&mut rng, 64 * h, 1.0 / (h as f32).sqrt());
        let wbb = bf16_bytes(&wb);
        let sb = [64, h];
        let bview = TensorView::new("wb", Dtype::BF16, &sb, &wbb);
        let yg = gpu.matmul(&q, &gpu.matrix(&[MatrixPart::whole(bview)])?)?;
        let yc = cpu.matmul(&cpu.upload(&gpu.to_host(&q)?, rows, h)?, &cpu.matrix(&[MatrixPart::whole(bview)])?)?;
        r.check(
            &format!("e4m3 [{rows}, {h}] into a bf16 matrix (dequantize_rows)"),
            &gpu.to_host(&yg)?,
            &cpu.to_host(&yc)?,
            2e-2,
        );
    }

    // Fused activation + quantization.
    for (kind, rows, cols) in [
        (Activation::Relu2, 100, 2 * h),
        (Activation::SwiGlu, 70, 2 * h),
        (Activation::GeGlu, 70, 2 * h),
        (Activation::Relu, 5, h),
    ] {
        let out_cols = if matches!(kind, Activation::SwiGlu | Activation::GeGlu) { cols / 2 } else { cols };
        let x = random_bf16(&mut rng, rows * cols, 4.0);
        // The FP8 matrix's width must be the activation's output width for the graph; here only
        // the kind of matrix matters to the op.
        let g = gpu.activation_for(&gpu.upload_bf16(&x, rows, cols)?, kind, &mg)?;
        let want = rounded(&cpu.to_host(&cpu.activation(&cpu.upload(&x, rows, cols)?, kind)?)?, out_cols);
        check_rounded(r, &format!("{kind:?} [{rows}, {cols}] -> e4m3"), &gpu.to_host(&g)?, &want, out_cols);
    }

    // FP8 GEMMs from bf16 input (quantize_rows first), both paths, with a bias on the second.
    let mut paths = vec![path];
    if path == Fp8Path::OuterVector {
        paths.push(Fp8Path::TensorWide);
    }
    for (t, n, k) in [(1, 64, 64), (77, 3072, 2048), (513, 2048, 8192), (64, 48, 16)] {
        let wv = random_bf16(&mut rng, n * k, 1.0 / (k as f32).sqrt());
        let (c, s) = quantized(&wv, k);
        let sh = [n, k];
        let bias = random_f32(&mut rng, n, 0.5);
        let biasb = f32_bytes(&bias);
        let bsh = [n];
        let part = MatrixPart {
            scales: Some(s),
            bias: Some(TensorView::new("bias", Dtype::F32, &bsh, &biasb)),
            ..MatrixPart::whole(TensorView::new("w", Dtype::F8E4M3, &sh, &c))
        };
        let x = random_bf16(&mut rng, t * k, 1.0);
        let want = cpu.to_host(&cpu.matmul(&cpu.upload(&x, t, k)?, &cpu.matrix(std::slice::from_ref(&part))?)?)?;
        for &p in &paths {
            gpu.set_fp8_settings(Fp8Settings { path: p, fast_accum: false })?;
            let m = gpu.matrix(std::slice::from_ref(&part))?;
            let got = gpu.to_host(&gpu.matmul(&gpu.upload_bf16(&x, t, k)?, &m)?)?;
            r.check(&format!("FP8 matmul {p:?} [{t}, {k}] x [{n}, {k}]^T + bias"), &got, &want, 2e-2);
        }
    }
    gpu.set_fp8_settings(Fp8Settings { path, fast_accum: false })?;

    let gemms = gemm_table(r, gpu, cpu, path, &mut rng)?;
    let model = gpu1b(r, gpu, work)?;
    Ok(json!({ "path": format!("{path:?}"), "seed": seed, "gemms": gemms, "gpu1b": model }))
}

/// The 340B model's per-rank GEMMs at TP=8 (n, k): q/k/v (12 + 2 x 1 heads of 192), o, up
/// (73728 / 8, squared ReLU: no gate), down.
const RANK_GEMMS: [(&str, usize, usize); 4] =
    [("qkv", 2688, 18432), ("o", 18432, 2304), ("up", 9216, 18432), ("down", 18432, 9216)];

fn gemm_table(
    r: &mut Report,
    gpu: &CudaBackend,
    cpu: &CpuBackend,
    path: Fp8Path,
    rng: &mut SplitMix,
) -> Res<serde_json::Value> {
    r.line(format!("\n## FP8 vs bf16 GEMMs at the 340B TP=8 rank shapes ({}, FP8 path {path:?})", gpu.device_name()));
    r.line("| tokens | GEMM (n x k) | bf16 TFLOP/s | FP8 slow acc. TFLOP/s | FP8 fast acc. TFLOP/s | FP8 slow / bf16 | FP8 fast / bf16 |");
    r.line("|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for t in [8192usize, 16384] {
        let (mut bf_s, mut slow_s, mut fast_s, mut flops) = (0.0, 0.0, 0.0, 0.0);
        for (name, n, k) in RANK_GEMMS {
            let f = 2.0 * (t * n * k) as f64;
            let b = gpu.time_gemm(t, n, k, 5)?;
            let both = [Fp8Settings { path, fast_accum: false }, Fp8Settings { path, fast_accum: true }];
            let [slow, fast] = gpu.time_gemm_fp8(t, n, k, &both, 5)?[..] else {
                return Err("time_gemm_fp8 returned another number of timings".into());
            };
            r.line(format!(
                "| {t} | {name} {n} x {k} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
                f / b / 1e12,
                f / slow / 1e12,
                f / fast / 1e12,
                b / slow,
                b / fast
            ));
            rows.push(json!({ "tokens": t, "gemm": name, "n": n, "k": k, "bf16_s": b, "fp8_slow_s": slow, "fp8_fast_s": fast }));
            (bf_s, slow_s, fast_s, flops) = (bf_s + b, slow_s + slow, fast_s + fast, flops + f);
        }
        let speedup = bf_s / slow_s;
        r.line(format!(
            "| {t} | all four | {:.0} | {:.0} | {:.0} | **{speedup:.2}** | {:.2} |",
            flops / bf_s / 1e12,
            flops / slow_s / 1e12,
            flops / fast_s / 1e12,
            bf_s / fast_s
        ));
        if speedup < TARGET_SPEEDUP {
            r.line(format!(
                "MISSED: FP8 (slow accumulation) is {speedup:.2}x bf16 at {t} tokens; target {TARGET_SPEEDUP}x"
            ));
        }
    }

    // Accuracy of each accumulation at the long K of these layers, against the CPU (f32 sums of
    // the same rounded operands), 256 tokens.
    r.line("\n| accumulation | GEMM | error vs CPU FP8 reference | tolerance | |");
    r.line("|---|---|---|---|---|");
    let mut accuracy = Vec::new();
    for (name, n, k) in [("qkv", 2688, 18432), ("down", 18432, 9216)] {
        let t = 256;
        let wv = random_bf16(rng, n * k, 1.0 / (k as f32).sqrt());
        let (c, s) = quantized(&wv, k);
        let sh = [n, k];
        let part = MatrixPart { scales: Some(s), ..MatrixPart::whole(TensorView::new("w", Dtype::F8E4M3, &sh, &c)) };
        let x = random_bf16(rng, t * k, 1.0);
        let want = cpu.to_host(&cpu.matmul(&cpu.upload(&x, t, k)?, &cpu.matrix(std::slice::from_ref(&part))?)?)?;
        let m = gpu.matrix(std::slice::from_ref(&part))?;
        for fast in [false, true] {
            gpu.set_fp8_settings(Fp8Settings { path, fast_accum: fast })?;
            let got = gpu.to_host(&gpu.matmul(&gpu.upload_bf16(&x, t, k)?, &m)?)?;
            let label = if fast { "fast" } else { "slow (default)" };
            let err = if fast {
                // Reported, not held to the bound: how much fast accumulation costs is the finding.
                let e = rel_error(&got, &want);
                r.line(format!("| {label} | {name} [{t}, {k}] x [{n}, {k}]^T | {e:.2e} | (reported) | |"));
                e
            } else {
                r.check(&format!("{label} | {name} [{t}, {k}] x [{n}, {k}]^T"), &got, &want, 2e-2)
            };
            accuracy.push(json!({ "gemm": name, "fast_accum": fast, "error": err }));
        }
        gpu.set_fp8_settings(Fp8Settings { path, fast_accum: false })?;
    }
    Ok(json!({ "timings": rows, "accuracy": accuracy, "target_speedup": TARGET_SPEEDUP }))
}

/// gpu-1b's folder with `quantization_config`: the same random weights (same seed and order as
/// the bf16 folder of section gpu1b) stored e4m3 with per-channel scales.
fn write_gpu1b(dir: &Path, fp8: bool) -> Res<()> {
    if dir.join("model.safetensors").exists() {
        return Ok(());
    }
    let mut c = gpu_1b_config();
    if fp8 {
        c["quantization_config"] = Fp8Scheme::default().to_config();
    }
    write_random_model(dir, &c, Dtype::BF16, 1, false)?;
    Ok(())
}

fn median_forward(model: &Model<CudaBackend>, batch: &PackedBatch) -> Res<f64> {
    for _ in 0..2 {
        model.forward(batch)?;
    }
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        model.forward(batch)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[2])
}

fn gpu1b(r: &mut Report, gpu: &CudaBackend, work: &Path) -> Res<serde_json::Value> {
    let (bf_dir, fp_dir) = (work.join("gpu-1b"), work.join("gpu-1b-fp8"));
    let t = Instant::now();
    write_gpu1b(&bf_dir, false)?;
    write_gpu1b(&fp_dir, true)?;
    r.line(format!("\n## gpu-1b in FP8 vs bf16 (folders written in {:.1} s)", t.elapsed().as_secs_f64()));
    let bf = Model::load(&bf_dir, CudaBackend::new(0)?)?;
    let fp = Model::load(&fp_dir, CudaBackend::new(0)?)?;
    let spec = fp.spec().clone();
    let vocab = spec.vocab as u64;

    // Scores: GPU FP8 against the CPU FP8 reference (the same semantics; bf16 activations on the
    // GPU, f32 on the CPU) within DESIGN.md's GPU tolerance, and FP8's own error against bf16.
    let mut rng = SplitMix::new(11);
    let seqs: Vec<Vec<u32>> =
        GPU1B_LENGTHS.iter().map(|&n| (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect()).collect();
    let batch = PackedBatch::from_sequences(&seqs)?;
    let got: Vec<f32> = fp.forward(&batch)?.into_iter().map(|v| v[0]).collect();
    let base: Vec<f32> = bf.forward(&batch)?.into_iter().map(|v| v[0]).collect();
    let t = Instant::now();
    let cpu_model = Model::load(&fp_dir, CpuBackend::new())?;
    let want: Vec<f32> = cpu_model.forward(&batch)?.into_iter().map(|v| v[0]).collect();
    drop(cpu_model);
    r.line(format!("CPU FP8 reference computed in {:.1} s", t.elapsed().as_secs_f64()));
    r.line("| check | error | tolerance | |");
    r.line("|---|---|---|---|");
    r.check("gpu-1b FP8 on the GPU vs the CPU FP8 reference (8 sequences, packed)", &got, &want, 2e-2);
    let fp8_vs_bf16 = rel_error(&got, &base);
    r.line(format!("| gpu-1b FP8 vs bf16 on the GPU (FP8's own error, reported) | {fp8_vs_bf16:.2e} | | |"));

    r.line("\n| tokens | bf16 tokens/s | FP8 tokens/s | FP8 / bf16 | quantize_rows share of the FP8 forward |");
    r.line("|---|---|---|---|---|");
    let mut rows = Vec::new();
    for target in [2048usize, 8192, 16384] {
        let lens = draw_lengths(target, 0);
        let mut rng = SplitMix::new(target as u64);
        let seqs: Vec<Vec<u32>> =
            lens.iter().map(|&n| (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect()).collect();
        let batch = PackedBatch::from_sequences(&seqs)?;
        let (b, f) = (median_forward(&bf, &batch)?, median_forward(&fp, &batch)?);
        // The standalone quantization (attention output before o) once per layer.
        let q = gpu.time_quantize_rows(target, spec.heads * spec.head_dim, 5)? * spec.layers as f64;
        r.line(format!(
            "| {target} | {:.0} | {:.0} | {:.2} | {:.1}% |",
            target as f64 / b,
            target as f64 / f,
            b / f,
            100.0 * q / f
        ));
        rows.push(json!({ "tokens": target, "bf16_s": b, "fp8_s": f, "quantize_rows_s": q, "quantize_share": q / f }));
    }
    let params: usize = tensor_shapes(&spec)
        .iter()
        .filter(|(n, _)| !n.contains("embed"))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    Ok(
        json!({ "fp8_vs_cpu": rel_error(&got, &want), "fp8_vs_bf16": fp8_vs_bf16, "params": params, "throughput": rows }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rounding_check_allows_rare_one_step_differences_only() {
        let cols = 2000;
        let mut rng = SplitMix::new(5);
        let want = rounded(&random_f32(&mut rng, 2 * cols, 3.0), cols);
        let mut r = Report::default();
        check_rounded(&mut r, "identical", &want, &want, cols);
        assert!(r.failures.is_empty(), "{:?}", r.failures);

        // One value one e4m3 step up (1/8 above a value in [1, 2) x scale is the next code).
        let i = (0..want.len()).find(|&i| want[i] > 0.0).unwrap();
        let mut one = want.clone();
        one[i] *= 1.0 + 1.0 / 16.0;
        check_rounded(&mut r, "one step", &one, &want, cols);
        assert!(r.failures.is_empty(), "{:?}", r.failures);

        let mut two = want.clone();
        two[i] *= 1.5;
        check_rounded(&mut r, "two steps", &two, &want, cols);
        assert_eq!(r.failures.len(), 1, "{:?}", r.failures);

        let mut many = want.clone();
        for v in many.iter_mut().take(20) {
            *v *= 1.0 + 1.0 / 16.0;
        }
        check_rounded(&mut r, "1% one step", &many, &want, cols);
        assert_eq!(r.failures.len(), 2, "{:?}", r.failures);

        let mut nan = want.clone();
        nan[3] = f32::NAN;
        check_rounded(&mut r, "NaN", &nan, &want, cols);
        assert_eq!(r.failures.len(), 3, "{:?}", r.failures);
    }

    #[test]
    fn the_rank_gemms_are_the_340b_model_cut_eight_ways() {
        let (hidden, heads, kv, d, ffn, tp) = (18432, 96, 8, 192, 73728, 8);
        assert_eq!(RANK_GEMMS[0], ("qkv", (heads + 2 * kv) * d / tp, hidden));
        assert_eq!(RANK_GEMMS[0].1, (hidden + 2 * kv * d) / tp);
        assert_eq!(RANK_GEMMS[1], ("o", hidden, heads * d / tp));
        assert_eq!(RANK_GEMMS[2], ("up", ffn / tp, hidden));
        assert_eq!(RANK_GEMMS[3], ("down", hidden, ffn / tp));
    }
}
