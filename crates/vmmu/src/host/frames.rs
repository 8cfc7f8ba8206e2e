//! The host's page allocator: 4 KiB frames and 2 MiB compound frames out of [`PhysMem`].
//!
//! Frames are carved from 2 MiB chunks; each chunk is populated with one
//! `MADV_POPULATE_WRITE` (one huge page when the host kernel has THP), so a frame allocation
//! never costs a real kernel page fault per 4 KiB. Freed frames are zeroed and reused.

use super::phys::{PhysMem, FRAME_SIZE, HUGE_FRAME_SIZE};
use super::HostError;
use crate::sync::{Arc, AtomicU64, Mutex, Ordering};
use x86_paging::addr::Pfn;

const FRAMES_PER_CHUNK: u64 = HUGE_FRAME_SIZE / FRAME_SIZE;

/// What the allocator has handed out, for overhead accounting.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FrameCounts {
    /// 4 KiB frames in use.
    pub frames_4k: u64,
    /// 2 MiB compound frames in use.
    pub frames_2m: u64,
    /// 2 MiB chunks populated from the host kernel so far.
    pub chunks_populated: u64,
}

struct Pool {
    /// Next never-used 2 MiB chunk (as a pfn).
    next_chunk: u64,
    /// The chunk 4 KiB frames are currently carved from: (first pfn, frames used).
    carving: Option<(u64, u64)>,
    free_4k: Vec<Pfn>,
    free_2m: Vec<Pfn>,
    /// 2 MiB frames split into 4 KiB frames ([`FrameAllocator::split_2m`]), by first pfn:
    /// how many of their 512 frames are in use. When none is, the buddy allocator's merge
    /// makes them one free 2 MiB frame again.
    split: std::collections::HashMap<u64, u64>,
}

/// Allocates host frames.
pub struct FrameAllocator {
    mem: Arc<PhysMem>,
    pool: Mutex<Pool>,
    frames_4k: AtomicU64,
    frames_2m: AtomicU64,
    chunks: AtomicU64,
    zero_pfn: Pfn,
    huge_zero_pfn: Pfn,
}

impl FrameAllocator {
    /// Creates an allocator over `size` bytes of host memory. Two special frames are
    /// reserved: the shared zero page and the huge zero page.
    pub fn new(size: u64) -> Result<Self, HostError> {
        let mem = Arc::new(PhysMem::new(size.max(8 * HUGE_FRAME_SIZE))?);
        let mut a = FrameAllocator {
            mem,
            pool: Mutex::new(Pool {
                next_chunk: 0,
                carving: None,
                free_4k: Vec::new(),
                free_2m: Vec::new(),
                split: std::collections::HashMap::new(),
            }),
            frames_4k: AtomicU64::new(0),
            frames_2m: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            zero_pfn: Pfn::new(0),
            huge_zero_pfn: Pfn::new(0),
        };
        a.huge_zero_pfn = a.alloc_2m()?;
        a.zero_pfn = a.alloc_4k()?;
        a.frames_4k.store(0, Ordering::Relaxed);
        a.frames_2m.store(0, Ordering::Relaxed);
        Ok(a)
    }

    /// The host physical memory the frames live in.
    #[inline]
    pub fn mem(&self) -> &Arc<PhysMem> {
        &self.mem
    }

    /// The shared zero page (mapped read-only on read faults of untouched memory).
    pub fn zero_pfn(&self) -> Pfn {
        self.zero_pfn
    }

    /// The huge zero page (2 MiB of zeroes for read faults on THP memory).
    pub fn huge_zero_pfn(&self) -> Pfn {
        self.huge_zero_pfn
    }

    /// Whether `pfn` lies in one of the zero pages.
    pub fn is_zero_pfn(&self, pfn: Pfn) -> bool {
        pfn == self.zero_pfn || (pfn.raw() & !(FRAMES_PER_CHUNK - 1)) == self.huge_zero_pfn.raw()
    }

    fn take_chunk(&self, pool: &mut Pool) -> Result<u64, HostError> {
        let first = pool.next_chunk * FRAMES_PER_CHUNK;
        if (first + FRAMES_PER_CHUNK) * FRAME_SIZE > self.mem.size() {
            return Err(HostError::OutOfMemory { size: self.mem.size() });
        }
        pool.next_chunk += 1;
        self.mem.populate(Pfn::new(first).hpa(), HUGE_FRAME_SIZE);
        self.chunks.fetch_add(1, Ordering::Relaxed);
        Ok(first)
    }

    /// Allocates a zeroed 4 KiB frame.
    pub fn alloc_4k(&self) -> Result<Pfn, HostError> {
        let mut pool = self.pool.lock();
        let pfn = if let Some(p) = pool.free_4k.pop() {
            if let Some(live) = pool.split.get_mut(&(p.raw() & !(FRAMES_PER_CHUNK - 1))) {
                *live += 1;
            }
            p
        } else {
            let (first, used) = match pool.carving {
                Some((f, u)) if u < FRAMES_PER_CHUNK => (f, u),
                _ => (self.take_chunk(&mut pool)?, 0),
            };
            pool.carving = Some((first, used + 1));
            Pfn::new(first + used)
        };
        drop(pool);
        self.frames_4k.fetch_add(1, Ordering::Relaxed);
        Ok(pfn)
    }

    /// Allocates a zeroed, 2 MiB-aligned compound frame (512 consecutive pfns).
    pub fn alloc_2m(&self) -> Result<Pfn, HostError> {
        let mut pool = self.pool.lock();
        let first = match pool.free_2m.pop() {
            Some(p) => p.raw(),
            None => self.take_chunk(&mut pool)?,
        };
        drop(pool);
        self.frames_2m.fetch_add(1, Ordering::Relaxed);
        Ok(Pfn::new(first))
    }

