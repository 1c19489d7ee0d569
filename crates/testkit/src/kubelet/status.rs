//! A pod's observed state and the `status` it is reported as.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::json;
use tokio::sync::Notify;

/// What a container is doing, as reported in `containerStatuses[].state`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Run {
    Waiting { reason: String, message: String },
    Running { since: Timestamp },
    Terminated(Ended),
}

/// A finished run of a container.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ended {
    pub(crate) exit_code: i32,
    pub(crate) reason: String,
    pub(crate) message: String,
    pub(crate) started: Option<Timestamp>,
    pub(crate) finished: Timestamp,
}

impl Run {
    pub(crate) fn waiting(reason: &str, message: impl Into<String>) -> Run {
        Run::Waiting {
            reason: reason.to_string(),
            message: message.into(),
        }
    }

    fn to_k8s(&self) -> ContainerState {
        match self {
            Run::Waiting { reason, message } => ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: (!message.is_empty()).then(|| message.clone()),
                }),
                ..Default::default()
            },
            Run::Running { since } => ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(*since)),
                }),
                ..Default::default()
            },
            Run::Terminated(ended) => ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: ended.exit_code,
                    reason: Some(ended.reason.clone()),
                    message: (!ended.message.is_empty()).then(|| ended.message.clone()),
                    started_at: ended.started.map(Time),
                    finished_at: Some(Time(ended.finished)),
                    ..Default::default()
                }),
                ..Default::default()
            },
        }
    }
}

/// One container's slot in the pod's status.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub(crate) name: String,
    pub(crate) image: String,
    pub(crate) run: Run,
    pub(crate) last: Option<Ended>,
    pub(crate) restarts: i32,
    pub(crate) ready: bool,
    pub(crate) started: bool,
    /// Terminated for good: it will not be restarted.
    pub(crate) done: bool,
}

impl Slot {
    fn new(name: &str, image: &str) -> Slot {
        Slot {
            name: name.to_string(),
            image: image.to_string(),
            run: Run::waiting("ContainerCreating", ""),
            last: None,
            restarts: 0,
            ready: false,
            started: false,
            done: false,
        }
    }

    fn exit_code(&self) -> Option<i32> {
        match &self.run {
            Run::Terminated(ended) => Some(ended.exit_code),
            _ => None,
        }
    }

    fn to_k8s(&self) -> ContainerStatus {
        ContainerStatus {
            name: self.name.clone(),
            image: self.image.clone(),
            image_id: format!("pgshift-process://{}", self.image),
            container_id: Some(format!("pgshift-process://{}", self.name)),
            state: Some(self.run.to_k8s()),
            last_state: self
                .last
                .as_ref()
                .map(|e| Run::Terminated(e.clone()).to_k8s()),
            ready: self.ready,
            restart_count: self.restarts,
            started: Some(self.started),
            ..Default::default()
        }
    }
}

/// Everything the kubelet knows about one pod.
#[derive(Debug)]
pub(crate) struct PodState {
    pub(crate) pod_ip: Option<Ipv4Addr>,
    pub(crate) start_time: Timestamp,
    pub(crate) initialized: bool,
    pub(crate) init: Vec<Slot>,
    pub(crate) containers: Vec<Slot>,
    /// A pod-level failure (reason, message): the pod is Failed.
    pub(crate) failure: Option<(String, String)>,
    transitions: HashMap<&'static str, (bool, Timestamp)>,
}

