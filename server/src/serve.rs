//! `arbiter serve`: flags, start-up (listen first, then load and warm up), and graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbiter_engine::text::TruncationPolicy;
use arbiter_engine::PackedBatch;
use arbiter_proto::v1::reward_service_server::RewardServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;

use crate::auth::BearerAuth;
use crate::error::CommandError;
use crate::gate::{Gate, Lifecycle, Ready, RequestLimits};
use crate::metrics as m;
use crate::model_args::ModelArgs;
use crate::service::Service;
use arbiter_scoring::{BatchConfig, Scorer, ScorerConfig};

/// Flags of `arbiter serve`; each also reads an environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Which model to serve.
    #[command(flatten)]
    pub model: ModelArgs,
    /// gRPC listen address.
    #[arg(long, env = "ARBITER_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// Prometheus /metrics listen address ("none" to disable).
    #[arg(long, env = "ARBITER_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: String,
    /// Token budget of one packed batch.
    #[arg(long, env = "ARBITER_MAX_BATCH_TOKENS", default_value_t = 8192)]
    pub max_batch_tokens: usize,
    /// Sequences in one packed batch.
    #[arg(long, env = "ARBITER_MAX_BATCH_REQUESTS", default_value_t = 256)]
    pub max_batch_requests: usize,
    /// Items waiting for a batch before new work gets RESOURCE_EXHAUSTED.
    #[arg(long, env = "ARBITER_QUEUE_CAPACITY", default_value_t = 4096)]
    pub queue_capacity: usize,
    /// Shortest common token-id prefix that queued items share, computing it once (0: no
    /// sharing, not even between the candidates of one Rank request).
    #[arg(long, env = "ARBITER_SHARED_PREFIX_MIN", default_value_t = arbiter_scoring::queue::DEFAULT_SHARED_PREFIX_MIN)]
    pub shared_prefix_min: usize,
    /// Items per Score request and candidates per Rank request.
    #[arg(long, env = "ARBITER_MAX_ITEMS_PER_REQUEST", default_value_t = 1024)]
    pub max_items_per_request: usize,
    /// Truncation policy when a request leaves it unspecified: "error", "truncate" or "truncate_content".
    #[arg(long, env = "ARBITER_TRUNCATION", default_value = "error")]
    pub truncation: TruncationPolicy,
    /// Threads that template and tokenize requests.
    #[arg(long, env = "ARBITER_TOKENIZATION_WORKERS", default_value_t = 2)]
    pub tokenization_workers: usize,
    /// Largest gRPC message in bytes, both directions (tonic's 4 MB default is too small for batches).
    #[arg(long, env = "ARBITER_MAX_MESSAGE_BYTES", default_value_t = 64 << 20)]
    pub max_message_bytes: usize,
    /// Require `authorization: Bearer <token>` on the reward service (health and metrics stay open).
    #[arg(long, env = "ARBITER_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// TLS certificate chain (PEM); with --tls-key, serves gRPC over TLS.
    #[arg(long, env = "ARBITER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "ARBITER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Seconds to finish accepted requests after SIGTERM/SIGINT before exiting anyway.
    #[arg(long, env = "ARBITER_SHUTDOWN_GRACE_SECONDS", default_value_t = 30.0)]
    pub shutdown_grace_seconds: f64,
    /// Seconds to keep answering UNAVAILABLE after the last accepted request is answered, before
    /// closing connections, so clients still sending learn to go elsewhere from a clean status.
    #[arg(long, env = "ARBITER_SHUTDOWN_LINGER_SECONDS", default_value_t = 1.0)]
    pub shutdown_linger_seconds: f64,
    /// Also serve the HTTP APIs on this address: OpenRLHF's remote reward (POST /get_reward),
    /// vLLM's classify (POST /classify, /v1/classify), GET /v1/models and GET /health.
    #[arg(long, env = "ARBITER_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// The old name of --http-listen (and its variable ARBITER_OPENRLHF_LISTEN), still accepted.
    #[arg(long, env = "ARBITER_OPENRLHF_LISTEN", hide = true, conflicts_with = "http_listen")]
    pub openrlhf_listen: Option<SocketAddr>,
    /// The model name GET /v1/models lists and classify answers carry (default: --model as given,
    /// as vLLM names it; "arbiter-demo" for --demo). Requests' "model" fields are not checked.
    #[arg(long, env = "ARBITER_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// OpenRLHF: "split" scores [user: prompt, assistant: response]; "raw" scores the query text as is.
    #[arg(long, env = "ARBITER_OPENRLHF_MODE", value_enum, default_value = "split")]
    pub openrlhf_mode: crate::http::openrlhf::Mode,
    /// OpenRLHF: the policy's end-of-turn marker, stripped from the end of responses (repeatable).
    #[arg(long, env = "ARBITER_OPENRLHF_EOT", value_delimiter = ',')]
    pub openrlhf_eot: Vec<String>,
    /// Skip the warm-up batch (on a GPU it checks that --max-batch-tokens fits before SERVING).
    #[arg(long, env = "ARBITER_NO_WARMUP")]
    pub no_warmup: bool,
}

