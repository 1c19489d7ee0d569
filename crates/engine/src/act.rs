//! Performing one database's next step (`decide::Action`). Each is idempotent: a step that
//! finds its work done, or made meanwhile by a killed run, succeeds.

use tokio_postgres::Client;

use crate::decide::{Action, Direction};
use crate::error::{Error, Result, Side, SqlContext};
use crate::events::Event;
use crate::names::{self, step};
use crate::observe::Database;
use crate::schema::{self, Tools};
use crate::sql;
use crate::streams::{self, StreamEnds};
use crate::upgrade::{record_step, Upgrade};

impl Upgrade {
    pub(crate) async fn act(&mut self, db: &Database, action: &Action) -> Result<()> {
        let name = db.name.clone();
        self.emit(Event::Step {
            database: name.clone(),
            step: format!("{action:?}"),
        });
        self.enter(action.phase());
        self.db(&name).await?;
        match action {
            Action::CreateDatabase => {
                // The database's owner may be a role the target does not have yet.
                schema::sync_roles(&self.source_admin, &self.target_admin).await?;
                schema::ensure_target_database(
                    &self.conns(&name).source,
                    &self.target_admin,
                    &name,
                )
                .await?;
                // Reconnect to pick up the new database.
                self.db(&name).await?;
            }
            Action::CopySchema if self.plan.schema_tools_in_target_image => {
                return Err(Error::SchemaCopyIsTheCallers { database: name });
            }
            Action::CopySchema => {
                let tools = Tools::locate(self.plan.pg_bin_dir.as_deref())
                    .ok_or_else(|| Error::Tool("pg_dump not found; pass --pg-bin-dir".into()))?;
                self.prepare_schema_copy(&name).await?;
                schema::sections::copy_definitions(
                    &tools,
                    &self.conns(&name).source,
                    &self.plan.source.with_dbname(&name),
                    &self.plan.target.with_dbname(&name),
                )
                .await?;
            }
            Action::ProtectTarget => {
                // Nobody but pgshift may write to the target while the source serves.
                self.target_admin
                    .batch_execute(&sql::set_database_read_only(&name, true))
                    .await
                    .on(Side::Target, "making the target database read-only")?;
            }
            Action::ProtectSource => {
                // After the switch nobody writes to the old server by mistake; the rollback
                // window's apply still does.
                self.source_admin
                    .batch_execute(&sql::set_database_read_only(&name, true))
                    .await
                    .on(Side::Source, "making the source database read-only")?;
            }
            Action::CreateSourceMeta => {
                self.conns(&name)
                    .source
                    .batch_execute(&sql::create_meta_objects(false))
                    .await
                    .on(Side::Source, "creating the marker table")?;
            }
            Action::CreatePublication => {
                streams::create_forward_publication(&self.conns(&name).source).await?
            }
            Action::CopyNewTables if self.plan.schema_tools_in_target_image => {
                return Err(Error::Broken {
                    database: name,
                    why: format!(
                        "table(s) {} were created on the source during the upgrade; create them on the target \
                         with the same definitions (pgshift then publishes them and copies their rows)",
                        tables_missing_on_target(db).join(", ")
                    ),
                });
            }
            Action::CopyNewTables => {
                let tools = Tools::locate(self.plan.pg_bin_dir.as_deref())
                    .ok_or_else(|| Error::Tool("pg_dump not found; pass --pg-bin-dir".into()))?;
                schema::copy_new_tables(
                    &tools,
                    &self.plan.source.with_dbname(&name),
                    &self.plan.target.with_dbname(&name),
                    &db.unpublished
                        .iter()
                        .filter(|t| !t.on_target)
                        .map(|t| (t.schema.clone(), t.name.clone()))
                        .collect::<Vec<_>>(),
                )
                .await?;
            }
            Action::PublishNewTables => {
                let tables: Vec<(String, String)> = db
                    .unpublished
                    .iter()
                    .map(|t| (t.schema.clone(), t.name.clone()))
                    .collect();
                streams::add_to_forward_publication(&self.conns(&name).source, &tables).await?;
            }
            Action::RefreshSubscription => self.stream(db, Direction::Forward).refresh().await?,
            Action::CreateSlot => self.stream(db, Direction::Forward).create_slot().await?,
            Action::CreateSubscription(direction) => {
                let (conninfo, publication, from) = match direction {
                    Direction::Forward => (
                        self.plan.source_conninfo_for_target(&name),
                        names::PUBLICATION,
                        db.forward_from.clone(),
                    ),
                    Direction::Back => (
                        self.plan.target_conninfo_for_source(&name),
                        names::BACK_PUBLICATION,
                        Some(switch_point(db, *direction)?),
                    ),
                };
                self.stream(db, *direction)
                    .create_subscription(&conninfo, publication, from.as_deref())
                    .await?;
            }
            Action::EnableSubscription(direction) => {
                let point = switch_point(db, *direction)?;
                self.stream(db, *direction).enable_from(&point).await?;
            }
            Action::DropStream(direction) => self.stream(db, *direction).drop().await?,
            Action::PrepareWindow => {
                streams::create_back_publication(self.target_of(&name)).await?;
                self.stream(db, Direction::Back).create_slot().await?;
            }
            Action::BuildIndexes => {
                let tools = Tools::locate(self.plan.pg_bin_dir.as_deref())
                    .ok_or_else(|| Error::Tool("pg_restore not found; pass --pg-bin-dir".into()))?;
                schema::sections::build_the_rest(
                    &tools,
                    &self.conns(&name).source,
                    self.target_of(&name),
                    &self.plan.source.with_dbname(&name),
                    &self.plan.target.with_dbname(&name),
                    self.plan.jobs,
                    &self.events,
                )
                .await?;
            }
            Action::Analyze => {
                let target = self.target_of(&name);
                refresh_materialized_views(target).await?;
                target
                    .batch_execute(sql::analyze())
                    .await
                    .on(Side::Target, "analyzing the target (planner statistics)")?;
                record_step(target, step::ANALYZED).await?;
            }
            Action::WaitForCopy
            | Action::Synced
            | Action::Switched
            | Action::WindowOpen
            | Action::Broken(_) => {}
        }
        Ok(())
    }

