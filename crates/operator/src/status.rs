//! The status a reconcile writes, and the events it publishes: a phase, and conditions that
//! say what is happening and why (CloudNativePG style): `Ready` (the upgrade is complete),
//! `Progressing` (it moves on by itself), `Blocked` (a person must fix something first).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::events::EventType;
use kube::ResourceExt;
use pgshift_engine::decide::Action as Step;
use pgshift_engine::observe::Database;

use crate::crd::{DatabaseStatus, Phase, PostgresUpgrade, PostgresUpgradeStatus};

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

    pub fn ready_for_cutover(&mut self) {
        let message = "the target is in sync; set spec.cutover.approved: true to cut over";
        self.set_phase(Phase::ReadyForCutover, message);
        self.condition("Progressing", false, "AwaitingApproval", message);
        self.condition(
            "Blocked",
            false,
            "AwaitingApproval",
            "nothing blocks the upgrade",
        );
        self.condition("Ready", false, "AwaitingApproval", message);
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

    /// The databases whose target counted more replication errors than at the last reconcile.
    pub fn new_apply_errors(&self, steps: &[(Database, Step)]) -> Vec<String> {
        steps
            .iter()
            .filter_map(|(db, _)| {
                let now = db.forward.subscription.as_ref()?.errors;
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

    /// Per-database steps, tables in sync and the lag behind the source.
    pub fn databases(&mut self, steps: &[(Database, Step)]) {
        self.status.databases = steps
            .iter()
            .map(|(db, step)| DatabaseStatus {
                name: db.name.clone(),
                step: format!("{step:?}"),
                tables_ready: db
                    .forward
                    .subscription
                    .as_ref()
                    .map_or(0, |s| s.tables_ready),
                tables_total: db
                    .forward
                    .subscription
                    .as_ref()
                    .map_or(0, |s| s.tables_total),
                apply_errors: db.forward.subscription.as_ref().map_or(0, |s| s.errors),
            })
            .collect();
        let subscribed: Vec<_> = steps
            .iter()
            .filter_map(|(db, _)| db.forward.subscription.as_ref())
            .collect();
        if !subscribed.is_empty() {
            let ready: i64 = subscribed.iter().map(|s| s.tables_ready).sum();
            let total: i64 = subscribed.iter().map(|s| s.tables_total).sum();
            self.status.tables = Some(format!("{ready}/{total}"));
        }
        let lag = steps
            .iter()
            .filter_map(|(db, _)| db.forward.slot.as_ref())
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

    #[test]
    fn bytes_read_as_people_do() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(8 * 1024 * 1024), "8.0 MiB");
    }
}
