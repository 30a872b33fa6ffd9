//! `ferry-bench`: the side-by-side benchmark suite (see `ferry_tests::bench`). As root:
//!
//! `bash tests/bench/run` (installs the tools, builds, runs this), or directly
//! `target/release/ferry-bench --repeat 3`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ferry_tests::bench::{self, Opts, Scenario};

#[derive(Parser, Debug)]
#[command(
    name = "ferry-bench",
    about = "Side-by-side sidecar benchmark: direct, ferry, nginx and HAProxy between two pod network namespaces with ferry-init's capture rules",
    long_about = "Side-by-side sidecar benchmark. Creates two network namespaces (fbench-client, \
fbench-server; 10.77.0.0/24 exists only inside them), runs the app (nginx: 1 KiB over HTTP/1.1 \
:8080 and h2c :8081; iperf3 :5201) in the server pod, installs ferry-init's Istio rules in both \
pods for every proxied path, starts one sidecar per pod as uid 1337, and drives the load from \
the client pod (wrk, h2load, iperf3). Each scenario runs on every path in one run; --repeat \
gives medians. Writes results.json, summary.md and plot.png to --out. Needs root. Everything it \
creates is removed at the end (and at the start of the next run)."
)]
struct Args {
    /// Paths to compare, in order: direct (no sidecars, the physical limit), ferry, ferry-l4
    /// (ferry with the app's ports declared as TCP: bytes relayed unparsed, the floor an
    /// HTTP-aware sidecar is held to; not in the tcp, routes-1k and config-churn scenarios),
    /// nginx, haproxy
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,ferry,ferry-l4,nginx,haproxy"
    )]
    paths: Vec<String>,
    /// Scenarios: h1-fixed, h1-max, h2-fixed, h2-max, tcp, conn-churn, routes-1k, config-churn
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "h1-fixed,h1-max,h2-fixed,h2-max,tcp,conn-churn,routes-1k,config-churn"
    )]
    scenarios: Vec<String>,
    /// Runs of the whole matrix (medians are reported)
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Measured seconds per cell
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Unmeasured warm-up seconds before each cell
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Total requests per second of the fixed-rate scenarios (4 connections)
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Output directory [default: target/bench/<UTC timestamp>]
    #[arg(long)]
    out: Option<PathBuf>,
    /// CPUs for the load generator (taskset list; "" = no pinning)
    #[arg(long, default_value = "0")]
    loadgen_cpus: String,
    /// CPUs for the app and both sidecars
    #[arg(long, default_value = "1")]
    sut_cpus: String,
    /// ferry-proxy's --scheduling (batch or normal)
    #[arg(long, default_value = "batch")]
    scheduling: String,
    /// TCP congestion control in both pods (net.ipv4.tcp_congestion_control, set per network
    /// namespace; the host is not touched). Default: what the kernel gives a new namespace, the
    /// host's default. It shapes the results: the app's and the sidecars' segment sizes follow
    /// it (see the README's performance section)
    #[arg(long, default_value = "")]
    tcp_congestion: String,
    /// Directory holding ferry-proxy, ferry-init and ferry-netcheck [default: this binary's]
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Python script that draws plot.png from results.json [default: tests/bench/plot.py]
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Scenarios to profile: after the measured runs, each runs once more through ferry with
    /// both sidecars under `perf record` (needs perf: Debian's linux-perf), written as
    /// flame-<scenario>.svg and .folded (flamegraph.pl/inferno/speedscope input). Not in the
    /// table: perf slows the sidecars down
    #[arg(long, value_delimiter = ',')]
    flamegraph: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry-bench: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> Result<ExitCode, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "needs root (network namespaces, iptables, running sidecars as uid 1337)".into(),
        );
    }
    let scenarios = |names: &[String]| {
        names
            .iter()
            .map(|s| Scenario::parse(s).ok_or_else(|| format!("unknown scenario {s:?}")))
            .collect::<Result<Vec<_>, _>>()
    };
    let (flamegraph, scenarios) = (scenarios(&args.flamegraph)?, scenarios(&args.scenarios)?);
    for p in &args.paths {
        if !matches!(
            p.as_str(),
            "direct" | "ferry" | ferry_tests::bench::peers::FERRY_L4 | "nginx" | "haproxy"
        ) {
            return Err(format!(
                "unknown path {p:?} (direct, ferry, ferry-l4, nginx, haproxy)"
            ));
        }
    }
    if args.repeat == 0 || args.duration == 0 {
        return Err("--repeat and --duration must be at least 1".into());
    }
    let bin_dir = match args.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .parent()
            .map(PathBuf::from)
            .ok_or("no directory for this binary")?,
    };
    let mut tools = vec![
        "ip", "nsenter", "taskset", "timeout", "ss", "wrk", "h2load", "iperf3", "nginx", "iptables",
    ];
    if args.paths.iter().any(|p| p == "haproxy") {
        tools.push("haproxy");
    }
    if !flamegraph.is_empty() {
        tools.push("perf");
    }
    let missing: Vec<&str> = tools
        .into_iter()
        .filter(|t| bench::topo::run(&["sh", "-c", &format!("command -v {t}")]).is_err())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "missing tools: {} (bash tests/bench/run installs them: wrk nghttp2-client iperf3 nginx-light libnginx-mod-stream haproxy iptables iproute2, and linux-perf for --flamegraph)",
            missing.join(" ")
        ));
    }
    let out = args.out.unwrap_or_else(|| {
        let stamp = bench::topo::run(&["date", "-u", "+%Y%m%dT%H%M%SZ"]).unwrap_or_default();
        PathBuf::from("target/bench").join(stamp.trim())
    });
    // Absolute: nginx and HAProxy get paths under it while running with another prefix.
    let out = match std::path::absolute(&out) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ferry-bench: --out {}: {e}", out.display());
            return Ok(ExitCode::from(2));
        }
    };
    let opts = Opts {
        paths: args.paths.clone(),
        scenarios,
        repeat: args.repeat,
        duration: args.duration,
        warmup: args.warmup,
        rate: args.rate,
        out: out.clone(),
        loadgen_cpus: args.loadgen_cpus,
        sut_cpus: args.sut_cpus,
        proxy: bin_dir.join("ferry-proxy"),
        init: bin_dir.join("ferry-init"),
        netcheck: bin_dir.join("ferry-netcheck"),
        scheduling: args.scheduling,
        tcp_congestion: args.tcp_congestion,
        plot: args.plot,
        flamegraph,
    };
    for b in [&opts.proxy, &opts.init, &opts.netcheck] {
        if !b.exists() {
            return Err(format!(
                "{} not built (cargo build --release --workspace)",
                b.display()
            ));
        }
    }
    let bench::Outcome {
        records,
        congestion,
    } = bench::run(&opts)?;
    let header = bench::header(&opts, &congestion);
    let md = bench::report::markdown(&records, &opts.paths, &header);
    std::fs::write(out.join("summary.md"), &md).map_err(|e| e.to_string())?;
    println!("{md}");
    match bench::plot(&opts) {
        Ok(png) => println!("plot: {}", png.display()),
        Err(e) => eprintln!("ferry-bench: no plot: {e}"),
    }
    println!("results: {}", out.display());
    let failed = records.iter().any(|r| r.failed.is_some());
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
