//! The table of contents of a schema-only archive (`pg_restore -l`), and how the schema is cut
//! into what the initial copy needs first and what is built after it (pure, unit-tested).
//!
//! A line reads `dump id; catalog oid object oid TYPE schema name owner`, e.g.
//! `2433; 2606 16391 CONSTRAINT public t t_pkey postgres`. Entries are told apart by their
//! catalog and object OIDs (the source's), never by the names in the line: pg_restore prints
//! names unquoted, so a name with spaces would be ambiguous.

use std::collections::HashSet;

/// `pg_class`: an index entry's catalog.
pub const PG_CLASS: u32 = 1259;
/// `pg_constraint`: a constraint entry's catalog.
pub const PG_CONSTRAINT: u32 = 2606;

/// One line of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The line as pg_restore printed it; `-L` takes it back.
    pub line: String,
    pub catalog: u32,
    pub oid: u32,
    /// INDEX, CONSTRAINT, FK CONSTRAINT, TRIGGER, INDEX ATTACH, COMMENT, …
    pub kind: String,
}

impl Entry {
    /// An index or constraint build: the work worth running in parallel.
    pub fn is_build(&self) -> bool {
        matches!(self.kind.as_str(), "INDEX" | "CONSTRAINT" | "FK CONSTRAINT")
            && (self.catalog == PG_CLASS || self.catalog == PG_CONSTRAINT)
    }
}

/// The entries of a `pg_restore -l` listing (comments and blank lines skipped).
pub fn parse(listing: &str) -> Vec<Entry> {
    listing.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Entry> {
    let line = line.trim_end();
    if line.starts_with(';') || line.is_empty() {
        return None;
    }
    let (_, rest) = line.split_once("; ")?;
    let mut fields = rest.splitn(3, ' ');
    let catalog = fields.next()?.parse().ok()?;
    let oid = fields.next()?.parse().ok()?;
    let described = fields.next()?;
    let words: Vec<&str> = described.split(' ').collect();
    let kind = words[..kind_length(&words).min(words.len())].join(" ");
    Some(Entry {
        line: line.to_string(),
        catalog,
        oid,
        kind,
    })
}

/// How many words the entry's type has (most have one).
fn kind_length(words: &[&str]) -> usize {
    match words {
        ["FK", "CONSTRAINT", ..] | ["INDEX", "ATTACH", ..] | ["DEFAULT", "ACL", ..] => 2,
        ["EVENT", "TRIGGER", ..] | ["ROW", "SECURITY", ..] | ["TABLE", "ATTACH", ..] => 2,
        ["MATERIALIZED", "VIEW", "DATA", ..] => 3,
        ["MATERIALIZED", "VIEW", ..] | ["TABLE", "DATA", ..] | ["SEQUENCE", "SET", ..] => 2,
        _ => 1,
    }
}

/// What apply needs on each table before its initial copy: the primary key, or the index its
/// replica identity uses (source OIDs).
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// Primary keys, and constraints whose index is a replica identity.
    pub constraints: HashSet<u32>,
    /// Replica identity indexes that back no constraint.
    pub indexes: HashSet<u32>,
}

impl Identity {
    pub fn contains(&self, entry: &Entry) -> bool {
        match entry.catalog {
            PG_CONSTRAINT => self.constraints.contains(&entry.oid),
            PG_CLASS if entry.kind == "INDEX" => self.indexes.contains(&entry.oid),
            _ => false,
        }
    }
}

/// The table definitions and what apply needs: the pre-data section, and of the post-data
/// section the identity entries.
pub fn definitions(pre_data: &[Entry], post_data: &[Entry], identity: &Identity) -> String {
    listing(
        pre_data
            .iter()
            .chain(post_data.iter().filter(|e| identity.contains(e))),
    )
}

/// After the copy, in parallel: every index and constraint build but the identity ones and
/// those `built` already (a run cut short built them).
pub fn builds<'a>(
    post_data: &'a [Entry],
    identity: &Identity,
    built: &HashSet<(u32, u32)>,
) -> Vec<&'a Entry> {
    post_data
        .iter()
        .filter(|e| e.is_build() && !identity.contains(e) && !built.contains(&(e.catalog, e.oid)))
        .collect()
}

