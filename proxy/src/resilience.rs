//! Istio's resilience policies: route `timeout`, `retries` and `fault` (VirtualService), and the
//! DestinationRule's `connectionPool` (circuit breaking) and `outlierDetection`. Parsing and the
//! decisions are pure (tested with data); the small runtime state (breakers, endpoint health)
//! lives in [`Breakers`] and [`Outliers`].
//!
//! Safe by default: a request is replayed only when it is idempotent (GET, HEAD, OPTIONS, PUT,
//! DELETE, TRACE, or it carries an `Idempotency-Key`), or when the upstream provably never got it
//! (connection refused, stream refused), or when the VirtualService opts in with the annotation
//! `ferry.dev/retry-non-idempotent: "true"`. Retries are bounded by a budget (20% of the
//! requests in flight to the service, at least 3) so they cannot multiply load in an outage.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A protobuf Duration string: `1s`, `0.5s`, `250ms`, `1m`, `1h`, `100us`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((s, ""), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (like 1s, 250ms)"))?;
    let secs = match unit {
        "h" => n * 3600.0,
        "m" => n * 60.0,
        "s" => n,
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "ns" => n / 1e9,
        _ => return Err(format!("{s:?}: unknown duration unit {unit:?}")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn duration_field(v: &Value, field: &str) -> Result<Option<Duration>, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_duration(s)
            .map(Some)
            .map_err(|e| format!("{field}: {e}")),
        Some(other) => Err(format!("{field}: expected a duration string, got {other}")),
    }
}

fn u32_field(v: &Value, field: &str) -> Result<Option<u32>, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| format!("{field}: expected a non-negative integer, got {n}")),
    }
}

/// gRPC status names Envoy retries on, with their codes.
const GRPC_CODES: &[(&str, u32)] = &[
    ("cancelled", 1),
    ("deadline-exceeded", 4),
    ("resource-exhausted", 8),
    ("internal", 13),
    ("unavailable", 14),
];

/// `retryOn` conditions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub five_xx: bool,
    pub gateway_error: bool,
    pub connect_failure: bool,
    pub refused_stream: bool,
    pub reset: bool,
    pub retriable_4xx: bool,
    pub status_codes: Vec<u16>,
    pub grpc: Vec<u32>,
}

impl RetryOn {
    /// Envoy/Istio's comma-separated list; plain status codes are retriable status codes.
    pub fn parse(s: &str) -> Result<RetryOn, String> {
        let mut r = RetryOn::default();
        for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            match t {
                "5xx" => r.five_xx = true,
                "gateway-error" => r.gateway_error = true,
                "connect-failure" => r.connect_failure = true,
                "refused-stream" => r.refused_stream = true,
                "reset" => r.reset = true,
                "retriable-4xx" => r.retriable_4xx = true,
                // The codes come from the policy's own list (or are added as numbers here).
                "retriable-status-codes" | "retriable-headers" | "envoy-ratelimited" => {}
                t => {
                    if let Some((_, code)) = GRPC_CODES.iter().find(|(n, _)| *n == t) {
                        r.grpc.push(*code);
                    } else if let Ok(code) = t.parse::<u16>()
                        && (100..600).contains(&code)
                    {
                        r.status_codes.push(code);
                    } else {
                        return Err(format!("retryOn: unknown condition {t:?}"));
                    }
                }
            }
        }
        Ok(r)
    }
}

/// A route's retry policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retries {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    /// The VirtualService allows replaying non-idempotent requests.
    pub non_idempotent: bool,
}

impl Retries {
    /// Istio's policy for routes that set none: 2 attempts on connect-failure, refused-stream,
    /// gRPC unavailable/cancelled and 503.
    pub fn istio_default() -> Retries {
        Retries {
            attempts: 2,
            per_try_timeout: None,
            on: RetryOn {
                connect_failure: true,
                refused_stream: true,
                status_codes: vec![503],
                grpc: vec![1, 14],
                ..RetryOn::default()
            },
            non_idempotent: false,
        }
    }

