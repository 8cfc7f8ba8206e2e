//! Address newtypes and page sizes.
//!
//! Every address space gets its own type so that a guest-physical address can
//! never be handed where a host-physical one is expected. All of them are thin
//! `u64` wrappers that print in hex.

use core::fmt;
use core::ops::Add;

/// log2 of the base page size.
pub const PAGE_SHIFT: u32 = 12;
/// The base page size in bytes (4 KiB).
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

macro_rules! addr_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[repr(transparent)]
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl $name {
            /// Wraps a raw value.
            #[inline]
            pub const fn new(v: u64) -> Self {
                Self(v)
            }

            /// The raw value.
            #[inline]
            pub const fn raw(self) -> u64 {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }

        impl Add<u64> for $name {
            type Output = Self;
            /// Wrapping addition (addresses are modular; a guest value can never panic).
            #[inline]
            fn add(self, rhs: u64) -> Self {
                Self(self.0.wrapping_add(rhs))
            }
        }

        impl From<$name> for u64 {
            #[inline]
            fn from(a: $name) -> u64 {
                a.0
            }
        }
    };
}

addr_type!(
    /// A guest virtual (linear) address.
    Gva
);
addr_type!(
    /// A guest physical address.
    Gpa
);
addr_type!(
    /// A guest page frame number (`gpa >> 12`).
    Gfn
);
addr_type!(
    /// A host physical address.
    Hpa
);
addr_type!(
    /// A host page frame number (`hpa >> 12`).
    Pfn
);

impl Gva {
    /// The offset within the 4 KiB page.
    #[inline]
    pub const fn page_offset(self) -> u64 {
        self.0 & (PAGE_SIZE - 1)
    }

    /// The virtual page number (`gva >> 12`).
    #[inline]
    pub const fn vpn(self) -> u64 {
        self.0 >> PAGE_SHIFT
    }
}

impl Gpa {
    /// The guest frame containing this address.
    #[inline]
    pub const fn gfn(self) -> Gfn {
        Gfn(self.0 >> PAGE_SHIFT)
    }

    /// The offset within the 4 KiB page.
    #[inline]
    pub const fn page_offset(self) -> u64 {
        self.0 & (PAGE_SIZE - 1)
    }
}

/// Bytes per paging-structure entry in every 64-bit format (PAE, 4/5-level, EPT, NPT).
pub const ENTRY_SIZE: u64 = 8;

/// The number of 4 KiB frames a leaf at `level` maps in a 64-bit format table
/// (1 -> 1, 2 -> 512, 3 -> 512^2, ...): KVM's `KVM_PAGES_PER_HPAGE(level)`.
/// `level` 0 is treated as 1.
#[inline]
pub const fn pages_per_level(level: u8) -> u64 {
    let l = if level == 0 { 1 } else { level };
    1u64 << (9 * (l as u32 - 1))
}

impl Gfn {
    /// The address of the first byte of the frame.
    #[inline]
    pub const fn gpa(self) -> Gpa {
        Gpa(self.0 << PAGE_SHIFT)
    }

    /// The first frame of the page a leaf at `level` would map (`gfn_round_for_level`).
    #[inline]
    pub const fn align_down(self, level: u8) -> Gfn {
        Gfn(self.0 & !(pages_per_level(level) - 1))
    }

    /// The frame `n` frames above this one (wrapping, like every address operation).
    #[inline]
    pub const fn offset(self, n: u64) -> Gfn {
        Gfn(self.0.wrapping_add(n))
    }
}

impl Hpa {
    /// The host frame containing this address.
    #[inline]
    pub const fn pfn(self) -> Pfn {
        Pfn(self.0 >> PAGE_SHIFT)
    }

    /// The offset within the 4 KiB page.
    #[inline]
    pub const fn page_offset(self) -> u64 {
        self.0 & (PAGE_SIZE - 1)
    }
}

impl Hpa {
    /// The address of 8-byte entry `index` of the paging structure that starts at this
    /// address (a table's SPTE pointer: `sptep = table + index * 8`).
    #[inline]
    pub const fn entry(self, index: u64) -> Hpa {
        Hpa(self.0.wrapping_add(index.wrapping_mul(ENTRY_SIZE)))
    }

    /// The index of the 8-byte entry this address names within its table.
    #[inline]
    pub const fn entry_index(self) -> u64 {
        self.page_offset() / ENTRY_SIZE
    }

    /// The start of the table (4 KiB frame) this entry address lies in.
    #[inline]
    pub const fn table(self) -> Hpa {
        Hpa(self.0 & !(PAGE_SIZE - 1))
    }
}

