//! Two meshed pods for real: each network namespace gets `ferry-init`'s rules and runs
//! `ferry-proxy` as UID 1337; the apps talk through both sidecars. Traffic stays inside the
//! namespaces the test creates. Without root: SKIPPED (fails under CI=true).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::netns::{Child, Pair, bind_in, require_root};
use ferry_tests::{upstream, workspace_bin};

const INIT_ARGS: &[&str] = &[
    "istio-iptables",
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
];

struct Mesh {
    pair: Pair,
    dir: PathBuf,
    _proxies: Vec<Child>,
    vip: String,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn registry(pair: &Pair, vip: &str) -> String {
    let (client, server) = (pair.pod_ip(), pair.peer_ip());
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: default}}
spec:
  clusterIP: {vip}
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
  - {{name: tcp-echo, port: 9000, targetPort: 9000}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: server-1, namespace: default, labels: {{kubernetes.io/service-name: server}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}, {{name: tcp-echo, port: 9000}}]
endpoints: [{{addresses: ["{server}"], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: server-0, namespace: default}}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: server-0, namespace: default, labels: {{app: server}}}}
spec: {{containers: [{{name: app, image: x}}]}}
status: {{podIP: "{server}"}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client-0, namespace: default, labels: {{app: client}}}}
spec: {{containers: [{{name: app, image: x}}]}}
status: {{podIP: "{client}"}}
"#
    )
}

