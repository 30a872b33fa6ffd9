//! Istio's fixed names and numbers, named once and imported everywhere else.
//!
//! Port numbers are the ones Istio's sidecar uses; the injector and the proxy import them from here
//! so the three binaries can never disagree about where traffic goes.

/// Outbound capture listener (`-p`, Envoy's `virtualOutbound`).
pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;
/// Inbound capture listener (`-z`, Envoy's `virtualInbound`).
pub const INBOUND_CAPTURE_PORT: u16 = 15006;
/// HBONE / mTLS tunnel port (`-e`): always bypasses inbound capture.
pub const INBOUND_TUNNEL_PORT: u16 = 15008;
/// Agent status port: merged metrics, app probes rewritten by the injector, `/quitquitquit`.
pub const STATUS_PORT: u16 = 15020;
/// Health (`/healthz/ready`) port.
pub const HEALTH_PORT: u16 = 15021;
/// Prometheus port (`/stats/prometheus`).
pub const PROMETHEUS_PORT: u16 = 15090;
/// Admin / config dump, bound on localhost only.
pub const ADMIN_PORT: u16 = 15000;
/// DNS proxy port of the agent (target of `--redirect-dns`).
pub const DNS_CAPTURE_PORT: u16 = 15053;
/// Original destination port the validation probe connects to (`--iptables-probe-port`).
pub const IPTABLES_PROBE_PORT: u16 = 15002;
/// UID and GID the proxy runs as; the capture rules exempt it so the proxy's own traffic never loops.
pub const PROXY_UID: u32 = 1337;
/// Default TPROXY packet mark (`-t`).
pub const TPROXY_MARK: u32 = 1337;
/// Default TPROXY routing table (`-r`).
pub const TPROXY_ROUTE_TABLE: u32 = 133;
/// Source address the proxy uses to reach the app on inbound (never captured again).
pub const INBOUND_PASSTHROUGH_SRC_V4: &str = "127.0.0.6/32";
/// IPv6 form of [`INBOUND_PASSTHROUGH_SRC_V4`]; added to `lo` when IPv6 is on.
pub const INBOUND_PASSTHROUGH_SRC_V6: &str = "::6/128";
/// Exit code of a failed `--run-validation` (Istio's `ValidationErrorCode`).
pub const VALIDATION_EXIT_CODE: i32 = 126;

/// The arguments Istio's injection template passes to the `istio-init` container by default
/// (first argument included: the template runs `istio-iptables ...`).
pub const INJECTED_DEFAULT_ARGS: &[&str] = &[
    "istio-iptables",
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
    "--log_output_level=default:info",
];

/// Chains this tool owns. Anything named `ISTIO_*` is considered ours by cleanup and reconcile.
pub mod chain {
    pub const INBOUND: &str = "ISTIO_INBOUND";
    pub const IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
    pub const REDIRECT: &str = "ISTIO_REDIRECT";
    pub const OUTPUT: &str = "ISTIO_OUTPUT";
    pub const OUTPUT_DNS: &str = "ISTIO_OUTPUT_DNS";
    pub const DIVERT: &str = "ISTIO_DIVERT";
    pub const TPROXY: &str = "ISTIO_TPROXY";
    pub const DROP: &str = "ISTIO_DROP";
    /// Prefix that marks a chain as ours.
    pub const PREFIX: &str = "ISTIO_";
}

/// Names iptables knows without `-N`: built-in chains and terminal verdicts.
pub const BUILT_INS: &[&str] = &[
    "INPUT",
    "OUTPUT",
    "FORWARD",
    "PREROUTING",
    "POSTROUTING",
    "ACCEPT",
    "RETURN",
    "DROP",
];
