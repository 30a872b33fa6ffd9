//! The lab's system edges: running `ip`/`iptables-restore`, entering a network namespace,
//! creating the node and pod networks, and sweeping away everything a lab created.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use nix::sched::CloneFlags;

use super::{Lab, LabError, NODE_IP, POD_PREFIX, io_err};

/// Run a command to completion; its stdout, or an error carrying its stderr.
pub fn run(cmd: &[&str]) -> Result<String, LabError> {
    run_input(cmd, None)
}

/// Like [`run`], feeding `input` on stdin.
pub fn run_input(cmd: &[&str], input: Option<&str>) -> Result<String, LabError> {
    let shown = cmd.join(" ");
    let mut child = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LabError::Command {
            cmd: shown.clone(),
            msg: e.to_string(),
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(io_err(format!("writing to {shown}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(io_err(format!("waiting for {shown}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(LabError::Command {
            cmd: shown,
            msg: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Move the calling thread into a named network namespace (sockets it creates stay there).
pub fn enter(netns: &str) -> Result<(), LabError> {
    let path = format!("/var/run/netns/{netns}");
    let f = std::fs::File::open(&path).map_err(io_err(format!("opening {path}")))?;
    nix::sched::setns(f, CloneFlags::CLONE_NEWNET).map_err(|e| LabError::Io {
        what: format!("entering network namespace {netns}"),
        source: e.into(),
    })
}

/// Names of the network namespaces that exist.
pub fn netns_list() -> Vec<String> {
    run(&["ip", "netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// The node: a namespace with the pod bridge, forwarding on, and kube-proxy's chains hooked in.
pub fn create_node(lab: &Lab) -> Result<(), LabError> {
    let node = lab.node_ns();
    run(&["ip", "netns", "add", &node])?;
    run(&["ip", "-n", &node, "link", "set", "lo", "up"])?;
    run(&["ip", "-n", &node, "link", "add", "cbr0", "type", "bridge"])?;
    run(&[
        "ip",
        "-n",
        &node,
        "addr",
        "add",
        &format!("{NODE_IP}/{POD_PREFIX}"),
        "dev",
        "cbr0",
    ])?;
    run(&["ip", "-n", &node, "link", "set", "cbr0", "up"])?;
    // The node's own connections to ClusterIPs (node ports, probes) need a route for the
    // Service range before kube-proxy's OUTPUT DNAT can rewrite them.
    run(&[
        "ip",
        "-n",
        &node,
        "route",
        "add",
        "10.96.0.0/16",
        "dev",
        "cbr0",
    ])?;
    run(&[
        "ip",
        "netns",
        "exec",
        &node,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ])?;
    let base = super::model::kube_proxy_rules(&[], &[])
        .replace(
            ":LAB-POSTROUTING - [0:0]\n",
            ":LAB-POSTROUTING - [0:0]\n-A PREROUTING -j LAB-SERVICES\n-A OUTPUT -j LAB-SERVICES\n-A POSTROUTING -j LAB-POSTROUTING\n",
        )
        .replace(
            ":LAB-NOENDPOINTS - [0:0]\n",
            ":LAB-NOENDPOINTS - [0:0]\n-A INPUT -j LAB-NOENDPOINTS\n-A FORWARD -j LAB-NOENDPOINTS\n-A OUTPUT -j LAB-NOENDPOINTS\n",
        );
    run_input(
        &["ip", "netns", "exec", &node, "iptables-restore"],
        Some(&base),
    )?;
    write_netns_files(&node, "127.0.0.1\tlocalhost\n", "default")?;
    Ok(())
}

/// Replace kube-proxy's rules in the node (only the lab's own chains are rewritten).
pub fn apply_kube_proxy(lab: &Lab, rules: &str) -> Result<(), LabError> {
    run_input(
        &[
            "ip",
            "netns",
            "exec",
            &lab.node_ns(),
            "iptables-restore",
            "--noflush",
        ],
        Some(rules),
    )
    .map(drop)
}

/// A pod's sandbox: its namespace, a veth to the bridge, its address and default route.
pub fn create_pod_net(lab: &Lab, ip: Ipv4Addr) -> Result<String, LabError> {
    let ns = lab.pod_ns(ip);
    let node = lab.node_ns();
    let o = ip.octets();
    let veth = format!("veth{}x{}", o[2], o[3]);
    run(&["ip", "netns", "add", &ns])?;
    run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
    run(&[
        "ip", "-n", &node, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
        &ns,
    ])?;
    run(&[
        "ip", "-n", &node, "link", "set", &veth, "master", "cbr0", "up",
    ])?;
    run(&[
        "ip",
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{ip}/{POD_PREFIX}"),
        "dev",
        "eth0",
    ])?;
    run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
    run(&[
        "ip",
        "-n",
        &ns,
        "route",
        "add",
        "default",
        "via",
        &NODE_IP.to_string(),
    ])?;
    Ok(ns)
}

/// `/etc/netns/<ns>/{hosts,resolv.conf}`: what `ip netns exec` shows the pod's processes as
/// `/etc/hosts` and `/etc/resolv.conf`. Written in place, so running processes see updates.
pub fn write_netns_files(netns: &str, hosts: &str, namespace: &str) -> Result<(), LabError> {
    let dir = format!("/etc/netns/{netns}");
    std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {dir}")))?;
    std::fs::write(format!("{dir}/hosts"), hosts)
        .map_err(io_err(format!("writing {dir}/hosts")))?;
    // No cluster DNS server: names resolve from the hosts file; anything else fails fast
    // (nothing listens on the pod's own port 53) instead of leaking to the host's resolver.
    let resolv = format!(
        "search {namespace}.svc.cluster.local svc.cluster.local cluster.local\nnameserver 127.0.0.1\noptions ndots:5 timeout:1 attempts:1\n"
    );
    std::fs::write(format!("{dir}/resolv.conf"), resolv)
        .map_err(io_err(format!("writing {dir}/resolv.conf")))
}

/// Remove a pod's namespace and its `/etc/netns` files.
pub fn delete_netns(netns: &str) {
    let _ = run(&["ip", "netns", "del", netns]);
    let _ = std::fs::remove_dir_all(format!("/etc/netns/{netns}"));
}

/// Whether `pid` is a live `ferry-lab` process (so a recycled pid is never signalled).
pub fn is_lab_process(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("ferry-lab"))
}

/// The daemon's pid, if it is running.
pub fn daemon_pid(lab: &Lab) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(lab.pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    is_lab_process(pid).then_some(pid)
}

/// What a sweep removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub namespaces: usize,
    pub processes: usize,
    pub state_dir: bool,
}

impl Swept {
    pub fn is_empty(&self) -> bool {
        *self == Swept::default()
    }
}

/// Remove everything of this lab that is left: processes in its namespaces (and its daemon),
/// the namespaces (which takes their interfaces and iptables rules with them), the
/// `/etc/netns` files and the state directory. Safe to run at any time; idempotent.
pub fn sweep(lab: &Lab) -> Swept {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let mut swept = Swept::default();
    if let Some(pid) = daemon_pid(lab) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        swept.processes += 1;
    }
    let mine: Vec<String> = netns_list()
        .into_iter()
        .filter(|n| n.starts_with(&lab.prefix()))
        .collect();
    for ns in &mine {
        for pid in run(&["ip", "netns", "pids", ns])
            .unwrap_or_default()
            .lines()
        {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                swept.processes += 1;
            }
        }
    }
    // Killed processes release the namespaces' sockets; give them a moment to be reaped.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while mine.iter().any(|ns| {
        !run(&["ip", "netns", "pids", ns])
            .unwrap_or_default()
            .trim()
            .is_empty()
    }) && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for ns in &mine {
        delete_netns(ns);
        swept.namespaces += 1;
    }
    if let Ok(entries) = std::fs::read_dir("/etc/netns") {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&lab.prefix()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if lab.dir.exists() {
        let _ = std::fs::remove_dir_all(&lab.dir);
        swept.state_dir = true;
    }
    swept
}