    /// `retries` of an http route (absent: Istio's default).
    pub fn parse(v: Option<&Value>, non_idempotent: bool) -> Result<Retries, String> {
        let Some(v) = v.filter(|v| !v.is_null()) else {
            return Ok(Retries {
                non_idempotent,
                ..Retries::istio_default()
            });
        };
        let attempts = u32_field(v, "attempts")
            .map_err(|e| format!("retries.{e}"))?
            .unwrap_or(0);
        let on = match v.get("retryOn").and_then(Value::as_str) {
            Some(s) => RetryOn::parse(s).map_err(|e| format!("retries.{e}"))?,
            // Istio's default conditions when only attempts are given.
            None => Retries::istio_default().on,
        };
        Ok(Retries {
            attempts,
            per_try_timeout: duration_field(v, "perTryTimeout")
                .map_err(|e| format!("retries.{e}"))?,
            on,
            non_idempotent,
        })
    }
}

/// How one attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The connection was refused or could not be made: the upstream never saw the request.
    ConnectFailure,
    /// HTTP/2 REFUSED_STREAM: never processed.
    RefusedStream,
    /// Reset or disconnected after the request was (maybe) sent.
    Reset,
    /// The per-try timeout fired.
    PerTryTimeout,
    /// A response: HTTP status and gRPC status if any.
    Response(u16, Option<u32>),
}

impl Outcome {
    pub fn failed(&self) -> bool {
        !matches!(self, Outcome::Response(s, g) if *s < 500 && g.is_none_or(|g| g == 0))
    }
}

/// Whether a method may be replayed safely (RFC 9110 §9.2.2), or the request says it may.
pub fn idempotent(method: &str, has_idempotency_key: bool) -> bool {
    has_idempotency_key
        || matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
        )
}

