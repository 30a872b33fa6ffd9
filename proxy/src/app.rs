//! Wiring: bind every listener (failing clearly if one is taken), keep the discovery snapshot
//! current, serve, and drain on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::admin::{self, Admin, Port, Quit, Readiness};
use crate::config::Config;
use crate::discovery::{self, Snapshot};
use crate::metrics::Metrics;
use crate::proxy::{Direction, Proxy};
use crate::transport::OrigDst;

/// Starting failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes discovery: {0}")]
    Kube(String),
    #[error("binding {what} on {addr}: {source} (is another proxy running in this pod?)")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, Error> {
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(|source| Error::Bind { what, addr, source })?;
    let _ = sock.set_reuseaddr(true);
    sock.bind(addr)
        .map_err(|source| Error::Bind { what, addr, source })?;
    sock.listen(1024)
        .map_err(|source| Error::Bind { what, addr, source })
}

/// A running proxy's handles, for tests and `main`.
pub struct Running {
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub addrs: Addrs,
    pub done: tokio::task::JoinHandle<()>,
}

/// Where each listener ended up (ports may be 0 in tests).
#[derive(Clone, Copy, Debug)]
pub struct Addrs {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub health: SocketAddr,
    pub prometheus: SocketAddr,
    pub agent: SocketAddr,
    pub admin: SocketAddr,
}

/// Re-read the configuration directory if it changed. `Some(objects)` when there is something new.
fn poll_dir(
    cfg: &Config,
    metrics: &Metrics,
    last: &mut Option<std::time::SystemTime>,
) -> Result<Option<Vec<serde_json::Value>>, ()> {
    let Some(dir) = &cfg.config_dir else {
        return Ok(None);
    };
    // Only stat on each tick: parsing a large directory twice a second costs CPU for nothing.
    let read = discovery::dir_files(dir).and_then(|(files, newest)| {
        if newest.is_some() && newest == *last {
            return Ok(None);
        }
        let objects = discovery::read_files(&files)?;
        *last = newest;
        Ok(Some(objects))
    });
    read.map_err(|e| {
        metrics.config_rejected.inc();
        error!(error = %e, "configuration update refused; still serving the previous snapshot");
    })
}

