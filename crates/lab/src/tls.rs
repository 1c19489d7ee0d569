//! TLS for lab servers: certificates from a CA made in-process (rcgen: nothing to install, no
//! openssl processes), a server option that serves TLS — or only TLS, as `hostssl` lines with
//! `hostnossl … reject` —, and the lab's own client connections, which speak TLS to a server
//! that has it.
//!
//! The lab's own sessions (setup, the ledger, checksums) encrypt but do not verify the
//! certificate: they only ever reach the lab's own servers on loopback, and they must keep
//! working against the deliberately broken certificates that tests give a server (expired,
//! another host's). Verification is what pgshift's side is tested for.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{Error, Result};
use crate::process::Identity;
use crate::{spawn_connection, HOST};

/// The names a lab server's certificate holds by default: the loopback address as an IP
/// address, as a DNS name too (libpq before 14 compares only DNS names), and `localhost`.
pub const SERVER_NAMES: &[&str] = &[HOST, "localhost"];

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// Valid now (and for centuries).
    Current,
    /// It expired (2020 to 2021).
    Expired,
}

/// A certificate and its private key, in PEM (`Debug` leaves the key out).
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

/// A certificate and key written to files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The certificate (mode 0644).
    pub cert: PathBuf,
    /// Its key (mode 0600, owned by the user lab servers run as).
    pub key: PathBuf,
}

/// A certificate authority that signs lab servers' and clients' certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl CertificateAuthority {
    /// A new CA (ECDSA P-256) with `name` as its common name.
    pub fn new(name: &str) -> Result<CertificateAuthority> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(CertificateAuthority {
            issuer: Issuer::new(params, key),
            cert_pem,
        })
    }

    /// The CA's certificate, for `sslrootcert` or a server's `ssl_ca_file`.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes the CA's certificate to `<dir>/<name>.crt`, readable by everyone (servers,
    /// PgBouncer and pgshift read it).
    pub fn write_cert(&self, dir: &Path, name: &str) -> Result<PathBuf> {
        let path = dir.join(format!("{name}.crt"));
        write_file(dir, &path, &self.cert_pem, 0o644)?;
        Ok(path)
    }

    /// A server certificate for `names` (IP addresses become IP address names; each is also
    /// a DNS name, for old libpq).
    pub fn issue_server(&self, names: &[&str], validity: Validity) -> Result<Issued> {
        let mut sans = Vec::new();
        for name in names {
            if let Ok(ip) = name.parse::<IpAddr>() {
                sans.push(SanType::IpAddress(ip));
            }
            sans.push(SanType::DnsName((*name).try_into()?));
        }
        let common_name = names.first().copied().unwrap_or("pgshift-lab-server");
        self.issue(
            common_name,
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            validity,
        )
    }

    /// A client certificate for the PostgreSQL role `user` (its common name, which the `cert`
    /// authentication method compares with the role).
    pub fn issue_client(&self, user: &str) -> Result<Issued> {
        self.issue(
            user,
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            Validity::Current,
        )
    }

    fn issue(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> Result<Issued> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        params.subject_alt_names = sans;
        // rcgen's default validity (1975 to 4096) is current.
        if validity == Validity::Expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Writes a certificate and its key as `<dir>/<name>.crt` and `<dir>/<name>.key`: the key
/// private to the user lab servers run as (PostgreSQL and libpq refuse a key others can read),
/// the certificate readable by all.
pub fn write_pair(dir: &Path, name: &str, issued: &Issued) -> Result<CertFiles> {
    let files = CertFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
    };
    write_file(dir, &files.cert, &issued.cert_pem, 0o644)?;
    write_file(dir, &files.key, &issued.key_pem, 0o600)?;
    Ok(files)
}

fn write_file(dir: &Path, path: &Path, contents: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let identity = Identity::for_servers()?;
    identity.prepare_parent(dir)?;
    std::fs::write(path, contents)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)))
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
    identity.own(path)
}

/// A lab server's TLS: its certificate and key, and what pg_hba.conf asks of clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// The server's certificate and key files (see [`write_pair`]).
    pub files: CertFiles,
    /// CA certificates that sign clients' certificates (`ssl_ca_file`), for `cert` logins.
    pub client_ca: Option<PathBuf>,
    /// Refuse connections without TLS (`hostnossl … reject`).
    pub only: bool,
    /// Roles that log in with a client certificate (`hostssl … cert`) instead of a password.
    pub cert_users: Vec<String>,
}

