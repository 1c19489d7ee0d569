//! Leader election over a `coordination.k8s.io/v1` Lease, so that of several operator
//! replicas only one acts.
//!
//! The Lease record follows client-go's conventions (`holderIdentity`, `renewTime`,
//! `leaseDurationSeconds`, `leaseTransitions`), so `kubectl get lease` reads it the usual
//! way. Every write is a `replace` guarded by the `resourceVersion` that was read (or a
//! `create`, which fails if the Lease exists), so of two contenders at most one can win.
//!
//! A contender may take the lease when nobody holds it or when `renewTime +
//! leaseDurationSeconds` has passed on its own clock. The holder stops acting at the
//! instant it sent its last successful renewal plus the lease duration, measured on its
//! monotonic clock: that is never later than the moment a contender whose wall clock agrees
//! with the holder's may take over. Like any Lease-based election this assumes the
//! replicas' clocks agree to well under the lease duration (NTP on cluster nodes).
//!
//! RBAC: the operator's service account needs `get`, `create` and `update` on `leases` in
//! API group `coordination.k8s.io`, in the Lease's namespace.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, timeout_at, Instant};
use tracing::{info, warn};

/// Which Lease to contend for, under which identity, and how often to renew it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Namespace of the Lease, usually the operator's own.
    pub namespace: String,
    /// Name of the Lease; every replica of one operator uses the same.
    pub name: String,
    /// This replica's identity, unique among the replicas (the pod name).
    pub identity: String,
    /// How long a renewal keeps the lease (written as whole seconds, rounded up).
    pub lease_duration: Duration,
    /// How often the holder renews, and how often a standby checks the lease.
    pub renew_every: Duration,
}

impl LeaseConfig {
    /// The default timings: a 15 s lease renewed every 5 s.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }

    fn validate(&self) -> Result<(), LeaderError> {
        let invalid = |reason: &str| Err(LeaderError::InvalidConfig(reason.to_string()));
        if self.namespace.is_empty() || self.name.is_empty() {
            return invalid("the Lease namespace and name must not be empty");
        }
        if self.identity.is_empty() {
            return invalid("the identity must not be empty: use the pod name");
        }
        if self.lease_duration < Duration::from_secs(1) {
            return invalid("the lease duration must be at least 1 s");
        }
        // Half the lease at most, so that a failed renewal can be retried before it lapses.
        if self.renew_every.is_zero() || self.renew_every * 2 > self.lease_duration {
            return invalid(
                "the renew interval must be above zero and at most half the lease duration",
            );
        }
        Ok(())
    }

    /// The duration written into the Lease: rounded up, so others never wait less than we hold.
    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs_f64().ceil() as u64).unwrap_or(i32::MAX)
    }

    /// Pause after a failed request before trying again.
    fn retry_delay(&self) -> Duration {
        self.renew_every / 4
    }
}

/// Why a replica may no longer act as the leader.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Lost {
    /// Someone else wrote the Lease: another replica took it, or a person cleared it.
    #[error("the leader Lease now names {} as its holder", holder.as_deref().unwrap_or("nobody"))]
    TakenOver { holder: Option<String> },
    /// The Lease was deleted while this replica held it.
    #[error("the leader Lease was deleted")]
    Deleted,
    /// No renewal succeeded within the lease duration, so another replica may hold it now.
    #[error("could not renew the leader Lease within its duration{}", last_error.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Expired { last_error: Option<String> },
    /// [`Leadership::release`] gave the lease up.
    #[error("the leader Lease was released")]
    Released,
}

