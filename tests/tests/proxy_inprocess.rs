//! The proxy's data path in-process: real sockets and real upstreams, with the original
//! destination fixed per proxy instead of read from iptables (the netns tests do that part).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ferry_proxy::app::{self, Running};
use ferry_proxy::config::{Args, Config, OutboundPolicy};
use ferry_proxy::transport::OrigDst;
use ferry_tests::upstream;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(dir: Option<PathBuf>, policy: OutboundPolicy) -> Config {
    let env = [
        ("POD_NAME", "client-1"),
        ("POD_NAMESPACE", "default"),
        ("ISTIO_META_WORKLOAD_NAME", "client"),
    ];
    let mut cfg = ferry_tests::proxy_test_config(
        &env,
        Args {
            config_dir: dir,
            ..Args::default()
        },
    );
    cfg.outbound_policy = policy;
    cfg.drain = Duration::from_secs(5);
    cfg
}

struct P {
    running: Running,
    stop: tokio::sync::watch::Sender<bool>,
}

async fn proxy(orig: SocketAddr, dir: Option<PathBuf>, policy: OutboundPolicy) -> P {
    start(config(dir, policy), orig).await
}

async fn start(cfg: Config, orig: SocketAddr) -> P {
    let (stop, rx) = tokio::sync::watch::channel(false);
    let running = app::start(cfg, OrigDst::Fixed(orig), rx)
        .await
        .expect("start");
    P { running, stop }
}

/// A REGISTRY_ONLY proxy whose configuration directory holds `registry` (as registry.yaml),
/// ready; and that directory.
async fn proxy_with_registry(name: &str, registry: String, orig: &str) -> (P, PathBuf) {
    let dir = tmpdir(name);
    std::fs::write(dir.join("registry.yaml"), registry).expect("write");
    let orig = orig.parse().expect("addr");
    let p = proxy(orig, Some(dir.clone()), OutboundPolicy::RegistryOnly).await;
    ready(&p).await;
    (p, dir)
}

fn local(a: SocketAddr) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], a.port()))
}

async fn get(addr: SocketAddr, path: &str, host: &str) -> (u16, String) {
    ferry_tests::http_get(addr, path, host)
        .await
        .expect("HTTP GET")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-proxy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    d
}

