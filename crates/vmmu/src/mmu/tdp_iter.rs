//! `tdp_iter`: a pre-order iterator over one TDP paging structure, bounded to a gfn range,
//! and [`walk`], the one walk every TDP operation is written as (KVM's
//! `for_each_tdp_pte_min_level`).
//!
//! The walk serves the fault path (down to the goal level), zapping, splitting, write
//! protection, aging, NX recovery, the last-SPTE lookups and the audit: each is a visitor that
//! looks at `level`, `gfn`, `sptep` and `old_spte` and answers with a [`Step`] — go on (into
//! the children), skip the subtree, look at the same entry again after a lost
//! compare-exchange, or stop.

use super::spte::Spte;
use crate::host::PhysMem;
use x86_paging::addr::{Gfn, Hpa};

/// Pages mapped by one entry at `level` (`KVM_PAGES_PER_HPAGE`).
pub use x86_paging::addr::pages_per_level as pages_at;

/// Index of `gfn` in a table at `level`.
#[inline]
pub const fn spte_index(gfn: u64, level: u8) -> u64 {
    (gfn >> (9 * (level as u32 - 1))) & 511
}

/// What a [`walk`] visitor asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The next entry in pre-order: the current entry's child table first, if it has one.
    Next,
    /// The next entry in pre-order without the current entry's children (the visitor
    /// replaced or removed them, or they are out of interest).
    SkipChildren,
    /// The same entry again: a compare-exchange lost a race and refreshed `old_spte`.
    Retry,
    /// End the walk.
    Stop,
}

/// Visits every entry mapping a gfn in [start, end) at levels `min_level..=root_level` of the
/// table at `root`, in pre-order, as `visit` directs.
#[inline]
pub fn walk(
    mem: &PhysMem,
    root: Hpa,
    root_level: u8,
    min_level: u8,
    start: Gfn,
    end: Gfn,
    mut visit: impl FnMut(&mut TdpIter<'_>) -> Step,
) {
    let mut it = TdpIter::new(mem, root, root_level, min_level, start, end);
    while it.valid {
        match visit(&mut it) {
            Step::Next => it.next(),
            Step::SkipChildren => it.next_skip_children(),
            Step::Retry => {}
            Step::Stop => return,
        }
    }
}

/// The last entry on the path to `gfn`: a leaf, the first non-present entry, or the entry at
/// `min_level`; with its address and level (`kvm_tdp_mmu_get_walk` /
/// `kvm_tdp_mmu_fast_pf_get_last_sptep`). The caller brackets a lockless use.
#[inline]
pub fn last_spte(mem: &PhysMem, root: Hpa, root_level: u8, gfn: Gfn) -> (Hpa, Spte, u8) {
    let mut it = TdpIter::new(mem, root, root_level, 1, gfn, Gfn::new(gfn.raw() + 1));
    let mut last = (it.sptep, it.old_spte, it.level);
    while it.valid {
        last = (it.sptep, it.old_spte, it.level);
        it.next();
    }
    last
}

/// The iterator (`struct tdp_iter`).
pub struct TdpIter<'a> {
    mem: &'a PhysMem,
    /// Level of the root.
    pub root_level: u8,
    /// Lowest level visited.
    pub min_level: u8,
    /// Table visited at each level (`pt_path`), indexed by level.
    pt_path: [Hpa; 6],
    /// The gfn the walk will visit next at the lowest level (`next_last_level_gfn`).
    pub next_last_level_gfn: u64,
    end: u64,
    /// First gfn mapped by the current entry.
    pub gfn: Gfn,
    /// Level of the current entry.
    pub level: u8,
    /// Address of the current entry.
    pub sptep: Hpa,
    /// Value of the current entry when it was read.
    pub old_spte: Spte,
    /// Whether the iterator points at an entry.
    pub valid: bool,
}

