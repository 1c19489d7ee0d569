//! One pod's life on the node: address, volumes, init containers, containers with probes and
//! restarts, and on deletion a graceful stop (the image's stop signal, then SIGKILL after the
//! grace period) before the pod object is removed.

use std::collections::HashMap;
use std::fs;
use std::net::Ipv4Addr;
use std::ops::ControlFlow;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Preconditions};
use kube::{Api, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::launcher::{Launcher, StartError};
use super::probe::{self, Target};
use super::status::{Ended, PodState, Run, Shared};
use super::{pod_key, volumes, Ctx};
use crate::process::Exit;

/// First restart delay; doubles up to [`MAX_BACKOFF`] (a real kubelet: 10 s to 5 min — shorter
/// here so that tests of crash loops finish).
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(20);
/// A container that ran this long restarts without delay, as after a kubelet's backoff reset.
const BACKOFF_RESET: Duration = Duration::from_secs(60);

/// What the pod's containers are told: `Some(grace)` once the pod is being deleted.
type Stop = watch::Receiver<Option<Duration>>;

/// Runs one pod until it is deleted; `updates` carries its latest version (`None`: gone).
pub(crate) async fn run(ctx: Arc<Ctx>, mut updates: watch::Receiver<Option<Arc<Pod>>>) {
    let Some(pod) = updates.borrow().clone() else {
        return;
    };
    let key = pod_key(&pod);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    let shared = Shared::new(PodState::new(&pod));
    let mut background = JoinSet::new();
    background.spawn({
        let shared = shared.clone();
        let (pods, name) = (pods.clone(), pod.name_any());
        async move { shared.report_forever(pods, name).await }
    });

    let (stop_tx, stop_rx) = watch::channel(None);
    let containers = run_containers(ctx.clone(), pod.clone(), shared.clone(), stop_rx);
    let mut containers = std::pin::pin!(containers);
    let deletion = deletion(&mut updates);
    let mut deletion = std::pin::pin!(deletion);
    let deleted = tokio::select! {
        () = &mut containers => deletion.await,
        deleted = &mut deletion => {
            let grace = deleted.unwrap_or(Duration::ZERO);
            tracing::info!(pod = %key, ?grace, "stopping the pod's containers");
            stop_tx.send_replace(Some(grace));
            containers.await;
            deleted
        }
    };
    background.abort_all();
    if deleted.is_some() {
        let mut last = None;
        shared.report(&pods, &pod.name_any(), &mut last).await;
        let params = DeleteParams::default()
            .grace_period(0)
            .preconditions(Preconditions {
                uid: pod.uid(),
                resource_version: None,
            });
        match pods.delete(&pod.name_any(), &params).await {
            Ok(_) => tracing::info!(pod = %key, "pod removed"),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => tracing::warn!(pod = %key, error = %e, "cannot remove the pod"),
        }
    }
}

/// Resolves when the pod is being deleted (`Some(grace period)`) or is gone (`None`).
async fn deletion(updates: &mut watch::Receiver<Option<Arc<Pod>>>) -> Option<Duration> {
    loop {
        let current = updates.borrow_and_update().clone();
        match current {
            None => return None,
            Some(pod) if pod.metadata.deletion_timestamp.is_some() => {
                let seconds = pod
                    .metadata
                    .deletion_grace_period_seconds
                    .or(pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.termination_grace_period_seconds))
                    .unwrap_or(30);
                return Some(Duration::from_secs(seconds.max(0) as u64));
            }
            Some(_) => {}
        }
        if updates.changed().await.is_err() {
            return None;
        }
    }
}

/// True once the pod is being stopped.
fn stopping(stop: &Stop) -> bool {
    stop.borrow().is_some()
}

/// Resolves with the grace period once the pod is being stopped.
async fn stopped(stop: &mut Stop) -> Duration {
    match stop.wait_for(Option::is_some).await {
        Ok(grace) => grace.unwrap_or(Duration::ZERO),
        Err(_) => Duration::ZERO,
    }
}

/// Everything one pod's containers share.
struct PodRun {
    ctx: Arc<Ctx>,
    pod: Arc<Pod>,
    shared: Shared,
    volumes: HashMap<String, PathBuf>,
    pod_dir: PathBuf,
    log_dir: PathBuf,
    ip: Ipv4Addr,
    restart_policy: String,
}

