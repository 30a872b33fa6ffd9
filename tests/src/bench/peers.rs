//! The sidecars being compared, started in both pods as uid 1337: ferry-proxy with discovery
//! from a Kubernetes API (the in-repo fake API server, the production watch path), and nginx
//! and HAProxy configured as sidecar stand-ins under the same capture rules.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use super::topo::{APP_H1, APP_H2, APP_TCP, PROXY_UID, Place, Proc, Topology, wait_listening};

/// The service the load is addressed to (its Host / :authority).
pub const HOST: &str = "app.bench.svc.cluster.local";
pub const NAMESPACE: &str = "bench";
/// ferry with the app's ports declared as opaque TCP: the floor an HTTP-aware path is held to.
pub const FERRY_L4: &str = "ferry-l4";
/// Where each pod reaches the fake API server (loopback: never captured).
pub const API_HOST: &str = "127.0.0.1";
pub const API_PORT: u16 = 16443;

/// What a stand-in must speak on its listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    H1,
    H2,
    Tcp,
}

/// Binaries and knobs for starting sidecars.
pub struct Sidecars {
    pub proxy: PathBuf,
    pub netcheck: PathBuf,
    /// The service account files ferry reads in-cluster (see [`service_account`]).
    pub service_account: PathBuf,
    /// ferry-proxy's --scheduling.
    pub scheduling: String,
}

/// nginx as a sidecar: static upstreams (nginx cannot read SO_ORIGINAL_DST), HTTP/1.1 keep-alive
/// pools upstream; h2c only on the first hop (nginx's upstreams are HTTP/1.x).
pub fn nginx_conf(dir: &Path, phase: Phase, peer_ip: &str) -> String {
    let d = dir.display();
    let mut c = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 16384; }}\n"
    );
    match phase {
        Phase::H1 | Phase::H2 => {
            let h2 = if phase == Phase::H2 { " http2" } else { "" };
            let pool = "keepalive 512; keepalive_requests 100000000; keepalive_timeout 600s;";
            let _ = write!(
                c,
                "http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 600s;\n\
                 http2_max_concurrent_streams 1024;\n  client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n\
                 fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n\
                 upstream outbound {{ server {peer_ip}:{APP_H1}; {pool} }}\n\
                 upstream inbound {{ server 127.0.0.1:{APP_H1}; {pool} }}\n\
                 proxy_http_version 1.1;\n  proxy_set_header Connection \"\";\n  proxy_set_header Host $host;\n\
                 server {{ listen 15001{h2} backlog=4096; location / {{ proxy_pass http://outbound; }} }}\n\
                 server {{ listen 15006 backlog=4096; location / {{ proxy_pass http://inbound; }} }}\n}}\n"
            );
        }
        Phase::Tcp => {
            c = format!(
                "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n{c}\
                 stream {{\n  server {{ listen 15001 backlog=4096; proxy_pass {peer_ip}:{APP_TCP}; }}\n\
                 server {{ listen 15006 backlog=4096; proxy_pass 127.0.0.1:{APP_TCP}; }}\n}}\n"
            );
        }
    }
    c
}

/// HAProxy as a transparent sidecar: Debian's build reads SO_ORIGINAL_DST (`server x 0.0.0.0`
/// dials the original destination); inbound dials from 127.0.0.6 as Envoy does; h2 kept end to
/// end.
pub fn haproxy_conf(phase: Phase) -> String {
    let mut c = String::from(
        "global\n  nbthread 1\n  maxconn 8000\n  log stderr format raw local0 err\n\
         defaults\n  timeout connect 5s\n  timeout client 600s\n  timeout server 600s\n\
         timeout http-keep-alive 600s\n  log global\n",
    );
    match phase {
        Phase::H1 | Phase::H2 => c.push_str(
            "  mode http\n  option http-keep-alive\n  http-reuse always\n\
             frontend outbound\n  bind 0.0.0.0:15001 backlog 4096\n  use_backend out_h2 if { fc_http_major 2 }\n  default_backend out_h1\n\
             backend out_h1\n  server orig 0.0.0.0\n\
             backend out_h2\n  server orig 0.0.0.0 proto h2\n\
             frontend inbound\n  bind 0.0.0.0:15006 backlog 4096\n  use_backend in_h2 if { fc_http_major 2 }\n  default_backend in_h1\n\
             backend in_h1\n  server orig 0.0.0.0 source 127.0.0.6\n\
             backend in_h2\n  server orig 0.0.0.0 source 127.0.0.6 proto h2\n",
        ),
        Phase::Tcp => c.push_str(
            "  mode tcp\n\
             frontend outbound\n  bind 0.0.0.0:15001 backlog 4096\n  default_backend out_tcp\n\
             backend out_tcp\n  server orig 0.0.0.0\n\
             frontend inbound\n  bind 0.0.0.0:15006 backlog 4096\n  default_backend in_tcp\n\
             backend in_tcp\n  server orig 0.0.0.0 source 127.0.0.6\n",
        ),
    }
    c
}

