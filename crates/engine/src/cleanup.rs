//! Taking pgshift's objects away: `abort` before the switch (the source ends exactly as it
//! was), `cleanup` after it. Only objects named `pgshift_*` (and the target databases pgshift
//! created) are dropped.

use serde::Serialize;
use tokio_postgres::Client;

use crate::error::{Error, Result, Side, SqlContext};
use crate::events::Phase;
use crate::names::{self, step};
use crate::observe::{self, Action, Database};
use crate::sql;
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
        if observed.iter().any(|db| db.has(step::SWITCHED)) {
            return Err(Error::State(
                "the cutover has switched traffic to the target, so abort can no longer undo the upgrade; \
                 run `pgshift cleanup` to remove pgshift's replication objects"
                    .into(),
            ));
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
        if let Some(db) = observed.iter().find(|db| !db.has(step::SWITCHED)) {
            return Err(Error::State(format!(
                "database {} has not been cut over; cleanup is for a finished upgrade. \
                 To stop an unfinished one, run `pgshift abort`",
                db.name
            )));
        }
        let mut removed = Removed::default();
        for db in &observed {
            self.remove_replication(db, &mut removed).await?;
            if let Some(target) = self
                .connections
                .get(&db.name)
                .and_then(|c| c.target.as_ref())
            {
                target
                    .batch_execute(&sql::drop_meta_schema())
                    .await
                    .on(Side::Target, "dropping pgshift's schema")?;
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

    /// The subscription on the target, then its slot and any table-sync slots on the source.
    async fn remove_replication(&mut self, db: &Database, removed: &mut Removed) -> Result<()> {
        let name = db.subscription_name();
        if db.subscription.is_some() {
            let target = self.connections[&db.name]
                .target
                .as_ref()
                .expect("a subscription implies the database");
            // DROP SUBSCRIPTION also drops the slot on the source; if the source cannot be
            // reached for that, detach the slot and drop it below.
            if let Err(error) = target
                .batch_execute(&format!("DROP SUBSCRIPTION {}", sql::ident(&name)))
                .await
            {
                tracing::warn!(error = %crate::error::server_message(&error), "dropping the subscription with its slot failed; detaching it");
                for statement in sql::detach_and_drop_subscription(&name) {
                    target
                        .batch_execute(&statement)
                        .await
                        .on(Side::Target, "dropping the subscription")?;
                }
            }
            removed.subscriptions.push(name.clone());
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
        let slots: Vec<String> = self
            .source_admin
            .query(
                "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name = $1 OR slot_name LIKE $2",
                &[&name, &names::sync_slot_pattern(&target_id)],
            )
            .await
            .on(Side::Source, "listing replication slots")?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for slot in slots {
            drop_slot(&self.source_admin, &slot).await?;
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
        if db.publication {
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
            source
                .batch_execute(&sql::drop_meta_schema())
                .await
                .on(Side::Source, "dropping pgshift's schema")?;
            removed
                .marker_schemas
                .push(format!("{}/{}", db.name, names::META_SCHEMA));
        }
        Ok(())
    }

    /// Where things stand, read from both servers.
    pub async fn status(&mut self) -> Result<Status> {
        let observed = self.observe().await?;
        let mut databases = Vec::new();
        for db in observed {
            let action = observe::decide(&db);
            let apply_errors = db.subscription.as_ref().map_or(0, |s| s.errors);
            let apply_problem = match (&db.subscription, self.connections.get(&db.name)) {
                (Some(sub), Some(connections))
                    if sub.errors > 0 || (sub.enabled && !sub.worker_running) =>
                {
                    let target = connections
                        .target
                        .as_ref()
                        .expect("a subscription implies the database");
                    Some(observe::apply_failure_cause(&connections.source, target).await?)
                }
                _ => None,
            };
            let apply_problem = match apply_problem {
                None => self.copy_obstacle(&db, &action).await?,
                known => known,
            };
            databases.push(DatabaseStatus {
                phase: phase_of(&action),
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
        Ok(Status { phase, databases })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub phase: Phase,
    pub databases: Vec<DatabaseStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatabaseStatus {
    pub phase: Phase,
    pub next: String,
    pub apply_errors: i64,
    /// The cause of failing replication, or of an initial copy held up, as the target reports it.
    pub apply_problem: Option<String>,
    pub database: Database,
}

fn phase_of(action: &Action) -> Phase {
    match action {
        Action::CreateDatabase => Phase::Preflight,
        Action::CopySchema => Phase::Schema,
        Action::ProtectTarget
        | Action::CreateSourceMeta
        | Action::CreatePublication
        | Action::CreateSlot
        | Action::CreateSubscription
        | Action::Broken(_)
        | Action::WaitForCopy => Phase::Replicate,
        Action::Analyze => Phase::CatchUp,
        Action::Synced => Phase::ReadyForCutover,
        Action::Switched => Phase::Done,
    }
}

/// Drops a slot, waiting briefly for a walsender that still holds it to let go.
async fn drop_slot(source: &Client, slot: &str) -> Result<()> {
    for attempt in 0..50 {
        match source
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            Ok(_) => return Ok(()),
            // 55006: the slot is active; its walsender is shutting down.
            Err(error) if error.code().map(|c| c.code()) == Some("55006") && attempt < 49 => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(error) if error.code().map(|c| c.code()) == Some("42704") => return Ok(()),
            Err(error) => {
                return Err(error).on(Side::Source, &format!("dropping replication slot {slot}"))
            }
        }
    }
    Ok(())
}
