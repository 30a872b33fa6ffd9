//! Istio `Gateway` resources, pure: which Gateways select this proxy (by its pod's labels), the
//! servers they declare (port, protocol, hosts), and whether a request's host is admitted by a
//! server. The gateway mode of the proxy listens on those ports and routes with the
//! VirtualServices bound to these Gateways.

use std::collections::BTreeMap;

use serde_json::Value;

/// A server's protocol (`port.protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerProtocol {
    Http,
    Https,
    Http2,
    Grpc,
    Tcp,
    Tls,
}

impl ServerProtocol {
    fn parse(s: &str) -> Result<ServerProtocol, String> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "HTTP" => ServerProtocol::Http,
            "HTTPS" => ServerProtocol::Https,
            "HTTP2" => ServerProtocol::Http2,
            "GRPC" => ServerProtocol::Grpc,
            "TCP" | "MONGO" | "REDIS" | "MYSQL" => ServerProtocol::Tcp,
            "TLS" => ServerProtocol::Tls,
            other => {
                return Err(format!(
                    "port.protocol {other:?} is not one of HTTP, HTTPS, HTTP2, GRPC, TCP, TLS"
                ));
            }
        })
    }

    /// Served as plain-text HTTP.
    pub fn is_plain_http(self) -> bool {
        matches!(
            self,
            ServerProtocol::Http | ServerProtocol::Http2 | ServerProtocol::Grpc
        )
    }
}

/// One `servers[]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Server {
    pub port: u16,
    pub protocol: ServerProtocol,
    pub name: Option<String>,
    /// `(namespace filter, host)`: `ns/host`, `./host` (the Gateway's namespace), `*/host` or a
    /// bare host (any namespace).
    pub hosts: Vec<(Option<String>, String)>,
    /// `tls.httpsRedirect` on a plain HTTP server.
    pub https_redirect: bool,
    /// `tls.mode`, when the server has TLS settings.
    pub tls_mode: Option<String>,
    pub tls: ServerTls,
}

/// A server's `tls` certificate settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerTls {
    pub credential_name: Option<String>,
    pub server_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
    /// `TLSV1_3` restricts to TLS 1.3; anything else allows 1.2 and 1.3.
    pub min_tls13: bool,
}

/// A Gateway that may select this proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gateway {
    /// `namespace/name`, as VirtualServices refer to it.
    pub id: String,
    pub namespace: String,
    pub selector: BTreeMap<String, String>,
    pub servers: Vec<Server>,
}

/// Parse a Gateway object; errors name the field.
pub fn parse(obj: &Value) -> Result<Gateway, String> {
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default");
    let name = obj["metadata"]["name"]
        .as_str()
        .ok_or("metadata.name is required")?;
    let spec = &obj["spec"];
    let selector = spec["selector"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let mut servers = Vec::new();
    for (i, s) in spec["servers"].as_array().into_iter().flatten().enumerate() {
        let f = format!("servers[{i}]");
        let port = s["port"]["number"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{f}.port.number is required (1-65535)"))?;
        let protocol = ServerProtocol::parse(s["port"]["protocol"].as_str().unwrap_or("HTTP"))
            .map_err(|e| format!("{f}.{e}"))?;
        let hosts: Vec<(Option<String>, String)> = s["hosts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|h| match h.split_once('/') {
                Some((".", host)) => (Some(ns.to_owned()), host.to_owned()),
                Some(("*", host)) => (None, host.to_owned()),
                Some((n, host)) => (Some(n.to_owned()), host.to_owned()),
                None => (None, h.to_owned()),
            })
            .collect();
        if hosts.is_empty() {
            return Err(format!("{f}.hosts: at least one host is required"));
        }
        servers.push(Server {
            port,
            protocol,
            name: s["port"]["name"].as_str().map(str::to_owned),
            hosts,
            https_redirect: s["tls"]["httpsRedirect"] == true,
            tls_mode: s["tls"]["mode"].as_str().map(str::to_owned),
            tls: ServerTls {
                credential_name: s["tls"]["credentialName"].as_str().map(str::to_owned),
                server_certificate: s["tls"]["serverCertificate"].as_str().map(str::to_owned),
                private_key: s["tls"]["privateKey"].as_str().map(str::to_owned),
                ca_certificates: s["tls"]["caCertificates"].as_str().map(str::to_owned),
                min_tls13: s["tls"]["minProtocolVersion"].as_str() == Some("TLSV1_3"),
            },
        });
    }
    if servers.is_empty() {
        return Err("spec.servers: at least one server is required".into());
    }
    Ok(Gateway {
        id: format!("{ns}/{name}"),
        namespace: ns.to_owned(),
        selector,
        servers,
    })
}

/// The Gateways whose selector matches the pod's labels (an empty selector selects nothing,
/// as a Gateway without a selector has no workload).
pub fn selected<'g>(
    gateways: &'g [Gateway],
    pod_labels: &BTreeMap<String, String>,
) -> Vec<&'g Gateway> {
    gateways
        .iter()
        .filter(|g| {
            !g.selector.is_empty() && g.selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
        })
        .collect()
}

