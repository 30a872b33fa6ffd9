//! `ferry-demo`: the README's main job until the local lab exists. Shows the ruleset an injected
//! pod gets, then (as root) applies it with the real `ferry-init` in a throw-away pod namespace,
//! proves capture with a real connection, and removes everything again.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use clap::Parser;
use ferry_init::config::{Args, Config};
use ferry_init::generate::{self, Facts};
use ferry_tests::netns::{Listeners, Pair, token};

/// What Istio's injection template passes to the `istio-init` container.
const INJECTED_ARGS: &[&str] = ferry_init::spec::INJECTED_DEFAULT_ARGS;

fn sibling(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    exe.with_file_name(name)
}

fn step(title: &str) {
    println!("\n== {title}");
}

const SAMPLE: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: cart, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  template:
    metadata: {labels: {app: cart, version: v2}}
    spec:
      containers:
      - name: cart
        image: shop/cart:2.1
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /ready, port: 8080}}
"#;

fn main() {
    step(
        "0. ferry-injector explains and injects a Deployment in a namespace labelled istio-injection=enabled",
    );
    let cfg = ferry_injector::config::Config::default();
    let docs = ferry_injector::offline::parse_documents(SAMPLE).expect("sample parses");
    let labels = [("istio-injection".to_owned(), "enabled".to_owned())].into();
    print!(
        "{}",
        ferry_injector::offline::explain(&cfg, &docs[0], &labels, None).expect("explain")
    );
    let (out, _) = ferry_injector::offline::inject_documents(&cfg, docs).expect("inject");
    let spec = &out[0]["spec"]["template"]["spec"];
    println!(
        "   rewritten readiness probe: {}",
        spec["containers"][0]["readinessProbe"]
    );

    step("1. the ruleset an injected pod gets (ferry-init --dry-run, IPv4 pod)");
    println!(
        "$ ferry-init {}",
        INJECTED_ARGS
            .join(" ")
            .replace(" -x  ", " -x '' ")
            .replace(" * ", " '*' ")
    );
    let args = Args::try_parse_from(INJECTED_ARGS).expect("Istio's args parse");
    let cfg = Config::from_args(&args, &std::collections::HashMap::new()).expect("valid config");
    let plan = generate::plan(&cfg, &Facts::default());
    print!("{}", ferry_init::dry_run_text(&cfg, &plan));

    if !nix::unistd::Uid::effective().is_root() {
        println!(
            "\n(not root: skipping the live part; run `sudo bash .ci/demo` to see capture in a namespace)"
        );
        return;
    }
    let init = sibling("ferry-init");
    let netcheck = sibling("ferry-netcheck");
    let run = |pair: &Pair, extra: &[&str]| {
        let mut cmd = vec![init.to_str().expect("utf8")];
        cmd.extend_from_slice(INJECTED_ARGS);
        cmd.extend_from_slice(extra);
        let out = pair.exec(&pair.pod, &cmd);
        print!("{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "ferry-init failed");
    };

    step("2. a pod namespace (10.X.0.2) and a peer outside it (10.X.0.1), joined by a veth pair");
    let pair = Pair::new(false);
    println!(
        "pod netns {} = {}, peer netns {} = {}",
        pair.pod,
        pair.pod_ip(),
        pair.peer,
        pair.peer_ip()
    );

    step("3. ferry-init applies the rules atomically and validates them (--run-validation)");
    run(&pair, &["--run-validation", "--probe-timeout=3s"]);
    println!("$ iptables-save -t nat   (inside the pod)");
    let save =
        String::from_utf8_lossy(&pair.exec(&pair.pod, &["iptables-save", "-t", "nat"]).stdout)
            .into_owned();
    save.lines()
        .filter(|l| !l.starts_with('#'))
        .for_each(|l| println!("  {l}"));

    step("4. the same again: a restarted init container changes nothing");
    run(&pair, &[]);

    step(
        "5. real traffic: the app (uid 1000) dials the peer; the capture listener on 15001 gets it",
    );
    let listeners = Listeners::start(
        &pair.pod,
        &["0.0.0.0:15001", "0.0.0.0:15006"].map(|a| a.parse::<SocketAddr>().expect("addr")),
    );
    let dst = format!("{}:8080", pair.peer_ip());
    let t = token("demo");
    let out = pair.exec_as(
        &pair.pod,
        1000,
        &[netcheck.to_str().expect("utf8"), "connect", &dst, &t],
    );
    match listeners.wait_for(&t) {
        Some(a) => println!(
            "app -> {dst}: accepted on port {}, SO_ORIGINAL_DST = {} (client got {:?})",
            a.port,
            a.orig_dst
                .map(|d| d.to_string())
                .unwrap_or_else(|| "?".into()),
            String::from_utf8_lossy(&out.stdout).trim()
        ),
        None => println!(
            "app -> {dst}: NOT captured ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
    let t = token("demo-in");
    let dst = format!("{}:9080", pair.pod_ip());
    let _ = pair.exec(
        &pair.peer,
        &[netcheck.to_str().expect("utf8"), "connect", &dst, &t],
    );
    match listeners.wait_for(&t) {
        Some(a) => println!(
            "peer -> {dst}: accepted on port {} (inbound capture), SO_ORIGINAL_DST = {:?}",
            a.port, a.orig_dst
        ),
        None => println!("peer -> {dst}: NOT captured"),
    }
    drop(listeners);

    step("6. --cleanup-only removes every ISTIO_* chain and jump");
    run(&pair, &["--cleanup-only"]);
    let save =
        String::from_utf8_lossy(&pair.exec(&pair.pod, &["iptables-save"]).stdout).into_owned();
    println!(
        "ISTIO_* rules left: {}",
        save.lines().filter(|l| l.contains("ISTIO_")).count()
    );
    drop(pair);
    println!("\nnamespaces removed. Done.");
    let _ = Command::new("true").status();
}
