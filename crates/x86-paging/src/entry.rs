//! Typed views of paging-structure entries.
//!
//! Each type wraps the raw entry and offers a getter and a `with_*` builder per
//! field, plus `pub const` masks for every bit. Decoding never fails: reserved
//! bits are a property of the walk (mode, level, MAXPHYADDR), not of the entry.

use core::fmt;

use crate::addr::PageSize;
use crate::{bits, low32};

/// Physical-address bits 51:12 of a 64-bit format entry.
pub const ADDR_MASK_4K: u64 = 0x000f_ffff_ffff_f000;
/// Physical-address bits 51:21 of a 2 MiB leaf.
pub const ADDR_MASK_2M: u64 = 0x000f_ffff_ffe0_0000;
/// Physical-address bits 51:30 of a 1 GiB leaf.
pub const ADDR_MASK_1G: u64 = 0x000f_ffff_c000_0000;

/// Address mask of a 64-bit format entry at `level` (1..=5) with PS = `huge`.
#[inline]
const fn addr_mask(level: u8, huge: bool) -> u64 {
    match (level, huge) {
        (2, true) => ADDR_MASK_2M,
        (3, true) => ADDR_MASK_1G,
        _ => ADDR_MASK_4K,
    }
}

macro_rules! flag {
    ($ty:ident, $get:ident, $with:ident, $mask:expr, $doc:literal) => {
        #[doc = concat!("Whether the ", $doc, " bit is set.")]
        #[inline]
        pub const fn $get(self) -> bool {
            self.0 & $mask != 0
        }

        #[doc = concat!("This entry with the ", $doc, " bit set to `on`.")]
        #[inline]
        #[must_use]
        pub const fn $with(self, on: bool) -> Self {
            if on {
                $ty(self.0 | $mask)
            } else {
                $ty(self.0 & !$mask)
            }
        }
    };
}

macro_rules! raw_impls {
    ($ty:ident, $int:ty) => {
        impl $ty {
            /// Wraps a raw entry.
            #[inline]
            pub const fn new(raw: $int) -> Self {
                $ty(raw)
            }

            /// The raw entry.
            #[inline]
            pub const fn raw(self) -> $int {
                self.0
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($ty), "({:#x})"), self.0)
            }
        }

        impl fmt::LowerHex for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }

        impl From<$int> for $ty {
            #[inline]
            fn from(v: $int) -> Self {
                $ty(v)
            }
        }

        impl From<$ty> for $int {
            #[inline]
            fn from(v: $ty) -> $int {
                v.0
            }
        }
    };
}

/// A 64-bit format entry: PAE PDE/PTE, 4/5-level PML5E..PTE, AMD NPT entries.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Pte64(pub u64);
raw_impls!(Pte64, u64);

impl Pte64 {
    /// P: present.
    pub const PRESENT: u64 = 1 << 0;
    /// R/W: writable.
    pub const WRITABLE: u64 = 1 << 1;
    /// U/S: user-mode accessible.
    pub const USER: u64 = 1 << 2;
    /// PWT: page-level write-through.
    pub const PWT: u64 = 1 << 3;
    /// PCD: page-level cache disable.
    pub const PCD: u64 = 1 << 4;
    /// A: accessed.
    pub const ACCESSED: u64 = 1 << 5;
    /// D: dirty (leaves only).
    pub const DIRTY: u64 = 1 << 6;
    /// PS: page size (maps a large page) at levels 2 and 3.
    pub const HUGE: u64 = 1 << 7;
    /// PAT bit of a 4 KiB PTE (same position as PS).
    pub const PAT_4K: u64 = 1 << 7;
    /// G: global (leaves only).
    pub const GLOBAL: u64 = 1 << 8;
    /// PAT bit of a 2 MiB / 1 GiB leaf.
    pub const PAT_LARGE: u64 = 1 << 12;
    /// Shift of the protection key (bits 62:59).
    pub const PKEY_SHIFT: u32 = 59;
    /// The protection key field.
    pub const PKEY_MASK: u64 = 0xf << 59;
    /// XD / NX: execute disable.
    pub const NX: u64 = 1 << 63;
    /// The address field of a table pointer or 4 KiB leaf (bits 51:12).
    pub const ADDR_MASK: u64 = ADDR_MASK_4K;

