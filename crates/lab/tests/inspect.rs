//! Table checksums agree across majors for equal data and tell different data apart.

use pgshift_lab::inspect::table_checksums;
use pgshift_lab::testing::require_binaries;
use pgshift_lab::{PgServer, ServerOptions};

const DATA: &str = "
    CREATE TABLE items (id int PRIMARY KEY, price float8, at timestamptz, span interval,
                        blob bytea, amount numeric, tags text[]);
    INSERT INTO items VALUES
        (1, 0.1, '2024-01-02 03:04:05+02', '1 day 2 hours', '\\xdeadbeef', 12.50, '{a,b}'),
        (2, 1e300, NULL, NULL, NULL, NULL, NULL);
    CREATE SCHEMA pgshift_meta;
    CREATE TABLE pgshift_meta.marker (id int);";

#[tokio::test]
async fn equal_data_has_equal_checksums_across_majors() {
    require_binaries();
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = tokio::join!(
        PgServer::start(
            ServerOptions::new(13, dir.path(), "old").setting("timezone", "Asia/Tokyo")
        ),
        PgServer::start(ServerOptions::new(18, dir.path(), "new")),
    );
    let (old, new) = (old.unwrap(), new.unwrap());
    let old_client = old.connect("postgres").await.unwrap();
    let new_client = new.connect("postgres").await.unwrap();
    old_client.batch_execute(DATA).await.unwrap();
    new_client.batch_execute(DATA).await.unwrap();

    let old_sums = table_checksums(&old_client).await.unwrap();
    let new_sums = table_checksums(&new_client).await.unwrap();
    assert_eq!(old_sums.keys().collect::<Vec<_>>(), vec!["public.items"]);
    assert_eq!(old_sums["public.items"].rows, 2);
    assert_eq!(old_sums, new_sums);

    // The caller's session settings are untouched.
    let tz = old_client.query_one("SHOW TimeZone", &[]).await.unwrap();
    assert_eq!(tz.get::<_, String>(0), "Asia/Tokyo");

    new_client
        .batch_execute("UPDATE items SET price = 0.2 WHERE id = 1")
        .await
        .unwrap();
    let changed = table_checksums(&new_client).await.unwrap();
    assert_ne!(old_sums["public.items"], changed["public.items"]);
}
