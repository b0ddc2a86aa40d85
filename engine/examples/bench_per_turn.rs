//! Benchmark program (not a test): per-turn scoring on the CPU backend with "bench-small". A
//! 6-turn conversation of about 3,000 tokens (Nemotron reward template, demo tokenizer) is
//! scored after every assistant turn in one pass (the conversation once, five one-token branches)
//! and as six separate requests (each stopped conversation alone), alternating in one process,
//! best of `--rounds`. "bits equal" compares every turn's outputs of the two.
//!
//! cargo run --release -p arbiter-engine --example bench_per_turn -- [--rounds N] [--threads N] [--turn-tokens N]

use std::time::Instant;

use arbiter_engine::config::load_config;
use arbiter_engine::cpu::CpuBackend;
use arbiter_engine::demo::write_demo_model;
use arbiter_engine::synth::{bench_small_config, write_random_model, SplitMix};
use arbiter_engine::text::{Message, Preprocessor, Role, TruncationPolicy, TurnRead};
use arbiter_engine::weights::Dtype;
use arbiter_engine::{Model, PackedBatch};

type Error = Box<dyn std::error::Error>;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

/// Random words until `pre` tokenizes `text` to about `tokens` tokens.
fn words(rng: &mut SplitMix, pre: &Preprocessor, tokens: usize) -> Result<String, Error> {
    const WORDS: [&str; 16] = [
        "the", "model", "answers", "each", "question", "with", "care", "and", "checks", "its", "work", "before",
        "giving", "a", "final", "result",
    ];
    let tok = pre.tokenizer().ok_or("the demo folder has a tokenizer")?;
    let mut text = String::new();
    while tok.encode(&text)?.len() < tokens {
        for _ in 0..8 {
            text.push_str(WORDS[(rng.next_u64() % 16) as usize]);
            text.push(' ');
        }
    }
    Ok(text)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn main() -> Result<(), Error> {
    let rounds: usize = arg("--rounds", "2").parse()?;
    let threads: usize = arg("--threads", "0").parse()?;
    let turn_tokens: usize = arg("--turn-tokens", "470").parse()?;
    let backend = CpuBackend::with_threads(threads)?;
    let threads = backend.threads();
    let base = std::env::temp_dir().join(format!("arbiter-bench-per-turn-{}", std::process::id()));
    let (model_dir, demo_dir) = (base.join("model"), base.join("demo"));
    write_random_model(&model_dir, &bench_small_config(), Dtype::F32, 7, true)?;
    write_demo_model(&demo_dir)?;
    let pre = Preprocessor::from_model_dir(&demo_dir, &load_config(&demo_dir.join("config.json"))?, None)?;
    let model = Model::load(&model_dir, backend)?;

    // Six turns: a short question and an answer of about `turn_tokens` tokens each.
    let mut rng = SplitMix::new(3);
    let mut messages = vec![Message::new(Role::System, "You are a careful assistant.")];
    for _ in 0..6 {
        messages.push(Message::new(Role::User, words(&mut rng, &pre, 20)?));
        messages.push(Message::new(Role::Assistant, words(&mut rng, &pre, turn_tokens)?));
    }
    let turns = pre.prepare_turns(&messages, TruncationPolicy::Error)?;
    let spine = &turns.spine.ids;
    let mut one_pass = PackedBatch::from_sequences(&[spine])?;
    let mut separate = Vec::new();
    for t in &turns.turns {
        let TurnRead::Spine { seen, closing } = &t.read else {
            return Err("every Nemotron turn is on the spine".into());
        };
        one_pass.push_continuation(0, *seen, closing)?;
        separate.push([&spine[..*seen], &closing[..]].concat());
    }
    let computed = one_pass.tokens().len();
    let full: usize = separate.iter().map(Vec::len).sum();

    let (mut best_one, mut best_sep, mut best_whole, mut equal) = (f64::INFINITY, f64::INFINITY, f64::INFINITY, true);
    for _ in 0..rounds {
        let t = Instant::now();
        let shared = model.forward(&one_pass)?;
        best_one = best_one.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut alone = Vec::new();
        for ids in &separate {
            // The last request is the whole conversation: what scoring it once costs.
            let last = Instant::now();
            alone.push(model.forward(&PackedBatch::from_sequences(&[ids])?)?.remove(0));
            if alone.len() == separate.len() {
                best_whole = best_whole.min(last.elapsed().as_secs_f64());
            }
        }
        best_sep = best_sep.min(t.elapsed().as_secs_f64());
        // Output 0 is the spine's own read; outputs 1.. the turns in order.
        equal &= shared[1..].iter().zip(&alone).all(|(a, b)| bits(a) == bits(b));
    }
    std::fs::remove_dir_all(&base).ok();

    println!("## per-turn scoring, bench-small (Nemotron, hidden 1024, 8 layers), f32, {threads} threads");
    println!("6-turn conversation, Nemotron reward template; best of {rounds} alternating rounds\n");
    println!("| way | forward passes | computed tokens | s | turns/s | bits equal |");
    println!("|---|---|---|---|---|---|");
    println!("| per-turn, one pass | 1 | {computed} | {best_one:.2} | {:.2} | {} |", 6.0 / best_one, yes(equal));
    println!("| six separate requests | 6 | {full} | {best_sep:.2} | {:.2} | (reference) |", 6.0 / best_sep);
    println!(
        "| (the last of them: the whole conversation, final score only) | 1 | {} | {best_whole:.2} | - | - |",
        spine.len()
    );
    println!("\nconversation {} tokens; speed-up {:.2}x", spine.len(), best_sep / best_one);
    Ok(())
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}
