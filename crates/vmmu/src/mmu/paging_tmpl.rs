//! The guest-format half of the shadow MMU (paging_tmpl.h, instantiated here for 64-bit
//! guest entries: 4- and 5-level paging): the guest walk with its tracepoints,
//! `FNAME(page_fault)`, `FNAME(fetch)` (indirect levels that shadow guest tables, direct
//! levels for a guest huge page mapped by smaller pages), `FNAME(pte_prefetch)` and
//! `FNAME(sync_spte)`.

use super::page::SpId;
use super::page_fault::{self, KvmPageFault, RetPf, PFERR_FETCH, PFERR_RSVD, PFERR_USER, PFERR_WRITE};
use super::shadow::{child_role_at, Ctx, ShadowWalk};
use super::spte::{make_spte, Spte, SpteRequest, ACC_EXEC, ACC_USER, ACC_WRITE};
use super::tdp_iter::pages_at;
use super::MmuError;
use crate::guest_mem::KvmGuestMem;
use crate::vm::{Kvm, VcpuArch};
use x86_paging::access::{Access, AccessKind, PfErrorCode};
use x86_paging::addr::{Gfn, Gpa, Gva, Hpa, Pfn};
use x86_paging::mode::{PagingMode, PagingState};
use x86_paging::regs::{Cr0, Cr4};
use x86_paging::walk::{walk, WalkError, WalkObserver, WalkOptions};

const PT_PRESENT: u64 = 1;
const PT_WRITABLE: u64 = 1 << 1;
const PT_USER: u64 = 1 << 2;
const PT_ACCESSED: u64 = 1 << 5;
const PT_DIRTY: u64 = 1 << 6;
const PT_NX: u64 = 1 << 63;
const PT64_ADDR: u64 = 0x000f_ffff_ffff_f000;
/// `PTE_PREFETCH_NUM`.
pub const PTE_PREFETCH_NUM: u64 = 8;

/// `struct guest_walker`: what the guest walk found.
#[derive(Debug, Clone)]
pub struct GuestWalker {
    /// Leaf level.
    pub level: u8,
    /// Root level of the guest's paging.
    pub root_level: u8,
    /// The 4 KiB gfn of the accessed address.
    pub gfn: Gfn,
    /// `ptes[level - 1]`.
    pub ptes: [u64; 5],
    /// `table_gfn[level - 1]`: the guest table holding the level-`level` entry.
    pub table_gfn: [Gfn; 5],
    /// `pte_gpa[level - 1]`: where the level-`level` entry lives.
    pub pte_gpa: [Gpa; 5],
    /// Size of a guest entry (4 for 32-bit paging, else 8).
    pub gpte_size: u8,
    /// `pt_access[level - 1]`: rights accumulated from the root through that level.
    pub pt_access: [u8; 5],
    /// Rights of the translation (after `protect_clean_gpte`).
    pub pte_access: u8,
}

/// `FNAME(gpte_access)`.
pub fn gpte_access(gpte: u64, nx: bool) -> u8 {
    let mut a = ACC_EXEC;
    if gpte & PT_WRITABLE != 0 {
        a |= ACC_WRITE;
    }
    if gpte & PT_USER != 0 {
        a |= ACC_USER;
    }
    if nx && gpte & PT_NX != 0 {
        a &= !ACC_EXEC;
    }
    a
}

/// `FNAME(protect_clean_gpte)`: a clean guest page is mapped read-only so that the first
/// write faults and the walk sets D.
pub fn protect_clean_gpte(access: &mut u8, gpte: u64) {
    if gpte & PT_DIRTY == 0 {
        *access &= !ACC_WRITE;
    }
}

struct TraceWalk<'a> {
    kvm: &'a Kvm,
    cpu: u32,
}

impl WalkObserver for TraceWalk<'_> {
    fn element(&mut self, level: u8, _pte_gpa: Gpa, pte: u64) {
        self.kvm.tracer.event(self.cpu, "kvm_mmu_paging_element", format_args!("pte {pte:x} level {level}"));
    }
    fn set_accessed(&mut self, pte_gpa: Gpa) {
        self.kvm.tracer.event(self.cpu, "kvm_mmu_set_accessed_bit", format_args!("gpa {:x}", pte_gpa.raw()));
    }
    fn set_dirty(&mut self, pte_gpa: Gpa) {
        self.kvm.tracer.event(self.cpu, "kvm_mmu_set_dirty_bit", format_args!("gpa {:x}", pte_gpa.raw()));
    }
}

