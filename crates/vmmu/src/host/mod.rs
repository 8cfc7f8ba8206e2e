//! The host: host physical memory and the VMM's address space.
//!
//! This layer plays the part of the Linux host kernel under KVM: frames with real bytes
//! ([`phys`], [`frames`]), and the VMM process's address space — VMAs, a real x86 host page
//! table mapping hva -> pfn, get_user_pages, THP — which raises MMU-notifier events when a
//! mapping changes ([`mm`], [`notifier`]). It knows nothing of KVM.

pub mod frames;
pub mod mm;
pub mod notifier;
pub mod phys;

pub use frames::FrameAllocator;
pub use mm::{Backing, HostMm, HostPage, Hva, KsmStats};
pub use notifier::{HvaRange, MmuNotifier, MmuNotifyEvent};
pub use phys::PhysMem;

/// Errors of the host model.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum HostError {
    /// The arena could not be reserved.
    #[error("cannot reserve {size} bytes of host memory: {errno}")]
    ArenaMap {
        /// Requested size.
        size: u64,
        /// The OS error.
        errno: String,
    },
    /// Host physical memory is exhausted.
    #[error("host memory exhausted ({size} bytes); declare a larger host with `host_memory`")]
    OutOfMemory {
        /// Size of host memory.
        size: u64,
    },
    /// A prefaulted mapping (MAP_POPULATE) larger than the host memory left: refused before
    /// any page is allocated.
    #[error(
        "prefault of {len} bytes needs {needed} bytes of host memory (pages and page tables) but only {free} of the host's {size} bytes are free; declare a larger host with `host_memory` or drop `prefault`"
    )]
    PrefaultTooBig {
        /// Mapping length.
        len: u64,
        /// Host memory the prefault would take, page tables included.
        needed: u64,
        /// Host memory free.
        free: u64,
        /// Size of host memory.
        size: u64,
    },
    /// No VMA covers the address (get_user_pages would return -EFAULT).
    #[error("no mapping at hva {0:#x}")]
    BadAddress(u64),
    /// A write to a read-only VMA.
    #[error("hva {0:#x} is mapped read-only")]
    ReadOnly(u64),
    /// A request with a bad length or alignment.
    #[error("invalid mapping request: {0}")]
    Invalid(String),
}
