//! The schema in two parts (issue: load bare tables, build indexes after). Before the initial
//! copy, the table definitions and only what apply needs on each table (its primary key or
//! replica identity index), in one transaction with the step record. After the copy, every
//! other index and constraint, built in parallel by `pg_restore -j` (a sorted build of each,
//! instead of the copy maintaining every B-tree row by row); then, in one transaction with its
//! record, what depends on them (attachments, triggers, rules, policies, comments). A run cut
//! short during the builds keeps what it built; the next one builds what is missing.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio_postgres::Client;

use super::{tool, tool_conninfo, MemoryFile, Tools};
use crate::endpoint::Endpoint;
use crate::error::{Error, Result, Side, SqlContext};
use crate::events::{Event, EventSink};
use crate::names;
use crate::toc::{self, Identity};

/// The schema record's value when only the definitions were restored: the builds follow.
pub const DEFINITIONS_ONLY: &str = "definitions";

/// The application name of the build sessions (`pg_restore -j`'s), to find those a killed
/// run left behind.
const BUILD_APPLICATION: &str = "pgshift index build";

/// How often index builds are reported while they run.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// A schema-only archive of the source database, in memory, and its table of contents.
struct Archive {
    file: MemoryFile,
    pre_data: Vec<toc::Entry>,
    post_data: Vec<toc::Entry>,
}

