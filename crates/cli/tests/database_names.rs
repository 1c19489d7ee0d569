//! Any database name PostgreSQL allows is moved, whatever it looks like to libpq: names with
//! `=` or a URL prefix are connection strings to pg_dump and psql unless they are passed as
//! the `dbname` value of one, and quotes, spaces and unicode must survive every hop (the
//! child tools, the subscription's conninfo, pgshift's own sessions).

#[path = "../../engine/tests/common/mod.rs"]
mod common;

use std::process::Output;

use common::{checksums, pair, pgshift_objects, Pair};
use pgshift_lab::{PgServer, ServerOptions};

/// Names that libpq would read as connection strings or that need quoting somewhere.
const AWKWARD_NAMES: &[&str] = &[
    "a=b",
    "dbname=other",
    "host=x",
    "it's \"quoted\"",
    "with space",
    "ünïcødé ☃",
    "postgresql://postgres@127.0.0.1:1/elsewhere",
    "back\\slash",
    "a,b",
];

/// Runs the pgshift binary with the pair's passwords in a pgpass file.
fn pgshift(pair: &Pair, args: &[&str]) -> Output {
    let pgpass = pair.dir.path().join("pgpass");
    pgshift_lab::write_pgpass(&pgpass, &[&pair.source, &pair.target]).unwrap();
    let source = pair.source.url("postgres");
    let target = pair.target.url("postgres");
    let bin = pair.target.bin_dir().display().to_string();
    std::process::Command::new(env!("CARGO_BIN_EXE_pgshift"))
        .args(args)
        .args(["--source", &source, "--target", &target])
        .args(["--pg-bin-dir", &bin])
        .env("PGPASSFILE", &pgpass)
        .env_remove("PGPASSWORD")
        .output()
        .expect("pgshift runs")
}

/// Every database of a server but the templates.
async fn databases(server: &PgServer) -> Vec<String> {
    server
        .connect("postgres")
        .await
        .unwrap()
        .query(
            "SELECT datname::text FROM pg_database WHERE NOT datistemplate ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A pair with room for a dozen subscriptions: a slot and two table-sync slots each on the
/// source, an apply worker and two sync workers each, with their origins, on the target.
async fn roomy_pair() -> Pair {
    pgshift_lab::testing::require_binaries();
    let dir = tempfile::tempdir().unwrap();
    let options = |major, name| {
        ServerOptions::new(major, dir.path().to_path_buf(), name)
            .setting("max_replication_slots", "60")
            .setting("max_wal_senders", "60")
            .setting("max_logical_replication_workers", "40")
            .setting("max_worker_processes", "48")
    };
    let (source, target) = tokio::join!(
        PgServer::start(options(15, "source")),
        // PostgreSQL 18 counts replication origins (one per subscription and sync worker) apart.
        PgServer::start(options(18, "target").setting("max_active_replication_origins", "60"))
    );
    Pair {
        source: source.unwrap(),
        target: target.unwrap(),
        dir,
    }
}

#[tokio::test]
async fn databases_with_any_name_are_upgraded() {
    let pair = roomy_pair().await;
    // `other` and `x` are what a name parsed as a connection string would reach instead.
    for name in AWKWARD_NAMES.iter().chain(&["other", "x"]) {
        pair.source.create_database(name).await.unwrap();
        let client = pair.source.connect(name).await.unwrap();
        client
            .batch_execute("CREATE TABLE items (id int PRIMARY KEY, db text NOT NULL)")
            .await
            .unwrap();
        client
            .execute(
                "INSERT INTO items SELECT g, current_database() FROM generate_series(1, 100) g",
                &[],
            )
            .await
            .unwrap();
    }

    let output = pgshift(&pair, &["run", "--all-databases"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "run failed:\n{stderr}");

    for name in AWKWARD_NAMES.iter().chain(&["other", "x"]) {
        let on_target = checksums(&pair.target, name).await;
        assert_eq!(
            checksums(&pair.source, name).await,
            on_target,
            "contents of {name:?} differ"
        );
        // Each database's rows, and only its own, arrived in the database of that name.
        let client = pair.target.connect(name).await.unwrap();
        let row = client
            .query_one(
                "SELECT count(*), bool_and(db = current_database()) FROM items",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            (row.get::<_, i64>(0), row.get::<_, Option<bool>>(1)),
            (100, Some(true)),
            "{name:?}"
        );
    }
}

#[tokio::test]
async fn a_missing_database_whose_name_is_a_connection_string_is_refused() {
    let pair = pair(15, 18).await;
    // Read as a connection string, `dbname=other` would be this existing database.
    pair.source.create_database("other").await.unwrap();
    common::exec(
        &pair.source,
        "other",
        "CREATE TABLE items (id int PRIMARY KEY)",
    )
    .await;
    let before = (databases(&pair.source).await, databases(&pair.target).await);

    let output = pgshift(&pair, &["run", "--databases", "dbname=other,a=b"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    for name in ["dbname=other", "a=b"] {
        assert!(
            stderr.contains(&format!("database {name} does not exist on the source")),
            "{stderr}"
        );
    }
    assert_eq!(
        (databases(&pair.source).await, databases(&pair.target).await),
        before,
        "a refused run created or dropped a database"
    );
    for server in [&pair.source, &pair.target] {
        let left = pgshift_objects(server, &["postgres", "other"]).await;
        assert!(left.is_empty(), "a refused run left {left:?}");
    }
}
