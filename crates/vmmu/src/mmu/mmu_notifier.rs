//! KVM's MMU-notifier handlers: the host is changing the mappings of an hva range, so the
//! SPTEs mapping the gfns behind it are zapped, and faults that raced with the change retry
//! (`mmu_invalidate_seq`, `mmu_invalidate_in_progress` and the range).

use super::tdp_iter::Step;
use super::tdp_mmu;
use crate::host::HvaRange;
use crate::sync::Ordering;
use crate::vm::Kvm;
use x86_paging::addr::Gfn;

/// The gfn ranges of every memslot overlapping an hva range.
fn gfn_ranges(kvm: &Kvm, range: HvaRange) -> Vec<(Gfn, Gfn)> {
    let slots = kvm.memslots();
    let mut out = Vec::new();
    for s in slots.iter() {
        let start = s.userspace_addr.raw();
        let end = start + (s.npages << 12);
        let (a, b) = (range.start.raw().max(start), range.end.raw().min(end));
        if a < b {
            let g0 = s.base_gfn.raw() + ((a - start) >> 12);
            let g1 = s.base_gfn.raw() + ((b - start).div_ceil(4096));
            out.push((Gfn::new(g0), Gfn::new(g1)));
        }
    }
    out
}

/// `kvm_mmu_notifier_invalidate_range_start`: `kvm_mmu_invalidate_begin`, widen the
/// in-progress range, and `kvm_unmap_gfn_range` (zap leaves, flush).
pub fn invalidate_range_start(kvm: &Kvm, range: HvaRange) {
    let _f = kvm.tracer.func(crate::trace::HOST_CPU, "kvm_mmu_notifier_invalidate_range_start");
    let m = &kvm.mmu;
    let w = m.mmu_lock.write();
    if m.mmu_invalidate_in_progress.fetch_add(1, Ordering::AcqRel) == 0 {
        m.mmu_invalidate_range_start.store(u64::MAX, Ordering::Release);
        m.mmu_invalidate_range_end.store(u64::MAX, Ordering::Release);
    }
    let mut flush = false;
    for (start, end) in gfn_ranges(kvm, range) {
        // kvm_mmu_invalidate_range_add.
        let s = m.mmu_invalidate_range_start.load(Ordering::Acquire);
        if s == u64::MAX {
            m.mmu_invalidate_range_start.store(start.raw(), Ordering::Release);
            m.mmu_invalidate_range_end.store(end.raw(), Ordering::Release);
        } else {
            m.mmu_invalidate_range_start.store(s.min(start.raw()), Ordering::Release);
            let e = m.mmu_invalidate_range_end.load(Ordering::Acquire);
            m.mmu_invalidate_range_end.store(e.max(end.raw()), Ordering::Release);
        }
        for r in tdp_mmu::unzapped_roots(kvm) {
            flush |= tdp_mmu::tdp_mmu_zap_leafs(kvm, u32::MAX, &r, start, end);
        }
        // The rmaps of the shadow MMU (shadow paging and the legacy TDP MMU).
        if m.have_rmaps() {
            flush |= kvm.with_shadow_mmu(&w, |ctx| ctx.unmap_gfn_range(start, end));
        }
    }
    kvm.flush_and_free_deferred(None, flush);
}

/// `kvm_mmu_notifier_invalidate_range_end`: `kvm_mmu_invalidate_end`.
pub fn invalidate_range_end(kvm: &Kvm, _range: HvaRange) {
    let _f = kvm.tracer.func(crate::trace::HOST_CPU, "kvm_mmu_notifier_invalidate_range_end");
    let m = &kvm.mmu;
    let _w = m.mmu_lock.write();
    m.mmu_invalidate_seq.fetch_add(1, Ordering::AcqRel);
    m.mmu_invalidate_in_progress.fetch_sub(1, Ordering::AcqRel);
}

/// What an aging call does with accessed SPTEs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aging {
    /// `kvm_mmu_notifier_clear_flush_young`: clear. x86 selects
    /// CONFIG_KVM_ELIDE_TLB_FLUSH_IF_YOUNG (v6.13), so no TLB flush follows: a vCPU may
    /// keep using a cached translation of a page aging just marked old (reclaim tolerates
    /// that; anything that must not, such as dirty logging or an unmap, flushes itself).
    ClearFlush,
    /// `kvm_mmu_notifier_clear_young`: clear, no flush.
    Clear,
    /// `kvm_mmu_notifier_test_young`: only report.
    Test,
}

/// `kvm_age_gfn` / `kvm_test_age_gfn` over the gfns behind an hva range, in both MMUs:
/// whether any leaf SPTE there was accessed. Clearing takes the Accessed bit away (with
/// A/D bits) or makes the SPTE access-tracked (without: R/X saved in high bits, the SPTE
/// non-present to hardware until fast page fault restores it).
pub fn age_hva_range(kvm: &Kvm, range: HvaRange, how: Aging) -> bool {
    let m = kvm.mmu.masks;
    let _f = kvm.tracer.func(
        crate::trace::HOST_CPU,
        match how {
            Aging::ClearFlush => "kvm_mmu_notifier_clear_flush_young",
            Aging::Clear => "kvm_mmu_notifier_clear_young",
            Aging::Test => "kvm_mmu_notifier_test_young",
        },
    );
    let clear = how != Aging::Test;
    let mut young = false;
    let ranges = gfn_ranges(kvm, range);
    {
        let _r = kvm.mmu.mmu_lock.read();
        let roots = tdp_mmu::valid_roots(kvm);
        for (start, end) in &ranges {
            for root in &roots {
                root.walk(kvm, 1, *start, *end, |it| {
                    let s = it.old_spte;
                    if s.is_shadow_present() && s.is_last(it.level) && s.is_accessed(&m) {
                        young = true;
                        if clear {
                            let new = super::spte::mark_spte_for_access_track(&m, s);
                            if tdp_mmu::tdp_mmu_set_spte_atomic(kvm, u32::MAX, it, new).is_err() {
                                return Step::Retry;
                            }
                        }
                    }
                    Step::Next
                });
            }
        }
    }
    // The rmaps of the shadow MMU (shadow paging and the legacy TDP MMU).
    if kvm.mmu.have_rmaps() {
        let w = kvm.mmu.mmu_lock.write();
        young |= kvm.with_shadow_mmu(&w, |ctx| {
            let mut young = false;
            for (start, end) in &ranges {
                for (_, sptep) in ctx.s.rmap_range(&ctx.slots, *start, *end, 1, 3) {
                    loop {
                        let s = super::spte::Spte(kvm.mem().load(sptep));
                        if !(s.is_shadow_present() && s.is_accessed(&m)) {
                            break;
                        }
                        young = true;
                        if !clear {
                            break;
                        }
                        let new = super::spte::mark_spte_for_access_track(&m, s);
                        if kvm.mem().cmpxchg(sptep, s.0, new.0).is_ok() {
                            break;
                        }
                    }
                }
            }
            young
        });
    }
    young
}