/// Last, in one transaction: what depends on the builds (index attachments, comments,
/// triggers, rules, policies, statistics).
pub fn finish(post_data: &[Entry], identity: &Identity) -> String {
    listing(
        post_data
            .iter()
            .filter(|e| !e.is_build() && !identity.contains(e)),
    )
}

/// Entries as a list for `pg_restore --use-list`.
pub fn listing<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> String {
    entries
        .into_iter()
        .map(|e| format!("{}\n", e.line))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const POST_DATA: &str = "\
;
; Archive created at 2026-12-01 12:00:00 UTC
2437; 2606 16411 CONSTRAINT public p p_pkey postgres
2440; 2606 16416 CONSTRAINT public p1 p1_pkey postgres
2431; 2606 16393 CONSTRAINT public t t_b_key postgres
2433; 2606 16391 CONSTRAINT public t t_pkey postgres
2435; 1259 16419 INDEX public p_k postgres
2438; 1259 16420 INDEX public p1_k_idx postgres
2429; 1259 16394 INDEX public t_a postgres
2599; 0 0 COMMENT public INDEX t_a postgres
2434; 1259 16404 INDEX public u_x postgres
2441; 0 0 INDEX ATTACH public p1_k_idx postgres
2442; 0 0 INDEX ATTACH public p1_pkey postgres
2444; 2620 16421 TRIGGER public t trg postgres
2443; 2606 16399 FK CONSTRAINT public u u_t_id_fkey postgres
2445; 1259 16500 INDEX My Schema my index postgres
";

    fn identity() -> Identity {
        Identity {
            constraints: [16411, 16416, 16391].into(),
            indexes: [16404].into(),
        }
    }

    #[test]
    fn entries_are_read_by_catalog_oid_and_type() {
        let entries = parse(POST_DATA);
        assert_eq!(entries.len(), 14);
        assert_eq!(
            (entries[0].catalog, entries[0].oid, entries[0].kind.as_str()),
            (2606, 16411, "CONSTRAINT")
        );
        assert_eq!(entries[9].kind, "INDEX ATTACH");
        assert_eq!(entries[12].kind, "FK CONSTRAINT");
        assert_eq!(entries[11].kind, "TRIGGER");
        assert_eq!(entries[13].kind, "INDEX");
    }

    #[test]
    fn the_schema_is_cut_into_definitions_builds_and_the_rest() {
        let post = parse(POST_DATA);
        let pre = parse("2201; 1259 16386 TABLE public t postgres\n");
        let definitions = definitions(&pre, &post, &identity());
        assert_eq!(
            definitions,
            "2201; 1259 16386 TABLE public t postgres\n\
             2437; 2606 16411 CONSTRAINT public p p_pkey postgres\n\
             2440; 2606 16416 CONSTRAINT public p1 p1_pkey postgres\n\
             2433; 2606 16391 CONSTRAINT public t t_pkey postgres\n\
             2434; 1259 16404 INDEX public u_x postgres\n"
        );
        let builds = listing(builds(&post, &identity(), &[(1259, 16394)].into()));
        assert_eq!(
            builds,
            "2431; 2606 16393 CONSTRAINT public t t_b_key postgres\n\
             2435; 1259 16419 INDEX public p_k postgres\n\
             2438; 1259 16420 INDEX public p1_k_idx postgres\n\
             2443; 2606 16399 FK CONSTRAINT public u u_t_id_fkey postgres\n\
             2445; 1259 16500 INDEX My Schema my index postgres\n",
            "t_a was built by a run cut short"
        );
        assert_eq!(
            finish(&post, &identity()),
            "2599; 0 0 COMMENT public INDEX t_a postgres\n\
             2441; 0 0 INDEX ATTACH public p1_k_idx postgres\n\
             2442; 0 0 INDEX ATTACH public p1_pkey postgres\n\
             2444; 2620 16421 TRIGGER public t trg postgres\n"
        );
    }
}
