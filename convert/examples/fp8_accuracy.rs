//! FP8 accuracy: each model scored once unquantized and once after `arbiter quantize`, on the
//! CPU backend (the reference semantics), and compared. Prints one table row per model:
//!
//! - worst and median attribute error (DESIGN.md's error of a result, FP8 against unquantized),
//!   and the worst difference in units of the model's output scale (its largest |output|);
//! - pairwise reward-ranking agreement over all pairs of sequences, and again over the pairs
//!   whose unquantized reward margin is at least 1e-3, with the fraction of pairs left out as
//!   near-ties;
//! - the spread (standard deviation) of the unquantized rewards, the RMS of the FP8 reward
//!   error, and the agreement those two alone predict (`1 - atan(error / spread) / pi`, for
//!   Gaussian rewards and independent Gaussian errors): how much of the disagreement is the size
//!   of the error next to the spread of the rewards.
//!
//! `--dump FILE` writes SmolLM2's per-sequence rewards (unquantized and FP8) as JSON for
//! tests/fixtures/fp8_torch_reference.py, which checks them against torch.
//!
//! Models: the golden fixtures (random weights; 200 deterministic random token sequences of 1 to
//! 300 tokens each) and, with `--smollm2 DIR`, SmolLM2-135M-Instruct as written by
//! tests/fixtures/make_smollm2.py (trained weights on a 4-bit grid, random head; its 200
//! sequences of corpus text). Results in docs/fp8.md.
//!
//! ```text
//! .venv/bin/python tests/fixtures/make_smollm2.py /tmp/smollm2
//! cargo run --release -p arbiter-convert --example fp8_accuracy -- --smollm2 /tmp/smollm2
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use arbiter_convert::quantize::{quantize, QuantizeOptions};
use arbiter_engine::cpu::CpuBackend;
use arbiter_engine::synth::SplitMix;
use arbiter_engine::{Model, PackedBatch, RewardWeights, Score};

/// Scores every sequence (packed into batches of about 4096 tokens) and returns the raw outputs
/// and the default reward of each.
fn score(dir: &Path, seqs: &[Vec<u32>]) -> (Vec<Vec<f32>>, Vec<f32>) {
    let model = Model::load(dir, CpuBackend::new()).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let head = &model.spec().head;
    let weights = RewardWeights::defaults(head);
    let (mut raw, mut rewards) = (Vec::new(), Vec::new());
    let mut start = 0;
    while start < seqs.len() {
        let mut end = start;
        let mut tokens = 0;
        while end < seqs.len() && (end == start || tokens + seqs[end].len() <= 4096) {
            tokens += seqs[end].len();
            end += 1;
        }
        for out in model.forward(&PackedBatch::from_sequences(&seqs[start..end]).unwrap()).unwrap() {
            rewards.push(Score::from_raw(head, out.clone(), &weights).reward);
            raw.push(out);
        }
        start = end;
    }
    (raw, rewards)
}

/// max|got - ref| / max(max|ref|, 1e-3).
fn rel_error(got: &[f32], reference: &[f32]) -> f64 {
    let scale = reference.iter().map(|r| r.abs() as f64).fold(1e-3, f64::max);
    got.iter().zip(reference).map(|(g, r)| (*g as f64 - *r as f64).abs()).fold(0.0, f64::max) / scale
}

struct Row {
    model: String,
    seqs: usize,
    worst: f64,
    median: f64,
    worst_scaled: f64,
    agree_all: f64,
    agree_clear: f64,
    ties: f64,
    /// Standard deviation of the unquantized rewards over the sequences.
    spread: f64,
    /// Root mean square of (FP8 reward - unquantized reward) over the sequences.
    rms_error: f64,
    seconds: f64,
    /// Per-sequence rewards, unquantized and FP8 (for `--dump`).
    rewards: (Vec<f32>, Vec<f32>),
}

