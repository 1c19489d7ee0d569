//! The offline ways: stop the application, copy the database into the new server with
//! `pg_dump | pg_restore` (or the directory format with parallel jobs, or `pgcopydb clone`),
//! start the application on the new server.

use std::process::Stdio;
use std::time::Instant;

use pgshift_lab::ledger::{Ledger, LedgerReport, LedgerTarget};

use crate::error::{io, BenchError, Result};
use crate::figures::{gap_across, MethodFigures, StoppedRun};
use crate::lab::{
    conninfo, run_tool, settle, stop_load, Lab, Workload, APP_PASSWORD, APP_USER, DB,
};
use crate::pgcopydb;

/// How the database travels while the application is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offline {
    /// `pg_dump -Fc | pg_restore`, one stream.
    DumpPiped,
    /// `pg_dump -Fd -j N` to a directory, then `pg_restore -j N`.
    DumpParallel { jobs: usize },
    /// `pgcopydb clone` with N table jobs and N index jobs.
    PgcopydbClone { jobs: usize },
}

impl Offline {
    pub fn name(self) -> &'static str {
        match self {
            Offline::DumpPiped => "dump-restore",
            Offline::DumpParallel { .. } => "dump-restore-parallel",
            Offline::PgcopydbClone { .. } => "pgcopydb-clone",
        }
    }
}

pub async fn run(work: &Workload, method: Offline) -> Result<MethodFigures> {
    let name = method.name();
    let lab = Lab::fresh(work).await?;
    let pgpass = lab.pgpass()?;
    // The roles come first, as `pg_dumpall --roles-only` would bring them.
    lab.target.create_login_role(APP_USER, APP_PASSWORD).await?;

    let before = work.start_load(LedgerTarget::server(&lab.source, DB));
    settle(work).await;
    tracing::info!(method = name, "stopping the application");
    let started = Instant::now();
    let (before_started, before_report) = stop_load(before).await;

    lab.target.create_database(DB).await?;
    let source = conninfo(&lab.source, DB);
    let target = conninfo(&lab.target, DB);
    match method {
        Offline::DumpPiped => {
            let mut dump = lab.tool("pg_dump", &pgpass);
            dump.args(["-Fc", "-d", &source]).stdout(Stdio::piped());
            let mut dump = dump.spawn().map_err(io("cannot start pg_dump"))?;
            let stream: Stdio = dump
                .stdout
                .take()
                .ok_or_else(|| BenchError::Io {
                    context: "pg_dump's output".into(),
                    source: std::io::Error::other("not piped"),
                })?
                .try_into()
                .map_err(io("cannot pass pg_dump's output to pg_restore"))?;
            let mut restore = lab.tool("pg_restore", &pgpass);
            restore
                .args(["--exit-on-error", "-d", &target])
                .stdin(stream);
            let (dumped, restored) = tokio::join!(dump.wait_with_output(), run_tool(restore));
            let dumped = dumped.map_err(io("cannot wait for pg_dump"))?;
            restored?;
            if !dumped.status.success() {
                return Err(BenchError::Tool {
                    tool: lab.target.bin_dir().join("pg_dump"),
                    status: dumped.status,
                    stderr: String::from_utf8_lossy(&dumped.stderr).trim().to_string(),
                });
            }
        }
        Offline::DumpParallel { jobs } => {
            let dir = lab.dir.path().join("dump");
            let dir = dir.to_string_lossy();
            let jobs = jobs.to_string();
            let mut dump = lab.tool("pg_dump", &pgpass);
            dump.args(["-Fd", "-j", &jobs, "-f", &dir, "-d", &source]);
            run_tool(dump).await?;
            let mut restore = lab.tool("pg_restore", &pgpass);
            restore.args(["--exit-on-error", "-j", &jobs, "-d", &target, &dir]);
            run_tool(restore).await?;
        }
        Offline::PgcopydbClone { jobs } => {
            pgcopydb::run_clone(&lab, &pgpass, jobs).await?;
        }
    }
    let copied = Instant::now();
    tracing::info!(
        method = name,
        seconds = copied.duration_since(started).as_secs_f64(),
        "copied; starting the application on the new server"
    );
    let before = StoppedRun {
        started: before_started,
        report: &before_report,
    };
    restart_on_target(work, lab, name, (started, copied), &before).await
}

/// The second half: starts the application on the new server (the copy, from `started` to
/// `copied`, is done), lets it run, and verifies both runs there. The upgrade's end is now.
async fn restart_on_target(
    work: &Workload,
    lab: Lab,
    name: &'static str,
    (started, copied): (Instant, Instant),
    before_run: &StoppedRun<'_>,
) -> Result<MethodFigures> {
    let total_s = started.elapsed().as_secs_f64();
    let after = work.start_load(LedgerTarget::server(&lab.target, DB));
    settle(work).await;
    let (after_started, after_report) = stop_load(after).await;

    let client = lab.target.connect(DB).await?;
    let before_report: &LedgerReport = before_run.report;
    let verified_before = Ledger::verify(&client, before_report).await?;
    let verified_after = Ledger::verify(&client, &after_report).await?;
    let after_run = StoppedRun {
        started: after_started,
        report: &after_report,
    };
    let unavailable = gap_across(before_run, &after_run);
    let attempts = before_run
        .attempts(started)
        .chain(after_run.attempts(started))
        .collect();
    let first_write_ms = after_run
        .first_commit_after(started)
        .map(|at| at.duration_since(started).as_secs_f64() * 1e3);
    let size_mb = lab.size_mb;
    lab.stop().await?;
    Ok(MethodFigures {
        name,
        size_mb,
        write_unavailable_ms: unavailable,
        pause_ms: unavailable,
        failed: before_report.failed + after_report.failed,
        in_doubt: before_report.in_doubt + after_report.in_doubt,
        lost: verified_before.lost + verified_after.lost,
        invariant_holds: verified_after.invariant_holds && verified_after.balances_match_entries,
        committed: before_report.committed + after_report.committed,
        tps: (before_report.committed + after_report.committed) as f64
            / (before_report.duration + after_report.duration).as_secs_f64(),
        total_ms: total_s * 1e3,
        // Offline, the new server holds everything once the copy is done.
        time_to_ready_ms: copied.duration_since(started).as_secs_f64() * 1e3,
        first_write_ms,
        longest_in_cutover_ms: None,
        copy_mb_per_s: Some(size_mb / copied.duration_since(started).as_secs_f64()),
        attempts,
        not_run: None,
    })
}
