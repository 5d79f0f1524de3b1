//! Remote access to the API over TCP, only with mutual TLS (rustls, ring).
//!
//! `juice certs DIR` makes a CA and a server and a client certificate signed
//! by it; `juice daemon --listen ADDR` then requires every client to present a
//! certificate from that CA, and refuses anything else during the handshake.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot {action} {path}: {reason}")]
    File {
        action: &'static str,
        path: String,
        reason: String,
    },
    #[error("TLS setup: {0}")]
    Setup(String),
}

fn file_err(action: &'static str, path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        action,
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| file_err("write", path, e))?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| file_err("write", path, e))
}

/// Writes `ca.pem`, `server.pem`/`server-key.pem` (for `hosts`) and `client.pem`/`client-key.pem` into `dir`.
pub fn make_certificates(dir: &Path, hosts: &[String]) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|e| file_err("create", dir, e))?;
    let setup = |e: rcgen::Error| TlsError::Setup(e.to_string());
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(setup)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "juice CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca =
        CertifiedIssuer::self_signed(ca, KeyPair::generate().map_err(setup)?).map_err(setup)?;
    write(&dir.join("ca.pem"), &ca.pem(), false)?;

    let mut server = CertificateParams::new(hosts.to_vec()).map_err(setup)?;
    server
        .distinguished_name
        .push(DnType::CommonName, "juice daemon");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate().map_err(setup)?;
    let server_cert = server.signed_by(&server_key, &ca).map_err(setup)?;
    write(&dir.join("server.pem"), &server_cert.pem(), false)?;
    write(
        &dir.join("server-key.pem"),
        &server_key.serialize_pem(),
        true,
    )?;

    let mut client = CertificateParams::new(Vec::<String>::new()).map_err(setup)?;
    client
        .distinguished_name
        .push(DnType::CommonName, "juice operator");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_key = KeyPair::generate().map_err(setup)?;
    let client_cert = client.signed_by(&client_key, &ca).map_err(setup)?;
    write(&dir.join("client.pem"), &client_cert.pem(), false)?;
    write(
        &dir.join("client-key.pem"),
        &client_key.serialize_pem(),
        true,
    )
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err("read", path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err("read", path, e))
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err("read", path, e))
}

fn roots(dir: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&dir.join("ca.pem"))? {
        roots.add(c).map_err(|e| TlsError::Setup(e.to_string()))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The daemon's side: its certificate, and client certificates from the CA required.
pub fn server_config(dir: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(dir)?),
        provider(),
    )
    .build()
    .map_err(|e| TlsError::Setup(e.to_string()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs(&dir.join("server.pem"))?,
            key(&dir.join("server-key.pem"))?,
        )
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    Ok(Arc::new(config))
}

/// The client's side: the CA to trust, and the client certificate to present.
pub fn client_config(dir: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_root_certificates(roots(dir)?)
        .with_client_auth_cert(
            certs(&dir.join("client.pem"))?,
            key(&dir.join("client-key.pem"))?,
        )
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    Ok(Arc::new(config))
}

/// Connections the remote API holds at once; past this, new ones wait in the
/// kernel's backlog (and are dropped there), so strangers cannot take every descriptor.
pub const MAX_CONNECTIONS: usize = 256;
/// A client that has not finished the TLS handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `router` on `addr` to clients that complete a mutual-TLS handshake.
/// Clients before authentication are strangers: each has a handshake deadline,
/// they share a connection cap, and no error of one connection (or of
/// `accept`, such as running out of descriptors) stops the listener.
pub async fn serve_tls(
    addr: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    router: axum::Router,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(_) => {
                // EMFILE, ECONNABORTED and the like pass; back off a moment and go on.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            let _permit = permit;
            // A client without a certificate from our CA fails here, before any request is read.
            let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            // Who this client is, for the events of what it does (a debug session).
            let peer = crate::api::Peer(peer_name(tls.get_ref().1.peer_certificates()));
            let router = router.layer(axum::Extension(axum::extract::ConnectInfo(peer)));
            let service = hyper_util::service::TowerToHyperService::new(router);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .with_upgrades()
                .await;
        });
    }
}

/// A client certificate's subject common name (as `juice certs` issues them),
/// or its SHA-256 when it has none.
fn peer_name(certs: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> String {
    let Some(cert) = certs.and_then(|c| c.first()) else {
        return "a client without a certificate".into();
    };
    let cn = x509_parser::parse_x509_certificate(cert.as_ref())
        .ok()
        .and_then(|(_, c)| {
            c.subject()
                .iter_common_name()
                .next()
                .and_then(|n| n.as_str().ok().map(str::to_owned))
        });
    match cn {
        Some(cn) => format!("certificate {cn:?}"),
        None => {
            use sha2::Digest;
            format!(
                "certificate sha256:{}",
                hex::encode(sha2::Sha256::digest(cert.as_ref()))
            )
        }
    }
}

/// Connects to a remote daemon with mutual TLS.
pub async fn connect(
    addr: &str,
    dir: &Path,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let config = client_config(dir).map_err(|e| e.to_string())?;
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_matches(['[', ']'])
        .to_owned();
    let name = ServerName::try_from(host.clone()).map_err(|e| format!("{host}: {e}"))?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())
}
