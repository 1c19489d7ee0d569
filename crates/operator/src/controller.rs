//! `pgshift operator`: leader election, the metrics and health server, and the controller
//! loop over `PostgresUpgrade` resources and the objects they own.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{watcher, Controller};
use kube::{Api, Client};

use crate::crd::PostgresUpgrade;
use crate::leader::{self, LeaseConfig};
use crate::metrics::{self, Metrics, Readiness};
use crate::names::{FIELD_MANAGER, MANAGED_BY};
use crate::reconcile::{error_policy, reconcile, Context};

#[derive(Debug, Clone)]
pub struct Options {
    /// Watch only this namespace; every namespace when `None`.
    pub watch_namespace: Option<String>,
    pub metrics_addr: SocketAddr,
    pub lease: LeaseConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error(transparent)]
    Leader(#[from] leader::LeaderError),
    #[error(transparent)]
    Metrics(#[from] metrics::ServeError),
    #[error("lost the leader lease ({0}); exiting so that no two replicas act at once")]
    LostLease(leader::Lost),
}

/// Runs until SIGTERM/SIGINT (then releases the lease, so a standby takes over at once) or
/// until the lease is lost (then returns at once: another replica may be acting).
pub async fn run(client: Client, options: Options) -> Result<(), OperatorError> {
    let metrics = Metrics::new();
    // Ready means alive and in contact with the API server; a standby is ready too, so that a
    // rolling update of the operator never waits for a lease it cannot get.
    let readiness = Readiness::new("waiting for the leader lease");
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(metrics::serve(
        options.metrics_addr,
        metrics.clone(),
        readiness.clone(),
        async {
            let _ = server_stopped.await;
        },
    ));
    readiness.set_ready();
    let leadership = tokio::select! {
        held = leader::hold(client.clone(), options.lease.clone()) => held?,
        _ = shutdown_signal() => {
            let _ = stop_server.send(());
            return Ok(());
        }
    };
    tracing::info!(identity = %leadership.identity(), "leading: reconciling PostgresUpgrades");

    let upgrades: Api<PostgresUpgrade> = scoped(&client, &options.watch_namespace);
    let owned = watcher::Config::default().labels(&format!("{MANAGED_BY}=pgshift"));
    let context = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(options.lease.identity.clone()),
            },
        ),
        metrics,
    });
    let controller = Controller::new(upgrades, watcher::Config::default())
        .owns(
            scoped::<StatefulSet>(&client, &options.watch_namespace),
            owned.clone(),
        )
        .owns(
            scoped::<Deployment>(&client, &options.watch_namespace),
            owned.clone(),
        )
        .owns(scoped::<Job>(&client, &options.watch_namespace), owned)
        // On SIGTERM, reconciles in flight finish (a cutover is not cut short) before the
        // lease is released.
        .graceful_shutdown_on(shutdown_signal())
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!("reconcile: {error}");
            }
        });
    // A lost lease stops everything at once: dropping the controller drops the reconciles in
    // flight at their next await, before another replica may start acting. A fence it held
    // is recovered by the next leader, as after a crash.
    let outcome = tokio::select! {
        () = controller => Ok(()),
        lost = leadership.lost() => Err(OperatorError::LostLease(lost)),
    };
    let _ = stop_server.send(());
    let _ = server.await;
    outcome?;
    leadership.release().await?;
    Ok(())
}

fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler can be installed");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
