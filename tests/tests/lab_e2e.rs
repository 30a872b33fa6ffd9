//! End to end through the lab (`ferry-lab`): real Kubernetes and Istio YAML applied to the lab's
//! API server, pods admitted by the real injector over HTTPS, run by the lab's kubelet in network
//! namespaces with `ferry-init` and `ferry-proxy` (UID 1337), traffic measured from inside pods.
//! Needs root; under `CI=true` these fail rather than skip.

use std::time::Duration;

use ferry_tests::lab::testing::{TestLab, exec_stdout, first_with_prefix, pods_by_name, rt};
use ferry_tests::lab::{cli, demo, net};
use serde_json::Value;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: legacy, namespace: plain}
spec:
  selector: {matchLabels: {app: legacy}}
  template:
    metadata: {labels: {app: legacy, version: old}}
    spec:
      containers:
      - {name: legacy, image: example.com/legacy:1, ports: [{containerPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: plain}
spec:
  selector: {app: legacy}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: plain-client, namespace: plain}
spec:
  containers: [{name: c, image: curlimages/curl, command: [sleep, "3600"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: opted-in, namespace: plain, labels: {sidecar.istio.io/inject: "true"}}
spec:
  containers: [{name: c, image: curlimages/curl, command: [sleep, "3600"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: canary, labels: {sidecar.istio.io/inject: "false"}}
spec:
  containers: [{name: c, image: curlimages/curl, command: [sleep, "3600"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: hostnet, namespace: canary}
spec:
  hostNetwork: true
  containers: [{name: c, image: curlimages/curl, command: [sleep, "3600"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: sys, namespace: kube-system, labels: {sidecar.istio.io/inject: "true"}}
spec:
  containers: [{name: c, image: curlimages/curl, command: [sleep, "3600"]}]
---
apiVersion: v1
kind: Service
metadata: {name: app-tcp, namespace: canary}
spec:
  selector: {app: app}
  ports: [{name: tcp-echo, port: 9000, targetPort: 8080}]
"#;

fn injected(pod: &Value) -> bool {
    let names = |f: &str| -> Vec<String> {
        pod["spec"][f]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(str::to_owned))
            .collect()
    };
    let all = [names("initContainers"), names("containers")].concat();
    let has = |n: &str| all.iter().any(|c| c == n);
    assert_eq!(
        has("istio-init"),
        has("istio-proxy"),
        "half-injected pod: {all:?}"
    );
    has("istio-proxy")
}

#[test]
fn lab_runs_the_mesh_like_a_cluster() {
    if !ferry_tests::netns::require_root("lab_runs_the_mesh_like_a_cluster") {
        return;
    }
    let t = TestLab::up();
    let lab = &t.0;
    let prefix = lab.prefix();
    rt().block_on(async {
        // With helm at hand (always under CI) the lab runs the chart's control plane: its
        // webhook configuration, with the caBundle set by the injector's own certificate manager.
        let helm =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/helm/helm");
        if helm.exists() || std::env::var("CI").as_deref() == Ok("true") {
            let mwcs = cli::list(lab, "mutatingwebhookconfigurations", None)
                .await
                .expect("mwc");
            assert_eq!(mwcs.len(), 1);
            assert_eq!(
                mwcs[0]["metadata"]["name"], "ferry-sidecar-injector",
                "the chart's webhook configuration"
            );
            assert!(
                mwcs[0]["webhooks"]
                    .as_array()
                    .expect("hooks")
                    .iter()
                    .all(|h| h["clientConfig"]["caBundle"].is_string()),
                "caBundle set by the injector"
            );
            cli::get_one(lab, "secrets", "ferry-injector-tls", "istio-system")
                .await
                .expect("the injector's certificate Secret");
        }
        cli::apply(lab, demo::APP, "app.yaml", "default")
            .await
            .expect("apply app");
        let applied = cli::apply(lab, CLUSTER, "cluster.yaml", "default")
            .await
            .expect("apply cluster");
        assert!(applied.contains("pod/opted-in created"), "{applied}");
        // Re-applying the same file changes nothing.
        let again = cli::apply(lab, CLUSTER, "cluster.yaml", "default")
            .await
            .expect("re-apply");
        assert!(
            again.lines().all(|l| l.ends_with("unchanged")),
            "re-apply: {again}"
        );
        let mut quiet = |_: &str| {};
        cli::wait_ready(lab, "canary", 5, Duration::from_secs(90), &mut quiet)
            .await
            .expect("canary ready");
        cli::wait_ready(lab, "plain", 3, Duration::from_secs(90), &mut quiet)
            .await
            .expect("plain ready");
        cli::wait_ready(lab, "kube-system", 1, Duration::from_secs(90), &mut quiet)
            .await
            .expect("kube-system ready");

        // Injection decided by the webhook configuration's selectors and the injector's policy.
        let canary = pods_by_name(lab, "canary").await;
        let plain = pods_by_name(lab, "plain").await;
        let system = pods_by_name(lab, "kube-system").await;
        let client = first_with_prefix(&canary, "client-");
        let v1 = first_with_prefix(&canary, "app-v1-");
        for (pod, want) in [
            (&canary[&client], true),
            (&canary[&v1], true),
            (&canary["opted-out"], false),
            (&canary["hostnet"], false),
            (&plain["opted-in"], true),
            (&plain["plain-client"], false),
            (&plain[&first_with_prefix(&plain, "legacy-")], false),
            (&system["sys"], false),
        ] {
            assert_eq!(
                injected(pod),
                want,
                "injection of {}/{}",
                pod["metadata"]["namespace"],
                pod["metadata"]["name"]
            );
        }
        // The injected proxy runs as UID 1337, really.
        let netns = lab.netns_of(&canary[&v1]).expect("netns");
        let pids = net::run(&["ip", "netns", "pids", &netns]).expect("pids");
        let proxy_uid = pids
            .lines()
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{}/status", p.trim())).ok())
            .filter(|s| s.contains("ferry-proxy"))
            .find_map(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_owned())
            });
        assert_eq!(
            proxy_uid.as_deref(),
            Some("1337"),
            "ferry-proxy's uid in {netns}"
        );

        // Canary split through the client's sidecar.
        cli::apply(lab, demo::SPLIT, "split.yaml", "canary")
            .await
            .expect("split");
        demo::wait_for_routes(lab, "canary", &client, "weight")
            .await
            .expect("routes");
        let t = demo::load_from(lab, "canary", &client, "http://app/", 1000, &[])
            .await
            .expect("load");
        assert_eq!((t.ok, t.errors), (1000, 0), "{t:?}");
        let v2 = *t.by_version.get("v2").unwrap_or(&0);
        assert!((70..=130).contains(&v2), "v2 got {v2}/1000, want 100±30");

        // Header routing.
        cli::apply(lab, demo::BY_HEADER, "by-header.yaml", "canary")
            .await
            .expect("header vs");
        demo::wait_for_routes(lab, "canary", &client, "jason")
            .await
            .expect("routes");
        let jason = demo::load_from(
            lab,
            "canary",
            &client,
            "http://app/",
            100,
            &["end-user: jason"],
        )
        .await
        .expect("jason");
        assert_eq!(jason.by_version.get("v2"), Some(&100), "{jason:?}");
        let others = demo::load_from(lab, "canary", &client, "http://app/", 100, &[])
            .await
            .expect("others");
        assert_eq!(others.by_version.get("v1"), Some(&100), "{others:?}");

        // HTTP/2 (prior knowledge) through both sidecars.
        let answer = exec_stdout(
            lab,
            &client,
            "canary",
            None,
            &["ferry-lab", "http", "--http2", "http://app/h2"],
        )
        .await;
        let v: Value = serde_json::from_str(answer.trim()).expect("h2 echo json");
        assert_eq!(
            (v["path"].as_str(), v["protocol"].as_str()),
            (Some("/h2"), Some("HTTP/2.0")),
            "{answer}"
        );

        // A pod without a sidecar reaches meshed pods through kube-proxy's DNAT; the meshed
        // pod's sidecar delivers it (the app sees 127.0.0.6).
        let answer = exec_stdout(
            lab,
            "plain-client",
            "plain",
            None,
            &["ferry-lab", "http", "http://app.canary/from-plain"],
        )
        .await;
        let v: Value = serde_json::from_str(answer.trim()).expect("echo json");
        assert_eq!(v["namespace"], "canary", "{answer}");
        assert!(
            v["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with("127.0.0.6:")),
            "delivered by the sidecar: {answer}"
        );
        // A meshed pod reaches a pod without a sidecar (short name in another namespace).
        let answer = exec_stdout(
            lab,
            &client,
            "canary",
            None,
            &[
                "ferry-lab",
                "http",
                "http://legacy.plain.svc.cluster.local/",
            ],
        )
        .await;
        assert!(answer.contains("\"version\":\"old\""), "{answer}");
        // Opaque TCP through both sidecars (a tcp- port is not parsed as HTTP).
        let line = exec_stdout(
            lab,
            &client,
            "canary",
            None,
            &["ferry-lab", "tcp", "app-tcp:9000", "hello"],
        )
        .await;
        let v: Value = serde_json::from_str(line.trim()).expect("tcp json");
        assert_eq!(
            (v["protocol"].as_str(), v["received"].as_str()),
            (Some("TCP"), Some("hello")),
            "{line}"
        );

        // The client's sidecar counted it all, by destination version.
        let metrics = exec_stdout(
            lab,
            &client,
            "canary",
            Some("istio-proxy"),
            &[
                "ferry-lab",
                "http",
                "http://127.0.0.1:15090/stats/prometheus",
            ],
        )
        .await;
        let count = |version: &str| -> u64 {
            metrics
                .lines()
                .filter(|l| {
                    l.starts_with("istio_requests_total{")
                        && l.contains("reporter=\"source\"")
                        && l.contains("source_workload=\"client\"")
                        && l.contains("destination_service_name=\"app\"")
                        && l.contains(&format!("destination_version=\"{version}\""))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum()
        };
        // 1,000 split + 100 as jason (v2) + 100 others and one HTTP/2 request (v1), each
        // counted once by version.
        let split_v2 = *t.by_version.get("v2").unwrap_or(&0);
        assert_eq!(count("v2"), split_v2 + 100, "v2 requests counted");
        assert_eq!(count("v1"), 1000 - split_v2 + 101, "v1 requests counted");

        // HTTP/1.1 between the sidecars is multiplexed over HTTP/2: twenty client connections
        // at once reach v2's sidecar over the connection its peer already has (a new one at
        // most), and the app still gets HTTP/1.1, without ferry's marker.
        let v2 = first_with_prefix(&canary, "app-v2-");
        let endpoints = exec_stdout(lab, &client, "canary", Some("istio-proxy"), &["ferry-proxy", "config", "endpoints"]).await;
        let v2_ip = canary[&v2]["status"]["podIP"].as_str().expect("v2 IP");
        assert!(
            endpoints.lines().any(|l| l.starts_with(&format!("{v2_ip}:")) && l.trim_end().ends_with("yes")),
            "v2 is known to have a sidecar: {endpoints}"
        );
        let counter = |pod: String, name: &'static str| async move {
            let m = exec_stdout(lab, &pod, "canary", Some("istio-proxy"), &["ferry-lab", "http", "http://127.0.0.1:15090/stats/prometheus"]).await;
            m.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{name} in {pod}: {m}"))
        };
        let inbound = "ferry_proxy_inbound_connections_total ";
        let outbound = "ferry_proxy_outbound_connections_total ";
        let (v2_in, client_out) = (counter(v2.clone(), inbound).await, counter(client.clone(), outbound).await);
        let burst = exec_stdout(lab, &client, "canary", None, &["ferry-lab", "http", "http://app/", "-n", "200", "-c", "20", "-H", "end-user: jason", "--json"]).await;
        let burst: Value = serde_json::from_str(burst.trim()).expect("tally json");
        assert_eq!((burst["ok"].as_u64(), burst["errors"].as_u64()), (Some(200), Some(0)), "{burst}");
        let opened_by_client = counter(client.clone(), outbound).await - client_out;
        let reached_v2 = counter(v2.clone(), inbound).await - v2_in;
        assert!(opened_by_client >= 20, "the client opened {opened_by_client} connections");
        assert!(reached_v2 <= 1, "{opened_by_client} client connections became {reached_v2} new connections at v2's sidecar");
        let answer = exec_stdout(lab, &client, "canary", None, &["ferry-lab", "http", "http://app/h1", "-H", "end-user: jason"]).await;
        let v: Value = serde_json::from_str(answer.trim()).expect("echo json");
        assert_eq!((v["version"].as_str(), v["protocol"].as_str()), (Some("v2"), Some("HTTP/1.1")), "{answer}");
        assert_eq!(v["host"], "app", "{answer}");
        assert!(v["headers"].get("x-ferry-orig-proto").is_none(), "{answer}");

        // A Job-like pod (restartPolicy Never) in the mesh: its one request goes through the
        // sidecar, and when the app container is done the native sidecar stops too, so the Pod
        // completes instead of running forever.
        let job = r#"apiVersion: v1
kind: Pod
metadata: {name: one-shot, namespace: canary}
spec:
  restartPolicy: Never
  containers: [{name: task, image: busybox, command: [ferry-lab, http, "http://app/job"]}]
"#;
        cli::apply(lab, job, "job.yaml", "canary")
            .await
            .expect("job");
        let started = std::time::Instant::now();
        let done = loop {
            let p = cli::get_one(lab, "pods", "one-shot", "canary")
                .await
                .expect("job pod");
            let sidecar_done = p["status"]["initContainerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["name"] == "istio-proxy" && c["state"]["terminated"].is_object());
            if p["status"]["phase"] == "Succeeded" && sidecar_done {
                break p;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "job never completed: {p}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(injected(&done));
        let log = cli::logs(lab, "one-shot", "canary", None)
            .await
            .expect("job log");
        assert!(
            log.contains("\"path\":\"/job\""),
            "the job's request went through: {log}"
        );

        // The command line itself, as a user runs it.
        let out = std::process::Command::new(lab.bin("ferry-lab"))
            .args(["--name", &lab.name, "get", "pods", "-n", "canary"])
            .output()
            .expect("ferry-lab get");
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(&client) && l.contains("2/2") && l.contains("Running")),
            "{table}"
        );
        assert!(
            table.contains("one-shot") && table.contains("Succeeded"),
            "{table}"
        );

        // Deleting a namespace deletes its pods, and the kubelet removes their sandboxes.
        let plain_ns: Vec<String> = ["plain-client", "opted-in"]
            .iter()
            .filter_map(|p| lab.netns_of(&plain[*p]))
            .collect();
        cli::delete(lab, "ns", "plain", "")
            .await
            .expect("delete ns");
        let started = std::time::Instant::now();
        while plain_ns.iter().any(|n| net::netns_list().contains(n))
            || !cli::list(lab, "pods", Some("plain"))
                .await
                .expect("list")
                .is_empty()
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "namespace plain not cleaned up"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

    // Down leaves nothing behind.
    let msg = cli::down(lab, &mut |_: &str| {}).expect("down");
    assert!(msg.contains("stopped"), "{msg}");
    let left: Vec<String> = net::netns_list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    let etc: Vec<String> = std::fs::read_dir("/etc/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    assert!(etc.is_empty(), "/etc/netns left: {etc:?}");
    assert!(!lab.dir.exists(), "state dir left");
    let procs = std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| String::from_utf8_lossy(c).contains(&lab.dir.display().to_string()))
        .count();
    assert_eq!(procs, 0, "processes of the lab still running");
}

#[test]
fn lab_refuses_bad_input_clearly_and_recovers_from_a_crash() {
    if !ferry_tests::netns::require_root("lab_refuses_bad_input_clearly_and_recovers_from_a_crash")
    {
        return;
    }
    let t = TestLab::up();
    let lab = &t.0;
    // A second `up` while it runs.
    let err = cli::up(lab, &mut |_: &str| {}).unwrap_err().to_string();
    assert!(err.contains("already running"), "{err}");
    rt().block_on(async {
        // Malformed YAML and unsupported kinds: named, and nothing applied.
        let err = cli::apply(lab, "apiVersion: v1\nkind: Namespace\nmetadata: {name: half}\n---\nkind: [oops", "bad.yaml", "default")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.yaml: YAML document 2"), "{err}");
        let err = cli::apply(lab, "apiVersion: v1\nkind: Namespace\nmetadata: {name: half}\n---\napiVersion: batch/v1\nkind: Job\nmetadata: {name: j}\n", "job.yaml", "default")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("kind Job (batch/v1) is not supported") && err.contains("nothing was applied"), "{err}");
        let err = cli::get_one(lab, "ns", "half", "").await.unwrap_err().to_string();
        assert!(err.contains("NotFound"), "{err}");
        let err = cli::list(lab, "cronjobs", None).await.unwrap_err().to_string();
        assert!(err.contains("no resource type \"cronjobs\""), "{err}");
        // A pod in a namespace that does not exist.
        let err = cli::apply(lab, "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: nowhere}\nspec: {containers: [{name: c, image: x}]}\n", "p.yaml", "default")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("namespaces \"nowhere\" not found"), "{err}");

        // A pod the injector rejects: the webhook's message, as kubectl shows it.
        let bad = r#"apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Pod
metadata:
  name: bad-ports
  namespace: mesh
  annotations: {traffic.sidecar.istio.io/includeInboundPorts: "eighty"}
spec:
  containers: [{name: c, image: x}]
"#;
        let err = cli::apply(lab, bad, "bad-ports.yaml", "default").await.unwrap_err().to_string();
        assert!(err.contains("namespace/mesh created"), "{err}");
        assert!(
            err.contains("admission webhook \"namespace.sidecar-injector.istio.io\" denied the request"),
            "{err}"
        );
        assert!(err.contains("includeInboundPorts"), "{err}");
        assert!(cli::get_one(lab, "pods", "bad-ports", "mesh").await.is_err(), "rejected pod must not exist");

        // Two containers wanting the same port: one fails with a message naming the port and is
        // restarted with back-off, visibly.
        let clash = r#"apiVersion: v1
kind: Pod
metadata: {name: clash, namespace: default}
spec:
  containers:
  - {name: a, image: x, ports: [{containerPort: 8080}]}
  - {name: b, image: y, ports: [{containerPort: 8080}]}
"#;
        cli::apply(lab, clash, "clash.yaml", "default").await.expect("apply clash");
        let started = std::time::Instant::now();
        let pod = loop {
            let pod = cli::get_one(lab, "pods", "clash", "default").await.expect("clash");
            let restarts: u64 = pod["status"]["containerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["restartCount"].as_u64())
                .sum();
            if restarts > 0 {
                break pod;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "no restart seen: {pod}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(!ferry_tests::lab::model::pod_ready(&pod));
        let logs = [
            cli::logs(lab, "clash", "default", Some("a")).await.unwrap_or_default(),
            cli::logs(lab, "clash", "default", Some("b")).await.unwrap_or_default(),
        ]
        .concat();
        assert!(logs.contains("listening on port 8080"), "{logs}");
        let err = cli::logs(lab, "clash", "default", Some("nope")).await.unwrap_err().to_string();
        assert!(err.contains("choose one of: a, b"), "{err}");

        // A Deployment whose pods the webhook rejects reports why.
        let dep = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: rejected, namespace: mesh}
spec:
  selector: {matchLabels: {app: r}}
  template:
    metadata: {labels: {app: r}, annotations: {traffic.sidecar.istio.io/excludeOutboundPorts: "x"}}
    spec: {containers: [{name: c, image: x}]}
"#;
        cli::apply(lab, dep, "dep.yaml", "default").await.expect("apply deployment");
        let started = std::time::Instant::now();
        loop {
            let d = cli::get_one(lab, "deploy", "rejected", "mesh").await.expect("deploy");
            let msg = d["status"]["conditions"][0]["message"].as_str().unwrap_or("").to_owned();
            if msg.contains("denied the request") {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "no failure condition: {d}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

    // The daemon dies without cleaning up; the next `up` sweeps what it left and works.
    let pid = net::daemon_pid(lab).expect("daemon pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let started = std::time::Instant::now();
    while net::is_lab_process(pid) {
        assert!(started.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        net::netns_list()
            .iter()
            .any(|n| n.starts_with(&lab.prefix())),
        "a crashed lab leaves its namespaces (until swept)"
    );
    let mut notes = Vec::new();
    cli::up(lab, &mut |m: &str| notes.push(m.to_owned())).expect("up after crash");
    assert!(
        notes.iter().any(|n| n.contains("removed leftovers")),
        "{notes:?}"
    );
    let msg = cli::down(lab, &mut |_: &str| {}).expect("down");
    assert!(msg.contains("stopped"), "{msg}");
    let msg = cli::down(lab, &mut |_: &str| {}).expect("second down");
    assert!(msg.contains("nothing to remove"), "{msg}");
}
