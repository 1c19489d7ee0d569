//! The control plane: etcd, kube-apiserver, kube-controller-manager and kube-scheduler as child
//! processes on free loopback ports, configured like controller-runtime's envtest plus the two
//! controllers (see tools/kube/smoke.sh, which this mirrors).

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Api;

use crate::error::{Error, Result};
use crate::net::{free_port, Subnets};
use crate::pki::{self, CertFiles, Pki};
use crate::process::Process;
use pgshift_lab::log_tail;

/// The Kubernetes release `tools/kube/build.sh` builds; the tests expect exactly it.
pub const KUBE_VERSION: &str = "v1.36.4";

/// Overrides where the four control-plane binaries are (what `tools/kube/build.sh` prints).
pub const KUBE_BIN_ENV: &str = "PGSHIFT_KUBE_BIN";

const BINARIES: [&str; 4] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
];

/// How long a component may take to become healthy on a busy two-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the control-plane binaries are: `$PGSHIFT_KUBE_BIN`, else
/// `<cache>/kube/<KUBE_VERSION>/bin` with the cache chosen as `tools/kube/build.sh` does
/// (`$PGSHIFT_CACHE`, else `/var/cache/pgshift` as root, else `${XDG_CACHE_HOME:-~/.cache}/pgshift`).
pub fn kube_bin_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os(KUBE_BIN_ENV).filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => cache_dir().join("kube").join(KUBE_VERSION).join("bin"),
    };
    match BINARIES.iter().find(|b| !dir.join(b).is_file()) {
        Some(missing) => Err(Error::KubeBinariesNotFound {
            dir,
            missing: (*missing).to_string(),
        }),
        None => Ok(dir),
    }
}

/// pgshift's cache of installed tools: `$PGSHIFT_CACHE`, else `/var/cache/pgshift` as root,
/// else `${XDG_CACHE_HOME:-~/.cache}/pgshift` (the rule of `tools/setup.sh`).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PGSHIFT_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/cache/pgshift");
    }
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
        })
        .join("pgshift")
}

/// The running control-plane processes, stopped in reverse start order on drop (clients before
/// the servers they talk to).
pub(crate) struct ControlPlane {
    pub(crate) work: PathBuf,
    pub(crate) logs: PathBuf,
    pub(crate) pki: Pki,
    pub(crate) subnets: Arc<Subnets>,
    pub(crate) server: String,
    pub(crate) kubeconfig: PathBuf,
    bin: PathBuf,
    processes: Vec<Process>,
}

impl ControlPlane {
    /// Starts etcd, the API server, the controller manager and the scheduler in `work` and
    /// waits until each is healthy. Returns the admin client too.
    pub(crate) async fn start(work: &Path) -> Result<(ControlPlane, kube::Client)> {
        let started = Instant::now();
        let bin = kube_bin_dir()?;
        let logs = work.join("logs");
        fs::create_dir_all(&logs)
            .map_err(|e| Error::io(format!("cannot create {}", logs.display()), e))?;
        let pki = pki::generate(&work.join("pki"))?;
        let subnets = Arc::new(Subnets::reserve()?);
        let api_port = free_port()?;
        let server = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = work.join("admin.kubeconfig");
        write_kubeconfig(&kubeconfig, &server, &pki.ca.cert, &pki.admin)?;
        let mut cp = ControlPlane {
            work: work.to_path_buf(),
            logs,
            pki,
            subnets,
            server,
            kubeconfig,
            bin,
            processes: Vec::new(),
        };

        let etcd_url = cp.start_etcd().await?;
        let client = cp.start_apiserver(api_port, &etcd_url).await?;
        let kcm_port = cp.start_controller_manager()?;
        let scheduler_port = cp.start_scheduler()?;
        let ca = cp.pki.ca.cert.clone();
        let admin = cp.pki.admin.clone();
        for (name, port) in [
            ("kube-controller-manager", kcm_port),
            ("kube-scheduler", scheduler_port),
        ] {
            let path = cp.work.join(format!("{name}-health.kubeconfig"));
            write_kubeconfig(&path, &format!("https://127.0.0.1:{port}"), &ca, &admin)?;
            let health = client_from(&path).await?;
            cp.wait_until(&format!("{name} /healthz"), || {
                let health = health.clone();
                async move { get_text(&health, "/healthz").await.as_deref() == Some("ok") }
            })
            .await?;
        }
        // Pods can only be created once the controller manager has made the namespace's
        // default service account (the ServiceAccount admission plugin insists).
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        cp.wait_until("service account default/default", || {
            let accounts = accounts.clone();
            async move { matches!(accounts.get_opt("default").await, Ok(Some(_))) }
        })
        .await?;
        tracing::info!(
            server = %cp.server,
            elapsed = ?started.elapsed(),
            "control plane ready"
        );
        Ok((cp, client))
    }