impl ServerTls {
    /// TLS beside plain connections, with these files.
    pub fn new(files: CertFiles) -> ServerTls {
        ServerTls {
            files,
            client_ca: None,
            only: false,
            cert_users: Vec::new(),
        }
    }

    /// Connections without TLS are refused.
    pub fn only(mut self) -> ServerTls {
        self.only = true;
        self
    }

    /// `user` logs in with a certificate signed by the CA in `client_ca`.
    pub fn cert_login(mut self, user: impl Into<String>, client_ca: PathBuf) -> ServerTls {
        self.cert_users.push(user.into());
        self.client_ca = Some(client_ca);
        self
    }

    /// The server settings (`ssl = on` and the files).
    pub(crate) fn settings(&self) -> Vec<(String, String)> {
        let mut settings = vec![
            ("ssl".to_string(), "on".to_string()),
            (
                "ssl_cert_file".to_string(),
                self.files.cert.display().to_string(),
            ),
            (
                "ssl_key_file".to_string(),
                self.files.key.display().to_string(),
            ),
        ];
        if let Some(ca) = &self.client_ca {
            settings.push(("ssl_ca_file".to_string(), ca.display().to_string()));
        }
        settings
    }

    /// pg_hba.conf: certificate logins first, then passwords over TLS; without TLS passwords
    /// too, or a rejection when TLS is required.
    pub(crate) fn pg_hba(&self) -> String {
        let loopback = format!("{}/32", Ipv4Addr::LOCALHOST);
        let mut hba = String::from(
            "# Written by pgshift-lab: TLS on loopback.\n\
             local all all trust\n\
             local replication all trust\n",
        );
        for user in &self.cert_users {
            hba.push_str(&format!("hostssl all {user} {loopback} cert\n"));
        }
        let plain = if self.only { "reject" } else { "scram-sha-256" };
        for database in ["all", "replication"] {
            hba.push_str(&format!(
                "hostssl {database} all {loopback} scram-sha-256\n"
            ));
            hba.push_str(&format!("hostnossl {database} all 0.0.0.0/0 {plain}\n"));
        }
        hba
    }
}

/// Connects with `config` (its sslmode: `prefer` unless set), over TLS where the server has
/// it; the connection task runs on the current runtime.
pub(crate) async fn connect(config: &Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(lab_connector()).await?;
    spawn_connection(connection);
    Ok(client)
}

/// The lab's TLS client: encrypts, verifies nothing (see the module's documentation).
fn lab_connector() -> MakeRustlsConnect {
    static CONNECTOR: OnceLock<MakeRustlsConnect> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
                .with_no_client_auth();
            MakeRustlsConnect::new(config)
        })
        .clone()
}

/// Accepts any certificate; the handshake's signatures are still checked.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_only_servers_reject_plain_connections_and_let_cert_users_in_by_certificate() {
        let files = CertFiles {
            cert: "/pki/server.crt".into(),
            key: "/pki/server.key".into(),
        };
        let hba = ServerTls::new(files.clone())
            .only()
            .cert_login("alice", "/pki/ca.crt".into())
            .pg_hba();
        let lines: Vec<&str> = hba.lines().filter(|l| l.starts_with("host")).collect();
        assert_eq!(
            lines,
            [
                "hostssl all alice 127.0.0.1/32 cert",
                "hostssl all all 127.0.0.1/32 scram-sha-256",
                "hostnossl all all 0.0.0.0/0 reject",
                "hostssl replication all 127.0.0.1/32 scram-sha-256",
                "hostnossl replication all 0.0.0.0/0 reject",
            ]
        );
        assert!(ServerTls::new(files.clone())
            .pg_hba()
            .contains("hostnossl all all 0.0.0.0/0 scram-sha-256"));
        let settings = ServerTls::new(files)
            .cert_login("alice", "/pki/ca.crt".into())
            .settings();
        assert!(settings.contains(&("ssl".into(), "on".into())));
        assert!(settings.contains(&("ssl_ca_file".into(), "/pki/ca.crt".into())));
    }

    #[test]
    fn certificates_carry_the_names_and_dates_asked_for() {
        let ca = CertificateAuthority::new("lab-ca").unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let current = ca.issue_server(SERVER_NAMES, Validity::Current).unwrap();
        let expired = ca
            .issue_server(&["elsewhere.example"], Validity::Expired)
            .unwrap();
        assert!(current.key_pem.contains("PRIVATE KEY"));
        assert_ne!(current.cert_pem, expired.cert_pem);
        assert!(!format!("{current:?}").contains("PRIVATE"));
        let client = ca.issue_client("alice").unwrap();
        assert!(client.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    }
}
