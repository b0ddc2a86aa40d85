//! Benchmark program (not a test): shared-prefix scoring on the CPU backend with "bench-small".
//! For each shape (N candidates of L tokens after a P-token prompt) it scores groups with the
//! prompt computed once (sharing on) and with every candidate packed whole (off), alternating in
//! one process, and prints effective tokens/s: the sum of every candidate's full length over the
//! wall time. Both sides pack batches by the same budget of computed tokens.
//!
//! cargo run --release -p arbiter-engine --example bench_shared_prefix -- [--rounds N] [--threads N] [--batch-tokens N]

use std::time::Instant;

use arbiter_engine::cpu::CpuBackend;
use arbiter_engine::synth::{bench_small_config, write_random_model, SplitMix};
use arbiter_engine::weights::Dtype;
use arbiter_engine::{Model, PackedBatch};

type Error = Box<dyn std::error::Error>;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

/// A workload shape: `candidates` answers of `answer` tokens after a `prompt`-token prompt.
struct Shape {
    name: &'static str,
    prompt: usize,
    candidates: usize,
    answer: usize,
    /// Groups scored per measurement (small shapes need several to be measurable).
    groups: usize,
}

/// Packs items (prompt, answers) into batches of at most `budget` computed tokens (always at
/// least one item), sharing the prompt or not.
fn batches(groups: &[(Vec<u32>, Vec<Vec<u32>>)], share: bool, budget: usize) -> Vec<PackedBatch> {
    let (mut out, mut cur, mut used) = (Vec::new(), PackedBatch::new(), 0);
    for (prompt, answers) in groups {
        if share {
            let cost = prompt.len() + answers.iter().map(Vec::len).sum::<usize>();
            if used + cost > budget && !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
                used = 0;
            }
            cur.push_group(prompt, answers).expect("non-empty prompt");
            used += cost;
            continue;
        }
        for a in answers {
            let seq = [prompt.as_slice(), a].concat();
            if used + seq.len() > budget && !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
                used = 0;
            }
            cur.push(&seq).expect("non-empty sequence");
            used += seq.len();
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn main() -> Result<(), Error> {
    let rounds: usize = arg("--rounds", "2").parse()?;
    let threads: usize = arg("--threads", "0").parse()?;
    let budget: usize = arg("--batch-tokens", "8192").parse()?;
    let backend = CpuBackend::with_threads(threads)?;
    let threads = backend.threads();
    let dir = std::env::temp_dir().join(format!("arbiter-bench-shared-{}", std::process::id()));
    write_random_model(&dir, &bench_small_config(), Dtype::F32, 7, true)?;
    let model = Model::load(&dir, backend)?;
    let shapes = [
        Shape { name: "GRPO", prompt: 2048, candidates: 16, answer: 256, groups: 1 },
        Shape { name: "best-of-8", prompt: 512, candidates: 8, answer: 512, groups: 1 },
        Shape { name: "RewardBench pairs", prompt: 150, candidates: 2, answer: 300, groups: 8 },
    ];
    let mut rng = SplitMix::new(20);
    let mut ids = |n: usize| (0..n).map(|_| (rng.next_u64() % 32000) as u32).collect::<Vec<u32>>();
    println!("## shared-prefix scoring, bench-small (Nemotron, hidden 1024, 8 layers), f32, {threads} threads");
    println!("batch budget {budget} computed tokens; effective tokens/s = sum of full candidate lengths / wall s; best of {rounds} alternating rounds");
    println!();
    println!(
        "| shape | full tokens | computed (shared) | off s | on s | off tok/s | on tok/s | speed-up | bits equal |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for shape in &shapes {
        let groups: Vec<(Vec<u32>, Vec<Vec<u32>>)> = (0..shape.groups)
            .map(|_| (ids(shape.prompt), (0..shape.candidates).map(|_| ids(shape.answer)).collect()))
            .collect();
        let full: usize = groups.iter().map(|(p, a)| a.iter().map(|x| p.len() + x.len()).sum::<usize>()).sum();
        let on = batches(&groups, true, budget);
        let off = batches(&groups, false, budget);
        let computed: usize = on.iter().map(|b| b.tokens().len()).sum();
        let run = |bs: &[PackedBatch]| -> Result<(f64, Vec<Vec<f32>>), Error> {
            let t = Instant::now();
            let mut outs = Vec::new();
            for b in bs {
                outs.extend(model.forward(b)?);
            }
            Ok((t.elapsed().as_secs_f64(), outs))
        };
        let (mut best_off, mut best_on, mut equal) = (f64::INFINITY, f64::INFINITY, true);
        for _ in 0..rounds {
            let (s_off, o_off) = run(&off)?;
            let (s_on, o_on) = run(&on)?;
            best_off = best_off.min(s_off);
            best_on = best_on.min(s_on);
            let bits = |o: &[Vec<f32>]| o.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
            equal &= bits(&o_off) == bits(&o_on);
        }
        println!(
            "| {} ({} x {} after {}{}) | {full} | {computed} | {best_off:.2} | {best_on:.2} | {:.0} | {:.0} | {:.2}x | {} |",
            shape.name,
            shape.candidates,
            shape.answer,
            shape.prompt,
            if shape.groups > 1 { format!(", {} groups", shape.groups) } else { String::new() },
            full as f64 / best_off,
            full as f64 / best_on,
            best_off / best_on,
            if equal { "yes" } else { "NO" }
        );
    }
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