/// Errors of leader election; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("invalid leader election settings: {0}")]
    InvalidConfig(String),
    #[error(
        "the operator may not {verb} leases in namespace {namespace}: grant its service account \
         the verbs get, create and update on resource \"leases\" in API group \
         \"coordination.k8s.io\" there (a Role and RoleBinding); the API server said: {detail}"
    )]
    Forbidden {
        verb: &'static str,
        namespace: String,
        detail: String,
    },
    #[error(
        "the API server did not accept the operator's credentials to {verb} Lease \
         {namespace}/{name}: check its service account token or kubeconfig ({detail})"
    )]
    Unauthorized {
        verb: &'static str,
        namespace: String,
        name: String,
        detail: String,
    },
    #[error(
        "namespace {namespace} of the leader Lease does not exist: create it, or put the Lease in \
         the namespace the operator runs in ({detail})"
    )]
    NoNamespace { namespace: String, detail: String },
    #[error(
        "the API server rejected Lease {namespace}/{name}: {detail}; the name must be a valid \
         DNS subdomain (lower case letters, digits, '-' and '.')"
    )]
    Invalid {
        namespace: String,
        name: String,
        detail: String,
    },
    #[error(
        "could not release Lease {namespace}/{name} ({detail}); another replica takes over once \
         it expires"
    )]
    Release {
        namespace: String,
        name: String,
        detail: String,
    },
}

/// This replica holds the lease; a background task renews it.
///
/// Dropping a `Leadership` stops renewing without releasing, as a killed process would:
/// another replica takes over once the lease expires. Call [`Leadership::release`] on a
/// graceful shutdown so that a standby takes over at once.
#[derive(Debug)]
pub struct Leadership {
    api: Api<Lease>,
    config: LeaseConfig,
    status: watch::Sender<Status>,
    stop: oneshot::Sender<()>,
    renewer: JoinHandle<Option<Lease>>,
}

#[derive(Debug, Clone)]
enum Status {
    /// Held until `until` unless renewed; `last_error` tells why the last renewal failed.
    Held {
        until: Instant,
        last_error: Option<String>,
    },
    Lost(Lost),
}

impl Leadership {
    /// The identity this replica holds the lease under.
    pub fn identity(&self) -> &str {
        &self.config.identity
    }

    /// Whether this replica may act now: it holds the lease and its last renewal has not
    /// lapsed. Check it right before acting on anything.
    pub fn is_held(&self) -> bool {
        matches!(*self.status.borrow(), Status::Held { until, .. } if Instant::now() < until)
    }

    /// Completes when this replica must stop acting: another took the lease, it was deleted,
    /// or no renewal succeeded within the lease duration (it completes at the deadline
    /// itself, not when the renew task gets round to noticing). The future does not borrow
    /// `self`, so it can run in a task of its own.
    pub fn lost(&self) -> impl Future<Output = Lost> + Send + 'static {
        wait_lost(self.status.subscribe())
    }

    /// Gives the lease up (graceful shutdown): stops renewing, then clears `holderIdentity`
    /// so that a standby takes over at once. Does nothing if the lease was lost already.
    pub async fn release(self) -> Result<(), LeaderError> {
        let Leadership {
            api,
            config,
            status,
            stop,
            renewer,
        } = self;
        let _ = stop.send(());
        let lease = match renewer.await {
            Ok(lease) => lease,
            Err(e) => {
                warn!(error = %e, "the lease renew task failed; the lease will expire instead");
                None
            }
        };
        // Stop acting before anyone can take the lease over.
        status.send_replace(Status::Lost(Lost::Released));
        let Some(mut lease) = lease else {
            return Ok(());
        };
        // A conflict means someone wrote the Lease meanwhile: read it again and retry while
        // it is still ours. Three rounds are plenty; more would mean someone keeps writing it.
        for _ in 0..3 {
            let mut released = lease.clone();
            released
                .spec
                .get_or_insert_with(Default::default)
                .holder_identity = None;
            match api
                .replace(&config.name, &PostParams::default(), &released)
                .await
            {
                Ok(_) => {
                    info!(lease = %config.name, identity = %config.identity, "released the leader lease");
                    return Ok(());
                }
                Err(e) if status_code(&e) == Some(404) => return Ok(()),
                Err(e) if status_code(&e) == Some(409) => match api.get_opt(&config.name).await {
                    Ok(Some(current)) if holder(&current) == Some(config.identity.as_str()) => {
                        lease = current;
                    }
                    Ok(_) => return Ok(()),
                    Err(e) => return Err(release_error(&config, "get", &e)),
                },
                Err(e) => return Err(release_error(&config, "update", &e)),
            }
        }
        Err(LeaderError::Release {
            namespace: config.namespace,
            name: config.name,
            detail: "the Lease kept changing while it was being released".to_string(),
        })
    }
}

