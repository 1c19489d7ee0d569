//! The write fence of one attempt on the server clients leave, how it is lifted (an aborted
//! attempt), and how clients are released on the server they go to (the switch).

use std::future::Future;

use futures_util::future::{join_all, try_join_all};

use super::inputs::{Clock, Server, Switch};
use super::proof::MARKER_POLL;
use crate::endpoint::Endpoint;
use crate::error::{Error, Result, SqlContext};
use crate::pgbouncer::{self, Admin, BlockingSession, PgbouncerTarget};
use crate::plan::{Routed, Traffic};
use crate::sql;

/// The fence of one attempt and how to lift it.
pub(crate) enum Fence {
    /// One PgBouncer or a fleet of them, paused together.
    Pgbouncer(Vec<BouncerFence>),
    Direct,
    Routed(Box<RoutedFence>),
}

/// Two sessions on one PgBouncer's admin console.
struct Consoles {
    /// How messages name this PgBouncer.
    label: String,
    /// Issues PAUSE (which waits) and later RELOAD/RECONNECT/RESUME.
    admin: Admin,
    /// To RESUME, and to see who holds a PAUSE up, while a PAUSE is still waiting.
    spare: Admin,
}

impl Consoles {
    async fn connect(endpoint: &Endpoint, label: String) -> Result<Consoles> {
        Ok(Consoles {
            label,
            admin: Admin::connect(endpoint).await?,
            spare: Admin::connect(endpoint).await?,
        })
    }
}

/// One PgBouncer whose config pgshift repoints.
pub(crate) struct BouncerFence {
    target: PgbouncerTarget,
    consoles: Consoles,
    /// The entries that point at the server clients leave.
    entries: Vec<String>,
    /// This process paused them (rather than finding them paused by a dead one).
    raised_here: bool,
}

/// Poolers paused and the server fenced as in direct mode; the router switches.
pub(crate) struct RoutedFence {
    routed: Routed,
    poolers: Vec<Consoles>,
}

impl RoutedFence {
    async fn connect(routed: &Routed) -> Result<RoutedFence> {
        let poolers = try_join_all(routed.poolers.iter().map(|endpoint| {
            Consoles::connect(
                endpoint,
                format!("PgBouncer {}:{}", endpoint.host, endpoint.port),
            )
        }))
        .await?;
        Ok(RoutedFence {
            routed: routed.clone(),
            poolers,
        })
    }
}

impl BouncerFence {
    /// Before any pause: the entries of `target` that point at `from`, which must be able to
    /// log in to `to` after the switch.
    async fn prepare(target: &PgbouncerTarget, sw: &Switch<'_>) -> Result<BouncerFence> {
        let config = pgbouncer::read_config(&target.config_path)?;
        let from = target.address_of(sw.from.side, sw.from.endpoint);
        let moved = pgbouncer::entries_at(&config, target, &from)?;
        pgbouncer::check_logins(&moved, sw.to.endpoint).await?;
        if moved.is_empty() {
            let (host, port) = &from;
            return Err(Error::Pgbouncer(format!(
                "no entry in the [databases] section of {} points at the {} {host}:{port}; name the entries with --pgbouncer-db",
                target.config_path.display(),
                sw.from.side,
            )));
        }
        Ok(BouncerFence {
            consoles: Consoles::connect(&target.admin, target.label()).await?,
            target: target.clone(),
            entries: moved.into_iter().map(|e| e.name).collect(),
            raised_here: true,
        })
    }

