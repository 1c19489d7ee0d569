//! `pgshift-bench`: pgshift against the conventional ways to upgrade PostgreSQL, on the same
//! data, the same machine and the same live write load, in one run. Each method gets a freshly
//! loaded PostgreSQL 15 source and an empty 18 target; the ledger load runs before, during and
//! after the upgrade, and the new server is checked for every acknowledged commit.

mod dump;
mod error;
mod figures;
mod lab;
mod logical;
mod pg_upgrade;
mod pgshift;
mod scaling;
mod svg;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde::Serialize;

use crate::error::{io, Result};
use crate::figures::{peak_rss_mb, MethodFigures};
use crate::lab::Workload;
use crate::scaling::ScalingPoint;

#[derive(Debug, Parser)]
#[command(
    name = "pgshift-bench",
    about = "pgshift against dump/restore, pg_upgrade and unfenced logical replication"
)]
struct Args {
    /// A small run of a few minutes: scale 40 (~50 MB), 20 extra tables, 3 s of load around
    /// each upgrade.
    #[arg(long)]
    quick: bool,
    /// pgbench-like scale (1 ≈ 1.3 MB); default 770 (~1 GB), or 40 with --quick.
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
    /// Write latency.svg (latency over time per method) and scaling.svg (pgshift's pause
    /// against the work) into this directory.
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
    scale: u32,
    size_mb: f64,
    clients: usize,
    rate: Option<f64>,
    methods: Vec<MethodFigures>,
    /// pgshift's pause (through PgBouncer) against database size, write rate, tables and
    /// sequences.
    scaling: Vec<ScalingPoint>,
    peak_rss_mb: Option<f64>,
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
        scale: args.scale.unwrap_or(if args.quick { 40 } else { 770 }),
        extra_tables: if args.quick { 20 } else { 300 },
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
        Method::Dump(dump::Format::Piped),
        Method::Dump(dump::Format::Parallel { jobs }),
        Method::LogicalUnfenced,
        Method::PgUpgradeLink,
    ] {
        if !args.methods.is_empty() && !args.methods.iter().any(|m| m == method.name()) {
            continue;
        }
        tracing::info!(method = method.name(), "measuring");
        let figures = match method {
            Method::Pgshift(mode) => pgshift::run(&work, mode).await,
            Method::Dump(format) => dump::run(&work, format).await,
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
    let report = BenchReport {
        source_major: lab::SOURCE_MAJOR,
        target_major: lab::TARGET_MAJOR,
        scale: work.scale,
        size_mb,
        clients: work.clients,
        rate: work.rate,
        methods,
        scaling,
        peak_rss_mb: peak_rss_mb(),
    };
    if let Some(dir) = &args.svg_dir {
        std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
        for (file, picture) in [
            ("latency.svg", svg::latency(&report.methods)),
            ("scaling.svg", svg::scaling(&report.scaling)),
        ] {
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
    }) || report.scaling.iter().any(ScalingPoint::pgshift_broke);
    Ok(if pgshift_broke {
        eprintln!(
            "pgshift-bench: pgshift lost or failed transactions, or did not finish: see above"
        );
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

const METHOD_NAMES: [&str; 6] = [
    "pgshift-pgbouncer",
    "pgshift-direct",
    "dump-restore",
    "dump-restore-parallel",
    "logical-unfenced",
    "pg_upgrade-link",
];

#[derive(Debug, Clone, Copy)]
enum Method {
    Pgshift(pgshift::Mode),
    Dump(dump::Format),
    LogicalUnfenced,
    PgUpgradeLink,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Pgshift(pgshift::Mode::Pgbouncer) => "pgshift-pgbouncer",
            Method::Pgshift(pgshift::Mode::Direct) => "pgshift-direct",
            Method::Dump(dump::Format::Piped) => "dump-restore",
            Method::Dump(dump::Format::Parallel { .. }) => "dump-restore-parallel",
            Method::LogicalUnfenced => "logical-unfenced",
            Method::PgUpgradeLink => "pg_upgrade-link",
        }
    }
}

fn render(r: &BenchReport) -> String {
    let mut out = format!(
        "\nPostgreSQL {} -> {}: scale {} ({:.0} MB), {} ledger clients, {}\n\n",
        r.source_major,
        r.target_major,
        r.scale,
        r.size_mb,
        r.clients,
        r.rate
            .map_or("no rate cap".to_string(), |tps| format!("{tps} TPS")),
    );
    out.push_str(&format!(
        "{:<22} {:>14} {:>10} {:>7} {:>9} {:>6} {:>9} {:>10} {:>14} {:>9}\n",
        "method",
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
            "{:<22} {:>14.1} {:>10.1} {:>7} {:>9} {:>6} {:>9} {:>10.0} {:>14} {:>9}\n",
            m.name,
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
    if let Some(rss) = r.peak_rss_mb {
        out.push_str(&format!(
            "\npeak RSS of the bench process (pgshift's engine and the ledger clients): {rss:.1} MB\n"
        ));
    }
    out
}
