//! TLS for the NATS listener: the `[tls]` table, its files read and checked
//! into one rustls `ServerConfig` ([`TlsSettings`]), and the client
//! certificate's identities for `map` (nats-server's `verify_and_map`).
//!
//! Nothing here touches a socket: the byte stream that wraps a socket in a
//! rustls connection is `runtime/tls.rs`. Files are read only by
//! [`TlsSettings::load`], at start and at each reload, never per connection.

pub mod identity;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// nats-server's default TLS handshake timeout (2 s).
pub const HANDSHAKE_TIMEOUT_MS_DEFAULT: u64 = 2_000;
/// A handshake timeout above this would let stalled handshakes pile up for
/// minutes (each holds a connection slot and rustls' handshake buffers).
pub const HANDSHAKE_TIMEOUT_MS_MAX: u64 = 60_000;

/// The `[tls]` table; TLS is on when `cert` is given.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM), leaf first.
    pub cert: Option<PathBuf>,
    /// The server's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// The CAs client certificates are verified against (PEM), for `verify`.
    pub ca: Option<PathBuf>,
    /// Clients must present a certificate signed by `ca`.
    pub verify: bool,
    /// The client certificate's identity selects the user (needs `verify`).
    pub map: bool,
    /// The TLS handshake comes before INFO (which is then sent encrypted).
    pub handshake_first: bool,
    /// A handshake not finished this long after accept closes the connection.
    pub timeout_ms: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: None,
            key: None,
            ca: None,
            verify: false,
            map: false,
            handshake_first: false,
            timeout_ms: HANDSHAKE_TIMEOUT_MS_DEFAULT,
        }
    }
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert.is_some()
    }
}

/// Why a `[tls]` table is refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// A key the table needs is missing, or two contradict each other.
    #[error("tls: {0}")]
    Invalid(String),
    /// A file cannot be read or holds no usable PEM.
    #[error("tls: {path}: {reason}")]
    File { path: String, reason: String },
    /// rustls refused what the files hold (e.g. the key does not match the certificate).
    #[error("tls: {0}")]
    Rustls(String),
}

/// `[tls]` loaded: what every new connection's handshake uses. Replaced whole
/// on reload; connections keep the `Arc` they started with.
pub struct TlsSettings {
    pub server_config: Arc<rustls::ServerConfig>,
    pub verify: bool,
    pub map: bool,
    pub handshake_first: bool,
    pub timeout_ms: u64,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("verify", &self.verify)
            .field("map", &self.map)
            .field("handshake_first", &self.handshake_first)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// The crypto provider of every TLS connection (see Cargo.toml for why ring).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsSettings {
    /// Checks the table and reads its files; None when TLS is off.
    pub fn load(config: &TlsConfig) -> Result<Option<TlsSettings>, TlsConfigError> {
        let invalid = |msg: &str| Err(TlsConfigError::Invalid(msg.to_string()));
        let Some(cert_path) = &config.cert else {
            if config.key.is_some() || config.ca.is_some() || config.verify || config.map {
                return invalid("cert is required when any other tls key is set");
            }
            return Ok(None);
        };
        let Some(key_path) = &config.key else {
            return invalid("key is required with cert");
        };
        if config.map && !config.verify {
            return invalid(
                "map needs verify = true (the identity comes from a verified client certificate)",
            );
        }
        if config.verify && config.ca.is_none() {
            return invalid("verify needs ca (the CAs client certificates are checked against)");
        }
        if config.timeout_ms == 0 || config.timeout_ms > HANDSHAKE_TIMEOUT_MS_MAX {
            return Err(TlsConfigError::Invalid(format!(
                "timeout_ms must be 1..={HANDSHAKE_TIMEOUT_MS_MAX}"
            )));
        }
        let certs = read_certs(cert_path)?;
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| file_error(key_path, e))?;
        let provider = provider();
        // TLS 1.2 and 1.3 only (rustls has nothing older), as nats-server's minimum.
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsConfigError::Rustls(e.to_string()))?;
        let builder = match (&config.ca, config.verify) {
            (Some(ca_path), true) => {
                let mut roots = rustls::RootCertStore::empty();
                for ca in read_certs(ca_path)? {
                    roots.add(ca).map_err(|e| TlsConfigError::File {
                        path: ca_path.display().to_string(),
                        reason: format!("not a usable CA certificate: {e}"),
                    })?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|e| TlsConfigError::Rustls(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            (Some(ca_path), false) => {
                // Read anyway, so a broken file is found now, not when verify is turned on.
                read_certs(ca_path)?;
                builder.with_no_client_auth()
            }
            (None, _) => builder.with_no_client_auth(),
        };
        let server_config = builder.with_single_cert(certs, key).map_err(|e| {
            TlsConfigError::Rustls(format!(
                "{} with {}: {e}",
                cert_path.display(),
                key_path.display()
            ))
        })?;
        Ok(Some(TlsSettings {
            server_config: Arc::new(server_config),
            verify: config.verify,
            map: config.map,
            handshake_first: config.handshake_first,
            timeout_ms: config.timeout_ms,
        }))
    }
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> TlsConfigError {
    TlsConfigError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}
