//! `pgshift demo --json` prints exactly one JSON object with the figures the issue names, and
//! the run it reports lost and failed nothing.

use std::process::Command;

#[test]
fn demo_json_reports_a_clean_upgrade() {
    pgshift_lab::testing::require_binaries();
    let output = Command::new(env!("CARGO_BIN_EXE_pgshift"))
        .args([
            "demo",
            "--json",
            "--duration",
            "1s",
            "--scale",
            "2",
            "--clients",
            "4",
        ])
        .output()
        .expect("pgshift runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed:\n{stderr}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        stdout.trim().lines().count(),
        1,
        "exactly one JSON object: {stdout}"
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();

    assert!(report["source_version"]
        .as_str()
        .unwrap()
        .starts_with("15."));
    assert!(report["target_version"]
        .as_str()
        .unwrap()
        .starts_with("18."));
    let phases: Vec<&str> = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        [
            "preflight",
            "schema",
            "replicate",
            "catch_up",
            "cutover",
            "window_open"
        ]
    );
    assert!(report["phases"][0]["ms"].is_number());
    let cutover = &report["cutover"];
    assert!(cutover["write_pause_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(cutover["aborted"], false);
    assert_eq!(cutover["sequences_synced"], 2, "history and ledger_entries");
    let workload = &report["workload"];
    assert!(workload["committed"].as_u64().unwrap() > 0);
    assert_eq!(workload["failed"], 0);
    assert_eq!(workload["lost"], 0);
    assert!(workload["p99_latency_ms"].is_number() && workload["max_latency_ms"].is_number());
    assert!(report["verification"]["tables"].as_u64().unwrap() >= 5);
    assert_eq!(report["verification"]["mismatched"], 0);
}
