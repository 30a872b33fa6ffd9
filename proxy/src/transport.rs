//! Accepting captured connections: the original destination (`SO_ORIGINAL_DST`, IPv4 then IPv6,
//! canonicalized), and connecting upstream (inbound from 127.0.0.6 / ::6, the source `init`
//! exempts from capture, so nothing loops).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

/// Where the original destination comes from.
#[derive(Clone, Copy, Debug)]
pub enum OrigDst {
    /// The kernel (iptables REDIRECT).
    Kernel,
    /// A fixed address (in-process tests without iptables).
    #[cfg(any(test, feature = "test-util"))]
    Fixed(SocketAddr),
}

impl OrigDst {
    pub fn of(&self, s: &TcpStream) -> io::Result<SocketAddr> {
        match self {
            OrigDst::Kernel => {
                let sock = socket2::SockRef::from(s);
                let addr = match s.local_addr()? {
                    SocketAddr::V4(_) => sock.original_dst_v4(),
                    SocketAddr::V6(_) => sock.original_dst_v6().or_else(|_| sock.original_dst_v4()),
                }?;
                let a = addr
                    .as_socket()
                    .ok_or_else(|| io::Error::other("original destination is not an IP address"))?;
                Ok(SocketAddr::new(a.ip().to_canonical(), a.port()))
            }
            #[cfg(any(test, feature = "test-util"))]
            OrigDst::Fixed(a) => Ok(*a),
        }
    }
}

/// The inbound passthrough source: connections to the app come from here.
pub fn inbound_source(dst: &SocketAddr) -> SocketAddr {
    match dst {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6)), 0),
    }
}

/// Connect, optionally from a source address, within `timeout`.
pub async fn connect(
    dst: SocketAddr,
    source: Option<SocketAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let sock = match dst {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(src) = source {
        sock.bind(src)
            .map_err(|e| io::Error::new(e.kind(), format!("binding source {src}: {e}")))?;
    }
    let s = tokio::time::timeout(timeout, sock.connect(dst))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {dst} timed out"),
            )
        })??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// How the upstream pools connect: inbound (to the app) from the passthrough source, within
/// `timeout`, with the DestinationRule's TCP keepalive if it sets one.
#[derive(Clone, Copy, Debug)]
pub struct Dial {
    pub inbound: bool,
    pub timeout: Duration,
    pub keepalive: Option<Duration>,
}

impl Dial {
    pub async fn connect(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        let source = self.inbound.then(|| inbound_source(&dst));
        let s = connect(dst, source, self.timeout).await?;
        if let Some(k) = self.keepalive {
            let _ = socket2::SockRef::from(&s)
                .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(k));
        }
        Ok(s)
    }
}

/// Why a request through an upstream pool (`h1pool`, `h2pool`) failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection to the endpoint (refused, unreachable, timed out).
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, #[source] std::io::Error),
    #[error("handshake with {0}: {1}")]
    Handshake(
        SocketAddr,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    ),
    /// HTTP/1.1.
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// The HTTP/2 stream or connection failed.
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
}

impl UpstreamError {
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect(..) | UpstreamError::Handshake(..)
        )
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, UpstreamError::Connect(_, e) if e.kind() == std::io::ErrorKind::TimedOut)
    }

    /// The peer refused the stream (REFUSED_STREAM: it did no work on it, so a retry is safe).
    pub fn is_refused_stream(&self) -> bool {
        matches!(self, UpstreamError::H2(e) if e.reason() == Some(h2::Reason::REFUSED_STREAM))
    }
}
