//! The serving certificate: loaded from PEM files, served through a rustls resolver that swaps in
//! a new pair when the files change (no restart, no dropped requests: only new handshakes see
//! it), with the expiry time exported. A pair that fails to load is refused and the old one keeps
//! serving.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The certificate pair could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// A loaded pair and when its leaf expires (seconds since the epoch).
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    pub not_after: i64,
}

/// Load and check a PEM certificate chain and private key.
pub fn load(cert_path: &Path, key_path: &Path) -> Result<Loaded, Error> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| Error::Read {
            path: p.display().to_string(),
            source,
        })
    };
    let invalid = |p: &Path, reason: String| Error::Invalid {
        path: p.display().to_string(),
        reason,
    };
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(cert_path, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(invalid(cert_path, "no certificate in file".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| invalid(key_path, format!("not a PEM private key: {e}")))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| invalid(key_path, format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        invalid(
            key_path,
            format!("private key does not match the certificate: {e}"),
        )
    })?;
    let not_after = not_after(&certified.cert[0])
        .ok_or_else(|| invalid(cert_path, "cannot read the certificate's validity".into()))?;
    Ok(Loaded {
        key: Arc::new(certified),
        not_after,
    })
}

// === DER: just enough to read notAfter ===

/// (tag, content, rest) of the DER element at the start of `b`.
fn der(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)? as usize;
    let (len, hdr) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = hdr.checked_add(len)?;
    Some((tag, b.get(hdr..end)?, b.get(end..)?))
}

fn parse_time(tag: u8, s: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(s).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i64 = s.get(0..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, s.get(2..)?)
        }
        0x18 => (s.get(0..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    let n = |r: std::ops::Range<usize>| -> Option<i64> { rest.get(r)?.parse().ok() };
    let (mo, d, h, mi, se) = (n(0..2)?, n(2..4)?, n(4..6)?, n(6..8)?, n(8..10)?);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + h * 3600 + mi * 60 + se)
}

/// A certificate's notAfter, in seconds since the epoch.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, cert, _) = der(cert.as_ref())?; // Certificate
    let (_, tbs, _) = der(cert)?; // TBSCertificate
    let mut rest = tbs;
    let (tag, _, r) = der(rest)?;
    rest = r;
    if tag == 0xa0 {
        // explicit version; the serial number follows
        let (_, _, r) = der(rest)?;
        rest = r;
    }
    let (_, _, r) = der(rest)?; // signature algorithm
    let (_, _, r) = der(r)?; // issuer
    let (_, validity, _) = der(r)?;
    let (_, _, after) = der(validity)?; // notBefore
    let (tag, t, _) = der(after)?;
    parse_time(tag, t)
}

/// Serves the current pair; [`Store::reload_if_changed`] swaps it.
pub struct Store {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, i64, Option<u64>)>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .finish()
    }
}

/// A digest of both files' contents. Not their modification times: two updates within the
/// filesystem's timestamp granularity would look like one, and the second would never load.
fn stamp(a: &Path, b: &Path) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(a).ok()?.hash(&mut h);
    std::fs::read(b).ok()?.hash(&mut h);
    Some(h.finish())
}

/// What a reload check did.
#[derive(Debug)]
pub enum Reload {
    Unchanged,
    Swapped { not_after: i64 },
    Refused(Error),
}

impl Store {
    pub fn open(cert_path: &Path, key_path: &Path) -> Result<Store, Error> {
        let loaded = load(cert_path, key_path)?;
        Ok(Store {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            current: RwLock::new((loaded.key, loaded.not_after, stamp(cert_path, key_path))),
        })
    }

    pub fn not_after(&self) -> i64 {
        self.current.read().map(|c| c.1).unwrap_or_default()
    }

    /// Load the files again if their contents changed (Kubernetes updates mounted Secrets by
    /// swapping a symlink; a file missing mid-swap keeps the current pair).
    pub fn reload_if_changed(&self) -> Reload {
        let now = stamp(&self.cert_path, &self.key_path);
        let last = self.current.read().ok().and_then(|c| c.2);
        if now.is_none() || now == last {
            return Reload::Unchanged;
        }
        match load(&self.cert_path, &self.key_path) {
            Ok(l) => {
                if let Ok(mut c) = self.current.write() {
                    *c = (l.key, l.not_after, now);
                }
                Reload::Swapped {
                    not_after: l.not_after,
                }
            }
            Err(e) => {
                // Remember the stamp so a bad pair is reported once, not every poll.
                if let Ok(mut c) = self.current.write() {
                    c.2 = now;
                }
                Reload::Refused(e)
            }
        }
    }
}

impl ResolvesServerCert for Store {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.0.clone())
    }
}
