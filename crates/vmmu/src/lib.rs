//! vmmu: the Linux KVM x86 MMU, re-implemented in user space.
//!
//! Layers, from the bottom (see docs/ARCHITECTURE.md):
//! - [`host`]: host physical memory and the VMM's address space, which raises MMU-notifier
//!   events;
//! - [`hw`]: the software vCPU — registers, TLB, page walks, exits — knowing nothing of the
//!   MMU;
//! - [`memslot`], [`guest_mem`], [`mmu`], [`vm`], [`emulate`]: KVM — memslots, guest-memory
//!   access, the MMU's mechanisms, the VM and vCPU API, the emulator's memory side;
//! - [`stats`], [`trace`]: KVM's statistics and tracepoints.
#![warn(missing_docs)]

pub mod dirty_log;
pub mod emulate;
pub mod guest_mem;
pub mod host;
pub mod hw;
pub mod machine;
pub mod memslot;
pub mod mmio_bus;
pub mod mmu;
mod num;
pub mod stats;
pub mod sync;
pub mod trace;
pub mod vm;

pub use vm::{GuestError, Kvm, ManualDirtyLog, MmuKind, TdpKind, Vcpu, VmConfig, VmError};
pub use x86_paging;
