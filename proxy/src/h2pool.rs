//! HTTP/2 client connections, one per endpoint, shared by every request to it.
//!
//! hyper-util's pooled client keys its connections by the request URI's authority, so the
//! proxy had to put the endpoint's address there, and every HTTP/2 request left with the pod IP
//! as its `:authority` instead of the Host the client asked for. Here the key is the endpoint the
//! balancer picked and the request keeps its own authority (what Envoy sends). It is also a
//! shorter path per request than the general pool: one map lookup and a clone of the
//! connection's handle.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::debug;

use crate::coalesce::Coalesce;
use crate::transport;

/// Why a request through the pool failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection to the endpoint (refused, unreachable, timed out).
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, #[source] std::io::Error),
    #[error("HTTP/2 handshake with {0}: {1}")]
    Handshake(SocketAddr, #[source] hyper::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl Error {
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Connect(..) | Error::Handshake(..))
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Connect(_, e) if e.kind() == std::io::ErrorKind::TimedOut)
    }
}

/// An endpoint's connection, and when a request last went through it.
struct Slot<B> {
    conn: tokio::sync::Mutex<Option<SendRequest<B>>>,
    /// Milliseconds since the pool's `epoch`.
    used: AtomicU64,
    /// Bumped per new connection, so a connection's idle watch only ever drops its own.
    generation: AtomicU64,
}

impl<B> Default for Slot<B> {
    fn default() -> Self {
        Slot {
            conn: tokio::sync::Mutex::new(None),
            used: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        }
    }
}

/// Connections to endpoints for request bodies of type `B`.
pub struct H2Pool<B> {
    slots: Mutex<HashMap<SocketAddr, Arc<Slot<B>>>>,
    /// Connect from 127.0.0.6 (inbound: to the app).
    inbound: bool,
    timeout: Duration,
    /// TCP keepalive (a DestinationRule's `tcp.tcpKeepalive.time`).
    keepalive: Option<Duration>,
    /// A connection no request used for this long is let go (closed once its streams end).
    idle: Duration,
    epoch: Instant,
}

impl<B> H2Pool<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub fn new(
        inbound: bool,
        timeout: Duration,
        keepalive: Option<Duration>,
        idle: Duration,
    ) -> Self {
        H2Pool {
            slots: Mutex::new(HashMap::new()),
            inbound,
            timeout,
            keepalive,
            idle,
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn slot(&self, endpoint: SocketAddr) -> Arc<Slot<B>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slots.get(&endpoint) {
            return s.clone();
        }
        // Endpoints come and go: drop the slots of closed connections before adding one.
        if slots.len() >= 1024 {
            slots.retain(|_, s| {
                s.conn
                    .try_lock()
                    .map_or(true, |c| c.as_ref().is_some_and(|c| !c.is_closed()))
            });
        }
        slots.entry(endpoint).or_default().clone()
    }

    /// The open connection to `endpoint`, or a new one (one connect at a time per endpoint: the
    /// requests that arrive meanwhile wait for it and share it).
    async fn connection(&self, endpoint: SocketAddr) -> Result<SendRequest<B>, Error> {
        let slot = self.slot(endpoint);
        slot.used.store(self.now_ms(), Ordering::Relaxed);
        let mut conn = slot.conn.lock().await;
        if let Some(c) = conn.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let stream =
            transport::connect_upstream(endpoint, self.inbound, self.timeout, self.keepalive)
                .await
                .map_err(|e| Error::Connect(endpoint, e))?;
        let io = TokioIo::new(Coalesce::new(stream, true));
        let (send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await
            .map_err(|e| Error::Handshake(endpoint, e))?;
        let generation = slot.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let (idle, epoch) = (self.idle, self.epoch);
        let watched = slot.clone();
        tokio::spawn(async move {
            // Idle: drop the pool's handle; the connection then closes once the requests
            // still holding one are done.
            let watch = async {
                let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
                loop {
                    tokio::time::sleep(idle).await;
                    let now = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
                    if now.saturating_sub(watched.used.load(Ordering::Relaxed)) >= idle_ms {
                        let mut c = watched.conn.lock().await;
                        if watched.generation.load(Ordering::Relaxed) == generation {
                            *c = None;
                        }
                        return;
                    }
                }
            };
            tokio::pin!(connection);
            tokio::select! {
                r = &mut connection => {
                    if let Err(e) = r {
                        debug!(%endpoint, error = %e, "HTTP/2 upstream connection ended");
                    }
                    return;
                }
                _ = watch => debug!(%endpoint, "HTTP/2 upstream connection idle: closing it"),
            }
            if let Err(e) = connection.await {
                debug!(%endpoint, error = %e, "HTTP/2 upstream connection ended");
            }
        });
        *conn = Some(send.clone());
        Ok(send)
    }

    /// Send `req` (absolute URI: its authority is the request's, not the endpoint's) to
    /// `endpoint`. A request the connection never took (it closed meanwhile) goes once more on
    /// a new connection.
    pub async fn send(
        &self,
        endpoint: SocketAddr,
        req: Request<B>,
    ) -> Result<Response<Incoming>, Error> {
        let mut send = self.connection(endpoint).await?;
        match send.try_send_request(req).await {
            Ok(resp) => Ok(resp),
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    debug!(%endpoint, "HTTP/2 connection closed before taking the request: reconnecting");
                    let mut send = self.connection(endpoint).await?;
                    Ok(send.send_request(req).await?)
                }
                None => Err(Error::Http(e.into_error())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// An h2c server answering 200 with the request's authority; counts the connections it
    /// accepted and the ones that ended.
    async fn server() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (opened, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (o, c) = (opened.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                o.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let authority = req.uri().authority().map(|a| a.to_string());
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            hyper::body::Bytes::from(authority.unwrap_or_default()),
                        )))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (addr, opened, closed)
    }

    fn get(authority: &str) -> Request<http_body_util::Empty<hyper::body::Bytes>> {
        Request::get(format!("http://{authority}/"))
            .body(http_body_util::Empty::new())
            .expect("request")
    }

    async fn body(r: Response<Incoming>) -> String {
        use http_body_util::BodyExt;
        let b = r.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&b).into_owned()
    }

    #[tokio::test]
    async fn requests_share_a_connection_keep_their_authority_and_idle_connections_close() {
        let (addr, opened, closed) = server().await;
        let pool = Arc::new(H2Pool::new(
            false,
            Duration::from_secs(2),
            None,
            Duration::from_millis(300),
        ));
        // Concurrent first requests: one connect, shared.
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.send(addr, get("reviews:9080")).await })
            })
            .collect();
        for t in tasks {
            let r = t.await.expect("task").expect("response");
            assert_eq!(body(r).await, "reviews:9080", "the request's own authority");
        }
        assert_eq!(opened.load(Ordering::SeqCst), 1);
        // Unused for longer than the idle timeout: closed, and the next request reconnects.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(closed.load(Ordering::SeqCst), 1, "idle connection closed");
        let r = pool
            .send(addr, get("reviews:9080"))
            .await
            .expect("response");
        assert_eq!(r.status(), 200);
        assert_eq!(opened.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let pool = H2Pool::new(false, Duration::from_secs(2), None, Duration::from_secs(60));
        let e = pool.send(addr, get("x")).await.expect_err("refused");
        assert!(e.is_connect() && !e.is_timeout(), "{e}");
    }
}
