//! arbiter's engine: reads reward-model folders, runs packed batches through one forward graph on
//! a pluggable backend, and turns head outputs into named attributes and a reward.
//!
//! ```no_run
//! use arbiter_engine::{cpu::CpuBackend, Model, PackedBatch};
//! let model = Model::load("models/demo".as_ref(), CpuBackend::new())?;
//! let raw = model.forward(&PackedBatch::from_sequences(&[vec![1u32, 2, 3]])?)?;
//! # Ok::<(), arbiter_engine::EngineError>(())
//! ```
#![deny(missing_docs)]

pub mod backend;
pub mod batch;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod demo;
pub mod error;
pub mod folder;
pub mod fp8;
pub mod graph;
pub mod memory;
pub mod parallel;
pub mod plan;
pub mod rope;
pub mod runtime;
pub mod scores;
pub mod spec;
pub mod sync;
pub mod synth;
pub mod tensors;
pub mod text;
pub mod weights;

pub use batch::PackedBatch;
pub use error::{EngineError, Result};
pub use graph::Model;
pub use scores::{RewardWeights, Score};
pub use spec::ModelSpec;
