//! The injector's configuration file (the chart mounts it from a ConfigMap). Field names follow
//! Istio's Helm values where Istio has one; defaults are Istio's chart defaults. Unknown fields are
//! rejected so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::selector::LabelSelector;

/// Default image for both injected containers (one static binary answering to `istio-iptables`,
/// `pilot-agent` and `proxy`).
pub const DEFAULT_PROXY_IMAGE: &str = "ghcr.io/ferry-mesh/ferry-proxy:0.1.0";

/// `global.proxy.autoInject`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Inject unless the pod opts out.
    #[default]
    Enabled,
    /// Inject only pods that opt in.
    Disabled,
    /// Any other value in Istio's config: never inject (only reachable from Istio-style tables;
    /// our config file rejects it).
    #[serde(skip)]
    Off,
}

impl Policy {
    /// Istio's reading of the policy string: anything but enabled/disabled turns injection off.
    pub fn from_istio(s: &str) -> Policy {
        match s {
            "enabled" => Policy::Enabled,
            "disabled" => Policy::Disabled,
            _ => Policy::Off,
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::Enabled => "enabled (inject unless the pod opts out)",
            Policy::Disabled => "disabled (inject only pods that opt in)",
            Policy::Off => "invalid (injection off)",
        })
    }
}

/// `global.proxy.startupProbe`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct StartupProbe {
    pub enabled: bool,
    pub failure_threshold: i32,
}

impl Default for StartupProbe {
    fn default() -> Self {
        StartupProbe {
            enabled: true,
            failure_threshold: 600,
        }
    }
}

/// Requests/limits, as quantities.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

/// `global.proxy`: the knobs of the injected containers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ProxyValues {
    #[serde(rename = "includeIPRanges")]
    pub include_ip_ranges: String,
    #[serde(rename = "excludeIPRanges")]
    pub exclude_ip_ranges: String,
    pub include_inbound_ports: String,
    pub exclude_inbound_ports: String,
    pub include_outbound_ports: String,
    pub exclude_outbound_ports: String,
    pub status_port: u16,
    pub log_level: String,
    pub component_log_level: String,
    pub hold_application_until_proxy_starts: bool,
    pub privileged: bool,
    pub readiness_initial_delay_seconds: i32,
    pub readiness_period_seconds: i32,
    pub readiness_failure_threshold: i32,
    pub startup_probe: StartupProbe,
    pub resources: Resources,
    pub cluster_domain: String,
    pub cap_net_bind_service: bool,
}

impl Default for ProxyValues {
    fn default() -> Self {
        ProxyValues {
            include_ip_ranges: "*".into(),
            exclude_ip_ranges: String::new(),
            include_inbound_ports: "*".into(),
            exclude_inbound_ports: String::new(),
            include_outbound_ports: String::new(),
            exclude_outbound_ports: String::new(),
            status_port: 15020,
            log_level: "warning".into(),
            component_log_level: "misc:error".into(),
            hold_application_until_proxy_starts: false,
            privileged: false,
            readiness_initial_delay_seconds: 0,
            readiness_period_seconds: 15,
            readiness_failure_threshold: 4,
            startup_probe: StartupProbe::default(),
            resources: Resources {
                requests: [
                    ("cpu".into(), "100m".into()),
                    ("memory".into(), "128Mi".into()),
                ]
                .into(),
                limits: [("cpu".into(), "2".into()), ("memory".into(), "1Gi".into())].into(),
            },
            cluster_domain: "cluster.local".into(),
            cap_net_bind_service: false,
        }
    }
}