impl PodState {
    pub(crate) fn new(pod: &Pod) -> PodState {
        let spec = pod.spec.clone().unwrap_or_default();
        let init: Vec<Slot> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| Slot::new(&c.name, c.image.as_deref().unwrap_or_default()))
            .collect();
        PodState {
            pod_ip: None,
            start_time: Timestamp::now(),
            initialized: init.is_empty(),
            init,
            containers: spec
                .containers
                .iter()
                .map(|c| Slot::new(&c.name, c.image.as_deref().unwrap_or_default()))
                .collect(),
            failure: None,
            transitions: HashMap::new(),
        }
    }

    /// The container slot `name` (regular or init).
    pub(crate) fn slot(&mut self, init: bool, index: usize) -> &mut Slot {
        if init {
            &mut self.init[index]
        } else {
            &mut self.containers[index]
        }
    }

    pub(crate) fn phase(&self) -> &'static str {
        if self.failure.is_some() {
            return "Failed";
        }
        if !self.initialized {
            let failed = self
                .init
                .iter()
                .any(|s| s.done && s.exit_code().is_some_and(|c| c != 0));
            return if failed { "Failed" } else { "Pending" };
        }
        if !self.containers.is_empty() && self.containers.iter().all(|s| s.done) {
            return if self.containers.iter().all(|s| s.exit_code() == Some(0)) {
                "Succeeded"
            } else {
                "Failed"
            };
        }
        let running = self
            .containers
            .iter()
            .any(|s| matches!(s.run, Run::Running { .. }) || s.restarts > 0);
        if running {
            "Running"
        } else {
            "Pending"
        }
    }

    fn condition(
        &mut self,
        type_: &'static str,
        status: bool,
        reason: Option<String>,
    ) -> PodCondition {
        let now = Timestamp::now();
        let entry = self.transitions.entry(type_).or_insert((status, now));
        if entry.0 != status {
            *entry = (status, now);
        }
        PodCondition {
            type_: type_.to_string(),
            status: if status { "True" } else { "False" }.to_string(),
            last_transition_time: Some(Time(entry.1)),
            reason,
            ..Default::default()
        }
    }

    /// The pod's status as the API shows it (recording condition transitions).
    pub(crate) fn observe(&mut self) -> PodStatus {
        let phase = self.phase();
        let terminal = matches!(phase, "Succeeded" | "Failed");
        let all_ready = !terminal && self.containers.iter().all(|s| s.ready);
        let not_ready = |ready: bool| {
            (!ready).then(|| {
                if terminal {
                    "PodCompleted"
                } else {
                    "ContainersNotReady"
                }
                .to_string()
            })
        };
        let initialized = self.initialized;
        let conditions = vec![
            self.condition("PodReadyToStartContainers", self.pod_ip.is_some(), None),
            self.condition("Initialized", initialized, None),
            self.condition("ContainersReady", all_ready, not_ready(all_ready)),
            self.condition("Ready", all_ready, not_ready(all_ready)),
            self.condition("PodScheduled", true, None),
        ];
        let ip = self.pod_ip.map(|ip| ip.to_string());
        let (reason, message) = self.failure.clone().unzip();
        PodStatus {
            phase: Some(phase.to_string()),
            reason,
            message,
            conditions: Some(conditions),
            host_ip: Some("127.0.0.1".into()),
            host_ips: Some(vec![HostIP {
                ip: "127.0.0.1".into(),
            }]),
            pod_ip: ip.clone(),
            pod_ips: ip.map(|ip| vec![PodIP { ip }]),
            start_time: Some(Time(self.start_time)),
            init_container_statuses: (!self.init.is_empty())
                .then(|| self.init.iter().map(Slot::to_k8s).collect()),
            container_statuses: Some(self.containers.iter().map(Slot::to_k8s).collect()),
            ..Default::default()
        }
    }
}

/// A pod's state, shared by its container tasks, and the signal to report it.
#[derive(Clone)]
pub(crate) struct Shared {
    state: Arc<Mutex<PodState>>,
    changed: Arc<Notify>,
}

impl Shared {
    pub(crate) fn new(state: PodState) -> Shared {
        Shared {
            state: Arc::new(Mutex::new(state)),
            changed: Arc::new(Notify::new()),
        }
    }

    /// Changes the state and has it reported.
    pub(crate) fn update<T>(&self, f: impl FnOnce(&mut PodState) -> T) -> T {
        let result = f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
        self.changed.notify_one();
        result
    }

    /// Reports the state whenever it changes; never returns.
    pub(crate) async fn report_forever(&self, pods: Api<Pod>, name: String) {
        let mut last = None;
        loop {
            self.changed.notified().await;
            if !self.report(&pods, &name, &mut last).await {
                // Retry soon (a transient API error).
                tokio::time::sleep(Duration::from_millis(500)).await;
                self.changed.notify_one();
            }
        }
    }

    /// Writes the status if it differs from `last`; false if the API refused it.
    pub(crate) async fn report(
        &self,
        pods: &Api<Pod>,
        name: &str,
        last: &mut Option<serde_json::Value>,
    ) -> bool {
        let status = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe();
        let value = serde_json::to_value(&status).expect("a PodStatus serializes");
        if last.as_ref() == Some(&value) {
            return true;
        }
        // Strategic merge: conditions merge by type, so the scheduler's stay.
        let patch = Patch::Strategic(json!({ "status": value }));
        match pods
            .patch_status(name, &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => {
                *last = Some(value);
                true
            }
            Err(kube::Error::Api(e)) if e.code == 404 => true,
            Err(e) => {
                tracing::warn!(pod = name, error = %e, "cannot report the pod status");
                false
            }
        }
    }
}
