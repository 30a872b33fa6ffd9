//! An in-repo fake Kubernetes API server for discovery tests, faithful to the parts of the
//! protocol clients depend on: LIST (with the collection's resourceVersion, `limit`/`continue`
//! paging, `labelSelector`), WATCH from a resourceVersion (`ADDED`/`MODIFIED`/`DELETED` lines,
//! `BOOKMARK`s when asked, `timeoutSeconds`), `410 Gone` as an `ERROR` event once the requested
//! version has been compacted away, namespaced and cluster-wide paths, GET/POST/DELETE of single
//! objects, and 404 `Status` for resources it does not serve.
//!
//! Writes follow the real verbs: POST creates (409 `AlreadyExists` if present), PUT replaces
//! (404 if absent), PATCH applies a JSON merge patch. An optional admission hook sees every
//! create and update first (the lab uses it for the mutating webhook, ClusterIP allocation and
//! namespace checks), and may change the object or refuse it with a `Status`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::broadcast;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Admission: `(new object, old object if this is an update)` → the object to store, or a
/// `Status` object (with `code`) refusing it.
pub type Admit = Arc<
    dyn Fn(
            Value,
            Option<Value>,
        ) -> std::pin::Pin<Box<dyn Future<Output = Result<Value, Value>> + Send>>
        + Send
        + Sync,
>;

/// A resource type the server serves.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Kind {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub kind: String,
}

/// The resources served by default.
pub fn default_kinds(with_istio: bool) -> Vec<Kind> {
    let k = |g: &str, v: &str, p: &str, kind: &str| Kind {
        group: g.into(),
        version: v.into(),
        plural: p.into(),
        kind: kind.into(),
    };
    let mut kinds = vec![
        k("", "v1", "namespaces", "Namespace"),
        k("", "v1", "services", "Service"),
        k("", "v1", "pods", "Pod"),
        k("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice"),
    ];
    if with_istio {
        kinds.push(k(
            "networking.istio.io",
            "v1",
            "virtualservices",
            "VirtualService",
        ));
        kinds.push(k(
            "networking.istio.io",
            "v1",
            "destinationrules",
            "DestinationRule",
        ));
    }
    kinds
}

#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    kind: String,
    typ: &'static str,
    object: Value,
}

struct State {
    kinds: Vec<Kind>,
    rv: u64,
    /// Watches from a version below this get 410 Gone.
    compacted: u64,
    /// (kind, namespace, name) → object
    objects: BTreeMap<(String, String, String), Value>,
    log: Vec<Event>,
}

/// The fake API server.
#[derive(Clone)]
pub struct FakeApiServer {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Event>,
    pub bookmark_interval: Duration,
    admit: Arc<Mutex<Option<Admit>>>,
    /// The latest resourceVersion, for in-process observers (controllers).
    changed: tokio::sync::watch::Sender<u64>,
    traffic: Arc<Traffic>,
}

/// What clients did: connections served and requests by HTTP version.
#[derive(Default)]
struct Traffic {
    connections: AtomicUsize,
    requests: AtomicUsize,
    http2_requests: AtomicUsize,
}

/// A failure `Status` object as the API server returns it.
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})
}

fn respond(code: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = code;
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    r
}

/// `labelSelector` query syntax: `a=b`, `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`, `a notin (x,y)`.
pub fn selector_matches(sel: &str, labels: &serde_json::Map<String, Value>) -> bool {
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    let mut parts = Vec::new();
    let (mut depth, mut cur) = (0, String::new());
    for c in sel.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    parts.push(cur);
    parts
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .all(|p| {
            if let Some((k, rest)) = p.split_once(" notin ") {
                let vals: Vec<&str> = rest
                    .trim()
                    .trim_matches(['(', ')'])
                    .split(',')
                    .map(str::trim)
                    .collect();
                get(k.trim()).is_none_or(|v| !vals.contains(&v))
            } else if let Some((k, rest)) = p.split_once(" in ") {
                let vals: Vec<&str> = rest
                    .trim()
                    .trim_matches(['(', ')'])
                    .split(',')
                    .map(str::trim)
                    .collect();
                get(k.trim()).is_some_and(|v| vals.contains(&v))
            } else if let Some((k, v)) = p.split_once("!=") {
                get(k.trim()) != Some(v.trim())
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                get(k.trim()) == Some(v.trim())
            } else if let Some(k) = p.strip_prefix('!') {
                get(k.trim()).is_none()
            } else {
                get(p).is_some()
            }
        })
}

