//! The `arbiter.v1.RewardService` implementation: validation, tokenization on worker threads,
//! the batcher, and results back in request order.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arbiter_engine::demo::DEMO_WARNING;
use arbiter_engine::runtime::LoadedModel;
use arbiter_engine::text::{validate_roles, ChatTemplate, Input, Message, Prepared, Role, TruncationPolicy};
use arbiter_engine::{RewardWeights, Score};
use arbiter_proto::v1 as pb;
use pb::reward_service_server::RewardService;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::auth::BearerAuth;
use crate::batcher::{Batcher, WorkItem};
use crate::error::ServiceError;
use crate::metrics as m;

/// Request limits that are not the batcher's.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Items per Score request, candidates per Rank request.
    pub max_items_per_request: usize,
    /// Largest request message in bytes.
    pub max_message_bytes: usize,
    /// Policy for requests that leave truncation unspecified.
    pub default_truncation: TruncationPolicy,
}

/// Everything a ready server needs to answer requests.
pub struct Ready {
    /// The model.
    pub model: LoadedModel,
    /// The queue and engine thread.
    pub batcher: Batcher,
    /// Tokenization workers.
    pub tokenizers: rayon::ThreadPool,
    /// Limits.
    pub limits: RequestLimits,
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

/// The gRPC service. It exists before the model is loaded so that health and reflection answer
/// during loading; until then every RPC gets UNAVAILABLE.
#[derive(Clone)]
pub struct Service {
    ready: Arc<OnceLock<Arc<Ready>>>,
    lifecycle: Arc<Lifecycle>,
    auth: BearerAuth,
    next_id: Arc<AtomicU64>,
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

impl Service {
    /// A service that answers UNAVAILABLE until [`Service::set_ready`]; with a token in `auth`,
    /// every RPC needs it (health, reflection and metrics are separate and stay open).
    pub fn new(lifecycle: Arc<Lifecycle>, auth: BearerAuth) -> Self {
        Service { ready: Arc::new(OnceLock::new()), lifecycle, auth, next_id: Arc::new(AtomicU64::new(1)) }
    }

    /// Makes the service answer with `ready`.
    pub fn set_ready(&self, ready: Arc<Ready>) {
        self.ready.set(ready).ok();
    }

    fn ready(&self) -> Result<Arc<Ready>, ServiceError> {
        self.ready.get().cloned().ok_or_else(|| ServiceError::Unavailable("the model is still loading".into()))
    }

    fn request_id<T>(&self, req: &Request<T>) -> String {
        req.metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(64).collect())
            .unwrap_or_else(|| format!("r{}", self.next_id.fetch_add(1, Ordering::Relaxed)))
    }

    /// Runs `f` as one request: auth, admission, the deadline, the outcome metric and a log line.
    /// Every way in (unary RPCs, stream messages, HTTP) goes through here.
    async fn run<R, F, Fut>(
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

    /// A unary RPC: [`Service::run`] inside a span carrying the request id.
    async fn handle<T, F, Fut>(&self, rpc: &'static str, req: Request<T>, f: F) -> Result<Response<T::Out>, Status>
    where
        T: Payload,
        F: FnOnce(Arc<Ready>, T, Option<Instant>) -> Fut,
        Fut: std::future::Future<Output = Result<T::Out, ServiceError>>,
    {
        let span = tracing::info_span!("request", request_id = %self.request_id(&req), rpc);
        let deadline = grpc_deadline(&req, Instant::now());
        let (metadata, _, msg) = req.into_parts();
        self.run(rpc, &metadata, deadline, |ready| f(ready, msg, deadline))
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }
}

/// Request messages, with the response each produces.
trait Payload {
    type Out;
}
impl Payload for pb::ScoreRequest {
    type Out = pb::ScoreResponse;
}
impl Payload for pb::RankRequest {
    type Out = pb::RankResponse;
}
impl Payload for pb::GetModelInfoRequest {
    type Out = pb::ModelInfo;
}
impl Payload for pb::TokenizeRequest {
    type Out = pb::TokenizeResponse;
}

/// How much before a client's deadline the service gives up, so that its DEADLINE_EXCEEDED
/// beats tonic's timeout layer (which started counting when the request arrived).
const DEADLINE_MARGIN: Duration = Duration::from_millis(5);

/// The deadline a client set with `grpc-timeout`, if any.
fn grpc_deadline<T>(req: &Request<T>, start: Instant) -> Option<Instant> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Some(start + d)
}

fn proto_messages(msgs: &[pb::Message], place: &str) -> Result<Vec<Message>, ServiceError> {
    msgs.iter()
        .enumerate()
        .map(|(j, m)| {
            Role::parse(&m.role)
                .map(|r| Message::new(r, m.content.clone()))
                .map_err(|e| ServiceError::InvalidArgument(format!("{place}.messages[{j}]: {e}")))
        })
        .collect()
}

fn proto_input(item: pb::Item, place: &str) -> Result<Input, ServiceError> {
    use pb::item::Input as I;
    match item.input {
        Some(I::Conversation(c)) => Ok(Input::Messages(proto_messages(&c.messages, place)?)),
        Some(I::Text(t)) => Ok(Input::Text(t)),
        Some(I::TokenIds(t)) => Ok(Input::TokenIds(t.ids)),
        None => {
            Err(ServiceError::InvalidArgument(format!("{place} has no input: set conversation, text or token_ids")))
        }
    }
}

fn policy(ready: &Ready, t: i32) -> Result<TruncationPolicy, ServiceError> {
    match pb::Truncation::try_from(t) {
        Ok(pb::Truncation::Unspecified) => Ok(ready.limits.default_truncation),
        Ok(pb::Truncation::Error) => Ok(TruncationPolicy::Error),
        Ok(pb::Truncation::Truncate) => Ok(TruncationPolicy::Truncate),
        Ok(pb::Truncation::TruncateContent) => Ok(TruncationPolicy::TruncateContent),
        Err(_) => Err(ServiceError::InvalidArgument(format!("truncation {t} is not a known value"))),
    }
}

fn weights(ready: &Ready, overrides: &HashMap<String, f32>) -> Result<RewardWeights, ServiceError> {
    let mut sorted: Vec<(&String, &f32)> = overrides.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0)); // deterministic error messages
    RewardWeights::with_overrides(&ready.model.spec().head, sorted.into_iter().map(|(k, v)| (k.as_str(), *v)))
        .map_err(|e| ServiceError::InvalidArgument(format!("reward_weights: {e}")))
}

