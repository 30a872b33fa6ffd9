//! Service discovery: Kubernetes objects (Services, EndpointSlices, Pods; the Istio resources are
//! kept for routing) compiled into an immutable [`Snapshot`], swapped atomically on change. Sources:
//! a directory of YAML files (hot reloaded; standalone use and tests) or, later, the API server.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use crate::k8s_objects::{EndpointSlice, IntOrString, Pod, Service as K8sService};
use serde::Deserialize;
use serde_json::Value;

/// Application protocol of a port, as Istio derives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tcp,
    Tls,
    /// Not declared: sniff the first bytes.
    Unknown,
}

impl Protocol {
    /// Istio's rule: `appProtocol` if set, else the port name's prefix before `-` (`http-web`,
    /// `grpc`, `tcp-db`, `mysql`, ...).
    pub fn of_port(name: Option<&str>, app_protocol: Option<&str>) -> Protocol {
        let from = |s: &str| -> Protocol {
            let s = s.to_ascii_lowercase();
            match s.as_str() {
                "kubernetes.io/h2c" => return Protocol::Http2,
                "kubernetes.io/ws" | "kubernetes.io/wss" => return Protocol::Http,
                _ => {}
            }
            match s.split('-').next().unwrap_or("") {
                "http" => Protocol::Http,
                "http2" | "h2c" => Protocol::Http2,
                "grpc" => Protocol::Grpc,
                "https" | "tls" => Protocol::Tls,
                "tcp" | "mysql" | "mysqlx" | "mongo" | "redis" | "postgres" | "postgresql"
                | "kafka" | "zookeeper" | "memcached" | "smtp" | "amqp" => Protocol::Tcp,
                _ => Protocol::Unknown,
            }
        };
        match app_protocol.map(from) {
            Some(p) if p != Protocol::Unknown => p,
            _ => name.map(from).unwrap_or(Protocol::Unknown),
        }
    }

    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }
}

/// Ports where the server speaks first: never wait for the client's first byte there.
pub const SERVER_FIRST_PORTS: &[u16] = &[
    21, 22, 25, 110, 143, 465, 587, 993, 995, 3306, 5432, 6379, 11211, 27017,
];

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target_port: Option<u16>,
    pub target_port_name: Option<String>,
    pub protocol: Protocol,
}

/// An endpoint of a service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub pod: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// The pod's sidecar captures this port: HTTP/1.1 to it may travel multiplexed over HTTP/2
    /// between the sidecars (the peer restores HTTP/1.1 for the app).
    pub sidecar: bool,
}

/// A Service with its resolved endpoints per port.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `name.namespace.svc.<cluster domain>`, fixed when the snapshot is built.
    pub hostname: String,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Ready endpoints by service port number.
    pub endpoints: BTreeMap<u16, Vec<Endpoint>>,
    next: AtomicUsize,
}

impl Service {
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// Round-robin over the ready endpoints of a port.
    pub fn pick(&self, port: u16) -> Option<&Endpoint> {
        let eps = self.endpoints.get(&port)?;
        if eps.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        eps.get(i % eps.len())
    }
}

/// A pod's identity, for metrics and routing by pod IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub pod: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Which inbound ports the pod's sidecar captures.
    pub capture: Capture,
}

/// Inbound ports a pod's sidecar captures, from what injection left on the pod: the
/// `security.istio.io/tlsMode: istio` label (what Istio's auto-mTLS uses to find sidecars) and
/// the `traffic.sidecar.istio.io/{include,exclude}InboundPorts` and
/// `sidecar.istio.io/interceptionMode` annotations (the inputs of the pod's capture rules).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Capture {
    /// No sidecar, or one that captures no inbound traffic.
    #[default]
    None,
    /// Every port except these.
    AllExcept(Vec<u16>),
    /// Only these ports.
    Only(Vec<u16>),
}

