//! The reverse map: for each memslot, level and gfn, the leaf SPTEs that map it
//! (`slot->arch.rmap[level - 1][index]`), so a gfn's mappings can be write-protected or
//! zapped. Allocated lazily when the first shadow root appears, as with the TDP MMU.

use super::pte_list::PteList;
use super::tdp_iter::pages_at;
use crate::memslot::Memslot;
use x86_paging::addr::{Gfn, Hpa};

/// `RMAP_RECYCLE_THRESHOLD`: past this many mappings of one gfn they are all zapped.
pub const RMAP_RECYCLE_THRESHOLD: usize = 1000;

/// Rmap heads by (memslot id, level, index).
#[derive(Debug, Default)]
pub struct Rmaps {
    heads: super::page::FastMap<(u32, u8, u64), PteList>,
}

/// `gfn_to_index`.
pub fn gfn_to_index(gfn: Gfn, base: Gfn, level: u8) -> u64 {
    let per = pages_at(level);
    gfn.raw() / per - base.raw() / per
}

impl Rmaps {
    fn key(slot: &Memslot, gfn: Gfn, level: u8) -> (u32, u8, u64) {
        (slot.id, level, gfn_to_index(gfn, slot.base_gfn, level))
    }

    /// `rmap_add`: records `sptep` as mapping `gfn` at `level`; returns what
    /// `pte_list_add` returns, the number of SPTEs the list held before (0 for the first),
    /// which KVM compares with `max_mmu_rmap_size` and `RMAP_RECYCLE_THRESHOLD`.
    pub fn add(&mut self, slot: &Memslot, gfn: Gfn, level: u8, sptep: Hpa) -> usize {
        let l = self.heads.entry(Self::key(slot, gfn, level)).or_default();
        l.add(sptep)
    }

    /// `rmap_remove`.
    pub fn remove(&mut self, slot: &Memslot, gfn: Gfn, level: u8, sptep: Hpa) -> bool {
        let k = Self::key(slot, gfn, level);
        let Some(l) = self.heads.get_mut(&k) else { return false };
        let r = l.remove(sptep);
        if l.is_empty() {
            self.heads.remove(&k);
        }
        r
    }

    /// The SPTEs mapping `gfn` at `level`.
    pub fn get(&self, slot: &Memslot, gfn: Gfn, level: u8) -> Vec<Hpa> {
        self.heads.get(&Self::key(slot, gfn, level)).map(|l| l.to_vec()).unwrap_or_default()
    }

    /// Whether `sptep` is in the rmap of `gfn` at `level`.
    pub fn contains(&self, slot: &Memslot, gfn: Gfn, level: u8, sptep: Hpa) -> bool {
        self.heads.get(&Self::key(slot, gfn, level)).is_some_and(|l| l.contains(sptep))
    }

    /// Number of (slot, level, gfn) heads with at least one SPTE.
    pub fn heads(&self) -> usize {
        self.heads.len()
    }

    /// Every (slot id, level, sptep) recorded (for the audit).
    pub fn all(&self) -> Vec<(u32, u8, Hpa)> {
        self.heads.iter().flat_map(|((s, l, _), list)| list.to_vec().into_iter().map(move |p| (*s, *l, p))).collect()
    }

    /// Drops every head (all SPTEs were zapped).
    pub fn clear(&mut self) {
        self.heads.clear();
    }
}
