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

use crate::sync::Arc;

/// Errors of the host model.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum HostError {
    /// The arena could not be reserved.
    #[error("cannot reserve {size} bytes of host memory: {source}")]
    ArenaMap {
        /// Requested size.
        size: u64,
        /// Why.
        source: ArenaMapError,
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

/// Why host memory ([`PhysMem`]) could not be reserved: the cause of [`HostError::ArenaMap`].
///
/// Cloneable and comparable like [`HostError`], which embeds it: the OS error is shared
/// behind an `Arc`, and two OS errors are equal when their kind and message are.
#[derive(Debug, Clone)]
pub enum ArenaMapError {
    /// The size (with the alignment slack) cannot be expressed as a length in this host's
    /// address space.
    TooLarge,
    /// The OS refused the mapping (`mmap` failed); the error is the source.
    Os(Arc<std::io::Error>),
}

impl std::fmt::Display for ArenaMapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArenaMapError::TooLarge => f.write_str("larger than the address space"),
            // As the workspace's errors do, the message includes its source's.
            ArenaMapError::Os(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ArenaMapError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ArenaMapError::TooLarge => None,
            ArenaMapError::Os(e) => Some(&**e),
        }
    }
}

impl PartialEq for ArenaMapError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ArenaMapError::TooLarge, ArenaMapError::TooLarge) => true,
            (ArenaMapError::Os(a), ArenaMapError::Os(b)) => {
                Arc::ptr_eq(a, b) || (a.kind() == b.kind() && a.to_string() == b.to_string())
            }
            _ => false,
        }
    }
}

// Reflexive: an error's kind and message are always equal to themselves.
impl Eq for ArenaMapError {}
