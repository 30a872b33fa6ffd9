//! Istio routing semantics, pure: VirtualServices and DestinationRules (v1, v1beta1, v1alpha3,
//! unmodified YAML) compiled once per configuration change into a [`RouteTable`]; per request, the
//! table finds the first matching HTTP route of the destination host (Istio: first match wins, in
//! order) and picks a weighted destination. Invalid resources are rejected one by one with a
//! diagnostic naming the resource and field; the rest keeps working.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use hyper::http;
use regex::Regex;
use serde_json::Value;

/// A string match (`exact`, `prefix`, `regex` — RE2 syntax, full match as Istio defines it).
#[derive(Clone, Debug)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    /// `{}`: present, any value (headers).
    Present,
}

impl StringMatch {
    fn parse(v: &Value, field: &str) -> Result<StringMatch, String> {
        let Some(m) = v.as_object() else {
            return Err(format!(
                "{field}: expected an object with exact, prefix or regex"
            ));
        };
        if let Some(s) = m.get("exact").and_then(Value::as_str) {
            return Ok(StringMatch::Exact(s.to_owned()));
        }
        if let Some(s) = m.get("prefix").and_then(Value::as_str) {
            return Ok(StringMatch::Prefix(s.to_owned()));
        }
        if let Some(s) = m.get("regex").and_then(Value::as_str) {
            // Anchored: Istio (Envoy) regex matches the whole value.
            return Regex::new(&format!("^(?:{s})$"))
                .map(StringMatch::Regex)
                .map_err(|e| format!("{field}.regex {s:?}: {e}"));
        }
        if m.is_empty() {
            return Ok(StringMatch::Present);
        }
        Err(format!("{field}: expected exact, prefix or regex"))
    }

    fn matches(&self, v: &str, ignore_case: bool) -> bool {
        match self {
            StringMatch::Exact(s) if ignore_case => s.eq_ignore_ascii_case(v),
            StringMatch::Exact(s) => s == v,
            StringMatch::Prefix(p) if ignore_case => {
                v.len() >= p.len() && v[..p.len()].eq_ignore_ascii_case(p)
            }
            StringMatch::Prefix(p) => v.starts_with(p.as_str()),
            StringMatch::Regex(r) => r.is_match(v),
            StringMatch::Present => true,
        }
    }
}

/// One `match` block: every present condition must hold.
#[derive(Clone, Debug, Default)]
pub struct Match {
    pub name: String,
    uri: Option<StringMatch>,
    scheme: Option<StringMatch>,
    method: Option<StringMatch>,
    authority: Option<StringMatch>,
    headers: Vec<(String, StringMatch)>,
    without_headers: Vec<(String, StringMatch)>,
    query_params: Vec<(String, StringMatch)>,
    ignore_uri_case: bool,
    port: Option<u16>,
    source_labels: BTreeMap<String, String>,
    source_namespace: Option<String>,
}

/// What the matcher sees of a request.
pub struct RequestView<'a> {
    pub method: &'a str,
    pub scheme: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub authority: &'a str,
    pub port: u16,
    pub headers: &'a dyn Fn(&str) -> Option<&'a str>,
    pub source_labels: &'a BTreeMap<String, String>,
    pub source_namespace: &'a str,
}

impl Match {
    fn matches(&self, r: &RequestView<'_>) -> bool {
        let sm = |m: &Option<StringMatch>, v: &str| m.as_ref().is_none_or(|m| m.matches(v, false));
        // The authority without its port, computed only when an authority condition needs it.
        let host = || {
            r.authority
                .rsplit_once(':')
                .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
                .map(|(h, _)| h)
                .unwrap_or(r.authority)
        };
        self.uri
            .as_ref()
            .is_none_or(|m| m.matches(r.path, self.ignore_uri_case))
            && sm(&self.scheme, r.scheme)
            && sm(&self.method, r.method)
            && (self.authority.is_none()
                || sm(&self.authority, r.authority)
                || sm(&self.authority, host()))
            && self.port.is_none_or(|p| p == r.port)
            && self
                .headers
                .iter()
                .all(|(k, m)| (r.headers)(k).is_some_and(|v| m.matches(v, false)))
            && self
                .without_headers
                .iter()
                .all(|(k, m)| !(r.headers)(k).is_some_and(|v| m.matches(v, false)))
            && self
                .query_params
                .iter()
                .all(|(k, m)| query_param(r.query, k).is_some_and(|v| m.matches(v, false)))
            && self
                .source_labels
                .iter()
                .all(|(k, v)| r.source_labels.get(k) == Some(v))
            && self
                .source_namespace
                .as_deref()
                .is_none_or(|ns| ns == r.source_namespace)
    }
}

fn query_param<'a>(q: Option<&'a str>, key: &str) -> Option<&'a str> {
    q?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

/// A destination of a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// Fully qualified service host.
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
    pub weight: u32,
}

/// `corsPolicy`.
#[derive(Clone, Debug)]
pub struct Cors {
    pub allow_origins: Vec<StringMatch>,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub max_age: Option<std::time::Duration>,
    pub allow_credentials: bool,
}

impl Cors {
    fn parse(v: &Value, field: &str) -> Result<Cors, String> {
        let list = |k: &str| -> Vec<String> {
            v.get(k)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut allow_origins = Vec::new();
        for (i, o) in v
            .get("allowOrigins")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            allow_origins.push(StringMatch::parse(
                o,
                &format!("{field}.allowOrigins[{i}]"),
            )?);
        }
        // The deprecated `allowOrigin` list holds exact origins.
        allow_origins.extend(list("allowOrigin").into_iter().map(StringMatch::Exact));
        let max_age = match v.get("maxAge").and_then(Value::as_str) {
            Some(s) => Some(
                crate::resilience::parse_duration(s).map_err(|e| format!("{field}.maxAge: {e}"))?,
            ),
            None => None,
        };
        Ok(Cors {
            allow_origins,
            allow_methods: list("allowMethods"),
            allow_headers: list("allowHeaders"),
            expose_headers: list("exposeHeaders"),
            max_age,
            allow_credentials: v.get("allowCredentials").and_then(Value::as_bool) == Some(true),
        })
    }

