//! `fast_page_fault`: fixes a fault without taking `mmu_lock` when only the SPTE's
//! permission bits need to change — a write-protected but MMU-writable SPTE, or an
//! access-tracked one — by compare-exchange; or finds the fault spurious.

use super::page_fault::{KvmPageFault, RetPf};
use super::spte::{restore_acc_track_spte, Spte, PT_WRITABLE};
use super::tdp_mmu;
use crate::sync::Ordering;
use crate::vm::{mode, Kvm, VcpuArch};

/// Retries of the compare-exchange loop.
const FAST_PF_MAX_RETRIES: u32 = 4;

/// `page_fault_can_be_fast`.
fn page_fault_can_be_fast(kvm: &Kvm, fault: &KvmPageFault) -> bool {
    if fault.rsvd {
        return false;
    }
    if !fault.present {
        // Only an access-tracked SPTE (A/D disabled) can be fixed from "not present".
        return !kvm.config().ad_enabled();
    }
    fault.write
}

/// `is_access_allowed`.
fn is_access_allowed(kvm: &Kvm, fault: &KvmPageFault, spte: Spte) -> bool {
    let m = &kvm.mmu().masks;
    if fault.exec {
        spte.is_executable(m)
    } else if fault.write {
        spte.is_writable()
    } else {
        spte.0 & 1 != 0
    }
}

/// `walk_shadow_page_lockless_begin`: from here until [`walk_shadow_page_lockless_end`] the
/// vCPU may read SPTE tables without `mmu_lock`; a remote TLB flush waits for it
/// (READING_SHADOW_PAGE_TABLES), and tables unlinked meanwhile are freed only after that
/// flush (docs/decisions/0003).
pub(crate) fn walk_shadow_page_lockless_begin(vcpu: &VcpuArch) {
    vcpu.shared.mode.store(mode::READING_SHADOW_PAGE_TABLES, Ordering::Relaxed);
    crate::sync::barrier::light_barrier();
}

/// `walk_shadow_page_lockless_end`.
pub(crate) fn walk_shadow_page_lockless_end(vcpu: &VcpuArch) {
    vcpu.shared.mode.store(mode::OUTSIDE_GUEST_MODE, Ordering::Release);
}

/// `fast_page_fault`.
pub fn fast_page_fault(kvm: &Kvm, vcpu: &mut VcpuArch, fault: &KvmPageFault) -> RetPf {
    let _f = kvm.tracer.func(vcpu.id, "fast_page_fault");
    if !page_fault_can_be_fast(kvm, fault) {
        return RetPf::Invalid;
    }
    // The TDP MMU's root, or the legacy MMU's direct root.
    let root = match (vcpu.mmu.root.as_deref(), vcpu.shadow.root) {
        (Some(r), _) => (r.hpa, r.level()),
        (None, Some(r)) => (r.hpa, vcpu.shadow.root_role.level()),
        (None, None) => return RetPf::Invalid,
    };
    let m = kvm.mmu().masks;
    walk_shadow_page_lockless_begin(vcpu);
    let mut ret = RetPf::Invalid;
    let mut retries = 0;
    let (mut sptep, mut spte);
    loop {
        let (p, s, level) = tdp_mmu::fast_pf_get_last_sptep(kvm, root.0, root.1, fault.gfn);
        (sptep, spte) = (p, s);
        if !spte.is_shadow_present() || !spte.is_last(level) {
            break;
        }
        if is_access_allowed(kvm, fault, spte) {
            ret = RetPf::Spurious;
            break;
        }
        let mut new = spte;
        if !spte.ad_enabled(&m) && spte.is_access_track(&m) {
            new = restore_acc_track_spte(new);
        }
        if fault.write && spte.is_mmu_writable(&m) {
            new = Spte(new.0 | PT_WRITABLE);
            // A huge SPTE in a dirty-logged slot is split by the slow path instead.
            if level > 1 && vcpu.slots.find(fault.gfn).is_some_and(|s| s.dirty_logging()) {
                break;
            }
        }
        if new == spte || !is_access_allowed(kvm, fault, new) {
            break;
        }
        // fast_pf_fix_direct_spte.
        if kvm.mem().cmpxchg(sptep, spte.0, new.0).is_ok() {
            ret = RetPf::Fixed;
            // fast_pf_fix_direct_spte: W went 0 -> 1, the page is dirty.
            if !spte.is_writable() && new.is_writable() {
                if let Some(s) = vcpu.slots.find(fault.gfn) {
                    crate::dirty_log::mark_page_dirty_in_slot(vcpu.dirty_ring.as_deref(), s, fault.gfn);
                }
            }
            break;
        }
        retries += 1;
        if retries > FAST_PF_MAX_RETRIES {
            break;
        }
    }
    walk_shadow_page_lockless_end(vcpu);
    if kvm.tracer.events_on() {
        kvm.tracer.event(
            vcpu.id,
            "fast_page_fault",
            format_args!(
                "vcpu {} gva {:x} error_code {} sptep {:016x} old {:#x} new {:x} spurious {} fixed {}",
                vcpu.id,
                fault.addr.raw(),
                super::mmio::pferr_flags(fault.error_code),
                sptep.raw(),
                spte.0,
                kvm.mem().load(sptep),
                (ret == RetPf::Spurious) as u8,
                (ret == RetPf::Fixed) as u8
            ),
        );
    }
    if ret != RetPf::Invalid {
        vcpu.stat.pf_fast += 1;
    }
    ret
}
