//! The cutover (DESIGN.md §3.6), the critical section: fence writes, prove with a marker row
//! that the target has every commit, copy every sequence, switch traffic, release clients —
//! under a budget. Before the switch, anything slow aborts the attempt and releases clients on
//! the source; `recover` finishes or undoes an attempt that a crash interrupted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::future::{try_join, try_join_all};
use serde::Serialize;
use tokio_postgres::Client;

use crate::error::{Error, Result, Side, SqlContext};
use crate::events::Event;
use crate::guard::GuardHandle;
use crate::lock;
use crate::names::{self, step};
use crate::observe;
use crate::pgbouncer::{self, Admin, PgbouncerTarget};
use crate::plan::{Routed, Traffic};
use crate::sql;
use crate::upgrade::{forget_step, record_step_value, Upgrade};

/// How often the target is asked whether the marker has arrived.
const MARKER_POLL: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, Serialize)]
pub struct CutoverReport {
    pub mode: &'static str,
    /// From the start of the fence to the release of clients, as pgshift measured it.
    pub pause_ms: f64,
    pub sequences_synced: usize,
    /// Client sessions ended on the source (direct mode).
    pub sessions_ended: i64,
    pub steps: Vec<StepTiming>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepTiming {
    pub step: &'static str,
    pub ms: f64,
}

/// The fence of one attempt and how to lift it.
enum Fence {
    Pgbouncer(Box<BouncerFence>),
    Direct,
    Routed(Box<RoutedFence>),
}

/// Poolers paused and the source fenced as in direct mode; the router switches.
struct RoutedFence {
    routed: Routed,
    poolers: Vec<PoolerConsoles>,
}

struct PoolerConsoles {
    /// Issues PAUSE (which waits) and later RECONNECT/RESUME.
    admin: Admin,
    /// To RESUME while a PAUSE is still waiting.
    spare: Admin,
}

impl RoutedFence {
    async fn connect(routed: &Routed) -> Result<RoutedFence> {
        let poolers = try_join_all(routed.poolers.iter().map(|endpoint| async move {
            Ok::<_, Error>(PoolerConsoles {
                admin: Admin::connect(endpoint).await?,
                spare: Admin::connect(endpoint).await?,
            })
        }))
        .await?;
        Ok(RoutedFence {
            routed: routed.clone(),
            poolers,
        })
    }

