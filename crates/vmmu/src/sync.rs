//! The one import path for atomics and locks.
//!
//! Every other module takes its atomics, locks and `Arc` from here, so that a model checker
//! (loom) can later replace them in one place.

pub use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
pub use std::sync::atomic::{fence, AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
pub use std::sync::{Arc, Weak};

/// Asymmetric memory barriers (Linux `membarrier(2)`), for the vCPU-entry / remote-flush
/// handshake: a vCPU publishes "in guest mode" and then reads its requests with only a
/// compiler barrier ([`light_barrier`]) on every guest operation, and the rare remote TLB
/// flush pays for a full barrier on every thread of the process ([`heavy_barrier`]). Where
/// the system call is unavailable, the light side falls back to a full fence.
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
            std::sync::atomic::compiler_fence(Ordering::SeqCst);
        } else {
            std::sync::atomic::fence(Ordering::SeqCst);
        }
    }

    /// The expensive side: every thread of the process executes a full memory barrier.
    pub fn heavy_barrier() {
        std::sync::atomic::fence(Ordering::SeqCst);
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