fn netcheck(pair: &Pair, ns: &str, uid: u32, args: &[&str]) -> Result<String, String> {
    let bin = workspace_bin("ferry-netcheck");
    let mut cmd = vec![bin.to_str().expect("utf8")];
    cmd.extend_from_slice(args);
    let out = pair.exec_as(ns, uid, &cmd);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

fn start_proxy(ns: &str, pod: &str, ip: &str, dir: &PathBuf) -> Child {
    let bin = workspace_bin("ferry-proxy");
    let child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{ns}"))
        .args(["-S", "1337", "-G", "1337", "env"])
        .arg(format!("POD_NAME={pod}"))
        .args(["POD_NAMESPACE=default", "SERVICE_ACCOUNT=default"])
        .arg(format!("INSTANCE_IP={ip}"))
        .arg(format!(
            "ISTIO_META_WORKLOAD_NAME={}",
            pod.trim_end_matches("-0")
        ))
        .arg(bin)
        .args([
            "proxy",
            "sidecar",
            "--domain",
            "default.svc.cluster.local",
            "--proxyLogLevel=warning",
            "--log_output_level=default:info",
            "--config-dir",
        ])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ferry-proxy");
    Child(child)
}

fn mesh() -> Mesh {
    let pair = Pair::new(false);
    let dir = std::env::temp_dir().join(format!("ferry-mesh-{}-{}", std::process::id(), pair.n));
    std::fs::create_dir_all(&dir).expect("dir");
    let vip = format!("10.96.{}.10", pair.n);
    std::fs::write(dir.join("registry.yaml"), registry(&pair, &vip)).expect("write");
    let init = workspace_bin("ferry-init");
    for ns in [&pair.pod, &pair.peer] {
        let mut cmd = vec![init.to_str().expect("utf8")];
        cmd.extend_from_slice(INIT_ARGS);
        let out = pair.exec(ns, &cmd);
        assert!(
            out.status.success(),
            "ferry-init in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let proxies = vec![
        start_proxy(&pair.pod, "client-0", &pair.pod_ip(), &dir),
        start_proxy(&pair.peer, "server-0", &pair.peer_ip(), &dir),
    ];
    for ns in [&pair.pod, &pair.peer] {
        let started = Instant::now();
        loop {
            if netcheck(
                &pair,
                ns,
                1000,
                &["http", "127.0.0.1:15021", "/healthz/ready", "x"],
            )
            .is_ok_and(|r| r.starts_with("200"))
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "proxy in {ns} never became ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Mesh {
        pair,
        dir,
        _proxies: proxies,
        vip,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_meshed_pods_talk_through_both_sidecars() {
    if !require_root("two_meshed_pods_talk_through_both_sidecars") {
        return;
    }
    let m = mesh();
    let p = &m.pair;
    // The server pod's apps: HTTP on 8080, echo on 9000, and an unregistered HTTP app on 7070.
    let any = |port: u16| SocketAddr::from(([0, 0, 0, 0], port));
    tokio::spawn(upstream::serve_http(
        tokio::net::TcpListener::from_std(bind_in(&p.peer, any(8080))).expect("listener"),
        "server-app".into(),
    ));
    tokio::spawn(upstream::serve_echo(
        tokio::net::TcpListener::from_std(bind_in(&p.peer, any(9000))).expect("listener"),
    ));
    tokio::spawn(upstream::serve_http(
        tokio::net::TcpListener::from_std(bind_in(&p.peer, any(7070))).expect("listener"),
        "unregistered-app".into(),
    ));
    let vip = m.vip.clone();
    let pod = p.pod.clone();
    let peer_ip = p.peer_ip();
    let checks = tokio::task::spawn_blocking(move || {
        let p = &m.pair;
        let mut failures = Vec::new();
        let mut check = |what: &str, got: Result<String, String>, want: &[&str]| match &got {
            Ok(s) if want.iter().all(|w| s.contains(w)) => {}
            _ => failures.push(format!("{what}: {got:?} lacks {want:?}")),
        };
        // HTTP through the ClusterIP: client sidecar picks the endpoint, server sidecar delivers it
        // to the app from 127.0.0.6.
        let r = netcheck(
            p,
            &pod,
            1000,
            &["http", &format!("{vip}:80"), "/hello", "server"],
        );
        check(
            "http via ClusterIP",
            r,
            &[
                "200 ",
                "\"server\":\"server-app\"",
                "\"peer\":\"127.0.0.6:",
                "\"host\":\"server\"",
            ],
        );
        // Host header naming the service routes to it even at another destination.
        let r = netcheck(
            p,
            &pod,
            1000,
            &[
                "http",
                &format!("{peer_ip}:7070"),
                "/",
                "server.default.svc.cluster.local",
            ],
        );
        check("host routing", r, &["200 ", "server-app"]);
        // An address outside the registry passes through (ALLOW_ANY).
        let r = netcheck(
            p,
            &pod,
            1000,
            &["http", &format!("{peer_ip}:7070"), "/", "unknown.example"],
        );
        check("passthrough", r, &["200 ", "unregistered-app"]);
        // Opaque TCP through the ClusterIP, both sidecars.
        let r = netcheck(
            p,
            &pod,
            1000,
            &["connect", &format!("{vip}:9000"), "echo-token"],
        );
        check("tcp echo", r, &["echo-token"]);
        // Metrics on both sides, with Istio's names and labels.
        let client_metrics = netcheck(
            p,
            &pod,
            1000,
            &["http", "127.0.0.1:15090", "/stats/prometheus", "x"],
        );
        check(
            "client metrics",
            client_metrics,
            &[
                "istio_requests_total{reporter=\"source\",source_workload=\"client\"",
                "destination_service=\"server.default.svc.cluster.local\"",
                "response_code=\"200\"",
                "istio_tcp_connections_opened_total{reporter=\"source\"",
            ],
        );
        let server_metrics = netcheck(
            p,
            &p.peer,
            1000,
            &["http", "127.0.0.1:15090", "/stats/prometheus", "x"],
        );
        check(
            "server metrics",
            server_metrics,
            &[
                "istio_requests_total{reporter=\"destination\",source_workload=\"client\"",
                "destination_workload=\"server\"",
            ],
        );
        // The admin endpoint is on loopback only and tells what the proxy knows.
        let dump = netcheck(
            p,
            &pod,
            1000,
            &["http", "127.0.0.1:15000", "/config_dump", "x"],
        );
        check(
            "config dump",
            dump,
            &["server.default.svc.cluster.local", "virtualOutbound"],
        );
        let outside = netcheck(
            p,
            &p.peer,
            1000,
            &[
                "http",
                &format!("{}:15000", p.pod_ip()),
                "/config_dump",
                "x",
            ],
        );
        if outside.is_ok_and(|s| s.contains("virtualOutbound")) {
            failures.push("admin endpoint reachable from another pod".into());
        }
        failures
    });
    let failures = checks.await.expect("checks");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
