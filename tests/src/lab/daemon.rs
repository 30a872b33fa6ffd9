//! The lab's long-running process: API server, admission (the mutating webhook over HTTPS),
//! controllers (Deployments, EndpointSlices, DNS, kube-proxy) and the kubelet. Its threads live
//! in the node's network namespace, as a node's kubelet and control plane would.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

use super::kubelet::{self, PodRuntime};
use super::model::{self, NodeInfo};
use super::{API_PORT, Lab, LabError, NODE_IP, NODE_NAME, SERVICE_BASE, control, io_err, net};
use crate::fake_apiserver::{FakeApiServer, status};

/// Annotation of pods the kubelet does not run (the node's own processes).
pub const MIRROR: &str = "kubernetes.io/config.mirror";

/// Shared state of the daemon.
pub struct Ctx {
    pub lab: Lab,
    pub api: FakeApiServer,
    pub node: NodeInfo,
    next_ip: AtomicU32,
    seq: AtomicU64,
    vips: Mutex<BTreeSet<Ipv4Addr>>,
    pods: Mutex<HashMap<String, PodRuntime>>,
    hosts: Mutex<HashMap<String, String>>,
    kube_proxy: Mutex<String>,
    failures: Mutex<HashMap<String, String>>,
    /// Binds listeners on the host's loopback (a thread that stays in the host's namespace).
    host_binder: Mutex<std::sync::mpsc::Sender<HostBind>>,
    /// (service uid, node port) → its forwarder.
    node_ports: Mutex<HashMap<(String, SocketAddr), tokio::task::JoinHandle<()>>>,
}

/// A request to bind a loopback address:port in the host's network namespace.
type HostBind = (
    SocketAddr,
    std::sync::mpsc::Sender<std::io::Result<std::net::TcpListener>>,
);

/// The host-side binder: the only lab thread that stays in the host's network namespace. It
/// only ever binds loopback listeners for NodePort/LoadBalancer Services.
fn host_binder() -> std::sync::mpsc::Sender<HostBind> {
    let (tx, rx) = std::sync::mpsc::channel::<HostBind>();
    std::thread::spawn(move || {
        for (addr, reply) in rx {
            if !addr.ip().is_loopback() {
                let _ = reply.send(Err(std::io::Error::other("only loopback addresses")));
                continue;
            }
            let l = std::net::TcpListener::bind(addr).and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            });
            let _ = reply.send(l);
        }
    });
    tx
}

fn say(msg: &str) {
    // The daemon's stdout is its log; `ferry-lab up` shows these lines as progress.
    println!("[lab] {msg}");
}

impl Ctx {
    pub fn alloc_pod_ip(&self) -> Ipv4Addr {
        let n = self.next_ip.fetch_add(1, Ordering::SeqCst);
        Ipv4Addr::from(u32::from(NODE_IP) + n)
    }

    fn uid(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        format!(
            "{:08x}-{:04x}-4000-8000-{:012x}",
            model::fnv(&self.lab.name) as u32,
            n & 0xffff,
            n
        )
    }

    /// The hosts file every pod in `namespace` sees, from the current Services.
    pub fn hosts_for(&self, namespace: &str, pod: &str, ip: Ipv4Addr) -> String {
        model::hosts_file(
            namespace,
            pod,
            ip,
            &self.api.list_kind("Service"),
            &self.api.list_kind("EndpointSlice"),
        )
    }

    pub fn remember_hosts(&self, netns: &str, content: String) {
        self.hosts
            .lock()
            .expect("hosts")
            .insert(netns.to_owned(), content);
    }

    pub fn forget_hosts(&self, netns: &str) {
        self.hosts.lock().expect("hosts").remove(netns);
    }
}

