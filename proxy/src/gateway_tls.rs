//! TLS for gateway servers: per server, a rustls configuration (chosen per connection by the
//! ClientHello's SNI among the servers of the port) with its certificate from the Kubernetes
//! Secret named by `credentialName` (in the
//! gateway's namespace; `tls.crt`/`tls.key`, or `cert`/`key`), or from `serverCertificate` /
//! `privateKey` files. `MUTUAL` verifies client certificates against `ca.crt` (or the
//! `<credentialName>-cacert` Secret, or `caCertificates`). Built once per configuration change,
//! so a rotated Secret is served to new connections without a restart. A server whose material
//! is missing or bad is reported and left out; the other servers keep working.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::gateway::Server;

/// The terminating servers of one port: each one's hosts and TLS configuration.
pub type PortConfigs = Vec<(Vec<String>, Arc<rustls::ServerConfig>)>;

/// Secrets by (namespace, name): their decoded data.
pub type Secrets = HashMap<(String, String), BTreeMap<String, Vec<u8>>>;

#[derive(Debug)]
struct SniResolver {
    entries: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match hello.server_name() {
            Some(sni) => self
                .entries
                .iter()
                .find(|(hosts, _)| hosts.iter().any(|h| crate::gateway::host_matches(h, sni)))
                .map(|(_, k)| k.clone()),
            // No SNI: the first server's certificate, as Envoy's first filter chain would.
            None => self.entries.first().map(|(_, k)| k.clone()),
        }
    }
}

fn key_of(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate is not PEM: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate in the PEM data".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("private key is not PEM: {e}"))?;
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("unusable private key: {e}"))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()
        .map_err(|e| format!("the private key does not match the certificate: {e}"))?;
    Ok(Arc::new(ck))
}

/// A server's PEM material: certificate chain, key, and client CA (MUTUAL).
type Material = (Vec<u8>, Vec<u8>, Option<Vec<u8>>);

fn material(s: &Server, ns: &str, secrets: &Secrets) -> Result<Material, String> {
    if let Some(name) = &s.tls.credential_name {
        let data = secrets.get(&(ns.to_owned(), name.clone())).ok_or_else(|| {
            format!("credentialName {name:?}: no Secret of that name in namespace {ns}")
        })?;
        let pick = |a: &str, b: &str| data.get(a).or_else(|| data.get(b)).cloned();
        let cert = pick("tls.crt", "cert")
            .ok_or_else(|| format!("Secret {ns}/{name} has no tls.crt (or cert)"))?;
        let key = pick("tls.key", "key")
            .ok_or_else(|| format!("Secret {ns}/{name} has no tls.key (or key)"))?;
        let ca = pick("ca.crt", "cacert").or_else(|| {
            secrets
                .get(&(ns.to_owned(), format!("{name}-cacert")))
                .and_then(|d| d.get("ca.crt").or_else(|| d.get("cacert")).cloned())
        });
        return Ok((cert, key, ca));
    }
    let read = |p: &Option<String>, what: &str| -> Result<Vec<u8>, String> {
        let p = p
            .as_ref()
            .ok_or_else(|| format!("needs credentialName or {what}"))?;
        std::fs::read(p).map_err(|e| format!("{what} {p}: {e}"))
    };
    let cert = read(&s.tls.server_certificate, "serverCertificate")?;
    let key = read(&s.tls.private_key, "privateKey")?;
    let ca = match &s.tls.ca_certificates {
        Some(p) => Some(std::fs::read(p).map_err(|e| format!("caCertificates {p}: {e}"))?),
        None => None,
    };
    Ok((cert, key, ca))
}

/// Per terminating server on one port: its hosts and its own TLS configuration (certificate,
/// client verification for MUTUAL, minimum version); plus a line per server left out, naming
/// the Gateway, port and reason. The connection's SNI picks the server.
pub fn server_configs(
    servers: &[(String, Server)],
    namespace: &str,
    secrets: &Secrets,
) -> (PortConfigs, Vec<String>) {
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for (gw, s) in servers {
        let mode = s.tls_mode.as_deref().unwrap_or("SIMPLE");
        if !matches!(mode, "SIMPLE" | "MUTUAL") {
            continue;
        }
        let hosts: Vec<String> = s.hosts.iter().map(|(_, h)| h.clone()).collect();
        let built = material(s, namespace, secrets).and_then(|(c, k, ca)| {
            let key = key_of(&c, &k)?;
            build(key, (mode == "MUTUAL").then_some(ca), s.tls.min_tls13)
        });
        match built {
            Ok(cfg) => out.push((hosts, cfg)),
            Err(e) => errors.push(format!(
                "Gateway {gw} port {} hosts {hosts:?}: {e}; this server is not served",
                s.port
            )),
        }
    }
    (out, errors)
}

