//! pgshift itself, in direct mode and through PgBouncer, run as a library on the lab servers
//! the way a user runs the CLI with `--cutover manual`: `pgshift run` until it reports ready
//! for the cutover (the time to ready), then `pgshift cutover`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgshift_engine::pgbouncer::PgbouncerTarget;
use pgshift_engine::{
    CutoverMode, Endpoint, Error, Event, EventSink, Phase, Plan, Secret, Side, Traffic, Upgrade,
};
use pgshift_lab::ledger::{Ledger, LedgerTarget};
use pgshift_lab::{BouncerDatabase, BouncerOptions, PgBouncer, PgServer};

use crate::error::{BenchError, Result};
use crate::figures::{MethodFigures, StoppedRun, Timing};
use crate::lab::{settle, stop_load, Lab, Workload, APP_PASSWORD, APP_USER, DB};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Direct,
    Pgbouncer,
}

pub async fn run(work: &Workload, mode: Mode) -> Result<MethodFigures> {
    let name = match mode {
        Mode::Direct => "pgshift-direct",
        Mode::Pgbouncer => "pgshift-pgbouncer",
    };
    let lab = Lab::fresh(work).await?;
    let mut plan = plan(&lab);
    plan.cutover = CutoverMode::Manual;
    let bouncer = match mode {
        Mode::Direct => None,
        Mode::Pgbouncer => {
            let mut entry = BouncerDatabase::for_server(&lab.source, DB);
            entry.user = APP_USER.into();
            entry.password = APP_PASSWORD.into();
            let bouncer =
                PgBouncer::start(BouncerOptions::new(lab.dir.path(), vec![entry])).await?;
            plan.traffic = Traffic::Pgbouncer(vec![bouncer_target(&bouncer)]);
            Some(bouncer)
        }
    };
    let load_target = match &bouncer {
        None => LedgerTarget::read_write(&[&lab.source, &lab.target], DB),
        Some(bouncer) => LedgerTarget::bouncer(bouncer, DB, APP_USER, APP_PASSWORD),
    };
    let load = work.start_load(load_target);
    settle(work).await;

    tracing::info!(method = name, "upgrading");
    let started = Instant::now();
    // The fence's window, from the cutover's step events: (fence raised, clients released).
    let window: Arc<Mutex<(Option<Instant>, Option<Instant>)>> = Arc::default();
    let events: EventSink = {
        let window = window.clone();
        Arc::new(move |event: Event| {
            if let Event::CutoverStep { step, ms } = &event {
                let mut window = window.lock().unwrap_or_else(|e| e.into_inner());
                match step.as_str() {
                    "fence" => {
                        window.0 = Some(Instant::now() - Duration::from_secs_f64(ms / 1e3));
                    }
                    "switch" => window.1 = Some(Instant::now()),
                    _ => {}
                }
            }
            tracing::debug!(?event, "pgshift");
        })
    };
    let outcome = Upgrade::connect(plan.clone(), events.clone())
        .await?
        .run()
        .await?;
    let ready = Instant::now();
    if outcome.finished != Phase::ReadyForCutover {
        return Err(BenchError::NotReady(outcome.finished.name()));
    }
    tracing::info!(
        method = name,
        seconds = ready.duration_since(started).as_secs_f64(),
        "ready for the cutover"
    );
    cut_over(&plan, events).await?;
    let ended = Instant::now();
    settle(work).await;
    let (load_started, report) = stop_load(load).await;
    let (fence, switch) = *window.lock().unwrap_or_else(|e| e.into_inner());

    let verified = Ledger::verify(&lab.target.connect(DB).await?, &report).await?;
    let copy_mb_per_s = outcome
        .phases
        .iter()
        .find(|p| p.name == "replicate")
        .filter(|p| p.ms > 0)
        .map(|p| lab.size_mb / (p.ms as f64 / 1e3));
    let size_mb = lab.size_mb;
    if let Some(bouncer) = bouncer {
        bouncer.stop().await?;
    }
    lab.stop().await?;
    let run = StoppedRun {
        started: load_started,
        report: &report,
    };
    let timing = Timing {
        started,
        ready,
        ended,
        new_server_from: switch.unwrap_or(ended),
    };
    let mut figures = MethodFigures::one_run(name, size_mb, &run, &verified, timing, copy_mb_per_s);
    let since_load = |at: Instant| at.saturating_duration_since(load_started).as_micros() as u64;
    figures.longest_in_cutover_ms = fence
        .zip(switch)
        .map(|(from, to)| report.longest_in_window_ms(since_load(from), since_load(to)));
    Ok(figures)
}

/// `pgshift cutover`, as a user runs it after `run --cutover manual` reported ready: a new
/// process each time, tried again (as the automatic mode would) when an attempt aborted
/// within its budget or its probe row was late.
async fn cut_over(plan: &Plan, events: EventSink) -> Result<()> {
    let mut attempt = 1;
    loop {
        let mut upgrade = Upgrade::connect(plan.clone(), events.clone()).await?;
        match upgrade.cutover_now().await {
            Ok(_) => return Ok(()),
            Err(e @ (Error::CutoverAborted { .. } | Error::NotReady { .. }))
                if attempt < plan.cutover_attempts =>
            {
                tracing::warn!(attempt, "the cutover did not happen ({e}); trying again");
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// pgshift's plan for the lab's database, in direct mode, with the target's client tools.
pub fn plan(lab: &Lab) -> Plan {
    let mut plan = Plan::new(
        endpoint(&lab.source, Side::Source),
        endpoint(&lab.target, Side::Target),
    );
    plan.pg_bin_dir = Some(lab.target.bin_dir().to_path_buf());
    plan
}

fn endpoint(server: &PgServer, side: Side) -> Endpoint {
    Endpoint::new(
        side,
        server.host(),
        server.port(),
        server.superuser(),
        DB,
        Some(Secret::new(server.password())),
    )
}

fn bouncer_target(bouncer: &PgBouncer) -> PgbouncerTarget {
    let admin = Endpoint::new(
        Side::Pgbouncer,
        bouncer.host(),
        bouncer.port(),
        bouncer.admin_user(),
        "pgbouncer",
        Some(Secret::new(bouncer.admin_password())),
    );
    PgbouncerTarget {
        entries: vec![DB.into()],
        ..PgbouncerTarget::new(admin, bouncer.config_path().to_path_buf())
    }
}
