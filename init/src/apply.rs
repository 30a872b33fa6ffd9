//! Applying a plan to the live tables: state probe, "already applied?" check, one atomic
//! `iptables-restore --noflush` per family, rollback of IPv4 when IPv6 fails, atomic reconcile,
//! and Istio's cleanup sequence followed by a sweep of anything of ours that is left.

use std::collections::BTreeMap;

use tracing::{debug, info, warn};

use crate::config::Backend;
use crate::exec::{self, Invocation, Output, Runner};
use crate::rules::{Family, Plan, RuleSet, is_istio_chain, is_user_chain};
use crate::state::{self, Footprint, Saved};

/// Applying or removing rules failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Exec(#[from] exec::Error),
    #[error(
        "{command} was refused permission: the container must run as root with the NET_ADMIN and NET_RAW capabilities ({stderr})"
    )]
    Permission { command: String, stderr: String },
    #[error(
        "{command} could not take the xtables lock within {}s: another process is holding it ({stderr})",
        exec::XTABLES_LOCK_WAIT_SECS
    )]
    Locked { command: String, stderr: String },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error(
        "different ISTIO_* rules are already installed for {family} ({detail}); pass --reconcile to replace them atomically, or --cleanup-only to remove them"
    )]
    Differs { family: Family, detail: String },
    #[error(
        "{family} rules failed to apply after IPv4 was applied ({cause}); IPv4 was rolled back{rollback}"
    )]
    RolledBack {
        family: Family,
        cause: Box<Error>,
        rollback: String,
    },
}

/// What happened to one family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Applied,
    Unchanged,
    Reconciled,
    Cleaned { removed: usize, leftovers: bool },
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Applied => f.write_str("applied"),
            Action::Unchanged => f.write_str("already in place, unchanged"),
            Action::Reconciled => f.write_str("replaced (reconciled)"),
            Action::Cleaned { removed, leftovers } => {
                write!(f, "removed ({removed} cleanup commands succeeded")?;
                if *leftovers {
                    f.write_str(", plus leftovers of another configuration")?;
                }
                f.write_str(")")
            }
        }
    }
}

/// Per-family results, IPv4 first.
pub type Report = Vec<(Family, Action)>;

/// The backend chosen for each family.
pub type Backends = BTreeMap<Family, Backend>;

/// Turn a failed iptables call into an error that says what is wrong.
pub fn classify(inv: &Invocation, out: &Output) -> Error {
    let command = inv.display();
    let stderr = out.stderr.trim().to_owned();
    let lower = stderr.to_lowercase();
    if lower.contains("permission denied") || lower.contains("operation not permitted") {
        Error::Permission { command, stderr }
    } else if lower.contains("xtables lock") {
        Error::Locked { command, stderr }
    } else {
        Error::Failed { command, stderr }
    }
}

struct Tables<'a> {
    runner: &'a dyn Runner,
    backends: &'a Backends,
}

