//! arbiter's service side: request items as JSON lines, the batch scheduler, the gRPC service.
#![deny(missing_docs)]

pub mod auth;
pub mod batcher;
pub mod error;
pub mod jsonl;
pub mod memory_plan;
pub mod metrics;
pub mod model_args;
pub mod openrlhf;
pub mod serve;
pub mod service;
pub mod testing;
