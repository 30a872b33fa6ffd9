//! The data path: a captured connection in, its original destination resolved through the current
//! [`Snapshot`], the protocol declared or detected, then opaque TCP relay (half-close aware) or
//! HTTP/1.1 and HTTP/2 forwarding per request over pooled upstream connections.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::coalesce::Coalesce;
use crate::config::{Config, OutboundPolicy};
use crate::detect::{self, Detected};
use crate::discovery::{Protocol, SERVER_FIRST_PORTS, Snapshot, Target};
use crate::h1pool::H1Pool;
use crate::h2pool::H2Pool;
use crate::metrics::{Labels, Metrics, RelayLabels};
use crate::relay;
use crate::resilience;
use crate::transport::{self, OrigDst};

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Which listener a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
    /// A gateway server's port: traffic from outside, routed by gateway-bound VirtualServices.
    Gateway,
}

impl Direction {
    fn reporter(self) -> &'static str {
        match self {
            Direction::Outbound | Direction::Gateway => "source",
            Direction::Inbound => "destination",
        }
    }
}

/// Tracks open connections so a drain can wait for them.
#[derive(Default)]
pub struct Active {
    count: AtomicUsize,
    changed: tokio::sync::Notify,
}

pub struct Guard(Arc<Active>);

impl Active {
    pub fn enter(self: &Arc<Self>) -> Guard {
        self.count.fetch_add(1, Ordering::SeqCst);
        Guard(self.clone())
    }
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
    /// Wait until no connection is open.
    pub async fn idle(&self) {
        loop {
            let notified = self.changed.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

/// Everything a connection needs; shared by all of them.
pub struct Proxy {
    pub cfg: Arc<Config>,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub metrics: Arc<Metrics>,
    pub orig_dst: OrigDst,
    pub active: Arc<Active>,
    /// Flips to true when draining: HTTP connections are then closed gracefully.
    pub draining: watch::Receiver<bool>,
    rr: AtomicUsize,
    inflight: std::sync::Mutex<crate::FastMap<SocketAddr, usize>>,
    /// What multiplexed requests taught about endpoints labelled as having a sidecar.
    peers: std::sync::Mutex<crate::FastMap<SocketAddr, Peer>>,
    h1_out: H1Pool<Incoming>,
    /// Outbound HTTP/2, streaming or buffered bodies alike.
    h2_out: H2Pool,
    h1_in: H1Pool<Incoming>,
    h2_in: H2Pool,
    /// Buffered-body clients, for requests that may be retried.
    h1_out_buf: H1Pool<Full<Bytes>>,
    breakers: crate::resilience::Breakers,
    pub outliers: crate::resilience::Outliers,
    custom: CustomClients,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Upstream connections unused for this long are closed (a DestinationRule's
/// `connectionPool.http.idleTimeout` replaces it).
const POOL_IDLE: Duration = Duration::from_secs(60);
/// Marks an HTTP/1.1 request that a sidecar sends to a peer sidecar over HTTP/2 (as
/// linkerd2-proxy's `l5d-orig-proto`): many client connections share one coalesced connection
/// between the sidecars, and the peer gives the app HTTP/1.1 again. Removed from anything else.
const ORIG_PROTO: hyper::header::HeaderName =
    hyper::header::HeaderName::from_static("x-ferry-orig-proto");
const GRPC_STATUS: hyper::header::HeaderName =
    hyper::header::HeaderName::from_static("grpc-status");
const IDEMPOTENCY_KEY: hyper::header::HeaderName =
    hyper::header::HeaderName::from_static("idempotency-key");
/// How long a connection to a declared-HTTP port may stay silent before it is served as HTTP
/// anyway (the HTTP server then applies its own limits). Long on purpose: see `handle`.
const DECLARED_HTTP_FIRST_BYTES: Duration = Duration::from_secs(3600);

/// A DestinationRule's connection settings: connect timeout, idle timeout, TCP keepalive.
type Settings = (Option<Duration>, Option<Duration>, Option<Duration>);

/// No DestinationRule settings: the defaults.
const DEFAULTS: Settings = (None, None, None);

/// How a pool with these settings connects, and its idle timeout (unset ones: the defaults).
fn dial(inbound: bool, (connect, idle, keepalive): Settings) -> (transport::Dial, Duration) {
    let dial = transport::Dial {
        inbound,
        timeout: connect.unwrap_or(CONNECT_TIMEOUT),
        keepalive,
    };
    (dial, idle.unwrap_or(POOL_IDLE))
}

fn h1_pool<B>(inbound: bool, settings: Settings) -> H1Pool<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (d, idle) = dial(inbound, settings);
    H1Pool::new(d, idle)
}

fn h2_pool(inbound: bool, settings: Settings) -> H2Pool {
    let (d, idle) = dial(inbound, settings);
    H2Pool::new(d, idle)
}

/// Client pools keyed by connection settings.
type Pools<B> = std::sync::Mutex<std::collections::HashMap<Settings, H1Pool<B>>>;
type H2Pools = std::sync::Mutex<std::collections::HashMap<Settings, Arc<H2Pool>>>;

/// Client pools for destinations whose DestinationRule sets connection settings.
#[derive(Default)]
struct CustomClients {
    streaming: Pools<Incoming>,
    buffered: Pools<Full<Bytes>>,
    h2: H2Pools,
}

/// The client of `pools` for these settings, made on first use.
fn pooled<V: Clone>(
    pools: &std::sync::Mutex<std::collections::HashMap<Settings, V>>,
    settings: Settings,
    make: impl FnOnce() -> V,
) -> V {
    pools
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(settings)
        .or_insert_with(make)
        .clone()
}

/// What a proxy learnt of an endpoint labelled as having a sidecar (see `ORIG_PROTO`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Unknown,
    /// Answered a multiplexed request.
    Proven,
    /// Failed its first one: HTTP/1.1 until then.
    NotHttp2(Instant),
}

/// An upstream response with its body boxed as the proxy's [`Body`].
fn boxed<B>(r: Response<B>) -> Response<Body>
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    r.map(|b| b.map_err(Into::into).boxed())
}

fn full(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{msg}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    r
}

/// Per-connection facts used for routing and metrics.
#[derive(Clone)]
struct Conn {
    dir: Direction,
    peer: SocketAddr,
    orig: SocketAddr,
    /// Shared by the connection's requests.
    last_labels: Arc<crate::metrics::LastLabels<LabelKey>>,
}

/// What a request's metric labels are made of, before they are built (`finish` builds the
/// eighteen strings only when they differ from the connection's previous request's).
struct Tags<'t> {
    snap: &'t Arc<Snapshot>,
    target: &'t Target,
    protocol: &'static str,
    /// The endpoint picked, which names the destination workload.
    endpoint: Option<SocketAddr>,
    /// Envoy's response flags ("UF", "DI,UH"); empty for none.
    flags: String,
}

impl<'t> Tags<'t> {
    fn new(snap: &'t Arc<Snapshot>, target: &'t Target, protocol: &'static str) -> Self {
        Tags {
            snap,
            target,
            protocol,
            endpoint: None,
            flags: String::new(),
        }
    }
}

/// A connection's last label set, by what it was built from: the snapshot (by identity; the
/// weak reference keeps its allocation, though not its contents, so no later snapshot can
/// take its address), the target within it, and the request's outcome.
struct LabelKey {
    snapshot: std::sync::Weak<Snapshot>,
    target: TargetKey,
    protocol: &'static str,
    endpoint: Option<SocketAddr>,
    code: u16,
    flags: String,
}

impl PartialEq for LabelKey {
    fn eq(&self, o: &Self) -> bool {
        std::sync::Weak::ptr_eq(&self.snapshot, &o.snapshot)
            && self.target == o.target
            && self.protocol == o.protocol
            && self.endpoint == o.endpoint
            && self.code == o.code
            && self.flags == o.flags
    }
}

/// A target by identity within one snapshot (its services and workloads are shared `Arc`s).
#[derive(Clone, Copy, PartialEq, Eq)]
enum TargetKey {
    Service(usize, u16),
    Pod(usize, SocketAddr),
    Unknown(SocketAddr),
}

impl TargetKey {
    fn of(t: &Target) -> Self {
        match t {
            Target::Service { service, port } => {
                TargetKey::Service(Arc::as_ptr(service) as usize, *port)
            }
            Target::Pod { addr, workload } => TargetKey::Pod(Arc::as_ptr(workload) as usize, *addr),
            Target::Unknown(a) => TargetKey::Unknown(*a),
        }
    }
}

impl Conn {
    fn new(dir: Direction, peer: SocketAddr, orig: SocketAddr) -> Conn {
        Conn {
            dir,
            peer,
            orig,
            last_labels: Arc::default(),
        }
    }
}

impl Proxy {
    pub fn new(
        cfg: Arc<Config>,
        snapshot: watch::Receiver<Arc<Snapshot>>,
        metrics: Arc<Metrics>,
        orig_dst: OrigDst,
        draining: watch::Receiver<bool>,
    ) -> Proxy {
        Proxy {
            cfg,
            snapshot,
            metrics,
            orig_dst,
            active: Arc::new(Active::default()),
            draining,
            rr: AtomicUsize::new(0),
            inflight: std::sync::Mutex::default(),
            peers: std::sync::Mutex::default(),
            h1_out: h1_pool(false, DEFAULTS),
            h2_out: h2_pool(false, DEFAULTS),
            h1_in: h1_pool(true, DEFAULTS),
            h2_in: h2_pool(true, DEFAULTS),
            h1_out_buf: h1_pool(false, DEFAULTS),
            breakers: crate::resilience::Breakers::default(),
            outliers: crate::resilience::Outliers::default(),
            custom: CustomClients::default(),
        }
    }

