//! Prometheus metrics: names, explicit histogram buckets (so they render as `_bucket` series that
//! aggregate across replicas) and the exporter on its own port.

use std::net::SocketAddr;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

// What the scoring core records (queue, batches, tokenization); named there.
pub use arbiter_scoring::metrics::{
    BATCH_FAILURES, BATCH_SIZE, BATCH_TOKENS, DROPPED, INFERENCE_SECONDS, ITEMS, PREFIX_GROUPS, PREFIX_TOKENS_SAVED,
    QUEUE_DEPTH, QUEUE_SECONDS, TOKENIZE_SECONDS, TOKENS,
};
/// Requests by RPC and final status code (`rpc`, `code` labels).
pub const REQUESTS: &str = "arbiter_requests_total";
/// Seconds from receipt to reply, by RPC.
pub const REQUEST_SECONDS: &str = "arbiter_request_seconds";
/// Seconds the model took to load.
pub const MODEL_LOAD_SECONDS: &str = "arbiter_model_load_seconds";
/// 1 while the server reports SERVING.
pub const READY: &str = "arbiter_ready";
/// Constant 1 with the build version as a label.
pub const BUILD_INFO: &str = "arbiter_build_info";
/// Constant 1 with the model's architecture, fingerprint and backend as labels.
pub const MODEL_INFO: &str = "arbiter_model_info";

const SECONDS: [f64; 16] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const SIZES: [f64; 11] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];
const TOKEN_COUNTS: [f64; 12] =
    [64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0, 131072.0];

/// Installs the global recorder and serves `/metrics` on `addr` (needs a tokio runtime).
pub fn install(addr: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &SIZES))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_TOKENS.into()), &TOKEN_COUNTS))
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    describe();
    Ok(())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(REQUESTS, "Requests by RPC and gRPC status code.");
    describe_counter!(ITEMS, "Items (sequences) scored.");
    describe_counter!(TOKENS, "Tokens scored (each item's full length).");
    describe_counter!(PREFIX_TOKENS_SAVED, "Tokens not computed because items shared a prefix computed once.");
    describe_counter!(PREFIX_GROUPS, "Groups of items that computed a shared prefix once.");
    describe_counter!(DROPPED, "Items dropped before compute: client gone or deadline passed.");
    describe_counter!(BATCH_FAILURES, "Batches whose forward pass failed, by reason.");
    describe_histogram!(QUEUE_SECONDS, Unit::Seconds, "Time an item waited for its batch.");
    describe_histogram!(TOKENIZE_SECONDS, Unit::Seconds, "Templating and tokenization time of a request.");
    describe_histogram!(INFERENCE_SECONDS, Unit::Seconds, "Forward pass time of a batch.");
    describe_histogram!(REQUEST_SECONDS, Unit::Seconds, "Time from receipt to reply, by RPC.");
    describe_histogram!(BATCH_SIZE, "Sequences per batch.");
    describe_histogram!(BATCH_TOKENS, "Tokens a batch computed (a shared prefix once).");
    describe_gauge!(QUEUE_DEPTH, "Items waiting for a batch.");
    describe_gauge!(MODEL_LOAD_SECONDS, Unit::Seconds, "Model load time.");
    describe_gauge!(READY, "1 while the server reports SERVING.");
    describe_gauge!(BUILD_INFO, "Build information.");
    describe_gauge!(MODEL_INFO, "The served model.");
}

/// Records the constant info gauges.
pub fn record_info(architecture: &str, fingerprint: &str, backend: &str, load_seconds: f64) {
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    gauge!(MODEL_INFO, "architecture" => architecture.to_string(), "fingerprint" => fingerprint.to_string(),
        "backend" => backend.to_string())
    .set(1.0);
    gauge!(MODEL_LOAD_SECONDS).set(load_seconds);
}

/// Counts a finished request.
pub fn record_request(rpc: &'static str, code: tonic::Code, seconds: f64) {
    counter!(REQUESTS, "rpc" => rpc, "code" => crate::error::code_name(code)).increment(1);
    histogram!(REQUEST_SECONDS, "rpc" => rpc).record(seconds);
}
