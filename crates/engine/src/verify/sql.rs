//! What `verify` installs, as SQL. Everything lives in `pgshift_meta` and is named
//! `pgshift_verify_*`, so that abort and cleanup (which drop that schema's contents) remove it.
//!
//! The same functions are installed on both servers, so that a chunk's rows are selected and
//! summed by identical code on either side. Their `SET` clauses pin every setting that changes
//! a value's text form (DateStyle, TimeZone, IntervalStyle, extra_float_digits, bytea_output,
//! lc_monetary) and the search path; floating-point columns are summed by their IEEE bits
//! (`float8send`), because their text differs between majors (PostgreSQL 12 prints the shortest
//! exact form, earlier majors 17 digits).

use crate::names;
use crate::sql::{ident, literal, qualified};

pub const CONTROL_TABLE: &str = "pgshift_verify_chunk";
const KEYS_FUNCTION: &str = "pgshift_verify_keys";
const WHERE_FUNCTION: &str = "pgshift_verify_where";
const SUM_FUNCTION: &str = "pgshift_verify_sum";
const BOUND_FUNCTION: &str = "pgshift_verify_bound";
const APPLY_FUNCTION: &str = "pgshift_verify_apply";

/// The settings a checksum is computed under, on both servers.
const PINNED: &str = "SET search_path = pg_catalog, pg_temp SET \"DateStyle\" = 'ISO, YMD' \
     SET \"TimeZone\" = 'UTC' SET \"IntervalStyle\" = 'postgres' SET extra_float_digits = 3 \
     SET bytea_output = 'hex' SET lc_monetary = 'C'";

fn meta(name: &str) -> String {
    qualified(names::META_SCHEMA, name)
}

/// The control table: one row per chunk to check, written on the source by the statement that
/// sums the chunk there, and replicated to the target, where the trigger adds the target's answer.
pub fn create_control_table() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (
             run_id text NOT NULL, request_no bigint NOT NULL,
             schema_name text NOT NULL, table_name text NOT NULL,
             columns text[] NOT NULL, key_columns text[] NOT NULL, lower text[], upper text[],
             source_rows bigint NOT NULL, source_sum text NOT NULL,
             target_rows bigint, target_sum text, matches boolean, problem text,
             PRIMARY KEY (run_id, request_no))",
        meta(CONTROL_TABLE)
    )
}

