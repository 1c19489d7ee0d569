//! The `pgshift` command.

mod args;
mod demo;
mod output;
mod progress;
mod verify;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use pgshift_engine::pgbouncer::PgbouncerTarget;
use pgshift_engine::tls::TlsSettings;
use pgshift_engine::{
    CutoverMode, Databases, Endpoint, Error, PasswordSources, Plan, Side, Traffic, Upgrade,
};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use args::{CheckArgs, Cli, Command, Common, CutoverWhen};

/// Why a command failed: its exit code and its `kind` in the JSON error object (both listed in
/// `pgshift --help` and docs/user-guide.md).
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// Another pgshift process works on this upgrade; nothing was changed.
    Busy,
    /// Preflight found blockers; nothing was changed.
    Blocked,
    /// Anything else that stopped the command.
    Failed,
    /// A server could not be reached or logged in to, or the connection to it was lost.
    Connection,
    /// The invocation must change: arguments, a URL, a password file.
    Usage,
    /// `verify` could not finish (exit code 1 means a difference there).
    NotVerified,
}

impl Failure {
    fn of(error: &anyhow::Error) -> Failure {
        match error.downcast_ref::<Error>() {
            Some(e) if e.is_usage() => Failure::Usage,
            Some(Error::Busy { .. }) => Failure::Busy,
            Some(e) if e.is_connection() => Failure::Connection,
            Some(Error::Blocked { .. }) => Failure::Blocked,
            _ => Failure::Failed,
        }
    }

    /// `verify` exits 1 only for a difference it found: whatever stopped it is 2.
    fn of_verify(error: &anyhow::Error) -> Failure {
        match Failure::of(error) {
            Failure::Failed | Failure::Blocked => Failure::NotVerified,
            other => other,
        }
    }

    fn exit_code(self) -> u8 {
        match self {
            Failure::Blocked | Failure::Failed => 1,
            Failure::Connection | Failure::NotVerified => 2,
            Failure::Busy => 3,
            // EX_USAGE of sysexits.h; clap's own 2 would read as "could not connect".
            Failure::Usage => 64,
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Failure::Blocked => "blocked",
            Failure::Failed | Failure::NotVerified => "failed",
            Failure::Connection => "connection",
            Failure::Busy => "busy",
            Failure::Usage => "usage",
        }
    }

    /// Says what failed on stderr and, for `--json`, as one object on stdout.
    fn report(self, message: &str, json: bool) -> ExitCode {
        output::err(&format!("error: {message}\n"));
        if json {
            self.print_json(message);
        }
        ExitCode::from(self.exit_code())
    }

    /// `{"error": {"kind": …, "message": …, "exit_code": …}}` on stdout.
    fn print_json(self, message: &str) {
        let object = serde_json::json!({
            "error": {"kind": self.kind(), "message": message, "exit_code": self.exit_code()}
        });
        // The exit code tells the failure even when stdout cannot.
        let _ = output::out(&format!("{object:#}\n"));
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return refuse_arguments(error),
    };
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
                .with_writer(|| output::LogWriter)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    let json = cli.command.json();
    let verifying = matches!(cli.command, Command::Verify(_));
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            return Failure::Failed
                .report(&format!("cannot start the async runtime: {error}"), json)
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(error) if verifying => Failure::of_verify(&error).report(&format!("{error:#}"), json),
        Err(error) => Failure::of(&error).report(&format!("{error:#}"), json),
    }
}