/// Pure: whether to retry after `outcome`; `Some(reason)` names the condition that matched.
pub fn should_retry(r: &Retries, outcome: Outcome, idempotent: bool) -> Option<&'static str> {
    let never_sent = matches!(outcome, Outcome::ConnectFailure | Outcome::RefusedStream);
    if !(never_sent || idempotent || r.non_idempotent) {
        return None;
    }
    match outcome {
        Outcome::ConnectFailure if r.on.connect_failure || r.on.five_xx || r.on.gateway_error => {
            Some("connect-failure")
        }
        Outcome::RefusedStream if r.on.refused_stream || r.on.five_xx => Some("refused-stream"),
        Outcome::Reset if r.on.reset || r.on.five_xx => Some("reset"),
        Outcome::PerTryTimeout if r.on.five_xx || r.on.gateway_error || r.on.reset => {
            Some("per-try-timeout")
        }
        Outcome::Response(s, grpc) => {
            if let Some(g) = grpc.filter(|g| *g != 0)
                && r.on.grpc.contains(&g)
            {
                return Some("grpc-status");
            }
            if r.on.status_codes.contains(&s) {
                Some("retriable-status-codes")
            } else if r.on.five_xx && (500..600).contains(&s) {
                Some("5xx")
            } else if r.on.gateway_error && matches!(s, 502..=504) {
                Some("gateway-error")
            } else if r.on.retriable_4xx && s == 409 {
                Some("retriable-4xx")
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Envoy's default jittered back-off: uniformly random in [0, min(25 ms × 2^n, 250 ms)].
pub fn backoff(retry: u32, random: u32) -> Duration {
    let cap = (25u64 << retry.min(4)).min(250);
    Duration::from_millis(u64::from(random) % (cap + 1))
}

/// The client overrides Istio documents (honoured from mesh-internal callers): they replace the
/// route's timeout, attempts and conditions.
pub fn with_overrides(
    timeout: Option<Duration>,
    mut r: Retries,
    header: &dyn Fn(&str) -> Option<String>,
) -> (Option<Duration>, Retries) {
    let ms = |h: &str| header(h).and_then(|v| v.trim().parse::<u64>().ok());
    let timeout = match ms("x-envoy-upstream-rq-timeout-ms") {
        Some(0) => None,
        Some(t) => Some(Duration::from_millis(t)),
        None => timeout,
    };
    if let Some(n) = header("x-envoy-max-retries").and_then(|v| v.trim().parse().ok()) {
        r.attempts = n;
    }
    if let Some(on) = header("x-envoy-retry-on").and_then(|v| RetryOn::parse(&v).ok()) {
        r.on = on;
    }
    if let Some(t) = ms("x-envoy-upstream-rq-per-try-timeout-ms") {
        r.per_try_timeout = Some(Duration::from_millis(t));
    }
    (timeout, r)
}

/// An injected fault's abort.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Abort {
    Http(u16),
    /// A gRPC status name (e.g. UNAVAILABLE) and its code.
    Grpc(String, u32),
}

/// `fault`.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(Abort, f64)>,
}

fn percentage(v: &Value) -> Result<f64, String> {
    let p = match (v.get("percentage"), v.get("percent")) {
        (Some(p), _) => p
            .get("value")
            .and_then(Value::as_f64)
            .ok_or("percentage.value must be a number")?,
        (None, Some(p)) => p.as_f64().ok_or("percent must be a number")?,
        // Unset: every request (as Istio's samples rely on).
        (None, None) => 100.0,
    };
    if !(0.0..=100.0).contains(&p) {
        return Err(format!("percentage {p} is not within 0..100"));
    }
    Ok(p)
}

const GRPC_STATUS: &[(&str, u32)] = &[
    ("OK", 0),
    ("CANCELLED", 1),
    ("UNKNOWN", 2),
    ("INVALID_ARGUMENT", 3),
    ("DEADLINE_EXCEEDED", 4),
    ("NOT_FOUND", 5),
    ("ALREADY_EXISTS", 6),
    ("PERMISSION_DENIED", 7),
    ("RESOURCE_EXHAUSTED", 8),
    ("FAILED_PRECONDITION", 9),
    ("ABORTED", 10),
    ("OUT_OF_RANGE", 11),
    ("UNIMPLEMENTED", 12),
    ("INTERNAL", 13),
    ("UNAVAILABLE", 14),
    ("DATA_LOSS", 15),
    ("UNAUTHENTICATED", 16),
];

impl Fault {
    pub fn parse(v: &Value) -> Result<Fault, String> {
        let delay = match v.get("delay") {
            None | Some(Value::Null) => None,
            Some(d) => {
                let t = duration_field(d, "fixedDelay")
                    .map_err(|e| format!("fault.delay.{e}"))?
                    .ok_or("fault.delay.fixedDelay is required")?;
                Some((t, percentage(d).map_err(|e| format!("fault.delay.{e}"))?))
            }
        };
        let abort = match v.get("abort") {
            None | Some(Value::Null) => None,
            Some(a) => {
                let kind = if let Some(s) = a.get("httpStatus") {
                    let code = s
                        .as_u64()
                        .and_then(|c| u16::try_from(c).ok())
                        .filter(|c| (200..600).contains(c))
                        .ok_or_else(|| {
                            format!("fault.abort.httpStatus {s} is not an HTTP status")
                        })?;
                    Abort::Http(code)
                } else if let Some(g) = a.get("grpcStatus").and_then(Value::as_str) {
                    let code = GRPC_STATUS
                        .iter()
                        .find(|(n, _)| *n == g)
                        .map(|(_, c)| *c)
                        .ok_or_else(|| {
                            format!("fault.abort.grpcStatus {g:?} is not a gRPC status name")
                        })?;
                    Abort::Grpc(g.to_owned(), code)
                } else {
                    return Err("fault.abort needs httpStatus or grpcStatus".into());
                };
                Some((kind, percentage(a).map_err(|e| format!("fault.abort.{e}"))?))
            }
        };
        Ok(Fault { delay, abort })
    }
}

/// Whether a fault with `percent` applies, given a uniform roll in [0, 1_000_000).
pub fn hits(percent: f64, roll: u32) -> bool {
    f64::from(roll % 1_000_000) < percent * 10_000.0
}

/// A route's resilience settings.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutePolicy {
    pub timeout: Option<Duration>,
    pub retries: Retries,
    pub fault: Option<Fault>,
}

