//! Real servers of every supported major: start, answer, restart, stop, and never outlive
//! the process that started them.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pgshift_lab::testing::{require_binaries, MAJORS};
use pgshift_lab::{write_pgpass, PgServer, ServerOptions};
use tokio_postgres::SimpleQueryMessage;

async fn show(server: &PgServer, setting: &str) -> String {
    let client = server.connect("postgres").await.unwrap();
    let rows = client
        .simple_query(&format!("SHOW {setting}"))
        .await
        .unwrap();
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap()
}

/// The postmaster's pid, from the first line of postmaster.pid.
fn postmaster_pid(data_dir: &Path) -> i32 {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).unwrap();
    text.lines().next().unwrap().trim().parse().unwrap()
}

/// Running (a zombie waiting for a reaper counts as gone).
fn is_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn wait_gone(pid: i32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if !is_alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    !is_alive(pid)
}

#[tokio::test]
async fn every_major_starts_answers_and_stops() {
    require_binaries();
    let dir = tempfile::tempdir().unwrap();
    let starts = MAJORS.map(|major| {
        let opts = ServerOptions::new(major, dir.path(), format!("pg{major}"));
        async move {
            let server = PgServer::start(opts).await.unwrap();
            let client = server.connect("postgres").await.unwrap();
            let row = client.query_one("SELECT version()", &[]).await.unwrap();
            let version: String = row.get(0);
            assert!(
                version.starts_with(&format!("PostgreSQL {}", server.version())),
                "{version}"
            );
            assert!(server.version().starts_with(&format!("{major}.")));
            assert_eq!(server.major(), major);
            // Every major runs the lab's settings: the oldest have every one of them too.
            assert_eq!(show(&server, "wal_level").await, "logical");
            assert_eq!(show(&server, "password_encryption").await, "scram-sha-256");
            assert_eq!(show(&server, "logging_collector").await, "on");
            drop(client);
            server.stop().await.unwrap();
        }
    });
    futures_util::future::join_all(starts).await;
}

#[tokio::test]
async fn server_is_configured_for_logical_replication_over_loopback() {
    require_binaries();
    let dir = tempfile::tempdir().unwrap();
    let server =
        PgServer::start(ServerOptions::new(13, dir.path(), "blue").setting("work_mem", "8MB"))
            .await
            .unwrap();
    assert_eq!(server.host(), "127.0.0.1");
    assert_eq!(server.superuser(), "postgres");
    assert_eq!(
        server.url("app"),
        format!("postgres://postgres@127.0.0.1:{}/app", server.port())
    );
    assert!(!server.url("app").contains(server.password()));
    assert_eq!(show(&server, "wal_level").await, "logical");
    assert_eq!(show(&server, "work_mem").await, "8MB");
    assert_eq!(show(&server, "listen_addresses").await, "127.0.0.1");
    assert_eq!(show(&server, "unix_socket_directories").await, "");
    assert_eq!(show(&server, "password_encryption").await, "scram-sha-256");

    // The log the engine reads apply errors from.
    let client = server.connect("postgres").await.unwrap();
    let row = client
        .query_one("SELECT pg_current_logfile()", &[])
        .await
        .unwrap();
    let logfile: Option<String> = row.get(0);
    assert!(logfile.unwrap().starts_with("log/"));

    // Password authentication is enforced.
    let mut wrong = server.config("postgres");
    wrong.password("not-the-password");
    let err = wrong.connect(tokio_postgres::NoTls).await.err().unwrap();
    let db_error = err.as_db_error().expect("a server error");
    assert_eq!(
        db_error.code(),
        &tokio_postgres::error::SqlState::INVALID_PASSWORD
    );

    server.create_database("app db").await.unwrap();
    server.connect("app db").await.unwrap();

    let pgpass = dir.path().join("pgpass");
    write_pgpass(&pgpass, &[&server]).unwrap();
    assert_eq!(
        std::fs::read_to_string(&pgpass).unwrap(),
        format!("{}\n", server.pgpass_line())
    );
}

#[tokio::test]
async fn restart_applies_new_settings_on_the_same_port() {
    require_binaries();
    let dir = tempfile::tempdir().unwrap();
    let mut server = PgServer::start(ServerOptions::new(16, dir.path(), "flip"))
        .await
        .unwrap();
    let port = server.port();
    assert_eq!(show(&server, "wal_level").await, "logical");
    server.restart(&[("wal_level", "replica")]).await.unwrap();
    assert_eq!(server.port(), port);
    assert_eq!(show(&server, "wal_level").await, "replica");
    // Other settings survive the restart.
    assert_eq!(show(&server, "max_replication_slots").await, "20");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn caller_settings_override_defaults_from_the_start() {
    require_binaries();
    let dir = tempfile::tempdir().unwrap();
    let server = PgServer::start(
        ServerOptions::new(18, dir.path(), "replica").setting("wal_level", "replica"),
    )
    .await
    .unwrap();
    assert_eq!(show(&server, "wal_level").await, "replica");
}

#[tokio::test]
async fn drop_stops_the_server() {
    require_binaries();
    let dir = tempfile::tempdir().unwrap();
    let server = PgServer::start(ServerOptions::new(15, dir.path(), "dropped"))
        .await
        .unwrap();
    let pid = postmaster_pid(server.data_dir());
    assert!(is_alive(pid));
    drop(server);
    assert!(
        wait_gone(pid, Duration::from_secs(1)),
        "postmaster {pid} survived drop"
    );
}

const HELPER_ENV: &str = "PGSHIFT_LAB_ORPHAN_DIR";

/// Run in a child process by `servers_die_with_the_process_that_started_them`: starts a server,
/// records its pid, and waits to be killed.
#[tokio::test]
#[ignore = "helper: runs in a child process of servers_die_with_the_process_that_started_them"]
async fn orphan_helper() {
    let dir =
        std::env::var(HELPER_ENV).expect("run by servers_die_with_the_process_that_started_them");
    let server = PgServer::start(ServerOptions::new(17, &dir, "orphan"))
        .await
        .unwrap();
    let pid = postmaster_pid(server.data_dir());
    std::fs::write(Path::new(&dir).join("pid"), pid.to_string()).unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
}

#[test]
fn servers_die_with_the_process_that_started_them() {
    require_binaries();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "orphan_helper", "--ignored", "--nocapture"])
        .env(HELPER_ENV, dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid_file = dir.path().join("pid");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !pid_file.exists() {
        assert!(
            Instant::now() < deadline,
            "the helper did not start a server"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the helper exited early"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(50));
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    assert!(is_alive(pid));
    child.kill().unwrap(); // SIGKILL: no destructor runs in the helper.
    child.wait().unwrap();
    assert!(
        wait_gone(pid, Duration::from_secs(10)),
        "postmaster {pid} outlived the killed process"
    );
}