async fn run_containers(ctx: Arc<Ctx>, pod: Arc<Pod>, shared: Shared, mut stop: Stop) {
    let key = pod_key(&pod);
    let Some(ip) = ctx.subnets.next_pod_ip() else {
        shared.update(|s| s.failure = Some(("OutOfAddresses".into(), "no pod IP left".into())));
        return;
    };
    let pod_dir = ctx.new_pod_dir();
    let n = pod_dir
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let log_dir = ctx.logs_dir.join(format!(
        "{}_{}_{n}",
        pod.namespace().unwrap_or_default(),
        pod.name_any()
    ));
    for dir in [&pod_dir, &log_dir] {
        if let Err(e) = fs::create_dir_all(dir)
            .and_then(|()| fs::set_permissions(dir, fs::Permissions::from_mode(0o755)))
        {
            let message = format!("cannot create {}: {e}", dir.display());
            shared.update(|s| s.failure = Some(("KubeletError".into(), message)));
            return;
        }
    }
    tracing::info!(pod = %key, %ip, dir = %pod_dir.display(), logs = %log_dir.display(), "starting pod");
    shared.update(|s| s.pod_ip = Some(ip));

    let volumes = loop {
        match volumes::prepare(&ctx, &pod, &pod_dir).await {
            Ok(volumes) => break volumes,
            Err(message) => {
                tracing::debug!(pod = %key, %message, "volumes not ready");
                shared.update(|s| {
                    for slot in s.init.iter_mut().chain(s.containers.iter_mut()) {
                        slot.run = Run::waiting("ContainerCreating", message.clone());
                    }
                });
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stopped(&mut stop) => return,
                }
            }
        }
    };
    let spec = pod.spec.clone().unwrap_or_default();
    let run = Arc::new(PodRun {
        restart_policy: spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into()),
        ctx,
        pod,
        shared,
        volumes,
        pod_dir: pod_dir.clone(),
        log_dir,
        ip,
    });

    for (index, container) in spec.init_containers.iter().flatten().enumerate() {
        let succeeded =
            run_container(run.clone(), container.clone(), true, index, stop.clone()).await;
        if !succeeded {
            cleanup(&pod_dir);
            return;
        }
    }
    run.shared.update(|s| s.initialized = true);

    let mut containers = JoinSet::new();
    for (index, container) in spec.containers.iter().enumerate() {
        containers.spawn(run_container(
            run.clone(),
            container.clone(),
            false,
            index,
            stop.clone(),
        ));
    }
    while containers.join_next().await.is_some() {}
    cleanup(&pod_dir);
}

/// Removes a finished pod's private files (its logs stay, under the cluster's logs/).
fn cleanup(pod_dir: &Path) {
    if let Err(e) = fs::remove_dir_all(pod_dir) {
        tracing::debug!(dir = %pod_dir.display(), error = %e, "cannot remove the pod directory");
    }
}

/// Runs one container, restarting it per the pod's restart policy, until it is done for good or
/// the pod is stopped. Returns true if its last run succeeded.
async fn run_container(
    run: Arc<PodRun>,
    container: Container,
    init: bool,
    index: usize,
    mut stop: Stop,
) -> bool {
    let key = format!("{}/{}", pod_key(&run.pod), container.name);
    let shared = &run.shared;
    let launcher = loop {
        let dirs = (run.pod_dir.as_path(), run.log_dir.as_path());
        match Launcher::new(
            run.ctx.clone(),
            &run.pod,
            &container,
            &run.volumes,
            dirs,
            run.ip,
        )
        .await
        {
            Ok(launcher) => break launcher,
            Err(StartError::Image(message)) => {
                tracing::warn!(container = %key, %message, "cannot run the image");
                if run.restart_policy == "Always" {
                    // A real kubelet keeps retrying a pull that cannot succeed; the pod stays
                    // Pending and its controller does not churn.
                    shared.update(|s| {
                        s.slot(init, index).run = Run::waiting("ErrImagePull", message)
                    });
                    stopped(&mut stop).await;
                } else {
                    // A pod that must run to completion fails right away, with the reason.
                    shared.update(|s| {
                        let slot = s.slot(init, index);
                        slot.run = Run::Terminated(Ended {
                            exit_code: 128,
                            reason: "UnsupportedImage".into(),
                            message: message.clone(),
                            started: None,
                            finished: Timestamp::now(),
                        });
                        slot.done = true;
                        s.failure = Some(("UnsupportedImage".into(), message));
                    });
                }
                return false;
            }
            Err(StartError::Config(message) | StartError::Failed { message, .. }) => {
                shared.update(|s| {
                    s.slot(init, index).run = Run::waiting("CreateContainerConfigError", message)
                });
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stopped(&mut stop) => return false,
                }
            }
        }
    };

    let policy = if init && run.restart_policy == "Always" {
        // Init containers are retried on failure but run to completion.
        "OnFailure"
    } else {
        run.restart_policy.as_str()
    };
    let mut backoff = FIRST_BACKOFF;
    let mut previous: Option<Ended> = None;
    loop {
        if stopping(&stop) {
            shared.update(|s| s.slot(init, index).done = true);
            return false;
        }
        let began = Instant::now();
        let started = Timestamp::now();
        shared.update(|s| {
            let slot = s.slot(init, index);
            if let Some(ended) = previous.take() {
                slot.last = Some(ended);
                slot.restarts += 1;
            }
        });
        let ended = run_once(
            &run,
            &launcher,
            &container,
            (init, index),
            started,
            &mut stop,
        )
        .await;
        tracing::info!(container = %key, exit_code = ended.exit_code, reason = %ended.reason, "container ended");
        let success = ended.exit_code == 0;
        let restart = !stopping(&stop)
            && match policy {
                "Always" => true,
                "OnFailure" => !success,
                _ => false,
            };
        shared.update(|s| {
            let slot = s.slot(init, index);
            slot.ready = false;
            slot.started = false;
            slot.run = Run::Terminated(ended.clone());
            slot.done = !restart;
        });
        if !restart {
            return success;
        }
        if began.elapsed() >= BACKOFF_RESET {
            backoff = FIRST_BACKOFF;
        }
        let message = format!(
            "back-off {backoff:?} restarting failed container {}",
            container.name
        );
        shared.update(|s| s.slot(init, index).run = Run::waiting("CrashLoopBackOff", message));
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stopped(&mut stop) => {
                shared.update(|s| {
                    let slot = s.slot(init, index);
                    slot.run = Run::Terminated(ended);
                    slot.done = true;
                });
                return false;
            }
        }
        previous = Some(ended);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Starts the container once and supervises it until it exits, fails its liveness probe, or
