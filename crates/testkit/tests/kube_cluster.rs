//! The test kit against the real control plane: every test starts a cluster of its own.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, ContainerStatus, Pod, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use pgshift_testkit::{eventually, KubeCluster};
use serde_json::json;

async fn start() -> KubeCluster {
    KubeCluster::start_for_test().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crd_schema_rejects_an_invalid_object() {
    let cluster = start().await;
    let client = cluster.client();
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.git_version, pgshift_testkit::KUBE_VERSION);

    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "upgrades.pgshift.dev"},
        "spec": {
            "group": "pgshift.dev",
            "scope": "Namespaced",
            "names": {"plural": "upgrades", "singular": "upgrade", "kind": "Upgrade"},
            "versions": [{
                "name": "v1alpha1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"spec": {
                        "type": "object",
                        "required": ["targetMajor"],
                        "properties": {"targetMajor": {"type": "integer", "minimum": 13, "maximum": 18}}
                    }}
                }}
            }]
        }
    }))
    .unwrap();
    cluster.install_crd(&crd).await.unwrap();

    let resource =
        ApiResource::from_gvk(&GroupVersionKind::gvk("pgshift.dev", "v1alpha1", "Upgrade"));
    let upgrades: Api<DynamicObject> = Api::namespaced_with(client, "default", &resource);
    let object = |name: &str, spec: serde_json::Value| -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "pgshift.dev/v1alpha1", "kind": "Upgrade",
            "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap()
    };
    let err = upgrades
        .create(
            &PostParams::default(),
            &object("bad", json!({"targetMajor": 99})),
        )
        .await
        .expect_err("targetMajor 99 is above the schema's maximum");
    match err {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(
                status.message.contains("spec.targetMajor"),
                "{}",
                status.message
            );
        }
        other => panic!("expected a 422 from the API server, got {other}"),
    }
    let err = upgrades
        .create(&PostParams::default(), &object("missing", json!({})))
        .await
        .expect_err("targetMajor is required");
    assert!(err.to_string().contains("targetMajor"), "{err}");
    upgrades
        .create(
            &PostParams::default(),
            &object("good", json!({"targetMajor": 18})),
        )
        .await
        .unwrap();
}

const PASSWORD: &str = "s3cret-pw";

/// A StatefulSet `pg` of one `postgres:<major>` pod with a claim template, a headless Service
/// `pg-headless` and a ClusterIP Service `pg`.
async fn postgres_statefulset(client: &kube::Client, major: u32) {
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    let set: StatefulSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "pg"},
        "spec": {
            "serviceName": "pg-headless",
            "replicas": 1,
            "selector": {"matchLabels": {"app": "pg"}},
            "template": {
                "metadata": {"labels": {"app": "pg"}},
                "spec": {
                    "terminationGracePeriodSeconds": 10,
                    "containers": [{
                        "name": "postgres",
                        "image": format!("postgres:{major}"),
                        "args": ["-c", "wal_level=logical", "-c", "max_connections=50"],
                        "env": [
                            {"name": "POSTGRES_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "pg-auth", "key": "password"}}},
                            {"name": "POSTGRES_USER", "value": "app"},
                            {"name": "POSTGRES_DB", "value": "appdb"},
                            {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"},
                        ],
                        "ports": [{"name": "postgres", "containerPort": 5432}],
                        "readinessProbe": {
                            "exec": {"command": ["pg_isready", "-U", "app", "-d", "appdb"]},
                            "periodSeconds": 1, "failureThreshold": 3,
                        },
                        "livenessProbe": {
                            "tcpSocket": {"port": "postgres"},
                            "initialDelaySeconds": 10, "periodSeconds": 2,
                        },
                        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}],
                    }],
                },
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
            }],
        },
    }))
    .unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pg-auth"},
        "stringData": {"password": PASSWORD},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    statefulsets
        .create(&PostParams::default(), &set)
        .await
        .unwrap();
    create_service(
        client,
        "pg-headless",
        json!({"app": "pg"}),
        5432,
        Some("None"),
    )
    .await;
    create_service(client, "pg", json!({"app": "pg"}), 5432, None).await;
}

