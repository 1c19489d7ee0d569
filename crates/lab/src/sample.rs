//! Sample data for the demo and the benchmarks: a pgbench-like schema, plus as many small
//! tables and used sequences as a run asks for (the cutover copies every sequence, so their
//! number matters).

use tokio_postgres::Client;

use crate::{Error, Result};

/// How much sample data to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleData {
    /// pgbench-like scale: 1,000 accounts and 10,000 history rows per unit (40 ≈ 50 MB).
    pub scale: u32,
    /// Small tables of 10 rows each (`extra_1`, …).
    pub extra_tables: u32,
    /// Sequences owned by no column, each used once (`extra_seq_1`, …).
    pub extra_sequences: u32,
}

impl SampleData {
    pub fn scale(scale: u32) -> Self {
        SampleData {
            scale,
            extra_tables: 0,
            extra_sequences: 0,
        }
    }
}

/// Creates and fills the sample tables in the connected database.
pub async fn load(client: &Client, data: SampleData) -> Result<()> {
    let pg = |context: &'static str| move |e| Error::pg(context, e);
    let scale = i64::from(data.scale.max(1));
    client
        .batch_execute(
            "CREATE TABLE branches (id int PRIMARY KEY, balance bigint NOT NULL DEFAULT 0, name text);
             CREATE TABLE accounts (id bigint PRIMARY KEY, branch_id int NOT NULL REFERENCES branches (id),
                                    balance bigint NOT NULL DEFAULT 0, filler text);
             CREATE TABLE history (id bigserial PRIMARY KEY, account_id bigint NOT NULL, delta int NOT NULL,
                                   at timestamptz NOT NULL DEFAULT '2026-01-01 00:00:00+00');",
        )
        .await
        .map_err(pg("cannot create the sample tables"))?;
    for (context, sql) in [
        ("cannot fill branches", "INSERT INTO branches (id, name) SELECT g, 'branch ' || g FROM generate_series(1, $1::int8) g"),
        ("cannot fill accounts", "INSERT INTO accounts (id, branch_id, filler) SELECT g, 1 + g % $1::int8, repeat('x', 80) FROM generate_series(1, $1::int8 * 1000) g"),
        ("cannot fill history", "INSERT INTO history (account_id, delta) SELECT 1 + g % ($1::int8 * 1000), g % 100 - 50 FROM generate_series(1, $1::int8 * 10000) g"),
    ] {
        client.execute(sql, &[&scale]).await.map_err(pg(context))?;
    }
    if data.extra_tables > 0 {
        client
            .batch_execute(&format!(
                "DO $$ BEGIN
                   FOR i IN 1..{} LOOP
                     EXECUTE format('CREATE TABLE extra_%s (id serial PRIMARY KEY, label text NOT NULL)', i);
                     EXECUTE format('INSERT INTO extra_%s (label) SELECT ''row '' || g FROM generate_series(1, 10) g', i);
                   END LOOP;
                 END $$",
                data.extra_tables
            ))
            .await
            .map_err(pg("cannot create the extra tables"))?;
    }
    if data.extra_sequences > 0 {
        client
            .batch_execute(&format!(
                "DO $$ BEGIN
                   FOR i IN 1..{} LOOP
                     EXECUTE format('CREATE SEQUENCE extra_seq_%s', i);
                     PERFORM setval(format('extra_seq_%s', i), i);
                   END LOOP;
                 END $$",
                data.extra_sequences
            ))
            .await
            .map_err(pg("cannot create the extra sequences"))?;
    }
    client
        .batch_execute("ANALYZE")
        .await
        .map_err(pg("cannot analyze the sample data"))
}
