//! pgcopydb, the Debian package (0.10 on bookworm): `clone` with the application stopped, an
//! offline method (see `dump.rs`). It copies the tables bare with `--table-jobs` processes,
//! then builds the indexes with `--index-jobs`, the way issue 14 asks pgshift to.
//!
//! pgcopydb runs pg_dump and pg_restore for the schema; it finds them through `PG_CONFIG`,
//! here the target's (18) `pg_config`.

use std::path::Path;
use std::process::Stdio;

use crate::error::{io, BenchError, Result};
use crate::lab::{client_command, conninfo, Lab, DB};

const PROGRAM: &str = "pgcopydb";

/// Runs `pgcopydb clone` of the lab's database to completion: `jobs` COPY and `jobs` CREATE
/// INDEX processes, its work files in the lab's directory.
pub async fn run_clone(lab: &Lab, pgpass: &Path, jobs: usize) -> Result<()> {
    let jobs = jobs.to_string();
    let mut command = client_command(PROGRAM, pgpass);
    command
        .env("PG_CONFIG", lab.target.bin_dir().join("pg_config"))
        // Its state files, under the run's directory rather than the caller's home.
        .env("XDG_DATA_HOME", lab.dir.path().join("pgcopydb-data"))
        .env("TMPDIR", lab.dir.path())
        .arg("clone")
        .args(["--source", &conninfo(&lab.source, DB)])
        .args(["--target", &conninfo(&lab.target, DB)])
        .arg("--dir")
        .arg(lab.dir.path().join("pgcopydb"))
        .args(["--table-jobs", &jobs, "--index-jobs", &jobs])
        .stdout(Stdio::null());
    let output = command.output().await.map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            BenchError::MissingTool {
                tool: PROGRAM,
                install: "the Debian package pgcopydb; tools/setup.sh installs it",
            }
        } else {
            io(format!("cannot start {PROGRAM}"))(source)
        }
    })?;
    if output.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(10).collect();
        Err(BenchError::Tool {
            tool: PROGRAM.into(),
            status: output.status,
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        })
    }
}