    fn snap(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// What is known of `endpoint` as an HTTP/2 peer.
    fn peer(&self, endpoint: SocketAddr) -> Peer {
        let m = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(&endpoint) {
            Some(Peer::NotHttp2(until)) if *until <= Instant::now() => Peer::Unknown,
            Some(p) => *p,
            None => Peer::Unknown,
        }
    }

    fn learn(&self, endpoint: SocketAddr, what: Peer) {
        let mut m = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        // Pod IPs come and go: forget everything now and then rather than grow without bound
        // (an endpoint forgotten is learnt again from its next request).
        if m.len() >= 16 * 1024 {
            m.clear();
        }
        m.insert(endpoint, what);
    }

    /// Whether `orig` is this proxy itself (a capture loop).
    fn is_loop(&self, orig: SocketAddr) -> bool {
        let local = orig.ip().is_loopback()
            || orig.ip().is_unspecified()
            || self.cfg.instance_ips.contains(&orig.ip());
        local && self.cfg.own_ports().contains(&orig.port())
    }

    fn labels(&self, c: &Conn, snap: &Snapshot, target: &Target, protocol: &str) -> Labels {
        let me = (
            if self.cfg.workload_name.is_empty() {
                self.cfg.pod_name.clone()
            } else {
                self.cfg.workload_name.clone()
            },
            self.cfg.pod_namespace.clone(),
        );
        let unknown = || ("unknown".to_owned(), "unknown".to_owned());
        let (src, dst) = match c.dir {
            // The destination workload of a service is known once an endpoint is picked.
            Direction::Outbound | Direction::Gateway => (
                me,
                match target {
                    Target::Pod { workload, .. } => {
                        (workload.name.clone(), workload.namespace.clone())
                    }
                    _ => unknown(),
                },
            ),
            Direction::Inbound => (
                snap.workload(c.peer.ip())
                    .map(|w| (w.name.clone(), w.namespace.clone()))
                    .unwrap_or_else(unknown),
                me,
            ),
        };
        // Inbound: the service whose endpoint this pod:port is. Never raw addresses: passthrough
        // destinations would make the label cardinality unbounded.
        let service = match (c.dir, target) {
            (_, Target::Service { service, .. }) => Some(service.clone()),
            (Direction::Inbound, _) => snap.service_for_endpoint(c.orig),
            _ => None,
        };
        let (svc, svc_name, svc_ns) = match &service {
            Some(s) => (s.hostname.clone(), s.name.clone(), s.namespace.clone()),
            None => ("unknown".into(), "unknown".into(), "unknown".into()),
        };
        let own_version = || {
            self.cfg
                .instance_ips
                .iter()
                .find_map(|ip| snap.workload(*ip))
                .map_or_else(|| "unknown".into(), |w| version_of(&w))
        };
        let (source_version, destination_version) = match (c.dir, target) {
            (Direction::Outbound | Direction::Gateway, Target::Pod { workload, .. }) => {
                (own_version(), version_of(workload))
            }
            (Direction::Outbound | Direction::Gateway, _) => (own_version(), "unknown".into()),
            (Direction::Inbound, _) => (
                snap.workload(c.peer.ip())
                    .map_or_else(|| "unknown".into(), |w| version_of(&w)),
                own_version(),
            ),
        };
        Labels {
            reporter: c.dir.reporter().into(),
            source_canonical_service: src.0.clone(),
            source_workload: src.0,
            source_workload_namespace: src.1,
            destination_canonical_service: dst.0.clone(),
            destination_workload: dst.0,
            destination_workload_namespace: dst.1,
            destination_service: svc,
            destination_service_name: svc_name,
            destination_service_namespace: svc_ns,
            request_protocol: protocol.into(),
            response_code: String::new(),
            response_flags: "-".into(),
            connection_security_policy: "none".into(),
            source_version,
            destination_version,
        }
    }

    /// A connection to a gateway server's port: its HTTP requests are routed by the
    /// VirtualServices bound to the Gateways on that port.
    async fn handle_gateway(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let Ok(local) = stream.local_addr() else {
            return;
        };
        let snap = self.snap();
        let port = local.port();
        let first = snap
            .gateway
            .as_ref()
            .and_then(|g| g.servers.get(&port))
            .and_then(|s| s.first())
            .map(|(_, s)| (s.protocol, s.tls_mode.clone()));
        let tls = snap
            .gateway
            .as_ref()
            .and_then(|g| g.tls.get(&port).cloned());
        let span = info_span!("gateway", client.addr = %peer, port);
        let c = Conn::new(Direction::Gateway, peer, local);
        let _ = stream.set_nodelay(true);
        async move {
            use crate::gateway::ServerProtocol as P;
            match first {
                Some((p, _)) if p.is_plain_http() => self.serve_http(c, stream).await,
                Some((P::Https | P::Tls, Some(mode))) if mode == "PASSTHROUGH" => {
                    match detect::peek_sni(&stream, Duration::from_secs(5)).await {
                        Some(sni) => self.gateway_l4(c, stream, snap, Some(sni)).await,
                        None => debug!("PASSTHROUGH: no SNI in the ClientHello; connection closed"),
                    }
                }
                Some((P::Tcp, _)) => self.gateway_l4(c, stream, snap, None).await,
                Some((P::Https, _)) => match tls {
                    // The ClientHello's SNI picks the server (its certificate, client
                    // verification and versions), then the handshake completes with it.
                    Some(configs) => {
                        let handshake = async {
                            let start = tokio_rustls::LazyConfigAcceptor::new(
                                rustls::server::Acceptor::default(),
                                stream,
                            )
                            .await
                            .map_err(|e| e.to_string())?;
                            let sni = start.client_hello().server_name().map(str::to_owned);
                            let cfg = crate::gateway_tls::pick(&configs, sni.as_deref())
                                .cloned()
                                .ok_or_else(|| format!("no server on this port for SNI {sni:?}"))?;
                            start.into_stream(cfg).await.map_err(|e| e.to_string())
                        };
                        match tokio::time::timeout(Duration::from_secs(10), handshake).await {
                            Ok(Ok(tls)) => self.serve_http(c, tls).await,
                            Ok(Err(e)) => debug!(error = %e, "TLS handshake failed"),
                            Err(_) => debug!("TLS handshake timed out"),
                        }
                    }
                    None => warn!("no usable certificate for this HTTPS server (see the configuration's rejected list); connection closed"),
                },
                Some((p, mode)) => warn!(
                    protocol = ?p,
                    ?mode,
                    "this gateway server's protocol/mode is not served (HTTP, HTTP2, GRPC, HTTPS SIMPLE/MUTUAL and TLS/HTTPS PASSTHROUGH are); connection closed"
                ),
                None => debug!("no Gateway server on this port any more; connection closed"),
            }
        }
        .instrument(span)
        .await
    }

    /// PASSTHROUGH (by SNI, not terminated) and TCP servers: the `tls[]` / `tcp[]` routes of
    /// the VirtualServices bound to this gateway, looked up by the SNI and by the server's hosts.
    async fn gateway_l4(
        &self,
        c: Conn,
        stream: TcpStream,
        snap: Arc<Snapshot>,
        sni: Option<String>,
    ) {
        let Some(view) = snap.gateway.as_ref() else {
            return;
        };
        let no_labels = std::collections::BTreeMap::new();
        let conn = crate::routing::ConnView {
            port: c.orig.port(),
            destination: c.orig.ip(),
            sni: sni.as_deref(),
            source_labels: &no_labels,
            source_namespace: &self.cfg.pod_namespace,
        };
        // Candidate hosts: the SNI (as given, and qualified the way VirtualService hosts are
        // stored), then the server's hosts.
        let mut hosts: Vec<String> = Vec::new();
        if let Some(s) = &sni {
            hosts.push(s.clone());
            hosts.push(crate::routing::fqdn(
                s,
                &self.cfg.pod_namespace,
                &self.cfg.cluster_domain,
            ));
        }
        for (_, server) in view.servers.get(&c.orig.port()).into_iter().flatten() {
            hosts.extend(server.hosts.iter().map(|(_, h)| h.clone()));
        }
        let Some(route) = hosts.iter().find_map(|h| view.routes.find_l4(h, &conn)) else {
            debug!(
                ?sni,
                "no tls/tcp route bound to this gateway matches; connection closed"
            );
            return;
        };
        let Some(d) = crate::routing::pick_weighted(&route.destinations, roll() % 100) else {
            return;
        };
        let Some((service, port)) = self.destination(&snap, d) else {
            warn!(host = %d.host, "tls/tcp route destination is not a known service");
            return;
        };
        let subset = d.subset.clone();
        let target = Target::Service { service, port };
        self.relay_tcp(c, stream, snap.clone(), target, subset.as_deref())
            .await;
    }

    /// The request line for the access log (nothing to build when it is off: this runs per
    /// request).
    fn line(&self, req: &Request<Incoming>) -> String {
        if self.cfg.access_log {
            req_line(req)
        } else {
            String::new()
        }
    }

    /// An answer the proxy makes itself (no upstream), with its response flag ("" for none: a
    /// redirect, a CORS preflight), counted and logged like any other. (The arguments are what
    /// a metric's labels and the access log need.)
    #[allow(clippy::too_many_arguments)]
    fn local_reply(
        &self,
        c: &Conn,
        snap: &Arc<Snapshot>,
        target: &Target,
        started: Instant,
        req: &Request<Incoming>,
        flag: &str,
        resp: Response<Body>,
    ) -> Response<Body> {
        let mut tags = Tags::new(snap, target, "http");
        tags.flags = flag.into();
        self.finish(tags, started, resp, c, &self.line(req), None)
    }

    /// Fill in the destination workload from the endpoint actually picked.
    fn set_endpoint(labels: &mut Labels, snap: &Snapshot, endpoint: SocketAddr) {
        if labels.reporter == "source"
            && let Some(w) = snap.workload(endpoint.ip())
        {
            labels.destination_workload = w.name.clone();
            labels.destination_canonical_service = w.name.clone();
            labels.destination_workload_namespace = w.namespace.clone();
            labels.destination_version = version_of(&w);
        }
    }

    /// Serve one accepted connection to completion.
    pub async fn handle(self: Arc<Self>, dir: Direction, stream: TcpStream, peer: SocketAddr) {
        let _guard = self.active.enter();
        if dir == Direction::Gateway {
            return self.handle_gateway(stream, peer).await;
        }
        let orig = match self.orig_dst.of(&stream) {
            Ok(o) => o,
            Err(e) => {
                warn!(%peer, error = %e, "no original destination: connection not captured by iptables? closing");
                return;
            }
        };
        let span = info_span!("conn", dir = ?dir, client.addr = %peer, orig_dst = %orig);
        async move {
            if self.is_loop(orig) {
                self.metrics.loops_refused.inc();
                warn!("original destination is the proxy's own listener: refusing to loop");
                return;
            }
            let _ = stream.set_nodelay(true);
            let snap = self.snap();
            let target = match dir {
                Direction::Outbound => snap.target(orig),
                Direction::Inbound | Direction::Gateway => crate::discovery::Target::Unknown(orig),
            };
            let declared = match &target {
                Target::Service { service, port } => service
                    .port(*port)
                    .map(|p| p.protocol)
                    .unwrap_or(Protocol::Unknown),
                // Inbound (the pod's own port) or a pod IP: its service port's declaration.
                _ => snap.endpoint_protocol(orig),
            };
            let detected = match declared {
                Protocol::Tcp | Protocol::Tls => Detected::Opaque,
                // Declared HTTP is not sniffed against a deadline (Istio does not sniff declared
                // ports): a client that connects and speaks later (a warmed keep-alive pool) must
                // still be routed per request, not pinned to one endpoint as opaque TCP. The peek
                // only lets non-HTTP bytes on a mis-declared port fall back to TCP.
                Protocol::Http | Protocol::Http2 | Protocol::Grpc => {
                    let mut draining = self.draining.clone();
                    tokio::select! {
                        d = detect::detect(&stream, DECLARED_HTTP_FIRST_BYTES) => match d {
                            Detected::Timeout => Detected::Http1,
                            d => d,
                        },
                        // Nothing in flight on a connection that never spoke: close it now
                        // rather than hold the drain open.
                        _ = draining.wait_for(|d| *d) => {
                            debug!("draining: closing a connection that never sent a byte");
                            return;
                        }
                    }
                }
                // Server-first protocols: the client may never speak first.
                Protocol::Unknown if SERVER_FIRST_PORTS.contains(&orig.port()) => Detected::Opaque,
                Protocol::Unknown => detect::detect(&stream, self.cfg.detection_timeout).await,
            };
            debug!(?declared, ?detected, "protocol");
            let c = Conn::new(dir, peer, orig);
            // TLS passthrough by SNI: a ClientHello naming a known service goes to that service,
            // whatever address the client dialled.
            let tls = dir == Direction::Outbound && (declared == Protocol::Tls || detected == Detected::Tls);
            let sni = if tls { detect::peek_sni(&stream, self.cfg.detection_timeout).await } else { None };
            let target = match sni.as_deref().and_then(|sni| snap.service_by_host(sni, &self.cfg.pod_namespace)) {
                Some(service) => {
                    let port = if service.port(orig.port()).is_some() { orig.port() } else { service.ports.first().map(|p| p.port).unwrap_or(orig.port()) };
                    debug!(service = %service.name, "routed by SNI");
                    Target::Service { service, port }
                }
                None => target,
            };
            // Istio tcp[] / tls[] routes of the destination host.
            let mut subset = None;
            let mut target = target;
            if !matches!(detected, Detected::Http1 | Detected::Http2)
                && let (Direction::Outbound, Target::Service { service, port }) = (dir, &target)
            {
                let host = service.hostname.as_str();
                let me = self.cfg.instance_ips.first().and_then(|ip| snap.workload(*ip));
                let no_labels = std::collections::BTreeMap::new();
                let view = crate::routing::ConnView {
                    port: *port,
                    destination: orig.ip(),
                    sni: sni.as_deref(),
                    source_labels: me.as_ref().map(|w| &w.labels).unwrap_or(&no_labels),
                    source_namespace: &self.cfg.pod_namespace,
                };
                if let Some(route) = snap.routes.find_l4(host, &view)
                    && let Some(d) = crate::routing::pick_weighted(&route.destinations, roll() % 100)
                {
                    match snap.service_by_host(&d.host, &self.cfg.pod_namespace) {
                        Some(svc) => {
                            let p = d.port.filter(|p| svc.port(*p).is_some()).or_else(|| svc.port(*port).map(|p| p.port)).or_else(|| svc.ports.first().map(|p| p.port)).unwrap_or(*port);
                            debug!(route = %route.origin, dest = %d.host, "tcp route");
                            subset = d.subset.clone();
                            target = Target::Service { service: svc, port: p };
                        }
                        None => {
                            info!(route = %route.origin, dest = %d.host, "tcp route points at an unknown service; closing");
                            return;
                        }
                    }
                }
            }
            match detected {
                Detected::Http1 | Detected::Http2 => {
                    let h2 = detected == Detected::Http2;
                    self.serve_http(c, Coalesce::new(stream, h2)).await
                }
                _ => self.relay_tcp(c, stream, snap, target, subset.as_deref()).await,
            }
        }
        .instrument(span)
        .await
    }

    /// Pick the upstream for a TCP connection.
    fn tcp_upstream(&self, c: &Conn, target: &Target) -> Result<SocketAddr, &'static str> {
        match (c.dir, target) {
            (Direction::Inbound, _) => Ok(c.orig),
            (_, Target::Service { service, port }) => service
                .pick(*port)
                .map(|e| e.addr)
                .ok_or("no healthy endpoint"),
            (_, Target::Pod { addr, .. }) => Ok(*addr),
            (_, Target::Unknown(addr)) => match self.cfg.outbound_policy {
                OutboundPolicy::AllowAny => Ok(*addr),
                OutboundPolicy::RegistryOnly => {
                    Err("destination not in the registry (REGISTRY_ONLY)")
                }
            },
        }
    }

