//! Istio's injection conformance data as the oracle: the `injectRequired` table, the webhook
//! selector table, the 19 kube-inject golden pairs (structurally), the 5 must-fail inputs, and
//! the probe tables. Every mismatching case is reported.
//!
//! Normalisation, and only this: the test configures the injector with Istio's test image
//! (`registry.istio.io/testing/proxyv2:latest`), as Istio's harness does, so no image field needs
//! rewriting. kube-inject artefacts absent from a webhook's pod are dropped from the golden
//! (`resources: {}` on app containers, `creationTimestamp: null`), and the owner simulation the
//! test adds to Deployment templates (Istio's webhook test does the same) is removed again.

use std::collections::BTreeMap;

use ferry_injector::config::{Config, Policy};
use ferry_injector::decision::{PodFacts, Rules, inject_required};
use ferry_injector::inject::{self, Outcome, Request};
use ferry_injector::selector::LabelSelector;
use ferry_injector::webhooks;
use ferry_tests::{jsondiff, read};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

const ISTIO_TEST_IMAGE: &str = "registry.istio.io/testing/proxyv2:latest";

fn map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn selectors(v: &Value) -> Vec<LabelSelector> {
    serde_json::from_value(v.clone()).expect("selectors")
}

#[test]
fn inject_required_table() {
    let doc: Value = serde_json::from_str(&read("inject/inject-required.json")).expect("JSON");
    let mut failures = Vec::new();
    let mut n = 0;
    for c in doc["cases"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(doc["derived_cases"].as_array().into_iter().flatten())
    {
        n += 1;
        let (labels, annotations) = (map(&c["pod_labels"]), map(&c["pod_annotations"]));
        let (never, always) = (
            selectors(&c["never_inject_selector"]),
            selectors(&c["always_inject_selector"]),
        );
        let d = inject_required(
            &PodFacts {
                namespace: c["namespace"].as_str().unwrap_or_default(),
                labels: &labels,
                annotations: &annotations,
                host_network: c["host_network"].as_bool().unwrap_or(false),
            },
            &Rules {
                policy: Policy::from_istio(c["policy"].as_str().unwrap_or_default()),
                never_inject_selector: &never,
                always_inject_selector: &always,
            },
        );
        if d.inject != c["want_inject"].as_bool().expect("want_inject") {
            failures.push(format!("{} ({}): got {d}", c["id"], c["name"]));
        }
    }
    assert_eq!(n, 48, "36 upstream + 12 derived rows");
    assert!(
        failures.is_empty(),
        "{} of {n} rows differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn webhook_selectors_table() {
    let doc: Value = serde_json::from_str(&read("inject/webhook-selectors.json")).expect("JSON");
    // Our rendering of the webhooks equals the chart's, selector for selector.
    let ours_default = serde_json::to_value(webhooks::istio_webhooks("", false)).expect("json");
    let theirs: Vec<Value> = doc["webhooks_default_revision"]
        .as_array()
        .expect("webhooks")
        .iter()
        .map(|w| json!({"name": w["name"], "namespaceSelector": w["namespaceSelector"], "objectSelector": w["objectSelector"]}))
        .collect();
    assert_eq!(
        ours_default,
        Value::Array(theirs),
        "default-revision webhooks"
    );
    let canary: Vec<Value> = doc["webhooks_revision_canary"]
        .as_array()
        .expect("canary")
        .iter()
        .map(|w| json!({"name": w["name"], "namespaceSelector": w["namespaceSelector"], "objectSelector": w["objectSelector"]}))
        .collect();
    assert_eq!(
        serde_json::to_value(webhooks::istio_webhooks("canary", false)).expect("json"),
        Value::Array(canary)
    );

    let mut failures = Vec::new();
    let rows = doc["rows"].as_array().expect("rows");
    for (i, row) in rows.iter().enumerate() {
        let auto = row["enable_namespaces_by_default"]
            .as_bool()
            .unwrap_or(false);
        let (ns_labels, pod_labels, pod_annotations) = (
            map(&row["namespace_labels"]),
            map(&row["pod_labels"]),
            map(&row["pod_annotations"]),
        );
        let default_hooks = webhooks::istio_webhooks("", auto);
        let canary_hooks = webhooks::istio_webhooks("canary", false);
        let got_default = webhooks::matching(&default_hooks, &ns_labels, &pod_labels);
        let got_canary = webhooks::matching(&canary_hooks, &ns_labels, &pod_labels);
        let want_default: Vec<String> =
            serde_json::from_value(row["matched_webhooks_default_revision"].clone()).expect("list");
        let want_canary: Vec<String> =
            serde_json::from_value(row["matched_webhooks_canary_revision"].clone()).expect("list");
        let called = !got_default.is_empty() || !got_canary.is_empty();
        let injected = called
            && inject_required(
                &PodFacts {
                    namespace: row["namespace"].as_str().unwrap_or_default(),
                    labels: &pod_labels,
                    annotations: &pod_annotations,
                    host_network: false,
                },
                &Rules {
                    policy: Policy::Enabled,
                    never_inject_selector: &[],
                    always_inject_selector: &[],
                },
            )
            .inject;
        if got_default != want_default
            || got_canary != want_canary
            || injected != row["injected"].as_bool().expect("injected")
        {
            failures.push(format!(
                "row {i} ns={ns_labels:?} pod={pod_labels:?} ann={pod_annotations:?} auto={auto}: got {got_default:?}/{got_canary:?} injected={injected}, want {want_default:?}/{want_canary:?} injected={}",
                row["injected"]
            ));
        }
    }
    assert_eq!(rows.len(), 144);
    assert!(
        failures.is_empty(),
        "{} of {} rows differ:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

/// The injector config a case was generated with.
fn case_config(case: &Value) -> Config {
    let mut cfg = Config {
        proxy_image: ISTIO_TEST_IMAGE.into(),
        ..Config::default()
    };
    for flag in case["set_flags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        let (k, v) = flag.split_once('=').expect("k=v");
        match k {
            "values.global.proxy.includeIPRanges" => cfg.proxy.include_ip_ranges = v.into(),
            "values.global.proxy.excludeIPRanges" => cfg.proxy.exclude_ip_ranges = v.into(),
            "values.global.proxy.excludeInboundPorts" => cfg.proxy.exclude_inbound_ports = v.into(),
            "values.global.proxy.statusPort" => cfg.proxy.status_port = v.parse().expect("port"),
            "values.global.proxy.holdApplicationUntilProxyStarts" => {
                cfg.proxy.hold_application_until_proxy_starts = v == "true"
            }
            "components.cni.enabled" => cfg.cni_enabled = v == "true",
            "values.cni.provider" => {}
            "values.global.network" => cfg.network = v.into(),
            other => panic!("unhandled set flag {other}"),
        }
    }
    for (k, v) in case["mesh_overrides"].as_object().into_iter().flatten() {
        match k.split('.').collect::<Vec<_>>().as_slice() {
            ["defaultConfig", "proxyMetadata", name] => {
                let md = cfg
                    .default_proxy_config
                    .entry("proxyMetadata")
                    .or_insert(json!({}));
                md[*name] = v.clone();
            }
            ["defaultConfig", field] => {
                cfg.default_proxy_config.insert((*field).into(), v.clone());
            }
            _ => panic!("unhandled mesh override {k}"),
        }
    }
    for (k, v) in case["istiod_env"].as_object().into_iter().flatten() {
        match (k.as_str(), v.as_str()) {
            ("ENABLE_NATIVE_SIDECARS", Some(v)) => cfg.native_sidecars = v == "true",
            other => panic!("unhandled istiod env {other:?}"),
        }
    }
    cfg
}

fn yaml(text: &str) -> Value {
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(text)
        .filter_map(|d| {
            let v: Value = serde::Deserialize::deserialize(d).ok()?;
            (!v.is_null()).then_some(v)
        })
        .collect();
    docs.into_iter().next().expect("one document")
}

/// The pod a webhook would receive for an input object (Deployments: the template, with a
/// ReplicaSet owner as Istio's webhook test simulates).
fn pod_of(obj: &Value) -> (Value, bool) {
    if obj["kind"] == "Pod" {
        return (
            json!({"metadata": obj["metadata"], "spec": obj["spec"]}),
            false,
        );
    }
    let name = obj["metadata"]["name"].as_str().expect("name");
    let mut meta = obj["spec"]["template"]["metadata"].clone();
    if meta.is_null() {
        meta = json!({});
    }
    meta["generateName"] = json!(format!("{name}-fake-"));
    meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{name}-fake"), "uid": "u", "controller": true}]);
    meta["labels"]["pod-template-hash"] = json!("fake");
    (
        json!({"metadata": meta, "spec": obj["spec"]["template"]["spec"]}),
        true,
    )
}

fn strip_owner_simulation(pod: &mut Value) {
    let m = &mut pod["metadata"];
    if let Some(o) = m.as_object_mut() {
        o.remove("generateName");
        o.remove("ownerReferences");
    }
    if let Some(l) = m["labels"].as_object_mut() {
        l.remove("pod-template-hash");
    }
}

/// Drop kube-inject serialization artefacts: empty `resources`, `creationTimestamp: null`.
fn normalize_golden(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if m.get("resources") == Some(&json!({})) {
                m.remove("resources");
            }
            if m.get("creationTimestamp") == Some(&Value::Null) {
                m.remove("creationTimestamp");
            }
            m.values_mut().for_each(normalize_golden);
        }
        Value::Array(a) => a.iter_mut().for_each(normalize_golden),
        _ => {}
    }
}

fn golden_pod(obj: &Value) -> Value {
    let mut pod = if obj["kind"] == "Pod" {
        json!({"metadata": obj["metadata"], "spec": obj["spec"]})
    } else {
        json!({"metadata": obj["spec"]["template"]["metadata"], "spec": obj["spec"]["template"]["spec"]})
    };
    normalize_golden(&mut pod);
    pod
}

#[test]
fn injection_goldens() {
    let doc: Value = serde_json::from_str(&read("inject/cases.json")).expect("JSON");
    let cases = doc["cases"].as_array().expect("cases");
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let input = yaml(&read(&format!(
            "inject/{}",
            case["input"].as_str().expect("input")
        )));
        let expected = golden_pod(&yaml(&read(&format!(
            "inject/{}",
            case["expected"].as_str().expect("expected")
        ))));
        let cfg = case_config(case);
        let (pod_json, simulated) = pod_of(&input);
        let pod: Pod = serde_json::from_value(pod_json.clone())
            .unwrap_or_else(|e| panic!("{name}: input is not a Pod: {e}"));
        let outcome = inject::process(&pod, &cfg, &Request::default());
        let mut got = match outcome {
            Ok(Outcome::Injected { pod, .. }) => serde_json::to_value(&*pod).expect("json"),
            Ok(Outcome::Skipped(_)) => serde_json::to_value(&pod).expect("json"),
            Err(e) => {
                failures.push(format!("--- {name}: injection failed: {e}"));
                continue;
            }
        };
        if let Some(o) = got.as_object_mut() {
            o.remove("apiVersion");
            o.remove("kind");
        }
        if simulated {
            strip_owner_simulation(&mut got);
        }
        normalize_golden(&mut got);
        let d = jsondiff::diff(&expected, &got);
        if !d.is_empty() {
            failures.push(format!("--- {name}:\n  {}", d.join("\n  ")));
        }
    }
    assert_eq!(cases.len(), 19);
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn invalid_annotations_are_rejected_with_istio_keywords() {
    let doc: Value = serde_json::from_str(&read("inject/cases.json")).expect("JSON");
    let mut failures = Vec::new();
    let errors = doc["error_cases"].as_array().expect("error_cases");
    for case in errors {
        let input = yaml(&read(&format!(
            "inject/{}",
            case["input"].as_str().expect("input")
        )));
        let want = case["expect_error_containing"].as_str().expect("keyword");
        let (pod_json, _) = pod_of(&input);
        let pod: Pod = serde_json::from_value(pod_json).expect("pod");
        match inject::process(&pod, &Config::default(), &Request::default()) {
            Err(e) if e.to_string().to_lowercase().contains(want) => {}
            Err(e) => failures.push(format!("{}: error {e:?} lacks {want:?}", case["input"])),
            Ok(_) => failures.push(format!("{}: accepted", case["input"])),
        }
    }
    assert_eq!(errors.len(), 5);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// === the webhook's HTTP contract, path parameters, probe tables, patches, idempotence ===

use base64::Engine as _;
use ferry_injector::{probes, webhook};

fn review_body(api_version: &str, uid: &str, namespace: &str, object: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": api_version,
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "dryRun": false,
        }
    }))
    .expect("json")
}

