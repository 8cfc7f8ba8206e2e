//! Real programs' memory traces: a compact binary trace format ([`format`]), importers for
//! valgrind lackey's text output ([`lackey`]) and ChampSim's binary traces ([`champsim`]),
//! and the replayer that runs a trace as a guest process under the guest kernel model.
//!
//! Replay ([`replay`]) streams the records (a trace is never loaded whole). The program's
//! address space is mapped on demand: the first access to a 2 MiB-aligned region the process
//! has no VMA for mmaps that whole region (read/write/execute: a trace carries no
//! permissions), and the guest kernel then demand-pages it as it does any mapping, so the
//! guest's page tables, its #PFs and the MMU's faults are those of a real first touch.
//! Stores write the record's index (so later loads read something the run put there) and
//! loads, fetches and modifies' reads add into a checksum: two MMUs replaying one trace must
//! give the same checksum. See docs/decisions/0007-trace-format.md.

pub mod champsim;
pub mod format;
pub mod lackey;

pub use format::{Counts, Kind, Record, TraceReader, TraceSummary, TraceWriter};

use crate::kernel::{GuestKernel, KernelError};
use std::collections::HashSet;
use vmmu::machine::GuestCpu;
use vmmu::x86_paging::access::AccessKind;

/// log2 of the granule the replayer maps the program's address space in (2 MiB).
pub const REGION_SHIFT: u32 = 21;
/// End of the user address space a trace may touch (47 bits, 4-level paging's lower half).
pub const USER_LIMIT: u64 = 1 << 47;

/// The widest access a record may make: it is replayed in 8-byte pieces, so a corrupt size
/// (up to 4 GiB) must not turn one record into half a billion guest accesses.
pub const MAX_ACCESS_BYTES: u32 = 64 << 10;

/// Replay failures.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The trace could not be read.
    #[error("reading the trace at record {record}: {source}")]
    Trace {
        /// Records replayed before the failure.
        record: u64,
        /// The reader's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An access outside the user address space.
    #[error("record {record}: address {addr:#x} (+{size} bytes) is not a user-space address (below 2^47)")]
    NotUser {
        /// Record index.
        record: u64,
        /// Address.
        addr: u64,
        /// Size.
        size: u32,
    },
    /// A record wider than [`MAX_ACCESS_BYTES`].
    #[error(
        "record {record}: an access of {size} bytes at {addr:#x} is wider than the {MAX_ACCESS_BYTES}-byte limit \
         (the widest x86 accesses, XSAVE with AMX state, are about 11 KiB): is the trace corrupt?"
    )]
    TooWide {
        /// Record index.
        record: u64,
        /// Address.
        addr: u64,
        /// Size.
        size: u32,
    },
    /// Guest RAM ran out: the trace touches more pages than the guest has.
    #[error(
        "guest memory ({mem_mib} MiB) is full after {records} records and {pages} distinct pages: \
         the trace touches more distinct pages than guest memory holds; give the guest more memory"
    )]
    OutOfMemory {
        /// Guest RAM in MiB.
        mem_mib: u64,
        /// Records replayed.
        records: u64,
        /// Distinct pages touched so far.
        pages: u64,
    },
    /// No process to replay into.
    #[error("no current process to replay the trace in")]
    NoProcess,
    /// The guest kernel or the VM failed.
    #[error(transparent)]
    Kernel(KernelError),
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReplayStats {
    /// Records replayed (one per trace record).
    pub records: u64,
    /// Records per kind: fetch, load, store, modify.
    pub by_kind: [u64; 4],
    /// vCPU operations made (records wider than 8 bytes are split in 8-byte pieces, a
    /// modify is a load and a store).
    pub operations: u64,
    /// Distinct 4 KiB pages touched.
    pub distinct_pages: u64,
    /// 2 MiB regions this replay mmapped (first touch of a region without a VMA).
    pub regions_mapped: u64,
    /// The guest kernel's page faults during the replay.
    pub guest_page_faults: u64,
    /// Sum of every value read (guest-visible results; equal under every MMU).
    pub checksum: u64,
}