/// Name under which the health service reports the reward service.
pub const SERVICE_NAME: &str = "arbiter.v1.RewardService";

/// A started server: where it listens, and how to stop it.
pub struct Running {
    /// The bound gRPC address (useful with port 0).
    pub addr: SocketAddr,
    /// The bound HTTP address (--http-listen), if enabled.
    pub http_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<Result<(), CommandError>>,
}

/// Starts a graceful shutdown of a [`Running`] server from anywhere.
#[derive(Clone)]
pub struct StopHandle(watch::Sender<bool>);

impl StopHandle {
    /// Starts a graceful shutdown, as SIGTERM does.
    pub fn stop(&self) {
        self.0.send(true).ok();
    }
}

impl Running {
    /// Starts a graceful shutdown, as SIGTERM does.
    pub fn stop(&self) {
        self.stop.send(true).ok();
    }

    /// A handle that can stop the server after `self` moved into [`Running::wait`].
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop.clone())
    }

    /// Waits for the server to finish (after a stop, or a failed start).
    pub async fn wait(self) -> Result<(), CommandError> {
        self.done.await.map_err(|e| CommandError::Stopped(format!("the server task failed: {e}")))?
    }
}

/// Binds, then loads and warms up the model in the background; health says NOT_SERVING until
/// the model is ready, SERVING after, NOT_SERVING again once draining starts.
pub async fn start(args: ServeArgs) -> Result<Running, CommandError> {
    let bind = |source| CommandError::Bind { flag: "--listen", addr: args.listen.to_string(), source };
    let listener = TcpListener::bind(args.listen).await.map_err(bind)?;
    let addr = listener.local_addr().map_err(bind)?;
    if args.metrics_listen != "none" {
        let maddr: SocketAddr = args.metrics_listen.parse().map_err(|e| CommandError::Flag {
            flag: "--metrics-listen",
            message: format!("{:?} is not HOST:PORT or \"none\": {e}", args.metrics_listen),
        })?;
        m::install(maddr).map_err(|message| CommandError::Setup { what: "the metrics exporter", message })?;
        tracing::info!(%maddr, "metrics on /metrics");
    }
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::NotServing).await;
    health.set_service_status(SERVICE_NAME, ServingStatus::NotServing).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(arbiter_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(setup("gRPC reflection"))?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(arbiter_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(setup("gRPC reflection"))?;

    let lifecycle = Arc::new(Lifecycle::default());
    let gate = Gate::new(lifecycle.clone(), BearerAuth::new(args.auth_token.as_deref()));
    let reward = RewardServiceServer::new(Service::new(gate.clone()))
        .max_decoding_message_size(args.max_message_bytes)
        .max_encoding_message_size(args.max_message_bytes);

    let mut builder = Server::builder().layer(crate::refusals::RefusalLayer);
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let read = |flag, path: &std::path::PathBuf| {
            std::fs::read(path).map_err(|source| CommandError::ReadFile { flag, path: path.clone(), source })
        };
        let (cert, key) = (read("--tls-cert", cert)?, read("--tls-key", key)?);
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .map_err(setup("TLS (--tls-cert, --tls-key)"))?;
    }
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let (grpc_stop_tx, mut grpc_stop_rx) = watch::channel(false);
    let router =
        builder.add_service(health_svc).add_service(reflection).add_service(reflection_alpha).add_service(reward);
    let grpc = tokio::spawn(router.serve_with_incoming_shutdown(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        async move {
            grpc_stop_rx.wait_for(|s| *s).await.ok();
        },
    ));
    tracing::info!(%addr, "listening (NOT_SERVING until the model is loaded)");
    let http_addr = match args.http_listen.or(args.openrlhf_listen) {
        Some(a) => {
            let settings = crate::http::Settings {
                openrlhf: crate::http::openrlhf::Settings { mode: args.openrlhf_mode, eot: args.openrlhf_eot.clone() },
                served_model_name: served_model_name(&args),
                max_body_bytes: args.max_message_bytes,
            };
            let mut rx = grpc_stop_tx.subscribe();
            let bound = crate::http::serve(a, gate.clone(), settings, async move {
                rx.wait_for(|s| *s).await.ok();
            })
            .await
            .map_err(|source| CommandError::Bind {
                flag: "--http-listen",
                addr: a.to_string(),
                source,
            })?;
            tracing::info!(addr = %bound, "HTTP: POST /get_reward (OpenRLHF), POST /classify (vLLM), GET /v1/models, GET /health");
            Some(bound)
        }
        None => None,
    };

    // A model-parallel rank that fails breaks the engine for good: report NOT_SERVING (by
    // draining), answer what can be answered, and exit with the reason instead of hanging.
    let fatal: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let on_fatal: arbiter_scoring::queue::OnFatal = {
        let (fatal, stop) = (fatal.clone(), stop_tx.clone());
        Arc::new(move |why: String| {
            tracing::error!(error = %why, "the engine failed; stopping (NOT_SERVING)");
            arbiter_engine::sync::lock(&fatal).get_or_insert(why);
            stop.send(true).ok();
        })
    };
    let done = tokio::spawn(async move {
        let model = tokio::select! {
            r = load_model(&args) => r?,
            _ = stop_rx.wait_for(|s| *s) => {
                grpc_stop_tx.send(true).ok();
                return Ok(());
            }
        };
        if let Some(worker) = model.worker.clone() {
            // A pipeline worker: its stages run what the leader sends. Health's overall status says
            // SERVING for probes; the RewardService stays NOT_SERVING here (only the leader answers).
            health.set_service_status("", ServingStatus::Serving).await;
            metrics::gauge!(m::READY).set(1.0);
            tracing::info!(node_rank = args.model.node_rank, "pipeline worker SERVING");
            let run = tokio::task::spawn_blocking(move || worker.run_worker());
            let outcome = tokio::select! {
                r = run => Some(r),
                _ = stop_rx.wait_for(|s| *s) => None,
            };
            health.set_service_status("", ServingStatus::NotServing).await;
            metrics::gauge!(m::READY).set(0.0);
            grpc_stop_tx.send(true).ok();
            return match outcome {
                None => Ok(()),
                Some(Ok(Ok(()))) => Ok(()),
                Some(Ok(Err(e))) => Err(CommandError::Stopped(format!("pipeline worker stopped: {e}"))),
                Some(Err(e)) => Err(CommandError::Stopped(format!("pipeline worker crashed: {e}"))),
            };
        }
        let ready = tokio::select! {
            r = prepare(&args, model, on_fatal.clone()) => r?,
            _ = stop_rx.wait_for(|s| *s) => {
                grpc_stop_tx.send(true).ok();
                return Ok(());
            }
        };
        gate.set_ready(ready.clone());
        health.set_service_status("", ServingStatus::Serving).await;
        health.set_service_status(SERVICE_NAME, ServingStatus::Serving).await;
        metrics::gauge!(m::READY).set(1.0);
        tracing::info!(%addr, "SERVING");
        {
            // A node lost while idle must stop the server too, not only one found by a batch.
            let (engine, mut stop) = (ready.scorer.model().engine.clone(), stop_rx.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    if let Err(e) = engine.health() {
                        on_fatal(e.to_string());
                        return;
                    }
                }
            });
        }

        stop_rx.wait_for(|s| *s).await.ok();
        tracing::info!(in_flight = lifecycle.in_flight(), "draining: NOT_SERVING, answering accepted requests");
        health.set_service_status("", ServingStatus::NotServing).await;
        health.set_service_status(SERVICE_NAME, ServingStatus::NotServing).await;
        metrics::gauge!(m::READY).set(0.0);
        lifecycle.start_draining();
        let grace = Duration::from_secs_f64(args.shutdown_grace_seconds.max(0.0));
        let t = Instant::now();
        while lifecycle.in_flight() > 0 && t.elapsed() < grace {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if lifecycle.in_flight() > 0 {
            tracing::warn!(in_flight = lifecycle.in_flight(), "grace period over; exiting with requests unanswered");
        } else {
            let linger = Duration::from_secs_f64(args.shutdown_linger_seconds.max(0.0));
            tokio::time::sleep(linger.min(grace.saturating_sub(t.elapsed()))).await;
        }
        grpc_stop_tx.send(true).ok();
        let left = grace.saturating_sub(t.elapsed()).max(Duration::from_millis(100));
        if tokio::time::timeout(left, grpc).await.is_err() {
            tracing::warn!("connections still open after the grace period; closing them");
        }
        let scorer_done = tokio::task::spawn_blocking(move || ready.scorer.shutdown());
        scorer_done.await.ok();
        if let Some(why) = arbiter_engine::sync::lock(&fatal).take() {
            return Err(CommandError::Stopped(format!("stopped because the engine failed: {why}")));
        }
        tracing::info!("stopped");
        Ok(())
    });
    Ok(Running { addr, http_addr, stop: stop_tx, done })
}

