//! From records to the report: medians over runs, ratios against direct in the same run, the
//! issue's targets checked, markdown out. Pure functions of the records.

use std::fmt::Write as _;

use super::parse::median;
use super::{Record, Scenario};

/// One line of progress for a record.
pub fn line(r: &Record) -> String {
    if let Some(why) = &r.failed {
        return format!("FAILED: {}", why.lines().next().unwrap_or(""));
    }
    let cpu = r
        .cpu_per_10k()
        .map_or(String::new(), |c| format!(", proxy CPU {c:.3} s/10k req"));
    match r.scenario {
        Scenario::Tcp => format!("{:.2} Gbit/s, {} retransmits", r.load.gbps, r.retransmits),
        _ => format!(
            "{:.0} rps, p50 {:.3} / p90 {:.3} / p99 {:.3} ms, {} errors{cpu}",
            r.load.rps, r.load.p50_ms, r.load.p90_ms, r.load.p99_ms, r.load.errors
        ),
    }
}

/// The records of one cell that have numbers.
fn cell<'a>(records: &'a [Record], s: Scenario, path: &str) -> Vec<&'a Record> {
    records
        .iter()
        .filter(|r| r.scenario == s && r.path == path && r.failed.is_none())
        .collect()
}

/// Median of `f` over a cell's runs; None when the cell has no runs.
pub fn med(
    records: &[Record],
    s: Scenario,
    path: &str,
    f: impl Fn(&Record) -> Option<f64>,
) -> Option<f64> {
    let v: Vec<f64> = cell(records, s, path).into_iter().filter_map(f).collect();
    (!v.is_empty()).then(|| median(&v))
}

/// Median over runs of `f(path) / f(direct)` taken within the same run.
pub fn ratio_to_direct(
    records: &[Record],
    s: Scenario,
    path: &str,
    f: impl Fn(&Record) -> f64,
) -> Option<f64> {
    let direct = cell(records, s, "direct");
    let v: Vec<f64> = cell(records, s, path)
        .into_iter()
        .filter_map(|r| {
            let d = direct.iter().find(|d| d.run == r.run)?;
            (f(d) > 0.0).then(|| f(r) / f(d))
        })
        .collect();
    (!v.is_empty()).then(|| median(&v))
}

fn throughput(r: &Record) -> f64 {
    if r.scenario == Scenario::Tcp {
        r.load.gbps
    } else {
        r.load.rps
    }
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if digits == 0 => group(x),
        Some(x) => format!("{x:.digits$}"),
        None => "-".into(),
    }
}

