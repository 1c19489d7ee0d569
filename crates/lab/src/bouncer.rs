//! A real PgBouncer (Debian's 1.18) in transaction pooling mode in front of lab servers.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, Config, NoTls};

use crate::binaries::Binaries;
use crate::error::{Error, Result};
use crate::pgpass::PgpassEntry;
use crate::process::{clean_env, log_tail, on_free_port, Identity, Supervised};
use crate::server::PgServer;
use crate::{random_token, spawn_connection, HOST};

/// The admin console user (`admin_users`), with its own random password.
pub const ADMIN_USER: &str = "pgshift_admin";

/// `[pgbouncer]` settings the lab starts with; a caller's setting of the same name wins.
const DEFAULT_SETTINGS: &[(&str, &str)] = &[
    ("pool_mode", "transaction"),
    ("max_client_conn", "500"),
    ("default_pool_size", "20"),
    // Transaction pooling: no session state to reset.
    ("server_reset_query", ""),
    // tokio-postgres and other drivers send these; PgBouncer 1.18 rejects unknown ones.
    ("ignore_startup_parameters", "extra_float_digits,options"),
];

/// Settings the lab controls itself.
const MANAGED_SETTINGS: &[&str] = &[
    "listen_addr",
    "listen_port",
    "unix_socket_dir",
    "auth_type",
    "auth_file",
    "admin_users",
    "pidfile",
    "logfile",
];

const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// SIGQUIT is PgBouncer's immediate shutdown from 1.23 on (SIGTERM waits for every client
/// to leave); SIGKILL if it hangs.
const STOP_STEPS: &[(libc::c_int, Duration)] = &[
    (libc::SIGQUIT, Duration::from_secs(5)),
    (libc::SIGKILL, Duration::from_secs(5)),
];

/// How clients authenticate to PgBouncer (passwords are kept in plain text in `auth_file`,
/// which works with every method).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BouncerAuth {
    /// `scram-sha-256` (the default).
    #[default]
    ScramSha256,
    /// `md5`.
    Md5,
    /// `plain`: the password crosses the (loopback) wire in clear.
    Plain,
}

impl BouncerAuth {
    fn as_str(self) -> &'static str {
        match self {
            BouncerAuth::ScramSha256 => "scram-sha-256",
            BouncerAuth::Md5 => "md5",
            BouncerAuth::Plain => "plain",
        }
    }
}

/// One `[databases]` entry: clients asking for `name` are sent to `dbname` on `host:port`,
/// logged in there as `user` with `password` (which `Debug` leaves out).
#[derive(Clone, PartialEq, Eq)]
pub struct BouncerDatabase {
    /// Database name clients use.
    pub name: String,
    /// Server host.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Database on the server.
    pub dbname: String,
    /// Server user.
    pub user: String,
    /// Server password.
    pub password: String,
}

impl std::fmt::Debug for BouncerDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BouncerDatabase")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl BouncerDatabase {
    /// An entry for database `dbname` of a lab server, as its superuser; clients use the same
    /// name (change it with [`BouncerDatabase::named`]).
    pub fn for_server(server: &PgServer, dbname: &str) -> Self {
        BouncerDatabase {
            name: dbname.to_string(),
            host: server.host().to_string(),
            port: server.port(),
            dbname: dbname.to_string(),
            user: server.superuser().to_string(),
            password: server.password().to_string(),
        }
    }

    /// The same entry under the name clients use.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The config line `name = host=… port=… dbname=… user=… password=…`.
    ///
    /// Values are quoted the way PgBouncer parses them: inside single quotes, a quote is
    /// doubled; backslashes are literal (unlike libpq, which treats `\` as an escape).
    pub fn config_line(&self) -> Result<String> {
        check_simple_name("database name", &self.name)?;
        let mut line = format!("{} =", self.name);
        for (key, value) in [
            ("host", self.host.as_str()),
            ("port", &self.port.to_string()),
            ("dbname", self.dbname.as_str()),
            ("user", self.user.as_str()),
            ("password", self.password.as_str()),
        ] {
            if value.is_empty() || value.contains(['\n', '\r']) {
                return Err(Error::InvalidOption(format!(
                    "PgBouncer database {}: {key} must be a non-empty single line",
                    self.name
                )));
            }
            line.push(' ');
            line.push_str(key);
            line.push('=');
            line.push_str(&quote_conn_value(value));
        }
        Ok(line)
    }
}

