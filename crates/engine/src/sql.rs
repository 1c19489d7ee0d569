//! Pure SQL rendering: every identifier and literal is quoted here, nothing is pasted.

use postgres_protocol::escape::{escape_identifier, escape_literal};

use crate::names;

pub fn ident(name: &str) -> String {
    escape_identifier(name)
}

pub fn literal(value: &str) -> String {
    escape_literal(value)
}

pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", ident(schema), ident(name))
}

/// The schema and tables pgshift keeps in each migrated database: the marker table travels
/// through the publication (its arrival on the target proves every earlier commit is there);
/// the state table lives on the target only and records finished steps.
pub fn create_meta_objects(with_state: bool) -> String {
    let schema = ident(names::META_SCHEMA);
    let mut sql = format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {marker} (token text PRIMARY KEY, written_at timestamptz NOT NULL DEFAULT clock_timestamp());",
        marker = qualified(names::META_SCHEMA, names::MARKER_TABLE),
    );
    if with_state {
        sql.push_str(&format!(
            "CREATE TABLE IF NOT EXISTS {state} (step text PRIMARY KEY, value text, done_at timestamptz NOT NULL DEFAULT clock_timestamp());",
            state = qualified(names::META_SCHEMA, names::STATE_TABLE),
        ));
    }
    sql
}

/// Records the forward switch of one target database, in one transaction: the state row (the
/// first recording's time stays), the target LSN the back stream starts from (read now, before
/// the target takes a client write), and the comment on `pgshift_meta` that repeats the time
/// and outlives cleanup. The LSN is the WAL *insert* position: the forward apply commits with
/// `synchronous_commit = off`, so the write position can still lag behind its last commit,
/// which the back stream would then send back.
pub fn record_switch(at: &str) -> String {
    let state = qualified(names::META_SCHEMA, names::STATE_TABLE);
    format!(
        "WITH switched AS (INSERT INTO {state} (step, value) VALUES ({step}, {at}) ON CONFLICT DO NOTHING RETURNING 1)
         INSERT INTO {state} (step, value) SELECT {back_from}, pg_catalog.pg_current_wal_insert_lsn()::text FROM switched
         ON CONFLICT (step) DO UPDATE SET value = EXCLUDED.value, done_at = clock_timestamp();
         DO $pgshift$ BEGIN
           EXECUTE pg_catalog.format('COMMENT ON SCHEMA %I IS %L', {schema},
             {prefix} || (SELECT value FROM {state} WHERE step = {step}) || {suffix});
         END $pgshift$;",
        step = literal(names::step::SWITCHED),
        back_from = literal(names::step::BACK_FROM),
        at = literal(at),
        schema = literal(names::META_SCHEMA),
        prefix = literal(names::SWITCH_RECORD_PREFIX),
        suffix = literal(SWITCH_RECORD_SUFFIX),
    )
}

/// Records a rollback of one target database, in one transaction: the switch record goes
/// (clients use the source again) and the source LSN the forward stream resumes from is kept.
pub fn record_rollback(point: &str) -> String {
    let state = qualified(names::META_SCHEMA, names::STATE_TABLE);
    format!(
        "WITH back AS (DELETE FROM {state} WHERE step = {step} RETURNING 1)
         INSERT INTO {state} (step, value) SELECT {forward_from}, {point} FROM back
         ON CONFLICT (step) DO UPDATE SET value = EXCLUDED.value, done_at = clock_timestamp();
         COMMENT ON SCHEMA {schema} IS NULL;",
        step = literal(names::step::SWITCHED),
        forward_from = literal(names::step::FORWARD_FROM),
        point = literal(point),
        schema = ident(names::META_SCHEMA),
    )
}

const SWITCH_RECORD_SUFFIX: &str =
    " (kept by pgshift cleanup, so that abort can never undo a finished upgrade; drop the schema once you no longer need the record)";

/// The time in a switch record written by [`record_switch`].
pub fn parse_switch_record(comment: &str) -> Option<String> {
    let rest = comment.strip_prefix(names::SWITCH_RECORD_PREFIX)?;
    Some(rest.split(" (").next().unwrap_or(rest).to_string())
}

/// After cleanup the target keeps `pgshift_meta` with the switch record on it, and nothing else.
pub fn drop_meta_tables() -> String {
    format!(
        "DROP TABLE IF EXISTS {}, {}",
        qualified(names::META_SCHEMA, names::MARKER_TABLE),
        qualified(names::META_SCHEMA, names::STATE_TABLE)
    )
}

