//! What PgBouncer's transaction pooling does to session state, measured through the lab's
//! PgBouncer (1.24.1) in front of a real PostgreSQL 18: the user guide's section "Session state
//! and transaction pooling" states what these tests assert.
//!
//! Each test runs two clients, A and B, through a pool of two server connections. A leaves
//! state in its server connection S1; B then opens a transaction and, S1 being the only idle
//! server connection, gets S1; A's next transaction then needs another server connection, S2.
//! Every step checks the server pid it ran on, so the test says so if PgBouncer assigns
//! connections differently.

use std::time::Duration;

use futures_util::StreamExt;
use pgshift_lab::testing::require_binaries;
use pgshift_lab::{BouncerDatabase, BouncerOptions, PgBouncer, PgServer, ServerOptions};
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage};

struct Pooled {
    server: PgServer,
    bouncer: PgBouncer,
    _dir: tempfile::TempDir,
}

/// PostgreSQL 18 with database `app`, and PgBouncer in front of it (transaction mode, two
/// server connections) with `settings` on top.
async fn pooled(settings: &[(&str, &str)]) -> Pooled {
    require_binaries();
    let dir = tempfile::tempdir().unwrap();
    let server = PgServer::start(ServerOptions::new(18, dir.path(), "blue"))
        .await
        .unwrap();
    server.create_database("app").await.unwrap();
    let options = settings.iter().fold(
        BouncerOptions::new(
            dir.path(),
            vec![BouncerDatabase::for_server(&server, "app")],
        )
        .setting("default_pool_size", "2"),
        |options, (key, value)| options.setting(key, value),
    );
    let bouncer = PgBouncer::start(options).await.unwrap();
    Pooled {
        server,
        bouncer,
        _dir: dir,
    }
}

impl Pooled {
    /// A client through PgBouncer; notifications it receives go to the returned channel.
    async fn client(&self) -> (Client, mpsc::UnboundedReceiver<String>) {
        let (client, mut connection) = self
            .bouncer
            .client_config("app", self.server.superuser(), self.server.password())
            .connect(NoTls)
            .await
            .unwrap();
        let (sender, notifications) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(|cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(notification) = message {
                    let _ = sender.send(notification.payload().to_string());
                }
            }
        });
        (client, notifications)
    }

    async fn direct(&self) -> Client {
        self.server.connect("app").await.unwrap()
    }
}

/// The last row of a simple query, as text.
async fn row(client: &Client, sql: &str) -> Vec<String> {
    let messages = client.simple_query(sql).await.unwrap();
    let rows: Vec<Vec<String>> = messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or_default().to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    rows.last().cloned().unwrap_or_default()
}

/// B opens a transaction on S1, the server connection A just used; returns B's pid.
async fn hold_s1(b: &Client, s1: &str) {
    b.batch_execute("BEGIN").await.unwrap();
    let pid = row(b, "SELECT pg_backend_pid()").await;
    assert_eq!(
        pid[0], s1,
        "B was to get S1, the only idle server connection"
    );
}

/// A's statement on S2 while B holds S1.
fn on_s2(pid: &str, s1: &str) {
    assert_ne!(pid, s1, "A was to run on a second server connection");
}

#[tokio::test]
async fn a_set_stays_with_the_server_connection_but_pgbouncer_keeps_each_clients_timezone() {
    let lab = pooled(&[]).await;
    let (a, _) = lab.client().await;
    let (b, _) = lab.client().await;
    let s1 = row(
        &a,
        "SET statement_timeout = '1234ms'; SET TimeZone = 'Asia/Tokyo'; SELECT pg_backend_pid()",
    )
    .await[0]
        .clone();
    hold_s1(&b, &s1).await;
    // B gets A's statement_timeout: it leaked with the server connection. TimeZone is a
    // parameter PgBouncer tracks per client (the server reports it): B keeps its own.
    let seen_by_b = row(
        &b,
        "SELECT current_setting('statement_timeout'), current_setting('TimeZone')",
    )
    .await;
    assert_eq!(seen_by_b[0], "1234ms");
    assert_ne!(seen_by_b[1], "Asia/Tokyo");
    // A, on S2, has lost its statement_timeout and kept its TimeZone.
    let seen_by_a = row(
        &a,
        "SELECT pg_backend_pid(), current_setting('statement_timeout'), current_setting('TimeZone')",
    )
    .await;
    on_s2(&seen_by_a[0], &s1);
    assert_eq!(seen_by_a[1], "0");
    assert_eq!(seen_by_a[2], "Asia/Tokyo");
    b.batch_execute("COMMIT").await.unwrap();
    // SET LOCAL lasts for its transaction only: the way that works under pooling.
    let local = row(
        &a,
        "BEGIN; SET LOCAL statement_timeout = '777ms'; SELECT current_setting('statement_timeout'); COMMIT",
    )
    .await;
    assert_eq!(local, ["777ms"]);
}

