//! The GPU check (run by scripts/gpu-check.sh on a GPU machine; built by scripts/gpu-prepare.sh).
//! It first prints the NVRTC in use (version, library, headers) and the CUDA version the driver
//! supports, then runs, in this order:
//!
//! 1. every kernel against the CPU backend's op, through the `Backend` trait, on fresh random
//!    inputs (the CPU side gets the same bf16-rounded values); error printed, NaN fails;
//! 2. whole-model scores on the golden fixtures against transformers' fp32 outputs and the CPU
//!    backend: error max|got-ref| / max(max|ref|, 1e-3) per sequence within 2e-2, identical
//!    rankings, and whether packing changes any bit (batch invariance, reported);
//!    bench-small's tokens/s (8 x 256 tokens, as engine/examples/bench_small.rs on the CPU);
//! 3. gpu-1b (random weights written here with `synth`): scores of a few sequences, written for
//!    scripts/gpu_hf.py to compare with transformers;
//! 4. throughput on gpu-1b for 2k, 8k and 16k-token batches of lengths drawn with seed 0 from
//!    32..=2048, with the cuBLASLt bf16 GEMM ceiling measured in the same run; the batches are
//!    written for the transformers side;
//! 5. model parallelism on one GPU (section `parallel`): TP=2 and TP=2 x PP=2 through the
//!    in-process communicator against TP=1 on a golden fixture; 4 layers of the 340B model cut to
//!    one TP=8 rank's shape at 8k and 16k tokens, with the fraction of the GEMM ceiling and a
//!    projection of the full model's tokens/s on 8 GPUs;
//! 6. FP8 (section `fp8`, not in the default list; `gpu-check.sh --fp8` runs it alone): the FP8
//!    kernels and GEMMs against the CPU reference, FP8 vs bf16 GEMMs at the 340B rank shapes with
//!    fast and slow accumulation, gpu-1b in FP8 vs bf16 (gpu_check/fp8.rs);
//! 7. NCCL on one GPU, last (its join without a peer leaves a thread blocked in NCCL): a one-rank
//!    all-reduce, and a two-rank join whose peer never comes, which must fail after its timeout
//!    instead of hanging.
//!
//! A section that stops on an error or a panic is a FAIL and the next one runs; `rust-results.json`
//! and `rust-report.md` under `--out` are rewritten after every section.
//!
//! cargo run --release -p arbiter-engine --features cuda --example gpu_check -- \
//!     --out DIR [--fixtures tests/fixtures/golden] [--work DIR] [--sections ops,golden,bench-small,gpu1b,throughput,parallel,fp8,nccl]
//!
//! Exits 1 when a check fails, 2 when the check cannot run (the backend does not start; the
//! results JSON still says why).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arbiter_engine::backend::{Activation, AttnLayout, Backend, HostTensor, MatrixPart};
use arbiter_engine::cpu::{CpuBackend, Precision};
use arbiter_engine::cuda::{bf16_bits, bf16_value, CudaBackend};
use arbiter_engine::parallel::runner::ParallelEngine;
use arbiter_engine::parallel::{Parallelism, RankPlan};
use arbiter_engine::rope;
use arbiter_engine::spec::{Llama3Scaling, NormKind, RopeSpec};
use arbiter_engine::sync::panic_message;
use arbiter_engine::synth::{gpu_1b_config, nemotron_340b_rank_config, tensor_shapes, write_random_model, SplitMix};
use arbiter_engine::weights::{Dtype, TensorView};
use arbiter_engine::{Model, PackedBatch, RewardWeights, Score};
use serde_json::json;

#[path = "gpu_check/fp8.rs"]
mod fp8_section;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Random norm parameters of width `h` (with a bias for LayerNorm1P), loaded on both backends.
fn random_norm(
    gpu: &CudaBackend,
    cpu: &CpuBackend,
    rng: &mut SplitMix,
    kind: NormKind,
    h: usize,
) -> Res<(<CudaBackend as Backend>::Norm, <CpuBackend as Backend>::Norm)> {
    let gamma = random_f32(rng, h, 0.5);
    let beta = random_f32(rng, h, 0.5);
    let (gb, bb) = (f32_bytes(&gamma), f32_bytes(&beta));
    let shape = [h];
    let gv = TensorView::new("g", Dtype::F32, &shape, &gb);
    let bv = TensorView::new("b", Dtype::F32, &shape, &bb);
    let bias = (kind == NormKind::LayerNorm1P).then_some(bv);
    Ok((gpu.norm_params(kind, 1e-5, gv, bias)?, cpu.norm_params(kind, 1e-5, gv, bias)?))
}

/// max|got - ref|.
fn max_diff(got: &[f32], reference: &[f32]) -> f64 {
    got.iter().zip(reference).map(|(g, r)| (*g as f64 - *r as f64).abs()).fold(0.0, f64::max)
}

/// max|got - ref| / max(max|ref|, 1e-3): the error measure of DESIGN.md.
fn rel_error(got: &[f32], reference: &[f32]) -> f64 {
    max_diff(got, reference) / reference.iter().map(|r| r.abs() as f64).fold(1e-3, f64::max)
}

/// Everything printed, kept for the report file.
#[derive(Default)]
struct Report {
    text: String,
    failures: Vec<String>,
}

impl Report {
    fn line(&mut self, s: impl AsRef<str>) {
        println!("{}", s.as_ref());
        self.text.push_str(s.as_ref());
        self.text.push('\n');
    }

    /// Records a failure that is not a comparison (a step that could not run).
    fn fail(&mut self, what: String) {
        self.line(format!("FAIL: {what}"));
        self.failures.push(what);
    }

