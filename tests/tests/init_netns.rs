//! `ferry-init` for real, as root, in network namespaces these tests create (pod + peer joined by
//! a veth pair). Traffic goes only to loopback or to addresses inside those namespaces.
//! Without root these tests print SKIPPED; with `CI=true` they fail instead.

use std::net::SocketAddr;
use std::process::Output;

use ferry_tests::netns::{Listeners, Pair, require_root, token};
use ferry_tests::workspace_bin;

const INJECTOR_ARGS: &[&str] = ferry_init::spec::INJECTED_DEFAULT_ARGS;

/// The default pod ruleset as `iptables-nft-save` prints it back (its own spelling, e.g.
/// `-m tcp`, source before `-o`): exactly these rules, nothing more.
const EXPECTED_NFT_RULES: &[&str] = &[
    "-A PREROUTING -p tcp -j ISTIO_INBOUND",
    "-A OUTPUT -j ISTIO_OUTPUT",
    "-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
    "-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN",
    "-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN",
    "-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
    "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
    "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    "-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
    "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
    "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT",
    "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
    "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
    "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
];

const FOREIGN_NAT_RULE: &str = "-A OUTPUT -p udp -m udp --dport 9999 -j RETURN";
const FOREIGN_FILTER_RULE: &str = "-A INPUT -s 192.0.2.99/32 -j DROP";

fn init(pair: &Pair, extra: &[&str]) -> Output {
    let bin = workspace_bin("ferry-init");
    let bin = bin.to_str().expect("utf8 path");
    let mut cmd = vec![bin];
    cmd.extend_from_slice(INJECTOR_ARGS);
    cmd.extend_from_slice(extra);
    pair.exec(&pair.pod, &cmd)
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "ferry-init failed ({:?}): {stderr}",
        out.status.code()
    );
    stderr
}

/// Rules of ours (in ISTIO_* chains or jumping to one) in a save dump, in save order.
fn istio_rules(save: &str) -> Vec<String> {
    save.lines()
        .filter(|l| l.starts_with("-A ") && l.contains("ISTIO_"))
        .map(str::to_owned)
        .collect()
}

