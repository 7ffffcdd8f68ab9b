//! The HTTP routes: who answered, and a slow endpoint for in-flight requests.
//!
//! - `GET /` -> `hello from web[2] pid 1234 generation 1`
//! - `GET /whoami` -> `{"app":"web","slot":2,"pid":1234,"generation":1}`
//! - `GET /sleep/<ms>` -> waits that long (at most 60 s), then `slept <ms> ms`
//! - anything else -> 404

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

/// The longest `/sleep/<ms>` honoured.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Who is answering: the worker's identity as clusterd describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The app's name (`hello` when run outside clusterd).
    pub app: String,
    /// The worker's slot (0 outside clusterd).
    pub slot: usize,
    /// This process's id.
    pub pid: u32,
    /// The generation (0 outside clusterd).
    pub generation: u64,
}

/// Answers one request.
pub async fn handle<B>(
    req: Request<B>,
    me: Arc<Identity>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET {
        return Ok(not_found());
    }
    let path = req.uri().path();
    let response = match path {
        "/" => text(
            StatusCode::OK,
            format!(
                "hello from {}[{}] pid {} generation {}\n",
                me.app, me.slot, me.pid, me.generation
            ),
        ),
        "/whoami" => {
            // Written by hand to keep the documented key order; serde_json escapes the name.
            let body = format!(
                r#"{{"app":{},"slot":{},"pid":{},"generation":{}}}"#,
                serde_json::Value::from(me.app.as_str()),
                me.slot,
                me.pid,
                me.generation
            );
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        _ => match path.strip_prefix("/sleep/").map(str::parse::<u64>) {
            Some(Ok(ms)) => {
                let wait = Duration::from_millis(ms).min(MAX_SLEEP);
                tokio::time::sleep(wait).await;
                text(StatusCode::OK, format!("slept {} ms\n", wait.as_millis()))
            }
            _ => not_found(),
        },
    };
    Ok(response)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn not_found() -> Response<Full<Bytes>> {
    text(StatusCode::NOT_FOUND, "not found\n".to_owned())
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn me() -> Arc<Identity> {
        Arc::new(Identity {
            app: "web".into(),
            slot: 2,
            pid: 1234,
            generation: 1,
        })
    }

    async fn get(method: Method, path: &str) -> (StatusCode, Option<String>, String) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .expect("request");
        let response = handle(req, me()).await.expect("infallible");
        let status = response.status();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().expect("ascii").to_owned());
        let body = response
            .into_body()
            .collect()
            .await
            .expect("full body")
            .to_bytes();
        (
            status,
            content_type,
            String::from_utf8(body.to_vec()).expect("utf-8"),
        )
    }

    #[tokio::test(flavor = "current_thread")]
    async fn root_says_who_answered() {
        let (status, ty, body) = get(Method::GET, "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(ty.as_deref(), Some("text/plain; charset=utf-8"));
        assert_eq!(body, "hello from web[2] pid 1234 generation 1\n");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn whoami_is_json() {
        let (status, ty, body) = get(Method::GET, "/whoami").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(ty.as_deref(), Some("application/json"));
        assert_eq!(body, r#"{"app":"web","slot":2,"pid":1234,"generation":1}"#);
        let value: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(
            value,
            serde_json::json!({"app": "web", "slot": 2, "pid": 1234, "generation": 1})
        );
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn sleep_waits_and_is_capped() {
        let started = tokio::time::Instant::now();
        assert_eq!(
            get(Method::GET, "/sleep/250").await,
            (
                StatusCode::OK,
                Some("text/plain; charset=utf-8".into()),
                "slept 250 ms\n".into()
            )
        );
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        let (_, _, body) = get(Method::GET, "/sleep/999999999").await;
        assert_eq!(body, "slept 60000 ms\n");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn whoami_escapes_the_app_name() {
        let me = Arc::new(Identity {
            app: "we\"b".into(),
            slot: 0,
            pid: 1,
            generation: 0,
        });
        let req = Request::get("/whoami").body(()).expect("request");
        let body = handle(req, me).await.expect("infallible").into_body();
        let body = body.collect().await.expect("body").to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&body).expect("valid json");
        assert_eq!(value["app"], "we\"b");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn everything_else_is_not_found() {
        for (method, path) in [
            (Method::GET, "/nope"),
            (Method::GET, "/sleep/"),
            (Method::GET, "/sleep/ten"),
            (Method::GET, "/sleep/-1"),
            (Method::GET, "/whoami/"),
            (Method::POST, "/"),
        ] {
            let (status, _, body) = get(method.clone(), path).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
            assert_eq!(body, "not found\n");
        }
    }
}