    /// Records one comparison: fails on NaN, on a length mismatch, or above `tol`.
    fn check(&mut self, what: &str, got: &[f32], reference: &[f32], tol: f64) -> f64 {
        let nan = got.iter().any(|v| !v.is_finite());
        let err = if got.len() == reference.len() { rel_error(got, reference) } else { f64::INFINITY };
        let ok = !nan && err <= tol;
        let verdict = if ok { "ok" } else { "FAIL" };
        let note = if nan { " (non-finite output)" } else { "" };
        self.line(format!("| {what} | {err:.2e} | {tol:.0e} | {verdict}{note} |"));
        if !ok {
            self.failures.push(format!("{what}: error {err:.3e} (tolerance {tol:.0e}){note}"));
        }
        err
    }
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn main() {
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("gpu_check: cannot run: {e}");
            std::process::exit(2);
        }
    }
}

/// The report, the results JSON and where both go. Both files are rewritten after every section,
/// so whatever stops the run later (a failed section, a hang killed by the script's timeout)
/// leaves what was measured up to there.
struct Check {
    r: Report,
    results: serde_json::Map<String, serde_json::Value>,
    out: PathBuf,
}

impl Check {
    /// Runs one section. An error or a panic in it is recorded as a FAIL naming the section, and
    /// the check goes on with the next one: one broken part must not cost the others' results.
    fn section<T>(&mut self, name: &str, f: impl FnOnce(&mut Report) -> Res<T>) -> Option<T> {
        let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut self.r)));
        let got = match got {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.r.fail(format!("section {name} stopped: {e}"));
                None
            }
            Err(panic) => {
                self.r.fail(format!("section {name} panicked: {}", panic_message(panic.as_ref())));
                None
            }
        };
        if let Err(e) = self.save() {
            eprintln!("gpu_check: cannot write the results to {}: {e}", self.out.display());
        }
        got
    }

    /// Keeps `value` under `key` in the results JSON.
    fn keep(&mut self, key: &str, value: serde_json::Value) {
        self.results.insert(key.into(), value);
    }

    /// Writes rust-results.json (with the failures so far) and rust-report.md.
    fn save(&mut self) -> Res<()> {
        self.results.insert("failures".into(), json!(self.r.failures));
        std::fs::write(self.out.join("rust-results.json"), serde_json::to_string_pretty(&self.results)?)?;
        std::fs::write(self.out.join("rust-report.md"), &self.r.text)?;
        Ok(())
    }
}

fn run() -> Res<bool> {
    let out = PathBuf::from(arg("--out").unwrap_or_else(|| "gpu-check-out".into()));
    let fixtures = PathBuf::from(arg("--fixtures").unwrap_or_else(|| "tests/fixtures/golden".into()));
    let work = PathBuf::from(
        arg("--work").unwrap_or_else(|| std::env::temp_dir().join("arbiter-gpu-check").display().to_string()),
    );
    let sections = arg("--sections").unwrap_or_else(|| "ops,golden,bench-small,gpu1b,throughput,parallel,nccl".into());
    let want = |s: &str| sections.split(',').any(|x| x.trim() == s);
    std::fs::create_dir_all(&out)?;
    std::fs::create_dir_all(&work)?;

    let mut ck = Check { r: Report::default(), results: serde_json::Map::new(), out };
    let t0 = Instant::now();
    ck.r.line("# arbiter GPU check");
    // NVRTC first and on its own: its version decides whether the driver can load the kernels
    // (driver 580 runs CUDA 13.0 and cannot JIT the PTX of NVRTC 13.1 or later).
    match arbiter_kernels::Compiler::discover() {
        Ok(c) => {
            let (major, minor) = c.nvrtc_version();
            ck.r.line(format!("NVRTC {major}.{minor}, library {}, headers {}", c.library(), c.include_dir().display()));
            ck.keep(
                "nvrtc",
                json!({ "version": format!("{major}.{minor}"), "library": c.library(), "include": c.include_dir() }),
            );
        }
        Err(e) => ck.r.line(format!("NVRTC: not usable: {e}")),
    }
    let gpu = match CudaBackend::new(0) {
        Ok(g) => g,
        Err(e) => {
            ck.r.fail(format!("backend start: {e}"));
            ck.save()?;
            return Err(e.into());
        }
    };
    ck.r.line(format!("GPU: {} ({}), kernels for {}", gpu.device_name(), gpu.name(), gpu.arch()));
    match gpu.driver_cuda_version() {
        Ok((major, minor)) => ck.r.line(format!("driver supports CUDA {major}.{minor}")),
        Err(e) => ck.r.line(format!("driver CUDA version unknown: {e}")),
    }
    ck.r.line(format!("backend start (NVRTC compile or disk cache): {:.1} s", t0.elapsed().as_secs_f64()));
    let cpu = CpuBackend::new();
    ck.keep("device", json!(gpu.device_name()));
    ck.keep("arch", json!(gpu.arch()));

    if want("ops") {
        ck.section("ops", |r| ops(r, &gpu, &cpu));
    }
    if want("golden") {
        ck.section("golden", |r| golden(r, &fixtures));
    }
    if want("bench-small") {
        if let Some(v) = ck.section("bench-small", |r| bench_small(r, &work)) {
            ck.keep("bench_small", v);
        }
    }
    let model_dir = work.join("gpu-1b");
    if want("gpu1b") || want("throughput") {
        if let Some(model) = ck.section("gpu-1b load", |r| load_gpu_1b(r, &model_dir)) {
            ck.keep("model_dir", json!(model_dir));
            if want("gpu1b") {
                if let Some(v) = ck.section("gpu1b", |r| gpu1b_scores(r, &model)) {
                    ck.keep("gpu1b", v);
                }
            }
            if want("throughput") {
                if let Some(v) = ck.section("throughput", |r| throughput(r, &model)) {
                    ck.keep("throughput", v);
                }
            }
        }
    }
    if want("parallel") {
        if let Some(v) = ck.section("parallel", |r| parallel(r, &fixtures, &work)) {
            ck.keep("parallel", v);
        }
    }
    if want("fp8") {
        if let Some(v) = ck.section("fp8", |r| fp8_section::fp8(r, &gpu, &cpu, &work)) {
            ck.keep("fp8", v);
        }
    }
    // Last: the join without a peer leaves its init thread blocked inside NCCL for good (by
    // design, docs/cuda.md), which nothing after it should have to live with.
    if want("nccl") {
        ck.section("nccl", |r| {
            nccl(r, &gpu);
            Ok(())
        });
    }

    ck.r.line(format!("\ntotal {:.1} s", t0.elapsed().as_secs_f64()));
    if ck.r.failures.is_empty() {
        ck.r.line("RESULT: all Rust-side GPU checks passed");
    } else {
        ck.r.line(format!("RESULT: {} FAILED", ck.r.failures.len()));
        for f in ck.r.failures.clone() {
            ck.r.line(format!("  - {f}"));
        }
    }
    ck.save()?;
    Ok(ck.r.failures.is_empty())
}

