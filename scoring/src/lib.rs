//! arbiter's scoring core: the one path from items to scores that every front end shares.
//!
//! A front end (the gRPC service, the HTTP endpoints, `arbiter score`, a Rust program) turns its
//! wire format into [`Item`]s and calls a [`Scorer`]: it templates and tokenizes the items on
//! worker threads, queues them, packs queued work into batches by a token budget and a request
//! cap ([`queue`]), runs them through the engine, and returns scores per item in input order, or
//! typed errors ([`ScoreError`], [`QueueError`]). Deadlines and cancellation live here too: an
//! item whose caller went away, or whose deadline passed, is dropped before compute. The core
//! knows nothing of transports; each front end maps its errors to its own codes in one place.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use arbiter_engine::runtime::{LoadOptions, LoadedModel};
//! use arbiter_engine::text::{Input, TruncationPolicy};
//! use arbiter_scoring::{Item, Options, Scorer, ScorerConfig};
//! let model = LoadedModel::load("models/demo".as_ref(), &LoadOptions::default())?;
//! let scorer = Scorer::start(model, ScorerConfig::default(), None)?;
//! let item = Item::new(Input::Text("Hello".into()), TruncationPolicy::Error);
//! let scored = scorer.score(vec![item], Options::default()).await?;
//! println!("reward {}", scored.items[0].score.reward);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod error;
mod grouping;
pub mod metrics;
pub mod queue;
pub mod scorer;

pub use error::{QueueError, RequestError, ScoreError};
pub use queue::BatchConfig;
pub use scorer::{Item, ItemScore, Options, Ranked, Scored, Scorer, ScorerConfig, TurnScore};
