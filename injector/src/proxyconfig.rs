//! `ProxyConfig` (meshConfig.defaultConfig, and the pod's `proxy.istio.io/config` annotation):
//! validated against the fields Istio's ProxyConfig has, merged the way protobuf merges (scalars
//! replace, maps merge), and printed the way Istio prints it into `PROXY_CONFIG` (compact JSON,
//! fields in proto field-number order).

use serde_json::{Map, Value};

/// ProxyConfig fields in proto field-number order (istio.mesh.v1alpha1.ProxyConfig). The order
/// fixes the `PROXY_CONFIG` text.
const FIELDS: &[&str] = &[
    "configPath",
    "binaryPath",
    "serviceCluster",
    "drainDuration",
    "parentShutdownDuration",
    "discoveryAddress",
    "statsdUdpAddress",
    "proxyAdminPort",
    "controlPlaneAuthPolicy",
    "customConfigFile",
    "statNameLength",
    "concurrency",
    "proxyBootstrapTemplatePath",
    "interceptionMode",
    "tracing",
    "envoyAccessLogService",
    "envoyMetricsService",
    "proxyMetadata",
    "statusPort",
    "extraStatTags",
    "gatewayTopology",
    "terminationDrainDuration",
    "meshId",
    "readinessProbe",
    "proxyStatsMatcher",
    "holdApplicationUntilProxyStarts",
    "caCertificatesPem",
    "image",
    "privateKeyProvider",
    "proxyHeaders",
    "fileFlushInterval",
    "fileFlushMinSizeKb",
    "serviceClusterName",
];

/// Check a ProxyConfig object: known fields only, and the types the injector relies on.
pub fn validate(v: &Value) -> Result<(), String> {
    let Value::Object(m) = v else {
        return Err("ProxyConfig must be an object".into());
    };
    for (k, val) in m {
        if !FIELDS.contains(&k.as_str()) {
            return Err(format!("unknown ProxyConfig field {k:?}"));
        }
        let ok = match k.as_str() {
            "proxyMetadata" => val
                .as_object()
                .is_some_and(|o| o.values().all(Value::is_string)),
            "holdApplicationUntilProxyStarts" => val.is_boolean(),
            "interceptionMode" => matches!(val.as_str(), Some("REDIRECT" | "TPROXY" | "NONE")),
            "concurrency" | "statusPort" | "proxyAdminPort" | "statNameLength" => {
                val.is_i64() || val.is_u64()
            }
            _ => true,
        };
        if !ok {
            return Err(format!(
                "ProxyConfig field {k:?} has an invalid value {val}"
            ));
        }
    }
    Ok(())
}

/// Parse the `proxy.istio.io/config` annotation (YAML or JSON).
pub fn parse_annotation(text: &str) -> Result<Value, String> {
    let v: Value = serde_yaml::from_str(text).map_err(|e| format!("not YAML/JSON: {e}"))?;
    let v = if v.is_null() {
        Value::Object(Map::new())
    } else {
        v
    };
    validate(&v)?;
    Ok(v)
}

/// Protobuf-style merge: `over` replaces scalars and lists of `base`, and merges maps.
pub fn merge(base: &Map<String, Value>, over: &Value) -> Map<String, Value> {
    let mut out = base.clone();
    if let Value::Object(o) = over {
        for (k, v) in o {
            match (out.get_mut(k), v) {
                (Some(Value::Object(b)), Value::Object(ov)) => {
                    for (kk, vv) in ov {
                        b.insert(kk.clone(), vv.clone());
                    }
                }
                _ => {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
    }
    out
}

fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), sorted(&m[k])))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

/// `PROXY_CONFIG` text: compact JSON in proto field order (maps sorted by key), newline-terminated.
pub fn to_env_json(pc: &Map<String, Value>) -> String {
    let mut ordered = Map::new();
    for f in FIELDS {
        if let Some(v) = pc.get(*f) {
            ordered.insert((*f).to_owned(), sorted(v));
        }
    }
    format!("{}\n", Value::Object(ordered))
}

/// `proxyMetadata` as sorted (name, value) pairs.
pub fn metadata(pc: &Map<String, Value>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = pc
        .get("proxyMetadata")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}
