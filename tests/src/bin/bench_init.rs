//! Benchmark (not a test): wall time for `ferry-init` to apply the default injected-pod ruleset
//! in a fresh network namespace, per backend. Needs root and the iptables package.
//!
//! `cargo run --release -p ferry-tests --bin ferry-bench-init [-- RUNS]`

use std::process::Command;
use std::time::Instant;

use ferry_tests::netns::Pair;

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    if !ferry_tests::netns::require_root("ferry-bench-init") {
        std::process::exit(1);
    }
    let bin = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("ferry-init")))
        .filter(|p| p.exists())
        .expect("ferry-init next to this binary: cargo build --release --workspace first");
    println!("ferry-init apply of the default pod ruleset, fresh namespace each run ({runs} runs)");
    println!("| backend | median ms | p90 ms | min ms | max ms |");
    println!("|---|---|---|---|---|");
    for backend in ["nft", "legacy"] {
        let mut times = Vec::new();
        for _ in 0..runs {
            let pair = Pair::new(false);
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &pair.pod])
                .arg(&bin)
                .args(ferry_init::spec::INJECTED_DEFAULT_ARGS)
                .arg("--log_output_level=default:warn");
            cmd.arg(format!("--force-iptables-binary={backend}"));
            let t = Instant::now();
            let out = cmd.output().expect("run ferry-init");
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            assert!(
                out.status.success(),
                "ferry-init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            times.push(ms);
        }
        times.sort_by(f64::total_cmp);
        let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
        println!(
            "| {backend} | {:.1} | {:.1} | {:.1} | {:.1} |",
            pct(0.5),
            pct(0.9),
            times[0],
            times[times.len() - 1]
        );
    }
}
