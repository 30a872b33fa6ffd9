//! `ferry-proxy`: the sidecar that serves the traffic `ferry-init` captures. Not built yet (its
//! own issue); this crate only fixes the workspace layout and the ports it will own.

use ferry_init::spec;

/// Ports the proxy binds, in the README's ports table order.
pub const PORTS: [(u16, &str); 6] = [
    (spec::OUTBOUND_CAPTURE_PORT, "outbound capture"),
    (spec::INBOUND_CAPTURE_PORT, "inbound capture"),
    (spec::STATUS_PORT, "agent status"),
    (spec::HEALTH_PORT, "health"),
    (spec::PROMETHEUS_PORT, "prometheus"),
    (spec::ADMIN_PORT, "admin (localhost)"),
];
