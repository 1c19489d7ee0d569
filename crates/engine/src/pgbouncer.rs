//! PgBouncer as the write fence and the switch: PAUSE waits for in-flight transactions and
//! holds new ones; the `[databases]` entries are repointed in its config file and RELOADed;
//! RESUME releases the held queries against the new server.

use std::path::{Path, PathBuf};

use crate::endpoint::Endpoint;
use crate::error::{connection_lost_or, server_message, Error, Result, Side};

/// How pgshift reaches a PgBouncer and which of its entries it moves.
#[derive(Debug, Clone)]
pub struct PgbouncerTarget {
    /// The admin console (`.../pgbouncer` database, a user in `admin_users`).
    pub admin: Endpoint,
    /// The config file whose `[databases]` section pgshift rewrites.
    pub config_path: PathBuf,
    /// Entries to move; empty means every entry that points at the source.
    pub entries: Vec<String>,
    /// Address PgBouncer uses for the source, when it differs from the source URL's.
    pub source_address: Option<(String, u16)>,
    /// Address PgBouncer uses for the target, when it differs from the target URL's.
    pub target_address: Option<(String, u16)>,
}

impl PgbouncerTarget {
    /// Moves every entry that points at the source, with the addresses of the URLs.
    pub fn new(admin: Endpoint, config_path: PathBuf) -> Self {
        PgbouncerTarget {
            admin,
            config_path,
            entries: Vec::new(),
            source_address: None,
            target_address: None,
        }
    }
}

/// One `name = key=value ...` line of the `[databases]` section.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub dbname: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
}

/// Debug output leaves the password out.
impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Parses the `[databases]` entries of a pgbouncer.ini.
pub fn entries(ini: &str) -> Vec<Entry> {
    database_lines(ini)
        .map(|(_, name, connstr)| {
            let params = parse_connstr(connstr);
            let get = |key: &str| {
                params
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.clone())
            };
            Entry {
                name: name.to_string(),
                host: get("host"),
                port: get("port").and_then(|p| p.parse().ok()),
                dbname: get("dbname"),
                user: get("user"),
                password: get("password"),
            }
        })
        .collect()
}

/// Rewrites `host` and `port` of the named entries, keeping every other line and parameter.
pub fn repoint(ini: &str, names: &[String], host: &str, port: u16) -> String {
    let targets: Vec<usize> = database_lines(ini)
        .filter(|(_, name, _)| names.iter().any(|n| n == name))
        .map(|(index, _, _)| index)
        .collect();
    let mut out: Vec<String> = Vec::new();
    for (index, line) in ini.lines().enumerate() {
        if !targets.contains(&index) {
            out.push(line.to_string());
            continue;
        }
        let (name, connstr) = line.split_once('=').expect("entry lines contain '='");
        let mut params: Vec<(String, String)> = parse_connstr(connstr.trim())
            .into_iter()
            .filter(|(k, _)| k != "host" && k != "port")
            .collect();
        params.insert(0, ("port".into(), port.to_string()));
        params.insert(0, ("host".into(), host.to_string()));
        let rendered: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{k}={}", quote_value(v)))
            .collect();
        out.push(format!("{} = {}", name.trim(), rendered.join(" ")));
    }
    let mut text = out.join("\n");
    if ini.ends_with('\n') {
        text.push('\n');
    }
    text
}

/// (line index, entry name, connection string) for each entry of `[databases]`.
fn database_lines(ini: &str) -> impl Iterator<Item = (usize, &str, &str)> {
    let mut section = String::new();
    ini.lines().enumerate().filter_map(move |(index, line)| {
        let trimmed = line.trim();
        if trimmed.starts_with('[') && trimmed.ends_with(']') {
            section = trimmed[1..trimmed.len() - 1].trim().to_ascii_lowercase();
            return None;
        }
        if section != "databases" || trimmed.starts_with(';') || trimmed.starts_with('#') {
            return None;
        }
        let (name, connstr) = trimmed.split_once('=')?;
        Some((index, name.trim(), connstr.trim()))
    })
}

