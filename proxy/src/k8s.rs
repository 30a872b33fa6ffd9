//! Discovery from the Kubernetes API: kube-rs watchers (list, then watch from the list's
//! resourceVersion, bookmarks, relist on 410 Gone, exponential backoff on errors) feeding
//! reflector stores, compiled into a new snapshot on every change. While the API server is away
//! the last snapshot keeps serving.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
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
    read: Box<dyn Fn() -> Vec<Value> + Send + Sync>,
    pub synced: tokio::sync::watch::Receiver<bool>,
}

impl Watched {
    pub fn objects(&self) -> Vec<Value> {
        (self.read)()
    }
}

fn to_values<K: serde::Serialize + Clone + kube::Resource + 'static>(
    store: &Store<K>,
    kind: &str,
    api_version: &str,
) -> Vec<Value>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    store
        .state()
        .iter()
        .filter_map(|o| {
            let mut v = serde_json::to_value(o.as_ref()).ok()?;
            // Dynamic objects from a list may lack their type; the snapshot dispatches on kind.
            if let Some(m) = v.as_object_mut() {
                m.entry("kind")
                    .or_insert_with(|| Value::String(kind.to_owned()));
                m.entry("apiVersion")
                    .or_insert_with(|| Value::String(api_version.to_owned()));
            }
            Some(v)
        })
        .collect()
}

fn spawn_watch<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    kind: String,
    changed: Arc<Notify>,
    synced: tokio::sync::watch::Sender<bool>,
    optional: bool,
) where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Send + Sync,
{
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
}

/// Start watching everything the proxy needs; returns the watched kinds and a change signal.
pub fn watch_all(client: Client, secrets_in: Option<&str>) -> (Vec<Watched>, Arc<Notify>) {
    let changed = Arc::new(Notify::new());
    let mut out = Vec::new();

    macro_rules! typed {
        ($ty:ty, $kind:expr, $av:expr) => {{
            let (reader, writer) = reflector::store::<$ty>();
            let (tx, rx) = tokio::sync::watch::channel(false);
            spawn_watch(
                Api::<$ty>::all(client.clone()),
                writer,
                $kind.to_owned(),
                changed.clone(),
                tx,
                false,
            );
            out.push(Watched {
                kind: $kind.into(),
                read: Box::new(move || to_values(&reader, $kind, $av)),
                synced: rx,
            });
        }};
    }
    typed!(Service, "Service", "v1");
    typed!(EndpointSlice, "EndpointSlice", "discovery.k8s.io/v1");
    typed!(Pod, "Pod", "v1");
    if let Some(ns) = secrets_in {
        let (reader, writer) = reflector::store::<Secret>();
        let (tx, rx) = tokio::sync::watch::channel(false);
        spawn_watch(
            Api::<Secret>::namespaced(client.clone(), ns),
            writer,
            "Secret".to_owned(),
            changed.clone(),
            tx,
            false,
        );
        out.push(Watched {
            kind: "Secret".into(),
            read: Box::new(move || to_values(&reader, "Secret", "v1")),
            synced: rx,
        });
    }
    for kind in ISTIO_KINDS {
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("networking.istio.io", "v1", kind));
        let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
        let reader = writer.as_reader();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        spawn_watch(api, writer, (*kind).to_owned(), changed.clone(), tx, true);
        let av = "networking.istio.io/v1";
        let k = (*kind).to_owned();
        out.push(Watched {
            kind: k.clone(),
            read: Box::new(move || to_values(&reader, &k, av)),
            synced: rx,
        });
    }
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
    let mut config = config;
    config.read_timeout = Some(Duration::from_secs(330));
    Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
}