/// Whether `host` (no port) matches a server host pattern (`*`, `*.example.com`, exact).
pub fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// Whether a VirtualService in `vs_namespace` with these hosts may attach to the server.
pub fn admits_virtual_service(server: &Server, vs_namespace: &str, vs_hosts: &[String]) -> bool {
    server.hosts.iter().any(|(ns, pattern)| {
        ns.as_deref().is_none_or(|n| n == vs_namespace)
            && vs_hosts
                .iter()
                .any(|h| host_matches(pattern, h) || host_matches(h, pattern) || h == "*")
    })
}

/// A VirtualService's `gateways` entry as `namespace/name` (a bare name is in the VS's
/// namespace); `mesh` stays `mesh`.
pub fn gateway_ref(entry: &str, vs_namespace: &str) -> String {
    if entry == "mesh" || entry.contains('/') {
        entry.to_owned()
    } else {
        format!("{vs_namespace}/{entry}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gw() -> Value {
        json!({"metadata": {"name": "bookinfo-gateway", "namespace": "shop"},
        "spec": {"selector": {"istio": "ingressgateway"}, "servers": [
            {"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]},
            {"port": {"number": 8443, "name": "https", "protocol": "HTTPS"}, "hosts": ["./shop.example.com", "other/*.example.org"], "tls": {"mode": "SIMPLE", "credentialName": "c"}}
        ]}})
    }

    #[test]
    fn parses_servers_hosts_and_selects_by_labels() {
        let g = parse(&gw()).expect("gateway");
        assert_eq!(g.id, "shop/bookinfo-gateway");
        assert_eq!(g.servers[0].protocol, ServerProtocol::Http);
        assert_eq!(
            g.servers[1].hosts[0],
            (Some("shop".into()), "shop.example.com".into())
        );
        assert_eq!(
            g.servers[1].hosts[1],
            (Some("other".into()), "*.example.org".into())
        );
        assert_eq!(g.servers[1].tls_mode.as_deref(), Some("SIMPLE"));
        let labels: BTreeMap<String, String> = [
            ("istio".to_owned(), "ingressgateway".to_owned()),
            ("app".to_owned(), "x".to_owned()),
        ]
        .into();
        let gs = [g.clone()];
        assert_eq!(selected(&gs, &labels).len(), 1);
        assert!(selected(&gs, &BTreeMap::new()).is_empty());
        let mut bad = gw();
        bad["spec"]["servers"][0]["port"]["protocol"] = json!("QUIC");
        assert!(
            parse(&bad)
                .unwrap_err()
                .contains("servers[0].port.protocol")
        );
        bad["spec"]["servers"] = json!([]);
        assert!(parse(&bad).is_err());
    }

    #[test]
    fn hosts_and_references() {
        assert!(host_matches("*", "a.b"));
        assert!(host_matches("*.example.com", "shop.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(host_matches("Shop.Example.com", "shop.example.com"));
        let g = parse(&gw()).expect("gateway");
        assert!(admits_virtual_service(
            &g.servers[0],
            "any",
            &["x.y".into()]
        ));
        assert!(admits_virtual_service(
            &g.servers[1],
            "shop",
            &["shop.example.com".into()]
        ));
        assert!(!admits_virtual_service(
            &g.servers[1],
            "elsewhere",
            &["shop.example.com".into()]
        ));
        assert!(admits_virtual_service(
            &g.servers[1],
            "other",
            &["a.example.org".into()]
        ));
        assert_eq!(
            gateway_ref("bookinfo-gateway", "shop"),
            "shop/bookinfo-gateway"
        );
        assert_eq!(gateway_ref("istio-system/gw", "shop"), "istio-system/gw");
        assert_eq!(gateway_ref("mesh", "shop"), "mesh");
    }
}
