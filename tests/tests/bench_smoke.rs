//! The benchmark suite runs end to end: a short `ferry-bench` (one run, one second per cell)
//! over direct, ferry and ferry-l4 (the suite fails a cell whose sidecars' metrics show the
//! other layer), HTTP/1.1 at a fixed rate, HTTP/2 max, TCP and config churn, and a flame graph
//! of HTTP/2 max. Checks that every cell measured something, ferry made no errors
//! and the flame graph holds the sidecars' own frames, never how fast anything was (speed is the
//! suite's report, not a test's verdict). Root, the load tools and perf; fails under CI=true
//! without them.

use std::process::Command;

use ferry_tests::bench::Record;
use ferry_tests::workspace_bin;

#[test]
fn the_suite_measures_every_cell_through_real_sidecars() {
    if !ferry_tests::netns::require_root("the_suite_measures_every_cell_through_real_sidecars") {
        return;
    }
    let missing: Vec<&str> = ["wrk", "h2load", "iperf3", "nginx", "perf"]
        .into_iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if !missing.is_empty() {
        let why = format!("missing {missing:?} (bash .ci/setup installs them)");
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
        eprintln!("SKIPPED: {why}");
        return;
    }
    let out = std::env::temp_dir().join(format!("ferry-bench-smoke-{}", std::process::id()));
    let host_congestion = || {
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control").expect("host sysctl")
    };
    let host_before = host_congestion();
    let run = Command::new(workspace_bin("ferry-bench"))
        .args([
            "--repeat",
            "1",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--rate",
            "200",
            "--paths",
            "direct,ferry,ferry-l4",
            "--scenarios",
            "h1-fixed,h2-max,tcp,config-churn",
            "--flamegraph",
            "h2-max",
            // No pinning: a smoke test must not depend on the machine's CPU count.
            "--loadgen-cpus",
            "",
            "--sut-cpus",
            "",
            // Reno is built into every kernel (no module to load); the host's default is
            // usually cubic or bbr, so the setting is seen to take.
            "--tcp-congestion",
            "reno",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("run ferry-bench");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "ferry-bench failed:\n{log}");
    let records: Vec<Record> = serde_json::from_str(
        &std::fs::read_to_string(out.join("results.json")).expect("results.json"),
    )
    .expect("records");
    // ferry-l4 only where it is a floor for an HTTP path: h1-fixed and h2-max here.
    assert_eq!(records.len(), 10, "{log}");
    for r in &records {
        let what = format!("{} via {}", r.scenario.name(), r.path);
        assert!(r.failed.is_none(), "{what}: {:?}", r.failed);
        assert_eq!(r.load.errors, 0, "{what}: errors\n{log}");
        match r.scenario.name() {
            "tcp" => assert!(r.load.gbps > 0.0, "{what}: no throughput"),
            _ => assert!(
                r.load.requests > 0 && r.load.p99_ms > 0.0,
                "{what}: nothing measured"
            ),
        }
        if r.path.starts_with("ferry") {
            // Both sidecars were found and sampled (uid 1337 in the two pods).
            assert_eq!(r.usage.procs, 2, "{what}: {:?}", r.usage);
            assert!(r.idle_rss_mib > 0.0, "{what}: {:?}", r.usage);
        }
        if r.path == "ferry" {
            // The kernel counts CPU in 10 ms ticks: ferry-l4 relaying 200 requests in a second
            // can stay under one, the HTTP path does not.
            assert!(r.usage.cpu_s > 0.0, "{what}: {:?}", r.usage);
        }
    }
    let churn = records
        .iter()
        .find(|r| r.path == "ferry" && r.scenario.name() == "config-churn")
        .expect("config churn through ferry");
    assert!(
        churn.config_updates.is_some_and(|n| n > 0),
        "the sidecar applied no configuration change during churn: {:?}",
        churn.config_updates
    );
    let summary = std::fs::read_to_string(out.join("summary.md")).expect("summary.md");
    assert!(
        summary.contains("## Targets") && summary.contains("| h2-max | requests/s |"),
        "{summary}"
    );
    // Read back from the pods, set in their namespaces only.
    assert!(
        summary.contains("TCP congestion control in the pods: reno."),
        "{summary}"
    );
    assert_eq!(host_congestion(), host_before, "the host's setting changed");
    // The profiled run: folded stacks with the proxy's own code, drawn; perf's raw file removed.
    let folded = std::fs::read_to_string(out.join("flame-h2-max.folded")).expect("folded stacks");
    let samples: u64 = folded
        .lines()
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum();
    assert!(
        samples > 0 && folded.contains("ferry_proxy::"),
        "{samples} samples, no ferry_proxy frame:\n{}",
        folded.lines().take(5).collect::<Vec<_>>().join("\n")
    );
    let svg = std::fs::read_to_string(out.join("flame-h2-max.svg")).expect("flame graph");
    assert!(
        svg.contains(&format!("<title>all ({samples} samples, 100.00%)</title>")),
        "the graph's root counts every folded sample"
    );
    assert!(!out.join("flame-h2-max.perf.data").exists());
    // Nothing of the run is left behind.
    let netns = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip")
            .stdout,
    )
    .into_owned();
    assert!(!netns.contains("fbench-"), "namespaces left: {netns}");
    let _ = std::fs::remove_dir_all(&out);
}
