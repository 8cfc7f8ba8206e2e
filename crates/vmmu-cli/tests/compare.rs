//! `vmmu compare` on the four compare scenarios (scenarios/compare/). With a usable /dev/kvm
//! both columns must be printed and the statistics that differ must be exactly the ones
//! docs/compare.md lists (and explains), so an unexplained new difference fails this test.
//! Without /dev/kvm the command must say so, print the vmmu column and exit with status 3.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const SCENARIOS: &[&str] = &["first-touch", "write-after-read", "pte-rewrite", "cr3-switch"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn vmmu(args: &[&str], no_kvm: bool) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmmu"));
    c.args(args).current_dir(root());
    if no_kvm {
        c.env("VMMU_COMPARE_NO_KVM", "1");
    } else {
        c.env_remove("VMMU_COMPARE_NO_KVM");
    }
    let out = c.output().expect("run vmmu");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A documented difference: the values, when the document gives a number (None: "varies").
type Documented = BTreeMap<(String, String, String), (Option<i64>, Option<i64>)>;

/// The table between `<!-- differences:start -->` and `<!-- differences:end -->` in
/// docs/compare.md: `| scenario | phase | stat | vmmu | KVM | why |`.
fn documented() -> Documented {
    let doc = std::fs::read_to_string(root().join("docs/compare.md")).expect("docs/compare.md");
    let start = doc.find("<!-- differences:start -->").expect("start marker in docs/compare.md");
    let end = doc.find("<!-- differences:end -->").expect("end marker in docs/compare.md");
    let mut out = Documented::new();
    for line in doc[start..end].lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<String> =
            line.trim_matches('|').split('|').map(|c| c.trim().trim_matches('`').to_string()).collect();
        if cells.len() < 6 || cells[0] == "scenario" || cells[0].starts_with("---") {
            continue;
        }
        let num = |s: &str| s.parse::<i64>().ok();
        let key = (cells[0].clone(), cells[1].clone(), cells[2].clone());
        assert!(out.insert(key.clone(), (num(&cells[3]), num(&cells[4]))).is_none(), "{key:?} listed twice");
    }
    assert!(!out.is_empty(), "no differences table in docs/compare.md");
    out
}

fn file(name: &str) -> String {
    format!("scenarios/compare/{name}.toml")
}

#[test]
fn compare_scenarios_differ_only_as_documented() {
    let docs = documented();
    let mut seen = Documented::new();
    let mut skipped = false;
    for name in SCENARIOS {
        let (code, out, err) = vmmu(&["compare", &file(name), "--json"], false);
        if code == 3 {
            assert!(err.contains("/dev/kvm not available"), "{name}: exit 3 without the message: {err}");
            let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
            assert_eq!(v["kvm_available"], false);
            assert!(v["phases"][0]["vmmu"]["wall_ns"].is_u64(), "the vmmu column is still printed");
            skipped = true;
            continue;
        }
        assert_eq!(code, 0, "{name}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(v["kvm_available"], true);
        assert!(v["host"]["vendor"].is_string() && v["host_description"].is_string());
        let phases = v["phases"].as_array().unwrap();
        assert!(phases.len() >= 3, "{name}: {phases:?}");
        for p in phases {
            assert_eq!(p["compared"], true, "{name}: phase {} not on both sides", p["name"]);
            assert!(p["host"].is_string());
            for side in ["vmmu", "kvm"] {
                assert!(p[side]["wall_ns"].is_u64(), "{name}/{}: no {side} column", p["name"]);
            }
            let pf = p["stats"].as_array().unwrap().iter().find(|s| s["name"] == "pf_taken").unwrap();
            assert!(pf["vmmu"].is_i64() && pf["kvm"].is_i64(), "{name}: both columns of pf_taken: {pf}");
        }
        for d in v["differences"].as_array().unwrap() {
            let key = (name.to_string(), d["phase"].as_str().unwrap().into(), d["stat"].as_str().unwrap().into());
            seen.insert(key, (d["vmmu"].as_i64(), d["kvm"].as_i64()));
        }
        // The table says DIFFERS exactly where the JSON lists a difference.
        let (_, text, _) = vmmu(&["compare", &file(name)], false);
        let n = v["differences"].as_array().unwrap().len();
        assert!(text.contains("difference") && text.contains("KVM") && text.contains("host: "), "{text}");
        assert_eq!(text.matches("  DIFFERS\n").count(), n, "{name}:\n{text}");
    }
    if skipped {
        println!("skipped: /dev/kvm not available (checked the vmmu column and the message instead)");
        return;
    }
    let unexplained: Vec<_> = seen.keys().filter(|k| !docs.contains_key(*k)).collect();
    let gone: Vec<_> = docs.keys().filter(|k| !seen.contains_key(*k)).collect();
    assert!(unexplained.is_empty(), "differences not explained in docs/compare.md: {unexplained:?} (values {seen:?})");
    assert!(gone.is_empty(), "docs/compare.md explains differences that no longer occur: {gone:?}");
    for (k, (dv, dk)) in &docs {
        let (v, kv) = seen[k];
        if let Some(dv) = dv {
            assert_eq!(Some(*dv), v, "{k:?}: vmmu value changed from the documented one");
        }
        if let Some(dk) = dk {
            assert_eq!(Some(*dk), kv, "{k:?}: KVM value changed from the documented one");
        }
    }
}

#[test]
fn without_kvm_prints_the_vmmu_column_and_says_so() {
    let (code, out, err) = vmmu(&["compare", &file("first-touch")], true);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("/dev/kvm not available"), "{err}");
    assert!(out.contains("KVM:  not available"), "{out}");
    assert!(out.contains("pf_taken") && out.contains("1024") && out.contains("n/a"), "{out}");
    assert!(!out.contains("DIFFERS"), "{out}");
    let (code, out, _) = vmmu(&["compare", &file("first-touch"), "--json"], true);
    assert_eq!(code, 3);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["kvm_available"], false);
    assert!(v["host"].is_object() && v["kvm_unavailable_reason"].is_string());
    assert!(v["differences"].as_array().unwrap().is_empty());
}

