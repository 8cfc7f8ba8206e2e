//! The errors of a run. A [`RunError`] is either a [`ConfigError`] (the scenario or the
//! command line asks for something invalid or unsupported: `vmmu run` exits with status 2)
//! or a [`Failure`] (the guest, the VM or the host failed while running: status 1).
//!
//! A variant that wraps an underlying error (a [`vmmu::VmError`], a
//! [`vmmu_guest::kernel::KernelError`], an [`std::io::Error`], ...) carries it as its
//! source. As elsewhere in the workspace its message includes the source's, on one line
//! after the field or option it concerns (`memslot[1]: ...`, `--replay: FILE: ...`), so an
//! error is printed with `{}`, not by walking its source chain (which would repeat it).

use std::path::PathBuf;
use vmmu::host::HostError;
use vmmu::hw::cpu::Exception;
use vmmu::mmu::audit::AuditError;
use vmmu::{GuestError, VmError};
use vmmu_guest::kernel::KernelError;
use vmmu_guest::replay::format::FormatError;
use vmmu_guest::replay::ReplayError;
use vmmu_guest::workload::Workload;

/// A run failure: bad input, or the run itself failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The scenario or the command line asks for something invalid or unsupported.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The run itself failed.
    #[error(transparent)]
    Failed(#[from] Failure),
}

/// Where in a scenario an op is: `phase[P].ops[I] (OP in phase "NAME")`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpAt {
    /// Index of the phase.
    pub phase: usize,
    /// Name of the phase.
    pub phase_name: String,
    /// Index of the op in the phase.
    pub index: usize,
    /// The op's name (`write`, `migrate`, ...).
    pub op: &'static str,
}

impl std::fmt::Display for OpAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "phase[{}].ops[{}] ({} in phase \"{}\")", self.phase, self.index, self.op, self.phase_name)
    }
}

impl RunError {
    /// The error with the op it happened in: `phase[P].ops[I] (OP in phase "NAME"): ...`.
    pub fn in_op(self, at: OpAt) -> RunError {
        match self {
            RunError::Config(e) => RunError::Config(ConfigError::InOp { at, source: Box::new(e) }),
            RunError::Failed(e) => RunError::Failed(Failure::InOp { at, source: Box::new(e) }),
        }
    }
}

/// A trace file named by `--replay` or a `replay` op that cannot be replayed as asked.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// It cannot be opened.
    #[error("{}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not a vmmu trace (or its header cannot be read).
    #[error("{}: {source}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// Why.
        source: FormatError,
    },
    /// Its header's distinct-page count is beyond what a guest can address.
    #[error("{}: {reason}", path.display())]
    Header {
        /// The file.
        path: PathBuf,
        /// What is wrong with the header.
        reason: String,
    },
    /// Its header says it touches more pages than guest memory holds.
    #[error(
        "{} touches {distinct_pages} distinct pages ({} MiB), more than guest memory ({} MiB) holds; \
         give the guest more memory (--guest-memory, or the scenario's memslots)",
        path.display(), distinct_pages / 256, mem_size >> 20
    )]
    TooBig {
        /// The file.
        path: PathBuf,
        /// The header's distinct-page count.
        distinct_pages: u64,
        /// Guest RAM, in bytes.
        mem_size: u64,
    },
}

