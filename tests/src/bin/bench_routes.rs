//! Benchmark (not a test): per-request route lookup (`RouteTable::find`) against compiled tables
//! of 1,000 rules, shaped the ways real meshes grow: many services with a few rules each, one
//! service with many rules, and wildcard hosts. Also reports compile time per table.
//!
//! `cargo run --release -p ferry-tests --bin ferry-bench-routes [-- ITERATIONS]`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use ferry_proxy::routing::{RequestView, RouteTable, fqdn};
use serde_json::{Value, json};

const DOMAIN: &str = "cluster.local";

fn vs(name: &str, hosts: Value, http: Vec<Value>) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"hosts": hosts, "http": http}})
}

/// The rule mix of a typical service: a header canary, a regex, a prefix with rewrite, a split.
fn typical_rules(svc: &str) -> Vec<Value> {
    vec![
        json!({"match": [{"headers": {"end-user": {"exact": "jason"}}}],
               "route": [{"destination": {"host": svc, "subset": "v2"}}]}),
        json!({"match": [{"uri": {"regex": "/items/[0-9]+/reviews"}, "method": {"exact": "POST"}}],
               "route": [{"destination": {"host": svc, "subset": "v1"}}]}),
        json!({"match": [{"uri": {"prefix": "/api/"}}], "rewrite": {"uri": "/"},
               "route": [{"destination": {"host": svc}}]}),
        json!({"route": [{"destination": {"host": svc, "subset": "v1"}, "weight": 90},
                         {"destination": {"host": svc, "subset": "v2"}, "weight": 10}]}),
    ]
}

struct Case {
    name: &'static str,
    table: RouteTable,
    rules: usize,
    compile_ms: f64,
    host: String,
    path: &'static str,
    header: Option<(&'static str, &'static str)>,
    /// What the lookup must return (checked once before timing): Some(origin suffix) or None.
    want: Option<&'static str>,
}

fn case(
    name: &'static str,
    docs: Vec<Value>,
    rules: usize,
    host: String,
    path: &'static str,
    header: Option<(&'static str, &'static str)>,
    want: Option<&'static str>,
) -> Case {
    let t = Instant::now();
    let table = RouteTable::compile(&docs, DOMAIN);
    let compile_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert!(
        table.diagnostics.is_empty(),
        "{name}: {} diagnostics, first: {:?}",
        table.diagnostics.len(),
        table.diagnostics.first()
    );
    Case {
        name,
        table,
        rules,
        compile_ms,
        host,
        path,
        header,
        want,
    }
}

fn main() {
    let iterations: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000_000);
    let many_services: Vec<Value> = (0..250)
        .flat_map(|i| {
            let svc = format!("svc-{i}");
            let dr = json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                "metadata": {"name": svc, "namespace": "default"},
                "spec": {"host": svc, "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                                  {"name": "v2", "labels": {"version": "v2"}}]}});
            [vs(&svc, json!([svc.clone()]), typical_rules(&svc)), dr]
        })
        .collect();
    // One service "big" with 1,000 rules, rule i matching what `m(i)` says.
    let big = |m: &dyn Fn(usize) -> Value| {
        vec![vs(
            "big",
            json!(["big"]),
            (0..1000)
                .map(|i| json!({"match": [m(i)], "route": [{"destination": {"host": "big"}}]}))
                .collect(),
        )]
    };
    let one_service = big(&|i| json!({"uri": {"exact": format!("/route/{i}")}}));
    let prefixes = big(&|i| json!({"uri": {"prefix": format!("/route/{i}/")}}));
    let headers = big(&|i| json!({"headers": {"x-tenant": {"exact": format!("t{i}")}}}));
    // Not indexable (regexes are evaluated in order): the worst case, reported as such.
    let regexes = big(&|i| json!({"uri": {"regex": format!("/r{i}/[a-z]+")}}));
    let wildcards: Vec<Value> = (0..1000)
        .map(|i| {
            vs(
                &format!("w{i}"),
                json!([format!("*.zone{i}.example.com")]),
                vec![json!({"route": [{"destination": {"host": format!("backend-{i}")}}]})],
            )
        })
        .collect();
    let svc = |s: &str| fqdn(s, "default", DOMAIN);
    let cases = vec![
        case(
            "250 services x 4 rules, header match (rule 1)",
            many_services.clone(),
            1000,
            svc("svc-249"),
            "/",
            Some(("end-user", "jason")),
            Some("default/svc-249"),
        ),
        case(
            "250 services x 4 rules, weighted catch-all (rule 4)",
            many_services,
            1000,
            svc("svc-249"),
            "/catalog",
            None,
            Some("default/svc-249"),
        ),
        case(
            "1 service x 1,000 exact-URI rules, first rule",
            one_service.clone(),
            1000,
            svc("big"),
            "/route/0",
            None,
            Some("default/big"),
        ),
        case(
            "1 service x 1,000 exact-URI rules, last rule",
            one_service.clone(),
            1000,
            svc("big"),
            "/route/999",
            None,
            Some("default/big"),
        ),
        case(
            "1 service x 1,000 exact-URI rules, no match (404)",
            one_service,
            1000,
            svc("big"),
            "/elsewhere",
            None,
            None,
        ),
        case(
            "1 service x 1,000 prefix rules, last rule",
            prefixes,
            1000,
            svc("big"),
            "/route/999/x",
            None,
            Some("default/big"),
        ),
        case(
            "1 service x 1,000 exact-header rules, last rule",
            headers,
            1000,
            svc("big"),
            "/",
            Some(("x-tenant", "t999")),
            Some("default/big"),
        ),
        case(
            "1 service x 1,000 regex rules, last rule (evaluated in order)",
            regexes,
            1000,
            svc("big"),
            "/r999/abc",
            None,
            Some("default/big"),
        ),
        case(
            "1,000 wildcard hosts, longest-suffix pick",
            wildcards,
            1000,
            "api.zone999.example.com".into(),
            "/",
            None,
            Some("default/w999"),
        ),
    ];
    let labels = BTreeMap::new();
    println!(
        "Route lookup (RouteTable::find), {iterations} lookups per case, release build, one core"
    );
    println!("| table | rules | compile ms | ns / lookup |");
    println!("|---|---|---|---|");
    for c in &cases {
        let header = c.header;
        let lookup = move |k: &str| header.filter(|(h, _)| *h == k).map(|(_, v)| v);
        let view = RequestView {
            method: "GET",
            scheme: "http",
            path: c.path,
            query: None,
            authority: "bench:80",
            port: 80,
            headers: &lookup,
            source_labels: &labels,
            source_namespace: "default",
        };
        // The lookup must give the right answer before its speed means anything.
        let got = c.table.find(&c.host, &view).map(|(r, _)| r.origin.clone());
        assert!(
            match (c.want, &got) {
                (Some(w), Some(g)) => g.starts_with(w),
                (None, None) => true,
                _ => false,
            },
            "{}: looked up {got:?}, wanted {:?}",
            c.name,
            c.want
        );
        let t = Instant::now();
        let mut hits = 0u32;
        for _ in 0..iterations {
            if black_box(&c.table)
                .find(black_box(&c.host), black_box(&view))
                .is_some()
            {
                hits += 1;
            }
        }
        let ns = t.elapsed().as_nanos() as f64 / f64::from(iterations);
        black_box(hits);
        println!(
            "| {} | {} | {:.1} | {:.0} |",
            c.name, c.rules, c.compile_ms, ns
        );
    }
}