impl Default for RoutePolicy {
    fn default() -> Self {
        RoutePolicy {
            timeout: None,
            retries: Retries::istio_default(),
            fault: None,
        }
    }
}

impl RoutePolicy {
    /// From an `http[]` route; `non_idempotent` from the VirtualService's annotation.
    pub fn parse(route: &Value, non_idempotent: bool) -> Result<RoutePolicy, String> {
        Ok(RoutePolicy {
            timeout: duration_field(route, "timeout")?.filter(|t| !t.is_zero()),
            retries: Retries::parse(route.get("retries"), non_idempotent)?,
            fault: route
                .get("fault")
                .filter(|f| !f.is_null())
                .map(Fault::parse)
                .transpose()?,
        })
    }
}

/// `connectionPool` limits (unset: unlimited, as Istio's defaults effectively are).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PoolLimits {
    pub max_connections: Option<u32>,
    pub connect_timeout: Option<Duration>,
    pub max_pending: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
    pub idle_timeout: Option<Duration>,
    /// `tcp.tcpKeepalive.time`: keepalive probes on upstream connections after this idle time.
    pub tcp_keepalive: Option<Duration>,
    /// `http.h2UpgradePolicy: UPGRADE`: HTTP/1.1 requests go upstream over HTTP/2.
    pub h2_upgrade: bool,
}

impl PoolLimits {
    /// The connection settings that need their own client pool (connect timeout, idle
    /// timeout, keepalive), if any differ from the defaults.
    pub fn connection_settings(
        &self,
    ) -> Option<(Option<Duration>, Option<Duration>, Option<Duration>)> {
        let s = (self.connect_timeout, self.idle_timeout, self.tcp_keepalive);
        (s != (None, None, None)).then_some(s)
    }
}

impl PoolLimits {
    pub fn parse(v: &Value) -> Result<PoolLimits, String> {
        let tcp = v.get("tcp").cloned().unwrap_or(Value::Null);
        let http = v.get("http").cloned().unwrap_or(Value::Null);
        let e = |p: &'static str| move |m: String| format!("connectionPool.{p}.{m}");
        Ok(PoolLimits {
            max_connections: u32_field(&tcp, "maxConnections").map_err(e("tcp"))?,
            connect_timeout: duration_field(&tcp, "connectTimeout").map_err(e("tcp"))?,
            max_pending: u32_field(&http, "http1MaxPendingRequests").map_err(e("http"))?,
            max_requests: u32_field(&http, "http2MaxRequests").map_err(e("http"))?,
            max_requests_per_connection: u32_field(&http, "maxRequestsPerConnection")
                .map_err(e("http"))?,
            max_retries: u32_field(&http, "maxRetries").map_err(e("http"))?,
            idle_timeout: duration_field(&http, "idleTimeout").map_err(e("http"))?,
            tcp_keepalive: match tcp.get("tcpKeepalive") {
                None | Some(Value::Null) => None,
                Some(k) => Some(
                    duration_field(k, "time")
                        .map_err(|m| format!("connectionPool.tcp.tcpKeepalive.{m}"))?
                        .unwrap_or(Duration::from_secs(7200)),
                ),
            },
            h2_upgrade: match http.get("h2UpgradePolicy").and_then(Value::as_str) {
                None | Some("DEFAULT") | Some("DO_NOT_UPGRADE") => false,
                Some("UPGRADE") => true,
                Some(other) => {
                    return Err(format!(
                        "connectionPool.http.h2UpgradePolicy {other:?} is not DEFAULT, DO_NOT_UPGRADE or UPGRADE"
                    ));
                }
            },
        })
    }
}

