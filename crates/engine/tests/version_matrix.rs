//! Every supported source major upgraded to 18 (and 13 to 15) on real servers: the contents of
//! every table are equal on both sides afterwards, and the new server takes inserts into every
//! serial and identity table (no duplicate key from a stale sequence). The oldest sources (10,
//! 11, 12), whose publishers behave differently, are in [`old_publishers`].

mod common;

use common::{checksums, exec, pair, plan, RICH_SCHEMA};
use pgshift_engine::{events, Databases, Phase, Upgrade};

/// What the schema step defers until after the initial copy: secondary indexes (a partial
/// and an expression one), a unique constraint, a partitioned index, a unique index that is a
/// table's replica identity (built before the copy: apply needs it), a comment on an index.
const DEFERRED_STRUCTURES: &str = "
    CREATE INDEX orders_by_amount ON orders (amount);
    CREATE INDEX customers_by_lower_name ON customers (lower(name)) WHERE profile IS NOT NULL;
    ALTER TABLE order_lines ADD CONSTRAINT order_lines_sku_unique UNIQUE (order_id, line, sku);
    CREATE INDEX measurements_by_value ON measurements (value);
    CREATE TABLE ratings (customer_id int NOT NULL, stars int NOT NULL);
    CREATE UNIQUE INDEX ratings_customer ON ratings (customer_id);
    ALTER TABLE ratings REPLICA IDENTITY USING INDEX ratings_customer;
    INSERT INTO ratings SELECT g, g % 5 FROM generate_series(1, 200) g;
    COMMENT ON INDEX orders_by_amount IS 'for the reports';";

const SECOND_DB_SCHEMA: &str = "
    CREATE TABLE notes (id bigserial PRIMARY KEY, body text NOT NULL);
    INSERT INTO notes (body) SELECT 'note ' || g FROM generate_series(1, 300) g;";

