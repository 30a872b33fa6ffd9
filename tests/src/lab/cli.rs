//! What the `ferry-lab` commands do: `up`, `down`, `apply`, `delete`, `get`, `exec`, `logs`.
//! Each returns its output as text (or an error), so the demo and the tests drive the same code
//! the command line does.

use std::io::{BufRead, Seek};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::client::ApiClient;
use super::model::{self, KindInfo};
use super::{Lab, LabError, io_err, net};

/// Fail early, with the fix, when the machine cannot host a lab.
pub fn preflight() -> Result<(), LabError> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(LabError::State(
            "the lab needs root (it creates network namespaces and iptables rules): run it with sudo".into(),
        ));
    }
    let missing: Vec<&str> = ["ip", "iptables-restore", "setpriv"]
        .into_iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if !missing.is_empty() {
        return Err(LabError::State(format!(
            "missing tools: {} (apt-get install -y iproute2 iptables util-linux)",
            missing.join(", ")
        )));
    }
    Ok(())
}

/// Start the lab: sweep leftovers of a crashed one, start the daemon, wait until it is ready
/// (printing its progress through `progress`).
pub fn up(lab: &Lab, progress: &mut dyn FnMut(&str)) -> Result<String, LabError> {
    preflight()?;
    for bin in ["ferry-injector", "ferry-proxy", "ferry-init", "ferry-lab"] {
        if !lab.bin(bin).exists() {
            return Err(LabError::State(format!(
                "{} is missing; build the workspace first (cargo build --workspace --bins)",
                lab.bin(bin).display()
            )));
        }
    }
    if let Some(pid) = net::daemon_pid(lab) {
        return Err(LabError::State(format!(
            "a lab named {:?} is already running (pid {pid}); use it, or `ferry-lab down` first",
            lab.name
        )));
    }
    let swept = net::sweep(lab);
    if !swept.is_empty() {
        progress(&format!(
            "removed leftovers of a lab {:?} that did not shut down cleanly ({} namespaces, {} processes)",
            lab.name, swept.namespaces, swept.processes
        ));
    }
    std::fs::create_dir_all(&lab.dir).map_err(io_err(format!("creating {}", lab.dir.display())))?;
    render_chart(lab, progress)?;
    let log = std::fs::File::create(lab.daemon_log()).map_err(io_err("creating daemon.log"))?;
    let state_root = lab.dir.parent().unwrap_or(&lab.dir);
    let mut child = Command::new(lab.bin("ferry-lab"))
        .args(["--name", &lab.name, "--state-dir"])
        .arg(state_root)
        .arg("daemon")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io_err("daemon log"))?)
        .stderr(log)
        // Its own process group: a Ctrl-C in the terminal that ran `up` does not reach it.
        .process_group(0)
        .spawn()
        .map_err(io_err("starting the lab daemon"))?;
    let mut reader = std::io::BufReader::new(
        std::fs::File::open(lab.daemon_log()).map_err(io_err("reading daemon.log"))?,
    );
    let started = Instant::now();
    loop {
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            if let Some(msg) = line.trim_end().strip_prefix("[lab] ") {
                progress(msg);
            }
            line.clear();
        }
        let _ = reader.stream_position();
        if lab.ready_file().exists() {
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            let log = std::fs::read_to_string(lab.daemon_log()).unwrap_or_default();
            net::sweep(lab);
            return Err(LabError::State(format!(
                "the lab daemon exited ({st}) while starting; nothing was left behind. Its log:\n{}",
                log.trim_end()
            )));
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            net::sweep(lab);
            return Err(LabError::State(
                "the lab did not become ready within 60s; it was removed".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(format!(
        "lab {:?} is up: API server {} (and {}:{} in the node), node {} ({}/16)\nstate and logs: {}",
        lab.name,
        lab.socket().display(),
        super::NODE_IP,
        super::API_PORT,
        lab.node_ns(),
        super::NODE_IP,
        lab.dir.display()
    ))
}

/// Render the Helm chart for the lab (release namespace istio-system) into the lab's directory,
/// when helm and the chart are here: the daemon then runs the injector and registers the webhook
/// exactly as the chart does. `FERRY_HELM` / `FERRY_CHART` override where they are looked for.
fn render_chart(lab: &Lab, progress: &mut dyn FnMut(&str)) -> Result<(), LabError> {
    let target = lab
        .bin_dir
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let helm = std::env::var_os("FERRY_HELM")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| target.join("tools/helm/helm"));
    let chart = std::env::var_os("FERRY_CHART")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| target.parent().unwrap_or(&target).join("charts/ferry"));
    if !helm.exists() || !chart.join("Chart.yaml").exists() {
        progress(&format!(
            "helm ({}) or the chart ({}) not found: using the built-in webhook configuration",
            helm.display(),
            chart.display()
        ));
        return Ok(());
    }
    let out = Command::new(&helm)
        .arg("template")
        .arg("lab")
        .arg(&chart)
        .args([
            "-n",
            super::control::RELEASE_NAMESPACE,
            "--set",
            "injector.replicas=1",
        ])
        .output()
        .map_err(io_err(format!("running {}", helm.display())))?;
    if !out.status.success() {
        return Err(LabError::State(format!(
            "helm template {} failed: {}",
            chart.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::write(lab.dir.join("chart.yaml"), &out.stdout)
        .map_err(io_err("writing chart.yaml"))?;
    progress(&format!(
        "rendered {} with helm: the lab runs the chart's webhook configuration, ConfigMap and injector arguments",
        chart.display()
    ));
    Ok(())
}

/// Stop the lab (the daemon drains its pods) and remove everything it created, running or not.
pub fn down(lab: &Lab, progress: &mut dyn FnMut(&str)) -> Result<String, LabError> {
    preflight()?;
    let mut stopped = false;
    if let Some(pid) = net::daemon_pid(lab) {
        progress("stopping pods and the daemon");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        let started = Instant::now();
        while net::is_lab_process(pid) && started.elapsed() < Duration::from_secs(40) {
            std::thread::sleep(Duration::from_millis(50));
        }
        stopped = true;
    }
    let swept = net::sweep(lab);
    let left: Vec<String> = net::netns_list()
        .into_iter()
        .filter(|n| n.starts_with(&lab.prefix()))
        .collect();
    if !left.is_empty() {
        return Err(LabError::State(format!(
            "could not remove network namespaces {}; see `ip netns pids NAME`",
            left.join(", ")
        )));
    }
    let leftovers = if swept.namespaces + swept.processes > 0 {
        format!(
            " (swept {} leftover network namespaces and {} processes)",
            swept.namespaces, swept.processes
        )
    } else {
        String::new()
    };
    Ok(match (stopped, swept.is_empty()) {
        (false, true) => format!("no lab named {:?}: nothing to remove", lab.name),
        (true, _) => format!(
            "lab {:?} stopped: pods drained; namespaces, processes, rules and files removed{leftovers}",
            lab.name
        ),
        (false, false) => format!(
            "lab {:?} was not running; cleaned up after it{leftovers}",
            lab.name
        ),
    })
}

/// Parse multi-document YAML into objects (empty documents skipped); errors name the document.
pub fn parse_yaml(text: &str, source: &str) -> Result<Vec<Value>, LabError> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(doc)
            .map_err(|e| LabError::Invalid(format!("{source}: YAML document {}: {e}", i + 1)))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// `kubectl apply -f`: every document checked first (nothing is applied if one is bad), then
/// created or replaced in order. Returns the lines kubectl would print; server refusals are
/// reported per object and make the whole call an error after the rest were tried.
pub async fn apply(
    lab: &Lab,
    text: &str,
    source: &str,
    default_ns: &str,
) -> Result<String, LabError> {
    let docs = parse_yaml(text, source)?;
    let mut prepared = Vec::new();
    let mut warnings = Vec::new();
    for (i, d) in docs.into_iter().enumerate() {
        let (obj, w) = model::prepare(d, default_ns).map_err(|e| {
            LabError::Invalid(format!(
                "{source}: document {}: {e}; nothing was applied",
                i + 1
            ))
        })?;
        warnings.extend(w.into_iter().map(|w| {
            format!(
                "Warning: {} {}: {w}",
                obj["kind"].as_str().unwrap_or(""),
                obj["metadata"]["name"].as_str().unwrap_or("")
            )
        }));
        prepared.push(obj);
    }
    let api = ApiClient::new(lab);
    let mut out: Vec<String> = warnings;
    let mut failed = Vec::new();
    for obj in prepared {
        let kind = obj["kind"].as_str().unwrap_or_default();
        let info = model::kind_info(kind).ok_or_else(|| LabError::Unsupported(kind.into()))?;
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let ns = obj["metadata"]["namespace"].as_str().map(str::to_owned);
        let coll = info.path(ns.as_deref());
        let r = api.request("POST", &coll, Some(&obj)).await?;
        let verdict = match r.code {
            200 | 201 => Ok("created"),
            409 => {
                let path = format!("{coll}/{name}");
                let cur = api.get(&path).await?;
                // Unchanged if everything the file says is already so (server-filled fields
                // such as a ClusterIP or added labels do not count as changes).
                let unchanged = is_subset(&obj["spec"], &cur["spec"])
                    && is_subset(&obj["data"], &cur["data"])
                    && obj.get("stringData").is_none()
                    && is_subset(&obj["metadata"]["labels"], &cur["metadata"]["labels"])
                    && is_subset(
                        &obj["metadata"]["annotations"],
                        &cur["metadata"]["annotations"],
                    )
                    && is_subset(&obj["webhooks"], &cur["webhooks"]);
                if unchanged || (kind == "Pod" && same_user_pod(&obj, &cur)) {
                    Ok("unchanged")
                } else {
                    let r = api.request("PUT", &path, Some(&obj)).await?;
                    if r.code == 200 {
                        Ok("configured")
                    } else {
                        Err(r)
                    }
                }
            }
            _ => Err(r),
        };
        match verdict {
            Ok(v) => out.push(format!("{} {v}", info.display(&name))),
            Err(r) => {
                let msg = format!(
                    "Error from server ({}): error when applying {} from {source:?}: {}",
                    r.reason(),
                    info.display(&name),
                    r.message()
                );
                out.push(msg.clone());
                failed.push(msg);
            }
        }
    }
    if failed.is_empty() {
        Ok(out.join("\n"))
    } else {
        Err(LabError::Api(out.join("\n")))
    }
}

/// Whether `a` says nothing that `b` does not (objects: every key of `a`, recursively; arrays:
/// element by element; `null` in `a` says nothing).
fn is_subset(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, _) => true,
        (Value::Object(x), Value::Object(y)) => x
            .iter()
            .all(|(k, v)| v.is_null() || y.get(k).is_some_and(|w| is_subset(v, w))),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| is_subset(p, q))
        }
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// A re-applied Pod that was injected is "unchanged" if the user's own containers are the same.
fn same_user_pod(mine: &Value, stored: &Value) -> bool {
    let names = |v: &Value| -> Vec<Value> {
        v["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["name"] != "istio-proxy")
            .map(|c| serde_json::json!([c["name"], c["image"]]))
            .collect()
    };
    names(mine) == names(stored)
}

/// `kubectl delete -f`.
pub async fn delete_file(
    lab: &Lab,
    text: &str,
    source: &str,
    default_ns: &str,
) -> Result<String, LabError> {
    let api = ApiClient::new(lab);
    let mut out = Vec::new();
    for d in parse_yaml(text, source)? {
        let (obj, _) = model::prepare(d, default_ns)?;
        let info = model::kind_info(obj["kind"].as_str().unwrap_or_default())
            .ok_or_else(|| LabError::Unsupported("kind".into()))?;
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        let path = format!(
            "{}/{name}",
            info.path(obj["metadata"]["namespace"].as_str())
        );
        let r = api.request("DELETE", &path, None).await?;
        out.push(match r.code {
            200 => format!("{} deleted", info.display(name)),
            404 => format!("{} not found", info.display(name)),
            _ => format!("Error from server ({}): {}", r.reason(), r.message()),
        });
    }
    Ok(out.join("\n"))
}

/// `kubectl delete KIND NAME`.
pub async fn delete(lab: &Lab, kind: &str, name: &str, ns: &str) -> Result<String, LabError> {
    let info = lookup_kind(kind)?;
    let r = ApiClient::new(lab)
        .request("DELETE", &format!("{}/{name}", info.path(Some(ns))), None)
        .await?;
    match r.code {
        200 => Ok(format!("{} deleted", info.display(name))),
        _ => Err(LabError::Api(format!(
            "Error from server ({}): {}",
            r.reason(),
            r.message()
        ))),
    }
}

fn lookup_kind(kind: &str) -> Result<&'static KindInfo, LabError> {
    model::kind_by_alias(kind).ok_or_else(|| {
        LabError::Unsupported(format!(
            "the lab has no resource type {kind:?}; it has {}",
            model::KINDS
                .iter()
                .map(|k| k.aliases[0])
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// Objects of a kind: one namespace, or all (`ns = None`).
pub async fn list(lab: &Lab, kind: &str, ns: Option<&str>) -> Result<Vec<Value>, LabError> {
    let info = lookup_kind(kind)?;
    let v = ApiClient::new(lab).get(&info.path(ns)).await?;
    Ok(v["items"].as_array().cloned().unwrap_or_default())
}

/// One object.
pub async fn get_one(lab: &Lab, kind: &str, name: &str, ns: &str) -> Result<Value, LabError> {
    let info = lookup_kind(kind)?;
    ApiClient::new(lab)
        .get_opt(&format!("{}/{name}", info.path(Some(ns))))
        .await?
        .ok_or_else(|| {
            LabError::Api(format!(
                "Error from server (NotFound): {} {name:?} not found",
                info.plural
            ))
        })
}

/// What `kubectl get pods` shows as STATUS.
pub fn pod_status_text(pod: &Value) -> String {
    let st = &pod["status"];
    let inits = st["initContainerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let n_init = pod["spec"]["initContainers"].as_array().map_or(0, Vec::len);
    for c in &inits {
        if let Some(r) = c["state"]["waiting"]["reason"].as_str()
            && r != "ContainerCreating"
        {
            return format!("Init:{r}");
        }
        if c["state"]["terminated"]["exitCode"]
            .as_i64()
            .is_some_and(|c| c != 0)
        {
            return "Init:Error".into();
        }
    }
    let phase = st["phase"].as_str().unwrap_or("Pending");
    if phase == "Pending" && n_init > 0 {
        let done = inits
            .iter()
            .filter(|c| c["state"]["terminated"]["exitCode"] == 0 || c["started"] == true)
            .count();
        if done < n_init {
            return format!("Init:{done}/{n_init}");
        }
    }
    for c in st["containerStatuses"].as_array().into_iter().flatten() {
        if let Some(r) = c["state"]["waiting"]["reason"].as_str()
            && r != "ContainerCreating"
        {
            return r.to_owned();
        }
    }
    if phase == "Pending" && st["podIP"].is_string() {
        return "PodInitializing".into();
    }
    if phase == "Pending" {
        return "ContainerCreating".into();
    }
    phase.to_owned()
}

fn table(rows: Vec<Vec<String>>) -> String {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .map(|(i, c)| {
                    if i + 1 == r.len() {
                        c.clone()
                    } else {
                        format!("{c:<w$}   ", w = widths[i])
                    }
                })
                .collect::<String>()
                .trim_end()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A label map as `k=v,k=v` (`<none>` when absent).
fn pairs(v: &Value) -> String {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", s(v)))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_else(|| "<none>".into())
}

/// The items of a list, each rendered by `f`, comma-separated.
fn joined(list: &Value, f: impl Fn(&Value) -> String) -> String {
    list.as_array()
        .into_iter()
        .flatten()
        .map(f)
        .collect::<Vec<_>>()
        .join(",")
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "<none>".into(),
        v => v.to_string(),
    }
}

/// `kubectl get` as a table (`wide` adds columns).
pub fn render_table(
    kind: &str,
    items: &[Value],
    all_namespaces: bool,
    wide: bool,
) -> Result<String, LabError> {
    let info = lookup_kind(kind)?;
    let mut header: Vec<&str> = Vec::new();
    if all_namespaces && info.namespaced {
        header.push("NAMESPACE");
    }
    header.push("NAME");
    let cols: Vec<&str> = match info.kind {
        "Pod" if wide => vec!["READY", "STATUS", "RESTARTS", "IP", "CONTAINERS"],
        "Pod" => vec!["READY", "STATUS", "RESTARTS", "IP"],
        "Service" => vec!["TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "SELECTOR"],
        "Gateway" => vec!["SELECTOR", "SERVERS"],
        "Secret" => vec!["TYPE", "DATA"],
        "Deployment" => vec!["READY", "UP-TO-DATE", "AVAILABLE"],
        "Namespace" => vec!["STATUS", "LABELS"],
        "VirtualService" => vec!["GATEWAYS", "HOSTS"],
        "DestinationRule" => vec!["HOST", "SUBSETS"],
        "EndpointSlice" => vec!["ADDRESSTYPE", "PORTS", "ENDPOINTS"],
        _ => vec!["WEBHOOKS"],
    };
    header.extend(cols);
    let mut rows = vec![header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>()];
    for it in items {
        let mut r = Vec::new();
        if all_namespaces && info.namespaced {
            r.push(s(&it["metadata"]["namespace"]));
        }
        r.push(s(&it["metadata"]["name"]));
        let spec = &it["spec"];
        match info.kind {
            "Pod" => {
                let statuses: Vec<Value> = it["status"]["containerStatuses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .chain(
                        it["status"]["initContainerStatuses"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter(|c| c["started"].is_boolean()),
                    )
                    .cloned()
                    .collect();
                let total = spec["containers"].as_array().map_or(0, Vec::len)
                    + spec["initContainers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|c| c["restartPolicy"] == "Always")
                        .count();
                let ready = statuses.iter().filter(|c| c["ready"] == true).count();
                let restarts: u64 = statuses
                    .iter()
                    .filter_map(|c| c["restartCount"].as_u64())
                    .sum();
                r.push(format!("{ready}/{total}"));
                r.push(pod_status_text(it));
                r.push(restarts.to_string());
                r.push(
                    it["status"]["podIP"]
                        .as_str()
                        .unwrap_or("<none>")
                        .to_owned(),
                );
                if wide {
                    let names = |f: &str| -> Vec<String> {
                        spec[f]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|c| c["name"].as_str().map(str::to_owned))
                            .collect()
                    };
                    let init = names("initContainers");
                    let main = names("containers");
                    r.push(if init.is_empty() {
                        main.join(",")
                    } else {
                        format!("{} (init: {})", main.join(","), init.join(","))
                    });
                }
            }
            "Service" => {
                r.push(s(&spec["type"]));
                r.push(s(&spec["clusterIP"]));
                r.push(s(&it["status"]["loadBalancer"]["ingress"][0]["ip"]));
                r.push(
                    spec["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| {
                            let proto = p["protocol"].as_str().unwrap_or("TCP");
                            match p["nodePort"].as_u64() {
                                Some(n) => format!("{}:{n}/{proto}", s(&p["port"])),
                                None => format!("{}/{proto}", s(&p["port"])),
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(","),
                );
                r.push(pairs(&spec["selector"]));
            }
            "Deployment" => {
                let st = &it["status"];
                r.push(format!(
                    "{}/{}",
                    st["readyReplicas"].as_u64().unwrap_or(0),
                    spec["replicas"].as_u64().unwrap_or(1)
                ));
                r.push(st["updatedReplicas"].as_u64().unwrap_or(0).to_string());
                r.push(st["availableReplicas"].as_u64().unwrap_or(0).to_string());
            }
            "Namespace" => {
                r.push(s(&it["status"]["phase"]));
                r.push(pairs(&it["metadata"]["labels"]));
            }
            "VirtualService" => {
                r.push(s(&spec["gateways"]));
                r.push(s(&spec["hosts"]));
            }
            "DestinationRule" => {
                r.push(s(&spec["host"]));
                r.push(joined(&spec["subsets"], |x| s(&x["name"])));
            }
            "Gateway" => {
                r.push(pairs(&spec["selector"]));
                r.push(joined(&spec["servers"], |x| {
                    format!(
                        "{}/{}",
                        s(&x["port"]["number"]),
                        x["port"]["protocol"].as_str().unwrap_or("HTTP")
                    )
                }));
            }
            "Secret" => {
                r.push(s(&it["type"]));
                r.push(it["data"].as_object().map_or(0, |m| m.len()).to_string());
            }
            "EndpointSlice" => {
                r.push(s(&it["addressType"]));
                r.push(joined(&it["ports"], |p| s(&p["port"])));
                r.push(
                    it["endpoints"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|e| {
                            format!(
                                "{}{}",
                                s(&e["addresses"][0]),
                                if e["conditions"]["ready"] == false {
                                    "(not ready)"
                                } else {
                                    ""
                                }
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(","),
                );
            }
            _ => r.push(it["webhooks"].as_array().map_or(0, Vec::len).to_string()),
        }
        rows.push(r);
    }
    if rows.len() == 1 {
        return Ok("No resources found.".into());
    }
    Ok(table(rows))
}

/// The container `exec`/`logs` mean: `-c`, else the pod's default-container annotation, else
/// the first container.
pub fn pick_container<'a>(pod: &'a Value, want: Option<&str>) -> Result<&'a Value, LabError> {
    let all: Vec<&Value> = model::containers(&pod["spec"]).collect();
    let name = want
        .map(str::to_owned)
        .or_else(|| {
            pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"]
                .as_str()
                .map(str::to_owned)
        })
        .or_else(|| {
            pod["spec"]["containers"][0]["name"]
                .as_str()
                .map(str::to_owned)
        })
        .unwrap_or_default();
    all.iter()
        .find(|c| c["name"].as_str() == Some(&name))
        .copied()
        .ok_or_else(|| {
            LabError::Invalid(format!(
                "container {name:?} is not valid for pod {}; choose one of: {}",
                s(&pod["metadata"]["name"]),
                all.iter()
                    .map(|c| s(&c["name"]))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

/// The command line `exec` runs: inside the pod's network namespace (its hosts file as
/// /etc/hosts), as the container's user, with the container's environment.
pub async fn exec_command(
    lab: &Lab,
    pod_name: &str,
    ns: &str,
    container: Option<&str>,
    cmd: &[String],
) -> Result<Command, LabError> {
    if cmd.is_empty() {
        return Err(LabError::Invalid("exec: give a command after `--`".into()));
    }
    let pod = get_one(lab, "pods", pod_name, ns).await?;
    let c = pick_container(&pod, container)?;
    let netns = lab.netns_of(&pod).ok_or_else(|| {
        LabError::State(format!(
            "pod {pod_name} has no IP yet (status {}); try again when it is running",
            pod_status_text(&pod)
        ))
    })?;
    let ip = pod["status"]["podIP"]
        .as_str()
        .and_then(|i| i.parse().ok())
        .unwrap_or(super::NODE_IP);
    let node = model::NodeInfo {
        name: super::NODE_NAME.into(),
        ip: super::NODE_IP,
        cpus: 1,
        memory_bytes: 0,
    };
    let env = model::container_env(&pod, c, ip, &node).unwrap_or_default();
    let plan_ids = model::plan_process(&pod, c, ip, &node, &|p: &str| Some(p.to_owned()));
    let (uid, gid) = plan_ids.map(|p| (p.uid, p.gid)).unwrap_or((0, 0));
    let mut command = Command::new("ip");
    command
        .args([
            "netns",
            "exec",
            &netns,
            "setpriv",
            "--reuid",
            &uid.to_string(),
            "--regid",
            &gid.to_string(),
            "--clear-groups",
            "env",
            "-i",
        ])
        .arg(format!("PATH={}", lab.path_env()))
        .arg(format!("HOSTNAME={pod_name}"))
        .arg("HOME=/");
    for (k, v) in env {
        command.arg(format!("{k}={v}"));
    }
    command.args(cmd);
    Ok(command)
}

/// Run `exec` and capture its output.
pub async fn exec_output(
    lab: &Lab,
    pod: &str,
    ns: &str,
    container: Option<&str>,
    cmd: &[&str],
) -> Result<std::process::Output, LabError> {
    let cmd: Vec<String> = cmd.iter().map(|s| (*s).to_owned()).collect();
    let mut c = exec_command(lab, pod, ns, container, &cmd).await?;
    tokio::task::spawn_blocking(move || c.output())
        .await
        .map_err(|e| LabError::State(e.to_string()))?
        .map_err(io_err("exec"))
}

/// `kubectl logs`.
pub async fn logs(
    lab: &Lab,
    pod_name: &str,
    ns: &str,
    container: Option<&str>,
) -> Result<String, LabError> {
    let pod = get_one(lab, "pods", pod_name, ns).await?;
    let c = pick_container(&pod, container)?;
    let cname = c["name"].as_str().unwrap_or_default();
    let path = lab.log_path(ns, pod_name, cname);
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(LabError::State(format!(
            "container {cname:?} in pod {pod_name:?} has not started yet (status {})",
            pod_status_text(&pod)
        ))),
        Err(e) => Err(LabError::Io {
            what: path.display().to_string(),
            source: e,
        }),
    }
}

/// Wait until every Pod in `ns` is Ready (and at least `min` exist); the last listing on timeout.
pub async fn wait_ready(
    lab: &Lab,
    ns: &str,
    min: usize,
    limit: Duration,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Value>, LabError> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let pods = list(lab, "pods", Some(ns)).await?;
        let ready = pods.iter().filter(|p| model::pod_ready(p)).count();
        let line = format!("{ready}/{} pods ready in {ns}", pods.len().max(min));
        if line != last {
            progress(&line);
            last = line;
        }
        if pods.len() >= min && ready == pods.len() {
            return Ok(pods);
        }
        if started.elapsed() > limit {
            return Err(LabError::State(format!(
                "pods in {ns} not ready after {limit:?}:\n{}",
                render_table("pods", &pods, false, true)?
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn server_filled_fields_are_not_changes() {
        let applied = json!({"selector": {"app": "a"}, "ports": [{"port": 80}]});
        let stored = json!({"selector": {"app": "a"}, "ports": [{"port": 80, "protocol": "TCP"}], "clusterIP": "10.96.0.11"});
        assert!(is_subset(&applied, &stored));
        assert!(!is_subset(&json!({"ports": [{"port": 81}]}), &stored));
        assert!(!is_subset(
            &json!({"ports": [{"port": 80}, {"port": 81}]}),
            &stored
        ));
        assert!(!is_subset(&json!({"type": "NodePort"}), &stored));
        assert!(is_subset(
            &json!({"replicas": 2}),
            &json!({"replicas": 2.0})
        ));
    }

    #[test]
    fn pod_status_reads_like_kubectl() {
        let pod = |st: Value| json!({"spec": {"initContainers": [{"name": "istio-init"}, {"name": "istio-proxy", "restartPolicy": "Always"}]}, "status": st});
        assert_eq!(
            pod_status_text(&pod(json!({"phase": "Pending"}))),
            "Init:0/2"
        );
        assert_eq!(
            pod_status_text(&pod(
                json!({"phase": "Pending", "initContainerStatuses": [{"state": {"terminated": {"exitCode": 1}}}]})
            )),
            "Init:Error"
        );
        assert_eq!(
            pod_status_text(&pod(
                json!({"phase": "Running", "initContainerStatuses": [{"state": {"terminated": {"exitCode": 0}}}, {"started": true, "state": {"running": {}}}],
                "containerStatuses": [{"state": {"waiting": {"reason": "CrashLoopBackOff"}}}]})
            )),
            "CrashLoopBackOff"
        );
        assert_eq!(
            pod_status_text(&pod(json!({"phase": "Succeeded"}))),
            "Succeeded"
        );
    }
}
