//! `pgshift demo`: a real upgrade on local servers. It starts an old-version and a new-version
//! server and a PgBouncer under a temporary directory, loads sample data, keeps a live write
//! load running through PgBouncer, upgrades, verifies, reports, and removes all it started.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pgshift_engine::pgbouncer::PgbouncerTarget;
use pgshift_engine::{Endpoint, Event, Plan, Secret, Side, Traffic, Upgrade};
use pgshift_lab::ledger::{Ledger, LedgerTarget, LoadOptions};
use pgshift_lab::sample::{self, SampleData};
use pgshift_lab::{inspect, BouncerDatabase, BouncerOptions, PgBouncer, PgServer, ServerOptions};
use serde::Serialize;

use crate::args::DemoArgs;
use crate::output;
use crate::progress::Progress;

const APP_USER: &str = "app";
/// A demo password for a throwaway local server; never a real secret.
const APP_PASSWORD: &str = "demo-app-password";

/// Tables the write load changes after the switch; the ledger verifies them instead.
const LEDGER_TABLES: [&str; 2] = ["public.ledger_accounts", "public.ledger_entries"];

#[derive(Serialize)]
struct DemoReport {
    source_version: String,
    target_version: String,
    mode: &'static str,
    phases: Vec<pgshift_engine::upgrade::PhaseTiming>,
    cutover: CutoverFigures,
    workload: WorkloadFigures,
    verification: Verification,
    /// When things happened, in ms since the write load started: each phase's start and the
    /// slowest transaction's start, to tell a pause of the cutover from other stalls.
    timeline: Timeline,
}

#[derive(Serialize)]
struct Timeline {
    phases: Vec<(String, f64)>,
    slowest_transaction_at_ms: f64,
}

#[derive(Serialize)]
struct CutoverFigures {
    /// Client-observed: the longest transaction minus the p99 of the same run.
    write_pause_ms: f64,
    /// Client-observed: the longest transaction in flight during the fence, whatever else the
    /// machine did in the rest of the run.
    longest_transaction_in_cutover_ms: f64,
    /// pgshift's own measure, from the fence to the release of clients.
    server_pause_ms: f64,
    aborted: bool,
    aborted_attempts: u32,
    sequences_synced: usize,
}

#[derive(Serialize)]
struct WorkloadFigures {
    clients: usize,
    committed: u64,
    failed: u64,
    in_doubt: u64,
    lost: u64,
    tps: f64,
    p50_latency_ms: f64,
    p99_latency_ms: f64,
    max_latency_ms: f64,
    /// The longest interval in which no client committed: write unavailability as clients saw it,
    /// reconnects and refused attempts included.
    longest_commit_gap_ms: f64,
    invariant_holds: bool,
    errors: Vec<(String, u64)>,
}

#[derive(Serialize)]
struct Verification {
    tables: usize,
    mismatched: usize,
    mismatched_tables: Vec<String>,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let say = |line: String| {
        if !args.json {
            output::err(&format!("{line}\n"));
        }
    };
    let dir = tempfile::Builder::new().prefix("pgshift-demo").tempdir()?;
    say(format!(
        "starting PostgreSQL {} (source) and {} (target) under {}",
        args.source_version,
        args.target_version,
        dir.path().display()
    ));
    let (source, target) = tokio::join!(
        PgServer::start(ServerOptions::new(
            args.source_version,
            dir.path().to_path_buf(),
            "source"
        )),
        PgServer::start(ServerOptions::new(
            args.target_version,
            dir.path().to_path_buf(),
            "target"
        )),
    );
    let (source, target) = (source?, target?);
    source.create_database("app").await?;
    let client = source.connect("app").await?;
    say(format!("loading sample data (scale {})", args.scale));
    sample::load(&client, SampleData::scale(args.scale)).await?;
    Ledger::install(&client, 100).await?;
    // The application's own role: PgBouncer logs in as it, and pgshift copies it (with its
    // password hash) to the new server.
    source.create_login_role(APP_USER, APP_PASSWORD).await?;
    Ledger::grant(&client, APP_USER).await?;
    client
        .batch_execute(&format!(
            "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {APP_USER}"
        ))
        .await?;

    let mut entry = BouncerDatabase::for_server(&source, "app");
    entry.user = APP_USER.into();
    entry.password = APP_PASSWORD.into();
    let bouncer =
        PgBouncer::start(BouncerOptions::new(dir.path().to_path_buf(), vec![entry])).await?;
    let load_target = if args.direct {
        LedgerTarget::read_write(&[&source, &target], "app")
    } else {
        LedgerTarget::bouncer(&bouncer, "app", APP_USER, APP_PASSWORD)
    };
    say(format!(
        "writing through {} with {} clients",
        if args.direct {
            "both servers (direct mode)"
        } else {
            "PgBouncer"
        },
        args.clients
    ));
    let load = Ledger::run(
        load_target,
        LoadOptions {
            clients: args.clients,
            rate: None,
            ..LoadOptions::default()
        },
    );
    tokio::time::sleep(args.duration).await;

