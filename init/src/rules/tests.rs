use super::*;

fn set(ops: &[(&str, &str, Option<u32>, &[&str])]) -> RuleSet {
    let mut s = RuleSet::default();
    for (t, c, pos, p) in ops {
        match pos {
            Some(n) => s.insert(t, c, *n, p),
            None => s.append(t, c, p),
        }
    }
    s
}

#[test]
fn jump_target_only_for_trailing_j() {
    let s = set(&[
        ("nat", "ISTIO_OUTPUT", None, &["-j", "ISTIO_REDIRECT"]),
        (
            "nat",
            "ISTIO_REDIRECT",
            None,
            &["-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001"],
        ),
    ]);
    assert_eq!(s.rules()[0].jump_target(), Some("ISTIO_REDIRECT"));
    assert_eq!(s.rules()[1].jump_target(), None);
}

#[test]
fn restore_declares_jump_targets_after_own_chains() {
    let s = set(&[
        ("nat", "OUTPUT", None, &["-j", "ISTIO_OUTPUT"]),
        ("nat", "ISTIO_INBOUND", None, &["-j", "RETURN"]),
    ]);
    assert_eq!(
        s.restore_text(),
        "* nat\n-N ISTIO_INBOUND\n-N ISTIO_OUTPUT\n-A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_INBOUND -j RETURN\nCOMMIT\n"
    );
}

#[test]
fn empty_set_renders_nothing() {
    assert_eq!(RuleSet::default().restore_text(), "");
    assert!(RuleSet::default().cleanup_commands().is_empty());
}

#[test]
fn cleanup_skips_rules_inside_our_chains_but_not_jumps() {
    let s = set(&[
        (
            "nat",
            "ISTIO_REDIRECT",
            None,
            &["-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001"],
        ),
        ("nat", "OUTPUT", None, &["-j", "ISTIO_OUTPUT"]),
        ("nat", "ISTIO_OUTPUT", None, &["-j", "ISTIO_REDIRECT"]),
    ]);
    let got: Vec<String> = s.cleanup_commands().iter().map(|a| a.join(" ")).collect();
    assert_eq!(
        got,
        [
            "-t nat -D ISTIO_OUTPUT -j ISTIO_REDIRECT",
            "-t nat -D OUTPUT -j ISTIO_OUTPUT",
            "-t nat -F ISTIO_OUTPUT",
            "-t nat -X ISTIO_OUTPUT",
            "-t nat -F ISTIO_REDIRECT",
            "-t nat -X ISTIO_REDIRECT",
        ]
    );
}