    /// Releases every pooler's clients; a pooler that is not paused is fine.
    async fn resume_all(&self) -> Result<()> {
        try_join_all(
            self.poolers
                .iter()
                .map(|p| async { p.spare.command("RESUME").await.or_else(not_paused) }),
        )
        .await
        .map(|_| ())
    }
}

struct BouncerFence {
    target: Box<PgbouncerTarget>,
    /// Issues PAUSE (which waits) and later RELOAD/RESUME.
    admin: Admin,
    /// A second console connection, to RESUME while a PAUSE is still waiting.
    spare: Admin,
    entries: Vec<String>,
    config: String,
}

struct Clock {
    started: Instant,
    last: Instant,
    budget: Duration,
    steps: Vec<StepTiming>,
}

impl Clock {
    fn lap(&mut self, up: &Upgrade, step: &'static str) {
        let now = Instant::now();
        let ms = now.duration_since(self.last).as_secs_f64() * 1e3;
        self.last = now;
        self.steps.push(StepTiming { step, ms });
        up.emit(Event::CutoverStep {
            step: step.to_string(),
            ms,
        });
    }
    fn remaining(&self) -> Duration {
        self.budget.saturating_sub(self.started.elapsed())
    }
    fn over(&self, step: &str) -> Error {
        Error::CutoverAborted {
            step: step.to_string(),
            elapsed: self.started.elapsed(),
            budget: self.budget,
        }
    }
}

pub(crate) async fn cutover(up: &mut Upgrade) -> Result<CutoverReport> {
    for name in up.databases.clone() {
        up.db(&name).await?;
    }
    let fence = prepare_fence(up).await?;
    let precopied =
        try_join_all(up.databases.iter().map(|name| precopy_sequences(up, name))).await?;
    // The guard releases the clients if this process dies inside the fence; it is armed
    // before the fence is recorded, and told when clients are released.
    let mut guard = match &up.plan.fence_guard {
        Some(program) => GuardHandle::start(program, up).await?,
        None => None,
    };
    if let Some(guard) = &mut guard {
        up.own_source_pids.extend_from_slice(guard.source_pids());
        guard.arm().await?;
    }
    let holder = match &guard {
        Some(_) => format!(
            "{}, with a fence guard",
            lock::holder_label(&up.plan.command)
        ),
        None => lock::holder_label(&up.plan.command),
    };
    for name in &up.databases {
        record_step_value(target_of(up, name), step::FENCED, &holder).await?;
    }
    let mut clock = Clock {
        started: Instant::now(),
        last: Instant::now(),
        budget: up.plan.max_pause,
        steps: Vec::new(),
    };
    let result = fenced_part(up, &fence, &precopied, &mut clock).await;
    let (sequences_synced, sessions_ended) = match result {
        Ok(counts) => counts,
        Err(error) => {
            lift_fence(up, &fence).await?;
            for name in &up.databases {
                forget_step(target_of(up, name), step::FENCED).await?;
            }
            if let Some(guard) = guard {
                guard.release().await?;
            }
            up.emit(Event::CutoverAborted {
                reason: error.to_string(),
            });
            return Err(error);
        }
    };
    // The point of no return: the target takes the writes from here on.
    switch(up, &fence).await?;
    clock.lap(up, "switch");
    let pause_ms = clock.started.elapsed().as_secs_f64() * 1e3;
    for name in &up.databases {
        forget_step(target_of(up, name), step::FENCED).await?;
    }
    if let Some(guard) = guard {
        guard.release().await?;
    }
    mark_created_databases_switched(up).await?;
    Ok(CutoverReport {
        mode: match fence {
            Fence::Pgbouncer(_) => "pgbouncer",
            Fence::Routed(routed) if !routed.poolers.is_empty() => "pgbouncer",
            Fence::Direct | Fence::Routed(_) => "direct",
        },
        pause_ms,
        sequences_synced,
        sessions_ended,
        steps: clock.steps,
    })
}

/// Fence, marker, sequences: everything between the start of the pause and the switch.
async fn fenced_part(
    up: &Upgrade,
    fence: &Fence,
    precopied: &[SequenceValues],
    clock: &mut Clock,
) -> Result<(usize, i64)> {
    let sessions_ended = raise_fence(up, fence, clock).await?;
    clock.lap(up, "fence");
    // Writes have stopped: the sequences can be read now, while the marker travels.
    let markers = try_join_all(
        up.databases
            .iter()
            .map(|name| wait_for_marker(up, name, clock)),
    );
    let copies = try_join_all(
        up.databases
            .iter()
            .zip(precopied)
            .map(|(name, copied)| copy_sequences(up, name, copied)),
    );
    let counts = match tokio::time::timeout(clock.remaining(), try_join(markers, copies)).await {
        Ok(result) => result?.1,
        Err(_) => {
            for name in &up.databases {
                cancel(target_of(up, name)).await;
            }
            return Err(clock.over("waiting for the marker row and copying sequences"));
        }
    };
    clock.lap(up, "marker_and_sequences");
    if clock.remaining().is_zero() {
        return Err(clock.over("finishing before the switch"));
    }
    Ok((counts.iter().sum(), sessions_ended))
}

async fn prepare_fence(up: &Upgrade) -> Result<Fence> {
    match &up.plan.traffic {
        Traffic::Direct => Ok(Fence::Direct),
        Traffic::Routed(routed) => Ok(Fence::Routed(Box::new(RoutedFence::connect(routed).await?))),
        Traffic::Pgbouncer(target) => {
            let config = pgbouncer::read_config(&target.config_path)?;
            let moved = pgbouncer::entries_to_move(&config, target, &up.plan.source)?;
            // Before any fence: PgBouncer must be able to log in to the target after the switch.
            pgbouncer::check_logins(&moved, &up.plan.target).await?;
            let entries: Vec<String> = moved.into_iter().map(|e| e.name).collect();
            if entries.is_empty() {
                return Err(Error::Pgbouncer(format!(
                    "no entry in the [databases] section of {} points at the source {}:{}; name the entries with --pgbouncer-db",
                    target.config_path.display(),
                    up.plan.source.host,
                    up.plan.source.port
                )));
            }
            Ok(Fence::Pgbouncer(Box::new(BouncerFence {
                target: target.clone(),
                admin: Admin::connect(&target.admin).await?,
                spare: Admin::connect(&target.admin).await?,
                entries,
                config,
            })))
        }
    }
}

/// Stops writes to the source. Returns how many client sessions were ended (direct mode).
async fn raise_fence(up: &Upgrade, fence: &Fence, clock: &Clock) -> Result<i64> {
    match fence {
        Fence::Pgbouncer(bouncer) => {
            let BouncerFence { admin, entries, .. } = bouncer.as_ref();
            // PAUSE returns once the entry's in-flight transactions have finished.
            for entry in entries {
                tokio::time::timeout(
                    clock.remaining(),
                    admin.command(&format!("PAUSE {}", sql::ident(entry))),
                )
                .await
                .map_err(|_| {
                    clock.over("waiting for in-flight transactions to finish (PAUSE)")
                })??;
            }
            Ok(0)
        }
        Fence::Direct => fence_source(up, clock).await,
        Fence::Routed(routed) if routed.poolers.is_empty() => {
            tokio::time::timeout(clock.remaining(), routed.routed.router.isolate())
                .await
                .map_err(|_| clock.over("isolating the clients' route"))??;
            fence_source(up, clock).await
        }
        Fence::Routed(routed) => {
            // PAUSE returns once each pooler's in-flight transactions have finished; its idle
            // server connections are then ended with any session that bypasses the poolers.
            tokio::time::timeout(
                clock.remaining(),
                try_join_all(routed.poolers.iter().map(|p| p.admin.command("PAUSE"))),
            )
            .await
            .map_err(|_| clock.over("waiting for in-flight transactions to finish (PAUSE)"))??;
            fence_source(up, clock).await
        }
    }
}

/// Direct mode's fence: the moved databases read-only, every client session ended.
async fn fence_source(up: &Upgrade, clock: &Clock) -> Result<i64> {
    for name in &up.databases {
        up.source_admin
            .batch_execute(&sql::set_database_read_only(name, true))
            .await
            .on(Side::Source, "making the source read-only")?;
    }
    // A session that began before the setting keeps writing: end every client session.
    tokio::time::timeout(clock.remaining(), end_sessions(up))
        .await
        .map_err(|_| clock.over("ending client sessions on the source"))?
}

/// Terminates every client session of the moved databases but pgshift's own, and waits until
/// they are gone, so that no commit of theirs can land after the marker.
async fn end_sessions(up: &Upgrade) -> Result<i64> {
    let query = "SELECT pid FROM pg_stat_activity WHERE datname = ANY($1) AND backend_type = 'client backend' AND pid <> ALL($2)";
    let pids: Vec<i32> = up
        .source_admin
        .query(query, &[&up.databases, &up.own_source_pids])
        .await
        .on(Side::Source, "listing client sessions")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    up.source_admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM unnest($1::int4[]) AS pid",
            &[&pids],
        )
        .await
        .on(Side::Source, "ending client sessions")?;
    loop {
        let left: i64 = up
            .source_admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
                &[&pids],
            )
            .await
            .on(Side::Source, "waiting for sessions to end")?
            .get(0);
        if left == 0 {
            return Ok(pids.len() as i64);
        }
        tokio::time::sleep(MARKER_POLL).await;
    }
}

