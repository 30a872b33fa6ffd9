//! `ferry-bench`: the side-by-side benchmark suite. Two pod network namespaces with
//! `ferry-init`'s real capture rules, the app (nginx, iperf3) in the server pod, a sidecar in
//! each pod as uid 1337, the load generator in the client pod; every scenario runs against
//! every path (direct, ferry, nginx, HAProxy) in one run, repeated, with medians reported.
//! ferry's L4 path (`ferry-l4`: the same binary with the app's ports declared as TCP, so
//! relayed as bytes) measures, in the same run, the floor any HTTP-aware sidecar is held to.
//!
//! CPU placement follows the shared rig: the load generator on one CPU, the app and both
//! sidecars on the other, so "max throughput" is what one shared core sustains — a CPU
//! efficiency measure more than raw speed.

pub mod flame;
pub mod parse;
pub mod peers;
pub mod report;
pub mod topo;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parse::Load;
use peers::{HOST, Phase, Sidecars};
use topo::{APP_H1, APP_H2, APP_TCP, Place, Sampler, Topology, Usage};

/// One measured situation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// HTTP/1.1 at a fixed rate (4 connections), latency percentiles.
    H1Fixed,
    /// HTTP/1.1 keep-alive, as fast as possible (wrk, 32 connections).
    H1Max,
    /// HTTP/2 (h2c) at a fixed rate, 4 connections x 8 streams.
    H2Fixed,
    /// HTTP/2 as fast as possible, 4 connections x 32 streams.
    H2Max,
    /// One TCP stream, bulk (iperf3).
    Tcp,
    /// HTTP/1.1 with a new connection per request (wrk, `Connection: close`).
    ConnChurn,
    /// HTTP/1.1 max through a 1,000-rule VirtualService, the last rule matching.
    Routes1k,
    /// HTTP/1.1 at the fixed rate while the VirtualService changes every 100 ms.
    ConfigChurn,
}

impl Scenario {
    pub const ALL: [Scenario; 8] = [
        Scenario::H1Fixed,
        Scenario::H1Max,
        Scenario::H2Fixed,
        Scenario::H2Max,
        Scenario::Tcp,
        Scenario::ConnChurn,
        Scenario::Routes1k,
        Scenario::ConfigChurn,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::H1Fixed => "h1-fixed",
            Scenario::H1Max => "h1-max",
            Scenario::H2Fixed => "h2-fixed",
            Scenario::H2Max => "h2-max",
            Scenario::Tcp => "tcp",
            Scenario::ConnChurn => "conn-churn",
            Scenario::Routes1k => "routes-1k",
            Scenario::ConfigChurn => "config-churn",
        }
    }

    pub fn parse(s: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|x| x.name() == s)
    }

    fn phase(self) -> Phase {
        match self {
            Scenario::H2Fixed | Scenario::H2Max => Phase::H2,
            Scenario::Tcp => Phase::Tcp,
            _ => Phase::H1,
        }
    }

    /// Scenarios that only mean something for a proxy that reads Istio's routing: the
    /// stand-ins have static configurations (there is nothing to compare them on).
    pub fn ferry_only(self) -> bool {
        matches!(self, Scenario::Routes1k | Scenario::ConfigChurn)
    }

    /// Whether this scenario is measured on `path`: ferry's L4 path (the same binary relaying
    /// the app's ports as opaque TCP) only where it is the floor an HTTP path can be held to.
    pub fn runs_on(self, path: &str) -> bool {
        match path {
            "ferry" | "direct" => true,
            peers::FERRY_L4 => !self.ferry_only() && self != Scenario::Tcp,
            _ => !self.ferry_only(),
        }
    }

    /// Rules in the app's VirtualService for this scenario.
    fn rules(self) -> usize {
        if self == Scenario::Routes1k { 1000 } else { 2 }
    }
}

