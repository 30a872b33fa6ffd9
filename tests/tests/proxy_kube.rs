//! Discovery from the Kubernetes API with the real kube-rs client against the in-repo fake API
//! server: initial sync gates readiness, updates arrive by watch, a compaction (410 Gone) forces a
//! relist that loses nothing, the last snapshot keeps serving while the API server is away, and
//! missing Istio CRDs do not block readiness.

use std::net::SocketAddr;
use std::time::Duration;

use ferry_proxy::app::{self, Running};
use ferry_proxy::config::{Args, OutboundPolicy};
use ferry_proxy::transport::OrigDst;
use ferry_tests::fake_apiserver::{FakeApiServer, default_kinds};
use ferry_tests::upstream;
use serde_json::json;

fn service() -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews", "namespace": "shop", "labels": {"app": "reviews"}},
        "spec": {"clusterIP": "10.96.0.50", "clusterIPs": ["10.96.0.50"], "ports": [{"name": "http", "port": 9080, "targetPort": 9080}]}})
}

fn slice(endpoint: SocketAddr) -> serde_json::Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "reviews-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "reviews"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": endpoint.port()}],
        "endpoints": [{"addresses": [endpoint.ip().to_string()], "conditions": {"ready": true}}]})
}

async fn proxy(kubeconfig: &std::path::Path) -> (Running, tokio::sync::watch::Sender<bool>) {
    let mut cfg = ferry_tests::proxy_test_config(
        &[("POD_NAMESPACE", "shop")],
        Args {
            kubeconfig: Some(kubeconfig.to_owned()),
            ..Args::default()
        },
    );
    cfg.outbound_policy = OutboundPolicy::RegistryOnly;
    let (tx, rx) = tokio::sync::watch::channel(false);
    let running = app::start(
        cfg,
        OrigDst::Fixed("10.96.0.50:9080".parse().expect("addr")),
        rx,
    )
    .await
    .expect("start");
    (running, tx)
}

async fn get(addr: SocketAddr) -> Result<(u16, String), String> {
    ferry_tests::http_get(
        SocketAddr::from(([127, 0, 0, 1], addr.port())),
        "/",
        "reviews.shop",
    )
    .await
}

