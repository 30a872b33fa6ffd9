//! Process-level knobs that need a foreign call, and the crate's only `unsafe`:
//! - the CPU scheduling policy (see [`crate::config::Scheduling`] for why). Threads created
//!   afterwards inherit it, so it is set before the runtime starts;
//! - giving freed memory back after a configuration rebuild. The binary's allocator (mimalloc)
//!   returns freed pages to the OS lazily, during later allocations; an idle sidecar makes
//!   none, so the transient peak of compiling a large table (a 1,000-rule VirtualService:
//!   about 10 MiB) stayed resident until traffic came.
#![allow(unsafe_code)]

use crate::config::Scheduling;

/// Apply `policy` to the calling thread (and so to every thread it creates later).
pub fn set_scheduling(policy: Scheduling) -> std::io::Result<()> {
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

/// The calling thread's policy, for the config dump and tests.
pub fn scheduling() -> std::io::Result<Scheduling> {
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

/// Return the allocator's free pages to the OS now. (When the binary's global allocator is not
/// mimalloc, as in this crate's unit tests, this only visits mimalloc's empty heap.)
pub fn release_free_memory() {
    // SAFETY: mi_collect takes no pointers; it walks the calling thread's heap, which only
    // the allocator itself touches.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_sets_batch_and_back() {
        // In a thread of its own so the test runner's threads keep their policy.
        std::thread::spawn(|| {
            set_scheduling(Scheduling::Batch).expect("SCHED_BATCH needs no privilege");
            assert_eq!(scheduling().unwrap(), Scheduling::Batch);
            // Inherited by threads created afterwards.
            let child = std::thread::spawn(|| scheduling().unwrap()).join().unwrap();
            assert_eq!(child, Scheduling::Batch);
            set_scheduling(Scheduling::Normal).unwrap();
            assert_eq!(scheduling().unwrap(), Scheduling::Normal);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn releasing_memory_is_harmless_at_any_time() {
        let v = vec![0u8; 1 << 20];
        release_free_memory();
        assert_eq!(v.len(), 1 << 20);
    }
}
