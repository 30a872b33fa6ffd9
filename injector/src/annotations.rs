//! Pod annotations that change the injected containers: reading them (over the config's values),
//! validating them before anything is rendered, and turning the traffic ones into `istio-init`
//! arguments that `ferry-init` itself has checked.

use std::collections::BTreeMap;

use crate::config::Config;

pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
pub const KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
pub const REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";
pub const STATUS_PORT: &str = "status.sidecar.istio.io/port";
pub const READINESS_INITIAL_DELAY: &str = "readiness.status.sidecar.istio.io/initialDelaySeconds";
pub const READINESS_PERIOD: &str = "readiness.status.sidecar.istio.io/periodSeconds";
pub const READINESS_FAILURE_THRESHOLD: &str = "readiness.status.sidecar.istio.io/failureThreshold";
pub const PROXY_CONFIG: &str = "proxy.istio.io/config";
pub const MERGE_METRICS: &str = "prometheus.istio.io/merge-metrics";
pub const REWRITE_PROBES: &str = "sidecar.istio.io/rewriteAppHTTPProbers";
pub const NATIVE_SIDECAR: &str = "sidecar.istio.io/nativeSidecar";
pub const STATUS: &str = "sidecar.istio.io/status";
pub const PROXY_CPU: &str = "sidecar.istio.io/proxyCPU";
pub const PROXY_MEMORY: &str = "sidecar.istio.io/proxyMemory";
pub const PROXY_CPU_LIMIT: &str = "sidecar.istio.io/proxyCPULimit";
pub const PROXY_MEMORY_LIMIT: &str = "sidecar.istio.io/proxyMemoryLimit";

/// An annotation the injector cannot honour. The pod is rejected (`allowed: false`) with this text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid annotation {name}={value:?} ({param}): {reason}")]
pub struct Invalid {
    pub name: String,
    pub value: String,
    /// Istio's parameter name for it (e.g. `includeIPRanges`), so messages match Istio's.
    pub param: String,
    pub reason: String,
}

/// The `istio-iptables` settings of one pod, from its annotations over the config's values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrafficSettings {
    pub mode: String,
    pub include_ip_ranges: String,
    pub exclude_ip_ranges: String,
    pub include_inbound_ports: String,
    pub exclude_inbound_ports: String,
    pub include_outbound_ports: Option<String>,
    pub exclude_outbound_ports: Option<String>,
    pub virtual_interfaces: Option<String>,
    pub exclude_interfaces: Option<String>,
    pub status_port: String,
}

fn nonempty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

impl TrafficSettings {
    /// From the config alone (what a pod without annotations gets).
    pub fn from_values(cfg: &Config) -> Self {
        Self::resolve(cfg, &BTreeMap::new(), &serde_json::Map::new())
    }

    /// Annotation if present, else value. `proxy_config` supplies the interception mode default.
    pub fn resolve(
        cfg: &Config,
        ann: &BTreeMap<String, String>,
        proxy_config: &serde_json::Map<String, serde_json::Value>,
    ) -> Self {
        let a = |k: &str, default: &str| ann.get(k).cloned().unwrap_or_else(|| default.to_owned());
        let mode_default = proxy_config
            .get("interceptionMode")
            .and_then(|v| v.as_str())
            .unwrap_or("REDIRECT");
        let p = &cfg.proxy;
        TrafficSettings {
            mode: a(INTERCEPTION_MODE, mode_default),
            include_ip_ranges: a(INCLUDE_OUTBOUND_IP_RANGES, &p.include_ip_ranges),
            exclude_ip_ranges: a(EXCLUDE_OUTBOUND_IP_RANGES, &p.exclude_ip_ranges),
            include_inbound_ports: a(INCLUDE_INBOUND_PORTS, &p.include_inbound_ports),
            exclude_inbound_ports: a(EXCLUDE_INBOUND_PORTS, &p.exclude_inbound_ports),
            include_outbound_ports: ann
                .get(INCLUDE_OUTBOUND_PORTS)
                .cloned()
                .or_else(|| nonempty(&p.include_outbound_ports)),
            exclude_outbound_ports: ann
                .get(EXCLUDE_OUTBOUND_PORTS)
                .cloned()
                .or_else(|| nonempty(&p.exclude_outbound_ports)),
            // The newer name wins when both are set.
            virtual_interfaces: ann
                .get(REROUTE_VIRTUAL_INTERFACES)
                .or_else(|| ann.get(KUBEVIRT_INTERFACES))
                .cloned(),
            exclude_interfaces: ann.get(EXCLUDE_INTERFACES).cloned(),
            status_port: a(STATUS_PORT, &p.status_port.to_string()),
        }
    }

