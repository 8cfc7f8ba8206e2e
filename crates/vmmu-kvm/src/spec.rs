//! What the guest runs: regions of guest-virtual memory mapped by one or two page-table roots,
//! and phases of operations (touch pages, rewrite a PTE, INVLPG, switch CR3). The four
//! workloads of issue 5 are constructors; a scenario can also be translated into a
//! [`WorkloadSpec`] directly.

use serde::Serialize;

/// Size of a guest page.
pub const PAGE: u64 = 4096;

/// A range of guest-virtual pages, mapped with 4 KiB PTEs (present, writable, user, A/D clear)
/// to a contiguous guest-physical window in each root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RegionSpec {
    /// First guest-virtual address (4 KiB aligned, at or above 2 MiB, below 2^47).
    pub gva: u64,
    /// Number of pages.
    pub pages: u64,
    /// Guest-physical base of the window each root maps the region to (one per root).
    pub gpa: Vec<u64>,
}

/// A read or a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// A 64-bit load from the start of each page.
    Read,
    /// A 64-bit store of a running sequence number to the start of each page.
    Write,
}

/// One guest operation. All of them run at CPL3; [`Op::Invlpg`] and [`Op::SwitchRoot`] reach
/// ring 0 through `ud2` (or `int3`, see [`KernelEntry`]) and the guest's handler.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Access `pages` pages of `region` from page `first`, one access per page.
    Touch {
        /// Region index.
        region: usize,
        /// First page in the region.
        first: u64,
        /// Number of pages.
        pages: u64,
        /// Read or write.
        access: Access,
    },
    /// The guest rewrites the leaf PTE of one page of a region in `root`'s tables (through
    /// the identity mapping of its page-table pages) to map `gpa`, with A/D clear.
    SetPte {
        /// Root index.
        root: usize,
        /// Region index.
        region: usize,
        /// Page in the region.
        page: u64,
        /// New guest-physical frame.
        gpa: u64,
    },
    /// CPL3 loads of the four entries that map one page of a region in `root`'s tables (the
    /// PML4E, PDPTE, PDE, then the PTE, through the identity mapping of the page-table pages),
    /// as a kernel walking its own tables does before it rewrites an entry, and as vmmu's
    /// `rewrite-entry` scenario op does. Usually followed by [`Op::SetPte`].
    WalkPte {
        /// Root index.
        root: usize,
        /// Region index.
        region: usize,
        /// Page in the region.
        page: u64,
    },
    /// `invlpg` on one page of a region (through the #UD handler).
    Invlpg {
        /// Region index.
        region: usize,
        /// Page in the region.
        page: u64,
    },
    /// `mov cr3` to a root (through the #UD handler).
    SwitchRoot(usize),
    /// The guest makes root `n` a copy of root 0's top-level table with CPL3 loads and stores
    /// (512 entries, through the identity mapping of the page-table pool), as vmmu's `new-root`
    /// scenario op does: root `n` then shares every lower-level table with root 0. The backend
    /// leaves such a root's page empty until the copy, maps nothing in it, and requires every
    /// region to use root 0's GPA window for it.
    CopyRoot(usize),
}

/// How the CPL3 workload asks its ring-0 handler for `invlpg` / `mov cr3`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelEntry {
    /// `ud2`: a #UD fault; the handler skips the 2-byte instruction by adding 2 to the saved
    /// RIP in the exception frame (a memory write by ring-0 code, which PVM emulates, so each
    /// round trip also counts one emulated guest write: `mmu_pte_write` += 1).
    #[default]
    Ud2,
    /// `int3`: a #BP trap through a DPL-3 gate; the saved RIP already points past it, so the
    /// handler writes no memory.
    Int3,
}

/// A measured phase: its operations run `repeat` times, then the guest reports the end of the
/// phase with an `out` (a KVM_EXIT_IO) and the host snapshots the statistics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PhaseSpec {
    /// Phase name.
    pub name: String,
    /// Operations, in order.
    pub ops: Vec<Op>,
    /// How many times the operations run (at least 1).
    pub repeat: u32,
}

/// A complete guest workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WorkloadSpec {
    /// Workload name (for reports).
    pub name: String,
    /// Page-table roots (1 to 4); the guest starts on root 0.
    pub roots: usize,
    /// How the guest enters ring 0 for [`Op::Invlpg`] and [`Op::SwitchRoot`].
    pub kernel_entry: KernelEntry,
    /// Mapped regions.
    pub regions: Vec<RegionSpec>,
    /// Phases, in order. The backend runs an implicit `boot` phase first (the guest's first
    /// instructions, its code and stack faults), reported like the others.
    pub phases: Vec<PhaseSpec>,
    /// Guest RAM (one memslot at GPA 0) is at least this many bytes, rounded up to 2 MiB; 0:
    /// just what the system area and the regions need. A VM's memslot pages set KVM's
    /// default limit on shadow pages (pages / 50), so a comparison gives both sides the same.
    #[serde(default)]
    pub memory: u64,
    /// KVM_SET_NR_MMU_PAGES after the memslot is registered (at least 64); None: KVM's
    /// default.
    #[serde(default)]
    pub nr_mmu_pages: Option<u64>,
}

