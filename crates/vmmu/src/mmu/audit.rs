//! The audit: SPTE invariants checked against the memslots and the host page table.
//!
//! - every present leaf SPTE maps, for a gfn inside a memslot, exactly the pfn the memslot's
//!   hva resolves to in the host page table (so no SPTE maps a frame the host freed or moved);
//! - a huge leaf lies wholly inside one memslot and the host maps it at least as large;
//! - a writable SPTE only where the memslot and the host mapping are writable;
//! - no present SPTE maps a gfn outside every memslot;
//! - in a dirty-logged memslot, every gfn a writable SPTE maps is already logged (its bit
//!   set in the bitmap, or an entry in a vCPU's dirty ring), else a write through it would go
//!   unlogged; under PML a 4 KiB SPTE with D clear is exempt (the write sets D and the
//!   page-modification log records it);
//! - an access-tracked SPTE (A/D bits off, aged) has no hardware R/W/X bits, is not
//!   writable, and saved a readable or executable permission to restore;
//! - an MMIO SPTE of the current memslot generation is for a gfn outside every memslot;
//! - the page counters (pages_4k/2m/1g) and tdp_mmu_pages equal a recount.

use super::spte::Spte;
use super::tdp_iter::{pages_at, Step};
use crate::sync::Ordering;
use crate::vm::Kvm;
use x86_paging::addr::Gfn;

/// What the audit counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditReport {
    /// Present leaves per level (index 0 = 4 KiB).
    pub leaves: [u64; 3],
    /// Page-table pages reachable from the roots (including the roots).
    pub tables: u64,
    /// MMIO SPTEs.
    pub mmio_sptes: u64,
}

/// The invariant violations found.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("MMU audit failed:\n  {}", .0.join("\n  "))]
pub struct AuditError(pub Vec<String>);

/// Runs the audit under `mmu_lock` held for write.
pub fn audit(kvm: &Kvm) -> Result<AuditReport, AuditError> {
    if kvm.mmu.have_rmaps() {
        return audit_shadow(kvm);
    }
    let _w = kvm.mmu.mmu_lock.write();
    let slots = kvm.memslots();
    let logged = Logged::new(kvm);
    let host = kvm.host();
    let m = kvm.mmu.masks;
    let mut rep = AuditReport::default();
    let mut errs = Vec::new();
    let roots = kvm.mmu.roots.lock().clone();
    for root in roots.iter() {
        rep.tables += 1;
        if root.zapped.load(Ordering::Acquire) {
            // An obsolete root a vCPU still holds: its contents are gone, its page stays until
            // the vCPU drops it (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS).
            continue;
        }
        root.walk(kvm, 1, Gfn::new(0), Gfn::new(1 << 40), |it| {
            let s: Spte = it.old_spte;
            let level = it.level;
            if s.is_shadow_present() && !s.is_last(level) {
                rep.tables += 1;
            } else if s.is_shadow_present() {
                rep.leaves[usize::from(level) - 1] += 1;
                let gfn = it.gfn;
                let pages = pages_at(level);
                match slots.find(gfn) {
                    None => errs.push(format!("SPTE {s:?} at level {level} maps gfn {gfn:#x} outside every memslot")),
                    Some(slot) => {
                        if gfn.raw() + pages > slot.end_gfn().raw() {
                            errs.push(format!("level-{level} SPTE at gfn {gfn:#x} extends past memslot {}", slot.id));
                        }
                        let hva = slot.gfn_to_hva(gfn);
                        match host.get_user_page_fast_only(hva, false) {
                            None => errs.push(format!(
                                "SPTE for gfn {gfn:#x} maps pfn {:#x} but the host maps nothing at hva {hva}",
                                s.pfn().raw()
                            )),
                            Some(p) => {
                                if p.pfn != s.pfn() {
                                    errs.push(format!(
                                        "SPTE for gfn {gfn:#x} maps pfn {:#x}, host has pfn {:#x} at hva {hva}",
                                        s.pfn().raw(),
                                        p.pfn.raw()
                                    ));
                                }
                                if level > 1 && p.level < level {
                                    errs.push(format!(
                                        "level-{level} SPTE for gfn {gfn:#x} but the host maps hva {hva} at level {}",
                                        p.level
                                    ));
                                }
                                if s.is_writable() && (!p.writable || slot.readonly()) {
                                    errs.push(format!(
                                        "writable SPTE for gfn {gfn:#x} over a read-only host page or memslot"
                                    ));
                                }
                                if s.is_writable() {
                                    logged.check(slot, gfn, level, s, &mut errs);
                                }
                                check_access_tracked(&m, s, gfn, &mut errs);
                            }
                        }
                    }
                }
            } else if s.is_mmio(&m) {
                rep.mmio_sptes += 1;
                if let Some(slot) = slots.find(it.gfn) {
                    if s.mmio_gen() == slots.generation() & super::spte::MMIO_SPTE_GEN_MASK {
                        errs.push(format!(
                            "current-generation MMIO SPTE for gfn {:#x} inside memslot {}",
                            it.gfn.raw(),
                            slot.id
                        ));
                    }
                }
            }
            Step::Next
        });
    }
    let st = kvm.stats.snapshot();
    for (i, name) in ["pages_4k", "pages_2m", "pages_1g"].iter().enumerate() {
        if st[name] != rep.leaves[i] as i64 {
            errs.push(format!("{name} = {} but {} leaf SPTEs exist", st[name], rep.leaves[i]));
        }
    }
    // tdp_mmu_pages counts the tables linked below roots, not the roots.
    let tdp_pages = kvm.mmu.tdp_mmu_pages.sum();
    let below_roots = rep.tables.saturating_sub(roots.len() as u64);
    if tdp_pages != below_roots as i64 {
        errs.push(format!("tdp_mmu_pages = {tdp_pages} but {below_roots} tables below the roots are reachable"));
    }
    if errs.is_empty() {
        Ok(rep)
    } else {
        Err(AuditError(errs))
    }
}

