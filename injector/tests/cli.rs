//! The `ferry-injector` command line: `explain`, `inject` from stdin, and a bad configuration
//! rejected at startup with exit code 64 before anything binds.

use std::io::Write;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_ferry-injector");

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
      annotations: {sidecar.istio.io/inject: "true"}
    spec:
      containers: [{name: web, image: nginx}]
"#;

fn run(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn explain_names_the_deciding_rule_at_both_stages() {
    let (code, out, _) = run(&["explain", "-f", "-"], DEPLOYMENT);
    assert_eq!(code, 0);
    assert!(out.contains("no webhook is called"), "{out}");
    assert!(
        out.contains("ANNOTATION is invisible"),
        "the annotation-only opt-in is called out: {out}"
    );

    let (_, out, _) = run(
        &[
            "explain",
            "-f",
            "-",
            "--namespace-labels",
            "istio-injection=enabled",
        ],
        DEPLOYMENT,
    );
    assert!(
        out.contains("namespace.sidecar-injector.istio.io: CALLED"),
        "{out}"
    );
    assert!(
        out.contains("pod annotation sidecar.istio.io/inject=\"true\""),
        "{out}"
    );
    assert!(out.contains("=> INJECTED"), "{out}");
    assert!(out.contains("istio-init args: istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*'"), "{out}");

    let host = DEPLOYMENT.replace("containers:", "hostNetwork: true\n      containers:");
    let (_, out, _) = run(
        &[
            "explain",
            "-f",
            "-",
            "--namespace-labels",
            "istio-injection=enabled",
        ],
        &host,
    );
    assert!(out.contains("hostNetwork"), "{out}");
}

#[test]
fn inject_reads_stdin_and_writes_yaml() {
    let (code, out, err) = run(&["inject", "-f", "-"], DEPLOYMENT);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("name: istio-proxy") && out.contains("restartPolicy: Always"),
        "{out}"
    );
    assert!(err.contains("Deployment web: injected"), "{err}");
    // Injecting the output again changes nothing.
    let (_, again, _) = run(&["inject", "-f", "-"], &out);
    assert_eq!(again, out);
}

#[test]
fn bad_config_or_bad_annotation_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("ferry-injector-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = dir.join("config.yaml");
    std::fs::write(&cfg, "policy: sometimes\n").expect("write");
    let (code, _, err) = run(
        &[
            "serve",
            "--config",
            cfg.to_str().expect("utf8"),
            "--listen",
            "127.0.0.1:0",
        ],
        "",
    );
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("config.yaml") && err.contains("policy"),
        "{err}"
    );

    let bad = DEPLOYMENT.replace(
        "sidecar.istio.io/inject: \"true\"",
        "traffic.sidecar.istio.io/excludeOutboundPorts: \"http\"",
    );
    let (code, _, err) = run(&["inject", "-f", "-"], &bad);
    assert_eq!(code, 1);
    assert!(
        err.contains("traffic.sidecar.istio.io/excludeOutboundPorts=\"http\""),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
