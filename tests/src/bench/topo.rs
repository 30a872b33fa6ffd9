//! The benchmark's world: two pod network namespaces joined by a veth pair, the app (nginx,
//! iperf3) in the server pod, `ferry-init`'s real capture rules, processes pinned to CPUs and
//! started in a namespace as a chosen user, and the `/proc` sampler that measures the proxies.
//! Everything made here is removed on drop (and by the next run if a run was killed).

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The proxies' user and group (Istio's istio-proxy).
pub const PROXY_UID: u32 = 1337;
pub const APP_H1: u16 = 8080;
pub const APP_H2: u16 = 8081;
pub const APP_TCP: u16 = 5201;
/// The app's response body, bytes (Istio's published benchmarks use 1 kB).
pub const BODY_BYTES: usize = 1024;

/// Run a command to completion (the lab's runner); its stderr in the error.
pub fn run(cmd: &[&str]) -> Result<String, String> {
    crate::lab::net::run(cmd).map_err(|e| e.to_string())
}

/// Where and as whom a process runs.
#[derive(Clone, Debug)]
pub struct Place<'a> {
    pub netns: &'a str,
    /// `taskset -c` CPU list ("" = not pinned).
    pub cpus: &'a str,
    /// Run as this uid/gid (None: root).
    pub uid: Option<u32>,
}

impl Place<'_> {
    /// The command line that runs `argv` here.
    fn wrap(&self, argv: &[String]) -> Vec<String> {
        let mut v = vec![
            "nsenter".to_owned(),
            format!("--net=/var/run/netns/{}", self.netns),
        ];
        if let Some(uid) = self.uid {
            v.extend(["-S".into(), uid.to_string(), "-G".into(), uid.to_string()]);
        }
        if !self.cpus.is_empty() {
            v.extend(["taskset".into(), "-c".into(), self.cpus.to_owned()]);
        }
        v.extend(argv.iter().cloned());
        v
    }

    /// Run to completion within `limit`; stdout, or why not.
    pub fn output(&self, argv: &[String], limit: Duration) -> Result<String, String> {
        let mut cmd = vec!["timeout".to_owned(), "-k".into(), "5".into()];
        cmd.push(format!("{}", limit.as_secs().max(1)));
        cmd.extend(self.wrap(argv));
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        run(&args)
    }

    /// Start in the background, in a process group of its own, output to `log`.
    pub fn spawn(
        &self,
        argv: &[String],
        env: &[(String, String)],
        log: &Path,
    ) -> Result<Proc, String> {
        let w = self.wrap(argv);
        let file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = file.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(&w[0])
            .args(&w[1..])
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("starting {argv:?}: {e}"))?;
        Ok(Proc {
            child,
            name: argv.first().cloned().unwrap_or_default(),
            log: log.to_owned(),
        })
    }
}

