//! API keys for `aligner serve` and the correction proxy. Keys come from `--api-key`
//! (repeatable) or `ALIGNER_API_KEYS` (comma-separated); clients send
//! `Authorization: Bearer KEY`. With keys set, every route but `GET /health` needs one (401
//! otherwise, in OpenAI's error shape). Without keys a server only listens on loopback: bound
//! anywhere else it would lend its model, and the proxy its upstream key, to anyone who
//! reaches it, so it refuses to start.

use std::sync::Arc;

use aligner_openai::wire::{ErrorBody, ErrorDetail};
use aligner_spec::Invalid;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// The accepted keys; empty: no key needed (loopback only).
#[derive(Debug, Clone, Default)]
pub struct ApiKeys(Arc<Vec<String>>);

impl ApiKeys {
    /// Checks the keys (none empty) and where they are needed: `host` beyond loopback needs at
    /// least one. `what` names the server in the error (`this server`, `the correction proxy`).
    pub fn new(keys: Vec<String>, host: &str, what: &str) -> Result<Self, Invalid> {
        let keys: Vec<String> = keys.into_iter().map(|k| k.trim().to_string()).collect();
        if keys.iter().any(String::is_empty) {
            return Err(Invalid::Message(
                "an API key is empty\nhint: `--api-key KEY` (repeatable) or ALIGNER_API_KEYS=key1,key2 with no empty entries".into(),
            ));
        }
        if keys.is_empty() && !is_loopback(host) {
            return Err(Invalid::Message(format!(
                "`--host {host}` puts {what} on the network with no API key: anyone who reaches it could use it\nhint: set keys with `--api-key KEY` (repeatable) or ALIGNER_API_KEYS=key1,key2 (clients send `Authorization: Bearer KEY`), or listen on 127.0.0.1"
            )));
        }
        Ok(ApiKeys(Arc::new(keys)))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `given` is one of the keys, compared in constant time per key.
    fn accepts(&self, given: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.0.iter().fold(false, |ok, k| {
            ok | bool::from(given.as_bytes().ct_eq(k.as_bytes()))
        })
    }
}

/// `localhost` or a loopback address.
pub fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The middleware: a bearer key on every route but `/health` when keys are set.
pub(crate) async fn require_key(
    State(keys): State<ApiKeys>,
    request: Request,
    next: Next,
) -> Response {
    if keys.is_empty() || request.uri().path() == "/health" {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, key) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
        });
    let message = match given {
        Some(key) if keys.accepts(key) => return next.run(request).await,
        Some(_) => "incorrect API key provided\nhint: use one of the keys the server was started with (`--api-key` or ALIGNER_API_KEYS)",
        None => "this server needs an API key: send `Authorization: Bearer KEY`",
    };
    let body = ErrorBody {
        error: ErrorDetail {
            message: message.into(),
            kind: "invalid_request_error".into(),
            param: None,
            code: Some("invalid_api_key".into()),
        },
    };
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_needed_beyond_loopback() {
        for host in ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"] {
            assert!(ApiKeys::new(vec![], host, "x").is_ok(), "{host}");
        }
        for host in ["0.0.0.0", "::", "10.1.2.3", "example.org"] {
            let e = ApiKeys::new(vec![], host, "the correction proxy")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("`--host {host}` puts the correction proxy")),
                "{e}"
            );
            assert!(e.contains("--api-key"), "{e}");
            assert!(ApiKeys::new(vec!["k1".into()], host, "x").is_ok());
        }
        let e = ApiKeys::new(vec!["a".into(), " ".into()], "0.0.0.0", "x").unwrap_err();
        assert!(e.to_string().contains("an API key is empty"), "{e}");
    }

    #[test]
    fn any_listed_key_is_accepted() {
        let keys = ApiKeys::new(vec!["first".into(), " second ".into()], "0.0.0.0", "x").unwrap();
        assert!(keys.accepts("first"));
        assert!(keys.accepts("second"));
        assert!(!keys.accepts("secon"));
        assert!(!keys.accepts(""));
    }
}
