//! TLS for SMTP listeners (rustls): loading a PEM certificate chain and key, a certificate
//! store that SIGHUP reloads without a restart, and the connection stream that switches from
//! plaintext to TLS at STARTTLS.
//!
//! Every handshake asks the listener's [`CertStore`] for its certificate, so a reload applies
//! to the next handshake; connections already encrypted keep the one they negotiated.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ProtocolVersion, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::{ListenConfig, TlsConfig};
use crate::job::TlsInfo;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: no certificate in it (expected PEM \"-----BEGIN CERTIFICATE-----\" sections)")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no private key in it (expected a PEM PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)")]
    NoKey { path: PathBuf },
    #[error("{path}: bad PEM: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("certificate {cert} with key {key}: {source}")]
    Unusable { cert: PathBuf, key: PathBuf, source: rustls::Error },
}

/// The crypto provider of every TLS listener. Named explicitly: both of rustls's providers are
/// compiled in (through other crates), so rustls cannot pick a process default by itself.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider())).clone()
}

/// What a log line says about a loaded certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// SHA-256 of the end-entity certificate (DER), hex.
    pub sha256: String,
    /// Certificates in the chain, the end-entity one included.
    pub chain: usize,
}

impl fmt::Display for CertSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256 {} ({} certificate{} in the chain)", self.sha256, self.chain, plural(self.chain))
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Reads a PEM certificate chain and private key and checks that they belong together.
pub fn load_certified_key(files: &TlsConfig) -> Result<CertifiedKey, TlsError> {
    let cert_pem = read(&files.cert)?;
    let mut chain = Vec::new();
    for item in CertificateDer::pem_slice_iter(&cert_pem) {
        chain.push(item.map_err(|e| pem_error(&files.cert, e))?);
    }
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: files.cert.clone() });
    }
    let key_pem = read(&files.key)?;
    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(k) => k,
        Err(rustls_pki_types::pem::Error::NoItemsFound) => return Err(TlsError::NoKey { path: files.key.clone() }),
        Err(e) => return Err(pem_error(&files.key, e)),
    };
    let unusable = |source| TlsError::Unusable { cert: files.cert.clone(), key: files.key.clone(), source };
    // Parses the key, and the end-entity certificate to compare their public keys.
    let ck = CertifiedKey::from_der(chain, key, &provider()).map_err(unusable)?;
    Ok(ck)
}

/// Checks a listener's certificate and key files as `serve` would load them.
pub fn check_files(files: &TlsConfig) -> Result<CertSummary, TlsError> {
    load_certified_key(files).map(|ck| summary(&ck))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })
}

fn pem_error(path: &Path, e: rustls_pki_types::pem::Error) -> TlsError {
    TlsError::Pem { path: path.to_path_buf(), message: e.to_string() }
}

fn summary(ck: &CertifiedKey) -> CertSummary {
    let leaf = ck.cert.first().map(|c| c.as_ref()).unwrap_or_default();
    CertSummary { sha256: hex::encode(Sha256::digest(leaf)), chain: ck.cert.len() }
}

/// One listener's certificate: read at startup, replaced by [`CertStore::reload`] (SIGHUP).
pub struct CertStore {
    files: TlsConfig,
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore").field("cert", &self.files.cert).field("key", &self.files.key).finish()
    }
}

impl CertStore {
    pub fn load(files: &TlsConfig) -> Result<CertStore, TlsError> {
        let ck = load_certified_key(files)?;
        Ok(CertStore { files: files.clone(), current: RwLock::new(Arc::new(ck)) })
    }

