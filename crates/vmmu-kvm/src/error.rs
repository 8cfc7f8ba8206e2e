//! Errors of the real-KVM backend, each saying what failed and what to do about it.

/// What can go wrong when running a workload on `/dev/kvm`.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` could not be opened.
    #[error("/dev/kvm not accessible: {0} (is the kvm module loaded, and are you root or in the kvm group?)")]
    NoKvm(String),
    /// A KVM ioctl failed.
    #[error("{what} failed: {errno} (host: {host})")]
    Ioctl {
        /// The ioctl or step.
        what: &'static str,
        /// The errno as text.
        errno: String,
        /// The host kind, for context.
        host: String,
    },
    /// The host lacks a capability this backend needs.
    #[error("KVM lacks {0}; this backend needs it (kernel too old or vendor module without it)")]
    MissingCap(&'static str),
    /// `KVM_GET_STATS_FD` or reading the stats file failed.
    #[error("KVM binary stats fd: {0}")]
    StatsFd(String),
    /// The stats file is not in the documented format.
    #[error("{0}")]
    StatsFormat(String),
    /// Guest memory could not be allocated or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The workload is not valid (too many pages, ...).
    #[error("invalid workload: {0}")]
    Workload(String),
    /// iced-x86 could not assemble the guest code (a bug in the code generator).
    #[error("assembling guest code: {0}")]
    Assemble(String),
    /// The guest took an exception that its handlers treat as fatal.
    #[error("guest took exception {vector} ({name}) at rip {rip:#x}, error code {error_code:#x}, cr2 {cr2:#x}")]
    GuestException {
        /// The vector.
        vector: u8,
        /// The exception's mnemonic (#PF, #GP, ...).
        name: &'static str,
        /// The faulting RIP (from the exception frame).
        rip: u64,
        /// The error code (0 for exceptions without one).
        error_code: u64,
        /// CR2 at the time of the exit.
        cr2: u64,
    },
    /// The vCPU exited for a reason the workload never causes.
    #[error("unexpected vCPU exit {exit} at rip {rip:#x} during phase {phase}")]
    UnexpectedExit {
        /// The exit, as debug text.
        exit: String,
        /// RIP at the exit.
        rip: u64,
        /// The phase that was running.
        phase: usize,
    },
    /// KVM_TRANSLATE disagreed with the page tables the backend built.
    #[error("KVM_TRANSLATE oracle: {0}")]
    TranslateMismatch(String),
    /// tracefs is missing, not writable, or a tracefs file could not be read or written.
    #[error("{0}")]
    Trace(String),
    /// The guest did not finish within the exit budget.
    #[error("guest did not finish after {0} exits (runaway loop?)")]
    Runaway(u64),
}

impl KvmError {
    pub(crate) fn ioctl(what: &'static str, e: impl std::fmt::Display) -> Self {
        KvmError::Ioctl { what, errno: e.to_string(), host: crate::host::HostKind::detect().to_string() }
    }
}
