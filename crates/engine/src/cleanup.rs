//! Taking pgshift's objects away: `abort` before the switch (the source ends exactly as it
//! was), `cleanup` after it. Only objects named `pgshift_*` (and the target databases pgshift
//! created) are dropped.

use serde::Serialize;

use crate::decide::{decide, Direction};
use crate::error::{Error, Result, Side, SqlContext};
use crate::events::Phase;
use crate::lock::{self, Holder};
use crate::names::{self, step};
use crate::observe::{self, Database, Stream};
use crate::sql;
use crate::streams::drop_slot;
use crate::upgrade::Upgrade;

/// What `abort` or `cleanup` removed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Removed {
    pub subscriptions: Vec<String>,
    pub slots: Vec<String>,
    pub publications: Vec<String>,
    pub marker_schemas: Vec<String>,
    pub target_databases: Vec<String>,
    pub notes: Vec<String>,
}

impl Upgrade {
    /// Stops an unfinished upgrade and removes everything pgshift created on both sides.
    pub async fn abort(&mut self) -> Result<Removed> {
        crate::cutover::recover(self).await?;
        let observed = self.observe().await?;
        if let Some(db) = observed.iter().find(|db| db.switched()) {
            return Err(Error::AlreadySwitched {
                database: db.name.clone(),
                at: db
                    .switched_at
                    .clone()
                    .unwrap_or_else(|| "an unrecorded time".into()),
                next: if db.cleaned_up {
                    "The upgrade is finished and cleaned up; there is nothing left to do"
                } else {
                    "Run `pgshift cleanup` to remove pgshift's replication objects"
                },
            });
        }
        let mut removed = Removed::default();
        for db in &observed {
            self.remove_replication(db, &mut removed).await?;
            self.remove_target_database(db, &mut removed).await?;
            self.remove_source_objects(db, &mut removed).await?;
        }
        removed.notes.push(
            "roles copied to the target stay there (roles are shared by all databases of a server)"
                .into(),
        );
        Ok(removed)
    }

    /// After a finished upgrade: drops the subscription, its slot, the publication and the
    /// marker tables. The source's databases stay read-only if direct mode fenced them.
    pub async fn cleanup(&mut self) -> Result<Removed> {
        crate::cutover::recover(self).await?;
        let observed = self.observe().await?;
        if let Some(db) = observed.iter().find(|db| !db.switched()) {
            return Err(Error::NotSwitched {
                database: db.name.clone(),
            });
        }
        let mut removed = Removed::default();
        for db in &observed {
            let nothing_left = !db.forward.publication
                && !db.source_meta
                && db.forward == Stream::default()
                && db.back == Stream::default();
            if db.cleaned_up && nothing_left {
                removed.notes.push(format!(
                    "database {} was switched at {} and is already cleaned up; nothing left to remove",
                    db.name,
                    db.switched_at.as_deref().unwrap_or("an unrecorded time")
                ));
                continue;
            }
            self.remove_replication(db, &mut removed).await?;
            if let Some(target) = self
                .connections
                .get(&db.name)
                .and_then(|c| c.target.as_ref())
            {
                // The schema stays with the switch record on it: abort must never undo this.
                target
                    .batch_execute(&format!(
                        "{} {}",
                        crate::verify::sql::drop_objects(),
                        sql::drop_meta_tables()
                    ))
                    .await
                    .on(Side::Target, "dropping pgshift's tables")?;
                removed.notes.push(format!(
                    "database {} on the target keeps the empty schema {} whose comment records the switch, \
                     so that abort can never undo the upgrade",
                    db.name,
                    names::META_SCHEMA
                ));
            }
            self.remove_source_objects(db, &mut removed).await?;
            if db.source_read_only {
                removed.notes.push(format!(
                    "database {} on the source stays read-only, so that nothing writes to the old server; \
                     ALTER DATABASE {} RESET default_transaction_read_only undoes that",
                    db.name,
                    sql::ident(&db.name)
                ));
            }
        }
        Ok(removed)
    }

