//! The upstream's TLS trust: rustls with the ring provider, the system's
//! roots (or the bundled web PKI roots when the system has none) plus the
//! private CA certificates of `upstream.ca_file`. Used by `config` (to refuse
//! a bad CA file at start), `upstream` (its client) and `snapshot` (seeding
//! from a peer over https).

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why `upstream.ca_file` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaFileError {
    /// The file cannot be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// The file is not PEM, or a PEM section is broken.
    #[error("{path} is not a PEM file: {reason}")]
    NotPem {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// The file holds no `CERTIFICATE` section.
    #[error("{path} holds no PEM CERTIFICATE section")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A certificate in the file cannot be a trust anchor.
    #[error("certificate {index} in {path} cannot be trusted as a CA: {reason}")]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// 1-based position of the certificate in the file.
        index: usize,
        /// rustls' message.
        reason: String,
    },
}

/// Reads a PEM file of CA certificates into a root store, refusing a file
/// that is unreadable, not PEM, without certificates, or with a certificate
/// that cannot be a trust anchor. Called by `Config::validate` (so `config
/// check` refuses a bad file) and again when the client is built.
pub fn load_ca_file(path: &Path) -> Result<rustls::RootCertStore, CaFileError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let pem = std::fs::read(path).map_err(|e| CaFileError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let cert = cert.map_err(|e| CaFileError::NotPem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        roots.add(cert).map_err(|e| CaFileError::BadCertificate {
            path: path.to_path_buf(),
            index: i + 1,
            reason: e.to_string(),
        })?;
    }
    if roots.is_empty() {
        return Err(CaFileError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(roots)
}

/// The TLS settings for an https peer: the ring provider (named here, so no
/// process-wide default is needed), rustls' safe protocol versions, and as
/// roots the system store — or the bundled web PKI roots when it is empty —
/// plus the certificates of `ca_file` (empty: none).
pub fn client_config(ca_file: &Path) -> rustls::ClientConfig {
    let native = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if !ca_file.as_os_str().is_empty() {
        match load_ca_file(ca_file) {
            Ok(extra) => roots.roots.extend(extra.roots),
            // `Config::validate` refused a bad file at start; one that broke
            // since is logged, and the upstream's certificate then fails to
            // verify, visibly, on every call.
            Err(e) => tracing::error!(error = %e, "upstream.ca_file is not used"),
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports rustls' default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}
