//! The MMU as a whole (arch/x86/kvm/mmu/mmu.c's role): the one place that chooses between
//! the TDP MMU and the shadow MMU, and the VM-wide operations that act on both.
//!
//! KVM picks its MMU once: `tdp_enabled` and `tdp_mmu_enabled` at module load, and per vCPU
//! `kvm_init_mmu` fills `vcpu->arch.mmu` (`page_fault`, `root_role.direct`). vmmu does the
//! same: [`KvmMmu`] knows the VM's [`MmuKind`] and answers mmu.c's two questions
//! ([`KvmMmu::tdp_mmu_enabled`], [`KvmMmu::have_rmaps`]); [`kvm_init_mmu`] gives each vCPU
//! its [`MmuContext`]. Every VM-wide operation below has mmu.c's shape: the TDP MMU's
//! function when the TDP MMU is on, then the rmap walk under `mmu_lock` held for write when
//! the memslots have rmaps (shadow paging and the legacy TDP MMU), through
//! [`Kvm::with_shadow_mmu`], the one constructor of a host-side shadow context.

use super::page_fault::{self, KvmPageFault, RetPf};
use super::shadow::{self, Ctx};
use super::tdp_mmu;
use super::{KvmMmu, MmuError};
use crate::host::HostError;
use crate::hw::cpu::CpuMode;
use crate::memslot::{Memslot, MemslotChange, MemslotError};
use crate::sync::percpu::WriteGuard;
use crate::sync::Ordering;
use crate::vm::{req, Kvm, MmuKind, TdpKind, VcpuArch, VmError};
use x86_paging::addr::{Gfn, Gpa, Gva, Pfn};
use x86_paging::ept::{EptConfig, NptConfig};
use x86_paging::walk2d::Tdp;

/// KVM's per-vCPU cache capacity (`KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE`).
const MEMORY_CACHE_CAPACITY: usize = 40;
/// Minimum table frames before taking mmu_lock.
const SHADOW_PAGE_CACHE_MIN: usize = 5;

impl KvmMmu {
    /// `tdp_mmu_enabled`: faults go to the TDP MMU (`kvm_tdp_mmu_map`), its roots are
    /// `tdp_mmu_roots`, and VM-wide operations walk its tables.
    #[inline]
    pub fn tdp_mmu_enabled(&self) -> bool {
        self.kind == MmuKind::Tdp
    }

    /// `tdp_enabled`: the hardware walks two dimensions (EPT/NPT) and the MMU's roots map
    /// gpa -> hpa; otherwise the MMU shadows the guest's page tables.
    #[inline]
    pub fn tdp_enabled(&self) -> bool {
        self.kind != MmuKind::Shadow
    }

    /// `kvm_memslots_have_rmaps`: shadow pages exist (shadow paging, or the legacy TDP MMU,
    /// which keeps its direct pages in the shadow MMU's hash and rmaps).
    #[inline]
    pub fn have_rmaps(&self) -> bool {
        self.kind != MmuKind::Tdp
    }
}

/// `mmu->page_fault`: the fault handler of a vCPU's MMU context.
pub type PageFaultFn = fn(&Kvm, &mut VcpuArch, u64, u64, bool) -> Result<RetPf, MmuError>;

/// A vCPU's MMU context (the callbacks and role of KVM's `struct kvm_mmu`), chosen once by
/// [`kvm_init_mmu`].
#[derive(Clone, Copy)]
pub struct MmuContext {
    /// `mmu->page_fault`: [`tdp_page_fault`] or the shadow MMU's `FNAME(page_fault)`.
    pub page_fault: PageFaultFn,
    /// `mmu->root_role.direct`: the root maps gpa (TDP) rather than shadowing guest tables,
    /// so faults, MMIO caches and lockless walks are keyed by gpa.
    pub direct: bool,
}

impl std::fmt::Debug for MmuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmuContext").field("direct", &self.direct).finish_non_exhaustive()
    }
}

