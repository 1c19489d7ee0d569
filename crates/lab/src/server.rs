//! A real PostgreSQL server of a given major, run from the binary cache.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::{Client, Config, SimpleQueryMessage};

use crate::binaries::Binaries;
use crate::error::{Error, Result};
use crate::pgpass::PgpassEntry;
use crate::process::{clean_env, log_tail, on_free_port, Identity, Supervised};
use crate::tls::ServerTls;
use crate::{random_token, HOST};

/// The superuser every lab server is initialised with.
pub const SUPERUSER: &str = "postgres";

/// Settings every lab server starts with; a caller's setting of the same name wins.
pub const DEFAULT_SETTINGS: &[(&str, &str)] = &[
    ("wal_level", "logical"),
    ("max_replication_slots", "20"),
    ("max_wal_senders", "20"),
    ("max_logical_replication_workers", "8"),
    ("max_worker_processes", "16"),
    ("fsync", "on"),
    ("synchronous_commit", "on"),
    ("shared_buffers", "128MB"),
    ("max_connections", "200"),
    ("password_encryption", "scram-sha-256"),
    // pgshift reads the subscription's apply errors from the log via pg_current_logfile().
    ("logging_collector", "on"),
    ("log_directory", "log"),
    ("log_min_messages", "warning"),
];

/// Settings the lab controls itself: loopback TCP only, on the port it picked.
const MANAGED_SETTINGS: &[&str] = &["port", "listen_addresses", "unix_socket_directories"];

/// The lab's own configuration file, included from `postgresql.conf`; `ALTER SYSTEM` still
/// overrides it, as on a real server.
const LAB_CONF: &str = "pgshift_lab.conf";

/// How long a server may take to accept connections after its process starts.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// `stop`: fast shutdown (as `pg_ctl stop -m fast`), then immediate, then SIGKILL.
const STOP_STEPS: &[(libc::c_int, Duration)] = &[
    (libc::SIGINT, Duration::from_secs(60)),
    (libc::SIGQUIT, Duration::from_secs(5)),
    (libc::SIGKILL, Duration::from_secs(5)),
];
/// `Drop`: immediate shutdown (as `pg_ctl stop -m immediate`), then SIGKILL; bounded.
const DROP_STEPS: &[(libc::c_int, Duration)] = &[
    (libc::SIGQUIT, Duration::from_secs(5)),
    (libc::SIGKILL, Duration::from_secs(5)),
];

/// What server to start and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOptions {
    /// PostgreSQL major version (10..=18 in the cache).
    pub major: u32,
    /// Directory under which the server's own directory `<parent_dir>/<name>` is created.
    pub parent_dir: PathBuf,
    /// Server name: its directory name and the label in logs.
    pub name: String,
    /// Settings applied on top of [`DEFAULT_SETTINGS`].
    pub settings: Vec<(String, String)>,
    /// TLS: the server's certificate and what pg_hba.conf asks of clients; none when None.
    pub tls: Option<ServerTls>,
}

impl ServerOptions {
    /// Options for a server `name` of `major` under `parent_dir`, with default settings.
    pub fn new(major: u32, parent_dir: impl Into<PathBuf>, name: impl Into<String>) -> Self {
        ServerOptions {
            major,
            parent_dir: parent_dir.into(),
            name: name.into(),
            settings: Vec::new(),
            tls: None,
        }
    }

    /// Serves TLS (the lab's own sessions then use it too).
    pub fn tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Adds (or overrides) one server setting.
    pub fn setting(mut self, name: impl AsRef<str>, value: impl AsRef<str>) -> Self {
        self.settings
            .push((name.as_ref().to_string(), value.as_ref().to_string()));
        self
    }
}

/// A running PostgreSQL server listening on 127.0.0.1 (TCP only).
///
/// The postmaster is a direct child of this process (not daemonised by `pg_ctl`), watched by a
/// thread, with `PR_SET_PDEATHSIG = SIGQUIT`: if the process dies in any way, the kernel
/// makes the server do an immediate shutdown. Dropping a `PgServer` does the same
/// synchronously (bounded to ~10 s, escalating to SIGKILL).
pub struct PgServer {
    major: u32,
    version: String,
    name: String,
    data_dir: PathBuf,
    bin_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    password: String,
    settings: Vec<(String, String)>,
    identity: Identity,
    process: Supervised,
}

