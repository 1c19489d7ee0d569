//! Shared by the engine's integration tests: real servers from the lab, plans pointing at them,
//! and comparisons of what each side holds.
#![allow(dead_code)] // each test binary uses its own part of this module

use std::collections::BTreeMap;

use pgshift_engine::{Endpoint, Plan, Secret, Side};
use pgshift_lab::{PgServer, ServerOptions};
use tempfile::TempDir;

pub const RICH_SCHEMA: &str = include_str!("../fixtures/rich_schema.sql");

/// The rich schema as PostgreSQL `major` can hold it (the fixture's `--@N+` and `--@..N `
/// markers; [`RICH_SCHEMA`] as it stands is what 13 and later hold).
pub fn rich_schema(major: u32) -> String {
    RICH_SCHEMA
        .lines()
        .filter_map(|line| line_for_major(line, major))
        .collect::<Vec<_>>()
        .join("\n")
}

fn line_for_major(line: &str, major: u32) -> Option<&str> {
    let bound = |n: &str| -> u32 { n.parse().unwrap_or_else(|_| panic!("a major in: {line}")) };
    if let Some(marked) = line.strip_prefix("--@..") {
        let (upto, sql) = marked
            .split_once(' ')
            .unwrap_or_else(|| panic!("--@..N and a line: {line}"));
        return (major <= bound(upto)).then_some(sql);
    }
    match line.rsplit_once(" --@") {
        Some((sql, from)) => {
            let from = from
                .strip_suffix('+')
                .unwrap_or_else(|| panic!("--@N+ at the end: {line}"));
            (major >= bound(from)).then_some(sql)
        }
        None => Some(line),
    }
}

/// A source and a target server in one temporary directory.
pub struct Pair {
    pub source: PgServer,
    pub target: PgServer,
    pub dir: TempDir,
}

pub async fn pair(source_major: u32, target_major: u32) -> Pair {
    // Fails (not skips) with "run `cargo xtask test`" when the binaries are not installed.
    pgshift_lab::testing::require_binaries();
    let dir = tempfile::tempdir().expect("temporary directory");
    let (source, target) = tokio::join!(
        PgServer::start(ServerOptions::new(
            source_major,
            dir.path().to_path_buf(),
            "source"
        )),
        PgServer::start(ServerOptions::new(
            target_major,
            dir.path().to_path_buf(),
            "target"
        )),
    );
    Pair {
        source: source.expect("source server starts"),
        target: target.expect("target server starts"),
        dir,
    }
}

pub fn endpoint(server: &PgServer, side: Side, dbname: &str) -> Endpoint {
    Endpoint::new(
        side,
        server.host(),
        server.port(),
        server.superuser(),
        dbname,
        Some(Secret::new(server.password())),
    )
}

/// A plan for `pair` in direct mode, with the client tools of the target's major.
pub fn plan(pair: &Pair, dbname: &str) -> Plan {
    let mut plan = Plan::new(
        endpoint(&pair.source, Side::Source, dbname),
        endpoint(&pair.target, Side::Target, dbname),
    );
    plan.pg_bin_dir = Some(tools_for(&pair.target));
    plan
}

/// pg_dump and psql of the server's major (the lab installs them for 15, 16 and 18).
pub fn tools_for(server: &PgServer) -> std::path::PathBuf {
    pgshift_lab::Binaries::locate()
        .and_then(|binaries| binaries.client_tools(server.major()))
        .unwrap_or_else(|e| panic!("{e}"))
}

pub async fn exec(server: &PgServer, db: &str, sql: &str) {
    let client = server.connect(db).await.expect("connect");
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
}

/// Every user table of a database with an order-independent checksum of its rows.
pub async fn checksums(server: &PgServer, db: &str) -> BTreeMap<String, (i64, String)> {
    let client = server.connect(db).await.expect("connect");
    client
        .batch_execute("SET TimeZone = 'UTC'; SET extra_float_digits = 1")
        .await
        .unwrap();
    let tables: Vec<String> = client
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgshift_meta')
               AND n.nspname NOT LIKE 'pg\\_toast%' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut sums = BTreeMap::new();
    for table in tables {
        let row = client
            .query_one(
                &format!("SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t"),
                &[],
            )
            .await
            .unwrap();
        sums.insert(table, (row.get(0), row.get(1)));
    }
    sums
}

/// Names of pgshift's objects left on a server (slots, publications, subscriptions, schemas).
pub async fn pgshift_objects(server: &PgServer, dbs: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    let admin = server.connect("postgres").await.expect("connect");
    for row in admin
        .query("SELECT 'slot ' || slot_name FROM pg_replication_slots", &[])
        .await
        .unwrap()
    {
        found.push(row.get(0));
    }
    for db in dbs {
        let exists: bool = admin
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
                &[db],
            )
            .await
            .unwrap()
            .get(0);
        if !exists {
            continue;
        }
        let client = server.connect(db).await.expect("connect");
        for row in client
            .query(
                "SELECT 'publication ' || pubname FROM pg_publication
                 UNION ALL SELECT 'subscription ' || subname FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                 UNION ALL SELECT 'schema ' || nspname FROM pg_namespace WHERE nspname LIKE 'pgshift%'
                 UNION ALL SELECT 'setting ' || array_to_string(setconfig, ',') FROM pg_db_role_setting s
                           JOIN pg_database d ON d.oid = s.setdatabase WHERE d.datname = current_database()",
                &[],
            )
            .await
            .unwrap()
        {
            found.push(format!("{db}: {}", row.get::<_, String>(0)));
        }
    }
    found
}

