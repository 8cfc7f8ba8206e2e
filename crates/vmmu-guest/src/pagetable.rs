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

    /// Maps `va` -> `pa` with a page of `1 << shift` bytes (shift 12, 21 or 30).
    pub fn map(&mut self, alloc: &mut FrameBump, va: u64, pa: u64, shift: u32, flags: PteFlags) -> Result<(), String> {
        let leaf_level = ((shift - 12) / 9 + 1) as u8;
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

    /// Maps [va, va+len) -> [pa, ..) with pages of `1 << shift` bytes.
    pub fn map_range(
        &mut self,
        alloc: &mut FrameBump,
        va: u64,
        pa: u64,
        len: u64,
        shift: u32,
        flags: PteFlags,
    ) -> Result<(), String> {
        let step = 1u64 << shift;
        let mut off = 0;
        while off < len {
            self.map(alloc, va + off, pa + off, shift, flags)?;
            off += step;
        }
        Ok(())
    }
}
