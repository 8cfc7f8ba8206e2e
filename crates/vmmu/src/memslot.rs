//! Memslots: the guest-physical ranges the VMM backs with its own memory
//! (KVM_SET_USER_MEMORY_REGION), and the per-slot metadata the MMU keeps (lpage_info).
//!
//! The MMU reaches guest memory only through a memslot: gfn -> hva -> host page.

use crate::host::Hva;
use crate::sync::{Arc, AtomicU32, Ordering};
use std::collections::HashMap;
use x86_paging::addr::Gfn;

/// Memslots userspace may create per address space (`KVM_USER_MEM_SLOTS`: KVM_MEM_SLOTS_NUM,
/// 32767, less the 3 private slots x86 keeps for itself); slot ids run from 0 to this less 1.
pub const KVM_USER_MEM_SLOTS: u32 = 32764;

bitflags::bitflags! {
    /// Memslot flags, with KVM's values.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct MemslotFlags: u32 {
        /// KVM_MEM_LOG_DIRTY_PAGES.
        const LOG_DIRTY_PAGES = 1 << 0;
        /// KVM_MEM_READONLY.
        const READONLY = 1 << 1;
    }
}

/// The argument of KVM_SET_USER_MEMORY_REGION.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserspaceMemoryRegion {
    /// Slot id.
    pub slot: u32,
    /// Flags.
    pub flags: MemslotFlags,
    /// First guest physical address (4 KiB aligned).
    pub guest_phys_addr: u64,
    /// Size in bytes (4 KiB multiple); 0 deletes the slot.
    pub memory_size: u64,
    /// Host virtual address of the backing memory (4 KiB aligned).
    pub userspace_addr: Hva,
}

/// Errors of memslot updates, as KVM's -EINVAL / -EEXIST cases.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MemslotError {
    /// Misaligned address or size.
    #[error("memslot {slot}: {what} {value:#x} is not 4 KiB aligned")]
    Misaligned {
        /// Slot id.
        slot: u32,
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// Overlaps another slot.
    #[error("memslot {slot} [{start:#x}, {end:#x}) overlaps memslot {other}")]
    Overlap {
        /// Slot id.
        slot: u32,
        /// First gpa.
        start: u64,
        /// End gpa.
        end: u64,
        /// The slot it overlaps.
        other: u32,
    },
    /// Deleting a slot that does not exist.
    #[error("memslot {0} does not exist")]
    NoSuchSlot(u32),
    /// A slot id KVM does not accept (KVM_SET_USER_MEMORY_REGION's -EINVAL for an id at or
    /// above KVM_USER_MEM_SLOTS, or an address space other than 0).
    #[error(
        "memslot {0}: invalid slot id (EINVAL): KVM allows at most {KVM_USER_MEM_SLOTS} memslots per address space, ids 0 to {max}",
        max = KVM_USER_MEM_SLOTS - 1
    )]
    InvalidSlotId(u32),
    /// Beyond the guest physical address width.
    #[error("memslot {slot} ends at gpa {end:#x}, beyond the {maxphyaddr}-bit guest physical address space")]
    TooHigh {
        /// Slot id.
        slot: u32,
        /// End gpa.
        end: u64,
        /// MAXPHYADDR.
        maxphyaddr: u8,
    },
}

/// Huge-page levels with lpage_info (2 MiB and 1 GiB).
pub const LPAGE_LEVELS: [u8; 2] = [2, 3];

/// One memslot with its MMU metadata (`struct kvm_memory_slot` + `kvm_arch_memory_slot`).
#[derive(Debug)]
pub struct Memslot {
    /// Slot id.
    pub id: u32,
    /// First gfn.
    pub base_gfn: Gfn,
    /// Number of 4 KiB pages.
    pub npages: u64,
    /// Backing host address.
    pub userspace_addr: Hva,
    /// Flags.
    pub flags: MemslotFlags,
    /// `lpage_info[level-2][index]`: a count of reasons a huge page may not map there.
    lpage_info: [Box<[AtomicU32]>; 2],
    /// The dirty bitmap, one bit per page, while KVM_MEM_LOG_DIRTY_PAGES is set.
    /// Shared with the slot's next version on a flags-only change that keeps logging on, so
    /// marks made through either version land in one log.
    dirty_bitmap: Option<Arc<[crate::sync::AtomicU64]>>,
}

/// Pages per mapping at `level` (1 = 4 KiB).
#[inline]
pub const fn pages_per_level(level: u8) -> u64 {
    1 << (9 * (level as u32 - 1))
}

