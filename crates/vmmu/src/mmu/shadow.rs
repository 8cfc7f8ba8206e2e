//! The shadow MMU (the parts of mmu/mmu.c that are not the TDP MMU): shadow pages and their
//! cache, linking, `mmu_set_spte`, rmaps and write protection, unsync and sync, zapping,
//! page-count limits, roots and the fast CR3 switch, INVLPG, and guest page-table writes
//! (`kvm_mmu_track_write`). The guest-format parts (the walk, `FNAME(fetch)`, prefetch,
//! `sync_spte`) are in [`super::paging_tmpl`].
//!
//! Everything here runs under `mmu_lock` held for write (the `ShadowMmu` mutex, taken
//! while holding it), as KVM's shadow MMU does.

use super::page::{MmuPages, ShadowPage, SpId};
use super::page_track::WriteTrack;
use super::rmap::{Rmaps, RMAP_RECYCLE_THRESHOLD};
use super::role::Role;
use super::spte::{make_mmio_spte, make_nonleaf_spte, make_spte, Spte, SpteRequest, ACC_ALL};
use super::tdp_iter::{pages_at, spte_index};
use super::RetPf;
use crate::memslot::{Memslot, Memslots};
use crate::sync::Arc;
use crate::vm::{req, Kvm, VcpuArch};
use x86_paging::addr::{Gfn, Hpa, Pfn};

/// `KVM_MIN_FREE_MMU_PAGES`.
pub const KVM_MIN_FREE_MMU_PAGES: u64 = 5;
/// `KVM_REFILL_PAGES`.
pub const KVM_REFILL_PAGES: u64 = 25;
/// `KVM_MIN_ALLOC_MMU_PAGES`.
pub const KVM_MIN_ALLOC_MMU_PAGES: u64 = 64;
/// `KVM_MEMSLOT_PAGES_TO_MMU_PAGES_RATIO`.
pub const KVM_MEMSLOT_PAGES_TO_MMU_PAGES_RATIO: u64 = 50;
/// `KVM_PAGE_ARRAY_NR`: unsync pages synced per batch.
pub const KVM_PAGE_ARRAY_NR: usize = 16;
/// `KVM_MMU_NUM_PREV_ROOTS`.
pub const KVM_MMU_NUM_PREV_ROOTS: usize = 3;

/// The shadow MMU's VM-wide state.
#[derive(Debug, Default)]
pub struct ShadowMmu {
    /// Shadow pages.
    pub pages: MmuPages,
    /// Reverse maps.
    pub rmaps: Rmaps,
    /// Write tracking.
    pub write_track: WriteTrack,
    /// `n_used_mmu_pages`.
    pub n_used_mmu_pages: u64,
    /// `n_max_mmu_pages`.
    pub n_max_mmu_pages: u64,
    /// `n_requested_mmu_pages` (KVM_SET_NR_MMU_PAGES; 0 = default).
    pub n_requested_mmu_pages: u64,
    /// `indirect_shadow_pages`.
    pub indirect_shadow_pages: u64,
    /// `mmu_valid_gen`.
    pub mmu_valid_gen: u64,
    /// Pages prepared for zapping, freed by `kvm_mmu_commit_zap_page`.
    pub invalid_list: Vec<SpId>,
}

/// One cached root (`struct kvm_mmu_root_info`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootInfo {
    /// The guest CR3 it shadows.
    pub pgd: u64,
    /// Its shadow page.
    pub sp: SpId,
    /// Its table.
    pub hpa: Hpa,
}

/// The vCPU's shadow-MMU state.
#[derive(Debug, Default)]
pub struct VcpuShadow {
    /// Current root.
    pub root: Option<RootInfo>,
    /// `prev_roots`, most recent first.
    pub prev_roots: Vec<RootInfo>,
    /// The role roots are made with (from CR0/CR4/EFER).
    pub root_role: Role,
    /// A #PF to inject into the guest after the exit.
    pub pending_pf: Option<(u64, u32)>,
    /// PAE shadow roots (`pae_root`): one page per PDPTE, for PAE and non-paging guests.
    /// When set, `root` only marks the roots as loaded.
    pub pae: Option<[Option<SpId>; 4]>,
}

/// `RootInfo::sp` of the marker root that stands for a set of PAE roots.
pub const PAE_ROOTS: SpId = SpId::MAX;

impl VcpuShadow {
    /// The shadow page a walk of `gva` starts at, and its level.
    pub fn root_for(&self, gva: u64) -> Option<(SpId, u8)> {
        match &self.pae {
            Some(p) => p[((gva >> 30) & 3) as usize].map(|sp| (sp, 2)),
            None => self.root.map(|r| (r.sp, self.root_role.level() as u8)),
        }
    }

    /// Every root shadow page in use (current, PAE, previous).
    pub fn all_roots(&self) -> Vec<SpId> {
        let mut v: Vec<SpId> = self.pae.iter().flatten().flatten().copied().collect();
        v.extend(self.root.iter().chain(self.prev_roots.iter()).map(|r| r.sp).filter(|s| *s != PAE_ROOTS));
        v
    }
}

/// `struct kvm_shadow_walk_iterator` (`for_each_shadow_entry`): the path of shadow pages
/// from a root towards `addr` — a gva under shadow paging, a gpa for direct pages — one entry
/// per level. The caller holds the shadow state; it reads or changes the current entry and
/// then steps down with [`ShadowWalk::next`] (into whatever the entry links now, so a child
/// it just linked is followed) or [`ShadowWalk::descend`] (into a child it already knows).
#[derive(Debug, Clone, Copy)]
pub struct ShadowWalk {
    /// The shadow page holding the current entry.
    pub sp: SpId,
    /// Its level.
    pub level: u8,
    addr: u64,
}

impl ShadowWalk {
    /// `shadow_walk_init_using_root`: the root's entry for `addr`.
    pub fn new(pages: &MmuPages, root: SpId, addr: u64) -> Self {
        ShadowWalk { sp: root, level: pages.get(root).role.level() as u8, addr }
    }

    /// Index of the current entry in its page.
    pub fn index(&self) -> u64 {
        spte_index(self.addr >> 12, self.level)
    }

    /// Address of the current entry.
    pub fn sptep(&self, pages: &MmuPages) -> Hpa {
        pages.get(self.sp).sptep(self.index())
    }

    /// Steps into `child`, the page the current entry links.
    pub fn descend(&mut self, child: SpId) {
        self.sp = child;
        self.level -= 1;
    }

    /// `shadow_walk_next`: steps into the page the current entry links now; false (and no
    /// step) at a leaf or non-present entry, or a table with no shadow page.
    pub fn next(&mut self, pages: &MmuPages, mem: &crate::host::PhysMem) -> bool {
        let spte = Spte(mem.load(self.sptep(pages)));
        if !spte.is_shadow_present() || spte.is_last(self.level) {
            return false;
        }
        match pages.by_spt(spte.pfn()) {
            Some(c) => {
                self.descend(c);
                true
            }
            None => false,
        }
    }
}