/// The registry the ferry sidecars discover: the app Service (HTTP/1.1, HTTP/2 and TCP ports),
/// its endpoint, and both pods.
pub fn registry(t: &Topology) -> Vec<Value> {
    let pod = |name: &str, ip: &str, app: &str| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": app, "version": "v1",
                   // What injection adds: both pods have a sidecar.
                   "security.istio.io/tlsMode": "istio"}},
               "spec": {"containers": [{"name": "app", "image": "bench"}]},
               "status": {"podIP": ip, "phase": "Running"}})
    };
    let mut objects =
        vec![json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})];
    objects.extend(app_service(t, false));
    objects.push(pod("client-0", &t.client_ip, "client"));
    objects.push(pod("app-0", &t.server_ip, "app"));
    objects
}

/// The app's Service and EndpointSlice. With `opaque` every port is declared TCP
/// (`appProtocol: tcp`, which Istio reads before the port's name, and which the EndpointSlice
/// controller copies to the slice's ports), so ferry relays the HTTP ports' bytes without
/// parsing them: the [`FERRY_L4`] path.
pub fn app_service(t: &Topology, opaque: bool) -> Vec<Value> {
    let port = |name: &str, port: u16, target: bool| {
        let mut p = json!({"name": name, "port": port});
        if target {
            p["targetPort"] = json!(port);
        }
        if opaque {
            p["appProtocol"] = json!("tcp");
        }
        p
    };
    let ports = |target: bool| {
        json!([
            port("http", APP_H1, target),
            port("http2-app", APP_H2, target),
            port("tcp-bulk", APP_TCP, target)
        ])
    };
    vec![
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "app", "namespace": NAMESPACE},
               "spec": {"clusterIP": "10.96.77.10", "selector": {"app": "app"}, "ports": ports(true)}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "app-1", "namespace": NAMESPACE, "labels": {"kubernetes.io/service-name": "app"}},
               "addressType": "IPv4",
               "ports": ports(false),
               "endpoints": [{"addresses": [t.server_ip], "conditions": {"ready": true},
                              "targetRef": {"kind": "Pod", "name": "app-0", "namespace": NAMESPACE}}]}),
    ]
}

/// The app's VirtualService: `rules` rules of which only the last matches the load's requests
/// (`GET /`), so every request walks the table. Rule kinds rotate through exact and prefix URIs
/// and exact header values, as real tables do; `generation` changes a request header the routes
/// set, so each generation is a real routing change.
pub fn virtual_service(rules: usize, generation: u64) -> Value {
    let mut http: Vec<Value> = (0..rules.saturating_sub(1))
        .map(|i| {
            let m = match i % 3 {
                0 => json!({"uri": {"exact": format!("/api/v1/items/{i}")}}),
                1 => json!({"uri": {"prefix": format!("/static/{i}/")}}),
                _ => json!({"headers": {"x-tenant": {"exact": format!("tenant-{i}")}}}),
            };
            json!({"name": format!("r{i}"), "match": [m],
                   "route": [{"destination": {"host": HOST}}]})
        })
        .collect();
    http.push(json!({"name": "default",
        "headers": {"request": {"set": {"x-route-generation": generation.to_string()}}},
        "route": [{"destination": {"host": HOST}}]}));
    json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
           "metadata": {"name": "app", "namespace": NAMESPACE},
           "spec": {"hosts": [HOST], "http": http}})
}