impl Memslot {
    fn new(r: &UserspaceMemoryRegion) -> Self {
        let base = r.guest_phys_addr >> 12;
        let npages = r.memory_size >> 12;
        let hva_pfn = r.userspace_addr.raw() >> 12;
        let lpage_info = LPAGE_LEVELS.map(|level| {
            let per = pages_per_level(level);
            let first = base / per;
            let last = (base + npages - 1) / per;
            let n = crate::num::usize_of(last - first + 1);
            let v: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            // A huge page can only map a range wholly inside the slot, and only if the guest
            // and host addresses agree modulo the huge page size.
            if !base.is_multiple_of(per) {
                v[0].fetch_add(1, Ordering::Relaxed);
            }
            if !(base + npages).is_multiple_of(per) {
                v[n - 1].fetch_add(1, Ordering::Relaxed);
            }
            if !(base ^ hva_pfn).is_multiple_of(per) {
                for e in &v {
                    e.fetch_add(1, Ordering::Relaxed);
                }
            }
            v.into_boxed_slice()
        });
        Memslot {
            id: r.slot,
            base_gfn: Gfn::new(base),
            npages,
            userspace_addr: r.userspace_addr,
            flags: r.flags,
            lpage_info,
            dirty_bitmap: r
                .flags
                .contains(MemslotFlags::LOG_DIRTY_PAGES)
                .then(|| (0..npages.div_ceil(64)).map(|_| crate::sync::AtomicU64::new(0)).collect()),
        }
    }

    /// Whether dirty logging is on (`kvm_slot_dirty_track_enabled`).
    #[inline]
    pub fn dirty_logging(&self) -> bool {
        self.dirty_bitmap.is_some()
    }

    /// `mark_page_dirty_in_slot`.
    #[inline]
    pub fn mark_page_dirty(&self, gfn: Gfn) {
        if let Some(b) = &self.dirty_bitmap {
            let i = gfn.raw() - self.base_gfn.raw();
            b[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Relaxed);
        }
    }

    /// The KVM_SET_USER_MEMORY_REGION argument that describes this slot as it is (change
    /// `flags` to update it).
    pub fn region(&self) -> UserspaceMemoryRegion {
        UserspaceMemoryRegion {
            slot: self.id,
            flags: self.flags,
            guest_phys_addr: self.base_gfn.raw() << 12,
            memory_size: self.npages << 12,
            userspace_addr: self.userspace_addr,
        }
    }

