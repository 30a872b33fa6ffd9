//! The opaque TCP relay: bytes from each socket to the other until both sides have finished,
//! a half-close passed through (one side's end of stream shuts the other's write side, and the
//! other direction keeps flowing).
//!
//! Each direction starts with a 16 KiB buffer (`read`/`write`). When a read fills it — a bulk
//! transfer — the direction moves to `splice(2)` through a pipe of its own: socket → pipe →
//! socket stays in the kernel (the pipe holds references to the received pages), so the bytes
//! are not copied into and out of the proxy (measured through two sidecars: 6.5 → 8.0 Gbit/s).
//! Only bulk directions take a pipe because pipes are a shared budget: two more descriptors
//! each, and the kernel's `fs.pipe-user-pages-soft` (16,384 pages by default) is counted per
//! user — every sidecar of the node runs as uid 1337 — and past it new pipes get 2 pages. A
//! direction stays on its buffer when the pipe cannot be had or is smaller than 64 KiB.
//!
//! The byte counts are kept even when the relay ends with an error (a reset mid-transfer still
//! shows in `tcp_*_bytes_total`).

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};

use tokio::io::Interest;
use tokio::net::TcpStream;
use tracing::debug;

use crate::os;

/// Bytes asked of the kernel per splice, and the least pipe capacity worth moving to: the
/// default pipe (16 pages).
const SPLICE_CHUNK: usize = 64 * 1024;
/// The buffer each direction starts with (tokio's default 8 KiB costs a read and a write per
/// 8 KiB of a bulk transfer; 64 KiB measured the same as 16 through two sidecars).
const BUFFER: usize = 16 * 1024;

/// How a relay moves bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Through a buffer, moving to a pipe with `splice(2)` once the direction is a bulk one.
    Splice,
    /// Through a user-space buffer (`read`/`write`).
    Buffered,
}

/// What a relay did.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes written to the upstream (received from the downstream).
    pub to_upstream: u64,
    /// Bytes written to the downstream (received from the upstream).
    pub to_downstream: u64,
    /// Why the relay stopped before both sides finished, if it did.
    pub error: Option<io::Error>,
    /// How each direction (to the upstream, to the downstream) moved its bytes.
    pub moved: [How; 2],
}

/// How one direction moved its bytes, for `ferry_proxy_tcp_relay_directions_total{mode}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    /// Through its buffer: never a bulk transfer (or [`Mode::Buffered`]).
    Copy,
    /// Moved to a pipe.
    Splice,
    /// A bulk transfer that could not have a pipe (out of descriptors, or the pipe budget of
    /// `fs.pipe-user-pages-soft` used up): copied through its buffer instead.
    CopyNoPipe,
}

impl How {
    pub fn as_str(self) -> &'static str {
        match self {
            How::Copy => "copy",
            How::Splice => "splice",
            How::CopyNoPipe => "copy_no_pipe",
        }
    }
}

/// Relay between `down` and `up` until both directions end (or one fails).
pub async fn relay(down: &TcpStream, up: &TcpStream, mode: Mode) -> Relayed {
    let mut to_upstream = 0;
    let mut to_downstream = 0;
    let (mut a, mut b) = (Stage::new(mode), Stage::new(mode));
    let result = tokio::try_join!(
        one_way(down, up, &mut a, &mut to_upstream),
        one_way(up, down, &mut b, &mut to_downstream),
    );
    Relayed {
        to_upstream,
        to_downstream,
        error: result.err(),
        moved: [a.how(), b.how()],
    }
}

/// Where one direction's bytes wait between the read and the write.
enum Stage {
    Pipe { read: OwnedFd, write: OwnedFd },
    Buffer(Box<[u8]>, Next),
}

/// What a buffered direction does when it sees a bulk transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    TryPipe,
    Stay,
    /// It tried, and no pipe could be had.
    NoPipe,
}