impl std::fmt::Debug for PgServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgServer")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("port", &self.port)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// A server's identity for reports (no password).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerInfo {
    /// Server name.
    pub name: String,
    /// Major version.
    pub major: u32,
    /// Full version, e.g. "15.18".
    pub version: String,
    /// Connection URL of the `postgres` database, without password.
    pub url: String,
    /// Data directory.
    pub data_dir: PathBuf,
}

impl PgServer {
    /// Initialises a fresh data directory and starts the server; returns once it accepts
    /// connections.
    pub async fn start(opts: ServerOptions) -> Result<PgServer> {
        validate_name(&opts.name)?;
        let tls_settings = opts
            .tls
            .as_ref()
            .map(ServerTls::settings)
            .unwrap_or_default();
        let settings = merge_settings(DEFAULT_SETTINGS, &[tls_settings, opts.settings].concat())?;
        let bin_dir = Binaries::locate()?.bin_dir(opts.major)?;
        let identity = Identity::for_servers()?;
        identity.prepare_parent(&opts.parent_dir)?;
        let server_dir = opts.parent_dir.join(&opts.name);
        identity.create_private_dir(&server_dir)?;
        let data_dir = server_dir.join("data");
        let log_path = server_dir.join("postmaster.log");
        let password = random_token(24);

        tracing::info!(name = %opts.name, major = opts.major, dir = %server_dir.display(), "initdb");
        initdb(&bin_dir, &server_dir, &data_dir, &password, &identity).await?;
        configure_data_dir(&data_dir, &identity, opts.tls.as_ref())?;

        let (name, settings_ref) = (&opts.name, &settings);
        let (bin_dir_ref, data_dir_ref, log_path_ref, password_ref, identity_ref) =
            (&bin_dir, &data_dir, &log_path, &password, &identity);
        let (port, process, version) = on_free_port("the server", |port| async move {
            write_lab_conf(data_dir_ref, port, settings_ref, identity_ref)?;
            let (process, version) = launch(
                name,
                bin_dir_ref,
                data_dir_ref,
                log_path_ref,
                port,
                password_ref,
                identity_ref,
            )
            .await?;
            Ok((port, process, version))
        })
        .await?;
        check_major(opts.major, &version, &bin_dir)?;
        tracing::info!(name = %opts.name, version = %version, port, "server ready");
        Ok(PgServer {
            major: opts.major,
            version,
            name: opts.name,
            data_dir,
            bin_dir,
            log_path,
            port,
            password,
            settings,
            identity,
            process,
        })
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The listen address: always `127.0.0.1`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// The superuser name (`postgres`).
    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    /// The superuser password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The major version.
    pub fn major(&self) -> u32 {
        self.major
    }

    /// The full server version, e.g. "15.18" (first word of `SHOW server_version`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The server's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The `bin` directory of this server's binaries.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The postmaster's own output (startup messages); the server log proper is in
    /// `<data_dir>/log` (see `pg_current_logfile()`).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The effective lab settings (defaults merged with the caller's).
    pub fn settings(&self) -> &[(String, String)] {
        &self.settings
    }

    /// `postgres://postgres@127.0.0.1:PORT/db` — no password (that comes from PGPASSFILE).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@{HOST}:{}/{}",
            self.port,
            percent_encode(db)
        )
    }

    /// A driver config for `db` as the superuser, password included.
    pub fn config(&self, db: &str) -> Config {
        server_config(self.port, &self.password, db)
    }

    /// Connects to `db` as the superuser; the connection task runs on the current runtime.
    pub async fn connect(&self, db: &str) -> Result<Client> {
        crate::tls::connect(&self.config(db))
            .await
            .map_err(|e| Error::pg(format!("cannot connect to {}", self.url(db)), e))
    }

    /// Creates database `name`.
    pub async fn create_database(&self, name: &str) -> Result<()> {
        let client = self.connect("postgres").await?;
        let sql = format!(
            "CREATE DATABASE {}",
            postgres_protocol::escape::escape_identifier(name)
        );
        client.batch_execute(&sql).await.map_err(|e| {
            Error::pg(
                format!("cannot create database {name:?} on {}", self.name),
                e,
            )
        })
    }

    /// Creates a login role with a password (an application's role, as clients and PgBouncer
    /// use it), unless it exists.
    pub async fn create_login_role(&self, name: &str, password: &str) -> Result<()> {
        let client = self.connect("postgres").await?;
        let exists = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)",
                &[&name],
            )
            .await
            .map_err(|e| Error::pg(format!("cannot look up role {name:?}"), e))?
            .get::<_, bool>(0);
        if exists {
            return Ok(());
        }
        let sql = format!(
            "CREATE ROLE {} LOGIN PASSWORD {}",
            postgres_protocol::escape::escape_identifier(name),
            postgres_protocol::escape::escape_literal(password)
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| Error::pg(format!("cannot create role {name:?} on {}", self.name), e))
    }

    /// Restarts the server with `settings` merged into its lab settings (e.g.
    /// `("wal_level", "replica")`), on the same port.
    pub async fn restart(&mut self, settings: &[(&str, &str)]) -> Result<()> {
        let overrides: Vec<(String, String)> = settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let current: Vec<(&str, &str)> = self
            .settings
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let merged = merge_settings(&current, &overrides)?;
        write_lab_conf(&self.data_dir, self.port, &merged, &self.identity)?;
        self.settings = merged;

        tracing::info!(name = %self.name, "restarting");
        self.shutdown_fast().await?;
        let (process, version) = launch(
            &self.name,
            &self.bin_dir,
            &self.data_dir,
            &self.log_path,
            self.port,
            &self.password,
            &self.identity,
        )
        .await?;
        self.process = process;
        self.version = version;
        Ok(())
    }

    /// Stops the server with a fast shutdown (as `pg_ctl stop -m fast`).
    pub async fn stop(self) -> Result<()> {
        tracing::info!(name = %self.name, "stopping");
        self.shutdown_fast().await
    }

    /// A pgpass entry for the superuser on any database of this server.
    pub fn pgpass_entry(&self) -> PgpassEntry {
        PgpassEntry {
            host: HOST.to_string(),
            port: self.port,
            database: "*".to_string(),
            user: SUPERUSER.to_string(),
            password: self.password.clone(),
        }
    }

    /// `127.0.0.1:PORT:*:postgres:PASSWORD`.
    pub fn pgpass_line(&self) -> String {
        self.pgpass_entry().line()
    }

    /// Name, version, URL and data directory, for reports.
    pub fn info(&self) -> ServerInfo {
        ServerInfo {
            name: self.name.clone(),
            major: self.major,
            version: self.version.clone(),
            url: self.url("postgres"),
            data_dir: self.data_dir.clone(),
        }
    }

    async fn shutdown_fast(&self) -> Result<()> {
        match self.process.shutdown(STOP_STEPS).await {
            Some(0) => Ok(()),
            _ => Err(Error::ShutdownTimeout {
                what: format!("PostgreSQL server {}", self.name),
                after: STOP_STEPS[0].1,
                log: self.log_path.clone(),
            }),
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.process.exit_status().is_none() {
            tracing::debug!(name = %self.name, pid = self.process.pid(), "immediate shutdown on drop");
            self.process.shutdown_blocking(DROP_STEPS);
        }
    }
}

