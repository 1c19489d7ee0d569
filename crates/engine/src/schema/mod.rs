//! The schema step: roles first, then `pg_dump --schema-only` of each source database restored
//! into the target with psql of the target's major, in one transaction that also records the
//! step as done — so a crash leaves either the whole schema or none of it.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

pub mod sections;

use tokio::process::Command;
use tokio_postgres::Client;

use crate::endpoint::{conninfo_value, Endpoint};
use crate::error::{Error, Result, Side, SqlContext};
use crate::names;
use crate::session;
use crate::sql::{self, Role};

/// Client tools of one major: pg_dump, psql and pg_restore.
#[derive(Debug, Clone)]
pub struct Tools {
    pub pg_dump: PathBuf,
    pub psql: PathBuf,
    pub pg_restore: PathBuf,
}

impl Tools {
    /// Finds the tools in `bin_dir`, or on PATH when none is given.
    pub fn locate(bin_dir: Option<&Path>) -> Option<Tools> {
        let find = |name: &str| -> Option<PathBuf> {
            match bin_dir {
                Some(dir) => Some(dir.join(name)).filter(|p| p.is_file()),
                None => std::env::var_os("PATH").and_then(|paths| {
                    std::env::split_paths(&paths)
                        .map(|dir| dir.join(name))
                        .find(|p| p.is_file())
                }),
            }
        };
        let pg_dump = find("pg_dump")?;
        let psql = find("psql").unwrap_or_else(|| pg_dump.with_file_name("psql"));
        let pg_restore = find("pg_restore").unwrap_or_else(|| pg_dump.with_file_name("pg_restore"));
        Some(Tools {
            pg_dump,
            psql,
            pg_restore,
        })
    }

    /// `pg_dump --version` → ("18.6", 18).
    pub async fn pg_dump_version(&self) -> Result<(String, i32)> {
        let output = Command::new(&self.pg_dump)
            .arg("--version")
            .output()
            .await
            .map_err(|e| Error::Tool(format!("cannot run {}: {e}", self.pg_dump.display())))?;
        let text = String::from_utf8_lossy(&output.stdout);
        parse_tool_version(&text)
            .ok_or_else(|| Error::Tool(format!("unexpected `pg_dump --version` output: {text}")))
    }
}

/// Parses "pg_dump (PostgreSQL) 18.6" (or "15.18 (Debian 15.18-0+deb12u1)").
pub fn parse_tool_version(text: &str) -> Option<(String, i32)> {
    let version = text
        .split(')')
        .nth(1)?
        .split_whitespace()
        .next()?
        .to_string();
    let major = version.split('.').next()?.parse().ok()?;
    Some((version, major))
}

