//! Host physical memory: one sparse arena holding every host frame's real bytes.
//!
//! The arena is a single anonymous `MAP_NORESERVE` mapping, so declaring a large host costs
//! only the frames that are touched. Every access goes through atomics, because guest data,
//! SPTE tables and guest page tables are shared between vCPU threads exactly as RAM is shared
//! between CPUs. This module holds the only `unsafe` code of the host model.

use super::HostError;
use crate::sync::{AtomicU64, Ordering};
use x86_paging::addr::{Hpa, Pfn};

/// Size of a 4 KiB frame.
pub const FRAME_SIZE: u64 = 4096;
/// Size of a 2 MiB compound frame.
pub const HUGE_FRAME_SIZE: u64 = 2 << 20;

/// The host's physical memory: `size` bytes of frames, addressed by host physical address.
pub struct PhysMem {
    base: *mut u8,
    size: u64,
}

// SAFETY: the arena is only ever accessed through `AtomicU64` references (see `word`), which
// are `Sync`; the base pointer itself is never mutated after construction.
unsafe impl Send for PhysMem {}
// SAFETY: as above — shared access is through atomics only.
unsafe impl Sync for PhysMem {}

impl PhysMem {
    /// Reserves `size` bytes (rounded up to 2 MiB) of host physical address space.
    pub fn new(size: u64) -> Result<Self, HostError> {
        // Over-allocate by 2 MiB so the arena can start on a huge-page boundary. A size that
        // cannot even be written down as a mapping length is refused like one the OS refuses.
        let Some((size, map_len)) = size
            .div_ceil(HUGE_FRAME_SIZE)
            .checked_mul(HUGE_FRAME_SIZE)
            .and_then(|s| Some((s, usize::try_from(s.checked_add(HUGE_FRAME_SIZE)?).ok()?)))
        else {
            return Err(HostError::ArenaMap { size, errno: "larger than the address space".into() });
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
            return Err(HostError::ArenaMap { size, errno: std::io::Error::last_os_error().to_string() });
        }
        let addr = raw as usize;
        let aligned = addr.next_multiple_of(HUGE_FRAME_SIZE as usize);
        let base = aligned as *mut u8;
        // SAFETY: `base..base+size` lies inside the mapping just created (we over-allocated by
        // one huge page for the alignment). MADV_HUGEPAGE is advisory; failure is harmless.
        unsafe {
            libc::madvise(base.cast(), size as usize, libc::MADV_HUGEPAGE);
        }
        Ok(PhysMem { base, size })
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
        // SAFETY: `off` is 8-aligned and inside the arena (checked above); the arena lives as
        // long as `self`, and all accesses to it are atomic, so no data race can occur.
        unsafe { &*(self.base.add(off as usize) as *const AtomicU64) }
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
        let first = (8 - off).min(u64::from(size));
        self.merge(Hpa::new(hpa.raw() & !7), off * 8, first as u8, val);
        if u64::from(size) > first {
            let rest = u64::from(size) - first;
            self.merge(Hpa::new((hpa.raw() & !7) + 8), 0, rest as u8, val >> (first * 8));
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
        // SAFETY: the range is inside the arena (asserted above); MADV_POPULATE_WRITE only
        // faults pages in and does not change their contents.
        let r = unsafe {
            libc::madvise(self.base.add(hpa.raw() as usize).cast(), len as usize, 23 /* MADV_POPULATE_WRITE */)
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
        // The original mapping started at most one huge page before `base`; unmapping from the
        // aligned base releases everything the arena ever used (the unaligned head stays
        // reserved but was never touched).
        // SAFETY: `base..base+size` is part of our own mapping and no reference into it can
        // outlive `self` (every `&AtomicU64` borrows `self`).
        unsafe {
            libc::munmap(self.base.cast(), self.size as usize);
        }
    }
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
}
