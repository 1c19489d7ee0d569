//! The upgrade driver: observe both servers, decide each database's next step, act, repeat —
//! until every database is in sync, then cut over. Every act is idempotent and every decision
//! is made from observation, so `run` resumes after a crash at any point.

use std::collections::HashMap;
use std::time::Instant;

use serde::Serialize;
use tokio_postgres::Client;

use crate::cutover::{self, CutoverReport, Server, Switch};
use crate::decide::{self, Action, Direction, Next, Policy};
use crate::endpoint::Endpoint;
use crate::error::{Error, Result, Side, SqlContext};
use crate::events::{Event, EventSink, Phase};
use crate::lock;
use crate::names::{self, step};
use crate::observe::{self, Database};
use crate::plan::{Databases, Plan};
use crate::preflight::{self, Report};
use crate::schema;
use crate::session::open;
use crate::sql;

/// Where pgshift's server-wide session on the target lives.
const MAINTENANCE_DB: &str = "postgres";

/// How a `run` ended.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub finished: Phase,
    pub phases: Vec<PhaseTiming>,
    pub cutover: Option<CutoverReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseTiming {
    pub name: &'static str,
    pub ms: u128,
}

/// What one `advance` did.
#[derive(Debug)]
pub enum Advance {
    Acted {
        database: String,
        action: Action,
    },
    /// Nothing to do now: each database with what it waits for, and what comes next.
    Settled {
        databases: Vec<(Database, Action)>,
        next: Next,
    },
}

/// pgshift's sessions in one database, on both sides (their source PIDs are in
/// `Upgrade::own_source_pids`, so that direct mode's fence never ends them).
pub(crate) struct DbConnections {
    pub source: Client,
    pub target: Option<Client>,
}

pub struct Upgrade {
    pub(crate) plan: Plan,
    pub(crate) events: EventSink,
    pub(crate) source_admin: Client,
    pub(crate) target_admin: Client,
    pub(crate) databases: Vec<String>,
    pub(crate) connections: HashMap<String, DbConnections>,
    pub(crate) own_source_pids: Vec<i32>,
    /// pgshift's sessions on the target: the fence guard ends them if this process dies.
    pub(crate) own_target_pids: Vec<i32>,
    /// The maintenance session's endpoint on the target.
    pub(crate) target_admin_endpoint: Endpoint,
    /// The upgrade lock (or, in the fence guard, the fence lock), held while this lives.
    locks: Option<lock::Held>,
    pub(crate) phases: Vec<PhaseTiming>,
    current_phase: Option<(Phase, Instant)>,
}

impl Upgrade {
    /// Connects to both servers for a command that changes something: resolves which databases
    /// to move and takes the upgrade lock on both servers (`Error::Busy`, naming the holder, if
    /// another pgshift has it), then waits for any fence guard still releasing clients.
    pub async fn connect(plan: Plan, events: EventSink) -> Result<Upgrade> {
        let mut up = Upgrade::sessions(plan, events).await?;
        let existing = up.existing_source_databases().await?;
        let label = lock::holder_label(&up.plan.command);
        let places = lock::places(
            &up.plan.source,
            &existing,
            &up.target_admin_endpoint,
            &up.databases,
        );
        let fence_places = lock::fence_places(&up.target_admin_endpoint, &up.databases);
        let held = lock::take_upgrade_lock(&places, &fence_places, &label).await?;
        up.own_source_pids.extend(held.pids(Side::Source));
        up.own_target_pids.extend(held.pids(Side::Target));
        up.locks = Some(held);
        Ok(up)
    }

    /// Connects to both servers for a command that only reads (`check`, `status`): no lock, so
    /// it works while another pgshift runs.
    pub async fn observer(plan: Plan, events: EventSink) -> Result<Upgrade> {
        Upgrade::sessions(plan, events).await
    }

    /// The fence guard's engine: no upgrade lock (its worker holds it), the fence lock instead,
    /// and every session it may need opened now, before the fence.
    pub(crate) async fn for_guard(plan: Plan, events: EventSink) -> Result<Upgrade> {
        let mut up = Upgrade::sessions(plan, events).await?;
        let label = lock::holder_label(&up.plan.command);
        let fence_places = lock::fence_places(&up.target_admin_endpoint, &up.databases);
        let held = lock::take_fence_lock(&fence_places, &label).await?;
        up.own_target_pids.extend(held.pids(Side::Target));
        up.locks = Some(held);
        up.observe().await?;
        Ok(up)
    }