/// Creates on the target the roles of the source that it lacks, then the memberships. Roles
/// that exist are left as they are. The password hashes come from pg_authid; a source role that
/// may not read it (no superuser) copies the roles from pg_roles without them, and preflight
/// has named every login role whose password the user sets on the target.
pub async fn sync_roles(source: &Client, target: &Client) -> Result<usize> {
    let reads_hashes: bool = source
        .query_one(
            "SELECT has_table_privilege('pg_catalog.pg_authid', 'SELECT')",
            &[],
        )
        .await
        .on(Side::Source, "reading roles")?
        .get(0);
    let (catalog, password) = match reads_hashes {
        true => ("pg_authid", "rolpassword"),
        false => ("pg_roles", "NULL::text"),
    };
    let rows = source
        .query(
            &format!(
                "SELECT rolname::text, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin,
                        rolreplication, rolbypassrls, rolconnlimit, {password}, rolvaliduntil::text
                 FROM pg_catalog.{catalog} WHERE rolname !~ '^pg_' ORDER BY oid"
            ),
            &[],
        )
        .await
        .on(Side::Source, "reading roles")?;
    let existing: Vec<String> = target
        .query("SELECT rolname::text FROM pg_roles", &[])
        .await
        .on(Side::Target, "reading roles")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut created = 0;
    for row in rows {
        let role = Role {
            name: row.get(0),
            superuser: row.get(1),
            inherit: row.get(2),
            create_role: row.get(3),
            create_db: row.get(4),
            login: row.get(5),
            replication: row.get(6),
            bypass_rls: row.get(7),
            connection_limit: row.get(8),
            password_hash: row.get(9),
            valid_until: row.get(10),
        };
        if existing.contains(&role.name) {
            continue;
        }
        target
            .batch_execute(&sql::create_role(&role))
            .await
            .on(Side::Target, &format!("creating role {}", role.name))
            .or_else(Error::made_meanwhile)?;
        created += 1;
    }
    let memberships = source
        .query(
            "SELECT r.rolname::text, m.rolname::text, a.admin_option
             FROM pg_auth_members a JOIN pg_roles r ON r.oid = a.roleid JOIN pg_roles m ON m.oid = a.member
             WHERE r.rolname !~ '^pg_' OR m.rolname !~ '^pg_'",
            &[],
        )
        .await
        .on(Side::Source, "reading role memberships")?;
    for row in memberships {
        let (role, member, admin): (String, String, bool) = (row.get(0), row.get(1), row.get(2));
        let granted: bool = target
            .query_one(
                "SELECT pg_has_role($2::text, $1::text, 'MEMBER')",
                &[&role, &member],
            )
            .await
            .on(Side::Target, "reading role memberships")?
            .get(0);
        if !granted {
            target
                .batch_execute(&sql::grant_membership(&role, &member, admin))
                .await
                .on(Side::Target, &format!("granting {role} to {member}"))?;
        }
    }
    Ok(created)
}

/// Creates the target database (owner and encoding as on the source) unless it exists, and
/// marks it with a comment so that `abort` knows it may drop it.
pub async fn ensure_target_database(
    source: &Client,
    target: &Client,
    database: &str,
) -> Result<bool> {
    let exists: bool = target
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
            &[&database],
        )
        .await
        .on(Side::Target, "looking for the database")?
        .get(0);
    if exists {
        return Ok(false);
    }
    let row = source
        .query_one(
            "SELECT pg_get_userbyid(datdba)::text, pg_encoding_to_char(encoding)::text FROM pg_database WHERE datname = $1",
            &[&database],
        )
        .await
        .on(Side::Source, "reading the database's owner and encoding")?;
    let (owner, encoding): (String, String) = (row.get(0), row.get(1));
    let created = target
        .batch_execute(&sql::create_database(database, &owner, &encoding))
        .await
        .on(Side::Target, &format!("creating database {database}"));
    if let Err(error) = created {
        // A dead run's CREATE DATABASE committed meanwhile: the database is there; whether that
        // run marked it is its business (this run did not create it).
        error.made_meanwhile()?;
        return Ok(false);
    }
    target
        .batch_execute(&sql::mark_created_database(database))
        .await
        .on(
            Side::Target,
            &format!("marking database {database} as pgshift's"),
        )?;
    Ok(true)
}

/// Copies the definitions of tables created on the source during the upgrade (with their
/// sequences, defaults, indexes, constraints and triggers: what `pg_dump --table` dumps) into
/// the target, in one transaction. Each table is named by an exact pattern (quoted: no
/// wildcard in a name counts), and `--strict-names` fails rather than dump nothing.
pub async fn copy_new_tables(
    tools: &Tools,
    source: &Endpoint,
    target: &Endpoint,
    tables: &[(String, String)],
) -> Result<()> {
    let passfile = MemoryFile::new("pgshift-pgpass", pgpass_text(&[source, target]).as_bytes())?;
    let mut tables_only = vec!["--strict-names".to_string()];
    tables_only.extend(
        tables
            .iter()
            .map(|(schema, name)| format!("--table={}", sql::qualified(schema, name))),
    );
    let what = format!(
        "the tables created on the source during the upgrade (database {})",
        source.dbname
    );
    let dump = dump_schema(tools, &passfile, source, &tables_only, &what).await?;
    restore_in_one_transaction(tools, &passfile, &dump, target)
        .await
        .map_err(|cause| {
            Error::Tool(format!(
                "copying the definitions of the tables created on the source during the upgrade into database {} \
                 of the target failed (nothing was kept): {cause}",
                target.dbname
            ))
        })
}