    /// Reads the files again. On success new handshakes use the new certificate; on failure
    /// the old one stays in use.
    pub fn reload(&self) -> Result<CertSummary, TlsError> {
        let ck = load_certified_key(&self.files)?;
        let s = summary(&ck);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ck);
        Ok(s)
    }

    pub fn summary(&self) -> CertSummary {
        summary(&self.current())
    }

    pub fn files(&self) -> &TlsConfig {
        &self.files
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The TLS side of one SMTP listener.
pub struct ListenerTls {
    pub store: Arc<CertStore>,
    acceptor: TlsAcceptor,
    /// TLS from the first byte (port 465 style); otherwise STARTTLS is offered.
    pub implicit: bool,
    /// Refuse mail before TLS (`530 5.7.0`).
    pub require: bool,
}

impl ListenerTls {
    /// The listener's TLS, when it has a `tls` table.
    pub fn for_listener(l: &ListenConfig) -> Result<Option<Arc<ListenerTls>>, TlsError> {
        let Some(files) = &l.tls else { return Ok(None) };
        let store = Arc::new(CertStore::load(files)?);
        Ok(Some(Arc::new(ListenerTls::new(store, l.implicit_tls, l.require_tls))))
    }

    pub fn new(store: Arc<CertStore>, implicit: bool, require: bool) -> ListenerTls {
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the provider supports the default TLS versions")
            .with_no_client_auth()
            .with_cert_resolver(store.clone());
        ListenerTls { store, acceptor: TlsAcceptor::from(Arc::new(config)), implicit, require }
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

/// A connection's stream: plaintext until a TLS handshake replaces it.
pub enum MaybeTls<S> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
    /// Only while a handshake runs, or after one failed: reads and writes fail.
    Gone,
}

impl<S: AsyncRead + AsyncWrite + Unpin> MaybeTls<S> {
    /// Runs the server side of a TLS handshake on the plaintext stream, within `limit`.
    /// On failure the stream is gone and the connection must be dropped.
    pub async fn upgrade(&mut self, acceptor: &TlsAcceptor, limit: Duration) -> io::Result<TlsInfo> {
        let MaybeTls::Plain(plain) = std::mem::replace(self, MaybeTls::Gone) else {
            return Err(io::Error::other("TLS is already active"));
        };
        let tls = match tokio::time::timeout(limit, acceptor.accept(plain)).await {
            Ok(r) => r?,
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")),
        };
        *self = MaybeTls::Tls(Box::new(tls));
        self.tls_info().ok_or_else(|| io::Error::other("TLS handshake left no parameters"))
    }

    /// The negotiated version and cipher, once TLS is up.
    pub fn tls_info(&self) -> Option<TlsInfo> {
        let MaybeTls::Tls(tls) = self else { return None };
        let conn = tls.get_ref().1;
        let version = conn.protocol_version()?;
        let suite = conn.negotiated_cipher_suite()?.suite();
        Some(TlsInfo {
            version: version_name(version),
            cipher: suite.as_str().map(str::to_string).unwrap_or_else(|| format!("{suite:?}")),
        })
    }
}

/// `TLSv1.3`, as mail logs and Received headers write it.
fn version_name(v: ProtocolVersion) -> String {
    match v {
        ProtocolVersion::TLSv1_3 => "TLSv1.3".into(),
        ProtocolVersion::TLSv1_2 => "TLSv1.2".into(),
        other => format!("{other:?}"),
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection closed after a failed TLS handshake")
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            MaybeTls::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            MaybeTls::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            MaybeTls::Gone => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            MaybeTls::Gone => Poll::Ready(Ok(())),
        }
    }
}

/// A self-signed certificate for `mx.test` and its key, written to `dir` (tests only).
#[cfg(test)]
pub(crate) fn write_test_pair(dir: &Path, name: &str) -> (TlsConfig, CertificateDer<'static>) {
    let ck = rcgen::generate_simple_self_signed(vec!["mx.test".to_string()]).expect("rcgen");
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, ck.cert.pem()).expect("write cert");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
    (TlsConfig { cert, key }, ck.cert.der().clone())
}

/// A rustls client that trusts exactly `cert` (tests only).
#[cfg(test)]
pub(crate) fn test_connector(cert: CertificateDer<'static>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("root");
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> TlsConfig {
        write_test_pair(dir, name).0
    }

    #[test]
    fn loads_a_pair_and_refuses_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_pair(dir.path(), "a");
        let b = write_pair(dir.path(), "b");
        let s = check_files(&a).unwrap();
        assert_eq!((s.sha256.len(), s.chain), (64, 1));

        let missing = TlsConfig { cert: dir.path().join("none.crt"), key: a.key.clone() };
        assert!(matches!(check_files(&missing), Err(TlsError::Read { .. })));
        // the key file as the certificate, the certificate as the key
        let swapped = TlsConfig { cert: a.key.clone(), key: a.cert.clone() };
        assert!(matches!(check_files(&swapped), Err(TlsError::NoCertificate { .. })));
        let no_key = TlsConfig { cert: a.cert.clone(), key: a.cert.clone() };
        assert!(matches!(check_files(&no_key), Err(TlsError::NoKey { .. })));
        // a certificate with another certificate's key
        let mismatched = TlsConfig { cert: a.cert.clone(), key: b.key.clone() };
        let e = check_files(&mismatched).unwrap_err();
        assert!(matches!(e, TlsError::Unusable { .. }), "{e}");
        let garbage = dir.path().join("garbage.crt");
        std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n").unwrap();
        let e = check_files(&TlsConfig { cert: garbage, key: a.key.clone() }).unwrap_err();
        assert!(matches!(e, TlsError::Pem { .. } | TlsError::Unusable { .. }), "{e}");
    }

    #[test]
    fn reload_replaces_the_certificate_or_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_pair(dir.path(), "a");
        let store = CertStore::load(&a).unwrap();
        let first = store.summary();
        let b = write_pair(dir.path(), "b");
        std::fs::copy(&b.cert, &a.cert).unwrap();
        // certificate b with key a: refused, a stays
        assert!(store.reload().is_err());
        assert_eq!(store.summary(), first);
        std::fs::copy(&b.key, &a.key).unwrap();
        let second = store.reload().unwrap();
        assert_ne!(second, first);
        assert_eq!(store.summary(), second);
    }
}
