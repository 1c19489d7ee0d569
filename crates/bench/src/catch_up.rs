//! Does apply keep up? pgshift's catch-up (from the end of the initial copy to ready for the
//! cutover) under a sweep of source write rates, one fresh run per rate: whether it converged
//! within its budget, and the source's WAL rate against what the target applied meanwhile.
//! The highest rate that converged is the bench's answer.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgshift_engine::{CutoverMode, Event, EventSink, Phase, Upgrade};
use pgshift_lab::ledger::LedgerTarget;
use serde::Serialize;
use tokio_postgres::Client;

use crate::error::{pg, BenchError, Result};
use crate::lab::{settle, stop_load, Lab, Workload, DB};
use crate::pgshift::plan;

/// How long the catch-up may take before the point counts as not converging.
const BUDGET: Duration = Duration::from_secs(300);
const BUDGET_QUICK: Duration = Duration::from_secs(60);
/// The initial copy's own limit, so that a stuck copy ends the point too.
const COPY_LIMIT: Duration = Duration::from_secs(1800);
const WATCH: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Serialize)]
pub struct CatchUpPoint {
    /// The ledger's total rate cap; None: as fast as its clients go.
    pub rate_asked: Option<f64>,
    pub clients: usize,
    /// Commits per second the source took over the whole run.
    pub source_tps: f64,
    /// WAL the source wrote per second during the catch-up (from its start to ready, or to
    /// the end of the budget).
    pub source_bytes_per_s: f64,
    /// Source WAL the target applied per second meanwhile (its replication origin's progress).
    pub applied_bytes_per_s: f64,
    /// Source WAL not yet applied: at the start of the catch-up, at its peak, and at its end.
    pub first_lag_bytes: i64,
    pub peak_lag_bytes: i64,
    pub last_lag_bytes: i64,
    /// pgshift reported ready for the cutover within the budget.
    pub converged: bool,
    /// From the start of the copy to ready; absent when it did not converge.
    pub time_to_ready_ms: Option<f64>,
    /// From the end of the copy to ready, or to the end of the budget.
    pub catch_up_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl CatchUpPoint {
    /// The highest commit rate among the points that converged.
    pub fn highest_converged_tps(points: &[CatchUpPoint]) -> Option<f64> {
        points
            .iter()
            .filter(|p| p.converged)
            .map(|p| p.source_tps)
            .fold(None, |best, tps| {
                Some(best.map_or(tps, |b: f64| b.max(tps)))
            })
    }
}

/// The rates measured: caps below what the machine sustains, its maximum with the base
/// clients, and with four times as many.
fn rates(base: &Workload, quick: bool) -> Vec<(Option<f64>, usize)> {
    let caps: &[f64] = if quick {
        &[250.0]
    } else {
        &[250.0, 500.0, 1000.0]
    };
    caps.iter()
        .map(|&cap| (Some(cap), base.clients))
        .chain([(None, base.clients), (None, base.clients * 4)])
        .collect()
}

pub async fn run(base: &Workload, quick: bool) -> Vec<CatchUpPoint> {
    let budget = if quick { BUDGET_QUICK } else { BUDGET };
    let mut points = Vec::new();
    for (rate, clients) in rates(base, quick) {
        let work = Workload {
            rate,
            clients,
            ..base.clone()
        };
        tracing::info!(?rate, clients, "measuring catch-up");
        let point = match measure(&work, budget).await {
            Ok(point) => point,
            Err(e) => {
                tracing::error!(?rate, clients, "{e}");
                CatchUpPoint {
                    rate_asked: rate,
                    clients,
                    source_tps: f64::NAN,
                    source_bytes_per_s: f64::NAN,
                    applied_bytes_per_s: f64::NAN,
                    first_lag_bytes: 0,
                    peak_lag_bytes: 0,
                    last_lag_bytes: 0,
                    converged: false,
                    time_to_ready_ms: None,
                    catch_up_ms: f64::NAN,
                    error: Some(e.to_string()),
                }
            }
        };
        tracing::info!(?point, "measured");
        points.push(point);
    }
    points
}

/// One look at both servers during the catch-up: the source's WAL position and the last source
/// position the target applied (its subscription's replication origin).
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    written: i64,
    applied: i64,
}

