//! pgshift's upgrade engine: moves a live PostgreSQL database to a new major version over
//! logical replication, with a cutover that pauses writes for milliseconds and loses nothing.
//!
//! The engine knows nothing of Kubernetes. Decisions (`observe::decide`, `preflight::evaluate`)
//! are pure; everything else talks to real servers.

pub mod cleanup;
pub mod cutover;
pub mod endpoint;
pub mod error;
pub mod events;
pub mod names;
pub mod observe;
pub mod pgbouncer;
pub mod plan;
pub mod preflight;
pub mod schema;
pub mod session;
pub mod sql;
pub mod stall;
pub mod upgrade;

pub use endpoint::{Endpoint, PasswordSources, Secret};
pub use error::{Error, Result, Side};
pub use events::{Event, EventSink, Phase};
pub use plan::{CutoverMode, Databases, Plan, Routed, Router, Traffic};
pub use upgrade::{Advance, Outcome, Upgrade};
