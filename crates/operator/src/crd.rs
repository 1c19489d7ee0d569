//! The `PostgresUpgrade` custom resource (group `pgshift.io`, version `v1alpha1`).
//!
//! The schema carries the validation the API server can do itself (types, enums, ranges, CEL
//! rules with messages that say what to fix); what needs other objects (does the Secret exist,
//! does the Service select pods?) is checked by the operator's `validate` step.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

// One `printcolumn` per column: kube-derive takes them as repeated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "pgshift.io",
    version = "v1alpha1",
    kind = "PostgresUpgrade",
    namespaced,
    shortname = "pgu",
    status = "PostgresUpgradeStatus",
    doc = "Moves a live PostgreSQL to a new major version: a blue-green upgrade over logical replication with a millisecond write pause.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Source", type_ = "string", json_path = ".status.sourceVersion"),
    printcolumn(name = "Target", type_ = "string", json_path = ".status.targetVersion"),
    printcolumn(name = "Tables", type_ = "string", json_path = ".status.tables"),
    printcolumn(name = "Lag", type_ = "string", json_path = ".status.lag"),
    printcolumn(name = "Pause", type_ = "string", json_path = ".status.cutover.pause"),
    printcolumn(
        name = "Window Ends",
        type_ = "string",
        json_path = ".status.rollback.windowEnds"
    ),
    printcolumn(name = "Direction", type_ = "string", json_path = ".status.direction"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PostgresUpgradeSpec {
    /// The running server to upgrade.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.source cannot change once the upgrade exists: delete this PostgresUpgrade (that aborts it cleanly) and create a new one"))]
    pub source: Source,
    /// The new-version server pgshift provisions.
    #[x_kube(validation = Rule::new("self.image == oldSelf.image").message("spec.target.image cannot change once the upgrade exists: delete this PostgresUpgrade and create a new one"))]
    pub target: Target,
    /// How clients reach the database, and how they are moved.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.traffic cannot change once the upgrade exists (pgshift may already have put PgBouncer in front of the clients): delete this PostgresUpgrade and create a new one"))]
    pub traffic: Traffic,
    #[serde(default)]
    pub cutover: Cutover,
    #[serde(default)]
    pub rollback: Rollback,
    #[serde(default)]
    pub cleanup: Cleanup,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.host) != has(self.service)").message("set exactly one of spec.source.host and spec.source.service"))]
pub struct Source {
    /// A Service in this namespace that reaches the source server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    /// Or an address outside the cluster (a host name or IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub host: Option<String>,
    /// The port with `host` (default 5432).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Databases to move; every database that accepts connections when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.all(d, size(d) > 0 && size(d) <= 63)").message("database names are 1 to 63 characters"))]
    pub databases: Vec<String>,
    /// A Secret in this namespace with `username` and `password` of a superuser of the source.
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: String,
    /// The workload that runs the source (deleted after completion when `cleanup.deleteSource`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadRef>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRef {
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Default 5432.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
pub struct WorkloadRef {
    pub kind: WorkloadKind,
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum WorkloadKind {
    StatefulSet,
    Deployment,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// The PostgreSQL image of the new version, e.g. `postgres:18`.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    pub storage: Storage,
    /// CPU and memory of the target's container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// PostgreSQL settings (`-c name=value`); `wal_level` is always `logical`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = Rule::new("self.all(k, k.matches('^[a-z][a-z0-9_.]*$'))").message("parameter names are PostgreSQL setting names: lower case letters, digits, '_' and '.'"))]
    pub parameters: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    /// Size of the data volume, e.g. `10Gi`.
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(\\\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$')").message("storage.size is a quantity such as 10Gi or 500Mi"))]
    pub size: String,
    /// The StorageClass; the cluster's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Traffic {
    /// The Service in this namespace that clients connect to.
    #[schemars(length(min = 1, max = 63))]
    pub service: String,
    pub mode: TrafficMode,
    /// The PgBouncer pgshift runs in `PgBouncer` mode.
    #[serde(default)]
    pub pgbouncer: PgbouncerSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PgbouncerSpec {
    /// An image whose default command runs PgBouncer with `/etc/pgbouncer/pgbouncer.ini`.
    #[serde(default = "default_pgbouncer_image")]
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    #[serde(default = "default_pgbouncer_replicas")]
    #[schemars(range(min = 1, max = 10))]
    pub replicas: i32,
}

impl Default for PgbouncerSpec {
    fn default() -> Self {
        PgbouncerSpec {
            image: default_pgbouncer_image(),
            replicas: default_pgbouncer_replicas(),
        }
    }
}

fn default_pgbouncer_image() -> String {
    "edoburu/pgbouncer:v1.24.1-p1".into()
}

fn default_pgbouncer_replicas() -> i32 {
    2
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TrafficMode {
    /// pgshift runs PgBouncer (transaction pooling) behind the clients' Service and pauses it
    /// at cutover: clients see a short wait and no error.
    PgBouncer,
    /// pgshift flips the Service's selector to the target: clients see a short burst of
    /// errors (reported in status) and reconnect.
    Service,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Cutover {
    #[serde(default = "CutoverMode::automatic")]
    pub mode: CutoverMode,
    /// With `Manual`: the cutover starts once this is true (and the target is in sync).
    #[serde(default)]
    pub approved: bool,
    /// The longest write pause allowed; past it, before the switch, the attempt is undone and
    /// tried again later. A duration such as `2s` or `500ms`.
    #[serde(default = "default_max_pause")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(ms|s)$') && duration(self) >= duration('10ms') && duration(self) <= duration('60s')").message("maxPause is a duration between 10ms and 60s, such as 2s or 500ms"))]
    pub max_pause: String,
}

impl Default for Cutover {
    fn default() -> Self {
        Cutover {
            mode: CutoverMode::Automatic,
            approved: false,
            max_pause: default_max_pause(),
        }
    }
}

fn default_max_pause() -> String {
    "2s".into()
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum CutoverMode {
    Automatic,
    Manual,
}

impl CutoverMode {
    fn automatic() -> Self {
        CutoverMode::Automatic
    }
}

/// The way back: after the switch the old server follows the new one (reverse replication)
/// for `window`, and `requested: true` moves the clients back to it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(self.requested && self.window == '0')").message("spec.rollback.requested needs a rollback window, and spec.rollback.window is 0: set the window to a duration such as 24h before the switch, or set requested to false"))]
pub struct Rollback {
    /// How long after the switch the old server is kept current, so that clients can be moved
    /// back to it: a duration such as `24h`, `90m`, `1h30m` or `30s`; `0` switches without a
    /// window. At its end pgshift removes the replication objects (and deletes the source
    /// workload with `cleanup.deleteSource`) and the upgrade is Completed.
    #[serde(default = "default_window")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^(0|[0-9]+h([0-9]+m)?([0-9]+s)?|[0-9]+m([0-9]+s)?|[0-9]+s)$')").message("rollback.window is a duration such as 24h, 90m, 1h30m or 30s, or 0 for no rollback window"))]
    pub window: String,
    /// `true` while the window is open: clients go back to the source (the same fence, proof and
    /// budget as the cutover), and the target follows the source again. The upgrade stays
    /// RolledBack while this is true; set it to false to cut over again (per `cutover`), or
    /// delete the PostgresUpgrade to abort.
    #[serde(default)]
    pub requested: bool,
}

impl Default for Rollback {
    fn default() -> Self {
        Rollback {
            window: default_window(),
            requested: false,
        }
    }
}

/// A day of traffic on the new version (docs/kubernetes.md says why).
fn default_window() -> String {
    "24h".into()
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Cleanup {
    /// Delete `source.workload` once the upgrade is complete (its volumes are kept): at the end
    /// of the rollback window, not before.
    #[serde(default)]
    pub delete_source: bool,
}

/// Where an upgrade stands. Derived from the servers and the cluster on every reconcile.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    Pending,
    /// Preflight found something to fix first (see `blockers`); nothing was changed.
    Blocked,
    /// Creating the target server, and PgBouncer in front of the clients' Service.
    Provisioning,
    CopyingSchema,
    Replicating,
    CatchingUp,
    /// In sync; a manual cutover waits here for `spec.cutover.approved`.
    ReadyForCutover,
    CuttingOver,
    /// Switched: clients use the target, the source follows it until the window ends
    /// (`status.rollback.windowEnds`); `spec.rollback.requested: true` goes back.
    RollbackWindow,
    /// Moving clients back to the source (a rollback was requested).
    RollingBack,
    /// Clients use the source again and the target follows it; held here while
    /// `spec.rollback.requested` is true.
    RolledBack,
    Completed,
    /// Stopped on an error that needs a person (see the `Ready` condition's message).
    Failed,
    /// The resource is being deleted before completion: pgshift is removing its objects.
    Aborting,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Blocked => "Blocked",
            Phase::Provisioning => "Provisioning",
            Phase::CopyingSchema => "CopyingSchema",
            Phase::Replicating => "Replicating",
            Phase::CatchingUp => "CatchingUp",
            Phase::ReadyForCutover => "ReadyForCutover",
            Phase::CuttingOver => "CuttingOver",
            Phase::RollbackWindow => "RollbackWindow",
            Phase::RollingBack => "RollingBack",
            Phase::RolledBack => "RolledBack",
            Phase::Completed => "Completed",
            Phase::Failed => "Failed",
            Phase::Aborting => "Aborting",
        }
    }

    pub const ALL: [Phase; 14] = [
        Phase::Pending,
        Phase::Blocked,
        Phase::Provisioning,
        Phase::CopyingSchema,
        Phase::Replicating,
        Phase::CatchingUp,
        Phase::ReadyForCutover,
        Phase::CuttingOver,
        Phase::RollbackWindow,
        Phase::RollingBack,
        Phase::RolledBack,
        Phase::Completed,
        Phase::Failed,
        Phase::Aborting,
    ];
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresUpgradeStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// e.g. `15.18`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_version: Option<String>,
    /// Tables copied and in sync, over all databases: `ready/total`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables: Option<String>,
    /// Which way replication runs now: `Forward` (the target follows the source) before the
    /// switch and after a rollback, `Back` (the source follows the target) in the rollback window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    /// Replication lag of the server that follows (see `direction`), human-readable
    /// (`lagBytes` exact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub databases: Vec<DatabaseStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutover: Option<CutoverStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<RollbackStatus>,
    /// What stops the upgrade, each with its fix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blockers: Vec<Finding>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<Finding>,
    /// The objects pgshift made for the target (in this namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseStatus {
    pub name: String,
    /// The next step for this database, or `Synced` / `Switched`.
    pub step: String,
    pub tables_ready: i64,
    pub tables_total: i64,
    /// Replication errors the target has counted (PostgreSQL 15+): a rise means apply is
    /// failing, and the cause goes to the `Ready` condition.
    #[serde(default)]
    pub apply_errors: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CutoverStatus {
    /// The write pause of the cutover that completed, e.g. `31ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<f64>,
    /// Attempts so far, including aborted ones (an attempt aborts when it would exceed
    /// `maxPause`; clients then carry on with the server they were on).
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_abort_reason: Option<String>,
    /// `Service` mode: client sessions ended on the source (each such client saw an error and
    /// reconnected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions_ended: Option<i64>,
    pub sequences_synced: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RollbackStatus {
    /// When the rollback window ends (RFC 3339; the switch's time plus `spec.rollback.window`),
    /// or ended: then the replication objects are removed and the upgrade is Completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_ends: Option<String>,
    /// When the open rollback window opened (RFC 3339: the switch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_opened: Option<String>,
    /// The last rollback: its write pause, and attempts including aborted ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutover: Option<CutoverStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
pub struct Finding {
    pub code: String,
    pub object: String,
    pub problem: String,
    pub fix: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetStatus {
    pub stateful_set: String,
    pub service: String,
    /// The Secret with the target's superuser (`username`, `password`).
    pub secret: String,
}

/// The CRD as YAML, as `pgshift crd` prints it and `deploy/crds/` holds it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    format!(
        "# Generated by `pgshift crd`; do not edit.\n{}",
        serde_yaml::to_string(&PostgresUpgrade::crd()).expect("the CRD serializes")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn crd_has_the_short_name_status_and_columns() {
        let crd = serde_json::to_value(PostgresUpgrade::crd()).unwrap();
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "pgu");
        let version = &crd["spec"]["versions"][0];
        assert!(version["subresources"]["status"].is_object());
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            columns,
            [
                "Phase",
                "Source",
                "Target",
                "Tables",
                "Lag",
                "Pause",
                "Window Ends",
                "Direction",
                "Age"
            ]
        );
        let text = crd.to_string();
        assert!(text.contains("set exactly one of spec.source.host and spec.source.service"));
        assert!(text.contains("maxPause is a duration between 10ms and 60s"));
        assert!(text.contains("spec.traffic cannot change once the upgrade exists"));
        assert!(text.contains("rollback.window is a duration such as 24h"));
        assert!(text.contains("spec.rollback.requested needs a rollback window"));
    }

    /// `deploy/crds/` and the chart's `crds/` hold what `pgshift crd` prints; regenerate them
    /// with `cargo run -p pgshift -- crd > deploy/crds/postgresupgrades.pgshift.io.yaml` (and
    /// copy it into `deploy/helm/pgshift/crds/`) when the types change.
    #[test]
    fn deployed_crd_files_match_the_types() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        for file in [
            "deploy/crds/postgresupgrades.pgshift.io.yaml",
            "deploy/helm/pgshift/crds/postgresupgrades.pgshift.io.yaml",
        ] {
            let deployed = std::fs::read_to_string(root.join(file)).unwrap();
            assert!(
                deployed == crd_yaml(),
                "{file} is out of date: regenerate it with `cargo run -p pgshift -- crd`"
            );
        }
    }

    #[test]
    fn defaults_fill_cutover_and_cleanup() {
        let spec: PostgresUpgradeSpec = serde_yaml::from_str(
            "source: {service: {name: db}, credentialsSecret: db-superuser}\n\
             target: {image: 'postgres:18', storage: {size: 1Gi}}\n\
             traffic: {service: db, mode: PgBouncer}\n",
        )
        .unwrap();
        assert_eq!(spec.cutover, Cutover::default());
        assert_eq!(spec.cutover.max_pause, "2s");
        assert!(!spec.cleanup.delete_source);
        assert_eq!(spec.rollback.window, "24h");
        assert!(!spec.rollback.requested);
    }
}
