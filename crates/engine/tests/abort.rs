//! `abort` after each step leaves the source exactly as it was (no slot, no publication, no
//! marker table, no role or setting changed) and removes what pgshift put on the target — and
//! a new run can start from scratch afterwards.

mod common;

use common::{exec, pair, pgshift_objects, plan, RICH_SCHEMA};
use pgshift_engine::{events, Advance, Upgrade};
use pgshift_lab::PgServer;

/// Everything on the source an upgrade could touch, as text.
async fn snapshot(server: &PgServer) -> Vec<String> {
    let admin = server.connect("postgres").await.unwrap();
    let app = server.connect("app").await.unwrap();
    let mut lines = Vec::new();
    for (client, sql) in [
        (&admin, "SELECT 'slot ' || slot_name FROM pg_replication_slots"),
        (&admin, "SELECT 'role ' || rolname || rolsuper::text || rolcanlogin::text || coalesce(rolpassword, '') FROM pg_authid ORDER BY 1"),
        (&admin, "SELECT 'dbsetting ' || setdatabase || ' ' || setrole || ' ' || array_to_string(setconfig, ',') FROM pg_db_role_setting ORDER BY 1"),
        (&admin, "SELECT 'setting ' || name || '=' || setting FROM pg_settings WHERE source IN ('configuration file', 'database', 'user', 'database user') ORDER BY 1"),
        (&admin, "SELECT 'database ' || datname || ' ' || coalesce(shobj_description(oid, 'pg_database'), '') FROM pg_database ORDER BY 1"),
        (&app, "SELECT 'publication ' || pubname FROM pg_publication"),
        (&app, "SELECT 'relation ' || c.oid::regclass::text || ' ' || c.relkind::text || ' ' || c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') ORDER BY 1"),
        (&app, "SELECT 'schema ' || nspname FROM pg_namespace ORDER BY 1"),
    ] {
        for row in client.query(sql, &[]).await.unwrap() {
            lines.push(row.get(0));
        }
    }
    lines
}

#[tokio::test]
async fn abort_after_each_step_restores_the_source() {
    let pair = pair(15, 18).await;
    pair.source.create_database("app").await.unwrap();
    exec(&pair.source, "app", RICH_SCHEMA).await;
    let before = snapshot(&pair.source).await;

    // Stop after 1, 2, ... steps, then abort; the last round stops when all is in sync.
    let mut steps_done_in_full_run = None;
    for stop_after in 1.. {
        let mut upgrade = Upgrade::connect(plan(&pair, "app"), events::discard())
            .await
            .unwrap();
        let mut performed = Vec::new();
        while performed.len() < stop_after {
            match upgrade.advance().await.unwrap() {
                Advance::Acted { action, .. } => performed.push(action),
                Advance::Settled {
                    next: pgshift_engine::decide::Next::WaitForCopy,
                    ..
                } => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Advance::Settled { .. } => {
                    steps_done_in_full_run = Some(performed.len());
                    break;
                }
            }
        }
        // Abort as a new `pgshift abort` process would: fresh connections to what now exists.
        drop(upgrade);
        let mut aborting = Upgrade::connect(plan(&pair, "app"), events::discard())
            .await
            .unwrap();
        let removed = aborting.abort().await.unwrap();
        assert_eq!(
            snapshot(&pair.source).await,
            before,
            "source differs after abort following {performed:?} (removed {removed:?})"
        );
        assert!(pgshift_objects(&pair.source, &["app"]).await.is_empty());
        assert!(
            pgshift_objects(&pair.target, &["app"]).await.is_empty(),
            "after {performed:?}"
        );
        if steps_done_in_full_run.is_some() {
            break;
        }
    }
    // Create database, schema, protect, marker, publication, slot, subscription, the index
    // builds, analyze, and the rollback window's publication and slot on the target.
    assert_eq!(steps_done_in_full_run, Some(10));
}
