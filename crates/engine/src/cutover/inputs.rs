//! What a switch works on, made explicit: the server clients leave (`from`), the one they go to
//! (`to`), where the records live, and how traffic moves. A forward cutover and a rollback are
//! the same code with `from` and `to` swapped.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::decide::Direction;
use crate::endpoint::Endpoint;
use crate::error::{Error, Side};
use crate::events::{Event, EventSink};
use crate::pgbouncer::BlockingSession;
use crate::plan::Traffic;

use super::StepTiming;

/// One server as a switch sees it.
pub(crate) struct Server<'a> {
    pub side: Side,
    pub endpoint: &'a Endpoint,
    /// A session outside the moved databases (ALTER DATABASE, pg_terminate_backend).
    pub admin: &'a Client,
    /// A session in each moved database, in the order of `Switch::databases`.
    pub databases: Vec<&'a Client>,
    /// pgshift's own sessions on this server, which direct mode's fence does not end.
    pub own_pids: Vec<i32>,
}

/// Everything one switch (or one recovery of it) needs.
pub(crate) struct Switch<'a> {
    pub direction: Direction,
    pub databases: &'a [String],
    pub from: Server<'a>,
    pub to: Server<'a>,
    /// A session in each target database: pgshift's records live there, in both directions.
    pub records: Vec<&'a Client>,
    pub traffic: &'a Traffic,
    pub budget: Duration,
    pub events: &'a EventSink,
}

impl Switch<'_> {
    pub fn emit(&self, event: Event) {
        (self.events)(event);
    }
}

/// The budget of one attempt, and the time each step took.
pub(crate) struct Clock<'a> {
    started: Instant,
    last: Instant,
    budget: Duration,
    pub steps: Vec<StepTiming>,
    events: Option<&'a EventSink>,
}

impl<'a> Clock<'a> {
    /// A clock that reports each step's time as an event.
    pub fn new(budget: Duration, events: Option<&'a EventSink>) -> Clock<'a> {
        Clock {
            started: Instant::now(),
            last: Instant::now(),
            budget,
            steps: Vec::new(),
            events,
        }
    }
    pub fn lap(&mut self, step: &'static str) {
        let now = Instant::now();
        let ms = now.duration_since(self.last).as_secs_f64() * 1e3;
        self.last = now;
        self.steps.push(StepTiming { step, ms });
        if let Some(events) = self.events {
            events(Event::CutoverStep {
                step: step.to_string(),
                ms,
            });
        }
    }
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
    pub fn elapsed_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1e3
    }
    pub fn remaining(&self) -> Duration {
        self.budget.saturating_sub(self.started.elapsed())
    }
    pub fn over(&self, step: &str) -> Error {
        self.held_up(step, Vec::new())
    }
    /// Over the budget while clients' transactions held the step up.
    pub fn held_up(&self, step: &str, blocking: Vec<BlockingSession>) -> Error {
        Error::CutoverAborted {
            step: step.to_string(),
            elapsed: self.started.elapsed(),
            budget: self.budget,
            blocking,
        }
    }
}
