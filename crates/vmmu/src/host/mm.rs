//! The VMM's address space: VMAs and a real x86 4-level host page table (hva -> pfn) kept in
//! host frames, filled on first use with get_user_pages semantics.
//!
//! - A read fault on untouched anonymous memory maps the shared zero page read-only (the
//!   huge zero page for THP memory); a write allocates, replacing a zero page by copy-on-write
//!   and telling MMU notifiers first.
//! - THP-backed VMAs are mapped by 2 MiB PMD leaves when the 2 MiB range lies inside the VMA,
//!   so KVM's host mapping level (a walk of these tables) is real.
//! - KSM ([`HostMm::ksm_merge`]) merges identical 4 KiB pages into one write-protected
//!   frame shared by all of them; the next write to any of them copies it (copy-on-write).
//! - Lookups are lockless (atomic loads of the table entries, as GUP-fast); changes are
//!   serialized by `mmap_lock`.
//!
//! This file holds the address space itself: mmap/munmap, the host page-table walk,
//! get_user_pages and its faults, zapping, migration and swap. The rest of [`HostMm`] is in
//! child modules: `thp` (THP split and khugepaged's collapse), `ksm` (merging and the
//! shared pages' mapping counts) and `idle` (page aging through the notifiers, and idle page
//! tracking).

mod idle;
mod ksm;
#[cfg(test)]
mod tests;
mod thp;

pub use ksm::KsmStats;

use super::frames::FrameAllocator;
use super::notifier::{HvaRange, MmuNotifier, MmuNotifyEvent};
use super::HostError;
use crate::sync::{Arc, AtomicU64, Mutex, Ordering, RwLock};
use ksm::Ksm;
use x86_paging::addr::{Hpa, Pfn};

/// A host virtual address in the VMM's address space.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct Hva(pub u64);

impl Hva {
    /// The raw address.
    pub const fn raw(self) -> u64 {
        self.0
    }
}

impl std::fmt::Debug for Hva {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hva({:#x})", self.0)
    }
}

impl std::fmt::Display for Hva {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// How a VMA is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Backing {
    /// Anonymous memory in 4 KiB pages.
    Anon4k,
    /// Anonymous memory with transparent huge pages (2 MiB where alignment allows).
    Thp,
}

/// A host page as get_user_pages returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPage {
    /// The 4 KiB frame backing the address.
    pub pfn: Pfn,
    /// Whether the host mapping is writable (false for the zero page and read-only VMAs).
    pub writable: bool,
    /// Host mapping level: 1 = 4 KiB, 2 = 2 MiB.
    pub level: u8,
}

#[derive(Debug, Clone, Copy)]
struct Vma {
    start: u64,
    end: u64,
    backing: Backing,
    writable: bool,
}

// Host page-table entry bits (x86 64-bit format).
const P: u64 = 1;
const W: u64 = 1 << 1;
const U: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

const HVA_BASE: u64 = 1 << 30;
const HVA_LIMIT: u64 = 1 << 47;

/// The VMM process's address space.
pub struct HostMm {
    frames: Arc<FrameAllocator>,
    pgd: Pfn,
    vmas: RwLock<Vec<Vma>>,
    mmap_lock: Mutex<()>,
    next_hva: AtomicU64,
    notifiers: RwLock<Vec<Arc<dyn MmuNotifier>>>,
    pt_pages: AtomicU64,
    /// Idle page tracking's flags (/sys/kernel/mm/page_idle/bitmap), by host page number.
    idle: Mutex<std::collections::BTreeSet<u64>>,
    /// Swapped-out pages' contents, by page-aligned hva (the swap device).
    swap: Mutex<std::collections::HashMap<u64, Box<[u64]>>>,
    /// KSM's shared pages.
    ksm: Mutex<Ksm>,
}

fn index(hva: u64, level: u8) -> u64 {
    (hva >> (12 + 9 * (u32::from(level) - 1))) & 511
}

impl HostMm {
    /// Creates an empty address space over `frames`.
    pub fn new(frames: Arc<FrameAllocator>) -> Result<Self, HostError> {
        let pgd = frames.alloc_4k()?;
        Ok(HostMm {
            frames,
            pgd,
            vmas: RwLock::new(Vec::new()),
            mmap_lock: Mutex::new(()),
            next_hva: AtomicU64::new(HVA_BASE),
            notifiers: RwLock::new(Vec::new()),
            pt_pages: AtomicU64::new(1),
            idle: Mutex::new(std::collections::BTreeSet::new()),
            swap: Mutex::new(std::collections::HashMap::new()),
            ksm: Mutex::new(Ksm::default()),
        })
    }