/// What the user asked for.
#[derive(Clone, Debug)]
pub struct Opts {
    pub paths: Vec<String>,
    pub scenarios: Vec<Scenario>,
    pub repeat: usize,
    pub duration: u64,
    pub warmup: u64,
    /// Total requests per second of the fixed-rate scenarios.
    pub rate: u32,
    pub out: PathBuf,
    pub loadgen_cpus: String,
    pub sut_cpus: String,
    pub proxy: PathBuf,
    pub init: PathBuf,
    pub netcheck: PathBuf,
    pub scheduling: String,
    /// The pods' TCP congestion control ("" = the kernel's default for a new namespace).
    pub tcp_congestion: String,
    pub plot: Option<PathBuf>,
    /// Scenarios to profile after the measured runs: one more run each through ferry under
    /// `perf record`, drawn as `flame-<scenario>.svg` (its numbers are not reported: perf
    /// slows the sidecars down).
    pub flamegraph: Vec<Scenario>,
}

/// One measurement.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub scenario: Scenario,
    pub path: String,
    pub run: usize,
    pub load: Load,
    pub usage: Usage,
    /// Summed RSS of the pod's sidecar processes before any traffic, MiB (both pods).
    pub idle_rss_mib: f64,
    /// The anonymous (private) part of it.
    #[serde(default)]
    pub idle_anon_mib: f64,
    pub retransmits: u64,
    /// Configuration versions the client sidecar applied during the run (config churn).
    pub config_updates: Option<u64>,
    /// Why the cell has no numbers.
    pub failed: Option<String>,
}

impl Record {
    /// Proxy CPU seconds per 10,000 requests (both sidecars).
    pub fn cpu_per_10k(&self) -> Option<f64> {
        (self.path != "direct" && self.load.requests > 0)
            .then(|| self.usage.cpu_s / (self.load.requests as f64 / 10_000.0))
    }
}

/// The fake API server the ferry sidecars watch, on its own thread and runtime, served on
/// loopback inside each pod.
struct Api {
    server: crate::fake_apiserver::FakeApiServer,
    /// The fake cluster's CA (the sidecars' service account's `ca.crt`).
    ca_pem: String,
    /// Serves the API while held.
    _rt: tokio::runtime::Runtime,
}

impl Api {
    fn start(t: &Topology) -> Result<Api, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let mut server =
            crate::fake_apiserver::FakeApiServer::new(crate::fake_apiserver::default_kinds(true));
        // A real API server's watch cache sends a bookmark once a minute
        // (kubernetes/kubernetes#90249); the fake's default (500 ms, so that tests see
        // bookmarks) would put ten TLS records a second per sidecar into the measurements.
        server.bookmark_interval = Duration::from_secs(60);
        for obj in peers::registry(t) {
            server.apply(obj);
        }
        server.apply(peers::virtual_service(2, 0));
        let addr = std::net::SocketAddr::new(
            peers::API_HOST.parse().map_err(|e| format!("{e}"))?,
            peers::API_PORT,
        );
        let pki = crate::tls::Pki::new("ferry-bench-cluster-ca");
        let cert = pki.issue(&[&addr.ip().to_string()], 2099);
        for ns in [&t.client_ns, &t.server_ns] {
            let l = crate::netns::bind_in(ns, addr);
            let _guard = rt.enter();
            let l = tokio::net::TcpListener::from_std(l).map_err(|e| e.to_string())?;
            server.serve_tls(l, &cert)?;
        }
        Ok(Api {
            server,
            ca_pem: pki.ca_pem(),
            _rt: rt,
        })
    }
}

/// What a run measured, and the conditions that are not options.
pub struct Outcome {
    pub records: Vec<Record>,
    /// The pods' TCP congestion control, as read back from them.
    pub congestion: String,
}

