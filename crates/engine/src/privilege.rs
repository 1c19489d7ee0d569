//! The privilege model of each server (issue 12): what pgshift's role may do, read from the
//! catalogs (`gather`, changes nothing), and the verdict (`blockers`, pure): every privilege a
//! role without superuser lacks is a blocker whose fix is the exact `GRANT` or `ALTER ROLE`.
//! Managed services give no superuser; they grant REPLICATION (RDS through its
//! `rds_replication` role), ownership of the application's objects, and from PostgreSQL 16 on
//! `pg_create_subscription` with CREATEDB and CREATEROLE.

use serde::Serialize;
use tokio_postgres::Client;

use crate::error::{Result, Side, SqlContext};
use crate::names;
use crate::preflight::Finding;
use crate::sql;
use crate::upgrade::Upgrade;

/// Roles of managed services whose members may replicate although the REPLICATION attribute is
/// not theirs (PostgreSQL itself never passes role attributes on through membership).
pub const REPLICATION_GRANTING_ROLES: &[&str] = &["rds_replication"];

/// The predefined role through which a non-superuser creates subscriptions (PostgreSQL 16+).
pub const CREATE_SUBSCRIPTION_ROLE: &str = "pg_create_subscription";

/// The first major on which a role without superuser may create a subscription.
pub const DELEGATED_SUBSCRIPTION_MAJOR: i32 = 16;

/// How pgshift's role on one server is privileged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Model {
    #[default]
    Superuser,
    /// No superuser: what pgshift may do comes from attributes, memberships and ownership.
    LeastPrivilege,
}

/// What pgshift's role on one server may do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RoleFacts {
    pub model: Model,
    pub user: String,
    pub major: i32,
    pub superuser: bool,
    /// The REPLICATION attribute, or membership in a managed service's role that grants it.
    pub replication: bool,
    /// That managed service's role, when replication comes through one.
    pub replication_through: Option<String>,
    /// Has the privileges of pg_create_subscription (16+; the role does not exist before).
    pub create_subscription: bool,
    pub create_db: bool,
    pub create_role: bool,
    /// May read pg_authid, where the roles' password hashes are.
    pub reads_pg_authid: bool,
}

/// Owners of objects to be moved whose privileges pgshift's source role lacks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ForeignOwner {
    pub owner: String,
    /// Its tables and sequences, schema-qualified and quoted as needed.
    pub objects: Vec<String>,
}

/// What pgshift's source role may do with one database to be moved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DatabaseOwnership {
    pub database: String,
    /// The database's owner, when pgshift's role neither is it nor has its privileges.
    pub foreign_database_owner: Option<String>,
    pub foreign_owners: Vec<ForeignOwner>,
}

/// The privilege model detected on each side (`check --json` lists it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Privileges {
    pub source: RoleFacts,
    pub target: RoleFacts,
    /// Source databases, for a source role without superuser (a superuser owns everything).
    pub databases: Vec<DatabaseOwnership>,
    /// Login roles of the source whose password the user must set on the target: the source
    /// role may not read pg_authid, so pgshift copies roles without their password hashes.
    /// A role the target already has with a password is not among them.
    pub passwords_to_set: Vec<RoleOnTarget>,
}

/// A login role of the source that has no password on the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoleOnTarget {
    pub role: String,
    /// The target has the role, without a password; otherwise pgshift creates it.
    pub exists: bool,
}