    async fn start_etcd(&mut self) -> Result<String> {
        let port = free_port()?;
        let peer_port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        // Plain HTTP on loopback as envtest does; no fsync: the data is thrown away.
        self.spawn(
            "etcd",
            &[
                "--name=testkit".into(),
                format!("--data-dir={}", self.work.join("etcd").display()),
                format!("--listen-client-urls={url}"),
                format!("--advertise-client-urls={url}"),
                format!("--listen-peer-urls={peer}"),
                format!("--initial-advertise-peer-urls={peer}"),
                format!("--initial-cluster=testkit={peer}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
        )?;
        self.wait_until("etcd /health", || async move { etcd_healthy(port) })
            .await?;
        Ok(url)
    }

    async fn start_apiserver(&mut self, port: u16, etcd_url: &str) -> Result<kube::Client> {
        let pki = self.pki.clone();
        let p = |path: &Path| path.display().to_string();
        self.spawn(
            "kube-apiserver",
            &[
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={port}"),
                format!("--cert-dir={}", self.work.join("apiserver-certs").display()),
                format!("--tls-cert-file={}", p(&pki.apiserver.cert)),
                format!("--tls-private-key-file={}", p(&pki.apiserver.key)),
                format!("--client-ca-file={}", p(&pki.ca.cert)),
                format!(
                    "--requestheader-client-ca-file={}",
                    p(&pki.front_proxy_ca.cert)
                ),
                "--requestheader-allowed-names=front-proxy-client".into(),
                "--requestheader-username-headers=X-Remote-User".into(),
                "--requestheader-group-headers=X-Remote-Group".into(),
                "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
                format!(
                    "--proxy-client-cert-file={}",
                    p(&pki.front_proxy_client.cert)
                ),
                format!("--proxy-client-key-file={}", p(&pki.front_proxy_client.key)),
                "--authorization-mode=Node,RBAC".into(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", p(&pki.service_account_pub)),
                format!(
                    "--service-account-signing-key-file={}",
                    p(&pki.service_account_key)
                ),
                // Loopback, so that the service proxy can listen on the ClusterIPs themselves.
                format!("--service-cluster-ip-range={}", self.subnets.service_cidr()),
                // The reconciler would publish 127.0.0.1 as the "kubernetes" Service's endpoint,
                // which validation refuses (loopback), logging an error every few seconds.
                "--endpoint-reconciler-type=none".into(),
                "--allow-privileged=true".into(),
                "--profiling=false".into(),
                "--v=1".into(),
            ],
        )?;
        let client = client_from(&self.kubeconfig).await?;
        self.wait_until("kube-apiserver /readyz", || {
            let client = client.clone();
            async move { get_text(&client, "/readyz").await.as_deref() == Some("ok") }
        })
        .await?;
        Ok(client)
    }

    fn start_controller_manager(&mut self) -> Result<u16> {
        let port = free_port()?;
        let pki = self.pki.clone();
        let kubeconfig = self.work.join("controller-manager.kubeconfig");
        write_kubeconfig(
            &kubeconfig,
            &self.server,
            &pki.ca.cert,
            &pki.controller_manager,
        )?;
        let kc = kubeconfig.display();
        let p = |path: &Path| path.display().to_string();
        self.spawn(
            "kube-controller-manager",
            &[
                format!("--kubeconfig={kc}"),
                format!("--authentication-kubeconfig={kc}"),
                format!("--authorization-kubeconfig={kc}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={port}"),
                format!("--tls-cert-file={}", p(&pki.controller_manager_serving.cert)),
                format!("--tls-private-key-file={}", p(&pki.controller_manager_serving.key)),
                "--leader-elect=false".into(),
                "--use-service-account-credentials=true".into(),
                format!(
                    "--service-account-private-key-file={}",
                    p(&pki.service_account_key)
                ),
                format!("--root-ca-file={}", p(&pki.ca.cert)),
                format!("--cluster-signing-cert-file={}", p(&pki.ca.cert)),
                format!("--cluster-signing-key-file={}", p(&pki.ca.key)),
                // Endpoints and EndpointSlices cannot hold loopback addresses (validation
                // refuses them), so these controllers could only fail; the service proxy
                // derives endpoints from Services and Pods instead.
                "--controllers=*,-endpoints-controller,-endpointslice-controller,-endpointslice-mirroring-controller".into(),
                "--profiling=false".into(),
                "--v=1".into(),
            ],
        )?;
        Ok(port)
    }

    fn start_scheduler(&mut self) -> Result<u16> {
        let port = free_port()?;
        let pki = self.pki.clone();
        let kubeconfig = self.work.join("scheduler.kubeconfig");
        write_kubeconfig(&kubeconfig, &self.server, &pki.ca.cert, &pki.scheduler)?;
        let kc = kubeconfig.display();
        let p = |path: &Path| path.display().to_string();
        self.spawn(
            "kube-scheduler",
            &[
                format!("--kubeconfig={kc}"),
                format!("--authentication-kubeconfig={kc}"),
                format!("--authorization-kubeconfig={kc}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={port}"),
                format!("--tls-cert-file={}", p(&pki.scheduler_serving.cert)),
                format!("--tls-private-key-file={}", p(&pki.scheduler_serving.key)),
                "--leader-elect=false".into(),
                "--profiling=false".into(),
                "--v=1".into(),
            ],
        )?;
        Ok(port)
    }

    fn spawn(&mut self, name: &str, args: &[String]) -> Result<()> {
        let log_path = self.logs.join(format!("{name}.log"));
        let log = fs::File::create(&log_path)
            .map_err(|e| Error::io(format!("cannot create {}", log_path.display()), e))?;
        let err = log
            .try_clone()
            .map_err(|e| Error::io(format!("cannot open {}", log_path.display()), e))?;
        let mut cmd = Command::new(self.bin.join(name));
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .current_dir(&self.work);
        let process =
            Process::spawn(cmd, name).map_err(|e| Error::io(format!("cannot start {name}"), e))?;
        tracing::debug!(name, pid = process.pid(), "control-plane component started");
        self.processes.push(process);
        Ok(())
    }

    /// Polls `check` every 200 ms until it holds; fails early if a component exits.
    pub(crate) async fn wait_until<F, Fut>(&self, what: &str, mut check: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if check().await {
                return Ok(());
            }
            if let Some(dead) = self.processes.iter().find(|p| p.exit().is_some()) {
                let log = self.logs.join(format!("{}.log", dead.name()));
                return Err(Error::ComponentExited {
                    component: dead.name().to_string(),
                    status: dead.exit().map(|e| e.to_string()).unwrap_or_default(),
                    tail: log_tail(&log, 30),
                    log,
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: what.to_string(),
                    secs: START_TIMEOUT.as_secs(),
                    logs: self.logs.clone(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Pids of the control-plane processes.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.processes.iter().map(Process::pid).collect()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        while let Some(process) = self.processes.pop() {
            process.stop_blocking(libc::SIGTERM, Duration::from_secs(5));
        }
    }
}

/// Writes a kubeconfig (JSON, which is YAML) authenticating with a client certificate.
pub(crate) fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca: &Path,
    identity: &CertFiles,
) -> Result<()> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "testkit", "cluster": {
            "server": server,
            "certificate-authority": ca,
        }}],
        "users": [{"name": "testkit", "user": {
            "client-certificate": identity.cert,
            "client-key": identity.key,
        }}],
        "contexts": [{"name": "testkit", "context": {"cluster": "testkit", "user": "testkit"}}],
        "current-context": "testkit",
    });
    let text = serde_json::to_string_pretty(&config).expect("a JSON value serializes");
    fs::write(path, text).map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("cannot chmod {}", path.display()), e))
}

