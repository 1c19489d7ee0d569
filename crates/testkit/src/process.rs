//! Child processes that cannot outlive the test process, and the unprivileged user that
//! PostgreSQL and PgBouncer run as.
//!
//! Every child runs in its own process group (so its own children — postgres backends, initdb's
//! bootstrap server — are stopped with it) and gets `PR_SET_PDEATHSIG(SIGKILL)`. The kernel sends
//! that signal when the *thread* that forked the child ends, so each child is forked by a thread
//! of its own that lives until the child has been reaped: the signal then fires exactly when the
//! test process dies, even by SIGKILL. The thread waits for the exit without reaping
//! (`waitid(WNOWAIT)`), so the child's pid — and with it its process group id — stays reserved
//! until the group has been killed: a group kill can never hit a recycled pid.

use std::fmt;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
}

impl Exit {
    /// The exit code as a container runtime reports it: 128 + signal for a signal.
    pub(crate) fn code(self) -> i32 {
        match self {
            Exit::Code(code) => code,
            Exit::Signal(signal) => 128 + signal,
        }
    }

    pub(crate) fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(code) => write!(f, "exit code {code}"),
            Exit::Signal(signal) => write!(f, "killed by signal {signal}"),
        }
    }
}

/// A running (or exited, not yet released) child process.
pub(crate) struct Process {
    pid: libc::pid_t,
    name: String,
    exit: watch::Receiver<Option<Exit>>,
    /// Dropping it lets the watching thread kill the group and reap the child.
    _release: mpsc::Sender<()>,
}

impl fmt::Debug for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Process")
            .field("pid", &self.pid)
            .field("name", &self.name)
            .field("exit", &*self.exit.borrow())
            .finish()
    }
}

impl Process {
    /// Spawns `cmd` in a new process group; `name` is for logs and errors.
    pub(crate) fn spawn(mut cmd: Command, name: &str) -> io::Result<Process> {
        let parent = std::process::id();
        // SAFETY: the closure only calls async-signal-safe functions (prctl, getppid). std runs
        // it after switching uid/gid, which matters: a credential change clears the signal.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() as u32 != parent {
                    return Err(io::Error::other("the test process is gone"));
                }
                Ok(())
            });
        }
        cmd.process_group(0);

        let (pid_tx, pid_rx) = mpsc::channel();
        let (exit_tx, exit_rx) = watch::channel(None);
        let (release_tx, release_rx) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name(format!("proc-{name}"))
            .stack_size(64 * 1024)
            .spawn(move || {
                let mut child = match cmd.spawn() {
                    Ok(child) => child,
                    Err(e) => {
                        let _ = pid_tx.send(Err(e));
                        return;
                    }
                };
                let pid = child.id() as libc::pid_t;
                let _ = pid_tx.send(Ok(pid));
                exit_tx.send_replace(Some(wait_no_reap(pid)));
                // Blocks until the Process is dropped (the sender goes away).
                let _ = release_rx.recv();
                // SAFETY: kill has no memory-safety preconditions; the unreaped zombie keeps
                // the pid, and so the group id, ours.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                let _ = child.wait();
            })?;
        let pid = pid_rx
            .recv()
            .map_err(|_| io::Error::other("the thread starting the process died"))??;
        tracing::debug!(pid, name, "started");
        Ok(Process {
            pid,
            name: name.to_string(),
            exit: exit_rx,
            _release: release_tx,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid as u32
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// How it ended, if it has.
    pub(crate) fn exit(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Waits for the process to end.
    pub(crate) async fn wait(&self) -> Exit {
        let mut exit = self.exit.clone();
        let waited = exit.wait_for(Option::is_some).await.map(|exit| *exit);
        // The watching thread only goes away after publishing the exit.
        waited
            .ok()
            .flatten()
            .or_else(|| self.exit())
            .unwrap_or(Exit::Signal(libc::SIGKILL))
    }

    /// Sends `signal` to the process itself (not its group).
    pub(crate) fn signal(&self, signal: libc::c_int) {
        if self.exit().is_none() {
            // SAFETY: see `spawn`: the pid is ours until released.
            unsafe { libc::kill(self.pid, signal) };
        }
    }

    /// SIGKILL to the whole process group, which also ends what the process forked.
    pub(crate) fn kill_group(&self) {
        // SAFETY: see `spawn`: the pid, and so the group id, is ours until released.
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
    }

    /// Sends `signal`, waits up to `grace` for the exit, then kills the group.
    pub(crate) async fn stop(&self, signal: libc::c_int, grace: Duration) -> Exit {
        self.signal(signal);
        if let Ok(exit) = tokio::time::timeout(grace, self.wait()).await {
            self.kill_group();
            return exit;
        }
        tracing::warn!(name = %self.name, pid = self.pid, ?grace, "did not stop in time, killing");
        self.kill_group();
        self.wait().await
    }

    /// Like [`Process::stop`], blocking the thread (for `Drop`).
    pub(crate) fn stop_blocking(&self, signal: libc::c_int, grace: Duration) {
        self.signal(signal);
        if !self.wait_blocking(grace) {
            tracing::warn!(name = %self.name, pid = self.pid, ?grace, "did not stop in time, killing");
        }
        self.kill_group();
        self.wait_blocking(Duration::from_secs(5));
    }

    fn wait_blocking(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.exit().is_none() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.exit().is_none() {
            tracing::debug!(name = %self.name, pid = self.pid, "killing on drop");
        }
        self.kill_group();
    }
}

/// Blocks until `pid` exits, leaving it a zombie.
fn wait_no_reap(pid: libc::pid_t) -> Exit {
    loop {
        // SAFETY: an all-zero siginfo_t is a valid out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is valid for writes; the pid is our child.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            // SAFETY: waitid succeeded for an exited child, so si_status is set.
            let status = unsafe { info.si_status() };
            return if info.si_code == libc::CLD_EXITED {
                Exit::Code(status)
            } else {
                Exit::Signal(status)
            };
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Exit::Signal(libc::SIGKILL);
        }
    }
}

/// The user PostgreSQL and PgBouncer run as when the tests run as root (they refuse root).
pub const POD_USER: &str = pgshift_lab::LAB_USER;
