//! `ferry-proxy`: `proxy sidecar ...` (what Istio's template runs), pilot-agent's helper commands
//! (`request POST drain` for the preStop hook, `wait` for holdApplicationUntilProxyStarts), and
//! `config listeners|clusters|endpoints|routes|all [-o json]` (the `istioctl proxy-config` workflow).

/// mimalloc instead of glibc malloc: see the README's performance section (malloc and free
/// were 7-9% of the proxy's CPU under load, most of it glibc's fastbin consolidation).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{IsTerminal, Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use ferry_proxy::config::{Args, Config, ProcessEnv};

fn http(addr: &str, method: &str, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("malformed response")?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn flag<'a>(rest: &'a [String], name: &str) -> Option<&'a str> {
    rest.iter()
        .find_map(|a| a.strip_prefix(&format!("--{name}=")))
        .or_else(|| {
            rest.iter()
                .position(|a| a == &format!("--{name}"))
                .and_then(|i| rest.get(i + 1))
                .map(String::as_str)
        })
}

/// `pilot-agent request [--debug-port=P] METHOD PATH`
fn request(rest: &[String]) -> ExitCode {
    let port = flag(rest, "debug-port").unwrap_or("15020");
    let words: Vec<&String> = rest
        .iter()
        .filter(|a| !a.starts_with("--") && Some(a.as_str()) != flag(rest, "debug-port"))
        .collect();
    let (method, path) = match words.as_slice() {
        [m, p] => (m.as_str(), format!("/{}", p.trim_start_matches('/'))),
        _ => {
            eprintln!("usage: request [--debug-port=PORT] METHOD PATH");
            return ExitCode::from(2);
        }
    };
    match http(&format!("127.0.0.1:{port}"), method, &path) {
        Ok((s, body)) => {
            print!("{body}");
            if (200..300).contains(&s) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// `pilot-agent wait [--timeoutSeconds N] [--periodMillis M] [--url URL]`: until the proxy is ready.
fn wait(rest: &[String]) -> ExitCode {
    let timeout = Duration::from_secs(
        flag(rest, "timeoutSeconds")
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    let period = Duration::from_millis(
        flag(rest, "periodMillis")
            .and_then(|s| s.parse().ok())
            .unwrap_or(500),
    );
    let url = flag(rest, "url").unwrap_or("http://localhost:15021/healthz/ready");
    let (addr, path) = url
        .trim_start_matches("http://")
        .split_once('/')
        .map(|(a, p)| (a.replace("localhost", "127.0.0.1"), format!("/{p}")))
        .unwrap_or(("127.0.0.1:15021".into(), "/healthz/ready".into()));
    let started = Instant::now();
    loop {
        if let Ok((200, _)) = http(&addr, "GET", &path) {
            eprintln!("proxy is ready");
            return ExitCode::SUCCESS;
        }
        if started.elapsed() > timeout {
            eprintln!("timed out after {timeout:?} waiting for {url}");
            return ExitCode::FAILURE;
        }
        std::thread::sleep(period);
    }
}

/// `config KIND [-o json] [--admin ADDR]`
fn config_cmd(rest: &[String]) -> ExitCode {
    let kind = rest.first().map(String::as_str).unwrap_or("all");
    // istioctl spellings: -o json, -ojson, -o=json, --output json, --output=json.
    let json = rest.iter().enumerate().any(|(i, a)| {
        matches!(a.as_str(), "-ojson" | "-o=json" | "--output=json")
            || (matches!(a.as_str(), "-o" | "--output")
                && rest.get(i + 1).map(String::as_str) == Some("json"))
    });
    let admin = flag(rest, "admin").unwrap_or("127.0.0.1:15000");
    let dump = match http(admin, "GET", "/config_dump")
        .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).map_err(|e| e.to_string()))
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("reading the admin endpoint at {admin}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let section = match kind {
        "listeners" | "listener" => dump["listeners"].clone(),
        "clusters" | "cluster" | "endpoints" | "endpoint" => dump["clusters"].clone(),
        "routes" | "route" => dump["istio"].clone(),
        _ => dump.clone(),
    };
    if json
        || !matches!(
            kind,
            "listeners" | "listener" | "clusters" | "cluster" | "endpoints" | "endpoint"
        )
    {
        println!(
            "{}",
            serde_json::to_string_pretty(&section).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    match kind {
        "listeners" | "listener" => {
            println!("{:<18} {:<22} NOTES", "NAME", "ADDRESS");
            for l in section.as_array().into_iter().flatten() {
                println!(
                    "{:<18} {:<22} {}",
                    l["name"].as_str().unwrap_or(""),
                    l["address"].as_str().unwrap_or(""),
                    l.get("policy").and_then(|p| p.as_str()).unwrap_or("")
                );
            }
        }
        "clusters" | "cluster" => {
            println!(
                "{:<50} {:<8} {:<10} ENDPOINTS",
                "SERVICE FQDN", "PORT", "PROTOCOL"
            );
            for c in section.as_array().into_iter().flatten() {
                for p in c["ports"].as_array().into_iter().flatten() {
                    let n = c["endpoints"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|e| e["port"] == p["port"])
                        .and_then(|e| e["addresses"].as_array().map(|a| a.len()))
                        .unwrap_or(0);
                    println!(
                        "{:<50} {:<8} {:<10} {}",
                        c["hostname"].as_str().unwrap_or(""),
                        p["port"],
                        p["protocol"].as_str().unwrap_or(""),
                        n
                    );
                }
            }
        }
        _ => {
            println!(
                "{:<24} {:<50} {:<8} SIDECAR",
                "ENDPOINT", "SERVICE", "STATUS"
            );
            for c in section.as_array().into_iter().flatten() {
                for e in c["endpoints"].as_array().into_iter().flatten() {
                    let sidecar = e["sidecar"].as_array();
                    for a in e["addresses"].as_array().into_iter().flatten() {
                        println!(
                            "{:<24} {:<50} {:<8} {}",
                            a.as_str().unwrap_or(""),
                            format!("{}:{}", c["hostname"].as_str().unwrap_or(""), e["port"]),
                            "HEALTHY",
                            if sidecar.is_some_and(|s| s.contains(a)) {
                                "yes"
                            } else {
                                "no"
                            }
                        );
                    }
                }
            }
        }
    }
    ExitCode::SUCCESS
}

/// `explain --host H [--port P] [--path /x] [--method M] [--header k=v]... [--admin ADDR]`
fn explain_cmd(rest: &[String]) -> ExitCode {
    let Some(host) = flag(rest, "host") else {
        eprintln!(
            "usage: explain --host HOST [--port PORT] [--path /x] [--method GET] [--header k=v]... [--admin 127.0.0.1:15000]"
        );
        return ExitCode::from(2);
    };
    let enc = |s: &str| s.replace(' ', "%20");
    let mut q = format!("host={}", enc(host));
    for (name, key) in [("port", "port"), ("path", "path"), ("method", "method")] {
        if let Some(v) = flag(rest, name) {
            q.push_str(&format!("&{key}={}", enc(v)));
        }
    }
    for (i, a) in rest.iter().enumerate() {
        let h = a.strip_prefix("--header=").map(str::to_owned).or_else(|| {
            (a == "--header")
                .then(|| rest.get(i + 1).cloned())
                .flatten()
        });
        if let Some(h) = h {
            let (k, v) = h
                .split_once('=')
                .or_else(|| h.split_once(':'))
                .unwrap_or((h.as_str(), ""));
            q.push_str(&format!("&header={}:{}", enc(k), enc(v)));
        }
    }
    let admin = flag(rest, "admin").unwrap_or("127.0.0.1:15000");
    match http(admin, "GET", &format!("/explain?{q}")) {
        Ok((200, body)) => {
            println!("{body}");
            ExitCode::SUCCESS
        }
        Ok((code, body)) => {
            eprintln!("admin endpoint answered {code}: {body}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("reading the admin endpoint at {admin}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The release build links glibc in (.ci/release), which must not load NSS modules.
#[cfg(all(target_env = "gnu", target_feature = "crt-static"))]
fn static_glibc() -> std::io::Result<()> {
    ferry_proxy::os::nss_files_and_dns_only()
}

#[cfg(not(all(target_env = "gnu", target_feature = "crt-static")))]
fn static_glibc() -> std::io::Result<()> {
    Ok(())
}

fn main() -> ExitCode {
    if let Err(e) = static_glibc() {
        eprintln!("ferry-proxy: {e}");
        return ExitCode::FAILURE;
    }
    let mut argv: Vec<String> = std::env::args().collect();
    // Istio's image runs `pilot-agent request ...` / `pilot-agent wait` from lifecycle hooks; our
    // image links pilot-agent to this binary.
    let argv0 = argv
        .first()
        .and_then(|a| a.rsplit('/').next())
        .unwrap_or("")
        .to_owned();
    if argv0 == "pilot-agent" && argv.len() > 1 && matches!(argv[1].as_str(), "request" | "wait") {
        argv[0] = "ferry-proxy".into();
    }
    match argv.get(1).map(String::as_str) {
        Some("request") => return request(&argv[2..]),
        Some("wait") => return wait(&argv[2..]),
        Some("config") => return config_cmd(&argv[2..]),
        Some("explain") => return explain_cmd(&argv[2..]),
        // The injected istio-init runs this image with `istio-iptables ARGS` (Istio's proxyv2
        // entrypoint dispatches the same way): hand over to ferry-init installed next to us.
        Some("istio-iptables") => {
            use std::os::unix::process::CommandExt;
            let init = std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(|d| d.join("ferry-init")))
                .unwrap_or_else(|| "ferry-init".into());
            let err = std::process::Command::new(&init).args(&argv[1..]).exec();
            eprintln!(
                "ferry-proxy: running {} for istio-iptables: {err}",
                init.display()
            );
            return ExitCode::from(127);
        }
        Some("crds") => {
            // The CustomResourceDefinitions for what the proxy reads (the chart ships this output).
            print!("{}", ferry_proxy::crds::yaml());
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let args = Args::parse_from(argv);
    let cfg = match Config::from_args(&args, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry-proxy: {e}");
            return ExitCode::from(64);
        }
    };
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cfg.log_filter.clone());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if cfg.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    // Before the runtime: its threads inherit the policy.
    match ferry_proxy::os::set_scheduling(cfg.scheduling) {
        Ok(()) => tracing::info!(policy = ?cfg.scheduling, "CPU scheduling policy set"),
        Err(e) => {
            tracing::warn!(policy = ?cfg.scheduling, error = %e, "could not set the CPU scheduling policy; running with the inherited one")
        }
    }
    // One worker: a current-thread runtime (no cross-thread wake-ups between the I/O driver and
    // a worker; the sidecar's usual shape, like Envoy's --concurrency 1 or a single event loop).
    let built = if cfg.workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.workers)
            .enable_all()
            .build()
    };
    let rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry-proxy: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let running = match ferry_proxy::app::start(cfg, ferry_proxy::transport::OrigDst::Kernel, rx).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("ferry-proxy: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let mut done = running.done;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            _ = &mut done => return ExitCode::SUCCESS,
        }
        tracing::info!("SIGTERM: draining");
        let _ = tx.send(true);
        let _ = done.await;
        ExitCode::SUCCESS
    })
}
