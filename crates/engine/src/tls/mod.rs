//! TLS with libpq's semantics, for every connection pgshift makes.
//!
//! The settings are libpq's: `sslmode`, `sslrootcert`, `sslcert` and `sslkey`, from the URL or
//! the `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT` and `PGSSLKEY` environment, with libpq's
//! defaults (`prefer`, and the files under `~/.postgresql/` when they exist). The decisions
//! (which transport to try first, when to fall back, what to verify) are pure functions here;
//! [`Negotiate`] speaks the protocol's TLS request and hands rustls the socket.

mod negotiate;
mod problem;
mod verify;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::endpoint::conninfo_value;

pub(crate) use negotiate::{Negotiate, NegotiationError};
pub(crate) use problem::classify;
pub use problem::TlsProblem;
pub(crate) use verify::client_config;

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
}