/// PgBouncer's connection strings: `key=value` pairs, values optionally single-quoted with
/// `''` for a quote inside.
fn parse_connstr(connstr: &str) -> Vec<(String, String)> {
    let mut params = Vec::new();
    let mut chars = connstr.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim()
            .to_string();
        if key.is_empty() {
            break;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            while let Some(c) = chars.next() {
                if c == '\'' {
                    if chars.peek() == Some(&'\'') {
                        chars.next();
                        value.push('\'');
                    } else {
                        break;
                    }
                } else {
                    value.push(c);
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        params.push((key, value));
    }
    params
}

fn quote_value(value: &str) -> String {
    if !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:".contains(c))
    {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\'', "''"))
    }
}

/// Reads the config file.
pub fn read_config(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Replaces the config file atomically (write beside, then rename), keeping its permissions.
pub fn write_config(path: &Path, text: &str) -> Result<()> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let temporary = path.with_extension("pgshift-new");
    let permissions = std::fs::metadata(path).map_err(io)?.permissions();
    std::fs::write(&temporary, text).map_err(io)?;
    std::fs::set_permissions(&temporary, permissions).map_err(io)?;
    // Keep the owner too: PgBouncer may run as another user that must still read it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).map_err(io)?;
        std::os::unix::fs::chown(&temporary, Some(meta.uid()), Some(meta.gid())).map_err(io)?;
    }
    std::fs::rename(&temporary, path).map_err(io)
}

/// The entries pgshift moves that point at `address` now: the named ones (`--pgbouncer-db`),
/// or all of them.
pub fn entries_at(
    ini: &str,
    target: &PgbouncerTarget,
    address: &(String, u16),
) -> Result<Vec<Entry>> {
    let all = entries(ini);
    let missing: Vec<&String> = target
        .entries
        .iter()
        .filter(|n| !all.iter().any(|e| &e.name == *n))
        .collect();
    if !missing.is_empty() {
        return Err(Error::Pgbouncer(format!(
            "entries {missing:?} are not in the [databases] section of {}; check --pgbouncer-db",
            target.config_path.display()
        )));
    }
    let (host, port) = address;
    Ok(all
        .into_iter()
        .filter(|e| target.entries.is_empty() || target.entries.contains(&e.name))
        .filter(|e| e.host.as_deref() == Some(host.as_str()) && e.port.unwrap_or(5432) == *port)
        .collect())
}

impl PgbouncerTarget {
    /// How messages name this PgBouncer: its console and its config file.
    pub fn label(&self) -> String {
        format!(
            "PgBouncer {}:{} (config {})",
            self.admin.host,
            self.admin.port,
            self.config_path.display()
        )
    }

    /// How PgBouncer reaches a server whose URL is `endpoint`: the address given for it, or
    /// the URL's.
    pub fn address_of(&self, side: crate::error::Side, endpoint: &Endpoint) -> (String, u16) {
        let given = match side {
            crate::error::Side::Target => &self.target_address,
            _ => &self.source_address,
        };
        given
            .clone()
            .unwrap_or_else(|| (endpoint.host.clone(), endpoint.port))
    }
}

/// Before any fence: each moved entry that carries a user and password must be able to log in
/// to the target with them — otherwise PgBouncer could not open a server connection after the
/// switch, and its clients would wait. (Entries without a password authenticate some other way
/// and are not checked.)
pub async fn check_logins(entries: &[Entry], target: &Endpoint) -> Result<()> {
    for entry in entries {
        let (Some(user), Some(password)) = (&entry.user, &entry.password) else {
            continue;
        };
        let mut endpoint = target.with_dbname(entry.dbname.as_deref().unwrap_or(&entry.name));
        endpoint.user = user.clone();
        endpoint.password = Some(crate::endpoint::Secret::new(password.clone()));
        if let Err(error) = endpoint.connect().await {
            return Err(Error::Pgbouncer(format!(
                "entry {} logs in as user {user:?}, which cannot log in to the target ({error}); \
                 the cutover would leave its clients waiting. Give that role the same password on the \
                 target, or fix the entry, then run the cutover again",
                entry.name
            )));
        }
    }
    Ok(())
}

