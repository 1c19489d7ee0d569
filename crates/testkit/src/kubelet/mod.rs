//! The process kubelet: a Node that runs the pods bound to it as local processes.
//!
//! It registers the Node, keeps its Lease renewed (else the node lifecycle controller would
//! taint it and evict its pods), watches the pods bound to it and gives each a worker
//! ([`pod::run`]) that prepares its volumes, runs its containers, probes them and reports the
//! pod's status, and on deletion stops them (gracefully, then forcibly) and removes the pod.

mod image;
mod launcher;
mod node;
mod pod;
mod probe;
mod status;
mod volumes;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::error::Error;
use crate::error::Result;
use crate::net::Subnets;
use crate::process::{Process, POD_USER};

pub(crate) use node::is_schedulable;

/// The name of the one Node.
pub const NODE_NAME: &str = "pgshift-node";

/// What every pod worker shares.
pub(crate) struct Ctx {
    pub(crate) client: kube::Client,
    pub(crate) subnets: Arc<Subnets>,
    /// `<work>/pods`: one short-named directory per pod (unix socket paths must stay short).
    pub(crate) pods_dir: PathBuf,
    /// `<work>/logs/pods`: each container's output, kept after the pod is gone.
    pub(crate) logs_dir: PathBuf,
    /// [`POD_USER`] as root, else the current user (the lab's rule for its servers).
    pub(crate) run_as: pgshift_lab::Identity,
    /// The PostgreSQL binaries, or why they cannot be used.
    pub(crate) binaries: std::result::Result<pgshift_lab::Binaries, String>,
    pub(crate) processes: Arc<ProcessTable>,
    next_pod_dir: AtomicU32,
}

impl Ctx {
    pub(crate) fn new(
        client: kube::Client,
        subnets: Arc<Subnets>,
        work: &std::path::Path,
        processes: Arc<ProcessTable>,
    ) -> Result<Ctx> {
        Ok(Ctx {
            client,
            subnets,
            pods_dir: work.join("pods"),
            logs_dir: work.join("logs").join("pods"),
            run_as: pgshift_lab::Identity::for_servers().map_err(|e| match e {
                pgshift_lab::Error::UserNotFound { .. } => Error::UserNotFound {
                    user: POD_USER.to_string(),
                },
                other => Error::io(
                    "cannot look up the pods' user",
                    std::io::Error::other(other.to_string()),
                ),
            })?,
            binaries: pgshift_lab::Binaries::locate().map_err(|e| e.to_string()),
            processes,
            next_pod_dir: AtomicU32::new(1),
        })
    }

    /// A fresh directory name for a pod.
    pub(crate) fn new_pod_dir(&self) -> PathBuf {
        let n = self.next_pod_dir.fetch_add(1, Ordering::Relaxed);
        self.pods_dir.join(n.to_string())
    }
}

/// Every process the kubelet started, so that the cluster can stop them all when dropped —
/// and refuse to start new ones after that.
#[derive(Default)]
pub(crate) struct ProcessTable {
    inner: Mutex<TableInner>,
}

#[derive(Default)]
struct TableInner {
    closed: bool,
    processes: Vec<(Weak<Process>, libc::c_int)>,
}

impl ProcessTable {
    /// Starts `cmd`; `stop_signal` is what asks it to stop (as an image's STOPSIGNAL).
    pub(crate) fn spawn(
        &self,
        cmd: std::process::Command,
        name: &str,
        stop_signal: libc::c_int,
    ) -> std::io::Result<Arc<Process>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.closed {
            return Err(std::io::Error::other("the cluster is shutting down"));
        }
        inner.processes.retain(|(p, _)| p.strong_count() > 0);
        let process = Arc::new(Process::spawn(cmd, name)?);
        inner
            .processes
            .push((Arc::downgrade(&process), stop_signal));
        Ok(process)
    }

    /// Pids of the processes still running.
    pub(crate) fn pids(&self) -> Vec<u32> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .processes
            .iter()
            .filter_map(|(p, _)| p.upgrade())
            .filter(|p| p.exit().is_none())
            .map(|p| p.pid())
            .collect()
    }

    /// Asks every process to stop, waits up to `grace` in all, then kills what is left.
    pub(crate) fn shutdown_blocking(&self, grace: Duration) {
        let processes: Vec<(Arc<Process>, libc::c_int)> = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.closed = true;
            inner
                .processes
                .drain(..)
                .filter_map(|(p, signal)| Some((p.upgrade()?, signal)))
                .collect()
        };
        for (process, signal) in &processes {
            process.signal(*signal);
        }
        let deadline = Instant::now() + grace;
        while processes.iter().any(|(p, _)| p.exit().is_none()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for (process, _) in &processes {
            process.kill_group();
        }
    }
}

/// Registers the node and runs the pods bound to it; never returns.
pub(crate) async fn run(ctx: Arc<Ctx>) {
    node::register(&ctx.client).await;
    let mut tasks = JoinSet::new();
    tasks.spawn(node::heartbeat(ctx.client.clone()));
    let mut workers: HashMap<String, watch::Sender<Option<Arc<Pod>>>> = HashMap::new();
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={NODE_NAME}"));
    crate::watch::follow(pods, config, |store| {
        while tasks.try_join_next().is_some() {}
        let current: HashMap<String, Arc<Pod>> = store
            .state()
            .into_iter()
            .filter_map(|pod| Some((pod.uid()?, pod)))
            .collect();
        // Pods gone from the API: their workers kill what still runs and end.
        workers.retain(|uid, tx| match current.get(uid) {
            Some(_) => true,
            None => {
                tx.send_replace(None);
                false
            }
        });
        for (uid, pod) in current {
            match workers.get(&uid) {
                Some(tx) => {
                    tx.send_replace(Some(pod));
                }
                None => {
                    tracing::info!(pod = %pod_key(&pod), "pod bound to the node");
                    let (tx, rx) = watch::channel(Some(pod));
                    tasks.spawn(pod::run(ctx.clone(), rx));
                    workers.insert(uid, tx);
                }
            }
        }
    })
    .await;
}

/// `namespace/name`, for logs.
pub(crate) fn pod_key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}
