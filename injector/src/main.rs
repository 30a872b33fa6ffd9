//! `ferry-injector`: `serve` (the webhook), `inject` (offline, like `istioctl kube-inject`),
//! `explain` (why a pod would or would not be injected).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use ferry_injector::config::Config;
use ferry_injector::{offline, server};

#[derive(Parser)]
#[command(
    name = "ferry-injector",
    version,
    about = "Istio-compatible sidecar injection that explains its decisions"
)]
struct Cli {
    /// Log filter (RUST_LOG syntax), e.g. info or ferry_injector=debug
    #[arg(long, global = true, default_value = "info", env = "FERRY_LOG")]
    log: String,
    /// Log as JSON lines
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the mutating admission webhook over HTTPS (POST /inject, GET /healthz/ready, GET /metrics)
    Serve {
        /// Configuration file (YAML); reloaded when it changes, a bad update is refused
        #[arg(long, env = "FERRY_INJECTOR_CONFIG")]
        config: Option<PathBuf>,
        /// Serving certificate chain (PEM); reloaded when it changes
        #[arg(long, env = "FERRY_TLS_CERT", default_value = "/etc/ferry/tls/tls.crt")]
        tls_cert: PathBuf,
        /// Serving private key (PEM)
        #[arg(long, env = "FERRY_TLS_KEY", default_value = "/etc/ferry/tls/tls.key")]
        tls_key: PathBuf,
        #[arg(long, env = "FERRY_LISTEN", default_value = "0.0.0.0:9443")]
        listen: SocketAddr,
        /// How often certificate and configuration files are checked for changes (seconds)
        #[arg(long, default_value = "2")]
        reload_interval: f64,
        /// How long in-flight reviews may take after SIGTERM (seconds)
        #[arg(long, default_value = "10")]
        drain: f64,
        /// Manage the serving certificate: a CA and certificate kept in --tls-secret, renewed
        /// before expiry, written to --tls-cert/--tls-key, and every caBundle of
        /// --webhook-config kept equal to the CA (uses the pod's service account or KUBECONFIG)
        #[arg(long, requires_all = ["tls_secret", "webhook_config", "dns_names"])]
        self_signed_tls: bool,
        /// Secret (in --namespace) holding the CA and serving certificate
        #[arg(long)]
        tls_secret: Option<String>,
        /// MutatingWebhookConfiguration whose caBundles are kept in sync
        #[arg(long)]
        webhook_config: Option<String>,
        /// DNS name(s) of the webhook Service, e.g. ferry-injector.ferry-system.svc
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
        /// Seconds between checks of the Secret and the caBundles
        #[arg(long, default_value = "60")]
        tls_check_interval: f64,
        /// Namespace of --tls-secret
        #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
        namespace: String,
    },
    /// Inject Pods and workloads from a file (`-` for stdin), like `istioctl kube-inject`
    Inject {
        #[arg(short = 'f', long = "filename")]
        file: String,
        #[arg(long)]
        config: Option<PathBuf>,
        /// Write here instead of stdout
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Explain whether and why a pod (or a workload's pod template) would be injected
    Explain {
        #[arg(short = 'f', long = "filename")]
        file: String,
        #[arg(long)]
        config: Option<PathBuf>,
        /// The namespace's labels, e.g. istio-injection=enabled,team=a
        #[arg(long, value_delimiter = ',')]
        namespace_labels: Vec<String>,
        /// The namespace (default: the object's, else "default")
        #[arg(long)]
        namespace: Option<String>,
    },
}

fn read_input(file: &str) -> anyhow::Result<String> {
    if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {file}"))
    }
}

fn load_config(path: &Option<PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if cli.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-injector: {e:#}");
            // Configuration problems are usage errors (64); everything else is a runtime failure.
            let config_error = e
                .chain()
                .any(|c| c.downcast_ref::<ferry_injector::config::Error>().is_some());
            ExitCode::from(if config_error { 64 } else { 1 })
        }
    }
}

fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Serve {
            config,
            tls_cert,
            tls_key,
            listen,
            reload_interval,
            drain,
            self_signed_tls,
            tls_secret,
            webhook_config,
            dns_names,
            tls_check_interval,
            namespace,
        } => {
            if !(reload_interval > 0.0 && drain >= 0.0 && tls_check_interval >= 1.0) {
                bail!("--reload-interval must be > 0, --drain >= 0 and --tls-check-interval >= 1");
            }
            let managed = self_signed_tls.then(|| ferry_injector::selfsigned::Settings {
                namespace,
                secret: tls_secret.unwrap_or_default(),
                webhook_config: webhook_config.unwrap_or_default(),
                dns_names,
                cert_path: tls_cert.clone(),
                key_path: tls_key.clone(),
                interval: Duration::from_secs_f64(tls_check_interval),
            });
            // Fail on a bad config before anything binds.
            load_config(&config)?;
            let settings = server::Settings {
                listen,
                config_path: config,
                cert_path: tls_cert,
                key_path: tls_key,
                reload_interval: Duration::from_secs_f64(reload_interval),
                drain: Duration::from_secs_f64(drain),
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(async move {
                let (tx, rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
                    }
                    tracing::info!("shutdown signal received");
                    let _ = tx.send(true);
                });
                if let Some(m) = managed {
                    let client = kube::Client::try_default()
                        .await
                        .context("--self-signed-tls needs the Kubernetes API (in-cluster or KUBECONFIG)")?;
                    tracing::info!(secret = %format!("{}/{}", m.namespace, m.secret), webhook = %m.webhook_config, "managing the webhook certificate; waiting for the first one");
                    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
                    tokio::spawn(ferry_injector::selfsigned::run(client, m, first_tx));
                    first_rx.await.context("certificate manager stopped")?;
                }
                server::run(settings, rx).await.map_err(anyhow::Error::from)
            })?;
            Ok(())
        }
        Command::Inject {
            file,
            config,
            output,
        } => {
            let cfg = load_config(&config)?;
            let docs = offline::parse_documents(&read_input(&file)?)?;
            let (docs, notes) = offline::inject_documents(&cfg, docs)?;
            for n in notes {
                eprintln!("{n}");
            }
            let text = offline::to_yaml(&docs);
            match output {
                Some(p) => {
                    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?
                }
                None => print!("{text}"),
            }
            Ok(())
        }
        Command::Explain {
            file,
            config,
            namespace_labels,
            namespace,
        } => {
            let cfg = load_config(&config)?;
            let mut labels = BTreeMap::new();
            for kv in namespace_labels.iter().filter(|s| !s.is_empty()) {
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("--namespace-labels: {kv:?} is not key=value"))?;
                labels.insert(k.to_owned(), v.to_owned());
            }
            let docs = offline::parse_documents(&read_input(&file)?)?;
            if docs.is_empty() {
                bail!("{file}: no object found");
            }
            for d in &docs {
                print!(
                    "{}",
                    offline::explain(&cfg, d, &labels, namespace.as_deref())?
                );
            }
            Ok(())
        }
    }
}