    /// Frees a 4 KiB frame (zeroing it for its next user). The last frame of a split 2 MiB
    /// frame to be freed makes the whole 2 MiB free again.
    pub fn free_4k(&self, pfn: Pfn) {
        debug_assert!(!self.is_zero_pfn(pfn));
        self.mem.zero_frame(pfn);
        let mut pool = self.pool.lock();
        pool.free_4k.push(pfn);
        let chunk = pfn.raw() & !(FRAMES_PER_CHUNK - 1);
        if let Some(live) = pool.split.get_mut(&chunk) {
            *live -= 1;
            if *live == 0 {
                pool.split.remove(&chunk);
                pool.free_4k.retain(|p| p.raw() & !(FRAMES_PER_CHUNK - 1) != chunk);
                pool.free_2m.push(Pfn::new(chunk));
            }
        }
        drop(pool);
        self.frames_4k.fetch_sub(1, Ordering::Relaxed);
    }

    /// Splits the 2 MiB frame at `pfn` into 512 4 KiB frames in use (a THP split): from now
    /// on each is freed with [`FrameAllocator::free_4k`].
    pub fn split_2m(&self, pfn: Pfn) {
        debug_assert!(pfn.raw().is_multiple_of(FRAMES_PER_CHUNK) && !self.is_zero_pfn(pfn));
        self.pool.lock().split.insert(pfn.raw(), FRAMES_PER_CHUNK);
        self.frames_2m.fetch_sub(1, Ordering::Relaxed);
        self.frames_4k.fetch_add(FRAMES_PER_CHUNK, Ordering::Relaxed);
    }

    /// Frees a 2 MiB compound frame.
    pub fn free_2m(&self, pfn: Pfn) {
        debug_assert!(pfn.raw().is_multiple_of(FRAMES_PER_CHUNK) && !self.is_zero_pfn(pfn));
        for i in 0..FRAMES_PER_CHUNK {
            self.mem.zero_frame(Pfn::new(pfn.raw() + i));
        }
        self.pool.lock().free_2m.push(pfn);
        self.frames_2m.fetch_sub(1, Ordering::Relaxed);
    }

    /// Bytes the allocator can still hand out: never-used chunks, the rest of the chunk
    /// being carved, and the free lists.
    pub fn free_bytes(&self) -> u64 {
        let pool = self.pool.lock();
        let chunks = self.mem.size() / HUGE_FRAME_SIZE;
        let unused = chunks.saturating_sub(pool.next_chunk) * HUGE_FRAME_SIZE;
        let carving = pool.carving.map_or(0, |(_, used)| (FRAMES_PER_CHUNK - used) * FRAME_SIZE);
        unused + carving + pool.free_4k.len() as u64 * FRAME_SIZE + pool.free_2m.len() as u64 * HUGE_FRAME_SIZE
    }

    /// Frames in use.
    pub fn counts(&self) -> FrameCounts {
        FrameCounts {
            frames_4k: self.frames_4k.load(Ordering::Relaxed),
            frames_2m: self.frames_2m.load(Ordering::Relaxed),
            chunks_populated: self.chunks.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_zeroed_distinct_and_reused() {
        let a = FrameAllocator::new(64 << 20).unwrap();
        let f1 = a.alloc_4k().unwrap();
        let f2 = a.alloc_4k().unwrap();
        assert_ne!(f1, f2);
        assert!(!a.is_zero_pfn(f1));
        a.mem().store(f1.hpa(), 0xdead);
        a.free_4k(f1);
        let f3 = a.alloc_4k().unwrap();
        assert_eq!(f3, f1);
        assert_eq!(a.mem().load(f3.hpa()), 0);
        let h = a.alloc_2m().unwrap();
        assert_eq!(h.raw() % 512, 0);
        assert_eq!(a.counts().frames_4k, 2);
        assert_eq!(a.counts().frames_2m, 1);
    }

    #[test]
    fn a_split_2m_frame_merges_back_when_all_its_pieces_are_free() {
        let a = FrameAllocator::new(16 * HUGE_FRAME_SIZE).unwrap();
        let h = a.alloc_2m().unwrap();
        a.split_2m(h);
        assert_eq!((a.counts().frames_2m, a.counts().frames_4k), (0, 512));
        for i in 0..511 {
            a.free_4k(Pfn::new(h.raw() + i));
        }
        // One piece still in use: the others are reusable as 4 KiB frames, not as 2 MiB.
        let again = a.alloc_4k().unwrap();
        assert_eq!(again.raw() & !(FRAMES_PER_CHUNK - 1), h.raw());
        a.free_4k(again);
        a.free_4k(Pfn::new(h.raw() + 511));
        assert_eq!((a.counts().frames_2m, a.counts().frames_4k), (0, 0));
        assert_eq!(a.alloc_2m().unwrap(), h, "the buddy merge returned the whole 2 MiB");
    }

    #[test]
    fn exhaustion_is_an_error_not_a_panic() {
        let a = FrameAllocator::new(16 << 20).unwrap();
        let mut n = 0;
        while a.alloc_2m().is_ok() {
            n += 1;
        }
        assert!(n >= 5);
        let mut k = 0;
        let e = loop {
            match a.alloc_4k() {
                Ok(_) => k += 1,
                Err(e) => break e,
            }
        };
        assert!(k < 512, "only the partly used chunk is left");
        assert!(matches!(e, HostError::OutOfMemory { .. }));
    }
}
