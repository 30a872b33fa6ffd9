//! Two meshed pods for real: each network namespace gets `ferry-init`'s rules and runs
//! `ferry-proxy` as UID 1337; the apps talk through both sidecars. Traffic stays inside the
//! namespaces the test creates. Without root: SKIPPED (fails under CI=true).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::netns::{Child, Pair, bind_in, require_root};
use ferry_tests::{upstream, workspace_bin};

const INIT_ARGS: &[&str] = ferry_init::spec::INJECTED_DEFAULT_ARGS;

struct Mesh {
    pair: Pair,
    dir: PathBuf,
    proxies: Vec<Child>,
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
  - {{name: http2-api, port: 81, targetPort: 8081}}
  - {{name: mysql, port: 3306, targetPort: 3306}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: server-1, namespace: default, labels: {{kubernetes.io/service-name: server}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}, {{name: tcp-echo, port: 9000}}, {{name: http2-api, port: 8081}}, {{name: mysql, port: 3306}}]
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
        // The client's sidecar runs one worker (a current-thread runtime), the server's the
        // default two: both runtimes are exercised for real.
        .args(if pod.starts_with("client") {
            &["--concurrency", "1"][..]
        } else {
            &[][..]
        })
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ferry-proxy");
    Child(child)
}

fn mesh() -> Mesh {
    mesh_with(|_| String::new())
}

