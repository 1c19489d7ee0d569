//! What the user asked for: the servers, the databases, how traffic moves and the budget.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::decide::Policy;
use crate::endpoint::Endpoint;
use crate::error::Result;
use crate::pgbouncer::PgbouncerTarget;
use crate::tls::TlsSettings;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Databases {
    /// The database named in the source URL.
    FromUrl,
    Named(Vec<String>),
    /// Every database of the source that accepts connections, but the templates.
    All,
}

#[derive(Debug, Clone)]
pub enum Traffic {
    /// PgBouncer fences and switches: zero failed client transactions. Several PgBouncers (a
    /// fleet: several hosts, or `so_reuseport` processes each with its own console) are paused
    /// together — all or nothing: if one cannot pause within the budget, all resume on the
    /// source — then each config is repointed and reloaded, and all are resumed.
    Pgbouncer(Vec<PgbouncerTarget>),
    /// No pooler: the source is made read-only and its sessions ended; clients reconnect to
    /// the one server that accepts writes (libpq `target_session_attrs=read-write`).
    Direct,
    /// The caller moves the clients (the operator flips a Kubernetes Service): see [`Routed`].
    Routed(Box<Routed>),
}

/// Traffic that a [`Router`] switches, optionally behind PgBouncers that pgshift runs.
///
/// The fence is every pooler's `PAUSE` (all of its databases) followed by direct mode's fence
/// (source read-only, every other client session ended): a client that bypasses the poolers
/// gets an error instead of writing to the old server after the marker. With no pooler the
/// router first isolates the route, then direct mode's fence follows. At the switch the router points the route at the target, then
/// every pooler drops its server connections (`RECONNECT`) and releases its clients (`RESUME`).
#[derive(Debug, Clone)]
pub struct Routed {
    /// Admin consoles of the PgBouncers in front of the source; all of them are paused.
    pub poolers: Vec<Endpoint>,
    pub router: Arc<dyn Router>,
}

/// Points the route that clients (or their poolers) use at one server.
pub trait Router: Send + Sync + std::fmt::Debug {
    /// Points the route at `side`'s server: at the point of no return of a switch toward it,
    /// again by recovery after a crash, and to undo `isolate` when an attempt is aborted. It
    /// must be idempotent, and return only once new connections reach that server.
    fn route_to(&self, side: crate::error::Side) -> BoxFuture<'_, Result<()>>;

    /// Without poolers, at the start of the fence: new connections go nowhere until the
    /// switch, so that a reconnecting client waits (its connection is refused) instead of
    /// failing transactions against the fenced server.
    fn isolate(&self) -> BoxFuture<'_, Result<()>>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutoverMode {
    Automatic,
    /// Stop when ready; `pgshift cutover` finishes.
    Manual,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub source: Endpoint,
    pub target: Endpoint,
    pub databases: Databases,
    pub traffic: Traffic,
    pub cutover: CutoverMode,
    /// The longest write pause allowed; past it, before the switch, the cutover aborts.
    pub max_pause: Duration,
    /// Where pg_dump and psql of the target's major are; PATH when None.
    pub pg_bin_dir: Option<PathBuf>,
    /// The caller copies the schema with the target image's own tools (the operator's Job):
    /// no local pg_dump is needed, and `CopySchema` is the caller's to do.
    pub schema_tools_in_target_image: bool,
    /// Address the target uses to reach the source, when it differs from the source URL's.
    pub source_address_for_target: Option<(String, u16)>,
    /// Address the source uses to reach the target (the rollback window's subscription), when
    /// it differs from the target URL's.
    pub target_address_for_source: Option<(String, u16)>,
    /// The TLS settings (sslmode, sslrootcert, …) of the target's subscription to the source,
    /// as files on the target's machine; pgshift's own source settings when None.
    pub source_tls_for_target: Option<TlsSettings>,
    /// The same for the source's subscription to the target (the rollback window).
    pub target_tls_for_source: Option<TlsSettings>,
    /// A switch starts only when every slot's lag is below this.
    pub max_lag_bytes: i64,
    /// Open the rollback window at the switch: the target publishes, the source subscribes.
    pub rollback_window: bool,
    /// Index and constraint builds run at a time after the initial copy (`pg_restore -j`).
    pub jobs: usize,
    /// How many times an aborted cutover is tried again in one run.
    pub cutover_attempts: u32,
    /// pgshift's own binary, which runs the fence guard (`guard::SUBCOMMAND`) during each
    /// cutover. None: no guard (the operator relies on its leader election instead).
    pub fence_guard: Option<PathBuf>,
    /// What the holder of the upgrade lock is doing (`run`, `cutover`, …): other pgshift
    /// processes name it when they find the lock held.
    pub command: String,
    /// An initial copy that has not moved for this long is reported, with its cause read
    /// from the target.
    pub copy_stall_after: Duration,
}