impl Tables<'_> {
    fn backend(&self, f: Family) -> Backend {
        self.backends.get(&f).copied().unwrap_or(Backend::Plain)
    }

    fn call(&self, inv: Invocation) -> Result<Output, Error> {
        debug!(command = %inv.display(), "iptables");
        Ok(self.runner.iptables(self.backend(inv.family), &inv)?)
    }

    fn must(&self, inv: Invocation) -> Result<Output, Error> {
        let out = self.call(inv.clone())?;
        if out.success {
            Ok(out)
        } else {
            Err(classify(&inv, &out))
        }
    }

    fn save(&self, f: Family) -> Result<Saved, Error> {
        Ok(Saved::parse(&self.must(Invocation::save(f))?.stdout))
    }

    /// The IPv6 probe is best effort when IPv6 is not in use (the tools may be absent).
    fn save_optional(&self, f: Family, needed: bool) -> Result<Saved, Error> {
        match self.save(f) {
            Ok(s) => Ok(s),
            Err(e) if !needed => {
                debug!(family = %f, error = %e, "state probe failed for a family that is not in use");
                Ok(Saved::default())
            }
            Err(e) => Err(e),
        }
    }

    fn restore(&self, f: Family, text: String) -> Result<(), Error> {
        self.must(Invocation::restore(f, text)).map(|_| ())
    }

    /// Every planned rule passes `iptables -C` (the kernel's own comparison, immune to the way
    /// iptables-save re-spells rules).
    fn all_present(&self, f: Family, rules: &RuleSet) -> Result<bool, Error> {
        for args in rules.check_commands() {
            if !self.call(Invocation::iptables(f, args))?.success {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// `-D` lines for planned rules in built-in chains that do not jump to our chains and are
    /// present right now: state alone cannot tell that they are ours, the plan can.
    fn present_plain_rules(
        &self,
        f: Family,
        rules: &RuleSet,
    ) -> Result<BTreeMap<String, Vec<String>>, Error> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in rules.rules() {
            if is_user_chain(&r.chain) || r.jump_target().is_some_and(is_istio_chain) {
                continue;
            }
            if self
                .call(Invocation::iptables(f, r.command_args("-C")))?
                .success
            {
                out.entry(r.table.clone()).or_default().push(format!(
                    "-D {} {}",
                    r.chain,
                    r.params.join(" ")
                ));
            }
        }
        Ok(out)
    }

    fn log_final(&self, f: Family) -> Result<Saved, Error> {
        let saved = self.save(f)?;
        for (table, fp) in &saved.ours().tables {
            for r in &fp.rules {
                debug!(family = %f, table, "-A {} {}", r.chain, r.spec);
            }
        }
        Ok(saved)
    }
}

enum Decision {
    Apply,
    Unchanged,
    Reconcile(Footprint),
}

/// Apply the plan. Decides for every family before touching any, so a refusal never leaves one
/// family changed and the other not.
pub fn apply(
    plan: &Plan,
    runner: &dyn Runner,
    backends: &Backends,
    reconcile: bool,
    force: bool,
) -> Result<Report, Error> {
    let t = Tables { runner, backends };
    // State probe, both families, as Istio does.
    let state = [
        (Family::V4, t.save(Family::V4)?),
        (Family::V6, t.save_optional(Family::V6, plan.ipv6)?),
    ];
    let mut decisions = Vec::new();
    for f in plan.families() {
        let ours = state
            .iter()
            .find(|(sf, _)| *sf == f)
            .map(|(_, s)| s.ours())
            .unwrap_or_default();
        let rules = plan.rules(f);
        let decision = if ours.is_empty() {
            Decision::Apply
        } else if state::plan_shape(rules) == ours.shape() && t.all_present(f, rules)? {
            if force {
                Decision::Reconcile(ours)
            } else {
                Decision::Unchanged
            }
        } else if reconcile {
            Decision::Reconcile(ours)
        } else {
            let have: usize = ours.tables.values().map(|t| t.rules.len()).sum();
            let want: usize = state::plan_shape(rules).values().map(|(_, n)| n).sum();
            return Err(Error::Differs {
                family: f,
                detail: format!(
                    "{have} rules of ours installed, this configuration has {want} that differ"
                ),
            });
        };
        decisions.push((f, decision));
    }

    let mut report = Report::new();
    for (f, decision) in decisions {
        let rules = plan.rules(f);
        let result = match decision {
            Decision::Unchanged => {
                info!(family = %f, "identical rules already installed; nothing to do");
                Ok(Action::Unchanged)
            }
            Decision::Apply if rules.is_empty() => Ok(Action::Unchanged),
            Decision::Apply => t.restore(f, rules.restore_text()).map(|_| {
                info!(family = %f, rules = rules.rules().len(), "rules applied in one transaction");
                Action::Applied
            }),
            Decision::Reconcile(old) => {
                let extra = t.present_plain_rules(f, rules)?;
                let script = state::combined_script(&old, &extra, Some(rules));
                t.restore(f, script).map(|_| Action::Reconciled)
            }
        };
        match result {
            Ok(action) => report.push((f, action)),
            Err(cause) if !report.is_empty() => {
                // Never leave half a ruleset: take back what the earlier family got.
                let rollback = match cleanup_family(&t, plan, Family::V4) {
                    Ok(_) => String::new(),
                    Err(e) => format!(" only partly: {e}"),
                };
                warn!(family = %f, error = %cause, "apply failed; rolled back IPv4");
                return Err(Error::RolledBack {
                    family: f,
                    cause: Box::new(cause),
                    rollback,
                });
            }
            Err(cause) => return Err(cause),
        }
    }
    for f in plan.families() {
        t.log_final(f)?;
    }
    Ok(report)
}

/// Remove one family's rules: Istio's plan-based sequence (failures tolerated: a rule may simply
/// not be there), then an atomic sweep of any `ISTIO_*` chain or jump still present.
fn cleanup_family(t: &Tables<'_>, plan: &Plan, f: Family) -> Result<Action, Error> {
    let mut removed = 0;
    for args in plan.rules(f).cleanup_commands() {
        if t.call(Invocation::iptables(f, args))?.success {
            removed += 1;
        }
    }
    Ok(Action::Cleaned {
        removed,
        leftovers: false,
    })
}

/// `--cleanup-only`: remove every `ISTIO_*` chain, rule and jump in the planned families, leave
/// everyone else's rules alone.
pub fn cleanup(plan: &Plan, runner: &dyn Runner, backends: &Backends) -> Result<Report, Error> {
    let t = Tables { runner, backends };
    t.save(Family::V4)?;
    t.save_optional(Family::V6, plan.ipv6)?;
    let mut report = Report::new();
    for f in plan.families() {
        report.push((f, cleanup_family(&t, plan, f)?));
    }
    for (f, action) in report.iter_mut() {
        let left = t.save(*f)?.ours();
        if !left.is_empty() {
            // Rules from a different configuration (or an older version): remove them in one go.
            warn!(family = %f, tables = ?left.tables.keys().collect::<Vec<_>>(), "removing ISTIO_* rules left by a different configuration");
            t.restore(*f, state::combined_script(&left, &BTreeMap::new(), None))?;
            let still = t.save(*f)?.ours();
            if !still.is_empty() {
                return Err(Error::Failed {
                    command: format!("{} cleanup", f.tool()),
                    stderr: format!(
                        "ISTIO_* rules remain in tables {:?}",
                        still.tables.keys().collect::<Vec<_>>()
                    ),
                });
            }
            if let Action::Cleaned { leftovers, .. } = action {
                *leftovers = true;
            }
        }
    }
    Ok(report)
}