/// pg_dump of the source database's schema (`dump_options`, then `extra`): its output, or
/// pg_dump's message as the error, naming `what` was dumped.
async fn dump_schema(
    tools: &Tools,
    passfile: &MemoryFile,
    source: &Endpoint,
    extra: &[String],
    what: &str,
) -> Result<Vec<u8>> {
    let dump = tool(&tools.pg_dump, &[passfile])
        .args(dump_options())
        .args(extra)
        .arg(format!("--dbname={}", tool_conninfo(source)))
        .output()
        .await
        .map_err(|e| Error::Tool(format!("cannot run {}: {e}", tools.pg_dump.display())))?;
    if !dump.status.success() {
        return Err(Error::Tool(format!(
            "pg_dump of {what} failed: {}",
            String::from_utf8_lossy(&dump.stderr).trim()
        )));
    }
    Ok(dump.stdout)
}

/// pg_dump's options for the schema (connection options aside).
pub fn dump_options() -> Vec<String> {
    vec![
        "--schema-only".into(),
        "--no-publications".into(),
        "--no-subscriptions".into(),
        "--no-password".into(),
        format!("--exclude-schema={}", names::META_SCHEMA),
    ]
}

/// psql's options for the restore (connection and file aside): one transaction, stop at the
/// first error. The script file must come after them: they start the session by keeping its
/// statements out of the server log (a dump can hold secrets, e.g. user mappings' passwords).
pub fn restore_options() -> Vec<String> {
    let mut options: Vec<String> = [
        "--no-psqlrc",
        "--quiet",
        "--single-transaction",
        "--no-password",
        // Query results (the dump's set_config calls) are noise; errors go to stderr.
        "--output=/dev/null",
        "-v",
        "ON_ERROR_STOP=1",
    ]
    .map(String::from)
    .to_vec();
    // psql's version is the server's here, but the restore runs whatever it is: only a
    // superuser is sure to pass the privilege test on every major.
    options.push(format!(
        "--command={}",
        session::quiet_session(session::may_set_privileged(0))
    ));
    options
}

/// The `dbname` part of a libpq connection string, for `--dbname` of pg_dump and psql: libpq
/// reads a bare `--dbname` holding `=` or starting with `postgres://` as a connection string
/// of its own, so a database named `host=x` would be a host. As a quoted value inside a
/// connection string, every name is just a name.
pub fn database_conninfo(database: &str) -> String {
    format!("dbname={}", conninfo_value(database))
}

/// The one connection string a child tool gets (`--dbname`), with everything pgshift resolved
/// for the endpoint but the password (that comes from the in-memory pgpass file): its TLS
/// settings too, since the tools see no PGSSL* variable.
fn tool_conninfo(endpoint: &Endpoint) -> String {
    let mut parts = vec![
        database_conninfo(&endpoint.dbname),
        format!("host={}", conninfo_value(&endpoint.host)),
        format!("port={}", endpoint.port),
        format!("user={}", conninfo_value(&endpoint.user)),
        // libpq counts whole seconds; 0 would mean waiting forever.
        format!(
            "connect_timeout={}",
            endpoint.connect_timeout.as_secs().max(1)
        ),
        "application_name=pgshift".to_string(),
    ];
    parts.extend(endpoint.tls.conninfo_params());
    parts.join(" ")
}

/// SQL that ends the schema restore, in its transaction: pgshift's own objects and the step
/// record, so that the step is recorded if and only if the schema is there. (The whole schema:
/// the operator's Job restores it so.)
pub fn restore_epilogue() -> String {
    restore_epilogue_with("")
}

