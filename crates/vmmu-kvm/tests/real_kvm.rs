//! Runs the workloads on the real /dev/kvm when it can be opened; otherwise each test prints
//! "skipped: /dev/kvm not available" and returns.

use vmmu_kvm::{kvm_available, run_workload, HostKind, KvmRun, WorkloadSpec};

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