/// Run everything; records as they come (also written to `out/results.json`).
pub fn run(opts: &Opts) -> Result<Outcome, String> {
    std::fs::create_dir_all(&opts.out).map_err(|e| format!("{}: {e}", opts.out.display()))?;
    let state = opts.out.join("state");
    let t = Topology::up(
        "fbench",
        "10.77.0",
        &state,
        &opts.sut_cpus,
        &opts.tcp_congestion,
    )?;
    let api = Api::start(&t)?;
    let service_account = state.join("serviceaccount");
    peers::service_account(&service_account, &api.ca_pem)?;
    let cars = Sidecars {
        proxy: opts.proxy.clone(),
        netcheck: opts.netcheck.clone(),
        service_account,
        scheduling: opts.scheduling.clone(),
    };
    let rig = Rig {
        opts,
        t: &t,
        api: &api,
        cars: &cars,
    };
    let mut records = Vec::new();
    for run in 0..opts.repeat {
        for &scenario in &opts.scenarios {
            for path in &opts.paths {
                if !scenario.runs_on(path) {
                    continue;
                }
                eprintln!(
                    "[run {}/{}] {} via {path} ...",
                    run + 1,
                    opts.repeat,
                    scenario.name()
                );
                let r = one(&rig, scenario, path, run, None);
                eprintln!("    {}", report::line(&r));
                records.push(r);
                let json = serde_json::to_string_pretty(&records).map_err(|e| e.to_string())?;
                std::fs::write(opts.out.join("results.json"), json).map_err(|e| e.to_string())?;
            }
        }
    }
    for &scenario in &opts.flamegraph {
        eprintln!(
            "[profile] {} via ferry under perf (not in the table) ...",
            scenario.name()
        );
        let base = opts.out.join(format!("flame-{}", scenario.name()));
        let r = one(&rig, scenario, "ferry", 0, Some(&base));
        match &r.failed {
            Some(e) => eprintln!("    no profile: {e}"),
            None => eprintln!("    {}", base.with_extension("svg").display()),
        }
    }
    let congestion = t.congestion.clone();
    drop(api);
    drop(t);
    Ok(Outcome {
        records,
        congestion,
    })
}

/// `perf record` of the sidecar processes, from `start` until `finish`.
struct Perf {
    child: std::process::Child,
    data: PathBuf,
}

impl Perf {
    /// Sample both sidecars' stacks (DWARF unwinding: the release build keeps no frame
    /// pointers, its .eh_frame is enough).
    fn start(pids: &[u32], data: PathBuf) -> Result<Perf, String> {
        if pids.is_empty() {
            return Err("no sidecar processes to profile".into());
        }
        let list = pids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let child = std::process::Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F", "499"])
            .args(["--call-graph", "dwarf,16384", "-p", &list, "-o"])
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("perf: {e} (install linux-perf)"))?;
        Ok(Perf { child, data })
    }

    /// Stop recording (SIGINT: perf writes its file and exits) and fold the samples.
    fn finish(self) -> Result<flame::Folded, String> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let out = self.child.wait_with_output().map_err(|e| e.to_string())?;
        // perf writes its file, then re-raises the signal that stopped it.
        let stopped = std::os::unix::process::ExitStatusExt::signal(&out.status)
            == Some(nix::sys::signal::Signal::SIGINT as i32);
        if !out.status.success() && !stopped {
            return Err(format!(
                "perf record: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let script = std::process::Command::new("perf")
            .args([
                "script",
                "--no-inline",
                "-F",
                "comm,pid,tid,time,event,ip,sym,dso",
                "-i",
            ])
            .arg(&self.data)
            .output()
            .map_err(|e| format!("perf script: {e}"))?;
        // The raw samples are large (a 16 KiB stack copy each); the folded stacks are kept.
        let _ = std::fs::remove_file(&self.data);
        if !script.status.success() {
            return Err(format!(
                "perf script: {}",
                String::from_utf8_lossy(&script.stderr).trim()
            ));
        }
        let folded = flame::fold(&String::from_utf8_lossy(&script.stdout));
        if folded.is_empty() {
            return Err("perf recorded no samples".into());
        }
        Ok(folded)
    }
}

/// What every cell runs in: the options, the pods, the API server, the sidecars' settings.
#[derive(Clone, Copy)]
struct Rig<'a> {
    opts: &'a Opts,
    t: &'a Topology,
    api: &'a Api,
    cars: &'a Sidecars,
}

