//! The request body as a typed request, or an error in OpenAI's shape: a body over the size
//! limit, one cut off, invalid JSON, or a field of the wrong type (named).

use super::api::{parse, ApiError};
use super::AppState;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// axum's `Json`, whose rejection is [`ApiError`] (and counts as a rejected request).
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let parsed = match Bytes::from_request(req, state).await {
            Ok(body) => parse(&body),
            Err(e) => {
                let status = e.status();
                let too_large = status == StatusCode::PAYLOAD_TOO_LARGE;
                Err(ApiError {
                    status,
                    message: if too_large {
                        format!(
                            "the request body is larger than this server's limit of {} bytes",
                            state.cfg.max_body_bytes
                        )
                    } else {
                        format!("the request body could not be read: {e}")
                    },
                    param: None,
                    code: too_large.then_some("request_too_large"),
                })
            }
        };
        parsed.map(ApiJson).inspect_err(|_| {
            state.metrics.rejected.fetch_add(1, Ordering::Relaxed);
        })
    }
}
