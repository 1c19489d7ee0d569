//! The fence guard: a process of pgshift's own binary that outlives the pgshift process which
//! raises a fence, so that clients are released even if that process is killed (SIGKILL, OOM,
//! panic) or hangs inside the cutover.
//!
//! The worker starts it before the fence (`handle`), hands it the plan and its own server
//! sessions over a pipe (never the command line or the environment: the plan holds passwords),
//! and waits until the guard has connected to everything and taken the fence lock. It then arms
//! the guard, raises the fence, and tells the guard when clients are released. If the pipe
//! closes while the guard is armed (the worker died), or the worker overruns `max_pause` by
//! [`GRACE`], the guard (`watch`) ends the worker and its server sessions, and then does what
//! any later pgshift would: completes the switch if it was recorded, otherwise lifts the fence
//! on the source (`cutover::recover`). See docs/architecture.md, "The fence guard".

mod handle;
mod watch;
mod wire;

use std::time::Duration;

pub(crate) use handle::GuardHandle;
pub use watch::serve;

/// The hidden subcommand of pgshift's binary that runs the guard.
pub const SUBCOMMAND: &str = "__fence-guard";

/// How long past `max_pause` the guard lets a worker run before it ends it and releases the
/// clients itself: the switch after the budget takes a few milliseconds.
pub const GRACE: Duration = Duration::from_secs(1);