    /// One database's stream in `direction`, over this upgrade's sessions.
    pub(crate) fn stream(&self, db: &Database, direction: Direction) -> StreamEnds<'_> {
        let connections = self.conns(&db.name);
        let target = connections
            .target
            .as_ref()
            .expect("a stream implies the target database");
        let (publisher, publisher_admin, subscriber) = match direction {
            Direction::Forward => (&connections.source, &self.source_admin, target),
            Direction::Back => (target, &self.target_admin, &connections.source),
        };
        StreamEnds {
            direction,
            name: db.stream_name(direction),
            publisher,
            publisher_admin,
            subscriber,
        }
    }

    /// Before a switch in `direction`: the stream back the other way gets its publication and
    /// slot now, outside the pause, so that at the switch only its start point is recorded.
    pub(crate) async fn prepare_return_stream(&mut self, direction: Direction) -> Result<()> {
        if direction == Direction::Forward && !self.plan.rollback_window {
            return Ok(());
        }
        for db in self.observe().await? {
            if direction == Direction::Forward {
                streams::create_back_publication(self.target_of(&db.name)).await?;
            }
            self.stream(&db, direction.reverse()).create_slot().await?;
        }
        Ok(())
    }

    pub(crate) fn target_of(&self, name: &str) -> &Client {
        self.conns(name)
            .target
            .as_ref()
            .expect("the target database exists")
    }
}

/// Where the stream in `direction` starts: the LSN recorded by the switch that made it the
/// stream away from the serving server.
fn switch_point(db: &Database, direction: Direction) -> Result<String> {
    let point = match direction {
        Direction::Forward => &db.forward_from,
        Direction::Back => &db.back_from,
    };
    point.clone().ok_or_else(|| Error::Broken {
        database: db.name.clone(),
        why: format!(
            "the switch point of the {direction:?} stream was not recorded; run `pgshift cleanup` (after the switch) or `pgshift abort` (before it)"
        ),
    })
}

/// The tables created on the source since its table-list publication was made that the target
/// lacks.
fn tables_missing_on_target(db: &Database) -> Vec<String> {
    db.unpublished
        .iter()
        .filter(|t| !t.on_target)
        .map(|t| t.qualified())
        .collect()
}

/// Materialized views hold no replicated rows: fill them from the replicated tables.
async fn refresh_materialized_views(target: &Client) -> Result<()> {
    let views = target
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'm' ORDER BY 1, 2",
            &[],
        )
        .await
        .on(Side::Target, "listing materialized views")?;
    for view in views {
        let (schema, name): (String, String) = (view.get(0), view.get(1));
        target
            .batch_execute(&sql::refresh_materialized_view(&schema, &name))
            .await
            .on(
                Side::Target,
                &format!("refreshing materialized view {schema}.{name}"),
            )?;
    }
    Ok(())
}
