//! The pure part of `verify`: key ranges, what to do with a chunk's result, and the report.

use serde::Serialize;

/// One end of a key range: the key columns' values as text (as the source prints them under
/// the pinned settings); `None` is unbounded.
pub type Bound = Option<Vec<String>>;

/// A table to verify, as the source describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Table {
    pub schema: String,
    pub name: String,
    /// Every column, in order: the checksum covers them all.
    pub columns: Vec<String>,
    /// The primary key, else the replica identity index; empty: the table is verified whole
    /// (without a unique key, chunks cannot be matched between the servers: physical places
    /// such as ctid differ).
    pub key: Vec<String>,
}

/// A key range `[lower, upper)` of one table, and how often it was checked in a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub table: usize,
    /// Which of the table's first-pass chunks it lies in (0-based).
    pub chunk: usize,
    pub lower: Bound,
    pub upper: Bound,
    /// Checks of this very range so far (a split range starts again at 0).
    pub attempts: u32,
}

/// What the target answered for one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub source_rows: i64,
    pub target_rows: i64,
    pub matches: bool,
    /// The target could not sum the chunk (the trigger's error).
    pub problem: Option<String>,
}

/// What to do with a range after a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Matched,
    /// Check the same range again: a transaction that committed on the source between the
    /// check's snapshot and its commit makes an honest range differ once.
    Retry,
    /// Check the two halves: a smaller range is read faster (less room for such a transaction)
    /// and, if it really differs, names the difference more closely.
    Split,
    /// Differs every time: reported.
    Persistent,
}

/// Checks of a range before it is split.
pub const CHECKS_BEFORE_SPLIT: u32 = 2;
/// Checks of a range that cannot be split (one row, or a table without a key) before its
/// difference is reported.
pub const CHECKS_OF_A_LEAF: u32 = 5;

/// The verdict on `range` after its latest check (`range.attempts` counts it).
pub fn judge(range: &Range, checked: &Checked, has_key: bool) -> Verdict {
    if checked.matches {
        return Verdict::Matched;
    }
    // Halves are found among the source's rows: a range needs two of them.
    let splittable = has_key && checked.source_rows > 1;
    match (splittable, range.attempts) {
        (true, n) if n >= CHECKS_BEFORE_SPLIT => Verdict::Split,
        (false, n) if n >= CHECKS_OF_A_LEAF => Verdict::Persistent,
        _ => Verdict::Retry,
    }
}

/// A range that differed at every check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    pub database: String,
    pub table: String,
    pub key: Vec<String>,
    /// The first-pass chunk it lies in (0-based).
    pub chunk: usize,
    pub lower: Bound,
    pub upper: Bound,
    pub source_rows: i64,
    /// -1 when the target could not sum the range (see `problem`).
    pub target_rows: i64,
    pub checks: u32,
    pub problem: Option<String>,
}

impl Mismatch {
    /// `[a, b)` with `-∞`/`+∞` for an open end.
    pub fn range_text(&self) -> String {
        let end = |bound: &Bound, open: &str| match bound {
            None => open.to_string(),
            Some(values) if values.len() == 1 => values[0].clone(),
            Some(values) => format!("({})", values.join(", ")),
        };
        format!(
            "[{}, {})",
            end(&self.lower, "-inf"),
            end(&self.upper, "+inf")
        )
    }
}

/// One table's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableReport {
    pub database: String,
    pub table: String,
    pub key: Vec<String>,
    pub chunks: usize,
    /// Rows summed on the source in the first pass.
    pub rows: i64,
    /// Checks made in all (first pass, retries and halves).
    pub checks: u64,
    pub mismatches: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub tables: Vec<TableReport>,
    pub mismatches: Vec<Mismatch>,
    pub elapsed_ms: u128,
}

impl VerifyReport {
    pub fn matches(&self) -> bool {
        self.mismatches.is_empty()
    }

