//! The lab's kubelet: one task per Pod. It creates the Pod's sandbox (network namespace, veth,
//! address, hosts file), runs init containers to completion in order (native sidecars —
//! `restartPolicy: Always` init containers — are started and must pass their startup probe
//! before the next one), starts the containers, supervises restarts with back-off, runs startup
//! and readiness probes, writes the Pod's status, and on deletion stops app containers before
//! sidecars (SIGTERM, then SIGKILL after the grace period) and removes the sandbox.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::watch;

use super::daemon::Ctx;
use super::model::{self, ProcessPlan, Program};
use super::{NODE_IP, net};

/// (netns, namespace, pod name, IP): where a Pod's hosts file goes and what it is about.
pub type DnsTarget = (String, String, String, Ipv4Addr);

/// A running Pod's handle in the kubelet.
pub struct PodRuntime {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// (netns, namespace, pod name, IP) once the sandbox exists.
    info: Arc<Mutex<Option<DnsTarget>>>,
}

impl PodRuntime {
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    pub async fn join(self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.task).await;
    }

    /// Where this Pod's hosts file goes, and what it is about.
    pub fn dns_target(&self) -> Option<DnsTarget> {
        self.info.lock().expect("info").clone()
    }
}

pub fn start(ctx: Arc<Ctx>, pod: Value) -> PodRuntime {
    let (tx, rx) = watch::channel(false);
    let info = Arc::new(Mutex::new(None));
    let task = tokio::spawn(run_pod(ctx, pod, info.clone(), rx));
    PodRuntime {
        stop: tx,
        task,
        info,
    }
}

/// One container's live state.
struct Ctr {
    name: String,
    spec: Value,
    plan: ProcessPlan,
    state: Mutex<CState>,
}

#[derive(Default)]
struct CState {
    running: bool,
    /// Startup probe passed (or there is none) since the last start.
    started: bool,
    ready: bool,
    restarts: u32,
    waiting: Option<(String, String)>,
    exit: Option<i32>,
    /// Will not be started again (restartPolicy Never/OnFailure).
    finished: bool,
}

struct PodCtx {
    ctx: Arc<Ctx>,
    pod: Value,
    ns: String,
    name: String,
    netns: String,
    ip: Ipv4Addr,
    grace: Duration,
}

fn program_lookup(ctx: &Ctx) -> impl Fn(&str) -> Option<String> + '_ {
    move |cmd: &str| {
        if cmd.contains('/') {
            return std::path::Path::new(cmd).exists().then(|| cmd.to_owned());
        }
        ctx.lab
            .path_env()
            .split(':')
            .map(|d| PathBuf::from(d).join(cmd))
            .find(|p| p.is_file())
            .map(|p| p.to_string_lossy().into_owned())
    }
}

