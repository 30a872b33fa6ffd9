//! Test support shared by the unit tests of the upstream pools.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;

/// How the pools' tests connect: outbound, 2 s to connect, no keepalive.
pub fn dial() -> crate::transport::Dial {
    crate::transport::Dial {
        inbound: false,
        timeout: std::time::Duration::from_secs(2),
        keepalive: None,
    }
}

/// A loopback server that hands each accepted connection to `serve` on a task of its own, and
/// counts the connections opened and closed (once `serve` returns).
pub async fn counting_server<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let (opened, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (o, c) = (opened.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            o.fetch_add(1, Ordering::SeqCst);
            let (c, served) = (c.clone(), serve(s));
            tokio::spawn(async move {
                served.await;
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, opened, closed)
}

/// Waits until `done` holds, checking every `step`, at most `tries` times; whether it held.
pub async fn until(tries: usize, step: std::time::Duration, done: impl Fn() -> bool) -> bool {
    for _ in 0..tries {
        if done() {
            return true;
        }
        tokio::time::sleep(step).await;
    }
    done()
}
