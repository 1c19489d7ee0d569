//! One pgshift at a time per upgrade: session advisory locks, held on both servers for the
//! whole command by sessions of their own, so that the holder can be named and the locks go
//! the moment its process dies (the server ends a session whose client is gone).
//!
//! - The **upgrade lock** is taken in every moved database of the source (an advisory lock is
//!   scoped to its database) and, keyed by the database's name, in the target's maintenance
//!   database. Every command that changes something holds it; `check` and `status` do not.
//! - The **fence lock** is held by the fence guard (see `guard`) from before the fence until
//!   it is lifted. A command that got the upgrade lock waits for the fence lock before it looks
//!   at the servers, so that it never recovers a fence that a live guard is still handling.

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;

use crate::endpoint::Endpoint;
use crate::error::{Error, Result, Side, SqlContext};
use crate::names::{FENCE_LOCK_CLASS, UPGRADE_LOCK_CLASS};
use crate::session::open;
use crate::sql;

/// How long a command waits for a fence guard to finish: the longest `--max-pause` (60 s) and
/// the guard's grace, with room to spare.
const FENCE_GUARD_WAIT: Duration = Duration::from_secs(75);

/// Who holds a lock, as the server shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    /// The holder's description: command, process id and host (its session's application_name).
    pub label: String,
    /// The server process of the holding session.
    pub server_pid: i32,
    pub client_address: Option<String>,
    /// When the holding session started.
    pub since: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} since {}", self.label, self.since)?;
        if let Some(address) = &self.client_address {
            write!(f, ", connected from {address}")?;
        }
        write!(f, " (server pid {})", self.server_pid)
    }
}

/// The description a holder leaves in its sessions' `application_name` (at most 63 bytes):
/// command, process id and host.
pub fn holder_label(command: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown host".into());
    let mut label = format!("pgshift {command} pid {} on {host}", std::process::id());
    while label.len() > 63 {
        label.pop();
    }
    label
}

/// Where a lock is taken: a session's endpoint and the lock's key there.
#[derive(Debug, Clone)]
pub(crate) struct Place {
    pub endpoint: Endpoint,
    pub key: Key,
}

/// The second int4 of an advisory lock's key: fixed in a database of the source (the lock is
/// scoped to it), the database's name hashed in the target's maintenance database.
#[derive(Debug, Clone)]
pub(crate) enum Key {
    Fixed,
    Named(String),
}

impl Key {
    /// SQL for the key as int4, with the database name as parameter `$2` if it has one.
    fn sql(&self) -> &'static str {
        match self {
            Key::Fixed => "0",
            Key::Named(_) => "hashtext($2::text)",
        }
    }
}

/// Locks held for as long as this lives: dropping it ends the sessions and with them the locks.
pub(crate) struct Held {
    sessions: Vec<(Client, Side, i32)>,
}

impl Held {
    /// The server processes of the holding sessions on `side`, which direct mode's fence must
    /// not end (process ids are per server: never mix them up).
    pub fn pids(&self, side: Side) -> impl Iterator<Item = i32> + '_ {
        self.sessions
            .iter()
            .filter(move |(_, s, _)| *s == side)
            .map(|(_, _, pid)| *pid)
    }
}

/// Takes the upgrade lock at every place, or fails with `Busy` naming the holder. Waits for a
/// fence guard that still holds its fence lock (`fence_places`) to finish, then lets go of it.
pub(crate) async fn take_upgrade_lock(
    places: &[Place],
    fence_places: &[Place],
    label: &str,
) -> Result<Held> {
    let held = take(places, UPGRADE_LOCK_CLASS, label, "").await?;
    for place in fence_places {
        wait_for_fence_guard(place, label).await?;
    }
    Ok(held)
}

/// The fence guard's lock: taken (waiting for none: the guard starts only under a live upgrade
/// lock) before the fence is raised, held until clients are released.
pub(crate) async fn take_fence_lock(places: &[Place], label: &str) -> Result<Held> {
    take(places, FENCE_LOCK_CLASS, label, "a fence guard: ").await
}

/// Takes lock `class` at every place in a session of its own, or fails with `Busy` naming
/// (after `what`) whoever holds it.
async fn take(places: &[Place], class: i32, label: &str, what: &str) -> Result<Held> {
    let mut held = Held {
        sessions: Vec::new(),
    };
    for place in places {
        let session = labelled_session(&place.endpoint, label).await?;
        if !try_lock(&session.0, place, class).await? {
            let holder = holder(&session.0, place, class).await?;
            return Err(Error::Busy {
                holder: format!("{what}{}", describe(holder)),
            });
        }
        held.sessions
            .push((session.0, place.endpoint.side, session.1));
    }
    Ok(held)
}

/// Who holds the upgrade lock now, if anyone (for `status`).
pub(crate) async fn upgrade_lock_holder(client: &Client, place: &Place) -> Result<Option<Holder>> {
    holder(client, place, UPGRADE_LOCK_CLASS).await
}

/// Who holds the fence lock now, if anyone (for `status`).
pub(crate) async fn fence_lock_holder(client: &Client, place: &Place) -> Result<Option<Holder>> {
    holder(client, place, FENCE_LOCK_CLASS).await
}

