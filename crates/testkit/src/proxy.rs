//! The service proxy: plays kube-proxy for ClusterIP Services.
//!
//! ClusterIPs come from the cluster's own loopback /16, so the proxy simply listens on
//! `clusterIP:port` for every TCP port of every Service and forwards each accepted connection to
//! one of the Service's ready endpoints, chosen at random (as kube-proxy's iptables mode does).
//! Endpoints are derived from the Services' selectors and the Pods — Ready, not terminating,
//! with the target port resolved per pod (a named `targetPort` looks up the container port) —
//! because the API refuses loopback addresses in Endpoints/EndpointSlices. The choice is made
//! once per connection: when the endpoints change, new connections go to the new endpoints
//! while established ones stay where they are; a removed Service stops accepting but its
//! established connections carry on. With no ready endpoint a connection is closed at once.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use rand::seq::SliceRandom;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

type Snapshot<K> = Arc<Mutex<Vec<Arc<K>>>>;

/// Proxies Services forever.
pub(crate) async fn run(client: kube::Client) {
    let changed = Notify::new();
    let services: Snapshot<Service> = Arc::default();
    let pods: Snapshot<Pod> = Arc::default();
    let follow_services = crate::watch::follow(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        keep(&services, &changed),
    );
    let follow_pods = crate::watch::follow(
        Api::<Pod>::all(client),
        watcher::Config::default(),
        keep(&pods, &changed),
    );
    let proxy = async {
        let mut listeners: HashMap<SocketAddrV4, watch::Sender<Vec<SocketAddr>>> = HashMap::new();
        let mut tasks = JoinSet::new();
        loop {
            changed.notified().await;
            while tasks.try_join_next().is_some() {}
            let desired = {
                let services = services.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let pods = pods.lock().unwrap_or_else(|e| e.into_inner()).clone();
                routes(&services, &pods)
            };
            // Dropping a sender makes its listener stop accepting.
            listeners.retain(|address, _| desired.contains_key(address));
            for (address, backends) in desired {
                match listeners.get(&address) {
                    Some(tx) => {
                        tx.send_if_modified(|current| {
                            let changed = *current != backends;
                            if changed {
                                tracing::info!(%address, ?backends, "service endpoints changed");
                                *current = backends;
                            }
                            changed
                        });
                    }
                    None => match TcpListener::bind(address).await {
                        Ok(listener) => {
                            tracing::info!(%address, ?backends, "proxying service");
                            let (tx, rx) = watch::channel(backends);
                            tasks.spawn(serve(listener, rx));
                            listeners.insert(address, tx);
                        }
                        // Retried at the next change.
                        Err(e) => {
                            tracing::warn!(%address, error = %e, "cannot listen for a service")
                        }
                    },
                }
            }
        }
    };
    tokio::join!(follow_services, follow_pods, proxy);
}

/// A watch callback that keeps a snapshot of the objects and signals the change.
fn keep<'a, K>(target: &Snapshot<K>, changed: &'a Notify) -> impl FnMut(&Store<K>) + 'a
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let target = target.clone();
    move |store| {
        *target.lock().unwrap_or_else(|e| e.into_inner()) = store.state();
        changed.notify_one();
    }
}

/// Every `clusterIP:port` to proxy, with its ready endpoints.
fn routes(services: &[Arc<Service>], pods: &[Arc<Pod>]) -> HashMap<SocketAddrV4, Vec<SocketAddr>> {
    let mut routes = HashMap::new();
    for service in services {
        let Some(spec) = &service.spec else { continue };
        let Some(ip) = spec
            .cluster_ip
            .as_deref()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        else {
            continue; // headless ("None") or not allocated yet
        };
        if !ip.is_loopback() {
            continue; // never listen anywhere but loopback
        }
        let selected: Vec<&Pod> = match &spec.selector {
            Some(selector) if !selector.is_empty() => pods
                .iter()
                .filter(|pod| {
                    pod.namespace() == service.namespace() && matches(selector, pod.labels())
                })
                .filter(|pod| is_ready(pod))
                .map(|pod| pod.as_ref())
                .collect(),
            _ => Vec::new(),
        };
        for port in spec.ports.iter().flatten() {
            if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                continue;
            }
            let Ok(listen_port) = u16::try_from(port.port) else {
                continue;
            };
            let target = port
                .target_port
                .clone()
                .unwrap_or(IntOrString::Int(port.port));
            let backends = selected
                .iter()
                .filter_map(|pod| {
                    let pod_ip: Ipv4Addr = pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
                    Some(SocketAddr::from((pod_ip, target_port(pod, &target)?)))
                })
                .collect();
            routes.insert(SocketAddrV4::new(ip, listen_port), backends);
        }
    }
    routes
}

fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Ready, addressed and not terminating: what the endpoints controller publishes as ready.
fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod.status.as_ref().is_some_and(|status| {
            status.pod_ip.is_some()
                && status
                    .conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// A Service's `targetPort` in one pod: a number, or the name of one of its container ports.
fn target_port(pod: &Pod, target: &IntOrString) -> Option<u16> {
    match target {
        IntOrString::Int(port) => u16::try_from(*port).ok(),
        IntOrString::String(name) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// Accepts connections until the route is removed, then lets established ones finish.
async fn serve(listener: TcpListener, mut backends: watch::Receiver<Vec<SocketAddr>>) {
    let address = listener.local_addr().ok();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((inbound, _)) => {
                    let mut candidates = backends.borrow().clone();
                    candidates.shuffle(&mut rand::thread_rng());
                    connections.spawn(forward(inbound, candidates));
                }
                Err(e) => tracing::warn!(?address, error = %e, "accept failed"),
            },
            changed = backends.changed() => if changed.is_err() { break },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    tracing::info!(
        ?address,
        "service removed; established connections continue"
    );
    while connections.join_next().await.is_some() {}
}

/// Connects to the first backend that answers and relays bytes both ways until either side
/// closes.
async fn forward(mut inbound: TcpStream, candidates: Vec<SocketAddr>) {
    for backend in candidates {
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(backend)).await {
            Ok(Ok(mut outbound)) => {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                return;
            }
            Ok(Err(e)) => tracing::debug!(%backend, error = %e, "backend refused"),
            Err(_) => tracing::debug!(%backend, "backend timed out"),
        }
    }
    tracing::debug!("no ready endpoint; closing the connection");
}
