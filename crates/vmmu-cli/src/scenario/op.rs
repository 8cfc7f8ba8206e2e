//! The ops of a scenario's phases (`{ op = "...", ... }`): the [`Op`] type as scenario files
//! write it, and what the parent module's validation asks of each op (its memslot, its
//! guest-virtual range, its host range, its workload).

use super::Size;
use serde::Deserialize;

/// One operation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "op", rename_all = "kebab-case")]
pub enum Op {
    /// Write one byte in each of `pages` pages from `start`.
    Write {
        /// First address (gva).
        start: Size,
        /// Pages.
        pages: u64,
    },
    /// Read 8 bytes from each page.
    Read {
        /// First address.
        start: Size,
        /// Pages.
        pages: u64,
    },
    /// Fetch (execute) one byte from each page.
    Fetch {
        /// First address.
        start: Size,
        /// Pages.
        pages: u64,
    },
    /// Read each page, then write each page.
    ReadThenWrite {
        /// First address.
        start: Size,
        /// Pages.
        pages: u64,
    },
    /// A named workload (first-touch, re-touch, read-then-write, read, random, zipf).
    Workload {
        /// Workload name.
        name: String,
        /// First address.
        start: Size,
        /// Pages.
        pages: u64,
        /// Accesses (random, zipf).
        #[serde(default)]
        accesses: Option<u64>,
        /// Seed.
        #[serde(default)]
        seed: Option<u64>,
    },
    /// Kernel layout: switch to process `process` (1-based).
    Switch {
        /// Process number.
        process: u32,
    },
    /// Kernel layout: munmap in the current process.
    Munmap {
        /// First address.
        start: Size,
        /// Pages.
        pages: u64,
    },
    /// INVLPG.
    Invlpg {
        /// Address.
        addr: Size,
    },
    /// The VMM drops part of a memslot's host memory (MADV_DONTNEED).
    MadviseDontneed {
        /// Memslot index.
        slot: u32,
        /// Offset into the slot.
        offset: Size,
        /// Bytes.
        size: Size,
    },
    /// The host migrates part of a memslot's memory to new frames (same contents).
    MigratePages {
        /// Memslot index.
        slot: u32,
        /// Offset into the slot.
        offset: Size,
        /// Bytes.
        size: Size,
    },
    /// The host swaps part of a memslot's memory out (contents kept in the swap store,
    /// faulted back in on the next access).
    SwapOut {
        /// Memslot index.
        slot: u32,
        /// Offset into the slot.
        offset: Size,
        /// Bytes.
        size: Size,
    },
    /// The host splits the THPs mapping part of a memslot into 4 KiB mappings.
    ThpSplit {
        /// Memslot index.
        slot: u32,
        /// Offset into the slot.
        offset: Size,
        /// Bytes.
        size: Size,
    },
    /// The host (khugepaged) collapses fully-mapped 2 MiB blocks of a THP-backed memslot
    /// back into huge pages.
    ThpCollapse {
        /// Memslot index.
        slot: u32,
        /// Offset into the slot.
        offset: Size,
        /// Bytes.
        size: Size,
    },
    /// KSM scans part of a memslot's memory and merges pages with equal contents into
    /// shared read-only frames (copied again on the guest's next write to one).
    KsmMerge {
        /// Memslot index.
        slot: u32,
        /// Offset into the slot.
        offset: Size,
        /// Bytes.
        size: Size,
    },
    /// One pass of KVM's NX huge page recovery worker per `passes`: each zaps
    /// ceil(nx_lpage_splits / nx_huge_pages_recovery_ratio) of the tables the mitigation made.
    NxRecovery {
        /// Passes.
        #[serde(default = "one")]
        passes: u32,
    },
    /// Kernel layout: fork the current process (the child gets the next pid).
    Fork,
    /// Kernel layout: exec in the current process (drop all of its user memory).
    Exec,
    /// Kernel layout: process `process` exits (it must not be the current one).
    Exit {
        /// Process number.
        process: u32,
    },
    /// Kernel layout: fork/exec churn, as a shell running short commands: `iterations`
    /// times, fork the current process, switch to the child, write `pages` pages from
    /// `start` (copy-on-write faults), munmap the second half, exec, touch `pages` fresh
    /// pages, switch back and let the child exit.
    ProcessChurn {
        /// Rounds.
        iterations: u32,
        /// First address.
        start: Size,
        /// Pages written per round.
        pages: u64,
    },
    /// Identity layout: the guest rewrites the level-`level` entry mapping `va` with a store
    /// (meeting write protection as a real guest would): bits in `clear` are cleared, bits in
    /// `set` set, and with `target` the address field is replaced. No flush (add `invlpg`).
    RewriteEntry {
        /// The address whose translation is changed.
        va: Size,
        /// 1 = PTE, 2 = PDE, 3 = PDPTE, 4 = PML4E.
        level: u8,
        /// Bits to clear.
        #[serde(default)]
        clear: Size,
        /// Bits to set.
        #[serde(default)]
        set: Size,
        /// New physical address for the entry's address field.
        #[serde(default)]
        target: Option<Size>,
    },
    /// Identity layout: the guest makes another top-level table, a copy of the boot one
    /// (stores), so it can switch among several roots. Roots are numbered from 1 (0 = boot).
    NewRoot,
    /// Identity layout: MOV CR3 to root `root` (0 = the boot tables).
    SwitchRoot {
        /// Root number.
        root: u32,
    },
    /// Check the MMU's invariants; the run fails if they do not hold.
    Audit,
    /// KVM_SET_NR_MMU_PAGES: limit the shadow MMU to `nr_mmu_pages` shadow pages (at least
    /// 64, KVM_MIN_ALLOC_MMU_PAGES); pages over the limit are zapped at once, oldest first,
    /// and later faults recycle the oldest page when the limit is reached (`mmu_recycled`).
    SetNrMmuPages {
        /// The limit, in pages.
        nr_mmu_pages: u64,
    },
    /// The VMM turns dirty logging on for memslot `slot` (KVM_SET_USER_MEMORY_REGION with
    /// KVM_MEM_LOG_DIRTY_PAGES added to its flags).
    DirtyLogStart {
        /// Memslot index.
        slot: u32,
    },
    /// The VMM turns dirty logging off for memslot `slot` (KVM_MEM_LOG_DIRTY_PAGES removed).
    DirtyLogStop {
        /// Memslot index.
        slot: u32,
    },
    /// The VMM harvests memslot `slot`'s dirty log: KVM_GET_DIRTY_LOG and, with
    /// `vm.manual_dirty_log_protect`, KVM_CLEAR_DIRTY_LOG of the pages it reported (which
    /// re-arms them). The pages reported are counted in the phase's report.
    DirtyLogHarvest {
        /// Memslot index.
        slot: u32,
    },
    /// Kernel layout: replay a recorded memory trace (`vmmu record`) in the current
    /// process, mapping its address space on demand (docs/decisions/0007-trace-format.md).
    Replay {
        /// The trace file (relative to the working directory).
        trace: String,
    },
    /// Pre-copy live migration of memslot `slot` (dirty logging, write-protect mode): turn
    /// logging on and copy the whole slot, then rounds of guest work (the workload, with the
    /// seed advanced per round), KVM_GET_DIRTY_LOG and copying the pages it reports, until a
    /// round dirties at most `stop_pages` pages or `max_rounds` ran; that round is the
    /// stop-and-copy (the guest paused). The copy is then compared with guest memory page by
    /// page — the run fails on any difference — and logging is turned off again.
    Migrate {
        /// Memslot index.
        slot: u32,
        /// The guest's workload during each round (first-touch, re-touch, random, zipf, ...).
        workload: String,
        /// First address of the workload.
        start: Size,
        /// Pages the workload covers.
        pages: u64,
        /// Accesses per round (random, zipf).
        #[serde(default)]
        accesses: Option<u64>,
        /// Seed of the first round.
        #[serde(default)]
        seed: Option<u64>,
        /// Most rounds after the initial copy (the last is always stop-and-copy).
        #[serde(default = "default_max_rounds")]
        max_rounds: u32,
        /// Stop-and-copy once a round dirties at most this many pages.
        #[serde(default)]
        stop_pages: u64,
    },
    /// Idle page tracking's cost to the guest (after KVM's access_tracking_perf_test): a
    /// baseline pass of the workload, then `passes` times: the host marks all of memslot
    /// `slot` idle (clear_young), the guest runs the same workload again, the host reads
    /// the idle bitmap back. Reports per pass the marking time, the guest's time and faults
    /// and the pages found accessed; the slowdown is against the baseline.
    IdleTracking {
        /// Memslot index.
        slot: u32,
        /// The guest's workload each pass (same seed every pass).
        workload: String,
        /// First address of the workload.
        start: Size,
        /// Pages the workload covers.
        pages: u64,
        /// Accesses per pass (random, zipf).
        #[serde(default)]
        accesses: Option<u64>,
        /// Seed.
        #[serde(default)]
        seed: Option<u64>,
        /// Marking passes after the baseline.
        #[serde(default = "default_passes")]
        passes: u32,
    },
}

