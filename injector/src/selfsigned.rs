//! Self-managed webhook TLS: the injector keeps its own CA and serving certificate in a Secret,
//! renews them before they expire, writes the pair where the server reads it (the server reloads
//! it without a restart), and keeps every `caBundle` of its MutatingWebhookConfiguration equal to
//! the CA bundle — so there is no manual step and nothing for GitOps to fight over.
//!
//! Several replicas share one Secret: writes carry the resourceVersion they read, and a replica
//! that loses a race adopts what the winner wrote.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// CA lifetime; a new CA is made when less than a third is left (the old one stays in the
/// bundle until it expires, so certificates it signed keep verifying).
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Serving certificate lifetime; renewed when less than a third is left.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(365 * 86_400);
/// Annotation on the Secret naming the DNS names the serving certificate was issued for.
pub const DNS_ANNOTATION: &str = "ferry.dev/dns-names";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("issuing a certificate: {0}")]
    Issue(String),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "MutatingWebhookConfiguration {0:?} not found (the chart creates it; is --webhook-config right?)"
    )]
    NoWebhookConfig(String),
}

/// What to manage.
#[derive(Clone, Debug)]
pub struct Settings {
    pub namespace: String,
    pub secret: String,
    pub webhook_config: String,
    pub dns_names: Vec<String>,
    /// Where the serving pair goes (what the server reads and reloads).
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub interval: Duration,
}

/// The Secret's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// Current CA first, then older CAs still valid.
    pub ca_crt: String,
    pub ca_key: String,
    pub tls_crt: String,
    pub tls_key: String,
    pub dns_names: Vec<String>,
}

/// What a reconcile must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Keep,
    NewLeaf(String),
    NewCa(String),
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn expiries(pem: &str) -> Vec<i64> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .filter_map(|c| crate::cert::not_after(&c))
        .collect()
}

/// Pure: whether the bundle still serves these names with enough life left.
pub fn decide(b: Option<&Bundle>, now: i64, dns_names: &[String]) -> Decision {
    let Some(b) = b else {
        return Decision::NewCa("no certificate yet".into());
    };
    let third = |d: Duration| (d.as_secs() / 3) as i64;
    match expiries(&b.ca_crt).first() {
        None => return Decision::NewCa("the CA certificate is unreadable".into()),
        Some(t) if t - now < third(CA_LIFETIME) => {
            return Decision::NewCa(format!(
                "the CA expires at {t} (less than a third of its life left)"
            ));
        }
        _ => {}
    }
    match expiries(&b.tls_crt).first() {
        None => Decision::NewLeaf("the serving certificate is unreadable".into()),
        Some(t) if t - now < third(LEAF_LIFETIME) => Decision::NewLeaf(format!(
            "the serving certificate expires at {t} (less than a third of its life left)"
        )),
        _ if b.dns_names != dns_names => Decision::NewLeaf(format!(
            "issued for {:?}, needed for {dns_names:?}",
            b.dns_names
        )),
        _ if !pair_matches(&b.tls_crt, &b.tls_key) => {
            Decision::NewLeaf("the serving key does not match its certificate".into())
        }
        _ => Decision::Keep,
    }
}

fn pair_matches(cert_pem: &str, key_pem: &str) -> bool {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .filter_map(Result::ok)
        .collect();
    let Ok(key) = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()) else {
        return false;
    };
    let Ok(signing) = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
    else {
        return false;
    };
    !chain.is_empty()
        && rustls::sign::CertifiedKey::new(chain, signing)
            .keys_match()
            .is_ok()
}

fn issue_err(e: rcgen::Error) -> Error {
    Error::Issue(e.to_string())
}

fn validity(p: &mut CertificateParams, life: Duration) {
    let start = SystemTime::now() - Duration::from_secs(300);
    p.not_before = start.into();
    p.not_after = (start + life).into();
}

