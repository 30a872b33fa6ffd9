//! Istio routing through the real proxy data path: unmodified VirtualService and
//! DestinationRule YAML, pods told apart by IP (127.0.0.2, .3, ...), counted over many requests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ferry_proxy::app::{self, Running};
use ferry_proxy::config::{Args, OutboundPolicy};
use ferry_proxy::transport::OrigDst;
use ferry_tests::upstream;

struct P {
    running: Running,
    _stop: tokio::sync::watch::Sender<bool>,
    dir: PathBuf,
}

impl Drop for P {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const VIP: &str = "10.96.7.7";

/// reviews v1 and v2 (pods by IP, labelled by version), ratings, and the given Istio YAML.
fn registry(v1: SocketAddr, v2: SocketAddr, ratings: SocketAddr, istio: &str) -> String {
    use ferry_tests::fixtures::{endpoint_slice, pod, service, subsets_v1_v2};
    let (ip1, ip2, ip3) = (
        v1.ip().to_string(),
        v2.ip().to_string(),
        ratings.ip().to_string(),
    );
    [
        service("reviews", "default", VIP, 9080, v1.port()),
        endpoint_slice(
            "reviews-1",
            "default",
            "reviews",
            ("http", v1.port()),
            &[(&ip1, None)],
        ),
        endpoint_slice(
            "reviews-2",
            "default",
            "reviews",
            ("http", v2.port()),
            &[(&ip2, None)],
        ),
        pod("reviews-v1", "default", "app: reviews, version: v1", &ip1),
        pod("reviews-v2", "default", "app: reviews, version: v2", &ip2),
        service("ratings", "default", "10.96.7.8", 9080, ratings.port()),
        endpoint_slice(
            "ratings-1",
            "default",
            "ratings",
            ("http", ratings.port()),
            &[(&ip3, None)],
        ),
        subsets_v1_v2("reviews", "default"),
        istio.to_owned(),
    ]
    .join("---\n")
}

async fn start(istio: &str, name: &str) -> (P, SocketAddr, [SocketAddr; 3]) {
    let v1 = upstream::http_on("127.0.0.2", "reviews-v1").await;
    let v2 = upstream::http_on("127.0.0.3", "reviews-v2").await;
    let ratings = upstream::http_on("127.0.0.4", "ratings").await;
    let dir = std::env::temp_dir().join(format!("ferry-routing-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("r.yaml"), registry(v1, v2, ratings, istio)).expect("write");
    let mut cfg = ferry_tests::proxy_test_config(
        &[("POD_NAMESPACE", "default")],
        Args {
            config_dir: Some(dir.clone()),
            ..Args::default()
        },
    );
    cfg.outbound_policy = OutboundPolicy::RegistryOnly;
    let (stop, rx) = tokio::sync::watch::channel(false);
    let running = app::start(
        cfg,
        OrigDst::Fixed(format!("{VIP}:9080").parse().expect("addr")),
        rx,
    )
    .await
    .expect("start");
    for _ in 0..100 {
        if running.readiness.check().is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        running.snapshot.borrow().rejected.is_empty(),
        "{:?}",
        running.snapshot.borrow().rejected
    );
    let out = SocketAddr::from(([127, 0, 0, 1], running.addrs.outbound.port()));
    (
        P {
            running,
            _stop: stop,
            dir,
        },
        out,
        [v1, v2, ratings],
    )
}

/// GET with extra headers; (status, server name or Location, full body).
async fn get(out: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    use http_body_util::{BodyExt, Full};
    let s = tokio::net::TcpStream::connect(out).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut b = hyper::Request::get(path).header("host", "reviews:9080");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = tx
        .send_request(b.body(Full::new(hyper::body::Bytes::new())).expect("req"))
        .await
        .expect("response");
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let served_by = resp
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = String::from_utf8_lossy(&resp.into_body().collect().await.expect("body").to_bytes())
        .into_owned();
    let server = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["server"].as_str().map(str::to_owned));
    (
        status,
        location.or(server).unwrap_or_default(),
        format!("{body} x-served-by={}", served_by.unwrap_or_default()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_routing_and_a_90_10_split() {
    let vs = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}"#;
    let (_p, out, _) = start(vs, "split").await;
    for _ in 0..20 {
        assert_eq!(
            get(out, "/", &[("end-user", "jason")]).await.1,
            "reviews-v2",
            "jason always gets v2"
        );
    }
    let n = 1000;
    let mut v1 = 0;
    for _ in 0..n {
        let (code, server, _) = get(out, "/", &[]).await;
        assert_eq!(code, 200);
        if server == "reviews-v1" {
            v1 += 1;
        }
    }
    let pct = v1 as f64 * 100.0 / n as f64;
    assert!(
        (87.0..=93.0).contains(&pct),
        "v1 got {pct}% of {n} requests, want 90 ± 3"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_routing_rewrite_redirect_and_headers() {
    let vs = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, redirectCode: 302}
  - match: [{uri: {prefix: /ratings/}}]
    rewrite: {uri: /v1/}
    route: [{destination: {host: ratings}}]
    headers: {response: {set: {x-served-by: ratings-route}}}
  - route: [{destination: {host: reviews, subset: v1}}]"#;
    let (_p, out, _) = start(vs, "prefix").await;
    let (code, location, _) = get(out, "/old/page", &[]).await;
    assert_eq!((code, location.as_str()), (302, "http://reviews:9080/new"));
    let (code, server, body) = get(out, "/ratings/7?x=1", &[]).await;
    assert_eq!((code, server.as_str()), (200, "ratings"));
    assert!(
        body.contains("\"path\":\"/v1/7\""),
        "prefix rewritten: {body}"
    );
    assert!(
        body.contains("x-served-by=ratings-route"),
        "response header set: {body}"
    );
    assert_eq!(get(out, "/reviews/1", &[]).await.1, "reviews-v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_changed_live_drop_no_request() {
    let weights = |a: u32, b: u32| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - {{destination: {{host: reviews, subset: v1}}, weight: {a}}}\n    - {{destination: {{host: reviews, subset: v2}}, weight: {b}}}\n"
        )
    };
    let (p, out, [v1, v2, ratings]) = start(&weights(100, 0), "live").await;
    let version = p.running.snapshot.borrow().version;
    let changed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = changed.clone();
    let load = tokio::spawn(async move {
        let (mut failures, mut v1_after_change, mut after) = (0, 0, 0);
        for _ in 0..600 {
            let observed = seen.load(std::sync::atomic::Ordering::SeqCst);
            let (code, server, _) = get(out, "/", &[]).await;
            if code != 200 {
                failures += 1;
            }
            if observed {
                after += 1;
                if server == "reviews-v1" {
                    v1_after_change += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (failures, v1_after_change, after)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(
        p.dir.join("r.yaml"),
        registry(v1, v2, ratings, &weights(0, 100)),
    )
    .expect("write");
    for _ in 0..200 {
        if p.running.snapshot.borrow().version > version {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        p.running.snapshot.borrow().version > version,
        "the change was applied"
    );
    changed.store(true, std::sync::atomic::Ordering::SeqCst);
    let (failures, v1_after_change, after) = load.await.expect("load");
    assert_eq!(failures, 0, "no request failed while the weights moved");
    assert!(after > 50, "enough requests after the change ({after})");
    assert_eq!(
        v1_after_change, 0,
        "after the change every request goes to v2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_subset_is_503_and_explained() {
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: default}\nspec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v9}}]}]}\n";
    let v1 = upstream::http_on("127.0.0.2", "reviews-v1").await;
    let dir = std::env::temp_dir().join(format!("ferry-routing-subset-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("r.yaml"), registry(v1, v1, v1, vs)).expect("write");
    let cfg = ferry_tests::proxy_test_config(
        &[],
        Args {
            config_dir: Some(dir.clone()),
            ..Args::default()
        },
    );
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let running = app::start(
        cfg,
        OrigDst::Fixed(format!("{VIP}:9080").parse().expect("addr")),
        rx,
    )
    .await
    .expect("start");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rejected = running.snapshot.borrow().rejected.join("\n");
    assert!(rejected.contains("subset \"v9\""), "{rejected}");
    let out = SocketAddr::from(([127, 0, 0, 1], running.addrs.outbound.port()));
    let (code, _, body) = get(out, "/", &[]).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no healthy upstream"), "{body}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_is_explained_and_unmatched_is_404() {
    let vs = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: api
    match: [{uri: {prefix: /api}}]
    route:
    - {destination: {host: reviews, subset: v1}, weight: 75}
    - {destination: {host: reviews, subset: v2}, weight: 25}"#;
    let (p, out, [v1, v2, _]) = start(vs, "explain").await;
    let admin = p.running.addrs.admin;
    let explain = |q: &'static str| async move {
        let (code, body) = ferry_tests::http_get(admin, &format!("/explain?{q}"), "x")
            .await
            .expect("explain");
        assert_eq!(code, 200);
        serde_json::from_str::<serde_json::Value>(&body).expect("json")
    };
    let e = explain("host=reviews&port=9080&path=/&header=end-user:jason").await;
    assert_eq!(e["matched"]["rule"], "default/reviews jason", "{e}");
    assert_eq!(e["destinations"][0]["subset"], "v2");
    assert_eq!(
        e["destinations"][0]["resolved"]["endpoints"][0],
        v2.to_string(),
        "{e}"
    );
    assert_eq!(
        e["destinations"][0]["resolved"]["destinationRule"],
        "DestinationRule default/reviews"
    );
    let e = explain("host=reviews.default&path=/api/x").await;
    assert_eq!(e["matched"]["rule"], "default/reviews api");
    assert_eq!(
        (
            e["destinations"][0]["weight"].as_u64(),
            e["destinations"][1]["weight"].as_u64()
        ),
        (Some(75), Some(25))
    );
    assert_eq!(
        e["destinations"][0]["resolved"]["endpoints"][0],
        v1.to_string()
    );
    let e = explain("host=reviews&path=/other").await;
    assert!(
        e["verdict"]
            .as_str()
            .is_some_and(|v| v.contains("no rule matched")),
        "{e}"
    );
    assert_eq!(
        get(out, "/other", &[]).await.0,
        404,
        "a VirtualService that matches nothing: 404, as Istio"
    );
    let e = explain("host=ratings&path=/").await;
    assert!(
        e["verdict"]
            .as_str()
            .is_some_and(|v| v.contains("no VirtualService")),
        "{e}"
    );
    let e = explain("host=nowhere.example").await;
    assert!(
        e["verdict"]
            .as_str()
            .is_some_and(|v| v.contains("not a known service")),
        "{e}"
    );
}
