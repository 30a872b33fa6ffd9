//! Configuration in two stages: [`Args`] is istio-iptables' command line exactly as Istio's
//! injection template passes it, [`Config`] is the validated result. Every setting that Istio also
//! reads from the environment falls back to the same variable names, via [`Env`] so tests never
//! touch the process environment.
//!
//! Validation happens here, before anything touches the network namespace, and every error names
//! the flag (or variable) and the value.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use clap::Parser;
use ipnet::IpNet;

use crate::spec;

/// istio-iptables' command line. Flag names, short letters and defaults are Istio's.
#[derive(Parser, Debug, Default, Clone)]
#[command(
    name = "ferry-init",
    version,
    // Go's pflag lets a repeated flag override the earlier one; so do we.
    args_override_self = true,
    about = "Install a pod's traffic-capture rules (drop-in for istio-iptables)",
    long_about = "Install the nat/mangle/raw rules (ISTIO_INBOUND, ISTIO_IN_REDIRECT, ISTIO_REDIRECT, \
ISTIO_OUTPUT, ...) that send a pod's TCP to the sidecar proxy: outbound to -p (15001), inbound to -z \
(15006). Accepts istio-iptables' flags and environment unchanged; also runs when invoked as \
`istio-iptables` or with `istio-iptables` as its first argument.\n\n\
The rules are applied atomically with one iptables-restore per address family. Running again with \
the same configuration changes nothing. --reconcile replaces a different existing ruleset in one \
transaction; --cleanup-only removes every ISTIO_* chain and jump and nothing else; --run-validation \
proves that redirection really works (exit 126 with a diagnosis when it does not).",
    after_help = "Exit codes: 0 success, 1 runtime failure (iptables, permissions), 2 bad command line, \
64 invalid configuration value, 126 validation failed."
)]
pub struct Args {
    /// Port the outbound capture redirects to [env: none] [default: 15001]
    #[arg(
        short = 'p',
        long = "envoy-port",
        value_name = "PORT",
        allow_hyphen_values = true
    )]
    pub envoy_port: Option<String>,
    /// Port the inbound capture redirects to [env: INBOUND_CAPTURE_PORT] [default: 15006]
    #[arg(
        short = 'z',
        long = "inbound-capture-port",
        value_name = "PORT",
        allow_hyphen_values = true
    )]
    pub inbound_capture_port: Option<String>,
    /// Tunnel (HBONE) port, never captured inbound [env: INBOUND_TUNNEL_PORT] [default: 15008]
    #[arg(
        short = 'e',
        long = "inbound-tunnel-port",
        value_name = "PORT",
        allow_hyphen_values = true
    )]
    pub inbound_tunnel_port: Option<String>,
    /// UID(s) whose traffic is never captured, comma separated [env: PROXY_UID]
    /// [default: uid of $ENVOY_USER (istio-proxy), else 1337]
    #[arg(
        short = 'u',
        long = "proxy-uid",
        value_name = "UIDS",
        allow_hyphen_values = true
    )]
    pub proxy_uid: Option<String>,
    /// GID(s) whose traffic is never captured [env: PROXY_GID] [default: the UIDs]
    #[arg(
        short = 'g',
        long = "proxy-gid",
        value_name = "GIDS",
        allow_hyphen_values = true
    )]
    pub proxy_gid: Option<String>,
    /// Inbound interception mode: REDIRECT or TPROXY [env: ISTIO_INBOUND_INTERCEPTION_MODE]
    #[arg(
        short = 'm',
        long = "istio-inbound-interception-mode",
        value_name = "MODE",
        allow_hyphen_values = true
    )]
    pub mode: Option<String>,
    /// TPROXY packet mark [env: ISTIO_INBOUND_TPROXY_MARK] [default: 1337]
    #[arg(
        short = 't',
        long = "istio-inbound-tproxy-mark",
        value_name = "MARK",
        allow_hyphen_values = true
    )]
    pub tproxy_mark: Option<String>,
    /// TPROXY routing table [env: ISTIO_INBOUND_TPROXY_ROUTE_TABLE] [default: 133]
    #[arg(
        short = 'r',
        long = "istio-inbound-tproxy-route-table",
        value_name = "TABLE",
        allow_hyphen_values = true
    )]
    pub tproxy_route_table: Option<String>,
    /// Inbound ports to capture: `*`, a comma list, or empty for none [env: ISTIO_INBOUND_PORTS]
    #[arg(
        short = 'b',
        long = "istio-inbound-ports",
        value_name = "PORTS",
        allow_hyphen_values = true
    )]
    pub inbound_ports: Option<String>,
    /// Inbound ports not captured (only with -b '*') [env: ISTIO_LOCAL_EXCLUDE_PORTS]
    #[arg(
        short = 'd',
        long = "istio-local-exclude-ports",
        value_name = "PORTS",
        allow_hyphen_values = true
    )]
    pub inbound_exclude_ports: Option<String>,
    /// Interfaces whose traffic is never captured [env: ISTIO_EXCLUDE_INTERFACES]
    #[arg(
        short = 'c',
        long = "istio-exclude-interfaces",
        value_name = "NICS",
        allow_hyphen_values = true
    )]
    pub exclude_interfaces: Option<String>,
    /// Outbound destinations to capture: `*`, CIDR list, or empty for none [env: ISTIO_SERVICE_CIDR]
    #[arg(
        short = 'i',
        long = "istio-service-cidr",
        value_name = "CIDRS",
        allow_hyphen_values = true
    )]
    pub outbound_ranges: Option<String>,
    /// Outbound destinations never captured [env: ISTIO_SERVICE_EXCLUDE_CIDR]
    #[arg(
        short = 'x',
        long = "istio-service-exclude-cidr",
        value_name = "CIDRS",
        allow_hyphen_values = true
    )]
    pub outbound_exclude_ranges: Option<String>,
    /// Outbound ports always captured [env: ISTIO_OUTBOUND_PORTS]
    #[arg(
        short = 'q',
        long = "istio-outbound-ports",
        value_name = "PORTS",
        allow_hyphen_values = true
    )]
    pub outbound_ports: Option<String>,
    /// Outbound ports never captured [env: ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE]
    #[arg(
        short = 'o',
        long = "istio-local-outbound-ports-exclude",
        value_name = "PORTS",
        allow_hyphen_values = true
    )]
    pub outbound_exclude_ports: Option<String>,
    /// Virtual interfaces whose inbound traffic is treated as outbound [env: KUBE_VIRT_INTERFACES]
    #[arg(
        short = 'k',
        long = "kube-virt-interfaces",
        value_name = "NICS",
        allow_hyphen_values = true
    )]
    pub kube_virt_interfaces: Option<String>,
    /// Print the iptables-restore input and change nothing [env: DRY_RUN]
    #[arg(short = 'n', long = "dry-run", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub dry_run: Option<String>,
    /// Capture DNS (port 53) to the agent's 15053 [env: REDIRECT_DNS, ISTIO_META_DNS_CAPTURE]
    #[arg(long = "redirect-dns", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub redirect_dns: Option<String>,
    /// With --redirect-dns: capture all port-53 traffic, not only to resolv.conf's servers [env: CAPTURE_ALL_DNS]
    #[arg(long = "capture-all-dns", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub capture_all_dns: Option<String>,
    /// Drop conntrack-INVALID packets [env: DROP_INVALID, INVALID_DROP]
    #[arg(long = "drop-invalid", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub drop_invalid: Option<String>,
    /// Program IPv6 whenever the pod has any IPv6 address [env: DUAL_STACK, ISTIO_DUAL_STACK]
    #[arg(long = "dual-stack", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub dual_stack: Option<String>,
    /// Print rules in iptables-restore format (false: one iptables command per line) [default: true]
    #[arg(short = 'f', long = "restore-format", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub restore_format: Option<String>,
    /// Do not touch iptables (use with --run-validation, as Istio's CNI mode does)
    #[arg(long = "skip-rule-apply", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub skip_rule_apply: Option<String>,
    /// Prove that redirection works (after applying, unless --skip-rule-apply); exit 126 if not
    #[arg(long = "run-validation", alias = "validate", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub run_validation: Option<String>,
    /// Original-destination port the validation probe connects to [default: 15002]
    #[arg(
        long = "iptables-probe-port",
        value_name = "PORT",
        allow_hyphen_values = true
    )]
    pub probe_port: Option<String>,
    /// How long validation may take, Go duration syntax (500ms, 5s, 1m) [default: 5s]
    #[arg(
        long = "probe-timeout",
        value_name = "DURATION",
        allow_hyphen_values = true
    )]
    pub probe_timeout: Option<String>,
    /// Replace existing, different ISTIO_* rules in one atomic transaction
    #[arg(long = "reconcile", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub reconcile: Option<String>,
    /// Remove every ISTIO_* chain, rule and jump, and nothing else, then exit
    #[arg(long = "cleanup-only", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub cleanup_only: Option<String>,
    /// Apply even when identical rules are already in place
    #[arg(long = "force-apply", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub force_apply: Option<String>,
    /// Istio's native nftables backend: accepted, but the rules are applied through iptables-nft
    #[arg(long = "native-nftables", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub native_nftables: Option<String>,
    /// Use this iptables backend instead of detecting it: legacy or nft
    #[arg(
        long = "force-iptables-binary",
        value_name = "legacy|nft",
        allow_hyphen_values = true
    )]
    pub force_iptables_binary: Option<String>,
    /// Istio CNI: network namespace to enter (not supported: run inside the namespace instead)
    #[arg(
        long = "network-namespace",
        value_name = "PATH",
        allow_hyphen_values = true
    )]
    pub network_namespace: Option<String>,
    /// Istio CNI mode flag (accepted; has no effect here)
    #[arg(long = "cni-mode", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub cni_mode: Option<String>,
    /// Insert LOG rules for tracing (accepted and ignored, with a warning)
    #[arg(long = "iptables-trace-logging", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub trace_logging: Option<String>,
    /// Istio log levels, `scope:level,...` (e.g. default:info)
    #[arg(
        long = "log_output_level",
        value_name = "LEVELS",
        allow_hyphen_values = true
    )]
    pub log_output_level: Option<String>,
    /// Log as JSON lines
    #[arg(long = "log_as_json", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub log_as_json: Option<String>,
    /// Istio logging flags accepted for compatibility; they have no effect
    #[arg(long = "log_caller", hide = true)]
    pub log_caller: Option<String>,
    #[arg(long = "log_stacktrace_level", hide = true)]
    pub log_stacktrace_level: Option<String>,
    #[arg(long = "log_target", hide = true)]
    pub log_target: Option<String>,
    /// Seconds to wait for the xtables lock held by another iptables user [default: 30]
    #[arg(
        long = "xtables-wait",
        value_name = "SECONDS",
        allow_hyphen_values = true
    )]
    pub xtables_wait: Option<String>,
    /// resolv.conf to read nameservers from when --redirect-dns is on
    #[arg(
        long = "resolv-conf",
        value_name = "PATH",
        default_value = "/etc/resolv.conf"
    )]
    pub resolv_conf: String,
    /// Destination the outbound validation probe connects to (must fall in -i). The default is
    /// TEST-NET-1 (RFC 5737), which no real host uses.
    #[arg(
        long = "probe-outbound-ip",
        value_name = "IP",
        allow_hyphen_values = true
    )]
    pub probe_outbound_ip: Option<String>,
    /// Internal: run the validation probe client (used by --run-validation under another UID)
    #[arg(long = "internal-probe-connect", hide = true, value_name = "ADDR")]
    pub internal_probe_connect: Option<String>,
    #[arg(long = "internal-probe-token", hide = true)]
    pub internal_probe_token: Option<String>,
}

