//! Configuration: the arguments and environment Istio's injection template gives `istio-proxy`
//! (`proxy sidecar --domain ... --proxyLogLevel=... --log_output_level=...`, POD_NAME,
//! POD_NAMESPACE, INSTANCE_IP, PROXY_CONFIG, ...), plus ferry's own settings. Everything is
//! validated before anything binds; errors name the setting.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use ferry_init::spec;

/// The command line. Unknown Istio flags are accepted (`--ignored` collects them) so a pod
/// injected the Istio way starts unchanged.
#[derive(Parser, Debug, Default, Clone)]
#[command(
    name = "ferry-proxy",
    version,
    about = "ferry's sidecar proxy (answers to Istio's `pilot-agent proxy sidecar ...`)"
)]
pub struct Args {
    /// `proxy` (Istio's first argument), or `request`/`wait` (pilot-agent's helper commands)
    #[arg(value_name = "COMMAND")]
    pub command: Option<String>,
    /// `sidecar` (or `router` for a gateway, not supported yet)
    #[arg(value_name = "TYPE")]
    pub kind: Option<String>,
    /// DNS domain of the pod's namespace (`$(POD_NAMESPACE).svc.cluster.local`)
    #[arg(long)]
    pub domain: Option<String>,
    /// Envoy log level (mapped onto the proxy's log level)
    #[arg(long = "proxyLogLevel")]
    pub proxy_log_level: Option<String>,
    /// Accepted for compatibility
    #[arg(long = "proxyComponentLogLevel")]
    pub proxy_component_log_level: Option<String>,
    /// Istio log levels, `scope:level,...`
    #[arg(long = "log_output_level")]
    pub log_output_level: Option<String>,
    #[arg(long = "log_as_json", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub log_as_json: Option<String>,
    /// Worker threads (Istio's --concurrency; 0 = one per core) [env: ISTIO_META_CONCURRENCY / PROXY_CONFIG.concurrency]
    #[arg(long)]
    pub concurrency: Option<String>,
    #[arg(long = "stsPort", hide = true)]
    pub sts_port: Option<String>,
    #[arg(long = "outlierLogPath", hide = true)]
    pub outlier_log_path: Option<String>,
    /// Directory of Kubernetes-style YAML (Services, EndpointSlices, Pods, Istio resources) to
    /// discover from instead of (or before) the Kubernetes API [env: FERRY_CONFIG_DIR]
    #[arg(long = "config-dir", env = "FERRY_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
    /// ALLOW_ANY (unknown destinations pass through) or REGISTRY_ONLY [env: FERRY_OUTBOUND_TRAFFIC_POLICY]
    #[arg(
        long = "outbound-traffic-policy",
        env = "FERRY_OUTBOUND_TRAFFIC_POLICY"
    )]
    pub outbound_traffic_policy: Option<String>,
    /// How long to wait for the first byte before treating a connection as opaque TCP
    #[arg(
        long = "protocol-detection-timeout",
        env = "FERRY_PROTOCOL_DETECTION_TIMEOUT"
    )]
    pub protocol_detection_timeout: Option<String>,
    /// Graceful drain deadline after SIGTERM (Istio's terminationDrainDuration) [default: 5s]
    #[arg(long = "drain-duration", env = "TERMINATION_DRAIN_DURATION_SECONDS")]
    pub drain_duration: Option<String>,
    /// JSON access log on stdout [env: FERRY_ACCESS_LOG]
    #[arg(long = "access-log", env = "FERRY_ACCESS_LOG", num_args = 0..=1, default_missing_value = "true")]
    pub access_log: Option<String>,
    /// kubeconfig for discovery from the Kubernetes API [env: KUBECONFIG]; in a pod the
    /// in-cluster configuration is used. `--no-kube` turns API discovery off.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    #[arg(long = "no-kube", env = "FERRY_NO_KUBE")]
    pub no_kube: bool,
    /// Admin address (config dump, loopback only) [default: 127.0.0.1:15000]
    #[arg(long = "admin-addr", env = "FERRY_ADMIN_ADDR")]
    pub admin_addr: Option<String>,
    /// CPU scheduling policy of the proxy's threads: `batch` (Linux SCHED_BATCH: a woken proxy
    /// does not preempt the app it shares a CPU with, so it handles queued work in batches) or
    /// `normal` (SCHED_OTHER) [default: batch]
    #[arg(long = "scheduling", env = "FERRY_SCHEDULING")]
    pub scheduling: Option<String>,
    /// Send HTTP/1.1 requests to endpoints whose sidecar captures the port over one shared
    /// HTTP/2 connection per endpoint; the peer sidecar gives the app HTTP/1.1 again. `false`
    /// keeps a connection per client connection [default: true]
    #[arg(long = "multiplex-peers", env = "FERRY_MULTIPLEX_PEERS")]
    pub multiplex_peers: Option<String>,
}

