//! The HTTP routes: JSON records stored in the KV cluster under the request path.
//!
//! - `GET /<key>` -> 200 with the stored JSON, or 404
//! - `POST /<key>` with a JSON body -> 201 `{"stored":"<key>"}`; invalid JSON -> 400, a body
//!   over 1 MiB -> 413
//! - `GET /_kv/stats` -> this worker's KV role and counters as JSON
//! - `GET /` -> a usage line; other methods -> 405
//! - KV failures -> 502 `{"error":"..."}`; 503 once the KV client is closed (shutting down)
//!
//! The key is the percent-decoded path without its leading `/` (so `/users/7` is `users/7`);
//! keys under `_kv/` are reserved.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use clusterd_kv::{Error as KvError, KvClient};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

/// The largest record accepted.
pub const MAX_BODY: usize = 1024 * 1024;

/// What a request asks for, decided from its method and path alone.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /`.
    Usage,
    /// `GET /_kv/stats`.
    Stats,
    /// `GET /<key>`.
    Get(String),
    /// `POST /<key>`.
    Store(String),
    /// A path that is not a usable key.
    BadKey(&'static str),
    /// A method the path does not support; carries the allowed methods.
    MethodNotAllowed(&'static str),
}

/// Decides the route of `method` on `path`.
pub fn route(method: &Method, path: &str) -> Route {
    let raw = path.strip_prefix('/').unwrap_or(path);
    let key = match percent_encoding::percent_decode_str(raw).decode_utf8() {
        Ok(key) => key.into_owned(),
        Err(_) => return Route::BadKey("the key is not valid UTF-8 once percent-decoded"),
    };
    match (method, key.as_str()) {
        (&Method::GET, "") => Route::Usage,
        (_, "") => Route::MethodNotAllowed("GET"),
        (&Method::GET, "_kv/stats") => Route::Stats,
        (_, "_kv/stats") => Route::MethodNotAllowed("GET"),
        (_, k) if k.starts_with("_kv/") => Route::BadKey("keys under _kv/ are reserved"),
        (&Method::GET, _) => Route::Get(key),
        (&Method::POST, _) => Route::Store(key),
        _ => Route::MethodNotAllowed("GET, POST"),
    }
}

/// Answers one request.
pub async fn handle<B>(
    req: Request<B>,
    kv: Arc<KvClient>,
) -> Result<Response<Full<Bytes>>, Infallible>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let response = match route(req.method(), req.uri().path()) {
        Route::Usage => text(
            StatusCode::OK,
            "kv-http: GET /<key> reads a JSON record, POST /<key> stores one, GET /_kv/stats\n",
        ),
        Route::Stats => json_response(StatusCode::OK, &stats(&kv)),
        Route::Get(key) => match kv.get(&key).await {
            Ok(Some(record)) => record_response(record),
            Ok(None) => error(StatusCode::NOT_FOUND, format!("no record under {key:?}")),
            Err(e) => kv_error(&e),
        },
        Route::Store(key) => store(req.into_body(), &kv, key).await,
        Route::BadKey(reason) => error(StatusCode::BAD_REQUEST, reason.to_string()),
        Route::MethodNotAllowed(allow) => {
            let mut response = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed".into());
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
            response
        }
    };
    Ok(response)
}

async fn store<B>(body: B, kv: &KvClient, key: String) -> Response<Full<Bytes>>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("records are limited to {MAX_BODY} bytes"),
            );
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
    };
    if let Err(e) = serde_json::from_slice::<serde_json::Value>(&bytes) {
        return error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}"));
    }
    match kv.set(&key, &bytes).await {
        Ok(()) => json_response(StatusCode::CREATED, &json!({ "stored": key })),
        Err(e) => kv_error(&e),
    }
}

/// This worker's role and counters.
fn stats(kv: &KvClient) -> serde_json::Value {
    let s = kv.stats();
    json!({
        "pid": std::process::id(),
        "role": s.role.as_str(),
        "commands": s.commands,
        "moved": s.moved,
        "ask": s.ask,
        "topology_commands": s.topology_commands,
        "refreshes": s.refreshes,
        "publishes": s.publishes,
        "refresh_requests": s.refresh_requests,
        "snapshot_copies": s.snapshot_copies,
        "self_refreshes": s.self_refreshes,
        "takeovers": s.takeovers,
        "owner_epoch": s.owner_epoch,
        "map_generation": s.map_generation,
        "owner_pid": s.owner_pid,
    })
}

fn kv_error(e: &KvError) -> Response<Full<Bytes>> {
    let status = match e {
        KvError::Closed => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    };
    error(status, format!("KV store: {e}"))
}

fn record_response(record: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(record)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = record_response(format!("{value}\n").into_bytes());
    *response.status_mut() = status;
    response
}

fn error(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    json_response(status, &json!({ "error": message }))
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(route(&get, "/"), Route::Usage);
        assert_eq!(route(&get, "/user:1"), Route::Get("user:1".into()));
        assert_eq!(route(&get, "/users/7"), Route::Get("users/7".into()));
        assert_eq!(route(&get, "/a%20b%7Bt%7D"), Route::Get("a b{t}".into()));
        assert_eq!(route(&post, "/user:1"), Route::Store("user:1".into()));
        assert_eq!(route(&get, "/_kv/stats"), Route::Stats);
        assert_eq!(route(&post, "/_kv/stats"), Route::MethodNotAllowed("GET"));
        assert!(matches!(route(&get, "/_kv/other"), Route::BadKey(_)));
        assert!(matches!(route(&get, "/%ff"), Route::BadKey(_)));
        assert_eq!(
            route(&Method::PUT, "/k"),
            Route::MethodNotAllowed("GET, POST")
        );
        assert_eq!(route(&post, "/"), Route::MethodNotAllowed("GET"));
    }
}
