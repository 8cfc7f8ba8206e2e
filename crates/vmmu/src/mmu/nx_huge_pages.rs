//! The NX huge page mitigation (iTLB multihit): with `nx_huge_pages`, huge SPTEs are never
//! executable, so an instruction fetch from a huge page is mapped with 4 KiB SPTEs below a
//! page table made for it (`nx_lpage_splits` counts such tables). The recovery worker
//! (`kvm_nx_huge_page_recovery_worker`) periodically zaps a share of them
//! (`nx_huge_pages_recovery_ratio`), oldest first, so data accesses can map the range huge
//! again if the guest stopped executing there.
//!
//! Tables are tracked by the frame of their 512 SPTEs: one list serves the TDP MMU (whose
//! tables have no other per-page metadata here) and the shadow MMU (which also keeps the
//! flag in its `ShadowPage`).

use super::spte::Spte;
use super::tdp_iter::Step;
use super::tdp_mmu::{self, TdpRoot};
use crate::sync::{Arc, AtomicBool, Ordering, Weak};
use crate::vm::Kvm;
use std::collections::{BTreeMap, HashMap, HashSet};
use x86_paging::addr::{Gfn, Pfn};

/// One tracked table (`possible_nx_huge_page_link`).
#[derive(Debug, Clone, Copy)]
struct Possible {
    /// Insertion order (the list is walked oldest first).
    seq: u64,
    /// The first gfn the table maps.
    gfn: Gfn,
    /// Level of the SPTE that points to the table (the huge page's level).
    level: u8,
}

/// `possible_nx_huge_pages` and the TDP MMU's `nx_huge_page_disallowed` flags.
#[derive(Debug, Default)]
pub struct NxHugePages {
    order: BTreeMap<u64, u64>,
    by_table: HashMap<u64, Possible>,
    next: u64,
    /// TDP tables made by a fault for which huge pages were disallowed.
    tdp_disallowed: HashSet<u64>,
}

impl NxHugePages {
    /// Tables tracked as possible NX huge pages.
    pub fn len(&self) -> usize {
        self.by_table.len()
    }

    /// Whether none is tracked.
    pub fn is_empty(&self) -> bool {
        self.by_table.is_empty()
    }

    fn track(&mut self, table: Pfn, gfn: Gfn, level: u8) -> bool {
        if self.by_table.contains_key(&table.raw()) {
            return false;
        }
        let seq = self.next;
        self.next += 1;
        self.order.insert(seq, table.raw());
        self.by_table.insert(table.raw(), Possible { seq, gfn, level });
        true
    }

    fn untrack(&mut self, table: Pfn) -> bool {
        match self.by_table.remove(&table.raw()) {
            Some(p) => {
                self.order.remove(&p.seq);
                true
            }
            None => false,
        }
    }

    fn oldest(&self) -> Option<(Pfn, Possible)> {
        let (_, &t) = self.order.iter().next()?;
        Some((Pfn::new(t), self.by_table[&t]))
    }
}

impl Kvm {
    /// `account_nx_huge_page` for the table at `table` (mapping from `gfn`, linked by an
    /// SPTE at `level`): marks it `nx_huge_page_disallowed` (TDP tables here; shadow pages
    /// carry the flag themselves) and, when a huge page would have been possible but for the
    /// mitigation, tracks it for recovery (`nx_lpage_splits`).
    pub(crate) fn account_nx_huge_page(&self, table: Pfn, gfn: Gfn, level: u8, possible: bool, tdp: bool) {
        let mut nx = self.mmu.nx_huge_pages.lock();
        if tdp {
            nx.tdp_disallowed.insert(table.raw());
        }
        if possible && nx.track(table, gfn, level) {
            self.stats.nx_lpage_splits.add(1);
        }
    }

    /// `unaccount_nx_huge_page` (and untrack): the table is going away.
    pub(crate) fn unaccount_nx_huge_page(&self, table: Pfn) {
        let mut nx = self.mmu.nx_huge_pages.lock();
        nx.tdp_disallowed.remove(&table.raw());
        if nx.untrack(table) {
            self.stats.nx_lpage_splits.add(-1);
        }
    }

    /// Whether TDP table `table` was made by a fault that disallowed huge pages
    /// (`spte_to_child_sp(spte)->nx_huge_page_disallowed`).
    pub(crate) fn tdp_nx_huge_page_disallowed(&self, table: Pfn) -> bool {
        self.mmu.nx_huge_pages.lock().tdp_disallowed.contains(&table.raw())
    }

    /// Tables tracked as possible NX huge pages (equals the `nx_lpage_splits` statistic).
    pub fn possible_nx_huge_pages(&self) -> usize {
        self.mmu.nx_huge_pages.lock().len()
    }

