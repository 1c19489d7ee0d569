//! The one decision for the whole upgrade, forward and back (pure): from what both servers show
//! of every database and what the user asked for, what happens next. The CLI's driver
//! (`Upgrade::run`, `cutover_now`, `rollback_now`) and the operator's reconcile both execute
//! it, so that they can never disagree about where an upgrade stands.
//!
//! The streams: *forward* replicates the source into the target (publication and slot on the
//! source, subscription on the target); *back* replicates the target into the source (the
//! rollback window). At most one of them runs at a time, from the server that serves to the one
//! that does not: a switch stops the old stream before the new one starts, so nothing loops.
//! The new one starts exactly at the switch point (its slot was made before the fence, its
//! origin is advanced to the LSN recorded in the switch), so nothing is missed or doubled.

use serde::Serialize;

use crate::error::Side;
use crate::events::Phase;
use crate::observe::Database;
use crate::plan::CutoverMode;

/// Which way a stream or a switch goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Source to target: the upgrade.
    Forward,
    /// Target to source: the rollback window, and a rollback.
    Back,
}

impl Direction {
    /// The server that publishes (and serves clients until the switch in this direction).
    pub fn from(self) -> Side {
        match self {
            Direction::Forward => Side::Source,
            Direction::Back => Side::Target,
        }
    }

    /// The server that subscribes (and serves after the switch).
    pub fn to(self) -> Side {
        match self {
            Direction::Forward => Side::Target,
            Direction::Back => Side::Source,
        }
    }

    pub fn reverse(self) -> Direction {
        match self {
            Direction::Forward => Direction::Back,
            Direction::Back => Direction::Forward,
        }
    }
}

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Automatic: cut over once in sync; Manual: stop at ready-for-cutover.
    pub cutover: CutoverMode,
    /// A switch starts only when the stream it ends is this close behind (a probe row then
    /// proves it before anyone is paused).
    pub max_lag_bytes: i64,
    /// Open the rollback window at the switch (reverse replication).
    pub rollback_window: bool,
    /// Go back: switch clients to the source through the window.
    pub rollback: bool,
}

impl Policy {
    pub const DEFAULT_MAX_LAG_BYTES: i64 = 8 * 1024 * 1024;

    /// Forward, automatic, with a rollback window.
    pub fn forward() -> Policy {
        Policy {
            cutover: CutoverMode::Automatic,
            max_lag_bytes: Policy::DEFAULT_MAX_LAG_BYTES,
            rollback_window: true,
            rollback: false,
        }
    }
}

/// The next thing to do for one database, from its observed state alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", content = "direction", rename_all = "snake_case")]
pub enum Action {
    CreateDatabase,
    CopySchema,
    ProtectTarget,
    /// After the switch the old server takes no client writes (the back stream's apply still
    /// writes).
    ProtectSource,
    CreateSourceMeta,
    CreatePublication,
    /// Tables created on the source during the upgrade, which its table-list publication
    /// lacks: their definitions are copied to the target first.
    CopyNewTables,
    /// Those tables, now on the target, join the source's table-list publication.
    PublishNewTables,
    /// The forward subscription takes on the tables its publication gained, with their rows.
    RefreshSubscription,
    CreateSlot,
    /// The forward subscription: an initial copy the first time; after a rollback without a
    /// copy, from the rollback's switch point. The back subscription: from the switch point.
    CreateSubscription(Direction),
    /// Before the forward switch: the target's publication and the slot of the back stream,
    /// made now (a slot waits for running transactions, up to seconds under load) so that a
    /// ready upgrade cuts over at once.
    PrepareWindow,
    /// A subscription made disabled (its origin not yet advanced to the switch point).
    EnableSubscription(Direction),
    /// The stream toward the server that no longer serves, before the other one starts.
    DropStream(Direction),
    WaitForCopy,
    /// After the initial copy: the indexes and constraints apply does not need, built in
    /// sorted passes instead of row by row during the copy.
    BuildIndexes,
    Analyze,
    /// Source serves, target in sync: ready for the forward switch.
    Synced,
    /// Target serves, no rollback window.
    Switched,
    /// Target serves, the back stream keeps the source current: a rollback is possible.
    WindowOpen,
    /// Cannot go on without a person (the message says what to do).
    Broken(String),
}

impl Action {
    /// Changes something (as opposed to waiting, being ready, or being broken).
    pub fn is_work(&self) -> bool {
        !matches!(
            self,
            Action::WaitForCopy
                | Action::Synced
                | Action::Switched
                | Action::WindowOpen
                | Action::Broken(_)
        )
    }

