//! How one container of an image runs here: its program, environment, files and user.
//!
//! `postgres:<major>` follows the official image's entrypoint: with `POSTGRES_PASSWORD`,
//! `POSTGRES_USER`, `POSTGRES_DB`, `POSTGRES_INITDB_ARGS`, `POSTGRES_HOST_AUTH_METHOD` and
//! `PGDATA` it initialises an empty data directory, then runs `postgres` with the container's
//! arguments; any other command runs that PostgreSQL tool (`psql`, `pg_isready`, a shell, ...).
//! PgBouncer images run Debian's pgbouncer with the `pgbouncer.ini` the pod mounts.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::{Api, ResourceExt};

use super::image::{postgres_path, postgres_tool, Image, NEWEST_MAJOR};
use super::volumes::{field_value, Mounts};
use super::Ctx;
use crate::process::Process;

/// Where the API server's defaulting puts a container's termination log.
const DEFAULT_TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
/// A real kubelet's limits: the termination log's last 4 KiB; else, with
/// `FallbackToLogsOnError`, the log's last 80 lines, at most their last 2 KiB.
const MAX_MESSAGE_BYTES: u64 = 4096;
const MAX_LOG_LINES: usize = 80;
const MAX_LOG_BYTES: u64 = 2048;

/// Why a container could not be started.
#[derive(Debug)]
pub(crate) enum StartError {
    /// The image cannot be run at all (reported like an image pull error).
    Image(String),
    /// The container's configuration is wrong or incomplete (references missing objects).
    Config(String),
    /// The program failed before it could run (reported as a terminated container).
    Failed { exit_code: i32, message: String },
}

/// Everything needed to start processes of one container.
pub(crate) struct Launcher {
    ctx: Arc<Ctx>,
    image: Image,
    container: Container,
    env: Vec<(String, String)>,
    mounts: Mounts,
    ip: Ipv4Addr,
    /// Short private directory: unix sockets, generated configuration.
    run_dir: PathBuf,
    home: PathBuf,
    log: PathBuf,
    /// The termination log file here (mounted at `terminationMessagePath`).
    termination_log: PathBuf,
    name: String,
}

impl Launcher {
    /// Resolves the container's image, environment and mounts and creates its directories.
    pub(crate) async fn new(
        ctx: Arc<Ctx>,
        pod: &Pod,
        container: &Container,
        volumes: &HashMap<String, PathBuf>,
        dirs: (&Path, &Path),
        ip: Ipv4Addr,
    ) -> Result<Launcher, StartError> {
        let image = Image::parse(container.image.as_deref().unwrap_or_default())
            .map_err(StartError::Image)?;
        if let (Image::Postgres { .. }, Err(e)) = (&image, &ctx.binaries) {
            return Err(StartError::Image(format!("no PostgreSQL binaries: {e}")));
        }
        let (pod_dir, log_dir) = dirs;
        let base = pod_dir.join(&container.name);
        let run_dir = base.join("run");
        let home = base.join("home");
        for dir in [&base, &run_dir, &home] {
            fs::create_dir_all(dir)
                .map_err(|e| StartError::Config(format!("cannot create {}: {e}", dir.display())))?;
            ctx.run_as
                .own(dir)
                .map_err(|e| StartError::Config(e.to_string()))?;
        }
        let mut mounts =
            Mounts::new(container, volumes, base.join("rootfs")).map_err(StartError::Config)?;
        let termination_log = mounts.mount_file(
            container
                .termination_message_path
                .as_deref()
                .filter(|path| !path.is_empty())
                .unwrap_or(DEFAULT_TERMINATION_MESSAGE_PATH),
        );
        let env = resolve_env(&ctx, pod, container, ip)
            .await
            .map_err(StartError::Config)?;
        Ok(Launcher {
            image,
            container: container.clone(),
            env,
            mounts,
            ip,
            run_dir,
            home,
            log: log_dir.join(format!("{}.log", container.name)),
            termination_log,
            name: format!("{}/{}", pod.name_any(), container.name),
            ctx,
        })
    }