    /// A fence this process did not raise: its entries may point at either server by now.
    async fn found(target: &PgbouncerTarget, sw: &Switch<'_>) -> Result<BouncerFence> {
        let config = pgbouncer::read_config(&target.config_path)?;
        let mut entries: Vec<String> = [sw.from.side, sw.to.side]
            .into_iter()
            .zip([sw.from.endpoint, sw.to.endpoint])
            .map(|(side, endpoint)| {
                pgbouncer::entries_at(&config, target, &target.address_of(side, endpoint))
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .map(|e| e.name)
            .collect();
        entries.dedup();
        Ok(BouncerFence {
            consoles: Consoles::connect(&target.admin, target.label()).await?,
            target: target.clone(),
            entries,
            raised_here: false,
        })
    }

    /// Repoints the entries still at `from` in its config at `to`, RELOADs, drops server
    /// connections to `from` and releases the clients. Idempotent.
    async fn release_to(&self, sw: &Switch<'_>) -> Result<()> {
        let admin = &self.consoles.admin;
        let (host, port) = self.target.address_of(sw.to.side, sw.to.endpoint);
        let from = self.target.address_of(sw.from.side, sw.from.endpoint);
        let config = pgbouncer::read_config(&self.target.config_path)?;
        let still_at_from: Vec<String> = pgbouncer::entries_at(&config, &self.target, &from)?
            .into_iter()
            .map(|e| e.name)
            .collect();
        if !still_at_from.is_empty() {
            pgbouncer::write_config(
                &self.target.config_path,
                &pgbouncer::repoint(&config, &still_at_from, &host, port),
            )?;
            admin.command("RELOAD").await?;
        }
        for entry in &self.entries {
            // Drops any server connection still open to `from` once it is released.
            admin
                .command(&format!("RECONNECT {}", sql::ident(entry)))
                .await?;
        }
        if self.raised_here {
            for entry in &self.entries {
                admin
                    .command(&format!("RESUME {}", sql::ident(entry)))
                    .await?;
            }
            Ok(())
        } else {
            resume_paused(admin, self.entries.iter().cloned()).await
        }
    }
}

impl Fence {
    /// Connects to what the fence needs, before any pause. With PgBouncer, the entries that
    /// point at `from` must be able to log in to `to` after the switch.
    pub async fn prepare(sw: &Switch<'_>) -> Result<Fence> {
        match sw.traffic {
            Traffic::Direct => Ok(Fence::Direct),
            Traffic::Routed(routed) => {
                Ok(Fence::Routed(Box::new(RoutedFence::connect(routed).await?)))
            }
            Traffic::Pgbouncer(fleet) => Ok(Fence::Pgbouncer(
                try_join_all(fleet.iter().map(|target| BouncerFence::prepare(target, sw))).await?,
            )),
        }
    }

    /// Recovery's part on the fence it finds: with the switch recorded (`done`) clients are
    /// released on `to`, otherwise the fence is lifted and they carry on on `from`. Every
    /// PgBouncer is settled on its own and at once, so that one out of reach (its host down)
    /// keeps no other's clients waiting; the first error comes back once the others are done.
    pub async fn settle_found(sw: &Switch<'_>, done: bool) -> Result<()> {
        match sw.traffic {
            Traffic::Pgbouncer(fleet) => {
                every(fleet.iter().map(|target| async move {
                    Fence::Pgbouncer(vec![BouncerFence::found(target, sw).await?])
                        .settle(sw, done)
                        .await
                }))
                .await
            }
            _ => Fence::prepare(sw).await?.settle(sw, done).await,
        }
    }

    async fn settle(&self, sw: &Switch<'_>, done: bool) -> Result<()> {
        match done {
            true => self.release_to(sw).await,
            false => self.lift(sw).await,
        }
    }

    pub fn mode(&self) -> &'static str {
        match self {
            Fence::Pgbouncer(_) => "pgbouncer",
            Fence::Routed(routed) if !routed.poolers.is_empty() => "pgbouncer",
            Fence::Direct | Fence::Routed(_) => "direct",
        }
    }

    /// The PgBouncers this fence pauses, as messages name them.
    pub fn poolers(&self) -> Vec<String> {
        match self {
            Fence::Pgbouncer(fleet) => fleet.iter().map(|b| b.consoles.label.clone()).collect(),
            Fence::Routed(routed) => routed.poolers.iter().map(|c| c.label.clone()).collect(),
            Fence::Direct => Vec::new(),
        }
    }

    /// Stops writes to `from`. Returns how many client sessions were ended (direct mode).
    pub async fn raise(&self, sw: &Switch<'_>, clock: &Clock<'_>) -> Result<i64> {
        match self {
            Fence::Pgbouncer(fleet) => {
                let pausing: Vec<Pausing> = fleet
                    .iter()
                    .map(|bouncer| Pausing {
                        consoles: &bouncer.consoles,
                        commands: bouncer
                            .entries
                            .iter()
                            .map(|entry| format!("PAUSE {}", sql::ident(entry)))
                            .collect(),
                        pools: Some(bouncer.entries.as_slice()),
                    })
                    .collect();
                pause_together(&pausing, sw, clock).await?;
                Ok(0)
            }
            Fence::Direct => fence_server(sw, clock).await,
            Fence::Routed(routed) if routed.poolers.is_empty() => {
                tokio::time::timeout(clock.remaining(), routed.routed.router.isolate())
                    .await
                    .map_err(|_| clock.over("isolating the clients' route"))??;
                fence_server(sw, clock).await
            }
            Fence::Routed(routed) => {
                // Each pooler is paused as a whole; its idle server connections are then ended
                // with any session that bypasses them.
                let pausing: Vec<Pausing> = routed
                    .poolers
                    .iter()
                    .map(|consoles| Pausing {
                        consoles,
                        commands: vec!["PAUSE".into()],
                        pools: None,
                    })
                    .collect();
                pause_together(&pausing, sw, clock).await?;
                fence_server(sw, clock).await
            }
        }
    }

    /// Releases clients on `from` after an aborted attempt (or one a crash left): every
    /// PgBouncer, whatever another one does.
    pub async fn lift(&self, sw: &Switch<'_>) -> Result<()> {
        match self {
            Fence::Pgbouncer(fleet) => {
                every(fleet.iter().map(|bouncer| {
                    resume_paused(&bouncer.consoles.spare, bouncer.entries.iter().cloned())
                }))
                .await
            }
            Fence::Direct => open_databases(&sw.from, sw.databases).await,
            Fence::Routed(routed) => {
                open_databases(&sw.from, sw.databases).await?;
                if routed.poolers.is_empty() {
                    routed.routed.router.route_to(sw.from.side).await?;
                }
                every(routed.poolers.iter().map(|c| resume_all(&c.spare))).await
            }
        }
    }

    /// After the switch is recorded and `to` is open: traffic goes to `to`, clients are
    /// released there — on every PgBouncer, whatever another one does. Idempotent (recovery
    /// calls it again).
    pub async fn release_to(&self, sw: &Switch<'_>) -> Result<()> {
        match self {
            Fence::Pgbouncer(fleet) => every(fleet.iter().map(|b| b.release_to(sw))).await,
            Fence::Direct => Ok(()),
            Fence::Routed(routed) => {
                routed.routed.router.route_to(sw.to.side).await?;
                every(routed.poolers.iter().map(|c| async {
                    c.admin.command("RECONNECT").await?;
                    resume_all(&c.admin).await
                }))
                .await
            }
        }
    }
}

/// One PgBouncer's part of a fleet's PAUSE.
struct Pausing<'a> {
    consoles: &'a Consoles,
    /// Run in order on its first console; each returns once its pool's in-flight
    /// transactions have finished.
    commands: Vec<String>,
    /// The pools it pauses (None: all of them).
    pools: Option<&'a [String]>,
}