/// The CA's identity. Signing needs only its name and key, so a leaf can be signed with the
/// stored key without parsing the stored certificate.
fn ca_params() -> Result<CertificateParams, Error> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(issue_err)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.distinguished_name
        .push(DnType::CommonName, "ferry-injector webhook CA");
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(p)
}

/// A new CA: (certificate PEM, key PEM).
pub fn new_ca() -> Result<(String, String), Error> {
    let mut p = ca_params()?;
    validity(&mut p, CA_LIFETIME);
    let key = KeyPair::generate().map_err(issue_err)?;
    let cert = p.self_signed(&key).map_err(issue_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A serving certificate for `dns_names`, signed by the CA: (certificate PEM, key PEM).
pub fn new_leaf(
    ca_crt: &str,
    ca_key: &str,
    dns_names: &[String],
) -> Result<(String, String), Error> {
    let ca_key = KeyPair::from_pem(ca_key).map_err(issue_err)?;
    if CertificateDer::pem_slice_iter(ca_crt.as_bytes())
        .next()
        .is_none()
    {
        return Err(Error::Issue("no CA certificate".into()));
    }
    let issuer = Issuer::new(ca_params()?, ca_key);
    let mut p = CertificateParams::new(dns_names.to_vec()).map_err(issue_err)?;
    p.distinguished_name.push(
        DnType::CommonName,
        dns_names.first().map_or("ferry-injector", String::as_str),
    );
    validity(&mut p, LEAF_LIFETIME);
    let key = KeyPair::generate().map_err(issue_err)?;
    let cert = p.signed_by(&key, &issuer).map_err(issue_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Pure-ish: the bundle after a decision (new material is generated here).
pub fn renew(
    old: Option<&Bundle>,
    decision: &Decision,
    dns_names: &[String],
) -> Result<Option<Bundle>, Error> {
    let now = now();
    match decision {
        Decision::Keep => Ok(None),
        Decision::NewLeaf(_) => {
            let old = old.ok_or_else(|| Error::Issue("no CA to sign with".into()))?;
            let (tls_crt, tls_key) = new_leaf(&old.ca_crt, &old.ca_key, dns_names)?;
            Ok(Some(Bundle {
                tls_crt,
                tls_key,
                dns_names: dns_names.to_vec(),
                ..old.clone()
            }))
        }
        Decision::NewCa(_) => {
            let (ca, ca_key) = new_ca()?;
            // Keep older CAs that are still valid: certificates they signed keep verifying while
            // the new bundle propagates.
            let mut bundle = ca.clone();
            if let Some(old) = old {
                for c in
                    CertificateDer::pem_slice_iter(old.ca_crt.as_bytes()).filter_map(Result::ok)
                {
                    if crate::cert::not_after(&c).is_some_and(|t| t > now) {
                        let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
                        let lines: Vec<&str> = b64
                            .as_bytes()
                            .chunks(64)
                            .map(|l| std::str::from_utf8(l).unwrap_or_default())
                            .collect();
                        bundle.push_str(&format!(
                            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                            lines.join("\n")
                        ));
                    }
                }
            }
            let (tls_crt, tls_key) = new_leaf(&ca, &ca_key, dns_names)?;
            Ok(Some(Bundle {
                ca_crt: bundle,
                ca_key,
                tls_crt,
                tls_key,
                dns_names: dns_names.to_vec(),
            }))
        }
    }
}

fn bundle_of(s: &Secret) -> Option<Bundle> {
    let data = s.data.as_ref()?;
    let get = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    Some(Bundle {
        ca_crt: get("ca.crt")?,
        ca_key: get("ca.key")?,
        tls_crt: get("tls.crt")?,
        tls_key: get("tls.key")?,
        dns_names: s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DNS_ANNOTATION))
            .map(|n| n.split(',').map(str::to_owned).collect())
            .unwrap_or_default(),
    })
}

fn secret_of(s: &Settings, b: &Bundle, meta: Option<&ObjectMeta>) -> Secret {
    let bytes = |v: &str| ByteString(v.as_bytes().to_vec());
    let mut m = meta.cloned().unwrap_or_default();
    m.name = Some(s.secret.clone());
    m.namespace = Some(s.namespace.clone());
    m.annotations
        .get_or_insert_with(Default::default)
        .insert(DNS_ANNOTATION.into(), b.dns_names.join(","));
    m.labels.get_or_insert_with(Default::default).insert(
        "app.kubernetes.io/managed-by".into(),
        "ferry-injector".into(),
    );
    Secret {
        metadata: m,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [
                ("ca.crt".to_owned(), bytes(&b.ca_crt)),
                ("ca.key".to_owned(), bytes(&b.ca_key)),
                ("tls.crt".to_owned(), bytes(&b.tls_crt)),
                ("tls.key".to_owned(), bytes(&b.tls_key)),
            ]
            .into(),
        ),
        ..Default::default()
    }
}

/// What one reconcile did (for logs and tests).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub issued: Option<String>,
    pub adopted: bool,
    pub files_written: bool,
    pub ca_bundles_fixed: usize,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Bring the Secret, the files and the webhook configuration in line. Safe to run concurrently
/// from several replicas.
pub async fn reconcile(client: &kube::Client, s: &Settings) -> Result<Outcome, Error> {
    let mut out = Outcome::default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &s.namespace);
    let current = secrets.get_opt(&s.secret).await?;
    let mut bundle = current.as_ref().and_then(bundle_of);
    let decision = decide(bundle.as_ref(), now(), &s.dns_names);
    if let Some(new) = renew(bundle.as_ref(), &decision, &s.dns_names)? {
        let obj = secret_of(s, &new, current.as_ref().map(|c| &c.metadata));
        let written = match &current {
            None => secrets.create(&PostParams::default(), &obj).await,
            Some(_) => {
                secrets
                    .replace(&s.secret, &PostParams::default(), &obj)
                    .await
            }
        };
        match written {
            Ok(_) => {
                out.issued = Some(format!("{decision:?}"));
                bundle = Some(new);
            }
            // Another replica wrote first: use what it wrote.
            Err(e) if is_conflict(&e) => {
                out.adopted = true;
                bundle = secrets
                    .get_opt(&s.secret)
                    .await?
                    .as_ref()
                    .and_then(bundle_of);
            }
            Err(e) => return Err(e.into()),
        }
    }
    let Some(b) = bundle else {
        return Err(Error::Issue(
            "the Secret has no usable certificate after reconcile".into(),
        ));
    };
    out.files_written = write_files(&s.cert_path, &s.key_path, &b)?;
    out.ca_bundles_fixed = reconcile_ca_bundle(client, s, &b.ca_crt).await?;
    Ok(out)
}