pub fn drop_meta_schema() -> String {
    format!(
        "DROP SCHEMA IF EXISTS {} CASCADE",
        ident(names::META_SCHEMA)
    )
}

pub fn create_publication() -> String {
    format!(
        "CREATE PUBLICATION {} FOR ALL TABLES",
        ident(names::PUBLICATION)
    )
}

/// A subscription on a slot pgshift made. With `copy_data` it copies every table first and
/// starts at once; without, it starts disabled, to be started at a switch point.
pub fn create_subscription(
    name: &str,
    conninfo: &str,
    publication: &str,
    copy_data: bool,
) -> String {
    format!(
        "CREATE SUBSCRIPTION {sub} CONNECTION {conn} PUBLICATION {publication} \
         WITH (create_slot = false, slot_name = {slot}, copy_data = {copy_data}, enabled = {copy_data})",
        sub = ident(name),
        conn = literal(conninfo),
        publication = ident(publication),
        slot = literal(name),
    )
}

/// A publication of exactly these tables (schema, name).
pub fn create_table_list_publication(name: &str, tables: &[(String, String)]) -> String {
    let list: Vec<String> = tables.iter().map(|(s, t)| qualified(s, t)).collect();
    format!(
        "CREATE PUBLICATION {} FOR TABLE {}",
        ident(name),
        list.join(", ")
    )
}

/// Adds these tables (schema, name) to a table-list publication.
pub fn add_to_publication(name: &str, tables: &[(String, String)]) -> String {
    let list: Vec<String> = tables.iter().map(|(s, t)| qualified(s, t)).collect();
    format!(
        "ALTER PUBLICATION {} ADD TABLE {}",
        ident(name),
        list.join(", ")
    )
}

/// Makes a subscription take on the tables its publication gained, each with an initial copy.
pub fn refresh_subscription(name: &str) -> String {
    format!(
        "ALTER SUBSCRIPTION {} REFRESH PUBLICATION WITH (copy_data = true)",
        ident(name)
    )
}

/// Dropping a subscription whose slot is gone or unreachable: detach the slot first.
pub fn detach_and_drop_subscription(name: &str) -> Vec<String> {
    vec![
        format!("ALTER SUBSCRIPTION {} DISABLE", ident(name)),
        format!("ALTER SUBSCRIPTION {} SET (slot_name = NONE)", ident(name)),
        format!("DROP SUBSCRIPTION {}", ident(name)),
    ]
}

pub fn set_database_read_only(database: &str, read_only: bool) -> String {
    if read_only {
        format!(
            "ALTER DATABASE {} SET default_transaction_read_only = on",
            ident(database)
        )
    } else {
        format!(
            "ALTER DATABASE {} RESET default_transaction_read_only",
            ident(database)
        )
    }
}

/// A role as read from the source's catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub name: String,
    pub superuser: bool,
    pub inherit: bool,
    pub create_role: bool,
    pub create_db: bool,
    pub login: bool,
    pub replication: bool,
    pub bypass_rls: bool,
    pub connection_limit: i32,
    /// The stored password hash (SCRAM or md5), copied as is: the clear text is never known.
    pub password_hash: Option<String>,
    pub valid_until: Option<String>,
}

/// `CREATE ROLE` for a role missing on the target, with its attributes and password hash.
pub fn create_role(role: &Role) -> String {
    let flag = |on: bool, yes: &str, no: &str| if on { yes.to_string() } else { no.to_string() };
    let mut options = vec![
        flag(role.superuser, "SUPERUSER", "NOSUPERUSER"),
        flag(role.inherit, "INHERIT", "NOINHERIT"),
        flag(role.create_role, "CREATEROLE", "NOCREATEROLE"),
        flag(role.create_db, "CREATEDB", "NOCREATEDB"),
        flag(role.login, "LOGIN", "NOLOGIN"),
        flag(role.replication, "REPLICATION", "NOREPLICATION"),
        flag(role.bypass_rls, "BYPASSRLS", "NOBYPASSRLS"),
        format!("CONNECTION LIMIT {}", role.connection_limit),
    ];
    if let Some(hash) = &role.password_hash {
        options.push(format!("PASSWORD {}", literal(hash)));
    }
    if let Some(until) = &role.valid_until {
        options.push(format!("VALID UNTIL {}", literal(until)));
    }
    format!(
        "CREATE ROLE {} WITH {}",
        ident(&role.name),
        options.join(" ")
    )
}