/// Run the daemon until SIGTERM/SIGINT. Creates the node, starts the injector, serves the API.
pub fn run(lab: Lab) -> Result<(), LabError> {
    std::fs::create_dir_all(lab.dir.join("logs"))
        .map_err(io_err("creating the state directory"))?;
    std::fs::write(lab.pid_file(), std::process::id().to_string())
        .map_err(io_err("writing the pid file"))?;
    say(&format!(
        "creating node namespace {} (bridge cbr0, {NODE_IP}/16)",
        lab.node_ns()
    ));
    net::create_node(&lab)?;
    let kubeconfig = FakeApiServer::kubeconfig(SocketAddr::from((NODE_IP, API_PORT)));
    std::fs::write(lab.kubeconfig(), kubeconfig).map_err(io_err("writing kubeconfig"))?;
    let pki = crate::tls::Pki::new("ferry-lab cluster CA");
    let cp = match std::fs::read_to_string(lab.dir.join("chart.yaml")) {
        Ok(rendered) => control::from_chart(&lab, &rendered)?,
        Err(_) => control::builtin(&lab, &pki.ca_pem()),
    };
    say(&format!("control plane: {}", cp.source));
    for d in ["config", "tls"] {
        std::fs::create_dir_all(lab.dir.join(d)).map_err(io_err(format!("creating {d} dir")))?;
    }
    if let Some(cfg) = &cp.config {
        std::fs::write(lab.dir.join("config/config.yaml"), cfg)
            .map_err(io_err("writing the injector config"))?;
    }
    if cp.lab_pki {
        let serving = pki.issue(&[&control::service_dns(&cp)], 2036);
        std::fs::write(lab.dir.join("tls/tls.crt"), &serving.cert_pem)
            .map_err(io_err("writing cert"))?;
        std::fs::write(lab.dir.join("tls/tls.key"), &serving.key_pem)
            .map_err(io_err("writing key"))?;
    }

    say(&format!(
        "starting ferry-injector (the mutating webhook, HTTPS on :{}{})",
        cp.port,
        if cp.lab_pki {
            ""
        } else {
            "; it issues its own certificate and sets the caBundle"
        }
    ));
    let log = std::fs::File::create(lab.dir.join("logs").join("istio-system_injector.log"))
        .map_err(io_err("creating injector log"))?;
    let mut injector = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.node_ns()])
        .arg(lab.bin("ferry-injector"))
        .args(&cp.args)
        .envs(cp.env.iter().map(|(k, v)| (k, v)))
        .stdout(log.try_clone().map_err(io_err("injector log"))?)
        .stderr(log)
        .spawn()
        .map_err(io_err("starting ferry-injector"))?;

    let binder = host_binder();
    // Every thread of the runtime lives in the node's network namespace.
    net::enter(&lab.node_ns())?;
    let node_ns = lab.node_ns();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            if let Err(e) = net::enter(&node_ns) {
                eprintln!("[lab] {e}");
            }
        })
        .build()
        .map_err(io_err("starting the runtime"))?;
    let result = rt.block_on(serve(lab.clone(), cp, &mut injector, binder));
    let _ = injector.kill();
    let _ = injector.wait();
    net::delete_netns(&lab.node_ns());
    say("stopped");
    result
}

fn cpus() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
}

fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