    /// The signal that asks the container to stop: the image's STOPSIGNAL (SIGINT, a fast
    /// shutdown, for the official postgres image).
    pub(crate) fn stop_signal(&self) -> libc::c_int {
        match self.image {
            Image::Postgres { .. } => libc::SIGINT,
            Image::PgBouncer => libc::SIGTERM,
        }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn expand_all(&self, list: &Option<Vec<String>>) -> Vec<String> {
        list.iter()
            .flatten()
            .map(|s| expand(s, &self.env))
            .collect()
    }

    /// Where the next run's output starts in the container's log (one log for all runs).
    pub(crate) fn log_position(&self) -> u64 {
        fs::metadata(&self.log).map_or(0, |m| m.len())
    }

    /// The termination message of a run that ended with `exit_code` and whose output starts at
    /// `log_from` in the container's log.
    pub(crate) fn termination_message(&self, exit_code: i32, log_from: u64) -> String {
        let fallback = exit_code != 0
            && self.container.termination_message_policy.as_deref()
                == Some("FallbackToLogsOnError");
        termination_message(
            &self.termination_log,
            fallback.then_some((self.log.as_path(), log_from)),
        )
    }

    /// A new, empty termination log for a run, which the pod's user can write (a real kubelet
    /// mounts a new file for every run: a message never outlives its run).
    fn reset_termination_log(&self) -> Result<(), StartError> {
        let path = &self.termination_log;
        let failed = |e: std::io::Error| {
            StartError::Config(format!(
                "cannot create the termination log {}: {e}",
                path.display()
            ))
        };
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(failed)?;
        }
        fs::write(path, b"").map_err(failed)?;
        self.ctx
            .run_as
            .own(path)
            .map_err(|e| StartError::Config(e.to_string()))
    }

    /// Starts the container's main process (after the image's initialisation, if any).
    pub(crate) async fn start(&self) -> Result<Arc<Process>, StartError> {
        self.reset_termination_log()?;
        let command = self.expand_all(&self.container.command);
        let args = self.expand_all(&self.container.args);
        match self.image {
            Image::Postgres { major } => {
                let base = |s: &String| s.rsplit('/').next().unwrap_or(s).to_string();
                // The official image's ENTRYPOINT is docker-entrypoint.sh with CMD ["postgres"].
                let mut argv = match command.first().map(base).as_deref() {
                    None => args,
                    Some("docker-entrypoint.sh") => {
                        command[1..].iter().chain(&args).cloned().collect()
                    }
                    Some(_) => command.into_iter().chain(args).collect(),
                };
                if argv.is_empty() || argv[0].starts_with('-') {
                    argv.insert(0, "postgres".into());
                }
                if base(&argv[0]) == "postgres" {
                    self.start_postgres(major, &argv[1..]).await
                } else {
                    self.spawn_exec(&argv, "main")
                        .map_err(|message| StartError::Failed {
                            exit_code: 128,
                            message,
                        })
                }
            }
            Image::PgBouncer => {
                let argv: Vec<String> = command.into_iter().chain(args).collect();
                self.start_pgbouncer(&argv)
            }
        }
    }

    /// Runs `argv` inside this container's image (an exec probe, a Job's command).
    pub(crate) fn spawn_exec(
        &self,
        argv: &[String],
        purpose: &str,
    ) -> Result<Arc<Process>, String> {
        let program = argv
            .first()
            .ok_or_else(|| "exec: empty command".to_string())?;
        let binaries = self.ctx.binaries.as_ref().ok();
        let name = Path::new(program)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let major = match self.image {
            Image::Postgres { major } => major,
            Image::PgBouncer => NEWEST_MAJOR,
        };
        let resolved = match name.as_str() {
            "sh" | "bash" => Some(PathBuf::from("/bin").join(&name)),
            "pgbouncer" if self.image == Image::PgBouncer => {
                binaries.and_then(|b| b.pgbouncer().ok())
            }
            _ => binaries.and_then(|b| postgres_tool(b, major, program)),
        };
        let path = resolved.ok_or_else(|| {
            format!(
                "exec: {program:?}: executable file not found in $PATH (image {:?})",
                self.container.image.as_deref().unwrap_or_default()
            )
        })?;
        let mut cmd = self.command(&path);
        let script = matches!(name.as_str(), "sh" | "bash")
            .then(|| script_index(&argv[1..]))
            .flatten();
        cmd.args(argv[1..].iter().enumerate().map(|(i, arg)| {
            if Some(i) == script {
                self.mounts.translate_script(arg)
            } else {
                self.mounts.translate_arg(arg)
            }
        }));
        self.spawn(cmd, purpose, libc::SIGTERM)
    }