/// PgBouncer's default name (and directory name).
pub const DEFAULT_BOUNCER_NAME: &str = "pgbouncer";

/// What PgBouncer to start and where (`Debug` leaves passwords out).
#[derive(Clone, PartialEq, Eq)]
pub struct BouncerOptions {
    /// Directory under which PgBouncer's own directory `<parent_dir>/<name>` is created.
    pub parent_dir: PathBuf,
    /// Its name (directory name, label in logs); [`DEFAULT_BOUNCER_NAME`] unless set.
    pub name: String,
    /// `[databases]` entries; their users are also client users (same password).
    pub databases: Vec<BouncerDatabase>,
    /// Extra client users `(name, password)` for `auth_file`.
    pub users: Vec<(String, String)>,
    /// Client authentication method.
    pub auth: BouncerAuth,
    /// `[pgbouncer]` settings on top of the lab defaults (transaction pooling, …).
    pub settings: Vec<(String, String)>,
}

impl std::fmt::Debug for BouncerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let users: Vec<&str> = self.users.iter().map(|(user, _)| user.as_str()).collect();
        f.debug_struct("BouncerOptions")
            .field("parent_dir", &self.parent_dir)
            .field("name", &self.name)
            .field("databases", &self.databases)
            .field("users", &users)
            .field("auth", &self.auth)
            .field("settings", &self.settings)
            .finish()
    }
}

impl BouncerOptions {
    /// Options for a PgBouncer in `<parent_dir>/pgbouncer` serving `databases`.
    pub fn new(parent_dir: impl Into<PathBuf>, databases: Vec<BouncerDatabase>) -> Self {
        BouncerOptions {
            parent_dir: parent_dir.into(),
            name: DEFAULT_BOUNCER_NAME.to_string(),
            databases,
            users: Vec::new(),
            auth: BouncerAuth::default(),
            settings: Vec::new(),
        }
    }

    /// Names this PgBouncer (and its directory), e.g. to run two under one parent.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Adds a `[databases]` entry.
    pub fn database(mut self, database: BouncerDatabase) -> Self {
        self.databases.push(database);
        self
    }

    /// Adds a client user.
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.users.push((name.into(), password.into()));
        self
    }

    /// Sets the client authentication method.
    pub fn auth(mut self, auth: BouncerAuth) -> Self {
        self.auth = auth;
        self
    }

    /// Adds (or overrides) a `[pgbouncer]` setting.
    pub fn setting(mut self, name: impl AsRef<str>, value: impl AsRef<str>) -> Self {
        self.settings
            .push((name.as_ref().to_string(), value.as_ref().to_string()));
        self
    }
}

/// A running PgBouncer on 127.0.0.1, run in the foreground as a supervised child
/// (`PR_SET_PDEATHSIG = SIGKILL`), stopped on `Drop`.
pub struct PgBouncer {
    /// What it was started with, for [`PgBouncer::another`].
    options: BouncerOptions,
    name: String,
    dir: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    port: u16,
    admin_password: String,
    process: Supervised,
}

impl std::fmt::Debug for PgBouncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBouncer")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

