//! vmmu-kvm runs vmmu's workloads on the real `/dev/kvm` and reads KVM's own statistics, so
//! that what the model says can be checked against the kernel on the same workload (issue 5,
//! `vmmu compare`).
//!
//! - [`HostKind`]: what kind of KVM host this is (VMX/SVM with EPT/NPT and the TDP MMU, or
//!   shadow paging, e.g. the PVM vendor module).
//! - [`StatsFd`]: a safe reader for `KVM_GET_STATS_FD` (the binary statistics of a VM or
//!   vCPU), by KVM's names (`pf_fixed`, `pf_taken`, `mmu_shadow_zapped`, `pages_4k`, ...).
//! - [`WorkloadSpec`]: guest regions, page-table roots and phases of operations; the four
//!   workloads of issue 5 are [`WorkloadSpec::first_touch`], [`WorkloadSpec::write_after_read`],
//!   [`WorkloadSpec::pte_rewrite`] and [`WorkloadSpec::cr3_switch`].
//! - [`run_workload`]: builds a 64-bit guest (page tables in guest memory with U/S at every
//!   level, a GDT/TSS/IDT, code from iced-x86's assembler), runs it at CPL3, and returns per
//!   phase the statistics deltas and wall time ([`KvmRun`]).
//! - [`run_workload_traced`]: the same with the real KVM's `kvmmmu` tracepoints captured from
//!   tracefs per phase ([`tracefs`]).
//!
//! # Why the guest runs at CPL3
//!
//! The host this was written on is KVM with the PVM vendor module (`kvm_pvm` loaded, no
//! `vmx`/`svm` CPU flag, `kvm.tdp_mmu=N`, the `hypervisor` flag set: it is itself a guest).
//! There, guest code at CPL0 is emulated instruction by instruction and its memory accesses
//! take no shadow page faults; only CPL3 code runs natively under KVM's shadow page tables.
//! So the workload runs at CPL3 (U/S set at every paging level), ends each phase with an
//! `out` allowed by the TSS I/O permission bitmap (a KVM_EXIT_IO), and reaches ring 0 only
//! through `ud2`: the #UD handler does the `invlpg` or `mov cr3` asked for in RAX/RDI, skips
//! the `ud2` and returns with `iretq`. Any other exception is reported as
//! [`KvmError::GuestException`]. Skipping the `ud2` means the handler writes the exception
//! frame (`add qword [rsp], 2`), and on PVM that ring-0 write is emulated, so KVM counts it in
//! `mmu_pte_write` (which counts every emulated guest write once the VM has shadow pages, not
//! only writes to page tables): one per round trip. [`KernelEntry::Int3`] enters through a
//! DPL-3 #BP gate instead; #BP is a trap, so its handler writes no memory.
//!
//! # Oracles
//!
//! After a run the backend checks the guest against its own model of the workload: the
//! sequence number the last write to each frame stored, the A/D bits of every region leaf PTE
//! (KVM sets them in guest memory under shadow paging), and `KVM_TRANSLATE` for the first,
//! middle and last page of each region and for the code.

#![deny(missing_docs)]

mod error;
mod guest;
mod host;
mod run;
mod spec;
mod stats;
mod sys;
pub mod tracefs;

pub use error::KvmError;
pub use guest::{check_spec, PT_POOL_PAGES};
pub use host::{HostKind, Paging, Vendor};
pub use run::{kvm_available, run_workload, run_workload_traced, KvmPhase, KvmRun, Translation};
pub use spec::{Access, KernelEntry, Op, PhaseSpec, RegionSpec, WorkloadSpec, DATA_GPA, PAGE, REGION_GVA};
pub use stats::{StatDesc, StatKind, StatValue, StatsFd, StatsLayout, StatsSnapshot};
pub use tracefs::{KvmTrace, TraceEvent, TraceSession};
