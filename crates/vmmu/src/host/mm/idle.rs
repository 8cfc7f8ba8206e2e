//! Page aging and idle page tracking of [`HostMm`]: the young/accessed queries reclaim makes
//! of the secondary MMUs through the notifiers, and the page_idle bitmap built on them.

use super::HostMm;
use crate::host::notifier::HvaRange;
use crate::host::Hva;

impl HostMm {
    /// Page aging as reclaim does it (`mmu_notifier_clear_flush_young`): whether any
    /// secondary MMU accessed `hva..hva+len` since the last call; their accessed state is
    /// cleared and their TLBs flushed.
    pub fn clear_flush_young(&self, hva: Hva, len: u64) -> bool {
        let r = HvaRange { start: hva, end: Hva(hva.0 + len) };
        self.live_notifiers().iter().fold(false, |y, n| n.clear_flush_young(r) | y)
    }

    /// `mmu_notifier_clear_young`: like [`HostMm::clear_flush_young`] without the flush.
    pub fn clear_young(&self, hva: Hva, len: u64) -> bool {
        let r = HvaRange { start: hva, end: Hva(hva.0 + len) };
        self.live_notifiers().iter().fold(false, |y, n| n.clear_young(r) | y)
    }

    /// `mmu_notifier_test_young`: whether any secondary MMU accessed the range.
    pub fn test_young(&self, hva: Hva, len: u64) -> bool {
        let r = HvaRange { start: hva, end: Hva(hva.0 + len) };
        self.live_notifiers().iter().any(|n| n.test_young(r))
    }

    /// Idle page tracking, writing the page_idle bitmap: marks each page of `hva..hva+len`
    /// idle and clears its young state in the secondary MMUs (`clear_young`, no flush).
    pub fn page_idle_mark(&self, hva: Hva, len: u64) {
        let (first, end) = (hva.0 >> 12, (hva.0 + len).div_ceil(4096));
        let mut idle = self.idle.lock();
        // One notifier call for the range does what a call per page would.
        self.clear_young(Hva(first << 12), (end - first) << 12);
        idle.extend(first..end);
    }

    /// Idle page tracking, reading the page_idle bitmap: whether the page at `hva` is still
    /// idle. A page a secondary MMU accessed since it was marked (`test_young`) is not.
    pub fn page_idle_read(&self, hva: Hva) -> bool {
        let p = hva.0 >> 12;
        let mut idle = self.idle.lock();
        if idle.contains(&p) && self.test_young(Hva(p << 12), 4096) {
            idle.remove(&p);
        }
        idle.contains(&p)
    }
}
