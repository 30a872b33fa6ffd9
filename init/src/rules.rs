//! The rule builder: an ordered list of iptables rules per address family, and the three texts
//! derived from it — the `iptables-restore` input, the `-C` check list and the cleanup sequence.
//!
//! Everything here is a pure function of the rule list, so each text is tested against Istio's
//! builder goldens (`iptables/builder-golden/`, `builder-cases.json`).

use std::collections::BTreeMap;
use std::fmt;

use crate::spec::{self, chain};

/// IPv4 or IPv6: selects `iptables*` or `ip6tables*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The plain command name of this family's main tool (`iptables` / `ip6tables`).
    pub fn tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// Where a rule goes in its chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// `-A`: at the end.
    Append,
    /// `-I CHAIN N`: at position N (1-based) at the time it is applied.
    Insert(u32),
}

/// One rule: `-t TABLE -A|-I CHAIN [N] PARAMS...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub table: String,
    pub chain: String,
    pub position: Position,
    pub params: Vec<String>,
}

impl Rule {
    /// The jump target when the rule ends in `-j TARGET` with nothing after it.
    ///
    /// Targets with options (`-j REDIRECT --to-ports N`, `-j CT --zone 1`) are iptables
    /// extensions, never chains, so only a trailing `-j X` can name a chain (Istio's rule).
    pub fn jump_target(&self) -> Option<&str> {
        match self.params.as_slice() {
            [.., j, target] if j == "-j" => Some(target.as_str()),
            _ => None,
        }
    }

    /// The rule as a restore line: `-A CHAIN ...` or `-I CHAIN N ...`.
    pub fn restore_line(&self) -> String {
        let mut words = self.op_words();
        words.extend(self.params.iter().cloned());
        words.join(" ")
    }

    /// Arguments for an `iptables` invocation with the given verb (`-C`, `-D`), no position.
    pub fn command_args(&self, verb: &str) -> Vec<String> {
        let mut args = vec![
            "-t".to_owned(),
            self.table.clone(),
            verb.to_owned(),
            self.chain.clone(),
        ];
        args.extend(self.params.iter().cloned());
        args
    }

    fn op_words(&self) -> Vec<String> {
        match self.position {
            Position::Append => vec!["-A".to_owned(), self.chain.clone()],
            Position::Insert(n) => vec!["-I".to_owned(), self.chain.clone(), n.to_string()],
        }
    }
}

/// Whether `name` needs a `-N` (it is neither a built-in chain nor a verdict).
pub fn is_user_chain(name: &str) -> bool {
    !spec::BUILT_INS.contains(&name)
}

/// Whether a chain belongs to us (cleanup and reconcile only ever touch these).
pub fn is_istio_chain(name: &str) -> bool {
    name.starts_with(chain::PREFIX)
}

