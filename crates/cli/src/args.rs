//! Command-line arguments.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use pgshift_engine::tls::TlsSettings;

#[derive(Parser, Debug)]
#[command(
    name = "pgshift",
    version,
    about = "Upgrade a live PostgreSQL to a new major version: logical replication, then a cutover that pauses writes for milliseconds",
    long_about = "Upgrade a live PostgreSQL to a new major version: logical replication, then a cutover that pauses writes for milliseconds.\n\n\
Passwords are never given on the command line or in a URL: pgshift reads them from --password-file, PGPASSFILE \
or ~/.pgpass (pgpass format: host:port:database:user:password, mode 0600) or from PGPASSWORD.\n\n\
TLS is libpq's: sslmode (disable, allow, prefer, require, verify-ca, verify-full; default prefer), sslrootcert, \
sslcert and sslkey in a URL (postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem) or from PGSSLMODE, \
PGSSLROOTCERT, PGSSLCERT and PGSSLKEY; they reach pg_dump, psql and the subscriptions too.\n\n\
Exit codes:\n  \
0   done, or ready (check)\n  \
1   blocked (preflight found blockers; nothing was changed) or failed\n  \
2   could not connect to or log in to a server, or lost the connection to it: once it is reachable, \
run the same command again\n  \
3   another pgshift process holds this upgrade\n  \
64  usage error: bad arguments, an invalid URL, a password in a URL, a bad password file; nothing was changed\n\n\
With --json an error is also printed on stdout, as one object: \
{\"error\": {\"kind\": \"blocked|failed|connection|busy|usage\", \"message\": \"...\", \"exit_code\": N}}."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log detail: error, warn, info, debug or trace (also RUST_LOG).
    #[arg(long, global = true, default_value = "warn")]
    pub log_level: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Preflight: read-only checks of source, target and tools. Exit 0 ready, 1 blockers, 2 could not connect, 64 usage error.
    Check(CheckArgs),
    /// Run the upgrade from wherever it stands: schema, replication, catch-up, cutover.
    Run(RunArgs),
    /// Show where the upgrade stands, read from both servers.
    Status(Common),
    /// Cut over now (after `run --cutover manual` reported ready).
    Cutover(CutoverArgs),
    /// Go back to the source through the rollback window: the cutover in the other direction,
    /// then the forward stream resumes (retry with `run`/`cutover`, or `abort`).
    Rollback(CutoverArgs),
    /// Check that every table on the target equals the source, while clients write and the
    /// forward stream runs (after `run --cutover manual`). Exit 0 equal, 1 a difference (each named),
    /// 2 could not verify, 3 another pgshift holds the upgrade, 64 usage error.
    Verify(VerifyArgs),
    /// Stop an unfinished upgrade and remove everything pgshift created, on both sides.
    Abort(Common),
    /// After a finished upgrade: end the rollback window and drop the subscriptions, slots, publications and marker tables.
    Cleanup(Common),
    /// Try it on local servers: old and new PostgreSQL, PgBouncer, a live write load, the upgrade, a report.
    Demo(DemoArgs),
    /// Run the Kubernetes operator that drives PostgresUpgrade resources (in-cluster or kubeconfig credentials).
    Operator(OperatorArgs),
    /// Print the PostgresUpgrade CustomResourceDefinition (YAML), for `kubectl apply -f -`.
    Crd,
    /// The fence guard that a cutover starts (reads its plan from stdin); not for people.
    #[command(name = "__fence-guard", hide = true)]
    FenceGuard,
}