#[tokio::test]
async fn a_session_advisory_lock_belongs_to_the_server_connection_and_outlives_its_client() {
    let lab = pooled(&[]).await;
    let (a, _) = lab.client().await;
    let (b, _) = lab.client().await;
    let s1 = row(&a, "SELECT pg_advisory_lock(42); SELECT pg_backend_pid()").await[0].clone();
    hold_s1(&b, &s1).await;
    // B, another client, "takes" the lock A holds: it is S1's, and S1 holds it already.
    assert_eq!(row(&b, "SELECT pg_try_advisory_lock(42)").await, ["t"]);
    // A cannot release it from S2.
    let unlock = row(&a, "SELECT pg_backend_pid(), pg_advisory_unlock(42)").await;
    on_s2(&unlock[0], &s1);
    assert_eq!(unlock[1], "f");
    b.batch_execute("COMMIT").await.unwrap();
    drop((a, b));
    // Both clients are gone; PgBouncer's idle S1 still holds the lock.
    let direct = lab.direct().await;
    let held = row(
        &direct,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 42 AND granted",
    )
    .await;
    assert_eq!(held, ["1"]);
    assert_eq!(row(&direct, "SELECT pg_try_advisory_lock(42)").await, ["f"]);
    // A transaction-level lock ends with its transaction: the way that works under pooling.
    let (c, _) = lab.client().await;
    c.batch_execute("BEGIN; SELECT pg_advisory_xact_lock(7)")
        .await
        .unwrap();
    assert_eq!(row(&direct, "SELECT pg_try_advisory_lock(7)").await, ["f"]);
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(row(&direct, "SELECT pg_try_advisory_lock(7)").await, ["t"]);
}

#[tokio::test]
async fn a_notification_for_a_listen_through_transaction_pooling_reaches_no_client() {
    let lab = pooled(&[]).await;
    let (a, mut a_notified) = lab.client().await;
    let (b, mut b_notified) = lab.client().await;
    let s1 = row(&a, "LISTEN orders; SELECT pg_backend_pid()").await[0].clone();
    let direct = lab.direct().await;
    // What preflight reads: the listening server session's last statement.
    let last = row(
        &direct,
        &format!("SELECT state, query FROM pg_stat_activity WHERE pid = {s1}"),
    )
    .await;
    assert_eq!(last, ["idle", "LISTEN orders; SELECT pg_backend_pid()"]);
    direct
        .batch_execute("NOTIFY orders, 'first'")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    hold_s1(&b, &s1).await;
    row(&b, "SELECT 1").await;
    let on = row(&a, "SELECT pg_backend_pid()").await;
    on_s2(&on[0], &s1);
    b.batch_execute("COMMIT").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let drain = |notified: &mut mpsc::UnboundedReceiver<String>| {
        std::iter::from_fn(|| notified.try_recv().ok()).collect::<Vec<String>>()
    };
    let (heard_by_a, heard_by_b) = (drain(&mut a_notified), drain(&mut b_notified));
    // It reached S1 while S1 sat idle in the pool: neither the client that listened nor the
    // one that got S1 next receives it.
    assert!(
        heard_by_a.is_empty() && heard_by_b.is_empty(),
        "A heard {heard_by_a:?}, B heard {heard_by_b:?}"
    );
    // Directly, the same LISTEN receives it.
    let (listener, mut connection) = lab.server.config("app").connect(NoTls).await.unwrap();
    let (sender, mut notified) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(|cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(notification) = message {
                let _ = sender.send(notification.payload().to_string());
            }
        }
    });
    listener.batch_execute("LISTEN orders").await.unwrap();
    // NOTIFY through PgBouncer works: it is part of a transaction.
    a.batch_execute("NOTIFY orders, 'second'").await.unwrap();
    let payload = tokio::time::timeout(Duration::from_secs(30), notified.recv())
        .await
        .expect("the direct listener receives the notification");
    assert_eq!(payload.as_deref(), Some("second"));
}

