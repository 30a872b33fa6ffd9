//! The Helm chart (`charts/ferry`) checked with the real helm 3.18 and `kubernetes-validate
//! --strict` (both fetched by `bash .ci/tools` into `target/tools`): lint, render with several
//! value sets, validate every object, refuse bad values, and evaluate the rendered webhook
//! selectors against Istio's selector table. Without the tools these print SKIPPED, except under
//! `CI=true`, where they fail.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ferry_tests::lab::model;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn chart() -> PathBuf {
    root().join("charts/ferry")
}

struct Tools {
    helm: PathBuf,
    validate: PathBuf,
}

fn tools(test: &str) -> Option<Tools> {
    let t = Tools {
        helm: root().join("target/tools/helm/helm"),
        validate: root().join("target/tools/venv/bin/kubernetes-validate"),
    };
    if t.helm.exists() && t.validate.exists() {
        return Some(t);
    }
    let why = "helm/kubernetes-validate not found in target/tools (run `bash .ci/tools`)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {why}; CI=true requires the chart tests to run");
    }
    eprintln!("SKIPPED {test}: {why}");
    None
}

fn helm(t: &Tools, args: &[&str]) -> Result<String, String> {
    let out = Command::new(&t.helm)
        .args(args)
        .output()
        .expect("running helm");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn with_sets<'a>(base: &[&'a str], sets: &'a [&'a str]) -> Vec<&'a str> {
    let mut v = base.to_vec();
    for s in sets {
        v.extend(["--set", s]);
    }
    v
}

fn render(t: &Tools, sets: &[&str]) -> Result<String, String> {
    let chart = chart();
    let chart = chart.to_str().expect("path");
    helm(
        t,
        &with_sets(
            &[
                "template",
                "rel",
                chart,
                "-n",
                "ferry-system",
                "--kube-version",
                "1.33.0",
            ],
            sets,
        ),
    )
}

fn docs(yaml: &str) -> Vec<Value> {
    ferry_tests::lab::cli::parse_yaml(yaml, "rendered").expect("rendered YAML parses")
}

fn find<'a>(objs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objs.iter().filter(|o| o["kind"] == kind).collect()
}