/// The ordered rules of one family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    pub fn append(&mut self, table: &str, chain: &str, params: &[&str]) {
        self.push(table, chain, Position::Append, params);
    }

    pub fn insert(&mut self, table: &str, chain: &str, pos: u32, params: &[&str]) {
        self.push(table, chain, Position::Insert(pos), params);
    }

    pub fn push(&mut self, table: &str, chain: &str, position: Position, params: &[&str]) {
        self.rules.push(Rule {
            table: table.to_owned(),
            chain: chain.to_owned(),
            position,
            params: params.iter().map(|s| (*s).to_owned()).collect(),
        });
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Rules grouped by table, tables in lexical order (how `iptables-restore` input is laid out).
    fn by_table(&self) -> BTreeMap<&str, Vec<&Rule>> {
        let mut tables: BTreeMap<&str, Vec<&Rule>> = BTreeMap::new();
        for r in &self.rules {
            tables.entry(r.table.as_str()).or_default().push(r);
        }
        tables
    }

    /// User chains of one table's rules: first each rule's own chain in order of first use, then
    /// any jump target not yet declared.
    fn chains_to_declare<'a>(rules: &[&'a Rule]) -> Vec<&'a str> {
        let mut seen: Vec<&str> = Vec::new();
        let own = rules.iter().map(|r| r.chain.as_str());
        let targets = rules.iter().filter_map(|r| r.jump_target());
        for name in own.chain(targets) {
            if is_user_chain(name) && !seen.contains(&name) {
                seen.push(name);
            }
        }
        seen
    }

    /// Input for `iptables-restore --noflush`: per table `* table`, `-N` lines, rules, `COMMIT`.
    /// Empty when there are no rules.
    pub fn restore_text(&self) -> String {
        let mut out = String::new();
        for (table, rules) in self.by_table() {
            out.push_str("* ");
            out.push_str(table);
            out.push('\n');
            for c in Self::chains_to_declare(&rules) {
                out.push_str("-N ");
                out.push_str(c);
                out.push('\n');
            }
            for r in rules {
                out.push_str(&r.restore_line());
                out.push('\n');
            }
            out.push_str("COMMIT\n");
        }
        out
    }

    /// The same plan as individual `iptables` invocations (`--restore-format=false`): one `-N`
    /// per new chain, then every rule, in plan order.
    pub fn commands(&self) -> Vec<Vec<String>> {
        let mut declared: Vec<(&str, &str)> = Vec::new();
        for r in &self.rules {
            let key = (r.table.as_str(), r.chain.as_str());
            if is_user_chain(&r.chain) && !declared.contains(&key) {
                declared.push(key);
            }
        }
        let mut out: Vec<Vec<String>> = declared
            .iter()
            .map(|(t, c)| vec!["-t".into(), (*t).into(), "-N".into(), (*c).into()])
            .collect();
        for r in &self.rules {
            let mut args = vec!["-t".to_owned(), r.table.clone()];
            args.extend(r.op_words());
            args.extend(r.params.iter().cloned());
            out.push(args);
        }
        out
    }

    /// `-C` arguments for every planned rule, in plan order (the "already applied?" check).
    pub fn check_commands(&self) -> Vec<Vec<String>> {
        self.rules.iter().map(|r| r.command_args("-C")).collect()
    }

    /// Istio's cleanup sequence for this plan: rules deleted in reverse order (rules inside our own
    /// chains are skipped, since flushing the chain removes them, unless they jump to one of our
    /// chains), then `-F` and `-X` for each user chain in order of first appearance in the
    /// reversed plan.
    pub fn cleanup_commands(&self) -> Vec<Vec<String>> {
        let mut deletes = Vec::new();
        let mut chains: Vec<(&str, &str)> = Vec::new();
        for r in self.rules.iter().rev() {
            let own_chain = is_istio_chain(&r.chain);
            let jumps_to_ours = r.jump_target().is_some_and(is_istio_chain);
            if !own_chain || jumps_to_ours {
                deletes.push(r.command_args("-D"));
            }
            let key = (r.table.as_str(), r.chain.as_str());
            if is_user_chain(&r.chain) && !chains.contains(&key) {
                chains.push(key);
            }
        }
        for (t, c) in chains {
            for verb in ["-F", "-X"] {
                deletes.push(vec!["-t".into(), t.into(), verb.into(), c.into()]);
            }
        }
        deletes
    }
}

/// The complete plan: rules for both families, and whether the IPv6 half is applied at all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub v4: RuleSet,
    pub v6: RuleSet,
    pub ipv6: bool,
}

impl Plan {
    /// The families this plan touches, IPv4 first (Istio's order).
    pub fn families(&self) -> Vec<Family> {
        if self.ipv6 {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }

    pub fn rules(&self, family: Family) -> &RuleSet {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }

    /// What `--dry-run` prints: the IPv4 restore input, then the IPv6 one when IPv6 applies.
    pub fn restore_texts(&self) -> String {
        self.families()
            .into_iter()
            .map(|f| self.rules(f).restore_text())
            .collect()
    }
}

#[cfg(test)]
mod tests;
