//! Leader election against a real API server: every test starts a cluster of its own.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use pgshift_operator::leader::{hold, LeaderError, Leadership, LeaseConfig, Lost};
use pgshift_testkit::KubeCluster;

const LEASE: &str = "pgshift-operator";
const LEASE_DURATION: Duration = Duration::from_secs(3);
const RENEW_EVERY: Duration = Duration::from_secs(1);

async fn start() -> KubeCluster {
    KubeCluster::start_for_test().await
}

fn config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        lease_duration: LEASE_DURATION,
        renew_every: RENEW_EVERY,
        ..LeaseConfig::new("default", LEASE, identity)
    }
}

/// The Lease's holderIdentity and leaseTransitions.
async fn lease_state(leases: &Api<Lease>) -> (Option<String>, Option<i32>) {
    let spec = leases.get(LEASE).await.unwrap().spec.unwrap();
    (spec.holder_identity, spec.lease_transitions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_is_replaced_after_the_lease_expires() {
    let cluster = start().await;
    let client = cluster.client();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");

    let a = hold(client.clone(), config("replica-a")).await.unwrap();
    assert!(a.is_held());
    assert_eq!(
        lease_state(&leases).await,
        (Some("replica-a".into()), Some(0))
    );
    assert_eq!(
        leases
            .get(LEASE)
            .await
            .unwrap()
            .spec
            .unwrap()
            .lease_duration_seconds,
        Some(3)
    );

    // A standby waits while the holder renews, for twice the lease duration.
    let b = tokio::spawn(hold(client.clone(), config("replica-b")));
    let renewed_before = leases.get(LEASE).await.unwrap().spec.unwrap().renew_time;
    tokio::time::sleep(LEASE_DURATION * 2).await;
    assert!(
        !b.is_finished(),
        "the standby got the lease while its holder renewed it"
    );
    assert!(a.is_held());
    let spec = leases.get(LEASE).await.unwrap().spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-a"));
    assert!(spec.renew_time > renewed_before, "the holder did not renew");

    // Killed: renewing stops without a release.
    let a_lost = tokio::spawn(a.lost());
    let killed = Instant::now();
    drop(a);
    let reason = a_lost.await.unwrap();
    let a_stopped = killed.elapsed();
    assert_eq!(reason, Lost::Expired { last_error: None });
    let b = tokio::time::timeout(LEASE_DURATION * 3, b)
        .await
        .expect("the standby did not take over an expired lease")
        .unwrap()
        .unwrap();
    let handover = killed.elapsed();
    eprintln!("killed holder: it stopped acting after {a_stopped:.2?}, the standby took over after {handover:.2?}");
    // The old holder stops no later than the standby starts, and the standby waited for the
    // lease to expire (the last renewal came at most RENEW_EVERY before the kill).
    assert!(a_stopped <= handover, "{a_stopped:?} > {handover:?}");
    assert!(handover >= LEASE_DURATION - RENEW_EVERY, "{handover:?}");
    assert!(b.is_held());
    assert_eq!(
        lease_state(&leases).await,
        (Some("replica-b".into()), Some(1))
    );

    // Someone else writing the Lease is noticed at the next renewal.
    let mut lease = leases.get(LEASE).await.unwrap();
    lease.spec.as_mut().unwrap().holder_identity = Some("intruder".into());
    leases
        .replace(LEASE, &PostParams::default(), &lease)
        .await
        .unwrap();
    let taken = Instant::now();
    let reason = tokio::time::timeout(LEASE_DURATION, b.lost())
        .await
        .unwrap();
    assert_eq!(
        reason,
        Lost::TakenOver {
            holder: Some("intruder".into())
        }
    );
    assert!(!b.is_held());
    eprintln!("a takeover was noticed after {:.2?}", taken.elapsed());
    // A lost lease has nothing to release: the intruder keeps it.
    b.release().await.unwrap();
    assert_eq!(lease_state(&leases).await.0.as_deref(), Some("intruder"));
}

type Contender = Option<tokio::task::JoinHandle<Result<Leadership, LeaderError>>>;

/// The first contender to hold the lease (taken out of `contenders`), with its index; fails
/// when none does within three lease durations of `since`.
async fn next_winner(contenders: &mut [Contender], since: Instant) -> (usize, Leadership) {
    loop {
        let done = contenders
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.is_finished()));
        if let Some(index) = done {
            let leadership = contenders[index].take().unwrap().await.unwrap().unwrap();
            return (index, leadership);
        }
        assert!(
            since.elapsed() < LEASE_DURATION * 3,
            "no contender took the lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_lease_goes_to_a_standby_at_once_and_only_one_wins() {
    let cluster = start().await;
    let client = cluster.client();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");

    // Three contenders start together: exactly one wins.
    let mut contenders = ["replica-a", "replica-b", "replica-c"]
        .map(|identity| Some(tokio::spawn(hold(client.clone(), config(identity)))));
    let (first, mut leader) = next_winner(&mut contenders, Instant::now()).await;
    tokio::time::sleep(LEASE_DURATION).await;
    assert!(
        contenders.iter().flatten().all(|c| !c.is_finished()),
        "two contenders won"
    );
    assert_eq!(
        lease_state(&leases).await,
        (Some(leader.identity().to_string()), Some(0))
    );
    eprintln!("{} won", leader.identity());

    // Graceful shutdowns hand over to a standby without waiting for the lease to expire.
    for transitions in 1..=2 {
        let released = Instant::now();
        let previous = leader.identity().to_string();
        leader.release().await.unwrap();
        let (index, next) = next_winner(&mut contenders, released).await;
        let handover = released.elapsed();
        eprintln!(
            "released by {previous}: {} took over after {handover:.2?}",
            next.identity()
        );
        assert_ne!(index, first);
        assert!(
            handover < LEASE_DURATION - RENEW_EVERY,
            "{handover:?}: waited for expiry"
        );
        assert_eq!(
            lease_state(&leases).await,
            (Some(next.identity().to_string()), Some(transitions))
        );
        leader = next;
    }

    // The last one releases with nobody waiting: the Lease names no holder.
    leader.release().await.unwrap();
    assert_eq!(lease_state(&leases).await, (None, Some(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_rbac_and_namespace_are_reported_with_what_to_do() {
    let cluster = start().await;
    let mut config_file = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(cluster.kubeconfig()).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    // A service account that no Role grants anything.
    config_file.auth_info.impersonate = Some("system:serviceaccount:default:nobody".into());
    let nobody = kube::Client::try_from(config_file).unwrap();
    let error = hold(nobody, config("replica-a")).await.unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, LeaderError::Forbidden { verb: "get", .. }),
        "{message}"
    );
    assert!(
        message.contains("may not get leases in namespace default"),
        "{message}"
    );
    assert!(message.contains("\"coordination.k8s.io\""), "{message}");
    assert!(
        message.contains("system:serviceaccount:default:nobody"),
        "{message}"
    );

    let elsewhere = LeaseConfig {
        namespace: "absent".into(),
        ..config("replica-a")
    };
    let error = hold(cluster.client(), elsewhere).await.unwrap_err();
    assert!(matches!(error, LeaderError::NoNamespace { .. }), "{error}");
}