impl Command {
    /// Whether the command was asked for JSON output (errors included).
    pub fn json(&self) -> bool {
        match self {
            Command::Check(args) => args.common.json,
            Command::Status(common) | Command::Abort(common) | Command::Cleanup(common) => {
                common.json
            }
            Command::Run(args) => args.common.json,
            Command::Verify(args) => args.common.json,
            Command::Cutover(args) | Command::Rollback(args) => args.common.json,
            Command::Demo(args) => args.json,
            Command::Operator(_) | Command::Crd | Command::FenceGuard => false,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct OperatorArgs {
    /// Watch only this namespace (default: every namespace).
    #[arg(long, env = "PGSHIFT_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_addr: std::net::SocketAddr,
    /// Namespace of the leader-election Lease (default: the pod's, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease shared by the operator's replicas.
    #[arg(long, default_value = "pgshift-operator")]
    pub lease_name: String,
    /// This replica's identity in the Lease (default: the pod name, from POD_NAME).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How long the leader's Lease lasts without renewal (renewed every third of it): a killed
    /// leader is replaced after this long.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// The server to upgrade, e.g. postgres://postgres@old-db:5432/app (no password in it).
    #[arg(long, env = "PGSHIFT_SOURCE")]
    pub source: String,
    /// The new-version server, e.g. postgres://postgres@new-db:5432/app (no password in it).
    #[arg(long, env = "PGSHIFT_TARGET")]
    pub target: String,
    /// A pgpass-format file with the passwords (host:port:database:user:password).
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Databases to move (default: the one in the source URL).
    #[arg(long, value_delimiter = ',', conflicts_with = "all_databases")]
    pub databases: Vec<String>,
    /// Move every database of the source that accepts connections.
    #[arg(long)]
    pub all_databases: bool,
    /// Directory with pg_dump and psql of the target's major (default: PATH).
    #[arg(long)]
    pub pg_bin_dir: Option<PathBuf>,
    /// host:port the target server uses to reach the source, if not the source URL's.
    #[arg(long, value_parser = parse_address)]
    pub source_address_from_target: Option<(String, u16)>,
    /// host:port the source server uses to reach the target (the rollback window), if not the target URL's.
    #[arg(long, value_parser = parse_address)]
    pub target_address_from_source: Option<(String, u16)>,
    /// TLS settings the target server uses to reach the source (its subscription), if not pgshift's:
    /// e.g. "sslmode=verify-full sslrootcert=/etc/ssl/source-ca.pem", paths on the target's machine.
    #[arg(long, value_parser = parse_tls, value_name = "PARAMS")]
    pub source_tls_from_target: Option<TlsSettings>,
    /// TLS settings the source server uses to reach the target (the rollback window), if not pgshift's.
    #[arg(long, value_parser = parse_tls, value_name = "PARAMS")]
    pub target_tls_from_source: Option<TlsSettings>,
    #[command(flatten)]
    pub pgbouncer: PgbouncerArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct PgbouncerArgs {
    /// PgBouncer's admin console, e.g. postgres://pgbouncer@bouncer:6432/pgbouncer. Without it, direct mode.
    /// Repeat it for a fleet (several hosts, or so_reuseport processes each with its own
    /// console): all are paused together, all or nothing.
    #[arg(long, requires = "pgbouncer_config")]
    pub pgbouncer: Vec<String>,
    /// PgBouncer's config file, whose [databases] entries pgshift repoints at cutover. Once per
    /// --pgbouncer, in the same order: the first config belongs to the first console.
    #[arg(long, requires = "pgbouncer")]
    pub pgbouncer_config: Vec<PathBuf>,
    /// PgBouncer entries to move, on every PgBouncer (default: every entry that points at the source).
    #[arg(long, value_delimiter = ',', requires = "pgbouncer")]
    pub pgbouncer_db: Vec<String>,
    /// host:port PgBouncer uses for the target, if not the target URL's (every PgBouncer).
    #[arg(long, value_parser = parse_address, requires = "pgbouncer")]
    pub pgbouncer_target_address: Option<(String, u16)>,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub common: Common,
    /// Check for `run --no-rollback-window`: leave out what only the rollback window needs.
    #[arg(long)]
    pub no_rollback_window: bool,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub cutover: CutoverOptions,
    /// auto: cut over as soon as in sync; manual: stop at ready-for-cutover (then `pgshift cutover`).
    #[arg(long = "cutover", value_enum, default_value_t = CutoverWhen::Auto)]
    pub cutover_mode: CutoverWhen,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub common: Common,
    /// At most this many rows per second summed on the source (the target sums as many, in its
    /// apply worker); 0: no limit.
    #[arg(long, default_value_t = 100_000)]
    pub max_rate: u64,
    /// Rows per chunk: a differing chunk is checked again, then halved until the difference is
    /// named to the row.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub chunk_rows: u64,
}

#[derive(Args, Debug)]
pub struct CutoverArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub cutover: CutoverOptions,
}

#[derive(Args, Debug, Clone)]
pub struct CutoverOptions {
    /// The longest write pause allowed; past it, before the switch, the cutover aborts and clients resume where they were.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub max_pause: Duration,
    /// Do not open the rollback window at the switch (no reverse replication; no `pgshift rollback`).
    #[arg(long)]
    pub no_rollback_window: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutoverWhen {
    Auto,
    Manual,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Major version of the old server.
    #[arg(long, default_value_t = 15)]
    pub source_version: u32,
    /// Major version of the new server (client tools of this major must be installed).
    #[arg(long, default_value_t = 18)]
    pub target_version: u32,
    /// Size of the sample data: N thousand accounts rows and N × 10 thousand history rows.
    #[arg(long, default_value_t = 10)]
    pub scale: u32,
    /// Concurrent clients writing through PgBouncer during the whole upgrade.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// How long the write load runs before the upgrade starts and after it ends.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Move clients without PgBouncer (direct mode): expect brief client errors.
    #[arg(long)]
    pub direct: bool,
    #[command(flatten)]
    pub cutover: CutoverOptions,
    /// Print one JSON object with the figures.
    #[arg(long)]
    pub json: bool,
}

fn parse_tls(text: &str) -> Result<TlsSettings, String> {
    TlsSettings::parse_conninfo(text)
}

fn parse_address(text: &str) -> Result<(String, u16), String> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("expected HOST:PORT, got {text:?}"))?;
    let port = port
        .parse()
        .map_err(|_| format!("invalid port in {text:?}"))?;
    Ok((host.to_string(), port))
}