    /// Both streams (subscriptions and slots), the target's publication for the window, and
    /// any table-sync slots the initial copy left on the source.
    async fn remove_replication(&mut self, db: &Database, removed: &mut Removed) -> Result<()> {
        self.db(&db.name).await?;
        if db.target_exists {
            for direction in [Direction::Back, Direction::Forward] {
                let stream = db.stream(direction);
                let name = db.stream_name(direction);
                if stream.subscription.is_none() && stream.slot.is_none() {
                    continue;
                }
                self.stream(db, direction).drop().await?;
                if stream.subscription.is_some() {
                    removed.subscriptions.push(name.clone());
                }
                if stream.slot.is_some() {
                    removed.slots.push(name);
                }
            }
            if db.back.publication {
                self.target_of(&db.name)
                    .batch_execute(&format!(
                        "DROP PUBLICATION IF EXISTS {}",
                        sql::ident(names::BACK_PUBLICATION)
                    ))
                    .await
                    .on(Side::Target, "dropping the rollback window's publication")?;
                removed.publications.push(format!(
                    "{}/{} (target)",
                    db.name,
                    names::BACK_PUBLICATION
                ));
            }
        } else if db.forward.slot.is_some() {
            drop_slot(&self.source_admin, Side::Source, &db.subscription_name()).await?;
            removed.slots.push(db.subscription_name());
        }
        let target_id: String = self
            .target_admin
            .query_one(
                "SELECT system_identifier::text FROM pg_control_system()",
                &[],
            )
            .await
            .on(Side::Target, "reading the system identifier")?
            .get(0);
        let sync_slots: Vec<String> = self
            .source_admin
            .query(
                "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE $1",
                &[&names::sync_slot_pattern(&target_id)],
            )
            .await
            .on(Side::Source, "listing replication slots")?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for slot in sync_slots {
            drop_slot(&self.source_admin, Side::Source, &slot).await?;
            removed.slots.push(slot);
        }
        Ok(())
    }