/// `kvm_init_mmu`: `init_kvm_tdp_mmu` with TDP, `init_kvm_softmmu` without. The shadow
/// MMU's `FNAME(page_fault)` follows the guest's paging mode by itself (paging32/64/PAE).
pub fn kvm_init_mmu(mmu: &KvmMmu) -> MmuContext {
    if mmu.tdp_enabled() {
        MmuContext { page_fault: tdp_page_fault, direct: true }
    } else {
        MmuContext { page_fault: shadow_page_fault, direct: false }
    }
}

/// `kvm_tdp_page_fault` as `mmu->page_fault`: the exit's gpa becomes a [`KvmPageFault`].
fn tdp_page_fault(
    kvm: &Kvm,
    vcpu: &mut VcpuArch,
    gpa: u64,
    error_code: u64,
    prefetch: bool,
) -> Result<RetPf, MmuError> {
    let mut fault = KvmPageFault::new(kvm, Gpa::new(gpa), error_code, prefetch);
    page_fault::kvm_tdp_page_fault(kvm, vcpu, &mut fault)
}

/// `FNAME(page_fault)` as `mmu->page_fault` (shadow paging never prefetches through here).
fn shadow_page_fault(
    kvm: &Kvm,
    vcpu: &mut VcpuArch,
    gva: u64,
    error_code: u64,
    _prefetch: bool,
) -> Result<RetPf, MmuError> {
    super::paging_tmpl::page_fault(kvm, vcpu, Gva::new(gva), error_code)
}

/// `mmu_topup_memory_caches`: fills the vCPU's cache of zeroed table frames before the
/// fault path takes `mmu_lock`.
pub fn mmu_topup_memory_caches(kvm: &Kvm, vcpu: &mut VcpuArch) -> Result<(), HostError> {
    if vcpu.mmu.shadow_page_cache.len() >= SHADOW_PAGE_CACHE_MIN {
        return Ok(());
    }
    while vcpu.mmu.shadow_page_cache.len() < MEMORY_CACHE_CAPACITY {
        let p = kvm.frames().alloc_4k()?;
        tdp_mmu::init_table(kvm, p);
        vcpu.mmu.shadow_page_cache.push(p);
    }
    Ok(())
}

/// `kvm_mmu_load`: allocates (or shares) the root and points the hardware at it.
pub fn kvm_mmu_load(kvm: &Kvm, vcpu: &mut VcpuArch) -> Result<(), VmError> {
    if !vcpu.mmu.ctx.direct {
        // mmu_alloc_shadow_roots.
        shadow::kvm_mmu_load(kvm, vcpu)?;
        return Ok(());
    }
    // mmu_alloc_direct_roots.
    let cfg = kvm.config();
    let (root_hpa, root_level) = if kvm.mmu.tdp_mmu_enabled() {
        mmu_topup_memory_caches(kvm, vcpu)?;
        let role = shadow::direct_root_role(cfg);
        let root = tdp_mmu::kvm_tdp_mmu_alloc_root(kvm, role)?;
        let r = (root.hpa, root.level());
        vcpu.mmu.root = Some(root);
        r
    } else {
        let r = shadow::kvm_mmu_load_direct(kvm, vcpu)?;
        (r.hpa, cfg.tdp_level())
    };
    let tdp = match cfg.tdp {
        TdpKind::Ept => Tdp::Ept(EptConfig {
            root: root_hpa,
            levels: root_level,
            ad_enabled: cfg.eptad,
            execute_only: true,
            gbpages: true,
            maxphyaddr: 46,
        }),
        TdpKind::Npt => {
            Tdp::Npt(NptConfig { root: root_hpa, levels: root_level, nxe: true, gbpages: true, maxphyaddr: 46 })
        }
    };
    vcpu.cpu.set_mode(CpuMode::Tdp(tdp));
    vcpu.cpu.flush_tlb_current();
    Ok(())
}

