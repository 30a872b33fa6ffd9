//! Istio's iptables goldens as the oracle: every case in `iptables/cases.json` (27 upstream, 11
//! derived apply and 4 derived `--cleanup-only`) is run through the real command-line parsing,
//! rule generation and apply/cleanup logic against a recording runner, and the transcript must
//! match the golden byte for byte (after trimming, as Istio's test does). Every mismatching case
//! is reported, not just the first.

use std::collections::{BTreeMap, HashMap};

use clap::Parser;
use ferry_init::apply::{self, Backends};
use ferry_init::config::{Args, Backend, Config};
use ferry_init::generate::{self, Facts};
use ferry_init::rules::{Family, RuleSet};
use ferry_init::test_util::RecordingRunner;
use ferry_tests::read;
use serde_json::Value;

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

struct Case {
    name: String,
    golden: String,
    config: Config,
    facts: Facts,
}

fn cases() -> Vec<Case> {
    let doc: Value =
        serde_json::from_str(&read("iptables/cases.json")).expect("cases.json is JSON");
    let mut out = Vec::new();
    for c in doc["cases"].as_array().expect("cases array") {
        let name = c["name"].as_str().expect("name").to_owned();
        let cli = &c["cli_equivalent"];
        let args = std::iter::once("istio-iptables".to_owned()).chain(strs(&cli["args"]));
        let args =
            Args::try_parse_from(args).unwrap_or_else(|e| panic!("{name}: args rejected: {e}"));
        let env: HashMap<String, String> = cli["env"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let config = Config::from_args(&args, &env)
            .unwrap_or_else(|e| panic!("{name}: config rejected: {e}"));
        let f = &cli["environment_facts"];
        let facts = Facts {
            ipv6: f["ipv6"].as_bool().expect("ipv6 fact"),
            dns_servers_v4: strs(&f["resolv_conf_nameservers_v4"]),
            dns_servers_v6: strs(&f["resolv_conf_nameservers_v6"]),
        };
        let golden = read(&format!(
            "iptables/{}",
            c["golden"].as_str().expect("golden path")
        ));
        out.push(Case {
            name,
            golden,
            config,
            facts,
        });
    }
    out
}

fn backends() -> Backends {
    [(Family::V4, Backend::Plain), (Family::V6, Backend::Plain)]
        .into_iter()
        .collect()
}

fn diff(name: &str, want: &str, got: &str) -> String {
    let mut s = format!("--- {name}: golden vs ours\n");
    let (w, g): (Vec<&str>, Vec<&str>) = (want.lines().collect(), got.lines().collect());
    for i in 0..w.len().max(g.len()) {
        let (a, b) = (
            w.get(i).copied().unwrap_or("<none>"),
            g.get(i).copied().unwrap_or("<none>"),
        );
        if a != b {
            s.push_str(&format!(
                "  line {}: golden {a:?}\n           ours   {b:?}\n",
                i + 1
            ));
        }
    }
    s
}

#[test]
fn every_golden_transcript_is_reproduced() {
    let cases = cases();
    assert_eq!(
        cases.len(),
        42,
        "27 upstream + 11 derived + 4 cleanup-only cases"
    );
    let mut failures = Vec::new();
    for case in &cases {
        let plan = generate::plan(&case.config, &case.facts);
        let runner = RecordingRunner::default();
        let result = if case.config.cleanup_only {
            apply::cleanup(&plan, &runner, &backends())
        } else {
            apply::apply(&plan, &runner, &backends(), false, false)
        };
        if let Err(e) = result {
            failures.push(format!("--- {}: {e}", case.name));
            continue;
        }
        let got = runner.transcript();
        if got.trim() != case.golden.trim() {
            failures.push(diff(&case.name, case.golden.trim(), got.trim()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn dry_run_prints_exactly_the_restore_input() {
    let mut failures = Vec::new();
    for case in cases().iter().filter(|c| !c.config.cleanup_only) {
        let plan = generate::plan(&case.config, &case.facts);
        let mut cfg = case.config.clone();
        cfg.dry_run = true;
        let printed = ferry_init::dry_run_text(&cfg, &plan);
        // The golden's restore texts are everything between the save probes and the final saves.
        let restore: Vec<&str> = case
            .golden
            .lines()
            .filter(|l| !l.ends_with("tables-save"))
            .collect();
        if printed.trim_end() != restore.join("\n").trim_end() {
            failures.push(diff(&case.name, &restore.join("\n"), &printed));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// === builder goldens ===

fn ruleset(ops: &Value, family: &str) -> RuleSet {
    let mut rs = RuleSet::default();
    for op in ops.as_array().expect("ops") {
        if op["family"] != family {
            continue;
        }
        let params = strs(&op["params"]);
        let params: Vec<&str> = params.iter().map(String::as_str).collect();
        let (table, chain) = (
            op["table"].as_str().expect("table"),
            op["chain"].as_str().expect("chain"),
        );
        match op["op"].as_str() {
            Some("insert") => rs.insert(
                table,
                chain,
                op["position"].as_u64().expect("position") as u32,
                &params,
            ),
            _ => rs.append(table, chain, &params),
        }
    }
    rs
}

fn lines(cmds: &[Vec<String>]) -> String {
    cmds.iter()
        .map(|c| c.join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn builder_goldens_commands_restore_checks_and_cleanup() {
    let doc: Value = serde_json::from_str(&read("iptables/builder-cases.json")).expect("JSON");
    let mut failures = Vec::new();
    let mut checked = 0;
    for c in doc["builder_cases"].as_array().expect("builder_cases") {
        let name = c["name"].as_str().expect("name");
        for (family, expect_key, suffix) in [("v4", "expect_v4", "_v4"), ("v6", "expect_v6", "_v6")]
        {
            let rs = ruleset(&c["ops"], family);
            let expected = c[expect_key].as_bool().unwrap_or(false);
            if !expected {
                if !rs.restore_text().is_empty() || !rs.commands().is_empty() {
                    failures.push(format!("{name} {family}: expected no output"));
                }
                continue;
            }
            let pick = |key: &str| {
                c.get(format!("{key}{suffix}"))
                    .or_else(|| c.get(key))
                    .and_then(Value::as_str)
                    .map(|p| read(&format!("iptables/{p}")))
            };
            let want_cmds = pick("golden_commands").expect("commands golden");
            let want_restore = pick("golden_restore").expect("restore golden");
            checked += 1;
            if lines(&rs.commands()).trim() != want_cmds.trim() {
                failures.push(diff(
                    &format!("{name} {family} commands"),
                    want_cmds.trim(),
                    &lines(&rs.commands()),
                ));
            }
            if rs.restore_text().trim() != want_restore.trim() {
                failures.push(diff(
                    &format!("{name} {family} restore"),
                    want_restore.trim(),
                    rs.restore_text().trim(),
                ));
            }
        }
    }
    let check = &doc["check_rules"];
    for (family, key) in [("v4", "want_v4"), ("v6", "want_v6")] {
        let got: Vec<Vec<String>> = ruleset(&check["ops"], family).check_commands();
        let want: Vec<Vec<String>> = check[key]
            .as_array()
            .expect("want")
            .iter()
            .map(strs)
            .collect();
        if got != want {
            failures.push(format!("check {family}: got {got:?}, want {want:?}"));
        }
    }
    for c in doc["cleanup_rules"].as_array().expect("cleanup_rules") {
        for (family, key) in [("v4", "want_v4"), ("v6", "want_v6")] {
            let got = ruleset(&c["ops"], family).cleanup_commands();
            let want: Vec<Vec<String>> =
                c[key].as_array().expect("want").iter().map(strs).collect();
            if got != want {
                failures.push(format!(
                    "cleanup {} {family}:\n got  {}\n want {}",
                    c["name"],
                    lines(&got),
                    lines(&want)
                ));
            }
        }
    }
    assert!(checked >= 7, "builder cases were read ({checked})");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn reapplying_over_identical_state_changes_nothing() {
    // Apply once against a recording runner, then feed the resulting rules back as the saved state:
    // the second run must find them identical (shape + -C) and restore nothing.
    let case = cases()
        .into_iter()
        .find(|c| c.name == "injector-default-ipv4")
        .expect("case");
    let plan = generate::plan(&case.config, &case.facts);
    let saved = plan
        .v4
        .restore_text()
        .replace("* nat", "*nat")
        .replace("-N ISTIO_", ":ISTIO_");
    let runner = RecordingRunner {
        check_ok: true,
        ..Default::default()
    };
    runner.saves.borrow_mut().insert(Family::V4, saved);
    let report = apply::apply(&plan, &runner, &backends(), false, false).expect("apply");
    assert_eq!(report, vec![(Family::V4, apply::Action::Unchanged)]);
    let restores = runner
        .calls
        .borrow()
        .iter()
        .filter(|c| c.stdin.is_some())
        .count();
    assert_eq!(restores, 0, "nothing re-applied");
    let _ = BTreeMap::<(), ()>::new();
}
