//! The `vmmu` command as a user meets it: the README's default run, the DESIGN §5 JSON
//! contract, the done criteria of first-touch and THP runs, traces in the kernel's formats,
//! and one-line errors with exit status 2 for bad input.

use std::process::Command;

fn vmmu(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmmu")).args(args).output().expect("run vmmu");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(args: &[&str]) -> serde_json::Value {
    let (code, out, err) = vmmu(args);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn stat(p: &serde_json::Value, name: &str) -> i64 {
    p["stats"][name].as_i64().unwrap_or_else(|| panic!("no stat {name} in {p}"))
}

#[test]
fn default_run_prints_a_report() {
    let (code, out, err) = vmmu(&["run"]);
    assert_eq!(code, 0, "{err}");
    for w in ["pass1", "pass2", "thp", "pf_fixed", "pages_2m"] {
        assert!(out.contains(w), "{w} missing from:\n{out}");
    }
}

#[test]
fn first_touch_json_contract_and_counts() {
    let v = json(&["run", "--mmu", "tdp", "--workload", "first-touch", "--pages", "16384", "--json"]);
    assert_eq!(v["scenario"], "default");
    assert_eq!(v["mmu"], "tdp");
    let phases = v["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 2);
    for p in phases {
        assert!(p["name"].is_string() && p["wall_ns"].is_u64() && p["accesses"].is_u64());
    }
    let fixed = stat(&phases[0], "pf_fixed");
    assert!((16384..=16384 + 64).contains(&fixed), "first pass pf_fixed {fixed}");
    assert_eq!(stat(&phases[1], "pf_taken"), 0, "second pass takes no faults");
    assert_eq!(stat(&phases[1], "pf_fixed"), 0);
    assert!(v["stats"]["pf_taken"].as_i64().unwrap() >= fixed);
}

#[test]
fn thp_backing_gives_huge_pages_and_fewer_faults() {
    let dir = std::env::temp_dir().join(format!("vmmu-thp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("thp.toml");
    std::fs::write(&f, "name = \"thp\"\n[[memslot]]\ngpa = 0\nsize = \"1GiB\"\nbacking = \"thp\"\n[guest]\nlayout = \"kernel\"\npage_size = \"2m\"\n").unwrap();
    let v = json(&["run", f.to_str().unwrap(), "--workload", "first-touch", "--pages", "16384", "--json"]);
    let p = &v["phases"][0];
    assert!(stat(p, "pages_2m") > 0);
    assert!(stat(p, "pf_fixed") < 16384 / 16, "pf_fixed {}", stat(p, "pf_fixed"));
}

#[test]
fn trace_events_in_kernel_format() {
    let (code, out, err) = vmmu(&["run", "--workload", "first-touch", "--pages", "8", "--trace", "events"]);
    assert_eq!(code, 0, "{err}");
    let line = out.lines().find(|l| l.contains("kvm_mmu_spte_requested:")).expect("a kvm_mmu_spte_requested line");
    let ev = line.split("kvm_mmu_spte_requested: ").nth(1).unwrap();
    let parts: Vec<&str> = ev.split(' ').collect();
    assert_eq!(parts.len(), 6, "{ev}");
    assert_eq!((parts[0], parts[2], parts[4]), ("gfn", "pfn", "level"));
    assert!(u64::from_str_radix(parts[1], 16).is_ok() && u64::from_str_radix(parts[3], 16).is_ok());
    assert!(line.contains("[000] ....."), "{line}");
    assert!(out.contains("kvm_tdp_mmu_spte_changed: as id 0 gfn "), "no spte_changed lines");
    // tdp_mmu_map_handle_target_level traces the SPTE it set (under EPT KVM's "user" mask is
    // the read bit, so a readable SPTE shows u).
    let set = out.lines().find(|l| l.contains("kvm_mmu_set_spte: gfn ")).expect("a kvm_mmu_set_spte line (TDP MMU)");
    assert!(set.contains(" (rwxu) level 1 at "), "{set}");
}

#[test]
fn function_graph_nests_the_fault_path() {
    let (code, out, err) = vmmu(&["run", "--workload", "first-touch", "--pages", "2", "--trace", "function_graph"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().skip_while(|l| !l.starts_with("# tracer: function_graph")).collect();
    let open = lines.iter().position(|l| l.ends_with("kvm_tdp_page_fault() {")).expect("kvm_tdp_page_fault opens");
    let depth = |l: &str| l.split('|').nth(1).map(|s| s.len() - s.trim_start().len()).unwrap_or(0);
    let d0 = depth(lines[open]);
    let mut inner = vec![];
    for l in &lines[open + 1..] {
        if depth(l) <= d0 {
            assert!(l.trim_end().ends_with('}') && l.contains(" us "), "closing line with a duration: {l}");
            break;
        }
        inner.push(*l);
    }
    for f in ["fast_page_fault", "kvm_faultin_pfn", "kvm_tdp_mmu_map"] {
        let l = inner.iter().find(|l| l.contains(f)).unwrap_or_else(|| panic!("{f} not nested:\n{}", inner.join("\n")));
        assert!(depth(l) > d0);
    }
    assert!(inner.iter().any(|l| l.contains(" us ") && l.contains("fast_page_fault();")));
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let dir = std::env::temp_dir().join(format!("vmmu-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("bad-size.toml", "name = \"x\"\n[[memslot]]\ngpa = 0\nsize = \"lots\"\n", "line 4"),
        ("bad-field.toml", "name = \"x\"\n[vm]\nmmmu = \"tdp\"\n[[memslot]]\ngpa = 0\nsize = \"1MiB\"\n", "mmmu"),
        ("bad-value.toml", "name = \"x\"\n[vm]\ntdp = \"rvi\"\n[[memslot]]\ngpa = 0\nsize = \"1MiB\"\n", "vm.tdp"),
        ("not-toml.toml", "this is not toml", "line 1"),
        (
            "migrate-rounds.toml",
            "name = \"x\"\n[[memslot]]\ngpa = 0\nsize = \"2MiB\"\n[[phase]]\nname = \"m\"\nops = [{ op = \"migrate\", slot = 0, workload = \"re-touch\", start = 0, pages = 1, max_rounds = 0 }]\n",
            "max_rounds",
        ),
        (
            "overlap.toml",
            "name = \"x\"\n[[memslot]]\ngpa = 0\nsize = \"2MiB\"\n[[memslot]]\ngpa = \"1MiB\"\nsize = \"2MiB\"\n",
            "overlaps",
        ),
    ];
    for (name, text, needle) in cases {
        let f = dir.join(name);
        std::fs::write(&f, text).unwrap();
        let (code, out, err) = vmmu(&["run", f.to_str().unwrap()]);
        assert_eq!(code, 2, "{name}: {err}");
        assert!(out.is_empty(), "{name}: {out}");
        assert_eq!(err.trim_end().lines().count(), 1, "{name}: one line:\n{err}");
        assert!(err.contains(name) && err.contains(needle), "{name}: {err}");
    }
    let (code, _, err) = vmmu(&["run", "/nonexistent/x.toml"]);
    assert_eq!(code, 2, "{err}");
    for args in [
        &["run", "--workload", "sideways"][..],
        &["run", "--mmu", "magic"],
        &["run", "--pages", "0"],
        // 2^62 pages: their size in bytes wrapped to 0 (overflowed in a debug build).
        &["run", "--pages", "4611686018427387904"],
        &["run", "--workload", "read", "--pages", "18446744073709551615"],
        &["run", "--frobnicate"],
    ] {
        let (code, _, err) = vmmu(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let (_, _, err) = vmmu(&["run", "--pages", "4611686018427387904"]);
    assert!(err.contains("--pages") && err.contains("past the end"), "{err}");
}

#[test]
fn every_shipped_scenario_runs() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let v = json(&["run", p.to_str().unwrap(), "--json"]);
            let runs = match v["runs"].as_array() {
                Some(r) => r.clone(),
                None => vec![v.clone()],
            };
            for r in runs {
                assert!(!r["phases"].as_array().unwrap().is_empty(), "{}", p.display());
            }
            n += 1;
        }
    }
    assert!(n >= 5, "scenarios found: {n}");
}

#[test]
fn mmio_scenario_shows_the_mmio_path() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/mmio.toml");
    let v = json(&["run", dir.to_str().unwrap(), "--json"]);
    let ph = v["phases"].as_array().unwrap();
    assert_eq!(stat(&ph[0], "pf_mmio_spte_created"), 2);
    assert_eq!(stat(&ph[1], "pf_taken"), 0, "cached MMIO SPTE: no page faults");
    assert_eq!(stat(&ph[1], "mmio_exits"), 1000);
    assert_eq!(stat(&ph[2], "pf_emulate"), 16, "writes to the read-only memslot");
    let (code, out, err) = vmmu(&["run", dir.to_str().unwrap(), "--trace", "events"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("mark_mmio_spte: sptep:"), "mark_mmio_spte missing");
    assert!(out.contains("handle_mmio_page_fault: addr:0 gfn fee0"), "handle_mmio_page_fault missing");
    assert!(out.contains("check_mmio_spte: spte "), "check_mmio_spte missing");
}

#[test]
fn default_run_compares_tdp_and_shadow_side_by_side() {
    let (code, out, err) = vmmu(&["run"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("side by side: tdp vs shadow"), "{out}");
    let v = json(&["run", "--json"]);
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!((runs[0]["mmu"].as_str(), runs[1]["mmu"].as_str()), (Some("tdp"), Some("shadow")));
    let churn =
        |r: &serde_json::Value| r["phases"].as_array().unwrap().iter().find(|p| p["name"] == "churn").cloned().unwrap();
    // Shadow paging pays for the guest's page-table writes: emulation, unsync, guest #PF.
    assert!(stat(&churn(&runs[1]), "pf_emulate") > 0);
    assert!(stat(&churn(&runs[1]), "pf_guest") > 0);
    assert_eq!(stat(&churn(&runs[0]), "pf_emulate"), 0);
    assert!(stat(&churn(&runs[1]), "pf_taken") > 10 * stat(&churn(&runs[0]), "pf_taken"));
}

#[test]
fn scenario_ops_rewrite_the_guests_own_tables() {
    let f = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/pte-rewrite.toml");
    let v = json(&["run", f.to_str().unwrap(), "--mmu", "shadow", "--json"]);
    let ph = |n: &str| v["phases"].as_array().unwrap().iter().find(|p| p["name"] == n).cloned().unwrap();
    let flip = ph("pte-flip");
    assert_eq!(stat(&flip, "mmu_unsync"), 1, "the page table went unsync");
    assert_eq!(stat(&flip, "invlpg"), 3);
    assert!(stat(&flip, "tlb_flush") >= 3);
    let pde = ph("pde-rewrite");
    assert_eq!(stat(&pde, "pf_emulate"), 3, "each PDE store is emulated");
    assert_eq!(stat(&pde, "mmu_flooded"), 1, "the third floods the directory");
    let roots = ph("roots");
    assert!(stat(&roots, "pf_taken") <= 4, "the second root shares the lower-level shadow pages");
}

#[test]
fn migrate_scenario_prints_rounds_and_its_copy_matches() {
    let f = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/migrate.toml");
    for mmu in ["tdp", "tdp pml=false", "tdp pml=false eager_page_split=false", "shadow", "legacy-tdp pml=false"] {
        let v = json(&["run", f.to_str().unwrap(), "--mmu", mmu, "--json"]);
        let mig = &v["migrations"][0];
        let slot_pages = mig["slot_pages"].as_u64().unwrap();
        let rounds = mig["rounds"].as_array().unwrap();
        let pml = !mmu.contains("pml=false") && mmu != "shadow";
        assert_eq!(mig["mode"].as_str().unwrap().contains("PML"), pml, "{mmu}: {mig}");
        assert_eq!(rounds[0]["dirty_pages"].as_u64(), Some(slot_pages), "{mmu}: round 0 copies the slot");
        assert!(rounds.len() >= 2, "{mmu}: {rounds:?}");
        let last = rounds.last().unwrap();
        assert_eq!(last["stop_and_copy"], true, "{mmu}");
        assert_eq!(rounds.iter().filter(|r| r["stop_and_copy"] == true).count(), 1, "{mmu}");
        for (i, r) in rounds.iter().enumerate().skip(1) {
            let dirty = r["dirty_pages"].as_u64().unwrap();
            // A zipf working set: some pages re-dirtied each round, far fewer than the slot.
            assert!(dirty > 0 && dirty < slot_pages / 2, "{mmu}: {r}");
            let (taken, fast) = (r["pf_taken"].as_u64().unwrap(), r["pf_fast"].as_u64().unwrap());
            if pml {
                // D bits cleared, SPTEs still writable: the log costs the guest no fault.
                assert_eq!(taken, 0, "{mmu}: {r}");
            } else {
                // Each dirtied page was write-protected: the guest faulted on its first write.
                assert!(taken >= dirty / 2, "{mmu}: {r}");
            }
            // Round 1 may split huge pages in the slow path (no eager split); later rounds
            // re-dirty 4 KiB SPTEs that fast page fault makes writable again.
            if !pml && mmu != "shadow" && i >= 2 {
                assert!(fast > 0, "{mmu}: fast page fault fixes re-dirtying: {r}");
            }
        }
        if mmu == "tdp pml=false eager_page_split=false" {
            // The first write to each huge page splits it in the slow path.
            let r1 = &rounds[1];
            assert!(r1["pf_taken"].as_u64() > r1["pf_fast"].as_u64(), "{mmu}: {r1}");
        }
        assert!(mig["downtime_ns"].as_u64().unwrap() > 0, "{mmu}");
    }
    let (code, out, err) = vmmu(&["run", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("stop-and-copy (guest paused)") && out.contains("the copy matches guest memory"), "{out}");
}

#[test]
fn idle_tracking_scenarios_answer_what_marking_costs() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios");
    let ad = dir.join("idle-tracking.toml");
    let noad = dir.join("idle-tracking-noad.toml");
    for (f, mmu, tracked) in
        [(&ad, "tdp", false), (&ad, "shadow", false), (&noad, "tdp", true), (&noad, "legacy-tdp", true)]
    {
        let v = json(&["run", f.to_str().unwrap(), "--mmu", mmu, "--json"]);
        let passes = v["idle_tracking"][0]["passes"].as_array().unwrap().clone();
        assert_eq!(passes[0]["pf_taken"], 0, "{mmu}: the baseline pass runs on mapped memory");
        for p in &passes[1..] {
            let young = p["young_pages"].as_u64().unwrap();
            // 100000 random accesses over 16384 pages touch nearly all of them.
            assert!((16_000..=16_384 + 64).contains(&young), "{mmu}: {p}");
            let fast = p["pf_fast"].as_u64().unwrap();
            if tracked {
                assert!(fast >= 16_000, "{mmu}: access-tracked SPTEs restored by fast page fault: {p}");
            } else {
                assert_eq!(p["pf_taken"], 0, "{mmu}: with A/D bits marking costs the guest no fault: {p}");
            }
        }
    }
    let (code, out, err) = vmmu(&["run", noad.to_str().unwrap(), "--mmu", "tdp"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("guest slowdown per marking pass:"), "{out}");
}

#[test]
fn host_events_scenario_zaps_and_refaults() {
    let f = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/host-events.toml");
    let v = json(&["run", f.to_str().unwrap(), "--mmu", "tdp", "--json"]);
    let ph = |n: &str| v["phases"].as_array().unwrap().iter().find(|p| p["name"] == n).cloned().unwrap();
    for event in ["migrate", "swap-out"] {
        assert!(stat(&ph(event), "remote_tlb_flush_requests") > 0, "{event}: the notifier flushed");
        assert!(stat(&ph(event), "pages_4k") < 4096, "{event}: the SPTEs were zapped");
    }
    for after in ["after-mig", "swap-in"] {
        assert_eq!(stat(&ph(after), "pf_taken"), 4096, "{after}: every page faulted back in");
    }
    let dir = std::env::temp_dir().join(format!("vmmu-host-ev-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("beyond.toml");
    std::fs::write(&bad, "name = \"x\"\n[[memslot]]\ngpa = 0\nsize = \"2MiB\"\n[[phase]]\nname = \"p\"\nops = [{ op = \"swap-out\", slot = 0, offset = \"1MiB\", size = \"2MiB\" }]\n").unwrap();
    let (code, _, err) = vmmu(&["run", bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("phase[0].ops[0].size") && err.contains("past the end of memslot[0]"), "{err}");
}

#[test]
fn thp_events_scenario_moves_pages_2m() {
    let f = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/thp-events.toml");
    let v = json(&["run", f.to_str().unwrap(), "--json"]);
    let ph = |n: &str| v["phases"].as_array().unwrap().iter().find(|p| p["name"] == n).cloned().unwrap();
    let populated = stat(&ph("populate"), "pages_2m");
    assert!(populated >= 16, "THP-backed writes map 2 MiB: {populated}");
    // After the split the 32 MiB range is mapped 4 KiB (8192 faults, one per page).
    assert_eq!(stat(&ph("split"), "pf_taken"), 8192);
    assert!(stat(&ph("split"), "pages_2m") < populated);
    assert!(stat(&ph("split"), "remote_tlb_flush_requests") >= 16, "one notifier flush per split huge page");
    // After the collapse it is huge again: one fault per 2 MiB.
    assert_eq!(stat(&ph("collapse"), "pf_taken"), 16);
    assert_eq!(stat(&ph("collapse"), "pages_2m"), populated);
}

#[test]
fn ksm_and_zero_page_scenario_moves_the_host_and_kvm_counters() {
    let f = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/ksm-zero-page.toml");
    for mmu in ["tdp", "shadow", "legacy-tdp"] {
        let v = json(&["run", f.to_str().unwrap(), "--mmu", mmu, "--json"]);
        let ph = |name: &str| v["phases"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap().clone();
        let fresh = ph("read-fresh");
        assert!(stat(&fresh, "host_frames_4k") < 64, "{mmu}: reads map the zero page: {fresh}");
        let cow = ph("write-cow");
        // Each first write faults on the read-only SPTE; the host's copy-on-write notifies
        // KVM in the middle of that fault, which is then stale and retried: two faults.
        assert_eq!(stat(&cow, "pf_taken"), 2 * 4096, "{mmu}: {cow}");
        assert_eq!(stat(&cow, "pf_fixed"), 4096, "{mmu}");
        assert_eq!(stat(&cow, "host_frames_4k"), 4096, "{mmu}: one private frame per page");
        assert!(stat(&cow, "remote_tlb_flush_requests") >= 4096, "{mmu}: the notifier zapped each zero-page SPTE");
        let ksm = ph("ksm-merge");
        assert_eq!(stat(&ksm, "host_ksm_pages_shared"), 256, "{mmu}: 256 distinct contents");
        assert_eq!(stat(&ksm, "host_ksm_pages_sharing"), 4096 - 256, "{mmu}");
        assert_eq!(stat(&ksm, "host_frames_4k"), -(4096 - 256), "{mmu}: the duplicates' frames freed");
        assert!(stat(&ksm, "remote_tlb_flush_requests") >= 4096, "{mmu}: KVM's SPTEs zapped");
        let read = ph("read-merged");
        assert!(stat(&read, "pf_taken") > 0, "{mmu}: reads fault the merged pages back in");
        let unmerge = ph("write-unmerge");
        assert_eq!(stat(&unmerge, "pf_taken"), 2 * 4096, "{mmu}: copy-on-write again");
        assert_eq!(stat(&unmerge, "host_ksm_pages_sharing"), -(4096 - 256), "{mmu}: nothing shared any more");
    }
}

#[test]
fn nx_huge_pages_scenario_splits_and_recovers() {
    let f = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/nx-huge-pages.toml");
    for mmu in ["tdp", "legacy-tdp", "shadow"] {
        let v = json(&["run", f.to_str().unwrap(), "--mmu", mmu, "--json"]);
        let ph = |name: &str| v["phases"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap().clone();
        assert_eq!(stat(&ph("data"), "pages_2m"), 32, "{mmu}: 64 MiB of data mapped 2 MiB");
        let exec = ph("execute");
        assert_eq!(stat(&exec, "nx_lpage_splits"), 16, "{mmu}: one split per executed huge page");
        assert_eq!(stat(&exec, "pages_2m"), 16, "{mmu}");
        // ratio 4: passes zap 4, 3, 3 and 2 of the 16 tables.
        let rec = ph("recover");
        assert_eq!(stat(&rec, "nx_lpage_splits"), 4, "{mmu}");
        // kvm_recover_nx_huge_pages flushes once per pass (kvm_mmu_remote_flush_or_zap),
        // not once per zapped table.
        assert_eq!(stat(&rec, "remote_tlb_flush_requests"), 4, "{mmu}: one flush per recovery pass");
        let again = ph("data-again");
        assert_eq!(stat(&again, "pf_taken"), 12, "{mmu}: the 12 recovered ranges fault back in");
        assert_eq!(stat(&again, "pages_2m"), 28, "{mmu}: ... as huge pages");
    }
}