    /// Whether `gfn`'s bit is set in the dirty log (false when not logging).
    pub fn is_dirty(&self, gfn: Gfn) -> bool {
        self.dirty_bitmap.as_ref().is_some_and(|b| {
            let i = gfn.raw() - self.base_gfn.raw();
            b[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
        })
    }

    /// Sets every page's bit (KVM_DIRTY_LOG_INITIALLY_SET).
    pub fn set_all_dirty(&self) {
        if let Some(b) = &self.dirty_bitmap {
            for (w, word) in b.iter().enumerate() {
                let left = self.npages - w as u64 * 64;
                word.store(if left >= 64 { u64::MAX } else { (1 << left) - 1 }, Ordering::Release);
            }
        }
    }

    /// A copy of the dirty bitmap (KVM_GET_DIRTY_LOG with manual protection).
    pub fn read_dirty_bitmap(&self) -> Vec<u64> {
        self.dirty_bitmap.as_ref().map(|b| b.iter().map(|w| w.load(Ordering::Acquire)).collect()).unwrap_or_default()
    }

    /// Clears the bits of `mask` in the words from `first_word` on; returns, per word, the
    /// bits that were set and are now clear.
    pub fn clear_dirty_bits(&self, first_word: u64, mask: &[u64]) -> Vec<u64> {
        let Some(b) = &self.dirty_bitmap else { return vec![0; mask.len()] };
        mask.iter()
            .enumerate()
            .map(|(i, &m)| {
                b.get(crate::num::usize_of(first_word) + i).map_or(0, |w| w.fetch_and(!m, Ordering::AcqRel) & m)
            })
            .collect()
    }

    /// Takes the dirty bitmap (KVM_GET_DIRTY_LOG's harvest): each word read and cleared.
    pub fn take_dirty_bitmap(&self) -> Vec<u64> {
        self.dirty_bitmap.as_ref().map(|b| b.iter().map(|w| w.swap(0, Ordering::AcqRel)).collect()).unwrap_or_default()
    }

    /// One past the last gfn.
    pub fn end_gfn(&self) -> Gfn {
        Gfn::new(self.base_gfn.raw() + self.npages)
    }

    /// Whether `gfn` is in the slot.
    #[inline]
    pub fn contains(&self, gfn: Gfn) -> bool {
        gfn >= self.base_gfn && gfn.raw() < self.base_gfn.raw() + self.npages
    }

    /// `__gfn_to_hva_memslot`.
    #[inline]
    pub fn gfn_to_hva(&self, gfn: Gfn) -> Hva {
        Hva(self.userspace_addr.raw() + ((gfn.raw() - self.base_gfn.raw()) << 12))
    }

    /// Whether the slot is read-only for the guest.
    pub fn readonly(&self) -> bool {
        self.flags.contains(MemslotFlags::READONLY)
    }

    fn lpage_index(&self, gfn: Gfn, level: u8) -> usize {
        let per = pages_per_level(level);
        crate::num::usize_of(gfn.raw() / per - self.base_gfn.raw() / per)
    }

    /// Whether a huge page at `level` (2 or 3) covering `gfn` is disallowed by lpage_info.
    #[inline]
    pub fn lpage_disallowed(&self, gfn: Gfn, level: u8) -> bool {
        let i = self.lpage_index(gfn, level);
        self.lpage_info[usize::from(level) - 2][i].load(Ordering::Relaxed) != 0
    }

    /// Adds (`delta` = 1) or drops (-1) a reason to disallow huge pages over `gfn` at every
    /// huge level (`update_gfn_disallow_lpage_count`).
    pub fn update_disallow_lpage(&self, gfn: Gfn, delta: i32) {
        for level in LPAGE_LEVELS {
            let i = self.lpage_index(gfn, level);
            let e = &self.lpage_info[usize::from(level) - 2][i];
            if delta >= 0 {
                e.fetch_add(delta.cast_unsigned(), Ordering::Relaxed);
            } else {
                e.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
            }
        }
    }
}

/// The set of memslots of one address space, with its generation.
///
/// The slots are kept sorted by base gfn, so [`Memslots::find`] is a binary search (KVM's
/// gfn tree); an id index finds a slot by id without a scan. An update applied in place
/// ([`Memslots::apply`]) costs O(log n) searches plus one insertion into the sorted array,
/// so building KVM's maximum of [`KVM_USER_MEM_SLOTS`] slots does not grow quadratically.
#[derive(Debug, Default, Clone)]
pub struct Memslots {
    slots: Vec<Arc<Memslot>>,
    /// Slot id -> base gfn (the key of `slots`).
    ids: HashMap<u32, u64>,
    /// Sum of the slots' pages.
    total_pages: u64,
    generation: u64,
}

/// What a memslot update did, as KVM's `enum kvm_mr_change`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemslotChange {
    /// A new slot.
    Create,
    /// A slot removed.
    Delete,
    /// A slot moved to another gpa.
    Move,
    /// Only the flags changed.
    FlagsOnly,
}

