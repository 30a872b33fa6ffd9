//! `--run-validation`: prove that redirection really works in this namespace, the way Istio's CNI
//! validation and linkerd's network-validator do, and say why when it does not.
//!
//! Listeners are bound on loopback at the outbound and inbound capture ports. A client, running
//! under the UID the rule under test is about, connects to an address nobody listens on and sends
//! a random token. Capture works when the token arrives at the expected listener and
//! `SO_ORIGINAL_DST` there returns the address the client dialled. Two probes:
//!
//! * **inbound**: as the proxy UID to `127.0.0.6:<probe port>` (`[::6]` for IPv6). This is
//!   Istio's own check: the hairpin rule must send it to the inbound port. Loopback only.
//! * **outbound**: as an application UID to an address in `-i` (TEST-NET-1 `192.0.2.1` by
//!   default, an address reserved for documentation that no host uses). It must land on the
//!   outbound port. Skipped when nothing is captured outbound or when not running as root.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::config::{Config, OutboundRanges, OwnerGroups};

/// Validation could not run, or capture is not working.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot listen on {addr} for validation: {source} (is the proxy already running in this namespace?)"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("iptables validation failed; traffic is NOT being captured: {0}")]
    Failed(String),
}

/// A passed or skipped probe, for the log and the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    Passed { probe: String },
    Skipped { probe: String, why: String },
}

struct Probe {
    name: String,
    target: SocketAddr,
    expect_port: u16,
    uid: u32,
    gid: u32,
}

/// What one listener saw.
struct Arrival {
    port: u16,
    orig_dst: Option<SocketAddr>,
    token: String,
}

fn token() -> String {
    let mut buf = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf));
    if ok.is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        buf = (nanos ^ u128::from(std::process::id())).to_le_bytes();
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = match stream.local_addr().ok()? {
        SocketAddr::V4(_) => sock.original_dst_v4().ok()?,
        SocketAddr::V6(_) => sock.original_dst_v6().ok()?,
    };
    addr.as_socket()
}

fn listen(addr: SocketAddr, stop: Arc<AtomicBool>, tx: mpsc::Sender<Arrival>) -> Result<(), Error> {
    let listener = TcpListener::bind(addr).map_err(|source| Error::Bind { addr, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| Error::Bind { addr, source })?;
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    let orig_dst = original_dst(&stream);
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                    let mut buf = [0u8; 64];
                    let n = stream.read(&mut buf).unwrap_or(0);
                    let token = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
                    debug!(%peer, port = addr.port(), ?orig_dst, "validation connection");
                    let _ = stream.write_all(b"ok\n");
                    let _ = tx.send(Arrival {
                        port: addr.port(),
                        orig_dst,
                        token,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(5));
                }
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    Ok(())
}

/// Source address for a probe: the inbound passthrough addresses (127.0.0.6, ::6) are local, and
/// the kernel would pick them as their own source, which the `-s 127.0.0.6 -o lo -j RETURN` rule
/// exempts. Bind to ::1 / 127.0.0.1 instead, as Istio's validator does.
fn probe_source(target: &SocketAddr) -> Option<SocketAddr> {
    match target.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
        IpAddr::V6(ip) if ip == Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6) || ip.is_loopback() => {
            Some(SocketAddr::from((Ipv6Addr::LOCALHOST, 0)))
        }
        _ => None,
    }
}

/// The client side, run in-process or as `--internal-probe-connect` under another UID: connect,
/// send the token, wait for the listener's answer.
pub fn probe_connect(target: SocketAddr, token: &str, timeout: Duration) -> std::io::Result<()> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        None,
    )?;
    if let Some(src) = probe_source(&target) {
        sock.bind(&src.into())?;
    }
    sock.connect_timeout(&target.into(), timeout)?;
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(timeout))?;
    s.write_all(token.as_bytes())?;
    s.write_all(b"\n")?;
    let mut buf = [0u8; 3];
    s.read_exact(&mut buf)?;
    Ok(())
}