/// Completes when `status` says the lease is lost, or at the deadline of the last renewal.
async fn wait_lost(mut status: watch::Receiver<Status>) -> Lost {
    loop {
        let current = status.borrow_and_update().clone();
        let (until, last_error) = match current {
            Status::Lost(lost) => return lost,
            Status::Held { until, last_error } => (until, last_error),
        };
        tokio::select! {
            _ = sleep_until(until) => return Lost::Expired { last_error },
            changed = status.changed() => {
                if changed.is_err() {
                    // Renewing stopped (the Leadership was dropped): the lease lapses.
                    sleep_until(until).await;
                    return Lost::Expired { last_error };
                }
            }
        }
    }
}

/// Waits until this identity holds the lease, then renews it in a background task.
///
/// Creates the Lease if absent and takes it over when nobody holds it or its holder let it
/// expire (incrementing `leaseTransitions` when the holder changes). Transient API errors
/// are logged and retried; it returns an error only for what retrying cannot fix (settings,
/// RBAC, credentials, a missing namespace, an invalid name).
pub async fn hold(client: Client, config: LeaseConfig) -> Result<Leadership, LeaderError> {
    config.validate()?;
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut waiting_for = None;
    loop {
        match try_acquire(&api, &config).await {
            Ok(Attempt::Won { lease, sent }) => {
                let transitions = lease.spec.as_ref().and_then(|s| s.lease_transitions);
                info!(lease = %config.name, identity = %config.identity, ?transitions, "acquired the leader lease");
                return Ok(Leadership::start(api, config, *lease, sent));
            }
            // Someone wrote the Lease between our read and our write: read it again at once.
            Ok(Attempt::Conflict) => {}
            Ok(Attempt::HeldBy { holder, wait }) => {
                if waiting_for.as_ref() != Some(&holder) {
                    info!(lease = %config.name, %holder, "waiting for the leader lease");
                    waiting_for = Some(holder);
                }
                sleep(wait).await;
            }
            Err((verb, e)) => {
                if let Some(lasting) = lasting_error(&config, verb, &e) {
                    return Err(lasting);
                }
                warn!(error = %describe(&config, verb, &e), "retrying");
                sleep(config.retry_delay()).await;
            }
        }
    }
}

enum Attempt {
    /// We hold the lease; `sent` is when the winning write was sent.
    Won {
        lease: Box<Lease>,
        sent: Instant,
    },
    Conflict,
    HeldBy {
        holder: String,
        wait: Duration,
    },
}

async fn try_acquire(
    api: &Api<Lease>,
    config: &LeaseConfig,
) -> Result<Attempt, (&'static str, kube::Error)> {
    let current = api.get_opt(&config.name).await.map_err(|e| ("get", e))?;
    let Some(current) = current else {
        let sent = Instant::now();
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                namespace: Some(config.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(claim(
                None,
                &config.identity,
                config.duration_seconds(),
                Timestamp::now(),
            )),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(lease) => Ok(Attempt::Won {
                lease: Box::new(lease),
                sent,
            }),
            Err(e) if status_code(&e) == Some(409) => Ok(Attempt::Conflict),
            Err(e) => Err(("create", e)),
        };
    };
    let empty = LeaseSpec::default();
    let spec = current.spec.as_ref().unwrap_or(&empty);
    let now = Timestamp::now();
    if let Verdict::Held { holder, until } =
        judge(spec, &config.identity, config.lease_duration, now)
    {
        // Check again at the renew pace, or right when it expires if that comes first.
        let left = Duration::try_from(until.duration_since(now)).unwrap_or_default();
        return Ok(Attempt::HeldBy {
            holder,
            wait: left.min(config.renew_every),
        });
    }
    let sent = Instant::now();
    let mut next = current.clone();
    next.spec = Some(claim(
        Some(spec),
        &config.identity,
        config.duration_seconds(),
        Timestamp::now(),
    ));
    match api
        .replace(&config.name, &PostParams::default(), &next)
        .await
    {
        Ok(lease) => Ok(Attempt::Won {
            lease: Box::new(lease),
            sent,
        }),
        Err(e) if status_code(&e) == Some(409) => Ok(Attempt::Conflict),
        Err(e) => Err(("update", e)),
    }
}

