//! `vmmu bench --json` runs every DESIGN §6 benchmark and reports each with a positive,
//! finite time per operation. No timing thresholds: this checks the harness, not the machine.

use std::process::Command;

const NAMES: &[&str] = &[
    "access, TLB hit",
    "simulation speed, TLB-friendly workload",
    "access, TLB miss (2D walk, 4-level x 4-level)",
    "fast page fault (write-protect fix), end to end",
    "first-touch TDP fault, host memory populated",
    "first-touch TDP fault, host allocates",
    "host frame allocation, fresh 4 KiB frame (amortized)",
    "host frame allocation, 2 MiB chunk populate",
    "TDP fault throughput, 1 vCPU thread",
    "TDP fault throughput, 2 vCPU threads",
    "TDP fault throughput, 2 threads vs 1",
    "memory overhead per touched 4 KiB page, 4 KiB backing",
    "memory overhead per touched 4 KiB page, THP backing",
    "enable dirty logging (write-protect the slot)",
    "enable dirty logging with eager split (THP)",
    "KVM_GET_DIRTY_LOG, per dirty page",
    "enable dirty logging (PML: clear D bits)",
    "enable dirty logging with eager split (THP, PML)",
    "KVM_GET_DIRTY_LOG, per dirty page (PML)",
    "aging pass (clear_young), A/D bits",
    "aging pass (clear_young), access tracking",
    "shadow fault end to end (first touch)",
    "shadow: guest PTE write through write tracking",
    "shadow: CR3 switch to a cached root (+1 access)",
];

#[test]
fn bench_json_has_every_benchmark() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmmu"))
        .args(["bench", "--iters", "2000", "--json"])
        .output()
        .expect("run vmmu bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "vmmu bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let results = v.as_array().expect("a JSON array");
    for name in NAMES {
        let r = results
            .iter()
            .find(|r| r["name"] == *name)
            .unwrap_or_else(|| panic!("benchmark `{name}` missing from {stdout}"));
        let ns = r["ns_per_op"].as_f64().unwrap_or_else(|| panic!("`{name}`: ns_per_op is not a number: {r}"));
        assert!(ns.is_finite() && ns > 0.0, "`{name}`: ns_per_op {ns}");
        assert!(r["ops"].as_u64().is_some_and(|n| n > 0), "`{name}`: ops {r}");
        let value = r["value"].as_f64().unwrap_or_else(|| panic!("`{name}`: value is not a number: {r}"));
        assert!(value.is_finite() && value >= 0.0, "`{name}`: value {value}");
        assert!(r["unit"].is_string(), "`{name}`: unit {r}");
    }
    assert_eq!(results.len(), NAMES.len(), "unexpected benchmarks in {stdout}");
}
