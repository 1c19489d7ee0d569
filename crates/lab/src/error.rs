//! The lab's error type: every message says what went wrong and what to do about it.

use std::path::PathBuf;
use std::time::Duration;

/// Result alias for the lab.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while running lab servers, PgBouncer or the ledger.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The binary cache does not exist.
    #[error("PostgreSQL binaries not found in {dir}: run `cargo xtask setup`")]
    CacheNotFound {
        /// The cache's `pg` directory that was looked for.
        dir: PathBuf,
    },

    /// One major version is missing from the cache.
    #[error("PostgreSQL {major} binaries not found in {dir}: run `cargo xtask setup`")]
    MajorNotFound {
        /// The major version asked for.
        major: u32,
        /// Where its binaries were expected.
        dir: PathBuf,
    },

    /// One major's pg_dump and psql are missing from the cache.
    #[error("pg_dump and psql of PostgreSQL {major} not found with its server nor in {dir}: run `cargo xtask setup`")]
    ClientToolsNotFound {
        /// The major version asked for.
        major: u32,
        /// Where the tools kept apart from the server were expected.
        dir: PathBuf,
    },

    /// PgBouncer is not installed.
    #[error("PgBouncer not found at {path}: run `cargo xtask setup`, which builds it")]
    PgBouncerNotFound {
        /// Where the setup puts it.
        path: PathBuf,
    },

    /// Running as root but the unprivileged user is missing.
    #[error("user `{user}` not found (PostgreSQL refuses to run as root, so lab servers run as it): run `cargo xtask setup`, which creates it")]
    UserNotFound {
        /// The user name looked up.
        user: String,
    },

    /// A directory on the way to a server's data is closed to the unprivileged user.
    #[error("{path} cannot be traversed by user `{user}`, who runs the lab servers: put the lab under a directory it can reach (e.g. a temp dir under /tmp) or `chmod o+x {path}`")]
    DirNotAccessible {
        /// The directory lacking search permission.
        path: PathBuf,
        /// The user that needs it.
        user: String,
    },

    /// The directory a server or bouncer would own already exists.
    #[error("{path} already exists: give the server a new name or a fresh parent directory")]
    AlreadyExists {
        /// The existing directory.
        path: PathBuf,
    },

    /// rcgen could not make a certificate.
    #[error("cannot make a certificate: {0}")]
    Certificate(#[from] rcgen::Error),

    /// A caller-supplied option is unusable.
    #[error("invalid lab option: {0}")]
    InvalidOption(String),

    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A helper program (initdb, …) exited unsuccessfully.
    #[error("`{program}` failed ({status}); check the output below and the binaries in the cache (`cargo xtask setup` reinstalls them):\n{output}")]
    Command {
        /// The program that failed.
        program: String,
        /// Its exit status.
        status: String,
        /// Its combined stdout and stderr (tail).
        output: String,
    },

    /// A server process exited while it was expected to run.
    #[error("{what} exited unexpectedly ({status}); its log {log} ends with:\n{log_tail}")]
    Exited {
        /// Which process.
        what: String,
        /// How it exited.
        status: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of that log.
        log_tail: String,
    },

    /// A process did not become ready in time.
    #[error(
        "{what} did not accept connections within {after:?} (last error: {last_error}); see {log}"
    )]
    StartTimeout {
        /// Which process.
        what: String,
        /// How long was waited.
        after: Duration,
        /// The last connection error seen.
        last_error: String,
        /// Its log file.
        log: PathBuf,
    },

    /// A process ignored its shutdown request and was killed.
    #[error(
        "{what} did not shut down within {after:?} and was killed; see {log} for what it was doing"
    )]
    ShutdownTimeout {
        /// Which process.
        what: String,
        /// The grace period that expired.
        after: Duration,
        /// Its log file.
        log: PathBuf,
    },

    /// A started server reports a different major than requested.
    #[error("the binaries in {bin_dir} run PostgreSQL {found}, not {expected}: the cache is inconsistent, run `cargo xtask setup`")]
    VersionMismatch {
        /// The major asked for.
        expected: u32,
        /// The server's `server_version`.
        found: String,
        /// The binaries used.
        bin_dir: PathBuf,
    },

    /// A query or connection failed.
    #[error("{context}: {detail}")]
    Postgres {
        /// What was being done.
        context: String,
        /// The driver's error with its causes (tokio-postgres' own message is terse).
        detail: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// The ledger tables do not match what this ledger expects.
    #[error("ledger mismatch: {0}")]
    Ledger(String),

    /// A server or pooler answered in a way the lab does not understand.
    #[error("unexpected reply: {0}; this is a pgshift-lab bug or an unsupported server version, please report it")]
    UnexpectedReply(String),

    /// The ledger's clients could not get threads of their own.
    #[error("cannot start the ledger's runtime: {0}; the machine is out of threads or memory")]
    LoadRuntime(std::io::Error),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn pg(context: impl Into<String>, source: tokio_postgres::Error) -> Self {
        Error::Postgres {
            context: context.into(),
            detail: crate::describe(&source),
            source,
        }
    }
}
