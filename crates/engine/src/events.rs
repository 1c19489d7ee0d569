//! What the engine tells its caller while it works: phases, progress, warnings.

use serde::Serialize;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Preflight,
    Schema,
    Replicate,
    CatchUp,
    ReadyForCutover,
    Cutover,
    /// The target serves; the back stream keeps the source current (a rollback is possible).
    WindowOpen,
    Done,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Preflight => "preflight",
            Phase::Schema => "schema",
            Phase::Replicate => "replicate",
            Phase::CatchUp => "catch_up",
            Phase::ReadyForCutover => "ready_for_cutover",
            Phase::Cutover => "cutover",
            Phase::WindowOpen => "window_open",
            Phase::Done => "done",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Phase {
        phase: Phase,
    },
    Step {
        database: String,
        step: String,
    },
    Copy {
        database: String,
        tables_ready: i64,
        tables_total: i64,
        tables_copying: i64,
        bytes_copied: i64,
        bytes_total: i64,
    },
    /// After the initial copy: the indexes and constraints the target does not have yet,
    /// about to be built (a rerun lists only what an interrupted one left).
    BuildingStructures {
        database: String,
        structures: Vec<String>,
        jobs: usize,
    },
    /// An index or constraint being built on the target after the initial copy.
    IndexBuild {
        database: String,
        index: String,
        /// `pg_stat_progress_create_index`'s phase.
        phase: String,
        done: i64,
        total: i64,
    },
    CatchUp {
        lag_bytes: i64,
        /// Source WAL written per second, and confirmed by the target per second: if the first
        /// stays above the second, catch-up will not converge.
        source_bytes_per_s: f64,
        applied_bytes_per_s: f64,
    },
    ApplyFailing {
        database: String,
        cause: String,
    },
    /// A database's initial copy has not moved for `stalled_for_s` seconds; `cause` is what the
    /// target shows holding it up.
    CopyStalled {
        database: String,
        stalled_for_s: u64,
        cause: String,
    },
    CutoverStep {
        step: String,
        ms: f64,
    },
    CutoverAborted {
        reason: String,
        /// The client sessions whose transactions held the PAUSE up (see `reason`).
        blocking: Vec<crate::pgbouncer::BlockingSession>,
    },
    Warning {
        message: String,
    },
}

/// Where events go. The CLI draws progress from them; tests may ignore them.
pub type EventSink = Arc<dyn Fn(Event) + Send + Sync>;

pub fn discard() -> EventSink {
    Arc::new(|_| {})
}
