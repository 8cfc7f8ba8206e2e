//! KSM (kernel samepage merging) of [`HostMm`]: identical 4 KiB pages merged into one
//! write-protected shared frame, the stable tree of shared frames, and how many PTEs map each
//! (a shared frame is freed with its last mapping; the next write to a merged page copies it).

use super::{HostMm, A, ADDR, P, U, W};
use crate::host::notifier::{HvaRange, MmuNotifyEvent};
use crate::host::{HostError, Hva};
use crate::sync::Ordering;
use x86_paging::addr::{Hpa, Pfn};

/// KSM's state: the stable tree (shared frames by content hash) and how many PTEs map each
/// shared frame. A shared frame is freed when its last mapping goes.
#[derive(Default)]
pub(super) struct Ksm {
    stable: std::collections::HashMap<u64, Vec<Pfn>>,
    mapcount: std::collections::HashMap<u64, u32>,
}

/// KSM's counters, as /sys/kernel/mm/ksm reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct KsmStats {
    /// `pages_shared`: shared frames in use.
    pub pages_shared: u64,
    /// `pages_sharing`: further mappings of those frames (the pages saved).
    pub pages_sharing: u64,
}

impl HostMm {
    /// Drops one mapping of 4 KiB frame `pfn`: the zero page stays, a KSM page is freed with
    /// its last mapping, a private page is freed.
    pub(super) fn put_4k(&self, pfn: Pfn) {
        if self.frames.is_zero_pfn(pfn) {
            return;
        }
        let mut ksm = self.ksm.lock();
        if let Some(n) = ksm.mapcount.get_mut(&pfn.raw()) {
            *n -= 1;
            if *n > 0 {
                return;
            }
            ksm.mapcount.remove(&pfn.raw());
            ksm.stable.retain(|_, v| {
                v.retain(|&f| f != pfn);
                !v.is_empty()
            });
        }
        drop(ksm);
        self.frames.free_4k(pfn);
    }

    pub(super) fn is_ksm(&self, pfn: Pfn) -> bool {
        self.ksm.lock().mapcount.contains_key(&pfn.raw())
    }

    fn page_hash(&self, pfn: Pfn) -> u64 {
        use std::hash::Hasher;
        let mem = self.frames.mem();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for i in 0..512u64 {
            h.write_u64(mem.load(Hpa::new(pfn.hpa().raw() + i * 8)));
        }
        h.finish()
    }

    fn same_contents(&self, a: Pfn, b: Pfn) -> bool {
        let mem = self.frames.mem();
        (0..512u64).all(|i| mem.load(Hpa::new(a.hpa().raw() + i * 8)) == mem.load(Hpa::new(b.hpa().raw() + i * 8)))
    }

    /// KSM (`ksmd` scanning a MADV_MERGEABLE range): every privately mapped 4 KiB page in
    /// `hva..hva+len` whose contents equal another page's (in this scan or a shared page of
    /// an earlier one) is merged: its PTE maps the shared frame read-only and its own frame
    /// is freed, notifiers told around each change (KVM drops its SPTEs). The first write to
    /// a merged page copies it back to a private frame. THP mappings are not scanned (KSM
    /// would split them first). Returns the pages merged (mappings switched to a shared
    /// frame, the page that became shared included).
    pub fn ksm_merge(&self, hva: Hva, len: u64) -> Result<u64, HostError> {
        let (start, end) = Self::check_range(hva, len)?;
        let _g = self.mmap_lock.lock();
        // The unstable tree: a candidate private page per content hash, for this scan.
        let mut unstable: std::collections::HashMap<u64, (u64, Pfn)> = std::collections::HashMap::new();
        let mut merged = 0;
        for a in (start..end).step_by(4096) {
            let Some((v, 1, _)) = self.lookup(a) else { continue };
            let pfn = Pfn::new((v & ADDR) >> 12);
            if self.frames.is_zero_pfn(pfn) || v & W == 0 || self.is_ksm(pfn) {
                continue;
            }
            let hash = self.page_hash(pfn);
            let shared = {
                let ksm = self.ksm.lock();
                ksm.stable.get(&hash).and_then(|c| c.iter().copied().find(|&k| self.same_contents(k, pfn)))
            };
            let (target, pair) = match shared {
                Some(k) => (k, None),
                None => match unstable.get(&hash).copied() {
                    Some((other, opfn)) if self.same_contents(opfn, pfn) => {
                        unstable.remove(&hash);
                        (opfn, Some(other))
                    }
                    _ => {
                        unstable.insert(hash, (a, pfn));
                        continue;
                    }
                },
            };
            // As KSM does: write-protect first (secondary MMUs drop their mappings), then
            // compare again: the contents cannot change under the comparison any more.
            self.ksm_write_protect(a);
            if let Some(other) = pair {
                self.ksm_write_protect(other);
            }
            if !self.same_contents(target, pfn) {
                continue; // written meanwhile; stays private (reused on its next write)
            }
            if let Some(other) = pair {
                // The first page of the pair becomes the shared page.
                self.ksm_map(other, target);
                self.ksm.lock().stable.entry(hash).or_default().push(target);
                merged += 1;
            }
            self.ksm_map(a, target);
            self.frames.free_4k(pfn);
            merged += 1;
        }
        Ok(merged)
    }

    /// KSM's `write_protect_page`: clears W in the PTE of `hva`, notifiers told.
    fn ksm_write_protect(&self, hva: u64) {
        let range = HvaRange { start: Hva(hva), end: Hva(hva + 4096) };
        self.notify_start(range, MmuNotifyEvent::Clear);
        if let Some((v, 1, e)) = self.lookup(hva) {
            e.store(v & !W, Ordering::Release);
        }
        self.notify_end(range, MmuNotifyEvent::Clear);
    }

    /// Points the PTE of `hva` at shared frame `k`, read-only (for the page that becomes the
    /// shared one, `k` is its own frame: it is only write-protected), and counts the mapping.
    fn ksm_map(&self, hva: u64, k: Pfn) {
        let range = HvaRange { start: Hva(hva), end: Hva(hva + 4096) };
        self.notify_start(range, MmuNotifyEvent::Clear);
        if let Some((_, 1, e)) = self.lookup(hva) {
            e.store(k.hpa().raw() | P | U | A, Ordering::Release);
        }
        *self.ksm.lock().mapcount.entry(k.raw()).or_insert(0) += 1;
        self.notify_end(range, MmuNotifyEvent::Clear);
    }

    /// KSM's `pages_shared` and `pages_sharing`.
    pub fn ksm_stats(&self) -> KsmStats {
        let ksm = self.ksm.lock();
        let mappings: u64 = ksm.mapcount.values().map(|&n| u64::from(n)).sum();
        let shared = ksm.mapcount.len() as u64;
        KsmStats { pages_shared: shared, pages_sharing: mappings - shared }
    }
}
