//! Benchmark program (not a test): the share of a two-layer reward head (INF-ORM's `score.0`,
//! ReLU, `score.2`) in the forward at hidden 8192, on the CPU backend.
//!
//! Builds a one-block model with Llama-3.1-70B's block shapes (hidden 8192, 64 query / 8 KV heads,
//! FFN 28672) and INF-ORM's head, times whole forwards, and times the head alone as the graph
//! runs it (the hidden layer as one backend GEMM + bias over the read rows, ReLU, the f32 output
//! layer on the host). The 80-block share is computed from the measured block time.
//!
//! cargo run --release -p arbiter-engine --example bench_head -- [--items N] [--tokens N] [--iters N]

use std::time::Instant;

use arbiter_engine::backend::{Activation, Backend, MatrixPart};
use arbiter_engine::cpu::CpuBackend;
use arbiter_engine::synth::{write_random_model, SplitMix};
use arbiter_engine::weights::{Dtype, TensorView};
use arbiter_engine::{Model, PackedBatch};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let items: usize = arg("--items", "8").parse()?;
    let tokens: usize = arg("--tokens", "64").parse()?;
    let iters: usize = arg("--iters", "3").parse()?;
    let hidden = 8192;
    let config = serde_json::json!({
        "architectures": ["INFORMForSequenceClassification"], "hidden_size": hidden,
        "intermediate_size": 28672, "num_hidden_layers": 1, "num_attention_heads": 64,
        "num_key_value_heads": 8, "vocab_size": 1024, "max_position_embeddings": 8192,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0
    });
    let dir = tempfile::tempdir()?;
    eprintln!("writing a one-block hidden-8192 model with a two-layer head to {} ...", dir.path().display());
    write_random_model(dir.path(), &config, Dtype::BF16, 1, true)?;
    let backend = CpuBackend::new();
    let threads = backend.threads();
    let model = Model::load(dir.path(), backend)?;

    let mut rng = SplitMix::new(2);
    let seqs: Vec<Vec<u32>> =
        (0..items).map(|_| (0..tokens).map(|_| (rng.next_u64() % 1024) as u32).collect()).collect();
    let batch = PackedBatch::from_sequences(&seqs)?;
    model.forward(&batch)?; // warm-up
    let t = Instant::now();
    for _ in 0..iters {
        model.forward(&batch)?;
    }
    let forward = t.elapsed().as_secs_f64() / iters as f64;

    // The head as the graph runs it, on the same backend and shapes.
    let cpu = model.backend();
    let values: Vec<f32> = (0..hidden * hidden).map(|_| rng.uniform() / (hidden as f32).sqrt()).collect();
    let (wb, bb): (Vec<u8>, Vec<u8>) = (
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        values[..hidden].iter().flat_map(|v| v.to_le_bytes()).collect(),
    );
    let (ws, bs) = ([hidden, hidden], [hidden]);
    let w = TensorView::new("score.0.weight", Dtype::F32, &ws, &wb);
    let b = TensorView::new("score.0.bias", Dtype::F32, &bs, &bb);
    let layer = cpu.matrix(&[MatrixPart { bias: Some(b), ..MatrixPart::whole(w) }])?;
    let out_w = &values[..hidden];
    let rows: Vec<f32> = (0..items * hidden).map(|_| rng.uniform()).collect();
    let x = cpu.upload(&rows, items, hidden)?;
    let head_once = || -> Result<f32, Box<dyn std::error::Error>> {
        let h = cpu.to_host(&cpu.activation(&cpu.matmul(&x, &layer)?, Activation::Relu)?)?;
        Ok(h.chunks_exact(hidden).map(|r| r.iter().zip(out_w).map(|(a, b)| a * b).sum::<f32>()).sum())
    };
    head_once()?;
    let t = Instant::now();
    let mut sink = 0.0;
    for _ in 0..iters.max(5) {
        sink += head_once()?;
    }
    let head = t.elapsed().as_secs_f64() / iters.max(5) as f64;
    let block = (forward - head).max(0.0);
    let share = |blocks: f64| 100.0 * head / (blocks * block + head);

    println!("## Two-layer head at hidden 8192, CPU backend, {threads} threads (checksum {sink:.3})");
    println!("| items x tokens | forward, 1 block (ms) | head (ms) | head % of 1-block forward | head % of an 80-block forward |");
    println!("|---|---|---|---|---|");
    println!(
        "| {items} x {tokens} | {:.1} | {:.2} | {:.2} | {:.3} |",
        forward * 1e3,
        head * 1e3,
        share(1.0),
        share(80.0)
    );
    Ok(())
}