impl Memslots {
    /// The memslot generation (bumped on every update).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// All slots, sorted by base gfn.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Memslot>> {
        self.slots.iter()
    }

    /// Total pages over all slots.
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are no slots.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Position in `slots` of the slot whose base gfn is `base`.
    fn position_of_base(&self, base: u64) -> Option<usize> {
        self.slots.binary_search_by_key(&base, |s| s.base_gfn.raw()).ok()
    }

    /// The slot holding `gfn` (`gfn_to_memslot`).
    #[inline]
    pub fn find(&self, gfn: Gfn) -> Option<&Arc<Memslot>> {
        self.find_index(gfn).map(|i| &self.slots[i])
    }

    /// The position of the slot holding `gfn` (for [`Memslots::at`]).
    #[inline]
    pub fn find_index(&self, gfn: Gfn) -> Option<usize> {
        let i = self.slots.partition_point(|s| s.end_gfn() <= gfn);
        self.slots.get(i).filter(|s| s.contains(gfn)).map(|_| i)
    }

    /// The slot at a position [`Memslots::find_index`] returned.
    #[inline]
    pub fn at(&self, index: usize) -> &Memslot {
        &self.slots[index]
    }

    /// The slot with id `id`.
    pub fn by_id(&self, id: u32) -> Option<&Arc<Memslot>> {
        let base = *self.ids.get(&id)?;
        self.position_of_base(base).map(|i| &self.slots[i])
    }

    /// Applies KVM_SET_USER_MEMORY_REGION; returns the new set, the change and the old slot
    /// (a copy of this set with [`Memslots::apply`] applied).
    pub fn update(
        &self,
        r: &UserspaceMemoryRegion,
        maxphyaddr: u8,
    ) -> Result<(Memslots, MemslotChange, Option<Arc<Memslot>>), MemslotError> {
        let mut next = self.clone();
        let (change, old) = next.apply(r, maxphyaddr)?;
        Ok((next, change, old))
    }

    /// Applies KVM_SET_USER_MEMORY_REGION to this set in place and bumps the generation;
    /// returns the change and the old slot. On error the set is unchanged.
    pub fn apply(
        &mut self,
        r: &UserspaceMemoryRegion,
        maxphyaddr: u8,
    ) -> Result<(MemslotChange, Option<Arc<Memslot>>), MemslotError> {
        if r.slot >= KVM_USER_MEM_SLOTS {
            return Err(MemslotError::InvalidSlotId(r.slot));
        }
        for (what, value) in [
            ("guest_phys_addr", r.guest_phys_addr),
            ("memory_size", r.memory_size),
            ("userspace_addr", r.userspace_addr.raw()),
        ] {
            if value % 4096 != 0 {
                return Err(MemslotError::Misaligned { slot: r.slot, what, value });
            }
        }
        let old = self.by_id(r.slot).cloned();
        let change = if r.memory_size == 0 {
            let Some(o) = &old else { return Err(MemslotError::NoSuchSlot(r.slot)) };
            self.remove(o);
            MemslotChange::Delete
        } else {
            let end = r.guest_phys_addr.saturating_add(r.memory_size);
            if end > 1u64 << maxphyaddr {
                return Err(MemslotError::TooHigh { slot: r.slot, end, maxphyaddr });
            }
            let (start_gfn, end_gfn) = (r.guest_phys_addr >> 12, end >> 12);
            // The slots do not overlap one another, so if any slot other than this one's old
            // version overlaps the new range, the one with the highest base below its end does.
            let below_end = self.slots.partition_point(|s| s.base_gfn.raw() < end_gfn);
            let overlapping =
                self.slots[..below_end].iter().rev().find(|s| s.id != r.slot).filter(|s| s.end_gfn().raw() > start_gfn);
            if let Some(o) = overlapping {
                return Err(MemslotError::Overlap { slot: r.slot, start: r.guest_phys_addr, end, other: o.id });
            }
            let mut slot = Memslot::new(r);
            if let Some(o) = old.as_ref().filter(|o| o.base_gfn.raw() == start_gfn && o.npages == slot.npages) {
                if slot.dirty_bitmap.is_some() && o.dirty_bitmap.is_some() {
                    // Logging stays on across the update: keep the log (and its pending bits).
                    slot.dirty_bitmap = o.dirty_bitmap.clone();
                }
            }
            if let Some(o) = &old {
                self.remove(o);
            }
            let at = self.slots.partition_point(|s| s.base_gfn.raw() < start_gfn);
            self.ids.insert(r.slot, start_gfn);
            self.total_pages += slot.npages;
            self.slots.insert(at, Arc::new(slot));
            match &old {
                None => MemslotChange::Create,
                Some(o) if o.base_gfn.raw() != start_gfn => MemslotChange::Move,
                Some(_) => MemslotChange::FlagsOnly,
            }
        };
        self.generation += 1;
        Ok((change, old))
    }

    /// Takes slot `o` (a member) out of the set.
    fn remove(&mut self, o: &Memslot) {
        if let Some(i) = self.position_of_base(o.base_gfn.raw()) {
            self.slots.remove(i);
            self.ids.remove(&o.id);
            self.total_pages -= o.npages;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(slot: u32, gpa: u64, size: u64, hva: u64) -> UserspaceMemoryRegion {
        UserspaceMemoryRegion {
            slot,
            flags: MemslotFlags::empty(),
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: Hva(hva),
        }
    }

    #[test]
    fn lookup_and_overlap() {
        let s = Memslots::default();
        let (s, c, _) = s.update(&region(0, 0, 1 << 30, 1 << 30), 46).unwrap();
        assert_eq!(c, MemslotChange::Create);
        let (s, _, _) = s.update(&region(1, 4 << 30, 1 << 20, 8 << 30), 46).unwrap();
        assert_eq!(s.find(Gfn::new(5)).unwrap().id, 0);
        assert_eq!(s.find(Gfn::new((4 << 30 >> 12) + 3)).unwrap().id, 1);
        assert!(s.find(Gfn::new(1 << 19)).is_none());
        assert!(matches!(s.update(&region(2, 1 << 29, 1 << 30, 0), 46), Err(MemslotError::Overlap { other: 0, .. })));
        assert!(matches!(s.update(&region(2, 1 << 46, 4096, 0), 46), Err(MemslotError::TooHigh { .. })));
        assert!(matches!(s.update(&region(2, 100, 4096, 0), 46), Err(MemslotError::Misaligned { .. })));
        let (s, c, old) = s.update(&region(1, 0, 0, 0), 46).unwrap();
        assert_eq!(c, MemslotChange::Delete);
        assert_eq!(old.unwrap().id, 1);
        assert_eq!(s.generation(), 3);
    }

    #[test]
    fn lpage_info_follows_alignment() {
        // Slot starting at 1 MiB: the first 2 MiB region is partial -> disallowed.
        let s = Memslot::new(&region(0, 1 << 20, 8 << 20, (1 << 30) + (1 << 20)));
        assert!(s.lpage_disallowed(Gfn::new(256), 2));
        assert!(!s.lpage_disallowed(Gfn::new(512), 2));
        assert!(s.lpage_disallowed(Gfn::new(512), 3), "1 GiB never fits in 8 MiB");
        // Guest and host addresses misaligned modulo 2 MiB: everything disallowed.
        let m = Memslot::new(&region(0, 0, 8 << 20, (1 << 30) + 4096));
        assert!(m.lpage_disallowed(Gfn::new(512), 2));
        m.update_disallow_lpage(Gfn::new(0), -1);
    }

    #[test]
    fn slot_ids_stop_at_kvm_user_mem_slots() {
        let mut s = Memslots::default();
        let last = KVM_USER_MEM_SLOTS - 1;
        s.apply(&region(last, 0, 4096, 0), 46).unwrap();
        assert_eq!(s.by_id(last).unwrap().id, last);
        let e = s.apply(&region(KVM_USER_MEM_SLOTS, 8192, 4096, 8192), 46).unwrap_err();
        assert_eq!(e, MemslotError::InvalidSlotId(32764));
        assert!(e.to_string().contains("EINVAL") && e.to_string().contains("32764"), "{e}");
        // An address space other than 0 (slot >> 16) is refused the same way.
        assert_eq!(s.apply(&region(1 << 16, 8192, 4096, 8192), 46).unwrap_err(), MemslotError::InvalidSlotId(1 << 16));
        assert_eq!(s.len(), 1);
        assert_eq!(s.generation(), 1, "a refused update leaves the set as it was");
    }

    #[test]
    fn all_kvm_slots_in_any_order() {
        // KVM's maximum of slots, created highest gpa first (each insertion at the front),
        // then every one looked up by gfn and by id, moved, resized and deleted.
        let n = u64::from(KVM_USER_MEM_SLOTS);
        let slot = |id: u64| u32::try_from(id).unwrap();
        let mut s = Memslots::default();
        for id in (0..n).rev() {
            let c = s.apply(&region(slot(id), id * 2 * 4096, 4096, id * 2 * 4096), 46).unwrap().0;
            assert_eq!(c, MemslotChange::Create);
        }
        assert_eq!(s.len(), crate::num::usize_of(n));
        assert_eq!(s.total_pages(), n);
        for id in (0..n).step_by(997) {
            assert_eq!(s.find(Gfn::new(id * 2)).unwrap().id, slot(id));
            assert!(s.find(Gfn::new(id * 2 + 1)).is_none(), "the holes between slots belong to no slot");
            assert_eq!(s.by_id(slot(id)).unwrap().base_gfn, Gfn::new(id * 2));
        }
        let sorted: Vec<u64> = s.iter().map(|m| m.base_gfn.raw()).collect();
        assert!(sorted.windows(2).all(|w| w[0] < w[1]));
        // Growing slot 5 over slot 6's gfn overlaps it; growing it into its own hole does not.
        assert!(matches!(s.apply(&region(5, 10 * 4096, 3 * 4096, 0), 46), Err(MemslotError::Overlap { other: 6, .. })));
        assert_eq!(s.apply(&region(5, 10 * 4096, 2 * 4096, 0), 46).unwrap().0, MemslotChange::FlagsOnly);
        assert_eq!(s.total_pages(), n + 1);
        assert_eq!(s.find(Gfn::new(11)).unwrap().id, 5);
        // Moving the last slot to the very top, then deleting it.
        let top = 1u64 << 46;
        assert_eq!(s.apply(&region(0, top - 4096, 4096, 0), 46).unwrap().0, MemslotChange::Move);
        assert_eq!(s.find(Gfn::new((top >> 12) - 1)).unwrap().id, 0);
        assert!(s.find(Gfn::new(0)).is_none());
        assert_eq!(s.apply(&region(0, 0, 0, 0), 46).unwrap().0, MemslotChange::Delete);
        assert!(s.by_id(0).is_none());
        assert_eq!(s.len(), crate::num::usize_of(n) - 1);
        assert_eq!(s.total_pages(), n);
    }
}
