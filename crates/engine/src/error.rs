//! Errors that tell the user what went wrong and what to do about it.

use std::time::Duration;

use tokio_postgres::error::SqlState;

/// Which server a connection or statement was aimed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Source,
    Target,
    Pgbouncer,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
            Side::Pgbouncer => "pgbouncer",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something the user gave (an argument, a URL) that pgshift cannot use.
    #[error("invalid {what}: {problem}")]
    InvalidInput { what: String, problem: String },

    #[error(
        "the {side} URL contains a password; a URL is visible in the process list and in logs. \
         Remove it and put the password in a pgpass file (PGPASSFILE or --password-file) or PGPASSWORD"
    )]
    PasswordInUrl { side: Side },

    #[error("cannot read the password file {path} given with --password-file: {source}")]
    PasswordFileUnreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "the password file {path} ({origin}) is open to group or others (mode {mode:04o}); libpq \
         ignores such a file and pgshift refuses it. Run chmod 600 {path}"
    )]
    PasswordFileOpen {
        path: String,
        /// How pgshift found the file: --password-file, PGPASSFILE or ~/.pgpass.
        origin: &'static str,
        mode: u32,
    },

    #[error("could not connect to the {side} at {address}: {reason}")]
    Connect {
        side: Side,
        address: String,
        reason: String,
    },

    /// A TLS problem connecting to a server (a certificate, a file, a server without TLS).
    #[error("could not connect to the {side} at {address} over TLS: {problem}")]
    Tls {
        side: Side,
        address: String,
        problem: crate::tls::TlsProblem,
    },

    #[error("{side}: {context}: {message}")]
    Sql {
        side: Side,
        context: String,
        message: String,
        /// SQLSTATE, when the server sent one.
        code: Option<SqlState>,
    },

    /// The server ended pgshift's session, or the connection broke, while a statement ran or
    /// between statements.
    #[error(
        "lost the connection to the {side} while {context}: {cause}. Once the {side} is reachable, \
         run the same command again: pgshift resumes where it stopped"
    )]
    ConnectionLost {
        side: Side,
        context: String,
        cause: String,
    },

    #[error(
        "preflight found {count} blocker(s); nothing was changed. Fix them and run again:\n{list}"
    )]
    Blocked { count: usize, list: String },

    #[error("{0}")]
    Tool(String),

    #[error("building the indexes and constraints of database {database} on the target failed: {cause}. \
             Those already built are kept. Fix the cause (rows on the target that break a unique index or a \
             constraint were written there outside pgshift: delete them) and run again: the rest is built")]
    StructureBuild { database: String, cause: String },

    #[error("the target database {database} already holds tables that pgshift did not create ({example}); \
             pgshift only restores into an empty database. Drop them or choose another target")]
    TargetNotEmpty { database: String, example: String },

    #[error("replication into the target is failing for database {database}: {cause}. \
             Cutover is refused while apply is failing; fix the cause on the target, then run again")]
    ApplyFailing { database: String, cause: String },

    #[error("cutover aborted after {elapsed:?} (budget {budget:?}) while {step}{}; clients were resumed on the \
             source and replication keeps running. Find what slowed the step and run `pgshift cutover` again",
             blocking_clause(.blocking))]
    CutoverAborted {
        step: String,
        elapsed: Duration,
        budget: Duration,
        /// The client sessions whose transactions held the PAUSE up, if that is what was slow.
        blocking: Vec<crate::pgbouncer::BlockingSession>,
    },

    /// The fence guard could not be started or reached.
    #[error("fence guard: {0}")]
    Guard(String),

    #[error("pgbouncer: {0}")]
    Pgbouncer(String),

    /// The caller's router could not point clients at a server (the message names which).
    #[error("moving traffic: {0}")]
    Route(String),

    /// One database cannot go on without a person.
    #[error("database {database}: {why}")]
    Broken { database: String, why: String },

    /// The step is not for this caller: the operator copies schemas with a Job.
    #[error("database {database} needs its schema copied, which this caller does with the target image's tools")]
    SchemaCopyIsTheCallers { database: String },

    /// A command came before the upgrade was ready for it; nobody was paused.
    #[error("{why}; nothing was changed")]
    NotReady { why: String },

    /// `cutover` after the switch.
    #[error("the cutover is already done: clients use the target. Nothing was changed")]
    AlreadySwitchedNothingToDo,

    /// A rollback that would lose writes, or has nothing to go back to.
    #[error("cannot roll back: {why}. Nothing was changed")]
    CannotRollBack { why: String },

    /// The rollback window cannot carry everything back: a rollback now would lose writes.
    #[error("rollback refused for database {database}: {cause}. Nobody was paused; fix the cause on the target (or end the window with `pgshift cleanup`), then run again")]
    RollbackRefused { database: String, cause: String },

    /// Another pgshift process works on the same upgrade (it holds the upgrade's lock).
    #[error("another pgshift is working on this upgrade: {holder}. Nothing was changed; wait for it to \
             finish (`pgshift status` shows where it stands), or stop that process and run again")]
    Busy { holder: String },

    /// The switch happened: the target took writes, so nothing may undo the upgrade.
    #[error("database {database} was switched to the target at {at}; the new server has taken writes since, \
             so abort can never undo the upgrade and changed nothing. {next}")]
    AlreadySwitched {
        database: String,
        at: String,
        /// What the user can do instead.
        next: &'static str,
    },

    /// `cleanup` is for a finished upgrade.
    #[error("database {database} has not been cut over; cleanup is for a finished upgrade and changed nothing. \
             To stop an unfinished one, run `pgshift abort`")]
    NotSwitched { database: String },

    #[error("{what} did not finish within {waited:?}: {detail}")]
    Timeout {
        what: String,
        waited: Duration,
        detail: String,
    },

    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// A process exit code class (2): a server could not be reached or logged in to, or the
    /// connection to it was lost; the same command works once the server is reachable.
    pub fn is_connection(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::ConnectionLost { .. } => true,
            Error::Tls { problem, .. } => !problem.is_usage(),
            _ => false,
        }
    }

    /// A process exit code class (64): the invocation must change (an argument, a URL, a
    /// password file); nothing was changed on any server.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::InvalidInput { .. }
                | Error::PasswordInUrl { .. }
                | Error::PasswordFileUnreadable { .. }
                | Error::PasswordFileOpen { .. }
        ) || matches!(self, Error::Tls { problem, .. } if problem.is_usage())
    }

    /// For a creation that failed because the object exists: that is success. After a crash,
    /// the dead run's statement can still commit on the server (a backend notices that its
    /// client is gone only when it answers), after the new run observed the object missing.
    pub fn made_meanwhile(self) -> Result<()> {
        match &self {
            // duplicate_object, duplicate_database, or the catalog's unique index when the two
            // commits raced.
            Error::Sql {
                code: Some(code), ..
            } if [
                SqlState::DUPLICATE_OBJECT,
                SqlState::DUPLICATE_DATABASE,
                SqlState::UNIQUE_VIOLATION,
            ]
            .contains(code) =>
            {
                Ok(())
            }
            _ => Err(self),
        }
    }

    pub fn invalid(what: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::InvalidInput {
            what: what.into(),
            problem: problem.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches which server and what pgshift was doing to a driver error.
pub trait SqlContext<T> {
    fn on(self, side: Side, context: &str) -> Result<T>;
}

impl<T> SqlContext<T> for std::result::Result<T, tokio_postgres::Error> {
    fn on(self, side: Side, context: &str) -> Result<T> {
        self.map_err(|error| {
            connection_lost_or(error, side, context, |error| Error::Sql {
                side,
                context: context.to_string(),
                message: server_message(&error),
                code: error.code().cloned(),
            })
        })
    }
}

/// `ConnectionLost` when the connection is gone (the server or PgBouncer died, the network
/// broke) or the server ended the session with a FATAL or PANIC (terminated, shut down,
/// crashed); any other driver error as `otherwise` makes it.
pub(crate) fn connection_lost_or(
    error: tokio_postgres::Error,
    side: Side,
    context: &str,
    otherwise: impl FnOnce(tokio_postgres::Error) -> Error,
) -> Error {
    use tokio_postgres::error::Severity;
    let session_ended = error.is_closed()
        || error
            .as_db_error()
            .and_then(|db| db.parsed_severity())
            .is_some_and(|severity| matches!(severity, Severity::Fatal | Severity::Panic));
    if !session_ended {
        return otherwise(error);
    }
    Error::ConnectionLost {
        side,
        context: context.to_string(),
        cause: server_message(&error),
    }
}

/// The server's own message (and detail/hint) of a driver error, for reports.
/// ", held up by …" naming each session a PAUSE waited on (nothing when none did).
fn blocking_clause(blocking: &[crate::pgbouncer::BlockingSession]) -> String {
    if blocking.is_empty() {
        return String::new();
    }
    let sessions: Vec<String> = blocking.iter().map(|s| s.to_string()).collect();
    format!(
        ", held up by a transaction left open: {} (end it or have its client commit or roll back)",
        sessions.join("; ")
    )
}

pub fn server_message(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let mut text = db.message().to_string();
            if let Some(detail) = db.detail() {
                text.push_str(": ");
                text.push_str(detail);
            }
            text
        }
        None => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql(code: &str) -> Error {
        Error::Sql {
            side: Side::Target,
            context: "creating the subscription".into(),
            message: "already exists".into(),
            code: Some(SqlState::from_code(code)),
        }
    }

    #[test]
    fn an_object_made_meanwhile_is_success_and_other_errors_stay() {
        for code in ["42710", "42P04", "23505"] {
            assert!(sql(code).made_meanwhile().is_ok(), "{code}");
        }
        assert!(matches!(
            sql("42501").made_meanwhile(),
            Err(Error::Sql { code: Some(c), .. }) if c == SqlState::INSUFFICIENT_PRIVILEGE
        ));
        assert!(Error::AlreadySwitchedNothingToDo.made_meanwhile().is_err());
    }
}
