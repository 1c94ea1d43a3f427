//! The benchmark's smoke mode: every scenario runs, end to end, at tiny sizes. It asserts no
//! figure (figures belong in the report, never in a test), only that each scenario ran and
//! reported.

#[test]
fn every_scenario_runs_and_is_reported() {
    let reports = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ordo-bench"))
        .args(["--smoke", "--report-dir"])
        .arg(reports.path())
        .output()
        .expect("run ordo-bench");
    assert!(
        output.status.success(),
        "ordo-bench --smoke failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = std::fs::read_to_string(reports.path().join("latest.md")).unwrap();
    for scenario in [
        "raw JetStream publish + ack",
        "place-order, 16 clients",
        "reserve, one hot SKU",
        "A SKU with a long history",
        "A SKU that served many orders",
        "place (burst)",
        "placed → settled",
        "GET /orders/{id}",
        "rebuild speed against the baseline",
        "Reads while the orders view is rebuilt",
        "during the rebuild",
        "open loop, 50 orders/s",
        "## Targets",
    ] {
        assert!(
            report.contains(scenario),
            "{scenario} missing from:\n{report}"
        );
    }
    let plot = std::fs::read_to_string(reports.path().join("latency.svg")).unwrap();
    assert!(plot.starts_with("<svg"));
}
