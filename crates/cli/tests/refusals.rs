//! Bad input is refused with a message that names the problem and the fix, a non-zero exit
//! code, and nothing created on either server.

#[path = "../../engine/tests/common/mod.rs"]
mod common;

mod support;

use std::path::Path;

use common::{exec, pgshift_objects};
use support::{pair_with_app, pgpass, pgshift, refuse, url};

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
    assert_eq!(output.status.code(), Some(2), "{stderr}");
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