    async fn sessions(plan: Plan, events: EventSink) -> Result<Upgrade> {
        let (source_admin, source_pid) = open(&plan.source).await?;
        // Server-wide work on the target (CREATE/DROP DATABASE, ALTER DATABASE) needs a session
        // outside the databases being moved: the maintenance database, else the URL's.
        let maintenance = plan.target.with_dbname(MAINTENANCE_DB);
        let (target_admin_endpoint, (target_admin, target_pid)) = match open(&maintenance).await {
            Ok(opened) => (maintenance, opened),
            // If both fail, the error about the URL's database is the one the user can act on.
            Err(_) => (plan.target.clone(), open(&plan.target).await?),
        };
        let databases = match &plan.databases {
            Databases::FromUrl => vec![plan.source.dbname.clone()],
            Databases::Named(names) => names.clone(),
            Databases::All => source_admin
                .query(
                    "SELECT datname::text FROM pg_database WHERE NOT datistemplate AND datallowconn ORDER BY datname",
                    &[],
                )
                .await
                .on(Side::Source, "listing databases")?
                .iter()
                .map(|r| r.get(0))
                .collect(),
        };
        Ok(Upgrade {
            plan,
            events,
            source_admin,
            target_admin,
            target_admin_endpoint,
            databases,
            connections: HashMap::new(),
            own_source_pids: vec![source_pid],
            own_target_pids: vec![target_pid],
            locks: None,
            phases: Vec::new(),
            current_phase: None,
        })
    }

