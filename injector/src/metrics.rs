//! Prometheus metrics of the webhook.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub kind: String,
    pub result: String,
}

/// Everything the injector exports.
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<OutcomeLabels, Counter>,
    pub latency: Histogram,
    pub cert_expiry: Gauge,
    pub reloads: Family<ReloadLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ferry_injector");
        let requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "requests",
            "Admission reviews by outcome (injected, skipped, denied, bad_request)",
            requests.clone(),
        );
        let latency = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ]);
        registry.register(
            "request_duration_seconds",
            "Time to answer an admission review",
            latency.clone(),
        );
        let cert_expiry = Gauge::default();
        registry.register(
            "serving_certificate_expiry_timestamp_seconds",
            "notAfter of the serving certificate",
            cert_expiry.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "reloads",
            "Configuration and certificate reloads by result (ok, rejected)",
            reloads.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            cert_expiry,
            reloads,
        }
    }

    pub fn reload(&self, kind: &str, ok: bool) {
        self.reloads
            .get_or_create(&ReloadLabels {
                kind: kind.into(),
                result: if ok { "ok" } else { "rejected" }.into(),
            })
            .inc();
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
