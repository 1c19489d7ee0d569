//! The figures of one method, and how they are derived from the ledger's samples.

use std::time::Instant;

use pgshift_lab::ledger::{LedgerReport, Outcome, Verification};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct MethodFigures {
    pub name: &'static str,
    /// The freshly loaded source database, in MB.
    pub size_mb: f64,
    /// The longest interval in which no client committed.
    pub write_unavailable_ms: f64,
    /// Longest transaction − p99 of the steady state; for methods that stop the application,
    /// the whole stop (a client's write waits that long).
    pub pause_ms: f64,
    /// Transactions the server refused (in-doubt ones are counted apart).
    pub failed: u64,
    /// Connection ended mid-statement: the client cannot know whether it committed.
    pub in_doubt: u64,
    /// Acknowledged commits missing on the new server.
    pub lost: u64,
    /// The ledger's balances still add up on the new server.
    pub invariant_holds: bool,
    pub committed: u64,
    /// Commits per second over the whole load.
    pub tps: f64,
    /// From the start of the upgrade to its end (the first write on the new server possible).
    pub total_ms: f64,
    /// From the start of the upgrade until the new server holds everything: for the methods
    /// that stop the application, the copy done; for the online ones, caught up and ready for
    /// the cutover (pgshift: `run --cutover manual` reporting ready).
    pub time_to_ready_ms: f64,
    /// From the start of the upgrade to the first commit acknowledged by the new server.
    pub first_write_ms: Option<f64>,
    /// pgshift only: the longest committed transaction in flight during the fence, whatever
    /// the machine did in the rest of the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub longest_in_cutover_ms: Option<f64>,
    pub copy_mb_per_s: Option<f64>,
    /// Every attempt of the load, timed from the start of the upgrade, for the plots.
    #[serde(skip)]
    pub attempts: Vec<Attempt>,
    /// Why the method was not measured, if it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_run: Option<String>,
}

impl MethodFigures {
    /// A method that could not be measured, with the reason.
    pub fn not_run(name: &'static str, reason: String) -> MethodFigures {
        MethodFigures {
            name,
            size_mb: f64::NAN,
            write_unavailable_ms: f64::NAN,
            pause_ms: f64::NAN,
            failed: 0,
            in_doubt: 0,
            lost: 0,
            invariant_holds: false,
            committed: 0,
            tps: f64::NAN,
            total_ms: f64::NAN,
            time_to_ready_ms: f64::NAN,
            first_write_ms: None,
            longest_in_cutover_ms: None,
            copy_mb_per_s: None,
            attempts: Vec::new(),
            not_run: Some(reason),
        }
    }

    /// Figures of a method during which one ledger run kept going throughout.
    pub fn one_run(
        name: &'static str,
        size_mb: f64,
        run: &StoppedRun,
        verified: &Verification,
        timing: Timing,
        copy_mb_per_s: Option<f64>,
    ) -> MethodFigures {
        let report = run.report;
        MethodFigures {
            name,
            size_mb,
            write_unavailable_ms: report.longest_commit_gap_ms,
            pause_ms: report.write_pause_ms,
            failed: report.failed,
            in_doubt: report.in_doubt,
            lost: verified.lost,
            invariant_holds: verified.invariant_holds && verified.balances_match_entries,
            committed: report.committed,
            tps: report.tps,
            total_ms: timing.ms_since_start(timing.ended),
            time_to_ready_ms: timing.ms_since_start(timing.ready),
            first_write_ms: run
                .first_commit_after(timing.new_server_from)
                .map(|at| timing.ms_since_start(at)),
            longest_in_cutover_ms: None,
            copy_mb_per_s,
            attempts: run.attempts(timing.started).collect(),
            not_run: None,
        }
    }
}

/// When an upgrade started, when the new server was ready (see `time_to_ready_ms`), when it
/// ended, and from when commits can only come from the new server.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub started: Instant,
    pub ready: Instant,
    pub ended: Instant,
    pub new_server_from: Instant,
}

impl Timing {
    pub fn ms_since_start(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.started).as_secs_f64() * 1e3
    }
}

/// A ledger run that stopped, with when it started.
pub struct StoppedRun<'a> {
    pub started: Instant,
    pub report: &'a LedgerReport,
}

impl StoppedRun<'_> {
    fn commit_ends(&self) -> impl Iterator<Item = Instant> + '_ {
        self.report
            .samples
            .iter()
            .filter(|s| s.outcome == Outcome::Committed)
            .map(|s| {
                self.started
                    + std::time::Duration::from_micros(s.start_us + u64::from(s.latency_us))
            })
    }
}

