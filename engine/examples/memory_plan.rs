//! Prints the memory plan of Nemotron-4-340B-Reward (the tensor list its converted config.json
//! gives) on CUDA ranks at `--max-batch-tokens` 16384: TP=8 in FP8 and in bf16, and bf16 over
//! two nodes (TP=8, PP=2). The tables in docs/fp8.md come from here:
//!
//! ```text
//! cargo run --release -p arbiter-engine --example memory_plan
//! ```

use arbiter_engine::config::parse_config;
use arbiter_engine::fp8::Fp8Scheme;
use arbiter_engine::memory::{plan, Storage};
use arbiter_engine::parallel::Parallelism;
use arbiter_engine::synth::nemotron_340b_config;

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
    Ok(())
}
