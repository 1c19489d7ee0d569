//! Bad input is refused with a message that names the problem and the fix, a non-zero exit
//! code, and nothing created on either server; failures say what to do, and closed pipes do
//! not make pgshift panic.

#[path = "../../engine/tests/common/mod.rs"]
mod common;

mod support;

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{exec, pgshift_objects, Pair};
use pgshift_lab::PgServer;
use support::{assert_untouched, command, pair_with_app, pgpass, pgshift, refuse, url};

#[tokio::test]
async fn wal_level_replica_is_refused() {
    let pair = pair_with_app(15, 18, &[("wal_level", "replica")]).await;
    let refusal = refuse(&pair, &pgpass(&pair), "postgres", None).await;
    assert_eq!(refusal.code, 1);
    assert!(
        refusal.stderr.contains("wal_level = replica"),
        "{}",
        refusal.stderr
    );
    assert!(
        refusal
            .stderr
            .contains("ALTER SYSTEM SET wal_level = logical"),
        "{}",
        refusal.stderr
    );
    assert!(refusal.stdout.contains("not ready"), "{}", refusal.stdout);
}

#[tokio::test]
async fn table_without_key_is_refused_with_its_fix() {
    let pair = pair_with_app(15, 18, &[]).await;
    exec(
        &pair.source,
        "app",
        "CREATE TABLE events (at timestamptz, what text)",
    )
    .await;
    let refusal = refuse(&pair, &pgpass(&pair), "postgres", None).await;
    assert_eq!(refusal.code, 1);
    assert!(
        refusal
            .stderr
            .contains("table public.events (database app) has no primary key or replica identity"),
        "{}",
        refusal.stderr
    );
    assert!(refusal
        .stderr
        .contains("ALTER TABLE public.events REPLICA IDENTITY FULL, or add a primary key"));
}

#[tokio::test]
async fn older_target_is_refused() {
    let pair = pair_with_app(16, 15, &[]).await;
    let refusal = refuse(&pair, &pgpass(&pair), "postgres", None).await;
    assert_eq!(refusal.code, 1);
    assert!(
        refusal.stderr.contains("runs PostgreSQL 15"),
        "{}",
        refusal.stderr
    );
    assert!(
        refusal.stderr.contains("same or a newer major"),
        "{}",
        refusal.stderr
    );
}

#[tokio::test]
async fn user_without_privileges_is_refused() {
    let pair = pair_with_app(15, 18, &[]).await;
    exec(
        &pair.source,
        "postgres",
        "CREATE ROLE app_owner LOGIN PASSWORD 'owner-secret'",
    )
    .await;
    let pgpass = pgpass(&pair);
    let mut text = std::fs::read_to_string(&pgpass).unwrap();
    text.push_str(&format!(
        "127.0.0.1:{}:*:app_owner:owner-secret\n",
        pair.source.port()
    ));
    std::fs::write(&pgpass, text).unwrap();
    let refusal = refuse(&pair, &pgpass, "app_owner", None).await;
    assert_eq!(refusal.code, 1);
    assert!(
        refusal
            .stderr
            .contains("source user app_owner is not a superuser"),
        "{}",
        refusal.stderr
    );
    assert!(
        refusal
            .stderr
            .contains("connect to the source as a superuser"),
        "{}",
        refusal.stderr
    );
}

#[tokio::test]
async fn wrong_password_is_refused() {
    let pair = pair_with_app(15, 18, &[]).await;
    let pgpass = pair.dir.path().join("wrong-pgpass");
    std::fs::write(&pgpass, "*:*:*:postgres:not-the-password\n").unwrap();
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let refusal = refuse(&pair, &pgpass, "postgres", None).await;
    assert_eq!(refusal.code, 2);
    assert!(
        refusal.stderr.contains("password authentication failed"),
        "{}",
        refusal.stderr
    );
    assert!(
        refusal
            .stderr
            .contains("check the password in your pgpass file"),
        "{}",
        refusal.stderr
    );
    assert!(!refusal.stderr.contains("not-the-password"));
}

