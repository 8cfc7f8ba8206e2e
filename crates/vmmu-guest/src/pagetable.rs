//! Building x86 64-bit page tables (4- or 5-level) in guest memory through [`BootMem`], as a
//! VMM or a boot loader does before the guest runs.

use crate::boot::BootMem;
use vmmu::x86_paging::addr::Gpa;

/// Leaf permissions and preset bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PteFlags {
    /// R/W.
    pub writable: bool,
    /// U/S.
    pub user: bool,
    /// XD.
    pub nx: bool,
    /// G.
    pub global: bool,
    /// A preset.
    pub accessed: bool,
    /// D preset.
    pub dirty: bool,
}

impl PteFlags {
    /// Writable, user, executable, A/D clear.
    pub const USER_RW: PteFlags =
        PteFlags { writable: true, user: true, nx: false, global: false, accessed: false, dirty: false };
    /// Writable, supervisor-only, not executable, global (a kernel direct map).
    pub const KERNEL_DATA: PteFlags =
        PteFlags { writable: true, user: false, nx: true, global: true, accessed: false, dirty: false };

    /// The leaf bits.
    pub fn bits(self) -> u64 {
        let mut v = 1;
        if self.writable {
            v |= 2;
        }
        if self.user {
            v |= 4;
        }
        if self.accessed {
            v |= 1 << 5;
        }
        if self.dirty {
            v |= 1 << 6;
        }
        if self.global {
            v |= 1 << 8;
        }
        if self.nx {
            v |= 1 << 63;
        }
        v
    }
}

/// A bump allocator of guest-physical 4 KiB frames for page tables.
#[derive(Debug, Clone)]
pub struct FrameBump {
    next: u64,
    end: u64,
}

impl FrameBump {
    /// Frames from [start, end) (gpa, 4 KiB aligned).
    pub fn new(start: u64, end: u64) -> Self {
        FrameBump { next: start.next_multiple_of(4096), end }
    }

    /// One frame (not zeroed: fresh guest memory reads zero).
    pub fn alloc(&mut self) -> Result<Gpa, String> {
        if self.next + 4096 > self.end {
            return Err(format!("out of page-table frames at gpa {:#x}", self.next));
        }
        let g = self.next;
        self.next += 4096;
        Ok(Gpa::new(g))
    }

    /// The next frame that would be handed out.
    pub fn next(&self) -> u64 {
        self.next
    }
}

const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// The page-table pages, root excluded, a `levels`-level tree takes to map the ranges
/// `(va, len, shift)` (each [va, va+len) with pages of `1 << shift` bytes): at each level from
/// a range's leaf tables up, one table per naturally aligned region the level covers that
/// some range touches, tables shared between ranges counted once.
pub fn tables_needed(ranges: &[(u64, u64, u32)], levels: u8) -> u64 {
    (1..u32::from(levels))
        .map(|l| {
            // A table at level l maps 512 level-l entries: a region of 1 << (12 + 9 l) bytes.
            let s = 12 + 9 * l;
            let mut spans: Vec<(u64, u64)> = ranges
                .iter()
                .filter(|&&(_, len, shift)| len > 0 && l > (shift - 12) / 9) // at or above the leaf level
                .map(|&(va, len, _)| {
                    let last = va.saturating_add(len - 1);
                    if s >= 64 {
                        (0, 0)
                    } else {
                        (va >> s, last >> s)
                    }
                })
                .collect();
            spans.sort_unstable();
            let (mut total, mut covered_to) = (0u64, None::<u64>);
            for (a, b) in spans {
                let from = covered_to.map_or(a, |c| a.max(c + 1));
                if b >= from {
                    total += b - from + 1;
                }
                covered_to = Some(covered_to.map_or(b, |c| c.max(b)));
            }
            total
        })
        .sum()
}

/// The level of the leaf entry that maps a page of `1 << shift` bytes: 1 (4 KiB), 2 (2 MiB)
/// or 3 (1 GiB).
fn leaf_level(shift: u32) -> Result<u8, String> {
    match shift {
        12 => Ok(1),
        21 => Ok(2),
        30 => Ok(3),
        _ => Err(format!("unsupported page shift {shift} (12, 21 or 30)")),
    }
}

/// Builds one 4- or 5-level page-table tree.
pub struct PageTableBuilder<'a, M: BootMem + ?Sized> {
    mem: &'a M,
    /// The root table (CR3).
    pub root: Gpa,
    levels: u8,
    /// Intermediate entries get A preset too.
    pub accessed: bool,
    /// Tables allocated (including the root).
    pub tables: u64,
}

impl<'a, M: BootMem + ?Sized> PageTableBuilder<'a, M> {
    /// A new empty tree with a root from `alloc`.
    pub fn new(mem: &'a M, alloc: &mut FrameBump, levels: u8) -> Result<Self, String> {
        assert!(levels == 4 || levels == 5, "only 4- and 5-level layouts are built here");
        let root = alloc.alloc()?;
        Ok(PageTableBuilder { mem, root, levels, accessed: false, tables: 1 })
    }