    async fn relay_tcp(
        &self,
        c: Conn,
        down: TcpStream,
        snap: Arc<Snapshot>,
        target: Target,
        subset: Option<&str>,
    ) {
        let mut labels = self.labels(&c, &snap, &target, "tcp");
        let picked = match (&c.dir, &target) {
            (Direction::Outbound | Direction::Gateway, Target::Service { service, port }) => self
                .pick_endpoint(&c, &snap, service, (*port, subset, None), &|_: &str| None)
                .map(|(a, _)| a),
            _ => self.tcp_upstream(&c, &target),
        };
        let upstream = match picked {
            Ok(a) => a,
            Err(why) => {
                labels.response_flags = if why.starts_with("no healthy") {
                    "UH".into()
                } else {
                    "NR".into()
                };
                self.metrics.tcp_opened.get_or_create(&labels).inc();
                self.metrics.tcp_closed.get_or_create(&labels).inc();
                info!(reason = why, "closing TCP connection");
                return;
            }
        };
        Self::set_endpoint(&mut labels, &snap, upstream);
        self.metrics.tcp_opened.get_or_create(&labels).inc();
        let source = (c.dir == Direction::Inbound).then(|| transport::inbound_source(&upstream));
        let started = Instant::now();
        match transport::connect(upstream, source, CONNECT_TIMEOUT).await {
            Ok(up) => {
                let relay::Relayed {
                    to_upstream: sent_up,
                    to_downstream: sent_down,
                    error,
                    moved,
                } = relay::relay(&down, &up, relay::Mode::Splice).await;
                let moved = moved.map(relay::How::as_str);
                for mode in moved {
                    self.metrics
                        .tcp_relay_directions
                        .get_or_create(&RelayLabels { mode })
                        .inc();
                }
                match error {
                    Some(e) => debug!(error = %e, ?moved, "TCP relay ended with an error"),
                    None => debug!(?moved, "TCP relay ended"),
                }
                self.metrics
                    .tcp_received
                    .get_or_create(&labels)
                    .inc_by(sent_up);
                self.metrics
                    .tcp_sent
                    .get_or_create(&labels)
                    .inc_by(sent_down);
                if self.cfg.access_log {
                    println!(
                        "{}",
                        serde_json::json!({"kind": "tcp", "direction": format!("{:?}", c.dir), "client": c.peer.to_string(), "orig_dst": c.orig.to_string(), "upstream": upstream.to_string(), "received": sent_up, "sent": sent_down, "duration_ms": started.elapsed().as_millis() as u64})
                    );
                }
            }
            Err(e) => {
                labels.response_flags = "UF".into();
                info!(%upstream, error = %e, "upstream connect failed; closing");
            }
        }
        self.metrics.tcp_closed.get_or_create(&labels).inc();
    }

