//! pgshift's lab: real PostgreSQL servers of many majors, a real PgBouncer, and the workload
//! ledger that proves an upgrade lost nothing.
//!
//! Product code — `pgshift demo`, the tests and the benchmarks use it. Servers and PgBouncer
//! listen on 127.0.0.1 only and run as the unprivileged user [`LAB_USER`] when the lab runs as
//! root. They are children of the lab process that the kernel stops if that process dies
//! (`PR_SET_PDEATHSIG`), and `Drop` stops them too.

mod binaries;
mod bouncer;
mod error;
pub mod inspect;
pub mod ledger;
mod pgpass;
mod process;
pub mod sample;
mod server;
pub mod testing;
pub mod tls;

pub use binaries::Binaries;
pub use bouncer::{
    BouncerAuth, BouncerDatabase, BouncerOptions, PgBouncer, ADMIN_USER, DEFAULT_BOUNCER_NAME,
};
pub use error::{Error, Result};
pub use ledger::{
    Ledger, LedgerHandle, LedgerReport, LedgerSnapshot, LedgerTarget, LoadOptions, Outcome, Sample,
    Verification,
};
pub use pgpass::{write_pgpass, write_pgpass_entries, PgpassEntry};
pub use process::{log_tail, Identity, LAB_USER};
pub use server::{PgServer, ServerInfo, ServerOptions, DEFAULT_SETTINGS, SUPERUSER};

/// Every lab endpoint listens here, and only here.
pub const HOST: &str = "127.0.0.1";

/// A random alphanumeric string (passwords, run ids).
pub(crate) fn random_token(len: usize) -> String {
    use rand::distributions::Alphanumeric;
    use rand::Rng;
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// A driver error in full: tokio-postgres' `Display` says only "db error" or "error
/// connecting to server"; the server's message and the I/O cause are in the error chain.
pub(crate) fn describe(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            text.push_str(&format!(" (DETAIL: {detail})"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!(" (HINT: {hint})"));
        }
        return text;
    }
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Drives a tokio-postgres connection on the current runtime until it closes.
pub(crate) fn spawn_connection<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "connection closed");
        }
    });
}