/// Where configuration values come from besides flags.
pub trait Env {
    fn get(&self, key: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Env for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

/// A configuration value that could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("invalid {setting} value {value:?}: {reason}")]
    Invalid {
        setting: String,
        value: String,
        reason: String,
    },
    #[error("{0}")]
    Conflict(String),
}

/// Inbound interception mode (`-m`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Redirect,
    Tproxy,
}

/// Which inbound ports are captured (`-b`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboundPorts {
    None,
    All,
    List(Vec<u16>),
}

/// A CIDR as the user wrote it: parsed for decisions, printed exactly as given (Istio writes host
/// bits through, e.g. `127.0.0.1/24`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub net: IpNet,
    pub text: String,
}

/// Outbound destinations captured (`-i`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutboundRanges {
    All,
    List(Vec<Cidr>),
}

/// Owner-group filter (ISTIO_OUTBOUND_OWNER_GROUPS / _EXCLUDE).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerGroups {
    /// Capture every group (the default `*`), except these.
    AllExcept(Vec<String>),
    /// Capture only these groups.
    Only(Vec<String>),
}

/// iptables backend, chosen by detection or `--force-iptables-binary`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
    /// Whatever `iptables` on PATH is.
    Plain,
}

/// The validated configuration: everything typed, nothing left to parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub proxy_port: u16,
    pub inbound_capture_port: u16,
    pub inbound_tunnel_port: u16,
    pub proxy_uids: Vec<u32>,
    pub proxy_gids: Vec<u32>,
    pub mode: Mode,
    pub tproxy_mark: u32,
    pub tproxy_route_table: u32,
    pub inbound_ports: InboundPorts,
    pub inbound_exclude_ports: Vec<u16>,
    pub exclude_interfaces: Vec<String>,
    pub outbound_ranges: OutboundRanges,
    pub outbound_exclude_ranges: Vec<Cidr>,
    pub outbound_ports: Vec<u16>,
    pub outbound_exclude_ports: Vec<u16>,
    pub kube_virt_interfaces: Vec<String>,
    pub redirect_dns: bool,
    pub capture_all_dns: bool,
    pub drop_invalid: bool,
    pub dual_stack: bool,
    pub owner_groups: OwnerGroups,
    pub host_ipv4_loopback_cidr: Cidr,
    pub dry_run: bool,
    pub restore_format: bool,
    pub skip_rule_apply: bool,
    pub run_validation: bool,
    pub probe_port: u16,
    pub probe_timeout: Duration,
    pub probe_outbound_ip: Option<IpAddr>,
    pub reconcile: bool,
    pub cleanup_only: bool,
    pub force_apply: bool,
    pub native_nftables: bool,
    pub force_backend: Option<Backend>,
    pub trace_logging: bool,
    pub resolv_conf: String,
    pub xtables_wait: u32,
}

