//! The operator end to end, on a real control plane with a process kubelet (pgshift-testkit):
//! a PostgresUpgrade moves a live `postgres:15` StatefulSet to `postgres:18` while ledger
//! clients write through the Service they always use.

mod k8s;

use std::time::Duration;

use k8s::{Fixture, APP_DB};
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams};
use pgshift_operator::crd::Phase;
use serde_json::json;

fn condition<'a>(
    status: &'a pgshift_operator::crd::PostgresUpgradeStatus,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("condition {type_} in {:?}", status.conditions))
}

/// An upgrade without a rollback window: it completes at the switch.
fn spec(mode: &str) -> serde_json::Value {
    json!({
        "source": {"service": {"name": "db"}, "databases": [APP_DB], "credentialsSecret": "db-superuser",
                   "workload": {"kind": "StatefulSet", "name": "db"}},
        "target": {"image": "postgres:18", "storage": {"size": "1Gi"}},
        "traffic": {"service": "db", "mode": mode, "pgbouncer": {"image": "pgbouncer/pgbouncer:1.24", "replicas": 2}},
        "cutover": {"mode": "Automatic", "maxPause": "2s"},
        "rollback": {"window": "0"},
    })
}

/// The spec with a rollback window of `window` (the switch opens it).
fn window_spec(mode: &str, window: &str) -> serde_json::Value {
    let mut windowed = spec(mode);
    windowed["rollback"] = json!({"window": window});
    windowed
}

