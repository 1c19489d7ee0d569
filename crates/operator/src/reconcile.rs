//! One reconcile of a `PostgresUpgrade`: dereference → validate → build → apply → one engine
//! step → update status. Nothing is remembered between reconciles: every decision comes from
//! what the cluster and the two servers show now, so a restarted operator carries on.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::finalizer::{finalizer, Event as Finalize};
use kube::{Api, Client, Resource, ResourceExt};
use pgshift_engine::decide::{self, Action as Step, Direction, Next, Policy};
use pgshift_engine::observe::Database;
use pgshift_engine::{
    CutoverMode as EngineCutover, Endpoint, Error as EngineError, Phase as EnginePhase, Side,
    Upgrade,
};
use serde_json::json;

use crate::build;
use crate::cluster;
use crate::connect::{connect, pooler_consoles, target_endpoint};
use crate::crd::{
    CutoverMode, CutoverStatus, Finding, Phase, PostgresUpgrade, RollbackStatus, TrafficMode,
};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::names::{FINALIZER, ORIGINAL_ANNOTATION};
use crate::provision::{provision_pgbouncer, provision_target, reach_source};
use crate::router::restore_clients;
use crate::status::{self, human_bytes, Report};
use crate::validate::{validate, Validated};

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
}

const SOON: Duration = Duration::from_millis(500);
const POLL: Duration = Duration::from_secs(2);
const SLOW: Duration = Duration::from_secs(30);

