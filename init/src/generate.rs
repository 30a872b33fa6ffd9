//! Rule generation: `Config` + facts about the namespace → [`Plan`], in exactly the order Istio's
//! `istio-iptables` generates rules (the order fixes every line of the goldens, see the
//! conformance README §2.5). Pure: no I/O, so every golden is reproduced by a unit test.

use ipnet::IpNet;

use crate::config::{Config, InboundPorts, Mode, OutboundRanges, OwnerGroups};
use crate::rules::{Family, Plan, RuleSet};
use crate::spec::{self, chain};

const NAT: &str = "nat";
const MANGLE: &str = "mangle";
const RAW: &str = "raw";

/// Facts about the namespace that are not configuration: whether IPv6 is in use and the DNS
/// servers from resolv.conf. Detected by [`crate::host`] in production, given by tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    pub ipv6: bool,
    /// Nameservers as written in resolv.conf (the text is emitted as-is, like Istio).
    pub dns_servers_v4: Vec<String>,
    pub dns_servers_v6: Vec<String>,
}

/// Both families' rule sets; most rules go to both with per-family addresses.
struct Builder {
    v4: RuleSet,
    v6: RuleSet,
}

impl Builder {
    fn both(&mut self, table: &str, chain: &str, params: &[&str]) {
        self.v4.append(table, chain, params);
        self.v6.append(table, chain, params);
    }

    fn both_insert(&mut self, table: &str, chain: &str, pos: u32, params: &[&str]) {
        self.v4.insert(table, chain, pos, params);
        self.v6.insert(table, chain, pos, params);
    }

    fn family(&mut self, f: Family) -> &mut RuleSet {
        match f {
            Family::V4 => &mut self.v4,
            Family::V6 => &mut self.v6,
        }
    }

    /// Append one rule per family, with a family-specific value substituted into `params`
    /// wherever `{}` appears.
    fn per_family(&mut self, table: &str, chain: &str, v4: &str, v6: &str, params: &[&str]) {
        for (f, value) in [(Family::V4, v4), (Family::V6, v6)] {
            let p: Vec<&str> = params
                .iter()
                .map(|s| if *s == "{}" { value } else { *s })
                .collect();
            self.family(f).append(table, chain, &p);
        }
    }
}

fn family_of(net: &IpNet) -> Family {
    match net {
        IpNet::V4(_) => Family::V4,
        IpNet::V6(_) => Family::V6,
    }
}

