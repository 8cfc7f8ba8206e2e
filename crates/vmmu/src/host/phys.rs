//! Host physical memory: every host frame's real bytes, as 64-bit atomic words.
//!
//! Two backends sit behind one word API ([`PhysMem::word`]):
//! - the **arena** ([`PhysMem::new`]): a single anonymous `MAP_NORESERVE` mapping, so declaring
//!   a large host costs only the frames that are touched;
//! - **words** ([`PhysMem::with_words`]): a vector of atomics from [`crate::sync`], allocated
//!   up front — for small hosts, and the only backend under `--cfg vmmu_loom`, where the
//!   atomics are loom's and every SPTE or guest-table word is modelled.
//!
//! Every access goes through atomics, because guest data, SPTE tables and guest page tables
//! are shared between vCPU threads exactly as RAM is shared between CPUs. This module holds
//! the only `unsafe` code of the host model.

use super::{ArenaMapError, HostError};
use crate::sync::{AtomicU64, Ordering};
use x86_paging::addr::{Hpa, Pfn};

/// Size of a 4 KiB frame.
pub const FRAME_SIZE: u64 = 4096;
/// Size of a 2 MiB compound frame.
pub const HUGE_FRAME_SIZE: u64 = 2 << 20;

/// The host's physical memory: `size` bytes of frames, addressed by host physical address.
pub struct PhysMem {
    /// The word at host physical address 0; word `i` is at `base + i` (either backend).
    base: *const AtomicU64,
    size: u64,
    /// What owns the words (and frees them on drop).
    store: Store,
}

/// The owner of host memory's words.
enum Store {
    /// An anonymous mapping starting at `base` (unmapped on drop).
    #[cfg(not(vmmu_loom))]
    Arena,
    /// A vector of atomics; `base` points at its first element, which does not move.
    Words(#[allow(dead_code)] Box<[AtomicU64]>),
}

// SAFETY: the memory is only ever accessed through `AtomicU64` references (see `word`), which
// are `Sync`; the base pointer itself is never mutated after construction.
unsafe impl Send for PhysMem {}
// SAFETY: as above — shared access is through atomics only.
unsafe impl Sync for PhysMem {}

impl PhysMem {
    /// Host memory of `size` bytes (rounded up to 4 KiB) as a vector of atomics, all zero:
    /// allocated up front, so meant for small hosts (tests, loom models).
    pub fn with_words(size: u64) -> Result<Self, HostError> {
        let size = size.div_ceil(FRAME_SIZE).saturating_mul(FRAME_SIZE);
        let Ok(n) = usize::try_from(size / 8) else {
            return Err(HostError::ArenaMap { size, source: ArenaMapError::TooLarge });
        };
        let words: Box<[AtomicU64]> = (0..n).map(|_| AtomicU64::new(0)).collect();
        let base = words.as_ptr();
        Ok(PhysMem { base, size, store: Store::Words(words) })
    }

    /// Reserves `size` bytes (rounded up to 2 MiB) of host physical address space. Under
    /// `--cfg vmmu_loom` this is [`Self::with_words`].
    #[cfg(vmmu_loom)]
    pub fn new(size: u64) -> Result<Self, HostError> {
        Self::with_words(size)
    }

    /// Reserves `size` bytes (rounded up to 2 MiB) of host physical address space.
    #[cfg(not(vmmu_loom))]
    pub fn new(size: u64) -> Result<Self, HostError> {
        // Over-allocate by 2 MiB so the arena can start on a huge-page boundary. A size that
        // cannot even be written down as a mapping length is refused like one the OS refuses.
        let Some((size, map_len)) = size
            .div_ceil(HUGE_FRAME_SIZE)
            .checked_mul(HUGE_FRAME_SIZE)
            .and_then(|s| Some((s, usize::try_from(s.checked_add(HUGE_FRAME_SIZE)?).ok()?)))
        else {
            return Err(HostError::ArenaMap { size, source: ArenaMapError::TooLarge });
        };
        // SAFETY: an anonymous private mapping with no fixed address has no preconditions; the
        // result is checked against MAP_FAILED below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            let source = ArenaMapError::Os(crate::sync::Arc::new(std::io::Error::last_os_error()));
            return Err(HostError::ArenaMap { size, source });
        }
        let addr = raw as usize;
        let aligned = addr.next_multiple_of(arena_usize(HUGE_FRAME_SIZE));
        let base = aligned as *mut u8;
        // SAFETY: `base..base+size` lies inside the mapping just created (we over-allocated by
        // one huge page for the alignment). MADV_HUGEPAGE is advisory; failure is harmless.
        unsafe {
            libc::madvise(base.cast(), arena_usize(size), libc::MADV_HUGEPAGE);
        }
        Ok(PhysMem { base: base as *const AtomicU64, size, store: Store::Arena })
    }

    /// Bytes of host physical memory.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of 4 KiB frames.
    pub fn nr_frames(&self) -> u64 {
        self.size / FRAME_SIZE
    }