    flag!(Pte64, present, with_present, Self::PRESENT, "P (present)");
    flag!(Pte64, writable, with_writable, Self::WRITABLE, "R/W");
    flag!(Pte64, user, with_user, Self::USER, "U/S");
    flag!(Pte64, pwt, with_pwt, Self::PWT, "PWT");
    flag!(Pte64, pcd, with_pcd, Self::PCD, "PCD");
    flag!(Pte64, accessed, with_accessed, Self::ACCESSED, "A (accessed)");
    flag!(Pte64, dirty, with_dirty, Self::DIRTY, "D (dirty)");
    flag!(Pte64, huge, with_huge, Self::HUGE, "PS (page size)");
    flag!(Pte64, global, with_global, Self::GLOBAL, "G (global)");
    flag!(Pte64, nx, with_nx, Self::NX, "XD (execute disable)");

    /// The protection key (bits 62:59).
    #[inline]
    pub const fn pkey(self) -> u8 {
        ((self.0 & Self::PKEY_MASK) >> Self::PKEY_SHIFT) as u8
    }

    /// This entry with protection key `k` (low 4 bits).
    #[inline]
    #[must_use]
    pub const fn with_pkey(self, k: u8) -> Self {
        Pte64((self.0 & !Self::PKEY_MASK) | (((k & 0xf) as u64) << Self::PKEY_SHIFT))
    }

    /// Whether this entry at `level` maps a page (level 1, or PS at level 2/3).
    #[inline]
    pub const fn is_leaf(self, level: u8) -> bool {
        level == 1 || ((level == 2 || level == 3) && self.huge())
    }

    /// The physical address field for an entry at `level`: bits 51:21 for a
    /// 2 MiB leaf, 51:30 for a 1 GiB leaf, else 51:12.
    #[inline]
    pub const fn addr(self, level: u8) -> u64 {
        self.0 & addr_mask(level, self.huge())
    }

    /// This entry with address field `addr` (bits 51:12; callers align large pages).
    #[inline]
    #[must_use]
    pub const fn with_addr(self, addr: u64) -> Self {
        Pte64((self.0 & !ADDR_MASK_4K) | (addr & ADDR_MASK_4K))
    }

    /// The page size of a leaf at `level`.
    #[inline]
    pub const fn page_size(self, level: u8) -> PageSize {
        if self.is_leaf(level) {
            PageSize::for_level(level)
        } else {
            PageSize::Size4K
        }
    }
}

/// A 32-bit paging entry (PDE or PTE).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Pte32(pub u32);
raw_impls!(Pte32, u32);

impl Pte32 {
    /// P: present.
    pub const PRESENT: u32 = 1 << 0;
    /// R/W: writable.
    pub const WRITABLE: u32 = 1 << 1;
    /// U/S: user-mode accessible.
    pub const USER: u32 = 1 << 2;
    /// PWT.
    pub const PWT: u32 = 1 << 3;
    /// PCD.
    pub const PCD: u32 = 1 << 4;
    /// A: accessed.
    pub const ACCESSED: u32 = 1 << 5;
    /// D: dirty (leaves only).
    pub const DIRTY: u32 = 1 << 6;
    /// PS: a 4 MiB page (PDE, with CR4.PSE = 1).
    pub const HUGE: u32 = 1 << 7;
    /// G: global (leaves only).
    pub const GLOBAL: u32 = 1 << 8;
    /// PAT bit of a 4 MiB PDE.
    pub const PAT_LARGE: u32 = 1 << 12;
    /// Address bits 31:12 (table pointer or 4 KiB page).
    pub const ADDR_MASK: u32 = 0xffff_f000;
    /// Address bits 31:22 of a 4 MiB page.
    pub const ADDR_MASK_4M: u32 = 0xffc0_0000;
    /// PSE-36: PDE bits 20:13 hold physical-address bits 39:32 of a 4 MiB page.
    pub const PSE36_MASK: u32 = 0x001f_e000;

    flag!(Pte32, present, with_present, Self::PRESENT, "P (present)");
    flag!(Pte32, writable, with_writable, Self::WRITABLE, "R/W");
    flag!(Pte32, user, with_user, Self::USER, "U/S");
    flag!(Pte32, pwt, with_pwt, Self::PWT, "PWT");
    flag!(Pte32, pcd, with_pcd, Self::PCD, "PCD");
    flag!(Pte32, accessed, with_accessed, Self::ACCESSED, "A (accessed)");
    flag!(Pte32, dirty, with_dirty, Self::DIRTY, "D (dirty)");
    flag!(Pte32, huge, with_huge, Self::HUGE, "PS (page size)");
    flag!(Pte32, global, with_global, Self::GLOBAL, "G (global)");

    /// The address of the next table or 4 KiB page (bits 31:12).
    #[inline]
    pub const fn addr(self) -> u64 {
        (self.0 & Self::ADDR_MASK) as u64
    }

