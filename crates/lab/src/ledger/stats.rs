//! Pure helpers behind the ledger report: percentiles, commit gaps, error tallies, merging
//! the clients' records. No database needed to test them.

use std::collections::HashMap;
use std::time::Duration;

use super::{LedgerReport, Outcome, Sample};

/// Distinct error messages kept per client and in the report; the rest are counted together.
pub(crate) const MAX_DISTINCT_ERRORS: usize = 16;
/// The bucket for messages beyond [`MAX_DISTINCT_ERRORS`].
pub(crate) const OTHER_ERRORS: &str = "(other error messages)";

/// Error messages with counts, in order of first appearance, at most
/// [`MAX_DISTINCT_ERRORS`] distinct ones.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ErrorTally {
    entries: Vec<(String, u64)>,
    index: HashMap<String, usize>,
}

impl ErrorTally {
    pub(crate) fn add(&mut self, message: &str, count: u64) {
        if let Some(&i) = self.index.get(message) {
            self.entries[i].1 += count;
            return;
        }
        let key = if self.entries.len() < MAX_DISTINCT_ERRORS || message == OTHER_ERRORS {
            message
        } else {
            OTHER_ERRORS
        };
        match self.index.get(key) {
            Some(&i) => self.entries[i].1 += count,
            None => {
                self.index.insert(key.to_string(), self.entries.len());
                self.entries.push((key.to_string(), count));
            }
        }
    }

    pub(crate) fn merge(&mut self, other: ErrorTally) {
        for (message, count) in other.entries {
            self.add(&message, count);
        }
    }

    pub(crate) fn into_vec(self) -> Vec<(String, u64)> {
        self.entries
    }
}

/// What one client recorded during a run.
#[derive(Debug, Default)]
pub(crate) struct ClientRecord {
    pub(crate) samples: Vec<Sample>,
    pub(crate) acknowledged: Vec<String>,
    pub(crate) in_doubt: Vec<String>,
    pub(crate) errors: ErrorTally,
    pub(crate) connect_failures: u64,
    /// Connections replaced for their age.
    pub(crate) reconnects: u64,
    /// Accounts found in the database (0 if the client never connected).
    pub(crate) accounts: u32,
}

/// The value at quantile `q` (0..=1) of ascending `sorted` values, nearest-rank; 0 if empty.
pub(crate) fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.saturating_sub(1).min(sorted.len() - 1)]
}

/// The longest interval without a commit, from the first commit to `end_us` (the stop
/// request); ascending `commits_us` are commit completion times. The whole run if none.
/// The start of the run (connecting) is not counted as a gap.
pub(crate) fn longest_commit_gap_us(commits_us: &[u64], end_us: u64) -> u64 {
    let Some(&last) = commits_us.last() else {
        return end_us;
    };
    let interior = commits_us
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .max()
        .unwrap_or(0);
    interior.max(end_us.saturating_sub(last))
}

