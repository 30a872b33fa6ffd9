//! `ferry-lab`: a one-machine miniature Kubernetes cluster for the mesh (see `ferry-lab --help`).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferry_tests::lab::{Lab, LabError, cli, daemon, demo, echo};

#[derive(Parser)]
#[command(
    name = "ferry-lab",
    about = "A local mesh lab: a miniature Kubernetes cluster on this machine (network namespaces, a \
             fake API server, the real ferry-injector webhook, ferry-init and ferry-proxy) that runs \
             unmodified Kubernetes and Istio YAML. Needs root.",
    after_help = "Example:\n  ferry-lab up\n  ferry-lab apply -f app.yaml\n  ferry-lab get pods -A\n  \
                  ferry-lab exec -n canary client-xxx -- ferry-lab http http://app/ -n 100\n  ferry-lab down"
)]
struct Args {
    /// Lab name (1-8 lowercase letters/digits); several labs can run side by side
    #[arg(
        long = "name",
        id = "lab_name",
        global = true,
        env = "FERRY_LAB_NAME",
        default_value = "ferry"
    )]
    lab_name: String,
    /// Where labs keep state, sockets and logs
    #[arg(
        long,
        global = true,
        env = "FERRY_LAB_STATE_DIR",
        default_value = "/run/ferry-lab"
    )]
    state_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the lab (removes leftovers of a crashed one first)
    Up,
    /// Stop the lab and remove every namespace, process, file and rule it created
    Down,
    /// Create or update objects from multi-document YAML (`-` for stdin)
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// Delete the objects in a file, or one object by kind and name
    Delete {
        #[arg(short = 'f', long = "filename")]
        file: Option<String>,
        kind: Option<String>,
        name: Option<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// List objects: pods, svc, deploy, ns, vs, dr, endpointslices, mutatingwebhookconfigurations
    Get {
        kind: String,
        name: Option<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// All namespaces
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// wide, json or yaml
        #[arg(short = 'o', long)]
        output: Option<String>,
    },
    /// Run a command in a pod (its network namespace, DNS, user and environment)
    Exec {
        pod: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(short = 'c', long)]
        container: Option<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print a container's log
    Logs {
        pod: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(short = 'c', long)]
        container: Option<String>,
    },
    /// The README demo: canary split 90/10, header routing, what injection did; cleans up
    Demo {
        /// Leave the lab running afterwards
        #[arg(long)]
        keep: bool,
    },
    /// (internal) the lab's daemon, started by `up`
    #[command(hide = true)]
    Daemon,
    /// (container image stand-in) echo server
    #[command(hide = true)]
    Echo {
        #[arg(long)]
        pod: String,
        #[arg(long)]
        namespace: String,
        #[arg(long, default_value = "")]
        version: String,
        #[arg(long = "port", required = true)]
        ports: Vec<u16>,
        /// Answer every request with this status
        #[arg(long)]
        status: Option<u16>,
        /// Answer the first N requests with 503
        #[arg(long, default_value = "0")]
        fail_first: u32,
    },
    /// Send N HTTP GETs over a keep-alive connection and tally the echo servers' answers
    Http {
        url: String,
        #[arg(short = 'n', long, default_value = "1")]
        count: u64,
        /// Extra request header, `Name: value`
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// Print the tally as JSON
        #[arg(long)]
        json: bool,
        /// HTTP/2 with prior knowledge (h2c)
        #[arg(long)]
        http2: bool,
        /// Connections used at once
        #[arg(short = 'c', long, default_value = "1")]
        concurrency: u64,
        /// Request method
        #[arg(short = 'X', long, default_value = "GET")]
        method: String,
    },
    /// Send one line over TCP and print the answer's first line
    Tcp { target: String, line: String },
}

fn runtime() -> Result<tokio::runtime::Runtime, LabError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ferry_tests::lab::io_err("starting the runtime"))
}

fn read_source(file: &str) -> Result<String, LabError> {
    if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(ferry_tests::lab::io_err("reading stdin"))?;
        return Ok(s);
    }
    std::fs::read_to_string(file).map_err(ferry_tests::lab::io_err(format!("reading {file}")))
}

