//! Names of the metrics the core records (through the `metrics` facade: without an installed
//! recorder, as in `arbiter score`, recording costs nothing). The server describes them, gives
//! the histograms their buckets and exports them.

/// Items (sequences) scored.
pub const ITEMS: &str = "arbiter_items_scored_total";
/// Tokens scored (every item's full length, shared prefixes counted per item).
pub const TOKENS: &str = "arbiter_tokens_scored_total";
/// Items dropped before compute (`reason`: cancelled, deadline).
pub const DROPPED: &str = "arbiter_dropped_total";
/// Seconds an item waited for its batch.
pub const QUEUE_SECONDS: &str = "arbiter_queue_seconds";
/// Seconds spent templating and tokenizing a request's items.
pub const TOKENIZE_SECONDS: &str = "arbiter_tokenize_seconds";
/// Seconds of one batch's forward pass.
pub const INFERENCE_SECONDS: &str = "arbiter_inference_seconds";
/// Sequences per batch.
pub const BATCH_SIZE: &str = "arbiter_batch_size";
/// Tokens a batch computes (a shared prefix once).
pub const BATCH_TOKENS: &str = "arbiter_batch_tokens";
/// Items waiting for a batch.
pub const QUEUE_DEPTH: &str = "arbiter_queue_depth";
/// Batches that failed (`reason`: out_of_memory, engine, panic, or invalid for a batch the engine refused).
pub const BATCH_FAILURES: &str = "arbiter_batch_failures_total";
/// Tokens not computed because a batch computed a shared prefix once for several items.
pub const PREFIX_TOKENS_SAVED: &str = "arbiter_prefix_tokens_saved_total";
/// Shared-prefix groups formed (two or more items computing one prefix once).
pub const PREFIX_GROUPS: &str = "arbiter_prefix_groups_total";