impl Plan {
    pub fn new(source: Endpoint, target: Endpoint) -> Plan {
        Plan {
            source,
            target,
            databases: Databases::FromUrl,
            traffic: Traffic::Direct,
            cutover: CutoverMode::Automatic,
            max_pause: Duration::from_secs(2),
            pg_bin_dir: None,
            schema_tools_in_target_image: false,
            source_address_for_target: None,
            target_address_for_source: None,
            source_tls_for_target: None,
            target_tls_for_source: None,
            max_lag_bytes: Policy::DEFAULT_MAX_LAG_BYTES,
            rollback_window: true,
            cutover_attempts: 3,
            jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
            fence_guard: None,
            command: "engine".into(),
            copy_stall_after: Duration::from_secs(60),
        }
    }

    /// The conninfo the target's subscription uses to reach one source database.
    pub fn source_conninfo_for_target(&self, database: &str) -> String {
        reached_as(
            &self.source,
            database,
            &self.source_address_for_target,
            &self.source_tls_for_target,
        )
    }

    /// The conninfo the source's subscription (the rollback window) uses to reach the target.
    pub fn target_conninfo_for_source(&self, database: &str) -> String {
        reached_as(
            &self.target,
            database,
            &self.target_address_for_source,
            &self.target_tls_for_source,
        )
    }

    /// What was asked for, as the decision takes it (`rollback`: go back through the window).
    pub fn policy(&self, rollback: bool) -> Policy {
        Policy {
            cutover: self.cutover,
            max_lag_bytes: self.max_lag_bytes,
            rollback_window: self.rollback_window,
            rollback,
        }
    }
}

/// How the other server reaches `server`: its address and TLS settings where they differ
/// from pgshift's.
fn reached_as(
    server: &Endpoint,
    database: &str,
    address: &Option<(String, u16)>,
    tls: &Option<TlsSettings>,
) -> String {
    let mut endpoint = server.with_dbname(database);
    if let Some((host, port)) = address {
        endpoint.host = host.clone();
        endpoint.port = *port;
    }
    if let Some(tls) = tls {
        endpoint.tls = tls.clone();
    }
    endpoint.conninfo()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Side;

    #[test]
    fn each_subscription_gets_pgshifts_tls_settings_unless_its_own_are_given() {
        let mut source = Endpoint::new(Side::Source, "old", 5432, "postgres", "app", None);
        source.tls =
            TlsSettings::parse_conninfo("sslmode=verify-full sslrootcert=/here/ca.pem").unwrap();
        let mut target = Endpoint::new(Side::Target, "new", 5433, "postgres", "app", None);
        target.tls = source.tls.clone();
        let mut plan = Plan::new(source, target);
        assert!(plan
            .source_conninfo_for_target("app")
            .ends_with("sslmode=verify-full sslrootcert='/here/ca.pem'"));
        plan.source_tls_for_target = Some(
            TlsSettings::parse_conninfo("sslmode=verify-ca sslrootcert=/there/ca.pem").unwrap(),
        );
        plan.target_address_for_source = Some(("new.internal".into(), 6000));
        plan.target_tls_for_source = Some(TlsSettings::parse_conninfo("sslmode=require").unwrap());
        assert!(plan
            .source_conninfo_for_target("app")
            .ends_with("sslmode=verify-ca sslrootcert='/there/ca.pem'"));
        let back = plan.target_conninfo_for_source("app");
        assert!(back.starts_with("host='new.internal' port=6000"), "{back}");
        assert!(back.ends_with("sslmode=require"), "{back}");
    }
}