/// Writes gpu-1b (random bf16 weights) unless it is there, and loads it on the GPU.
fn load_gpu_1b(r: &mut Report, model_dir: &Path) -> Res<Model<CudaBackend>> {
    let t = Instant::now();
    if !model_dir.join("model.safetensors").exists() {
        write_random_model(model_dir, &gpu_1b_config(), Dtype::BF16, 1, false)?;
    }
    r.line(format!("\ngpu-1b written to {} in {:.1} s", model_dir.display(), t.elapsed().as_secs_f64()));
    let t = Instant::now();
    let model = Model::load(model_dir, CudaBackend::new(0)?)?;
    model.backend().prepare_attention(model.spec().head_dim)?;
    r.line(format!("gpu-1b loaded on the GPU in {:.1} s", t.elapsed().as_secs_f64()));
    Ok(model)
}

// ---------------------------------------------------------------------------------------------
// 1. Kernels against the CPU backend.

/// Random values, rounded to bf16 so that both backends start from identical inputs.
fn random_bf16(rng: &mut SplitMix, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| bf16_value(bf16_bits(rng.uniform() * scale))).collect()
}

fn random_f32(rng: &mut SplitMix, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.uniform() * scale).collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| bf16_bits(x).to_le_bytes()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn batch_of(lens: &[usize], rng: &mut SplitMix, vocab: u64) -> Res<PackedBatch> {
    let seqs: Vec<Vec<u32>> = lens.iter().map(|&n| (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect()).collect();
    Ok(PackedBatch::from_sequences(&seqs)?)
}

fn ops(r: &mut Report, gpu: &CudaBackend, cpu: &CpuBackend) -> Res<()> {
    // A seed from the clock: every run draws fresh inputs (printed, to replay a failure).
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64;
    let mut rng = SplitMix::new(seed);
    r.line(format!("\n## Kernels against the CPU backend (seed {seed})"));
    r.line("| op | error | tolerance | |");
    r.line("|---|---|---|---|");

    // Embedding: bf16 table rows widened to f32, exact.
    {
        let (vocab, h) = (1000, 2048);
        let table = random_bf16(&mut rng, vocab * h, 1.0);
        let bytes = bf16_bytes(&table);
        let shape = [vocab, h];
        let view = TensorView::new("embed", Dtype::BF16, &shape, &bytes);
        let tokens: Vec<u32> = (0..300).map(|_| (rng.next_u64() % vocab as u64) as u32).collect();
        // 1 (every family) and Gemma 2's scale (sqrt(4608) in bf16): one f32 product on both sides.
        for scale in [1.0f32, 68.0] {
            let g = gpu.to_host(&gpu.embed(&gpu.embedding(view, scale)?, &tokens)?)?;
            let c = cpu.to_host(&cpu.embed(&cpu.embedding(view, scale)?, &tokens)?)?;
            r.check(&format!("embed 300 tokens, hidden 2048, scale {scale}"), &g, &c, 0.0);
        }
    }

    // Norms: plain (bf16 out), final (f32 out), fused with the residual add.
    for (kind, h, rows) in
        [(NormKind::LayerNorm1P, 2048, 77), (NormKind::RmsNorm, 1000, 5), (NormKind::LayerNorm1P, 64, 300)]
    {
        let (pg, pc) = random_norm(gpu, cpu, &mut rng, kind, h)?;
        // An offset mean makes LayerNorm's subtraction matter.
        let x: Vec<f32> = random_f32(&mut rng, rows * h, 3.0).iter().map(|v| v + 1.5).collect();
        let (xg, xc) = (gpu.upload(&x, rows, h)?, cpu.upload(&x, rows, h)?);
        let want = cpu.to_host(&cpu.norm(&xc, &pc)?)?;
        let what = format!("{kind:?} [{rows}, {h}]");
        r.check(&format!("norm {what} -> bf16"), &gpu.to_host(&gpu.norm(&xg, &pg)?)?, &want, 1e-2);
        r.check(&format!("final norm {what} -> f32"), &gpu.to_host(&gpu.final_norm(&xg, &pg)?)?, &want, 1e-4);

        let delta = random_bf16(&mut rng, rows * h, 2.0);
        let (mut xg2, mut xc2) = (gpu.upload(&x, rows, h)?, cpu.upload(&x, rows, h)?);
        let dg = gpu.upload_bf16(&delta, rows, h)?;
        let dc = cpu.upload(&delta, rows, h)?;
        let og = gpu.to_host(&gpu.add_norm(&mut xg2, &dg, &pg)?)?;
        let oc = cpu.to_host(&cpu.add_norm(&mut xc2, &dc, &pc)?)?;
        r.check(&format!("add_norm {what} -> bf16"), &og, &oc, 1e-2);
        r.check(&format!("add_norm {what}: residual x += delta"), &gpu.to_host(&xg2)?, &cpu.to_host(&xc2)?, 1e-6);
        gpu.add(&mut xg2, &dg)?;
        cpu.add(&mut xc2, &dc)?;
        r.check(&format!("add [{rows}, {h}]"), &gpu.to_host(&xg2)?, &cpu.to_host(&xc2)?, 1e-6);
    }

    // GEMMs, including the golden fixtures' tiny shapes and gpu-1b's.
    for (t, n, k) in [(1, 64, 64), (9, 192, 64), (77, 3072, 2048), (513, 2048, 8192), (300, 16384, 2048), (64, 8, 16)] {
        let w = random_bf16(&mut rng, n * k, 1.0 / (k as f32).sqrt());
        let wb = bf16_bytes(&w);
        let shape = [n, k];
        let view = TensorView::new("w", Dtype::BF16, &shape, &wb);
        let x = random_bf16(&mut rng, t * k, 1.0);
        let yg = gpu.matmul(&gpu.upload_bf16(&x, t, k)?, &gpu.matrix(&[MatrixPart::whole(view)])?)?;
        let yc = cpu.matmul(&cpu.upload(&x, t, k)?, &cpu.matrix(&[MatrixPart::whole(view)])?)?;
        r.check(&format!("matmul [{t}, {k}] x [{n}, {k}]^T"), &gpu.to_host(&yg)?, &cpu.to_host(&yc)?, 2e-2);
    }
    // Stacked parts with a column block (how tensor-parallel ranks load their slices).
    {
        let (n1, n2, k, t) = (96, 32, 256, 40);
        let a = random_bf16(&mut rng, n1 * k, 0.1);
        let b = random_bf16(&mut rng, n2 * k, 0.1);
        let (ab, bb) = (bf16_bytes(&a), bf16_bytes(&b));
        let (sa, sb) = ([n1, k], [n2, k]);
        let parts = [
            MatrixPart::block(TensorView::new("a", Dtype::BF16, &sa, &ab), 8..72, 64..192),
            MatrixPart::block(TensorView::new("b", Dtype::BF16, &sb, &bb), 0..32, 0..128),
        ];
        let x = random_bf16(&mut rng, t * 128, 1.0);
        let yg = gpu.matmul(&gpu.upload_bf16(&x, t, 128)?, &gpu.matrix(&parts)?)?;
        let yc = cpu.matmul(&cpu.upload(&x, t, 128)?, &cpu.matrix(&parts)?)?;
        r.check("matmul of stacked row/column blocks", &gpu.to_host(&yg)?, &cpu.to_host(&yc)?, 2e-2);
    }

    // RoPE and attention on packed batches with partial tiles, GQA and every head size class.
    let llama3 = Some(Llama3Scaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64.0,
    });
    let lens = [1usize, 63, 64, 65, 300, 17, 2, 130];
    for (heads, kv, d, rot, scaling) in [
        (16, 4, 128, 64, None),
        (8, 4, 8, 8, llama3),
        (4, 4, 16, 8, None),
        (4, 1, 64, 64, None),
        (2, 2, 80, 40, None),
        (6, 2, 192, 96, None),
        (2, 1, 256, 256, llama3),
        (3, 3, 1, 0, None),
    ] {
        let layout = AttnLayout {
            heads,
            kv_heads: kv,
            head_dim: d,
            rotary_dim: rot,
            scale: 1.0 / (d as f32).sqrt(),
            softcap: None,
            window: None,
        };
        let inv = rope::inv_freq(&RopeSpec { theta: 10000.0, rotary_dim: rot, llama3: scaling });
        let batch = batch_of(&lens, &mut rng, 100)?;
        let (ctx_g, ctx_c) = (gpu.batch_ctx(&batch, &inv)?, cpu.batch_ctx(&batch, &inv)?);
        let t = batch.tokens().len();
        let w = layout.qkv_width();
        let qkv = random_bf16(&mut rng, t * w, 2.0);
        let (mut qg, mut qc) = (gpu.upload_bf16(&qkv, t, w)?, cpu.upload(&qkv, t, w)?);
        let what = format!("{heads}/{kv} heads, d {d}");
        if rot > 0 {
            gpu.rope(&mut qg, &layout, &ctx_g)?;
            cpu.rope(&mut qc, &layout, &ctx_c)?;
            let scale = if scaling.is_some() { ", llama3" } else { "" };
            r.check(&format!("rope {what}, rotary {rot}{scale}"), &gpu.to_host(&qg)?, &cpu.to_host(&qc)?, 1e-2);
        }
        // Attention starts from identical (bf16) inputs on both sides.
        let q = gpu.to_host(&qg)?;
        let (qg, qc) = (gpu.upload_bf16(&q, t, w)?, cpu.upload(&q, t, w)?);
        let ag = gpu.to_host(&gpu.attention(&qg, &layout, &ctx_g)?)?;
        let ac = cpu.to_host(&cpu.attention(&qc, &layout, &ctx_c)?)?;
        r.check(&format!("attention {what}, lengths {lens:?}"), &ag, &ac, 2e-2);
    }

    // MLP activations.
    for (kind, rows, cols) in [
        (Activation::Relu2, 100, 8192),
        (Activation::SwiGlu, 70, 2000),
        (Activation::SwiGlu, 3, 600),
        (Activation::Relu, 5, 8192),
        (Activation::GeGlu, 70, 2000),
    ] {
        let x = random_bf16(&mut rng, rows * cols, 4.0);
        let g = gpu.to_host(&gpu.activation(&gpu.upload_bf16(&x, rows, cols)?, kind)?)?;
        let c = cpu.to_host(&cpu.activation(&cpu.upload(&x, rows, cols)?, kind)?)?;
        r.check(&format!("{kind:?} [{rows}, {cols}]"), &g, &c, 1e-2);
    }

    // Last-token gather, host round trips.
    {
        let (rows, cols) = (500, 2048);
        let x = random_f32(&mut rng, rows * cols, 5.0);
        let pick = [499usize, 0, 17, 17, 250];
        let g = gpu.to_host(&gpu.gather_rows(&gpu.upload(&x, rows, cols)?, &pick)?)?;
        let c = cpu.to_host(&cpu.gather_rows(&cpu.upload(&x, rows, cols)?, &pick)?)?;
        r.check("gather_rows 5 of [500, 2048]", &g, &c, 0.0);
        let mut tb = gpu.upload_bf16(&x, rows, cols)?;
        let y = random_bf16(&mut rng, rows * cols, 3.0);
        tb.write_host(&y)?;
        r.check("bf16 tensor write_host / read_host", &tb.read_host()?, &y, 0.0);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. NCCL.

/// Never stops the check: every NCCL error is a FAIL of its own step (a missing or mismatched
/// libnccl must not cost the other sections' results).
fn nccl(r: &mut Report, gpu: &CudaBackend) {
    use arbiter_engine::cuda::nccl::{unique_id, NcclComm};
    use arbiter_engine::cuda::probe::CudaLibrary;
    r.line("\n## NCCL on one GPU");
    if !CudaLibrary::Nccl.is_present() {
        r.line("SKIPPED: libnccl.so not found by the loader (not counted as passed)");
        return;
    }
    r.line("| check | error | tolerance | |");
    r.line("|---|---|---|---|");
    if let Err(e) = nccl_one_rank(r, gpu) {
        r.fail(format!("NCCL one-rank all-reduce: {e}"));
    }
    let id = match unique_id() {
        Ok(id) => id,
        Err(e) => {
            r.fail(format!("NCCL unique id for the join without peer: {e}"));
            return;
        }
    };
    let t = Instant::now();
    let lonely = NcclComm::new(gpu, &id, 0, 2, Duration::from_secs(3));
    let waited = t.elapsed().as_secs_f64();
    let ok = matches!(&lonely, Err(e) if e.to_string().contains("waited")) && waited < 10.0;
    r.line(format!(
        "| join of 2 ranks with no peer: error after {waited:.1} s (timeout 3 s) | - | - | {} |",
        if ok { "ok" } else { "FAIL" }
    ));
    if !ok {
        r.failures.push(format!("NCCL join without peer: {:?} after {waited:.1} s", lonely.map(|_| ())));
    }
}

/// A one-rank all-reduce in bf16 and f32: the identity.
fn nccl_one_rank(r: &mut Report, gpu: &CudaBackend) -> Res<()> {
    use arbiter_engine::backend::Communicator;
    use arbiter_engine::cuda::nccl::NcclComm;
    let comms = NcclComm::local_group(&[gpu], Duration::from_secs(30))?;
    let comm = comms.first().ok_or("NCCL local_group of one GPU returned no communicator")?;
    let mut rng = SplitMix::new(5);
    let v = random_bf16(&mut rng, 3 * 1000, 1.0);
    let mut tb = gpu.upload_bf16(&v, 3, 1000)?;
    let mut tf = gpu.upload(&v, 3, 1000)?;
    comm.all_reduce(&mut tb)?;
    comm.all_reduce(&mut tf)?;
    r.check("one-rank all-reduce, bf16 (identity)", &tb.read_host()?, &v, 0.0);
    r.check("one-rank all-reduce, f32 (identity)", &tf.read_host()?, &v, 0.0);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Golden fixtures.

struct Golden {
    sequences: Vec<Vec<u32>>,
    outputs: Vec<Vec<f32>>,
}

fn read_golden(dir: &Path) -> Res<Golden> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
    let list = |key: &str| -> Res<Vec<Vec<f64>>> {
        let a = v[key].as_array().ok_or_else(|| format!("{}: no {key:?} array", dir.display()))?;
        Ok(a.iter()
            .map(|s| s.as_array().map(|x| x.iter().filter_map(|t| t.as_f64()).collect()).unwrap_or_default())
            .collect())
    };
    Ok(Golden {
        sequences: list("sequences")?.into_iter().map(|s| s.into_iter().map(|t| t as u32).collect()).collect(),
        outputs: list("outputs")?.into_iter().map(|s| s.into_iter().map(|t| t as f32).collect()).collect(),
    })
}

/// Indices of `rewards` from highest to lowest.
fn ranking(rewards: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..rewards.len()).collect();
    idx.sort_by(|&a, &b| rewards[b].total_cmp(&rewards[a]));
    idx
}

fn golden(r: &mut Report, fixtures: &Path) -> Res<()> {
    r.line("\n## Golden fixtures: CUDA against transformers fp32 and the CPU backend in bf16 precision");
    // Judged in units of the fixture's output scale (its largest |output|): the CPU in bf16
    // precision, which rounds where the GPU does, reads up to 6e-2 per sequence on these random
    // fixtures but within 1e-2 of that scale (docs/cuda.md). The per-sequence figure is printed.
    r.line("| fixture / check | error | tolerance | |");
    r.line("|---|---|---|---|");
    let mut names: Vec<PathBuf> = std::fs::read_dir(fixtures)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("expected.json").exists())
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(format!("no fixtures under {}", fixtures.display()).into());
    }
    for dir in names {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let g = read_golden(&dir)?;
        let gm = Model::load(&dir, CudaBackend::new(0)?)?;
        let cm = Model::load(&dir, CpuBackend::new().with_precision(Precision::Bf16))?;
        let head = gm.spec().head.clone();
        let weights = RewardWeights::defaults(&head);
        let mut alone = Vec::new();
        let (mut worst_ref, mut worst_cpu) = (0.0f64, 0.0f64);
        let (mut per_seq_ref, mut per_seq_cpu) = (0.0f64, 0.0f64);
        let scale = g.outputs.iter().flatten().fold(1e-3f64, |m, v| m.max(v.abs() as f64));
        for (seq, reference) in g.sequences.iter().zip(&g.outputs) {
            // Read where transformers reads (before trailing pad tokens, see llama-pad-end).
            let mut batch = PackedBatch::from_sequences(&[seq])?;
            batch.read_as_model(gm.spec())?;
            let got = gm.forward(&batch)?.remove(0);
            let on_cpu = cm.forward(&batch)?.remove(0);
            if got.iter().any(|v| !v.is_finite()) {
                r.failures.push(format!("{name}: non-finite output for a sequence of {}", seq.len()));
            }
            per_seq_ref = per_seq_ref.max(rel_error(&got, reference));
            per_seq_cpu = per_seq_cpu.max(rel_error(&got, &on_cpu));
            worst_ref = worst_ref.max(max_diff(&got, reference) / scale);
            worst_cpu = worst_cpu.max(max_diff(&got, &on_cpu) / scale);
            alone.push(got);
        }
        let verdict = |e: f64| if e <= 2e-2 { "ok" } else { "FAIL" };
        r.line(format!(
            "| {name}: vs transformers, worst / output scale (per sequence {per_seq_ref:.2e}) | {worst_ref:.2e} | 2e-2 | {} |",
            verdict(worst_ref)
        ));
        r.line(format!(
            "| {name}: vs CPU bf16 precision, worst / output scale (per sequence {per_seq_cpu:.2e}) | {worst_cpu:.2e} | 2e-2 | {} |",
            verdict(worst_cpu)
        ));
        if worst_ref > 2e-2 || worst_cpu > 2e-2 {
            r.failures.push(format!("{name}: error vs transformers {worst_ref:.3e}, vs CPU {worst_cpu:.3e}"));
        }
        let reward = |raw: &Vec<f32>| Score::from_raw(&head, raw.clone(), &weights).reward;
        let want = ranking(&g.outputs.iter().map(reward).collect::<Vec<_>>());
        let got = ranking(&alone.iter().map(reward).collect::<Vec<_>>());
        let same = want == got;
        r.line(format!(
            "| {name}: reward ranking of {} sequences | {} | identical | {} |",
            want.len(),
            if same { "same" } else { "differs" },
            if same { "ok" } else { "FAIL" }
        ));
        if !same {
            r.failures.push(format!("{name}: ranking {got:?}, transformers {want:?}"));
        }
        // Batch invariance is a goal on GPU, not a requirement: reported only.
        let mut all = PackedBatch::from_sequences(&g.sequences)?;
        all.read_as_model(gm.spec())?;
        let packed = gm.forward(&all)?;
        let differing = packed
            .iter()
            .zip(&alone)
            .filter(|(p, a)| p.iter().map(|v| v.to_bits()).ne(a.iter().map(|v| v.to_bits())))
            .count();
        let worst_pack = packed.iter().zip(&alone).map(|(p, a)| rel_error(p, a)).fold(0.0, f64::max);
        r.line(format!(
            "| {name}: packed batch vs alone (batch invariance, reported) | {worst_pack:.2e} | - | {} of {} sequences bit-identical |",
            alone.len() - differing,
            alone.len()
        ));
    }
    Ok(())
}

