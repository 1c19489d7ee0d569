//! The operator's Helm chart (`deploy/helm/pgshift`) for tests: the helm binary that
//! `tools/helm/build.sh` caches, `helm template` parsed into JSON values, and the chart's RBAC
//! installed into a real cluster so that a test can act as the operator's service account.
//!
//! Include it with `#[path = "support/chart.rs"] mod chart;`.
#![allow(dead_code)] // Each test target uses a different part.

use std::path::{Path, PathBuf};
use std::process::Command;

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde::Deserialize;
use serde_json::Value;

/// The helm release `tools/helm/build.sh` builds.
pub const HELM_VERSION: &str = "v3.22.0";

/// The directory `tools/helm/build.sh` prints on its last line; overrides the cache lookup.
pub const HELM_BIN_ENV: &str = "PGSHIFT_HELM_BIN";

/// Field manager for everything the tests apply.
pub const FIELD_MANAGER: &str = "pgshift-tests";

/// The kinds [`install_rbac`] applies; everything else in the chart is left out.
const RBAC_KINDS: &[&str] = &[
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
];

/// The chart's directory in the repository.
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/helm/pgshift")
}

/// The cached helm binary (`$PGSHIFT_HELM_BIN/helm`, else `<cache>/helm/<version>/bin/helm`
/// with the cache directory chosen as tools/helm/build.sh chooses it).
pub fn helm() -> PathBuf {
    let dir = match std::env::var_os(HELM_BIN_ENV).filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => pgshift_testkit::cache_dir()
            .join("helm")
            .join(HELM_VERSION)
            .join("bin"),
    };
    let helm = dir.join("helm");
    assert!(
        helm.is_file(),
        "helm not found at {}: run `cargo xtask test` (it builds helm)",
        helm.display()
    );
    helm
}

/// A helm command that neither reads nor writes the user's helm or kube configuration.
pub fn helm_command() -> Command {
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("helm-home");
    let mut cmd = Command::new(helm());
    cmd.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env_remove("KUBECONFIG")
        .env_remove("HELM_NAMESPACE")
        .env_remove("HELM_KUBECONTEXT");
    cmd
}

/// `helm template <release> <chart> --namespace <namespace> --set k=v...`, or helm's error.
pub fn try_render(
    release: &str,
    namespace: &str,
    values: &[(&str, &str)],
) -> Result<Vec<Value>, String> {
    let mut cmd = helm_command();
    cmd.arg("template")
        .arg(release)
        .arg(chart_dir())
        .args(["--namespace", namespace]);
    for (key, value) in values {
        // --set types the value as helm does on the command line: 1 is a number, true a bool.
        cmd.arg("--set").arg(format!("{key}={value}"));
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", helm().display()));
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).expect("helm prints UTF-8");
    Ok(parse_documents(&text))
}

/// The chart rendered by `helm template`, one JSON value per non-empty document.
pub fn render(release: &str, namespace: &str, values: &[(&str, &str)]) -> Vec<Value> {
    try_render(release, namespace, values)
        .unwrap_or_else(|e| panic!("helm template {release} failed: {e}"))
}

/// Multi-document YAML as JSON values; empty documents (only comments, or none) are skipped.
pub fn parse_documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("bad YAML from helm: {e}")))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The rendered object of `kind` named `name`; panics (listing what there is) if absent.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the chart; it has {:?}", kinds(docs)))
}

/// `(kind, name, namespace)` of every rendered object; namespace "" for cluster-scoped ones.
pub fn kinds(docs: &[Value]) -> Vec<(String, String, String)> {
    docs.iter()
        .map(|d| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (
                s(&d["kind"]),
                s(&d["metadata"]["name"]),
                s(&d["metadata"]["namespace"]),
            )
        })
        .collect()
}

/// Applies the chart's ServiceAccount, (Cluster)Roles and bindings for a release named
/// `pgshift` in `namespace` (created if missing), with server-side apply. Returns the user name
/// that impersonates the service account: `system:serviceaccount:<namespace>:<name>`.
pub async fn install_rbac(client: kube::Client, namespace: &str) -> String {
    install_rbac_with(client, "pgshift", namespace, &[]).await
}

/// [`install_rbac`] for any release name and values (`watchNamespace`, say).
pub async fn install_rbac_with(
    client: kube::Client,
    release: &str,
    namespace: &str,
    values: &[(&str, &str)],
) -> String {
    let docs = render(release, namespace, values);
    // The namespaces the objects live in (release and, if set, watch namespace) come first.
    let mut namespaces: Vec<&str> = vec![namespace];
    for doc in &docs {
        if let Some(ns) = doc["metadata"]["namespace"].as_str() {
            if !namespaces.contains(&ns) {
                namespaces.push(ns);
            }
        }
    }
    for ns in namespaces {
        let object = serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns},
        });
        apply(&client, object).await;
    }

    let mut user = None;
    for doc in docs {
        let kind = doc["kind"].as_str().unwrap_or_default();
        if !RBAC_KINDS.contains(&kind) {
            continue;
        }
        if kind == "ServiceAccount" {
            let (ns, name) = (&doc["metadata"]["namespace"], &doc["metadata"]["name"]);
            user = Some(format!(
                "system:serviceaccount:{}:{}",
                ns.as_str().expect("a namespaced ServiceAccount"),
                name.as_str().expect("a named ServiceAccount"),
            ));
        }
        apply(&client, doc).await;
    }
    user.expect("the chart renders a ServiceAccount")
}

/// Server-side applies one rendered object (cluster-scoped unless it names a namespace).
pub async fn apply(client: &kube::Client, object: Value) {
    let (group, version) = match object["apiVersion"].as_str().expect("an apiVersion") {
        gv if gv.contains('/') => gv.split_once('/').expect("checked"),
        v => ("", v),
    };
    let kind = object["kind"].as_str().expect("a kind");
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    let object: DynamicObject = serde_json::from_value(object.clone())
        .unwrap_or_else(|e| panic!("not a Kubernetes object ({e}): {object}"));
    let name = object.metadata.name.clone().expect("a named object");
    let api: Api<DynamicObject> = match &object.metadata.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&object),
    )
    .await
    .unwrap_or_else(|e| panic!("cannot apply {kind} {name}: {e}"));
}