/// The shadow MMU's invariants: every present leaf SPTE is in its gfn's rmap and maps the
/// host's pfn, every rmap entry is such a leaf, parent pointers match the links, unsync pages
/// are marked in every parent, write-tracked gfns are never mapped writable, and the page
/// counters equal a recount.
fn audit_shadow(kvm: &Kvm) -> Result<AuditReport, AuditError> {
    let _w = kvm.mmu.mmu_lock.write();
    let s = kvm.mmu.shadow.lock();
    let slots = kvm.memslots();
    let logged = Logged::new(kvm);
    let host = kvm.host();
    let m = kvm.mmu.masks;
    let mut rep = AuditReport::default();
    let mut errs = Vec::new();
    let mut leaves = std::collections::HashSet::new();
    for id in s.pages.all() {
        let sp = s.pages.get(id);
        if sp.role.invalid() != 0 {
            continue;
        }
        rep.tables += 1;
        let level = sp.role.level();
        for i in 0..512u64 {
            let sptep = sp.sptep(i);
            let spte = Spte(kvm.mem().load(sptep));
            if spte.is_mmio(&m) {
                rep.mmio_sptes += 1;
                continue;
            }
            if !spte.is_shadow_present() {
                continue;
            }
            if !spte.is_last(level) {
                match s.pages.by_spt(spte.pfn()) {
                    None => {
                        errs.push(format!("SPTE {spte:?} at level {level} links to a table that is no shadow page"))
                    }
                    Some(c) if !s.pages.get(c).parent_ptes.contains(sptep) => {
                        errs.push(format!("child page of {sptep:?} does not list it in parent_ptes"))
                    }
                    Some(c) => {
                        let child = s.pages.get(c);
                        if (child.unsync || child.unsync_children > 0)
                            && sp.unsync_child_bitmap[(i / 64) as usize] & (1 << (i % 64)) == 0
                        {
                            errs.push(format!(
                                "unsync page below {sptep:?} is not marked in its parent's unsync_child_bitmap"
                            ));
                        }
                    }
                }
                continue;
            }
            rep.leaves[usize::from(level) - 1] += 1;
            leaves.insert(sptep.raw());
            let gfn = s.sp_gfn_at(id, i);
            match slots.find(gfn) {
                None => errs.push(format!("leaf SPTE {spte:?} maps gfn {gfn:#x} outside every memslot")),
                Some(slot) => {
                    if !s.rmaps.contains(slot, gfn, level, sptep) {
                        errs.push(format!("leaf SPTE at {sptep:?} for gfn {gfn:#x} is not in the rmap"));
                    }
                    match host.get_user_page_fast_only(slot.gfn_to_hva(gfn), false) {
                        Some(p) if p.pfn == spte.pfn() => {}
                        p => {
                            errs.push(format!("SPTE for gfn {gfn:#x} maps pfn {:#x}, host has {p:?}", spte.pfn().raw()))
                        }
                    }
                    if spte.is_writable() {
                        logged.check(slot, gfn, level, spte, &mut errs);
                    }
                    check_access_tracked(&m, spte, gfn, &mut errs);
                    if spte.is_writable() && s.write_track.is_tracked(gfn) {
                        errs.push(format!("write-tracked gfn {gfn:#x} is mapped writable"));
                    }
                    if spte.is_writable() {
                        for o in s.pages.with_gfn(gfn) {
                            let os = s.pages.get(o);
                            if os.role.direct() == 0 && os.role.invalid() == 0 && !os.unsync {
                                errs.push(format!("gfn {gfn:#x} is a synced shadowed page table but mapped writable"));
                            }
                        }
                    }
                }
            }
        }
        for p in sp.parent_ptes.to_vec() {
            let v = Spte(kvm.mem().load(p));
            if !v.is_shadow_present() || v.pfn() != sp.spt {
                errs.push(format!(
                    "parent_ptes of page gfn {:#x} lists {p:?}, which does not link to it",
                    sp.gfn.raw()
                ));
            }
        }
    }
    for (_, _, sptep) in s.rmaps.all() {
        if !leaves.contains(&sptep.raw()) {
            errs.push(format!("rmap entry {sptep:?} is not a present leaf SPTE"));
        }
    }
    let st = kvm.stats.snapshot();
    for (i, name) in ["pages_4k", "pages_2m", "pages_1g"].iter().enumerate() {
        if st[name] != rep.leaves[i] as i64 {
            errs.push(format!("{name} = {} but {} leaf SPTEs exist", st[name], rep.leaves[i]));
        }
    }
    if s.n_used_mmu_pages != s.pages.active_len() as u64 {
        errs.push(format!("n_used_mmu_pages = {} but {} pages are active", s.n_used_mmu_pages, s.pages.active_len()));
    }
    if errs.is_empty() {
        Ok(rep)
    } else {
        Err(AuditError(errs))
    }
}

