//! [`KubeCluster`]: the control plane plus the process kubelet, the volume provisioner and the
//! service proxy, all owned by one value that stops everything when dropped.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};

use crate::cluster::ControlPlane;
use crate::error::{Error, Result};
use crate::kubelet::{self, ProcessTable};
use crate::{provisioner, proxy};

/// A real Kubernetes control plane on loopback with a process kubelet, a local volume
/// provisioner and a service proxy.
///
/// Every process it starts is stopped when it is dropped, and killed by the kernel if the test
/// process dies first. Its working directory (certificates, etcd data, logs, volumes) is removed
/// on drop — unless the thread is panicking (a failed test), when it is kept and its path
/// printed so the components' logs can be read.
///
/// The [`kube::Client`] it hands out, and its background tasks, belong to the tokio runtime that
/// called [`KubeCluster::start`]: use the cluster from that runtime (one per test).
pub struct KubeCluster {
    client: kube::Client,
    /// Pod processes; stopped first on drop.
    pods: Arc<ProcessTable>,
    /// The kubelet, provisioner and service proxy.
    tasks: Vec<JoinHandle<()>>,
    control_plane: Option<ControlPlane>,
    work: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for KubeCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeCluster")
            .field("server", &self.server())
            .field("work_dir", &self.work_dir())
            .finish_non_exhaustive()
    }
}

/// Logs the test kit (and pgshift's operator) to the running test's output; `RUST_LOG`
/// overrides the filter. Later calls do nothing.
pub fn init_test_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "pgshift_testkit=info,pgshift_operator=info".into()),
        )
        .with_test_writer()
        .try_init();
}

impl KubeCluster {
    /// Starts a cluster and waits until it is ready: the API server answers `/readyz`, the
    /// controller manager and scheduler answer `/healthz`, namespace `default` has its service
    /// account.
    pub async fn start() -> Result<KubeCluster> {
        let started = Instant::now();
        let work = tempfile::Builder::new()
            .prefix("pgshift-kube-")
            .tempdir()
            .map_err(|e| Error::io("cannot create the cluster's working directory", e))?;
        // Pod processes run unprivileged and must be able to reach their directories inside.
        fs::set_permissions(work.path(), fs::Permissions::from_mode(0o755))
            .map_err(|e| Error::io(format!("cannot chmod {}", work.path().display()), e))?;
        let (control_plane, client) = ControlPlane::start(work.path()).await?;
        let pods = Arc::new(ProcessTable::default());
        let mut cluster = KubeCluster {
            client: client.clone(),
            pods: pods.clone(),
            tasks: Vec::new(),
            control_plane: Some(control_plane),
            work: Some(work),
        };
        let cp = cluster.cp();
        let ctx = kubelet::Ctx::new(client.clone(), cp.subnets.clone(), &cp.work, pods)?;
        provisioner::create_storage_class(&client)
            .await
            .map_err(|e| Error::kube("cannot create the default StorageClass", e))?;
        let volumes = cp.work.join("volumes");
        cluster.tasks = vec![
            tokio::spawn(kubelet::run(Arc::new(ctx))),
            tokio::spawn(provisioner::run(client.clone(), volumes)),
            tokio::spawn(proxy::run(client.clone())),
        ];
        cluster
            .cp()
            .wait_until(
                &format!("node {} to be Ready and untainted", kubelet::NODE_NAME),
                || kubelet::is_schedulable(&client),
            )
            .await?;
        tracing::info!(elapsed = ?started.elapsed(), server = %cluster.server(), "cluster ready");
        Ok(cluster)
    }

    /// For tests: [`init_test_tracing`], then a cluster; panics with the reason when it cannot
    /// start.
    pub async fn start_for_test() -> KubeCluster {
        init_test_tracing();
        let started = Instant::now();
        let cluster = KubeCluster::start().await.unwrap_or_else(|e| panic!("{e}"));
        eprintln!("cluster started in {:.1?}", started.elapsed());
        cluster
    }

    /// Creates a CustomResourceDefinition and waits until the API server serves it.
    pub async fn install_crd(&self, crd: &CustomResourceDefinition) -> Result<()> {
        let crds: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        crds.create(&PostParams::default(), crd)
            .await
            .map_err(|e| Error::kube("cannot create the CustomResourceDefinition", e))?;
        let name = crd.metadata.name.clone().unwrap_or_default();
        self.cp()
            .wait_until(&format!("CRD {name} to be established"), || async {
                crds.get(&name)
                    .await
                    .ok()
                    .and_then(|crd| crd.status?.conditions)
                    .is_some_and(|conditions| {
                        conditions
                            .iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    })
            })
            .await
    }

    /// A client authenticated as the cluster admin (group `system:masters`).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The API server's URL (`https://127.0.0.1:<port>`).
    pub fn server(&self) -> &str {
        &self.cp().server
    }

    /// A kubeconfig file for the admin, usable by kubectl or any client.
    pub fn kubeconfig(&self) -> &Path {
        &self.cp().kubeconfig
    }

    /// The cluster's working directory; `logs/` in it holds every component's output.
    pub fn work_dir(&self) -> &Path {
        &self.cp().work
    }

    /// The ClusterIP range: a loopback /16 of this cluster's own.
    pub fn service_cidr(&self) -> String {
        self.cp().subnets.service_cidr()
    }

    /// Pids of every process the cluster runs now (control plane and pods).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = self.cp().pids();
        pids.extend(self.pods.pids());
        pids
    }

    fn cp(&self) -> &ControlPlane {
        self.control_plane
            .as_ref()
            .expect("the control plane lives until drop")
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        let started = Instant::now();
        // Pods first (while the API server is still up, nothing depends on it), then the
        // background tasks, then the control plane.
        self.pods.shutdown_blocking(Duration::from_secs(10));
        for task in &self.tasks {
            task.abort();
        }
        drop(self.control_plane.take());
        if let Some(work) = self.work.take() {
            if std::thread::panicking() {
                let kept: PathBuf = work.keep();
                eprintln!(
                    "pgshift-testkit: kept the cluster's files in {}",
                    kept.display()
                );
            }
        }
        tracing::info!(elapsed = ?started.elapsed(), "cluster stopped");
    }
}