impl Op {
    /// The op's name as scenario files write it (`op = "..."`).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Write { .. } => "write",
            Op::Read { .. } => "read",
            Op::Fetch { .. } => "fetch",
            Op::ReadThenWrite { .. } => "read-then-write",
            Op::Workload { .. } => "workload",
            Op::Switch { .. } => "switch",
            Op::Munmap { .. } => "munmap",
            Op::Invlpg { .. } => "invlpg",
            Op::MadviseDontneed { .. } => "madvise-dontneed",
            Op::MigratePages { .. } => "migrate-pages",
            Op::SwapOut { .. } => "swap-out",
            Op::ThpSplit { .. } => "thp-split",
            Op::ThpCollapse { .. } => "thp-collapse",
            Op::KsmMerge { .. } => "ksm-merge",
            Op::NxRecovery { .. } => "nx-recovery",
            Op::Replay { .. } => "replay",
            Op::Fork => "fork",
            Op::Exec => "exec",
            Op::Exit { .. } => "exit",
            Op::ProcessChurn { .. } => "process-churn",
            Op::RewriteEntry { .. } => "rewrite-entry",
            Op::NewRoot => "new-root",
            Op::SwitchRoot { .. } => "switch-root",
            Op::Audit => "audit",
            Op::SetNrMmuPages { .. } => "set-nr-mmu-pages",
            Op::DirtyLogStart { .. } => "dirty-log-start",
            Op::DirtyLogStop { .. } => "dirty-log-stop",
            Op::DirtyLogHarvest { .. } => "dirty-log-harvest",
            Op::Migrate { .. } => "migrate",
            Op::IdleTracking { .. } => "idle-tracking",
        }
    }

    /// The memslot index a host-side op names.
    pub(super) fn slot(&self) -> Option<u32> {
        match self {
            Op::MadviseDontneed { slot, .. }
            | Op::MigratePages { slot, .. }
            | Op::SwapOut { slot, .. }
            | Op::ThpSplit { slot, .. }
            | Op::ThpCollapse { slot, .. }
            | Op::KsmMerge { slot, .. }
            | Op::Migrate { slot, .. }
            | Op::IdleTracking { slot, .. }
            | Op::DirtyLogStart { slot }
            | Op::DirtyLogStop { slot }
            | Op::DirtyLogHarvest { slot } => Some(*slot),
            _ => None,
        }
    }

    /// The guest-virtual range an op covers: (start, pages).
    pub(super) fn range(&self) -> Option<(u64, u64)> {
        match self {
            Op::Write { start, pages }
            | Op::Read { start, pages }
            | Op::Fetch { start, pages }
            | Op::ReadThenWrite { start, pages }
            | Op::Munmap { start, pages }
            | Op::Workload { start, pages, .. }
            | Op::ProcessChurn { start, pages, .. }
            | Op::Migrate { start, pages, .. }
            | Op::IdleTracking { start, pages, .. } => Some((start.0, *pages)),
            _ => None,
        }
    }

    /// A host-side op's range of a memslot: (slot, offset, size).
    pub(super) fn host_range(&self) -> Option<(u32, u64, u64)> {
        match self {
            Op::MadviseDontneed { slot, offset, size }
            | Op::MigratePages { slot, offset, size }
            | Op::SwapOut { slot, offset, size }
            | Op::ThpSplit { slot, offset, size }
            | Op::ThpCollapse { slot, offset, size }
            | Op::KsmMerge { slot, offset, size } => Some((*slot, offset.0, size.0)),
            _ => None,
        }
    }

    /// The named workload an op runs: (field holding the name, name, pages).
    pub(super) fn workload(&self) -> Option<(&'static str, &str, u64)> {
        match self {
            Op::Workload { name, pages, .. } => Some(("name", name, *pages)),
            Op::Migrate { workload, pages, .. } | Op::IdleTracking { workload, pages, .. } => {
                Some(("workload", workload, *pages))
            }
            _ => None,
        }
    }
}

fn default_passes() -> u32 {
    4
}

fn default_max_rounds() -> u32 {
    8
}

fn one() -> u32 {
    1
}
