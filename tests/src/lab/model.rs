//! The lab's decisions as functions from values to values: which kinds it serves, how a
//! container's environment and process are derived from the Pod (downward API, `$(VAR)`
//! expansion, image mapping), what EndpointSlices, kube-proxy rules and DNS hosts files follow
//! from Services and Pods, and which Pods a Deployment wants. The daemon does the I/O.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde_json::{Value, json};

use super::LabError;
use crate::fake_apiserver::Kind;

/// A kind `lab apply` accepts: (apiVersions, kind, plural, namespaced).
pub struct KindInfo {
    pub group: &'static str,
    pub versions: &'static [&'static str],
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
    /// What `lab get` accepts for it.
    pub aliases: &'static [&'static str],
}

/// Everything the lab's API server stores. The first six are what users apply; EndpointSlices,
/// the webhook configuration and the injector's Secret are written by the lab and the injector
/// (and readable with `lab get`).
pub const KINDS: &[KindInfo] = &[
    KindInfo {
        group: "",
        versions: &["v1"],
        kind: "Namespace",
        plural: "namespaces",
        namespaced: false,
        aliases: &["namespaces", "namespace", "ns"],
    },
    KindInfo {
        group: "apps",
        versions: &["v1"],
        kind: "Deployment",
        plural: "deployments",
        namespaced: true,
        aliases: &["deployments", "deployment", "deploy"],
    },
    KindInfo {
        group: "",
        versions: &["v1"],
        kind: "Pod",
        plural: "pods",
        namespaced: true,
        aliases: &["pods", "pod", "po"],
    },
    KindInfo {
        group: "",
        versions: &["v1"],
        kind: "Service",
        plural: "services",
        namespaced: true,
        aliases: &["services", "service", "svc"],
    },
    KindInfo {
        group: "networking.istio.io",
        // Served at every version Istio serves; stored (and watched by the proxies) as v1,
        // which has the same schema.
        versions: &["v1", "v1beta1", "v1alpha3"],
        kind: "VirtualService",
        plural: "virtualservices",
        namespaced: true,
        aliases: &["virtualservices", "virtualservice", "vs"],
    },
    KindInfo {
        group: "networking.istio.io",
        versions: &["v1", "v1beta1", "v1alpha3"],
        kind: "DestinationRule",
        plural: "destinationrules",
        namespaced: true,
        aliases: &["destinationrules", "destinationrule", "dr"],
    },
    KindInfo {
        group: "networking.istio.io",
        versions: &["v1", "v1beta1", "v1alpha3"],
        kind: "Gateway",
        plural: "gateways",
        namespaced: true,
        aliases: &["gateways", "gateway", "gw"],
    },
    KindInfo {
        group: "discovery.k8s.io",
        versions: &["v1"],
        kind: "EndpointSlice",
        plural: "endpointslices",
        namespaced: true,
        aliases: &["endpointslices", "endpointslice"],
    },
    KindInfo {
        group: "",
        versions: &["v1"],
        kind: "Secret",
        plural: "secrets",
        namespaced: true,
        aliases: &["secrets", "secret"],
    },
    KindInfo {
        group: "admissionregistration.k8s.io",
        versions: &["v1"],
        kind: "MutatingWebhookConfiguration",
        plural: "mutatingwebhookconfigurations",
        namespaced: false,
        aliases: &[
            "mutatingwebhookconfigurations",
            "mutatingwebhookconfiguration",
        ],
    },
];

/// Kinds users may apply (the rest are the lab's own).
pub const APPLIABLE: &[&str] = &[
    "Namespace",
    "Deployment",
    "Pod",
    "Service",
    "VirtualService",
    "DestinationRule",
    "Gateway",
    "Secret",
];

/// The fake API server's resource list (the storage version of each kind).
pub fn api_kinds() -> Vec<Kind> {
    KINDS
        .iter()
        .map(|k| Kind {
            group: k.group.into(),
            version: k.versions[0].into(),
            plural: k.plural.into(),
            kind: k.kind.into(),
        })
        .collect()
}

pub fn kind_by_alias(alias: &str) -> Option<&'static KindInfo> {
    let a = alias.to_ascii_lowercase();
    KINDS.iter().find(|k| k.aliases.contains(&a.as_str()))
}

pub fn kind_info(kind: &str) -> Option<&'static KindInfo> {
    KINDS.iter().find(|k| k.kind == kind)
}

impl KindInfo {
    /// `apiVersion` as stored.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.versions[0].into()
        } else {
            format!("{}/{}", self.group, self.versions[0])
        }
    }

    /// The collection path, for a namespace if the kind is namespaced.
    pub fn path(&self, namespace: Option<&str>) -> String {
        let base = if self.group.is_empty() {
            format!("/api/{}", self.versions[0])
        } else {
            format!("/apis/{}/{}", self.group, self.versions[0])
        };
        match namespace.filter(|_| self.namespaced) {
            Some(ns) => format!("{base}/namespaces/{ns}/{}", self.plural),
            None => format!("{base}/{}", self.plural),
        }
    }

    /// How kubectl names it in messages: `deployment.apps/name`.
    pub fn display(&self, name: &str) -> String {
        if self.group.is_empty() {
            format!("{}/{name}", self.kind.to_lowercase())
        } else {
            format!("{}.{}/{name}", self.kind.to_lowercase(), self.group)
        }
    }
}