#[tokio::test]
async fn unreachable_host_is_refused() {
    let pair = pair_with_app(15, 18, &[]).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = listener.local_addr().unwrap().port();
    drop(listener);
    let target = format!("postgres://postgres@127.0.0.1:{closed_port}/app");
    let source = url(&pair.source, "postgres", "app");
    let output = pgshift(
        &pgpass(&pair),
        &["run", "--source", &source, "--target", &target],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "could not connect to the target at 127.0.0.1:{closed_port}/app"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("check that the server runs"), "{stderr}");
    assert!(pgshift_objects(&pair.source, &["app"]).await.is_empty());
}

#[tokio::test]
async fn password_in_url_is_refused() {
    let output = pgshift(
        Path::new("/nonexistent"),
        &[
            "check",
            "--source",
            "postgres://app:hunter2@127.0.0.1:1/app",
            "--target",
            "postgres://app@127.0.0.1:1/app",
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("the source URL contains a password"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("hunter2"),
        "the password was echoed: {stderr}"
    );
}

#[tokio::test]
async fn pg_dump_of_another_major_or_none_is_refused() {
    let pair = pair_with_app(15, 18, &[]).await;
    let pgpass = pgpass(&pair);
    let old_tools = pgshift_lab::Binaries::locate()
        .unwrap()
        .bin_dir(15)
        .unwrap();
    let refusal = refuse(&pair, &pgpass, "postgres", Some(&old_tools)).await;
    assert_eq!(refusal.code, 1);
    assert!(
        refusal
            .stderr
            .contains("the schema must be dumped by the target's major (18)"),
        "{}",
        refusal.stderr
    );
    assert!(
        refusal
            .stderr
            .contains("install the PostgreSQL 18 client tools"),
        "{}",
        refusal.stderr
    );

    let empty = tempfile::tempdir().unwrap();
    let refusal = refuse(&pair, &pgpass, "postgres", Some(empty.path())).await;
    assert!(
        refusal.stderr.contains("pg_dump was not found"),
        "{}",
        refusal.stderr
    );
    assert!(
        refusal
            .stderr
            .contains("install the PostgreSQL 18 client tools"),
        "{}",
        refusal.stderr
    );
}

/// Checks the one JSON object that `--json` prints on stdout for an error,
/// `{"error": {"kind", "message", "exit_code"}}`: this `kind`, a message that mentions
/// `mentions`, and `exit_code`, which is also the process's.
fn assert_json_error(output: &Output, kind: &str, mentions: &str, exit_code: i32) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let value: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout:?}"));
    let error = &value["error"];
    assert_eq!(error["kind"], kind, "{value}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains(mentions)),
        "{value}"
    );
    assert_eq!(error["exit_code"], exit_code, "{value}");
    assert_eq!(output.status.code(), Some(exit_code), "{value}");
}

