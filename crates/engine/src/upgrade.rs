//! The upgrade driver: observe both servers, decide each database's next step, act, repeat —
//! until every database is in sync, then cut over. Every act is idempotent and every decision
//! is made from observation, so `run` resumes after a crash at any point.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::Client;

use crate::cutover::{self, CutoverReport};
use crate::error::{Error, Result, Side, SqlContext};
use crate::events::{Event, EventSink, Phase};
use crate::names::{self, step};
use crate::observe::{self, Action, Database};
use crate::plan::{CutoverMode, Databases, Plan};
use crate::preflight::{self, Report};
use crate::schema::{self, Tools};
use crate::session::open;
use crate::sql;

/// Where pgshift's server-wide session on the target lives.
const MAINTENANCE_DB: &str = "postgres";

/// How long to wait between observations while the copy or catch-up runs.
const POLL: Duration = Duration::from_millis(500);

/// How long a probe marker may take to arrive before a cutover: past it, apply is stalled or
/// failing, and pgshift finds out why instead of fencing writes.
const APPLY_PROBE: Duration = Duration::from_secs(10);

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
    /// Nothing to do now; each database with what it waits for.
    Settled(Vec<(Database, Action)>),
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
    phases: Vec<PhaseTiming>,
    current_phase: Option<(Phase, Instant)>,
}

