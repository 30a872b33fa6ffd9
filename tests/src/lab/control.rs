//! The lab's control plane: what the injector runs with and which Service and
//! MutatingWebhookConfiguration the API server holds for it. Taken from the Helm chart as
//! rendered by `helm template` (so the lab runs what we ship: the chart's webhook selectors,
//! ConfigMap and injector arguments, with the injector managing its own certificate and the
//! caBundle through the lab's API server), or built in when helm is not available.

use base64::Engine;
use serde_json::{Value, json};

use super::{Lab, LabError, NODE_IP, WEBHOOK_PORT};

/// Everything the daemon needs to start and register the injector.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    /// Where it came from, for the user.
    pub source: String,
    pub namespace: String,
    pub service: Value,
    /// The injector as a (mirror) pod on the node, selected by `service`.
    pub pod: Value,
    pub mwc: Value,
    /// `ferry-injector` arguments and environment.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The injector's configuration file content, if any.
    pub config: Option<String>,
    pub port: u16,
    /// Whether the lab must provide the serving certificate (built-in) or the injector manages
    /// its own (the chart's self-signed mode).
    pub lab_pki: bool,
}

/// The release namespace the lab renders the chart into.
pub const RELEASE_NAMESPACE: &str = "istio-system";

fn lab_path(lab: &Lab, rel: &str) -> String {
    lab.dir.join(rel).display().to_string()
}

/// From `helm template lab charts/ferry -n istio-system` output.
pub fn from_chart(lab: &Lab, rendered: &str) -> Result<ControlPlane, LabError> {
    let objs = super::cli::parse_yaml(rendered, "the rendered chart")?;
    // The injector's objects (the chart also renders a gateway).
    let one = |kind: &str| -> Result<Value, LabError> {
        objs.iter()
            .find(|o| {
                o["kind"] == kind
                    && (kind == "MutatingWebhookConfiguration"
                        || o["metadata"]["labels"]["app.kubernetes.io/name"] == "ferry-injector")
            })
            .cloned()
            .ok_or_else(|| LabError::Invalid(format!("the rendered chart has no {kind}")))
    };
    let mwc = one("MutatingWebhookConfiguration")?;
    let service = one("Service")?;
    let deploy = one("Deployment")?;
    let config = one("ConfigMap")?["data"]["config.yaml"]
        .as_str()
        .map(str::to_owned);
    let c = &deploy["spec"]["template"]["spec"]["containers"][0];
    let port = c["ports"][0]["containerPort"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(WEBHOOK_PORT);
    // The container's paths and listen address, mapped onto the lab's directory and node.
    let args: Vec<String> = c["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|a| {
            a.replace(
                "/etc/ferry/config/",
                &format!("{}/", lab_path(lab, "config")),
            )
            .replace("/var/run/ferry/tls/", &format!("{}/", lab_path(lab, "tls")))
            .replace("/etc/ferry/tls/", &format!("{}/", lab_path(lab, "tls")))
            .replace("--listen=0.0.0.0:", &format!("--listen={NODE_IP}:"))
        })
        .collect();
    let lab_pki = !args.iter().any(|a| a == "--self-signed-tls");
    let template = &deploy["spec"]["template"];
    let pod = mirror_pod(
        template["metadata"]["labels"].clone(),
        json!([{"name": c["name"], "image": c["image"], "ports": c["ports"]}]),
    );
    Ok(ControlPlane {
        source: "charts/ferry (rendered by helm)".into(),
        namespace: RELEASE_NAMESPACE.into(),
        service,
        pod,
        mwc,
        args,
        env: vec![
            ("POD_NAMESPACE".into(), RELEASE_NAMESPACE.into()),
            ("KUBECONFIG".into(), lab.kubeconfig().display().to_string()),
        ],
        config,
        port,
        lab_pki,
    })
}

/// Without helm: Istio's webhooks from the injector's own table, served with a lab-made
/// certificate (`ca_pem` goes into the caBundle).
pub fn builtin(lab: &Lab, ca_pem: &str) -> ControlPlane {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let hooks: Vec<Value> = ferry_injector::webhooks::istio_webhooks("", false)
        .iter()
        .map(|h| {
            let mut v = serde_json::to_value(h).unwrap_or_default();
            v["clientConfig"] = json!({"service": {"name": "istiod", "namespace": RELEASE_NAMESPACE, "path": "/inject", "port": 443}, "caBundle": ca});
            v["rules"] = json!([{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}]);
            v["sideEffects"] = json!("None");
            v["admissionReviewVersions"] = json!(["v1"]);
            v["failurePolicy"] = json!("Fail");
            v["reinvocationPolicy"] = json!("Never");
            v["timeoutSeconds"] = json!(10);
            v
        })
        .collect();
    ControlPlane {
        source: "built in (helm not found: `bash .ci/tools` fetches it)".into(),
        namespace: RELEASE_NAMESPACE.into(),
        service: json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "istiod", "namespace": RELEASE_NAMESPACE, "labels": {"app": "istiod"}},
            "spec": {"selector": {"app": "istiod"}, "ports": [{"name": "https-webhook", "port": 443, "targetPort": WEBHOOK_PORT}]}}),
        pod: mirror_pod(
            json!({"app": "istiod"}),
            json!([{"name": "injector", "image": "ferry-injector", "ports": [{"name": "https-webhook", "containerPort": WEBHOOK_PORT}]}]),
        ),
        mwc: json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "istio-sidecar-injector", "labels": {"app": "sidecar-injector"}}, "webhooks": hooks}),
        args: vec![
            "serve".into(),
            format!("--tls-cert={}", lab_path(lab, "tls/tls.crt")),
            format!("--tls-key={}", lab_path(lab, "tls/tls.key")),
            format!("--listen={NODE_IP}:{WEBHOOK_PORT}"),
        ],
        env: vec![],
        config: None,
        port: WEBHOOK_PORT,
        lab_pki: true,
    }
}

fn mirror_pod(labels: Value, containers: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("ferry-injector-{}", super::NODE_NAME),
            "namespace": RELEASE_NAMESPACE,
            "labels": labels,
            "annotations": {super::daemon::MIRROR: "ferry-lab"},
        },
        "spec": {"hostNetwork": true, "nodeName": super::NODE_NAME, "containers": containers},
    })
}

/// The DNS name the API server verifies the webhook's certificate for.
pub fn service_dns(cp: &ControlPlane) -> String {
    format!(
        "{}.{}.svc",
        cp.service["metadata"]["name"].as_str().unwrap_or("istiod"),
        cp.namespace
    )
}