impl Leadership {
    fn start(api: Api<Lease>, config: LeaseConfig, lease: Lease, sent: Instant) -> Self {
        let (status, _) = watch::channel(Status::Held {
            until: sent + config.lease_duration,
            last_error: None,
        });
        let (stop, stopped) = oneshot::channel();
        let renewer = tokio::spawn(renew(
            api.clone(),
            config.clone(),
            lease,
            sent,
            status.clone(),
            stopped,
        ));
        Leadership {
            api,
            config,
            status,
            stop,
            renewer,
        }
    }
}

/// Renews the lease every `renew_every` until told to stop (returning the Lease as last
/// written, for `release`) or until it is lost (returning `None`).
async fn renew(
    api: Api<Lease>,
    config: LeaseConfig,
    mut lease: Lease,
    mut sent: Instant,
    status: watch::Sender<Status>,
    mut stop: oneshot::Receiver<()>,
) -> Option<Lease> {
    let mut deadline = sent + config.lease_duration;
    let mut next = sent + config.renew_every;
    let mut last_error = None;
    loop {
        tokio::select! {
            // A dropped sender (the Leadership was dropped) stops renewing too.
            _ = &mut stop => return Some(lease),
            _ = sleep_until(next.min(deadline)) => {}
        }
        let outcome = if Instant::now() >= deadline {
            None
        } else {
            sent = Instant::now();
            // Past the deadline an answer is worthless: others may hold the lease by then.
            timeout_at(deadline, renew_once(&api, &config, &mut lease))
                .await
                .ok()
        };
        match outcome {
            Some(Renewal::Renewed) => {
                deadline = sent + config.lease_duration;
                next = sent + config.renew_every;
                if last_error.take().is_some() {
                    info!(lease = %config.name, "renewed the leader lease again");
                }
                status.send_replace(Status::Held {
                    until: deadline,
                    last_error: None,
                });
            }
            Some(Renewal::Failed(error)) => {
                warn!(lease = %config.name, %error, "could not renew the leader lease; retrying");
                next = Instant::now() + config.retry_delay();
                status.send_replace(Status::Held {
                    until: deadline,
                    last_error: Some(error.clone()),
                });
                last_error = Some(error);
            }
            Some(Renewal::Lost(lost)) => {
                warn!(lease = %config.name, %lost, "lost the leader lease");
                status.send_replace(Status::Lost(lost));
                return None;
            }
            None => {
                let lost = Lost::Expired { last_error };
                warn!(lease = %config.name, %lost, "lost the leader lease");
                status.send_replace(Status::Lost(lost));
                return None;
            }
        }
    }
}

enum Renewal {
    Renewed,
    Failed(String),
    Lost(Lost),
}

async fn renew_once(api: &Api<Lease>, config: &LeaseConfig, lease: &mut Lease) -> Renewal {
    loop {
        let mut next = lease.clone();
        let spec = next.spec.get_or_insert_with(Default::default);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        spec.lease_duration_seconds = Some(config.duration_seconds());
        match api
            .replace(&config.name, &PostParams::default(), &next)
            .await
        {
            Ok(written) => {
                *lease = written;
                return Renewal::Renewed;
            }
            Err(e) if status_code(&e) == Some(404) => return Renewal::Lost(Lost::Deleted),
            // Someone else wrote it, or our previous renewal landed but its answer was lost.
            Err(e) if status_code(&e) == Some(409) => match api.get_opt(&config.name).await {
                Ok(Some(current)) if holder(&current) == Some(config.identity.as_str()) => {
                    *lease = current;
                }
                Ok(Some(current)) => {
                    let holder = holder(&current).map(str::to_string);
                    return Renewal::Lost(Lost::TakenOver { holder });
                }
                Ok(None) => return Renewal::Lost(Lost::Deleted),
                Err(e) => return Renewal::Failed(describe(config, "get", &e)),
            },
            Err(e) => return Renewal::Failed(describe(config, "update", &e)),
        }
    }
}

