//! Facts about the network namespace that are not configuration: whether IPv6 is in use (Istio:
//! the first non-loopback, non-link-local address decides, or any address with --dual-stack) and
//! the nameservers in resolv.conf. Also the `ip` steps that follow the rules.

use std::net::IpAddr;

use tracing::{debug, info, warn};

use crate::config::{Config, InboundPorts, Mode};
use crate::exec::{Output, Runner};
use crate::generate::Facts;

/// Reading the namespace's facts failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listing interface addresses: {0}")]
    Interfaces(#[source] nix::Error),
    #[error("reading {path} for --redirect-dns: {source}")]
    ResolvConf {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error(transparent)]
    Exec(#[from] crate::exec::Error),
}

fn usable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => !a.is_loopback() && !a.is_link_local(),
        IpAddr::V6(a) => {
            let a = a.to_ipv4_mapped().map(IpAddr::V4);
            match a {
                Some(v4) => usable(&v4),
                None => {
                    let IpAddr::V6(v6) = ip else {
                        unreachable!("matched V6 above")
                    };
                    !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80 && !v6.is_multicast()
                }
            }
        }
    }
}

/// Istio's IPv6 decision over a list of addresses in interface order.
pub fn ipv6_in_use(addrs: &[IpAddr], dual_stack: bool) -> bool {
    let mut usable_addrs = addrs.iter().filter(|a| usable(a));
    if dual_stack {
        usable_addrs.any(IpAddr::is_ipv6)
    } else {
        usable_addrs.next().is_some_and(IpAddr::is_ipv6)
    }
}

/// The namespace's interface addresses, in the kernel's order.
pub fn interface_addrs() -> Result<Vec<IpAddr>, Error> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(Error::Interfaces)? {
        let Some(addr) = ifa.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            out.push(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            out.push(IpAddr::V6(v6.ip()));
        }
    }
    Ok(out)
}

/// `nameserver` lines of a resolv.conf, split by family, text kept as written.
pub fn parse_resolv_conf(text: &str) -> (Vec<String>, Vec<String>) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(server) = words.next() else { continue };
        // A zone index (fe80::1%eth0) is not part of the address iptables takes.
        let addr = server.split('%').next().unwrap_or(server);
        match addr.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => v4.push(addr.to_owned()),
            Ok(IpAddr::V6(_)) => v6.push(addr.to_owned()),
            Err(_) => warn!(
                server,
                "ignoring resolv.conf nameserver that is not an IP address"
            ),
        }
    }
    (v4, v6)
}

/// Detect the facts the plan depends on.
pub fn detect(cfg: &Config) -> Result<Facts, Error> {
    let addrs = interface_addrs()?;
    let ipv6 = ipv6_in_use(&addrs, cfg.dual_stack);
    if !addrs.iter().any(usable) {
        warn!("no non-loopback address in this namespace; treating it as IPv4-only");
    }
    let (mut dns_servers_v4, mut dns_servers_v6) = (Vec::new(), Vec::new());
    if cfg.redirect_dns && !cfg.capture_all_dns {
        let text =
            std::fs::read_to_string(&cfg.resolv_conf).map_err(|source| Error::ResolvConf {
                path: cfg.resolv_conf.clone(),
                source,
            })?;
        (dns_servers_v4, dns_servers_v6) = parse_resolv_conf(&text);
        if dns_servers_v4.is_empty() && dns_servers_v6.is_empty() {
            warn!(path = %cfg.resolv_conf, "--redirect-dns is on but resolv.conf lists no nameserver: DNS is not captured (use --capture-all-dns to capture all port-53 traffic)");
        }
    }
    debug!(ipv6, ?dns_servers_v4, ?dns_servers_v6, "namespace facts");
    Ok(Facts {
        ipv6,
        dns_servers_v4,
        dns_servers_v6,
    })
}

fn ip(runner: &dyn Runner, args: &[&str]) -> Result<Output, Error> {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    Ok(runner.command("ip", &args)?)
}

