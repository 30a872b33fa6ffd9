//! The mutation: a Pod in, the injected Pod out, as Istio's `sidecar` template and webhook
//! post-processing produce it (conformance README §3.3-§3.8). Pure: no I/O.
//!
//! The injected containers and volumes are written as JSON mirroring the template, then
//! deserialized into k8s-openapi types, so the result is always a valid `Pod`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, EnvVar, LocalObjectReference, Pod, Volume};
use serde_json::{Map, Value, json};

use crate::annotations::{self as ann, TrafficSettings};
use crate::config::Config;
use crate::decision::{self, Decision, PodFacts, Rules};
use crate::{probes, proxyconfig, quantity};

pub const PROXY_CONTAINER: &str = "istio-proxy";
pub const INIT_CONTAINER: &str = "istio-init";
pub const VALIDATION_CONTAINER: &str = "istio-validation";

/// Injection could not be done; the pod is rejected with this message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Annotation(#[from] ann::Invalid),
    #[error("the pod has no spec")]
    NoSpec,
    #[error("internal error building the injected pod: {0}")]
    Internal(String),
}

/// Inputs besides the pod that the webhook knows: the request's namespace, and env overrides from
/// the `/inject/<k>/<v>` path.
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub namespace: Option<String>,
    pub path_env: BTreeMap<String, String>,
    /// The owning workload when the caller knows it (offline injection of a Deployment's
    /// template); otherwise it is derived from the pod's owner references, as the webhook must.
    pub workload: Option<Workload>,
}

/// What happened.
#[derive(Clone, Debug)]
pub enum Outcome {
    Injected { pod: Box<Pod>, decision: Decision },
    Skipped(Decision),
}

/// The workload a pod belongs to (Istio's `GetDeployMetaFromPod`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub kind: String,
    pub api_version: String,
}

impl Workload {
    pub fn of(pod: &Pod, namespace: &str) -> Workload {
        let meta = &pod.metadata;
        let labels = meta.labels.clone().unwrap_or_default();
        let mut w = Workload {
            name: meta.name.clone().unwrap_or_default(),
            namespace: namespace.to_owned(),
            kind: "Pod".into(),
            api_version: "v1".into(),
        };
        let generated = meta.generate_name.as_deref().is_some_and(|g| !g.is_empty());
        let controller = meta
            .owner_references
            .iter()
            .flatten()
            .find(|r| r.controller == Some(true));
        if generated && let Some(owner) = controller {
            w.api_version = owner.api_version.clone();
            w.kind = owner.kind.clone();
            w.name = owner.name.clone();
            let hash = labels.get("pod-template-hash").filter(|h| !h.is_empty());
            if owner.kind == "ReplicaSet"
                && let Some(h) = hash
                && owner.name.ends_with(h.as_str())
            {
                w.name = owner
                    .name
                    .trim_end_matches(h.as_str())
                    .trim_end_matches('-')
                    .to_owned();
                w.kind = "Deployment".into();
                w.api_version = "apps/v1".into();
            } else if owner.kind == "Job"
                && let Some(cron) = cronjob_name(&owner.name)
            {
                w.name = cron;
                w.kind = "CronJob".into();
                w.api_version = "batch/v1".into();
            }
        }
        if w.name.is_empty() {
            // A pod created with only generateName and no controller: its prefix is the best name.
            w.name = meta
                .generate_name
                .clone()
                .unwrap_or_default()
                .trim_end_matches('-')
                .to_owned();
        }
        w
    }

    /// `kubernetes://apis/<apiVersion>/namespaces/<ns>/<kind>s/<name>`.
    pub fn owner_uri(&self) -> String {
        let ns = if self.namespace.is_empty() {
            "default"
        } else {
            &self.namespace
        };
        format!(
            "kubernetes://apis/{}/namespaces/{ns}/{}s/{}",
            self.api_version,
            self.kind.to_lowercase(),
            self.name
        )
    }
}

/// `<cronjob>-<8 to 10 digits>` → `<cronjob>`.
fn cronjob_name(job: &str) -> Option<String> {
    let (base, suffix) = job.rsplit_once('-')?;
    ((8..=10).contains(&suffix.len())
        && suffix.chars().all(|c| c.is_ascii_digit())
        && !base.is_empty())
    .then(|| base.to_owned())
}

/// Whether a pod is run by a Job (it must be able to complete).
pub fn job_owned(pod: &Pod) -> bool {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|r| r.kind == "Job" && r.controller == Some(true))
}

