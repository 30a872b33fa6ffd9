//! Test upstreams: an HTTP server (HTTP/1.1 and HTTP/2, trailers, slow responses, websocket-style
//! upgrade) that says who it is and what it received, and raw TCP servers (echo with half-close,
//! server-first greeting).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).boxed()
}

/// Requests in flight at one server, for `/gate/N`.
type InFlight = std::sync::Arc<std::sync::atomic::AtomicUsize>;

async fn handle(
    name: String,
    peer: SocketAddr,
    in_flight: InFlight,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    // `/gate/N`: answered once N requests are in flight at this server at the same time (503
    // after 10 s otherwise), to show that N concurrent requests really reached it concurrently.
    if let Some(n) = path
        .strip_prefix("/gate/")
        .and_then(|n| n.parse::<usize>().ok())
    {
        use std::sync::atomic::Ordering::SeqCst;
        in_flight.fetch_add(1, SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while in_flight.load(SeqCst) < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let seen = in_flight.load(SeqCst);
        // Leave only after everyone has seen the gate open.
        tokio::time::sleep(Duration::from_millis(200)).await;
        in_flight.fetch_sub(1, SeqCst);
        let mut r = Response::new(full(format!("{seen} of {n} in flight")));
        if seen < n {
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        }
        return Ok(r);
    }
    let host = req
        .headers()
        .get("host")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let version = format!("{:?}", req.version());
    // Hop-by-hop headers as they arrived (a proxy must not forward them).
    let hop: serde_json::Map<String, serde_json::Value> = [
        "connection",
        "keep-alive",
        "x-hop",
        "te",
        "x-ferry-orig-proto",
    ]
    .iter()
    .filter_map(|k| {
        let v = req.headers().get(*k)?.to_str().ok()?;
        Some((k.to_string(), serde_json::Value::from(v)))
    })
    .collect();
    if path == "/ws" {
        // Minimal upgrade handshake, then echo bytes.
        let mut req = req;
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut r = Response::new(full(""));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("upgrade", "websocket".parse().expect("header"));
        r.headers_mut()
            .insert("connection", "upgrade".parse().expect("header"));
        return Ok(r);
    }
    if let Some(ms) = path
        .strip_prefix("/slow/")
        .and_then(|m| m.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let info = serde_json::json!({"server": name, "path": path, "host": host, "version": version, "peer": peer.to_string(), "body_len": body.len(), "hop": hop});
    if path == "/trailers" {
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
            Ok(Frame::data(Bytes::from(info.to_string()))),
            Ok(Frame::trailers({
                let mut t = hyper::HeaderMap::new();
                t.insert("grpc-status", "0".parse().expect("header"));
                t.insert("grpc-message", "ok".parse().expect("header"));
                t
            })),
        ];
        let mut r = Response::new(StreamBody::new(futures_lite_iter(frames)).boxed());
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().expect("header"));
        return Ok(r);
    }
    let mut r = Response::new(full(info.to_string()));
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    Ok(r)
}

fn futures_lite_iter(
    frames: Vec<Result<Frame<Bytes>, Infallible>>,
) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync {
    struct Iter(std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>);
    impl futures_core::Stream for Iter {
        type Item = Result<Frame<Bytes>, Infallible>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    Iter(frames.into_iter())
}

/// Serve HTTP (h1 and h2c prior knowledge) on an already bound listener forever.
pub async fn serve_http(listener: TcpListener, name: String) {
    serve(listener, name, false).await
}

/// Serve HTTP/1.1 only (`h1_only`) or HTTP/1.1 and h2c on `listener` forever.
async fn serve(listener: TcpListener, name: String, h1_only: bool) {
    let in_flight = InFlight::default();
    loop {
        let Ok((s, peer)) = listener.accept().await else {
            continue;
        };
        let name = name.clone();
        let in_flight = in_flight.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                handle(name.clone(), peer, in_flight.clone(), req)
            });
            let io = TokioIo::new(s);
            let _ = if h1_only {
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await
                    .map_err(|e| e.to_string())
            } else {
                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(io, svc)
                    .await
                    .map_err(|e| e.to_string())
            };
        });
    }
}

/// Start an HTTP upstream on 127.0.0.1:0; returns its address.
pub async fn http(name: &str) -> SocketAddr {
    http_on("127.0.0.1", name).await
}

/// Start an HTTP upstream on another loopback address (127.0.0.2, ...), so several "pods" can be
/// told apart by IP in one test.
pub async fn http_on(ip: &str, name: &str) -> SocketAddr {
    let l = TcpListener::bind(format!("{ip}:0")).await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(serve_http(l, name.to_owned()));
    a
}

/// An HTTP/1.1-only upstream on `ip` (an app without a sidecar in front): anything else, such as
/// an HTTP/2 connection preface, gets an error reply.
pub async fn http1_only_on(ip: &str, name: &str) -> SocketAddr {
    let l = TcpListener::bind(format!("{ip}:0")).await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(serve(l, name.to_owned(), true));
    a
}

/// A TCP relay on `ip` to `target` that counts the connections it accepted (to see how many
/// connections a proxy opened to a destination).
pub async fn counting_relay(
    ip: &str,
    target: SocketAddr,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = TcpListener::bind(format!("{ip}:0")).await.expect("bind");
    let a = l.local_addr().expect("addr");
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut down, _)) = l.accept().await else {
                continue;
            };
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
            });
        }
    });
    (a, count)
}

/// Echo server: echoes until the client half-closes, then writes "bye" and closes.
pub async fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(serve_echo(l));
    a
}

/// The echo server on an already bound listener.
pub async fn serve_echo(l: TcpListener) {
    {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.write_all(b"bye").await;
                let _ = s.shutdown().await;
            });
        }
    }
}

/// A server-first protocol: greets immediately on accept, before the client says anything.
pub async fn server_first(greeting: &'static [u8]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = s.write_all(greeting).await;
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
            });
        }
    });
    a
}

/// A gRPC health server answering `grpc.health.v1.Health/Check` with `status` (1 = SERVING),
/// over HTTP/2 prior knowledge.
pub async fn grpc_health(status: u8) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    let ok = req.uri().path() == "/grpc.health.v1.Health/Check";
                    let _ = req.into_body().collect().await;
                    let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                        Ok(Frame::data(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]))),
                        Ok(Frame::trailers({
                            let mut t = hyper::HeaderMap::new();
                            t.insert(
                                "grpc-status",
                                if ok { "0" } else { "12" }.parse().expect("header"),
                            );
                            t
                        })),
                    ];
                    let mut r = Response::new(StreamBody::new(futures_lite_iter(frames)).boxed());
                    r.headers_mut()
                        .insert("content-type", "application/grpc".parse().expect("header"));
                    Ok::<_, Infallible>(r)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    a
}

/// A TLS server presenting `pair` that answers every connection with `hello from <name>`.
pub async fn tls_hello(cert_pem: &str, key_pem: &str, name: &'static str) -> SocketAddr {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<rustls_pki_types::CertificateDer<'static>> =
        rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("cert");
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
    let cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(s).await {
                    let _ = tls.write_all(format!("hello from {name}").as_bytes()).await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    a
}
