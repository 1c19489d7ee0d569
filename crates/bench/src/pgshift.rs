//! pgshift itself, in direct mode and through PgBouncer, run as a library on the lab servers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgshift_engine::pgbouncer::PgbouncerTarget;
use pgshift_engine::{Endpoint, Event, Plan, Secret, Side, Traffic, Upgrade};
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
    let mut plan = Plan::new(
        endpoint(&lab.source, Side::Source),
        endpoint(&lab.target, Side::Target),
    );
    plan.pg_bin_dir = Some(lab.target.bin_dir().to_path_buf());
    let bouncer = match mode {
        Mode::Direct => None,
        Mode::Pgbouncer => {
            let mut entry = BouncerDatabase::for_server(&lab.source, DB);
            entry.user = APP_USER.into();
            entry.password = APP_PASSWORD.into();
            let bouncer =
                PgBouncer::start(BouncerOptions::new(lab.dir.path(), vec![entry])).await?;
            plan.traffic = Traffic::Pgbouncer(Box::new(bouncer_target(&bouncer)));
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
    let events = {
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
    let mut upgrade = Upgrade::connect(plan, events).await?;
    let outcome = upgrade.run().await?;
    let ended = Instant::now();
    if outcome.cutover.is_none() {
        return Err(BenchError::NoCutover);
    }
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