fn add_foreign_rules(pair: &Pair, tool: &str) {
    for args in [
        vec![
            tool, "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "9999", "-j", "RETURN",
        ],
        vec![
            tool,
            "-t",
            "filter",
            "-A",
            "INPUT",
            "-s",
            "192.0.2.99/32",
            "-j",
            "DROP",
        ],
    ] {
        let out = pair.exec(&pair.pod, &args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn default_ruleset_applies_exactly_is_idempotent_and_cleans_up() {
    if !require_root("default_ruleset_applies_exactly_is_idempotent_and_cleans_up") {
        return;
    }
    let pair = Pair::new(false);
    add_foreign_rules(&pair, "iptables-nft");
    ok(&init(&pair, &[]));
    let first = pair.save("iptables-nft-save");
    assert_eq!(
        istio_rules(&first),
        EXPECTED_NFT_RULES,
        "installed rules:\n{first}"
    );

    // A restarted init container: same config, exit 0, nothing changes.
    let stderr = ok(&init(&pair, &[]));
    assert!(
        stderr.contains("identical rules already installed"),
        "{stderr}"
    );
    let second = pair.save("iptables-nft-save");
    assert_eq!(istio_rules(&second), istio_rules(&first));
    assert_eq!(second.matches("-A ").count(), first.matches("-A ").count());

    ok(&init(&pair, &["--cleanup-only"]));
    let after = pair.save("iptables-nft-save");
    assert!(
        !after.contains("ISTIO_"),
        "ISTIO_* left after cleanup:\n{after}"
    );
    assert!(
        after.contains(FOREIGN_NAT_RULE),
        "foreign nat rule removed:\n{after}"
    );
    assert!(
        after.contains(FOREIGN_FILTER_RULE),
        "foreign filter rule removed:\n{after}"
    );
}

#[test]
fn legacy_backend_forced_and_detected() {
    if !require_root("legacy_backend_forced_and_detected") {
        return;
    }
    // Forced.
    let pair = Pair::new(false);
    ok(&init(&pair, &["--force-iptables-binary=legacy"]));
    let legacy = pair.save("iptables-legacy-save");
    assert_eq!(
        istio_rules(&legacy).len(),
        EXPECTED_NFT_RULES.len(),
        "{legacy}"
    );
    assert!(
        istio_rules(&pair.save("iptables-nft-save")).is_empty(),
        "nothing in nft"
    );
    ok(&init(&pair, &["--force-iptables-binary=legacy"]));
    assert_eq!(
        pair.save("iptables-legacy-save").matches("-A ").count(),
        legacy.matches("-A ").count()
    );
    ok(&init(
        &pair,
        &["--force-iptables-binary=legacy", "--cleanup-only"],
    ));
    assert!(!pair.save("iptables-legacy-save").contains("ISTIO_"));

    // Detected: legacy already holds rules in this namespace, so it is used (Istio's rule).
    let pair = Pair::new(false);
    add_foreign_rules(&pair, "iptables-legacy");
    let stderr = ok(&init(&pair, &[]));
    assert!(stderr.contains("backend=Legacy"), "{stderr}");
    let save = pair.save("iptables-legacy-save");
    assert_eq!(istio_rules(&save).len(), EXPECTED_NFT_RULES.len(), "{save}");
    assert!(save.contains(FOREIGN_FILTER_RULE));
}

/// Connect from inside `ns` as `uid` and return the listener's answer (`port=N`), or the error.
fn connect(pair: &Pair, ns: &str, uid: u32, addr: &str, tok: &str) -> Result<String, String> {
    let bin = workspace_bin("ferry-netcheck");
    let out = pair.exec_as(
        ns,
        uid,
        &[bin.to_str().expect("utf8"), "connect", addr, tok],
    );
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

#[test]
fn traffic_is_captured_for_real() {
    if !require_root("traffic_is_captured_for_real") {
        return;
    }
    let pair = Pair::new(false);
    ok(&init(&pair, &[]));
    let (pod, peer) = (pair.pod_ip(), pair.peer_ip());
    let pod_listeners = Listeners::start(
        &pair.pod,
        &[
            "0.0.0.0:15001",
            "0.0.0.0:15006",
            "0.0.0.0:7070",
            "0.0.0.0:15008",
            "0.0.0.0:15020",
            "0.0.0.0:15021",
            "0.0.0.0:15090",
        ]
        .map(sa),
    );
    let peer_listeners = Listeners::start(&pair.peer, &[sa("0.0.0.0:8080")]);
    let app_uid = 1000;
    let mut failures = Vec::new();
    let mut check = |what: &str,
                     got: Result<String, String>,
                     arrival: Option<ferry_tests::netns::Arrival>,
                     want_port: u16,
                     want_orig: Option<&str>| {
        let Some(a) = arrival else {
            failures.push(format!("{what}: never arrived ({got:?})"));
            return;
        };
        if a.port != want_port {
            failures.push(format!("{what}: arrived on {}, want {want_port}", a.port));
        }
        if let Some(o) = want_orig
            && a.orig_dst != Some(sa(o))
        {
            failures.push(format!(
                "{what}: SO_ORIGINAL_DST {:?}, want {o}",
                a.orig_dst
            ));
        }
        if got != Ok(format!("port={want_port}")) {
            failures.push(format!("{what}: client saw {got:?}"));
        }
    };

    // App → outside the pod: lands on 15001, SO_ORIGINAL_DST recovers where it was going.
    let t = token("out");
    let dst = format!("{peer}:8080");
    let got = connect(&pair, &pair.pod, app_uid, &dst, &t);
    check(
        "app outbound",
        got,
        pod_listeners.wait_for(&t),
        15001,
        Some(&dst),
    );

    // The proxy (UID 1337) → outside: not redirected, reaches the real server.
    let t = token("proxy-out");
    let got = connect(&pair, &pair.pod, 1337, &dst, &t);
    check(
        "proxy outbound",
        got,
        peer_listeners.wait_for(&t),
        8080,
        None,
    );

    // Peer → pod app port: lands on 15006 with the original destination.
    let t = token("in");
    let dst = format!("{pod}:9090");
    let got = connect(&pair, &pair.peer, 0, &dst, &t);
    check(
        "inbound app port",
        got,
        pod_listeners.wait_for(&t),
        15006,
        Some(&dst),
    );

    // Peer → the proxy's own ports: never redirected.
    for port in [15008u16, 15020, 15021, 15090] {
        let t = token("skip");
        let got = connect(&pair, &pair.peer, 0, &format!("{pod}:{port}"), &t);
        check(
            &format!("inbound {port}"),
            got,
            pod_listeners.wait_for(&t),
            port,
            None,
        );
    }

    // App → itself over loopback and over its own pod IP: not captured.
    for dst in ["127.0.0.1:7070".to_owned(), format!("{pod}:7070")] {
        let t = token("lo");
        let got = connect(&pair, &pair.pod, app_uid, &dst, &t);
        check(
            &format!("app to itself {dst}"),
            got,
            pod_listeners.wait_for(&t),
            7070,
            None,
        );
    }

    // The proxy → its own pod IP (a Service VIP that resolves back to this pod): hairpin inbound.
    let t = token("hairpin");
    let dst = format!("{pod}:7070");
    let got = connect(&pair, &pair.pod, 1337, &dst, &t);
    check(
        "proxy hairpin",
        got,
        pod_listeners.wait_for(&t),
        15006,
        Some(&dst),
    );

    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn ipv6_namespace_gets_both_families() {
    if !require_root("ipv6_namespace_gets_both_families") {
        return;
    }
    let pair = Pair::new(true);
    ok(&init(&pair, &["--dual-stack"]));
    let v4 = pair.save("iptables-nft-save");
    let v6 = pair.save("ip6tables-nft-save");
    assert_eq!(istio_rules(&v4).len(), EXPECTED_NFT_RULES.len(), "{v4}");
    assert_eq!(istio_rules(&v6).len(), EXPECTED_NFT_RULES.len(), "{v6}");
    assert!(
        v6.contains("-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN"),
        "{v6}"
    );
    let lo = pair.exec(&pair.pod, &["ip", "-6", "addr", "show", "dev", "lo"]);
    assert!(
        String::from_utf8_lossy(&lo.stdout).contains("::6/128"),
        "::6 on lo"
    );

    let listeners = Listeners::start(&pair.pod, &[sa("[::]:15001"), sa("[::]:15006")]);
    let t = token("v6out");
    let dst = format!("[{}]:8080", pair.peer_ip6());
    let got = connect(&pair, &pair.pod, 1000, &dst, &t);
    let a = listeners
        .wait_for(&t)
        .unwrap_or_else(|| panic!("IPv6 outbound never arrived: {got:?}"));
    assert_eq!((a.port, a.orig_dst), (15001, Some(sa(&dst))));
    let t = token("v6in");
    let dst = format!("[{}]:9090", pair.pod_ip6());
    let got = connect(&pair, &pair.peer, 0, &dst, &t);
    let a = listeners
        .wait_for(&t)
        .unwrap_or_else(|| panic!("IPv6 inbound never arrived: {got:?}"));
    assert_eq!((a.port, a.orig_dst), (15006, Some(sa(&dst))));
    drop(listeners);

    // Validation covers the IPv6 hairpin ([::6]) too.
    ok(&init(
        &pair,
        &[
            "--dual-stack",
            "--run-validation",
            "--skip-rule-apply",
            "--probe-timeout=3s",
        ],
    ));
    ok(&init(&pair, &["--dual-stack", "--cleanup-only"]));
    assert!(!pair.save("ip6tables-nft-save").contains("ISTIO_"));
    assert!(!pair.save("iptables-nft-save").contains("ISTIO_"));
}

#[test]
fn validation_passes_with_rules_and_fails_126_without() {
    if !require_root("validation_passes_with_rules_and_fails_126_without") {
        return;
    }
    let pair = Pair::new(false);
    // No rules yet: both probes must fail, and say why.
    let out = init(
        &pair,
        &[
            "--run-validation",
            "--skip-rule-apply",
            "--probe-timeout=1s",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(126), "{stderr}");
    assert!(stderr.contains("traffic is NOT being captured"), "{stderr}");
    assert!(
        stderr.contains("no rule redirected it"),
        "diagnosis: {stderr}"
    );

    // Apply and validate in one go: what an init container runs so a pod never starts broken.
    let stderr = ok(&init(&pair, &["--run-validation", "--probe-timeout=3s"]));
    assert!(
        stderr.contains("validation probe passed") && stderr.contains("inbound hairpin"),
        "{stderr}"
    );
    assert!(
        stderr.contains("outbound 192.0.2.1 as uid 65534"),
        "outbound probe ran: {stderr}"
    );

    // Rules for another inbound port only: outbound still validates, and a run after cleanup fails.
    ok(&init(&pair, &["--cleanup-only"]));
    let out = init(
        &pair,
        &[
            "--run-validation",
            "--skip-rule-apply",
            "--probe-timeout=1s",
        ],
    );
    assert_eq!(out.status.code(), Some(126));
}

#[test]
fn different_config_needs_reconcile_which_is_atomic() {
    if !require_root("different_config_needs_reconcile_which_is_atomic") {
        return;
    }
    let pair = Pair::new(false);
    ok(&init(&pair, &[]));
    let other = ["-b", "8080"];
    let out = init(&pair, &other);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--reconcile"),
        "says how to proceed: {stderr}"
    );
    assert_eq!(
        istio_rules(&pair.save("iptables-nft-save")),
        EXPECTED_NFT_RULES,
        "refusal changed nothing"
    );

    let mut args = other.to_vec();
    args.push("--reconcile");
    ok(&init(&pair, &args));
    let save = pair.save("iptables-nft-save");
    let rules = istio_rules(&save);
    assert!(
        rules.contains(
            &"-A ISTIO_INBOUND -p tcp -m tcp --dport 8080 -j ISTIO_IN_REDIRECT".to_owned()
        ),
        "{save}"
    );
    assert!(
        !rules.iter().any(|r| r.contains("--dport 15090")),
        "old rules gone: {save}"
    );
    assert_eq!(
        save.matches("-A PREROUTING -p tcp -j ISTIO_INBOUND")
            .count(),
        1,
        "no duplicate jumps"
    );
    let stderr = ok(&init(&pair, &other));
    assert!(
        stderr.contains("identical rules already installed"),
        "{stderr}"
    );
}

#[test]
fn ipv6_failure_rolls_back_ipv4() {
    if !require_root("ipv6_failure_rolls_back_ipv4") {
        return;
    }
    let pair = Pair::new(true);
    // A broken ip6tables-nft-restore first on PATH: IPv4 applies, IPv6 fails.
    let dir = std::env::temp_dir().join(format!("ferry-fakebin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let fake = dir.join("ip6tables-nft-restore");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'ip6tables-restore: line 2 failed' >&2\nexit 1\n",
    )
    .expect("write");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let path = format!(
        "PATH={}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let bin = workspace_bin("ferry-init");
    let mut cmd = vec!["env", path.as_str(), bin.to_str().expect("utf8")];
    cmd.extend_from_slice(INJECTOR_ARGS);
    cmd.extend(["--dual-stack", "--force-iptables-binary=nft"]);
    let out = pair.exec(&pair.pod, &cmd);
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("IPv4 was rolled back"), "{stderr}");
    let v4 = pair.save("iptables-nft-save");
    assert!(!v4.contains("ISTIO_"), "IPv4 left half-applied:\n{v4}");
}

#[test]
fn missing_iptables_is_a_clear_error() {
    if !require_root("missing_iptables_is_a_clear_error") {
        return;
    }
    let pair = Pair::new(false);
    let bin = workspace_bin("ferry-init");
    let mut cmd = vec!["env", "PATH=/nonexistent", bin.to_str().expect("utf8")];
    cmd.extend_from_slice(INJECTOR_ARGS);
    let out = pair.exec(&pair.pod, &cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no usable iptables found: tried iptables-legacy-save"),
        "{stderr}"
    );
}

#[test]
fn tproxy_rules_routes_and_inbound_delivery() {
    if !require_root("tproxy_rules_routes_and_inbound_delivery") {
        return;
    }
    let pair = Pair::new(false);
    let tproxy = ["-m", "TPROXY"];
    ok(&init(&pair, &tproxy));
    let mangle = String::from_utf8_lossy(
        &pair
            .exec(&pair.pod, &["iptables-nft-save", "-t", "mangle"])
            .stdout,
    )
    .into_owned();
    assert!(mangle.contains("-j TPROXY --on-port 15006"), "{mangle}");
    assert!(
        mangle.contains("-A ISTIO_DIVERT -j MARK --set-xmark 0x539/0xffffffff"),
        "{mangle}"
    );
    let rules = || {
        String::from_utf8_lossy(&pair.exec(&pair.pod, &["ip", "rule", "show"]).stdout).into_owned()
    };
    let table = || {
        String::from_utf8_lossy(
            &pair
                .exec(&pair.pod, &["ip", "route", "show", "table", "133"])
                .stdout,
        )
        .into_owned()
    };
    assert_eq!(
        rules().matches("fwmark 0x539 lookup 133").count(),
        1,
        "{}",
        rules()
    );
    assert!(table().contains("local default dev lo"), "{}", table());

    // Idempotent, routes included.
    let stderr = ok(&init(&pair, &tproxy));
    assert!(
        stderr.contains("identical rules already installed"),
        "{stderr}"
    );
    assert_eq!(
        rules().matches("fwmark 0x539 lookup 133").count(),
        1,
        "{}",
        rules()
    );

    // Inbound TCP is delivered to a transparent listener on 15006 without NAT: the accepted
    // socket's local address is the original destination.
    let listeners = Listeners::start_transparent(&pair.pod, &[sa("0.0.0.0:15006")]);
    let t = token("tproxy");
    let dst = format!("{}:9090", pair.pod_ip());
    let got = connect(&pair, &pair.peer, 0, &dst, &t);
    let a = listeners
        .wait_for(&t)
        .unwrap_or_else(|| panic!("TPROXY inbound never arrived: {got:?}"));
    assert_eq!((a.port, a.local), (15006, Some(sa(&dst))));
    assert_eq!(got, Ok("port=15006".to_owned()));
    drop(listeners);

    ok(&init(&pair, &["-m", "TPROXY", "--cleanup-only"]));
    let all = pair.save("iptables-nft-save");
    assert!(
        !all.contains("ISTIO_") && !all.contains("TPROXY") && !all.contains("CONNMARK"),
        "{all}"
    );
    assert_eq!(rules().matches("lookup 133").count(), 0, "{}", rules());
    assert!(table().trim().is_empty(), "{}", table());
}

#[test]
fn missing_privileges_and_a_held_lock_are_named() {
    if !require_root("missing_privileges_and_a_held_lock_are_named") {
        return;
    }
    let pair = Pair::new(false);
    let bin = workspace_bin("ferry-init");
    let bin = bin.to_str().expect("utf8");

    // Not root (an init container without runAsUser: 0).
    let mut cmd = vec![bin];
    cmd.extend_from_slice(&INJECTOR_ARGS[1..]);
    let out = pair.exec_as(&pair.pod, 1000, &cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("NET_ADMIN"), "{stderr}");

    // Root without NET_ADMIN/NET_RAW (capabilities dropped).
    let mut cmd = vec![
        "setpriv",
        "--bounding-set=-net_admin,-net_raw",
        "--inh-caps=-net_admin,-net_raw",
        bin,
    ];
    cmd.extend_from_slice(&INJECTOR_ARGS[1..]);
    let out = pair.exec(&pair.pod, &cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("NET_ADMIN"), "{stderr}");

    // The xtables lock held by someone else (a private lock file, so the host's is untouched).
    let lock = std::env::temp_dir().join(format!("ferry-xtables-{}.lock", std::process::id()));
    let lock_env = format!("XTABLES_LOCKFILE={}", lock.display());
    let mut holder = std::process::Command::new("flock")
        .args([lock.to_str().expect("utf8"), "sleep", "10"])
        .spawn()
        .expect("flock");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut cmd = vec!["env", lock_env.as_str(), bin];
    cmd.extend_from_slice(&INJECTOR_ARGS[1..]);
    cmd.extend(["--force-iptables-binary=legacy", "--xtables-wait=1"]);
    let out = pair.exec(&pair.pod, &cmd);
    let _ = holder.kill();
    let _ = holder.wait();
    let _ = std::fs::remove_file(&lock);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("xtables lock"), "{stderr}");
    assert!(
        !pair.save("iptables-legacy-save").contains("ISTIO_"),
        "nothing applied"
    );
}

#[test]
fn dns_capture_reads_resolv_conf_and_ipv6_follows_the_first_address() {
    if !require_root("dns_capture_reads_resolv_conf_and_ipv6_follows_the_first_address") {
        return;
    }
    // Both families on eth0, IPv4 listed first: without --dual-stack only IPv4 is programmed.
    let pair = Pair::new(true);
    let resolv = std::env::temp_dir().join(format!("ferry-resolv-{}.conf", std::process::id()));
    std::fs::write(
        &resolv,
        "search default.svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n",
    )
    .expect("write");
    let resolv_flag = format!("--resolv-conf={}", resolv.display());
    ok(&init(&pair, &["--redirect-dns", &resolv_flag]));
    let _ = std::fs::remove_file(&resolv);
    let nat = pair.save("iptables-nft-save");
    assert!(
        nat.contains("-A ISTIO_OUTPUT_DNS -d 10.96.0.10/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053"),
        "{nat}"
    );
    assert!(
        nat.contains(
            "-A ISTIO_OUTPUT_DNS -d 10.96.0.10/32 -p udp -m udp --dport 53 -j CT --zone 2"
        ),
        "{nat}"
    );
    assert!(
        !pair.save("ip6tables-nft-save").contains("ISTIO_"),
        "IPv6 not programmed: first address is IPv4"
    );

    // A resolv.conf that cannot be read is named.
    let out = init(
        &pair,
        &[
            "--redirect-dns",
            "--resolv-conf=/nonexistent/resolv.conf",
            "--reconcile",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("reading /nonexistent/resolv.conf for --redirect-dns"),
        "{stderr}"
    );
}