/// Creates a Service selecting `selector` on TCP `port` (target: the same port); returns its
/// ClusterIP.
async fn create_service(
    client: &kube::Client,
    name: &str,
    selector: serde_json::Value,
    port: u16,
    cluster_ip: Option<&str>,
) -> String {
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": selector, "clusterIP": cluster_ip,
                 "ports": [{"name": "tcp", "port": port, "targetPort": port}]},
    }))
    .unwrap();
    let created = services
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    created.spec.unwrap().cluster_ip.unwrap()
}

async fn service_ip(client: &kube::Client, name: &str) -> String {
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    services
        .get(name)
        .await
        .unwrap()
        .spec
        .unwrap()
        .cluster_ip
        .unwrap()
}

/// Waits until pod `name` is Ready; returns it.
async fn ready_pod(client: &kube::Client, name: &str, timeout: Duration) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    eventually(&format!("pod {name} to be Ready"), timeout, || {
        let pods = pods.clone();
        async move {
            let pod = pods.get_opt(name).await.ok()??;
            let ready = pod
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            (ready && pod.metadata.deletion_timestamp.is_none()).then_some(pod)
        }
    })
    .await
}

fn pod_ip(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("a pod IP")
}

fn pg_config(host: &str, port: u16, user: &str, dbname: &str) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(port)
        .user(user)
        .password(PASSWORD)
        .dbname(dbname)
        .connect_timeout(Duration::from_secs(5));
    config
}

async fn connect(host: &str, port: u16, user: &str, dbname: &str) -> tokio_postgres::Client {
    let (client, connection) = pg_config(host, port, user, dbname)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {host}:{port} as {user}: {e}"));
    tokio::spawn(connection);
    client
}