    async fn serve_http<S>(self: &Arc<Self>, c: Conn, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let this = self.clone();
        let conn = c.clone();
        let svc = hyper::service::service_fn(move |req| {
            let this = this.clone();
            let c = conn.clone();
            // Boxed: the routing future is a few KiB, and hyper moves the future it is given
            // (into its dispatcher, or into a task per HTTP/2 stream) with a copy each time.
            let routed = Box::pin(async move { this.route(c, req).await });
            async move { Ok::<_, Infallible>(routed.await) }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        if c.dir != Direction::Gateway {
            // No cap on concurrent HTTP/2 streams in a pod (as Envoy's sidecars): a peer
            // sidecar multiplexes all its clients' requests onto one connection, and hyper's
            // default of 200 would queue the 201st long poll behind the others.
            builder.http2().max_concurrent_streams(None);
        }
        let served = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
        tokio::pin!(served);
        let mut draining = self.draining.clone();
        tokio::select! {
            r = served.as_mut() => { if let Err(e) = r { debug!(error = %e, "HTTP connection ended with an error"); } return; }
            _ = draining.wait_for(|d| *d) => {}
        }
        // Draining: GOAWAY (HTTP/2) or Connection: close after the current request (HTTP/1.1).
        served.as_mut().graceful_shutdown();
        if let Err(e) = served.await {
            debug!(error = %e, "HTTP connection ended with an error while draining");
        }
    }

    async fn route(&self, c: Conn, mut req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let snap = self.snap();
        let authority = req
            .headers()
            .get(hyper::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        let target = match c.dir {
            Direction::Inbound | Direction::Gateway => Target::Unknown(c.orig),
            Direction::Outbound => match authority
                .as_deref()
                .and_then(|h| snap.service_by_host(h, &self.cfg.pod_namespace))
            {
                Some(service) => {
                    let host_port = authority
                        .as_deref()
                        .and_then(|h| h.rsplit_once(':'))
                        .and_then(|(_, p)| p.parse::<u16>().ok());
                    let port = [host_port, Some(c.orig.port())]
                        .into_iter()
                        .flatten()
                        .find(|p| service.port(*p).is_some())
                        .or_else(|| service.ports.first().map(|p| p.port))
                        .unwrap_or(c.orig.port());
                    Target::Service { service, port }
                }
                None => snap.target(c.orig),
            },
        };
        // Istio routing: a VirtualService for the destination host picks the rule and the
        // destination; a DestinationRule its subset and load balancing.
        let mut subset: Option<String> = None;
        let mut applied: Option<Arc<crate::routing::HttpRoute>> = None;
        let mut rerouted: Option<Target> = None;
        // Where the routes come from: the destination service's host (sidecar), or the request's
        // host among the routes bound to this gateway's Gateways.
        // (Only a gateway routes by it: not worth a lowercased copy per request elsewhere.)
        let gateway_host = authority
            .as_deref()
            .filter(|_| c.dir == Direction::Gateway)
            .map(|a| {
                a.rsplit_once(':')
                    .filter(|(_, p)| p.chars().all(|ch| ch.is_ascii_digit()))
                    .map_or(a, |(h, _)| h)
                    .to_ascii_lowercase()
            });
        let lookup: Option<(&crate::routing::RouteTable, &str, u16)> = match (c.dir, &target) {
            (Direction::Outbound, Target::Service { service, port }) => {
                Some((&snap.routes, service.hostname.as_str(), *port))
            }
            (Direction::Gateway, _) => snap.gateway.as_ref().map(|g| {
                (
                    &g.routes,
                    gateway_host.as_deref().unwrap_or(""),
                    c.orig.port(),
                )
            }),
            _ => None,
        };
        if c.dir == Direction::Gateway {
            // The server on this port whose hosts admit the request's host (several servers
            // may share a port, e.g. one per certificate on 443).
            let host = gateway_host.as_deref().unwrap_or("");
            let server = snap
                .gateway
                .as_ref()
                .and_then(|g| g.servers.get(&c.orig.port()))
                .and_then(|list| {
                    list.iter()
                        .map(|(_, s)| s)
                        .find(|s| {
                            s.hosts
                                .iter()
                                .any(|(_, pattern)| crate::gateway::host_matches(pattern, host))
                        })
                        .cloned()
                });
            let admitted = server.is_some();
            if server.as_ref().is_some_and(|s| s.https_redirect) {
                let mut r = full(StatusCode::MOVED_PERMANENTLY, "redirect");
                if let Ok(v) = hyper::header::HeaderValue::from_str(&format!(
                    "https://{}{}",
                    host,
                    req.uri()
                        .path_and_query()
                        .map(|p| p.as_str())
                        .unwrap_or("/")
                )) {
                    r.headers_mut().insert(hyper::header::LOCATION, v);
                }
                return self.local_reply(&c, &snap, &target, started, &req, "", r);
            }
            if !admitted {
                let why = format!("no route: host {host:?} is not served on this gateway port");
                let resp = full(StatusCode::NOT_FOUND, &why);
                return self.local_reply(&c, &snap, &target, started, &req, "NR", resp);
            }
        }
        if let Some((table, host, port)) = lookup {
            let port = &port;
            let me = self
                .cfg
                .instance_ips
                .first()
                .and_then(|ip| snap.workload(*ip));
            let no_labels = std::collections::BTreeMap::new();
            let found = {
                let hdrs = req.headers();
                let lookup = |k: &str| hdrs.get(k).and_then(|v| v.to_str().ok());
                let view = crate::routing::RequestView {
                    method: req.method().as_str(),
                    scheme: "http",
                    path: req.uri().path(),
                    query: req.uri().query(),
                    authority: authority.as_deref().unwrap_or(""),
                    port: *port,
                    headers: &lookup,
                    source_labels: me.as_ref().map(|w| &w.labels).unwrap_or(&no_labels),
                    source_namespace: &self.cfg.pod_namespace,
                };
                match table.find(host, &view) {
                    // At a gateway, `name.ns.svc` hosts are stored fully qualified (the same
                    // qualification the route table applied to the VirtualService's hosts).
                    None if c.dir == Direction::Gateway && host.ends_with(".svc") => {
                        let fq = crate::routing::fqdn(
                            host,
                            &self.cfg.pod_namespace,
                            &self.cfg.cluster_domain,
                        );
                        table.find(&fq, &view)
                    }
                    found => found,
                }
            };
            // A gateway has nothing but its VirtualServices: no match is 404 (NR), as for a
            // sidecar host that a VirtualService owns.
            if found.is_none() && (c.dir == Direction::Gateway || table.has_http_routes(host)) {
                // A VirtualService owns this host and no rule matched: Istio answers 404 (NR).
                let why = format!("no route: no rule of the VirtualService for {host} matched");
                let resp = full(StatusCode::NOT_FOUND, &why);
                return self.local_reply(&c, &snap, &target, started, &req, "NR", resp);
            }
            if let Some((route, _)) = found {
                match &route.action {
                    crate::routing::Action::Redirect {
                        uri,
                        authority: to_authority,
                        code,
                        scheme,
                    } => {
                        let location = format!(
                            "{}://{}{}",
                            scheme.as_deref().unwrap_or("http"),
                            to_authority
                                .clone()
                                .or_else(|| authority.clone())
                                .unwrap_or_default(),
                            uri.clone().unwrap_or_else(|| req.uri().path().to_owned())
                        );
                        let mut r = full(
                            StatusCode::from_u16(*code).unwrap_or(StatusCode::MOVED_PERMANENTLY),
                            "redirect",
                        );
                        if let Ok(v) = hyper::header::HeaderValue::from_str(&location) {
                            r.headers_mut().insert(hyper::header::LOCATION, v);
                        }
                        return self.local_reply(&c, &snap, &target, started, &req, "", r);
                    }
                    crate::routing::Action::Route(ds) => {
                        let d = crate::routing::pick_weighted(ds, roll() % 100).cloned();
                        match d.as_ref().and_then(|d| {
                            snap.service_by_host(&d.host, &self.cfg.pod_namespace)
                                .map(|s| (d, s))
                        }) {
                            Some((d, svc)) => {
                                let p = d
                                    .port
                                    .filter(|p| svc.port(*p).is_some())
                                    .or_else(|| svc.port(*port).map(|p| p.port))
                                    .or_else(|| svc.ports.first().map(|p| p.port))
                                    .unwrap_or(*port);
                                subset = d.subset.clone();
                                rerouted = Some(Target::Service {
                                    service: svc,
                                    port: p,
                                });
                            }
                            None => {
                                let why = format!(
                                    "no healthy upstream: route {} points at {}, which is not a known service",
                                    route.origin,
                                    d.map(|d| d.host).unwrap_or_default()
                                );
                                let resp = full(StatusCode::SERVICE_UNAVAILABLE, &why);
                                return self
                                    .local_reply(&c, &snap, &target, started, &req, "NR", resp);
                            }
                        }
                    }
                }
                applied = Some(route.clone());
            }
        }
        let target = rerouted.unwrap_or(target);
        let service_name: &str = match &target {
            Target::Service { service, .. } => &service.hostname,
            _ => "unknown",
        };
        // CORS: a preflight for an allowed origin is answered here; other requests get the
        // allow headers on their response.
        let origin = req
            .headers()
            .get(hyper::header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let cors = applied
            .as_ref()
            .and_then(|r| r.cors.clone())
            .filter(|c| origin.as_deref().is_some_and(|o| c.allows(o)));
        if let (Some(cors), Some(origin)) = (&cors, &origin)
            && req.method() == hyper::Method::OPTIONS
            && req
                .headers()
                .contains_key(hyper::header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            let mut r = full(StatusCode::OK, "");
            cors_headers(r.headers_mut(), cors, origin, true);
            return self.local_reply(&c, &snap, &target, started, &req, "", r);
        }
        // Fault injection applies on the route, before any upstream is chosen.
        let mut fault_flag: Option<&'static str> = None;
        if let Some(f) = applied.as_ref().and_then(|r| r.policy.fault.as_ref()) {
            if let Some((delay, pct)) = &f.delay
                && resilience::hits(*pct, roll())
            {
                tokio::time::sleep(*delay).await;
                fault_flag = Some("DI");
                self.metrics.event(service_name, "fault_delay");
            }
            if let Some((abort, pct)) = &f.abort
                && resilience::hits(*pct, roll())
            {
                self.metrics.event(service_name, "fault_abort");
                let resp = match abort {
                    resilience::Abort::Http(code) => full(
                        StatusCode::from_u16(*code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                        "fault filter abort",
                    ),
                    resilience::Abort::Grpc(name, code) => {
                        let mut r = full(StatusCode::OK, "");
                        let h = r.headers_mut();
                        h.insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static("application/grpc"),
                        );
                        if let Ok(v) = hyper::header::HeaderValue::from_str(&code.to_string()) {
                            h.insert("grpc-status", v);
                        }
                        if let Ok(v) = hyper::header::HeaderValue::from_str(name) {
                            h.insert("grpc-message", v);
                        }
                        r
                    }
                };
                return self.local_reply(&c, &snap, &target, started, &req, "FI", resp);
            }
        }
        let mut h2_down = req.version() == hyper::Version::HTTP_2;
        if req.headers_mut().remove(ORIG_PROTO).is_some() {
            // Only a peer sidecar's marker counts: inbound, on HTTP/2.
            if h2_down && c.dir == Direction::Inbound {
                *req.version_mut() = hyper::Version::HTTP_11;
                h2_down = false;
            }
        }
        let protocol = match (&target, h2_down) {
            (Target::Service { service, port }, _)
                if service.port(*port).map(|p| p.protocol) == Some(Protocol::Grpc) =>
            {
                "grpc"
            }
            (_, true)
                if req
                    .headers()
                    .get(hyper::header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc")) =>
            {
                "grpc"
            }
            (_, true) => "http2",
            _ => "http",
        };
        let mut tags = Tags::new(&snap, &target, protocol);
        let line = self.line(&req);
        let req_len = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let flagged = |tags: &mut Tags<'_>, flag: &str| {
            tags.flags = match fault_flag {
                Some(f) => format!("{f},{flag}"),
                None => flag.to_owned(),
            };
        };
        if let Some(f) = fault_flag {
            tags.flags = f.into();
        }
        // Path rewrite and request header edits of the matched route.
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        let pq = match applied
            .as_ref()
            .and_then(|r| r.rewrite_path(req.uri().path()))
        {
            Some(path) => match req.uri().query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            },
            None => pq,
        };
        if let Some(route) = &applied {
            if let Some(a) = &route.rewrite_authority
                && let Ok(v) = hyper::header::HeaderValue::from_str(a)
            {
                req.headers_mut().insert(hyper::header::HOST, v);
            }
            edit_headers(req.headers_mut(), &route.request_headers);
        }
        if let Some(a) = &authority
            && !req.headers().contains_key(hyper::header::HOST)
            && let Ok(v) = hyper::header::HeaderValue::from_str(a)
        {
            req.headers_mut().insert(hyper::header::HOST, v);
        }
        // The endpoint, and whether its sidecar captures the port (see `ORIG_PROTO`).
        let pick = |avoid: Option<SocketAddr>, headers: &hyper::HeaderMap| match (c.dir, &target) {
            (Direction::Inbound, _) => Ok((c.orig, false)),
            (Direction::Outbound | Direction::Gateway, Target::Service { service, port }) => self
                .pick_endpoint(
                    &c,
                    &snap,
                    service,
                    (*port, subset.as_deref(), avoid),
                    &|name: &str| {
                        let all: Vec<&str> = headers
                            .get_all(name)
                            .iter()
                            .filter_map(|v| v.to_str().ok())
                            .collect();
                        (!all.is_empty()).then(|| all.join("; "))
                    },
                ),
            (Direction::Outbound, _) => self.tcp_upstream(&c, &target).map(|a| (a, false)),
            (Direction::Gateway, _) => Err("no route"),
        };
        let no_endpoint = |tags: &mut Tags<'_>, why: &'static str| {
            let (status, flag) = if why.starts_with("no healthy") {
                (StatusCode::SERVICE_UNAVAILABLE, "UH")
            } else {
                (StatusCode::BAD_GATEWAY, "NR")
            };
            flagged(tags, flag);
            full(
                status,
                if flag == "UH" {
                    "no healthy upstream"
                } else {
                    why
                },
            )
        };
        let upgrade = !h2_down && req.headers().contains_key(hyper::header::UPGRADE);
        if upgrade {
            let endpoint = match pick(None, req.headers()) {
                Ok((e, _)) => e,
                Err(why) => {
                    let resp = no_endpoint(&mut tags, why);
                    return self.finish(tags, started, resp, &c, &line, req_len);
                }
            };
            tags.endpoint = Some(endpoint);
            match endpoint_uri(endpoint, &pq).parse::<Uri>() {
                Ok(uri) => *req.uri_mut() = uri,
                Err(_) => {
                    let resp = full(StatusCode::BAD_REQUEST, "bad request target");
                    return self.finish(tags, started, resp, &c, &line, req_len);
                }
            }
            let resp = self.upgrade(c.dir, endpoint, req).await;
            return self.finish(tags, started, resp, &c, &line, req_len);
        }
        let declared_h2 = matches!(&target, Target::Service { service, port } if service.port(*port).is_some_and(|p| matches!(p.protocol, Protocol::Http2 | Protocol::Grpc)));

        // Timeout and retries: the route's (Istio's default retries when it sets none), with the
        // client's x-envoy-* overrides; inbound, the caller's sidecar already applied them.
        let (timeout, mut retries) = if c.dir != Direction::Inbound {
            let (t, r) = applied.as_ref().map_or_else(
                || (None, resilience::Retries::istio_default()),
                |r| (r.policy.timeout, r.policy.retries.clone()),
            );
            let hdrs = req.headers();
            // Looking up each x-envoy-* name would hash it; one pass tells whether any is there.
            let envoy = hdrs.keys().any(|k| k.as_str().starts_with("x-envoy-"));
            resilience::with_overrides(t, r, &|k: &str| {
                envoy
                    .then(|| hdrs.get(k))
                    .flatten()
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
        } else {
            (
                None,
                resilience::Retries {
                    attempts: 0,
                    ..resilience::Retries::istio_default()
                },
            )
        };
        // Circuit breaking: the destination's connection pool admits the request or refuses it
        // at once (503, UO).
        let (pool, outlier) = match (&target, c.dir) {
            (Target::Service { service, port }, Direction::Outbound | Direction::Gateway) => snap
                .routes
                .rule(&service.hostname)
                .map(|r| r.resilience(subset.as_deref(), *port))
                .unwrap_or_default(),
            _ => (None, None),
        };
        // h2UpgradePolicy: UPGRADE sends HTTP/1.1 requests upstream over HTTP/2.
        let use_h2 = h2_down || declared_h2 || pool.as_ref().is_some_and(|p| p.h2_upgrade);
        let settings = pool.as_ref().and_then(|p| p.connection_settings());
        let (cluster, cluster_port) = match &target {
            Target::Service { service, port } => (
                resilience::cluster_key(&service.hostname, *port, subset.as_deref()),
                *port,
            ),
            _ => (0, 0),
        };
        let unlimited = resilience::PoolLimits::default();
        let admitted = match self
            .breakers
            .admit(cluster, pool.as_ref().unwrap_or(&unlimited))
            .await
        {
            Ok(a) => a,
            Err(resilience::Overflow(limit)) => {
                self.metrics.event(service_name, "overflow");
                flagged(&mut tags, "UO");
                debug!(service = %service_name, port = cluster_port, subset = ?subset, limit, "circuit breaker overflow");
                let resp = full(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                );
                return self.finish(tags, started, resp, &c, &line, req_len);
            }
        };
        let idempotent = resilience::idempotent(
            req.method().as_str(),
            req.headers().contains_key(&IDEMPOTENCY_KEY),
        );
        // A request is replayed only from a buffered copy: small bodies are buffered when a
        // retry is possible; a large or streaming body gets one attempt.
        const MAX_BUFFERED: u64 = 64 * 1024;
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let small = hyper::body::Body::is_end_stream(&body)
            || hyper::body::Body::size_hint(&body)
                .upper()
                .is_some_and(|u| u <= MAX_BUFFERED);
        let mut body = Some(body);
        let mirrors = applied
            .as_ref()
            .map(|r| r.mirrors.as_slice())
            .unwrap_or(&[]);
        let buffered: Option<Bytes> = if (retries.attempts > 0 || !mirrors.is_empty()) && small {
            match body.take() {
                // Nothing to read (a GET, most requests): no collect future.
                Some(b) if hyper::body::Body::is_end_stream(&b) => Some(Bytes::new()),
                Some(b) => match b.collect().await {
                    Ok(b) => Some(b.to_bytes()),
                    Err(_) => {
                        let resp = full(StatusCode::BAD_REQUEST, "request body aborted");
                        return self.finish(tags, started, resp, &c, &line, req_len);
                    }
                },
                None => None,
            }
        } else {
            retries.attempts = 0;
            None
        };
        // Mirrors get a copy of the (buffered) request; their answers are discarded.
        match &buffered {
            Some(bytes) => self.spawn_mirrors(&snap, mirrors, &parts, &pq, bytes),
            None if !mirrors.is_empty() => {
                debug!("request body too large or streaming: not mirrored");
                self.metrics.event(service_name, "mirror_skipped");
            }
            None => {}
        }
        let deadline = timeout.map(|t| started + t);
        let one_request_per_connection =
            pool.as_ref().and_then(|p| p.max_requests_per_connection) == Some(1);
        let rebuild = |uri: Uri, h2: bool, multiplexed: bool| {
            let mut b = Request::builder()
                .method(parts.method.clone())
                .uri(uri)
                .version(if h2 {
                    hyper::Version::HTTP_2
                } else {
                    hyper::Version::HTTP_11
                });
            if let Some(h) = b.headers_mut() {
                *h = parts.headers.clone();
                if h2 {
                    // The URI's authority is the request's (`:authority`).
                    h.remove(hyper::header::HOST);
                    if multiplexed {
                        // The peer sidecar restores HTTP/1.1, Host included.
                        h.insert(
                            ORIG_PROTO,
                            hyper::header::HeaderValue::from_static("HTTP/1.1"),
                        );
                    }
                } else if one_request_per_connection {
                    // maxRequestsPerConnection: 1 — the upstream connection is not reused.
                    h.insert(
                        hyper::header::CONNECTION,
                        hyper::header::HeaderValue::from_static("close"),
                    );
                }
            }
            b
        };
        let mut attempt = 0u32;
        let mut last: Option<SocketAddr> = None;
        let mut _slots = Vec::new();
        loop {
            let (endpoint, sidecar) = match pick(last, &parts.headers) {
                Ok(e) => e,
                Err(why) => {
                    let resp = no_endpoint(&mut tags, why);
                    return self.finish(tags, started, resp, &c, &line, req_len);
                }
            };
            tags.endpoint = Some(endpoint);
            // HTTP/1.1 to a port another sidecar captures travels over a shared HTTP/2
            // connection (unless the DestinationRule asks for a connection per request).
            let multiplexed = sidecar
                && !use_h2
                && self.cfg.multiplex_peers
                && !one_request_per_connection
                && parts.method != hyper::Method::CONNECT
                && c.dir != Direction::Inbound;
            let known = if multiplexed {
                self.peer(endpoint)
            } else {
                Peer::Unknown
            };
            let multiplexed = multiplexed && !matches!(known, Peer::NotHttp2(_));
            let h2 = use_h2 || multiplexed;
            // The pools are given the endpoint. Over HTTP/2 the URI keeps the request's
            // authority (`:authority`).
            let authority = parts
                .headers
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .filter(|_| h2);
            let uri = match authority {
                Some(a) => [HTTP, a, &pq].concat().parse::<Uri>().ok(),
                None => None,
            };
            // HTTP/1.1 requests go out in origin form.
            let uri = uri.map_or_else(
                || {
                    if h2 {
                        endpoint_uri(endpoint, &pq).parse()
                    } else {
                        pq.parse()
                    }
                },
                Ok,
            );
            let uri: Uri = match uri {
                Ok(u) => u,
                Err(_) => {
                    let resp = full(StatusCode::BAD_REQUEST, "bad request target");
                    return self.finish(tags, started, resp, &c, &line, req_len);
                }
            };
            // LEAST_REQUEST's counts; inbound has nothing to balance (the endpoint is this pod).
            let _inflight =
                (c.dir != Direction::Inbound).then(|| Inflight::enter(&self.inflight, endpoint));
            let sent = match (&buffered, body.take()) {
                (Some(bytes), _) => {
                    let Ok(r) = rebuild(uri, h2, multiplexed).body(Full::new(bytes.clone())) else {
                        let resp = full(StatusCode::BAD_REQUEST, "bad request");
                        return self.finish(tags, started, resp, &c, &line, req_len);
                    };
                    match (h2, settings) {
                        (true, s) => self.send_h2(true, s, endpoint, r),
                        (false, s) => {
                            let client = match s {
                                Some(s) => pooled(&self.custom.buffered, s, || h1_pool(false, s)),
                                None => self.h1_out_buf.clone(),
                            };
                            Box::pin(async move { client.request(endpoint, r).await.map(boxed) })
                        }
                    }
                }
                (None, Some(b)) => {
                    let Ok(r) = rebuild(uri, h2, multiplexed).body(b) else {
                        let resp = full(StatusCode::BAD_REQUEST, "bad request");
                        return self.finish(tags, started, resp, &c, &line, req_len);
                    };
                    let outbound = c.dir != Direction::Inbound;
                    match (h2, settings.filter(|_| outbound)) {
                        (true, s) => self.send_h2(outbound, s, endpoint, r),
                        (false, s) => {
                            let client = match (outbound, s) {
                                (_, Some(s)) => {
                                    pooled(&self.custom.streaming, s, || h1_pool(false, s))
                                }
                                (true, None) => self.h1_out.clone(),
                                (false, None) => self.h1_in.clone(),
                            };
                            Box::pin(async move { client.request(endpoint, r).await.map(boxed) })
                        }
                    }
                }
                (None, None) => {
                    let resp = full(StatusCode::BAD_GATEWAY, "request body already consumed");
                    return self.finish(tags, started, resp, &c, &line, req_len);
                }
            };
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let limit = match (retries.per_try_timeout, remaining) {
                (Some(p), Some(r)) => Some(p.min(r)),
                (p, r) => p.or(r),
            };
            let result = match limit {
                Some(l) => tokio::time::timeout(l, sent).await.ok(),
                None => Some(sent.await),
            };
            // An endpoint labelled as having a sidecar that has never answered a multiplexed
            // request and fails one (not by refusing the connection): taken as not speaking
            // HTTP/2 after all (the port is not captured, or an HTTP/1-only server answered the
            // preface). It gets HTTP/1.1 from now on, and an idempotent request whose body was
            // kept goes again at once.
            if multiplexed && known == Peer::Unknown {
                match &result {
                    Some(Ok(_)) => self.learn(endpoint, Peer::Proven),
                    Some(Err(e)) if !e.is_connect() => {
                        self.learn(
                            endpoint,
                            Peer::NotHttp2(Instant::now() + Duration::from_secs(600)),
                        );
                        self.metrics.event(service_name, "peer_not_http2");
                        warn!(%endpoint, service = %service_name, error = %e, "endpoint labelled as having a sidecar failed its first HTTP/2 request: sending it HTTP/1.1 from now on");
                        if idempotent && buffered.is_some() {
                            continue;
                        }
                    }
                    _ => {}
                }
            }
            let overall_expired = deadline.is_some_and(|d| Instant::now() >= d);
            let (outcome, resp) = match result {
                None if overall_expired => {
                    self.metrics.event(service_name, "timeout");
                    flagged(&mut tags, if attempt > 0 { "UT,URX" } else { "UT" });
                    let resp = full(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout");
                    return self.finish(tags, started, resp, &c, &line, req_len);
                }
                None => (
                    resilience::Outcome::PerTryTimeout,
                    Err((
                        StatusCode::GATEWAY_TIMEOUT,
                        "UT",
                        "upstream request timeout",
                    )),
                ),
                Some(Ok(r)) => {
                    let grpc = r
                        .headers()
                        .get(GRPC_STATUS)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok());
                    (
                        resilience::Outcome::Response(r.status().as_u16(), grpc),
                        Ok(r),
                    )
                }
                Some(Err(e)) => {
                    let timed_out = e.is_timeout();
                    debug!(error = ?e, %endpoint, "upstream request failed");
                    if timed_out {
                        (
                            resilience::Outcome::ConnectFailure,
                            Err((
                                StatusCode::GATEWAY_TIMEOUT,
                                "UT",
                                "upstream connect timeout",
                            )),
                        )
                    } else if e.is_connect() {
                        (
                            resilience::Outcome::ConnectFailure,
                            Err((
                                StatusCode::BAD_GATEWAY,
                                "UF",
                                "upstream connect error: connection refused",
                            )),
                        )
                    } else if e.is_refused_stream() {
                        (
                            resilience::Outcome::RefusedStream,
                            Err((StatusCode::BAD_GATEWAY, "UC", "upstream refused the stream")),
                        )
                    } else {
                        (
                            resilience::Outcome::Reset,
                            Err((
                                StatusCode::BAD_GATEWAY,
                                "UC",
                                "upstream reset before response",
                            )),
                        )
                    }
                }
            };
            // Outlier detection sees every attempt.
            if let (Some(p), Target::Service { service, port }) = (&outlier, &target) {
                let all: Vec<SocketAddr> = service
                    .endpoints
                    .get(port)
                    .into_iter()
                    .flatten()
                    .map(|e| e.addr)
                    .collect();
                if self
                    .outliers
                    .record(p, endpoint, outcome, &all, Instant::now())
                {
                    self.metrics.event(service_name, "ejection");
                    info!(%endpoint, service = %service_name, "outlier detection: endpoint ejected");
                }
            }
            let retry_reason = (attempt < retries.attempts)
                .then(|| resilience::should_retry(&retries, outcome, idempotent))
                .flatten();
            let slot = retry_reason.and_then(|_| {
                let s = admitted.retry_slot();
                if s.is_none() {
                    self.metrics.event(service_name, "retry_budget_exhausted");
                }
                s
            });
            if let (Some(reason), Some(slot)) = (retry_reason, slot) {
                _slots.push(slot);
                attempt += 1;
                last = Some(endpoint);
                self.metrics.event(service_name, "retry");
                debug!(%endpoint, reason, attempt, "retrying");
                let wait = resilience::backoff(attempt - 1, roll());
                let wait = match deadline {
                    Some(d) => wait.min(d.saturating_duration_since(Instant::now())),
                    None => wait,
                };
                tokio::time::sleep(wait).await;
                continue;
            }
            let exhausted = attempt > 0 && outcome.failed();
            let resp = match resp {
                Ok(mut r) => {
                    strip_hop_by_hop(r.headers_mut());
                    if !h2_down {
                        // Multiplexed or upgraded upstream: the client still speaks HTTP/1.
                        *r.version_mut() = hyper::Version::HTTP_11;
                    }
                    if exhausted {
                        flagged(&mut tags, "URX");
                    }
                    if let Some(route) = &applied {
                        edit_headers(r.headers_mut(), &route.response_headers);
                    }
                    if let (Some(cors), Some(origin)) = (&cors, &origin) {
                        cors_headers(r.headers_mut(), cors, origin, false);
                    }
                    r
                }
                Err((status, flag, msg)) => {
                    if outcome == resilience::Outcome::PerTryTimeout {
                        self.metrics.event(service_name, "timeout");
                    }
                    flagged(
                        &mut tags,
                        &if exhausted {
                            format!("{flag},URX")
                        } else {
                            flag.to_owned()
                        },
                    );
                    full(status, msg)
                }
            };
            return self.finish(tags, started, resp, &c, &line, req_len);
        }
    }

    /// A route destination's service, and its port (the destination's, else the service's first).
    fn destination(
        &self,
        snap: &Snapshot,
        d: &crate::routing::Destination,
    ) -> Option<(Arc<crate::discovery::Service>, u16)> {
        let svc = snap.service_by_host(&d.host, &self.cfg.pod_namespace)?;
        let port = d.port.or_else(|| svc.ports.first().map(|p| p.port))?;
        Some((svc, port))
    }

    /// Send a copy of the request to each mirror destination its percentage selects, with the
    /// authority suffixed `-shadow` (as Envoy does); fire-and-forget.
    fn spawn_mirrors(
        &self,
        snap: &Snapshot,
        mirrors: &[(crate::routing::Destination, f64)],
        parts: &hyper::http::request::Parts,
        pq: &str,
        body: &Bytes,
    ) {
        for (d, pct) in mirrors {
            if !resilience::hits(*pct, roll()) {
                continue;
            }
            let Some((svc, port)) = self.destination(snap, d) else {
                debug!(host = %d.host, "mirror destination is not a known service");
                continue;
            };
            let conn = Conn::new(
                Direction::Outbound,
                SocketAddr::from(([127, 0, 0, 1], 0)),
                SocketAddr::from(([0, 0, 0, 0], port)),
            );
            let Ok((endpoint, _)) = self.pick_endpoint(
                &conn,
                snap,
                &svc,
                (port, d.subset.as_deref(), None),
                &|_: &str| None,
            ) else {
                continue;
            };
            let host = parts
                .headers
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or(&d.host);
            let shadow = match host.rsplit_once(':') {
                Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => format!("{h}-shadow:{p}"),
                _ => format!("{host}-shadow"),
            };
            let mut b = Request::builder()
                .method(parts.method.clone())
                .uri(endpoint_uri(endpoint, pq));
            if let Some(h) = b.headers_mut() {
                *h = parts.headers.clone();
                if let Ok(v) = hyper::header::HeaderValue::from_str(&shadow) {
                    h.insert(hyper::header::HOST, v);
                }
            }
            let Ok(req) = b.body(Full::new(body.clone())) else {
                continue;
            };
            self.metrics.event(&svc.hostname, "mirror");
            let fut = self.h1_out_buf.request(endpoint, req);
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(30), fut).await;
            });
        }
    }

    /// The endpoint of a service port for one request: the subset's endpoints (by pod labels),
    /// then the DestinationRule's load balancer (the subset's own, if it sets one).
    fn pick_endpoint(
        &self,
        c: &Conn,
        snap: &Snapshot,
        service: &crate::discovery::Service,
        (port, subset, avoid): (u16, Option<&str>, Option<SocketAddr>),
        header: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(SocketAddr, bool), &'static str> {
        use crate::routing::LoadBalancer;
        let rule = snap.routes.rule(&service.hostname);
        let outlier = rule.as_ref().and_then(|r| r.resilience(subset, port).1);
        let Some((labels, lb)) = crate::routing::resolve_destination(rule.as_deref(), subset, port)
        else {
            return Err("no healthy upstream (subset not defined by a DestinationRule)");
        };
        let eps: Vec<&crate::discovery::Endpoint> = service
            .endpoints
            .get(&port)
            .into_iter()
            .flatten()
            .filter(|e| {
                labels
                    .as_ref()
                    .is_none_or(|l| l.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
            })
            .collect();
        // Outlier detection leaves ejected endpoints out (unless too few would remain); a
        // retry prefers another endpoint than the one that just failed.
        let mut eps = if outlier.is_some() {
            let addrs: Vec<SocketAddr> = eps.iter().map(|e| e.addr).collect();
            let ok = self
                .outliers
                .available(outlier.as_ref(), &addrs, Instant::now());
            eps.into_iter().filter(|e| ok.contains(&e.addr)).collect()
        } else {
            eps
        };
        if let Some(a) = avoid
            && eps.len() > 1
        {
            eps.retain(|e| e.addr != a);
        }
        if eps.is_empty() && lb != LoadBalancer::Passthrough {
            return Err("no healthy endpoint");
        }
        let hash = |key: Option<String>| -> usize {
            use std::hash::{Hash, Hasher};
            match key {
                Some(k) => {
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    k.hash(&mut h);
                    crate::routing::jump_hash(h.finish(), eps.len())
                }
                None => roll() as usize % eps.len(),
            }
        };
        let i = match &lb {
            LoadBalancer::Passthrough => return Ok((c.orig, false)),
            LoadBalancer::RoundRobin => self.rr.fetch_add(1, Ordering::Relaxed) % eps.len(),
            LoadBalancer::Random => roll() as usize % eps.len(),
            LoadBalancer::LeastRequest => {
                // Power of two choices over the requests in flight through this proxy.
                let (a, b) = (roll() as usize % eps.len(), roll() as usize % eps.len());
                let inflight = self
                    .inflight
                    .lock()
                    .map(|m| {
                        (
                            m.get(&eps[a].addr).copied().unwrap_or(0),
                            m.get(&eps[b].addr).copied().unwrap_or(0),
                        )
                    })
                    .unwrap_or((0, 0));
                if inflight.1 < inflight.0 { b } else { a }
            }
            LoadBalancer::HashHeader(name) => hash(header(name)),
            LoadBalancer::HashCookie(name) => hash(header("cookie").and_then(|all| {
                all.split(';').find_map(|kv| {
                    kv.trim()
                        .strip_prefix(&format!("{name}="))
                        .map(str::to_owned)
                })
            })),
            LoadBalancer::HashSourceIp => hash(Some(c.peer.ip().to_string())),
        };
        Ok((eps[i].addr, eps[i].sidecar))
    }

    /// An HTTP/2 request to `endpoint`: through the pool for a DestinationRule's connection
    /// `settings`, else the direction's shared pool. One boxed future, as the HTTP/1.1 arms.
    fn send_h2<B>(
        &self,
        outbound: bool,
        settings: Option<Settings>,
        endpoint: SocketAddr,
        r: Request<B>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Body>, crate::h2pool::Error>> + Send + '_>>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match settings {
            Some(s) => {
                let pool = pooled(&self.custom.h2, s, || Arc::new(h2_pool(false, s)));
                Box::pin(async move { pool.send(endpoint, r).await.map(boxed) })
            }
            None => {
                let pool = if outbound { &self.h2_out } else { &self.h2_in };
                Box::pin(async move { pool.send(endpoint, r).await.map(boxed) })
            }
        }
    }

    /// HTTP/1.1 Upgrade (websocket): forward the handshake on a fresh connection, then relay bytes.
    async fn upgrade(
        &self,
        dir: Direction,
        endpoint: SocketAddr,
        mut req: Request<Incoming>,
    ) -> Response<Body> {
        let source = (dir == Direction::Inbound).then(|| transport::inbound_source(&endpoint));
        let up = match transport::connect(endpoint, source, CONNECT_TIMEOUT).await {
            Ok(s) => s,
            Err(_) => {
                return full(
                    StatusCode::BAD_GATEWAY,
                    "upstream connect error: connection refused",
                );
            }
        };
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(up)).await
        {
            Ok(x) => x,
            Err(_) => return full(StatusCode::BAD_GATEWAY, "upstream handshake failed"),
        };
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let down_upgrade = hyper::upgrade::on(&mut req);
        let mut resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(_) => return full(StatusCode::BAD_GATEWAY, "upstream reset before response"),
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let up_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(d), Ok(u)) = (down_upgrade.await, up_upgrade.await) {
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(d), &mut TokioIo::new(u))
                            .await;
                }
            });
        }
        boxed(resp)
    }

    fn finish(
        &self,
        tags: Tags<'_>,
        started: Instant,
        resp: Response<Body>,
        c: &Conn,
        line: &str,
        req_len: Option<u64>,
    ) -> Response<Body> {
        let code = resp.status().as_u16();
        let labels = || {
            let mut l = self.labels(c, tags.snap, tags.target, tags.protocol);
            if let Some(e) = tags.endpoint {
                Self::set_endpoint(&mut l, tags.snap, e);
            }
            if !tags.flags.is_empty() {
                l.response_flags = tags.flags.clone();
            }
            l.response_code = code.to_string();
            l
        };
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let resp_len = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if self.cfg.access_log {
            let labels = labels();
            println!(
                "{}",
                serde_json::json!({"kind": "http", "direction": format!("{:?}", c.dir), "client": c.peer.to_string(), "orig_dst": c.orig.to_string(), "request": line, "code": resp.status().as_u16(), "flags": labels.response_flags, "service": labels.destination_service, "duration_ms": ms})
            );
        }
        let key = LabelKey {
            snapshot: Arc::downgrade(tags.snap),
            target: TargetKey::of(tags.target),
            protocol: tags.protocol,
            endpoint: tags.endpoint,
            code,
            flags: tags.flags.clone(),
        };
        c.last_labels.with(&self.metrics, key, labels, |m| {
            m.requests.inc();
            m.duration_ms.observe(ms);
            m.request_bytes.observe(req_len.unwrap_or(0) as f64);
            m.response_bytes.observe(resp_len as f64);
        });
        resp
    }
}

