//! The HTTP server behind both listeners, built so that no client can hold
//! more than its share: hyper's HTTP/1 connections with hyper-util's timer,
//! a cap on open connections per listener, and timeouts on every stage of a
//! request, then tower layers that bound requests in flight (shedding the
//! excess with a 503 at once) and how long one request may take.
//!
//! Stages and their limits (`[listen]` in the config):
//! - connection slots: `max_connections` per listener; when all are taken, new
//!   connections wait in the kernel's accept queue, unaccepted;
//! - waiting for a request header, and reading it (an idle keep-alive
//!   connection, or a header sent a byte at a time): `header_read_timeout`;
//! - a request body that stops arriving: `body_read_timeout` between chunks;
//! - no bytes either way (a client that stops reading an answer):
//!   `idle_timeout`;
//! - one request, start to answer: `request_timeout`;
//! - requests in flight: `max_in_flight`, the rest answered 503 at once.
//!
//! The admin listener has its own slots, so `/livez` answers while the proxy
//! listener is flooded. Shutdown stops accepting, lets requests in flight
//! finish for a grace period, then closes what is left.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::response::{IntoResponse, Response};
use axum::Router;
use http::{Method, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tower::ServiceBuilder;

use crate::api_error::{ApiError, ErrorKind};

/// One listener's limits.
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    /// The listener's name in logs and errors (`proxy`, `admin`).
    pub name: &'static str,
    /// Open connections at once; the config key naming it.
    pub max_connections: usize,
    /// The config key of `max_connections`.
    pub max_connections_key: &'static str,
    /// Requests in flight at once; beyond, 503 at once.
    pub max_in_flight: usize,
    /// The config key of `max_in_flight`.
    pub max_in_flight_key: &'static str,
    /// From a connection being ready for a request to its header complete.
    pub header_read_timeout: Duration,
    /// Longest pause between two chunks of a request body.
    pub body_read_timeout: Duration,
    /// Longest time without a byte in either direction.
    pub idle_timeout: Duration,
    /// Longest time from a request's header to its answer's header.
    pub request_timeout: Duration,
}

/// Serves `app` on `listener` within `limits` until `shutdown` turns true,
/// then drains requests in flight for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ListenerLimits,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let limits = Arc::new(limits);
    let app = limited(app, &limits);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    loop {
        // A slot first: beyond the cap, connections wait unaccepted.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = stopped(&mut shutdown) => break,
        };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off a
                    // moment rather than spin.
                    tracing::warn!(listener = limits.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::default());
        let io = TokioIo::new(Watched {
            inner: stream,
            activity: activity.clone(),
        });
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(io, service));
        let idle_timeout = limits.idle_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            tokio::pin!(connection);
            loop {
                let idle_until = activity.last() + idle_timeout;
                tokio::select! {
                    _ = connection.as_mut() => break,
                    _ = tokio::time::sleep_until(idle_until) => {
                        if activity.last() + idle_timeout <= Instant::now() {
                            // No byte either way for idle_timeout: close.
                            break;
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = limits.name,
            "grace period over with requests still in flight; closing them"
        );
    }
}

/// Resolves once `shutdown` is true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// The tower layers every request passes: the body's read timeout outside
/// the router (it wraps the body), and inside, the request timeout, the
/// in-flight limit and load shedding, whose errors become Backstage-shaped
/// 503s naming the limit.
fn limited(
    app: Router,
    limits: &Arc<ListenerLimits>,
) -> impl tower::Service<
    http::Request<hyper::body::Incoming>,
    Response = Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<Response, std::convert::Infallible>> + Send,
> + Clone
       + Send
       + 'static {
    let for_errors = limits.clone();
    let app = app.layer(
        ServiceBuilder::new()
            // Turns the layers' errors (shed, timed out) into answers.
            .layer(HandleErrorLayer::new(
                move |method: Method, uri: Uri, error: tower::BoxError| {
                    let limits = for_errors.clone();
                    async move { overloaded(&limits, &method, &uri, &error) }
                },
            ))
            // Over the in-flight limit: answer at once rather than queue.
            .layer(tower::load_shed::LoadShedLayer::new())
            .layer(tower::limit::ConcurrencyLimitLayer::new(
                limits.max_in_flight.max(1),
            ))
            // A backstop: every stage inside has its own, shorter bound.
            .layer(tower::timeout::TimeoutLayer::new(limits.request_timeout)),
    );
    ServiceBuilder::new()
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            limits.body_read_timeout,
        ))
        .service(app)
}

fn overloaded(
    limits: &ListenerLimits,
    method: &Method,
    uri: &Uri,
    error: &tower::BoxError,
) -> Response {
    let url = uri.path_and_query().map_or("/", |p| p.as_str());
    let url = url.strip_prefix(crate::proxy::MOUNT).unwrap_or(url);
    let message = if error.is::<tower::load_shed::error::Overloaded>() {
        format!(
            "catalog-cache's {} listener already has {} requests in flight ({}); retry shortly",
            limits.name, limits.max_in_flight, limits.max_in_flight_key
        )
    } else if error.is::<tower::timeout::error::Elapsed>() {
        format!(
            "catalog-cache did not answer within {} (listen.request_timeout)",
            humantime::format_duration(limits.request_timeout)
        )
    } else {
        format!("catalog-cache could not serve this request: {error}")
    };
    ApiError::new(ErrorKind::Unavailable, message, method, url)
        .retry_after(Duration::from_secs(1))
        .into_response()
}

/// When a connection last moved a byte, as milliseconds since a start.
#[derive(Debug)]
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

pin_project_lite::pin_project! {
    /// A stream that notes when it last read or wrote a byte.
    struct Watched<S> {
        #[pin]
        inner: S,
        activity: Arc<Activity>,
    }
}

impl<S: AsyncRead> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
