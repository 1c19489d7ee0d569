//! The worker's side: starts the guard, arms it, tells it when clients are released.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use super::wire::{Config, FromGuard, ToGuard};
use super::SUBCOMMAND;
use crate::error::{Error, Result};
use crate::plan::Traffic;
use crate::upgrade::Upgrade;

/// How long the guard may take to connect to everything before the worker gives up on this
/// attempt (nobody is paused yet).
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A running guard. Dropping it without [`GuardHandle::release`] closes its pipe, which an
/// armed guard takes as the worker having gone: it then releases the clients itself.
pub(crate) struct GuardHandle {
    child: Child,
    stdin: ChildStdin,
    source_pids: Vec<i32>,
    target_pids: Vec<i32>,
}

impl GuardHandle {
    /// Starts `program`'s guard for this upgrade and waits until it is ready. None for traffic
    /// the guard cannot move (a caller's router: the operator relies on its leader election).
    pub async fn start(program: &Path, up: &Upgrade) -> Result<Option<GuardHandle>> {
        let pgbouncer = match &up.plan.traffic {
            Traffic::Pgbouncer(fleet) => fleet.iter().map(Into::into).collect(),
            Traffic::Direct => Vec::new(),
            Traffic::Routed(_) => return Ok(None),
        };
        let config = Config {
            worker_pid: std::process::id(),
            max_pause_ms: up.plan.max_pause.as_millis() as u64,
            source: (&up.plan.source).into(),
            target: (&up.plan.target).into(),
            databases: up.databases.clone(),
            pgbouncer,
            worker_source_pids: up.own_source_pids.clone(),
            worker_target_pids: up.own_target_pids.clone(),
        };
        let mut command = Command::new(program);
        command
            .arg(SUBCOMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: setsid is async-signal-safe and touches only the child being set up.
        unsafe {
            // Its own session: a Ctrl-C or hang-up that ends the worker does not reach it.
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let failed = |what: String| Error::Guard(format!("{what}; nobody was paused"));
        let mut child = command
            .spawn()
            .map_err(|e| failed(format!("cannot start {}: {e}", program.display())))?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut line = serde_json::to_string(&config).expect("the guard's config serializes");
        line.push('\n');
        stdin
            .write_all(line.as_bytes())
            .await
            .map_err(|e| failed(format!("cannot hand the plan to the fence guard: {e}")))?;
        let mut replies = BufReader::new(stdout).lines();
        let reply = tokio::time::timeout(READY_TIMEOUT, replies.next_line())
            .await
            .map_err(|_| {
                failed(format!(
                    "the fence guard was not ready within {READY_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| failed(format!("reading from the fence guard: {e}")))?;
        let (source_pids, target_pids) = match reply.map(|l| serde_json::from_str::<FromGuard>(&l))
        {
            Some(Ok(FromGuard::Ready {
                source_pids,
                target_pids,
            })) => (source_pids, target_pids),
            Some(Ok(FromGuard::Failed { message })) => {
                return Err(failed(format!(
                    "the fence guard could not start: {message}"
                )))
            }
            Some(Err(e)) => {
                return Err(failed(format!(
                    "the fence guard said something unexpected: {e}"
                )))
            }
            None => return Err(failed("the fence guard ended before it was ready".into())),
        };
        Ok(Some(GuardHandle {
            child,
            stdin,
            source_pids,
            target_pids,
        }))
    }

    /// The guard's sessions on the source and the target, which direct mode's fence (of a
    /// cutover or a rollback) must not end.
    pub fn source_pids(&self) -> &[i32] {
        &self.source_pids
    }
    pub fn target_pids(&self) -> &[i32] {
        &self.target_pids
    }

    /// From now on the guard releases the clients if this process goes.
    pub async fn arm(&mut self) -> Result<()> {
        self.say(ToGuard::Armed).await
    }

    /// Clients are released: the guard ends.
    pub async fn release(mut self) -> Result<()> {
        self.say(ToGuard::Released).await?;
        drop(self.stdin);
        // It ends at once; never wait on it for long.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await;
        Ok(())
    }

    async fn say(&mut self, message: ToGuard) -> Result<()> {
        let mut line = serde_json::to_string(&message).expect("messages serialize");
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .map_err(|e| Error::Guard(format!("the fence guard is gone ({e})")))
    }
}