/// An access-tracked leaf (`mark_spte_for_access_track` without A/D bits): the hardware
/// permission bits are gone, W too (fast page fault restores it from MMU-writable), and the
/// saved bits hold what to restore: at least R or X, never a bit outside them.
fn check_access_tracked(m: &super::spte::SpteMasks, s: Spte, gfn: Gfn, errs: &mut Vec<String>) {
    use super::spte::{ACC_TRACK_SAVED_MASK, ACC_TRACK_SAVED_SHIFT};
    let saved = (s.0 >> ACC_TRACK_SAVED_SHIFT) & 0x7;
    if !s.is_access_track(m) {
        if saved != 0 && !s.ad_enabled(m) {
            errs.push(format!("SPTE {s:?} for gfn {gfn:#x} has saved access-tracking bits but is not access-tracked"));
        }
        return;
    }
    if s.is_writable() {
        errs.push(format!("access-tracked SPTE {s:?} for gfn {gfn:#x} is writable"));
    }
    if saved == 0 || saved & !ACC_TRACK_SAVED_MASK != 0 {
        errs.push(format!("access-tracked SPTE {s:?} for gfn {gfn:#x} saved no valid R/X bits ({saved:#x})"));
    }
}

/// What the dirty-state check needs: the PML setting and the pages sitting in dirty rings.
struct Logged {
    pml: bool,
    dirty_mask: u64,
    in_rings: std::collections::HashSet<(u32, u64)>,
}

impl Logged {
    fn new(kvm: &Kvm) -> Self {
        let in_rings = kvm.dirty_rings.lock().iter().flat_map(|r| r.pending()).map(|g| (g.slot, g.offset)).collect();
        Logged { pml: kvm.pml_in_use(), dirty_mask: kvm.mmu.masks.dirty, in_rings }
    }

    /// A writable SPTE of `level` mapping `gfn` in a dirty-logged slot: every page it covers
    /// must be logged already, unless PML will log the write (a 4 KiB SPTE with D clear).
    fn check(&self, slot: &crate::memslot::Memslot, gfn: Gfn, level: u8, spte: Spte, errs: &mut Vec<String>) {
        if !slot.dirty_logging() {
            return;
        }
        if self.pml && level == 1 && spte.0 & self.dirty_mask == 0 {
            return;
        }
        let n = pages_at(level);
        let first = gfn.raw() & !(n - 1);
        let logged = |g: Gfn| slot.is_dirty(g) || self.in_rings.contains(&(slot.id, g.raw() - slot.base_gfn.raw()));
        if let Some(g) = (first..first + n).map(Gfn::new).find(|&g| slot.contains(g) && !logged(g)) {
            errs.push(format!(
                "writable level-{level} SPTE maps gfn {:#x} in dirty-logged memslot {} that is not logged (no dirty bit, \
                 no dirty-ring entry{}): a write would go unlogged",
                g.raw(),
                slot.id,
                if self.pml && level == 1 { ", and the SPTE's D bit is set" } else { "" }
            ));
        }
    }
}