impl Pfn {
    /// The address of the first byte of the frame.
    #[inline]
    pub const fn hpa(self) -> Hpa {
        Hpa(self.0 << PAGE_SHIFT)
    }
}

/// The size of a page mapped by a leaf paging-structure entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum PageSize {
    /// 4 KiB (a PTE).
    #[default]
    Size4K,
    /// 2 MiB (a PAE/4-level/5-level/EPT PDE with PS=1).
    Size2M,
    /// 4 MiB (a 32-bit PDE with PS=1 and CR4.PSE=1).
    Size4M,
    /// 1 GiB (a PDPTE with PS=1).
    Size1G,
}

impl PageSize {
    /// log2 of the size in bytes.
    #[inline]
    pub const fn shift(self) -> u32 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size2M => 21,
            PageSize::Size4M => 22,
            PageSize::Size1G => 30,
        }
    }

    /// The size in bytes.
    #[inline]
    pub const fn bytes(self) -> u64 {
        1 << self.shift()
    }

    /// `bytes() - 1`: the mask of the offset within such a page.
    #[inline]
    pub const fn offset_mask(self) -> u64 {
        self.bytes() - 1
    }

    /// The page size mapped by a leaf at `level` of a 64-bit format table
    /// (PAE, 4/5-level, EPT, NPT): 1 -> 4K, 2 -> 2M, 3 -> 1G.
    /// Levels above 3 cannot hold leaves; they report 4K.
    #[inline]
    pub const fn for_level(level: u8) -> PageSize {
        match level {
            2 => PageSize::Size2M,
            3 => PageSize::Size1G,
            _ => PageSize::Size4K,
        }
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PageSize::Size4K => "4K",
            PageSize::Size2M => "2M",
            PageSize::Size4M => "4M",
            PageSize::Size1G => "1G",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions() {
        let gpa = Gpa::new(0x1234_5678);
        assert_eq!(gpa.gfn(), Gfn::new(0x12345));
        assert_eq!(gpa.page_offset(), 0x678);
        assert_eq!(gpa.gfn().gpa(), Gpa::new(0x1234_5000));
        let hpa = Hpa::new(0xabc_def0);
        assert_eq!(hpa.pfn().hpa(), Hpa::new(0xabc_d000));
        let gva = Gva::new(0xffff_8000_0000_1fff);
        assert_eq!(gva.page_offset(), 0xfff);
        assert_eq!(gva.vpn(), 0xffff_8000_0000_1fff >> 12);
        assert_eq!(Gva::new(1) + 2, Gva::new(3));
        assert_eq!(Pfn::new(u64::MAX) + 1, Pfn::new(0));
        assert_eq!(Gfn::new(7).raw(), 7);
    }

    #[test]
    fn level_and_entry_arithmetic() {
        assert_eq!(pages_per_level(1), 1);
        assert_eq!(pages_per_level(2), 512);
        assert_eq!(pages_per_level(3), 512 * 512);
        assert_eq!(pages_per_level(0), 1);
        assert_eq!(Gfn::new(0x12345).align_down(1), Gfn::new(0x12345));
        assert_eq!(Gfn::new(0x12345).align_down(2), Gfn::new(0x12200));
        assert_eq!(Gfn::new(0x12345).align_down(3), Gfn::new(0));
        assert_eq!(Gfn::new(5).offset(3), Gfn::new(8));
        let t = Hpa::new(0x7000);
        assert_eq!(t.entry(0), t);
        assert_eq!(t.entry(511), Hpa::new(0x7ff8));
        assert_eq!(t.entry(511).entry_index(), 511);
        assert_eq!(t.entry(17).table(), t);
    }

    #[test]
    fn formatting() {
        assert_eq!(format!("{}", Gpa::new(0x1000)), "0x1000");
        assert_eq!(format!("{:?}", Hpa::new(0x20)), "Hpa(0x20)");
        assert_eq!(format!("{:x}", Gva::new(0xabc)), "abc");
        assert_eq!(format!("{:#x}", Gva::new(0xabc)), "0xabc");
    }

    #[test]
    fn page_sizes() {
        assert_eq!(PageSize::Size4K.bytes(), 4096);
        assert_eq!(PageSize::Size2M.bytes(), 2 << 20);
        assert_eq!(PageSize::Size4M.bytes(), 4 << 20);
        assert_eq!(PageSize::Size1G.bytes(), 1 << 30);
        assert_eq!(PageSize::for_level(2), PageSize::Size2M);
        assert_eq!(PageSize::Size2M.to_string(), "2M");
    }
}