/// One transaction attempt of the load.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    /// When it started, in s since the upgrade started (negative before).
    pub at_s: f64,
    pub latency_ms: f64,
    pub outcome: Outcome,
}

impl StoppedRun<'_> {
    /// The run's attempts, timed from `origin`.
    pub fn attempts(&self, origin: Instant) -> impl Iterator<Item = Attempt> + '_ {
        let offset = if self.started >= origin {
            self.started.duration_since(origin).as_secs_f64()
        } else {
            -origin.duration_since(self.started).as_secs_f64()
        };
        self.report.samples.iter().map(move |s| Attempt {
            at_s: offset + s.start_us as f64 / 1e6,
            latency_ms: f64::from(s.latency_us) / 1e3,
            outcome: s.outcome,
        })
    }

    /// When the first commit acknowledged at or after `at` was acknowledged.
    pub fn first_commit_after(&self, at: Instant) -> Option<Instant> {
        self.commit_ends().filter(|end| *end >= at).min()
    }
}

/// The interval without any commit between the last commit of `before` (the application
/// stopped) and the first of `after` (the application started again on the new server), or
/// the longest gap inside either run if longer.
pub fn gap_across(before: &StoppedRun, after: &StoppedRun) -> f64 {
    let across = match (before.commit_ends().max(), after.commit_ends().min()) {
        (Some(last), Some(first)) => first.saturating_duration_since(last).as_secs_f64() * 1e3,
        _ => f64::NAN,
    };
    across
        .max(before.report.longest_commit_gap_ms)
        .max(after.report.longest_commit_gap_ms)
}

/// The process's peak resident set (VmHWM), in MB: pgshift's engine runs inside this process,
/// so this bounds pgshift's own peak memory from above (it also holds the ledger clients).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pgshift_lab::ledger::Sample;

    use super::*;

    /// A report of commits (start µs, latency µs) and one failure at 0.
    fn report(commits: &[(u64, u32)], longest_gap_ms: f64) -> LedgerReport {
        let mut samples: Vec<Sample> = commits
            .iter()
            .map(|&(start_us, latency_us)| Sample {
                start_us,
                latency_us,
                outcome: Outcome::Committed,
            })
            .collect();
        samples.push(Sample {
            start_us: 0,
            latency_us: 10,
            outcome: Outcome::Failed,
        });
        LedgerReport {
            run_id: "test".into(),
            accounts: 1,
            clients: 1,
            committed: commits.len() as u64,
            failed: 1,
            in_doubt: 0,
            connect_failures: 0,
            reconnects: 0,
            duration: Duration::from_secs(1),
            tps: 0.0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            max_ms: 0.0,
            write_pause_ms: 0.0,
            longest_commit_gap_ms: longest_gap_ms,
            errors: Vec::new(),
            acknowledged: Vec::new(),
            in_doubt_txids: Vec::new(),
            samples,
        }
    }

    #[test]
    fn gap_runs_from_the_last_commit_before_to_the_first_after() {
        let origin = Instant::now();
        let before = report(&[(1_000, 500), (5_000, 1_000)], 3.0);
        let after = report(&[(9_000, 2_000), (2_000, 1_000)], 1.0);
        let gap = gap_across(
            &StoppedRun {
                started: origin,
                report: &before,
            },
            &StoppedRun {
                started: origin + Duration::from_millis(100),
                report: &after,
            },
        );
        // Last commit before: 6 ms; first after: 100 + 3 ms.
        assert!((gap - 97.0).abs() < 1e-6, "{gap}");
    }

    #[test]
    fn a_longer_gap_inside_a_run_wins() {
        let origin = Instant::now();
        let before = report(&[(1_000, 500)], 500.0);
        let after = report(&[(0, 1_000)], 0.0);
        let gap = gap_across(
            &StoppedRun {
                started: origin,
                report: &before,
            },
            &StoppedRun {
                started: origin + Duration::from_millis(10),
                report: &after,
            },
        );
        assert_eq!(gap, 500.0);
    }

    #[test]
    fn attempts_are_timed_from_the_upgrade_and_first_commit_skips_failures() {
        let load = Instant::now();
        let upgrade = load + Duration::from_secs(2);
        let r = report(&[(1_000_000, 1_000), (3_000_000, 1_000)], 0.0);
        let run = StoppedRun {
            started: load,
            report: &r,
        };
        let at: Vec<f64> = run.attempts(upgrade).map(|a| a.at_s).collect();
        assert_eq!(at, vec![-1.0, 1.0, -2.0]);
        let first = run.first_commit_after(upgrade).map(|t| t - load);
        assert_eq!(first, Some(Duration::from_micros(3_001_000)));
    }
}
