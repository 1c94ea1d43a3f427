//! The short chaos drill of the test suite: the whole system as processes, two of each worker,
//! random SIGKILLs every second, nats-server SIGKILLed and kept down, and every command service
//! taken away for longer than the saga's step timeout (5 s). Every invariant must hold.

use std::process::Command;

use serde_json::Value;

#[test]
fn a_short_drill_with_kills_a_server_restart_and_a_command_outage_breaks_no_invariant() {
    let dir = tempfile::tempdir().unwrap();
    let report_file = dir.path().join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_ordo"))
        .args([
            "chaos",
            "--duration",
            "30",
            "--kill-interval",
            "1",
            "--nats-restarts",
            "1",
            "--nats-down",
            "4",
            "--outage",
            "commands:8",
            "--clients",
            "8",
            "--seed",
            "20261127",
            "--settle-timeout",
            "120",
            "--report",
        ])
        .arg(&report_file)
        .arg("--logs")
        .arg(dir.path().join("logs"))
        .env_remove("ORDO_NATS_URL")
        .env_remove("ORDO_DATABASE_URL")
        .output()
        .expect("run ordo chaos");
    let printed = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_slice(&std::fs::read(&report_file).unwrap_or_default())
        .unwrap_or_else(|err| {
            panic!(
                "no report ({err}); stdout:\n{printed}\nstderr:\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    assert!(output.status.success(), "the drill failed:\n{printed}");
    assert_eq!(report["violations"], Value::Array(vec![]), "{printed}");
    assert_eq!(report["passed"], true);
    assert_eq!(report["settled"], true, "{printed}");
    // The drill did what it says: faults happened and load got through.
    let kills: u64 = report["kills"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert!(kills >= 10, "{printed}");
    assert_eq!(report["nats_restarts"], 1);
    assert!(
        report["commands"]["acknowledged"].as_u64().unwrap() > 500,
        "{printed}"
    );
    assert!(
        report["orders"]["confirmed"].as_u64().unwrap_or(0) > 0,
        "{printed}"
    );
    // Clients had to retry: the server restart and the command outage were felt.
    assert!(
        report["commands"]["retries"].as_u64().unwrap() > 0,
        "{printed}"
    );
}
