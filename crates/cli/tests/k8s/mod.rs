//! The operator's end-to-end fixture: a real control plane and process kubelet (pgshift-testkit),
//! a source PostgreSQL StatefulSet with its Service, the CRD, and `pgshift operator` as a real
//! process (so that tests can kill it).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use pgshift_operator::crd::{Phase, PostgresUpgrade};
use pgshift_operator::names::TARGET_SUPERUSER;
pub use pgshift_testkit::eventually;
use pgshift_testkit::KubeCluster;
use serde_json::json;
use tokio_postgres::NoTls;

#[path = "../../../operator/tests/support/chart.rs"]
mod chart;

pub const NS: &str = "default";
/// Where the chart's release (its ServiceAccount and the leader Lease) lives.
pub const OPERATOR_NS: &str = "pgshift-system";
pub const APP_USER: &str = "app";
pub const APP_DB: &str = "app";
/// The leader Lease's duration every operator of these tests runs with.
pub const LEASE_DURATION: Duration = Duration::from_secs(3);

pub struct Fixture {
    pub cluster: KubeCluster,
    /// The chart's ServiceAccount, which the operator acts as (impersonation): RBAC the
    /// chart lacks fails the tests.
    operator_user: String,
    pub client: Client,
    pub superuser_password: String,
    pub app_password: String,
    operators: Vec<Child>,
    /// Where each started operator serves /metrics.
    metrics_ports: Vec<u16>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for child in &mut self.operators {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn token() -> String {
    use rand::distributions::{Alphanumeric, DistString};
    Alphanumeric.sample_string(&mut rand::thread_rng(), 24)
}

impl Fixture {
    /// A cluster with the CRD installed and a `postgres:<major>` source (`db`) holding the
    /// ledger in database `app`, owned by role `app`.
    pub async fn start(source_major: u32, source_args: &[&str]) -> Fixture {
        let cluster = KubeCluster::start_for_test().await;
        let client = cluster.client();
        let operator_user = chart::install_rbac(client.clone(), OPERATOR_NS).await;
        let fixture = Fixture {
            cluster,
            operator_user,
            client,
            superuser_password: token(),
            app_password: token(),
            operators: Vec::new(),
            metrics_ports: Vec::new(),
        };
        fixture.install_crd().await;
        fixture.start_source(source_major, source_args).await;
        fixture
    }

    async fn install_crd(&self) {
        let yaml = std::fs::read_to_string(
            repo_root().join("deploy/crds/postgresupgrades.pgshift.io.yaml"),
        )
        .expect("deploy/crds holds the CRD");
        let crd: CustomResourceDefinition = serde_yaml::from_str(&yaml).unwrap();
        self.cluster.install_crd(&crd).await.unwrap();
    }

    async fn start_source(&self, major: u32, extra_args: &[&str]) {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), NS);
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": "db-superuser"},
                    "stringData": {"username": "postgres", "password": self.superuser_password},
                }))
                .unwrap(),
            )
            .await
            .unwrap();
        let mut args = vec!["-c", "wal_level=logical"];
        args.extend_from_slice(extra_args);
        let sets: Api<k8s_openapi::api::apps::v1::StatefulSet> =
            Api::namespaced(self.client.clone(), NS);
        sets.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "db"},
                "spec": {
                    "serviceName": "db",
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": "db"}},
                    "template": {
                        "metadata": {"labels": {"app": "db"}},
                        "spec": {"containers": [{
                            "name": "postgres",
                            "image": format!("postgres:{major}"),
                            "args": args,
                            "env": [
                                {"name": "POSTGRES_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db-superuser", "key": "password"}}},
                                {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"},
                            ],
                            "ports": [{"name": "postgres", "containerPort": 5432}],
                            "readinessProbe": {"exec": {"command": ["pg_isready", "-q"]}, "periodSeconds": 1, "timeoutSeconds": 5},
                            "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}],
                        }]},
                    },
                    "volumeClaimTemplates": [{
                        "metadata": {"name": "data"},
                        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
                    }],
                },
            }))
            .unwrap(),
        )
        .await
        .unwrap();
        let services: Api<Service> = Api::namespaced(self.client.clone(), NS);
        services
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": "db"},
                    "spec": {"selector": {"app": "db"}, "ports": [{"port": 5432, "targetPort": 5432}]},
                }))
                .unwrap(),
            )
            .await
            .unwrap();
        let superuser = eventually(
            "the source to accept connections",
            Duration::from_secs(90),
            || async {
                self.connect("postgres", &self.superuser_password.clone(), "postgres")
                    .await
            },
        )
        .await;
        superuser
            .batch_execute(&format!(
                "CREATE ROLE {APP_USER} LOGIN PASSWORD '{}'",
                self.app_password
            ))
            .await
            .unwrap();
        superuser
            .batch_execute(&format!("CREATE DATABASE {APP_DB} OWNER {APP_USER}"))
            .await
            .unwrap();
        pgshift_lab::ledger::Ledger::install(&self.app().await, 100)
            .await
            .unwrap();
    }

    /// The `db` Service's address.
    pub async fn service_ip(&self, name: &str) -> String {
        let services: Api<Service> = Api::namespaced(self.client.clone(), NS);
        services
            .get(name)
            .await
            .unwrap()
            .spec
            .unwrap()
            .cluster_ip
            .unwrap()
    }

    /// A connection through the `db` Service (the one clients use).
    pub async fn connect(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Option<tokio_postgres::Client> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(self.service_ip("db").await)
            .port(5432)
            .user(user)
            .password(password)
            .dbname(db)
            .connect_timeout(Duration::from_secs(3));
        let (client, connection) = config.connect(NoTls).await.ok()?;
        tokio::spawn(connection);
        Some(client)
    }

    /// The application's session through the `db` Service.
    pub async fn app(&self) -> tokio_postgres::Client {
        self.connect(APP_USER, &self.app_password, APP_DB)
            .await
            .expect("the clients' Service answers")
    }

    /// Ledger clients through the `db` Service, recycling their connections every second as
    /// an application pool with a maximum lifetime does.
    pub async fn ledger(&self, clients: usize) -> pgshift_lab::ledger::LedgerHandle {
        let mut config = tokio_postgres::Config::new();
        config
            .host(self.service_ip("db").await)
            .port(5432)
            .user(APP_USER)
            .password(self.app_password.clone())
            .dbname(APP_DB);
        let mut options = pgshift_lab::ledger::LoadOptions::new(clients);
        options.rate = Some(200.0);
        options.max_connection_lifetime = Some(Duration::from_secs(1));
        pgshift_lab::ledger::Ledger::run(pgshift_lab::ledger::LedgerTarget::new(config), options)
    }

    /// A kubeconfig that acts as the chart's ServiceAccount.
    fn operator_kubeconfig(&self) -> PathBuf {
        let path = self.cluster.work_dir().join("operator.kubeconfig");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(self.cluster.kubeconfig()).unwrap())
                .unwrap();
        config["users"][0]["user"]["as"] = json!(self.operator_user);
        std::fs::write(&path, config.to_string()).unwrap();
        path
    }

    /// Kills (SIGKILL) the operator started `index`-th, as a crash would.
    pub fn kill_operator(&mut self, index: usize) {
        let child = &mut self.operators[index];
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Waits for the operator started `index`-th to exit by itself.
    pub async fn operator_exit(
        &mut self,
        index: usize,
        timeout: Duration,
    ) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.operators[index].try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "operator {index} is still running"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A superuser session on the source pod itself (not through any Service).
    pub async fn source_direct(&self, db: &str) -> tokio_postgres::Client {
        let ip = self.pod_ip("db-0").await;
        direct(&ip, "postgres", &self.superuser_password, db).await
    }

    async fn pod_ip(&self, name: &str) -> String {
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(self.client.clone(), NS);
        pods.get(name)
            .await
            .unwrap()
            .status
            .unwrap()
            .pod_ip
            .unwrap()
    }

    /// The password of the target's superuser, from the Secret the operator made for `upgrade`.
    async fn target_password(&self, upgrade: &str) -> String {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), NS);
        let secret = secrets
            .get(&format!("{upgrade}-target-superuser"))
            .await
            .unwrap();
        String::from_utf8(secret.data.unwrap()["password"].0.clone()).unwrap()
    }

    /// A superuser session on the target pod of `upgrade` itself.
    pub async fn target_direct(&self, upgrade: &str, db: &str) -> tokio_postgres::Client {
        let ip = self.pod_ip(&format!("{upgrade}-target-0")).await;
        let password = self.target_password(upgrade).await;
        direct(&ip, TARGET_SUPERUSER, &password, db).await
    }

    /// `pgshift <command>` run by a person on the same upgrade as the operator: the source and
    /// target pods of `upgrade` directly, database `app`, passwords in a pgpass file.
    pub async fn pgshift(&self, upgrade: &str, command: &str, extra: &[&str]) -> Command {
        let source = self.pod_ip("db-0").await;
        let target = self.pod_ip(&format!("{upgrade}-target-0")).await;
        let pgpass = self.cluster.work_dir().join("pgpass");
        // Both passwords are alphanumeric: nothing to escape.
        std::fs::write(
            &pgpass,
            format!(
                "{source}:5432:*:postgres:{}\n{target}:5432:*:{TARGET_SUPERUSER}:{}\n",
                self.superuser_password,
                self.target_password(upgrade).await
            ),
        )
        .unwrap();
        std::fs::set_permissions(&pgpass, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let mut pgshift = Command::new(env!("CARGO_BIN_EXE_pgshift"));
        pgshift
            .arg(command)
            .arg(format!(
                "--source=postgres://postgres@{source}:5432/{APP_DB}"
            ))
            .arg(format!(
                "--target=postgres://{TARGET_SUPERUSER}@{target}:5432/{APP_DB}"
            ))
            .args(extra)
            .env("PGPASSFILE", pgpass)
            .env_remove("PGPASSWORD")
            .stdin(Stdio::null());
        pgshift
    }

    /// What an upgrade may touch on the source, as text: slots, publications, schemas and
    /// tables of `app`, database and role settings, roles with their password hashes.
    pub async fn source_state(&self) -> Vec<String> {
        let server = self.source_direct("postgres").await;
        let app = self.source_direct(APP_DB).await;
        let mut state = Vec::new();
        for (client, query) in [
            (&server, "SELECT 'slot ' || slot_name FROM pg_replication_slots"),
            (&server, "SELECT 'setting ' || coalesce(setdatabase::text, '') || ' ' || setrole::text || ' ' || array_to_string(setconfig, ',') FROM pg_db_role_setting"),
            (&server, "SELECT 'role ' || rolname || ' ' || coalesce(rolpassword, '') FROM pg_authid WHERE rolname !~ '^pg_'"),
            (&server, "SELECT 'database ' || datname || ' ' || datallowconn FROM pg_database"),
            (&app, "SELECT 'publication ' || pubname FROM pg_publication"),
            (&app, "SELECT 'schema ' || nspname FROM pg_namespace"),
            (&app, "SELECT 'relation ' || oid::regclass::text FROM pg_class WHERE relnamespace <> 'pg_catalog'::regnamespace AND relnamespace <> 'information_schema'::regnamespace AND relname !~ '^pg_toast'"),
        ] {
            for row in client.query(query, &[]).await.unwrap() {
                state.push(row.get::<_, String>(0));
            }
        }
        state.sort();
        state
    }

    /// Starts `pgshift operator` as a process acting as the chart's ServiceAccount.
    pub fn start_operator(&mut self, identity: &str) {
        let log = std::fs::File::create(
            self.cluster
                .work_dir()
                .join(format!("operator-{identity}-{}.log", self.operators.len())),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        self.metrics_ports.push(port);
        let child = Command::new(env!("CARGO_BIN_EXE_pgshift"))
            .args(["operator", "--lease-name", "pgshift-operator"])
            .arg(format!("--metrics-addr=127.0.0.1:{port}"))
            .env("KUBECONFIG", self.operator_kubeconfig())
            .env("POD_NAMESPACE", OPERATOR_NS)
            .env("POD_NAME", identity)
            .arg(format!("--lease-duration={}s", LEASE_DURATION.as_secs()))
            .env("RUST_LOG", "pgshift_operator=debug,pgshift_engine=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("pgshift operator starts");
        self.operators.push(child);
    }

    /// Two replicas, `operator-a` (started first, so it takes the lease) and `operator-b`.
    pub fn start_leader_and_standby(&mut self) {
        self.start_operator("operator-a");
        std::thread::sleep(Duration::from_secs(2));
        self.start_operator("operator-b");
    }

    /// `GET /metrics` of the operator started `index`-th.
    pub async fn metrics(&self, index: usize) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_ports[index]))
            .await
            .unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: operator\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    /// The log of the operator started `index`-th.
    pub fn operator_log(&self, index: usize) -> String {
        std::fs::read_dir(self.cluster.work_dir())
            .unwrap()
            .flatten()
            .find(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                name.starts_with("operator-") && name.ends_with(&format!("-{index}.log"))
            })
            .and_then(|e| std::fs::read_to_string(e.path()).ok())
            .unwrap_or_default()
    }

    pub fn operator_logs(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(self.cluster.work_dir())
            .unwrap()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with("operator-") {
                all.push_str(&format!("==> {name}\n"));
                all.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        all
    }

    /// The logs of every pod whose name starts with `prefix` (in [`NS`]), each with the pod's
    /// log directory: the test kit's kubelet keeps `logs/pods/<namespace>_<pod>_<n>/`.
    pub fn pod_logs(&self, prefix: &str) -> Vec<(String, String)> {
        let dir = self.cluster.work_dir().join("logs").join("pods");
        let mut logs: Vec<(String, String)> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{NS}_{prefix}"))
            })
            .map(|pod| {
                let text = std::fs::read_dir(pod.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|log| std::fs::read_to_string(log.path()).ok())
                    .collect();
                (pod.file_name().to_string_lossy().into_owned(), text)
            })
            .collect();
        logs.sort();
        logs
    }

    /// The last lines of every PgBouncer pod's log of upgrade `name`, for a failure message.
    pub fn pgbouncer_log_tails(&self, name: &str, lines: usize) -> String {
        self.pod_logs(&format!("{name}-pgbouncer-"))
            .iter()
            .map(|(pod, text)| format!("--- {pod}:\n{}", tail(text, lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn upgrades(&self) -> Api<PostgresUpgrade> {
        Api::namespaced(self.client.clone(), NS)
    }

    pub async fn apply_upgrade(&self, name: &str, spec: serde_json::Value) {
        let object = json!({
            "apiVersion": "pgshift.io/v1alpha1", "kind": "PostgresUpgrade",
            "metadata": {"name": name, "namespace": NS},
            "spec": spec,
        });
        self.upgrades()
            .patch(
                name,
                &PatchParams::apply("pgshift-tests"),
                &Patch::Apply(&object),
            )
            .await
            .unwrap();
    }

    /// Waits until the upgrade `name` is deleted (its finalizer done).
    pub async fn wait_until_gone(&self, name: &str, timeout: Duration) {
        eventually("the upgrade to be gone", timeout, || async {
            self.upgrades()
                .get_opt(name)
                .await
                .unwrap()
                .is_none()
                .then_some(())
        })
        .await;
    }

    /// Waits for `phase`, returning every phase seen on the way; panics with the status and
    /// the operator's log when it does not come.
    pub async fn wait_for_phase(&self, name: &str, phase: Phase, timeout: Duration) -> Vec<Phase> {
        let deadline = Instant::now() + timeout;
        let mut seen: Vec<Phase> = Vec::new();
        loop {
            let upgrade = self.upgrades().get(name).await.unwrap();
            let current = upgrade.status.as_ref().and_then(|s| s.phase);
            if let Some(current) = current {
                if seen.last() != Some(&current) {
                    // As `kubectl get pgu -w` shows it.
                    let table = render_table(&self.table().await);
                    match seen.is_empty() {
                        true => eprintln!("{table}"),
                        false => eprintln!("{}", table.lines().last().unwrap_or_default()),
                    }
                    seen.push(current);
                }
                if current == phase {
                    return seen;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "{name} did not reach {phase:?}; seen {seen:?}; status:\n{}\n--- operator log (tail):\n{}",
                    serde_json::to_string_pretty(&upgrade.status).unwrap(),
                    tail(&self.operator_logs(), 60)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The printer columns, as `kubectl get pgu` shows them (the API server's Table).
    pub async fn table(&self) -> serde_json::Value {
        let request = http::Request::get(format!(
            "/apis/pgshift.io/v1alpha1/namespaces/{NS}/postgresupgrades"
        ))
        .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())
        .unwrap();
        self.client.request(request).await.unwrap()
    }
}

async fn direct(host: &str, user: &str, password: &str, db: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::Config::new()
        .host(host)
        .port(5432)
        .user(user)
        .password(password)
        .dbname(db)
        .connect(NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// Whether the engine has recorded its fence in this target database (it does so just before
/// pausing anyone, and forgets it once clients are released).
pub async fn fenced(target: &tokio_postgres::Client) -> bool {
    use pgshift_engine::names::{step, META_SCHEMA, STATE_TABLE};
    target
        .query_one(
            &format!("SELECT EXISTS (SELECT 1 FROM {META_SCHEMA}.{STATE_TABLE} WHERE step = $1)"),
            &[&step::FENCED],
        )
        .await
        .unwrap()
        .get(0)
}

/// pgshift's replication objects on the server `app` (a session in database `app`) is on:
/// every replication slot (the tests make none of their own), and pgshift's subscriptions
/// and publications.
pub async fn replication_objects(app: &tokio_postgres::Client) -> Vec<String> {
    let mut objects = Vec::new();
    for query in [
        "SELECT 'slot ' || slot_name FROM pg_replication_slots",
        "SELECT 'subscription ' || subname FROM pg_subscription WHERE subname LIKE 'pgshift%'",
        "SELECT 'publication ' || pubname FROM pg_publication WHERE pubname LIKE 'pgshift%'",
    ] {
        for row in app.query(query, &[]).await.unwrap() {
            objects.push(row.get::<_, String>(0));
        }
    }
    objects
}

/// `kubectl get`'s layout of a Table.
pub fn render_table(table: &serde_json::Value) -> String {
    let names: Vec<String> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_uppercase())
        .collect();
    let rows: Vec<Vec<String>> = table["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r["cells"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| match c {
                    // kubectl's rendering of an absent value.
                    serde_json::Value::Null => "<none>".to_string(),
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect()
        })
        .collect();
    let widths: Vec<usize> = (0..names.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([names[i].len()])
                .max()
                .unwrap()
        })
        .collect();
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("   ")
            .trim_end()
            .to_string()
    };
    std::iter::once(line(&names))
        .chain(rows.iter().map(|r| line(r)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The major version of the server a session is on. One simple-query message, as the ledger's
/// clients send: through PgBouncer in transaction mode a prepared statement's parse and its
/// execution can land on two server connections (the operator's PgBouncer sets no
/// `max_prepared_statements`).
pub async fn major(client: &tokio_postgres::Client) -> i32 {
    let rows = client
        .simple_query("SELECT current_setting('server_version_num')")
        .await
        .unwrap();
    let version: i32 = rows
        .iter()
        .find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0),
            _ => None,
        })
        .expect("a row")
        .parse()
        .unwrap();
    version / 10000
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}
