//! `ferry-init`: the `istio-init` container. A drop-in for Istio's `istio-iptables` that installs
//! a pod's capture rules atomically and idempotently, and can prove they work.
//!
//! Module map:
//! - [`spec`]: Istio's ports, UIDs and chain names, named once for the whole workspace.
//! - [`config`]: istio-iptables' flags and environment → validated [`config::Config`].
//! - [`generate`]: `Config` + namespace facts → rule [`rules::Plan`], in Istio's order (pure).
//! - [`rules`]: the rule builder and its texts: restore input, `-C` checks, cleanup sequence.
//! - [`state`]: `iptables-save` parsing and the part of it that is ours.
//! - [`apply`]: state probe, atomic apply, rollback, reconcile, cleanup.
//! - [`host`]: IPv6 detection, resolv.conf, `ip` routes and addresses.
//! - [`validate`]: `--run-validation`, the self-test.
//! - [`exec`]: the [`exec::Runner`] trait between all of the above and the real binaries.

pub mod apply;
pub mod config;
pub mod exec;
pub mod generate;
pub mod host;
pub mod rules;
pub mod spec;
pub mod state;
pub mod validate;

#[cfg(any(test, feature = "test-util"))]
pub mod test_util;

use tracing::{info, warn};

use crate::config::{Backend, Config};
use crate::exec::{Invocation, Runner};
use crate::generate::Facts;
use crate::rules::Family;
use crate::state::Saved;

/// Anything that stops a run, with the exit code the binary uses for it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Host(#[from] host::Error),
    #[error(transparent)]
    Apply(#[from] apply::Error),
    #[error("no usable iptables found: tried {tried}")]
    NoIptables { tried: String },
    #[error(transparent)]
    Validation(#[from] validate::Error),
}

impl Error {
    /// 64 for bad configuration, 126 for failed validation (Istio's code), 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) => 64,
            Error::Validation(validate::Error::Failed(_)) => spec::VALIDATION_EXIT_CODE,
            _ => 1,
        }
    }
}

/// Pick the backend for a family as Istio does: legacy if it already holds rules, else nft if it
/// works, else plain `iptables`. `--force-iptables-binary` overrides.
pub fn select_backend(cfg: &Config, runner: &dyn Runner, family: Family) -> Result<Backend, Error> {
    if let Some(b) = cfg.force_backend {
        return Ok(b);
    }
    let mut denied = None;
    let mut save = |b: Backend| {
        let inv = Invocation::save(family);
        let out = runner.iptables(b, &inv).ok()?;
        if out.success {
            return Some(out.stdout);
        }
        // A tool that exists but may not read the tables means missing privileges, not a
        // missing backend: remember it so the error says so.
        if let apply::Error::Permission { stderr, .. } = apply::classify(&inv, &out) {
            let command = exec::binary(b, family, exec::Tool::Save);
            denied.get_or_insert(apply::Error::Permission { command, stderr });
        }
        None
    };
    if let Some(out) = save(Backend::Legacy)
        && Saved::parse(&out).has_rules()
    {
        return Ok(Backend::Legacy);
    }
    for b in [Backend::Nft, Backend::Plain] {
        if save(b).is_some() {
            return Ok(b);
        }
    }
    if let Some(e) = denied {
        return Err(e.into());
    }
    let tried = [Backend::Legacy, Backend::Nft, Backend::Plain]
        .map(|b| exec::binary(b, family, exec::Tool::Save))
        .join(", ");
    Err(Error::NoIptables { tried })
}

/// What a run did, for the log line that ends it.
#[derive(Debug)]
pub enum Outcome {
    DryRun(String),
    Applied(apply::Report),
    Cleaned(apply::Report),
    /// `--skip-rule-apply` (validation only).
    Skipped,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::DryRun(_) => f.write_str("dry run: nothing changed"),
            Outcome::Skipped => f.write_str("rules not touched (--skip-rule-apply)"),
            Outcome::Applied(report) | Outcome::Cleaned(report) => {
                let parts: Vec<String> = report
                    .iter()
                    .map(|(fam, a)| format!("{fam}: {a}"))
                    .collect();
                f.write_str(&parts.join("; "))
            }
        }
    }
}

/// Render what `--dry-run` prints: the restore input (or commands with `--restore-format=false`),
/// or the cleanup sequence with `--cleanup-only`.
pub fn dry_run_text(cfg: &Config, plan: &rules::Plan) -> String {
    let mut out = String::new();
    for f in plan.families() {
        let rules = plan.rules(f);
        if cfg.cleanup_only {
            for args in rules.cleanup_commands() {
                out.push_str(&format!("{} {}\n", f.tool(), args.join(" ")));
            }
        } else if cfg.restore_format {
            out.push_str(&rules.restore_text());
        } else {
            for args in rules.commands() {
                out.push_str(&format!("{} {}\n", f.tool(), args.join(" ")));
            }
        }
    }
    out
}

/// The whole run after configuration: plan, then dry-run, cleanup or apply, then routes and
/// validation.
pub fn run(cfg: &Config, facts: &Facts, runner: &dyn Runner) -> Result<Outcome, Error> {
    let plan = generate::plan(cfg, facts);
    if cfg.dry_run {
        return Ok(Outcome::DryRun(dry_run_text(cfg, &plan)));
    }
    if cfg.native_nftables {
        warn!(
            "--native-nftables: the native nftables backend is not implemented; applying the same rules through iptables-nft"
        );
    }
    if cfg.trace_logging {
        warn!("--iptables-trace-logging is not supported and is ignored");
    }
    let mut outcome = Outcome::Skipped;
    if !cfg.skip_rule_apply {
        let mut backends = apply::Backends::new();
        for f in plan.families() {
            let b = select_backend(cfg, runner, f)?;
            info!(family = %f, backend = ?b, "iptables backend");
            backends.insert(f, b);
        }
        if cfg.native_nftables && cfg.force_backend.is_none() {
            backends.values_mut().for_each(|b| *b = Backend::Nft);
        }
        if !plan.ipv6 {
            // The IPv6 state probe still runs (cleanup needs to see it); use the IPv4 choice.
            let v4 = backends[&Family::V4];
            backends.entry(Family::V6).or_insert(v4);
        }
        if cfg.cleanup_only {
            let report = apply::cleanup(&plan, runner, &backends)?;
            host::remove_routes(cfg, plan.ipv6, runner)?;
            return Ok(Outcome::Cleaned(report));
        }
        let report = apply::apply(&plan, runner, &backends, cfg.reconcile, cfg.force_apply)?;
        host::configure_routes(cfg, plan.ipv6, runner)?;
        outcome = Outcome::Applied(report);
    }
    if cfg.run_validation {
        validate::run(cfg, plan.ipv6)?;
    }
    Ok(outcome)
}
