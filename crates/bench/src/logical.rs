//! A hand-made blue-green without a cutover protocol: copy the schema, publish, subscribe,
//! wait until the lag query shows (about) zero, then repoint PgBouncer at the new server with
//! a plain `RELOAD` — no fence, no sequence copy — and drop the subscription. What that loses
//! or breaks is the point.

use std::time::{Duration, Instant};

use pgshift_lab::ledger::{Ledger, LedgerTarget};
use pgshift_lab::{BouncerDatabase, BouncerOptions, PgBouncer, PgServer};
use tokio_postgres::Client;

use crate::error::{io, pg, BenchError, Result};
use crate::figures::{MethodFigures, StoppedRun, Timing};
use crate::lab::{
    conninfo, run_tool, settle, stop_load, Lab, Workload, APP_PASSWORD, APP_USER, DB,
};

const PUBLICATION: &str = "bench_pub";
const SUBSCRIPTION: &str = "bench_sub";
/// "Lag zero" as a person watching the lag query under a live load takes it: under a steady
/// write load the exact figure 0 is seldom seen, a few kB behind is.
const LAG_ZERO_BYTES: i64 = 64 * 1024;
/// How long the initial copy and the catch-up may take.
const SYNC_TIMEOUT: Duration = Duration::from_secs(1800);
const POLL: Duration = Duration::from_millis(20);

pub async fn run(work: &Workload) -> Result<MethodFigures> {
    let name = "logical-unfenced";
    let lab = Lab::fresh(work).await?;
    let pgpass = lab.pgpass()?;
    lab.target.create_login_role(APP_USER, APP_PASSWORD).await?;
    let bouncer = PgBouncer::start(BouncerOptions::new(
        lab.dir.path(),
        vec![app_entry(&lab.source)],
    ))
    .await?;
    let load = work.start_load(LedgerTarget::bouncer(&bouncer, DB, APP_USER, APP_PASSWORD));
    settle(work).await;

    tracing::info!(method = name, "copying the schema, publishing, subscribing");
    let started = Instant::now();
    lab.target.create_database(DB).await?;
    let mut dump = lab.tool("pg_dump", &pgpass);
    let schema = lab.dir.path().join("schema.sql");
    dump.args(["--schema-only", "-f"])
        .arg(&schema)
        .args(["-d", &conninfo(&lab.source, DB)]);
    run_tool(dump).await?;
    let mut restore = lab.tool("psql", &pgpass);
    restore
        .args([
            "-X",
            "-q",
            "--single-transaction",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
        ])
        .arg(&schema)
        .args(["-d", &conninfo(&lab.target, DB)]);
    run_tool(restore).await?;

    let source = lab.source.connect(DB).await?;
    let target = lab.target.connect(DB).await?;
    source
        .batch_execute(&format!("CREATE PUBLICATION {PUBLICATION} FOR ALL TABLES"))
        .await
        .map_err(pg("cannot create the publication"))?;
    target
        .batch_execute(&format!(
            "CREATE SUBSCRIPTION {SUBSCRIPTION} CONNECTION '{} password={}' PUBLICATION {PUBLICATION}",
            conninfo(&lab.source, DB),
            lab.source.password()
        ))
        .await
        .map_err(pg("cannot create the subscription"))?;
    wait_until(&target, "every table copied", all_tables_ready).await?;
    let copy_s = started.elapsed().as_secs_f64();
    wait_until(&source, "the lag query shows zero", lag_is_zero).await?;
    let ready = Instant::now();

    tracing::info!(method = name, "repointing PgBouncer at the new server");
    repoint(&bouncer, &lab.source, &lab.target).await?;
    // The migration is over as far as the hand-made procedure knows: retire the replication,
    // so the new server stands alone. Whatever the source committed and had not yet sent is
    // gone with it.
    target
        .batch_execute(&format!("DROP SUBSCRIPTION {SUBSCRIPTION}"))
        .await
        .map_err(pg("cannot drop the subscription"))?;
    let ended = Instant::now();
    settle(work).await;
    let (load_started, report) = stop_load(load).await;

    let verified = Ledger::verify(&lab.target.connect(DB).await?, &report).await?;
    let size_mb = lab.size_mb;
    bouncer.stop().await?;
    lab.stop().await?;
    let run = StoppedRun {
        started: load_started,
        report: &report,
    };
    let timing = Timing {
        started,
        ready,
        ended,
        new_server_from: ended,
    };
    Ok(MethodFigures::one_run(
        name,
        size_mb,
        &run,
        &verified,
        timing,
        Some(size_mb / copy_s),
    ))
}

fn app_entry(server: &PgServer) -> BouncerDatabase {
    let mut entry = BouncerDatabase::for_server(server, DB);
    entry.user = APP_USER.into();
    entry.password = APP_PASSWORD.into();
    entry
}

/// Rewrites PgBouncer's database line from `from` to `to` and reloads it: new transactions go
/// to the new server, whatever was still in flight on the old one.
async fn repoint(bouncer: &PgBouncer, from: &PgServer, to: &PgServer) -> Result<()> {
    let path = bouncer.config_path();
    let config = std::fs::read_to_string(path).map_err(io("cannot read PgBouncer's config"))?;
    let (old, new) = (app_entry(from).config_line()?, app_entry(to).config_line()?);
    if !config.contains(&old) {
        return Err(BenchError::Io {
            context: format!("PgBouncer's config {}", path.display()),
            source: std::io::Error::other("the source's database line is not there"),
        });
    }
    std::fs::write(path, config.replace(&old, &new))
        .map_err(io("cannot rewrite PgBouncer's config"))?;
    bouncer
        .admin_connect()
        .await?
        .simple_query("RELOAD")
        .await
        .map_err(pg("PgBouncer refused RELOAD"))?;
    Ok(())
}

async fn all_tables_ready(target: &Client) -> Result<bool> {
    let row = target
        .query_one(
            "SELECT count(*) > 0 AND bool_and(srsubstate = 'r') FROM pg_subscription_rel",
            &[],
        )
        .await
        .map_err(pg("cannot read pg_subscription_rel"))?;
    Ok(row.get::<_, Option<bool>>(0).unwrap_or(false))
}

async fn lag_is_zero(source: &Client) -> Result<bool> {
    let row = source
        .query_one(
            &format!(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8
                 FROM pg_replication_slots WHERE slot_name = '{SUBSCRIPTION}'"
            ),
            &[],
        )
        .await
        .map_err(pg("cannot read the replication lag"))?;
    Ok(row
        .get::<_, Option<i64>>(0)
        .is_some_and(|lag| lag <= LAG_ZERO_BYTES))
}

async fn wait_until<F>(client: &Client, what: &str, check: F) -> Result<()>
where
    F: AsyncFn(&Client) -> Result<bool>,
{
    let deadline = Instant::now() + SYNC_TIMEOUT;
    while !check(client).await? {
        if Instant::now() > deadline {
            return Err(BenchError::Timeout(format!(
                "waited {SYNC_TIMEOUT:?} for {what}"
            )));
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}
