//! MMU notifiers: how the host tells a secondary MMU (KVM) that mappings are changing.

use super::mm::Hva;

/// A half-open range of host virtual addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HvaRange {
    /// First address.
    pub start: Hva,
    /// One past the last address.
    pub end: Hva,
}

/// Why a range is being invalidated (Linux's `mmu_notifier_event`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmuNotifyEvent {
    /// munmap.
    Unmap,
    /// MADV_DONTNEED and similar: the pages are dropped, the VMA stays.
    Clear,
    /// A copy-on-write (for example the shared zero page replaced by a private page).
    Cow,
    /// Page migration: the contents move to a new frame.
    Migrate,
}

/// A secondary MMU that mirrors the host page tables.
///
/// `invalidate_range_start` is called before the host changes or drops mappings in the range
/// and `invalidate_range_end` after; between the two the secondary MMU must not establish new
/// mappings of the range.
pub trait MmuNotifier: Send + Sync {
    /// The mappings of `range` are about to change.
    fn invalidate_range_start(&self, range: HvaRange, event: MmuNotifyEvent);
    /// The change announced by `invalidate_range_start` is complete.
    fn invalidate_range_end(&self, range: HvaRange, event: MmuNotifyEvent);
    /// Page aging (reclaim): whether the secondary MMU accessed the range since the last
    /// call; clears its accessed state and flushes its TLBs if it had.
    fn clear_flush_young(&self, _range: HvaRange) -> bool {
        false
    }
    /// Like `clear_flush_young` without the TLB flush (idle page tracking uses this).
    fn clear_young(&self, _range: HvaRange) -> bool {
        false
    }
    /// Whether the secondary MMU accessed the range, changing nothing.
    fn test_young(&self, _range: HvaRange) -> bool {
        false
    }
    /// The address space is going away (`exit_mmap`): drop every mapping of it. Called
    /// once, after which the notifier is no longer registered.
    fn release(&self) {}
}
