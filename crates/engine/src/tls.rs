//! TLS with libpq's semantics, for every connection pgshift makes.
//!
//! The settings are libpq's: `sslmode`, `sslrootcert`, `sslcert` and `sslkey`, from the URL or
//! the `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT` and `PGSSLKEY` environment, with libpq's
//! defaults (`prefer`, and the files under `~/.postgresql/` when they exist). The decisions
//! (which transport to try first, when to fall back, what to verify) are pure functions here;
//! [`Negotiate`] speaks the protocol's TLS request and hands rustls the socket.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::endpoint::conninfo_value;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// Without TLS first; with TLS if the server refuses that login.
    Allow,
    /// With TLS first; without TLS if the server has none, or if that attempt fails.
    Prefer,
    /// Only TLS; the certificate is verified only when a root certificate file exists.
    Require,
    /// Only TLS, with a certificate signed by a CA in the root certificate file.
    VerifyCa,
    /// As `verify-ca`, and the certificate names the host pgshift connects to.
    VerifyFull,
}

impl SslMode {
    pub const ALL: [SslMode; 6] = [
        SslMode::Disable,
        SslMode::Allow,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SslMode {
    type Err = String;
    fn from_str(text: &str) -> Result<SslMode, String> {
        SslMode::ALL
            .into_iter()
            .find(|mode| mode.as_str() == text)
            .ok_or_else(|| {
                let names: Vec<&str> = SslMode::ALL.iter().map(|m| m.as_str()).collect();
                format!("sslmode {text:?}: use one of {}", names.join(", "))
            })
    }
}

/// The TLS settings of one connection, as given; `None` is libpq's default (`prefer`, and the
/// files under `~/.postgresql/` when they exist).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsSettings {
    pub mode: Option<SslMode>,
    /// CA certificates that sign the server's certificate (`sslrootcert`).
    pub root_cert: Option<PathBuf>,
    /// pgshift's client certificate (`sslcert`), for `cert` authentication.
    pub cert: Option<PathBuf>,
    /// Its private key (`sslkey`).
    pub key: Option<PathBuf>,
}

/// The connection parameters this module owns, in conninfo and URL spelling.
pub const PARAMETERS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

impl TlsSettings {
    /// `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT` and `PGSSLKEY` (empty values are unset, as
    /// libpq takes them).
    pub fn from_env() -> Result<TlsSettings, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mode = var("PGSSLMODE")
            .map(|m| m.parse().map_err(|e| format!("PGSSLMODE: {e}")))
            .transpose()?;
        Ok(TlsSettings {
            mode,
            root_cert: var("PGSSLROOTCERT").map(PathBuf::from),
            cert: var("PGSSLCERT").map(PathBuf::from),
            key: var("PGSSLKEY").map(PathBuf::from),
        })
    }

    /// libpq's `sslmode`: the one given, else `prefer`.
    pub fn mode(&self) -> SslMode {
        self.mode.unwrap_or(SslMode::Prefer)
    }

    /// Sets one parameter of [`PARAMETERS`]; an unknown name or a bad sslmode is an error.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            "sslmode" => self.mode = Some(value.parse()?),
            "sslrootcert" => self.root_cert = Some(PathBuf::from(value)),
            "sslcert" => self.cert = Some(PathBuf::from(value)),
            "sslkey" => self.key = Some(PathBuf::from(value)),
            other => {
                return Err(format!(
                    "{other:?} is not a TLS parameter; use {}",
                    PARAMETERS.join(", ")
                ))
            }
        }
        Ok(())
    }

    /// These settings with each parameter `over` gives replacing ours (the URL's over the
    /// environment's).
    pub fn overridden_by(self, over: TlsSettings) -> TlsSettings {
        TlsSettings {
            mode: over.mode.or(self.mode),
            root_cert: over.root_cert.or(self.root_cert),
            cert: over.cert.or(self.cert),
            key: over.key.or(self.key),
        }
    }

    /// `sslmode=verify-full sslrootcert=/etc/ca.pem`: the parameters given, conninfo style
    /// (for the connection strings of the subscriptions, as the other server reaches this one).
    pub fn parse_conninfo(text: &str) -> Result<TlsSettings, String> {
        let mut settings = TlsSettings::default();
        for (key, value) in conninfo_pairs(text)? {
            settings.set(&key, &value)?;
        }
        Ok(settings)
    }

    /// The parameters that were given, as conninfo `key=value` pairs (values quoted): what
    /// the child tools and the subscriptions get, so that their libpq does what pgshift does.
    pub fn conninfo_params(&self) -> Vec<String> {
        let path = |p: &Path| conninfo_value(&p.to_string_lossy());
        let mut params = Vec::new();
        if let Some(mode) = self.mode {
            params.push(format!("sslmode={mode}"));
        }
        for (key, file) in [
            ("sslrootcert", &self.root_cert),
            ("sslcert", &self.cert),
            ("sslkey", &self.key),
        ] {
            if let Some(file) = file {
                params.push(format!("{key}={}", path(file)));
            }
        }
        params
    }
}