/// What a replica may do with a Lease it has read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// Nobody holds it (never held, or released): take it.
    Free,
    /// It names us already (say, restarted under the same pod name): renew it.
    Ours,
    /// Its holder did not renew it in time: take it over.
    Expired,
    /// Someone else holds it until `until` unless they renew it.
    Held { holder: String, until: Timestamp },
}

/// Decides, from the Lease alone, whether `identity` may take it at `now`. A Lease without
/// a duration is judged by ours; one held without a renew time has expired.
fn judge(spec: &LeaseSpec, identity: &str, our_duration: Duration, now: Timestamp) -> Verdict {
    let holder = match spec.holder_identity.as_deref() {
        None | Some("") => return Verdict::Free,
        Some(holder) if holder == identity => return Verdict::Ours,
        Some(holder) => holder,
    };
    let Some(MicroTime(renewed)) = spec.renew_time else {
        return Verdict::Expired;
    };
    let duration = match spec.lease_duration_seconds {
        Some(seconds) if seconds > 0 => SignedDuration::from_secs(seconds.into()),
        _ => SignedDuration::try_from(our_duration).unwrap_or(SignedDuration::MAX),
    };
    match renewed.checked_add(duration) {
        Ok(until) if now < until => Verdict::Held {
            holder: holder.to_string(),
            until,
        },
        Ok(_) => Verdict::Expired,
        // Out of range: so far in the future that it never expires.
        Err(_) => Verdict::Held {
            holder: holder.to_string(),
            until: Timestamp::MAX,
        },
    }
}

/// The spec that makes `identity` the holder as of `now`. A change of holder counts as a
/// transition, also after a release (as client-go counts it); creating the Lease does not.
fn claim(
    previous: Option<&LeaseSpec>,
    identity: &str,
    duration_seconds: i32,
    now: Timestamp,
) -> LeaseSpec {
    let Some(previous) = previous else {
        return LeaseSpec {
            holder_identity: Some(identity.to_string()),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(duration_seconds),
            lease_transitions: Some(0),
            ..LeaseSpec::default()
        };
    };
    let ours = previous.holder_identity.as_deref() == Some(identity);
    let transitions = previous.lease_transitions.unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(identity.to_string()),
        acquire_time: if ours {
            previous.acquire_time.clone()
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_duration_seconds: Some(duration_seconds),
        lease_transitions: Some(if ours {
            transitions
        } else {
            transitions.saturating_add(1)
        }),
        ..previous.clone()
    }
}

fn holder(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()?
        .holder_identity
        .as_deref()
        .filter(|h| !h.is_empty())
}

fn status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// The error for an answer that retrying cannot fix; `None` for a transient failure.
fn lasting_error(
    config: &LeaseConfig,
    verb: &'static str,
    error: &kube::Error,
) -> Option<LeaderError> {
    let kube::Error::Api(status) = error else {
        return None;
    };
    let detail = status.message.clone();
    let namespace = config.namespace.clone();
    let name = config.name.clone();
    match status.code {
        401 => Some(LeaderError::Unauthorized {
            verb,
            namespace,
            name,
            detail,
        }),
        403 => Some(LeaderError::Forbidden {
            verb,
            namespace,
            detail,
        }),
        404 if verb == "create" => Some(LeaderError::NoNamespace { namespace, detail }),
        400 | 422 => Some(LeaderError::Invalid {
            namespace,
            name,
            detail,
        }),
        _ => None,
    }
}

/// A failed request as one line for the log, with the advice of its [`LeaderError`] if any.
fn describe(config: &LeaseConfig, verb: &'static str, error: &kube::Error) -> String {
    match lasting_error(config, verb, error) {
        Some(lasting) => lasting.to_string(),
        None => format!(
            "could not {verb} Lease {}/{}: {error}",
            config.namespace, config.name
        ),
    }
}

