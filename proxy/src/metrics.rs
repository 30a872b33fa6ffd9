//! Istio's standard metrics, names and labels as Istio's telemetry produces them, so existing
//! dashboards work. Label values come from the registry (workload and service names) or small
//! fixed sets, so cardinality stays bounded.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Istio's labels for request and TCP metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Default)]
pub struct Labels {
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_canonical_service: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_canonical_service: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub request_protocol: String,
    pub response_code: String,
    pub response_flags: String,
    pub connection_security_policy: String,
    /// The workloads' `version` (or `app.kubernetes.io/version`) label: what a canary split
    /// is read by.
    pub source_version: String,
    pub destination_version: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<Labels, Counter>,
    pub duration_ms: Family<Labels, Histogram>,
    pub request_bytes: Family<Labels, Histogram>,
    pub response_bytes: Family<Labels, Histogram>,
    pub tcp_opened: Family<Labels, Counter>,
    pub tcp_closed: Family<Labels, Counter>,
    pub tcp_sent: Family<Labels, Counter>,
    pub tcp_received: Family<Labels, Counter>,
    pub config_version: Gauge,
    pub config_rejected: Counter,
    pub loops_refused: Counter,
    /// Connections the inbound and outbound listeners accepted (with peer multiplexing, many
    /// client connections arrive at a peer's inbound listener as one).
    pub inbound_connections: Counter,
    pub outbound_connections: Counter,
    /// Resilience events, by destination service and kind (bounded sets).
    pub resilience: Family<EventLabels, Counter>,
    /// Gateway servers not served because their certificate material is missing or bad.
    pub gateway_server_errors: Gauge,
    /// Directions of finished opaque TCP relays, by how their bytes moved
    /// (`crate::relay::How`): `copy_no_pipe` says the zero-copy path was wanted and not had.
    pub tcp_relay_directions: Family<RelayLabels, Counter>,
}

/// Labels of a finished TCP relay direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayLabels {
    /// copy, splice, copy_no_pipe
    pub mode: &'static str,
}

/// Labels of a resilience event.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub destination_service: String,
    /// retry, timeout, overflow, ejection, fault_delay, fault_abort, retry_budget_exhausted,
    /// peer_not_http2 (an endpoint labelled as having a sidecar answered HTTP/2 with HTTP/1)
    pub event: &'static str,
}

type HistFn = fn() -> Histogram;