/// One raw value and where it came from, so errors can name the flag or variable.
struct Raw {
    value: String,
    origin: String,
}

struct Resolver<'a> {
    env: &'a dyn Env,
}

impl Resolver<'_> {
    /// Flag first, then the first environment variable that is set, then the default.
    fn get(&self, flag: &Option<String>, name: &str, envs: &[&str], default: &str) -> Raw {
        if let Some(v) = flag {
            return Raw {
                value: v.clone(),
                origin: name.to_owned(),
            };
        }
        for e in envs {
            if let Some(v) = self.env.get(e) {
                return Raw {
                    value: v,
                    origin: format!("${e}"),
                };
            }
        }
        Raw {
            value: default.to_owned(),
            origin: name.to_owned(),
        }
    }
}

fn invalid(raw: &Raw, reason: impl Into<String>) -> Error {
    Error::Invalid {
        setting: raw.origin.clone(),
        value: raw.value.clone(),
        reason: reason.into(),
    }
}

/// Comma list with empty items dropped (`6000,7000,` is fine, as in Istio).
fn items(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|i| !i.is_empty())
}

fn parse_port(raw: &Raw, s: &str) -> Result<u16, Error> {
    match s.parse::<u16>() {
        Ok(0) => Err(invalid(raw, "port 0 is not a valid port")),
        Ok(p) => Ok(p),
        Err(_) => Err(invalid(
            raw,
            format!("{s:?} is not a port number (1-65535)"),
        )),
    }
}