    /// Whether `hpa..hpa+len` lies inside host memory.
    #[inline]
    pub fn contains(&self, hpa: Hpa, len: u64) -> bool {
        hpa.raw().checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// The 8-byte word containing `hpa` (which is rounded down to 8 bytes).
    ///
    /// # Panics
    /// If `hpa` is outside host memory: every caller holds an address the host model produced
    /// (a frame it allocated), never one a guest chose, so this is an internal invariant.
    #[inline]
    pub fn word(&self, hpa: Hpa) -> &AtomicU64 {
        let off = hpa.raw() & !7;
        assert!(off < self.size, "host physical address {hpa} outside host memory");
        // SAFETY: word `off / 8` is inside host memory (checked above) and both backends hold
        // `size / 8` initialised, aligned `AtomicU64`s from `base` on (the arena's zeroed
        // anonymous pages are valid atomics); the memory lives as long as `self`, and all
        // accesses to it are atomic, so no data race can occur.
        unsafe { &*self.base.add((off / 8) as usize) }
    }

    /// Loads an aligned 64-bit word.
    #[inline]
    pub fn load(&self, hpa: Hpa) -> u64 {
        self.word(hpa).load(Ordering::Acquire)
    }

    /// Stores an aligned 64-bit word.
    #[inline]
    pub fn store(&self, hpa: Hpa, val: u64) {
        self.word(hpa).store(val, Ordering::Release)
    }

    /// Compare-exchange on an aligned 64-bit word; `Err` carries the current value.
    #[inline]
    pub fn cmpxchg(&self, hpa: Hpa, old: u64, new: u64) -> Result<u64, u64> {
        self.word(hpa).compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
    }

    /// Reads `size` (1..=8) bytes at `hpa`, little-endian. The bytes must not cross a page.
    #[inline(always)]
    pub fn read(&self, hpa: Hpa, size: u8) -> u64 {
        debug_assert!((1..=8).contains(&size));
        let off = hpa.raw() & 7;
        if off == 0 && size == 8 {
            return self.load(hpa);
        }
        let lo = self.load(hpa);
        let first = 8 - off;
        let mut v = lo >> (off * 8);
        if u64::from(size) > first {
            let hi = self.load(Hpa::new((hpa.raw() & !7) + 8));
            v |= hi << (first * 8);
        }
        v & mask(size)
    }

    /// Writes `size` (1..=8) bytes at `hpa`, little-endian. Each aligned 8-byte part is
    /// updated atomically, as x86 does for aligned accesses.
    #[inline]
    pub fn write(&self, hpa: Hpa, size: u8, val: u64) {
        debug_assert!((1..=8).contains(&size));
        let off = hpa.raw() & 7;
        if off == 0 && size == 8 {
            return self.store(hpa, val);
        }
        // The bytes that fit in the first word (8 - off of them at most), then the rest.
        let first = size.min(8 - (hpa.raw() & 7) as u8);
        self.merge(Hpa::new(hpa.raw() & !7), off * 8, first, val);
        if size > first {
            self.merge(Hpa::new((hpa.raw() & !7) + 8), 0, size - first, val >> (8 * u32::from(first)));
        }
    }

    fn merge(&self, word: Hpa, shift: u64, bytes: u8, val: u64) {
        let m = mask(bytes) << shift;
        let w = self.word(word);
        let mut cur = w.load(Ordering::Relaxed);
        loop {
            let new = (cur & !m) | ((val << shift) & m);
            match w.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return,
                Err(c) => cur = c,
            }
        }
    }

    /// Fills a 4 KiB frame with zeroes.
    pub fn zero_frame(&self, pfn: Pfn) {
        let base = pfn.hpa().raw();
        for i in 0..512 {
            self.store(Hpa::new(base + i * 8), 0);
        }
    }

    /// Copies one 4 KiB frame to another.
    pub fn copy_frame(&self, from: Pfn, to: Pfn) {
        for i in 0..512 {
            let v = self.load(Hpa::new(from.hpa().raw() + i * 8));
            self.store(Hpa::new(to.hpa().raw() + i * 8), v);
        }
    }

    /// Asks the kernel to back `hpa..hpa+len` with memory now (one `MADV_POPULATE_WRITE`
    /// instead of a real page fault per 4 KiB). Falls back to touching one byte per page.
    pub fn populate(&self, hpa: Hpa, len: u64) {
        assert!(self.contains(hpa, len));
        if matches!(self.store, Store::Words(_)) {
            return; // allocated up front
        }
        // SAFETY: the range is inside the arena (asserted above); MADV_POPULATE_WRITE only
        // faults pages in and does not change their contents.
        let r = unsafe {
            libc::madvise(
                self.base.cast::<u8>().add(arena_usize(hpa.raw())).cast_mut().cast(),
                arena_usize(len),
                23, /* MADV_POPULATE_WRITE */
            )
        };
        if r != 0 {
            let mut a = hpa.raw();
            while a < hpa.raw() + len {
                // An atomic add of zero dirties the page without changing it.
                self.word(Hpa::new(a)).fetch_add(0, Ordering::Relaxed);
                a += FRAME_SIZE;
            }
        }
    }
}

