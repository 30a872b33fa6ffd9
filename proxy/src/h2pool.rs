//! HTTP/2 client connections, one per endpoint, shared by every request to it.
//!
//! The key is the endpoint the balancer picked, and a request keeps its own `:authority` (what
//! Envoy sends; hyper-util's pooled client keyed connections by the URI's authority, so every
//! request would have left with the pod IP). Requests go through the `h2` crate directly, from
//! the request's own task: hyper's HTTP/2 client hands each request to the connection task over
//! a channel and spawns a task per response (callgrind: ~4,000 instructions per request, most
//! of the difference between an outbound sidecar and an inbound one). A request body, when
//! there is one, is sent by a task of its own with HTTP/2 flow control.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper::{Request, Response};
use tracing::debug;

use crate::coalesce::Coalesce;
use crate::transport;

pub use crate::transport::UpstreamError as Error;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Flow-control windows and send buffer: hyper's client defaults, which the proxy used before
/// (h2's own 64 KiB windows would throttle a large response to one round trip per window).
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;

/// An endpoint's connection, and when a request last went through it.
struct Slot {
    conn: tokio::sync::Mutex<Option<h2::client::SendRequest<Bytes>>>,
    /// Milliseconds since the pool's `epoch`.
    used: AtomicU64,
    /// Bumped per new connection, so a connection's idle watch only ever drops its own.
    generation: AtomicU64,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            conn: tokio::sync::Mutex::new(None),
            used: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        }
    }
}

pub struct H2Pool {
    slots: Mutex<crate::FastMap<SocketAddr, Arc<Slot>>>,
    dial: transport::Dial,
    idle: Duration,
    epoch: Instant,
}

impl H2Pool {
    /// Connections made with `dial`; `idle` is how long an unused one stays open.
    pub fn new(dial: transport::Dial, idle: Duration) -> Self {
        H2Pool {
            slots: Mutex::default(),
            dial,
            idle,
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn slot(&self, endpoint: SocketAddr) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slots.get(&endpoint) {
            return s.clone();
        }
        // Endpoints come and go: forget the ones whose connection is gone (keeps the map
        // bounded by the endpoints in use).
        if slots.len() >= 1024 {
            slots.retain(|_, s| s.conn.try_lock().map_or(true, |c| c.is_some()));
        }
        slots.entry(endpoint).or_default().clone()
    }

    /// The endpoint's connection, ready for a new stream; a new one if there is none or it
    /// can take no more (closed, or going away).
    async fn ready(&self, endpoint: SocketAddr) -> Result<h2::client::SendRequest<Bytes>, Error> {
        let slot = self.slot(endpoint);
        slot.used.store(self.now_ms(), Ordering::Relaxed);
        let mut conn = slot.conn.lock().await;
        if let Some(c) = conn.as_ref() {
            let mut c = c.clone();
            match std::future::poll_fn(|cx| c.poll_ready(cx)).await {
                Ok(()) => return Ok(c),
                Err(e) => {
                    debug!(%endpoint, error = %e, "HTTP/2 connection cannot take more requests: reconnecting")
                }
            }
        }
        *conn = None;
        let send = self.connect(endpoint, &slot).await?;
        *conn = Some(send.clone());
        Ok(send)
    }

    async fn connect(
        &self,
        endpoint: SocketAddr,
        slot: &Arc<Slot>,
    ) -> Result<h2::client::SendRequest<Bytes>, Error> {
        let stream = self
            .dial
            .connect(endpoint)
            .await
            .map_err(|e| Error::Connect(endpoint, e))?;
        let (send, connection) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .handshake::<_, Bytes>(Coalesce::new(stream, true))
            .await
            .map_err(|e| Error::Handshake(endpoint, e.into()))?;
        let generation = slot.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let (idle, epoch) = (self.idle, self.epoch);
        let watched = slot.clone();
        tokio::spawn(async move {
            // Closes the connection once no request has used it for `idle`.
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
            // The handle is dropped: the connection finishes its streams and closes.
            if let Err(e) = connection.await {
                debug!(%endpoint, error = %e, "HTTP/2 upstream connection ended");
            }
        });
        Ok(send)
    }

    /// Send `req` (its URI absolute: scheme and authority become `:scheme` and `:authority`)
    /// to `endpoint`; a pooled connection that can take no more is replaced first.
    pub async fn send<B>(
        &self,
        endpoint: SocketAddr,
        req: Request<B>,
    ) -> Result<Response<H2Body>, Error>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = req.into_parts();
        let eos = body.is_end_stream();
        let mut send = self.ready(endpoint).await?;
        let (response, stream) = send.send_request(Request::from_parts(parts, ()), eos)?;
        if !eos {
            tokio::spawn(pipe(body, stream));
        }
        let resp = response.await?;
        Ok(resp.map(H2Body::new))
    }
}