    /// A command for `program` with the container's environment, user and log.
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear();
        let path = match (&self.image, self.ctx.binaries.as_ref()) {
            (Image::Postgres { major }, Ok(b)) => postgres_path(b, *major),
            (_, Ok(b)) => postgres_path(b, NEWEST_MAJOR),
            _ => "/usr/local/bin:/usr/bin:/bin".to_string(),
        };
        cmd.env("PATH", path)
            .env("HOME", &self.home)
            .env("HOSTNAME", self.name.split('/').next().unwrap_or_default());
        if let Image::Postgres { .. } = self.image {
            // Inside the image, clients reach the server over its default unix socket.
            cmd.env("PGHOST", &self.run_dir);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let cwd = self
            .container
            .working_dir
            .as_deref()
            .map(|dir| self.mounts.host_path(dir))
            .filter(|dir| dir.is_dir())
            .unwrap_or_else(|| self.home.clone());
        cmd.current_dir(cwd).stdin(Stdio::null());
        self.ctx.run_as.apply(&mut cmd);
        cmd
    }

    fn spawn(
        &self,
        mut cmd: Command,
        purpose: &str,
        stop_signal: libc::c_int,
    ) -> Result<Arc<Process>, String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        cmd.stdout(log).stderr(err);
        let name = format!("{}:{purpose}", self.name);
        tracing::debug!(process = %name, command = ?cmd, "starting");
        let program = cmd.get_program().to_owned();
        self.ctx
            .processes
            .spawn(cmd, &name, stop_signal)
            .map_err(|e| format!("cannot start {program:?}: {e}"))
    }

    /// Appends a line to the container's log, as the entrypoint would print it.
    fn log_line(&self, line: &str) {
        if let Ok(mut file) = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
        {
            use std::io::Write;
            let _ = writeln!(file, "{line}");
        }
    }

    fn failed(&self, message: String) -> StartError {
        self.log_line(&message);
        StartError::Failed {
            exit_code: 1,
            message,
        }
    }

    /// Waits for a helper process (initdb, single-user postgres) to succeed.
    async fn run_helper(&self, cmd: Command, what: &str) -> Result<(), StartError> {
        let process =
            self.spawn(cmd, what, libc::SIGTERM)
                .map_err(|message| StartError::Failed {
                    exit_code: 128,
                    message,
                })?;
        let exit = process.wait().await;
        if exit.success() {
            Ok(())
        } else {
            Err(self.failed(format!("{what} failed ({exit}); see the container's log")))
        }
    }

    async fn start_postgres(
        &self,
        major: u32,
        args: &[String],
    ) -> Result<Arc<Process>, StartError> {
        let binaries = self
            .ctx
            .binaries
            .as_ref()
            .map_err(|e| StartError::Image(e.clone()))?;
        let bin = binaries
            .bin_dir(major)
            .map_err(|e| StartError::Image(e.to_string()))?;
        let user = self
            .var("POSTGRES_USER")
            .filter(|v| !v.is_empty())
            .unwrap_or("postgres")
            .to_string();
        let db = self
            .var("POSTGRES_DB")
            .filter(|v| !v.is_empty())
            .unwrap_or(&user)
            .to_string();
        // Since 18 the image keeps data in a versioned directory under its VOLUME.
        let default_pgdata = if major >= 18 {
            format!("/var/lib/postgresql/{major}/docker")
        } else {
            "/var/lib/postgresql/data".to_string()
        };
        let pgdata_in_container = self.var("PGDATA").unwrap_or(&default_pgdata).to_string();
        let pgdata = self.mounts.host_path(&pgdata_in_container);
        let io = |what: &str, e: std::io::Error| {
            self.failed(format!("cannot {what} {}: {e}", pgdata.display()))
        };
        fs::create_dir_all(&pgdata).map_err(|e| io("create", e))?;
        self.ctx
            .run_as
            .own(&pgdata)
            .map_err(|e| self.failed(e.to_string()))?;
        fs::set_permissions(&pgdata, fs::Permissions::from_mode(0o700))
            .map_err(|e| io("chmod", e))?;

        if pgdata.join("PG_VERSION").exists() {
            self.log_line("PostgreSQL Database directory appears to contain a database; Skipping initialization");
        } else {
            self.init_postgres(&bin, &pgdata, major, &user, &db).await?;
        }

        let mut cmd = self.command(&bin.join("postgres"));
        cmd.arg("-D").arg(&pgdata);
        cmd.args(args.iter().map(|a| self.mounts.translate_arg(a)));
        // Last, so they win: the pod's own address, and a socket directory of its own.
        cmd.arg("-c").arg(format!("listen_addresses={}", self.ip));
        cmd.arg("-c").arg(format!(
            "unix_socket_directories={}",
            self.run_dir.display()
        ));
        self.spawn(cmd, "postgres", libc::SIGINT)
            .map_err(|message| StartError::Failed {
                exit_code: 128,
                message,
            })
    }

    /// What docker-entrypoint.sh does on an empty data directory.
    async fn init_postgres(
        &self,
        bin: &Path,
        pgdata: &Path,
        major: u32,
        user: &str,
        db: &str,
    ) -> Result<(), StartError> {
        let password = self.var("POSTGRES_PASSWORD").unwrap_or_default();
        // The image's defaults: scram-sha-256 from 14 on, md5 before.
        let default_auth = if major >= 14 { "scram-sha-256" } else { "md5" };
        let auth = self
            .var("POSTGRES_HOST_AUTH_METHOD")
            .filter(|v| !v.is_empty())
            .unwrap_or(default_auth)
            .to_string();
        if password.is_empty() && auth != "trust" {
            return Err(self.failed(
                "Error: Database is uninitialized and superuser password is not specified.\n\
                 You must specify POSTGRES_PASSWORD to a non-empty value for the superuser. \
                 For example, \"-e POSTGRES_PASSWORD=password\" on \"docker run\"."
                    .into(),
            ));
        }
        let pwfile = self.run_dir.join("pwfile");
        fs::write(&pwfile, format!("{password}\n"))
            .and_then(|()| fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o600)))
            .map_err(|e| self.failed(format!("cannot write {}: {e}", pwfile.display())))?;
        self.ctx
            .run_as
            .own(&pwfile)
            .map_err(|e| self.failed(e.to_string()))?;
        let mut initdb = self.command(&bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(pgdata)
            .arg(format!("--username={user}"))
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["--auth-local=trust", &format!("--auth-host={auth}")])
            .args(["--encoding=UTF8", "--locale=C"])
            .args(
                self.var("POSTGRES_INITDB_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            );
        let initialised = self.run_helper(initdb, "initdb").await;
        let _ = fs::remove_file(&pwfile);
        initialised?;
        // The image lets every address in with the chosen method.
        let hba = pgdata.join("pg_hba.conf");
        let mut text = fs::read_to_string(&hba)
            .map_err(|e| self.failed(format!("cannot read {}: {e}", hba.display())))?;
        text.push_str(&format!("\nhost all all all {auth}\n"));
        fs::write(&hba, text)
            .map_err(|e| self.failed(format!("cannot write {}: {e}", hba.display())))?;
        if db != "postgres" {
            let sql = self.run_dir.join("create-database.sql");
            fs::write(
                &sql,
                format!("CREATE DATABASE \"{}\";\n", db.replace('"', "\"\"")),
            )
            .map_err(|e| self.failed(format!("cannot write {}: {e}", sql.display())))?;
            let stdin = fs::File::open(&sql).map_err(|e| self.failed(e.to_string()))?;
            let mut single = self.command(&bin.join("postgres"));
            single
                .arg("--single")
                .arg("-D")
                .arg(pgdata)
                .arg("postgres")
                .stdin(stdin);
            self.run_helper(single, "create database").await?;
        }
        self.log_line("PostgreSQL init process complete; ready for start up.");
        Ok(())
    }

    fn start_pgbouncer(&self, argv: &[String]) -> Result<Arc<Process>, StartError> {
        let binary = self
            .ctx
            .binaries
            .as_ref()
            .map_err(|e| StartError::Image(e.clone()))?
            .pgbouncer()
            .map_err(|e| StartError::Image(e.to_string()))?;
        let config_in_container = argv
            .iter()
            .find(|a| a.ends_with(".ini"))
            .map(String::as_str)
            .unwrap_or("/etc/pgbouncer/pgbouncer.ini");
        let config = self.mounts.host_path(config_in_container);
        let text = fs::read_to_string(&config).map_err(|e| {
            self.failed(format!(
                "cannot read the PgBouncer configuration {config_in_container} ({}): {e}; \
                 mount a pgbouncer.ini there (e.g. from a ConfigMap) or pass its path as an argument",
                config.display()
            ))
        })?;
        let rewritten = rewrite_pgbouncer_ini(&text, self.ip, &self.run_dir, &self.mounts)
            .map_err(|message| self.failed(message))?;
        let path = self.run_dir.join("pgbouncer.ini");
        fs::write(&path, rewritten)
            .map_err(|e| self.failed(format!("cannot write {}: {e}", path.display())))?;
        self.ctx
            .run_as
            .own(&path)
            .map_err(|e| self.failed(e.to_string()))?;
        let mut cmd = self.command(&binary);
        cmd.arg(&path);
        self.spawn(cmd, "pgbouncer", libc::SIGTERM)
            .map_err(|message| StartError::Failed {
                exit_code: 128,
                message,
            })
    }
}