async fn eventually<F: Fn() -> Fut, Fut: std::future::Future<Output = bool>>(what: &str, f: F) {
    for _ in 0..150 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Start a proxy on `kubeconfig` and wait until it is ready (`what` if it never is). The proxy
/// and its stop switch.
async fn proxy_synced(
    kubeconfig: &std::path::Path,
    what: &str,
) -> (Running, tokio::sync::watch::Sender<bool>) {
    let (p, stop) = proxy(kubeconfig).await;
    let r = &p.readiness;
    eventually(what, || async { r.check().is_ok() }).await;
    (p, stop)
}

/// Start a proxy on `kubeconfig`; after `wait` it is still not ready, and says it waits for the
/// initial sync. The proxy and its stop switch.
async fn proxy_not_synced(
    kubeconfig: &std::path::Path,
    wait: Duration,
    what: &str,
) -> (Running, tokio::sync::watch::Sender<bool>) {
    let (p, stop) = proxy(kubeconfig).await;
    tokio::time::sleep(wait).await;
    let why = p.readiness.check().expect_err(what);
    assert!(why.contains("initial configuration sync"), "{why}");
    (p, stop)
}

fn write_kubeconfig(addr: SocketAddr, name: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("ferry-kubeconfig-{name}-{}", std::process::id()));
    std::fs::write(&p, FakeApiServer::kubeconfig(addr)).expect("write");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_drive_the_snapshot_through_sync_updates_410_and_outages() {
    let v1 = upstream::http("reviews-v1").await;
    let v2 = upstream::http("reviews-v2").await;
    let api = FakeApiServer::new(default_kinds(true));
    api.apply(service());
    api.apply(slice(v1));
    api.apply(json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "reviews", "namespace": "shop"}, "spec": {"hosts": ["reviews"]}}));

    // The proxy starts while the API server is not there yet: not ready, and it says why.
    let addr: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let kc = write_kubeconfig(addr, "main");
    let (p, stop) = proxy_not_synced(
        &kc,
        Duration::from_millis(300),
        "not ready without the API server",
    )
    .await;

    let (_, server) = api.start(Some(addr)).await;
    let r = &p.readiness;
    eventually("ready after the initial list", || async {
        r.check().is_ok()
    })
    .await;
    let out = p.addrs.outbound;
    let (code, body) = get(out).await.expect("request");
    assert_eq!(code, 200);
    assert!(body.contains("reviews-v1"), "{body}");
    assert_eq!(
        p.snapshot
            .borrow()
            .istio_resources()
            .as_array()
            .map_or(0, Vec::len),
        1,
        "VirtualServices reach the snapshot"
    );

    // An update by watch.
    api.apply(slice(v2));
    eventually("endpoint update by watch", || async {
        get(out).await.is_ok_and(|(_, b)| b.contains("reviews-v2"))
    })
    .await;

    // Compaction: open watches get 410 Gone; the watcher relists and still sees later changes.
    api.compact();
    tokio::time::sleep(Duration::from_millis(200)).await;
    api.apply(slice(v1));
    eventually("change after a 410 relist", || async {
        get(out).await.is_ok_and(|(_, b)| b.contains("reviews-v1"))
    })
    .await;

    // The API server goes away: the last snapshot keeps serving.
    server.abort();
    let _ = server.await;
    for _ in 0..5 {
        let (code, body) = get(out).await.expect("request during the outage");
        assert_eq!(code, 200);
        assert!(body.contains("reviews-v1"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        p.readiness.check().is_ok(),
        "an outage after sync does not fail readiness"
    );
    // Back again, with a change made while it was away.
    api.delete("EndpointSlice", "shop", "reviews-1");
    api.apply(slice(v2));
    let (_, server) = api.start(Some(addr)).await;
    eventually("resync after the outage", || async {
        get(out).await.is_ok_and(|(_, b)| b.contains("reviews-v2"))
    })
    .await;
    server.abort();
    let _ = stop.send(true);
    let _ = std::fs::remove_file(&kc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_istio_crds_do_not_block_readiness() {
    let api = FakeApiServer::new(default_kinds(false));
    api.apply(service());
    let (addr, server) = api.start(None).await;
    let kc = write_kubeconfig(addr, "nocrd");
    let (p, stop) = proxy_synced(&kc, "ready without Istio CRDs").await;
    assert_eq!(p.snapshot.borrow().services.len(), 1);
    server.abort();
    let _ = stop.send(true);
    let _ = std::fs::remove_file(&kc);
}

/// One object the proxy cannot read (here a Service whose port is not a number) is reported and
/// skipped; it must not stall discovery of everything else. (A typed watch fails to decode the
/// whole list and retries forever: no Service would ever be discovered, and readiness would hang.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_object_is_rejected_alone() {
    let v1 = upstream::http("reviews-v1").await;
    let api = FakeApiServer::new(default_kinds(true));
    api.apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "broken", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.51", "ports": [{"name": "http", "port": "eighty"}]}}));
    api.apply(service());
    api.apply(slice(v1));
    let (addr, server) = api.start(None).await;
    let kc = write_kubeconfig(addr, "malformed");
    let (p, stop) = proxy(&kc).await;
    let r = &p.readiness;
    eventually("ready despite the malformed Service", || async {
        r.check().is_ok()
    })
    .await;
    let (code, body) = get(p.addrs.outbound).await.expect("request");
    assert_eq!(code, 200);
    assert!(body.contains("reviews-v1"), "{body}");
    let snap = p.snapshot.borrow().clone();
    assert_eq!(snap.services.len(), 1, "only the readable Service");
    assert!(
        snap.rejected
            .iter()
            .any(|r| r.starts_with("Service broken") && r.contains("invalid type")),
        "{:?}",
        snap.rejected
    );
    server.abort();
    let _ = stop.send(true);
    let _ = std::fs::remove_file(&kc);
}

/// A fake API server over TLS holding one Service, its certificate issued for `name` by a
/// fresh cluster CA.
async fn tls_api_server(
    name: &str,
) -> (
    ferry_tests::tls::Pki,
    FakeApiServer,
    SocketAddr,
    tokio::task::JoinHandle<()>,
) {
    let pki = ferry_tests::tls::Pki::new("fake-cluster-ca");
    let api = FakeApiServer::new(default_kinds(true));
    api.apply(service());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let server = api.serve_tls(l, &pki.issue(&[name], 2099)).expect("serve");
    (pki, api, addr, server)
}

/// The API server is HTTPS-only in a cluster: discovery works over TLS trusting only the
/// kubeconfig's CA, and does not when the server's certificate is from another CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_over_tls_trusts_only_the_kubeconfig_ca() {
    let (pki, api, addr, server) = tls_api_server("127.0.0.1").await;
    let kc = write_kubeconfig(addr, "tls");
    std::fs::write(&kc, FakeApiServer::kubeconfig_tls(addr, &pki.ca_pem())).expect("write");
    let (p, stop) = proxy_synced(&kc, "ready over TLS").await;
    assert_eq!(p.snapshot.borrow().services.len(), 1);
    // The server offers HTTP/2 (ALPN), as kube-apiserver does: every list and watch went over
    // it, as streams of one connection (over HTTP/1.1 each watch holds a connection of its own).
    let (requests, http2) = api.requests();
    assert!(
        requests >= 6,
        "a list and a watch per kind, got {requests} requests"
    );
    assert_eq!(http2, requests, "requests over HTTP/2");
    assert_eq!(api.connections(), 1, "connections to the API server");
    let _ = stop.send(true);

    // The same server, but the kubeconfig trusts another CA: the handshake fails, nothing syncs.
    let other = ferry_tests::tls::Pki::new("another-ca");
    std::fs::write(&kc, FakeApiServer::kubeconfig_tls(addr, &other.ca_pem())).expect("write");
    let (p, stop) = proxy_not_synced(
        &kc,
        Duration::from_millis(1500),
        "not ready: the API server's certificate is not trusted",
    )
    .await;
    assert!(p.snapshot.borrow().services.is_empty());
    server.abort();
    let _ = stop.send(true);
    let _ = std::fs::remove_file(&kc);
}

/// A kubeconfig's `tls-server-name`: the server is dialled by address, its certificate names
/// only the Service's DNS name, and verification checks that name (as kube-rs's own stack does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_over_tls_honours_tls_server_name() {
    let (pki, _api, addr, server) = tls_api_server("kubernetes.default.svc").await;
    let kc = write_kubeconfig(addr, "tls-server-name");
    let plain = FakeApiServer::kubeconfig_tls(addr, &pki.ca_pem());

    // Without the name, the certificate does not match the address: nothing syncs.
    std::fs::write(&kc, &plain).expect("write");
    let (_running, stop) = proxy_not_synced(
        &kc,
        Duration::from_millis(1500),
        "not ready: the certificate names kubernetes.default.svc, not the address",
    )
    .await;
    let _ = stop.send(true);

    let named = plain.replace(
        "certificate-authority-data:",
        "tls-server-name: kubernetes.default.svc\n    certificate-authority-data:",
    );
    assert_ne!(named, plain, "kubeconfig layout changed");
    std::fs::write(&kc, named).expect("write");
    let (p, stop) = proxy_synced(&kc, "ready with tls-server-name").await;
    assert_eq!(p.snapshot.borrow().services.len(), 1);
    server.abort();
    let _ = stop.send(true);
    let _ = std::fs::remove_file(&kc);
}