impl Stage {
    fn new(mode: Mode) -> Stage {
        let next = match mode {
            Mode::Splice => Next::TryPipe,
            Mode::Buffered => Next::Stay,
        };
        Stage::Buffer(vec![0; BUFFER].into_boxed_slice(), next)
    }

    fn how(&self) -> How {
        match self {
            Stage::Pipe { .. } => How::Splice,
            Stage::Buffer(_, Next::NoPipe) => How::CopyNoPipe,
            Stage::Buffer(..) => How::Copy,
        }
    }

    /// Take what `src` has (up to the stage's capacity); `Ok(0)` is end of stream. The stage
    /// is empty when this is called.
    fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
        match self {
            Stage::Pipe { write, .. } => src.try_io(Interest::READABLE, || {
                os::splice(src.as_fd(), write.as_fd(), SPLICE_CHUNK)
            }),
            Stage::Buffer(buf, _) => src.try_read(buf),
        }
    }

    /// Write the held bytes `from..to` (for a pipe: the next `to - from` bytes in it) to `dst`.
    fn drain(&mut self, dst: &TcpStream, from: usize, to: usize) -> io::Result<usize> {
        match self {
            Stage::Pipe { read, .. } => dst.try_io(Interest::WRITABLE, || {
                os::splice(read.as_fd(), dst.as_fd(), to - from)
            }),
            Stage::Buffer(buf, _) => dst.try_write(&buf[from..to]),
        }
    }

    /// After a read of `n` bytes has been written out: a full buffer means a bulk transfer,
    /// which moves to a pipe (once; a direction that cannot have one keeps its buffer).
    fn settle(&mut self, n: usize) {
        let Stage::Buffer(buf, next) = self else {
            return;
        };
        if *next != Next::TryPipe || n < buf.len() {
            return;
        }
        *next = Next::NoPipe;
        match os::pipe().and_then(|(read, write)| {
            let capacity = os::pipe_capacity(read.as_fd())?;
            Ok((read, write, capacity))
        }) {
            Ok((read, write, capacity)) if capacity >= SPLICE_CHUNK => {
                *self = Stage::Pipe { read, write };
            }
            Ok((_, _, capacity)) => debug!(
                capacity,
                "pipe too small (fs.pipe-user-pages-soft reached); the TCP relay keeps copying"
            ),
            Err(e) => debug!(error = %e, "no pipe for the TCP relay; it keeps copying"),
        }
    }
}

