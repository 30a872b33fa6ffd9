//! Shared support for the workspace's end-to-end tests: finding Istio's conformance data,
//! locating the built binaries, and (in [`netns`]) network namespaces that clean up after
//! themselves.

use std::path::{Path, PathBuf};

pub mod bench;
pub mod fake_apiserver;
pub mod fixtures;
pub mod jsondiff;
pub mod lab;
pub mod netns;
pub mod tls;
pub mod upstream;

/// `shared/conformance/istio`: `FERRY_CONFORMANCE_DIR` if set, else the first ancestor of this
/// package that has `shared/conformance/istio`. Panics with the paths it tried: a missing oracle
/// must fail the run, never skip it.
pub fn conformance_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("FERRY_CONFORMANCE_DIR") {
        return PathBuf::from(dir);
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut tried = Vec::new();
    for anc in here.ancestors() {
        let candidate = anc.join("shared/conformance/istio");
        if candidate.is_dir() {
            return candidate;
        }
        tried.push(candidate.display().to_string());
    }
    panic!(
        "Istio conformance data not found; set FERRY_CONFORMANCE_DIR. Tried:\n{}",
        tried.join("\n")
    );
}

/// Read a conformance file, panicking with its path on failure.
pub fn read(rel: &str) -> String {
    let p = conformance_dir().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// A binary built from this workspace (`target/<profile>/<name>`), found next to the running test
/// executable (`target/<profile>/deps/`). Build it first: `cargo build --workspace`.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} not built; run `cargo build --workspace` (or `cargo test --workspace`, which builds binaries) first",
        bin.display()
    );
    bin
}

/// A proxy configuration for in-process tests: every port ephemeral, admin on loopback, the given
/// environment and discovery sources.
pub fn proxy_test_config(
    env: &[(&str, &str)],
    args: ferry_proxy::config::Args,
) -> ferry_proxy::config::Config {
    let env: std::collections::HashMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let args = ferry_proxy::config::Args {
        command: Some("proxy".into()),
        kind: Some("sidecar".into()),
        ..args
    };
    let mut cfg = ferry_proxy::config::Config::from_args(&args, &env).expect("test proxy config");
    cfg.ports = ferry_proxy::config::Ports {
        outbound: 0,
        inbound: 0,
        health: 0,
        prometheus: 0,
        status: 0,
        admin: "127.0.0.1:0".parse().expect("addr"),
    };
    cfg
}

/// One HTTP/1.1 GET on a fresh connection: status and body.
pub async fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
    host: &str,
) -> Result<(u16, String), String> {
    http_get_with(addr, path, host, &[])
        .await
        .map(|(status, _, body)| (status, body))
}

/// One HTTP/1.1 GET with extra request headers on a fresh connection: status, response headers
/// and body.
pub async fn http_get_with(
    addr: std::net::SocketAddr,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, hyper::HeaderMap, String), String> {
    use http_body_util::BodyExt;
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = hyper::Request::get(path).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(hyper::body::Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let head = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, head, String::from_utf8_lossy(&body).into_owned()))
}
