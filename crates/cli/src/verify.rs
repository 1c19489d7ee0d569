//! `pgshift verify`: its progress and its report.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use pgshift_engine::verify::{VerifyOptions, VerifyProgress};
use pgshift_engine::Upgrade;

use crate::args::VerifyArgs;
use crate::output;

/// Plain progress lines (stderr not a terminal) at most this often.
const LINE_INTERVAL: Duration = Duration::from_secs(5);

pub async fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let plan = crate::plan(&args.common, "verify")?;
    let options = VerifyOptions {
        chunk_rows: args.chunk_rows,
        max_rows_per_s: Some(args.max_rate).filter(|rate| *rate > 0),
    };
    let json = args.common.json;
    let display = Display::new(json);
    let mut upgrade = Upgrade::connect(plan, pgshift_engine::events::discard()).await?;
    let sink = display.clone();
    let report = upgrade
        .verify(&options, Arc::new(move |progress| sink.show(&progress)))
        .await;
    display.finish();
    let report = report?;
    if json {
        crate::print_json(&report)?;
    } else {
        output::out(&report.render())?;
    }
    Ok(ExitCode::from(report.exit_code()))
}

/// A bar on a terminal, a line every few seconds elsewhere, nothing with `--json`.
#[derive(Clone)]
struct Display {
    bar: Option<ProgressBar>,
    quiet: bool,
    last_line: Arc<Mutex<Option<Instant>>>,
}

impl Display {
    fn new(quiet: bool) -> Display {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} verify {msg}").expect("valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Display {
            bar,
            quiet,
            last_line: Arc::new(Mutex::new(None)),
        }
    }

    fn show(&self, progress: &VerifyProgress) {
        if self.quiet {
            return;
        }
        let text = describe(progress);
        if let Some(bar) = &self.bar {
            bar.set_message(text);
            return;
        }
        let mut last = self.last_line.lock().expect("progress lock");
        if last.is_some_and(|at| at.elapsed() < LINE_INTERVAL) {
            return;
        }
        *last = Some(Instant::now());
        output::err(&format!("{text}\n"));
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn describe(progress: &VerifyProgress) -> String {
    let mut text = format!(
        "{}: {} rows summed, {} of {} checks answered by the target",
        progress.database, progress.rows, progress.answered, progress.submitted
    );
    if !progress.table.is_empty() {
        text.push_str(&format!(", now {}", progress.table));
    }
    if progress.differing > 0 {
        text.push_str(&format!(
            ", {} range(s) differed and are checked again",
            progress.differing
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_progress_line_says_rows_checks_table_and_rechecks() {
        let progress = VerifyProgress {
            database: "app".into(),
            table: "public.big".into(),
            submitted: 12,
            answered: 10,
            rows: 120_000,
            differing: 1,
        };
        assert_eq!(
            describe(&progress),
            "app: 120000 rows summed, 10 of 12 checks answered by the target, now public.big, 1 range(s) differed and are checked again"
        );
    }
}
