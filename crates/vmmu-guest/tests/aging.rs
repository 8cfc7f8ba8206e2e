//! Aging and idle page tracking through the MMU notifiers (kvm_age_gfn, kvm_test_age_gfn),
//! with A/D bits (the Accessed bit cleared) and without (access-tracked SPTEs restored by
//! fast page fault), under the TDP MMU, the legacy TDP MMU and shadow paging. The oracle is
//! the guest's own access pattern.

mod common;

use vmmu::host::{Backing, Hva};
use vmmu::{MmuKind, VmConfig};
use vmmu_guest::kernel::USER_BASE;
use vmmu_guest::workload::{run, KernelSpace, Workload};
use vmmu_guest::GuestKernel;

use common::MEM;

fn idle_tracking(cfg: VmConfig) {
    let what = format!("{:?} eptad={}", cfg.mmu, cfg.eptad);
    let tracked = !cfg.eptad && cfg.mmu != MmuKind::Shadow;
    let pages = 256u64;
    let common::Booted { kvm, host, hva, mut cpu, mut k, pid } = common::boot(cfg, Backing::Anon4k, pages);
    let gpa = |k: &GuestKernel, cpu: &mut vmmu::Vcpu, i: u64| {
        k.user_pte(cpu, pid, USER_BASE + i * 4096).unwrap().unwrap() & 0x000f_ffff_ffff_f000
    };
    let data: Vec<u64> = (0..pages).map(|i| gpa(&k, &mut cpu, i)).collect();
    let page_hva = |g: u64| Hva(hva.raw() + g);

    assert!(host.test_young(page_hva(data[0]), 4096), "{what}: a touched page is young");
    // The guest flushes its TLB first (a CR3 reload), so after the marking every access
    // walks the tables again. Under shadow paging the reload also syncs the unsync page
    // tables at the next entry, and sync_spte makes the synced SPTEs accessed (as KVM's
    // make_spte does when synchronizing): run once and reload again before marking.
    let cr3 = cpu.cpu().paging().cr3;
    cpu.write_cr3(cr3).unwrap();
    run(Workload::Read, &mut KernelSpace { kernel: &mut k, cpu: &mut cpu }, USER_BASE, 1).unwrap();
    cpu.write_cr3(cr3).unwrap();
    host.page_idle_mark(hva, MEM);
    assert!(!host.test_young(page_hva(data[0]), 4096), "{what}: marking idle cleared young");
    assert!(data.iter().all(|&g| host.page_idle_read(page_hva(g))), "{what}: all idle after marking");

    // The guest reads the first 100 pages: only those are young again, through the
    // hardware's Accessed bit or, without A/D bits, fast page faults restoring the
    // access-tracked SPTEs.
    let (fast, taken) = (cpu.stat.pf_fast, cpu.stat.pf_taken);
    run(Workload::Read, &mut KernelSpace { kernel: &mut k, cpu: &mut cpu }, USER_BASE, 100).unwrap();
    for (i, &g) in data.iter().enumerate() {
        assert_eq!(host.page_idle_read(page_hva(g)), i >= 100, "{what}: page {i}");
    }
    if tracked {
        assert!(cpu.stat.pf_fast - fast >= 100, "{what}: access-tracked SPTEs restored by fast page fault");
    } else {
        assert_eq!(cpu.stat.pf_taken, taken, "{what}: the Accessed bit needs no fault");
    }

    // clear_flush_young reports and clears; a second call finds nothing. On x86 it does not
    // flush (KVM_ELIDE_TLB_FLUSH_IF_YOUNG): no remote flush is requested.
    let flushes = kvm.vm_stats()["remote_tlb_flush_requests"];
    assert!(host.clear_flush_young(hva, MEM), "{what}");
    assert_eq!(kvm.vm_stats()["remote_tlb_flush_requests"], flushes, "{what}: aging elides the flush");
    assert!(!host.clear_flush_young(hva, MEM), "{what}: cleared");
    assert!(!host.test_young(hva, MEM), "{what}");
    kvm.audit().unwrap();
    // And the guest still reads what it wrote (the workload verifies its data).
    run(Workload::ReadThenWrite, &mut KernelSpace { kernel: &mut k, cpu: &mut cpu }, USER_BASE, pages).unwrap();
    assert!(host.test_young(hva, MEM), "{what}: young again");
}

#[test]
fn tdp_ad_idle_tracking() {
    idle_tracking(VmConfig { mmu: MmuKind::Tdp, eptad: true, ..Default::default() });
}

#[test]
fn tdp_access_tracking_idle_tracking() {
    idle_tracking(VmConfig { mmu: MmuKind::Tdp, eptad: false, ..Default::default() });
}

#[test]
fn legacy_tdp_ad_idle_tracking() {
    idle_tracking(VmConfig { mmu: MmuKind::LegacyTdp, eptad: true, ..Default::default() });
}

#[test]
fn legacy_tdp_access_tracking_idle_tracking() {
    idle_tracking(VmConfig { mmu: MmuKind::LegacyTdp, eptad: false, ..Default::default() });
}

#[test]
fn shadow_idle_tracking() {
    idle_tracking(VmConfig { mmu: MmuKind::Shadow, ..Default::default() });
}

/// The audit checks access-tracked SPTEs: after aging without A/D bits every leaf is
/// access-tracked and the audit passes; an access-tracked SPTE given back its W bit (W
/// without R: a write would bypass the tracking, and EPT calls it a misconfiguration) or
/// stripped of its saved bits is reported.
#[test]
fn audit_checks_access_tracked_sptes() {
    use vmmu::mmu::tdp_iter::TdpIter;
    use vmmu::x86_paging::addr::Gfn;
    let cfg = VmConfig { eptad: false, ..Default::default() };
    let common::Booted { kvm, host, hva, mut cpu, .. } = common::boot(cfg, Backing::Anon4k, 64);
    cpu.exit_guest();
    host.clear_young(hva, MEM);
    kvm.audit().unwrap();
    let root = kvm.mmu().roots.lock().iter().find(|r| !r.is_invalid()).unwrap().clone();
    let mem = host.frames().mem();
    let masks = kvm.mmu().masks;
    let mut tracked = Vec::new();
    let mut it = TdpIter::new(mem, root.hpa, root.level(), 1, Gfn::new(0), Gfn::new(MEM >> 12));
    while it.valid {
        if it.level == 1 && it.old_spte.is_access_track(&masks) {
            tracked.push((it.sptep, it.old_spte.0));
        }
        it.next();
    }
    assert!(tracked.len() >= 64, "aging access-tracked the leaves: {}", tracked.len());
    let (sptep, v) = tracked[0];
    mem.store(sptep, v | 2); // EPT W
    let e = kvm.audit().unwrap_err().to_string();
    assert!(e.contains("saved access-tracking bits but is not access-tracked"), "{e}");
    mem.store(sptep, v & !(7 << 54)); // saved R/X gone
    let e = kvm.audit().unwrap_err().to_string();
    assert!(e.contains("saved no valid R/X"), "{e}");
    mem.store(sptep, v);
    kvm.audit().unwrap();
}