fn check_count(ready: &Ready, n: usize, what: &str) -> Result<(), ServiceError> {
    if n == 0 {
        return Err(ServiceError::InvalidArgument(format!("the request has no {what}")));
    }
    if n > ready.limits.max_items_per_request {
        return Err(ServiceError::InvalidArgument(format!(
            "the request has {n} {what}; the limit is {} (split it into several requests)",
            ready.limits.max_items_per_request
        )));
    }
    Ok(())
}

fn truncation_info(p: &Prepared) -> pb::TruncationInfo {
    pb::TruncationInfo {
        truncated: p.truncation.truncated(),
        original_tokens: p.truncation.original_tokens as u32,
        dropped_messages: p.truncation.dropped_messages as u32,
        dropped_tokens: p.truncation.dropped_tokens as u32,
    }
}

fn warning(ready: &Ready) -> String {
    if ready.model.spec().demo {
        DEMO_WARNING.to_string()
    } else {
        String::new()
    }
}

/// Scored items with the request's timing.
struct Scored {
    results: Vec<pb::Result>,
    rewards: Vec<f32>,
    timing: pb::Timing,
}

/// The one scoring path of Score, Rank and ScoreStream: tokenize on the workers, enqueue every
/// item, wait for all of them, combine with the request's weights.
async fn score_inputs(
    ready: Arc<Ready>,
    inputs: Vec<(String, Input)>,
    policy: TruncationPolicy,
    weights: RewardWeights,
    deadline: Option<Instant>,
) -> Result<Scored, ServiceError> {
    let start = Instant::now();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let r = ready.clone();
    ready.tokenizers.spawn(move || {
        use rayon::prelude::*;
        let prepared: Vec<Result<Prepared, ServiceError>> = inputs
            .into_par_iter()
            .map(|(place, input)| {
                r.model.preprocessor.prepare(&input, policy).map_err(|e| ServiceError::from(e).at(place))
            })
            .collect();
        tx.send(prepared).ok();
    });
    let prepared = rx.await.map_err(|_| ServiceError::Internal("a tokenization worker failed".into()))?;
    let prepared: Vec<Prepared> = prepared.into_iter().collect::<Result<_, _>>()?;
    let tokenize = start.elapsed();
    metrics::histogram!(m::TOKENIZE_SECONDS).record(tokenize.as_secs_f64());

    let (work, receivers): (Vec<_>, Vec<_>) = prepared.iter().map(|p| WorkItem::new(p.ids.clone(), deadline)).unzip();
    ready.batcher.submit(work)?;
    let mut outputs = Vec::with_capacity(receivers.len());
    for rx in receivers {
        outputs.push(rx.await.map_err(|_| ServiceError::Internal("the engine thread stopped".into()))??);
    }
    let head = &ready.model.spec().head;
    let mut timing = pb::Timing { tokenize_ms: tokenize.as_secs_f64() * 1e3, ..Default::default() };
    let mut results = Vec::with_capacity(outputs.len());
    let mut rewards = Vec::with_capacity(outputs.len());
    for (p, out) in prepared.iter().zip(outputs) {
        timing.queue_ms = timing.queue_ms.max(out.queue.as_secs_f64() * 1e3);
        timing.inference_ms = timing.inference_ms.max(out.inference.as_secs_f64() * 1e3);
        let score = Score::from_raw(head, out.raw, &weights);
        rewards.push(score.reward);
        results.push(pb::Result {
            attributes: score.attributes.into_iter().collect(),
            reward: score.reward,
            tokens: p.ids.len() as u32,
            truncation: Some(truncation_info(p)),
        });
    }
    timing.total_ms = start.elapsed().as_secs_f64() * 1e3;
    Ok(Scored { results, rewards, timing })
}

