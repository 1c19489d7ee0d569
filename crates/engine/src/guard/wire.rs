//! What the worker and the guard say to each other over the guard's stdin and stdout, one JSON
//! object a line. The first line to the guard is its configuration, passwords included: a pipe
//! between two processes of the same user is the one place they may travel.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::endpoint::{Endpoint, Secret};
use crate::error::Side;
use crate::pgbouncer::PgbouncerTarget;
use crate::plan::{Databases, Plan, Traffic};
use crate::tls::TlsSettings;

/// Everything the guard needs to release clients in the worker's place.
#[derive(Serialize, Deserialize)]
pub(super) struct Config {
    pub worker_pid: u32,
    pub max_pause_ms: u64,
    pub source: WireEndpoint,
    pub target: WireEndpoint,
    pub databases: Vec<String>,
    /// Every PgBouncer of the fleet (none in direct mode).
    pub pgbouncer: Vec<WirePgbouncer>,
    /// The worker's server sessions, ended before the guard acts: a statement the dead worker
    /// sent may still be running, and must not commit after the guard looked.
    pub worker_source_pids: Vec<i32>,
    pub worker_target_pids: Vec<i32>,
}

impl Config {
    pub fn max_pause(&self) -> Duration {
        Duration::from_millis(self.max_pause_ms)
    }

    /// The plan the guard's own engine runs with: the worker's servers, databases and traffic.
    pub fn plan(&self) -> Plan {
        let mut plan = Plan::new(self.source.endpoint(), self.target.endpoint());
        plan.databases = Databases::Named(self.databases.clone());
        plan.max_pause = self.max_pause();
        plan.command = "fence guard".into();
        if !self.pgbouncer.is_empty() {
            plan.traffic = Traffic::Pgbouncer(
                self.pgbouncer
                    .iter()
                    .map(|bouncer| PgbouncerTarget {
                        admin: bouncer.admin.endpoint(),
                        config_path: bouncer.config_path.clone(),
                        entries: bouncer.entries.clone(),
                        source_address: bouncer.source_address.clone(),
                        target_address: bouncer.target_address.clone(),
                    })
                    .collect(),
            );
        }
        plan
    }
}

/// An [`Endpoint`] on the wire.
#[derive(Serialize, Deserialize)]
pub(super) struct WireEndpoint {
    side: Side,
    host: String,
    port: u16,
    user: String,
    dbname: String,
    password: Option<String>,
    connect_timeout_ms: u64,
    /// File paths, not their contents: the guard reads them as the worker did.
    tls: TlsSettings,
}

impl From<&Endpoint> for WireEndpoint {
    fn from(e: &Endpoint) -> Self {
        WireEndpoint {
            side: e.side,
            host: e.host.clone(),
            port: e.port,
            user: e.user.clone(),
            dbname: e.dbname.clone(),
            password: e.password.as_ref().map(|p| p.expose().to_string()),
            connect_timeout_ms: e.connect_timeout.as_millis() as u64,
            tls: e.tls.clone(),
        }
    }
}

impl WireEndpoint {
    fn endpoint(&self) -> Endpoint {
        let mut endpoint = Endpoint::new(
            self.side,
            &self.host,
            self.port,
            &self.user,
            &self.dbname,
            self.password.clone().map(Secret::new),
        );
        endpoint.connect_timeout = Duration::from_millis(self.connect_timeout_ms);
        endpoint.tls = self.tls.clone();
        endpoint
    }
}

/// A [`PgbouncerTarget`] on the wire.
#[derive(Serialize, Deserialize)]
pub(super) struct WirePgbouncer {
    admin: WireEndpoint,
    config_path: PathBuf,
    entries: Vec<String>,
    source_address: Option<(String, u16)>,
    target_address: Option<(String, u16)>,
}

impl From<&PgbouncerTarget> for WirePgbouncer {
    fn from(t: &PgbouncerTarget) -> Self {
        WirePgbouncer {
            admin: (&t.admin).into(),
            config_path: t.config_path.clone(),
            entries: t.entries.clone(),
            source_address: t.source_address.clone(),
            target_address: t.target_address.clone(),
        }
    }
}

/// From the worker, after the configuration.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum ToGuard {
    /// The fence is about to be raised: from now on the guard acts if the worker goes.
    Armed,
    /// Clients are released (switched or fence lifted): the guard's work is done.
    Released,
}

/// From the guard, once.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum FromGuard {
    /// Connected, fence lock held; these are its sessions on each server, which direct
    /// mode's fence must not end.
    Ready {
        source_pids: Vec<i32>,
        target_pids: Vec<i32>,
    },
    /// It could not get ready: the worker must not raise the fence.
    Failed { message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_crosses_the_pipe_with_its_tls_settings() {
        let mut endpoint = Endpoint::new(
            Side::Target,
            "db",
            5433,
            "postgres",
            "app",
            Some(Secret::new("pw")),
        );
        endpoint.tls = TlsSettings::parse_conninfo(
            "sslmode=verify-full sslrootcert=/ca.pem sslcert=/c.crt sslkey=/c.key",
        )
        .unwrap();
        let line = serde_json::to_string(&WireEndpoint::from(&endpoint)).unwrap();
        assert!(line.contains(r#""mode":"verify-full""#), "{line}");
        let received: WireEndpoint = serde_json::from_str(&line).unwrap();
        assert_eq!(received.endpoint(), endpoint);
    }
}