#[test]
fn bad_arguments_are_usage_errors_and_help_is_not() {
    let nowhere = "postgres://postgres@127.0.0.1:1/app";
    let usage_errors: [(&[&str], &str); 8] = [
        (
            &[
                "check",
                "--source",
                "postgres://a@h:notaport/db",
                "--target",
                nowhere,
            ],
            "invalid source URL",
        ),
        (
            &["status", "--source", nowhere, "--target", "garbage"],
            "invalid target URL",
        ),
        (
            &[
                "check",
                "--source",
                nowhere,
                "--target",
                nowhere,
                "--password-file",
                "/nonexistent/pgpass",
            ],
            "/nonexistent/pgpass",
        ),
        (
            &[
                "run",
                "--source",
                nowhere,
                "--target",
                nowhere,
                "--pgbouncer",
                "postgres://pgbouncer@127.0.0.1:1/pgbouncer",
            ],
            "--pgbouncer-config",
        ),
        (
            &[
                "check",
                "--source",
                nowhere,
                "--target",
                nowhere,
                "--no-such-flag",
            ],
            "--no-such-flag",
        ),
        (&["check", "--source", nowhere], "--target"),
        (
            &[
                "run",
                "--source",
                nowhere,
                "--target",
                nowhere,
                "--max-pause",
                "forever",
            ],
            "--max-pause",
        ),
        (&[], "Usage"),
    ];
    for (args, named) in usage_errors {
        let output = pgshift(Path::new("/nonexistent"), args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
    }
    for args in [&["--help"][..], &["check", "--help"], &["--version"]] {
        let output = pgshift(Path::new("/nonexistent"), args);
        assert_eq!(output.status.code(), Some(0), "{args:?}");
        assert!(!output.stdout.is_empty(), "{args:?}");
    }
    let help = pgshift(Path::new("/nonexistent"), &["--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    for code in ["0 ", "1 ", "2 ", "3 ", "64 "] {
        assert!(
            help.contains(&format!("  {code}")),
            "exit code {code}undocumented: {help}"
        );
    }
}

#[test]
fn json_errors_are_one_object_on_stdout_for_every_command() {
    let nowhere = "postgres://postgres@127.0.0.1:1/app";
    for command in ["check", "run", "status", "cutover", "abort", "cleanup"] {
        let output = pgshift(
            Path::new("/nonexistent"),
            &[
                command,
                "--json",
                "--source",
                "postgres://a@h:notaport/db",
                "--target",
                nowhere,
            ],
        );
        assert_json_error(&output, "usage", "invalid source URL", 64);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("error: invalid source URL"),
            "{command}: {stderr}"
        );
    }
    let clap_error = pgshift(
        Path::new("/nonexistent"),
        &[
            "check",
            "--json",
            "--source",
            nowhere,
            "--target",
            nowhere,
            "--no-such-flag",
        ],
    );
    assert_json_error(&clap_error, "usage", "--no-such-flag", 64);
    // A failure that is not the arguments' fault: no such server version to start.
    let demo = pgshift(
        Path::new("/nonexistent"),
        &["demo", "--json", "--source-version", "3"],
    );
    assert_json_error(&demo, "failed", "PostgreSQL 3", 1);
}

#[tokio::test]
async fn unreachable_host_in_json_is_a_connection_error_object() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = listener.local_addr().unwrap().port();
    drop(listener);
    let nowhere = format!("postgres://postgres@127.0.0.1:{closed_port}/app");
    let output = pgshift(
        Path::new("/nonexistent"),
        &[
            "status", "--json", "--source", &nowhere, "--target", &nowhere,
        ],
    );
    assert_json_error(&output, "connection", "could not connect to the source", 2);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("could not connect to the source"),
        "{output:?}"
    );
}

#[tokio::test]
async fn blockers_in_json_are_a_blocked_error_object() {
    let pair = pair_with_app(15, 18, &[("wal_level", "replica")]).await;
    let source = url(&pair.source, "postgres", "app");
    let target = url(&pair.target, "postgres", "app");
    let output = pgshift(
        &pgpass(&pair),
        &["run", "--json", "--source", &source, "--target", &target],
    );
    assert_json_error(&output, "blocked", "wal_level = replica", 1);
}

#[tokio::test]
async fn missing_password_says_where_pgshift_looked() {
    let pair = pair_with_app(15, 18, &[]).await;
    let empty = pair.dir.path().join("empty-pgpass");
    pgshift_lab::write_pgpass_entries(&empty, &[]).unwrap();
    let source = url(&pair.source, "postgres", "app");
    let target = url(&pair.target, "postgres", "app");
    let output = pgshift(
        Path::new("/nonexistent/pgpass"),
        &[
            "check",
            "--source",
            &source,
            "--target",
            &target,
            "--password-file",
            &empty.display().to_string(),
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "no password was found for postgres@127.0.0.1:{}",
            pair.source.port()
        )),
        "{stderr}"
    );
    for place in [
        &format!("--password-file {}", empty.display())[..],
        "PGPASSFILE /nonexistent/pgpass",
        "~/.pgpass",
        "PGPASSWORD",
    ] {
        assert!(stderr.contains(place), "{place} not named: {stderr}");
    }
    assert!(!stderr.contains("check that the server runs"), "{stderr}");
}