    /// This entry with address bits 31:12 from `addr`.
    #[inline]
    #[must_use]
    pub const fn with_addr(self, addr: u64) -> Self {
        Pte32((self.0 & !Self::ADDR_MASK) | (low32(addr) & Self::ADDR_MASK))
    }

    /// The physical address of a 4 MiB page with PSE-36: bits 31:22 from the
    /// PDE's bits 31:22 and bits 39:32 from its bits 20:13. Bits beyond
    /// MAXPHYADDR are reserved (checked by the walker), not masked here.
    #[inline]
    pub const fn addr_4m(self) -> u64 {
        ((self.0 & Self::ADDR_MASK_4M) as u64) | (((self.0 & Self::PSE36_MASK) as u64) << 19)
    }

    /// This 4 MiB PDE with address `addr` (bits 31:22 and, via PSE-36, 39:32).
    #[inline]
    #[must_use]
    pub const fn with_addr_4m(self, addr: u64) -> Self {
        let low = low32(addr) & Self::ADDR_MASK_4M;
        let high = low32(addr >> 19) & Self::PSE36_MASK;
        Pte32((self.0 & !(Self::ADDR_MASK_4M | Self::PSE36_MASK)) | low | high)
    }
}

/// A PAE page-directory-pointer-table entry (one of the four PDPTE registers).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Pdpte(pub u64);
raw_impls!(Pdpte, u64);

impl Pdpte {
    /// P: present.
    pub const PRESENT: u64 = 1 << 0;
    /// PWT.
    pub const PWT: u64 = 1 << 3;
    /// PCD.
    pub const PCD: u64 = 1 << 4;
    /// Bits that are always reserved (1-2, 5-8, 63); MAXPHYADDR..=62 come on top.
    pub const RESERVED_FIXED: u64 = bits(1, 2) | bits(5, 8) | (1 << 63);
    /// Address of the page directory (bits 51:12).
    pub const ADDR_MASK: u64 = ADDR_MASK_4K;

    flag!(Pdpte, present, with_present, Self::PRESENT, "P (present)");
    flag!(Pdpte, pwt, with_pwt, Self::PWT, "PWT");
    flag!(Pdpte, pcd, with_pcd, Self::PCD, "PCD");

    /// The page directory's address.
    #[inline]
    pub const fn addr(self) -> u64 {
        self.0 & Self::ADDR_MASK
    }

    /// This entry with the page directory at `addr`.
    #[inline]
    #[must_use]
    pub const fn with_addr(self, addr: u64) -> Self {
        Pdpte((self.0 & !Self::ADDR_MASK) | (addr & Self::ADDR_MASK))
    }

    /// The reserved bits for `maxphyaddr` (32..=52).
    #[inline]
    pub const fn reserved_mask(maxphyaddr: u8) -> u64 {
        Self::RESERVED_FIXED | bits(maxphyaddr as u32, 63)
    }
}

/// An EPT paging-structure entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EptEntry(pub u64);
raw_impls!(EptEntry, u64);

impl EptEntry {
    /// Read access.
    pub const READ: u64 = 1 << 0;
    /// Write access.
    pub const WRITE: u64 = 1 << 1;
    /// Execute access (supervisor-mode execute with mode-based execute control).
    pub const EXEC: u64 = 1 << 2;
    /// The R/W/X bits; an entry is present iff any of them is set.
    pub const RWX: u64 = 0x7;
    /// Shift of the EPT memory type (bits 5:3, leaves only).
    pub const MEMTYPE_SHIFT: u32 = 3;
    /// The EPT memory type field.
    pub const MEMTYPE_MASK: u64 = 0x7 << 3;
    /// Ignore PAT memory type (leaves only).
    pub const IGNORE_PAT: u64 = 1 << 6;
    /// Maps a large page (PDE / PDPTE).
    pub const HUGE: u64 = 1 << 7;
    /// Accessed (with EPT A/D enabled).
    pub const ACCESSED: u64 = 1 << 8;
    /// Dirty (leaves, with EPT A/D enabled).
    pub const DIRTY: u64 = 1 << 9;
    /// User-mode execute (mode-based execute control).
    pub const USER_EXEC: u64 = 1 << 10;
    /// Suppress #VE.
    pub const SUPPRESS_VE: u64 = 1 << 63;
    /// Address of the next table or 4 KiB page (bits 51:12).
    pub const ADDR_MASK: u64 = ADDR_MASK_4K;
    /// Memory type: uncacheable.
    pub const MT_UC: u8 = 0;
    /// Memory type: write combining.
    pub const MT_WC: u8 = 1;
    /// Memory type: write through.
    pub const MT_WT: u8 = 4;
    /// Memory type: write protected.
    pub const MT_WP: u8 = 5;
    /// Memory type: write back.
    pub const MT_WB: u8 = 6;