fn dns_label_ok(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

/// Check one document from `lab apply` and bring it to its stored form: a supported kind at a
/// served version, a valid name, the namespace filled in (`default_ns` if absent). Returns the
/// object and warnings about fields the lab accepts but does not act on.
pub fn prepare(doc: Value, default_ns: &str) -> Result<(Value, Vec<String>), LabError> {
    let Value::Object(_) = doc else {
        return Err(LabError::Invalid(
            "each YAML document must be a mapping with apiVersion, kind and metadata".into(),
        ));
    };
    let mut obj = doc;
    let api_version = obj["apiVersion"].as_str().unwrap_or_default().to_owned();
    let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
    if api_version.is_empty() || kind.is_empty() {
        return Err(LabError::Invalid(
            "apiVersion and kind are required in every document".into(),
        ));
    }
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", &api_version));
    let info = KINDS
        .iter()
        .find(|k| k.kind == kind && APPLIABLE.contains(&k.kind))
        .ok_or_else(|| {
            LabError::Unsupported(format!(
                "kind {kind} ({api_version}) is not supported by the lab; it serves {}",
                APPLIABLE.join(", ")
            ))
        })?;
    if info.group != group || !info.versions.contains(&version) {
        return Err(LabError::Unsupported(format!(
            "{kind} at apiVersion {api_version} is not served; use {}",
            info.versions
                .iter()
                .map(|v| if info.group.is_empty() {
                    (*v).to_owned()
                } else {
                    format!("{}/{v}", info.group)
                })
                .collect::<Vec<_>>()
                .join(" or ")
        )));
    }
    obj["apiVersion"] = json!(info.api_version());
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if !dns_label_ok(&name, 63) {
        return Err(LabError::Invalid(format!(
            "{kind} metadata.name {name:?}: must be a lowercase RFC 1123 name (a-z, 0-9, '-', '.'), at most 63 characters"
        )));
    }
    if info.namespaced {
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or(default_ns)
            .to_owned();
        if !dns_label_ok(&ns, 63) || ns.contains('.') {
            return Err(LabError::Invalid(format!(
                "{kind} {name}: metadata.namespace {ns:?} is not a valid namespace name"
            )));
        }
        obj["metadata"]["namespace"] = json!(ns);
    } else if let Some(m) = obj["metadata"].as_object_mut() {
        m.remove("namespace");
    }
    let mut warnings = Vec::new();
    let spec = match kind.as_str() {
        "Pod" => Some(&obj["spec"]),
        "Deployment" => Some(&obj["spec"]["template"]["spec"]),
        _ => None,
    };
    if let Some(spec) = spec {
        if spec["containers"].as_array().is_none_or(|c| c.is_empty()) {
            return Err(LabError::Invalid(format!(
                "{kind} {name}: spec.containers: Required value (at least one container)"
            )));
        }
        warnings = pod_spec_warnings(spec);
    }
    if kind == "Service" {
        warnings = service_warnings(&obj["spec"]);
    }
    if kind == "Deployment" {
        let selector = &obj["spec"]["selector"]["matchLabels"];
        let labels = &obj["spec"]["template"]["metadata"]["labels"];
        let ok = selector
            .as_object()
            .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)));
        if !ok {
            return Err(LabError::Invalid(format!(
                "Deployment {name}: spec.selector.matchLabels must be non-empty and match spec.template.metadata.labels"
            )));
        }
    }
    Ok((obj, warnings))
}

/// Pod spec fields the kubelet acts on, or that have no effect on one node.
const POD_FIELDS_HANDLED: &[&str] = &[
    "containers",
    "initContainers",
    "restartPolicy",
    "hostNetwork",
    "securityContext",
    "serviceAccountName",
    "serviceAccount",
    "terminationGracePeriodSeconds",
    "nodeName",
    "nodeSelector",
    "affinity",
    "tolerations",
    "priorityClassName",
    "schedulerName",
    "automountServiceAccountToken",
    "enableServiceLinks",
    "imagePullSecrets",
    "dnsPolicy",
];
const CONTAINER_FIELDS_HANDLED: &[&str] = &[
    "name",
    "image",
    "command",
    "args",
    "env",
    "ports",
    "readinessProbe",
    "startupProbe",
    "securityContext",
    "resources",
    "imagePullPolicy",
    "restartPolicy",
    "volumeMounts",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "stdin",
    "tty",
];

/// Fields a Pod may carry that the lab's kubelet accepts without acting on them, named.
fn pod_spec_warnings(spec: &Value) -> Vec<String> {
    let mut w = Vec::new();
    if spec["volumes"].as_array().is_some_and(|v| !v.is_empty()) {
        w.push(
            "spec.volumes are not mounted in the lab (processes see the machine's filesystem)"
                .into(),
        );
    }
    for (k, _) in spec.as_object().into_iter().flatten() {
        if k != "volumes" && !POD_FIELDS_HANDLED.contains(&k.as_str()) {
            w.push(format!("spec.{k} is not modelled by the lab (ignored)"));
        }
    }
    for c in containers(spec) {
        let n = c["name"].as_str().unwrap_or("?");
        for (k, _) in c.as_object().into_iter().flatten() {
            if !CONTAINER_FIELDS_HANDLED.contains(&k.as_str()) {
                w.push(format!(
                    "container {n}: {k} is not modelled by the lab (ignored)"
                ));
            }
        }
    }
    w
}

/// Service fields the lab serves differently from a cluster, named.
fn service_warnings(spec: &Value) -> Vec<String> {
    let mut w = Vec::new();
    if let Some(t) = spec["type"].as_str().filter(|t| *t != "ClusterIP") {
        w.push(format!(
            "spec.type {t}: the lab exposes each port on 127.0.0.1:<nodePort> of this machine (one node, no load balancer)"
        ));
    }
    for p in spec["ports"].as_array().into_iter().flatten() {
        if let Some(proto) = p["protocol"].as_str().filter(|p| *p != "TCP") {
            w.push(format!(
                "port {}: protocol {proto} is not forwarded by the lab's kube-proxy (TCP only)",
                p["port"]
            ));
        }
    }
    w
}

/// Init containers then containers.
pub fn containers(spec: &Value) -> impl Iterator<Item = &Value> {
    spec["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["containers"].as_array().into_iter().flatten())
}

/// `$(VAR)` expansion as the kubelet does it: defined variables are substituted, `$$` escapes,
/// undefined references are left as written.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            if b[i + 1] == b'$' {
                out.push('$');
                i += 2;
                continue;
            }
            if b[i + 1] == b'('
                && let Some(end) = s[i + 2..].find(')')
            {
                let name = &s[i + 2..i + 2 + end];
                if let Some((_, v)) = env.iter().rev().find(|(k, _)| k == name) {
                    out.push_str(v);
                    i += end + 3;
                    continue;
                }
            }
        }
        let ch = s[i..].chars().next().unwrap_or('$');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// Node facts the downward API reports.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub name: String,
    pub ip: Ipv4Addr,
    pub cpus: u64,
    pub memory_bytes: u64,
}

