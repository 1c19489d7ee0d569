//! The cutover (DESIGN.md §3.6), the critical section, in either direction: fence writes on
//! the server clients leave, prove with a marker row that the other has every commit, copy
//! every sequence, switch traffic, release clients — under a budget. Before the switch,
//! anything slow aborts the attempt and releases clients where they were; `recover` finishes
//! or undoes an attempt that a crash interrupted. A rollback is this with `from` and `to`
//! swapped (see `inputs::Switch`).

mod fence;
mod inputs;
mod proof;
mod records;
mod recover;

use futures_util::future::{try_join, try_join_all};
use serde::Serialize;

use crate::decide::Direction;
use crate::error::{Error, Result};
use crate::events::Event;
use crate::guard::GuardHandle;
use crate::lock;
use crate::names::step;
use crate::upgrade::{forget_step, record_step_value, Upgrade};
pub(crate) use fence::holding_up_now;
use fence::Fence;
pub(crate) use inputs::{Clock, Server, Switch};
use proof::{copy_sequences, precopy_sequences, wait_for_marker, SequenceValues};
pub(crate) use recover::recover;

#[derive(Debug, Clone, Serialize)]
pub struct CutoverReport {
    pub direction: Direction,
    pub mode: &'static str,
    /// From the start of the fence to the release of clients, as pgshift measured it.
    pub pause_ms: f64,
    pub sequences_synced: usize,
    /// Client sessions ended on the server clients left (direct mode).
    pub sessions_ended: i64,
    pub steps: Vec<StepTiming>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepTiming {
    pub step: &'static str,
    pub ms: f64,
}

/// The state row that says a fence in `direction` is up.
pub(crate) fn fence_step(direction: Direction) -> &'static str {
    match direction {
        Direction::Forward => step::FENCED,
        Direction::Back => step::FENCED_BACK,
    }
}

pub(crate) async fn cutover(up: &mut Upgrade, direction: Direction) -> Result<CutoverReport> {
    for name in up.databases.clone() {
        up.db(&name).await?;
    }
    up.prepare_return_stream(direction).await?;
    // The guard releases the clients if this process dies inside the fence; it is armed
    // before the fence is recorded, and told when clients are released.
    let mut guard = match &up.plan.fence_guard {
        Some(program) => GuardHandle::start(program, up).await?,
        None => None,
    };
    if let Some(guard) = &guard {
        up.own_source_pids.extend_from_slice(guard.source_pids());
        up.own_target_pids.extend_from_slice(guard.target_pids());
    }
    let holder = match &guard {
        Some(_) => format!(
            "{}, with a fence guard",
            lock::holder_label(&up.plan.command)
        ),
        None => lock::holder_label(&up.plan.command),
    };
    let sw = up.switch_inputs(direction);
    let fence = Fence::prepare(&sw).await?;
    // `status` names every PgBouncer the fence holds.
    let poolers = fence.poolers();
    let holder = match poolers.is_empty() {
        true => holder,
        false => format!("{holder}, pausing {}", poolers.join(", ")),
    };
    let precopied =
        try_join_all((0..sw.databases.len()).map(|i| precopy_sequences(&sw.from, &sw.to, i)))
            .await?;
    if let Some(guard) = &mut guard {
        guard.arm().await?;
    }
    for target in &sw.records {
        record_step_value(target, fence_step(direction), &holder).await?;
    }
    let mut clock = Clock::new(sw.budget, Some(sw.events));
    let (sequences_synced, sessions_ended) =
        match fenced_part(&sw, &fence, &precopied, &mut clock).await {
            Ok(counts) => counts,
            Err(error) => {
                fence.lift(&sw).await?;
                forget_fence(&sw).await?;
                if let Some(guard) = guard {
                    guard.release().await?;
                }
                let blocking = match &error {
                    Error::CutoverAborted { blocking, .. } => blocking.clone(),
                    _ => Vec::new(),
                };
                sw.emit(Event::CutoverAborted {
                    reason: error.to_string(),
                    blocking,
                });
                return Err(error);
            }
        };
    // The point of no return: `to` takes the writes from here on.
    records::record_and_open(&sw).await?;
    fence.release_to(&sw).await?;
    clock.lap("switch");
    let pause_ms = clock.elapsed_ms();
    forget_fence(&sw).await?;
    if let Some(guard) = guard {
        guard.release().await?;
    }
    records::mark_created_databases(&sw).await?;
    Ok(CutoverReport {
        direction,
        mode: fence.mode(),
        pause_ms,
        sequences_synced,
        sessions_ended,
        steps: clock.steps,
    })
}

/// Fence, marker, sequences: everything between the start of the pause and the switch.
async fn fenced_part(
    sw: &Switch<'_>,
    fence: &Fence,
    precopied: &[SequenceValues],
    clock: &mut Clock<'_>,
) -> Result<(usize, i64)> {
    let sessions_ended = fence.raise(sw, clock).await?;
    clock.lap("fence");
    // Writes have stopped: the sequences can be read now, while the marker travels.
    let markers = try_join_all(
        sw.databases
            .iter()
            .enumerate()
            .map(|(i, name)| wait_for_marker(&sw.from, &sw.to, i, name, clock)),
    );
    let copies = try_join_all(
        precopied
            .iter()
            .enumerate()
            .map(|(i, copied)| copy_sequences(&sw.from, &sw.to, i, copied)),
    );
    let counts = match tokio::time::timeout(clock.remaining(), try_join(markers, copies)).await {
        Ok(result) => result?.1,
        Err(_) => {
            for session in &sw.to.databases {
                sw.to.endpoint.cancel(session.cancel_token()).await;
            }
            return Err(clock.over("waiting for the marker row and copying sequences"));
        }
    };
    clock.lap("marker_and_sequences");
    if clock.remaining().is_zero() {
        return Err(clock.over("finishing before the switch"));
    }
    Ok((counts.iter().sum(), sessions_ended))
}

async fn forget_fence(sw: &Switch<'_>) -> Result<()> {
    for target in &sw.records {
        forget_step(target, fence_step(sw.direction)).await?;
    }
    Ok(())
}

/// Before any fence: proves that the stream a switch in `direction` ends works now, by a
/// marker row that arrives within `within`. False when it did not (stalled, failing, behind).
pub(crate) async fn apply_is_flowing(
    up: &Upgrade,
    direction: Direction,
    within: std::time::Duration,
) -> Result<bool> {
    let sw = up.switch_inputs(direction);
    let clock = Clock::new(within, None);
    let probes = sw
        .databases
        .iter()
        .enumerate()
        .map(|(i, name)| wait_for_marker(&sw.from, &sw.to, i, name, &clock));
    match try_join_all(probes).await {
        Ok(_) => Ok(true),
        Err(Error::CutoverAborted { .. }) => Ok(false),
        Err(error) => Err(error),
    }
}