/// The verdict on the privileges: a blocker for every one missing, naming its fix.
pub fn blockers(privileges: &Privileges, rollback_window: bool) -> Vec<Finding> {
    let mut found = Vec::new();
    let (source, target) = (&privileges.source, &privileges.target);
    let mut block = |code, object: String, problem: String, fix: String| {
        found.push(Finding {
            code,
            object,
            problem,
            fix,
        })
    };
    let without_window = "or run without a rollback window (--no-rollback-window)";
    if !source.superuser {
        let user = sql::ident(&source.user);
        let object = format!("source user {}", source.user);
        if !source.replication {
            block(
                "source_replication",
                object.clone(),
                "may not replicate (no REPLICATION attribute): pgshift creates a logical replication \
                 slot and the target streams from it as this role"
                    .into(),
                format!(
                    "ALTER ROLE {user} REPLICATION on the source (on RDS and Aurora: GRANT rds_replication TO {user})"
                ),
            );
        }
        for db in &privileges.databases {
            if let Some(owner) = &db.foreign_database_owner {
                block(
                    "source_database_owner",
                    format!("{object} (database {})", db.database),
                    format!(
                        "lacks the privileges of the database's owner {owner}: pgshift creates its schema \
                         and publication there and makes the database read-only at the switch"
                    ),
                    format!("GRANT {} TO {user} on the source", sql::ident(owner)),
                );
            }
            for foreign in &db.foreign_owners {
                let shown: Vec<&str> = foreign.objects.iter().take(5).map(String::as_str).collect();
                let more = match foreign.objects.len().saturating_sub(shown.len()) {
                    0 => String::new(),
                    n => format!(" and {n} more"),
                };
                block(
                    "source_object_owner",
                    format!("{object} (database {})", db.database),
                    format!(
                        "lacks the privileges of {}, the owner of {}{more}: only an owner may publish a \
                         table, and a sequence's value is hidden from others",
                        foreign.owner,
                        shown.join(", ")
                    ),
                    format!("GRANT {} TO {user} on the source", sql::ident(&foreign.owner)),
                );
            }
        }
        if rollback_window {
            block(
                "window_source_superuser",
                object,
                "is not a superuser; the rollback window subscribes the source to the target, which \
                 pgshift does as a superuser"
                    .into(),
                format!("connect to the source as a superuser, {without_window}"),
            );
        }
    }
    for role in &privileges.passwords_to_set {
        let quoted = sql::ident(&role.role);
        block(
            "role_password",
            format!("role {}", role.role),
            format!(
                "can log in on the source, and pgshift copies it to the target without its password: the source \
                 user {} may not read pg_authid, where the password hashes are",
                source.user
            ),
            match role.exists {
                true => format!("set its password on the target: ALTER ROLE {quoted} PASSWORD '...'"),
                false => format!(
                    "create it on the target with its password before the run: CREATE ROLE {quoted} LOGIN PASSWORD '...'"
                ),
            },
        );
    }
    if !target.superuser {
        let user = sql::ident(&target.user);
        let object = format!("target user {}", target.user);
        if target.major < DELEGATED_SUBSCRIPTION_MAJOR {
            block(
                "target_superuser",
                object.clone(),
                format!(
                    "is not a superuser, and on PostgreSQL {} only a superuser may create the subscription \
                     (PostgreSQL {DELEGATED_SUBSCRIPTION_MAJOR} and newer grant it through {CREATE_SUBSCRIPTION_ROLE})",
                    target.major
                ),
                format!(
                    "connect to the target as a superuser, or upgrade to a target of PostgreSQL \
                     {DELEGATED_SUBSCRIPTION_MAJOR} or newer"
                ),
            );
        } else {
            for (missing, code, what, fix) in [
                (
                    !target.create_subscription,
                    "target_create_subscription",
                    "may not create subscriptions",
                    format!("GRANT {CREATE_SUBSCRIPTION_ROLE} TO {user} on the target"),
                ),
                (
                    !target.create_db,
                    "target_createdb",
                    "may not create databases (CREATEDB)",
                    format!("ALTER ROLE {user} CREATEDB on the target"),
                ),
                (
                    !target.create_role,
                    "target_createrole",
                    "may not create the roles the target lacks (CREATEROLE)",
                    format!("ALTER ROLE {user} CREATEROLE on the target"),
                ),
            ] {
                if missing {
                    block(code, object.clone(), what.into(), fix);
                }
            }
            block(
                "target_superuser",
                object.clone(),
                "is not a superuser; pgshift restores the schema under its owners and subscribes as a superuser"
                    .into(),
                format!("connect to the target as a superuser (or ALTER ROLE {user} SUPERUSER)"),
            );
        }
        if rollback_window && !target.replication {
            block(
                "window_target_replication",
                object,
                "may not replicate (no REPLICATION attribute): the rollback window's slot is made on the target"
                    .into(),
                format!("ALTER ROLE {user} REPLICATION on the target, {without_window}"),
            );
        }
    }
    found
}

