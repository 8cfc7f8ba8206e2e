//! The MMU (arch/x86/kvm/mmu): one file per mechanism, named as KVM names them.
//!
//! - [`spte`]: SPTE bits and `make_spte`;
//! - [`tdp_iter`]: the pre-order walk over a TDP paging structure;
//! - [`tdp_mmu`]: TDP MMU roots, `kvm_tdp_mmu_map`, atomic SPTE updates, zapping;
//! - [`page_fault`]: `kvm_mmu_page_fault` -> `kvm_mmu_do_page_fault` -> `kvm_tdp_page_fault`,
//!   `kvm_faultin_pfn`, `is_page_fault_stale`, `kvm_mmu_hugepage_adjust`;
//! - [`fast_pf`]: the lockless `fast_page_fault`;
//! - [`mmio`]: MMIO SPTEs and `handle_mmio_page_fault`;
//! - [`mmu_notifier`]: the host's invalidations turned into zaps;
//! - [`audit`]: SPTE invariants checked against memslots and the host page table.
//!
//! The MMU reaches guest memory only through memslots and the hardware's TLB only through
//! flush requests.

pub mod audit;
pub mod fast_pf;
pub mod mmio;
#[allow(clippy::module_inception)] // KVM's arch/x86/kvm/mmu/mmu.c: the MMU-wide file is named as KVM names it.
pub mod mmu;
pub mod mmu_notifier;
pub mod nx_huge_pages;
pub mod page;
pub mod page_fault;
pub mod page_track;
pub mod paging_tmpl;
pub mod pte_list;
pub mod rmap;
pub mod role;
pub mod shadow;
pub mod spte;
pub mod tdp_iter;
pub mod tdp_mmu;

use crate::sync::percpu::{PercpuCounter, PercpuRwLock};
use crate::sync::{AtomicU64, Mutex};
use spte::SpteMasks;
use x86_paging::addr::Pfn;

pub use page_fault::{KvmPageFault, RetPf};

/// Errors the MMU returns to the vCPU (what makes KVM_RUN fail).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MmuError {
    /// The host could not provide a frame for a page table or a guest page.
    #[error("out of host memory while handling a fault at gpa {gpa:#x}: {source}")]
    OutOfMemory {
        /// Faulting gpa.
        gpa: u64,
        /// What the host refused.
        #[source]
        source: crate::host::HostError,
    },
    /// A guest configuration this build's MMU does not handle yet.
    #[error("not implemented: {0}")]
    Unsupported(String),
    /// The memslot's host memory is gone (KVM_EXIT_MEMORY_FAULT / -EFAULT).
    #[error("memory fault at gpa {gpa:#x}: the memslot's host address {hva:#x} is not mapped")]
    MemoryFault {
        /// Faulting gpa.
        gpa: u64,
        /// The host address.
        hva: u64,
    },
}

/// The VM-wide MMU state (`kvm->arch` MMU fields and `kvm->mmu_lock`).
pub struct KvmMmu {
    /// Which MMU this VM runs (see [`mmu`] for the questions it answers).
    kind: crate::vm::MmuKind,
    /// SPTE format of this VM.
    pub masks: SpteMasks,
    /// `mmu_lock`: taken for read by TDP MMU faults, for write by zaps.
    pub mmu_lock: PercpuRwLock,
    /// `tdp_mmu_roots`.
    pub roots: Mutex<Vec<crate::sync::Arc<tdp_mmu::TdpRoot>>>,
    /// `mmu_invalidate_seq`.
    pub mmu_invalidate_seq: AtomicU64,
    /// `mmu_invalidate_in_progress`.
    pub mmu_invalidate_in_progress: AtomicU64,
    /// `mmu_invalidate_range_start` (gfn).
    pub mmu_invalidate_range_start: AtomicU64,
    /// `mmu_invalidate_range_end` (gfn).
    pub mmu_invalidate_range_end: AtomicU64,
    /// `mmu_valid_gen`.
    pub mmu_valid_gen: AtomicU64,
    /// `indirect_shadow_pages`: shadow pages that shadow a guest page table. Changed under
    /// `mmu_lock` held for write; read without it by `kvm_mmu_track_write`, which has nothing
    /// to do while it is zero.
    pub indirect_shadow_pages: AtomicU64,
    /// `tdp_mmu_pages`: TDP page-table pages in use.
    pub tdp_mmu_pages: PercpuCounter,
    /// Page-table frames unlinked but possibly still seen by lockless walkers; freed after
    /// the next remote TLB flush that waited for every vCPU (our stand-in for RCU; see
    /// docs/decisions/0002-deferred-free.md).
    pub deferred_free: Mutex<Vec<Pfn>>,
    /// Page-track notifiers (`kvm->arch.track_notifier_head`).
    pub page_track_notifiers: page_track::PageTrackNotifiers,
    /// The shadow MMU's state (taken while holding `mmu_lock` for write).
    pub shadow: Mutex<shadow::ShadowMmu>,
    /// The all-non-present page the hardware runs on before a shadow root exists.
    pub shadow_dummy_root: Mutex<Option<Pfn>>,
    /// `possible_nx_huge_pages` and the TDP tables' `nx_huge_page_disallowed` flags.
    pub nx_huge_pages: Mutex<nx_huge_pages::NxHugePages>,
}

impl KvmMmu {
    /// A fresh MMU of kind `kind` with the SPTE format `masks`.
    pub fn new(kind: crate::vm::MmuKind, masks: SpteMasks) -> Self {
        KvmMmu {
            kind,
            masks,
            mmu_lock: PercpuRwLock::default(),
            roots: Mutex::new(Vec::new()),
            mmu_invalidate_seq: AtomicU64::new(0),
            mmu_invalidate_in_progress: AtomicU64::new(0),
            mmu_invalidate_range_start: AtomicU64::new(u64::MAX),
            mmu_invalidate_range_end: AtomicU64::new(u64::MAX),
            mmu_valid_gen: AtomicU64::new(0),
            indirect_shadow_pages: AtomicU64::new(0),
            tdp_mmu_pages: PercpuCounter::default(),
            deferred_free: Mutex::new(Vec::new()),
            page_track_notifiers: page_track::PageTrackNotifiers::default(),
            shadow: Mutex::new(shadow::ShadowMmu::default()),
            shadow_dummy_root: Mutex::new(None),
            nx_huge_pages: Mutex::new(nx_huge_pages::NxHugePages::default()),
        }
    }
}
