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
use crate::sync::{Arc, Ordering};
use crate::vm::{req, Kvm, VcpuArch};
use x86_paging::addr::{Gfn, Gva, Hpa, Pfn};

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
pub const PAE_ROOTS: SpId = SpId::NONE;

impl VcpuShadow {
    /// The shadow page a walk of `gva` starts at, and its level.
    pub fn root_for(&self, gva: Gva) -> Option<(SpId, u8)> {
        match &self.pae {
            Some(p) => p[((gva.raw() >> 30) & 3) as usize].map(|sp| (sp, 2)),
            None => self.root.map(|r| (r.sp, self.root_role.level())),
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
        ShadowWalk { sp: root, level: pages.get(root).role.level(), addr }
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
        ACC[usize::from(r.access())],
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
            Some(t) if sp.role.direct() == 0 => Gfn::new(t[crate::num::usize_of(index)] >> 12),
            _ => Gfn::new(sp.gfn.raw() + index * pages_at(sp.role.level())),
        }
    }

    /// `kvm_mmu_page_get_access`.
    pub fn sp_access_at(&self, id: SpId, index: u64) -> u8 {
        let sp = self.pages.get(id);
        match &sp.shadowed_translation {
            Some(t) if sp.role.direct() == 0 => crate::num::low8(t[crate::num::usize_of(index)] & 7),
            _ => sp.role.access(),
        }
    }

    /// `kvm_mmu_page_set_translation`.
    pub(crate) fn set_translation(&mut self, id: SpId, index: u64, gfn: Gfn, access: u8) {
        if let Some(t) = self.pages.get_mut(id).shadowed_translation.as_mut() {
            t[crate::num::usize_of(index)] = (gfn.raw() << 12) | u64::from(access);
        }
    }
}

/// `kvm_mmu_child_role`.
pub fn kvm_mmu_child_role(parent: Role, direct: bool, access: u8) -> Role {
    parent
        .with_level(parent.level() - 1)
        .with_direct(u32::from(direct))
        .with_access(access)
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

impl<'a> Ctx<'a> {
    /// A context for work done on the host's behalf (notifiers, dirty-log ioctls, zaps,
    /// memslot changes): no vCPU. The caller holds `mmu_lock` for write and the state.
    pub fn host(kvm: &'a Kvm, s: &'a mut ShadowMmu, slots: Arc<Memslots>) -> Self {
        Ctx { kvm, s, slots, vcpu: None, cpu: u32::MAX }
    }
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
            if role.direct() == 0 && self.s.pages.get(id).unsync {
                // Synced but left unsync (and writable) until the guest flushes.
                match self.sync_page(id) {
                    r if r < 0 => {
                        self.prepare_zap_page(id);
                        continue;
                    }
                    r if r > 0 => self.kvm.flush_remote_tlbs(self.me()),
                    _ => {}
                }
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
            (sp.gfn, sp.role.level())
        };
        self.kvm.mmu.indirect_shadow_pages.fetch_add(1, Ordering::Release);
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
            (sp.gfn, sp.role.level())
        };
        self.kvm.mmu.indirect_shadow_pages.fetch_sub(1, Ordering::Release);
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
        let Some(slot) = self.slots.find(gfn).cloned() else { return false };
        let mut flush = false;
        for level in 1..=3u8 {
            for sptep in self.s.rmaps.get(&slot, gfn, level) {
                flush |= self.spte_write_protect(sptep, pt_protect);
            }
        }
        flush
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
        let level = self.s.pages.get(id).role.level();
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
        let level = self.s.pages.get(id).role.level();
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

    /// `mark_mmio_spte`: an MMIO SPTE for `gfn` with the memslots' current generation.
    pub(crate) fn mark_mmio_spte(&mut self, sptep: Hpa, gfn: Gfn, access: u8) {
        let gen = self.slots.generation();
        let m = self.kvm.mmu.masks;
        self.store(sptep, make_mmio_spte(&m, gfn, access, gen));
        if self.kvm.tracer.events_on() {
            self.kvm.tracer.event(
                self.cpu,
                "mark_mmio_spte",
                format_args!(
                    "sptep:{:016x} gfn {:x} access {:x} gen {:x}",
                    sptep.raw(),
                    gfn.raw(),
                    access,
                    gen & super::spte::MMIO_SPTE_GEN_MASK
                ),
            );
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
        let level = self.s.pages.get(id).role.level();
        let m = self.kvm.mmu.masks;
        let old = self.load(sptep);
        let mut flush = false;
        let mut was_rmapped = false;
        if old.is_shadow_present() {
            if prefetch && old.is_last(level) && Some(old.pfn()) == pfn {
                // Prefetching what is already mapped changes nothing (and must not take
                // the Accessed bit away from a used SPTE).
                return RetPf::Spurious;
            }
            if level > 1 && !old.is_large() {
                // A huge mapping (or an MMIO SPTE) replaces a link: the child table is
                // unreachable from here.
                if let Some(child) = self.s.pages.by_spt(old.pfn()) {
                    self.drop_parent_pte(child, sptep);
                }
                flush = true;
            } else if Some(old.pfn()) != pfn {
                // Another frame (or MMIO, whose "pfn" matches none): the old leaf goes, with
                // its rmap entry and page count.
                self.drop_spte(sptep);
                flush = true;
            } else {
                was_rmapped = true;
            }
        }
        let Some(pfn) = pfn else {
            // No memslot: an MMIO SPTE, installed only after the present SPTE it replaces was
            // dropped above (KVM fixed this order in 2026: a54aa15c6bda3's "Fixes").
            if let Some(v) = self.vcpu.as_mut() {
                v.stat.pf_mmio_spte_created += 1;
            }
            self.mark_mmio_spte(sptep, gfn, pte_access);
            if flush {
                self.kvm.flush_remote_tlbs(self.me());
            }
            return RetPf::Emulate;
        };
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
        if new.is_writable() {
            // make_spte -> mark_page_dirty_in_slot (before the comparison, as in KVM).
            if let Some(slot) = self.slots.find(gfn) {
                let ring = self.vcpu.as_ref().and_then(|v| v.dirty_ring.as_deref());
                crate::dirty_log::mark_page_dirty_in_slot(ring, slot, gfn);
            }
        }
        if new == old {
            // Nothing to change; a write the SPTE still refuses (a write-protected guest
            // table) is emulated all the same, as KVM's `wrprot && write_fault` wins.
            return if wrprot && write_fault { RetPf::Emulate } else { RetPf::Spurious };
        }
        self.store(sptep, new);
        if self.kvm.tracer.events_on() {
            self.kvm.tracer.event(
                self.cpu,
                "kvm_mmu_set_spte",
                format_args!("{}", super::spte::set_spte_trace(&m, gfn, new, level, sptep)),
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

mod direct;
mod roots;
mod sync;
mod track_write;
mod zap;

pub use direct::{direct_page_fault_locked, direct_root_role, kvm_mmu_load_direct};
pub use roots::*;
pub use track_write::kvm_mmu_track_write;
