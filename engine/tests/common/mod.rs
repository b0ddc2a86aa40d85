//! Golden fixtures shared by the engine's integration tests.
#![allow(dead_code)] // each test binary uses a different part

use std::path::PathBuf;

pub mod instrumented;
pub mod read_log;

/// A fixture's token sequences and the outputs HF transformers computed for them.
pub struct Golden {
    pub sequences: Vec<Vec<u32>>,
    pub outputs: Vec<Vec<f32>>,
}

/// The folder of the committed golden fixture `name`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden").join(name)
}

/// Every golden fixture.
pub const FIXTURES: [&str; 8] =
    ["nemotron-v5", "nemotron-v4-gqa", "nemotron-bf16", "llama3-scaled", "qwen2", "qwen3", "inform-head", "gemma2"];

/// Reads a fixture's expected.json.
pub fn golden(name: &str) -> Golden {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).expect("fixture expected.json");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let seqs = v["sequences"].as_array().unwrap();
    let outs = v["outputs"].as_array().unwrap();
    Golden {
        sequences: seqs
            .iter()
            .map(|s| s.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect())
            .collect(),
        outputs: outs
            .iter()
            .map(|s| s.as_array().unwrap().iter().map(|t| t.as_f64().unwrap() as f32).collect())
            .collect(),
    }
}

/// max|got - ref| / max(max|ref|, 1e-3), the error measure of DESIGN.md.
pub fn rel_error(got: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(got.len(), reference.len());
    let scale = reference.iter().map(|r| r.abs() as f64).fold(1e-3, f64::max);
    got.iter().zip(reference).map(|(g, r)| (*g as f64 - *r as f64).abs()).fold(0.0, f64::max) / scale
}

/// A batch of random shared-prefix groups and plain sequences, and each item's full sequence.
/// Prefixes are 1..=300 tokens, branches 0..=`max_branch` (zero: the item is the prefix itself),
/// some branches continue one level deeper, some items continue only the first tokens of an
/// earlier item (per-turn branches), and nothing exceeds `max_len`. The first entry is
/// always a group with a non-empty branch.
pub fn random_tree_batch(
    rng: &mut arbiter_engine::synth::SplitMix,
    vocab: usize,
    max_len: usize,
    max_branch: usize,
) -> (arbiter_engine::PackedBatch, Vec<Vec<u32>>) {
    let mut below = |n: usize| (rng.next_u64() % n as u64) as usize;
    let ids = |n: usize, below: &mut dyn FnMut(usize) -> usize| (0..n).map(|_| below(vocab) as u32).collect::<Vec<_>>();
    let mut batch = arbiter_engine::PackedBatch::new();
    let mut items = Vec::new();
    for _ in 0..1 + below(3) {
        if !items.is_empty() && below(4) == 0 {
            let seq = ids(1 + below(max_len.min(300)), &mut below);
            batch.push(&seq).unwrap();
            items.push(seq);
            continue;
        }
        let prefix = ids(1 + below(300.min(max_len - 1)), &mut below);
        let root = batch.push_segment(None, &prefix).unwrap();
        batch.push_item(batch.segment(root).end - 1).unwrap();
        items.push(prefix.clone());
        for k in 0..1 + below(4) {
            let room = max_len - prefix.len();
            // The first branch is never empty, so every batch shares something.
            let len = if k == 0 { 1 + below(max_branch.min(room)) } else { below(max_branch.min(room) + 1) };
            let branch = ids(len, &mut below);
            if branch.is_empty() {
                batch.push_item(batch.segment(root).end - 1).unwrap();
                items.push(prefix.clone());
                continue;
            }
            let seg = batch.push_segment(Some(root), &branch).unwrap();
            let mut full = [prefix.clone(), branch.clone()].concat();
            batch.push_item(batch.segment(seg).end - 1).unwrap();
            items.push(full.clone());
            // Read one row inside the branch too: an item that ends mid-segment.
            let mid = below(branch.len());
            batch.push_item(batch.segment(seg).start + mid).unwrap();
            items.push(full[..prefix.len() + mid + 1].to_vec());
            let room = max_len - full.len();
            if room > 0 && below(3) == 0 {
                let leaf = ids(1 + below(room.min(50)), &mut below);
                let s = batch.push_segment(Some(seg), &leaf).unwrap();
                batch.push_item(batch.segment(s).end - 1).unwrap();
                full.extend_from_slice(&leaf);
                items.push(full);
            }
        }
        // Per-turn scores: branches that see only the first rows of an item of the batch (turn
        // ends inside the prefix or a branch), with up to 3 closing tokens, or none (a read
        // inside the item).
        for _ in 0..below(4) {
            let item = below(items.len());
            let seen = 1 + below(items[item].len());
            let closing = ids(below(4.min(max_len - seen + 1)), &mut below);
            batch.push_continuation(item, seen, &closing).unwrap();
            items.push([&items[item][..seen], &closing[..]].concat());
        }
    }
    (batch, items)
}

/// A conversation as the fixture scripts write it (`[{"role": ..., "content": ...}]`).
pub fn messages(v: &serde_json::Value) -> Vec<arbiter_engine::text::Message> {
    use arbiter_engine::text::{Message, Role};
    let parse = |m: &serde_json::Value| {
        Message::new(Role::parse(m["role"].as_str().unwrap()).unwrap(), m["content"].as_str().unwrap())
    };
    v.as_array().expect("a list of messages").iter().map(parse).collect()
}
