//! The TCP relay when no pipe can be had (the process is out of descriptors): a bulk transfer
//! still arrives whole, copied through the buffer, and the relay says so (`copy_no_pipe`, which
//! the proxy counts in `ferry_proxy_tcp_relay_directions_total`). A test binary of its own: it
//! lowers the process's descriptor limit, which would starve any test running beside it.

use ferry_proxy::relay::{How, Mode, relay};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (a, b) = tokio::join!(
        TcpStream::connect(l.local_addr().expect("addr")),
        l.accept()
    );
    (a.expect("connect"), b.expect("accept").0)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn bulk_without_a_pipe_is_copied_whole_and_says_so() {
    let (mut client, down) = pair().await;
    let (up, mut server) = pair().await;
    // From here no new descriptor: the limit just above the highest one open, and the free
    // numbers below it taken by pipes (held until the end).
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let highest = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .expect("open descriptors");
    setrlimit(Resource::RLIMIT_NOFILE, highest + 1, hard).expect("setrlimit");
    let mut held = Vec::new();
    let refused = loop {
        match ferry_proxy::os::pipe() {
            Ok(p) => held.push(p),
            Err(e) => break e,
        }
    };
    assert_eq!(
        refused.raw_os_error(),
        Some(nix::errno::Errno::EMFILE as i32),
        "{refused}"
    );

    let relay = tokio::spawn(async move { relay(&down, &up, Mode::Splice).await });
    let (to_server, to_client) = (pattern(2 << 20, 5), pattern(1 << 20, 9));
    let sent = to_server.clone();
    let client_side = async {
        client.write_all(&sent).await.expect("client write");
        client.shutdown().await.expect("client shutdown");
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("client read");
        got
    };
    let back = to_client.clone();
    let server_side = async {
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("server read");
        server.write_all(&back).await.expect("server write");
        server.shutdown().await.expect("server shutdown");
        got
    };
    let (at_client, at_server) = tokio::join!(client_side, server_side);
    let done = relay.await.expect("relay task");
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("restore the limit");
    drop(held);

    assert!(done.error.is_none(), "{:?}", done.error);
    assert!(at_server == to_server, "the upstream got other bytes");
    assert!(at_client == to_client, "the downstream got other bytes");
    assert_eq!((done.to_upstream, done.to_downstream), (2 << 20, 1 << 20));
    assert_eq!(done.moved, [How::CopyNoPipe, How::CopyNoPipe]);
}