    let mut plan = Plan::new(
        endpoint(&source, Side::Source),
        endpoint(&target, Side::Target),
    );
    plan.pg_bin_dir = Some(target.bin_dir().to_path_buf());
    plan.max_pause = args.cutover.max_pause;
    plan.command = "demo".into();
    plan.fence_guard = std::env::current_exe().ok();
    if !args.direct {
        let admin = Endpoint::new(
            Side::Pgbouncer,
            bouncer.host(),
            bouncer.port(),
            bouncer.admin_user(),
            "pgbouncer",
            Some(Secret::new(bouncer.admin_password())),
        );
        plan.traffic = Traffic::Pgbouncer(vec![PgbouncerTarget::new(
            admin,
            bouncer.config_path().to_path_buf(),
        )]);
    }
    let aborted = Arc::new(AtomicU32::new(0));
    // The fence's window, from the cutover's step events: (fence start, clients released).
    let window: Arc<Mutex<(Option<Instant>, Option<Instant>)>> = Arc::default();
    let phase_starts: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let progress = Progress::new(args.json);
    let sink = {
        let (aborted, window, phase_starts) =
            (aborted.clone(), window.clone(), phase_starts.clone());
        let show = progress.sink();
        Arc::new(move |event: Event| {
            match &event {
                Event::Phase { phase } => {
                    phase_starts
                        .lock()
                        .expect("phases lock")
                        .push((phase.name().to_string(), Instant::now()));
                }
                Event::CutoverAborted { .. } => {
                    aborted.fetch_add(1, Ordering::Relaxed);
                }
                Event::CutoverStep { step, ms } if step == "fence" => {
                    let started = Instant::now() - Duration::from_secs_f64(ms / 1e3);
                    window.lock().expect("window lock").0 = Some(started);
                }
                Event::CutoverStep { step, .. } if step == "switch" => {
                    window.lock().expect("window lock").1 = Some(Instant::now());
                }
                _ => {}
            }
            show(event);
        })
    };
    say("upgrading".into());
    let started = Instant::now();
    let mut upgrade = Upgrade::connect(plan, sink).await?;
    let outcome = upgrade.run().await;
    progress.finish();
    let outcome = outcome.context("the upgrade failed")?;
    say(format!(
        "upgrade finished in {:.1} s; load continues for {:?}",
        started.elapsed().as_secs_f64(),
        args.duration
    ));
    tokio::time::sleep(args.duration).await;
    let load_started = load.started();
    let workload = load.stop().await;
    let in_cutover_ms = match *window.lock().expect("window lock") {
        (Some(from), Some(to)) => workload.longest_in_window_ms(
            from.duration_since(load_started).as_micros() as u64,
            to.duration_since(load_started).as_micros() as u64,
        ),
        _ => 0.0,
    };

    let target_client = target.connect("app").await?;
    let verified = Ledger::verify(&target_client, &workload).await?;
    // A new session: in direct mode the fence ended every earlier one on the source.
    let source_client = source.connect("app").await?;
    let source_sums = inspect::table_checksums(&source_client).await?;
    let target_sums = inspect::table_checksums(&target_client).await?;
    let compared: Vec<&String> = source_sums
        .keys()
        .filter(|t| !LEDGER_TABLES.contains(&t.as_str()))
        .collect();
    let mismatched: Vec<String> = compared
        .iter()
        .filter(|t| source_sums.get(**t) != target_sums.get(**t))
        .map(|t| t.to_string())
        .collect();

