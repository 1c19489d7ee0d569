//! Where a server is and how to log in to it, without ever holding a password in a URL.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_postgres::config::{SslMode as DriverSslMode, SslNegotiation};
use tokio_postgres::error::SqlState;
use tokio_postgres::{CancelToken, Client, NoTls};

use crate::error::{Error, Result, Side};
use crate::tls::{self, Negotiate, TlsProblem, TlsSettings, Transport};

/// A password that never shows up in Debug output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// One PostgreSQL server (or PgBouncer) endpoint: address, login and database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub side: Side,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    pub password: Option<Secret>,
    /// Where `parse` looked for the password, one entry per place, for the message when the
    /// server asks for a password and none was found (empty when the caller gave it).
    pub password_search: Vec<String>,
    pub connect_timeout: Duration,
    /// libpq's sslmode, sslrootcert, sslcert and sslkey, as given (URL over environment).
    pub tls: TlsSettings,
}

/// Where passwords come from, in libpq's order: a pgpass file, then PGPASSWORD.
#[derive(Debug, Clone, Default)]
pub struct PasswordSources {
    /// `--password-file`, in pgpass format; takes precedence over PGPASSFILE.
    pub password_file: Option<PathBuf>,
    pub pgpassfile_env: Option<PathBuf>,
    pub home_pgpass: Option<PathBuf>,
    pub pgpassword_env: Option<Secret>,
}

impl PasswordSources {
    /// Reads PGPASSFILE, ~/.pgpass and PGPASSWORD from the environment.
    pub fn from_env(password_file: Option<PathBuf>) -> Self {
        PasswordSources {
            password_file,
            pgpassfile_env: std::env::var_os("PGPASSFILE").map(PathBuf::from),
            home_pgpass: std::env::var_os("HOME").map(|h| Path::new(&h).join(".pgpass")),
            pgpassword_env: std::env::var("PGPASSWORD").ok().map(Secret::new),
        }
    }

    /// The password for an endpoint, and where pgshift looked for it.
    fn lookup(
        &self,
        host: &str,
        port: u16,
        dbname: &str,
        user: &str,
    ) -> Result<(Option<Secret>, Vec<String>)> {
        let mut searched = Vec::new();
        // --password-file must be readable; the libpq defaults are optional.
        let files = [
            ("--password-file", &self.password_file, true),
            ("PGPASSFILE", &self.pgpassfile_env, false),
            ("~/.pgpass", &self.home_pgpass, false),
        ];
        for (origin, file, required) in files {
            let Some(path) = file else {
                searched.push(format!("{origin} (not set)"));
                continue;
            };
            let Some(text) = read_password_file(origin, path, required)? else {
                searched.push(format!(
                    "{origin} {} (missing or unreadable)",
                    path.display()
                ));
                continue;
            };
            if let Some(found) = pgpass_lookup(&text, host, port, dbname, user) {
                return Ok((Some(Secret::new(found)), searched));
            }
            searched.push(format!(
                "{origin} {} (no line for {host}:{port}:{dbname}:{user})",
                path.display()
            ));
        }
        if self.pgpassword_env.is_none() {
            searched.push("PGPASSWORD (not set)".to_string());
        }
        Ok((self.pgpassword_env.clone(), searched))
    }
}

/// A pgpass file's text, or None for an optional file that cannot be read (as libpq skips
/// it). A file that group or others can access is refused: libpq ignores it with a warning,
/// and the login then fails with a message that does not name the file.
fn read_password_file(origin: &'static str, path: &Path, required: bool) -> Result<Option<String>> {
    let read = std::fs::File::open(path).and_then(|file| {
        let mode = file.metadata()?.permissions().mode();
        Ok((mode, std::io::read_to_string(file)?))
    });
    let (mode, text) = match read {
        Ok(read) => read,
        Err(source) if required => {
            return Err(Error::PasswordFileUnreadable {
                path: path.display().to_string(),
                source,
            })
        }
        Err(_) => return Ok(None),
    };
    if mode & 0o077 != 0 {
        return Err(Error::PasswordFileOpen {
            path: path.display().to_string(),
            origin,
            mode: mode & 0o7777,
        });
    }
    Ok(Some(text))
}