/// The traffic plan for a lab PgBouncer whose entry `app` points at the source.
pub fn pgbouncer_traffic(bouncer: &pgshift_lab::PgBouncer) -> pgshift_engine::Traffic {
    let admin = Endpoint::new(
        Side::Pgbouncer,
        bouncer.host(),
        bouncer.port(),
        bouncer.admin_user(),
        "pgbouncer",
        Some(Secret::new(bouncer.admin_password())),
    );
    pgshift_engine::Traffic::Pgbouncer(vec![pgshift_engine::pgbouncer::PgbouncerTarget::new(
        admin,
        bouncer.config_path().to_path_buf(),
    )])
}

/// The application's role: clients and PgBouncer log in as it. pgshift copies it (with its
/// password hash) to the target, so the same password works there after the switch.
pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app-password";

/// Database `app` on the source with the ledger, writable by the application's role.
pub async fn ledger_database(pair: &Pair) {
    pair.source.create_database("app").await.unwrap();
    pair.source
        .create_login_role(APP_USER, APP_PASSWORD)
        .await
        .unwrap();
    let client = pair.source.connect("app").await.unwrap();
    pgshift_lab::ledger::Ledger::install(&client, 100)
        .await
        .unwrap();
    pgshift_lab::ledger::Ledger::grant(&client, APP_USER)
        .await
        .unwrap();
}

/// A PgBouncer in front of the pair's source, entry `app`, logging in as the application.
pub async fn bouncer_for(pair: &Pair) -> pgshift_lab::PgBouncer {
    let mut entry = pgshift_lab::BouncerDatabase::for_server(&pair.source, "app");
    entry.user = APP_USER.into();
    entry.password = APP_PASSWORD.into();
    pgshift_lab::PgBouncer::start(pgshift_lab::BouncerOptions::new(
        pair.dir.path().to_path_buf(),
        vec![entry],
    ))
    .await
    .expect("pgbouncer starts")
}

/// The ledger's clients, through the PgBouncer as the application.
pub fn through(bouncer: &pgshift_lab::PgBouncer) -> pgshift_lab::ledger::LedgerTarget {
    pgshift_lab::ledger::LedgerTarget::bouncer(bouncer, "app", APP_USER, APP_PASSWORD)
}

/// Waits (at most 30 s) until `follower` has as many rows of `table` as `leader`: a stream
/// between them has applied everything.
pub async fn caught_up(leader: &PgServer, follower: &PgServer, db: &str, table: &str) {
    let query = format!("SELECT count(*) FROM {table}");
    let (leader, follower) = (
        leader.connect(db).await.expect("connect"),
        follower.connect(db).await.expect("connect"),
    );
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let want: i64 = leader.query_one(&query, &[]).await.unwrap().get(0);
        let have: i64 = follower.query_one(&query, &[]).await.unwrap().get(0);
        if want == have {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "{table}: {have} rows follow {want} after 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Every index, constraint, trigger and policy of a database's user schemas, as definitions
/// (what pg_dump's post-data section holds): equal on both sides after an upgrade that built
/// them after the initial copy.
pub async fn structures(server: &PgServer, db: &str) -> Vec<String> {
    let client = server.connect(db).await.expect("connect");
    let user = "NOT IN ('pg_catalog', 'information_schema', 'pgshift_meta')";
    let query = format!(
        "SELECT 'index ' || schemaname || '.' || indexname || ': ' || indexdef FROM pg_indexes WHERE schemaname {user}
         UNION ALL
         SELECT 'constraint ' || n.nspname || '.' || t.relname || '.' || c.conname || ': ' || pg_get_constraintdef(c.oid)
           || CASE WHEN c.convalidated THEN '' ELSE ' (not valid)' END
         FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace
         WHERE n.nspname {user} AND c.contype <> 'n' -- NOT NULL is a constraint of its own from 18 on
         UNION ALL
         SELECT 'trigger ' || tgrelid::regclass || '.' || tgname || ': ' || pg_get_triggerdef(oid)
         FROM pg_trigger WHERE NOT tgisinternal
         UNION ALL
         SELECT 'policy ' || schemaname || '.' || tablename || '.' || policyname || ': ' || coalesce(qual, '')
         FROM pg_policies WHERE schemaname {user}
         UNION ALL
         SELECT 'attached ' || inhrelid::regclass || ' to ' || inhparent::regclass FROM pg_inherits i
         JOIN pg_class c ON c.oid = i.inhrelid WHERE c.relkind IN ('i', 'I')
         UNION ALL
         SELECT 'replica identity ' || indrelid::regclass || ': ' || indexrelid::regclass FROM pg_index WHERE indisreplident
         UNION ALL
         SELECT 'comment on ' || objoid::regclass || ': ' || description FROM pg_description d
         JOIN pg_class c ON c.oid = d.objoid AND d.classoid = 'pg_class'::regclass WHERE c.relkind = 'i' 
         ORDER BY 1"
    );
    client
        .query(&query, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}