    /// The host page allocator.
    pub fn frames(&self) -> &Arc<FrameAllocator> {
        &self.frames
    }

    /// Host page-table pages in use (host overhead).
    pub fn pt_pages(&self) -> u64 {
        self.pt_pages.load(Ordering::Relaxed)
    }

    /// Registers a secondary MMU (KVM) to be told of invalidations.
    pub fn register_notifier(&self, n: Arc<dyn MmuNotifier>) {
        self.notifiers.write().push(n);
    }

    /// Unregisters a secondary MMU (mmu_notifier_unregister).
    pub fn unregister_notifier(&self, n: &Arc<dyn MmuNotifier>) {
        self.notifiers.write().retain(|x| !Arc::ptr_eq(x, n));
    }

    /// Maps `len` bytes (rounded up to 4 KiB) of anonymous memory at a 1 GiB-aligned address.
    /// With `prefault`, every page is allocated now (MAP_POPULATE).
    pub fn mmap(&self, len: u64, backing: Backing, writable: bool, prefault: bool) -> Result<Hva, HostError> {
        if len == 0 {
            return Err(HostError::Invalid("mmap of zero bytes".into()));
        }
        let len = len.next_multiple_of(4096);
        if prefault && writable {
            // MAP_POPULATE of more than the host has would fill all of it and then fail:
            // check first. Each page needs a frame, each 2 MiB a last-level host table
            // (fewer with THP, but a THP fault may fall back to 4 KiB pages).
            let needed = len.saturating_add(len.div_ceil(2 << 20) * 4096);
            let free = self.frames.free_bytes();
            if needed > free {
                return Err(HostError::PrefaultTooBig { len, needed, free, size: self.frames.mem().size() });
            }
        }
        let start = {
            let _g = self.mmap_lock.lock();
            let start = self.next_hva.load(Ordering::Relaxed);
            let end = start.checked_add(len).filter(|e| *e <= HVA_LIMIT).ok_or_else(|| {
                HostError::Invalid(format!("mapping of {len} bytes does not fit the host address space"))
            })?;
            self.next_hva.store(end.next_multiple_of(1 << 30) + (1 << 30), Ordering::Relaxed);
            let mut vmas = self.vmas.write();
            vmas.push(Vma { start, end, backing, writable });
            vmas.sort_by_key(|v| v.start);
            start
        };
        if prefault && writable {
            let mut a = start;
            while a < start + len {
                let p = self.get_user_page(Hva(a), true)?;
                a += if p.level == 2 { (2 << 20) - (a & ((2 << 20) - 1)) } else { 4096 };
            }
        }
        Ok(Hva(start))
    }

    fn vma(&self, hva: u64) -> Option<Vma> {
        let vmas = self.vmas.read();
        let i = vmas.partition_point(|v| v.end <= hva);
        vmas.get(i).filter(|v| v.start <= hva).copied()
    }

    fn entry(&self, table: Pfn, idx: u64) -> &AtomicU64 {
        self.frames.mem().word(Hpa::new(table.hpa().raw() + idx * 8))
    }

    /// Lockless walk: the leaf entry, its level and the word holding it.
    fn lookup(&self, hva: u64) -> Option<(u64, u8, &AtomicU64)> {
        let mut table = self.pgd;
        for level in (1..=4u8).rev() {
            let e = self.entry(table, index(hva, level));
            let v = e.load(Ordering::Acquire);
            if v & P == 0 {
                return None;
            }
            if level == 1 || (level == 2 && v & PS != 0) {
                return Some((v, level, e));
            }
            table = Pfn::new((v & ADDR) >> 12);
        }
        None
    }

    fn page_of(v: u64, level: u8, hva: u64) -> HostPage {
        let base = (v & ADDR) >> 12;
        let pfn = if level == 2 { base + ((hva >> 12) & 511) } else { base };
        HostPage { pfn: Pfn::new(pfn), writable: v & W != 0, level }
    }

    /// get_user_page_fast_only: a lockless lookup that never faults anything in.
    #[inline]
    pub fn get_user_page_fast_only(&self, hva: Hva, write: bool) -> Option<HostPage> {
        let (v, level, _) = self.lookup(hva.0)?;
        let p = Self::page_of(v, level, hva.0);
        (!write || p.writable).then_some(p)
    }

