//! Prometheus metrics and health endpoints of the operator.
//!
//! [`serve`] answers `GET /metrics` (OpenMetrics text, every series prefixed `pgshift_`),
//! `GET /healthz` (200 while the process runs) and `GET /readyz` (200 once [`Readiness`] is
//! set, else 503 with the reason on one line).

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tracing::{debug, warn};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PLAIN: &str = "text/plain; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    namespace: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    namespace: String,
    name: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    namespace: String,
    name: String,
    kind: String,
}

/// The label values a resource has used, so that its series can be zeroed or dropped.
#[derive(Default)]
struct Seen {
    phases: BTreeSet<String>,
    error_kinds: BTreeSet<String>,
}

/// The operator's metrics. Cloning is cheap and every clone updates the same series.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    phase: Family<PhaseLabels, Gauge>,
    lag: Family<ResourceLabels, Gauge>,
    pause: Family<ResourceLabels, Gauge<f64, AtomicU64>>,
    attempts: Family<ResourceLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    reconciliations: Counter,
    reconcile_duration: Histogram,
    seen: Mutex<HashMap<ResourceLabels, Seen>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A registry of every series, all prefixed `pgshift_`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pgshift");
        let phase = Family::<PhaseLabels, Gauge>::default();
        let lag = Family::<ResourceLabels, Gauge>::default();
        let pause = Family::<ResourceLabels, Gauge<f64, AtomicU64>>::default();
        let attempts = Family::<ResourceLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let reconciliations = Counter::default();
        // 5 ms to 41 s.
        let reconcile_duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "upgrade_phase",
            "1 for the phase a PostgresUpgrade is in, 0 for the other phases it has been in",
            phase.clone(),
        );
        registry.register_with_unit(
            "replication_lag",
            "WAL the new cluster has still to replay from the old one",
            Unit::Bytes,
            lag.clone(),
        );
        registry.register_with_unit(
            "cutover_pause",
            "How long writes were paused during the last cutover",
            Unit::Seconds,
            pause.clone(),
        );
        registry.register("cutover_attempts", "Cutovers started", attempts.clone());
        registry.register(
            "errors",
            "Errors met while upgrading, by kind",
            errors.clone(),
        );
        registry.register(
            "reconciliations",
            "Reconciliations run",
            reconciliations.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "How long reconciliations took",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                phase,
                lag,
                pause,
                attempts,
                errors,
                reconciliations,
                reconcile_duration,
                seen: Mutex::default(),
            }),
        }
    }

    /// Sets `pgshift_upgrade_phase` of the resource to 1 for `phase` and to 0 for every
    /// other phase it has been in.
    pub fn set_phase(&self, namespace: &str, name: &str, phase: &str) {
        let resource = labels(namespace, name);
        let mut seen = self.seen();
        let phases = &mut seen.entry(resource).or_default().phases;
        phases.insert(phase.to_string());
        for known in phases.iter() {
            let series = PhaseLabels {
                namespace: namespace.to_string(),
                name: name.to_string(),
                phase: known.clone(),
            };
            self.inner
                .phase
                .get_or_create(&series)
                .set(i64::from(known == phase));
        }
    }

    /// Sets `pgshift_replication_lag_bytes`.
    pub fn set_replication_lag(&self, namespace: &str, name: &str, bytes: u64) {
        let resource = self.track(namespace, name);
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        self.inner.lag.get_or_create(&resource).set(bytes);
    }

    /// Sets `pgshift_cutover_pause_seconds` to the last measured pause.
    pub fn set_cutover_pause(&self, namespace: &str, name: &str, pause: Duration) {
        let resource = self.track(namespace, name);
        self.inner
            .pause
            .get_or_create(&resource)
            .set(pause.as_secs_f64());
    }

    /// Counts a cutover attempt in `pgshift_cutover_attempts_total`.
    pub fn inc_cutover_attempts(&self, namespace: &str, name: &str) {
        let resource = self.track(namespace, name);
        self.inner.attempts.get_or_create(&resource).inc();
    }

    /// Counts an error of `kind` (a short fixed word, such as `replication` or `api`) in
    /// `pgshift_errors_total`.
    pub fn inc_error(&self, namespace: &str, name: &str, kind: &str) {
        let resource = labels(namespace, name);
        let mut seen = self.seen();
        seen.entry(resource)
            .or_default()
            .error_kinds
            .insert(kind.to_string());
        let series = ErrorLabels {
            namespace: namespace.to_string(),
            name: name.to_string(),
            kind: kind.to_string(),
        };
        self.inner.errors.get_or_create(&series).inc();
    }

    /// Counts a reconciliation in `pgshift_reconciliations_total`; the returned timer adds
    /// its duration to `pgshift_reconcile_duration_seconds` when dropped, so bind it to a
    /// named variable (`let _timer = ...`) for the length of the reconciliation.
    pub fn start_reconcile(&self) -> ReconcileTimer {
        self.inner.reconciliations.inc();
        ReconcileTimer {
            histogram: self.inner.reconcile_duration.clone(),
            started: Instant::now(),
        }
    }

    /// Drops every series of a deleted resource.
    pub fn forget(&self, namespace: &str, name: &str) {
        let resource = labels(namespace, name);
        let Some(seen) = self.seen().remove(&resource) else {
            return;
        };
        for phase in seen.phases {
            self.inner.phase.remove(&PhaseLabels {
                namespace: namespace.to_string(),
                name: name.to_string(),
                phase,
            });
        }
        for kind in seen.error_kinds {
            self.inner.errors.remove(&ErrorLabels {
                namespace: namespace.to_string(),
                name: name.to_string(),
                kind,
            });
        }
        self.inner.lag.remove(&resource);
        self.inner.pause.remove(&resource);
        self.inner.attempts.remove(&resource);
    }

    /// The OpenMetrics text exposition of every series.
    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.inner.registry).expect("writing to a String cannot fail");
        text
    }

    /// Notes the resource so that [`Metrics::forget`] knows it.
    fn track(&self, namespace: &str, name: &str) -> ResourceLabels {
        let resource = labels(namespace, name);
        self.seen().entry(resource.clone()).or_default();
        resource
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<ResourceLabels, Seen>> {
        // The map stays consistent whatever panicked while it was held: use it.
        self.inner
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

fn labels(namespace: &str, name: &str) -> ResourceLabels {
    ResourceLabels {
        namespace: namespace.to_string(),
        name: name.to_string(),
    }
}

/// Measures one reconciliation; see [`Metrics::start_reconcile`].
#[must_use = "the duration is recorded when the timer is dropped"]
pub struct ReconcileTimer {
    histogram: Histogram,
    started: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

/// Whether the operator is ready to serve: it holds the leader lease and its watches have
/// synced. Not ready until [`Readiness::set_ready`]; clones share the flag.
#[derive(Clone, Debug)]
pub struct Readiness {
    /// `None` when ready, else why not.
    not_ready: Arc<RwLock<Option<String>>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new("starting")
    }
}

impl Readiness {
    /// Not ready, for `reason`.
    pub fn new(reason: impl Into<String>) -> Self {
        Readiness {
            not_ready: Arc::new(RwLock::new(Some(reason.into()))),
        }
    }

    pub fn set_ready(&self) {
        *self
            .not_ready
            .write()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Not ready, for `reason` (one line, such as "waiting for the leader lease").
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self
            .not_ready
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(reason.into());
    }

    /// `Ok` when ready, else why not.
    pub fn check(&self) -> Result<(), String> {
        match &*self
            .not_ready
            .read()
            .unwrap_or_else(PoisonError::into_inner)
        {
            None => Ok(()),
            Some(reason) => Err(reason.clone()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "could not listen on {addr} for metrics and health checks: {source}; choose another \
         address or free the port"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until `shutdown` completes, then
/// lets requests in flight finish (for 5 s at most).
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    readiness: Readiness,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    serve_on(listener, metrics, readiness, shutdown).await;
    Ok(())
}

/// [`serve`] on a listener bound already (say to port 0, to learn the port it got).
pub async fn serve_on(
    listener: TcpListener,
    metrics: Metrics,
    readiness: Readiness,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Such as running out of file descriptors: wait for some to be freed.
                    warn!(error = %e, "metrics server could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let metrics = metrics.clone();
        let readiness = readiness.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let response = respond(request.method(), request.uri().path(), &metrics, &readiness);
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            // A client that never finishes its request must not hold a connection forever.
            .header_read_timeout(Duration::from_secs(10))
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "metrics connection failed");
            }
        });
    }
    // Idle keep-alive connections close at once; a stuck one is not waited for long.
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

fn respond(
    method: &Method,
    path: &str,
    metrics: &Metrics,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        );
    }
    if method != Method::GET {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "only GET is allowed\n".into(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    match path {
        "/metrics" => text(StatusCode::OK, OPENMETRICS, metrics.render()),
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        _ => match readiness.check() {
            Ok(()) => text(StatusCode::OK, PLAIN, "ready\n".into()),
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                format!("not ready: {reason}\n"),
            ),
        },
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    fn has_line(text: &str, line: &str) -> bool {
        text.lines().any(|l| l == line)
    }

    #[test]
    fn the_current_phase_is_1_and_earlier_ones_0() {
        let metrics = Metrics::new();
        metrics.set_phase("db", "main", "Pending");
        metrics.set_phase("db", "main", "Replicating");
        metrics.set_phase("db", "other", "Pending");
        let text = metrics.render();
        for line in [
            "# TYPE pgshift_upgrade_phase gauge",
            r#"pgshift_upgrade_phase{namespace="db",name="main",phase="Pending"} 0"#,
            r#"pgshift_upgrade_phase{namespace="db",name="main",phase="Replicating"} 1"#,
            r#"pgshift_upgrade_phase{namespace="db",name="other",phase="Pending"} 1"#,
        ] {
            assert!(has_line(&text, line), "{line} missing from\n{text}");
        }
        assert!(
            !text.contains(r#"name="other",phase="Replicating""#),
            "{text}"
        );
    }

    #[test]
    fn series_render_with_prefix_units_and_totals() {
        let metrics = Metrics::new();
        metrics.set_replication_lag("db", "main", 4096);
        metrics.set_cutover_pause("db", "main", Duration::from_millis(37));
        metrics.inc_cutover_attempts("db", "main");
        metrics.inc_cutover_attempts("db", "main");
        metrics.inc_error("db", "main", "replication");
        drop(metrics.start_reconcile());
        let text = metrics.render();
        for line in [
            "# UNIT pgshift_replication_lag_bytes bytes",
            r#"pgshift_replication_lag_bytes{namespace="db",name="main"} 4096"#,
            r#"pgshift_cutover_pause_seconds{namespace="db",name="main"} 0.037"#,
            "# TYPE pgshift_cutover_attempts counter",
            r#"pgshift_cutover_attempts_total{namespace="db",name="main"} 2"#,
            r#"pgshift_errors_total{namespace="db",name="main",kind="replication"} 1"#,
            "pgshift_reconciliations_total 1",
            "# TYPE pgshift_reconcile_duration_seconds histogram",
            "pgshift_reconcile_duration_seconds_count 1",
            r#"pgshift_reconcile_duration_seconds_bucket{le="+Inf"} 1"#,
            "# EOF",
        ] {
            assert!(has_line(&text, line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn forget_drops_every_series_of_a_resource() {
        let metrics = Metrics::new();
        for name in ["gone", "kept"] {
            metrics.set_phase("db", name, "Pending");
            metrics.set_phase("db", name, "Done");
            metrics.set_replication_lag("db", name, 1);
            metrics.set_cutover_pause("db", name, Duration::from_secs(1));
            metrics.inc_cutover_attempts("db", name);
            metrics.inc_error("db", name, "api");
        }
        metrics.forget("db", "gone");
        metrics.forget("db", "never-seen");
        let text = metrics.render();
        assert!(!text.contains(r#"name="gone""#), "{text}");
        assert_eq!(text.matches(r#"name="kept""#).count(), 6, "{text}");
    }

    #[test]
    fn readiness_tells_why_not() {
        let readiness = Readiness::default();
        assert_eq!(readiness.check(), Err("starting".to_string()));
        let shared = readiness.clone();
        shared.set_ready();
        assert_eq!(readiness.check(), Ok(()));
        shared.set_not_ready("waiting for the leader lease");
        assert_eq!(
            readiness.check(),
            Err("waiting for the leader lease".to_string())
        );
    }

    /// One HTTP/1.1 request on a fresh connection: the status code, headers and body.
    async fn get(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head.to_ascii_lowercase(), body.to_string())
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Metrics::new();
        metrics.set_phase("db", "main", "Replicating");
        let readiness = Readiness::new("waiting for the leader lease");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_on(listener, metrics, readiness.clone(), async {
            let _ = stopped.await;
        }));

        let (status, head, body) = get(addr, "GET", "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            head.contains("content-type: application/openmetrics-text"),
            "{head}"
        );
        assert!(
            has_line(
                &body,
                r#"pgshift_upgrade_phase{namespace="db",name="main",phase="Replicating"} 1"#
            ),
            "{body}"
        );
        assert_eq!(get(addr, "GET", "/healthz").await.0, 200);
        let (status, _, body) = get(addr, "GET", "/readyz").await;
        assert_eq!(
            (status, body.as_str()),
            (503, "not ready: waiting for the leader lease\n")
        );
        readiness.set_ready();
        assert_eq!(get(addr, "GET", "/readyz").await.0, 200);
        assert_eq!(get(addr, "GET", "/nothing").await.0, 404);
        let (status, head, _) = get(addr, "POST", "/metrics").await;
        assert_eq!(status, 405);
        assert!(head.contains("allow: get"), "{head}");

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "still listening after shutdown"
        );
    }

    #[tokio::test]
    async fn a_taken_port_is_reported() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let error = serve(
            addr,
            Metrics::new(),
            Readiness::default(),
            std::future::pending(),
        )
        .await
        .unwrap_err();
        assert!(
            error
                .to_string()
                .contains(&format!("could not listen on {addr}")),
            "{error}"
        );
    }
}
