//! The parts of Kubernetes Services, EndpointSlices and Pods that discovery reads. Unknown
//! fields are skipped. k8s-openapi's generated types would deserialize (and keep) every field of
//! a Pod — containers, volumes, probes, status — and their decoders are a large share of the
//! code a sidecar touches, which stays resident (idle RSS is mostly code pages).
//!
//! The wire format is Kubernetes': camelCase names, absent or `null` optional fields.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
pub struct ObjectMeta {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub status: Option<PodStatus>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Service {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<ServiceSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    pub ports: Option<Vec<ServicePort>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: i32,
    pub protocol: Option<String>,
    pub app_protocol: Option<String>,
    pub target_port: Option<IntOrString>,
}

/// A port given as a number or as a container port's name.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i32),
    String(String),
}

#[derive(Debug, Deserialize)]
pub struct EndpointSlice {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub ports: Option<Vec<EndpointPort>>,
    pub endpoints: Option<Vec<Endpoint>>,
}

#[derive(Debug, Deserialize)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub port: Option<i32>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    #[serde(default)]
    pub addresses: Vec<String>,
    pub conditions: Option<EndpointConditions>,
    pub target_ref: Option<ObjectReference>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointConditions {
    pub ready: Option<bool>,
    pub serving: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct ObjectReference {
    pub name: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_what_discovery_needs_and_skips_the_rest() {
        let svc: Service = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop", "labels": null,
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"clusterIP": "10.0.0.7", "clusterIPs": ["10.0.0.7", "fd00::7"],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"},
                               {"name": "grpc", "port": 9090, "targetPort": "grpc-port", "protocol": "TCP"}],
                     "selector": {"app": "web"}, "sessionAffinity": "None"},
            "status": {"loadBalancer": {}}
        }))
        .unwrap();
        assert_eq!(svc.metadata.name.as_deref(), Some("web"));
        assert_eq!(svc.metadata.labels, None);
        let spec = svc.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.0.0.7"));
        assert_eq!(spec.cluster_ips.unwrap().len(), 2);
        let ports = spec.ports.unwrap();
        assert!(matches!(ports[0].target_port, Some(IntOrString::Int(8080))));
        assert!(matches!(&ports[1].target_port, Some(IntOrString::String(s)) if s == "grpc-port"));
        assert_eq!(ports[0].app_protocol.as_deref(), Some("http"));

        let slice: EndpointSlice = serde_json::from_value(json!({
            "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": true, "terminating": false},
                           "targetRef": {"kind": "Pod", "name": "web-1", "uid": "u"}, "nodeName": "n1"}]
        }))
        .unwrap();
        let ep = &slice.endpoints.unwrap()[0];
        assert_eq!(ep.addresses, ["10.1.0.5"]);
        assert_eq!(ep.conditions.as_ref().unwrap().ready, Some(true));
        assert_eq!(
            ep.target_ref.as_ref().unwrap().name.as_deref(),
            Some("web-1")
        );

        // An EndpointSlice with no endpoints may say `null`.
        let empty: EndpointSlice =
            serde_json::from_value(json!({"metadata": {"name": "e"}, "endpoints": null})).unwrap();
        assert!(empty.endpoints.is_none());

        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "annotations": {"sidecar.istio.io/inject": "true"}},
            "spec": {"containers": [{"name": "app", "image": "nginx"}]},
            "status": {"podIP": "10.1.0.5", "phase": "Running"}
        }))
        .unwrap();
        assert_eq!(pod.status.unwrap().pod_ip.as_deref(), Some("10.1.0.5"));
    }

    #[test]
    fn wrong_types_are_errors_not_defaults() {
        // A port that is not a number is refused (discovery reports the object as rejected).
        let bad = serde_json::from_value::<Service>(json!({
            "metadata": {"name": "web"},
            "spec": {"ports": [{"name": "http", "port": "eighty"}]}
        }));
        assert!(bad.is_err());
        let missing_port = serde_json::from_value::<Service>(json!({
            "metadata": {"name": "web"}, "spec": {"ports": [{"name": "http"}]}
        }));
        assert!(missing_port.is_err());
    }
}