fn trace_sp(kvm: &Kvm, cpu: u32, name: &'static str, sp: &ShadowPage, created: Option<bool>) {
    if !kvm.tracer.events_on() {
        return;
    }
    const ACC: [&str; 8] = ["---", "--x", "w--", "w-x", "-u-", "-ux", "wu-", "wux"];
    let r = sp.role;
    let text = format!(
        "sp gen {} gfn {:x} l{} {}-byte q{}{} {}{} {}nxe {}ad root {} {}{}",
        sp.mmu_valid_gen,
        sp.gfn.raw(),
        r.level(),
        if r.has_4_byte_gpte() != 0 { 4 } else { 8 },
        r.quadrant(),
        if r.direct() != 0 { " direct" } else { "" },
        ACC[r.access() as usize & 7],
        if r.invalid() != 0 { " invalid" } else { "" },
        if r.efer_nx() != 0 { "" } else { "!" },
        if r.ad_disabled() != 0 { "!" } else { "" },
        sp.root_count,
        if sp.unsync { "unsync" } else { "sync" },
        match created {
            Some(true) => " new",
            Some(false) => " existing",
            None => "",
        }
    );
    kvm.tracer.event(cpu, name, format_args!("{text}"));
}

impl ShadowMmu {
    /// The memslot limit on shadow pages: memslot pages / 50, at least 64, unless set.
    pub fn update_n_max(&mut self, slots: &Memslots) {
        if self.n_requested_mmu_pages == 0 {
            self.n_max_mmu_pages =
                (slots.total_pages() / KVM_MEMSLOT_PAGES_TO_MMU_PAGES_RATIO).max(KVM_MIN_ALLOC_MMU_PAGES);
        } else {
            self.n_max_mmu_pages = self.n_requested_mmu_pages;
        }
    }

    /// `for_each_slot_rmap_range`: the (level, sptep) of every rmap entry for a gfn in
    /// [start, end) at levels `min_level..=max_level` — slot by slot, level by level, in gfn
    /// order; or, when the range spans more gfns than the rmaps have heads (a large slot,
    /// mostly unmapped), from one pass over the heads, so the cost follows what is mapped
    /// and not the range. A huge mapping that only overlaps the range is included. The
    /// result is a snapshot: the caller may change the rmaps while it goes through it.
    pub fn rmap_range(&self, slots: &Memslots, start: Gfn, end: Gfn, min_level: u8, max_level: u8) -> Vec<(u8, Hpa)> {
        if end.raw().saturating_sub(start.raw()) > self.rmaps.heads() as u64 {
            self.rmap_range_by_heads(start, end, min_level, max_level)
        } else {
            self.rmap_range_by_gfn(slots, start, end, min_level, max_level)
        }
    }

    /// [`ShadowMmu::rmap_range`] gfn by gfn: slot by slot, level by level, in gfn order.
    pub fn rmap_range_by_gfn(
        &self,
        slots: &Memslots,
        start: Gfn,
        end: Gfn,
        min_level: u8,
        max_level: u8,
    ) -> Vec<(u8, Hpa)> {
        let mut out = Vec::new();
        for slot in slots.iter() {
            let (s, e) = (start.raw().max(slot.base_gfn.raw()), end.raw().min(slot.end_gfn().raw()));
            if s >= e {
                continue;
            }
            for level in min_level..=max_level {
                let per = pages_at(level);
                let mut g = s & !(per - 1);
                while g < e {
                    out.extend(self.rmaps.get(slot, Gfn::new(g.max(s)), level).into_iter().map(|p| (level, p)));
                    g += per;
                }
            }
        }
        out
    }

    /// [`ShadowMmu::rmap_range`] from one pass over every rmap head, keeping the entries
    /// whose mapping overlaps the range.
    pub fn rmap_range_by_heads(&self, start: Gfn, end: Gfn, min_level: u8, max_level: u8) -> Vec<(u8, Hpa)> {
        self.rmaps
            .all()
            .into_iter()
            .filter(|&(_, level, sptep)| {
                (min_level..=max_level).contains(&level)
                    && self.pages.sptep_to_sp(sptep).is_some_and(|(id, index)| {
                        let gfn = self.sp_gfn_at(id, index);
                        gfn.raw() + pages_at(level) > start.raw() && gfn.raw() < end.raw()
                    })
            })
            .map(|(_, level, sptep)| (level, sptep))
            .collect()
    }

    /// `kvm_mmu_page_get_gfn`: the gfn the SPTE at `index` of `sp` maps.
    pub fn sp_gfn_at(&self, id: SpId, index: u64) -> Gfn {
        let sp = self.pages.get(id);
        match &sp.shadowed_translation {
            Some(t) if sp.role.direct() == 0 => Gfn::new(t[index as usize] >> 12),
            _ => Gfn::new(sp.gfn.raw() + index * pages_at(sp.role.level() as u8)),
        }
    }

    /// `kvm_mmu_page_get_access`.
    pub fn sp_access_at(&self, id: SpId, index: u64) -> u8 {
        let sp = self.pages.get(id);
        match &sp.shadowed_translation {
            Some(t) if sp.role.direct() == 0 => (t[index as usize] & 7) as u8,
            _ => sp.role.access() as u8,
        }
    }

    fn set_translation(&mut self, id: SpId, index: u64, gfn: Gfn, access: u8) {
        if let Some(t) = self.pages.get_mut(id).shadowed_translation.as_mut() {
            t[index as usize] = (gfn.raw() << 12) | u64::from(access);
        }
    }
}

/// `kvm_mmu_child_role`.
pub fn kvm_mmu_child_role(parent: Role, direct: bool, access: u8) -> Role {
    parent
        .with_level(parent.level() - 1)
        .with_direct(u32::from(direct))
        .with_access(u32::from(access))
        .with_passthrough(0)
        .with_quadrant(0)
}

/// `kvm_mmu_child_role` for the SPTE at `index` of a page: a 32-bit guest's page table (4 MiB)
/// is shadowed by two PAE tables, and which half a child shadows is its quadrant.
pub fn child_role_at(parent: Role, index: u64, direct: bool, access: u8) -> Role {
    let r = kvm_mmu_child_role(parent, direct, access);
    if r.has_4_byte_gpte() != 0 && r.level() == 1 {
        r.with_quadrant((index & 1) as u32)
    } else {
        r
    }
}

/// Context the shadow functions need: the VM, the shadow state (under the lock), the
/// memslots, and the vCPU when the work comes from one (faults, INVLPG, CR3 writes; not
/// MMU-notifier zaps).
pub struct Ctx<'a> {
    /// The VM.
    pub kvm: &'a Kvm,
    /// The shadow state.
    pub s: &'a mut ShadowMmu,
    /// Memslots.
    pub slots: Arc<Memslots>,
    /// The vCPU.
    pub vcpu: Option<&'a mut VcpuArch>,
    /// CPU number for traces and the flush's "me".
    pub cpu: u32,
}

