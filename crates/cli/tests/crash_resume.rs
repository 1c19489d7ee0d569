//! The pgshift process is killed (SIGKILL) at each phase boundary, in the middle of the initial
//! copy and inside the cutover (after PAUSE, before RESUME), while clients write through
//! PgBouncer. Each time, running it again carries on; at the end nothing is lost, no
//! transaction failed and no client stayed paused for longer than the restart took.

#[path = "../../engine/tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{bouncer_for, exec, ledger_database, pair, through};
use pgshift_lab::ledger::{Ledger, LoadOptions};

/// Stderr lines of `pgshift run` at which the process is killed, in the order they come.
const KILL_POINTS: [&str; 8] = [
    "phase: schema",
    "app: CopySchema",
    "app: ProtectTarget",
    "app: CreateSlot",
    "app: CreateSubscription",
    "initial copy",
    "phase: catch_up",
    "cutover: fence",
];

#[tokio::test]
async fn killed_at_every_step_it_resumes_and_loses_nothing() {
    let pair = pair(15, 18).await;
    ledger_database(&pair).await;
    // Enough rows that the initial copy is still running when the process is killed.
    exec(
        &pair.source,
        "app",
        "CREATE TABLE big (id bigserial PRIMARY KEY, payload text);
         INSERT INTO big (payload) SELECT repeat(md5(g::text), 8) FROM generate_series(1, 400000) g;",
    )
    .await;
    let bouncer = bouncer_for(&pair).await;
    let pgpass = pair.dir.path().join("pgpass");
    pgshift_lab::write_pgpass(&pgpass, &[&pair.source, &pair.target]).unwrap();
    let mut entries = std::fs::read_to_string(&pgpass).unwrap();
    entries.push_str(&bouncer.admin_pgpass_entry().line());
    entries.push('\n');
    std::fs::write(&pgpass, entries).unwrap();

    let load = Ledger::run(through(&bouncer), LoadOptions::new(4));
    let source = format!("postgres://postgres@127.0.0.1:{}/app", pair.source.port());
    let target = format!("postgres://postgres@127.0.0.1:{}/app", pair.target.port());
    let bin = pair.target.bin_dir().display().to_string();
    let config = bouncer.config_path().display().to_string();
    let admin = bouncer.admin_url();
    let args = [
        "run",
        "--source",
        &source,
        "--target",
        &target,
        "--pg-bin-dir",
        &bin,
        "--pgbouncer",
        &admin,
        "--pgbouncer-config",
        &config,
    ];

    for point in KILL_POINTS {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pgshift"))
            .args(args)
            .env("PGPASSFILE", &pgpass)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let mut seen = Vec::new();
        let mut killed = false;
        for line in stderr.lines() {
            let line = line.unwrap();
            seen.push(line.clone());
            if line.contains(point) {
                child.kill().unwrap(); // SIGKILL
                killed = true;
                break;
            }
        }
        let status = child.wait().unwrap();
        assert!(
            killed,
            "`{point}` never appeared; pgshift said:\n{}\n({status})",
            seen.join("\n")
        );
    }
    // The last run finds a fence held by a dead process, releases or completes it, and finishes.
    let finish = Command::new(env!("CARGO_BIN_EXE_pgshift"))
        .args(args)
        .env("PGPASSFILE", &pgpass)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&finish.stderr);
    assert!(finish.status.success(), "final run failed:\n{said}");
    assert!(String::from_utf8_lossy(&finish.stdout).contains("finished: done"));
    // The kill after PAUSE left a fence held by a dead process; this run found and handled it.
    assert!(
        said.contains("an interrupted cutover"),
        "no fence was recovered:\n{said}"
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = load.stop().await;
    let verification = Ledger::verify(&pair.target.connect("app").await.unwrap(), &report)
        .await
        .unwrap();
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert_eq!(verification.lost, 0, "{verification:?}");
    assert_eq!(
        verification.duplicated + verification.unexpected,
        0,
        "{verification:?}"
    );
    assert!(verification.invariant_holds);
    // Paused only while pgshift restarted (a generous bound: the failure it guards against is
    // clients paused until someone notices).
    assert!(
        report.max_ms < 10_000.0,
        "a client waited {} ms",
        report.max_ms
    );
    let admin = bouncer.admin_connect().await.unwrap();
    let rows = admin.simple_query("SHOW DATABASES").await.unwrap();
    for row in rows.iter().filter_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    }) {
        assert_eq!(
            row.get("paused"),
            Some("0"),
            "entry {:?} is still paused",
            row.get("name")
        );
    }
}