/// Before any fence: proves that apply works now, by a marker row that arrives on the target
/// within `within`. False when it did not (apply stalled, failing, or far behind).
pub(crate) async fn apply_is_flowing(up: &Upgrade, within: Duration) -> Result<bool> {
    let clock = Clock {
        started: Instant::now(),
        last: Instant::now(),
        budget: within,
        steps: Vec::new(),
    };
    let probes = up
        .databases
        .iter()
        .map(|name| wait_for_marker(up, name, &clock));
    match try_join_all(probes).await {
        Ok(_) => Ok(true),
        Err(Error::CutoverAborted { .. }) => Ok(false),
        Err(error) => Err(error),
    }
}

/// Writes a marker row on the source and waits until the target has applied it: apply is in
/// commit order, so every commit before the fence is on the target then.
async fn wait_for_marker(up: &Upgrade, name: &str, clock: &Clock) -> Result<()> {
    let token = format!("{}-{}", name, rand::random::<u64>());
    let marker = sql::qualified(names::META_SCHEMA, names::MARKER_TABLE);
    up.connections[name]
        .source
        .execute(
            &format!("INSERT INTO {marker} (token) VALUES ($1)"),
            &[&token],
        )
        .await
        .on(Side::Source, "writing the marker row")?;
    let target = target_of(up, name);
    let probe = target
        .prepare(&format!(
            "SELECT EXISTS (SELECT 1 FROM {marker} WHERE token = $1)"
        ))
        .await
        .on(Side::Target, "preparing the marker probe")?;
    while !clock.remaining().is_zero() {
        let arrived: bool = target
            .query_one(&probe, &[&token])
            .await
            .on(Side::Target, "looking for the marker row")?
            .get(0);
        if arrived {
            return Ok(());
        }
        tokio::time::sleep(MARKER_POLL).await;
    }
    Err(clock.over("waiting for the marker row on the target"))
}