    /// Whether a request from `origin` is allowed (`*` allows every origin).
    pub fn allows(&self, origin: &str) -> bool {
        self.allow_origins.iter().any(|m| match m {
            StringMatch::Exact(s) if s == "*" => true,
            m => m.matches(origin, false),
        })
    }
}

fn mirror_destination(
    d: &Value,
    ns: &str,
    domain: &str,
    field: &str,
) -> Result<Destination, String> {
    let host = d
        .get("host")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{field}.host is required"))?;
    Ok(Destination {
        host: fqdn(host, ns, domain),
        subset: d.get("subset").and_then(Value::as_str).map(str::to_owned),
        port: d
            .pointer("/port/number")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok()),
        weight: 100,
    })
}

fn mirror_percent(v: &Value) -> f64 {
    v.pointer("/mirrorPercentage/value")
        .or_else(|| v.pointer("/percentage/value"))
        .and_then(Value::as_f64)
        .or_else(|| v.get("mirror_percent").and_then(Value::as_f64))
        .unwrap_or(100.0)
        .clamp(0.0, 100.0)
}

/// `mirror` (+ `mirrorPercentage`) and `mirrors[]`.
fn compile_mirrors(
    r: &Value,
    ns: &str,
    domain: &str,
    field: &str,
) -> Result<Vec<(Destination, f64)>, String> {
    let mut out = Vec::new();
    if let Some(m) = r.get("mirror").filter(|m| !m.is_null()) {
        out.push((
            mirror_destination(m, ns, domain, &format!("{field}.mirror"))?,
            mirror_percent(r),
        ));
    }
    for (i, m) in r
        .get("mirrors")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let f = format!("{field}.mirrors[{i}]");
        let d = m
            .get("destination")
            .ok_or_else(|| format!("{f}.destination is required"))?;
        out.push((mirror_destination(d, ns, domain, &f)?, mirror_percent(m)));
    }
    Ok(out)
}

/// Header edits (`headers.request` / `headers.response`), parsed once when the route is
/// compiled (a name or value that is not valid HTTP is left out, with a warning).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderOps {
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
    pub add: Vec<(http::HeaderName, http::HeaderValue)>,
    pub remove: Vec<http::HeaderName>,
}

/// What a matched route does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Route(Vec<Destination>),
    Redirect {
        uri: Option<String>,
        authority: Option<String>,
        code: u16,
        scheme: Option<String>,
    },
}

/// One compiled `http[]` entry.
#[derive(Clone, Debug)]
pub struct HttpRoute {
    /// `namespace/name` of the VirtualService and the rule's index or name, for explanations.
    pub origin: String,
    matches: Vec<Match>,
    pub action: Action,
    pub rewrite_uri: Option<String>,
    pub rewrite_authority: Option<String>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    /// timeout, retries, fault.
    pub policy: crate::resilience::RoutePolicy,
    /// Traffic mirrored (fire-and-forget) and the share of requests mirrored, in percent.
    pub mirrors: Vec<(Destination, f64)>,
    pub cors: Option<Cors>,
    /// Fields accepted but not implemented yet (reported, never silently ignored).
    pub unsupported: Vec<String>,
}

impl HttpRoute {
    /// `Some(the match's name)` when the request matches this rule. Borrowed: this runs per
    /// request and must not allocate.
    pub fn matches(&self, r: &RequestView<'_>) -> Option<&str> {
        if self.matches.is_empty() {
            return Some("(no match: catch-all)");
        }
        self.matches.iter().find(|m| m.matches(r)).map(|m| {
            if m.name.is_empty() {
                "match"
            } else {
                m.name.as_str()
            }
        })
    }
}

