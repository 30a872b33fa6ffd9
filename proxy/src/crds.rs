//! The `networking.istio.io` resources the proxy reads, as one typed model: it generates the
//! CustomResourceDefinitions the chart installs (`ferry-proxy crds`) and it checks every resource
//! the route compiler is given (unknown fields and wrong types become diagnostics), so what the
//! cluster accepts and what the code reads cannot drift apart.
//!
//! Every object in the schema keeps unknown fields (`x-kubernetes-preserve-unknown-fields`): a
//! field of Istio's API that ferry does not model must reach the proxy (and be reported there),
//! never be pruned silently by the API server.

use serde_json::{Map, Value, json};

/// A field's type.
#[derive(Clone, Debug)]
pub enum Ty {
    Str,
    Int,
    Bool,
    /// One of these strings.
    Enum(&'static [&'static str]),
    List(Box<Ty>),
    /// String keys.
    Map(Box<Ty>),
    Obj(Vec<(&'static str, Ty)>, &'static [&'static str]),
    /// Anything (kept as written).
    Any,
}

fn obj(fields: Vec<(&'static str, Ty)>) -> Ty {
    Ty::Obj(fields, &[])
}

fn list(t: Ty) -> Ty {
    Ty::List(Box::new(t))
}

fn map(t: Ty) -> Ty {
    Ty::Map(Box::new(t))
}

fn strings() -> Ty {
    list(Ty::Str)
}

fn string_match() -> Ty {
    obj(vec![
        ("exact", Ty::Str),
        ("prefix", Ty::Str),
        ("regex", Ty::Str),
    ])
}

fn destination() -> Ty {
    Ty::Obj(
        vec![
            ("host", Ty::Str),
            ("subset", Ty::Str),
            ("port", obj(vec![("number", Ty::Int)])),
        ],
        &["host"],
    )
}

fn header_ops() -> Ty {
    obj(vec![
        ("set", map(Ty::Str)),
        ("add", map(Ty::Str)),
        ("remove", strings()),
    ])
}

fn headers() -> Ty {
    obj(vec![("request", header_ops()), ("response", header_ops())])
}

fn http_match() -> Ty {
    obj(vec![
        ("name", Ty::Str),
        ("uri", string_match()),
        ("scheme", string_match()),
        ("method", string_match()),
        ("authority", string_match()),
        ("headers", map(string_match())),
        ("withoutHeaders", map(string_match())),
        ("queryParams", map(string_match())),
        ("ignoreUriCase", Ty::Bool),
        ("port", Ty::Int),
        ("sourceLabels", map(Ty::Str)),
        ("sourceNamespace", Ty::Str),
        ("gateways", strings()),
        ("statPrefix", Ty::Str),
    ])
}

fn l4_match(tls: bool) -> Ty {
    let mut f = vec![
        ("destinationSubnets", strings()),
        ("port", Ty::Int),
        ("sourceLabels", map(Ty::Str)),
        ("sourceNamespace", Ty::Str),
        ("gateways", strings()),
    ];
    if tls {
        f.insert(0, ("sniHosts", strings()));
        Ty::Obj(f, &["sniHosts"])
    } else {
        obj(f)
    }
}

fn route_destination(http: bool) -> Ty {
    let mut f = vec![("destination", destination()), ("weight", Ty::Int)];
    if http {
        f.push(("headers", headers()));
    }
    Ty::Obj(f, &["destination"])
}

fn http_route() -> Ty {
    obj(vec![
        ("name", Ty::Str),
        ("match", list(http_match())),
        ("route", list(route_destination(true))),
        (
            "redirect",
            obj(vec![
                ("uri", Ty::Str),
                ("authority", Ty::Str),
                ("port", Ty::Int),
                (
                    "derivePort",
                    Ty::Enum(&["FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"]),
                ),
                ("scheme", Ty::Str),
                ("redirectCode", Ty::Int),
            ]),
        ),
        (
            "directResponse",
            obj(vec![("status", Ty::Int), ("body", Ty::Any)]),
        ),
        (
            "delegate",
            obj(vec![("name", Ty::Str), ("namespace", Ty::Str)]),
        ),
        (
            "rewrite",
            obj(vec![
                ("uri", Ty::Str),
                ("authority", Ty::Str),
                (
                    "uriRegexRewrite",
                    obj(vec![("match", Ty::Str), ("rewrite", Ty::Str)]),
                ),
            ]),
        ),
        ("headers", headers()),
        // Accepted and reported until resilience policies are built; kept as written.
        ("timeout", Ty::Str),
        ("retries", Ty::Any),
        ("fault", Ty::Any),
        ("mirror", Ty::Any),
        ("mirrors", Ty::Any),
        ("mirrorPercentage", Ty::Any),
        ("mirror_percent", Ty::Any),
        ("corsPolicy", Ty::Any),
    ])
}

fn load_balancer() -> Ty {
    obj(vec![
        (
            "simple",
            Ty::Enum(&[
                "UNSPECIFIED",
                "LEAST_CONN",
                "RANDOM",
                "PASSTHROUGH",
                "ROUND_ROBIN",
                "LEAST_REQUEST",
            ]),
        ),
        (
            "consistentHash",
            obj(vec![
                ("httpHeaderName", Ty::Str),
                (
                    "httpCookie",
                    obj(vec![("name", Ty::Str), ("path", Ty::Str), ("ttl", Ty::Str)]),
                ),
                ("useSourceIp", Ty::Bool),
                ("httpQueryParameterName", Ty::Str),
                ("ringHash", Ty::Any),
                ("maglev", Ty::Any),
                ("minimumRingSize", Ty::Int),
            ]),
        ),
        ("localityLbSetting", Ty::Any),
        ("warmupDurationSecs", Ty::Str),
        ("warmup", Ty::Any),
    ])
}

fn traffic_policy(port_level: bool) -> Ty {
    let mut f = vec![
        ("loadBalancer", load_balancer()),
        ("connectionPool", Ty::Any),
        ("outlierDetection", Ty::Any),
        ("tls", Ty::Any),
    ];
    if port_level {
        f.insert(0, ("port", obj(vec![("number", Ty::Int)])));
    } else {
        f.push(("portLevelSettings", list(traffic_policy(true))));
        f.push(("tunnel", Ty::Any));
        f.push(("proxyProtocol", Ty::Any));
    }
    obj(f)
}

/// `VirtualService.spec`.
pub fn virtual_service() -> Ty {
    obj(vec![
        ("hosts", strings()),
        ("gateways", strings()),
        ("http", list(http_route())),
        (
            "tls",
            list(Ty::Obj(
                vec![
                    ("match", list(l4_match(true))),
                    ("route", list(route_destination(false))),
                ],
                &["match"],
            )),
        ),
        (
            "tcp",
            list(obj(vec![
                ("match", list(l4_match(false))),
                ("route", list(route_destination(false))),
            ])),
        ),
        ("exportTo", strings()),
    ])
}

/// `DestinationRule.spec`.
pub fn destination_rule() -> Ty {
    Ty::Obj(
        vec![
            ("host", Ty::Str),
            ("trafficPolicy", traffic_policy(false)),
            (
                "subsets",
                list(Ty::Obj(
                    vec![
                        ("name", Ty::Str),
                        ("labels", map(Ty::Str)),
                        ("trafficPolicy", traffic_policy(false)),
                    ],
                    &["name"],
                )),
            ),
            ("exportTo", strings()),
            ("workloadSelector", obj(vec![("matchLabels", map(Ty::Str))])),
        ],
        &["host"],
    )
}

/// `Gateway.spec`.
pub fn gateway() -> Ty {
    obj(vec![
        ("selector", map(Ty::Str)),
        (
            "servers",
            list(Ty::Obj(
                vec![
                    (
                        "port",
                        Ty::Obj(
                            vec![
                                ("number", Ty::Int),
                                ("protocol", Ty::Str),
                                ("name", Ty::Str),
                                ("targetPort", Ty::Int),
                            ],
                            &["number"],
                        ),
                    ),
                    ("hosts", strings()),
                    ("bind", Ty::Str),
                    ("defaultEndpoint", Ty::Str),
                    ("name", Ty::Str),
                    (
                        "tls",
                        obj(vec![
                            ("httpsRedirect", Ty::Bool),
                            (
                                "mode",
                                Ty::Enum(&[
                                    "PASSTHROUGH",
                                    "SIMPLE",
                                    "MUTUAL",
                                    "AUTO_PASSTHROUGH",
                                    "ISTIO_MUTUAL",
                                    "OPTIONAL_MUTUAL",
                                ]),
                            ),
                            ("credentialName", Ty::Str),
                            ("serverCertificate", Ty::Str),
                            ("privateKey", Ty::Str),
                            ("caCertificates", Ty::Str),
                            ("minProtocolVersion", Ty::Str),
                            ("maxProtocolVersion", Ty::Str),
                            ("subjectAltNames", strings()),
                            ("cipherSuites", strings()),
                        ]),
                    ),
                ],
                &["port", "hosts"],
            )),
        ),
    ])
}

/// The OpenAPI v3 schema of a type (structural, as CRDs require).
pub fn openapi(t: &Ty) -> Value {
    match t {
        Ty::Str => json!({"type": "string"}),
        Ty::Int => json!({"type": "integer", "format": "int32"}),
        Ty::Bool => json!({"type": "boolean"}),
        Ty::Enum(values) => json!({"type": "string", "enum": values}),
        Ty::List(t) => json!({"type": "array", "items": openapi(t)}),
        Ty::Map(t) => json!({"type": "object", "additionalProperties": openapi(t)}),
        Ty::Any => json!({"x-kubernetes-preserve-unknown-fields": true}),
        Ty::Obj(fields, required) => {
            let props: Map<String, Value> = fields
                .iter()
                .map(|(k, t)| ((*k).to_owned(), openapi(t)))
                .collect();
            let mut v = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true, "properties": props});
            if !required.is_empty() {
                v["required"] = json!(required);
            }
            v
        }
    }
}

/// Where `value` departs from the type: unknown fields (by path) and wrong types.
pub fn check(t: &Ty, value: &Value, path: &str, out: &mut Vec<String>) {
    match (t, value) {
        (_, Value::Null) | (Ty::Any, _) => {}
        (Ty::Str, Value::String(_)) | (Ty::Bool, Value::Bool(_)) => {}
        (Ty::Int, Value::Number(n)) if n.is_i64() || n.is_u64() => {}
        (Ty::Enum(values), Value::String(s)) => {
            if !values.contains(&s.as_str()) {
                out.push(format!("{path}: {s:?} is not one of {}", values.join(", ")));
            }
        }
        (Ty::List(t), Value::Array(items)) => {
            for (i, v) in items.iter().enumerate() {
                check(t, v, &format!("{path}[{i}]"), out);
            }
        }
        (Ty::Map(t), Value::Object(m)) => {
            for (k, v) in m {
                check(t, v, &format!("{path}.{k}"), out);
            }
        }
        (Ty::Obj(fields, required), Value::Object(m)) => {
            for r in *required {
                if !m.contains_key(*r) {
                    out.push(format!("{path}.{r}: required"));
                }
            }
            for (k, v) in m {
                match fields.iter().find(|(f, _)| f == k) {
                    Some((_, t)) => check(t, v, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}: unknown field")),
                }
            }
        }
        (t, v) => out.push(format!(
            "{path}: expected {}, got {}",
            match t {
                Ty::Str | Ty::Enum(_) => "a string",
                Ty::Int => "an integer",
                Ty::Bool => "a boolean",
                Ty::List(_) => "a list",
                Ty::Map(_) | Ty::Obj(..) => "an object",
                Ty::Any => "anything",
            },
            match v {
                Value::String(_) => "a string",
                Value::Number(_) => "a number",
                Value::Bool(_) => "a boolean",
                Value::Array(_) => "a list",
                Value::Object(_) => "an object",
                Value::Null => "null",
            }
        )),
    }
}

/// The spec type of a kind the proxy reads.
pub fn spec_type(kind: &str) -> Option<Ty> {
    match kind {
        "VirtualService" => Some(virtual_service()),
        "DestinationRule" => Some(destination_rule()),
        "Gateway" => Some(gateway()),
        _ => None,
    }
}

fn crd(kind: &str, plural: &str, short: &str, spec: &Ty, columns: Value) -> Value {
    let schema = json!({"openAPIV3Schema": {
        "type": "object",
        "description": format!("Istio's networking.istio.io {kind}, as ferry reads it."),
        "properties": {
            "spec": openapi(spec),
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
        },
    }});
    let versions: Vec<Value> = ["v1", "v1beta1", "v1alpha3"]
        .iter()
        .map(|v| {
            json!({
                "name": v,
                "served": true,
                "storage": *v == "v1",
                "schema": schema,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
            })
        })
        .collect();
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{plural}.networking.istio.io"),
            "labels": {"app.kubernetes.io/part-of": "ferry"},
        },
        "spec": {
            "group": "networking.istio.io",
            "names": {
                "kind": kind,
                "listKind": format!("{kind}List"),
                "plural": plural,
                "singular": kind.to_lowercase(),
                "shortNames": [short],
                "categories": ["istio-io", "networking-istio-io"],
            },
            "scope": "Namespaced",
            "versions": versions,
        },
    })
}

