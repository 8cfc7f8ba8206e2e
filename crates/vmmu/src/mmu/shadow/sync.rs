//! Unsync pages brought back in sync: `mmu_sync_children`, `mmu_unsync_walk`,
//! `kvm_sync_page`, `kvm_unlink_unsync_page`.

use super::*;

impl Ctx<'_> {
    /// `mmu_sync_children`: syncs every unsync page below `parent` (after write-protecting
    /// it again), in batches of `KVM_PAGE_ARRAY_NR`. Flushes are gathered as KVM gathers
    /// them: write protection that changed something flushes (and commits the zaps so far)
    /// before the batch is synced; what the syncs need, and the pages they zap, go in one
    /// `kvm_mmu_remote_flush_or_zap` at the end.
    pub fn sync_children(&mut self, parent: SpId) {
        let mut flush = false;
        loop {
            let mut batch = Vec::new();
            self.collect_unsync(parent, &mut batch);
            if batch.is_empty() {
                break;
            }
            let mut protected = false;
            for &id in &batch {
                let gfn = self.s.pages.get(id).gfn;
                protected |= self.write_protect_gfn(gfn, true);
            }
            if protected {
                self.remote_flush_or_zap(true);
                flush = false;
            }
            for id in batch {
                if !self.s.pages.exists(id) || !self.s.pages.get(id).unsync {
                    continue;
                }
                self.unlink_unsync_page(id);
                let r = self.sync_page(id);
                if r < 0 {
                    self.prepare_zap_page(id);
                }
                flush |= r > 0;
                self.clear_parents_unsync(id);
            }
        }
        self.remote_flush_or_zap(flush);
    }

    /// `kvm_mmu_remote_flush_or_zap`: commits the pages prepared for zapping (which
    /// flushes), or else flushes if `flush`. Returns whether it flushed.
    pub(crate) fn remote_flush_or_zap(&mut self, flush: bool) -> bool {
        if !self.s.invalid_list.is_empty() {
            self.commit_zap_page();
            true
        } else if flush {
            self.kvm.flush_remote_tlbs(self.me());
            true
        } else {
            false
        }
    }

    /// `mmu_unsync_walk`: up to 16 unsync pages below `id`; clears bitmap bits whose
    /// subtree has nothing unsync left.
    pub(super) fn collect_unsync(&mut self, id: SpId, out: &mut Vec<SpId>) {
        let spt = self.s.pages.get(id).spt_hpa();
        let level = self.s.pages.get(id).role.level();
        for w in 0..8 {
            let mut bits = self.s.pages.get(id).unsync_child_bitmap[w];
            while bits != 0 {
                if out.len() >= KVM_PAGE_ARRAY_NR {
                    return;
                }
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let index = w as u64 * 64 + b;
                let s = self.load(spt.entry(index));
                let child =
                    if s.is_shadow_present() && !s.is_last(level) { self.s.pages.by_spt(s.pfn()) } else { None };
                match child {
                    Some(c) if self.s.pages.get(c).unsync => out.push(c),
                    Some(c) if self.s.pages.get(c).unsync_children > 0 => self.collect_unsync(c, out),
                    _ => self.clear_unsync_bit(id, index),
                }
            }
        }
    }

    pub(super) fn clear_unsync_bit(&mut self, id: SpId, index: u64) {
        let sp = self.s.pages.get_mut(id);
        let (w, b) = ((index / 64) as usize, index % 64);
        if sp.unsync_child_bitmap[w] & (1 << b) != 0 {
            sp.unsync_child_bitmap[w] &= !(1 << b);
            sp.unsync_children -= 1;
        }
    }

    /// `mmu_pages_clear_parents`: a synced page no longer makes its parents unsync.
    pub(super) fn clear_parents_unsync(&mut self, id: SpId) {
        for p in self.s.pages.get(id).parent_ptes.to_vec() {
            let Some((pid, index)) = self.s.pages.sptep_to_sp(p) else { continue };
            self.clear_unsync_bit(pid, index);
            if self.s.pages.get(pid).unsync_children == 0 {
                self.clear_parents_unsync(pid);
            }
        }
    }

    /// `kvm_sync_page`: brings an unsync page's SPTEs up to date with the guest table, without
    /// write-protecting it or marking it in sync (a reuse by `kvm_mmu_get_shadow_page` keeps it
    /// unsync until the guest flushes; `mmu_sync_children` does both). Negative means it must
    /// be zapped; positive that a TLB flush is needed, which the caller does (or gathers).
    pub fn sync_page(&mut self, id: SpId) -> i32 {
        trace_sp(self.kvm, self.cpu, "kvm_mmu_sync_page", self.s.pages.get(id), None);
        let spt = self.s.pages.get(id).spt_hpa();
        let mut flush = false;
        for i in 0..512u64 {
            let sptep = spt.entry(i);
            let s = self.load(sptep);
            if !s.is_shadow_present() && !s.is_mmio(&self.kvm.mmu.masks) {
                continue;
            }
            match crate::mmu::paging_tmpl::sync_spte(self, id, i) {
                r if r < 0 => return r,
                r => flush |= r > 0,
            }
        }
        i32::from(flush)
    }

    /// `kvm_unlink_unsync_page`: the page is in sync again (its gfn was write-protected).
    pub(super) fn unlink_unsync_page(&mut self, id: SpId) {
        if self.s.pages.get(id).unsync {
            self.s.pages.get_mut(id).unsync = false;
            self.kvm.stats.mmu_unsync.add(-1);
        }
    }
}
