//! Runs the workloads on the real /dev/kvm when it can be opened; otherwise each test prints
//! "skipped: /dev/kvm not available" and returns. Every run also checks the guest against the
//! backend's model (written frames, guest PTE A/D bits, KVM_TRANSLATE): a mismatch fails the run.
//!
//! The exact-count assertions hold for shadow paging (the PVM host this was written on); on a
//! TDP host only the host-independent ones are checked.

use std::path::Path;

use vmmu_kvm::{kvm_available, run_workload, HostKind, KernelEntry, KvmRun, Paging, StatsFd, Vendor, WorkloadSpec};

fn kvm_or_skip(test: &str) -> bool {
    match kvm_available() {
        Ok(()) => true,
        Err(e) => {
            println!("{test}: skipped: /dev/kvm not available ({e})");
            false
        }
    }
}

/// Prints the run (visible with --nocapture) and returns the named phase's stat.
fn show(run: &KvmRun) {
    println!("{} on {}", run.workload, run.host);
    const KEYS: &[&str] = &[
        "pf_taken",
        "pf_fixed",
        "pf_emulate",
        "pf_spurious",
        "pf_fast",
        "invlpg",
        "tlb_flush",
        "exits",
        "mmu_shadow_zapped",
        "mmu_pte_write",
        "mmu_flooded",
        "mmu_unsync",
        "mmu_cache_miss",
        "remote_tlb_flush",
        "pages_4k",
        "pages_2m",
    ];
    for p in &run.phases {
        let s: Vec<String> = KEYS.iter().filter_map(|k| p.stat(k).map(|v| format!("{k}={v}"))).collect();
        println!("  {:<12} {:>10} ns  {}", p.name, p.wall_ns, s.join(" "));
    }
}

fn stat(run: &KvmRun, phase: &str, name: &str) -> u64 {
    run.phase(phase)
        .unwrap_or_else(|| panic!("no phase {phase}"))
        .stat(name)
        .unwrap_or_else(|| panic!("KVM reported no statistic {name}"))
}

fn shadow(run: &KvmRun) -> bool {
    run.host.paging == Paging::Shadow
}

#[test]
fn host_kind_is_detected() {
    let host = HostKind::detect();
    println!("host kind: {host} (compare with vmmu --mmu {})", host.vmmu_mmu());
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(host.vendor, Vendor::Pvm);
        assert_eq!(host.paging, Paging::Shadow);
        assert_eq!(host.vmmu_mmu(), "shadow");
    }
    if let Ok(v) = std::fs::read_to_string("/sys/module/kvm/parameters/tdp_mmu") {
        assert_eq!(host.tdp_mmu, Some(v.trim() == "Y"));
    }
}

#[test]
fn stats_fd_names_are_kvms() {
    if !kvm_or_skip("stats_fd_names_are_kvms") {
        return;
    }
    let run = run_workload(&WorkloadSpec::first_touch(1)).unwrap();
    let p = &run.phases[1];
    for name in ["pf_taken", "pf_fixed", "pf_emulate", "pf_spurious", "tlb_flush", "invlpg", "exits"] {
        assert!(p.vcpu.contains_key(name), "vCPU stats lack {name}: {:?}", p.vcpu.keys());
    }
    for name in [
        "mmu_shadow_zapped",
        "mmu_pte_write",
        "mmu_unsync",
        "mmu_cache_miss",
        "pages_4k",
        "pages_2m",
        "remote_tlb_flush",
    ] {
        assert!(p.vm.contains_key(name), "VM stats lack {name}: {:?}", p.vm.keys());
    }
    // The JSON a CLI would print carries the host kind.
    let json = serde_json::to_value(&run).unwrap();
    assert!(json["host"]["paging"].is_string() && json["host"]["vendor"].is_string());
    assert!(json["phases"][1]["vcpu"]["pf_fixed"].is_u64());
}

#[test]
fn stats_fd_opens_on_vm_and_vcpu() {
    if !kvm_or_skip("stats_fd_opens_on_vm_and_vcpu") {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let vm_stats = StatsFd::open(&vm).unwrap();
    let vcpu_stats = StatsFd::open(&vcpu).unwrap();
    assert!(vm_stats.layout().id.starts_with("kvm-"), "{}", vm_stats.layout().id);
    assert!(vcpu_stats.layout().id.contains("vcpu"), "{}", vcpu_stats.layout().id);
    let s = vcpu_stats.read().unwrap();
    assert_eq!(s.get("pf_fixed"), Some(0), "a new vCPU has fixed no faults");
    assert!(vm_stats.read().unwrap().get("pages_4k").is_some());
}

#[test]
fn first_touch() {
    if !kvm_or_skip("first_touch") {
        return;
    }
    let n = 1024;
    let run = run_workload(&WorkloadSpec::first_touch(n)).unwrap();
    show(&run);
    assert_eq!(run.phases.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["boot", "first-touch", "re-touch"]);
    assert_eq!(run.checked_writes, usize::try_from(n).unwrap());
    assert!(run.translations.iter().all(|t| t.kvm_gpa == Some(t.expected_gpa)));
    if shadow(&run) {
        // Every page's first write takes a shadow fault that installs its SPTE.
        assert!(stat(&run, "first-touch", "pf_fixed") >= n);
        assert!(stat(&run, "first-touch", "pages_4k") >= n);
        assert_eq!(stat(&run, "re-touch", "pf_fixed"), 0, "second pass hits installed SPTEs");
        assert_eq!(stat(&run, "re-touch", "pf_taken"), 0);
    }
}

#[test]
fn write_after_read() {
    if !kvm_or_skip("write_after_read") {
        return;
    }
    let n = 1024;
    let run = run_workload(&WorkloadSpec::write_after_read(n)).unwrap();
    show(&run);
    if shadow(&run) {
        // Reads map read-only (guest D clear); each first write faults again.
        assert!(stat(&run, "read", "pf_fixed") >= n);
        assert!(stat(&run, "write", "pf_taken") >= n);
        assert!(stat(&run, "write", "pf_fixed") >= n);
    }
}

#[test]
fn pte_rewrite() {
    if !kvm_or_skip("pte_rewrite") {
        return;
    }
    let iters = 100u32;
    for entry in [KernelEntry::Ud2, KernelEntry::Int3] {
        let run = run_workload(&WorkloadSpec::pte_rewrite(iters).with_kernel_entry(entry)).unwrap();
        show(&run);
        assert_eq!(stat(&run, "pte-rewrite", "invlpg"), 2 * u64::from(iters), "one INVLPG per rewrite");
        if shadow(&run) {
            assert!(stat(&run, "pte-rewrite", "pf_fixed") >= 2 * u64::from(iters), "each remapped page faults in");
        }
    }
}

#[test]
fn cr3_switch() {
    if !kvm_or_skip("cr3_switch") {
        return;
    }
    let (n, iters) = (256u64, 10u32);
    for entry in [KernelEntry::Ud2, KernelEntry::Int3] {
        let run = run_workload(&WorkloadSpec::cr3_switch(n, iters).with_kernel_entry(entry)).unwrap();
        show(&run);
        assert_eq!(run.checked_writes, usize::try_from(2 * n).unwrap(), "both frame windows written");
        if shadow(&run) {
            assert!(stat(&run, "touch-root1", "pf_fixed") >= n, "a new root shadows its pages anew");
            // KVM keeps the previous roots cached: switching back and forth refaults nothing.
            assert!(stat(&run, "cr3-switch", "pf_fixed") < n);
            assert!(stat(&run, "cr3-switch", "tlb_flush") >= 2 * u64::from(iters));
        }
    }
}
