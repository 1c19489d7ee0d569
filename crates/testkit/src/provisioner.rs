//! A local volume provisioner: the default StorageClass, and for each claim of it a
//! PersistentVolume that is a directory under the cluster's `volumes/`, pre-bound to the claim
//! (the controller manager's PV controller completes the binding). The directory outlives pods,
//! so a pod recreated with the same claim finds its data. Released volumes with reclaim policy
//! Delete are removed, directory and all.

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;

/// The default StorageClass of the cluster.
pub const STORAGE_CLASS: &str = "pgshift-local";
/// Its provisioner name.
const PROVISIONER: &str = "pgshift.dev/local-directory";

/// Creates the StorageClass; the provisioner itself is [`run`].
pub(crate) async fn create_storage_class(client: &kube::Client) -> kube::Result<()> {
    let classes: Api<StorageClass> = Api::all(client.clone());
    let class: StorageClass = serde_json::from_value(json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": STORAGE_CLASS, "annotations": {
            "storageclass.kubernetes.io/is-default-class": "true"}},
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    }))
    .expect("a valid StorageClass");
    match classes.create(&PostParams::default(), &class).await {
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        other => other.map(drop),
    }
}

/// Provisions and deletes volumes forever. The watches only trigger a reconciliation, which
/// reads the current claims and volumes (few, in a test cluster).
pub(crate) async fn run(client: kube::Client, volumes_dir: PathBuf) {
    let changed = Arc::new(Notify::new());
    let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let follow_claims =
        crate::watch::follow(claims, watcher::Config::default(), |_| changed.notify_one());
    let follow_pvs =
        crate::watch::follow(pvs, watcher::Config::default(), |_| changed.notify_one());
    let reconcile = async {
        loop {
            changed.notified().await;
            reconcile(&client, &volumes_dir).await;
        }
    };
    tokio::join!(follow_claims, follow_pvs, reconcile);
}

async fn reconcile(client: &kube::Client, volumes_dir: &std::path::Path) {
    let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let (Ok(claims), Ok(volumes)) = (
        claims.list(&Default::default()).await,
        pvs.list(&Default::default()).await,
    ) else {
        return;
    };
    for claim in claims {
        let spec = claim.spec.clone().unwrap_or_default();
        let ours = spec.storage_class_name.as_deref() == Some(STORAGE_CLASS);
        if !ours || spec.volume_name.is_some() || claim.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = format!("pvc-{}", claim.uid().unwrap_or_default());
        if volumes.iter().any(|pv| pv.name_any() == name) {
            continue;
        }
        if let Err(e) = provision(&pvs, &claim, &name, volumes_dir).await {
            tracing::warn!(claim = %claim.name_any(), error = %e, "cannot provision a volume");
        }
    }
    for pv in volumes {
        let ours = pv
            .annotations()
            .get("pv.kubernetes.io/provisioned-by")
            .map(String::as_str)
            == Some(PROVISIONER);
        let spec = pv.spec.clone().unwrap_or_default();
        let released = pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released");
        if !ours || !released || spec.persistent_volume_reclaim_policy.as_deref() != Some("Delete")
        {
            continue;
        }
        if let Some(path) = spec.host_path.map(|h| h.path) {
            if let Err(e) = fs::remove_dir_all(&path) {
                tracing::warn!(%path, error = %e, "cannot remove a released volume's directory");
            }
        }
        match pvs.delete(&pv.name_any(), &DeleteParams::default()).await {
            Ok(_) => tracing::info!(volume = %pv.name_any(), "released volume deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                tracing::warn!(volume = %pv.name_any(), error = %e, "cannot delete a released volume")
            }
        }
    }
}

async fn provision(
    pvs: &Api<PersistentVolume>,
    claim: &PersistentVolumeClaim,
    name: &str,
    volumes_dir: &std::path::Path,
) -> Result<(), String> {
    let dir = volumes_dir.join(name);
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let spec = claim.spec.clone().unwrap_or_default();
    let size = spec
        .resources
        .and_then(|r| r.requests)
        .and_then(|r| r.get("storage").cloned())
        .map(|q| q.0)
        .unwrap_or_else(|| "1Gi".into());
    let pv: PersistentVolume = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": spec.access_modes.unwrap_or_else(|| vec!["ReadWriteOnce".into()]),
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": STORAGE_CLASS,
            "volumeMode": "Filesystem",
            "hostPath": {"path": dir, "type": "Directory"},
            "claimRef": {
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "namespace": claim.namespace(), "name": claim.name_any(), "uid": claim.uid(),
            },
        },
    }))
    .map_err(|e| e.to_string())?;
    match pvs.create(&PostParams::default(), &pv).await {
        Ok(_) => {
            tracing::info!(claim = %claim.name_any(), volume = name, dir = %dir.display(), "volume provisioned");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}