fn field_ref(pod: &Value, path: &str, pod_ip: Ipv4Addr, node: &NodeInfo) -> Option<String> {
    let meta = &pod["metadata"];
    let from_map = |m: &Value, rest: &str| -> Option<String> {
        let key = rest.strip_prefix("['")?.strip_suffix("']")?;
        Some(m[key].as_str().unwrap_or_default().to_owned())
    };
    Some(match path {
        "metadata.name" => meta["name"].as_str()?.to_owned(),
        "metadata.namespace" => meta["namespace"].as_str()?.to_owned(),
        "metadata.uid" => meta["uid"].as_str().unwrap_or_default().to_owned(),
        "spec.nodeName" => node.name.clone(),
        "spec.serviceAccountName" => pod["spec"]["serviceAccountName"]
            .as_str()
            .or(pod["spec"]["serviceAccount"].as_str())
            .unwrap_or("default")
            .to_owned(),
        "status.podIP" | "status.podIPs" => pod_ip.to_string(),
        "status.hostIP" | "status.hostIPs" => node.ip.to_string(),
        p => {
            if let Some(rest) = p.strip_prefix("metadata.labels") {
                return from_map(&meta["labels"], rest);
            }
            if let Some(rest) = p.strip_prefix("metadata.annotations") {
                return from_map(&meta["annotations"], rest);
            }
            return None;
        }
    })
}

/// A Kubernetes quantity in base units (cores for CPU, bytes for memory), as f64.
fn quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        _ => return None,
    };
    Some(n * mult)
}

fn resource_ref(container: &Value, r: &Value, node: &NodeInfo) -> Result<String, String> {
    let resource = r["resource"].as_str().unwrap_or_default();
    let (section, what) = resource
        .split_once('.')
        .ok_or_else(|| format!("resourceFieldRef.resource {resource:?} is not section.resource"))?;
    let value = container["resources"][section][what]
        .as_str()
        .map(str::to_owned)
        .or_else(|| {
            container["resources"][section][what]
                .as_f64()
                .map(|f| f.to_string())
        });
    let amount = match value {
        Some(v) => {
            quantity(&v).ok_or_else(|| format!("resources.{resource}: bad quantity {v:?}"))?
        }
        // Kubernetes reports the node's allocatable capacity when no limit is set.
        None if what == "cpu" => node.cpus as f64,
        None if what == "memory" => node.memory_bytes as f64,
        None => 0.0,
    };
    let divisor = match &r["divisor"] {
        Value::String(s) => quantity(s).ok_or_else(|| format!("bad divisor {s:?}"))?,
        Value::Number(n) => n.as_f64().unwrap_or(1.0),
        _ => 1.0,
    };
    if divisor <= 0.0 {
        return Err("resourceFieldRef.divisor must be positive".into());
    }
    // The kubelet rounds up to a whole number of divisors.
    Ok(format!("{}", (amount / divisor).ceil() as u64))
}

/// A container's environment: `env` in order, downward-API values filled in, `$(VAR)`
/// references to earlier variables expanded.
pub fn container_env(
    pod: &Value,
    container: &Value,
    pod_ip: Ipv4Addr,
    node: &NodeInfo,
) -> Result<Vec<(String, String)>, String> {
    let mut env: Vec<(String, String)> = Vec::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or_default().to_owned();
        if name.is_empty() {
            return Err("env entry without a name".into());
        }
        let value = if let Some(v) = e["value"].as_str() {
            expand(v, &env)
        } else if let Some(vf) = e.get("valueFrom") {
            if let Some(path) = vf["fieldRef"]["fieldPath"].as_str() {
                field_ref(pod, path, pod_ip, node).ok_or_else(|| {
                    format!("env {name}: fieldRef.fieldPath {path:?} is not supported")
                })?
            } else if vf.get("resourceFieldRef").is_some() {
                resource_ref(container, &vf["resourceFieldRef"], node)
                    .map_err(|e| format!("env {name}: {e}"))?
            } else {
                let src = vf
                    .as_object()
                    .and_then(|m| m.keys().next().cloned())
                    .unwrap_or_default();
                return Err(format!(
                    "env {name}: valueFrom.{src} is not supported by the lab (no Secrets or ConfigMaps)"
                ));
            }
        } else {
            String::new()
        };
        env.push((name, value));
    }
    Ok(env)
}

/// What the kubelet runs for a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Program {
    /// A binary built from this workspace (`ferry-init`, `ferry-proxy`).
    Workspace(&'static str),
    /// The built-in echo server, listening on these ports.
    Echo { ports: Vec<u16> },
    /// A program present on this machine.
    Host(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessPlan {
    pub program: Program,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub uid: u32,
    pub gid: u32,
}

/// Images the lab runs as our own binaries: ferry's proxy image and Istio's proxyv2 (the
/// injected `istio-init` and `istio-proxy` both use it, told apart by their arguments).
pub fn is_proxy_image(image: &str) -> bool {
    let repo = image.split('@').next().unwrap_or(image);
    let repo = match repo.rsplit_once(':') {
        Some((r, tag)) if !tag.contains('/') => r,
        _ => repo,
    };
    let last = repo.rsplit('/').next().unwrap_or(repo);
    matches!(last, "ferry-proxy" | "proxyv2")
}

fn security_id(pod: &Value, container: &Value, field: &str) -> Result<u32, String> {
    let v = container["securityContext"]
        .get(field)
        .or_else(|| pod["spec"]["securityContext"].get(field));
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("securityContext.{field} {v} is not a valid id")),
    }
}