/// PAUSEs every PgBouncer at once and waits until all are paused, within the budget — or the
/// attempt aborts, naming the client sessions whose transactions held a PAUSE up.
async fn pause_together(pausing: &[Pausing<'_>], sw: &Switch<'_>, clock: &Clock<'_>) -> Result<()> {
    const STEP: &str = "waiting for in-flight transactions to finish (PAUSE)";
    let pauses = try_join_all(pausing.iter().map(|p| async move {
        for command in &p.commands {
            p.consoles.admin.command(command).await?;
        }
        Ok::<_, Error>(())
    }));
    tokio::pin!(pauses);
    if let Ok(done) = tokio::time::timeout(clock.remaining() / 2, &mut pauses).await {
        return done.map(|_| ());
    }
    // Halfway through the budget, whoever still holds a PAUSE up is looked up while the PAUSE
    // keeps waiting, so that an abort names them without holding clients past the budget. The
    // lookup only explains an abort: if it fails, the abort says less.
    let lookup = holding_up(pausing, sw, clock.elapsed());
    tokio::pin!(lookup);
    let mut blocking = Vec::new();
    let waited = tokio::time::timeout(clock.remaining(), async {
        tokio::select! {
            done = &mut pauses => return done,
            found = &mut lookup => blocking = found.unwrap_or_default(),
        }
        (&mut pauses).await
    })
    .await;
    match waited {
        Ok(done) => done.map(|_| ()),
        Err(_) => Err(clock.held_up(STEP, blocking)),
    }
}

/// The client sessions in a transaction older than `held_for` on a pausing PgBouncer's server
/// connections to `from`.
async fn holding_up(
    pausing: &[Pausing<'_>],
    sw: &Switch<'_>,
    held_for: std::time::Duration,
) -> Result<Vec<BlockingSession>> {
    let found = try_join_all(pausing.iter().map(|p| {
        pgbouncer::blocking_sessions(
            &p.consoles.label,
            &p.consoles.spare,
            p.pools,
            sw.from.admin,
            sw.from.side,
            held_for,
        )
    }))
    .await?;
    Ok(found.into_iter().flatten().collect())
}

/// What holds up the PAUSE of a fence on `side` now, as `status` shows it: the client sessions
/// in a transaction on the PgBouncers' server connections to `server` (none without PgBouncer).
pub(crate) async fn holding_up_now(
    traffic: &Traffic,
    server: &tokio_postgres::Client,
    side: crate::error::Side,
) -> Result<Vec<BlockingSession>> {
    let Traffic::Pgbouncer(fleet) = traffic else {
        return Ok(Vec::new());
    };
    let found = try_join_all(fleet.iter().map(|target| async move {
        let console = Admin::connect(&target.admin).await?;
        let pools = (!target.entries.is_empty()).then_some(target.entries.as_slice());
        pgbouncer::blocking_sessions(
            &target.label(),
            &console,
            pools,
            server,
            side,
            std::time::Duration::ZERO,
        )
        .await
    }))
    .await?;
    Ok(found.into_iter().flatten().collect())
}

/// Runs every step to its end even when one fails (each PgBouncer of a fleet is released
/// whatever the others do) and returns the first failure.
async fn every<F: Future<Output = Result<()>>>(steps: impl IntoIterator<Item = F>) -> Result<()> {
    join_all(steps).await.into_iter().collect()
}

/// Direct mode's fence on `from`: the moved databases read-only, every client session ended.
async fn fence_server(sw: &Switch<'_>, clock: &Clock<'_>) -> Result<i64> {
    for name in sw.databases {
        sw.from
            .admin
            .batch_execute(&sql::set_database_read_only(name, true))
            .await
            .on(sw.from.side, "making the databases clients leave read-only")?;
    }
    // A session that began before the setting keeps writing: end every client session.
    tokio::time::timeout(clock.remaining(), end_sessions(&sw.from, sw.databases))
        .await
        .map_err(|_| clock.over("ending client sessions"))?
}

/// Terminates every client session of the moved databases but pgshift's own, and waits until
/// they are gone, so that no commit of theirs can land after the marker.
async fn end_sessions(server: &Server<'_>, databases: &[String]) -> Result<i64> {
    let query = "SELECT pid FROM pg_stat_activity WHERE datname = ANY($1) AND backend_type = 'client backend' AND pid <> ALL($2)";
    let pids: Vec<i32> = server
        .admin
        .query(query, &[&databases, &server.own_pids])
        .await
        .on(server.side, "listing client sessions")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    server
        .admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM unnest($1::int4[]) AS pid",
            &[&pids],
        )
        .await
        .on(server.side, "ending client sessions")?;
    loop {
        let left: i64 = server
            .admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
                &[&pids],
            )
            .await
            .on(server.side, "waiting for sessions to end")?
            .get(0);
        if left == 0 {
            return Ok(pids.len() as i64);
        }
        tokio::time::sleep(MARKER_POLL).await;
    }
}

/// The moved databases of `server` take writes again (their read-only setting reset).
pub(crate) async fn open_databases(server: &Server<'_>, databases: &[String]) -> Result<()> {
    try_join_all(databases.iter().map(|name| async move {
        server
            .admin
            .batch_execute(&sql::set_database_read_only(name, false))
            .await
            .on(server.side, "opening the databases for writes")
    }))
    .await
    .map(|_| ())
}

/// RESUMEs those of the given entries that PgBouncer reports paused (PgBouncer refuses to
/// RESUME an entry that is not).
async fn resume_paused(admin: &Admin, entries: impl Iterator<Item = String>) -> Result<()> {
    let paused = admin.paused().await?;
    for entry in entries.filter(|e| paused.contains(e)) {
        admin
            .command(&format!("RESUME {}", sql::ident(&entry)))
            .await?;
    }
    Ok(())
}

/// RESUMEs a pooler paused as a whole, if it is.
async fn resume_all(admin: &Admin) -> Result<()> {
    admin.resume_if_paused().await
}