    /// `-d`: 15090 and 15021 always, then the excluded ports, then the status port unless it is
    /// already listed or 0 (Istio's `excludeInboundPort`).
    pub fn inbound_exclusions(&self) -> String {
        let status = self.status_port.trim();
        let mut ports: Vec<&str> = self
            .exclude_inbound_ports
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        let listed = ports.contains(&status);
        if !status.is_empty() && status != "0" && !listed {
            ports.push(status);
        }
        let extra = if listed {
            self.exclude_inbound_ports.clone()
        } else {
            ports.join(",")
        };
        if extra.is_empty() {
            "15090,15021".into()
        } else {
            format!("15090,15021,{extra}")
        }
    }

    /// The `istio-init` argument list (Istio's template, flag for flag).
    pub fn init_args(&self, cfg: &Config, uid: &str, log_level: &str) -> Vec<String> {
        let mut args: Vec<String> = [
            "istio-iptables",
            "-p",
            &cfg.proxy_listen_port.to_string(),
            "-z",
            &cfg.proxy_inbound_listen_port.to_string(),
            "-u",
            uid,
            "-m",
            &self.mode,
            "-i",
            &self.include_ip_ranges,
            "-x",
            &self.exclude_ip_ranges,
            "-b",
            &self.include_inbound_ports,
            "-d",
            &self.inbound_exclusions(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        for (flag, v) in [
            ("-q", &self.include_outbound_ports),
            ("-o", &self.exclude_outbound_ports),
            ("-k", &self.virtual_interfaces),
            ("-c", &self.exclude_interfaces),
        ] {
            if let Some(v) = v {
                args.extend([flag.to_owned(), v.clone()]);
            }
        }
        args.push(format!("--log_output_level={log_level}"));
        if cfg.log_as_json {
            args.push("--log_as_json".into());
        }
        if cfg.cni_enabled {
            args.extend(["--run-validation".into(), "--skip-rule-apply".into()]);
        }
        args
    }

    /// Check each setting with `ferry-init`'s own parser, so the injector can never emit an
    /// argument the init container would reject. The error names the annotation.
    pub fn validate(&self) -> Result<(), Invalid> {
        use ferry_init::config::Args;
        type Set = fn(&mut Args, String);
        let checks: [(&str, &str, Option<&String>, Set); 8] = [
            (
                INCLUDE_OUTBOUND_IP_RANGES,
                "includeIPRanges",
                Some(&self.include_ip_ranges),
                |a, v| a.outbound_ranges = Some(v),
            ),
            (
                EXCLUDE_OUTBOUND_IP_RANGES,
                "excludeIPRanges",
                Some(&self.exclude_ip_ranges),
                |a, v| a.outbound_exclude_ranges = Some(v),
            ),
            (
                INCLUDE_INBOUND_PORTS,
                "includeInboundPorts",
                Some(&self.include_inbound_ports),
                |a, v| a.inbound_ports = Some(v),
            ),
            (
                EXCLUDE_INBOUND_PORTS,
                "excludeInboundPorts",
                Some(&self.exclude_inbound_ports),
                |a, v| a.inbound_exclude_ports = Some(v),
            ),
            (
                EXCLUDE_OUTBOUND_PORTS,
                "excludeOutboundPorts",
                self.exclude_outbound_ports.as_ref(),
                |a, v| a.outbound_exclude_ports = Some(v),
            ),
            (
                INCLUDE_OUTBOUND_PORTS,
                "includeOutboundPorts",
                self.include_outbound_ports.as_ref(),
                |a, v| a.outbound_ports = Some(v),
            ),
            (
                EXCLUDE_INTERFACES,
                "excludeInterfaces",
                self.exclude_interfaces.as_ref(),
                |a, v| a.exclude_interfaces = Some(v),
            ),
            (
                REROUTE_VIRTUAL_INTERFACES,
                "rerouteVirtualInterfaces",
                self.virtual_interfaces.as_ref(),
                |a, v| a.kube_virt_interfaces = Some(v),
            ),
        ];
        let env = std::collections::HashMap::new();
        for (name, param, value, set) in checks {
            let Some(value) = value else { continue };
            // One setting at a time through ferry-init's own validation, so the error names the
            // annotation. `-u` is given so the check never looks up the proxy user.
            let mut args = Args {
                proxy_uid: Some("1337".into()),
                ..Args::default()
            };
            set(&mut args, value.clone());
            ferry_init::config::Config::from_args(&args, &env).map_err(|e| Invalid {
                name: name.into(),
                value: value.clone(),
                param: param.into(),
                reason: e.to_string(),
            })?;
        }
        if !matches!(self.mode.as_str(), "REDIRECT" | "TPROXY" | "NONE") {
            return Err(Invalid {
                name: INTERCEPTION_MODE.into(),
                value: self.mode.clone(),
                param: "interceptionMode".into(),
                reason: "expected REDIRECT, TPROXY or NONE".into(),
            });
        }
        self.status_port
            .trim()
            .parse::<u16>()
            .map_err(|_| Invalid {
                name: STATUS_PORT.into(),
                value: self.status_port.clone(),
                param: "statusPort".into(),
                reason: "expected a port number (0 disables the proxy's probes)".into(),
            })?;
        Ok(())
    }
}

/// Every other validated annotation: readiness numbers, resources, booleans, ProxyConfig.
pub fn validate_others(ann: &BTreeMap<String, String>) -> Result<(), Invalid> {
    let fail = |name: &str, param: &str, reason: String| Invalid {
        name: name.into(),
        value: ann.get(name).cloned().unwrap_or_default(),
        param: param.into(),
        reason,
    };
    for (name, param) in [
        (READINESS_INITIAL_DELAY, "initialDelaySeconds"),
        (READINESS_PERIOD, "periodSeconds"),
        (READINESS_FAILURE_THRESHOLD, "failureThreshold"),
    ] {
        if let Some(v) = ann.get(name)
            && v.trim().parse::<u32>().is_err()
        {
            return Err(fail(name, param, "expected a non-negative integer".into()));
        }
    }
    for (name, param) in [
        (PROXY_CPU, "proxyCPU"),
        (PROXY_MEMORY, "proxyMemory"),
        (PROXY_CPU_LIMIT, "proxyCPULimit"),
        (PROXY_MEMORY_LIMIT, "proxyMemoryLimit"),
    ] {
        if let Some(v) = ann.get(name)
            && crate::quantity::canonical(v).is_none()
        {
            return Err(fail(
                name,
                param,
                "expected a resource quantity (e.g. 100m, 128Mi)".into(),
            ));
        }
    }
    for (name, param) in [
        (MERGE_METRICS, "mergeMetrics"),
        (REWRITE_PROBES, "rewriteAppHTTPProbers"),
        (NATIVE_SIDECAR, "nativeSidecar"),
    ] {
        if let Some(v) = ann.get(name)
            && ferry_init::config::parse_bool(v).is_none()
        {
            return Err(fail(name, param, "expected true or false".into()));
        }
    }
    if let Some(v) = ann.get(PROXY_CONFIG) {
        crate::proxyconfig::parse_annotation(v)
            .map_err(|e| fail(PROXY_CONFIG, "proxyConfig", e))?;
    }
    Ok(())
}

/// Go's `strconv.ParseBool` of an annotation, if it is set and parses.
pub fn bool_annotation(ann: &BTreeMap<String, String>, name: &str) -> Option<bool> {
    ann.get(name)
        .and_then(|v| ferry_init::config::parse_bool(v))
}
