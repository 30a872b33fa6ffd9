//! Why a request goes where it goes: the VirtualService rule that matched (or why none did), the
//! destinations and weights, the DestinationRule, subset and load balancer, and the endpoints.
//! Pure over a snapshot; served at `/explain` on the admin port and by `ferry-proxy explain`.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::discovery::{Protocol, Snapshot};
use crate::routing::{Action, ConnView, Destination, LoadBalancer, RequestView};

/// A request to explain.
#[derive(Clone, Debug, Default)]
pub struct Query {
    pub host: String,
    pub port: Option<u16>,
    pub path: String,
    pub method: String,
    pub headers: BTreeMap<String, String>,
    pub namespace: String,
}

impl Query {
    /// From a query string: `host=..&port=..&path=..&method=..&header=k:v&header=..`.
    pub fn parse(q: &str, namespace: &str) -> Query {
        let mut out = Query {
            path: "/".into(),
            method: "GET".into(),
            namespace: namespace.into(),
            ..Query::default()
        };
        for kv in q.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = v
                .replace("%2F", "/")
                .replace("%3A", ":")
                .replace("%20", " ");
            match k {
                "host" => out.host = v,
                "port" => out.port = v.parse().ok(),
                "path" => out.path = v,
                "method" => out.method = v,
                "header" => {
                    if let Some((hk, hv)) = v.split_once(':') {
                        out.headers
                            .insert(hk.trim().to_ascii_lowercase(), hv.trim().to_owned());
                    }
                }
                _ => {}
            }
        }
        out
    }
}

fn lb_name(lb: &LoadBalancer) -> String {
    match lb {
        LoadBalancer::RoundRobin => "ROUND_ROBIN".into(),
        LoadBalancer::Random => "RANDOM".into(),
        LoadBalancer::LeastRequest => "LEAST_REQUEST".into(),
        LoadBalancer::Passthrough => "PASSTHROUGH".into(),
        LoadBalancer::HashHeader(h) => format!("consistentHash(httpHeaderName={h})"),
        LoadBalancer::HashCookie(c) => format!("consistentHash(httpCookie={c})"),
        LoadBalancer::HashSourceIp => "consistentHash(useSourceIp)".into(),
    }
}