/// 12345.6 -> "12,346".
fn group(x: f64) -> String {
    let s = format!("{:.0}", x);
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

/// The better (larger, or smaller for costs) of the stand-ins' medians.
fn best_peer(
    records: &[Record],
    s: Scenario,
    f: &dyn Fn(&Record) -> Option<f64>,
    larger: bool,
) -> Option<(String, f64)> {
    ["nginx", "haproxy"]
        .iter()
        .filter_map(|p| Some((p.to_string(), med(records, s, p, f)?)))
        .reduce(|a, b| if (b.1 > a.1) == larger { b } else { a })
}

/// A target's verdict line: what, measured, wanted, met.
struct Verdict {
    what: String,
    measured: String,
    wanted: String,
    met: Option<bool>,
}

fn verdicts(records: &[Record]) -> Vec<Verdict> {
    let mut v = Vec::new();
    let rps = |r: &Record| Some(throughput(r));
    for (s, factor, label) in [
        (Scenario::H1Max, 1.3, "HTTP/1.1 max throughput"),
        (Scenario::H2Max, 1.5, "HTTP/2 max throughput"),
        (Scenario::Tcp, 1.0, "TCP bulk throughput"),
    ] {
        let ours = med(records, s, "ferry", rps);
        let peer = best_peer(records, s, &rps, true);
        v.push(Verdict {
            what: label.into(),
            measured: match (ours, &peer) {
                (Some(o), Some((p, x))) => format!("{:.2}x {p}", o / x),
                _ => "-".into(),
            },
            wanted: format!(">= {factor}x the better stand-in"),
            met: ours.zip(peer.as_ref()).map(|(o, (_, x))| o >= factor * x),
        });
    }
    let p99 = |r: &Record| Some(r.load.p99_ms);
    let ours = med(records, Scenario::H1Fixed, "ferry", p99);
    let peer = best_peer(records, Scenario::H1Fixed, &p99, false);
    let direct = med(records, Scenario::H1Fixed, "direct", p99);
    v.push(Verdict {
        what: "HTTP/1.1 p99 at the fixed rate".into(),
        measured: match (ours, &peer, direct) {
            (Some(o), Some((p, x)), Some(d)) => format!("{o:.3} ms ({p} {x:.3}, direct {d:.3})"),
            _ => "-".into(),
        },
        wanted: "<= the best stand-in's and <= direct + 0.3 ms".into(),
        met: match (ours, &peer, direct) {
            (Some(o), Some((_, x)), Some(d)) => Some(o <= *x && o <= d + 0.3),
            _ => None,
        },
    });
    for s in [Scenario::H1Max, Scenario::H1Fixed] {
        let cpu = |r: &Record| r.cpu_per_10k();
        let ours = med(records, s, "ferry", cpu);
        let peer = best_peer(records, s, &cpu, false);
        v.push(Verdict {
            what: format!("proxy CPU per 10k requests ({})", s.name()),
            measured: match (ours, &peer) {
                (Some(o), Some((p, x))) => format!("{o:.3} s ({:.2}x {p})", o / x),
                _ => "-".into(),
            },
            wanted: "<= 0.7x the best stand-in's".into(),
            met: ours.zip(peer.as_ref()).map(|(o, (_, x))| o <= 0.7 * x),
        });
    }
    let loaded = med(records, Scenario::H1Fixed, "ferry", |r| {
        Some(r.usage.rss_peak_mib / 2.0)
    });
    v.push(Verdict {
        what: "RSS per proxy at the fixed rate".into(),
        measured: fmt(loaded, 1) + " MiB",
        wanted: "<= 8 MiB".into(),
        met: loaded.map(|x| x <= 8.0),
    });
    let idle = med(records, Scenario::H1Fixed, "ferry", |r| {
        Some(r.idle_rss_mib / 2.0)
    });
    v.push(Verdict {
        what: "RSS per proxy, idle".into(),
        measured: fmt(idle, 1) + " MiB",
        wanted: "<= 5 MiB".into(),
        met: idle.map(|x| x <= 5.0),
    });
    let ferry: Vec<&Record> = records.iter().filter(|r| r.path == "ferry").collect();
    let errors: u64 = ferry.iter().map(|r| r.load.errors).sum();
    let failed = ferry.iter().filter(|r| r.failed.is_some()).count();
    v.push(Verdict {
        what: "errors through ferry, every scenario and run".into(),
        measured: format!("{errors} errors, {failed} failed cells"),
        wanted: "0".into(),
        met: (!ferry.is_empty()).then_some(errors == 0 && failed == 0),
    });
    v
}

/// An overview row: metric name, value of a record, decimals, whether to add the share of direct.
type Row = (
    &'static str,
    Box<dyn Fn(&Record) -> Option<f64>>,
    usize,
    bool,
);

/// The markdown report.
pub fn markdown(records: &[Record], paths: &[String], header: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{header}");
    let scenarios: Vec<Scenario> = Scenario::ALL
        .into_iter()
        .filter(|s| records.iter().any(|r| r.scenario == *s))
        .collect();
    // The overview: one headline number per scenario and path.
    let _ = writeln!(
        out,
        "## Overview (medians; in parentheses: share of direct in the same run)\n"
    );
    let _ = writeln!(out, "| scenario | metric | {} |", paths.join(" | "));
    let _ = writeln!(out, "|---|---|{}", "---:|".repeat(paths.len()));
    for &s in &scenarios {
        let rows: Vec<Row> = match s {
            Scenario::H1Fixed | Scenario::H2Fixed | Scenario::ConfigChurn => vec![
                (
                    "p50 ms",
                    Box::new(|r: &Record| Some(r.load.p50_ms)),
                    3,
                    false,
                ),
                (
                    "p99 ms",
                    Box::new(|r: &Record| Some(r.load.p99_ms)),
                    3,
                    false,
                ),
            ],
            Scenario::Tcp => vec![("Gbit/s", Box::new(|r: &Record| Some(r.load.gbps)), 2, true)],
            _ => vec![(
                "requests/s",
                Box::new(|r: &Record| Some(r.load.rps)),
                0,
                true,
            )],
        };
        for (metric, f, digits, ratio) in rows {
            let cells: Vec<String> = paths
                .iter()
                .map(|p| {
                    let v = fmt(med(records, s, p, &f), digits);
                    match ratio_to_direct(records, s, p, throughput)
                        .filter(|_| ratio && p != "direct")
                    {
                        Some(x) => format!("{v} ({:.0}%)", x * 100.0),
                        None => v,
                    }
                })
                .collect();
            let _ = writeln!(out, "| {} | {metric} | {} |", s.name(), cells.join(" | "));
        }
    }
    let _ = writeln!(
        out,
        "\n## Targets\n\n| target | measured | wanted | met |\n|---|---|---|---|"
    );
    for v in verdicts(records) {
        let met = match v.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "not measured",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {met} |",
            v.what, v.measured, v.wanted
        );
    }
    for &s in &scenarios {
        let _ = writeln!(out, "\n### {}\n", s.name());
        let _ = writeln!(
            out,
            "| path | {} | p50 ms | p90 ms | p99 ms | proxy CPU s/10k req | RSS/proxy idle MiB | RSS/proxy peak MiB | private (anon) peak MiB | errors | runs |",
            if s == Scenario::Tcp {
                "Gbit/s"
            } else {
                "requests/s"
            }
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for p in paths {
            let runs = cell(records, s, p);
            let failed: Vec<&Record> = records
                .iter()
                .filter(|r| r.scenario == s && &r.path == p && r.failed.is_some())
                .collect();
            if runs.is_empty() && failed.is_empty() {
                continue;
            }
            let proxied = p != "direct";
            let m = |f: &dyn Fn(&Record) -> Option<f64>, d: usize| fmt(med(records, s, p, f), d);
            let _ = writeln!(
                out,
                "| {p} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}{} |",
                m(
                    &|r| Some(throughput(r)),
                    if s == Scenario::Tcp { 2 } else { 0 }
                ),
                m(&|r| Some(r.load.p50_ms), 3),
                m(&|r| Some(r.load.p90_ms), 3),
                m(&|r| Some(r.load.p99_ms), 3),
                m(&|r| r.cpu_per_10k(), 3),
                m(&|r| proxied.then_some(r.idle_rss_mib / 2.0), 1),
                m(&|r| proxied.then_some(r.usage.rss_peak_mib / 2.0), 1),
                m(&|r| proxied.then_some(r.usage.anon_peak_mib / 2.0), 1),
                runs.iter().map(|r| r.load.errors).sum::<u64>(),
                runs.len(),
                if failed.is_empty() {
                    String::new()
                } else {
                    format!(" ({} failed)", failed.len())
                },
            );
        }
        if s == Scenario::ConfigChurn {
            let applied: Vec<String> = cell(records, s, "ferry")
                .iter()
                .map(|r| r.config_updates.map_or("?".into(), |n| n.to_string()))
                .collect();
            let _ = writeln!(
                out,
                "\nConfiguration versions the client sidecar applied during each run: {}.",
                applied.join(", ")
            );
        }
    }
    let failures: Vec<&Record> = records.iter().filter(|r| r.failed.is_some()).collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "\n## Failed cells\n");
        for r in failures {
            let _ = writeln!(
                out,
                "- {} via {} (run {}): {}",
                r.scenario.name(),
                r.path,
                r.run + 1,
                r.failed
                    .as_deref()
                    .unwrap_or("")
                    .lines()
                    .next()
                    .unwrap_or("")
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::parse::Load;
    use super::super::topo::Usage;
    use super::*;

    fn rec(s: Scenario, path: &str, run: usize, rps: f64, p99: f64, cpu: f64) -> Record {
        Record {
            scenario: s,
            path: path.into(),
            run,
            load: Load {
                rps,
                p99_ms: p99,
                requests: (rps * 10.0) as u64,
                ..Load::default()
            },
            usage: Usage {
                cpu_s: cpu,
                rss_peak_mib: 12.0,
                anon_peak_mib: 3.0,
                procs: 2,
            },
            idle_rss_mib: 9.0,
            idle_anon_mib: 2.0,
            retransmits: 0,
            config_updates: None,
            failed: None,
        }
    }

    #[test]
    fn medians_ratios_and_verdicts() {
        let mut rs = Vec::new();
        for run in 0..3 {
            let k = 1.0 + run as f64 * 0.1; // every path moves together within a run
            rs.push(rec(Scenario::H1Max, "direct", run, 100_000.0 * k, 0.5, 0.0));
            rs.push(rec(Scenario::H1Max, "ferry", run, 40_000.0 * k, 1.0, 8.0));
            rs.push(rec(Scenario::H1Max, "nginx", run, 25_000.0 * k, 1.2, 10.0));
            rs.push(rec(Scenario::H1Max, "haproxy", run, 30_000.0 * k, 1.1, 9.0));
        }
        assert_eq!(
            med(&rs, Scenario::H1Max, "ferry", |r| Some(r.load.rps)),
            Some(44_000.0)
        );
        let ratio = ratio_to_direct(&rs, Scenario::H1Max, "ferry", throughput).unwrap();
        assert!((ratio - 0.4).abs() < 1e-9);
        let v = verdicts(&rs);
        let h1 = v
            .iter()
            .find(|v| v.what.starts_with("HTTP/1.1 max"))
            .unwrap();
        // 44,000 vs haproxy's 33,000 = 1.33x >= 1.3x.
        assert_eq!(h1.met, Some(true), "{}", h1.measured);
        assert!(h1.measured.contains("haproxy"));
        let h2 = v.iter().find(|v| v.what.starts_with("HTTP/2 max")).unwrap();
        assert_eq!(h2.met, None);
        let md = markdown(
            &rs,
            &[
                "direct".into(),
                "ferry".into(),
                "nginx".into(),
                "haproxy".into(),
            ],
            "# t",
        );
        assert!(
            md.contains(
                "| h1-max | requests/s | 110,000 | 44,000 (40%) | 27,500 (25%) | 33,000 (30%) |"
            ),
            "{md}"
        );
    }

    #[test]
    fn a_failed_cell_is_reported_not_averaged() {
        let mut r = rec(Scenario::Tcp, "ferry", 0, 0.0, 0.0, 0.0);
        r.failed = Some("ferry in fbench-client not ready after 15s".into());
        let md = markdown(&[r], &["ferry".into()], "# t");
        assert!(
            md.contains("## Failed cells") && md.contains("not ready"),
            "{md}"
        );
        assert!(md.contains("| errors through ferry, every scenario and run | 0 errors, 1 failed cells | 0 | **no** |"), "{md}");
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(group(1234567.4), "1,234,567");
        assert_eq!(group(999.0), "999");
        assert_eq!(group(-1000.0), "-1,000");
    }
}