impl Sample {
    async fn take(source: &Client, target: &Client) -> Result<Sample> {
        let written: i64 = source
            .query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[])
            .await
            .map_err(pg("cannot read the source's WAL position"))?
            .get(0);
        let applied: Option<i64> = target
            .query_one(
                "SELECT max(remote_lsn - '0/0')::int8 FROM pg_replication_origin_status",
                &[],
            )
            .await
            .map_err(pg("cannot read the target's replication origins"))?
            .get(0);
        Ok(Sample {
            at: Instant::now(),
            written,
            applied: applied.unwrap_or(0),
        })
    }

    fn lag(&self) -> i64 {
        (self.written - self.applied).max(0)
    }
}

/// Bytes per second from the first sample to the last: (written, applied); NaN without two.
fn bytes_per_s(samples: &[Sample]) -> (f64, f64) {
    match (samples.first(), samples.last()) {
        (Some(first), Some(last)) if last.at > first.at => {
            let seconds = last.at.duration_since(first.at).as_secs_f64();
            (
                (last.written - first.written) as f64 / seconds,
                (last.applied - first.applied) as f64 / seconds,
            )
        }
        _ => (f64::NAN, f64::NAN),
    }
}

async fn measure(work: &Workload, budget: Duration) -> Result<CatchUpPoint> {
    let lab = Lab::fresh(work).await?;
    let mut plan = plan(&lab);
    plan.cutover = CutoverMode::Manual;
    let load = work.start_load(LedgerTarget::server(&lab.source, DB));
    settle(work).await;

    let started = Instant::now();
    // When pgshift entered its catch-up (the initial copy done).
    let catch_up_from: Arc<Mutex<Option<Instant>>> = Arc::default();
    let events: EventSink = {
        let catch_up_from = catch_up_from.clone();
        Arc::new(move |event: Event| {
            if let Event::Phase {
                phase: Phase::CatchUp,
            } = event
            {
                catch_up_from
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert_with(Instant::now);
            }
        })
    };
    let source = lab.source.connect(DB).await?;
    let mut target = None;
    let mut samples = Vec::new();
    let mut upgrade = Upgrade::connect(plan, events).await?;
    // Samples both servers from the start of the catch-up until its budget is spent.
    let watch = async {
        loop {
            tokio::time::sleep(WATCH).await;
            let from = *catch_up_from.lock().unwrap_or_else(|e| e.into_inner());
            match from {
                Some(from) => {
                    if target.is_none() {
                        target = Some(lab.target.connect(DB).await?);
                    }
                    if let Some(target) = &target {
                        samples.push(Sample::take(&source, target).await?);
                    }
                    if from.elapsed() > budget {
                        return Ok::<(), BenchError>(());
                    }
                }
                None if started.elapsed() > COPY_LIMIT => return Ok(()),
                None => {}
            }
        }
    };
    let ready = tokio::select! {
        outcome = upgrade.run() => {
            let outcome = outcome?;
            (outcome.finished == Phase::ReadyForCutover).then(Instant::now)
        }
        watched = watch => {
            watched?;
            None
        }
    };
    let ended = Instant::now();
    if let Some(target) = &target {
        samples.push(Sample::take(&source, target).await?);
    }
    drop((upgrade, source, target));
    let (_, report) = stop_load(load).await;
    lab.stop().await?;

    let catch_up_from = catch_up_from
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or(started);
    let (source_bytes_per_s, applied_bytes_per_s) = bytes_per_s(&samples);
    Ok(CatchUpPoint {
        rate_asked: work.rate,
        clients: work.clients,
        source_tps: report.tps,
        source_bytes_per_s,
        applied_bytes_per_s,
        first_lag_bytes: samples.first().map_or(0, Sample::lag),
        peak_lag_bytes: samples.iter().map(Sample::lag).max().unwrap_or(0),
        last_lag_bytes: samples.last().map_or(0, Sample::lag),
        converged: ready.is_some(),
        time_to_ready_ms: ready.map(|at| at.duration_since(started).as_secs_f64() * 1e3),
        catch_up_ms: ready
            .unwrap_or(ended)
            .saturating_duration_since(catch_up_from)
            .as_secs_f64()
            * 1e3,
        error: None,
    })
}
