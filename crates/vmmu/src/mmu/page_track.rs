//! Write tracking (`page_track`): a count per gfn of reasons the gfn must never be mapped
//! writable — upper-level guest page tables that have shadow pages. A write to a tracked
//! gfn is emulated, and the MMU is told about it (`kvm_mmu_track_write`).

use x86_paging::addr::Gfn;

/// `gfn_write_track` counters.
#[derive(Debug, Default)]
pub struct WriteTrack {
    count: super::page::FastMap<u64, u16>,
}

impl WriteTrack {
    /// `__kvm_write_track_add_gfn`.
    pub fn add(&mut self, gfn: Gfn) {
        let c = self.count.entry(gfn.raw()).or_insert(0);
        *c = c.saturating_add(1);
    }

    /// `__kvm_write_track_remove_gfn`.
    pub fn remove(&mut self, gfn: Gfn) {
        if let Some(c) = self.count.get_mut(&gfn.raw()) {
            *c -= 1;
            if *c == 0 {
                self.count.remove(&gfn.raw());
            }
        }
    }

    /// `kvm_gfn_is_write_tracked`.
    pub fn is_tracked(&self, gfn: Gfn) -> bool {
        self.count.contains_key(&gfn.raw())
    }

    /// Every tracked gfn (for the audit).
    pub fn tracked(&self) -> Vec<Gfn> {
        self.count.keys().map(|g| Gfn::new(*g)).collect()
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.count.clear();
    }
}
