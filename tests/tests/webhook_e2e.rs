//! The webhook end to end, the way the API server calls it: HTTPS to the service DNS name,
//! trusting only the MutatingWebhookConfiguration's `caBundle`, real-shaped `admission.k8s.io/v1`
//! AdmissionReviews (CREATE of a Pod with only `generateName`, namespace only in the request,
//! dryRun), the returned JSONPatch applied and the result validated as a Pod. Then certificate
//! rotation while serving, and corrupted certificate and configuration updates refused.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use ferry_injector::cert;
use ferry_injector::config::Config;
use ferry_injector::metrics::Metrics;
use ferry_injector::server::{self, Settings, Shared};
use ferry_tests::tls::{Client, Pki};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

const SERVICE: &str = "ferry-injector.ferry-system.svc";

struct Harness {
    dir: PathBuf,
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn write(path: &Path, text: &str) {
    // Write-then-rename, as a kubelet Secret/ConfigMap update does, so a reader never sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    // Every version gets the same modification time: updates landing within the filesystem's
    // timestamp granularity look like this, and the injector must still see each one.
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .and_then(|f| f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000)))
        .expect("set mtime");
    std::fs::rename(&tmp, path).expect("rename");
}

async fn start(pki: &Pki, config: &str) -> Harness {
    let dir = std::env::temp_dir().join(format!(
        "ferry-webhook-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let pair = pki.issue(
        &[SERVICE, "ferry-injector.ferry-system.svc.cluster.local"],
        2031,
    );
    write(&dir.join("tls.crt"), &pair.cert_pem);
    write(&dir.join("tls.key"), &pair.key_pem);
    write(&dir.join("config.yaml"), config);
    let settings = Settings {
        listen: "127.0.0.1:0".parse().expect("addr"),
        config_path: Some(dir.join("config.yaml")),
        cert_path: dir.join("tls.crt"),
        key_path: dir.join("tls.key"),
        reload_interval: Duration::from_millis(50),
        drain: Duration::from_secs(2),
    };
    let shared = Arc::new(Shared {
        config: std::sync::RwLock::new(Arc::new(
            Config::parse(config, "config.yaml").expect("config"),
        )),
        metrics: Metrics::new(),
        certs: Arc::new(cert::Store::open(&settings.cert_path, &settings.key_path).expect("cert")),
        draining: std::sync::atomic::AtomicBool::new(false),
    });
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let s = shared.clone();
    let task = tokio::spawn(async move { server::serve(listener, settings, s, &mut rx).await });
    Harness {
        dir,
        addr,
        shared,
        stop,
        task,
    }
}

/// Unique per harness in this process: tests run in parallel, and a clock reading can repeat
/// (two tests once shared a directory and each other's key files).
fn rand_suffix() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A MutatingWebhookConfiguration as the chart renders it; the client trusts only its caBundle.
fn mwc(ca_pem: &str) -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "ferry-sidecar-injector"},
        "webhooks": [{
            "name": "namespace.sidecar-injector.istio.io",
            "clientConfig": {
                "service": {"name": "ferry-injector", "namespace": "ferry-system", "path": "/inject", "port": 443},
                "caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem),
            },
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
        }]
    })
}

async fn apiserver_client(addr: SocketAddr, mwc: &Value) -> Client {
    let hook = &mwc["webhooks"][0]["clientConfig"];
    let ca = base64::engine::general_purpose::STANDARD
        .decode(hook["caBundle"].as_str().expect("caBundle"))
        .expect("b64");
    let name = format!(
        "{}.{}.svc",
        hook["service"]["name"].as_str().expect("svc"),
        hook["service"]["namespace"].as_str().expect("ns")
    );
    Client::connect(addr, &name, std::str::from_utf8(&ca).expect("pem"))
        .await
        .expect("connect as the API server")
}

fn review(uid: &str) -> Vec<u8> {
    // What a ReplicaSet controller's CREATE looks like after defaulting: no name, no namespace in
    // the object, defaults filled in, managedFields present.
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts"]},
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "generateName": "cart-7d4b9c8f6-",
                    "labels": {"app": "cart", "version": "v2", "pod-template-hash": "7d4b9c8f6"},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "cart-7d4b9c8f6", "uid": "4e1a", "controller": true, "blockOwnerDeletion": true}],
                    "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {}}]
                },
                "spec": {
                    "containers": [{
                        "name": "cart", "image": "shop/cart:2.1",
                        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"}, "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
                        "resources": {}, "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"
                    }],
                    "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
                    "serviceAccountName": "default", "serviceAccount": "default", "securityContext": {}, "schedulerName": "default-scheduler",
                    "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority", "priority": 0
                }
            },
            "oldObject": null,
            "dryRun": true,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    }))
    .expect("json")
}

