//! `ferry-init` binary: argv handling (also answers to `istio-iptables`), logging, exit codes.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use ferry_init::config::{self, Args, Config, ProcessEnv};
use ferry_init::{Error, Outcome, exec::SystemRunner, host, validate};

/// istio-iptables is invoked as `istio-iptables ARGS` (a symlink) or, in Istio's images, as
/// `pilot-agent istio-iptables ARGS`; the injector's template passes `istio-iptables` as the
/// first argument. All three forms run the same command.
fn normalized_args() -> Vec<String> {
    let mut args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("istio-iptables") {
        args.remove(1);
    }
    args
}

/// Istio's `--log_output_level` as a filter; `RUST_LOG` wins when set.
fn log_filter(levels: Option<&str>) -> String {
    std::env::var("RUST_LOG").unwrap_or_else(|_| config::istio_log_level(levels).to_owned())
}

fn main() -> ExitCode {
    let args = Args::parse_from(normalized_args());
    let json = args
        .log_as_json
        .as_deref()
        .and_then(config::parse_bool)
        .unwrap_or(false);
    let filter = tracing_subscriber::EnvFilter::new(log_filter(args.log_output_level.as_deref()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }

    if let Some(target) = &args.internal_probe_connect {
        return probe_client(
            target,
            args.internal_probe_token.as_deref().unwrap_or(""),
            args.probe_timeout.as_deref(),
        );
    }

    let started = Instant::now();
    let result = Config::from_args(&args, &ProcessEnv)
        .map_err(Error::from)
        .and_then(|cfg| {
            let facts = host::detect(&cfg)?;
            ferry_init::run(
                &cfg,
                &facts,
                &SystemRunner {
                    lock_wait_secs: cfg.xtables_wait,
                },
            )
        });
    match result {
        Ok(Outcome::DryRun(text)) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Ok(outcome) => {
            tracing::info!(
                ?outcome,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "done"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ferry-init: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn probe_client(target: &str, token: &str, timeout: Option<&str>) -> ExitCode {
    let timeout = timeout
        .and_then(config::parse_duration)
        .unwrap_or(Duration::from_secs(1));
    let Ok(addr) = target.parse() else {
        eprintln!("invalid probe address {target:?}");
        return ExitCode::from(2);
    };
    match validate::probe_connect(addr, token, timeout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
