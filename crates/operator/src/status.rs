//! The status a reconcile writes, and the events it publishes: a phase, and conditions that
//! say what is happening and why (CloudNativePG style): `Ready` (the upgrade is complete),
//! `Progressing` (it moves on by itself), `Blocked` (a person must fix something first).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;
use kube::ResourceExt;
use pgshift_engine::decide::Action as Step;
use pgshift_engine::observe::{Database, Stream};
use pgshift_engine::Side;

use crate::crd::{DatabaseStatus, Phase, PostgresUpgrade, PostgresUpgradeStatus, RollbackStatus};

pub struct PendingEvent {
    pub type_: EventType,
    pub reason: String,
    pub note: String,
}

/// The status being built by one reconcile, starting from the last one written.
pub struct Report {
    pub namespace: String,
    pub name: String,
    generation: Option<i64>,
    previous_phase: Option<Phase>,
    pub status: PostgresUpgradeStatus,
    pub events: Vec<PendingEvent>,
}

impl From<&PostgresUpgrade> for Report {
    fn from(upgrade: &PostgresUpgrade) -> Self {
        let status = upgrade.status.clone().unwrap_or_default();
        Report {
            namespace: upgrade.namespace().unwrap_or_default(),
            name: upgrade.name_any(),
            generation: upgrade.metadata.generation,
            previous_phase: status.phase,
            status,
            events: Vec::new(),
        }
    }
}

impl Report {
    pub fn event(&mut self, type_: EventType, reason: &str, note: &str) {
        self.events.push(PendingEvent {
            type_,
            reason: reason.to_string(),
            note: note.to_string(),
        });
    }

    /// Moving on by itself: `Progressing` true, not blocked, not yet ready. An event marks
    /// each new phase.
    pub fn phase(&mut self, phase: Phase, reason: &str, message: &str) {
        self.set_phase(phase, message);
        self.condition("Progressing", true, reason, message);
        self.condition("Blocked", false, reason, "nothing blocks the upgrade");
        self.condition("Ready", false, phase.name(), message);
    }

    fn set_phase(&mut self, phase: Phase, message: &str) {
        self.status.phase = Some(phase);
        self.status.observed_generation = self.generation;
        if self.previous_phase != Some(phase) {
            self.previous_phase = Some(phase);
            let type_ = match phase {
                Phase::Blocked | Phase::Failed => EventType::Warning,
                _ => EventType::Normal,
            };
            self.event(type_, phase.name(), message);
        }
    }

    /// The spec or what it refers to is wrong; nothing was done.
    pub fn invalid(&mut self, problems: &[String]) {
        let message = problems.join("; ");
        self.set_phase(Phase::Failed, &message);
        self.condition("Blocked", true, "InvalidSpec", &message);
        self.condition("Progressing", false, "InvalidSpec", &message);
        self.condition("Ready", false, "InvalidSpec", &message);
    }

    /// Preflight found blockers (listed in `status.blockers`); nothing was changed.
    pub fn blocked(&mut self) {
        let message = self
            .status
            .blockers
            .iter()
            .map(|b| format!("{} {}: fix: {}", b.object, b.problem, b.fix))
            .collect::<Vec<_>>()
            .join("; ");
        let message = format!("preflight: {message}; nothing was changed on the source");
        self.set_phase(Phase::Blocked, &message);
        self.condition("Blocked", true, "PreflightFailed", &message);
        self.condition("Progressing", false, "PreflightFailed", &message);
        self.condition("Ready", false, "PreflightFailed", &message);
    }

    /// Switched, the window open until `ends`: the upgrade completes by itself then.
    pub fn window_open(&mut self, ends: Timestamp) {
        let message = format!(
            "clients use the target and the source follows it until {ends}; then pgshift removes the \
             replication objects and the upgrade completes. Set spec.rollback.requested: true to go back"
        );
        self.phase(Phase::RollbackWindow, "RollbackWindow", &message);
    }