impl<'a> TdpIter<'a> {
    /// `tdp_iter_start` + the `for_each_tdp_pte_min_level` bound: visits [start, end).
    pub fn new(mem: &'a PhysMem, root: Hpa, root_level: u8, min_level: u8, start: Gfn, end: Gfn) -> Self {
        let mut it = TdpIter {
            mem,
            root_level,
            min_level,
            pt_path: [Hpa::new(0); 6],
            next_last_level_gfn: start.raw(),
            end: end.raw(),
            gfn: Gfn::new(0),
            level: root_level,
            sptep: Hpa::new(0),
            old_spte: Spte::NONPRESENT,
            valid: true,
        };
        it.pt_path[usize::from(root_level)] = root;
        it.refresh();
        it
    }

    fn refresh(&mut self) {
        let per = pages_at(self.level);
        self.gfn = Gfn::new(self.next_last_level_gfn & !(per - 1));
        self.sptep = self.pt_path[usize::from(self.level)].entry(spte_index(self.gfn.raw(), self.level));
        self.old_spte = Spte(self.mem.load(self.sptep));
        self.valid = self.gfn.raw() < self.end;
    }

    /// Re-reads the current entry (after a failed compare-exchange).
    pub fn reread(&mut self) {
        self.old_spte = Spte(self.mem.load(self.sptep));
    }

    fn try_step_down(&mut self) -> bool {
        if self.level == self.min_level || !self.old_spte.is_shadow_present() || self.old_spte.is_last(self.level) {
            return false;
        }
        let child = self.old_spte.child();
        self.level -= 1;
        self.pt_path[usize::from(self.level)] = child;
        self.refresh();
        true
    }

    fn try_step_side(&mut self) -> bool {
        if spte_index(self.gfn.raw(), self.level) == 511 {
            return false;
        }
        self.next_last_level_gfn = self.gfn.raw() + pages_at(self.level);
        self.refresh();
        true
    }

    fn try_step_up(&mut self) -> bool {
        if self.level == self.root_level {
            return false;
        }
        self.level += 1;
        // Keep next_last_level_gfn; recompute the entry of the parent level.
        let saved = self.next_last_level_gfn;
        self.next_last_level_gfn = self.gfn.raw();
        self.refresh();
        self.next_last_level_gfn = saved;
        true
    }

    /// Steps down into the current entry's child table if it has one, else to the next
    /// entry in pre-order (`tdp_iter_next`).
    pub fn next(&mut self) {
        if self.try_step_down() {
            return;
        }
        self.next_skip_children();
    }

    /// Moves to the next entry in pre-order without visiting the current entry's children.
    pub fn next_skip_children(&mut self) {
        loop {
            if self.try_step_side() {
                return;
            }
            if !self.try_step_up() {
                self.valid = false;
                return;
            }
        }
    }

    /// The table holding the entry at `level` (for linking and unlinking).
    pub fn table(&self, level: u8) -> Hpa {
        self.pt_path[usize::from(level)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmu::spte::{make_nonleaf_spte, SpteMasks};

    #[test]
    fn preorder_visits_children_and_respects_bounds() {
        let mem = PhysMem::new(4 << 20).unwrap();
        let m = SpteMasks::ept(true);
        let (root, l3, l2) = (Hpa::new(0x1000), Hpa::new(0x2000), Hpa::new(0x3000));
        for t in [root, l3, l2] {
            for i in 0..512 {
                mem.store(t.entry(i), Spte::NONPRESENT.0);
            }
        }
        mem.store(root, make_nonleaf_spte(&m, l3, false).0);
        mem.store(l3, make_nonleaf_spte(&m, l2, false).0);
        let mut it = TdpIter::new(&mem, root, 4, 1, Gfn::new(0), Gfn::new(1 << 18));
        let mut seen = vec![];
        while it.valid {
            seen.push((it.level, it.gfn.raw()));
            it.next();
        }
        // root[0] (l4), l3[0], l2 table's 512 entries (l2 has no children), l3[1..] up to
        // the 1 GiB bound: gfn < 2^18 covers l3[0] only.
        assert_eq!(seen[0], (4, 0));
        assert_eq!(seen[1], (3, 0));
        assert_eq!(seen[2], (2, 0));
        assert_eq!(seen[3], (2, 512));
        assert_eq!(seen.len(), 2 + 512);
        assert!(seen.iter().all(|(_, g)| *g < (1 << 18)));
    }
}
