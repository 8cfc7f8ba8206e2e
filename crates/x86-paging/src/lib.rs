//! The x86 paging architecture, as software.
//!
//! This crate models everything the processor does when it turns a linear
//! address into a physical one, independent of any hypervisor:
//!
//! * [`addr`]: address newtypes ([`Gva`], [`Gpa`], [`Gfn`], [`Hpa`], [`Pfn`]) and [`PageSize`];
//! * [`regs`]: the control registers that steer paging ([`Cr0`], [`Cr4`], [`Efer`], [`Rflags`]);
//! * [`mode`]: the paging modes and the [`PagingState`] snapshot a walk runs against;
//! * [`access`]: access kinds, the `#PF` error code and the permission rules ([`check_access`]);
//! * [`entry`]: typed views of every paging-structure entry format;
//! * [`walk`](mod@walk): the guest page walker for every paging mode;
//! * [`ept`]: the EPT walk and the AMD NPT walk (the "TDP" walks);
//! * [`walk2d`](mod@walk2d): the two-dimensional walk (guest walk nested in a TDP walk);
//! * [`mem`]: [`VecMem`], a flat memory for tests and examples.
//!
//! Nothing here allocates on a walk path, and no guest-controlled byte can make
//! a walk panic or loop forever: walks are bounded by the number of levels and
//! by [`MAX_WALK_RETRIES`] restarts after a lost A/D race.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod access;
pub mod addr;
pub mod entry;
pub mod ept;
pub mod mem;
pub mod mode;
pub mod regs;
pub mod walk;
pub mod walk2d;

#[cfg(test)]
mod testutil;

pub use access::{check_access, Access, AccessKind, PagePerms, PfErrorCode};
pub use addr::{Gfn, Gpa, Gva, Hpa, PageSize, Pfn, PAGE_SHIFT, PAGE_SIZE};
pub use entry::{EptEntry, Pdpte, Pte32, Pte64};
pub use ept::{
    ept_walk, npt_walk, EptAccess, EptConfig, EptQual, EptTranslation, HostPhys, NptConfig, TdpExit,
};
pub use mem::{OutOfRange, VecMem};
pub use mode::{PagingMode, PagingState, PdptrError};
pub use regs::{cr3_base, cr3_pcid, Cr0, Cr4, Efer, Rflags, CR3_NOFLUSH};
pub use walk::{
    walk, GuestPhys, NoObserver, Translation, WalkError, WalkObserver, WalkOptions,
    MAX_WALK_RETRIES,
};
pub use walk2d::{walk_2d, Tdp, Translation2d, Walk2dError};

/// A mask with bits `lo..=hi` set (empty when `lo > hi`; `hi` is clamped to 63).
#[inline]
pub(crate) const fn bits(lo: u32, hi: u32) -> u64 {
    let hi = if hi > 63 { 63 } else { hi };
    if lo > hi {
        0
    } else {
        (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
    }
}