    /// The window's end, as the printer column shows it, and its start (`window` before the
    /// end); both absent while no window is open.
    pub fn window_ends(&mut self, ends: Option<Timestamp>, window: Duration) {
        if self.status.rollback.is_none() && ends.is_none() {
            return;
        }
        let rollback = self
            .status
            .rollback
            .get_or_insert_with(RollbackStatus::default);
        rollback.window_ends = ends.map(|t| t.to_string());
        rollback.window_opened = ends
            .and_then(|t| t.checked_sub(window).ok())
            .map(|t| t.to_string());
    }

    /// A rollback was done and is still asked for: the upgrade waits for a person.
    pub fn rolled_back(&mut self) {
        let message = "clients use the source again and the target follows it; set \
                       spec.rollback.requested: false to cut over again (as spec.cutover says), or \
                       delete the PostgresUpgrade to abort";
        self.waiting(Phase::RolledBack, "RolledBack", message);
    }

    /// A rollback would lose writes (the engine's refusal names each cause); nobody was paused.
    pub fn rollback_refused(&mut self, refusal: &str) {
        let message = format!(
            "{refusal}. Clients stay on the target; to stay there, set spec.rollback.requested: false"
        );
        self.set_phase(Phase::Blocked, &message);
        self.condition("Blocked", true, "RollbackRefused", &message);
        self.condition("Progressing", false, "RollbackRefused", &message);
        self.condition("Ready", false, "RollbackRefused", &message);
    }

    /// `spec.rollback.requested` before any switch: nothing to go back from, and no cutover
    /// while it is asked for.
    pub fn held_for_rollback(&mut self) {
        let message = "spec.rollback.requested is true but clients use the source: there is \
                       nothing to roll back, and pgshift does not cut over while it is true; set it \
                       to false to cut over";
        self.waiting(Phase::ReadyForCutover, "RollbackRequested", message);
    }

    pub fn ready_for_cutover(&mut self) {
        let message = "the target is in sync; set spec.cutover.approved: true to cut over";
        self.waiting(Phase::ReadyForCutover, "AwaitingApproval", message);
    }

    /// Waiting for a person's word (not blocked: nothing is wrong).
    fn waiting(&mut self, phase: Phase, reason: &str, message: &str) {
        self.set_phase(phase, message);
        self.condition("Progressing", false, reason, message);
        self.condition("Blocked", false, reason, "nothing blocks the upgrade");
        self.condition("Ready", false, reason, message);
    }

    /// A reconcile failed. Errors that the next attempt may not overcome by itself set the
    /// phase to `Failed`; others (a server briefly unreachable) leave the phase as it was.
    pub fn failed(&mut self, kind: &str, message: &str) {
        if matches!(kind, "SchemaCopyFailed" | "Engine" | "Sql" | "ApplyFailing") {
            self.set_phase(Phase::Failed, message);
        }
        self.condition("Progressing", false, kind, message);
        self.condition("Ready", false, kind, message);
        self.event(EventType::Warning, kind, message);
    }

    pub fn completed(&mut self) {
        let message = "clients use the target; pgshift's replication objects are removed";
        self.set_phase(Phase::Completed, message);
        self.condition("Ready", true, "Completed", message);
        self.condition("Progressing", false, "Completed", message);
        self.condition("Blocked", false, "Completed", "nothing blocks the upgrade");
    }

    /// The databases whose subscriber counted more replication errors than at the last
    /// reconcile, on the stream that runs now.
    pub fn new_apply_errors(&self, steps: &[(Database, Step)]) -> Vec<String> {
        steps
            .iter()
            .filter_map(|(db, _)| {
                let now = running_stream(db).subscription.as_ref()?.errors;
                let before = self
                    .status
                    .databases
                    .iter()
                    .find(|d| d.name == db.name)
                    .map_or(now, |d| d.apply_errors);
                (now > before).then(|| db.name.clone())
            })
            .collect()
    }