/// The epilogue, with a value on the step record (`sections::DEFINITIONS_ONLY`: the builds
/// follow after the copy).
fn restore_epilogue_with(value: &str) -> String {
    format!(
        "\nSET default_transaction_read_only = off;\n{}\nINSERT INTO {} (step, value) VALUES ({}, nullif({}, '')) ON CONFLICT DO NOTHING;\n",
        sql::create_meta_objects(true),
        sql::qualified(names::META_SCHEMA, names::STATE_TABLE),
        sql::literal(names::step::SCHEMA),
        sql::literal(value),
    )
}

/// The SQL that records a step, at the end of a script restored in one transaction.
fn step_record(step: &str) -> String {
    format!(
        "\nINSERT INTO {} (step) VALUES ({}) ON CONFLICT DO NOTHING;\n",
        sql::qualified(names::META_SCHEMA, names::STATE_TABLE),
        sql::literal(step)
    )
}

/// libpq options for a session that may write where the database is read-only.
const READ_WRITE_SESSION: &str = "-c default_transaction_read_only=off";

/// Restores `script` into the target with psql, in one transaction that stops at the first
/// error. A complete file, not a pipe: if pgshift dies, psql must not read a cut-off script to
/// its end and COMMIT it. With the file and the parent-death signal, the restore is all or
/// nothing. The error is psql's own message.
async fn restore_in_one_transaction(
    tools: &Tools,
    passfile: &MemoryFile,
    script: &[u8],
    target: &Endpoint,
) -> std::result::Result<(), String> {
    let script_file = MemoryFile::new("pgshift-schema", script).map_err(|e| e.to_string())?;
    let output = tool(&tools.psql, &[passfile, &script_file])
        // Before psql's BEGIN: the target database is read-only to everyone but pgshift.
        .env("PGOPTIONS", READ_WRITE_SESSION)
        .args(restore_options())
        .arg(format!("--file={}", script_file.path()))
        .arg(format!("--dbname={}", tool_conninfo(target)))
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", tools.psql.display()))?;
    match output.status.success() {
        true => Ok(()),
        false => Err(String::from_utf8_lossy(&output.stderr).trim().to_string()),
    }
}

