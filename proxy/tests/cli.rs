//! The `ferry-proxy` command line: Istio's arguments accepted, bad settings named with exit 64
//! before anything binds, pilot-agent helpers.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ferry-proxy");

fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Extra arguments, environment, and a piece of the expected message.
type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn bad_settings_exit_64_naming_them() {
    let istio = [
        "proxy",
        "sidecar",
        "--domain",
        "shop.svc.cluster.local",
        "--proxyLogLevel=warning",
        "--proxyComponentLogLevel=misc:error",
        "--log_output_level=default:info",
    ];
    let cases: &[Case<'_>] = &[
        (&[], &[("PROXY_CONFIG", "{not json")], "PROXY_CONFIG"),
        (&[], &[("INSTANCE_IP", "10.0.0.300")], "INSTANCE_IP"),
        (
            &["--outbound-traffic-policy", "SOMETIMES"],
            &[],
            "--outbound-traffic-policy",
        ),
        (&["--concurrency", "lots"], &[], "--concurrency"),
        (
            &[],
            &[("FERRY_MULTIPLEX_PEERS", "maybe")],
            "--multiplex-peers",
        ),
        (&["--admin-addr", "0.0.0.0:15000"], &[], "loopback only"),
        (
            &[],
            &[("ISTIO_KUBE_APP_PROBERS", "[1,2]")],
            "ISTIO_KUBE_APP_PROBERS",
        ),
    ];
    for (extra, env, want) in cases {
        let mut args = istio.to_vec();
        args.extend_from_slice(extra);
        let (code, err) = run(&args, env);
        assert_eq!(code, Some(64), "{extra:?} {env:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    let (code, err) = run(&["proxy", "ingress"], &[]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("expected `sidecar` or `router`"), "{err}");
}

#[test]
fn pilot_agent_helpers_explain_failures() {
    // Nothing listens on this port: the preStop drain request fails clearly, without hanging.
    let (code, err) = run(&["request", "--debug-port=1", "POST", "drain"], &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("127.0.0.1:1"), "{err}");
    let (code, err) = run(
        &[
            "wait",
            "--timeoutSeconds",
            "0",
            "--periodMillis",
            "10",
            "--url",
            "http://localhost:1/healthz/ready",
        ],
        &[],
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("timed out"), "{err}");
}

#[test]
fn the_image_entrypoint_hands_istio_iptables_to_ferry_init() {
    // In the proxy image the injected istio-init runs `ferry-proxy istio-iptables ARGS`.
    let init = std::path::Path::new(BIN).with_file_name("ferry-init");
    if !init.exists() {
        panic!(
            "{} not built; run `cargo test --workspace` (it builds every binary)",
            init.display()
        );
    }
    let out = Command::new(BIN)
        .args(["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337"])
        .args(["-m", "REDIRECT", "-i", "*", "-b", "*", "--dry-run"])
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"),
        "{stdout}"
    );
}