    /// Per-database steps, tables in sync and the lag, of the stream that runs now: the target
    /// behind the source before the switch, the source behind the target in the window. Once
    /// no stream runs (the upgrade completed), the last counts stay, as `tables` does.
    pub fn databases(&mut self, steps: &[(Database, Step)]) {
        let before = std::mem::take(&mut self.status.databases);
        self.status.databases = steps
            .iter()
            .map(|(db, step)| {
                let last = before.iter().find(|d| d.name == db.name);
                let (tables_ready, tables_total, apply_errors) =
                    match running_stream(db).subscription.as_ref() {
                        Some(s) => (s.tables_ready, s.tables_total, s.errors),
                        None => last.map_or((0, 0, 0), |d| {
                            (d.tables_ready, d.tables_total, d.apply_errors)
                        }),
                    };
                DatabaseStatus {
                    name: db.name.clone(),
                    step: format!("{step:?}"),
                    tables_ready,
                    tables_total,
                    apply_errors,
                }
            })
            .collect();
        self.status.direction = steps
            .iter()
            .find(|(db, _)| running_stream(db).subscription.is_some())
            .map(|(db, _)| match db.serving() {
                Side::Target => "Back".to_string(),
                _ => "Forward".to_string(),
            });
        let subscribed: Vec<_> = steps
            .iter()
            .filter_map(|(db, _)| running_stream(db).subscription.as_ref())
            .collect();
        if !subscribed.is_empty() {
            let ready: i64 = subscribed.iter().map(|s| s.tables_ready).sum();
            let total: i64 = subscribed.iter().map(|s| s.tables_total).sum();
            self.status.tables = Some(format!("{ready}/{total}"));
        }
        let lag = steps
            .iter()
            .filter_map(|(db, _)| running_stream(db).slot.as_ref())
            .map(|s| s.lag_bytes)
            .max();
        if let Some(lag) = lag {
            self.status.lag_bytes = Some(lag);
            self.status.lag = Some(human_bytes(lag));
        }
    }

    /// Sets a condition; its transition time changes only when its status does.
    fn condition(&mut self, type_: &str, status: bool, reason: &str, message: &str) {
        let status = if status { "True" } else { "False" }.to_string();
        let conditions = &mut self.status.conditions;
        let transition = conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now()));
        conditions.retain(|c| c.type_ != type_);
        conditions.push(Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message: message.to_string(),
            observed_generation: self.generation,
            last_transition_time: transition,
        });
        conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    }
}

/// The stream that keeps the server nobody writes to current: forward before the switch, back
/// (the rollback window) after it.
fn running_stream(db: &Database) -> &Stream {
    match db.serving() {
        Side::Target => &db.back,
        _ => &db.forward,
    }
}

/// When the rollback window ends: the newest switch to the target plus `window` (with no window,
/// at the switch). None before the switch and after cleanup. A switch time that cannot be read gives no
/// start to count from: the window counts as over (only the way back is lost, never a write).
pub fn window_ends(databases: &[Database], window: Duration) -> Option<Timestamp> {
    let switched: Vec<&Database> = databases
        .iter()
        .filter(|db| db.serving() == Side::Target && !db.cleaned_up)
        .collect();
    if switched.is_empty() {
        return None;
    }
    let latest = switched
        .iter()
        .map(|db| db.switched_at.as_deref()?.parse::<Timestamp>().ok())
        .collect::<Option<Vec<_>>>()
        .and_then(|times| times.into_iter().max());
    Some(match latest {
        Some(at) => at.checked_add(window).unwrap_or(Timestamp::MAX),
        None => Timestamp::UNIX_EPOCH,
    })
}