/// An optional string field.
fn opt_str(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// A `{key: value}` object of strings (labels); non-string values read as empty.
fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// A match's `port`, when it is a valid port number.
fn port_field(m: &Value) -> Option<u16> {
    m.get("port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
}

/// One compiled `tcp[]` or `tls[]` entry.
#[derive(Clone, Debug)]
pub struct L4Route {
    pub origin: String,
    matches: Vec<L4Match>,
    pub destinations: Vec<Destination>,
}

#[derive(Clone, Debug, Default)]
struct L4Match {
    port: Option<u16>,
    destination_subnets: Vec<ipnet::IpNet>,
    source_labels: BTreeMap<String, String>,
    source_namespace: Option<String>,
    sni_hosts: Vec<String>,
}

/// What the L4 matcher sees of a connection.
pub struct ConnView<'a> {
    pub port: u16,
    pub destination: std::net::IpAddr,
    pub sni: Option<&'a str>,
    pub source_labels: &'a BTreeMap<String, String>,
    pub source_namespace: &'a str,
}

impl L4Route {
    pub fn matches(&self, c: &ConnView<'_>) -> bool {
        self.matches.is_empty()
            || self.matches.iter().any(|m| {
                m.port.is_none_or(|p| p == c.port)
                    && (m.destination_subnets.is_empty()
                        || m.destination_subnets
                            .iter()
                            .any(|n| n.contains(&c.destination)))
                    && m.source_labels
                        .iter()
                        .all(|(k, v)| c.source_labels.get(k) == Some(v))
                    && m.source_namespace
                        .as_deref()
                        .is_none_or(|ns| ns == c.source_namespace)
                    && (m.sni_hosts.is_empty()
                        || c.sni.is_some_and(|sni| {
                            m.sni_hosts.iter().any(|h| {
                                h == sni || (h.starts_with("*.") && sni.ends_with(&h[1..]))
                            })
                        }))
            })
    }
}

fn compile_l4(
    vs: &str,
    ns: &str,
    kind: &str,
    i: usize,
    r: &Value,
    domain: &str,
) -> Result<L4Route, String> {
    let field = format!("{vs} {kind}[{i}]");
    let mut matches = Vec::new();
    for (j, m) in r
        .get("match")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let subnets = m
            .get("destinationSubnets")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|s| {
                s.parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        format!("{field}.match[{j}].destinationSubnets: {s:?} is not a CIDR")
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        matches.push(L4Match {
            port: port_field(m),
            destination_subnets: subnets,
            source_labels: string_map(m.get("sourceLabels")),
            source_namespace: opt_str(m, "sourceNamespace"),
            sni_hosts: m
                .get("sniHosts")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_ascii_lowercase)
                .collect(),
        });
    }
    if kind == "tls" && (matches.is_empty() || matches.iter().any(|m| m.sni_hosts.is_empty())) {
        return Err(format!(
            "{field}.match: sniHosts is required for tls routes"
        ));
    }
    // The `route` list has HTTP's weight rules: share them.
    let as_http = serde_json::json!({"name": format!("{kind}[{i}]"), "route": r.get("route").cloned().unwrap_or(Value::Null)});
    let route = compile_http(vs, ns, i, &as_http, domain, false)?;
    let Action::Route(destinations) = route.action else {
        return Err(format!("{field}: needs route"));
    };
    Ok(L4Route {
        origin: format!("{vs} {kind}[{i}]"),
        matches,
        destinations,
    })
}

/// Load-balancing policy of a destination (DestinationRule `trafficPolicy.loadBalancer`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadBalancer {
    RoundRobin,
    Random,
    LeastRequest,
    Passthrough,
    HashHeader(String),
    HashCookie(String),
    HashSourceIp,
}

/// One host's `http[]` rules in evaluation order, indexed so that a lookup does not scan rules
/// that cannot match. A rule whose every match has a case-sensitive exact or prefix URI can only
/// match paths equal to / starting with those, so it is found through `by_path` / `by_prefix`;
/// every other rule is in `general` and is always evaluated.
#[derive(Debug, Default)]
struct HostRoutes {
    routes: Vec<Arc<HttpRoute>>,
    by_path: crate::FastMap<String, Vec<usize>>,
    by_prefix: crate::FastMap<String, Vec<usize>>,
    /// The distinct lengths of the keys of `by_prefix`, ascending: the only path prefixes a
    /// lookup needs to try.
    prefix_lens: Vec<usize>,
    /// The header most of the remaining rules require an exact value of (e.g. `x-tenant`), and
    /// those rules by that value.
    header_key: Option<String>,
    by_header: crate::FastMap<String, Vec<usize>>,
    general: Vec<usize>,
}

impl HostRoutes {
    fn index(&mut self) {
        for (i, r) in self.routes.iter().enumerate() {
            let keys: Option<Vec<(bool, &str)>> = (!r.matches.is_empty())
                .then(|| {
                    r.matches
                        .iter()
                        .map(|m| match &m.uri {
                            _ if m.ignore_uri_case => None,
                            Some(StringMatch::Exact(p)) => Some((true, p.as_str())),
                            Some(StringMatch::Prefix(p)) => Some((false, p.as_str())),
                            _ => None,
                        })
                        .collect()
                })
                .flatten();
            let Some(keys) = keys else {
                self.general.push(i);
                continue;
            };
            for (exact, key) in keys {
                let map = if exact {
                    &mut self.by_path
                } else {
                    &mut self.by_prefix
                };
                let at = map.entry(key.to_owned()).or_default();
                if at.last() != Some(&i) {
                    at.push(i);
                }
            }
        }
        self.prefix_lens = self.by_prefix.keys().map(String::len).collect();
        self.prefix_lens.sort_unstable();
        self.prefix_lens.dedup();
        self.index_header();
    }