#[tokio::test]
async fn password_file_open_to_others_is_refused() {
    let pair = pair_with_app(15, 18, &[]).await;
    let file = pgpass(&pair);
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let home = pair.dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let home_pgpass = home.join(".pgpass");
    std::fs::copy(&file, &home_pgpass).unwrap();
    std::fs::set_permissions(&home_pgpass, std::fs::Permissions::from_mode(0o640)).unwrap();
    let source = url(&pair.source, "postgres", "app");
    let target = url(&pair.target, "postgres", "app");
    let file_arg = file.display().to_string();
    let common = ["--source", &source, "--target", &target];
    let cases = [
        (
            command(Path::new("/nonexistent"))
                .args(["run"])
                .args(common)
                .args(["--password-file", &file_arg])
                .output()
                .unwrap(),
            &file,
            "0644",
        ),
        (
            command(&file)
                .args(["check"])
                .args(common)
                .output()
                .unwrap(),
            &file,
            "0644",
        ),
        (
            command(Path::new("/nonexistent"))
                .env("HOME", &home)
                .args(["check"])
                .args(common)
                .output()
                .unwrap(),
            &home_pgpass,
            "0640",
        ),
    ];
    for (output, path, mode) in cases {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{stderr}");
        assert!(stderr.contains(&format!("{} ", path.display())), "{stderr}");
        assert!(stderr.contains(&format!("mode {mode}")), "{stderr}");
        assert!(
            stderr.contains(&format!("chmod 600 {}", path.display())),
            "{stderr}"
        );
    }
    assert_untouched(&pair, "after a refused run").await;
}

/// The PID of pgshift's session on `server` that waits for a lock, once there is one.
async fn pgshift_waiting_on_lock(server: &PgServer) -> i32 {
    let admin = server.connect("postgres").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let row = admin
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgshift' AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            return row.get(0);
        }
        assert!(
            Instant::now() < deadline,
            "pgshift never waited for the lock"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `--source`, `--target` (database `app` of each) and the target's tools.
fn pair_args(pair: &Pair) -> Vec<String> {
    vec![
        "--source".into(),
        url(&pair.source, "postgres", "app"),
        "--target".into(),
        url(&pair.target, "postgres", "app"),
        "--pg-bin-dir".into(),
        pair.target.bin_dir().display().to_string(),
    ]
}

/// `run --cutover manual` of the pair.
fn manual_run(pair: &Pair) -> Vec<String> {
    let mut args = vec!["run".to_string()];
    args.extend(pair_args(pair));
    args.extend(["--cutover".to_string(), "manual".to_string()]);
    args
}

/// Waits for a `pgshift` that lost its connection to `server_while` (e.g. "source while
/// creating the marker table"), and checks that it said so, with exit code 2 and that running
/// it again resumes.
async fn lost_connection(run: tokio::process::Child, server_while: &str) -> Output {
    let output = run.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("lost the connection to the {server_while}")),
        "{stderr}"
    );
    assert!(
        stderr.contains("run the same command again: pgshift resumes where it stopped"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    output
}

#[tokio::test]
async fn a_connection_lost_mid_run_names_server_and_step_and_a_rerun_resumes() {
    let pair = pair_with_app(15, 18, &[]).await;
    let pgpass = pgpass(&pair);
    let args = manual_run(&pair);
    let spawn = |json: bool| {
        let mut run = tokio::process::Command::from(command(&pgpass));
        run.args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if json {
            run.arg("--json");
        }
        run.spawn().unwrap()
    };
    let admin = pair.source.connect("postgres").await.unwrap();
    // An uncommitted schema of the same name: pgshift's creation of its marker table waits
    // for this transaction, which gives the test a moment where pgshift is mid-statement.
    let holder = pair.source.connect("app").await.unwrap();
    holder
        .batch_execute("BEGIN; CREATE SCHEMA pgshift_meta")
        .await
        .unwrap();

    // The server ends the session that runs the statement (as a fast shutdown does).
    let run = spawn(true);
    let waiting = pgshift_waiting_on_lock(&pair.source).await;
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&waiting])
        .await
        .unwrap();
    let output = lost_connection(run, "source while creating the marker table").await;
    assert_json_error(
        &output,
        "connection",
        "lost the connection to the source",
        2,
    );

    // The server ends pgshift's idle sessions: pgshift finds a closed connection at its next
    // statement on them.
    let run = spawn(false);
    let waiting = pgshift_waiting_on_lock(&pair.source).await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pgshift' AND pid <> $1",
            &[&waiting],
        )
        .await
        .unwrap();
    holder.batch_execute("ROLLBACK").await.unwrap();
    // Which statement comes next on a dead session is the engine's business.
    lost_connection(run, "source while ").await;

    let output = spawn(false).wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("ready for cutover"), "{stdout}");
}