pub fn human_bytes(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes.max(0) as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade() -> PostgresUpgrade {
        serde_yaml::from_str(
            "apiVersion: pgshift.io/v1alpha1\nkind: PostgresUpgrade\nmetadata: {name: orders, namespace: shop, generation: 3}\n\
             spec:\n  source: {service: {name: db}, credentialsSecret: db-superuser}\n  target: {image: 'postgres:18', storage: {size: 1Gi}}\n  traffic: {service: db, mode: PgBouncer}\n",
        )
        .unwrap()
    }

    #[test]
    fn a_new_phase_is_an_event_and_the_same_phase_is_not() {
        let mut report = Report::from(&upgrade());
        report.phase(Phase::Provisioning, "TargetStarting", "waiting");
        report.phase(Phase::Provisioning, "TargetStarting", "waiting");
        assert_eq!(report.events.len(), 1);
        assert_eq!(report.events[0].reason, "Provisioning");
        assert_eq!(report.status.observed_generation, Some(3));
        let progressing = report
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Progressing")
            .unwrap();
        assert_eq!(progressing.status, "True");
        assert_eq!(progressing.observed_generation, Some(3));
    }

    #[test]
    fn blocked_names_each_fix() {
        let mut report = Report::from(&upgrade());
        report.status.blockers = vec![crate::crd::Finding {
            code: "wal_level".into(),
            object: "wal_level".into(),
            problem: "is replica".into(),
            fix: "set wal_level = logical and restart".into(),
        }];
        report.blocked();
        assert_eq!(report.status.phase, Some(Phase::Blocked));
        let blocked = report
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Blocked")
            .unwrap();
        assert_eq!(blocked.status, "True");
        assert!(blocked
            .message
            .contains("set wal_level = logical and restart"));
        assert_eq!(report.events[0].type_, EventType::Warning);
    }

    #[test]
    fn transition_time_holds_while_the_status_does() {
        let mut report = Report::from(&upgrade());
        report.phase(Phase::Provisioning, "A", "a");
        let first = report.status.conditions[0].last_transition_time.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        report.phase(Phase::Replicating, "B", "b");
        assert_eq!(report.status.conditions[0].last_transition_time, first);
    }

    fn switched_at(at: &str) -> Database {
        Database {
            name: "app".into(),
            target_exists: true,
            steps: vec![pgshift_engine::names::step::SWITCHED.into()],
            switched_at: Some(at.into()),
            ..Default::default()
        }
    }

    #[test]
    fn the_window_ends_a_window_after_the_newest_switch() {
        let day = Duration::from_secs(24 * 3600);
        let before = Database {
            name: "app".into(),
            target_exists: true,
            ..Default::default()
        };
        assert_eq!(window_ends(std::slice::from_ref(&before), day), None);
        let ends = |dbs: &[Database], window| window_ends(dbs, window).map(|t| t.to_string());
        let switched = [
            switched_at("2026-12-01T12:02:34Z"),
            switched_at("2026-12-01T12:02:35Z"),
        ];
        assert_eq!(
            ends(&switched, day).as_deref(),
            Some("2026-12-02T12:02:35Z")
        );
        assert_eq!(
            ends(&switched, Duration::ZERO).as_deref(),
            Some("2026-12-01T12:02:35Z"),
            "no window: it ends at the switch"
        );
        let mut cleaned = switched_at("2026-12-01T12:02:34Z");
        cleaned.steps.clear();
        cleaned.cleaned_up = true;
        assert_eq!(window_ends(&[cleaned], day), None);
        let unreadable = window_ends(&[switched_at("some time")], day).unwrap();
        assert!(
            unreadable < Timestamp::now(),
            "counts as over: {unreadable}"
        );
    }

    /// In the window the stream that runs is the back one (the source follows the target):
    /// its tables, lag and errors are what status shows.
    #[test]
    fn in_the_window_status_follows_the_back_stream() {
        let mut db = switched_at("2026-12-01T12:02:34Z");
        db.back = Stream {
            publication: true,
            slot: Some(pgshift_engine::observe::Slot {
                active: true,
                lag_bytes: 2048,
            }),
            subscription: Some(pgshift_engine::observe::Subscription {
                enabled: true,
                tables_total: 3,
                tables_ready: 3,
                errors: 2,
                worker_running: true,
                ..Default::default()
            }),
        };
        let steps = [(db, Step::WindowOpen)];
        let mut report = Report::from(&upgrade());
        report.status.databases = vec![DatabaseStatus {
            name: "app".into(),
            step: "Synced".into(),
            tables_ready: 3,
            tables_total: 3,
            apply_errors: 0,
        }];
        assert_eq!(report.new_apply_errors(&steps), ["app"]);
        report.databases(&steps);
        assert_eq!(report.status.tables.as_deref(), Some("3/3"));
        assert_eq!(report.status.lag.as_deref(), Some("2.0 KiB"));
        assert_eq!(report.status.direction.as_deref(), Some("Back"));
        let db = &report.status.databases[0];
        assert_eq!((db.step.as_str(), db.apply_errors), ("WindowOpen", 2));

        // Cleanup dropped the streams: the counts of the last stream stay in the status.
        let mut cleaned = switched_at("2026-12-01T12:02:34Z");
        cleaned.cleaned_up = true;
        report.databases(&[(cleaned, Step::Switched)]);
        let db = &report.status.databases[0];
        assert_eq!((db.tables_ready, db.tables_total), (3, 3), "{db:?}");
        assert_eq!(report.status.tables.as_deref(), Some("3/3"));
    }

    fn condition<'a>(report: &'a Report, type_: &str) -> &'a Condition {
        report
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap()
    }

    #[test]
    fn the_window_then_a_rollback_held_until_requested_is_cleared() {
        let upgrade: PostgresUpgrade = crate::validate::tests::fixture("upgrade-rollback.yaml");
        let mut report = Report::from(&upgrade);
        let ends: Timestamp = "2026-12-02T12:02:34Z".parse().unwrap();
        report.window_ends(Some(ends), Duration::from_secs(90 * 60));
        report.window_open(ends);
        assert_eq!(report.status.phase, Some(Phase::RollbackWindow));
        assert_eq!(
            report
                .status
                .rollback
                .as_ref()
                .unwrap()
                .window_ends
                .as_deref(),
            Some("2026-12-02T12:02:34Z")
        );
        assert_eq!(
            report
                .status
                .rollback
                .as_ref()
                .unwrap()
                .window_opened
                .as_deref(),
            Some("2026-12-02T10:32:34Z")
        );
        let progressing = condition(&report, "Progressing");
        assert_eq!(
            (progressing.status.as_str(), progressing.reason.as_str()),
            ("True", "RollbackWindow")
        );
        assert!(progressing.message.contains("until 2026-12-02T12:02:34Z"));
        assert!(progressing
            .message
            .contains("spec.rollback.requested: true"));

        report.window_ends(None, Duration::from_secs(90 * 60));
        report.rolled_back();
        assert_eq!(report.status.phase, Some(Phase::RolledBack));
        assert_eq!(report.status.rollback.as_ref().unwrap().window_ends, None);
        for type_ in ["Progressing", "Ready", "Blocked"] {
            assert_eq!(condition(&report, type_).status, "False", "{type_}");
        }
        let progressing = condition(&report, "Progressing");
        assert_eq!(progressing.reason, "RolledBack");
        assert!(progressing
            .message
            .contains("spec.rollback.requested: false"));
        assert_eq!(progressing.observed_generation, Some(5));
        let reasons: Vec<&str> = report.events.iter().map(|e| e.reason.as_str()).collect();
        assert_eq!(reasons, ["RollbackWindow", "RolledBack"]);
    }

    #[test]
    fn a_refused_rollback_blocks_with_the_cause_and_the_way_to_stay() {
        let mut report = Report::from(&upgrade());
        report.rollback_refused(
            "rollback refused for database app: table public.audit was created on the target",
        );
        assert_eq!(report.status.phase, Some(Phase::Blocked));
        let blocked = condition(&report, "Blocked");
        assert_eq!(
            (blocked.status.as_str(), blocked.reason.as_str()),
            ("True", "RollbackRefused")
        );
        assert!(blocked.message.contains("public.audit"));
        assert!(blocked.message.contains("spec.rollback.requested: false"));
        assert_eq!(report.events[0].type_, EventType::Warning);
    }

    #[test]
    fn bytes_read_as_people_do() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(8 * 1024 * 1024), "8.0 MiB");
    }
}
