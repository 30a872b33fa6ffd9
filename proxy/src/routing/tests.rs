use std::collections::BTreeMap;

use super::*;

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("doc"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

struct Req<'a> {
    method: &'a str,
    path: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    port: u16,
}

fn req(path: &str) -> Req<'_> {
    Req {
        method: "GET",
        path,
        headers: vec![],
        port: 9080,
    }
}

/// The origin of the route a request matches, and its destinations.
fn route_for(t: &RouteTable, host: &str, r: &Req<'_>) -> Option<(String, Action)> {
    let labels = BTreeMap::new();
    let (path, query) = r
        .path
        .split_once('?')
        .map(|(p, q)| (p, Some(q)))
        .unwrap_or((r.path, None));
    let lookup = |k: &str| {
        r.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| *v)
    };
    let view = RequestView {
        method: r.method,
        scheme: "http",
        path,
        query,
        authority: "reviews:9080",
        port: r.port,
        headers: &lookup,
        source_labels: &labels,
        source_namespace: "default",
    };
    t.find(host, &view)
        .map(|(route, _)| (route.origin.clone(), route.action.clone()))
}

const BOOKINFO: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: api
    match: [{uri: {regex: "/api/v[0-9]+"}}, {uri: {prefix: /V3/}, ignoreUriCase: true}]
    route: [{destination: {host: reviews, subset: v3}}]
  - name: split
    route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews.default.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: X-User}}}}
  - {name: v3, labels: {version: v3}}
"#;

const HOST: &str = "reviews.default.svc.cluster.local";