/// Sequence values of one database: (schema, name) → last value.
type SequenceValues = HashMap<(String, String), i64>;

/// Reads every sequence of the database that has a value (all of pg_sequences, not only those
/// owned by a column).
async fn read_sequences(up: &Upgrade, name: &str) -> Result<SequenceValues> {
    let rows = up.connections[name]
        .source
        .query(
            "SELECT schemaname::text, sequencename::text, last_value FROM pg_sequences
             WHERE last_value IS NOT NULL AND schemaname <> $1",
            &[&names::META_SCHEMA],
        )
        .await
        .on(Side::Source, "reading sequences")?;
    Ok(rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

/// Sets sequences on the target, all in one round trip.
async fn set_sequences(
    up: &Upgrade,
    name: &str,
    values: &[(&(String, String), i64)],
) -> Result<()> {
    if values.is_empty() {
        return Ok(());
    }
    let schemas: Vec<&str> = values
        .iter()
        .map(|((schema, _), _)| schema.as_str())
        .collect();
    let sequences: Vec<&str> = values
        .iter()
        .map(|((_, sequence), _)| sequence.as_str())
        .collect();
    let last_values: Vec<i64> = values.iter().map(|(_, value)| *value).collect();
    let called = vec![true; values.len()];
    target_of(up, name)
        .query_one(
            sql::SET_SEQUENCES,
            &[&schemas, &sequences, &last_values, &called],
        )
        .await
        .on(Side::Target, "setting sequences")?;
    Ok(())
}

/// Before the fence: copies every sequence, so that inside it only those that moved since
/// need setting (most sequences of a large schema are idle). Returns what was copied.
async fn precopy_sequences(up: &Upgrade, name: &str) -> Result<SequenceValues> {
    let values = read_sequences(up, name).await?;
    set_sequences(
        up,
        name,
        &values.iter().map(|(k, v)| (k, *v)).collect::<Vec<_>>(),
    )
    .await?;
    Ok(values)
}

/// Inside the fence: reads every sequence again (writes have stopped, so these values are
/// final) and sets on the target those that differ from the pre-copy. Nothing but pgshift
/// changes a sequence on the target, which stays read-only until the switch. Returns how many
/// sequences the target now has in step with the source.
async fn copy_sequences(up: &Upgrade, name: &str, copied: &SequenceValues) -> Result<usize> {
    let values = read_sequences(up, name).await?;
    let moved: Vec<(&(String, String), i64)> = values
        .iter()
        .filter(|(key, value)| copied.get(*key) != Some(*value))
        .map(|(key, value)| (key, *value))
        .collect();
    set_sequences(up, name, &moved).await?;
    Ok(values.len())
}

/// Makes the target the written server: records the switch, opens the target for writes and,
/// with PgBouncer, repoints its entries and releases the held clients there.
async fn switch(up: &Upgrade, fence: &Fence) -> Result<()> {
    open_target(up).await?;
    if let Fence::Pgbouncer(bouncer) = fence {
        let BouncerFence {
            target,
            admin,
            entries,
            config,
            ..
        } = bouncer.as_ref();
        repoint_pgbouncer(up, target, admin, entries, config).await?;
        for entry in entries {
            admin
                .command(&format!("RESUME {}", sql::ident(entry)))
                .await?;
        }
    }
    if let Fence::Routed(routed) = fence {
        route_and_release(&routed.routed, &routed.poolers).await?;
    }
    Ok(())
}

/// The router points the route at the target; each pooler drops its server connections and
/// releases its clients there.
async fn route_and_release(routed: &Routed, poolers: &[PoolerConsoles]) -> Result<()> {
    routed.router.route_to_target().await?;
    try_join_all(poolers.iter().map(|p| async {
        p.admin.command("RECONNECT").await?;
        p.admin.command("RESUME").await.or_else(not_paused)
    }))
    .await
    .map(|_| ())
}

/// Records the switch in every target database and opens them for writes, all at once. This
/// comes before PgBouncer is repointed: `recover` relies on that order.
async fn open_target(up: &Upgrade) -> Result<()> {
    let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let record = sql::record_switch(&at);
    let records = try_join_all(up.databases.iter().map(|name| async {
        target_of(up, name)
            .batch_execute(&record)
            .await
            .on(Side::Target, "recording the switch")
    }));
    let opens = try_join_all(up.databases.iter().map(|name| async move {
        up.target_admin
            .batch_execute(&sql::set_database_read_only(name, false))
            .await
            .on(Side::Target, "opening the target for writes")
    }));
    try_join(records, opens).await.map(|_| ())
}

async fn repoint_pgbouncer(
    up: &Upgrade,
    target: &PgbouncerTarget,
    admin: &Admin,
    entries: &[String],
    config: &str,
) -> Result<()> {
    let (host, port) = target
        .target_address
        .clone()
        .unwrap_or_else(|| (up.plan.target.host.clone(), up.plan.target.port));
    pgbouncer::write_config(
        &target.config_path,
        &pgbouncer::repoint(config, entries, &host, port),
    )?;
    admin.command("RELOAD").await?;
    for entry in entries {
        // Drops any server connection still open to the old server once it is released.
        admin
            .command(&format!("RECONNECT {}", sql::ident(entry)))
            .await?;
    }
    Ok(())
}

/// A target database pgshift created loses the comment that let abort drop it: after the
/// switch nothing may ever drop it (the switch record on `pgshift_meta` says the same).
async fn mark_created_databases_switched(up: &Upgrade) -> Result<()> {
    for name in &up.databases {
        let Some(at) = observe::switch_record(target_of(up, name)).await? else {
            continue;
        };
        let created: bool = up
            .target_admin
            .query_one(
                "SELECT coalesce(shobj_description(oid, 'pg_database') = $2, false) FROM pg_database WHERE datname = $1",
                &[name, &sql::CREATED_DATABASE_COMMENT],
            )
            .await
            .on(Side::Target, "reading the database comment")?
            .get(0);
        if created {
            up.target_admin
                .batch_execute(&sql::mark_created_database_switched(name, &at))
                .await
                .on(Side::Target, "marking the database as switched")?;
        }
    }
    Ok(())
}

/// Releases clients on the source after an aborted attempt.
async fn lift_fence(up: &Upgrade, fence: &Fence) -> Result<()> {
    match fence {
        Fence::Pgbouncer(bouncer) => {
            let BouncerFence { spare, entries, .. } = bouncer.as_ref();
            for entry in entries {
                spare
                    .command(&format!("RESUME {}", sql::ident(entry)))
                    .await
                    .or_else(not_paused)?;
            }
        }
        Fence::Direct => unfence_source(up).await?,
        Fence::Routed(routed) => {
            unfence_source(up).await?;
            if routed.poolers.is_empty() {
                routed.routed.router.restore().await?;
            }
            routed.resume_all().await?;
        }
    }
    Ok(())
}

async fn unfence_source(up: &Upgrade) -> Result<()> {
    for name in &up.databases {
        up.source_admin
            .batch_execute(&sql::set_database_read_only(name, false))
            .await
            .on(Side::Source, "making the source writable again")?;
    }
    Ok(())
}

/// RESUME of an entry that is not paused is not a failure when lifting a fence.
fn not_paused(error: Error) -> Result<()> {
    match &error {
        Error::Pgbouncer(message) if message.contains("not paused") => Ok(()),
        _ => Err(error),
    }
}

async fn cancel(client: &Client) {
    let _ = client
        .cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await;
}

fn target_of<'a>(up: &'a Upgrade, name: &str) -> &'a Client {
    up.connections[name]
        .target
        .as_ref()
        .expect("the target database exists at cutover")
}