/// Clap's answer to the arguments: `--help` and `--version` succeed, anything else is a usage
/// error (clap would exit 2).
fn refuse_arguments(error: clap::Error) -> ExitCode {
    // Printing to a closed pipe (`pgshift --help | head -1`) is not a failure.
    let _ = error.print();
    if !error.use_stderr() {
        return ExitCode::SUCCESS;
    }
    // The arguments did not parse, so `--json` is looked for among them as given.
    if std::env::args_os().any(|arg| arg == "--json") {
        let rendered = error.render().to_string();
        Failure::Usage.print_json(rendered.trim().trim_start_matches("error: "));
    }
    ExitCode::from(Failure::Usage.exit_code())
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
    let command_name = match &command {
        Command::Rollback(_) => "rollback",
        _ => "cutover",
    };
    match command {
        Command::Check(args) => check(args).await,
        Command::Run(args) => {
            let mut plan = plan(&args.common, "run")?;
            plan.max_pause = args.cutover.max_pause;
            plan.rollback_window = !args.cutover.no_rollback_window;
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
                print_json(&outcome)?;
            } else {
                output::out(&format!("{}\n", progress::render_outcome(&outcome)))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(common) => {
            let mut upgrade =
                Upgrade::observer(plan(&common, "status")?, pgshift_engine::events::discard())
                    .await?;
            let status = upgrade.status().await?;
            if common.json {
                print_json(&status)?;
            } else {
                output::out(&progress::render_status(&status))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cutover(args) | Command::Rollback(args) => {
            let back = matches!(command_name, "rollback");
            let mut plan = plan(&args.common, command_name)?;
            plan.max_pause = args.cutover.max_pause;
            plan.rollback_window = !args.cutover.no_rollback_window;
            let progress = progress::Progress::new(args.common.json);
            let mut upgrade = Upgrade::connect(plan, progress.sink()).await?;
            let report = match back {
                true => upgrade.rollback_now().await,
                false => upgrade.cutover_now().await.map(Some),
            };
            progress.finish();
            match (report?, args.common.json) {
                (Some(report), true) => print_json(&report)?,
                (Some(report), false) => {
                    output::out(&format!("{}\n", progress::render_switch(&report)))?
                }
                (None, true) => print_json(&serde_json::json!({"already_done": true}))?,
                (None, false) => output::out(
                    "the rollback was done already: clients use the source, the target follows it\n",
                )?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify(args) => verify::run(args).await,
        Command::Abort(common) => {
            let mut upgrade =
                Upgrade::connect(plan(&common, "abort")?, pgshift_engine::events::discard())
                    .await?;
            let removed = upgrade.abort().await?;
            print_removed(&removed, common.json, "aborted")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cleanup(common) => {
            let mut upgrade =
                Upgrade::connect(plan(&common, "cleanup")?, pgshift_engine::events::discard())
                    .await?;
            let removed = upgrade.cleanup().await?;
            print_removed(&removed, common.json, "cleaned up")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => demo::run(args).await,
        Command::Operator(args) => operator(args).await,
        Command::Crd => {
            output::out(&pgshift_operator::crd::crd_yaml())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::FenceGuard => {
            pgshift_engine::guard::serve().await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let common = args.common;
    let mut plan = plan(&common, "check")?;
    plan.rollback_window = !args.no_rollback_window;
    let mut upgrade = Upgrade::observer(plan, pgshift_engine::events::discard()).await?;
    let report = upgrade.preflight().await?;
    if common.json {
        print_json(&report)?;
    } else {
        output::out(&pgshift_engine::preflight::render(&report))?;
    }
    Ok(if report.ready() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(Failure::Blocked.exit_code())
    })
}

fn print_removed(
    removed: &pgshift_engine::cleanup::Removed,
    json: bool,
    verb: &str,
) -> anyhow::Result<()> {
    if json {
        return print_json(removed);
    }
    let mut text = format!("{verb}; removed:\n");
    for (what, items) in [
        ("subscriptions", &removed.subscriptions),
        ("replication slots", &removed.slots),
        ("publications", &removed.publications),
        ("marker schemas", &removed.marker_schemas),
        ("target databases", &removed.target_databases),
    ] {
        if !items.is_empty() {
            text.push_str(&format!("  {what}: {}\n", items.join(", ")));
        }
    }
    for note in &removed.notes {
        text.push_str(&format!("note: {note}\n"));
    }
    Ok(output::out(&text)?)
}

/// A report as pretty JSON on stdout.
fn print_json(report: &impl serde::Serialize) -> anyhow::Result<()> {
    Ok(output::out(&format!(
        "{}\n",
        serde_json::to_string_pretty(report)?
    ))?)
}

/// Builds the engine's plan for `command` from the arguments; passwords come from files or the
/// environment. Cutovers run a fence guard: this binary's hidden `__fence-guard` command.
pub fn plan(common: &Common, command: &str) -> anyhow::Result<Plan> {
    let passwords = PasswordSources::from_env(common.password_file.clone());
    let tls_env = TlsSettings::from_env().map_err(|problem| Error::InvalidInput {
        what: "TLS setting".into(),
        problem,
    })?;
    let source = Endpoint::parse(Side::Source, &common.source, &passwords, &tls_env)?;
    let target = Endpoint::parse(Side::Target, &common.target, &passwords, &tls_env)?;
    let mut plan = Plan::new(source, target);
    plan.command = command.to_string();
    plan.fence_guard = Some(
        std::env::current_exe()
            .context("cannot find pgshift's own binary, which runs the fence guard")?,
    );
    plan.databases = if common.all_databases {
        Databases::All
    } else if !common.databases.is_empty() {
        Databases::Named(common.databases.clone())
    } else {
        Databases::FromUrl
    };
    plan.pg_bin_dir = common.pg_bin_dir.clone();
    plan.source_address_for_target = common.source_address_from_target.clone();
    plan.target_address_for_source = common.target_address_from_source.clone();
    plan.source_tls_for_target = common.source_tls_from_target.clone();
    plan.target_tls_for_source = common.target_tls_from_source.clone();
    let bouncer = &common.pgbouncer;
    // Clap requires --pgbouncer and --pgbouncer-config together; each console gets the config
    // given at the same place.
    if bouncer.pgbouncer.len() != bouncer.pgbouncer_config.len() {
        return Err(Error::InvalidInput {
            what: "--pgbouncer/--pgbouncer-config".into(),
            problem: format!(
                "{} consoles and {} config files; give each --pgbouncer its --pgbouncer-config, in the same order",
                bouncer.pgbouncer.len(),
                bouncer.pgbouncer_config.len()
            ),
        }
        .into());
    }
    if !bouncer.pgbouncer.is_empty() {
        plan.traffic = Traffic::Pgbouncer(
            bouncer
                .pgbouncer
                .iter()
                .zip(&bouncer.pgbouncer_config)
                .map(|(admin, config_path)| {
                    Ok(PgbouncerTarget {
                        admin: Endpoint::parse(Side::Pgbouncer, admin, &passwords, &tls_env)?,
                        config_path: config_path.clone(),
                        entries: bouncer.pgbouncer_db.clone(),
                        source_address: None,
                        target_address: bouncer.pgbouncer_target_address.clone(),
                    })
                })
                .collect::<Result<Vec<_>, Error>>()?,
        );
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