impl Archive {
    async fn dump(tools: &Tools, passfile: &MemoryFile, source: &Endpoint) -> Result<Archive> {
        let dump = super::dump_schema(
            tools,
            passfile,
            source,
            &["--format=custom".to_string()],
            &format!("database {}", source.dbname),
        )
        .await?;
        let file = MemoryFile::new("pgshift-schema-archive", &dump)?;
        let list = |section: &'static str| {
            let file = &file;
            async move {
                let output = tool(&tools.pg_restore, &[passfile, file])
                    .args(["--list", &format!("--section={section}"), &file.path()])
                    .output()
                    .await
                    .map_err(|e| {
                        Error::Tool(format!("cannot run {}: {e}", tools.pg_restore.display()))
                    })?;
                if !output.status.success() {
                    return Err(Error::Tool(format!(
                        "pg_restore --list failed: {}",
                        String::from_utf8_lossy(&output.stderr).trim()
                    )));
                }
                Ok(toc::parse(&String::from_utf8_lossy(&output.stdout)))
            }
        };
        let pre_data = list("pre-data").await?;
        let post_data = list("post-data").await?;
        Ok(Archive {
            file,
            pre_data,
            post_data,
        })
    }

    /// The SQL of the entries in `selection` (a `pg_restore -l` list), as a script.
    async fn script(
        &self,
        tools: &Tools,
        passfile: &MemoryFile,
        selection: &str,
    ) -> Result<Vec<u8>> {
        let list = MemoryFile::new("pgshift-schema-list", selection.as_bytes())?;
        let output = tool(&tools.pg_restore, &[passfile, &self.file, &list])
            .args([
                &format!("--use-list={}", list.path()),
                "--file=-",
                &self.file.path(),
            ])
            .output()
            .await
            .map_err(|e| Error::Tool(format!("cannot run {}: {e}", tools.pg_restore.display())))?;
        if !output.status.success() {
            return Err(Error::Tool(format!(
                "pg_restore failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(output.stdout)
    }
}

/// The passfile for both servers, the source's schema archive and what apply needs of it.
async fn dumped(
    tools: &Tools,
    source_db: &Client,
    source: &Endpoint,
    target: &Endpoint,
) -> Result<(MemoryFile, Archive, Identity)> {
    let passfile = MemoryFile::new(
        "pgshift-pgpass",
        super::pgpass_text(&[source, target]).as_bytes(),
    )?;
    let archive = Archive::dump(tools, &passfile, source).await?;
    let identity = identity(source_db).await?;
    Ok((passfile, archive, identity))
}

/// Before the copy: the table definitions with their primary keys and replica identity
/// indexes, restored in one transaction that also records the step.
pub async fn copy_definitions(
    tools: &Tools,
    source_db: &Client,
    source: &Endpoint,
    target: &Endpoint,
) -> Result<()> {
    let (passfile, archive, identity) = dumped(tools, source_db, source, target).await?;
    let mut script = archive
        .script(
            tools,
            &passfile,
            &toc::definitions(&archive.pre_data, &archive.post_data, &identity),
        )
        .await?;
    script.extend_from_slice(super::restore_epilogue_with(DEFINITIONS_ONLY).as_bytes());
    super::restore_in_one_transaction(tools, &passfile, &script, target)
        .await
        .map_err(|cause| {
            Error::Tool(format!(
                "restoring the table definitions of database {} into the target failed (nothing was kept, the restore is one transaction): {cause}",
                target.dbname
            ))
        })
}

/// After the copy: every other index and constraint, `jobs` at a time, then the rest of the
/// schema in one transaction that records the step. Reports each build's progress.
pub async fn build_the_rest(
    tools: &Tools,
    source_db: &Client,
    target_db: &Client,
    source: &Endpoint,
    target: &Endpoint,
    jobs: usize,
    events: &EventSink,
) -> Result<()> {
    let (passfile, archive, identity) = dumped(tools, source_db, source, target).await?;
    end_orphaned_builds(target_db).await?;
    let inventory = inventory(source_db, target_db, &archive.post_data).await?;
    let builds = toc::builds(&archive.post_data, &identity, &inventory.built);
    if !builds.is_empty() {
        let jobs = jobs.max(1);
        events(Event::BuildingStructures {
            database: target.dbname.clone(),
            structures: builds
                .iter()
                .filter_map(|e| inventory.names.get(&(e.catalog, e.oid)).cloned())
                .collect(),
            jobs,
        });
        let list = MemoryFile::new("pgshift-schema-list", toc::listing(builds).as_bytes())?;
        let restore = tool(&tools.pg_restore, &[&passfile, &archive.file, &list])
            // The target database is read-only to everyone but pgshift.
            .env("PGOPTIONS", super::READ_WRITE_SESSION)
            .args([
                "--exit-on-error",
                "--no-password",
                &format!("--jobs={jobs}"),
                &format!("--use-list={}", list.path()),
                // The last of a repeated conninfo key counts: the builds get their own name.
                &format!(
                    "--dbname={} application_name={}",
                    tool_conninfo(target),
                    crate::endpoint::conninfo_value(BUILD_APPLICATION)
                ),
                &archive.file.path(),
            ])
            .output();
        let output = report_progress(restore, target_db, &target.dbname, events)
            .await
            .map_err(|e| Error::Tool(format!("cannot run {}: {e}", tools.pg_restore.display())))?;
        if !output.status.success() {
            return Err(Error::StructureBuild {
                database: target.dbname.clone(),
                cause: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
    }
    let mut script = archive
        .script(
            tools,
            &passfile,
            &toc::finish(&archive.post_data, &identity),
        )
        .await?;
    script.extend_from_slice(super::step_record(names::step::POST_DATA).as_bytes());
    super::restore_in_one_transaction(tools, &passfile, &script, target)
        .await
        .map_err(|cause| {
            Error::Tool(format!(
                "restoring the rest of the schema of database {} into the target failed (nothing of it was kept): {cause}",
                target.dbname
            ))
        })
}

/// Polls the target's `pg_stat_progress_create_index` while `work` runs, and reports it.
async fn report_progress<T>(
    work: impl std::future::Future<Output = T>,
    target_db: &Client,
    database: &str,
    events: &EventSink,
) -> T {
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = tokio::time::sleep(PROGRESS_EVERY) => {
                for (index, phase, done, total) in builds_in_progress(target_db).await {
                    events(Event::IndexBuild {
                        database: database.to_string(),
                        index,
                        phase,
                        done,
                        total,
                    });
                }
            }
        }
    }
}

/// The index builds running on the target: index, phase, blocks or tuples done and in all.
async fn builds_in_progress(target_db: &Client) -> Vec<(String, String, i64, i64)> {
    target_db
        .query(
            // A non-concurrent build's index is not visible until it commits: name its table.
            "SELECT CASE WHEN p.index_relid <> 0 THEN p.index_relid::regclass::text
                         ELSE 'an index on ' || p.relid::regclass::text END, p.phase,
                    CASE WHEN p.blocks_total > 0 THEN p.blocks_done ELSE p.tuples_done END,
                    CASE WHEN p.blocks_total > 0 THEN p.blocks_total ELSE p.tuples_total END
             FROM pg_stat_progress_create_index p WHERE p.datid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect())
        .unwrap_or_default()
}

/// What apply needs on each table of the source (primary keys, replica identity indexes).
async fn identity(source_db: &Client) -> Result<Identity> {
    let constraints = source_db
        .query(
            "SELECT c.oid FROM pg_constraint c LEFT JOIN pg_index i ON i.indexrelid = c.conindid
             WHERE c.contype = 'p' OR (c.contype IN ('u', 'x') AND i.indisreplident)",
            &[],
        )
        .await
        .on(Side::Source, "reading primary keys")?;
    let indexes = source_db
        .query(
            "SELECT i.indexrelid FROM pg_index i
             WHERE i.indisreplident AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)",
            &[],
        )
        .await
        .on(Side::Source, "reading replica identity indexes")?;
    Ok(Identity {
        constraints: constraints.iter().map(|r| r.get(0)).collect(),
        indexes: indexes.iter().map(|r| r.get(0)).collect(),
    })
}

/// The index and constraint builds of the archive: a name for each (from the source's
/// catalogs) and which of them the target already has (a run cut short built them).
struct Inventory {
    names: HashMap<(u32, u32), String>,
    built: HashSet<(u32, u32)>,
}

async fn inventory(
    source_db: &Client,
    target_db: &Client,
    post_data: &[toc::Entry],
) -> Result<Inventory> {
    let oids = |catalog| -> Vec<u32> {
        post_data
            .iter()
            .filter(|e| e.is_build() && e.catalog == catalog)
            .map(|e| e.oid)
            .collect()
    };
    // (source OID, schema, table, name, how the server names it): no table for an index.
    let indexes = source_db
        .query(
            "SELECT c.oid, n.nspname::text, ''::text, c.relname::text, c.oid::regclass::text FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = ANY($1)",
            &[&oids(toc::PG_CLASS)],
        )
        .await
        .on(Side::Source, "reading the indexes to build")?;
    let constraints = source_db
        .query(
            "SELECT c.oid, n.nspname::text, t.relname::text, c.conname::text,
                    quote_ident(c.conname) || ' on ' || t.oid::regclass::text FROM pg_constraint c
             JOIN pg_class t ON t.oid = c.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE c.oid = ANY($1)",
            &[&oids(toc::PG_CONSTRAINT)],
        )
        .await
        .on(Side::Source, "reading the constraints to build")?;
    let mut inventory = Inventory {
        names: HashMap::new(),
        built: HashSet::new(),
    };
    for (catalog, rows) in [(toc::PG_CLASS, indexes), (toc::PG_CONSTRAINT, constraints)] {
        for row in rows {
            let (oid, schema, table, name): (u32, String, String, String) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            inventory.names.insert((catalog, oid), row.get(4));
            let exists: bool = target_db
                .query_one(
                    if catalog == toc::PG_CLASS {
                        "SELECT to_regclass(format('%I.%I', $1::text, $3::text)) IS NOT NULL AND $2::text = ''"
                    } else {
                        "SELECT EXISTS (SELECT 1 FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
                                        JOIN pg_namespace n ON n.oid = t.relnamespace
                                        WHERE n.nspname = $1 AND t.relname = $2 AND c.conname = $3)"
                    },
                    &[&schema, &table, &name],
                )
                .await
                .on(Side::Target, "looking for an index or constraint")?
                .get(0);
            if exists {
                inventory.built.insert((catalog, oid));
            }
        }
    }
    Ok(inventory)
}

/// Ends the sessions of builds a killed pgshift left running (its `pg_restore` outlives it):
/// the lock says no other pgshift works on this upgrade, so they are orphans, and a rerun must
/// not build the same index beside them.
async fn end_orphaned_builds(target_db: &Client) -> Result<()> {
    let orphans = "SELECT pid FROM pg_stat_activity
                   WHERE datname = current_database() AND application_name = $1 AND pid <> pg_backend_pid()";
    target_db
        .execute(
            &format!("SELECT pg_terminate_backend(pid) FROM ({orphans}) o"),
            &[&BUILD_APPLICATION],
        )
        .await
        .on(Side::Target, "ending index builds left by a killed run")?;
    for _ in 0..100 {
        let left = target_db
            .query(orphans, &[&BUILD_APPLICATION])
            .await
            .on(Side::Target, "waiting for index builds to end")?;
        if left.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