/// The spec with a manual cutover (it waits at ReadyForCutover for `approved: true`).
fn manual_spec(mode: &str) -> serde_json::Value {
    let mut manual = spec(mode);
    manual["cutover"]["mode"] = json!("Manual");
    manual
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pgbouncer_mode_moves_a_live_database_with_no_failed_or_lost_transaction() {
    let mut fx = Fixture::start(15, &[]).await;
    fx.start_operator("operator-a");
    let ledger = fx.ledger(4).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut spec = spec("PgBouncer");
    spec["cleanup"] = json!({"deleteSource": true});
    fx.apply_upgrade("orders", spec).await;
    let phases = fx
        .wait_for_phase("orders", Phase::Completed, Duration::from_secs(240))
        .await;
    // Writes go on after the switch, against the new server.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = ledger.stop().await;
    eprintln!("ledger: {}", serde_json::to_string(&report).unwrap());

    let app = fx.app().await;
    assert_eq!(
        k8s::major(&app).await,
        18,
        "the clients' Service reaches 18"
    );
    let verification = pgshift_lab::ledger::Ledger::verify(&app, &report)
        .await
        .unwrap();
    eprintln!("verification: {verification:?}");
    assert!(report.committed > 100, "the load ran: {report:?}");
    let pgbouncer = || fx.pgbouncer_log_tails("orders", 80);
    assert_eq!(
        (report.failed, report.in_doubt),
        (0, 0),
        "failed and in-doubt transactions: {:?}\n{}",
        report.errors,
        pgbouncer()
    );
    assert_eq!(verification.lost, 0, "acknowledged commits lost");
    assert!(verification.is_ok(), "{verification:?}");
    // Each PgBouncer is told to RECONNECT once, at the switch, while it is paused and holds no
    // server connection: a RECONNECT on a live PgBouncer ends its server logins in progress,
    // which it counts as failed logins and answers clients with `server_login_retry` errors.
    for (pod, log) in fx.pod_logs("orders-pgbouncer-") {
        assert_eq!(
            log.matches("RECONNECT command issued").count(),
            1,
            "console commands of {pod}:\n{}",
            log.lines()
                .filter(|l| l.contains("command issued") || l.contains("connect string changed"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    for phase in [Phase::Provisioning, Phase::CuttingOver, Phase::Completed] {
        assert!(phases.contains(&phase), "{phase:?} in {phases:?}");
    }
    let upgrade = fx.upgrades().get("orders").await.unwrap();
    let status = upgrade.status.unwrap();
    assert!(status.source_version.as_deref().unwrap().starts_with("15."));
    assert!(status.target_version.as_deref().unwrap().starts_with("18."));
    let ready = condition(&status, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Completed")
    );
    let cutover = status.cutover.expect("the cutover is reported");
    assert!(cutover.pause_ms.unwrap() > 0.0 && cutover.attempts >= 1);
    let db = &status.databases[0];
    assert_eq!((db.name.as_str(), db.step.as_str()), (APP_DB, "Switched"));
    assert!(
        db.tables_total >= 3 && db.tables_ready == db.tables_total,
        "{db:?}"
    );
    assert_eq!(
        status.tables.as_deref(),
        Some(format!("{0}/{0}", db.tables_total).as_str())
    );

    let table = fx.table().await;
    eprintln!("kubectl get pgu:\n{}", k8s::render_table(&table));
    let row = &table["rows"][0]["cells"];
    assert_eq!(row[1], "Completed");
    assert!(row[2].as_str().unwrap().starts_with("15."));
    assert!(row[3].as_str().unwrap().starts_with("18."));
    assert_eq!(row[6], json!(cutover.pause.unwrap()));

    let sets: Api<k8s_openapi::api::apps::v1::StatefulSet> =
        Api::namespaced(fx.client.clone(), k8s::NS);
    assert!(
        sets.get_opt("db").await.unwrap().is_none(),
        "cleanup.deleteSource removed the old StatefulSet"
    );
    let target = sets.get("orders-target").await.unwrap();
    assert!(
        target
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty(),
        "the new server no longer belongs to the upgrade"
    );

    let metrics = fx.metrics(0).await;
    for series in [
        "pgshift_upgrade_phase{namespace=\"default\",name=\"orders\",phase=\"Completed\"} 1",
        "pgshift_upgrade_phase{namespace=\"default\",name=\"orders\",phase=\"Replicating\"} 0",
        "pgshift_cutover_pause_seconds{namespace=\"default\",name=\"orders\"}",
        "pgshift_cutover_attempts_total{namespace=\"default\",name=\"orders\"} 1",
    ] {
        assert!(metrics.contains(series), "{series} in\n{metrics}");
    }

    let events: Api<Event> = Api::namespaced(fx.client.clone(), k8s::NS);
    let reasons: Vec<String> = events
        .list(&ListParams::default().fields("involvedObject.kind=PostgresUpgrade"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    eprintln!("events: {reasons:?}");
    for reason in [
        "Provisioning",
        "ClientsRouted",
        "SchemaCopyStarted",
        "CutoverCompleted",
        "Completed",
    ] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "event {reason} in {reasons:?}"
        );
    }
}

/// The way back through PgBouncer, under load: the switch opens the rollback window (the old
/// StatefulSet stays despite `cleanup.deleteSource`), `rollback.requested: true` moves the
/// clients back with no failed and no lost transaction (every acknowledged commit on the source
/// exactly once) and holds the upgrade at RolledBack; clearing it cuts over again, and the
/// window's end completes the upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollback_through_pgbouncer_loses_nothing_and_the_upgrade_cuts_over_again() {
    let mut fx = Fixture::start(15, &[]).await;
    fx.start_operator("operator-a");
    let mut spec = window_spec("PgBouncer", "24h");
    spec["cleanup"] = json!({"deleteSource": true});
    let ledger = fx.ledger(4).await;
    fx.apply_upgrade("orders", spec.clone()).await;
    fx.wait_for_phase("orders", Phase::RollbackWindow, Duration::from_secs(240))
        .await;
    // Writes go on against the new server; the old one follows it and is kept.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = fx.upgrades().get("orders").await.unwrap().status.unwrap();
    assert_eq!(status.phase, Some(Phase::RollbackWindow));
    let progressing = condition(&status, "Progressing");
    assert_eq!(progressing.reason, "RollbackWindow");
    assert_eq!(
        status.blockers,
        [],
        "a blocker seen once is gone once preflight passes"
    );
    assert_eq!(
        status.direction.as_deref(),
        Some("Back"),
        "the source follows"
    );
    assert!(status.rollback.as_ref().unwrap().window_opened.is_some());
    let ends: k8s_openapi::jiff::Timestamp = status
        .rollback
        .as_ref()
        .and_then(|r| r.window_ends.as_deref())
        .expect("status.rollback.windowEnds")
        .parse()
        .unwrap();
    let left = ends.duration_since(k8s_openapi::jiff::Timestamp::now());
    assert!(
        left > k8s_openapi::jiff::SignedDuration::from_hours(23),
        "a day from the switch: ends {ends}"
    );
    assert_eq!(k8s::major(&fx.app().await).await, 18);
    let sets: Api<k8s_openapi::api::apps::v1::StatefulSet> =
        Api::namespaced(fx.client.clone(), k8s::NS);
    assert!(
        sets.get_opt("db").await.unwrap().is_some(),
        "the old StatefulSet stays while the window is open"
    );
    eprintln!("kubectl get pgu:\n{}", k8s::render_table(&fx.table().await));
    eprintln!("status:\n{}", serde_yaml::to_string(&status).unwrap());

    spec["rollback"]["requested"] = json!(true);
    fx.apply_upgrade("orders", spec.clone()).await;
    let phases = fx
        .wait_for_phase("orders", Phase::RolledBack, Duration::from_secs(120))
        .await;
    assert!(phases.contains(&Phase::RollingBack), "{phases:?}");
    // The clients write on the old server again; the held upgrade stays where it is.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = fx.upgrades().get("orders").await.unwrap().status.unwrap();
    assert_eq!(
        status.phase,
        Some(Phase::RolledBack),
        "held while requested"
    );
    let progressing = condition(&status, "Progressing");
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_str()),
        ("False", "RolledBack")
    );
    eprintln!("kubectl get pgu:\n{}", k8s::render_table(&fx.table().await));
    eprintln!("status:\n{}", serde_yaml::to_string(&status).unwrap());
    let rollback = status.rollback.clone().unwrap();
    assert_eq!(rollback.window_ends, None, "no window is open");
    assert_eq!(
        status.direction.as_deref(),
        Some("Forward"),
        "the target follows"
    );
    let pause = rollback.cutover.expect("the rollback is reported");
    eprintln!("rollback: {pause:?}");
    assert!(pause.pause_ms.unwrap() > 0.0);
    assert_eq!(
        k8s::major(&fx.app().await).await,
        15,
        "the clients' route is on the source"
    );
    let routes: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(fx.client.clone(), k8s::NS);
    let route = routes.get("orders-route").await.unwrap().spec.unwrap();
    assert_eq!(
        route.selector,
        Some([("app".to_string(), "db".to_string())].into()),
        "PgBouncer's route selects the source's pods again"
    );
    let report = ledger.stop().await;
    eprintln!("ledger: {}", serde_json::to_string(&report).unwrap());
    let verification =
        pgshift_lab::ledger::Ledger::verify(&fx.source_direct(APP_DB).await, &report)
            .await
            .unwrap();
    eprintln!("verification on the source: {verification:?}");
    assert!(report.committed > 100, "the load ran: {report:?}");
    assert_eq!(
        (report.failed, report.in_doubt),
        (0, 0),
        "failed and in-doubt transactions: {:?}\n{}",
        report.errors,
        fx.pgbouncer_log_tails("orders", 40)
    );
    assert_eq!(verification.lost, 0, "{verification:?}");
    assert!(verification.is_ok(), "{verification:?}");
    assert!(!event_messages(&fx, "RollbackCompleted").await.is_empty());

    // Cleared: the upgrade cuts over again (automatic), then the window's end completes it.
    let ledger = fx.ledger(4).await;
    spec["rollback"]["requested"] = json!(false);
    fx.apply_upgrade("orders", spec.clone()).await;
    fx.wait_for_phase("orders", Phase::RollbackWindow, Duration::from_secs(120))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(k8s::major(&fx.app().await).await, 18);
    spec["rollback"]["window"] = json!("1s");
    fx.apply_upgrade("orders", spec).await;
    fx.wait_for_phase("orders", Phase::Completed, Duration::from_secs(60))
        .await;
    eprintln!("kubectl get pgu:\n{}", k8s::render_table(&fx.table().await));
    assert_nothing_failed_or_lost(&fx, ledger).await;
    assert_eq!(
        k8s::replication_objects(&fx.target_direct("orders", APP_DB).await).await,
        Vec::<String>::new()
    );
    pgshift_testkit::eventually(
        "cleanup.deleteSource to delete the old StatefulSet",
        Duration::from_secs(30),
        || async { sets.get_opt("db").await.unwrap().is_none().then_some(()) },
    )
    .await;
}

/// `Service` mode's way back: the rollback points the clients' Service at the source's pods
/// again (proven by logins through it); clients lose at most the transactions of the sessions
/// the two fences ended, nothing acknowledged is lost. Deleting the rolled-back upgrade then
/// aborts it: the source and the clients' Service end as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn service_mode_rolls_back_and_deleting_the_rolled_back_upgrade_aborts_it() {
    let mut fx = Fixture::start(15, &[]).await;
    let (before, service_before) = as_found(&fx).await;
    fx.start_operator("operator-a");
    let ledger = fx.ledger(4).await;
    let mut spec = window_spec("Service", "24h");
    fx.apply_upgrade("orders", spec.clone()).await;
    fx.wait_for_phase("orders", Phase::RollbackWindow, Duration::from_secs(240))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(k8s::major(&fx.app().await).await, 18);
    spec["rollback"]["requested"] = json!(true);
    fx.apply_upgrade("orders", spec).await;
    fx.wait_for_phase("orders", Phase::RolledBack, Duration::from_secs(120))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        k8s::major(&fx.app().await).await,
        15,
        "the clients' Service reaches the source"
    );
    let report = ledger.stop().await;
    eprintln!("ledger: {}", serde_json::to_string(&report).unwrap());
    let verification =
        pgshift_lab::ledger::Ledger::verify(&fx.source_direct(APP_DB).await, &report)
            .await
            .unwrap();
    assert_eq!(verification.lost, 0, "{verification:?}");
    assert!(verification.is_ok(), "{verification:?}");
    let status = fx.upgrades().get("orders").await.unwrap().status.unwrap();
    let ended = status.cutover.and_then(|c| c.sessions_ended).unwrap_or(0)
        + status
            .rollback
            .and_then(|r| r.cutover)
            .and_then(|c| c.sessions_ended)
            .unwrap_or(0);
    assert!(
        report.failed + report.in_doubt <= ended as u64,
        "client errors {} + {} > sessions ended {ended}: {:?}",
        report.failed,
        report.in_doubt,
        report.errors
    );
    delete_and_check_everything_restored(&fx, &before, &service_before).await;
}
/// A window that expires: the upgrade waits in RollbackWindow while the source follows the
/// target, then the window's end performs cleanup by itself — no replication object left on
/// either server — and the upgrade is Completed. A rollback asked for after that changes
/// nothing and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_rollback_window_cleans_up_both_servers_and_refuses_a_late_rollback() {
    let mut fx = Fixture::start(15, &[]).await;
    fx.start_operator("operator-a");
    let mut spec = window_spec("Service", "20s");
    fx.apply_upgrade("orders", spec.clone()).await;
    fx.wait_for_phase("orders", Phase::RollbackWindow, Duration::from_secs(240))
        .await;
    let status = fx.upgrades().get("orders").await.unwrap().status.unwrap();
    let ends = status
        .rollback
        .as_ref()
        .and_then(|r| r.window_ends.clone())
        .expect("status.rollback.windowEnds");
    let table = fx.table().await;
    eprintln!("kubectl get pgu:\n{}", k8s::render_table(&table));
    assert_eq!(
        table["rows"][0]["cells"][7],
        json!(ends),
        "the WINDOW ENDS column"
    );
    assert!(
        k8s::replication_objects(&fx.source_direct(APP_DB).await)
            .await
            .iter()
            .any(|o| o.starts_with("subscription ")),
        "the source follows the target in the window"
    );

    fx.wait_for_phase("orders", Phase::Completed, Duration::from_secs(120))
        .await;
    for (server, app) in [
        ("source", fx.source_direct(APP_DB).await),
        ("target", fx.target_direct("orders", APP_DB).await),
    ] {
        assert_eq!(
            k8s::replication_objects(&app).await,
            Vec::<String>::new(),
            "pgshift's replication objects on the {server} after the window's end"
        );
    }
    assert!(!event_messages(&fx, "RollbackWindow").await.is_empty());

    spec["rollback"]["requested"] = json!(true);
    fx.apply_upgrade("orders", spec).await;
    let unavailable = pgshift_testkit::eventually(
        "an event saying the rollback is unavailable",
        Duration::from_secs(30),
        || async {
            let messages = event_messages(&fx, "RollbackUnavailable").await;
            (!messages.is_empty()).then_some(messages)
        },
    )
    .await;
    eprintln!("RollbackUnavailable: {unavailable:?}");
    assert!(
        unavailable[0].contains("rollback window ended"),
        "{unavailable:?}"
    );
    let status = fx.upgrades().get("orders").await.unwrap().status.unwrap();
    assert_eq!(status.phase, Some(Phase::Completed));
    assert_eq!(
        k8s::major(&fx.app().await).await,
        18,
        "clients stay on the target"
    );
}

