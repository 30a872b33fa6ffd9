//! `ferry-lab`: a one-machine miniature cluster that plays Kubernetes' roles for the mesh.
//!
//! - API server: the in-repo fake ([`crate::fake_apiserver`]) on a Unix socket (for the command
//!   line) and on the node's address (for the proxies' kube-rs clients, via a kubeconfig).
//! - Admission: Pod creation goes through the real `ferry-injector` over HTTPS, as the API
//!   server calls a MutatingWebhookConfiguration (selectors, caBundle, service DNS name).
//! - Kubelet: each Pod is a network namespace on a bridge inside the lab's node namespace; init
//!   containers run to completion, native sidecars and containers are supervised, readiness and
//!   startup probes are run, the downward API is filled in, `runAsUser` is honoured.
//! - Controllers: Deployments, ClusterIPs, EndpointSlices, per-pod hosts files (DNS) and
//!   kube-proxy DNAT rules in the node namespace.
//!
//! Everything the lab creates is named after it (`flab-<name>-…` namespaces, a state directory),
//! so `down` (or the next `up`) removes it even after a crash. The host's own network namespace is
//! never changed.

pub mod cli;
pub mod client;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod echo;
pub mod kubelet;
pub mod model;
pub mod net;
pub mod testing;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// The node's address on the pod bridge (kubelet, API server, webhook).
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// Pods get 10.244.0.2 and up (a /16 on the bridge).
pub const POD_PREFIX: u8 = 16;
/// ClusterIPs are 10.96.0.10 and up.
pub const SERVICE_BASE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 0);
pub const API_PORT: u16 = 6443;
/// istiod's webhook port; the `istiod` Service maps 443 to it.
pub const WEBHOOK_PORT: u16 = 15017;
pub const NODE_NAME: &str = "lab-node";

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unsupported(String),
    /// The API server refused a request; the message is its `Status` message.
    #[error("{0}")]
    Api(String),
    /// The lab is not in the state the command needs (not running, already running...).
    #[error("{0}")]
    State(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed: {msg}")]
    Command { cmd: String, msg: String },
}

pub fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

/// One lab: its name and where it keeps its state.
#[derive(Clone, Debug)]
pub struct Lab {
    pub name: String,
    pub dir: PathBuf,
    /// Where this workspace's binaries are (next to `ferry-lab`).
    pub bin_dir: PathBuf,
}

impl Lab {
    /// `name`: 1-8 lowercase letters/digits (it becomes part of network namespace and interface
    /// names). `state_root`: default `/run/ferry-lab`.
    pub fn new(name: &str, state_root: Option<&Path>, bin_dir: PathBuf) -> Result<Lab, LabError> {
        if name.is_empty()
            || name.len() > 8
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(LabError::Invalid(format!(
                "lab name {name:?}: use 1-8 lowercase letters or digits"
            )));
        }
        let root = state_root.unwrap_or(Path::new("/run/ferry-lab"));
        Ok(Lab {
            name: name.to_owned(),
            dir: root.join(name),
            bin_dir,
        })
    }

    /// Prefix of every network namespace (and `/etc/netns` directory) of this lab.
    pub fn prefix(&self) -> String {
        format!("flab-{}-", self.name)
    }
    pub fn node_ns(&self) -> String {
        format!("{}node", self.prefix())
    }
    /// A pod's network namespace, named after its address.
    pub fn pod_ns(&self, ip: Ipv4Addr) -> String {
        let o = ip.octets();
        format!("{}{}-{}", self.prefix(), o[2], o[3])
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("daemon.pid")
    }
    pub fn ready_file(&self) -> PathBuf {
        self.dir.join("ready")
    }
    pub fn daemon_log(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }
    pub fn log_path(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        self.dir
            .join("logs")
            .join(format!("{namespace}_{pod}_{container}.log"))
    }
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
    /// The network namespace a pod with this status runs in.
    pub fn netns_of(&self, pod: &serde_json::Value) -> Option<String> {
        if pod["spec"]["hostNetwork"] == serde_json::json!(true) {
            return Some(self.node_ns());
        }
        let ip: Ipv4Addr = pod["status"]["podIP"].as_str()?.parse().ok()?;
        Some(self.pod_ns(ip))
    }
    /// PATH inside the lab's containers: this workspace's binaries first.
    pub fn path_env(&self) -> String {
        format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            self.bin_dir.display()
        )
    }
}
