//! The README demo (`ferry-lab demo`): a canary release in the lab with unmodified Kubernetes and
//! Istio YAML — a 90/10 split measured over 1,000 requests, what injection did to a pod, the
//! capture rules and the proxy's routes, then header-based routing — and cleanup.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::echo::Tally;
use super::{Lab, LabError, cli};

pub const APP: &str = r#"apiVersion: v1
kind: Namespace
metadata:
  name: canary
  labels: {istio-injection: enabled}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: app-v1, namespace: canary}
spec:
  replicas: 1
  selector: {matchLabels: {app: app, version: v1}}
  template:
    metadata: {labels: {app: app, version: v1}}
    spec:
      containers:
      - name: app
        image: registry.example.com/canary/app:1.0
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /ready, port: 8080}, periodSeconds: 2}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: app-v2, namespace: canary}
spec:
  replicas: 1
  selector: {matchLabels: {app: app, version: v2}}
  template:
    metadata: {labels: {app: app, version: v2}}
    spec:
      containers:
      - name: app
        image: registry.example.com/canary/app:2.0
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /ready, port: 8080}, periodSeconds: 2}
---
apiVersion: v1
kind: Service
metadata: {name: app, namespace: canary}
spec:
  selector: {app: app}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: client, namespace: canary}
spec:
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      containers:
      - name: client
        image: curlimages/curl:8.10.1
        command: [sleep, "365d"]
"#;

pub const SPLIT: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: app, namespace: canary}
spec:
  host: app
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: app, namespace: canary}
spec:
  hosts: [app]
  http:
  - route:
    - {destination: {host: app, subset: v1}, weight: 90}
    - {destination: {host: app, subset: v2}, weight: 10}
"#;

pub const BY_HEADER: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: app, namespace: canary}
spec:
  hosts: [app]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: app, subset: v2}}]
  - route: [{destination: {host: app, subset: v1}}]
"#;

