//! The CLI's driver: executes the one decision (`decide::next`) until the upgrade reaches what
//! was asked — ready for cutover, switched (with the rollback window open), or rolled back.
//! The operator's reconcile executes the same decision, one step per reconcile.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::cutover::{self, CutoverReport};
use crate::decide::{Action, Direction, Next, Policy};
use crate::error::{Error, Result, Side, SqlContext};
use crate::events::{Event, Phase};
use crate::observe::{self, Database};
use crate::plan::CutoverMode;
use crate::streams;
use crate::upgrade::{blocked, Outcome, Upgrade};

/// How long to wait between observations while the copy or catch-up runs.
const POLL: Duration = Duration::from_millis(500);

/// How long a probe marker may take to arrive before a cutover: past it, apply is stalled or
/// failing, and pgshift finds out why instead of fencing writes.
pub(crate) const APPLY_PROBE: Duration = Duration::from_secs(10);

impl Upgrade {
    /// Runs the upgrade from wherever it stands to the end — the switch, with the rollback
    /// window open unless the plan says otherwise — or to ready-for-cutover in manual mode.
    /// Refuses to start when preflight finds blockers.
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
        self.recover().await?;
        let policy = self.plan.policy(false);
        let patience = Patience {
            attempts: self.plan.cutover_attempts,
            wait_for_apply: true,
        };
        let (finished, cutover) = self.drive(policy, patience).await?;
        Ok(self.outcome(finished, cutover))
    }

    /// Runs the forward cutover now (manual mode's second half): the databases must be in sync.
    pub async fn cutover_now(&mut self) -> Result<CutoverReport> {
        self.recover().await?;
        let policy = Policy {
            cutover: CutoverMode::Automatic,
            ..self.plan.policy(false)
        };
        match self.decided(&policy).await?.1 {
            // In sync, or catching up: the drive waits for the lag, then switches.
            Next::Cutover(Direction::Forward)
            | Next::CatchUp {
                direction: Direction::Forward,
                ..
            } => {}
            Next::WindowOpen | Next::Done => return Err(Error::AlreadySwitchedNothingToDo),
            other => {
                return Err(Error::NotReady {
                    why: format!(
                        "the upgrade is not ready for the cutover ({}); run `pgshift run --cutover manual` until it reports ready",
                        other.phase().name()
                    ),
                })
            }
        }
        match self.drive(policy, Patience::ONE_GO).await? {
            (_, Some(report)) => Ok(report),
            (phase, None) => Err(Error::NotReady {
                why: format!("the cutover did not happen ({})", phase.name()),
            }),
        }
    }

    /// Goes back through the rollback window: the same cutover with source and target
    /// swapped, then the forward stream resumes from the rollback's switch point, so that the
    /// upgrade can be retried (`run`, `cutover`) or abandoned (`abort`). Refuses while the back
    /// stream is failing or the target holds what it cannot carry back. None when a rollback
    /// was done already (this finishes what a killed one left).
    pub async fn rollback_now(&mut self) -> Result<Option<CutoverReport>> {
        self.recover().await?;
        let policy = self.plan.policy(true);
        let (databases, next) = self.decided(&policy).await?;
        if let Next::CannotRollBack { why, .. } = next {
            return Err(Error::CannotRollBack { why });
        }
        // Still in the window (not a rollback a crash cut short after its switch).
        if databases.iter().any(|(db, _)| db.serving() == Side::Target) {
            self.window_carries_everything().await?;
        }
        Ok(self.drive(policy, Patience::ONE_GO).await?.1)
    }

    /// Before a rollback: the back stream must be able to carry every write made on the target
    /// — no table or column the source lacks (DDL during the window), no table the window's
    /// publication leaves out, no failing apply on the source. Refuses, naming each, otherwise.
    async fn window_carries_everything(&mut self) -> Result<()> {
        for db in self.observe().await? {
            let target = self.target_of(&db.name);
            let source = &self.conns(&db.name).source;
            let mut causes =
                observe::schema_drift((target, Side::Target), (source, Side::Source)).await?;
            for table in streams::unpublished_back_tables(target).await? {
                causes.push(format!(
                    "table {table} was created on the target during the rollback window; the window does not carry \
                     its rows back to the source"
                ));
            }
            // Counted errors only: an apply worker not running (yet) is no proof of failure. A
            // source before 16 starts the workers of all its subscriptions at most once per
            // wal_retrieve_retry_interval (5 s), so right after the switch some have none; the
            // probe before the fence proves the stream, or names why it fails.
            let failing = db.back.subscription.as_ref().is_some_and(|s| s.errors > 0);
            if failing {
                causes.push(
                    observe::apply_failure_cause((target, Side::Target), (source, Side::Source))
                        .await?,
                );
            }
            if !causes.is_empty() {
                return Err(Error::RollbackRefused {
                    database: db.name.clone(),
                    cause: causes.join("; "),
                });
            }
        }
        Ok(())
    }

    /// Executes the decision until it settles, as patient as `patience` says. Returns where
    /// it settled and the report of the switch it made, if any. A rollback, once done, is not
    /// asked for again.
    async fn drive(
        &mut self,
        mut policy: Policy,
        patience: Patience,
    ) -> Result<(Phase, Option<CutoverReport>)> {
        let mut baseline_errors: Option<HashMap<String, i64>> = None;
        let mut previous_errors: HashMap<String, i64> = HashMap::new();
        let mut rates = RateMeter::default();
        let mut copy_watch = crate::stall::CopyWatch::new(self.plan.copy_stall_after);
        let mut attempts = 0;
        let mut switched = None;
        loop {
            let (databases, next) = self.decided(&policy).await?;
            // Errors the servers counted before this run are history; new ones are what matter.
            let baseline = baseline_errors.get_or_insert_with(|| error_counts(&databases));
            match next {
                Next::Act { database, action } => {
                    let db = databases
                        .iter()
                        .find(|(d, _)| d.name == database)
                        .map(|(d, _)| d.clone())
                        .expect("the decision names an observed database");
                    self.act(&db, &action).await?;
                }
                Next::Broken { database, why } => return Err(Error::Broken { database, why }),
                Next::CannotRollBack { why, .. } => return Err(Error::CannotRollBack { why }),
                Next::WaitForCopy => {
                    self.check_apply(&databases, &mut previous_errors).await?;
                    self.enter(Phase::Replicate);
                    for (db, _) in &databases {
                        if let Some(sub) = &db.forward.subscription {
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
                    self.report_stalled_copies(&mut copy_watch, &databases)
                        .await?;
                    tokio::time::sleep(POLL).await;
                }
                Next::CatchUp {
                    direction,
                    lag_bytes,
                } => {
                    self.check_apply(&databases, &mut previous_errors).await?;
                    self.enter(Phase::CatchUp);
                    let (written, applied) = rates
                        .sample(self.server(direction.from()), lag_bytes)
                        .await?;
                    self.emit(Event::CatchUp {
                        lag_bytes,
                        source_bytes_per_s: written,
                        applied_bytes_per_s: applied,
                    });
                    tokio::time::sleep(POLL).await;
                }
                Next::ReadyForCutover => {
                    self.check_apply(&databases, &mut previous_errors).await?;
                    if !self.apply_proven(Direction::Forward, baseline).await? {
                        patience.unproven(
                            Direction::Forward,
                            self.logged_error(Direction::Forward).await,
                        )?;
                        continue;
                    }
                    return self.settle(Phase::ReadyForCutover, switched);
                }
                Next::Cutover(direction) => {
                    self.check_apply(&databases, &mut previous_errors).await?;
                    if !self.apply_proven(direction, baseline).await? {
                        patience.unproven(direction, self.logged_error(direction).await)?;
                        continue;
                    }
                    self.enter(Phase::Cutover);
                    match cutover::cutover(self, direction).await {
                        Ok(report) => {
                            switched = Some(report);
                            if direction == Direction::Back {
                                // Done: the forward stream resumes, and nothing cuts over again.
                                policy.rollback = false;
                                policy.cutover = CutoverMode::Manual;
                            }
                        }
                        Err(Error::CutoverAborted {
                            step,
                            elapsed,
                            budget,
                            ..
                        }) if attempts + 1 < patience.attempts => {
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
                Next::RolledBack => return self.settle(Phase::ReadyForCutover, switched),
                Next::WindowOpen => return self.settle(Phase::WindowOpen, switched),
                Next::Done => return self.settle(Phase::Done, switched),
            }
        }
    }

    fn settle(
        &mut self,
        phase: Phase,
        switched: Option<CutoverReport>,
    ) -> Result<(Phase, Option<CutoverReport>)> {
        self.enter(phase);
        self.close_phase();
        Ok((phase, switched))
    }

    fn outcome(&mut self, finished: Phase, cutover: Option<CutoverReport>) -> Outcome {
        Outcome {
            finished,
            phases: std::mem::take(&mut self.phases),
            cutover,
        }
    }

    fn server(&self, side: Side) -> &Client {
        match side {
            Side::Target => &self.target_admin,
            _ => &self.source_admin,
        }
    }

    /// True when a probe marker crossed the stream that a switch in `direction` ends. When
    /// it did not, and the subscriber counts new errors or its apply worker is down, fails
    /// with the cause.
    async fn apply_proven(
        &mut self,
        direction: Direction,
        baseline: &HashMap<String, i64>,
    ) -> Result<bool> {
        if cutover::apply_is_flowing(self, direction, APPLY_PROBE).await? {
            return Ok(true);
        }
        for db in self.observe().await? {
            let Some(sub) = &db.stream(direction).subscription else {
                continue;
            };
            let new_errors = sub.errors > baseline.get(&db.name).copied().unwrap_or(0);
            if new_errors || !sub.worker_running {
                return Err(self.apply_failure(&db.name).await?);
            }
        }
        Ok(false)
    }

    /// The newest error in the log of the server a stream in `direction` applies to: a
    /// subscriber older than 15 counts no replication errors, and its apply worker may be
    /// restarting just when it is looked at, so the log is what names a failing apply there.
    async fn logged_error(&self, direction: Direction) -> Option<String> {
        crate::observe::newest_log_entry(self.server(direction.to()), &["ERROR"]).await
    }

    /// Refuses to go on while a subscriber counts new replication errors, and says why.
    async fn check_apply(
        &mut self,
        databases: &[(Database, Action)],
        previous: &mut HashMap<String, i64>,
    ) -> Result<()> {
        for (db, _) in databases {
            let errors = stream_errors(db);
            let before = previous.insert(db.name.clone(), errors);
            if before.is_some_and(|b| errors > b) {
                return Err(self.apply_failure(&db.name).await?);
            }
        }
        Ok(())
    }
}

/// How long a drive keeps at it.
#[derive(Clone, Copy)]
struct Patience {
    /// Aborted switches tried again, in all.
    attempts: u32,
    /// A stream whose probe row did not arrive: wait and probe again (`run`), or stop (a
    /// command asked to switch now).
    wait_for_apply: bool,
}

impl Patience {
    /// One attempt, no waiting: `cutover` and `rollback`, which the user retries.
    const ONE_GO: Patience = Patience {
        attempts: 1,
        wait_for_apply: false,
    };

    fn unproven(self, direction: Direction, logged_error: Option<String>) -> Result<()> {
        if self.wait_for_apply {
            return Ok(());
        }
        let logged = logged_error
            .map(|line| {
                format!(
                    " (the newest error in the {}'s log: {line})",
                    direction.to()
                )
            })
            .unwrap_or_default();
        Err(Error::NotReady {
            why: format!(
                "a probe row written on the {} did not reach the {} within {APPLY_PROBE:?}: it is still \
                 catching up or its apply is blocked; nobody was paused. Check `pgshift status` and the {}'s \
                 locks, then try again{logged}",
                direction.from(),
                direction.to(),
                direction.to()
            ),
        })
    }
}

/// The errors counted by the subscription of the stream that runs now.
fn stream_errors(db: &Database) -> i64 {
    let stream = match db.serving() {
        Side::Target => &db.back,
        _ => &db.forward,
    };
    stream.subscription.as_ref().map_or(0, |s| s.errors)
}

fn error_counts(databases: &[(Database, Action)]) -> HashMap<String, i64> {
    databases
        .iter()
        .map(|(db, _)| (db.name.clone(), stream_errors(db)))
        .collect()
}

/// The publisher's WAL rate against the rate at which lag shrinks, from successive samples.
#[derive(Default)]
struct RateMeter {
    last: Option<(Instant, i64, i64)>,
}

impl RateMeter {
    async fn sample(&mut self, publisher: &Client, lag: i64) -> Result<(f64, f64)> {
        let wal: i64 = publisher
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