    /// Maps `va` -> `pa` with a page of `1 << shift` bytes (shift 12, 21 or 30; any other
    /// shift is an error).
    pub fn map(&mut self, alloc: &mut FrameBump, va: u64, pa: u64, shift: u32, flags: PteFlags) -> Result<(), String> {
        let leaf_level = leaf_level(shift)?;
        let mut table = self.root;
        for level in (leaf_level + 1..=self.levels).rev() {
            let idx = (va >> (12 + 9 * (u32::from(level) - 1))) & 511;
            let at = Gpa::new(table.raw() + idx * 8);
            let e = self.mem.read_phys(at, 8)?;
            table = if e & 1 == 0 {
                let t = alloc.alloc()?;
                self.tables += 1;
                let a = if self.accessed { 1 << 5 } else { 0 };
                self.mem.write_phys(at, 8, t.raw() | 0x7 | a)?;
                t
            } else {
                Gpa::new(e & ADDR)
            };
        }
        let idx = (va >> shift) & 511;
        let ps = if leaf_level > 1 { 1 << 7 } else { 0 };
        self.mem.write_phys(Gpa::new(table.raw() + idx * 8), 8, (pa & ADDR) | flags.bits() | ps)
    }

    /// Maps [va, va+len) -> [pa, ..) with pages of `1 << shift` bytes (shift 12, 21 or 30;
    /// any other shift is an error).
    pub fn map_range(
        &mut self,
        alloc: &mut FrameBump,
        va: u64,
        pa: u64,
        len: u64,
        shift: u32,
        flags: PteFlags,
    ) -> Result<(), String> {
        leaf_level(shift)?;
        let step = 1u64 << shift;
        let mut off = 0;
        while off < len {
            self.map(alloc, va + off, pa + off, shift, flags)?;
            off += step;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// Sparse guest memory of 8-byte words.
    #[derive(Default)]
    struct Words(RefCell<HashMap<u64, u64>>);

    impl BootMem for Words {
        fn write_phys(&self, gpa: Gpa, _size: u8, val: u64) -> Result<(), String> {
            self.0.borrow_mut().insert(gpa.raw(), val);
            Ok(())
        }
        fn read_phys(&self, gpa: Gpa, _size: u8) -> Result<u64, String> {
            Ok(self.0.borrow().get(&gpa.raw()).copied().unwrap_or(0))
        }
    }

    #[test]
    fn only_4k_2m_and_1g_pages_are_built() {
        let mem = Words::default();
        let mut alloc = FrameBump::new(1 << 20, 2 << 20);
        let mut b = PageTableBuilder::new(&mem, &mut alloc, 4).unwrap();
        let flags = PteFlags::USER_RW;
        for shift in [0, 11, 13, 20, 22, 29, 31, 39, 64, u32::MAX] {
            assert!(b.map(&mut alloc, 0, 0, shift, flags).is_err(), "map with shift {shift}");
            assert!(b.map_range(&mut alloc, 0, 0, 1 << 30, shift, flags).is_err(), "map_range with shift {shift}");
        }
        assert_eq!((b.tables, mem.0.borrow().len()), (1, 0), "nothing built for a bad shift");
        for (i, shift) in [12u32, 21, 30].into_iter().enumerate() {
            b.map(&mut alloc, (i as u64 + 1) << 30, 0, shift, flags).unwrap();
        }
        // The root, one PDPT, a PD and a PT for the 4 KiB page, a PD for the 2 MiB page (the
        // 1 GiB page is a PDPTE).
        assert_eq!(b.tables, 1 + 1 + 2 + 1);
    }

    #[test]
    fn tables_needed_counts_each_level_once() {
        let one = |va, len, shift, levels| tables_needed(&[(va, len, shift)], levels);
        // 1 GiB of 4 KiB pages at 0: 512 PTs, 1 PD, 1 PDPT (4-level).
        assert_eq!(one(0, 1 << 30, 12, 4), 512 + 1 + 1);
        // 1 TiB of 4 KiB pages: 2^19 PTs, 1024 PDs, 2 PDPTs.
        assert_eq!(one(0, 1 << 40, 12, 4), (1 << 19) + 1024 + 2);
        // The same with 1 GiB pages: 2 PDPTs only; with 2 MiB pages: 1024 PDs and 2 PDPTs.
        assert_eq!(one(0, 1 << 40, 30, 4), 2);
        assert_eq!(one(0, 1 << 40, 21, 4), 1024 + 2);
        // A range straddling a 2 MiB boundary needs two PTs; 5 levels add a P4D.
        assert_eq!(one((2 << 20) - 4096, 8192, 12, 5), 2 + 1 + 1 + 1);
        assert_eq!(one(0, 0, 12, 4), 0);
        // 10,000 one-page ranges 8 KiB apart share their tables: 80 MiB of address space
        // is 40 PTs under one PD and one PDPT (not 3 tables per range).
        let many: Vec<(u64, u64, u32)> = (0..10_000u64).map(|i| (i * 8192, 4096, 12)).collect();
        assert_eq!(tables_needed(&many, 4), 40 + 1 + 1);
        // Ranges of different page sizes: a 2 MiB-page range needs no PT of its own.
        assert_eq!(tables_needed(&[(0, 4096, 12), (1 << 30, 1 << 30, 21)], 4), 1 + 2 + 1);
    }
}