/// Everything a report needs besides the clients' records.
pub(crate) struct RunInfo {
    pub(crate) run_id: String,
    pub(crate) clients: usize,
    /// From the run's start to the stop request.
    pub(crate) duration: Duration,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Merges the clients' records into the run's report.
pub(crate) fn build_report(info: RunInfo, records: Vec<ClientRecord>) -> LedgerReport {
    let mut samples = Vec::new();
    let mut acknowledged = Vec::new();
    let mut in_doubt_txids = Vec::new();
    let mut errors = ErrorTally::default();
    let mut connect_failures = 0;
    let mut reconnects = 0;
    let mut accounts = 0;
    for record in records {
        accounts = accounts.max(record.accounts);
        samples.extend(record.samples);
        acknowledged.extend(record.acknowledged);
        in_doubt_txids.extend(record.in_doubt);
        errors.merge(record.errors);
        connect_failures += record.connect_failures;
        reconnects += record.reconnects;
    }
    samples.sort_by_key(|s| s.start_us);
    acknowledged.sort_unstable();
    in_doubt_txids.sort_unstable();

    let count = |outcome: Outcome| samples.iter().filter(|s| s.outcome == outcome).count() as u64;
    let (committed, failed, in_doubt) = (
        count(Outcome::Committed),
        count(Outcome::Failed),
        count(Outcome::InDoubt),
    );
    let mut latencies: Vec<u64> = samples
        .iter()
        .filter(|s| s.outcome == Outcome::Committed)
        .map(|s| u64::from(s.latency_us))
        .collect();
    latencies.sort_unstable();
    let mut commits: Vec<u64> = samples
        .iter()
        .filter(|s| s.outcome == Outcome::Committed)
        .map(|s| s.start_us + u64::from(s.latency_us))
        .collect();
    commits.sort_unstable();

    let end_us = u64::try_from(info.duration.as_micros()).unwrap_or(u64::MAX);
    let end_us = end_us.max(commits.last().copied().unwrap_or(0));
    let p50 = percentile(&latencies, 0.50);
    let p99 = percentile(&latencies, 0.99);
    let max = latencies.last().copied().unwrap_or(0);
    let seconds = info.duration.as_secs_f64();

    LedgerReport {
        run_id: info.run_id,
        accounts,
        clients: info.clients,
        committed,
        failed,
        in_doubt,
        connect_failures,
        reconnects,
        duration: info.duration,
        tps: if seconds > 0.0 {
            committed as f64 / seconds
        } else {
            0.0
        },
        p50_ms: ms(p50),
        p99_ms: ms(p99),
        max_ms: ms(max),
        write_pause_ms: ms(max.saturating_sub(p99)),
        longest_commit_gap_ms: ms(longest_commit_gap_us(&commits, end_us)),
        errors: errors.into_vec(),
        acknowledged,
        in_doubt_txids,
        samples,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(start_us: u64, latency_us: u32, outcome: Outcome) -> Sample {
        Sample {
            start_us,
            latency_us,
            outcome,
        }
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.5), 50);
        assert_eq!(percentile(&values, 0.99), 99);
        assert_eq!(percentile(&values, 1.0), 100);
        assert_eq!(percentile(&values, 0.0), 1);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn gap_covers_interior_and_tail_but_not_the_start() {
        assert_eq!(longest_commit_gap_us(&[100, 200, 900, 1000], 1100), 700);
        assert_eq!(longest_commit_gap_us(&[100, 200], 5000), 4800);
        assert_eq!(longest_commit_gap_us(&[4000], 4000), 0);
        assert_eq!(longest_commit_gap_us(&[], 3000), 3000);
    }

    #[test]
    fn tally_keeps_first_distinct_messages_and_buckets_the_rest() {
        let mut tally = ErrorTally::default();
        for i in 0..MAX_DISTINCT_ERRORS + 3 {
            tally.add(&format!("e{i}"), 1);
        }
        tally.add("e0", 2);
        let entries = tally.into_vec();
        assert_eq!(entries.len(), MAX_DISTINCT_ERRORS + 1);
        assert_eq!(entries[0], ("e0".to_string(), 3));
        assert_eq!(entries.last().unwrap(), &(OTHER_ERRORS.to_string(), 3));
    }

    #[test]
    fn tallies_merge_by_message() {
        let mut a = ErrorTally::default();
        a.add("x", 1);
        let mut b = ErrorTally::default();
        b.add("y", 2);
        b.add("x", 4);
        a.merge(b);
        assert_eq!(a.into_vec(), vec![("x".into(), 5), ("y".into(), 2)]);
    }

    #[test]
    fn report_merges_clients() {
        let mut errors = ErrorTally::default();
        errors.add("failed: 23505: duplicate key", 1);
        let first = ClientRecord {
            samples: vec![
                sample(0, 1_000, Outcome::Committed),
                sample(1_000, 2_000, Outcome::Failed),
                sample(3_000, 50_000, Outcome::Committed),
            ],
            acknowledged: vec!["c0-3-r".into(), "c0-1-r".into()],
            in_doubt: vec![],
            errors,
            connect_failures: 2,
            reconnects: 3,
            accounts: 10,
        };
        let second = ClientRecord {
            samples: vec![
                sample(500, 1_000, Outcome::Committed),
                sample(2_000, 4_000, Outcome::InDoubt),
            ],
            acknowledged: vec!["c1-1-r".into()],
            in_doubt: vec!["c1-2-r".into()],
            ..ClientRecord::default()
        };
        let report = build_report(
            RunInfo {
                run_id: "r".into(),
                clients: 2,
                duration: Duration::from_millis(100),
            },
            vec![first, second],
        );
        assert_eq!(
            (report.committed, report.failed, report.in_doubt),
            (3, 1, 1)
        );
        assert_eq!(report.connect_failures, 2);
        assert_eq!(report.reconnects, 3);
        assert_eq!(report.accounts, 10);
        assert_eq!(report.acknowledged, vec!["c0-1-r", "c0-3-r", "c1-1-r"]);
        assert_eq!(report.in_doubt_txids, vec!["c1-2-r"]);
        assert_eq!(report.samples.len(), 5);
        assert!(report
            .samples
            .windows(2)
            .all(|w| w[0].start_us <= w[1].start_us));
        assert_eq!(report.p50_ms, 1.0);
        assert_eq!(report.p99_ms, 50.0);
        assert_eq!(report.max_ms, 50.0);
        assert_eq!(report.write_pause_ms, 0.0);
        // Commits complete at 1.0, 1.5 and 53 ms; the run ends at 100 ms.
        assert_eq!(report.longest_commit_gap_ms, 51.5);
        assert!((report.tps - 30.0).abs() < 1e-9);
        assert_eq!(
            report.errors,
            vec![("failed: 23505: duplicate key".into(), 1)]
        );
    }
}
