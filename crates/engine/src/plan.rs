//! What the user asked for: the servers, the databases, how traffic moves and the budget.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::endpoint::Endpoint;
use crate::error::Result;
use crate::pgbouncer::PgbouncerTarget;

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
    /// PgBouncer fences and switches: zero failed client transactions.
    Pgbouncer(Box<PgbouncerTarget>),
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

/// Points the route that clients (or their poolers) use at the target server.
pub trait Router: Send + Sync + std::fmt::Debug {
    /// Called at the point of no return, and again by recovery after a crash: it must be
    /// idempotent, and return only once new connections reach the target.
    fn route_to_target(&self) -> BoxFuture<'_, Result<()>>;

    /// Without poolers, at the start of the fence: new connections go nowhere until the
    /// switch, so that a reconnecting client waits (its connection is refused) instead of
    /// failing transactions against the read-only source.
    fn isolate(&self) -> BoxFuture<'_, Result<()>>;

    /// Undoes `isolate` when an attempt is aborted (or recovered): the route reaches the
    /// source again. Idempotent.
    fn restore(&self) -> BoxFuture<'_, Result<()>>;
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
    /// A cutover starts only when every slot's lag is below this.
    pub max_lag_bytes: i64,
    /// How many times an aborted cutover is tried again in one run.
    pub cutover_attempts: u32,
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
            max_lag_bytes: 8 * 1024 * 1024,
            cutover_attempts: 3,
            copy_stall_after: Duration::from_secs(60),
        }
    }

    /// The conninfo the target's subscription uses to reach one source database.
    pub fn source_conninfo_for_target(&self, database: &str) -> String {
        let mut endpoint = self.source.with_dbname(database);
        if let Some((host, port)) = &self.source_address_for_target {
            endpoint.host = host.clone();
            endpoint.port = *port;
        }
        endpoint.conninfo()
    }
}
