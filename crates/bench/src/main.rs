//! `pgshift-bench`: pgshift against the conventional ways to upgrade PostgreSQL, on the same
//! data, the same machine and the same live write load, in one run. Each method gets a freshly
//! loaded PostgreSQL 15 source and an empty 18 target; the ledger load runs before, during and
//! after the upgrade, and the new server is checked for every acknowledged commit.

mod catch_up;
mod dataset;
mod dump;
mod error;
mod figures;
mod lab;
mod logical;
mod pg_upgrade;
mod pgcopydb;
mod pgshift;
mod scaling;
mod svg;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde::Serialize;

use crate::catch_up::CatchUpPoint;
use crate::dataset::Dataset;
use crate::dump::Offline;
use crate::error::{io, Result};
use crate::figures::{peak_rss_mb, MethodFigures};
use crate::lab::Workload;
use crate::scaling::ScalingPoint;

#[derive(Debug, Parser)]
#[command(
    name = "pgshift-bench",
    about = "pgshift against dump/restore, pgcopydb, pg_upgrade and unfenced logical replication"
)]
struct Args {
    /// A small run: a small scale (sample: 40, ~50 MB; pgbench-indexed: 2, ~50 MB), 20
    /// extra tables, 3 s of load around each upgrade.
    #[arg(long)]
    quick: bool,
    /// What the source holds: the lab's sample data, or pgbench's tables with three secondary
    /// indexes on pgbench_accounts, a random abalance and 200 small tables.
    #[arg(long = "data", value_enum, default_value_t = Dataset::Sample)]
    dataset: Dataset,
    /// The data's scale. sample: 1 ≈ 1.3 MB, default 770 (~1 GB); pgbench-indexed: 1 ≈ 21 MB
    /// (100,000 accounts), default 28 (~600 MB, issue 14's 588 MB).
    #[arg(long)]
    scale: Option<u32>,
    /// Concurrent ledger clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Total transactions per second over all clients; as fast as possible when absent.
    #[arg(long)]
    rate: Option<f64>,
    /// Measure only these methods (repeatable); all when absent.
    #[arg(long = "method", value_parser = clap::builder::PossibleValuesParser::new(METHOD_NAMES))]
    methods: Vec<String>,
    /// Skip pgshift's scaling runs (pause against size, rate, tables, sequences).
    #[arg(long)]
    no_scaling: bool,
    /// Skip the catch-up sweep (does apply keep up with the source at rising write rates).
    #[arg(long)]
    no_catch_up: bool,
    /// Write latency.svg (latency over time per method), ready.svg (time to ready per
    /// method), scaling.svg (pgshift's pause against the work) and catch-up.svg (the source's
    /// write rate against what apply kept up with) into this directory.
    #[arg(long, value_name = "DIR")]
    svg_dir: Option<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Also save the JSON object to this file (the table is still printed).
    #[arg(long, value_name = "FILE")]
    save_json: Option<PathBuf>,
}

#[derive(Serialize)]
struct BenchReport {
    source_major: u32,
    target_major: u32,
    dataset: Dataset,
    scale: u32,
    size_mb: f64,
    clients: usize,
    rate: Option<f64>,
    methods: Vec<MethodFigures>,
    /// pgshift's time to ready for the cutover against the fastest other method's.
    #[serde(skip_serializing_if = "Option::is_none")]
    time_to_ready: Option<ReadyComparison>,
    /// pgshift's pause (through PgBouncer) against database size, write rate, tables and
    /// sequences.
    scaling: Vec<ScalingPoint>,
    /// pgshift's catch-up at rising source write rates.
    catch_up: Vec<CatchUpPoint>,
    /// The highest source commit rate at which pgshift's catch-up converged.
    #[serde(skip_serializing_if = "Option::is_none")]
    catch_up_highest_converged_tps: Option<f64>,
    peak_rss_mb: Option<f64>,
}

/// The done-criterion of issue 14: pgshift ready for the cutover no later than the fastest
/// peer holds everything.
#[derive(Serialize)]
struct ReadyComparison {
    pgshift: &'static str,
    pgshift_ms: f64,
    fastest_peer: &'static str,
    fastest_peer_ms: f64,
    /// pgshift's time over the fastest peer's: at most 1 meets the criterion.
    ratio: f64,
}