/// Takes the TLS parameters out of a `postgres://` URL's query or a `key=value` conninfo
/// string (tokio-postgres knows only some sslmodes and no certificate files): the rest of the
/// string, for the driver to parse, and the TLS settings found.
pub fn split_parameters(text: &str) -> Result<(String, TlsSettings), String> {
    let mut settings = TlsSettings::default();
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        let Some((base, query)) = text.split_once('?') else {
            return Ok((text.to_string(), settings));
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if PARAMETERS.contains(&key) {
                settings.set(key, &percent_decode(value)?)?;
            } else {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, settings));
    }
    let mut kept = Vec::new();
    for (key, value) in conninfo_pairs(text)? {
        if PARAMETERS.contains(&key.as_str()) {
            settings.set(&key, &value)?;
        } else {
            kept.push(format!("{key}={}", conninfo_value(&value)));
        }
    }
    Ok((kept.join(" "), settings))
}

/// `key=value` pairs of a libpq conninfo string: values bare or in single quotes, `\`
/// escaping the next character.
fn conninfo_pairs(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!("expected key=value after {key:?}"));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(format!("unterminated quoted value of {key}")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in {text:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} is not UTF-8 once decoded"))
}

/// How one connection attempt talks to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Plain,
    Tls,
}

/// How an attempt failed, as far as the choice of the next one goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The TLS handshake failed (a certificate pgshift does not accept, say).
    Handshake,
    /// The server answered the TLS request with "no TLS here".
    ServerWithoutTls,
    /// The server refused the login with an error (pg_hba.conf, password).
    LoginRefused,
    /// The server could not be reached, or the connection broke.
    Unreachable,
}

/// The first transport libpq tries under `mode`.
pub fn first_transport(mode: SslMode) -> Transport {
    match mode {
        SslMode::Disable | SslMode::Allow => Transport::Plain,
        _ => Transport::Tls,
    }
}

/// Whether a server that has no TLS is used without it on the same connection: only
/// `prefer` does so (`allow` tried without TLS first and was refused).
pub fn continues_without_tls(mode: SslMode) -> bool {
    mode == SslMode::Prefer
}

/// libpq's second attempt: `prefer` tries without TLS after a failed TLS attempt, `allow`
/// with TLS after the server refused the login without. One retry at most.
pub fn retry(mode: SslMode, tried: Transport, failure: Failure) -> Option<Transport> {
    match (mode, tried, failure) {
        (SslMode::Prefer, Transport::Tls, Failure::Handshake | Failure::LoginRefused) => {
            Some(Transport::Plain)
        }
        (SslMode::Allow, Transport::Plain, Failure::LoginRefused) => Some(Transport::Tls),
        _ => None,
    }
}

/// What is checked of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    Nothing,
    /// Signed by a CA in the root certificate file.
    Chain,
    /// That, and it names the host.
    ChainAndHostName,
}

/// libpq's rule: `verify-full` and `verify-ca` verify, and need a root certificate file; the
/// weaker modes verify the chain when one exists (libpq keeps that for compatibility).
pub fn verification(mode: SslMode, root_cert_exists: bool) -> Option<Verification> {
    match mode {
        SslMode::VerifyFull if root_cert_exists => Some(Verification::ChainAndHostName),
        SslMode::VerifyCa if root_cert_exists => Some(Verification::Chain),
        SslMode::VerifyCa | SslMode::VerifyFull => None,
        _ if root_cert_exists => Some(Verification::Chain),
        _ => Some(Verification::Nothing),
    }
}

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

/// The files one connection uses: the ones given, else libpq's defaults under
/// `~/.postgresql/` where they exist.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Files {
    root_cert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

impl Files {
    fn of(settings: &TlsSettings, home: Option<&Path>) -> Files {
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
    fn root_cert_name(&self, home: Option<&Path>) -> String {
        self.root_cert
            .clone()
            .or_else(|| home.map(|h| h.join(".postgresql/root.crt")))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "~/.postgresql/root.crt".to_string())
    }
}