async fn serve(
    lab: Lab,
    cp: control::ControlPlane,
    injector: &mut std::process::Child,
    binder: std::sync::mpsc::Sender<HostBind>,
) -> Result<(), LabError> {
    let api = FakeApiServer::new(model::api_kinds());
    let ctx = Arc::new(Ctx {
        lab: lab.clone(),
        api: api.clone(),
        node: NodeInfo {
            name: NODE_NAME.into(),
            ip: NODE_IP,
            cpus: cpus(),
            memory_bytes: memory_bytes(),
        },
        next_ip: AtomicU32::new(1),
        seq: AtomicU64::new(1),
        vips: Mutex::new(BTreeSet::new()),
        pods: Mutex::new(HashMap::new()),
        hosts: Mutex::new(HashMap::new()),
        kube_proxy: Mutex::new(String::new()),
        failures: Mutex::new(HashMap::new()),
        host_binder: Mutex::new(binder),
        node_ports: Mutex::new(HashMap::new()),
    });
    let admit_ctx = ctx.clone();
    api.set_admission(Arc::new(move |obj, old| {
        let ctx = admit_ctx.clone();
        Box::pin(async move { admit(&ctx, obj, old).await })
    }));
    let tcp = tokio::net::TcpListener::bind((NODE_IP, API_PORT))
        .await
        .map_err(io_err(format!(
            "binding the API server on {NODE_IP}:{API_PORT}"
        )))?;
    let _ = std::fs::remove_file(lab.socket());
    let unix = tokio::net::UnixListener::bind(lab.socket())
        .map_err(io_err(format!("binding {}", lab.socket().display())))?;
    let _tcp_task = api.serve(tcp);
    let _unix_task = api.serve_unix(unix);
    say(&format!(
        "API server on {NODE_IP}:{API_PORT} and {}",
        lab.socket().display()
    ));

    seed(&ctx, &cp).await?;
    wait_for_injector(injector, cp.port).await?;
    std::fs::write(lab.ready_file(), "ready\n").map_err(io_err("writing ready file"))?;
    say("ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io_err("SIGTERM handler"))?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(io_err("SIGINT handler"))?;
    let mut changes = api.subscribe();
    loop {
        reconcile(&ctx).await;
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = changes.changed() => {
                // Let a burst of changes settle into one pass.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    say("shutting down: stopping pods");
    let running: Vec<PodRuntime> = ctx
        .pods
        .lock()
        .expect("pods")
        .drain()
        .map(|(_, p)| p)
        .collect();
    for p in &running {
        p.stop();
    }
    for p in running {
        p.join(Duration::from_secs(20)).await;
    }
    Ok(())
}

async fn wait_for_injector(injector: &mut std::process::Child, port: u16) -> Result<(), LabError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(st)) = injector.try_wait() {
            return Err(LabError::State(format!(
                "ferry-injector exited ({st}) before it was ready; see its log"
            )));
        }
        if tokio::net::TcpStream::connect((NODE_IP, port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(LabError::State(
                "ferry-injector did not listen within 20s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a fresh cluster has: the system namespaces, the injector's Service (the injector runs
/// on the node, like a host-network pod) with its endpoint, and the webhook configuration.
async fn seed(ctx: &Arc<Ctx>, cp: &control::ControlPlane) -> Result<(), LabError> {
    for ns in ["default", "kube-system", "kube-public", "istio-system"] {
        create(
            ctx,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        )
        .await?;
    }
    create(ctx, cp.service.clone()).await?;
    // The injector runs on the node itself; the API server knows it as a mirror pod (as it
    // knows a kubelet's static pods), so the Service gets its endpoint the usual way.
    let mut pod = cp.pod.clone();
    pod["metadata"]["uid"] = json!(ctx.uid());
    pod["status"] = json!({"phase": "Running", "podIP": NODE_IP.to_string(), "hostIP": NODE_IP.to_string(),
        "conditions": [{"type": "Ready", "status": "True"}],
        "containerStatuses": [{"name": pod["spec"]["containers"][0]["name"], "ready": true, "restartCount": 0, "state": {"running": {}}}]});
    ctx.api.apply(pod);
    ctx.api.apply(cp.mwc.clone());
    Ok(())
}

async fn create(ctx: &Arc<Ctx>, obj: Value) -> Result<Value, LabError> {
    ctx.api
        .create(obj)
        .await
        .map_err(|st| LabError::Api(st["message"].as_str().unwrap_or_default().to_owned()))
}

fn refuse(code: u16, reason: &str, msg: String) -> Value {
    status(code, reason, &msg)
}

/// The API server's admission chain for the lab.
async fn admit(ctx: &Arc<Ctx>, mut obj: Value, old: Option<Value>) -> Result<Value, Value> {
    let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let ns = obj["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let info = model::kind_info(&kind)
        .ok_or_else(|| refuse(404, "NotFound", format!("kind {kind} is not served")))?;
    obj["apiVersion"] = json!(info.api_version());
    if info.namespaced && ctx.api.get("Namespace", "", &ns).is_none() {
        return Err(refuse(
            404,
            "NotFound",
            format!("namespaces {ns:?} not found"),
        ));
    }
    if old.is_none() {
        obj["metadata"]["uid"] = json!(ctx.uid());
    }
    match kind.as_str() {
        "Namespace" => {
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
            obj["status"] = json!({"phase": "Active"});
        }
        "Service" => {
            allocate_cluster_ip(ctx, &mut obj, old.as_ref())?;
            if let Some(old) = &old {
                obj["status"] = old["status"].clone();
            }
            // A LoadBalancer's "external IP": a loopback address of this lab's own range.
            if obj["spec"]["type"] == "LoadBalancer"
                && obj["status"]["loadBalancer"]["ingress"].is_null()
            {
                let taken: BTreeSet<String> = ctx
                    .api
                    .list_kind("Service")
                    .iter()
                    .filter_map(|s| {
                        s["status"]["loadBalancer"]["ingress"][0]["ip"]
                            .as_str()
                            .map(str::to_owned)
                    })
                    .collect();
                let second = 20 + (model::fnv(&ctx.lab.name) % 200) as u8;
                if let Some(ip) = (1u8..=254)
                    .map(|n| Ipv4Addr::new(127, second, 0, n).to_string())
                    .find(|ip| !taken.contains(ip))
                {
                    obj["status"]["loadBalancer"] = json!({"ingress": [{"ip": ip}]});
                }
            }
        }
        "Secret" => {
            // As the API server does: stringData is merged into data, base64-encoded.
            if let Some(sd) = obj.get("stringData").and_then(Value::as_object).cloned() {
                for (k, v) in sd {
                    let b = base64::engine::general_purpose::STANDARD
                        .encode(v.as_str().unwrap_or_default());
                    obj["data"][k] = json!(b);
                }
                if let Some(m) = obj.as_object_mut() {
                    m.remove("stringData");
                }
            }
        }
        "Pod" => match &old {
            Some(old) if old["spec"] != obj["spec"] => {
                return Err(refuse(
                    422,
                    "Invalid",
                    format!(
                        "Pod {name:?} is invalid: spec: Forbidden: pod updates may not change fields other than image, activeDeadlineSeconds, tolerations (delete and re-create the Pod)"
                    ),
                ));
            }
            Some(old) => obj["status"] = old["status"].clone(),
            None => {
                obj["status"] = json!({"phase": "Pending"});
                obj = call_webhooks(ctx, obj).await?;
            }
        },
        "Deployment" => {
            if let Some(old) = &old {
                obj["status"] = old["status"].clone();
            }
        }
        _ => {}
    }
    Ok(obj)
}

fn allocate_cluster_ip(ctx: &Ctx, svc: &mut Value, old: Option<&Value>) -> Result<(), Value> {
    let name = svc["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let old_ip = old.and_then(|o| o["spec"]["clusterIP"].as_str().map(str::to_owned));
    let asked = svc["spec"]["clusterIP"].as_str().map(str::to_owned);
    let ip = match (asked, old_ip) {
        (Some(a), Some(o)) if a != o => {
            return Err(refuse(
                422,
                "Invalid",
                format!(
                    "Service {name:?} is invalid: spec.clusterIP: Invalid value: {a:?}: field is immutable"
                ),
            ));
        }
        (_, Some(o)) => o,
        (Some(a), None) if a == "None" => a,
        (Some(a), None) if !a.is_empty() => {
            let ip: Ipv4Addr = a.parse().map_err(|_| {
                refuse(422, "Invalid", format!("Service {name:?} is invalid: spec.clusterIP: Invalid value: {a:?}: must be a valid IP address or None"))
            })?;
            let o = ip.octets();
            if o[0] != 10 || o[1] != 96 {
                return Err(refuse(
                    422,
                    "Invalid",
                    format!(
                        "Service {name:?} is invalid: spec.clusterIP: Invalid value: {a:?}: provided IP is not in the valid range (10.96.0.0/16)"
                    ),
                ));
            }
            if !ctx.vips.lock().expect("vips").insert(ip) {
                return Err(refuse(
                    422,
                    "Invalid",
                    format!(
                        "Service {name:?} is invalid: spec.clusterIP: Invalid value: {a:?}: provided IP is already allocated"
                    ),
                ));
            }
            a
        }
        _ => {
            let mut vips = ctx.vips.lock().expect("vips");
            let ip = (10u32..65_000)
                .map(|n| Ipv4Addr::from(u32::from(SERVICE_BASE) + n))
                .find(|ip| !vips.contains(ip))
                .ok_or_else(|| {
                    refuse(
                        500,
                        "InternalError",
                        "the Service address range is exhausted".into(),
                    )
                })?;
            vips.insert(ip);
            ip.to_string()
        }
    };
    // NodePort / LoadBalancer: every port gets a node port (kept across updates).
    if matches!(
        svc["spec"]["type"].as_str(),
        Some("NodePort" | "LoadBalancer")
    ) {
        let mut used: BTreeSet<u64> = ctx
            .api
            .list_kind("Service")
            .iter()
            .filter(|s| s["metadata"]["name"].as_str() != Some(name.as_str()))
            .flat_map(|s| {
                s["spec"]["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p["nodePort"].as_u64())
                    .collect::<Vec<_>>()
            })
            .collect();
        let old_ports = old.map(|o| o["spec"]["ports"].clone()).unwrap_or_default();
        if let Some(ports) = svc["spec"]["ports"].as_array_mut() {
            for (i, p) in ports.iter_mut().enumerate() {
                if let Some(n) = p["nodePort"].as_u64() {
                    if !(30000..=32767).contains(&n) || !used.insert(n) {
                        return Err(refuse(
                            422,
                            "Invalid",
                            format!(
                                "Service {name:?} is invalid: spec.ports[{i}].nodePort: Invalid value: {n}: provided port is not in the valid range (30000-32767) or is already allocated"
                            ),
                        ));
                    }
                    continue;
                }
                let keep = old_ports[i]["nodePort"].as_u64();
                let n = keep
                    .or_else(|| (30000u64..=32767).find(|n| !used.contains(n)))
                    .ok_or_else(|| refuse(500, "InternalError", "no node port left".into()))?;
                used.insert(n);
                p["nodePort"] = json!(n);
            }
        }
    }
    svc["spec"]["clusterIPs"] = json!([ip]);
    svc["spec"]["clusterIP"] = json!(ip);
    if svc["spec"]["type"].is_null() {
        svc["spec"]["type"] = json!("ClusterIP");
    }
    Ok(())
}

/// Call the webhooks whose selectors match, as the API server does, and apply their patches.
async fn call_webhooks(ctx: &Arc<Ctx>, mut pod: Value) -> Result<Value, Value> {
    let ns = pod["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let ns_obj = ctx.api.get("Namespace", "", &ns).unwrap_or(Value::Null);
    let configs = ctx.api.list_kind("MutatingWebhookConfiguration");
    let hooks = model::webhooks_for_pod(
        &configs,
        &model::label_map(&ns_obj),
        &model::label_map(&pod),
    )
    .map_err(|e| refuse(500, "InternalError", e))?;
    for hook in hooks {
        let hname = hook["name"].as_str().unwrap_or_default().to_owned();
        let ignore = hook["failurePolicy"].as_str() == Some("Ignore");
        let uid = ctx.uid();
        let review = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "name": pod["metadata"]["name"],
                "namespace": ns,
                "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts", "system:authenticated"]},
                "object": pod,
                "oldObject": null,
                "dryRun": false,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
            }
        });
        let timeout =
            Duration::from_secs(hook["timeoutSeconds"].as_u64().unwrap_or(10).clamp(1, 30));
        let reply = match tokio::time::timeout(timeout, call_webhook(ctx, &hook, &review)).await {
            Ok(r) => r,
            Err(_) => Err(format!("context deadline exceeded after {timeout:?}")),
        };
        let resp = match reply {
            Ok(r) if r["response"]["uid"] == json!(uid) => r["response"].clone(),
            Ok(_) => Err(format!(
                "webhook {hname:?} answered a different request uid"
            ))
            .map_err(|e| refuse(500, "InternalError", e))?,
            Err(e) if ignore => {
                say(&format!(
                    "webhook {hname} failed ({e}); failurePolicy Ignore: pod admitted unmodified"
                ));
                continue;
            }
            Err(e) => {
                return Err(refuse(
                    500,
                    "InternalError",
                    format!("Internal error occurred: failed calling webhook {hname:?}: {e}"),
                ));
            }
        };
        if resp["allowed"] != json!(true) {
            let msg = resp["status"]["message"].as_str().unwrap_or("denied");
            let code = resp["status"]["code"].as_u64().unwrap_or(400) as u16;
            return Err(refuse(
                code,
                "BadRequest",
                format!("admission webhook {hname:?} denied the request: {msg}"),
            ));
        }
        if let Some(p) = resp["patch"].as_str() {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(p)
                .map_err(|e| {
                    refuse(
                        500,
                        "InternalError",
                        format!("webhook {hname:?} patch is not base64: {e}"),
                    )
                })?;
            let patch: json_patch::Patch = serde_json::from_slice(&bytes).map_err(|e| {
                refuse(
                    500,
                    "InternalError",
                    format!("webhook {hname:?} patch is not a JSONPatch: {e}"),
                )
            })?;
            json_patch::patch(&mut pod, &patch).map_err(|e| {
                refuse(
                    500,
                    "InternalError",
                    format!("webhook {hname:?} patch does not apply: {e}"),
                )
            })?;
        }
    }
    Ok(pod)
}

/// Where the API server sends a webhook's requests: the Service's ready endpoint (as the real
/// API server resolves `clientConfig.service`), verified against `caBundle` for
/// `<service>.<namespace>.svc`.
async fn call_webhook(ctx: &Arc<Ctx>, hook: &Value, review: &Value) -> Result<Value, String> {
    let cc = &hook["clientConfig"];
    let svc_ref = &cc["service"];
    let (sns, sname) = (
        svc_ref["namespace"]
            .as_str()
            .ok_or("clientConfig.service.namespace missing")?,
        svc_ref["name"].as_str().ok_or(
            "clientConfig.service.name missing (clientConfig.url is not supported by the lab)",
        )?,
    );
    let port = svc_ref["port"].as_u64().unwrap_or(443);
    let path = svc_ref["path"].as_str().unwrap_or("/");
    let svc = ctx
        .api
        .get("Service", sns, sname)
        .ok_or_else(|| format!("service \"{sname}\" not found"))?;
    let sp = svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["port"].as_u64() == Some(port))
        .ok_or_else(|| format!("service {sns}/{sname} has no port {port}"))?;
    let slices = ctx.api.list_kind("EndpointSlice");
    let addr = slices
        .iter()
        .filter(|s| {
            s["metadata"]["namespace"].as_str() == Some(sns)
                && s["metadata"]["labels"]["kubernetes.io/service-name"].as_str() == Some(sname)
        })
        .find_map(|s| {
            let target = s["ports"]
                .as_array()?
                .iter()
                .find(|p| p["name"] == sp["name"])?["port"]
                .as_u64()?;
            let ep = s["endpoints"]
                .as_array()?
                .iter()
                .find(|e| e["conditions"]["ready"] == json!(true))?;
            let ip: Ipv4Addr = ep["addresses"][0].as_str()?.parse().ok()?;
            Some(SocketAddr::from((ip, target as u16)))
        })
        .ok_or_else(|| format!("no endpoints available for service \"{sname}\""))?;
    let ca = base64::engine::general_purpose::STANDARD
        .decode(cc["caBundle"].as_str().unwrap_or_default())
        .map_err(|e| format!("caBundle is not base64: {e}"))?;
    let server_name = format!("{sname}.{sns}.svc");
    let mut client =
        crate::tls::Client::connect(addr, &server_name, &String::from_utf8_lossy(&ca)).await?;
    let (code, body) = client
        .request(
            "POST",
            &format!("{path}?timeout=10s"),
            Some("application/json"),
            review.to_string().into_bytes(),
        )
        .await?;
    if code != 200 {
        return Err(format!(
            "expected webhook response of 200, got {code}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    serde_json::from_slice(&body).map_err(|e| format!("response is not an AdmissionReview: {e}"))
}

/// One pass of every controller.
async fn reconcile(ctx: &Arc<Ctx>) {
    collect_garbage(ctx);
    deployments(ctx).await;
    endpoint_slices(ctx);
    kube_proxy(ctx);
    node_ports(ctx).await;
    dns(ctx);
    kubelet_sync(ctx);
}

/// Objects whose namespace or owner is gone are deleted (namespace deletion, Deployment
/// deletion).
fn collect_garbage(ctx: &Ctx) {
    let namespaces: BTreeSet<String> = ctx
        .api
        .list_kind("Namespace")
        .iter()
        .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    let deployments = ctx.api.list_kind("Deployment");
    for info in model::KINDS.iter().filter(|k| k.namespaced) {
        for obj in ctx.api.list_kind(info.kind) {
            let ns = obj["metadata"]["namespace"].as_str().unwrap_or_default();
            let name = obj["metadata"]["name"].as_str().unwrap_or_default();
            let from_replicaset = obj["metadata"]["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|o| o["kind"] == "ReplicaSet");
            let orphan = from_replicaset && !deployments.iter().any(|d| model::owned_by(d, &obj));
            if !namespaces.contains(ns) || orphan {
                ctx.api.delete(info.kind, ns, name);
            }
        }
    }
}

async fn deployments(ctx: &Arc<Ctx>) {
    let pods = ctx.api.list_kind("Pod");
    for d in ctx.api.list_kind("Deployment") {
        let ns = d["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let name = d["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let owned: Vec<Value> = pods
            .iter()
            .filter(|p| model::owned_by(&d, p))
            .cloned()
            .collect();
        let mut seq = ctx.seq.fetch_add(100, Ordering::SeqCst);
        let (create_pods, delete) = model::deployment_plan(&d, &owned, &mut seq);
        for p in delete {
            ctx.api.delete("Pod", &ns, &p);
        }
        let mut failure = None;
        for p in create_pods {
            let pname = p["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if let Err(st) = ctx.api.create(p).await {
                let msg = format!(
                    "Error creating: pods {pname:?} is forbidden: {}",
                    st["message"].as_str().unwrap_or_default()
                );
                let key = format!("{ns}/{name}");
                let mut f = ctx.failures.lock().expect("failures");
                if f.get(&key) != Some(&msg) {
                    say(&format!("deployment {key}: {msg}"));
                    f.insert(key, msg.clone());
                }
                failure = Some(msg);
                break;
            }
        }
        if failure.is_none() {
            ctx.failures
                .lock()
                .expect("failures")
                .remove(&format!("{ns}/{name}"));
        }
        let now_owned: Vec<Value> = ctx
            .api
            .list_kind("Pod")
            .into_iter()
            .filter(|p| model::owned_by(&d, p))
            .collect();
        let st = model::deployment_status(&d, &now_owned, failure.as_deref());
        ctx.api
            .update("Deployment", &ns, &name, |o| o["status"] = st);
    }
}

fn endpoint_slices(ctx: &Ctx) {
    let pods = ctx.api.list_kind("Pod");
    let services = ctx.api.list_kind("Service");
    let mut wanted = BTreeSet::new();
    for svc in &services {
        let Some(slice) = model::endpoint_slice(svc, &pods, NODE_NAME) else {
            continue;
        };
        let ns = slice["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let name = slice["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let same = ctx
            .api
            .get("EndpointSlice", &ns, &name)
            .is_some_and(|cur| model::same_content(&cur, &slice));
        if !same {
            ctx.api.apply(slice);
        }
        wanted.insert((ns, name));
    }
    for s in ctx.api.list_kind("EndpointSlice") {
        let managed = s["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"]
            == json!("endpointslice-controller.k8s.io");
        let key = (
            s["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            s["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        if managed && !wanted.contains(&key) {
            ctx.api.delete("EndpointSlice", &key.0, &key.1);
        }
    }
}

/// NodePort and LoadBalancer Services are reachable from the machine at 127.0.0.1:<nodePort>
/// (what a walkthrough's `curl $INGRESS_HOST:$INGRESS_PORT` needs), and a LoadBalancer also at
/// its own loopback "external IP" on the Service's ports (`curl --resolve host:443:<ip>`): a
/// forwarder per address connects to the ClusterIP from the node, through kube-proxy's rules.
async fn node_ports(ctx: &Arc<Ctx>) {
    let mut wanted: HashMap<(String, SocketAddr), (Ipv4Addr, u16, String)> = HashMap::new();
    for svc in ctx.api.list_kind("Service") {
        let lb = match svc["spec"]["type"].as_str() {
            Some("NodePort") => None,
            Some("LoadBalancer") => svc["status"]["loadBalancer"]["ingress"][0]["ip"]
                .as_str()
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok()),
            _ => continue,
        };
        let Some(vip) = svc["spec"]["clusterIP"]
            .as_str()
            .and_then(|v| v.parse().ok())
        else {
            continue;
        };
        let uid = svc["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let id = format!(
            "{}/{}",
            svc["metadata"]["namespace"].as_str().unwrap_or_default(),
            svc["metadata"]["name"].as_str().unwrap_or_default()
        );
        for p in svc["spec"]["ports"].as_array().into_iter().flatten() {
            let Some(port) = p["port"].as_u64().and_then(|n| u16::try_from(n).ok()) else {
                continue;
            };
            if let Some(np) = p["nodePort"].as_u64().and_then(|n| u16::try_from(n).ok()) {
                let listen = SocketAddr::from(([127, 0, 0, 1], np));
                wanted.insert((uid.clone(), listen), (vip, port, id.clone()));
            }
            if let Some(ip) = lb {
                wanted.insert(
                    (uid.clone(), SocketAddr::from((ip, port))),
                    (vip, port, id.clone()),
                );
            }
        }
    }
    let mut running = ctx
        .node_ports
        .lock()
        .expect("node ports")
        .drain()
        .collect::<HashMap<_, _>>();
    running.retain(|k, task| {
        let keep = wanted.contains_key(k);
        if !keep {
            task.abort();
        }
        keep
    });
    for (key, (vip, port, id)) in wanted {
        if running.contains_key(&key) {
            continue;
        }
        let listen = key.1;
        let (tx, rx) = std::sync::mpsc::channel();
        let sent = ctx
            .host_binder
            .lock()
            .expect("binder")
            .send((listen, tx))
            .is_ok();
        let bound = match sent {
            true => tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(2)))
                .await
                .ok()
                .and_then(Result::ok),
            false => None,
        };
        match bound.map(|r| r.and_then(tokio::net::TcpListener::from_std)) {
            Some(Ok(l)) => {
                say(&format!(
                    "service {id}: port {port} reachable from this machine at {listen}"
                ));
                running.insert(
                    key.clone(),
                    tokio::spawn(forward(l, SocketAddr::from((vip, port)))),
                );
            }
            Some(Err(e)) => {
                let msg = format!(
                    "service {id}: port {port} not exposed at {listen} on this machine: {e}"
                );
                let mut f = ctx.failures.lock().expect("failures");
                if f.insert(format!("expose {listen}"), msg.clone()).is_none() {
                    say(&msg);
                }
            }
            None => {}
        }
    }
    *ctx.node_ports.lock().expect("node ports") = running;
}

async fn forward(l: tokio::net::TcpListener, to: SocketAddr) {
    loop {
        let Ok((mut down, _)) = l.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            if let Ok(mut up) = tokio::net::TcpStream::connect(to).await {
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            }
        });
    }
}

fn kube_proxy(ctx: &Ctx) {
    let rules = model::kube_proxy_rules(
        &ctx.api.list_kind("Service"),
        &ctx.api.list_kind("EndpointSlice"),
    );
    let mut last = ctx.kube_proxy.lock().expect("kube-proxy");
    if *last == rules {
        return;
    }
    match net::apply_kube_proxy(&ctx.lab, &rules) {
        Ok(()) => *last = rules,
        Err(e) => say(&format!("kube-proxy: applying rules failed: {e}")),
    }
}

/// Rewrite each pod's hosts file when the Services it can see change.
fn dns(ctx: &Ctx) {
    let targets: Vec<(String, String, String, Ipv4Addr)> = ctx
        .pods
        .lock()
        .expect("pods")
        .values()
        .filter_map(|p| p.dns_target())
        .collect();
    for (netns, ns, pod, ip) in targets {
        let content = ctx.hosts_for(&ns, &pod, ip);
        let same = ctx.hosts.lock().expect("hosts").get(&netns) == Some(&content);
        if !same && net::write_netns_files(&netns, &content, &ns).is_ok() {
            ctx.remember_hosts(&netns, content);
        }
    }
}

/// Start a runtime for each new Pod, stop the runtimes of Pods that are gone.
fn kubelet_sync(ctx: &Arc<Ctx>) {
    let pods: BTreeMap<String, Value> = ctx
        .api
        .list_kind("Pod")
        .into_iter()
        .filter(|p| p["metadata"]["annotations"][MIRROR].is_null())
        .filter_map(|p| Some((p["metadata"]["uid"].as_str()?.to_owned(), p)))
        .collect();
    let mut running = ctx.pods.lock().expect("pods");
    let gone: Vec<String> = running
        .keys()
        .filter(|u| !pods.contains_key(*u))
        .cloned()
        .collect();
    for uid in gone {
        if let Some(rt) = running.remove(&uid) {
            rt.stop();
            tokio::spawn(async move { rt.join(Duration::from_secs(30)).await });
        }
    }
    for (uid, pod) in pods {
        running
            .entry(uid)
            .or_insert_with(|| kubelet::start(ctx.clone(), pod));
    }
}