impl Endpoint {
    /// An endpoint whose password the caller already holds (a server it started itself, say);
    /// connections time out after 10 s.
    pub fn new(
        side: Side,
        host: &str,
        port: u16,
        user: &str,
        dbname: &str,
        password: Option<Secret>,
    ) -> Endpoint {
        Endpoint {
            side,
            host: host.to_string(),
            port,
            user: user.to_string(),
            dbname: dbname.to_string(),
            password,
            password_search: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            tls: TlsSettings::default(),
        }
    }

    /// Parses a `postgres://user@host:port/db` URL (or `key=value` conninfo). A password in it is
    /// refused: it would be visible in the process list. Its TLS parameters win over
    /// `tls_env` (the `PGSSL*` environment, [`TlsSettings::from_env`]).
    pub fn parse(
        side: Side,
        url: &str,
        passwords: &PasswordSources,
        tls_env: &TlsSettings,
    ) -> Result<Endpoint> {
        let (url, tls_given) = tls::split_parameters(url)
            .map_err(|problem| Error::invalid(format!("{side} URL"), problem))?;
        let config = tokio_postgres::Config::from_str(&url).map_err(|e| {
            // The driver's Display leaves out the cause, which says what is wrong.
            let cause = std::error::Error::source(&e)
                .map(|cause| format!(" ({cause})"))
                .unwrap_or_default();
            Error::invalid(
                format!("{side} URL"),
                format!("{e}{cause}; expected postgres://USER@HOST:PORT/DATABASE"),
            )
        })?;
        if config.get_password().is_some() {
            return Err(Error::PasswordInUrl { side });
        }
        let host = match config.get_hosts() {
            [tokio_postgres::config::Host::Tcp(host)] => host.clone(),
            [] => {
                return Err(Error::invalid(
                    format!("{side} URL"),
                    "no host given; expected postgres://USER@HOST:PORT/DATABASE",
                ))
            }
            _ => {
                return Err(Error::invalid(
                    format!("{side} URL"),
                    "give exactly one TCP host (unix sockets and host lists are not supported)",
                ))
            }
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = match config.get_user() {
            Some(user) => user.to_string(),
            None => std::env::var("PGUSER").map_err(|_| {
                Error::invalid(
                    format!("{side} URL"),
                    "no user given; write it in the URL (postgres://USER@HOST/DB) or set PGUSER",
                )
            })?,
        };
        let dbname = config
            .get_dbname()
            .map(str::to_string)
            .unwrap_or_else(|| user.clone());
        let (password, password_search) = passwords.lookup(&host, port, &dbname, &user)?;
        Ok(Endpoint {
            side,
            host,
            port,
            user,
            dbname,
            password,
            password_search,
            connect_timeout: config
                .get_connect_timeout()
                .copied()
                .unwrap_or(Duration::from_secs(10)),
            tls: tls_env.clone().overridden_by(tls_given),
        })
    }

    /// The same server, another database.
    pub fn with_dbname(&self, dbname: &str) -> Endpoint {
        Endpoint {
            dbname: dbname.to_string(),
            ..self.clone()
        }
    }

    /// `host:port/db` for messages (never the password).
    pub fn address(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.dbname)
    }