async fn score(
    ready: Arc<Ready>,
    req: pb::ScoreRequest,
    deadline: Option<Instant>,
) -> Result<pb::ScoreResponse, ServiceError> {
    check_count(&ready, req.items.len(), "items")?;
    let policy = policy(&ready, req.truncation)?;
    let weights = weights(&ready, &req.reward_weights)?;
    let inputs = req
        .items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let place = format!("items[{i}]");
            proto_input(item, &place).map(|inp| (place, inp))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let scored = score_inputs(ready.clone(), inputs, policy, weights, deadline).await?;
    Ok(pb::ScoreResponse {
        results: scored.results,
        model_fingerprint: ready.model.fingerprint.clone(),
        timing: Some(scored.timing),
        warning: warning(&ready),
    })
}

async fn rank(
    ready: Arc<Ready>,
    req: pb::RankRequest,
    deadline: Option<Instant>,
) -> Result<pb::RankResponse, ServiceError> {
    check_count(&ready, req.candidates.len(), "candidates")?;
    let policy = policy(&ready, req.truncation)?;
    let weights = weights(&ready, &req.reward_weights)?;
    let prompt = proto_messages(&req.prompt.map(|p| p.messages).unwrap_or_default(), "prompt")?;
    // The prompt must be a conversation waiting for an assistant turn.
    if let Some(last) = prompt.last().filter(|m| m.role != Role::User) {
        return Err(ServiceError::InvalidArgument(format!(
            "prompt: messages[{}] is a {} turn; the prompt must end with a user turn (each candidate is the assistant's reply)",
            prompt.len() - 1,
            last.role.as_str()
        )));
    }
    let mut probe = prompt.clone();
    probe.push(Message::new(Role::Assistant, ""));
    validate_roles(&probe).map_err(|e| ServiceError::InvalidArgument(format!("prompt: {e}")))?;
    let inputs = req
        .candidates
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let mut conv = prompt.clone();
            conv.push(Message::new(Role::Assistant, c));
            (format!("candidates[{i}]"), Input::Messages(conv))
        })
        .collect();
    let scored = score_inputs(ready.clone(), inputs, policy, weights, deadline).await?;
    let mut order: Vec<u32> = (0..scored.rewards.len() as u32).collect();
    // Stable sort: equal rewards keep input order.
    order.sort_by(|&a, &b| scored.rewards[b as usize].total_cmp(&scored.rewards[a as usize]));
    Ok(pb::RankResponse {
        results: scored.results,
        order,
        model_fingerprint: ready.model.fingerprint.clone(),
        timing: Some(scored.timing),
        warning: warning(&ready),
    })
}

fn model_info(ready: &Ready) -> pb::ModelInfo {
    let spec = ready.model.spec();
    let head = &spec.head;
    let b = ready.batcher.config();
    pb::ModelInfo {
        architecture: spec.architecture.clone(),
        attributes: head.exposed.iter().map(|&i| head.labels[i].clone()).collect(),
        default_reward_weights: head
            .exposed
            .iter()
            .zip(&head.reward_weights)
            .map(|(&i, &w)| (head.labels[i].clone(), w))
            .collect(),
        max_input_tokens: ready.model.preprocessor.max_tokens() as u32,
        model_fingerprint: ready.model.fingerprint.clone(),
        backend: ready.model.engine.backend_name(),
        chat_template: match ready.model.preprocessor.template() {
            ChatTemplate::NemotronReward { .. } => "nemotron-reward",
            ChatTemplate::Jinja(_) => "jinja",
            ChatTemplate::None => "none",
        }
        .into(),
        vocab_size: spec.vocab as u32,
        head_outputs: head.labels.clone(),
        limits: Some(pb::Limits {
            max_batch_tokens: b.max_batch_tokens as u32,
            max_batch_requests: b.max_batch_requests as u32,
            queue_capacity: b.queue_capacity as u32,
            max_items_per_request: ready.limits.max_items_per_request as u32,
            max_message_bytes: ready.limits.max_message_bytes as u64,
            default_truncation: ready.limits.default_truncation.as_str().into(),
        }),
        warning: warning(ready),
    }
}

