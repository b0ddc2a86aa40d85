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
pub const FIXTURES: [&str; 4] = ["nemotron-v5", "nemotron-v4-gqa", "nemotron-bf16", "llama3-scaled"];

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
