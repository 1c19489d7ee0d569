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

fn spec(mode: &str) -> serde_json::Value {
    json!({
        "source": {"service": {"name": "db"}, "databases": [APP_DB], "credentialsSecret": "db-superuser",
                   "workload": {"kind": "StatefulSet", "name": "db"}},
        "target": {"image": "postgres:18", "storage": {"size": "1Gi"}},
        "traffic": {"service": "db", "mode": mode, "pgbouncer": {"image": "pgbouncer/pgbouncer:1.24", "replicas": 2}},
        "cutover": {"mode": "Automatic", "maxPause": "2s"},
    })
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
    assert_eq!(report.failed, 0, "failed transactions: {:?}", report.errors);
    assert_eq!(report.in_doubt, 0, "in-doubt transactions");
    assert_eq!(verification.lost, 0, "acknowledged commits lost");
    assert!(verification.is_ok(), "{verification:?}");

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
        let object: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "pgshift.io/v1alpha1", "kind": "PostgresUpgrade",
            "metadata": {"name": "bad"}, "spec": bad,
        }))
        .unwrap();
        let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
            fx.client.clone(),
            k8s::NS,
            &kube::core::ApiResource::erase::<pgshift_operator::crd::PostgresUpgrade>(&()),
        );
        let error = raw
            .create(&kube::api::PostParams::default(), &object)
            .await
            .expect_err("the API server refuses it");
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
    let mut manual = spec("Service");
    manual["cutover"]["mode"] = json!("Manual");
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
    k8s::eventually(
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
    k8s::eventually(
        "the upgrade to be gone",
        Duration::from_secs(120),
        || async {
            fx.upgrades()
                .get_opt("orders")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
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
    k8s::eventually(
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
    let before = fx.source_state().await;
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(fx.client.clone(), k8s::NS);
    let service_before = services.get("db").await.unwrap().spec;
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
        let mut manual = spec("PgBouncer");
        manual["cutover"]["mode"] = json!("Manual");
        fx.apply_upgrade("orders", manual).await;
        let reached = k8s::eventually(
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
    let report = ledger.stop().await;
    eprintln!("ledger: {}", serde_json::to_string(&report).unwrap());
    let app = fx.app().await;
    let verification = pgshift_lab::ledger::Ledger::verify(&app, &report)
        .await
        .unwrap();
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert_eq!(verification.lost, 0, "{verification:?}");
    assert!(verification.is_ok(), "{verification:?}");
}

/// Two operator replicas: only the lease holder acts (every event comes from it); killing it
/// hands the upgrade over to the other, which completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_act_one_at_a_time_and_hand_over() {
    let mut fx = Fixture::start(15, &[]).await;
    fx.start_operator("operator-a");
    tokio::time::sleep(Duration::from_secs(2)).await;
    fx.start_operator("operator-b");
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
    let events: Api<Event> = Api::namespaced(fx.client.clone(), k8s::NS);
    let failures: Vec<String> = events
        .list(&ListParams::default().fields("involvedObject.kind=PostgresUpgrade"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("SchemaCopyFailed"))
        .filter_map(|e| e.message)
        .collect();
    assert!(failures.iter().any(|m| m.contains("ICU")), "{failures:?}");
}

/// DDL on the source during replication breaks apply on the target: status says so with the
/// cause (the table and column), and the cutover does not happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apply_failures_reach_status_with_their_cause() {
    let mut fx = Fixture::start(15, &[]).await;
    fx.start_operator("operator-a");
    let mut manual = spec("PgBouncer");
    manual["cutover"]["mode"] = json!("Manual");
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
