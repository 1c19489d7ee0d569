//! The objects pgshift wants for one upgrade, built from the validated spec alone (pure: no
//! I/O, unit-tested from YAML fixtures). Every object is owned by the `PostgresUpgrade`, so
//! that deleting it before completion garbage-collects them.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::crd::PostgresUpgrade;
use crate::names::{role, POSTGRES_PORT, TARGET_SUPERUSER};
use crate::validate::Validated;

const DATA_DIR: &str = "/var/lib/postgresql/data";
const PGBOUNCER_DIR: &str = "/etc/pgbouncer";
pub const PGBOUNCER_ADMIN: &str = "pgshift_admin";

fn typed<T: DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("a built object matches its Kubernetes type")
}

/// The controller reference to the upgrade.
pub fn owner(upgrade: &PostgresUpgrade) -> OwnerReference {
    upgrade
        .controller_owner_ref(&())
        .expect("an upgrade read from the API server has a name and a uid")
}

fn metadata(v: &Validated, name: &str, role: &str) -> Value {
    json!({
        "name": name,
        "namespace": v.namespace,
        "labels": v.names.labels(role),
        "ownerReferences": [owner(&v.upgrade)],
    })
}

/// The target's superuser. Created once; its password is never rewritten.
pub fn target_secret(v: &Validated, password: &str) -> Secret {
    typed(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": metadata(v, &v.names.target_secret(), role::TARGET),
        "type": "kubernetes.io/basic-auth",
        "stringData": {"username": TARGET_SUPERUSER, "password": password},
    }))
}

pub fn target_service(v: &Validated) -> Service {
    typed(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": metadata(v, &v.names.target(), role::TARGET),
        "spec": {
            "selector": v.names.selector(role::TARGET),
            "ports": [{"name": "postgres", "port": POSTGRES_PORT, "targetPort": "postgres"}],
        },
    }))
}

/// `-c name=value` arguments: the user's parameters, then `wal_level=logical` (which wins).
fn server_args(parameters: &BTreeMap<String, String>) -> Vec<String> {
    let mut args = Vec::new();
    for (name, value) in parameters.iter().filter(|(n, _)| *n != "wal_level") {
        args.push("-c".to_string());
        args.push(format!("{name}={value}"));
    }
    args.extend(["-c".to_string(), "wal_level=logical".to_string()]);
    args
}

pub fn target_statefulset(v: &Validated) -> StatefulSet {
    let target = &v.upgrade.spec.target;
    let secret = v.names.target_secret();
    let mut claim = json!({
        "metadata": {"name": "data"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": target.storage.size}},
        },
    });
    if let Some(class) = &target.storage.storage_class_name {
        claim["spec"]["storageClassName"] = json!(class);
    }
    // A busy server answers slowly: a probe that gives up after 1 s would take the target out
    // of its Service (and PgBouncer's route) for nothing.
    let ready = json!({"exec": {"command": ["pg_isready", "-q"]}, "periodSeconds": 2, "timeoutSeconds": 5, "failureThreshold": 3});
    typed(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": metadata(v, &v.names.target(), role::TARGET),
        "spec": {
            "serviceName": v.names.target(),
            "replicas": 1,
            "selector": {"matchLabels": v.names.selector(role::TARGET)},
            // The volume goes with the upgrade when it is deleted before completion.
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Delete", "whenScaled": "Retain"},
            "template": {
                "metadata": {"labels": v.names.labels(role::TARGET)},
                "spec": {
                    "containers": [{
                        "name": "postgres",
                        "image": target.image,
                        "args": server_args(&target.parameters),
                        "env": [
                            {"name": "POSTGRES_USER", "valueFrom": {"secretKeyRef": {"name": secret, "key": "username"}}},
                            {"name": "POSTGRES_PASSWORD", "valueFrom": {"secretKeyRef": {"name": secret, "key": "password"}}},
                            {"name": "POSTGRES_DB", "value": "postgres"},
                            {"name": "PGDATA", "value": format!("{DATA_DIR}/pgdata")},
                        ],
                        "ports": [{"name": "postgres", "containerPort": POSTGRES_PORT}],
                        "readinessProbe": ready,
                        "startupProbe": {"exec": {"command": ["pg_isready", "-q"]}, "periodSeconds": 2, "failureThreshold": 150},
                        "resources": target.resources.clone().map(|r| serde_json::to_value(r).expect("resources serialize")).unwrap_or(json!({})),
                        "volumeMounts": [{"name": "data", "mountPath": DATA_DIR}],
                    }],
                },
            },
            "volumeClaimTemplates": [claim],
        },
    }))
}