fn port(raw: Raw) -> Result<u16, Error> {
    parse_port(&raw, raw.value.trim())
}

fn ports(raw: Raw) -> Result<Vec<u16>, Error> {
    items(&raw.value).map(|p| parse_port(&raw, p)).collect()
}

fn ids(raw: Raw) -> Result<Vec<u32>, Error> {
    let v: Vec<u32> = items(&raw.value)
        .map(|s| {
            s.parse::<u32>()
                .map_err(|_| invalid(&raw, format!("{s:?} is not a numeric id")))
        })
        .collect::<Result<_, _>>()?;
    if v.is_empty() {
        return Err(invalid(&raw, "at least one numeric id is required"));
    }
    Ok(v)
}

fn number(raw: Raw) -> Result<u32, Error> {
    raw.value
        .trim()
        .parse::<u32>()
        .map_err(|_| invalid(&raw, "expected a non-negative integer"))
}

/// Istio's `--log_output_level` (`scope:level,...`) → the `default` scope's level as a tracing
/// filter directive (`off`, `error`, `warn`, `info`, `debug`). Shared by every ferry binary.
pub fn istio_log_level(levels: Option<&str>) -> &'static str {
    let mut level = "info";
    for part in levels.unwrap_or("default:info").split(',') {
        let (scope, l) = part.split_once(':').unwrap_or(("default", part));
        if scope == "default" {
            level = match l.trim() {
                "none" => "off",
                "fatal" | "error" => "error",
                "warn" | "warning" => "warn",
                "debug" => "debug",
                _ => "info",
            };
        }
    }
    level
}

