//! Clients with their drivers' defaults write through PgBouncer (transaction mode) across the
//! cutover: prepared statements included, which PgBouncer carries from 1.21 on. Each client
//! counts its commits; every one of them is on the new server afterwards, none failed.

#[path = "../../engine/tests/common/mod.rs"]
mod common;
mod support;

use std::process::{Command, Stdio};

use common::{exec, APP_PASSWORD, APP_USER};
use support::CliLab;

/// What pgbench said about its run: transactions processed and failed.
fn pgbench_counts(said: &str) -> (i64, i64) {
    let number = |prefix: &str| {
        said.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("pgbench did not report {prefix:?}:\n{said}"))
    };
    (
        number("number of transactions actually processed:"),
        number("number of failed transactions:"),
    )
}

#[tokio::test]
async fn pgbench_with_prepared_statements_crosses_the_cutover() {
    let lab = CliLab::start(15, 18).await;
    exec(
        &lab.pair.source,
        "app",
        &format!("GRANT CREATE ON SCHEMA public TO {APP_USER}"),
    )
    .await;
    let pgbench = lab.pair.target.bin_dir().join("pgbench");
    let connection = |command: &mut Command| {
        command
            .args([
                "-h",
                lab.bouncer.host(),
                "-p",
                &lab.bouncer.port().to_string(),
            ])
            .args(["-U", APP_USER, "app"])
            .env("PGPASSWORD", APP_PASSWORD)
            .env_remove("PGPASSFILE");
    };
    // The tables directly on the source (pgbench -i runs DDL), the keyless history made
    // replicable, then the load through PgBouncer.
    let mut init = Command::new(&pgbench);
    init.args(["-i", "-q", "-s", "2", "-h", lab.pair.source.host()])
        .args([
            "-p",
            &lab.pair.source.port().to_string(),
            "-U",
            APP_USER,
            "app",
        ])
        .env("PGPASSWORD", APP_PASSWORD);
    let done = init.output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    exec(
        &lab.pair.source,
        "app",
        "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY",
    )
    .await;

    let mut load = Command::new(&pgbench);
    load.args(["-n", "-M", "prepared", "-c", "4", "-T", "25"]);
    connection(&mut load);
    let load = load
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let run = lab.output(&lab.args("run", &[]));
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let finished = load.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&finished.stdout),
        String::from_utf8_lossy(&finished.stderr)
    );
    assert!(finished.status.success(), "pgbench failed:\n{said}");
    let (processed, failed) = pgbench_counts(&said);
    assert_eq!(failed, 0, "{said}");
    assert!(processed > 0, "{said}");
    // Each pgbench transaction inserts one history row: all of them are on the new server.
    let history: i64 = lab
        .pair
        .target
        .connect("app")
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(history, processed, "{said}");
}