/// Decide how to run a container. `find` resolves a command name to a path on this machine.
pub fn plan_process(
    pod: &Value,
    container: &Value,
    pod_ip: Ipv4Addr,
    node: &NodeInfo,
    find: &dyn Fn(&str) -> Option<String>,
) -> Result<ProcessPlan, String> {
    let env = container_env(pod, container, pod_ip, node)?;
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|s| expand(s.as_str().unwrap_or_default(), &env))
            .collect()
    };
    let command = strings(&container["command"]);
    let args = strings(&container["args"]);
    let image = container["image"].as_str().unwrap_or_default();
    let uid = security_id(pod, container, "runAsUser")?;
    let gid = security_id(pod, container, "runAsGroup")?;
    let (program, args) = if is_proxy_image(image) {
        let mut all: Vec<String> = command.into_iter().chain(args).collect();
        if all.first().is_some_and(|c| c.ends_with("pilot-agent")) {
            all.remove(0);
        }
        match all.first().map(String::as_str) {
            Some("istio-iptables") => (Program::Workspace("ferry-init"), all[1..].to_vec()),
            Some("proxy") => (Program::Workspace("ferry-proxy"), all),
            other => {
                return Err(format!(
                    "image {image}: the lab runs it as ferry-init (args `istio-iptables ...`) or ferry-proxy (args `proxy ...`), not {other:?}"
                ));
            }
        }
    } else if let Some(cmd) = command.first() {
        let path = find(cmd).ok_or_else(|| {
            format!(
                "exec: {cmd:?}: executable file not found on this machine (the lab runs commands that exist here; image {image} itself is not available)"
            )
        })?;
        (
            Program::Host(path),
            command[1..].iter().cloned().chain(args).collect(),
        )
    } else {
        let mut ports: Vec<u16> = container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["protocol"].as_str().is_none_or(|p| p == "TCP"))
            .filter_map(|p| p["containerPort"].as_u64())
            .filter_map(|p| u16::try_from(p).ok())
            .collect();
        if ports.is_empty() {
            ports.push(8080);
        }
        (Program::Echo { ports }, args)
    };
    Ok(ProcessPlan {
        program,
        args,
        env,
        uid,
        gid,
    })
}

/// A probe's port: a number, or a named port of the container.
pub fn probe_port(container: &Value, port: &Value) -> Option<u16> {
    match port {
        Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        Value::String(s) => s.parse().ok().or_else(|| named_port(container, s)),
        _ => None,
    }
}

fn named_port(container: &Value, name: &str) -> Option<u16> {
    container["ports"]
        .as_array()?
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
}

fn labels(obj: &Value) -> BTreeMap<String, String> {
    obj["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

pub fn pod_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// The EndpointSlice the endpoint-slice controller keeps for a Service with a selector, from the
/// Pods of its namespace (ready or not: readiness is a condition of each endpoint).
pub fn endpoint_slice(svc: &Value, pods: &[Value], node: &str) -> Option<Value> {
    let selector = svc["spec"]["selector"]
        .as_object()
        .filter(|s| !s.is_empty())?;
    let ns = svc["metadata"]["namespace"].as_str()?;
    let name = svc["metadata"]["name"].as_str()?;
    let chosen: Vec<&Value> = pods
        .iter()
        .filter(|p| p["metadata"]["namespace"].as_str() == Some(ns))
        .filter(|p| p["status"]["podIP"].as_str().is_some())
        .filter(|p| {
            let l = labels(p);
            selector
                .iter()
                .all(|(k, v)| l.get(k).map(String::as_str) == v.as_str())
        })
        .collect();
    let first_container = |p: &Value| -> Vec<Value> {
        p["spec"]["containers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let ports: Vec<Value> = svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|sp| {
            let target = match &sp["targetPort"] {
                Value::Null => sp["port"].as_u64(),
                Value::Number(n) => n.as_u64(),
                Value::String(s) => s.parse().ok().or_else(|| {
                    chosen.iter().find_map(|p| {
                        first_container(p)
                            .iter()
                            .find_map(|c| named_port(c, s).map(u64::from))
                    })
                }),
                _ => None,
            };
            let mut port =
                json!({"port": target, "protocol": sp["protocol"].as_str().unwrap_or("TCP")});
            if let Some(n) = sp["name"].as_str() {
                port["name"] = json!(n);
            }
            if let Some(a) = sp["appProtocol"].as_str() {
                port["appProtocol"] = json!(a);
            }
            port
        })
        .collect();
    let endpoints: Vec<Value> = chosen
        .iter()
        .map(|p| {
            let ready = pod_ready(p);
            json!({
                "addresses": [p["status"]["podIP"]],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "nodeName": node,
                "targetRef": {"kind": "Pod", "namespace": ns, "name": p["metadata"]["name"], "uid": p["metadata"]["uid"]},
            })
        })
        .collect();
    Some(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{name}-lab"),
            "namespace": ns,
            "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name, "uid": svc["metadata"]["uid"]}],
        },
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    }))
}

/// Whether two objects are the same apart from server-set metadata.
pub fn same_content(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v["metadata"].as_object_mut() {
            for f in ["resourceVersion", "uid", "creationTimestamp"] {
                m.remove(f);
            }
        }
        v
    };
    strip(a) == strip(b)
}