/// Go `strconv.ParseBool` spellings.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" | "" => Some(false),
        _ => None,
    }
}

fn boolean(raw: Raw) -> Result<bool, Error> {
    parse_bool(&raw.value).ok_or_else(|| invalid(&raw, "expected true or false"))
}

fn cidr(raw: &Raw, s: &str) -> Result<Cidr, Error> {
    let net = s
        .parse::<IpNet>()
        .map_err(|_| invalid(raw, format!("{s:?} is not a CIDR (e.g. 10.0.0.0/8)")))?;
    Ok(Cidr {
        net,
        text: s.to_owned(),
    })
}

fn cidrs(raw: &Raw) -> Result<Vec<Cidr>, Error> {
    items(&raw.value).map(|s| cidr(raw, s)).collect()
}

/// Linux `dev_valid_name`: 1-15 bytes, no `/`, `:` or whitespace, not `.` or `..`.
fn interfaces(raw: Raw) -> Result<Vec<String>, Error> {
    items(&raw.value)
        .map(|n| {
            let bad = n.len() > 15
                || n == "."
                || n == ".."
                || n.chars().any(|c| c == '/' || c == ':' || c.is_whitespace());
            if bad {
                Err(invalid(
                    &raw,
                    format!("{n:?} is not a valid interface name"),
                ))
            } else {
                Ok(n.to_owned())
            }
        })
        .collect()
}

/// Go `time.ParseDuration` for the units that make sense here (`ns` to `h`, decimals allowed).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        let value: f64 = num.parse().ok()?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * scale;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// `ENVOY_USER`'s UID, else Istio's 1337.
fn default_proxy_uid(env: &dyn Env) -> String {
    let user = env
        .get("ENVOY_USER")
        .unwrap_or_else(|| "istio-proxy".to_owned());
    match nix::unistd::User::from_name(&user) {
        Ok(Some(u)) => u.uid.to_string(),
        _ => spec::PROXY_UID.to_string(),
    }
}