#[tokio::test]
async fn a_pgbouncer_lost_mid_cutover_is_named() {
    let pair = common::pair(15, 18).await;
    common::ledger_database(&pair).await;
    let bouncer = common::bouncer_for(&pair).await;
    let pgpass = pgpass(&pair);
    let mut entries = std::fs::read_to_string(&pgpass).unwrap();
    entries.push_str(&bouncer.admin_pgpass_entry().line());
    entries.push('\n');
    std::fs::write(&pgpass, entries).unwrap();
    let bouncer_args = [
        "--pgbouncer".to_string(),
        bouncer.admin_url(),
        "--pgbouncer-config".to_string(),
        bouncer.config_path().display().to_string(),
    ];
    let ready = command(&pgpass)
        .args(manual_run(&pair))
        .args(&bouncer_args)
        .output()
        .unwrap();
    assert!(
        ready.status.success(),
        "{}",
        String::from_utf8_lossy(&ready.stderr)
    );

    // An open transaction through PgBouncer: PAUSE waits for it, with the entry marked paused.
    let (client, connection) = bouncer
        .client_config("app", common::APP_USER, common::APP_PASSWORD)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let mut cutover = tokio::process::Command::from(command(&pgpass));
    cutover
        .arg("cutover")
        .args(pair_args(&pair))
        .args(&bouncer_args)
        .args(["--max-pause", "300s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let cutover = cutover.spawn().unwrap();
    let admin = bouncer.admin_connect().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let paused = admin
            .simple_query("SHOW DATABASES")
            .await
            .unwrap()
            .iter()
            .any(|message| match message {
                tokio_postgres::SimpleQueryMessage::Row(row) => {
                    row.get("name") == Some("app") && row.get("paused") == Some("1")
                }
                _ => false,
            });
        if paused {
            break;
        }
        assert!(Instant::now() < deadline, "pgshift never paused app");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bouncer.stop().await.unwrap();

    // The waiting PAUSE, or the RESUME that lifts the fence after it, finds the console gone.
    lost_connection(cutover, "pgbouncer while running ").await;
}

/// The write end of a pipe whose read end is closed, as when `| head` has exited: every write
/// to it fails with EPIPE.
fn closed_pipe() -> Stdio {
    let mut fds = [0; 2];
    // SAFETY: pipe() fills both descriptors, which this function then owns.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    Stdio::from(write)
}

#[test]
fn closed_pipes_do_not_make_pgshift_panic() {
    let crd = command(Path::new("/nonexistent"))
        .arg("crd")
        .stdout(closed_pipe())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&crd.stderr);
    assert_eq!(crd.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let help = command(Path::new("/nonexistent"))
        .arg("--help")
        .stdout(closed_pipe())
        .output()
        .unwrap();
    assert_eq!(help.status.code(), Some(0));

    // The error message goes to a closed stderr; the exit code still says what happened.
    let refused = command(Path::new("/nonexistent"))
        .args([
            "check", "--json", "--source", "garbage", "--target", "garbage",
        ])
        .stderr(closed_pipe())
        .output()
        .unwrap();
    assert_json_error(&refused, "usage", "invalid source URL", 64);
}

#[tokio::test]
async fn a_closed_stderr_does_not_stop_a_run() {
    let pair = pair_with_app(15, 18, &[]).await;
    // Progress lines and (with RUST_LOG=trace) the driver's log all go to the closed stderr.
    let output = command(&pgpass(&pair))
        .args(manual_run(&pair))
        .env("RUST_LOG", "trace")
        .stderr(closed_pipe())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("ready for cutover"), "{stdout}");
}