impl Capture {
    pub fn of_pod(
        labels: &BTreeMap<String, String>,
        annotations: &BTreeMap<String, String>,
    ) -> Capture {
        let ports = |k: &str| -> Vec<u16> {
            annotations
                .get(k)
                .map(|v| v.split(',').filter_map(|p| p.trim().parse().ok()).collect())
                .unwrap_or_default()
        };
        if labels.get("security.istio.io/tlsMode").map(String::as_str) != Some("istio")
            || annotations
                .get("sidecar.istio.io/interceptionMode")
                .is_some_and(|m| m.eq_ignore_ascii_case("NONE"))
        {
            return Capture::None;
        }
        match annotations
            .get("traffic.sidecar.istio.io/includeInboundPorts")
            .map(|v| v.trim())
        {
            None | Some("*") => {
                Capture::AllExcept(ports("traffic.sidecar.istio.io/excludeInboundPorts"))
            }
            Some("") => Capture::None,
            Some(_) => Capture::Only(ports("traffic.sidecar.istio.io/includeInboundPorts")),
        }
    }

    pub fn covers(&self, port: u16) -> bool {
        match self {
            Capture::None => false,
            Capture::AllExcept(except) => !except.contains(&port),
            Capture::Only(only) => only.contains(&port),
        }
    }
}

/// Everything the data path needs, immutable. Requests take an `Arc` of the current one and keep
/// it for their lifetime, so a config change never changes a request half way.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub version: u64,
    pub services: Vec<Arc<Service>>,
    by_vip: crate::FastMap<SocketAddr, Arc<Service>>,
    by_host: crate::FastMap<String, Arc<Service>>,
    /// Each endpoint's service (ready or not), and the protocol its service port declares.
    by_endpoint: crate::FastMap<SocketAddr, (Arc<Service>, Protocol)>,
    pods: crate::FastMap<IpAddr, Arc<Workload>>,
    /// VirtualServices and DestinationRules as given (routing is the next layer's job); moved
    /// into `istio_text` by [`Snapshot::compact`] once everything is compiled.
    pub istio: Vec<Value>,
    /// The same as JSON text, for the config dump: a parsed tree of a large table costs several
    /// times its text in memory (a 1,000-rule VirtualService: megabytes) for a page read rarely.
    istio_text: String,
    /// The VirtualServices and DestinationRules, compiled.
    pub routes: crate::routing::RouteTable,
    /// Objects that could not be used, with why (shown in the config dump and logs).
    pub rejected: Vec<String>,
    /// In gateway mode: the Gateways selecting this proxy and their routes.
    pub gateway: Option<GatewayView>,
    /// Secrets the proxy may read (a gateway's own namespace): decoded data by (ns, name).
    pub secrets: crate::gateway_tls::Secrets,
}

/// What a gateway proxy serves: the Gateways that select its pod, their servers by port, and the
/// VirtualServices bound to them.
#[derive(Debug, Default)]
pub struct GatewayView {
    pub ids: Vec<String>,
    pub servers: BTreeMap<u16, Vec<(String, crate::gateway::Server)>>,
    pub routes: crate::routing::RouteTable,
    /// Ports whose servers terminate TLS, with their configuration (certificates by SNI).
    pub tls: BTreeMap<u16, crate::gateway_tls::PortConfigs>,
    /// Servers left out (bad or missing certificate material), one line each.
    pub server_errors: Vec<String>,
}

/// Where an outbound connection or request goes.
#[derive(Clone, Debug)]
pub enum Target {
    /// A service port: load-balance over its endpoints.
    Service { service: Arc<Service>, port: u16 },
    /// A known pod, addressed directly.
    Pod {
        addr: SocketAddr,
        workload: Arc<Workload>,
    },
    /// Not in the registry.
    Unknown(SocketAddr),
}

impl Snapshot {
    /// Keep the Istio resources only as text: call after compiling routes (and gateway routes).
    pub fn compact(&mut self) {
        if !self.istio.is_empty() {
            self.istio_text = serde_json::to_string(&self.istio).unwrap_or_default();
            self.istio = Vec::new();
        }
    }

    /// The Istio resources as given, whether compacted or not.
    pub fn istio_resources(&self) -> Value {
        if self.istio.is_empty() && !self.istio_text.is_empty() {
            serde_json::from_str(&self.istio_text).unwrap_or(Value::Null)
        } else {
            Value::Array(self.istio.clone())
        }
    }

    /// Compile a snapshot from Kubernetes objects (any order, any kinds).
    pub fn build(version: u64, objects: &[Value], domain: &str) -> Snapshot {
        Self::build_for(version, objects, domain, None)
    }

