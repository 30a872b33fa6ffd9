//! `ferry-demo`: the README's main job until the local lab exists. The injector decides and
//! injects a Deployment; then (as root) two pod namespaces get `ferry-init`'s rules and a
//! `ferry-proxy` each, running as UID 1337, and a request crosses both sidecars through a Service
//! ClusterIP. Everything it creates is removed at the end.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::netns::{Child, Pair, bind_in};
use ferry_tests::upstream;

const SAMPLE: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: cart, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  template:
    metadata: {labels: {app: cart, version: v2}}
    spec:
      containers:
      - name: cart
        image: shop/cart:2.1
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /ready, port: 8080}}
"#;

fn step(title: &str) {
    println!("\n== {title}");
}

fn sibling(name: &str) -> String {
    std::env::current_exe()
        .expect("own path")
        .with_file_name(name)
        .to_string_lossy()
        .into_owned()
}

fn registry(pair: &Pair, vip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: shop}}\nspec: {{clusterIP: {vip}, ports: [{{name: http, port: 9080, targetPort: 8080}}]}}\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: reviews-1, namespace: shop, labels: {{kubernetes.io/service-name: reviews}}}}\naddressType: IPv4\n\
ports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [\"{server}\"], conditions: {{ready: true}}}}]\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {{name: reviews-v1-0, namespace: shop, labels: {{app: reviews, version: v1}}}}\nspec: {{containers: [{{name: app, image: x}}]}}\nstatus: {{podIP: \"{server}\"}}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {{name: productpage-0, namespace: shop, labels: {{app: productpage}}}}\nspec: {{containers: [{{name: app, image: x}}]}}\nstatus: {{podIP: \"{client}\"}}\n",
        server = pair.peer_ip(),
        client = pair.pod_ip()
    )
}

/// reviews-v2 and the user's Istio YAML, as it would be applied to a cluster.
const ROUTING: &str = r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-2, namespace: shop, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{name: http, port: 8081}]
endpoints: [{addresses: ["V2_IP"], conditions: {ready: true}}]
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2-0, namespace: shop, labels: {app: reviews, version: v2}}
status: {podIP: "V2_IP"}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 80}
    - {destination: {host: reviews, subset: v2}, weight: 20}
"#;

