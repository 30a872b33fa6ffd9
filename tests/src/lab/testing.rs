//! Helpers for tests that run a lab of their own.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::Value;

use super::{Lab, cli};

static N: AtomicU32 = AtomicU32::new(0);

/// A lab of its own for one test (a unique name), removed on drop — also when the test fails.
pub struct TestLab(pub Lab);

impl TestLab {
    pub fn up() -> TestLab {
        let bin_dir = crate::workspace_bin("ferry-lab")
            .parent()
            .expect("bin dir")
            .to_path_buf();
        let name = format!(
            "t{}{}",
            std::process::id() % 10_000,
            N.fetch_add(1, Ordering::SeqCst)
        );
        let lab = Lab::new(&name, None, bin_dir).expect("lab name");
        let msg = cli::up(&lab, &mut |m: &str| eprintln!("[{name}] {m}")).expect("lab up");
        eprintln!("{msg}");
        TestLab(lab)
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let _ = cli::down(&self.0, &mut |_: &str| {});
    }
}

/// A current-thread runtime for a test body.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The pods of a namespace by name.
pub async fn pods_by_name(lab: &Lab, ns: &str) -> BTreeMap<String, Value> {
    cli::list(lab, "pods", Some(ns))
        .await
        .expect("list pods")
        .into_iter()
        .map(|p| (p["metadata"]["name"].as_str().unwrap_or("").to_owned(), p))
        .collect()
}

/// The first pod whose name starts with `prefix` (a Deployment's pod).
pub fn first_with_prefix(pods: &BTreeMap<String, Value>, prefix: &str) -> String {
    pods.keys()
        .find(|n| n.starts_with(prefix))
        .unwrap_or_else(|| panic!("no pod {prefix}*: {:?}", pods.keys()))
        .clone()
}

/// Run a command in a pod; its stdout, failing the test with both outputs if it fails.
pub async fn exec_stdout(lab: &Lab, pod: &str, ns: &str, c: Option<&str>, cmd: &[&str]) -> String {
    let out = cli::exec_output(lab, pod, ns, c, cmd).await.expect("exec");
    assert!(
        out.status.success(),
        "{cmd:?} in {ns}/{pod} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