/// Which way KVM re-arms logging for a page it reported.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Rearm {
    /// Clear W (keep MMU-writable): the next write takes a fast page fault.
    WriteProtect,
    /// Clear D on 4 KiB SPTEs (PML logs the next write); write-protect huge SPTEs.
    ClearDirty,
}

/// What a tool may read about one shadow page (`vmmu explain`), copied out under the locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowPageInfo {
    /// Its role.
    pub role: super::role::Role,
    /// The guest table it shadows (indirect) or the first gfn it maps (direct).
    pub gfn: Gfn,
    /// Whether it is unsync.
    pub unsync: bool,
    /// `root_count`: vCPU roots that hold it.
    pub root_count: u32,
}

impl Kvm {
    /// The shadow page whose table is the frame `table`, if any (legacy TDP or shadow
    /// paging; TDP MMU tables are not shadow pages). Takes `mmu_lock` for write and then
    /// the shadow state, as every shadow-MMU path does, so it never sees a page half made.
    pub fn shadow_page_info(&self, table: Pfn) -> Option<ShadowPageInfo> {
        if !self.mmu.have_rmaps() {
            return None;
        }
        let w = self.mmu.mmu_lock.write();
        self.with_shadow_mmu(&w, |ctx| {
            let id = ctx.s.pages.by_spt(table)?;
            let p = ctx.s.pages.get(id);
            Some(ShadowPageInfo { role: p.role, gfn: p.gfn, unsync: p.unsync, root_count: p.root_count })
        })
    }

