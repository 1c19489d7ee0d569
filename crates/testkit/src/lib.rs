//! pgshift's Kubernetes test kit: a real control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler built from their Go modules by
//! `tools/kube/build.sh`) on loopback, with a process kubelet that runs PostgreSQL and PgBouncer
//! pods as local processes, a local volume provisioner and a service proxy.
//!
//! Test-only. See `docs/testing.md` for what is real and what is stood in for.
//!
//! [`KubeCluster::start`] starts everything on loopback and returns once the cluster can run
//! pods; [`KubeCluster::client`] is an admin client and [`KubeCluster::kubeconfig`] a kubeconfig
//! file. Pods get loopback pod IPs and listen there; Services are reached at their ClusterIPs,
//! which are loopback addresses too. Dropping the cluster — or the test process dying — stops
//! every process it started.

mod cluster;
mod error;
mod kube_cluster;
mod kubelet;
mod net;
mod pki;
mod process;
mod provisioner;
mod proxy;
mod watch;

pub use cluster::{cache_dir, kube_bin_dir, KUBE_BIN_ENV, KUBE_VERSION};
pub use error::{Error, Result};
pub use kube_cluster::{init_test_tracing, KubeCluster};
pub use kubelet::NODE_NAME;
pub use process::POD_USER;
pub use provisioner::STORAGE_CLASS;

/// Polls `check` every 250 ms until it returns `Some`, and panics naming `what` after
/// `timeout`: tests wait for the cluster's controllers this way.
pub async fn eventually<T, F, Fut>(what: &str, timeout: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}