/// Reads what pgshift's role may do on both servers, and for a source role without superuser
/// which owners' objects it cannot reach in each database; changes nothing.
pub(crate) async fn gather(up: &Upgrade) -> Result<Privileges> {
    let source = role_facts(&up.source_admin, Side::Source).await?;
    let target = role_facts(&up.target_admin, Side::Target).await?;
    let mut databases = Vec::new();
    if !source.superuser {
        for name in up.existing_source_databases().await? {
            if !up.databases.contains(&name) {
                continue;
            }
            let session = up.plan.source.with_dbname(&name).connect().await?;
            databases.push(ownership(&name, &session).await?);
        }
    }
    let passwords_to_set = match source.reads_pg_authid {
        true => Vec::new(),
        false => {
            passwords_to_set(&up.source_admin, &up.target_admin, target.reads_pg_authid).await?
        }
    };
    Ok(Privileges {
        source,
        target,
        databases,
        passwords_to_set,
    })
}

/// The source's login roles that will have no password on the target: those it lacks, and
/// those it has without one (known only where the target role may read pg_authid; otherwise a
/// role that is there counts as set up by the user).
async fn passwords_to_set(
    source: &Client,
    target: &Client,
    target_reads_pg_authid: bool,
) -> Result<Vec<RoleOnTarget>> {
    let logins: Vec<String> = source
        .query(
            "SELECT rolname::text FROM pg_roles WHERE rolcanlogin AND rolname !~ '^pg_' ORDER BY 1",
            &[],
        )
        .await
        .on(Side::Source, "reading login roles")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let on_target = target
        .query(
            match target_reads_pg_authid {
                true => "SELECT rolname::text, rolpassword IS NOT NULL FROM pg_catalog.pg_authid",
                false => "SELECT rolname::text, true FROM pg_catalog.pg_roles",
            },
            &[],
        )
        .await
        .on(Side::Target, "reading roles")?;
    Ok(logins
        .into_iter()
        .filter_map(
            |role| match on_target.iter().find(|r| r.get::<_, String>(0) == role) {
                None => Some(RoleOnTarget {
                    role,
                    exists: false,
                }),
                Some(row) if !row.get::<_, bool>(1) => Some(RoleOnTarget { role, exists: true }),
                Some(_) => None,
            },
        )
        .collect())
}

/// What the session's role may do on its server.
pub async fn role_facts(client: &Client, side: Side) -> Result<RoleFacts> {
    let row = client
        .query_one(
            "SELECT current_user::text, current_setting('server_version_num')::int / 10000,
                    r.rolsuper, r.rolreplication, r.rolcreatedb, r.rolcreaterole,
                    (SELECT min(g.rolname::text) FROM pg_roles g
                     WHERE g.rolname::text = ANY ($1::text[]) AND pg_has_role(g.oid, 'MEMBER')),
                    EXISTS (SELECT 1 FROM pg_roles g WHERE g.rolname::text = $2 AND pg_has_role(g.oid, 'USAGE')),
                    has_table_privilege('pg_catalog.pg_authid', 'SELECT')
             FROM pg_roles r WHERE r.rolname = current_user",
            &[&REPLICATION_GRANTING_ROLES, &CREATE_SUBSCRIPTION_ROLE],
        )
        .await
        .on(side, "reading the privileges of pgshift's role")?;
    let superuser: bool = row.get(2);
    let replication_through: Option<String> = row.get(6);
    Ok(RoleFacts {
        model: if superuser {
            Model::Superuser
        } else {
            Model::LeastPrivilege
        },
        user: row.get(0),
        major: row.get(1),
        superuser,
        replication: row.get::<_, bool>(3) || replication_through.is_some(),
        replication_through,
        create_subscription: row.get(7),
        create_db: row.get(4),
        create_role: row.get(5),
        reads_pg_authid: row.get(8),
    })
}

