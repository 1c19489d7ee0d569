//! Names of everything pgshift creates. Each carries the `pgshift_` prefix, so that abort and
//! cleanup can remove exactly these and nothing of the user's.

pub const PREFIX: &str = "pgshift_";
pub const PUBLICATION: &str = "pgshift_pub";
/// The target's publication for the rollback window (an explicit table list: pgshift's state
/// table stays out of it).
pub const BACK_PUBLICATION: &str = "pgshift_back_pub";
pub const META_SCHEMA: &str = "pgshift_meta";
pub const MARKER_TABLE: &str = "pgshift_marker";
pub const STATE_TABLE: &str = "pgshift_state";

/// Advisory lock classes (the first of the two int4 keys), "pgsu" and "pgsf": one pgshift at a
/// time per upgrade, and the fence guard's hold on an interrupted cutover.
pub const UPGRADE_LOCK_CLASS: i32 = 0x7067_7375;
pub const FENCE_LOCK_CLASS: i32 = 0x7067_7366;

/// The comment on a target database's `pgshift_meta` schema that records the switch. It is
/// kept by cleanup, so that a finished upgrade is recognisable forever.
pub const SWITCH_RECORD_PREFIX: &str = "pgshift switched this database to the new server at ";

/// Subscription on the target and slot on the source share one name, derived from the source
/// database's OID: unique across the source cluster and always a valid slot name.
pub fn subscription(source_database_oid: u32) -> String {
    format!("{PREFIX}{source_database_oid}")
}

/// The back stream's subscription on the source and slot on the target.
pub fn back_subscription(source_database_oid: u32) -> String {
    format!("{PREFIX}back_{source_database_oid}")
}

/// `LIKE` pattern of the temporary slots that the target's table-sync workers create on the
/// source (`pg_<subid>_sync_<relid>_<sysid>`), which a crash during the initial copy can
/// leave behind. The target's system identifier makes it ours.
pub fn sync_slot_pattern(target_system_identifier: &str) -> String {
    format!("pg\\_%\\_sync\\_%\\_{target_system_identifier}")
}

/// Steps recorded in the target's state table.
pub mod step {
    pub const SCHEMA: &str = "schema";
    pub const ANALYZED: &str = "analyzed";
    /// The indexes and constraints built after the initial copy (when the schema step copied
    /// the table definitions only).
    pub const POST_DATA: &str = "post_data";
    pub const SWITCHED: &str = "switched";
    pub const FENCED: &str = "fenced";
    /// A rollback's fence (on the target) is up.
    pub const FENCED_BACK: &str = "fenced_back";
    /// The target LSN the back stream starts from: recorded with the switch.
    pub const BACK_FROM: &str = "back_from";
    /// The source LSN the forward stream resumes from: recorded with a rollback.
    pub const FORWARD_FROM: &str = "forward_from";
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_carry_the_prefix() {
        for name in [
            super::PUBLICATION,
            super::META_SCHEMA,
            super::MARKER_TABLE,
            super::STATE_TABLE,
        ] {
            assert!(name.starts_with(super::PREFIX));
        }
        assert_eq!(super::subscription(16384), "pgshift_16384");
    }
}
