//! Running lab processes: the unprivileged identity, private directories and files, free
//! ports, and supervised children that cannot outlive the lab's process.

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::error::{Error, Result};

/// The user lab servers run as when the lab runs as root.
pub const LAB_USER: &str = "pgshift";

/// Who lab processes run as: the current user, or [`LAB_USER`] when running as root.
#[derive(Debug, Clone)]
pub struct Identity {
    uid: u32,
    gid: u32,
    name: String,
    /// True when the children must switch to `uid`/`gid` (we are root).
    switch: bool,
}

impl Identity {
    /// The identity for servers: [`LAB_USER`] as root, else ourselves.
    pub fn for_servers() -> Result<Identity> {
        // SAFETY: geteuid/getegid have no preconditions and cannot fail.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        if euid != 0 {
            return Ok(Identity {
                uid: euid,
                gid: egid,
                name: format!("uid {euid}"),
                switch: false,
            });
        }
        let (uid, gid) = lookup_user(LAB_USER)?.ok_or_else(|| Error::UserNotFound {
            user: LAB_USER.to_string(),
        })?;
        Ok(Identity {
            uid,
            gid,
            name: LAB_USER.to_string(),
            switch: true,
        })
    }

    /// Makes `cmd` run as this identity.
    pub fn apply(&self, cmd: &mut Command) {
        if self.switch {
            cmd.uid(self.uid).gid(self.gid);
        }
    }

    /// Gives `path` to this identity (a no-op unless switching users).
    pub fn own(&self, path: &Path) -> Result<()> {
        if self.switch {
            std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
                .map_err(|e| Error::io(format!("cannot chown {}", path.display()), e))?;
        }
        Ok(())
    }

    /// Creates `parent` if needed and makes sure this identity can reach entries inside it.
    ///
    /// As root, `parent` itself gets `o+x` when the lab user cannot traverse it (a
    /// `tempfile::TempDir` is 0700); its ancestors must already be traversable.
    pub(crate) fn prepare_parent(&self, parent: &Path) -> Result<()> {
        fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("cannot create {}", parent.display()), e))?;
        if !self.switch {
            return Ok(());
        }
        let meta = fs::metadata(parent)
            .map_err(|e| Error::io(format!("cannot stat {}", parent.display()), e))?;
        if !self.can_traverse(&meta) {
            let mut perms = meta.permissions();
            perms.set_mode(perms.mode() | 0o001);
            fs::set_permissions(parent, perms)
                .map_err(|e| Error::io(format!("cannot chmod o+x {}", parent.display()), e))?;
        }
        let absolute = fs::canonicalize(parent)
            .map_err(|e| Error::io(format!("cannot resolve {}", parent.display()), e))?;
        for dir in absolute.ancestors().skip(1) {
            let meta = fs::metadata(dir)
                .map_err(|e| Error::io(format!("cannot stat {}", dir.display()), e))?;
            if !self.can_traverse(&meta) {
                return Err(Error::DirNotAccessible {
                    path: dir.to_path_buf(),
                    user: self.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// Creates a new directory owned by this identity, mode 0700.
    pub(crate) fn create_private_dir(&self, path: &Path) -> Result<()> {
        match fs::create_dir(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(Error::AlreadyExists {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => return Err(Error::io(format!("cannot create {}", path.display()), e)),
        }
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("cannot chmod {}", path.display()), e))?;
        self.own(path)
    }

    /// Writes (or replaces the contents of) a file readable only by this identity (0600).
    pub(crate) fn write_private_file(&self, path: &Path, contents: &str) -> Result<()> {
        write_0600(path, contents)?;
        self.own(path)
    }

    fn can_traverse(&self, meta: &fs::Metadata) -> bool {
        let mode = meta.mode();
        mode & 0o001 != 0
            || (meta.uid() == self.uid && mode & 0o100 != 0)
            || (meta.gid() == self.gid && mode & 0o010 != 0)
    }
}

/// Writes `contents` to `path` with mode 0600 (truncating an existing file in place).
pub(crate) fn write_0600(path: &Path, contents: &str) -> Result<()> {
    let context = || format!("cannot write {}", path.display());
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(context(), e))?;
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(context(), e))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| Error::io(context(), e))
}