/// Where a shell's `-c` script is among its arguments: right after the first option cluster
/// with a `c` (`-c`, `-ec`, `-euxc`).
fn script_index(args: &[String]) -> Option<usize> {
    let flag = args.iter().position(|arg| {
        arg.len() > 1 && arg.starts_with('-') && !arg.starts_with("--") && arg.contains('c')
    })?;
    (flag + 1 < args.len()).then_some(flag + 1)
}

/// A termination message as a real kubelet makes it: the termination log's content if any;
/// else, given `fallback` (the container's log and where the run's output starts in it), the
/// tail of that output.
fn termination_message(termination_log: &Path, fallback: Option<(&Path, u64)>) -> String {
    match read_tail(termination_log, 0, MAX_MESSAGE_BYTES) {
        Ok(message) if !message.is_empty() => return message,
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return format!(
                "Error on reading termination log {}: {e}",
                termination_log.display()
            )
        }
    }
    let Some((log, from)) = fallback else {
        return String::new();
    };
    // The last 80 lines' last 2 KiB lie within the output's last 2 KiB.
    match read_tail(log, from, MAX_LOG_BYTES) {
        Ok(output) => last_lines(&output, MAX_LOG_LINES).to_string(),
        Err(e) => format!("Error on reading termination message from logs: {e}"),
    }
}

