//! Discovery from the Kubernetes API: kube-rs watchers (list, then watch from the list's
//! resourceVersion, bookmarks, relist on 410 Gone, exponential backoff on errors) feeding
//! reflector stores, compiled into a new snapshot on every change. While the API server is away
//! the last snapshot keeps serving.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde_json::Value;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

/// The Istio kinds the proxy reads (the routing layer consumes them).
pub const ISTIO_KINDS: &[&str] = &["VirtualService", "DestinationRule", "Gateway"];

/// One watched kind: its store, and whether its initial list completed.
pub struct Watched {
    pub kind: String,
    store: Store<DynamicObject>,
    api_version: String,
    pub synced: tokio::sync::watch::Receiver<bool>,
}

impl Watched {
    /// The kind's objects as JSON, each with its `kind` and `apiVersion` (list items may lack
    /// them; the snapshot dispatches on kind).
    pub fn objects(&self) -> Vec<Value> {
        self.store
            .state()
            .iter()
            .filter_map(|o| {
                let mut v = serde_json::to_value(o.as_ref()).ok()?;
                if let Some(m) = v.as_object_mut() {
                    m.entry("kind")
                        .or_insert_with(|| Value::String(self.kind.clone()));
                    m.entry("apiVersion")
                        .or_insert_with(|| Value::String(self.api_version.clone()));
                }
                Some(v)
            })
            .collect()
    }
}

/// What to watch: a kind, where, and whether a 404 (CRD not installed) means "none".
struct Watch<'a> {
    group: &'a str,
    kind: &'a str,
    namespace: Option<&'a str>,
    optional: bool,
}

/// Every kind is watched untyped (`DynamicObject`): the snapshot consumes JSON values anyway,
/// and one watcher instantiation instead of one per Kubernetes type keeps kube-rs's and
/// k8s-openapi's generated code out of the binary's resident pages (idle RSS is mostly code).
fn spawn_watch(client: &Client, w: &Watch<'_>, changed: Arc<Notify>) -> Watched {
    let gvk = GroupVersionKind::gvk(w.group, "v1", w.kind);
    let ar = ApiResource::from_gvk(&gvk);
    let api: Api<DynamicObject> = match w.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
    let store = writer.as_reader();
    let (synced, synced_rx) = tokio::sync::watch::channel(false);
    let kind = w.kind.to_owned();
    let optional = w.optional;
    tokio::spawn(async move {
        let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
            .default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut failures = 0u32;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::InitDone) => {
                    if !*synced.borrow() {
                        info!(%kind, "initial list synced");
                    }
                    failures = 0;
                    let _ = synced.send(true);
                    changed.notify_one();
                }
                Ok(watcher::Event::Init) => debug!(%kind, "relisting"),
                Ok(_) => {
                    failures = 0;
                    changed.notify_one();
                }
                Err(e) => {
                    failures += 1;
                    // 404: the API server does not serve this resource (e.g. a CRD not installed).
                    let missing = format!("{e:?}").contains("code: 404");
                    if missing && optional {
                        // The CRD is not installed: nothing of that kind exists. Do not hold readiness.
                        if !*synced.borrow() {
                            info!(%kind, "resource not served by the API server (CRD not installed?); treating it as empty");
                            let _ = synced.send(true);
                            changed.notify_one();
                        }
                    } else if failures == 1 || failures.is_multiple_of(10) {
                        warn!(%kind, error = %e, failures, "watch failed; retrying with backoff, still serving the last snapshot");
                    }
                }
            }
        }
    });
    Watched {
        kind: w.kind.to_owned(),
        store,
        api_version: ar.api_version,
        synced: synced_rx,
    }
}

/// Start watching everything the proxy needs; returns the watched kinds and a change signal.
pub async fn watch_all(client: Client, secrets_in: Option<&str>) -> (Vec<Watched>, Arc<Notify>) {
    // One request first, so that the watches below find its HTTP/2 connection in the client's
    // pool: started together on an empty pool, each would open a connection of its own. It also
    // says early whether the API server answers; the watches retry on their own either way.
    match tokio::time::timeout(Duration::from_secs(5), client.apiserver_version()).await {
        Ok(Ok(v)) => info!(version = %v.git_version, "Kubernetes API server"),
        Ok(Err(e)) => warn!("Kubernetes API server version: {e} (watching anyway)"),
        Err(_) => warn!("Kubernetes API server: no answer in 5s (watching anyway)"),
    }
    let changed = Arc::new(Notify::new());
    let core = |group, kind| Watch {
        group,
        kind,
        namespace: None,
        optional: false,
    };
    let mut watches = vec![
        core("", "Service"),
        core("discovery.k8s.io", "EndpointSlice"),
        core("", "Pod"),
    ];
    if let Some(ns) = secrets_in {
        watches.push(Watch {
            namespace: Some(ns),
            ..core("", "Secret")
        });
    }
    for kind in ISTIO_KINDS {
        watches.push(Watch {
            optional: true,
            ..core("networking.istio.io", kind)
        });
    }
    let out = watches
        .iter()
        .map(|w| spawn_watch(&client, w, changed.clone()))
        .collect();
    (out, changed)
}

/// Build a client from a kubeconfig file, or in-cluster configuration.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, String> {
    let config = match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .map_err(|e| format!("reading kubeconfig {}: {e}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", p.display()))?
        }
        None => kube::Config::incluster()
            .map_err(|e| format!("in-cluster Kubernetes configuration: {e}"))?,
    };
    build_client(config)
}

/// kube-rs's default client stack, except that it offers HTTP/2 to the API server (ALPN), as
/// client-go does: every watch is then a stream of one connection, where kube-rs's HTTP/1.1
/// client opens one TLS connection per watch (six per sidecar, each with its own buffers and
/// API server connection). A server without HTTP/2 gets HTTP/1.1 as before. Everything else as
/// kube-rs's `Client::try_from`: TLS settings, `tls-server-name`, auth, extra headers, retries of
/// throttled requests, timeouts.
fn build_client(config: kube::Config) -> Result<Client, String> {
    use kube::client::ConfigExt;
    let err = |e: kube::Error| format!("Kubernetes client: {e}");
    if let Some(proxy) = &config.proxy_url {
        // kube-rs as built here has no proxy support either; say so rather than go direct.
        return Err(format!(
            "Kubernetes client: the kubeconfig's proxy-url {proxy} is not supported"
        ));
    }
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(config.connect_timeout);
    let mut https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config.rustls_client_config().map_err(err)?)
        .https_or_http();
    if let Some(name) = &config.tls_server_name {
        let name = rustls_pki_types::ServerName::try_from(name.clone())
            .map_err(|e| format!("Kubernetes client: tls-server-name {name:?}: {e}"))?;
        https = https.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name));
    }
    let https = https.enable_http1().enable_http2().wrap_connector(http);
    let mut timed = hyper_timeout::TimeoutConnector::new(https);
    // A watch is silent between events; a bookmark comes at least once a minute, so a read
    // timeout well beyond the server's watch timeout (kube-runtime asks for 290 s) only ends a
    // dead connection (the watcher then re-lists).
    timed.set_read_timeout(Some(Duration::from_secs(330)));
    timed.set_write_timeout(config.write_timeout);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(timed);
    let retry = config
        .default_retry
        .then(|| tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry()));
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(retry)
        .option_layer(config.auth_layer().map_err(err)?)
        .layer(config.extra_headers_layer().map_err(err)?)
        .map_err(tower::BoxError::from)
        .service(client);
    Ok(Client::new(service, config.default_namespace))
}
