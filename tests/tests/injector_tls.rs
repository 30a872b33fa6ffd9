//! The injector's self-managed webhook TLS (`serve --self-signed-tls`), against the in-repo fake
//! API server through the real kube-rs client: bootstrap from nothing, the caBundle kept in sync
//! (drift repaired), renewal served without a restart, and replicas racing on one Secret.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use ferry_tests::fake_apiserver::{FakeApiServer, Kind};
use ferry_tests::netns::Child;
use serde_json::{Value, json};

static N: AtomicU32 = AtomicU32::new(0);

fn kinds() -> Vec<Kind> {
    let k = |g: &str, v: &str, p: &str, kind: &str| Kind {
        group: g.into(),
        version: v.into(),
        plural: p.into(),
        kind: kind.into(),
    };
    vec![
        k("", "v1", "namespaces", "Namespace"),
        k("", "v1", "secrets", "Secret"),
        k(
            "admissionregistration.k8s.io",
            "v1",
            "mutatingwebhookconfigurations",
            "MutatingWebhookConfiguration",
        ),
    ]
}

const NS: &str = "ferry-system";
const SECRET: &str = "ferry-injector-tls";
const MWC: &str = "ferry-sidecar-injector";
const DNS: &str = "ferry-injector.ferry-system.svc";

fn mwc() -> Value {
    let hook = |name: &str| {
        json!({"name": name, "clientConfig": {"service": {"name": "ferry-injector", "namespace": NS, "path": "/inject", "port": 443}},
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
        "sideEffects": "None", "admissionReviewVersions": ["v1"], "failurePolicy": "Fail"})
    };
    json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": MWC}, "webhooks": [hook("namespace.sidecar-injector.istio.io"), hook("object.sidecar-injector.istio.io")]})
}

struct Env {
    api: FakeApiServer,
    dir: std::path::PathBuf,
    kubeconfig: std::path::PathBuf,
    _task: tokio::task::JoinHandle<()>,
}

async fn env() -> Env {
    let api = FakeApiServer::new(kinds());
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}));
    api.apply(mwc());
    let (addr, task) = api.start(None).await;
    let dir = std::env::temp_dir().join(format!(
        "ferry-tls-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, FakeApiServer::kubeconfig(addr)).expect("kubeconfig");
    Env {
        api,
        dir,
        kubeconfig,
        _task: task,
    }
}

fn ca_bundles(api: &FakeApiServer) -> Vec<Option<String>> {
    let m = api
        .get("MutatingWebhookConfiguration", "", MWC)
        .expect("mwc");
    m["webhooks"]
        .as_array()
        .expect("webhooks")
        .iter()
        .map(|w| {
            w["clientConfig"]["caBundle"].as_str().map(|b| {
                String::from_utf8(
                    base64::engine::general_purpose::STANDARD
                        .decode(b)
                        .expect("base64"),
                )
                .expect("pem")
            })
        })
        .collect()
}

fn secret_field(api: &FakeApiServer, key: &str) -> Option<String> {
    let s = api.get("Secret", NS, SECRET)?;
    let b = s["data"][key].as_str()?;
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).ok()?).ok()
}

