use std::collections::HashMap;

use clap::Parser;

use super::*;

fn cfg(args: &[&str], env: &[(&str, &str)]) -> Result<Config, Error> {
    let args = Args::try_parse_from(std::iter::once("istio-iptables").chain(args.iter().copied()))
        .expect("command line parses");
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect();
    Config::from_args(&args, &env)
}

#[test]
fn injector_default_args_parse() {
    let c = cfg(&crate::spec::INJECTED_DEFAULT_ARGS[1..], &[]).expect("valid");
    assert_eq!(c.proxy_uids, [1337]);
    assert_eq!(c.proxy_gids, [1337], "GID defaults to the UID");
    assert_eq!(c.inbound_ports, InboundPorts::All);
    assert_eq!(c.outbound_ranges, OutboundRanges::All);
    assert!(c.outbound_exclude_ranges.is_empty());
    assert_eq!(c.inbound_exclude_ports, [15090, 15021, 15020]);
}

#[test]
fn flags_win_over_env_and_env_over_defaults() {
    let c = cfg(
        &["-b", "80"],
        &[
            ("ISTIO_INBOUND_PORTS", "90"),
            ("INBOUND_CAPTURE_PORT", "16006"),
        ],
    )
    .expect("valid");
    assert_eq!(c.inbound_ports, InboundPorts::List(vec![80]));
    assert_eq!(c.inbound_capture_port, 16006);
    let c = cfg(&[], &[("ISTIO_META_DNS_CAPTURE", "true")]).expect("valid");
    assert!(c.redirect_dns, "second env name is honoured");
}

#[test]
fn go_style_bool_flags() {
    assert!(cfg(&["--redirect-dns"], &[]).expect("valid").redirect_dns);
    assert!(
        !cfg(&["--redirect-dns=false"], &[])
            .expect("valid")
            .redirect_dns
    );
    assert!(cfg(&["-n"], &[]).expect("valid").dry_run);
}

/// Command line, environment, and a piece of the expected error message.
type ErrorCase<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn errors_name_the_flag_and_value() {
    let cases: &[ErrorCase<'_>] = &[
        (
            &["-p", "70000"],
            &[],
            "invalid -p/--envoy-port value \"70000\"",
        ),
        (
            &["-b", "80,http"],
            &[],
            "invalid -b/--istio-inbound-ports value \"80,http\"",
        ),
        (
            &["-i", "10.0.0.0/33"],
            &[],
            "invalid -i/--istio-service-cidr value \"10.0.0.0/33\"",
        ),
        (
            &["-x", "not-a-cidr"],
            &[],
            "-x/--istio-service-exclude-cidr",
        ),
        (&["-m", "BOGUS"], &[], "expected REDIRECT or TPROXY"),
        (
            &["-u", "proxy"],
            &[],
            "invalid -u/--proxy-uid value \"proxy\"",
        ),
        (&["-c", "eth0/1"], &[], "not a valid interface name"),
        (
            &["-k", "averyveryverylongnic"],
            &[],
            "-k/--kube-virt-interfaces",
        ),
        (&["--probe-timeout", "5 parsecs"], &[], "--probe-timeout"),
        (
            &["--force-iptables-binary", "ebpf"],
            &[],
            "expected legacy or nft",
        ),
        (
            &[],
            &[("ISTIO_INBOUND_PORTS", "x")],
            "invalid $ISTIO_INBOUND_PORTS value \"x\"",
        ),
        (
            &[],
            &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "10.0.0.1/32")],
            "inside 127.0.0.0/8",
        ),
        (
            &[],
            &[
                ("ISTIO_OUTBOUND_OWNER_GROUPS", "a"),
                ("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "b"),
            ],
            "only one of",
        ),
        (&["-p", "15006"], &[], "need different listeners"),
        (
            &["--network-namespace", "/var/run/netns/x"],
            &[],
            "not supported",
        ),
    ];
    let mut failures = Vec::new();
    for (args, env, want) in cases {
        match cfg(args, env) {
            Ok(_) => failures.push(format!(
                "{args:?} {env:?}: accepted, want error containing {want:?}"
            )),
            Err(e) if !e.to_string().contains(want) => {
                failures.push(format!("{args:?} {env:?}: error {e:?} lacks {want:?}"))
            }
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn list_items_may_be_empty_and_cidrs_keep_their_text() {
    let c = cfg(
        &["-d", "6000,7000,", "-i", "127.0.0.1/24,10.96.0.1/24"],
        &[],
    )
    .expect("valid");
    assert_eq!(c.inbound_exclude_ports, [6000, 7000]);
    let OutboundRanges::List(l) = &c.outbound_ranges else {
        panic!("list expected")
    };
    assert_eq!(l[0].text, "127.0.0.1/24");
    assert!(c.outbound_includes_loopback());
}

#[test]
fn go_durations() {
    assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
    assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
    assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
    assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
    assert_eq!(parse_duration("5"), None);
    assert_eq!(parse_duration(""), None);
    assert_eq!(
        parse_duration("99999999999999999999999999h"),
        None,
        "overflow is an error, not a panic"
    );
    assert_eq!(parse_duration("1e3s"), None);
    assert_eq!(parse_duration("."), None);
}
