//! `ferry-injector`: Istio-compatible sidecar injection that explains its decisions.
//!
//! Module map:
//! - [`config`]: the injector's configuration file (Istio's chart values, validated).
//! - [`decision`]: Istio's `injectRequired`, returning the rule that decided.
//! - [`selector`]: Kubernetes label selectors.
//! - [`webhooks`]: the MutatingWebhookConfiguration's selectors, evaluated like the API server.
//! - [`annotations`]: the annotations that change injection, validated with `ferry-init`'s parser.
//! - [`inject`]: the mutation (Istio's `sidecar` template + post-processing), pure.
//! - [`probes`]: app probe rewriting to the agent port.
//! - [`proxyconfig`]: ProxyConfig merge, validation and `PROXY_CONFIG` text.
//! - [`quantity`]: canonical resource quantities.

pub mod annotations;
pub mod cert;
pub mod config;
pub mod decision;
pub mod inject;
pub mod metrics;
pub mod offline;
pub mod patch;
pub mod probes;
pub mod proxyconfig;
pub mod quantity;
pub mod selector;
pub mod selfsigned;
pub mod server;
pub mod smp;
pub mod webhook;
pub mod webhooks;
