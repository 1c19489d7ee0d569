//! Progress on a terminal (a bar), plain log lines elsewhere, and the final reports.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use pgshift_engine::cleanup::Status;
use pgshift_engine::cutover::CutoverReport;
use pgshift_engine::decide::Direction;
use pgshift_engine::{Event, EventSink, Outcome};

use crate::output;

/// Draws engine events. JSON mode keeps stdout clean: progress goes to stderr only.
#[derive(Clone)]
pub struct Progress {
    inner: Arc<Mutex<State>>,
}

struct State {
    bar: Option<ProgressBar>,
    quiet: bool,
    last_line: Option<Instant>,
}

/// Plain-text progress lines are throttled to one per this interval.
const LINE_INTERVAL: Duration = Duration::from_secs(5);

impl Progress {
    pub fn new(quiet: bool) -> Progress {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix:>10} [{bar:30}] {pos}/{len} {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            inner: Arc::new(Mutex::new(State {
                bar,
                quiet,
                last_line: None,
            })),
        }
    }

    pub fn sink(&self) -> EventSink {
        let me = self.clone();
        Arc::new(move |event| me.show(event))
    }

    pub fn finish(&self) {
        if let Some(bar) = self.inner.lock().expect("progress lock").bar.take() {
            bar.finish_and_clear();
        }
    }

    fn show(&self, event: Event) {
        let mut state = self.inner.lock().expect("progress lock");
        if state.quiet {
            if let Event::Warning { message }
            | Event::ApplyFailing { cause: message, .. }
            | Event::CopyStalled { cause: message, .. } = &event
            {
                output::err(&format!("warning: {message}\n"));
            }
            return;
        }
        let line = match &event {
            Event::Phase { phase } => Some(format!("phase: {}", phase.name())),
            Event::Step { database, step } => Some(format!("{database}: {step}")),
            Event::Copy {
                database,
                tables_ready,
                tables_total,
                tables_copying,
                bytes_copied,
                bytes_total,
            } => {
                if let Some(bar) = &state.bar {
                    bar.set_prefix("copy");
                    bar.set_length(*tables_total as u64);
                    bar.set_position(*tables_ready as u64);
                    bar.set_message(format!(
                        "{database}: {tables_copying} copying, {} of {}",
                        megabytes(*bytes_copied),
                        megabytes(*bytes_total)
                    ));
                    return;
                }
                throttled(&mut state, format!(
                    "{database}: initial copy {tables_ready}/{tables_total} tables ready, {tables_copying} copying, {} copied of about {}",
                    megabytes(*bytes_copied),
                    megabytes(*bytes_total)
                ))
            }
            Event::CatchUp {
                lag_bytes,
                source_bytes_per_s,
                applied_bytes_per_s,
            } => {
                let text = format!(
                    "lag {} (source writes {}/s, target applies {}/s)",
                    megabytes(*lag_bytes),
                    megabytes(*source_bytes_per_s as i64),
                    megabytes(*applied_bytes_per_s as i64)
                );
                if let Some(bar) = &state.bar {
                    bar.set_prefix("catch-up");
                    bar.set_message(text);
                    return;
                }
                throttled(&mut state, text)
            }
            Event::ApplyFailing { database, cause } => {
                Some(format!("{database}: replication is failing: {cause}"))
            }
            Event::CopyStalled {
                database,
                stalled_for_s,
                cause,
            } => Some(format!(
                "{database}: the initial copy has not moved for {stalled_for_s} s: {cause}"
            )),
            Event::BuildingStructures {
                database,
                structures,
                jobs,
            } => Some(format!(
                "{database}: building {} indexes and constraints, {jobs} at a time: {}",
                structures.len(),
                structures.join(", ")
            )),
            Event::IndexBuild {
                database,
                index,
                phase,
                done,
                total,
            } => Some(match total {
                0 => format!("{database}: building {index} ({phase})"),
                _ => format!(
                    "{database}: building {index} ({phase} {:.0}%)",
                    *done as f64 * 100.0 / *total as f64
                ),
            }),
            Event::CutoverStep { step, ms } => Some(format!("cutover: {step} {ms:.1} ms")),
            Event::CutoverAborted { reason, .. } => Some(format!("cutover aborted: {reason}")),
            Event::Warning { message } => Some(format!("warning: {message}")),
        };
        if let Some(line) = line {
            match &state.bar {
                Some(bar) => bar.println(line),
                None => output::err(&format!("{line}\n")),
            }
        }
    }
}

