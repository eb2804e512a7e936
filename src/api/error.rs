//! Errors at the HTTP edge: every failure is HTTP 500 with `{"Err": m, "Error": m}`
//! (NetworkDriver clients read `Err`, IpamDriver clients `Error`). The internal cause
//! is logged once here; the message sent out carries no secrets.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tracing::{error, warn};

use crate::driver::DriverError;
use crate::ipam::IpamError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error(transparent)]
    Ipam(#[from] IpamError),
}

impl ApiError {
    /// Failures of weft itself (store, kernel) rather than of the request.
    fn is_internal(&self) -> bool {
        matches!(
            self,
            ApiError::Driver(
                DriverError::Store(_) | DriverError::Datapath(_) | DriverError::Unavailable(_)
            ) | ApiError::Ipam(IpamError::Store(_) | IpamError::Datapath(_))
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        if self.is_internal() {
            error!(error = %message, "request failed");
        } else {
            warn!(error = %message, "request refused");
        }
        let body = serde_json::json!({ "Err": message, "Error": message });
        (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
    }
}