/// Guest-virtual base of the workload regions of the built-in workloads (1 GiB).
pub const REGION_GVA: u64 = 0x4000_0000;
/// Guest-physical base of workload data (everything below is the guest's system area).
pub const DATA_GPA: u64 = 0x20_0000;

fn phase(name: &str, ops: Vec<Op>, repeat: u32) -> PhaseSpec {
    PhaseSpec { name: name.into(), ops, repeat }
}

fn touch(region: usize, pages: u64, access: Access) -> Op {
    Op::Touch { region, first: 0, pages, access }
}

impl WorkloadSpec {
    /// The same workload entering ring 0 with `entry` instead.
    pub fn with_kernel_entry(mut self, entry: KernelEntry) -> Self {
        self.kernel_entry = entry;
        self
    }

    /// (a) first-touch: write one qword to each of `pages` pages whose PTEs are present with
    /// A/D clear (every write takes a shadow fault), then write them all again (`re-touch`,
    /// no faults expected).
    pub fn first_touch(pages: u64) -> Self {
        WorkloadSpec {
            name: format!("first-touch ({pages} pages)"),
            roots: 1,
            kernel_entry: KernelEntry::Ud2,
            regions: vec![RegionSpec { gva: REGION_GVA, pages, gpa: vec![DATA_GPA] }],
            memory: 0,
            nr_mmu_pages: None,
            phases: vec![
                phase("first-touch", vec![touch(0, pages, Access::Write)], 1),
                phase("re-touch", vec![touch(0, pages, Access::Write)], 1),
            ],
        }
    }

    /// (b) write-after-read: read each of `pages` pages, then write each.
    pub fn write_after_read(pages: u64) -> Self {
        WorkloadSpec {
            name: format!("write-after-read ({pages} pages)"),
            roots: 1,
            kernel_entry: KernelEntry::Ud2,
            regions: vec![RegionSpec { gva: REGION_GVA, pages, gpa: vec![DATA_GPA] }],
            memory: 0,
            nr_mmu_pages: None,
            phases: vec![
                phase("read", vec![touch(0, pages, Access::Read)], 1),
                phase("write", vec![touch(0, pages, Access::Write)], 1),
            ],
        }
    }

    /// (c) PTE rewrite: the guest remaps one page back and forth between two frames by
    /// rewriting its own PTE, `invlpg`s it through the #UD handler and writes to it,
    /// `iterations` times (two rewrites per iteration).
    pub fn pte_rewrite(iterations: u32) -> Self {
        let frame_a = DATA_GPA;
        let frame_b = DATA_GPA + 16 * PAGE;
        let remap = |gpa| {
            vec![
                Op::SetPte { root: 0, region: 0, page: 0, gpa },
                Op::Invlpg { region: 0, page: 0 },
                touch(0, 1, Access::Write),
            ]
        };
        let mut body = remap(frame_b);
        body.extend(remap(frame_a));
        WorkloadSpec {
            name: format!("pte-rewrite ({iterations} iterations)"),
            roots: 1,
            kernel_entry: KernelEntry::Ud2,
            regions: vec![RegionSpec { gva: REGION_GVA, pages: 1, gpa: vec![frame_a] }],
            memory: 0,
            nr_mmu_pages: None,
            phases: vec![
                phase("warm", vec![touch(0, 1, Access::Write), Op::Invlpg { region: 0, page: 0 }], 1),
                phase("pte-rewrite", body, iterations),
            ],
        }
    }

    /// (d) CR3 switch: two roots map the same `pages`-page region to different frames; the
    /// guest touches it under each root once, then switches between the roots through the
    /// #UD handler (`mov cr3`) and writes every page, `iterations` times.
    pub fn cr3_switch(pages: u64, iterations: u32) -> Self {
        let gpa_b = DATA_GPA + pages.div_ceil(512) * 512 * PAGE;
        WorkloadSpec {
            name: format!("cr3-switch ({pages} pages, {iterations} iterations)"),
            roots: 2,
            kernel_entry: KernelEntry::Ud2,
            regions: vec![RegionSpec { gva: REGION_GVA, pages, gpa: vec![DATA_GPA, gpa_b] }],
            memory: 0,
            nr_mmu_pages: None,
            phases: vec![
                phase("touch-root0", vec![touch(0, pages, Access::Write)], 1),
                phase("touch-root1", vec![Op::SwitchRoot(1), touch(0, pages, Access::Write)], 1),
                phase(
                    "cr3-switch",
                    vec![
                        Op::SwitchRoot(0),
                        touch(0, pages, Access::Write),
                        Op::SwitchRoot(1),
                        touch(0, pages, Access::Write),
                    ],
                    iterations,
                ),
            ],
        }
    }
}
