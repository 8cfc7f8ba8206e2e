//! The audit: SPTE invariants checked against the memslots and the host page table.
//!
//! - every present leaf SPTE maps, for a gfn inside a memslot, exactly the pfn the memslot's
//!   hva resolves to in the host page table (so no SPTE maps a frame the host freed or moved);
//! - a huge leaf lies wholly inside one memslot and the host maps it at least as large;
//! - a writable SPTE only where the memslot and the host mapping are writable;
//! - no present SPTE maps a gfn outside every memslot;
//! - the page counters (pages_4k/2m/1g) and tdp_mmu_pages equal a recount.

use super::spte::Spte;
use super::tdp_iter::{pages_at, TdpIter};
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
    let _w = kvm.mmu.mmu_lock.write();
    let slots = kvm.memslots();
    let host = kvm.host();
    let m = kvm.mmu.masks;
    let mut rep = AuditReport::default();
    let mut errs = Vec::new();
    let roots = kvm.mmu.roots.lock().clone();
    for root in roots.iter().filter(|r| !r.zapped.load(Ordering::Acquire)) {
        rep.tables += 1;
        let mut it = TdpIter::new(kvm.mem(), root.hpa, root.level(), 1, Gfn::new(0), Gfn::new(1 << 40));
        while it.valid {
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
            it.next();
        }
    }
    let st = kvm.stats.snapshot();
    for (i, name) in ["pages_4k", "pages_2m", "pages_1g"].iter().enumerate() {
        if st[name] != rep.leaves[i] as i64 {
            errs.push(format!("{name} = {} but {} leaf SPTEs exist", st[name], rep.leaves[i]));
        }
    }
    let tdp_pages = kvm.mmu.tdp_mmu_pages.sum();
    if tdp_pages != rep.tables as i64 {
        errs.push(format!("tdp_mmu_pages = {tdp_pages} but {} tables are reachable", rep.tables));
    }
    if errs.is_empty() {
        Ok(rep)
    } else {
        Err(AuditError(errs))
    }
}