/// The decision for a pod under a config (namespace from the pod, else the request).
pub fn decide(pod: &Pod, cfg: &Config, namespace: &str) -> Decision {
    let empty = BTreeMap::new();
    let facts = PodFacts {
        namespace,
        labels: pod.metadata.labels.as_ref().unwrap_or(&empty),
        annotations: pod.metadata.annotations.as_ref().unwrap_or(&empty),
        host_network: pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false),
    };
    decision::inject_required(
        &facts,
        &Rules {
            policy: cfg.policy,
            never_inject_selector: &cfg.never_inject_selector,
            always_inject_selector: &cfg.always_inject_selector,
        },
    )
}

/// Decide, then inject if the decision says so.
pub fn process(pod: &Pod, cfg: &Config, req: &Request) -> Result<Outcome, Error> {
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .or_else(|| req.namespace.clone())
        .unwrap_or_default();
    let decision = decide(pod, cfg, &namespace);
    if !decision.inject {
        return Ok(Outcome::Skipped(decision));
    }
    let pod = inject(pod, cfg, req)?;
    Ok(Outcome::Injected {
        pod: Box::new(pod),
        decision,
    })
}

/// The `sidecar.istio.io/status` record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub init_containers: Vec<String>,
    pub containers: Vec<String>,
    pub volumes: Vec<String>,
    pub image_pull_secrets: Vec<String>,
    pub revision: String,
}

impl Status {
    /// Fixed key order; empty lists are `null` (Istio's format).
    pub fn to_json(&self) -> String {
        let list = |l: &Vec<String>| if l.is_empty() { Value::Null } else { json!(l) };
        let mut m = Map::new();
        m.insert("initContainers".into(), list(&self.init_containers));
        m.insert("containers".into(), list(&self.containers));
        m.insert("volumes".into(), list(&self.volumes));
        m.insert("imagePullSecrets".into(), list(&self.image_pull_secrets));
        m.insert("revision".into(), json!(self.revision));
        Value::Object(m).to_string()
    }

    pub fn parse(s: &str) -> Status {
        let v: Value = serde_json::from_str(s).unwrap_or(Value::Null);
        let list = |k: &str| -> Vec<String> {
            v.get(k)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        Status {
            init_containers: list("initContainers"),
            containers: list("containers"),
            volumes: list("volumes"),
            image_pull_secrets: list("imagePullSecrets"),
            revision: v
                .get("revision")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        }
    }
}

fn canonical_resources(cfg: &Config, a: &BTreeMap<String, String>) -> Value {
    let q = |v: &str| quantity::canonical(v).unwrap_or_else(|| v.to_owned());
    let any = [
        ann::PROXY_CPU,
        ann::PROXY_MEMORY,
        ann::PROXY_CPU_LIMIT,
        ann::PROXY_MEMORY_LIMIT,
    ]
    .iter()
    .any(|k| a.contains_key(*k));
    let mut out = Map::new();
    if any {
        // Any of the four annotations replaces the default resources completely.
        let side = |cpu: &str, memory: &str| -> Map<String, Value> {
            [("cpu", cpu), ("memory", memory)]
                .into_iter()
                .filter_map(|(res, k)| a.get(k).map(|v| (res.to_owned(), json!(q(v)))))
                .collect()
        };
        let req = side(ann::PROXY_CPU, ann::PROXY_MEMORY);
        let lim = side(ann::PROXY_CPU_LIMIT, ann::PROXY_MEMORY_LIMIT);
        if !req.is_empty() {
            out.insert("requests".into(), Value::Object(req));
        }
        if !lim.is_empty() {
            out.insert("limits".into(), Value::Object(lim));
        }
    } else {
        let r = &cfg.proxy.resources;
        let side = |m: &BTreeMap<String, String>| {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), json!(q(v)))).collect())
        };
        if !r.requests.is_empty() {
            out.insert("requests".into(), side(&r.requests));
        }
        if !r.limits.is_empty() {
            out.insert("limits".into(), side(&r.limits));
        }
    }
    Value::Object(out)
}

/// `ISTIO_META_POD_PORTS`: the template's hand-made JSON list.
fn pod_ports_json(containers: &[Container]) -> String {
    let mut out = String::from("[");
    let mut first = true;
    for c in containers {
        for p in c.ports.iter().flatten() {
            // Go's ContainerPort field order: name, hostPort, containerPort, protocol, hostIP.
            let mut m = Map::new();
            if let Some(n) = &p.name {
                m.insert("name".into(), json!(n));
            }
            if let Some(h) = p.host_port.filter(|h| *h != 0) {
                m.insert("hostPort".into(), json!(h));
            }
            m.insert("containerPort".into(), json!(p.container_port));
            if let Some(pr) = &p.protocol {
                m.insert("protocol".into(), json!(pr));
            }
            if let Some(ip) = &p.host_ip {
                m.insert("hostIP".into(), json!(ip));
            }
            out.push_str("\n    ");
            if !first {
                out.push(',');
            }
            out.push_str(&Value::Object(m).to_string());
            first = false;
        }
    }
    out.push_str("\n]");
    out
}

