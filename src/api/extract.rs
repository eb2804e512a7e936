//! `DockerJson<T>`: JSON bodies as dockerd sends them, with no Content-Type header.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use super::ApiError;

/// Largest request body accepted; dockerd's are a few hundred bytes.
const MAX_BODY: usize = 1 << 20;

pub struct DockerJson<T>(pub T);

impl<T: DeserializeOwned> DockerJson<T> {
    pub fn decode(body: &[u8]) -> Result<T, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            // dockerd re-sends a drained body when it retries (moby/moby#39331).
            return Err(ApiError::BadRequest(
                "empty request body: this method needs arguments (dockerd may have retried with a drained body); nothing was changed".into(),
            ));
        }
        serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("malformed request body: {e}")))
    }
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for DockerJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::BadRequest(format!("cannot read request body: {e}")))?;
        if bytes.len() > MAX_BODY {
            return Err(ApiError::BadRequest("request body too large".into()));
        }
        Self::decode(&bytes).map(DockerJson)
    }
}