#[test]
fn webhook_http_contract() {
    let doc: Value = serde_json::from_str(&read("inject/webhook-http.json")).expect("JSON");
    let mut failures = Vec::new();
    for case in doc["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let mut pod = doc["request_pod"].clone();
        if let Some(a) = case.get("pod_annotations") {
            pod["metadata"]["annotations"] = a.clone();
        }
        let body = if let Some(hex) = case.get("body_hex").and_then(Value::as_str) {
            (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                .collect()
        } else if name == "missing body" {
            vec![]
        } else {
            review_body(
                case["admission_review_api_version"]
                    .as_str()
                    .unwrap_or("admission.k8s.io/v1"),
                "uid-1",
                "default",
                &pod,
            )
        };
        let a = webhook::handle_guarded(
            &Config::default(),
            "/inject",
            case["content_type"].as_str(),
            &body,
        );
        let want_status = case["want_status"].as_u64().expect("status") as u16;
        if a.status != want_status {
            failures.push(format!("{name}: status {} want {want_status}", a.status));
            continue;
        }
        if want_status == 200 {
            let resp: Value = serde_json::from_slice(&a.body).expect("review JSON");
            let allowed = resp["response"]["allowed"].as_bool();
            if allowed != case["want_allowed"].as_bool() {
                failures.push(format!("{name}: allowed {allowed:?}: {resp}"));
            }
            if let Some(v) = case.get("admission_review_api_version") {
                if resp["apiVersion"] != *v || resp["response"]["uid"] != "uid-1" {
                    failures.push(format!("{name}: apiVersion/uid not echoed: {resp}"));
                }
                let skipped = case.get("pod_annotations").is_some();
                if skipped == resp["response"].get("patch").is_some() {
                    failures.push(format!("{name}: patch presence wrong: {resp}"));
                }
            } else if resp["response"]["status"]["message"]
                .as_str()
                .is_none_or(str::is_empty)
            {
                failures.push(format!("{name}: no message: {resp}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn inject_url_path_parameters() {
    let doc: Value =
        serde_json::from_str(&read("inject/parse-inject-url-envs.json")).expect("JSON");
    let mut failures = Vec::new();
    for case in doc["cases"].as_array().expect("cases") {
        let got = webhook::parse_inject_envs(case["path"].as_str().expect("path"));
        let want = map(&case["want"]);
        if got != want {
            failures.push(format!("{}: got {got:?} want {want:?}", case["name"]));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn app_prober_tables() {
    let doc: Value = serde_json::from_str(&read("inject/app-probers.json")).expect("JSON");
    let mut failures = Vec::new();
    // Rewrite on/off precedence: the annotation wins when it parses, else the config.
    for c in doc["should_rewrite_app_http_probers"]["cases"]
        .as_array()
        .expect("cases")
    {
        let ann = map(&c["annotations"]);
        let got = ferry_injector::annotations::bool_annotation(
            &ann,
            "sidecar.istio.io/rewriteAppHTTPProbers",
        )
        .unwrap_or(c["spec_setting"].as_bool().expect("setting"));
        if Some(got) != c["want"].as_bool() {
            failures.push(format!("should_rewrite {c}: got {got}"));
        }
    }
    let rewrite_all = |spec: &Value| -> (Value, serde_json::Map<String, Value>) {
        let mut spec: k8s_openapi::api::core::v1::PodSpec =
            serde_json::from_value(spec.clone()).expect("spec");
        let mut out = serde_json::Map::new();
        for c in spec.containers.iter_mut() {
            probes::rewrite_container(c, 15020, &mut out);
        }
        (serde_json::to_value(&spec).expect("json"), out)
    };
    for c in doc["dump_app_probers_grpc"]["cases"]
        .as_array()
        .expect("cases")
    {
        let (_, probers) = rewrite_all(&c["pod_spec"]);
        let got: Value = serde_json::from_str(&probes::probers_json(&probers)).expect("json");
        if got != c["want"] {
            failures.push(format!("dump {}: got {got} want {}", c["name"], c["want"]));
        }
    }
    for c in doc["patch_rewrite_probe"]["cases"]
        .as_array()
        .expect("cases")
    {
        let (got, _) = rewrite_all(&c["pod_spec"]);
        let d = jsondiff::diff(&c["want"], &got);
        if !d.is_empty() {
            failures.push(format!("patch {}: {d:?}", c["name"]));
        }
    }
    for c in doc["merge_or_append_probers"]["cases"]
        .as_array()
        .expect("cases")
    {
        let new: serde_json::Map<String, Value> =
            serde_json::from_str(c["new_probers"].as_str().expect("new")).expect("json");
        let mut env: Vec<Value> = c["env_in"].as_array().cloned().unwrap_or_default();
        match env
            .iter_mut()
            .find(|e| e["name"] == probes::APP_PROBERS_ENV)
        {
            Some(e) if c["previously_injected"].as_bool() == Some(true) => {
                e["value"] = json!(probes::merge_probers(
                    e["value"].as_str().unwrap_or("{}"),
                    &new
                ));
            }
            _ => env.push(
                json!({"name": probes::APP_PROBERS_ENV, "value": probes::probers_json(&new)}),
            ),
        }
        if Value::Array(env.clone()) != c["env_want"] {
            failures.push(format!("merge {}: got {env:?}", c["name"]));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// For every golden case: the webhook's patch, applied to the pod the API server sent, gives the
/// same pod as direct injection; the result reads back into the typed `Pod` and round-trips
/// unchanged; and injecting it again changes nothing.
#[test]
fn patches_apply_round_trip_and_reinjection_is_idempotent() {
    let doc: Value = serde_json::from_str(&read("inject/cases.json")).expect("JSON");
    let mut failures = Vec::new();
    let mut injected = 0;
    for case in doc["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let input = yaml(&read(&format!(
            "inject/{}",
            case["input"].as_str().expect("input")
        )));
        let cfg = case_config(case);
        let (mut raw, _) = pod_of(&input);
        // What the API server sends: namespace filled in, plus a field this model may not know.
        raw["metadata"]["namespace"] = json!("default");
        raw["spec"]["futureSchedulingHint"] = json!({"x": 1});
        let a = webhook::handle(
            &cfg,
            "/inject",
            Some("application/json"),
            &review_body("admission.k8s.io/v1", "u", "default", &raw),
        );
        let resp: Value = serde_json::from_slice(&a.body).expect("json");
        let mut patched = raw.clone();
        if let Some(p) = resp["response"]["patch"].as_str() {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(p)
                .expect("base64");
            let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("patch");
            if let Err(e) = json_patch::patch(&mut patched, &patch) {
                failures.push(format!("{name}: patch does not apply: {e}"));
                continue;
            }
        }
        if patched["spec"]["futureSchedulingHint"] != json!({"x": 1}) {
            failures.push(format!("{name}: unknown field lost"));
        }
        patched["spec"]
            .as_object_mut()
            .expect("spec")
            .remove("futureSchedulingHint");
        let typed: Pod = match serde_json::from_value(patched.clone()) {
            Ok(p) => p,
            Err(e) => {
                failures.push(format!("{name}: patched object is not a Pod: {e}"));
                continue;
            }
        };
        let back = serde_json::to_value(&typed).expect("json");
        let mut patched_cmp = patched.clone();
        if let Some(o) = patched_cmp.as_object_mut() {
            o.insert("apiVersion".into(), json!("v1"));
            o.insert("kind".into(), json!("Pod"));
        }
        let d = jsondiff::diff(&patched_cmp, &back);
        if !d.is_empty() {
            failures.push(format!("{name}: typed round trip changed: {d:?}"));
        }
        let direct = match inject::process(
            &serde_json::from_value(raw.clone()).expect("pod"),
            &cfg,
            &Request::default(),
        ) {
            Ok(Outcome::Injected { pod, .. }) => serde_json::to_value(&*pod).expect("json"),
            Ok(Outcome::Skipped(_)) => {
                serde_json::to_value(serde_json::from_value::<Pod>(raw.clone()).expect("pod"))
                    .expect("json")
            }
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let d = jsondiff::diff(&direct, &back);
        if !d.is_empty() {
            failures.push(format!(
                "{name}: webhook result differs from direct injection: {d:?}"
            ));
        }
        if a.verdict == webhook::Verdict::Injected {
            injected += 1;
            let again = inject::inject(&typed, &cfg, &Request::default()).expect("re-inject");
            let d = jsondiff::diff(&back, &serde_json::to_value(&again).expect("json"));
            if !d.is_empty() {
                failures.push(format!("{name}: re-injection changed the pod: {d:?}"));
            }
        }
    }
    assert_eq!(
        injected, 17,
        "all but the two skip cases are injected through the webhook"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
