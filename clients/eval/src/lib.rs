//! RewardBench evaluation over arbiter: dataset readers and the benchmark's scoring math.
#![deny(missing_docs)]

pub mod dataset;
pub mod saved;
pub mod scoring;
