//! `vmmu compare --trace events` on first-touch: when /dev/kvm and tracefs are usable, both
//! event columns are printed and the per-event counts are what docs/compare.md ("The event
//! streams") documents: the same shadow pages (`kvm_mmu_get_page`) and SPTEs
//! (`kvm_mmu_spte_requested`, `kvm_mmu_set_spte`) on both sides in every phase, and no
//! divergence in the first-touch phase. Otherwise it prints "skipped: ..." and passes.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn vmmu(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmmu"))
        .args(args)
        .current_dir(root())
        .env_remove("VMMU_COMPARE_NO_KVM")
        .output()
        .expect("run vmmu");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Why the test cannot run here, if it cannot.
fn unusable() -> Option<String> {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        return Some(format!("/dev/kvm not available ({e})"));
    }
    let t = Path::new("/sys/kernel/tracing");
    if !t.join("events/kvmmmu").exists() {
        return Some("no tracefs with kvmmmu events at /sys/kernel/tracing".into());
    }
    None
}

#[test]
fn first_touch_event_streams_match_as_documented() {
    if let Some(why) = unusable() {
        println!("skipped: {why}");
        return;
    }
    let (code, out, err) = vmmu(&["compare", "scenarios/compare/first-touch.toml", "--trace", "events", "--json"]);
    if code != 0 && err.contains("tracing needs root") {
        println!("skipped: {}", err.trim());
        return;
    }
    assert_eq!(code, 0, "stderr: {err}");
    let c: serde_json::Value = serde_json::from_str(&out).expect("json");
    let t = &c["trace"];
    assert_eq!(t["kvm_lost"], 0, "KVM's trace buffer dropped events");
    let phases = t["phases"].as_array().expect("trace phases");
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["boot", "first-touch", "re-touch"]);
    let count = |p: &serde_json::Value, name: &str, side: &str| -> u64 {
        p["counts"].as_array().unwrap().iter().find(|c| c["name"] == name).map_or(0, |c| c[side].as_u64().unwrap())
    };
    // (phase, kvm_mmu_get_page, kvm_mmu_set_spte) on both sides, as docs/compare.md says.
    for (p, (name, get_page, set_spte)) in
        phases.iter().zip([("boot", 4, 1), ("first-touch", 3, 1024), ("re-touch", 0, 0)])
    {
        assert_eq!(p["name"], name);
        assert!(p["compared"].as_bool().unwrap(), "{name}: both columns");
        for ev in ["kvm_mmu_get_page", "kvm_mmu_spte_requested", "kvm_mmu_set_spte"] {
            assert_eq!(count(p, ev, "vmmu"), count(p, ev, "kvm_without_artifacts"), "{name}/{ev}");
        }
        assert_eq!(count(p, "kvm_mmu_get_page", "vmmu"), get_page, "{name}");
        assert_eq!(count(p, "kvm_mmu_set_spte", "vmmu"), set_spte, "{name}");
        // Both columns present in the rows.
        let rows = p["rows"].as_array().unwrap();
        if set_spte > 0 {
            assert!(rows.iter().any(|r| r["mark"] == "=" && r["vmmu"].is_string() && r["kvm"].is_string()), "{name}");
        }
    }
    // The code page's fetch is a `fetch` on both sides now: no divergence in any phase.
    assert!(phases[0]["first_divergence"].is_null(), "{}", phases[0]["first_divergence"]);
    assert!(phases[1]["first_divergence"].is_null(), "{}", phases[1]["first_divergence"]);
    assert!(phases[2]["first_divergence"].is_null(), "{}", phases[2]["first_divergence"]);

    // The text report: both columns side by side, no divergence to mark, the count table.
    let (code, out, err) = vmmu(&["compare", "scenarios/compare/first-touch.toml", "--trace", "events"]);
    assert_eq!(code, 0, "stderr: {err}");
    assert!(!out.contains(">>> first divergence"), "{out}");
    let spte = "kvm_mmu_pagetable_walk: addr 10000 pferr 14 U|F";
    assert!(
        out.lines().any(|l| l.trim_start().starts_with('=') && l.matches(spte).count() == 2 && l.contains(" | ")),
        "{out}"
    );
    assert!(out.contains("KVM w/o artif.") && out.contains("no divergence"), "{out}");
}