impl Drop for PhysMem {
    fn drop(&mut self) {
        #[cfg(not(vmmu_loom))]
        if matches!(self.store, Store::Arena) {
            // The original mapping started at most one huge page before `base`; unmapping
            // from the aligned base releases everything the arena ever used (the unaligned
            // head stays reserved but was never touched).
            // SAFETY: `base..base+size` is part of our own mapping and no reference into it
            // can outlive `self` (every `&AtomicU64` borrows `self`).
            unsafe {
                libc::munmap(self.base.cast_mut().cast(), arena_usize(self.size));
            }
        }
    }
}

/// An offset or length inside the arena (or a frame size) as the `usize` the OS calls take.
// Lossless: `PhysMem::new` refuses a size whose mapping length a usize cannot hold.
#[allow(clippy::cast_possible_truncation)]
#[inline]
fn arena_usize(x: u64) -> usize {
    x as usize
}

#[inline]
fn mask(bytes: u8) -> u64 {
    if bytes >= 8 {
        u64::MAX
    } else {
        (1u64 << (bytes * 8)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_every_size_and_offset() {
        let m = PhysMem::new(4 << 20).unwrap();
        for size in 1..=8u8 {
            for off in 0..16u64 {
                let hpa = Hpa::new(0x1000 + off);
                m.write(Hpa::new(0x1000), 8, 0);
                m.write(Hpa::new(0x1008), 8, 0);
                let v = 0x1122_3344_5566_7788u64 & mask(size);
                m.write(hpa, size, v);
                assert_eq!(m.read(hpa, size), v, "size {size} off {off}");
                // Neighbouring bytes untouched.
                if off > 0 {
                    assert_eq!(m.read(Hpa::new(0x1000), off.min(8) as u8), 0);
                }
            }
        }
    }

    #[test]
    fn word_backend_behaves_like_the_arena() {
        let a = PhysMem::new(2 << 20).unwrap();
        let w = PhysMem::with_words(2 << 20).unwrap();
        assert_eq!(w.size(), a.size());
        for m in [&a, &w] {
            m.write(Hpa::new(0x1003), 4, 0xdead_beef);
            assert_eq!(m.read(Hpa::new(0x1003), 4), 0xdead_beef);
            assert_eq!(m.load(Hpa::new(0x1000)), 0xdead_beef << 24);
            assert_eq!(m.cmpxchg(Hpa::new(0x2000), 0, 7), Ok(0));
            assert_eq!(m.cmpxchg(Hpa::new(0x2000), 0, 9), Err(7));
            m.copy_frame(Pfn::new(1), Pfn::new(3));
            assert_eq!(m.read(Hpa::new(0x3003), 4), 0xdead_beef);
            m.zero_frame(Pfn::new(3));
            assert_eq!(m.load(Hpa::new(0x3000)), 0);
            m.populate(Hpa::new(0), 0x4000);
            assert!(m.contains(Hpa::new((2 << 20) - 8), 8));
            assert!(!m.contains(Hpa::new(2 << 20), 1));
        }
    }

    #[test]
    fn sparse_huge_arena_is_cheap() {
        // 1 TiB of host physical address space costs nothing until touched.
        let m = PhysMem::new(1 << 40).unwrap();
        m.store(Hpa::new((1 << 40) - 8), 42);
        assert_eq!(m.load(Hpa::new((1 << 40) - 8)), 42);
    }

    /// Found by the scenario fuzz target (`host_memory` near 2^64): the rounding overflowed.
    #[test]
    fn sizes_past_the_address_space_are_refused() {
        for size in [u64::MAX, u64::MAX - (1 << 21), 1 << 63] {
            let e = PhysMem::new(size).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.starts_with("cannot reserve"), "{size:#x}: {e}");
        }
    }

    /// The arena's error keeps its cause typed: a size no mapping length can express, or the
    /// OS's own error, which is the end of the source chain.
    #[cfg(not(vmmu_loom))]
    #[test]
    fn an_arena_error_carries_its_cause() {
        use std::error::Error;
        let too_large = HostError::ArenaMap { size: u64::MAX, source: ArenaMapError::TooLarge };
        assert_eq!(PhysMem::new(u64::MAX).err(), Some(too_large));
        // 2^63 bytes can be asked for, but no x86-64 address space holds them: mmap refuses.
        let e = PhysMem::new(1 << 63).err().expect("mmap of 2^63 bytes fails");
        let HostError::ArenaMap { source: ArenaMapError::Os(os), .. } = &e else { panic!("{e}") };
        assert_eq!(os.raw_os_error(), Some(libc::ENOMEM));
        assert_eq!(e.to_string(), format!("cannot reserve {} bytes of host memory: {os}", 1u64 << 63));
        let io = e.source().and_then(Error::source).and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(io.and_then(std::io::Error::raw_os_error), Some(libc::ENOMEM));
        assert_eq!(e.clone(), e);
        assert_ne!(e, HostError::ArenaMap { size: 1 << 63, source: ArenaMapError::TooLarge });
    }
}
