//! Benchmark program (not a test): tokens/s of the CPU backend on "bench-small", and the GEMM
//! throughput of its matrix shapes. Compare with `tests/fixtures/bench_hf.py` run side by side
//! (`scripts/bench-cpu.sh` runs both and prints the ratio).
//!
//! cargo run --release -p arbiter-engine --example bench_small -- [--iters N] [--threads N] [--dtype f32|bf16] [--precision f32|bf16]
//!
//! `--dtype` is the stored weights' type; `--precision` what the CPU backend computes in (bf16:
//! bf16 weights, activations rounded where the GPU rounds them). The last line,
//! `ARBITER_TOKENS_PER_S`, is what scripts/bench-cpu.sh reads.

use std::time::Instant;

use arbiter_engine::cpu::gemm::{matmul, PackedMatrix};
use arbiter_engine::cpu::precision::bf16_bits;
use arbiter_engine::cpu::{CpuBackend, Precision};
use arbiter_engine::synth::{bench_small_config, write_random_model, SplitMix};
use arbiter_engine::weights::Dtype;
use arbiter_engine::{Model, PackedBatch};

// The test support's decorator, compiled into this example only.
#[path = "../tests/common/instrumented.rs"]
#[allow(dead_code)]
mod instrumented;
use instrumented::Instrumented;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iters: usize = arg("--iters", "5").parse()?;
    let threads: usize = arg("--threads", "0").parse()?;
    let dtype = match arg("--dtype", "f32").as_str() {
        "f32" => Dtype::F32,
        "bf16" => Dtype::BF16,
        other => return Err(format!("--dtype {other}: expected f32 or bf16").into()),
    };
    let precision: Precision = arg("--precision", "f32").parse()?;
    let backend = CpuBackend::with_threads(threads)?.with_precision(precision);
    let threads = backend.threads();

    println!("## GEMM y[m,n] = x[m,k] @ w[n,k]^T, {precision}, {threads} threads");
    println!("| m | n | k | ms | GFLOP/s |");
    println!("|---|---|---|---|---|");
    let mut rng = SplitMix::new(1);
    for &(m, n, k) in &[(2048, 1536, 1024), (2048, 1024, 1024), (2048, 4096, 1024), (2048, 1024, 4096)] {
        let w: Vec<f32> = (0..n * k).map(|_| rng.uniform()).collect();
        let x: Vec<f32> = (0..m * k).map(|_| rng.uniform()).collect();
        let packed = match precision {
            Precision::F32 => PackedMatrix::pack(&w, n, k),
            Precision::Bf16 => PackedMatrix::pack_bf16(&w.iter().map(|&v| bf16_bits(v)).collect::<Vec<_>>(), n, k),
        };
        let mut y = vec![0.0; m * n];
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
        pool.install(|| matmul(&x, m, &packed, &mut y));
        let reps = 5;
        let t = Instant::now();
        for _ in 0..reps {
            pool.install(|| matmul(&x, m, &packed, &mut y));
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!("| {m} | {n} | {k} | {:.1} | {:.1} |", s * 1e3, 2.0 * (m * n * k) as f64 / s / 1e9);
    }

    let dir = std::env::temp_dir().join(format!("arbiter-bench-small-{}", std::process::id()));
    write_random_model(&dir, &bench_small_config(), dtype, 7, true)?;
    let model = Model::load(&dir, Instrumented::new(backend))?;
    let seqs: Vec<Vec<u32>> = (0..8).map(|_| (0..256).map(|_| (rng.next_u64() % 32000) as u32).collect()).collect();
    let batch = PackedBatch::from_sequences(&seqs)?;
    model.forward(&batch)?; // warm-up
    model.backend().reset();
    let mut times = Vec::new();
    for _ in 0..iters {
        let t = Instant::now();
        model.forward(&batch)?;
        times.push(t.elapsed().as_secs_f64());
    }
    std::fs::remove_dir_all(&dir).ok();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens = batch.tokens().len();
    println!();
    println!("## bench-small forward (Nemotron, hidden 1024, 8 layers, 16/4 heads, FFN 4096, 8 x 256 tokens)");
    println!("| backend | weights | compute | threads | median s | best s | tokens/s |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| arbiter cpu | {:?} | {precision} | {threads} | {median:.3} | {:.3} | {:.0} |",
        dtype,
        times[0],
        tokens as f64 / median
    );
    println!();
    println!("## where the forward time goes ({iters} forwards, backend calls timed one by one)");
    println!("| op | calls per forward | ms per forward | % of forward |");
    println!("|---|---|---|---|");
    let total: f64 = times.iter().sum();
    let mut ops: Vec<_> = model.backend().stats().into_iter().collect();
    ops.sort_by_key(|(_, s)| std::cmp::Reverse(s.time));
    for (op, s) in &ops {
        let ms = s.time.as_secs_f64() * 1e3 / iters as f64;
        println!("| {op} | {} | {ms:.1} | {:.1} |", s.calls / iters, 100.0 * s.time.as_secs_f64() / total);
    }
    let in_ops: f64 = ops.iter().map(|(_, s)| s.time.as_secs_f64()).sum();
    println!(
        "| (graph, outside backend calls) | | {:.1} | {:.1} |",
        (total - in_ops) * 1e3 / iters as f64,
        100.0 * (total - in_ops) / total
    );
    println!("ARBITER_TOKENS_PER_S {:.1}", tokens as f64 / median);
    Ok(())
}