/// Which owners' tables and sequences of the session's database, and whether the database
/// itself, lie beyond its role's privileges.
pub async fn ownership(database: &str, session: &Client) -> Result<DatabaseOwnership> {
    let side = Side::Source;
    let owner = session
        .query_one(
            "SELECT pg_get_userbyid(datdba)::text, pg_has_role(datdba, 'USAGE')
             FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await
        .on(side, "reading the database's owner")?;
    let rows = session
        .query(
            "SELECT pg_get_userbyid(c.relowner)::text, format('%I.%I', n.nspname, c.relname)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p', 'S')
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', $1)
               AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'
               AND NOT pg_has_role(c.relowner, 'USAGE')
             ORDER BY 1, 2",
            &[&names::META_SCHEMA],
        )
        .await
        .on(side, "reading the owners of the tables")?;
    let mut foreign_owners: Vec<ForeignOwner> = Vec::new();
    for row in rows {
        let (owner, object): (String, String) = (row.get(0), row.get(1));
        match foreign_owners.last_mut() {
            Some(last) if last.owner == owner => last.objects.push(object),
            _ => foreign_owners.push(ForeignOwner {
                owner,
                objects: vec![object],
            }),
        }
    }
    Ok(DatabaseOwnership {
        database: database.to_string(),
        foreign_database_owner: (!owner.get::<_, bool>(1)).then(|| owner.get(0)),
        foreign_owners,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superuser(major: i32) -> RoleFacts {
        RoleFacts {
            model: Model::Superuser,
            user: "postgres".into(),
            major,
            superuser: true,
            replication: true,
            replication_through: None,
            create_subscription: major >= 16,
            create_db: true,
            create_role: true,
            reads_pg_authid: true,
        }
    }

    /// A managed service's grants: a source role with REPLICATION owning the schema, a target
    /// role in pg_create_subscription with CREATEDB and CREATEROLE.
    fn least(major: i32, user: &str) -> RoleFacts {
        RoleFacts {
            model: Model::LeastPrivilege,
            user: user.into(),
            major,
            superuser: false,
            replication: true,
            replication_through: None,
            create_subscription: major >= 16,
            create_db: true,
            create_role: true,
            reads_pg_authid: false,
        }
    }

    fn codes(found: &[Finding]) -> Vec<&'static str> {
        found.iter().map(|f| f.code).collect()
    }

    fn fix<'a>(found: &'a [Finding], code: &str) -> &'a str {
        &found.iter().find(|f| f.code == code).expect(code).fix
    }

    #[test]
    fn superusers_on_both_sides_need_nothing() {
        let privileges = Privileges {
            source: superuser(15),
            target: superuser(18),
            databases: Vec::new(),
            passwords_to_set: Vec::new(),
        };
        assert!(blockers(&privileges, true).is_empty());
    }

    #[test]
    fn each_missing_source_privilege_names_its_grant() {
        let mut privileges = Privileges {
            source: least(15, "app owner"),
            target: superuser(18),
            databases: vec![DatabaseOwnership {
                database: "app".into(),
                foreign_database_owner: Some("dba".into()),
                foreign_owners: vec![ForeignOwner {
                    owner: "Billing".into(),
                    objects: (1..=7).map(|i| format!("public.t{i}")).collect(),
                }],
            }],
            passwords_to_set: vec![
                RoleOnTarget {
                    role: "app".into(),
                    exists: false,
                },
                RoleOnTarget {
                    role: "report's".into(),
                    exists: true,
                },
            ],
        };
        privileges.source.replication = false;
        let found = blockers(&privileges, false);
        assert_eq!(
            codes(&found),
            [
                "source_replication",
                "source_database_owner",
                "source_object_owner",
                "role_password",
                "role_password"
            ]
        );
        assert!(
            fix(&found, "source_replication").starts_with("ALTER ROLE \"app owner\" REPLICATION")
        );
        assert!(
            fix(&found, "source_replication").contains("GRANT rds_replication TO \"app owner\"")
        );
        assert_eq!(
            fix(&found, "source_database_owner"),
            "GRANT \"dba\" TO \"app owner\" on the source"
        );
        assert_eq!(
            fix(&found, "source_object_owner"),
            "GRANT \"Billing\" TO \"app owner\" on the source"
        );
        let owner = &found[2];
        assert_eq!(owner.object, "source user app owner (database app)");
        assert!(
            owner
                .problem
                .contains("public.t1, public.t2, public.t3, public.t4, public.t5 and 2 more"),
            "{}",
            owner.problem
        );
        assert_eq!(found[3].object, "role app");
        assert_eq!(
            found[3].fix,
            "create it on the target with its password before the run: CREATE ROLE \"app\" LOGIN PASSWORD '...'"
        );
        assert_eq!(
            found[4].fix,
            "set its password on the target: ALTER ROLE \"report's\" PASSWORD '...'"
        );
    }

    #[test]
    fn replication_through_a_managed_services_role_counts() {
        let mut privileges = Privileges {
            source: least(15, "app"),
            target: superuser(18),
            databases: Vec::new(),
            passwords_to_set: Vec::new(),
        };
        privileges.source.replication = true;
        privileges.source.replication_through = Some("rds_replication".into());
        assert!(!codes(&blockers(&privileges, false)).contains(&"source_replication"));
    }

    #[test]
    fn each_missing_target_privilege_names_its_grant() {
        let mut privileges = Privileges {
            source: superuser(15),
            target: least(18, "mover"),
            databases: Vec::new(),
            passwords_to_set: Vec::new(),
        };
        privileges.target.create_subscription = false;
        privileges.target.create_db = false;
        privileges.target.create_role = false;
        privileges.target.replication = false;
        let found = blockers(&privileges, true);
        assert_eq!(
            codes(&found),
            [
                "target_create_subscription",
                "target_createdb",
                "target_createrole",
                "target_superuser",
                "window_target_replication"
            ]
        );
        assert_eq!(
            fix(&found, "target_create_subscription"),
            "GRANT pg_create_subscription TO \"mover\" on the target"
        );
        assert_eq!(
            fix(&found, "target_createdb"),
            "ALTER ROLE \"mover\" CREATEDB on the target"
        );
        assert_eq!(
            fix(&found, "target_createrole"),
            "ALTER ROLE \"mover\" CREATEROLE on the target"
        );
        assert!(fix(&found, "window_target_replication").contains("--no-rollback-window"));
        assert!(!codes(&blockers(&privileges, false)).contains(&"window_target_replication"));
    }

    #[test]
    fn a_target_older_than_16_without_superuser_needs_one() {
        let privileges = Privileges {
            source: superuser(13),
            target: least(15, "mover"),
            databases: Vec::new(),
            passwords_to_set: Vec::new(),
        };
        let found = blockers(&privileges, false);
        assert_eq!(codes(&found), ["target_superuser"]);
        assert!(found[0]
            .problem
            .contains("on PostgreSQL 15 only a superuser may create the subscription"));
        assert!(found[0].fix.contains("PostgreSQL 16 or newer"));
    }

    #[test]
    fn without_a_source_superuser_only_the_rollback_window_needs_one() {
        let privileges = Privileges {
            source: least(16, "app"),
            target: superuser(18),
            databases: Vec::new(),
            passwords_to_set: Vec::new(),
        };
        let found = blockers(&privileges, true);
        assert_eq!(codes(&found), ["window_source_superuser"]);
        assert!(found[0].fix.contains("--no-rollback-window"));
        assert!(blockers(&privileges, false).is_empty());
    }
}
