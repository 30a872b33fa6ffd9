//! A recording [`Runner`] for tests: answers `*-save` with canned text (empty by default, like
//! Istio's `DependenciesStub`) and records every call in Istio's golden-transcript format.

use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::config::Backend;
use crate::exec::{Error, Invocation, Output, Runner, Tool};
use crate::rules::Family;

/// Records calls; `saves` supplies what `iptables-save` prints per family.
#[derive(Default)]
pub struct RecordingRunner {
    pub saves: RefCell<BTreeMap<Family, String>>,
    /// `-C` answers: true means "present". Unlisted checks fail.
    pub check_ok: bool,
    pub calls: RefCell<Vec<Invocation>>,
    pub commands: RefCell<Vec<String>>,
}

impl RecordingRunner {
    /// Istio's transcript: save commands by name, restore input line by line, other commands as
    /// `iptables ARGS`. `-C` checks and `ip` commands are not part of it.
    pub fn transcript(&self) -> String {
        let mut lines: Vec<String> = Vec::new();
        for inv in self.calls.borrow().iter() {
            match inv.tool {
                Tool::Save => lines.push(format!("{}-save", inv.family.tool())),
                Tool::Restore => lines.extend(
                    inv.stdin
                        .clone()
                        .unwrap_or_default()
                        .lines()
                        .map(str::to_owned),
                ),
                Tool::Iptables if inv.args.iter().any(|a| a == "-C") => {}
                Tool::Iptables => lines.push(inv.display()),
            }
        }
        lines.join("\n")
    }
}

impl Runner for RecordingRunner {
    fn iptables(&self, _backend: Backend, inv: &Invocation) -> Result<Output, Error> {
        self.calls.borrow_mut().push(inv.clone());
        let stdout = match inv.tool {
            Tool::Save => self
                .saves
                .borrow()
                .get(&inv.family)
                .cloned()
                .unwrap_or_default(),
            _ => String::new(),
        };
        let success = match inv.tool {
            Tool::Iptables if inv.args.iter().any(|a| a == "-C") => self.check_ok,
            _ => true,
        };
        Ok(Output {
            success,
            stdout,
            stderr: String::new(),
        })
    }

    fn command(&self, program: &str, args: &[String]) -> Result<Output, Error> {
        self.commands
            .borrow_mut()
            .push(format!("{program} {}", args.join(" ")));
        Ok(Output {
            success: true,
            ..Output::default()
        })
    }
}
