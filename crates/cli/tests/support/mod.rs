//! The pgshift binary against a lab: a source with the ledger database, a target, a PgBouncer
//! in front of the source, a pgpass file with every password, and the arguments each command
//! needs. Processes are spawned the way a user would run them; their stderr is read line by line
//! until the last process holding it (pgshift, or the fence guard it started) closes it.
#![allow(dead_code)] // each test binary uses its own part of this module

mod refusal;
#[allow(unused_imports)] // the refusal tests use these, the others do not
pub use refusal::*;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use pgshift_lab::ledger::{Ledger, LedgerHandle};

use crate::common::{bouncer_for, ledger_database, pair, Pair};

pub struct CliLab {
    pub pair: Pair,
    pub bouncer: pgshift_lab::PgBouncer,
    pub pgpass: PathBuf,
}

impl CliLab {
    /// Servers of the given majors, the ledger database `app` on the source, PgBouncer.
    pub async fn start(source_major: u32, target_major: u32) -> CliLab {
        let pair = pair(source_major, target_major).await;
        ledger_database(&pair).await;
        let bouncer = bouncer_for(&pair).await;
        let pgpass = pair.dir.path().join("pgpass");
        pgshift_lab::write_pgpass(&pgpass, &[&pair.source, &pair.target]).unwrap();
        let mut entries = std::fs::read_to_string(&pgpass).unwrap();
        entries.push_str(&bouncer.admin_pgpass_entry().line());
        entries.push('\n');
        std::fs::write(&pgpass, entries).unwrap();
        CliLab {
            pair,
            bouncer,
            pgpass,
        }
    }

    /// `command` with the servers, the target's client tools and PgBouncer, then `extra`.
    pub fn args(&self, command: &str, extra: &[&str]) -> Vec<String> {
        let mut args = self.direct_args(command, &[]);
        args.extend([
            "--pgbouncer".to_string(),
            self.bouncer.admin_url(),
            "--pgbouncer-config".to_string(),
            self.bouncer.config_path().display().to_string(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// `command` with the servers and the target's client tools (direct mode), then `extra`.
    pub fn direct_args(&self, command: &str, extra: &[&str]) -> Vec<String> {
        let url = |server: &pgshift_lab::PgServer| {
            format!("postgres://postgres@127.0.0.1:{}/app", server.port())
        };
        let mut args = vec![
            command.to_string(),
            "--source".to_string(),
            url(&self.pair.source),
            "--target".to_string(),
            url(&self.pair.target),
            "--pg-bin-dir".to_string(),
            self.pair.target.bin_dir().display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// The binary with these arguments and the lab's pgpass file (no PGPASSWORD).
    pub fn command(&self, args: &[String]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_pgshift"));
        command
            .args(args)
            .env("PGPASSFILE", &self.pgpass)
            .env_remove("PGPASSWORD");
        command
    }

    /// Runs to the end.
    pub fn output(&self, args: &[String]) -> Output {
        self.command(args).output().expect("pgshift runs")
    }

    /// Starts it; its stderr lines arrive in [`Running::lines`].
    pub fn spawn(&self, args: &[String]) -> Running {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pgshift starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (send, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }
}

/// A pgshift process and what it has said on stderr so far.
pub struct Running {
    pub child: Child,
    lines: Receiver<String>,
    pub seen: Vec<String>,
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits until a stderr line contains `text`; panics with everything said if it never does.
    pub fn wait_for(&mut self, text: &str, within: Duration) {
        let until = Instant::now() + within;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(text);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => panic!(
                    "`{text}` did not appear within {within:?}; pgshift said:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Every further stderr line until whoever holds stderr (pgshift or its fence guard) closes
    /// it, at most `within`.
    pub fn rest(&mut self, within: Duration) -> Vec<String> {
        let until = Instant::now() + within;
        let mut rest = Vec::new();
        while let Ok(line) = self
            .lines
            .recv_timeout(until.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line.clone());
            rest.push(line);
        }
        rest
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill has no memory effects; the pid is our child's.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0, "kill failed");
    }

    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    /// Waits for the exit; returns the exit code and everything said on stderr.
    pub fn finish(mut self, within: Duration) -> (Option<i32>, String) {
        let status = self.child.wait().expect("pgshift ends");
        self.rest(within);
        (status.code(), self.seen.join("\n"))
    }
}

/// The rows a PgBouncer admin console command (`SHOW ...`) returns.
pub async fn console_rows(
    bouncer: &pgshift_lab::PgBouncer,
    command: &str,
) -> Vec<tokio_postgres::SimpleQueryRow> {
    let admin = bouncer.admin_connect().await.unwrap();
    admin
        .simple_query(command)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect()
}

/// Names of the PgBouncer entries that are paused now.
pub async fn paused_entries(bouncer: &pgshift_lab::PgBouncer) -> Vec<String> {
    console_rows(bouncer, "SHOW DATABASES")
        .await
        .iter()
        .filter(|r| r.get("paused") == Some("1"))
        .map(|r| r.get("name").unwrap_or_default().to_string())
        .collect()
}

/// Polls `check` every 10 ms until it holds; panics naming `what` after `within`.
pub async fn until<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + within;
    while !check().await {
        assert!(
            Instant::now() < until,
            "{what} did not happen within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether a target database recorded `step` in pgshift's state table.
pub async fn recorded(server: &pgshift_lab::PgServer, step: &str) -> bool {
    let Ok(client) = server.connect("app").await else {
        return false;
    };
    client
        .query_one(
            "SELECT to_regclass('pgshift_meta.pgshift_state') IS NOT NULL
                    AND EXISTS (SELECT 1 FROM pgshift_meta.pgshift_state WHERE step = $1)",
            &[&step],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(false)
}

/// Stops the load and checks the ledger on `server`: every acknowledged commit exactly once,
/// none failed, the balances add up, no client waited longer than `longest`.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs pgshift to the end, asserts it succeeded, and returns its stdout.
pub fn succeeds(lab: &CliLab, args: &[String]) -> String {
    let output = lab.output(args);
    assert!(
        output.status.success(),
        "{args:?} failed:\n{}",
        stderr(&output)
    );
    stdout(&output)
}

/// Direct mode: every acknowledged commit on `server` exactly once, and no more failed or
/// in-doubt transactions than the sessions the fences ended.
pub async fn nothing_lost_but_ended(
    load: LedgerHandle,
    server: &pgshift_lab::PgServer,
    ended: i64,
) {
    let report = load.stop().await;
    let verification = Ledger::verify(&server.connect("app").await.unwrap(), &report)
        .await
        .unwrap();
    assert_eq!(verification.lost, 0, "{verification:?}");
    assert_eq!(verification.duplicated + verification.unexpected, 0);
    assert!(verification.invariant_holds);
    assert!(
        (report.failed + report.in_doubt) as i64 <= ended,
        "{} failed and {} in doubt, {ended} sessions ended: {:?}",
        report.failed,
        report.in_doubt,
        report.errors
    );
}

pub async fn nothing_lost(load: LedgerHandle, server: &pgshift_lab::PgServer, longest: Duration) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = load.stop().await;
    let verification = Ledger::verify(&server.connect("app").await.unwrap(), &report)
        .await
        .unwrap();
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert_eq!(verification.lost, 0, "{verification:?}");
    assert_eq!(
        verification.duplicated + verification.unexpected,
        0,
        "{verification:?}"
    );
    assert!(verification.invariant_holds, "{verification:?}");
    assert!(
        report.max_ms < longest.as_secs_f64() * 1e3,
        "a client waited {} ms (allowed {longest:?})",
        report.max_ms
    );
}