fn run(args: Args) -> Result<Option<String>, LabError> {
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_default();
    let lab = Lab::new(&args.lab_name, Some(&args.state_dir), bin_dir)?;
    let mut progress = |m: &str| eprintln!("  … {m}");
    match args.cmd {
        Cmd::Up => cli::up(&lab, &mut progress).map(Some),
        Cmd::Down => cli::down(&lab, &mut progress).map(Some),
        Cmd::Daemon => daemon::run(lab).map(|()| None),
        Cmd::Apply { file, namespace } => {
            let text = read_source(&file)?;
            runtime()?
                .block_on(cli::apply(&lab, &text, &file, &namespace))
                .map(Some)
        }
        Cmd::Delete {
            file,
            kind,
            name,
            namespace,
        } => {
            let rt = runtime()?;
            match (file, kind, name) {
                (Some(f), None, None) => {
                    let text = read_source(&f)?;
                    rt.block_on(cli::delete_file(&lab, &text, &f, &namespace))
                        .map(Some)
                }
                (None, Some(k), Some(n)) => {
                    rt.block_on(cli::delete(&lab, &k, &n, &namespace)).map(Some)
                }
                _ => Err(LabError::Invalid(
                    "delete: give -f FILE, or KIND NAME".into(),
                )),
            }
        }
        Cmd::Get {
            kind,
            name,
            namespace,
            all_namespaces,
            output,
        } => runtime()?.block_on(async {
            let items = match &name {
                Some(n) => vec![cli::get_one(&lab, &kind, n, &namespace).await?],
                None => {
                    cli::list(&lab, &kind, (!all_namespaces).then_some(namespace.as_str())).await?
                }
            };
            let one = |v: Vec<serde_json::Value>| {
                if name.is_some() {
                    v.into_iter().next().unwrap_or_default()
                } else {
                    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": v})
                }
            };
            match output.as_deref() {
                Some("json") => Ok(Some(
                    serde_json::to_string_pretty(&one(items)).unwrap_or_default(),
                )),
                Some("yaml") => Ok(Some(serde_yaml::to_string(&one(items)).unwrap_or_default())),
                Some("wide") => cli::render_table(&kind, &items, all_namespaces, true).map(Some),
                None => cli::render_table(&kind, &items, all_namespaces, false).map(Some),
                Some(o) => Err(LabError::Invalid(format!("-o {o}: use wide, json or yaml"))),
            }
        }),
        Cmd::Exec {
            pod,
            namespace,
            container,
            command,
        } => {
            let mut c = runtime()?.block_on(cli::exec_command(
                &lab,
                &pod,
                &namespace,
                container.as_deref(),
                &command,
            ))?;
            let st = c.status().map_err(ferry_tests::lab::io_err("exec"))?;
            std::process::exit(st.code().unwrap_or(1));
        }
        Cmd::Logs {
            pod,
            namespace,
            container,
        } => {
            let text =
                runtime()?.block_on(cli::logs(&lab, &pod, &namespace, container.as_deref()))?;
            print!("{text}");
            Ok(None)
        }
        Cmd::Demo { keep } => demo::run(&lab, keep).map(|()| None),
        Cmd::Echo {
            pod,
            namespace,
            version,
            ports,
            status,
            fail_first,
        } => runtime()?
            .block_on(echo::serve(
                echo::Identity {
                    pod,
                    namespace,
                    version,
                },
                echo::Behaviour { status, fail_first },
                &ports,
            ))
            .map(|()| None),
        Cmd::Http {
            url,
            count,
            headers,
            json,
            http2,
            concurrency,
            method,
        } => {
            let headers = headers
                .iter()
                .map(|h| {
                    h.split_once(':')
                        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                        .ok_or_else(|| {
                            LabError::Invalid(format!("header {h:?}: use `Name: value`"))
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let t = runtime()?.block_on(echo::load_opts(
                &url,
                &echo::LoadOptions {
                    requests: count,
                    headers,
                    http2,
                    concurrency,
                    method,
                },
            ))?;
            if json {
                return Ok(Some(serde_json::to_string(&t).unwrap_or_default()));
            }
            if count == 1 && t.errors == 0 {
                return Ok(Some(t.last_body.trim_end().to_owned()));
            }
            Ok(Some(format!(
                "{} requests: {} ok, {} errors{}\nby version: {:?}\nby pod: {:?}\nstatuses: {:?}",
                t.requests,
                t.ok,
                t.errors,
                t.first_error
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default(),
                t.by_version,
                t.by_pod,
                t.statuses
            )))
        }
        Cmd::Tcp { target, line } => runtime()?
            .block_on(echo::tcp_line(&target, &line))
            .map(Some),
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
