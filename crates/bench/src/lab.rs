//! One method's playground: a freshly loaded PostgreSQL 15 source and an empty 18 target in a
//! temporary directory, with the application's role, and the pieces every method shares.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use pgshift_lab::ledger::{Ledger, LedgerHandle, LedgerReport, LedgerTarget, LoadOptions};
use pgshift_lab::{write_pgpass, PgServer, ServerOptions};
use tempfile::TempDir;
use tokio::process::Command;

use crate::dataset::{self, Dataset};
use crate::error::{io, pg, BenchError, Result};

pub const SOURCE_MAJOR: u32 = 15;
pub const TARGET_MAJOR: u32 = 18;
pub const DB: &str = "app";
pub const APP_USER: &str = "app";
/// A password for a throwaway local server; never a real secret.
pub const APP_PASSWORD: &str = "bench-app-password";
/// Accounts the ledger transfers between.
const LEDGER_ACCOUNTS: u32 = 100;

/// The data set and the write load, the same for every method.
#[derive(Debug, Clone)]
pub struct Workload {
    pub dataset: Dataset,
    pub scale: u32,
    pub extra_tables: u32,
    pub extra_sequences: u32,
    pub clients: usize,
    pub rate: Option<f64>,
    /// How long the load runs before the upgrade starts and after it ends.
    pub settle: Duration,
}

impl Workload {
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            clients: self.clients,
            rate: self.rate,
            ..LoadOptions::default()
        }
    }

    /// Starts the ledger load against `target`.
    pub fn start_load(&self, target: LedgerTarget) -> LedgerHandle {
        Ledger::run(target, self.load_options())
    }
}

pub struct Lab {
    pub source: PgServer,
    pub target: PgServer,
    /// Size of the source database after loading, in MB.
    pub size_mb: f64,
    pub dir: TempDir,
}

impl Lab {
    /// Starts both servers and loads the source.
    pub async fn fresh(work: &Workload) -> Result<Lab> {
        let dir = tempfile::Builder::new()
            .prefix("pgshift-bench")
            .tempdir()
            .map_err(io("cannot create a temporary directory"))?;
        let (source, target) = tokio::join!(
            PgServer::start(ServerOptions::new(SOURCE_MAJOR, dir.path(), "source")),
            PgServer::start(ServerOptions::new(TARGET_MAJOR, dir.path(), "target")),
        );
        let (source, target) = (source?, target?);
        source.create_database(DB).await?;
        let client = source.connect(DB).await?;
        tracing::info!(
            dataset = work.dataset.name(),
            scale = work.scale,
            extra_tables = work.extra_tables,
            "loading the source"
        );
        dataset::load(
            &client,
            work.dataset,
            work.scale,
            work.extra_tables,
            work.extra_sequences,
        )
        .await?;
        Ledger::install(&client, LEDGER_ACCOUNTS).await?;
        source.create_login_role(APP_USER, APP_PASSWORD).await?;
        Ledger::grant(&client, APP_USER).await?;
        client
            .batch_execute(&format!(
                "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {APP_USER}"
            ))
            .await
            .map_err(pg("cannot grant to the application role"))?;
        let size_mb = database_mb(&source).await?;
        tracing::info!(size_mb, "source loaded");
        Ok(Lab {
            source,
            target,
            size_mb,
            dir,
        })
    }

    /// A pgpass file for both servers' superusers, for the client tools.
    pub fn pgpass(&self) -> Result<PathBuf> {
        let path = self.dir.path().join("pgpass");
        write_pgpass(&path, &[&self.source, &self.target])?;
        Ok(path)
    }

    /// A client tool of the target's major (pg_dump, pg_restore, psql), with the pgpass file.
    pub fn tool(&self, name: &str, pgpass: &Path) -> Command {
        client_command(self.target.bin_dir().join(name), pgpass)
    }

    /// Stops both servers; the directory goes with `self`.
    pub async fn stop(self) -> Result<()> {
        self.source.stop().await?;
        self.target.stop().await?;
        Ok(())
    }
}

/// A libpq client program that finds passwords in `pgpass`; its stderr is kept for errors.
pub fn client_command(program: impl AsRef<std::ffi::OsStr>, pgpass: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .env("PGPASSFILE", pgpass)
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// libpq connection options for `server`'s superuser, without the password (pgpass has it).
pub fn conninfo(server: &PgServer, db: &str) -> String {
    format!(
        "host={} port={} user={} dbname={db}",
        server.host(),
        server.port(),
        server.superuser()
    )
}

/// Runs a prepared client tool to completion.
pub async fn run_tool(mut command: Command) -> Result<()> {
    let tool = PathBuf::from(command.as_std().get_program());
    tracing::debug!(command = ?command.as_std(), "running");
    let output = command
        .output()
        .await
        .map_err(io(format!("cannot run {}", tool.display())))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(BenchError::Tool {
            tool,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Lets the load run for the settle time: the steady state before or after an upgrade.
pub async fn settle(work: &Workload) {
    tokio::time::sleep(work.settle).await;
}

/// When a stopped load's last commit was acknowledged, and the report.
pub async fn stop_load(load: LedgerHandle) -> (Instant, LedgerReport) {
    let started = load.started();
    let report = load.stop().await;
    (started, report)
}

async fn database_mb(server: &PgServer) -> Result<f64> {
    let client = server.connect(DB).await?;
    let row = client
        .query_one("SELECT pg_database_size(current_database())::float8", &[])
        .await
        .map_err(pg("cannot read the database size"))?;
    Ok(row.get::<_, f64>(0) / 1e6)
}
