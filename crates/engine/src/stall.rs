//! An initial copy that stopped moving (LESSONS.md 5: no silent waiting). [`CopyWatch`]
//! follows each database's copy progress; when nothing moved for `Plan::copy_stall_after`,
//! the cause is read from the target — what its replication workers wait for and which
//! sessions hold them up, whether a table-sync worker could start at all, and the newest
//! warning or error of its log — and reported as [`Event::CopyStalled`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::decide::Action;
use crate::error::{Result, Side, SqlContext};
use crate::events::Event;
use crate::observe::{self, Database};
use crate::upgrade::Upgrade;

/// What counts as movement: tables ready, tables copying, bytes copied.
type Progress = (i64, i64, i64);

struct Mark {
    progress: Progress,
    moved_at: Instant,
    reported_at: Option<Instant>,
}

/// The last movement of each database's initial copy.
pub(crate) struct CopyWatch {
    bound: Duration,
    marks: HashMap<String, Mark>,
}

impl CopyWatch {
    pub(crate) fn new(bound: Duration) -> CopyWatch {
        CopyWatch {
            bound,
            marks: HashMap::new(),
        }
    }

    /// Records the progress of every database still copying; returns those that have not
    /// moved for the bound, with how long — again after each further bound while they stay put.
    fn stalled<'a>(
        &mut self,
        actions: &'a [(Database, Action)],
        now: Instant,
    ) -> Vec<(&'a Database, u32, Duration)> {
        let copying: Vec<(&Database, u32, Progress)> = actions
            .iter()
            .filter(|(_, action)| *action == Action::WaitForCopy)
            .filter_map(|(db, _)| {
                let sub = db.forward.subscription.as_ref()?;
                Some((
                    db,
                    sub.oid,
                    (sub.tables_ready, sub.tables_copying, sub.bytes_copied),
                ))
            })
            .collect();
        self.marks
            .retain(|name, _| copying.iter().any(|(db, _, _)| &db.name == name));
        let mut stalled = Vec::new();
        for (db, subscription, progress) in copying {
            let fresh = Mark {
                progress,
                moved_at: now,
                reported_at: None,
            };
            let mark = self.marks.entry(db.name.clone()).or_insert(fresh);
            if mark.progress != progress {
                *mark = Mark {
                    progress,
                    moved_at: now,
                    reported_at: None,
                };
                continue;
            }
            let still_for = now.duration_since(mark.moved_at);
            let due = mark
                .reported_at
                .is_none_or(|at| now.duration_since(at) >= self.bound);
            if still_for >= self.bound && due {
                mark.reported_at = Some(now);
                stalled.push((db, subscription, still_for));
            }
        }
        stalled
    }
}

impl Upgrade {
    /// Reports each database whose initial copy has not moved for the plan's bound, with the
    /// cause read from the target.
    pub(crate) async fn report_stalled_copies(
        &mut self,
        watch: &mut CopyWatch,
        actions: &[(Database, Action)],
    ) -> Result<()> {
        for (db, subscription, still_for) in watch.stalled(actions, Instant::now()) {
            self.db(&db.name).await?;
            let target = self
                .conns(&db.name)
                .target
                .as_ref()
                .expect("a subscription implies the database");
            let cause = stall_cause(target, subscription).await?;
            self.emit(Event::CopyStalled {
                database: db.name.clone(),
                stalled_for_s: still_for.as_secs(),
                cause,
            });
        }
        Ok(())
    }

    /// What evidently holds up a database's initial copy now — a worker waiting for a lock, or
    /// no table-sync worker able to start — for `status`, which sees one moment only.
    pub(crate) async fn copy_obstacle(
        &self,
        db: &Database,
        action: &Action,
    ) -> Result<Option<String>> {
        let (Action::WaitForCopy, Some(sub), Some(connections)) = (
            action,
            &db.forward.subscription,
            self.connections.get(&db.name),
        ) else {
            return Ok(None);
        };
        let target = connections
            .target
            .as_ref()
            .expect("a subscription implies the database");
        let workers = workers(target, sub.oid).await?;
        let mut causes = lock_waits(target, &workers).await?;
        causes.extend(missing_sync_worker(target, sub.oid, &workers, true).await?);
        if causes.is_empty() {
            return Ok(None);
        }
        causes.extend(observe::newest_log_entry(target, &["WARNING", "ERROR"]).await);
        Ok(Some(causes.join("; ")))
    }
}

