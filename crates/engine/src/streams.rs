//! The replication streams' objects, in either direction (see `decide`): publications, slots and
//! subscriptions, made and dropped idempotently. A stream that starts at a switch point is made
//! disabled, its replication origin advanced to that point, then enabled: the server it reads
//! from sends only what committed after the switch, although its slot is older.

use tokio_postgres::Client;

use crate::decide::Direction;
use crate::error::{Error, Result, Side, SqlContext};
use crate::names;
use crate::sql;

/// Where one stream's objects live, for one database.
pub(crate) struct StreamEnds<'a> {
    pub direction: Direction,
    /// The subscription's (and slot's) name.
    pub name: String,
    /// A session in the publishing server's database (where the slot is made).
    pub publisher: &'a Client,
    /// A session on the publishing server outside the moved databases (slots are dropped there).
    pub publisher_admin: &'a Client,
    /// A session in the subscribing server's database.
    pub subscriber: &'a Client,
}

impl StreamEnds<'_> {
    fn publisher_side(&self) -> Side {
        self.direction.from()
    }
    fn subscriber_side(&self) -> Side {
        self.direction.to()
    }

    /// The slot, from its consistent point on: everything after it reaches the subscription.
    pub async fn create_slot(&self) -> Result<()> {
        let exists: bool = self
            .publisher
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                &[&self.name],
            )
            .await
            .on(self.publisher_side(), "looking for the replication slot")?
            .get(0);
        if exists {
            return Ok(());
        }
        self.publisher
            .query_one(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&self.name],
            )
            .await
            .map(|_| ())
            .on(self.publisher_side(), "creating the replication slot")
            .or_else(Error::made_meanwhile)
    }

    /// The subscription. `from`: the publisher's LSN it starts at (no initial copy); None: an
    /// initial copy of every table, then the changes (the forward stream's first start).
    pub async fn create_subscription(
        &self,
        conninfo: &str,
        publication: &str,
        from: Option<&str>,
    ) -> Result<()> {
        self.subscriber
            .batch_execute(&sql::create_subscription(
                &self.name,
                conninfo,
                publication,
                from.is_none(),
            ))
            .await
            .on(self.subscriber_side(), "creating the subscription")
            .or_else(Error::made_meanwhile)?;
        match from {
            Some(point) => self.enable_from(point).await,
            None => Ok(()),
        }
    }

    /// Advances the subscription's origin to `point` and enables it. Idempotent while it is
    /// disabled (it has applied nothing yet).
    pub async fn enable_from(&self, point: &str) -> Result<()> {
        self.subscriber
            .execute(
                "SELECT pg_replication_origin_advance('pg_' || s.oid, $2::text::pg_lsn)
                 FROM pg_subscription s WHERE s.subname = $1 AND NOT s.subenabled
                   AND s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[&self.name, &point],
            )
            .await
            .on(
                self.subscriber_side(),
                "starting the subscription at the switch point",
            )?;
        self.subscriber
            .batch_execute(&format!(
                "ALTER SUBSCRIPTION {} ENABLE",
                sql::ident(&self.name)
            ))
            .await
            .on(self.subscriber_side(), "enabling the subscription")
    }

    /// The subscription takes on the tables its publication gained, and copies them.
    pub async fn refresh(&self) -> Result<()> {
        self.subscriber
            .batch_execute(&sql::refresh_subscription(&self.name))
            .await
            .on(self.subscriber_side(), "refreshing the subscription")
    }

    /// Drops the subscription and its slot (also a slot left without a subscription).
    pub async fn drop(&self) -> Result<()> {
        let exists: bool = self
            .subscriber
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_subscription WHERE subname = $1
                   AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database()))",
                &[&self.name],
            )
            .await
            .on(self.subscriber_side(), "looking for the subscription")?
            .get(0);
        if exists {
            // DROP SUBSCRIPTION drops the slot on the publisher too; if the publisher cannot be
            // reached for that, detach the slot and drop it below.
            if let Err(error) = self
                .subscriber
                .batch_execute(&format!("DROP SUBSCRIPTION {}", sql::ident(&self.name)))
                .await
            {
                tracing::warn!(error = %crate::error::server_message(&error), "dropping the subscription with its slot failed; detaching it");
                for statement in sql::detach_and_drop_subscription(&self.name) {
                    self.subscriber
                        .batch_execute(&statement)
                        .await
                        .on(self.subscriber_side(), "dropping the subscription")?;
                }
            }
        }
        drop_slot(self.publisher_admin, self.publisher_side(), &self.name).await
    }
}