fn throttled(state: &mut State, line: String) -> Option<String> {
    let due = state.last_line.is_none_or(|t| t.elapsed() >= LINE_INTERVAL);
    if due {
        state.last_line = Some(Instant::now());
        Some(line)
    } else {
        None
    }
}

pub fn megabytes(bytes: i64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

pub fn render_outcome(outcome: &Outcome) -> String {
    let mut out = format!("finished: {}\n", outcome.finished.name());
    for phase in &outcome.phases {
        out.push_str(&format!("  {:<18} {:>8} ms\n", phase.name, phase.ms));
    }
    if let Some(cutover) = &outcome.cutover {
        out.push_str(&format!(
            "cutover ({}): writes paused {:.1} ms, {} sequences copied\n",
            cutover.mode, cutover.pause_ms, cutover.sequences_synced
        ));
    }
    match outcome.finished {
        pgshift_engine::Phase::ReadyForCutover => {
            out.push_str("ready for cutover: run `pgshift cutover` with the same arguments\n")
        }
        pgshift_engine::Phase::WindowOpen => out.push_str(
            "rollback window open: the source follows the target; `pgshift rollback` goes back, `pgshift cleanup` ends the window\n",
        ),
        _ => {}
    }
    out
}

/// What a cutover or a rollback did, in a sentence.
pub fn render_switch(report: &CutoverReport) -> String {
    let (what, now) = match report.direction {
        Direction::Forward => ("cutover", "clients now use the target"),
        Direction::Back => (
            "rollback",
            "clients use the source again; the target follows it (`pgshift cutover` tries again, `pgshift abort` gives up)",
        ),
    };
    format!(
        "{what} done: writes paused {:.1} ms, {} sequences copied; {now}",
        report.pause_ms, report.sequences_synced
    )
}

pub fn render_status(status: &Status) -> String {
    let mut out = format!("phase: {}\n", status.phase.name());
    if let Some(holder) = &status.held_by {
        out.push_str(&format!("in progress: {holder}\n"));
    }
    if let Some(fence) = &status.fence {
        out.push_str(&format!(
            "fence up since {}, raised by {}\n",
            fence.since, fence.raised_by
        ));
        match &fence.guard {
            Some(guard) => out.push_str(&format!(
                "  its guard releases the clients if that process dies: {guard}\n"
            )),
            None if status.held_by.is_none() => out.push_str(
                "  nobody holds it any more (the process and its guard are gone): run `pgshift run` or `pgshift cutover` to release the clients or finish the switch\n",
            ),
            None => {}
        }
        for session in &fence.blocking {
            out.push_str(&format!("  held up by {session}\n"));
        }
    }
    for db in &status.databases {
        let d = &db.database;
        match &d.switched_at {
            Some(at) => out.push_str(&format!(
                "database {}: {} (switched to the target at {at}{})\n",
                d.name,
                db.phase.name(),
                if d.cleaned_up {
                    "; cleaned up"
                } else {
                    "; `pgshift cleanup` removes the replication objects"
                }
            )),
            None => out.push_str(&format!(
                "database {}: {} (next: {})\n",
                d.name,
                db.phase.name(),
                db.next
            )),
        }
        if let Some(sub) = &d.forward.subscription {
            out.push_str(&format!(
                "  forward (source -> target): tables ready {}/{}, copying {}, replication errors {}\n",
                sub.tables_ready, sub.tables_total, sub.tables_copying, sub.errors
            ));
        }
        if let (Some(slot), Some(_)) = (&d.forward.slot, &d.forward.subscription) {
            out.push_str(&format!("  forward lag {}\n", megabytes(slot.lag_bytes)));
        }
        if let Some(sub) = &d.back.subscription {
            out.push_str(&format!(
                "  rollback window open{}: back (target -> source) replication errors {}{}; `pgshift rollback` goes back, `pgshift cleanup` ends the window\n",
                d.switched_at.as_deref().map(|at| format!(" since {at}")).unwrap_or_default(),
                sub.errors,
                d.back
                    .slot
                    .as_ref()
                    .map(|s| format!(", back lag {}", megabytes(s.lag_bytes)))
                    .unwrap_or_default(),
            ));
        }
        if let Some(problem) = &db.apply_problem {
            out.push_str(&format!("  problem: {problem}\n"));
        }
    }
    out
}