    /// Of the rules not keyed by URI: the exact value each match requires of `name`, if every
    /// match of the rule requires one (only then can the rule be skipped when it differs).
    fn header_values<'r>(r: &'r HttpRoute, name: &str) -> Option<Vec<&'r str>> {
        if r.matches.is_empty() {
            return None;
        }
        r.matches
            .iter()
            .map(|m| {
                m.headers.iter().find_map(|(k, v)| match v {
                    StringMatch::Exact(v) if k.eq_ignore_ascii_case(name) => Some(v.as_str()),
                    _ => None,
                })
            })
            .collect()
    }

    fn index_header(&mut self) {
        // The header name required exactly by the most general rules.
        let mut counts: HashMap<String, usize> = HashMap::new();
        for &i in &self.general {
            if let Some(m) = self.routes[i].matches.first() {
                for (k, v) in &m.headers {
                    if matches!(v, StringMatch::Exact(_)) {
                        *counts.entry(k.to_ascii_lowercase()).or_default() += 1;
                    }
                }
            }
        }
        let Some((name, n)) = counts
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        else {
            return;
        };
        if n < 2 {
            return; // not worth a lookup per request
        }
        let mut rest = Vec::new();
        for &i in &self.general {
            match Self::header_values(&self.routes[i], &name) {
                Some(values) => {
                    for v in values {
                        let at = self.by_header.entry(v.to_owned()).or_default();
                        if at.last() != Some(&i) {
                            at.push(i);
                        }
                    }
                }
                None => rest.push(i),
            }
        }
        self.general = rest;
        self.header_key = Some(name);
    }

    /// First match wins across the general rules and the rules the path's keys select.
    fn find(&self, req: &RequestView<'_>) -> Option<(&Arc<HttpRoute>, &str)> {
        let exact = self.by_path.get(req.path).map_or(&[][..], Vec::as_slice);
        let by_header = self
            .header_key
            .as_deref()
            .and_then(|k| (req.headers)(k))
            .and_then(|v| self.by_header.get(v))
            .map_or(&[][..], Vec::as_slice);
        let gathered: Vec<usize>;
        let keyed = if self.by_prefix.is_empty() && by_header.is_empty() {
            exact
        } else if self.by_prefix.is_empty() && exact.is_empty() {
            by_header
        } else {
            let mut v = exact.to_vec();
            v.extend_from_slice(by_header);
            for &len in &self.prefix_lens {
                let Some(p) = req.path.get(..len) else {
                    if len > req.path.len() {
                        break;
                    }
                    continue; // not a char boundary: no key can equal it
                };
                if let Some(ix) = self.by_prefix.get(p) {
                    v.extend_from_slice(ix);
                }
            }
            v.sort_unstable();
            v.dedup();
            gathered = v;
            &gathered
        };
        let (mut g, mut k) = (
            self.general.iter().copied().peekable(),
            keyed.iter().copied().peekable(),
        );
        loop {
            let i = match (g.peek(), k.peek()) {
                (Some(&a), Some(&b)) if a < b => g.next(),
                (_, Some(_)) => k.next(),
                (Some(_), None) => g.next(),
                (None, None) => return None,
            }?;
            let r = &self.routes[i];
            if let Some(m) = r.matches(req) {
                return Some((r, m));
            }
        }
    }
}

/// A `trafficPolicy` as far as routing uses it: the load balancer, and `portLevelSettings` by
/// port number (a port entry without `loadBalancer` is `None`: port-level settings replace the
/// policy's as a whole, so it means "the default", not "inherit").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub lb: Option<LoadBalancer>,
    pub ports: BTreeMap<u16, Option<LoadBalancer>>,
    pub pool: Option<crate::resilience::PoolLimits>,
    pub outlier: Option<crate::resilience::OutlierPolicy>,
    /// port → its portLevelSettings' connectionPool and outlierDetection.
    pub port_resilience: BTreeMap<
        u16,
        (
            Option<crate::resilience::PoolLimits>,
            Option<crate::resilience::OutlierPolicy>,
        ),
    >,
}

/// A destination's connection pool and outlier detection.
pub type Resilience = (
    Option<crate::resilience::PoolLimits>,
    Option<crate::resilience::OutlierPolicy>,
);

impl Policy {
    /// The balancer this policy sets for `port`, and whether a port-level entry decided it.
    fn for_port(&self, port: u16) -> (Option<&LoadBalancer>, bool) {
        match self.ports.get(&port) {
            Some(lb) => (lb.as_ref(), true),
            None => (self.lb.as_ref(), false),
        }
    }
}

/// A compiled DestinationRule.
#[derive(Clone, Debug)]
pub struct Rule {
    pub origin: String,
    pub policy: Policy,
    /// subset name → (pod labels, the subset's own traffic policy)
    pub subsets: BTreeMap<String, (BTreeMap<String, String>, Policy)>,
}

impl Policy {
    /// This policy's pool and outlier settings for `port`: a port-level entry's fields win.
    fn resilience_for(&self, port: u16) -> Resilience {
        match self.port_resilience.get(&port) {
            Some((pool, outlier)) => (
                pool.clone().or_else(|| self.pool.clone()),
                outlier.clone().or_else(|| self.outlier.clone()),
            ),
            None => (self.pool.clone(), self.outlier.clone()),
        }
    }
}

impl Rule {
    /// The connection pool and outlier detection for `subset` on `port`: field by field, the
    /// subset's settings replace the rule's (pilot's MergeSubsetTrafficPolicy).
    pub fn resilience(&self, subset: Option<&str>, port: u16) -> Resilience {
        let (pool, outlier) = self.policy.resilience_for(port);
        match subset.and_then(|s| self.subsets.get(s)) {
            Some((_, sub)) => {
                let (sp, so) = sub.resilience_for(port);
                (sp.or(pool), so.or(outlier))
            }
            None => (pool, outlier),
        }
    }

    /// The endpoint labels and load balancer for traffic to `subset` (if any) on `port`, with
    /// Istio's precedence (pilot's MergeSubsetTrafficPolicy): each policy is first resolved for
    /// the port (a port-level entry replaces the policy's fields), then the subset's resolved
    /// balancer, when it sets one or came from a port-level entry, replaces the rule's.
    /// `None` when the subset is not defined. Nothing set anywhere: ROUND_ROBIN.
    pub fn resolve(
        &self,
        subset: Option<&str>,
        port: u16,
    ) -> Option<(Option<&BTreeMap<String, String>>, LoadBalancer)> {
        let (labels, sub) = match subset {
            Some(s) => {
                let (labels, policy) = self.subsets.get(s)?;
                (Some(labels), Some(policy))
            }
            None => (None, None),
        };
        let (mut lb, _) = self.policy.for_port(port);
        if let Some(sub) = sub {
            let (sub_lb, port_level) = sub.for_port(port);
            if sub_lb.is_some() || port_level {
                lb = sub_lb;
            }
        }
        Some((labels, lb.cloned().unwrap_or(LoadBalancer::RoundRobin)))
    }
}