    /// [`Snapshot::build`] as a proxy in namespace `viewer` sees it (Istio `exportTo`).
    pub fn build_for(
        version: u64,
        objects: &[Value],
        domain: &str,
        viewer: Option<&str>,
    ) -> Snapshot {
        let mut snap = Snapshot {
            version,
            ..Snapshot::default()
        };
        let mut services: Vec<K8sService> = Vec::new();
        let mut slices: Vec<EndpointSlice> = Vec::new();
        let mut pods: Vec<Pod> = Vec::new();
        for o in objects {
            let kind = o["kind"].as_str().unwrap_or_default();
            let name = o["metadata"]["name"].as_str().unwrap_or("?");
            let res = match kind {
                // Read from the borrowed value: no copy of each object per rebuild.
                "Service" => K8sService::deserialize(o).map(|s| services.push(s)),
                "EndpointSlice" => EndpointSlice::deserialize(o).map(|s| slices.push(s)),
                "Pod" => Pod::deserialize(o).map(|p| pods.push(p)),
                "Secret" => {
                    use base64::Engine;
                    let ns = o["metadata"]["namespace"].as_str().unwrap_or("default");
                    let data: BTreeMap<String, Vec<u8>> = o["data"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .filter_map(|(k, v)| {
                            let b = base64::engine::general_purpose::STANDARD
                                .decode(v.as_str()?)
                                .ok()?;
                            Some((k.clone(), b))
                        })
                        .collect();
                    snap.secrets.insert((ns.to_owned(), name.to_owned()), data);
                    Ok(())
                }
                "VirtualService" | "DestinationRule" | "ServiceEntry" | "Sidecar" | "Gateway" => {
                    snap.istio.push(o.clone());
                    Ok(())
                }
                _ => Ok(()),
            };
            if let Err(e) = res {
                snap.rejected.push(format!("{kind} {name}: {e}"));
            }
        }
        for p in &pods {
            let Some(ip) = p
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse::<IpAddr>().ok())
            else {
                continue;
            };
            let meta = &p.metadata;
            let labels = meta.labels.clone().unwrap_or_default();
            let capture = Capture::of_pod(
                &labels,
                meta.annotations.as_ref().unwrap_or(&BTreeMap::new()),
            );
            let name = labels
                .get("service.istio.io/canonical-name")
                .or_else(|| labels.get("app"))
                .cloned()
                .unwrap_or_else(|| meta.name.clone().unwrap_or_default());
            snap.pods.insert(
                ip,
                Arc::new(Workload {
                    pod: meta.name.clone().unwrap_or_default(),
                    namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
                    name,
                    labels,
                    capture,
                }),
            );
        }
        for s in services {
            let ns = s
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let name = s.metadata.name.clone().unwrap_or_default();
            let spec = s.spec.unwrap_or_default();
            let mut cluster_ips: Vec<IpAddr> = spec
                .cluster_ips
                .clone()
                .unwrap_or_default()
                .iter()
                .chain(spec.cluster_ip.iter())
                .filter_map(|ip| ip.parse().ok())
                .collect();
            cluster_ips.dedup();
            let ports: Vec<ServicePort> = spec
                .ports
                .unwrap_or_default()
                .into_iter()
                .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                .filter_map(|p| {
                    let (tp, tpn) = match &p.target_port {
                        Some(IntOrString::Int(n)) => (u16::try_from(*n).ok(), None),
                        Some(IntOrString::String(s)) => (s.parse().ok(), Some(s.clone())),
                        None => (None, None),
                    };
                    Some(ServicePort {
                        name: p.name.clone().unwrap_or_default(),
                        port: u16::try_from(p.port).ok()?,
                        target_port: tp,
                        target_port_name: tpn,
                        protocol: Protocol::of_port(p.name.as_deref(), p.app_protocol.as_deref()),
                    })
                })
                .collect();
            // Endpoints: slices labelled kubernetes.io/service-name=<name> in the namespace.
            let mut endpoints: BTreeMap<u16, Vec<Endpoint>> = BTreeMap::new();
            let mut members: Vec<(SocketAddr, Protocol)> = Vec::new();
            for slice in slices.iter().filter(|sl| {
                sl.metadata.namespace.as_deref().unwrap_or("default") == ns
                    && sl
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        .map(String::as_str)
                        == Some(name.as_str())
            }) {
                for sp in &ports {
                    let slice_port = slice
                        .ports
                        .iter()
                        .flatten()
                        .find(|p| p.name.as_deref().unwrap_or("") == sp.name)
                        .and_then(|p| p.port)
                        .and_then(|p| u16::try_from(p).ok());
                    let Some(port) = slice_port.or(sp.target_port) else {
                        continue;
                    };
                    for ep in slice.endpoints.iter().flatten() {
                        // Ready, or serving while terminating (graceful shutdown), as kube-proxy does.
                        let c = ep.conditions.clone().unwrap_or_default();
                        let serving = c.ready != Some(false) || c.serving == Some(true);
                        for a in &ep.addresses {
                            let Ok(ip) = a.parse::<IpAddr>() else {
                                continue;
                            };
                            // Ready or not, the pod's port is what its service port declares.
                            members.push((SocketAddr::new(ip, port), sp.protocol));
                            if !serving {
                                continue;
                            }
                            let workload = snap.pods.get(&ip);
                            endpoints.entry(sp.port).or_default().push(Endpoint {
                                addr: SocketAddr::new(ip, port),
                                pod: ep.target_ref.as_ref().and_then(|r| r.name.clone()),
                                labels: workload.map(|w| w.labels.clone()).unwrap_or_default(),
                                sidecar: workload.is_some_and(|w| w.capture.covers(port)),
                            });
                        }
                    }
                }
            }
            let svc = Arc::new(Service {
                hostname: format!("{name}.{ns}.svc.{domain}"),
                name: name.clone(),
                namespace: ns.clone(),
                cluster_ips: cluster_ips.clone(),
                ports: ports.clone(),
                endpoints,
                next: AtomicUsize::new(0),
            });
            for ip in &cluster_ips {
                for p in &ports {
                    snap.by_vip
                        .insert(SocketAddr::new(*ip, p.port), svc.clone());
                }
            }
            for (addr, protocol) in members {
                let entry = snap
                    .by_endpoint
                    .entry(addr)
                    .or_insert_with(|| (svc.clone(), protocol));
                // Service ports that disagree on a pod port (`http` in one service, `tcp-*` in
                // another) declare nothing: it is sniffed, as an undeclared port is.
                if entry.1 != protocol {
                    entry.1 = Protocol::Unknown;
                }
            }
            for h in [
                format!("{name}.{ns}.svc.{domain}"),
                format!("{name}.{ns}.svc"),
                format!("{name}.{ns}"),
            ] {
                snap.by_host.insert(h, svc.clone());
            }
            snap.services.push(svc);
        }
        snap.routes = crate::routing::RouteTable::compile_for(&snap.istio, domain, viewer);
        snap.rejected
            .extend(snap.routes.diagnostics.iter().cloned());
        snap
    }

