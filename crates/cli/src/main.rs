//! The `pgshift` command.

mod args;
mod demo;
mod progress;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use pgshift_engine::pgbouncer::PgbouncerTarget;
use pgshift_engine::{
    CutoverMode, Databases, Endpoint, Error, PasswordSources, Plan, Side, Traffic, Upgrade,
};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use args::{Cli, Command, Common, CutoverWhen};

/// Exit codes: 0 done or ready, 1 blocked or failed, 2 could not connect.
const EXIT_BLOCKED: u8 = 1;
const EXIT_CONNECT: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::registry()
        .with(driver_statements_hidden())
        .with(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(format!(
                    "pgshift={0},pgshift_engine={0},pgshift_lab={0},pgshift_operator={0}",
                    cli.log_level
                ))
            }),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_BLOCKED);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(error) => {
            let code = match error.downcast_ref::<Error>() {
                Some(e) if e.is_connection() => EXIT_CONNECT,
                _ => EXIT_BLOCKED,
            };
            eprintln!("error: {error:#}");
            ExitCode::from(code)
        }
    }
}

/// tokio-postgres logs the text of every statement at debug level, and some of pgshift's hold
/// secrets (the subscription's connection string carries the source password): its debug and
/// trace output is dropped whatever `--log-level` or RUST_LOG ask for.
fn driver_statements_hidden(
) -> tracing_subscriber::filter::FilterFn<impl Fn(&tracing::Metadata<'_>) -> bool> {
    tracing_subscriber::filter::filter_fn(|metadata| {
        !(metadata.target().starts_with("tokio_postgres")
            && *metadata.level() > tracing::Level::INFO)
    })
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Check(common) => check(common).await,
        Command::Run(args) => {
            let mut plan = plan(&args.common)?;
            plan.max_pause = args.cutover.max_pause;
            plan.cutover = match args.cutover_mode {
                CutoverWhen::Auto => CutoverMode::Automatic,
                CutoverWhen::Manual => CutoverMode::Manual,
            };
            let json = args.common.json;
            let progress = progress::Progress::new(json);
            let mut upgrade = Upgrade::connect(plan, progress.sink()).await?;
            let outcome = upgrade.run().await;
            progress.finish();
            let outcome = outcome?;
            if json {
                println!("{}", serde_json::to_string_pretty(&outcome)?);
            } else {
                println!("{}", progress::render_outcome(&outcome));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(common) => {
            let mut upgrade =
                Upgrade::connect(plan(&common)?, pgshift_engine::events::discard()).await?;
            let status = upgrade.status().await?;
            if common.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", progress::render_status(&status));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cutover(args) => {
            let mut plan = plan(&args.common)?;
            plan.max_pause = args.cutover.max_pause;
            let progress = progress::Progress::new(args.common.json);
            let mut upgrade = Upgrade::connect(plan, progress.sink()).await?;
            let report = upgrade.cutover_now().await;
            progress.finish();
            let report = report?;
            if args.common.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "cutover done: writes paused {:.1} ms, {} sequences copied; clients now use the target",
                    report.pause_ms, report.sequences_synced
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Abort(common) => {
            let mut upgrade =
                Upgrade::connect(plan(&common)?, pgshift_engine::events::discard()).await?;
            let removed = upgrade.abort().await?;
            print_removed(&removed, common.json, "aborted")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cleanup(common) => {
            let mut upgrade =
                Upgrade::connect(plan(&common)?, pgshift_engine::events::discard()).await?;
            let removed = upgrade.cleanup().await?;
            print_removed(&removed, common.json, "cleaned up")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => demo::run(args).await,
        Command::Operator(args) => operator(args).await,
        Command::Crd => {
            print!("{}", pgshift_operator::crd::crd_yaml());
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn check(common: Common) -> anyhow::Result<ExitCode> {
    let mut upgrade = Upgrade::connect(plan(&common)?, pgshift_engine::events::discard()).await?;
    let report = upgrade.preflight().await?;
    if common.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", pgshift_engine::preflight::render(&report));
    }
    Ok(if report.ready() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_BLOCKED)
    })
}

fn print_removed(
    removed: &pgshift_engine::cleanup::Removed,
    json: bool,
    verb: &str,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(removed)?);
        return Ok(());
    }
    println!("{verb}; removed:");
    for (what, items) in [
        ("subscriptions", &removed.subscriptions),
        ("replication slots", &removed.slots),
        ("publications", &removed.publications),
        ("marker schemas", &removed.marker_schemas),
        ("target databases", &removed.target_databases),
    ] {
        if !items.is_empty() {
            println!("  {what}: {}", items.join(", "));
        }
    }
    for note in &removed.notes {
        println!("note: {note}");
    }
    Ok(())
}

/// Builds the engine's plan from the arguments; passwords come from files or the environment.
pub fn plan(common: &Common) -> anyhow::Result<Plan> {
    let passwords = PasswordSources::from_env(common.password_file.clone());
    let source = Endpoint::parse(Side::Source, &common.source, &passwords)?;
    let target = Endpoint::parse(Side::Target, &common.target, &passwords)?;
    let mut plan = Plan::new(source, target);
    plan.databases = if common.all_databases {
        Databases::All
    } else if !common.databases.is_empty() {
        Databases::Named(common.databases.clone())
    } else {
        Databases::FromUrl
    };
    plan.pg_bin_dir = common.pg_bin_dir.clone();
    plan.source_address_for_target = common.source_address_from_target.clone();
    if let Some(admin) = &common.pgbouncer.pgbouncer {
        let config_path = common
            .pgbouncer
            .pgbouncer_config
            .clone()
            .context("--pgbouncer needs --pgbouncer-config: the file whose [databases] entries pgshift repoints at cutover")?;
        plan.traffic = Traffic::Pgbouncer(Box::new(PgbouncerTarget {
            admin: Endpoint::parse(Side::Pgbouncer, admin, &passwords)?,
            config_path,
            entries: common.pgbouncer.pgbouncer_db.clone(),
            source_address: None,
            target_address: common.pgbouncer.pgbouncer_target_address.clone(),
        }));
    }
    Ok(plan)
}

async fn operator(args: args::OperatorArgs) -> anyhow::Result<ExitCode> {
    let client = kube::Client::try_default().await.context(
        "cannot reach the Kubernetes API server: run in a pod with a ServiceAccount, or set KUBECONFIG",
    )?;
    let identity = args.identity.unwrap_or_else(|| {
        format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "pgshift".into()),
            std::process::id()
        )
    });
    let mut lease =
        pgshift_operator::leader::LeaseConfig::new(args.lease_namespace, args.lease_name, identity);
    lease.lease_duration = args.lease_duration;
    lease.renew_every = args.lease_duration / 3;
    pgshift_operator::controller::run(
        client,
        pgshift_operator::controller::Options {
            watch_namespace: args.watch_namespace,
            metrics_addr: args.metrics_addr,
            lease,
        },
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}
