//! Offline injection (like `istioctl kube-inject`) and `explain`: read Kubernetes objects from
//! YAML or JSON (multi-document), find the pod in each (a Pod, or the pod template of a
//! Deployment, StatefulSet, DaemonSet, ReplicaSet, Job or CronJob), and inject it with exactly the
//! webhook's code. Other kinds pass through untouched.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use crate::config::{Config, Policy};
use crate::inject::{self, Outcome, Request, Workload};
use crate::webhooks;

/// Reading or injecting a document failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("document {index}: {reason}")]
    Document { index: usize, reason: String },
}

/// JSON pointer of the pod template for a workload kind.
fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// Parse every document of a YAML (or JSON) stream; empty documents are dropped.
pub fn parse_documents(text: &str) -> Result<Vec<Value>, Error> {
    let mut out = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v: Value = serde::Deserialize::deserialize(doc).map_err(|e| Error::Document {
            index,
            reason: e.to_string(),
        })?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// A pod found in an object: the pod, its workload, and the JSON pointer of its template (`None`
/// for a bare Pod).
pub type Found = (Pod, Workload, Option<&'static str>);

/// The pod inside an object, the workload it belongs to, and where the pod lives in the object.
pub fn pod_of(obj: &Value, index: usize) -> Result<Option<Found>, Error> {
    let kind = obj["kind"].as_str().unwrap_or_default();
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let namespace = obj["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let bad = |reason: String| Error::Document { index, reason };
    let (pod_json, pointer) = if kind == "Pod" {
        (
            json!({"metadata": obj["metadata"], "spec": obj["spec"]}),
            None,
        )
    } else if let Some(ptr) = template_pointer(kind) {
        let t = obj
            .pointer(ptr)
            .ok_or_else(|| bad(format!("{kind} {name} has no pod template at {ptr}")))?;
        let mut meta = t.get("metadata").cloned().unwrap_or(json!({}));
        if !namespace.is_empty() {
            meta["namespace"] = json!(namespace);
        }
        (json!({"metadata": meta, "spec": t["spec"]}), Some(ptr))
    } else {
        return Ok(None);
    };
    let pod: Pod = serde_json::from_value(pod_json)
        .map_err(|e| bad(format!("{kind} {name}: not a valid pod: {e}")))?;
    let workload = Workload {
        name,
        namespace,
        kind: kind.to_owned(),
        api_version: obj["apiVersion"].as_str().unwrap_or("v1").to_owned(),
    };
    Ok(Some((pod, workload, pointer)))
}

/// Inject every injectable object of a stream; returns the objects and a note per document.
pub fn inject_documents(
    cfg: &Config,
    docs: Vec<Value>,
) -> Result<(Vec<Value>, Vec<String>), Error> {
    // Like `istioctl kube-inject`: asking for injection means the policy is "enabled"; explicit
    // opt-outs, hostNetwork and system namespaces still win.
    let cfg = Config {
        policy: Policy::Enabled,
        ..cfg.clone()
    };
    let mut out = Vec::with_capacity(docs.len());
    let mut notes = Vec::new();
    for (index, mut obj) in docs.into_iter().enumerate() {
        let Some((pod, workload, pointer)) = pod_of(&obj, index)? else {
            notes.push(format!(
                "{} {}: not a workload, unchanged",
                obj["kind"].as_str().unwrap_or("?"),
                obj["metadata"]["name"].as_str().unwrap_or("?")
            ));
            out.push(obj);
            continue;
        };
        let label = format!("{} {}", workload.kind, workload.name);
        let req = Request {
            namespace: None,
            path_env: BTreeMap::new(),
            workload: Some(workload),
        };
        match inject::process(&pod, &cfg, &req).map_err(|e| Error::Document {
            index,
            reason: format!("{label}: {e}"),
        })? {
            Outcome::Skipped(d) => notes.push(format!("{label}: not injected: {d}")),
            Outcome::Injected {
                pod: injected,
                decision,
            } => {
                let mut meta =
                    serde_json::to_value(&injected.metadata).map_err(|e| Error::Document {
                        index,
                        reason: e.to_string(),
                    })?;
                let spec = serde_json::to_value(&injected.spec).map_err(|e| Error::Document {
                    index,
                    reason: e.to_string(),
                })?;
                match pointer {
                    None => {
                        obj["metadata"] = meta;
                        obj["spec"] = spec;
                    }
                    Some(ptr) => {
                        // The namespace was borrowed from the object; the template never had it.
                        if let Some(m) = meta.as_object_mut() {
                            m.remove("namespace");
                        }
                        if let Some(t) = obj.pointer_mut(ptr) {
                            t["metadata"] = meta;
                            t["spec"] = spec;
                        }
                    }
                }
                notes.push(format!("{label}: injected ({decision})"));
            }
        }
        out.push(obj);
    }
    Ok((out, notes))
}

/// Render objects back as multi-document YAML.
pub fn to_yaml(docs: &[Value]) -> String {
    let mut out = String::new();
    for d in docs {
        out.push_str(&serde_yaml::to_string(d).unwrap_or_default());
        out.push_str("---\n");
    }
    out
}

/// `explain`: both decisions, the API server's (which webhook would be called) and the
/// injector's, in words.
pub fn explain(
    cfg: &Config,
    obj: &Value,
    namespace_labels: &BTreeMap<String, String>,
    namespace: Option<&str>,
) -> Result<String, Error> {
    let Some((pod, workload, _)) = pod_of(obj, 0)? else {
        return Ok(format!(
            "{} is not a Pod or a workload with a pod template: nothing to inject\n",
            obj["kind"].as_str().unwrap_or("?")
        ));
    };
    let ns = namespace
        .map(str::to_owned)
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_else(|| "default".into());
    let mut ns_labels = namespace_labels.clone();
    ns_labels
        .entry("kubernetes.io/metadata.name".into())
        .or_insert_with(|| ns.clone());
    let pod_labels = pod.metadata.labels.clone().unwrap_or_default();
    let hooks = webhooks::istio_webhooks(&cfg.revision, false);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} {} in namespace {ns} (namespace labels: {ns_labels:?})",
        workload.kind, workload.name
    );
    let _ = writeln!(
        s,
        "1. API server: which webhook of the MutatingWebhookConfiguration is called"
    );
    let called = webhooks::matching(&hooks, &ns_labels, &pod_labels);
    for h in &hooks {
        let why = h
            .namespace_selector
            .why_not(&ns_labels)
            .map(|w| format!("namespace {w}"))
            .or_else(|| {
                h.object_selector
                    .why_not(&pod_labels)
                    .map(|w| format!("pod {w}"))
            });
        match why {
            None => {
                let _ = writeln!(s, "   - {}: CALLED", h.name);
            }
            Some(w) => {
                let _ = writeln!(s, "   - {}: not called ({w})", h.name);
            }
        }
    }
    if called.is_empty() {
        let _ = writeln!(
            s,
            "   => no webhook is called: the pod is created WITHOUT a sidecar."
        );
        let _ = writeln!(
            s,
            "      To inject: `kubectl label namespace {ns} istio-injection=enabled`, or label the pod sidecar.istio.io/inject=true."
        );
        if pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(crate::decision::INJECT_KEY))
        {
            let _ = writeln!(
                s,
                "      Note: the sidecar.istio.io/inject ANNOTATION is invisible to the API server's selectors; use the label."
            );
        }
        return Ok(s);
    }
    let decision = inject::decide(&pod, cfg, &ns);
    let _ = writeln!(s, "2. Injector: {decision}");
    if !decision.inject {
        let _ = writeln!(
            s,
            "   => the webhook answers allowed without a patch: NO sidecar."
        );
        return Ok(s);
    }
    let req = Request {
        namespace: Some(ns.clone()),
        path_env: BTreeMap::new(),
        workload: Some(workload),
    };
    match inject::inject(&pod, cfg, &req) {
        Ok(p) => {
            let spec = p.spec.unwrap_or_default();
            let names = |l: &[k8s_openapi::api::core::v1::Container]| {
                l.iter()
                    .map(|c| c.name.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                s,
                "   => INJECTED. initContainers: [{}]; containers: [{}]",
                names(spec.init_containers.as_deref().unwrap_or_default()),
                names(&spec.containers)
            );
            if let Some(init) = spec.init_containers.iter().flatten().find(|c| {
                c.name == inject::INIT_CONTAINER || c.name == inject::VALIDATION_CONTAINER
            }) {
                let quoted: Vec<String> = init
                    .args
                    .iter()
                    .flatten()
                    .map(|a| {
                        if a.is_empty() || a.contains(['*', ' ']) {
                            format!("'{a}'")
                        } else {
                            a.clone()
                        }
                    })
                    .collect();
                let _ = writeln!(s, "      {} args: {}", init.name, quoted.join(" "));
            }
        }
        Err(e) => {
            let _ = writeln!(s, "   => REFUSED: the pod is rejected ({e})");
        }
    }
    Ok(s)
}
