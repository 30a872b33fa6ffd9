//! Criterion micro-benchmarks of the hot pure code: the proxy's per-request route lookup, the
//! init container's rule generation, and the injector's admission (review in, patch out).
//! `cargo bench -p ferry-tests --bench hot_paths`; `cargo test -p ferry-tests --benches` runs
//! each once as a test (what CI does). Every case first checks it computes the right answer.

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;

use clap::Parser;
use criterion::{Criterion, criterion_group, criterion_main};
use ferry_proxy::routing::{RequestView, RouteTable};
use serde_json::{Value, json};

/// A route table of `services` x 4 typical rules plus one service with 1,000 exact-URI rules.
fn table() -> RouteTable {
    let mut docs = Vec::new();
    for i in 0..250 {
        let svc = format!("svc-{i}.default.svc.cluster.local");
        docs.push(json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": format!("vs-{i}"), "namespace": "default"},
            "spec": {"hosts": [svc], "http": [
                {"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [{"destination": {"host": svc, "subset": "v2"}}]},
                {"match": [{"uri": {"regex": "/items/[0-9]+/reviews"}, "method": {"exact": "POST"}}], "route": [{"destination": {"host": svc, "subset": "v1"}}]},
                {"match": [{"uri": {"prefix": "/api/"}}], "rewrite": {"uri": "/"}, "route": [{"destination": {"host": svc}}]},
                {"route": [{"destination": {"host": svc, "subset": "v1"}, "weight": 90}, {"destination": {"host": svc, "subset": "v2"}, "weight": 10}]}]}}));
        docs.push(json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": format!("dr-{i}"), "namespace": "default"},
            "spec": {"host": svc, "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}}));
    }
    let big = "big.default.svc.cluster.local";
    let rules: Vec<Value> = (0..1000)
        .map(|i| json!({"match": [{"uri": {"exact": format!("/r/{i}")}}], "route": [{"destination": {"host": big}}]}))
        .collect();
    docs.push(json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "big", "namespace": "default"}, "spec": {"hosts": [big], "http": rules}}));
    let t = RouteTable::compile(&docs, "cluster.local");
    assert!(t.diagnostics.is_empty(), "{:?}", t.diagnostics.first());
    t
}

fn no_headers(_: &str) -> Option<&'static str> {
    None
}

fn jason(k: &str) -> Option<&'static str> {
    (k == "end-user").then_some("jason")
}

fn view<'a>(
    path: &'a str,
    headers: &'a dyn Fn(&str) -> Option<&'a str>,
    labels: &'a BTreeMap<String, String>,
) -> RequestView<'a> {
    RequestView {
        method: "GET",
        scheme: "http",
        path,
        query: None,
        authority: "svc:80",
        port: 80,
        headers,
        source_labels: labels,
        source_namespace: "default",
    }
}

fn routes(c: &mut Criterion) {
    let t = table();
    // The request's source workload labels (none); static like the routes' borrowed inputs.
    static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();
    let labels = &NO_LABELS;
    let cases = [
        (
            "header canary (rule 1 of 4)",
            "svc-17.default.svc.cluster.local",
            view("/", &jason, labels),
            "vs-17 http[0]",
        ),
        (
            "weighted catch-all (rule 4 of 4)",
            "svc-17.default.svc.cluster.local",
            view("/", &no_headers, labels),
            "vs-17 http[3]",
        ),
        (
            "1,000 exact URIs, the last",
            "big.default.svc.cluster.local",
            view("/r/999", &no_headers, labels),
            "big http[999]",
        ),
    ];
    let mut g = c.benchmark_group("route lookup");
    for (name, host, v, want) in &cases {
        let (route, _) = t.find(host, v).expect("a rule matches");
        assert!(
            route.origin.ends_with(want),
            "{name}: matched {}",
            route.origin
        );
        g.bench_function(*name, |b| {
            b.iter(|| black_box(&t).find(black_box(host), black_box(v)).is_some())
        });
    }
    g.finish();
}

fn rules(c: &mut Criterion) {
    use ferry_init::config::{Args, Config};
    use ferry_init::generate::{Facts, plan};
    let args = Args::try_parse_from(ferry_init::spec::INJECTED_DEFAULT_ARGS)
        .expect("Istio's injected arguments");
    let cfg = Config::from_args(&args, &HashMap::<String, String>::new()).expect("config");
    let facts = Facts {
        ipv6: true,
        dns_servers_v4: vec!["10.96.0.10".into()],
        dns_servers_v6: Vec::new(),
    };
    let p = plan(&cfg, &facts);
    let text = format!("{p:?}");
    assert!(
        text.contains("ISTIO_OUTPUT") && text.contains("15006"),
        "{text}"
    );
    c.bench_function("iptables plan for the injected pod (v4 + v6)", |b| {
        b.iter(|| plan(black_box(&cfg), black_box(&facts)))
    });
}

fn injection(c: &mut Criterion) {
    use ferry_injector::config::Config;
    let cfg = Config::default();
    let review = serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "bench", "namespace": "shop", "operation": "CREATE", "dryRun": false, "object": {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "cart-7d4b9c8f6-", "labels": {"app": "cart", "pod-template-hash": "7d4b9c8f6"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "cart-7d4b9c8f6", "uid": "x", "controller": true}]},
            "spec": {"containers": [{"name": "cart", "image": "shop/cart:2.1", "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}}}]}}}
    }))
    .expect("json");
    let answer =
        ferry_injector::webhook::handle(&cfg, "/inject", Some("application/json"), &review);
    let body: Value = serde_json::from_slice(&answer.body).expect("an AdmissionReview");
    assert_eq!(answer.status, 200);
    assert_eq!(body["response"]["allowed"], true, "{body}");
    assert_eq!(body["response"]["patchType"], "JSONPatch", "{body}");
    c.bench_function(
        "admission review -> JSONPatch (Deployment pod with a probe)",
        |b| {
            b.iter(|| {
                ferry_injector::webhook::handle(
                    black_box(&cfg),
                    "/inject",
                    Some("application/json"),
                    black_box(&review),
                )
            })
        },
    );
}

criterion_group!(benches, routes, rules, injection);
criterion_main!(benches);