/// Counts a request in flight to an endpoint (LEAST_REQUEST) until dropped.
struct Inflight<'a> {
    map: &'a std::sync::Mutex<crate::FastMap<SocketAddr, usize>>,
    addr: SocketAddr,
}

impl<'a> Inflight<'a> {
    fn enter(
        map: &'a std::sync::Mutex<crate::FastMap<SocketAddr, usize>>,
        addr: SocketAddr,
    ) -> Self {
        if let Ok(mut m) = map.lock() {
            *m.entry(addr).or_default() += 1;
        }
        Inflight { map, addr }
    }
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.map.lock()
            && let Some(n) = m.get_mut(&self.addr)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.addr);
            }
        }
    }
}

/// A fast per-thread random number (weights, RANDOM load balancing).
fn roll() -> u32 {
    use std::cell::Cell;
    thread_local!(static STATE: Cell<u64> = Cell::new({
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
        t ^ (&t as *const u64 as u64) | 1
    }));
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 32) as u32
    })
}

/// Hop-by-hop headers (RFC 9110 7.6.1) describe one connection and are not forwarded: the
/// fixed set and whatever the Connection header names (never Host or Content-Length). A
/// client's `Connection: close` must not close the pooled upstream connection, nor an
/// upstream's the client's. `te: trailers` stays: gRPC requires it.
fn strip_hop_by_hop(h: &mut hyper::HeaderMap) {
    use hyper::header::{
        CONNECTION, CONTENT_LENGTH, HOST, HeaderName, TE, TRANSFER_ENCODING, UPGRADE,
    };
    // Which of the fixed set are there, in one pass over the (few) names: removing a name
    // that is absent still hashes it, and this runs twice per proxied request.
    const FIXED: [&str; 6] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
    ];
    let mut present = [false; FIXED.len()];
    for k in h.keys() {
        if let Some(i) = FIXED.iter().position(|f| k.as_str() == *f) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    if present[0] {
        // The names the Connection header lists (`close` and `keep-alive`, the usual ones,
        // are no header to look for).
        let mut named: Vec<HeaderName> = Vec::new();
        for v in h.get_all(CONNECTION).iter().filter_map(|v| v.to_str().ok()) {
            for t in v.split(',').map(str::trim) {
                if t.is_empty() || t.eq_ignore_ascii_case("close") {
                    continue;
                }
                if let Ok(n) = HeaderName::from_bytes(t.as_bytes())
                    && n != HOST
                    && n != CONTENT_LENGTH
                    && !FIXED.contains(&n.as_str())
                {
                    named.push(n);
                }
            }
        }
        for n in named {
            h.remove(n);
        }
        h.remove(CONNECTION);
    }
    if present[1] {
        h.remove("keep-alive");
    }
    if present[2] {
        h.remove("proxy-connection");
    }
    if present[3]
        && h.get(TE)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        h.remove(TE);
    }
    if present[4] {
        h.remove(TRANSFER_ENCODING);
    }
    if present[5] {
        h.remove(UPGRADE);
    }
}