struct Query {
    watch: bool,
    rv: Option<u64>,
    selector: Option<String>,
    bookmarks: bool,
    timeout: Option<u64>,
    limit: Option<usize>,
    cont: Option<String>,
}

fn query(q: Option<&str>) -> Query {
    let mut out = Query {
        watch: false,
        rv: None,
        selector: None,
        bookmarks: false,
        timeout: None,
        limit: None,
        cont: None,
    };
    for kv in q.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v = percent_decode(v);
        match k {
            "watch" => out.watch = v == "true" || v == "1",
            "resourceVersion" => out.rv = v.parse().ok(),
            "labelSelector" => out.selector = Some(v),
            "allowWatchBookmarks" => out.bookmarks = v == "true",
            "timeoutSeconds" => out.timeout = v.parse().ok(),
            "limit" => out.limit = v.parse().ok(),
            "continue" => out.cont = Some(v),
            _ => {}
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(h) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(h);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parsed request path.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
}

impl FakeApiServer {
    pub fn new(kinds: Vec<Kind>) -> FakeApiServer {
        let (events, _) = broadcast::channel(4096);
        FakeApiServer {
            state: Arc::new(Mutex::new(State {
                kinds,
                rv: 1,
                compacted: 0,
                objects: BTreeMap::new(),
                log: Vec::new(),
            })),
            events,
            bookmark_interval: Duration::from_millis(500),
            admit: Arc::new(Mutex::new(None)),
            changed: tokio::sync::watch::channel(1).0,
            traffic: Arc::default(),
        }
    }

    /// Connections served so far (TLS: those whose handshake succeeded).
    pub fn connections(&self) -> usize {
        self.traffic.connections.load(Ordering::Relaxed)
    }

    /// Requests received so far, and how many of them came over HTTP/2.
    pub fn requests(&self) -> (usize, usize) {
        (
            self.traffic.requests.load(Ordering::Relaxed),
            self.traffic.http2_requests.load(Ordering::Relaxed),
        )
    }

    /// Install the admission hook for creates and updates that arrive over HTTP (and through
    /// [`FakeApiServer::create`]).
    pub fn set_admission(&self, admit: Admit) {
        *self.admit.lock().expect("admit") = Some(admit);
    }

    /// Notified with the new resourceVersion after every change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// One stored object.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let st = self.state.lock().expect("state");
        st.objects
            .get(&(kind.to_owned(), namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every stored object of a kind (all namespaces), in (namespace, name) order.
    pub fn list_kind(&self, kind: &str) -> Vec<Value> {
        let st = self.state.lock().expect("state");
        st.objects
            .iter()
            .filter(|((k, _, _), _)| k == kind)
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Change a stored object in place (e.g. a controller writing `status`); a change event is
    /// emitted only if `f` actually changed it. Returns whether the object exists.
    pub fn update(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> bool {
        let Some(mut obj) = self.get(kind, namespace, name) else {
            return false;
        };
        let before = obj.clone();
        f(&mut obj);
        if obj != before {
            self.apply(obj);
        }
        true
    }

    async fn admitted(&self, obj: Value, old: Option<Value>) -> Result<Value, Value> {
        let admit = self.admit.lock().expect("admit").clone();
        match admit {
            Some(a) => a(obj, old).await,
            None => Ok(obj),
        }
    }

    /// Create through admission: 409 if the object exists. Returns the stored object.
    pub async fn create(&self, mut obj: Value) -> Result<Value, Value> {
        let key = key_of(&obj);
        if self.get(&key.0, &key.1, &key.2).is_some() {
            return Err(status(
                409,
                "AlreadyExists",
                &format!("{} {:?} already exists", key.0.to_lowercase(), key.2),
            ));
        }
        obj["metadata"]["creationTimestamp"] = json!(now_rfc3339());
        let obj = self.admitted(obj, None).await?;
        self.apply(obj.clone());
        Ok(self.get(&key.0, &key.1, &key.2).unwrap_or(obj))
    }

    /// Replace through admission: 404 if the object does not exist. Identity and creation
    /// metadata are kept from the stored object, as the API server does.
    pub async fn replace(&self, mut obj: Value) -> Result<Value, Value> {
        let key = key_of(&obj);
        let Some(old) = self.get(&key.0, &key.1, &key.2) else {
            return Err(status(
                404,
                "NotFound",
                &format!("{} {:?} not found", key.0.to_lowercase(), key.2),
            ));
        };
        // Optimistic concurrency: an update that says which version it read must be based on
        // the current one.
        if let Some(rv) = obj["metadata"]["resourceVersion"]
            .as_str()
            .filter(|r| !r.is_empty())
            && old["metadata"]["resourceVersion"].as_str() != Some(rv)
        {
            return Err(status(
                409,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on {} {:?}: the object has been modified; please apply your changes to the latest version and try again",
                    key.0.to_lowercase(),
                    key.2
                ),
            ));
        }
        for f in ["uid", "creationTimestamp"] {
            if let Some(v) = old["metadata"].get(f) {
                obj["metadata"][f] = v.clone();
            }
        }
        let obj = self.admitted(obj, Some(old)).await?;
        self.apply(obj.clone());
        Ok(self.get(&key.0, &key.1, &key.2).unwrap_or(obj))
    }

    /// Create or update an object (by kind/namespace/name); returns its new resourceVersion.
    pub fn apply(&self, mut obj: Value) -> u64 {
        let mut st = self.state.lock().expect("state");
        st.rv += 1;
        let rv = st.rv;
        let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if obj["metadata"].get("uid").is_none() {
            obj["metadata"]["uid"] = json!(format!("uid-{kind}-{ns}-{name}"));
        }
        let typ = if st
            .objects
            .insert((kind.clone(), ns, name), obj.clone())
            .is_some()
        {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let ev = Event {
            rv,
            kind,
            typ,
            object: obj,
        };
        st.log.push(ev.clone());
        let _ = self.events.send(ev);
        drop(st);
        let _ = self.changed.send(rv);
        rv
    }

    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let mut st = self.state.lock().expect("state");
        let Some(mut obj) =
            st.objects
                .remove(&(kind.to_owned(), namespace.to_owned(), name.to_owned()))
        else {
            return false;
        };
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let ev = Event {
            rv,
            kind: kind.into(),
            typ: "DELETED",
            object: obj,
        };
        st.log.push(ev.clone());
        let _ = self.events.send(ev);
        drop(st);
        let _ = self.changed.send(rv);
        true
    }

    /// Forget history: watches from any older resourceVersion now get 410 Gone, and open watches
    /// are told so (as the real API server does after etcd compaction).
    pub fn compact(&self) {
        let mut st = self.state.lock().expect("state");
        st.compacted = st.rv;
        st.log.clear();
        let ev = Event {
            rv: 0,
            kind: String::new(),
            typ: "GONE",
            object: Value::Null,
        };
        let _ = self.events.send(ev);
    }

    pub fn resource_version(&self) -> u64 {
        self.state.lock().expect("state").rv
    }

    fn parse(&self, path: &str) -> Option<Target> {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version, rest) = match segs.as_slice() {
            ["api", v, rest @ ..] => ("", *v, rest),
            ["apis", g, v, rest @ ..] => (*g, *v, rest),
            _ => return None,
        };
        let (namespace, plural, name) = match rest {
            ["namespaces", ns, plural] => (Some((*ns).to_owned()), *plural, None),
            ["namespaces", ns, plural, name] => {
                (Some((*ns).to_owned()), *plural, Some((*name).to_owned()))
            }
            [plural] => (None, *plural, None),
            // GET /api/v1/namespaces/NAME is a namespace object.
            [plural, name] => (None, *plural, Some((*name).to_owned())),
            _ => return None,
        };
        let st = self.state.lock().ok()?;
        let kind = st
            .kinds
            .iter()
            .find(|k| k.group == group && k.version == version && k.plural == plural)?
            .clone();
        Some(Target {
            kind,
            namespace,
            name,
        })
    }

    fn matches(t: &Target, q: &Query, kind: &str, obj: &Value) -> bool {
        kind == t.kind.kind
            && t.namespace
                .as_deref()
                .is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns))
            && q.selector.as_deref().is_none_or(|s| {
                selector_matches(
                    s,
                    obj["metadata"]["labels"]
                        .as_object()
                        .unwrap_or(&serde_json::Map::new()),
                )
            })
    }

    fn list(&self, t: &Target, q: &Query) -> Response<Body> {
        let st = self.state.lock().expect("state");
        let items: Vec<Value> = st
            .objects
            .iter()
            .filter(|((k, _, _), o)| Self::matches(t, q, k, o))
            .map(|(_, o)| o.clone())
            .collect();
        let offset: usize = q
            .cont
            .as_deref()
            .and_then(|c| c.split_once(':'))
            .and_then(|(_, o)| o.parse().ok())
            .unwrap_or(0);
        let limit = q.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let page: Vec<Value> = items.iter().skip(offset).take(limit).cloned().collect();
        let mut meta = json!({"resourceVersion": st.rv.to_string()});
        if offset + page.len() < items.len() {
            meta["continue"] = json!(format!("{}:{}", st.rv, offset + page.len()));
        }
        let api_version = if t.kind.group.is_empty() {
            t.kind.version.clone()
        } else {
            format!("{}/{}", t.kind.group, t.kind.version)
        };
        respond(
            StatusCode::OK,
            &json!({"apiVersion": api_version, "kind": format!("{}List", t.kind.kind), "metadata": meta, "items": page}),
        )
    }

    fn watch(&self, t: Target, q: Query) -> Response<Body> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(256);
        let line = |v: Value| Ok(Frame::data(Bytes::from(format!("{v}\n"))));
        let mut live = self.events.subscribe();
        let (backlog, gone, api_version) = {
            let st = self.state.lock().expect("state");
            let from = q.rv.unwrap_or(st.rv);
            let gone = from < st.compacted;
            let backlog: Vec<Event> = if gone {
                vec![]
            } else {
                st.log.iter().filter(|e| e.rv > from).cloned().collect()
            };
            let av = if t.kind.group.is_empty() {
                t.kind.version.clone()
            } else {
                format!("{}/{}", t.kind.group, t.kind.version)
            };
            (backlog, gone.then_some(from), av)
        };
        let interval = self.bookmark_interval;
        let state = self.state.clone();
        tokio::spawn(async move {
            if let Some(from) = gone {
                let _ = tx.send(line(json!({"type": "ERROR", "object": status(410, "Expired", &format!("too old resource version: {from}"))}))).await;
                return;
            }
            let mut last = 0;
            for e in backlog
                .iter()
                .filter(|e| Self::matches(&t, &q, &e.kind, &e.object))
            {
                last = e.rv;
                if tx
                    .send(line(json!({"type": e.typ, "object": e.object})))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let deadline =
                tokio::time::Instant::now() + Duration::from_secs(q.timeout.unwrap_or(1800));
            let mut ticker = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => return,
                    _ = ticker.tick(), if q.bookmarks => {
                        let rv = state.lock().map(|s| s.rv).unwrap_or(0);
                        let ev = json!({"type": "BOOKMARK", "object": {"kind": t.kind.kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}}});
                        if tx.send(line(ev)).await.is_err() { return; }
                    }
                    ev = live.recv() => match ev {
                        Ok(e) if e.typ == "GONE" => {
                            let _ = tx.send(line(json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version (compacted)")}))).await;
                            return;
                        }
                        Ok(e) if e.rv > last && Self::matches(&t, &q, &e.kind, &e.object) => {
                            last = e.rv;
                            if tx.send(line(json!({"type": e.typ, "object": e.object}))).await.is_err() { return; }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            }
        });
        let stream = tokio_stream_from(rx);
        let mut r = Response::new(StreamBody::new(stream).boxed());
        r.headers_mut()
            .insert("content-type", "application/json".parse().expect("header"));
        r
    }

    async fn handle(self, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        self.traffic.requests.fetch_add(1, Ordering::Relaxed);
        if req.version() == hyper::Version::HTTP_2 {
            self.traffic.http2_requests.fetch_add(1, Ordering::Relaxed);
        }
        let path = req.uri().path().to_owned();
        let q = query(req.uri().query());
        if path == "/version" {
            // Clients ask first (kubectl version, client-go's discovery, ferry's start).
            return Ok(respond(
                StatusCode::OK,
                &json!({
                    "major": "1", "minor": "33", "gitVersion": "v1.33.0-fake",
                    "gitCommit": "0000000000000000000000000000000000000000",
                    "gitTreeState": "clean", "buildDate": "2025-04-23T00:00:00Z",
                    "goVersion": "go1.24.2", "compiler": "gc", "platform": "linux/amd64",
                }),
            ));
        }
        let Some(t) = self.parse(&path) else {
            return Ok(respond(
                StatusCode::NOT_FOUND,
                &status(
                    404,
                    "NotFound",
                    &format!("the server could not find the requested resource ({path})"),
                ),
            ));
        };
        match (req.method().clone(), &t.name) {
            (Method::GET, None) if q.watch => Ok(self.watch(t, q)),
            (Method::GET, None) => Ok(self.list(&t, &q)),
            (Method::GET, Some(name)) => {
                let st = self.state.lock().expect("state");
                let key = (
                    t.kind.kind.clone(),
                    t.namespace.clone().unwrap_or_default(),
                    name.clone(),
                );
                Ok(match st.objects.get(&key) {
                    Some(o) => respond(StatusCode::OK, o),
                    None => respond(
                        StatusCode::NOT_FOUND,
                        &status(
                            404,
                            "NotFound",
                            &format!("{} {name:?} not found", t.kind.plural),
                        ),
                    ),
                })
            }
            (Method::POST, None) => {
                let obj = match body_json(req).await {
                    Ok(o) => o,
                    Err(r) => return Ok(r),
                };
                let obj = self.with_target(&t, obj);
                Ok(result(StatusCode::CREATED, self.create(obj).await))
            }
            (Method::PUT, Some(name)) => {
                let obj = match body_json(req).await {
                    Ok(o) => o,
                    Err(r) => return Ok(r),
                };
                let mut obj = self.with_target(&t, obj);
                obj["metadata"]["name"] = json!(name);
                Ok(result(StatusCode::OK, self.replace(obj).await))
            }
            (Method::PATCH, Some(name)) => {
                let ns = t.namespace.clone().unwrap_or_default();
                let Some(mut obj) = self.get(&t.kind.kind, &ns, name) else {
                    return Ok(respond(
                        StatusCode::NOT_FOUND,
                        &status(
                            404,
                            "NotFound",
                            &format!("{} {name:?} not found", t.kind.plural),
                        ),
                    ));
                };
                let patch = match body_json(req).await {
                    Ok(o) => o,
                    Err(r) => return Ok(r),
                };
                json_patch::merge(&mut obj, &patch);
                Ok(result(StatusCode::OK, self.replace(obj).await))
            }
            (Method::DELETE, Some(name)) => {
                let ok = self.delete(&t.kind.kind, t.namespace.as_deref().unwrap_or(""), name);
                Ok(if ok {
                    respond(
                        StatusCode::OK,
                        &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
                    )
                } else {
                    respond(StatusCode::NOT_FOUND, &status(404, "NotFound", "not found"))
                })
            }
            _ => Ok(respond(
                StatusCode::METHOD_NOT_ALLOWED,
                &status(
                    405,
                    "MethodNotAllowed",
                    "not supported by the fake API server",
                ),
            )),
        }
    }

    /// Serve on `listener` until the returned task is aborted (which also ends open watches).
    pub fn serve(&self, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let l = Arc::new(listener);
        self.serve_accepted(
            move || {
                let l = l.clone();
                async move { l.accept().await.map(|(s, _)| s) }
            },
            |s| async move { Some(s) },
        )
    }

    /// Serve on a Unix socket (the lab's command line talks to its API server this way, so the
    /// host's network namespace is never touched).
    pub fn serve_unix(&self, listener: tokio::net::UnixListener) -> tokio::task::JoinHandle<()> {
        let l = Arc::new(listener);
        self.serve_accepted(
            move || {
                let l = l.clone();
                async move { l.accept().await.map(|(s, _)| s) }
            },
            |s| async move { Some(s) },
        )
    }

    /// Serve HTTPS on `listener`, as a real API server does (it speaks only TLS), with the
    /// serving certificate `pair` (issue it for the address or name clients dial).
    pub fn serve_tls(
        &self,
        listener: TcpListener,
        pair: &crate::tls::Pair,
    ) -> Result<tokio::task::JoinHandle<()>, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("serving certificate: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes())
            .map_err(|e| format!("serving key: {e}"))?;
        let mut cfg = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| format!("TLS configuration: {e}"))?;
        // As kube-apiserver (Go's net/http): HTTP/2 when the client offers it, else HTTP/1.1.
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let l = Arc::new(listener);
        Ok(self.serve_accepted(
            move || {
                let l = l.clone();
                async move { l.accept().await.map(|(s, _)| s) }
            },
            move |s| {
                let acceptor = acceptor.clone();
                async move { acceptor.accept(s).await.ok() }
            },
        ))
    }

    /// Serve every connection `accept` yields, each on its own task, until aborted. `open` runs
    /// first on that task (a TLS handshake, or nothing), so a stalled client holds up no one;
    /// `None` drops the connection.
    fn serve_accepted<S, F, T, O>(
        &self,
        accept: impl Fn() -> F + Send + 'static,
        open: impl Fn(S) -> O + Send + 'static,
    ) -> tokio::task::JoinHandle<()>
    where
        S: Send + 'static,
        F: std::future::Future<Output = std::io::Result<S>> + Send,
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        O: std::future::Future<Output = Option<T>> + Send + 'static,
    {
        let this = self.clone();
        tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok(s) = accept().await else {
                    continue;
                };
                let (this, opening) = (this.clone(), open(s));
                conns.spawn(async move {
                    if let Some(io) = opening.await {
                        this.serve_conn(io).await;
                    }
                });
            }
        })
    }

    async fn serve_conn<S>(self, s: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        self.traffic.connections.fetch_add(1, Ordering::Relaxed);
        let svc = hyper::service::service_fn(move |req| self.clone().handle(req));
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(s), svc)
            .await;
    }

    /// The body's object with the path's namespace and kind filled in.
    fn with_target(&self, t: &Target, mut obj: Value) -> Value {
        if let Some(ns) = &t.namespace {
            obj["metadata"]["namespace"] = json!(ns);
        }
        obj["kind"] = json!(t.kind.kind);
        obj
    }

    /// Bind 127.0.0.1:0 (or a given address) and serve.
    pub async fn start(
        &self,
        addr: Option<SocketAddr>,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind(addr.unwrap_or_else(|| "127.0.0.1:0".parse().expect("addr")))
            .await
            .expect("bind");
        let a = l.local_addr().expect("addr");
        (a, self.serve(l))
    }

    /// A kubeconfig for [`FakeApiServer::serve_tls`] at `addr`: HTTPS, trusting only `ca_pem`
    /// (as a pod's in-cluster configuration trusts only the cluster's CA), no auth.
    pub fn kubeconfig_tls(addr: SocketAddr, ca_pem: &str) -> String {
        use base64::Engine;
        let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
        kubeconfig_for(
            &format!("https://{addr}"),
            &format!("\n    certificate-authority-data: {ca}"),
        )
    }

    /// A kubeconfig pointing at this server (plain HTTP, no auth).
    pub fn kubeconfig(addr: SocketAddr) -> String {
        kubeconfig_for(&format!("http://{addr}"), "")
    }
}

