//! Mutual TLS to etcd: the CA etcd's certificate must come from, and the certificate and
//! key this client presents. etcd started with `--client-cert-auth` takes the client
//! certificate's common name as its user, so the certificate is also who this client is
//! for etcd's roles ([`crate::auth`]).
//!
//! A directory holds the three files, as `juice certs fleet ...` writes them:
//! `ca.pem`, `cert.pem` and `key.pem`.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};

/// The files of a TLS directory.
pub const CA: &str = "ca.pem";
pub const CERT: &str = "cert.pem";
pub const KEY: &str = "key.pem";

/// A client's TLS material for etcd, read and checked.
#[derive(Clone, PartialEq, Eq)]
pub struct FleetTls {
    /// Where it was read from, for error messages.
    pub dir: PathBuf,
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
    /// The certificate's subject common name: etcd's user for this client.
    user: String,
}

impl std::fmt::Debug for FleetTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("FleetTls")
            .field("dir", &self.dir)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl FleetTls {
    /// Reads `dir/ca.pem`, `dir/cert.pem` and `dir/key.pem`. A missing or unreadable file,
    /// a file that holds no PEM of its kind, or a certificate without a common name is an
    /// error naming the file.
    pub fn load(dir: &Path) -> Result<FleetTls> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|e| Error::Tls {
                reason: if e.kind() == std::io::ErrorKind::NotFound {
                    "missing (https:// endpoints need the fleet's CA, this client's certificate and its key: `juice certs fleet` makes them)".to_owned()
                } else {
                    e.to_string()
                },
                path,
            })
        };
        let (ca, cert, key) = (read(CA)?, read(CERT)?, read(KEY)?);
        let bad = |name: &str, reason: &str| Error::Tls {
            path: dir.join(name),
            reason: reason.to_owned(),
        };
        if CertificateDer::pem_slice_iter(&ca)
            .next()
            .is_none_or(|c| c.is_err())
        {
            return Err(bad(CA, "holds no PEM certificate"));
        }
        let Some(Ok(der)) = CertificateDer::pem_slice_iter(&cert).next() else {
            return Err(bad(CERT, "holds no PEM certificate"));
        };
        if PrivateKeyDer::from_pem_slice(&key).is_err() {
            return Err(bad(KEY, "holds no PEM private key"));
        }
        let user = common_name(&der)
            .map_err(|reason| bad(CERT, &reason))?
            .ok_or_else(|| {
                bad(
                    CERT,
                    "the certificate has no common name (etcd takes it as the user)",
                )
            })?;
        Ok(FleetTls {
            dir: dir.to_owned(),
            ca,
            cert,
            key,
            user,
        })
    }

    /// etcd's user for this client: the certificate's common name.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// tonic's configuration: trust only the fleet's CA, present this certificate.
    pub(crate) fn options(&self) -> etcd_client::TlsOptions {
        etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(&self.ca))
            .identity(etcd_client::Identity::from_pem(&self.cert, &self.key))
    }
}

/// A DER certificate's subject common name, if it has one.
pub fn common_name(der: &[u8]) -> Result<Option<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not an X.509 certificate ({e})"))?;
    Ok(cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|n| n.as_str().ok().map(str::to_owned)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_missing_or_bad_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = FleetTls::load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{}/ca.pem: missing", dir.path().display())),
            "{e}"
        );
        std::fs::write(dir.path().join(CA), "not pem").unwrap();
        let e = FleetTls::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("cert.pem: missing"), "{e}");
        std::fs::write(dir.path().join(CERT), "not pem").unwrap();
        let e = FleetTls::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("key.pem: missing"), "{e}");
        std::fs::write(dir.path().join(KEY), "not pem").unwrap();
        let e = FleetTls::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("ca.pem: holds no PEM certificate"), "{e}");
    }

    #[test]
    fn a_host_certificate_loads_with_its_common_name_as_the_user() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        crate::certs::init(&ca).unwrap();
        let id: crate::HostId = "0123456789abcdef0123456789abcdef".parse().unwrap();
        let host = crate::certs::host(&ca, &id).unwrap();
        let tls = FleetTls::load(&host).unwrap();
        assert_eq!(tls.user(), "host-0123456789abcdef0123456789abcdef");
        assert!(!format!("{tls:?}").contains("PRIVATE"));
        let root = FleetTls::load(&ca.join(crate::certs::OPERATOR)).unwrap();
        assert_eq!(root.user(), "root");
        // A key that is not one.
        std::fs::write(
            host.join(KEY),
            "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = FleetTls::load(&host).unwrap_err().to_string();
        assert!(e.contains("key.pem: holds no PEM private key"), "{e}");
    }
}