#[test]
fn first_match_wins_in_order() {
    let t = RouteTable::compile(&docs(BOOKINFO), "cluster.local");
    assert!(t.diagnostics.is_empty(), "{:?}", t.diagnostics);
    let cases: &[(Req<'_>, &str)] = &[
        (
            Req {
                headers: vec![("end-user", "jason")],
                ..req("/productpage")
            },
            "default/reviews jason",
        ),
        // Header names are case-insensitive, values are not.
        (
            Req {
                headers: vec![("End-User", "jason")],
                ..req("/")
            },
            "default/reviews jason",
        ),
        (
            Req {
                headers: vec![("end-user", "Jason")],
                ..req("/")
            },
            "default/reviews split",
        ),
        // The first rule wins even when a later one matches too.
        (
            Req {
                headers: vec![("end-user", "jason")],
                ..req("/api/v1")
            },
            "default/reviews jason",
        ),
        (req("/api/v12"), "default/reviews api"),
        // Regex is a full match: a longer path does not match "/api/v[0-9]+".
        (req("/api/v1/ratings"), "default/reviews split"),
        (req("/v3/x"), "default/reviews api"),
        (req("/anything"), "default/reviews split"),
    ];
    for (r, want) in cases {
        let got = route_for(&t, HOST, r).map(|(o, _)| o);
        assert_eq!(got.as_deref(), Some(*want), "{} {:?}", r.path, r.headers);
    }
    assert!(
        route_for(&t, "ratings.default.svc.cluster.local", &req("/")).is_none(),
        "no VirtualService for that host"
    );
}

#[test]
fn weights_split_by_the_roll_and_subsets_compile() {
    let t = RouteTable::compile(&docs(BOOKINFO), "cluster.local");
    let Some((_, Action::Route(ds))) = route_for(&t, HOST, &req("/")) else {
        panic!("route")
    };
    let subsets: Vec<_> = (0..100)
        .map(|roll| {
            pick_weighted(&ds, roll)
                .and_then(|d| d.subset.clone())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(subsets.iter().filter(|s| *s == "v1").count(), 90);
    assert_eq!(subsets.iter().filter(|s| *s == "v2").count(), 10);
    let rule = t.rule(HOST).expect("destination rule");
    assert_eq!(
        rule.resolve(None, 9080).map(|r| r.1),
        Some(LoadBalancer::Random)
    );
    assert_eq!(
        rule.resolve(Some("v2"), 9080).map(|r| r.1),
        Some(LoadBalancer::HashHeader("x-user".into())),
        "subset policy overrides the rule's"
    );
    assert_eq!(
        rule.resolve(Some("v1"), 9080).map(|r| r.1),
        Some(LoadBalancer::Random),
        "a subset without a policy inherits the rule's"
    );
    assert!(rule.resolve(Some("v9"), 9080).is_none(), "undefined subset");
    assert_eq!(
        rule.subsets["v1"].0.get("version").map(String::as_str),
        Some("v1")
    );
}

#[test]
fn matchers_method_authority_query_without_headers_port_source() {
    let yaml = r#"
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: m, namespace: shop}
spec:
  hosts: [reviews.shop]
  http:
  - name: post-only
    match: [{method: {exact: POST}, uri: {exact: /orders}}]
    route: [{destination: {host: orders}}]
  - name: debug-query
    match: [{queryParams: {debug: {exact: "1"}}}]
    route: [{destination: {host: debug}}]
  - name: not-internal
    match: [{withoutHeaders: {x-internal: {}}, port: 8080}]
    route: [{destination: {host: public}}]
  - name: from-ns
    match: [{sourceNamespace: default}]
    route: [{destination: {host: fallback}}]
"#;
    let t = RouteTable::compile(&docs(yaml), "cluster.local");
    assert!(t.diagnostics.is_empty(), "{:?}", t.diagnostics);
    let host = "reviews.shop.svc.cluster.local";
    let o = |r: Req<'_>| route_for(&t, host, &r);
    let (origin, Action::Route(ds)) = o(Req {
        method: "POST",
        ..req("/orders")
    })
    .expect("post") else {
        panic!()
    };
    assert_eq!(origin, "shop/m post-only");
    assert_eq!(
        ds[0].host, "orders.shop.svc.cluster.local",
        "short destination hosts resolve in the VirtualService's namespace"
    );
    assert_eq!(
        o(req("/orders?debug=1")).map(|x| x.0).as_deref(),
        Some("shop/m debug-query")
    );
    assert_eq!(
        o(Req {
            port: 8080,
            ..req("/")
        })
        .map(|x| x.0)
        .as_deref(),
        Some("shop/m not-internal")
    );
    assert_eq!(
        o(Req {
            port: 8080,
            headers: vec![("x-internal", "yes")],
            ..req("/")
        })
        .map(|x| x.0)
        .as_deref(),
        Some("shop/m from-ns")
    );
}

#[test]
fn invalid_resources_are_rejected_one_by_one() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bad-regex, namespace: default}
spec: {hosts: [a], http: [{match: [{uri: {regex: "(unclosed"}}], route: [{destination: {host: a}}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bad-weights, namespace: default}
spec: {hosts: [b], http: [{route: [{destination: {host: b, subset: v1}, weight: 50}, {destination: {host: b, subset: v2}, weight: 20}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: good, namespace: default}
spec: {hosts: [c], http: [{route: [{destination: {host: c, subset: missing}}], timeout: 3s, mirror: {host: c}, directResponse: {status: 418}}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: good, namespace: default}
spec: {hosts: [d], http: [{route: [{destination: {host: d}}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: gw-only, namespace: default}
spec: {hosts: [e], gateways: [ingress], http: [{route: [{destination: {host: e}}]}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dup, namespace: default}
spec: {host: c, subsets: [{name: v1, labels: {version: v1}}, {name: v1, labels: {version: v2}}]}
"#;
    let t = RouteTable::compile(&docs(yaml), "cluster.local");
    let d = t.diagnostics.join("\n");
    for want in [
        "VirtualService default/bad-regex rejected: default/bad-regex http[0].match[0].uri.regex \"(unclosed\"",
        "VirtualService default/bad-weights rejected: default/bad-weights http[0].route: weights add up to 70, not 100",
        "directResponse accepted but not implemented yet",
        "subset \"missing\" of c.default.svc.cluster.local is not defined by any DestinationRule",
        "VirtualService default/good: duplicate name, ignored",
        "DestinationRule default/dup rejected: subsets[1].name \"v1\" is duplicated",
    ] {
        assert!(d.contains(want), "missing diagnostic {want:?} in:\n{d}");
    }
    // The valid one still routes; gateway-only routes do not apply to sidecars.
    assert!(route_for(&t, "c.default.svc.cluster.local", &req("/")).is_some());
    assert!(route_for(&t, "a.default.svc.cluster.local", &req("/")).is_none());
    assert!(route_for(&t, "e.default.svc.cluster.local", &req("/")).is_none());
}

#[test]
fn hosts_resolve_like_istio() {
    assert_eq!(
        fqdn("reviews", "shop", "cluster.local"),
        "reviews.shop.svc.cluster.local"
    );
    assert_eq!(
        fqdn("reviews.bookinfo", "shop", "cluster.local"),
        "reviews.bookinfo.svc.cluster.local"
    );
    assert_eq!(
        fqdn("reviews.bookinfo.svc", "shop", "cluster.local"),
        "reviews.bookinfo.svc.cluster.local"
    );
    assert_eq!(
        fqdn(
            "reviews.bookinfo.svc.cluster.local",
            "shop",
            "cluster.local"
        ),
        "reviews.bookinfo.svc.cluster.local"
    );
    assert_eq!(
        fqdn("api.example.com", "shop", "cluster.local"),
        "api.example.com"
    );
    let yaml = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: w, namespace: default}\nspec: {hosts: [\"*.example.com\"], http: [{route: [{destination: {host: api.example.com}}]}]}\n";
    let t = RouteTable::compile(&docs(yaml), "cluster.local");
    assert!(
        route_for(&t, "api.example.com", &req("/")).is_some(),
        "wildcard host"
    );
    assert!(route_for(&t, "example.org", &req("/")).is_none());
}

#[test]
fn redirect_and_rewrite_and_headers_compile() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: default}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, redirectCode: 302}
  - match: [{uri: {prefix: /v1/}}]
    rewrite: {uri: /api/, authority: api.internal}
    headers: {request: {set: {x-routed: "yes"}, remove: [cookie]}, response: {add: {x-served-by: web}}}
    route: [{destination: {host: web}}]
"#;
    let t = RouteTable::compile(&docs(yaml), "cluster.local");
    assert!(t.diagnostics.is_empty(), "{:?}", t.diagnostics);
    let host = "web.default.svc.cluster.local";
    let Some((_, Action::Redirect { uri, code, .. })) = route_for(&t, host, &req("/old/page"))
    else {
        panic!("redirect")
    };
    assert_eq!((uri.as_deref(), code), (Some("/new"), 302));
    let labels = BTreeMap::new();
    let lookup = |_: &str| None;
    let view = RequestView {
        method: "GET",
        scheme: "http",
        path: "/v1/items",
        query: None,
        authority: "web",
        port: 80,
        headers: &lookup,
        source_labels: &labels,
        source_namespace: "default",
    };
    let (r, _) = t.find(host, &view).expect("route");
    assert_eq!(
        (r.rewrite_uri.as_deref(), r.rewrite_authority.as_deref()),
        (Some("/api/"), Some("api.internal"))
    );
    let text =
        |ops: &[(hyper::http::HeaderName, hyper::http::HeaderValue)]| -> Vec<(String, String)> {
            ops.iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_owned()))
                .collect()
        };
    assert_eq!(
        text(&r.request_headers.set),
        [("x-routed".to_owned(), "yes".to_owned())]
    );
    assert_eq!(r.request_headers.remove, ["cookie"]);
    assert_eq!(
        text(&r.response_headers.add),
        [("x-served-by".to_owned(), "web".to_owned())]
    );
}

#[test]
fn header_edits_that_are_not_valid_http_are_left_out() {
    let ops = header_ops(Some(&serde_json::json!({
        "set": {"X-Ok": "1", "bad name": "2", "x-bad-value": "line\nbreak"},
        "add": {"x-added": "3"},
        "remove": ["Cookie", "no good"],
    })));
    let names = |v: &[(hyper::http::HeaderName, hyper::http::HeaderValue)]| -> Vec<String> {
        v.iter().map(|(k, _)| k.to_string()).collect()
    };
    assert_eq!(names(&ops.set), ["x-ok"]);
    assert_eq!(names(&ops.add), ["x-added"]);
    assert_eq!(ops.remove, ["cookie"]);
}

#[test]
fn tcp_and_tls_routes_and_export_to() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: data}
spec:
  hosts: [db]
  tcp:
  - match: [{port: 5432, destinationSubnets: [10.96.0.0/16]}]
    route: [{destination: {host: db-primary, port: {number: 5432}}}]
  - route:
    - {destination: {host: db-replica}, weight: 80}
    - {destination: {host: db-primary}, weight: 20}
  tls:
  - match: [{sniHosts: [db.example.com]}]
    route: [{destination: {host: db-tls}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: private, namespace: data}
spec:
  hosts: [secret]
  exportTo: ["."]
  http: [{route: [{destination: {host: secret}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bad-tls, namespace: data}
spec: {hosts: [x], tls: [{route: [{destination: {host: x}}]}]}
"#;
    let t = RouteTable::compile_for(&docs(yaml), "cluster.local", Some("data"));
    // The compiler rejects it, and the schema check names the missing field too.
    assert_eq!(
        t.diagnostics,
        [
            "VirtualService data/bad-tls rejected: data/bad-tls tls[0].match: sniHosts is required for tls routes",
            "VirtualService data/bad-tls: spec.tls[0].match: required"
        ]
    );
    let labels = BTreeMap::new();
    let view = |port: u16, ip: &str, sni: Option<&'static str>| ConnView {
        port,
        destination: ip.parse().expect("ip"),
        sni,
        source_labels: &labels,
        source_namespace: "data",
    };
    let host = "db.data.svc.cluster.local";
    let r = t
        .find_l4(host, &view(5432, "10.96.3.3", None))
        .expect("tcp route");
    assert_eq!(r.destinations[0].host, "db-primary.data.svc.cluster.local");
    assert_eq!(r.destinations[0].port, Some(5432));
    let r = t
        .find_l4(host, &view(5432, "192.168.1.1", None))
        .expect("second rule");
    assert_eq!(
        r.destinations.iter().map(|d| d.weight).collect::<Vec<_>>(),
        [80, 20]
    );
    let r = t
        .find_l4(host, &view(443, "10.96.3.3", Some("db.example.com")))
        .expect("tls route by SNI");
    assert_eq!(r.destinations[0].host, "db-tls.data.svc.cluster.local");
    // exportTo ".": visible in its own namespace only.
    assert!(!t.routes("secret.data.svc.cluster.local").is_empty());
    let other = RouteTable::compile_for(&docs(yaml), "cluster.local", Some("web"));
    assert!(
        other.routes("secret.data.svc.cluster.local").is_empty(),
        "not exported to web"
    );
}

/// The exact-URI index must not change which rule wins: rules indexed by path and rules scanned
/// in order interleave, and first match still wins.
#[test]
fn indexed_exact_uris_keep_first_match_wins() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: mix, namespace: default}
spec:
  hosts: [mix]
  http:
  - name: exact-a
    match: [{uri: {exact: /a}}, {uri: {exact: /b}}]
    route: [{destination: {host: one}}]
  - name: prefix-all
    match: [{uri: {prefix: /p}}]
    route: [{destination: {host: two}}]
  - name: exact-p-shadowed
    match: [{uri: {exact: /p/x}}]
    route: [{destination: {host: three}}]
  - name: exact-with-header
    match: [{uri: {exact: /h}, headers: {x: {exact: "1"}}}]
    route: [{destination: {host: four}}]
  - name: any-case
    match: [{uri: {exact: /CASE}, ignoreUriCase: true}]
    route: [{destination: {host: five}}]
  - name: exact-after-catch-all-candidate
    match: [{uri: {exact: /h}}]
    route: [{destination: {host: six}}]
  - name: prefix-long-or-method
    match: [{uri: {prefix: /long/path/}}, {uri: {prefix: /m}, method: {exact: POST}}]
    route: [{destination: {host: seven}}]
  - name: prefix-any-case
    match: [{uri: {prefix: /UP}, ignoreUriCase: true}]
    route: [{destination: {host: eight}}]
"#;
    let t = RouteTable::compile(&docs(yaml), "cluster.local");
    assert!(t.diagnostics.is_empty(), "{:?}", t.diagnostics);
    let host = "mix.default.svc.cluster.local";
    let who = |r: &Req<'_>| route_for(&t, host, r).map(|(o, _)| o);
    let with = |path, h: &'static str| Req {
        headers: vec![("x", h)],
        ..req(path)
    };
    let cases: &[(Req<'_>, Option<&str>)] = &[
        (req("/a"), Some("default/mix exact-a")),
        (req("/b"), Some("default/mix exact-a")),
        (req("/p/x"), Some("default/mix prefix-all")),
        (with("/h", "1"), Some("default/mix exact-with-header")),
        (
            with("/h", "2"),
            Some("default/mix exact-after-catch-all-candidate"),
        ),
        (req("/case"), Some("default/mix any-case")),
        (req("/a/"), None),
        (
            req("/long/path/x"),
            Some("default/mix prefix-long-or-method"),
        ),
        (req("/long"), None),
        (req("/mx"), None),
        (
            Req {
                method: "POST",
                ..req("/mx")
            },
            Some("default/mix prefix-long-or-method"),
        ),
        (req("/upper"), Some("default/mix prefix-any-case")),
        (req("/é/long/path/"), None),
        (req("/c"), None),
    ];
    for (r, want) in cases {
        let path = r.path;
        assert_eq!(
            who(r).as_deref(),
            *want,
            "{path} with headers {:?}",
            r.headers
        );
    }
}

#[test]
fn wildcard_hosts_pick_the_longest_suffix_then_star() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: wide, namespace: default}
spec: {hosts: ["*.example.com"], http: [{route: [{destination: {host: wide}}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: narrow, namespace: default}
spec: {hosts: ["*.api.example.com"], http: [{route: [{destination: {host: narrow}}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: all, namespace: default}
spec: {hosts: ["*"], http: [{route: [{destination: {host: all}}]}]}
"#;
    let t = RouteTable::compile(&docs(yaml), "cluster.local");
    let who = |host: &str| {
        route_for(&t, host, &req("/"))
            .map(|(o, _)| o.split(' ').next().unwrap_or_default().to_owned())
    };
    assert_eq!(who("v1.api.example.com").as_deref(), Some("default/narrow"));
    assert_eq!(
        who("a.b.api.example.com").as_deref(),
        Some("default/narrow")
    );
    assert_eq!(who("www.example.com").as_deref(), Some("default/wide"));
    // `*.example.com` does not cover the bare domain; `*` does.
    assert_eq!(who("example.com").as_deref(), Some("default/all"));
    assert_eq!(who("reviews").as_deref(), Some("default/all"));
}

/// Every value of every Bookinfo resource replaced, one at a time, by values of the wrong shape:
/// compiling never panics, and an untouched VirtualService next to the broken one keeps routing.
#[test]
fn any_yaml_shape_compiles_without_panic_and_isolates_the_damage() {
    const RATINGS: &str = "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {name: ratings, namespace: default}\nspec: {hosts: [ratings], http: [{route: [{destination: {host: ratings}}]}]}\n";
    let base = docs(BOOKINFO);
    let ratings = docs(RATINGS);
    let odd = [
        Value::Null,
        serde_json::json!(0),
        serde_json::json!(-1),
        serde_json::json!(1e300),
        serde_json::json!("((("),
        serde_json::json!(""),
        serde_json::json!([]),
        serde_json::json!({}),
        serde_json::json!(true),
        serde_json::json!([{"exact": 5}]),
    ];
    fn paths(v: &Value, at: String, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => m.iter().for_each(|(k, v)| {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                paths(v, p.clone(), out);
                out.push(p);
            }),
            Value::Array(a) => a.iter().enumerate().for_each(|(i, v)| {
                let p = format!("{at}/{i}");
                paths(v, p.clone(), out);
                out.push(p);
            }),
            _ => {}
        }
    }
    let mut mutations = 0;
    for (d, doc) in base.iter().enumerate() {
        let mut at = Vec::new();
        paths(doc, String::new(), &mut at);
        for p in &at {
            for bad in &odd {
                let mut docs = base.clone();
                *docs[d].pointer_mut(p).expect("path") = bad.clone();
                docs.extend(ratings.iter().cloned());
                let t = RouteTable::compile(&docs, "cluster.local");
                mutations += 1;
                assert_eq!(
                    route_for(&t, "ratings.default.svc.cluster.local", &req("/")).map(|(o, _)| o),
                    Some("default/ratings http[0]".to_owned()),
                    "ratings stopped routing when doc {d} {p} became {bad}"
                );
            }
        }
    }
    assert!(mutations > 500, "only {mutations} mutations tried");
}

/// Istio's precedence for load balancing (pilot's MergeSubsetTrafficPolicy): rule and subset
/// policies are each resolved for the port, then the subset's balancer wins when it has one.
#[test]
fn traffic_policy_precedence_rule_port_subset() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: default}
spec:
  host: api
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    portLevelSettings:
    - port: {number: 8080}
      loadBalancer: {simple: LEAST_REQUEST}
    - port: {number: 9090}
      connectionPool: {tcp: {maxConnections: 10}}
  subsets:
  - name: plain
    labels: {version: v1}
  - name: own-lb
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  - name: own-ports
    labels: {version: v3}
    trafficPolicy:
      portLevelSettings:
      - port: {number: 9090}
        loadBalancer: {consistentHash: {useSourceIp: true}}
"#;
    let t = RouteTable::compile(&docs(yaml), "cluster.local");
    assert!(t.diagnostics.is_empty(), "{:?}", t.diagnostics);
    let rule = t.rule("api.default.svc.cluster.local").expect("rule");
    let lb = |subset: Option<&str>, port: u16| rule.resolve(subset, port).map(|r| r.1);
    use LoadBalancer::*;
    let cases: &[(Option<&str>, u16, LoadBalancer, &str)] = &[
        (None, 80, Random, "rule-wide policy"),
        (None, 8080, LeastRequest, "port level beats rule-wide"),
        (
            None,
            9090,
            RoundRobin,
            "a port entry without loadBalancer means the default, not inherit",
        ),
        (
            Some("plain"),
            8080,
            LeastRequest,
            "subset without policy inherits port level",
        ),
        (
            Some("own-lb"),
            80,
            RoundRobin,
            "subset balancer replaces the rule's",
        ),
        (
            Some("own-lb"),
            8080,
            RoundRobin,
            "it also beats the rule's port level",
        ),
        (Some("own-ports"), 9090, HashSourceIp, "subset port level"),
        (
            Some("own-ports"),
            8080,
            LeastRequest,
            "other ports keep the rule's port level",
        ),
    ];
    for (subset, port, want, why) in cases {
        assert_eq!(
            lb(*subset, *port),
            Some(want.clone()),
            "{subset:?}:{port}: {why}"
        );
    }
    let bad = yaml.replace("port: {number: 8080}", "port: {name: http}");
    let t = RouteTable::compile(&docs(&bad), "cluster.local");
    assert!(
        t.diagnostics
            .iter()
            .any(|d| d.contains("DestinationRule default/api")
                && d.contains("portLevelSettings[0].port.number")),
        "{:?}",
        t.diagnostics
    );
}

/// Rules keyed by an exact header value are found through an index; first match still wins
/// across them and the rules evaluated in order.
#[test]
fn indexed_header_values_keep_first_match_wins() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: t, namespace: default}
spec:
  hosts: [t]
  http:
  - name: tenant-a
    match: [{headers: {x-tenant: {exact: a}}}]
    route: [{destination: {host: one}}]
  - name: regex-path
    match: [{uri: {regex: "/r.*"}}]
    route: [{destination: {host: two}}]
  - name: tenant-b-or-c
    match: [{headers: {x-tenant: {exact: b}}}, {headers: {x-tenant: {exact: c}}}]
    route: [{destination: {host: three}}]
  - name: tenant-a-post-shadowed
    match: [{headers: {x-tenant: {exact: a}}, method: {exact: POST}}]
    route: [{destination: {host: four}}]
  - name: tenant-z-prefix
    match: [{headers: {x-tenant: {prefix: z}}}]
    route: [{destination: {host: five}}]
  - name: catch-all
    route: [{destination: {host: six}}]
"#;
    let t = RouteTable::compile(&docs(yaml), "cluster.local");
    assert!(t.diagnostics.is_empty(), "{:?}", t.diagnostics);
    let host = "t.default.svc.cluster.local";
    let cases: &[(&str, &str, Option<&str>, &str)] = &[
        ("GET", "/", Some("a"), "tenant-a"),
        ("POST", "/", Some("a"), "tenant-a"),
        ("GET", "/rx", Some("b"), "regex-path"),
        ("GET", "/", Some("c"), "tenant-b-or-c"),
        ("GET", "/", Some("zz"), "tenant-z-prefix"),
        ("GET", "/", Some("A"), "catch-all"),
        ("GET", "/", None, "catch-all"),
    ];
    for (method, path, tenant, want) in cases {
        let r = Req {
            method,
            headers: tenant.map(|v| vec![("X-Tenant", v)]).unwrap_or_default(),
            ..req(path)
        };
        let got = route_for(&t, host, &r).map(|(o, _)| o);
        assert_eq!(
            got.as_deref(),
            Some(format!("default/t {want}").as_str()),
            "{method} {path} x-tenant={tenant:?}"
        );
    }
}