    /// Add the gateway view for a proxy whose pod has one of `own_ips`: the Gateways whose
    /// selector matches its labels, their servers (a port claimed by two Gateways with different
    /// protocols is reported and served by the first), and their routes.
    pub fn with_gateway(mut self, own_ips: &[IpAddr], namespace: &str, domain: &str) -> Snapshot {
        let labels = own_ips
            .iter()
            .find_map(|ip| self.workload(*ip))
            .map(|w| w.labels.clone())
            .unwrap_or_default();
        let mut all = Vec::new();
        for o in self.istio.iter().filter(|o| o["kind"] == "Gateway") {
            let id = format!(
                "{}/{}",
                o["metadata"]["namespace"].as_str().unwrap_or("default"),
                o["metadata"]["name"].as_str().unwrap_or("?")
            );
            match crate::gateway::parse(o) {
                Ok(g) => all.push(g),
                Err(e) => self.rejected.push(format!("Gateway {id} rejected: {e}")),
            }
        }
        let mut view = GatewayView::default();
        for g in crate::gateway::selected(&all, &labels) {
            view.ids.push(g.id.clone());
            for s in &g.servers {
                let entry = view.servers.entry(s.port).or_default();
                if let Some((other, first)) = entry.first()
                    && first.protocol != s.protocol
                {
                    self.rejected.push(format!(
                        "Gateway {} port {}: {:?} conflicts with {:?} of Gateway {other}; the first is served",
                        g.id, s.port, s.protocol, first.protocol
                    ));
                    continue;
                }
                entry.push((g.id.clone(), s.clone()));
            }
        }
        // TLS-terminating servers: one configuration per port, certificates chosen by SNI.
        for (port, servers) in &view.servers {
            let terminating = servers.iter().any(|(_, s)| {
                matches!(
                    s.protocol,
                    crate::gateway::ServerProtocol::Https | crate::gateway::ServerProtocol::Tls
                ) && matches!(s.tls_mode.as_deref(), Some("SIMPLE" | "MUTUAL"))
            });
            if terminating {
                let (configs, errors) =
                    crate::gateway_tls::server_configs(servers, namespace, &self.secrets);
                self.rejected.extend(errors.iter().cloned());
                view.server_errors.extend(errors);
                if !configs.is_empty() {
                    view.tls.insert(*port, configs);
                }
            }
        }
        view.routes = crate::routing::RouteTable::compile_gateway(&self.istio, domain, &view.ids);
        self.rejected
            .extend(view.routes.diagnostics.iter().cloned());
        self.gateway = Some(view);
        self
    }

