//! Rust client of arbiter's gRPC API (`arbiter.v1`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), arbiter_client::ClientError> {
//! use arbiter_client::{items, Client, ClientConfig};
//! let client = Client::connect(ClientConfig::new("http://127.0.0.1:50051")).await?;
//! let item = items::conversation_item(&[("user", "2+2?"), ("assistant", "4")]);
//! let results = client.score(vec![item], &Default::default()).await?;
//! println!("{}", results[0].reward);
//! # Ok(()) }
//! ```
//!
//! Calls carry the configured deadline; UNAVAILABLE and RESOURCE_EXHAUSTED (the request was not
//! computed) are retried with exponential backoff, nothing else is.
#![deny(missing_docs)]

use std::collections::HashMap;
use std::time::Duration;

pub use arbiter_proto::v1 as pb;
use pb::reward_service_client::RewardServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

/// One scored item.
pub type ScoreResult = pb::Result;
/// An item to score (conversation, text or token ids).
pub type Item = pb::Item;

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint, TLS settings or token are unusable.
    #[error("bad client configuration: {0}")]
    Config(String),
    /// The server could not be reached.
    #[error("cannot connect to {endpoint}: {message}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// Why.
        message: String,
    },
    /// The server answered with an error (after `attempts` tries).
    #[error("{code:?}: {message} (after {attempts} attempt(s))")]
    Status {
        /// gRPC status code.
        code: Code,
        /// The server's message.
        message: String,
        /// How many times the call was made.
        attempts: u32,
    },
}

/// An error and its causes as one line ("transport error: tcp connect error: Connection refused
/// (os error 111)"): tonic's own Display says only "transport error", and its Debug form is a
/// nested struct dump no user should have to read.
fn causes(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        // hyper repeats its inner error in its own message; print each text once.
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = cause.source();
    }
    parts.join(": ")
}

impl ClientError {
    /// The gRPC code, for server errors.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// How to reach and call a server.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `http://host:port` or `https://host:port`.
    pub endpoint: String,
    /// Bearer token sent as `authorization: Bearer <token>`.
    pub token: Option<String>,
    /// PEM of the CA that signed the server's certificate (implies TLS).
    pub tls_ca_pem: Option<Vec<u8>>,
    /// Deadline of each call.
    pub timeout: Option<Duration>,
    /// Retries after UNAVAILABLE or RESOURCE_EXHAUSTED.
    pub retries: u32,
    /// First backoff; doubles on each retry.
    pub backoff: Duration,
    /// Largest message in either direction.
    pub max_message_bytes: usize,
}

impl ClientConfig {
    /// Defaults: 60 s deadline, 3 retries from 200 ms, 256 MiB messages, no token, no TLS.
    pub fn new(endpoint: impl Into<String>) -> Self {
        ClientConfig {
            endpoint: endpoint.into(),
            token: None,
            tls_ca_pem: None,
            timeout: Some(Duration::from_secs(60)),
            retries: 3,
            backoff: Duration::from_millis(200),
            max_message_bytes: 256 << 20,
        }
    }
}

/// Per-call options of Score and Rank.
#[derive(Debug, Clone, Default)]
pub struct ScoreOptions {
    /// Truncation policy (unspecified: the server's default).
    pub truncation: pb::Truncation,
    /// Reward weight overrides by attribute name.
    pub reward_weights: HashMap<String, f32>,
    /// Score conversations after every assistant turn too (`Result.turns`; Score and
    /// ScoreStream only).
    pub per_turn: bool,
}

impl ScoreOptions {
    fn request(&self, items: Vec<Item>) -> pb::ScoreRequest {
        pb::ScoreRequest {
            items,
            truncation: self.truncation as i32,
            reward_weights: self.reward_weights.clone(),
            per_turn: self.per_turn,
        }
    }
}

/// Adds the bearer token to every request.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A connected client; cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct Client {
    stub: RewardServiceClient<InterceptedService<Channel, Auth>>,
    cfg: ClientConfig,
}

/// Constructors of items.
pub mod items {
    use super::{conversation, pb, Item};

    /// A conversation from (role, content) pairs.
    pub fn conversation_item(messages: &[(&str, &str)]) -> Item {
        pb::Item { input: Some(pb::item::Input::Conversation(conversation(messages))) }
    }
    /// Pre-templated text.
    pub fn text(text: impl Into<String>) -> Item {
        pb::Item { input: Some(pb::item::Input::Text(text.into())) }
    }
    /// Token ids.
    pub fn token_ids(ids: Vec<u32>) -> Item {
        pb::Item { input: Some(pb::item::Input::TokenIds(pb::TokenIds { ids })) }
    }
}

/// A conversation (e.g. a Rank prompt) from (role, content) pairs.
pub fn conversation(messages: &[(&str, &str)]) -> pb::Conversation {
    pb::Conversation {
        messages: messages.iter().map(|(r, c)| pb::Message { role: r.to_string(), content: c.to_string() }).collect(),
    }
}