/// Like [`connect`], `None` on failure (for polling).
async fn try_connect(
    host: &str,
    port: u16,
    user: &str,
    dbname: &str,
) -> Option<tokio_postgres::Client> {
    let (client, connection) = pg_config(host, port, user, dbname)
        .connect(tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(connection);
    Some(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulset_of_postgres_keeps_its_data_across_pod_deletion() {
    let cluster = start().await;
    let client = cluster.client();
    postgres_statefulset(&client, 15).await;
    let started = Instant::now();
    let pod = ready_pod(&client, "pg-0", Duration::from_secs(120)).await;
    eprintln!("pg-0 Ready in {:.1?}", started.elapsed());
    let ip = pod_ip(&pod);
    assert!(ip.starts_with("127."), "{ip}");

    let db = connect(&ip, 5432, "app", "appdb").await;
    let version: String = db
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);
    assert!(version.starts_with("15."), "{version}");
    let wal_level: String = db.query_one("SHOW wal_level", &[]).await.unwrap().get(0);
    assert_eq!(wal_level, "logical");
    db.batch_execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('survives')")
        .await
        .unwrap();
    drop(db);

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let old_uid = pod.metadata.uid.clone();
    pods.delete("pg-0", &DeleteParams::default()).await.unwrap();
    let started = Instant::now();
    let pod = eventually("a new pg-0", Duration::from_secs(120), || {
        let client = client.clone();
        let old_uid = old_uid.clone();
        async move {
            let pod = ready_pod(&client, "pg-0", Duration::from_secs(120)).await;
            (pod.metadata.uid != old_uid).then_some(pod)
        }
    })
    .await;
    eprintln!("replacement pg-0 Ready in {:.1?}", started.elapsed());
    let db = connect(&pod_ip(&pod), 5432, "app", "appdb").await;
    let kept: String = db
        .query_one("SELECT v FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, "survives");
    let restarts = pod.status.clone().unwrap().container_statuses.unwrap()[0].restart_count;
    assert_eq!(restarts, 0);

    // Through the Service: its ClusterIP is loopback and the proxy forwards to the pod.
    let cluster_ip = service_ip(&client, "pg").await;
    assert!(cluster_ip.starts_with("127."), "{cluster_ip}");
    let via_service = eventually(
        "the pg Service to reach the new pod",
        Duration::from_secs(30),
        || {
            let cluster_ip = cluster_ip.clone();
            let ip = pod_ip(&pod);
            async move {
                let db = try_connect(&cluster_ip, 5432, "app", "appdb").await?;
                let server: String = db
                    .query_one("SELECT host(inet_server_addr())", &[])
                    .await
                    .ok()?
                    .get(0);
                (server == ip).then_some(db)
            }
        },
    )
    .await;
    let kept: String = via_service
        .query_one("SELECT v FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, "survives");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_deployment_serves_queries_through_its_service() {
    let cluster = start().await;
    let client = cluster.client();
    postgres_statefulset(&client, 15).await;
    let pg = service_ip(&client, "pg").await;
    // PgBouncer's address for the database is the postgres Service's ClusterIP.
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let config: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "pgbouncer"},
        "data": {
            "pgbouncer.ini": format!(
                "[databases]\nappdb = host={pg} port=5432 dbname=appdb\n\n[pgbouncer]\n\
                 listen_addr = 0.0.0.0\nlisten_port = 6432\nauth_type = scram-sha-256\n\
                 auth_file = /etc/pgbouncer/userlist.txt\npool_mode = transaction\n\
                 logfile = /var/log/pgbouncer/pgbouncer.log\n"
            ),
            "userlist.txt": format!("\"app\" \"{PASSWORD}\"\n"),
        },
    }))
    .unwrap();
    config_maps
        .create(&PostParams::default(), &config)
        .await
        .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "pgbouncer"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "pgbouncer"}},
            "template": {
                "metadata": {"labels": {"app": "pgbouncer"}},
                "spec": {"containers": [{
                    "name": "pgbouncer",
                    "image": "edoburu/pgbouncer:v1.23.1-p2",
                    "ports": [{"name": "pgbouncer", "containerPort": 6432}],
                    "readinessProbe": {"tcpSocket": {"port": "pgbouncer"}, "periodSeconds": 1},
                    "volumeMounts": [{"name": "config", "mountPath": "/etc/pgbouncer"}],
                }],
                "volumes": [{"name": "config", "configMap": {"name": "pgbouncer"}}]},
            },
        },
    }))
    .unwrap();
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let bouncer = create_service(
        &client,
        "pgbouncer",
        json!({"app": "pgbouncer"}),
        6432,
        None,
    )
    .await;

    let started = Instant::now();
    eventually(
        "the Deployment to be available",
        Duration::from_secs(120),
        || {
            let deployments = deployments.clone();
            async move {
                let status = deployments.get("pgbouncer").await.ok()?.status?;
                (status.available_replicas == Some(1)).then_some(())
            }
        },
    )
    .await;
    eprintln!(
        "pgbouncer Deployment available in {:.1?}",
        started.elapsed()
    );
    let db = eventually(
        "a query through the pgbouncer Service",
        Duration::from_secs(60),
        || {
            let bouncer = bouncer.clone();
            async move {
                let db = try_connect(&bouncer, 6432, "app", "appdb").await?;
                db.query_one("SELECT 1", &[]).await.ok()?;
                Some(db)
            }
        },
    )
    .await;
    db.batch_execute("CREATE TABLE t (n int); INSERT INTO t SELECT generate_series(1, 100)")
        .await
        .unwrap();
    let sum: i64 = db
        .query_one("SELECT sum(n) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sum, 5050);
    // We dialled port 6432; the server is on 5432: PgBouncer relayed the session.
    let port: i32 = db
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port, 5432);
}

/// A bare pod `name` of `postgres:<major>` labelled `role=<role>`, data in its own directory.
async fn postgres_pod(client: &kube::Client, name: &str, role: &str, major: u32) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"role": role}},
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "postgres",
                "image": format!("postgres:{major}"),
                "env": [{"name": "POSTGRES_PASSWORD", "value": PASSWORD}],
                "ports": [{"containerPort": 5432}],
                "readinessProbe": {"exec": {"command": ["pg_isready"]}, "periodSeconds": 1},
            }],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
}

