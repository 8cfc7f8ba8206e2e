//! Shared test fixtures: a guest page-table chain for every paging mode, and
//! EPT / NPT table builders.

use crate::access::Access;
use crate::addr::{Gpa, Gva};
use crate::entry::ADDR_MASK_4K;
use crate::mem::{OutOfRange, VecMem};
use crate::mode::{PagingMode, PagingState};
use crate::regs::{Cr0, Cr4, Efer};
use crate::walk::{walk, NoObserver, Translation, WalkError, WalkOptions};

pub const P: u64 = 1;
pub const RW: u64 = 2;
pub const US: u64 = 4;
pub const A: u64 = 1 << 5;
pub const D: u64 = 1 << 6;
pub const PS: u64 = 1 << 7;

/// Table for `level` lives here.
pub const fn table(level: u8) -> u64 {
    0x10000 + 0x1000 * level as u64
}
/// The PAE PDPT (32-byte aligned, not page aligned).
pub const PAE_PDPT: u64 = 0x18020;

/// A guest walk fixture: one chain of entries translating `gva`.
pub struct Fix {
    pub mem: VecMem,
    pub st: PagingState,
    pub gva: Gva,
    pub mode: PagingMode,
    pub leaf_level: u8,
    /// Where the entry for each level lives (index level - 1).
    pub at: [u64; 5],
    /// The physical base of the page mapped.
    pub target: u64,
}

pub fn gva_for(mode: PagingMode) -> Gva {
    Gva(match mode {
        PagingMode::NonPaging => 0x1234_5678,
        PagingMode::Bits32 => (0x2a5 << 22) | (0x111 << 12) | 0x678,
        PagingMode::Pae => (2 << 30) | (0x0e7 << 21) | (0x111 << 12) | 0x678,
        PagingMode::Level4 => (0x0a5 << 39) | (0x1c3 << 30) | (0x0e7 << 21) | (0x111 << 12) | 0x678,
        PagingMode::Level5 => (0x05a << 48) | (0x0a5 << 39) | (0x1c3 << 30) | (0x0e7 << 21) | (0x111 << 12) | 0x678,
    })
}

pub fn state_for(mode: PagingMode) -> PagingState {
    let mut st = PagingState { cr0: Cr0::PG | Cr0::PE | Cr0::WP, ..Default::default() };
    match mode {
        PagingMode::NonPaging => st.cr0 = Cr0::PE,
        PagingMode::Bits32 => {
            st.cr4 = Cr4::PSE;
            st.cr3 = table(2);
        }
        PagingMode::Pae => {
            st.cr4 = Cr4::PAE;
            st.efer = Efer::NXE;
            st.cr3 = PAE_PDPT;
        }
        PagingMode::Level4 => {
            st.cr4 = Cr4::PAE;
            st.efer = Efer::NXE | Efer::LME | Efer::LMA;
            st.cr3 = table(4);
        }
        PagingMode::Level5 => {
            st.cr4 = Cr4::PAE | Cr4::LA57;
            st.efer = Efer::NXE | Efer::LME | Efer::LMA;
            st.cr3 = table(5);
        }
    }
    st
}

/// A chain for `mode` whose leaf is at `leaf_level`; every entry is P|RW|US|A
/// (and D on the leaf).
pub fn fixture(mode: PagingMode, leaf_level: u8) -> Fix {
    let mem = VecMem::new(0x40000);
    let st = state_for(mode);
    let gva = gva_for(mode);
    let target = match (mode, leaf_level) {
        (PagingMode::Bits32, 2) => 0x0c40_0000,
        (_, 1) => 0x30_0000,
        (_, 2) => 0x1_2340_0000,
        _ => 0x40_0000_0000,
    };
    let mut fix = Fix { mem, st, gva, mode, leaf_level, at: [0; 5], target };
    let wide = mode != PagingMode::Bits32;
    let top = match mode {
        PagingMode::Pae => {
            let idx = (gva.0 >> 30) & 3;
            fix.at[2] = PAE_PDPT + 8 * idx;
            fix.st.pdptrs[idx as usize] = table(2) | P;
            fix.mem.store_u64(fix.at[2], table(2) | P).unwrap();
            2
        }
        m => m.levels(),
    };
    for level in (leaf_level..=top).rev() {
        let (bits, esize) = if wide { (9, 8) } else { (10, 4) };
        let idx = (gva.0 >> (12 + bits * (u32::from(level) - 1))) & ((1 << bits) - 1);
        let at = table(level) + idx * esize;
        fix.at[usize::from(level - 1)] = at;
        let v = if level == leaf_level {
            target | P | RW | US | A | D | if level > 1 { PS } else { 0 }
        } else {
            table(level - 1) | P | RW | US | A
        };
        fix.put(level, v);
    }
    fix
}

