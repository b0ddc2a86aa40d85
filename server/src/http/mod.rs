//! The HTTP port (`--http-listen`, axum): the APIs RL frameworks already call, each translated
//! into the scoring core's items behind the same [`Gate`] (bearer token, admission while
//! draining, outcome metrics) as gRPC.
//!
//! | route | API | module |
//! |---|---|---|
//! | `POST /get_reward`, `POST /` | OpenRLHF's remote reward | [`openrlhf`] |
//! | `POST /classify`, `POST /v1/classify` | vLLM's pooling classify API (verl's discriminative reward) | [`classify`] |
//! | `GET /v1/models` | vLLM's (OpenAI's) model list | [`models`] |
//! | `GET /health` | vLLM's health probe: 200 while serving, 503 otherwise; no token needed | [`models`] |

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::Router;
use tonic::metadata::MetadataMap;

use crate::gate::Gate;

pub mod classify;
pub mod models;
pub mod openrlhf;

/// Settings of the HTTP port.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How OpenRLHF queries become inputs.
    pub openrlhf: openrlhf::Settings,
    /// The model name `/v1/models` lists and classify responses carry (vLLM's
    /// `--served-model-name`; by default the `--model` argument as given, as vLLM does).
    pub served_model_name: String,
    /// Largest request body in bytes (`--max-message-bytes`, as for gRPC).
    pub max_body_bytes: usize,
}

/// What every handler gets.
#[derive(Clone)]
pub(crate) struct App {
    gate: Gate,
    settings: Arc<Settings>,
}

/// The routes of the HTTP port.
pub fn router(gate: Gate, settings: Settings) -> Router {
    let limit = settings.max_body_bytes;
    Router::new()
        .route("/get_reward", post(openrlhf::handle))
        .route("/", post(openrlhf::handle))
        .route("/classify", post(classify::handle))
        .route("/v1/classify", post(classify::handle))
        .route("/v1/models", get(models::list))
        .route("/health", get(models::health))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(App { gate, settings: Arc::new(settings) })
}

/// Serves the HTTP port on `addr` until `shutdown` resolves; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    gate: Gate,
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let app = router(gate, settings);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!(error = %e, "HTTP endpoint stopped");
        }
    });
    Ok(bound)
}

/// The request's headers as the gate reads them (`authorization`, `x-request-id`).
fn metadata(headers: HeaderMap) -> MetadataMap {
    MetadataMap::from_headers(headers)
}