fn server_config(port: u16, password: &str, db: &str) -> Config {
    let mut config = Config::new();
    config
        .host(HOST)
        .port(port)
        .user(SUPERUSER)
        .password(password)
        .dbname(db)
        .connect_timeout(Duration::from_secs(10));
    config
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidOption(format!(
            "name {name:?}: use letters, digits, '-', '_' or '.' (it becomes a directory name)"
        )))
    }
}

/// `base` with `overrides` applied: same-named settings replaced in place, new ones appended.
fn merge_settings(
    base: &[(&str, &str)],
    overrides: &[(String, String)],
) -> Result<Vec<(String, String)>> {
    let mut merged: Vec<(String, String)> = base
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (key, value) in overrides {
        let key = key.to_ascii_lowercase();
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        {
            return Err(Error::InvalidOption(format!(
                "setting name {key:?}: use a PostgreSQL parameter name"
            )));
        }
        if MANAGED_SETTINGS.contains(&key.as_str()) {
            return Err(Error::InvalidOption(format!(
                "setting {key} is managed by the lab (servers listen on 127.0.0.1 only, on a port it picks)"
            )));
        }
        match merged.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value.clone(),
            None => merged.push((key, value.clone())),
        }
    }
    Ok(merged)
}

/// The lab configuration file's text.
fn render_conf(port: u16, settings: &[(String, String)]) -> String {
    let mut text = String::from("# Written by pgshift-lab; rewritten on restart.\n");
    text.push_str(&format!(
        "listen_addresses = '{HOST}'\nport = {port}\nunix_socket_directories = ''\n"
    ));
    for (key, value) in settings {
        text.push_str(&format!("{key} = {}\n", quote_conf_value(value)));
    }
    text
}