/// kube-proxy's job for the lab node, as an `iptables-restore --noflush` input: each ClusterIP
/// port DNATs to a ready endpoint chosen at random (equal shares), ports without a ready
/// endpoint are rejected, and DNATed connections are masqueraded so replies come back through
/// the node (pods share one bridge, and the lab does not rely on br_netfilter).
pub fn kube_proxy_rules(services: &[Value], slices: &[Value]) -> String {
    let mut nat = vec![
        "*nat".to_owned(),
        ":LAB-SERVICES - [0:0]".to_owned(),
        ":LAB-POSTROUTING - [0:0]".to_owned(),
        "-A LAB-POSTROUTING -m conntrack --ctstate DNAT -j MASQUERADE".to_owned(),
    ];
    let mut filter = vec!["*filter".to_owned(), ":LAB-NOENDPOINTS - [0:0]".to_owned()];
    for svc in services {
        let Some(vip) = svc["spec"]["clusterIP"].as_str().filter(|v| *v != "None") else {
            continue;
        };
        let ns = svc["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = svc["metadata"]["name"].as_str().unwrap_or_default();
        let mine: Vec<&Value> = slices
            .iter()
            .filter(|s| {
                s["metadata"]["namespace"].as_str() == Some(ns)
                    && s["metadata"]["labels"]["kubernetes.io/service-name"].as_str() == Some(name)
            })
            .collect();
        for sp in svc["spec"]["ports"].as_array().into_iter().flatten() {
            if sp["protocol"].as_str().is_some_and(|p| p != "TCP") {
                continue;
            }
            let Some(port) = sp["port"].as_u64() else {
                continue;
            };
            let pname = sp["name"].as_str();
            let backends: Vec<String> =
                mine.iter()
                    .flat_map(|s| {
                        let target = s["ports"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .find(|p| p["name"].as_str() == pname)
                            .and_then(|p| p["port"].as_u64());
                        s["endpoints"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter(|e| e["conditions"]["ready"] != json!(false))
                            .flat_map(move |e| {
                                e["addresses"].as_array().into_iter().flatten().filter_map(
                                    move |a| Some(format!("{}:{}", a.as_str()?, target?)),
                                )
                            })
                    })
                    .collect();
            let comment = format!(
                "-m comment --comment \"{ns}/{name}:{}\"",
                pname.unwrap_or("")
            );
            if backends.is_empty() {
                filter.push(format!(
                    "-A LAB-NOENDPOINTS -d {vip}/32 -p tcp --dport {port} {comment} -j REJECT --reject-with tcp-reset"
                ));
                continue;
            }
            let n = backends.len();
            for (i, b) in backends.iter().enumerate() {
                // Rule i of n takes 1/(n-i) of what is left: equal shares overall.
                let stat = if i + 1 < n {
                    format!(
                        " -m statistic --mode random --probability {:.5}",
                        1.0 / (n - i) as f64
                    )
                } else {
                    String::new()
                };
                nat.push(format!(
                    "-A LAB-SERVICES -d {vip}/32 -p tcp --dport {port} {comment}{stat} -j DNAT --to-destination {b}"
                ));
            }
        }
    }
    nat.push("COMMIT".into());
    filter.push("COMMIT".into());
    nat.extend(filter);
    nat.join("\n") + "\n"
}

/// A pod's `/etc/hosts`: itself, then every Service by `svc.ns.svc.cluster.local`,
/// `svc.ns.svc`, `svc.ns`, and bare `svc` for its own namespace (what the search path of a
/// pod's resolv.conf would give). Headless Services list their ready pod addresses.
pub fn hosts_file(
    namespace: &str,
    pod_name: &str,
    pod_ip: Ipv4Addr,
    services: &[Value],
    slices: &[Value],
) -> String {
    let mut out = format!(
        "# written by ferry-lab (cluster DNS for namespace {namespace})\n127.0.0.1\tlocalhost\n::1\tlocalhost\n{pod_ip}\t{pod_name}\n"
    );
    for svc in services {
        let ns = svc["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = svc["metadata"]["name"].as_str().unwrap_or_default();
        let mut names = format!("{name}.{ns}.svc.cluster.local {name}.{ns}.svc {name}.{ns}");
        if ns == namespace {
            names = format!("{names} {name}");
        }
        match svc["spec"]["clusterIP"].as_str() {
            Some("None") => {
                for s in slices.iter().filter(|s| {
                    s["metadata"]["namespace"].as_str() == Some(ns)
                        && s["metadata"]["labels"]["kubernetes.io/service-name"].as_str()
                            == Some(name)
                }) {
                    for e in s["endpoints"].as_array().into_iter().flatten() {
                        if e["conditions"]["ready"] == json!(false) {
                            continue;
                        }
                        for a in e["addresses"].as_array().into_iter().flatten() {
                            out.push_str(&format!("{}\t{names}\n", a.as_str().unwrap_or_default()));
                        }
                    }
                }
            }
            Some(ip) => out.push_str(&format!("{ip}\t{names}\n")),
            None => {}
        }
    }
    out
}

/// FNV-1a, for stable short hashes (pod-template-hash).
pub fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

fn suffix(mut n: u64, len: usize) -> String {
    (0..len)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
            n /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

/// The pod-template-hash of a Deployment's template.
pub fn template_hash(deploy: &Value) -> String {
    suffix(fnv(&deploy["spec"]["template"].to_string()), 9)
}

/// What the Deployment (and its ReplicaSet) controller does next: Pods to create and names of
/// Pods to delete. Rollouts recreate: Pods of an old template are deleted as the new ones are
/// created. `existing` are the Pods owned by this Deployment.
pub fn deployment_plan(
    deploy: &Value,
    existing: &[Value],
    seq: &mut u64,
) -> (Vec<Value>, Vec<String>) {
    let name = deploy["metadata"]["name"].as_str().unwrap_or_default();
    let ns = deploy["metadata"]["namespace"].as_str().unwrap_or_default();
    let replicas = deploy["spec"]["replicas"].as_u64().unwrap_or(1) as usize;
    let hash = template_hash(deploy);
    let (current, old): (Vec<&Value>, Vec<&Value>) = existing
        .iter()
        .partition(|p| p["metadata"]["labels"]["pod-template-hash"].as_str() == Some(&hash));
    let mut delete: Vec<String> = old
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    delete.extend(
        current
            .iter()
            .skip(replicas)
            .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned)),
    );
    let mut create = Vec::new();
    for _ in current.len()..replicas {
        *seq += 1;
        let mut pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": deploy["spec"]["template"]["metadata"].clone(),
            "spec": deploy["spec"]["template"]["spec"].clone(),
        });
        // As the ReplicaSet controller does: generateName from the ReplicaSet's name, owned by
        // the ReplicaSet (the injector derives the workload name from exactly this).
        let rs = format!("{name}-{hash}");
        let pod_name = format!("{rs}-{}", suffix(fnv(&format!("{ns}/{name}/{seq}")), 5));
        pod["metadata"]["name"] = json!(pod_name);
        pod["metadata"]["generateName"] = json!(format!("{rs}-"));
        pod["metadata"]["namespace"] = json!(ns);
        pod["metadata"]["labels"]["pod-template-hash"] = json!(hash);
        pod["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs,
            "uid": format!("rs-{}", suffix(fnv(&format!("{}/{hash}", deploy["metadata"]["uid"])), 12)),
            "controller": true, "blockOwnerDeletion": true,
        }]);
        create.push(pod);
    }
    (create, delete)
}