/// The address and version number of the server a connection is on.
async fn server_of(db: &tokio_postgres::Client) -> (String, String) {
    let row = db
        .query_one(
            "SELECT host(inet_server_addr()), current_setting('server_version_num')",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipping_a_service_selector_moves_new_connections_only() {
    let cluster = start().await;
    let client = cluster.client();
    postgres_pod(&client, "pg-a", "a", 16).await;
    postgres_pod(&client, "pg-b", "b", 17).await;
    let service = create_service(&client, "primary", json!({"role": "a"}), 5432, None).await;
    let a = pod_ip(&ready_pod(&client, "pg-a", Duration::from_secs(120)).await);
    let b = pod_ip(&ready_pod(&client, "pg-b", Duration::from_secs(120)).await);
    assert_ne!(a, b);

    let established = eventually(
        "a connection through the Service",
        Duration::from_secs(30),
        || {
            let service = service.clone();
            async move { try_connect(&service, 5432, "postgres", "postgres").await }
        },
    )
    .await;
    let (server, version) = server_of(&established).await;
    assert_eq!(server, a);
    assert!(version.starts_with("16"), "{version}");

    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let patch = json!({"spec": {"selector": {"role": "b"}}});
    services
        .patch("primary", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let moved = eventually(
        "new connections to reach pg-b",
        Duration::from_secs(30),
        || {
            let service = service.clone();
            let b = b.clone();
            async move {
                let db = try_connect(&service, 5432, "postgres", "postgres").await?;
                let server: String = db
                    .query_one("SELECT host(inet_server_addr())", &[])
                    .await
                    .ok()?
                    .get(0);
                (server == b).then_some(db)
            }
        },
    )
    .await;
    assert!(server_of(&moved).await.1.starts_with("17"));
    // The connection made before the flip still works and is still on pg-a.
    assert_eq!(server_of(&established).await.0, a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_psql_to_completion_and_report_exit_codes() {
    let cluster = start().await;
    let client = cluster.client();
    postgres_statefulset(&client, 15).await;
    ready_pod(&client, "pg-0", Duration::from_secs(120)).await;
    let pg = service_ip(&client, "pg").await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), "default");
    let job = |name: &str, sql: &str| -> Job {
        serde_json::from_value(json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name},
            "spec": {
                "backoffLimit": 0,
                "template": {"spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "psql",
                        "image": "postgres:18",
                        "command": ["psql", "-h", "$(PG_HOST)", "-U", "app", "-d", "appdb",
                                    "-v", "ON_ERROR_STOP=1", "-c", sql],
                        "env": [
                            {"name": "PG_HOST", "value": pg},
                            {"name": "PGPASSWORD", "valueFrom": {"secretKeyRef": {"name": "pg-auth", "key": "password"}}},
                        ],
                    }],
                }},
            },
        }))
        .unwrap()
    };
    jobs.create(
        &PostParams::default(),
        &job("ok", "CREATE TABLE from_job AS SELECT 42 AS answer"),
    )
    .await
    .unwrap();
    jobs.create(&PostParams::default(), &job("fails", "SELECT 1/0"))
        .await
        .unwrap();

    job_finished(&jobs, "ok", "Complete").await;
    job_finished(&jobs, "fails", "Failed").await;
    assert_eq!(job_exit_code(&client, "ok").await, 0);
    // psql's exit code for an SQL error with ON_ERROR_STOP.
    assert_eq!(job_exit_code(&client, "fails").await, 1);

    let db = connect(
        &pod_ip(&ready_pod(&client, "pg-0", Duration::from_secs(10)).await),
        5432,
        "app",
        "appdb",
    )
    .await;
    let answer: i32 = db
        .query_one("SELECT answer FROM from_job", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(answer, 42);

    // An image the process kubelet cannot run fails a run-to-completion pod with the reason.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "web", "image": "nginx:1.27"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let status = eventually("pod web to fail", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move {
            let status = pods.get("web").await.ok()?.status?;
            (status.phase.as_deref() == Some("Failed")).then_some(status)
        }
    })
    .await;
    assert_eq!(status.reason.as_deref(), Some("UnsupportedImage"));
    let message = status.message.unwrap_or_default();
    assert!(
        message.contains("nginx:1.27") && message.contains("not supported"),
        "{message}"
    );
}