/// Quotes a value for postgresql.conf (backslash and single quote are special there).
fn quote_conf_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn initdb(
    bin_dir: &Path,
    server_dir: &Path,
    data_dir: &Path,
    password: &str,
    identity: &Identity,
) -> Result<()> {
    let pwfile = server_dir.join("pwfile");
    identity.write_private_file(&pwfile, password)?;
    let mut cmd = Command::new(bin_dir.join("initdb"));
    cmd.arg("-D")
        .arg(data_dir)
        .args(["-U", SUPERUSER])
        .arg(format!("--pwfile={}", pwfile.display()))
        .args([
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "--encoding=UTF8",
            "--locale=C",
            // Skips initdb's final fsync of the new cluster; the server itself runs fsync=on.
            "--no-sync",
        ])
        .current_dir(server_dir)
        .stdin(Stdio::null());
    clean_env(&mut cmd);
    identity.apply(&mut cmd);
    let output = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .output()
        .await;
    let removed = fs::remove_file(&pwfile);
    let output = output.map_err(|e| {
        Error::io(
            format!("cannot run {}", bin_dir.join("initdb").display()),
            e,
        )
    })?;
    removed.map_err(|e| Error::io(format!("cannot remove {}", pwfile.display()), e))?;
    if !output.status.success() {
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        let lines: Vec<&str> = text.lines().collect();
        return Err(Error::Command {
            program: bin_dir.join("initdb").display().to_string(),
            status: output.status.to_string(),
            output: lines[lines.len().saturating_sub(20)..].join("\n"),
        });
    }
    Ok(())
}

/// Replaces pg_hba.conf and makes postgresql.conf include the lab's settings file.
fn configure_data_dir(data_dir: &Path, identity: &Identity, tls: Option<&ServerTls>) -> Result<()> {
    let hba = "# Written by pgshift-lab: TCP on loopback with passwords (scram-sha-256).\n\
               local all all trust\n\
               local replication all trust\n\
               host all all 127.0.0.1/32 scram-sha-256\n\
               host replication all 127.0.0.1/32 scram-sha-256\n";
    let hba = tls.map_or_else(|| hba.to_string(), ServerTls::pg_hba);
    identity.write_private_file(&data_dir.join("pg_hba.conf"), &hba)?;
    let conf = data_dir.join("postgresql.conf");
    let mut file = OpenOptions::new()
        .append(true)
        .open(&conf)
        .map_err(|e| Error::io(format!("cannot open {}", conf.display()), e))?;
    writeln!(file, "\n# Added by pgshift-lab\ninclude '{LAB_CONF}'")
        .map_err(|e| Error::io(format!("cannot write {}", conf.display()), e))
}

fn write_lab_conf(
    data_dir: &Path,
    port: u16,
    settings: &[(String, String)],
    identity: &Identity,
) -> Result<()> {
    identity.write_private_file(&data_dir.join(LAB_CONF), &render_conf(port, settings))
}

/// Starts the postmaster and waits until it answers; returns it and its version.
async fn launch(
    name: &str,
    bin_dir: &Path,
    data_dir: &Path,
    log_path: &Path,
    port: u16,
    password: &str,
    identity: &Identity,
) -> Result<(Supervised, String)> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|e| Error::io(format!("cannot open {}", log_path.display()), e))?;
    let log_err = log
        .try_clone()
        .map_err(|e| Error::io(format!("cannot open {}", log_path.display()), e))?;
    let mut cmd = Command::new(bin_dir.join("postgres"));
    cmd.arg("-D")
        .arg(data_dir)
        .current_dir(data_dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    clean_env(&mut cmd);
    // The server's own HOME, as a service account has one: its subscriptions' libpq looks for
    // ~/.postgresql/ there, and the caller's home may be closed to the server's user.
    cmd.env("HOME", data_dir);
    identity.apply(&mut cmd);
    let process = Supervised::spawn(cmd, libc::SIGQUIT, &format!("postgres-{name}"))?;

    match wait_ready(name, &process, log_path, port, password).await {
        Ok(version) => Ok((process, version)),
        Err(e) => {
            process.shutdown(DROP_STEPS).await;
            Err(e)
        }
    }
}