    /// Where a database that needs this stands.
    pub fn phase(&self) -> Phase {
        match self {
            Action::CreateDatabase | Action::CopySchema => Phase::Schema,
            Action::ProtectTarget
            | Action::CreateSourceMeta
            | Action::CreatePublication
            | Action::CopyNewTables
            | Action::PublishNewTables
            | Action::RefreshSubscription
            | Action::CreateSlot
            | Action::CreateSubscription(Direction::Forward)
            | Action::EnableSubscription(Direction::Forward)
            | Action::DropStream(Direction::Back)
            | Action::WaitForCopy
            | Action::BuildIndexes
            | Action::Broken(_) => Phase::Replicate,
            Action::Analyze | Action::PrepareWindow => Phase::CatchUp,
            Action::Synced => Phase::ReadyForCutover,
            // The switch's tail: the window opens.
            Action::ProtectSource
            | Action::CreateSubscription(Direction::Back)
            | Action::EnableSubscription(Direction::Back)
            | Action::DropStream(Direction::Forward) => Phase::Cutover,
            Action::WindowOpen => Phase::WindowOpen,
            Action::Switched => Phase::Done,
        }
    }
}

/// Decides what one database needs next under `policy`.
pub fn decide(db: &Database, policy: &Policy) -> Action {
    match db.serving() {
        Side::Target => after_switch(db, policy),
        _ => before_switch(db, policy),
    }
}

fn before_switch(db: &Database, policy: &Policy) -> Action {
    if !db.target_exists {
        return Action::CreateDatabase;
    }
    if !db.has(crate::names::step::SCHEMA) {
        return Action::CopySchema;
    }
    if !db.target_read_only {
        return Action::ProtectTarget;
    }
    if !db.source_meta {
        return Action::CreateSourceMeta;
    }
    // After a rollback: the back stream stops before the forward one starts again.
    if db.back.subscription.is_some() {
        return Action::DropStream(Direction::Back);
    }
    if !db.forward.publication {
        return Action::CreatePublication;
    }
    // A table-list publication is kept complete: a table created on the source since it was
    // made is copied to the target, published and subscribed with its rows.
    if db.unpublished.iter().any(|t| !t.on_target) {
        return Action::CopyNewTables;
    }
    if !db.unpublished.is_empty() {
        return Action::PublishNewTables;
    }
    match (&db.forward.slot, &db.forward.subscription) {
        (None, None) if db.forward_from.is_some() => Action::Broken(format!(
            "the replication slot {} that the forward stream was to resume from after the rollback \
             is missing on the source; run `pgshift abort` and start again",
            db.subscription_name()
        )),
        (None, None) => Action::CreateSlot,
        (Some(_), None) => Action::CreateSubscription(Direction::Forward),
        (None, Some(_)) => Action::Broken(format!(
            "subscription {} exists on the target but its replication slot is missing on the source; \
             run `pgshift abort` and start again",
            db.subscription_name()
        )),
        (Some(_), Some(sub)) if !sub.enabled && db.forward_from.is_some() => {
            Action::EnableSubscription(Direction::Forward)
        }
        (Some(_), Some(_)) if !db.unsubscribed.is_empty() => Action::RefreshSubscription,
        (Some(_), Some(sub)) if sub.tables_total == 0 || sub.tables_ready < sub.tables_total => {
            Action::WaitForCopy
        }
        (Some(_), Some(_)) if db.definitions_only && !db.has(crate::names::step::POST_DATA) => {
            Action::BuildIndexes
        }
        (Some(_), Some(_)) if !db.has(crate::names::step::ANALYZED) => Action::Analyze,
        _ if policy.rollback_window && (!db.back.publication || db.back.slot.is_none()) => {
            Action::PrepareWindow
        }
        _ => Action::Synced,
    }
}

