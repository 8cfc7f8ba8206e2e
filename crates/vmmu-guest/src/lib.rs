//! The guest side of vmmu: page-table layouts a VMM builds before boot, a guest kernel model
//! that builds its own page tables with ordinary stores and demand-pages its processes, and
//! the workloads that drive it.
//!
//! The guest reaches the machine only through [`vmmu::machine::GuestCpu`] operations; the
//! only writes behind the MMU's back are the VMM's, before the guest runs ([`boot::BootMem`]).
#![warn(missing_docs)]

pub mod boot;
pub mod kernel;
pub mod pagetable;
pub mod replay;
pub mod workload;

pub use kernel::{GuestKernel, KernelError};
pub use workload::{Workload, WorkloadStats};