fn main() {
    step(
        "1. ferry-injector explains and injects a Deployment in a namespace labelled istio-injection=enabled",
    );
    let cfg = ferry_injector::config::Config::default();
    let docs = ferry_injector::offline::parse_documents(SAMPLE).expect("sample parses");
    let labels = [("istio-injection".to_owned(), "enabled".to_owned())].into();
    print!(
        "{}",
        ferry_injector::offline::explain(&cfg, &docs[0], &labels, None).expect("explain")
    );
    let (out, _) = ferry_injector::offline::inject_documents(&cfg, docs).expect("inject");
    println!(
        "   rewritten readiness probe: {}",
        out[0]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    );

    step("2. the capture rules the injected istio-init installs (ferry-init --dry-run)");
    let init = sibling("ferry-init");
    let dry = Command::new(&init)
        .args(ferry_init::spec::INJECTED_DEFAULT_ARGS)
        .arg("--dry-run")
        .output()
        .expect("ferry-init");
    print!("{}", String::from_utf8_lossy(&dry.stdout));

    if !nix::unistd::Uid::effective().is_root() {
        println!("\n(not root: the live part needs network namespaces; run `sudo bash .ci/demo`)");
        return;
    }
    step(
        "3. two pods: productpage (10.X.0.2) and reviews (10.X.0.1), each its own network namespace",
    );
    let pair = Pair::new(false);
    println!(
        "   productpage: netns {} {}   reviews: netns {} {}",
        pair.pod,
        pair.pod_ip(),
        pair.peer,
        pair.peer_ip()
    );
    for ns in [&pair.pod, &pair.peer] {
        let mut cmd = vec![init.as_str()];
        cmd.extend_from_slice(ferry_init::spec::INJECTED_DEFAULT_ARGS);
        cmd.extend(["--run-validation", "--probe-timeout=3s"]);
        let out = pair.exec(ns, &cmd);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "ferry-init failed: {log}");
        for l in log
            .lines()
            .filter(|l| l.contains("applied") || l.contains("probe passed"))
        {
            println!("   [{ns}] {}", l.split("  ").last().unwrap_or(l).trim());
        }
    }

    step("4. ferry-proxy starts in each pod as UID 1337 (Istio's istio-proxy arguments)");
    let dir = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let vip = format!("10.96.{}.10", pair.n);
    std::fs::write(dir.join("registry.yaml"), registry(&pair, &vip)).expect("write");
    let proxy = sibling("ferry-proxy");
    let start = |ns: &str, pod: &str, ip: String| {
        Child(
            Command::new("nsenter")
                .arg(format!("--net=/var/run/netns/{ns}"))
                .args([
                    "-S",
                    "1337",
                    "-G",
                    "1337",
                    "env",
                    &format!("POD_NAME={pod}"),
                    "POD_NAMESPACE=shop",
                    &format!("INSTANCE_IP={ip}"),
                    &format!("ISTIO_META_WORKLOAD_NAME={}", pod.trim_end_matches("-0")),
                ])
                .arg(&proxy)
                .args([
                    "proxy",
                    "sidecar",
                    "--domain",
                    "shop.svc.cluster.local",
                    "--proxyLogLevel=warning",
                    "--log_output_level=default:warn",
                    "--no-kube",
                    "--config-dir",
                ])
                .arg(&dir)
                .stdout(Stdio::null())
                .spawn()
                .expect("ferry-proxy"),
        )
    };
    let mut proxies = vec![
        start(&pair.pod, "productpage-0", pair.pod_ip()),
        start(&pair.peer, "reviews-v1-0", pair.peer_ip()),
    ];
    let netcheck = sibling("ferry-netcheck");
    let http = |ns: &str, uid: u32, addr: &str, path: &str, host: &str| {
        let out = pair.exec_as(ns, uid, &[&netcheck, "http", addr, path, host]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let started = Instant::now();
    while !(http(&pair.pod, 1000, "127.0.0.1:15021", "/healthz/ready", "x").starts_with("200")
        && http(&pair.peer, 1000, "127.0.0.1:15021", "/healthz/ready", "x").starts_with("200"))
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "proxies did not become ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("   both proxies report ready on :15021/healthz/ready");

    // The reviews app (in its pod's namespace), answering who it is and what it saw.
    let listener = bind_in(&pair.peer, SocketAddr::from(([0, 0, 0, 0], 8080)));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.spawn(async move {
        upstream::serve_http(
            tokio::net::TcpListener::from_std(listener).expect("listener"),
            "reviews-v1".into(),
        )
        .await
    });

    let vip_port = format!("{vip}:9080");
    step(&format!(
        "5. productpage (uid 1000) calls http://reviews.shop:9080 via the ClusterIP {vip}"
    ));
    let answer = http(
        &pair.pod,
        1000,
        &format!("{vip}:9080"),
        "/reviews/1",
        "reviews.shop:9080",
    );
    println!("   response: {answer}");
    println!(
        "   (\"peer\" is 127.0.0.6: the reviews sidecar delivered it to the app; the app never saw the client's address)"
    );
    let metrics = http(&pair.pod, 1000, "127.0.0.1:15090", "/stats/prometheus", "x");
    for l in metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total"))
    {
        println!("   productpage sidecar: {l}");
    }
    let metrics = http(
        &pair.peer,
        1000,
        "127.0.0.1:15090",
        "/stats/prometheus",
        "x",
    );
    for l in metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total"))
    {
        println!("   reviews sidecar:     {l}");
    }
    println!("   $ ferry-proxy config clusters   (in productpage)");
    let out = pair.exec(&pair.pod, &[&proxy, "config", "clusters"]);
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        println!("     {l}");
    }

    step(
        "6. Istio routing, unmodified YAML: reviews-v2 joins (10.X.0.3); a DestinationRule and a VirtualService send end-user: jason to v2 and everyone else 80/20",
    );
    let v2_ip = format!("10.{}.0.3", pair.n);
    let out = pair.exec(
        &pair.peer,
        &["ip", "addr", "add", &format!("{v2_ip}/24"), "dev", "eth0"],
    );
    assert!(out.status.success(), "ip addr add: {out:?}");
    let v2 = bind_in(
        &pair.peer,
        SocketAddr::new(v2_ip.parse().expect("ip"), 8081),
    );
    rt.spawn(async move {
        upstream::serve_http(
            tokio::net::TcpListener::from_std(v2).expect("listener"),
            "reviews-v2".into(),
        )
        .await
    });
    let routing = ROUTING.replace("V2_IP", &v2_ip);
    print!(
        "{}",
        routing
            .lines()
            .filter(|l| !l.starts_with("status"))
            .map(|l| format!("   | {l}\n"))
            .collect::<String>()
    );
    std::fs::write(dir.join("routing.yaml"), &routing).expect("write");
    let ask = |headers: &[&str]| {
        let mut cmd = vec![
            netcheck.as_str(),
            "http",
            &vip_port,
            "/reviews/1",
            "reviews.shop:9080",
        ];
        cmd.extend_from_slice(headers);
        let out = pair.exec_as(&pair.pod, 1000, &cmd);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ["reviews-v1", "reviews-v2"]
            .into_iter()
            .find(|v| text.contains(v))
            .unwrap_or("error")
    };
    // The file is hot-reloaded: wait until jason's requests reach v2.
    let started = Instant::now();
    while ask(&["end-user: jason"]) != "reviews-v2" {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the VirtualService never took effect"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let tally = |headers: &[&str]| {
        let mut n = std::collections::BTreeMap::new();
        for _ in 0..100 {
            *n.entry(ask(headers)).or_insert(0) += 1;
        }
        n
    };
    println!(
        "   100 requests as end-user: jason -> {:?}",
        tally(&["end-user: jason"])
    );
    println!("   100 requests as anyone else     -> {:?}", tally(&[]));
    println!(
        "   $ ferry-proxy explain --host reviews.shop --port 9080 --path /reviews/1 --header end-user=jason"
    );
    let out = pair.exec(
        &pair.pod,
        &[
            &proxy,
            "explain",
            "--host",
            "reviews.shop",
            "--port",
            "9080",
            "--path",
            "/reviews/1",
            "--header",
            "end-user=jason",
        ],
    );
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        println!("     {l}");
    }

    step(
        "7. SIGTERM the sidecars (they drain and exit 0), remove the rules, delete the namespaces",
    );
    for p in &mut proxies {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let status = p.0.wait().expect("wait");
        println!("   ferry-proxy exited: {status}");
    }
    for ns in [&pair.pod, &pair.peer] {
        let mut cmd = vec![init.as_str()];
        cmd.extend_from_slice(ferry_init::spec::INJECTED_DEFAULT_ARGS);
        cmd.push("--cleanup-only");
        let out = pair.exec(ns, &cmd);
        assert!(out.status.success(), "cleanup failed");
        let left = String::from_utf8_lossy(&pair.exec(ns, &["iptables-save"]).stdout)
            .lines()
            .filter(|l| l.contains("ISTIO_"))
            .count();
        println!("   [{ns}] ISTIO_* rules left: {left}");
    }
    drop(rt);
    drop(pair);
    let _ = std::fs::remove_dir_all(&dir);
    println!("\nDone: namespaces and files removed.");
}