impl Upgrade {
    /// Connects to both servers and resolves which databases to move.
    pub async fn connect(plan: Plan, events: EventSink) -> Result<Upgrade> {
        let (source_admin, source_pid) = open(&plan.source).await?;
        // Server-wide work on the target (CREATE/DROP DATABASE, ALTER DATABASE) needs a session
        // outside the databases being moved: the maintenance database, else the URL's.
        let (target_admin, _) = match open(&plan.target.with_dbname(MAINTENANCE_DB)).await {
            Ok(opened) => opened,
            // If both fail, the error about the URL's database is the one the user can act on.
            Err(_) => open(&plan.target).await?,
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
            databases,
            connections: HashMap::new(),
            own_source_pids: vec![source_pid],
            phases: Vec::new(),
            current_phase: None,
        })
    }

    pub fn databases(&self) -> &[String] {
        &self.databases
    }

    pub(crate) fn emit(&self, event: Event) {
        (self.events)(event);
    }

    fn enter(&mut self, phase: Phase) {
        if self.current_phase.map(|(p, _)| p) == Some(phase) {
            return;
        }
        self.close_phase();
        self.current_phase = Some((phase, Instant::now()));
        self.emit(Event::Phase { phase });
    }

    fn close_phase(&mut self) {
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
            let (target, _) = open(&self.plan.target.with_dbname(name)).await?;
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

    /// Runs the upgrade from wherever it stands to the end (or to ready-for-cutover in manual
    /// mode). Refuses to start when preflight finds blockers.
    pub async fn run(&mut self) -> Result<Outcome> {
        self.enter(Phase::Preflight);
        let report = self.preflight().await?;
        for warning in &report.warnings {
            self.emit(Event::Warning {
                message: warning.to_string(),
            });
        }
        if !report.ready() {
            return Err(blocked(&report));
        }
        cutover::recover(self).await?;
        let mut previous_errors: HashMap<String, i64> = HashMap::new();
        let mut baseline_errors: Option<HashMap<String, i64>> = None;
        let mut rates = RateMeter::default();
        let mut copy_watch = crate::stall::CopyWatch::new(self.plan.copy_stall_after);
        let mut attempts = 0;
        let mut last_cutover = None;
        loop {
            let actions = match self.advance().await? {
                Advance::Acted { .. } => continue,
                Advance::Settled(actions) => actions,
            };
            // Errors the target counted before this run are history; new ones are what matter.
            let baseline = baseline_errors.get_or_insert_with(|| error_counts(&actions));
            if actions.iter().all(|(_, a)| *a == Action::Switched) {
                self.enter(Phase::Done);
                self.close_phase();
                return Ok(Outcome {
                    finished: Phase::Done,
                    phases: std::mem::take(&mut self.phases),
                    cutover: last_cutover,
                });
            }
            if let Some((db, Action::Broken(why))) =
                actions.iter().find(|(_, a)| matches!(a, Action::Broken(_)))
            {
                return Err(Error::State(format!("database {}: {why}", db.name)));
            }
            self.check_apply(&actions, &mut previous_errors).await?;
            if actions.iter().any(|(_, a)| *a == Action::WaitForCopy) {
                self.enter(Phase::Replicate);
                for (db, _) in &actions {
                    if let Some(sub) = &db.subscription {
                        self.emit(Event::Copy {
                            database: db.name.clone(),
                            tables_ready: sub.tables_ready,
                            tables_total: sub.tables_total,
                            tables_copying: sub.tables_copying,
                            bytes_copied: sub.bytes_copied,
                            bytes_total: db.source_bytes,
                        });
                    }
                }
                self.report_stalled_copies(&mut copy_watch, &actions)
                    .await?;
                tokio::time::sleep(POLL).await;
                continue;
            }
            // Every database is Synced: catch up, then cut over.
            self.enter(Phase::CatchUp);
            let lag: i64 = actions
                .iter()
                .filter_map(|(db, _)| db.slot.as_ref())
                .map(|s| s.lag_bytes)
                .max()
                .unwrap_or(0);
            let (source_rate, applied_rate) = rates.sample(&self.source_admin, lag).await?;
            self.emit(Event::CatchUp {
                lag_bytes: lag,
                source_bytes_per_s: source_rate,
                applied_bytes_per_s: applied_rate,
            });
            if lag > self.plan.max_lag_bytes {
                tokio::time::sleep(POLL).await;
                continue;
            }
            if !self.apply_proven(baseline).await? {
                continue;
            }
            if self.plan.cutover == CutoverMode::Manual {
                self.enter(Phase::ReadyForCutover);
                self.close_phase();
                return Ok(Outcome {
                    finished: Phase::ReadyForCutover,
                    phases: std::mem::take(&mut self.phases),
                    cutover: None,
                });
            }
            self.enter(Phase::Cutover);
            match cutover::cutover(self).await {
                Ok(report) => last_cutover = Some(report),
                Err(Error::CutoverAborted {
                    step,
                    elapsed,
                    budget,
                }) if attempts + 1 < self.plan.cutover_attempts => {
                    attempts += 1;
                    // The attempt itself reported CutoverAborted; say what happens next.
                    self.emit(Event::Warning {
                        message: format!(
                            "{step} took longer than the budget ({elapsed:?} of {budget:?}); trying again"
                        ),
                    });
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Observes, and performs the first step that some database needs (at most one). Returns
    /// what it did, or every database's state when nothing is left but waiting, the cutover,
    /// or nothing at all. `run` is a loop around this; tests use it to stop between steps.
    pub async fn advance(&mut self) -> Result<Advance> {
        let actions = self.next_steps().await?;
        match actions.iter().find(|(_, a)| is_work(a)) {
            Some((db, action)) => {
                self.act(db, action).await?;
                Ok(Advance::Acted {
                    database: db.name.clone(),
                    action: action.clone(),
                })
            }
            None => Ok(Advance::Settled(actions)),
        }
    }

    /// Finishes or undoes a cutover that a crash interrupted (see `cutover::recover`); does
    /// nothing when none was interrupted.
    pub async fn recover(&mut self) -> Result<()> {
        cutover::recover(self).await
    }

    /// Every database with the step it needs next, without acting.
    pub async fn next_steps(&mut self) -> Result<Vec<(Database, Action)>> {
        Ok(self
            .observe()
            .await?
            .into_iter()
            .map(|db| {
                let action = observe::decide(&db);
                (db, action)
            })
            .collect())
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

    /// Runs the cutover now (manual mode's second half): the databases must be in sync.
    pub async fn cutover_now(&mut self) -> Result<CutoverReport> {
        cutover::recover(self).await?;
        let observed = self.observe().await?;
        if observed
            .iter()
            .all(|db| observe::decide(db) == Action::Switched)
        {
            return Err(Error::State(
                "the cutover is already done; nothing to do".into(),
            ));
        }
        if let Some(db) = observed
            .iter()
            .find(|db| observe::decide(db) != Action::Synced)
        {
            return Err(Error::State(format!(
                "database {} is not in sync yet ({:?}); run `pgshift run --cutover manual` until it reports ready",
                db.name,
                observe::decide(db)
            )));
        }
        let actions: Vec<(Database, Action)> =
            observed.into_iter().map(|d| (d, Action::Synced)).collect();
        if !self.apply_proven(&error_counts(&actions)).await? {
            return Err(Error::State(format!(
                "a probe row written on the source did not reach the target within {APPLY_PROBE:?}: \
                 the target is still catching up or its apply is blocked; nobody was paused. \
                 Check `pgshift status` and the target's locks, then try again"
            )));
        }
        cutover::cutover(self).await
    }

    /// True when a probe marker reached the target. When it did not, and the target counts new
    /// replication errors or its apply worker is down, fails with the cause.
    async fn apply_proven(&mut self, baseline: &HashMap<String, i64>) -> Result<bool> {
        if cutover::apply_is_flowing(self, APPLY_PROBE).await? {
            return Ok(true);
        }
        for db in self.observe().await? {
            let Some(sub) = &db.subscription else {
                continue;
            };
            let new_errors = sub.errors > baseline.get(&db.name).copied().unwrap_or(0);
            if new_errors || !sub.worker_running {
                return Err(self.apply_failure(&db.name).await?);
            }
        }
        Ok(false)
    }

    /// The `ApplyFailing` error for a database, with the cause read from the target (also
    /// sent as an event).
    /// Why apply into `database` fails, read from the target's log and schema drift: an
    /// `ApplyFailing` error to report (the caller saw the target count new errors).
    pub async fn apply_failure(&mut self, database: &str) -> Result<Error> {
        self.db(database).await?;
        let connections = self.conns(database);
        let target = connections
            .target
            .as_ref()
            .expect("a subscription implies the database");
        let cause = observe::apply_failure_cause(&connections.source, target).await?;
        self.emit(Event::ApplyFailing {
            database: database.to_string(),
            cause: cause.clone(),
        });
        Ok(Error::ApplyFailing {
            database: database.to_string(),
            cause,
        })
    }

    /// Refuses to go on while the target counts new replication errors, and says why.
    async fn check_apply(
        &mut self,
        actions: &[(Database, Action)],
        previous: &mut HashMap<String, i64>,
    ) -> Result<()> {
        for (db, _) in actions {
            let Some(sub) = &db.subscription else {
                continue;
            };
            let before = previous.insert(db.name.clone(), sub.errors);
            if before.is_some_and(|b| sub.errors > b) {
                return Err(self.apply_failure(&db.name).await?);
            }
        }
        Ok(())
    }

    async fn act(&mut self, db: &Database, action: &Action) -> Result<()> {
        let name = db.name.clone();
        self.emit(Event::Step {
            database: name.clone(),
            step: format!("{action:?}"),
        });
        match action {
            Action::CreateDatabase | Action::CopySchema => self.enter(Phase::Schema),
            _ => self.enter(Phase::Replicate),
        }
        match action {
            Action::CreateDatabase => {
                // The database's owner may be a role the target does not have yet.
                schema::sync_roles(&self.source_admin, &self.target_admin).await?;
                self.db(&name).await?;
                let connections = self.conns(&name);
                schema::ensure_target_database(&connections.source, &self.target_admin, &name)
                    .await?;
                // Reconnect to pick up the new database.
                self.db(&name).await?;
            }
            Action::CopySchema if self.plan.schema_tools_in_target_image => {
                return Err(Error::State(format!(
                    "database {name} needs its schema copied, which this caller does with the target image's tools"
                )));
            }
            Action::CopySchema => {
                let tools = Tools::locate(self.plan.pg_bin_dir.as_deref())
                    .ok_or_else(|| Error::Tool("pg_dump not found; pass --pg-bin-dir".into()))?;
                self.prepare_schema_copy(&name).await?;
                schema::copy_schema(
                    &tools,
                    &self.plan.source.with_dbname(&name),
                    &self.plan.target.with_dbname(&name),
                )
                .await?;
            }
            Action::ProtectTarget => {
                // Nobody but pgshift may write to the target until the switch.
                self.target_admin
                    .batch_execute(&sql::set_database_read_only(&name, true))
                    .await
                    .on(
                        Side::Target,
                        "making the target database read-only until cutover",
                    )?;
            }
            Action::CreateSourceMeta => {
                self.db(&name).await?;
                let connections = self.conns(&name);
                connections
                    .source
                    .batch_execute(&sql::create_meta_objects(false))
                    .await
                    .on(Side::Source, "creating the marker table")?;
            }
            Action::CreatePublication => {
                self.db(&name).await?;
                let connections = self.conns(&name);
                connections
                    .source
                    .batch_execute(&sql::create_publication())
                    .await
                    .on(Side::Source, "creating the publication")
                    .or_else(Error::made_meanwhile)?;
            }
            Action::CreateSlot => {
                self.db(&name).await?;
                let connections = self.conns(&name);
                connections
                    .source
                    .query_one(
                        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                        &[&db.subscription_name()],
                    )
                    .await
                    .map(|_| ())
                    .on(Side::Source, "creating the replication slot")
                    .or_else(Error::made_meanwhile)?;
            }
            Action::CreateSubscription => {
                let conninfo = self.plan.source_conninfo_for_target(&name);
                self.db(&name).await?;
                let connections = self.conns(&name);
                connections
                    .target
                    .as_ref()
                    .expect("database exists")
                    .batch_execute(&sql::create_subscription(
                        &db.subscription_name(),
                        &conninfo,
                    ))
                    .await
                    .on(Side::Target, "creating the subscription")
                    .or_else(Error::made_meanwhile)?;
            }
            Action::Analyze => {
                self.enter(Phase::CatchUp);
                self.db(&name).await?;
                let connections = self.conns(&name);
                let target = connections.target.as_ref().expect("database exists");
                refresh_materialized_views(target).await?;
                target
                    .batch_execute(sql::analyze())
                    .await
                    .on(Side::Target, "analyzing the target (planner statistics)")?;
                record_step(target, step::ANALYZED).await?;
            }
            Action::WaitForCopy | Action::Synced | Action::Switched | Action::Broken(_) => {}
        }
        Ok(())
    }
}

fn error_counts(actions: &[(Database, Action)]) -> HashMap<String, i64> {
    actions
        .iter()
        .filter_map(|(db, _)| {
            db.subscription
                .as_ref()
                .map(|s| (db.name.clone(), s.errors))
        })
        .collect()
}

/// An action that changes something (as opposed to waiting or being done).
fn is_work(action: &Action) -> bool {
    !matches!(
        action,
        Action::WaitForCopy | Action::Synced | Action::Switched | Action::Broken(_)
    )
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
    target
        .execute(
            &format!(
                "INSERT INTO {} (step) VALUES ($1) ON CONFLICT DO NOTHING",
                sql::qualified(names::META_SCHEMA, names::STATE_TABLE)
            ),
            &[&name],
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

/// Source WAL rate against the rate at which lag shrinks, from successive samples.
#[derive(Default)]
struct RateMeter {
    last: Option<(Instant, i64, i64)>,
}

impl RateMeter {
    async fn sample(&mut self, source: &Client, lag: i64) -> Result<(f64, f64)> {
        let wal: i64 = source
            .query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[])
            .await
            .on(Side::Source, "reading the WAL position")?
            .get(0);
        let now = Instant::now();
        let rates = match self.last {
            Some((then, last_wal, last_lag)) => {
                let seconds = now.duration_since(then).as_secs_f64().max(1e-3);
                let written = (wal - last_wal) as f64 / seconds;
                let applied = written + (last_lag - lag) as f64 / seconds;
                (written, applied.max(0.0))
            }
            None => (0.0, 0.0),
        };
        self.last = Some((now, wal, lag));
        Ok(rates)
    }
}