/// Rollback settings the API server refuses, each with its fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_rollback_settings_are_refused_with_their_fix() {
    let fx = Fixture::start(15, &[]).await;
    for (rollback, message) in [
        (
            json!({"window": "1d"}),
            "rollback.window is a duration such as 24h, 90m, 1h30m or 30s, or 0 for no rollback window",
        ),
        (
            json!({"window": "0", "requested": true}),
            "spec.rollback.requested needs a rollback window, and spec.rollback.window is 0",
        ),
    ] {
        let mut bad = spec("PgBouncer");
        bad["rollback"] = rollback.clone();
        let error = refused(&fx, bad).await;
        eprintln!("{rollback}: {error}");
        assert!(error.to_string().contains(message), "{rollback}: {error}");
    }
}

/// Invalid specs are refused by the API server with a message that says what to fix; a source
/// without `wal_level=logical` and with a keyless table is Blocked, with each fix named, and
/// nothing changed on the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_specs_are_refused_and_a_blocked_source_is_left_untouched() {
    let mut fx = Fixture::start(15, &["-c", "wal_level=replica"]).await;
    let refusals = [
        (
            json!({"host": "db.example", "service": {"name": "db"}}),
            "source",
            "set exactly one of spec.source.host and spec.source.service",
        ),
        (
            json!("5m"),
            "maxPause",
            "maxPause is a duration between 10ms and 60s",
        ),
        (
            json!("big"),
            "size",
            "storage.size is a quantity such as 10Gi or 500Mi",
        ),
        (json!("Magic"), "mode", "Unsupported value: \"Magic\""),
    ];
    for (value, field, message) in refusals {
        let mut bad = spec("PgBouncer");
        match field {
            "source" => {
                value
                    .as_object()
                    .unwrap()
                    .iter()
                    .for_each(|(k, v)| bad["source"][k] = v.clone());
            }
            "maxPause" => bad["cutover"]["maxPause"] = value,
            "size" => bad["target"]["storage"]["size"] = value,
            _ => bad["traffic"]["mode"] = value,
        }
        let error = refused(&fx, bad).await;
        eprintln!("{field}: {error}");
        assert!(error.to_string().contains(message), "{field}: {error}");
    }

    let server = fx.source_direct("postgres").await;
    let data_dir: String = server
        .query_one("SELECT current_setting('data_directory')", &[])
        .await
        .unwrap()
        .get(0);
    let location = std::path::Path::new(&data_dir).with_file_name("archive-tablespace");
    std::fs::create_dir_all(&location).unwrap();
    let owner = std::fs::metadata(&data_dir).unwrap();
    std::os::unix::fs::chown(
        &location,
        Some(std::os::unix::fs::MetadataExt::uid(&owner)),
        Some(std::os::unix::fs::MetadataExt::gid(&owner)),
    )
    .unwrap();
    server
        .batch_execute(&format!(
            "CREATE TABLESPACE archive LOCATION '{}'",
            location.display()
        ))
        .await
        .unwrap();
    let app = fx.source_direct(APP_DB).await;
    app.batch_execute("CREATE TABLE archived (id int PRIMARY KEY) TABLESPACE archive")
        .await
        .unwrap();
    app.batch_execute("CREATE TABLE keyless (note text)")
        .await
        .unwrap();
    let before = fx.source_state().await;
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(fx.client.clone(), k8s::NS);
    let service_before = services.get("db").await.unwrap().spec;
    fx.start_operator("operator-a");
    fx.apply_upgrade("orders", spec("PgBouncer")).await;
    fx.wait_for_phase("orders", Phase::Blocked, Duration::from_secs(120))
        .await;
    let status = fx.upgrades().get("orders").await.unwrap().status.unwrap();
    let blocked = condition(&status, "Blocked");
    eprintln!("Blocked: {}", blocked.message);
    assert_eq!(blocked.status, "True");
    assert!(blocked.message.contains("wal_level") && blocked.message.contains("logical"));
    assert!(blocked.message.contains("keyless"), "{}", blocked.message);
    let codes: Vec<&str> = status.blockers.iter().map(|b| b.code.as_str()).collect();
    assert!(codes.contains(&"wal_level"), "{codes:?}");
    assert!(codes.contains(&"tablespace_missing"), "{codes:?}");
    assert!(
        blocked.message.contains("CREATE TABLESPACE \"archive\""),
        "{}",
        blocked.message
    );
    assert!(status.blockers.iter().all(|b| !b.fix.is_empty()));
    // Still blocked a while later, and nothing changed on the source or its Service.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        fx.upgrades()
            .get("orders")
            .await
            .unwrap()
            .status
            .unwrap()
            .phase,
        Some(Phase::Blocked)
    );
    assert_eq!(fx.source_state().await, before);
    assert_eq!(services.get("db").await.unwrap().spec, service_before);
}