/// The CRDs, in a stable order.
pub fn definitions() -> Vec<Value> {
    vec![
        crd(
            "DestinationRule",
            "destinationrules",
            "dr",
            &destination_rule(),
            json!([
                {"name": "Host", "type": "string", "jsonPath": ".spec.host", "description": "The name of a service from the service registry"},
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            ]),
        ),
        crd(
            "Gateway",
            "gateways",
            "gw",
            &gateway(),
            json!([{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]),
        ),
        crd(
            "VirtualService",
            "virtualservices",
            "vs",
            &virtual_service(),
            json!([
                {"name": "Gateways", "type": "string", "jsonPath": ".spec.gateways", "description": "The names of gateways and sidecars that should apply these routes"},
                {"name": "Hosts", "type": "string", "jsonPath": ".spec.hosts", "description": "The destination hosts to which traffic is being sent"},
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            ]),
        ),
    ]
}

/// The CRDs as one multi-document YAML file (what `ferry-proxy crds` prints and the chart ships).
pub fn yaml() -> String {
    // Keys sorted explicitly: serde_json's map order depends on a feature other crates in a
    // build may switch on, and the output must be byte-stable.
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
            v => v.clone(),
        }
    }
    let docs: Vec<String> = definitions()
        .iter()
        .map(|d| serde_yaml::to_string(&sorted(d)).unwrap_or_default())
        .collect();
    format!(
        "# Generated by `ferry-proxy crds` from proxy/src/crds.rs; do not edit.\n{}",
        docs.join("---\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_unknown_fields_and_wrong_types() {
        let vs = json!({"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}, "weigth": 10}], "timeout": "1s"}], "tcp": "x"});
        let mut out = Vec::new();
        check(&virtual_service(), &vs, "spec", &mut out);
        assert_eq!(
            out,
            [
                "spec.http[0].route[0].weigth: unknown field",
                "spec.tcp: expected a list, got a string"
            ]
        );
        let dr = json!({"subsets": [{"labels": {"v": 1}}], "trafficPolicy": {"loadBalancer": {"simple": "FASTEST"}}});
        let mut out = Vec::new();
        check(&destination_rule(), &dr, "spec", &mut out);
        assert!(out.contains(&"spec.host: required".to_owned()), "{out:?}");
        assert!(
            out.contains(&"spec.subsets[0].name: required".to_owned()),
            "{out:?}"
        );
        assert!(
            out.contains(&"spec.subsets[0].labels.v: expected a string, got a number".to_owned()),
            "{out:?}"
        );
        assert!(
            out.iter().any(|e| e.contains("\"FASTEST\" is not one of")),
            "{out:?}"
        );
    }

    #[test]
    fn every_object_keeps_unknown_fields() {
        fn walk(v: &Value, path: &str) {
            if v["type"] == "object" && v.get("properties").is_some() {
                assert_eq!(v["x-kubernetes-preserve-unknown-fields"], true, "{path}");
            }
            if let Some(m) = v.as_object() {
                for (k, c) in m {
                    walk(c, &format!("{path}.{k}"));
                }
            }
        }
        for d in definitions() {
            walk(&d, "crd");
            assert_eq!(d["spec"]["versions"].as_array().map(Vec::len), Some(3));
        }
    }
}
