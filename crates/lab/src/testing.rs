//! Helpers for tests that need the real binaries (this crate's, the engine's, the CLI's).
//!
//! These panic on purpose: a test without its binaries must fail, not skip.

use crate::binaries::Binaries;

/// The message a test fails with when the binaries are missing.
pub const MISSING_BINARIES: &str =
    "PostgreSQL binaries not found: run `cargo xtask test` (it installs them)";

/// The majors the lab supports and tests cover.
pub const MAJORS: std::ops::RangeInclusive<u32> = 10..=18;

/// The binary cache with every supported major and PgBouncer present; panics with
/// [`MISSING_BINARIES`] (and the cause) otherwise.
#[track_caller]
pub fn require_binaries() -> Binaries {
    let binaries = match Binaries::locate() {
        Ok(binaries) => binaries,
        Err(e) => panic!("{MISSING_BINARIES} ({e})"),
    };
    for major in MAJORS {
        if let Err(e) = binaries.bin_dir(major) {
            panic!("{MISSING_BINARIES} ({e})");
        }
    }
    if let Err(e) = binaries.pgbouncer() {
        panic!("{MISSING_BINARIES} ({e})");
    }
    binaries
}