/// `Service` mode with a manual cutover: the upgrade waits at ReadyForCutover (clients stay on
/// 15) until approved, then flips the Service. Clients see errors only from the sessions the
/// fence ended, which status counts; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn service_mode_waits_for_approval_then_moves_clients_with_counted_errors() {
    let mut fx = Fixture::start(15, &[]).await;
    fx.start_operator("operator-a");
    let ledger = fx.ledger(4).await;
    let mut manual = manual_spec("Service");
    fx.apply_upgrade("orders", manual.clone()).await;
    fx.wait_for_phase("orders", Phase::ReadyForCutover, Duration::from_secs(240))
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let waiting = fx.upgrades().get("orders").await.unwrap().status.unwrap();
    assert_eq!(
        waiting.phase,
        Some(Phase::ReadyForCutover),
        "it waits for approval"
    );
    let progressing = condition(&waiting, "Progressing");
    assert_eq!(progressing.reason, "AwaitingApproval");
    assert!(progressing.message.contains("approved: true"));
    let app = fx.app().await;
    assert_eq!(
        k8s::major(&app).await,
        15,
        "clients are still on the source"
    );

    manual["cutover"]["approved"] = json!(true);
    fx.apply_upgrade("orders", manual).await;
    fx.wait_for_phase("orders", Phase::Completed, Duration::from_secs(120))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = ledger.stop().await;
    eprintln!("ledger: {}", serde_json::to_string(&report).unwrap());
    let app = fx.app().await;
    assert_eq!(k8s::major(&app).await, 18, "the Service reaches the target");
    let verification = pgshift_lab::ledger::Ledger::verify(&app, &report)
        .await
        .unwrap();
    assert_eq!(verification.lost, 0, "{verification:?}");
    assert!(verification.is_ok(), "{verification:?}");
    let cutover = fx
        .upgrades()
        .get("orders")
        .await
        .unwrap()
        .status
        .unwrap()
        .cutover
        .unwrap();
    eprintln!("cutover: {cutover:?}");
    let ended = cutover
        .sessions_ended
        .expect("Service mode counts the sessions it ended");
    // Each ended session costs its client at most one transaction; the route stays isolated
    // (connections refused, not failed transactions) until the target takes over.
    assert!(
        report.failed + report.in_doubt <= ended as u64,
        "client errors {} + {} > sessions ended {ended}: {:?}",
        report.failed,
        report.in_doubt,
        report.errors
    );
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(fx.client.clone(), k8s::NS);
    let service = services.get("db").await.unwrap();
    assert!(
        !service
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("pgshift.io/original-service"),
        "the bookkeeping annotation is gone after completion"
    );
}

/// Deleting the resource mid-replication aborts: the source ends exactly as it was (no slot,
/// no publication, no pgshift schema), the clients' Service is restored, the target is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_the_upgrade_mid_replication_restores_the_source_and_removes_the_target() {
    let mut fx = Fixture::start(15, &[]).await;
    let before = fx.source_state().await;
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(fx.client.clone(), k8s::NS);
    let service_before = services.get("db").await.unwrap().spec;
    // Enough rows that the initial copy is still running when the resource is deleted.
    let app = fx.source_direct(APP_DB).await;
    app.batch_execute(
        "CREATE TABLE big (id bigint PRIMARY KEY, payload text);
         INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 400000) g;",
    )
    .await
    .unwrap();
    let before_with_big = fx.source_state().await;
    assert_ne!(before, before_with_big);
    fx.start_operator("operator-a");
    fx.apply_upgrade("orders", spec("PgBouncer")).await;
    fx.wait_for_phase("orders", Phase::Replicating, Duration::from_secs(240))
        .await;
    let server = fx.source_direct("postgres").await;
    pgshift_testkit::eventually(
        "the initial copy to run",
        Duration::from_secs(60),
        || async {
            let active: i64 = server
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE active",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (active >= 1).then_some(())
        },
    )
    .await;
    let status = fx.upgrades().get("orders").await.unwrap().status.unwrap();
    assert_eq!(
        status.phase,
        Some(Phase::Replicating),
        "deleted during the initial copy"
    );
    delete_and_check_everything_restored(&fx, &before_with_big, &service_before).await;
}