fn lookup_user(name: &str) -> Result<Option<(u32, u32)>> {
    let cname = CString::new(name)
        .map_err(|_| Error::InvalidOption(format!("user name {name:?} contains NUL")))?;
    let mut buf_len = 16 * 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; buf_len];
        // SAFETY: an all-zero passwd is a valid out-parameter; getpwnam_r fills it and points
        // its strings into `buf`, which outlives the call; we only read the integer fields.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the given lengths (see above).
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf_len < 1 << 20 {
            buf_len *= 4;
            continue;
        }
        if rc != 0 {
            return Err(Error::io(
                format!("cannot look up user {name}"),
                io::Error::from_raw_os_error(rc),
            ));
        }
        return Ok((!result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid)));
    }
}

/// How many ports a start is tried on before a collision counts as a failure.
const PORT_ATTEMPTS: usize = 3;

/// Starts something (`what`, for the log) on a free port. `free_port` releases the port before
/// the process binds it, so another process may take it first: then `start` runs again on a
/// new port.
pub(crate) async fn on_free_port<T, F, Fut>(what: &str, mut start: F) -> Result<T>
where
    F: FnMut(u16) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let port = free_port()?;
        match start(port).await {
            Err(e) if attempt < PORT_ATTEMPTS && is_port_collision(&e) => {
                tracing::warn!(port, "port taken before {what} bound it; retrying");
            }
            result => return result,
        }
    }
}

/// The process exited because its port was taken (PostgreSQL and PgBouncer log this).
fn is_port_collision(err: &Error) -> bool {
    matches!(err, Error::Exited { log_tail, .. }
        if log_tail.contains("Address already in use") || log_tail.contains("could not bind"))
}

/// A free TCP port on 127.0.0.1 (bound and released; `on_free_port` covers the rare race).
pub(crate) fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| Error::io("cannot find a free port on 127.0.0.1", e))?;
    listener
        .local_addr()
        .map(|addr| addr.port())
        .map_err(|e| Error::io("cannot find a free port on 127.0.0.1", e))
}

/// Removes libpq's `PG*` variables (they would redirect tools) and fixes the message locale.
pub(crate) fn clean_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    cmd.env("LC_ALL", "C");
}

/// The last `lines` lines of a log file (lossy UTF-8), or a note that it cannot be read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// A child process watched by a dedicated thread.
///
/// The child gets `PR_SET_PDEATHSIG`, so the kernel signals it when that thread ends — and the
/// thread only ends after the child has exited or when the whole lab process dies (even by
/// SIGKILL). It also runs in its own process group, so a terminal's Ctrl-C reaches only the
/// lab process, which then shuts its children down in order.
pub(crate) struct Supervised {
    pid: libc::pid_t,
    what: String,
    exit: watch::Receiver<Option<String>>,
}