async fn upgrade_and_compare(source_major: u32, target_major: u32) {
    let pair = pair(source_major, target_major).await;
    pair.source.create_database("shop").await.unwrap();
    pair.source.create_database("crm").await.unwrap();
    exec(&pair.source, "shop", RICH_SCHEMA).await;
    exec(&pair.source, "shop", DEFERRED_STRUCTURES).await;
    exec(&pair.source, "crm", SECOND_DB_SCHEMA).await;
    // A database owned by a role the target does not have yet: the role comes first.
    exec(
        &pair.source,
        "postgres",
        "CREATE ROLE shop_owner; ALTER DATABASE shop OWNER TO shop_owner",
    )
    .await;

    let mut plan = plan(&pair, "shop");
    plan.databases = Databases::Named(vec!["shop".into(), "crm".into()]);
    let mut upgrade = Upgrade::connect(plan, events::discard()).await.unwrap();
    let outcome = upgrade.run().await.unwrap();
    assert_eq!(outcome.finished, Phase::WindowOpen);
    let cutover = outcome.cutover.expect("a cutover ran");
    // customers_id_seq, orders_id_seq, measurements_id_seq, invoice_numbers (owned by no column), notes_id_seq
    assert_eq!(cutover.sequences_synced, 5, "{cutover:?}");

    for db in ["shop", "crm"] {
        let (source, target) = (
            checksums(&pair.source, db).await,
            checksums(&pair.target, db).await,
        );
        assert!(!source.is_empty());
        assert_eq!(
            source, target,
            "contents of {db} differ after {source_major} -> {target_major}"
        );
        // Indexes and constraints were built after the copy: all of them, as on the source.
        assert_eq!(
            common::structures(&pair.source, db).await,
            common::structures(&pair.target, db).await,
            "indexes, constraints, triggers or policies of {db} differ after {source_major} -> {target_major}"
        );
    }

    // The new server takes writes on every table whose key comes from a sequence.
    exec(
        &pair.target,
        "shop",
        "INSERT INTO customers (name) VALUES ('after upgrade');
         INSERT INTO orders (customer_id, amount, quantity) VALUES (1, 5, 2);
         INSERT INTO measurements (taken, value) VALUES ('2026-05-05', 1);
         INSERT INTO billing.invoices (order_id) VALUES (1);",
    )
    .await;
    exec(
        &pair.target,
        "crm",
        "INSERT INTO notes (body) VALUES ('after upgrade')",
    )
    .await;

    let target = pair.target.connect("shop").await.unwrap();
    let row = target
        .query_one(
            "SELECT (SELECT count(*) FROM customer_totals), (SELECT count(*) FROM big_orders),
                    has_table_privilege('reporting', 'billing.invoices', 'SELECT'),
                    (SELECT count(*) FROM audit_log WHERE message = 'order ' || (SELECT max(id) FROM orders))",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i64>(0),
        500,
        "materialized view filled on the target"
    );
    assert!(row.get::<_, i64>(1) > 0, "view answers");
    assert!(row.get::<_, bool>(2), "role and grants copied");
    assert_eq!(row.get::<_, i64>(3), 1, "trigger fires on the target");
    let owner: String = target
        .query_one(
            "SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = 'shop'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, "shop_owner", "the database keeps its owner");
}

#[tokio::test]
async fn upgrade_13_to_18() {
    upgrade_and_compare(13, 18).await;
}

#[tokio::test]
async fn upgrade_14_to_18() {
    upgrade_and_compare(14, 18).await;
}

#[tokio::test]
async fn upgrade_15_to_18() {
    upgrade_and_compare(15, 18).await;
}

#[tokio::test]
async fn upgrade_16_to_18() {
    upgrade_and_compare(16, 18).await;
}

#[tokio::test]
async fn upgrade_17_to_18() {
    upgrade_and_compare(17, 18).await;
}

#[tokio::test]
async fn upgrade_13_to_15() {
    upgrade_and_compare(13, 15).await;
}

/// Sources 10, 11 and 12 upgraded to 18 (and 10 to 15) under a write load through PgBouncer,
/// with the rich schema as each major can hold it, then rolled back through the rollback window
/// to the old major: after the cutover and again after the rollback the contents of every
/// table and every sequence are equal on both sides, and no client transaction failed or was
/// lost.
///
/// During replication (source → target) and again in the window (target → source) each test
/// writes what behaves differently on old publishers: UPDATE and DELETE on a REPLICA IDENTITY
/// FULL table, rows moved to another partition (partitions are published as their leaves before
/// 13, and PostgreSQL 10 cannot move a row by UPDATE at all), TRUNCATE (PostgreSQL 10 neither
/// sends nor applies it: preflight warns, and the test holds it to its word), and nextval on a
/// sequence owned by no column (copied at the cutover).
mod old_publishers {
    use std::time::{Duration, Instant};

    use super::common::{
        self, bouncer_for, caught_up, checksums, exec, ledger_database, pair, pgbouncer_traffic,
        plan, rich_schema, through,
    };
    use super::SECOND_DB_SCHEMA;
    use pgshift_engine::{events, CutoverMode, Databases, Phase, Upgrade};
    use pgshift_lab::ledger::{Ledger, LoadOptions};
    use pgshift_lab::PgServer;

    /// The databases compared table by table; `app` (the ledger the clients write) is verified
    /// by the ledger.
    const COMPARED: [&str; 2] = ["shop", "crm"];

    /// Ledger clients writing through PgBouncer for the whole test.
    const CLIENTS: usize = 4;

    /// What preflight says about a source of an old major.
    const MAJOR_WARNINGS: [&str; 2] = ["truncate_not_replicated", "window_truncate"];

    /// What PostgreSQL 10's apply worker logs for a TRUNCATE message.
    const TRUNCATE_NOT_APPLIED: &str = "invalid logical replication message type";

    async fn count(server: &PgServer, db: &str, query: &str) -> i64 {
        server
            .connect(db)
            .await
            .unwrap()
            .query_one(query, &[])
            .await
            .unwrap_or_else(|e| panic!("{query}: {e:?}"))
            .get(0)
    }

    /// The end of a server's current log file.
    async fn server_log(server: &PgServer) -> String {
        server
            .connect("postgres")
            .await
            .unwrap()
            .query_one(
                "SELECT pg_read_file(f, greatest((pg_stat_file(f)).size - 65536, 0), 65536) FROM pg_current_logfile() f",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Every sequence of a database with its last value (None: never used).
    async fn sequences(server: &PgServer, db: &str) -> Vec<(String, Option<i64>)> {
        server
            .connect(db)
            .await
            .unwrap()
            .query(
                "SELECT format('%I.%I', schemaname, sequencename), last_value FROM pg_sequences
                 WHERE schemaname <> 'pgshift_meta' ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// Both servers hold the same rows in every table and the same sequence values; returns
    /// the number of rows.
    async fn assert_same(from: &PgServer, to: &PgServer, when: &str) -> i64 {
        let mut rows = 0;
        for db in COMPARED {
            let (expected, found) = (checksums(from, db).await, checksums(to, db).await);
            assert!(!expected.is_empty());
            assert_eq!(expected, found, "contents of {db} differ {when}");
            rows += expected.values().map(|(count, _)| count).sum::<i64>();
            assert_eq!(
                sequences(from, db).await,
                sequences(to, db).await,
                "sequences of {db} differ {when}"
            );
        }
        rows
    }

    /// On the source while the forward stream runs: what old publishers send differently.
    async fn write_during_replication(source: &PgServer, target: &PgServer, major: u32) {
        exec(
            source,
            "shop",
            "UPDATE audit_log SET message = message || ' (seen)' WHERE message LIKE 'order 1_';
             DELETE FROM audit_log WHERE message LIKE 'order 2_';
             SELECT nextval('invoice_numbers') FROM generate_series(1, 25);",
        )
        .await;
        let moves = if major >= 11 {
            // Published as a DELETE on the old leaf and an INSERT on the new one.
            "UPDATE measurements SET taken = taken + 365 WHERE id <= 20;
             UPDATE measurements SET taken = '2030-01-01' WHERE id = 21;"
        } else {
            // PostgreSQL 10 refuses an UPDATE that moves a row to another partition.
            "WITH moved AS (DELETE FROM measurements WHERE id <= 20 RETURNING id, taken, value)
             INSERT INTO measurements SELECT id, taken + 365, value FROM moved;
             WITH moved AS (DELETE FROM measurements WHERE id = 21 RETURNING id, value)
             INSERT INTO measurements SELECT id, '2030-01-01', value FROM moved;"
        };
        exec(source, "shop", moves).await;

        exec(source, "shop", "TRUNCATE staging_imports").await;
        // Apply is in commit order: once this row is on the target, so is everything before it.
        exec(
            source,
            "shop",
            "INSERT INTO customers (name) VALUES ('after the truncate')",
        )
        .await;
        caught_up(source, target, "shop", "customers").await;
        let left = count(target, "shop", "SELECT count(*) FROM staging_imports").await;
        if major >= 11 {
            assert_eq!(left, 0, "the TRUNCATE reached the target");
        } else {
            assert_eq!(
                left, 100,
                "PostgreSQL 10 does not send TRUNCATE, as preflight warns"
            );
            // The warning's fix (two statements: a transaction that began read-only stays so).
            let client = target.connect("shop").await.unwrap();
            client
                .batch_execute("SET default_transaction_read_only = off")
                .await
                .unwrap();
            client
                .batch_execute("TRUNCATE staging_imports")
                .await
                .unwrap();
        }
        exec(
            source,
            "shop",
            "INSERT INTO staging_imports SELECT g, 'second import ' || g FROM generate_series(1, 40) g",
        )
        .await;
    }

    /// On the target in the rollback window, carried back to the old source: the new server
    /// takes writes on every table whose key comes from a sequence, and the same kinds of
    /// change as before the cutover.
    async fn write_in_window(target: &PgServer, major: u32) {
        exec(
            target,
            "shop",
            "INSERT INTO customers (name) VALUES ('after upgrade');
             INSERT INTO orders (customer_id, amount, quantity) VALUES (1, 5, 2);
             INSERT INTO measurements (taken, value) VALUES ('2026-05-05', 1);
             INSERT INTO billing.invoices (order_id) VALUES (1);
             UPDATE audit_log SET message = message || ' (again)' WHERE message LIKE 'order 3_';
             DELETE FROM audit_log WHERE message LIKE 'order 4_';
             UPDATE measurements SET taken = taken - 365 WHERE id BETWEEN 1 AND 10;
             SELECT nextval('invoice_numbers') FROM generate_series(1, 7);",
        )
        .await;
        exec(
            target,
            "crm",
            "INSERT INTO notes (body) VALUES ('after upgrade')",
        )
        .await;
        if major >= 11 {
            // A source of 10 cannot apply a TRUNCATE: `a_truncate_in_the_window_stops_a_10_back_stream`.
            exec(
                target,
                "shop",
                "TRUNCATE staging_imports; INSERT INTO staging_imports VALUES (1, 'third import');
                 CALL issue_invoice(2);",
            )
            .await;
        }
    }

    async fn upgrade_and_roll_back(source_major: u32, target_major: u32) {
        let started = Instant::now();
        let pair = pair(source_major, target_major).await;
        for db in COMPARED {
            pair.source.create_database(db).await.unwrap();
        }
        exec(&pair.source, "shop", &rich_schema(source_major)).await;
        exec(&pair.source, "crm", SECOND_DB_SCHEMA).await;
        // A database owned by a role the target does not have yet: the role comes first.
        exec(
            &pair.source,
            "postgres",
            "CREATE ROLE shop_owner; ALTER DATABASE shop OWNER TO shop_owner",
        )
        .await;
        ledger_database(&pair).await;
        let bouncer = bouncer_for(&pair).await;
        let load = Ledger::run(through(&bouncer), LoadOptions::new(CLIENTS));

        let mut plan = plan(&pair, "shop");
        plan.databases = Databases::Named(vec!["shop".into(), "crm".into(), "app".into()]);
        plan.traffic = pgbouncer_traffic(&bouncer);
        plan.cutover = CutoverMode::Manual;
        let mut upgrade = Upgrade::connect(plan, events::discard()).await.unwrap();

        let report = upgrade.preflight().await.unwrap();
        assert!(report.ready(), "{:?}", report.blockers);
        let major_warnings: Vec<&str> = report
            .warnings
            .iter()
            .map(|w| w.code)
            .filter(|code| MAJOR_WARNINGS.contains(code))
            .collect();
        let expected: &[&str] = if source_major == 10 {
            &MAJOR_WARNINGS
        } else {
            &[]
        };
        assert_eq!(major_warnings, expected, "{:?}", report.warnings);

        let outcome = upgrade.run().await.unwrap();
        assert_eq!(outcome.finished, Phase::ReadyForCutover);
        write_during_replication(&pair.source, &pair.target, source_major).await;

        let forward = upgrade.cutover_now().await.unwrap();
        assert_eq!(upgrade.status().await.unwrap().phase, Phase::WindowOpen);
        let rows = assert_same(&pair.source, &pair.target, "after the cutover").await;
        let target = pair.target.connect("shop").await.unwrap();
        let row = target
            .query_one(
                "SELECT (SELECT count(*) FROM customer_totals), (SELECT count(*) FROM big_orders),
                        has_table_privilege('reporting', 'billing.invoices', 'SELECT'),
                        (SELECT count(*) FROM staging_imports),
                        (SELECT count(*) FROM measurements_2026 WHERE id <= 20),
                        (SELECT count(*) FROM measurements_other WHERE id = 21),
                        (SELECT count(*) FROM audit_log WHERE message LIKE '% (seen)'),
                        (SELECT count(*) FROM audit_log WHERE message LIKE 'order 2_'),
                        (SELECT last_value FROM invoice_numbers)",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), 500, "materialized view refreshed");
        assert!(row.get::<_, i64>(1) > 0, "view answers");
        assert!(row.get::<_, bool>(2), "role and grants copied");
        assert_eq!(row.get::<_, i64>(3), 40, "truncated, then imported again");
        assert_eq!(row.get::<_, i64>(4), 20, "rows moved to the 2026 partition");
        assert_eq!(row.get::<_, i64>(5), 1, "a row moved to the last partition");
        assert_eq!(row.get::<_, i64>(6), 10, "REPLICA IDENTITY FULL update");
        assert_eq!(row.get::<_, i64>(7), 0, "REPLICA IDENTITY FULL delete");
        // 1000..1199 by the invoices, one nextval in the fixture, 25 during replication.
        assert_eq!(row.get::<_, i64>(8), 1225, "the unowned sequence's value");
        let owner: String = target
            .query_one(
                "SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = 'shop'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(owner, "shop_owner", "the database keeps its owner");

        write_in_window(&pair.target, source_major).await;
        let audited = count(
            &pair.target,
            "shop",
            "SELECT count(*) FROM audit_log WHERE message = 'order ' || (SELECT max(id) FROM orders)",
        )
        .await;
        assert_eq!(audited, 1, "the trigger fires on the target");

        let back = match upgrade.rollback_now().await {
            Ok(report) => report.expect("a rollback ran"),
            Err(e) => panic!(
                "{e}\nsource log:\n{}",
                tail(&server_log(&pair.source).await)
            ),
        };
        assert_eq!(
            upgrade.status().await.unwrap().phase,
            Phase::ReadyForCutover
        );
        assert_same(&pair.target, &pair.source, "after the rollback").await;

        let mut serving = &pair.source;
        if source_major == 10 {
            a_truncate_in_the_window_stops_a_10_back_stream(&mut upgrade, &pair).await;
            serving = &pair.target;
        }

        tokio::time::sleep(Duration::from_millis(500)).await;
        let report = load.stop().await;
        let verification = Ledger::verify(&serving.connect("app").await.unwrap(), &report)
            .await
            .unwrap();
        assert!(report.committed > 100, "the load ran: {report:?}");
        assert_eq!(report.failed, 0, "client errors: {:?}", report.errors);
        assert_eq!(report.in_doubt, 0, "{:?}", report.errors);
        assert_eq!(verification.lost, 0, "{verification:?}");
        assert_eq!(verification.duplicated, 0, "{verification:?}");
        assert!(verification.invariant_holds, "{verification:?}");

        eprintln!(
            "PostgreSQL {} -> {}: {rows} rows in shop and crm, cutover pause {:.1} ms ({} sequences), \
             rollback pause {:.1} ms; {} ledger transactions committed through PgBouncer, {} failed, {} lost; \
             {:.1} s in all",
            pair.source.version(),
            pair.target.version(),
            forward.pause_ms,
            forward.sequences_synced,
            back.pause_ms,
            report.committed,
            report.failed,
            verification.lost,
            started.elapsed().as_secs_f64()
        );
    }

    /// PostgreSQL 10 cannot apply the TRUNCATE message a newer publisher sends: a TRUNCATE on
    /// the new server in the window stops the back stream (preflight's `window_truncate`), and
    /// a rollback is then refused, with the cause, and the new server keeps serving.
    async fn a_truncate_in_the_window_stops_a_10_back_stream(
        upgrade: &mut Upgrade,
        pair: &common::Pair,
    ) {
        upgrade.cutover_now().await.unwrap();
        exec(&pair.target, "shop", "TRUNCATE staging_imports").await;
        let until = Instant::now() + Duration::from_secs(60);
        while !server_log(&pair.source)
            .await
            .contains(TRUNCATE_NOT_APPLIED)
        {
            assert!(Instant::now() < until, "the back stream still applies");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let refused = upgrade.rollback_now().await.unwrap_err().to_string();
        assert!(refused.contains(TRUNCATE_NOT_APPLIED), "{refused}");
        assert_eq!(upgrade.status().await.unwrap().phase, Phase::WindowOpen);
    }

    fn tail(log: &str) -> String {
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    #[tokio::test]
    async fn upgrade_10_to_18() {
        upgrade_and_roll_back(10, 18).await;
    }

    #[tokio::test]
    async fn upgrade_11_to_18() {
        upgrade_and_roll_back(11, 18).await;
    }

    #[tokio::test]
    async fn upgrade_12_to_18() {
        upgrade_and_roll_back(12, 18).await;
    }

    /// To targets that are not the newest: the schema is copied with the target's pg_dump (the
    /// lab has client tools for 15, 16 and 18).
    #[tokio::test]
    async fn upgrade_10_to_15() {
        upgrade_and_roll_back(10, 15).await;
    }

    #[tokio::test]
    async fn upgrade_12_to_16() {
        upgrade_and_roll_back(12, 16).await;
    }
}