/// Generate the plan. `facts.ipv6` decides whether the IPv6 half is applied; the IPv6 rules are
/// always computed so that `--cleanup-only` can remove them too.
pub fn plan(cfg: &Config, facts: &Facts) -> Plan {
    let mut b = Builder {
        v4: RuleSet::default(),
        v6: RuleSet::default(),
    };
    let proxy_port = cfg.proxy_port.to_string();
    let inbound_port = cfg.inbound_capture_port.to_string();
    let tunnel_port = cfg.inbound_tunnel_port.to_string();
    let mark = cfg.tproxy_mark.to_string();
    // The proxy's own outbound-to-self traffic under TPROXY carries mark+1 (1338 by default).
    let outbound_mark = (cfg.tproxy_mark.wrapping_add(1)).to_string();
    let tproxy = cfg.mode == Mode::Tproxy;
    let inbound_table = if tproxy { MANGLE } else { NAT };
    let loopback_v4 = cfg.host_ipv4_loopback_cidr.text.as_str();
    let (lo_v4, lo_v6) = ("127.0.0.1/32", "::1/128");
    let (src6_v4, src6_v6) = (
        spec::INBOUND_PASSTHROUGH_SRC_V4,
        spec::INBOUND_PASSTHROUGH_SRC_V6,
    );

    // 1. Excluded interfaces: nothing in or out of them is captured.
    for nic in &cfg.exclude_interfaces {
        b.both(NAT, "PREROUTING", &["-i", nic, "-j", "RETURN"]);
        b.both(NAT, "OUTPUT", &["-o", nic, "-j", "RETURN"]);
        if tproxy {
            b.both(MANGLE, "PREROUTING", &["-i", nic, "-j", "RETURN"]);
            b.both(MANGLE, "OUTPUT", &["-o", nic, "-j", "RETURN"]);
        }
    }
    // 2. Virtual interfaces: their inbound is not inbound-captured (it is outbound, step 15).
    for nic in &cfg.kube_virt_interfaces {
        b.both_insert(NAT, "PREROUTING", 1, &["-i", nic, "-j", "RETURN"]);
    }
    // 3. Drop conntrack-INVALID packets instead of letting the kernel reset them.
    if cfg.drop_invalid {
        b.both(
            MANGLE,
            "PREROUTING",
            &["-m", "conntrack", "--ctstate", "INVALID", "-j", chain::DROP],
        );
        b.both(MANGLE, chain::DROP, &["-j", "DROP"]);
    }
    // 4. The tunnel port bypass and the two redirect targets.
    b.both(
        NAT,
        chain::INBOUND,
        &["-p", "tcp", "--dport", &tunnel_port, "-j", "RETURN"],
    );
    b.both(
        NAT,
        chain::REDIRECT,
        &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &proxy_port],
    );
    b.both(
        NAT,
        chain::IN_REDIRECT,
        &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &inbound_port],
    );

    // 5. Inbound capture.
    if cfg.inbound_ports != InboundPorts::None {
        if tproxy {
            b.both(MANGLE, chain::DIVERT, &["-j", "MARK", "--set-mark", &mark]);
            b.both(MANGLE, chain::DIVERT, &["-j", "ACCEPT"]);
            let tproxy_mark = format!("{mark}/0xffffffff");
            b.per_family(
                MANGLE,
                chain::TPROXY,
                lo_v4,
                lo_v6,
                &[
                    "!",
                    "-d",
                    "{}",
                    "-p",
                    "tcp",
                    "-j",
                    "TPROXY",
                    "--tproxy-mark",
                    &tproxy_mark,
                    "--on-port",
                    &inbound_port,
                ],
            );
        }
        b.both(
            inbound_table,
            "PREROUTING",
            &["-p", "tcp", "-j", chain::INBOUND],
        );
        let capture = |b: &mut Builder, port: Option<&str>| {
            let mut m: Vec<&str> = vec!["-p", "tcp"];
            if let Some(p) = port {
                m.extend(["--dport", p]);
            }
            if tproxy {
                let mut divert = m.clone();
                divert.extend([
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "RELATED,ESTABLISHED",
                    "-j",
                    chain::DIVERT,
                ]);
                b.both(MANGLE, chain::INBOUND, &divert);
                m.extend(["-j", chain::TPROXY]);
                b.both(MANGLE, chain::INBOUND, &m);
            } else {
                m.extend(["-j", chain::IN_REDIRECT]);
                b.both(NAT, chain::INBOUND, &m);
            }
        };
        match &cfg.inbound_ports {
            InboundPorts::All => {
                // `-d` only means something with `*` (Istio ignores it for a port list).
                for p in &cfg.inbound_exclude_ports {
                    let p = p.to_string();
                    b.both(
                        inbound_table,
                        chain::INBOUND,
                        &["-p", "tcp", "--dport", &p, "-j", "RETURN"],
                    );
                }
                capture(&mut b, None);
            }
            InboundPorts::List(ports) => {
                for p in ports {
                    capture(&mut b, Some(&p.to_string()));
                }
            }
            InboundPorts::None => {}
        }
    }

    // 6. All locally generated traffic goes through ISTIO_OUTPUT.
    b.both(NAT, "OUTPUT", &["-j", chain::OUTPUT]);
    // 7. Outbound ports never captured (TCP and UDP).
    for p in &cfg.outbound_exclude_ports {
        let p = p.to_string();
        b.both(
            NAT,
            chain::OUTPUT,
            &["-p", "tcp", "--dport", &p, "-j", "RETURN"],
        );
        b.both(
            NAT,
            chain::OUTPUT,
            &["-p", "udp", "--dport", &p, "-j", "RETURN"],
        );
    }
    // 8. The proxy's inbound passthrough connects to the app from 127.0.0.6: never recapture it.
    b.per_family(
        NAT,
        chain::OUTPUT,
        src6_v4,
        src6_v6,
        &["-o", "lo", "-s", "{}", "-j", "RETURN"],
    );

    // 9. The proxy's own traffic: hairpin to the pod's own IP goes inbound, everything else is
    //    left alone (the loop breaker). DNS capture changes the port exceptions.
    let dns_servers_present = !facts.dns_servers_v4.is_empty() || !facts.dns_servers_v6.is_empty();
    let dns = cfg.redirect_dns && (cfg.capture_all_dns || dns_servers_present);
    let keep_lo_return = !cfg.outbound_includes_loopback();
    let dns_tunnel_ports = format!("53,{tunnel_port}");
    let owners = cfg
        .proxy_uids
        .iter()
        .map(|u| ("--uid-owner", u.to_string()))
        .chain(
            cfg.proxy_gids
                .iter()
                .map(|g| ("--gid-owner", g.to_string())),
        );
    for (kind, id) in owners {
        let is_uid = kind == "--uid-owner";
        let mut hairpin: Vec<&str> = vec!["-o", "lo", "!", "-d", "{}", "-p", "tcp"];
        if dns && is_uid {
            // Only the UID rule gets the multiport form (an Istio quirk the goldens pin).
            hairpin.extend(["-m", "multiport", "!", "--dports", &dns_tunnel_ports]);
        } else {
            hairpin.extend(["!", "--dport", &tunnel_port]);
        }
        hairpin.extend(["-m", "owner", kind, &id, "-j", chain::IN_REDIRECT]);
        b.per_family(NAT, chain::OUTPUT, loopback_v4, lo_v6, &hairpin);
        if keep_lo_return {
            if dns {
                b.both(
                    NAT,
                    chain::OUTPUT,
                    &[
                        "-o", "lo", "-p", "tcp", "!", "--dport", "53", "-m", "owner", "!", kind,
                        &id, "-j", "RETURN",
                    ],
                );
            } else {
                b.both(
                    NAT,
                    chain::OUTPUT,
                    &["-o", "lo", "-m", "owner", "!", kind, &id, "-j", "RETURN"],
                );
            }
        }
        b.both(
            NAT,
            chain::OUTPUT,
            &["-m", "owner", kind, &id, "-j", "RETURN"],
        );
    }

    // 10. Owner groups.
    match &cfg.owner_groups {
        OwnerGroups::AllExcept(excluded) => {
            for g in excluded {
                b.both(
                    NAT,
                    chain::OUTPUT,
                    &["-m", "owner", "--gid-owner", g, "-j", "RETURN"],
                );
            }
        }
        OwnerGroups::Only(included) => {
            let mut p: Vec<&str> = Vec::new();
            for g in included {
                p.extend(["-m", "owner", "!", "--gid-owner", g]);
            }
            p.extend(["-j", "RETURN"]);
            b.both(NAT, chain::OUTPUT, &p);
        }
    }

    // 11. DNS capture to the agent, with conntrack zones so replies are matched correctly.
    if dns {
        add_dns(&mut b, cfg, facts);
    }

    // 12. Explicit localhost destinations are never captured.
    b.per_family(
        NAT,
        chain::OUTPUT,
        loopback_v4,
        lo_v6,
        &["-d", "{}", "-j", "RETURN"],
    );
    // 13. Excluded destinations, each in its own family.
    for c in &cfg.outbound_exclude_ranges {
        b.family(family_of(&c.net))
            .append(NAT, chain::OUTPUT, &["-d", &c.text, "-j", "RETURN"]);
    }
    // 14. Outbound ports always captured.
    for p in &cfg.outbound_ports {
        let p = p.to_string();
        b.both(
            NAT,
            chain::OUTPUT,
            &["-p", "tcp", "--dport", &p, "-j", chain::REDIRECT],
        );
    }
    // 15. Outbound capture.
    match &cfg.outbound_ranges {
        OutboundRanges::All => {
            b.both(NAT, chain::OUTPUT, &["-j", chain::REDIRECT]);
            for nic in &cfg.kube_virt_interfaces {
                b.both_insert(NAT, "PREROUTING", 1, &["-i", nic, "-j", chain::REDIRECT]);
            }
        }
        OutboundRanges::List(ranges) => {
            for family in [Family::V4, Family::V6] {
                for c in ranges.iter().filter(|c| family_of(&c.net) == family) {
                    for nic in &cfg.kube_virt_interfaces {
                        b.family(family).insert(
                            NAT,
                            "PREROUTING",
                            1,
                            &["-i", nic, "-d", &c.text, "-j", chain::REDIRECT],
                        );
                    }
                    b.family(family).append(
                        NAT,
                        chain::OUTPUT,
                        &["-d", &c.text, "-j", chain::REDIRECT],
                    );
                }
            }
        }
    }

    // 16. TPROXY: keep marks across the connection and keep the proxy's hairpin out of TPROXY.
    if tproxy {
        b.both(
            MANGLE,
            "PREROUTING",
            &[
                "-p",
                "tcp",
                "-m",
                "mark",
                "--mark",
                &mark,
                "-j",
                "CONNMARK",
                "--save-mark",
            ],
        );
        b.both(
            MANGLE,
            "OUTPUT",
            &[
                "-p", "tcp", "-o", "lo", "-m", "mark", "--mark", &mark, "-j", "RETURN",
            ],
        );
        let owners = cfg
            .proxy_uids
            .iter()
            .map(|u| ("--uid-owner", u.to_string()))
            .chain(
                cfg.proxy_gids
                    .iter()
                    .map(|g| ("--gid-owner", g.to_string())),
            );
        for (kind, id) in owners {
            b.per_family(
                MANGLE,
                "OUTPUT",
                lo_v4,
                lo_v6,
                &[
                    "!",
                    "-d",
                    "{}",
                    "-p",
                    "tcp",
                    "-o",
                    "lo",
                    "-m",
                    "owner",
                    kind,
                    &id,
                    "-j",
                    "MARK",
                    "--set-mark",
                    &outbound_mark,
                ],
            );
        }
        b.both(
            MANGLE,
            "OUTPUT",
            &[
                "-p",
                "tcp",
                "-m",
                "connmark",
                "--mark",
                &mark,
                "-j",
                "CONNMARK",
                "--restore-mark",
            ],
        );
        b.both_insert(
            MANGLE,
            chain::INBOUND,
            1,
            &["-p", "tcp", "-m", "mark", "--mark", &mark, "-j", "RETURN"],
        );
        for (f, src) in [(Family::V4, src6_v4), (Family::V6, src6_v6)] {
            b.family(f).insert(
                MANGLE,
                chain::INBOUND,
                2,
                &["-p", "tcp", "-s", src, "-i", "lo", "-j", "RETURN"],
            );
        }
        b.both_insert(
            MANGLE,
            chain::INBOUND,
            3,
            &[
                "-p",
                "tcp",
                "-i",
                "lo",
                "-m",
                "mark",
                "!",
                "--mark",
                &outbound_mark,
                "-j",
                "RETURN",
            ],
        );
    }

    Plan {
        v4: b.v4,
        v6: b.v6,
        ipv6: facts.ipv6,
    }
}

