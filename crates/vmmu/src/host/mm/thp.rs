//! Transparent huge pages of [`HostMm`] beyond the fault path: splitting 2 MiB PMD mappings
//! into 4 KiB PTEs (split_huge_pmd) and khugepaged's collapse of 4 KiB mappings back into one
//! 2 MiB page.

use super::{index, Backing, HostMm, A, ADDR, D, P, PS, U, W};
use crate::host::notifier::{HvaRange, MmuNotifyEvent};
use crate::host::{HostError, Hva};
use crate::sync::{AtomicU64, Ordering};
use x86_paging::addr::Pfn;

impl HostMm {
    /// Splits a 2 MiB PMD mapping into 512 PTEs mapping the same frames (THP split). The
    /// caller holds `mmap_lock` and has notified.
    pub(super) fn split_pmd(&self, pmd: &AtomicU64, v: u64) -> Result<(), HostError> {
        let pt = self.alloc_table()?;
        let base = v & ADDR;
        if !self.frames.is_zero_pfn(Pfn::new(base >> 12)) {
            self.frames.split_2m(Pfn::new(base >> 12));
        }
        let flags = v & (P | W | U | A | D);
        for i in 0..512u64 {
            self.entry(pt, i).store((base + i * 4096) | flags, Ordering::Relaxed);
        }
        pmd.store(pt.hpa().raw() | P | W | U | A, Ordering::Release);
        Ok(())
    }

    /// THP split (split_huge_pmd): every 2 MiB mapping in the range becomes 512 4 KiB
    /// mappings of the same frames, notifiers told (KVM must drop its huge SPTEs, since
    /// the host no longer maps the range huge). Returns the huge pages split.
    pub fn split_huge_pages(&self, hva: Hva, len: u64) -> Result<u64, HostError> {
        let (start, end) = Self::check_range(hva, len)?;
        let _g = self.mmap_lock.lock();
        let mut n = 0;
        let mut a = start & !((2 << 20) - 1);
        while a < end {
            if let Some((v, 2, e)) = self.lookup(a) {
                let range = HvaRange { start: Hva(a), end: Hva(a + (2 << 20)) };
                self.notify_start(range, MmuNotifyEvent::Clear);
                let r = self.split_pmd(e, v);
                self.notify_end(range, MmuNotifyEvent::Clear);
                r?;
                n += 1;
            }
            a += 2 << 20;
        }
        Ok(n)
    }

    /// THP collapse (khugepaged): every 2 MiB-aligned block of a THP-backed VMA inside the
    /// range that is mapped by a page table holding at least one private page, and no
    /// swapped-out page, is copied into a fresh 2 MiB frame and mapped by one PMD. As with
    /// khugepaged's defaults (max_ptes_none = 511), empty and zero-page entries become zeroed
    /// memory; KSM pages are copied (max_ptes_shared). The old frames are freed, notifiers
    /// told; the next fault lets KVM map the block huge again. Returns the huge pages made.
    pub fn collapse_huge_pages(&self, hva: Hva, len: u64) -> Result<u64, HostError> {
        let (start, end) = Self::check_range(hva, len)?;
        let _g = self.mmap_lock.lock();
        let mem = self.frames.mem();
        let mut n = 0;
        let mut a = start.next_multiple_of(2 << 20);
        while a + (2 << 20) <= end {
            let block = a;
            a += 2 << 20;
            let Some(vma) = self.vma(block) else { continue };
            if vma.backing != Backing::Thp || block < vma.start || block + (2 << 20) > vma.end {
                continue;
            }
            // Only a block mapped by a page table (not already huge, not unpopulated).
            let Some(pmd) = self.pmd_entry(block) else { continue };
            let pv = pmd.load(Ordering::Acquire);
            if pv & P == 0 || pv & PS != 0 {
                continue;
            }
            let swap = self.swap.lock();
            if swap.keys().any(|&k| (block..block + (2 << 20)).contains(&k)) {
                continue; // khugepaged would swap these in first
            }
            drop(swap);
            let ptes: Vec<Option<(u64, &AtomicU64)>> = (0..512u64)
                .map(|i| match self.lookup(block + i * 4096) {
                    Some((v, 1, e)) if !self.frames.is_zero_pfn(Pfn::new((v & ADDR) >> 12)) => Some((v, e)),
                    _ => None,
                })
                .collect();
            let private =
                |o: &Option<(u64, &AtomicU64)>| o.is_some_and(|(v, _)| !self.is_ksm(Pfn::new((v & ADDR) >> 12)));
            if !ptes.iter().any(private) {
                continue;
            }
            let range = HvaRange { start: Hva(block), end: Hva(block + (2 << 20)) };
            self.notify_start(range, MmuNotifyEvent::Clear);
            let new = match self.frames.alloc_2m() {
                Ok(f) => f,
                Err(e) => {
                    self.notify_end(range, MmuNotifyEvent::Clear);
                    return Err(e);
                }
            };
            let mut flags = P | U | A | PS | if vma.writable { W } else { 0 };
            for (i, pte) in ptes.iter().enumerate() {
                let to = Pfn::new(new.raw() + i as u64);
                match pte {
                    Some((v, e)) => {
                        let old = Pfn::new((v & ADDR) >> 12);
                        mem.copy_frame(old, to);
                        flags |= v & D;
                        e.store(0, Ordering::Release);
                        self.put_4k(old);
                    }
                    None => mem.zero_frame(to),
                }
            }
            // The page table just emptied goes; the PMD becomes the huge mapping.
            let table = Pfn::new((pv & ADDR) >> 12);
            for i in 0..512u64 {
                self.entry(table, i).store(0, Ordering::Relaxed);
            }
            pmd.store(new.hpa().raw() | flags, Ordering::Release);
            self.frames.free_4k(table);
            self.pt_pages.fetch_sub(1, Ordering::Relaxed);
            self.notify_end(range, MmuNotifyEvent::Clear);
            n += 1;
        }
        Ok(n)
    }

    /// The PMD entry covering `hva`, if the upper levels are present.
    fn pmd_entry(&self, hva: u64) -> Option<&AtomicU64> {
        let mut table = self.pgd;
        for level in (3..=4u8).rev() {
            let v = self.entry(table, index(hva, level)).load(Ordering::Acquire);
            if v & P == 0 {
                return None;
            }
            table = Pfn::new((v & ADDR) >> 12);
        }
        Some(self.entry(table, index(hva, 2)))
    }
}
