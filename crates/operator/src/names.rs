//! Names and labels of the objects pgshift creates for one `PostgresUpgrade`: all carry the
//! upgrade's name, so that two upgrades in a namespace never collide.

use std::collections::BTreeMap;

pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const UPGRADE_LABEL: &str = "pgshift.io/upgrade";
pub const ROLE_LABEL: &str = "pgshift.io/role";
/// On the clients' Service: its selector and ports before pgshift changed them (JSON).
pub const ORIGINAL_ANNOTATION: &str = "pgshift.io/original-service";
pub const FINALIZER: &str = "pgshift.io/cleanup";
pub const FIELD_MANAGER: &str = "pgshift";
/// The target's bootstrap superuser. Not the source's superuser name: roles are copied from the
/// source with their passwords, and an existing role would keep a different one.
pub const TARGET_SUPERUSER: &str = "pgshift_superuser";
pub const POSTGRES_PORT: i32 = 5432;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub upgrade: String,
}

impl Names {
    pub fn new(upgrade: &str) -> Names {
        Names {
            upgrade: upgrade.to_string(),
        }
    }
    pub fn target(&self) -> String {
        format!("{}-target", self.upgrade)
    }
    pub fn target_secret(&self) -> String {
        format!("{}-target-superuser", self.upgrade)
    }
    pub fn pgbouncer(&self) -> String {
        format!("{}-pgbouncer", self.upgrade)
    }
    /// pgshift's own way to the source's pods: the clients' Service may be the source's, and
    /// pgshift moves that one.
    pub fn source(&self) -> String {
        format!("{}-source", self.upgrade)
    }
    /// The Service PgBouncer connects through: the source's pods, then the target's.
    pub fn route(&self) -> String {
        format!("{}-route", self.upgrade)
    }
    pub fn schema_job(&self, source_oid: u32) -> String {
        format!("{}-schema-{source_oid}", self.upgrade)
    }

    pub fn labels(&self, role: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (MANAGED_BY.to_string(), "pgshift".to_string()),
            (UPGRADE_LABEL.to_string(), self.upgrade.clone()),
            (ROLE_LABEL.to_string(), role.to_string()),
        ])
    }

    /// The selector of one role's pods (without `managed-by`, which selectors need not carry).
    pub fn selector(&self, role: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (UPGRADE_LABEL.to_string(), self.upgrade.clone()),
            (ROLE_LABEL.to_string(), role.to_string()),
        ])
    }
}

pub mod role {
    pub const SOURCE: &str = "source";
    pub const TARGET: &str = "target";
    pub const PGBOUNCER: &str = "pgbouncer";
    pub const SCHEMA: &str = "schema-copy";
    /// Selected by no pod: the clients' Service during a `Service`-mode fence.
    pub const ISOLATED: &str = "isolated";
}
