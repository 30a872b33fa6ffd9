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
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

type Slot<B> = Arc<tokio::sync::Mutex<Option<SendRequest<B>>>>;

/// Connections to endpoints for request bodies of type `B`.
pub struct H2Pool<B> {
    slots: Mutex<HashMap<SocketAddr, Slot<B>>>,
    /// Connect from 127.0.0.6 (inbound: to the app).
    inbound: bool,
    timeout: Duration,
    /// TCP keepalive (a DestinationRule's `tcp.tcpKeepalive.time`).
    keepalive: Option<Duration>,
}

impl<B> H2Pool<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub fn new(inbound: bool, timeout: Duration, keepalive: Option<Duration>) -> Self {
        H2Pool {
            slots: Mutex::new(HashMap::new()),
            inbound,
            timeout,
            keepalive,
        }
    }

    fn slot(&self, endpoint: SocketAddr) -> Slot<B> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slots.get(&endpoint) {
            return s.clone();
        }
        // Endpoints come and go: drop the slots of closed connections before adding one.
        if slots.len() >= 1024 {
            slots.retain(|_, s| {
                s.try_lock()
                    .map_or(true, |c| c.as_ref().is_some_and(|c| !c.is_closed()))
            });
        }
        slots.entry(endpoint).or_default().clone()
    }

    /// The open connection to `endpoint`, or a new one (one connect at a time per endpoint: the
    /// requests that arrive meanwhile wait for it and share it).
    async fn connection(&self, endpoint: SocketAddr) -> Result<SendRequest<B>, Error> {
        let slot = self.slot(endpoint);
        let mut conn = slot.lock().await;
        if let Some(c) = conn.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let source = self.inbound.then(|| transport::inbound_source(&endpoint));
        let stream = transport::connect(endpoint, source, self.timeout)
            .await
            .map_err(|e| Error::Connect(endpoint, e))?;
        if let Some(k) = self.keepalive {
            let _ = socket2::SockRef::from(&stream)
                .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(k));
        }
        let io = TokioIo::new(Coalesce::new(stream, true));
        let (send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await
            .map_err(|e| Error::Handshake(endpoint, e))?;
        tokio::spawn(async move {
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