/// A setup step's error, as [`CommandError::Setup`].
fn setup<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> CommandError {
    move |e| CommandError::Setup { what, message: e.to_string() }
}

/// The name the HTTP APIs give the model: --served-model-name, else --model as given (vLLM's
/// default, so that a trainer configured with that path sees its own name back).
fn served_model_name(args: &ServeArgs) -> String {
    match (&args.served_model_name, &args.model.model) {
        (Some(name), _) => name.clone(),
        (None, Some(dir)) => dir.display().to_string(),
        (None, None) => "arbiter-demo".into(),
    }
}

/// Loads the model (on several nodes: after the rendezvous).
async fn load_model(args: &ServeArgs) -> Result<arbiter_engine::runtime::LoadedModel, CommandError> {
    let a = args.clone();
    let model = tokio::task::spawn_blocking(move || {
        let folder = a.model.open()?;
        crate::memory_plan::check(&a, &folder)?;
        a.model.load_folder(folder)
    })
    .await
    .map_err(setup("the loading thread"))??;
    tracing::info!(
        dir = %model.dir.display(),
        fingerprint = %model.fingerprint,
        backend = %model.engine.backend_name(),
        seconds = model.load_seconds,
        "model loaded"
    );
    if model.spec().demo {
        tracing::warn!("{}", arbiter_engine::demo::DEMO_WARNING);
    }
    m::record_info(&model.spec().architecture, &model.fingerprint, &model.engine.backend_name(), model.load_seconds);
    Ok(model)
}