/// `metric`, registered as `name` in `registry` (which keeps one handle; the caller the other).
fn registered<M>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut root = Registry::default();
        let istio = root.sub_registry_with_prefix("istio");
        let ms: HistFn = || {
            Histogram::new([
                0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                10000.0, 30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
            ])
        };
        let bytes: HistFn = || {
            Histogram::new([
                1.0,
                10.0,
                100.0,
                1000.0,
                10000.0,
                100000.0,
                1000000.0,
                10000000.0,
                100000000.0,
            ])
        };
        let requests = registered(
            istio,
            "requests",
            "Requests, by Istio's standard labels",
            Family::<Labels, Counter>::default(),
        );
        let duration_ms = registered(
            istio,
            "request_duration_milliseconds",
            "Request duration in milliseconds",
            Family::<Labels, Histogram>::new_with_constructor(ms),
        );
        let request_bytes = registered(
            istio,
            "request_bytes",
            "Request body size (from content-length)",
            Family::<Labels, Histogram>::new_with_constructor(bytes),
        );
        let response_bytes = registered(
            istio,
            "response_bytes",
            "Response body size (from content-length)",
            Family::<Labels, Histogram>::new_with_constructor(bytes),
        );
        let tcp_opened = registered(
            istio,
            "tcp_connections_opened",
            "TCP connections opened",
            Family::<Labels, Counter>::default(),
        );
        let tcp_closed = registered(
            istio,
            "tcp_connections_closed",
            "TCP connections closed",
            Family::<Labels, Counter>::default(),
        );
        let tcp_sent = registered(
            istio,
            "tcp_sent_bytes",
            "Bytes sent to the client during TCP connections",
            Family::<Labels, Counter>::default(),
        );
        let tcp_received = registered(
            istio,
            "tcp_received_bytes",
            "Bytes received from the client during TCP connections",
            Family::<Labels, Counter>::default(),
        );
        let ferry = root.sub_registry_with_prefix("ferry_proxy");
        let config_version = registered(
            ferry,
            "config_version",
            "Version of the configuration snapshot in use",
            Gauge::default(),
        );
        let config_rejected = registered(
            ferry,
            "config_rejected",
            "Configuration updates refused (the previous snapshot kept serving)",
            Counter::default(),
        );
        let loops_refused = registered(
            ferry,
            "loops_refused",
            "Connections refused because their destination was the proxy itself",
            Counter::default(),
        );
        let inbound_connections = registered(
            ferry,
            "inbound_connections",
            "Connections accepted by the inbound listener",
            Counter::default(),
        );
        let outbound_connections = registered(
            ferry,
            "outbound_connections",
            "Connections accepted by the outbound listener",
            Counter::default(),
        );
        let resilience = registered(
            ferry,
            "upstream_events",
            "Retries, timeouts, circuit-breaker overflows, outlier ejections and injected faults",
            Family::<EventLabels, Counter>::default(),
        );
        let gateway_server_errors = registered(
            ferry,
            "gateway_server_errors",
            "Gateway servers left out of the current configuration (missing or bad certificate material)",
            Gauge::default(),
        );
        let tcp_relay_directions = registered(
            ferry,
            "tcp_relay_directions",
            "Directions of finished opaque TCP relays: copy (through a buffer), splice (a bulk \
             transfer moved to a pipe), copy_no_pipe (a bulk transfer that could not have a pipe)",
            Family::<RelayLabels, Counter>::default(),
        );
        Metrics {
            gateway_server_errors,
            tcp_relay_directions,
            resilience,
            registry: root,
            requests,
            duration_ms,
            request_bytes,
            response_bytes,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            config_version,
            config_rejected,
            loops_refused,
            inbound_connections,
            outbound_connections,
        }
    }

    /// Count one resilience event.
    pub fn event(&self, service: &str, event: &'static str) {
        self.resilience
            .get_or_create(&EventLabels {
                destination_service: service.to_owned(),
                event,
            })
            .inc();
    }

    /// The four request metrics of one label set.
    pub fn request_metrics(&self, labels: &Labels) -> RequestMetrics {
        RequestMetrics {
            requests: self.requests.get_or_create(labels).clone(),
            duration_ms: self.duration_ms.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Handles on one label set's request metrics (they share state with the families).
#[derive(Clone)]
pub struct RequestMetrics {
    pub requests: Counter,
    pub duration_ms: Histogram,
    pub request_bytes: Histogram,
    pub response_bytes: Histogram,
}

/// The metrics a connection last reported to, under the key its label set was built from.
/// Requests on one connection almost always share their labels, so the label set (eighteen
/// strings) is built, and the families (a hash of them and a lock, four times) consulted, only
/// when the key changes.
pub struct LastLabels<K>(std::sync::Mutex<Option<(K, RequestMetrics)>>);

impl<K> Default for LastLabels<K> {
    fn default() -> Self {
        LastLabels(std::sync::Mutex::new(None))
    }
}

impl<K: PartialEq> LastLabels<K> {
    /// Run `f` on the metrics of the label set `key` stands for (`labels` builds it).
    pub fn with(
        &self,
        metrics: &Metrics,
        key: K,
        labels: impl FnOnce() -> Labels,
        f: impl FnOnce(&RequestMetrics),
    ) {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match &*last {
            Some((k, m)) if *k == key => f(m),
            _ => {
                let m = metrics.request_metrics(&labels());
                f(&m);
                *last = Some((key, m));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(code: &str) -> Labels {
        Labels {
            reporter: "source".into(),
            response_code: code.into(),
            ..Labels::default()
        }
    }

    #[test]
    fn the_cache_counts_into_the_families_and_follows_label_changes() {
        let m = Metrics::new();
        let last = LastLabels::default();
        let mut built = 0;
        for code in ["200", "200", "503", "200"] {
            last.with(
                &m,
                code,
                || {
                    built += 1;
                    labels(code)
                },
                |r| {
                    r.requests.inc();
                },
            );
        }
        assert_eq!(built, 3, "built again only when the key changed");
        assert_eq!(m.requests.get_or_create(&labels("200")).get(), 3);
        assert_eq!(m.requests.get_or_create(&labels("503")).get(), 1);
        let text = m.encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"503\""))
            .unwrap_or_else(|| panic!("no 503 series: {text}"));
        assert!(line.ends_with(" 1"), "{line}");
    }
}