/// A kubeconfig for `server`; `cluster_extra` is appended to the cluster entry.
fn kubeconfig_for(server: &str, cluster_extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server}{cluster_extra}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n"
    )
}

fn tokio_stream_from(
    rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>,
) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync + 'static {
    struct S(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>);
    impl futures_core::Stream for S {
        type Item = Result<Frame<Bytes>, Infallible>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            self.0.poll_recv(cx)
        }
    }
    S(rx)
}

fn key_of(obj: &Value) -> (String, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (
        s(&obj["kind"]),
        s(&obj["metadata"]["namespace"]),
        s(&obj["metadata"]["name"]),
    )
}

async fn body_json(req: Request<Incoming>) -> Result<Value, Response<Body>> {
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let obj: Value = serde_json::from_slice(&body).map_err(|e| {
        respond(
            StatusCode::BAD_REQUEST,
            &status(400, "BadRequest", &format!("request body is not JSON: {e}")),
        )
    })?;
    if !obj.is_object() || obj["metadata"]["name"].as_str().is_none_or(str::is_empty) {
        return Err(respond(
            StatusCode::UNPROCESSABLE_ENTITY,
            &status(422, "Invalid", "metadata.name: Required value"),
        ));
    }
    Ok(obj)
}

fn result(ok: StatusCode, r: Result<Value, Value>) -> Response<Body> {
    match r {
        Ok(v) => respond(ok, &v),
        Err(st) => {
            let code = st["code"]
                .as_u64()
                .and_then(|c| StatusCode::from_u16(c as u16).ok())
                .unwrap_or(StatusCode::BAD_REQUEST);
            respond(code, &st)
        }
    }
}

/// Now as RFC 3339 (UTC, seconds), without a date library.
pub fn now_rfc3339() -> String {
    rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}

/// Seconds since the epoch as RFC 3339 (UTC).
pub fn rfc3339(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_478_399), "2026-11-23T23:59:59Z");
    }
}