/// One scenario on one path: capture on, sidecars up, idle sample, warm-up, measured load.
/// With `profile`, the sidecars are recorded with perf during the measured load and the flame
/// graph written to `<profile>.svg` (and `.folded`).
fn one(
    rig: &Rig<'_>,
    scenario: Scenario,
    path: &str,
    run: usize,
    profile: Option<&std::path::Path>,
) -> Record {
    let Rig { opts, t, api, cars } = *rig;
    let mut rec = Record {
        scenario,
        path: path.to_owned(),
        run,
        load: Load::default(),
        usage: Usage::default(),
        idle_rss_mib: 0.0,
        idle_anon_mib: 0.0,
        retransmits: 0,
        config_updates: None,
        failed: None,
    };
    let proxied = path != "direct";
    let result = (|| -> Result<(), String> {
        if proxied {
            t.capture(&opts.init, true)?;
        }
        api.server
            .apply(peers::virtual_service(scenario.rules(), 0));
        // The app's ports as declared for this path (opaque TCP for ferry's L4 path).
        for obj in peers::app_service(t, path == peers::FERRY_L4) {
            api.server.apply(obj);
        }
        let dir = opts
            .out
            .join("sidecars")
            .join(format!("{}-{path}-r{run}", scenario.name()));
        let _procs = if proxied {
            peers::start(path, scenario.phase(), t, cars, &dir)?
        } else {
            Vec::new()
        };
        let netns = [t.client_ns.clone(), t.server_ns.clone()];
        let names = [netns[0].as_str(), netns[1].as_str()];
        let idle = topo::proxy_procs(&names);
        let mib = |f: fn(&topo::ProcSample) -> u64| {
            idle.iter().map(|p| f(p) as f64).sum::<f64>() / (1024.0 * 1024.0)
        };
        rec.idle_rss_mib = mib(|p| p.rss);
        rec.idle_anon_mib = mib(|p| p.anon);
        let load = Place {
            netns: &t.client_ns,
            cpus: &opts.loadgen_cpus,
            uid: None,
        };
        let raw = opts.out.join("raw");
        std::fs::create_dir_all(&raw).map_err(|e| e.to_string())?;
        let tag = format!("{}-{path}-r{run}", scenario.name());
        if scenario != Scenario::Tcp && opts.warmup > 0 {
            measure(
                opts,
                t,
                &load,
                scenario,
                opts.warmup,
                &raw.join(format!("{tag}-warmup")),
            )?;
        }
        // Config churn: the VirtualService changes every 100 ms for the whole measurement.
        let churn = (scenario == Scenario::ConfigChurn).then(|| Churn::start(api));
        let before = (path == "ferry")
            .then(|| peers::metric(&t.client_ns, cars, "ferry_proxy_config_version"))
            .flatten();
        let perf = match profile {
            Some(base) => {
                let pids: Vec<u32> = topo::proxy_procs(&names).iter().map(|p| p.pid).collect();
                Some(Perf::start(&pids, base.with_extension("perf.data"))?)
            }
            None => None,
        };
        let sampler = Sampler::start(netns.clone());
        let measured = measure(opts, t, &load, scenario, opts.duration, &raw.join(&tag));
        rec.usage = sampler.finish();
        if let (Some(perf), Some(base)) = (perf, profile) {
            let folded = perf.finish()?;
            let title = format!(
                "ferry sidecars (client and server pod), {}: {} s under perf (cpu-clock, 499 Hz)",
                scenario.name(),
                opts.duration
            );
            let write = |ext: &str, text: String| {
                std::fs::write(base.with_extension(ext), text).map_err(|e| e.to_string())
            };
            write("folded", flame::folded_text(&folded))?;
            write("svg", flame::svg(&folded, &title))?;
        }
        if let Some(c) = churn {
            let applied = c.stop();
            let after = peers::metric(&t.client_ns, cars, "ferry_proxy_config_version");
            rec.config_updates = match (before, after) {
                (Some(b), Some(a)) => Some((a - b).max(0.0) as u64),
                _ => None,
            };
            eprintln!("    {applied} VirtualService changes made during the run");
        }
        let (l, retrans) = measured?;
        rec.load = l;
        rec.retransmits = retrans;
        if peers::is_ferry(path) && scenario != Scenario::Tcp {
            checked_layer(t, cars, path)?;
        }
        Ok(())
    })();
    if proxied {
        let _ = t.capture(&opts.init, false);
    }
    if let Err(e) = result {
        rec.failed = Some(e);
    }
    rec
}