/// Sends a request body on its stream, within the peer's flow-control window; trailers too.
/// A body that fails resets the stream (the upstream then sees the request as aborted, never as
/// complete); a stream the peer resets stops the copy.
async fn pipe<B>(body: B, mut stream: h2::SendStream<Bytes>)
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    tokio::pin!(body);
    loop {
        let frame: Option<Result<Frame<Bytes>, BoxError>> = tokio::select! {
            f = body.frame() => f.map(|r| r.map_err(Into::into)),
            _ = std::future::poll_fn(|cx| stream.poll_reset(cx)) => return,
        };
        let frame = match frame {
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(e)) => {
                debug!(error = %e, "request body failed: resetting the HTTP/2 stream");
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            Some(Ok(f)) => f,
        };
        match frame.into_data() {
            Ok(mut data) => {
                while !data.is_empty() {
                    stream.reserve_capacity(data.len());
                    let granted = match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                        Some(Ok(n)) => n,
                        _ => return,
                    };
                    if granted == 0 {
                        continue;
                    }
                    let chunk = data.split_to(granted.min(data.len()));
                    if stream.send_data(chunk, false).is_err() {
                        return;
                    }
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = stream.send_trailers(trailers);
                    return;
                }
            }
        }
    }
}

/// A response body read from an HTTP/2 stream; what is read is given back to the peer's
/// flow-control window at once (the proxy passes it on, it does not keep it).
#[derive(Debug)]
pub struct H2Body {
    recv: h2::RecvStream,
    data_done: bool,
}