/// Explain where `q` would go.
pub fn explain(snap: &Snapshot, q: &Query) -> Value {
    let Some(service) = snap.service_by_host(&q.host, &q.namespace) else {
        return json!({"host": q.host, "verdict": format!("{:?} is not a known service: outbound traffic to it follows the outbound traffic policy (passthrough under ALLOW_ANY)", q.host)});
    };
    let host = service.hostname.as_str();
    let port = q
        .port
        .filter(|p| service.port(*p).is_some())
        .or_else(|| service.ports.first().map(|p| p.port))
        .unwrap_or(0);
    let protocol = service
        .port(port)
        .map(|p| format!("{:?}", p.protocol))
        .unwrap_or_default();
    let no_labels = BTreeMap::new();
    let lookup = |k: &str| q.headers.get(&k.to_ascii_lowercase()).map(String::as_str);
    let (path, query) = q
        .path
        .split_once('?')
        .map(|(p, q)| (p, Some(q)))
        .unwrap_or((q.path.as_str(), None));
    let view = RequestView {
        method: &q.method,
        scheme: "http",
        path,
        query,
        authority: &q.host,
        port,
        headers: &lookup,
        source_labels: &no_labels,
        source_namespace: &q.namespace,
    };
    let routes = snap.routes.routes(host);
    let mut out = json!({"host": host, "port": port, "protocol": protocol});
    let endpoints_of = |svc_host: &str, port: u16, subset: Option<&str>| -> Value {
        let Some(svc) = snap.service_by_host(svc_host, &q.namespace) else {
            return json!({"error": format!("{svc_host} is not a known service")});
        };
        let rule = snap.routes.rule(&svc.hostname);
        let resolved = crate::routing::resolve_destination(rule.as_deref(), subset, port);
        let Some((labels, lb)) = resolved else {
            return json!({"destinationRule": rule.map(|r| r.origin.clone()), "error": format!("subset {:?} is not defined by any DestinationRule for {}: requests get 503 no healthy upstream", subset.unwrap_or_default(), svc.hostname)});
        };
        let eps: Vec<String> = svc
            .endpoints
            .get(&port)
            .into_iter()
            .flatten()
            .filter(|e| {
                labels
                    .as_ref()
                    .is_none_or(|l| l.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
            })
            .map(|e| e.addr.to_string())
            .collect();
        let (pool, outlier) = rule
            .as_ref()
            .map(|r| r.resilience(subset, port))
            .unwrap_or_default();
        json!({
            "destinationRule": rule.as_ref().map(|r| r.origin.clone()),
            "subsetLabels": labels,
            "loadBalancer": lb_name(&lb),
            "resilience": crate::resilience::describe_destination(pool.as_ref(), outlier.as_ref()),
            "endpoints": eps,
            "note": if eps.is_empty() { Value::String("no ready endpoint: requests get 503 no healthy upstream".into()) } else { Value::Null },
        })
    };
    let destinations = |ds: &[Destination]| -> Value {
        ds.iter()
            .map(|d| {
                let p = d.port.unwrap_or(port);
                json!({"host": d.host, "subset": d.subset, "port": p, "weight": d.weight, "resolved": endpoints_of(&d.host, p, d.subset.as_deref())})
            })
            .collect()
    };
    // Opaque TCP and TLS ports are routed by `tcp[]` / `tls[]`; `http[]` never applies to them.
    let declared = service.port(port).map(|p| p.protocol);
    if matches!(declared, Some(Protocol::Tcp | Protocol::Tls)) {
        let conn = ConnView {
            port,
            destination: service
                .cluster_ips
                .first()
                .copied()
                .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0])),
            sni: (declared == Some(Protocol::Tls)).then_some(q.host.as_str()),
            source_labels: &no_labels,
            source_namespace: &q.namespace,
        };
        match snap.routes.find_l4(host, &conn) {
            None => {
                out["verdict"] =
                    json!("no tcp/tls rule of a VirtualService matched: plain service routing");
                out["endpoints"] = endpoints_of(host, port, None);
            }
            Some(route) => {
                out["matched"] = json!({"rule": route.origin});
                out["destinations"] = destinations(&route.destinations);
            }
        }
        return out;
    }
    if routes.is_empty() {
        out["verdict"] = json!("no VirtualService for this host: plain service routing");
        out["endpoints"] = endpoints_of(host, port, None);
        out["policy"] = crate::resilience::describe_route(&Default::default());
        return out;
    }
    let considered: Vec<String> = routes.iter().map(|r| r.origin.clone()).collect();
    out["rulesInOrder"] = json!(considered);
    match snap.routes.find(host, &view) {
        None => {
            out["verdict"] = json!(
                "no rule matched: Istio answers 404 (no route); plain service routing is NOT used when a VirtualService exists"
            );
        }
        Some((route, matched)) => {
            out["matched"] = json!({"rule": route.origin, "by": matched});
            match &route.action {
                Action::Redirect {
                    uri,
                    authority,
                    code,
                    scheme,
                } => {
                    out["redirect"] =
                        json!({"code": code, "uri": uri, "authority": authority, "scheme": scheme});
                }
                Action::Route(ds) => {
                    out["destinations"] = destinations(ds);
                }
            }
            if let Some(p) = route.rewrite_path(path) {
                out["rewrite"] = json!({"uri": p, "authority": route.rewrite_authority});
            }
            out["policy"] = crate::resilience::describe_route(&route.policy);
            if !route.mirrors.is_empty() {
                out["mirrors"] = route
                    .mirrors
                    .iter()
                    .map(|(d, pct)| json!({"host": d.host, "subset": d.subset, "percent": pct}))
                    .collect();
            }
            if let Some(c) = &route.cors {
                out["cors"] = json!({"allowOrigins": c.allow_origins.len(), "allowMethods": c.allow_methods, "allowCredentials": c.allow_credentials});
            }
            if !route.unsupported.is_empty() {
                out["notImplemented"] = json!(route.unsupported);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: 10.96.0.30, ports: [{name: tcp-db, port: 5432}, {name: http-admin, port: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: tcp-db, port: 5432}, {name: http-admin, port: 8080}]
endpoints:
- {addresses: ["10.1.0.5"], conditions: {ready: true}, targetRef: {kind: Pod, name: db-primary, namespace: shop}}
- {addresses: ["10.1.0.6"], conditions: {ready: true}, targetRef: {kind: Pod, name: db-replica, namespace: shop}}
---
apiVersion: v1
kind: Pod
metadata: {name: db-primary, namespace: shop, labels: {role: primary}}
status: {podIP: "10.1.0.5"}
---
apiVersion: v1
kind: Pod
metadata: {name: db-replica, namespace: shop, labels: {role: replica}}
status: {podIP: "10.1.0.6"}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: shop}
spec: {host: db, subsets: [{name: primary, labels: {role: primary}}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: shop}
spec:
  hosts: [db]
  tcp:
  - match: [{port: 5432}]
    route: [{destination: {host: db, subset: primary}}]
"#;

    fn snap() -> Snapshot {
        let objects: Vec<Value> = serde_yaml::Deserializer::from_str(DB)
            .map(|d| serde::Deserialize::deserialize(d).expect("doc"))
            .collect();
        Snapshot::build(1, &objects, "cluster.local")
    }

    fn ask(host: &str, port: u16) -> Value {
        let q = Query {
            host: host.into(),
            port: Some(port),
            path: "/".into(),
            method: "GET".into(),
            namespace: "shop".into(),
            ..Query::default()
        };
        explain(&snap(), &q)
    }

    #[test]
    fn tcp_destinations_explain_their_tcp_rule_subset_and_endpoints() {
        let e = ask("db", 5432);
        assert_eq!(e["protocol"], "Tcp", "{e:#}");
        assert_eq!(
            e["matched"]["rule"]
                .as_str()
                .map(|r| r.starts_with("shop/db")),
            Some(true),
            "{e:#}"
        );
        let d = &e["destinations"][0];
        assert_eq!(d["subset"], "primary", "{e:#}");
        assert_eq!(
            d["resolved"]["endpoints"],
            json!(["10.1.0.5:5432"]),
            "{e:#}"
        );
        // The HTTP port of the same host: tcp[] does not apply and there is no http[] rule, so
        // plain service routing over every endpoint, as the data path does.
        let h = ask("db", 8080);
        assert!(h["matched"].is_null(), "{h:#}");
        assert_eq!(
            h["endpoints"]["endpoints"],
            json!(["10.1.0.5:8080", "10.1.0.6:8080"]),
            "{h:#}"
        );
    }
}
