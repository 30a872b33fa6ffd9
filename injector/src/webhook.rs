//! The admission webhook's HTTP contract, as a pure function from (path, content type, body) to
//! (status, body): `admission.k8s.io/v1` (and v1beta1) AdmissionReview in and out, Istio's status
//! codes (`inject/webhook-http.json`), `/inject/<k>/<v>` path parameters. It never answers 500
//! and never panics: whatever goes wrong is an `allowed: false` review with the reason.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use crate::config::Config;
use crate::inject::{self, Outcome, Request};

/// How a review ended, for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Injected,
    Skipped,
    Denied,
    BadRequest,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Injected => "injected",
            Verdict::Skipped => "skipped",
            Verdict::Denied => "denied",
            Verdict::BadRequest => "bad_request",
        }
    }
}

/// The HTTP answer.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    pub verdict: Verdict,
    /// A line for the log: the pod and the reason.
    pub summary: String,
}

/// `/inject/cluster/c1/net/n1` → `{ISTIO_META_CLUSTER_ID: c1, ISTIO_META_NETWORK: n1}` (Istio's
/// `parseInjectEnvs`, with the legacy `:ENV:k=v` form).
pub fn parse_inject_envs(path: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let rest = path.trim_start_matches('/');
    let Some(rest) = rest.strip_prefix("inject") else {
        return out;
    };
    let rest = rest.trim_start_matches('/').trim_end_matches('/');
    if rest.is_empty() {
        return out;
    }
    let key_name = |k: &str| match k {
        "cluster" => "ISTIO_META_CLUSTER_ID".to_owned(),
        "net" => "ISTIO_META_NETWORK".to_owned(),
        other => other.to_uppercase(),
    };
    if rest.starts_with(":ENV:") {
        for kv in rest.split(":ENV:").filter(|s| !s.is_empty()) {
            if let Some((k, v)) = kv.split_once('=')
                && !k.is_empty()
            {
                out.insert(key_name(k), v.to_owned());
            }
        }
        return out;
    }
    let parts: Vec<&str> = rest.split('/').collect();
    for pair in parts.chunks(2) {
        if let [k, v] = pair
            && !k.is_empty()
        {
            out.insert(key_name(k), v.replace("--slash--", "/"));
        }
    }
    out
}

fn review(api_version: &str, response: Value) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"apiVersion": api_version, "kind": "AdmissionReview", "response": response}),
    )
    .unwrap_or_else(|_| b"{}".to_vec())
}

/// A refusal. The reason goes in `response.status` (the wire name of AdmissionResponse's
/// `Result`), which is what the API server shows the user.
fn deny(api_version: &str, uid: &str, message: String, verdict: Verdict) -> Answer {
    let body = review(
        api_version,
        json!({"uid": uid, "allowed": false, "status": {"message": message.clone(), "code": 400}}),
    );
    Answer {
        status: 200,
        body,
        verdict,
        summary: message,
    }
}

