//! The one import path for atomics, locks, `Arc`/`Weak`, fences, threads, yields and
//! thread-locals.
//!
//! Every other module of the crate takes its concurrency primitives from here, so that a
//! model checker can replace them in one place. A normal build uses `std` and `parking_lot`;
//! a build with `RUSTFLAGS="--cfg vmmu_loom"` uses [loom](https://docs.rs/loom)'s atomics,
//! locks, fences, threads and thread-locals, which loom then schedules exhaustively
//! (crates/vmmu/tests/loom.rs; run it with `scripts/loom`). The switch is the
//! `cfg(vmmu_loom)` branch below, as crossbeam's `primitive` and tokio's `loom` modules do.
//!
//! Under loom:
//! - locks keep `parking_lot`'s API (no poisoning: `lock()` returns the guard);
//! - `Arc` and `Weak` stay `std`'s (loom's `Arc` has no `Weak`); reference counts are not
//!   part of any protocol a model checks;
//! - the asymmetric barriers ([`barrier`]) become SeqCst fences on both sides, which is what
//!   `membarrier(2)` guarantees;
//! - host memory is a vector of loom atomics ([`crate::host::PhysMem::with_words`]), so SPTE
//!   words are modelled like every other atomic.

#[cfg(not(vmmu_loom))]
mod imp {
    pub use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
    pub use std::hint::spin_loop;
    pub use std::sync::atomic::{
        compiler_fence, fence, AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
    };
    pub use std::sync::{Arc, Weak};
    pub use std::thread_local;

    /// Threads (`std::thread`).
    pub mod thread {
        pub use std::thread::{current, park_timeout, spawn, yield_now, Builder, JoinHandle, Thread};
    }
}

#[cfg(vmmu_loom)]
mod imp {
    pub use loom::hint::spin_loop;
    pub use loom::sync::atomic::{fence, AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
    pub use loom::thread_local;
    pub use std::sync::{Arc, Weak};

    /// A compiler-only fence has no meaning to loom, which models the memory order of every
    /// access; the callers' real ordering comes from the fences and atomics around it.
    pub fn compiler_fence(_: Ordering) {}

    /// Threads (`loom::thread`).
    pub mod thread {
        pub use loom::thread::{current, spawn, yield_now, Builder, JoinHandle, Thread};

        /// `park_timeout`: may return at any time (spurious wake-ups are allowed), so a
        /// yield is a faithful model.
        pub fn park_timeout(_: std::time::Duration) {
            loom::thread::yield_now();
        }
    }

    /// `parking_lot::Mutex`'s API over loom's mutex.
    #[derive(Debug, Default)]
    pub struct Mutex<T>(loom::sync::Mutex<T>);
    /// The guard of [`Mutex`].
    pub type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        /// A new mutex holding `t`.
        pub fn new(t: T) -> Self {
            Mutex(loom::sync::Mutex::new(t))
        }
        /// Locks it.
        pub fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().expect("loom mutexes are not poisoned by vmmu")
        }
        /// Locks it if free.
        pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            self.0.try_lock().ok()
        }
        /// The data, through an exclusive reference.
        pub fn get_mut(&mut self) -> &mut T {
            self.0.get_mut().expect("loom mutexes are not poisoned by vmmu")
        }
        /// The data.
        pub fn into_inner(self) -> T {
            self.0.into_inner().expect("loom mutexes are not poisoned by vmmu")
        }
    }

    /// `parking_lot::RwLock`'s API over loom's lock.
    #[derive(Debug, Default)]
    pub struct RwLock<T>(loom::sync::RwLock<T>);
    /// Shared guard of [`RwLock`].
    pub type RwLockReadGuard<'a, T> = loom::sync::RwLockReadGuard<'a, T>;
    /// Exclusive guard of [`RwLock`].
    pub type RwLockWriteGuard<'a, T> = loom::sync::RwLockWriteGuard<'a, T>;

    impl<T> RwLock<T> {
        /// A new lock holding `t`.
        pub fn new(t: T) -> Self {
            RwLock(loom::sync::RwLock::new(t))
        }
        /// Shared access.
        pub fn read(&self) -> RwLockReadGuard<'_, T> {
            self.0.read().expect("loom locks are not poisoned by vmmu")
        }
        /// Exclusive access.
        pub fn write(&self) -> RwLockWriteGuard<'_, T> {
            self.0.write().expect("loom locks are not poisoned by vmmu")
        }
        /// The data, through an exclusive reference.
        pub fn get_mut(&mut self) -> &mut T {
            self.0.get_mut().expect("loom locks are not poisoned by vmmu")
        }
    }
}

