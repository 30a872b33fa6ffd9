//! The webhook must never answer 500 or panic, whatever it is sent; offline injection must give
//! the webhook's result for the same pod; Job pods and the hold option get the right layout.

use std::collections::BTreeMap;

use ferry_injector::config::Config;
use ferry_injector::inject::{self, Outcome, Request};
use ferry_injector::{offline, webhook};
use ferry_tests::read;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

/// Deterministic xorshift, so a failure reproduces.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn valid_review() -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u", "namespace": "ns", "operation": "CREATE", "object": {
            "metadata": {"generateName": "web-", "labels": {"app": "web"}, "annotations": {
                "traffic.sidecar.istio.io/includeInboundPorts": "80", "proxy.istio.io/config": "holdApplicationUntilProxyStarts: true"}},
            "spec": {"containers": [{"name": "web", "image": "nginx", "ports": [{"containerPort": 80}],
                "livenessProbe": {"tcpSocket": {"port": 80}}}]}}}
    })
}

/// Replace a random node of a JSON value with a random other value.
fn mutate(v: &mut Value, rng: &mut Rng, depth: usize) {
    let replacement = |rng: &mut Rng| match rng.below(9) {
        0 => Value::Null,
        1 => json!(rng.next() as i64),
        2 => json!(-1),
        3 => json!("*"),
        4 => json!(""),
        5 => json!([]),
        6 => json!({}),
        7 => json!("10.0.0.0/99,bad"),
        _ => json!(true),
    };
    match v {
        Value::Object(m) if !m.is_empty() && depth < 8 && rng.below(4) != 0 => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = &keys[rng.below(keys.len())];
            if let Some(child) = m.get_mut(k) {
                mutate(child, rng, depth + 1);
            }
        }
        Value::Array(a) if !a.is_empty() && depth < 8 && rng.below(4) != 0 => {
            let i = rng.below(a.len());
            mutate(&mut a[i], rng, depth + 1);
        }
        _ => *v = replacement(rng),
    }
}

#[test]
fn fuzzed_reviews_never_500_or_panic() {
    let cfg = Config::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let base = serde_json::to_vec(&valid_review()).expect("json");
    let mut statuses = BTreeMap::new();
    for i in 0..4000 {
        let body: Vec<u8> = match i % 3 {
            // Structural mutations of a valid review.
            0 | 1 => {
                let mut v = valid_review();
                for _ in 0..=rng.below(3) {
                    mutate(&mut v, &mut rng, 0);
                }
                serde_json::to_vec(&v).expect("json")
            }
            // Byte-level damage: flips, truncation, garbage.
            _ => {
                let mut b = base.clone();
                match rng.below(3) {
                    0 => {
                        for _ in 0..=rng.below(8) {
                            let j = rng.below(b.len());
                            b[j] = rng.next() as u8;
                        }
                    }
                    1 => b.truncate(rng.below(b.len())),
                    _ => b = (0..rng.below(64)).map(|_| rng.next() as u8).collect(),
                }
                b
            }
        };
        let a = webhook::handle(&cfg, "/inject", Some("application/json"), &body);
        assert!(
            matches!(a.status, 200 | 400 | 415),
            "case {i}: status {}",
            a.status
        );
        if a.status == 200 {
            let v: Value = serde_json::from_slice(&a.body)
                .unwrap_or_else(|e| panic!("case {i}: answer is not JSON: {e}"));
            assert!(v["response"]["allowed"].is_boolean(), "case {i}: {v}");
            if v["response"]["allowed"] == false {
                assert!(
                    v["response"]["status"]["message"]
                        .as_str()
                        .is_some_and(|m| !m.is_empty()),
                    "case {i}: a refusal says why"
                );
            }
        }
        *statuses.entry(a.verdict.as_str()).or_insert(0) += 1;
    }
    // The fuzzer reached every outcome, so it exercised the whole handler.
    for v in ["injected", "denied", "bad_request"] {
        assert!(
            statuses.get(v).copied().unwrap_or(0) > 0,
            "no {v} among {statuses:?}"
        );
    }
}

#[test]
fn offline_injection_matches_the_webhook_and_handles_every_kind() {
    let cfg = Config::default();
    let deployment = read("inject/cases/hello.yaml");
    let extra = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {a: b}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly, namespace: batch}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{name: report, image: report:1}]