/// pgshift's own Service to the source's pods (the selector of the Service the spec names,
/// as it was before pgshift changed anything). Never moved.
pub fn source_service(v: &Validated) -> Service {
    typed(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": metadata(v, &v.names.source(), role::SOURCE),
        "spec": {
            "selector": v.source.selector,
            "ports": [{"name": "postgres", "port": POSTGRES_PORT, "targetPort": v.source.target_port}],
        },
    }))
}

/// The route PgBouncer connects through: the source's pods until the switch, then the target's.
pub fn route_service(v: &Validated, to_target: bool) -> Service {
    let (selector, target_port) = if to_target {
        (json!(v.names.selector(role::TARGET)), json!("postgres"))
    } else {
        (json!(v.source.selector), json!(v.source.target_port))
    };
    typed(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": metadata(v, &v.names.route(), role::PGBOUNCER),
        "spec": {
            "selector": selector,
            "ports": [{"name": "postgres", "port": POSTGRES_PORT, "targetPort": target_port}],
        },
    }))
}

/// PgBouncer's users file: the admin console user pgshift uses, and the source superuser that
/// looks up the clients' password verifiers (`auth_query`).
pub fn pgbouncer_secret(v: &Validated, admin_password: &str, auth_password: &str) -> Secret {
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let userlist = format!(
        "{} {}\n{} {}\n",
        quote(PGBOUNCER_ADMIN),
        quote(admin_password),
        quote(&v.source.user),
        quote(auth_password)
    );
    typed(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": metadata(v, &v.names.pgbouncer(), role::PGBOUNCER),
        "stringData": {"userlist.txt": userlist, "admin-password": admin_password},
    }))
}

/// Prepared statements PgBouncer tracks per client connection (its 1.24 default, set because
/// 1.21–1.23 default to 0, which leaves clients that prepare failing after the cutover).
pub const MAX_PREPARED_STATEMENTS: u32 = 200;

/// Transaction pooling toward the route; clients keep their own users and passwords (SCRAM
/// pass-through: the target has the same verifiers, roles are copied with them). After a failed
/// server login PgBouncer waits `server_login_retry` before trying again, with clients held:
/// 1 s instead of the default 15 s (a test saw a 15 s stall when a readiness probe flapped).
pub fn pgbouncer_config(v: &Validated, route_host: &str) -> ConfigMap {
    let ini = format!(
        ";; Written by pgshift. Clients reach the source, then the target, through {route}.\n\
         [databases]\n\
         * = host={route_host} port={POSTGRES_PORT}\n\
         \n\
         [pgbouncer]\n\
         listen_addr = 0.0.0.0\n\
         listen_port = {POSTGRES_PORT}\n\
         auth_type = scram-sha-256\n\
         auth_file = {PGBOUNCER_DIR}/userlist.txt\n\
         auth_user = {user}\n\
         auth_query = SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = $1\n\
         admin_users = {PGBOUNCER_ADMIN}\n\
         pool_mode = transaction\n\
         server_reset_query =\n\
         ;; PgBouncer 1.21+: prepares each client's statements again on whichever server connection\n\
         ;; runs them, the new server's after the cutover too.\n\
         max_prepared_statements = {MAX_PREPARED_STATEMENTS}\n\
         ignore_startup_parameters = extra_float_digits,options\n\
         max_client_conn = 2000\n\
         default_pool_size = 20\n\
         query_wait_timeout = 120\n\
         server_login_retry = 1\n\
         server_connect_timeout = 5\n",
        route = v.names.route(),
        user = v.source.user,
    );
    typed(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": metadata(v, &v.names.pgbouncer(), role::PGBOUNCER),
        "data": {"pgbouncer.ini": ini},
    }))
}

pub fn pgbouncer_deployment(v: &Validated) -> Deployment {
    let spec = &v.upgrade.spec.traffic.pgbouncer;
    let name = v.names.pgbouncer();
    let tcp = json!({"tcpSocket": {"port": "postgres"}, "periodSeconds": 2, "timeoutSeconds": 5});
    typed(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": metadata(v, &name, role::PGBOUNCER),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": v.names.selector(role::PGBOUNCER)},
            "template": {
                "metadata": {"labels": v.names.labels(role::PGBOUNCER)},
                "spec": {
                    "containers": [{
                        "name": "pgbouncer",
                        // The image's own command reads {PGBOUNCER_DIR}/pgbouncer.ini.
                        "image": spec.image,
                        "ports": [{"name": "postgres", "containerPort": POSTGRES_PORT}],
                        "readinessProbe": tcp,
                        "livenessProbe": tcp,
                        "volumeMounts": [{"name": "config", "mountPath": PGBOUNCER_DIR, "readOnly": true}],
                    }],
                    "volumes": [{"name": "config", "projected": {"sources": [
                        {"configMap": {"name": name, "items": [{"key": "pgbouncer.ini", "path": "pgbouncer.ini"}]}},
                        {"secret": {"name": name, "items": [{"key": "userlist.txt", "path": "userlist.txt", "mode": 0o440}]}},
                    ]}}],
                    // PgBouncer images run as a non-root user (postgres, 70): the group may
                    // read the users file.
                    "securityContext": {"fsGroup": 70},
                },
            },
        },
    }))
}

