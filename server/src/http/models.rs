//! vLLM's (OpenAI-style) `GET /v1/models` and vLLM's `GET /health`, so that tools which probe a
//! vLLM server before using it (verl's reward-model client, OpenAI client libraries) find one.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::classify::reject;
use super::{metadata, App};

/// `GET /v1/models`: the one served model, `{"object": "list", "data": [{"id", "object": "model",
/// "created", "owned_by", "root", "parent", "max_model_len"}]}` as vLLM lists it. Needs the bearer
/// token when the server has one, as vLLM's `--api-key` does for every `/v1` route.
pub(super) async fn list(State(app): State<App>, headers: HeaderMap) -> Response {
    let name = app.settings.served_model_name.clone();
    let answer = app
        .gate
        .run("ListModels", &metadata(headers), None, |ready| async move {
            let max = ready.scorer.model().preprocessor.max_tokens();
            Ok(json!({
                "object": "list",
                "data": [{
                    "id": name, "object": "model", "created": super::classify::unix_now(),
                    "owned_by": "arbiter", "root": name, "parent": null, "max_model_len": max,
                }],
            }))
        })
        .await;
    match answer {
        Ok(body) => axum::Json(body).into_response(),
        Err(e) => reject(&e, None),
    }
}

/// `GET /health`: 200 with an empty body while the server answers requests, 503 while the model
/// loads or the server drains; open without a token, like gRPC health, for probes.
pub(super) async fn health(State(app): State<App>) -> StatusCode {
    if app.gate.serving() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}