fn add_dns(b: &mut Builder, cfg: &Config, facts: &Facts) {
    let dns_port = spec::DNS_CAPTURE_PORT.to_string();
    let servers = [
        (Family::V4, &facts.dns_servers_v4, "/32"),
        (Family::V6, &facts.dns_servers_v6, "/128"),
    ];
    b.both(RAW, "OUTPUT", &["-j", chain::OUTPUT_DNS]);
    for (family, list, _) in servers {
        if cfg.capture_all_dns || !list.is_empty() {
            b.family(family)
                .append(NAT, chain::OUTPUT, &["-j", chain::OUTPUT_DNS]);
        }
    }
    if cfg.capture_all_dns {
        b.both(
            NAT,
            chain::OUTPUT_DNS,
            &[
                "-p",
                "tcp",
                "--dport",
                "53",
                "-j",
                "REDIRECT",
                "--to-ports",
                &dns_port,
            ],
        );
        b.both(
            NAT,
            chain::OUTPUT_DNS,
            &[
                "-p",
                "udp",
                "--dport",
                "53",
                "-j",
                "REDIRECT",
                "--to-port",
                &dns_port,
            ],
        );
    } else {
        // Only traffic to resolv.conf's servers: a local resolver (dnsmasq) forwarding upstream
        // must not be captured again, or it would loop back to the agent.
        for (family, list, suffix) in servers {
            for s in list.iter() {
                let dst = format!("{s}{suffix}");
                let rs = b.family(family);
                rs.append(
                    NAT,
                    chain::OUTPUT_DNS,
                    &[
                        "-p",
                        "tcp",
                        "--dport",
                        "53",
                        "-d",
                        &dst,
                        "-j",
                        "REDIRECT",
                        "--to-ports",
                        &dns_port,
                    ],
                );
                rs.append(
                    NAT,
                    chain::OUTPUT_DNS,
                    &[
                        "-p",
                        "udp",
                        "--dport",
                        "53",
                        "-d",
                        &dst,
                        "-j",
                        "REDIRECT",
                        "--to-port",
                        &dns_port,
                    ],
                );
            }
        }
    }
    // Conntrack zones: the proxy's upstream DNS (zone 1) and the app's (zone 2) are separate
    // flows even though the agent rewrites them, so replies are not confused.
    let owners = cfg
        .proxy_uids
        .iter()
        .map(|u| ("--uid-owner", u.to_string()))
        .chain(
            cfg.proxy_gids
                .iter()
                .map(|g| ("--gid-owner", g.to_string())),
        );
    for (kind, id) in owners {
        b.both(
            RAW,
            chain::OUTPUT_DNS,
            &[
                "-p", "udp", "--dport", "53", "-m", "owner", kind, &id, "-j", "CT", "--zone", "1",
            ],
        );
        b.both(
            RAW,
            chain::OUTPUT_DNS,
            &[
                "-p", "udp", "--sport", &dns_port, "-m", "owner", kind, &id, "-j", "CT", "--zone",
                "2",
            ],
        );
    }
    if cfg.capture_all_dns {
        b.both(RAW, "PREROUTING", &["-j", chain::INBOUND]);
        b.both(
            RAW,
            chain::OUTPUT_DNS,
            &["-p", "udp", "--dport", "53", "-j", "CT", "--zone", "2"],
        );
        b.both(
            RAW,
            chain::INBOUND,
            &["-p", "udp", "--sport", "53", "-j", "CT", "--zone", "1"],
        );
        return;
    }
    for (family, list, suffix) in servers {
        if list.is_empty() {
            continue;
        }
        let rs = b.family(family);
        rs.append(RAW, "PREROUTING", &["-j", chain::INBOUND]);
        for s in list.iter() {
            let addr = format!("{s}{suffix}");
            rs.append(
                RAW,
                chain::OUTPUT_DNS,
                &[
                    "-p", "udp", "--dport", "53", "-d", &addr, "-j", "CT", "--zone", "2",
                ],
            );
            rs.append(
                RAW,
                chain::INBOUND,
                &[
                    "-p", "udp", "--sport", "53", "-s", &addr, "-j", "CT", "--zone", "1",
                ],
            );
        }
    }
}