/// Write tls.crt/tls.key if they differ (atomically: a reader never sees half a file).
fn write_files(cert: &Path, key: &Path, b: &Bundle) -> Result<bool, Error> {
    let mut changed = false;
    // The key first: the server reloads when the certificate changes.
    for (path, content) in [(key, &b.tls_key), (cert, &b.tls_crt)] {
        if std::fs::read_to_string(path).ok().as_deref() == Some(content.as_str()) {
            continue;
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let werr = |source| Error::Write {
            path: path.display().to_string(),
            source,
        };
        std::fs::write(&tmp, content).map_err(werr)?;
        std::fs::rename(&tmp, path).map_err(|source| Error::Write {
            path: path.display().to_string(),
            source,
        })?;
        changed = true;
    }
    Ok(changed)
}

/// Set every webhook's caBundle to the CA bundle; returns how many were wrong.
async fn reconcile_ca_bundle(
    client: &kube::Client,
    s: &Settings,
    ca_pem: &str,
) -> Result<usize, Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let mut mwc = api
        .get_opt(&s.webhook_config)
        .await?
        .ok_or_else(|| Error::NoWebhookConfig(s.webhook_config.clone()))?;
    let want = ByteString(ca_pem.as_bytes().to_vec());
    let mut fixed = 0;
    for hook in mwc.webhooks.iter_mut().flatten() {
        if hook.client_config.ca_bundle.as_ref() != Some(&want) {
            hook.client_config.ca_bundle = Some(want.clone());
            fixed += 1;
        }
    }
    if fixed > 0 {
        match api
            .replace(&s.webhook_config, &PostParams::default(), &mwc)
            .await
        {
            Ok(_) => {}
            // Someone else changed it meanwhile: the next round looks again.
            Err(e) if is_conflict(&e) => return Ok(0),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(fixed)
}

/// Reconcile until it succeeds (the server needs its certificate before it can listen), then
/// every `interval` forever.
pub async fn run(client: kube::Client, s: Settings, first: tokio::sync::oneshot::Sender<()>) {
    let mut first = Some(first);
    let mut backoff = Duration::from_millis(500);
    loop {
        let wait = match reconcile(&client, &s).await {
            Ok(o) => {
                if o.issued.is_some() || o.adopted || o.files_written || o.ca_bundles_fixed > 0 {
                    tracing::info!(
                        secret = %format!("{}/{}", s.namespace, s.secret),
                        issued = ?o.issued,
                        adopted = o.adopted,
                        files_written = o.files_written,
                        ca_bundles_fixed = o.ca_bundles_fixed,
                        "webhook TLS reconciled"
                    );
                }
                if let Some(tx) = first.take() {
                    let _ = tx.send(());
                }
                backoff = Duration::from_millis(500);
                s.interval
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "webhook TLS reconcile failed");
                let b = backoff;
                backoff = (backoff * 2).min(s.interval.max(Duration::from_secs(1)));
                b
            }
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["ferry-injector.ferry-system.svc".into()]
    }

    #[test]
    fn decisions() {
        assert!(matches!(decide(None, now(), &names()), Decision::NewCa(_)));
        let b = renew(None, &Decision::NewCa("x".into()), &names())
            .expect("issue")
            .expect("bundle");
        assert_eq!(decide(Some(&b), now(), &names()), Decision::Keep);
        // Two thirds of the leaf's life later it is renewed, the CA is kept.
        let later = now() + (LEAF_LIFETIME.as_secs() as i64) * 2 / 3 + 86_400;
        assert!(matches!(
            decide(Some(&b), later, &names()),
            Decision::NewLeaf(_)
        ));
        let much_later = now() + (CA_LIFETIME.as_secs() as i64) * 2 / 3 + 86_400;
        assert!(matches!(
            decide(Some(&b), much_later, &names()),
            Decision::NewCa(_)
        ));
        let other = vec!["other.ns.svc".to_owned()];
        assert!(matches!(
            decide(Some(&b), now(), &other),
            Decision::NewLeaf(_)
        ));
        let swapped = Bundle {
            tls_key: new_ca().expect("ca").1,
            ..b.clone()
        };
        assert!(matches!(
            decide(Some(&swapped), now(), &names()),
            Decision::NewLeaf(_)
        ));
    }

    #[test]
    fn a_new_ca_keeps_the_old_one_in_the_bundle() {
        let first = renew(None, &Decision::NewCa("x".into()), &names())
            .expect("issue")
            .expect("bundle");
        let second = renew(Some(&first), &Decision::NewCa("rotate".into()), &names())
            .expect("issue")
            .expect("bundle");
        let ders = |pem: &str| -> Vec<Vec<u8>> {
            CertificateDer::pem_slice_iter(pem.as_bytes())
                .filter_map(Result::ok)
                .map(|c| c.as_ref().to_vec())
                .collect()
        };
        let both = ders(&second.ca_crt);
        assert_eq!(both.len(), 2);
        assert_eq!(
            both[1],
            ders(&first.ca_crt)[0],
            "the old CA follows the new one"
        );
        let leaf = renew(Some(&first), &Decision::NewLeaf("x".into()), &names())
            .expect("issue")
            .expect("bundle");
        assert_eq!(leaf.ca_crt, first.ca_crt, "a new leaf keeps the CA");
        assert_ne!(leaf.tls_crt, first.tls_crt);
    }
}
