//! arbiter's front ends over the scoring core (`arbiter-scoring`): the gRPC service, the HTTP
//! APIs (OpenRLHF, vLLM classify), JSON lines for `arbiter score`, and the server around them (start-up, metrics, drain).
#![deny(missing_docs)]

pub mod auth;
pub mod error;
pub mod field;
pub mod gate;
pub mod http;
pub mod jsonl;
pub mod memory_plan;
pub mod metrics;
pub mod model_args;
pub mod refusals;
pub mod serve;
pub mod service;