/// A mesh whose config directory also holds `extra(&pair)` as `routing.yaml`.
fn mesh_with(extra: impl FnOnce(&Pair) -> String) -> Mesh {
    let pair = Pair::new(false);
    let dir = std::env::temp_dir().join(format!("ferry-mesh-{}-{}", std::process::id(), pair.n));
    std::fs::create_dir_all(&dir).expect("dir");
    let vip = format!("10.96.{}.10", pair.n);
    std::fs::write(dir.join("registry.yaml"), registry(&pair, &vip)).expect("write");
    std::fs::write(dir.join("routing.yaml"), extra(&pair)).expect("write");
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
        proxies,
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
            &[
                "server.default.svc.cluster.local",
                "virtualOutbound",
                // The default policy, and the kernel accepted it for an unprivileged uid.
                "\"schedulingInEffect\": \"Batch\"",
            ],
        );
        // The istioctl proxy-config workflow, from inside the pod.
        let bin = workspace_bin("ferry-proxy");
        let bin = bin.to_str().expect("utf8");
        let out = p.exec(&pod, &[bin, "config", "clusters"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !(out.status.success()
            && text.contains("server.default.svc.cluster.local")
            && text.contains("Http"))
        {
            failures.push(format!("ferry-proxy config clusters: {text}"));
        }
        let out = p.exec(&pod, &[bin, "config", "endpoints"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !text.contains(&format!("{peer_ip}:8080")) {
            failures.push(format!("ferry-proxy config endpoints: {text}"));
        }
        let out = p.exec(&pod, &[bin, "config", "listeners", "-o", "json"]);
        if serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .map(|v| v.as_array().map(|a| a.len()))
            .ok()
            .flatten()
            != Some(6)
        {
            failures.push(format!(
                "ferry-proxy config listeners -o json: {}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
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

use ferry_tests::netns::run_in;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn h1(addr: SocketAddr, path: &str, host: &str) -> Result<(u16, String), String> {
    ferry_tests::http_get(addr, path, host).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocols_config_changes_and_drain_through_both_sidecars() {
    if !require_root("protocols_config_changes_and_drain_through_both_sidecars") {
        return;
    }
    let mut m = mesh();
    let p = &m.pair;
    let any = |port: u16| SocketAddr::from(([0, 0, 0, 0], port));
    tokio::spawn(upstream::serve_http(
        tokio::net::TcpListener::from_std(bind_in(&p.peer, any(8080))).expect("l"),
        "server-app".into(),
    ));
    tokio::spawn(upstream::serve_http(
        tokio::net::TcpListener::from_std(bind_in(&p.peer, any(8081))).expect("l"),
        "h2-app".into(),
    ));
    tokio::spawn(upstream::serve_echo(
        tokio::net::TcpListener::from_std(bind_in(&p.peer, any(9000))).expect("l"),
    ));
    // A server-first protocol on a declared mysql port, and on an undeclared well-known port.
    for port in [3306u16, 25] {
        let l = tokio::net::TcpListener::from_std(bind_in(&p.peer, any(port))).expect("l");
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let _ = s.write_all(b"220 hello from the server\r\n").await;
                    let mut b = [0u8; 8];
                    let _ = s.read(&mut b).await;
                });
            }
        });
    }
    let vip: std::net::IpAddr = m.vip.parse().expect("vip");
    let peer_ip: std::net::IpAddr = p.peer_ip().parse().expect("ip");
    let pod = p.pod.clone();
    let mut failures: Vec<String> = run_in(&pod, move || async move {
        let mut f = Vec::new();
        // HTTP/2 prior knowledge with gRPC-style trailers, through both sidecars.
        let h2 = async {
            let s = tokio::net::TcpStream::connect(SocketAddr::new(vip, 81))
                .await
                .map_err(|e| e.to_string())?;
            let (mut tx, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let req = hyper::Request::post("http://server:81/trailers")
                .header("content-type", "application/grpc")
                .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
                .map_err(|e| e.to_string())?;
            let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
            let c = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            let t = c
                .trailers()
                .and_then(|t| t.get("grpc-status"))
                .map(|v| v.to_str().unwrap_or("").to_owned());
            Ok::<_, String>((t, String::from_utf8_lossy(&c.to_bytes()).into_owned()))
        };
        match h2.await {
            Ok((Some(s), body))
                if s == "0" && body.contains("HTTP/2.0") && body.contains("h2-app") => {}
            other => f.push(format!("h2 + trailers: {other:?}")),
        }
        // Websocket-style upgrade.
        let ws = async {
            let (mut s, head) = ws_open(SocketAddr::new(vip, 80), "server").await?;
            s.write_all(b"frame").await.map_err(|e| e.to_string())?;
            let mut e = [0u8; 5];
            s.read_exact(&mut e).await.map_err(|e| e.to_string())?;
            Ok::<_, String>((head, e))
        };
        match ws.await {
            Ok((head, e)) if head.starts_with("HTTP/1.1 101") && &e == b"frame" => {}
            other => f.push(format!("websocket: {other:?}")),
        }
        // Opaque TCP with half-close.
        let tcp = async {
            let mut s = tokio::net::TcpStream::connect(SocketAddr::new(vip, 9000))
                .await
                .map_err(|e| e.to_string())?;
            s.write_all(b"\x00binary\xff")
                .await
                .map_err(|e| e.to_string())?;
            s.shutdown().await.map_err(|e| e.to_string())?;
            let mut all = Vec::new();
            s.read_to_end(&mut all).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(all)
        };
        match tcp.await {
            Ok(all) if all == b"\x00binary\xffbye" => {}
            other => f.push(format!("tcp half-close: {other:?}")),
        }
        // Bulk opaque TCP, where each sidecar's relay moves to splice(2): 4 MiB each way at
        // once, every byte back in order, then the half-close.
        let bulk = async {
            let s = tokio::net::TcpStream::connect(SocketAddr::new(vip, 9000))
                .await
                .map_err(|e| e.to_string())?;
            let (mut r, mut w) = s.into_split();
            let data: Vec<u8> = (0..4usize << 20).map(|i| (i % 251) as u8).collect();
            let sent = data.clone();
            let writer = tokio::spawn(async move {
                w.write_all(&sent).await?;
                w.shutdown().await
            });
            let mut all = Vec::new();
            r.read_to_end(&mut all).await.map_err(|e| e.to_string())?;
            writer
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((all, data))
        };
        match tokio::time::timeout(Duration::from_secs(60), bulk).await {
            Ok(Ok((all, mut data))) => {
                data.extend_from_slice(b"bye");
                if all != data {
                    f.push(format!(
                        "tcp bulk: {} bytes back of {}, or out of order",
                        all.len(),
                        data.len()
                    ));
                }
            }
            other => f.push(format!("tcp bulk: {other:?}")),
        }
        // Server-first protocols answer without the client saying anything.
        for (addr, what) in [
            (SocketAddr::new(vip, 3306), "declared mysql port"),
            (SocketAddr::new(peer_ip, 25), "undeclared port 25"),
        ] {
            let greet = async {
                let mut s = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut g = vec![0u8; 27];
                tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut g))
                    .await
                    .map_err(|_| "stalled".to_owned())?
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(g)
            };
            match greet.await {
                Ok(g) if g.starts_with(b"220 hello") => {}
                other => f.push(format!("server-first ({what}): {other:?}")),
            }
        }
        f
    });
    // The bulk transfer took the zero-copy path at both sidecars, both ways (the relay says so
    // in its metrics; a pipe that could not be had would show as copy_no_pipe).
    for (ns, side) in [(&p.pod, "client"), (&p.peer, "server")] {
        match netcheck(
            p,
            ns,
            1000,
            &["http", "127.0.0.1:15090", "/stats/prometheus", "x"],
        ) {
            Ok(text) => {
                let spliced = text
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("ferry_proxy_tcp_relay_directions_total{mode=\"splice\"} ")
                    })
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if spliced.is_none_or(|n| n < 2) {
                    failures.push(format!(
                        "{side} sidecar: bulk TCP not spliced both ways ({spliced:?}): {}",
                        text.lines()
                            .filter(|l| l.contains("tcp_relay"))
                            .collect::<Vec<_>>()
                            .join(" | ")
                    ));
                }
            }
            Err(e) => failures.push(format!("{side} metrics: {e}")),
        }
    }

    // A configuration change during a long-lived connection: the connection survives.
    let dir = m.dir.clone();
    let vip_s = m.vip.clone();
    let pod = p.pod.clone();
    let survived: Result<(), String> = run_in(&pod, move || async move {
        let mut s = tokio::net::TcpStream::connect(format!("{vip_s}:9000"))
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(b"before").await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 6];
        s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        std::fs::write(dir.join("extra.yaml"), "apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: default}\nspec: {clusterIP: 10.96.250.250, ports: [{name: http, port: 80}]}\n").map_err(|e| e.to_string())?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        s.write_all(b"after!").await.map_err(|e| e.to_string())?;
        s.read_exact(&mut b)
            .await
            .map_err(|e| format!("connection dropped by the change: {e}"))?;
        if &b != b"after!" {
            return Err(format!("got {b:?}"));
        }
        Ok(())
    });
    if let Err(e) = survived {
        failures.push(format!("config change: {e}"));
    }

    // SIGTERM to the server's sidecar while a slow request is in flight: the request completes.
    let server_proxy = m.proxies[1].0.id() as i32;
    let vip_s = m.vip.clone();
    let pod = p.pod.clone();
    let slow = std::thread::spawn(move || {
        run_in(&pod, move || async move {
            h1(
                format!("{vip_s}:80").parse().expect("addr"),
                "/slow/1500",
                "server",
            )
            .await
        })
    });
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server_proxy),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    match slow.join().expect("slow thread") {
        Ok((200, body)) if body.contains("server-app") => {}
        other => failures.push(format!("drain: in-flight request {other:?}")),
    }
    let started = Instant::now();
    loop {
        match m.proxies[1].0.try_wait() {
            Ok(Some(status)) => {
                if !status.success() {
                    failures.push(format!("server proxy exited with {status}"));
                }
                break;
            }
            _ if started.elapsed() > Duration::from_secs(8) => {
                failures.push("server proxy did not exit after draining".into());
                break;
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The Bookinfo-style reviews service with two versions, each a "pod" with its own IP inside the
/// server namespace, plus a DestinationRule and the given VirtualService spec.
fn reviews(pair: &Pair, vs_http: &str) -> String {
    let n = pair.n;
    for host in [3, 4] {
        let out = pair.exec(
            &pair.peer,
            &[
                "ip",
                "addr",
                "add",
                &format!("10.{n}.0.{host}/24"),
                "dev",
                "eth0",
            ],
        );
        assert!(out.status.success(), "ip addr add: {out:?}");
    }
    reviews_yaml(n, vs_http)
}

fn reviews_yaml(n: u32, vs_http: &str) -> String {
    use ferry_tests::fixtures::{endpoint_slice, pod, service, subsets_v1_v2};
    let (v1, v2) = (format!("10.{n}.0.3"), format!("10.{n}.0.4"));
    [
        service("reviews", "default", &format!("10.96.{n}.20"), 9080, 8080),
        endpoint_slice(
            "reviews-1",
            "default",
            "reviews",
            ("http", 8080),
            &[(&v1, Some("reviews-v1")), (&v2, Some("reviews-v2"))],
        ),
        pod("reviews-v1", "default", "app: reviews, version: v1", &v1),
        pod("reviews-v2", "default", "app: reviews, version: v2", &v2),
        subsets_v1_v2("reviews", "default"),
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
metadata: {{name: reviews, namespace: default}}\nspec:\n  hosts: [reviews]\n  http:\n{vs_http}\n"
        ),
    ]
    .join("---\n")
}

const REVIEWS_HTTP: &str = r#"  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new}
  - match: [{uri: {prefix: /api/}}]
    rewrite: {uri: /v1/}
    headers: {response: {set: {x-route: api}}}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /server/}}]
    route: [{destination: {host: server.default.svc.cluster.local, port: {number: 80}}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}"#;

/// Which version served a response (the test apps name themselves in the JSON body).
fn served_by(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["server"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("unparsable body {body:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_routing_through_init_and_both_sidecars() {
    if !require_root("istio_routing_through_init_and_both_sidecars") {
        return;
    }
    let m = mesh_with(|pair| reviews(pair, REVIEWS_HTTP));
    let p = &m.pair;
    let n = p.n;
    for (host, name) in [(3, "reviews-v1"), (4, "reviews-v2")] {
        let addr = SocketAddr::from(([10, n as u8, 0, host], 8080));
        tokio::spawn(upstream::serve_http(
            tokio::net::TcpListener::from_std(bind_in(&p.peer, addr)).expect("listener"),
            name.into(),
        ));
    }
    tokio::spawn(upstream::serve_http(
        tokio::net::TcpListener::from_std(bind_in(
            &p.peer,
            SocketAddr::from(([10, n as u8, 0, 1], 8080)),
        ))
        .expect("listener"),
        "server-app".into(),
    ));
    let vip = SocketAddr::from(([10, 96, n as u8, 20], 9080));
    let pod = p.pod.clone();
    let failures: Vec<String> = run_in(&pod, move || async move {
        let mut f = Vec::new();
        let get = |path: &'static str, headers: &'static [(&'static str, &'static str)]| {
            ferry_tests::http_get_with(vip, path, "reviews:9080", headers)
        };
        for _ in 0..20 {
            match get("/", &[("end-user", "jason")]).await {
                Ok((200, _, b)) if served_by(&b) == "reviews-v2" => {}
                other => f.push(format!("jason -> v2: {other:?}")),
            }
        }
        match get("/old", &[]).await {
            Ok((301, h, _))
                if h.get("location")
                    .is_some_and(|l| l == "http://reviews:9080/new") => {}
            other => f.push(format!("redirect: {other:?}")),
        }
        match get("/api/ratings", &[]).await {
            Ok((200, h, b))
                if served_by(&b) == "reviews-v1"
                    && b.contains("\"path\":\"/v1/ratings\"")
                    && h.get("x-route").is_some_and(|v| v == "api") => {}
            other => f.push(format!("prefix + rewrite + response header: {other:?}")),
        }
        match get("/server/x", &[]).await {
            Ok((200, _, b)) if served_by(&b) == "server-app" => {}
            other => f.push(format!("prefix to another service: {other:?}")),
        }
        let (mut v1, mut v2) = (0, 0);
        for _ in 0..1000 {
            match get("/", &[]).await {
                Ok((200, _, b)) if served_by(&b) == "reviews-v1" => v1 += 1,
                Ok((200, _, b)) if served_by(&b) == "reviews-v2" => v2 += 1,
                other => f.push(format!("split: {other:?}")),
            }
        }
        // The issue's bar: within 3 points of 90/10 over 1,000 requests (3 sd of a fair draw).
        if v1 + v2 != 1000 || !(70..=130).contains(&v2) {
            f.push(format!("90/10 split gave v1={v1} v2={v2}"));
        }
        f
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Weights changed live, 100/0 then 0/100, by rewriting the file while requests flow: no
    // request may fail, new requests follow the new weights, and connections opened before the
    // changes (opaque TCP, a websocket, an HTTP/1.1 keep-alive connection) stay up.
    tokio::spawn(upstream::serve_echo(
        tokio::net::TcpListener::from_std(bind_in(
            &p.peer,
            SocketAddr::from(([10, n as u8, 0, 1], 9000)),
        ))
        .expect("listener"),
    ));
    let phases: Vec<(String, &'static str)> = [(100, 0, "reviews-v1"), (0, 100, "reviews-v2")]
        .into_iter()
        .map(|(w1, w2, want)| {
            let shifted = REVIEWS_HTTP
                .replace(
                    "subset: v1}, weight: 90",
                    &format!("subset: v1}}, weight: {w1}"),
                )
                .replace(
                    "subset: v2}, weight: 10",
                    &format!("subset: v2}}, weight: {w2}"),
                );
            assert_ne!(shifted, REVIEWS_HTTP);
            (reviews_yaml(n, &shifted), want)
        })
        .collect();
    let dir = m.dir.clone();
    let tcp_vip = SocketAddr::from(([10, 96, n as u8, 10], 9000));
    let failures: Vec<String> = run_in(&pod, move || async move {
        let mut f = Vec::new();
        let long_lived = async {
            let tcp = tokio::net::TcpStream::connect(tcp_vip)
                .await
                .map_err(|e| e.to_string())?;
            let (ws, head) = ws_open(vip, "reviews:9080").await?;
            if !head.starts_with("HTTP/1.1 101") {
                return Err(format!("websocket upgrade: {head}"));
            }
            let s = tokio::net::TcpStream::connect(vip)
                .await
                .map_err(|e| e.to_string())?;
            let (h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Ok::<_, String>((tcp, ws, h1))
        };
        let (mut tcp, mut ws, mut h1) = match long_lived.await {
            Ok(c) => c,
            Err(e) => return vec![format!("opening long-lived connections: {e}")],
        };
        for (round, (yaml, want)) in phases.into_iter().enumerate() {
            let dir = dir.clone();
            let written = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let done = written.clone();
            let writer = tokio::task::spawn_blocking(move || {
                std::thread::sleep(Duration::from_millis(300));
                let tmp = dir.join("routing.yaml.tmp");
                std::fs::write(&tmp, yaml).expect("write");
                std::fs::rename(&tmp, dir.join("routing.yaml")).expect("rename");
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            let mut seen = Vec::new();
            let started = Instant::now();
            // Until 100 consecutive answers after the write come from the wanted version (under
            // the old 90/10 that happens by chance with p = 0.9^100): the change is in effect.
            let mut streak = 0;
            while streak < 100 && started.elapsed() < Duration::from_secs(20) {
                let after_write = written.load(std::sync::atomic::Ordering::SeqCst);
                match ferry_tests::http_get_with(vip, "/", "reviews:9080", &[]).await {
                    Ok((200, _, b)) => {
                        let who = served_by(&b);
                        streak = if who == want && after_write {
                            streak + 1
                        } else {
                            0
                        };
                        seen.push(who);
                    }
                    other => f.push(format!("during change to {want}: {other:?}")),
                }
            }
            writer.await.expect("writer");
            if streak < 100 {
                f.push(format!(
                    "traffic never moved to {want} (last streak {streak})"
                ));
            }
            if want == "reviews-v2" && !seen.iter().any(|w| w == "reviews-v1") {
                f.push(format!(
                    "the change to 0/100 happened before any request was measured: {seen:?}"
                ));
            }
            // The connections opened before any change still carry traffic.
            let token = format!("round{round}");
            let mut echo = vec![0u8; token.len()];
            for (what, s) in [("tcp", &mut tcp), ("websocket", &mut ws)] {
                let r = async {
                    s.write_all(token.as_bytes()).await?;
                    s.read_exact(&mut echo).await
                };
                match r.await {
                    Ok(_) if echo == token.as_bytes() => {}
                    other => f.push(format!(
                        "{what} opened before the change: {other:?} {echo:?}"
                    )),
                }
            }
            let req = hyper::Request::get("/")
                .header("host", "reviews:9080")
                .body(Full::new(Bytes::new()))
                .expect("request");
            if let Err(e) = h1.ready().await {
                f.push(format!("keep-alive connection after the change: {e}"));
                continue;
            }
            match h1.send_request(req).await {
                Ok(r) if r.status() == 200 => {
                    let body = r.into_body().collect().await.map(|c| c.to_bytes());
                    let who = body
                        .map(|b| served_by(&String::from_utf8_lossy(&b)))
                        .unwrap_or_default();
                    // Routing is per request: the kept-alive connection follows the new weights.
                    if who != want {
                        f.push(format!(
                            "keep-alive request after the change went to {who}, not {want}"
                        ));
                    }
                }
                other => f.push(format!("keep-alive connection after the change: {other:?}")),
            }
        }
        f
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Open a websocket-style upgrade: the stream and the response head.
async fn ws_open(addr: SocketAddr, host: &str) -> Result<(tokio::net::TcpStream, String), String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        head.push(b[0]);
    }
    Ok((s, String::from_utf8_lossy(&head).into_owned()))
}