/// Deletes the upgrade and checks that the source and the clients' Service are as they were
/// and that every object pgshift made is gone.
async fn delete_and_check_everything_restored(
    fx: &Fixture,
    source_before: &[String],
    service_before: &Option<k8s_openapi::api::core::v1::ServiceSpec>,
) {
    fx.upgrades()
        .delete("orders", &kube::api::DeleteParams::default())
        .await
        .unwrap();
    fx.wait_until_gone("orders", Duration::from_secs(120)).await;
    assert_eq!(
        fx.source_state().await,
        source_before,
        "the source is as it was"
    );
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(fx.client.clone(), k8s::NS);
    assert_eq!(
        &services.get("db").await.unwrap().spec,
        service_before,
        "the clients' Service is restored"
    );
    let sets: Api<k8s_openapi::api::apps::v1::StatefulSet> =
        Api::namespaced(fx.client.clone(), k8s::NS);
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(fx.client.clone(), k8s::NS);
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(fx.client.clone(), k8s::NS);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(fx.client.clone(), k8s::NS);
    pgshift_testkit::eventually(
        "pgshift's objects to be collected",
        Duration::from_secs(60),
        || async {
            let mut left = Vec::new();
            if sets.get_opt("orders-target").await.unwrap().is_some() {
                left.push("statefulset");
            }
            if claims
                .get_opt("data-orders-target-0")
                .await
                .unwrap()
                .is_some()
            {
                left.push("pvc");
            }
            if deployments
                .get_opt("orders-pgbouncer")
                .await
                .unwrap()
                .is_some()
            {
                left.push("pgbouncer");
            }
            for service in ["orders-target", "orders-route", "orders-source"] {
                if services.get_opt(service).await.unwrap().is_some() {
                    left.push(service);
                }
            }
            for secret in ["orders-target-superuser", "orders-pgbouncer"] {
                if secrets.get_opt(secret).await.unwrap().is_some() {
                    left.push(secret);
                }
            }
            left.is_empty().then_some(())
        },
    )
    .await;
}

/// Deleted in each phase before the switch (Provisioning, CopyingSchema, CatchingUp, a manual
/// cutover's ReadyForCutover), one after the other on the same source: each time the source
/// and the clients' Service end as they were and nothing of pgshift's is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_the_upgrade_in_every_phase_before_the_switch_leaves_nothing_behind() {
    let mut fx = Fixture::start(15, &[]).await;
    let (before, service_before) = as_found(&fx).await;
    fx.start_operator("operator-a");
    let order = [
        Phase::Provisioning,
        Phase::CopyingSchema,
        Phase::Replicating,
        Phase::CatchingUp,
        Phase::ReadyForCutover,
    ];
    let rank = |p: Phase| order.iter().position(|o| *o == p);
    for wanted in [
        Phase::Provisioning,
        Phase::CopyingSchema,
        Phase::CatchingUp,
        Phase::ReadyForCutover,
    ] {
        let manual = manual_spec("PgBouncer");
        fx.apply_upgrade("orders", manual).await;
        let reached = pgshift_testkit::eventually(
            "the phase to delete in",
            Duration::from_secs(180),
            || async {
                let phase = fx.upgrades().get("orders").await.ok()?.status?.phase?;
                (rank(phase)? >= rank(wanted)?).then_some(phase)
            },
        )
        .await;
        eprintln!("deleting in {reached:?} (wanted {wanted:?})");
        delete_and_check_everything_restored(&fx, &before, &service_before).await;
    }
}

/// The operator killed (SIGKILL) in each phase, the cutover included, and started again: the
/// upgrade completes with nothing lost and no client left paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_operator_resumes_in_every_phase() {
    let mut fx = Fixture::start(15, &[]).await;
    fx.start_operator("operator-a");
    let ledger = fx.ledger(4).await;
    fx.apply_upgrade("orders", spec("PgBouncer")).await;
    let mut kill_at = vec![
        Phase::Provisioning,
        Phase::CopyingSchema,
        Phase::Replicating,
        Phase::CatchingUp,
        Phase::CuttingOver,
    ];
    let mut killed = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let mut operator = 0;
    loop {
        let phase = fx
            .upgrades()
            .get("orders")
            .await
            .unwrap()
            .status
            .and_then(|s| s.phase);
        if phase == Some(Phase::Completed) {
            break;
        }
        if let Some(position) = kill_at.iter().position(|p| Some(*p) == phase) {
            if phase == Some(Phase::CuttingOver) {
                // Inside the fence: right after the engine reports it raised it.
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while !fx
                    .operator_log(operator)
                    .contains("CutoverStep { step: \"fence\"")
                    && std::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            fx.kill_operator(operator);
            killed.push(kill_at.remove(position));
            eprintln!("killed the operator in {:?}", killed.last().unwrap());
            fx.start_operator("operator-a");
            operator += 1;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not completed; killed in {killed:?}\n{}",
            k8s::tail(&fx.operator_logs(), 60)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("killed in {killed:?}");
    assert!(
        killed.len() >= 3,
        "killed in at least three phases: {killed:?}"
    );
    if killed.contains(&Phase::CuttingOver) {
        let logs = fx.operator_logs();
        assert!(
            logs.contains("an interrupted cutover left writes fenced")
                || logs.contains("an interrupted cutover had already switched"),
            "the kill landed inside the cutover and the next operator recovered it"
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_stop = ledger.snapshot().committed;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        ledger.snapshot().committed > before_stop,
        "clients commit after completion: nobody is paused"
    );
    let report = stop_and_verify(&fx, ledger).await;
    assert_eq!(report.failed, 0, "{:?}", report.errors);
}

/// Two operator replicas: only the lease holder acts (every event comes from it); killing it
/// hands the upgrade over to the other, which completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_act_one_at_a_time_and_hand_over() {
    let mut fx = Fixture::start(15, &[]).await;
    fx.start_leader_and_standby();
    fx.apply_upgrade("orders", spec("PgBouncer")).await;
    fx.wait_for_phase("orders", Phase::Replicating, Duration::from_secs(240))
        .await;
    let reporters = event_reporters(&fx).await;
    assert_eq!(reporters, ["operator-a"], "only the holder acted");
    fx.kill_operator(0);
    fx.wait_for_phase("orders", Phase::Completed, Duration::from_secs(240))
        .await;
    let reporters = event_reporters(&fx).await;
    assert_eq!(
        reporters,
        ["operator-a", "operator-b"],
        "the standby took over"
    );
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(fx.client.clone(), k8s::OPERATOR_NS);
    let lease = leases.get("pgshift-operator").await.unwrap().spec.unwrap();
    assert_eq!(lease.holder_identity.as_deref(), Some("operator-b"));

    // Someone else takes the lease: operator-b stops at once, with the reason.
    let taken = json!({"spec": {
        "holderIdentity": "intruder",
        "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
            k8s_openapi::jiff::Timestamp::now()
        ),
        "leaseDurationSeconds": 3600,
    }});
    leases
        .patch(
            "pgshift-operator",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&taken),
        )
        .await
        .unwrap();
    let exit = fx.operator_exit(1, Duration::from_secs(15)).await;
    assert!(!exit.success(), "{exit:?}");
    assert!(
        fx.operator_log(1).contains("lost the leader lease"),
        "{}",
        k8s::tail(&fx.operator_log(1), 10)
    );
}