/// Everything the target shows about a subscription's stalled copy.
async fn stall_cause(target: &Client, subscription: u32) -> Result<String> {
    let workers = workers(target, subscription).await?;
    let mut causes = lock_waits(target, &workers).await?;
    causes.extend(missing_sync_worker(target, subscription, &workers, false).await?);
    causes.extend(
        workers
            .iter()
            .filter(|w| w.blockers.is_empty())
            .filter_map(|w| {
                let (kind, event) = w.wait.as_ref()?;
                // Activity: a worker's main loop idling for work, no obstacle.
                (kind != "Activity").then(|| format!("{} waits on {kind}/{event}", w.describe()))
            }),
    );
    causes.extend(observe::newest_log_entry(target, &["WARNING", "ERROR"]).await);
    if causes.is_empty() {
        causes.push(
            "the target shows no cause: its replication workers wait on nothing and its log has no \
             warning; look at the source (a long-running transaction there delays each table-sync \
             worker's start)"
                .into(),
        );
    }
    Ok(causes.join("; "))
}

/// One replication worker of the subscription, as the target sees it.
struct Worker {
    pid: i32,
    /// The table a table-sync worker copies; None for the apply worker.
    table: Option<String>,
    wait: Option<(String, String)>,
    blockers: Vec<i32>,
}

impl Worker {
    fn describe(&self) -> String {
        match &self.table {
            Some(table) => format!("the table-sync worker for {table} (pid {})", self.pid),
            None => format!("the apply worker (pid {})", self.pid),
        }
    }
}

async fn workers(target: &Client, subscription: u32) -> Result<Vec<Worker>> {
    Ok(target
        .query(
            "SELECT w.pid, CASE WHEN w.relid IS NOT NULL THEN coalesce(format('%I.%I', n.nspname, c.relname), w.relid::text) END,
                    a.wait_event_type::text, a.wait_event::text, pg_blocking_pids(w.pid)
             FROM pg_stat_subscription w
             LEFT JOIN pg_stat_activity a ON a.pid = w.pid
             LEFT JOIN pg_class c ON c.oid = w.relid LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE w.subid = $1 AND w.pid IS NOT NULL ORDER BY w.pid",
            &[&subscription],
        )
        .await
        .on(Side::Target, "reading the replication workers")?
        .iter()
        .map(|r| Worker {
            pid: r.get(0),
            table: r.get(1),
            wait: r.get::<_, Option<String>>(2).zip(r.get(3)),
            blockers: r.get(4),
        })
        .collect())
}

/// The workers that wait for a lock, and who holds it.
async fn lock_waits(target: &Client, workers: &[Worker]) -> Result<Vec<String>> {
    let mut waits = Vec::new();
    for worker in workers.iter().filter(|w| !w.blockers.is_empty()) {
        let holders: Vec<String> = target
            .query(
                "SELECT format('pid %s (user %s, application %s, %s for %s s, last statement: %s)',
                               pid, coalesce(usename::text, '?'), coalesce(nullif(application_name, ''), '-'),
                               coalesce(state, '?'), coalesce(extract(epoch FROM now() - state_change)::int8::text, '?'),
                               regexp_replace(left(coalesce(query, '?'), 200), '\\s+', ' ', 'g'))
                 FROM pg_stat_activity WHERE pid = ANY ($1) ORDER BY pid",
                &[&worker.blockers],
            )
            .await
            .on(Side::Target, "reading the sessions holding the lock")?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let kind = worker
            .wait
            .as_ref()
            .map_or_else(String::new, |(kind, event)| format!(" ({kind}/{event})"));
        let terminate: Vec<String> = worker
            .blockers
            .iter()
            .map(|pid| format!("SELECT pg_terminate_backend({pid})"))
            .collect();
        waits.push(format!(
            "{} waits for a lock{kind} held by {}: end that transaction (COMMIT or ROLLBACK in that \
             session, or {} on the target) and the copy goes on",
            worker.describe(),
            holders.join(", "),
            terminate.join("; ")
        ));
    }
    Ok(waits)
}