impl Supervised {
    /// Spawns `cmd`; `death_signal` is what the child receives if this process dies.
    pub(crate) fn spawn(mut cmd: Command, death_signal: libc::c_int, what: &str) -> Result<Self> {
        let parent = std::process::id();
        // SAFETY: the closure only calls async-signal-safe functions (prctl, getppid).
        // std runs it after switching uid/gid, which matters: a credential change clears the
        // death signal.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    death_signal as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() as u32 != parent {
                    // The lab process died between fork and prctl.
                    return Err(io::Error::other("the lab process is gone"));
                }
                Ok(())
            });
        }
        cmd.process_group(0);

        let (pid_tx, pid_rx) = mpsc::channel();
        let (exit_tx, exit_rx) = watch::channel(None);
        let thread_name = format!("lab-{what}");
        std::thread::Builder::new()
            .name(thread_name)
            .stack_size(64 * 1024)
            .spawn(move || match cmd.spawn() {
                Err(e) => {
                    let _ = pid_tx.send(Err(e));
                }
                Ok(mut child) => {
                    let _ = pid_tx.send(Ok(child.id()));
                    let status = match child.wait() {
                        Ok(status) => status.to_string(),
                        Err(e) => format!("wait failed: {e}"),
                    };
                    exit_tx.send_replace(Some(status));
                }
            })
            .map_err(|e| Error::io(format!("cannot start a thread to run {what}"), e))?;
        let pid = pid_rx
            .recv()
            .map_err(|_| {
                Error::io(
                    format!("cannot start {what}"),
                    io::Error::other("spawner thread died"),
                )
            })?
            .map_err(|e| Error::io(format!("cannot start {what}"), e))?;
        let pid = libc::pid_t::try_from(pid).map_err(|_| {
            Error::io(
                format!("cannot start {what}"),
                io::Error::other("pid out of range"),
            )
        })?;
        tracing::debug!(pid, what, "started");
        Ok(Supervised {
            pid,
            what: what.to_string(),
            exit: exit_rx,
        })
    }

    /// The child's pid.
    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    /// How the child exited, if it has.
    pub(crate) fn exit_status(&self) -> Option<String> {
        self.exit.borrow().clone()
    }

    /// Sends `signal` unless the child has already been reaped.
    pub(crate) fn signal(&self, signal: libc::c_int) {
        if self.exit_status().is_none() {
            // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
            unsafe { libc::kill(self.pid, signal) };
        }
    }

    /// Waits up to `timeout` for the child to exit; true if it did.
    pub(crate) async fn wait(&self, timeout: Duration) -> bool {
        let mut exit = self.exit.clone();
        let waited = tokio::time::timeout(timeout, async move {
            // An error means the watching thread is gone, which it only is after the exit.
            let _ = exit.wait_for(Option::is_some).await;
        })
        .await;
        waited.is_ok() || self.exit_status().is_some()
    }

    /// Like [`Supervised::wait`] but blocking the thread (for `Drop`).
    pub(crate) fn wait_blocking(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.exit_status().is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends each signal in turn, waiting its grace period, until the child exits. Returns the
    /// index of the step that ended it (0 = the first signal was enough), `None` if none did.
    pub(crate) async fn shutdown(&self, steps: &[(libc::c_int, Duration)]) -> Option<usize> {
        for (i, (signal, grace)) in steps.iter().enumerate() {
            if self.exit_status().is_some() {
                return Some(i);
            }
            self.signal(*signal);
            if self.wait(*grace).await {
                return Some(i);
            }
            tracing::warn!(what = %self.what, pid = self.pid, signal, "still running after {grace:?}");
        }
        None
    }

    /// Blocking form of [`Supervised::shutdown`].
    pub(crate) fn shutdown_blocking(&self, steps: &[(libc::c_int, Duration)]) -> Option<usize> {
        for (i, (signal, grace)) in steps.iter().enumerate() {
            if self.exit_status().is_some() {
                return Some(i);
            }
            self.signal(*signal);
            if self.wait_blocking(*grace) {
                return Some(i);
            }
            tracing::warn!(what = %self.what, pid = self.pid, signal, "still running after {grace:?}");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn supervised_child_is_stopped_by_signal() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let child = Supervised::spawn(cmd, libc::SIGKILL, "sleep").unwrap();
        assert!(child.exit_status().is_none());
        let step = child
            .shutdown(&[(libc::SIGTERM, Duration::from_secs(5))])
            .await;
        assert_eq!(step, Some(0));
        assert!(child.exit_status().unwrap().contains("signal"));
    }

    #[test]
    fn missing_program_is_an_error() {
        let cmd = Command::new("/nonexistent/program");
        let err = Supervised::spawn(cmd, libc::SIGKILL, "nothing")
            .err()
            .unwrap();
        assert!(err.to_string().contains("cannot start nothing"));
    }

    #[test]
    fn log_tail_keeps_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        fs::write(&path, "a\nb\nc\n").unwrap();
        assert_eq!(log_tail(&path, 2), "b\nc");
        assert!(log_tail(&dir.path().join("none"), 2).starts_with("(cannot read"));
    }
}
