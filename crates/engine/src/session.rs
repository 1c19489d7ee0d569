//! pgshift's own sessions on the servers: how they are opened and prepared.

use tokio_postgres::Client;

use crate::endpoint::Endpoint;
use crate::error::{Result, SqlContext};

/// Opens a pgshift session: writes are allowed in it even where the database is read-only.
pub(crate) async fn open(endpoint: &Endpoint) -> Result<(Client, i32)> {
    let client = endpoint.connect().await?;
    let pid = client
        .simple_query("SET default_transaction_read_only = off; SELECT pg_backend_pid()")
        .await
        .on(endpoint.side, "preparing the session")?
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).and_then(|p| p.parse().ok()),
            _ => None,
        })
        .unwrap_or_default();
    Ok((client, pid))
}