fn env(name: &str, value: impl Into<String>) -> Value {
    json!({"name": name, "value": value.into()})
}

fn field_env(name: &str, path: &str) -> Value {
    json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}})
}

fn resource_env(name: &str, resource: &str) -> Value {
    json!({"name": name, "valueFrom": {"resourceFieldRef": {"resource": resource, "divisor": "1"}}})
}

fn trim_canonical(s: &str) -> String {
    let t: String = s.chars().take(63).collect();
    t.trim_matches(|c| c == '-' || c == '_' || c == '.')
        .to_owned()
}

/// Merge a container the pod already has under an injected name over ours (strategic merge).
fn overlay(ours: Container, user: &Container) -> Result<Container, Error> {
    let base = serde_json::to_value(&ours).map_err(|e| Error::Internal(e.to_string()))?;
    let over = serde_json::to_value(user).map_err(|e| Error::Internal(e.to_string()))?;
    serde_json::from_value(crate::smp::merge(base, over))
        .map_err(|e| Error::Internal(e.to_string()))
}

/// Inject a pod (the decision is the caller's). Idempotent: re-injecting an injected pod strips
/// what the previous injection added (names from its status annotation) and renders it again.
pub fn inject(pod: &Pod, cfg: &Config, req: &Request) -> Result<Pod, Error> {
    let mut pod = pod.clone();
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .or_else(|| req.namespace.clone())
        .unwrap_or_default();
    let mut annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let mut labels = pod.metadata.labels.clone().unwrap_or_default();

    // Validate everything before rendering anything.
    let user_pc = match annotations.get(ann::PROXY_CONFIG) {
        Some(text) => proxyconfig::parse_annotation(text).map_err(|reason| ann::Invalid {
            name: ann::PROXY_CONFIG.into(),
            value: text.clone(),
            param: "proxyConfig".into(),
            reason,
        })?,
        None => Value::Object(Map::new()),
    };
    ann::validate_others(&annotations)?;
    let pc = proxyconfig::merge(&cfg.default_proxy_config, &user_pc);
    let traffic = TrafficSettings::resolve(cfg, &annotations, &pc);
    traffic.validate()?;

    let workload = req
        .workload
        .clone()
        .unwrap_or_else(|| Workload::of(&pod, &namespace));
    let is_job = job_owned(&pod) || matches!(workload.kind.as_str(), "Job" | "CronJob");
    let spec = pod.spec.as_mut().ok_or(Error::NoSpec)?;

    // 1. A previous injection: its volumes and pull secrets are re-rendered; its containers stay
    //    and are merged over the new ones below (Istio's strategic merge), so re-injection is
    //    idempotent and keeps what the previous injection had.
    let previous = annotations.remove(ann::STATUS).map(|s| Status::parse(&s));
    if let Some(prev) = &previous {
        if let Some(v) = spec.volumes.as_mut() {
            v.retain(|vol| !prev.volumes.contains(&vol.name));
        }
        if let Some(s) = spec.image_pull_secrets.as_mut() {
            s.retain(|r| !prev.image_pull_secrets.contains(&r.name));
        }
    }
    // 2. Containers already present under an injected name (the user's, or the previous
    //    injection's) are overrides, merged over ours last.
    let injected_names = [PROXY_CONTAINER, INIT_CONTAINER, VALIDATION_CONTAINER];
    let mut overrides: BTreeMap<String, Container> = BTreeMap::new();
    for list in [
        &mut spec.containers,
        spec.init_containers.get_or_insert_with(Vec::new),
    ] {
        for c in list
            .iter()
            .filter(|c| injected_names.contains(&c.name.as_str()))
        {
            overrides.insert(c.name.clone(), c.clone());
        }
        list.retain(|c| !injected_names.contains(&c.name.as_str()));
    }

    // 3. Settings.
    let tproxy = traffic.mode == "TPROXY";
    let cap_net_bind = annotations
        .get("sidecar.istio.io/capNetBindService")
        .map(|v| v == "true")
        .unwrap_or(cfg.proxy.cap_net_bind_service);
    let native = match annotations.get(ann::NATIVE_SIDECAR) {
        Some(v) => v != "false",
        // A Job only completes if its sidecar stops with the app: native sidecars do exactly that.
        None => cfg.native_sidecars || is_job,
    };
    let hold = (pc
        .get("holdApplicationUntilProxyStarts")
        .and_then(Value::as_bool)
        .unwrap_or(false)
        || cfg.proxy.hold_application_until_proxy_starts)
        && !native;
    let status_port = traffic.status_port.trim().to_owned();
    let status_port_num: i32 = status_port.parse().unwrap_or(0);
    let user_uid = overrides
        .get(PROXY_CONTAINER)
        .and_then(|c| c.security_context.as_ref())
        .and_then(|s| s.run_as_user)
        .filter(|u| *u != 0);
    let user_gid = overrides
        .get(PROXY_CONTAINER)
        .and_then(|c| c.security_context.as_ref())
        .and_then(|s| s.run_as_group);
    let proxy_uid = user_uid
        .map(|u| u.to_string())
        .unwrap_or_else(|| "1337".into());
    let proxy_gid = user_gid
        .map(|g| g.to_string())
        .unwrap_or_else(|| "1337".into());
    let agent_log_level = annotations
        .get("sidecar.istio.io/agentLogLevel")
        .cloned()
        .unwrap_or_else(|| cfg.logging_level.clone());
    let app_containers: Vec<String> = spec.containers.iter().map(|c| c.name.clone()).collect();
    let resources = canonical_resources(cfg, &annotations);
    let metadata_env: Vec<Value> = proxyconfig::metadata(&pc)
        .into_iter()
        .map(|(k, v)| env(&k, v))
        .collect();
    let image_for = |default: &str| match annotations.get("sidecar.istio.io/proxyImage") {
        Some(i) if i.contains('/') => i.clone(),
        _ => default.to_owned(),
    };
    let ints = |k: &str, d: i32| {
        annotations
            .get(k)
            .and_then(|v| v.trim().parse::<i32>().ok())
            .unwrap_or(d)
    };

    // 4. istio-init (or istio-validation under Istio CNI).
    let mut init_containers: Vec<Container> = Vec::new();
    if traffic.mode != "NONE" {
        let init_name = if cfg.cni_enabled {
            VALIDATION_CONTAINER
        } else {
            INIT_CONTAINER
        };
        let uid_arg = if tproxy {
            "1337".to_owned()
        } else {
            proxy_uid.clone()
        };
        // A user runAsUser on istio-proxy is what the rules must exempt, even under TPROXY.
        let uid_arg = user_uid.map(|u| u.to_string()).unwrap_or(uid_arg);
        let args = traffic.init_args(cfg, &uid_arg, &agent_log_level);
        // ferry-init checks the final argument list too: the injector must never emit one it rejects.
        let parsed = <ferry_init::config::Args as clap::Parser>::try_parse_from(&args)
            .map_err(|e| Error::Internal(format!("istio-init args {args:?}: {e}")))?;
        ferry_init::config::Config::from_args(&parsed, &std::collections::HashMap::new())
            .map_err(|e| Error::Internal(format!("istio-init args {args:?}: {e}")))?;
        let security = if cfg.cni_enabled {
            let (g, u) = if tproxy {
                ("1337".to_owned(), "1337".to_owned())
            } else {
                (proxy_gid.clone(), proxy_uid.clone())
            };
            json!({
                "allowPrivilegeEscalation": cfg.proxy.privileged, "privileged": cfg.proxy.privileged,
                "capabilities": {"drop": ["ALL"]},
                "readOnlyRootFilesystem": true, "runAsGroup": g.parse::<i64>().unwrap_or(1337),
                "runAsUser": u.parse::<i64>().unwrap_or(1337), "runAsNonRoot": true,
            })
        } else {
            json!({
                "allowPrivilegeEscalation": cfg.proxy.privileged, "privileged": cfg.proxy.privileged,
                "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                "readOnlyRootFilesystem": false, "runAsGroup": 0, "runAsNonRoot": false, "runAsUser": 0,
            })
        };
        let mut init = json!({
            "name": init_name,
            "image": image_for(cfg.init_image()),
            "args": args,
            "resources": resources,
            "securityContext": security,
        });
        if let Some(p) = &cfg.image_pull_policy {
            init["imagePullPolicy"] = json!(p);
        }
        if !metadata_env.is_empty() {
            init["env"] = json!(metadata_env);
        }
        init_containers.push(typed(init)?);
    }

    // 5. istio-proxy.
    let mode_env = annotations
        .get(ann::INTERCEPTION_MODE)
        .cloned()
        .unwrap_or_else(|| traffic.mode.clone());
    let mut penv: Vec<Value> = vec![
        env("PILOT_CERT_PROVIDER", &cfg.pilot_cert_provider),
        env(
            "CA_ADDR",
            if cfg.ca_address.is_empty() {
                let rev = if cfg.revision.is_empty() {
                    String::new()
                } else {
                    format!("-{}", cfg.revision)
                };
                format!("istiod{rev}.{}.svc:15012", cfg.istio_namespace)
            } else {
                cfg.ca_address.clone()
            },
        ),
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("INSTANCE_IP", "status.podIP"),
        field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field_env("HOST_IP", "status.hostIP"),
        resource_env("ISTIO_CPU_LIMIT", "limits.cpu"),
        env("PROXY_CONFIG", proxyconfig::to_env_json(&pc)),
        env("ISTIO_META_POD_PORTS", pod_ports_json(&spec.containers)),
        env("ISTIO_META_APP_CONTAINERS", app_containers.join(",")),
        resource_env("GOMEMLIMIT", "limits.memory"),
        env(
            "ISTIO_META_CLUSTER_ID",
            if cfg.cluster_name.is_empty() {
                "Kubernetes"
            } else {
                &cfg.cluster_name
            },
        ),
        field_env("ISTIO_META_NODE_NAME", "spec.nodeName"),
        env("ISTIO_META_INTERCEPTION_MODE", mode_env),
    ];
    let workload_name = labels
        .get("service.istio.io/workload-name")
        .cloned()
        .unwrap_or_else(|| workload.name.clone());
    if !workload_name.is_empty() {
        penv.push(env("ISTIO_META_WORKLOAD_NAME", workload_name));
    }
    if !workload.name.is_empty() {
        penv.push(env("ISTIO_META_OWNER", workload.owner_uri()));
    }
    if annotations.contains_key("sidecar.istio.io/bootstrapOverride") {
        penv.push(env(
            "ISTIO_BOOTSTRAP_OVERRIDE",
            "/etc/istio/custom-bootstrap/custom_bootstrap.json",
        ));
    }
    let mesh_id = if cfg.mesh_id.is_empty() {
        cfg.trust_domain.clone()
    } else {
        cfg.mesh_id.clone()
    };
    if !mesh_id.is_empty() {
        penv.push(env("ISTIO_META_MESH_ID", mesh_id));
    }
    if !cfg.trust_domain.is_empty() {
        penv.push(env("TRUST_DOMAIN", &cfg.trust_domain));
    }
    penv.extend(metadata_env.iter().cloned());

    let proxy_security = if tproxy || cap_net_bind {
        let mut add = vec![];
        if tproxy {
            add.push("NET_ADMIN");
        }
        if cap_net_bind {
            add.push("NET_BIND_SERVICE");
        }
        json!({
            "allowPrivilegeEscalation": cfg.proxy.privileged, "capabilities": {"add": add, "drop": ["ALL"]},
            "privileged": cfg.proxy.privileged, "readOnlyRootFilesystem": true,
            "runAsNonRoot": false, "runAsUser": 0, "runAsGroup": 1337,
        })
    } else {
        json!({
            "allowPrivilegeEscalation": cfg.proxy.privileged, "capabilities": {"drop": ["ALL"]},
            "privileged": cfg.proxy.privileged, "readOnlyRootFilesystem": true,
            "runAsNonRoot": true, "runAsUser": proxy_uid.parse::<i64>().unwrap_or(1337),
            "runAsGroup": proxy_gid.parse::<i64>().unwrap_or(1337),
        })
    };
    let mut mounts = vec![
        json!({"name": "workload-socket", "mountPath": "/var/run/secrets/workload-spiffe-uds"}),
        json!({"name": "credential-socket", "mountPath": "/var/run/secrets/credential-uds"}),
        json!({"name": "workload-certs", "mountPath": "/var/run/secrets/workload-spiffe-credentials"}),
    ];
    if cfg.pilot_cert_provider == "istiod" {
        mounts.push(json!({"mountPath": "/var/run/secrets/istio", "name": "istiod-ca-cert"}));
        mounts.push(json!({"mountPath": "/var/run/secrets/istio/crl", "name": "istio-ca-crl"}));
    }
    mounts.push(json!({"mountPath": "/var/lib/istio/data", "name": "istio-data"}));
    if annotations.contains_key("sidecar.istio.io/bootstrapOverride") {
        mounts.push(
            json!({"mountPath": "/etc/istio/custom-bootstrap", "name": "custom-bootstrap-volume"}),
        );
    }
    mounts.push(json!({"mountPath": "/etc/istio/proxy", "name": "istio-envoy"}));
    mounts.push(json!({"mountPath": "/var/run/secrets/tokens", "name": "istio-token"}));
    mounts.push(json!({"name": "istio-podinfo", "mountPath": "/etc/istio/pod"}));
    let user_mounts = json_object_annotation(&annotations, "sidecar.istio.io/userVolumeMount")?;
    for (name, spec_v) in &user_mounts {
        let mut m = spec_v.clone();
        m["name"] = json!(name);
        mounts.push(m);
    }

    let mut proxy = json!({
        "name": PROXY_CONTAINER,
        "image": image_for(&cfg.proxy_image),
        "ports": [{"containerPort": 15090, "protocol": "TCP", "name": "http-envoy-prom"}],
        "args": [
            "proxy", "sidecar", "--domain", format!("$(POD_NAMESPACE).svc.{}", cfg.proxy.cluster_domain),
            format!("--proxyLogLevel={}", annotations.get("sidecar.istio.io/logLevel").unwrap_or(&cfg.proxy.log_level)),
            format!("--proxyComponentLogLevel={}", annotations.get("sidecar.istio.io/componentLogLevel").unwrap_or(&cfg.proxy.component_log_level)),
            format!("--log_output_level={agent_log_level}"),
        ],
        "env": penv,
        "securityContext": proxy_security,
        "resources": resources,
        "volumeMounts": mounts,
    });
    if cfg.log_as_json
        && let Some(a) = proxy["args"].as_array_mut()
    {
        a.push(json!("--log_as_json"));
    }
    if native {
        proxy["restartPolicy"] = json!("Always");
    }
    if hold {
        proxy["lifecycle"] = json!({"postStart": {"exec": {"command": ["pilot-agent", "wait"]}}});
    } else if native {
        proxy["lifecycle"] = json!({"preStop": {"exec": {"command": [
            "pilot-agent", "request", format!("--debug-port={status_port}"), "POST", "drain"]}}});
    }
    if let Some(p) = &cfg.image_pull_policy {
        proxy["imagePullPolicy"] = json!(p);
    }
    if status_port != "0" {
        if cfg.proxy.startup_probe.enabled {
            proxy["startupProbe"] = json!({
                "httpGet": {"path": "/healthz/ready", "port": 15021}, "initialDelaySeconds": 0,
                "periodSeconds": 1, "timeoutSeconds": 3, "failureThreshold": cfg.proxy.startup_probe.failure_threshold,
            });
        }
        proxy["readinessProbe"] = json!({
            "httpGet": {"path": "/healthz/ready", "port": 15021},
            "initialDelaySeconds": ints(ann::READINESS_INITIAL_DELAY, cfg.proxy.readiness_initial_delay_seconds),
            "periodSeconds": ints(ann::READINESS_PERIOD, cfg.proxy.readiness_period_seconds),
            "timeoutSeconds": 3,
            "failureThreshold": ints(ann::READINESS_FAILURE_THRESHOLD, cfg.proxy.readiness_failure_threshold),
        });
    }
    let mut proxy: Container = typed(proxy)?;
    drop_zero_initial_delay(&mut proxy);

    // 6. Volumes.
    let mut volumes: Vec<Value> = vec![
        json!({"name": "workload-socket"}),
        json!({"name": "credential-socket"}),
        json!({"name": "workload-certs"}),
    ];
    if let Some(cm) = annotations.get("sidecar.istio.io/bootstrapOverride") {
        volumes.push(json!({"name": "custom-bootstrap-volume", "configMap": {"name": cm}}));
    }
    volumes.extend([
        json!({"name": "istio-envoy", "emptyDir": {"medium": "Memory"}}),
        json!({"name": "istio-data", "emptyDir": {}}),
        json!({"name": "istio-podinfo", "downwardAPI": {"items": [
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
            {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
        ]}}),
        json!({"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
            "path": "istio-token", "expirationSeconds": 43200, "audience": cfg.sds_token_audience}}]}}),
    ]);
    if cfg.pilot_cert_provider == "istiod" {
        volumes
            .push(json!({"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}}));
    }
    volumes.push(
        json!({"name": "istio-ca-crl", "configMap": {"name": "istio-ca-crl", "optional": true}}),
    );
    for (name, spec_v) in json_object_annotation(&annotations, "sidecar.istio.io/userVolume")? {
        let mut v = spec_v.clone();
        v["name"] = json!(name);
        volumes.push(v);
    }
    let volumes: Vec<Volume> = volumes.into_iter().map(typed).collect::<Result<_, _>>()?;

    // 7. Overrides win field by field.
    for c in init_containers
        .iter_mut()
        .chain(std::iter::once(&mut proxy))
    {
        if let Some(user) = overrides.remove(&c.name) {
            *c = overlay(c.clone(), &user)?;
        }
    }
    // Overrides of names this layout does not render (e.g. istio-init under CNI) stay as given.
    let leftover: Vec<Container> = overrides.into_values().collect();

    // 8. Env from the /inject/<k>/<v> path replaces same-named variables.
    // The configured network travels the same way (Istio passes it as the `net` parameter).
    let mut path_env = req.path_env.clone();
    if !cfg.network.is_empty() {
        path_env
            .entry("ISTIO_META_NETWORK".into())
            .or_insert_with(|| cfg.network.clone());
    }
    if !path_env.is_empty() {
        let e = proxy.env.get_or_insert_with(Vec::new);
        e.retain(|v| !path_env.contains_key(&v.name));
        for (k, v) in &path_env {
            e.push(EnvVar {
                name: k.clone(),
                value: Some(v.clone()),
                value_from: None,
            });
        }
    }

    // 9. Prometheus: scrape the agent's merged endpoint; the app's own settings travel in env.
    let merge_metrics = ann::bool_annotation(&annotations, ann::MERGE_METRICS)
        .unwrap_or(cfg.enable_prometheus_merge);
    // The mesh status port, not the pod's (an Istio quirk the goldens pin).
    let target_port = pc
        .get("statusPort")
        .and_then(Value::as_u64)
        .unwrap_or(15020)
        .to_string();
    let already = annotations.get("prometheus.io/port") == Some(&target_port);
    if merge_metrics
        && !already
        && annotations.get("prometheus.io/scrape").map(String::as_str) != Some("false")
    {
        let mut app = Map::new();
        for k in ["scrape", "path", "port"] {
            if let Some(v) = annotations.get(&format!("prometheus.io/{k}")) {
                app.insert(k.into(), json!(v));
            }
        }
        if !app.is_empty() {
            proxy.env.get_or_insert_with(Vec::new).push(EnvVar {
                name: "ISTIO_PROMETHEUS_ANNOTATIONS".into(),
                value: Some(Value::Object(app).to_string()),
                value_from: None,
            });
        }
        annotations.insert("prometheus.io/port".into(), target_port.clone());
        annotations.insert("prometheus.io/path".into(), "/stats/prometheus".into());
        annotations.insert("prometheus.io/scrape".into(), "true".into());
    }

    // 10. Probe rewriting (before the proxy is placed, so it is never rewritten itself).
    let rewrite = ann::bool_annotation(&annotations, ann::REWRITE_PROBES)
        .unwrap_or(cfg.rewrite_app_http_probe);
    if rewrite && status_port_num != 0 {
        let mut probers = Map::new();
        for c in spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten())
        {
            probes::rewrite_container(c, status_port_num, &mut probers);
        }
        for c in init_containers.iter_mut() {
            probes::rewrite_container(c, status_port_num, &mut probers);
        }
        // Re-injection: the previous value is merged in place, its entries winning.
        let env = proxy.env.get_or_insert_with(Vec::new);
        match env.iter_mut().find(|e| e.name == probes::APP_PROBERS_ENV) {
            Some(existing) => {
                existing.value = Some(probes::merge_probers(
                    existing.value.as_deref().unwrap_or("{}"),
                    &probers,
                ))
            }
            None if probers.is_empty() => {}
            None => env.push(EnvVar {
                name: probes::APP_PROBERS_ENV.into(),
                value: Some(probes::probers_json(&probers)),
                value_from: None,
            }),
        }
    }

    // 11. Layout (Istio §3.8).
    let user_inits = std::mem::take(spec.init_containers.get_or_insert_with(Vec::new));
    let (validation, others): (Vec<Container>, Vec<Container>) = init_containers
        .into_iter()
        .partition(|c| c.name == VALIDATION_CONTAINER);
    let mut status = Status {
        revision: if cfg.revision.is_empty() {
            "default".into()
        } else {
            cfg.revision.clone()
        },
        ..Status::default()
    };
    let mut inits: Vec<Container> = Vec::new();
    if native {
        inits.extend(validation);
        inits.extend(others);
        status.init_containers = inits.iter().map(|c| c.name.clone()).collect();
        status.init_containers.push(PROXY_CONTAINER.into());
        inits.push(proxy);
        inits.extend(user_inits);
    } else {
        status.init_containers = validation
            .iter()
            .chain(others.iter())
            .map(|c| c.name.clone())
            .collect();
        inits.extend(validation);
        inits.extend(user_inits);
        inits.extend(others);
        status.containers = vec![PROXY_CONTAINER.into()];
        if hold {
            spec.containers.insert(0, proxy);
        } else {
            spec.containers.push(proxy);
        }
    }
    inits.extend(
        leftover
            .iter()
            .filter(|c| c.name != PROXY_CONTAINER)
            .cloned(),
    );
    spec.init_containers = if inits.is_empty() { None } else { Some(inits) };
    status.volumes = volumes.iter().map(|v| v.name.clone()).collect();
    let vols = spec.volumes.get_or_insert_with(Vec::new);
    for v in volumes {
        // A user volume of the same name wins (strategic merge keeps the pod's).
        if !vols.iter().any(|u| u.name == v.name) {
            vols.push(v);
        }
    }
    if !cfg.image_pull_secrets.is_empty() {
        let secrets = spec.image_pull_secrets.get_or_insert_with(Vec::new);
        for s in &cfg.image_pull_secrets {
            if !secrets.iter().any(|r| &r.name == s) {
                secrets.push(LocalObjectReference { name: s.clone() });
            }
            status.image_pull_secrets.push(s.clone());
        }
    }

    // 12. Labels and annotations.
    labels
        .entry("security.istio.io/tlsMode".into())
        .or_insert_with(|| "istio".into());
    if pc
        .get("proxyMetadata")
        .and_then(|m| m.get("ISTIO_META_ENABLE_HBONE"))
        .and_then(Value::as_str)
        == Some("true")
    {
        labels
            .entry("networking.istio.io/tunnel".into())
            .or_insert_with(|| "http".into());
    }
    let canonical_name = [
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ]
    .iter()
    .find_map(|k| labels.get(*k).filter(|v| !v.is_empty()).cloned())
    .unwrap_or_else(|| workload.name.clone());
    labels.insert(
        "service.istio.io/canonical-name".into(),
        trim_canonical(&canonical_name),
    );
    let canonical_rev = [
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ]
    .iter()
    .find_map(|k| labels.get(*k).filter(|v| !v.is_empty()).cloned())
    .unwrap_or_else(|| "latest".into());
    labels.insert("service.istio.io/canonical-revision".into(), canonical_rev);
    if !cfg.network.is_empty() {
        labels
            .entry("topology.istio.io/network".into())
            .or_insert_with(|| cfg.network.clone());
    }
    annotations.insert("istio.io/rev".into(), status.revision.clone());
    if let Some(first) = app_containers.first() {
        annotations
            .entry("kubectl.kubernetes.io/default-logs-container".into())
            .or_insert_with(|| first.clone());
        annotations
            .entry("kubectl.kubernetes.io/default-container".into())
            .or_insert_with(|| first.clone());
    }
    if cfg.cni_enabled {
        annotations.insert(ann::INTERCEPTION_MODE.into(), traffic.mode.clone());
        annotations.insert(
            ann::INCLUDE_OUTBOUND_IP_RANGES.into(),
            traffic.include_ip_ranges.clone(),
        );
        if !traffic.exclude_ip_ranges.is_empty() {
            annotations.insert(
                ann::EXCLUDE_OUTBOUND_IP_RANGES.into(),
                traffic.exclude_ip_ranges.clone(),
            );
        }
        annotations.insert(
            ann::INCLUDE_INBOUND_PORTS.into(),
            traffic.include_inbound_ports.clone(),
        );
        let d = traffic.inbound_exclusions();
        annotations.insert(
            ann::EXCLUDE_INBOUND_PORTS.into(),
            d.trim_start_matches("15090,15021")
                .trim_start_matches(',')
                .to_owned(),
        );
        if let Some(q) = &traffic.include_outbound_ports {
            annotations.insert(ann::INCLUDE_OUTBOUND_PORTS.into(), q.clone());
        }
        if let Some(o) = &traffic.exclude_outbound_ports {
            annotations.insert(ann::EXCLUDE_OUTBOUND_PORTS.into(), o.clone());
        }
    }
    for (k, v) in &cfg.injected_annotations {
        annotations.insert(k.clone(), v.clone());
    }
    annotations.insert(ann::STATUS.into(), status.to_json());
    pod.metadata.labels = Some(labels);
    pod.metadata.annotations = Some(annotations);
    Ok(pod)
}

fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, Error> {
    serde_json::from_value(v).map_err(|e| Error::Internal(e.to_string()))
}

/// Istio writes `initialDelaySeconds: 0`, which Kubernetes' Go types drop when zero.
fn drop_zero_initial_delay(c: &mut Container) {
    for p in [c.readiness_probe.as_mut(), c.startup_probe.as_mut()]
        .into_iter()
        .flatten()
    {
        if p.initial_delay_seconds == Some(0) {
            p.initial_delay_seconds = None;
        }
    }
}

/// `sidecar.istio.io/userVolume(Mount)`: a JSON object of name → spec, sorted by name.
fn json_object_annotation(
    a: &BTreeMap<String, String>,
    name: &str,
) -> Result<BTreeMap<String, Value>, Error> {
    let Some(text) = a.get(name) else {
        return Ok(BTreeMap::new());
    };
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m.into_iter().collect()),
        _ => Err(Error::Annotation(ann::Invalid {
            name: name.into(),
            value: text.clone(),
            param: name.rsplit('/').next().unwrap_or(name).into(),
            reason: "expected a JSON object of name to spec".into(),
        })),
    }
}