    /// The level at which the host maps `hva` (1 = 4 KiB, 2 = 2 MiB), or 1 if unmapped;
    /// what KVM's `host_pfn_mapping_level` reads.
    #[inline]
    pub fn host_mapping_level(&self, hva: Hva) -> u8 {
        self.lookup(hva.0).map_or(1, |(_, l, _)| l)
    }

    /// The 4 KiB pages of [hva, hva+len) that hold data, in address order: mapped to a frame
    /// other than a zero page, or swapped out (what /proc/PID/pagemap reports present or
    /// swapped). Nothing is faulted in, and the walk skips non-present host page-table
    /// entries, so it costs what is mapped, not the length of the range.
    pub fn resident_pages(&self, hva: Hva, len: u64) -> Vec<Hva> {
        let (start, end) = (hva.0 & !4095, hva.0.saturating_add(len).min(HVA_LIMIT));
        let mut out = Vec::new();
        if start < end {
            self.resident_in(self.pgd, 4, 0, start, end, &mut out);
        }
        let mut swapped: Vec<Hva> =
            self.swap.lock().keys().filter(|&&a| a >= start && a < end).map(|&a| Hva(a)).collect();
        if !swapped.is_empty() {
            out.append(&mut swapped);
            out.sort_unstable();
            out.dedup();
        }
        out
    }

    /// [`HostMm::resident_pages`] under `table` (at `level`, mapping from `base`).
    fn resident_in(&self, table: Pfn, level: u8, base: u64, start: u64, end: u64, out: &mut Vec<Hva>) {
        let span = 1u64 << (12 + 9 * (u32::from(level) - 1));
        let first = if start > base { (start - base) / span } else { 0 };
        for idx in first..512 {
            let at = base + idx * span;
            if at >= end {
                break;
            }
            let v = self.entry(table, idx).load(Ordering::Acquire);
            if v & P == 0 {
                continue;
            }
            let pfn = Pfn::new((v & ADDR) >> 12);
            if level == 1 || (level == 2 && v & PS != 0) {
                if self.frames.is_zero_pfn(pfn) {
                    continue;
                }
                let mut a = at.max(start);
                while a < (at + span).min(end) {
                    out.push(Hva(a));
                    a += 4096;
                }
            } else {
                self.resident_in(pfn, level - 1, at, start, end, out);
            }
        }
    }

    /// get_user_pages: the page at `hva`, faulting it in (and breaking copy-on-write for a
    /// write) as the host kernel would.
    pub fn get_user_page(&self, hva: Hva, write: bool) -> Result<HostPage, HostError> {
        if let Some(p) = self.get_user_page_fast_only(hva, write) {
            return Ok(p);
        }
        let vma = self.vma(hva.0).ok_or(HostError::BadAddress(hva.0))?;
        if write && !vma.writable {
            return Err(HostError::ReadOnly(hva.0));
        }
        let _g = self.mmap_lock.lock();
        self.fault_in(&vma, hva.0, write)
    }

    fn alloc_table(&self) -> Result<Pfn, HostError> {
        let t = self.frames.alloc_4k()?;
        self.pt_pages.fetch_add(1, Ordering::Relaxed);
        Ok(t)
    }

