//! The lab's stand-in for application images: an echo server that answers with its pod name,
//! namespace, version label and the request it received (HTTP/1.1, HTTP/2 and plain TCP on the
//! same port, told apart by the first bytes), and a small load client that tallies answers.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::LabError;

/// Who the echo server is.
#[derive(Clone, Debug)]
pub struct Identity {
    pub pod: String,
    pub namespace: String,
    pub version: String,
}

impl Identity {
    fn json(&self) -> Value {
        json!({"pod": self.pod, "namespace": self.namespace, "version": self.version})
    }
}

/// Listen on every port (all addresses) and serve until killed. A port already in use is an
/// error naming it, so the container fails visibly (and the kubelet restarts it).
pub async fn serve(id: Identity, ports: &[u16]) -> Result<(), LabError> {
    let id = Arc::new(id);
    let mut tasks = Vec::new();
    for &port in ports {
        let l = TcpListener::bind(("0.0.0.0", port))
            .await
            .map_err(super::io_err(format!("echo: listening on port {port}")))?;
        eprintln!(
            "echo: {} ({}/{}) listening on :{port}",
            id.pod, id.namespace, id.version
        );
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((s, peer)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(conn(id.clone(), s, peer));
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

fn looks_like_http(b: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"HEAD ",
        b"DELETE ",
        b"PATCH ",
        b"OPTIONS ",
        b"PRI ",
        b"CONNECT ",
    ];
    METHODS
        .iter()
        .any(|m| b.starts_with(m) || (b.len() < m.len() && m.starts_with(b)))
}

async fn conn(id: Arc<Identity>, s: TcpStream, peer: SocketAddr) {
    let mut first = [0u8; 8];
    let n = match s.peek(&mut first).await {
        Ok(n) if n > 0 => n,
        _ => return,
    };
    if looks_like_http(&first[..n]) {
        let svc = hyper::service::service_fn(move |req| answer(id.clone(), peer, req));
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(s), svc)
            .await;
        return;
    }
    // TCP: one JSON line back per line received.
    let (r, mut w) = s.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut v = id.json();
        v["protocol"] = json!("TCP");
        v["received"] = json!(line);
        v["peer"] = json!(peer.to_string());
        if w.write_all(format!("{v}\n").as_bytes()).await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}

async fn answer(
    id: Arc<Identity>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut v = id.json();
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    v["protocol"] = json!(format!("{:?}", req.version()));
    v["method"] = json!(req.method().as_str());
    v["path"] = json!(req.uri().path());
    v["host"] = json!(
        req.headers()
            .get("host")
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().authority().map(|a| a.to_string()))
    );
    v["headers"] = json!(headers);
    v["peer"] = json!(peer.to_string());
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    v["body_bytes"] = json!(body.len());
    let mut resp = Response::new(Full::new(Bytes::from(format!("{v}\n"))));
    resp.headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    Ok(resp)
}

/// What a load run saw.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Tally {
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    pub by_version: BTreeMap<String, u64>,
    pub by_pod: BTreeMap<String, u64>,
    pub statuses: BTreeMap<u16, u64>,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// The last response body (for single requests).
    pub last_body: String,
}

/// Send `n` GETs to `url` (http://host[:port]/path) over one keep-alive connection
/// (reconnecting after errors), tallying answers by the echo servers' version and pod.
pub async fn load(url: &str, n: u64, headers: &[(String, String)]) -> Result<Tally, LabError> {
    load_with(url, n, headers, false).await
}