    /// Where a connection to `orig_dst` goes.
    pub fn target(&self, orig_dst: SocketAddr) -> Target {
        let canonical = SocketAddr::new(orig_dst.ip().to_canonical(), orig_dst.port());
        if let Some(s) = self.by_vip.get(&canonical) {
            return Target::Service {
                service: s.clone(),
                port: canonical.port(),
            };
        }
        if let Some(w) = self.pods.get(&canonical.ip()) {
            return Target::Pod {
                addr: canonical,
                workload: w.clone(),
            };
        }
        Target::Unknown(canonical)
    }

    /// A service named by an HTTP Host/:authority (`name`, `name.ns`, `name.ns.svc`, FQDN; short
    /// names are resolved in `client_ns`, as Kubernetes DNS does).
    pub fn service_by_host(&self, host: &str, client_ns: &str) -> Option<Arc<Service>> {
        let host = host.trim_end_matches('.');
        let host = match host.rsplit_once(':') {
            Some((h, p))
                if p.chars().all(|c| c.is_ascii_digit()) && !h.contains(']')
                    || h.ends_with(']') =>
            {
                h
            }
            _ => host,
        };
        self.by_host
            .get(host)
            .or_else(|| self.by_host.get(&format!("{host}.{client_ns}")))
            .cloned()
    }

    /// The service an endpoint (pod IP:port) belongs to (inbound metrics).
    pub fn service_for_endpoint(&self, addr: SocketAddr) -> Option<Arc<Service>> {
        self.endpoint(addr).map(|(s, _)| s.clone())
    }

    /// The entry for a pod IP:port (an IPv4-mapped IPv6 address counts as its IPv4 one).
    fn endpoint(&self, addr: SocketAddr) -> Option<&(Arc<Service>, Protocol)> {
        self.by_endpoint
            .get(&SocketAddr::new(addr.ip().to_canonical(), addr.port()))
    }

    /// The protocol declared for a pod IP:port by the service ports it is an endpoint of, ready
    /// or not (Unknown when it is none's, or when they disagree): what an inbound connection,
    /// or an outbound one dialled to a pod IP, is served as. Istio's inbound listener picks its
    /// filter chain by the pod's service ports the same way, and outbound a declared HTTP port
    /// has its own listener and a declared TCP port's pod IPs pass through unsniffed.
    pub fn endpoint_protocol(&self, addr: SocketAddr) -> Protocol {
        self.endpoint(addr).map_or(Protocol::Unknown, |(_, p)| *p)
    }

    pub fn workload(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.pods.get(&ip.to_canonical()).cloned()
    }
}

// === the file source ===

/// Reading the directory failed (the previous snapshot keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Parse { path: String, reason: String },
}

/// The configuration files of a directory (`*.yaml`, `*.yml`, `*.json`), sorted, and the newest
/// modification time among them and the directory (a deleted file changes the directory's).
pub fn dir_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<SystemTime>), Error> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| Error::Read {
            path: dir.display().to_string(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        })
        .collect();
    files.sort();
    let mut newest = std::fs::metadata(dir).and_then(|m| m.modified()).ok();
    for f in &files {
        if let Ok(m) = std::fs::metadata(f).and_then(|m| m.modified()) {
            newest = newest.max(Some(m));
        }
    }
    Ok((files, newest))
}