    async fn remove_target_database(&mut self, db: &Database, removed: &mut Removed) -> Result<()> {
        if !db.target_exists {
            return Ok(());
        }
        let created_by_us: bool = self
            .target_admin
            .query_one(
                "SELECT coalesce(shobj_description(oid, 'pg_database') = $2, false) FROM pg_database WHERE datname = $1",
                &[&db.name, &sql::CREATED_DATABASE_COMMENT],
            )
            .await
            .on(Side::Target, "reading the database comment")?
            .get(0);
        if created_by_us {
            // Close our own sessions first; FORCE ends any other.
            if let Some(connections) = self.connections.get_mut(&db.name) {
                connections.target = None;
            }
            self.target_admin
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    sql::ident(&db.name)
                ))
                .await
                .on(Side::Target, "dropping the target database pgshift created")?;
            removed.target_databases.push(db.name.clone());
        } else if let Some(target) = self
            .connections
            .get(&db.name)
            .and_then(|c| c.target.as_ref())
        {
            target
                .batch_execute(&sql::drop_meta_schema())
                .await
                .on(Side::Target, "dropping pgshift's schema")?;
            self.target_admin
                .batch_execute(&sql::set_database_read_only(&db.name, false))
                .await
                .on(Side::Target, "making the target database writable again")?;
            removed.notes.push(format!(
                "database {} existed on the target before pgshift; the schema restored into it stays",
                db.name
            ));
        }
        Ok(())
    }

    async fn remove_source_objects(&mut self, db: &Database, removed: &mut Removed) -> Result<()> {
        self.db(&db.name).await?;
        let source = &self.conns(&db.name).source;
        if db.forward.publication {
            source
                .batch_execute(&format!(
                    "DROP PUBLICATION IF EXISTS {}",
                    sql::ident(names::PUBLICATION)
                ))
                .await
                .on(Side::Source, "dropping the publication")?;
            removed
                .publications
                .push(format!("{}/{}", db.name, names::PUBLICATION));
        }
        if db.source_meta {
            // A source that was once a target keeps that upgrade's switch record.
            let keep = observe::switch_record(source).await?.is_some();
            source
                .batch_execute(&if keep {
                    // What a killed `verify` left, beside the marker and state tables.
                    format!(
                        "{} {}",
                        crate::verify::sql::drop_objects(),
                        sql::drop_meta_tables()
                    )
                } else {
                    sql::drop_meta_schema()
                })
                .await
                .on(Side::Source, "dropping pgshift's schema")?;
            removed
                .marker_schemas
                .push(format!("{}/{}", db.name, names::META_SCHEMA));
        }
        Ok(())
    }

    /// Where things stand, read from both servers: each database's phase, who holds the
    /// upgrade lock, and a fence that is up.
    pub async fn status(&mut self) -> Result<Status> {
        let observed = self.observe().await?;
        let mut databases = Vec::new();
        let mut fence = None;
        for db in observed {
            let action = decide(&db, &self.plan.policy(false));
            // The stream that runs now: forward until the switch, back in the window.
            let running = match db.serving() {
                Side::Target => &db.back,
                _ => &db.forward,
            };
            let apply_errors = running.subscription.as_ref().map_or(0, |s| s.errors);
            let failing = running
                .subscription
                .as_ref()
                .is_some_and(|sub| sub.errors > 0 || (sub.enabled && !sub.worker_running));
            let apply_problem = match failing {
                true => Some(self.stream_failure_cause(&db.name).await?),
                false => None,
            };
            let apply_problem = match apply_problem {
                None => self.copy_obstacle(&db, &action).await?,
                known => known,
            };
            for fence_step in [step::FENCED, step::FENCED_BACK] {
                if fence.is_none() && db.has(fence_step) {
                    fence = Some(self.fence_status(&db.name, fence_step).await?);
                }
            }
            databases.push(DatabaseStatus {
                phase: action.phase(),
                serving: db.serving(),
                next: format!("{action:?}"),
                apply_errors,
                apply_problem,
                database: db,
            });
        }
        let phase = databases
            .iter()
            .map(|d| d.phase)
            .min_by_key(|p| *p as u8)
            .unwrap_or(Phase::Preflight);
        Ok(Status {
            phase,
            databases,
            held_by: self.upgrade_lock_holder().await?,
            fence,
        })
    }

    /// The pgshift process holding the upgrade lock, if one does.
    async fn upgrade_lock_holder(&mut self) -> Result<Option<Holder>> {
        let Some(first) = self.databases.first().cloned() else {
            return Ok(None);
        };
        self.db(&first).await?;
        let place = lock::places(
            &self.plan.source,
            std::slice::from_ref(&first),
            &self.target_admin_endpoint,
            &[],
        )
        .remove(0);
        lock::upgrade_lock_holder(&self.conns(&first).source, &place).await
    }

    /// A fence recorded on `database`'s target: since when, by whom, and its guard if alive.
    async fn fence_status(&self, database: &str, fence_step: &str) -> Result<FenceStatus> {
        let target = self
            .conns(database)
            .target
            .as_ref()
            .expect("a step implies the database");
        let row = target
            .query_one(
                &format!(
                    "SELECT coalesce(value, ''), to_char(done_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS \"UTC\"')
                     FROM {} WHERE step = $1",
                    sql::qualified(names::META_SCHEMA, names::STATE_TABLE)
                ),
                &[&fence_step],
            )
            .await
            .on(Side::Target, "reading the fence record")?;
        let place =
            lock::fence_places(&self.target_admin_endpoint, &[database.to_string()]).remove(0);
        let (on, fenced) = match fence_step == step::FENCED_BACK {
            true => (Side::Target, &self.target_admin),
            false => (Side::Source, &self.source_admin),
        };
        // What holds it up only explains the fence: a PgBouncer out of reach says so and
        // leaves the rest of the status intact.
        let blocking = crate::cutover::holding_up_now(&self.plan.traffic, fenced, on)
            .await
            .unwrap_or_else(|error| {
                self.emit(crate::events::Event::Warning {
                    message: format!("cannot tell what holds the fence up: {error}"),
                });
                Vec::new()
            });
        Ok(FenceStatus {
            on,
            raised_by: row.get(0),
            since: row.get(1),
            guard: lock::fence_lock_holder(&self.target_admin, &place).await?,
            blocking,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub phase: Phase,
    pub databases: Vec<DatabaseStatus>,
    /// The pgshift process working on this upgrade now, if any.
    pub held_by: Option<Holder>,
    /// A write fence that is up: clients are paused or the source is read-only.
    pub fence: Option<FenceStatus>,
}

/// A fence recorded on the target: raised by a cutover that is running, or interrupted.
#[derive(Debug, Clone, Serialize)]
pub struct FenceStatus {
    /// The server whose clients are held: the source in a cutover, the target in a rollback.
    pub on: Side,
    /// The process that raised it (command, pid, host).
    pub raised_by: String,
    pub since: String,
    /// The fence guard that releases the clients should that process die, while it lives.
    pub guard: Option<Holder>,
    /// Client sessions whose transactions hold a PAUSE up (with `--pgbouncer`).
    pub blocking: Vec<crate::pgbouncer::BlockingSession>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatabaseStatus {
    pub phase: Phase,
    /// Where clients write now.
    pub serving: Side,
    pub next: String,
    pub apply_errors: i64,
    /// The cause of failing replication, or of an initial copy held up, as the target reports it.
    pub apply_problem: Option<String>,
    pub database: Database,
}
