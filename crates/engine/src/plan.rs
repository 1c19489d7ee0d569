//! What the user asked for: the servers, the databases, how traffic moves and the budget.

use std::path::PathBuf;
use std::time::Duration;

use crate::endpoint::Endpoint;
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
    /// Address the target uses to reach the source, when it differs from the source URL's.
    pub source_address_for_target: Option<(String, u16)>,
    /// A cutover starts only when every slot's lag is below this.
    pub max_lag_bytes: i64,
    /// How many times an aborted cutover is tried again in one run.
    pub cutover_attempts: u32,
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
            source_address_for_target: None,
            max_lag_bytes: 8 * 1024 * 1024,
            cutover_attempts: 3,
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