pub use imp::*;

/// Asymmetric memory barriers (Linux `membarrier(2)`), for the vCPU-entry / remote-flush
/// handshake: a vCPU publishes "in guest mode" and then reads its requests with only a
/// compiler barrier ([`light_barrier`]) on every guest operation, and the rare remote TLB
/// flush pays for a full barrier on every thread of the process ([`heavy_barrier`]). Where
/// the system call is unavailable, the light side falls back to a full fence.
#[cfg(not(vmmu_loom))]
pub mod barrier {
    use super::{AtomicU8, Ordering};

    const UNKNOWN: u8 = 0;
    const EXPEDITED: u8 = 1;
    const FENCE: u8 = 2;
    static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);

    const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
    const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

    fn membarrier(cmd: libc::c_long) -> bool {
        // SAFETY: membarrier(2) takes two integers and touches no user memory; an
        // unsupported command or kernel returns -1, which we check.
        unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as libc::c_long, 0 as libc::c_long) == 0 }
    }

    fn state() -> u8 {
        let s = STATE.load(Ordering::Acquire);
        if s != UNKNOWN {
            return s;
        }
        let s = if membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) { EXPEDITED } else { FENCE };
        STATE.store(s, Ordering::Release);
        s
    }

    /// Sets the mechanism up (call before vCPUs run; idempotent).
    pub fn init() {
        state();
    }

    /// The cheap side: orders this thread's earlier stores before its later loads as seen
    /// by a thread that calls [`heavy_barrier`].
    #[inline]
    pub fn light_barrier() {
        if STATE.load(Ordering::Relaxed) == EXPEDITED {
            super::compiler_fence(Ordering::SeqCst);
        } else {
            super::fence(Ordering::SeqCst);
        }
    }

    /// The expensive side: every thread of the process executes a full memory barrier.
    pub fn heavy_barrier() {
        super::fence(Ordering::SeqCst);
        if state() == EXPEDITED && !membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) {
            // Cannot happen after a successful registration; stay safe regardless.
            STATE.store(FENCE, Ordering::Release);
        }
    }

    /// Whether the expedited system call is in use.
    pub fn expedited() -> bool {
        state() == EXPEDITED
    }
}

/// The asymmetric barriers under loom: a SeqCst fence on both sides, which is the ordering
/// `membarrier(2)` provides (every thread executes a full barrier).
#[cfg(vmmu_loom)]
pub mod barrier {
    use super::{fence, Ordering};

    /// Nothing to set up.
    pub fn init() {}

    /// The cheap side.
    #[inline]
    pub fn light_barrier() {
        fence(Ordering::SeqCst);
    }

    /// The expensive side.
    pub fn heavy_barrier() {
        fence(Ordering::SeqCst);
    }

    /// The system call is never used under loom.
    pub fn expedited() -> bool {
        false
    }
}

/// Per-CPU slots: a thread's slot index, for counters and locks that must not bounce one
/// cache line between vCPU threads (Linux's percpu data).
pub mod percpu {
    use super::{AtomicBool, AtomicI64, AtomicU32, AtomicUsize, Mutex, MutexGuard, Ordering};

    /// Number of slots (a power of two); threads beyond it share slots.
    pub const SLOTS: usize = 8;

