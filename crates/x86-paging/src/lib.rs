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
//!
//! ```
//! use x86_paging::{walk, Access, Gpa, Gva, NoObserver, PagingState, Pte64, VecMem, WalkOptions};
//!
//! // A 4-level table chain mapping gva 0x4000_1234 -> gpa 0x9000_1234 with a 2 MiB page.
//! let mut mem = VecMem::new(0x10000);
//! let table = |a: u64| Pte64::new(0).with_present(true).with_writable(true).with_user(true).with_addr(a);
//! mem.store_u64(0x1000u64, table(0x2000).raw()).unwrap(); // PML4[0]
//! mem.store_u64(0x2000u64 + 8 * 1, table(0x3000).raw()).unwrap(); // PDPT[1]
//! let leaf = table(0x9000_0000).with_huge(true);
//! mem.store_u64(0x3000u64, leaf.raw()).unwrap(); // PD[0]: 2 MiB page
//!
//! let st = PagingState::long_mode(0x1000);
//! let t = walk(&mut mem, &st, Gva::new(0x4000_1234), &Access::write(3), WalkOptions::ARCH, &mut NoObserver)
//!     .unwrap();
//! assert_eq!(t.gpa, Gpa::new(0x9000_1234));
//! assert_eq!(t.level, 2);
//! // The walk set A on every level and D on the leaf.
//! assert!(Pte64::new(mem.load_u64(0x3000u64).unwrap()).dirty());
//! ```
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
    ept_walk, npt_walk, EptAccess, EptConfig, EptQual, EptTranslation, HostPhys, NptConfig, TdpExit, NPF_GUEST_FINAL,
    NPF_GUEST_PAGE,
};
pub use mem::{OutOfRange, VecMem};
pub use mode::{PagingMode, PagingState, PdptrError};
pub use regs::{cr3_base, cr3_pcid, Cr0, Cr4, Efer, Rflags, CR3_NOFLUSH};
pub use walk::{
    pde_cache_entry, reserved_bits, walk, GuestPhys, NoObserver, Translation, WalkError, WalkObserver, WalkOptions,
    WalkStart, MAX_WALK_RETRIES,
};
pub use walk2d::{
    walk_2d, walk_2d_cached, walk_2d_logged, walk_2d_with, DirtiedGfns, GpaCache, Tdp, Translation2d, Walk2dError,
};

/// The low 32 bits of `v`, for 32-bit paging entries and fields held in a `u64`: the
/// truncation is the point, and the mask makes it explicit.
#[inline]
pub(crate) const fn low32(v: u64) -> u32 {
    (v & 0xffff_ffff) as u32
}

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