/// Tokens of the CPU warm-up: enough to run every layer and read every weight once.
const CPU_WARM_UP_TOKENS: usize = 64;

/// Runs the warm-up batch (on a GPU the largest the limits allow, its memory check; on the CPU
/// one short sequence) and starts the scoring core.
async fn prepare(
    args: &ServeArgs,
    model: arbiter_engine::runtime::LoadedModel,
    on_fatal: arbiter_scoring::queue::OnFatal,
) -> Result<Arc<Ready>, CommandError> {
    let cfg = BatchConfig {
        max_batch_tokens: args.max_batch_tokens.max(1),
        max_batch_requests: args.max_batch_requests.max(1),
        queue_capacity: args.queue_capacity.max(1),
        shared_prefix_min: (args.shared_prefix_min > 0).then_some(args.shared_prefix_min),
    };
    if !args.no_warmup {
        let engine = model.engine.clone();
        let max_len = model.preprocessor.max_tokens();
        // The CPU allocates as it goes, so a full batch would check nothing and only delay SERVING
        // (seconds even for the demo model); one short sequence still reads every weight once.
        // A GPU must prove the largest batch fits in its memory before it takes traffic.
        let (tokens, requests) = match args.model.device {
            arbiter_engine::runtime::Device::Cpu => (cfg.max_batch_tokens.min(CPU_WARM_UP_TOKENS), 1),
            arbiter_engine::runtime::Device::Cuda(_) => (cfg.max_batch_tokens, cfg.max_batch_requests),
        };
        let t = Instant::now();
        tokio::task::spawn_blocking(move || warm_up(engine.as_ref(), tokens, requests, max_len))
            .await
            .map_err(setup("the warm-up thread"))?
            .map_err(CommandError::engine(format!(
                "the warm-up batch of {tokens} tokens failed (lower --max-batch-tokens, or \
                 ARBITER_MAX_BATCH_TOKENS, until it fits)"
            )))?;
        tracing::info!(tokens, seconds = t.elapsed().as_secs_f64(), "warm-up batch done");
    }
    let scorer_cfg = ScorerConfig { batch: cfg, tokenization_workers: args.tokenization_workers.max(1) };
    let scorer = Scorer::start(model, scorer_cfg, Some(on_fatal)).map_err(setup("starting the engine threads"))?;
    let limits = RequestLimits {
        max_items_per_request: args.max_items_per_request.max(1),
        max_message_bytes: args.max_message_bytes,
        default_truncation: args.truncation,
    };
    Ok(Arc::new(Ready { scorer, limits }))
}

