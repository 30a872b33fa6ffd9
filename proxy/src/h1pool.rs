//! HTTP/1.1 upstream connections, kept per endpoint and reused.
//!
//! hyper-util's pooled client did this before; per request it hashed the URI's scheme and
//! authority with SipHash to find the pool, moved a large future state around, and spawned a
//! task that waited for the connection to be free before putting it back (callgrind: some 5,000
//! instructions per request, 7% of an inbound sidecar's). Here a connection goes back to its
//! endpoint's list as soon as its response head is in, and a checkout takes the most recently
//! used one that hyper says is ready (free, not closed) without waiting; with none, it connects.
//! Connections idle longer than the idle timeout are closed by a sweeper task, and at most
//! [`MAX_IDLE_PER_ENDPOINT`] are kept per endpoint.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::transport;
pub use crate::transport::UpstreamError as Error;

/// Idle connections kept per endpoint (more in flight at once are closed when they finish).
pub const MAX_IDLE_PER_ENDPOINT: usize = 64;

struct Conn<B> {
    send: SendRequest<B>,
    used: Instant,
}

struct Inner<B> {
    conns: Mutex<crate::FastMap<SocketAddr, Vec<Conn<B>>>>,
    dial: transport::Dial,
    idle: Duration,
    sweeper: std::sync::Once,
}

/// A pool of HTTP/1.1 client connections by endpoint. Clones share it.
pub struct H1Pool<B>(Arc<Inner<B>>);

impl<B> Clone for H1Pool<B> {
    fn clone(&self) -> Self {
        H1Pool(self.0.clone())
    }
}

impl<B> H1Pool<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Connections made with `dial`; `idle` is how long an unused one stays open.
    pub fn new(dial: transport::Dial, idle: Duration) -> Self {
        H1Pool(Arc::new(Inner {
            conns: Mutex::default(),
            dial,
            idle,
            sweeper: std::sync::Once::new(),
        }))
    }

    /// Send `req` to `endpoint` (the URI may be absolute: the request goes out in origin form,
    /// and gets a Host header from the endpoint if it has none). A reused connection that
    /// turns out closed before the request went out is replaced, once; the future does not
    /// borrow the pool.
    pub fn request(
        &self,
        endpoint: SocketAddr,
        mut req: Request<B>,
    ) -> impl Future<Output = Result<Response<Incoming>, Error>> + Send + 'static {
        let inner = self.0.clone();
        async move {
            origin_form(&mut req, endpoint);
            let (mut send, reused) = match inner.checkout(endpoint) {
                Some(s) => (s, true),
                None => (inner.connect(endpoint).await?, false),
            };
            let resp = match send.try_send_request(req).await {
                Ok(resp) => resp,
                Err(mut e) => match e.take_message() {
                    Some(req) if reused => {
                        debug!(%endpoint, "pooled HTTP/1.1 connection closed before taking the request: reconnecting");
                        send = inner.connect(endpoint).await?;
                        send.send_request(req).await?
                    }
                    _ => return Err(Error::Http(e.into_error())),
                },
            };
            inner.put(endpoint, send);
            Ok(resp)
        }
    }

    /// Connections open (idle or busy) to `endpoint`.
    #[cfg(test)]
    pub fn open(&self, endpoint: SocketAddr) -> usize {
        let conns = self.0.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns
            .get(&endpoint)
            .map_or(0, |v| v.iter().filter(|c| !c.send.is_closed()).count())
    }
}

impl<B> Inner<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// The most recently used connection to `endpoint` that is free; closed ones are dropped
    /// on the way.
    fn checkout(&self, endpoint: SocketAddr) -> Option<SendRequest<B>> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.get_mut(&endpoint)?;
        list.retain(|c| !c.send.is_closed());
        let found = list
            .iter()
            .rposition(|c| c.send.is_ready())
            .map(|i| list.swap_remove(i).send);
        if list.is_empty() {
            conns.remove(&endpoint);
        }
        found
    }

    /// Back into the pool, busy until its response body is read (a checkout skips it until
    /// then).
    fn put(&self, endpoint: SocketAddr, send: SendRequest<B>) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.entry(endpoint).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(Conn {
                send,
                used: Instant::now(),
            });
        }
    }

    async fn connect(self: &Arc<Self>, endpoint: SocketAddr) -> Result<SendRequest<B>, Error> {
        self.sweeper
            .call_once(|| spawn_sweeper(Arc::downgrade(self), self.idle));
        let stream = self
            .dial
            .connect(endpoint)
            .await
            .map_err(|e| Error::Connect(endpoint, e))?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Error::Handshake(endpoint, e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%endpoint, error = %e, "HTTP/1.1 upstream connection ended");
            }
        });
        Ok(send)
    }
}

/// Every so often, closes the connections unused for `idle` (dropping the sender: hyper then
/// closes the connection) and forgets closed ones; ends with the pool.
fn spawn_sweeper<B: Send + 'static>(pool: Weak<Inner<B>>, idle: Duration) {
    let every = (idle / 2).max(Duration::from_millis(100));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(pool) = pool.upgrade() else {
                return;
            };
            let mut conns = pool.conns.lock().unwrap_or_else(|p| p.into_inner());
            conns.retain(|_, list| {
                list.retain(|c| !c.send.is_closed() && c.used.elapsed() < idle);
                !list.is_empty()
            });
        }
    });
}

