//! Indexes and constraints that apply does not need are built after the initial copy. One that
//! cannot be built (rows on the target break it) is an error naming it; once the cause is
//! removed, a rerun builds only what the failed run left, and the target ends with every
//! index and constraint of the source.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{checksums, exec, pair, plan, structures};
use pgshift_engine::decide::{Action, Next};
use pgshift_engine::{events, CutoverMode, Error, Event, Phase, Upgrade};

const SCHEMA: &str = "
    CREATE TABLE codes (id int PRIMARY KEY, code int NOT NULL, note text);
    CREATE UNIQUE INDEX codes_code ON codes (code);
    CREATE INDEX codes_note ON codes (note);
    INSERT INTO codes SELECT g, g, 'note ' || (g % 7) FROM generate_series(1, 2000) g;
    CREATE TABLE visits (id bigserial PRIMARY KEY, code_id int NOT NULL REFERENCES codes, at timestamptz NOT NULL);
    CREATE INDEX visits_at ON visits (at);
    ALTER TABLE visits ADD CONSTRAINT visits_recent CHECK (at > '2000-01-01');
    INSERT INTO visits (code_id, at) SELECT 1 + g % 2000, now() - g * interval '1 minute' FROM generate_series(1, 5000) g;";

/// Steps the upgrade until the next thing it would do is building the indexes.
async fn until_the_builds(upgrade: &mut Upgrade, policy: &pgshift_engine::decide::Policy) {
    for _ in 0..600 {
        let (_, next) = upgrade.decided(policy).await.unwrap();
        match next {
            Next::Act {
                action: Action::BuildIndexes,
                ..
            } => return,
            Next::WaitForCopy => tokio::time::sleep(Duration::from_millis(100)).await,
            _ => {
                upgrade.advance_with(policy).await.unwrap();
            }
        }
    }
    panic!("the upgrade never reached the index builds");
}

#[tokio::test]
async fn a_broken_build_is_named_and_a_rerun_builds_only_what_is_missing() {
    let pair = pair(15, 18).await;
    pair.source.create_database("app").await.unwrap();
    exec(&pair.source, "app", SCHEMA).await;
    let mut manual = plan(&pair, "app");
    manual.cutover = CutoverMode::Manual;
    let policy = manual.policy(false);

    let mut upgrade = Upgrade::connect(manual.clone(), events::discard())
        .await
        .unwrap();
    until_the_builds(&mut upgrade, &policy).await;
    // The copy loaded bare tables: of the indexes and constraints, only the primary keys
    // (what apply needs) exist on the target so far.
    let before = structures(&pair.target, "app").await;
    for deferred in [
        "codes_code",
        "codes_note",
        "visits_at",
        "visits_code_id_fkey",
    ] {
        assert!(
            !before.iter().any(|s| s.contains(deferred)),
            "{deferred} was on the target before the initial copy ended: {before:?}"
        );
    }
    assert!(
        before.iter().any(|s| s.contains("codes_pkey")),
        "{before:?}"
    );

    // Someone writes a duplicate code on the target, around pgshift's read-only guard.
    exec(
        &pair.target,
        "app",
        "BEGIN READ WRITE; INSERT INTO codes VALUES (-1, 7, 'duplicate'); COMMIT",
    )
    .await;
    let error = upgrade.run().await.unwrap_err();
    let Error::StructureBuild { database, cause } = &error else {
        panic!("expected StructureBuild, got {error}");
    };
    assert_eq!(database, "app");
    assert!(
        cause.contains("codes_code"),
        "the index is not named: {cause}"
    );
    assert!(
        error.to_string().contains("delete them) and run again"),
        "{error}"
    );
    drop(upgrade);

    // What the failed run built stays; the rerun builds the others, each once.
    let kept = structures(&pair.target, "app").await;
    exec(
        &pair.target,
        "app",
        "BEGIN READ WRITE; DELETE FROM codes WHERE id = -1; COMMIT",
    )
    .await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = {
        let seen = seen.clone();
        Arc::new(move |event: Event| {
            if let Event::BuildingStructures { structures, .. } = event {
                seen.lock().unwrap().push(structures);
            }
        })
    };
    let outcome = Upgrade::connect(manual, sink)
        .await
        .unwrap()
        .run()
        .await
        .unwrap();
    assert_eq!(outcome.finished, Phase::ReadyForCutover);
    let rebuilt = seen.lock().unwrap().clone();
    assert_eq!(rebuilt.len(), 1, "one round of builds: {rebuilt:?}");
    let rebuilt = &rebuilt[0];
    assert!(
        rebuilt.iter().any(|s| s.contains("codes_code")),
        "{rebuilt:?}"
    );
    for name in rebuilt {
        let short = name.split(' ').next().unwrap().rsplit('.').next().unwrap();
        assert!(
            !kept.iter().any(|k| k.contains(&format!(".{short}:"))),
            "{name} was built again although the failed run had built it: {kept:?}"
        );
    }
    assert_eq!(
        structures(&pair.source, "app").await,
        structures(&pair.target, "app").await
    );
    assert_eq!(
        checksums(&pair.source, "app").await,
        checksums(&pair.target, "app").await
    );
}