impl Ctx<'_> {
    fn mem(&self) -> &crate::host::PhysMem {
        self.kvm.mem()
    }

    fn load(&self, sptep: Hpa) -> Spte {
        Spte(self.mem().load(sptep))
    }

    fn store(&self, sptep: Hpa, v: Spte) {
        self.mem().store(sptep, v.0)
    }

    fn slot_of(&self, gfn: Gfn) -> Option<&Memslot> {
        self.slots.find(gfn).map(|s| &**s)
    }

    fn me(&self) -> Option<u32> {
        self.vcpu.as_ref().map(|v| v.id)
    }

    /// A zeroed (non-present) table frame from the vCPU's cache.
    fn alloc_table(&mut self) -> Pfn {
        match self.vcpu.as_mut().and_then(|v| v.mmu.shadow_page_cache.pop()) {
            Some(p) => p,
            None => {
                // The cache was topped up before the lock; refill from the host if a long
                // walk used it all (KVM's cache fallback to GFP_ATOMIC).
                let p = self.kvm.frames().alloc_4k().expect("host memory exhausted while allocating a shadow page");
                super::tdp_mmu::init_table(self.kvm, p);
                p
            }
        }
    }

    /// `kvm_mmu_get_shadow_page`: finds or creates the page for (gfn, role).
    pub fn get_shadow_page(&mut self, gfn: Gfn, role: Role) -> SpId {
        let mut collisions = 0i64;
        for id in self.s.pages.bucket(gfn) {
            if !self.s.pages.exists(id) {
                continue;
            }
            let sp = self.s.pages.get(id);
            if sp.gfn != gfn {
                collisions += 1;
                continue;
            }
            if sp.role != role {
                // A page table that is now used at another level cannot stay unsync.
                if role.level() > 1 && sp.unsync {
                    self.prepare_zap_page(id);
                }
                continue;
            }
            if role.direct() == 0 && self.s.pages.get(id).unsync && self.sync_page(id) < 0 {
                self.prepare_zap_page(id);
                continue;
            }
            self.s.pages.get_mut(id).write_flooding_count = 0;
            trace_sp(self.kvm, self.cpu, "kvm_mmu_get_page", self.s.pages.get(id), Some(false));
            self.kvm.stats.max_mmu_page_hash_collisions.raise(collisions);
            return id;
        }
        self.kvm.stats.max_mmu_page_hash_collisions.raise(collisions);
        self.kvm.stats.mmu_cache_miss.add(1);
        let spt = self.alloc_table();
        let id = self.s.pages.insert(gfn, role, spt, self.s.mmu_valid_gen);
        self.s.n_used_mmu_pages += 1;
        if role.direct() == 0 {
            self.account_shadowed(id);
        }
        trace_sp(self.kvm, self.cpu, "kvm_mmu_get_page", self.s.pages.get(id), Some(true));
        id
    }

    /// `account_shadowed`: upper-level guest tables are write-tracked; last-level ones are
    /// write-protected (they may go unsync). Huge pages over the gfn are disallowed.
    fn account_shadowed(&mut self, id: SpId) {
        let (gfn, level) = {
            let sp = self.s.pages.get(id);
            (sp.gfn, sp.role.level() as u8)
        };
        self.s.indirect_shadow_pages += 1;
        if let Some(slot) = self.slot_of(gfn) {
            slot.update_disallow_lpage(gfn, 1);
        }
        if level > 1 {
            self.s.write_track.add(gfn);
        }
        if self.write_protect_gfn(gfn, true) {
            self.kvm.flush_remote_tlbs(self.me());
        }
    }

    fn unaccount_shadowed(&mut self, id: SpId) {
        let (gfn, level) = {
            let sp = self.s.pages.get(id);
            (sp.gfn, sp.role.level() as u8)
        };
        self.s.indirect_shadow_pages -= 1;
        if let Some(slot) = self.slot_of(gfn) {
            slot.update_disallow_lpage(gfn, -1);
        }
        if level > 1 {
            self.s.write_track.remove(gfn);
        }
    }

    /// `spte_write_protect`: clears W on the SPTE at `sptep`, and with `pt_protect` also
    /// MMU-writable (shadowing a page table: fast page fault must not make it writable
    /// again; without it, as dirty logging does, the next write is a fast page fault).
    /// Returns whether W was set (a TLB flush is needed).
    pub(crate) fn spte_write_protect(&mut self, sptep: Hpa, pt_protect: bool) -> bool {
        let clear = super::spte::PT_WRITABLE | if pt_protect { self.kvm.mmu.masks.mmu_writable } else { 0 };
        let s = self.load(sptep);
        if s.0 & clear != 0 {
            self.store(sptep, Spte(s.0 & !clear));
        }
        s.is_writable()
    }

    /// `kvm_mmu_slot_gfn_write_protect` at every level: [`Ctx::spte_write_protect`] on every
    /// SPTE mapping `gfn` (`rmap_write_protect`); returns whether to flush.
    pub fn write_protect_gfn(&mut self, gfn: Gfn, pt_protect: bool) -> bool {
        self.write_protect_gfn_from(gfn, pt_protect, 1)
    }

    /// [`Ctx::write_protect_gfn`] for the SPTEs at `min_level` and above.
    pub fn write_protect_gfn_from(&mut self, gfn: Gfn, pt_protect: bool, min_level: u8) -> bool {
        let Some(slot) = self.slots.find(gfn).cloned() else { return false };
        let mut flush = false;
        for level in min_level..=3u8 {
            for sptep in self.s.rmaps.get(&slot, gfn, level) {
                flush |= self.spte_write_protect(sptep, pt_protect);
            }
        }
        flush
    }

    /// `__rmap_clear_dirty` for `gfn`'s 4 KiB SPTEs: clears `dirty` (the D bit) so the
    /// next write sets it again and the page-modification log records it; returns whether
    /// any SPTE changed.
    pub fn clear_dirty_gfn(&mut self, gfn: Gfn, dirty: u64) -> bool {
        let Some(slot) = self.slots.find(gfn).cloned() else { return false };
        let mut changed = false;
        for sptep in self.s.rmaps.get(&slot, gfn, 1) {
            changed |= self.spte_clear_dirty(sptep, dirty);
        }
        changed
    }

    /// `spte_clear_dirty`: clears `dirty` (the D bit) of one SPTE; returns whether it was set.
    pub(crate) fn spte_clear_dirty(&mut self, sptep: Hpa, dirty: u64) -> bool {
        let s = self.load(sptep);
        if s.0 & dirty == 0 {
            return false;
        }
        self.store(sptep, Spte(s.0 & !dirty));
        true
    }

    /// `account_nx_huge_page` for shadow page `id`, linked by an SPTE at `level`.
    pub fn account_nx_huge_page(&mut self, id: SpId, level: u8, possible: bool) {
        let sp = self.s.pages.get_mut(id);
        if sp.nx_huge_page_disallowed {
            return; // already accounted (a direct page found in the hash)
        }
        sp.nx_huge_page_disallowed = true;
        let (spt, gfn) = (sp.spt, sp.gfn);
        self.kvm.account_nx_huge_page(spt, gfn, level, possible, false);
    }

    /// `disallowed_hugepage_adjust` for the shadow MMU: `spte` at `level` links a page made
    /// by a fetch under the NX mitigation, so map below it instead of a huge page.
    pub fn disallowed_hugepage_adjust(&self, fault: &mut super::page_fault::KvmPageFault, spte: Spte, level: u8) {
        if level == fault.goal_level
            && spte.is_shadow_present()
            && !spte.is_large()
            && self.s.pages.by_spt(spte.pfn()).is_some_and(|c| self.s.pages.get(c).nx_huge_page_disallowed)
        {
            super::tdp_mmu::disallowed_hugepage_adjust(fault, level);
        }
    }

    /// `link_shadow_page`: points `sptep` at `child`, dropping a huge leaf in the way.
    pub fn link_shadow_page(&mut self, sptep: Hpa, child: SpId) {
        let old = self.load(sptep);
        if old.is_shadow_present() && old.is_large() {
            self.drop_spte(sptep);
            self.kvm.flush_remote_tlbs(self.me());
        }
        let m = self.kvm.mmu.masks;
        let hpa = self.s.pages.get(child).spt_hpa();
        self.store(sptep, make_nonleaf_spte(&m, hpa, false));
        self.s.pages.get_mut(child).parent_ptes.add(sptep);
        if self.s.pages.get(child).unsync_children > 0 || self.s.pages.get(child).unsync {
            self.mark_unsync(sptep);
        }
    }

    /// `mark_unsync`: records up the parents that an unsync page lies below `sptep`.
    fn mark_unsync(&mut self, sptep: Hpa) {
        let Some((pid, index)) = self.s.pages.sptep_to_sp(sptep) else { return };
        let sp = self.s.pages.get_mut(pid);
        let (w, b) = ((index / 64) as usize, index % 64);
        if sp.unsync_child_bitmap[w] & (1 << b) != 0 {
            return;
        }
        sp.unsync_child_bitmap[w] |= 1 << b;
        sp.unsync_children += 1;
        if sp.unsync_children != 1 {
            return;
        }
        for p in sp.parent_ptes.to_vec() {
            self.mark_unsync(p);
        }
    }

    /// `kvm_unsync_page`.
    fn unsync_page(&mut self, id: SpId) {
        // As kvm_unsync_page: the tracepoint shows the page before it goes unsync.
        trace_sp(self.kvm, self.cpu, "kvm_mmu_unsync_page", self.s.pages.get(id), None);
        self.kvm.stats.mmu_unsync.add(1);
        self.s.pages.get_mut(id).unsync = true;
        for p in self.s.pages.get(id).parent_ptes.to_vec() {
            self.mark_unsync(p);
        }
    }

    /// `mmu_try_to_unsync_pages`: whether `gfn` may be mapped writable; last-level shadow
    /// pages of it go unsync.
    pub fn try_to_unsync_pages(&mut self, gfn: Gfn, can_unsync: bool, prefetch: bool) -> bool {
        if self.s.write_track.is_tracked(gfn) {
            return false;
        }
        for id in self.s.pages.with_gfn(gfn) {
            let sp = self.s.pages.get(id);
            if sp.role.direct() != 0 || sp.role.invalid() != 0 {
                continue;
            }
            if !can_unsync {
                return false;
            }
            if sp.unsync {
                continue;
            }
            if prefetch {
                return false;
            }
            debug_assert_eq!(sp.role.level(), 1, "only last-level pages go unsync");
            self.unsync_page(id);
        }
        true
    }

    /// `drop_spte`: clears a leaf SPTE and removes it from its rmap.
    pub fn drop_spte(&mut self, sptep: Hpa) {
        let old = self.load(sptep);
        self.store(sptep, Spte::NONPRESENT);
        if !old.is_shadow_present() {
            return;
        }
        let Some((id, index)) = self.s.pages.sptep_to_sp(sptep) else { return };
        let level = self.s.pages.get(id).role.level() as u8;
        let gfn = self.s.sp_gfn_at(id, index);
        if let Some(slot) = self.slots.find(gfn).cloned() {
            if self.s.rmaps.remove(&slot, gfn, level, sptep) {
                self.kvm.stats.update_page_stats(level, -1);
            }
        }
    }

    /// `drop_parent_pte`: unlinks `child` from the parent SPTE at `sptep`.
    fn drop_parent_pte(&mut self, child: SpId, sptep: Hpa) {
        self.s.pages.get_mut(child).parent_ptes.remove(sptep);
        self.store(sptep, Spte::NONPRESENT);
    }

    /// `mmu_page_zap_pte`: clears one SPTE of a page (leaf, link or MMIO).
    pub fn zap_pte(&mut self, sptep: Hpa) {
        let s = self.load(sptep);
        let Some((id, _)) = self.s.pages.sptep_to_sp(sptep) else { return };
        let level = self.s.pages.get(id).role.level() as u8;
        if s.is_shadow_present() {
            if s.is_last(level) {
                self.drop_spte(sptep);
            } else if let Some(child) = self.s.pages.by_spt(s.pfn()) {
                self.drop_parent_pte(child, sptep);
            } else {
                self.store(sptep, Spte::NONPRESENT);
            }
        } else if s.is_mmio(&self.kvm.mmu.masks) {
            self.store(sptep, Spte::NONPRESENT);
        }
    }

    /// `mmu_set_spte`: installs a leaf (or MMIO) SPTE for `gfn` at `sptep`.
    #[allow(clippy::too_many_arguments)]
    pub fn mmu_set_spte(
        &mut self,
        sptep: Hpa,
        pte_access: u8,
        gfn: Gfn,
        pfn: Option<Pfn>,
        host_writable: bool,
        prefetch: bool,
        write_fault: bool,
    ) -> RetPf {
        let Some((id, index)) = self.s.pages.sptep_to_sp(sptep) else { return RetPf::Retry };
        let level = self.s.pages.get(id).role.level() as u8;
        let m = self.kvm.mmu.masks;
        let Some(pfn) = pfn else {
            let gen = self.slots.generation();
            self.store(sptep, make_mmio_spte(&m, gfn, pte_access, gen));
            if let Some(v) = self.vcpu.as_mut() {
                v.stat.pf_mmio_spte_created += 1;
            }
            if self.kvm.tracer.events_on() {
                self.kvm.tracer.event(
                    self.cpu,
                    "mark_mmio_spte",
                    format_args!(
                        "sptep:{:016x} gfn {:x} access {:x} gen {:x}",
                        sptep.raw(),
                        gfn.raw(),
                        pte_access,
                        gen & super::spte::MMIO_SPTE_GEN_MASK
                    ),
                );
            }
            return RetPf::Emulate;
        };
        let old = self.load(sptep);
        let mut flush = false;
        let mut was_rmapped = false;
        if old.is_shadow_present() {
            if level > 1 && !old.is_large() {
                if let Some(child) = self.s.pages.by_spt(old.pfn()) {
                    self.drop_parent_pte(child, sptep);
                }
                flush = true;
            } else if old.pfn() != pfn {
                self.drop_spte(sptep);
                flush = true;
            } else {
                was_rmapped = true;
            }
        }
        let old = self.load(sptep);
        let req = SpteRequest {
            level,
            pfn,
            access: pte_access,
            prefetch,
            synchronizing: false,
            host_writable,
            nx_huge_pages: self.kvm.nx_huge_pages(),
            ad_disabled: false,
        };
        let (new, wrprot) = make_spte(&m, &req, old, || self.try_to_unsync_pages(gfn, true, prefetch));
        if new == old {
            return RetPf::Spurious;
        }
        self.store(sptep, new);
        if new.is_writable() {
            // make_spte -> mark_page_dirty_in_slot.
            if let Some(slot) = self.slots.find(gfn) {
                let ring = self.vcpu.as_ref().and_then(|v| v.dirty_ring.as_deref());
                crate::dirty_log::mark_page_dirty_in_slot(ring, slot, gfn);
            }
        }
        if self.kvm.tracer.events_on() {
            let u = if new.0 & m.user != 0 { "u" } else { "-" };
            self.kvm.tracer.event(
                self.cpu,
                "kvm_mmu_set_spte",
                format_args!(
                    "gfn {:x} spte {:x} (r{}{}{}) level {} at {:x}",
                    gfn.raw(),
                    new.0,
                    if new.is_writable() { "w" } else { "-" },
                    if new.is_executable(&m) { "x" } else { "-" },
                    u,
                    level,
                    sptep.raw()
                ),
            );
        }
        if old.is_shadow_present() && old.is_mmu_writable(&m) && !new.is_mmu_writable(&m) {
            flush = true;
        }
        if flush {
            self.kvm.flush_remote_tlbs(self.me());
        }
        self.s.set_translation(id, index, gfn, pte_access);
        if !was_rmapped {
            if let Some(slot) = self.slots.find(gfn).cloned() {
                let n = self.s.rmaps.add(&slot, gfn, level, sptep);
                self.kvm.stats.update_page_stats(level, 1);
                self.kvm.stats.max_mmu_rmap_size.raise(n as i64);
                if n > RMAP_RECYCLE_THRESHOLD {
                    // rmap_recycle: too many mappings of one gfn; drop them all.
                    for p in self.s.rmaps.get(&slot, gfn, level) {
                        self.drop_spte(p);
                    }
                    self.kvm.flush_remote_tlbs(self.me());
                }
            }
        }
        if wrprot && write_fault {
            return RetPf::Emulate;
        }
        RetPf::Fixed
    }

    /// `kvm_mmu_prepare_zap_page`: unlinks a page from everything; it is freed by
    /// [`Ctx::commit_zap_page`] (or, if a vCPU still uses it as a root, when released).
    pub fn prepare_zap_page(&mut self, id: SpId) -> bool {
        if !self.s.pages.exists(id) || self.s.pages.get(id).role.invalid() != 0 {
            return false;
        }
        let _f = self.kvm.tracer.func(self.cpu, "kvm_mmu_prepare_zap_page");
        trace_sp(self.kvm, self.cpu, "kvm_mmu_prepare_zap_page", self.s.pages.get(id), None);
        self.kvm.stats.mmu_shadow_zapped.add(1);
        let level = self.s.pages.get(id).role.level() as u8;
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
            let sptep = Hpa::new(spt.raw() + i * 8);
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

    /// `mmu_sync_children`: syncs every unsync page below `parent` (after write-protecting
    /// it again), in batches of `KVM_PAGE_ARRAY_NR`.
    pub fn sync_children(&mut self, parent: SpId) {
        loop {
            let mut batch = Vec::new();
            self.collect_unsync(parent, &mut batch);
            if batch.is_empty() {
                return;
            }
            let mut flush = false;
            for &id in &batch {
                let gfn = self.s.pages.get(id).gfn;
                flush |= self.write_protect_gfn(gfn, true);
            }
            if flush {
                self.kvm.flush_remote_tlbs(self.me());
            }
            for id in batch {
                if !self.s.pages.exists(id) || !self.s.pages.get(id).unsync {
                    continue;
                }
                self.unlink_unsync_page(id);
                if self.sync_page(id) < 0 {
                    self.prepare_zap_page(id);
                }
                self.clear_parents_unsync(id);
            }
            self.commit_zap_page();
        }
    }

    /// `mmu_unsync_walk`: up to 16 unsync pages below `id`; clears bitmap bits whose
    /// subtree has nothing unsync left.
    fn collect_unsync(&mut self, id: SpId, out: &mut Vec<SpId>) {
        let spt = self.s.pages.get(id).spt_hpa();
        let level = self.s.pages.get(id).role.level() as u8;
        for w in 0..8 {
            let mut bits = self.s.pages.get(id).unsync_child_bitmap[w];
            while bits != 0 {
                if out.len() >= KVM_PAGE_ARRAY_NR {
                    return;
                }
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let index = w as u64 * 64 + b;
                let s = self.load(Hpa::new(spt.raw() + index * 8));
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

    fn clear_unsync_bit(&mut self, id: SpId, index: u64) {
        let sp = self.s.pages.get_mut(id);
        let (w, b) = ((index / 64) as usize, index % 64);
        if sp.unsync_child_bitmap[w] & (1 << b) != 0 {
            sp.unsync_child_bitmap[w] &= !(1 << b);
            sp.unsync_children -= 1;
        }
    }

    /// `mmu_pages_clear_parents`: a synced page no longer makes its parents unsync.
    fn clear_parents_unsync(&mut self, id: SpId) {
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
    /// be zapped.
    pub fn sync_page(&mut self, id: SpId) -> i32 {
        trace_sp(self.kvm, self.cpu, "kvm_mmu_sync_page", self.s.pages.get(id), None);
        let spt = self.s.pages.get(id).spt_hpa();
        let mut flush = false;
        for i in 0..512u64 {
            let sptep = Hpa::new(spt.raw() + i * 8);
            let s = self.load(sptep);
            if !s.is_shadow_present() && !s.is_mmio(&self.kvm.mmu.masks) {
                continue;
            }
            match super::paging_tmpl::sync_spte(self, id, i) {
                r if r < 0 => return r,
                r => flush |= r > 0,
            }
        }
        if flush {
            self.kvm.flush_remote_tlbs(self.me());
        }
        0
    }

    /// `kvm_unlink_unsync_page`: the page is in sync again (its gfn was write-protected).
    fn unlink_unsync_page(&mut self, id: SpId) {
        if self.s.pages.get(id).unsync {
            self.s.pages.get_mut(id).unsync = false;
            self.kvm.stats.mmu_unsync.add(-1);
        }
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

/// The access rights of a root (`ACC_ALL`) for completeness of the role helpers.
pub const ROOT_ACCESS: u8 = ACC_ALL;

/// Takes `mmu_lock` for write and the shadow state, and builds a context for `vcpu`.
///
/// The context sees the memslots current once `mmu_lock` is held, not the vCPU's last
/// snapshot: these paths run outside exits too (request servicing at entry, MOV CR3,
/// INVLPG), and a sync that makes an SPTE writable must log the page in the slot's current
/// dirty bitmap. A memslot update publishes the new slots before it takes `mmu_lock` to
/// apply their flags, so a context built after it sees them (KVM gets this from SRCU).
macro_rules! with_ctx {
    ($kvm:expr, $vcpu:expr, |$ctx:ident| $body:expr) => {{
        let _w = $kvm.mmu.mmu_lock.write();
        let mut guard = $kvm.mmu.shadow.lock();
        $vcpu.refresh_memslots($kvm);
        let slots = $vcpu.slots.clone();
        let cpu = $vcpu.id;
        let mut $ctx = Ctx { kvm: $kvm, s: &mut guard, slots, vcpu: Some(&mut *$vcpu), cpu };
        $body
    }};
}

/// The root role of the guest's current paging mode (`kvm_calc_cpu_role` + the shadow
/// root rules: efer_nx forced on), or None for modes not shadowed yet.
pub fn shadow_root_role(st: &x86_paging::mode::PagingState) -> Option<Role> {
    use x86_paging::mode::PagingMode;
    use x86_paging::regs::{Cr0, Cr4};
    let level = match st.mode() {
        PagingMode::Level4 => 4,
        PagingMode::Level5 => 5,
        // PAE and 32-bit guests are shadowed with PAE roots (PT32E_ROOT_LEVEL).
        PagingMode::Pae | PagingMode::Bits32 => 3,
        // Paging off: direct pages under PAE roots, identity-mapping the 4 GiB the guest
        // can address.
        PagingMode::NonPaging => {
            return Some(
                Role(0).with_level(3).with_direct(1).with_access(u32::from(ACC_ALL)).with_efer_nx(1).with_cr0_wp(1),
            )
        }
    };
    let wp = st.cr0.contains(Cr0::WP);
    let four_byte = st.mode() == PagingMode::Bits32;
    Some(
        Role(0)
            .with_level(level)
            .with_access(u32::from(ACC_ALL))
            .with_efer_nx(1)
            .with_cr0_wp(u32::from(wp))
            .with_smep_andnot_wp(u32::from(st.cr4.contains(Cr4::SMEP) && !wp))
            .with_smap_andnot_wp(u32::from(st.cr4.contains(Cr4::SMAP) && !wp))
            .with_has_4_byte_gpte(u32::from(four_byte)),
    )
}

fn set_hw_root(vcpu: &mut VcpuArch, root: Option<RootInfo>, level: u8, dummy: Hpa) {
    let hpa = root.map_or(dummy, |r| r.hpa);
    vcpu.cpu.set_mode(crate::hw::cpu::CpuMode::Shadow(crate::hw::cpu::ShadowRoot { root: hpa, level, pdptrs: [0; 4] }));
}

/// `kvm_mmu_load` under shadow paging (`mmu_alloc_shadow_roots` + `kvm_mmu_sync_roots` +
/// load): the root shadow page for the guest's CR3.
pub fn kvm_mmu_load(kvm: &Kvm, vcpu: &mut VcpuArch) -> Result<(), crate::host::HostError> {
    vcpu.mmu_topup_memory_caches(kvm)?;
    let st = *vcpu.cpu.paging();
    let dummy = dummy_root(kvm)?;
    let Some(role) = shadow_root_role(&st) else {
        // Nothing to shadow yet (paging off, or a mode not handled): every access faults
        // into the MMU, which says why.
        set_hw_root(vcpu, None, 4, dummy);
        return Ok(());
    };
    let pgd = st.cr3 & 0x000f_ffff_ffff_f000;
    vcpu.shadow.root_role = role;
    if role.level() == 3 {
        // mmu_alloc_shadow_roots / mmu_alloc_direct_roots with a PAE root: one page per
        // PDPTE (the guest's PDPTRs, or for paging off the four 1 GiB identity quarters).
        let direct = role.direct() != 0;
        let four_byte = role.has_4_byte_gpte() != 0;
        let child = role.with_level(2);
        let pdptrs = st.pdptrs;
        with_ctx!(kvm, vcpu, |ctx| {
            let mut sps = [None; 4];
            let mut hw = [0u64; 4];
            for i in 0..4 {
                let gfn = if direct {
                    Gfn::new((i as u64) << 18)
                } else if four_byte {
                    // A 32-bit guest's page directory, shadowed by four PAE directories
                    // (quadrant i maps the guest's i-th GiB).
                    Gfn::new(pgd >> 12)
                } else if pdptrs[i] & 1 != 0 {
                    Gfn::new((pdptrs[i] & 0x000f_ffff_ffff_f000) >> 12)
                } else {
                    continue;
                };
                let role_i = if four_byte { child.with_quadrant(i as u32) } else { child };
                let id = ctx.get_shadow_page(gfn, role_i);
                ctx.s.pages.get_mut(id).root_count += 1;
                if ctx.s.pages.get(id).unsync_children > 0 {
                    ctx.sync_children(id);
                }
                sps[i] = Some(id);
                hw[i] = ctx.s.pages.get(id).spt_hpa().raw() | 1;
            }
            ctx.commit_zap_page();
            let v = ctx.vcpu.as_mut().expect("vcpu");
            v.shadow.pae = Some(sps);
            v.shadow.root = Some(RootInfo { pgd, sp: PAE_ROOTS, hpa: dummy });
            v.cpu.set_mode(crate::hw::cpu::CpuMode::Shadow(crate::hw::cpu::ShadowRoot {
                root: dummy,
                level: 3,
                pdptrs: hw,
            }));
            v.cpu.flush_tlb_current();
        });
        return Ok(());
    }
    with_ctx!(kvm, vcpu, |ctx| {
        let id = ctx.get_shadow_page(Gfn::new(pgd >> 12), role);
        ctx.s.pages.get_mut(id).root_count += 1;
        let hpa = ctx.s.pages.get(id).spt_hpa();
        if ctx.s.pages.get(id).unsync_children > 0 {
            ctx.sync_children(id);
        }
        ctx.commit_zap_page();
        let v = ctx.vcpu.as_mut().expect("vcpu");
        v.shadow.root = Some(RootInfo { pgd, sp: id, hpa });
        set_hw_root(v, v.shadow.root, role.level() as u8, dummy);
        v.cpu.flush_tlb_current();
    });
    Ok(())
}

/// A page of non-present SPTEs the hardware runs on when there is no root yet.
fn dummy_root(kvm: &Kvm) -> Result<Hpa, crate::host::HostError> {
    let mut d = kvm.mmu.shadow_dummy_root.lock();
    if let Some(p) = *d {
        return Ok(p.hpa());
    }
    let p = kvm.frames().alloc_4k()?;
    super::tdp_mmu::init_table(kvm, p);
    *d = Some(p);
    Ok(p.hpa())
}

/// `kvm_mmu_free_roots` (all of them): drops the current and previous roots.
pub fn kvm_mmu_unload(kvm: &Kvm, vcpu: &mut VcpuArch) {
    let roots = vcpu.shadow.all_roots();
    vcpu.shadow.prev_roots.clear();
    vcpu.shadow.root = None;
    vcpu.shadow.pae = None;
    if roots.is_empty() {
        return;
    }
    with_ctx!(kvm, vcpu, |ctx| {
        for r in roots {
            ctx.put_root(r);
        }
    });
}

/// `kvm_mmu_reset_context`: the guest changed CR0/CR4/EFER bits the role depends on.
pub fn kvm_mmu_reset_context(kvm: &Kvm, vcpu: &mut VcpuArch) {
    kvm_mmu_unload(kvm, vcpu);
}

/// `kvm_mmu_load_pgd` (KVM_REQ_LOAD_MMU_PGD): points the hardware at the current root.
pub fn kvm_mmu_load_pgd(kvm: &Kvm, vcpu: &mut VcpuArch) {
    if let Some(r) = vcpu.shadow.root {
        let dummy = dummy_root(kvm).unwrap_or(r.hpa);
        let level = vcpu.shadow.root_role.level() as u8;
        set_hw_root(vcpu, Some(r), level, dummy);
    }
}

/// `kvm_mmu_new_pgd` with the fast switch: the current root joins `prev_roots` and a cached
/// root for the new CR3 (same role) is reused (loaded into the hardware by
/// KVM_REQ_LOAD_MMU_PGD); on a miss the least recent is freed and a root is made at the next
/// entry.
pub fn kvm_mmu_new_pgd(kvm: &Kvm, vcpu: &mut VcpuArch, new_cr3: u64) {
    let pgd = new_cr3 & 0x000f_ffff_ffff_f000;
    let role = vcpu.shadow.root_role;
    let Some(cur) = vcpu.shadow.root else { return };
    if vcpu.shadow.pae.is_some() {
        // A PAE root has no page of its own to cache: it is freed (fast_pgd_switch).
        kvm_mmu_unload(kvm, vcpu);
        return;
    }
    if cur.pgd == pgd {
        return;
    }
    let hit = {
        let s = kvm.mmu.shadow.lock();
        vcpu.shadow.prev_roots.iter().position(|r| {
            r.pgd == pgd
                && s.pages.exists(r.sp)
                && s.pages.get(r.sp).role == role
                && s.pages.get(r.sp).role.invalid() == 0
        })
    };
    vcpu.shadow.prev_roots.insert(0, cur);
    let mut evict = Vec::new();
    match hit {
        Some(i) => {
            // fast_pgd_switch: the cached root becomes current; the hardware is pointed at
            // it on the next entry (KVM_REQ_LOAD_MMU_PGD).
            let r = vcpu.shadow.prev_roots.remove(i + 1);
            vcpu.shadow.root = Some(r);
            kvm.mmu.shadow.lock().pages.get_mut(r.sp).write_flooding_count = 0;
            vcpu.shared.requests.fetch_or(crate::vm::req::LOAD_MMU_PGD, crate::sync::Ordering::SeqCst);
        }
        None => {
            vcpu.shadow.root = None;
        }
    }
    while vcpu.shadow.prev_roots.len() > KVM_MMU_NUM_PREV_ROOTS {
        evict.extend(vcpu.shadow.prev_roots.pop());
    }
    if !evict.is_empty() {
        with_ctx!(kvm, vcpu, |ctx| {
            for r in evict {
                ctx.put_root(r.sp);
            }
        });
    }
}

/// `kvm_mmu_sync_roots`: syncs every unsync page below the current root.
pub fn kvm_mmu_sync_roots(kvm: &Kvm, vcpu: &mut VcpuArch) {
    if vcpu.shadow.root.is_none() {
        return;
    }
    let roots: Vec<SpId> = match &vcpu.shadow.pae {
        Some(p) => p.iter().flatten().copied().collect(),
        None => vcpu.shadow.root.iter().map(|r| r.sp).collect(),
    };
    with_ctx!(kvm, vcpu, |ctx| {
        for r in roots {
            if ctx.s.pages.exists(r) && ctx.s.pages.get(r).unsync_children > 0 {
                ctx.sync_children(r);
            }
        }
        ctx.commit_zap_page();
    });
}

/// `kvm_mmu_sync_prev_roots`: previous roots with unsync pages are dropped (they will be
/// rebuilt, in sync, if the guest switches back).
pub fn kvm_mmu_sync_prev_roots(kvm: &Kvm, vcpu: &mut VcpuArch) {
    let unsync: Vec<RootInfo> = {
        let s = kvm.mmu.shadow.lock();
        vcpu.shadow
            .prev_roots
            .iter()
            .filter(|r| s.pages.exists(r.sp) && s.pages.get(r.sp).unsync_children > 0)
            .copied()
            .collect()
    };
    if unsync.is_empty() {
        return;
    }
    vcpu.shadow.prev_roots.retain(|r| !unsync.contains(r));
    with_ctx!(kvm, vcpu, |ctx| {
        for r in unsync {
            ctx.put_root(r.sp);
        }
    });
}

/// `kvm_mmu_free_obsolete_roots`: drops roots that were zapped.
pub fn kvm_mmu_free_obsolete_roots(kvm: &Kvm, vcpu: &mut VcpuArch) {
    if let Some(p) = vcpu.shadow.pae {
        let gone = {
            let s = kvm.mmu.shadow.lock();
            p.iter().flatten().any(|sp| !s.pages.exists(*sp) || s.pages.get(*sp).role.invalid() != 0)
        };
        if gone {
            kvm_mmu_unload(kvm, vcpu);
        }
        return;
    }
    let obsolete = |r: &RootInfo| {
        let s = kvm.mmu.shadow.lock();
        !s.pages.exists(r.sp) || s.pages.get(r.sp).role.invalid() != 0
    };
    let mut drop = Vec::new();
    if vcpu.shadow.root.as_ref().is_some_and(obsolete) {
        drop.extend(vcpu.shadow.root.take());
    }
    let (keep, gone): (Vec<RootInfo>, Vec<RootInfo>) = vcpu.shadow.prev_roots.drain(..).partition(|r| !obsolete(r));
    vcpu.shadow.prev_roots = keep;
    drop.extend(gone);
    if !drop.is_empty() {
        with_ctx!(kvm, vcpu, |ctx| {
            for r in drop {
                ctx.put_root(r.sp);
            }
        });
    }
}

/// `kvm_mmu_invlpg` under shadow paging: syncs the SPTE of `gva` in unsync pages on every
/// root's path, then the hardware drops its TLB entry.
pub fn kvm_mmu_invlpg(kvm: &Kvm, vcpu: &mut VcpuArch, gva: u64) {
    vcpu.stat.invlpg += 1;
    let roots: Vec<SpId> = match &vcpu.shadow.pae {
        Some(_) => vcpu.shadow.root_for(gva).map(|(sp, _)| sp).into_iter().collect(),
        None => vcpu.shadow.root.iter().chain(vcpu.shadow.prev_roots.iter()).map(|r| r.sp).collect(),
    };
    with_ctx!(kvm, vcpu, |ctx| {
        for r in roots {
            super::paging_tmpl::invlpg(&mut ctx, r, gva);
        }
        ctx.commit_zap_page();
    });
    vcpu.cpu.invlpg(x86_paging::addr::Gva::new(gva));
}

/// `kvm_mmu_track_write`: the emulator wrote `bytes` at `gpa`, which may be a shadowed guest
/// page table: zap the SPTEs the written entries made stale, and zap pages that are written
/// misaligned or flooded with writes no fault uses.
pub fn kvm_mmu_track_write(kvm: &Kvm, vcpu: &mut VcpuArch, gpa: x86_paging::addr::Gpa, bytes: u8) {
    with_ctx!(kvm, vcpu, |ctx| {
        if ctx.s.indirect_shadow_pages == 0 {
            return;
        }
        kvm.stats.mmu_pte_write.add(1);
        let bus = kvm.mmio_bus(); // mmu_pte_write_fetch_gpte: a 4-byte write to 8-byte entries reads the whole entry.
        let four_byte_guest =
            ctx.vcpu.as_ref().is_some_and(|v| v.cpu.paging().mode() == x86_paging::mode::PagingMode::Bits32);
        let (at, size) = match bytes {
            4 if !four_byte_guest => (gpa.raw() & !7, 8),
            4 | 8 => (gpa.raw(), bytes),
            _ => (gpa.raw(), 0),
        };
        let gentry = if size == 0 {
            0
        } else {
            crate::emulate::KvmGuestMem::new(kvm, &ctx.slots, &bus).read(x86_paging::addr::Gpa::new(at), size)
        };
        let mut flush = false;
        for id in ctx.s.pages.with_gfn(gpa.gfn()) {
            if !ctx.s.pages.exists(id) {
                continue;
            }
            let (direct, invalid, level, four, quadrant) = {
                let sp = ctx.s.pages.get(id);
                (
                    sp.role.direct() != 0,
                    sp.role.invalid() != 0,
                    sp.role.level() as u8,
                    sp.role.has_4_byte_gpte() != 0,
                    sp.role.quadrant(),
                )
            };
            if direct || invalid {
                continue;
            }
            let offset = gpa.raw() & 0xfff;
            let pte_size = if four { 4 } else { 8 };
            let misaligned =
                bytes != 1 && (((offset ^ (offset + u64::from(bytes) - 1)) & !(pte_size - 1)) != 0 || bytes < 4);
            // get_written_sptes: a 4-byte entry is shadowed by one 8-byte SPTE in the page of
            // its quadrant, a 4-byte PDE (4 MiB) by two.
            let (mut spte_off, mut nspte) = (offset, 1u64);
            if four {
                spte_off <<= 1;
                if level == 2 {
                    spte_off &= !7;
                    spte_off <<= 1;
                    nspte = 2;
                }
                if (spte_off >> 12) as u32 != quadrant {
                    continue;
                }
                spte_off &= 0xfff;
            }
            let flooded = level > 1 && {
                let sp = ctx.s.pages.get_mut(id);
                sp.write_flooding_count += 1;
                sp.write_flooding_count >= 3
            };
            if misaligned || flooded {
                ctx.prepare_zap_page(id);
                kvm.stats.mmu_flooded.add(1);
                continue;
            }
            for k in 0..nspte {
                let sptep = ctx.s.pages.get(id).sptep(spte_off / 8 + k);
                let old = Spte(kvm.mem().load(sptep));
                ctx.zap_pte(sptep);
                flush |= old.is_shadow_present();
                if gentry != 0 && level > 1 {
                    kvm.stats.mmu_pde_zapped.add(1);
                }
            }
        }
        ctx.commit_zap_page();
        if flush {
            kvm.flush_remote_tlbs(Some(ctx.cpu));
        }
    });
}

/// The legacy MMU's TDP root role (`kvm_calc_tdp_mmu_root_page_role`).
pub fn direct_root_role(cfg: &crate::vm::VmConfig) -> Role {
    Role(0)
        .with_level(u32::from(cfg.tdp_level()))
        .with_direct(1)
        .with_access(u32::from(ACC_ALL))
        .with_cr0_wp(1)
        .with_efer_nx(1)
        .with_ad_disabled(u32::from(!cfg.ad_enabled()))
}

/// `mmu_alloc_direct_roots` for the legacy MMU (tdp_mmu=N): a direct root shadow page.
pub fn kvm_mmu_load_direct(kvm: &Kvm, vcpu: &mut VcpuArch) -> Result<RootInfo, crate::host::HostError> {
    vcpu.mmu_topup_memory_caches(kvm)?;
    let role = direct_root_role(kvm.config());
    vcpu.shadow.root_role = role;
    let root = with_ctx!(kvm, vcpu, |ctx| {
        let id = ctx.get_shadow_page(Gfn::new(0), role);
        ctx.s.pages.get_mut(id).root_count += 1;
        RootInfo { pgd: 0, sp: id, hpa: ctx.s.pages.get(id).spt_hpa() }
    });
    vcpu.shadow.root = Some(root);
    Ok(root)
}

/// `direct_page_fault` from `mmu_lock` on: `make_mmu_pages_available`,
/// `is_page_fault_stale`, `direct_map`.
pub fn direct_page_fault_locked(kvm: &Kvm, vcpu: &mut VcpuArch, fault: &mut super::page_fault::KvmPageFault) -> RetPf {
    let Some(root) = vcpu.shadow.root else { return RetPf::Retry };
    with_ctx!(kvm, vcpu, |ctx| {
        ctx.make_mmu_pages_available();
        if !ctx.s.pages.exists(root.sp) || ctx.s.pages.get(root.sp).role.invalid() != 0 {
            return RetPf::Retry;
        }
        if fault.slot.is_some() && super::page_fault::mmu_invalidate_retry_gfn(kvm, fault.mmu_seq, fault.gfn) {
            return RetPf::Retry;
        }
        ctx.direct_map(root.sp, fault)
    })
}

impl Ctx<'_> {
    /// `direct_map`: the legacy TDP fault's walk — direct shadow pages down to the goal
    /// level, then `mmu_set_spte` and `direct_pte_prefetch`.
    pub fn direct_map(&mut self, root: SpId, fault: &mut super::page_fault::KvmPageFault) -> RetPf {
        let _f = self.kvm.tracer.func(self.cpu, "direct_map");
        {
            let slots = self.slots.clone();
            super::page_fault::kvm_mmu_hugepage_adjust(self.kvm, &slots, fault);
        }
        if self.kvm.tracer.events_on() {
            self.kvm.tracer.event(
                self.cpu,
                "kvm_mmu_spte_requested",
                format_args!("gfn {:x} pfn {:x} level {}", fault.gfn.raw(), fault.pfn.raw(), fault.goal_level),
            );
        }
        let gfn = fault.gfn.raw();
        let mut it = ShadowWalk::new(&self.s.pages, root, gfn << 12);
        loop {
            let sptep = it.sptep(&self.s.pages);
            let spte = self.load(sptep);
            if fault.nx_huge_page_workaround_enabled {
                self.disallowed_hugepage_adjust(fault, spte, it.level);
            }
            if it.level <= fault.goal_level {
                break;
            }
            if spte.is_shadow_present() && !spte.is_large() {
                if !it.next(&self.s.pages, self.kvm.mem()) {
                    return RetPf::Retry;
                }
            } else {
                let level = it.level;
                let base = Gfn::new(gfn & !(pages_at(level) - 1));
                let role = kvm_mmu_child_role(self.s.pages.get(it.sp).role, true, ACC_ALL);
                let c = self.get_shadow_page(base, role);
                self.link_shadow_page(sptep, c);
                if fault.huge_page_disallowed {
                    self.account_nx_huge_page(c, level, fault.req_level >= level);
                }
                it.descend(c);
            }
        }
        let (sp, level) = (it.sp, it.level);
        let sptep = it.sptep(&self.s.pages);
        let pfn = fault.slot.map(|_| fault.pfn);
        let base = Gfn::new(gfn & !(pages_at(level) - 1));
        let r = self.mmu_set_spte(sptep, ACC_ALL, base, pfn, fault.map_writable, false, fault.write);
        if r != RetPf::Emulate && level == 1 && self.s.pages.get(sp).role.ad_disabled() == 0 {
            super::paging_tmpl::pte_prefetch_pub(self, sp, sptep);
        }
        r
    }
}
