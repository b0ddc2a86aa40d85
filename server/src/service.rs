//! The `arbiter.v1.RewardService`: translates proto messages into the scoring core's items and
//! its results back into proto messages. Admission, auth, deadlines and outcome metrics come
//! from the [`Gate`]; queueing, batching and scoring from the core ([`arbiter_scoring`]).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use arbiter_engine::text::{ChatTemplate, Input, Message, Role, Truncation, TruncationPolicy};
use arbiter_engine::RewardWeights;
use arbiter_proto::v1 as pb;
use arbiter_scoring::{Item, ItemScore, Options, Scored, TurnScore};
use pb::reward_service_server::RewardService;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::error::ServiceError;
use crate::gate::{Gate, Ready};
use crate::metrics as m;

/// The gRPC service.
#[derive(Clone)]
pub struct Service {
    gate: Gate,
}

impl Service {
    /// The gRPC front end behind `gate`.
    pub fn new(gate: Gate) -> Self {
        Service { gate }
    }

    /// A unary RPC: [`Gate::run`] inside a span carrying the request id.
    async fn handle<T, F, Fut>(&self, rpc: &'static str, req: Request<T>, f: F) -> Result<Response<T::Out>, Status>
    where
        T: Payload,
        F: FnOnce(Arc<Ready>, T, Option<Instant>) -> Fut,
        Fut: std::future::Future<Output = Result<T::Out, ServiceError>>,
    {
        mark_handled(&req);
        let span = tracing::info_span!("request", request_id = %self.gate.request_id(req.metadata()), rpc);
        let deadline = grpc_deadline(&req, Instant::now());
        let (metadata, _, msg) = req.into_parts();
        self.gate
            .run(rpc, &metadata, deadline, |ready| f(ready, msg, deadline))
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }
}

/// Tells the refusal layer that this request reached its handler, which records its outcome.
fn mark_handled<T>(req: &Request<T>) {
    if let Some(h) = req.extensions().get::<crate::refusals::Handled>() {
        h.mark();
    }
}

/// The status that ends a stream whose next message could not be read, if the client sent
/// something wrong (too large, undecodable) rather than going away.
fn stream_refusal(status: &Status) -> Option<Status> {
    match status.code() {
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => {
            Some(Status::resource_exhausted(status.message().to_string()))
        }
        tonic::Code::InvalidArgument => Some(Status::invalid_argument(status.message().to_string())),
        _ => None,
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

/// The deadline a client set with `grpc-timeout`, if any.
fn grpc_deadline<T>(req: &Request<T>, start: Instant) -> Option<Instant> {
    use std::time::Duration;
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
        None => Err(ServiceError::InvalidArgument(format!("{place}: no input; set conversation, text or token_ids"))),
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
    RewardWeights::with_overrides(&ready.scorer.model().spec().head, sorted.into_iter().map(|(k, v)| (k.as_str(), *v)))
        .map_err(|e| ServiceError::InvalidArgument(format!("reward_weights: {e}")))
}

fn truncation_info(t: &Truncation) -> pb::TruncationInfo {
    pb::TruncationInfo {
        truncated: t.truncated(),
        original_tokens: t.original_tokens as u32,
        dropped_messages: t.dropped_messages as u32,
        dropped_tokens: t.dropped_tokens as u32,
    }
}

fn proto_result(s: ItemScore) -> pb::Result {
    pb::Result {
        attributes: s.score.attributes.into_iter().collect(),
        reward: s.score.reward,
        tokens: s.tokens as u32,
        truncation: Some(truncation_info(&s.truncation)),
        turns: s.turns.into_iter().map(proto_turn).collect(),
    }
}

fn proto_turn(t: TurnScore) -> pb::TurnResult {
    let (scored, attributes, reward) = match t.score {
        Some(s) => (true, s.attributes.into_iter().collect(), s.reward),
        None => (false, Default::default(), 0.0),
    };
    pb::TurnResult {
        message_index: t.message as u32,
        scored,
        attributes,
        reward,
        tokens: t.tokens as u32,
        on_spine: t.on_spine,
    }
}

/// The results and the request's timing (the slowest item's queue and inference times).
fn proto_results(scored: Scored, start: Instant) -> (Vec<pb::Result>, pb::Timing) {
    let mut timing = pb::Timing { tokenize_ms: scored.tokenize.as_secs_f64() * 1e3, ..Default::default() };
    for s in &scored.items {
        timing.queue_ms = timing.queue_ms.max(s.queue.as_secs_f64() * 1e3);
        timing.inference_ms = timing.inference_ms.max(s.inference.as_secs_f64() * 1e3);
    }
    let results = scored.items.into_iter().map(proto_result).collect();
    timing.total_ms = start.elapsed().as_secs_f64() * 1e3;
    (results, timing)
}

fn options(deadline: Option<Instant>) -> Options {
    Options { deadline, wait_for_space: false }
}

async fn score(
    ready: Arc<Ready>,
    req: pb::ScoreRequest,
    deadline: Option<Instant>,
) -> Result<pb::ScoreResponse, ServiceError> {
    ready.check_count(req.items.len(), "items")?;
    let truncation = policy(&ready, req.truncation)?;
    let weights = weights(&ready, &req.reward_weights)?;
    let items = req
        .items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let input = proto_input(item, &format!("items[{i}]"))?;
            Ok(Item { input, truncation, weights: Some(weights.clone()), per_turn: req.per_turn })
        })
        .collect::<Result<Vec<_>, ServiceError>>()?;
    let start = Instant::now();
    let scored =
        ready.scorer.score(items, options(deadline)).await.map_err(|e| ServiceError::from_request(e, "items"))?;
    let (results, timing) = proto_results(scored, start);
    Ok(pb::ScoreResponse {
        results,
        model_fingerprint: ready.scorer.model().fingerprint.clone(),
        timing: Some(timing),
        warning: ready.warning(),
    })
}

async fn rank(
    ready: Arc<Ready>,
    req: pb::RankRequest,
    deadline: Option<Instant>,
) -> Result<pb::RankResponse, ServiceError> {
    ready.check_count(req.candidates.len(), "candidates")?;
    let truncation = policy(&ready, req.truncation)?;
    let weights = weights(&ready, &req.reward_weights)?;
    let prompt = proto_messages(&req.prompt.map(|p| p.messages).unwrap_or_default(), "prompt")?;
    let start = Instant::now();
    let ranked = ready
        .scorer
        .rank(prompt, req.candidates, truncation, Some(weights), options(deadline))
        .await
        .map_err(|e| ServiceError::from_request(e, "candidates"))?;
    let (results, timing) = proto_results(ranked.scored, start);
    Ok(pb::RankResponse {
        results,
        order: ranked.order.into_iter().map(|i| i as u32).collect(),
        model_fingerprint: ready.scorer.model().fingerprint.clone(),
        timing: Some(timing),
        warning: ready.warning(),
    })
}

fn model_info(ready: &Ready) -> pb::ModelInfo {
    let model = ready.scorer.model();
    let spec = model.spec();
    let head = &spec.head;
    let b = ready.scorer.batch_config();
    pb::ModelInfo {
        architecture: spec.architecture.clone(),
        attributes: head.exposed.iter().map(|&i| head.labels[i].clone()).collect(),
        default_reward_weights: head
            .exposed
            .iter()
            .zip(&head.reward_weights)
            .map(|(&i, &w)| (head.labels[i].clone(), w))
            .collect(),
        max_input_tokens: model.preprocessor.max_tokens() as u32,
        model_fingerprint: model.fingerprint.clone(),
        backend: model.engine.backend_name(),
        chat_template: match model.preprocessor.template() {
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
        warning: ready.warning(),
    }
}

async fn tokenize(ready: Arc<Ready>, req: pb::TokenizeRequest) -> Result<pb::TokenizeResponse, ServiceError> {
    let policy = policy(&ready, req.truncation)?;
    let input = proto_input(req.item.unwrap_or_default(), "item")?;
    let r = ready.clone();
    let p = tokio::task::spawn_blocking(move || r.scorer.model().preprocessor.prepare(&input, policy))
        .await
        .map_err(|e| ServiceError::Internal(format!("tokenization failed: {e}")))?
        .map_err(|e| ServiceError::from(e).at("item"))?;
    Ok(pb::TokenizeResponse {
        text: p.text.clone().unwrap_or_default(),
        token_ids: p.ids.clone(),
        truncation: Some(truncation_info(&p.truncation)),
        model_fingerprint: ready.scorer.model().fingerprint.clone(),
    })
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
        mark_handled(&req);
        // Refuse the whole stream up front when no message of it could be answered.
        if let Err(e) = self.gate.authenticate(req.metadata()).and_then(|()| self.gate.ready().map(|_| ())) {
            m::record_request("ScoreStream", e.code(), 0.0);
            return Err(e.into());
        }
        let deadline = grpc_deadline(&req, Instant::now());
        let stream_id = self.gate.request_id(req.metadata());
        let (metadata, _, mut inbound) = req.into_parts();
        let metadata = Arc::new(metadata);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::ScoreStreamResponse, Status>>(64);
        let service = self.clone();
        tokio::spawn(async move {
            let mut answering = Vec::new();
            while let Some(msg) = inbound.next().await {
                let msg = match msg {
                    Ok(m) => m,
                    Err(status) => {
                        if let Some(refusal) = stream_refusal(&status) {
                            // Deliver the answers already being computed, then end the stream
                            // with the refusal (tonic ends it at the first error).
                            tracing::info!(stream = %stream_id, %status, "stream message refused");
                            for task in answering.drain(..) {
                                let _: Result<(), _> = task.await;
                            }
                            m::record_request("ScoreStream", refusal.code(), 0.0);
                            tx.send(Err(refusal)).await.ok();
                        } else {
                            tracing::info!(stream = %stream_id, %status, "stream closed by the client");
                        }
                        break;
                    }
                };
                answering.retain(|t: &tokio::task::JoinHandle<()>| !t.is_finished());
                let (service, metadata, tx) = (service.clone(), metadata.clone(), tx.clone());
                let span = tracing::info_span!("request", request_id = %msg.request_id, stream = %stream_id, rpc = "ScoreStream");
                answering.push(tokio::spawn(
                    async move {
                        let result = service
                            .gate
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
                ));
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
