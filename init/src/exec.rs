//! The edge where rules meet the system: a small [`Runner`] trait around the iptables tools and
//! `ip`, with the real implementation here and a recording fake in [`crate::test_util`].

use std::io::Write;
use std::process::{Command, Stdio};

use crate::config::Backend;
use crate::rules::Family;

/// How long iptables waits for the xtables lock before failing, by default (seconds).
pub const XTABLES_LOCK_WAIT_SECS: u32 = 30;

/// Which iptables tool of a family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    /// `iptables-save`
    Save,
    /// `iptables-restore --noflush` with the text on stdin
    Restore,
    /// `iptables ARGS`
    Iptables,
}

/// One iptables invocation, independent of the backend's binary names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub family: Family,
    pub tool: Tool,
    pub args: Vec<String>,
    pub stdin: Option<String>,
}

impl Invocation {
    pub fn save(family: Family) -> Self {
        Invocation {
            family,
            tool: Tool::Save,
            args: vec![],
            stdin: None,
        }
    }
    pub fn restore(family: Family, text: String) -> Self {
        Invocation {
            family,
            tool: Tool::Restore,
            args: vec![],
            stdin: Some(text),
        }
    }
    pub fn iptables(family: Family, args: Vec<String>) -> Self {
        Invocation {
            family,
            tool: Tool::Iptables,
            args,
            stdin: None,
        }
    }

    /// The command as Istio's transcripts print it (`iptables -t nat -D ...`, `ip6tables-save`).
    pub fn display(&self) -> String {
        let base = self.family.tool();
        match self.tool {
            Tool::Save => format!("{base}-save"),
            Tool::Restore => format!("{base}-restore --noflush"),
            Tool::Iptables => format!("{base} {}", self.args.join(" ")),
        }
    }
}

/// What a command printed and whether it succeeded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// A command could not be run at all.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{program} not found in PATH (install the iptables package, or choose another backend with --force-iptables-binary)"
    )]
    NotFound { program: String },
    #[error("running {program}: {source}")]
    Io {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs iptables tools and other commands. Real, recording or dry-run.
pub trait Runner {
    fn iptables(&self, backend: Backend, inv: &Invocation) -> Result<Output, Error>;
    fn command(&self, program: &str, args: &[String]) -> Result<Output, Error>;
}

/// Binary name for a tool of a family under a backend.
pub fn binary(backend: Backend, family: Family, tool: Tool) -> String {
    let base = family.tool();
    let variant = match backend {
        Backend::Legacy => "-legacy",
        Backend::Nft => "-nft",
        Backend::Plain => "",
    };
    match tool {
        Tool::Save => format!("{base}{variant}-save"),
        Tool::Restore => format!("{base}{variant}-restore"),
        Tool::Iptables => format!("{base}{variant}"),
    }
}

/// Runs the real binaries.
pub struct SystemRunner {
    /// Seconds to wait for the xtables lock (`--wait`).
    pub lock_wait_secs: u32,
}

impl Default for SystemRunner {
    fn default() -> Self {
        SystemRunner {
            lock_wait_secs: XTABLES_LOCK_WAIT_SECS,
        }
    }
}

fn run(program: &str, args: &[String], stdin: Option<&str>) -> Result<Output, Error> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound {
            program: program.to_owned(),
        },
        _ => Error::Io {
            program: program.to_owned(),
            source: e,
        },
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A restore that dies early closes its stdin; its exit status tells the real story.
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| Error::Io {
        program: program.to_owned(),
        source: e,
    })?;
    Ok(Output {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

impl Runner for SystemRunner {
    fn iptables(&self, backend: Backend, inv: &Invocation) -> Result<Output, Error> {
        let program = binary(backend, inv.family, inv.tool);
        let wait = format!("--wait={}", self.lock_wait_secs);
        let args: Vec<String> = match inv.tool {
            Tool::Save => vec![],
            Tool::Restore => vec!["--noflush".into(), wait],
            Tool::Iptables => std::iter::once(wait)
                .chain(inv.args.iter().cloned())
                .collect(),
        };
        run(&program, &args, inv.stdin.as_deref())
    }

    fn command(&self, program: &str, args: &[String]) -> Result<Output, Error> {
        run(program, args, None)
    }
}