const HTTP: &str = "http://";

/// `http://<endpoint><path and query>`, the URI of a request to one endpoint. (`SocketAddr`'s
/// `Display` goes through the formatting machinery: over a thousand instructions, per request.)
fn endpoint_uri(endpoint: SocketAddr, pq: &str) -> String {
    fn decimal(s: &mut String, mut n: u16) {
        let mut digits = [0u8; 5];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        s.extend(digits[i..].iter().map(|&d| char::from(d)));
    }
    let mut s = String::with_capacity(HTTP.len() + 21 + pq.len());
    s.push_str(HTTP);
    match endpoint {
        SocketAddr::V4(a) => {
            for (i, o) in a.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                decimal(&mut s, o.into());
            }
            s.push(':');
            decimal(&mut s, a.port());
        }
        SocketAddr::V6(a) => {
            use std::fmt::Write;
            let _ = write!(s, "{a}");
        }
    }
    s.push_str(pq);
    s
}

/// `headers.request|response`: remove, then set, then add.
fn edit_headers(h: &mut hyper::HeaderMap, ops: &crate::routing::HeaderOps) {
    for k in &ops.remove {
        h.remove(k);
    }
    for (k, v) in &ops.set {
        h.insert(k.clone(), v.clone());
    }
    for (k, v) in &ops.add {
        h.append(k.clone(), v.clone());
    }
}