#[test]
fn scenarios_that_cannot_be_compared_are_refused() {
    // The default scenario uses the guest-kernel layout: no real-KVM translation.
    let (code, _, err) = vmmu(&["compare", "scenarios/default.toml"], true);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("identity"), "{err}");
    // Like with like only: with /dev/kvm usable, an MMU of another kind is refused.
    let host = vmmu_kvm::HostKind::detect();
    if vmmu_kvm::kvm_available().is_ok() {
        let other = if host.vmmu_mmu() == "shadow" { "tdp" } else { "shadow" };
        let (code, _, err) = vmmu(&["compare", &file("first-touch"), "--mmu", other], false);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("like with like"), "{err}");
    } else {
        println!("skipped the --mmu check: /dev/kvm not available");
    }
}

/// A scenario whose translation the real-KVM backend refuses (a page at 2^47, beyond the
/// KVM guest's address space): the backend's error is the source, and `vmmu compare` prints
/// it once, on one line, with exit status 2.
#[test]
fn a_workload_the_backend_refuses_keeps_its_error() {
    use std::error::Error as _;
    let text = "name = \"high\"\n[[memslot]]\ngpa = 0\nsize = \"64MiB\"\n\
                [guest]\nlayout = \"identity\"\npage_size = \"4k\"\naccessed_dirty = \"clear\"\nuser = true\n\
                [[phase]]\nname = \"p\"\nops = [{ op = \"write\", start = \"0x800000000000\", pages = 1 }]\n";
    let s = vmmu_cli::scenario::Scenario::parse(text).unwrap();
    let e = vmmu_cli::compare::translate(&s).unwrap_err();
    assert!(matches!(e, vmmu_cli::compare::CompareError::Spec(_)), "{e:?}");
    assert!(e.is_config());
    let kvm = e.source().and_then(|s| s.downcast_ref::<vmmu_kvm::KvmError>()).expect("the KvmError");
    assert_eq!(e.to_string(), format!("compare: {kvm}"));

    let dir = std::env::temp_dir().join(format!("vmmu-compare-spec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("high.toml");
    std::fs::write(&f, text).unwrap();
    let (code, out, err) = vmmu(&["compare", f.to_str().unwrap()], true);
    assert_eq!(code, 2, "{err}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(err, format!("vmmu: {}: compare: {kvm}\n", f.display()));
    assert_eq!(err.matches(&kvm.to_string()).count(), 1, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every scenario setting the real-KVM side cannot be given makes compare refuse (exit 2),
/// naming the setting: none is silently dropped.
#[test]
fn settings_not_carried_to_the_real_kvm_are_refused_by_name() {
    let base = std::fs::read_to_string(root().join(file("first-touch"))).unwrap();
    let vm = |line: &str| base.replace("[vm]\n", &format!("[vm]\n{line}\n"));
    let slot = |line: &str| base.replace("size = \"2GiB\"\n", &format!("size = \"2GiB\"\n{line}\n"));
    let guest = |line: &str| base.replace("[guest]\n", &format!("[guest]\n{line}\n"));
    let op = |op: &str| format!("{base}\n[[phase]]\nname = \"extra\"\nops = [{op}]\n");
    let cases: Vec<(String, &str)> = vec![
        (vm("eptad = false"), "vm.eptad"),
        (vm("pml = false"), "vm.pml"),
        (vm("tdp = \"npt\""), "vm.tdp"),
        (vm("max_tdp_level = 5\nmaxphyaddr = 52"), "vm.max_tdp_level"),
        (vm("maxphyaddr = 40"), "vm.maxphyaddr"),
        (vm("nx_huge_pages = true"), "vm.nx_huge_pages"),
        (vm("nx_huge_pages_recovery_ratio = 0"), "vm.nx_huge_pages_recovery_ratio"),
        (vm("nx_huge_pages_recovery_period_ms = 5"), "vm.nx_huge_pages_recovery_period_ms"),
        (vm("mmio_caching = false"), "vm.mmio_caching"),
        (vm("tdp_huge_page = \"2m\""), "vm.tdp_huge_page"),
        (vm("eager_page_split = false"), "vm.eager_page_split"),
        (vm("host_memory = \"8GiB\""), "vm.host_memory"),
        (vm("manual_dirty_log_protect = true"), "vm.manual_dirty_log_protect"),
        (base.replace("[vm]\n", "compare = [\"shadow\"]\n[vm]\n"), "compare"),
        (slot("backing = \"thp\""), "memslot[0].backing"),
        (slot("prefault = true"), "memslot[0].prefault"),
        (slot("readonly = true"), "memslot[0].readonly"),
        (slot("guest_page_size = \"2m\""), "4 KiB guest pages"),
        (format!("{base}\n[[memslot]]\ngpa = \"4GiB\"\nsize = \"2MiB\"\n"), "memslot"),
        (guest("pcid = true"), "guest.pcid"),
        (guest("processes = 2"), "guest.processes"),
        (base.replace("accessed_dirty = \"clear\"", "accessed_dirty = \"preset\""), "guest.accessed_dirty"),
        (
            op("{ op = \"rewrite-entry\", va = \"1GiB\", level = 2, clear = \"0x60\", target = \"0x40000000\" }"),
            "level-1",
        ),
        (op("{ op = \"dirty-log-start\", slot = 0 }"), "dirty-log-start"),
        (op("{ op = \"set-nr-mmu-pages\", nr_mmu_pages = 64 }"), "set-nr-mmu-pages"),
        (op(&["{ op = \"new-root\" }"; 4].join(", ")), "roots"),
    ];
    let dir = std::env::temp_dir().join(format!("vmmu-compare-refusals-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, (text, name)) in cases.iter().enumerate() {
        let f = dir.join(format!("case{i}.toml"));
        std::fs::write(&f, text).unwrap();
        let (code, _, err) = vmmu(&["compare", f.to_str().unwrap()], true);
        assert_eq!(code, 2, "case {i} ({name}) was not refused: {err}");
        assert!(err.contains(name), "case {i}: the error does not name {name}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// vm.nr_mmu_pages reaches the real KVM (KVM_SET_NR_MMU_PAGES on its VM): with 64 pages
/// both sides recycle shadow pages, the same number of them.
#[test]
fn nr_mmu_pages_is_carried_to_the_real_kvm() {
    let base = std::fs::read_to_string(root().join(file("first-touch"))).unwrap();
    let text = base.replace("[vm]\n", "[vm]\nnr_mmu_pages = 64\n").replace("pages = 1024 }", "pages = 40000 }");
    let dir = std::env::temp_dir().join(format!("vmmu-compare-nr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("recycle.toml");
    std::fs::write(&f, text).unwrap();
    let (code, out, err) = vmmu(&["compare", f.to_str().unwrap(), "--json"], false);
    let _ = std::fs::remove_dir_all(&dir);
    if code == 3 {
        println!("skipped: /dev/kvm not available");
        return;
    }
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["kvm_workload"]["nr_mmu_pages"], 64);
    let phase = &v["phases"][1];
    let row = phase["stats"].as_array().unwrap().iter().find(|s| s["name"] == "mmu_recycled").unwrap().clone();
    assert!(row["kvm"].as_i64().unwrap() > 0 && row["vmmu"].as_i64().unwrap() > 0, "{row}");
}

/// The run summary: statistics compared, equal and differing add up, noise is listed apart
/// and never among the differences, gauges are marked.
#[test]
fn summary_counts_and_noise_are_consistent() {
    let (code, out, err) = vmmu(&["compare", &file("first-touch"), "--json"], false);
    if code == 3 {
        println!("skipped: /dev/kvm not available");
        return;
    }
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let s = &v["summary"];
    let n = |k: &str| s[k].as_u64().unwrap();
    assert_eq!(n("compared"), n("equal") + n("differing"));
    assert_eq!(n("differing"), v["differences"].as_array().unwrap().len() as u64);
    assert_eq!(n("noise_differing"), v["noise_differences"].as_array().unwrap().len() as u64);
    for d in v["differences"].as_array().unwrap() {
        assert!(vmmu_cli::compare::noise(d["phase"].as_str().unwrap(), d["stat"].as_str().unwrap()).is_none());
    }
    let rows: Vec<&serde_json::Value> =
        v["phases"].as_array().unwrap().iter().flat_map(|p| p["stats"].as_array().unwrap()).collect();
    assert!(rows.iter().any(|r| r["name"] == "pages_4k" && r["gauge"] == true));
    assert!(rows.iter().any(|r| r["name"] == "pf_taken" && r["gauge"] == false));
    assert!(rows.iter().any(|r| r["name"] == "exits" && r["noise"].is_string() && r["differs"] == false));
    let (_, text, _) = vmmu(&["compare", &file("first-touch")], false);
    assert!(
        text.contains("summary: ") && text.contains("statistic(s) differ") && text.contains("pages_4k (at end)"),
        "{text}"
    );
}