/// Move `src`'s bytes to `dst` until `src` ends, then shut `dst`'s write side. `moved` counts
/// the bytes written to `dst`, also when this fails part way.
async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    stage: &mut Stage,
    moved: &mut u64,
) -> io::Result<()> {
    loop {
        let n = loop {
            src.readable().await?;
            match stage.fill(src) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return match socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
                // The other side has gone already: nothing is left to tell it.
                Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
                _ => Ok(()),
            };
        }
        let mut done = 0;
        while done < n {
            dst.writable().await?;
            match stage.drain(dst, done, n) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => {
                    done += m;
                    *moved += m as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        stage.settle(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// client ⇄ [relay: down, up] ⇄ server: 8 MiB up, 3 MiB down at the same time, then each
    /// side's half-close reaches the other, and the counts are exact.
    async fn bulk_both_ways_with_half_close(mode: Mode) {
        let (mut client, down) = pair().await;
        let (up, mut server) = pair().await;
        let relay = tokio::spawn(async move { relay(&down, &up, mode).await });
        let (to_server, to_client) = (pattern(8 << 20, 1), pattern(3 << 20, 7));
        let (c_out, s_out) = (to_server.clone(), to_client.clone());
        let client_task = tokio::spawn(async move {
            let (mut r, mut w) = client.split();
            let (_, got) = tokio::join!(
                async {
                    w.write_all(&c_out).await.unwrap();
                    w.shutdown().await.unwrap();
                },
                async {
                    let mut got = Vec::new();
                    r.read_to_end(&mut got).await.unwrap();
                    got
                }
            );
            got
        });
        let server_task = tokio::spawn(async move {
            let mut got = Vec::new();
            // The client's half-close arrives as end of stream while the server still writes.
            server.read_to_end(&mut got).await.unwrap();
            server.write_all(&s_out).await.unwrap();
            server.shutdown().await.unwrap();
            got
        });
        let (at_client, at_server) = (client_task.await.unwrap(), server_task.await.unwrap());
        assert!(
            at_server == to_server,
            "upstream got other bytes ({mode:?})"
        );
        assert!(
            at_client == to_client,
            "downstream got other bytes ({mode:?})"
        );
        let done = relay.await.unwrap();
        assert!(done.error.is_none(), "{:?}", done.error);
        assert_eq!(done.to_upstream, 8 << 20);
        assert_eq!(done.to_downstream, 3 << 20);
        let how = match mode {
            Mode::Splice => How::Splice,
            Mode::Buffered => How::Copy,
        };
        assert_eq!(done.moved, [how, how]);
    }

    #[test]
    fn a_full_buffer_moves_to_a_pipe_in_splice_mode_only() {
        // Otherwise the splice test below would quietly test the buffered path twice.
        let mut s = Stage::new(Mode::Splice);
        s.settle(BUFFER - 1);
        assert_eq!(s.how(), How::Copy, "a short read is not bulk");
        s.settle(BUFFER);
        assert_eq!(s.how(), How::Splice);
        let mut b = Stage::new(Mode::Buffered);
        b.settle(BUFFER);
        assert_eq!(b.how(), How::Copy);
    }

    #[tokio::test]
    async fn splice_moves_every_byte_and_passes_half_close() {
        bulk_both_ways_with_half_close(Mode::Splice).await;
    }

    #[tokio::test]
    async fn buffered_moves_every_byte_and_passes_half_close() {
        bulk_both_ways_with_half_close(Mode::Buffered).await;
    }

    /// A reset from the upstream ends the relay with an error (the downstream is not left
    /// open), and the bytes already moved are still counted.
    #[tokio::test]
    async fn upstream_reset_ends_the_relay_and_keeps_counts() {
        for mode in [Mode::Splice, Mode::Buffered] {
            let (mut client, down) = pair().await;
            let (up, mut server) = pair().await;
            let relay = tokio::spawn(async move { relay(&down, &up, mode).await });
            client.write_all(b"hello").await.unwrap();
            let mut got = [0; 5];
            server.read_exact(&mut got).await.unwrap();
            // Enough for the downstream direction to move to a pipe in splice mode.
            let bulk = pattern(1 << 20, 3);
            let (wrote, back) = tokio::join!(server.write_all(&bulk), async {
                let mut back = vec![0; 1 << 20];
                client.read_exact(&mut back).await.map(|_| back)
            });
            wrote.unwrap();
            assert!(back.unwrap() == bulk);
            // SO_LINGER 0: close sends RST.
            socket2::SockRef::from(&server)
                .set_linger(Some(std::time::Duration::ZERO))
                .unwrap();
            drop(server);
            let done = tokio::time::timeout(std::time::Duration::from_secs(10), relay)
                .await
                .expect("the relay ends after a reset")
                .unwrap();
            assert!(done.error.is_some(), "{mode:?}: a reset is an error");
            assert_eq!(
                (done.to_upstream, done.to_downstream),
                (5, 1 << 20),
                "{mode:?}"
            );
            // Only the downstream direction was a bulk one.
            let bulk = match mode {
                Mode::Splice => How::Splice,
                Mode::Buffered => How::Copy,
            };
            assert_eq!(done.moved, [How::Copy, bulk], "{mode:?}");
            // The client sees the end, not a hang.
            let mut rest = Vec::new();
            let _ = client.read_to_end(&mut rest).await;
            assert!(rest.is_empty());
        }
    }
}