/// Describe a client failure for a human.
fn diagnose(probe: &Probe, err: &str) -> String {
    let t = probe.target;
    let e = err.to_lowercase();
    if e.contains("refused") {
        format!(
            "{t} was reached directly and refused: no rule redirected it to port {}",
            probe.expect_port
        )
    } else if e.contains("unreachable") && t.ip().is_loopback()
        || (e.contains("unreachable") && t.ip() == IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)))
    {
        format!(
            "{t} is unreachable: the loopback interface is down or has no address (`ip link set lo up`)"
        )
    } else if e.contains("unreachable") {
        format!(
            "no route to {t}: a destination outside the pod needs a route (normally the default route) before it can be captured"
        )
    } else if e.contains("timed out") || e.contains("would block") {
        format!(
            "connecting to {t} timed out: it was not redirected to port {} and nothing answered",
            probe.expect_port
        )
    } else {
        format!("connecting to {t} failed: {err}")
    }
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Run one client attempt as the probe's UID/GID.
fn attempt(probe: &Probe, token: &str, timeout: Duration) -> Result<(), String> {
    let me = nix::unistd::Uid::effective().as_raw();
    if me == probe.uid {
        return probe_connect(probe.target, token, timeout).map_err(|e| e.to_string());
    }
    let exe = std::env::current_exe().map_err(|e| format!("locating own executable: {e}"))?;
    let out = Command::new(exe)
        .arg(format!("--internal-probe-connect={}", probe.target))
        .arg(format!("--internal-probe-token={token}"))
        .arg(format!("--probe-timeout={}ms", timeout.as_millis().max(1)))
        .uid(probe.uid)
        .gid(probe.gid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("starting the probe client as uid {}: {e}", probe.uid))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

use std::os::unix::process::CommandExt as _;

fn pick_app_identity(cfg: &Config) -> Option<(u32, u32)> {
    let gid = match &cfg.owner_groups {
        OwnerGroups::Only(groups) => groups.iter().find_map(|g| g.parse::<u32>().ok())?,
        OwnerGroups::AllExcept(_) => 65534,
    };
    let excluded_gid = match &cfg.owner_groups {
        OwnerGroups::AllExcept(ex) => ex.iter().any(|g| g == &gid.to_string()),
        OwnerGroups::Only(_) => false,
    };
    let uid = [65534u32, 65533, 12345]
        .into_iter()
        .find(|u| !cfg.proxy_uids.contains(u))?;
    if cfg.proxy_gids.contains(&gid) || excluded_gid {
        return None;
    }
    Some((uid, gid))
}

fn outbound_target(cfg: &Config, ipv6: bool) -> Option<IpAddr> {
    if let Some(ip) = cfg.probe_outbound_ip {
        return Some(ip);
    }
    let excluded = |ip: &IpAddr| {
        cfg.outbound_exclude_ranges
            .iter()
            .any(|c| c.net.contains(ip))
    };
    let candidates: Vec<IpAddr> = match &cfg.outbound_ranges {
        OutboundRanges::All => vec![
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        ],
        OutboundRanges::List(list) => list.iter().flat_map(|c| c.net.hosts().take(16)).collect(),
    };
    candidates
        .into_iter()
        .filter(|ip| ip.is_ipv4() || ipv6)
        .find(|ip| !excluded(ip) && !ip.is_loopback())
}

/// Run the probes. `Ok` lists what passed and what was skipped and why.
pub fn run(cfg: &Config, ipv6: bool) -> Result<Vec<ProbeResult>, Error> {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let mut loopbacks = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    if ipv6 {
        loopbacks.push(IpAddr::V6(Ipv6Addr::LOCALHOST));
    }
    for ip in &loopbacks {
        for port in [cfg.proxy_port, cfg.inbound_capture_port] {
            listen(SocketAddr::new(*ip, port), stop.clone(), tx.clone())?;
        }
    }
    let result = run_probes(cfg, ipv6, &rx);
    stop.store(true, Ordering::Relaxed);
    result
}

fn run_probes(
    cfg: &Config,
    ipv6: bool,
    rx: &mpsc::Receiver<Arrival>,
) -> Result<Vec<ProbeResult>, Error> {
    let mut results = Vec::new();
    let mut probes = Vec::new();
    let proxy_uid = cfg.proxy_uids[0];
    let proxy_gid = cfg.proxy_gids[0];
    let mut inbound_targets = vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6))];
    if ipv6 {
        inbound_targets.push(IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6)));
    }
    let me = nix::unistd::Uid::effective().as_raw();
    for ip in inbound_targets {
        let name = format!("inbound hairpin {ip} as uid {proxy_uid}");
        if !is_root() && me != proxy_uid {
            results.push(ProbeResult::Skipped {
                probe: name,
                why: format!("needs root or uid {proxy_uid}"),
            });
            continue;
        }
        probes.push(Probe {
            name,
            target: SocketAddr::new(ip, cfg.probe_port),
            expect_port: cfg.inbound_capture_port,
            uid: proxy_uid,
            gid: proxy_gid,
        });
    }
    let outbound_on = match &cfg.outbound_ranges {
        OutboundRanges::All => true,
        OutboundRanges::List(l) => !l.is_empty(),
    };
    let outbound_name = "outbound capture".to_owned();
    if !outbound_on {
        results.push(ProbeResult::Skipped {
            probe: outbound_name,
            why: "-i is empty: nothing is captured outbound".into(),
        });
    } else if cfg.outbound_exclude_ports.contains(&cfg.probe_port) {
        results.push(ProbeResult::Skipped {
            probe: outbound_name,
            why: format!("probe port {} is excluded by -o", cfg.probe_port),
        });
    } else if !is_root() {
        results.push(ProbeResult::Skipped {
            probe: outbound_name,
            why: "needs root to connect as an application UID".into(),
        });
    } else {
        match (pick_app_identity(cfg), outbound_target(cfg, ipv6)) {
            (Some((uid, gid)), Some(ip)) => probes.push(Probe {
                name: format!("outbound {ip} as uid {uid}"),
                target: SocketAddr::new(ip, cfg.probe_port),
                expect_port: cfg.proxy_port,
                uid,
                gid,
            }),
            (None, _) => results.push(ProbeResult::Skipped {
                probe: outbound_name,
                why: "no application UID/GID that the rules capture".into(),
            }),
            (_, None) => results.push(ProbeResult::Skipped {
                probe: outbound_name,
                why: "no captured, non-excluded destination to probe".into(),
            }),
        }
    }

    let deadline = Instant::now() + cfg.probe_timeout;
    for probe in &probes {
        let tok = token();
        let mut last_err = String::from("no attempt finished before --probe-timeout");
        let passed = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break false;
            }
            let per_try = left.min(Duration::from_secs(1));
            let outcome = attempt(probe, &tok, per_try);
            // Whatever the client saw, the listener's view is authoritative.
            let mut seen = None;
            while let Ok(a) = rx.recv_timeout(Duration::from_millis(50)) {
                if a.token == tok {
                    seen = Some(a);
                    break;
                }
            }
            match (seen, outcome) {
                (Some(a), _) if a.port != probe.expect_port => {
                    last_err = format!(
                        "{} arrived on port {} instead of {}",
                        probe.target, a.port, probe.expect_port
                    );
                }
                (Some(a), _) if a.orig_dst != Some(probe.target) => {
                    last_err = format!(
                        "SO_ORIGINAL_DST returned {:?}, expected {}",
                        a.orig_dst, probe.target
                    );
                }
                (Some(_), _) => break true,
                (None, Err(e)) => last_err = diagnose(probe, &e),
                (None, Ok(())) => {
                    last_err = format!("{} answered, but not through our listener", probe.target)
                }
            }
            thread::sleep(
                Duration::from_millis(100).min(deadline.saturating_duration_since(Instant::now())),
            );
        };
        if passed {
            info!(probe = %probe.name, "validation probe passed");
            results.push(ProbeResult::Passed {
                probe: probe.name.clone(),
            });
        } else {
            warn!(probe = %probe.name, reason = %last_err, "validation probe failed");
            return Err(Error::Failed(format!("{}: {last_err}", probe.name)));
        }
    }
    for r in &results {
        if let ProbeResult::Skipped { probe, why } = r {
            info!(%probe, %why, "validation probe skipped");
        }
    }
    Ok(results)
}