    /// One pass of the recovery worker (`kvm_recover_nx_huge_pages`): zaps
    /// ceil(nx_lpage_splits / ratio) tracked tables, oldest first, so their range can be
    /// mapped huge again. A table in a dirty-logged memslot is only untracked (it could not
    /// be huge anyway). Returns the tables zapped.
    pub fn nx_huge_page_recovery(&self) -> u64 {
        let ratio = u64::from(self.config.nx_huge_pages_recovery_ratio);
        if !self.config.nx_huge_pages || ratio == 0 {
            return 0;
        }
        let w = self.mmu.mmu_lock.write();
        let splits = u64::try_from(self.stats.nx_lpage_splits.sum()).unwrap_or(0);
        let to_zap = splits.div_ceil(ratio);
        let slots = self.memslots();
        let roots = tdp_mmu::valid_roots(self);
        let mut zapped = 0;
        let mut flush = false;
        for _ in 0..to_zap {
            let Some((table, p)) = self.mmu.nx_huge_pages.lock().oldest() else { break };
            if slots.find(p.gfn).is_some_and(|s| s.dirty_logging()) {
                self.unaccount_nx_huge_page(table);
                continue;
            }
            let found = if self.mmu.tdp_mmu_enabled() {
                let f = roots.iter().any(|r| self.tdp_zap_table(r, table, p));
                flush |= f;
                f
            } else {
                // Prepared now, committed with the others in one go at the end.
                self.with_shadow_mmu(&w, |ctx| match ctx.s.pages.by_spt(table) {
                    Some(id) => {
                        ctx.prepare_zap_page(id);
                        true
                    }
                    None => false,
                })
            };
            if found {
                zapped += 1;
            }
            // Zapping unaccounted it; anything still listed is stale: drop it.
            self.unaccount_nx_huge_page(table);
        }
        // kvm_mmu_remote_flush_or_zap, once for the whole pass.
        if self.mmu.have_rmaps() {
            self.with_shadow_mmu(&w, |ctx| ctx.remote_flush_or_zap(flush));
        } else {
            self.flush_and_free_deferred(None, flush);
        }
        zapped
    }

    /// `kvm_tdp_mmu_zap_sp`: clears the SPTE in `root` that links `table` (the table is then
    /// torn down by `handle_removed_pt`). Returns whether it was found there.
    fn tdp_zap_table(&self, root: &TdpRoot, table: Pfn, p: Possible) -> bool {
        let mut found = false;
        root.walk(self, p.level, p.gfn, Gfn::new(p.gfn.raw() + 1), |it| {
            let s = it.old_spte;
            if it.level == p.level && s.is_shadow_present() && !s.is_last(it.level) && s.pfn() == table {
                tdp_mmu::tdp_mmu_set_spte(self, u32::MAX, it, Spte::NONPRESENT);
                found = true;
                return Step::Stop;
            }
            Step::Next
        });
        found
    }

    /// Starts the recovery worker: a thread that runs [`Kvm::nx_huge_page_recovery`] every
    /// period (`nx_huge_pages_recovery_period_ms`, or one hour / ratio when 0, at least one
    /// second), as `kvm_nx_huge_page_recovery_worker` does. None when the mitigation or the
    /// recovery is off. The worker stops when the returned handle is dropped.
    pub fn start_nx_huge_page_recovery(self: &Arc<Self>) -> Option<NxRecoveryWorker> {
        let period = self.config.nx_huge_pages_recovery_period()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (kvm, stop2): (Weak<Kvm>, _) = (Arc::downgrade(self), stop.clone());
        let thread = crate::sync::thread::Builder::new()
            .name("kvm-nx-lpage-recovery".into())
            .spawn(move || loop {
                crate::sync::thread::park_timeout(period);
                if stop2.load(Ordering::Acquire) {
                    return;
                }
                match kvm.upgrade() {
                    Some(k) => {
                        k.nx_huge_page_recovery();
                    }
                    None => return,
                }
            })
            .ok()?;
        Some(NxRecoveryWorker { stop, thread: Some(thread) })
    }
}

/// The running recovery worker; dropping it stops the thread.
#[derive(Debug)]
pub struct NxRecoveryWorker {
    stop: Arc<AtomicBool>,
    thread: Option<crate::sync::thread::JoinHandle<()>>,
}

impl Drop for NxRecoveryWorker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_oldest_first_and_tracks_once() {
        let mut nx = NxHugePages::default();
        assert!(nx.track(Pfn::new(7), Gfn::new(0x200), 2));
        assert!(nx.track(Pfn::new(3), Gfn::new(0x400), 2));
        assert!(!nx.track(Pfn::new(7), Gfn::new(0x200), 2), "already tracked");
        assert_eq!(nx.oldest().map(|(t, _)| t), Some(Pfn::new(7)));
        assert!(nx.untrack(Pfn::new(7)));
        assert!(!nx.untrack(Pfn::new(7)));
        assert_eq!(nx.oldest().map(|(t, p)| (t, p.gfn)), Some((Pfn::new(3), Gfn::new(0x400))));
        assert_eq!(nx.len(), 1);
    }
}