    /// `verify`'s exit code for a run that finished: 0 when every table matches, 1 when a
    /// difference was found (a run that could not finish exits 2).
    pub fn exit_code(&self) -> u8 {
        match self.matches() {
            true => 0,
            false => 1,
        }
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        for table in &self.tables {
            text.push_str(&format!(
                "{}: {} — {} rows in {} chunk(s), {} check(s), {}\n",
                table.database,
                table.table,
                table.rows,
                table.chunks,
                table.checks,
                match table.mismatches {
                    0 => "equal".to_string(),
                    n => format!("{n} range(s) differ"),
                }
            ));
        }
        for m in &self.mismatches {
            let key = match m.key.is_empty() {
                true => "the whole table (no unique key)".to_string(),
                false => format!("key ({}) {}", m.key.join(", "), m.range_text()),
            };
            text.push_str(&format!(
                "DIFFERS: {}: {} {key} in chunk {}: source {} row(s), target {}, after {} checks{}\n",
                m.database,
                m.table,
                m.chunk,
                m.source_rows,
                match m.target_rows {
                    -1 => "could not be read".to_string(),
                    n => format!("{n} row(s)"),
                },
                m.checks,
                m.problem
                    .as_deref()
                    .map(|p| format!(" ({p})"))
                    .unwrap_or_default()
            ));
        }
        let rows: i64 = self.tables.iter().map(|t| t.rows).sum();
        text.push_str(&format!(
            "verification: {} table(s), {rows} rows, {} range(s) differ, in {:.1} s\n",
            self.tables.len(),
            self.mismatches.len(),
            self.elapsed_ms as f64 / 1e3
        ));
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(attempts: u32) -> Range {
        Range {
            table: 0,
            chunk: 3,
            lower: Some(vec!["10".into()]),
            upper: None,
            attempts,
        }
    }

    fn checked(matches: bool, rows: i64) -> Checked {
        Checked {
            source_rows: rows,
            target_rows: rows,
            matches,
            problem: None,
        }
    }

    #[test]
    fn a_differing_range_is_checked_again_then_halved_then_reported_when_it_cannot_be_halved() {
        assert_eq!(
            judge(&range(1), &checked(true, 100), true),
            Verdict::Matched
        );
        assert_eq!(judge(&range(1), &checked(false, 100), true), Verdict::Retry);
        assert_eq!(judge(&range(2), &checked(false, 100), true), Verdict::Split);
        // One row left: checked again until it has differed CHECKS_OF_A_LEAF times.
        assert_eq!(judge(&range(2), &checked(false, 1), true), Verdict::Retry);
        assert_eq!(
            judge(&range(CHECKS_OF_A_LEAF), &checked(false, 1), true),
            Verdict::Persistent
        );
        // A row the target has beside the source's one: that range is reported whole.
        let extra = Checked {
            source_rows: 1,
            target_rows: 2,
            ..checked(false, 0)
        };
        assert_eq!(judge(&range(2), &extra, true), Verdict::Retry);
        assert_eq!(
            judge(&range(CHECKS_OF_A_LEAF), &extra, true),
            Verdict::Persistent
        );
        // Without a key, the table is one range.
        assert_eq!(
            judge(&range(2), &checked(false, 100), false),
            Verdict::Retry
        );
        assert_eq!(
            judge(&range(CHECKS_OF_A_LEAF), &checked(false, 100), false),
            Verdict::Persistent
        );
    }

    #[test]
    fn the_report_names_each_differing_range_and_sets_the_exit_code() {
        let mut report = VerifyReport {
            tables: vec![TableReport {
                database: "app".into(),
                table: "public.big".into(),
                key: vec!["id".into()],
                chunks: 10,
                rows: 1000,
                checks: 12,
                mismatches: 0,
            }],
            ..Default::default()
        };
        assert_eq!(report.exit_code(), 0);
        assert!(report
            .render()
            .contains("app: public.big — 1000 rows in 10 chunk(s), 12 check(s), equal"));
        report.mismatches.push(Mismatch {
            database: "app".into(),
            table: "public.big".into(),
            key: vec!["id".into()],
            chunk: 4,
            lower: Some(vec!["417".into()]),
            upper: Some(vec!["418".into()]),
            source_rows: 1,
            target_rows: 1,
            checks: 5,
            problem: None,
        });
        assert_eq!(report.exit_code(), 1);
        let text = report.render();
        assert!(
            text.contains("DIFFERS: app: public.big key (id) [417, 418) in chunk 4: source 1 row(s), target 1 row(s), after 5 checks"),
            "{text}"
        );
        let open = Mismatch {
            lower: None,
            upper: Some(vec!["a".into(), "7".into()]),
            ..report.mismatches[0].clone()
        };
        assert_eq!(open.range_text(), "[-inf, (a, 7))");
    }
}