fn build(
    key: Arc<CertifiedKey>,
    client_ca: Option<Option<Vec<u8>>>,
    tls13_only: bool,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS12, &rustls::version::TLS13]
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS setup: {e}"))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(None) => {
            return Err(
                "MUTUAL needs ca.crt (in the Secret, a <name>-cacert Secret, or caCertificates)"
                    .into(),
            );
        }
        Some(Some(ca)) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&ca).filter_map(Result::ok) {
                roots.add(c).map_err(|e| format!("ca.crt: {e}"))?;
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("client certificate verification: {e}"))?;
            builder.with_client_cert_verifier(v)
        }
    };
    let mut cfg = builder.with_cert_resolver(Arc::new(SniResolver {
        entries: vec![(vec!["*".to_owned()], key)],
    }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The configuration of the server whose hosts match the SNI (no SNI: the first server).
pub fn pick<'a>(
    configs: &'a PortConfigs,
    sni: Option<&str>,
) -> Option<&'a Arc<rustls::ServerConfig>> {
    match sni {
        Some(sni) => configs
            .iter()
            .find(|(hosts, _)| hosts.iter().any(|h| crate::gateway::host_matches(h, sni)))
            .map(|(_, c)| c),
        None => configs.first().map(|(_, c)| c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::{ServerProtocol, ServerTls};

    fn pair(names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .expect("params");
        let cert = params.self_signed(&key).expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    fn server(host: &str, mode: &str, tls: ServerTls) -> (String, Server) {
        (
            "ns/gw".into(),
            Server {
                port: 443,
                protocol: ServerProtocol::Https,
                name: None,
                hosts: vec![(None, host.into())],
                https_redirect: false,
                tls_mode: Some(mode.into()),
                tls,
            },
        )
    }

    fn secret(cert: &str, key: &str) -> BTreeMap<String, Vec<u8>> {
        [
            ("tls.crt".to_owned(), cert.as_bytes().to_vec()),
            ("tls.key".to_owned(), key.as_bytes().to_vec()),
        ]
        .into()
    }

    #[test]
    fn servers_get_their_certificates_and_bad_ones_are_named() {
        let (a_cert, a_key) = pair(&["a.example.com"]);
        let (_, other_key) = pair(&["x"]);
        let dir = std::env::temp_dir().join(format!("ferry-gwtls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (f_cert, f_key) = pair(&["f.example.com"]);
        std::fs::write(dir.join("f.crt"), &f_cert).expect("write");
        std::fs::write(dir.join("f.key"), &f_key).expect("write");
        let mut secrets = Secrets::new();
        secrets.insert(("gw".into(), "a".into()), secret(&a_cert, &a_key));
        secrets.insert(
            ("gw".into(), "mismatch".into()),
            secret(&a_cert, &other_key),
        );
        let cred = |n: &str| ServerTls {
            credential_name: Some(n.into()),
            ..ServerTls::default()
        };
        let servers = vec![
            server("a.example.com", "SIMPLE", cred("a")),
            server("b.example.com", "SIMPLE", cred("missing")),
            server("c.example.com", "SIMPLE", cred("mismatch")),
            server("m.example.com", "MUTUAL", cred("a")),
            server(
                "f.example.com",
                "SIMPLE",
                ServerTls {
                    server_certificate: Some(dir.join("f.crt").display().to_string()),
                    private_key: Some(dir.join("f.key").display().to_string()),
                    ..ServerTls::default()
                },
            ),
        ];
        let (configs, errors) = server_configs(&servers, "gw", &secrets);
        let hosts: Vec<&str> = configs.iter().map(|(h, _)| h[0].as_str()).collect();
        assert_eq!(hosts, ["a.example.com", "f.example.com"]);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(
            errors[0].contains("credentialName \"missing\": no Secret"),
            "{errors:?}"
        );
        assert!(errors[1].contains("does not match"), "{errors:?}");
        assert!(errors[2].contains("MUTUAL needs ca.crt"), "{errors:?}");
        assert!(pick(&configs, Some("f.example.com")).is_some());
        assert!(pick(&configs, Some("zzz.example.com")).is_none());
        assert!(pick(&configs, None).is_some(), "no SNI: the first server");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