/// The functions both servers share: the key expressions, the range predicate, a chunk's sum
/// and the next chunk boundary.
pub fn create_functions() -> String {
    format!(
        r#"
CREATE OR REPLACE FUNCTION {keys}(rel regclass, key_columns text[]) RETURNS text
LANGUAGE plpgsql STABLE {PINNED} AS $pgshift$
DECLARE
  expressions text[] := '{{}}';
  col text;
  collatable boolean;
BEGIN
  -- Text keys compare bytewise on both servers: their collations may order differently.
  FOREACH col IN ARRAY key_columns LOOP
    SELECT t.typcollation <> 0 INTO STRICT collatable
      FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
     WHERE a.attrelid = rel AND a.attname = col AND NOT a.attisdropped;
    expressions := expressions || (format('%I', col) || CASE WHEN collatable THEN ' COLLATE "C"' ELSE '' END);
  END LOOP;
  RETURN array_to_string(expressions, ', ');
END $pgshift$;

CREATE OR REPLACE FUNCTION {where_}(rel regclass, key_columns text[], lower text[], upper text[]) RETURNS text
LANGUAGE plpgsql STABLE {PINNED} AS $pgshift$
DECLARE
  keys text;
  lower_values text[] := '{{}}';
  upper_values text[] := '{{}}';
  conditions text[] := '{{}}';
  col text;
  type_name text;
  i int := 0;
BEGIN
  IF cardinality(key_columns) = 0 THEN
    RETURN 'true';
  END IF;
  keys := {keys}(rel, key_columns);
  FOREACH col IN ARRAY key_columns LOOP
    i := i + 1;
    SELECT format_type(a.atttypid, a.atttypmod) INTO STRICT type_name
      FROM pg_attribute a WHERE a.attrelid = rel AND a.attname = col AND NOT a.attisdropped;
    IF lower IS NOT NULL THEN
      lower_values := lower_values || format('%L::%s', lower[i], type_name);
    END IF;
    IF upper IS NOT NULL THEN
      upper_values := upper_values || format('%L::%s', upper[i], type_name);
    END IF;
  END LOOP;
  IF lower IS NOT NULL THEN
    conditions := conditions || format('ROW(%s) >= ROW(%s)', keys, array_to_string(lower_values, ', '));
  END IF;
  IF upper IS NOT NULL THEN
    conditions := conditions || format('ROW(%s) < ROW(%s)', keys, array_to_string(upper_values, ', '));
  END IF;
  IF cardinality(conditions) = 0 THEN
    RETURN 'true';
  END IF;
  RETURN array_to_string(conditions, ' AND ');
END $pgshift$;

CREATE OR REPLACE FUNCTION {sum}(rel_schema text, rel_name text, columns text[], key_columns text[],
                                 lower text[], upper text[], OUT row_count bigint, OUT checksum text)
LANGUAGE plpgsql VOLATILE {PINNED} AS $pgshift$
DECLARE
  rel regclass := format('%I.%I', rel_schema, rel_name)::regclass;
  fields text[] := '{{}}';
  col text;
  base oid;
  element oid;
BEGIN
  FOREACH col IN ARRAY columns LOOP
    SELECT a.atttypid INTO STRICT base
      FROM pg_attribute a WHERE a.attrelid = rel AND a.attname = col AND NOT a.attisdropped;
    -- A domain is summed as its base type.
    LOOP
      SELECT CASE WHEN t.typtype = 'd' THEN t.typbasetype END INTO element FROM pg_type t WHERE t.oid = base;
      EXIT WHEN element IS NULL;
      base := element;
    END LOOP;
    SELECT t.typelem INTO element FROM pg_type t WHERE t.oid = base AND t.typlen = -1;
    fields := fields || CASE
      WHEN base = 'float4'::regtype THEN format('float4send(%I::float4)', col)
      WHEN base = 'float8'::regtype THEN format('float8send(%I::float8)', col)
      WHEN element = 'float4'::regtype THEN format('array_send(%I::float4[])', col)
      WHEN element = 'float8'::regtype THEN format('array_send(%I::float8[])', col)
      ELSE format('%I', col)
    END;
  END LOOP;
  -- Each row's md5, split into two 64-bit halves and added up: the order rows are read in
  -- does not matter, and no sort is needed.
  EXECUTE format(
    'SELECT count(*), coalesce(sum((''x'' || substr(h, 1, 16))::bit(64)::bigint::numeric), 0)::text || ''/''
            || coalesce(sum((''x'' || substr(h, 17, 16))::bit(64)::bigint::numeric), 0)::text
       FROM (SELECT md5(ROW(%s)::text) AS h FROM %s WHERE %s) AS rows',
    array_to_string(fields, ', '), rel, {where_}(rel, key_columns, lower, upper))
  INTO row_count, checksum;
END $pgshift$;

CREATE OR REPLACE FUNCTION {bound}(rel_schema text, rel_name text, key_columns text[], lower text[],
                                   upper text[], skip bigint) RETURNS text[]
LANGUAGE plpgsql STABLE {PINNED} AS $pgshift$
DECLARE
  rel regclass := format('%I.%I', rel_schema, rel_name)::regclass;
  key_texts text[] := '{{}}';
  col text;
  bound text[];
BEGIN
  FOREACH col IN ARRAY key_columns LOOP
    key_texts := key_texts || format('%I::text', col);
  END LOOP;
  EXECUTE format('SELECT ARRAY[%s] FROM %s WHERE %s ORDER BY %s OFFSET %s LIMIT 1',
    array_to_string(key_texts, ', '), rel, {where_}(rel, key_columns, lower, upper),
    {keys}(rel, key_columns), skip)
  INTO bound;
  RETURN bound;
END $pgshift$;
"#,
        keys = meta(KEYS_FUNCTION),
        where_ = meta(WHERE_FUNCTION),
        sum = meta(SUM_FUNCTION),
        bound = meta(BOUND_FUNCTION),
    )
}

