//! TLS problems by name, with the fix: from a failed attempt's error, never from its text.

use std::io;

use rustls::pki_types::UnixTime;
use rustls::CertificateError;

use super::negotiate::NegotiationError;
use super::verify::{home, Files};
use super::{Failure, SslMode, TlsSettings};

/// A TLS problem, named, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsProblem {
    #[error(
        "the server does not support TLS (it declined the TLS request), and sslmode={mode} requires \
         TLS. Turn TLS on in the server (ssl = on with ssl_cert_file and ssl_key_file), or choose \
         sslmode=prefer if unencrypted connections are acceptable"
    )]
    ServerWithoutTls { mode: SslMode },

    #[error(
        "the server's certificate is not signed by a CA in {root_cert} (unknown CA). Set \
         sslrootcert (or PGSSLROOTCERT) to the certificate of the CA that signed the server's \
         certificate"
    )]
    UnknownCa { root_cert: String },

    #[error(
        "the server's certificate expired{}. Renew the server's certificate (ssl_cert_file) and \
         reload the server",
        not_after.as_ref().map(|t| format!(" at {t}")).unwrap_or_default()
    )]
    Expired { not_after: Option<String> },

    #[error(
        "the server's certificate is not valid yet{}. Check the clocks of both machines, or \
         reissue the certificate",
        not_before.as_ref().map(|t| format!(" (valid from {t})")).unwrap_or_default()
    )]
    NotYetValid { not_before: Option<String> },

    #[error(
        "the server's certificate does not name the host {host} (host name mismatch; it names {}). \
         Connect by a name the certificate holds, or reissue it with {host} in its subjectAltName; \
         sslmode=verify-ca checks the CA without the host name",
        if presented.is_empty() { "no host".to_string() } else { presented.join(", ") }
    )]
    HostNameMismatch {
        host: String,
        presented: Vec<String>,
    },

    #[error(
        "the server ended the TLS handshake ({alert}): it did not accept pgshift's client \
         certificate{}. Give a certificate signed by a CA in the server's ssl_ca_file with sslcert \
         and sslkey (or PGSSLCERT and PGSSLKEY)",
        cert.as_ref().map(|c| format!(" {c}")).unwrap_or_else(|| " (none was sent)".to_string())
    )]
    ClientCertificateRefused { alert: String, cert: Option<String> },

    #[error("the server's certificate was refused: {0}. Check the certificate the server uses (ssl_cert_file)")]
    Certificate(String),

    #[error("the TLS handshake failed: {0}")]
    Handshake(String),

    #[error(
        "sslmode={mode} verifies the server's certificate, but the root certificate file {path} \
         does not exist. Give the CA's certificate with sslrootcert (or PGSSLROOTCERT), or choose \
         sslmode=require to encrypt without verifying"
    )]
    RootCertMissing { mode: SslMode, path: String },

    #[error("cannot use the {what} {path}: {reason}. Check the file given with {parameter}")]
    File {
        what: &'static str,
        parameter: &'static str,
        path: String,
        reason: String,
    },

    #[error(
        "the private key file {path} is open to group or others (mode {mode:04o}); libpq refuses \
         such a key and so does pgshift. Run chmod 600 {path}"
    )]
    KeyFileOpen { path: String, mode: u32 },
}

impl TlsProblem {
    /// A setting on pgshift's side must change (a file, a mode): a usage error.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            TlsProblem::RootCertMissing { .. }
                | TlsProblem::File { .. }
                | TlsProblem::KeyFileOpen { .. }
        )
    }
}

