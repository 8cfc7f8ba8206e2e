//! Runs the workloads on the real /dev/kvm when it can be opened; otherwise each test prints
//! "skipped: /dev/kvm not available" and returns.

use vmmu_kvm::{kvm_available, run_workload, KernelEntry, KvmRun, WorkloadSpec};

fn kvm_or_skip(test: &str) -> bool {
    match kvm_available() {
        Ok(()) => true,
        Err(e) => {
            println!("{test}: skipped: /dev/kvm not available ({e})");
            false
        }
    }
}

fn show(run: &KvmRun) {
    println!("{} on {}", run.workload, run.host);
    const KEYS: &[&str] = &[
        "pf_taken",
        "pf_fixed",
        "pf_emulate",
        "pf_spurious",
        "pf_fast",
        "pf_guest",
        "invlpg",
        "tlb_flush",
        "exits",
        "io_exits",
        "mmu_shadow_zapped",
        "mmu_pte_write",
        "mmu_pde_zapped",
        "mmu_flooded",
        "mmu_unsync",
        "mmu_cache_miss",
        "mmu_recycled",
        "remote_tlb_flush",
        "pages_4k",
        "pages_2m",
    ];
    for p in &run.phases {
        let s: Vec<String> = KEYS.iter().filter_map(|k| p.stat(k).map(|v| format!("{k}={v}"))).collect();
        println!("  {:<12} {:>10} ns  {}", p.name, p.wall_ns, s.join(" "));
    }
}

#[test]
fn first_touch() {
    if !kvm_or_skip("first_touch") {
        return;
    }
    let n = 1024;
    let run = run_workload(&WorkloadSpec::first_touch(n)).unwrap();
    show(&run);
}

#[test]
fn write_after_read() {
    if !kvm_or_skip("write_after_read") {
        return;
    }
    let run = run_workload(&WorkloadSpec::write_after_read(1024)).unwrap();
    show(&run);
}

#[test]
fn pte_rewrite() {
    if !kvm_or_skip("pte_rewrite") {
        return;
    }
    let run = run_workload(&WorkloadSpec::pte_rewrite(100)).unwrap();
    show(&run);
    let run = run_workload(&WorkloadSpec::pte_rewrite(100).with_kernel_entry(KernelEntry::Int3)).unwrap();
    show(&run);
}

#[test]
fn cr3_switch() {
    if !kvm_or_skip("cr3_switch") {
        return;
    }
    let run = run_workload(&WorkloadSpec::cr3_switch(256, 10)).unwrap();
    show(&run);
    let run = run_workload(&WorkloadSpec::cr3_switch(256, 10).with_kernel_entry(KernelEntry::Int3)).unwrap();
    show(&run);
}
