//! The HTTPS server: `POST /inject[/<k>/<v>...]`, `GET /healthz/ready`, `GET /metrics`. Serving
//! certificate and configuration are polled for changes and swapped in place; a change that does
//! not load is refused and the last good one keeps serving. SIGTERM stops accepting, lets
//! in-flight reviews finish, then exits.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::cert::{self, Reload};
use crate::config::Config;
use crate::metrics::{Metrics, OutcomeLabels};
use crate::webhook;

/// Largest review accepted (the API server's own request limit is 3 MiB).
const MAX_BODY: usize = 4 << 20;

/// Where everything comes from.
#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub config_path: Option<PathBuf>,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub reload_interval: Duration,
    /// How long in-flight reviews get after SIGTERM.
    pub drain: Duration,
}

/// State shared by all connections.
pub struct Shared {
    pub config: RwLock<Arc<Config>>,
    pub metrics: Metrics,
    pub certs: Arc<cert::Store>,
    pub draining: AtomicBool,
}

impl Shared {
    fn config(&self) -> Arc<Config> {
        self.config.read().map(|c| c.clone()).unwrap_or_default()
    }
}

/// Startup failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error("serving certificate: {0}")]
    Cert(#[from] cert::Error),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

fn respond(status: u16, content_type: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_REQUEST);
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn route(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz/ready") => {
            if shared.draining.load(Ordering::Relaxed) {
                return Ok(respond(503, "text/plain", b"draining\n".to_vec()));
            }
            Ok(respond(200, "text/plain", b"ok\n".to_vec()))
        }
        (&Method::GET, "/metrics") => Ok(respond(
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.encode().into_bytes(),
        )),
        (&Method::POST, p) if p == "/inject" || p.starts_with("/inject/") => {
            let started = Instant::now();
            let content_type = req
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return Ok(respond(
                        400,
                        "text/plain",
                        format!("reading body: {e}\n").into_bytes(),
                    ));
                }
            };
            let cfg = shared.config();
            // CPU-bound and small: run it inline; it never blocks on I/O.
            let answer = webhook::handle_guarded(&cfg, &path, content_type.as_deref(), &body);
            shared
                .metrics
                .requests
                .get_or_create(&OutcomeLabels {
                    outcome: answer.verdict.as_str().into(),
                })
                .inc();
            shared
                .metrics
                .latency
                .observe(started.elapsed().as_secs_f64());
            match answer.verdict {
                webhook::Verdict::Injected => info!(review = %answer.summary, "injected"),
                webhook::Verdict::Skipped => info!(review = %answer.summary, "not injected"),
                webhook::Verdict::Denied => warn!(review = %answer.summary, "injection refused"),
                webhook::Verdict::BadRequest => {
                    warn!(reason = %answer.summary, "bad admission request")
                }
            }
            let ct = if answer.status == 200 {
                "application/json"
            } else {
                "text/plain"
            };
            Ok(respond(answer.status, ct, answer.body))
        }
        _ => Ok(respond(404, "text/plain", b"not found\n".to_vec())),
    }
}

/// Load everything, then serve until `shutdown` flips to true.
pub async fn run(settings: Settings, mut shutdown: watch::Receiver<bool>) -> Result<(), Error> {
    let config = match &settings.config_path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let certs = Arc::new(cert::Store::open(&settings.cert_path, &settings.key_path)?);
    let shared = Arc::new(Shared {
        config: RwLock::new(Arc::new(config)),
        metrics: Metrics::new(),
        certs: certs.clone(),
        draining: AtomicBool::new(false),
    });
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: settings.listen,
            source,
        })?;
    serve(listener, settings, shared, &mut shutdown).await;
    Ok(())
}

/// Serve on an already bound listener (tests bind port 0).
pub async fn serve(
    listener: TcpListener,
    settings: Settings,
    shared: Arc<Shared>,
    shutdown: &mut watch::Receiver<bool>,
) {
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default TLS versions")
    .with_no_client_auth()
    .with_cert_resolver(shared.certs.clone());
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    shared.metrics.cert_expiry.set(shared.certs.not_after());
    info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "injector serving");

    // Reload loop: certificate and configuration.
    let reloader = {
        let shared = shared.clone();
        let settings = settings.clone();
        tokio::spawn(async move {
            // Compared by content, not modification time: two writes within the filesystem's
            // timestamp granularity (or a read between a truncate and its write) would leave an
            // mtime-based check holding a stale configuration for good.
            let mut config_text = settings
                .config_path
                .as_ref()
                .and_then(|p| std::fs::read_to_string(p).ok());
            loop {
                tokio::time::sleep(settings.reload_interval).await;
                match shared.certs.reload_if_changed() {
                    Reload::Unchanged => {}
                    Reload::Swapped { not_after } => {
                        shared.metrics.cert_expiry.set(not_after);
                        shared.metrics.reload("certificate", true);
                        info!(not_after, "serving certificate reloaded");
                    }
                    Reload::Refused(e) => {
                        shared.metrics.reload("certificate", false);
                        error!(error = %e, "new serving certificate refused; still serving the previous one");
                    }
                }
                if let Some(p) = &settings.config_path {
                    // A missing file (a ConfigMap's symlink swap in progress) keeps the current one.
                    let text = std::fs::read_to_string(p).ok();
                    if text.is_some() && text != config_text {
                        config_text = text;
                        let text = config_text.as_deref().unwrap_or_default();
                        match Config::parse(text, &p.display().to_string()) {
                            Ok(c) => {
                                if let Ok(mut cur) = shared.config.write() {
                                    *cur = Arc::new(c);
                                }
                                shared.metrics.reload("config", true);
                                info!(path = %p.display(), "configuration reloaded");
                            }
                            Err(e) => {
                                shared.metrics.reload("config", false);
                                error!(error = %e, "configuration update refused; still serving the previous configuration");
                            }
                        }
                    }
                }
            }
        })
    };

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let shared = shared.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let svc = hyper::service::service_fn(move |req| route(shared.clone(), req));
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(tls), svc).into_owned();
                    if let Err(e) = watcher.watch(conn).await {
                        debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }
    shared.draining.store(true, Ordering::Relaxed);
    reloader.abort();
    info!("draining in-flight reviews");
    if tokio::time::timeout(settings.drain, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("drain deadline passed with connections still open");
    }
}