/// Reads the environment; a map in tests.
pub trait Env {
    fn get(&self, k: &str) -> Option<String>;
}

pub struct ProcessEnv;
impl Env for ProcessEnv {
    fn get(&self, k: &str) -> Option<String> {
        std::env::var(k).ok().filter(|v| !v.is_empty())
    }
}
impl Env for HashMap<String, String> {
    fn get(&self, k: &str) -> Option<String> {
        HashMap::get(self, k).cloned()
    }
}

/// Bad configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {setting} {value:?}: {reason}")]
pub struct Error {
    pub setting: String,
    pub value: String,
    pub reason: String,
}

fn bad(setting: &str, value: &str, reason: impl Into<String>) -> Error {
    Error {
        setting: setting.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

/// What to do with traffic to destinations not in the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboundPolicy {
    AllowAny,
    RegistryOnly,
}

/// The listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    pub outbound: u16,
    pub inbound: u16,
    pub health: u16,
    pub prometheus: u16,
    pub status: u16,
    pub admin: SocketAddr,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub pod_name: String,
    pub pod_namespace: String,
    pub instance_ips: Vec<IpAddr>,
    pub service_account: String,
    pub workload_name: String,
    pub app_containers: Vec<String>,
    pub cluster_domain: String,
    pub workers: usize,
    pub ports: Ports,
    pub outbound_policy: OutboundPolicy,
    pub detection_timeout: Duration,
    pub drain: Duration,
    pub access_log: bool,
    pub log_filter: String,
    pub log_json: bool,
    pub config_dir: Option<PathBuf>,
    /// Discover from the Kubernetes API: `Some(None)` in-cluster, `Some(Some(path))` kubeconfig.
    pub kube: Option<Option<PathBuf>>,
    /// `ISTIO_KUBE_APP_PROBERS`: rewritten probe path → original action.
    pub app_probers: BTreeMap<String, serde_json::Value>,
    /// `PROXY_CONFIG` as given (shown in the config dump).
    pub proxy_config: serde_json::Value,
    /// Gateway mode (`proxy router`): no traffic capture; listens on the ports of the Gateways
    /// that select this pod.
    pub router: bool,
    pub scheduling: Scheduling,
    /// HTTP/1.1 to peer sidecars over shared HTTP/2 connections.
    pub multiplex_peers: bool,
}

/// The CPU scheduling policy the proxy asks for at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheduling {
    /// SCHED_BATCH. Measured in the benchmark suite: with the app and both sidecars on one
    /// CPU, normal wake-up preemption made HTTP/2 at saturation run in lock-step (about one
    /// context switch per request per proxy, 2-3x the CPU per request); batch keeps the proxy
    /// handling every ready connection per wake-up. Latency at 1,000 rps was unchanged.
    Batch,
    /// SCHED_OTHER, the default of every process.
    Normal,
}

