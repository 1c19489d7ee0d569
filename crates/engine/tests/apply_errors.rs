//! DDL on the source during the upgrade breaks apply on the target. pgshift must say why,
//! read from the target — not wait on a lag that never shrinks — and never cut over while
//! apply fails. Once the cause is fixed as the message says, the upgrade finishes.

mod common;

use common::{checksums, exec, pair, plan};
use pgshift_engine::{events, CutoverMode, Error, Phase, Upgrade};

#[tokio::test]
async fn ddl_on_the_source_is_named_and_blocks_the_cutover() {
    let pair = pair(15, 18).await;
    pair.source.create_database("app").await.unwrap();
    exec(
        &pair.source,
        "app",
        "CREATE TABLE items (id serial PRIMARY KEY, n int); INSERT INTO items (n) VALUES (1), (2)",
    )
    .await;

    let mut manual = plan(&pair, "app");
    manual.cutover = CutoverMode::Manual;
    assert_eq!(
        Upgrade::connect(manual, events::discard())
            .await
            .unwrap()
            .run()
            .await
            .unwrap()
            .finished,
        Phase::ReadyForCutover
    );

    // Someone changes the schema on the source while pgshift replicates.
    exec(
        &pair.source,
        "app",
        "ALTER TABLE items ADD COLUMN note text; INSERT INTO items (n, note) VALUES (3, 'new')",
    )
    .await;

    let mut upgrade = Upgrade::connect(plan(&pair, "app"), events::discard())
        .await
        .unwrap();
    let error = upgrade.run().await.unwrap_err();
    let Error::ApplyFailing { database, cause } = &error else {
        panic!("expected ApplyFailing, got {error}");
    };
    assert_eq!(database, "app");
    assert!(
        cause.contains("column public.items.note exists on the source but not on the target"),
        "{cause}"
    );
    assert!(
        cause.contains("ALTER TABLE public.items ADD COLUMN \"note\" text"),
        "{cause}"
    );
    // No cutover happened: the target is still read-only and not switched; the source takes writes.
    let status = upgrade.status().await.unwrap();
    assert_ne!(status.phase, Phase::Done);
    assert!(
        status.databases[0]
            .apply_problem
            .as_deref()
            .unwrap_or("")
            .contains("public.items.note"),
        "{status:?}"
    );
    exec(
        &pair.source,
        "app",
        "INSERT INTO items (n, note) VALUES (4, 'still writable')",
    )
    .await;

    // The fix the message gives, applied on the target; then the upgrade finishes.
    let target = pair.target.connect("app").await.unwrap();
    target
        .batch_execute("SET default_transaction_read_only = off")
        .await
        .unwrap();
    target
        .batch_execute("ALTER TABLE public.items ADD COLUMN \"note\" text")
        .await
        .unwrap();
    let outcome = upgrade.run().await.unwrap();
    assert_eq!(outcome.finished, Phase::WindowOpen);
    assert_eq!(
        checksums(&pair.source, "app").await,
        checksums(&pair.target, "app").await
    );
}