/// Whether a Pod belongs to this Deployment (through a ReplicaSet `<deployment>-<hash>`).
pub fn owned_by(deploy: &Value, pod: &Value) -> bool {
    let (Some(name), Some(ns)) = (
        deploy["metadata"]["name"].as_str(),
        deploy["metadata"]["namespace"].as_str(),
    ) else {
        return false;
    };
    pod["metadata"]["namespace"].as_str() == Some(ns)
        && pod["metadata"]["ownerReferences"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|o| {
                o["kind"] == "ReplicaSet"
                    && o["name"].as_str().is_some_and(|rs| {
                        rs.strip_prefix(name)
                            .and_then(|r| r.strip_prefix('-'))
                            .is_some_and(|h| {
                                pod["metadata"]["labels"]["pod-template-hash"] == json!(h)
                            })
                    })
            })
}

/// The Deployment's status from its Pods.
pub fn deployment_status(deploy: &Value, owned: &[Value], failure: Option<&str>) -> Value {
    let hash = template_hash(deploy);
    let updated = owned
        .iter()
        .filter(|p| p["metadata"]["labels"]["pod-template-hash"].as_str() == Some(&hash))
        .count();
    let ready = owned.iter().filter(|p| pod_ready(p)).count();
    let mut st = json!({
        "observedGeneration": 1,
        "replicas": owned.len(),
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": ready,
    });
    if let Some(msg) = failure {
        st["conditions"] = json!([{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": msg}]);
    }
    st
}

/// Which webhooks of these MutatingWebhookConfigurations the API server calls for a Pod CREATE,
/// given its namespace's and its own labels.
pub fn webhooks_for_pod(
    configs: &[Value],
    ns_labels: &BTreeMap<String, String>,
    pod_labels: &BTreeMap<String, String>,
) -> Result<Vec<Value>, String> {
    use ferry_injector::selector::LabelSelector;
    let mut out = Vec::new();
    for cfg in configs {
        for hook in cfg["webhooks"].as_array().into_iter().flatten() {
            let applies = hook["rules"].as_array().into_iter().flatten().any(|r| {
                let has = |f: &str, v: &str| {
                    r[f].as_array()
                        .is_some_and(|a| a.iter().any(|x| x == v || x == "*"))
                };
                has("operations", "CREATE") && has("resources", "pods")
            });
            if !applies {
                continue;
            }
            let sel = |f: &str| -> Result<LabelSelector, String> {
                match hook.get(f) {
                    None | Some(Value::Null) => Ok(LabelSelector::default()),
                    Some(v) => serde_json::from_value(v.clone())
                        .map_err(|e| format!("webhook {}: {f}: {e}", hook["name"])),
                }
            };
            let ns_ok = sel("namespaceSelector")?
                .matches(ns_labels)
                .map_err(|e| e.to_string())?;
            let obj_ok = sel("objectSelector")?
                .matches(pod_labels)
                .map_err(|e| e.to_string())?;
            if ns_ok && obj_ok {
                out.push(hook.clone());
            }
        }
    }
    Ok(out)
}

/// A label map from an object (for selectors).
pub fn label_map(obj: &Value) -> BTreeMap<String, String> {
    labels(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeInfo {
        NodeInfo {
            name: "lab-node".into(),
            ip: Ipv4Addr::new(10, 244, 0, 1),
            cpus: 2,
            memory_bytes: 1 << 30,
        }
    }

    fn yaml(s: &str) -> Value {
        serde_yaml::from_str(s).expect("yaml")
    }

    #[test]
    fn expansion_follows_kubelet_rules() {
        let env = vec![
            ("A".to_owned(), "x".to_owned()),
            ("B".to_owned(), "y".to_owned()),
        ];
        assert_eq!(expand("$(A).$(B)", &env), "x.y");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("$(NOPE)-$(A", &env), "$(NOPE)-$(A");
        assert_eq!(expand("é$(A)", &env), "éx");
    }

    #[test]
    fn downward_api_and_resources() {
        let pod = yaml(
            r#"
metadata: {name: p, namespace: n, labels: {version: v2}, uid: u1}
spec:
  serviceAccountName: sa
  containers:
  - name: c
    resources: {limits: {cpu: 1500m, memory: 64Mi}}
    env:
    - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    - {name: NS, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
    - {name: IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
    - {name: SA, valueFrom: {fieldRef: {fieldPath: spec.serviceAccountName}}}
    - {name: V, valueFrom: {fieldRef: {fieldPath: "metadata.labels['version']"}}}
    - {name: CPU, valueFrom: {resourceFieldRef: {resource: limits.cpu, divisor: "1"}}}
    - {name: MEM, valueFrom: {resourceFieldRef: {resource: limits.memory, divisor: 1Mi}}}
    - {name: REQ, valueFrom: {resourceFieldRef: {resource: requests.cpu}}}
    - {name: DOMAIN, value: "$(NS).svc.cluster.local"}
"#,
        );
        let env = container_env(
            &pod,
            &pod["spec"]["containers"][0],
            Ipv4Addr::new(10, 244, 0, 9),
            &node(),
        )
        .expect("env");
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("POD_NAME"), Some("p"));
        assert_eq!(get("NS"), Some("n"));
        assert_eq!(get("IP"), Some("10.244.0.9"));
        assert_eq!(get("SA"), Some("sa"));
        assert_eq!(get("V"), Some("v2"));
        assert_eq!(get("CPU"), Some("2"));
        assert_eq!(get("MEM"), Some("64"));
        assert_eq!(get("REQ"), Some("2"), "no request: node capacity");
        assert_eq!(get("DOMAIN"), Some("n.svc.cluster.local"));
    }

    #[test]
    fn unsupported_env_sources_are_named() {
        let pod = yaml(
            "metadata: {name: p, namespace: n}\nspec: {containers: [{name: c, env: [{name: T, valueFrom: {secretKeyRef: {name: s, key: k}}}]}]}",
        );
        let err = container_env(
            &pod,
            &pod["spec"]["containers"][0],
            Ipv4Addr::LOCALHOST,
            &node(),
        )
        .unwrap_err();
        assert!(err.contains("env T: valueFrom.secretKeyRef"), "{err}");
    }

    #[test]
    fn images_map_to_programs() {
        let find = |c: &str| (c == "sleep").then(|| "/bin/sleep".to_owned());
        let pod = yaml(
            r#"
metadata: {name: p, namespace: n}
spec:
  securityContext: {runAsUser: 1000}
  initContainers:
  - {name: istio-init, image: "ghcr.io/ferry-mesh/ferry-proxy:0.1.0", args: [istio-iptables, -p, "15001"], securityContext: {runAsUser: 0}}
  - name: istio-proxy
    image: docker.io/istio/proxyv2:1.24.0
    args: [proxy, sidecar, --domain, $(POD_NAMESPACE).svc.cluster.local]
    env: [{name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}]
    securityContext: {runAsUser: 1337, runAsGroup: 1337}
  containers:
  - {name: app, image: example/app:1, ports: [{containerPort: 9080}, {containerPort: 53, protocol: UDP}]}
  - {name: client, image: curlimages/curl, command: [sleep, "3600"]}
  - {name: bad, image: x, command: [nosuch]}
"#,
        );
        let plan = |c: &Value| plan_process(&pod, c, Ipv4Addr::LOCALHOST, &node(), &find);
        let init = plan(&pod["spec"]["initContainers"][0]).expect("init");
        assert_eq!(init.program, Program::Workspace("ferry-init"));
        assert_eq!(init.args, ["-p", "15001"]);
        assert_eq!((init.uid, init.gid), (0, 0));
        let proxy = plan(&pod["spec"]["initContainers"][1]).expect("proxy");
        assert_eq!(proxy.program, Program::Workspace("ferry-proxy"));
        assert_eq!(proxy.args[3], "n.svc.cluster.local");
        assert_eq!((proxy.uid, proxy.gid), (1337, 1337));
        let app = plan(&pod["spec"]["containers"][0]).expect("app");
        assert_eq!(app.program, Program::Echo { ports: vec![9080] });
        assert_eq!(app.uid, 1000, "pod-level runAsUser");
        let client = plan(&pod["spec"]["containers"][1]).expect("client");
        assert_eq!(client.program, Program::Host("/bin/sleep".into()));
        assert_eq!(client.args, ["3600"]);
        let err = plan(&pod["spec"]["containers"][2]).unwrap_err();
        assert!(
            err.contains("\"nosuch\": executable file not found"),
            "{err}"
        );
    }

    #[test]
    fn prepare_checks_kinds_versions_and_names() {
        let (vs, _) = prepare(
            yaml("apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {name: r}\nspec: {hosts: [r]}"),
            "canary",
        )
        .expect("vs");
        assert_eq!(vs["apiVersion"], "networking.istio.io/v1");
        assert_eq!(vs["metadata"]["namespace"], "canary");
        let err = prepare(
            yaml("apiVersion: batch/v1\nkind: Job\nmetadata: {name: j}"),
            "d",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("kind Job (batch/v1) is not supported"),
            "{err}"
        );
        let err = prepare(
            yaml("apiVersion: apps/v2\nkind: Deployment\nmetadata: {name: d}"),
            "d",
        )
        .unwrap_err();
        assert!(err.to_string().contains("use apps/v1"), "{err}");
        let err = prepare(yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: ../etc}\nspec: {containers: [{name: a}]}"), "d").unwrap_err();
        assert!(err.to_string().contains("metadata.name"), "{err}");
        let err = prepare(
            yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {}"),
            "d",
        )
        .unwrap_err();
        assert!(err.to_string().contains("spec.containers"), "{err}");
        let err = prepare(
            yaml("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {selector: {matchLabels: {app: a}}, template: {metadata: {labels: {app: b}}, spec: {containers: [{name: c}]}}}"),
            "d",
        )
        .unwrap_err();
        assert!(err.to_string().contains("matchLabels"), "{err}");
        let (ns, _) = prepare(
            yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: canary, namespace: x}"),
            "d",
        )
        .expect("ns");
        assert!(ns["metadata"].get("namespace").is_none());
        assert!(prepare(yaml("- a\n- b"), "d").is_err());
        let (_, warnings) = prepare(
            yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {hostPID: true, volumes: [{name: v}], containers: [{name: c, workingDir: /x, livenessProbe: {}, resources: {}}]}"),
            "d",
        )
        .expect("pod");
        for want in [
            "spec.hostPID is not modelled",
            "spec.volumes are not mounted",
            "container c: workingDir is not modelled",
            "container c: livenessProbe is not modelled",
        ] {
            assert!(
                warnings.iter().any(|w| w.contains(want)),
                "{want}: {warnings:?}"
            );
        }
        assert!(
            !warnings.iter().any(|w| w.contains("resources")),
            "{warnings:?}"
        );
        let (_, warnings) = prepare(yaml("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {type: LoadBalancer, ports: [{port: 53, protocol: UDP}]}"), "d").expect("svc");
        assert_eq!(warnings.len(), 2, "{warnings:?}");
    }

    fn svc_and_pods() -> (Value, Vec<Value>) {
        let svc = yaml(
            "metadata: {name: app, namespace: canary, uid: s1}\nspec: {clusterIP: 10.96.0.11, selector: {app: app}, ports: [{name: http, port: 80, targetPort: web}]}",
        );
        let pod = |name: &str, ip: &str, ready: bool, app: &str| {
            yaml(&format!(
                "metadata: {{name: {name}, namespace: canary, labels: {{app: {app}}}}}\nspec: {{containers: [{{name: c, ports: [{{name: web, containerPort: 8080}}]}}]}}\nstatus: {{podIP: {ip}, conditions: [{{type: Ready, status: \"{}\"}}]}}",
                if ready { "True" } else { "False" }
            ))
        };
        (
            svc,
            vec![
                pod("a", "10.244.0.2", true, "app"),
                pod("b", "10.244.0.3", false, "app"),
                pod("c", "10.244.0.4", true, "other"),
            ],
        )
    }

    #[test]
    fn endpoint_slices_and_kube_proxy() {
        let (svc, pods) = svc_and_pods();
        let slice = endpoint_slice(&svc, &pods, "lab-node").expect("slice");
        assert_eq!(slice["ports"][0]["port"], 8080, "named targetPort resolved");
        assert_eq!(slice["endpoints"].as_array().map(Vec::len), Some(2));
        assert_eq!(slice["endpoints"][1]["conditions"]["ready"], false);
        let rules = kube_proxy_rules(std::slice::from_ref(&svc), std::slice::from_ref(&slice));
        assert!(rules.contains("-d 10.96.0.11/32 -p tcp --dport 80 -m comment --comment \"canary/app:http\" -j DNAT --to-destination 10.244.0.2:8080"), "{rules}");
        assert!(
            !rules.contains("10.244.0.3"),
            "not-ready endpoint excluded: {rules}"
        );
        let none = kube_proxy_rules(std::slice::from_ref(&svc), &[]);
        assert!(none.contains("-j REJECT --reject-with tcp-reset"), "{none}");
        let two = kube_proxy_rules(
            std::slice::from_ref(&svc),
            &[
                json!({"metadata": {"namespace": "canary", "labels": {"kubernetes.io/service-name": "app"}}, "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": ["10.244.0.2"]}, {"addresses": ["10.244.0.5"]}]}),
            ],
        );
        assert!(
            two.contains("--probability 0.50000 -j DNAT --to-destination 10.244.0.2:8080"),
            "{two}"
        );
        assert!(
            two.contains("\" -j DNAT --to-destination 10.244.0.5:8080"),
            "{two}"
        );
        let no_selector =
            yaml("metadata: {name: x, namespace: canary}\nspec: {ports: [{port: 1}]}");
        assert!(endpoint_slice(&no_selector, &pods, "n").is_none());
    }

    #[test]
    fn hosts_files_give_each_namespace_its_short_names() {
        let (svc, _) = svc_and_pods();
        let other = yaml("metadata: {name: db, namespace: data}\nspec: {clusterIP: 10.96.0.12}");
        let h = hosts_file(
            "canary",
            "client-1",
            Ipv4Addr::new(10, 244, 0, 7),
            &[svc, other],
            &[],
        );
        assert!(
            h.contains("10.96.0.11\tapp.canary.svc.cluster.local app.canary.svc app.canary app\n"),
            "{h}"
        );
        assert!(
            h.contains("10.96.0.12\tdb.data.svc.cluster.local db.data.svc db.data\n"),
            "{h}"
        );
        assert!(h.contains("10.244.0.7\tclient-1\n"));
        let headless = yaml("metadata: {name: db, namespace: canary}\nspec: {clusterIP: None}");
        let slice = json!({"metadata": {"namespace": "canary", "labels": {"kubernetes.io/service-name": "db"}},
            "endpoints": [{"addresses": ["10.244.0.8"], "conditions": {"ready": true}}, {"addresses": ["10.244.0.9"], "conditions": {"ready": false}}]});
        let h = hosts_file(
            "canary",
            "c",
            Ipv4Addr::new(10, 244, 0, 7),
            &[headless],
            &[slice],
        );
        assert!(
            h.contains("10.244.0.8\tdb.canary.svc.cluster.local db.canary.svc db.canary db\n"),
            "{h}"
        );
        assert!(!h.contains("10.244.0.9"), "not-ready endpoint: {h}");
    }

    #[test]
    fn deployments_scale_and_recreate() {
        let d = yaml(
            "metadata: {name: app-v1, namespace: canary, uid: d1}\nspec: {replicas: 2, selector: {matchLabels: {app: app}}, template: {metadata: {labels: {app: app, version: v1}}, spec: {containers: [{name: app, image: x}]}}}",
        );
        let mut seq = 0;
        let (create, delete) = deployment_plan(&d, &[], &mut seq);
        assert_eq!(create.len(), 2);
        assert!(delete.is_empty());
        assert_ne!(create[0]["metadata"]["name"], create[1]["metadata"]["name"]);
        assert_eq!(create[0]["metadata"]["labels"]["version"], "v1");
        assert_eq!(
            create[0]["metadata"]["ownerReferences"][0]["kind"],
            "ReplicaSet"
        );
        assert!(create.iter().all(|p| owned_by(&d, p)));
        let mut other = d.clone();
        other["metadata"]["name"] = json!("app");
        assert!(
            !owned_by(&other, &create[0]),
            "prefix of another deployment's name"
        );
        let (again, _) = deployment_plan(&d, &create, &mut seq);
        assert!(again.is_empty(), "converged");
        let mut d2 = d.clone();
        d2["spec"]["template"]["metadata"]["labels"]["version"] = json!("v2");
        d2["spec"]["replicas"] = json!(1);
        let (create2, delete2) = deployment_plan(&d2, &create, &mut seq);
        assert_eq!(create2.len(), 1);
        assert_eq!(delete2.len(), 2, "old template's pods go");
        let st = deployment_status(&d2, &create2, None);
        assert_eq!(st["updatedReplicas"], 1);
    }

    #[test]
    fn webhook_selection_uses_both_selectors() {
        let hooks = ferry_injector::webhooks::istio_webhooks("", false);
        let cfg = json!({"webhooks": hooks.iter().map(|h| {
            let mut v = serde_json::to_value(h).expect("hook");
            v["rules"] = json!([{"operations": ["CREATE"], "resources": ["pods"], "apiGroups": [""], "apiVersions": ["v1"]}]);
            v
        }).collect::<Vec<_>>()});
        let l = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let call = |ns: &[(&str, &str)], pod: &[(&str, &str)]| {
            webhooks_for_pod(std::slice::from_ref(&cfg), &l(ns), &l(pod))
                .expect("selectors")
                .iter()
                .map(|h| h["name"].as_str().unwrap_or_default().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            call(&[("istio-injection", "enabled")], &[]),
            ["namespace.sidecar-injector.istio.io"]
        );
        assert!(
            call(
                &[("istio-injection", "enabled")],
                &[("sidecar.istio.io/inject", "false")]
            )
            .is_empty()
        );
        assert!(call(&[], &[]).is_empty());
        assert_eq!(
            call(&[], &[("sidecar.istio.io/inject", "true")]),
            ["object.sidecar-injector.istio.io"]
        );
    }
}