/// One batch as large as the limits allow: full-length sequences up to the token budget.
fn warm_up(
    engine: &dyn arbiter_engine::runtime::Engine,
    tokens: usize,
    requests: usize,
    max_len: usize,
) -> arbiter_engine::Result<()> {
    let len = max_len.min(tokens).max(1);
    let vocab = engine.spec().vocab as u32;
    let mut seqs = Vec::new();
    let mut left = tokens;
    while left > 0 && seqs.len() < requests {
        let n = left.min(len);
        seqs.push((0..n as u32).map(|i| (i * 7 + 3) % vocab).collect::<Vec<u32>>());
        left -= n;
    }
    engine.forward(&PackedBatch::from_sequences(&seqs)?).map(|_| ())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Only {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn parse(extra: &[&str]) -> Result<ServeArgs, clap::Error> {
        Only::try_parse_from([&["arbiter", "--demo"], extra].concat()).map(|o| o.args)
    }

    #[test]
    fn the_http_port_keeps_its_old_flag_name() {
        let a = parse(&["--http-listen", "127.0.0.1:5000"]).unwrap();
        assert_eq!(a.http_listen, Some("127.0.0.1:5000".parse().unwrap()));
        let a = parse(&["--openrlhf-listen", "127.0.0.1:5001"]).unwrap();
        assert_eq!(a.http_listen.or(a.openrlhf_listen), Some("127.0.0.1:5001".parse().unwrap()));
        assert!(parse(&["--http-listen", "127.0.0.1:1", "--openrlhf-listen", "127.0.0.1:2"]).is_err());
    }

    #[test]
    fn the_served_name_defaults_to_the_model_argument() {
        assert_eq!(served_model_name(&parse(&[]).unwrap()), "arbiter-demo");
        assert_eq!(served_model_name(&parse(&["--served-model-name", "rm"]).unwrap()), "rm");
        let a = Only::try_parse_from(["arbiter", "--model", "/models/skywork"]).unwrap().args;
        assert_eq!(served_model_name(&a), "/models/skywork");
    }
}