    #[cfg(not(vmmu_loom))]
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    #[cfg(vmmu_loom)]
    loom::lazy_static! {
        // Per model execution, so slot numbers follow the explored schedule.
        static ref NEXT: AtomicUsize = AtomicUsize::new(0);
    }
    super::thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed) & (SLOTS - 1);
    }

    /// This thread's slot.
    #[inline]
    pub fn slot() -> usize {
        SLOT.with(|s| *s)
    }

    #[repr(align(128))]
    #[derive(Default)]
    struct Padded<T>(T);

    /// A counter summed over per-CPU slots (`percpu_counter`): adds touch only the caller's
    /// cache line; reads add the slots up.
    pub struct PercpuCounter {
        slots: Box<[Padded<AtomicI64>]>,
    }

    impl Default for PercpuCounter {
        fn default() -> Self {
            PercpuCounter { slots: (0..SLOTS).map(|_| Padded::default()).collect() }
        }
    }

    impl std::fmt::Debug for PercpuCounter {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}", self.sum())
        }
    }

    impl PercpuCounter {
        /// Adds `v`.
        #[inline]
        pub fn add(&self, v: i64) {
            self.slots[slot()].0.fetch_add(v, Ordering::Relaxed);
        }

        /// Raises this slot's peak to at least `v` (for peak counters read with [`Self::max`]).
        #[inline]
        pub fn raise(&self, v: i64) {
            self.slots[slot()].0.fetch_max(v, Ordering::Relaxed);
        }

        /// The sum over all slots.
        pub fn sum(&self) -> i64 {
            self.slots.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
        }

        /// The largest slot value (the peak, for counters fed by [`Self::raise`]).
        pub fn max(&self) -> i64 {
            self.slots.iter().map(|s| s.0.load(Ordering::Relaxed)).max().unwrap_or(0)
        }
    }

    /// A reader-writer lock whose readers only touch their own cache line (a "big reader"
    /// lock): what `mmu_lock` needs when faults on every vCPU take it for read and zaps, rarely,
    /// for write.
    pub struct PercpuRwLock {
        readers: Box<[Padded<AtomicU32>]>,
        writer_active: AtomicBool,
        writers: Mutex<()>,
    }

    impl Default for PercpuRwLock {
        fn default() -> Self {
            PercpuRwLock {
                readers: (0..SLOTS).map(|_| Padded::default()).collect(),
                writer_active: AtomicBool::new(false),
                writers: Mutex::new(()),
            }
        }
    }

    /// Shared access; released on drop.
    pub struct ReadGuard<'a> {
        lock: &'a PercpuRwLock,
        slot: usize,
    }

    impl Drop for ReadGuard<'_> {
        fn drop(&mut self) {
            self.lock.readers[self.slot].0.fetch_sub(1, Ordering::Release);
        }
    }

    /// Exclusive access; released on drop.
    pub struct WriteGuard<'a> {
        lock: &'a PercpuRwLock,
        _writers: MutexGuard<'a, ()>,
    }

    impl Drop for WriteGuard<'_> {
        fn drop(&mut self) {
            self.lock.writer_active.store(false, Ordering::SeqCst);
        }
    }

    impl PercpuRwLock {
        /// Takes the lock for read. Not recursive: a thread that holds it for read and reads
        /// again while a writer waits deadlocks (as with parking_lot's `read`); the MMU never
        /// nests `mmu_lock`.
        #[inline]
        pub fn read(&self) -> ReadGuard<'_> {
            let slot = slot();
            loop {
                // SeqCst on both sides: either the writer sees our count, or we see its flag.
                self.readers[slot].0.fetch_add(1, Ordering::SeqCst);
                if !self.writer_active.load(Ordering::SeqCst) {
                    return ReadGuard { lock: self, slot };
                }
                self.readers[slot].0.fetch_sub(1, Ordering::SeqCst);
                while self.writer_active.load(Ordering::Acquire) {
                    super::thread::yield_now();
                }
            }
        }

        /// Takes the lock for write: waits until no reader holds it.
        pub fn write(&self) -> WriteGuard<'_> {
            let w = self.writers.lock();
            self.writer_active.store(true, Ordering::SeqCst);
            for r in self.readers.iter() {
                let mut spins = 0u32;
                while r.0.load(Ordering::SeqCst) != 0 {
                    spins += 1;
                    if spins > 64 {
                        super::thread::yield_now();
                    } else {
                        super::spin_loop();
                    }
                }
            }
            WriteGuard { lock: self, _writers: w }
        }
    }

    #[cfg(all(test, not(vmmu_loom)))]
    mod tests {
        use super::*;
        use std::sync::Arc;

        #[test]
        fn counter_sums_across_threads() {
            let c = Arc::new(PercpuCounter::default());
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let c = c.clone();
                    std::thread::spawn(move || {
                        for _ in 0..1000 {
                            c.add(1);
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            assert_eq!(c.sum(), 4000);
            let p = PercpuCounter::default();
            p.raise(5);
            p.raise(3);
            assert_eq!(p.max(), 5);
        }

        #[test]
        fn writers_exclude_readers() {
            let l = Arc::new(PercpuRwLock::default());
            let v = Arc::new(AtomicI64::new(0));
            let hs: Vec<_> = (0..4)
                .map(|i| {
                    let (l, v) = (l.clone(), v.clone());
                    std::thread::spawn(move || {
                        for _ in 0..2000 {
                            if i == 0 {
                                let _w = l.write();
                                // Readers never see the odd intermediate value.
                                v.fetch_add(1, Ordering::Relaxed);
                                v.fetch_add(1, Ordering::Relaxed);
                            } else {
                                let _r = l.read();
                                assert_eq!(v.load(Ordering::Relaxed) % 2, 0);
                            }
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            assert_eq!(v.load(Ordering::Relaxed), 4000);
        }
    }
}
