//! Every supported source major upgraded to 18 (and 13 to 15) on real servers: the contents of
//! every table are equal on both sides afterwards, and the new server takes inserts into every
//! serial and identity table (no duplicate key from a stale sequence).

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