fn apply_patch(resp: &Value, object: &Value) -> Value {
    assert_eq!(resp["response"]["patchType"], "JSONPatch", "{resp}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(resp["response"]["patch"].as_str().expect("patch"))
        .expect("b64");
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("RFC 6902 patch");
    let mut doc = object.clone();
    json_patch::patch(&mut doc, &patch).expect("patch applies to the original object");
    doc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_style_review_is_injected_and_valid() {
    let pki = Pki::new("ferry-test-ca");
    let h = start(&pki, "").await;
    let mut client = apiserver_client(h.addr, &mwc(&pki.ca_pem())).await;
    let body = review("705ab4f5-6393-11e8-b7cc-42010a800002");
    let (status, resp) = client
        .request("POST", "/inject", Some("application/json"), body.clone())
        .await
        .expect("POST");
    assert_eq!(status, 200);
    let resp: Value = serde_json::from_slice(&resp).expect("AdmissionReview");
    assert_eq!(resp["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(resp["kind"], "AdmissionReview");
    assert_eq!(
        resp["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(resp["response"]["allowed"], true);
    let object = serde_json::from_slice::<Value>(&body).expect("json")["request"]["object"].clone();
    let patched = apply_patch(&resp, &object);
    assert_eq!(
        patched["metadata"]["managedFields"], object["metadata"]["managedFields"],
        "managedFields untouched"
    );
    let pod: Pod =
        serde_json::from_value(patched.clone()).expect("the patched object is a valid Pod");
    let spec = pod.spec.expect("spec");
    let inits: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        inits,
        ["istio-init", "istio-proxy"],
        "native sidecar layout"
    );
    let proxy = &spec.init_containers.as_ref().expect("inits")[1];
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
    let env = |n: &str| {
        proxy
            .env
            .iter()
            .flatten()
            .find(|e| e.name == n)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(
        env("ISTIO_META_OWNER").as_deref(),
        Some("kubernetes://apis/apps/v1/namespaces/shop/deployments/cart")
    );
    assert_eq!(env("ISTIO_META_WORKLOAD_NAME").as_deref(), Some("cart"));
    assert!(env("ISTIO_KUBE_APP_PROBERS").expect("probers").contains("\"/app-health/cart/readyz\":{\"httpGet\":{\"path\":\"/ready\",\"port\":8080,\"scheme\":\"HTTP\"},\"timeoutSeconds\":1}"));
    let cart = &spec.containers[0];
    assert_eq!(
        cart.readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.as_deref()),
        Some("/app-health/cart/readyz")
    );
    let labels = pod.metadata.labels.expect("labels");
    assert_eq!(
        labels
            .get("service.istio.io/canonical-name")
            .map(String::as_str),
        Some("cart")
    );
    assert_eq!(
        labels
            .get("service.istio.io/canonical-revision")
            .map(String::as_str),
        Some("v2")
    );
    let init_args = spec.init_containers.as_ref().expect("inits")[0]
        .args
        .clone()
        .expect("args");
    assert_eq!(init_args[..3], ["istio-iptables", "-p", "15001"]);

    // The same connection serves health and metrics.
    let (s, _) = client
        .request("GET", "/healthz/ready", None, vec![])
        .await
        .expect("ready");
    assert_eq!(s, 200);
    let (_, m) = client
        .request("GET", "/metrics", None, vec![])
        .await
        .expect("metrics");
    let m = String::from_utf8(m).expect("utf8");
    assert!(
        m.contains("ferry_injector_requests_total{outcome=\"injected\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("ferry_injector_serving_certificate_expiry_timestamp_seconds 1924992000"),
        "expiry 2031-01-01: {m}"
    );
    assert!(
        m.contains("ferry_injector_request_duration_seconds_count 1"),
        "{m}"
    );

    // A client that does not trust our CA, or uses another name, is refused by TLS itself.
    let other = Pki::new("someone-else");
    assert!(
        Client::connect(h.addr, SERVICE, &other.ca_pem())
            .await
            .is_err(),
        "untrusted CA"
    );
    assert!(
        Client::connect(h.addr, "evil.example.com", &pki.ca_pem())
            .await
            .is_err(),
        "wrong server name"
    );

    let _ = h.stop.send(true);
    let _ = h.task.await;
    let _ = std::fs::remove_dir_all(&h.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_while_serving_drops_nothing() {
    let pki = Pki::new("ferry-test-ca");
    let h = start(&pki, "").await;
    let hook = mwc(&pki.ca_pem());
    let mut kept_alive = apiserver_client(h.addr, &hook).await;
    let old_cert = kept_alive.peer_cert.clone();
    let old_expiry = cert::not_after(&old_cert).expect("expiry");

    // Load on a separate connection while the certificate changes underneath it.
    let addr = h.addr;
    let hook2 = hook.clone();
    let load = tokio::spawn(async move {
        let mut c = apiserver_client(addr, &hook2).await;
        let mut failures = 0;
        for i in 0..200 {
            match c
                .request(
                    "POST",
                    "/inject",
                    Some("application/json"),
                    review(&format!("load-{i}")),
                )
                .await
            {
                Ok((200, _)) => {}
                _ => failures += 1,
            }
        }
        failures
    });
    let rotated = pki.issue(&[SERVICE], 2033);
    write(&h.dir.join("tls.key"), &rotated.key_pem);
    write(&h.dir.join("tls.crt"), &rotated.cert_pem);
    // New handshakes get the new certificate once the reload has run.
    let mut new_cert = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let c = apiserver_client(h.addr, &hook).await;
        if c.peer_cert != old_cert {
            new_cert = Some(c.peer_cert.clone());
            break;
        }
    }
    let new_cert = new_cert.expect("the rotated certificate is served without a restart");
    assert_eq!(cert::not_after(&new_cert), Some(1988150400), "2033-01-01");
    assert_eq!(
        load.await.expect("load task"),
        0,
        "no review failed during rotation"
    );
    // The connection opened before the rotation still works.
    let (s, _) = kept_alive
        .request("POST", "/inject", Some("application/json"), review("after"))
        .await
        .expect("old connection");
    assert_eq!(s, 200);
    assert_eq!(h.shared.metrics.cert_expiry.get(), 1988150400);
    assert_ne!(old_expiry, 1988150400);

    // A corrupted certificate update is refused; the rotated one keeps serving.
    write(
        &h.dir.join("tls.crt"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = apiserver_client(h.addr, &hook).await;
    assert_eq!(c.peer_cert, new_cert);
    let m = h.shared.metrics.encode();
    assert!(
        m.contains("ferry_injector_reloads_total{kind=\"certificate\",result=\"rejected\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("ferry_injector_reloads_total{kind=\"certificate\",result=\"ok\"} 1"),
        "{m}"
    );

    let _ = h.stop.send(true);
    let _ = h.task.await;
    let _ = std::fs::remove_dir_all(&h.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_config_update_is_refused_and_good_one_applies() {
    let pki = Pki::new("ferry-test-ca");
    // Start with a policy under which the test pod (no opt-in) is NOT injected.
    let h = start(&pki, "policy: disabled\n").await;
    let hook = mwc(&pki.ca_pem());
    let mut c = apiserver_client(h.addr, &hook).await;
    let allowed_without_patch = |body: &[u8]| {
        let v: Value = serde_json::from_slice(body).expect("json");
        v["response"]["allowed"] == true && v["response"].get("patch").is_none()
    };
    let (_, b) = c
        .request("POST", "/inject", Some("application/json"), review("1"))
        .await
        .expect("post");
    assert!(allowed_without_patch(&b), "policy disabled: skipped");

    for (i, bad) in [
        "policy: [not, a, policy]\n",
        "policy: enabled\nproxyImage: ''\n",
        "policy: enabled\nnoSuchField: 1\n",
        "proxy:\n  includeIPRanges: 10.0.0.0/99\n",
    ]
    .into_iter()
    .enumerate()
    {
        write(&h.dir.join("config.yaml"), bad);
        // Wait until this update has been seen and refused (a loaded machine may poll late;
        // two writes between polls would count as one).
        let want = format!(
            "ferry_injector_reloads_total{{kind=\"config\",result=\"rejected\"}} {}",
            i + 1
        );
        let started = std::time::Instant::now();
        while !h.shared.metrics.encode().contains(&want) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "update {bad:?} never refused"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (_, b) = c
            .request("POST", "/inject", Some("application/json"), review("2"))
            .await
            .expect("post");
        assert!(
            allowed_without_patch(&b),
            "bad config {bad:?} must not take effect"
        );
    }
    let m = h.shared.metrics.encode();
    assert!(
        m.contains("ferry_injector_reloads_total{kind=\"config\",result=\"rejected\"} 4"),
        "{m}"
    );

    write(&h.dir.join("config.yaml"), "policy: enabled\n");
    let mut injected = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_, b) = c
            .request("POST", "/inject", Some("application/json"), review("3"))
            .await
            .expect("post");
        if !allowed_without_patch(&b) {
            injected = true;
            break;
        }
    }
    assert!(
        injected,
        "a good configuration update applies without a restart"
    );
    let _ = h.stop.send(true);
    let _ = h.task.await;
    let _ = std::fs::remove_dir_all(&h.dir);
}