impl ReadyComparison {
    /// pgshift (through PgBouncer, else direct) against the fastest method that copies the
    /// data (`pg_upgrade --link` copies nothing and is left out).
    fn of(methods: &[MethodFigures]) -> Option<ReadyComparison> {
        let measured = |m: &&MethodFigures| m.not_run.is_none() && m.time_to_ready_ms.is_finite();
        let pgshift = ["pgshift-pgbouncer", "pgshift-direct"]
            .iter()
            .find_map(|name| methods.iter().filter(measured).find(|m| m.name == *name))?;
        let peer = methods
            .iter()
            .filter(measured)
            .filter(|m| !m.name.starts_with("pgshift") && m.name != "pg_upgrade-link")
            .min_by(|a, b| a.time_to_ready_ms.total_cmp(&b.time_to_ready_ms))?;
        Some(ReadyComparison {
            pgshift: pgshift.name,
            pgshift_ms: pgshift.time_to_ready_ms,
            fastest_peer: peer.name,
            fastest_peer_ms: peer.time_to_ready_ms,
            ratio: pgshift.time_to_ready_ms / peer.time_to_ready_ms,
        })
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "pgshift_bench=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(&args).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("pgshift-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<ExitCode> {
    let work = Workload {
        dataset: args.dataset,
        scale: args.scale.unwrap_or(args.dataset.default_scale(args.quick)),
        extra_tables: args.dataset.small_tables(args.quick),
        extra_sequences: 0,
        clients: args.clients,
        rate: args.rate,
        settle: Duration::from_secs(if args.quick { 3 } else { 10 }),
    };
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut methods = Vec::new();
    let mut size_mb = 0.0;
    for method in [
        Method::Pgshift(pgshift::Mode::Pgbouncer),
        Method::Pgshift(pgshift::Mode::Direct),
        Method::Offline(Offline::DumpPiped),
        Method::Offline(Offline::DumpParallel { jobs }),
        Method::Offline(Offline::PgcopydbClone { jobs }),
        Method::LogicalUnfenced,
        Method::PgUpgradeLink,
    ] {
        if !args.methods.is_empty() && !args.methods.iter().any(|m| m == method.name()) {
            continue;
        }
        tracing::info!(method = method.name(), "measuring");
        let figures = match method {
            Method::Pgshift(mode) => pgshift::run(&work, mode).await,
            Method::Offline(offline) => dump::run(&work, offline).await,
            Method::LogicalUnfenced => logical::run(&work).await,
            Method::PgUpgradeLink => pg_upgrade::run(&work).await,
        };
        let figures = match figures {
            Ok(figures) => {
                if size_mb == 0.0 {
                    size_mb = figures.size_mb;
                }
                figures
            }
            Err(e) => {
                tracing::error!(method = method.name(), "{e}");
                MethodFigures::not_run(method.name(), e.to_string())
            }
        };
        tracing::info!(
            method = figures.name,
            time_to_ready_ms = figures.time_to_ready_ms,
            write_unavailable_ms = figures.write_unavailable_ms,
            pause_ms = figures.pause_ms,
            failed = figures.failed,
            lost = figures.lost,
            "measured"
        );
        methods.push(figures);
    }
    let scaling = if args.no_scaling {
        Vec::new()
    } else {
        scaling::run(&work, args.quick).await
    };
    let catch_up = if args.no_catch_up {
        Vec::new()
    } else {
        catch_up::run(&work, args.quick).await
    };
    let report = BenchReport {
        source_major: lab::SOURCE_MAJOR,
        target_major: lab::TARGET_MAJOR,
        dataset: work.dataset,
        scale: work.scale,
        size_mb,
        clients: work.clients,
        rate: work.rate,
        time_to_ready: ReadyComparison::of(&methods),
        methods,
        scaling,
        catch_up_highest_converged_tps: CatchUpPoint::highest_converged_tps(&catch_up),
        catch_up,
        peak_rss_mb: peak_rss_mb(),
    };
    if let Some(dir) = &args.svg_dir {
        std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
        let mut pictures = vec![
            ("latency.svg", svg::latency(&report.methods)),
            ("ready.svg", svg::time_to_ready(&report.methods)),
        ];
        if !report.scaling.is_empty() {
            pictures.push(("scaling.svg", svg::scaling(&report.scaling)));
        }
        if !report.catch_up.is_empty() {
            pictures.push(("catch-up.svg", svg::catch_up(&report.catch_up)));
        }
        for (file, picture) in pictures {
            let path = dir.join(file);
            std::fs::write(&path, picture)
                .map_err(io(format!("cannot write {}", path.display())))?;
            tracing::info!(path = %path.display(), "picture written");
        }
    }
    if let Some(path) = &args.save_json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .map_err(io(format!("cannot write {}", path.display())))?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", render(&report));
    }
    // A bench does not fail on a number, but pgshift losing or (through PgBouncer) failing a
    // transaction is a bug.
    let pgshift_broke = report.methods.iter().any(|m| match m.name {
        "pgshift-pgbouncer" => {
            m.not_run.is_some()
                || m.lost > 0
                || m.failed > 0
                || m.in_doubt > 0
                || !m.invariant_holds
        }
        "pgshift-direct" => m.not_run.is_some() || m.lost > 0 || !m.invariant_holds,
        _ => false,
    }) || report.scaling.iter().any(ScalingPoint::pgshift_broke)
        || report.catch_up.iter().any(|p| p.error.is_some());
    Ok(if pgshift_broke {
        eprintln!(
            "pgshift-bench: pgshift lost or failed transactions, or did not finish: see above"
        );
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

const METHOD_NAMES: [&str; 7] = [
    "pgshift-pgbouncer",
    "pgshift-direct",
    "dump-restore",
    "dump-restore-parallel",
    "pgcopydb-clone",
    "logical-unfenced",
    "pg_upgrade-link",
];

#[derive(Debug, Clone, Copy)]
enum Method {
    Pgshift(pgshift::Mode),
    Offline(Offline),
    LogicalUnfenced,
    PgUpgradeLink,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Pgshift(pgshift::Mode::Pgbouncer) => "pgshift-pgbouncer",
            Method::Pgshift(pgshift::Mode::Direct) => "pgshift-direct",
            Method::Offline(offline) => offline.name(),
            Method::LogicalUnfenced => "logical-unfenced",
            Method::PgUpgradeLink => "pg_upgrade-link",
        }
    }
}

fn render(r: &BenchReport) -> String {
    let mut out = format!(
        "\nPostgreSQL {} -> {}: {} data at scale {} ({:.0} MB), {} ledger clients, {}\n\n",
        r.source_major,
        r.target_major,
        r.dataset.name(),
        r.scale,
        r.size_mb,
        r.clients,
        r.rate
            .map_or("no rate cap".to_string(), |tps| format!("{tps} TPS")),
    );
    out.push_str(&format!(
        "{:<22} {:>9} {:>14} {:>10} {:>7} {:>9} {:>6} {:>9} {:>10} {:>14} {:>9}\n",
        "method",
        "ready ms",
        "unavailable ms",
        "pause ms",
        "failed",
        "in doubt",
        "lost",
        "invariant",
        "total ms",
        "first write ms",
        "copy MB/s"
    ));
    for m in &r.methods {
        if let Some(reason) = &m.not_run {
            out.push_str(&format!("{:<22} not measured: {reason}\n", m.name));
            continue;
        }
        out.push_str(&format!(
            "{:<22} {:>9.0} {:>14.1} {:>10.1} {:>7} {:>9} {:>6} {:>9} {:>10.0} {:>14} {:>9}\n",
            m.name,
            m.time_to_ready_ms,
            m.write_unavailable_ms,
            m.pause_ms,
            m.failed,
            m.in_doubt,
            m.lost,
            if m.invariant_holds { "holds" } else { "BROKEN" },
            m.total_ms,
            m.first_write_ms
                .map_or("-".to_string(), |v| format!("{v:.0}")),
            m.copy_mb_per_s
                .map_or("-".to_string(), |v| format!("{v:.1}")),
        ));
    }
    for m in &r.methods {
        if let Some(ms) = m.longest_in_cutover_ms {
            out.push_str(&format!(
                "{}: longest transaction in flight during the fence {ms:.1} ms\n",
                m.name
            ));
        }
    }
    if let Some(c) = &r.time_to_ready {
        out.push_str(&format!(
            "time to ready: {} {:.0} ms, the fastest other method {} {:.0} ms: ratio {:.2}\n",
            c.pgshift, c.pgshift_ms, c.fastest_peer, c.fastest_peer_ms, c.ratio
        ));
    }
    if !r.scaling.is_empty() {
        out.push_str(&format!(
            "\npgshift through PgBouncer, pause against the work:\n{:<10} {:>10} {:>10} {:>15} {:>14} {:>7} {:>6} {:>10}\n",
            "dimension",
            "value",
            "pause ms",
            "in cutover ms",
            "unavailable ms",
            "failed",
            "lost",
            "total ms"
        ));
        for p in &r.scaling {
            if let Some(error) = &p.error {
                out.push_str(&format!(
                    "{:<10} {:>10.2} failed: {error}\n",
                    p.dimension, p.value
                ));
                continue;
            }
            out.push_str(&format!(
                "{:<10} {:>10.2} {:>10.1} {:>15} {:>14.1} {:>7} {:>6} {:>10.0}\n",
                p.dimension,
                p.value,
                p.pause_ms,
                p.longest_in_cutover_ms
                    .map_or("-".to_string(), |v| format!("{v:.1}")),
                p.write_unavailable_ms,
                p.failed,
                p.lost,
                p.total_ms
            ));
        }
    }
    if !r.catch_up.is_empty() {
        out.push_str(&render_catch_up(&r.catch_up));
        let every = r.catch_up.iter().all(|p| p.converged);
        out.push_str(&match r.catch_up_highest_converged_tps {
            Some(tps) if every => format!(
                "catch-up converged at every rate measured, up to {tps:.0} TPS (as fast as the clients could write)\n"
            ),
            Some(tps) => format!("highest source rate at which catch-up converged: {tps:.0} TPS\n"),
            None => "catch-up converged at none of these rates\n".to_string(),
        });
    }
    if let Some(rss) = r.peak_rss_mb {
        out.push_str(&format!(
            "\npeak RSS of the bench process (pgshift's engine and the ledger clients): {rss:.1} MB\n"
        ));
    }
    out
}

fn render_catch_up(points: &[CatchUpPoint]) -> String {
    let mut out = format!(
        "\npgshift's catch-up against the source's write rate (one fresh run each):\n{:<10} {:>8} {:>9} {:>14} {:>15} {:>13} {:>10} {:>13} {:>9}\n",
        "rate cap",
        "clients",
        "TPS",
        "source MB/s",
        "applied MB/s",
        "peak lag MB",
        "converged",
        "catch-up ms",
        "ready ms"
    );
    for p in points {
        let cap = p
            .rate_asked
            .map_or("none".to_string(), |r| format!("{r:.0}"));
        if let Some(error) = &p.error {
            out.push_str(&format!("{cap:<10} {:>8} failed: {error}\n", p.clients));
            continue;
        }
        out.push_str(&format!(
            "{cap:<10} {:>8} {:>9.0} {:>14.2} {:>15.2} {:>13.2} {:>10} {:>13.0} {:>9}\n",
            p.clients,
            p.source_tps,
            p.source_bytes_per_s / 1e6,
            p.applied_bytes_per_s / 1e6,
            p.peak_lag_bytes as f64 / 1e6,
            if p.converged { "yes" } else { "NO" },
            p.catch_up_ms,
            p.time_to_ready_ms
                .map_or("-".to_string(), |v| format!("{v:.0}")),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(name: &'static str, time_to_ready_ms: f64) -> MethodFigures {
        MethodFigures {
            time_to_ready_ms,
            not_run: None,
            ..MethodFigures::not_run(name, String::new())
        }
    }

    #[test]
    fn pgshift_is_set_against_the_fastest_method_that_copies_the_data() {
        let methods = [
            measured("pgshift-pgbouncer", 30_000.0),
            measured("pgshift-direct", 20_000.0),
            measured("dump-restore", 25_000.0),
            measured("pgcopydb-clone", 24_000.0),
            MethodFigures::not_run("dump-restore-parallel", "failed".into()),
            measured("pg_upgrade-link", 3_000.0),
        ];
        let c = ReadyComparison::of(&methods).expect("both sides measured");
        assert_eq!(
            (c.pgshift, c.fastest_peer),
            ("pgshift-pgbouncer", "pgcopydb-clone")
        );
        assert_eq!(c.ratio, 1.25);
    }

    #[test]
    fn without_a_measured_peer_there_is_no_comparison() {
        let methods = [
            measured("pgshift-direct", 20_000.0),
            measured("pg_upgrade-link", 3_000.0),
        ];
        assert!(ReadyComparison::of(&methods).is_none());
    }
}