fn ip_must(runner: &dyn Runner, args: &[&str], tolerate: &str) -> Result<(), Error> {
    let out = ip(runner, args)?;
    if out.success || (!tolerate.is_empty() && out.stderr.contains(tolerate)) {
        Ok(())
    } else {
        Err(Error::Ip {
            args: args.join(" "),
            stderr: out.stderr.trim().to_owned(),
        })
    }
}

/// What follows the rules: `::6` on lo for IPv6 (the inbound passthrough source), and the TPROXY
/// policy route. Idempotent: existing entries are left as they are.
pub fn configure_routes(cfg: &Config, ipv6: bool, runner: &dyn Runner) -> Result<(), Error> {
    if ipv6 {
        ip_must(
            runner,
            &["-6", "addr", "add", "::6/128", "dev", "lo"],
            "File exists",
        )?;
    }
    if cfg.mode == Mode::Tproxy && cfg.inbound_ports != InboundPorts::None {
        let mark = cfg.tproxy_mark.to_string();
        let table = cfg.tproxy_route_table.to_string();
        let families: &[&str] = if ipv6 { &["-4", "-6"] } else { &["-4"] };
        for fam in families {
            let rules = ip(runner, &[fam, "rule", "show"])?;
            let wanted = format!("fwmark {:#x} lookup {table}", cfg.tproxy_mark);
            if !rules.stdout.contains(&wanted) {
                ip_must(
                    runner,
                    &[fam, "rule", "add", "fwmark", &mark, "lookup", &table],
                    "",
                )?;
            }
            ip_must(
                runner,
                &[
                    fam, "route", "replace", "local", "default", "dev", "lo", "table", &table,
                ],
                "",
            )?;
        }
        info!(mark = %mark, table = %table, "TPROXY policy routing configured");
    }
    Ok(())
}

/// `--cleanup-only` counterpart of [`configure_routes`]: remove the TPROXY policy rule and route
/// table, if present. The `::6` address stays: it is harmless and other tools may rely on it.
pub fn remove_routes(cfg: &Config, ipv6: bool, runner: &dyn Runner) -> Result<(), Error> {
    if cfg.mode != Mode::Tproxy {
        return Ok(());
    }
    let mark = cfg.tproxy_mark.to_string();
    let table = cfg.tproxy_route_table.to_string();
    let families: &[&str] = if ipv6 { &["-4", "-6"] } else { &["-4"] };
    for fam in families {
        // `ip rule del` removes one matching rule per call; stop when none is left.
        for _ in 0..16 {
            if !ip(
                runner,
                &[fam, "rule", "del", "fwmark", &mark, "lookup", &table],
            )?
            .success
            {
                break;
            }
        }
        ip_must(
            runner,
            &[fam, "route", "flush", "table", &table],
            "does not exist",
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(s: &[&str]) -> Vec<IpAddr> {
        s.iter().map(|a| a.parse().expect("test address")).collect()
    }

    #[test]
    fn first_usable_address_decides_without_dual_stack() {
        assert!(!ipv6_in_use(
            &addrs(&["127.0.0.1", "::1", "10.0.0.5", "fd00::5"]),
            false
        ));
        assert!(ipv6_in_use(
            &addrs(&["127.0.0.1", "fe80::1", "fd00::5", "10.0.0.5"]),
            false
        ));
        assert!(!ipv6_in_use(&addrs(&["127.0.0.1", "::1"]), false));
    }

    #[test]
    fn dual_stack_takes_any_ipv6() {
        assert!(ipv6_in_use(&addrs(&["10.0.0.5", "fd00::5"]), true));
        assert!(!ipv6_in_use(&addrs(&["10.0.0.5", "fe80::5"]), true));
    }

    #[test]
    fn resolv_conf_split_by_family_text_kept() {
        let (v4, v6) = parse_resolv_conf(
            "search default.svc.cluster.local\nnameserver 10.96.0.10\nnameserver ::127.0.0.53\n# nameserver 1.1.1.1\nnameserver bogus\nnameserver fe80::1%eth0\noptions ndots:5\n",
        );
        assert_eq!(v4, ["10.96.0.10"]);
        assert_eq!(v6, ["::127.0.0.53", "fe80::1"]);
    }
}