/// A connection to the admin console. It speaks only the simple query protocol.
pub struct Admin {
    client: tokio_postgres::Client,
}

impl Admin {
    pub async fn connect(endpoint: &Endpoint) -> Result<Admin> {
        Ok(Admin {
            client: endpoint.connect().await?,
        })
    }

    pub async fn command(&self, command: &str) -> Result<()> {
        self.client
            .simple_query(command)
            .await
            .map(|_| ())
            .map_err(|e| {
                connection_lost_or(e, Side::Pgbouncer, &format!("running {command}"), |e| {
                    Error::Pgbouncer(format!("{command} failed: {}", server_message(&e)))
                })
            })
    }

    /// RESUMEs the pooler as a whole (after a `PAUSE` without a database) if it is paused.
    /// PgBouncer 1.21+ says whether it is (`SHOW STATE`); older ones only answer a RESUME of a
    /// pooler that is not paused with an error whose text says so and whose SQLSTATE is the
    /// generic 08P01 — that text is then the only signal there is.
    pub async fn resume_if_paused(&self) -> Result<()> {
        match self.client.simple_query("SHOW STATE").await {
            Ok(messages) => {
                let paused = messages.iter().any(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => {
                        row.get(0) == Some("paused") && row.get(1) == Some("yes")
                    }
                    _ => false,
                });
                if paused {
                    self.command("RESUME").await?;
                }
                Ok(())
            }
            Err(_) => match self.client.simple_query("RESUME").await {
                Ok(_) => Ok(()),
                Err(error) if crate::error::server_message(&error).contains("not paused") => Ok(()),
                Err(error) => Err(Error::Pgbouncer(format!(
                    "RESUME failed: {}",
                    crate::error::server_message(&error)
                ))),
            },
        }
    }

    /// The rows a `SHOW …` command answers.
    pub(crate) async fn rows(&self, show: &str) -> Result<Vec<tokio_postgres::SimpleQueryRow>> {
        let messages = self.client.simple_query(show).await.map_err(|e| {
            connection_lost_or(e, Side::Pgbouncer, &format!("running {show}"), |e| {
                Error::Pgbouncer(format!("{show} failed: {e}"))
            })
        })?;
        Ok(messages
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
                _ => None,
            })
            .collect())
    }

    /// The databases PgBouncer reports as paused (`SHOW DATABASES`, column `paused`).
    pub async fn paused(&self) -> Result<Vec<String>> {
        Ok(self
            .rows("SHOW DATABASES")
            .await?
            .iter()
            .filter(|row| row.try_get("paused").ok().flatten() == Some("1"))
            .filter_map(|row| row.try_get("name").ok().flatten().map(str::to_string))
            .collect())
    }
}

/// A client session that holds a PAUSE up: a transaction on a server connection of a paused
/// pool, which PgBouncer waits for (a long transaction, or one a client left open, e.g.
/// `idle in transaction (aborted)`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BlockingSession {
    /// The PgBouncer it goes through ([`PgbouncerTarget::label`], or the console's address).
    pub pooler: String,
    /// The server process on the server clients leave.
    pub pid: i32,
    pub database: String,
    pub user: String,
    pub application_name: String,
    /// The application's address as PgBouncer sees it (the server sees PgBouncer's).
    pub client_address: Option<String>,
    /// `pg_stat_activity.state`, e.g. `idle in transaction (aborted)`.
    pub state: String,
    /// When its transaction began (UTC).
    pub since: String,
}

impl std::fmt::Display for BlockingSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} (application_name {:?}, client {}, user {}, database {}) {} since {}, through {}",
            self.pid,
            self.application_name,
            self.client_address.as_deref().unwrap_or("unknown"),
            self.user,
            self.database,
            self.state,
            self.since,
            self.pooler
        )
    }
}