/// `outlierDetection`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierPolicy {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub interval: Duration,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

impl OutlierPolicy {
    /// Istio's defaults: 5 consecutive 5xx, gateway errors off, 10s interval, 30s base ejection,
    /// at most 10% ejected, no minimum health.
    pub fn parse(v: &Value) -> Result<OutlierPolicy, String> {
        let e = |m: String| format!("outlierDetection.{m}");
        let consecutive_5xx = match u32_field(v, "consecutive5xxErrors").map_err(e)? {
            Some(n) => n,
            None => u32_field(v, "consecutiveErrors").map_err(e)?.unwrap_or(5),
        };
        let pct = |f: &str, d: u32| -> Result<u32, String> {
            let n = u32_field(v, f).map_err(e)?.unwrap_or(d);
            if n > 100 {
                return Err(format!("outlierDetection.{f}: {n} is over 100"));
            }
            Ok(n)
        };
        Ok(OutlierPolicy {
            consecutive_5xx,
            consecutive_gateway: u32_field(v, "consecutiveGatewayErrors")
                .map_err(e)?
                .unwrap_or(0),
            interval: duration_field(v, "interval")
                .map_err(e)?
                .unwrap_or(Duration::from_secs(10)),
            base_ejection: duration_field(v, "baseEjectionTime")
                .map_err(e)?
                .unwrap_or(Duration::from_secs(30)),
            max_ejection_percent: pct("maxEjectionPercent", 10)?,
            min_health_percent: pct("minHealthPercent", 0)?,
        })
    }
}