fn compare(model: &str, dir: &Path, seqs: &[Vec<u32>], work: &Path) -> Row {
    let t = Instant::now();
    let fp8 = work.join(model);
    quantize(&QuantizeOptions {
        input: dir.to_path_buf(),
        output: fp8.clone(),
        max_shard_bytes: u64::MAX,
        progress: false,
    })
    .unwrap_or_else(|e| panic!("quantizing {model}: {e}"));
    let (ref_raw, ref_reward) = score(dir, seqs);
    let (q_raw, q_reward) = score(&fp8, seqs);
    let mut errors: Vec<f64> = q_raw.iter().zip(&ref_raw).map(|(q, r)| rel_error(q, r)).collect();
    errors.sort_by(f64::total_cmp);
    // The same differences in units of the model's output scale (largest |output| over all
    // sequences): one-output heads near zero on some sequence inflate the per-sequence measure.
    let scale = ref_raw.iter().flatten().fold(1e-3f64, |m, r| m.max(r.abs() as f64));
    let worst_scaled = q_raw
        .iter()
        .zip(&ref_raw)
        .flat_map(|(q, r)| q.iter().zip(r).map(|(a, b)| (*a as f64 - *b as f64).abs()))
        .fold(0.0, f64::max)
        / scale;
    let (mut pairs, mut agree, mut clear, mut clear_agree) = (0u64, 0u64, 0u64, 0u64);
    for i in 0..seqs.len() {
        for j in i + 1..seqs.len() {
            let (r, q) = (ref_reward[i] - ref_reward[j], q_reward[i] - q_reward[j]);
            let same = r.signum() == q.signum() || (r == 0.0 && q == 0.0);
            pairs += 1;
            agree += u64::from(same);
            if r.abs() >= 1e-3 {
                clear += 1;
                clear_agree += u64::from(same);
            }
        }
    }
    let n = seqs.len() as f64;
    let mean = ref_reward.iter().map(|&r| r as f64).sum::<f64>() / n;
    let spread = (ref_reward.iter().map(|&r| (r as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    let rms_error =
        (q_reward.iter().zip(&ref_reward).map(|(q, r)| (*q as f64 - *r as f64).powi(2)).sum::<f64>() / n).sqrt();
    Row {
        model: model.to_string(),
        seqs: seqs.len(),
        worst: *errors.last().unwrap_or(&0.0),
        median: errors[errors.len() / 2],
        worst_scaled,
        agree_all: agree as f64 / pairs as f64,
        agree_clear: clear_agree as f64 / clear.max(1) as f64,
        ties: 1.0 - clear as f64 / pairs as f64,
        spread,
        rms_error,
        seconds: t.elapsed().as_secs_f64(),
        rewards: (ref_reward, q_reward),
    }
}

/// 200 deterministic random sequences of 1 to 300 tokens below `vocab`.
fn random_sequences(vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = SplitMix::new(seed);
    (0..200)
        .map(|_| {
            let len = 1 + (rng.next_u64() % 300) as usize;
            (0..len).map(|_| (rng.next_u64() % vocab as u64) as u32).collect()
        })
        .collect()
}

/// A JSON list of lists of numbers.
fn table(v: &serde_json::Value) -> Vec<Vec<f64>> {
    let list = |v: &serde_json::Value| v.as_array().expect("a JSON list").clone();
    list(v).iter().map(|row| list(row).iter().map(|x| x.as_f64().expect("a number")).collect()).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smollm2 = args.iter().position(|a| a == "--smollm2").and_then(|i| args.get(i + 1)).map(PathBuf::from);
    let dump = args.iter().position(|a| a == "--dump").and_then(|i| args.get(i + 1)).map(PathBuf::from);
    let work = tempfile::tempdir().expect("a temporary folder");
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden");
    let mut rows = Vec::new();
    for name in ["nemotron-v5", "nemotron-v4-gqa", "nemotron-bf16", "nemotron-released", "llama3-scaled"] {
        let dir = golden.join(name);
        let spec = arbiter_engine::config::load_config(&dir.join("config.json")).unwrap();
        rows.push(compare(name, &dir, &random_sequences(spec.vocab, 42), work.path()));
    }
    if let Some(dir) = smollm2 {
        let text = std::fs::read_to_string(dir.join("sequences.json")).expect("sequences.json from make_smollm2.py");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let seqs: Vec<Vec<u32>> =
            table(&v["sequences"]).into_iter().map(|s| s.into_iter().map(|t| t as u32).collect()).collect();
        // The unquantized folder first reproduces transformers (the script scored a few sequences).
        let (ours, _) = score(&dir, &seqs[..8]);
        let hf: Vec<Vec<f32>> =
            table(&v["transformers_outputs"]).into_iter().map(|s| s.into_iter().map(|x| x as f32).collect()).collect();
        let parity = ours.iter().zip(&hf).map(|(o, h)| rel_error(o, h)).fold(0.0, f64::max);
        println!("smollm2-135m unquantized vs transformers (8 sequences): worst error {parity:.2e}");
        rows.push(compare("smollm2-135m (Q4_1 grid)", &dir, &seqs, work.path()));
        // Per-sequence rewards, for tests/fixtures/fp8_torch_reference.py to compare with its own.
        if let Some(path) = dump {
            let (reference, fp8) = &rows.last().expect("just pushed").rewards;
            let json = serde_json::json!({"unquantized": reference, "fp8": fp8});
            std::fs::write(&path, json.to_string()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            println!("wrote {}", path.display());
        }
    }
    println!(
        "| model | sequences | worst attribute error | median | worst / output scale | ranking agreement, all pairs | pairs with margin >= 1e-3 | near-tie pairs | reward spread (std) | RMS reward error | agreement if the error were Gaussian noise | seconds |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {:.2e} | {:.2e} | {:.2e} | {:.2}% | {:.2}% | {:.2}% | {:.3} | {:.3} | {:.1}% | {:.1} |",
            r.model,
            r.seqs,
            r.worst,
            r.median,
            r.worst_scaled,
            100.0 * r.agree_all,
            100.0 * r.agree_clear,
            100.0 * r.ties,
            r.spread,
            r.rms_error,
            // Two rewards with independent Gaussian spread s and independent Gaussian errors e
            // change order with probability atan(e / s) / pi: what the error alone predicts.
            100.0 * (1.0 - (r.rms_error / r.spread).atan() / std::f64::consts::PI),
            r.seconds
        );
    }
}