async fn wait_until(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !f().await {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn bootstraps_keeps_ca_bundle_in_sync_and_renews_without_restart() {
    let e = env().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        l.local_addr().expect("addr").port()
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let _injector = Child(
        Command::new(ferry_tests::workspace_bin("ferry-injector"))
            .args(["serve", "--self-signed-tls", "--tls-secret", SECRET])
            .args([
                "--webhook-config",
                MWC,
                "--dns-name",
                DNS,
                "--namespace",
                NS,
            ])
            .arg("--tls-cert")
            .arg(e.dir.join("tls.crt"))
            .arg("--tls-key")
            .arg(e.dir.join("tls.key"))
            .args(["--listen", &addr.to_string()])
            .args(["--tls-check-interval", "1", "--reload-interval", "0.2"])
            .env("KUBECONFIG", &e.kubeconfig)
            .stdout(Stdio::null())
            .spawn()
            .expect("ferry-injector"),
    );
    // Bootstrap: a Secret, every caBundle set, and the webhook verifiable with that caBundle at
    // the service name, as the API server calls it.
    wait_until("the caBundles", Duration::from_secs(20), async || {
        ca_bundles(&e.api).iter().all(Option::is_some)
    })
    .await;
    let ca = ca_bundles(&e.api)[0].clone().expect("ca");
    assert_eq!(secret_field(&e.api, "ca.crt").as_deref(), Some(ca.as_str()));
    let secret = e.api.get("Secret", NS, SECRET).expect("secret");
    assert_eq!(secret["type"], "kubernetes.io/tls");
    assert_eq!(
        secret["metadata"]["annotations"]["ferry.dev/dns-names"],
        DNS
    );
    let mut leaf = None;
    wait_until("the webhook to answer over verified TLS", Duration::from_secs(20), async || {
        match ferry_tests::tls::Client::connect(addr, DNS, &ca).await {
            Ok(mut c) => {
                let review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "u1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": "demo", "operation": "CREATE",
                    "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "demo"}, "spec": {"containers": [{"name": "app", "image": "app"}]}}}});
                let ok = c
                    .request("POST", "/inject", Some("application/json"), review.to_string().into_bytes())
                    .await
                    .is_ok_and(|(code, body)| code == 200 && String::from_utf8_lossy(&body).contains("\"allowed\":true"));
                leaf = Some(c.peer_cert.clone());
                ok
            }
            Err(_) => false,
        }
    })
    .await;

    // Drift: someone (a GitOps sync, a reinstall) blanks the caBundle; it is put back.
    e.api.update("MutatingWebhookConfiguration", "", MWC, |m| {
        m["webhooks"][1]["clientConfig"]["caBundle"] =
            json!(base64::engine::general_purpose::STANDARD.encode("not a CA"));
    });
    wait_until(
        "the caBundle to be repaired",
        Duration::from_secs(10),
        async || {
            ca_bundles(&e.api)
                .iter()
                .all(|b| b.as_deref() == Some(ca.as_str()))
        },
    )
    .await;

    // Renewal: the serving certificate no longer matches what it must serve (here: its recorded
    // names changed); a new one is issued by the same CA and served without a restart.
    e.api.update("Secret", NS, SECRET, |s| {
        s["metadata"]["annotations"]["ferry.dev/dns-names"] = json!("old-name.ferry-system.svc");
    });
    let before = leaf.expect("first leaf");
    wait_until(
        "the renewed certificate to be served",
        Duration::from_secs(15),
        async || match ferry_tests::tls::Client::connect(addr, DNS, &ca).await {
            Ok(c) => c.peer_cert != before,
            Err(_) => false,
        },
    )
    .await;
    assert_eq!(
        ca_bundles(&e.api)[0].as_deref(),
        Some(ca.as_str()),
        "same CA after a leaf renewal"
    );
    let _ = std::fs::remove_dir_all(&e.dir);
}

#[tokio::test]
async fn replicas_racing_on_one_secret_end_up_serving_the_same_certificate() {
    let e = env().await;
    let client = ferry_proxy::k8s::client(Some(&e.kubeconfig))
        .await
        .expect("client");
    let settings = |i: u32| ferry_injector::selfsigned::Settings {
        namespace: NS.into(),
        secret: SECRET.into(),
        webhook_config: MWC.into(),
        dns_names: vec![DNS.into()],
        cert_path: e.dir.join(format!("r{i}.crt")),
        key_path: e.dir.join(format!("r{i}.key")),
        interval: Duration::from_secs(60),
    };
    let (s0, s1) = (settings(0), settings(1));
    let (a, b) = tokio::join!(
        ferry_injector::selfsigned::reconcile(&client, &s0),
        ferry_injector::selfsigned::reconcile(&client, &s1),
    );
    let (a, b) = (a.expect("replica 0"), b.expect("replica 1"));
    assert!(
        a.issued.is_some() || b.issued.is_some(),
        "one of them issued: {a:?} {b:?}"
    );
    let stored = secret_field(&e.api, "tls.crt").expect("secret");
    for i in 0..2 {
        let served = std::fs::read_to_string(e.dir.join(format!("r{i}.crt"))).expect("file");
        assert_eq!(served, stored, "replica {i} serves the stored certificate");
    }
    // A second round changes nothing.
    let again = ferry_injector::selfsigned::reconcile(&client, &s0)
        .await
        .expect("again");
    assert_eq!(again, ferry_injector::selfsigned::Outcome::default());
    // No webhook configuration: named.
    let missing = ferry_injector::selfsigned::Settings {
        webhook_config: "nope".into(),
        ..settings(2)
    };
    let err = ferry_injector::selfsigned::reconcile(&client, &missing)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"nope\" not found"), "{err}");
    let _ = std::fs::remove_dir_all(&e.dir);
}