/// A kubeconfig asking for a proxy the client cannot use is refused with the reason, never
/// silently bypassed.
#[tokio::test]
async fn a_kubeconfig_proxy_url_is_refused_not_ignored() {
    let addr: SocketAddr = "127.0.0.1:6443".parse().expect("addr");
    let kc = write_kubeconfig(addr, "proxy-url");
    let with_proxy = FakeApiServer::kubeconfig(addr).replace(
        &format!("server: http://{addr}"),
        &format!("server: http://{addr}\n    proxy-url: http://127.0.0.1:3128"),
    );
    assert!(
        with_proxy.contains("proxy-url"),
        "kubeconfig layout changed"
    );
    std::fs::write(&kc, with_proxy).expect("write");
    let err = ferry_proxy::k8s::client(Some(&kc))
        .await
        .err()
        .expect("a proxy-url must be refused");
    assert!(err.contains("proxy-url http://127.0.0.1:3128/"), "{err}");
    let _ = std::fs::remove_file(&kc);
}

#[test]
fn label_selector_syntax() {
    let labels: serde_json::Map<String, serde_json::Value> =
        serde_json::from_value(json!({"app": "web", "tier": "front"})).expect("map");
    for (sel, want) in [
        ("app=web", true),
        ("app==web,tier=front", true),
        ("app!=web", false),
        ("app in (web,api)", true),
        ("tier notin (front)", false),
        ("!missing", true),
        ("missing", false),
        ("app", true),
    ] {
        assert_eq!(
            ferry_tests::fake_apiserver::selector_matches(sel, &labels),
            want,
            "{sel}"
        );
    }
}