/// Handle one request to the webhook endpoint.
pub fn handle(cfg: &Config, path: &str, content_type: Option<&str>, body: &[u8]) -> Answer {
    let plain = |status: u16, msg: &str, verdict| Answer {
        status,
        body: msg.as_bytes().to_vec(),
        verdict,
        summary: msg.to_owned(),
    };
    if body.is_empty() {
        return plain(400, "no body found", Verdict::BadRequest);
    }
    let json_type = content_type
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        })
        .unwrap_or(false);
    if !json_type {
        return plain(
            415,
            "invalid Content-Type, expect `application/json`",
            Verdict::BadRequest,
        );
    }
    let doc: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return deny(
                "admission.k8s.io/v1",
                "",
                format!("could not decode body: {e}"),
                Verdict::BadRequest,
            );
        }
    };
    let api_version = match doc.get("apiVersion").and_then(Value::as_str) {
        Some(v @ ("admission.k8s.io/v1" | "admission.k8s.io/v1beta1")) => v.to_owned(),
        other => {
            return deny(
                "admission.k8s.io/v1",
                "",
                format!("unsupported AdmissionReview apiVersion {other:?}"),
                Verdict::BadRequest,
            );
        }
    };
    let request = &doc["request"];
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if !request.is_object() {
        return deny(
            &api_version,
            &uid,
            "AdmissionReview has no request".into(),
            Verdict::BadRequest,
        );
    }
    let raw = request.get("object").cloned().unwrap_or(Value::Null);
    let mut pod: Pod = match serde_json::from_value(raw.clone()) {
        Ok(p) => p,
        Err(e) => {
            return deny(
                &api_version,
                &uid,
                format!("could not read the object as a Pod: {e}"),
                Verdict::BadRequest,
            );
        }
    };
    // Istio: a pod without a namespace takes the request's; managed fields are dropped.
    let namespace = request
        .get("namespace")
        .and_then(Value::as_str)
        .map(str::to_owned);
    pod.metadata.managed_fields = None;
    let typed_before = match serde_json::to_value(&pod) {
        Ok(v) => v,
        Err(e) => {
            return deny(
                &api_version,
                &uid,
                format!("internal error: {e}"),
                Verdict::BadRequest,
            );
        }
    };
    let name = pod
        .metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.clone())
        .unwrap_or_default();
    let ns = pod
        .metadata
        .namespace
        .clone()
        .or_else(|| namespace.clone())
        .unwrap_or_default();
    let req = Request {
        namespace,
        path_env: parse_inject_envs(path),
        workload: None,
    };
    match inject::process(&pod, cfg, &req) {
        Ok(Outcome::Skipped(decision)) => {
            let body = review(&api_version, json!({"uid": uid, "allowed": true}));
            Answer {
                status: 200,
                body,
                verdict: Verdict::Skipped,
                summary: format!("{ns}/{name}: {decision}"),
            }
        }
        Ok(Outcome::Injected {
            pod: injected,
            decision,
        }) => {
            let mut after = match serde_json::to_value(&*injected) {
                Ok(v) => v,
                Err(e) => {
                    return deny(
                        &api_version,
                        &uid,
                        format!("internal error: {e}"),
                        Verdict::Denied,
                    );
                }
            };
            // The managed fields we dropped for injection are not ours to delete.
            if let (Some(mf), Some(meta)) = (
                raw.pointer("/metadata/managedFields"),
                after.get_mut("metadata").and_then(Value::as_object_mut),
            ) {
                meta.insert("managedFields".into(), mf.clone());
            }
            let mut before = typed_before;
            if let (Some(mf), Some(meta)) = (
                raw.pointer("/metadata/managedFields"),
                before.get_mut("metadata").and_then(Value::as_object_mut),
            ) {
                meta.insert("managedFields".into(), mf.clone());
            }
            let patch = crate::patch::create(&raw, &before, &after);
            let patch_json = serde_json::to_vec(&patch).unwrap_or_else(|_| b"[]".to_vec());
            let body = review(
                &api_version,
                json!({
                    "uid": uid,
                    "allowed": true,
                    "patchType": "JSONPatch",
                    "patch": base64::engine::general_purpose::STANDARD.encode(patch_json),
                }),
            );
            Answer {
                status: 200,
                body,
                verdict: Verdict::Injected,
                summary: format!("{ns}/{name}: {decision}"),
            }
        }
        Err(e) => deny(
            &api_version,
            &uid,
            format!("injection of {ns}/{name} refused: {e}"),
            Verdict::Denied,
        ),
    }
}

/// [`handle`], with a panic anywhere below turned into an `allowed: false` answer: a webhook
/// that crashes mid-request would block every pod creation behind `failurePolicy: Fail`.
pub fn handle_guarded(cfg: &Config, path: &str, content_type: Option<&str>, body: &[u8]) -> Answer {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        handle(cfg, path, content_type, body)
    })) {
        Ok(a) => a,
        Err(_) => deny(
            "admission.k8s.io/v1",
            "",
            "internal error while processing the review".into(),
            Verdict::BadRequest,
        ),
    }
}
