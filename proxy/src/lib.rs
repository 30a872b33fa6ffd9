//! `ferry-proxy`: the sidecar that serves what `ferry-init` captures.
//!
//! Module map:
//! - [`config`]: Istio's `istio-proxy` arguments and environment → validated [`config::Config`].
//! - [`discovery`]: Kubernetes objects → immutable [`discovery::Snapshot`]; the file source.
//! - [`transport`]: `SO_ORIGINAL_DST`, upstream connects (inbound from 127.0.0.6).
//! - [`coalesce`]: gathers HTTP/2 frames from many streams into one write.
//! - [`h1pool`]: HTTP/1.1 upstream connections per endpoint, reused.
//! - [`h2pool`]: HTTP/2 upstream connections per endpoint (requests keep their `:authority`).
//! - [`detect`]: protocol sniffing with a timeout (server-first protocols never stall).
//! - [`proxy`]: the data path: TCP relay, HTTP/1.1 and HTTP/2 forwarding, upgrades, errors.
//! - [`admin`]: 15021 readiness, 15090 metrics, 15020 agent (app probes, /quitquitquit), 15000 admin.
//! - [`metrics`]: Istio's standard metrics.
//! - [`app`]: binding, discovery refresh, drain.
//! - [`os`]: process-level knobs that need a foreign call: the CPU scheduling policy, returning
//!   freed memory (the crate's only `unsafe`).

pub mod admin;
pub mod app;
pub mod coalesce;
pub mod config;
pub mod crds;
pub mod detect;
pub mod discovery;
pub mod explain;
pub mod gateway;
pub mod gateway_tls;
pub mod h1pool;
pub mod h2pool;
pub mod k8s;
pub mod k8s_objects;
pub mod metrics;
pub mod os;
pub mod proxy;
pub mod relay;
pub mod resilience;
pub mod routing;
#[cfg(test)]
mod testing;
pub mod transport;

/// The hash map of per-request lookups (hosts, endpoint addresses, routes): std's SipHash costs
/// hundreds of instructions per key, several times per request. The keys come from the cluster's
/// objects, not from requests (which only look up), and the seed is still random per map.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