fn duration(setting: &str, v: &str) -> Result<Duration, Error> {
    ferry_init::config::parse_duration(v)
        .or_else(|| v.parse::<u64>().ok().map(Duration::from_secs))
        .ok_or_else(|| bad(setting, v, "expected a duration like 100ms, 5s or 1m"))
}

fn port(setting: &str, v: &serde_json::Value) -> Result<u16, Error> {
    v.as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| bad(setting, &v.to_string(), "expected a port number"))
}

/// Istio's `--log_output_level` as a tracing filter.
fn log_filter(args: &Args) -> String {
    ferry_init::config::istio_log_level(args.log_output_level.as_deref()).to_owned()
}

impl Config {
    pub fn from_args(args: &Args, env: &dyn Env) -> Result<Config, Error> {
        match args.command.as_deref() {
            None | Some("proxy") => {}
            Some(other) => return Err(bad("command", other, "expected `proxy sidecar`")),
        }
        let router = match args.kind.as_deref() {
            None | Some("sidecar") => false,
            // Istio's gateways run `pilot-agent proxy router`.
            Some("router") => true,
            Some(mode) => {
                return Err(bad(
                    "proxy type",
                    mode,
                    "expected `sidecar` or `router` (a gateway)",
                ));
            }
        };
        let proxy_config: serde_json::Value = match env.get("PROXY_CONFIG") {
            Some(s) => serde_json::from_str(&s)
                .map_err(|e| bad("PROXY_CONFIG", &s, format!("not JSON: {e}")))?,
            None => serde_json::json!({}),
        };
        let status = match proxy_config.get("statusPort") {
            Some(v) => port("PROXY_CONFIG.statusPort", v)?,
            None => spec::STATUS_PORT,
        };
        let workers = match args
            .concurrency
            .clone()
            .or_else(|| proxy_config.get("concurrency").map(|v| v.to_string()))
        {
            Some(c) => c.trim().parse::<usize>().map_err(|_| {
                bad(
                    "--concurrency",
                    &c,
                    "expected a number of threads (0 = one per core)",
                )
            })?,
            None => 2,
        };
        let workers = if workers == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        } else {
            workers
        };
        let outbound_policy = match args
            .outbound_traffic_policy
            .as_deref()
            .unwrap_or("ALLOW_ANY")
        {
            "ALLOW_ANY" => OutboundPolicy::AllowAny,
            "REGISTRY_ONLY" => OutboundPolicy::RegistryOnly,
            other => {
                return Err(bad(
                    "--outbound-traffic-policy",
                    other,
                    "expected ALLOW_ANY or REGISTRY_ONLY",
                ));
            }
        };
        let detection_timeout = duration(
            "--protocol-detection-timeout",
            args.protocol_detection_timeout
                .as_deref()
                .unwrap_or("100ms"),
        )?;
        let drain = duration(
            "--drain-duration",
            args.drain_duration.as_deref().unwrap_or("5s"),
        )?;
        let admin_raw = args
            .admin_addr
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:{}", spec::ADMIN_PORT));
        let admin: SocketAddr = admin_raw
            .parse()
            .map_err(|_| bad("--admin-addr", &admin_raw, "expected IP:PORT"))?;
        if !admin.ip().is_loopback() {
            return Err(bad(
                "--admin-addr",
                &admin_raw,
                "the admin endpoint is served on loopback only",
            ));
        }
        let mut instance_ips = Vec::new();
        if let Some(ips) = env.get("INSTANCE_IP") {
            for ip in ips.split(',').filter(|s| !s.is_empty()) {
                instance_ips.push(
                    ip.trim()
                        .parse()
                        .map_err(|_| bad("INSTANCE_IP", &ips, "expected IP addresses"))?,
                );
            }
        }
        let app_probers = match env.get("ISTIO_KUBE_APP_PROBERS") {
            Some(s) => match serde_json::from_str::<serde_json::Value>(&s) {
                Ok(serde_json::Value::Object(m)) => m.into_iter().collect(),
                _ => return Err(bad("ISTIO_KUBE_APP_PROBERS", &s, "expected a JSON object")),
            },
            None => BTreeMap::new(),
        };
        let flag = |v: &Option<String>| {
            v.as_deref()
                .and_then(ferry_init::config::parse_bool)
                .unwrap_or(false)
        };
        let pod_namespace = env.get("POD_NAMESPACE").unwrap_or_else(|| "default".into());
        let cluster_domain = args
            .domain
            .as_deref()
            .and_then(|d| d.split_once(".svc.").map(|(_, cd)| cd.to_owned()))
            .unwrap_or_else(|| "cluster.local".into());
        let ports = Ports {
            outbound: spec::OUTBOUND_CAPTURE_PORT,
            inbound: spec::INBOUND_CAPTURE_PORT,
            health: spec::HEALTH_PORT,
            prometheus: spec::PROMETHEUS_PORT,
            status,
            admin,
        };
        let scheduling = match args.scheduling.as_deref().unwrap_or("batch") {
            "batch" => Scheduling::Batch,
            "normal" => Scheduling::Normal,
            other => {
                return Err(bad(
                    "--scheduling",
                    other,
                    "expected batch (SCHED_BATCH) or normal (SCHED_OTHER)",
                ));
            }
        };
        let multiplex_peers = match args.multiplex_peers.as_deref() {
            None => true,
            Some(v) => ferry_init::config::parse_bool(v)
                .ok_or_else(|| bad("--multiplex-peers", v, "expected true or false"))?,
        };
        let mut cfg = Config {
            pod_name: env.get("POD_NAME").unwrap_or_default(),
            pod_namespace,
            instance_ips,
            service_account: env
                .get("SERVICE_ACCOUNT")
                .unwrap_or_else(|| "default".into()),
            workload_name: env.get("ISTIO_META_WORKLOAD_NAME").unwrap_or_default(),
            app_containers: env
                .get("ISTIO_META_APP_CONTAINERS")
                .map(|s| s.split(',').map(str::to_owned).collect())
                .unwrap_or_default(),
            cluster_domain,
            workers,
            ports,
            outbound_policy,
            detection_timeout,
            drain,
            access_log: flag(&args.access_log),
            log_filter: log_filter(args),
            log_json: flag(&args.log_as_json),
            config_dir: args.config_dir.clone(),
            kube: if args.no_kube {
                None
            } else if let Some(k) = &args.kubeconfig {
                Some(Some(k.clone()))
            } else if env.get("KUBERNETES_SERVICE_HOST").is_some() {
                Some(None)
            } else {
                None
            },
            app_probers,
            proxy_config,
            router,
            scheduling,
            multiplex_peers,
        };
        // Ports overridable for tests and non-standard setups (Istio has no names for these).
        for (name, slot) in [
            ("FERRY_OUTBOUND_PORT", &mut cfg.ports.outbound),
            ("FERRY_INBOUND_PORT", &mut cfg.ports.inbound),
            ("FERRY_HEALTH_PORT", &mut cfg.ports.health),
            ("FERRY_PROMETHEUS_PORT", &mut cfg.ports.prometheus),
        ] {
            if let Some(v) = env.get(name) {
                *slot = v
                    .parse()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad(name, &v, "expected a port number"))?;
            }
        }
        let p = cfg.ports;
        let all = [p.outbound, p.inbound, p.health, p.prometheus, p.status];
        for (i, a) in all.iter().enumerate() {
            if all[i + 1..].contains(a) {
                return Err(bad(
                    "ports",
                    &format!("{all:?}"),
                    format!("port {a} is used twice"),
                ));
            }
        }
        Ok(cfg)
    }

    /// The proxy's own listener ports: an original destination on one of them is a loop.
    pub fn own_ports(&self) -> [u16; 5] {
        let p = self.ports;
        [p.outbound, p.inbound, p.health, p.prometheus, p.status]
    }
}