/// A client tool that gets exactly what pgshift resolved: no PG* variable of pgshift's own
/// environment (a stale PGPASSWORD would win over the pgpass file, PGSERVICE or PGOPTIONS would
/// change the connection), the in-memory pgpass file and, if any, the script file as inherited
/// descriptors (`files`: the pgpass file first). It dies with pgshift (Linux parent-death signal), so that a killed pgshift never
/// leaves a restore running behind the next run's back.
fn tool(program: &Path, files: &[&MemoryFile]) -> Command {
    let mut command = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.as_encoded_bytes().starts_with(b"PG") {
            command.env_remove(name);
        }
    }
    // The pgpass file comes first.
    if let Some(passfile) = files.first() {
        command.env("PGPASSFILE", passfile.path());
    }
    command.stdin(Stdio::null()).kill_on_drop(true);
    let inherited: Vec<RawFd> = files.iter().map(|f| f.fd()).collect();
    // SAFETY: prctl and fcntl are async-signal-safe and touch only the child being set up; the
    // descriptors stay open in pgshift until the child has exited.
    unsafe {
        command.pre_exec(move || {
            for &fd in &inherited {
                // Inherited by this child only: in pgshift they stay close-on-exec.
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    command
}

/// pgpass lines (`host:port:*:user:password`) for the endpoints that have a password.
fn pgpass_text(endpoints: &[&Endpoint]) -> String {
    let escape = |v: &str| v.replace('\\', "\\\\").replace(':', "\\:");
    endpoints
        .iter()
        .filter_map(|e| {
            let password = e.password.as_ref()?;
            Some(format!(
                "{}:{}:*:{}:{}\n",
                escape(&e.host),
                e.port,
                escape(&e.user),
                escape(password.expose())
            ))
        })
        .collect()
}

/// A file that exists in memory only (Linux `memfd_create`): nothing of it is ever on disk, and
/// it is gone once pgshift and the children that inherited it have exited, however they end. A
/// child opens it by the path `/proc/self/fd/N`, which libpq and psql take for a regular file.
struct MemoryFile {
    file: File,
}

impl MemoryFile {
    fn new(name: &str, contents: &[u8]) -> Result<MemoryFile> {
        let io = |source| Error::Io {
            path: format!("in-memory file {name}"),
            source,
        };
        let c_name = CString::new(name).expect("file names hold no NUL");
        // SAFETY: a valid C string; the new descriptor is owned by `file` alone.
        let mut file = unsafe {
            let fd = libc::memfd_create(c_name.as_ptr(), libc::MFD_CLOEXEC);
            if fd < 0 {
                return Err(io(std::io::Error::last_os_error()));
            }
            File::from_raw_fd(fd)
        };
        // libpq ignores a password file that group or others may read (memfd starts at 0777).
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
        file.write_all(contents).map_err(io)?;
        Ok(MemoryFile { file })
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The path under which a child that inherited the descriptor opens the file from its start.
    fn path(&self) -> String {
        format!("/proc/self/fd/{}", self.fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_versions_are_parsed() {
        assert_eq!(
            parse_tool_version("pg_dump (PostgreSQL) 18.6\n"),
            Some(("18.6".into(), 18))
        );
        assert_eq!(
            parse_tool_version("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(("15.18".into(), 15))
        );
        assert_eq!(parse_tool_version("nonsense"), None);
    }

    fn endpoint(dbname: &str, password: &str) -> Endpoint {
        let mut endpoint = Endpoint::new(
            Side::Source,
            "db:1",
            6543,
            "o'neil",
            dbname,
            Some(crate::endpoint::Secret::new(password)),
        );
        endpoint.connect_timeout = std::time::Duration::from_millis(500);
        endpoint
    }

    #[test]
    fn the_tools_get_the_database_name_as_a_quoted_value_and_no_password() {
        let e = endpoint("dbname=x host='y' \\", "secret");
        assert_eq!(
            tool_conninfo(&e),
            "dbname='dbname=x host=\\'y\\' \\\\' host='db:1' port=6543 user='o\\'neil' \
             connect_timeout=1 application_name=pgshift"
        );
        assert_eq!(database_conninfo("a=b"), "dbname='a=b'");
        let mut tls = endpoint("app", "secret");
        tls.tls = crate::tls::TlsSettings::parse_conninfo(
            "sslmode=verify-full sslrootcert=/ca.pem sslcert=/c.crt sslkey=/c.key",
        )
        .unwrap();
        assert!(
            tool_conninfo(&tls).ends_with(
                "application_name=pgshift sslmode=verify-full sslrootcert='/ca.pem' \
                 sslcert='/c.crt' sslkey='/c.key'"
            ),
            "{}",
            tool_conninfo(&tls)
        );
    }

    #[test]
    fn pgpass_lines_escape_colons_and_backslashes() {
        let (a, b) = (endpoint("x", "p:a\\ss"), endpoint("y", "other"));
        let mut no_password = endpoint("z", "");
        no_password.password = None;
        assert_eq!(
            pgpass_text(&[&a, &no_password, &b]),
            "db\\:1:6543:*:o'neil:p\\:a\\\\ss\ndb\\:1:6543:*:o'neil:other\n"
        );
    }

    #[test]
    fn a_memory_file_is_private_off_disk_and_read_from_its_start_by_path() {
        let file = MemoryFile::new("pgshift-test", b"contents").unwrap();
        let meta = std::fs::metadata(file.path()).unwrap();
        // libpq insists on a regular file that only its owner may read.
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(file.path()).unwrap(), b"contents");
        let target = std::fs::read_link(file.path()).unwrap();
        assert!(
            target.to_string_lossy().starts_with("/memfd:pgshift-test"),
            "{target:?}"
        );
    }
}