fn validate(t: &Tools, yaml: &str) -> Result<(), String> {
    let mut child = Command::new(&t.validate)
        .args(["--strict", "-k", "1.33.0", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubernetes-validate");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && !text.contains("ERROR") {
        Ok(())
    } else {
        Err(text)
    }
}

#[test]
fn crds_in_the_chart_are_the_ones_the_proxy_generates() {
    let shipped = std::fs::read_to_string(chart().join("files/crds.yaml")).expect("crds file");
    assert!(
        shipped == ferry_proxy::crds::yaml(),
        "charts/ferry/files/crds.yaml is stale; regenerate it: cargo run -p ferry-proxy -- crds > charts/ferry/files/crds.yaml"
    );
    // Every Istio resource used by the demo and the tests fits the schema (no unknown fields).
    let mut problems = Vec::new();
    for text in [
        ferry_tests::lab::demo::SPLIT.to_owned(),
        ferry_tests::lab::demo::BY_HEADER.to_owned(),
        ferry_tests::fixtures::subsets_v1_v2("reviews", "shop"),
    ] {
        for d in docs(&text) {
            if let Some(ty) = ferry_proxy::crds::spec_type(d["kind"].as_str().unwrap_or("")) {
                ferry_proxy::crds::check(&ty, &d["spec"], "spec", &mut problems);
            }
        }
    }
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn chart_lints_renders_and_validates_with_each_value_set() {
    let Some(t) = tools("chart_lints_renders_and_validates_with_each_value_set") else {
        return;
    };
    let chart = chart();
    let chart_s = chart.to_str().expect("path");
    let sets: &[(&str, &[&str])] = &[
        ("defaults", &[]),
        ("cert-manager", &["tls.mode=cert-manager"]),
        (
            "cert-manager with an issuer",
            &[
                "tls.mode=cert-manager",
                "tls.certManager.issuerRef.name=corp-ca",
                "tls.certManager.issuerRef.kind=ClusterIssuer",
            ],
        ),
        ("no CRDs", &["crds.install=false"]),
        (
            "custom images, no native sidecars",
            &[
                "injector.image.repository=registry.example.com/mesh/ferry-injector",
                "injector.image.tag=9.9.9",
                "injection.proxyImage=registry.example.com/mesh/ferry-proxy:9.9.9",
                "injection.nativeSidecars=false",
            ],
        ),
        ("revision canary", &["revision=canary"]),
        ("namespaces by default", &["enableNamespacesByDefault=true"]),
        ("one replica", &["injector.replicas=1"]),
        (
            "NodePort gateway",
            &[
                "gateway.service.type=NodePort",
                "gateway.autoscaling.enabled=false",
            ],
        ),
        ("no gateway", &["gateway.enabled=false"]),
    ];
    for (name, s) in sets {
        helm(&t, &with_sets(&["lint", "--strict", chart_s], s))
            .unwrap_or_else(|e| panic!("{name}: helm lint: {e}"));
        let out = render(&t, s).unwrap_or_else(|e| panic!("{name}: helm template: {e}"));
        validate(&t, &out).unwrap_or_else(|e| panic!("{name}: kubernetes-validate --strict: {e}"));
        let objs = docs(&out);
        // The injector's ConfigMap is a configuration the injector accepts.
        let cm = find(&objs, "ConfigMap");
        let cfg_text = cm[0]["data"]["config.yaml"].as_str().expect("config.yaml");
        let cfg = ferry_injector::config::Config::parse(cfg_text, "config.yaml")
            .unwrap_or_else(|e| panic!("{name}: the injector refuses the chart's config: {e}"));
        let deploy = find(&objs, "Deployment")
            .into_iter()
            .find(|d| {
                d["metadata"]["name"] == "ferry-injector"
                    || d["metadata"]["name"] == "ferry-injector-canary"
            })
            .expect("injector deployment");
        let pod = &deploy["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        let args: Vec<&str> = c["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let mwc = find(&objs, "MutatingWebhookConfiguration")[0];
        // Hardening holds in every value set.
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{name}"
        );
        assert_eq!(
            c["securityContext"]["readOnlyRootFilesystem"], true,
            "{name}"
        );
        assert_eq!(
            c["securityContext"]["allowPrivilegeEscalation"], false,
            "{name}"
        );
        for hook in mwc["webhooks"].as_array().expect("webhooks") {
            assert_eq!(hook["failurePolicy"], "Fail", "{name}");
            assert_eq!(hook["sideEffects"], "None", "{name}");
            assert_eq!(
                hook["admissionReviewVersions"],
                serde_json::json!(["v1"]),
                "{name}"
            );
            assert_eq!(
                hook["rules"][0]["operations"],
                serde_json::json!(["CREATE"]),
                "{name}"
            );
            let excluded = hook["namespaceSelector"]["matchExpressions"]
                .as_array()
                .expect("expressions")
                .iter()
                .any(|e| {
                    e["key"] == "kubernetes.io/metadata.name"
                        && e["operator"] == "NotIn"
                        && e["values"].as_array().is_some_and(|v| {
                            v.contains(&"kube-system".into()) && v.contains(&"ferry-system".into())
                        })
                });
            assert!(
                excluded,
                "{name}: {} must exclude kube-system and the release namespace",
                hook["name"]
            );
        }
        let crds = find(&objs, "CustomResourceDefinition").len();
        let has = |kind: &str| !find(&objs, kind).is_empty();
        match *name {
            "defaults" => {
                assert_eq!(crds, 3, "VirtualService, DestinationRule, Gateway");
                assert!(args.contains(&"--self-signed-tls"), "{args:?}");
                assert_eq!(deploy["spec"]["replicas"], 2);
                assert!(has("PodDisruptionBudget") && has("Role") && has("ClusterRoleBinding"));
                assert_eq!(c["image"], "ghcr.io/ferry-mesh/ferry-injector:0.1.0");
                assert!(cfg.native_sidecars);
                let svc = find(&objs, "Service")
                    .into_iter()
                    .find(|s| s["metadata"]["name"] == "ferry-injector")
                    .expect("injector service");
                assert_eq!(svc["spec"]["ports"][0]["port"], 443);
                // The ingress gateway: ferry-proxy as `proxy router`, LoadBalancer 15021/80/443,
                // autoscaled, disruption-budgeted, reading Secrets in its namespace only.
                let gw = find(&objs, "Deployment")
                    .into_iter()
                    .find(|d| d["metadata"]["name"] == "istio-ingressgateway")
                    .expect("gateway deployment");
                let gpod = &gw["spec"]["template"]["spec"];
                assert_eq!(
                    gw["spec"]["template"]["metadata"]["labels"]["istio"],
                    "ingressgateway"
                );
                assert_eq!(gpod["containers"][0]["args"][1], "router");
                assert_eq!(gpod["securityContext"]["runAsUser"], 1337);
                let gsvc = find(&objs, "Service")
                    .into_iter()
                    .find(|s| s["metadata"]["name"] == "istio-ingressgateway")
                    .expect("gateway service");
                assert_eq!(gsvc["spec"]["type"], "LoadBalancer");
                let ports: Vec<u64> = gsvc["spec"]["ports"]
                    .as_array()
                    .expect("ports")
                    .iter()
                    .filter_map(|p| p["port"].as_u64())
                    .collect();
                assert_eq!(ports, [15021, 80, 443]);
                assert!(has("HorizontalPodAutoscaler"));
                assert!(
                    find(&objs, "Role")
                        .iter()
                        .any(|r| r["metadata"]["name"] == "istio-ingressgateway-secrets"
                            && r["rules"][0]["resources"] == serde_json::json!(["secrets"]))
                );
                assert!(
                    find(&objs, "Pod")
                        .iter()
                        .any(|p| p["metadata"]["annotations"]["helm.sh/hook"] == "test")
                );
            }
            "cert-manager" | "cert-manager with an issuer" => {
                assert!(has("Certificate"), "{name}");
                assert!(!args.contains(&"--self-signed-tls"), "{args:?}");
                assert!(
                    mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].is_string()
                );
                assert!(
                    !find(&objs, "Role")
                        .iter()
                        .any(|r| r["metadata"]["name"] == "ferry-injector"),
                    "the injector needs no Secret access with cert-manager"
                );
                let own_issuer = has("Issuer");
                assert_eq!(own_issuer, *name == "cert-manager", "{name}");
            }
            "no CRDs" => assert_eq!(crds, 0),
            "custom images, no native sidecars" => {
                assert_eq!(c["image"], "registry.example.com/mesh/ferry-injector:9.9.9");
                assert!(!cfg.native_sidecars);
                assert_eq!(
                    cfg.proxy_image,
                    "registry.example.com/mesh/ferry-proxy:9.9.9"
                );
            }
            "revision canary" => {
                assert_eq!(cfg.revision, "canary");
                assert_eq!(mwc["webhooks"].as_array().map(Vec::len), Some(2));
                assert_eq!(mwc["metadata"]["name"], "ferry-sidecar-injector-canary");
            }
            "namespaces by default" => {
                assert_eq!(mwc["webhooks"].as_array().map(Vec::len), Some(5))
            }
            "one replica" => assert!(
                !find(&objs, "PodDisruptionBudget")
                    .iter()
                    .any(|p| p["metadata"]["name"] == "ferry-injector")
            ),
            "NodePort gateway" => {
                let gsvc = find(&objs, "Service")
                    .into_iter()
                    .find(|s| s["metadata"]["name"] == "istio-ingressgateway")
                    .expect("gw svc");
                assert_eq!(gsvc["spec"]["type"], "NodePort");
                assert!(!has("HorizontalPodAutoscaler"));
            }
            "no gateway" => assert!(
                !find(&objs, "Deployment")
                    .iter()
                    .any(|d| d["metadata"]["name"] == "istio-ingressgateway")
            ),
            _ => {}
        }
    }
}

#[test]
fn bad_values_are_refused_by_the_schema_naming_the_field() {
    let Some(t) = tools("bad_values_are_refused_by_the_schema_naming_the_field") else {
        return;
    };
    for (set, field) in [
        ("injector.replicas=0", "replicas"),
        ("tls.mode=vault", "mode"),
        ("injection.polcy=enabled", "polcy"),
        ("webhook.failurePolicy=Sometimes", "failurePolicy"),
        ("injector.port=abc", "port"),
        ("revision=Not_A_Name", "revision"),
        ("gateway.service.type=Ingress", "type"),
        ("injection.proxy.statusPort=70000", "statusPort"),
    ] {
        let err = render(&t, &[set]).expect_err(set);
        assert!(
            err.contains("values don't meet the specifications of the schema")
                && err.contains(field),
            "{set}: {err}"
        );
    }
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn rendered_webhook_selectors_follow_istios_table() {
    let Some(t) = tools("rendered_webhook_selectors_follow_istios_table") else {
        return;
    };
    let mwc_of = |sets: &[&str]| -> Value {
        let objs = docs(&render(&t, sets).expect("render"));
        find(&objs, "MutatingWebhookConfiguration")[0].clone()
    };
    let default = mwc_of(&[]);
    let auto = mwc_of(&["enableNamespacesByDefault=true"]);
    let canary = mwc_of(&["revision=canary"]);
    let table: Value =
        serde_json::from_str(&ferry_tests::read("inject/webhook-selectors.json")).expect("table");
    let names = |hooks: Vec<Value>| -> Vec<String> {
        hooks
            .iter()
            .map(|h| h["name"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    let mut failures = Vec::new();
    let rows = table["rows"].as_array().expect("rows");
    for (i, row) in rows.iter().enumerate() {
        let ns = labels(&row["namespace_labels"]);
        let pod = labels(&row["pod_labels"]);
        let by_default = row["enable_namespaces_by_default"]
            .as_bool()
            .unwrap_or(false);
        let got_default = names(
            model::webhooks_for_pod(
                std::slice::from_ref(if by_default { &auto } else { &default }),
                &ns,
                &pod,
            )
            .expect("selectors"),
        );
        let got_canary = names(
            model::webhooks_for_pod(std::slice::from_ref(&canary), &ns, &pod).expect("selectors"),
        );
        let want =
            |k: &str| -> Vec<String> { serde_json::from_value(row[k].clone()).expect("list") };
        let (want_default, want_canary) = if row["namespace"] == "kube-system" {
            // The chart never calls the webhook for kube-system (Istio calls it and istiod then
            // refuses); either way the pod is not injected.
            assert_eq!(row["injected"], false, "row {i}");
            (vec![], vec![])
        } else {
            (
                want("matched_webhooks_default_revision"),
                want("matched_webhooks_canary_revision"),
            )
        };
        if got_default != want_default || got_canary != want_canary {
            failures.push(format!("row {i} ns={ns:?} pod={pod:?}: got {got_default:?}/{got_canary:?}, want {want_default:?}/{want_canary:?}"));
        }
    }
    assert_eq!(rows.len(), 144);
    assert!(
        failures.is_empty(),
        "{} rows differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_values_schema_knows_every_injector_setting() {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(chart().join("values.schema.json")).expect("schema"),
    )
    .expect("schema JSON");
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        k.sort();
        k
    };
    let injection = &schema["properties"]["injection"]["properties"];
    let config = serde_json::to_value(ferry_injector::config::Config::default()).expect("config");
    assert_eq!(
        keys(injection),
        keys(&config),
        "values.schema.json injection.* vs injector Config"
    );
    assert_eq!(
        keys(&injection["proxy"]["properties"]),
        keys(&config["proxy"]),
        "values.schema.json injection.proxy.* vs injector Config"
    );
}
