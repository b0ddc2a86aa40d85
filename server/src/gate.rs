//! What every network front end (gRPC, HTTP) passes through before the scoring core: the bearer
//! token, admission while draining, the request's deadline, and the outcome metric and log line.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arbiter_engine::text::TruncationPolicy;
use arbiter_scoring::Scorer;
use tonic::metadata::MetadataMap;

use crate::auth::BearerAuth;
use crate::error::ServiceError;
use crate::metrics as m;

/// Request limits that are not the queue's.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Items per Score request, candidates per Rank request, queries per HTTP request.
    pub max_items_per_request: usize,
    /// Largest request message in bytes.
    pub max_message_bytes: usize,
    /// Policy for requests that leave truncation unspecified.
    pub default_truncation: TruncationPolicy,
}

/// Everything a ready server needs to answer requests.
#[derive(Debug)]
pub struct Ready {
    /// The scoring core (model, queue, tokenization workers).
    pub scorer: Scorer,
    /// Limits.
    pub limits: RequestLimits,
}

impl Ready {
    /// Refuses a request with no items, or more than the limit; `what` names them ("items").
    pub fn check_count(&self, n: usize, what: &str) -> Result<(), ServiceError> {
        if n == 0 {
            return Err(ServiceError::InvalidArgument(format!("the request has no {what}")));
        }
        if n > self.limits.max_items_per_request {
            return Err(ServiceError::InvalidArgument(format!(
                "the request has {n} {what}; the limit is {} (split it into several requests)",
                self.limits.max_items_per_request
            )));
        }
        Ok(())
    }

    /// The model's warning for every answer (empty unless it is the demo model).
    pub fn warning(&self) -> String {
        if self.scorer.model().spec().demo {
            arbiter_engine::demo::DEMO_WARNING.to_string()
        } else {
            String::new()
        }
    }
}

/// Whether the server takes requests, and how many it is answering.
#[derive(Debug, Default)]
pub struct Lifecycle {
    draining: AtomicBool,
    in_flight: AtomicUsize,
}

impl Lifecycle {
    /// Stops admitting requests; those already admitted are still answered.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether the server is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Requests admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    fn admit(self: &Arc<Self>) -> Result<InFlight, ServiceError> {
        // Count first, then check: a request either sees the drain flag or is counted before
        // the drain loop reads the count.
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(self.clone());
        if self.is_draining() {
            return Err(ServiceError::Unavailable("the server is shutting down; retry on another replica".into()));
        }
        Ok(guard)
    }
}

/// Decrements the in-flight count when a request is answered (or dropped).
struct InFlight(Arc<Lifecycle>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Records a request's outcome exactly once: when it finishes, or as CANCELLED (DEADLINE_EXCEEDED
/// past its deadline) if its future is dropped first, as tonic does when the client goes away.
struct Outcome {
    rpc: &'static str,
    start: Instant,
    deadline: Option<Instant>,
    done: bool,
}

impl Outcome {
    fn finish(&mut self, code: tonic::Code) {
        self.done = true;
        m::record_request(self.rpc, code, self.start.elapsed().as_secs_f64());
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.done {
            let code = match self.deadline {
                Some(d) if Instant::now() >= d => tonic::Code::DeadlineExceeded,
                _ => tonic::Code::Cancelled,
            };
            tracing::info!(rpc = self.rpc, code = crate::error::code_name(code), "abandoned by the client");
            self.finish(code);
        }
    }
}

/// How much before a client's deadline the service gives up, so that its DEADLINE_EXCEEDED
/// beats tonic's timeout layer (which started counting when the request arrived).
const DEADLINE_MARGIN: Duration = Duration::from_millis(5);

/// The shared entrance of the network front ends. It exists before the model is loaded so
/// that health and reflection answer during loading; until then every request gets UNAVAILABLE.
#[derive(Clone)]
pub struct Gate {
    ready: Arc<OnceLock<Arc<Ready>>>,
    lifecycle: Arc<Lifecycle>,
    auth: BearerAuth,
    next_id: Arc<AtomicU64>,
}

impl Gate {
    /// A gate that answers UNAVAILABLE until [`Gate::set_ready`]; with a token in `auth`, every
    /// request needs it (health, reflection and metrics are separate and stay open).
    pub fn new(lifecycle: Arc<Lifecycle>, auth: BearerAuth) -> Self {
        Gate { ready: Arc::new(OnceLock::new()), lifecycle, auth, next_id: Arc::new(AtomicU64::new(1)) }
    }

    /// Makes the front ends answer with `ready`.
    pub fn set_ready(&self, ready: Arc<Ready>) {
        self.ready.set(ready).ok();
    }

    /// The ready state, or UNAVAILABLE while the model loads.
    pub fn ready(&self) -> Result<Arc<Ready>, ServiceError> {
        self.ready.get().cloned().ok_or_else(|| ServiceError::Unavailable("the model is still loading".into()))
    }

    /// Whether the server answers requests now: the model is ready and it is not draining (what
    /// an HTTP health probe reports; gRPC health says the same through its own service).
    pub fn serving(&self) -> bool {
        self.ready.get().is_some() && !self.lifecycle.is_draining()
    }

    /// Checks the bearer token in `metadata`.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<(), ServiceError> {
        self.auth.check(metadata)
    }

    /// The caller's `x-request-id`, or a fresh one.
    pub fn request_id(&self, metadata: &MetadataMap) -> String {
        metadata
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(64).collect())
            .unwrap_or_else(|| format!("r{}", self.next_id.fetch_add(1, Ordering::Relaxed)))
    }

    /// Runs `f` as one request: auth, admission, the deadline, the outcome metric and a log line.
    /// Every way in (unary RPCs, stream messages, HTTP) goes through here.
    pub async fn run<R, F, Fut>(
        &self,
        rpc: &'static str,
        metadata: &MetadataMap,
        deadline: Option<Instant>,
        f: F,
    ) -> Result<R, ServiceError>
    where
        F: FnOnce(Arc<Ready>) -> Fut,
        Fut: std::future::Future<Output = Result<R, ServiceError>>,
    {
        let start = Instant::now();
        let mut outcome = Outcome { rpc, start, deadline, done: false };
        let result = async {
            self.auth.check(metadata)?;
            let _guard = self.lifecycle.admit()?;
            let work = f(self.ready()?);
            match deadline {
                // tonic's own grpc-timeout layer answers CANCELLED when it fires; answer
                // DEADLINE_EXCEEDED first, as the gRPC spec has it.
                Some(d) => tokio::time::timeout_at(d.checked_sub(DEADLINE_MARGIN).unwrap_or(d).into(), work)
                    .await
                    .unwrap_or(Err(ServiceError::DeadlineExceeded)),
                None => work.await,
            }
        }
        .await;
        let code = result.as_ref().map_or_else(|e| e.code(), |_| tonic::Code::Ok);
        outcome.finish(code);
        match &result {
            Ok(_) => tracing::info!(ms = start.elapsed().as_secs_f64() * 1e3, "ok"),
            Err(e) => tracing::info!(code = crate::error::code_name(code), error = %e, "failed"),
        }
        result
    }
}