    /// Runs `f` on the shadow MMU as the host side (no vCPU): the one constructor of a
    /// host-side shadow context. `_held` proves the caller holds `mmu_lock` for write, which
    /// guards every shadow-MMU structure (KVM's shadow paths all `write_lock(&kvm->mmu_lock)`);
    /// the memslots are read under it, so the rmaps walked are the current ones.
    pub(crate) fn with_shadow_mmu<R>(&self, _held: &WriteGuard<'_>, f: impl FnOnce(&mut Ctx<'_>) -> R) -> R {
        let mut s = self.mmu.shadow.lock();
        let mut ctx = Ctx::host(self, &mut s, self.memslots());
        f(&mut ctx)
    }

    /// Frees page-table frames unlinked earlier, after a remote flush. The caller holds
    /// `mmu_lock` for write, so no fault-path walker holds a pointer into them; the flush
    /// guarantees no vCPU is still walking them in hardware or in fast page fault.
    pub(crate) fn flush_and_free_deferred(&self, me: Option<u32>, need_flush: bool) {
        let pending = std::mem::take(&mut *self.mmu.deferred_free.lock());
        if need_flush || !pending.is_empty() {
            self.flush_remote_tlbs(me);
        }
        for p in pending {
            self.frames().free_4k(p);
        }
    }

    /// `kvm_mmu_zap_all_fast`: makes every root obsolete, has the vCPUs drop them and zaps
    /// their contents (memslot delete/move).
    pub fn kvm_mmu_zap_all_fast(&self) {
        let _f = self.tracer.func(crate::trace::HOST_CPU, "kvm_mmu_zap_all_fast");
        {
            let _w = self.mmu.mmu_lock.write();
            let gen = self.mmu.mmu_valid_gen.fetch_xor(1, Ordering::AcqRel) ^ 1;
            if self.tracer.events_on() {
                self.tracer.event(
                    crate::trace::HOST_CPU,
                    "kvm_mmu_zap_all_fast",
                    format_args!("kvm-mmu-valid-gen {} used_pages {:x}", gen, 0),
                );
            }
            tdp_mmu::kvm_tdp_mmu_invalidate_all_roots(self);
            // The shadow MMU: zap every page now; roots in use are freed when released.
            self.with_shadow_mmu(&_w, |ctx| {
                ctx.s.mmu_valid_gen ^= 1;
                ctx.zap_all();
            });
            self.make_all_cpus_request(req::MMU_FREE_OBSOLETE_ROOTS);
        }
        tdp_mmu::kvm_tdp_mmu_zap_invalidated_roots(self);
        let _w = self.mmu.mmu_lock.write();
        self.flush_and_free_deferred(None, true);
    }

    /// Write-protects every mapping of memslot `slot` (`kvm_mmu_slot_remove_write_access`,
    /// what enabling dirty logging does first): writes then take fast page faults.
    pub fn mmu_slot_remove_write_access(&self, slot: u32) -> Result<(), VmError> {
        let slots = self.memslots();
        let s = slots.by_id(slot).ok_or(VmError::Memslot(MemslotError::NoSuchSlot(slot)))?;
        let (start, end) = (s.base_gfn.raw(), s.end_gfn().raw());
        drop(slots);
        self.rearm_range(start, end, Rearm::WriteProtect);
        // Unconditionally, as every caller of KVM's does: an SPTE already read-only
        // (access-tracked, not flushed by aging) may still be writable in a TLB.
        self.flush_remote_tlbs(None);
        Ok(())
    }

    /// KVM_SET_NR_MMU_PAGES: the limit on shadow pages (0 = the default, memslot pages / 50,
    /// at least 64); pages beyond it are recycled, oldest first (`kvm_mmu_change_mmu_pages`).
    pub fn set_nr_mmu_pages(&self, n: u64) {
        let w = self.mmu.mmu_lock.write();
        self.with_shadow_mmu(&w, |ctx| {
            ctx.s.n_requested_mmu_pages = n;
            ctx.s.update_n_max(&ctx.slots);
            let over = ctx.s.n_used_mmu_pages.saturating_sub(ctx.s.n_max_mmu_pages);
            if over > 0 {
                ctx.zap_oldest_mmu_pages(over);
            }
        });
    }

    /// (`n_used_mmu_pages`, `n_max_mmu_pages`) of the shadow MMU.
    pub fn mmu_pages(&self) -> (u64, u64) {
        let s = self.mmu.shadow.lock();
        (s.n_used_mmu_pages, s.n_max_mmu_pages)
    }

    /// How logging is re-armed on this VM: D bits with PML, write protection otherwise.
    fn rearm(&self) -> Rearm {
        if self.pml_in_use() {
            Rearm::ClearDirty
        } else {
            Rearm::WriteProtect
        }
    }

    /// `kvm_mmu_slot_apply_flags`: what turning KVM_MEM_LOG_DIRTY_PAGES on or off does to
    /// the slot's mappings.
    pub(crate) fn kvm_mmu_slot_apply_flags(
        &self,
        slot: u32,
        was_logging: bool,
        logging: bool,
        change: MemslotChange,
        initially_set: bool,
    ) -> Result<(), VmError> {
        if logging && !was_logging && !initially_set {
            let slots = self.memslots();
            let s = slots.by_id(slot).ok_or(VmError::Memslot(MemslotError::NoSuchSlot(slot)))?;
            if self.config.eager_page_split && self.mmu.tdp_mmu_enabled() {
                // kvm_mmu_slot_try_split_huge_pages: split before protecting, so the
                // children are protected (or have D cleared) like any 4 KiB SPTE.
                tdp_mmu::kvm_tdp_mmu_try_split_huge_pages(self, s.base_gfn, s.end_gfn())?;
            }
            // Write protection: everything, huge mappings too (huge pages are mapped 4 KiB
            // while logging). PML: kvm_mmu_slot_leaf_clear_dirty + remove_write_access(2M).
            self.rearm_range(s.base_gfn.raw(), s.end_gfn().raw(), self.rearm());
            // Flush whether or not an SPTE changed, as KVM does: an SPTE that is already
            // read-only (access-tracked by aging, which does not flush) may still sit
            // writable in a vCPU's TLB, and a write through it would go unlogged.
            self.flush_remote_tlbs(None);
        } else if was_logging && !logging && change == MemslotChange::FlagsOnly {
            self.kvm_mmu_recover_huge_pages(slot);
        }
        Ok(())
    }

    /// `kvm_mmu_recover_huge_pages` (`kvm_mmu_zap_collapsible_sptes` before v6.13): logging
    /// is off, so what may be huge again becomes huge — in place in the TDP MMU, by zapping
    /// the collapsible 4 KiB and 2 MiB SPTEs of direct pages in the rmaps. Everything else
    /// keeps its (write-protected or D-cleared) SPTE; one flush at the end if anything
    /// changed.
    fn kvm_mmu_recover_huge_pages(&self, slot: u32) {
        let slots = self.memslots();
        let Some(s) = slots.by_id(slot) else { return };
        let mut flush = false;
        if self.mmu.tdp_mmu_enabled() {
            flush |= tdp_mmu::kvm_tdp_mmu_recover_huge_pages(self, s);
        }
        let w = self.mmu.mmu_lock.write();
        if self.mmu.have_rmaps() {
            flush |= self.with_shadow_mmu(&w, |ctx| ctx.zap_collapsible_sptes(s));
        }
        // The tables replaced in place are freed after the flush (they may still be walked).
        self.flush_and_free_deferred(None, flush);
    }

    /// Re-arms logging for the pages whose bits are set in `bitmap` (bit i of word w = page
    /// first_page + 64 w + i of `s`). The caller flushes TLBs when any bit was set.
    pub(crate) fn rearm_masked(&self, s: &Memslot, first_page: u64, bitmap: &[u64]) {
        let base = s.base_gfn.raw() + first_page;
        let how = self.rearm();
        for (w, bits) in bitmap.iter().enumerate() {
            // Each run of consecutive set bits is one range of dirty gfns: one walk each.
            let mut b = *bits;
            while b != 0 {
                let first = u64::from(b.trailing_zeros());
                let len = u64::from((!(b >> first)).trailing_zeros());
                b &= !(u64::MAX >> (64 - len) << first);
                let start = base + w as u64 * 64 + first;
                self.rearm_range(start, start + len, how);
            }
        }
    }

    /// Re-arms logging on every SPTE mapping a gfn in [start, end), in both MMUs: write
    /// protection clears W (keeping MMU-writable); clearing dirty clears D on 4 KiB SPTEs and
    /// W on huge ones. Whether an SPTE changed does not matter to the caller, which flushes
    /// regardless (a TLB may hold a writable translation behind an already read-only SPTE).
    pub(crate) fn rearm_range(&self, start: u64, end: u64, how: Rearm) {
        let (start, end) = (Gfn::new(start), Gfn::new(end));
        if self.mmu.tdp_mmu_enabled() {
            match how {
                Rearm::WriteProtect => tdp_mmu::kvm_tdp_mmu_wrprot_slot(self, start, end),
                Rearm::ClearDirty => tdp_mmu::kvm_tdp_mmu_clear_dirty_slot(self, start, end),
            }
            return;
        }
        let w = self.mmu.mmu_lock.write();
        self.with_shadow_mmu(&w, |ctx| {
            // The slot's rmaps over the range (for_each_slot_rmap_range): the cost follows
            // what is mapped, not the slot's size.
            let wp_from = match how {
                Rearm::WriteProtect => 1,
                Rearm::ClearDirty => {
                    // __rmap_clear_dirty at 4 KiB; huge SPTEs write-protected.
                    let dirty = ctx.kvm.mmu.masks.dirty;
                    for (_, sptep) in ctx.s.rmap_range(&ctx.slots, start, end, 1, 1) {
                        ctx.spte_clear_dirty(sptep, dirty);
                    }
                    2
                }
            };
            for (_, sptep) in ctx.s.rmap_range(&ctx.slots, start, end, wp_from, 3) {
                ctx.spte_write_protect(sptep, false);
            }
        });
    }
}