fn req_line(req: &Request<Incoming>) -> String {
    format!("{} {} {:?}", req.method(), req.uri().path(), req.version())
}

/// Istio's `*_version` metric label: the workload's `version` label, else
/// `app.kubernetes.io/version`, else "unknown".
fn version_of(w: &crate::discovery::Workload) -> String {
    w.labels
        .get("version")
        .or_else(|| w.labels.get("app.kubernetes.io/version"))
        .cloned()
        .unwrap_or_else(|| "unknown".into())
}

/// The CORS response headers for an allowed origin (`preflight`: also methods, headers, max age).
fn cors_headers(
    h: &mut hyper::HeaderMap,
    cors: &crate::routing::Cors,
    origin: &str,
    preflight: bool,
) {
    use hyper::header::{self, HeaderValue};
    let mut set = |name: header::HeaderName, value: &str| {
        if !value.is_empty()
            && let Ok(v) = HeaderValue::from_str(value)
        {
            h.insert(name, v);
        }
    };
    set(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    if cors.allow_credentials {
        set(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true");
    }
    if preflight {
        set(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            &cors.allow_methods.join(","),
        );
        set(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            &cors.allow_headers.join(","),
        );
        if let Some(age) = cors.max_age {
            set(header::ACCESS_CONTROL_MAX_AGE, &age.as_secs().to_string());
        }
    } else {
        set(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            &cors.expose_headers.join(","),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_uris_match_the_formatted_address() {
        for a in [
            "10.0.0.1:80",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "192.168.10.9:8080",
            "[::1]:443",
            "[fe80::1%2]:9",
        ] {
            let a: SocketAddr = a.parse().expect("address");
            assert_eq!(endpoint_uri(a, "/p?q=1"), format!("http://{a}/p?q=1"));
        }
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut h = hyper::HeaderMap::new();
        for (k, v) in [
            ("connection", "close, x-hop"),
            ("connection", "host, content-length"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("te", "gzip"),
            ("host", "reviews"),
            ("content-length", "3"),
            ("x-end-to-end", "kept"),
        ] {
            h.append(k, v.parse().unwrap());
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["content-length", "host", "x-end-to-end"]);
        let mut grpc = hyper::HeaderMap::new();
        grpc.insert("te", "trailers".parse().unwrap());
        strip_hop_by_hop(&mut grpc);
        assert_eq!(grpc.get("te").unwrap(), "trailers");
        // What most HTTP/1.1 servers send on every response.
        let mut usual = hyper::HeaderMap::new();
        usual.insert("connection", "keep-alive".parse().unwrap());
        usual.insert("content-type", "text/html".parse().unwrap());
        strip_hop_by_hop(&mut usual);
        let left: Vec<&str> = usual.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["content-type"]);
    }
}