pub async fn reconcile(upgrade: Arc<PostgresUpgrade>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.start_reconcile();
    let namespace = upgrade.namespace().unwrap_or_default();
    let api: Api<PostgresUpgrade> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, upgrade, |event| async {
        match event {
            Finalize::Apply(upgrade) => drive(&upgrade, &ctx).await,
            Finalize::Cleanup(upgrade) => abort(&upgrade, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

/// Requeue after an error: the status and an event say what happened.
pub fn error_policy(upgrade: Arc<PostgresUpgrade>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(upgrade = %upgrade.name_any(), kind = error.kind(), "{error}");
    ctx.metrics.inc_error(
        &upgrade.namespace().unwrap_or_default(),
        &upgrade.name_any(),
        error.kind(),
    );
    Action::requeue(Duration::from_secs(5))
}

/// Runs one step and records the outcome in status and events, errors included.
async fn drive(upgrade: &PostgresUpgrade, ctx: &Context) -> Result<Action> {
    let mut report = Report::from(upgrade);
    if report.status.phase == Some(Phase::Completed) {
        if upgrade.spec.rollback.requested {
            report.event(
                EventType::Warning,
                "RollbackUnavailable",
                "the upgrade is completed: its rollback window ended and cleanup removed the reverse replication, so the source is no longer current; spec.rollback.requested has no effect",
            );
            publish_events(upgrade, ctx, &report).await;
        }
        return Ok(Action::await_change());
    }
    let outcome = step(upgrade, ctx, &mut report).await;
    let action = match outcome {
        Ok(next) => next,
        Err(error) => {
            tracing::warn!(upgrade = %report.name, kind = error.kind(), "{error}");
            ctx.metrics
                .inc_error(&report.namespace, &report.name, error.kind());
            report.failed(error.kind(), &error.to_string());
            Action::requeue(match error {
                Error::SchemaCopyFailed { .. } => SLOW,
                _ => Duration::from_secs(5),
            })
        }
    };
    publish(upgrade, ctx, &report).await?;
    Ok(action)
}

async fn step(upgrade: &PostgresUpgrade, ctx: &Context, report: &mut Report) -> Result<Action> {
    let inputs = cluster::dereference(&ctx.client, upgrade).await?;
    let mut v = match validate(upgrade, &inputs) {
        Ok(v) => v,
        Err(problems) => {
            report.invalid(&problems);
            return Ok(Action::requeue(SLOW));
        }
    };
    reach_source(&mut v, ctx).await?;
    let target_password = provision_target(&mut v, ctx).await?;
    let Some(target_password) = target_password else {
        report.phase(
            Phase::Provisioning,
            "TargetStarting",
            &format!(
                "waiting for the target StatefulSet {} to be ready",
                v.names.target()
            ),
        );
        return Ok(Action::requeue(POLL));
    };
    let target_endpoint = target_endpoint(&v, &target_password);
    let poolers = pooler_consoles(&v, ctx).await?;
    let mut up = connect(&v, ctx, target_endpoint.clone(), poolers.clone()).await?;
    up.recover().await?;

    let preflight = up.preflight().await?;
    report.status.source_version = Some(preflight.source_version.clone());
    report.status.target_version = Some(preflight.target_version.clone());
    report.status.warnings = findings(&preflight.warnings);
    report.status.blockers = findings(&preflight.blockers);
    if !preflight.ready() {
        report.blocked();
        return Ok(Action::requeue(SLOW));
    }

    let spec = &v.upgrade.spec;
    let observed = up.observe().await?;
    let window_ends = status::window_ends(&observed, v.rollback_window);
    let window_over = window_ends.is_some_and(|ends| ends <= Timestamp::now());
    let policy = Policy {
        cutover: match spec.cutover.mode {
            CutoverMode::Manual if !spec.cutover.approved => EngineCutover::Manual,
            _ => EngineCutover::Automatic,
        },
        // Past the window's end the way back is closed, whatever was asked.
        rollback: spec.rollback.requested && !window_over,
        ..up.policy(false)
    };
    let steps: Vec<(Database, Step)> = observed
        .into_iter()
        .map(|db| {
            let action = decide::decide(&db, &policy);
            (db, action)
        })
        .collect();
    let next = decide::next(&steps, &policy);
    let failing = report.new_apply_errors(&steps);
    report.databases(&steps);
    // With no window there is no end to show.
    report.window_ends(
        window_ends.filter(|_| !v.rollback_window.is_zero()),
        v.rollback_window,
    );
    if let Some(database) = failing.first() {
        return Err(up.apply_failure(database).await?.into());
    }
    let switched = steps.iter().any(|(db, _)| db.serving() == Side::Target);
    // A rollback, like the cutover, pauses every PgBouncer replica: all of them must be ready.
    if spec.traffic.mode == TrafficMode::PgBouncer && (!switched || policy.rollback) {
        if !provision_pgbouncer(&v, ctx, report).await? {
            return Ok(Action::requeue(POLL));
        }
        // The engine must pause exactly the replicas that are ready now.
        let ready = pooler_consoles(&v, ctx).await?;
        if addresses(&ready) != addresses(&poolers) {
            // The old engine's sessions hold the upgrade lock: let go of it first.
            drop(up);
            up = connect(&v, ctx, target_endpoint, ready).await?;
        }
    }
    // Steps toward a rollback, and after its switch until it is done.
    let rolling_back = policy.rollback
        && steps
            .iter()
            .any(|(db, _)| db.serving() == Side::Target || db.forward_from.is_some());

    match next {
        Next::WindowOpen if !window_over => {
            let ends = window_ends.expect("an open window has a switch time");
            report.window_open(ends);
            let until_end =
                Duration::try_from(ends.duration_since(Timestamp::now())).unwrap_or_default();
            Ok(Action::requeue(until_end.clamp(SOON, SLOW)))
        }
        Next::Done | Next::WindowOpen => {
            if spec.rollback.requested && window_over {
                report.event(
                    EventType::Warning,
                    "RollbackWindowEnded",
                    "spec.rollback.requested came after the rollback window's end: the upgrade completes on the target",
                );
            }
            complete(&v, ctx, &mut up, report).await?;
            Ok(Action::await_change())
        }
        Next::Broken { database, why } => Err(EngineError::Broken { database, why }.into()),
        Next::Act { database, action } => {
            if action == Step::CopySchema {
                let db = steps
                    .iter()
                    .find(|(d, _)| d.name == database)
                    .map(|(d, _)| d.clone())
                    .expect("the decision names an observed database");
                return copy_schema(&v, ctx, &mut up, &db, report).await;
            }
            let phase = match rolling_back {
                true => Phase::RollingBack,
                false => phase_of(action.phase()),
            };
            report.phase(
                phase,
                "Progressing",
                &format!("database {database}: {action:?}"),
            );
            up.advance_with(&policy).await?;
            Ok(Action::requeue(SOON))
        }
        Next::WaitForCopy => {
            report.phase(Phase::Replicating, "InitialCopy", "copying tables");
            Ok(Action::requeue(POLL))
        }
        Next::CatchUp {
            direction: Direction::Back,
            lag_bytes,
        } => {
            report.phase(
                Phase::RollingBack,
                "CatchingUp",
                &format!(
                    "the source is {} behind the target; the rollback starts once it is within {}",
                    human_bytes(lag_bytes),
                    human_bytes(policy.max_lag_bytes)
                ),
            );
            Ok(Action::requeue(POLL))
        }
        Next::CatchUp { .. } => {
            report.phase(Phase::CatchingUp, "CatchingUp", "the target is catching up");
            Ok(Action::requeue(POLL))
        }
        Next::RolledBack => {
            report.rolled_back();
            Ok(Action::requeue(Duration::from_secs(5)))
        }
        Next::ReadyForCutover => {
            report.ready_for_cutover();
            Ok(Action::requeue(Duration::from_secs(5)))
        }
        Next::Cutover(direction) => cut_over(upgrade, ctx, &mut up, report, direction).await,
        // No window (it ended, or the switch had none): the upgrade is done.
        Next::CannotRollBack {
            why,
            phase: EnginePhase::Done,
        } => {
            report.event(EventType::Warning, "RollbackUnavailable", &why);
            complete(&v, ctx, &mut up, report).await?;
            Ok(Action::await_change())
        }
        Next::CannotRollBack { .. } => {
            report.held_for_rollback();
            Ok(Action::requeue(Duration::from_secs(5)))
        }
    }
}

/// The resource's phase for the engine's phase of a step.
fn phase_of(phase: EnginePhase) -> Phase {
    match phase {
        EnginePhase::Preflight | EnginePhase::Schema => Phase::CopyingSchema,
        EnginePhase::Replicate => Phase::Replicating,
        EnginePhase::CatchUp => Phase::CatchingUp,
        EnginePhase::ReadyForCutover => Phase::ReadyForCutover,
        EnginePhase::Cutover => Phase::CuttingOver,
        EnginePhase::WindowOpen | EnginePhase::Done => Phase::Completed,
    }
}

fn addresses(endpoints: &[Endpoint]) -> Vec<(&str, u16)> {
    endpoints
        .iter()
        .map(|e| (e.host.as_str(), e.port))
        .collect()
}

fn findings(list: &[pgshift_engine::preflight::Finding]) -> Vec<Finding> {
    list.iter()
        .map(|f| Finding {
            code: f.code.to_string(),
            object: f.object.clone(),
            problem: f.problem.clone(),
            fix: f.fix.clone(),
        })
        .collect()
}

/// The schema of one database, by a Job that runs the target image's own tools.
async fn copy_schema(
    v: &Validated,
    ctx: &Context,
    up: &mut Upgrade,
    db: &Database,
    report: &mut Report,
) -> Result<Action> {
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &v.namespace);
    let name = v.names.schema_job(db.source_oid);
    let Some(job) = jobs.get_opt(&name).await? else {
        up.prepare_schema_copy(&db.name).await?;
        let epilogue = pgshift_engine::schema::restore_epilogue();
        cluster::apply(
            &jobs,
            &build::schema_job(v, &db.name, db.source_oid, &epilogue),
        )
        .await?;
        report.phase(
            Phase::CopyingSchema,
            "SchemaCopyStarted",
            &format!("Job {name} copies the schema of database {}", db.name),
        );
        report.event(
            EventType::Normal,
            "SchemaCopyStarted",
            &format!("Job {name} copies the schema of database {}", db.name),
        );
        return Ok(Action::requeue(POLL));
    };
    let failed = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Failed" && c.status == "True"));
    if failed {
        let message = job_failure(ctx, &v.namespace, &name).await?;
        // The next reconcile starts a new Job (the restore kept nothing).
        jobs.delete(&name, &kube::api::DeleteParams::background())
            .await?;
        return Err(Error::SchemaCopyFailed {
            job: name,
            database: db.name.clone(),
            message,
        });
    }
    report.phase(
        Phase::CopyingSchema,
        "SchemaCopying",
        &format!("Job {name} copies the schema of database {}", db.name),
    );
    Ok(Action::requeue(POLL))
}

/// What the failed Job's last pod said (its termination message: the end of its log).
async fn job_failure(ctx: &Context, namespace: &str, job: &str) -> Result<String> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels(&format!("job-name={job}")))
        .await?;
    let message = list
        .items
        .iter()
        .filter_map(|pod| {
            let state = pod
                .status
                .as_ref()?
                .container_statuses
                .as_ref()?
                .first()?
                .state
                .as_ref()?;
            let terminated = state.terminated.as_ref()?;
            Some(
                terminated
                    .message
                    .clone()
                    .unwrap_or_else(|| format!("exit code {}", terminated.exit_code)),
            )
        })
        .next_back()
        .unwrap_or_else(|| "its pod left no message".to_string());
    Ok(message.trim().to_string())
}

/// One switch in `direction`: the cutover, or a rollback (the same fence, proof and budget
/// with the servers' roles swapped).
async fn cut_over(
    upgrade: &PostgresUpgrade,
    ctx: &Context,
    up: &mut Upgrade,
    report: &mut Report,
    direction: Direction,
) -> Result<Action> {
    let (phase, what, carry_on_with) = match direction {
        Direction::Forward => (
            Phase::CuttingOver,
            "fencing writes and switching",
            "the source",
        ),
        Direction::Back => (
            Phase::RollingBack,
            "fencing writes on the target and switching clients back to the source",
            "the target",
        ),
    };
    // Watchers see the switch start before the pause.
    report.phase(phase, phase.name(), what);
    publish(upgrade, ctx, report).await?;
    ctx.metrics
        .inc_cutover_attempts(&report.namespace, &report.name);
    let switch = match direction {
        Direction::Forward => &mut report.status.cutover,
        Direction::Back => {
            &mut report
                .status
                .rollback
                .get_or_insert_with(RollbackStatus::default)
                .cutover
        }
    };
    let attempts = switch.as_ref().map_or(0, |c| c.attempts) + 1;
    let outcome = match direction {
        Direction::Forward => up.cutover_now().await.map(Some),
        Direction::Back => up.rollback_now().await,
    };
    match outcome {
        Ok(Some(done)) => {
            ctx.metrics.set_cutover_pause(
                &report.namespace,
                &report.name,
                Duration::from_secs_f64(done.pause_ms / 1e3),
            );
            *switch = Some(CutoverStatus {
                pause: Some(format!("{:.0}ms", done.pause_ms)),
                pause_ms: Some(done.pause_ms),
                attempts,
                last_abort_reason: None,
                sessions_ended: Some(done.sessions_ended),
                sequences_synced: done.sequences_synced as i64,
            });
            let (reason, ended_on) = match direction {
                Direction::Forward => ("CutoverCompleted", "source"),
                Direction::Back => ("RollbackCompleted", "target"),
            };
            report.event(
                EventType::Normal,
                reason,
                &format!(
                    "writes paused {:.1} ms; {} sequences synced; {} {ended_on} sessions ended",
                    done.pause_ms, done.sequences_synced, done.sessions_ended
                ),
            );
            Ok(Action::requeue(SOON))
        }
        // A rollback a crash cut short after its switch, finished now.
        Ok(None) => Ok(Action::requeue(SOON)),
        Err(EngineError::CutoverAborted {
            step,
            elapsed,
            budget,
            ..
        }) => {
            let reason = format!("{step} took longer than maxPause ({elapsed:?} of {budget:?})");
            let aborted = switch.get_or_insert_with(CutoverStatus::default);
            aborted.attempts = attempts;
            aborted.last_abort_reason = Some(reason.clone());
            let (phase, event) = match direction {
                Direction::Forward => (Phase::CatchingUp, "CutoverAborted"),
                Direction::Back => (Phase::RollingBack, "RollbackAborted"),
            };
            report.phase(
                phase,
                event,
                &format!("{reason}; clients carry on with {carry_on_with}, trying again"),
            );
            report.event(EventType::Warning, event, &reason);
            Ok(Action::requeue(Duration::from_secs(5)))
        }
        Err(refused @ EngineError::RollbackRefused { .. }) => {
            report.rollback_refused(&refused.to_string());
            report.event(EventType::Warning, "RollbackRefused", &refused.to_string());
            Ok(Action::requeue(SLOW))
        }
        Err(e) => Err(e.into()),
    }
}

/// After the switch: pgshift's replication objects go, and the new server (and PgBouncer)
/// stop belonging to the upgrade, so that deleting it never deletes them.
async fn complete(
    v: &Validated,
    ctx: &Context,
    up: &mut Upgrade,
    report: &mut Report,
) -> Result<()> {
    up.cleanup().await?;
    let (steps, _) = up.decided(&up.policy(false)).await?;
    report.databases(&steps);
    let ns = &v.namespace;
    let client = &ctx.client;
    cluster::release(
        &Api::<StatefulSet>::namespaced(client.clone(), ns),
        &v.names.target(),
    )
    .await?;
    cluster::release(
        &Api::<Service>::namespaced(client.clone(), ns),
        &v.names.target(),
    )
    .await?;
    cluster::release(
        &Api::<Secret>::namespaced(client.clone(), ns),
        &v.names.target_secret(),
    )
    .await?;
    if v.upgrade.spec.traffic.mode == TrafficMode::PgBouncer {
        let name = v.names.pgbouncer();
        cluster::release(&Api::<Deployment>::namespaced(client.clone(), ns), &name).await?;
        cluster::release(&Api::<ConfigMap>::namespaced(client.clone(), ns), &name).await?;
        cluster::release(&Api::<Secret>::namespaced(client.clone(), ns), &name).await?;
        cluster::release(
            &Api::<Service>::namespaced(client.clone(), ns),
            &v.names.route(),
        )
        .await?;
    } else {
        let services: Api<Service> = Api::namespaced(client.clone(), ns);
        drop_original_annotation(&services, &v.upgrade.spec.traffic.service).await?;
    }
    if v.upgrade.spec.cleanup.delete_source {
        delete_source_workload(v, ctx, report).await?;
    }
    report.completed();
    Ok(())
}

async fn drop_original_annotation(services: &Api<Service>, name: &str) -> Result<()> {
    let patch = json!({"metadata": {"annotations": {ORIGINAL_ANNOTATION: null}}});
    services
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

async fn delete_source_workload(v: &Validated, ctx: &Context, report: &mut Report) -> Result<()> {
    let Some(workload) = &v.upgrade.spec.source.workload else {
        return Ok(());
    };
    let ns = &v.namespace;
    let params = kube::api::DeleteParams::background();
    let deleted = match workload.kind {
        crate::crd::WorkloadKind::StatefulSet => {
            Api::<StatefulSet>::namespaced(ctx.client.clone(), ns)
                .delete(&workload.name, &params)
                .await
                .map(|_| ())
        }
        crate::crd::WorkloadKind::Deployment => {
            Api::<Deployment>::namespaced(ctx.client.clone(), ns)
                .delete(&workload.name, &params)
                .await
                .map(|_| ())
        }
    };
    match deleted {
        Ok(()) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    report.event(
        EventType::Normal,
        "SourceDeleted",
        &format!(
            "{:?} {} deleted (its volumes are kept)",
            workload.kind, workload.name
        ),
    );
    Ok(())
}

/// The resource is being deleted: before the switch, everything pgshift did is undone (clients
/// back on the source directly, every pgshift object on the source removed); after it, the
/// upgrade is finished instead, since the target has taken writes.
async fn abort(upgrade: &PostgresUpgrade, ctx: &Context) -> Result<Action> {
    let mut report = Report::from(upgrade);
    ctx.metrics.forget(&report.namespace, &report.name);
    if report.status.phase == Some(Phase::Completed) {
        return Ok(Action::await_change());
    }
    let inputs = cluster::dereference(&ctx.client, upgrade).await?;
    let mut v = validate(upgrade, &inputs).map_err(|problems| {
        Error::Finalizer(format!(
            "cannot clean up the source: {}; fix that so pgshift can remove its objects from the source",
            problems.join("; ")
        ))
    })?;
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &v.namespace);
    let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &v.namespace);
    if sets.get_opt(&v.names.target()).await?.is_none() {
        // No target server: the engine never ran, so the source holds nothing of pgshift's.
        restore_clients(&services, &upgrade.spec.traffic.service).await?;
        return Ok(Action::await_change());
    }
    reach_source(&mut v, ctx).await?;
    let Some(password) = provision_target(&mut v, ctx).await? else {
        return Err(Error::Finalizer(format!(
            "waiting for the target {} to answer, to remove pgshift's objects from the source",
            v.names.target()
        )));
    };
    let poolers = pooler_consoles(&v, ctx).await?;
    let mut up = connect(&v, ctx, target_endpoint(&v, &password), poolers).await?;
    // The clients' Service goes back to the source only once the engine has found the upgrade
    // unswitched: after the switch (even with the status lost) it stays on the new server.
    match up.abort().await {
        Ok(removed) => {
            restore_clients(&services, &upgrade.spec.traffic.service).await?;
            report.event(
                EventType::Normal,
                "Aborted",
                &format!(
                    "removed from the source: slots {:?}, publications {:?}; target databases dropped: {:?}",
                    removed.slots, removed.publications, removed.target_databases
                ),
            );
        }
        // Switched: the target has the writes; finishing is the only safe end.
        Err(EngineError::AlreadySwitched { .. }) => {
            complete(&v, ctx, &mut up, &mut report).await?;
        }
        Err(e) => return Err(e.into()),
    }
    publish_events(upgrade, ctx, &report).await;
    Ok(Action::await_change())
}

/// Writes the status (when it changed) and publishes the report's events.
async fn publish(upgrade: &PostgresUpgrade, ctx: &Context, report: &Report) -> Result<()> {
    if let Some(phase) = report.status.phase {
        ctx.metrics
            .set_phase(&report.namespace, &report.name, phase.name());
    }
    if let Some(lag) = report.status.lag_bytes {
        ctx.metrics
            .set_replication_lag(&report.namespace, &report.name, lag.max(0) as u64);
    }
    if upgrade.status.as_ref() != Some(&report.status) {
        let api: Api<PostgresUpgrade> = Api::namespaced(ctx.client.clone(), &report.namespace);
        let written = serde_json::to_value(&upgrade.status).expect("a status is JSON");
        let status = serde_json::to_value(&report.status).expect("a status is JSON");
        let patch = json!({"status": merge_patch(&written, status)});
        api.patch_status(&report.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    publish_events(upgrade, ctx, report).await;
    Ok(())
}

/// A JSON merge patch from `written` to `wanted`: a field `wanted` leaves out (an empty list, a
/// cleared value) is written as null, which is how a merge patch removes it; otherwise the API
/// server would keep the old value (a blocker that was fixed, a window that is no longer open).
fn merge_patch(written: &serde_json::Value, mut wanted: serde_json::Value) -> serde_json::Value {
    if let (Some(written), Some(fields)) = (written.as_object(), wanted.as_object_mut()) {
        for (key, old) in written {
            match fields.get_mut(key) {
                Some(new) => *new = merge_patch(old, new.take()),
                None => {
                    fields.insert(key.clone(), serde_json::Value::Null);
                }
            }
        }
    }
    wanted
}

async fn publish_events(upgrade: &PostgresUpgrade, ctx: &Context, report: &Report) {
    let reference = upgrade.object_ref(&());
    for event in &report.events {
        let published = ctx
            .recorder
            .publish(
                &KubeEvent {
                    type_: event.type_,
                    reason: event.reason.clone(),
                    note: Some(event.note.chars().take(1000).collect()),
                    action: "Reconcile".into(),
                    secondary: None,
                },
                &reference,
            )
            .await;
        if let Err(error) = published {
            tracing::warn!(reason = %event.reason, "could not publish an event: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the new status leaves out is removed (null), nested too; what it has replaces the
    /// old value, lists whole.
    #[test]
    fn the_status_patch_removes_what_the_new_status_leaves_out() {
        let written = json!({
            "phase": "RollbackWindow",
            "blockers": [{"code": "target_not_empty"}],
            "rollback": {"windowEnds": "2026-12-02T13:47:32Z"},
            "cutover": {"attempts": 1, "lastAbortReason": "too slow"},
        });
        let wanted = json!({
            "phase": "RolledBack",
            "rollback": {"cutover": {"attempts": 1}},
            "cutover": {"attempts": 2},
            "databases": [{"name": "app"}],
        });
        assert_eq!(
            merge_patch(&written, wanted),
            json!({
                "phase": "RolledBack",
                "blockers": null,
                "rollback": {"windowEnds": null, "cutover": {"attempts": 1}},
                "cutover": {"attempts": 2, "lastAbortReason": null},
                "databases": [{"name": "app"}],
            })
        );
        assert_eq!(
            merge_patch(&serde_json::Value::Null, json!({"phase": "Pending"})),
            json!({"phase": "Pending"}),
            "the first status is written as it is"
        );
    }
}