/// Bad input: the scenario or the command line asks for something invalid or unsupported.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The error of an op, with where the op is.
    #[error("{at}: {source}")]
    InOp {
        /// The op.
        at: OpAt,
        /// Its error.
        source: Box<ConfigError>,
    },
    /// `--mmu` (or the scenario's `vm.mmu`) names no MMU the scenario can run.
    #[error("--mmu: {0}")]
    Mmu(String),
    /// The host (its frame allocator or address space) cannot be set up.
    #[error("{0}")]
    Host(#[source] HostError),
    /// The VM or a vCPU cannot be created.
    #[error("{0}")]
    Vm(#[source] VmError),
    /// A memslot's memory cannot be mapped in the host.
    #[error("memslot[{index}]: {source}")]
    MemslotMap {
        /// Index of the memslot in the scenario.
        index: usize,
        /// Why.
        source: HostError,
    },
    /// `vm.manual_dirty_log_protect`: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 cannot be enabled.
    #[error("vm.manual_dirty_log_protect: {0}")]
    ManualDirtyLog(#[source] VmError),
    /// A memslot cannot be registered with the VM.
    #[error("memslot[{index}]: {source}")]
    Memslot {
        /// Index of the memslot in the scenario.
        index: usize,
        /// Why.
        source: VmError,
    },
    /// The identity layout's page tables cannot be built.
    #[error("{0}")]
    PageTables(String),
    /// `memslot[0]` has no room for the identity layout's page tables.
    #[error("memslot[0] is too small for the identity page tables ({table_bytes} bytes after its first MiB)")]
    IdentityNoRoom {
        /// The bytes the tables need.
        table_bytes: u64,
    },
    /// The identity layout's page tables would exceed their limit
    /// (`crate::machine::IDENTITY_TABLES_LIMIT`).
    #[error(
        "memslot[{slot}]: the identity layout maps every page before the run; its {size} bytes of {page_kib} KiB \
         pages (with the other slots and MMIO windows) need {bytes} bytes of guest page tables, beyond the limit \
         of {limit} bytes ({} MiB): give the slot a bigger guest_page_size (\"2m\" or \"1g\")",
        limit >> 20
    )]
    IdentityTooBig {
        /// The memslot that needs the most tables.
        slot: usize,
        /// Its size in bytes.
        size: u64,
        /// Its guest page size in KiB.
        page_kib: u64,
        /// The bytes all the tables need.
        bytes: u64,
        /// The most they may take, in bytes.
        limit: u64,
    },
    /// A memslot is not aligned to its guest page size (identity layout).
    #[error("memslot[{slot}]: gpa and size must be multiples of its guest page size for the identity layout")]
    IdentityAlignment {
        /// The memslot.
        slot: usize,
    },
    /// A `workload` op names no workload.
    #[error("unknown workload `{name}`")]
    UnknownWorkload {
        /// The name given.
        name: String,
    },
    /// A host-side op's range runs past its memslot.
    #[error("{op}: offset {offset:#x} + size {size:#x} runs past the end of memslot[{slot}] ({len:#x} bytes)")]
    HostOpRange {
        /// The op.
        op: &'static str,
        /// Offset into the memslot.
        offset: u64,
        /// Size of the range.
        size: u64,
        /// The memslot.
        slot: u32,
        /// Its size in bytes.
        len: u64,
    },
    /// `switch-root` names a root not made yet.
    #[error("root: no root {root} (make one with new-root)")]
    NoRoot {
        /// The root number given.
        root: u32,
    },
    /// An op names a memslot the scenario does not have.
    #[error("{op}: no memslot {slot}")]
    NoMemslot {
        /// The op (`migrate`, `idle-tracking`).
        op: &'static str,
        /// The memslot given.
        slot: u32,
    },
    /// `--after-phase` names no phase.
    #[error("--after-phase: no phase `{name}` (phases: {})", phases.join(", "))]
    NoPhase {
        /// The name given.
        name: String,
        /// The phases there are.
        phases: Vec<String>,
    },
    /// `--workload` names no workload.
    #[error("--workload: `{name}` is not one of {}", Workload::NAMES.join(", "))]
    BadWorkload {
        /// The name given.
        name: String,
    },
    /// `--pages 0`.
    #[error("--pages: must be > 0")]
    ZeroPages,
    /// `--pages` pages from the data area run past the end of the 64-bit address space.
    #[error("--pages: {start:#x} + {pages} pages runs past the end of the 64-bit address space")]
    PagesPastEnd {
        /// The pages given.
        pages: u64,
        /// Where the workload starts (the data area).
        start: u64,
    },
    /// `--replay` with `--workload` or `--pages`.
    #[error("--replay: cannot be combined with --workload or --pages")]
    ReplayWithWorkload,
    /// `--replay` on a scenario without the guest kernel.
    #[error("--replay: needs the kernel layout (guest.layout = \"kernel\")")]
    ReplayLayout,
    /// `--guest-memory` is not a non-zero multiple of 2 MiB.
    #[error("--guest-memory: must be a non-zero multiple of 2 MiB")]
    GuestMemory,
    /// The `--replay` trace cannot be replayed as asked.
    #[error("--replay: {0}")]
    Replay(#[source] TraceError),
    /// The trace of a `replay` op cannot be opened or is not a vmmu trace.
    #[error("phase[{phase}].ops[{index}].trace: {source}")]
    ReplayOp {
        /// Index of the phase.
        phase: usize,
        /// Index of the op in the phase.
        index: usize,
        /// Why.
        source: TraceError,
    },
    /// The scenario made for `--replay` does not parse (a bug).
    #[error("{0}")]
    ReplayScenario(#[source] crate::scenario::ScenarioError),
}

/// The run itself failed: the guest, the VM or the host.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The failure of an op, with where the op is.
    #[error("{at}: {source}")]
    InOp {
        /// The op.
        at: OpAt,
        /// Its failure.
        source: Box<Failure>,
    },
    /// A vCPU access or control-register write failed.
    #[error("{0}")]
    Guest(#[from] GuestError),
    /// The guest kernel (or the VM under it) failed.
    #[error("{0}")]
    Kernel(#[from] KernelError),
    /// A host-side operation failed.
    #[error("{0}")]
    Host(#[from] HostError),
    /// The `audit` op found the MMU inconsistent.
    #[error("{0}")]
    Audit(#[from] AuditError),
    /// Under the identity layout the guest touched an address the layout does not map.
    #[error(
        "the guest took {exception}: the identity layout maps only the memslots and [[mmio]] windows (gva = gpa), \
         and has no guest kernel to handle a #PF"
    )]
    IdentityUnmapped {
        /// The not-present #PF.
        exception: Exception,
    },
    /// Under the identity layout the guest took an exception.
    #[error("the guest took {exception}, and the identity layout has no guest kernel to handle it")]
    IdentityException {
        /// The exception.
        exception: Exception,
    },
    /// `rewrite-entry`: the walk to the entry found a not-present entry.
    #[error("rewrite-entry: va {va:#x} has no level-{level} entry")]
    NoEntry {
        /// The address.
        va: u64,
        /// The level without an entry.
        level: u8,
    },
    /// `rewrite-entry`: the walk to the entry found a huge page above it.
    #[error("rewrite-entry: va {va:#x} is mapped by a huge page at level {level}")]
    HugeEntry {
        /// The address.
        va: u64,
        /// The huge page's level.
        level: u8,
    },
    /// `migrate`: a page of the slot cannot be read.
    #[error("migrate: reading page {page} of the slot: {source}")]
    MigrateRead {
        /// Page index in the slot.
        page: u64,
        /// Why.
        source: HostError,
    },
    /// `migrate`: the memslot is not registered with the VM.
    #[error("migrate: memslot {slot} is not registered")]
    MigrateUnregistered {
        /// The scenario's memslot index.
        slot: u32,
    },
    /// `migrate`: a memslot update or KVM_GET_DIRTY_LOG failed.
    #[error("migrate: {0}")]
    MigrateVm(#[source] VmError),
    /// `migrate`: the copy differs from guest memory after stop-and-copy.
    #[error(
        "migrate: {pages} pages of memslot {slot} differ from the copy after stop-and-copy (first gfns {}): \
         a write was not logged",
        first_gfns.iter().map(|g| format!("{g:#x}")).collect::<Vec<_>>().join(", ")
    )]
    MigrateMismatch {
        /// How many pages differ.
        pages: usize,
        /// The scenario's memslot index.
        slot: u32,
        /// The first (up to 8) of them.
        first_gfns: Vec<u64>,
    },
    /// `dirty-log-start`, `dirty-log-stop` or `dirty-log-harvest`: the memslot is not
    /// registered with the VM.
    #[error("dirty logging: memslot {slot} is not registered")]
    DirtyLogUnregistered {
        /// The scenario's memslot index.
        slot: u32,
    },
    /// A dirty-logging op's memslot update, KVM_GET_DIRTY_LOG or KVM_CLEAR_DIRTY_LOG failed.
    #[error("{op} on memslot {slot}: {source}")]
    DirtyLog {
        /// The op.
        op: &'static str,
        /// The scenario's memslot index.
        slot: u32,
        /// Why.
        source: VmError,
    },
    /// A replay failed.
    #[error("replay of {}: {source}", path.display())]
    Replay {
        /// The trace.
        path: PathBuf,
        /// Why.
        source: ReplayError,
    },
    /// The trace could not be written as the run went.
    #[error("writing the trace: {0}")]
    TraceWrite(#[source] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    fn at() -> OpAt {
        OpAt { phase: 1, phase_name: "p".into(), index: 2, op: "replay" }
    }

    #[test]
    fn an_ops_error_keeps_its_kind_and_says_where_the_op_is() {
        let e = RunError::from(Failure::NoEntry { va: 0x1000, level: 2 }).in_op(at());
        assert!(matches!(e, RunError::Failed(Failure::InOp { .. })));
        assert_eq!(
            e.to_string(),
            "phase[1].ops[2] (replay in phase \"p\"): rewrite-entry: va 0x1000 has no level-2 entry"
        );
        let e = RunError::from(ConfigError::ZeroPages).in_op(at());
        assert!(matches!(e, RunError::Config(ConfigError::InOp { .. })));
    }

    #[test]
    fn a_trace_that_cannot_be_opened_carries_the_io_error() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let msg = io.to_string();
        let e = RunError::from(ConfigError::Replay(TraceError::Open { path: "/x.vtr".into(), source: io }));
        assert_eq!(e.to_string(), format!("--replay: /x.vtr: {msg}"));
        // RunError is transparent: its source is the ConfigError's, the TraceError.
        let trace = e.source().and_then(|s| s.downcast_ref::<TraceError>()).expect("the TraceError");
        let io = trace.source().and_then(|s| s.downcast_ref::<std::io::Error>()).expect("the io::Error");
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn a_migration_mismatch_is_one_line() {
        let e = Failure::MigrateMismatch { pages: 2, slot: 0, first_gfns: vec![0x10, 0x11] };
        assert_eq!(
            e.to_string(),
            "migrate: 2 pages of memslot 0 differ from the copy after stop-and-copy (first gfns 0x10, 0x11): a write \
             was not logged"
        );
    }
}
