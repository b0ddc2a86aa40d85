//! arbiter's service side: request items as JSON lines, the batch scheduler, the gRPC service.
#![deny(missing_docs)]

pub mod jsonl;
pub mod model_args;
