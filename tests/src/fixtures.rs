//! Kubernetes and Istio objects the routing tests keep needing, as YAML text for a proxy's
//! config directory: one place for their shape, so the tests differ only in what they test.

/// An EndpointSlice of `service` with one named port and ready endpoints (`ip`, optional pod).
pub fn endpoint_slice(
    name: &str,
    ns: &str,
    service: &str,
    port: (&str, u16),
    endpoints: &[(&str, Option<&str>)],
) -> String {
    let eps: String = endpoints
        .iter()
        .map(|(ip, pod)| {
            let target = pod
                .map(|p| format!(", targetRef: {{kind: Pod, name: {p}, namespace: {ns}}}"))
                .unwrap_or_default();
            format!("\n- {{addresses: [\"{ip}\"], conditions: {{ready: true}}{target}}}")
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
metadata: {{name: {name}, namespace: {ns}, labels: {{kubernetes.io/service-name: {service}}}}}\n\
addressType: IPv4\nports: [{{name: {}, port: {}}}]\nendpoints:{eps}\n",
        port.0, port.1
    )
}

/// A Pod with labels (YAML flow mapping body, e.g. `app: reviews, version: v1`) at `ip`.
pub fn pod(name: &str, ns: &str, labels: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n\
status: {{podIP: \"{ip}\"}}\n"
    )
}

/// A DestinationRule for `host` with subsets `v1` and `v2` selected by the `version` label.
pub fn subsets_v1_v2(host: &str, ns: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
metadata: {{name: {host}, namespace: {ns}}}\n\
spec: {{host: {host}, subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]}}\n"
    )
}

/// A Service with one `http` port at a ClusterIP.
pub fn service(name: &str, ns: &str, vip: &str, port: u16, target_port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
spec: {{clusterIP: {vip}, ports: [{{name: http, port: {port}, targetPort: {target_port}}}]}}\n"
    )
}
