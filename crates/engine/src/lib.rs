//! pgshift's upgrade engine: moves a live PostgreSQL database to a new major version over
//! logical replication, with a cutover that pauses writes for milliseconds and loses nothing.
//!
//! The engine knows nothing of Kubernetes. Decisions (`decide::next`, `preflight::evaluate`)
//! are pure; everything else talks to real servers.

mod act;
pub mod cleanup;
pub mod cutover;
pub mod decide;
mod drive;
pub mod endpoint;
pub mod error;
pub mod events;
pub mod guard;
pub mod lock;
pub mod names;
pub mod observe;
pub mod pgbouncer;
pub mod plan;
pub mod pooler_facts;
pub mod preflight;
pub mod privilege;
pub mod schema;
pub mod session;
pub mod sql;
pub mod stall;
mod streams;
pub mod tls;
pub mod toc;
pub mod upgrade;
pub mod verify;

pub use endpoint::{Endpoint, PasswordSources, Secret};
pub use error::{Error, Result, Side};
pub use events::{Event, EventSink, Phase};
pub use plan::{CutoverMode, Databases, Plan, Routed, Router, Traffic};
pub use upgrade::{Advance, Outcome, Upgrade};