---
{"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"}, "spec": {"serviceName": "db", "selector": {"matchLabels": {"app": "db"}}, "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [{"name": "db", "image": "pg"}]}}}}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      hostNetwork: true
      containers: [{name: agent, image: agent:1}]
"#;
    let docs = offline::parse_documents(&format!("{deployment}\n---\n{extra}")).expect("parse");
    assert_eq!(docs.len(), 5);
    let (out, notes) = offline::inject_documents(&cfg, docs).expect("inject");
    assert_eq!(
        out[1],
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"a": "b"}}),
        "other kinds untouched"
    );
    let names = |v: &Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|c| c["name"].as_str().unwrap_or_default().to_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let cron = &out[2]["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    assert_eq!(
        names(&cron["initContainers"]),
        ["istio-init", "istio-proxy"],
        "CronJob pods get a native sidecar"
    );
    assert_eq!(
        names(&out[3]["spec"]["template"]["spec"]["initContainers"]),
        ["istio-init", "istio-proxy"],
        "StatefulSet"
    );
    assert!(
        out[4]["spec"]["template"]["spec"]
            .get("initContainers")
            .is_none(),
        "hostNetwork DaemonSet skipped"
    );
    assert!(notes[4].contains("hostNetwork"), "{notes:?}");
    let owner = cron["initContainers"][1]["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "ISTIO_META_OWNER")
        .expect("owner")["value"]
        .clone();
    assert_eq!(
        owner,
        "kubernetes://apis/batch/v1/namespaces/batch/cronjobs/nightly"
    );

    // The webhook, given the pod the ReplicaSet controller would create, produces the same pod.
    let template = &out[0]["spec"]["template"];
    let obj: Value = offline::parse_documents(&deployment)
        .expect("parse")
        .remove(0);
    let mut meta = obj["spec"]["template"]["metadata"].clone();
    meta["generateName"] = json!("hello-5d9f8-");
    meta["labels"]["pod-template-hash"] = json!("5d9f8");
    meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "hello-5d9f8", "uid": "x", "controller": true}]);
    let pod: Pod =
        serde_json::from_value(json!({"metadata": meta, "spec": obj["spec"]["template"]["spec"]}))
            .expect("pod");
    let Outcome::Injected {
        pod: via_webhook, ..
    } = inject::process(&pod, &cfg, &Request::default()).expect("inject")
    else {
        panic!("skipped")
    };
    assert_eq!(
        serde_json::to_value(&via_webhook.spec).expect("json"),
        template["spec"]
    );
    let mut a = serde_json::to_value(&via_webhook.metadata.annotations).expect("json");
    assert_eq!(
        a.as_object_mut().map(|m| m.len()),
        template["metadata"]["annotations"]
            .as_object()
            .map(|m| m.len())
    );
    a = template["metadata"]["annotations"].clone();
    assert_eq!(
        a["sidecar.istio.io/status"],
        serde_json::to_value(&via_webhook.metadata.annotations).expect("json")["sidecar.istio.io/status"]
    );
}

fn pod(v: Value) -> Pod {
    serde_json::from_value(v).expect("pod")
}

#[test]
fn job_pods_complete_and_hold_puts_the_proxy_first() {
    // Classic layout configured, but a Job's pod gets a native sidecar so the Job can finish.
    let cfg = Config {
        native_sidecars: false,
        ..Config::default()
    };
    let job_pod = pod(
        json!({"metadata": {"generateName": "migrate-", "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "migrate", "uid": "j", "controller": true}]},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "migrate", "image": "m"}]}}),
    );
    let p = inject::inject(&job_pod, &cfg, &Request::default()).expect("inject");
    let spec = p.spec.expect("spec");
    assert_eq!(
        spec.containers
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["migrate"]
    );
    let proxy = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "istio-proxy")
        .expect("proxy");
    assert_eq!(
        proxy.restart_policy.as_deref(),
        Some("Always"),
        "terminated by the kubelet when the Job's container exits"
    );

    // An explicit opt-out of native sidecars is honoured (and then the app must call /quitquitquit).
    let mut opted = job_pod.clone();
    opted.metadata.annotations = Some(
        [(
            "sidecar.istio.io/nativeSidecar".to_owned(),
            "false".to_owned(),
        )]
        .into(),
    );
    let spec = inject::inject(&opted, &cfg, &Request::default())
        .expect("inject")
        .spec
        .expect("spec");
    assert_eq!(
        spec.containers.last().map(|c| c.name.as_str()),
        Some("istio-proxy")
    );

    // holdApplicationUntilProxyStarts (classic): proxy first, postStart waits for it.
    let cfg = Config {
        native_sidecars: false,
        ..Config::default()
    };
    let mut hold = pod(
        json!({"metadata": {"name": "web"}, "spec": {"containers": [{"name": "web", "image": "w"}]}}),
    );
    hold.metadata.annotations = Some(
        [(
            "proxy.istio.io/config".to_owned(),
            "holdApplicationUntilProxyStarts: true".to_owned(),
        )]
        .into(),
    );
    let spec = inject::inject(&hold, &cfg, &Request::default())
        .expect("inject")
        .spec
        .expect("spec");
    assert_eq!(
        spec.containers
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["istio-proxy", "web"]
    );
    let post = spec.containers[0]
        .lifecycle
        .as_ref()
        .and_then(|l| l.post_start.as_ref())
        .and_then(|h| h.exec.as_ref())
        .and_then(|e| e.command.clone());
    assert_eq!(
        post,
        Some(vec!["pilot-agent".to_owned(), "wait".to_owned()])
    );
}
