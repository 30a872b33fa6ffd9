//! Why a request goes where it goes: the VirtualService rule that matched (or why none did), the
//! destinations and weights, the DestinationRule, subset and load balancer, and the endpoints.
//! Pure over a snapshot; served at `/explain` on the admin port and by `ferry-proxy explain`.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::discovery::Snapshot;
use crate::routing::{Action, LoadBalancer, RequestView};

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
pub fn explain(snap: &Snapshot, q: &Query, domain: &str) -> Value {
    let Some(service) = snap.service_by_host(&q.host, &q.namespace) else {
        return json!({"host": q.host, "verdict": format!("{:?} is not a known service: outbound traffic to it follows the outbound traffic policy (passthrough under ALLOW_ANY)", q.host)});
    };
    let host = service.hostname(domain);
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
    let routes = snap.routes.routes(&host);
    let mut out = json!({"host": host, "port": port, "protocol": protocol});
    let endpoints_of = |svc_host: &str, port: u16, subset: Option<&str>| -> Value {
        let Some(svc) = snap.service_by_host(svc_host, &q.namespace) else {
            return json!({"error": format!("{svc_host} is not a known service")});
        };
        let rule = snap.routes.rule(&svc.hostname(domain));
        let (labels, lb, missing) = match subset {
            Some(s) => match rule.as_ref().and_then(|r| {
                r.subsets
                    .get(s)
                    .map(|(l, sub)| (l.clone(), sub.clone().unwrap_or_else(|| r.lb.clone())))
            }) {
                Some((l, lb)) => (Some(l), lb, false),
                None => (None, LoadBalancer::RoundRobin, true),
            },
            None => (
                None,
                rule.as_ref()
                    .map(|r| r.lb.clone())
                    .unwrap_or(LoadBalancer::RoundRobin),
                false,
            ),
        };
        if missing {
            return json!({"destinationRule": rule.map(|r| r.origin.clone()), "error": format!("subset {:?} is not defined by any DestinationRule for {}: requests get 503 no healthy upstream", subset.unwrap_or_default(), svc.hostname(domain))});
        }
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
        json!({
            "destinationRule": rule.map(|r| r.origin.clone()),
            "subsetLabels": labels,
            "loadBalancer": lb_name(&lb),
            "endpoints": eps,
            "note": if eps.is_empty() { Value::String("no ready endpoint: requests get 503 no healthy upstream".into()) } else { Value::Null },
        })
    };
    if routes.is_empty() {
        out["verdict"] = json!("no VirtualService for this host: plain service routing");
        out["endpoints"] = endpoints_of(&host, port, None);
        return out;
    }
    let considered: Vec<String> = routes.iter().map(|r| r.origin.clone()).collect();
    out["rulesInOrder"] = json!(considered);
    match snap.routes.find(&host, &view) {
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
                    out["destinations"] = Value::Array(
                        ds.iter()
                            .map(|d| {
                                let p = d.port.unwrap_or(port);
                                json!({"host": d.host, "subset": d.subset, "port": p, "weight": d.weight, "resolved": endpoints_of(&d.host, p, d.subset.as_deref())})
                            })
                            .collect(),
                    );
                }
            }
            if let Some(p) = route.rewrite_path(path) {
                out["rewrite"] = json!({"uri": p, "authority": route.rewrite_authority});
            }
            if !route.unsupported.is_empty() {
                out["notImplemented"] = json!(route.unsupported);
            }
        }
    }
    out
}