async fn run_pod(
    ctx: Arc<Ctx>,
    pod: Value,
    info: Arc<Mutex<Option<DnsTarget>>>,
    mut stop: watch::Receiver<bool>,
) {
    let ns = pod["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let name = pod["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let host_network = pod["spec"]["hostNetwork"] == json!(true);
    let (netns, ip) = if host_network {
        (ctx.lab.node_ns(), NODE_IP)
    } else {
        let ip = ctx.alloc_pod_ip();
        let lab = ctx.lab.clone();
        match tokio::task::spawn_blocking(move || net::create_pod_net(&lab, ip)).await {
            Ok(Ok(netns)) => (netns, ip),
            Ok(Err(e)) => {
                net::delete_netns(&ctx.lab.pod_ns(ip));
                set_status(
                    &ctx,
                    &ns,
                    &name,
                    json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False", "reason": "FailedCreatePodSandBox", "message": e.to_string()}]}),
                );
                let _ = stop.changed().await;
                return;
            }
            Err(_) => return,
        }
    };
    let hosts = ctx.hosts_for(&ns, &name, ip);
    if net::write_netns_files(&netns, &hosts, &ns).is_ok() {
        ctx.remember_hosts(&netns, hosts);
    }
    *info.lock().expect("info") = Some((netns.clone(), ns.clone(), name.clone(), ip));
    let grace = Duration::from_secs(
        pod["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30)
            .min(10),
    );
    let p = Arc::new(PodCtx {
        ctx: ctx.clone(),
        pod: pod.clone(),
        ns,
        name,
        netns,
        ip,
        grace,
    });
    lifecycle(&p, &mut stop).await;
    if !host_network {
        net::delete_netns(&p.netns);
    }
    ctx.forget_hosts(&p.netns);
}

fn set_status(ctx: &Ctx, ns: &str, name: &str, st: Value) {
    ctx.api.update("Pod", ns, name, |p| p["status"] = st);
}

fn plan(p: &PodCtx, c: &Value) -> Result<ProcessPlan, String> {
    model::plan_process(&p.pod, c, p.ip, &p.ctx.node, &program_lookup(&p.ctx))
}

async fn lifecycle(p: &Arc<PodCtx>, stop: &mut watch::Receiver<bool>) {
    let spec = &p.pod["spec"];
    let restart_policy = spec["restartPolicy"]
        .as_str()
        .unwrap_or("Always")
        .to_owned();
    let (side_tx, side_rx) = watch::channel(false);
    let (app_tx, app_rx) = watch::channel(false);
    let mut sidecars: Vec<Arc<Ctr>> = Vec::new();
    let mut inits: Vec<Value> = Vec::new();
    let mut tasks = Vec::new();
    let mut app_tasks = Vec::new();
    let init_specs: Vec<Value> = spec["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut failed_init = false;
    for c in &init_specs {
        let cname = c["name"].as_str().unwrap_or_default().to_owned();
        let plan = match plan(p, c) {
            Ok(pl) => pl,
            Err(msg) => {
                inits.push(json!({"name": cname, "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "CreateContainerConfigError", "message": msg}}}));
                failed_init = true;
                break;
            }
        };
        let ctr = Arc::new(Ctr {
            name: cname.clone(),
            spec: c.clone(),
            plan,
            state: Mutex::new(CState::default()),
        });
        if c["restartPolicy"].as_str() == Some("Always") {
            tasks.push(tokio::spawn(supervise(
                p.clone(),
                ctr.clone(),
                "Always".into(),
                side_rx.clone(),
            )));
            sidecars.push(ctr.clone());
            // The next init container starts once this sidecar has started.
            loop {
                write_status(p, &inits, &sidecars, &[], "Pending");
                if probe_round(p, &ctr).await && ctr.state.lock().expect("state").started {
                    break;
                }
                tokio::select! {
                    _ = stop.changed() => { shutdown(app_tx, app_tasks, side_tx, tasks).await; return; }
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            continue;
        }
        let code = tokio::select! {
            c = run_to_completion(p, &ctr) => c,
            _ = stop.changed() => { shutdown(app_tx, app_tasks, side_tx, tasks).await; return; }
        };
        let ok = code == Ok(0);
        let terminated = match code {
            Ok(0) => json!({"terminated": {"exitCode": 0, "reason": "Completed"}}),
            Ok(n) => json!({"terminated": {"exitCode": n, "reason": "Error"}}),
            Err(msg) => json!({"waiting": {"reason": "RunContainerError", "message": msg}}),
        };
        inits.push(json!({"name": cname, "ready": ok, "restartCount": 0, "state": terminated}));
        if !ok {
            failed_init = true;
            break;
        }
    }
    if failed_init {
        // Like a kubelet in back-off: the pod stays Pending with the failed init container's
        // status (and its log) until it is deleted.
        write_status(p, &inits, &sidecars, &[], "Pending");
        let _ = stop.changed().await;
        shutdown(app_tx, app_tasks, side_tx, tasks).await;
        return;
    }
    let mut apps: Vec<Arc<Ctr>> = Vec::new();
    let mut config_errors: Vec<Value> = Vec::new();
    for c in spec["containers"].as_array().into_iter().flatten() {
        let cname = c["name"].as_str().unwrap_or_default().to_owned();
        match plan(p, c) {
            Ok(plan) => {
                let ctr = Arc::new(Ctr {
                    name: cname,
                    spec: c.clone(),
                    plan,
                    state: Mutex::new(CState::default()),
                });
                app_tasks.push(tokio::spawn(supervise(p.clone(), ctr.clone(), restart_policy.clone(), app_rx.clone())));
                apps.push(ctr);
            }
            Err(msg) => config_errors.push(json!({"name": cname, "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "CreateContainerConfigError", "message": msg}}})),
        }
    }
    loop {
        for c in sidecars.iter().chain(apps.iter()) {
            probe_round(p, c).await;
        }
        let all_done = !apps.is_empty()
            && config_errors.is_empty()
            && apps.iter().all(|c| c.state.lock().expect("state").finished);
        let phase = if all_done {
            let ok = apps
                .iter()
                .all(|c| c.state.lock().expect("state").exit == Some(0));
            if ok { "Succeeded" } else { "Failed" }
        } else {
            "Running"
        };
        write_status_with(p, &inits, &sidecars, &apps, &config_errors, phase);
        if all_done {
            // Native sidecars end when the app containers have finished (Jobs complete).
            let _ = side_tx.send(true);
            for t in tasks.drain(..) {
                let _ = t.await;
            }
            write_status_with(p, &inits, &sidecars, &apps, &config_errors, phase);
            let _ = stop.changed().await;
            shutdown(app_tx, app_tasks, side_tx, tasks).await;
            return;
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    shutdown(app_tx, app_tasks, side_tx, tasks).await;
}

/// App containers first, then sidecars (as Kubernetes orders native sidecars' termination).
async fn shutdown(
    app_tx: watch::Sender<bool>,
    app_tasks: Vec<tokio::task::JoinHandle<()>>,
    side_tx: watch::Sender<bool>,
    side_tasks: Vec<tokio::task::JoinHandle<()>>,
) {
    let _ = app_tx.send(true);
    for t in app_tasks {
        let _ = t.await;
    }
    let _ = side_tx.send(true);
    for t in side_tasks {
        let _ = t.await;
    }
}

fn command(p: &PodCtx, ctr: &Ctr) -> Result<tokio::process::Command, String> {
    let lab = &p.ctx.lab;
    let plan = &ctr.plan;
    let log_path = lab.log_path(&p.ns, &p.name, &ctr.name);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let (program, args): (PathBuf, Vec<String>) = match &plan.program {
        Program::Workspace(b) => (lab.bin(b), plan.args.clone()),
        Program::Echo { ports } => {
            let mut a = vec![
                "echo".to_owned(),
                "--pod".into(),
                p.name.clone(),
                "--namespace".into(),
                p.ns.clone(),
                "--version".into(),
                p.pod["metadata"]["labels"]["version"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            ];
            for port in ports {
                a.push("--port".into());
                a.push(port.to_string());
            }
            // The container's own args tune the echo server (--status, --fail-first).
            a.extend(plan.args.iter().cloned());
            (lab.bin("ferry-lab"), a)
        }
        Program::Host(path) => (PathBuf::from(path), plan.args.clone()),
    };
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", &p.netns, "setpriv"])
        .args([
            "--reuid",
            &plan.uid.to_string(),
            "--regid",
            &plan.gid.to_string(),
        ])
        .args(["--clear-groups", "env", "-i"])
        .arg(format!("PATH={}", lab.path_env()))
        .arg(format!("HOSTNAME={}", p.name))
        .arg("HOME=/");
    for (k, v) in &plan.env {
        cmd.arg(format!("{k}={v}"));
    }
    if plan.program == Program::Workspace("ferry-proxy") {
        // In a cluster the proxy would use its service account; in the lab it reads the lab's
        // kubeconfig, which points at the API server on the node.
        cmd.arg(format!("KUBECONFIG={}", lab.kubeconfig().display()));
    }
    cmd.arg(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .kill_on_drop(true);
    Ok(cmd)
}

async fn run_to_completion(p: &PodCtx, ctr: &Ctr) -> Result<i32, String> {
    let mut child = command(p, ctr)?
        .spawn()
        .map_err(|e| format!("starting {}: {e}", ctr.name))?;
    let st = child.wait().await.map_err(|e| e.to_string())?;
    Ok(st.code().unwrap_or(128))
}

/// SIGTERM, then SIGKILL after the grace period; the exit code as Kubernetes reports it
/// (128 + signal when killed by one).
async fn terminate(child: &mut tokio::process::Child, grace: Duration) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(st) => st.ok(),
        Err(_) => {
            let _ = child.kill().await;
            child.wait().await.ok()
        }
    };
    status.map_or(137, |s| {
        s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(9))
    })
}

/// Keep a container running per the restart policy, with the kubelet's doubling back-off.
async fn supervise(p: Arc<PodCtx>, ctr: Arc<Ctr>, policy: String, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        if *stop.borrow() {
            return;
        }
        let spawned = command(&p, &ctr).and_then(|mut c| c.spawn().map_err(|e| e.to_string()));
        let exit = match spawned {
            Err(msg) => {
                ctr.state.lock().expect("state").waiting = Some(("RunContainerError".into(), msg));
                None
            }
            Ok(mut child) => {
                {
                    let mut s = ctr.state.lock().expect("state");
                    s.running = true;
                    s.waiting = None;
                    s.exit = None;
                }
                let began = Instant::now();
                let st = tokio::select! {
                    st = child.wait() => st.ok(),
                    _ = stop.changed() => {
                        let code = terminate(&mut child, p.grace).await;
                        let mut s = ctr.state.lock().expect("state");
                        s.running = false;
                        s.ready = false;
                        s.exit = Some(code);
                        s.finished = true;
                        return;
                    }
                };
                if began.elapsed() > Duration::from_secs(10) {
                    backoff = Duration::from_secs(1);
                }
                let code = st.and_then(|s| s.code()).unwrap_or(128);
                let mut s = ctr.state.lock().expect("state");
                s.running = false;
                s.started = false;
                s.ready = false;
                s.exit = Some(code);
                Some(code)
            }
        };
        let again = match policy.as_str() {
            "Never" => false,
            "OnFailure" => exit != Some(0),
            _ => true,
        };
        if !again {
            ctr.state.lock().expect("state").finished = true;
            return;
        }
        {
            let mut s = ctr.state.lock().expect("state");
            s.restarts += 1;
            if s.waiting.is_none() {
                s.waiting = Some((
                    "CrashLoopBackOff".into(),
                    format!(
                        "back-off {}s restarting failed container={}",
                        backoff.as_secs(),
                        ctr.name
                    ),
                ));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Run the container's startup probe (until it passes) and then its readiness probe. Returns
/// whether it is ready. Probe periods are capped at 500 ms so the lab settles quickly.
async fn probe_round(p: &PodCtx, ctr: &Ctr) -> bool {
    let running = ctr.state.lock().expect("state").running;
    if !running {
        return false;
    }
    let started = ctr.state.lock().expect("state").started;
    if !started {
        let ok = match ctr.spec.get("startupProbe") {
            Some(pr) => probe(p, ctr, pr).await,
            None => true,
        };
        ctr.state.lock().expect("state").started = ok;
        if !ok {
            return false;
        }
    }
    let ready = match ctr.spec.get("readinessProbe") {
        Some(pr) => probe(p, ctr, pr).await,
        None => true,
    };
    let mut s = ctr.state.lock().expect("state");
    s.ready = ready && s.running;
    s.ready
}

async fn probe(p: &PodCtx, ctr: &Ctr, pr: &Value) -> bool {
    let timeout = Duration::from_secs(pr["timeoutSeconds"].as_u64().unwrap_or(1).clamp(1, 10));
    let fut = async {
        if let Some(h) = pr.get("httpGet") {
            if h["scheme"]
                .as_str()
                .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"))
            {
                return false;
            }
            let Some(port) = model::probe_port(&ctr.spec, &h["port"]) else {
                return false;
            };
            let path = h["path"].as_str().unwrap_or("/");
            let headers: Vec<(String, String)> = h["httpHeaders"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| {
                    (
                        x["name"].as_str().unwrap_or_default().to_owned(),
                        x["value"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            let hdrs: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let addr = std::net::SocketAddr::from((p.ip, port));
            return crate::http_get_with(addr, path, &format!("{}:{port}", p.ip), &hdrs)
                .await
                .is_ok_and(|(code, _, _)| (200..400).contains(&code));
        }
        if let Some(t) = pr.get("tcpSocket") {
            let Some(port) = model::probe_port(&ctr.spec, &t["port"]) else {
                return false;
            };
            return tokio::net::TcpStream::connect((p.ip, port)).await.is_ok();
        }
        if let Some(e) = pr.get("exec") {
            let cmd: Vec<String> = e["command"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect();
            if cmd.is_empty() {
                return false;
            }
            let mut c = tokio::process::Command::new("ip");
            c.args(["netns", "exec", &p.netns, "setpriv"])
                .args([
                    "--reuid",
                    &ctr.plan.uid.to_string(),
                    "--regid",
                    &ctr.plan.gid.to_string(),
                    "--clear-groups",
                ])
                .args(&cmd)
                .env("PATH", p.ctx.lab.path_env())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true);
            return c.status().await.is_ok_and(|s| s.success());
        }
        // gRPC probes are not run by the lab.
        false
    };
    tokio::time::timeout(timeout, fut).await.unwrap_or(false)
}

fn ctr_status(c: &Ctr) -> Value {
    let s = c.state.lock().expect("state");
    let state = if s.running {
        json!({"running": {}})
    } else if let Some((reason, msg)) = &s.waiting {
        json!({"waiting": {"reason": reason, "message": msg}})
    } else if let Some(code) = s.exit {
        json!({"terminated": {"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" }}})
    } else {
        json!({"waiting": {"reason": "ContainerCreating"}})
    };
    json!({
        "name": c.name,
        "image": c.spec["image"],
        "ready": s.ready,
        "started": s.running && s.started,
        "restartCount": s.restarts,
        "state": state,
    })
}

fn write_status(
    p: &PodCtx,
    inits: &[Value],
    sidecars: &[Arc<Ctr>],
    apps: &[Arc<Ctr>],
    phase: &str,
) {
    write_status_with(p, inits, sidecars, apps, &[], phase);
}

fn write_status_with(
    p: &PodCtx,
    inits: &[Value],
    sidecars: &[Arc<Ctr>],
    apps: &[Arc<Ctr>],
    extra: &[Value],
    phase: &str,
) {
    let init_statuses: Vec<Value> = inits
        .iter()
        .cloned()
        .chain(sidecars.iter().map(|c| ctr_status(c)))
        .collect();
    let statuses: Vec<Value> = apps
        .iter()
        .map(|c| ctr_status(c))
        .chain(extra.iter().cloned())
        .collect();
    let n_init = p.pod["spec"]["initContainers"]
        .as_array()
        .map_or(0, Vec::len);
    let initialized = init_statuses.len() == n_init
        && init_statuses
            .iter()
            .all(|s| s["ready"] == json!(true) || s["state"]["terminated"]["exitCode"] == json!(0));
    let ready = initialized
        && phase == "Running"
        && !statuses.is_empty()
        && statuses
            .iter()
            .chain(sidecars.iter().map(|_| &Value::Null))
            .all(|s| s.is_null() || s["ready"] == json!(true))
        && sidecars
            .iter()
            .all(|c| c.state.lock().expect("state").ready);
    let cond = |t: &str, ok: bool| json!({"type": t, "status": if ok { "True" } else { "False" }});
    let st = json!({
        "phase": phase,
        "hostIP": NODE_IP.to_string(),
        "hostIPs": [{"ip": NODE_IP.to_string()}],
        "podIP": p.ip.to_string(),
        "podIPs": [{"ip": p.ip.to_string()}],
        "conditions": [cond("PodScheduled", true), cond("Initialized", initialized), cond("ContainersReady", ready), cond("Ready", ready)],
        "initContainerStatuses": init_statuses,
        "containerStatuses": statuses,
    });
    set_status(&p.ctx, &p.ns, &p.name, st);
}