/// Connect to the proxy's `listener` and, sending nothing, read a server-first `expected`
/// greeting (within 10 s, else `stalled`); the connection.
async fn greeting(listener: SocketAddr, expected: &[u8], stalled: &str) -> TcpStream {
    let mut s = TcpStream::connect(local(listener)).await.expect("connect");
    let mut got = vec![0u8; expected.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
        .await
        .expect(stalled)
        .expect("read");
    assert_eq!(got, expected);
    s
}

fn registry(service_ip: &str, port: u16, endpoints: &[SocketAddr], port_name: &str) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|e| {
            format!(
                "  - addresses: [\"{}\"]\n    conditions: {{ready: true}}",
                e.ip()
            )
        })
        .collect();
    let ep_port = endpoints.first().map(|e| e.port()).unwrap_or(1);
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  clusterIP: {service_ip}\n  ports: [{{name: {port_name}, port: {port}, targetPort: {ep_port}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: reviews-abc\n  namespace: default\n  labels: {{kubernetes.io/service-name: reviews}}\naddressType: IPv4\nports: [{{name: {port_name}, port: {ep_port}}}]\nendpoints:\n{}\n",
        if eps.is_empty() {
            "  []".to_owned()
        } else {
            eps.join("\n")
        }
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_with_half_close_and_server_first_without_stall() {
    let echo = upstream::echo().await;
    let p = proxy(echo, None, OutboundPolicy::AllowAny).await;
    let mut s = TcpStream::connect(local(p.running.addrs.outbound))
        .await
        .expect("connect");
    s.write_all(b"\x00\x01binary").await.expect("write");
    let mut buf = vec![0u8; 8];
    s.read_exact(&mut buf).await.expect("echo");
    assert_eq!(&buf, b"\x00\x01binary");
    // Half-close: our write side ends, the server still answers on its side.
    s.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .await
        .expect("read after half-close");
    assert_eq!(rest, b"bye");

    // A server that speaks first: the client says nothing and still gets the greeting.
    let greeter = upstream::server_first(b"220 smtp ready\r\n").await;
    let p2 = proxy(greeter, None, OutboundPolicy::AllowAny).await;
    greeting(
        p2.running.addrs.outbound,
        b"220 smtp ready\r\n",
        "greeting stalled",
    )
    .await;
    let m = p.running.metrics.encode();
    assert!(
        m.contains("istio_tcp_connections_opened_total{reporter=\"source\""),
        "{m}"
    );
    let _ = (p.stop.send(true), p2.stop.send(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keepalive_host_routing_and_errors() {
    let up = upstream::http("reviews-v1").await;
    // The original destination is the ClusterIP; the snapshot maps it to the endpoint.
    let (p, dir) = proxy_with_registry(
        "http1",
        registry("10.96.0.20", 9080, &[up], "http"),
        "10.96.0.20:9080",
    )
    .await;
    let out = local(p.running.addrs.outbound);
    let s = TcpStream::connect(out).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    for i in 0..3 {
        let req = hyper::Request::post(format!("/item/{i}"))
            .header("host", "reviews:9080")
            .body(Full::new(Bytes::from(vec![b'x'; 1000])))
            .expect("req");
        // The previous response finishing and the connection turning idle race: wait for it.
        tx.ready()
            .await
            .expect("connection ready for the next request");
        let resp = tx.send_request(req).await.expect("keep-alive request");
        assert_eq!(resp.status(), 200);
        let body: serde_json::Value =
            serde_json::from_slice(&resp.into_body().collect().await.expect("body").to_bytes())
                .expect("json");
        assert_eq!(body["server"], "reviews-v1");
        assert_eq!(body["host"], "reviews:9080", "Host preserved");
        assert_eq!(body["body_len"], 1000);
    }
    // A client's `Connection: close` (and what Connection names) is about its own connection:
    // not forwarded, and the pooled upstream connection is reused by the next client.
    let mut upstream_peers = Vec::new();
    for _ in 0..2 {
        let s = TcpStream::connect(out).await.expect("connect");
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = hyper::Request::get("/close")
            .header("host", "reviews:9080")
            .header("connection", "close, x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .body(Full::new(Bytes::new()))
            .expect("req");
        let resp = tx.send_request(req).await.expect("request");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers().get("connection").map(|v| v.as_bytes()),
            Some(&b"close"[..]),
            "the client asked to close: the proxy closes its side"
        );
        let body: serde_json::Value =
            serde_json::from_slice(&resp.into_body().collect().await.expect("body").to_bytes())
                .expect("json");
        assert_eq!(
            body["hop"],
            serde_json::json!({}),
            "hop-by-hop headers forwarded: {body}"
        );
        upstream_peers.push(body["peer"].clone());
    }
    assert_eq!(
        upstream_peers[0], upstream_peers[1],
        "the upstream connection was closed after a client's Connection: close"
    );
    let m = p.running.metrics.encode();
    assert!(
        m.contains("destination_service=\"reviews.default.svc.cluster.local\""),
        "{m}"
    );
    assert!(
        m.contains("response_code=\"200\"") && m.contains("source_workload=\"client\""),
        "{m}"
    );

    // No endpoints: 503; endpoint refusing: 502; unknown destination under REGISTRY_ONLY: 502.
    std::fs::write(
        dir.join("registry.yaml"),
        registry("10.96.0.20", 9080, &[], "http"),
    )
    .expect("write");
    let mut code = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        code = get(out, "/", "reviews").await.0;
        if code == 503 {
            break;
        }
    }
    assert_eq!(code, 503, "no healthy upstream");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    std::fs::write(
        dir.join("registry.yaml"),
        registry("10.96.0.20", 9080, &[closed], "http"),
    )
    .expect("write");
    let mut code = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        code = get(out, "/", "reviews").await.0;
        if code == 502 {
            break;
        }
    }
    assert_eq!(code, 502, "connection refused");
    let p2 = proxy(
        "192.0.2.10:80".parse().expect("addr"),
        Some(dir.clone()),
        OutboundPolicy::RegistryOnly,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        get(local(p2.running.addrs.outbound), "/", "example.com")
            .await
            .0,
        502,
        "REGISTRY_ONLY refuses unknown destinations"
    );
    let _ = (p.stop.send(true), p2.stop.send(true));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_trailers_and_websocket_upgrade() {
    let up = upstream::http("grpc-ish").await;
    let p = proxy(up, None, OutboundPolicy::AllowAny).await;
    let out = local(p.running.addrs.outbound);
    // HTTP/2 prior knowledge, gRPC-style trailers come through.
    let s = TcpStream::connect(out).await.expect("connect");
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = hyper::Request::post("http://svc/trailers")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .expect("req");
    let resp = tx.send_request(req).await.expect("h2 response");
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().expect("trailers forwarded");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
    let body: serde_json::Value = serde_json::from_slice(&collected.to_bytes()).expect("json");
    assert_eq!(body["version"], "HTTP/2.0", "HTTP/2 end to end");
    assert_eq!(
        body["host"], "svc",
        "the request's :authority, not the endpoint's address"
    );
    let m = p.running.metrics.encode();
    assert!(m.contains("request_protocol=\"grpc\""), "{m}");

    // Upgrade: the handshake is forwarded, then bytes flow both ways.
    let mut s = TcpStream::connect(out).await.expect("connect");
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.expect("read head");
        head.push(byte[0]);
    }
    assert!(
        String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s.write_all(b"ping over the upgraded connection")
        .await
        .expect("write");
    let mut echo = vec![0u8; 33];
    s.read_exact(&mut echo).await.expect("echo");
    assert_eq!(&echo, b"ping over the upgraded connection");
    let _ = p.stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_comes_from_127_0_0_6_and_readiness_follows_sync_and_drain() {
    let app_addr = upstream::http("app").await;
    let dir = tmpdir("ready").join("missing");
    let p = proxy(app_addr, Some(dir.clone()), OutboundPolicy::AllowAny).await;
    // The configuration directory does not exist yet: not ready, and it says why.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let health = local(p.running.addrs.health);
    let (code, body) = get(health, "/healthz/ready", "x").await;
    assert_eq!(code, 503);
    assert!(body.contains("initial configuration sync"), "{body}");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("empty.yaml"), "").expect("write");
    let mut ready = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if get(health, "/healthz/ready", "x").await.0 == 200 {
            ready = true;
            break;
        }
    }
    assert!(ready, "ready after the first sync");

    let (code, body) = get(local(p.running.addrs.inbound), "/hello", "app.local").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(
        v["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.6:")),
        "inbound source is 127.0.0.6: {v}"
    );

    // Drain with a slow request in flight: it completes; readiness fails meanwhile.
    let inbound = local(p.running.addrs.inbound);
    let slow = tokio::spawn(async move { get(inbound, "/slow/700", "app.local").await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    p.stop.send(true).expect("shutdown");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        get(health, "/healthz/ready", "x").await.0,
        503,
        "draining is not ready"
    );
    let (code, _) = slow.await.expect("slow request");
    assert_eq!(code, 200, "the in-flight request finished during the drain");
    tokio::time::timeout(Duration::from_secs(5), p.running.done)
        .await
        .expect("proxy stops once idle")
        .expect("join");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_change_keeps_long_lived_connections_and_loops_are_refused() {
    let echo = upstream::echo().await;
    let dir = tmpdir("change");
    std::fs::write(
        dir.join("r.yaml"),
        registry("10.96.0.30", 7000, &[echo], "tcp"),
    )
    .expect("write");
    let p = proxy(
        "10.96.0.30:7000".parse().expect("addr"),
        Some(dir.clone()),
        OutboundPolicy::RegistryOnly,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut s = TcpStream::connect(local(p.running.addrs.outbound))
        .await
        .expect("connect");
    s.write_all(b"one").await.expect("write");
    let mut b = [0u8; 3];
    s.read_exact(&mut b).await.expect("read");
    let v0 = p.running.snapshot.borrow().version;
    // A config change: the service now has no endpoints at all.
    std::fs::write(dir.join("r.yaml"), registry("10.96.0.30", 7000, &[], "tcp")).expect("write");
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if p.running.snapshot.borrow().version > v0 {
            break;
        }
    }
    assert!(p.running.snapshot.borrow().version > v0, "snapshot swapped");
    s.write_all(b"two").await.expect("write after change");
    s.read_exact(&mut b)
        .await
        .expect("the open connection survives the change");
    assert_eq!(&b, b"two");

    // A connection whose original destination is the proxy's own listener is refused.
    let mut cfg = config(None, OutboundPolicy::AllowAny);
    cfg.ports.outbound = 25001;
    let looped = start(cfg, "127.0.0.1:25001".parse().expect("addr")).await;
    let mut s = TcpStream::connect("127.0.0.1:25001")
        .await
        .expect("connect");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    assert!(buf.is_empty(), "closed without a byte");
    assert!(
        looped
            .running
            .metrics
            .encode()
            .contains("ferry_proxy_loops_refused_total 1")
    );
    let _ = (p.stop.send(true), looped.stop.send(true));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_port_runs_the_apps_original_probes_and_quitquitquit_exits() {
    let app = upstream::http("app").await;
    let echo = upstream::echo().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut cfg = config(None, OutboundPolicy::AllowAny);
    // What the injector writes into ISTIO_KUBE_APP_PROBERS for rewritten probes.
    cfg.app_probers = [
        ("/app-health/web/readyz".to_owned(), serde_json::json!({"httpGet": {"path": "/ready", "port": app.port()}})),
        ("/app-health/web/livez".to_owned(), serde_json::json!({"tcpSocket": {"port": echo.port()}})),
        ("/app-health/db/readyz".to_owned(), serde_json::json!({"tcpSocket": {"port": closed}, "timeoutSeconds": 1})),
        ("/app-health/web/startupz".to_owned(), serde_json::json!({"httpGet": {"path": "/slow/3000", "port": app.port()}, "timeoutSeconds": 1})),
    ]
    .into_iter()
    .collect();
    cfg.instance_ips = vec!["127.0.0.1".parse().expect("ip")];
    let (stop, rx) = tokio::sync::watch::channel(false);
    let running = app::start(cfg, OrigDst::Fixed(app), rx)
        .await
        .expect("start");
    let agent = local(running.addrs.agent);
    assert_eq!(
        get(agent, "/app-health/web/readyz", "x").await.0,
        200,
        "HTTP probe answered by the app"
    );
    assert_eq!(
        get(agent, "/app-health/web/livez", "x").await.0,
        200,
        "TCP probe connects"
    );
    assert_eq!(
        get(agent, "/app-health/db/readyz", "x").await.0,
        503,
        "closed port fails"
    );
    assert_eq!(
        get(agent, "/app-health/web/startupz", "x").await.0,
        503,
        "probe timeout fails"
    );
    assert_eq!(get(agent, "/app-health/nope/readyz", "x").await.0, 404);
    let (code, metrics) = get(agent, "/stats/prometheus", "x").await;
    assert_eq!(code, 200);
    assert!(metrics.contains("ferry_proxy_config_version"), "{metrics}");

    // A Job's last step: POST /quitquitquit makes the proxy stop promptly.
    let s = TcpStream::connect(agent).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let resp = tx
        .send_request(
            hyper::Request::post("/quitquitquit")
                .header("host", "x")
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
    tokio::time::timeout(Duration::from_secs(5), running.done)
        .await
        .expect("stops after /quitquitquit")
        .expect("join");
    drop(stop);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_app_probes_speak_the_health_protocol() {
    let serving = upstream::grpc_health(1).await;
    let not_serving = upstream::grpc_health(2).await;
    let mut cfg = config(None, OutboundPolicy::AllowAny);
    cfg.app_probers = [
        (
            "/app-health/api/readyz".to_owned(),
            serde_json::json!({"grpc": {"port": serving.port(), "service": "shop.Cart"}}),
        ),
        (
            "/app-health/api/livez".to_owned(),
            serde_json::json!({"grpc": {"port": not_serving.port(), "service": null}}),
        ),
    ]
    .into_iter()
    .collect();
    cfg.instance_ips = vec!["127.0.0.1".parse().expect("ip")];
    let (stop, rx) = tokio::sync::watch::channel(false);
    let running = app::start(cfg, OrigDst::Fixed(serving), rx)
        .await
        .expect("start");
    let agent = local(running.addrs.agent);
    let (code, body) = get(agent, "/app-health/api/readyz", "x").await;
    assert_eq!((code, body.trim()), (200, "SERVING"));
    let (code, body) = get(agent, "/app-health/api/livez", "x").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not SERVING"), "{body}");
    let _ = stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_passed_through_by_sni() {
    let pki = ferry_tests::tls::Pki::new("sni-ca");
    let pair = pki.issue(&["secure.default.svc.cluster.local"], 2031);
    let tls_server = upstream::tls_hello(&pair.cert_pem, &pair.key_pem, "secure-v1").await;
    let dir = tmpdir("sni");
    let svc = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: secure, namespace: default}}\nspec: {{clusterIP: 10.96.0.77, ports: [{{name: https, port: 443, targetPort: {p}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: secure-1, namespace: default, labels: {{kubernetes.io/service-name: secure}}}}\naddressType: IPv4\nports: [{{name: https, port: {p}}}]\nendpoints: [{{addresses: [\"127.0.0.1\"], conditions: {{ready: true}}}}]\n",
        p = tls_server.port()
    );
    std::fs::write(dir.join("s.yaml"), svc).expect("write");
    // The client dialled an address the registry does not know; its ClientHello names the service.
    let p = proxy(
        "192.0.2.44:443".parse().expect("addr"),
        Some(dir.clone()),
        OutboundPolicy::RegistryOnly,
    )
    .await;
    let r = &p.running.readiness;
    for _ in 0..50 {
        if r.check().is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::pem::PemObject::pem_slice_iter(pki.ca_pem().as_bytes()) {
        roots.add(c.expect("pem")).expect("root");
    }
    let client = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(local(p.running.addrs.outbound))
        .await
        .expect("connect");
    let name =
        rustls_pki_types::ServerName::try_from("secure.default.svc.cluster.local").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client))
        .connect(name, tcp)
        .await
        .expect("TLS end to end, not terminated by the proxy");
    let mut got = String::new();
    tls.read_to_string(&mut got).await.expect("read");
    assert_eq!(got, "hello from secure-v1");
    let _ = p.stop.send(true);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pod's port declared TCP by its service (`tcp-*`, or `appProtocol: tcp`) is relayed as
/// bytes at once, inbound and when dialled by pod IP: a server-first protocol on a port outside
/// the well-known list is not held for protocol detection (here an hour, so a sniff would hang
/// the test), and HTTP-looking bytes on it are not parsed as requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_tcp_ports_are_relayed_unsniffed_inbound_and_to_pod_ips() {
    let greeter = upstream::server_first(b"* OK custom ready\r\n").await;
    let dir = tmpdir("declared-tcp");
    std::fs::write(
        dir.join("registry.yaml"),
        registry("10.96.0.31", 7100, &[greeter], "tcp-custom"),
    )
    .expect("write");
    let mut cfg = config(Some(dir.clone()), OutboundPolicy::AllowAny);
    cfg.detection_timeout = Duration::from_secs(3600);
    // The original destination is the pod's own port (inbound) or its IP:port (outbound).
    let p = start(cfg, greeter).await;
    ready(&p).await;
    for listener in [p.running.addrs.inbound, p.running.addrs.outbound] {
        let mut s = greeting(
            listener,
            b"* OK custom ready\r\n",
            "the greeting waited for the client: the declared port was sniffed",
        )
        .await;
        // Bytes that look like HTTP go through as they are.
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
    }
    let m = p.running.metrics.encode();
    for reporter in ["destination", "source"] {
        assert!(
            m.contains(&format!(
                "istio_tcp_connections_opened_total{{reporter=\"{reporter}\""
            )),
            "{reporter}: {m}"
        );
    }
    assert!(!m.contains("istio_requests_total{"), "{m}");
    let _ = p.stop.send(true);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Metric labels are built once per connection and label-set change: a configuration update
/// between two requests on one keep-alive connection must show in the second one's labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_labels_follow_a_configuration_change_on_a_kept_alive_connection() {
    let up = upstream::http("app").await;
    let dir = tmpdir("labels");
    let named = |name: &str| {
        registry("10.96.0.21", 9080, &[up], "http")
            .replace("name: reviews", &format!("name: {name}"))
            .replace("service-name: reviews", &format!("service-name: {name}"))
    };
    std::fs::write(dir.join("registry.yaml"), named("reviews")).expect("write");
    let p = proxy(
        "10.96.0.21:9080".parse().expect("addr"),
        Some(dir.clone()),
        OutboundPolicy::RegistryOnly,
    )
    .await;
    ready(&p).await;
    let s = TcpStream::connect(local(p.running.addrs.outbound))
        .await
        .expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let count = |m: &str, name: &str| {
        m.lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains(&format!("destination_service_name=\"{name}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap_or("").to_owned())
            .collect::<Vec<_>>()
    };
    let mut send = async |path: &str| {
        tx.ready().await.expect("connection ready");
        // By address: the Host names no service, so the original destination picks it.
        let req = hyper::Request::get(path)
            .header("host", "10.96.0.21:9080")
            .body(Full::new(Bytes::new()))
            .expect("req");
        let resp = tx.send_request(req).await.expect("request");
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        status
    };
    assert_eq!(send("/one").await, 200);
    assert_eq!(send("/two").await, 200);
    assert_eq!(count(&p.running.metrics.encode(), "reviews"), vec!["2"]);

    // Same ClusterIP, renamed service: the next request on the same connection is counted
    // under the new name.
    std::fs::write(dir.join("registry.yaml"), named("ratings")).expect("write");
    let mut renamed = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(send("/three").await, 200);
        if !count(&p.running.metrics.encode(), "ratings").is_empty() {
            renamed = true;
            break;
        }
    }
    assert!(
        renamed,
        "labels never followed the update: {}",
        p.running.metrics.encode()
    );
    let m = p.running.metrics.encode();
    let reviews: u64 = count(&m, "reviews")[0].parse().expect("count");
    let ratings: u64 = count(&m, "ratings")[0].parse().expect("count");
    assert_eq!(ratings, 1, "{m}");
    assert!(reviews >= 2, "{m}");
    let _ = p.stop.send(true);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `registry` with one endpoint, plus that endpoint's pod, labelled the way injection
/// labels a pod with a sidecar.
fn registry_with_sidecar_pod(service_ip: &str, endpoint: SocketAddr) -> String {
    format!(
        "{}---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: reviews-0\n  namespace: default\n  labels: {{app: reviews, security.istio.io/tlsMode: istio}}\nstatus: {{podIP: \"{}\"}}\n",
        registry(service_ip, 9080, &[endpoint], "http"),
        endpoint.ip()
    )
}

async fn ready(p: &P) {
    for _ in 0..100 {
        if p.running.readiness.check().is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("proxy not ready");
}

/// `n` concurrent HTTP/1.1 requests for `path` (Host `reviews:9080`), each on its own client
/// connection, through `out`; each must answer 200. Their bodies.
async fn concurrent(out: SocketAddr, n: usize, path: &'static str) -> Vec<String> {
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(async move { get(out, path, "reviews:9080").await }))
        .collect();
    let mut bodies = Vec::new();
    for t in tasks {
        let (code, body) = t.await.expect("request task");
        assert_eq!(code, 200, "{body}");
        bodies.push(body);
    }
    bodies
}

/// Five concurrent HTTP/1.1 requests, each on its own client connection, through `out`: every
/// one must reach the app as HTTP/1.1 with its Host and without ferry's marker.
async fn five_concurrent(out: SocketAddr) {
    for body in concurrent(out, 5, "/slow/300").await {
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["version"], "HTTP/1.1", "the app gets HTTP/1.1: {v}");
        assert_eq!(v["host"], "reviews:9080", "Host preserved: {v}");
        assert_eq!(v["hop"], serde_json::json!({}), "marker leaked: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_between_sidecars_shares_one_http2_connection_and_the_app_gets_http1() {
    let app = upstream::http("reviews-v1").await;
    let empty = tmpdir("mux-server");
    std::fs::write(empty.join("empty.yaml"), "").expect("write");
    // The server pod's sidecar: its inbound listener in front of the app.
    let server = proxy(app, Some(empty.clone()), OutboundPolicy::AllowAny).await;
    let (relay, accepted) =
        upstream::counting_relay("127.0.0.3", local(server.running.addrs.inbound)).await;
    let orig = "10.96.0.40:9080";
    let (client, dir) = proxy_with_registry(
        "mux-client",
        registry_with_sidecar_pod("10.96.0.40", relay),
        orig,
    )
    .await;
    five_concurrent(local(client.running.addrs.outbound)).await;
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "five concurrent client connections shared one connection to the peer sidecar"
    );
    // More concurrent requests than hyper's default stream limit (200) share the connection
    // at once: none waits for another to finish (the app sees all of them in flight together).
    concurrent(local(client.running.addrs.outbound), 250, "/gate/250").await;
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    let m = server.running.metrics.encode();
    assert!(
        m.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("reporter=\"destination\"")
            && l.contains("request_protocol=\"http\"")
            && l.ends_with(" 255")),
        "the peer counts the requests as HTTP/1.1: {m}"
    );

    // Control: with multiplexing off, each concurrent request needs its own connection.
    let mut cfg = config(Some(dir.clone()), OutboundPolicy::RegistryOnly);
    cfg.multiplex_peers = false;
    let plain = start(cfg, orig.parse().expect("addr")).await;
    ready(&plain).await;
    let before = accepted.load(std::sync::atomic::Ordering::SeqCst);
    five_concurrent(local(plain.running.addrs.outbound)).await;
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst) - before,
        5,
        "--multiplex-peers=false: a connection per concurrent request"
    );
    let _ = (
        server.stop.send(true),
        client.stop.send(true),
        plain.stop.send(true),
    );
    let _ = (
        std::fs::remove_dir_all(&dir),
        std::fs::remove_dir_all(&empty),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_labelled_with_a_sidecar_that_only_speaks_http1_still_gets_its_requests() {
    // Labelled as injected, but nothing captures the port (say, excluded by an annotation the
    // proxy did not see): the HTTP/1.1-only app answers the HTTP/2 preface with an error.
    let app = upstream::http1_only_on("127.0.0.4", "plain").await;
    let (p, dir) = proxy_with_registry(
        "mux-fallback",
        registry_with_sidecar_pod("10.96.0.41", app),
        "10.96.0.41:9080",
    )
    .await;
    let out = local(p.running.addrs.outbound);
    let event = |m: &str| {
        m.lines()
            .find(|l| {
                l.starts_with("ferry_proxy_upstream_events_total{") && l.contains("peer_not_http2")
            })
            .map(str::to_owned)
    };
    for i in 0..3 {
        let (code, body) = get(out, "/x", "reviews:9080").await;
        assert_eq!(code, 200, "request {i}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["server"], "plain");
        assert_eq!(v["hop"], serde_json::json!({}), "{v}");
        let m = p.running.metrics.encode();
        assert!(
            event(&m).is_some_and(|l| l.ends_with(" 1")),
            "one fallback, then HTTP/1.1 without trying again: {m}"
        );
    }
    let _ = p.stop.send(true);
    let _ = std::fs::remove_dir_all(&dir);
}