fn pferr_text(ec: u64) -> String {
    super::mmio::pferr_flags(ec)
}

/// `FNAME(walk_addr_generic)`: walks the guest's tables in software (through memslots),
/// setting A/D bits as hardware would; a fault comes back as the guest's #PF error code.
pub fn walk_addr(kvm: &Kvm, vcpu: &VcpuArch, gva: Gva, error_code: u64) -> Result<GuestWalker, PfErrorCode> {
    let st: PagingState = *vcpu.cpu.paging();
    let kind = if error_code & PFERR_WRITE != 0 {
        AccessKind::Write
    } else if error_code & PFERR_FETCH != 0 {
        AccessKind::Fetch
    } else {
        AccessKind::Read
    };
    let access = Access {
        kind,
        cpl: if error_code & PFERR_USER != 0 { 3 } else { 0 },
        implicit_supervisor: false,
        eflags_ac: vcpu.cpu.eflags_ac(),
    };
    let tracing = kvm.tracer.events_on();
    if tracing {
        kvm.tracer.event(
            vcpu.id,
            "kvm_mmu_pagetable_walk",
            format_args!("addr {:x} pferr {:x} {}", gva, crate::num::low32(error_code), pferr_text(error_code)),
        );
    }
    let bus = kvm.mmio_bus();
    let mut mem = KvmGuestMem::new(kvm.host(), &vcpu.slots, &bus).with_ring(vcpu.dirty_ring.as_deref());
    let r = loop {
        let r = if tracing {
            walk(&mut mem, &st, gva, &access, WalkOptions::ARCH, &mut TraceWalk { kvm, cpu: vcpu.id })
        } else {
            walk(&mut mem, &st, gva, &access, WalkOptions::ARCH, &mut x86_paging::walk::NoObserver)
        };
        match r {
            Err(WalkError::Contended) => continue,
            r => break r,
        }
    };
    let t = match r {
        Ok(t) => t,
        Err(WalkError::PageFault(ec)) => {
            if tracing {
                kvm.tracer.event(
                    vcpu.id,
                    "kvm_mmu_walker_error",
                    format_args!("pferr {:x} {}", ec.0, pferr_text(u64::from(ec.0))),
                );
            }
            return Err(ec);
        }
        // A non-canonical address takes #GP before any walk; it cannot reach here.
        Err(_) => return Err(PfErrorCode(0)),
    };
    let root_level = st.mode().levels();
    let nx = st.nx_enabled();
    let mut w = GuestWalker {
        level: t.level,
        root_level,
        gfn: t.gpa.gfn(),
        ptes: t.ptes,
        table_gfn: [Gfn::new(0); 5],
        pte_gpa: t.pte_gpas,
        gpte_size: if st.mode() == PagingMode::Bits32 { 4 } else { 8 },
        pt_access: [0; 5],
        pte_access: 0,
    };
    let mut acc = ACC_EXEC | ACC_WRITE | ACC_USER;
    for level in (t.level..=root_level).rev() {
        let i = usize::from(level - 1);
        w.table_gfn[i] = t.pte_gpas[i].gfn();
        // A PAE PDPTE carries no rights (its R/W, U/S and NX positions are reserved).
        if !(root_level == 3 && level == 3) {
            acc &= gpte_access(t.ptes[i], nx);
        }
        w.pt_access[i] = acc;
    }
    w.pte_access = acc;
    if kind != AccessKind::Write {
        protect_clean_gpte(&mut w.pte_access, t.ptes[usize::from(t.level - 1)]);
    }
    Ok(w)
}