/// The upgrade's events with this reason.
/// The source's state and the clients' Service as the test found them.
async fn as_found(fx: &Fixture) -> (Vec<String>, Option<k8s_openapi::api::core::v1::ServiceSpec>) {
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(fx.client.clone(), k8s::NS);
    let service = services.get("db").await.unwrap().spec;
    (fx.source_state().await, service)
}

/// The API server's refusal to create a PostgresUpgrade with this spec.
async fn refused(fx: &Fixture, spec: serde_json::Value) -> kube::Error {
    let object: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "pgshift.io/v1alpha1", "kind": "PostgresUpgrade",
        "metadata": {"name": "bad"}, "spec": spec,
    }))
    .unwrap();
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        fx.client.clone(),
        k8s::NS,
        &kube::core::ApiResource::erase::<pgshift_operator::crd::PostgresUpgrade>(&()),
    );
    raw.create(&kube::api::PostParams::default(), &object)
        .await
        .expect_err("the API server refuses it")
}

async fn events_of(fx: &Fixture, reason: &str) -> Vec<Event> {
    let events: Api<Event> = Api::namespaced(fx.client.clone(), k8s::NS);
    events
        .list(&ListParams::default().fields("involvedObject.kind=PostgresUpgrade"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect()
}

/// How many schema copies the operator started (repeats of one event count in it).
async fn schema_copies(fx: &Fixture) -> i32 {
    events_of(fx, "SchemaCopyStarted")
        .await
        .iter()
        .map(|e| e.count.unwrap_or(1))
        .sum()
}

async fn event_messages(fx: &Fixture, reason: &str) -> Vec<String> {
    events_of(fx, reason)
        .await
        .into_iter()
        .filter_map(|e| e.message)
        .collect()
}

/// The replicas that published events about the upgrade, sorted.
async fn event_reporters(fx: &Fixture) -> Vec<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(fx.client.clone(), k8s::NS);
    let mut reporters: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("PostgresUpgrade"))
        .filter_map(|e| e.reporting_instance)
        .collect();
    reporters.sort();
    reporters.dedup();
    reporters
}

/// A schema copy Job that fails (here: an ICU collation, which the target's build lacks) puts its
/// cause in status and an event; nothing is half-restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_schema_copy_reports_its_cause() {
    let mut fx = Fixture::start(15, &[]).await;
    // The target's build has no ICU (the embedded PostgreSQL 18); the source's has.
    let app = fx.source_direct(APP_DB).await;
    app.batch_execute(
        "CREATE COLLATION german (provider = icu, locale = 'de-DE');
         CREATE TABLE names (id int PRIMARY KEY, name text COLLATE german);",
    )
    .await
    .unwrap();
    fx.start_operator("operator-a");
    fx.apply_upgrade("orders", spec("PgBouncer")).await;
    fx.wait_for_phase("orders", Phase::Failed, Duration::from_secs(180))
        .await;
    let status = fx.upgrades().get("orders").await.unwrap().status.unwrap();
    let ready = condition(&status, "Ready");
    eprintln!("Ready: {} {}", ready.reason, ready.message);
    assert_eq!(ready.reason, "SchemaCopyFailed");
    assert!(ready.message.contains("ICU"), "{}", ready.message);
    assert!(
        ready.message.contains("nothing was kept"),
        "{}",
        ready.message
    );
    let failures = event_messages(&fx, "SchemaCopyFailed").await;
    assert!(failures.iter().any(|m| m.contains("ICU")), "{failures:?}");
}

/// DDL on the source during replication breaks apply on the target: status says so with the
/// cause (the table and column), and the cutover does not happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apply_failures_reach_status_with_their_cause() {
    let mut fx = Fixture::start(15, &[]).await;
    fx.start_operator("operator-a");
    let manual = manual_spec("PgBouncer");
    fx.apply_upgrade("orders", manual).await;
    fx.wait_for_phase("orders", Phase::ReadyForCutover, Duration::from_secs(240))
        .await;
    let app = fx.source_direct(APP_DB).await;
    app.batch_execute(
        "ALTER TABLE ledger_accounts ADD COLUMN note text;
         UPDATE ledger_accounts SET note = 'drift' WHERE id = 1;",
    )
    .await
    .unwrap();
    fx.wait_for_phase("orders", Phase::Failed, Duration::from_secs(60))
        .await;
    let status = fx.upgrades().get("orders").await.unwrap().status.unwrap();
    let ready = condition(&status, "Ready");
    eprintln!("Ready: {} {}", ready.reason, ready.message);
    assert_eq!(ready.reason, "ApplyFailing");
    assert!(
        ready.message.contains("ledger_accounts"),
        "{}",
        ready.message
    );
    assert!(ready.message.contains("note"), "{}", ready.message);
    assert!(status.cutover.is_none(), "no cutover was attempted");
}

/// `--pg-bin-dir` of the lab's PostgreSQL `major` (the schema tools preflight looks for).
fn pg_bin_dir(major: u32) -> String {
    let dir = pgshift_lab::Binaries::locate()
        .and_then(|b| b.bin_dir(major))
        .expect("the lab's PostgreSQL binaries");
    format!("--pg-bin-dir={}", dir.display())
}

/// How many times each PgBouncer of upgrade `orders` was told to PAUSE.
fn pauses(fx: &Fixture) -> Vec<usize> {
    fx.pod_logs("orders-pgbouncer-")
        .iter()
        .map(|(_, log)| log.matches("PAUSE command issued").count())
        .collect()
}

/// Approves a manual cutover while `holder` (a session through PgBouncer) keeps a transaction
/// open, so that PAUSE waits: returns once the fence is recorded and every PgBouncer was told
/// to PAUSE. The switch cannot happen until `holder` commits.
async fn approve_and_wait_for_the_fence(
    fx: &Fixture,
    mut manual: serde_json::Value,
    holder: &tokio_postgres::Client,
) {
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let target = fx.target_direct("orders", APP_DB).await;
    let paused_before = pauses(fx);
    manual["cutover"]["approved"] = json!(true);
    fx.apply_upgrade("orders", manual).await;
    pgshift_testkit::eventually("the fence", Duration::from_secs(60), || async {
        k8s::fenced(&target).await.then_some(())
    })
    .await;
    pgshift_testkit::eventually(
        "every PgBouncer to be told to PAUSE",
        Duration::from_secs(10),
        || async {
            let now = pauses(fx);
            (now.len() == paused_before.len() && now.iter().zip(&paused_before).all(|(n, b)| n > b))
                .then_some(())
        },
    )
    .await;
}

