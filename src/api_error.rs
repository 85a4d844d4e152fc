//! The one place where an error becomes an HTTP response: Backstage's error
//! body (`{"error":{name,message},"request":{method,url},"response":{statusCode}}`)
//! for both listeners, and the panic catcher both routers wear, so that a
//! bug answers 500 with the real method and path instead of dropping the
//! connection.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::FutureExt;
use http::{HeaderValue, Method, StatusCode};

/// Which of Backstage's errors the sidecar answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400 `InputError`: the client's request is wrong.
    Input,
    /// 401 `AuthenticationError`.
    Authentication,
    /// 404 `NotFoundError`.
    NotFound,
    /// 408 `RequestTimeoutError`: the request (its body) did not arrive in time.
    RequestTimeout,
    /// 413 `PayloadTooLargeError`.
    TooLarge,
    /// 410 `GoneError`: what was asked for is no longer held (the tier
    /// extension's changes feed; Backstage itself never answers it).
    Gone,
    /// 503 `ServiceUnavailableError`: the upstream could not answer and the
    /// mirror may not.
    Unavailable,
    /// 500 `Error`: something broke inside the sidecar.
    Internal,
}

impl ErrorKind {
    /// The status and Backstage's error name.
    pub fn status_and_name(self) -> (StatusCode, &'static str) {
        match self {
            Self::Input => (StatusCode::BAD_REQUEST, "InputError"),
            Self::Authentication => (StatusCode::UNAUTHORIZED, "AuthenticationError"),
            Self::NotFound => (StatusCode::NOT_FOUND, "NotFoundError"),
            Self::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "RequestTimeoutError"),
            Self::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLargeError"),
            Self::Gone => (StatusCode::GONE, "GoneError"),
            Self::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailableError"),
            Self::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "Error"),
        }
    }
}

/// An error answered by the sidecar itself, for one request.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// Which error.
    pub kind: ErrorKind,
    /// What happened, in words the caller can act on.
    pub message: String,
    /// The request's method.
    pub method: Method,
    /// The request's path and query, relative to the listener's mount
    /// (Backstage reports `/entities/…`, not `/api/catalog/entities/…`).
    pub url: String,
    /// `Retry-After`, for a 503.
    pub retry_after: Option<Duration>,
}

impl ApiError {
    /// An error for a request.
    pub fn new(kind: ErrorKind, message: impl Into<String>, method: &Method, url: &str) -> Self {
        Self {
            kind,
            message: message.into(),
            method: method.clone(),
            url: url.to_string(),
            retry_after: None,
        }
    }

    /// With a `Retry-After` (whole seconds, at least 1).
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        self.kind.status_and_name().0
    }

    /// Backstage's error body.
    pub fn body(&self) -> Bytes {
        let (status, name) = self.kind.status_and_name();
        let body = serde_json::json!({
            "error": {"name": name, "message": self.message},
            "request": {"method": self.method.as_str(), "url": self.url},
            "response": {"statusCode": status.as_u16()},
        });
        Bytes::from(body.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = Response::new(Body::from(self.body()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        if let Some(after) = self.retry_after {
            let seconds = after.as_secs_f64().ceil().max(1.0) as u64;
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The layer both routers wear: a handler that panics is answered 500 in
/// Backstage's shape with the request's real method and path, and the
/// connection stays usable. `mount` is stripped from the reported path (the
/// proxy's `/api/catalog`; empty for the admin listener). It costs the hit
/// path two cheap clones (method, URI), no allocation.
#[derive(Debug, Clone, Copy)]
pub struct CatchPanicLayer {
    mount: &'static str,
}

impl CatchPanicLayer {
    /// Catches panics of the service it wraps, reporting paths below `mount`.
    pub fn new(mount: &'static str) -> Self {
        Self { mount }
    }
}

impl<S> tower::Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CatchPanic {
            inner,
            mount: self.mount,
        }
    }
}

/// The service of [`CatchPanicLayer`].
#[derive(Debug, Clone)]
pub struct CatchPanic<S> {
    inner: S,
    mount: &'static str,
}

impl<S, B> tower::Service<http::Request<B>> for CatchPanic<S>
where
    S: tower::Service<http::Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = CatchPanicFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.method().clone();
        let uri = request.uri().clone();
        CatchPanicFuture {
            inner: AssertUnwindSafe(self.inner.call(request)).catch_unwind(),
            method,
            uri,
            mount: self.mount,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`CatchPanic`].
    pub struct CatchPanicFuture<F> {
        #[pin]
        inner: futures::future::CatchUnwind<AssertUnwindSafe<F>>,
        method: Method,
        uri: http::Uri,
        mount: &'static str,
    }
}

impl<F, E> Future for CatchPanicFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.inner.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(result)) => Poll::Ready(result),
            Poll::Ready(Err(panic)) => {
                let url = this.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
                let url = url.strip_prefix(*this.mount).unwrap_or(url);
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(method = %this.method, url = %url, panic = %what, "a request handler panicked");
                Poll::Ready(Ok(ApiError::new(
                    ErrorKind::Internal,
                    "catalog-cache hit an internal error answering this request",
                    this.method,
                    url,
                )
                .into_response()))
            }
        }
    }
}