/// Runs the target image's own pg_dump and psql (tools of the target's major): the schema of
/// one database into a file, then restored in one transaction that ends with `epilogue`, which
/// records the step. Passwords come from Secrets into the environment, never into arguments.
pub fn schema_job(v: &Validated, database: &str, source_oid: u32, epilogue: &str) -> Job {
    let shell = |words: &[String]| {
        words
            .iter()
            .map(|w| format!("'{}'", w.replace('\'', "'\\''")))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let dump = shell(&pgshift_engine::schema::dump_options());
    let restore = shell(&pgshift_engine::schema::restore_options());
    // A complete file, not a pipe: psql must never COMMIT a script cut off half-way.
    let script = format!(
        "set -eu\n\
         file=$(mktemp)\n\
         PGPASSWORD=\"$SOURCE_PASSWORD\" pg_dump {dump} --host=\"$SOURCE_HOST\" --port=\"$SOURCE_PORT\" --username=\"$SOURCE_USER\" --dbname=\"$DATABASE_CONNINFO\" --file=\"$file\"\n\
         printf '%s\\n' \"$PGSHIFT_EPILOGUE\" >> \"$file\"\n\
         PGPASSWORD=\"$TARGET_PASSWORD\" psql {restore} --host=\"$TARGET_HOST\" --port=\"$TARGET_PORT\" --username=\"$TARGET_USER\" --dbname=\"$DATABASE_CONNINFO\" --file=\"$file\"\n\
         rm -f \"$file\"\n"
    );
    let secret_env = |name: &str, secret: &str, key: &str| json!({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}});
    let value_env = |name: &str, value: String| json!({"name": name, "value": value});
    let source_secret = &v.upgrade.spec.source.credentials_secret;
    let target_secret = v.names.target_secret();
    typed(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": metadata(v, &v.names.schema_job(source_oid), role::SCHEMA),
        "spec": {
            // pgshift retries with a new Job itself, after reporting why this one failed.
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": 86400,
            "template": {
                "metadata": {"labels": v.names.labels(role::SCHEMA)},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "schema-copy",
                        "image": v.upgrade.spec.target.image,
                        "command": ["bash", "-c", script],
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                        "env": [
                            // `dbname='…'`: a bare name with `=` would be a connection string.
                            value_env("DATABASE_CONNINFO", pgshift_engine::schema::database_conninfo(database)),
                            value_env("SOURCE_HOST", v.source.host.clone()),
                            value_env("SOURCE_PORT", v.source.port.to_string()),
                            secret_env("SOURCE_USER", source_secret, "username"),
                            secret_env("SOURCE_PASSWORD", source_secret, "password"),
                            value_env("TARGET_HOST", v.target_host.clone().unwrap_or_default()),
                            value_env("TARGET_PORT", POSTGRES_PORT.to_string()),
                            secret_env("TARGET_USER", &target_secret, "username"),
                            secret_env("TARGET_PASSWORD", &target_secret, "password"),
                            value_env("PGSHIFT_EPILOGUE", epilogue.to_string()),
                            value_env("PGAPPNAME", "pgshift".to_string()),
                        ],
                    }],
                },
            },
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::tests::{fixture, inputs};
    use crate::validate::validate;

    fn validated() -> Validated {
        let upgrade: PostgresUpgrade = fixture("upgrade-pgbouncer.yaml");
        let mut v = validate(&upgrade, &inputs()).unwrap();
        v.target_host = Some("10.96.0.30".into());
        v
    }

    fn owned_by_the_upgrade(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("PostgresUpgrade", "orders")
        );
        assert_eq!(owner.controller, Some(true));
        assert_eq!(meta.namespace.as_deref(), Some("shop"));
        assert_eq!(
            meta.labels.as_ref().unwrap()["app.kubernetes.io/managed-by"],
            "pgshift"
        );
    }

    #[test]
    fn the_target_runs_the_new_image_with_logical_wal_on_its_own_volume() {
        let set = target_statefulset(&validated());
        owned_by_the_upgrade(&set.metadata);
        let spec = set.spec.unwrap();
        assert_eq!(
            spec.persistent_volume_claim_retention_policy
                .unwrap()
                .when_deleted
                .as_deref(),
            Some("Delete")
        );
        let claim = &spec.volume_claim_templates.unwrap()[0];
        let claim_spec = claim.spec.as_ref().unwrap();
        assert_eq!(claim_spec.storage_class_name.as_deref(), Some("fast"));
        let container = &spec.template.spec.unwrap().containers[0];
        assert_eq!(container.image.as_deref(), Some("postgres:18"));
        let args = container.args.clone().unwrap();
        // The user's wal_level is dropped: logical replication needs logical.
        assert_eq!(
            args,
            ["-c", "shared_buffers=256MB", "-c", "wal_level=logical"]
        );
        let env = container.env.clone().unwrap();
        let password = env.iter().find(|e| e.name == "POSTGRES_PASSWORD").unwrap();
        assert!(
            password.value.is_none(),
            "the password comes from the Secret"
        );
        assert_eq!(
            password
                .value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap()
                .name,
            "orders-target-superuser"
        );
    }

    #[test]
    fn pgbouncer_pools_transactions_toward_the_route_with_the_source_superuser_as_auth_user() {
        let v = validated();
        let ini = pgbouncer_config(&v, "10.96.0.40").data.unwrap()["pgbouncer.ini"].clone();
        assert!(ini.contains("* = host=10.96.0.40 port=5432\n"), "{ini}");
        assert!(ini.contains("pool_mode = transaction\n"));
        assert!(ini.contains("auth_user = postgres\n"));
        assert!(ini.contains("admin_users = pgshift_admin\n"));
        assert!(ini.contains("\nmax_prepared_statements = 200\n"), "{ini}");
        let secret = pgbouncer_secret(&v, "adm\"in", "s\"ecret");
        owned_by_the_upgrade(&secret.metadata);
        let userlist = &secret.string_data.unwrap()["userlist.txt"];
        assert_eq!(
            userlist,
            "\"pgshift_admin\" \"adm\"\"in\"\n\"postgres\" \"s\"\"ecret\"\n"
        );
        let deployment = pgbouncer_deployment(&v).spec.unwrap();
        assert_eq!(deployment.replicas, Some(2));
    }

    #[test]
    fn the_route_starts_at_the_source_and_can_point_at_the_target() {
        let v = validated();
        let to_source = route_service(&v, false).spec.unwrap();
        assert_eq!(to_source.selector.unwrap()["app"], "db");
        assert_eq!(
            to_source.ports.unwrap()[0].target_port,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("pg".into()))
        );
        let to_target = route_service(&v, true).spec.unwrap();
        assert_eq!(to_target.selector.unwrap()["pgshift.io/role"], "target");
        let own = source_service(&v).spec.unwrap();
        assert_eq!(own.selector.unwrap()["app"], "db");
    }

    #[test]
    fn the_schema_job_keeps_passwords_out_of_its_command_and_restores_from_a_file() {
        let v = validated();
        let job = schema_job(&v, "app", 16385, "INSERT INTO x VALUES ('step');");
        owned_by_the_upgrade(&job.metadata);
        assert_eq!(job.metadata.name.as_deref(), Some("orders-schema-16385"));
        let pod = job.spec.unwrap().template.spec.unwrap();
        let container = &pod.containers[0];
        assert_eq!(
            container.image.as_deref(),
            Some("postgres:18"),
            "the target's own tools"
        );
        assert_eq!(
            container.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
        let script = container.command.as_ref().unwrap().join(" ");
        assert!(!script.contains("s\"ecret"));
        assert!(
            script.contains("--file=\"$file\"") && !script.contains('|'),
            "{script}"
        );
        assert!(script.contains("'--single-transaction'") && script.contains("'ON_ERROR_STOP=1'"));
        let env = container.env.clone().unwrap();
        for name in ["SOURCE_PASSWORD", "TARGET_PASSWORD"] {
            let var = env.iter().find(|e| e.name == name).unwrap();
            assert!(
                var.value.is_none() && var.value_from.is_some(),
                "{name} from a Secret"
            );
        }
        let epilogue = env.iter().find(|e| e.name == "PGSHIFT_EPILOGUE").unwrap();
        assert_eq!(
            epilogue.value.as_deref(),
            Some("INSERT INTO x VALUES ('step');")
        );
        let target = env.iter().find(|e| e.name == "TARGET_HOST").unwrap();
        assert_eq!(target.value.as_deref(), Some("10.96.0.30"));
    }
}