fn release_error(config: &LeaseConfig, verb: &'static str, error: &kube::Error) -> LeaderError {
    lasting_error(config, verb, error).unwrap_or_else(|| LeaderError::Release {
        namespace: config.namespace.clone(),
        name: config.name.clone(),
        detail: error.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: SignedDuration = SignedDuration::from_secs(1);

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).unwrap()
    }

    fn held_by(holder: &str, renewed: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_string()),
            renew_time: Some(MicroTime(at(renewed))),
            lease_duration_seconds: Some(duration),
            lease_transitions: Some(4),
            acquire_time: Some(MicroTime(at(-100))),
            ..LeaseSpec::default()
        }
    }

    const FIFTEEN: Duration = Duration::from_secs(15);

    #[test]
    fn nobody_holds_a_new_or_released_lease() {
        assert_eq!(
            judge(&LeaseSpec::default(), "b", FIFTEEN, at(0)),
            Verdict::Free
        );
        let released = LeaseSpec {
            holder_identity: Some(String::new()),
            ..held_by("a", 0, 15)
        };
        assert_eq!(judge(&released, "b", FIFTEEN, at(1)), Verdict::Free);
    }

    #[test]
    fn a_lease_is_held_until_renew_time_plus_its_duration() {
        let lease = held_by("a", 0, 10);
        let held = Verdict::Held {
            holder: "a".to_string(),
            until: at(10),
        };
        assert_eq!(judge(&lease, "b", FIFTEEN, at(0)), held);
        assert_eq!(judge(&lease, "b", FIFTEEN, at(10) - SECOND), held);
        assert_eq!(judge(&lease, "b", FIFTEEN, at(10)), Verdict::Expired);
        assert_eq!(judge(&lease, "b", FIFTEEN, at(60)), Verdict::Expired);
    }

    #[test]
    fn the_lease_duration_written_in_the_lease_counts_not_ours() {
        let lease = held_by("a", 0, 30);
        assert!(matches!(
            judge(&lease, "b", FIFTEEN, at(20)),
            Verdict::Held { .. }
        ));
        // Without a usable duration in the Lease, ours applies.
        for seconds in [None, Some(0), Some(-5)] {
            let lease = LeaseSpec {
                lease_duration_seconds: seconds,
                ..held_by("a", 0, 1)
            };
            assert!(matches!(
                judge(&lease, "b", FIFTEEN, at(14)),
                Verdict::Held { .. }
            ));
            assert_eq!(judge(&lease, "b", FIFTEEN, at(15)), Verdict::Expired);
        }
    }

    #[test]
    fn a_holder_without_a_renew_time_has_expired() {
        let lease = LeaseSpec {
            renew_time: None,
            ..held_by("a", 0, 15)
        };
        assert_eq!(judge(&lease, "b", FIFTEEN, at(0)), Verdict::Expired);
    }

    #[test]
    fn a_lease_naming_us_is_ours_even_when_expired() {
        assert_eq!(
            judge(&held_by("b", 0, 15), "b", FIFTEEN, at(5)),
            Verdict::Ours
        );
        assert_eq!(
            judge(&held_by("b", 0, 15), "b", FIFTEEN, at(500)),
            Verdict::Ours
        );
    }

    #[test]
    fn a_renew_time_at_the_end_of_time_never_expires() {
        let lease = LeaseSpec {
            renew_time: Some(MicroTime(Timestamp::MAX)),
            ..held_by("a", 0, 15)
        };
        let held = Verdict::Held {
            holder: "a".to_string(),
            until: Timestamp::MAX,
        };
        assert_eq!(judge(&lease, "b", FIFTEEN, at(0)), held);
    }

    #[test]
    fn creating_the_lease_is_not_a_transition() {
        let spec = claim(None, "a", 15, at(0));
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_transitions, Some(0));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.acquire_time, Some(MicroTime(at(0))));
        assert_eq!(spec.renew_time, Some(MicroTime(at(0))));
    }

    #[test]
    fn taking_over_counts_a_transition_and_resets_acquire_time() {
        let spec = claim(Some(&held_by("a", 0, 15)), "b", 3, at(20));
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(5));
        assert_eq!(spec.lease_duration_seconds, Some(3));
        assert_eq!(spec.acquire_time, Some(MicroTime(at(20))));
        assert_eq!(spec.renew_time, Some(MicroTime(at(20))));

        let released = LeaseSpec {
            holder_identity: None,
            ..held_by("a", 0, 15)
        };
        assert_eq!(
            claim(Some(&released), "b", 15, at(1)).lease_transitions,
            Some(5)
        );
    }

    #[test]
    fn reclaiming_our_own_lease_is_not_a_transition() {
        let spec = claim(Some(&held_by("b", 0, 15)), "b", 15, at(20));
        assert_eq!(spec.lease_transitions, Some(4));
        assert_eq!(spec.acquire_time, Some(MicroTime(at(-100))));
        assert_eq!(spec.renew_time, Some(MicroTime(at(20))));
    }

    #[test]
    fn settings_are_checked() {
        let config = LeaseConfig::new("ns", "pgshift-operator", "pod-0");
        assert!(config.validate().is_ok());
        assert_eq!(config.duration_seconds(), 15);
        let fractional = LeaseConfig {
            lease_duration: Duration::from_millis(2500),
            ..config.clone()
        };
        assert_eq!(fractional.duration_seconds(), 3);
        for bad in [
            LeaseConfig {
                identity: String::new(),
                ..config.clone()
            },
            LeaseConfig {
                name: String::new(),
                ..config.clone()
            },
            LeaseConfig {
                lease_duration: Duration::from_millis(500),
                ..config.clone()
            },
            LeaseConfig {
                renew_every: Duration::ZERO,
                ..config.clone()
            },
            LeaseConfig {
                renew_every: Duration::from_secs(8),
                ..config.clone()
            },
        ] {
            let error = bad.validate().unwrap_err();
            assert!(matches!(error, LeaderError::InvalidConfig(_)), "{error}");
        }
    }

    #[test]
    fn a_forbidden_answer_names_the_verb_and_resource() {
        let config = LeaseConfig::new("ops", "pgshift-operator", "pod-0");
        let forbidden = kube::Error::Api(Box::new(kube::core::Status {
            code: 403,
            message: "forbidden".to_string(),
            ..kube::core::Status::default()
        }));
        let message = describe(&config, "update", &forbidden);
        assert!(
            message.contains("may not update leases in namespace ops"),
            "{message}"
        );
        assert!(message.contains("\"coordination.k8s.io\""), "{message}");
        let unavailable = kube::Error::Api(Box::new(kube::core::Status {
            code: 503,
            message: "etcd is down".to_string(),
            ..kube::core::Status::default()
        }));
        assert!(lasting_error(&config, "get", &unavailable).is_none());
    }

    #[tokio::test]
    async fn lost_completes_at_the_deadline_of_the_last_renewal() {
        let started = Instant::now();
        let (status, _) = watch::channel(Status::Held {
            until: started + Duration::from_millis(300),
            last_error: None,
        });
        let lost = tokio::spawn(wait_lost(status.subscribe()));
        // A renewal moves the deadline; a failure that follows does not.
        tokio::time::sleep(Duration::from_millis(100)).await;
        status.send_replace(Status::Held {
            until: started + Duration::from_millis(600),
            last_error: None,
        });
        status.send_replace(Status::Held {
            until: started + Duration::from_millis(600),
            last_error: Some("connection refused".to_string()),
        });
        let reason = lost.await.unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(600),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            reason,
            Lost::Expired {
                last_error: Some("connection refused".to_string())
            }
        );
    }

    #[tokio::test]
    async fn lost_reports_a_takeover_at_once() {
        let (status, _) = watch::channel(Status::Held {
            until: Instant::now() + Duration::from_secs(60),
            last_error: None,
        });
        let lost = tokio::spawn(wait_lost(status.subscribe()));
        status.send_replace(Status::Lost(Lost::TakenOver {
            holder: Some("b".to_string()),
        }));
        let reason = tokio::time::timeout(Duration::from_secs(5), lost)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            reason.to_string(),
            "the leader Lease now names b as its holder"
        );
    }

    #[tokio::test]
    async fn when_renewing_stops_the_lease_lapses_at_its_deadline() {
        let until = Instant::now() + Duration::from_millis(200);
        let (status, receiver) = watch::channel(Status::Held {
            until,
            last_error: None,
        });
        let lost = tokio::spawn(wait_lost(receiver));
        drop(status);
        assert_eq!(lost.await.unwrap(), Lost::Expired { last_error: None });
        assert!(Instant::now() >= until);
    }
}
