//! The one import path for atomics and locks.
//!
//! Every other module takes its atomics, locks and `Arc` from here, so that a model checker
//! (loom) can later replace them in one place.

pub use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
pub use std::sync::atomic::{fence, AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
pub use std::sync::{Arc, Weak};