    let since_load = |at: Instant| at.duration_since(load_started).as_secs_f64() * 1e3;
    let timeline = Timeline {
        phases: phase_starts
            .lock()
            .expect("phases lock")
            .iter()
            .map(|(name, at)| (name.clone(), since_load(*at)))
            .collect(),
        slowest_transaction_at_ms: workload
            .samples
            .iter()
            .max_by_key(|s| s.latency_us)
            .map_or(0.0, |s| s.start_us as f64 / 1e3),
    };
    let cutover = outcome
        .cutover
        .clone()
        .context("the upgrade finished without a cutover")?;
    let report = DemoReport {
        source_version: source.version().to_string(),
        target_version: target.version().to_string(),
        mode: cutover.mode,
        phases: outcome.phases.clone(),
        cutover: CutoverFigures {
            write_pause_ms: workload.write_pause_ms,
            longest_transaction_in_cutover_ms: in_cutover_ms,
            server_pause_ms: cutover.pause_ms,
            aborted: false,
            aborted_attempts: aborted.load(Ordering::Relaxed),
            sequences_synced: cutover.sequences_synced,
        },
        workload: WorkloadFigures {
            clients: args.clients,
            committed: workload.committed,
            failed: workload.failed,
            in_doubt: workload.in_doubt,
            lost: verified.lost,
            tps: workload.tps,
            p50_latency_ms: workload.p50_ms,
            p99_latency_ms: workload.p99_ms,
            max_latency_ms: workload.max_ms,
            longest_commit_gap_ms: workload.longest_commit_gap_ms,
            invariant_holds: verified.invariant_holds,
            errors: workload.errors.clone(),
        },
        verification: Verification {
            tables: compared.len() + LEDGER_TABLES.len(),
            mismatched: mismatched.len(),
            mismatched_tables: mismatched,
        },
        timeline,
    };
    drop(bouncer);
    source.stop().await?;
    target.stop().await?;

    if args.json {
        output::out(&format!("{}\n", serde_json::to_string(&report)?))?;
    } else {
        output::out(&render(&report))?;
    }
    let healthy = report.workload.lost == 0
        && report.verification.mismatched == 0
        && report.workload.invariant_holds
        && (args.direct || report.workload.failed == 0);
    if !healthy {
        bail!("the demo upgrade lost or changed data, or clients failed in PgBouncer mode: see the report above");
    }
    Ok(ExitCode::SUCCESS)
}

fn endpoint(server: &PgServer, side: Side) -> Endpoint {
    Endpoint::new(
        side,
        server.host(),
        server.port(),
        server.superuser(),
        "app",
        Some(Secret::new(server.password())),
    )
}

fn render(r: &DemoReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "\npgshift demo: PostgreSQL {} -> {} ({} mode)\n\n",
        r.source_version, r.target_version, r.mode
    ));
    out.push_str("phases:\n");
    for phase in &r.phases {
        out.push_str(&format!("  {:<18} {:>8} ms\n", phase.name, phase.ms));
    }
    out.push_str(&format!(
        "\ncutover: write pause seen by clients {:.1} ms (longest transaction - p99); longest transaction during the fence {:.1} ms;\n         pgshift measured {:.1} ms; {} sequences copied, {} aborted attempts\n",
        r.cutover.write_pause_ms,
        r.cutover.longest_transaction_in_cutover_ms,
        r.cutover.server_pause_ms,
        r.cutover.sequences_synced,
        r.cutover.aborted_attempts
    ));
    let w = &r.workload;
    out.push_str(&format!(
        "workload: {} clients, {} committed, {} failed, {} in doubt, {} lost, {:.0} TPS\n          latency p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms; longest interval without a commit {:.1} ms; balance invariant {}\n",
        w.clients, w.committed, w.failed, w.in_doubt, w.lost, w.tps, w.p50_latency_ms, w.p99_latency_ms, w.max_latency_ms,
        w.longest_commit_gap_ms,
        if w.invariant_holds { "holds" } else { "BROKEN" }
    ));
    for (error, count) in &w.errors {
        out.push_str(&format!("          client error x{count}: {error}\n"));
    }
    out.push_str(&format!(
        "          slowest transaction started {:.0} ms into the load, {}\n",
        r.timeline.slowest_transaction_at_ms,
        when(&r.timeline.phases, r.timeline.slowest_transaction_at_ms)
    ));
    out.push_str(&format!(
        "verification: {} tables compared, {} mismatched\n",
        r.verification.tables, r.verification.mismatched
    ));
    out
}

/// Which phase a moment (ms since the load started) fell in, as words for the report.
fn when(phases: &[(String, f64)], at_ms: f64) -> String {
    match phases.iter().rev().find(|(_, start)| *start <= at_ms) {
        None => "before the upgrade started".into(),
        Some((name, _)) if name == "done" || name == "window_open" => {
            "after the upgrade finished".into()
        }
        Some((name, _)) => format!("during the {name} phase"),
    }
}

#[cfg(test)]
mod tests {
    use super::when;

    #[test]
    fn a_moment_is_placed_in_its_phase() {
        let phases = vec![
            ("preflight".to_string(), 5000.0),
            ("cutover".to_string(), 7000.0),
            ("done".to_string(), 7100.0),
        ];
        assert_eq!(when(&phases, 100.0), "before the upgrade started");
        assert_eq!(when(&phases, 6000.0), "during the preflight phase");
        assert_eq!(when(&phases, 7050.0), "during the cutover phase");
        assert_eq!(when(&phases, 9000.0), "after the upgrade finished");
    }
}
