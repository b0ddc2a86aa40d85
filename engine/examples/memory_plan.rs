//! Prints the memory plan of Nemotron-4-340B-Reward (the tensor list its converted config.json
//! gives) on CUDA ranks at `--max-batch-tokens` 16384: TP=8 in FP8 and in bf16, and bf16 over
//! two nodes (TP=8, PP=2); then FP8 with some blocks' linear layers kept in bf16 (listed in
//! `quantization_config.ignore`), to show what keeping layers unquantized costs. The tables in
//! docs/fp8.md come from here:
//!
//! ```text
//! cargo run --release -p arbiter-engine --example memory_plan
//! ```

use arbiter_engine::config::parse_config;
use arbiter_engine::fp8::Fp8Scheme;
use arbiter_engine::memory::{plan, Storage};
use arbiter_engine::parallel::Parallelism;
use arbiter_engine::synth::nemotron_340b_config;
use arbiter_engine::tensors::module;

fn main() -> arbiter_engine::Result<()> {
    let tokens = 16384;
    for (what, fp8, tp, pp) in [("FP8", true, 8, 1), ("bf16", false, 8, 1), ("bf16", false, 8, 2)] {
        let mut config = nemotron_340b_config();
        if fp8 {
            config["quantization_config"] = Fp8Scheme::default().to_config();
        }
        let spec = parse_config(&config.to_string(), "nemotron-340b/config.json".as_ref())?;
        let p = plan(&spec, Parallelism { tp, pp }, Storage::CUDA, tokens)?;
        let verdict = match p.check(80_000_000_000, 1, "GPU memory") {
            Ok(()) => format!("fits 80 GB, {:.1} GB headroom", (80e9 - p.max_rank_total() as f64) / 1e9),
            Err(_) => "does NOT fit 80 GB".to_string(),
        };
        println!("Nemotron-4-340B-Reward, {what}, TP={tp} PP={pp}, {tokens} tokens per batch: {verdict}");
        println!("{}", p.table());
    }
    // Blocks kept in bf16: what keeping layers unquantized costs, up to what still fits.
    println!("Nemotron-4-340B-Reward, FP8 with the first N of 96 blocks' linear layers kept bf16, TP=8 PP=1, {tokens} tokens per batch:");
    println!("{:>4} {:>12} {:>12}  verdict", "N", "weights", "total");
    for kept in [0, 4, 16, 48, 56, 57, 84] {
        let mut config = nemotron_340b_config();
        let mut scheme = Fp8Scheme::default();
        for layer in 0..kept {
            scheme.keep_layer(layer, &module::UNGATED_LINEAR);
        }
        config["quantization_config"] = scheme.to_config();
        let spec = parse_config(&config.to_string(), "nemotron-340b/config.json".as_ref())?;
        let p = plan(&spec, Parallelism { tp: 8, pp: 1 }, Storage::CUDA, tokens)?;
        let r = &p.ranks[0];
        let verdict = match p.check(80_000_000_000, 1, "GPU memory") {
            Ok(()) => format!("fits 80 GB, {:.1} GB headroom", (80e9 - p.max_rank_total() as f64) / 1e9),
            Err(_) => "does NOT fit 80 GB".to_string(),
        };
        println!("{kept:>4} {:>9.2} GB {:>9.2} GB  {verdict}", r.weights as f64 / 1e9, r.total() as f64 / 1e9);
    }
    Ok(())
}