/// Up to `max` bytes from the end of the file at `path`, none before offset `from`, as text.
fn read_tail(path: &Path, from: u64, max: u64) -> std::io::Result<String> {
    let mut file = fs::File::open(path)?;
    let start = file.metadata()?.len().saturating_sub(max).max(from);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The last `lines` lines of `text` (a final newline ends the last line, it starts none).
fn last_lines(text: &str, lines: usize) -> &str {
    let body = text.strip_suffix('\n').unwrap_or(text);
    let start = body
        .match_indices('\n')
        .rev()
        .nth(lines.saturating_sub(1))
        .map_or(0, |(i, _)| i + 1);
    &text[start..]
}

/// The pod's pgbouncer.ini made to run here: it listens on the pod IP, its unix socket is in
/// the container's directory, it logs to stderr, and the files it names are found through the
/// container's mounts.
fn rewrite_pgbouncer_ini(
    text: &str,
    ip: Ipv4Addr,
    run_dir: &Path,
    mounts: &Mounts,
) -> Result<String, String> {
    const DROPPED: [&str; 5] = [
        "listen_addr",
        "unix_socket_dir",
        "pidfile",
        "logfile",
        "user",
    ];
    const PATHS: [&str; 8] = [
        "auth_file",
        "auth_hba_file",
        "client_tls_key_file",
        "client_tls_cert_file",
        "client_tls_ca_file",
        "server_tls_key_file",
        "server_tls_cert_file",
        "server_tls_ca_file",
    ];
    let mut out = String::new();
    let mut in_pgbouncer = false;
    let mut found = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(path) = trimmed.strip_prefix("%include") {
            out.push_str(&format!(
                "%include {}\n",
                mounts.host_path(path.trim()).display()
            ));
            continue;
        }
        if trimmed.starts_with('[') {
            in_pgbouncer = trimmed.eq_ignore_ascii_case("[pgbouncer]");
            out.push_str(line);
            out.push('\n');
            if in_pgbouncer {
                found = true;
                out.push_str(&format!(
                    "listen_addr = {ip}\nunix_socket_dir = {}\n",
                    run_dir.display()
                ));
            }
            continue;
        }
        if in_pgbouncer {
            if let Some((key, value)) = trimmed.split_once('=') {
                let key = key.trim().to_ascii_lowercase();
                if DROPPED.contains(&key.as_str()) {
                    continue;
                }
                if PATHS.contains(&key.as_str()) {
                    out.push_str(&format!(
                        "{key} = {}\n",
                        mounts.host_path(value.trim()).display()
                    ));
                    continue;
                }
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    if found {
        Ok(out)
    } else {
        Err("the PgBouncer configuration has no [pgbouncer] section".into())
    }
}

/// Kubernetes' `$(VAR)` expansion: known variables are replaced, `$$` is a literal `$`, and
/// unknown references stay as they are.
pub(crate) fn expand(text: &str, vars: &[(String, String)]) -> String {
    let lookup = |name: &str| {
        vars.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(after_dollar) = after.strip_prefix('$') {
            out.push('$');
            rest = after_dollar;
            continue;
        }
        if let Some(inner) = after.strip_prefix('(') {
            if let Some(end) = inner.find(')') {
                if let Some(value) = lookup(&inner[..end]) {
                    out.push_str(value);
                    rest = &inner[end + 1..];
                    continue;
                }
            }
        }
        out.push('$');
        rest = after;
    }
    out.push_str(rest);
    out
}

/// The container's environment: `envFrom`, then `env` (values expanded, references resolved).
async fn resolve_env(
    ctx: &Ctx,
    pod: &Pod,
    container: &Container,
    ip: Ipv4Addr,
) -> Result<Vec<(String, String)>, String> {
    let namespace = pod.namespace().unwrap_or_default();
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let config_map = |name: String| {
        let api = config_maps.clone();
        let namespace = namespace.clone();
        async move {
            api.get_opt(&name)
                .await
                .map_err(|e| format!("cannot read configmap {namespace}/{name}: {e}"))
                .map(|cm| cm.map(|cm| cm.data.unwrap_or_default()))
        }
    };
    let secret = |name: String| {
        let api = secrets.clone();
        let namespace = pod.namespace().unwrap_or_default();
        async move {
            api.get_opt(&name)
                .await
                .map_err(|e| format!("cannot read secret {namespace}/{name}: {e}"))
                .map(|s| {
                    s.map(|s| {
                        s.data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                            .collect::<std::collections::BTreeMap<_, _>>()
                    })
                })
        }
    };
    let mut vars: Vec<(String, String)> = Vec::new();
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        let (data, name, optional) = if let Some(r) = &source.config_map_ref {
            (
                config_map(r.name.clone()).await?,
                r.name.clone(),
                r.optional.unwrap_or(false),
            )
        } else if let Some(r) = &source.secret_ref {
            (
                secret(r.name.clone()).await?,
                r.name.clone(),
                r.optional.unwrap_or(false),
            )
        } else {
            continue;
        };
        match data {
            Some(data) => vars.extend(data.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v))),
            None if optional => {}
            None => return Err(format!("envFrom: {name:?} not found")),
        }
    }
    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => expand(var.value.as_deref().unwrap_or_default(), &vars),
            Some(from) => {
                if let Some(field) = &from.field_ref {
                    match field.field_path.as_str() {
                        // The pod object predates the address the kubelet just gave it.
                        "status.podIP" => ip.to_string(),
                        path => field_value(pod, path)?,
                    }
                } else if let Some(key) = &from.config_map_key_ref {
                    let data = config_map(key.name.clone()).await?;
                    match data.and_then(|d| d.get(&key.key).cloned()) {
                        Some(v) => v,
                        None if key.optional.unwrap_or(false) => continue,
                        None => {
                            return Err(format!(
                                "env {}: configmap {:?} has no key {:?}",
                                var.name, key.name, key.key
                            ))
                        }
                    }
                } else if let Some(key) = &from.secret_key_ref {
                    let data = secret(key.name.clone()).await?;
                    match data.and_then(|d| d.get(&key.key).cloned()) {
                        Some(v) => v,
                        None if key.optional.unwrap_or(false) => continue,
                        None => {
                            return Err(format!(
                                "env {}: secret {:?} has no key {:?}",
                                var.name, key.name, key.key
                            ))
                        }
                    }
                } else {
                    return Err(format!(
                        "env {}: only value, fieldRef, configMapKeyRef and secretKeyRef are supported",
                        var.name
                    ));
                }
            }
        };
        vars.push((var.name.clone(), value));
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_kubernetes() {
        let vars = vec![
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "x y".to_string()),
        ];
        assert_eq!(expand("$(A)-$(B)", &vars), "1-x y");
        assert_eq!(expand("$$(A) $(C) $5", &vars), "$(A) $(C) $5");
    }

    #[test]
    fn termination_messages_follow_the_kubelets_rules_and_limits() {
        let dir = tempfile::tempdir().unwrap();
        let (file, log) = (dir.path().join("termination-log"), dir.path().join("c.log"));
        let run: String = (1..=100).map(|n| format!("line {n}\n")).collect();
        fs::write(&log, format!("an earlier run\n{run}")).unwrap();
        let from = "an earlier run\n".len() as u64;

        // No file, or an empty one: nothing, or the run's last 80 lines with the fallback.
        assert_eq!(termination_message(&file, None), "");
        let tail = termination_message(&file, Some((&log, from)));
        assert!(
            tail.starts_with("line 21\nline 22\n") && tail.ends_with("line 100\n"),
            "{tail}"
        );
        fs::write(&file, "").unwrap();
        assert_eq!(termination_message(&file, Some((&log, from))), tail);
        // Only this run's output, and at most its last 2 KiB.
        fs::write(&log, "an earlier run\nfailed\n").unwrap();
        assert_eq!(termination_message(&file, Some((&log, from))), "failed\n");
        let long = "x".repeat(3000);
        fs::write(&log, format!("{long}\nend")).unwrap();
        let tail = termination_message(&file, Some((&log, 0)));
        assert_eq!(tail.len(), 2048);
        assert!(tail.ends_with("x\nend"), "{tail}");
        // The file wins, fallback or not; at most its last 4 KiB.
        fs::write(&file, "done: 42 rows\n").unwrap();
        assert_eq!(
            termination_message(&file, Some((&log, 0))),
            "done: 42 rows\n"
        );
        fs::write(&file, format!("{}{}", "a".repeat(10), "b".repeat(4096))).unwrap();
        assert_eq!(termination_message(&file, None), "b".repeat(4096));
        assert_eq!(last_lines("a\nb\nc", 2), "b\nc");
        assert_eq!(last_lines("a\n", 5), "a\n");
    }

    #[test]
    fn finds_the_shell_script() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(script_index(&args(&["-c", "echo", "sh"])), Some(1));
        assert_eq!(script_index(&args(&["-eu", "-xc", "echo"])), Some(2));
        assert_eq!(script_index(&args(&["script.sh", "--config"])), None);
        assert_eq!(script_index(&args(&["-c"])), None);
    }

    #[test]
    fn rewrites_pgbouncer_ini_for_the_pod() {
        let container: Container = serde_json::from_value(serde_json::json!({
            "name": "c",
            "volumeMounts": [{"name": "conf", "mountPath": "/etc/pgbouncer"}],
        }))
        .unwrap();
        let volumes = HashMap::from([("conf".to_string(), PathBuf::from("/v/conf"))]);
        let mounts = Mounts::new(&container, &volumes, PathBuf::from("/r")).unwrap();
        let ini = "[databases]\napp = host=127.1.0.5 port=5432\n[pgbouncer]\nlisten_addr = 0.0.0.0\n\
                   listen_port = 6432\nauth_file = /etc/pgbouncer/userlist.txt\nlogfile = /var/log/x.log\n";
        let out = rewrite_pgbouncer_ini(
            ini,
            Ipv4Addr::new(127, 9, 0, 1),
            Path::new("/run/p"),
            &mounts,
        )
        .unwrap();
        assert!(
            out.contains("listen_addr = 127.9.0.1\nunix_socket_dir = /run/p\n"),
            "{out}"
        );
        assert!(out.contains("auth_file = /v/conf/userlist.txt"), "{out}");
        assert!(out.contains("listen_port = 6432"), "{out}");
        assert!(
            !out.contains("0.0.0.0") && !out.contains("logfile"),
            "{out}"
        );
        assert!(out.contains("app = host=127.1.0.5 port=5432"), "{out}");
        assert!(rewrite_pgbouncer_ini(
            "[databases]\n",
            Ipv4Addr::LOCALHOST,
            Path::new("/"),
            &mounts
        )
        .is_err());
    }
}