async fn wait_ready(
    name: &str,
    process: &Supervised,
    log_path: &Path,
    port: u16,
    password: &str,
) -> Result<String> {
    let started = Instant::now();
    let mut config = server_config(port, password, "postgres");
    config.connect_timeout(Duration::from_secs(2));
    loop {
        if let Some(status) = process.exit_status() {
            return Err(Error::Exited {
                what: format!("PostgreSQL server {name}"),
                status,
                log: log_path.to_path_buf(),
                log_tail: log_tail(log_path, 20),
            });
        }
        let last_error = match crate::tls::connect(&config).await {
            Ok(client) => return server_version(&client).await,
            Err(e) => crate::describe(&e),
        };
        if started.elapsed() > READY_TIMEOUT {
            return Err(Error::StartTimeout {
                what: format!("PostgreSQL server {name}"),
                after: READY_TIMEOUT,
                last_error,
                log: log_path.to_path_buf(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn server_version(client: &Client) -> Result<String> {
    let messages = client
        .simple_query("SHOW server_version")
        .await
        .map_err(|e| Error::pg("cannot read server_version", e))?;
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0),
            _ => None,
        })
        .and_then(|v| v.split_whitespace().next())
        .map(str::to_string)
        .ok_or_else(|| Error::UnexpectedReply("SHOW server_version returned no row".into()))
}

fn check_major(expected: u32, version: &str, bin_dir: &Path) -> Result<()> {
    let found: Option<u32> = version
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|m| m.parse().ok());
    if found == Some(expected) {
        Ok(())
    } else {
        Err(Error::VersionMismatch {
            expected,
            found: version.to_string(),
            bin_dir: bin_dir.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_settings_override_defaults_in_place() {
        let merged = merge_settings(
            &[("wal_level", "logical"), ("fsync", "on")],
            &[
                ("WAL_LEVEL".into(), "replica".into()),
                ("work_mem".into(), "8MB".into()),
            ],
        )
        .unwrap();
        assert_eq!(
            merged,
            vec![
                ("wal_level".to_string(), "replica".to_string()),
                ("fsync".to_string(), "on".to_string()),
                ("work_mem".to_string(), "8MB".to_string()),
            ]
        );
    }

    #[test]
    fn managed_and_malformed_settings_are_refused() {
        let err = merge_settings(&[], &[("port".into(), "5432".into())]).unwrap_err();
        assert!(err.to_string().contains("managed by the lab"));
        let err = merge_settings(&[], &[("a = b\nc".into(), "x".into())]).unwrap_err();
        assert!(err.to_string().contains("parameter name"));
    }

    #[test]
    fn conf_quotes_values() {
        let text = render_conf(5555, &[("search_path".into(), r"a'b\c".into())]);
        assert!(text.contains("port = 5555\n"));
        assert!(text.contains("unix_socket_directories = ''\n"));
        assert!(text.contains(r"search_path = 'a''b\\c'"));
    }

    #[test]
    fn names_must_be_plain() {
        assert!(validate_name("blue-13").is_ok());
        assert!(validate_name("../x").is_err());
        assert!(validate_name("").is_err());
    }

    #[test]
    fn major_is_checked_against_the_version() {
        let bin = Path::new("/bin");
        assert!(check_major(15, "15.18", bin).is_ok());
        assert!(check_major(18, "18.6", bin).is_ok());
        assert!(check_major(16, "15.18", bin).is_err());
    }

    #[test]
    fn url_has_no_password_and_encodes_the_database() {
        assert_eq!(percent_encode("app db"), "app%20db");
        assert_eq!(percent_encode("app_1"), "app_1");
    }
}