impl H2Body {
    fn new(recv: h2::RecvStream) -> Self {
        H2Body {
            recv,
            data_done: false,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.recv.is_end_stream() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Empty, Full, StreamBody};
    use hyper::body::Incoming;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::sync::atomic::AtomicUsize;

    /// An HTTP/2 server: `/echo` answers with the request body (and its trailers, plus a
    /// count of the body's bytes), anything else with the request's authority. Counts
    /// connections opened and closed.
    async fn server() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        crate::testing::counting_server(|s| {
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                if req.uri().path() == "/echo" {
                    let Ok(got) = req.into_body().collect().await else {
                        let mut r = Response::new(Full::new(Bytes::new()));
                        *r.status_mut() = hyper::StatusCode::BAD_REQUEST;
                        return Ok(r);
                    };
                    let trailers = got.trailers().cloned();
                    let bytes = got.to_bytes();
                    let mut r = Response::new(Full::new(bytes.clone()));
                    r.headers_mut().insert(
                        "x-received",
                        bytes.len().to_string().parse().expect("value"),
                    );
                    if let Some(t) = trailers.and_then(|t| t.get("x-sum").cloned()) {
                        r.headers_mut().insert("x-trailer", t);
                    }
                    return Ok::<_, std::convert::Infallible>(r);
                }
                let authority = req.uri().authority().map(|a| a.to_string());
                Ok(Response::new(Full::new(Bytes::from(
                    authority.unwrap_or_default(),
                ))))
            });
            async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            }
        })
        .await
    }

    fn get(authority: &str) -> Request<Empty<Bytes>> {
        Request::get(format!("http://{authority}/"))
            .body(Empty::new())
            .expect("request")
    }

    async fn body(r: Response<H2Body>) -> Bytes {
        r.into_body().collect().await.expect("body").to_bytes()
    }

    #[tokio::test]
    async fn requests_share_a_connection_keep_their_authority_and_idle_connections_close() {
        let (addr, opened, closed) = server().await;
        let pool = Arc::new(H2Pool::new(
            crate::testing::dial(),
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
    async fn bodies_beyond_the_flow_control_windows_and_trailers_go_through() {
        let (addr, _, _) = server().await;
        let pool = H2Pool::new(crate::testing::dial(), Duration::from_secs(60));
        // 6 MiB in 64 KiB chunks, more than the stream's and the connection's windows, then
        // trailers.
        let chunk = Bytes::from(vec![7u8; 64 * 1024]);
        let mut frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
            (0..96).map(|_| Ok(Frame::data(chunk.clone()))).collect();
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert("x-sum", "672".parse().expect("value"));
        frames.push(Ok(Frame::trailers(trailers)));
        let req = Request::post(format!("http://{addr}/echo"))
            .body(StreamBody::new(futures_util::stream::iter(frames)))
            .expect("request");
        let r = pool.send(addr, req).await.expect("response");
        assert_eq!(r.headers()["x-received"], (6 * 1024 * 1024).to_string());
        assert_eq!(r.headers()["x-trailer"], "672");
        let echoed = body(r).await;
        assert_eq!(echoed.len(), 6 * 1024 * 1024);
        assert!(echoed.iter().all(|b| *b == 7));
    }

    #[tokio::test]
    async fn a_request_body_that_fails_resets_the_stream() {
        let (addr, _, _) = server().await;
        let pool = H2Pool::new(crate::testing::dial(), Duration::from_secs(60));
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"partial"))),
            Err(std::io::Error::other("client went away")),
        ];
        let req = Request::post(format!("http://{addr}/echo"))
            .body(StreamBody::new(futures_util::stream::iter(frames)))
            .expect("request");
        // The server never sees a complete body, so it cannot answer as if it had.
        let e = pool.send(addr, req).await.expect_err("stream reset");
        assert!(!e.is_connect(), "{e}");
        // The connection still serves other requests.
        let r = pool.send(addr, get("ok")).await.expect("response");
        assert_eq!(body(r).await, "ok");
    }

    #[tokio::test]
    async fn a_server_that_does_not_speak_http2_fails_the_request_not_the_connect() {
        // Answers like an HTTP/1.1 server to the preface, then closes.
        let (addr, _, _) = crate::testing::counting_server(|mut s| async move {
            use tokio::io::AsyncWriteExt;
            let _ = s
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
        })
        .await;
        let pool = H2Pool::new(crate::testing::dial(), Duration::from_secs(60));
        let e = pool.send(addr, get("x")).await.expect_err("not HTTP/2");
        assert!(!e.is_connect(), "{e}");
    }

    #[tokio::test]
    async fn a_refused_stream_is_told_apart_from_other_resets() {
        // Refuses `/refuse`, resets anything else with INTERNAL_ERROR.
        let (addr, _, _) = crate::testing::counting_server(|s| async move {
            let Ok(mut conn) = h2::server::handshake(s).await else {
                return;
            };
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                respond.send_reset(if req.uri().path() == "/refuse" {
                    h2::Reason::REFUSED_STREAM
                } else {
                    h2::Reason::INTERNAL_ERROR
                });
            }
        })
        .await;
        let pool = H2Pool::new(crate::testing::dial(), Duration::from_secs(60));
        let req = |path: &str| {
            Request::get(format!("http://svc{path}"))
                .body(Empty::<Bytes>::new())
                .expect("request")
        };
        let e = pool.send(addr, req("/refuse")).await.expect_err("refused");
        assert!(e.is_refused_stream() && !e.is_connect(), "{e}");
        let e = pool.send(addr, req("/other")).await.expect_err("reset");
        assert!(!e.is_refused_stream() && !e.is_connect(), "{e}");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let pool = H2Pool::new(crate::testing::dial(), Duration::from_secs(60));
        let e = pool.send(addr, get("x")).await.expect_err("refused");
        assert!(e.is_connect() && !e.is_timeout(), "{e}");
    }
}