/// `FNAME(page_fault)`: an intercepted #PF under shadow paging.
pub fn page_fault(kvm: &Kvm, vcpu: &mut VcpuArch, gva: Gva, error_code: u64) -> Result<RetPf, MmuError> {
    let _f = kvm.tracer.func(vcpu.id, "paging64_page_fault");
    let mode = vcpu.cpu.paging().mode();
    if mode == PagingMode::NonPaging {
        return nonpaging_page_fault(kvm, vcpu, gva, error_code);
    }
    let mut walker = match walk_addr(kvm, vcpu, gva, error_code & !PFERR_RSVD) {
        Ok(w) => w,
        Err(ec) => {
            // The guest's own fault: inject it (kvm_inject_emulated_page_fault).
            vcpu.stat.pf_guest += 1;
            vcpu.shadow.pending_pf = Some((gva.raw(), ec.0));
            return Ok(RetPf::Retry);
        }
    };
    let mut fault = KvmPageFault::new_shadow(kvm, Gpa::new(walker.gfn.gpa().raw() | gva.page_offset()), error_code);
    fault.gfn = walker.gfn;
    fault.max_level = walker.level;
    // page_fault_handle_page_track: a write to a write-tracked gfn cannot be fixed.
    if fault.present && fault.write && kvm.mmu.shadow.lock().write_track.is_tracked(fault.gfn) {
        shadow_page_table_clear_flood(kvm, vcpu, gva);
        return Ok(RetPf::Emulate);
    }
    crate::mmu::mmu::mmu_topup_memory_caches(kvm, vcpu)
        .map_err(|e| MmuError::OutOfMemory { gpa: fault.addr.raw(), source: e })?;
    let r = page_fault::kvm_faultin_pfn(kvm, vcpu, &mut fault)?;
    if r != RetPf::Continue {
        return Ok(r);
    }
    let mut pte_access = walker.pte_access;
    let st = *vcpu.cpu.paging();
    if !fault.user && !st.cr0.contains(Cr0::WP) && fault.write && pte_access & ACC_WRITE == 0 {
        // CR0.WP=0: a supervisor write to a read-only page is allowed; the SPTE becomes
        // writable but not user (and not executable under SMEP), so user accesses still fault.
        pte_access |= ACC_WRITE;
        pte_access &= !ACC_USER;
        if st.cr4.contains(Cr4::SMEP) {
            pte_access &= !ACC_EXEC;
        }
    }
    walker.pte_access = pte_access;
    Ok(under_mmu_lock(kvm, vcpu, gva, &mut fault, |ctx, root, f| fetch(ctx, root, gva, &walker, f, pte_access)))
}