/// The sessions in a transaction that began at least `held_for` ago, on server connections of
/// `pooler`'s pools (`entries`, or all of them), as the server they connect to (`server`)
/// reports them: what a PAUSE that has waited `held_for` waits on.
pub(crate) async fn blocking_sessions(
    pooler: &str,
    console: &Admin,
    entries: Option<&[String]>,
    server: &tokio_postgres::Client,
    side: Side,
    held_for: std::time::Duration,
) -> Result<Vec<BlockingSession>> {
    use crate::error::SqlContext;
    let in_pool = |row: &tokio_postgres::SimpleQueryRow| {
        entries.is_none_or(|names| {
            row.try_get("database")
                .ok()
                .flatten()
                .is_some_and(|db| names.iter().any(|n| n == db))
        })
    };
    let servers = console.rows("SHOW SERVERS").await?;
    let linked: Vec<(i32, Option<String>)> = servers
        .iter()
        .filter(|row| in_pool(row))
        .filter_map(|row| {
            let pid = row.try_get("remote_pid").ok().flatten()?.parse().ok()?;
            Some((pid, row.try_get("link").ok().flatten().map(str::to_string)))
        })
        .collect();
    if linked.is_empty() {
        return Ok(Vec::new());
    }
    let clients = console.rows("SHOW CLIENTS").await?;
    let address_of = |link: &Option<String>| {
        let client = clients
            .iter()
            .find(|c| link.is_some() && c.try_get("ptr").ok().flatten() == link.as_deref())?;
        let addr = client.try_get("addr").ok().flatten()?;
        let port = client.try_get("port").ok().flatten().unwrap_or("");
        Some(format!("{addr}:{port}"))
    };
    let pids: Vec<i32> = linked.iter().map(|(pid, _)| *pid).collect();
    // An aborted transaction has no xact_start any more: it holds the connection since its
    // state changed.
    let rows = server
        .query(
            "SELECT pid, coalesce(datname, ''), coalesce(usename, ''), coalesce(application_name, ''),
                    host(client_addr), coalesce(state, ''),
                    to_char(since AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS \"UTC\"')
             FROM pg_stat_activity, coalesce(xact_start, state_change) AS since
             WHERE pid = ANY($1) AND (xact_start IS NOT NULL OR state LIKE 'idle in transaction%')
               AND since <= clock_timestamp() - make_interval(secs => $2)
             ORDER BY since",
            &[&pids, &held_for.as_secs_f64()],
        )
        .await
        .on(side, "reading the sessions that hold the PAUSE up")?;
    Ok(rows
        .iter()
        .map(|row| {
            let pid: i32 = row.get(0);
            let link = linked
                .iter()
                .find(|(p, _)| *p == pid)
                .and_then(|(_, l)| l.clone());
            BlockingSession {
                pooler: pooler.to_string(),
                pid,
                database: row.get(1),
                user: row.get(2),
                application_name: row.get(3),
                client_address: address_of(&link).or_else(|| row.get(4)),
                state: row.get(5),
                since: row.get(6),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INI: &str = "[databases]\n; comment = host=x\napp = host=127.0.0.1 port=5432 dbname=app user=app password='it''s'\nother = host=10.1.1.1 dbname=other\n\n[pgbouncer]\nlisten_port = 6432\n";

    #[test]
    fn entries_are_read_with_quoted_values() {
        let e = entries(INI);
        assert_eq!(e.len(), 2);
        assert_eq!(
            e[0],
            Entry {
                name: "app".into(),
                host: Some("127.0.0.1".into()),
                port: Some(5432),
                dbname: Some("app".into()),
                user: Some("app".into()),
                password: Some("it's".into()),
            }
        );
        assert!(
            !format!("{:?}", e[0]).contains("it's"),
            "Debug shows no password"
        );
        assert_eq!(e[1].port, None);
    }

    #[test]
    fn repoint_changes_only_host_and_port_of_named_entries() {
        let out = repoint(INI, &["app".to_string()], "127.0.0.2", 6543);
        assert!(
            out.contains("app = host=127.0.0.2 port=6543 dbname=app user=app password='it''s'\n")
        );
        assert!(out.contains("other = host=10.1.1.1 dbname=other\n"));
        assert!(out.contains("; comment = host=x\n"));
        assert!(out.ends_with("listen_port = 6432\n"));
        assert_eq!(entries(&out)[0].host.as_deref(), Some("127.0.0.2"));
    }
}