    /// The moved databases that exist on the source (preflight reports the others).
    pub(crate) async fn existing_source_databases(&self) -> Result<Vec<String>> {
        Ok(self
            .source_admin
            .query(
                "SELECT datname::text FROM pg_database WHERE datname = ANY($1) ORDER BY datname",
                &[&self.databases],
            )
            .await
            .on(Side::Source, "looking for the databases")?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// The plan's policy (`rollback`: go back through the window).
    pub fn policy(&self, rollback: bool) -> Policy {
        self.plan.policy(rollback)
    }

    pub fn databases(&self) -> &[String] {
        &self.databases
    }

    pub(crate) fn emit(&self, event: Event) {
        (self.events)(event);
    }

    pub(crate) fn enter(&mut self, phase: Phase) {
        if self.current_phase.map(|(p, _)| p) == Some(phase) {
            return;
        }
        self.close_phase();
        self.current_phase = Some((phase, Instant::now()));
        self.emit(Event::Phase { phase });
    }

    pub(crate) fn close_phase(&mut self) {
        if let Some((phase, started)) = self.current_phase.take() {
            self.phases.push(PhaseTiming {
                name: phase.name(),
                ms: started.elapsed().as_millis(),
            });
        }
    }

    /// Preflight: read-only checks; changes nothing.
    pub async fn preflight(&mut self) -> Result<Report> {
        Ok(preflight::evaluate(&preflight::gather(self).await?))
    }

    pub(crate) async fn target_database_exists(&self, name: &str) -> Result<bool> {
        Ok(self
            .target_admin
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
                &[&name],
            )
            .await
            .on(Side::Target, "looking for the database")?
            .get(0))
    }

    /// Connections to one database; the target side appears once the database exists there.
    pub(crate) async fn db(&mut self, name: &str) -> Result<()> {
        if !self.connections.contains_key(name) {
            let (source, pid) = open(&self.plan.source.with_dbname(name)).await?;
            self.own_source_pids.push(pid);
            self.connections.insert(
                name.to_string(),
                DbConnections {
                    source,
                    target: None,
                },
            );
        }
        if self.connections[name].target.is_none() && self.target_database_exists(name).await? {
            let (target, pid) = open(&self.plan.target.with_dbname(name)).await?;
            self.own_target_pids.push(pid);
            self.connections
                .get_mut(name)
                .expect("inserted above")
                .target = Some(target);
        }
        Ok(())
    }

    /// The connections that `db` opened.
    pub(crate) fn conns(&self, name: &str) -> &DbConnections {
        &self.connections[name]
    }

    /// Observes every database.
    pub async fn observe(&mut self) -> Result<Vec<Database>> {
        let mut all = Vec::new();
        for name in self.databases.clone() {
            self.db(&name).await?;
            let connections = &self.connections[&name];
            all.push(
                observe::database(
                    &name,
                    &self.source_admin,
                    &connections.source,
                    &self.target_admin,
                    connections.target.as_ref(),
                )
                .await?,
            );
        }
        Ok(all)
    }

    /// Observes, and performs the first step that some database needs (at most one), as the
    /// plan's policy decides (forward). Returns what it did, or where things settled. Tests use
    /// it to stop between steps.
    pub async fn advance(&mut self) -> Result<Advance> {
        let policy = self.plan.policy(false);
        self.advance_with(&policy).await
    }

    /// `advance` under `policy`.
    pub async fn advance_with(&mut self, policy: &Policy) -> Result<Advance> {
        let (databases, next) = self.decided(policy).await?;
        if let Next::Act { database, action } = next {
            let db = databases
                .into_iter()
                .find(|(d, _)| d.name == database)
                .map(|(d, _)| d)
                .expect("the decision names an observed database");
            self.act(&db, &action).await?;
            return Ok(Advance::Acted { database, action });
        }
        Ok(Advance::Settled { databases, next })
    }

    /// Finishes or undoes a switch that a crash interrupted (see `cutover::recover`); does
    /// nothing when none was interrupted.
    pub async fn recover(&mut self) -> Result<()> {
        cutover::recover(self).await
    }

    /// Every database with the step it needs next, and the next thing for the whole upgrade
    /// under `policy`, without acting (`decide`).
    pub async fn decided(&mut self, policy: &Policy) -> Result<(Vec<(Database, Action)>, Next)> {
        let databases: Vec<(Database, Action)> = self
            .observe()
            .await?
            .into_iter()
            .map(|db| {
                let action = decide::decide(&db, policy);
                (db, action)
            })
            .collect();
        let next = decide::next(&databases, policy);
        Ok((databases, next))
    }

    /// The first half of `CopySchema`, for a caller that restores the schema with tools of its
    /// own (the operator's Job): checks that the target database holds no tables of its own,
    /// and copies the roles. The restore must run [`schema::restore_epilogue`] in its
    /// transaction, which records the step.
    pub async fn prepare_schema_copy(&mut self, name: &str) -> Result<()> {
        self.db(name).await?;
        let connections = self.conns(name);
        let foreign =
            preflight::foreign_tables(connections.target.as_ref().expect("database exists"))
                .await?;
        if let Some(example) = foreign.first() {
            return Err(Error::TargetNotEmpty {
                database: name.to_string(),
                example: example.clone(),
            });
        }
        schema::sync_roles(&self.source_admin, &self.target_admin).await?;
        Ok(())
    }

    /// Why apply into `database` fails, on the stream that runs now (forward before the
    /// switch, back after it), read from the subscriber's log and from schema drift: an
    /// `ApplyFailing` error to report (the caller saw new errors counted). Also an event.
    pub async fn apply_failure(&mut self, database: &str) -> Result<Error> {
        let cause = self.stream_failure_cause(database).await?;
        self.emit(Event::ApplyFailing {
            database: database.to_string(),
            cause: cause.clone(),
        });
        Ok(Error::ApplyFailing {
            database: database.to_string(),
            cause,
        })
    }

    /// What breaks the stream that runs now for `database`.
    pub(crate) async fn stream_failure_cause(&mut self, database: &str) -> Result<String> {
        self.db(database).await?;
        let switched = observe::switch_record(self.target_of(database))
            .await?
            .is_some()
            || observe::steps(self.target_of(database))
                .await?
                .iter()
                .any(|s| s == step::SWITCHED);
        let source = (&self.conns(database).source, Side::Source);
        let target = (self.target_of(database), Side::Target);
        let (publisher, subscriber) = if switched {
            (target, source)
        } else {
            (source, target)
        };
        observe::apply_failure_cause(publisher, subscriber).await
    }

    /// Everything one switch in `direction` works on (see `cutover::Switch`).
    pub(crate) fn switch_inputs(&self, direction: Direction) -> Switch<'_> {
        let targets: Vec<&Client> = self.databases.iter().map(|n| self.target_of(n)).collect();
        let source = Server {
            side: Side::Source,
            endpoint: &self.plan.source,
            admin: &self.source_admin,
            databases: self
                .databases
                .iter()
                .map(|n| &self.conns(n).source)
                .collect(),
            own_pids: self.own_source_pids.clone(),
        };
        let target = Server {
            side: Side::Target,
            endpoint: &self.plan.target,
            admin: &self.target_admin,
            databases: targets.clone(),
            own_pids: self.own_target_pids.clone(),
        };
        let (from, to) = match direction {
            Direction::Forward => (source, target),
            Direction::Back => (target, source),
        };
        Switch {
            direction,
            databases: &self.databases,
            from,
            to,
            records: targets,
            traffic: &self.plan.traffic,
            budget: self.plan.max_pause,
            events: &self.events,
        }
    }
}

pub(crate) fn blocked(report: &Report) -> Error {
    Error::Blocked {
        count: report.blockers.len(),
        list: report
            .blockers
            .iter()
            .map(|f| format!("  - {f}"))
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

pub(crate) async fn record_step(target: &Client, name: &str) -> Result<()> {
    record_step_value(target, name, "").await
}

/// Records a step with a value (who holds a fence, say); an earlier record of it stays.
pub(crate) async fn record_step_value(target: &Client, name: &str, value: &str) -> Result<()> {
    target
        .execute(
            &format!(
                "INSERT INTO {} (step, value) VALUES ($1, nullif($2, '')) ON CONFLICT DO NOTHING",
                sql::qualified(names::META_SCHEMA, names::STATE_TABLE)
            ),
            &[&name, &value],
        )
        .await
        .on(Side::Target, &format!("recording step {name}"))?;
    Ok(())
}

pub(crate) async fn forget_step(target: &Client, name: &str) -> Result<()> {
    target
        .execute(
            &format!(
                "DELETE FROM {} WHERE step = $1",
                sql::qualified(names::META_SCHEMA, names::STATE_TABLE)
            ),
            &[&name],
        )
        .await
        .on(Side::Target, &format!("clearing step {name}"))?;
    Ok(())
}
