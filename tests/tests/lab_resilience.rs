//! Istio's resilience policies end to end through the lab: the client pod's sidecar applies
//! faults, timeouts, retries, circuit breaking and outlier detection from unmodified
//! VirtualServices and DestinationRules, against echo pods that misbehave on purpose.
//! Needs root; under `CI=true` it fails rather than skips.

use std::time::Duration;

use ferry_tests::lab::cli;
use ferry_tests::lab::echo::Tally;
use ferry_tests::lab::testing::{TestLab, exec_stdout, first_with_prefix, pods_by_name, rt};

fn deployment(name: &str, args: &[&str]) -> String {
    let args = if args.is_empty() {
        String::new()
    } else {
        format!(
            "\n        args: [{}]",
            args.iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!(
        r#"---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: res}}
spec:
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}, version: v1}}}}
    spec:
      containers:
      - name: app
        image: example.com/echo:1
        ports: [{{name: http, containerPort: 8080}}]{args}
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: res}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
"#
    )
}

const MIXED: &str = r#"---
apiVersion: apps/v1
kind: Deployment
metadata: {name: mixed-bad, namespace: res}
spec:
  selector: {matchLabels: {app: mixed, version: bad}}
  template:
    metadata: {labels: {app: mixed, version: bad}}
    spec:
      containers:
      - {name: app, image: example.com/echo:1, ports: [{name: http, containerPort: 8080}], args: ["--status", "503"]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: mixed-good, namespace: res}
spec:
  selector: {matchLabels: {app: mixed, version: good}}
  template:
    metadata: {labels: {app: mixed, version: good}}
    spec:
      containers:
      - {name: app, image: example.com/echo:1, ports: [{name: http, containerPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: mixed, namespace: res}
spec:
  selector: {app: mixed}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: client, namespace: res}
spec:
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      containers: [{name: client, image: curlimages/curl, command: [sleep, "3600"]}]
"#;

/// Unmodified Istio resources (the shapes of Istio's fault-injection, timeout, retry and
/// circuit-breaking tasks).
const POLICIES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: app, namespace: res}
spec:
  hosts: [app]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    fault: {delay: {fixedDelay: 0.4s, percentage: {value: 100.0}}}
    route: [{destination: {host: app}}]
  - match: [{headers: {x-test: {exact: abort}}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 50.0}}}
    route: [{destination: {host: app}}]
  - match: [{uri: {prefix: /slow}}]
    timeout: 0.5s
    route: [{destination: {host: app}}]
  - match: [{headers: {x-test: {exact: mirror}}}]
    mirror: {host: shadow}
    mirrorPercentage: {value: 100.0}
    route: [{destination: {host: app}}]
  - match: [{headers: {x-test: {exact: cors}}}]
    corsPolicy:
      allowOrigins: [{exact: "https://shop.example.com"}]
      allowMethods: [GET, POST]
      allowHeaders: [x-user]
      maxAge: 24h
      allowCredentials: true
    route: [{destination: {host: app}}]
  - route: [{destination: {host: app}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: flaky-get, namespace: res}
spec:
  hosts: [flaky-get]
  http:
  - route: [{destination: {host: flaky-get}}]
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: 5xx}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: flaky-post, namespace: res}
spec:
  hosts: [flaky-post]
  http:
  - route: [{destination: {host: flaky-post}}]
    retries: {attempts: 3, retryOn: 5xx}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: narrow, namespace: res}
spec:
  host: narrow
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: upgraded, namespace: res}
spec:
  host: upgraded
  trafficPolicy:
    connectionPool:
      tcp: {connectTimeout: 1s, tcpKeepalive: {time: 30s}}
      http: {idleTimeout: 10s, h2UpgradePolicy: UPGRADE}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: mixed, namespace: res}
spec:
  hosts: [mixed]
  http:
  - route: [{destination: {host: mixed}}]
    retries: {attempts: 0}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mixed, namespace: res}
