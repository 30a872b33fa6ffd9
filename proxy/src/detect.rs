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

/// The server name (SNI) of a TLS ClientHello at the start of `buf`, if complete and present.
pub fn parse_sni(buf: &[u8]) -> Option<String> {
    // TLS record header: type 22 (handshake), version, length.
    let rec_len = u16::from_be_bytes([*buf.get(3)?, *buf.get(4)?]) as usize;
    let rec = buf.get(5..5 + rec_len.min(buf.len().saturating_sub(5)))?;
    // Handshake header: type 1 (ClientHello), 3-byte length.
    if *buf.first()? != 0x16 || *rec.first()? != 0x01 {
        return None;
    }
    let mut p = 4 + 2 + 32; // header, client_version, random
    let sid = *rec.get(p)? as usize;
    p += 1 + sid;
    let suites = u16::from_be_bytes([*rec.get(p)?, *rec.get(p + 1)?]) as usize;
    p += 2 + suites;
    let comp = *rec.get(p)? as usize;
    p += 1 + comp;
    let ext_len = u16::from_be_bytes([*rec.get(p)?, *rec.get(p + 1)?]) as usize;
    p += 2;
    let end = (p + ext_len).min(rec.len());
    while p + 4 <= end {
        let typ = u16::from_be_bytes([rec[p], rec[p + 1]]);
        let len = u16::from_be_bytes([rec[p + 2], rec[p + 3]]) as usize;
        let data = rec.get(p + 4..p + 4 + len)?;
        if typ == 0 {
            // server_name_list: length(2), then entries of type(1) length(2) name.
            let mut q = 2;
            while q + 3 <= data.len() {
                let name_type = data[q];
                let n = u16::from_be_bytes([data[q + 1], data[q + 2]]) as usize;
                let name = data.get(q + 3..q + 3 + n)?;
                if name_type == 0 {
                    return std::str::from_utf8(name)
                        .ok()
                        .map(|s| s.to_ascii_lowercase());
                }
                q += 3 + n;
            }
            return None;
        }
        p += 4 + len;
    }
    None
}

/// Peek a ClientHello (up to 4 KiB, within `timeout`) and return its SNI. Nothing is consumed.
pub async fn peek_sni(s: &TcpStream, timeout: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = match tokio::time::timeout_at(deadline, s.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return None,
        };
        if let Some(sni) = parse_sni(&buf[..n]) {
            return Some(sni);
        }
        let complete = n >= 5 && n >= 5 + u16::from_be_bytes([buf[3], buf[4]]) as usize;
        if complete || n == buf.len() || tokio::time::Instant::now() >= deadline {
            return None;
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

    #[test]
    fn sni_parser_never_panics_on_truncated_or_garbage_input() {
        // A ClientHello with SNI "a.b", built by hand.
        let name = b"a.b";
        let mut sni = vec![0x00, 0x00];
        let list_len = (3 + name.len()) as u16;
        let ext_len = 2 + list_len;
        sni.extend_from_slice(&ext_len.to_be_bytes());
        sni.extend_from_slice(&list_len.to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name);
        let mut hello = vec![0x03, 0x03];
        hello.extend_from_slice(&[7u8; 32]);
        hello.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        hello.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        hello.extend_from_slice(&sni);
        let mut hs = vec![0x01, 0, 0, hello.len() as u8];
        hs.extend_from_slice(&hello);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        assert_eq!(parse_sni(&rec).as_deref(), Some("a.b"));
        for cut in 0..rec.len() {
            let _ = parse_sni(&rec[..cut]);
        }
        let mut x: u32 = 12345;
        for _ in 0..2000 {
            let mut junk = rec.clone();
            for _ in 0..4 {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let i = (x as usize) % junk.len();
                junk[i] = (x >> 16) as u8;
            }
            let _ = parse_sni(&junk);
        }
    }
}