/// The endpoint labels and load balancer for `subset` on `port` of a host whose DestinationRule
/// (if any) is `rule`; `None` when a subset is asked for that no rule defines (Istio: 503).
pub fn resolve_destination<'r>(
    rule: Option<&'r Rule>,
    subset: Option<&str>,
    port: u16,
) -> Option<(Option<&'r BTreeMap<String, String>>, LoadBalancer)> {
    match rule {
        Some(r) => r.resolve(subset, port),
        None if subset.is_some() => None,
        None => Some((None, LoadBalancer::RoundRobin)),
    }
}

/// Everything compiled from the Istio resources of one snapshot.
#[derive(Debug, Default)]
pub struct RouteTable {
    http: crate::FastMap<String, HostRoutes>,
    tcp: crate::FastMap<String, Vec<Arc<L4Route>>>,
    tls: crate::FastMap<String, Vec<Arc<L4Route>>>,
    /// Wildcard hosts by the suffix after `*` (`*.example.com` → `.example.com`, `*` → ``).
    wildcard: crate::FastMap<String, HostRoutes>,
    /// Wildcard suffixes that do not start with a dot, matched by a scan (rare).
    odd_wildcards: Vec<String>,
    rules: crate::FastMap<String, Arc<Rule>>,
    /// One line per rejected resource or field, naming it.
    pub diagnostics: Vec<String>,
}

/// `name` → FQDN in the resource's namespace (Istio resolves short names there).
pub fn fqdn(host: &str, namespace: &str, domain: &str) -> String {
    let h = host.trim_end_matches('.');
    if h.contains('*') || h.ends_with(&format!(".svc.{domain}")) {
        return h.to_owned();
    }
    match h.split('.').count() {
        1 => format!("{h}.{namespace}.svc.{domain}"),
        2 => format!("{h}.svc.{domain}"),
        _ if h.ends_with(".svc") => format!("{h}.{domain}"),
        _ => h.to_owned(),
    }
}

/// A `trafficPolicy` object (absent = empty policy).
fn resilience_of(v: &Value) -> Result<Resilience, String> {
    let pool = match v.get("connectionPool") {
        None | Some(Value::Null) => None,
        Some(c) => Some(crate::resilience::PoolLimits::parse(c)?),
    };
    let outlier = match v.get("outlierDetection") {
        None | Some(Value::Null) => None,
        Some(o) => Some(crate::resilience::OutlierPolicy::parse(o)?),
    };
    Ok((pool, outlier))
}

fn policy(v: &Value) -> Result<Policy, String> {
    let mut port_resilience = BTreeMap::new();
    let ports = match v.get("portLevelSettings") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Array(list)) => {
            let mut ports = BTreeMap::new();
            for (i, p) in list.iter().enumerate() {
                let number = p
                    .get("port")
                    .and_then(|n| n.get("number"))
                    .and_then(Value::as_u64)
                    .and_then(|n| u16::try_from(n).ok())
                    .ok_or_else(|| format!("portLevelSettings[{i}].port.number is required"))?;
                let l = lb(p).map_err(|e| format!("portLevelSettings[{i}].{e}"))?;
                ports.insert(number, l);
                port_resilience.insert(
                    number,
                    resilience_of(p).map_err(|e| format!("portLevelSettings[{i}].{e}"))?,
                );
            }
            ports
        }
        Some(_) => return Err("portLevelSettings: expected a list".into()),
    };
    let (pool, outlier) = resilience_of(v)?;
    Ok(Policy {
        lb: lb(v)?,
        ports,
        pool,
        outlier,
        port_resilience,
    })
}

fn lb(v: &Value) -> Result<Option<LoadBalancer>, String> {
    let Some(l) = v.get("loadBalancer") else {
        return Ok(None);
    };
    if let Some(s) = l.get("simple").and_then(Value::as_str) {
        return Ok(Some(match s {
            "ROUND_ROBIN" | "UNSPECIFIED" => LoadBalancer::RoundRobin,
            "RANDOM" => LoadBalancer::Random,
            "LEAST_REQUEST" | "LEAST_CONN" => LoadBalancer::LeastRequest,
            "PASSTHROUGH" => LoadBalancer::Passthrough,
            other => {
                return Err(format!(
                    "loadBalancer.simple {other:?} is not ROUND_ROBIN, RANDOM, LEAST_REQUEST or PASSTHROUGH"
                ));
            }
        }));
    }
    if let Some(h) = l.get("consistentHash") {
        if let Some(n) = h.get("httpHeaderName").and_then(Value::as_str) {
            return Ok(Some(LoadBalancer::HashHeader(n.to_ascii_lowercase())));
        }
        if let Some(n) = h
            .get("httpCookie")
            .and_then(|c| c.get("name"))
            .and_then(Value::as_str)
        {
            return Ok(Some(LoadBalancer::HashCookie(n.to_owned())));
        }
        if h.get("useSourceIp").and_then(Value::as_bool) == Some(true) {
            return Ok(Some(LoadBalancer::HashSourceIp));
        }
        return Err("consistentHash needs httpHeaderName, httpCookie.name or useSourceIp".into());
    }
    Ok(None)
}

fn header_ops(v: Option<&Value>) -> HeaderOps {
    let name = |k: &str| {
        http::HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| {
                tracing::warn!(
                    header = k,
                    "VirtualService header edit: not a valid header name, left out"
                )
            })
            .ok()
    };
    let pairs = |op: &str| -> Vec<(http::HeaderName, http::HeaderValue)> {
        let Some(m) = v.and_then(|v| v.get(op)).and_then(Value::as_object) else {
            return Vec::new();
        };
        m.iter()
            .filter_map(|(k, val)| {
                let val = val.as_str().unwrap_or_default();
                let parsed = http::HeaderValue::from_str(val)
                    .map_err(|_| tracing::warn!(header = %k, value = val, "VirtualService header edit: not a valid header value, left out"))
                    .ok()?;
                Some((name(k)?, parsed))
            })
            .collect()
    };
    HeaderOps {
        set: pairs("set"),
        add: pairs("add"),
        remove: v
            .and_then(|v| v.get("remove"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .filter_map(name)
                    .collect()
            })
            .unwrap_or_default(),
    }
}

