//! `pg_upgrade --link` in place: stop the old server, upgrade its data directory into a new
//! cluster (hard links), start the new server on the same port; clients reconnect.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use pgshift_lab::ledger::{Ledger, LedgerTarget};
use pgshift_lab::Binaries;
use tokio::process::{Child, Command};

use crate::error::{io, pg, BenchError, Result};
use crate::figures::{MethodFigures, StoppedRun, Timing};
use crate::lab::{run_tool, settle, stop_load, Lab, Workload, DB, SOURCE_MAJOR, TARGET_MAJOR};

/// How long the upgraded server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Who runs the servers (the owner of their data directories).
#[derive(Debug, Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
}

impl Owner {
    /// A command run as the owner, in `dir`, without the caller's libpq environment.
    fn command(self, program: PathBuf, dir: &Path) -> Command {
        let mut command = Command::new(program);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                command.env_remove(key);
            }
        }
        command
            .env("LC_ALL", "C")
            .current_dir(dir)
            .uid(self.uid)
            .gid(self.gid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }
}

pub async fn run(work: &Workload) -> Result<MethodFigures> {
    let name = "pg_upgrade-link";
    let binaries = Binaries::locate()?;
    let (old_bin, new_bin) = (
        binaries.bin_dir(SOURCE_MAJOR)?,
        binaries.bin_dir(TARGET_MAJOR)?,
    );
    let lab = Lab::fresh(work).await?;
    let Lab {
        source,
        target,
        size_mb,
        dir,
    } = lab;
    // pg_upgrade wants a new cluster of its own making: the lab's has data checksums on (18's
    // default) where the 15 source has them off.
    target.stop().await?;
    let old_data = source.data_dir().to_path_buf();
    let meta =
        std::fs::metadata(&old_data).map_err(io("cannot read the source's data directory"))?;
    let owner = Owner {
        uid: meta.uid(),
        gid: meta.gid(),
    };
    let work_dir = dir.path().join("upgraded");
    std::fs::create_dir(&work_dir).map_err(io("cannot create the new cluster's directory"))?;
    std::os::unix::fs::chown(&work_dir, Some(owner.uid), Some(owner.gid)).map_err(io(
        "cannot hand the new cluster's directory to the server user",
    ))?;
    let new_data = work_dir.join("data");
    let mut initdb = owner.command(new_bin.join("initdb"), &work_dir);
    initdb
        .arg("-D")
        .arg(&new_data)
        .args([
            "-U",
            source.superuser(),
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
        ])
        .args([
            "--encoding=UTF8",
            "--locale=C",
            "--no-data-checksums",
            "--no-sync",
        ]);
    run_tool(initdb).await?;

    let config = source.config(DB);
    let port = source.port();
    let load = work.start_load(LedgerTarget::server(&source, DB));
    settle(work).await;

    tracing::info!(method = name, "stopping the old server");
    let started = Instant::now();
    source.stop().await?;
    let mut upgrade = owner.command(new_bin.join("pg_upgrade"), &work_dir);
    upgrade
        .arg("-b")
        .arg(&old_bin)
        .arg("-B")
        .arg(&new_bin)
        .arg("-d")
        .arg(&old_data)
        .arg("-D")
        .arg(&new_data)
        .arg("--link")
        .args(["-U", config.get_user().unwrap_or("postgres")])
        .arg(format!("--socketdir={}", work_dir.display()))
        .arg(format!("--old-port={}", free_port()?))
        .arg(format!("--new-port={}", free_port()?));
    let upgraded = run_tool(upgrade).await;
    if let Err(e) = upgraded {
        load.stop().await;
        return Err(with_upgrade_log(e, &new_data));
    }
    let log = std::fs::File::create(work_dir.join("postmaster.log"))
        .map_err(io("cannot create the new server's log"))?;
    let log_err = log
        .try_clone()
        .map_err(io("cannot open the new server's log"))?;
    let mut postgres = owner.command(new_bin.join("postgres"), &work_dir);
    postgres
        .arg("-D")
        .arg(&new_data)
        .args([
            "-c",
            &format!("port={port}"),
            "-c",
            "listen_addresses=127.0.0.1",
        ])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", work_dir.display()))
        .stdout(log)
        .stderr(log_err);
    let mut server = postgres
        .spawn()
        .map_err(io("cannot start the upgraded server"))?;
    let client = wait_ready(&config, &mut server).await?;
    let ended = Instant::now();
    tracing::info!(method = name, "the upgraded server accepts connections");
    settle(work).await;
    let (load_started, report) = stop_load(load).await;
    let verified = Ledger::verify(&client, &report).await?;
    drop(client);

    let mut stop = owner.command(new_bin.join("pg_ctl"), &work_dir);
    stop.arg("stop")
        .arg("-D")
        .arg(&new_data)
        .args(["-m", "fast", "-w"]);
    run_tool(stop).await?;
    server
        .wait()
        .await
        .map_err(io("cannot wait for the upgraded server"))?;
    let run = StoppedRun {
        started: load_started,
        report: &report,
    };
    let timing = Timing {
        started,
        // In place: the new server holds everything once it accepts connections.
        ready: ended,
        ended,
        new_server_from: ended,
    };
    let mut figures = MethodFigures::one_run(name, size_mb, &run, &verified, timing, None);
    // Clients keep trying while the server is down; none can commit, so their longest wait is
    // the gap itself.
    figures.pause_ms = figures.pause_ms.max(figures.write_unavailable_ms);
    Ok(figures)
}

/// A TCP port nobody listens on now, for pg_upgrade's own temporary servers.
fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(io("cannot find a free port"))?;
    let port = listener
        .local_addr()
        .map_err(io("cannot find a free port"))?
        .port();
    Ok(port)
}

/// Connects to the upgraded server, waiting until it accepts connections.
async fn wait_ready(
    config: &tokio_postgres::Config,
    server: &mut Child,
) -> Result<tokio_postgres::Client> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match config.connect(tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "connection to the upgraded server closed");
                    }
                });
                return Ok(client);
            }
            Err(e) => {
                if let Some(status) = server
                    .try_wait()
                    .map_err(io("cannot watch the upgraded server"))?
                {
                    return Err(BenchError::UpgradedServerExited(status));
                }
                if Instant::now() > deadline {
                    return Err(pg("the upgraded server does not accept connections")(e));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// pg_upgrade explains its failures in a log under the new data directory; bring the gist.
fn with_upgrade_log(error: BenchError, new_data: &Path) -> BenchError {
    let BenchError::Tool {
        tool,
        status,
        stderr,
    } = error
    else {
        return error;
    };
    let mut detail = stderr;
    let output = new_data.join("pg_upgrade_output.d");
    if let Ok(entries) = std::fs::read_dir(&output) {
        for entry in entries.flatten() {
            let log = entry.path().join("log").join("pg_upgrade_server.log");
            if let Ok(text) = std::fs::read_to_string(&log) {
                let tail: Vec<&str> = text.lines().rev().take(10).collect();
                detail.push_str(&format!("\n{}:\n", log.display()));
                for line in tail.into_iter().rev() {
                    detail.push_str(line);
                    detail.push('\n');
                }
            }
        }
    }
    BenchError::Tool {
        tool,
        status,
        stderr: detail,
    }
}
