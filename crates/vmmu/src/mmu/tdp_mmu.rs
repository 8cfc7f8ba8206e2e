//! The TDP MMU (arch/x86/kvm/mmu/tdp_mmu.c): roots, the fault-path map, atomic SPTE
//! updates with `handle_changed_spte`, huge-page splitting and zapping.
//!
//! Faults run under `mmu_lock` held for read and install SPTEs by compare-exchange, retrying
//! the fault when another vCPU got there first; zaps of whole ranges run under the write
//! lock.

use super::page_fault::{KvmPageFault, RetPf};
use super::role::Role;
use super::spte::{
    self, make_mmio_spte, make_nonleaf_spte, make_small_spte, make_spte, Spte, SpteRequest, ACC_ALL, FROZEN_SPTE,
};
use super::tdp_iter::{self, pages_at, Step, TdpIter};
use crate::sync::{Arc, AtomicBool, AtomicU32, Ordering};
use crate::vm::{Kvm, VcpuArch};
use x86_paging::addr::{Gfn, Hpa, Pfn};

/// A TDP MMU root (a `kvm_mmu_page` on `tdp_mmu_roots`).
#[derive(Debug)]
pub struct TdpRoot {
    /// The root table.
    pub hpa: Hpa,
    /// Its role.
    pub role: Role,
    /// `tdp_mmu_root_count`: vCPU references plus the TDP MMU's own.
    pub refcount: AtomicU32,
    /// `role.invalid` (obsolete after kvm_mmu_zap_all_fast).
    pub invalid: AtomicBool,
    /// Whether its contents have been zapped after invalidation.
    pub zapped: AtomicBool,
}

impl TdpRoot {
    /// Level of the root table.
    pub fn level(&self) -> u8 {
        self.role.level()
    }

    /// Whether the root is invalid (obsolete).
    pub fn is_invalid(&self) -> bool {
        self.invalid.load(Ordering::Acquire)
    }
}

/// `for_each_valid_tdp_mmu_root`: the roots not invalidated, as a snapshot (each `Arc` keeps
/// its root alive while the caller walks it).
pub(crate) fn valid_roots(kvm: &Kvm) -> Vec<Arc<TdpRoot>> {
    kvm.mmu.roots.lock().iter().filter(|r| !r.is_invalid()).cloned().collect()
}

/// `for_each_tdp_mmu_root` with `only_valid = false`, as zapping uses it: every root whose
/// contents are still there — valid ones and invalidated ones not yet zapped.
pub(crate) fn unzapped_roots(kvm: &Kvm) -> Vec<Arc<TdpRoot>> {
    kvm.mmu.roots.lock().iter().filter(|r| !r.zapped.load(Ordering::Acquire)).cloned().collect()
}