/// The whole configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Config {
    /// `enabled` or `disabled` (`global.proxy.autoInject`).
    pub policy: Policy,
    pub never_inject_selector: Vec<LabelSelector>,
    pub always_inject_selector: Vec<LabelSelector>,
    /// Native sidecars (istio-proxy as a restartable init container; Kubernetes >= 1.29).
    /// Istio's `ENABLE_NATIVE_SIDECARS`; the pod annotation `sidecar.istio.io/nativeSidecar` wins.
    pub native_sidecars: bool,
    /// Control-plane revision ("" = default).
    pub revision: String,
    /// Rewrite app HTTP/TCP/gRPC probes to the agent port (`sidecarInjectorWebhook.rewriteAppHTTPProbe`).
    #[serde(rename = "rewriteAppHTTPProbe")]
    pub rewrite_app_http_probe: bool,
    /// Extra annotations put on every injected pod.
    pub injected_annotations: BTreeMap<String, String>,
    /// Image of the `istio-proxy` container.
    pub proxy_image: String,
    /// Image of the `istio-init` container (default: the proxy image).
    pub proxy_init_image: Option<String>,
    pub image_pull_policy: Option<String>,
    pub image_pull_secrets: Vec<String>,
    pub proxy: ProxyValues,
    /// `global.logging.level`.
    pub logging_level: String,
    pub log_as_json: bool,
    pub pilot_cert_provider: String,
    pub ca_address: String,
    pub istio_namespace: String,
    /// `global.multiCluster.clusterName`.
    pub cluster_name: String,
    pub network: String,
    #[serde(rename = "meshID")]
    pub mesh_id: String,
    pub trust_domain: String,
    /// `global.sds.token.aud`.
    pub sds_token_audience: String,
    /// Istio CNI installed: validate instead of programming iptables (`istio-validation`).
    pub cni_enabled: bool,
    /// `meshConfig.defaultConfig` (ProxyConfig), merged under the pod's `proxy.istio.io/config`.
    pub default_proxy_config: serde_json::Map<String, serde_json::Value>,
    /// `meshConfig.proxyListenPort` / `proxyInboundListenPort`.
    pub proxy_listen_port: u16,
    pub proxy_inbound_listen_port: u16,
    /// `meshConfig.enablePrometheusMerge`.
    pub enable_prometheus_merge: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            policy: Policy::Enabled,
            never_inject_selector: vec![],
            always_inject_selector: vec![],
            native_sidecars: true,
            revision: String::new(),
            rewrite_app_http_probe: true,
            injected_annotations: BTreeMap::new(),
            proxy_image: DEFAULT_PROXY_IMAGE.into(),
            proxy_init_image: None,
            image_pull_policy: None,
            image_pull_secrets: vec![],
            proxy: ProxyValues::default(),
            logging_level: "default:info".into(),
            log_as_json: false,
            pilot_cert_provider: "istiod".into(),
            ca_address: String::new(),
            istio_namespace: "istio-system".into(),
            cluster_name: String::new(),
            network: String::new(),
            mesh_id: String::new(),
            trust_domain: "cluster.local".into(),
            sds_token_audience: "istio-ca".into(),
            cni_enabled: false,
            default_proxy_config: serde_json::Map::new(),
            proxy_listen_port: 15001,
            proxy_inbound_listen_port: 15006,
            enable_prometheus_merge: true,
        }
    }
}

/// The configuration file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{path}: {field}: {reason}")]
    Invalid {
        path: String,
        field: String,
        reason: String,
    },
}

impl Config {
    /// Parse and validate a config file's text.
    pub fn parse(text: &str, path: &str) -> Result<Config, Error> {
        let cfg: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_yaml::from_str(text).map_err(|source| Error::Parse {
                path: path.into(),
                source,
            })?
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Config, Error> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: p.clone(),
            source,
        })?;
        Config::parse(&text, &p)
    }

    fn validate(&self, path: &str) -> Result<(), Error> {
        let invalid = |field: &str, reason: String| Error::Invalid {
            path: path.into(),
            field: field.into(),
            reason,
        };
        for (name, list) in [
            ("neverInjectSelector", &self.never_inject_selector),
            ("alwaysInjectSelector", &self.always_inject_selector),
        ] {
            for (i, s) in list.iter().enumerate() {
                s.validate()
                    .map_err(|e| invalid(&format!("{name}[{i}]"), e.to_string()))?;
            }
        }
        if self.proxy_image.trim().is_empty() {
            return Err(invalid("proxyImage", "must not be empty".into()));
        }
        // The values that become istio-init arguments must be ones istio-iptables accepts.
        let traffic = crate::annotations::TrafficSettings::from_values(self);
        traffic
            .validate()
            .map_err(|e| invalid("proxy", e.to_string()))?;
        for (side, map) in [
            ("requests", &self.proxy.resources.requests),
            ("limits", &self.proxy.resources.limits),
        ] {
            for (k, v) in map {
                if crate::quantity::canonical(v).is_none() {
                    return Err(invalid(
                        &format!("proxy.resources.{side}.{k}"),
                        format!("{v:?} is not a quantity"),
                    ));
                }
            }
        }
        crate::proxyconfig::validate(&serde_json::Value::Object(
            self.default_proxy_config.clone(),
        ))
        .map_err(|e| invalid("defaultProxyConfig", e))?;
        Ok(())
    }

    pub fn init_image(&self) -> &str {
        self.proxy_init_image
            .as_deref()
            .unwrap_or(&self.proxy_image)
    }
}