/// A client for the kubeconfig at `path`, bound to the current tokio runtime.
pub(crate) async fn client_from(path: &Path) -> Result<kube::Client> {
    let bad = |message: String| Error::Kubeconfig {
        path: path.to_path_buf(),
        message,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| bad(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| Error::kube("cannot build a Kubernetes client", e))
}

async fn get_text(client: &kube::Client, path: &str) -> Option<String> {
    let request = http::Request::get(path).body(Vec::new()).ok()?;
    client.request_text(request).await.ok()
}

/// etcd's /health over plain HTTP/1.0 (etcd listens without TLS on loopback).
fn etcd_healthy(port: u16) -> bool {
    let check = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response.contains("\"health\":\"true\""))
    };
    check().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expects_the_release_that_build_sh_builds() {
        let script = include_str!("../../../tools/kube/build.sh");
        assert!(
            script.contains(&format!("\nKUBE_VERSION={KUBE_VERSION}\n")),
            "tools/kube/build.sh builds another release than KUBE_VERSION = {KUBE_VERSION}"
        );
    }

    #[test]
    fn missing_binaries_say_how_to_build_them() {
        std::env::set_var(KUBE_BIN_ENV, "/nonexistent/pgshift-kube-bin");
        let err = kube_bin_dir().unwrap_err().to_string();
        std::env::remove_var(KUBE_BIN_ENV);
        assert!(
            err.starts_with(
                "Kubernetes binaries not found: run `cargo xtask test` (it builds them)"
            ),
            "{err}"
        );
        assert!(err.contains("/nonexistent/pgshift-kube-bin"), "{err}");
    }
}
