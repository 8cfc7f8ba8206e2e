//! The VM-level scenario settings and ops: `vm.nr_mmu_pages` / `set-nr-mmu-pages`
//! (KVM_SET_NR_MMU_PAGES, shadow pages recycled past the limit) and the dirty-logging ops
//! (`dirty-log-start`, `dirty-log-stop`, `dirty-log-harvest`, with and without manual
//! protection), through the command and through the runner.

use std::path::{Path, PathBuf};
use std::process::Command;
use vmmu_cli::runner::{run, RunOptions, RunResult};
use vmmu_cli::scenario::Scenario;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn vmmu(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmmu")).args(args).current_dir(root()).output().expect("run vmmu");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn scenario_text(name: &str) -> String {
    std::fs::read_to_string(root().join("scenarios").join(name)).expect("shipped scenario")
}

fn run_as(text: &str, mmu: &str) -> RunResult {
    let s = Scenario::parse(text).unwrap_or_else(|e| panic!("{e}"));
    run(&s, &RunOptions { mmu: Some(mmu.into()), ..Default::default() }, |_, _| {}).unwrap_or_else(|e| panic!("{e}"))
}

/// Writes `text` to a scenario file of its own and runs `vmmu run` on it.
fn run_file(tag: &str, text: &str) -> (i32, String, String) {
    let dir = std::env::temp_dir().join(format!("vmmu-scenario-ops-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("s.toml");
    std::fs::write(&f, text).unwrap();
    let r = vmmu(&["run", f.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// A small identity-layout scenario; `vm` goes in its `[vm]` section.
fn small(vm: &str) -> String {
    format!("name = \"t\"\n[vm]\n{vm}\n[[memslot]]\ngpa = 0\nsize = \"64MiB\"\n[guest]\nlayout = \"identity\"\n")
}

#[test]
fn nr_mmu_pages_below_kvms_minimum_is_refused() {
    let (code, _, err) = run_file("vm63", &small("nr_mmu_pages = 63"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("vm.nr_mmu_pages") && err.contains("64") && err.contains("EINVAL"), "{err}");
    let op =
        format!("{}[[phase]]\nname = \"p\"\nops = [{{ op = \"set-nr-mmu-pages\", nr_mmu_pages = 0 }}]\n", small(""));
    let (code, _, err) = run_file("op0", &op);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("phase[0].ops[0].nr_mmu_pages"), "{err}");
    // 64 itself is KVM's minimum and accepted.
    let (code, _, err) = run_file("vm64", &small("nr_mmu_pages = 64\nmmu = \"shadow\""));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_small_shadow_page_limit_recycles_and_the_audit_passes() {
    // The scenario ends with an audit op: the run fails if an invariant breaks.
    let (code, out, err) = vmmu(&["run", "scenarios/mmu-recycle.toml", "--mmu", "shadow", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let phase = |name: &str| v["phases"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap().clone();
    let stat = |p: &serde_json::Value, s: &str| p["stats"][s].as_i64().unwrap_or(0);
    let limited = phase("limited");
    assert!(stat(&limited, "mmu_recycled") > 0, "{limited}");
    assert!(stat(&phase("again"), "mmu_recycled") > 0);
    // Raised to 4096: nothing recycled; lowered to 64 again: the excess zapped at once.
    assert_eq!(stat(&phase("raised"), "mmu_recycled"), 0);
    assert!(stat(&phase("lowered"), "mmu_recycled") > 0);
    // Without the limit the same guest work recycles nothing.
    let unlimited = scenario_text("mmu-recycle.toml")
        .replace("{ op = \"set-nr-mmu-pages\", nr_mmu_pages = 64 },", "")
        .replace("\nnr_mmu_pages = 64 ", "\n");
    let r = run_as(&unlimited, "shadow");
    assert!(r.phases.iter().all(|p| p.stats.get("mmu_recycled").copied().unwrap_or(0) == 0));
}

/// The pages each phase of scenarios/dirty-log.toml harvested.
fn harvested(r: &RunResult) -> Vec<Option<u64>> {
    r.phases.iter().map(|p| p.dirty_pages_harvested).collect()
}

#[test]
fn dirty_log_harvests_exactly_the_pages_written() {
    let text = scenario_text("dirty-log.toml");
    // 96 distinct pages while logging, then 40 of them again; writes while logging is off
    // are not harvested after logging is turned back on.
    let exact = vec![None, Some(96), Some(40), Some(0)];
    for mmu in ["shadow", "tdp eptad=false", "tdp eptad=false pml=false", "legacy-tdp eptad=false"] {
        assert_eq!(harvested(&run_as(&text, mmu)), exact, "{mmu}");
    }
    // With EPT A/D bits the guest's four page-table pages on the walk are logged too.
    for mmu in ["tdp", "tdp pml=false", "legacy-tdp"] {
        assert_eq!(harvested(&run_as(&text, mmu)), vec![None, Some(100), Some(44), Some(0)], "{mmu}");
    }
}

#[test]
fn dirty_log_with_manual_protect_clears_what_it_read() {
    let text =
        scenario_text("dirty-log.toml").replace("[[memslot]]", "[vm]\nmanual_dirty_log_protect = true\n\n[[memslot]]");
    for mmu in ["shadow", "tdp eptad=false"] {
        let r = run_as(&text, mmu);
        assert_eq!(harvested(&r), vec![None, Some(96), Some(40), Some(0)], "{mmu}");
        assert!(r.dirty_log.iter().all(|h| h.cleared), "{mmu}: {:?}", r.dirty_log);
    }
    // KVM_DIRTY_LOG_INITIALLY_SET: the log starts full (64 MiB: 16384 pages), and so does the
    // log after logging is turned on again.
    let text = text
        .replace("manual_dirty_log_protect = true", "manual_dirty_log_protect = true\ndirty_log_initially_set = true");
    let r = run_as(&text, "shadow");
    assert_eq!(harvested(&r), vec![None, Some(16384), Some(40), Some(16384)]);
}

#[test]
fn dirty_log_ops_report_per_phase_in_text_and_json() {
    let (code, out, err) = vmmu(&["run", "scenarios/dirty-log.toml", "--mmu", "shadow"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("dirty pages harvested 96") && out.contains("dirty log harvests:"), "{out}");
    let (code, out, err) = vmmu(&["run", "scenarios/dirty-log.toml", "--mmu", "shadow", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["phases"][1]["dirty_pages_harvested"], 96);
    assert!(v["phases"][0].get("dirty_pages_harvested").is_none());
    assert_eq!(v["dirty_log"].as_array().unwrap().len(), 3);
    assert_eq!(v["dirty_log"][1]["dirty_pages"], 40);
}

#[test]
fn dirty_log_ops_out_of_order_are_refused_naming_the_field() {
    let ops = |ops: &str| format!("{}[[phase]]\nname = \"p\"\nops = [{ops}]\n", small(""));
    for (tag, text, field) in [
        ("harvest", ops("{ op = \"dirty-log-harvest\", slot = 0 }"), "phase[0].ops[0].slot"),
        ("stop", ops("{ op = \"dirty-log-stop\", slot = 0 }"), "phase[0].ops[0].slot"),
        (
            "twice",
            ops("{ op = \"dirty-log-start\", slot = 0 }, { op = \"dirty-log-start\", slot = 0 }"),
            "phase[0].ops[1].slot",
        ),
        ("noslot", ops("{ op = \"dirty-log-start\", slot = 1 }"), "phase[0].ops[0].slot"),
        ("initially", small("dirty_log_initially_set = true"), "vm.dirty_log_initially_set"),
    ] {
        let (code, _, err) = run_file(tag, &text);
        assert_eq!(code, 2, "{tag}: {err}");
        assert!(err.contains(field), "{tag}: {err}");
    }
}