/// A ferry cell measured what its path says: HTTP requests through `ferry`, only relayed
/// connections through `ferry-l4` (its figures would otherwise be the HTTP path's), read from
/// the two sidecars' own metrics.
fn checked_layer(t: &Topology, cars: &Sidecars, path: &str) -> Result<(), String> {
    let (mut requests, mut relayed) = (0.0, 0.0);
    for ns in [&t.client_ns, &t.server_ns] {
        let [r, c] = peers::metric_totals(
            ns,
            cars,
            ["istio_requests_total", "istio_tcp_connections_opened_total"],
        )
        .ok_or_else(|| format!("no metrics from the sidecar in {ns}"))?;
        requests += r;
        relayed += c;
    }
    let l4 = path == peers::FERRY_L4;
    if l4 && (requests > 0.0 || relayed == 0.0) || !l4 && requests == 0.0 {
        return Err(format!(
            "{path}: the sidecars counted {} HTTP requests and {} relayed TCP connections; the \
             cell did not measure this path",
            requests as u64, relayed as u64
        ));
    }
    Ok(())
}

/// Run the scenario's load generator for `secs`; the load and TCP retransmits.
fn measure(
    opts: &Opts,
    t: &Topology,
    at: &Place<'_>,
    scenario: Scenario,
    secs: u64,
    raw: &std::path::Path,
) -> Result<(Load, u64), String> {
    let s = |v: &str| v.to_owned();
    let per_conn = (opts.rate / 4).max(1).to_string();
    let url = |port: u16| format!("http://{}:{port}/", t.server_ip);
    let authority = format!(":authority: {HOST}");
    let log = raw.with_extension("log");
    let _ = std::fs::remove_file(&log);
    let h2load = |extra: &[&str], port: u16| {
        let mut v = vec![s("h2load")];
        v.extend(extra.iter().map(|x| s(x)));
        v.extend([
            s("-D"),
            secs.to_string(),
            s("-H"),
            authority.clone(),
            s("--log-file"),
            log.display().to_string(),
            url(port),
        ]);
        v
    };
    let wrk = |extra: &[&str]| {
        let mut v = vec![
            s("wrk"),
            s("-t1"),
            s("-c32"),
            format!("-d{secs}s"),
            s("--latency"),
            s("-H"),
            format!("Host: {HOST}"),
        ];
        v.extend(extra.iter().map(|x| s(x)));
        v.push(url(APP_H1));
        v
    };
    let argv = match scenario {
        Scenario::H1Fixed | Scenario::ConfigChurn => {
            h2load(&["--h1", "-c4", "-m1", "--rps", &per_conn], APP_H1)
        }
        Scenario::H2Fixed => h2load(&["-c4", "-m8", "--rps", &per_conn], APP_H2),
        Scenario::H2Max => h2load(&["-c4", "-m32"], APP_H2),
        Scenario::H1Max | Scenario::Routes1k => wrk(&[]),
        Scenario::ConnChurn => wrk(&["-H", "Connection: close"]),
        Scenario::Tcp => vec![
            s("iperf3"),
            s("-c"),
            t.server_ip.clone(),
            s("-p"),
            APP_TCP.to_string(),
            s("-t"),
            secs.to_string(),
            s("-O"),
            opts.warmup.to_string(),
            s("-J"),
        ],
    };
    let limit = Duration::from_secs(secs + opts.warmup + 30);
    let out = at.output(&argv, limit)?;
    let _ = std::fs::write(raw.with_extension("out"), &out);
    match scenario {
        Scenario::Tcp => {
            let (gbps, retrans) = parse::iperf3(&out)?;
            Ok((
                Load {
                    gbps,
                    ..Load::default()
                },
                retrans,
            ))
        }
        Scenario::H1Max | Scenario::Routes1k | Scenario::ConnChurn => Ok((parse::wrk(&out)?, 0)),
        _ => {
            let mut l = parse::h2load(&out)?;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let mut ms = parse::h2load_log(&text);
            l.p50_ms = parse::quantile(&mut ms, 0.50);
            l.p90_ms = parse::quantile(&mut ms, 0.90);
            l.p99_ms = parse::quantile(&mut ms, 0.99);
            let _ = std::fs::remove_file(&log);
            Ok((l, 0))
        }
    }
}