/// Where a pod's containers find their service account (kube-rs's in-cluster configuration
/// reads these fixed paths).
const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Write the service account files a pod's containers see (token, the cluster's CA, namespace)
/// to `dir`. ferry reads them through its in-cluster configuration, as in a pod: HTTPS to
/// `KUBERNETES_SERVICE_HOST`, trusting only the fake cluster's CA, with the bearer token. So
/// the sidecars run the start-up code they run in a cluster (a kubeconfig would add kube-rs's
/// YAML parser, which a pod's sidecar never runs).
pub fn service_account(dir: &Path, ca_pem: &str) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (name, text) in [
        ("token", "ferry-bench-token"),
        ("ca.crt", ca_pem),
        ("namespace", NAMESPACE),
    ] {
        let file = dir.join(name);
        std::fs::write(&file, text).map_err(|e| format!("{}: {e}", file.display()))?;
    }
    Ok(())
}

/// `argv` run as uid 1337 in a mount namespace of its own where `sa` is mounted where a pod's
/// service account is: a tmpfs over `/var/run` (of that namespace only; the host's is
/// untouched) holding a copy of the files.
fn with_service_account(sa: &Path, argv: Vec<String>) -> Vec<String> {
    let script = format!(
        "set -e; mount -t tmpfs -o size=1m,mode=0755 ferry-bench-sa /var/run; \
         mkdir -p {SERVICE_ACCOUNT_MOUNT}; cp \"$1\"/* {SERVICE_ACCOUNT_MOUNT}/; shift; \
         exec \"$@\""
    );
    let id = PROXY_UID.to_string();
    let mut v: Vec<String> = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        "sh",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    v.push(sa.display().to_string());
    v.extend([
        // Only the in-cluster configuration: no kubeconfig from the caller's environment.
        "env".to_owned(),
        "-u".to_owned(),
        "KUBECONFIG".to_owned(),
        "setpriv".to_owned(),
        format!("--reuid={id}"),
        format!("--regid={id}"),
        "--clear-groups".to_owned(),
    ]);
    v.extend(argv);
    v
}

/// Whether `path` runs ferry's sidecars.
pub fn is_ferry(path: &str) -> bool {
    path == "ferry" || path == FERRY_L4
}

/// Start one sidecar per pod for `path` ("ferry", "ferry-l4", "nginx" or "haproxy"); returns when both
/// listen (and, for ferry, report ready: configuration synced).
pub fn start(
    path: &str,
    phase: Phase,
    t: &Topology,
    cars: &Sidecars,
    dir: &Path,
) -> Result<Vec<Proc>, String> {
    let mut procs = Vec::new();
    for (role, ns, ip, peer) in [
        ("client", &t.client_ns, &t.client_ip, &t.server_ip),
        ("server", &t.server_ns, &t.server_ip, &t.client_ip),
    ] {
        let work = dir.join(format!("{path}-{role}"));
        std::fs::create_dir_all(work.join("tmp")).map_err(|e| e.to_string())?;
        // The proxies write their own files as uid 1337.
        let _ = super::topo::run(&[
            "chown",
            "-R",
            &format!("{PROXY_UID}:{PROXY_UID}"),
            &work.display().to_string(),
        ]);
        let place = Place {
            netns: ns,
            cpus: &t.sut_cpus,
            // ferry becomes uid 1337 itself, after its service account is mounted (as root).
            uid: (!is_ferry(path)).then_some(PROXY_UID),
        };
        let s = |v: &str| v.to_owned();
        let (argv, env): (Vec<String>, Vec<(String, String)>) = match path {
            "ferry" | FERRY_L4 => (
                with_service_account(
                    &cars.service_account,
                    vec![
                        cars.proxy.display().to_string(),
                        s("proxy"),
                        s("sidecar"),
                        s("--concurrency"),
                        s("1"),
                        s("--proxyLogLevel=warning"),
                        format!("--scheduling={}", cars.scheduling),
                    ],
                ),
                vec![
                    (s("POD_NAME"), format!("{role}-0")),
                    (s("POD_NAMESPACE"), s(NAMESPACE)),
                    (s("INSTANCE_IP"), ip.clone()),
                    (s("SERVICE_ACCOUNT"), s("default")),
                    (
                        s("ISTIO_META_WORKLOAD_NAME"),
                        if role == "client" {
                            s("client")
                        } else {
                            s("app")
                        },
                    ),
                    (s("KUBERNETES_SERVICE_HOST"), s(API_HOST)),
                    (s("KUBERNETES_SERVICE_PORT"), API_PORT.to_string()),
                    (s("HOME"), work.display().to_string()),
                ],
            ),
            "nginx" => {
                let conf = work.join("nginx.conf");
                std::fs::write(&conf, nginx_conf(&work, phase, peer)).map_err(|e| e.to_string())?;
                let w = work.display().to_string();
                (
                    vec![
                        s("nginx"),
                        s("-c"),
                        conf.display().to_string(),
                        s("-p"),
                        w.clone(),
                        s("-e"),
                        format!("{w}/error.log"),
                    ],
                    Vec::new(),
                )
            }
            "haproxy" => {
                let conf = work.join("haproxy.cfg");
                std::fs::write(&conf, haproxy_conf(phase)).map_err(|e| e.to_string())?;
                (
                    vec![s("haproxy"), s("-db"), s("-f"), conf.display().to_string()],
                    Vec::new(),
                )
            }
            other => return Err(format!("unknown sidecar {other:?}")),
        };
        procs.push(place.spawn(&argv, &env, &work.join("proxy.log"))?);
    }
    for ns in [&t.client_ns, &t.server_ns] {
        for port in [15001, 15006] {
            if let Err(e) = wait_listening(ns, port, Duration::from_secs(15)) {
                let logs: Vec<String> = procs.iter_mut().filter_map(Proc::exited).collect();
                return Err(format!("{path}: {e}\n{}", logs.join("\n")));
            }
        }
        if is_ferry(path) {
            ready(ns, cars)?;
        }
    }
    Ok(procs)
}

