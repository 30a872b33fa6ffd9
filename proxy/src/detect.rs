//! Protocol detection: one peek at the first bytes, bounded by a short timeout. The timeout biases
//! towards availability: a client that says nothing (a server-first protocol such as MySQL or SMTP)
//! is treated as opaque TCP after the timeout instead of stalling.

use std::time::Duration;

use tokio::net::TcpStream;

pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// What the first bytes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Tls,
    Opaque,
    /// Nothing arrived before the timeout.
    Timeout,
}

/// Classify a prefix; `None` means "could still become HTTP, need more bytes".
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    if buf.len() >= 3 && buf[0] == 0x16 && buf[1] == 0x03 {
        return Some(Detected::Tls);
    }
    if H2_PREFACE.starts_with(&buf[..buf.len().min(H2_PREFACE.len())]) {
        return if buf.len() >= H2_PREFACE.len() {
            Some(Detected::Http2)
        } else {
            None
        };
    }
    let mut maybe = false;
    for m in METHODS {
        if buf.starts_with(m) {
            return Some(Detected::Http1);
        }
        if m.starts_with(buf) {
            maybe = true;
        }
    }
    if maybe { None } else { Some(Detected::Opaque) }
}

/// Peek until the prefix is decisive or the timeout expires. Nothing is consumed.
pub async fn detect(s: &TcpStream, timeout: Duration) -> Detected {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 24];
    loop {
        let n = match tokio::time::timeout_at(deadline, s.peek(&mut buf)).await {
            Ok(Ok(0)) => return Detected::Opaque,
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return Detected::Opaque,
            Err(_) => return Detected::Timeout,
        };
        if let Some(d) = classify(&buf[..n]) {
            return d;
        }
        // Undecided (a partial method or preface): wait for more, within the same deadline.
        if tokio::time::Instant::now() >= deadline {
            return Detected::Timeout;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x00]), Some(Detected::Tls));
        assert_eq!(classify(b"\x00\x01hello"), Some(Detected::Opaque));
        assert_eq!(classify(b"SSH-2.0"), Some(Detected::Opaque));
        assert_eq!(classify(b"HELO x"), Some(Detected::Opaque));
    }
}