    fn fault_in(&self, vma: &Vma, hva: u64, write: bool) -> Result<HostPage, HostError> {
        let prot = if vma.writable { W } else { 0 };
        let mut table = self.pgd;
        for level in (3..=4u8).rev() {
            let e = self.entry(table, index(hva, level));
            let v = e.load(Ordering::Acquire);
            table = if v & P == 0 {
                let t = self.alloc_table()?;
                e.store(t.hpa().raw() | P | W | U | A, Ordering::Release);
                t
            } else {
                Pfn::new((v & ADDR) >> 12)
            };
        }
        let huge_start = hva & !((2 << 20) - 1);
        let huge_ok = vma.backing == Backing::Thp && huge_start >= vma.start && huge_start + (2 << 20) <= vma.end;
        let pmd = self.entry(table, index(hva, 2));
        let v = pmd.load(Ordering::Acquire);
        if v & P != 0 && v & PS != 0 {
            let p = Self::page_of(v, 2, hva);
            if !write || p.writable {
                return Ok(p);
            }
            // Write to the huge zero page: copy-on-write with a fresh huge page.
            debug_assert!(self.frames.is_zero_pfn(p.pfn));
            let range = HvaRange { start: Hva(huge_start), end: Hva(huge_start + (2 << 20)) };
            self.notify_start(range, MmuNotifyEvent::Cow);
            let result = match self.frames.alloc_2m() {
                Ok(f) => {
                    pmd.store(f.hpa().raw() | P | prot | U | A | D | PS, Ordering::Release);
                    Ok(Self::page_of(pmd.load(Ordering::Acquire), 2, hva))
                }
                Err(e) => Err(e),
            };
            self.notify_end(range, MmuNotifyEvent::Cow);
            return result;
        }
        if v & P == 0 && huge_ok {
            let new = if write {
                match self.frames.alloc_2m() {
                    Ok(f) => Some(f.hpa().raw() | P | prot | U | A | D | PS),
                    Err(_) => None, // THP allocation failure: fall back to small pages.
                }
            } else {
                Some(self.frames.huge_zero_pfn().hpa().raw() | P | U | A | PS)
            };
            if let Some(new) = new {
                pmd.store(new, Ordering::Release);
                return Ok(Self::page_of(new, 2, hva));
            }
        }
        let pt = if v & P == 0 {
            let t = self.alloc_table()?;
            pmd.store(t.hpa().raw() | P | W | U | A, Ordering::Release);
            t
        } else {
            Pfn::new((v & ADDR) >> 12)
        };
        let pte = self.entry(pt, index(hva, 1));
        let v = pte.load(Ordering::Acquire);
        if v & P != 0 {
            let p = Self::page_of(v, 1, hva);
            if !write || p.writable {
                return Ok(p);
            }
            if !self.frames.is_zero_pfn(p.pfn) && !self.is_ksm(p.pfn) {
                // A private page KSM write-protected but did not merge: reuse it
                // (wp_page_reuse); no secondary MMU maps it writable, nothing to notify.
                pte.store(v | W | D, Ordering::Release);
                return Ok(Self::page_of(pte.load(Ordering::Acquire), 1, hva));
            }
            // Copy-on-write: of the zero page (nothing to copy) or of a KSM page (copied).
            let page = hva & !4095;
            let range = HvaRange { start: Hva(page), end: Hva(page + 4096) };
            self.notify_start(range, MmuNotifyEvent::Cow);
            let r = self.frames.alloc_4k().map(|f| {
                if !self.frames.is_zero_pfn(p.pfn) {
                    self.frames.mem().copy_frame(p.pfn, f);
                }
                pte.store(f.hpa().raw() | P | prot | U | A | D, Ordering::Release);
                self.put_4k(p.pfn);
                Self::page_of(pte.load(Ordering::Acquire), 1, hva)
            });
            self.notify_end(range, MmuNotifyEvent::Cow);
            return r;
        }
        if let Some(words) = self.swap.lock().remove(&(hva & !4095)) {
            // Swap-in: a fresh frame with the saved contents.
            let f = self.frames.alloc_4k()?;
            for (i, w) in words.iter().enumerate() {
                self.frames.mem().store(Hpa::new(f.hpa().raw() + i as u64 * 8), *w);
            }
            let new = f.hpa().raw() | P | prot | U | A | if write { D } else { 0 };
            pte.store(new, Ordering::Release);
            return Ok(Self::page_of(new, 1, hva));
        }
        let new = if write {
            self.frames.alloc_4k()?.hpa().raw() | P | prot | U | A | D
        } else {
            self.frames.zero_pfn().hpa().raw() | P | U | A
        };
        pte.store(new, Ordering::Release);
        Ok(Self::page_of(new, 1, hva))
    }

    fn live_notifiers(&self) -> Vec<Arc<dyn MmuNotifier>> {
        self.notifiers.read().clone()
    }

    fn notify_start(&self, range: HvaRange, ev: MmuNotifyEvent) {
        for n in self.live_notifiers() {
            n.invalidate_range_start(range, ev);
        }
    }

    fn notify_end(&self, range: HvaRange, ev: MmuNotifyEvent) {
        for n in self.live_notifiers() {
            n.invalidate_range_end(range, ev);
        }
    }