/// Bind, start serving, and return handles. The proxy drains and stops when `shutdown` flips.
pub async fn start(
    cfg: Config,
    orig_dst: OrigDst,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Running, Error> {
    let kube_client = match &cfg.kube {
        Some(path) => Some(
            crate::k8s::client(path.as_deref())
                .await
                .map_err(Error::Kube)?,
        ),
        None => None,
    };
    let cfg = Arc::new(cfg);
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    for b in [
        "outbound listener",
        "inbound listener",
        "initial configuration sync",
    ] {
        readiness.block(b);
    }
    let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot::default()));
    let (drain_tx, drain_rx) = watch::channel(false);
    let (quit_tx, mut quit_rx) = watch::channel(None);
    let any = |p: u16| SocketAddr::from(([0, 0, 0, 0], p));
    let outbound = bind("outbound listener", any(cfg.ports.outbound)).await?;
    let inbound = bind("inbound listener", any(cfg.ports.inbound)).await?;
    let health = bind("health port", any(cfg.ports.health)).await?;
    let prometheus = bind("prometheus port", any(cfg.ports.prometheus)).await?;
    let agent = bind("agent port", any(cfg.ports.status)).await?;
    let admin_l = bind("admin port", cfg.ports.admin).await?;
    let local = |l: &TcpListener, fallback| l.local_addr().unwrap_or(fallback);
    let addrs = Addrs {
        outbound: local(&outbound, any(0)),
        inbound: local(&inbound, any(0)),
        health: local(&health, any(0)),
        prometheus: local(&prometheus, any(0)),
        agent: local(&agent, any(0)),
        admin: local(&admin_l, cfg.ports.admin),
    };
    readiness.unblock("outbound listener");
    readiness.unblock("inbound listener");

    let admin = Arc::new(Admin {
        cfg: cfg.clone(),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        snapshot: snap_rx.clone(),
        quit: quit_tx,
    });
    let admin_tasks = vec![
        tokio::spawn(admin::serve_port(admin.clone(), Port::Health, health)),
        tokio::spawn(admin::serve_port(
            admin.clone(),
            Port::Prometheus,
            prometheus,
        )),
        tokio::spawn(admin::serve_port(admin.clone(), Port::Agent, agent)),
        tokio::spawn(admin::serve_port(admin.clone(), Port::Admin, admin_l)),
    ];

    // Discovery: files and/or the Kubernetes API, merged into one snapshot. Readiness waits for
    // the first complete read of every source.
    let poller = {
        let (cfg, metrics, readiness) = (cfg.clone(), metrics.clone(), readiness.clone());
        tokio::spawn(async move {
            let (watched, kube_changed) = match kube_client {
                Some(c) => {
                    // A gateway reads the TLS Secrets of its own namespace (credentialName).
                    let secrets = cfg.router.then(|| cfg.pod_namespace.clone());
                    let (w, n) = crate::k8s::watch_all(c, secrets.as_deref()).await;
                    (w, Some(n))
                }
                None => (Vec::new(), None),
            };
            if cfg.config_dir.is_none() && watched.is_empty() {
                warn!(
                    "no discovery source (--config-dir or Kubernetes): every destination is unknown (the outbound policy applies)"
                );
            }
            let (mut last, mut version, mut files, mut files_synced) =
                (None, 0u64, Vec::new(), cfg.config_dir.is_none());
            let mut dirty = true;
            loop {
                match poll_dir(&cfg, &metrics, &mut last) {
                    Ok(Some(objects)) => {
                        files = objects;
                        files_synced = true;
                        dirty = true;
                    }
                    Ok(None) => {}
                    Err(()) => {}
                }
                let kube_synced = watched.iter().all(|w| *w.synced.borrow());
                if dirty && files_synced {
                    version += 1;
                    let mut objects = files.clone();
                    for w in &watched {
                        objects.extend(w.objects());
                    }
                    let mut snap = Snapshot::build_for(
                        version,
                        &objects,
                        &cfg.cluster_domain,
                        Some(&cfg.pod_namespace),
                    );
                    if cfg.router {
                        snap = snap.with_gateway(
                            &cfg.instance_ips,
                            &cfg.pod_namespace,
                            &cfg.cluster_domain,
                        );
                    }
                    snap.compact();
                    for r in &snap.rejected {
                        warn!(object = %r, "object ignored");
                    }
                    info!(
                        version,
                        services = snap.services.len(),
                        "configuration snapshot updated"
                    );
                    metrics.config_version.set(version as i64);
                    metrics.gateway_server_errors.set(
                        snap.gateway
                            .as_ref()
                            .map_or(0, |g| g.server_errors.len() as i64),
                    );
                    // The previous snapshot is dropped here (unless a request still holds it).
                    snap_tx.send_replace(Arc::new(snap));
                    crate::os::release_free_memory();
                    dirty = false;
                }
                if files_synced && kube_synced && version > 0 {
                    readiness.unblock("initial configuration sync");
                }
                let tick = tokio::time::sleep(Duration::from_millis(500));
                match &kube_changed {
                    Some(n) => tokio::select! {
                        _ = tick => {}
                        _ = n.notified() => {
                            // Coalesce bursts (a relist delivers many events at once).
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            dirty = true;
                        }
                    },
                    None => tick.await,
                }
            }
        })
    };

    let proxy = Arc::new(Proxy::new(
        cfg.clone(),
        snap_rx.clone(),
        metrics.clone(),
        orig_dst,
        drain_rx,
    ));
    let accept = |l: TcpListener, dir: Direction, proxy: Arc<Proxy>| {
        tokio::spawn(async move {
            loop {
                match l.accept().await {
                    Ok((s, peer)) => {
                        match dir {
                            Direction::Inbound => proxy.metrics.inbound_connections.inc(),
                            _ => proxy.metrics.outbound_connections.inc(),
                        };
                        tokio::spawn(proxy.clone().handle(dir, s, peer));
                    }
                    Err(e) => warn!(error = %e, "accept failed"),
                }
            }
        })
    };
    let out_task = accept(outbound, Direction::Outbound, proxy.clone());
    let in_task = match cfg.router {
        // A gateway listens where its Gateways' servers say, following configuration changes.
        true => tokio::spawn(gateway_listeners(snap_rx.clone(), proxy.clone())),
        false => accept(inbound, Direction::Inbound, proxy.clone()),
    };
    info!(?addrs, workers = cfg.workers, "proxy serving");

    let done = {
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let exit_now = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => false,
                _ = quit_rx.wait_for(|q| *q == Some(Quit::Exit)) => true,
            };
            // Fail readiness, stop taking inbound connections, close HTTP connections gracefully,
            // keep the outbound listener so the app can finish what it is doing.
            readiness.drain();
            in_task.abort();
            let _ = drain_tx.send(true);
            let deadline = if exit_now {
                Duration::from_secs(1)
            } else {
                cfg.drain
            };
            info!(
                open = proxy.active.count(),
                deadline_ms = deadline.as_millis() as u64,
                "draining"
            );
            if tokio::time::timeout(deadline, proxy.active.idle())
                .await
                .is_err()
            {
                warn!(
                    open = proxy.active.count(),
                    "drain deadline passed with connections still open"
                );
            }
            out_task.abort();
            poller.abort();
            for t in admin_tasks {
                t.abort();
            }
            info!("proxy stopped");
        })
    };
    Ok(Running {
        readiness,
        metrics,
        snapshot: snap_rx,
        addrs,
        done,
    })
}

/// Keep one listener per port of the Gateways that select this proxy: new ports are bound,
/// removed ones closed (connections already accepted finish). A port that cannot be bound is
/// logged and retried on the next change; the other ports keep serving.
async fn gateway_listeners(
    mut snaps: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    proxy: Arc<Proxy>,
) {
    let mut open: std::collections::BTreeMap<u16, tokio::task::JoinHandle<()>> =
        std::collections::BTreeMap::new();
    loop {
        let wanted: Vec<u16> = snaps
            .borrow()
            .gateway
            .as_ref()
            .map(|g| g.servers.keys().copied().collect())
            .unwrap_or_default();
        open.retain(|port, task| {
            let keep = wanted.contains(port);
            if !keep {
                info!(
                    port,
                    "gateway port no longer declared: closing its listener"
                );
                task.abort();
            }
            keep
        });
        for port in wanted {
            if open.contains_key(&port) {
                continue;
            }
            match bind("gateway port", SocketAddr::from(([0, 0, 0, 0], port))).await {
                Ok(l) => {
                    info!(port, "gateway listening");
                    let proxy = proxy.clone();
                    open.insert(
                        port,
                        tokio::spawn(async move {
                            loop {
                                match l.accept().await {
                                    Ok((s, peer)) => {
                                        tokio::spawn(proxy.clone().handle(
                                            Direction::Gateway,
                                            s,
                                            peer,
                                        ));
                                    }
                                    Err(e) => warn!(error = %e, "accept failed"),
                                }
                            }
                        }),
                    );
                }
                Err(e) => warn!(port, error = %e, "gateway port not served"),
            }
        }
        if snaps.changed().await.is_err() {
            return;
        }
    }
}