impl Config {
    /// Validate the command line against the environment. Nothing on the system is touched.
    pub fn from_args(args: &Args, env: &dyn Env) -> Result<Config, Error> {
        let r = Resolver { env };
        let uid_raw = r.get(&args.proxy_uid, "-u/--proxy-uid", &["PROXY_UID"], "");
        let uid_raw = if uid_raw.value.trim().is_empty() {
            Raw {
                value: default_proxy_uid(env),
                origin: uid_raw.origin,
            }
        } else {
            uid_raw
        };
        let gid_raw = r.get(&args.proxy_gid, "-g/--proxy-gid", &["PROXY_GID"], "");
        // Istio: an empty GID list means "the same as the UIDs" (for TPROXY, where they match).
        let gid_raw = if gid_raw.value.trim().is_empty() {
            Raw {
                value: uid_raw.value.clone(),
                origin: gid_raw.origin,
            }
        } else {
            gid_raw
        };

        let mode_raw = r.get(
            &args.mode,
            "-m/--istio-inbound-interception-mode",
            &["ISTIO_INBOUND_INTERCEPTION_MODE"],
            "",
        );
        let mode = match mode_raw.value.trim() {
            "" | "REDIRECT" => Mode::Redirect,
            "TPROXY" => Mode::Tproxy,
            _ => return Err(invalid(&mode_raw, "expected REDIRECT or TPROXY")),
        };

        let inbound_raw = r.get(
            &args.inbound_ports,
            "-b/--istio-inbound-ports",
            &["ISTIO_INBOUND_PORTS"],
            "",
        );
        let inbound_ports = match inbound_raw.value.trim() {
            "" => InboundPorts::None,
            "*" => InboundPorts::All,
            _ => {
                let list = ports(inbound_raw)?;
                if list.is_empty() {
                    InboundPorts::None
                } else {
                    InboundPorts::List(list)
                }
            }
        };

        let out_raw = r.get(
            &args.outbound_ranges,
            "-i/--istio-service-cidr",
            &["ISTIO_SERVICE_CIDR"],
            "",
        );
        let outbound_ranges = if out_raw.value.trim() == "*" {
            OutboundRanges::All
        } else {
            OutboundRanges::List(cidrs(&out_raw)?)
        };
        let excl_raw = r.get(
            &args.outbound_exclude_ranges,
            "-x/--istio-service-exclude-cidr",
            &["ISTIO_SERVICE_EXCLUDE_CIDR"],
            "",
        );
        let outbound_exclude_ranges = cidrs(&excl_raw)?;

        let owner_groups = owner_groups(&r)?;

        let loop_raw = r.get(
            &None,
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
            &["ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR"],
            "127.0.0.1/32",
        );
        let host_ipv4_loopback_cidr = cidr(&loop_raw, loop_raw.value.trim())?;
        match host_ipv4_loopback_cidr.net {
            IpNet::V4(n) if n.addr().is_loopback() => {}
            _ => {
                return Err(invalid(
                    &loop_raw,
                    "must be an IPv4 CIDR inside 127.0.0.0/8",
                ));
            }
        }

        let timeout_raw = r.get(&args.probe_timeout, "--probe-timeout", &[], "5s");
        let probe_timeout = parse_duration(&timeout_raw.value)
            .ok_or_else(|| invalid(&timeout_raw, "expected a duration like 500ms, 5s or 1m"))?;

        let force_backend = match args.force_iptables_binary.as_deref().map(str::trim) {
            None | Some("") => None,
            Some("legacy") => Some(Backend::Legacy),
            Some("nft") => Some(Backend::Nft),
            Some(other) => {
                return Err(Error::Invalid {
                    setting: "--force-iptables-binary".into(),
                    value: other.into(),
                    reason: "expected legacy or nft".into(),
                });
            }
        };

        let probe_outbound_ip = match args.probe_outbound_ip.as_deref() {
            None => None,
            Some(s) => Some(s.trim().parse::<IpAddr>().map_err(|_| Error::Invalid {
                setting: "--probe-outbound-ip".into(),
                value: s.into(),
                reason: "expected an IP address".into(),
            })?),
        };

        if let Some(ns) = &args.network_namespace
            && !ns.trim().is_empty()
        {
            return Err(Error::Invalid {
                setting: "--network-namespace".into(),
                value: ns.clone(),
                reason: "entering another network namespace is not supported; run ferry-init \
                         inside it (e.g. `ip netns exec NAME ferry-init ...` or `nsenter --net=PATH`)"
                    .into(),
            });
        }

        let cfg = Config {
            proxy_port: port(r.get(&args.envoy_port, "-p/--envoy-port", &[], "15001"))?,
            inbound_capture_port: port(r.get(
                &args.inbound_capture_port,
                "-z/--inbound-capture-port",
                &["INBOUND_CAPTURE_PORT"],
                "15006",
            ))?,
            inbound_tunnel_port: port(r.get(
                &args.inbound_tunnel_port,
                "-e/--inbound-tunnel-port",
                &["INBOUND_TUNNEL_PORT"],
                "15008",
            ))?,
            proxy_uids: ids(uid_raw)?,
            proxy_gids: ids(gid_raw)?,
            mode,
            tproxy_mark: number(r.get(
                &args.tproxy_mark,
                "-t/--istio-inbound-tproxy-mark",
                &["ISTIO_INBOUND_TPROXY_MARK"],
                "1337",
            ))?,
            tproxy_route_table: number(r.get(
                &args.tproxy_route_table,
                "-r/--istio-inbound-tproxy-route-table",
                &["ISTIO_INBOUND_TPROXY_ROUTE_TABLE"],
                "133",
            ))?,
            inbound_ports,
            inbound_exclude_ports: ports(r.get(
                &args.inbound_exclude_ports,
                "-d/--istio-local-exclude-ports",
                &["ISTIO_LOCAL_EXCLUDE_PORTS"],
                "",
            ))?,
            exclude_interfaces: interfaces(r.get(
                &args.exclude_interfaces,
                "-c/--istio-exclude-interfaces",
                &["ISTIO_EXCLUDE_INTERFACES"],
                "",
            ))?,
            outbound_ranges,
            outbound_exclude_ranges,
            outbound_ports: ports(r.get(
                &args.outbound_ports,
                "-q/--istio-outbound-ports",
                &["ISTIO_OUTBOUND_PORTS"],
                "",
            ))?,
            outbound_exclude_ports: ports(r.get(
                &args.outbound_exclude_ports,
                "-o/--istio-local-outbound-ports-exclude",
                &["ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE"],
                "",
            ))?,
            kube_virt_interfaces: interfaces(r.get(
                &args.kube_virt_interfaces,
                "-k/--kube-virt-interfaces",
                &["KUBE_VIRT_INTERFACES"],
                "",
            ))?,
            redirect_dns: boolean(r.get(
                &args.redirect_dns,
                "--redirect-dns",
                &["REDIRECT_DNS", "ISTIO_META_DNS_CAPTURE"],
                "false",
            ))?,
            capture_all_dns: boolean(r.get(
                &args.capture_all_dns,
                "--capture-all-dns",
                &["CAPTURE_ALL_DNS"],
                "false",
            ))?,
            drop_invalid: boolean(r.get(
                &args.drop_invalid,
                "--drop-invalid",
                &["DROP_INVALID", "INVALID_DROP"],
                "false",
            ))?,
            dual_stack: boolean(r.get(
                &args.dual_stack,
                "--dual-stack",
                &["DUAL_STACK", "ISTIO_DUAL_STACK"],
                "false",
            ))?,
            owner_groups,
            host_ipv4_loopback_cidr,
            dry_run: boolean(r.get(&args.dry_run, "-n/--dry-run", &["DRY_RUN"], "false"))?,
            restore_format: boolean(r.get(&args.restore_format, "--restore-format", &[], "true"))?,
            skip_rule_apply: boolean(r.get(
                &args.skip_rule_apply,
                "--skip-rule-apply",
                &[],
                "false",
            ))?,
            run_validation: boolean(r.get(&args.run_validation, "--run-validation", &[], "false"))?,
            probe_port: port(r.get(&args.probe_port, "--iptables-probe-port", &[], "15002"))?,
            probe_timeout,
            probe_outbound_ip,
            reconcile: boolean(r.get(&args.reconcile, "--reconcile", &[], "false"))?,
            cleanup_only: boolean(r.get(&args.cleanup_only, "--cleanup-only", &[], "false"))?,
            force_apply: boolean(r.get(&args.force_apply, "--force-apply", &[], "false"))?,
            native_nftables: boolean(r.get(
                &args.native_nftables,
                "--native-nftables",
                &[],
                "false",
            ))?,
            force_backend,
            trace_logging: boolean(r.get(
                &args.trace_logging,
                "--iptables-trace-logging",
                &[],
                "false",
            ))?,
            resolv_conf: args.resolv_conf.clone(),
            xtables_wait: number(r.get(&args.xtables_wait, "--xtables-wait", &[], "30"))?,
        };
        cfg.check_conflicts()?;
        Ok(cfg)
    }

