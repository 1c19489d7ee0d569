//! The write fence of one attempt on the server clients leave, how it is lifted (an aborted
//! attempt), and how clients are released on the server they go to (the switch).

use futures_util::future::try_join_all;

use super::inputs::{Clock, Server, Switch};
use super::proof::MARKER_POLL;
use crate::error::{Error, Result, SqlContext};
use crate::pgbouncer::{self, Admin, PgbouncerTarget};
use crate::plan::{Routed, Traffic};
use crate::sql;

/// The fence of one attempt and how to lift it.
pub(crate) enum Fence {
    Pgbouncer(Box<BouncerFence>),
    Direct,
    Routed(Box<RoutedFence>),
}

pub(crate) struct BouncerFence {
    target: Box<PgbouncerTarget>,
    /// Issues PAUSE (which waits) and later RELOAD/RESUME.
    admin: Admin,
    /// A second console connection, to RESUME while a PAUSE is still waiting.
    spare: Admin,
    /// The entries that point at the server clients leave.
    entries: Vec<String>,
    /// This process paused them (rather than finding them paused by a dead one).
    raised_here: bool,
}

/// Poolers paused and the server fenced as in direct mode; the router switches.
pub(crate) struct RoutedFence {
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
            Traffic::Pgbouncer(target) => {
                let config = pgbouncer::read_config(&target.config_path)?;
                let moved = pgbouncer::entries_at(&config, target, &sw.from.pgbouncer_address)?;
                pgbouncer::check_logins(&moved, sw.to.endpoint).await?;
                let entries: Vec<String> = moved.into_iter().map(|e| e.name).collect();
                if entries.is_empty() {
                    let (host, port) = &sw.from.pgbouncer_address;
                    return Err(Error::Pgbouncer(format!(
                        "no entry in the [databases] section of {} points at the {} {host}:{port}; name the entries with --pgbouncer-db",
                        target.config_path.display(),
                        sw.from.side,
                    )));
                }
                Ok(Fence::Pgbouncer(Box::new(BouncerFence {
                    target: target.clone(),
                    admin: Admin::connect(&target.admin).await?,
                    spare: Admin::connect(&target.admin).await?,
                    entries,
                    raised_here: true,
                })))
            }
        }
    }

    /// A fence that this process did not raise (recovery): how to lift it or release it. Its
    /// entries may point at either server by now.
    pub async fn found(sw: &Switch<'_>) -> Result<Fence> {
        match sw.traffic {
            Traffic::Pgbouncer(target) => {
                let config = pgbouncer::read_config(&target.config_path)?;
                let mut entries: Vec<String> =
                    pgbouncer::entries_at(&config, target, &sw.from.pgbouncer_address)?
                        .into_iter()
                        .chain(pgbouncer::entries_at(
                            &config,
                            target,
                            &sw.to.pgbouncer_address,
                        )?)
                        .map(|e| e.name)
                        .collect();
                entries.dedup();
                Ok(Fence::Pgbouncer(Box::new(BouncerFence {
                    target: target.clone(),
                    admin: Admin::connect(&target.admin).await?,
                    spare: Admin::connect(&target.admin).await?,
                    entries,
                    raised_here: false,
                })))
            }
            _ => Fence::prepare(sw).await,
        }
    }

    pub fn mode(&self) -> &'static str {
        match self {
            Fence::Pgbouncer(_) => "pgbouncer",
            Fence::Routed(routed) if !routed.poolers.is_empty() => "pgbouncer",
            Fence::Direct | Fence::Routed(_) => "direct",
        }
    }

    /// Stops writes to `from`. Returns how many client sessions were ended (direct mode).
    pub async fn raise(&self, sw: &Switch<'_>, clock: &Clock<'_>) -> Result<i64> {
        match self {
            Fence::Pgbouncer(bouncer) => {
                // PAUSE returns once the entry's in-flight transactions have finished.
                for entry in &bouncer.entries {
                    tokio::time::timeout(
                        clock.remaining(),
                        bouncer
                            .admin
                            .command(&format!("PAUSE {}", sql::ident(entry))),
                    )
                    .await
                    .map_err(|_| {
                        clock.over("waiting for in-flight transactions to finish (PAUSE)")
                    })??;
                }
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
                // PAUSE returns once each pooler's in-flight transactions have finished; its
                // idle server connections are then ended with any session that bypasses them.
                tokio::time::timeout(
                    clock.remaining(),
                    try_join_all(routed.poolers.iter().map(|p| p.admin.command("PAUSE"))),
                )
                .await
                .map_err(|_| {
                    clock.over("waiting for in-flight transactions to finish (PAUSE)")
                })??;
                fence_server(sw, clock).await
            }
        }
    }

    /// Releases clients on `from` after an aborted attempt (or one a crash left).
    pub async fn lift(&self, sw: &Switch<'_>) -> Result<()> {
        match self {
            Fence::Pgbouncer(bouncer) => {
                resume_paused(&bouncer.spare, bouncer.entries.iter().cloned()).await?
            }
            Fence::Direct => open_databases(&sw.from, sw.databases).await?,
            Fence::Routed(routed) => {
                open_databases(&sw.from, sw.databases).await?;
                if routed.poolers.is_empty() {
                    routed.routed.router.route_to(sw.from.side).await?;
                }
                try_join_all(routed.poolers.iter().map(|p| resume_all(&p.spare))).await?;
            }
        }
        Ok(())
    }

    /// After the switch is recorded and `to` is open: traffic goes to `to`, clients are
    /// released there. Idempotent (recovery calls it again).
    pub async fn release_to(&self, sw: &Switch<'_>) -> Result<()> {
        match self {
            Fence::Pgbouncer(bouncer) => {
                let (host, port) = &sw.to.pgbouncer_address;
                let config = pgbouncer::read_config(&bouncer.target.config_path)?;
                let still_at_from: Vec<String> =
                    pgbouncer::entries_at(&config, &bouncer.target, &sw.from.pgbouncer_address)?
                        .into_iter()
                        .map(|e| e.name)
                        .collect();
                if !still_at_from.is_empty() {
                    pgbouncer::write_config(
                        &bouncer.target.config_path,
                        &pgbouncer::repoint(&config, &still_at_from, host, *port),
                    )?;
                    bouncer.admin.command("RELOAD").await?;
                }
                for entry in &bouncer.entries {
                    // Drops any server connection still open to `from` once it is released.
                    bouncer
                        .admin
                        .command(&format!("RECONNECT {}", sql::ident(entry)))
                        .await?;
                }
                if bouncer.raised_here {
                    for entry in &bouncer.entries {
                        bouncer
                            .admin
                            .command(&format!("RESUME {}", sql::ident(entry)))
                            .await?;
                    }
                    Ok(())
                } else {
                    resume_paused(&bouncer.admin, bouncer.entries.iter().cloned()).await
                }
            }
            Fence::Direct => Ok(()),
            Fence::Routed(routed) => {
                routed.routed.router.route_to(sw.to.side).await?;
                try_join_all(routed.poolers.iter().map(|p| async {
                    p.admin.command("RECONNECT").await?;
                    resume_all(&p.admin).await
                }))
                .await
                .map(|_| ())
            }
        }
    }
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