/// Tables waiting for a copy that no table-sync worker runs for. `evident_only`: only when the
/// target's settings or worker slots say none can start (a moment between two workers is not).
async fn missing_sync_worker(
    target: &Client,
    subscription: u32,
    workers: &[Worker],
    evident_only: bool,
) -> Result<Option<String>> {
    if workers.iter().any(|w| w.table.is_some()) {
        return Ok(None);
    }
    let row = target
        .query_one(
            "SELECT (SELECT count(*) FROM pg_subscription_rel WHERE srsubid = $1 AND srsubstate NOT IN ('r', 's')),
                    (SELECT subenabled FROM pg_subscription WHERE oid = $1),
                    current_setting('max_sync_workers_per_subscription')::int8,
                    current_setting('max_logical_replication_workers')::int8,
                    (SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL)",
            &[&subscription],
        )
        .await
        .on(Side::Target, "reading the replication worker settings")?;
    let (waiting, enabled, per_subscription, slots, running): (i64, Option<bool>, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    if waiting == 0 {
        return Ok(None);
    }
    let tables =
        format!("{waiting} table(s) wait for their initial copy and no table-sync worker runs");
    Ok(if enabled == Some(false) {
        Some(format!(
            "{tables}: the subscription is disabled (ALTER SUBSCRIPTION ... ENABLE on the target)"
        ))
    } else if per_subscription < 1 {
        Some(format!(
            "{tables}: the target has max_sync_workers_per_subscription = {per_subscription}; \
             set it to 2 and reload the target"
        ))
    } else if running >= slots {
        Some(format!(
            "{tables}: all {slots} logical replication worker slots of the target are taken \
             (max_logical_replication_workers = {slots}, {running} running); raise it on the target \
             and restart it, or stop another subscription there"
        ))
    } else if evident_only {
        None
    } else {
        Some(tables)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{Stream, Subscription};

    fn copying(ready: i64, bytes: i64) -> Vec<(Database, Action)> {
        vec![(
            Database {
                name: "app".into(),
                forward: Stream {
                    subscription: Some(Subscription {
                        tables_total: 4,
                        tables_ready: ready,
                        bytes_copied: bytes,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            },
            Action::WaitForCopy,
        )]
    }

    #[test]
    fn a_copy_is_stalled_after_the_bound_without_movement_and_reported_once_per_bound() {
        let bound = Duration::from_secs(60);
        let mut watch = CopyWatch::new(bound);
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        assert!(watch.stalled(&copying(1, 0), at(0)).is_empty());
        assert!(watch.stalled(&copying(1, 0), at(59)).is_empty());
        let stalled_for = |watch: &mut CopyWatch, s| {
            let actions = copying(1, 0);
            watch
                .stalled(&actions, at(s))
                .iter()
                .map(|(db, _, still_for)| (db.name.clone(), *still_for))
                .collect::<Vec<_>>()
        };
        assert_eq!(stalled_for(&mut watch, 60), [("app".to_string(), bound)]);
        assert!(stalled_for(&mut watch, 61).is_empty());
        assert_eq!(
            stalled_for(&mut watch, 120),
            [("app".to_string(), Duration::from_secs(120))]
        );
    }

    #[test]
    fn movement_of_tables_or_bytes_restarts_the_clock() {
        let mut watch = CopyWatch::new(Duration::from_secs(60));
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        watch.stalled(&copying(1, 0), at(0));
        assert!(watch.stalled(&copying(1, 5000), at(50)).is_empty());
        assert!(watch.stalled(&copying(2, 0), at(100)).is_empty());
        assert!(watch.stalled(&copying(2, 0), at(159)).is_empty());
        assert_eq!(watch.stalled(&copying(2, 0), at(160)).len(), 1);
    }

    #[test]
    fn a_database_that_finished_copying_is_forgotten() {
        let mut watch = CopyWatch::new(Duration::from_secs(60));
        let start = Instant::now();
        watch.stalled(&copying(1, 0), start);
        let mut done = copying(4, 0);
        done[0].1 = Action::Analyze;
        assert!(watch
            .stalled(&done, start + Duration::from_secs(90))
            .is_empty());
        assert!(watch.marks.is_empty());
    }
}
