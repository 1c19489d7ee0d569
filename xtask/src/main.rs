//! `cargo xtask setup|test|demo|bench`: install what pgshift's demo, tests and benchmarks need (idempotently,
//! cached outside the repository), then run them.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const USAGE: &str =
    "usage: cargo xtask <setup | test [cargo test args] | demo [-- pgshift demo args] | bench [bench args]>

  setup   install PostgreSQL 10-18, PgBouncer and the Kubernetes test binaries into the cache (idempotent)
  test    setup, then run the whole test suite
  demo    setup, then run `pgshift demo` (a live upgrade on local servers)
  bench   setup, then compare upgrade methods under load (`--quick` for a few minutes; `--help`)";

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    let task = args.remove(0);
    if args.first().map(String::as_str) == Some("--") {
        args.remove(0);
    }
    let result = match task.as_str() {
        "setup" => setup().map(|_| ()),
        "test" => setup().and_then(|cache| test(&cache, &args)),
        "demo" => setup_without_kube().and_then(|cache| demo(&cache, &args)),
        "bench" => setup_without_kube().and_then(|cache| bench(&cache, &args)),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown task {other:?}\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The checkout `cargo xtask` was run in. Cargo sets CARGO_MANIFEST_DIR for the process it
/// runs; the path compiled in is only the fallback, because a target directory shared by two
/// checkouts can hold an xtask built in the other one, which would then test that one.
fn workspace_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Installs everything, the Kubernetes binaries for the operator's tests included.
fn setup() -> Result<PathBuf, String> {
    run_setup(false)
}

/// The demo needs PostgreSQL and PgBouncer only.
fn setup_without_kube() -> Result<PathBuf, String> {
    run_setup(true)
}

/// Runs tools/setup.sh; returns the cache directory it printed last.
fn run_setup(skip_kube: bool) -> Result<PathBuf, String> {
    let script = workspace_root().join("tools/setup.sh");
    let output = Command::new("bash")
        .arg(&script)
        .env("PGSHIFT_SKIP_KUBE", if skip_kube { "1" } else { "0" })
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !output.status.success() {
        return Err(format!("{} failed ({})", script.display(), output.status));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let cache = stdout
        .lines()
        .last()
        .ok_or("setup.sh printed no cache directory")?;
    Ok(PathBuf::from(cache.trim()))
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

fn run(mut command: Command) -> Result<(), String> {
    let status = command
        .status()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command:?} failed ({status})"))
    }
}

fn test(cache: &Path, args: &[String]) -> Result<(), String> {
    let mut command = cargo();
    command
        .args(["test", "--workspace", "--exclude", "xtask"])
        .args(args)
        .env("PGSHIFT_CACHE", cache);
    run(command)
}

fn demo(cache: &Path, args: &[String]) -> Result<(), String> {
    run_release(cache, "pgshift", &["demo"], args)
}

fn bench(cache: &Path, args: &[String]) -> Result<(), String> {
    run_release(cache, "pgshift-bench", &[], args)
}

/// `cargo run --release` of a workspace binary with the cache it needs: timings are measured
/// on optimized code.
fn run_release(
    cache: &Path,
    package: &str,
    leading: &[&str],
    args: &[String],
) -> Result<(), String> {
    let mut command = cargo();
    command
        .args(["run", "--quiet", "--release", "--package", package, "--"])
        .args(leading)
        .args(args)
        .env("PGSHIFT_CACHE", cache);
    run(command)
}