    /// Drops every page in `hva..hva+len`, telling notifiers first; with `unmap` the VMA goes
    /// too (munmap), otherwise it stays and reads zeroes again (MADV_DONTNEED).
    fn zap_range(&self, hva: Hva, len: u64, ev: MmuNotifyEvent) -> Result<(), HostError> {
        if !hva.0.is_multiple_of(4096) || !len.is_multiple_of(4096) || len == 0 {
            return Err(HostError::Invalid(format!("range {hva}+{len:#x} is not page aligned")));
        }
        let (start, end) = (hva.0, hva.0 + len);
        let _g = self.mmap_lock.lock();
        // A huge page only partly inside the range is split first (as __split_huge_pmd
        // does), which changes the mapping of all of it: notify its whole 2 MiB.
        let huge = |a: u64| matches!(self.lookup(a), Some((_, 2, _)));
        let nstart = if huge(start) { start & !((2 << 20) - 1) } else { start };
        let nend = if huge(end - 1) { (end - 1) / (2 << 20) * (2 << 20) + (2 << 20) } else { end };
        let range = HvaRange { start: Hva(nstart), end: Hva(nend) };
        self.notify_start(range, ev);
        self.swap.lock().retain(|&p, _| p < start || p >= end);
        let mut a = start;
        while a < end {
            let step = match self.lookup(a) {
                Some((v, 2, e)) => {
                    let base = a & !((2 << 20) - 1);
                    let pfn = Pfn::new((v & ADDR) >> 12);
                    if base >= start && base + (2 << 20) <= end {
                        e.store(0, Ordering::Release);
                        if !self.frames.is_zero_pfn(pfn) {
                            self.frames.free_2m(pfn);
                        }
                    } else {
                        // Partial unmap of a huge page: split it into 4 KiB mappings first.
                        self.split_pmd(e, v)?;
                        continue;
                    }
                    base + (2 << 20) - a
                }
                Some((v, _, e)) => {
                    e.store(0, Ordering::Release);
                    self.put_4k(Pfn::new((v & ADDR) >> 12));
                    4096
                }
                None => 4096,
            };
            a += step;
        }
        if ev == MmuNotifyEvent::Unmap {
            let mut vmas = self.vmas.write();
            let mut out = Vec::with_capacity(vmas.len() + 1);
            for v in vmas.iter() {
                if v.end <= start || v.start >= end {
                    out.push(*v);
                    continue;
                }
                if v.start < start {
                    out.push(Vma { end: start, ..*v });
                }
                if v.end > end {
                    out.push(Vma { start: end, ..*v });
                }
            }
            *vmas = out;
        }
        self.notify_end(range, ev);
        Ok(())
    }

    fn check_range(hva: Hva, len: u64) -> Result<(u64, u64), HostError> {
        if !hva.0.is_multiple_of(4096) || !len.is_multiple_of(4096) || len == 0 {
            return Err(HostError::Invalid(format!("range {hva}+{len:#x} is not page aligned")));
        }
        Ok((hva.0, hva.0 + len))
    }

    /// Page migration (migrate_pages, NUMA balancing, compaction): every page mapped in the
    /// range moves to a new frame with the same contents, notifiers told around each move
    /// (a 2 MiB page moves whole). The shared zero pages stay. Returns the 4 KiB pages moved.
    pub fn migrate_pages(&self, hva: Hva, len: u64) -> Result<u64, HostError> {
        let (start, end) = Self::check_range(hva, len)?;
        let _g = self.mmap_lock.lock();
        let mem = self.frames.mem();
        let mut moved = 0;
        let mut a = start;
        while a < end {
            let Some((v, level, e)) = self.lookup(a) else {
                a += 4096;
                continue;
            };
            let size = if level == 2 { 2u64 << 20 } else { 4096 };
            let base = a & !(size - 1);
            let old = Pfn::new((v & ADDR) >> 12);
            // Shared pages stay: the zero pages, and KSM pages (moving one means moving all of
            // its mappings at once, which this model does not do).
            if !self.frames.is_zero_pfn(old) && !self.is_ksm(old) {
                let range = HvaRange { start: Hva(base), end: Hva(base + size) };
                self.notify_start(range, MmuNotifyEvent::Migrate);
                let new = if level == 2 { self.frames.alloc_2m() } else { self.frames.alloc_4k() };
                let new = match new {
                    Ok(f) => f,
                    Err(err) => {
                        self.notify_end(range, MmuNotifyEvent::Migrate);
                        return Err(err);
                    }
                };
                let n = size / 4096;
                for i in 0..n {
                    mem.copy_frame(Pfn::new(old.raw() + i), Pfn::new(new.raw() + i));
                }
                e.store(new.hpa().raw() | (v & !ADDR), Ordering::Release);
                if level == 2 {
                    self.frames.free_2m(old);
                } else {
                    self.frames.free_4k(old);
                }
                self.notify_end(range, MmuNotifyEvent::Migrate);
                moved += n;
            }
            a = base + size;
        }
        Ok(moved)
    }