/// Finishes or undoes a cutover that a crash interrupted, from what the servers show: if any
/// database recorded the switch, the switch is completed (the fence still holds); otherwise a
/// fence pgshift raised is lifted so that clients carry on with the source.
pub(crate) async fn recover(up: &mut Upgrade) -> Result<()> {
    let observed = up.observe().await?;
    // A cleaned-up database finished its switch long ago (cleanup recovers first).
    let switched = observed.iter().any(|db| db.switched() && !db.cleaned_up);
    let fenced: Vec<String> = observed
        .iter()
        .filter(|db| db.has(step::FENCED))
        .map(|db| db.name.clone())
        .collect();
    if !switched && fenced.is_empty() {
        return Ok(());
    }
    for name in up.databases.clone() {
        up.db(&name).await?;
    }
    if switched && fenced.is_empty() {
        // The fence record is forgotten only once every client was released: the switch
        // finished and the poolers are live. They must be left alone: a RECONNECT on a live
        // PgBouncer ends its server logins in progress, which it counts as failed logins and
        // answers clients with `server_login_retry` errors for a while.
        return mark_created_databases_switched(up).await;
    }
    if switched {
        up.emit(Event::Warning {
            message: "an interrupted cutover had already switched; completing the switch".into(),
        });
        complete_switch(up).await?;
    } else {
        up.emit(Event::Warning {
            message: "an interrupted cutover left writes fenced; releasing clients on the source"
                .into(),
        });
        match &up.plan.traffic {
            Traffic::Direct => lift_fence(up, &Fence::Direct).await?,
            Traffic::Routed(routed) => {
                let fence = Fence::Routed(Box::new(RoutedFence::connect(routed).await?));
                lift_fence(up, &fence).await?;
            }
            Traffic::Pgbouncer(target) => {
                let config = pgbouncer::read_config(&target.config_path)?;
                let ours = pgbouncer::entries_to_move(&config, target, &up.plan.source)?;
                resume_paused(
                    &Admin::connect(&target.admin).await?,
                    ours.iter().map(|e| e.name.clone()),
                )
                .await?;
            }
        }
    }
    for name in &fenced {
        forget_step(target_of(up, name), step::FENCED).await?;
    }
    Ok(())
}