    fn check_conflicts(&self) -> Result<(), Error> {
        let ports = [
            ("-p/--envoy-port", self.proxy_port),
            ("-z/--inbound-capture-port", self.inbound_capture_port),
        ];
        if ports[0].1 == ports[1].1 {
            return Err(Error::Conflict(format!(
                "{} and {} are both {}: outbound and inbound capture need different listeners",
                ports[0].0, ports[1].0, ports[0].1
            )));
        }
        if self.cleanup_only && self.skip_rule_apply {
            return Err(Error::Conflict(
                "--cleanup-only and --skip-rule-apply contradict each other".into(),
            ));
        }
        if self.run_validation && self.probe_timeout.is_zero() {
            return Err(Error::Conflict(
                "--probe-timeout must be greater than 0 when --run-validation is set".into(),
            ));
        }
        Ok(())
    }

    /// Whether any configured outbound capture range is a loopback address (Istio then omits the
    /// "app talking to itself over lo is not captured" rules).
    pub fn outbound_includes_loopback(&self) -> bool {
        match &self.outbound_ranges {
            OutboundRanges::All => false,
            OutboundRanges::List(l) => l.iter().any(|c| c.net.addr().is_loopback()),
        }
    }
}

fn owner_groups(r: &Resolver<'_>) -> Result<OwnerGroups, Error> {
    let inc = r.get(
        &None,
        "ISTIO_OUTBOUND_OWNER_GROUPS",
        &["ISTIO_OUTBOUND_OWNER_GROUPS"],
        "*",
    );
    let exc = r.get(
        &None,
        "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
        &["ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE"],
        "",
    );
    let check = |raw: &Raw| -> Result<Vec<String>, Error> {
        let groups: Vec<String> = items(&raw.value).map(str::to_owned).collect();
        if let Some(g) = groups.iter().find(|g| g.chars().any(char::is_whitespace)) {
            return Err(invalid(raw, format!("group {g:?} contains whitespace")));
        }
        // iptables allows at most 64 `-m owner` matches in one rule.
        if groups.len() > 64 {
            return Err(invalid(raw, "at most 64 groups are supported"));
        }
        Ok(groups)
    };
    let include_all = inc.value.trim() == "*" || inc.value.trim().is_empty();
    let excluded = check(&exc)?;
    if include_all {
        return Ok(OwnerGroups::AllExcept(excluded));
    }
    if !excluded.is_empty() {
        return Err(Error::Conflict(
            "set only one of ISTIO_OUTBOUND_OWNER_GROUPS and ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE"
                .into(),
        ));
    }
    Ok(OwnerGroups::Only(check(&inc)?))
}

#[cfg(test)]
mod tests;