    /// Swap-out (reclaim): every page mapped in the range is written to the swap store and
    /// its frame freed, notifiers told first; huge pages are split first. The next access
    /// faults it back in with the same contents. Returns the pages swapped out.
    pub fn swap_out(&self, hva: Hva, len: u64) -> Result<u64, HostError> {
        let (start, end) = Self::check_range(hva, len)?;
        let _g = self.mmap_lock.lock();
        let huge = |a: u64| matches!(self.lookup(a), Some((_, 2, _)));
        let nstart = if huge(start) { start & !((2 << 20) - 1) } else { start };
        let nend = if huge(end - 1) { (end - 1) / (2 << 20) * (2 << 20) + (2 << 20) } else { end };
        let range = HvaRange { start: Hva(nstart), end: Hva(nend) };
        self.notify_start(range, MmuNotifyEvent::Clear);
        let mem = self.frames.mem();
        let mut n = 0;
        let mut a = start;
        let mut result = Ok(());
        while a < end {
            match self.lookup(a) {
                Some((v, 2, e)) => {
                    if let Err(err) = self.split_pmd(e, v) {
                        result = Err(err);
                        break;
                    }
                }
                Some((v, _, e)) => {
                    let pfn = Pfn::new((v & ADDR) >> 12);
                    e.store(0, Ordering::Release);
                    if !self.frames.is_zero_pfn(pfn) {
                        let words: Box<[u64]> =
                            (0..512u64).map(|i| mem.load(Hpa::new(pfn.hpa().raw() + i * 8))).collect();
                        self.swap.lock().insert(a, words);
                        self.put_4k(pfn);
                        n += 1;
                    }
                    a += 4096;
                }
                None => a += 4096,
            }
        }
        self.notify_end(range, MmuNotifyEvent::Clear);
        result.map(|()| n)
    }

    /// Pages in the swap store.
    pub fn swapped_pages(&self) -> u64 {
        self.swap.lock().len() as u64
    }

    /// The VMM process exits (`exit_mmap`): every registered notifier is unhooked and told
    /// `release` (KVM zaps all of its mappings), then every VMA is unmapped without further
    /// notification. Guest accesses afterwards find no memory behind the memslots.
    pub fn exit_mmap(&self) -> Result<(), HostError> {
        let subscribers = std::mem::take(&mut *self.notifiers.write());
        for n in &subscribers {
            n.release();
        }
        let vmas = self.vmas.read().clone();
        for v in vmas {
            self.zap_range(Hva(v.start), v.end - v.start, MmuNotifyEvent::Unmap)?;
        }
        Ok(())
    }

    /// munmap: removes the mapping; the frames go back to the host.
    pub fn munmap(&self, hva: Hva, len: u64) -> Result<(), HostError> {
        self.zap_range(hva, len, MmuNotifyEvent::Unmap)
    }

    /// madvise(MADV_DONTNEED): drops the pages; the next access reads zeroes.
    pub fn madvise_dontneed(&self, hva: Hva, len: u64) -> Result<(), HostError> {
        self.zap_range(hva, len, MmuNotifyEvent::Clear)
    }

    /// Reads `size` bytes at `hva` as the VMM process would (faulting the page in).
    pub fn read(&self, hva: Hva, size: u8) -> Result<u64, HostError> {
        let p = self.get_user_page(hva, false)?;
        Ok(self.frames.mem().read(Hpa::new(p.pfn.hpa().raw() + (hva.0 & 4095)), size))
    }

    /// Writes `size` bytes at `hva` as the VMM process would (allocating the page).
    pub fn write(&self, hva: Hva, size: u8, val: u64) -> Result<(), HostError> {
        let p = self.get_user_page(hva, true)?;
        self.frames.mem().write(Hpa::new(p.pfn.hpa().raw() + (hva.0 & 4095)), size, val);
        Ok(())
    }
}