/// `GET addr path` from inside `ns` (as root) with ferry-netcheck: "<status> <body>".
fn get_in(ns: &str, cars: &Sidecars, addr: &str, path: &str) -> Result<String, String> {
    let here = Place {
        netns: ns,
        cpus: "",
        uid: None,
    };
    let argv = [
        cars.netcheck.display().to_string(),
        "http".into(),
        addr.into(),
        path.into(),
        "x".into(),
    ];
    here.output(&argv, Duration::from_secs(5))
}

/// Wait for ferry's readiness (listeners bound and the first configuration synced).
fn ready(ns: &str, cars: &Sidecars) -> Result<(), String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match get_in(ns, cars, "127.0.0.1:15021", "/healthz/ready") {
            Ok(out) if out.starts_with("200") => return Ok(()),
            r if std::time::Instant::now() > deadline => {
                return Err(format!("ferry in {ns} not ready after 15s: {r:?}"));
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// One scrape of ferry's metrics port in `ns` (a 200 response: status line, then the text).
fn scrape(ns: &str, cars: &Sidecars) -> Option<String> {
    get_in(ns, cars, "127.0.0.1:15090", "/stats/prometheus")
        .ok()
        .filter(|text| text.starts_with("200"))
}

/// For each of `names`, the sum of every series of that Prometheus metric (any labels; 0 when
/// it has none yet), from one scrape of ferry's metrics port in `ns`.
pub fn metric_totals<const N: usize>(
    ns: &str,
    cars: &Sidecars,
    names: [&str; N],
) -> Option<[f64; N]> {
    let text = scrape(ns, cars)?;
    Some(names.map(|name| {
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
            .sum()
    }))
}

/// A Prometheus gauge or counter value from ferry's metrics port in `ns`.
pub fn metric(ns: &str, cars: &Sidecars, name: &str) -> Option<f64> {
    scrape(ns, cars)?
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_table_has_the_asked_size_and_only_the_last_rule_is_unconditional() {
        let vs = virtual_service(1000, 7);
        let http = vs["spec"]["http"].as_array().unwrap();
        assert_eq!(http.len(), 1000);
        assert!(http[..999].iter().all(|r| r.get("match").is_some()));
        assert!(http[999].get("match").is_none());
        assert_eq!(
            http[999]["headers"]["request"]["set"]["x-route-generation"],
            "7"
        );
        // The proxy's own model accepts it (unknown fields would be refused).
        let mut errors = Vec::new();
        let ty = ferry_proxy::crds::spec_type("VirtualService").unwrap();
        ferry_proxy::crds::check(&ty, &vs["spec"], "spec", &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn stand_in_configs_listen_on_the_capture_ports() {
        for phase in [Phase::H1, Phase::H2, Phase::Tcp] {
            let n = nginx_conf(Path::new("/w"), phase, "10.0.0.2");
            let h = haproxy_conf(phase);
            for c in [&n, &h] {
                assert!(c.contains("15001") && c.contains("15006"), "{c}");
            }
        }
        assert!(nginx_conf(Path::new("/w"), Phase::H2, "x").contains("listen 15001 http2"));
        assert!(haproxy_conf(Phase::H1).contains("source 127.0.0.6"));
    }
}