fn after_switch(db: &Database, policy: &Policy) -> Action {
    // Finished long ago: what the user did to the old server since is theirs.
    if db.cleaned_up {
        return Action::Switched;
    }
    if !db.source_read_only {
        return Action::ProtectSource;
    }
    match (&db.back.slot, &db.back.subscription) {
        // Switched without a window (or the window was never prepared).
        (None, None) => Action::Switched,
        (None, Some(_)) => Action::Broken(
            "the rollback window's subscription exists on the source but its slot on the target is \
             missing: the source cannot be kept current. Run `pgshift cleanup` to end the window"
                .into(),
        ),
        _ if db.forward.subscription.is_some() => Action::DropStream(Direction::Forward),
        (Some(_), None) => Action::CreateSubscription(Direction::Back),
        (Some(_), Some(sub)) if !sub.enabled => Action::EnableSubscription(Direction::Back),
        // Before a rollback: the forward stream's slot, from which it resumes after it.
        (Some(_), Some(_)) if policy.rollback && db.forward.slot.is_none() => Action::CreateSlot,
        (Some(_), Some(_)) => Action::WindowOpen,
    }
}

/// The next thing to do for the whole upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "next", rename_all = "snake_case")]
pub enum Next {
    /// One database needs a step that changes something.
    Act { database: String, action: Action },
    /// One database cannot go on without a person.
    Broken { database: String, why: String },
    /// The initial copy runs.
    WaitForCopy,
    /// The stream that the next switch ends is too far behind.
    CatchUp {
        direction: Direction,
        lag_bytes: i64,
    },
    /// In sync; manual mode waits for `pgshift cutover` (or approval).
    ReadyForCutover,
    /// Switch now, in this direction.
    Cutover(Direction),
    /// Target serves; the back stream keeps the source current until cleanup.
    WindowOpen,
    /// Target serves; nothing left but cleanup.
    Done,
    /// A rollback was asked for and is done: the source serves, the target follows it again.
    RolledBack,
    /// A rollback was asked for but is impossible now (the message says why).
    CannotRollBack { why: String, phase: Phase },
}

impl Next {
    pub fn phase(&self) -> Phase {
        match self {
            Next::Act { action, .. } => action.phase(),
            Next::Broken { .. } | Next::WaitForCopy => Phase::Replicate,
            Next::CatchUp { .. } => Phase::CatchUp,
            Next::ReadyForCutover | Next::RolledBack => Phase::ReadyForCutover,
            Next::Cutover(_) => Phase::Cutover,
            Next::WindowOpen => Phase::WindowOpen,
            Next::Done => Phase::Done,
            Next::CannotRollBack { phase, .. } => *phase,
        }
    }
}