/// The target's side: the trigger that sums the chunk when its control row applies and writes
/// the answer into that row. `ENABLE ALWAYS`: the apply worker runs with
/// session_replication_role = replica, where ordinary triggers do not fire. `BEFORE`, changing
/// the applied row: the target database is read-only during the upgrade, and only the apply
/// worker's own writes pass that (a trigger's INSERT would fail). A failure is recorded, never
/// raised: an error in the apply worker would stop the stream.
pub fn create_target_objects() -> String {
    format!(
        r#"
CREATE OR REPLACE FUNCTION {apply}() RETURNS trigger
LANGUAGE plpgsql {PINNED} AS $pgshift$
DECLARE
  summed record;
BEGIN
  BEGIN
    SELECT * INTO STRICT summed FROM {sum}(NEW.schema_name, NEW.table_name, NEW.columns,
                                            NEW.key_columns, NEW.lower, NEW.upper);
    NEW.target_rows := summed.row_count;
    NEW.target_sum := summed.checksum;
    NEW.matches := summed.row_count = NEW.source_rows AND summed.checksum = NEW.source_sum;
  EXCEPTION WHEN OTHERS THEN
    NEW.matches := false;
    NEW.problem := SQLERRM;
  END;
  RETURN NEW;
END $pgshift$;

DROP TRIGGER IF EXISTS {trigger} ON {control};
CREATE TRIGGER {trigger} BEFORE INSERT ON {control} FOR EACH ROW EXECUTE PROCEDURE {apply}();
ALTER TABLE {control} ENABLE ALWAYS TRIGGER {trigger};
"#,
        apply = meta(APPLY_FUNCTION),
        sum = meta(SUM_FUNCTION),
        control = meta(CONTROL_TABLE),
        trigger = ident(APPLY_FUNCTION),
    )
}

/// Sums one chunk on the source and writes its control row, in one statement (one snapshot,
/// one commit). Parameters: run, request number, schema, table, columns, key columns, lower,
/// upper. Returns the chunk's row count.
pub fn submit_chunk() -> String {
    format!(
        "INSERT INTO {control} (run_id, request_no, schema_name, table_name, columns, key_columns,
                                lower, upper, source_rows, source_sum)
         SELECT $1::text, $2::bigint, $3::text, $4::text, $5::text[], $6::text[], $7::text[], $8::text[],
                s.row_count, s.checksum
         FROM {sum}($3::text, $4::text, $5::text[], $6::text[], $7::text[], $8::text[]) AS s
         RETURNING source_rows",
        control = meta(CONTROL_TABLE),
        sum = meta(SUM_FUNCTION),
    )
}

/// The key `$6` rows past `$4` within [`$4`, `$5`) of table `$1`.`$2` (key columns `$3`).
pub fn next_bound() -> String {
    format!(
        "SELECT {}($1::text, $2::text, $3::text[], $4::text[], $5::text[], $6::bigint)",
        meta(BOUND_FUNCTION)
    )
}

/// The answers to a run's requests (`$1` run, `$2` request numbers) in the target's control rows.
pub fn read_results() -> String {
    format!(
        "SELECT request_no, source_rows, coalesce(target_rows, -1), matches, problem FROM {}
         WHERE run_id = $1 AND request_no = ANY($2) AND matches IS NOT NULL",
        meta(CONTROL_TABLE)
    )
}

/// Drops what verify installed on one server (the control table before the functions it
/// uses); what is missing is skipped. On the target, only once the stream carries no more
/// control rows: a row for a dropped table stops the apply worker.
pub fn drop_objects() -> String {
    let functions = [
        format!("{}()", meta(APPLY_FUNCTION)),
        format!(
            "{}(text, text, text[], text[], text[], text[])",
            meta(SUM_FUNCTION)
        ),
        format!(
            "{}(text, text, text[], text[], text[], bigint)",
            meta(BOUND_FUNCTION)
        ),
        format!("{}(regclass, text[], text[], text[])", meta(WHERE_FUNCTION)),
        format!("{}(regclass, text[])", meta(KEYS_FUNCTION)),
    ];
    format!(
        "DROP TABLE IF EXISTS {}; DROP FUNCTION IF EXISTS {};",
        meta(CONTROL_TABLE),
        functions.join(", ")
    )
}

/// Whether anything of verify's is installed in this database.
pub fn installed() -> String {
    format!(
        "SELECT to_regclass({control}) IS NOT NULL
             OR EXISTS (SELECT 1 FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
                        WHERE n.nspname = {schema} AND p.proname LIKE 'pgshift\\_verify\\_%')",
        control = literal(&meta(CONTROL_TABLE)),
        schema = literal(names::META_SCHEMA),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_installed_is_named_pgshift_verify_and_dropped() {
        let dropped = drop_objects();
        for name in [
            CONTROL_TABLE,
            KEYS_FUNCTION,
            WHERE_FUNCTION,
            SUM_FUNCTION,
            BOUND_FUNCTION,
            APPLY_FUNCTION,
        ] {
            assert!(name.starts_with("pgshift_verify_"), "{name}");
            assert!(dropped.contains(&format!("\"{}\"", name)), "{name}");
        }
        // Each function is pinned to the settings that change text forms.
        let functions = format!("{}{}", create_functions(), create_target_objects());
        assert_eq!(functions.matches("CREATE OR REPLACE FUNCTION").count(), 5);
        assert_eq!(functions.matches(PINNED).count(), 5);
    }
}