/// The tables a table-list publication of pgshift's carries: every table whose changes
/// logical replication can send (permanent, not partitioned: a partitioned table's rows are in
/// its partitions, listed themselves, as `FOR ALL TABLES` does), the marker table included and
/// pgshift's state table never. (schema, name), in order.
pub(crate) const PUBLISHABLE_TABLES: &str = "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind = 'r' AND c.relpersistence = 'p'
       AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
       AND NOT (n.nspname = $1 AND c.relname <> $2)";

/// The tables of the session's database that a table-list publication would carry.
async fn publishable_tables(server: &Client, side: Side) -> Result<Vec<(String, String)>> {
    Ok(server
        .query(
            &format!("{PUBLISHABLE_TABLES} ORDER BY 1, 2"),
            &[&names::META_SCHEMA, &names::MARKER_TABLE],
        )
        .await
        .on(side, "listing the tables to publish")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// The source's publication for the forward stream. A superuser publishes `FOR ALL TABLES`, as
/// always; another role may not, and publishes the list of the tables there are now (it owns
/// them: preflight checked), which `add_to_forward_publication` keeps complete.
pub(crate) async fn create_forward_publication(source: &Client) -> Result<()> {
    let superuser: bool = source
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .on(Side::Source, "reading the privileges of pgshift's role")?
        .get(0);
    let statement = if superuser {
        sql::create_publication()
    } else {
        sql::create_table_list_publication(
            names::PUBLICATION,
            &publishable_tables(source, Side::Source).await?,
        )
    };
    source
        .batch_execute(&statement)
        .await
        .on(Side::Source, "creating the publication")
        .or_else(Error::made_meanwhile)
}

/// Adds tables created on the source during the upgrade to its table-list publication.
pub(crate) async fn add_to_forward_publication(
    source: &Client,
    tables: &[(String, String)],
) -> Result<()> {
    source
        .batch_execute(&sql::add_to_publication(names::PUBLICATION, tables))
        .await
        .on(Side::Source, "adding new tables to the publication")
        .or_else(Error::made_meanwhile)
}

/// The target's publication for the back stream: every table of the database but pgshift's
/// state table (which must never reach the source), the marker table included.
pub(crate) async fn create_back_publication(target: &Client) -> Result<()> {
    if crate::observe::back_publication_exists(target).await? {
        return Ok(());
    }
    let tables = publishable_tables(target, Side::Target).await?;
    target
        .batch_execute(&sql::create_table_list_publication(
            names::BACK_PUBLICATION,
            &tables,
        ))
        .await
        .on(Side::Target, "creating the rollback window's publication")
        .or_else(Error::made_meanwhile)
}

/// Tables of the target that the back publication does not carry (made during the window):
/// their rows would not reach the source.
pub(crate) async fn unpublished_back_tables(target: &Client) -> Result<Vec<String>> {
    Ok(target
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'r' AND c.relpersistence = 'p'
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
               AND n.nspname <> $1
               AND NOT EXISTS (SELECT 1 FROM pg_publication_tables p
                               WHERE p.pubname = $2 AND p.schemaname = n.nspname AND p.tablename = c.relname)
             ORDER BY 1",
            &[&names::META_SCHEMA, &names::BACK_PUBLICATION],
        )
        .await
        .on(Side::Target, "comparing tables with the rollback window's publication")?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Drops a slot, waiting briefly for a walsender that still holds it to let go.
pub(crate) async fn drop_slot(server: &Client, side: Side, slot: &str) -> Result<()> {
    for attempt in 0..50 {
        match server
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
        {
            Ok(_) => return Ok(()),
            // 55006: the slot is active; its walsender is shutting down.
            Err(error)
                if error.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE)
                    && attempt < 49 =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(error) => return Err(error).on(side, &format!("dropping replication slot {slot}")),
        }
    }
    Ok(())
}
