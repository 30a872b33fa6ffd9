//! Benchmark (not a test): admission latency and throughput of `ferry-injector serve` over TLS
//! with keep-alive, as the API server calls it. The server runs as its own process (release
//! build); this process is the client.
//!
//! `cargo build --release --workspace && target/release/ferry-bench-injector [CONNECTIONS] [REVIEWS_PER_CONNECTION]`

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::tls::{Client, Pki};
use serde_json::json;

const SERVICE: &str = "ferry-injector.ferry-system.svc";

fn review(i: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": format!("bench-{i}"), "namespace": "shop", "operation": "CREATE", "dryRun": false, "object": {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "cart-7d4b9c8f6-", "labels": {"app": "cart", "pod-template-hash": "7d4b9c8f6"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "cart-7d4b9c8f6", "uid": "x", "controller": true}]},
            "spec": {"containers": [{"name": "cart", "image": "shop/cart:2.1", "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}}}]}}}
    }))
    .expect("json")
}

fn main() {
    let conns: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let per_conn: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    let bin = std::env::current_exe()
        .expect("exe")
        .with_file_name("ferry-injector");
    assert!(
        bin.exists(),
        "build first: cargo build --release --workspace"
    );
    let dir = std::env::temp_dir().join(format!("ferry-bench-injector-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let pki = Pki::new("bench-ca");
    let pair = pki.issue(&[SERVICE], 2031);
    std::fs::write(dir.join("tls.crt"), &pair.cert_pem).expect("write");
    std::fs::write(dir.join("tls.key"), &pair.key_pem).expect("write");
    let port = 20000 + (std::process::id() % 20000) as u16;
    let addr = format!("127.0.0.1:{port}");
    let mut server = Command::new(&bin)
        .args(["serve", "--listen", &addr, "--tls-cert"])
        .arg(dir.join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.join("tls.key"))
        .args(["--log", "warn"])
        .stdout(Stdio::null())
        .spawn()
        .expect("start ferry-injector");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let result = rt.block_on(async {
        let addr = addr.parse().expect("addr");
        let mut ready = false;
        for _ in 0..100 {
            if Client::connect(addr, SERVICE, &pki.ca_pem()).await.is_ok() {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ready, "server did not come up");
        // Warm-up.
        let mut c = Client::connect(addr, SERVICE, &pki.ca_pem())
            .await
            .expect("connect");
        for i in 0..200 {
            c.request("POST", "/inject", Some("application/json"), review(i))
                .await
                .expect("warm-up");
        }
        let started = Instant::now();
        let mut tasks = Vec::new();
        for k in 0..conns {
            let ca = pki.ca_pem();
            tasks.push(tokio::spawn(async move {
                let mut c = Client::connect(addr, SERVICE, &ca).await.expect("connect");
                let mut lat = Vec::with_capacity(per_conn);
                let mut errors = 0;
                for i in 0..per_conn {
                    let body = review(k * per_conn + i);
                    let t = Instant::now();
                    match c
                        .request("POST", "/inject", Some("application/json"), body)
                        .await
                    {
                        Ok((200, _)) => lat.push(t.elapsed()),
                        _ => errors += 1,
                    }
                }
                (lat, errors)
            }));
        }
        let mut all = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let (l, e) = t.await.expect("task");
            all.extend(l);
            errors += e;
        }
        (all, errors, started.elapsed())
    });
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let (mut lat, errors, elapsed) = result;
    lat.sort();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0;
    println!(
        "ferry-injector admission over TLS, keep-alive, {conns} connections x {per_conn} reviews (client: 1 thread, same machine)"
    );
    println!("| reviews | errors | reviews/s | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {} | {errors} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} |",
        lat.len(),
        lat.len() as f64 / elapsed.as_secs_f64(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
}