/// The error of a failed call. tonic reports an expired deadline (its own, or the server's
/// timeout layer) as CANCELLED "Timeout expired"; callers asked for a deadline, so it is
/// reported as DEADLINE_EXCEEDED, as other gRPC implementations do.
fn status_error(s: &Status, attempts: u32) -> ClientError {
    let code = match s.code() {
        Code::Cancelled if s.message() == "Timeout expired" => Code::DeadlineExceeded,
        c => c,
    };
    ClientError::Status { code, message: s.message().to_string(), attempts }
}

fn retryable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::ResourceExhausted)
}

impl Client {
    /// Connects to `cfg.endpoint`.
    pub async fn connect(cfg: ClientConfig) -> Result<Self, ClientError> {
        let mut ep = Endpoint::from_shared(cfg.endpoint.clone()).map_err(|e| ClientError::Config(e.to_string()))?;
        if let Some(ca) = &cfg.tls_ca_pem {
            ep = ep
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
                .map_err(|e| ClientError::Config(format!("TLS: {e}")))?;
        }
        let channel = ep
            .connect()
            .await
            .map_err(|e| ClientError::Connect { endpoint: cfg.endpoint.clone(), message: causes(&e) })?;
        let token = match &cfg.token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| ClientError::Config("the token is not printable ASCII".into()))?,
            ),
            None => None,
        };
        let stub = RewardServiceClient::with_interceptor(channel, Auth(token))
            .max_decoding_message_size(cfg.max_message_bytes)
            .max_encoding_message_size(cfg.max_message_bytes);
        Ok(Client { stub, cfg })
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(t) = self.cfg.timeout {
            r.set_timeout(t);
        }
        r
    }

    /// Calls `f` until it succeeds, fails with a non-retryable code, or runs out of retries.
    async fn retry<T, R, F, Fut>(&self, msg: T, mut f: F) -> Result<R, ClientError>
    where
        T: Clone,
        F: FnMut(RewardServiceClient<InterceptedService<Channel, Auth>>, Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match f(self.stub.clone(), self.request(msg.clone())).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if retryable(s.code()) && attempts <= self.cfg.retries => {
                    tokio::time::sleep(self.cfg.backoff * 2u32.saturating_pow(attempts - 1)).await;
                }
                Err(s) => return Err(status_error(&s, attempts)),
            }
        }
    }

    /// Scores items; results in item order.
    pub async fn score(&self, items: Vec<Item>, opts: &ScoreOptions) -> Result<Vec<ScoreResult>, ClientError> {
        let req = opts.request(items);
        Ok(self.retry(req, |mut s, r| async move { s.score(r).await }).await?.results)
    }

    /// Scores each candidate as the assistant's reply to `prompt`; `order` is best first.
    pub async fn rank(
        &self,
        prompt: pb::Conversation,
        candidates: Vec<String>,
        opts: &ScoreOptions,
    ) -> Result<pb::RankResponse, ClientError> {
        let req = pb::RankRequest {
            prompt: Some(prompt),
            candidates,
            truncation: opts.truncation as i32,
            reward_weights: opts.reward_weights.clone(),
        };
        self.retry(req, |mut s, r| async move { s.rank(r).await }).await
    }

    /// ScoreStream: sends `requests` and returns the answers in completion order, each with its
    /// request id. The stream itself is not retried (its requests may have been computed).
    pub async fn stream(
        &self,
        requests: Vec<(String, Vec<Item>)>,
        opts: &ScoreOptions,
    ) -> Result<Vec<(String, Result<Vec<ScoreResult>, ClientError>)>, ClientError> {
        let msgs: Vec<pb::ScoreStreamRequest> = requests
            .into_iter()
            .map(|(id, items)| pb::ScoreStreamRequest { request_id: id, request: Some(opts.request(items)) })
            .collect();
        let status = |s: Status| status_error(&s, 1);
        let mut stub = self.stub.clone();
        let mut inbound = stub.score_stream(self.request(tokio_stream::iter(msgs))).await.map_err(status)?.into_inner();
        let mut out = Vec::new();
        while let Some(m) = inbound.message().await.map_err(status)? {
            let r = match m.outcome {
                Some(pb::score_stream_response::Outcome::Response(r)) => Ok(r.results),
                Some(pb::score_stream_response::Outcome::Error(e)) => {
                    Err(ClientError::Status { code: Code::from(e.code), message: e.message, attempts: 1 })
                }
                None => Err(ClientError::Status {
                    code: Code::Internal,
                    message: "empty stream response".into(),
                    attempts: 1,
                }),
            };
            out.push((m.request_id, r));
        }
        Ok(out)
    }

    /// The model and the server's limits.
    pub async fn model_info(&self) -> Result<pb::ModelInfo, ClientError> {
        self.retry(pb::GetModelInfoRequest {}, |mut s, r| async move { s.get_model_info(r).await }).await
    }
}
