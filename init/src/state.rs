//! Reading what is installed: a small `iptables-save` parser, the part of it that is ours
//! (`ISTIO_*` chains, rules in them, jumps into them), and the atomic script that removes it.

use std::collections::BTreeMap;

use crate::rules::{RuleSet, is_istio_chain, is_user_chain};

/// One `-A CHAIN ...` line of a saved table. `spec` is the text after the chain name, kept
/// verbatim (quoting included) so it can be fed back to `iptables-restore` as `-D CHAIN spec`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedRule {
    pub chain: String,
    pub spec: String,
}

impl SavedRule {
    /// The jump target when the rule ends in `-j X`.
    pub fn jump_target(&self) -> Option<&str> {
        let words: Vec<&str> = self.spec.split_whitespace().collect();
        match words.as_slice() {
            [.., "-j", t] => Some(t),
            _ => None,
        }
    }

    /// Ours: inside one of our chains, or a jump into one.
    pub fn is_ours(&self) -> bool {
        is_istio_chain(&self.chain) || self.jump_target().is_some_and(is_istio_chain)
    }
}

/// One table of `iptables-save` output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SavedTable {
    /// Every declared chain, built-in ones included, in save order.
    pub chains: Vec<String>,
    pub rules: Vec<SavedRule>,
}

/// A whole `iptables-save` dump, by table name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Saved {
    pub tables: BTreeMap<String, SavedTable>,
}

impl Saved {
    /// Parse `iptables-save` output. Comments and counters are ignored; unknown lines are skipped
    /// (the format is stable, but a warning header from iptables-nft must not break us).
    pub fn parse(text: &str) -> Saved {
        let mut saved = Saved::default();
        let mut current: Option<String> = None;
        for line in text.lines() {
            let line = line.trim_end();
            if let Some(t) = line.strip_prefix('*') {
                let name = t.trim().to_owned();
                saved.tables.entry(name.clone()).or_default();
                current = Some(name);
            } else if line == "COMMIT" {
                current = None;
            } else if let Some(table) = current.as_ref().and_then(|t| saved.tables.get_mut(t)) {
                if let Some(decl) = line.strip_prefix(':') {
                    if let Some(name) = decl.split_whitespace().next() {
                        table.chains.push(name.to_owned());
                    }
                } else if let Some(rest) = line.strip_prefix("-A ") {
                    let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
                    table.rules.push(SavedRule {
                        chain: chain.to_owned(),
                        spec: spec.to_owned(),
                    });
                }
            }
        }
        saved
    }

    /// Whether anything at all is installed (any rule or user chain in any table): used to tell
    /// whether a backend is in use.
    pub fn has_rules(&self) -> bool {
        self.tables
            .values()
            .any(|t| !t.rules.is_empty() || t.chains.iter().any(|c| is_user_chain(c)))
    }

    /// Our part of the dump.
    pub fn ours(&self) -> Footprint {
        let mut fp = Footprint::default();
        for (name, t) in &self.tables {
            let chains: Vec<String> = t
                .chains
                .iter()
                .filter(|c| is_istio_chain(c))
                .cloned()
                .collect();
            let rules: Vec<SavedRule> = t.rules.iter().filter(|r| r.is_ours()).cloned().collect();
            if !chains.is_empty() || !rules.is_empty() {
                fp.tables
                    .insert(name.clone(), TableFootprint { chains, rules });
            }
        }
        fp
    }
}

/// Our chains and rules in one table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableFootprint {
    pub chains: Vec<String>,
    pub rules: Vec<SavedRule>,
}

/// Our chains and rules, by table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    pub tables: BTreeMap<String, TableFootprint>,
}

/// Chain and rule counts per table: what must match for "already applied".
pub type Shape = BTreeMap<String, (Vec<String>, usize)>;

impl Footprint {
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Sorted chain names and rule count per table.
    pub fn shape(&self) -> Shape {
        self.tables
            .iter()
            .map(|(t, fp)| {
                let mut chains = fp.chains.clone();
                chains.sort();
                (t.clone(), (chains, fp.rules.len()))
            })
            .collect()
    }

    /// Restore-format lines that remove all of it from one table: jumps from other chains are
    /// deleted, then every chain of ours is flushed, then deleted (flush all first, since our
    /// chains jump to each other).
    pub fn removal_lines(&self, table: &str) -> Vec<String> {
        let Some(fp) = self.tables.get(table) else {
            return vec![];
        };
        let mut lines: Vec<String> = fp
            .rules
            .iter()
            .filter(|r| !is_istio_chain(&r.chain))
            .map(|r| format!("-D {} {}", r.chain, r.spec))
            .collect();
        lines.extend(fp.chains.iter().map(|c| format!("-F {c}")));
        lines.extend(fp.chains.iter().map(|c| format!("-X {c}")));
        lines
    }
}

/// The same shape computed from a plan: what a dump looks like once the plan is applied.
pub fn plan_shape(rules: &RuleSet) -> Shape {
    let mut shape: Shape = BTreeMap::new();
    for r in rules.rules() {
        let entry = shape.entry(r.table.clone()).or_default();
        for name in std::iter::once(r.chain.as_str()).chain(r.jump_target()) {
            if is_istio_chain(name) && !entry.0.iter().any(|c| c == name) {
                entry.0.push(name.to_owned());
            }
        }
        if is_istio_chain(&r.chain) || r.jump_target().is_some_and(is_istio_chain) {
            entry.1 += 1;
        }
    }
    shape.retain(|_, (chains, n)| !chains.is_empty() || *n > 0);
    for (chains, _) in shape.values_mut() {
        chains.sort();
    }
    shape
}

/// One `iptables-restore --noflush` script, per table: `extra_before` removal lines, then the
/// plan's own text for that table. Used for atomic reconcile and for removal.
pub fn combined_script(
    removal: &Footprint,
    extra: &BTreeMap<String, Vec<String>>,
    plan: Option<&RuleSet>,
) -> String {
    let plan_text = plan.map(|p| p.restore_text()).unwrap_or_default();
    // Split the plan's restore text back into per-table bodies.
    let mut bodies: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in plan_text.lines() {
        if let Some(t) = line.strip_prefix("* ") {
            current = Some(t.to_owned());
            bodies.entry(t.to_owned()).or_default();
        } else if line == "COMMIT" {
            current = None;
        } else if let Some(t) = &current {
            bodies.entry(t.clone()).or_default().push(line.to_owned());
        }
    }
    let mut tables: Vec<&String> = removal
        .tables
        .keys()
        .chain(bodies.keys())
        .chain(extra.keys())
        .collect();
    tables.sort();
    tables.dedup();
    let mut out = String::new();
    for t in tables {
        let mut lines = extra.get(t).cloned().unwrap_or_default();
        lines.extend(removal.removal_lines(t));
        lines.extend(bodies.get(t).cloned().unwrap_or_default());
        if lines.is_empty() {
            continue;
        }
        out.push_str(&format!("* {t}\n"));
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}

#[cfg(test)]
mod tests;