/// [`load`], over HTTP/2 with prior knowledge (h2c) when `http2`.
pub async fn load_with(
    url: &str,
    n: u64,
    headers: &[(String, String)],
    http2: bool,
) -> Result<Tally, LabError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| LabError::Invalid(format!("{url}: only http:// URLs are supported")))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let target = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let addr = tokio::net::lookup_host(&target)
        .await
        .map_err(|e| LabError::Invalid(format!("resolving {target}: {e}")))?
        .next()
        .ok_or_else(|| LabError::Invalid(format!("{target} did not resolve")))?;
    let mut tally = Tally::default();
    let mut sender: Option<Sender> = None;
    for _ in 0..n {
        tally.requests += 1;
        let result = async {
            if sender.as_ref().is_none_or(Sender::is_closed) {
                let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
                    .await
                    .map_err(|_| "connect timed out".to_owned())?
                    .map_err(|e| format!("connect {addr}: {e}"))?;
                sender = Some(if http2 {
                    let (tx, c) = hyper::client::conn::http2::handshake(
                        TokioExecutor::new(),
                        TokioIo::new(s),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    tokio::spawn(c);
                    Sender::H2(tx)
                } else {
                    let (tx, c) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                        .await
                        .map_err(|e| e.to_string())?;
                    tokio::spawn(c);
                    Sender::H1(tx)
                });
            }
            let tx = sender.as_mut().ok_or("no connection")?;
            let mut req = if http2 {
                Request::get(format!("http://{authority}{path}"))
            } else {
                Request::get(path).header("host", authority)
            };
            for (k, v) in headers {
                req = req.header(k.as_str(), v.as_str());
            }
            let req = req
                .body(Full::new(Bytes::new()))
                .map_err(|e| e.to_string())?;
            let resp = tokio::time::timeout(Duration::from_secs(10), tx.send(req))
                .await
                .map_err(|_| "request timed out".to_owned())?
                .map_err(|e| e.to_string())?;
            let code = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((code, String::from_utf8_lossy(&body).into_owned()))
        }
        .await;
        match result {
            Ok((code, body)) => {
                *tally.statuses.entry(code).or_default() += 1;
                if (200..300).contains(&code) {
                    tally.ok += 1;
                } else {
                    tally.errors += 1;
                }
                if let Ok(v) = serde_json::from_str::<Value>(&body) {
                    if let Some(ver) = v["version"].as_str() {
                        *tally.by_version.entry(ver.to_owned()).or_default() += 1;
                    }
                    if let Some(p) = v["pod"].as_str() {
                        *tally.by_pod.entry(p.to_owned()).or_default() += 1;
                    }
                }
                tally.last_body = body;
            }
            Err(e) => {
                tally.errors += 1;
                sender = None;
                tally.first_error.get_or_insert(e);
            }
        }
    }
    Ok(tally)
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, String> {
        match self {
            Sender::H1(s) => {
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await.map_err(|e| e.to_string())
            }
            Sender::H2(s) => {
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await.map_err(|e| e.to_string())
            }
        }
    }
}

/// Send one line over TCP and return the first line of the answer.
pub async fn tcp_line(target: &str, line: &str) -> Result<String, LabError> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target))
        .await
        .map_err(|_| LabError::Invalid(format!("connecting to {target} timed out")))?
        .map_err(super::io_err(format!("connecting to {target}")))?;
    s.write_all(format!("{line}\n").as_bytes())
        .await
        .map_err(super::io_err("writing"))?;
    s.shutdown().await.map_err(super::io_err("half-close"))?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .map_err(|_| LabError::Invalid("no answer within 5s".into()))?
        .map_err(super::io_err("reading"))?;
    Ok(out.lines().next().unwrap_or_default().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_is_told_from_tcp_by_first_bytes() {
        assert!(looks_like_http(b"GET / HT"));
        assert!(looks_like_http(b"PRI * HT"));
        assert!(
            looks_like_http(b"PO"),
            "a short read that may still be POST"
        );
        assert!(!looks_like_http(b"hello\n"));
        assert!(!looks_like_http(b"\x16\x03\x01"));
    }

    #[tokio::test]
    async fn echo_answers_http1_http2_and_tcp_on_one_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        drop(l);
        let id = Identity {
            pod: "app-v2-x".into(),
            namespace: "canary".into(),
            version: "v2".into(),
        };
        tokio::spawn(async move { serve(id, &[port]).await });
        let target = format!("127.0.0.1:{port}");
        let mut tries = 0;
        while TcpStream::connect(&target).await.is_err() {
            tries += 1;
            assert!(tries < 100, "echo server did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t = load(
            &format!("http://{target}/hello"),
            3,
            &[("end-user".into(), "jason".into())],
        )
        .await
        .expect("load");
        assert_eq!((t.ok, t.errors), (3, 0));
        assert_eq!(t.by_version.get("v2"), Some(&3));
        let v: Value = serde_json::from_str(&t.last_body).expect("json");
        assert_eq!(v["path"], "/hello");
        assert_eq!(v["headers"]["end-user"], "jason");
        assert_eq!(v["protocol"], "HTTP/1.1");
        // HTTP/2 with prior knowledge.
        let s = TcpStream::connect(&target).await.expect("connect");
        let (mut tx, c) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .expect("h2");
        tokio::spawn(c);
        let resp = tx
            .send_request(
                Request::get(format!("http://{target}/h2"))
                    .body(Full::new(Bytes::new()))
                    .expect("req"),
            )
            .await
            .expect("h2 request");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            (v["protocol"].as_str(), v["pod"].as_str()),
            (Some("HTTP/2.0"), Some("app-v2-x"))
        );
        let line = tcp_line(&target, "ping").await.expect("tcp");
        let v: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(
            (v["protocol"].as_str(), v["received"].as_str()),
            (Some("TCP"), Some("ping"))
        );
        // A second server on the same port fails with a message naming the port.
        let err = serve(
            Identity {
                pod: "p".into(),
                namespace: "n".into(),
                version: String::new(),
            },
            &[port],
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("listening on port {port}")),
            "{err}"
        );
    }
}
