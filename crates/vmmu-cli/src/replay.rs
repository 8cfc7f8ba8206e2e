//! `vmmu run --replay TRACE`: a recorded trace as the guest's workload.
//!
//! Without a scenario file the run gets a scenario of its own ([`scenario_for`]): one
//! memslot of guest RAM sized from the trace header's distinct-page count, the guest kernel
//! with one process, TDP and shadow side by side, and two phases that each replay the whole
//! trace (`pass1` demand-pages the program's memory, `pass2` runs over it resident). With a
//! scenario file its VM and guest are used and its phases replaced the same way. The
//! `replay` scenario op (`{ op = "replay", trace = "FILE" }`) replays inside any phase.

use crate::error::{ConfigError, Failure, RunError, TraceError};
use crate::scenario::Scenario;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use vmmu::machine::GuestCpu;
use vmmu_guest::replay::{self, Counts, ReplayStats, TraceReader};
use vmmu_guest::GuestKernel;

/// One replay op's result (in `--json` under `"replays"`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplayReport {
    /// The trace file.
    pub trace: String,
    /// The phase it ran in.
    pub phase: String,
    /// The counts the trace's header carries (null if it was streamed to a pipe).
    pub header: Option<Counts>,
    /// What the replay did.
    pub stats: ReplayStats,
}

fn open(path: &Path) -> Result<TraceReader<BufReader<File>>, TraceError> {
    let f = File::open(path).map_err(|source| TraceError::Open { path: path.to_owned(), source })?;
    TraceReader::new(BufReader::with_capacity(1 << 16, f))
        .map_err(|source| TraceError::Format { path: path.to_owned(), source })
}

/// The counts in a trace's header (None if the writer could not fill them in).
pub fn header_counts(path: &Path) -> Result<Option<Counts>, TraceError> {
    Ok(open(path)?.header_counts())
}

/// Most guest RAM sized from a trace header (64 TiB: a 46-bit guest-physical address space,
/// the scenarios' default MAXPHYADDR).
pub const MAX_SIZED_GUEST_MEMORY: u64 = 1 << 46;

/// Guest RAM for a replay when neither a scenario nor `--guest-memory` says: sized from the
/// header's distinct pages, 1 GiB if the header has no counts. The error names the header
/// field when its count needs more than [`MAX_SIZED_GUEST_MEMORY`] (a corrupt header).
pub fn default_guest_memory(counts: Option<Counts>) -> Result<u64, String> {
    let Some(c) = counts else { return Ok(1 << 30) };
    match replay::guest_memory_for(c.distinct_pages) {
        Some(m) if m <= MAX_SIZED_GUEST_MEMORY => Ok(m),
        _ => Err(format!(
            "the trace header's distinct-page count ({}) needs more guest memory than the {} TiB a guest can \
             address: is the header corrupt? (--guest-memory sets the size instead)",
            c.distinct_pages,
            MAX_SIZED_GUEST_MEMORY >> 40
        )),
    }
}

/// The scenario `vmmu run --replay TRACE` runs without a scenario file.
pub fn scenario_for(trace: &Path, guest_memory: Option<u64>) -> Result<Scenario, ConfigError> {
    let counts = header_counts(trace).map_err(ConfigError::Replay)?;
    let mem = match guest_memory {
        Some(m) if !m.is_multiple_of(2 << 20) || m == 0 => return Err(ConfigError::GuestMemory),
        Some(m) => m,
        None => default_guest_memory(counts)
            .map_err(|reason| ConfigError::Replay(TraceError::Header { path: trace.to_owned(), reason }))?,
    };
    let text = format!(
        "name = \"replay\"\n\
         description = \"A recorded program's memory trace replayed as a guest process: the guest kernel \
         demand-pages the program's address space (2 MiB regions mapped on first touch), TDP and shadow \
         paging side by side.\"\n\
         compare = [\"tdp\", \"shadow\"]\n\
         [[memslot]]\ngpa = 0\nsize = {mem}\nbacking = \"4k\"\n\
         [guest]\nlayout = \"kernel\"\npage_size = \"2m\"\nprocesses = 1\n"
    );
    Scenario::parse(&text).map_err(ConfigError::ReplayScenario)
}

/// Checks up front that a trace whose header has counts fits guest RAM of `mem_size` bytes.
pub fn check_fits(trace: &Path, mem_size: u64) -> Result<(), TraceError> {
    if let Some(c) = header_counts(trace)? {
        if c.distinct_pages.saturating_mul(4096) >= mem_size {
            return Err(TraceError::TooBig { path: trace.to_owned(), distinct_pages: c.distinct_pages, mem_size });
        }
    }
    Ok(())
}

/// Replays the trace at `path` in the kernel's current process.
pub fn run<C: GuestCpu>(
    kernel: &mut GuestKernel,
    cpu: &mut C,
    path: &Path,
    phase: &str,
) -> Result<ReplayReport, RunError> {
    let reader = open(path).map_err(ConfigError::Replay)?;
    let header = reader.header_counts();
    let stats =
        replay::replay(kernel, cpu, reader).map_err(|source| Failure::Replay { path: path.to_owned(), source })?;
    Ok(ReplayReport { trace: path.display().to_string(), phase: phase.to_string(), header, stats })
}

/// The report's lines for the replays of a run.
pub fn text(reports: &[ReplayReport]) -> String {
    let mut out = String::new();
    for r in reports {
        let s = &r.stats;
        let [i, l, st, m] = s.by_kind;
        out.push_str(&format!(
            "{:<12} replay {}: {} records (I {i}, L {l}, S {st}, M {m}), {} operations, {} distinct pages, \
             {} regions mapped, {} guest #PF, checksum {:#x}\n",
            r.phase,
            r.trace,
            s.records,
            s.operations,
            s.distinct_pages,
            s.regions_mapped,
            s.guest_page_faults,
            s.checksum
        ));
    }
    out
}
