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

use super::frames::FrameAllocator;
use super::notifier::{HvaRange, MmuNotifier, MmuNotifyEvent};
use super::HostError;
use crate::sync::{Arc, AtomicU64, Mutex, Ordering, RwLock};
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

/// KSM's state: the stable tree (shared frames by content hash) and how many PTEs map each
/// shared frame. A shared frame is freed when its last mapping goes.
#[derive(Default)]
struct Ksm {
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

    /// Splits a 2 MiB PMD mapping into 512 PTEs mapping the same frames (THP split). The
    /// caller holds `mmap_lock` and has notified.
    fn split_pmd(&self, pmd: &AtomicU64, v: u64) -> Result<(), HostError> {
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

    /// Drops one mapping of 4 KiB frame `pfn`: the zero page stays, a KSM page is freed with
    /// its last mapping, a private page is freed.
    fn put_4k(&self, pfn: Pfn) {
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

    fn is_ksm(&self, pfn: Pfn) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::AtomicUsize;

    fn mm() -> HostMm {
        HostMm::new(Arc::new(FrameAllocator::new(256 << 20).unwrap())).unwrap()
    }

    #[test]
    fn read_maps_zero_page_write_allocates() {
        let mm = mm();
        let hva = mm.mmap(1 << 20, Backing::Anon4k, true, false).unwrap();
        let r = mm.get_user_page(hva, false).unwrap();
        assert_eq!(r.pfn, mm.frames().zero_pfn());
        assert!(!r.writable);
        assert_eq!(mm.read(hva, 8).unwrap(), 0);
        mm.write(hva, 8, 77).unwrap();
        let w = mm.get_user_page(hva, false).unwrap();
        assert!(w.writable);
        assert_ne!(w.pfn, mm.frames().zero_pfn());
        assert_eq!(mm.read(hva, 8).unwrap(), 77);
        assert_eq!(mm.host_mapping_level(hva), 1);
    }

    #[test]
    fn ksm_merges_identical_pages_and_copies_on_write() {
        let mm = mm();
        let hva = mm.mmap(16 << 12, Backing::Anon4k, true, false).unwrap();
        let at = |i: u64| Hva(hva.0 + i * 4096);
        // Pages 0..4 hold 1, pages 4..8 hold 2, page 8 holds 3 (unique), the rest untouched.
        for i in 0..9 {
            mm.write(at(i), 8, [1, 2, 3][(i / 4).min(2) as usize]).unwrap();
        }
        let before = mm.frames().counts().frames_4k;
        assert_eq!(mm.ksm_merge(hva, 16 << 12).unwrap(), 8);
        assert_eq!(mm.ksm_stats(), KsmStats { pages_shared: 2, pages_sharing: 6 });
        assert_eq!(mm.frames().counts().frames_4k, before - 6, "six private frames freed");
        let p0 = mm.get_user_page(at(0), false).unwrap();
        assert!(!p0.writable, "merged pages are mapped read-only");
        assert_eq!(mm.get_user_page(at(3), false).unwrap().pfn, p0.pfn);
        assert!(mm.get_user_page(at(8), false).unwrap().writable, "a unique page stays private");
        assert_eq!(mm.ksm_merge(hva, 16 << 12).unwrap(), 0, "nothing left to merge");
        // A write copies the shared page: the rest of its contents come along.
        mm.write(Hva(at(2).0 + 8), 8, 99).unwrap();
        assert_eq!((mm.read(at(2), 8).unwrap(), mm.read(Hva(at(2).0 + 8), 8).unwrap()), (1, 99));
        assert_eq!(mm.read(Hva(at(1).0 + 8), 8).unwrap(), 0, "the others still share the old contents");
        assert_eq!(mm.ksm_stats(), KsmStats { pages_shared: 2, pages_sharing: 5 });
        // Dropping every mapping frees the shared frames.
        mm.madvise_dontneed(hva, 16 << 12).unwrap();
        assert_eq!(mm.ksm_stats(), KsmStats::default());
        assert_eq!(mm.frames().counts().frames_4k, before - 9);
    }

    #[test]
    fn thp_maps_2m_only_when_aligned_range_fits() {
        let mm = mm();
        let hva = mm.mmap(5 << 20, Backing::Thp, true, false).unwrap();
        mm.write(hva, 1, 1).unwrap();
        assert_eq!(mm.host_mapping_level(hva), 2);
        // The last 1 MiB is not a whole huge page: 4 KiB.
        let tail = Hva(hva.0 + (4 << 20) + 4096);
        mm.write(tail, 1, 1).unwrap();
        assert_eq!(mm.host_mapping_level(tail), 1);
        // Read of an untouched huge range maps the huge zero page.
        let mid = Hva(hva.0 + (2 << 20) + 8192);
        let p = mm.get_user_page(mid, false).unwrap();
        assert!(mm.frames().is_zero_pfn(p.pfn) && p.level == 2 && !p.writable);
    }

    struct Count(AtomicUsize);
    impl MmuNotifier for Count {
        fn invalidate_range_start(&self, _: HvaRange, _: MmuNotifyEvent) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn invalidate_range_end(&self, _: HvaRange, _: MmuNotifyEvent) {}
    }

    #[test]
    fn cow_of_zero_page_and_dontneed_notify() {
        let mm = mm();
        let n = Arc::new(Count(AtomicUsize::new(0)));
        mm.register_notifier(n.clone());
        let hva = mm.mmap(1 << 20, Backing::Anon4k, true, false).unwrap();
        mm.read(hva, 1).unwrap();
        assert_eq!(n.0.load(Ordering::Relaxed), 0);
        mm.write(hva, 1, 5).unwrap();
        assert_eq!(n.0.load(Ordering::Relaxed), 1, "zero-page COW notifies");
        mm.madvise_dontneed(hva, 4096).unwrap();
        assert_eq!(n.0.load(Ordering::Relaxed), 2);
        assert_eq!(mm.read(hva, 1).unwrap(), 0, "reads zeroes after MADV_DONTNEED");
        mm.munmap(hva, 1 << 20).unwrap();
        assert_eq!(mm.get_user_page(hva, false), Err(HostError::BadAddress(hva.0)));
    }

    #[test]
    fn prefault_allocates_everything() {
        let mm = mm();
        let before = mm.frames().counts().frames_4k;
        let hva = mm.mmap(64 * 4096, Backing::Anon4k, true, true).unwrap();
        assert!(mm.frames().counts().frames_4k >= before + 64);
        assert!(mm.get_user_page_fast_only(Hva(hva.0 + 63 * 4096), true).is_some());
        let readonly = mm.mmap(4096, Backing::Anon4k, false, false).unwrap();
        assert_eq!(mm.write(readonly, 1, 1), Err(HostError::ReadOnly(readonly.0)));
    }

    #[test]
    fn resident_pages_are_the_data_pages_only() {
        let mm = mm();
        let len = 1u64 << 40;
        let hva = mm.mmap(len, Backing::Thp, true, false).unwrap();
        assert!(mm.resident_pages(hva, len).is_empty());
        let at = |off: u64| Hva(hva.0 + off);
        mm.write(at(5 << 30), 8, 1).unwrap(); // a THP: 512 pages
        mm.write(at(len - 4096), 8, 2).unwrap(); // the last 2 MiB: a THP too
        mm.read(at(7 << 30), 8).unwrap(); // the huge zero page: no data
        let r = mm.resident_pages(hva, len);
        assert_eq!(r.len(), 1024);
        assert_eq!(r[0], at(5 << 30));
        assert_eq!(r[1023], at(len - 4096));
        assert!(r.windows(2).all(|w| w[0] < w[1]));
        // A sub-range, and swapped-out pages still count.
        assert_eq!(mm.resident_pages(at((5 << 30) + 4096), 8192), vec![at((5 << 30) + 4096), at((5 << 30) + 8192)]);
        assert_eq!(mm.swap_out(at(5 << 30), 2 << 20).unwrap(), 512);
        assert_eq!(mm.resident_pages(hva, len).len(), 1024);
        mm.madvise_dontneed(at(5 << 30), 2 << 20).unwrap();
        assert_eq!(mm.resident_pages(hva, len).len(), 512);
    }

    #[test]
    fn prefault_beyond_host_memory_is_refused_before_allocating() {
        let mm = mm();
        let size = mm.frames().mem().size();
        let before = mm.frames().counts();
        let free = mm.frames().free_bytes();
        for backing in [Backing::Anon4k, Backing::Thp] {
            let e = mm.mmap(size, backing, true, true).unwrap_err();
            let HostError::PrefaultTooBig { len, needed, free: f, size: s } = e.clone() else { panic!("{e}") };
            assert_eq!((len, f, s), (size, free, size));
            assert!(needed > free, "{e}");
            assert!(e.to_string().contains("host_memory"), "{e}");
        }
        assert_eq!(mm.frames().counts(), before, "nothing was allocated");
        assert_eq!(mm.frames().free_bytes(), free);
        // No VMA was left behind, and the same size without prefault maps lazily.
        let hva = mm.mmap(size, Backing::Anon4k, true, false).unwrap();
        assert_eq!(mm.frames().counts(), before);
        mm.write(hva, 8, 7).unwrap();
        let used = free - mm.frames().free_bytes();
        assert!((2 * 4096..=5 * 4096).contains(&used), "one page and its host page tables: {used} bytes");
    }
}