/// the pod is stopped (then: the image's stop signal, SIGKILL after the grace period).
async fn run_once(
    run: &PodRun,
    launcher: &Launcher,
    container: &Container,
    (init, index): (bool, usize),
    started: Timestamp,
    stop: &mut Stop,
) -> Ended {
    let shared = &run.shared;
    let ended = |exit_code: i32, reason: &str, message: String| Ended {
        exit_code,
        reason: reason.to_string(),
        message,
        started: Some(started),
        finished: Timestamp::now(),
    };
    let log_from = launcher.log_position();
    // Stopping during the image's initialisation (initdb) kills it: dropping the future drops
    // the helper process, which kills its group.
    let process = tokio::select! {
        result = launcher.start() => match result {
            Ok(process) => process,
            Err(StartError::Failed { exit_code, message }) => return ended(exit_code, "Error", message),
            Err(StartError::Image(message) | StartError::Config(message)) => {
                return ended(128, "StartError", message)
            }
        },
        _ = stopped(stop) => return ended(137, "Error", "stopped while starting".into()),
    };
    shared.update(|s| {
        let slot = s.slot(init, index);
        slot.run = Run::Running { since: started };
        slot.started = container.startup_probe.is_none();
        slot.ready = slot.started && container.readiness_probe.is_none();
    });

    let ports = container.ports.clone().unwrap_or_default();
    let target = Target {
        ip: run.ip,
        ports: &ports,
        launcher,
    };
    let termination_grace = run
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30);
    let exit: Exit = tokio::select! {
        exit = process.wait() => exit,
        message = supervise_probes(shared, container, (init, index), &target) => {
            tracing::info!(container = %container.name, %message, "probe failed; restarting the container");
            let grace = Duration::from_secs(termination_grace.max(0) as u64);
            process.stop(launcher.stop_signal(), grace).await
        }
        grace = stopped(stop) => process.stop(launcher.stop_signal(), grace).await,
    };
    // Whatever the main process left behind in its group goes with it.
    process.kill_group();
    let reason = if exit.success() { "Completed" } else { "Error" };
    let message = launcher.termination_message(exit.code(), log_from);
    ended(exit.code(), reason, message)
}

/// Runs the container's startup, readiness and liveness probes, keeping `started` and `ready`
/// up to date. Resolves, with the failure, only when the startup or liveness probe fails.
async fn supervise_probes(
    shared: &Shared,
    container: &Container,
    (init, index): (bool, usize),
    target: &Target<'_>,
) -> String {
    if let Some(startup) = &container.startup_probe {
        let mut failure = None;
        probe::run(startup, target, |ok, message| {
            if ok {
                shared.update(|s| {
                    let slot = s.slot(init, index);
                    slot.started = true;
                    slot.ready = container.readiness_probe.is_none();
                });
            } else {
                failure = Some(format!("startup probe failed: {message}"));
            }
            ControlFlow::Break(())
        })
        .await;
        if let Some(failure) = failure {
            return failure;
        }
    }
    let readiness = async {
        if let Some(readiness) = &container.readiness_probe {
            probe::run(readiness, target, |ok, _| {
                shared.update(|s| s.slot(init, index).ready = ok);
                ControlFlow::Continue(())
            })
            .await;
        }
        std::future::pending::<String>().await
    };
    let liveness = async {
        let Some(liveness) = &container.liveness_probe else {
            return std::future::pending::<String>().await;
        };
        let mut failure = String::new();
        probe::run(liveness, target, |ok, message| {
            if ok {
                ControlFlow::Continue(())
            } else {
                failure = format!("liveness probe failed: {message}");
                ControlFlow::Break(())
            }
        })
        .await;
        failure
    };
    tokio::select! {
        failure = readiness => failure,
        failure = liveness => failure,
    }
}