fn compile_match(m: &Value, field: &str) -> Result<Match, String> {
    let sm = |k: &str| -> Result<Option<StringMatch>, String> {
        m.get(k)
            .map(|v| StringMatch::parse(v, &format!("{field}.{k}")))
            .transpose()
    };
    let map = |k: &str, lower: bool| -> Result<Vec<(String, StringMatch)>, String> {
        m.get(k)
            .and_then(Value::as_object)
            .map(|o| {
                o.iter()
                    .map(|(n, v)| {
                        Ok((
                            if lower {
                                n.to_ascii_lowercase()
                            } else {
                                n.clone()
                            },
                            StringMatch::parse(v, &format!("{field}.{k}.{n}"))?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or(Ok(vec![]))
    };
    Ok(Match {
        name: m
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        uri: sm("uri")?,
        scheme: sm("scheme")?,
        method: sm("method")?,
        authority: sm("authority")?,
        headers: map("headers", true)?,
        without_headers: map("withoutHeaders", true)?,
        query_params: map("queryParams", false)?,
        ignore_uri_case: m
            .get("ignoreUriCase")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        port: port_field(m),
        source_labels: string_map(m.get("sourceLabels")),
        source_namespace: opt_str(m, "sourceNamespace"),
    })
}

const UNSUPPORTED_HTTP: &[&str] = &["delegate", "directResponse"];

fn compile_http(
    vs: &str,
    ns: &str,
    i: usize,
    r: &Value,
    domain: &str,
    non_idempotent_retries: bool,
) -> Result<HttpRoute, String> {
    let name = opt_str(r, "name").unwrap_or_else(|| format!("http[{i}]"));
    let field = format!("{vs} {name}");
    let matches = r
        .get("match")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .enumerate()
                .map(|(j, m)| compile_match(m, &format!("{field}.match[{j}]")))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap_or(Ok(vec![]))?;
    let action = if let Some(rd) = r.get("redirect") {
        Action::Redirect {
            uri: opt_str(rd, "uri"),
            authority: opt_str(rd, "authority"),
            code: rd
                .get("redirectCode")
                .and_then(Value::as_u64)
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(301),
            scheme: opt_str(rd, "scheme"),
        }
    } else {
        let dests = r
            .get("route")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if dests.is_empty() {
            return Err(format!("{field}: needs route or redirect"));
        }
        let mut out = Vec::new();
        for (j, d) in dests.iter().enumerate() {
            let host = d
                .pointer("/destination/host")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{field}.route[{j}].destination.host is required"))?;
            let weight = d.get("weight").and_then(Value::as_i64).unwrap_or(0);
            if !(0..=100).contains(&weight) {
                return Err(format!(
                    "{field}.route[{j}].weight {weight} is not within 0..100"
                ));
            }
            out.push(Destination {
                host: fqdn(host, ns, domain),
                subset: d
                    .pointer("/destination/subset")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                port: d
                    .pointer("/destination/port/number")
                    .and_then(Value::as_u64)
                    .and_then(|p| u16::try_from(p).ok()),
                weight: weight as u32,
            });
        }
        let total: u32 = out.iter().map(|d| d.weight).sum();
        if out.len() == 1 {
            out[0].weight = 100;
        } else if total == 0 {
            // No weights at all: an even split.
            let n = out.len() as u32;
            for d in out.iter_mut() {
                d.weight = 100 / n;
            }
        } else if total != 100 {
            return Err(format!("{field}.route: weights add up to {total}, not 100"));
        }
        Action::Route(out)
    };
    let rewrite = r.get("rewrite");
    Ok(HttpRoute {
        origin: format!("{vs} {name}"),
        matches,
        action,
        rewrite_uri: rewrite
            .and_then(|w| w.get("uri"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        rewrite_authority: rewrite
            .and_then(|w| w.get("authority"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        request_headers: header_ops(r.pointer("/headers/request")),
        response_headers: header_ops(r.pointer("/headers/response")),
        policy: crate::resilience::RoutePolicy::parse(r, non_idempotent_retries)
            .map_err(|e| format!("{field}: {e}"))?,
        mirrors: compile_mirrors(r, ns, domain, &field)?,
        cors: r
            .get("corsPolicy")
            .filter(|c| !c.is_null())
            .map(|c| Cors::parse(c, &format!("{field}.corsPolicy")))
            .transpose()?,
        unsupported: UNSUPPORTED_HTTP
            .iter()
            .filter(|k| r.get(**k).is_some())
            .map(|k| (*k).to_owned())
            .collect(),
    })
}

impl RouteTable {
    /// Compile the Istio resources of a snapshot. Gateway-bound VirtualServices (without `mesh`)
    /// are ignored by sidecars; VirtualServices are taken in the order given.
    pub fn compile(resources: &[Value], domain: &str) -> RouteTable {
        Self::compile_for(resources, domain, None)
    }

    /// Compile what a proxy in `viewer` can see: resources whose `exportTo` excludes that
    /// namespace (`.` = the resource's own namespace only) are left out.
    pub fn compile_for(resources: &[Value], domain: &str, viewer: Option<&str>) -> RouteTable {
        Self::compile_with(resources, domain, viewer, None)
    }

    /// Compile what a gateway serving these Gateways (`namespace/name`) applies: only the
    /// VirtualServices bound to one of them (`gateways: [name]` or `[ns/name]`).
    pub fn compile_gateway(resources: &[Value], domain: &str, gateways: &[String]) -> RouteTable {
        Self::compile_with(resources, domain, None, Some(gateways))
    }

    fn compile_with(
        resources: &[Value],
        domain: &str,
        viewer: Option<&str>,
        gateway: Option<&[String]>,
    ) -> RouteTable {
        let visible = |r: &Value| {
            let ns = r["metadata"]["namespace"].as_str().unwrap_or("default");
            match (viewer, r["spec"]["exportTo"].as_array()) {
                (Some(v), Some(list)) if !list.is_empty() => list
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|e| e == "*" || e == v || (e == "." && ns == v)),
                _ => true,
            }
        };
        let resources: Vec<&Value> = resources.iter().filter(|r| visible(r)).collect();
        let mut t = RouteTable::default();
        let mut seen: HashMap<String, String> = HashMap::new();
        for r in resources.iter().copied() {
            let kind = r["kind"].as_str().unwrap_or_default();
            let ns = r["metadata"]["namespace"].as_str().unwrap_or("default");
            let name = r["metadata"]["name"].as_str().unwrap_or("?");
            let id = format!("{kind} {ns}/{name}");
            let spec = &r["spec"];
            // The same model the CRDs are generated from: typos and wrong types are named (the
            // API server keeps unknown fields, so this is where a user learns of them).
            if let Some(ty) = crate::crds::spec_type(kind) {
                let mut problems = Vec::new();
                crate::crds::check(&ty, spec, "spec", &mut problems);
                t.diagnostics
                    .extend(problems.into_iter().map(|p| format!("{id}: {p}")));
            }
            match kind {
                "VirtualService" => {
                    if seen
                        .insert(format!("{kind}/{ns}/{name}"), id.clone())
                        .is_some()
                    {
                        t.diagnostics.push(format!("{id}: duplicate name, ignored"));
                        continue;
                    }
                    // ferry's opt-in (an annotation, so the Istio resource stays valid) to
                    // replay non-idempotent requests on the retry conditions.
                    let non_idempotent =
                        r["metadata"]["annotations"]["ferry.dev/retry-non-idempotent"] == "true";
                    let gateways: Vec<&str> = spec["gateways"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    let refs: Vec<String> = gateways
                        .iter()
                        .map(|g| crate::gateway::gateway_ref(g, ns))
                        .collect();
                    let applies = match gateway {
                        // Sidecars: VirtualServices without gateways, or bound to `mesh`.
                        None => refs.is_empty() || refs.iter().any(|r| r == "mesh"),
                        Some(ids) => refs.iter().any(|r| ids.contains(r)),
                    };
                    if !applies {
                        continue;
                    }
                    let hosts: Vec<String> = spec["hosts"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(Value::as_str)
                                .map(|h| fqdn(h, ns, domain))
                                .collect()
                        })
                        .unwrap_or_default();
                    if hosts.is_empty() {
                        t.diagnostics
                            .push(format!("{id}: spec.hosts is empty, ignored"));
                        continue;
                    }
                    let mut routes = Vec::new();
                    let mut ok = true;
                    for (i, h) in spec["http"].as_array().into_iter().flatten().enumerate() {
                        match compile_http(
                            &format!("{ns}/{name}"),
                            ns,
                            i,
                            h,
                            domain,
                            non_idempotent,
                        ) {
                            Ok(route) => {
                                if !route.unsupported.is_empty() {
                                    t.diagnostics.push(format!(
                                        "{id} {}: {} accepted but not implemented yet (ignored)",
                                        route.origin,
                                        route.unsupported.join(", ")
                                    ));
                                }
                                routes.push(Arc::new(route));
                            }
                            Err(e) => {
                                t.diagnostics.push(format!("{id} rejected: {e}"));
                                ok = false;
                                break;
                            }
                        }
                    }
                    if !ok {
                        continue;
                    }
                    let mut l4: Vec<(&str, Arc<L4Route>)> = Vec::new();
                    for kind in ["tcp", "tls"] {
                        for (i, r) in spec[kind].as_array().into_iter().flatten().enumerate() {
                            match compile_l4(&format!("{ns}/{name}"), ns, kind, i, r, domain) {
                                Ok(route) => l4.push((kind, Arc::new(route))),
                                Err(e) => {
                                    t.diagnostics.push(format!("{id} rejected: {e}"));
                                    ok = false;
                                }
                            }
                        }
                    }
                    if !ok {
                        continue;
                    }
                    for h in &hosts {
                        for (kind, r) in &l4 {
                            let table = if *kind == "tcp" {
                                &mut t.tcp
                            } else {
                                &mut t.tls
                            };
                            table.entry(h.clone()).or_default().push(r.clone());
                        }
                    }
                    for h in hosts {
                        let entry = match h.strip_prefix('*') {
                            Some(suffix) => t.wildcard.entry(suffix.to_owned()),
                            None => t.http.entry(h),
                        };
                        entry.or_default().routes.extend(routes.iter().cloned());
                    }
                }
                "DestinationRule" => {
                    let Some(host) = spec["host"].as_str() else {
                        t.diagnostics
                            .push(format!("{id} rejected: spec.host is required"));
                        continue;
                    };
                    let host = fqdn(host, ns, domain);
                    let compiled = (|| -> Result<Rule, String> {
                        let policy0 = policy(&spec["trafficPolicy"])
                            .map_err(|e| format!("trafficPolicy.{e}"))?;
                        let mut subsets = BTreeMap::new();
                        for (i, s) in spec["subsets"].as_array().into_iter().flatten().enumerate() {
                            let sname = s["name"]
                                .as_str()
                                .ok_or_else(|| format!("subsets[{i}].name is required"))?;
                            let labels = string_map(s.get("labels"));
                            let sub = policy(&s["trafficPolicy"])
                                .map_err(|e| format!("subsets[{i}].trafficPolicy.{e}"))?;
                            if subsets.insert(sname.to_owned(), (labels, sub)).is_some() {
                                return Err(format!("subsets[{i}].name {sname:?} is duplicated"));
                            }
                        }
                        Ok(Rule {
                            origin: id.clone(),
                            policy: policy0,
                            subsets,
                        })
                    })();
                    match compiled {
                        Ok(rule) => {
                            if t.rules.insert(host.clone(), Arc::new(rule)).is_some() {
                                t.diagnostics.push(format!("{id}: another DestinationRule for {host} was replaced (the last one wins)"));
                            }
                        }
                        Err(e) => t.diagnostics.push(format!("{id} rejected: {e}")),
                    }
                }
                _ => {}
            }
        }
        // A route to a subset no DestinationRule defines: kept (Istio answers 503), but explained.
        for routes in t.http.values() {
            for r in &routes.routes {
                if let Action::Route(ds) = &r.action {
                    for d in ds {
                        if let Some(s) = &d.subset
                            && !t
                                .rules
                                .get(&d.host)
                                .is_some_and(|rule| rule.subsets.contains_key(s))
                        {
                            t.diagnostics.push(format!("{}: subset {s:?} of {} is not defined by any DestinationRule (requests to it get 503)", r.origin, d.host));
                        }
                    }
                }
            }
        }
        t.diagnostics.sort();
        t.diagnostics.dedup();
        for routes in t.http.values_mut().chain(t.wildcard.values_mut()) {
            routes.index();
        }
        t.odd_wildcards = t
            .wildcard
            .keys()
            .filter(|k| !k.is_empty() && !k.starts_with('.'))
            .cloned()
            .collect();
        t
    }

    /// The HTTP routes for a host, in evaluation order.
    pub fn routes(&self, host: &str) -> Vec<Arc<HttpRoute>> {
        self.host_routes(host)
            .map(|h| h.routes.clone())
            .unwrap_or_default()
    }

    /// Whether a VirtualService gives this host `http[]` rules (then an unmatched request is 404).
    pub fn has_http_routes(&self, host: &str) -> bool {
        self.host_routes(host).is_some_and(|h| !h.routes.is_empty())
    }

    /// The routes for a host: its exact entry, else the longest wildcard that covers it.
    fn host_routes(&self, host: &str) -> Option<&HostRoutes> {
        if let Some(r) = self.http.get(host) {
            return Some(r);
        }
        // `*.a.b` patterns: the leftmost dot gives the longest covering suffix.
        let mut best = host
            .match_indices('.')
            .map(|(i, _)| &host[i..])
            .find(|suffix| self.wildcard.contains_key(*suffix));
        for odd in &self.odd_wildcards {
            if host.ends_with(odd.as_str()) && best.is_none_or(|b| odd.len() > b.len()) {
                best = Some(odd);
            }
        }
        self.wildcard.get(best.unwrap_or(""))
    }

    /// The first matching route (Istio: first match wins) and the name of the match that hit.
    pub fn find<'t>(
        &'t self,
        host: &str,
        req: &RequestView<'_>,
    ) -> Option<(&'t Arc<HttpRoute>, &'t str)> {
        self.host_routes(host)?.find(req)
    }

    /// The first matching `tls[]` route (when the SNI is known) or `tcp[]` route for a host.
    pub fn find_l4(&self, host: &str, c: &ConnView<'_>) -> Option<Arc<L4Route>> {
        let tls = c
            .sni
            .and_then(|_| self.tls.get(host))
            .and_then(|rs| rs.iter().find(|r| r.matches(c)).cloned());
        tls.or_else(|| {
            self.tcp
                .get(host)
                .and_then(|rs| rs.iter().find(|r| r.matches(c)).cloned())
        })
    }

    pub fn rule(&self, host: &str) -> Option<Arc<Rule>> {
        self.rules.get(host).cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.http.is_empty()
            && self.wildcard.is_empty()
            && self.rules.is_empty()
            && self.tcp.is_empty()
            && self.tls.is_empty()
    }
}

impl HttpRoute {
    /// Istio's `rewrite.uri`: when the rule matched on a URI prefix, that prefix is replaced;
    /// otherwise the whole path is.
    pub fn rewrite_path(&self, path: &str) -> Option<String> {
        let to = self.rewrite_uri.as_deref()?;
        for m in &self.matches {
            if let Some(StringMatch::Prefix(p)) = &m.uri
                && path.starts_with(p.as_str())
            {
                return Some(format!("{to}{}", &path[p.len()..]));
            }
        }
        Some(to.to_owned())
    }
}

/// Jump consistent hash (Lamping & Veach): a key's bucket among `n` moves only when needed.
pub fn jump_hash(mut key: u64, n: usize) -> usize {
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < n as i64 {
        b = j;
        key = key.wrapping_mul(2862933555777941757).wrapping_add(1);
        j = ((b.wrapping_add(1) as f64)
            * ((1u64 << 31) as f64 / ((key >> 33).wrapping_add(1) as f64))) as i64;
    }
    b.max(0) as usize
}

/// Pick a destination by weight with a number in 0..100.
pub fn pick_weighted(dests: &[Destination], roll: u32) -> Option<&Destination> {
    let mut acc = 0;
    for d in dests {
        acc += d.weight;
        if roll < acc {
            return Some(d);
        }
    }
    dests.last()
}

#[cfg(test)]
mod tests;