    flag!(EptEntry, readable, with_readable, Self::READ, "read");
    flag!(EptEntry, writable, with_writable, Self::WRITE, "write");
    flag!(EptEntry, executable, with_executable, Self::EXEC, "execute");
    flag!(EptEntry, ignore_pat, with_ignore_pat, Self::IGNORE_PAT, "ignore-PAT");
    flag!(EptEntry, huge, with_huge, Self::HUGE, "large-page");
    flag!(EptEntry, accessed, with_accessed, Self::ACCESSED, "accessed");
    flag!(EptEntry, dirty, with_dirty, Self::DIRTY, "dirty");
    flag!(EptEntry, user_exec, with_user_exec, Self::USER_EXEC, "user-execute");
    flag!(EptEntry, suppress_ve, with_suppress_ve, Self::SUPPRESS_VE, "suppress-#VE");

    /// Whether any of R/W/X is set.
    #[inline]
    pub const fn present(self) -> bool {
        self.0 & Self::RWX != 0
    }

    /// The EPT memory type (bits 5:3).
    #[inline]
    pub const fn memtype(self) -> u8 {
        ((self.0 & Self::MEMTYPE_MASK) >> Self::MEMTYPE_SHIFT) as u8
    }

    /// This entry with memory type `mt` (low 3 bits).
    #[inline]
    #[must_use]
    pub const fn with_memtype(self, mt: u8) -> Self {
        EptEntry((self.0 & !Self::MEMTYPE_MASK) | (((mt & 7) as u64) << Self::MEMTYPE_SHIFT))
    }

    /// Whether this entry at `level` maps a page (level 1, or bit 7 at level 2/3).
    #[inline]
    pub const fn is_leaf(self, level: u8) -> bool {
        level == 1 || ((level == 2 || level == 3) && self.huge())
    }

    /// The physical address field for an entry at `level` (see [`Pte64::addr`]).
    #[inline]
    pub const fn addr(self, level: u8) -> u64 {
        self.0 & addr_mask(level, self.huge())
    }

