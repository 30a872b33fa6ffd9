//! The one system call the proxy makes outside its dependencies: setting its CPU scheduling
//! policy (see [`crate::config::Scheduling`] for why). Threads created afterwards inherit it,
//! so this runs before the runtime starts.
#![allow(unsafe_code)]

use crate::config::Scheduling;

/// Apply `policy` to the calling thread (and so to every thread it creates later).
pub fn apply(policy: Scheduling) -> std::io::Result<()> {
    let policy = match policy {
        Scheduling::Batch => libc::SCHED_BATCH,
        Scheduling::Normal => libc::SCHED_OTHER,
    };
    // Non-real-time policies take priority 0.
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid, initialised sched_param that outlives the call; pid 0 means
    // the calling thread; the call reads `param` and touches no other memory of ours.
    let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The calling thread's policy, for tests and the log.
pub fn current() -> std::io::Result<Scheduling> {
    // SAFETY: sched_getscheduler takes a pid (0: the calling thread) and no pointers.
    match unsafe { libc::sched_getscheduler(0) } {
        libc::SCHED_BATCH => Ok(Scheduling::Batch),
        libc::SCHED_OTHER => Ok(Scheduling::Normal),
        -1 => Err(std::io::Error::last_os_error()),
        other => Err(std::io::Error::other(format!(
            "unexpected scheduling policy {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_sets_batch_and_back() {
        // In a thread of its own so the test runner's threads keep their policy.
        std::thread::spawn(|| {
            apply(Scheduling::Batch).expect("SCHED_BATCH needs no privilege");
            assert_eq!(current().unwrap(), Scheduling::Batch);
            // Inherited by threads created afterwards.
            let child = std::thread::spawn(|| current().unwrap()).join().unwrap();
            assert_eq!(child, Scheduling::Batch);
            apply(Scheduling::Normal).unwrap();
            assert_eq!(current().unwrap(), Scheduling::Normal);
        })
        .join()
        .unwrap();
    }
}