/// Waits until the ledger's commits stop growing (its clients are held); panics if they go on.
async fn until_clients_are_held(ledger: &pgshift_lab::ledger::LedgerHandle) {
    pgshift_testkit::eventually("clients to be held", Duration::from_secs(10), || async {
        let before = ledger.snapshot().committed;
        tokio::time::sleep(Duration::from_millis(500)).await;
        (ledger.snapshot().committed == before).then_some(())
    })
    .await;
}

/// Stops the ledger and checks through the clients' Service that no acknowledged commit is
/// lost; returns the clients' report.
async fn stop_and_verify(
    fx: &Fixture,
    ledger: pgshift_lab::ledger::LedgerHandle,
) -> pgshift_lab::ledger::LedgerReport {
    let report = ledger.stop().await;
    eprintln!("ledger: {}", serde_json::to_string(&report).unwrap());
    let app = fx.app().await;
    let verification = pgshift_lab::ledger::Ledger::verify(&app, &report)
        .await
        .unwrap();
    assert_eq!(verification.lost, 0, "{verification:?}");
    assert!(verification.is_ok(), "{verification:?}");
    report
}

async fn assert_nothing_failed_or_lost(fx: &Fixture, ledger: pgshift_lab::ledger::LedgerHandle) {
    let report = stop_and_verify(fx, ledger).await;
    assert_eq!(
        (report.failed, report.in_doubt),
        (0, 0),
        "failed and in-doubt transactions: {:?}\n{}",
        report.errors,
        fx.pgbouncer_log_tails("orders", 40)
    );
}

/// Two replicas; the leader SIGKILLed while PgBouncer is paused (a transaction through PgBouncer
/// keeps PAUSE waiting, so the switch cannot have happened): the standby takes the lease and
/// releases the clients within the lease duration + maxPause, nothing fails or is lost, and
/// the upgrade completes once that transaction ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_killed_while_pgbouncer_is_paused_releases_clients_within_lease_and_max_pause() {
    let mut fx = Fixture::start(15, &[]).await;
    fx.start_leader_and_standby();
    let mut manual = manual_spec("PgBouncer");
    let max_pause = Duration::from_secs(4);
    manual["cutover"]["maxPause"] = json!(format!("{}s", max_pause.as_secs()));
    fx.apply_upgrade("orders", manual.clone()).await;
    fx.wait_for_phase("orders", Phase::ReadyForCutover, Duration::from_secs(240))
        .await;
    let ledger = fx.ledger(4).await;
    let holder = fx.app().await;
    approve_and_wait_for_the_fence(&fx, manual, &holder).await;
    fx.kill_operator(0);
    let killed = std::time::Instant::now();
    until_clients_are_held(&ledger).await;
    let held = ledger.snapshot().committed;
    let bound = k8s::LEASE_DURATION + max_pause + Duration::from_secs(5);
    pgshift_testkit::eventually("clients to commit again", bound, || async {
        (ledger.snapshot().committed > held).then_some(())
    })
    .await;
    let released = killed.elapsed();
    eprintln!("clients commit again {released:?} after the leader was killed (bound {bound:?})");
    assert!(
        fx.operator_log(1)
            .contains("an interrupted cutover left writes fenced; releasing clients on the source"),
        "the standby released the fence the killed leader left:\n{}",
        k8s::tail(&fx.operator_log(1), 40)
    );

    holder.batch_execute("COMMIT").await.unwrap();
    fx.wait_for_phase("orders", Phase::Completed, Duration::from_secs(120))
        .await;
    assert_eq!(
        k8s::major(&fx.app().await).await,
        18,
        "the clients' Service reaches 18"
    );
    assert_nothing_failed_or_lost(&fx, ledger).await;
}

/// The operator and a person's `pgshift` on the same upgrade at once: whichever comes second is
/// refused with Busy naming the first and changes nothing; the operator shows Busy in status
/// and an event, and carries on once the other is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_and_a_pgshift_command_never_work_on_one_upgrade_at_once() {
    let mut fx = Fixture::start(15, &[]).await;
    fx.start_operator("operator-a");
    let mut manual = manual_spec("PgBouncer");
    manual["cutover"]["maxPause"] = json!("30s");
    fx.apply_upgrade("orders", manual.clone()).await;
    fx.wait_for_phase("orders", Phase::ReadyForCutover, Duration::from_secs(240))
        .await;
    let ledger = fx.ledger(4).await;

    // pgshift first: `run` holds the upgrade while apply is held back (a lock on the target
    // keeps the ledger's writes from applying), so it waits for the target to catch up.
    let target = fx.target_direct("orders", APP_DB).await;
    target
        .batch_execute("BEGIN; LOCK TABLE ledger_accounts IN EXCLUSIVE MODE")
        .await
        .unwrap();
    // The operator holds the lock during each reconcile: `run` may be refused a few times first.
    let run_log = fx.cluster.work_dir().join("pgshift-run.log");
    let source_app = fx.source_direct(APP_DB).await;
    let (mut run, label) = loop {
        let mut run = fx
            .pgshift("orders", "run", &["--cutover=manual", &pg_bin_dir(18)])
            .await
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&run_log).unwrap())
            .spawn()
            .unwrap();
        let label = format!("pgshift run pid {} on ", run.id());
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let holds = loop {
            if run.try_wait().unwrap().is_some() {
                break false;
            }
            if lock_holders(&source_app)
                .await
                .iter()
                .any(|h| h.starts_with(&label))
            {
                break true;
            }
            assert!(std::time::Instant::now() < deadline, "pgshift run hangs");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if holds {
            break (run, label);
        }
        let said = std::fs::read_to_string(&run_log).unwrap();
        // The holder is named, unless it let go between the refusal and the lookup.
        assert!(
            said.contains("another pgshift is working on this upgrade")
                && (said.contains("pgshift operator for default/orders")
                    || said.contains("let go of the lock just now")),
            "refused only for Busy, naming the operator: {said}"
        );
    };
    let busy = pgshift_testkit::eventually(
        "the operator to report Busy",
        Duration::from_secs(60),
        || async {
            let status = fx.upgrades().get("orders").await.ok()?.status?;
            let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
            (ready.reason == "Busy").then(|| (status.phase, ready.message.clone()))
        },
    )
    .await;
    eprintln!("operator: {busy:?}");
    assert_eq!(busy.0, Some(Phase::ReadyForCutover), "the phase stays");
    assert!(busy.1.contains(&label), "names {label}: {}", busy.1);
    let busy_events = event_messages(&fx, "Busy").await;
    assert!(
        busy_events.iter().any(|m| m.contains(&label)),
        "a Busy event names {label}: {busy_events:?}"
    );
    target.batch_execute("COMMIT").await.unwrap();
    let exit = tokio::task::spawn_blocking(move || run.wait().unwrap())
        .await
        .unwrap();
    let said = std::fs::read_to_string(&run_log).unwrap();
    assert!(exit.success(), "pgshift run: {said}");
    fx.wait_for_phase("orders", Phase::ReadyForCutover, Duration::from_secs(60))
        .await;

    // The operator first: inside its cutover (PAUSE waits for a transaction), `abort` is
    // refused and leaves the upgrade as it was.
    let holder = fx.app().await;
    approve_and_wait_for_the_fence(&fx, manual, &holder).await;
    let source = fx.source_direct("postgres").await;
    let slots = || async {
        let count: i64 = source
            .query_one("SELECT count(*) FROM pg_replication_slots", &[])
            .await
            .unwrap()
            .get(0);
        count
    };
    let slots_before = slots().await;
    let abort = fx.pgshift("orders", "abort", &[]).await.output().unwrap();
    let said = String::from_utf8_lossy(&abort.stderr).to_string();
    eprintln!("pgshift abort: {said}");
    assert!(!abort.status.success(), "abort is refused: {said}");
    assert!(
        said.contains("another pgshift is working on this upgrade")
            && said.contains("pgshift operator for default/orders"),
        "Busy names the operator: {said}"
    );
    assert_eq!(slots().await, slots_before, "abort changed nothing");
    assert!(k8s::fenced(&fx.target_direct("orders", APP_DB).await).await);
    holder.batch_execute("COMMIT").await.unwrap();
    fx.wait_for_phase("orders", Phase::Completed, Duration::from_secs(120))
        .await;
    assert_eq!(k8s::major(&fx.app().await).await, 18);
    assert_nothing_failed_or_lost(&fx, ledger).await;
}