/// All objects in the configuration files of a directory (multi-document), with the newest
/// modification time seen.
pub fn read_dir(dir: &Path) -> Result<(Vec<Value>, Option<SystemTime>), Error> {
    let (files, newest) = dir_files(dir)?;
    Ok((read_files(&files)?, newest))
}

/// The objects of these files (multi-document YAML or JSON; `kind: List` unwrapped).
pub fn read_files(files: &[PathBuf]) -> Result<Vec<Value>, Error> {
    let mut objects = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|source| Error::Read {
            path: f.display().to_string(),
            source,
        })?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).map_err(|e| Error::Parse {
                path: f.display().to_string(),
                reason: e.to_string(),
            })?;
            match v {
                Value::Null => {}
                Value::Object(ref m) if m.get("kind").and_then(Value::as_str) == Some("List") => {
                    objects.extend(
                        m.get("items")
                            .and_then(Value::as_array)
                            .cloned()
                            .unwrap_or_default(),
                    );
                }
                other => objects.push(other),
            }
        }
    }
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects() -> Vec<Value> {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 10.96.1.10, ports: [{name: http, port: 9080, targetPort: 8080}, {name: grpc-api, port: 9090}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-1, namespace: shop, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: grpc-api, port: 9090}]
endpoints:
- {addresses: ["10.1.0.1"], conditions: {ready: true}}
- {addresses: ["10.1.0.9"], conditions: {ready: false}}
- {addresses: ["10.1.0.8"], conditions: {ready: false, serving: true, terminating: true}}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1-0, namespace: shop, labels: {app: reviews}}
status: {podIP: 10.1.0.1}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-raw, namespace: shop}
spec: {clusterIP: 10.96.1.11, ports: [{name: tcp-raw, port: 9000, targetPort: 9090}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-raw-1, namespace: shop, labels: {kubernetes.io/service-name: reviews-raw}}
addressType: IPv4
ports: [{name: tcp-raw, port: 9090}]
endpoints:
- {addresses: ["10.1.0.1"], conditions: {ready: true}}
"#;
        serde_yaml::Deserializer::from_str(yaml)
            .map(|d| serde::Deserialize::deserialize(d).expect("doc"))
            .collect()
    }

    #[test]
    fn services_endpoints_hosts_and_pods() {
        let snap = Snapshot::build(1, &objects(), "cluster.local");
        let Target::Service { service, port } =
            snap.target("10.96.1.10:9080".parse().expect("addr"))
        else {
            panic!("service")
        };
        assert_eq!((service.name.as_str(), port), ("reviews", 9080));
        let eps: Vec<String> = service.endpoints[&9080]
            .iter()
            .map(|e| e.addr.to_string())
            .collect();
        assert_eq!(
            eps,
            ["10.1.0.1:8080", "10.1.0.8:8080"],
            "not-ready excluded, serving-while-terminating kept"
        );
        assert_eq!(service.port(9090).map(|p| p.protocol), Some(Protocol::Grpc));
        assert_eq!(service.port(9080).map(|p| p.protocol), Some(Protocol::Http));
        for host in [
            "reviews",
            "reviews.shop",
            "reviews.shop.svc",
            "reviews.shop.svc.cluster.local",
            "reviews.shop:9080",
            "reviews.shop.svc.cluster.local.",
        ] {
            assert!(snap.service_by_host(host, "shop").is_some(), "{host}");
        }
        assert!(
            snap.service_by_host("reviews", "other").is_none(),
            "short names resolve in the client's namespace"
        );
        assert_eq!(
            snap.service_for_endpoint("10.1.0.1:8080".parse().expect("addr"))
                .map(|s| s.name.clone())
                .as_deref(),
            Some("reviews")
        );
        // A pod IP:port is served as its service port declares (inbound, or dialled directly).
        let declared = |a: &str| snap.endpoint_protocol(a.parse().expect("addr"));
        assert_eq!(
            declared("10.1.0.1:8080"),
            Protocol::Http,
            "targetPort of http"
        );
        assert_eq!(
            declared("10.1.0.1:9090"),
            Protocol::Unknown,
            "grpc-api in one service, tcp-raw in another: sniffed"
        );
        assert_eq!(
            declared("10.1.0.1:7777"),
            Protocol::Unknown,
            "no service port"
        );
        assert_eq!(
            declared("10.1.0.9:8080"),
            Protocol::Http,
            "not ready: still declared"
        );
        assert_eq!(
            declared("10.1.0.2:8080"),
            Protocol::Unknown,
            "not an endpoint"
        );
        assert!(matches!(
            snap.target("10.1.0.1:7777".parse().expect("addr")),
            Target::Pod { .. }
        ));
        assert!(matches!(
            snap.target("192.0.2.1:80".parse().expect("addr")),
            Target::Unknown(_)
        ));
        assert_eq!(
            snap.workload("10.1.0.1".parse().expect("ip"))
                .map(|w| w.name.clone())
                .as_deref(),
            Some("reviews")
        );
    }

    #[test]
    fn which_inbound_ports_a_pods_sidecar_captures() {
        let map = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let injected = map(&[("app", "r"), ("security.istio.io/tlsMode", "istio")]);
        type Case<'a> = (
            &'a BTreeMap<String, String>,
            &'a [(&'a str, &'a str)],
            &'a [u16],
            &'a [u16],
        );
        let cases: &[Case<'_>] = &[
            // (labels, annotations, captured, not captured)
            (&injected, &[], &[80, 9080], &[]),
            (
                &injected,
                &[("traffic.sidecar.istio.io/excludeInboundPorts", "9080, 9090")],
                &[80],
                &[9080, 9090],
            ),
            (
                &injected,
                &[("traffic.sidecar.istio.io/includeInboundPorts", "8080")],
                &[8080],
                &[80],
            ),
            (
                &injected,
                &[("traffic.sidecar.istio.io/includeInboundPorts", "")],
                &[],
                &[80],
            ),
            (
                &injected,
                &[("traffic.sidecar.istio.io/includeInboundPorts", "*")],
                &[80],
                &[],
            ),
            (
                &injected,
                &[("sidecar.istio.io/interceptionMode", "NONE")],
                &[],
                &[80],
            ),
            (&map(&[("app", "r")]), &[], &[], &[80]),
            (
                &map(&[("security.istio.io/tlsMode", "disabled")]),
                &[],
                &[],
                &[80],
            ),
        ];
        for (labels, annotations, yes, no) in cases {
            let c = Capture::of_pod(labels, &map(annotations));
            for p in *yes {
                assert!(c.covers(*p), "{labels:?} {annotations:?}: {p} captured");
            }
            for p in *no {
                assert!(
                    !c.covers(*p),
                    "{labels:?} {annotations:?}: {p} not captured"
                );
            }
        }
        // The endpoint carries it: the fixture's pod has no sidecar label.
        let snap = Snapshot::build(1, &objects(), "cluster.local");
        let Target::Service { service, .. } = snap.target("10.96.1.10:9080".parse().expect("addr"))
        else {
            panic!("service")
        };
        assert!(!service.endpoints[&9080][0].sidecar);
        let mut objs = objects();
        objs[2]["metadata"]["labels"]["security.istio.io/tlsMode"] = "istio".into();
        let snap = Snapshot::build(2, &objs, "cluster.local");
        let Target::Service { service, .. } = snap.target("10.96.1.10:9080".parse().expect("addr"))
        else {
            panic!("service")
        };
        assert!(service.endpoints[&9080][0].sidecar);
    }

    #[test]
    fn protocol_from_app_protocol_or_port_name() {
        assert_eq!(Protocol::of_port(Some("http-web"), None), Protocol::Http);
        assert_eq!(
            Protocol::of_port(Some("tcp-db"), Some("http")),
            Protocol::Http,
            "appProtocol wins"
        );
        assert_eq!(
            Protocol::of_port(Some("web"), Some("kubernetes.io/h2c")),
            Protocol::Http2
        );
        assert_eq!(Protocol::of_port(Some("mysql"), None), Protocol::Tcp);
        assert_eq!(Protocol::of_port(Some("https"), None), Protocol::Tls);
        assert_eq!(Protocol::of_port(Some("metrics"), None), Protocol::Unknown);
        assert_eq!(Protocol::of_port(None, None), Protocol::Unknown);
    }
}