async fn job_finished(jobs: &Api<Job>, name: &str, condition: &str) {
    eventually(
        &format!("job {name} to be {condition}"),
        Duration::from_secs(120),
        || {
            let jobs = jobs.clone();
            async move {
                let status = jobs.get(name).await.ok()?.status?;
                status
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == condition && c.status == "True")
                    .then_some(())
            }
        },
    )
    .await
}

/// The exit code of the (only) container of job `name`'s (only) pod.
async fn job_exit_code(client: &kube::Client, name: &str) -> i32 {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let list = pods
        .list(&ListParams::default().labels(&format!("job-name={name}")))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1, "pods of job {name}");
    let status = list.items[0].status.clone().unwrap();
    let state = status.container_statuses.unwrap()[0].state.clone().unwrap();
    state.terminated.expect("a terminated container").exit_code
}

/// The status of the (only) container of pod `name` once `done` holds for it.
async fn container_status(
    pods: &Api<Pod>,
    name: &str,
    what: &str,
    done: impl Fn(&ContainerStatus) -> bool,
) -> ContainerStatus {
    eventually(
        &format!("pod {name}: {what}"),
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            let done = &done;
            async move {
                let status = pods.get(name).await.ok()?.status?.container_statuses?;
                status.into_iter().next().filter(done)
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_containers_report_termination_messages() {
    let cluster = start().await;
    let client = cluster.client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = |name: &str, restart: &str, policy: &str, script: &str| -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {
                "restartPolicy": restart,
                "containers": [{
                    "name": "main", "image": "postgres:18",
                    "command": ["sh", "-c", script],
                    "terminationMessagePolicy": policy,
                    "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                }],
                "volumes": [{"name": "scratch", "emptyDir": {}}],
            },
        }))
        .unwrap()
    };

    // A failing Job with FallbackToLogsOnError: its output (stdout and stderr) is the message.
    let jobs: Api<Job> = Api::namespaced(client.clone(), "default");
    let job: Job = serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "fails"},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "main", "image": "postgres:18",
                "command": ["sh", "-c", "echo first; echo \"psql: error: something failed\" >&2; exit 3"],
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }],
        }}},
    }))
    .unwrap();
    jobs.create(&PostParams::default(), &job).await.unwrap();
    // The program writes its own message: exit 0 with it (its output is not the message).
    pods.create(
        &PostParams::default(),
        &pod(
            "writes",
            "Never",
            "File",
            "echo progress; echo 'migrated 42 rows' > /dev/termination-log",
        ),
    )
    .await
    .unwrap();
    // A first run that fails with a message of its own (which wins over its output), then a
    // run that succeeds without one: the file is new for every run.
    pods.create(
        &PostParams::default(),
        &pod(
            "retries",
            "OnFailure",
            "FallbackToLogsOnError",
            "if [ -e /scratch/ran ]; then echo second run; exit 0; fi; touch /scratch/ran; \
             echo first run; echo 'disk full' > /dev/termination-log; exit 1",
        ),
    )
    .await
    .unwrap();

    job_finished(&jobs, "fails", "Failed").await;
    let list = pods
        .list(&ListParams::default().labels("job-name=fails"))
        .await
        .unwrap();
    let status = list.items[0]
        .status
        .clone()
        .unwrap()
        .container_statuses
        .unwrap();
    let terminated = status[0].state.clone().unwrap().terminated.unwrap();
    assert_eq!(terminated.exit_code, 3);
    assert_eq!(terminated.reason.as_deref(), Some("Error"));
    assert_eq!(
        terminated.message.as_deref(),
        Some("first\npsql: error: something failed\n")
    );

    let writes = container_status(&pods, "writes", "terminated", |s| {
        s.state.as_ref().is_some_and(|s| s.terminated.is_some())
    })
    .await;
    let terminated = writes.state.unwrap().terminated.unwrap();
    assert_eq!(terminated.exit_code, 0);
    assert_eq!(terminated.reason.as_deref(), Some("Completed"));
    assert_eq!(terminated.message.as_deref(), Some("migrated 42 rows\n"));

    let retries = container_status(&pods, "retries", "succeeded after a restart", |s| {
        s.state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .is_some_and(|t| t.exit_code == 0)
    })
    .await;
    assert_eq!(retries.restart_count, 1);
    let terminated = retries.state.unwrap().terminated.unwrap();
    assert_eq!(terminated.reason.as_deref(), Some("Completed"));
    assert_eq!(terminated.message, None);
    let last = retries.last_state.unwrap().terminated.unwrap();
    assert_eq!(
        (
            last.exit_code,
            last.reason.as_deref(),
            last.message.as_deref()
        ),
        (1, Some("Error"), Some("disk full\n"))
    );
}

