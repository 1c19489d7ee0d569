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

pub use cluster::{kube_bin_dir, KUBE_BIN_ENV, KUBE_VERSION};
pub use error::{Error, Result};
pub use kube_cluster::KubeCluster;
pub use kubelet::NODE_NAME;
pub use process::POD_USER;
pub use provisioner::STORAGE_CLASS;