/// `$HOME`, where libpq looks for its default files.
fn home() -> Option<PathBuf> {
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

/// The protocol's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

type RustlsStream = <MakeRustlsConnect as MakeTlsConnect<TcpStream>>::Stream;

/// The TLS request and handshake on a fresh socket, for tokio-postgres (which is told the
/// socket speaks TLS directly): pgshift sends the request itself, so that a server without
/// TLS is a typed answer ([`NegotiationError::ServerWithoutTls`]), and `prefer` goes on
/// without TLS on the same socket, as libpq does. The cancel requests of a TLS session take
/// the same way.
#[derive(Clone)]
pub(crate) struct Negotiate {
    tls: Option<MakeRustlsConnect>,
    host: String,
    continue_without_tls: bool,
}

impl Negotiate {
    pub(crate) fn new(
        config: Option<Arc<rustls::ClientConfig>>,
        host: &str,
        mode: SslMode,
    ) -> Self {
        Negotiate {
            tls: config.map(|c| MakeRustlsConnect::new(Arc::unwrap_or_clone(c))),
            host: host.to_string(),
            continue_without_tls: continues_without_tls(mode),
        }
    }
}

/// Why the TLS request or handshake failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NegotiationError {
    #[error("the server does not support TLS")]
    ServerWithoutTls,
    #[error("no TLS configuration")]
    NotConfigured,
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl TlsConnect<TcpStream> for Negotiate {
    type Stream = Negotiated;
    type Error = NegotiationError;
    type Future = BoxFuture<'static, Result<Negotiated, NegotiationError>>;

    fn connect(self, mut stream: TcpStream) -> Self::Future {
        Box::pin(async move {
            let Some(mut tls) = self.tls else {
                return Err(NegotiationError::NotConfigured);
            };
            stream.write_all(&SSL_REQUEST).await?;
            let mut answer = [0u8];
            stream.read_exact(&mut answer).await?;
            match answer[0] {
                b'S' => {}
                b'N' if self.continue_without_tls => return Ok(Negotiated::Plain(stream)),
                b'N' => return Err(NegotiationError::ServerWithoutTls),
                other => {
                    return Err(NegotiationError::Io(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected answer {other:#04x} to the TLS request"),
                    )))
                }
            }
            let connector =
                match MakeTlsConnect::<TcpStream>::make_tls_connect(&mut tls, &self.host) {
                    Ok(connector) => connector,
                    Err(never) => match never {},
                };
            let stream = connector.connect(stream).await?;
            Ok(Negotiated::Tls(Box::new(stream)))
        })
    }
}

/// A socket after the TLS request: TLS, or plain where `prefer` met a server without TLS.
pub(crate) enum Negotiated {
    Tls(Box<RustlsStream>),
    Plain(TcpStream),
}

impl TlsStream for Negotiated {
    fn channel_binding(&self) -> ChannelBinding {
        match self {
            // SCRAM binds to the server's certificate (tls-server-end-point).
            Negotiated::Tls(stream) => stream.channel_binding(),
            Negotiated::Plain(_) => ChannelBinding::none(),
        }
    }
}

impl AsyncRead for Negotiated {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Negotiated::Tls(stream) => std::pin::Pin::new(stream.as_mut()).poll_read(cx, buf),
            Negotiated::Plain(stream) => std::pin::Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Negotiated {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Negotiated::Tls(stream) => std::pin::Pin::new(stream.as_mut()).poll_write(cx, buf),
            Negotiated::Plain(stream) => std::pin::Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Negotiated::Tls(stream) => std::pin::Pin::new(stream.as_mut()).poll_flush(cx),
            Negotiated::Plain(stream) => std::pin::Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Negotiated::Tls(stream) => std::pin::Pin::new(stream.as_mut()).poll_shutdown(cx),
            Negotiated::Plain(stream) => std::pin::Pin::new(stream).poll_shutdown(cx),
        }
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

    #[test]
    fn every_sslmode_reads_and_prints_as_libpq_spells_it() {
        for mode in SslMode::ALL {
            assert_eq!(mode.as_str().parse::<SslMode>(), Ok(mode));
        }
        let err = "verify_full".parse::<SslMode>().unwrap_err();
        assert!(err.contains("verify-full"), "{err}");
        assert_eq!(TlsSettings::default().mode(), SslMode::Prefer);
    }

    #[test]
    fn the_first_attempt_and_the_fallbacks_are_libpqs() {
        use Failure::*;
        use Transport::*;
        assert_eq!(first_transport(SslMode::Disable), Plain);
        assert_eq!(first_transport(SslMode::Allow), Plain);
        for mode in [
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ] {
            assert_eq!(first_transport(mode), Tls, "{mode}");
        }
        // prefer: a failed TLS attempt (handshake or login) is tried again without TLS.
        assert_eq!(retry(SslMode::Prefer, Tls, Handshake), Some(Plain));
        assert_eq!(retry(SslMode::Prefer, Tls, LoginRefused), Some(Plain));
        assert_eq!(retry(SslMode::Prefer, Plain, LoginRefused), None);
        assert_eq!(retry(SslMode::Prefer, Tls, Unreachable), None);
        // allow: a refused login without TLS is tried again with it.
        assert_eq!(retry(SslMode::Allow, Plain, LoginRefused), Some(Tls));
        assert_eq!(retry(SslMode::Allow, Plain, Unreachable), None);
        assert_eq!(retry(SslMode::Allow, Tls, ServerWithoutTls), None);
        // The strict modes never give up TLS, and disable never takes it.
        for mode in [SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull] {
            for failure in [Handshake, ServerWithoutTls, LoginRefused, Unreachable] {
                assert_eq!(retry(mode, Tls, failure), None, "{mode} {failure:?}");
            }
        }
        assert_eq!(retry(SslMode::Disable, Plain, LoginRefused), None);
        // Only prefer goes on without TLS when the server has none.
        assert!(continues_without_tls(SslMode::Prefer));
        assert!(!continues_without_tls(SslMode::Allow));
        assert!(!continues_without_tls(SslMode::Require));
    }

    #[test]
    fn what_is_verified_follows_the_mode_and_the_root_certificate() {
        use Verification::*;
        assert_eq!(
            verification(SslMode::VerifyFull, true),
            Some(ChainAndHostName)
        );
        assert_eq!(verification(SslMode::VerifyCa, true), Some(Chain));
        assert_eq!(verification(SslMode::VerifyFull, false), None);
        assert_eq!(verification(SslMode::VerifyCa, false), None);
        for weak in [SslMode::Allow, SslMode::Prefer, SslMode::Require] {
            assert_eq!(verification(weak, false), Some(Nothing), "{weak}");
            assert_eq!(verification(weak, true), Some(Chain), "{weak}");
        }
    }

    #[test]
    fn tls_parameters_are_taken_out_of_urls_and_conninfo_strings() {
        let (rest, tls) = split_parameters(
            "postgres://app@db:5432/shop?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca%20x.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://app@db:5432/shop?application_name=x");
        assert_eq!(tls.mode, Some(SslMode::VerifyFull));
        assert_eq!(tls.root_cert, Some(PathBuf::from("/etc/ca x.pem")));

        let (rest, tls) = split_parameters("postgres://app@db/shop?sslmode=require").unwrap();
        assert_eq!(
            (rest.as_str(), tls.mode),
            ("postgres://app@db/shop", Some(SslMode::Require))
        );

        let (rest, tls) = split_parameters(
            "host=db user='o\\'neil' sslcert = '/a b/c.crt' sslkey=/k\\ ey dbname=shop",
        )
        .unwrap();
        assert_eq!(rest, "host='db' user='o\\'neil' dbname='shop'");
        assert_eq!(tls.cert, Some(PathBuf::from("/a b/c.crt")));
        assert_eq!(tls.key, Some(PathBuf::from("/k ey")));

        assert!(split_parameters("postgres://db/x?sslmode=verify").is_err());
        assert!(split_parameters("host=db sslmode='x").is_err());
    }

    #[test]
    fn the_url_wins_over_the_environment_and_only_given_settings_are_passed_on() {
        let env = TlsSettings {
            mode: Some(SslMode::Require),
            root_cert: Some("/env/ca.pem".into()),
            ..Default::default()
        };
        let url = TlsSettings {
            mode: Some(SslMode::VerifyFull),
            ..Default::default()
        };
        let merged = env.overridden_by(url);
        assert_eq!(merged.mode, Some(SslMode::VerifyFull));
        assert_eq!(
            merged.conninfo_params(),
            ["sslmode=verify-full", "sslrootcert='/env/ca.pem'"]
        );
        assert!(TlsSettings::default().conninfo_params().is_empty());
    }

    #[test]
    fn the_other_servers_settings_are_read_as_conninfo_and_nothing_else() {
        let tls =
            TlsSettings::parse_conninfo("sslmode=verify-ca sslrootcert='/srv/ca.pem'").unwrap();
        assert_eq!(tls.mode, Some(SslMode::VerifyCa));
        assert_eq!(tls.root_cert, Some(PathBuf::from("/srv/ca.pem")));
        let err = TlsSettings::parse_conninfo("host=elsewhere").unwrap_err();
        assert!(err.contains("not a TLS parameter"), "{err}");
    }

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