async fn tokenize(ready: Arc<Ready>, req: pb::TokenizeRequest) -> Result<pb::TokenizeResponse, ServiceError> {
    let policy = policy(&ready, req.truncation)?;
    let input = proto_input(req.item.unwrap_or_default(), "item")?;
    let r = ready.clone();
    let p = tokio::task::spawn_blocking(move || r.model.preprocessor.prepare(&input, policy))
        .await
        .map_err(|e| ServiceError::Internal(format!("tokenization failed: {e}")))?
        .map_err(|e| ServiceError::from(e).at("item"))?;
    Ok(pb::TokenizeResponse {
        text: p.text.clone().unwrap_or_default(),
        token_ids: p.ids.clone(),
        truncation: Some(truncation_info(&p)),
        model_fingerprint: ready.model.fingerprint.clone(),
    })
}

impl Service {
    /// Scores inputs for the HTTP endpoints: same admission, auth, batcher and default weights
    /// as gRPC. Returns the rewards, per exposed attribute its values, and the model's warning
    /// (empty unless it is the demo model).
    pub async fn score_http(
        &self,
        headers: &axum::http::HeaderMap,
        inputs: Vec<(String, Input)>,
    ) -> Result<(Vec<f32>, Vec<(String, Vec<f32>)>, String), ServiceError> {
        let metadata = MetadataMap::from_headers(headers.clone());
        self.run("OpenRLHF", &metadata, None, |ready| async move {
            check_count(&ready, inputs.len(), "queries")?;
            let weights = RewardWeights::defaults(&ready.model.spec().head);
            let policy = ready.limits.default_truncation;
            let scored = score_inputs(ready.clone(), inputs, policy, weights, None).await?;
            let head = &ready.model.spec().head;
            let attributes = head
                .exposed
                .iter()
                .map(|&i| {
                    let name = head.labels[i].clone();
                    let values = scored.results.iter().map(|r| r.attributes[&name]).collect();
                    (name, values)
                })
                .collect();
            Ok((scored.rewards, attributes, warning(&ready)))
        })
        .await
    }
}

type StreamOut = Pin<Box<dyn Stream<Item = Result<pb::ScoreStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl RewardService for Service {
    async fn score(&self, req: Request<pb::ScoreRequest>) -> Result<Response<pb::ScoreResponse>, Status> {
        self.handle("Score", req, score).await
    }

    async fn rank(&self, req: Request<pb::RankRequest>) -> Result<Response<pb::RankResponse>, Status> {
        self.handle("Rank", req, rank).await
    }

    type ScoreStreamStream = StreamOut;

    async fn score_stream(
        &self,
        req: Request<Streaming<pb::ScoreStreamRequest>>,
    ) -> Result<Response<Self::ScoreStreamStream>, Status> {
        // Refuse the whole stream up front when no message of it could be answered.
        if let Err(e) = self.auth.check(req.metadata()).and_then(|()| self.ready().map(|_| ())) {
            m::record_request("ScoreStream", e.code(), 0.0);
            return Err(e.into());
        }
        let deadline = grpc_deadline(&req, Instant::now());
        let stream_id = self.request_id(&req);
        let (metadata, _, mut inbound) = req.into_parts();
        let metadata = Arc::new(metadata);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::ScoreStreamResponse, Status>>(64);
        let service = self.clone();
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let msg = match msg {
                    Ok(m) => m,
                    Err(status) => {
                        tracing::info!(stream = %stream_id, %status, "stream closed by the client");
                        break;
                    }
                };
                let (service, metadata, tx) = (service.clone(), metadata.clone(), tx.clone());
                let span = tracing::info_span!("request", request_id = %msg.request_id, stream = %stream_id, rpc = "ScoreStream");
                tokio::spawn(
                    async move {
                        let result = service
                            .run("ScoreStream", &metadata, deadline, |ready| async move {
                                let req = msg.request.ok_or_else(|| {
                                    ServiceError::InvalidArgument("the stream message has no request".into())
                                })?;
                                score(ready, req, deadline).await
                            })
                            .await;
                        let reply = match result {
                            Ok(r) => pb::score_stream_response::Outcome::Response(r),
                            Err(e) => pb::score_stream_response::Outcome::Error(pb::Error {
                                code: e.code() as i32,
                                message: e.to_string(),
                            }),
                        };
                        tx.send(Ok(pb::ScoreStreamResponse { request_id: msg.request_id, outcome: Some(reply) }))
                            .await
                            .ok();
                    }
                    .instrument(span),
                );
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn get_model_info(&self, req: Request<pb::GetModelInfoRequest>) -> Result<Response<pb::ModelInfo>, Status> {
        self.handle("GetModelInfo", req, |ready, _, _| async move { Ok(model_info(&ready)) }).await
    }

    async fn tokenize(&self, req: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        self.handle("Tokenize", req, |ready, r, _| tokenize(ready, r)).await
    }
}
