//! The non-data ports: 15021 readiness, 15090 Prometheus, 15020 the agent port (merged metrics,
//! the app probes the injector rewrote, `/quitquitquit`, `/drain`), 15000 admin (loopback only:
//! config dump).

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info};

use crate::config::Config;
use crate::discovery::{Snapshot, Target};
use crate::metrics::Metrics;
use crate::proxy::Body;

/// Readiness as named blockers: `/healthz/ready` lists what is still pending.
#[derive(Default)]
pub struct Readiness {
    pending: Mutex<BTreeSet<String>>,
    draining: AtomicBool,
}

impl Readiness {
    pub fn block(&self, what: &str) {
        if let Ok(mut p) = self.pending.lock() {
            p.insert(what.to_owned());
        }
    }
    pub fn unblock(&self, what: &str) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(what);
        }
    }
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
    /// `Ok` when ready, else what is pending.
    pub fn check(&self) -> Result<(), String> {
        if self.is_draining() {
            return Err("draining".into());
        }
        let p = self
            .pending
            .lock()
            .map(|p| p.iter().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        if p.is_empty() {
            Ok(())
        } else {
            Err(format!("not ready, waiting for: {}", p.join(", ")))
        }
    }
}

/// State the admin ports read.
pub struct Admin {
    pub cfg: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// `/quitquitquit` (exit) and `/drain` (drain without exiting) requests.
    pub quit: watch::Sender<Option<Quit>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quit {
    Drain,
    Exit,
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

fn json_resp(v: &Value) -> Response<Body> {
    let mut r = text(
        StatusCode::OK,
        serde_json::to_vec_pretty(v).unwrap_or_default(),
    );
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Which port a request arrived on decides which routes exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    Health,
    Prometheus,
    Agent,
    Admin,
}

impl Admin {
    fn ready(&self) -> Response<Body> {
        match self.readiness.check() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        }
    }

    fn prometheus(&self, body: String) -> Response<Body> {
        let mut r = text(StatusCode::OK, body);
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        r
    }

    /// The config dump: what the proxy knows and how it got it.
    pub fn config_dump(&self) -> Value {
        let snap = self.snapshot.borrow().clone();
        let services: Vec<Value> = snap
            .services
            .iter()
            .map(|s| {
                json!({
                    "name": s.name, "namespace": s.namespace, "hostname": s.hostname,
                    "clusterIPs": s.cluster_ips.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                    "ports": s.ports.iter().map(|p| json!({"name": p.name, "port": p.port, "protocol": format!("{:?}", p.protocol)})).collect::<Vec<_>>(),
                    // `sidecar`: the endpoints whose sidecar captures the port (HTTP/1.1 to them is
                    // multiplexed over HTTP/2 unless `multiplexPeers` is off).
                    "endpoints": s.endpoints.iter().map(|(port, eps)| json!({"port": port,
                        "addresses": eps.iter().map(|e| e.addr.to_string()).collect::<Vec<_>>(),
                        "sidecar": eps.iter().filter(|e| e.sidecar).map(|e| e.addr.to_string()).collect::<Vec<_>>()})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let p = self.cfg.ports;
        json!({
            "version": snap.version,
            "pod": {"name": self.cfg.pod_name, "namespace": self.cfg.pod_namespace, "ips": self.cfg.instance_ips.iter().map(|i| i.to_string()).collect::<Vec<_>>()},
            // What was asked for and what this thread actually runs with (a refused policy
            // change shows here, not only in the start-up log).
            "runtime": {
                "workers": self.cfg.workers,
                "scheduling": format!("{:?}", self.cfg.scheduling),
                "schedulingInEffect": crate::os::scheduling().map_or_else(|e| format!("unknown: {e}"), |p| format!("{p:?}")),
                "multiplexPeers": self.cfg.multiplex_peers,
            },
            "listeners": [
                {"name": "virtualOutbound", "address": format!("0.0.0.0:{}", p.outbound), "policy": format!("{:?}", self.cfg.outbound_policy)},
                {"name": "virtualInbound", "address": format!("0.0.0.0:{}", p.inbound)},
                {"name": "health", "address": format!("0.0.0.0:{}", p.health)},
                {"name": "prometheus", "address": format!("0.0.0.0:{}", p.prometheus)},
                {"name": "agent", "address": format!("0.0.0.0:{}", p.status)},
                {"name": "admin", "address": p.admin.to_string()},
            ],
            "clusters": services,
            "istio": snap.istio_resources(),
            "rejected": snap.rejected,
            "proxyConfig": self.cfg.proxy_config,
            "appProbers": self.cfg.app_probers,
        })
    }

    async fn app_probe(&self, path: &str) -> Response<Body> {
        let Some(prober) = self.cfg.app_probers.get(path) else {
            return text(StatusCode::NOT_FOUND, format!("no app prober for {path}\n"));
        };
        let timeout = Duration::from_secs(
            prober
                .get("timeoutSeconds")
                .and_then(Value::as_u64)
                .unwrap_or(1)
                .max(1),
        );
        let host_ip = self
            .cfg
            .instance_ips
            .first()
            .copied()
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        // Where a probe goes: its numeric `port` at its `host` (default: the pod IP).
        let target_of = |v: &Value| {
            let port = v
                .get("port")
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())?;
            let host = v
                .get("host")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok())
                .unwrap_or(host_ip);
            Some(SocketAddr::new(host, port))
        };
        let no_port = || {
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "prober has no numeric port
",
            )
        };
        if let Some(h) = prober.get("httpGet") {
            let Some(addr) = target_of(h) else {
                return no_port();
            };
            let p = h.get("path").and_then(Value::as_str).unwrap_or("/");
            return match probe_http(addr, p, h.get("httpHeaders"), timeout).await {
                Ok(code) if (200..400).contains(&code) => text(
                    StatusCode::from_u16(code).unwrap_or(StatusCode::OK),
                    format!("app answered {code}\n"),
                ),
                Ok(code) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("app answered {code}\n"),
                ),
                Err(e) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("app probe failed: {e}\n"),
                ),
            };
        }
        if let Some(g) = prober.get("grpc") {
            let Some(addr) = target_of(g) else {
                return no_port();
            };
            let service = g.get("service").and_then(Value::as_str).unwrap_or("");
            return match tokio::time::timeout(timeout, probe_grpc(addr, service)).await {
                Ok(Ok(1)) => text(StatusCode::OK, "SERVING\n"),
                Ok(Ok(s)) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("gRPC health status {s} (not SERVING)\n"),
                ),
                Ok(Err(e)) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("gRPC health check failed: {e}\n"),
                ),
                Err(_) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "gRPC health check timed out\n",
                ),
            };
        }
        if let Some(t) = prober.get("tcpSocket") {
            let Some(addr) = target_of(t) else {
                return no_port();
            };
            return match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_)) => text(StatusCode::OK, "app port accepts connections\n"),
                Ok(Err(e)) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("app probe failed: {e}\n"),
                ),
                Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "app probe timed out\n"),
            };
        }
        text(StatusCode::INTERNAL_SERVER_ERROR, "unsupported prober\n")
    }

    /// Proxy metrics plus the app's own (if the injector recorded where they are).
    async fn merged_metrics(&self) -> String {
        let mut out = self.metrics.encode();
        if let Ok(app) = std::env::var("ISTIO_PROMETHEUS_ANNOTATIONS")
            && let Ok(v) = serde_json::from_str::<Value>(&app)
            && v.get("scrape").and_then(Value::as_str) != Some("false")
            && let Some(port) = v
                .get("port")
                .and_then(Value::as_str)
                .and_then(|p| p.parse::<u16>().ok())
        {
            let path = v.get("path").and_then(Value::as_str).unwrap_or("/metrics");
            if let Ok(Ok(body)) = tokio::time::timeout(
                Duration::from_secs(2),
                fetch(SocketAddr::from(([127, 0, 0, 1], port)), path),
            )
            .await
            {
                // The proxy's text ends with `# EOF`; the app's series follow it in plain text format.
                out = out.trim_end().trim_end_matches("# EOF").to_owned();
                out.push_str(&body);
            }
        }
        out
    }

    pub async fn serve(self: Arc<Self>, port: Port, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        match (port, req.method(), path.as_str()) {
            (_, &Method::GET, "/healthz/ready") => self.ready(),
            (Port::Prometheus | Port::Admin, &Method::GET, "/stats/prometheus" | "/metrics") => {
                self.prometheus(self.metrics.encode())
            }
            (Port::Agent, &Method::GET, "/stats/prometheus" | "/metrics") => {
                self.prometheus(self.merged_metrics().await)
            }
            (Port::Agent, &Method::GET, p)
                if p.starts_with("/app-health/") || p.starts_with("/app-lifecycle/") =>
            {
                self.app_probe(p).await
            }
            (Port::Agent, &Method::POST, p) if p.starts_with("/app-lifecycle/") => {
                self.app_probe(p).await
            }
            (Port::Agent | Port::Admin, &Method::POST, "/quitquitquit") => {
                info!("/quitquitquit: exiting");
                let _ = self.quit.send(Some(Quit::Exit));
                text(StatusCode::OK, "OK\n")
            }
            (Port::Agent | Port::Admin, &Method::POST, "/drain" | "/drain_listeners") => {
                info!("drain requested");
                let _ = self.quit.send(Some(Quit::Drain));
                text(StatusCode::OK, "OK\n")
            }
            (Port::Admin, &Method::GET, "/config_dump") => json_resp(&self.config_dump()),
            (Port::Admin, &Method::GET, "/listeners") => {
                json_resp(&self.config_dump()["listeners"])
            }
            (Port::Admin, &Method::GET, "/clusters") => json_resp(&self.config_dump()["clusters"]),
            (Port::Admin, &Method::GET, "/routes") => json_resp(&self.config_dump()["istio"]),
            (Port::Admin, &Method::GET, "/explain") => {
                let q = crate::explain::Query::parse(
                    req.uri().query().unwrap_or(""),
                    &self.cfg.pod_namespace,
                );
                let snap = self.snapshot.borrow().clone();
                json_resp(&crate::explain::explain(&snap, &q))
            }
            (Port::Admin, &Method::GET, "/lookup") => {
                // /lookup?addr=IP:PORT: what the outbound listener would do with that destination.
                let q = req.uri().query().unwrap_or("");
                let addr = q
                    .strip_prefix("addr=")
                    .and_then(|a| a.parse::<SocketAddr>().ok());
                let snap = self.snapshot.borrow().clone();
                match addr.map(|a| snap.target(a)) {
                    Some(Target::Service { service, port }) => {
                        json_resp(&json!({"service": service.hostname, "port": port}))
                    }
                    Some(Target::Pod { addr, workload }) => json_resp(
                        &json!({"pod": workload.pod, "namespace": workload.namespace, "addr": addr.to_string()}),
                    ),
                    Some(Target::Unknown(a)) => json_resp(
                        &json!({"unknown": a.to_string(), "policy": format!("{:?}", self.cfg.outbound_policy)}),
                    ),
                    None => text(StatusCode::BAD_REQUEST, "usage: /lookup?addr=IP:PORT\n"),
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

async fn fetch(addr: SocketAddr, path: &str) -> Result<String, String> {
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// `grpc.health.v1.Health/Check` over HTTP/2: the status field of the answer (1 = SERVING).
async fn probe_grpc(addr: SocketAddr, service: &str) -> Result<u64, String> {
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    // HealthCheckRequest { string service = 1; } in a gRPC length-prefixed frame.
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a);
        let mut n = service.len();
        while n >= 0x80 {
            msg.push((n as u8) | 0x80);
            n >>= 7;
        }
        msg.push(n as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let req = Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(frame)))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let header_status = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let status = body
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(header_status);
    if status.as_deref() != Some("0") {
        return Err(format!(
            "grpc-status {}",
            status.unwrap_or_else(|| "missing".into())
        ));
    }
    let bytes = body.to_bytes();
    // HealthCheckResponse { ServingStatus status = 1; }: tag 0x08, varint.
    let msg = bytes.get(5..).ok_or("short gRPC frame")?;
    let mut i = 0;
    while i < msg.len() {
        let tag = msg[i];
        i += 1;
        let mut v: u64 = 0;
        let mut shift = 0;
        while let Some(b) = msg.get(i) {
            v |= u64::from(b & 0x7f) << shift;
            i += 1;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        if tag == 0x08 {
            return Ok(v);
        }
    }
    Ok(0)
}

async fn probe_http(
    addr: SocketAddr,
    path: &str,
    headers: Option<&Value>,
    timeout: Duration,
) -> Result<u16, String> {
    let fut = async {
        let s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut b = Request::get(path)
            .header("host", addr.to_string())
            .header("user-agent", "kube-probe/ferry");
        for h in headers.and_then(Value::as_array).into_iter().flatten() {
            if let (Some(n), Some(v)) = (
                h.get("name").and_then(Value::as_str),
                h.get("value").and_then(Value::as_str),
            ) {
                b = b.header(n, v);
            }
        }
        let req = b.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        Ok(resp.status().as_u16())
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| "timed out".to_owned())?
}

/// Serve one admin port until `stop` is dropped.
pub async fn serve_port(admin: Arc<Admin>, port: Port, listener: TcpListener) {
    loop {
        let Ok((s, peer)) = listener.accept().await else {
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.serve(port, req).await) }
            });
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await
            {
                debug!(%peer, error = %e, "admin connection error");
            }
        });
    }
}
