//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP
//! status (400 invalid_request_error, 401, 403, 404 model_not_found, 413, 429 with Retry-After,
//! 500/503 with a generic message while the cause goes to the log, 507 `insufficient_storage` when
//! the state volume is full).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after_s: Option<u64>,
    /// Ask the client to close the connection after this response.
    pub close_connection: bool,
}

impl ApiError {
    /// 400: a request that breaks a rule; `param` names the offending field.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(String::from),
            code: None,
            retry_after_s: None,
            close_connection: false,
        }
    }

    /// Any status with a message and OpenAI error type.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after_s: None,
            close_connection: false,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 404 `model_not_found`.
    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist or you do not have access to it."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
            retry_after_s: None,
            close_connection: false,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
            retry_after_s: None,
            close_connection: false,
        }
    }

    /// 413: body over the configured limit.
    pub fn too_large(limit: usize) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("request body exceeds the limit of {limit} bytes"),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
            retry_after_s: None,
            close_connection: false,
        }
    }

    /// The same error, answered with `Connection: close` (the request body was not read to its
    /// end).
    pub fn closing(mut self) -> Self {
        self.close_connection = true;
        self
    }

    /// 408: the request body stopped arriving (`--body-read-timeout-s`).
    pub fn body_timeout() -> Self {
        Self {
            status: StatusCode::REQUEST_TIMEOUT,
            message: "the request body did not arrive in time".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_timeout"),
            retry_after_s: None,
            close_connection: false,
        }
    }

    /// 429 with Retry-After.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            kind: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
            retry_after_s: Some(1),
            close_connection: false,
        }
    }

    /// 503: the engine is not running.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after_s: Some(5),
            close_connection: false,
        }
    }

    /// 507: the state volume is full, so nothing was stored; says so instead of a generic 500 (the
    /// operator can act on it: free space and retry). The cause goes to the log.
    pub fn storage_full(cause: impl std::fmt::Display) -> Self {
        tracing::error!("out of storage space: {cause}");
        Self {
            status: StatusCode::INSUFFICIENT_STORAGE,
            message: "The server is out of storage space (its state folder's volume is full), \
                      so the request changed nothing. Free space on the server and retry."
                .into(),
            kind: "server_error",
            param: None,
            code: Some("insufficient_storage"),
            retry_after_s: None,
            close_connection: false,
        }
    }

    /// [`ApiError::storage_full`] when `cause` (or an error in its chain) is a full disk,
    /// [`ApiError::internal`] otherwise.
    pub fn storage_or_internal(cause: impl std::error::Error + 'static) -> Self {
        if is_storage_full(&cause) {
            Self::storage_full(cause)
        } else {
            Self::internal(cause)
        }
    }

    /// 500: logs the cause, answers a generic message.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {cause}");
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "The server had an error while processing your request.".into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after_s: None,
            close_connection: false,
        }
    }

    /// The JSON body (also sent as one SSE event when a stream fails midway).
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// True when `err` or an error in its source chain says the disk is full: `ENOSPC`/`EDQUOT` from the
/// OS, or SQLite's `SQLITE_FULL`.
pub fn is_storage_full(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut e: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cur) = e {
        if let Some(io) = cur.downcast_ref::<std::io::Error>() {
            // ENOSPC (28) and EDQUOT (122) on Linux.
            if io.kind() == std::io::ErrorKind::StorageFull
                || matches!(io.raw_os_error(), Some(28 | 122))
            {
                return true;
            }
        }
        if let Some(sql) = cur.downcast_ref::<rusqlite::Error>() {
            if sql.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
                return true;
            }
        }
        e = cur.source();
    }
    false
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        // A body over the limit or one that stopped arriving was not read to its end: the
        // connection cannot carry another request (RFC 9112 §9.6).
        if self.close_connection
            || matches!(
                self.status,
                StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT
            )
        {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(s) = self.retry_after_s {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

impl From<crate::adapters::AdapterError> for ApiError {
    fn from(e: crate::adapters::AdapterError) -> Self {
        use crate::adapters::AdapterError as E;
        let msg = e.to_string();
        match e {
            E::BadName(_) | E::NameIsBase(_) => ApiError::invalid(msg, Some("name")),
            E::Forbidden(_) => ApiError::new(StatusCode::FORBIDDEN, "permission_error", msg),
            E::NotFound(_) => ApiError::not_found(msg).with_code("adapter_not_found"),
            E::Invalid(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                msg,
            )
            .with_code("invalid_adapter"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_507_and_other_failures_500() {
        let nospc = std::io::Error::from_raw_os_error(28);
        assert!(is_storage_full(&nospc));
        let e = ApiError::storage_or_internal(std::io::Error::from_raw_os_error(28));
        assert_eq!(e.status, StatusCode::INSUFFICIENT_STORAGE);
        assert_eq!(e.code, Some("insufficient_storage"));
        // Wrapped, as the state store reports it.
        let wrapped = crate::state::StateError::Io {
            path: "/state/files".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        assert_eq!(
            ApiError::from(wrapped).status,
            StatusCode::INSUFFICIENT_STORAGE
        );
        let full = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            Some("database or disk is full".into()),
        );
        let e = ApiError::from(crate::state::StateError::from(full));
        assert_eq!(e.status, StatusCode::INSUFFICIENT_STORAGE);
        // Anything else stays a generic 500.
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert_eq!(
            ApiError::storage_or_internal(denied).status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