impl TdpRoot {
    /// [`tdp_iter::walk`] over this root.
    pub(crate) fn walk(
        &self,
        kvm: &Kvm,
        min_level: u8,
        start: Gfn,
        end: Gfn,
        visit: impl FnMut(&mut TdpIter<'_>) -> Step,
    ) {
        tdp_iter::walk(kvm.mem(), self.hpa, self.level(), min_level, start, end, visit);
    }
}

/// Initializes a table frame to all-non-present.
pub(crate) fn init_table(kvm: &Kvm, pfn: Pfn) {
    let mem = kvm.mem();
    for i in 0..512 {
        mem.store(pfn.hpa().entry(i), Spte::NONPRESENT.0);
    }
}

/// `kvm_tdp_mmu_alloc_root`: a valid root with `role`, shared with other vCPUs if one exists.
pub fn kvm_tdp_mmu_alloc_root(kvm: &Kvm, role: Role) -> Result<Arc<TdpRoot>, crate::host::HostError> {
    let mut roots = kvm.mmu.roots.lock();
    if let Some(r) = roots.iter().find(|r| r.role == role && !r.is_invalid()) {
        r.refcount.fetch_add(1, Ordering::AcqRel);
        return Ok(r.clone());
    }
    let pfn = kvm.frames().alloc_4k()?;
    init_table(kvm, pfn);
    // Roots are not counted in tdp_mmu_pages (tdp_account_mmu_page runs only when a
    // table is linked below one).

    let root = Arc::new(TdpRoot {
        hpa: pfn.hpa(),
        role,
        refcount: AtomicU32::new(2),
        invalid: AtomicBool::new(false),
        zapped: AtomicBool::new(false),
    });
    roots.push(root.clone());
    Ok(root)
}

/// `kvm_tdp_mmu_put_root`: drops a reference; the last one (only possible for an invalid
/// root) unlinks the root and frees its (already zapped) table.
pub fn kvm_tdp_mmu_put_root(kvm: &Kvm, root: &Arc<TdpRoot>) {
    if root.refcount.fetch_sub(1, Ordering::AcqRel) != 1 {
        return;
    }
    kvm.mmu.roots.lock().retain(|r| !Arc::ptr_eq(r, root));
    if !root.zapped.swap(true, Ordering::AcqRel) {
        let _w = kvm.mmu.mmu_lock.write();
        tdp_mmu_zap_root(kvm, root, false);
    }
    kvm.mmu.deferred_free.lock().push(root.hpa.pfn());
}

/// `tdp_mmu_set_spte_atomic`: installs `new` if the entry still holds `iter.old_spte`; on
/// failure refreshes `iter.old_spte` and returns `Err`.
pub(crate) fn tdp_mmu_set_spte_atomic(kvm: &Kvm, cpu: u32, iter: &mut TdpIter<'_>, new: Spte) -> Result<(), ()> {
    debug_assert!(!iter.old_spte.is_frozen());
    match kvm.mem().cmpxchg(iter.sptep, iter.old_spte.0, new.0) {
        Ok(_) => {
            handle_changed_spte(kvm, cpu, iter.gfn, iter.old_spte, new, iter.level, true);
            iter.old_spte = new;
            Ok(())
        }
        Err(cur) => {
            iter.old_spte = Spte(cur);
            Err(())
        }
    }
}

/// `tdp_mmu_iter_set_spte` under the write lock (exchange, so hardware A/D updates made
/// meanwhile are not lost).
pub(crate) fn tdp_mmu_set_spte(kvm: &Kvm, cpu: u32, iter: &mut TdpIter<'_>, new: Spte) {
    let old = Spte(kvm.mem().word(iter.sptep).swap(new.0, Ordering::AcqRel));
    handle_changed_spte(kvm, cpu, iter.gfn, old, new, iter.level, false);
    iter.old_spte = new;
}

/// `handle_changed_spte`: the bookkeeping after any SPTE change — the tracepoint, page
/// stats, and tearing down a page table that was unlinked.
pub(crate) fn handle_changed_spte(kvm: &Kvm, cpu: u32, gfn: Gfn, old: Spte, new: Spte, level: u8, shared: bool) {
    if old == new {
        return;
    }
    if kvm.tracer.events_on() {
        kvm.tracer.event(
            cpu,
            "kvm_tdp_mmu_spte_changed",
            format_args!("as id 0 gfn {:x} level {} old_spte {:x} new_spte {:x}", gfn.raw(), level, old.0, new.0),
        );
    }
    let was_present = old.is_shadow_present();
    let is_present = new.is_shadow_present();
    let was_leaf = was_present && old.is_last(level);
    let is_leaf = is_present && new.is_last(level);
    debug_assert!(
        !(was_leaf && is_leaf && old.pfn() != new.pfn()),
        "a present leaf SPTE changed pfn: gfn {gfn} {old:?} -> {new:?}"
    );
    if was_leaf != is_leaf {
        kvm.stats.update_page_stats(level, if is_leaf { 1 } else { -1 });
    }
    if was_present && !was_leaf && (is_leaf || !is_present) {
        handle_removed_pt(kvm, cpu, old.child(), level - 1, gfn, shared);
    }
}

/// `handle_removed_pt`: a table was unlinked; freeze each entry, account what it mapped and
/// free the table once no walker can see it.
fn handle_removed_pt(kvm: &Kvm, cpu: u32, pt: Hpa, level: u8, base: Gfn, shared: bool) {
    kvm.mmu.tdp_mmu_pages.add(-1);
    kvm.unaccount_nx_huge_page(pt.pfn());
    let mem = kvm.mem();
    for i in 0..512u64 {
        let sptep = pt.entry(i);
        let gfn = Gfn::new(base.raw() + i * pages_at(level));
        let old = if shared {
            loop {
                let o = Spte(mem.word(sptep).swap(FROZEN_SPTE, Ordering::AcqRel));
                if !o.is_frozen() {
                    break o;
                }
                crate::sync::spin_loop();
            }
        } else {
            let o = Spte(mem.load(sptep));
            mem.store(sptep, FROZEN_SPTE);
            o
        };
        if old.is_shadow_present() || old.is_mmio(&kvm.mmu.masks) {
            handle_changed_spte(kvm, cpu, gfn, old, Spte(FROZEN_SPTE), level, shared);
        }
    }
    kvm.mmu.deferred_free.lock().push(pt.pfn());
}

/// `kvm_tdp_mmu_map`: walks from the root to the goal level, linking new tables on the way,
/// and installs the leaf.
pub fn kvm_tdp_mmu_map(kvm: &Kvm, vcpu: &mut VcpuArch, fault: &mut KvmPageFault) -> RetPf {
    let _f = kvm.tracer.func(vcpu.id, "kvm_tdp_mmu_map");
    super::page_fault::kvm_mmu_hugepage_adjust(kvm, &vcpu.slots, fault);
    if kvm.tracer.events_on() {
        kvm.tracer.event(
            vcpu.id,
            "kvm_mmu_spte_requested",
            format_args!(
                "gfn {:x} pfn {:x} level {}",
                fault.gfn.raw(),
                fault.pfn.raw() | (fault.gfn.raw() & (pages_at(fault.goal_level) - 1)),
                fault.goal_level
            ),
        );
    }
    let Some((root_hpa, root_level, ad_disabled)) =
        vcpu.mmu.root.as_deref().map(|r| (r.hpa, r.level(), r.role.ad_disabled() != 0))
    else {
        return RetPf::Retry;
    };
    let mut ret = RetPf::Retry;
    let (start, end) = (fault.gfn, Gfn::new(fault.gfn.raw() + 1));
    tdp_iter::walk(kvm.mem(), root_hpa, root_level, 1, start, end, |it| {
        if fault.nx_huge_page_workaround_enabled
            && it.level == fault.goal_level
            && it.old_spte.is_shadow_present()
            && !it.old_spte.is_large()
            && kvm.tdp_nx_huge_page_disallowed(it.old_spte.pfn())
        {
            disallowed_hugepage_adjust(fault, it.level);
        }
        if it.old_spte.is_frozen() {
            return Step::Stop;
        }
        if it.level == fault.goal_level {
            ret = tdp_mmu_map_handle_target_level(kvm, vcpu, fault, it, ad_disabled);
            return Step::Stop;
        }
        if it.old_spte.is_shadow_present() && !it.old_spte.is_large() {
            return Step::Next;
        }
        // Install a new table here: link it, or split the huge page that is in the way.
        let Some(sp) = vcpu.mmu.shadow_page_cache.pop() else { return Step::Stop };
        let level = it.level;
        if tdp_mmu_install_table(kvm, vcpu.id, it, sp, ad_disabled).is_err() {
            init_table(kvm, sp);
            vcpu.mmu.shadow_page_cache.push(sp);
            return Step::Stop;
        }
        if fault.huge_page_disallowed {
            // tdp_mmu_init_child_sp: nx_huge_page_disallowed; track_possible_nx_huge_page
            // when a huge page would have been mapped but for the mitigation.
            let base = fault.gfn.align_down(level);
            kvm.account_nx_huge_page(sp, base, level, fault.req_level >= level, true);
        }
        Step::Next
    });
    ret
}

/// `tdp_mmu_link_sp`, or `tdp_mmu_split_huge_page` when the entry is a huge leaf: links table
/// `sp` at the iterator's entry (non-present or huge), after filling it with the huge page's
/// 512 pieces one level down (`make_small_spte`) so the mapping stays the same. On `Err` the
/// entry changed under us (`old_spte` refreshed) and `sp` is the caller's again.
fn tdp_mmu_install_table(kvm: &Kvm, cpu: u32, it: &mut TdpIter<'_>, sp: Pfn, ad_disabled: bool) -> Result<(), ()> {
    let masks = kvm.mmu.masks;
    let (huge, level) = (it.old_spte, it.level);
    let split = huge.is_shadow_present();
    debug_assert!(!split || huge.is_large(), "only a huge leaf is split");
    if split {
        for i in 0..512u64 {
            let child = make_small_spte(&masks, huge, level, i, kvm.nx_huge_pages());
            kvm.mem().store(sp.hpa().entry(i), child.0);
        }
    }
    let link = make_nonleaf_spte(&masks, sp.hpa(), ad_disabled);
    let r = tdp_mmu_set_spte_atomic(kvm, cpu, it, link);
    if r.is_ok() {
        kvm.mmu.tdp_mmu_pages.add(1);
        if split {
            kvm.stats.update_page_stats(level - 1, 512);
        }
    }
    if split && kvm.tracer.events_on() {
        // tdp_mmu_split_huge_page traces the huge SPTE it replaced, and -EBUSY when it
        // lost the race to replace it.
        kvm.tracer.event(
            cpu,
            "kvm_mmu_split_huge_page",
            format_args!(
                "gfn {:x} spte {:x} level {} errno {}",
                it.gfn.raw(),
                huge.0,
                level,
                if r.is_ok() { 0 } else { -16 }
            ),
        );
    }
    r
}

/// `disallowed_hugepage_adjust`: under the NX mitigation, a table that a fetch made (its
/// `nx_huge_page_disallowed` flag; the caller checked it) is not replaced by a huge page
/// again: map at the next level down, patching the pfn's next 9 bits back in.
pub(crate) fn disallowed_hugepage_adjust(fault: &mut KvmPageFault, level: u8) {
    if level > 1 && level == fault.goal_level {
        fault.goal_level -= 1;
        let pages = pages_at(fault.goal_level);
        fault.pfn = Pfn::new(fault.pfn.raw() | (fault.gfn.raw() & (pages_at(level) - 1) & !(pages - 1)));
    }
}

/// `tdp_mmu_map_handle_target_level`: builds and installs the leaf (or MMIO) SPTE.
fn tdp_mmu_map_handle_target_level(
    kvm: &Kvm,
    vcpu: &mut VcpuArch,
    fault: &mut KvmPageFault,
    it: &mut TdpIter<'_>,
    ad_disabled: bool,
) -> RetPf {
    let masks = kvm.mmu.masks;
    if fault.prefetch && it.old_spte.is_shadow_present() && it.old_spte.is_last(it.level) {
        // Prefetching what is already mapped: leave it (and its Accessed bit) alone.
        return RetPf::Spurious;
    }
    let new = if fault.slot.is_none() {
        make_mmio_spte(&masks, it.gfn, ACC_ALL, vcpu.slots.generation())
    } else {
        let req = SpteRequest {
            level: it.level,
            pfn: fault.pfn,
            access: ACC_ALL,
            prefetch: false,
            synchronizing: false,
            host_writable: fault.map_writable,
            nx_huge_pages: kvm.nx_huge_pages(),
            ad_disabled,
        };
        make_spte(&masks, &req, it.old_spte, || true).0
    };
    let mut ret = RetPf::Fixed;
    if new == it.old_spte {
        // Nothing to change (another vCPU fixed it first); still traced below, as KVM does.
        ret = RetPf::Spurious;
    } else {
        let was_nonleaf = it.old_spte.is_shadow_present() && !it.old_spte.is_last(it.level);
        if tdp_mmu_set_spte_atomic(kvm, vcpu.id, it, new).is_err() {
            return RetPf::Retry;
        }
        if was_nonleaf {
            // A table was replaced by a huge page: other vCPUs may cache its translations.
            kvm.flush_remote_tlbs(Some(vcpu.id));
        }
    }
    if new.is_writable() {
        // make_spte -> mark_page_dirty_in_slot: a writable mapping may be written at once
        // (marked even when nothing changed: make_spte runs before the comparison).
        if let Some(slot) = fault.slot.map(|i| vcpu.slots.at(i)) {
            crate::dirty_log::mark_page_dirty_in_slot(vcpu.dirty_ring.as_deref(), slot, fault.gfn);
        }
    }
    if new.is_mmio(&masks) {
        vcpu.stat.pf_mmio_spte_created += 1;
        if kvm.tracer.events_on() {
            kvm.tracer.event(
                vcpu.id,
                "mark_mmio_spte",
                format_args!(
                    "sptep:{:016x} gfn {:x} access {:x} gen {:x}",
                    it.sptep.raw(),
                    it.gfn.raw(),
                    spte::ACC_ALL,
                    new.mmio_gen()
                ),
            );
        }
        return RetPf::Emulate;
    }
    if kvm.tracer.events_on() {
        kvm.tracer.event(
            vcpu.id,
            "kvm_mmu_set_spte",
            format_args!("{}", spte::set_spte_trace(&masks, it.gfn, new, it.level, it.sptep)),
        );
    }
    ret
}

/// Zaps every leaf SPTE of `root` mapping a gfn in [start, end) (`tdp_mmu_zap_leafs`);
/// returns whether a TLB flush is needed. Caller holds `mmu_lock` for write.
pub fn tdp_mmu_zap_leafs(kvm: &Kvm, cpu: u32, root: &TdpRoot, start: Gfn, end: Gfn) -> bool {
    let _f = kvm.tracer.func(cpu, "tdp_mmu_zap_leafs");
    let mut flush = false;
    root.walk(kvm, 1, start, end, |it| {
        let s = it.old_spte;
        if (s.is_shadow_present() && s.is_last(it.level)) || s.is_mmio(&kvm.mmu.masks) {
            // A huge leaf only partly inside the range goes whole: the rest faults back in.
            tdp_mmu_set_spte(kvm, cpu, it, Spte::NONPRESENT);
            flush |= s.is_shadow_present();
            Step::SkipChildren
        } else {
            Step::Next
        }
    });
    flush
}

/// Zaps a whole root (`tdp_mmu_zap_root`): every top-level entry (a walk with the root's
/// level as its lowest), tearing down all tables below it through `handle_removed_pt`. The
/// entry is exchanged, not compare-exchanged: whatever a racing walker left there goes.
pub fn tdp_mmu_zap_root(kvm: &Kvm, root: &TdpRoot, shared: bool) {
    let mem = kvm.mem();
    let level = root.level();
    // The gfns one root maps: 512 entries of pages_at(level) each.
    let end = Gfn::new(pages_at(level) * 512);
    root.walk(kvm, level, Gfn::new(0), end, |it| {
        let old = Spte(mem.word(it.sptep).swap(Spte::NONPRESENT.0, Ordering::AcqRel));
        if old.is_shadow_present() || old.is_mmio(&kvm.mmu.masks) {
            handle_changed_spte(kvm, u32::MAX, it.gfn, old, Spte::NONPRESENT, level, shared);
        }
        Step::SkipChildren
    });
}

/// `kvm_tdp_mmu_invalidate_all_roots`: marks every root invalid (obsolete); vCPUs drop them
/// on KVM_REQ_MMU_FREE_OBSOLETE_ROOTS. Caller holds `mmu_lock` for write.
pub fn kvm_tdp_mmu_invalidate_all_roots(kvm: &Kvm) {
    for r in kvm.mmu.roots.lock().iter() {
        r.invalid.store(true, Ordering::Release);
    }
}

/// `kvm_tdp_mmu_zap_invalidated_roots`: zaps invalid roots and drops the TDP MMU's own
/// reference to each.
pub fn kvm_tdp_mmu_zap_invalidated_roots(kvm: &Kvm) {
    let _f = kvm.tracer.func(crate::trace::HOST_CPU, "kvm_tdp_mmu_zap_invalidated_roots");
    let roots: Vec<Arc<TdpRoot>> =
        kvm.mmu.roots.lock().iter().filter(|r| r.is_invalid() && !r.zapped.load(Ordering::Acquire)).cloned().collect();
    for r in roots {
        {
            let _r = kvm.mmu.mmu_lock.read();
            if !r.zapped.swap(true, Ordering::AcqRel) {
                tdp_mmu_zap_root(kvm, &r, true);
            }
        }
        kvm_tdp_mmu_put_root(kvm, &r);
    }
}

/// `kvm_tdp_mmu_fast_pf_get_last_sptep`: the last SPTE on the path to `gfn` (a leaf, or the
/// first non-present entry), read without locks.
pub fn fast_pf_get_last_sptep(kvm: &Kvm, root: Hpa, root_level: u8, gfn: Gfn) -> (Hpa, Spte, u8) {
    tdp_iter::last_spte(kvm.mem(), root, root_level, gfn)
}

/// `kvm_tdp_mmu_try_split_huge_pages`: replaces every huge leaf SPTE mapping a gfn in
/// [start, end) by a table of 512 SPTEs one level down with the same pfns and permissions
/// (a 1 GiB page goes to 2 MiB pages, which the walk then meets and splits to 4 KiB).
/// Runs under `mmu_lock` for read with compare-exchange; returns the pages split.
pub fn kvm_tdp_mmu_try_split_huge_pages(kvm: &Kvm, start: Gfn, end: Gfn) -> Result<u64, crate::host::HostError> {
    let _r = kvm.mmu.mmu_lock.read();
    let mut split = 0;
    let mut failed = None;
    for root in valid_roots(kvm) {
        let ad_disabled = root.role.ad_disabled() != 0;
        root.walk(kvm, 1, start, end, |it| {
            if it.level > 1 && it.old_spte.is_shadow_present() && it.old_spte.is_large() {
                let sp = match kvm.frames().alloc_4k() {
                    Ok(sp) => sp,
                    Err(e) => {
                        failed = Some(e);
                        return Step::Stop;
                    }
                };
                if tdp_mmu_install_table(kvm, u32::MAX, it, sp, ad_disabled).is_err() {
                    kvm.frames().free_4k(sp);
                    return Step::Retry;
                }
                split += 1;
            }
            Step::Next
        });
        if let Some(e) = failed {
            return Err(e);
        }
    }
    Ok(split)
}

/// `kvm_tdp_mmu_recover_huge_pages` (v6.13; before it, `kvm_tdp_mmu_zap_collapsible_sptes`):
/// once dirty logging is off, every table of `slot` under an entry that may map huge again
/// (`kvm_mmu_max_mapping_level`) is replaced in place by a huge SPTE built from one of its
/// leaves (`make_huge_spte`): the same permissions — a write-protected page stays so until
/// its next write, a fast page fault — and no refault. Runs under `mmu_lock` for read;
/// returns whether a TLB flush is needed.
pub fn kvm_tdp_mmu_recover_huge_pages(kvm: &Kvm, slot: &crate::memslot::Memslot) -> bool {
    let (start, end) = (slot.base_gfn, slot.end_gfn());
    let masks = kvm.mmu.masks;
    let _r = kvm.mmu.mmu_lock.read();
    let mut flush = false;
    for root in valid_roots(kvm) {
        root.walk(kvm, 2, start, end, |it| {
            let s = it.old_spte;
            let pages = pages_at(it.level);
            // Only a table can become huge; one that reaches outside the slot cannot.
            if it.level > 3
                || !s.is_shadow_present()
                || s.is_last(it.level)
                || it.gfn < start
                || it.gfn.raw() + pages > end.raw()
                || super::page_fault::kvm_mmu_max_mapping_level(kvm, slot, it.gfn) < it.level
            {
                return Step::Next;
            }
            // kvm_tdp_mmu_make_huge_spte: any present leaf below gives the huge page's pfn
            // and permissions.
            let mut leaf = None;
            let child_end = Gfn::new(it.gfn.raw() + pages);
            tdp_iter::walk(kvm.mem(), s.child(), it.level - 1, 1, it.gfn, child_end, |c| {
                if c.old_spte.is_shadow_present() && c.old_spte.is_last(c.level) {
                    leaf = Some(c.old_spte);
                    return Step::Stop;
                }
                Step::Next
            });
            let Some(leaf) = leaf else { return Step::Next };
            let huge = spte::make_huge_spte(&masks, leaf, it.level, kvm.nx_huge_pages());
            if tdp_mmu_set_spte_atomic(kvm, u32::MAX, it, huge).is_err() {
                return Step::Retry;
            }
            flush = true;
            Step::Next
        });
    }
    flush
}

/// `kvm_tdp_mmu_wrprot_slot`: clears W on every leaf SPTE mapping a gfn in [start, end),
/// keeping MMU-writable so the next write is fixed by fast page fault (dirty logging in
/// write-protect mode). The caller flushes, changed or not (see `Kvm::rearm_range`).
pub fn kvm_tdp_mmu_wrprot_slot(kvm: &Kvm, start: Gfn, end: Gfn) {
    clear_leaf_bits(kvm, start, end, |_| spte::PT_WRITABLE)
}

/// `kvm_tdp_mmu_clear_dirty_slot` with `remove_write_access(PG_LEVEL_2M)`: clears D on every
/// 4 KiB leaf in [start, end) (PML logs the next write) and W on huge leaves (the next write
/// splits them). SPTEs without A/D bits are write-protected instead. The caller flushes.
pub fn kvm_tdp_mmu_clear_dirty_slot(kvm: &Kvm, start: Gfn, end: Gfn) {
    let dirty = kvm.mmu.masks.dirty;
    clear_leaf_bits(kvm, start, end, |level| if level == 1 && dirty != 0 { dirty } else { spte::PT_WRITABLE })
}

/// Clears `bits(level)` on every present leaf SPTE mapping a gfn in [start, end), in every
/// valid root, under `mmu_lock` for read with compare-exchange.
fn clear_leaf_bits(kvm: &Kvm, start: Gfn, end: Gfn, bits: impl Fn(u8) -> u64) {
    let _r = kvm.mmu.mmu_lock.read();
    for root in valid_roots(kvm) {
        root.walk(kvm, 1, start, end, |it| {
            let s = it.old_spte;
            let clear = bits(it.level);
            let leaf = s.is_shadow_present() && s.is_last(it.level) && s.0 & clear != 0;
            if leaf && tdp_mmu_set_spte_atomic(kvm, u32::MAX, it, Spte(s.0 & !clear)).is_err() {
                return Step::Retry;
            }
            Step::Next
        });
    }
}
