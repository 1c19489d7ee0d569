//! What libpq verifies of a server's certificate, on rustls: the files (given, or libpq's
//! defaults under `~/.postgresql/`), the client certificate, the verifier.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use super::{verification, TlsProblem, TlsSettings, Verification};

/// The files one connection uses: the ones given, else libpq's defaults under
/// `~/.postgresql/` where they exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Files {
    pub(super) root_cert: Option<PathBuf>,
    pub(super) cert: Option<PathBuf>,
    pub(super) key: Option<PathBuf>,
}

impl Files {
    pub(super) fn of(settings: &TlsSettings, home: Option<&Path>) -> Files {
        let default = |name: &str| home.map(|h| h.join(".postgresql").join(name));
        let existing = |name: &str| default(name).filter(|p| p.exists());
        let cert = settings.cert.clone().or_else(|| existing("postgresql.crt"));
        // The key matters only with a certificate; a missing one is named when it is read.
        let key = cert
            .as_ref()
            .and_then(|_| settings.key.clone().or_else(|| default("postgresql.key")));
        Files {
            root_cert: settings.root_cert.clone().or_else(|| existing("root.crt")),
            cert,
            key,
        }
    }

    /// For messages: the root certificate file used, or the one libpq would look for.
    pub(super) fn root_cert_name(&self, home: Option<&Path>) -> String {
        self.root_cert
            .clone()
            .or_else(|| home.map(|h| h.join(".postgresql/root.crt")))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "~/.postgresql/root.crt".to_string())
    }
}

/// `$HOME`, where libpq looks for its default files.
pub(super) fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

/// The rustls client for one server: what libpq would verify under these settings, and the
/// client certificate if there is one. Reads the files now.
pub(crate) fn client_config(
    settings: &TlsSettings,
) -> Result<Arc<rustls::ClientConfig>, TlsProblem> {
    client_config_at(settings, home().as_deref())
}

fn client_config_at(
    settings: &TlsSettings,
    home: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, TlsProblem> {
    let mode = settings.mode();
    let files = Files::of(settings, home);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verification = verification(mode, files.root_cert.is_some()).ok_or_else(|| {
        TlsProblem::RootCertMissing {
            mode,
            path: files.root_cert_name(home),
        }
    })?;
    let roots = match (&files.root_cert, verification) {
        (Some(path), Verification::Chain | Verification::ChainAndHostName) => {
            let mut store = rustls::RootCertStore::empty();
            for cert in read_certificates(path, "root certificate file", "sslrootcert")? {
                store
                    .add(cert)
                    .map_err(|e| file_problem(path, "root certificate file", "sslrootcert", e))?;
            }
            let verifier =
                WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                    .build()
                    .map_err(|e| file_problem(path, "root certificate file", "sslrootcert", e))?;
            Some(verifier)
        }
        _ => None,
    };
    let verifier = Arc::new(Verifier {
        roots,
        check_host_name: verification == Verification::ChainAndHostName,
        provider: provider.clone(),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsProblem::Handshake(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            let chain = read_certificates(cert, "client certificate", "sslcert")?;
            let key = read_private_key(key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| file_problem(cert, "client certificate", "sslcert", e))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn file_problem(
    path: &Path,
    what: &'static str,
    parameter: &'static str,
    reason: impl std::fmt::Display,
) -> TlsProblem {
    TlsProblem::File {
        what,
        parameter,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn read_certificates(
    path: &Path,
    what: &'static str,
    parameter: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsProblem> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_problem(path, what, parameter, e))?;
    if certs.is_empty() {
        return Err(file_problem(
            path,
            what,
            parameter,
            "no PEM certificate in it",
        ));
    }
    Ok(certs)
}

/// The client's key, refused like libpq refuses it when group or others may read it (0640
/// is allowed for a root-owned file, as libpq allows it).
fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsProblem> {
    let meta =
        std::fs::metadata(path).map_err(|e| file_problem(path, "private key file", "sslkey", e))?;
    let mode = meta.mode() & 0o7777;
    let allowed = if meta.uid() == 0 { 0o640 } else { 0o600 };
    if mode & !allowed & 0o777 != 0 {
        return Err(TlsProblem::KeyFileOpen {
            path: path.display().to_string(),
            mode,
        });
    }
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| file_problem(path, "private key file", "sslkey", e))
}

/// libpq's verification on rustls: nothing, the chain, or the chain and the host name. The
/// handshake's signatures are always checked.
#[derive(Debug)]
struct Verifier {
    roots: Option<Arc<WebPkiServerVerifier>>,
    check_host_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        // webpki checks the name last, once the chain is proven: a name error means the
        // chain is good, which is all verify-ca asks.
        match roots.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_host_name => Ok(ServerCertVerified::assertion()),
            verdict => verdict,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::SslMode;

    fn settings_verify_full() -> TlsSettings {
        TlsSettings {
            mode: Some(SslMode::VerifyFull),
            ..Default::default()
        }
    }

    #[test]
    fn verification_needs_a_root_certificate_and_a_readable_one() {
        let settings = settings_verify_full();
        assert!(matches!(
            client_config_at(&settings, None),
            Err(TlsProblem::RootCertMissing {
                mode: SslMode::VerifyFull,
                ..
            })
        ));
        let missing = TlsSettings {
            root_cert: Some("/nonexistent/ca.pem".into()),
            ..settings
        };
        let problem = client_config_at(&missing, None).unwrap_err();
        assert!(problem.is_usage());
        assert!(
            problem.to_string().contains("/nonexistent/ca.pem"),
            "{problem}"
        );
        // require encrypts without verifying when there is no root certificate.
        let require = TlsSettings {
            mode: Some(SslMode::Require),
            ..Default::default()
        };
        assert!(client_config_at(&require, None).is_ok());
        // A home without ~/.postgresql: the message names the file libpq looks for.
        let home = tempfile::tempdir().unwrap();
        let problem = client_config_at(&settings_verify_full(), Some(home.path())).unwrap_err();
        assert!(
            problem
                .to_string()
                .contains(&format!("{}/.postgresql/root.crt", home.path().display())),
            "{problem}"
        );
    }
}
