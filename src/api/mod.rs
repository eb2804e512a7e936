//! The HTTP surface dockerd talks to: one explicit route per protocol method, thin
//! handlers (decode, call a service, encode), 404 for everything else.

mod error;
mod extract;
mod ipam;
mod network;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use tracing::{info_span, Instrument};

use crate::driver::Driver;
use crate::ipam::Ipam;
use crate::protocol::ActivateResponse;
use crate::status::{Status, StatusSource};
use axum::extract::State;

pub use error::ApiError;
pub use extract::DockerJson;

#[derive(Clone)]
pub struct AppState {
    pub driver: Arc<Driver>,
    pub ipam: Arc<Ipam>,
    pub status: Arc<StatusSource>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/Plugin.Activate", post(activate))
        .route("/weft.Status", post(status))
        .merge(network::routes())
        .merge(ipam::routes())
        .fallback(unknown_method)
        .layer(middleware::from_fn(request_span))
        .with_state(state)
}

async fn activate() -> Json<ActivateResponse> {
    Json(ActivateResponse {
        implements: vec!["NetworkDriver".into(), "IpamDriver".into()],
    })
}

/// weft's own status for `weft status` (dockerd never calls this path).
async fn status(State(s): State<AppState>) -> Result<Json<Status>, ApiError> {
    Ok(Json(s.status.collect(&s.driver).await?))
}

/// Unknown methods must be 404: dockerd reads 404 as "not implemented".
async fn unknown_method(req: Request) -> Response {
    tracing::debug!(path = %req.uri().path(), "unknown method");
    let msg = format!("weft does not implement {}", req.uri().path());
    (
        axum::http::StatusCode::NOT_FOUND,
        Json(serde_json::json!({"Err": msg, "Error": msg})),
    )
        .into_response()
}

/// Names the network and endpoint a request is about in its span (from the handler,
/// which runs in it), so that every line of the request, "handled" included, says so.
pub(crate) fn record_ids(network_id: &str, endpoint_id: &str) {
    let span = tracing::Span::current();
    span.record(
        "network",
        tracing::field::display(crate::driver::short(network_id)),
    );
    if !endpoint_id.is_empty() {
        span.record(
            "endpoint",
            tracing::field::display(crate::driver::short(endpoint_id)),
        );
    }
}

async fn request_span(req: Request, next: Next) -> Response {
    let method = req.uri().path().trim_start_matches('/').to_string();
    let span = info_span!(
        "request",
        %method,
        network = tracing::field::Empty,
        endpoint = tracing::field::Empty
    );
    async move {
        let started = Instant::now();
        // Spawned, so that a request's work runs to completion even when dockerd
        // hangs up mid-request (a dropped future would stop between two steps).
        let work = tokio::spawn(next.run(req).in_current_span());
        let response = match work.await {
            Ok(response) => response,
            Err(e) => {
                tracing::error!(error = %e, "request handler failed");
                let msg = "weft: internal error handling the request";
                (
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    Json(serde_json::json!({"Err": msg, "Error": msg})),
                )
                    .into_response()
            }
        };
        tracing::debug!(
            status = response.status().as_u16(),
            micros = started.elapsed().as_micros() as u64,
            "handled"
        );
        response
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests;