/// Completes a switch that a crash interrupted: every database recorded and open for writes,
/// PgBouncer's entries pointing at the target, and its clients released.
async fn complete_switch(up: &Upgrade) -> Result<()> {
    open_target(up).await?;
    mark_created_databases_switched(up).await?;
    if let Traffic::Routed(routed) = &up.plan.traffic {
        // Every pooler, paused or not (PgBouncer before 1.21 cannot say whether it is): on one
        // that the interrupted attempt had already released, RECONNECT may fail clients for
        // `server_login_retry` (see `recover`), a cost paid only for a crash inside the switch.
        let fence = RoutedFence::connect(routed).await?;
        route_and_release(routed, &fence.poolers).await?;
    }
    if let Traffic::Pgbouncer(target) = &up.plan.traffic {
        let admin = Admin::connect(&target.admin).await?;
        let config = pgbouncer::read_config(&target.config_path)?;
        let at_source: Vec<String> = pgbouncer::entries_to_move(&config, target, &up.plan.source)?
            .into_iter()
            .map(|e| e.name)
            .collect();
        if !at_source.is_empty() {
            repoint_pgbouncer(up, target, &admin, &at_source, &config).await?;
        }
        let (host, port) = target
            .target_address
            .clone()
            .unwrap_or_else(|| (up.plan.target.host.clone(), up.plan.target.port));
        let config = pgbouncer::read_config(&target.config_path)?;
        let at_target = pgbouncer::entries(&config)
            .into_iter()
            .filter(|e| e.host.as_deref() == Some(host.as_str()) && e.port.unwrap_or(5432) == port)
            .map(|e| e.name);
        resume_paused(&admin, at_target).await?;
    }
    Ok(())
}

/// RESUMEs those of the given entries that PgBouncer reports paused.
async fn resume_paused(admin: &Admin, entries: impl Iterator<Item = String>) -> Result<()> {
    let paused = admin.paused().await?;
    for entry in entries.filter(|e| paused.contains(e)) {
        admin
            .command(&format!("RESUME {}", sql::ident(&entry)))
            .await
            .or_else(not_paused)?;
    }
    Ok(())
}