/// The request target in origin form (`/path?query`), which is what a server expects from a
/// client that is not talking to a proxy; the authority goes to Host if there is none.
fn origin_form<B>(req: &mut Request<B>, endpoint: SocketAddr) {
    if !req.headers().contains_key(hyper::header::HOST) {
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_else(|| endpoint.to_string());
        if let Ok(v) = hyper::header::HeaderValue::from_str(&host) {
            req.headers_mut().insert(hyper::header::HOST, v);
        }
    }
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
        let mut parts = hyper::http::uri::Parts::default();
        parts.path_and_query = Some(pq);
        if let Ok(u) = hyper::Uri::from_parts(parts) {
            *req.uri_mut() = u;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::body::Bytes;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An HTTP/1.1 server answering with the request's target and Host after `delay`; counts
    /// connections opened and closed. `close_after` requests, it closes the connection.
    async fn server(
        close_after: Option<usize>,
        delay: Duration,
    ) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        crate::testing::counting_server(move |s| {
            let served = Arc::new(AtomicUsize::new(0));
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let n = served.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    tokio::time::sleep(delay).await;
                    let host = req
                        .headers()
                        .get(hyper::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or("-")
                        .to_owned();
                    let mut r =
                        Response::new(Full::new(Bytes::from(format!("{} {host}", req.uri()))));
                    if close_after.is_some_and(|m| n >= m) {
                        r.headers_mut().insert(
                            hyper::header::CONNECTION,
                            hyper::header::HeaderValue::from_static("close"),
                        );
                    }
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            }
        })
        .await
    }

    fn get(uri: String) -> Request<Empty<Bytes>> {
        Request::get(uri).body(Empty::new()).expect("request")
    }

    async fn text(r: Response<Incoming>) -> String {
        let b = r.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&b).into_owned()
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection_in_origin_form() {
        let (addr, opened, _) = server(None, Duration::ZERO).await;
        let pool = H1Pool::new(crate::testing::dial(), Duration::from_secs(60));
        for i in 0..5 {
            let r = pool
                .request(addr, get(format!("http://{addr}/n/{i}?q=1")))
                .await
                .expect("response");
            assert_eq!(text(r).await, format!("/n/{i}?q=1 {addr}"));
        }
        assert_eq!(opened.load(Ordering::SeqCst), 1);
        assert_eq!(pool.open(addr), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_get_their_own_connections_and_a_given_host_is_kept() {
        let (addr, opened, _) = server(None, Duration::from_millis(100)).await;
        let pool = H1Pool::new(crate::testing::dial(), Duration::from_secs(60));
        let one = || {
            let mut req = get("/slow".into());
            req.headers_mut().insert(
                hyper::header::HOST,
                hyper::header::HeaderValue::from_static("svc.ns:8080"),
            );
            let f = pool.request(addr, req);
            async move { text(f.await.expect("response")).await }
        };
        let (a, b, c) = tokio::join!(one(), one(), one());
        for t in [a, b, c] {
            assert_eq!(t, "/slow svc.ns:8080");
        }
        assert_eq!(opened.load(Ordering::SeqCst), 3);
        assert_eq!(pool.open(addr), 3);
        // All free again: reused, no fourth connection.
        let r = pool
            .request(addr, get("/again".into()))
            .await
            .expect("response");
        assert_eq!(text(r).await, format!("/again {addr}"));
        assert_eq!(opened.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_replaced_without_failing_a_request() {
        // The server closes every connection after its first response.
        let (addr, opened, closed) = server(Some(1), Duration::ZERO).await;
        let pool = H1Pool::new(crate::testing::dial(), Duration::from_secs(60));
        for i in 0..4 {
            let r = pool
                .request(addr, get(format!("/c/{i}")))
                .await
                .expect("response");
            assert_eq!(text(r).await, format!("/c/{i} {addr}"));
            // Let the close be seen (as between real requests).
            crate::testing::until(50, Duration::from_millis(5), || {
                closed.load(Ordering::SeqCst) > i
            })
            .await;
        }
        assert_eq!(opened.load(Ordering::SeqCst), 4);
        assert_eq!(pool.open(addr), 0);
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let (addr, opened, closed) = server(None, Duration::ZERO).await;
        let pool = H1Pool::new(crate::testing::dial(), Duration::from_millis(200));
        let r = pool
            .request(addr, get("/x".into()))
            .await
            .expect("response");
        text(r).await;
        assert_eq!(pool.open(addr), 1);
        crate::testing::until(100, Duration::from_millis(20), || {
            closed.load(Ordering::SeqCst) == 1
        })
        .await;
        assert_eq!(
            closed.load(Ordering::SeqCst),
            1,
            "idle connection not closed"
        );
        assert_eq!(pool.open(addr), 0);
        let r = pool
            .request(addr, get("/y".into()))
            .await
            .expect("response");
        assert_eq!(text(r).await, format!("/y {addr}"));
        assert_eq!(opened.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        let pool = H1Pool::new(crate::testing::dial(), Duration::from_secs(60));
        let e = pool
            .request(addr, get("/".into()))
            .await
            .expect_err("nothing listens");
        assert!(e.is_connect(), "{e}");
    }
}