spec:
  host: mixed
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 3s, maxEjectionPercent: 100}
"#;

async fn load(lab: &ferry_tests::lab::Lab, client: &str, url: &str, extra: &[&str]) -> Tally {
    let mut cmd = vec!["ferry-lab", "http", url, "--json"];
    cmd.extend_from_slice(extra);
    let out = exec_stdout(lab, client, "res", None, &cmd).await;
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{cmd:?}: {e}: {out}"))
}

fn count(t: &Tally, status: u16) -> u64 {
    *t.statuses.get(&status).unwrap_or(&0)
}

#[test]
fn resilience_policies_through_the_sidecars() {
    if !ferry_tests::netns::require_root("resilience_policies_through_the_sidecars") {
        return;
    }
    let t = TestLab::up();
    let lab = &t.0;
    rt().block_on(async {
        let mut manifest = "apiVersion: v1\nkind: Namespace\nmetadata: {name: res, labels: {istio-injection: enabled}}\n".to_owned();
        manifest.push_str(&deployment("app", &[]));
        manifest.push_str(&deployment("narrow", &[]));
        manifest.push_str(&deployment("shadow", &[]));
        manifest.push_str(&deployment("upgraded", &[]));
        manifest.push_str(&deployment("flaky-get", &["--fail-first", "2"]));
        manifest.push_str(&deployment("flaky-post", &["--fail-first", "2"]));
        manifest.push_str(&deployment("flaky-hdr", &["--fail-first", "2"]));
        manifest.push_str(MIXED);
        cli::apply(lab, &manifest, "res.yaml", "default").await.expect("apply");
        cli::apply(lab, POLICIES, "policies.yaml", "res").await.expect("policies");
        cli::wait_ready(lab, "res", 10, Duration::from_secs(120), &mut |_: &str| {})
            .await
            .expect("ready");
        let pods = pods_by_name(lab, "res").await;
        let client = first_with_prefix(&pods, "client-");
        // Wait until the client's sidecar has every policy and every other pod as an endpoint
        // (pods turn ready in the API server before their EndpointSlices reach the sidecar:
        // a request in between is a correct 503, no healthy upstream).
        let ips: Vec<String> = pods
            .iter()
            .filter(|(name, _)| **name != client)
            .filter_map(|(_, p)| p["status"]["podIP"].as_str().map(|ip| format!("{ip}:")))
            .collect();
        assert!(ips.len() >= 9, "pod IPs: {ips:?}");
        let started = std::time::Instant::now();
        loop {
            let dump = exec_stdout(lab, &client, "res", Some("istio-proxy"), &["ferry-proxy", "config", "routes", "-o", "json"]).await;
            let eps = exec_stdout(lab, &client, "res", Some("istio-proxy"), &["ferry-proxy", "config", "endpoints"]).await;
            if ["fixedDelay", "flaky-post", "maxConnections", "outlierDetection", "h2UpgradePolicy"].iter().all(|n| dump.contains(n))
                && ips.iter().all(|ip| eps.contains(ip.as_str()))
            {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "policies or endpoints not picked up: {dump}\n{eps}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // Delay fault: jason's requests wait the configured 0.4 s before reaching the app.
        let delayed = load(lab, &client, "http://app/", &["-n", "3", "-H", "end-user: jason"]).await;
        assert_eq!(count(&delayed, 200), 3, "{delayed:?}");
        assert!(delayed.min_ms_by_status[&200] >= 390.0, "delay not applied: {delayed:?}");

        // Abort fault: half of the requests get 503 from the sidecar, within 5 points over 1,000.
        let aborted = load(lab, &client, "http://app/", &["-n", "1000", "-H", "x-test: abort"]).await;
        let n503 = count(&aborted, 503);
        assert!((450..=550).contains(&n503), "503s: {n503}/1000: {aborted:?}");
        assert_eq!(count(&aborted, 200) + n503, 1000, "{aborted:?}");

        // Route timeout: a 3 s upstream is cut at 0.5 s with 504.
        let slow = load(lab, &client, "http://app/slow/delay/3000", &[]).await;
        assert_eq!(count(&slow, 504), 1, "{slow:?}");
        let ms = slow.max_ms_by_status[&504];
        assert!((450.0..2500.0).contains(&ms), "timeout after {ms} ms");

        // Client override: x-envoy-upstream-rq-timeout-ms cuts a route that sets no timeout.
        let cut = load(lab, &client, "http://app/delay/2000", &["-H", "x-envoy-upstream-rq-timeout-ms: 200"]).await;
        assert_eq!(count(&cut, 504), 1, "{cut:?}");
        assert!(cut.max_ms_by_status[&504] < 1500.0, "{cut:?}");

        // Retries: a GET that fails twice succeeds on the third attempt...
        let got = load(lab, &client, "http://flaky-get/", &[]).await;
        assert_eq!(count(&got, 200), 1, "{got:?}");
        let seen = exec_stdout(lab, &client, "res", None, &["ferry-lab", "http", "http://flaky-get/echo/count"]).await;
        assert!(seen.contains("\"GET\":3"), "three attempts reached the upstream: {seen}");
        // ...a POST is not replayed (the upstream may have acted on it)...
        let posted = load(lab, &client, "http://flaky-post/", &["-X", "POST"]).await;
        assert_eq!(count(&posted, 503), 1, "{posted:?}");
        let seen = exec_stdout(lab, &client, "res", None, &["ferry-lab", "http", "http://flaky-post/echo/count"]).await;
        assert!(seen.contains("\"POST\":1"), "the POST reached the upstream once: {seen}");
        // ...unless it carries an Idempotency-Key.
        let keyed = load(lab, &client, "http://flaky-post/", &["-X", "POST", "-H", "Idempotency-Key: k1"]).await;
        assert_eq!(count(&keyed, 200), 1, "{keyed:?}");
        let seen = exec_stdout(lab, &client, "res", None, &["ferry-lab", "http", "http://flaky-post/echo/count"]).await;
        assert!(seen.contains("\"POST\":3"), "{seen}");
        // Client override: x-envoy-max-retries: 0 turns retries off; without it, Istio's default
        // policy retries a 503.
        let no_retry = load(lab, &client, "http://flaky-hdr/", &["-H", "x-envoy-max-retries: 0"]).await;
        assert_eq!(count(&no_retry, 503), 1, "{no_retry:?}");
        let default_retry = load(lab, &client, "http://flaky-hdr/", &[]).await;
        assert_eq!(count(&default_retry, 200), 1, "Istio's default retries 503: {default_retry:?}");

        // Circuit breaking: one connection and one pending request; the rest get 503 at once.
        let burst = load(lab, &client, "http://narrow/delay/600", &["-n", "10", "-c", "10"]).await;
        let (ok, over) = (count(&burst, 200), count(&burst, 503));
        assert_eq!(ok + over, 10, "{burst:?}");
        assert!((1..=3).contains(&ok) && over >= 7, "{burst:?}");
        assert!(burst.max_ms_by_status[&503] < 400.0, "overflow must be fast: {burst:?}");
        assert!(burst.min_ms_by_status[&200] >= 590.0, "{burst:?}");

        // Outlier detection: the endpoint answering 503 is ejected after one failure...
        let first = load(lab, &client, "http://mixed/", &["-n", "40"]).await;
        let failures = count(&first, 503);
        assert!((1..=2).contains(&failures), "ejected after its first 5xx: {first:?}");
        assert_eq!(count(&first, 200) + failures, 40);
        // ...and gets traffic again once its ejection time (3 s) has passed.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let again = load(lab, &client, "http://mixed/", &["-n", "10"]).await;
        assert!(count(&again, 503) >= 1, "restored after the ejection time: {again:?}");

        // Mirroring: every request also goes to `shadow` (authority suffixed -shadow); the
        // client only ever sees app's answers.
        let mirrored = load(lab, &client, "http://app/", &["-n", "5", "-H", "x-test: mirror"]).await;
        assert_eq!(count(&mirrored, 200), 5, "{mirrored:?}");
        assert!(mirrored.by_pod.keys().all(|p| p.starts_with("app-")), "{mirrored:?}");
        let started = std::time::Instant::now();
        loop {
            let seen = exec_stdout(lab, &client, "res", None, &["ferry-lab", "http", "http://shadow/echo/count"]).await;
            if seen.contains("\"GET\":5") {
                assert!(seen.contains("\"app-shadow\":5"), "mirrored with the -shadow authority: {seen}");
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "mirror copies not seen: {seen}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // CORS: an allowed origin's preflight is answered by the sidecar; its requests get the
        // allow header; another origin gets none.
        let curl = async |args: &[&str]| {
            let mut cmd = vec!["curl", "-s", "-i", "-H", "x-test: cors"];
            cmd.extend_from_slice(args);
            cmd.push("http://app/");
            exec_stdout(lab, &client, "res", None, &cmd).await.to_ascii_lowercase()
        };
        let pre = curl(&["-X", "OPTIONS", "-H", "Origin: https://shop.example.com", "-H", "Access-Control-Request-Method: POST"]).await;
        assert!(pre.starts_with("http/1.1 200"), "{pre}");
        for want in ["access-control-allow-origin: https://shop.example.com", "access-control-allow-methods: get,post", "access-control-max-age: 86400", "access-control-allow-credentials: true"] {
            assert!(pre.contains(want), "{want}: {pre}");
        }
        let simple = curl(&["-H", "Origin: https://shop.example.com"]).await;
        assert!(simple.contains("access-control-allow-origin: https://shop.example.com") && simple.contains("\"pod\":\"app-"), "{simple}");
        let other = curl(&["-H", "Origin: https://evil.example.com"]).await;
        assert!(!other.contains("access-control-allow-origin"), "{other}");

        // Connection settings: h2UpgradePolicy UPGRADE carries an HTTP/1.1 request upstream
        // over HTTP/2 (with the DR's connect timeout, keepalive and idle timeout in force).
        let up = load(lab, &client, "http://upgraded/", &[]).await;
        assert_eq!(count(&up, 200), 1, "{up:?}");
        assert!(up.last_body.contains("\"protocol\":\"HTTP/2.0\""), "{}", up.last_body);

        // Every event is counted by the client's sidecar.
        let metrics = exec_stdout(lab, &client, "res", Some("istio-proxy"), &["ferry-lab", "http", "http://127.0.0.1:15090/stats/prometheus"]).await;
        let event = |service: &str, e: &str| -> u64 {
            metrics
                .lines()
                .filter(|l| l.starts_with("ferry_proxy_upstream_events_total{")
                    && l.contains(&format!("destination_service=\"{service}.res.svc.cluster.local\""))
                    && l.contains(&format!("event=\"{e}\"")))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum()
        };
        assert!(event("app", "fault_delay") >= 3, "{metrics}");
        assert!(event("app", "fault_abort") >= 450);
        assert!(event("app", "timeout") >= 2);
        assert!(event("flaky-get", "retry") >= 2);
        assert!(event("narrow", "overflow") >= 7);
        assert!(event("mixed", "ejection") >= 2);
        // And /explain says what applies.
        let explained = exec_stdout(lab, &client, "res", Some("istio-proxy"), &["ferry-proxy", "explain", "--host", "app", "--path", "/slow/x"]).await;
        assert!(explained.contains("\"timeout\": \"500ms\"") || explained.contains("\"timeout\":\"500ms\""), "{explained}");
    });
}