fn step(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

fn indent(text: &str, prefix: &str) -> String {
    text.lines().map(|l| format!("{prefix}{l}\n")).collect()
}

/// Send `n` requests to `url` from a pod (through its sidecar, if it has one) and return the
/// tally.
pub async fn load_from(
    lab: &Lab,
    ns: &str,
    client: &str,
    url: &str,
    n: u64,
    headers: &[&str],
) -> Result<Tally, LabError> {
    let count = n.to_string();
    let mut cmd = vec!["ferry-lab", "http", url, "-n", &count, "--json"];
    for h in headers {
        cmd.extend(["-H", h]);
    }
    let out = cli::exec_output(lab, client, ns, None, &cmd).await?;
    serde_json::from_slice(&out.stdout).map_err(|e| {
        LabError::State(format!(
            "load client output unreadable ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    })
}

/// A small table: version, configured share, observed share, a bar.
pub fn split_table(t: &Tally, configured: &BTreeMap<&str, u32>) -> String {
    let total = t.requests.max(1) as f64;
    let mut out = format!(
        "   {:<8} {:>10} {:>9}\n",
        "version", "configured", "observed"
    );
    let mut versions: Vec<&str> = configured.keys().copied().collect();
    for v in t.by_version.keys() {
        if !versions.contains(&v.as_str()) {
            versions.push(v);
        }
    }
    for v in versions {
        let seen = *t.by_version.get(v).unwrap_or(&0) as f64 / total * 100.0;
        let want = configured
            .get(v)
            .map_or("-".to_owned(), |w| format!("{w}%"));
        let bar = "█".repeat((seen / 2.0).round() as usize);
        out.push_str(&format!("   {v:<8} {want:>10} {seen:>8.1}%  {bar}\n"));
    }
    if t.errors > 0 {
        out.push_str(&format!(
            "   errors: {} (first: {})\n",
            t.errors,
            t.first_error.as_deref().unwrap_or("?")
        ));
    }
    out
}

fn pod_named<'a>(pods: &'a [serde_json::Value], prefix: &str) -> Result<&'a str, LabError> {
    pods.iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .find(|n| n.starts_with(prefix))
        .ok_or_else(|| LabError::State(format!("no pod {prefix}-* in the lab")))
}

pub fn run(lab: &Lab, keep: bool) -> Result<(), LabError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(super::io_err("runtime"))?;
    step("1. ferry-lab up: API server, ferry-injector webhook, node namespace");
    let mut progress = |m: &str| println!("   … {m}");
    println!(
        "{}",
        indent(&cli::up(lab, &mut progress)?, "   ").trim_end()
    );
    let result = rt.block_on(scenario(lab));
    if keep {
        println!("\n(lab left running: `ferry-lab down` removes it)");
    } else {
        step("7. ferry-lab down: pods drained, namespaces, processes and rules removed");
        println!(
            "   {}",
            cli::down(lab, &mut |m: &str| println!("   … {m}"))?
        );
    }
    result
}

async fn scenario(lab: &Lab) -> Result<(), LabError> {
    let ns = "canary";
    step(
        "2. namespace canary (istio-injection=enabled), app v1 + v2, a client; pods created through the webhook",
    );
    println!(
        "{}",
        indent(
            &cli::apply(lab, APP, "canary.yaml", "default").await?,
            "   "
        )
    );
    let mut progress = |m: &str| println!("   … {m}");
    let pods = cli::wait_ready(lab, ns, 3, Duration::from_secs(90), &mut progress).await?;
    println!(
        "{}",
        indent(&cli::render_table("pods", &pods, false, true)?, "   ")
    );
    let client = pod_named(&pods, "client")?.to_owned();
    let v1 = pod_named(&pods, "app-v1")?.to_owned();

    step("3. DestinationRule (subsets v1/v2) + VirtualService 90/10, unmodified Istio YAML");
    print!("{}", indent(SPLIT, "   | "));
    println!(
        "{}",
        indent(&cli::apply(lab, SPLIT, "split.yaml", ns).await?, "   ")
    );
    wait_for_routes(lab, ns, &client, "weight").await?;
    println!("   1,000 requests from {client} to http://app/ (through its sidecar):");
    let t = load_from(lab, ns, &client, "http://app/", 1000, &[]).await?;
    print!(
        "{}",
        split_table(&t, &BTreeMap::from([("v1", 90), ("v2", 10)]))
    );

    step(&format!("4. what injection did to {v1}"));
    let pod = cli::get_one(lab, "pods", &v1, ns).await?;
    for (kind, list) in [
        ("init", &pod["spec"]["initContainers"]),
        ("container", &pod["spec"]["containers"]),
    ] {
        for c in list.as_array().into_iter().flatten() {
            let uid = c["securityContext"]["runAsUser"]
                .as_u64()
                .map_or(String::new(), |u| format!(", runAsUser {u}"));
            let sidecar = if c["restartPolicy"] == "Always" {
                " (native sidecar)"
            } else {
                ""
            };
            let args: Vec<&str> = c["args"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str())
                .take(6)
                .collect();
            println!(
                "   {kind:<9} {:<12} {}{sidecar}{uid}{}",
                c["name"].as_str().unwrap_or_default(),
                c["image"].as_str().unwrap_or_default(),
                if args.is_empty() {
                    String::new()
                } else {
                    format!("\n             args: {} …", args.join(" "))
                }
            );
        }
    }
    println!(
        "   readinessProbe rewritten to: {}",
        pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]
    );
    let netns = lab.netns_of(&pod).unwrap_or_default();
    println!("   iptables -t nat in the pod (installed by istio-init = ferry-init):");
    let rules = super::net::run(&["ip", "netns", "exec", &netns, "iptables-save", "-t", "nat"])?;
    print!(
        "{}",
        indent(
            &rules
                .lines()
                .filter(|l| l.starts_with("-A") || l.starts_with(':'))
                .collect::<Vec<_>>()
                .join("\n"),
            "     "
        )
    );
    println!(
        "   ferry-proxy config routes -o json (in {client}'s sidecar), one line per resource:"
    );
    let out = cli::exec_output(
        lab,
        &client,
        ns,
        Some("istio-proxy"),
        &["ferry-proxy", "config", "routes", "-o", "json"],
    )
    .await?;
    let routes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    for r in routes.as_array().into_iter().flatten() {
        println!(
            "     {} {}/{}: {}",
            r["kind"].as_str().unwrap_or("?"),
            r["metadata"]["namespace"].as_str().unwrap_or("?"),
            r["metadata"]["name"].as_str().unwrap_or("?"),
            r["spec"]
        );
    }

    step("5. header-based routing: end-user: jason → v2, everyone else → v1");
    print!("{}", indent(BY_HEADER, "   | "));
    println!(
        "{}",
        indent(
            &cli::apply(lab, BY_HEADER, "by-header.yaml", ns).await?,
            "   "
        )
    );
    wait_for_routes(lab, ns, &client, "jason").await?;
    let jason = load_from(lab, ns, &client, "http://app/", 200, &["end-user: jason"]).await?;
    println!("   200 requests with end-user: jason");
    print!("{}", split_table(&jason, &BTreeMap::from([("v2", 100)])));
    let others = load_from(lab, ns, &client, "http://app/", 200, &[]).await?;
    println!("   200 requests without the header");
    print!("{}", split_table(&others, &BTreeMap::from([("v1", 100)])));

    step("6. the client sidecar's metrics (istio_requests_total)");
    let out = cli::exec_output(
        lab,
        &client,
        ns,
        Some("istio-proxy"),
        &[
            "ferry-lab",
            "http",
            "http://127.0.0.1:15090/stats/prometheus",
        ],
    )
    .await?;
    for l in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("istio_requests_total"))
    {
        let short: Vec<&str> = l
            .split(['{', '}', ','])
            .filter(|kv| {
                kv.starts_with("destination_version")
                    || kv.starts_with("response_code")
                    || kv.starts_with("destination_service_name")
                    || !kv.contains('=')
            })
            .collect();
        println!("   {}", short.join(" "));
    }
    Ok(())
}

/// Wait until the client's sidecar has the VirtualService's latest routes (its config dump
/// mentions `needle`).
pub async fn wait_for_routes(
    lab: &Lab,
    ns: &str,
    client: &str,
    needle: &str,
) -> Result<(), LabError> {
    let started = Instant::now();
    loop {
        let out = cli::exec_output(
            lab,
            client,
            ns,
            Some("istio-proxy"),
            &["ferry-proxy", "config", "routes", "-o", "json"],
        )
        .await?;
        if String::from_utf8_lossy(&out.stdout).contains(needle) {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(20) {
            return Err(LabError::State(format!(
                "the client's sidecar did not pick up the VirtualService within 20s: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
