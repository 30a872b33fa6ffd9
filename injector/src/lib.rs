//! `ferry-injector`: the mutating admission webhook that adds `istio-init` and `istio-proxy` to
//! pods. Not built yet (its own issue); this crate only fixes the workspace layout.
//!
//! The injector will reuse `ferry_init::config` to validate the `traffic.sidecar.istio.io/*`
//! annotations, so it can never emit arguments the init container would reject.

/// The capture ports the injector excludes from inbound capture by default (`-d`), as Istio does.
pub fn default_inbound_exclude_ports() -> [u16; 3] {
    use ferry_init::spec;
    [spec::PROMETHEUS_PORT, spec::HEALTH_PORT, spec::STATUS_PORT]
}
