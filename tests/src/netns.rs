//! Network namespaces for the privileged tests: a "pod" joined to a "peer" by a veth pair, both
//! deleted on drop. Traffic only ever goes to addresses inside these namespaces or loopback.
//!
//! Listeners are opened *inside* a namespace by a short-lived thread that `setns`es into it (a
//! socket keeps the namespace it was created in), so tests observe arrivals in-process.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use nix::sched::CloneFlags;
use socket2::{Domain, Socket, Type};

/// Whether privileged tests can run here. Without root (or without iptables/ip), they print
/// `SKIPPED` — except under `CI=true`, where they fail: a skip must never look like a pass.
pub fn require_root(test: &str) -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    let tools = [
        "ip",
        "iptables-nft-restore",
        "iptables-legacy-restore",
        "nsenter",
    ]
    .iter()
    .all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if root && tools {
        return true;
    }
    let why = if root {
        "iptables/iproute2/util-linux tools missing (apt-get install -y iptables iproute2)"
    } else {
        "needs root"
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {why}; CI=true requires the privileged tests to run");
    }
    eprintln!("SKIPPED {test}: {why}");
    false
}

fn sh(cmd: &[&str]) -> Output {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn must(cmd: &[&str]) -> String {
    let out = sh(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A pod namespace and a peer namespace joined by a veth pair; both deleted on drop.
///
/// Pod: `10.<n>.0.2/24`, `fd77:<n>::2/64` on `eth0`; each side's default route is the other.
/// Peer: `10.<n>.0.1/24`, `fd77:<n>::1/64`.
pub struct Pair {
    pub pod: String,
    pub peer: String,
    pub n: u32,
}

impl Pair {
    pub fn new(ipv6: bool) -> Pair {
        // Names unique per process and test; addresses only need to be unique per pair, since
        // each pair is its own isolated pair of namespaces.
        let id = COUNTER.fetch_add(1, Ordering::SeqCst);
        let n = id % 250 + 1;
        let tag = format!("{}x{id}", std::process::id() % 100000);
        let pair = Pair {
            pod: format!("fpod{tag}"),
            peer: format!("fpeer{tag}"),
            n,
        };
        for ns in [&pair.pod, &pair.peer] {
            let _ = sh(&["ip", "netns", "del", ns]);
            must(&["ip", "netns", "add", ns]);
            must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        must(&[
            "ip", "-n", &pair.pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", &pair.peer,
        ]);
        for (ns, host) in [(&pair.pod, 2), (&pair.peer, 1)] {
            must(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("10.{n}.0.{host}/24"),
                "dev",
                "eth0",
            ]);
            if ipv6 {
                must(&[
                    "ip",
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("fd77:{n}::{host}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ]);
            }
            must(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
        }
        // Both ends get a default route through the other, as pods have one: what neither
        // namespace holds bounces between the two and never leaves them.
        let route = |ns: &str, via: String, v6: bool| {
            let fam = if v6 { "-6" } else { "-4" };
            must(&["ip", "-n", ns, fam, "route", "add", "default", "via", &via]);
        };
        route(&pair.pod, format!("10.{n}.0.1"), false);
        route(&pair.peer, format!("10.{n}.0.2"), false);
        if ipv6 {
            route(&pair.pod, format!("fd77:{n}::1"), true);
            route(&pair.peer, format!("fd77:{n}::2"), true);
        }
        pair
    }

    pub fn pod_ip(&self) -> String {
        format!("10.{}.0.2", self.n)
    }
    pub fn peer_ip(&self) -> String {
        format!("10.{}.0.1", self.n)
    }
    pub fn pod_ip6(&self) -> String {
        format!("fd77:{}::2", self.n)
    }
    pub fn peer_ip6(&self) -> String {
        format!("fd77:{}::1", self.n)
    }

    /// Run a command inside a namespace (as root).
    pub fn exec(&self, ns: &str, cmd: &[&str]) -> Output {
        let mut args = vec!["netns", "exec", ns];
        args.extend_from_slice(cmd);
        Command::new("ip")
            .args(&args)
            .output()
            .expect("ip netns exec")
    }

    /// Run a command inside a namespace under a UID/GID (like an app container or the proxy).
    pub fn exec_as(&self, ns: &str, uid: u32, cmd: &[&str]) -> Output {
        let path = format!("--net=/var/run/netns/{ns}");
        let (u, g) = (uid.to_string(), uid.to_string());
        let mut args = vec![path.as_str(), "-S", &u, "-G", &g];
        args.extend_from_slice(cmd);
        Command::new("nsenter")
            .args(&args)
            .output()
            .expect("nsenter")
    }

    /// `iptables-save` (or another save tool) output inside the pod.
    pub fn save(&self, tool: &str) -> String {
        let out = self.exec(&self.pod, &[tool]);
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.peer] {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

/// One connection a [`Listeners`] set saw.
#[derive(Clone, Debug)]
pub struct Arrival {
    /// Port of the listener that accepted it.
    pub port: u16,
    /// Local address of the accepted connection (under TPROXY: the original destination).
    pub local: Option<SocketAddr>,
    pub token: String,
    /// `SO_ORIGINAL_DST`: the address the client dialled before NAT.
    pub orig_dst: Option<SocketAddr>,
}

/// TCP listeners inside a namespace that record every arrival and answer `port=<port>`.
pub struct Listeners {
    rx: mpsc::Receiver<Arrival>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Listeners {
    /// Bind each address inside `ns` (IPv6 addresses are v6-only).
    pub fn start(ns: &str, addrs: &[SocketAddr]) -> Listeners {
        Self::start_with(ns, addrs, false)
    }

    /// Like [`Listeners::start`], with `IP_TRANSPARENT` set (what a TPROXY listener needs).
    pub fn start_transparent(ns: &str, addrs: &[SocketAddr]) -> Listeners {
        Self::start_with(ns, addrs, true)
    }

    fn start_with(ns: &str, addrs: &[SocketAddr], transparent: bool) -> Listeners {
        let path = format!("/var/run/netns/{ns}");
        let addrs = addrs.to_vec();
        let sockets: Vec<TcpListener> = thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(f, CloneFlags::CLONE_NEWNET).expect("setns into test namespace");
            addrs
                .iter()
                .map(|a| {
                    let s =
                        Socket::new(Domain::for_address(*a), Type::STREAM, None).expect("socket");
                    if a.is_ipv6() {
                        s.set_only_v6(true).expect("v6only");
                    }
                    s.set_reuse_address(true).expect("reuseaddr");
                    if transparent {
                        if a.is_ipv6() {
                            s.set_ip_transparent_v6(true).expect("IPV6_TRANSPARENT");
                        } else {
                            s.set_ip_transparent_v4(true).expect("IP_TRANSPARENT");
                        }
                    }
                    s.bind(&(*a).into())
                        .unwrap_or_else(|e| panic!("bind {a}: {e}"));
                    s.listen(64).expect("listen");
                    s.set_nonblocking(true).expect("nonblocking");
                    TcpListener::from(s)
                })
                .collect()
        })
        .join()
        .expect("listener thread");
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let threads = sockets
            .into_iter()
            .map(|l| {
                let (tx, stop) = (tx.clone(), stop.clone());
                thread::spawn(move || serve(l, tx, stop))
            })
            .collect();
        Listeners { rx, stop, threads }
    }

    /// The arrival carrying `token`, if one comes within 3 s.
    pub fn wait_for(&self, token: &str) -> Option<Arrival> {
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok(a) if a.token == token => return Some(a),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    }
}

impl Drop for Listeners {
    /// Returns only once every socket is closed, so the ports are free for what comes next.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve(l: TcpListener, tx: mpsc::Sender<Arrival>, stop: Arc<AtomicBool>) {
    let port = l.local_addr().map(|a| a.port()).unwrap_or_default();
    while !stop.load(Ordering::Relaxed) {
        let Ok((s, _)) = l.accept() else {
            thread::sleep(Duration::from_millis(5));
            continue;
        };
        let sock = socket2::SockRef::from(&s);
        let orig = if s.local_addr().is_ok_and(|a| a.is_ipv6()) {
            sock.original_dst_v6()
        } else {
            sock.original_dst_v4()
        };
        let orig_dst = orig.ok().and_then(|a| a.as_socket());
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut line = String::new();
        let mut reader = BufReader::new(&s);
        let _ = reader.read_line(&mut line);
        let _ = (&s).write_all(format!("port={port}\n").as_bytes());
        let _ = tx.send(Arrival {
            port,
            local: s.local_addr().ok(),
            token: line.trim().to_owned(),
            orig_dst,
        });
    }
}

/// A listening socket created inside `ns` (the socket keeps that namespace).
pub fn bind_in(ns: &str, addr: SocketAddr) -> std::net::TcpListener {
    let path = format!("/var/run/netns/{ns}");
    thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(f, CloneFlags::CLONE_NEWNET).expect("setns");
        let l = std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        l.set_nonblocking(true).expect("nonblocking");
        l
    })
    .join()
    .expect("bind thread")
}

/// Run an async client inside `ns` on its own thread and runtime (as root: an ordinary app UID for
/// the capture rules), returning its result. Sockets it opens belong to that namespace.
pub fn run_in<T, F>(ns: &str, f: impl FnOnce() -> F + Send + 'static) -> T
where
    F: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let path = format!("/var/run/netns/{ns}");
    thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(file, CloneFlags::CLONE_NEWNET).expect("setns");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(f())
    })
    .join()
    .expect("client thread")
}

/// A child process killed (and reaped) on drop.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh token per connection attempt, so arrivals can't be confused.
pub fn token(label: &str) -> String {
    format!(
        "{label}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}
