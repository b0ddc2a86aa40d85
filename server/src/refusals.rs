//! Requests refused before they reach a handler. tonic's codec refuses a message over
//! `--max-message-bytes` with OUT_OF_RANGE, where the API promises RESOURCE_EXHAUSTED (arbiter
//! itself never answers OUT_OF_RANGE, so this layer can rewrite that code), and our codec
//! refuses an undecodable one with INVALID_ARGUMENT. Neither reaches the gate that records
//! request metrics, so this layer counts them, like every other refusal.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;
use tonic::Code;

use crate::metrics as m;

/// Set by a handler when it takes a request, so that the layer does not count it twice.
#[derive(Debug, Clone, Default)]
pub struct Handled(Arc<AtomicBool>);

impl Handled {
    /// Marks the request as reached by its handler (which records its own outcome).
    pub fn mark(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The layer to put around the gRPC server.
#[derive(Debug, Clone, Copy, Default)]
pub struct RefusalLayer;

impl<S> tower_layer::Layer<S> for RefusalLayer {
    type Service = Refusals<S>;
    fn layer(&self, inner: S) -> Refusals<S> {
        Refusals { inner }
    }
}

/// The service [`RefusalLayer`] wraps around another.
#[derive(Debug, Clone)]
pub struct Refusals<S> {
    inner: S,
}

/// The RewardService method a request path names (as the metrics label it), if any.
fn rpc_of(path: &str) -> Option<&'static str> {
    match path.strip_prefix("/arbiter.v1.RewardService/")? {
        "Score" => Some("Score"),
        "Rank" => Some("Rank"),
        "ScoreStream" => Some("ScoreStream"),
        "GetModelInfo" => Some("GetModelInfo"),
        "Tokenize" => Some("Tokenize"),
        _ => None,
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower_service::Service<http::Request<B>> for Refusals<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let rpc = rpc_of(req.uri().path());
        let handled = Handled::default();
        req.extensions_mut().insert(handled.clone());
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            let Some(rpc) = rpc else { return Ok(resp) };
            // A refusal before the handler is a trailers-only response: the status is a header.
            let Some(code) = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
            else {
                return Ok(resp);
            };
            let mut code = Code::from(code);
            if code == Code::OutOfRange {
                code = Code::ResourceExhausted;
                resp.headers_mut().insert("grpc-status", http::HeaderValue::from(code as i32));
            }
            if code != Code::Ok && !handled.0.load(Ordering::SeqCst) {
                m::record_request(rpc, code, start.elapsed().as_secs_f64());
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reward_service_methods_are_named() {
        assert_eq!(rpc_of("/arbiter.v1.RewardService/ScoreStream"), Some("ScoreStream"));
        assert_eq!(rpc_of("/arbiter.v1.RewardService/Nope"), None);
        assert_eq!(rpc_of("/grpc.health.v1.Health/Check"), None);
    }
}