/// The common tail of the shadow fault paths, under `mmu_lock` for write:
/// `make_mmu_pages_available`, `is_page_fault_stale` (obsolete root, racing invalidation),
/// then `map` from the root that covers `gva`.
fn under_mmu_lock(
    kvm: &Kvm,
    vcpu: &mut VcpuArch,
    gva: Gva,
    fault: &mut KvmPageFault,
    map: impl FnOnce(&mut Ctx<'_>, SpId, &mut KvmPageFault) -> RetPf,
) -> RetPf {
    let _w = kvm.mmu.mmu_lock.write();
    let mut s = kvm.mmu.shadow.lock();
    let slots = vcpu.slots.clone();
    let cpu = vcpu.id;
    let root = vcpu.shadow.root_for(gva);
    let mut ctx = Ctx { kvm, s: &mut s, slots, vcpu: Some(vcpu), cpu };
    ctx.make_mmu_pages_available();
    let Some((root, _)) = root.filter(|(r, _)| ctx.s.pages.exists(*r) && ctx.s.pages.get(*r).role.invalid() == 0)
    else {
        return RetPf::Retry;
    };
    if fault.slot.is_some() && page_fault::mmu_invalidate_retry_gfn(kvm, fault.mmu_seq, fault.gfn) {
        return RetPf::Retry;
    }
    map(&mut ctx, root, fault)
}

/// `nonpaging_page_fault`: paging is off, the gva is the gpa; direct pages under the PAE
/// roots map it, at most 2 MiB at a time.
fn nonpaging_page_fault(kvm: &Kvm, vcpu: &mut VcpuArch, gva: Gva, error_code: u64) -> Result<RetPf, MmuError> {
    let mut fault = KvmPageFault::new_shadow(kvm, Gpa::new(gva.raw() & 0xffff_ffff), error_code);
    fault.max_level = 2;
    crate::mmu::mmu::mmu_topup_memory_caches(kvm, vcpu)
        .map_err(|e| MmuError::OutOfMemory { gpa: gva.raw(), source: e })?;
    let r = page_fault::kvm_faultin_pfn(kvm, vcpu, &mut fault)?;
    if r != RetPf::Continue {
        return Ok(r);
    }
    Ok(under_mmu_lock(kvm, vcpu, gva, &mut fault, |ctx, root, f| ctx.direct_map(root, f)))
}

/// `FNAME(gpte_changed)`: whether the guest rewrote the level-`level` entry since the walk.
fn gpte_changed(ctx: &Ctx<'_>, w: &GuestWalker, level: u8) -> bool {
    let i = usize::from(level - 1);
    let bus = ctx.kvm.mmio_bus();
    KvmGuestMem::new(ctx.kvm.host(), &ctx.slots, &bus).read(w.pte_gpa[i], w.gpte_size) != w.ptes[i]
}

/// Where entry `i` of the guest table behind shadow page `sp` lives, and its size: a
/// 32-bit guest's table is shadowed in halves (level 1) or quarters (the root), selected by
/// the role's quadrant.
fn gpte_addr(ctx: &Ctx<'_>, sp: SpId, i: u64) -> (Gpa, u8) {
    let p = ctx.s.pages.get(sp);
    let base = p.gfn.gpa().raw();
    if p.role.has_4_byte_gpte() != 0 {
        let per_quadrant = if p.role.level() == 1 { 512 } else { 256 };
        let index = u64::from(p.role.quadrant()) * per_quadrant + if p.role.level() == 1 { i } else { i / 2 };
        (Gpa::new(base + index * 4), 4)
    } else {
        (Gpa::new(base + i * 8), 8)
    }
}

/// `FNAME(fetch)`: builds the shadow path for the walked translation and installs the leaf.
fn fetch(
    ctx: &mut Ctx<'_>,
    root_sp: SpId,
    gva: Gva,
    w: &GuestWalker,
    fault: &mut KvmPageFault,
    pte_access: u8,
) -> RetPf {
    let mut it = ShadowWalk::new(&ctx.s.pages, root_sp, gva.raw());
    // For PAE the PDPTE comes from the PDPTR registers: the top checked entry is the PDE.
    let top = if w.root_level == 3 { 2 } else { w.root_level };
    if gpte_changed(ctx, w, top) {
        return RetPf::Retry;
    }
    // The first of FNAME(fetch)'s two loops over one shadow walk: the indirect levels, each
    // shadowing a guest table.
    while it.level > w.level {
        let level = it.level;
        let sptep = it.sptep(&ctx.s.pages);
        ctx.s.pages.get_mut(it.sp).write_flooding_count = 0;
        let spte = Spte(ctx.kvm.mem().load(sptep));
        if spte.is_shadow_present() && !spte.is_large() {
            if !it.next(&ctx.s.pages, ctx.kvm.mem()) {
                return RetPf::Retry;
            }
            continue;
        }
        let table_gfn = w.table_gfn[usize::from(level - 2)];
        let role = child_role_at(ctx.s.pages.get(it.sp).role, it.index(), false, w.pt_access[usize::from(level - 1)]);
        let c = ctx.get_shadow_page(table_gfn, role);
        if ctx.s.pages.get(c).unsync_children > 0 {
            ctx.sync_children(c);
        }
        if !ctx.s.pages.exists(it.sp) || !ctx.s.pages.exists(c) || gpte_changed(ctx, w, level - 1) {
            return RetPf::Retry;
        }
        ctx.link_shadow_page(sptep, c);
        it.descend(c);
    }
    // The guest leaf level: hugepage_adjust picks the level to map.
    {
        let slots = ctx.slots.clone();
        page_fault::kvm_mmu_hugepage_adjust(ctx.kvm, &slots, fault);
    }
    fault.goal_level = fault.goal_level.min(w.level);
    // The second loop, the same walk going on: direct levels, a guest huge page mapped by
    // smaller SPTEs.
    if let Err(r) = ctx.walk_direct_levels(&mut it, fault, w.pte_access) {
        return r;
    }
    let (sp, level) = (it.sp, it.level);
    let sptep = it.sptep(&ctx.s.pages);
    let gfn = fault.gfn.align_down(level);
    let pfn = fault.slot.map(|_| Pfn::new(fault.pfn.raw() & !(pages_at(level) - 1)));
    if ctx.kvm.tracer.events_on() {
        ctx.kvm.tracer.event(
            ctx.cpu,
            "kvm_mmu_spte_requested",
            format_args!("gfn {:x} pfn {:x} level {}", fault.gfn.raw(), fault.pfn.raw(), level),
        );
    }
    let r = ctx.mmu_set_spte(sptep, pte_access, gfn, pfn, fault.map_writable, false, fault.write);
    // Prefetch after a fix or an emulation (an MMIO SPTE too), not after nothing changed.
    if r != RetPf::Spurious && level == 1 {
        pte_prefetch(ctx, sp, sptep);
    }
    r
}

/// `shadow_page_table_clear_flood`: a fault that used the path to `gva` resets the
/// write-flooding counts of the pages on it.
fn shadow_page_table_clear_flood(kvm: &Kvm, vcpu: &VcpuArch, gva: Gva) {
    let Some((root, _)) = vcpu.shadow.root_for(gva) else { return };
    let mut s = kvm.mmu.shadow.lock();
    if !s.pages.exists(root) {
        return;
    }
    let mut it = ShadowWalk::new(&s.pages, root, gva.raw());
    loop {
        s.pages.get_mut(it.sp).write_flooding_count = 0;
        if !it.next(&s.pages, kvm.mem()) {
            return;
        }
    }
}

/// `FNAME(prefetch_invalid_gpte)`: not present, not accessed, or reserved bits.
fn prefetch_invalid_gpte(gpte: u64, st: &PagingState) -> bool {
    gpte & PT_PRESENT == 0 || gpte & PT_ACCESSED == 0 || x86_paging::walk::reserved_bits(st, 1, gpte) != 0
}

/// `direct_pte_prefetch` / `FNAME(pte_prefetch)` for callers outside this module.
pub fn pte_prefetch_pub(ctx: &mut Ctx<'_>, sp: SpId, sptep: Hpa) {
    pte_prefetch(ctx, sp, sptep)
}

/// `FNAME(pte_prefetch)` / `direct_pte_prefetch`: maps the neighbours of a just-mapped
/// last-level SPTE in its aligned group of [`PTE_PREFETCH_NUM`]. Indirect pages stop at the
/// first guest entry that cannot be prefetched (not present or accessed, reserved bits, no
/// memslot, a dirty-logged slot for a writable mapping, a host page not mapped writable);
/// direct pages prefetch each run of non-present SPTEs as one batch of host pages
/// (`direct_pte_prefetch_many`), stopping at the first run that gets none.
fn pte_prefetch(ctx: &mut Ctx<'_>, sp: SpId, sptep: Hpa) {
    let Some(vcpu) = ctx.vcpu.as_ref() else { return };
    let st = *vcpu.cpu.paging();
    let (gfn_table, direct, role_access, level, ad_disabled) = {
        let p = ctx.s.pages.get(sp);
        (p.gfn, p.role.direct() != 0, p.role.access(), p.role.level(), p.role.ad_disabled() != 0)
    };
    // Without Accessed bits a prefetched translation cannot be told from a used one.
    if level > 1 || (direct && ad_disabled) {
        return;
    }
    if ctx.kvm.mmu.mmu_invalidate_in_progress.load(crate::sync::Ordering::Acquire) != 0 {
        return;
    }
    let index = sptep.entry_index();
    let first = index & !(PTE_PREFETCH_NUM - 1);
    if direct {
        let mut start = None;
        for i in first..first + PTE_PREFETCH_NUM {
            let present = Spte(ctx.kvm.mem().load(ctx.s.pages.get(sp).sptep(i))).is_shadow_present();
            if present || i == index {
                if let Some(s) = start.take() {
                    if !direct_pte_prefetch_many(ctx, sp, Gfn::new(gfn_table.raw() + s), s, i, role_access) {
                        return;
                    }
                }
            } else if start.is_none() {
                start = Some(i);
            }
        }
        if let Some(s) = start {
            direct_pte_prefetch_many(ctx, sp, Gfn::new(gfn_table.raw() + s), s, first + PTE_PREFETCH_NUM, role_access);
        }
        return;
    }
    let bus = ctx.kvm.mmio_bus();
    for i in first..first + PTE_PREFETCH_NUM {
        if i == index {
            continue;
        }
        let p = ctx.s.pages.get(sp).sptep(i);
        let cur = Spte(ctx.kvm.mem().load(p));
        if cur.is_shadow_present() {
            continue;
        }
        let (at, size) = gpte_addr(ctx, sp, i);
        let gpte = KvmGuestMem::new(ctx.kvm.host(), &ctx.slots, &bus).read(at, size);
        if prefetch_invalid_gpte(gpte, &st) {
            // FNAME(prefetch_invalid_gpte) drops what is there (an MMIO SPTE) and stops.
            if cur.is_mmio(&ctx.kvm.mmu.masks) {
                ctx.kvm.mem().store(p, Spte::NONPRESENT.0);
            }
            break;
        }
        let mut access = role_access & gpte_access(gpte, st.nx_enabled());
        protect_clean_gpte(&mut access, gpte);
        let gfn = Gfn::new((gpte & PT64_ADDR) >> 12);
        let Some(pfns) = prefetch_pages(ctx, gfn, 1, access) else { break };
        let Some(&pfn) = pfns.first() else { break };
        ctx.mmu_set_spte(p, access, gfn, Some(pfn), true, true, false);
    }
}

/// `direct_pte_prefetch_many`: maps SPTEs `from..to` of direct page `sp` (gfns from `gfn`)
/// with the host pages `kvm_prefetch_pages` gets; false stops the prefetch.
fn direct_pte_prefetch_many(ctx: &mut Ctx<'_>, sp: SpId, gfn: Gfn, from: u64, to: u64, access: u8) -> bool {
    let Some(pfns) = prefetch_pages(ctx, gfn, to - from, access) else { return false };
    if pfns.is_empty() {
        return false;
    }
    for (k, pfn) in (0u64..).zip(pfns) {
        let p = ctx.s.pages.get(sp).sptep(from + k);
        ctx.mmu_set_spte(p, access, gfn.offset(k), Some(pfn), true, true, false);
    }
    true
}

/// `gfn_to_memslot_dirty_bitmap` + `kvm_prefetch_pages`: the host frames of up to `n` gfns
/// from `gfn` that the VMM maps writable right now (get_user_pages_fast_only with
/// FOLL_WRITE), stopping at the first that is not; `None` when there is no memslot, the slot
/// is read-only, or a writable mapping would go unlogged in a dirty-logged slot. Prefetched
/// SPTEs are therefore always host-writable.
fn prefetch_pages(ctx: &Ctx<'_>, gfn: Gfn, n: u64, access: u8) -> Option<Vec<Pfn>> {
    let slot = ctx.slots.find(gfn)?;
    if access & ACC_WRITE != 0 && slot.dirty_logging() {
        return None;
    }
    if slot.readonly() {
        return None;
    }
    // gfn_to_hva_many: no more pages than the slot has from gfn on.
    let left = slot.end_gfn().raw().saturating_sub(gfn.raw());
    if left < n {
        return Some(Vec::new());
    }
    let host = ctx.kvm.host();
    let mut out = Vec::new();
    for k in 0..n {
        match host.get_user_page_fast_only(slot.gfn_to_hva(gfn.offset(k)), true) {
            Some(p) => out.push(p.pfn),
            None => break,
        }
    }
    Some(out)
}

/// `FNAME(sync_spte)`: re-reads the guest entry behind SPTE `i` of an unsync page; the SPTE
/// is dropped if the entry changed its target or went invalid, or rebuilt if only the rights
/// changed. Returns > 0 when a TLB flush is needed.
pub fn sync_spte(ctx: &mut Ctx<'_>, sp: SpId, i: u64) -> i32 {
    let Some(vcpu) = ctx.vcpu.as_ref() else { return 0 };
    let st = *vcpu.cpu.paging();
    let (role_access, level) = {
        let p = ctx.s.pages.get(sp);
        (p.role.access(), p.role.level())
    };
    let sptep = ctx.s.pages.get(sp).sptep(i);
    let bus = ctx.kvm.mmio_bus();
    let (at, size) = gpte_addr(ctx, sp, i);
    let gpte = KvmGuestMem::new(ctx.kvm.host(), &ctx.slots, &bus).read(at, size);
    if prefetch_invalid_gpte(gpte, &st) {
        ctx.drop_spte(sptep);
        ctx.kvm.mem().store(sptep, Spte::NONPRESENT.0);
        return 1;
    }
    let gfn = Gfn::new((gpte & PT64_ADDR) >> 12);
    let mut access = role_access & gpte_access(gpte, st.nx_enabled());
    protect_clean_gpte(&mut access, gpte);
    let old = Spte(ctx.kvm.mem().load(sptep));
    let m = ctx.kvm.mmu.masks;
    if old.is_mmio(&m) {
        // sync_mmio_spte: an MMIO SPTE whose gfn changed is cleared; one that still points
        // at the same gfn is marked again, with the current generation and the new access.
        // Neither needs a flush (MMIO SPTEs are never cached as translations).
        if old.mmio_gfn(&m) != gfn {
            ctx.kvm.mem().store(sptep, Spte::NONPRESENT.0);
        } else {
            ctx.mark_mmio_spte(sptep, gfn, access);
        }
        return 0;
    }
    if gfn != ctx.s.sp_gfn_at(sp, i) {
        ctx.drop_spte(sptep);
        return 1;
    }
    // The same gfn with the same rights: nothing to do (a write-protected PTE stays so).
    if access == ctx.s.sp_access_at(sp, i) {
        return 0;
    }
    ctx.s.set_translation(sp, i, gfn, access);
    let req = SpteRequest {
        level,
        pfn: old.pfn(),
        access,
        prefetch: true,
        synchronizing: true,
        host_writable: old.0 & m.host_writable != 0,
        nx_huge_pages: ctx.kvm.nx_huge_pages(),
        ad_disabled: false,
    };
    let (new, _) = make_spte(&m, &req, old, || ctx.try_to_unsync_pages(gfn, false, true));
    let flush = old.is_mmu_writable(&m) && !new.is_mmu_writable(&m);
    ctx.kvm.mem().store(sptep, new.0);
    if new.is_writable() {
        // make_spte -> mark_page_dirty_in_slot.
        if let Some(slot) = ctx.slots.find(gfn) {
            crate::dirty_log::mark_page_dirty_in_slot(
                ctx.vcpu.as_ref().and_then(|v| v.dirty_ring.as_deref()),
                slot,
                gfn,
            );
        }
    }
    i32::from(flush)
}

/// `kvm_mmu_invalidate_addr` for the current root: INVLPG syncs the SPTE of `gva` in unsync
/// pages along the path (dropping it if the guest changed it).
pub fn invlpg(ctx: &mut Ctx<'_>, root_sp: SpId, gva: Gva) {
    if !ctx.s.pages.exists(root_sp) {
        return;
    }
    let mut it = ShadowWalk::new(&ctx.s.pages, root_sp, gva.raw());
    loop {
        let (sp, index) = (it.sp, it.index());
        if !ctx.s.pages.exists(sp) {
            return;
        }
        let sptep = it.sptep(&ctx.s.pages);
        let cur = Spte(ctx.kvm.mem().load(sptep));
        // kvm_sync_spte: nothing to sync behind a non-present SPTE.
        if ctx.s.pages.get(sp).unsync && (cur.is_shadow_present() || cur.is_mmio(&ctx.kvm.mmu.masks)) {
            let r = sync_spte(ctx, sp, index);
            if r < 0 {
                ctx.drop_spte(sptep);
            }
            if r != 0 {
                ctx.kvm.flush_remote_tlbs(ctx.vcpu.as_ref().map(|v| v.id));
            }
        }
        if ctx.s.pages.get(sp).unsync_children == 0 || !it.next(&ctx.s.pages, ctx.kvm.mem()) {
            return;
        }
    }
}