/// Why a request was not admitted by a circuit breaker.
#[derive(Debug, PartialEq, Eq)]
pub struct Overflow(pub &'static str);

/// Per-cluster counters and the connection semaphore (circuit breaking).
#[derive(Default)]
pub struct Breakers {
    clusters: Mutex<HashMap<u64, Arc<Cluster>>>,
}

struct Cluster {
    limits: PoolLimits,
    active: AtomicU32,
    pending: AtomicU32,
    retries: AtomicU32,
    /// One permit per connection (HTTP/1.1 carries one request per connection at a time).
    connections: Option<Arc<tokio::sync::Semaphore>>,
}

/// Holds a request's place in its cluster until dropped.
pub struct Admitted {
    cluster: Arc<Cluster>,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.cluster.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admitted {
    /// Take a retry slot: within `maxRetries` and the retry budget (20% of the requests in
    /// flight, at least 3). `None` when the budget is spent.
    pub fn retry_slot(&self) -> Option<RetrySlot> {
        let c = &self.cluster;
        let active = c.active.load(Ordering::Acquire);
        let budget = (active / 5).max(3);
        let cap = c.limits.max_retries.map_or(budget, |m| m.min(budget));
        let now = c.retries.fetch_add(1, Ordering::AcqRel);
        if now >= cap {
            c.retries.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(RetrySlot(c.clone()))
    }
}

/// A retry in flight (counts against the budget until dropped).
pub struct RetrySlot(Arc<Cluster>);

impl Drop for RetrySlot {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Breakers {
    /// Admit a request to `cluster` under `limits`: over `http2MaxRequests` in flight, or with
    /// every connection busy and `http1MaxPendingRequests` already waiting, it is rejected at
    /// once (never queued without bound).
    pub async fn admit(&self, cluster: u64, limits: &PoolLimits) -> Result<Admitted, Overflow> {
        let c = {
            let mut map = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
            let entry = map.entry(cluster).or_insert_with(|| new_cluster(limits));
            if entry.limits != *limits {
                *entry = new_cluster(limits);
            }
            entry.clone()
        };
        if let Some(max) = limits.max_requests
            && c.active.load(Ordering::Acquire) >= max
        {
            return Err(Overflow("http2MaxRequests"));
        }
        c.active.fetch_add(1, Ordering::AcqRel);
        let admitted = |permit| Admitted {
            cluster: c.clone(),
            _permit: permit,
        };
        let Some(sem) = c.connections.clone() else {
            return Ok(admitted(None));
        };
        if let Ok(p) = sem.clone().try_acquire_owned() {
            return Ok(admitted(Some(p)));
        }
        let max_pending = limits.max_pending.unwrap_or(u32::MAX);
        if c.pending.fetch_add(1, Ordering::AcqRel) >= max_pending {
            c.pending.fetch_sub(1, Ordering::AcqRel);
            c.active.fetch_sub(1, Ordering::AcqRel);
            return Err(Overflow("http1MaxPendingRequests"));
        }
        let permit = sem.acquire_owned().await.ok();
        c.pending.fetch_sub(1, Ordering::AcqRel);
        Ok(admitted(permit))
    }
}

/// A destination cluster's key (service host, port, subset), hashed so that admitting a request
/// allocates nothing.
pub fn cluster_key(host: &str, port: u16, subset: Option<&str>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (host, port, subset).hash(&mut h);
    h.finish()
}

fn new_cluster(limits: &PoolLimits) -> Arc<Cluster> {
    Arc::new(Cluster {
        limits: limits.clone(),
        active: AtomicU32::new(0),
        pending: AtomicU32::new(0),
        retries: AtomicU32::new(0),
        connections: limits
            .max_connections
            .map(|n| Arc::new(tokio::sync::Semaphore::new(n.max(1) as usize))),
    })
}

/// One endpoint's health for outlier detection.
#[derive(Clone, Debug, Default)]
struct Health {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

/// Endpoint health across requests (and config changes).
#[derive(Default)]
pub struct Outliers {
    hosts: Mutex<HashMap<SocketAddr, Health>>,
}

impl Outliers {
    /// Record an attempt's outcome; returns true when this ejected the endpoint. `cluster` is
    /// every endpoint the request could have used (for the ejection cap).
    pub fn record(
        &self,
        p: &OutlierPolicy,
        addr: SocketAddr,
        outcome: Outcome,
        cluster: &[SocketAddr],
        now: Instant,
    ) -> bool {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let gateway = matches!(
            outcome,
            Outcome::ConnectFailure
                | Outcome::Reset
                | Outcome::PerTryTimeout
                | Outcome::Response(502..=504, _)
        );
        let five_xx = gateway || matches!(outcome, Outcome::Response(500..=599, _));
        let ejected_now = cluster
            .iter()
            .filter(|a| {
                hosts
                    .get(a)
                    .and_then(|h| h.ejected_until)
                    .is_some_and(|t| t > now)
            })
            .count();
        let h = hosts.entry(addr).or_default();
        if !five_xx {
            h.consecutive_5xx = 0;
            h.consecutive_gateway = 0;
            return false;
        }
        h.consecutive_5xx += 1;
        if gateway {
            h.consecutive_gateway += 1;
        }
        let tripped = (p.consecutive_5xx > 0 && h.consecutive_5xx >= p.consecutive_5xx)
            || (p.consecutive_gateway > 0 && h.consecutive_gateway >= p.consecutive_gateway);
        let already = h.ejected_until.is_some_and(|t| t > now);
        // Envoy's cap: eject only while the ejected share is below maxEjectionPercent.
        let share = ejected_now * 100 / cluster.len().max(1);
        if !tripped || already || share >= p.max_ejection_percent as usize {
            return false;
        }
        h.ejections += 1;
        h.ejected_until = Some(now + p.base_ejection * h.ejections);
        h.consecutive_5xx = 0;
        h.consecutive_gateway = 0;
        true
    }

    /// The endpoints to choose from: ejected ones left out, unless the healthy share falls
    /// below `minHealthPercent` (panic: use them all rather than fail).
    pub fn available(
        &self,
        p: Option<&OutlierPolicy>,
        endpoints: &[SocketAddr],
        now: Instant,
    ) -> Vec<SocketAddr> {
        let Some(p) = p else {
            return endpoints.to_vec();
        };
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let healthy: Vec<SocketAddr> = endpoints
            .iter()
            .copied()
            .filter(|a| {
                hosts
                    .get(a)
                    .and_then(|h| h.ejected_until)
                    .is_none_or(|t| t <= now)
            })
            .collect();
        if healthy.is_empty()
            || (healthy.len() * 100) < (p.min_health_percent as usize * endpoints.len())
        {
            return endpoints.to_vec();
        }
        healthy
    }

    /// Endpoints currently ejected, with the time left (for `/explain` and the admin).
    pub fn ejected(&self, now: Instant) -> Vec<(SocketAddr, Duration)> {
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        hosts
            .iter()
            .filter_map(|(a, h)| Some((*a, h.ejected_until?.checked_duration_since(now)?)))
            .collect()
    }
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// For `/explain`: what a route's timeout, retries and fault do.
pub fn describe_route(p: &RoutePolicy) -> Value {
    let r = &p.retries;
    let mut on: Vec<String> = [
        (r.on.five_xx, "5xx"),
        (r.on.gateway_error, "gateway-error"),
        (r.on.connect_failure, "connect-failure"),
        (r.on.refused_stream, "refused-stream"),
        (r.on.reset, "reset"),
        (r.on.retriable_4xx, "retriable-4xx"),
    ]
    .iter()
    .filter(|(b, _)| *b)
    .map(|(_, n)| (*n).to_owned())
    .collect();
    on.extend(r.on.status_codes.iter().map(u16::to_string));
    on.extend(r.on.grpc.iter().filter_map(|c| {
        GRPC_CODES
            .iter()
            .find(|(_, g)| g == c)
            .map(|(n, _)| (*n).to_owned())
    }));
    let mut v = serde_json::json!({
        "timeout": p.timeout.map_or("none (no route timeout)".to_owned(), ms),
        "retries": {
            "attempts": r.attempts,
            "perTryTimeout": r.per_try_timeout.map(ms),
            "retryOn": on.join(","),
            "replays": if r.non_idempotent {
                "any method (ferry.dev/retry-non-idempotent)"
            } else {
                "idempotent requests, or any request the upstream never received"
            },
        },
    });
    if let Some(f) = &p.fault {
        v["fault"] = serde_json::json!({
            "delay": f.delay.as_ref().map(|(d, pct)| format!("{} for {pct}% of requests", ms(*d))),
            "abort": f.abort.as_ref().map(|(a, pct)| match a {
                Abort::Http(c) => format!("HTTP {c} for {pct}% of requests"),
                Abort::Grpc(n, _) => format!("gRPC {n} for {pct}% of requests"),
            }),
        });
    }
    v
}

/// For `/explain`: a destination's connection pool and outlier detection.
pub fn describe_destination(pool: Option<&PoolLimits>, outlier: Option<&OutlierPolicy>) -> Value {
    serde_json::json!({
        "connectionPool": pool.map(|p| serde_json::json!({
            "maxConnections": p.max_connections,
            "http1MaxPendingRequests": p.max_pending,
            "http2MaxRequests": p.max_requests,
            "maxRetries": p.max_retries,
            "overflow": "rejected at once with 503 (UO)",
        })),
        "outlierDetection": outlier.map(|o| serde_json::json!({
            "consecutive5xxErrors": o.consecutive_5xx,
            "consecutiveGatewayErrors": o.consecutive_gateway,
            "baseEjectionTime": ms(o.base_ejection),
            "maxEjectionPercent": o.max_ejection_percent,
            "minHealthPercent": o.min_health_percent,
        })),
    })
}

#[cfg(test)]
mod tests;
