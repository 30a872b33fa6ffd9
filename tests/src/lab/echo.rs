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

/// How the echo server misbehaves on purpose (for resilience tests): a fixed status, or 503 for
/// its first N requests. Per request: `/status/NNN` answers NNN, `/delay/MS` waits first.
/// `GET /echo/count` reports the requests received by method and by Host (not counted itself).
#[derive(Clone, Debug, Default)]
pub struct Behaviour {
    pub status: Option<u16>,
    pub fail_first: u32,
}

struct State {
    id: Identity,
    behaviour: Behaviour,
    served: std::sync::atomic::AtomicU32,
    by_method: std::sync::Mutex<BTreeMap<String, u64>>,
    by_host: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl Identity {
    fn json(&self) -> Value {
        json!({"pod": self.pod, "namespace": self.namespace, "version": self.version})
    }
}

/// Listen on every port (all addresses) and serve until killed. A port already in use is an
/// error naming it, so the container fails visibly (and the kubelet restarts it).
pub async fn serve(id: Identity, behaviour: Behaviour, ports: &[u16]) -> Result<(), LabError> {
    let state = Arc::new(State {
        id: id.clone(),
        behaviour,
        served: Default::default(),
        by_method: Default::default(),
        by_host: Default::default(),
    });
    let mut tasks = Vec::new();
    for &port in ports {
        let l = TcpListener::bind(("0.0.0.0", port))
            .await
            .map_err(super::io_err(format!("echo: listening on port {port}")))?;
        eprintln!(
            "echo: {} ({}/{}) listening on :{port}",
            id.pod, id.namespace, id.version
        );
        let state = state.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((s, peer)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(conn(state.clone(), s, peer));
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

async fn conn(state: Arc<State>, s: TcpStream, peer: SocketAddr) {
    let mut first = [0u8; 8];
    let n = match s.peek(&mut first).await {
        Ok(n) if n > 0 => n,
        _ => return,
    };
    if looks_like_http(&first[..n]) {
        let svc = hyper::service::service_fn(move |req| answer(state.clone(), peer, req));
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(s), svc)
            .await;
        return;
    }
    // TCP: one JSON line back per line received.
    let (r, mut w) = s.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut v = state.id.json();
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
    state: Arc<State>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    if path == "/echo/count" {
        let counts = state
            .by_method
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        let hosts = state.by_host.lock().map(|m| m.clone()).unwrap_or_default();
        return Ok(Response::new(Full::new(Bytes::from(format!(
            "{}\n",
            json!({"methods": counts, "hosts": hosts})
        )))));
    }
    if let Ok(mut m) = state.by_host.lock() {
        let host = req
            .headers()
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .to_owned();
        *m.entry(host).or_default() += 1;
    }
    let n = state
        .served
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    if let Ok(mut m) = state.by_method.lock() {
        *m.entry(req.method().as_str().to_owned()).or_default() += 1;
    }
    let segment = |name: &str| -> Option<u64> {
        let mut it = path.split('/');
        it.position(|p| p == name)?;
        it.next()?.parse().ok()
    };
    if let Some(ms) = segment("delay") {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    let status = if n < state.behaviour.fail_first {
        503
    } else if let Some(s) = segment("status") {
        s as u16
    } else {
        state.behaviour.status.unwrap_or(200)
    };
    let mut v = state.id.json();
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
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
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
    /// Fastest and slowest answer per status, in milliseconds.
    pub min_ms_by_status: BTreeMap<u16, f64>,
    pub max_ms_by_status: BTreeMap<u16, f64>,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// The last response body (for single requests).
    pub last_body: String,
}

/// A load run's shape.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub requests: u64,
    pub headers: Vec<(String, String)>,
    pub http2: bool,
    /// Connections used at once (each sends its share of the requests in sequence).
    pub concurrency: u64,
    pub method: String,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            requests: 1,
            headers: vec![],
            http2: false,
            concurrency: 1,
            method: "GET".into(),
        }
    }
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
    load_opts(
        url,
        &LoadOptions {
            requests: n,
            headers: headers.to_vec(),
            http2,
            ..LoadOptions::default()
        },
    )
    .await
}

/// Run `opts.requests` requests over `opts.concurrency` connections and merge the tallies.
pub async fn load_opts(url: &str, opts: &LoadOptions) -> Result<Tally, LabError> {
    let c = opts.concurrency.clamp(1, 1000);
    let mut tasks = Vec::new();
    for i in 0..c {
        let share = opts.requests / c + u64::from(i < opts.requests % c);
        let (url, opts) = (url.to_owned(), opts.clone());
        tasks.push(tokio::spawn(
            async move { load_one(&url, share, &opts).await },
        ));
    }
    let mut total = Tally::default();
    for t in tasks {
        let t = t
            .await
            .map_err(|e| LabError::State(format!("load task: {e}")))??;
        total.merge(t);
    }
    Ok(total)
}

impl Tally {
    fn merge(&mut self, t: Tally) {
        self.requests += t.requests;
        self.ok += t.ok;
        self.errors += t.errors;
        for (k, v) in t.by_version {
            *self.by_version.entry(k).or_default() += v;
        }
        for (k, v) in t.by_pod {
            *self.by_pod.entry(k).or_default() += v;
        }
        for (k, v) in t.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        for (k, v) in t.min_ms_by_status {
            let e = self.min_ms_by_status.entry(k).or_insert(v);
            *e = e.min(v);
        }
        for (k, v) in t.max_ms_by_status {
            let e = self.max_ms_by_status.entry(k).or_insert(v);
            *e = e.max(v);
        }
        if self.first_error.is_none() {
            self.first_error = t.first_error;
        }
        if !t.last_body.is_empty() {
            self.last_body = t.last_body;
        }
    }
}

async fn load_one(url: &str, n: u64, opts: &LoadOptions) -> Result<Tally, LabError> {
    let (headers, http2) = (&opts.headers, opts.http2);
    let method = hyper::Method::from_bytes(opts.method.as_bytes())
        .map_err(|_| LabError::Invalid(format!("{:?} is not an HTTP method", opts.method)))?;

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
        let began = std::time::Instant::now();
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
            // A Host header given explicitly replaces the URL's (to reach a virtual host).
            let own_host = headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host"));
            let mut req = if http2 {
                Request::builder()
                    .method(method.clone())
                    .uri(format!("http://{authority}{path}"))
            } else if own_host {
                Request::builder().method(method.clone()).uri(path)
            } else {
                Request::builder()
                    .method(method.clone())
                    .uri(path)
                    .header("host", authority)
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
                let ms = began.elapsed().as_secs_f64() * 1000.0;
                *tally.statuses.entry(code).or_default() += 1;
                let lo = tally.min_ms_by_status.entry(code).or_insert(ms);
                *lo = lo.min(ms);
                let hi = tally.max_ms_by_status.entry(code).or_insert(ms);
                *hi = hi.max(ms);
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
        tokio::spawn(async move {
            serve(
                id,
                Behaviour {
                    fail_first: 1,
                    status: None,
                },
                &[port],
            )
            .await
        });
        let target = format!("127.0.0.1:{port}");
        let mut tries = 0;
        while TcpStream::connect(&target).await.is_err() {
            tries += 1;
            assert!(tries < 100, "echo server did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t = load(
            &format!("http://{target}/hello"),
            4,
            &[("end-user".into(), "jason".into())],
        )
        .await
        .expect("load");
        // The first request fails on purpose (fail_first: 1).
        assert_eq!((t.ok, t.errors), (3, 1), "{t:?}");
        assert_eq!(t.statuses.get(&503), Some(&1));
        assert_eq!(t.by_version.get("v2"), Some(&4));
        let t2 = load(&format!("http://{target}/status/418/delay/50"), 1, &[])
            .await
            .expect("status");
        assert_eq!(t2.statuses.get(&418), Some(&1), "{t2:?}");
        let t3 = load(&format!("http://{target}/echo/count"), 1, &[])
            .await
            .expect("count");
        assert!(t3.last_body.contains("\"GET\":5"), "{}", t3.last_body);
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
            Behaviour::default(),
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