/// After completion the new server is the clients' for good. A lost status phase (as a crash
/// between cleanup and the status write leaves it) is recognised as finished from the switch
/// record: nothing is copied again and a row written on the new server since stays. Deleting
/// the resource with its status lost changes neither the new server nor the clients' Service.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finished_upgrade_stays_finished_when_its_status_is_lost_and_it_is_deleted() {
    let mut fx = Fixture::start(15, &[]).await;
    fx.start_operator("operator-a");
    fx.apply_upgrade("orders", spec("PgBouncer")).await;
    fx.wait_for_phase("orders", Phase::Completed, Duration::from_secs(240))
        .await;
    let app = fx.app().await;
    app.batch_execute(
        "CREATE TABLE written_after_completion (id int PRIMARY KEY);
         INSERT INTO written_after_completion VALUES (1);",
    )
    .await
    .unwrap();
    let copies = schema_copies(&fx).await;
    let released = target_service_version(&fx).await;
    fx.kill_operator(0);
    lose_phase(&fx).await;
    fx.start_operator("operator-a");
    fx.wait_for_phase("orders", Phase::Completed, Duration::from_secs(120))
        .await;
    row_stays(&fx).await;
    assert_eq!(schema_copies(&fx).await, copies, "no schema copy again");
    assert!(target_owners(&fx).await.is_empty());
    assert_eq!(
        target_service_version(&fx).await,
        released,
        "the released target is left as it is (owning it again would let a delete collect it)"
    );

    fx.kill_operator(1);
    lose_phase(&fx).await;
    fx.upgrades()
        .delete("orders", &kube::api::DeleteParams::default())
        .await
        .unwrap();
    fx.start_operator("operator-a");
    fx.wait_until_gone("orders", Duration::from_secs(120)).await;
    // Give the garbage collector time to act on anything still owned by the upgrade.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(target_owners(&fx).await.is_empty());
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(fx.client.clone(), k8s::NS);
    assert!(claims
        .get_opt("data-orders-target-0")
        .await
        .unwrap()
        .is_some());
    assert_eq!(target_service_version(&fx).await, released);
    row_stays(&fx).await;
}

/// The target Service's resourceVersion: it changes only when someone writes the Service.
async fn target_service_version(fx: &Fixture) -> Option<String> {
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(fx.client.clone(), k8s::NS);
    services
        .get("orders-target")
        .await
        .unwrap()
        .metadata
        .resource_version
}

/// The status phase lost, as a crash between the work and the status write leaves it.
async fn lose_phase(fx: &Fixture) {
    fx.upgrades()
        .patch_status(
            "orders",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"status": {"phase": null}})),
        )
        .await
        .unwrap();
}

async fn target_owners(
    fx: &Fixture,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> {
    let sets: Api<k8s_openapi::api::apps::v1::StatefulSet> =
        Api::namespaced(fx.client.clone(), k8s::NS);
    sets.get("orders-target")
        .await
        .unwrap()
        .metadata
        .owner_references
        .unwrap_or_default()
}

/// The clients' Service reaches the new server, and the row written there after completion is
/// still there.
async fn row_stays(fx: &Fixture) {
    let app = fx.app().await;
    assert_eq!(
        k8s::major(&app).await,
        18,
        "the clients' Service reaches 18"
    );
    let rows: i64 = app
        .query_one("SELECT count(*) FROM written_after_completion", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "the row written after completion stays");
}

/// The `application_name` of every session holding an advisory lock in this database (pgshift
/// names its lock sessions after the holder).
async fn lock_holders(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted AND l.database =
                   (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// An old deployment: a `postgres:12` source (an md5 pg_hba.conf, as its image makes it) moves
/// to `postgres:18` through PgBouncer while the ledger writes, with no failed or lost
/// transaction; the clients' Service reaches 18 afterwards. Its roles have SCRAM passwords: the
/// roles are copied with their hashes, and an md5 hash (12's default) cannot log in where 18's
/// image requires scram-sha-256 (docs/user-guide.md, "Which versions").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_12_source_moves_to_18_with_no_failed_or_lost_transaction() {
    let mut fx = Fixture::start(12, &["-c", "password_encryption=scram-sha-256"]).await;
    // initdb hashed the superuser's password with md5: hash it again.
    let superuser = fx
        .connect("postgres", &fx.superuser_password, "postgres")
        .await
        .expect("the source answers");
    superuser
        .batch_execute(&format!(
            "ALTER ROLE postgres PASSWORD '{}'",
            fx.superuser_password
        ))
        .await
        .unwrap();
    fx.start_operator("operator-a");
    let ledger = fx.ledger(4).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    fx.apply_upgrade("orders", spec("PgBouncer")).await;
    fx.wait_for_phase("orders", Phase::Completed, Duration::from_secs(240))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_nothing_failed_or_lost(&fx, ledger).await;
    assert_eq!(k8s::major(&fx.app().await).await, 18);
    let status = fx.upgrades().get("orders").await.unwrap().status.unwrap();
    assert!(status.source_version.as_deref().unwrap().starts_with("12."));
    assert!(status.target_version.as_deref().unwrap().starts_with("18."));
}
