//! The ingress gateway end to end through the lab: an Istio-style `istio-ingressgateway`
//! Deployment running `proxy router`, a `Gateway` selecting it, VirtualServices bound to that
//! Gateway, and traffic from this machine through the Service's node port — the walkthroughs'
//! `curl $INGRESS_HOST:$INGRESS_PORT`. Needs root; under `CI=true` it fails rather than skips.

use std::time::Duration;

use ferry_tests::lab::echo::{self, LoadOptions, Tally};
use ferry_tests::lab::testing::{TestLab, rt};
use ferry_tests::lab::{cli, demo};

const INGRESS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: istio-ingressgateway, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  template:
    metadata: {labels: {istio: ingressgateway, app: istio-ingressgateway, sidecar.istio.io/inject: "false"}}
    spec:
      containers:
      - name: istio-proxy
        image: docker.io/istio/proxyv2:1.24.0
        args: [proxy, router, --domain, $(POD_NAMESPACE).svc.cluster.local, --proxyLogLevel=warning]
        env:
        - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
        - {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
        - {name: INSTANCE_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
        - {name: ISTIO_META_WORKLOAD_NAME, value: istio-ingressgateway}
        ports: [{containerPort: 80, name: http2}, {containerPort: 8080, name: http-redirect}, {containerPort: 443, name: https}, {containerPort: 8443, name: tls-passthrough}, {containerPort: 31400, name: tcp}, {containerPort: 15021, name: status-port}]
        readinessProbe: {httpGet: {path: /healthz/ready, port: 15021}}
---
apiVersion: v1
kind: Service
metadata: {name: istio-ingressgateway, namespace: istio-system}
spec:
  type: LoadBalancer
  selector: {istio: ingressgateway}
  ports:
  - {name: http2, port: 80, targetPort: 80}
  - {name: http-redirect, port: 8080, targetPort: 8080}
  - {name: https, port: 443, targetPort: 443}
  - {name: tls-passthrough, port: 8443, targetPort: 8443}
  - {name: tcp, port: 31400, targetPort: 31400}
"#;

const ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: app-gateway, namespace: canary}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
  - port: {number: 8080, name: http-redirect, protocol: HTTP}
    hosts: ["*"]
    tls: {httpsRedirect: true}
  - port: {number: 443, name: https-a, protocol: HTTPS}
    hosts: [a.example.com]
    tls: {mode: SIMPLE, credentialName: a-cert}
  - port: {number: 443, name: https-b, protocol: HTTPS}
    hosts: [b.example.com]
    tls: {mode: SIMPLE, credentialName: b-cert}
  - port: {number: 443, name: https-c, protocol: HTTPS}
    hosts: [c.example.com]
    tls: {mode: SIMPLE, credentialName: missing-cert}
  - port: {number: 443, name: https-m, protocol: HTTPS}
    hosts: [m.example.com]
    tls: {mode: MUTUAL, credentialName: m-cert, minProtocolVersion: TLSV1_3}
  - port: {number: 8443, name: tls-passthrough, protocol: TLS}
    hosts: [ferry-injector.istio-system.svc]
    tls: {mode: PASSTHROUGH}
  - port: {number: 31400, name: tcp, protocol: TCP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: app-public, namespace: canary}
spec:
  hosts: ["*"]
  gateways: [app-gateway]
  http:
  - route:
    - {destination: {host: app, subset: v1}, weight: 90}
    - {destination: {host: app, subset: v2}, weight: 10}
  tcp:
  - match: [{port: 31400}]
    route: [{destination: {host: app, subset: v2, port: {number: 80}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a-host, namespace: canary}
spec:
  hosts: [a.example.com]
  gateways: [canary/app-gateway]
  http:
  - route: [{destination: {host: app.canary.svc.cluster.local, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b-host, namespace: canary}
spec:
  hosts: [b.example.com]
  gateways: [app-gateway]
  http:
  - route: [{destination: {host: app, subset: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: webhook-passthrough, namespace: canary}
spec:
  hosts: [ferry-injector.istio-system.svc]
  gateways: [app-gateway]
  tls:
  - match: [{port: 8443, sniHosts: [ferry-injector.istio-system.svc]}]
    route: [{destination: {host: ferry-injector.istio-system.svc.cluster.local, port: {number: 443}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: mesh-only, namespace: canary}
spec:
  hosts: [c.example.com]
  http:
  - route: [{destination: {host: app, subset: v2}}]
"#;

fn secret(name: &str, pair: &ferry_tests::tls::Pair) -> String {
    serde_yaml::to_string(&serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": "istio-system"},
        "stringData": {"tls.crt": pair.cert_pem, "tls.key": pair.key_pem},
    }))
    .expect("yaml")
}

fn der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("pem")
        .as_ref()
        .to_vec()
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

async fn gateway_metrics(lab: &ferry_tests::lab::Lab, gw: &str) -> String {
    ferry_tests::lab::testing::exec_stdout(
        lab,
        gw,
        "istio-system",
        None,
        &[
            "ferry-lab",
            "http",
            "http://127.0.0.1:15090/stats/prometheus",
        ],
    )
    .await
}

async fn from_outside(port: u16, n: u64, host: &str) -> Tally {
    echo::load_opts(
        &format!("http://127.0.0.1:{port}/productpage"),
        &LoadOptions {
            requests: n,
            headers: vec![("host".into(), host.into())],
            ..LoadOptions::default()
        },
    )
    .await
    .expect("load")
}

#[test]
fn ingress_gateway_routes_traffic_from_outside() {
    if !ferry_tests::netns::require_root("ingress_gateway_routes_traffic_from_outside") {
        return;
    }
    let t = TestLab::up();
    let lab = &t.0;
    rt().block_on(async {
        cli::apply(lab, demo::APP, "app.yaml", "default")
            .await
            .expect("app");
        // The DestinationRule of the canary demo (subsets v1/v2).
        let dr: String = demo::SPLIT.split("---").next().expect("dr").to_owned();
        cli::apply(lab, &dr, "dr.yaml", "canary").await.expect("dr");
        let applied = cli::apply(lab, INGRESS, "ingress.yaml", "default")
            .await
            .expect("ingress");
        assert!(
            applied.contains("service/istio-ingressgateway created"),
            "{applied}"
        );
        cli::apply(lab, ROUTES, "routes.yaml", "default")
            .await
            .expect("routes");
        let pki = ferry_tests::tls::Pki::new("gateway test CA");
        let ca_pem = pki.ca_pem();
        let a1 = pki.issue(&["a.example.com"], 2036);
        let b_pair = pki.issue(&["b.example.com"], 2036);
        let m_pair = pki.issue(&["m.example.com"], 2036);
        let mut m_secret: serde_json::Value =
            serde_yaml::from_str(&secret("m-cert", &m_pair)).expect("yaml");
        m_secret["stringData"]["ca.crt"] = serde_json::json!(ca_pem);
        let m_secret = serde_yaml::to_string(&m_secret).expect("yaml");
        cli::apply(
            lab,
            &format!(
                "{}---\n{}---\n{}",
                secret("a-cert", &a1),
                secret("b-cert", &b_pair),
                m_secret
            ),
            "certs.yaml",
            "default",
        )
        .await
        .expect("secrets");
        let mut quiet = |_: &str| {};
        cli::wait_ready(lab, "canary", 3, Duration::from_secs(90), &mut quiet)
            .await
            .expect("canary");
        cli::wait_ready(lab, "istio-system", 2, Duration::from_secs(90), &mut quiet)
            .await
            .expect("gateway");
        let svc = cli::get_one(lab, "svc", "istio-ingressgateway", "istio-system")
            .await
            .expect("svc");
        let port_of = |i: usize| {
            svc["spec"]["ports"][i]["nodePort"]
                .as_u64()
                .expect("nodePort") as u16
        };
        let (http, redirect) = (port_of(0), port_of(1));
        assert!((30000..=32767).contains(&http));

        let pods = ferry_tests::lab::testing::pods_by_name(lab, "istio-system").await;
        let gw = ferry_tests::lab::testing::first_with_prefix(&pods, "istio-ingressgateway-");
        // The gateway picks up its Gateway and routes: wait for the first 200 from outside.
        let started = std::time::Instant::now();
        loop {
            let t = from_outside(http, 1, "shop.example.com").await;
            if t.ok == 1 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "gateway never served: {t:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // 90/10 over 1,000 requests from this machine, within 3 points.
        let split = from_outside(http, 1000, "shop.example.com").await;
        assert_eq!(split.ok, 1000, "{split:?}");
        let v2 = *split.by_version.get("v2").unwrap_or(&0);
        assert!((70..=130).contains(&v2), "v2 got {v2}/1000: {split:?}");

        // Two hosts on one port, each with its own VirtualService.
        let a = from_outside(http, 20, "a.example.com").await;
        assert_eq!(a.by_version.get("v1"), Some(&20), "{a:?}");
        let b = from_outside(http, 20, "b.example.com:80").await;
        assert_eq!(b.by_version.get("v2"), Some(&20), "{b:?}");
        // A VirtualService not bound to the gateway does not apply there: c.example.com falls
        // to the "*" route bound to it, not to mesh-only's v2-only rule.
        let c = from_outside(http, 40, "c.example.com").await;
        assert_eq!(c.ok, 40, "{c:?}");
        assert!(
            c.by_version.get("v1").copied().unwrap_or(0) > 20,
            "mesh-only VS must not apply: {c:?}"
        );

        // httpsRedirect on the other server.
        let r = from_outside(redirect, 1, "shop.example.com").await;
        assert_eq!(r.statuses.get(&301), Some(&1), "{r:?}");

        // HTTPS, two certificates on one port chosen by SNI; the client verifies each.
        let https = port_of(2);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], https));
        let get = async |host: &str, ca: &str| -> Result<(Vec<u8>, String), String> {
            let mut c = ferry_tests::tls::Client::connect(addr, host, ca).await?;
            let (code, body) = c.request("GET", "/productpage", None, vec![]).await?;
            if code != 200 {
                return Err(format!("status {code}"));
            }
            Ok((
                c.peer_cert.as_ref().to_vec(),
                String::from_utf8_lossy(&body).into_owned(),
            ))
        };
        let (cert_a, body) = get("a.example.com", &ca_pem).await.expect("https a");
        assert!(body.contains("\"version\":\"v1\""), "{body}");
        assert_eq!(cert_a, der(&a1.cert_pem));
        let (cert_b, body) = get("b.example.com", &ca_pem).await.expect("https b");
        assert!(body.contains("\"version\":\"v2\""), "{body}");
        assert_eq!(cert_b, der(&b_pair.cert_pem));
        // A server whose Secret is missing is reported and not served; the others keep working.
        assert!(
            get("c.example.com", &ca_pem).await.is_err(),
            "c has no certificate"
        );
        let log = cli::logs(lab, &gw, "istio-system", None)
            .await
            .expect("gateway log");
        assert!(
            log.contains("missing-cert") && log.contains("not served"),
            "{log}"
        );
        // The Secret is rotated while serving: new connections get the new certificate.
        let a2 = pki.issue(&["a.example.com"], 2036);
        cli::apply(lab, &secret("a-cert", &a2), "a2.yaml", "default")
            .await
            .expect("rotate");
        let started = std::time::Instant::now();
        loop {
            match get("a.example.com", &ca_pem).await {
                Ok((cert, _)) if cert == der(&a2.cert_pem) => break,
                _ => {}
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "rotated certificate never served"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            get("b.example.com", &ca_pem).await.is_ok(),
            "b unaffected by a's rotation"
        );

        // MUTUAL (TLS 1.3 minimum) on the same port: no client certificate, no answer; with one
        // signed by the Secret's ca.crt, served. The SIMPLE servers beside it are unaffected.
        let client = pki.issue(&["client.example.com"], 2036);
        let anonymous = async {
            let mut c = ferry_tests::tls::Client::connect(addr, "m.example.com", &ca_pem).await?;
            c.request("GET", "/productpage", None, vec![]).await
        };
        assert!(
            anonymous.await.is_err(),
            "MUTUAL must refuse a client without a certificate"
        );
        let mut c = ferry_tests::tls::Client::connect_with(
            addr,
            "m.example.com",
            &ca_pem,
            Some((&client.cert_pem, &client.key_pem)),
        )
        .await
        .expect("mutual TLS");
        let (code, _) = c
            .request("GET", "/productpage", None, vec![])
            .await
            .expect("mutual request");
        assert_eq!(code, 200);
        assert!(get("b.example.com", &ca_pem).await.is_ok());

        // The LoadBalancer's loopback "external IP" serves the Service's own ports:
        // `curl --resolve a.example.com:443:<ip> https://a.example.com/`.
        let svc = cli::get_one(lab, "svc", "istio-ingressgateway", "istio-system")
            .await
            .expect("svc");
        let lb: std::net::IpAddr = svc["status"]["loadBalancer"]["ingress"][0]["ip"]
            .as_str()
            .expect("lb ip")
            .parse()
            .expect("ip");
        assert!(lb.is_loopback());
        let mut c = ferry_tests::tls::Client::connect(
            std::net::SocketAddr::new(lb, 443),
            "a.example.com",
            &ca_pem,
        )
        .await
        .expect("https via the load balancer address");
        let (code, _) = c
            .request("GET", "/productpage", None, vec![])
            .await
            .expect("lb request");
        assert_eq!(code, 200);
        let plain = echo::load_opts(
            &format!("http://{lb}:80/productpage"),
            &LoadOptions {
                headers: vec![("host".into(), "shop.example.com".into())],
                ..LoadOptions::default()
            },
        )
        .await
        .expect("http via lb");
        assert_eq!(plain.ok, 1, "{plain:?}");
        let metrics_now = gateway_metrics(lab, &gw).await;
        assert!(
            metrics_now.contains("ferry_proxy_gateway_server_errors 1"),
            "the missing Secret counted: {metrics_now}"
        );

        // A TCP server: opaque bytes routed by the gateway-bound VirtualService's tcp[] rule.
        let line = echo::tcp_line(&format!("{lb}:31400"), "ping")
            .await
            .expect("tcp via gateway");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(
            (v["received"].as_str(), v["version"].as_str()),
            (Some("ping"), Some("v2")),
            "{line}"
        );

        // PASSTHROUGH: TLS to the webhook inside the cluster, routed by SNI and not
        // terminated — the client verifies the webhook's own certificate (its caBundle).
        let mwcs = cli::list(lab, "mutatingwebhookconfigurations", None)
            .await
            .expect("mwc");
        let bundle = mwcs[0]["webhooks"][0]["clientConfig"]["caBundle"]
            .as_str()
            .expect("caBundle");
        let webhook_ca = String::from_utf8(base64_decode(bundle)).expect("pem");
        let pass = std::net::SocketAddr::from(([127, 0, 0, 1], port_of(3)));
        let server = mwcs[0]["webhooks"][0]["clientConfig"]["service"]["name"]
            .as_str()
            .expect("svc")
            .to_owned();
        let name = format!("{server}.istio-system.svc");
        let mut c = ferry_tests::tls::Client::connect(pass, &name, &webhook_ca)
            .await
            .expect("passthrough TLS");
        let (code, _) = c
            .request("GET", "/healthz/ready", None, vec![])
            .await
            .expect("ready");
        assert_eq!(code, 200);

        // The gateway's own metrics say where it sent traffic.
        let metrics = gateway_metrics(lab, &gw).await;
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("istio_requests_total{")
                    && l.contains("source_workload=\"istio-ingressgateway\"")
                    && l.contains("destination_version=\"v2\"")),
            "{metrics}"
        );
    });
}