/// Replaces the app's VirtualService every 100 ms (alternating the header its default route
/// sets) until stopped.
struct Churn {
    stop: Arc<AtomicBool>,
    made: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Churn {
    fn start(api: &Api) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let made = Arc::new(AtomicU64::new(0));
        let (s, m, server) = (stop.clone(), made.clone(), api.server.clone());
        let thread = std::thread::spawn(move || {
            let mut generation = 1;
            while !s.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                server.apply(peers::virtual_service(2, generation));
                generation += 1;
                m.fetch_add(1, Ordering::SeqCst);
            }
        });
        Churn { stop, made, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
        self.made.load(Ordering::SeqCst)
    }
}

/// The report's header: when, on what, with which tools and options.
pub fn header(opts: &Opts, congestion: &str) -> String {
    let sh = |c: &str| {
        // Some tools print their version and exit non-zero (wrk -v).
        topo::run(&["sh", "-c", &format!("{c}; true")])
            .unwrap_or_default()
            .lines()
            .next()
            .unwrap_or("?")
            .trim()
            .to_owned()
    };
    let cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2");
    format!(
        "# ferry-bench {}\n\n\
         Machine: {cpu}, {} CPUs, {} GiB, Linux {}. Tools: {}; {}; {}; {}; {}.\n\
         Load generator on CPU {}, app and both sidecars on CPU {}; one worker per sidecar; \
         ferry-proxy --scheduling={}; TCP congestion control in the pods: {congestion}. {} \
         run(s) of {} s per cell after {} s of warm-up; fixed rate {} requests/s over 4 \
         connections; 1 KiB responses. Medians over runs.\n",
        sh("date -u '+%Y-%m-%d %H:%M UTC'"),
        sh("nproc"),
        sh("awk '/MemTotal/ {printf \"%.1f\", $2/1048576}' /proc/meminfo"),
        sh("uname -r"),
        sh("nginx -v 2>&1"),
        sh("haproxy -v 2>&1"),
        sh("wrk -v 2>&1"),
        sh("h2load --version 2>&1"),
        sh("iperf3 --version 2>&1"),
        if opts.loadgen_cpus.is_empty() {
            "(unpinned)"
        } else {
            &opts.loadgen_cpus
        },
        if opts.sut_cpus.is_empty() {
            "(unpinned)"
        } else {
            &opts.sut_cpus
        },
        opts.scheduling,
        opts.repeat,
        opts.duration,
        opts.warmup,
        opts.rate,
    )
}

/// Draw `plot.png` next to the results with Python's matplotlib.
pub fn plot(opts: &Opts) -> Result<PathBuf, String> {
    let script = match &opts.plot {
        Some(p) => p.clone(),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/plot.py"),
    };
    let png = opts.out.join("plot.png");
    // Debian's python3 (python3-matplotlib), not whatever python3 comes first on PATH.
    let python = if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    topo::run(&[
        python,
        &script.display().to_string(),
        &opts.out.join("results.json").display().to_string(),
        &png.display().to_string(),
    ])?;
    Ok(png)
}
