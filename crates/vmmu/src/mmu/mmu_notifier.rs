//! KVM's MMU-notifier handlers: the host is changing the mappings of an hva range, so the
//! SPTEs mapping the gfns behind it are zapped, and faults that raced with the change retry
//! (`mmu_invalidate_seq`, `mmu_invalidate_in_progress` and the range).

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
    let m = &kvm.mmu;
    let _w = m.mmu_lock.write();
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
        let roots = m.roots.lock().clone();
        for r in roots.iter().filter(|r| !r.zapped.load(Ordering::Acquire)) {
            flush |= tdp_mmu::tdp_mmu_zap_leafs(kvm, u32::MAX, r, start, end);
        }
        // The rmaps of the shadow MMU (shadow paging and the legacy TDP MMU).
        let mut s = m.shadow.lock();
        let mut ctx = super::shadow::Ctx { kvm, s: &mut s, slots: kvm.memslots(), vcpu: None, cpu: u32::MAX };
        flush |= ctx.unmap_gfn_range(start, end);
    }
    kvm.flush_and_free_deferred(None, flush);
}

/// `kvm_mmu_notifier_invalidate_range_end`: `kvm_mmu_invalidate_end`.
pub fn invalidate_range_end(kvm: &Kvm, _range: HvaRange) {
    let m = &kvm.mmu;
    let _w = m.mmu_lock.write();
    m.mmu_invalidate_seq.fetch_add(1, Ordering::AcqRel);
    m.mmu_invalidate_in_progress.fetch_sub(1, Ordering::AcqRel);
}
