//! The fleet's certificates (`juice certs fleet ...`): a CA of the fleet's own, and the
//! certificates it signs for etcd, for the operator and for each host.
//!
//! The fleet's CA is not the daemon API's (`juice certs DIR`): a daemon's API accepts any
//! client certificate its CA signed, so host certificates from that CA would let every host
//! drive every other host's API. etcd, for its part, takes a client certificate's common
//! name as its user: the operator's is `root`, a host's `host-<host-id>`.
//!
//! A CA directory holds `ca.pem` and `ca-key.pem` (kept by the operator: it signs the hosts'
//! certificates later), and one directory per certificate, each with `ca.pem`, `cert.pem`
//! and `key.pem`, ready to be copied where it is used (a host's `$JUICE_HOME/fleet-tls`).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData,
};

use crate::error::{Error, Result};
use crate::record::HostId;
use crate::tls::{CA, CERT, KEY};

/// The CA's private key, beside `ca.pem`.
pub const CA_KEY: &str = "ca-key.pem";
/// The operator's certificate directory in a CA directory (user `root` in etcd).
pub const OPERATOR: &str = "operator";
/// etcd's certificate directory in a CA directory.
pub const ETCD: &str = "etcd";
/// etcd's user for the operator: its `root`, the one user that may change users and roles.
pub const OPERATOR_USER: &str = "root";
const CA_NAME: &str = "juice fleet CA";

/// etcd's user (and a certificate's common name) for a host.
pub fn host_user(id: &HostId) -> String {
    format!("host-{id}")
}

fn setup(path: &Path) -> impl Fn(rcgen::Error) -> Error + '_ {
    move |e| Error::Tls {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

fn write(path: &Path, text: &str, private: bool) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e: std::io::Error| Error::File {
        path: path.to_owned(),
        source: e,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io)?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(io)
}

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, CA_NAME);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(ca)
}

/// Makes the fleet's CA in `dir` (which must not hold one already: certificates it signed
/// would no longer be trusted) and the operator's certificate in `dir/operator`.
pub fn init(dir: &Path) -> Result<PathBuf> {
    let ca_pem = dir.join(CA);
    if ca_pem.exists() {
        return Err(Error::Tls {
            path: ca_pem,
            reason: "a fleet CA is already there (making another would orphan every certificate it signed)".into(),
        });
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::File {
        path: dir.to_owned(),
        source: e,
    })?;
    let err = setup(&ca_pem);
    let key = KeyPair::generate().map_err(&err)?;
    let cert = ca_params().map_err(&err)?.self_signed(&key).map_err(&err)?;
    write(&dir.join(CA_KEY), &key.serialize_pem(), true)?;
    write(&ca_pem, &cert.pem(), false)?;
    issue(
        dir,
        OPERATOR,
        OPERATOR_USER,
        &[],
        &[ExtendedKeyUsagePurpose::ClientAuth],
    )
}

/// A certificate for etcd's members in `dir/etcd`, valid for `names` (DNS names or IP
/// addresses), for serving clients (and as a client of itself, which etcd's gateway is).
pub fn etcd(dir: &Path, names: &[String]) -> Result<PathBuf> {
    issue(
        dir,
        ETCD,
        "juice fleet etcd",
        names,
        &[
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    )
}

/// A host's certificate in `dir/host-<id>`: its common name `host-<id>` is its user in etcd.
pub fn host(dir: &Path, id: &HostId) -> Result<PathBuf> {
    let user = host_user(id);
    issue(
        dir,
        &user,
        &user,
        &[],
        &[ExtendedKeyUsagePurpose::ClientAuth],
    )
}

/// Signs a certificate with the CA in `dir` and writes it, with the CA and its key, to
/// `dir/name`.
fn issue(
    dir: &Path,
    name: &str,
    common_name: &str,
    sans: &[String],
    usages: &[ExtendedKeyUsagePurpose],
) -> Result<PathBuf> {
    let (ca_pem, ca_key_path) = (dir.join(CA), dir.join(CA_KEY));
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|e| Error::Tls {
            path: path.to_owned(),
            reason: if e.kind() == std::io::ErrorKind::NotFound {
                "missing: make the fleet's CA first with `juice certs fleet init DIR`".to_owned()
            } else {
                e.to_string()
            },
        })
    };
    let ca_text = read(&ca_pem)?;
    let ca_key = KeyPair::from_pem(&read(&ca_key_path)?).map_err(setup(&ca_key_path))?;
    check_pair(&ca_pem, &ca_text, &ca_key)?;
    // The issuer is the CA's name, key identifier and usages, made as `init` made them.
    let issuer = Issuer::new(ca_params().map_err(setup(&ca_pem))?, &ca_key);

    let out = dir.join(name);
    let err = setup(&out);
    std::fs::create_dir_all(&out).map_err(|e| Error::File {
        path: out.clone(),
        source: e,
    })?;
    let mut params = CertificateParams::new(sans.to_vec()).map_err(&err)?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = usages.to_vec();
    let key = KeyPair::generate().map_err(&err)?;
    let cert = params.signed_by(&key, &issuer).map_err(&err)?;
    write(&out.join(CA), &ca_text, false)?;
    write(&out.join(CERT), &cert.pem(), false)?;
    write(&out.join(KEY), &key.serialize_pem(), true)?;
    Ok(out.clone())
}

/// `ca.pem` must be the CA `init` made, with `key` its key: anything else would sign
/// certificates that chain to nothing.
fn check_pair(path: &Path, pem: &str, key: &KeyPair) -> Result<()> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let bad = |reason: &str| Error::Tls {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| bad("holds no PEM certificate"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| bad(&format!("not an X.509 certificate ({e})")))?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|n| n.as_str().ok());
    if name != Some(CA_NAME) {
        return Err(bad(&format!(
            "not a fleet CA (its name is not {CA_NAME:?})"
        )));
    }
    if cert.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
        return Err(bad(&format!("{CA_KEY} beside it is not its key")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_refuses_to_replace_a_ca_and_issuing_needs_one() {
        let dir = tempfile::tempdir().unwrap();
        let id: HostId = "0123456789abcdef0123456789abcdef".parse().unwrap();
        let e = host(dir.path(), &id).unwrap_err().to_string();
        assert!(
            e.contains("ca.pem: missing: make the fleet's CA first"),
            "{e}"
        );
        init(dir.path()).unwrap();
        let e = init(dir.path()).unwrap_err().to_string();
        assert!(e.contains("a fleet CA is already there"), "{e}");
        let etcd = etcd(dir.path(), &["127.0.0.1".into(), "etcd-1".into()]).unwrap();
        assert!(etcd.join(CERT).exists() && etcd.join(KEY).exists());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(etcd.join(KEY)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_ca_key_that_is_not_the_cas_is_refused() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        init(a.path()).unwrap();
        init(b.path()).unwrap();
        std::fs::copy(b.path().join(CA_KEY), a.path().join(CA_KEY)).unwrap();
        let id: HostId = "0123456789abcdef0123456789abcdef".parse().unwrap();
        let e = host(a.path(), &id).unwrap_err().to_string();
        assert!(e.contains("ca-key.pem beside it is not its key"), "{e}");
    }
}
