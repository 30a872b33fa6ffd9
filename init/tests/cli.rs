//! The binary's command line, unprivileged: names it answers to, `--dry-run`, and bad input being
//! rejected with the flag and value named, before anything is touched.

use std::os::unix::fs::symlink;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ferry-init");
/// Istio's default istio-init arguments, without the leading `istio-iptables`.
const INJECTOR_ARGS: &[&str] = ferry_init::spec::INJECTED_DEFAULT_ARGS.split_at(1).1;

fn dry_run(cmd: &mut Command) -> String {
    let out = cmd
        .args(INJECTOR_ARGS)
        .arg("--dry-run")
        .output()
        .expect("run ferry-init");
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

#[test]
fn answers_to_its_name_to_istio_iptables_argv0_and_first_argument() {
    let own = dry_run(&mut Command::new(BIN));
    assert!(own.starts_with("* nat\n-N ISTIO_INBOUND\n"), "got: {own}");
    assert!(own.contains("-A ISTIO_OUTPUT -j ISTIO_REDIRECT\nCOMMIT\n"));

    let first_arg = dry_run(Command::new(BIN).arg("istio-iptables"));
    assert_eq!(first_arg, own);

    let dir = std::env::temp_dir().join(format!("ferry-argv0-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let link = dir.join("istio-iptables");
    let _ = std::fs::remove_file(&link);
    symlink(BIN, &link).expect("symlink");
    let argv0 = dry_run(&mut Command::new(&link));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(argv0, own);
}

#[test]
fn bad_values_exit_64_naming_flag_and_value() {
    let cases: &[(&[&str], &str)] = &[
        (&["-p", "abc"], "-p/--envoy-port value \"abc\""),
        (
            &["-i", "10.0.0.0/99"],
            "-i/--istio-service-cidr value \"10.0.0.0/99\"",
        ),
        (
            &["-m", "tproxy-ish"],
            "-m/--istio-inbound-interception-mode value \"tproxy-ish\"",
        ),
        (&["-u", "-1"], "-u/--proxy-uid"),
        (
            &["-c", "bad/nic"],
            "-c/--istio-exclude-interfaces value \"bad/nic\"",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(BIN)
            .args(*args)
            .arg("--dry-run")
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(
            stderr.contains(want),
            "{args:?}: stderr lacks {want:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: nothing printed on stdout");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn unknown_flags_are_usage_errors_and_help_explains() {
    let out = Command::new(BIN)
        .arg("--no-such-flag")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let help = Command::new(BIN).arg("--help").output().expect("run");
    let text = String::from_utf8_lossy(&help.stdout);
    for needle in [
        "--istio-inbound-ports",
        "--run-validation",
        "--cleanup-only",
        "--reconcile",
        "126",
    ] {
        assert!(text.contains(needle), "--help lacks {needle}");
    }
}

#[test]
fn cleanup_dry_run_prints_istio_cleanup_sequence() {
    let out = Command::new(BIN)
        .args(INJECTOR_ARGS)
        .args(["--cleanup-only", "--dry-run"])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("iptables -t nat -D ISTIO_OUTPUT -j ISTIO_REDIRECT\n"),
        "{text}"
    );
    assert!(
        text.ends_with("iptables -t nat -X ISTIO_REDIRECT\n"),
        "{text}"
    );
}
