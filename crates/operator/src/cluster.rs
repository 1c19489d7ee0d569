//! Reading and writing Kubernetes objects for the reconcile: the dereference step, and the
//! small write helpers the apply step is made of.

use std::collections::BTreeMap;
use std::fmt::Debug;

use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::{ListParams, Patch, PostParams};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;

use crate::crd::PostgresUpgrade;
use crate::error::Result;
use crate::names::Names;
use crate::router::patch_params;
use crate::validate::Inputs;

/// Reads what the upgrade refers to (absent objects are `None`: validate says what to fix).
pub async fn dereference(client: &Client, upgrade: &PostgresUpgrade) -> Result<Inputs> {
    let namespace = upgrade.metadata.namespace.as_deref().unwrap_or("default");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let names = Names::new(upgrade.metadata.name.as_deref().unwrap_or_default());
    let source_service = match &upgrade.spec.source.service {
        Some(service) => services.get_opt(&service.name).await?,
        None => None,
    };
    Ok(Inputs {
        credentials: secrets
            .get_opt(&upgrade.spec.source.credentials_secret)
            .await?,
        source_service,
        client_service: services.get_opt(&upgrade.spec.traffic.service).await?,
        target_service: services.get_opt(&names.target()).await?,
    })
}

/// Server-side apply: pgshift owns the fields it sets.
pub async fn apply<K>(api: &Api<K>, object: &K) -> Result<K>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = object.meta().name.clone().expect("built objects are named");
    Ok(api
        .patch(&name, &patch_params(), &Patch::Apply(object))
        .await?)
}

/// Server-side apply of an object the upgrade owns, unless it exists and was released (no
/// longer owned by the upgrade, see [`release`]): after completion the new server is the
/// user's. Owning it again would let deleting the upgrade garbage-collect it.
pub async fn apply_unless_released<K>(api: &Api<K>, object: &K) -> Result<K>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = object.meta().name.clone().expect("built objects are named");
    let owner = |o: &K| -> Vec<String> {
        o.meta()
            .owner_references
            .iter()
            .flatten()
            .map(|r| r.uid.clone())
            .collect()
    };
    if let Some(existing) = api.get_opt(&name).await? {
        let ours = owner(object);
        if !owner(&existing).iter().any(|uid| ours.contains(uid)) {
            return Ok(existing);
        }
    }
    apply(api, object).await
}

/// Creates the object unless one of that name exists; an existing one is returned as it is
/// (generated passwords are never rewritten, a flipped route is never flipped back).
pub async fn create_if_absent<K>(api: &Api<K>, object: &K) -> Result<K>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = object.meta().name.clone().expect("built objects are named");
    if let Some(existing) = api.get_opt(&name).await? {
        return Ok(existing);
    }
    match api.create(&PostParams::default(), object).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(api.get(&name).await?),
        Err(e) => Err(e.into()),
    }
}

/// A Secret's value as text.
pub fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

/// Ready, running pods that match `selector`, with their IPs.
pub async fn ready_pod_ips(
    client: &Client,
    namespace: &str,
    selector: &BTreeMap<String, String>,
) -> Result<Vec<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let label_selector = selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let list = pods
        .list(&ListParams::default().labels(&label_selector))
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter(|pod| {
            pod.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .filter_map(|pod| pod.status?.pod_ip)
        .collect())
}

/// Drops an object's owner references: it outlives the upgrade (the new server after
/// completion). Absent objects are fine.
pub async fn release<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
{
    if api.get_opt(name).await?.is_none() {
        return Ok(());
    }
    let patch = json!({"metadata": {"ownerReferences": null}});
    api.patch(name, &Default::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}