/// Decides for the whole upgrade: the first database's work comes first; a switch happens for
/// all databases at once, when all of them are ready for it.
pub fn next(databases: &[(Database, Action)], policy: &Policy) -> Next {
    if let Some((db, Action::Broken(why))) = databases
        .iter()
        .find(|(_, a)| matches!(a, Action::Broken(_)))
    {
        return Next::Broken {
            database: db.name.clone(),
            why: why.clone(),
        };
    }
    if let Some((db, action)) = databases.iter().find(|(_, a)| a.is_work()) {
        return Next::Act {
            database: db.name.clone(),
            action: action.clone(),
        };
    }
    if databases.iter().any(|(_, a)| *a == Action::WaitForCopy) {
        return Next::WaitForCopy;
    }
    let all = |wanted: &[Action]| databases.iter().all(|(_, a)| wanted.contains(a));
    let lag = |direction: Direction| {
        databases
            .iter()
            .filter_map(|(db, _)| db.stream(direction).slot.as_ref())
            .map(|s| s.lag_bytes)
            .max()
            .unwrap_or(0)
    };
    if all(&[Action::Synced]) {
        if policy.rollback && databases.iter().all(|(db, _)| db.forward_from.is_some()) {
            return Next::RolledBack;
        }
        if policy.rollback {
            return Next::CannotRollBack {
                why: "the source serves the clients: there is nothing to roll back".into(),
                phase: Phase::ReadyForCutover,
            };
        }
        let lag_bytes = lag(Direction::Forward);
        if lag_bytes > policy.max_lag_bytes {
            return Next::CatchUp {
                direction: Direction::Forward,
                lag_bytes,
            };
        }
        return match policy.cutover {
            CutoverMode::Manual => Next::ReadyForCutover,
            CutoverMode::Automatic => Next::Cutover(Direction::Forward),
        };
    }
    if all(&[Action::WindowOpen]) {
        if !policy.rollback {
            return Next::WindowOpen;
        }
        let lag_bytes = lag(Direction::Back);
        if lag_bytes > policy.max_lag_bytes {
            return Next::CatchUp {
                direction: Direction::Back,
                lag_bytes,
            };
        }
        return Next::Cutover(Direction::Back);
    }
    if all(&[Action::Switched, Action::WindowOpen]) {
        if policy.rollback {
            let closed = databases
                .iter()
                .find(|(_, a)| *a == Action::Switched)
                .map(|(db, _)| db.name.clone())
                .unwrap_or_default();
            return Next::CannotRollBack {
                why: format!(
                    "database {closed} has no rollback window (it was switched with --no-rollback-window, \
                     or cleanup ended the window): the source is not current, going back would lose writes"
                ),
                phase: Phase::Done,
            };
        }
        return Next::Done;
    }
    // Some databases serve from the target and others from the source: a switch was cut
    // short. `recover` (run at the start of every command) finishes or undoes it.
    let (db, _) = databases
        .iter()
        .find(|(_, a)| *a == Action::Synced)
        .unwrap_or(&databases[0]);
    Next::Broken {
        database: db.name.clone(),
        why: "some databases were switched and others not; run pgshift again, which completes the interrupted switch".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::step;
    use crate::observe::{Slot, Stream, Subscription};

    fn copied(ready: i64) -> Subscription {
        Subscription {
            enabled: true,
            tables_total: 3,
            tables_ready: ready,
            ..Default::default()
        }
    }

    fn slot(lag_bytes: i64) -> Option<Slot> {
        Some(Slot {
            active: true,
            lag_bytes,
        })
    }

    fn new_table(on_target: bool) -> crate::observe::NewTable {
        crate::observe::NewTable {
            schema: "public".into(),
            name: "late".into(),
            on_target,
        }
    }

    /// The source serves, the target is in sync.
    fn synced() -> Database {
        Database {
            name: "app".into(),
            source_oid: 16384,
            target_exists: true,
            steps: vec![step::SCHEMA.into(), step::ANALYZED.into()],
            source_meta: true,
            target_read_only: true,
            forward: Stream {
                publication: true,
                slot: slot(0),
                subscription: Some(copied(3)),
            },
            // The window prepared: the target's publication and the back stream's slot.
            back: Stream {
                publication: true,
                slot: slot(0),
                subscription: None,
            },
            ..Default::default()
        }
    }

    /// The target serves; the window is open.
    fn window_open() -> Database {
        let mut db = synced();
        db.steps.push(step::SWITCHED.into());
        db.switched_at = Some("2026-12-01T10:00:00Z".into());
        db.back_from = Some("0/3000060".into());
        db.target_read_only = false;
        db.source_read_only = true;
        db.forward = Stream {
            publication: true,
            slot: None,
            subscription: None,
        };
        db.back = Stream {
            publication: true,
            slot: slot(0),
            subscription: Some(copied(3)),
        };
        db
    }

    /// A rollback switched back: the back stream still runs, the forward one resumes from the
    /// rollback's point through the slot made before its fence.
    fn rolled_back() -> Database {
        let mut db = window_open();
        db.steps.retain(|s| s != step::SWITCHED);
        db.switched_at = None;
        db.forward_from = Some("0/5000028".into());
        db.forward.slot = slot(0);
        db.source_read_only = false;
        db.target_read_only = true;
        db
    }

    #[test]
    fn every_state_of_one_database_has_its_next_step_forward_and_back() {
        type Change = fn(&mut Database);
        type Row = (&'static str, fn() -> Database, Change, Action);
        let table: Vec<Row> = vec![
            ("fresh", Database::default, |_| {}, Action::CreateDatabase),
            ("no schema", synced, |d| d.steps.clear(), Action::CopySchema),
            (
                "target writable",
                synced,
                |d| d.target_read_only = false,
                Action::ProtectTarget,
            ),
            (
                "no marker table",
                synced,
                |d| d.source_meta = false,
                Action::CreateSourceMeta,
            ),
            (
                "no publication",
                synced,
                |d| d.forward.publication = false,
                Action::CreatePublication,
            ),
            (
                "a table created on the source, not yet on the target",
                synced,
                |d| d.unpublished = vec![new_table(false), new_table(true)],
                Action::CopyNewTables,
            ),
            (
                "a new table on the target, not yet published",
                synced,
                |d| d.unpublished = vec![new_table(true)],
                Action::PublishNewTables,
            ),
            (
                "a published table the subscription has not taken on",
                synced,
                |d| d.unsubscribed = vec!["public.late".into()],
                Action::RefreshSubscription,
            ),
            (
                "no slot",
                synced,
                |d| {
                    d.forward = Stream {
                        publication: true,
                        ..Default::default()
                    }
                },
                Action::CreateSlot,
            ),
            (
                "no subscription",
                synced,
                |d| d.forward.subscription = None,
                Action::CreateSubscription(Direction::Forward),
            ),
            (
                "slot lost",
                synced,
                |d| d.forward.slot = None,
                Action::Broken(String::new()),
            ),
            (
                "copying",
                synced,
                |d| d.forward.subscription = Some(copied(1)),
                Action::WaitForCopy,
            ),
            (
                "copied bare tables",
                synced,
                |d| {
                    d.definitions_only = true;
                    d.steps.retain(|s| s != step::ANALYZED);
                },
                Action::BuildIndexes,
            ),
            (
                "copying bare tables",
                synced,
                |d| {
                    d.definitions_only = true;
                    d.forward.subscription = Some(copied(1));
                },
                Action::WaitForCopy,
            ),
            (
                "indexes built",
                synced,
                |d| {
                    d.definitions_only = true;
                    d.steps = vec![step::SCHEMA.into(), step::POST_DATA.into()];
                },
                Action::Analyze,
            ),
            (
                "not analyzed",
                synced,
                |d| d.steps.retain(|s| s != step::ANALYZED),
                Action::Analyze,
            ),
            (
                "window not prepared",
                synced,
                |d| d.back.slot = None,
                Action::PrepareWindow,
            ),
            ("in sync", synced, |_| {}, Action::Synced),
            (
                "switched, source writable",
                window_open,
                |d| d.source_read_only = false,
                Action::ProtectSource,
            ),
            (
                "switched, forward still there",
                window_open,
                |d| {
                    d.forward.subscription = Some(copied(3));
                    d.forward.slot = slot(0);
                },
                Action::DropStream(Direction::Forward),
            ),
            (
                "switched, back not subscribed",
                window_open,
                |d| d.back.subscription = None,
                Action::CreateSubscription(Direction::Back),
            ),
            (
                "switched, back disabled",
                window_open,
                |d| d.back.subscription.as_mut().unwrap().enabled = false,
                Action::EnableSubscription(Direction::Back),
            ),
            ("window open", window_open, |_| {}, Action::WindowOpen),
            (
                "window open, forward slot made for a rollback",
                window_open,
                |d| d.forward.slot = slot(0),
                Action::WindowOpen,
            ),
            (
                "back slot lost",
                window_open,
                |d| d.back.slot = None,
                Action::Broken(String::new()),
            ),
            (
                "switched without a window",
                window_open,
                |d| d.back = Stream::default(),
                Action::Switched,
            ),
            (
                "cleaned up",
                window_open,
                |d| {
                    d.cleaned_up = true;
                    d.steps.clear();
                    d.back = Stream::default();
                },
                Action::Switched,
            ),
            (
                "rolled back, target still writable",
                rolled_back,
                |d| d.target_read_only = false,
                Action::ProtectTarget,
            ),
            (
                "rolled back, back stream still there",
                rolled_back,
                |_| {},
                Action::DropStream(Direction::Back),
            ),
            (
                "rolled back, forward not subscribed",
                rolled_back,
                |d| {
                    d.back = Stream {
                        publication: true,
                        slot: slot(0),
                        subscription: None,
                    }
                },
                Action::CreateSubscription(Direction::Forward),
            ),
            (
                "rolled back, forward disabled",
                rolled_back,
                |d| {
                    d.back.subscription = None;
                    d.forward.subscription = Some(Subscription {
                        enabled: false,
                        ..copied(3)
                    });
                },
                Action::EnableSubscription(Direction::Forward),
            ),
            (
                "rolled back, forward running",
                rolled_back,
                |d| {
                    d.back.subscription = None;
                    d.forward.subscription = Some(copied(3));
                },
                Action::Synced,
            ),
            (
                "rolled back, the forward slot lost",
                rolled_back,
                |d| {
                    d.back.subscription = None;
                    d.forward.slot = None;
                },
                Action::Broken(String::new()),
            ),
        ];
        let policy = Policy::forward();
        for (name, start, change, expected) in table {
            let mut db = start();
            change(&mut db);
            let action = decide(&db, &policy);
            match expected {
                Action::Broken(_) => {
                    assert!(matches!(action, Action::Broken(_)), "{name}: {action:?}")
                }
                expected => assert_eq!(action, expected, "{name}"),
            }
        }
    }

    fn next_of(dbs: &[Database], policy: &Policy) -> Next {
        let decided: Vec<(Database, Action)> = dbs
            .iter()
            .map(|db| (db.clone(), decide(db, policy)))
            .collect();
        next(&decided, policy)
    }

    #[test]
    fn the_whole_upgrade_moves_forward_and_back_on_one_decision() {
        let auto = Policy::forward();
        let manual = Policy {
            cutover: CutoverMode::Manual,
            ..auto.clone()
        };
        let back = Policy {
            rollback: true,
            ..auto.clone()
        };
        let mut lagging = synced();
        lagging.forward.slot = slot(Policy::DEFAULT_MAX_LAG_BYTES + 1);
        // Ready to go back: the forward stream's slot is made.
        let rollback_ready = || {
            let mut db = window_open();
            db.forward.slot = slot(0);
            db
        };
        let mut back_lagging = rollback_ready();
        back_lagging.back.slot = slot(Policy::DEFAULT_MAX_LAG_BYTES + 1);
        let mut copying = synced();
        copying.forward.subscription = Some(copied(0));
        let no_window = {
            let mut db = window_open();
            db.back = Stream::default();
            db
        };
        let table: Vec<(&str, Vec<Database>, &Policy, Next, Phase)> = vec![
            (
                "fresh",
                vec![Database {
                    name: "app".into(),
                    ..Default::default()
                }],
                &auto,
                Next::Act {
                    database: "app".into(),
                    action: Action::CreateDatabase,
                },
                Phase::Schema,
            ),
            (
                "copying",
                vec![copying.clone(), synced()],
                &auto,
                Next::WaitForCopy,
                Phase::Replicate,
            ),
            (
                "lagging",
                vec![lagging],
                &auto,
                Next::CatchUp {
                    direction: Direction::Forward,
                    lag_bytes: Policy::DEFAULT_MAX_LAG_BYTES + 1,
                },
                Phase::CatchUp,
            ),
            (
                "in sync, manual",
                vec![synced()],
                &manual,
                Next::ReadyForCutover,
                Phase::ReadyForCutover,
            ),
            (
                "in sync, automatic",
                vec![synced(), synced()],
                &auto,
                Next::Cutover(Direction::Forward),
                Phase::Cutover,
            ),
            (
                "window open",
                vec![window_open()],
                &auto,
                Next::WindowOpen,
                Phase::WindowOpen,
            ),
            (
                "rollback asked, back lagging",
                vec![back_lagging],
                &back,
                Next::CatchUp {
                    direction: Direction::Back,
                    lag_bytes: Policy::DEFAULT_MAX_LAG_BYTES + 1,
                },
                Phase::CatchUp,
            ),
            (
                "rollback asked, no forward slot yet",
                vec![window_open()],
                &back,
                Next::Act {
                    database: "app".into(),
                    action: Action::CreateSlot,
                },
                Phase::Replicate,
            ),
            (
                "rollback asked",
                vec![rollback_ready(), rollback_ready()],
                &back,
                Next::Cutover(Direction::Back),
                Phase::Cutover,
            ),
            (
                "switched without a window",
                vec![no_window.clone()],
                &auto,
                Next::Done,
                Phase::Done,
            ),
            (
                "rollback without a window",
                vec![no_window],
                &back,
                Next::CannotRollBack {
                    why: String::new(),
                    phase: Phase::Done,
                },
                Phase::Done,
            ),
            (
                "rollback before any switch",
                vec![synced()],
                &back,
                Next::CannotRollBack {
                    why: String::new(),
                    phase: Phase::ReadyForCutover,
                },
                Phase::ReadyForCutover,
            ),
            (
                "after a rollback, the forward stream resumes",
                vec![rolled_back()],
                &auto,
                Next::Act {
                    database: "app".into(),
                    action: Action::DropStream(Direction::Back),
                },
                Phase::Replicate,
            ),
            (
                "a switch cut short",
                vec![window_open(), synced()],
                &auto,
                Next::Broken {
                    database: String::new(),
                    why: String::new(),
                },
                Phase::Replicate,
            ),
        ];
        for (name, dbs, policy, expected, phase) in table {
            let decided = next_of(&dbs, policy);
            match (&expected, &decided) {
                (
                    Next::CannotRollBack { phase: want, .. },
                    Next::CannotRollBack { phase: got, .. },
                ) => {
                    assert_eq!(want, got, "{name}")
                }
                (Next::Broken { .. }, Next::Broken { .. }) => {}
                _ => assert_eq!(decided, expected, "{name}"),
            }
            assert_eq!(decided.phase(), phase, "{name}");
        }
    }
}
