//! Shared by the CLI's refusal tests: the pgshift binary run with a pgpass file, servers with a
//! database `app`, and the check that a refused command created nothing.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use crate::common::{exec, pgshift_objects, Pair};
use pgshift_lab::{PgServer, ServerOptions};

/// How long one pgshift command may take before the test fails (a run that waits silently
/// forever is one of the defects these tests guard against).
const COMMAND_BOUND: Duration = Duration::from_secs(300);

/// The pgshift binary with passwords from a pgpass file (never on the command line), and no
/// password, URL or ~/.pgpass inherited from whoever runs the tests.
pub fn command(pgpass: &Path) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_pgshift"));
    command
        .env("PGPASSFILE", pgpass)
        .env("HOME", "/nonexistent-home")
        .env_remove("PGPASSWORD")
        .env_remove("PGSHIFT_SOURCE")
        .env_remove("PGSHIFT_TARGET");
    command
}

/// Runs it to the end (at most `COMMAND_BOUND`).
pub fn pgshift(pgpass: &Path, args: &[&str]) -> Output {
    let child = command(pgpass)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pgshift starts");
    let pid = child.id() as libc::pid_t;
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    match finished.recv_timeout(COMMAND_BOUND) {
        Ok(output) => output.expect("pgshift runs"),
        Err(_) => {
            // SAFETY: kill has no memory preconditions; the pid is our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("pgshift {args:?} did not finish within {COMMAND_BOUND:?}");
        }
    }
}

pub fn url(server: &PgServer, user: &str, db: &str) -> String {
    format!("postgres://{user}@{}:{}/{db}", server.host(), server.port())
}

pub fn pgpass(pair: &Pair) -> std::path::PathBuf {
    let path = pair.dir.path().join("pgpass");
    pgshift_lab::write_pgpass(&path, &[&pair.source, &pair.target]).unwrap();
    path
}

pub struct Refusal {
    pub code: i32,
    pub stderr: String,
    pub stdout: String,
}

/// `check` and `run` both refuse; returns what `run` said.
/// `bin_dir`: where pg_dump and psql are; the target's own tools when None.
pub async fn refuse(
    pair: &Pair,
    pgpass: &Path,
    source_user: &str,
    bin_dir: Option<&Path>,
) -> Refusal {
    let source = url(&pair.source, source_user, "app");
    let target = url(&pair.target, "postgres", "app");
    let bin = bin_dir
        .unwrap_or(pair.target.bin_dir())
        .display()
        .to_string();
    let args = vec![
        "--source",
        &source,
        "--target",
        &target,
        "--pg-bin-dir",
        &bin,
    ];
    let check = pgshift(pgpass, &[&["check"], args.as_slice()].concat());
    let run = pgshift(pgpass, &[&["run"], args.as_slice()].concat());
    assert_ne!(check.status.code(), Some(0), "check accepted bad input");
    assert_ne!(run.status.code(), Some(0), "run accepted bad input");
    let refusal = Refusal {
        code: run.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&run.stderr).into_owned(),
        stdout: String::from_utf8_lossy(&check.stdout).into_owned()
            + &String::from_utf8_lossy(&check.stderr),
    };
    assert_untouched(pair, &refusal.stderr).await;
    refusal
}

/// Neither server holds anything of pgshift's, and the target has no database `app`.
pub async fn assert_untouched(pair: &Pair, stderr: &str) {
    assert!(
        pgshift_objects(&pair.source, &["app"]).await.is_empty(),
        "source changed: {stderr}"
    );
    assert!(
        pgshift_objects(&pair.target, &["app"]).await.is_empty(),
        "target changed: {stderr}"
    );
    let target_dbs = pair.target.connect("postgres").await.unwrap();
    let app_on_target: bool = target_dbs
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'app')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        !app_on_target,
        "a refused run created the target database: {stderr}"
    );
}

pub async fn pair_with_app(
    source_major: u32,
    target_major: u32,
    source_settings: &[(&str, &str)],
) -> Pair {
    pair_with_settings(source_major, target_major, source_settings, &[]).await
}

/// A source with database `app` (one table) and an empty target, each with extra settings.
pub async fn pair_with_settings(
    source_major: u32,
    target_major: u32,
    source_settings: &[(&str, &str)],
    target_settings: &[(&str, &str)],
) -> Pair {
    pgshift_lab::testing::require_binaries();
    let dir = tempfile::tempdir().unwrap();
    let options = |major, name, settings: &[(&str, &str)]| {
        settings.iter().fold(
            ServerOptions::new(major, dir.path().to_path_buf(), name),
            |options, (key, value)| options.setting(key, value),
        )
    };
    let (source, target) = tokio::join!(
        PgServer::start(options(source_major, "source", source_settings)),
        PgServer::start(options(target_major, "target", target_settings))
    );
    let pair = Pair {
        source: source.unwrap(),
        target: target.unwrap(),
        dir,
    };
    pair.source.create_database("app").await.unwrap();
    exec(
        &pair.source,
        "app",
        "CREATE TABLE items (id serial PRIMARY KEY, name text)",
    )
    .await;
    pair
}
