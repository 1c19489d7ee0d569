//! The Node object: registration, heartbeats, readiness.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;

use super::NODE_NAME;
use crate::cluster::KUBE_VERSION;

/// How often the Lease is renewed (a real kubelet: every 10 s of a 40 s lease).
const HEARTBEAT: Duration = Duration::from_secs(10);

fn node_status() -> serde_json::Value {
    let now = Timestamp::now().to_string();
    let condition = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    // Generous capacity: the processes share one machine; scheduling is not what is tested.
    let capacity =
        json!({"cpu": "64", "memory": "256Gi", "pods": "250", "ephemeral-storage": "100Gi"});
    json!({
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": [
            condition("Ready", "True", "KubeletReady", "pgshift process kubelet is posting ready status"),
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory pressure"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "no PID pressure"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": NODE_NAME},
        ],
        "nodeInfo": {
            "machineID": "", "systemUUID": "", "bootID": "",
            "kernelVersion": "", "osImage": "pgshift process kubelet",
            "containerRuntimeVersion": "pgshift-process://1",
            "kubeletVersion": KUBE_VERSION, "kubeProxyVersion": KUBE_VERSION,
            "operatingSystem": "linux", "architecture": std::env::consts::ARCH,
        },
    })
}

/// Creates the Node (retrying until the API server accepts it) and posts its status.
pub(super) async fn register(client: &kube::Client) {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE_NAME, "labels": {
            "kubernetes.io/hostname": NODE_NAME,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": std::env::consts::ARCH,
        }},
    }))
    .expect("a valid Node");
    loop {
        let created = match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(e) => Err(e),
        };
        let posted = match created {
            Ok(()) => post_status(&nodes).await,
            Err(e) => Err(e),
        };
        match posted {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "cannot register the node; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    tracing::info!(node = NODE_NAME, "node registered");
}

async fn post_status(nodes: &Api<Node>) -> kube::Result<()> {
    let patch = json!({"status": node_status()});
    nodes
        .patch_status(NODE_NAME, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
}

/// Renews the node's Lease and status forever.
pub(super) async fn heartbeat(client: kube::Client) {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    loop {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(NODE_NAME.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(NODE_NAME.into()),
                lease_duration_seconds: Some(40),
                renew_time: Some(MicroTime(Timestamp::now())),
                ..Default::default()
            }),
        };
        let params = PatchParams::apply("pgshift-kubelet").force();
        if let Err(e) = leases
            .patch(NODE_NAME, &params, &Patch::Apply(&lease))
            .await
        {
            tracing::warn!(error = %e, "cannot renew the node lease");
        }
        if let Err(e) = post_status(&nodes).await {
            tracing::warn!(error = %e, "cannot post the node status");
        }
        tokio::time::sleep(HEARTBEAT).await;
    }
}

/// True once the node is registered, Ready and free of taints — i.e. once the node lifecycle
/// controller has removed the `not-ready` taint the API server puts on every new node.
pub(crate) async fn is_schedulable(client: &kube::Client) -> bool {
    let nodes: Api<Node> = Api::all(client.clone());
    let Ok(Some(node)) = nodes.get_opt(NODE_NAME).await else {
        return false;
    };
    let untainted = node
        .spec
        .as_ref()
        .and_then(|spec| spec.taints.as_ref())
        .is_none_or(|taints| taints.is_empty());
    let ready = node
        .status
        .and_then(|status| status.conditions)
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    untainted && ready
}