/// Guest RAM that certainly holds a trace touching `distinct_pages` pages: the data pages,
/// as many again for the worst case of page-table pages, and 64 MiB for the kernel, rounded
/// up to 64 MiB. `None` if that does not fit in 64 bits (a corrupt count).
pub fn guest_memory_for(distinct_pages: u64) -> Option<u64> {
    distinct_pages.checked_mul(2 * 4096)?.checked_add(64 << 20)?.checked_next_multiple_of(64 << 20)
}

/// Replays `records` as the kernel's current process (see the module docs).
pub fn replay<C, I, E>(kernel: &mut GuestKernel, cpu: &mut C, records: I) -> Result<ReplayStats, ReplayError>
where
    C: GuestCpu,
    I: IntoIterator<Item = Result<Record, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let pid = kernel.current_pid().ok_or(ReplayError::NoProcess)?;
    let mut st = ReplayStats::default();
    let faults0 = kernel.stats.page_faults;
    let mut regions: HashSet<u64> = HashSet::new();
    let mut last_region = u64::MAX;
    let mut pages: HashSet<u64> = HashSet::new();
    let mut last_page = u64::MAX;
    for r in records {
        let r = r.map_err(|e| ReplayError::Trace { record: st.records, source: Box::new(e) })?;
        if r.size > MAX_ACCESS_BYTES {
            return Err(ReplayError::TooWide { record: st.records, addr: r.addr, size: r.size });
        }
        let len = u64::from(r.size.max(1));
        if r.addr.checked_add(len).is_none_or(|end| end > USER_LIMIT) {
            return Err(ReplayError::NotUser { record: st.records, addr: r.addr, size: r.size });
        }
        let last = r.addr + len - 1;
        for region in (r.addr >> REGION_SHIFT)..=(last >> REGION_SHIFT) {
            if region != last_region && regions.insert(region) {
                st.regions_mapped += u64::from(map_region(kernel, pid, region)?);
            }
            last_region = region;
        }
        for p in (r.addr >> 12)..=(last >> 12) {
            if p != last_page {
                pages.insert(p);
                last_page = p;
            }
        }
        let oom = |e: KernelError, st: &ReplayStats, pages: &HashSet<u64>| match e {
            KernelError::OutOfMemory(mem) => {
                ReplayError::OutOfMemory { mem_mib: mem >> 20, records: st.records, pages: pages.len() as u64 }
            }
            e => ReplayError::Kernel(e),
        };
        let mut off = 0u64;
        while off < u64::from(r.size) {
            let n = (u64::from(r.size) - off).min(8) as u8;
            let va = r.addr + off;
            let res = match r.kind {
                Kind::Fetch => kernel.access(cpu, va, AccessKind::Fetch, n, 0).map(|v| (v, 1)),
                Kind::Load => kernel.access(cpu, va, AccessKind::Read, n, 0).map(|v| (v, 1)),
                Kind::Store => kernel.access(cpu, va, AccessKind::Write, n, st.records).map(|_| (0, 1)),
                Kind::Modify => kernel
                    .access(cpu, va, AccessKind::Read, n, 0)
                    .and_then(|v| kernel.access(cpu, va, AccessKind::Write, n, v.wrapping_add(1)).map(|_| (v, 2))),
            };
            let (v, ops) = res.map_err(|e| oom(e, &st, &pages))?;
            st.checksum = st.checksum.wrapping_add(v);
            st.operations += ops;
            off += 8;
        }
        st.records += 1;
        st.by_kind[r.kind as usize] += 1;
    }
    st.distinct_pages = pages.len() as u64;
    st.guest_page_faults = kernel.stats.page_faults - faults0;
    Ok(st)
}

/// Makes sure 2 MiB region `region` of process `pid` is covered by VMAs; mmaps it (rwx)
/// otherwise. Returns whether it mapped it.
fn map_region(kernel: &mut GuestKernel, pid: u32, region: u64) -> Result<bool, ReplayError> {
    let (start, end) = (region << REGION_SHIFT, (region + 1) << REGION_SHIFT);
    let covered = kernel
        .processes()
        .iter()
        .find(|p| p.pid == pid)
        .is_some_and(|p| p.vmas.iter().any(|v| v.start <= start && v.end >= end));
    if covered {
        return Ok(false);
    }
    kernel.mmap_prot(pid, start, end - start, true, true).map_err(ReplayError::Kernel)?;
    Ok(true)
}