/// A background process group: SIGTERM, then SIGKILL, on drop.
pub struct Proc {
    child: std::process::Child,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    /// Whether it already exited (with its log's tail).
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "{} exited ({status}); log {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 20)
            )),
            _ => None,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, killpg};
        use nix::unistd::Pid;
        let pgid = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(pgid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The TCP congestion control, a per-namespace setting a new namespace copies from the host.
const CONGESTION: &str = "net.ipv4.tcp_congestion_control";

/// Set a sysctl inside `ns`.
fn sysctl(ns: &str, key: &str, value: &str) -> Result<(), String> {
    run(&[
        "ip",
        "netns",
        "exec",
        ns,
        "sysctl",
        "-q",
        "-w",
        &format!("{key}={value}"),
    ])
    .map(drop)
}

/// The two pods.
pub struct Topology {
    pub client_ns: String,
    pub server_ns: String,
    pub client_ip: String,
    pub server_ip: String,
    pub state: PathBuf,
    pub sut_cpus: String,
    /// The pods' TCP congestion control (`net.ipv4.tcp_congestion_control`, per namespace).
    pub congestion: String,
    app: Vec<Proc>,
}

impl Topology {
    /// Create both namespaces, the link, and start the app (pinned to `sut_cpus`). `congestion`
    /// sets the pods' TCP congestion control; empty keeps the kernel's choice for a new
    /// namespace (the host's default).
    pub fn up(
        prefix: &str,
        subnet: &str,
        state: &Path,
        sut_cpus: &str,
        congestion: &str,
    ) -> Result<Topology, String> {
        let (client_ns, server_ns) = (format!("{prefix}-client"), format!("{prefix}-server"));
        Self::remove(&client_ns, &server_ns);
        std::fs::create_dir_all(state).map_err(|e| format!("{}: {e}", state.display()))?;
        let mut t = Topology {
            client_ip: format!("{subnet}.1"),
            server_ip: format!("{subnet}.2"),
            client_ns,
            server_ns,
            state: state.to_owned(),
            sut_cpus: sut_cpus.to_owned(),
            congestion: String::new(),
            app: Vec::new(),
        };
        for ns in [&t.client_ns, &t.server_ns] {
            run(&["ip", "netns", "add", ns])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            // Ephemeral ports away from the proxies' 150xx (a random bind of 15008 by a
            // client socket would break a proxy's listen), and TIME_WAIT reuse for the
            // connection-churn scenario (tens of thousands of short connections).
            for (k, v) in [
                ("net.ipv4.ip_local_port_range", "32768 60999"),
                ("net.ipv4.ip_local_reserved_ports", "15000-15100"),
                ("net.ipv4.tcp_tw_reuse", "1"),
            ] {
                sysctl(ns, k, v)?;
            }
            if !congestion.is_empty() {
                sysctl(ns, CONGESTION, congestion)
                    .map_err(|e| format!("--tcp-congestion {congestion}: {e}"))?;
            }
        }
        t.congestion = t.pods_congestion()?;
        run(&[
            "ip",
            "-n",
            &t.client_ns,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &t.server_ns,
        ])?;
        for (ns, ip) in [(&t.client_ns, &t.client_ip), (&t.server_ns, &t.server_ip)] {
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
        }
        t.start_app()?;
        Ok(t)
    }

    /// The congestion control both pods use (they must agree: one figure per run).
    fn pods_congestion(&self) -> Result<String, String> {
        let read = |ns: &str| {
            run(&["ip", "netns", "exec", ns, "sysctl", "-n", CONGESTION])
                .map(|v| v.trim().to_owned())
        };
        let (c, s) = (read(&self.client_ns)?, read(&self.server_ns)?);
        if c != s {
            return Err(format!(
                "the pods' TCP congestion control differs: {c} (client), {s} (server)"
            ));
        }
        Ok(c)
    }

    fn start_app(&mut self) -> Result<(), String> {
        let dir = self.state.join("app");
        std::fs::create_dir_all(dir.join("www")).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("www/body"), "x".repeat(BODY_BYTES)).map_err(|e| e.to_string())?;
        let d = dir.display();
        let conf = format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 16384; }}\n\
             http {{\n  access_log off;\n  default_type application/octet-stream;\n\
             keepalive_requests 100000000;\n  keepalive_timeout 600s;\n  http2_max_concurrent_streams 1024;\n\
             client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n\
             uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n  tcp_nodelay on;\n\
             # Served from memory: nginx's sendfile path corks h2 DATA frames (Nagle stalls).\n\
             sendfile off;\n\
             server {{ listen {APP_H1} backlog=4096; root {d}/www; location / {{ try_files /body =404; }} }}\n\
             server {{ listen {APP_H2} http2 backlog=4096; root {d}/www; location / {{ try_files /body =404; }} }}\n}}\n"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).map_err(|e| e.to_string())?;
        let here = Place {
            netns: &self.server_ns,
            cpus: &self.sut_cpus,
            uid: None,
        };
        let argv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let conf_path = path.display().to_string();
        let prefix = dir.display().to_string();
        self.app.push(here.spawn(
            &argv(&[
                "nginx",
                "-c",
                &conf_path,
                "-p",
                &prefix,
                "-e",
                &format!("{prefix}/error.log"),
            ]),
            &[],
            &dir.join("nginx.log"),
        )?);
        self.app.push(here.spawn(
            &argv(&["iperf3", "-s", "-p", &APP_TCP.to_string()]),
            &[],
            &dir.join("iperf3.log"),
        )?);
        for port in [APP_H1, APP_H2, APP_TCP] {
            wait_listening(&self.server_ns, port, Duration::from_secs(10)).map_err(|e| {
                let logs: Vec<String> = self.app.iter_mut().filter_map(Proc::exited).collect();
                format!("app: {e}\n{}", logs.join("\n"))
            })?;
        }
        Ok(())
    }

    /// Install (`true`) or remove `ferry-init`'s capture rules in both pods.
    pub fn capture(&self, init: &Path, on: bool) -> Result<(), String> {
        let bin = init.display().to_string();
        for ns in [&self.client_ns, &self.server_ns] {
            let mut cmd = vec!["ip", "netns", "exec", ns, &bin];
            if on {
                cmd.extend_from_slice(ferry_init::spec::INJECTED_DEFAULT_ARGS);
            } else {
                cmd.extend_from_slice(&["istio-iptables", "--cleanup-only"]);
            }
            run(&cmd).map_err(|e| format!("ferry-init in {ns}: {e}"))?;
        }
        Ok(())
    }

    fn remove(client: &str, server: &str) {
        for ns in [client, server] {
            // Processes left in a namespace from a killed run hold nothing once it is gone.
            let _ = run(&["ip", "netns", "pids", ns]).map(|pids| {
                for pid in pids.split_whitespace() {
                    let _ = run(&["kill", "-9", pid]);
                }
            });
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.app.clear();
        Self::remove(&self.client_ns, &self.server_ns);
    }
}