/// bench-small on the GPU: the CPU benchmark's model and batch shape (docs/bench-cpu.md).
fn bench_small(r: &mut Report, work: &Path) -> Res<serde_json::Value> {
    let dir = work.join("bench-small");
    if !dir.join("model.safetensors").exists() {
        write_random_model(&dir, &arbiter_engine::synth::bench_small_config(), Dtype::F32, 7, true)?;
    }
    let model = Model::load(&dir, CudaBackend::new(0)?)?;
    let mut rng = SplitMix::new(3);
    let seqs: Vec<Vec<u32>> = (0..8).map(|_| (0..256).map(|_| (rng.next_u64() % 32000) as u32).collect()).collect();
    let batch = PackedBatch::from_sequences(&seqs)?;
    for _ in 0..2 {
        model.forward(&batch)?;
    }
    let mut times = Vec::new();
    for _ in 0..9 {
        let t = Instant::now();
        model.forward(&batch)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    r.line(format!(
        "\nbench-small (8 x 256 tokens, f32 checkpoint run in bf16): median {median:.4} s, {:.0} tokens/s",
        2048.0 / median
    ));
    Ok(json!({ "median_s": median, "tokens_per_s": 2048.0 / median }))
}

// ---------------------------------------------------------------------------------------------
// 3. gpu-1b scores for the transformers comparison.

/// Lengths of the sequences scored for the accuracy comparison.
const GPU1B_LENGTHS: [usize; 8] = [5, 37, 128, 300, 511, 1024, 1500, 2048];

fn gpu1b_scores(r: &mut Report, model: &Model<CudaBackend>) -> Res<serde_json::Value> {
    let mut rng = SplitMix::new(11);
    let vocab = model.spec().vocab as u64;
    let seqs: Vec<Vec<u32>> =
        GPU1B_LENGTHS.iter().map(|&n| (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect()).collect();
    let alone: Vec<f32> =
        seqs.iter().map(|s| Ok(model.forward(&PackedBatch::from_sequences(&[s])?)?[0][0])).collect::<Res<_>>()?;
    let packed: Vec<f32> = model.forward(&PackedBatch::from_sequences(&seqs)?)?.into_iter().map(|v| v[0]).collect();
    if alone.iter().chain(&packed).any(|v| !v.is_finite()) {
        r.failures.push("gpu-1b: non-finite score".into());
    }
    r.line(format!("gpu-1b scores (alone): {alone:?}"));
    r.line(format!("gpu-1b scores (packed): {packed:?}; error packed vs alone {:.2e}", rel_error(&packed, &alone)));
    Ok(json!({ "sequences": seqs, "alone": alone, "packed": packed }))
}

// ---------------------------------------------------------------------------------------------
// 4. Throughput.

/// Sequence lengths uniform in 32..=2048 drawn with `seed` until `tokens` are reached; the last
/// sequence is cut to land exactly on `tokens`.
fn draw_lengths(tokens: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix::new(seed);
    let mut lens = Vec::new();
    let mut total = 0;
    while total < tokens {
        let n = (32 + rng.next_u64() % (2048 - 32 + 1)) as usize;
        let n = n.min(tokens - total);
        lens.push(n);
        total += n;
    }
    lens
}

fn throughput(r: &mut Report, model: &Model<CudaBackend>) -> Res<serde_json::Value> {
    let spec = model.spec().clone();
    let gpu = model.backend();
    let non_embedding: usize = tensor_shapes(&spec)
        .iter()
        .filter(|(name, _)| !name.contains("embed_tokens"))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let ceiling_s = gpu.time_gemm(8192, 8192, 8192, 10)?;
    let ceiling = 2.0 * 8192f64.powi(3) / ceiling_s / 1e12;
    r.line(format!("\n## Throughput on gpu-1b ({} non-embedding parameters, {})", non_embedding, gpu.device_name()));
    r.line(format!("cuBLASLt bf16 GEMM ceiling (8192^3, median of 10): {ceiling:.0} TFLOP/s"));
    r.line("| tokens | sequences | median s | tokens/s | TFLOP/s | % of ceiling | model GEMMs alone TFLOP/s | attention alone: TFLOP/s, share of forward |");
    r.line("|---|---|---|---|---|---|---|---|");
    let layout = AttnLayout {
        heads: spec.heads,
        kv_heads: spec.kv_heads,
        head_dim: spec.head_dim,
        rotary_dim: spec.rope.rotary_dim,
        scale: 1.0 / (spec.head_dim as f32).sqrt(),
        softcap: None,
        window: None,
    };
    let inv_freq = rope::inv_freq(&spec.rope);
    let mut rows = Vec::new();
    let vocab = spec.vocab as u64;
    for target in [2048usize, 8192, 16384] {
        let lens = draw_lengths(target, 0);
        let mut rng = SplitMix::new(target as u64);
        let seqs: Vec<Vec<u32>> =
            lens.iter().map(|&n| (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect()).collect();
        let batch = PackedBatch::from_sequences(&seqs)?;
        for _ in 0..2 {
            model.forward(&batch)?;
        }
        let mut times = Vec::new();
        for _ in 0..7 {
            let t = Instant::now();
            model.forward(&batch)?; // ends with a device-to-host copy: the GPU is done
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let sum_sq: f64 = lens.iter().map(|&n| (n * n) as f64).sum();
        let flops = 2.0 * non_embedding as f64 * target as f64
            + 2.0 * spec.layers as f64 * sum_sq * spec.heads as f64 * spec.head_dim as f64;
        let tflops = flops / median / 1e12;
        // The four GEMMs of a layer at this token count, through the same cuBLASLt path.
        let (h, d) = (spec.hidden, spec.head_dim);
        let shapes = [(spec.qkv_width(), h), (h, spec.heads * d), (spec.up_width(), h), (h, spec.ffn)];
        let mut gemm_s = 0.0;
        let mut gemm_flops = 0.0;
        for (n, k) in shapes {
            gemm_s += gpu.time_gemm(target, n, k, 5)? * spec.layers as f64;
            gemm_flops += 2.0 * (target * n * k) as f64 * spec.layers as f64;
        }
        let gemm_tflops = gemm_flops / gemm_s / 1e12;
        // One layer's attention on random q/k/v of this batch, timed alone (median of 5).
        let ctx = gpu.batch_ctx(&batch, &inv_freq)?;
        let qkv =
            gpu.upload_bf16(&random_bf16(&mut rng, target * layout.qkv_width(), 2.0), target, layout.qkv_width())?;
        gpu.attention(&qkv, &layout, &ctx)?;
        gpu.synchronize()?;
        let mut attn_times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            gpu.attention(&qkv, &layout, &ctx)?;
            gpu.synchronize()?;
            attn_times.push(t.elapsed().as_secs_f64());
        }
        attn_times.sort_by(f64::total_cmp);
        let attn_s = attn_times[2];
        let attn_tflops = 2.0 * sum_sq * (spec.heads * spec.head_dim) as f64 / attn_s / 1e12;
        let attn_share = attn_s * spec.layers as f64 / median;
        r.line(format!(
            "| {target} | {} | {median:.4} | {:.0} | {tflops:.0} | {:.0}% | {gemm_tflops:.0} | {attn_tflops:.0}, {:.0}% |",
            lens.len(),
            target as f64 / median,
            100.0 * tflops / ceiling,
            100.0 * attn_share
        ));
        rows.push(json!({
            "tokens": target, "lengths": lens, "sequences": seqs, "median_s": median, "times_s": times,
            "tokens_per_s": target as f64 / median, "flops": flops, "tflops": tflops,
            "gemm_only_tflops": gemm_tflops, "attention_layer_s": attn_s, "attention_tflops": attn_tflops,
            "attention_share": attn_share,
        }));
    }
    Ok(json!({ "ceiling_tflops": ceiling, "non_embedding_params": non_embedding, "batches": rows }))
}

// ---------------------------------------------------------------------------------------------
// 5. Model parallelism on one GPU.

/// Assumed NVLink bandwidth per GPU and direction for the 8-GPU projection (H100/H200 SXM:
/// NVLink 4, 900 GB/s bidirectional).
const NVLINK_BYTES_PER_S: f64 = 450e9;

fn cuda_rank(head_dim: usize) -> impl Fn(&RankPlan) -> arbiter_engine::Result<CudaBackend> + Send + Sync + 'static {
    move |_| {
        let b = CudaBackend::new(0)?;
        b.prepare_attention(head_dim)?;
        Ok(b)
    }
}

fn parallel(r: &mut Report, fixtures: &Path, work: &Path) -> Res<serde_json::Value> {
    r.line("\n## Model parallelism on one GPU: split layouts against TP=1 (in-process communicator)");
    r.line("| layout / check | error | tolerance | |");
    r.line("|---|---|---|---|");
    let dir = fixtures.join("nemotron-v4-gqa");
    let g = read_golden(&dir)?;
    let one = Model::load(&dir, CudaBackend::new(0)?)?;
    let head_dim = one.spec().head_dim;
    one.backend().prepare_attention(head_dim)?;
    let batch = PackedBatch::from_sequences(&g.sequences)?;
    let want = one.forward(&batch)?;
    for (tp, pp) in [(2, 1), (2, 2)] {
        let par = Parallelism { tp, pp };
        let engine = ParallelEngine::load(&dir, par, Duration::from_secs(60), cuda_rank(head_dim))?;
        let got = engine.forward(&batch)?;
        let worst =
            (0..want.len()).max_by(|&a, &b| rel_error(&got[a], &want[a]).total_cmp(&rel_error(&got[b], &want[b])));
        let i = worst.ok_or("the fixture has no sequences")?;
        r.check(&format!("nemotron-v4-gqa tp{tp} pp{pp}: worst sequence vs tp1"), &got[i], &want[i], 2e-2);
    }

    let gpu = CudaBackend::new(0)?;
    let ceiling = 2.0 * 8192f64.powi(3) / gpu.time_gemm(8192, 8192, 8192, 10)? / 1e12;
    let dir = work.join("340b-rank");
    let layers = 4;
    if !dir.join("model.safetensors").exists() {
        write_random_model(&dir, &nemotron_340b_rank_config(layers), Dtype::BF16, 11, true)?;
    }
    let model = Model::load(&dir, CudaBackend::new(0)?)?;
    let spec = model.spec().clone();
    model.backend().prepare_attention(spec.head_dim)?;
    let non_embedding: usize = tensor_shapes(&spec)
        .iter()
        .filter(|(name, _)| !name.contains("embed_tokens"))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    r.line(format!(
        "\n## 340B at TP=8, one rank's shape ({layers} layers: hidden 18432, 12 query heads + 1 KV head of dim 192, FFN 9216; {non_embedding} parameters)"
    ));
    r.line(format!("cuBLASLt bf16 GEMM ceiling (8192^3): {ceiling:.0} TFLOP/s. Projection: 96 layers = {}x this, plus 2 all-reduces of tokens x 18432 bf16 per layer, ring over 8 GPUs at an assumed {:.0} GB/s NVLink per direction, not overlapped.", 96 / layers, NVLINK_BYTES_PER_S / 1e9));
    r.line("| tokens | median s (4 layers) | TFLOP/s | % of ceiling | projected 340B s per batch (compute + all-reduce) | projected 340B tokens/s on 8 GPUs |");
    r.line("|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for target in [8192usize, 16384] {
        let lens = draw_lengths(target, 0);
        let mut rng = SplitMix::new(target as u64);
        let seqs: Vec<Vec<u32>> =
            lens.iter().map(|&n| (0..n).map(|_| (rng.next_u64() % 256) as u32).collect()).collect();
        let batch = PackedBatch::from_sequences(&seqs)?;
        model.forward(&batch)?;
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            model.forward(&batch)?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let median = times[2];
        let sum_sq: f64 = lens.iter().map(|&n| (n * n) as f64).sum();
        let flops = 2.0 * non_embedding as f64 * target as f64
            + 2.0 * layers as f64 * sum_sq * spec.heads as f64 * spec.head_dim as f64;
        let tflops = flops / median / 1e12;
        let compute_96 = median * (96 / layers) as f64;
        let allreduce_bytes = (target * 18432 * 2) as f64;
        let one_allreduce = 2.0 * 7.0 / 8.0 * allreduce_bytes / NVLINK_BYTES_PER_S;
        let total = compute_96 + 2.0 * 96.0 * one_allreduce;
        r.line(format!(
            "| {target} | {median:.4} | {tflops:.0} | {:.0}% | {total:.3} ({compute_96:.3} + {:.3}) | {:.0} |",
            100.0 * tflops / ceiling,
            2.0 * 96.0 * one_allreduce,
            target as f64 / total
        ));
        rows.push(json!({
            "tokens": target, "median_s": median, "tflops": tflops, "fraction_of_ceiling": tflops / ceiling,
            "projected_batch_s": total, "projected_tokens_per_s": target as f64 / total,
        }));
    }
    Ok(json!({ "ceiling_tflops": ceiling, "nvlink_bytes_per_s": NVLINK_BYTES_PER_S, "rank_shape": rows }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_fill_the_budget_within_range() {
        for tokens in [2048, 8192, 16384] {
            let lens = draw_lengths(tokens, 0);
            assert_eq!(lens.iter().sum::<usize>(), tokens);
            assert!(lens[..lens.len() - 1].iter().all(|&n| (32..=2048).contains(&n)), "{lens:?}");
            assert_eq!(lens, draw_lengths(tokens, 0), "seeded");
        }
    }

    #[test]
    fn a_failed_or_panicking_section_is_a_fail_and_the_results_are_still_written() {
        let tmp = tempfile::tempdir().unwrap();
        let mut ck = Check { r: Report::default(), results: serde_json::Map::new(), out: tmp.path().into() };
        let got: Option<()> = ck.section("nccl", |_| Err("libnccl.so: undefined symbol".into()));
        assert!(got.is_none());
        let read = || -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(tmp.path().join("rust-results.json")).unwrap()).unwrap()
        };
        assert_eq!(read()["failures"], json!(["section nccl stopped: libnccl.so: undefined symbol"]));

        let got: Option<u32> = ck.section("golden", |_| panic!("index out of bounds"));
        assert!(got.is_none());
        assert_eq!(read()["failures"][1], json!("section golden panicked: index out of bounds"));

        let got = ck.section("bench-small", |r| {
            r.line("bench-small ran");
            Ok(json!({ "tokens_per_s": 1.0 }))
        });
        ck.keep("bench_small", got.unwrap());
        ck.save().unwrap();
        assert_eq!(read()["bench_small"]["tokens_per_s"], json!(1.0));
        let report = std::fs::read_to_string(tmp.path().join("rust-report.md")).unwrap();
        assert!(report.contains("FAIL: section nccl stopped") && report.contains("bench-small ran"), "{report}");
    }

    #[test]
    fn ranking_orders_by_descending_reward() {
        assert_eq!(ranking(&[0.5, 2.0, -1.0]), vec![1, 0, 2]);
    }
}