async fn wait_for_fence_guard(place: &Place, label: &str) -> Result<()> {
    let (session, _) = labelled_session(&place.endpoint, label).await?;
    if try_lock(&session, place, FENCE_LOCK_CLASS).await? {
        return Ok(());
    }
    let guard = holder(&session, place, FENCE_LOCK_CLASS).await?;
    tracing::warn!(guard = %describe(guard.clone()), "waiting for a fence guard to release clients");
    session
        .batch_execute(&format!(
            "SET lock_timeout = {}",
            sql::literal(&format!("{}ms", FENCE_GUARD_WAIT.as_millis()))
        ))
        .await
        .on(place.endpoint.side, "preparing to wait for a fence guard")?;
    let waited = match &place.key {
        Key::Fixed => {
            session
                .execute("SELECT pg_advisory_lock($1, 0)", &[&FENCE_LOCK_CLASS])
                .await
        }
        Key::Named(name) => {
            session
                .execute(
                    "SELECT pg_advisory_lock($1, hashtext($2::text))",
                    &[&FENCE_LOCK_CLASS, name],
                )
                .await
        }
    };
    match waited {
        Ok(_) => Ok(()),
        // 55P03: lock_timeout passed while the guard still held its lock.
        Err(error) if error.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
            Err(Error::Busy {
                holder: format!(
                    "a fence guard that has been releasing clients for over {FENCE_GUARD_WAIT:?}: {}",
                    describe(guard)
                ),
            })
        }
        Err(error) => Err(error).on(place.endpoint.side, "waiting for a fence guard"),
    }
}

async fn labelled_session(endpoint: &Endpoint, label: &str) -> Result<(Client, i32)> {
    let (client, pid) = open(endpoint).await?;
    client
        .batch_execute(&format!("SET application_name = {}", sql::literal(label)))
        .await
        .on(endpoint.side, "naming pgshift's session")?;
    Ok((client, pid))
}

async fn try_lock(client: &Client, place: &Place, class: i32) -> Result<bool> {
    let query = format!("SELECT pg_try_advisory_lock($1, {})", place.key.sql());
    let row = match &place.key {
        Key::Fixed => client.query_one(&query, &[&class]).await,
        Key::Named(name) => client.query_one(&query, &[&class, name]).await,
    };
    Ok(row.on(place.endpoint.side, "taking pgshift's lock")?.get(0))
}

async fn holder(client: &Client, place: &Place, class: i32) -> Result<Option<Holder>> {
    let query = format!(
        "SELECT l.pid, coalesce(a.application_name, ''), a.client_addr::text,
                coalesce(to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS \"UTC\"'), 'an unknown time')
         FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND l.classid = $1::int4::oid AND l.objid = ({})::oid
         LIMIT 1",
        place.key.sql()
    );
    let row = match &place.key {
        Key::Fixed => client.query_opt(&query, &[&class]).await,
        Key::Named(name) => client.query_opt(&query, &[&class, name]).await,
    }
    .on(
        place.endpoint.side,
        "looking for the holder of pgshift's lock",
    )?;
    Ok(row.map(|r| Holder {
        server_pid: r.get(0),
        label: match r.get::<_, String>(1) {
            label if label.is_empty() => {
                "a pgshift process whose session is hidden from this role".into()
            }
            label => label,
        },
        client_address: r.get(2),
        since: r.get(3),
    }))
}

fn describe(holder: Option<Holder>) -> String {
    holder.map_or_else(
        || "a process that let go of the lock just now (run again)".into(),
        |h| h.to_string(),
    )
}

/// The places of the upgrade lock: each moved database of the source that exists, and the
/// target's maintenance database keyed by each name.
pub(crate) fn places(
    source: &Endpoint,
    source_databases: &[String],
    target_admin: &Endpoint,
    databases: &[String],
) -> Vec<Place> {
    source_databases
        .iter()
        .map(|db| Place {
            endpoint: source.with_dbname(db),
            key: Key::Fixed,
        })
        .chain(databases.iter().map(|db| Place {
            endpoint: target_admin.clone(),
            key: Key::Named(db.clone()),
        }))
        .collect()
}

/// The fence guard's places: the target's maintenance database, keyed by each moved database.
pub(crate) fn fence_places(target_admin: &Endpoint, databases: &[String]) -> Vec<Place> {
    databases
        .iter()
        .map(|db| Place {
            endpoint: target_admin.clone(),
            key: Key::Named(db.clone()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_names_command_process_and_host_in_at_most_63_bytes() {
        let label = holder_label("cutover");
        assert!(label.starts_with(&format!("pgshift cutover pid {} on ", std::process::id())));
        assert!(holder_label(&"x".repeat(100)).len() <= 63);
    }

    #[test]
    fn a_holder_reads_as_who_since_when_and_from_where() {
        let holder = Holder {
            label: "pgshift run pid 7 on db1".into(),
            server_pid: 42,
            client_address: Some("127.0.0.1/32".into()),
            since: "2026-12-01 10:00:00 UTC".into(),
        };
        assert_eq!(
            holder.to_string(),
            "pgshift run pid 7 on db1 since 2026-12-01 10:00:00 UTC, connected from 127.0.0.1/32 (server pid 42)"
        );
    }
}