    /// This entry with address field `addr` (bits 51:12).
    #[inline]
    #[must_use]
    pub const fn with_addr(self, addr: u64) -> Self {
        EptEntry((self.0 & !ADDR_MASK_4K) | (addr & ADDR_MASK_4K))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pte64_round_trip(p: bool, w: bool, u: bool, pwt: bool, pcd: bool, a: bool, d: bool,
                            ps: bool, g: bool, nx: bool, pkey in 0u8..16, frame in 0u64..(1 << 40),
                            junk in any::<u64>()) {
            let addr = frame << 12;
            // Build from arbitrary junk so every builder must clear as well as set.
            let e = Pte64::new(junk)
                .with_present(p).with_writable(w).with_user(u).with_pwt(pwt).with_pcd(pcd)
                .with_accessed(a).with_dirty(d).with_huge(ps).with_global(g).with_nx(nx)
                .with_pkey(pkey).with_addr(addr);
            prop_assert_eq!((e.present(), e.writable(), e.user(), e.pwt(), e.pcd()), (p, w, u, pwt, pcd));
            prop_assert_eq!((e.accessed(), e.dirty(), e.huge(), e.global(), e.nx()), (a, d, ps, g, nx));
            prop_assert_eq!(e.pkey(), pkey);
            prop_assert_eq!(e.addr(1), addr);
            prop_assert_eq!(e.addr(4), addr);
            if ps {
                prop_assert_eq!(e.addr(2), addr & ADDR_MASK_2M);
                prop_assert_eq!(e.addr(3), addr & ADDR_MASK_1G);
            } else {
                prop_assert_eq!(e.addr(2), addr);
                prop_assert_eq!(e.addr(3), addr);
            }
            // Untouched bits survive (9-11 and 52-58).
            prop_assert_eq!(e.raw() & (bits(9, 11) | bits(52, 58)), junk & (bits(9, 11) | bits(52, 58)));
            prop_assert_eq!(Pte64::from(u64::from(e)), e);
        }

        #[test]
        fn pte64_decode_encode(raw: u64) {
            let e = Pte64::new(raw);
            let rebuilt = Pte64::new(0)
                .with_present(e.present()).with_writable(e.writable()).with_user(e.user())
                .with_pwt(e.pwt()).with_pcd(e.pcd()).with_accessed(e.accessed())
                .with_dirty(e.dirty()).with_huge(e.huge()).with_global(e.global())
                .with_nx(e.nx()).with_pkey(e.pkey()).with_addr(e.addr(1));
            let covered = bits(0, 8) | ADDR_MASK_4K | bits(59, 63);
            prop_assert_eq!(rebuilt.raw(), raw & covered);
        }

        #[test]
        fn pte32_round_trip(p: bool, w: bool, u: bool, pwt: bool, pcd: bool, a: bool, d: bool,
                            ps: bool, g: bool, frame in 0u32..(1 << 20), big in 0u64..(1 << 18),
                            junk in any::<u32>()) {
            let e = Pte32::new(junk)
                .with_present(p).with_writable(w).with_user(u).with_pwt(pwt).with_pcd(pcd)
                .with_accessed(a).with_dirty(d).with_huge(ps).with_global(g)
                .with_addr(u64::from(frame) << 12);
            prop_assert_eq!((e.present(), e.writable(), e.user(), e.pwt(), e.pcd()), (p, w, u, pwt, pcd));
            prop_assert_eq!((e.accessed(), e.dirty(), e.huge(), e.global()), (a, d, ps, g));
            prop_assert_eq!(e.addr(), u64::from(frame) << 12);
            let addr4m = big << 22; // up to 40 bits
            let l = Pte32::new(junk).with_addr_4m(addr4m);
            prop_assert_eq!(l.addr_4m(), addr4m);
            prop_assert_eq!(l.raw() & 0x0020_1fff, junk & 0x0020_1fff);
            prop_assert_eq!(Pte32::from(u32::from(e)), e);
        }

        #[test]
        fn pdpte_round_trip(p: bool, pwt: bool, pcd: bool, frame in 0u64..(1 << 40), junk in any::<u64>()) {
            let e = Pdpte::new(junk).with_present(p).with_pwt(pwt).with_pcd(pcd).with_addr(frame << 12);
            prop_assert_eq!((e.present(), e.pwt(), e.pcd()), (p, pwt, pcd));
            prop_assert_eq!(e.addr(), frame << 12);
        }

        #[test]
        fn ept_round_trip(r: bool, w: bool, x: bool, mt in 0u8..8, ipat: bool, ps: bool, a: bool,
                          d: bool, ux: bool, sve: bool, frame in 0u64..(1 << 40), junk in any::<u64>()) {
            let e = EptEntry::new(junk)
                .with_readable(r).with_writable(w).with_executable(x).with_memtype(mt)
                .with_ignore_pat(ipat).with_huge(ps).with_accessed(a).with_dirty(d)
                .with_user_exec(ux).with_suppress_ve(sve).with_addr(frame << 12);
            prop_assert_eq!((e.readable(), e.writable(), e.executable()), (r, w, x));
            prop_assert_eq!(e.present(), r || w || x);
            prop_assert_eq!((e.memtype(), e.ignore_pat(), e.huge()), (mt, ipat, ps));
            prop_assert_eq!((e.accessed(), e.dirty(), e.user_exec(), e.suppress_ve()), (a, d, ux, sve));
            prop_assert_eq!(e.addr(1), frame << 12);
            prop_assert_eq!(e.is_leaf(2), ps);
            prop_assert_eq!(e.raw() & bits(52, 62), junk & bits(52, 62));
        }
    }

    #[test]
    fn pse36_address_bits() {
        // PDE bit 13 -> physical bit 32, bit 20 -> bit 39.
        assert_eq!(Pte32::new(1 << 13).addr_4m(), 1 << 32);
        assert_eq!(Pte32::new(1 << 20).addr_4m(), 1 << 39);
        assert_eq!(Pte32::new(0xffc0_0000).addr_4m(), 0xffc0_0000);
        // Bit 21 is never an address bit.
        assert_eq!(Pte32::new(1 << 21).addr_4m(), 0);
    }

    #[test]
    fn leafness() {
        let e = Pte64::new(Pte64::HUGE);
        assert!(e.is_leaf(1) && e.is_leaf(2) && e.is_leaf(3) && !e.is_leaf(4));
        assert!(!Pte64::new(0).is_leaf(2));
        assert_eq!(e.page_size(3), PageSize::Size1G);
        assert_eq!(e.page_size(4), PageSize::Size4K);
        assert_eq!(format!("{:?}", Pte64::new(0x23)), "Pte64(0x23)");
        assert_eq!(Pdpte::reserved_mask(36), Pdpte::RESERVED_FIXED | bits(36, 63));
    }
}
