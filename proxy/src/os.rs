//! Process-level knobs that need a foreign call, and the crate's only `unsafe`:
//! - the CPU scheduling policy (see [`crate::config::Scheduling`] for why). Threads created
//!   afterwards inherit it, so it is set before the runtime starts;
//! - giving freed memory back after a configuration rebuild. The binary's allocator (mimalloc)
//!   returns freed pages to the OS lazily, during later allocations; an idle sidecar makes
//!   none, so the transient peak of compiling a large table (a 1,000-rule VirtualService:
//!   about 10 MiB) stayed resident until traffic came;
//! - `pipe2` and `splice` for the zero-copy TCP relay ([`crate::relay`]);
//! - keeping a statically linked glibc off NSS modules ([`nss_files_and_dns_only`]).
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::config::Scheduling;

/// A non-blocking, close-on-exec pipe: (read end, write end).
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two c_ints that pipe2 fills on success; the flags are
    // plain constants.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: on success both descriptors are open and owned by nobody else; each OwnedFd
    // closes its own exactly once.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A pipe's capacity in bytes (F_GETPIPE_SZ).
pub fn pipe_capacity(fd: BorrowedFd<'_>) -> std::io::Result<usize> {
    // SAFETY: the descriptor is borrowed, so open; F_GETPIPE_SZ takes no argument and
    // touches no memory of ours.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Move up to `len` bytes from `from` to `to` without copying them through user space (one of
/// the two must be a pipe). Never blocks on the pipe (SPLICE_F_NONBLOCK); the sockets are
/// non-blocking already. `Ok(0)` from a socket is end of stream.
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> std::io::Result<usize> {
    // SAFETY: both descriptors are borrowed, so open for the whole call; null offsets mean
    // "the descriptor's own position", which splice requires for pipes and sockets; no other
    // memory of ours is passed.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

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

#[cfg(target_env = "gnu")]
unsafe extern "C" {
    /// glibc: replace the services `/etc/nsswitch.conf` lists for one database.
    fn __nss_configure_lookup(
        dbname: *const libc::c_char,
        service_line: *const libc::c_char,
    ) -> libc::c_int;
}

/// Resolve host names, users and groups with glibc's built-in `files` and `dns` services only,
/// whatever `/etc/nsswitch.conf` lists. For a statically linked binary (`.ci/release`): it
/// cannot load NSS modules (`libnss_systemd`, `libnss_resolve`, ...) — dlopen brings a second
/// libc, and the process crashes. Name lookups then behave as in a pod, whose images say
/// `hosts: files dns` (and as Go's own resolver does).
#[cfg(target_env = "gnu")]
pub fn nss_files_and_dns_only() -> std::io::Result<()> {
    for (db, services) in [
        (c"hosts", c"files dns"),
        (c"passwd", c"files"),
        (c"group", c"files"),
    ] {
        // SAFETY: both arguments are NUL-terminated static strings; glibc copies what it keeps.
        // Called once, at start-up, before any thread that could look names up exists.
        if unsafe { __nss_configure_lookup(db.as_ptr(), services.as_ptr()) } != 0 {
            return Err(std::io::Error::other(format!(
                "__nss_configure_lookup({db:?}) failed"
            )));
        }
    }
    Ok(())
}