    pub fn config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name("pgshift")
            .connect_timeout(self.connect_timeout);
        if let Some(password) = &self.password {
            config.password(password.expose());
        }
        config
    }

    /// Connects with libpq's sslmode semantics (a second attempt where `prefer` or `allow`
    /// make one) and spawns the connection's I/O task.
    pub async fn connect(&self) -> Result<Client> {
        let mode = self.tls.mode();
        let mut transport = tls::first_transport(mode);
        let mut earlier: Option<Error> = None;
        loop {
            let failure = match self.attempt(transport).await {
                Ok(client) => return Ok(client),
                Err(failure) => failure,
            };
            let (kind, error) = match failure {
                Attempt::Tls(problem) => (tls::Failure::Handshake, self.tls_error(problem)),
                Attempt::Unreachable(reason) => {
                    (tls::Failure::Unreachable, self.connect_error(reason))
                }
                Attempt::Driver(e) => match tls::classify(&e, &self.host, &self.tls) {
                    (kind, Some(problem)) => (kind, self.tls_error(problem)),
                    (kind, None) => (kind, self.connect_error(connect_hint(&e, self, transport))),
                },
            };
            match tls::retry(mode, transport, kind) {
                Some(next) if earlier.is_none() => {
                    earlier = Some(error);
                    transport = next;
                }
                _ => return Err(self.both_attempts(earlier, error)),
            }
        }
    }

    /// One connection attempt over `transport`, bounded by the connect timeout.
    async fn attempt(&self, transport: Transport) -> std::result::Result<Client, Attempt> {
        let negotiate = match transport {
            Transport::Plain => None,
            Transport::Tls => Some(self.negotiate().map_err(Attempt::Tls)?),
        };
        let connecting = async {
            let stream = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| {
                    Attempt::Unreachable(format!(
                        "{e}; check that the server runs and the host and port are right"
                    ))
                })?;
            // As tokio-postgres sets it for its own sockets: small messages go out at once.
            let _ = stream.set_nodelay(true);
            let mut config = self.config();
            let client = match negotiate {
                None => {
                    let (client, connection) = config
                        .ssl_mode(DriverSslMode::Disable)
                        .connect_raw(stream, NoTls)
                        .await
                        .map_err(Attempt::Driver)?;
                    spawn_connection(connection);
                    client
                }
                // pgshift sends the TLS request itself (`Negotiate`): the driver starts with the
                // handshake, as it does for direct TLS.
                Some(negotiate) => {
                    let (client, connection) = config
                        .ssl_mode(DriverSslMode::Require)
                        .ssl_negotiation(SslNegotiation::Direct)
                        .connect_raw(stream, negotiate)
                        .await
                        .map_err(Attempt::Driver)?;
                    spawn_connection(connection);
                    client
                }
            };
            Ok(client)
        };
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(result) => result,
            Err(_) => Err(Attempt::Unreachable(format!(
                "timed out after {:?}; check that the server runs and the host and port are right",
                self.connect_timeout
            ))),
        }
    }

    /// The TLS request and handshake as this endpoint's settings want them.
    fn negotiate(&self) -> std::result::Result<Negotiate, TlsProblem> {
        let config = tls::client_config(&self.tls)?;
        Ok(Negotiate::new(Some(config), &self.host, self.tls.mode()))
    }

    /// Asks the server to cancel what a session of this endpoint runs, the way the session
    /// itself was connected (with TLS if it has TLS). Best effort: a lost request changes nothing.
    pub async fn cancel(&self, token: CancelToken) {
        let Ok(stream) = TcpStream::connect((self.host.as_str(), self.port)).await else {
            return;
        };
        // The token knows whether its session has TLS; a plain one never uses `negotiate`.
        let negotiate = self
            .negotiate()
            .unwrap_or_else(|_| Negotiate::new(None, &self.host, self.tls.mode()));
        let cancelling = token.cancel_query_raw(stream, negotiate);
        let _ = tokio::time::timeout(self.connect_timeout, cancelling).await;
    }

    fn tls_error(&self, problem: TlsProblem) -> Error {
        Error::Tls {
            side: self.side,
            address: self.address(),
            problem,
        }
    }

    fn connect_error(&self, reason: String) -> Error {
        Error::Connect {
            side: self.side,
            address: self.address(),
            reason,
        }
    }

    /// The error of a connection that took two attempts: a TLS problem of the first is the
    /// cause (`prefer` went on without TLS and met a server that wants it); otherwise both.
    fn both_attempts(&self, earlier: Option<Error>, last: Error) -> Error {
        match (earlier, last) {
            (None, last) => last,
            (Some(tls @ Error::Tls { .. }), _) => tls,
            (Some(_), tls @ Error::Tls { .. }) => tls,
            (Some(first), last) => {
                let reason = |e: Error| match e {
                    Error::Connect { reason, .. } => reason,
                    other => other.to_string(),
                };
                let transports = match tls::first_transport(self.tls.mode()) {
                    Transport::Tls => ("with TLS", "without TLS"),
                    Transport::Plain => ("without TLS", "with TLS"),
                };
                self.connect_error(format!(
                    "{}: {}; then {}: {}",
                    transports.0,
                    reason(first),
                    transports.1,
                    reason(last)
                ))
            }
        }
    }

    /// A libpq conninfo string for this endpoint, as the target's subscription uses it to reach
    /// the source. Values are quoted by libpq's rules; the result holds the password.
    pub fn conninfo(&self) -> String {
        let mut parts = vec![
            format!("host={}", conninfo_value(&self.host)),
            format!("port={}", self.port),
            format!("dbname={}", conninfo_value(&self.dbname)),
            format!("user={}", conninfo_value(&self.user)),
            "application_name=pgshift".to_string(),
        ];
        parts.extend(self.tls.conninfo_params());
        if let Some(password) = &self.password {
            parts.push(format!("password={}", conninfo_value(password.expose())));
        }
        parts.join(" ")
    }
}

