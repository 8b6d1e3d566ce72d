//! API keys with scopes. `inference` keys reach the OpenAI routes, `admin` keys the management
//! routes (adapters; later jobs and files); a key may hold both. Health, readiness and metrics stay
//! open (probes and Prometheus scrape them). Without any key configured the daemon only listens on
//! loopback (enforced at start) and every route is open.

use crate::api::error::ApiError;
use crate::api::AppState;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scopes {
    pub inference: bool,
    pub admin: bool,
}

/// The configured keys (empty: auth disabled).
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: HashMap<String, Scopes>,
}

impl ApiKeys {
    /// Parses `KEY` (inference scope) or `KEY:SCOPE[+SCOPE]` entries, e.g. `sk-abc:inference+admin`.
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut keys = HashMap::new();
        for e in entries {
            let e = e.trim();
            if e.is_empty() || e.starts_with('#') {
                continue;
            }
            let (key, scopes) = e.split_once(':').unwrap_or((e, "inference"));
            if key.len() < 8 {
                return Err("API keys must be at least 8 characters".into());
            }
            let mut s = Scopes {
                inference: false,
                admin: false,
            };
            for scope in scopes.split('+') {
                match scope {
                    "inference" => s.inference = true,
                    "admin" => s.admin = true,
                    other => {
                        return Err(format!(
                            "unknown API key scope {other:?} (inference, admin)"
                        ))
                    }
                }
            }
            keys.insert(key.to_string(), s);
        }
        Ok(Self { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn lookup(&self, key: &str) -> Option<Scopes> {
        self.keys.get(key).copied()
    }
}

/// Which scope a request needs (`None`: open). Adapters are admin-only; files and fine-tuning jobs
/// need admin to change anything and inference to read.
fn required(method: &axum::http::Method, path: &str) -> Option<&'static str> {
    let training = path.starts_with("/v1/files")
        || path.starts_with("/v1/fine_tuning")
        || path.starts_with("/v1/exports");
    if path.starts_with("/v1/adapters") || (training && method != axum::http::Method::GET) {
        Some("admin")
    } else if path.starts_with("/v1/") {
        Some("inference")
    } else {
        None
    }
}

/// Middleware: checks `Authorization: Bearer <key>` against the route's scope.
pub async fn authorize(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if st.keys.is_empty() {
        return next.run(req).await;
    }
    let Some(scope) = required(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let key = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(scopes) = key.and_then(|k| st.keys.lookup(k)) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Missing or invalid API key (send `Authorization: Bearer <key>`).",
        )
        .with_code("invalid_api_key")
        .into_response();
    };
    let allowed = match scope {
        "admin" => scopes.admin,
        _ => scopes.inference,
    };
    if !allowed {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            format!("This API key lacks the `{scope}` scope needed for this route."),
        )
        .into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_scopes() {
        let k = ApiKeys::parse([
            "sk-inference-1",
            "sk-admin-key-2:admin",
            "sk-both-key-3:inference+admin",
            "# comment",
        ])
        .unwrap();
        assert_eq!(
            k.lookup("sk-inference-1"),
            Some(Scopes {
                inference: true,
                admin: false
            })
        );
        assert_eq!(
            k.lookup("sk-admin-key-2"),
            Some(Scopes {
                inference: false,
                admin: true
            })
        );
        assert_eq!(
            k.lookup("sk-both-key-3"),
            Some(Scopes {
                inference: true,
                admin: true
            })
        );
        assert!(ApiKeys::parse(["short"]).is_err());
        assert!(ApiKeys::parse(["long-enough-key:root"]).is_err());
    }

    #[test]
    fn fine_tuning_writes_need_admin_reads_inference() {
        use axum::http::Method;
        assert_eq!(required(&Method::POST, "/v1/files"), Some("admin"));
        assert_eq!(required(&Method::GET, "/v1/files"), Some("inference"));
        assert_eq!(
            required(&Method::POST, "/v1/fine_tuning/jobs/x/cancel"),
            Some("admin")
        );
        assert_eq!(
            required(&Method::GET, "/v1/fine_tuning/jobs/x/events"),
            Some("inference")
        );
        assert_eq!(required(&Method::GET, "/v1/adapters"), Some("admin"));
        assert_eq!(required(&Method::GET, "/metrics"), None);
    }
}
