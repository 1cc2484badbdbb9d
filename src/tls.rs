//! HTTPS on the API listener: the certificate, key and client CA read from
//! files, a rustls `ServerConfig` rebuilt when they change (the way the
//! partner key is watched, kubelet's `..data` swap included), and the
//! verified client certificate's SPIFFE IDs for caller authentication.
//!
//! A reload swaps the config new handshakes take; connections already open
//! keep theirs. A pair that does not load (unreadable, not PEM, a key that
//! does not match the certificate) is refused: the old one stays, the error
//! is logged and counted. Session tickets and the session cache are shared
//! across reloads, so a rotation does not cost every caller a full handshake.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ProducesTickets, ServerSessionMemoryCache, StoresServerSessions};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConnection};
use tokio_rustls::TlsAcceptor;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::config::{ClientAuth, ConfigError, TlsFiles};
use crate::telemetry::metrics::Metrics;
use crate::watch::{self, FileWatch};

/// TLS sessions remembered for resumption (clients that do not take tickets).
const SESSION_CACHE: usize = 4096;
/// Largest certificate, key or CA file read.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Why a certificate, key or CA file could not be used; names the key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TlsError {
    key: &'static str,
    message: String,
}

impl TlsError {
    fn new(key: &'static str, message: impl Into<String>) -> Self {
        Self {
            key,
            message: message.into(),
        }
    }
}

impl From<TlsError> for ConfigError {
    fn from(error: TlsError) -> Self {
        ConfigError::invalid(error.key, error.message)
    }
}

/// The API listener's TLS: the current config, and how to rebuild it.
pub struct Tls {
    current: ArcSwap<ServerConfig>,
    source: Source,
    metrics: Arc<Metrics>,
}

/// What a config is built from: the files, and what outlives a reload.
struct Source {
    files: TlsFiles,
    provider: Arc<rustls::crypto::CryptoProvider>,
    ticketer: Arc<dyn ProducesTickets>,
    sessions: Arc<dyn StoresServerSessions>,
}

impl Tls {
    /// Reads the files: at start a file that does not load is a
    /// configuration error (exit 2) naming its key.
    pub fn load(files: TlsFiles, metrics: Arc<Metrics>) -> Result<Arc<Self>, ConfigError> {
        let ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| {
            ConfigError::invalid(
                "server.tls_cert_file",
                format!("cannot make session tickets: {e}"),
            )
        })?;
        let source = Source {
            files,
            provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            ticketer,
            sessions: ServerSessionMemoryCache::new(SESSION_CACHE),
        };
        let (config, expiry) = source.build()?;
        metrics.tls.certificate_expiry.set(expiry);
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(config),
            source,
            metrics,
        }))
    }

    /// What a new connection's handshake uses.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }

    /// Re-reads the files; keeps the current config if they do not load.
    pub fn reload(&self) -> Result<(), TlsError> {
        let built = self.source.build();
        self.metrics.tls.reloaded(built.is_ok());
        match built {
            Ok((config, expiry)) => {
                self.current.store(Arc::new(config));
                self.metrics.tls.certificate_expiry.set(expiry);
                tracing::info!(
                    file = %self.source.files.cert.display(),
                    not_after = expiry,
                    "TLS certificate reloaded"
                );
                Ok(())
            }
            Err(error) => {
                tracing::error!(%error, "cannot reload the TLS certificate; keeping the current one");
                Err(error)
            }
        }
    }

    /// Reloads when the certificate, key or CA file changes (one reload per
    /// burst of changes); stops when the returned watch is dropped.
    pub fn spawn_watch(self: &Arc<Self>) -> std::io::Result<FileWatch> {
        let files = &self.source.files;
        let mut paths = vec![files.cert.as_path(), files.key.as_path()];
        paths.extend(files.client_ca.as_deref());
        let tls = self.clone();
        watch::on_change_of(&paths, move || {
            let _ = tls.reload();
        })
    }
}

impl Source {
    /// A config from the files, and the certificate's `notAfter`.
    fn build(&self) -> Result<(ServerConfig, i64), TlsError> {
        let files = &self.files;
        let chain = read_certificates("server.tls_cert_file", &files.cert)?;
        let expiry = not_after(&chain[0])
            .ok_or_else(|| TlsError::new("server.tls_cert_file", "is not an X.509 certificate"))?;
        let key = read_pem("server.tls_key_file", &files.key).and_then(|pem| {
            PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
                TlsError::new(
                    "server.tls_key_file",
                    "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                )
            })
        })?;
        let builder = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::new("server.tls_cert_file", e.to_string()))?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for ca in read_certificates("server.tls_client_ca_file", path)? {
                    roots.add(ca).map_err(|e| {
                        TlsError::new(
                            "server.tls_client_ca_file",
                            format!("holds a certificate that is not a CA: {e}"),
                        )
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    self.provider.clone(),
                );
                let verifier = match files.client_auth {
                    ClientAuth::Optional => verifier.allow_unauthenticated(),
                    ClientAuth::Required => verifier,
                };
                builder.with_client_cert_verifier(verifier.build().map_err(|e| {
                    TlsError::new("server.tls_client_ca_file", format!("cannot be used: {e}"))
                })?)
            }
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| {
            TlsError::new(
                "server.tls_key_file",
                format!(
                    "does not match the certificate of server.tls_cert_file, or cannot be used: {e}"
                ),
            )
        })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.ticketer = self.ticketer.clone();
        config.session_storage = self.sessions.clone();
        Ok((config, expiry))
    }
}

/// The verified client certificate of a connection: its URI SANs, which
/// `callers` matches against `clients[].spiffe_ids`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    pub uris: Arc<[Arc<str>]>,
}

impl PeerCertificate {
    /// The certificate the handshake verified, if the client presented one.
    pub fn of(connection: &ServerConnection) -> Option<Self> {
        let leaf = connection.peer_certificates()?.first()?;
        let (_, certificate) = X509Certificate::from_der(leaf).ok()?;
        let uris = certificate
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|names| {
                names
                    .value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        GeneralName::URI(uri) => Some(Arc::from(*uri)),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(Self { uris })
    }
}

fn read_pem(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| TlsError::new(key, format!("cannot read {}: {}", path.display(), e.kind())))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::new(key, "is larger than 1 MiB"));
    }
    Ok(bytes)
}

fn read_certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(key, path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsError::new(key, "is not valid PEM"))?;
    if chain.is_empty() {
        return Err(TlsError::new(key, "holds no PEM certificate"));
    }
    Ok(chain)
}

/// A certificate's `notAfter`, Unix seconds.
fn not_after(certificate: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = X509Certificate::from_der(certificate).ok()?;
    Some(parsed.validity().not_after.timestamp())
}