/// How one connection attempt failed.
enum Attempt {
    /// pgshift's own TLS settings cannot be used (a file, a missing root certificate).
    Tls(TlsProblem),
    /// No TCP connection, or no answer within the timeout.
    Unreachable(String),
    Driver(tokio_postgres::Error),
}

fn spawn_connection<T>(connection: tokio_postgres::Connection<TcpStream, T>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "connection closed");
        }
    });
}

/// Turns a driver error at connect time into a sentence that says what to check.
fn connect_hint(
    error: &tokio_postgres::Error,
    endpoint: &Endpoint,
    transport: Transport,
) -> String {
    if let Some(db) = error.as_db_error() {
        return match *db.code() {
            // pg_hba.conf has no line for this client: a TLS-only server (hostssl) has none
            // for a connection without TLS.
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION if transport == Transport::Plain => {
                format!(
                    "{}; allow this client in pg_hba.conf of that server, or, if it accepts only \
                     TLS connections (hostssl lines), connect with TLS: sslmode=verify-full with \
                     sslrootcert (sslmode={} connected without TLS)",
                    db.message(),
                    endpoint.tls.mode()
                )
            }
            SqlState::INVALID_PASSWORD => format!(
                "{}; check the password in your pgpass file (PGPASSFILE or --password-file) or PGPASSWORD",
                db.message()
            ),
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION => format!(
                "{}; allow this client in pg_hba.conf of that server",
                db.message()
            ),
            SqlState::INVALID_CATALOG_NAME => format!(
                "{}; create it first or name an existing database in the URL",
                db.message()
            ),
            _ => db.message().to_string(),
        };
    }
    if endpoint.password.is_none() && refused_to_log_in(error) {
        let login = format!("{}@{}:{}", endpoint.user, endpoint.host, endpoint.port);
        if endpoint.password_search.is_empty() {
            return format!("the server asks for a password and none was given for {login}");
        }
        return format!(
            "the server asks for a password and no password was found for {login}; pgshift looked in {}. \
             Add a line HOST:PORT:DATABASE:USER:PASSWORD to a pgpass file (mode 0600) or set PGPASSWORD",
            endpoint.password_search.join(", ")
        );
    }
    let source = std::error::Error::source(error)
        .map(|s| s.to_string())
        .unwrap_or_default();
    format!("{error} {source}; check that the server runs and the host and port are right")
        .trim()
        .to_string()
}

/// The driver, not the server or the network, ended the login: neither a server error, nor
/// an I/O error, nor a closed connection. With one host and one port always given, that is a
/// password request the driver had no password for (or an authentication method it lacks,
/// such as GSSAPI, which pgshift does not support either).
fn refused_to_log_in(error: &tokio_postgres::Error) -> bool {
    !error.is_closed()
        && std::error::Error::source(error).is_some_and(|cause| {
            !cause.is::<std::io::Error>()
                && !cause.is::<tokio_postgres::error::DbError>()
                && !cause.is::<tls::NegotiationError>()
        })
}