#[tokio::test]
async fn a_temporary_table_belongs_to_the_server_connection() {
    let lab = pooled(&[]).await;
    let (a, _) = lab.client().await;
    let (b, _) = lab.client().await;
    let s1 = row(
        &a,
        "CREATE TEMP TABLE scratch (x int); INSERT INTO scratch VALUES (1); SELECT pg_backend_pid()",
    )
    .await[0]
        .clone();
    hold_s1(&b, &s1).await;
    // B sees A's temporary table.
    assert_eq!(row(&b, "SELECT count(*) FROM scratch").await, ["1"]);
    // A, on S2, does not.
    let missing = a
        .simple_query("SELECT count(*) FROM scratch")
        .await
        .unwrap_err();
    assert_eq!(
        missing.code(),
        Some(&SqlState::UNDEFINED_TABLE),
        "{missing}"
    );
    b.batch_execute("COMMIT").await.unwrap();
    // What preflight reads from PostgreSQL 16 on: the pg_temp_N schema names its session.
    let owner = row(
        &lab.direct().await,
        "SELECT pg_stat_get_backend_pid(substr(n.nspname, 9)::int) FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relname = 'scratch'",
    )
    .await;
    assert_eq!(owner, [s1]);
    // Inside one transaction a temporary table works: the way that works under pooling.
    let within = row(
        &a,
        "BEGIN; CREATE TEMP TABLE t (x int) ON COMMIT DROP; INSERT INTO t VALUES (1), (2);
         SELECT count(*) FROM t; COMMIT",
    )
    .await;
    assert_eq!(within, ["2"]);
}

/// A prepares a statement (protocol level) on S1 and runs it again on S2.
async fn prepared_statement_on_another_connection(
    lab: &Pooled,
) -> Result<(), tokio_postgres::Error> {
    let (a, _) = lab.client().await;
    let (b, _) = lab.client().await;
    let statement = a.prepare("SELECT pg_backend_pid()").await.unwrap();
    let s1: i32 = a.query_one(&statement, &[]).await.unwrap().get(0);
    hold_s1(&b, &s1.to_string()).await;
    let outcome = a.query_one(&statement, &[]).await.map(|row| {
        on_s2(&row.get::<_, i32>(0).to_string(), &s1.to_string());
    });
    b.batch_execute("COMMIT").await.unwrap();
    outcome
}

#[tokio::test]
async fn prepared_statements_move_between_server_connections_with_max_prepared_statements() {
    let tracking = pooled(&[("max_prepared_statements", "200")]).await;
    prepared_statement_on_another_connection(&tracking)
        .await
        .expect("PgBouncer prepares the statement again on S2");
    // An SQL-level PREPARE is not tracked: it stays on S1.
    let (a, _) = tracking.client().await;
    let (b, _) = tracking.client().await;
    let s1 = row(&a, "PREPARE q AS SELECT 1; SELECT pg_backend_pid()").await[0].clone();
    hold_s1(&b, &s1).await;
    let missing = a.simple_query("EXECUTE q").await.unwrap_err();
    assert_eq!(
        missing.code(),
        Some(&SqlState::INVALID_SQL_STATEMENT_NAME),
        "{missing}"
    );
    b.batch_execute("COMMIT").await.unwrap();

    let untracked = pooled(&[("max_prepared_statements", "0")]).await;
    let missing = prepared_statement_on_another_connection(&untracked)
        .await
        .expect_err("without tracking S2 lacks the statement");
    assert_eq!(
        missing.code(),
        Some(&SqlState::INVALID_SQL_STATEMENT_NAME),
        "{missing}"
    );
}

#[tokio::test]
async fn pause_in_session_mode_waits_for_each_client_to_disconnect() {
    let lab = pooled(&[("pool_mode", "session")]).await;
    let (a, _) = lab.client().await;
    row(&a, "SELECT 1").await;
    let admin = lab.bouncer.admin_connect().await.unwrap();
    let mut pause = tokio::spawn(async move { admin.simple_query("PAUSE").await.map(|_| admin) });
    // An idle client in session mode keeps its server connection: PAUSE does not finish.
    assert!(
        tokio::time::timeout(Duration::from_secs(3), &mut pause)
            .await
            .is_err(),
        "PAUSE finished with a client connected in session mode"
    );
    drop(a);
    let admin = tokio::time::timeout(Duration::from_secs(30), pause)
        .await
        .expect("PAUSE finishes once the client disconnected")
        .unwrap()
        .unwrap();
    admin.simple_query("RESUME").await.unwrap();

    // In transaction mode the same idle client does not hold PAUSE.
    let lab = pooled(&[]).await;
    let (a, _) = lab.client().await;
    row(&a, "SELECT 1").await;
    let admin = lab.bouncer.admin_connect().await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), admin.simple_query("PAUSE"))
        .await
        .expect("PAUSE finishes with an idle client in transaction mode")
        .unwrap();
    admin.simple_query("RESUME").await.unwrap();
    row(&a, "SELECT 1").await;
}
