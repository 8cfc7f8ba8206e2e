//! Zapping shadow pages: `kvm_mmu_prepare_zap_page` / `kvm_mmu_commit_zap_page`, the
//! page-count limit (`kvm_mmu_zap_oldest_mmu_pages`, `make_mmu_pages_available`),
//! `kvm_mmu_zap_all` and the rmap side of `kvm_unmap_gfn_range`.

use super::*;

impl Ctx<'_> {
    /// `kvm_mmu_prepare_zap_page`: unlinks a page from everything; it is freed by
    /// [`Ctx::commit_zap_page`] (or, if a vCPU still uses it as a root, when released).
    pub fn prepare_zap_page(&mut self, id: SpId) -> bool {
        if !self.s.pages.exists(id) || self.s.pages.get(id).role.invalid() != 0 {
            return false;
        }
        let _f = self.kvm.tracer.func(self.cpu, "kvm_mmu_prepare_zap_page");
        trace_sp(self.kvm, self.cpu, "kvm_mmu_prepare_zap_page", self.s.pages.get(id), None);
        self.kvm.stats.mmu_shadow_zapped.add(1);
        let level = self.s.pages.get(id).role.level();
        // mmu_zap_unsync_children: unsync pages below cannot be synced once unlinked.
        if level > 1 {
            loop {
                let mut batch = Vec::new();
                self.collect_unsync(id, &mut batch);
                if batch.is_empty() {
                    break;
                }
                for c in batch {
                    self.prepare_zap_page(c);
                }
            }
        }
        let spt = self.s.pages.get(id).spt_hpa();
        // kvm_mmu_page_unlink_children.
        for i in 0..512u64 {
            let sptep = spt.entry(i);
            let s = self.load(sptep);
            if s.is_shadow_present() && !s.is_last(level) {
                if let Some(child) = self.s.pages.by_spt(s.pfn()) {
                    self.drop_parent_pte(child, sptep);
                    continue;
                }
            }
            self.zap_pte(sptep);
        }
        // kvm_mmu_unlink_parents.
        for p in self.s.pages.get(id).parent_ptes.to_vec() {
            self.drop_parent_pte(id, p);
        }
        if self.s.pages.get(id).role.direct() == 0 {
            self.unaccount_shadowed(id);
        }
        if self.s.pages.get(id).nx_huge_page_disallowed {
            self.s.pages.get_mut(id).nx_huge_page_disallowed = false;
            self.kvm.unaccount_nx_huge_page(self.s.pages.get(id).spt);
        }
        if self.s.pages.get(id).unsync {
            self.s.pages.get_mut(id).unsync = false;
            self.kvm.stats.mmu_unsync.add(-1);
        }
        let sp = self.s.pages.get_mut(id);
        sp.role = sp.role.with_invalid(1);
        sp.unsync_children = 0;
        sp.unsync_child_bitmap = [0; 8];
        if sp.root_count == 0 {
            self.s.pages.deactivate(id);
            self.s.n_used_mmu_pages -= 1;
            self.s.invalid_list.push(id);
        } else {
            self.s.pages.deactivate(id);
            self.s.n_used_mmu_pages -= 1;
            self.kvm.make_all_cpus_request(req::MMU_FREE_OBSOLETE_ROOTS);
        }
        true
    }

    /// `kvm_mmu_commit_zap_page`: flush, then free the prepared pages.
    pub fn commit_zap_page(&mut self) {
        if self.s.invalid_list.is_empty() {
            return;
        }
        for id in std::mem::take(&mut self.s.invalid_list) {
            let sp = self.s.pages.remove(id);
            self.kvm.mmu.deferred_free.lock().push(sp.spt);
        }
        self.kvm.flush_and_free_deferred(self.me(), true);
    }

    /// Drops a root reference; an invalid root with no users is freed.
    pub fn put_root(&mut self, id: SpId) {
        if !self.s.pages.exists(id) {
            return;
        }
        let sp = self.s.pages.get_mut(id);
        sp.root_count -= 1;
        if sp.root_count == 0 && sp.role.invalid() != 0 {
            let sp = self.s.pages.remove(id);
            self.kvm.mmu.deferred_free.lock().push(sp.spt);
            self.kvm.flush_and_free_deferred(self.me(), true);
        }
    }

    /// `kvm_mmu_zap_oldest_mmu_pages`: zaps up to `nr` pages, oldest first, skipping roots.
    pub fn zap_oldest_mmu_pages(&mut self, nr: u64) -> u64 {
        let mut zapped = 0;
        for id in self.s.pages.active_oldest_first() {
            if zapped >= nr {
                break;
            }
            if !self.s.pages.exists(id)
                || self.s.pages.get(id).root_count > 0
                || self.s.pages.get(id).role.invalid() != 0
            {
                continue;
            }
            if self.prepare_zap_page(id) {
                zapped += 1;
            }
        }
        self.commit_zap_page();
        self.kvm.stats.mmu_recycled.add(zapped as i64);
        zapped
    }

    /// `make_mmu_pages_available`: keeps `KVM_MIN_FREE_MMU_PAGES` free, refilling to
    /// `KVM_REFILL_PAGES`.
    pub fn make_mmu_pages_available(&mut self) {
        let avail = self.s.n_max_mmu_pages.saturating_sub(self.s.n_used_mmu_pages);
        if avail >= KVM_MIN_FREE_MMU_PAGES {
            return;
        }
        self.zap_oldest_mmu_pages(KVM_REFILL_PAGES - avail);
    }

    /// `kvm_rmap_zap_collapsible_sptes`: once dirty logging is off, drops the 4 KiB and
    /// 2 MiB SPTEs of `slot` that sit in direct pages below the level their gfns may be
    /// mapped at again (`kvm_mmu_max_mapping_level`), so they fault back in huge. SPTEs in
    /// pages shadowing guest tables stay (the guest's page size decides theirs), as do all
    /// where the host maps 4 KiB: those keep their write protection until the next write.
    /// Returns whether a TLB flush is needed.
    pub fn zap_collapsible_sptes(&mut self, slot: &Memslot) -> bool {
        let mut flush = false;
        for (_, sptep) in self.s.rmap_range(&self.slots, slot.base_gfn, slot.end_gfn(), 1, 2) {
            let Some((id, _)) = self.s.pages.sptep_to_sp(sptep) else { continue };
            let sp = self.s.pages.get(id);
            let (direct, level, gfn) = (sp.role.direct() != 0, sp.role.level(), sp.gfn);
            if direct && level < crate::mmu::page_fault::kvm_mmu_max_mapping_level(self.kvm, slot, gfn) {
                self.drop_spte(sptep);
                flush = true;
            }
        }
        flush
    }

    /// Zaps everything (`kvm_mmu_zap_all`); roots in use are freed when released.
    pub fn zap_all(&mut self) {
        for id in self.s.pages.all() {
            if self.s.pages.exists(id) && self.s.pages.get(id).role.invalid() == 0 {
                self.prepare_zap_page(id);
            }
        }
        self.commit_zap_page();
    }

    /// `kvm_unmap_gfn_range` for the rmaps: zaps every leaf mapping a gfn in the range.
    pub fn unmap_gfn_range(&mut self, start: Gfn, end: Gfn) -> bool {
        let mut flush = false;
        for (_, sptep) in self.s.rmap_range(&self.slots, start, end, 1, 3) {
            self.drop_spte(sptep);
            flush = true;
        }
        flush
    }
}