impl Fix {
    pub fn esize(&self) -> u64 {
        if self.mode == PagingMode::Bits32 {
            4
        } else {
            8
        }
    }

    pub fn get(&self, level: u8) -> u64 {
        let at = self.at[usize::from(level - 1)];
        if self.esize() == 4 {
            u64::from(self.mem.load_u32(at).unwrap())
        } else {
            self.mem.load_u64(at).unwrap()
        }
    }

    pub fn put(&mut self, level: u8, v: u64) {
        let at = self.at[usize::from(level - 1)];
        if self.esize() == 4 {
            self.mem.store_u32(at, crate::low32(v)).unwrap();
        } else {
            self.mem.store_u64(at, v).unwrap();
        }
        if self.mode == PagingMode::Pae && level == 3 {
            let idx = ((self.gva.0 >> 30) & 3) as usize;
            self.st.pdptrs[idx] = v;
        }
    }

    pub fn or(&mut self, level: u8, bits: u64) {
        let v = self.get(level) | bits;
        self.put(level, v);
    }

    pub fn clear(&mut self, level: u8, bits: u64) {
        let v = self.get(level) & !bits;
        self.put(level, v);
    }

    /// Keeps the address, replaces everything else with `flags`.
    pub fn set_flags(&mut self, level: u8, flags: u64) {
        let mask = if self.esize() == 4 { 0xffff_f000 } else { ADDR_MASK_4K };
        let v = (self.get(level) & mask) | flags;
        self.put(level, v);
    }

    pub fn walk(&mut self, access: Access) -> Result<Translation, WalkError<OutOfRange>> {
        walk(&mut self.mem, &self.st, self.gva, &access, WalkOptions::ARCH, &mut NoObserver)
    }

    pub fn peek(&mut self, access: Access) -> Result<Translation, WalkError<OutOfRange>> {
        walk(&mut self.mem, &self.st, self.gva, &access, WalkOptions::PEEK, &mut NoObserver)
    }

    pub fn expected_gpa(&self) -> Gpa {
        if self.mode == PagingMode::NonPaging {
            return Gpa(self.gva.0);
        }
        let size = match (self.mode, self.leaf_level) {
            (_, 1) => 0x1000,
            (PagingMode::Bits32, _) => 0x40_0000,
            (_, 2) => 0x20_0000,
            _ => 0x4000_0000,
        };
        Gpa(self.target | (self.gva.0 & (size - 1)))
    }
}

/// A bump allocator of 4 KiB tables in host memory for EPT / NPT tests.
pub struct HostTables {
    pub mem: VecMem,
    next: u64,
}

pub const EPT_RWX: u64 = 7;
pub const EPT_WB: u64 = 6 << 3;

impl HostTables {
    pub fn new(bytes: u64) -> Self {
        HostTables { mem: VecMem::new(bytes), next: 0x1000 }
    }

    pub fn alloc(&mut self) -> u64 {
        let a = self.next;
        self.next += 0x1000;
        a
    }

    /// Maps `gpa` -> `hpa` with a leaf at `leaf_level` in the table tree at
    /// `root` of `levels` levels. Non-leaf entries get `nonleaf`, the leaf
    /// gets `leaf` (PS added for large leaves). Returns the entry addresses by level.
    #[allow(clippy::too_many_arguments)]
    pub fn map(
        &mut self,
        root: u64,
        levels: u8,
        gpa: u64,
        hpa: u64,
        leaf_level: u8,
        nonleaf: u64,
        leaf: u64,
    ) -> [u64; 5] {
        let mut at = [0u64; 5];
        let mut t = root;
        for level in (leaf_level..=levels).rev() {
            let idx = (gpa >> (12 + 9 * (u32::from(level) - 1))) & 511;
            let e_at = t + idx * 8;
            at[usize::from(level - 1)] = e_at;
            if level == leaf_level {
                let ps = if level > 1 { PS } else { 0 };
                self.mem.store_u64(e_at, hpa | leaf | ps).unwrap();
            } else {
                let cur = self.mem.load_u64(e_at).unwrap();
                let next = if cur & ADDR_MASK_4K != 0 { cur & ADDR_MASK_4K } else { self.alloc() };
                self.mem.store_u64(e_at, next | nonleaf).unwrap();
                t = next;
            }
        }
        at
    }
}
