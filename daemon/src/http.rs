//! The HTTP accept loop, with the timeouts that keep slow or stalled clients from holding
//! connections (and the memory behind them) forever. `axum::serve` exposes none of hyper's
//! connection settings, so the loop is ours, on hyper-util's connection builder (as axum's is):
//!
//! - **header read** (`--header-read-timeout-s`): the request head must arrive within this time of
//!   the connection opening or of the previous response ending (hyper's `header_read_timeout`,
//!   which since hyper 1.6 also bounds idle keep-alive) — the slowloris defence;
//! - **body read** (`--body-read-timeout-s`): each chunk of a request body must arrive within this
//!   time of the previous one (tower-http's `RequestBodyTimeoutLayer`); the request gets a 408 in
//!   OpenAI's error shape;
//! - **write stall** (`--write-timeout-s`): a response write that makes no progress for this long
//!   (a client that stopped reading a stream) closes the connection; the response body is dropped,
//!   which closes the request's event channel, and the engine drops the sequence at its next step.
//!
//! Graceful shutdown stops accepting, lets in-flight connections finish, and the caller bounds that
//! with its own deadline.

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_io_timeout::TimeoutStream;

/// Connection timeouts; `None` disables one.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub header_read: Option<Duration>,
    pub body_read: Option<Duration>,
    pub write_stall: Option<Duration>,
}

impl Timeouts {
    /// From seconds, where 0 means "no timeout".
    pub fn from_secs(header_read: f64, body_read: f64, write_stall: f64) -> Self {
        let d = |s: f64| (s > 0.0).then(|| Duration::from_secs_f64(s));
        Self {
            header_read: d(header_read),
            body_read: d(body_read),
            write_stall: d(write_stall),
        }
    }
}

/// Adds the per-request layers of `t` (the body timeout) to the router.
pub fn with_request_timeouts(router: Router, t: &Timeouts) -> Router {
    match t.body_read {
        Some(d) => router.layer(tower_http::timeout::RequestBodyTimeoutLayer::new(d)),
        None => router,
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then waits for open connections to
/// finish (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    t: Timeouts,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(t.header_read);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            conn = listener.accept() => match conn {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let mut stream = TimeoutStream::new(stream);
        stream.set_write_timeout(t.write_stall);
        let io = TokioIo::new(Box::pin(stream));
        let svc = TowerToHyperService::new(router.clone());
        let conn = builder.serve_connection_with_upgrades(io, svc).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                // Timeouts and resets are the client's doing; they are not the server's errors.
                tracing::debug!(%peer, "connection closed: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// True when a request-body error was the body timeout (→ 408 rather than 400).
pub fn is_body_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut e: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cur) = e {
        if cur.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        e = cur.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// The write-stall guard: a peer that reads nothing makes the write fail after the timeout
    /// instead of waiting forever.
    #[tokio::test]
    async fn a_stalled_write_times_out() {
        let (a, _b) = tokio::io::duplex(64);
        let mut s = TimeoutStream::new(a);
        s.set_write_timeout(Some(Duration::from_millis(100)));
        let mut s = Box::pin(s);
        let started = std::time::Instant::now();
        let r = s.write_all(&[0u8; 1024]).await;
        let err = r.expect_err("the peer never reads");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