/// What a failed attempt's error says about TLS: the next attempt's input, and the problem
/// to name, if the failure was one of TLS.
pub(crate) fn classify(
    error: &tokio_postgres::Error,
    host: &str,
    settings: &TlsSettings,
) -> (Failure, Option<TlsProblem>) {
    if error.as_db_error().is_some() {
        return (Failure::LoginRefused, None);
    }
    let mut cause = std::error::Error::source(error);
    while let Some(current) = cause {
        if let Some(NegotiationError::ServerWithoutTls) = current.downcast_ref() {
            return (
                Failure::ServerWithoutTls,
                Some(TlsProblem::ServerWithoutTls {
                    mode: settings.mode(),
                }),
            );
        }
        let rustls_error = current.downcast_ref::<rustls::Error>().or_else(|| {
            current
                .downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls_error) = rustls_error {
            return (
                Failure::Handshake,
                Some(problem(rustls_error, host, settings)),
            );
        }
        cause = current.source();
    }
    (Failure::Unreachable, None)
}

/// A rustls error as the problem it is, in libpq's terms.
fn problem(error: &rustls::Error, host: &str, settings: &TlsSettings) -> TlsProblem {
    let time = |t: &UnixTime| {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.as_secs()),
        )
        .to_string()
    };
    match error {
        rustls::Error::InvalidCertificate(certificate) => match certificate {
            CertificateError::UnknownIssuer => TlsProblem::UnknownCa {
                root_cert: Files::of(settings, home().as_deref()).root_cert_name(home().as_deref()),
            },
            CertificateError::Expired => TlsProblem::Expired { not_after: None },
            CertificateError::ExpiredContext { not_after, .. } => TlsProblem::Expired {
                not_after: Some(time(not_after)),
            },
            CertificateError::NotValidYet => TlsProblem::NotYetValid { not_before: None },
            CertificateError::NotValidYetContext { not_before, .. } => TlsProblem::NotYetValid {
                not_before: Some(time(not_before)),
            },
            CertificateError::NotValidForName => TlsProblem::HostNameMismatch {
                host: host.to_string(),
                presented: Vec::new(),
            },
            CertificateError::NotValidForNameContext { presented, .. } => {
                TlsProblem::HostNameMismatch {
                    host: host.to_string(),
                    presented: presented.clone(),
                }
            }
            other => TlsProblem::Certificate(format!("{other:?}")),
        },
        rustls::Error::AlertReceived(alert) => {
            use rustls::AlertDescription as Alert;
            match alert {
                Alert::BadCertificate
                | Alert::UnknownCA
                | Alert::CertificateRequired
                | Alert::CertificateExpired
                | Alert::CertificateRevoked
                | Alert::CertificateUnknown
                | Alert::UnsupportedCertificate
                | Alert::AccessDenied => TlsProblem::ClientCertificateRefused {
                    alert: format!("{alert:?}"),
                    cert: Files::of(settings, home().as_deref())
                        .cert
                        .map(|p| p.display().to_string()),
                },
                other => TlsProblem::Handshake(format!("the server sent the alert {other:?}")),
            }
        }
        other => TlsProblem::Handshake(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::SslMode;
    use rustls::pki_types::ServerName;

    #[test]
    fn certificate_errors_are_named_with_the_fix() {
        let settings = TlsSettings {
            mode: Some(SslMode::VerifyFull),
            root_cert: Some("/etc/ca.pem".into()),
            ..Default::default()
        };
        let named = |error: rustls::Error| problem(&error, "db.example", &settings).to_string();
        let unknown = named(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
        assert!(
            unknown.contains("unknown CA") && unknown.contains("/etc/ca.pem"),
            "{unknown}"
        );
        assert!(unknown.contains("sslrootcert"), "{unknown}");
        let expired = named(rustls::Error::InvalidCertificate(
            CertificateError::ExpiredContext {
                time: UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_800_000_000)),
                not_after: UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                    1_600_000_000,
                )),
            },
        ));
        assert!(
            expired.contains("expired at 2020-09-13T12:26:40Z"),
            "{expired}"
        );
        let mismatch = named(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForNameContext {
                expected: ServerName::try_from("db.example").unwrap(),
                presented: vec!["DnsName(\"other\")".into()],
            },
        ));
        assert!(mismatch.contains("host name mismatch"), "{mismatch}");
        assert!(
            mismatch.contains("db.example") && mismatch.contains("verify-ca"),
            "{mismatch}"
        );
        let refused = named(rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRequired,
        ));
        assert!(refused.contains("sslcert"), "{refused}");
        let without = TlsProblem::ServerWithoutTls {
            mode: SslMode::Require,
        }
        .to_string();
        assert!(
            without.contains("does not support TLS") && without.contains("ssl = on"),
            "{without}"
        );
    }
}