/// Quotes a value for a libpq conninfo string: single quotes, with `\` and `'` escaped.
pub fn conninfo_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for ch in value.chars() {
        if ch == '\\' || ch == '\'' {
            out.push('\\');
        }
        out.push(ch);
    }
    out.push('\'');
    out
}

/// Finds the password for an endpoint in pgpass text (`host:port:db:user:password`, `*` matches
/// anything, `\:` and `\\` are escapes), first match wins, like libpq.
pub fn pgpass_lookup(
    text: &str,
    host: &str,
    port: u16,
    dbname: &str,
    user: &str,
) -> Option<String> {
    let port = port.to_string();
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#') && !line.trim().is_empty())
        .filter_map(split_pgpass_line)
        .find(|fields| {
            let wanted = [host, port.as_str(), dbname, user];
            fields[..4]
                .iter()
                .zip(wanted)
                .all(|(field, want)| field == "*" || field == want)
        })
        .map(|mut fields| fields.pop().unwrap_or_default())
}

fn split_pgpass_line(line: &str) -> Option<Vec<String>> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(ch) = chars.next() {
        match ch {
            '\\' => fields.last_mut()?.push(chars.next().unwrap_or('\\')),
            ':' if fields.len() < 5 => fields.push(String::new()),
            _ => fields.last_mut()?.push(ch),
        }
    }
    (fields.len() == 5).then_some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::SslMode;

    /// Parses with no TLS environment.
    fn parse(side: Side, url: &str, passwords: &PasswordSources) -> Result<Endpoint> {
        Endpoint::parse(side, url, passwords, &TlsSettings::default())
    }

    fn no_passwords() -> PasswordSources {
        PasswordSources::default()
    }

    /// A pgpass file with `text` and `mode` in a new temporary directory (kept with it).
    fn pgpass_file(text: &str, mode: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgpass");
        std::fs::write(&file, text).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, file)
    }

    #[test]
    fn url_with_password_is_refused() {
        let err = parse(
            Side::Source,
            "postgres://app:secret@db:5432/app",
            &no_passwords(),
        )
        .unwrap_err();
        assert!(matches!(err, Error::PasswordInUrl { side: Side::Source }));
        assert!(!err.to_string().contains("secret"));
    }

    #[test]
    fn url_parts_are_read() {
        let e = parse(
            Side::Target,
            "postgres://app@db.example:6543/shop",
            &no_passwords(),
        )
        .unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.user.as_str(), e.dbname.as_str()),
            ("db.example", 6543, "app", "shop")
        );
        assert_eq!(e.password, None);
    }

    #[test]
    fn pgpass_matches_first_line_with_wildcards_and_escapes() {
        let text =
            "# comment\nother:5432:*:app:nope\ndb:5432:*:app:pa\\:ss\\\\word\n*:*:*:*:fallback\n";
        assert_eq!(
            pgpass_lookup(text, "db", 5432, "shop", "app").as_deref(),
            Some("pa:ss\\word")
        );
        assert_eq!(
            pgpass_lookup(text, "x", 1, "y", "z").as_deref(),
            Some("fallback")
        );
        assert_eq!(
            pgpass_lookup("db:5432:shop:app\n", "db", 5432, "shop", "app"),
            None
        );
    }

    #[test]
    fn password_file_wins_over_pgpassword() {
        let (_dir, file) = pgpass_file("db:5432:*:app:from-file\n", 0o600);
        let sources = PasswordSources {
            password_file: Some(file),
            pgpassword_env: Some(Secret::new("from-env")),
            ..Default::default()
        };
        let e = parse(Side::Source, "postgres://app@db/shop", &sources).unwrap();
        assert_eq!(e.password.unwrap().expose(), "from-file");
        let e = parse(Side::Source, "postgres://other@db/shop", &sources).unwrap();
        assert_eq!(e.password.unwrap().expose(), "from-env");
    }

    #[test]
    fn missing_password_file_is_a_usage_error() {
        let sources = PasswordSources {
            password_file: Some("/nonexistent/pgpass".into()),
            ..Default::default()
        };
        let err = parse(Side::Source, "postgres://app@db/shop", &sources).unwrap_err();
        assert!(matches!(err, Error::PasswordFileUnreadable { .. }), "{err}");
        assert!(err.is_usage());
    }

    #[test]
    fn password_file_open_to_others_is_refused_and_named() {
        let (_dir, file) = pgpass_file("db:5432:*:app:from-file\n", 0o604);
        let sources = PasswordSources {
            pgpassfile_env: Some(file.clone()),
            ..Default::default()
        };
        let err = parse(Side::Source, "postgres://app@db/shop", &sources).unwrap_err();
        assert!(
            matches!(
                &err,
                Error::PasswordFileOpen {
                    origin: "PGPASSFILE",
                    mode: 0o604,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.is_usage());
        assert!(err
            .to_string()
            .contains(&format!("chmod 600 {}", file.display())));
        assert!(!err.to_string().contains("from-file"));
    }

    #[test]
    fn the_password_search_names_every_place_looked_in() {
        let (_dir, file) = pgpass_file("other:5432:*:app:nope\n", 0o600);
        let sources = PasswordSources {
            password_file: Some(file.clone()),
            home_pgpass: Some("/nonexistent/.pgpass".into()),
            ..Default::default()
        };
        let e = parse(Side::Source, "postgres://app@db/shop", &sources).unwrap();
        assert_eq!(e.password, None);
        assert_eq!(
            e.password_search,
            [
                format!(
                    "--password-file {} (no line for db:5432:shop:app)",
                    file.display()
                ),
                "PGPASSFILE (not set)".to_string(),
                "~/.pgpass /nonexistent/.pgpass (missing or unreadable)".to_string(),
                "PGPASSWORD (not set)".to_string(),
            ]
        );
    }

    #[test]
    fn tls_parameters_of_the_url_win_over_the_environment_and_reach_the_conninfo() {
        let env = TlsSettings {
            mode: Some(SslMode::Require),
            root_cert: Some("/env/ca.pem".into()),
            ..Default::default()
        };
        let e = Endpoint::parse(
            Side::Source,
            "postgres://app@db/shop?sslmode=verify-full&connect_timeout=3",
            &no_passwords(),
            &env,
        )
        .unwrap();
        assert_eq!(e.tls.mode, Some(SslMode::VerifyFull));
        assert_eq!(e.tls.root_cert, Some(PathBuf::from("/env/ca.pem")));
        assert_eq!(e.connect_timeout, Duration::from_secs(3));
        assert!(
            e.conninfo().ends_with(
                "application_name=pgshift sslmode=verify-full sslrootcert='/env/ca.pem'"
            ),
            "{}",
            e.conninfo()
        );
        let err = parse(
            Side::Target,
            "postgres://app@db/shop?sslmode=verify",
            &no_passwords(),
        )
        .unwrap_err();
        assert!(
            err.is_usage() && err.to_string().contains("verify-full"),
            "{err}"
        );
    }

    #[test]
    fn conninfo_quotes_values_by_libpq_rules() {
        assert_eq!(conninfo_value("it's a \\ test"), "'it\\'s a \\\\ test'");
        let e = Endpoint {
            side: Side::Source,
            host: "h".into(),
            port: 1,
            user: "u".into(),
            dbname: "d b".into(),
            password: Some(Secret::new("p'w")),
            password_search: Vec::new(),
            connect_timeout: Duration::from_secs(1),
            tls: TlsSettings::default(),
        };
        assert_eq!(
            e.conninfo(),
            "host='h' port=1 dbname='d b' user='u' application_name=pgshift password='p\\'w'"
        );
        assert!(!format!("{e:?}").contains("p'w"));
    }
}
