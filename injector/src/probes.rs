//! App probe rewriting (Istio's `rewriteAppHTTPProbe`): kubelet probes and lifecycle hooks of the
//! app containers are pointed at the agent's status port (`/app-health/<c>/<kind>`,
//! `/app-lifecycle/<c>/<hook>`), and the original actions travel to the proxy in
//! `ISTIO_KUBE_APP_PROBERS`, so mTLS or inbound capture can never break kubelet probes.

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, LifecycleHandler, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Map, Value, json};

/// `ISTIO_KUBE_APP_PROBERS`.
pub const APP_PROBERS_ENV: &str = "ISTIO_KUBE_APP_PROBERS";

/// Resolve a probe port: a number stays, a name is looked up in the container's ports.
fn resolve_port(c: &Container, port: &IntOrString) -> Option<i32> {
    match port {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => match name.parse::<i32>() {
            Ok(n) => Some(n),
            Err(_) => c
                .ports
                .as_ref()?
                .iter()
                .find(|p| p.name.as_deref() == Some(name))
                .map(|p| p.container_port),
        },
    }
}

/// The original action, as Go's encoding/json writes it (field order of the Go structs).
fn http_action(c: &Container, a: &HTTPGetAction) -> Option<Value> {
    let mut m = Map::new();
    if let Some(p) = &a.path {
        m.insert("path".into(), json!(p));
    }
    m.insert("port".into(), json!(resolve_port(c, &a.port)?));
    if let Some(h) = &a.host {
        m.insert("host".into(), json!(h));
    }
    if let Some(s) = &a.scheme {
        m.insert("scheme".into(), json!(s));
    }
    if let Some(h) = &a.http_headers
        && !h.is_empty()
    {
        m.insert("httpHeaders".into(), serde_json::to_value(h).ok()?);
    }
    Some(Value::Object(m))
}

/// (kind, action) for a handler Istio rewrites; `None` for exec/sleep or an unresolvable port.
fn action_of(
    c: &Container,
    http: Option<&HTTPGetAction>,
    tcp: Option<&k8s_openapi::api::core::v1::TCPSocketAction>,
    grpc: Option<&k8s_openapi::api::core::v1::GRPCAction>,
) -> Option<(&'static str, Value)> {
    if let Some(h) = http {
        return Some(("httpGet", http_action(c, h)?));
    }
    if let Some(t) = tcp {
        let mut m = Map::new();
        m.insert("port".into(), json!(resolve_port(c, &t.port)?));
        if let Some(h) = &t.host {
            m.insert("host".into(), json!(h));
        }
        return Some(("tcpSocket", Value::Object(m)));
    }
    if let Some(g) = grpc {
        return Some(("grpc", json!({"port": g.port, "service": g.service})));
    }
    None
}

fn target(path: String, status_port: i32) -> HTTPGetAction {
    HTTPGetAction {
        path: Some(path),
        port: IntOrString::Int(status_port),
        ..Default::default()
    }
}

fn rewrite_probe(
    c: &Container,
    probe: &mut Probe,
    path: String,
    status_port: i32,
    out: &mut Map<String, Value>,
) {
    let already_ours = probe
        .http_get
        .as_ref()
        .is_some_and(|h| resolve_port(c, &h.port) == Some(status_port));
    if already_ours {
        return;
    }
    let Some((kind, action)) = action_of(
        c,
        probe.http_get.as_ref(),
        probe.tcp_socket.as_ref(),
        probe.grpc.as_ref(),
    ) else {
        return;
    };
    let mut prober = Map::new();
    prober.insert(kind.into(), action);
    if let Some(t) = probe.timeout_seconds.filter(|t| *t != 0) {
        prober.insert("timeoutSeconds".into(), json!(t));
    }
    out.insert(path.clone(), Value::Object(prober));
    probe.http_get = Some(target(path, status_port));
    probe.tcp_socket = None;
    probe.grpc = None;
}

fn rewrite_hook(
    c: &Container,
    hook: &mut LifecycleHandler,
    path: String,
    status_port: i32,
    out: &mut Map<String, Value>,
) {
    let Some((kind, action)) = action_of(c, hook.http_get.as_ref(), hook.tcp_socket.as_ref(), None)
    else {
        return;
    };
    let mut prober = Map::new();
    prober.insert(kind.into(), action);
    out.insert(path.clone(), Value::Object(prober));
    hook.http_get = Some(target(path, status_port));
    hook.tcp_socket = None;
}

/// Rewrite one container's probes and hooks in place, collecting the originals into `out`.
pub fn rewrite_container(c: &mut Container, status_port: i32, out: &mut Map<String, Value>) {
    let name = c.name.clone();
    let snapshot = c.clone();
    for (probe, kind) in [
        (c.readiness_probe.as_mut(), "readyz"),
        (c.liveness_probe.as_mut(), "livez"),
        (c.startup_probe.as_mut(), "startupz"),
    ] {
        if let Some(p) = probe {
            rewrite_probe(
                &snapshot,
                p,
                format!("/app-health/{name}/{kind}"),
                status_port,
                out,
            );
        }
    }
    if let Some(l) = c.lifecycle.as_mut() {
        for (hook, kind) in [
            (l.pre_stop.as_mut(), "prestopz"),
            (l.post_start.as_mut(), "poststartz"),
        ] {
            if let Some(h) = hook {
                rewrite_hook(
                    &snapshot,
                    h,
                    format!("/app-lifecycle/{name}/{kind}"),
                    status_port,
                    out,
                );
            }
        }
    }
}

/// The env value: keys sorted (Go marshals a map that way).
pub fn probers_json(probers: &Map<String, Value>) -> String {
    let mut keys: Vec<&String> = probers.keys().collect();
    keys.sort();
    let sorted: Map<String, Value> = keys
        .into_iter()
        .map(|k| (k.clone(), probers[k].clone()))
        .collect();
    Value::Object(sorted).to_string()
}

/// Re-injection: the union of the old value and the new probers, old entries winning on a clash.
pub fn merge_probers(old: &str, new: &Map<String, Value>) -> String {
    let mut merged = new.clone();
    if let Ok(Value::Object(old)) = serde_json::from_str::<Value>(old) {
        for (k, v) in old {
            merged.insert(k, v);
        }
    }
    probers_json(&merged)
}