/// `roots` and all their descendants that are alive now (from /proc).
fn process_tree(roots: &[u32]) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command may contain spaces and parentheses: fields follow the last ')'.
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut tree: Vec<u32> = roots.iter().copied().filter(|pid| alive(*pid)).collect();
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    tree
}

/// True while `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| Some(stat.rsplit_once(')')?.1.split_whitespace().next()? != "Z"))
        .unwrap_or(false)
}

async fn all_gone(pids: &[u32]) {
    let pids = pids.to_vec();
    eventually(
        "every process of the cluster to be gone",
        Duration::from_secs(20),
        || {
            let left: Vec<u32> = pids.iter().copied().filter(|pid| alive(*pid)).collect();
            async move { left.is_empty().then_some(()) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_cluster_leaves_no_process_behind() {
    let cluster = start().await;
    let client = cluster.client();
    postgres_pod(&client, "pg-a", "a", 18).await;
    let ip = pod_ip(&ready_pod(&client, "pg-a", Duration::from_secs(120)).await);
    let pids = process_tree(&cluster.pids());
    // etcd, the API server, the controller manager, the scheduler, postgres and its children.
    assert!(pids.len() >= 6, "{pids:?}");
    let api: std::net::SocketAddr = cluster
        .server()
        .trim_start_matches("https://")
        .parse()
        .unwrap();
    let work = cluster.work_dir().to_path_buf();
    let started = Instant::now();
    drop(cluster);
    eprintln!("cluster dropped in {:.1?}", started.elapsed());
    all_gone(&pids).await;
    assert!(!work.exists(), "{} is left", work.display());
    for address in [api, format!("{ip}:5432").parse().unwrap()] {
        assert!(
            tokio::net::TcpStream::connect(address).await.is_err(),
            "something still listens on {address}"
        );
    }
}

/// Set for the child process of [`killing_the_test_process_stops_its_cluster`].
const DYING_HELPER_ENV: &str = "PGSHIFT_TESTKIT_DYING_HELPER";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_test_process_stops_its_cluster() {
    use tokio::io::AsyncBufReadExt;
    pgshift_testkit::init_test_tracing();
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "cluster_in_a_process_that_dies",
            "--ignored",
            "--nocapture",
        ])
        .env(DYING_HELPER_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let report = tokio::time::timeout(Duration::from_secs(180), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(report) = line.strip_prefix("CLUSTER ") {
                return report.to_string();
            }
        }
        panic!("the helper process ended without starting its cluster");
    })
    .await
    .expect("the helper process to start its cluster");
    let (pids, work) = report.split_once(" WORK ").unwrap();
    let pids: Vec<u32> = pids.split(',').map(|p| p.parse().unwrap()).collect();
    assert!(pids.iter().all(|pid| alive(*pid)));
    // SIGKILL: no destructor runs; only the kernel's parent-death signal can stop the cluster.
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    all_gone(&pids).await;
    std::fs::remove_dir_all(work).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a helper: killing_the_test_process_stops_its_cluster runs it in a process it kills"]
async fn cluster_in_a_process_that_dies() {
    if std::env::var_os(DYING_HELPER_ENV).is_none() {
        return;
    }
    let cluster = start().await;
    let client = cluster.client();
    postgres_pod(&client, "pg-a", "a", 15).await;
    ready_pod(&client, "pg-a", Duration::from_secs(120)).await;
    let pids: Vec<String> = process_tree(&cluster.pids())
        .iter()
        .map(u32::to_string)
        .collect();
    println!(
        "CLUSTER {} WORK {}",
        pids.join(","),
        cluster.work_dir().display()
    );
    std::future::pending::<()>().await;
}