pub fn grant_membership(role: &str, member: &str, admin: bool) -> String {
    format!(
        "GRANT {} TO {}{}",
        ident(role),
        ident(member),
        if admin { " WITH ADMIN OPTION" } else { "" }
    )
}

pub fn create_database(name: &str, owner: &str, encoding: &str) -> String {
    format!(
        "CREATE DATABASE {} WITH OWNER {} TEMPLATE template0 ENCODING {}",
        ident(name),
        ident(owner),
        literal(encoding)
    )
}

/// The comment on a target database that pgshift created (and so may drop on abort).
pub const CREATED_DATABASE_COMMENT: &str = "pgshift: created for a major-version upgrade";

/// At the switch a created database's comment changes, so that nothing ever drops it again.
pub fn mark_created_database_switched(name: &str, at: &str) -> String {
    format!(
        "COMMENT ON DATABASE {} IS {}",
        ident(name),
        literal(&format!("{CREATED_DATABASE_COMMENT}; switched to at {at}"))
    )
}

pub fn mark_created_database(name: &str) -> String {
    format!(
        "COMMENT ON DATABASE {} IS {}",
        ident(name),
        literal(CREATED_DATABASE_COMMENT)
    )
}

pub fn analyze() -> &'static str {
    "ANALYZE"
}

pub fn refresh_materialized_view(schema: &str, name: &str) -> String {
    format!("REFRESH MATERIALIZED VIEW {}", qualified(schema, name))
}

/// Sets many sequences in one round trip: the arrays are bound parameters, never pasted.
pub const SET_SEQUENCES: &str = "SELECT count(pg_catalog.setval(pg_catalog.format('%I.%I', s.schema, s.name)::regclass, s.value, s.called)) \
     FROM unnest($1::text[], $2::text[], $3::int8[], $4::bool[]) AS s(schema, name, value, called)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(qualified("we\"ird", "t"), "\"we\"\"ird\".\"t\"");
        let sql = create_subscription(
            "pgshift_16384",
            r"host='h' password='a\'b'",
            names::PUBLICATION,
            true,
        );
        assert_eq!(
            sql,
            r#"CREATE SUBSCRIPTION "pgshift_16384" CONNECTION  E'host=''h'' password=''a\\''b''' PUBLICATION "pgshift_pub" WITH (create_slot = false, slot_name = 'pgshift_16384', copy_data = true, enabled = true)"#
        );
    }

    #[test]
    fn a_table_list_publication_quotes_every_name() {
        assert_eq!(
            create_table_list_publication("pgshift_back_pub", &[("public".into(), "a\"b".into())]),
            r#"CREATE PUBLICATION "pgshift_back_pub" FOR TABLE "public"."a""b""#
        );
    }

    #[test]
    fn role_is_created_with_its_attributes_and_hash() {
        let role = Role {
            name: "app\"user".into(),
            superuser: false,
            inherit: true,
            create_role: false,
            create_db: true,
            login: true,
            replication: false,
            bypass_rls: false,
            connection_limit: -1,
            password_hash: Some("SCRAM-SHA-256$4096:abc".into()),
            valid_until: None,
        };
        assert_eq!(
            create_role(&role),
            "CREATE ROLE \"app\"\"user\" WITH NOSUPERUSER INHERIT NOCREATEROLE CREATEDB LOGIN NOREPLICATION \
             NOBYPASSRLS CONNECTION LIMIT -1 PASSWORD 'SCRAM-SHA-256$4096:abc'"
        );
    }

    #[test]
    fn a_switch_record_gives_back_its_time() {
        let at = "2026-12-01T10:00:00Z";
        let comment = format!("{}{at}{SWITCH_RECORD_SUFFIX}", names::SWITCH_RECORD_PREFIX);
        assert_eq!(parse_switch_record(&comment).as_deref(), Some(at));
        assert_eq!(parse_switch_record("a comment of the user's"), None);
        assert!(record_switch(at).contains("'2026-12-01T10:00:00Z'"));
    }

    #[test]
    fn database_read_only_switch() {
        assert_eq!(
            set_database_read_only("app", true),
            "ALTER DATABASE \"app\" SET default_transaction_read_only = on"
        );
        assert_eq!(
            set_database_read_only("app", false),
            "ALTER DATABASE \"app\" RESET default_transaction_read_only"
        );
    }
}