impl PgBouncer {
    /// Writes the configuration and starts PgBouncer; returns once its admin console answers.
    pub async fn start(opts: BouncerOptions) -> Result<PgBouncer> {
        check_simple_name("PgBouncer name", &opts.name)?;
        let binary = Binaries::locate()?.pgbouncer()?;
        let identity = Identity::for_servers()?;
        let admin_password = random_token(24);
        let users = client_users(&opts, &admin_password)?;
        let settings = merge_settings(&opts.settings)?;
        let database_lines = opts
            .databases
            .iter()
            .map(BouncerDatabase::config_line)
            .collect::<Result<Vec<_>>>()?;

        identity.prepare_parent(&opts.parent_dir)?;
        let dir = opts.parent_dir.join(&opts.name);
        identity.create_private_dir(&dir)?;
        let dir = std::fs::canonicalize(&dir)
            .map_err(|e| Error::io(format!("cannot resolve {}", dir.display()), e))?;
        let config_path = dir.join("pgbouncer.ini");
        let auth_file = dir.join("userlist.txt");
        let log_path = dir.join("pgbouncer.log");
        identity.write_private_file(&auth_file, &render_userlist(&users))?;

        let (name, dir_ref, config_path_ref, log_path_ref) =
            (&opts.name, &dir, &config_path, &log_path);
        let (binary_ref, identity_ref, settings_ref, lines_ref) =
            (&binary, &identity, &settings, &database_lines);
        let admin_password_ref = &admin_password;
        let options_ref = &opts;
        let auth = opts.auth;
        on_free_port("PgBouncer", |port| async move {
            let config = render_config(&ConfigParts {
                database_lines: lines_ref,
                port,
                auth,
                dir: dir_ref,
                settings: settings_ref,
            });
            identity_ref.write_private_file(config_path_ref, &config)?;
            let stderr_path = dir_ref.join("pgbouncer.stderr");
            let stderr = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&stderr_path)
                .map_err(|e| Error::io(format!("cannot open {}", stderr_path.display()), e))?;
            let mut cmd = Command::new(binary_ref);
            cmd.arg(config_path_ref)
                .current_dir(dir_ref)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr);
            clean_env(&mut cmd);
            identity_ref.apply(&mut cmd);
            let process = Supervised::spawn(cmd, libc::SIGKILL, &format!("pgbouncer-{name}"))?;
            let bouncer = PgBouncer {
                options: options_ref.clone(),
                name: name.clone(),
                dir: dir_ref.clone(),
                config_path: config_path_ref.clone(),
                log_path: log_path_ref.clone(),
                port,
                admin_password: admin_password_ref.clone(),
                process,
            };
            bouncer.wait_ready(&stderr_path).await?;
            tracing::info!(name = %bouncer.name, port, "pgbouncer ready");
            Ok(bouncer)
        })
        .await
    }

    /// A second PgBouncer beside this one (a fleet): the same `[databases]` entries, users and
    /// settings, its own directory `name`, config file, port and admin password.
    pub async fn another(&self, name: impl Into<String>) -> Result<PgBouncer> {
        PgBouncer::start(self.options.clone().name(name)).await
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The listen address: always `127.0.0.1`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// PgBouncer's directory (config, auth file, pid and log files).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `pgbouncer.ini`: a plain file pgshift may edit before issuing `RELOAD`.
    ///
    /// It is owned by the user PgBouncer runs as, mode 0600: rewrite it in place (truncate and
    /// write) — a file replaced by rename would belong to the writer and PgBouncer, running
    /// as [`crate::LAB_USER`], could no longer read it.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// PgBouncer's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The admin console user, [`ADMIN_USER`].
    pub fn admin_user(&self) -> &str {
        ADMIN_USER
    }

    /// `postgres://pgshift_admin@127.0.0.1:PORT/pgbouncer` — no password.
    pub fn admin_url(&self) -> String {
        format!("postgres://{ADMIN_USER}@{HOST}:{}/pgbouncer", self.port)
    }

    /// The admin user's password.
    pub fn admin_password(&self) -> &str {
        &self.admin_password
    }

    /// A driver config for the admin console (database `pgbouncer`), password included.
    /// The console speaks only the simple query protocol: use `simple_query`/`batch_execute`.
    pub fn admin_config(&self) -> Config {
        self.client_config("pgbouncer", ADMIN_USER, &self.admin_password)
    }

    /// Connects to the admin console.
    pub async fn admin_connect(&self) -> Result<Client> {
        let (client, connection) = self
            .admin_config()
            .connect(NoTls)
            .await
            .map_err(|e| Error::pg(format!("cannot connect to {}", self.admin_url()), e))?;
        spawn_connection(connection);
        Ok(client)
    }

    /// A driver config for clients of database `dbname` as `user`.
    pub fn client_config(&self, dbname: &str, user: &str, password: &str) -> Config {
        let mut config = Config::new();
        config
            .host(HOST)
            .port(self.port)
            .user(user)
            .password(password)
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(10));
        config
    }

    /// A pgpass entry for the admin console.
    pub fn admin_pgpass_entry(&self) -> PgpassEntry {
        PgpassEntry {
            host: HOST.to_string(),
            port: self.port,
            database: "pgbouncer".to_string(),
            user: ADMIN_USER.to_string(),
            password: self.admin_password.clone(),
        }
    }

    /// Freezes the process (SIGSTOP): connections to it are accepted by the kernel and never
    /// answered, as when its host stops responding. [`PgBouncer::thaw`] undoes it.
    pub fn freeze(&self) {
        self.process.signal(libc::SIGSTOP);
    }

    /// Lets a frozen PgBouncer run again (SIGCONT).
    pub fn thaw(&self) {
        self.process.signal(libc::SIGCONT);
    }

    /// Stops PgBouncer (SIGQUIT, then SIGKILL after 5 s).
    pub async fn stop(self) -> Result<()> {
        tracing::info!(name = %self.name, "stopping pgbouncer");
        match self.process.shutdown(STOP_STEPS).await {
            Some(0) => Ok(()),
            _ => Err(Error::ShutdownTimeout {
                what: format!("PgBouncer {}", self.name),
                after: STOP_STEPS[0].1,
                log: self.log_path.clone(),
            }),
        }
    }

    async fn wait_ready(&self, stderr_path: &Path) -> Result<()> {
        let started = Instant::now();
        let mut config = self.admin_config();
        config.connect_timeout(Duration::from_secs(2));
        loop {
            if let Some(status) = self.process.exit_status() {
                return Err(Error::Exited {
                    what: format!("PgBouncer {}", self.name),
                    status,
                    log: stderr_path.to_path_buf(),
                    log_tail: log_tail(stderr_path, 20),
                });
            }
            let last_error = match config.connect(NoTls).await {
                Ok(_) => return Ok(()),
                Err(e) => crate::describe(&e),
            };
            if started.elapsed() > READY_TIMEOUT {
                self.process.shutdown(STOP_STEPS).await;
                return Err(Error::StartTimeout {
                    what: format!("PgBouncer {}", self.name),
                    after: READY_TIMEOUT,
                    last_error,
                    log: stderr_path.to_path_buf(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if self.process.exit_status().is_none() {
            tracing::debug!(name = %self.name, pid = self.process.pid(), "stopping pgbouncer on drop");
            self.process.shutdown_blocking(STOP_STEPS);
        }
    }
}

struct ConfigParts<'a> {
    database_lines: &'a [String],
    port: u16,
    auth: BouncerAuth,
    dir: &'a Path,
    settings: &'a [(String, String)],
}

fn render_config(parts: &ConfigParts<'_>) -> String {
    let mut text = String::from(
        ";; Written by pgshift-lab. pgshift rewrites [databases] and issues RELOAD at cutover.\n\
         [databases]\n",
    );
    for line in parts.database_lines {
        text.push_str(line);
        text.push('\n');
    }
    text.push_str("\n[pgbouncer]\n");
    let dir = parts.dir.display();
    text.push_str(&format!(
        "listen_addr = {HOST}\n\
         listen_port = {}\n\
         unix_socket_dir =\n\
         auth_type = {}\n\
         auth_file = {dir}/userlist.txt\n\
         admin_users = {ADMIN_USER}\n\
         pidfile = {dir}/pgbouncer.pid\n\
         logfile = {dir}/pgbouncer.log\n",
        parts.port,
        parts.auth.as_str(),
    ));
    for (key, value) in parts.settings {
        if value.is_empty() {
            text.push_str(&format!("{key} =\n"));
        } else {
            text.push_str(&format!("{key} = {value}\n"));
        }
    }
    text
}

/// `"user" "password"` lines; a `"` inside is doubled.
fn render_userlist(users: &[(String, String)]) -> String {
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    users
        .iter()
        .map(|(user, password)| format!("{} {}\n", quote(user), quote(password)))
        .collect()
}

/// The admin user, the databases' users and the extra users, each once.
fn client_users(opts: &BouncerOptions, admin_password: &str) -> Result<Vec<(String, String)>> {
    let mut users: Vec<(String, String)> =
        vec![(ADMIN_USER.to_string(), admin_password.to_string())];
    let candidates = opts
        .databases
        .iter()
        .map(|db| (&db.user, &db.password))
        .chain(opts.users.iter().map(|(u, p)| (u, p)));
    for (user, password) in candidates {
        if user.is_empty() || password.is_empty() || user.contains('\n') || password.contains('\n')
        {
            return Err(Error::InvalidOption(format!(
                "PgBouncer user {user:?}: user and password must be non-empty single lines"
            )));
        }
        match users.iter().find(|(u, _)| u == user) {
            Some((_, known)) if known == password => {}
            Some(_) => {
                return Err(Error::InvalidOption(format!(
                    "PgBouncer user {user:?} is given two different passwords (or is the reserved admin user): use one per user"
                )))
            }
            None => users.push((user.clone(), password.clone())),
        }
    }
    Ok(users)
}

fn merge_settings(overrides: &[(String, String)]) -> Result<Vec<(String, String)>> {
    let mut merged: Vec<(String, String)> = DEFAULT_SETTINGS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (key, value) in overrides {
        let key = key.to_ascii_lowercase();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(Error::InvalidOption(format!(
                "PgBouncer setting {key:?}: use a [pgbouncer] parameter name"
            )));
        }
        if MANAGED_SETTINGS.contains(&key.as_str()) {
            return Err(Error::InvalidOption(format!(
                "PgBouncer setting {key} is managed by the lab (loopback only, its own files and admin user)"
            )));
        }
        if value.contains(['\n', '\r']) {
            return Err(Error::InvalidOption(format!(
                "PgBouncer setting {key}: the value must be a single line"
            )));
        }
        match merged.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value.clone(),
            None => merged.push((key, value.clone())),
        }
    }
    Ok(merged)
}

/// Quotes a connection-string value for PgBouncer when needed.
fn quote_conn_value(value: &str) -> String {
    if value.contains([' ', '\t', '\'']) {
        format!("'{}'", value.replace('\'', "''"))
    } else {
        value.to_string()
    }
}

fn check_simple_name(what: &str, name: &str) -> Result<()> {
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
            "{what} {name:?}: use letters, digits, '-', '_' or '.'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(password: &str) -> BouncerDatabase {
        BouncerDatabase {
            name: "app".into(),
            host: "127.0.0.1".into(),
            port: 5433,
            dbname: "app db".into(),
            user: "postgres".into(),
            password: password.into(),
        }
    }

    #[test]
    fn database_line_quotes_like_pgbouncer() {
        assert_eq!(
            db("it's").config_line().unwrap(),
            "app = host=127.0.0.1 port=5433 dbname='app db' user=postgres password='it''s'"
        );
        assert!(db("").config_line().is_err());
    }

    #[test]
    fn debug_hides_passwords() {
        let opts = BouncerOptions::new("/tmp", vec![db("hunter2")]).user("app", "swordfish");
        let text = format!("{opts:?}");
        assert!(
            !text.contains("hunter2") && !text.contains("swordfish"),
            "{text}"
        );
    }

    #[test]
    fn userlist_doubles_quotes() {
        assert_eq!(
            render_userlist(&[("a\"b".into(), "pw".into())]),
            "\"a\"\"b\" \"pw\"\n"
        );
    }

    #[test]
    fn users_come_from_databases_once() {
        let opts = BouncerOptions::new("/tmp", vec![db("pw"), db("pw")]).user("app", "secret");
        let users = client_users(&opts, "adminpw").unwrap();
        assert_eq!(
            users,
            vec![
                (ADMIN_USER.to_string(), "adminpw".to_string()),
                ("postgres".to_string(), "pw".to_string()),
                ("app".to_string(), "secret".to_string()),
            ]
        );
        let conflicting = opts.database(db("other"));
        assert!(client_users(&conflicting, "adminpw").is_err());
    }

    #[test]
    fn config_has_loopback_transaction_pooling_and_empty_reset_query() {
        let settings = merge_settings(&[("default_pool_size".into(), "5".into())]).unwrap();
        let text = render_config(&ConfigParts {
            database_lines: &["app = host=127.0.0.1".to_string()],
            port: 6432,
            auth: BouncerAuth::ScramSha256,
            dir: Path::new("/x"),
            settings: &settings,
        });
        assert!(text.contains("[databases]\napp = host=127.0.0.1\n"));
        assert!(text.contains("listen_addr = 127.0.0.1\nlisten_port = 6432\nunix_socket_dir =\n"));
        assert!(text.contains("auth_type = scram-sha-256\nauth_file = /x/userlist.txt\n"));
        assert!(text.contains("pool_mode = transaction\n"));
        assert!(text.contains("server_reset_query =\n"));
        assert!(text.contains("default_pool_size = 5\n"));
        assert!(!text.contains("default_pool_size = 20"));
    }

    #[test]
    fn managed_settings_are_refused() {
        let err = merge_settings(&[("listen_addr".into(), "*".into())]).unwrap_err();
        assert!(err.to_string().contains("managed by the lab"));
    }
}