/// Wait until something listens on TCP `port` in `netns`.
pub fn wait_listening(netns: &str, port: u16, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        let out = run(&[
            "ip",
            "netns",
            "exec",
            netns,
            "ss",
            "-Hltn",
            &format!("sport = :{port}"),
        ])?;
        if !out.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "nothing listens on :{port} in {netns} after {limit:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// CPU and memory of the proxies: every process of uid 1337 in the two pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// user + system CPU seconds of all proxy processes.
    pub cpu_s: f64,
    /// Peak of the summed RSS of the proxy processes, MiB.
    pub rss_peak_mib: f64,
    /// Peak of their summed anonymous (private: heap, stacks) RSS, MiB. The rest of RSS is
    /// the binary's and libraries' pages, shared through the page cache by every sidecar on a
    /// node running the same image.
    #[serde(default)]
    pub anon_peak_mib: f64,
    /// How many proxy processes were seen.
    pub procs: usize,
}

/// The network namespace inode of each pod.
fn ns_inodes(names: &[&str]) -> Vec<u64> {
    names
        .iter()
        .filter_map(|n| std::fs::metadata(format!("/var/run/netns/{n}")).ok())
        .map(|m| m.ino())
        .collect()
}

/// One proxy process now.
#[derive(Clone, Copy, Debug)]
pub struct ProcSample {
    pub pid: u32,
    pub cpu_s: f64,
    pub rss: u64,
    pub anon: u64,
}

/// The proxy processes now.
pub fn proxy_procs(netns: &[&str]) -> Vec<ProcSample> {
    let inodes = ns_inodes(netns);
    let tick = 100.0; // USER_HZ on Linux
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let base = PathBuf::from(format!("/proc/{pid}"));
            let meta = std::fs::metadata(&base).ok()?;
            if meta.uid() != PROXY_UID {
                return None;
            }
            let ns = std::fs::metadata(base.join("ns/net")).ok()?.ino();
            if !inodes.contains(&ns) {
                return None;
            }
            let stat = std::fs::read_to_string(base.join("stat")).ok()?;
            // Fields after the command name (which may hold spaces) start at index 2.
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let cpu = (f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / tick;
            let status = std::fs::read_to_string(base.join("status")).ok()?;
            let kb = |field: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(field))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            Some(ProcSample {
                pid,
                cpu_s: cpu,
                rss: kb("VmRSS:") * 1024,
                anon: kb("RssAnon:") * 1024,
            })
        })
        .collect()
}

/// Samples the proxies every 250 ms from `start` until `stop`.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    result: Arc<Mutex<Usage>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub fn start(netns: [String; 2]) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let result = Arc::new(Mutex::new(Usage::default()));
        let (s, r) = (stop.clone(), result.clone());
        let thread = std::thread::spawn(move || {
            let names = [netns[0].as_str(), netns[1].as_str()];
            let first: std::collections::HashMap<u32, f64> = proxy_procs(&names)
                .into_iter()
                .map(|p| (p.pid, p.cpu_s))
                .collect();
            let mut last = std::collections::HashMap::new();
            let (mut peak, mut anon) = (0u64, 0u64);
            loop {
                let now = proxy_procs(&names);
                peak = peak.max(now.iter().map(|p| p.rss).sum());
                anon = anon.max(now.iter().map(|p| p.anon).sum());
                for p in &now {
                    last.insert(p.pid, p.cpu_s);
                }
                let done = s.load(Ordering::SeqCst);
                if done {
                    let cpu: f64 = last
                        .iter()
                        .map(|(pid, c)| c - first.get(pid).copied().unwrap_or(0.0))
                        .sum();
                    *r.lock().unwrap_or_else(|p| p.into_inner()) = Usage {
                        cpu_s: cpu,
                        rss_peak_mib: peak as f64 / (1024.0 * 1024.0),
                        anon_peak_mib: anon as f64 / (1024.0 * 1024.0),
                        procs: last.len(),
                    };
                    return;
                }
                // Short sleeps so stopping is prompt; a sample every 250 ms.
                for _ in 0..5 {
                    if s.load(Ordering::SeqCst) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        Sampler {
            stop,
            result,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> Usage {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        *self.result.lock().unwrap_or_else(|p| p.into_inner())
    }
}
