//! Runs a scenario: builds the host, the VM, its memslots and vCPUs, boots the guest and
//! drives it through the phases, collecting KVM's statistics per phase.

use crate::scenario::{page_shift, Op, Scenario};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use vmmu::host::{Backing, FrameAllocator, HostMm, Hva};
use vmmu::hw::cpu::Exception;
use vmmu::memslot::{MemslotFlags, UserspaceMemoryRegion};
use vmmu::mmio_bus::LatchDevice;
use vmmu::stats::LatencyHistogram;
use vmmu::x86_paging::addr::{Gpa, Gva};
use vmmu::x86_paging::regs::{Cr0, Cr4, Efer};
use vmmu::{Kvm, MmuKind, TdpKind, Vcpu, VmConfig};
use vmmu_guest::kernel::{KernelConfig, KernelError};
use vmmu_guest::pagetable::{FrameBump, PageTableBuilder, PteFlags};
use vmmu_guest::workload::{self, FlatSpace, KernelSpace, Workload};
use vmmu_guest::GuestKernel;

/// Which tracer to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceMode {
    /// No tracing.
    Off,
    /// Tracepoints.
    Events,
    /// The function_graph tracer.
    FunctionGraph,
}

/// Command-line overrides.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// `--mmu`.
    pub mmu: Option<String>,
    /// `--workload` (replaces the phases with two passes of it).
    pub workload: Option<String>,
    /// `--pages`.
    pub pages: Option<u64>,
    /// `--trace`.
    pub trace: TraceMode,
    /// `--replay`: replaces the phases with two passes over this trace.
    pub replay: Option<std::path::PathBuf>,
    /// Keep the raw trace records ([`RunResult::trace_records`]) instead of rendering them
    /// as text, recording both tracepoints and function spans whatever `trace` says (for
    /// the Chrome/Perfetto export, `--trace-out FILE.json`). Only with `trace` on.
    pub trace_records: bool,
    /// Time each MMU exit's handling ([`vmmu::Vcpu::set_fault_timing`]) and report a
    /// histogram per phase in [`PhaseResult::fault_latency`] (used by `vmmu sweep`).
    pub fault_timing: bool,
    /// With `trace` = events (and not `trace_records`): write the trace here as the run
    /// goes instead of keeping it ([`RunResult::trace`] is then `None`).
    pub trace_stream: Option<TraceStream>,
}

/// Where a `--trace events` trace is written as the run goes, shared by the runs of a
/// compare list (their traces separated by an empty line, as when they are printed at the
/// end). It keeps its first write error.
#[derive(Clone)]
pub struct TraceStream {
    out: Arc<std::sync::Mutex<Box<dyn std::io::Write + Send>>>,
    runs: Arc<std::sync::atomic::AtomicUsize>,
    error: Arc<std::sync::Mutex<Option<(std::io::ErrorKind, String)>>>,
}

impl std::fmt::Debug for TraceStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceStream").field("error", &self.error()).finish_non_exhaustive()
    }
}

impl TraceStream {
    /// A stream into `out`.
    pub fn new(out: Box<dyn std::io::Write + Send>) -> Self {
        TraceStream { out: Arc::new(std::sync::Mutex::new(out)), runs: Arc::default(), error: Arc::default() }
    }

    /// The kind of the first write error, if any.
    pub fn error(&self) -> Option<std::io::ErrorKind> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(k, _)| *k)
    }

    /// The first write error as the system reported it, if any.
    pub fn error_message(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(_, m)| m.clone())
    }

    fn keep<T>(&self, r: std::io::Result<T>) -> std::io::Result<T> {
        if let Err(e) = &r {
            self.error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(|| (e.kind(), e.to_string()));
        }
        r
    }
}

impl std::io::Write for TraceStream {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let r = self.out.lock().unwrap_or_else(|e| e.into_inner()).write(b);
        self.keep(r)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let r = self.out.lock().unwrap_or_else(|e| e.into_inner()).flush();
        self.keep(r)
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            mmu: None,
            workload: None,
            pages: None,
            trace: TraceMode::Off,
            replay: None,
            trace_records: false,
            fault_timing: false,
            trace_stream: None,
        }
    }
}

/// Hardware counters of a phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct HwSummary {
    /// TLB hits.
    pub tlb_hits: u64,
    /// TLB misses.
    pub tlb_misses: u64,
    /// Page walks.
    pub walks: u64,
    /// Memory references made by page walks.
    pub walk_mem_refs: u64,
}

/// One phase's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PhaseResult {
    /// Name.
    pub name: String,
    /// Wall time.
    pub wall_ns: u64,
    /// Guest accesses made by the workload ops (not counting the guest kernel's own).
    pub accesses: u64,
    /// KVM statistics: counters as deltas over the phase, gauges (pages_*, tdp_mmu_pages)
    /// as values at its end.
    pub stats: BTreeMap<String, i64>,
    /// Hardware-model counters.
    pub hw: HwSummary,
    /// With `--trace events`: the phase's events, as an index range into the event lines of
    /// [`RunResult::trace`] (the lines that are not `#` comments), so a trace can be split
    /// into phases exactly. Empty otherwise.
    #[serde(skip)]
    pub trace_events: std::ops::Range<usize>,
    /// Per-fault handling times over the phase, all vCPUs together (with
    /// [`RunOptions::fault_timing`]; not in the `--json` object).
    #[serde(skip)]
    pub fault_latency: Option<LatencyHistogram>,
}

/// A whole run's result (the `--json` object).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunResult {
    /// Scenario name.
    pub scenario: String,
    /// MMU.
    pub mmu: String,
    /// Phases.
    pub phases: Vec<PhaseResult>,
    /// Statistics at the end of the run (including boot).
    pub stats: BTreeMap<String, i64>,
    /// Host-side accounting.
    pub host: HostSummary,
    /// The `migrate` ops' per-round reports.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub migrations: Vec<crate::migrate::MigrationReport>,
    /// The `idle-tracking` ops' per-pass reports.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub idle_tracking: Vec<crate::idle::IdleReport>,
    /// The `replay` ops' reports.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replays: Vec<crate::replay::ReplayReport>,
    /// Rendered trace, if tracing.
    #[serde(skip)]
    pub trace: Option<String>,
    /// The raw trace records, with [`RunOptions::trace_records`].
    #[serde(skip)]
    pub trace_records: Vec<vmmu::trace::Record>,
}

/// What the host spent.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct HostSummary {
    /// 4 KiB host frames in use (guest memory, page tables, MMU tables).
    pub frames_4k: u64,
    /// 2 MiB host frames in use.
    pub frames_2m: u64,
    /// Host page-table pages of the VMM's address space.
    pub host_pt_pages: u64,
    /// MMU page-table pages (tdp_mmu_pages) as bytes.
    pub mmu_table_bytes: u64,
}

/// A run failure (bad configuration, or the guest or VM failed).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The scenario asks for something invalid or unsupported.
    #[error("{0}")]
    Config(String),
    /// The run itself failed.
    #[error("{0}")]
    Failed(String),
}

/// Statistics that are values (gauges), not counters: reported at a phase's end, not as
/// deltas.
pub const GAUGES: &[&str] = &[
    "pages_4k",
    "pages_2m",
    "pages_1g",
    "tdp_mmu_pages",
    "mmu_unsync",
    "nx_lpage_splits",
    "max_mmu_rmap_size",
    "max_mmu_page_hash_collisions",
];

impl RunError {
    /// The error with the op it happened in: `phase[P].ops[I] (OP in phase "NAME"): ...`.
    fn in_op(self, phase: (usize, &str), index: usize, op: &Op) -> RunError {
        let at = |m: String| format!("phase[{}].ops[{index}] ({} in phase \"{}\"): {m}", phase.0, op.name(), phase.1);
        match self {
            RunError::Config(m) => RunError::Config(at(m)),
            RunError::Failed(m) => RunError::Failed(at(m)),
        }
    }
}

fn cfg_err(e: impl std::fmt::Display) -> RunError {
    RunError::Config(e.to_string())
}

fn run_err(e: impl std::fmt::Display) -> RunError {
    RunError::Failed(e.to_string())
}

/// The guest as set up for the run.
enum Guest {
    Kernel(Box<GuestKernel>),
    /// Identity layout, with the top-level tables the guest can switch among (boot first).
    Identity {
        roots: Vec<u64>,
        levels: u8,
    },
}

/// A built VM with its vCPUs and booted guest.
pub struct Machine {
    /// The VM.
    pub kvm: Arc<Kvm>,
    /// Its vCPUs.
    pub vcpus: Vec<Vcpu>,
    /// Memslots: (gpa, size, hva).
    pub slots: Vec<(u64, u64, Hva)>,
    guest: Guest,
    /// Where workload data starts (identity: after the page tables; kernel: USER_BASE).
    pub data_start: u64,
    /// Reports of the `migrate` ops run so far.
    pub migrations: Vec<crate::migrate::MigrationReport>,
    /// Reports of the `idle-tracking` ops run so far.
    pub idle_tracking: Vec<crate::idle::IdleReport>,
    /// Reports of the `replay` ops run so far.
    pub replays: Vec<crate::replay::ReplayReport>,
    /// The phase being run (named in replay reports).
    phase: String,
}

fn vm_config(s: &Scenario, variant: &str) -> Result<VmConfig, RunError> {
    let (mmu, v) = s.vm.variant(variant).map_err(|e| RunError::Config(format!("--mmu: {e}")))?;
    Ok(VmConfig {
        mmu: match mmu.as_str() {
            "tdp" => MmuKind::Tdp,
            "shadow" => MmuKind::Shadow,
            _ => MmuKind::LegacyTdp,
        },
        tdp: if v.tdp == "npt" { TdpKind::Npt } else { TdpKind::Ept },
        eptad: v.eptad,
        max_tdp_level: v.max_tdp_level,
        maxphyaddr: v.maxphyaddr,
        nx_huge_pages: v.nx_huge_pages,
        nx_huge_pages_recovery_ratio: v.nx_huge_pages_recovery_ratio,
        nx_huge_pages_recovery_period_ms: v.nx_huge_pages_recovery_period_ms,
        mmio_caching: v.mmio_caching,
        tdp_huge_page_level: ((page_shift(&v.tdp_huge_page).unwrap_or(30) - 12) / 9 + 1) as u8,
        eager_page_split: v.eager_page_split,
        pml: v.pml,
    })
}

/// The most page-table memory the identity layout builds before the run: enough for 32 GiB
/// of 4 KiB pages, 16 TiB of 2 MiB pages or the whole guest-physical space in 1 GiB pages.
pub const IDENTITY_TABLES_LIMIT: u64 = 64 << 20;

/// Refuses an identity layout whose page tables, all built before the first phase, would
/// take more than [`IDENTITY_TABLES_LIMIT`] (a 1 TiB slot of 4 KiB pages: 2 GiB and most
/// of a minute).
fn check_identity_tables(s: &Scenario, levels: u8) -> Result<(), RunError> {
    use vmmu_guest::pagetable::tables_needed;
    let mut ranges = Vec::new();
    for ms in &s.memslots {
        let shift = page_shift(ms.guest_page_size.as_deref().unwrap_or(&s.guest.page_size)).unwrap_or(12);
        ranges.push((ms.gpa.0, ms.size.0, shift));
    }
    for mm in &s.mmio {
        ranges.push((mm.gpa.0 & !4095, mm.size.0.next_multiple_of(4096), 12));
    }
    let bytes = (1 + tables_needed(&ranges, levels)) * 4096; // with the root
    if bytes > IDENTITY_TABLES_LIMIT {
        // Name the slot that needs the most.
        let (i, (_, size, shift)) = ranges[..s.memslots.len()]
            .iter()
            .enumerate()
            .max_by_key(|(_, r)| tables_needed(&[**r], levels))
            .map(|(i, r)| (i, *r))
            .unwrap_or((0, (0, 0, 12)));
        return Err(RunError::Config(format!(
            "memslot[{i}]: the identity layout maps every page before the run; its {size} bytes of {} KiB pages (with the other slots and MMIO windows) need {bytes} bytes of guest page tables, beyond the limit of {IDENTITY_TABLES_LIMIT} bytes (64 MiB): give the slot a bigger guest_page_size (\"2m\" or \"1g\")",
            (1u64 << shift) >> 10
        )));
    }
    Ok(())
}

fn boot_identity(m: &mut Machine, s: &Scenario) -> Result<(), RunError> {
    let (base, size, _) = m.slots[0];
    let total_pages: u64 = s.memslots.iter().map(|x| x.size.0 / 4096).sum();
    let table_bytes = (total_pages / 512 + total_pages / (512 * 512) + 64) * 4096;
    let start = base + (1 << 20);
    let end = start + table_bytes;
    if end > base + size {
        return Err(RunError::Config(format!(
            "memslot[0] is too small for the identity page tables ({table_bytes} bytes after its first MiB)"
        )));
    }
    let levels = if s.guest.paging == "5-level" { 5 } else { 4 };
    check_identity_tables(s, levels)?;
    let mut alloc = FrameBump::new(start, end);
    let mut b = PageTableBuilder::new(&*m.kvm, &mut alloc, levels).map_err(cfg_err)?;
    let preset = s.guest.accessed_dirty == "preset";
    b.accessed = preset;
    let flags =
        PteFlags { writable: true, user: s.guest.user, nx: false, global: false, accessed: preset, dirty: preset };
    for (i, ms) in s.memslots.iter().enumerate() {
        let shift = page_shift(ms.guest_page_size.as_deref().unwrap_or(&s.guest.page_size)).unwrap_or(12);
        let step = 1u64 << shift;
        if ms.gpa.0 % step != 0 || ms.size.0 % step != 0 {
            return Err(RunError::Config(format!(
                "memslot[{i}]: gpa and size must be multiples of its guest page size for the identity layout"
            )));
        }
        b.map_range(&mut alloc, ms.gpa.0, ms.gpa.0, ms.size.0, shift, flags).map_err(cfg_err)?;
    }
    for mm in &s.mmio {
        b.map_range(&mut alloc, mm.gpa.0 & !4095, mm.gpa.0 & !4095, mm.size.0.next_multiple_of(4096), 12, flags)
            .map_err(cfg_err)?;
    }
    let root = b.root.raw();
    m.guest = Guest::Identity { roots: vec![root], levels };
    for v in m.vcpus.iter_mut() {
        let mut cr4 = Cr4::PAE | Cr4::PGE;
        if levels == 5 {
            cr4 |= Cr4::LA57;
        }
        v.write_cr4(cr4).map_err(run_err)?;
        v.write_efer(Efer::LME | Efer::NXE).map_err(run_err)?;
        v.write_cr3(root).map_err(run_err)?;
        v.write_cr0(Cr0::PE | Cr0::WP | Cr0::PG).map_err(run_err)?;
        v.set_cpl(if s.guest.user { 3 } else { 0 });
    }
    // At least 1 MiB of free pages between the tables and the data (for new-root).
    m.data_start = (end + (1 << 20) + (16 << 20) - 1) & !((16 << 20) - 1);
    Ok(())
}

/// Builds the host, the VM, memslots and vCPUs, and boots the guest.
pub fn build(s: &Scenario, opts: &RunOptions) -> Result<Machine, RunError> {
    let mmu = opts.mmu.clone().unwrap_or_else(|| s.vm.mmu.clone());
    let cfg = vm_config(s, &mmu)?;
    let frames = Arc::new(FrameAllocator::new(s.vm.host_memory.0).map_err(cfg_err)?);
    let host = Arc::new(HostMm::new(frames).map_err(cfg_err)?);
    let kvm = Kvm::new(cfg, host.clone()).map_err(cfg_err)?;
    let mut slots = Vec::new();
    for (i, ms) in s.memslots.iter().enumerate() {
        let backing = if ms.backing == "thp" { Backing::Thp } else { Backing::Anon4k };
        let hva = host
            .mmap(ms.size.0, backing, true, ms.prefault)
            .map_err(|e| RunError::Config(format!("memslot[{i}]: {e}")))?;
        let flags = if ms.readonly { MemslotFlags::READONLY } else { MemslotFlags::empty() };
        kvm.set_user_memory_region(UserspaceMemoryRegion {
            slot: i as u32,
            flags,
            guest_phys_addr: ms.gpa.0,
            memory_size: ms.size.0,
            userspace_addr: hva,
        })
        .map_err(|e| RunError::Config(format!("memslot[{i}]: {e}")))?;
        slots.push((ms.gpa.0, ms.size.0, hva));
    }
    for mm in &s.mmio {
        kvm.register_mmio(Gpa::new(mm.gpa.0), mm.size.0, Arc::new(LatchDevice::default()));
    }
    let mut vcpus = Vec::new();
    for _ in 0..s.guest.vcpus {
        vcpus.push(kvm.create_vcpu().map_err(cfg_err)?);
    }
    let mut m = Machine {
        kvm: kvm.clone(),
        vcpus,
        slots,
        guest: Guest::Identity { roots: Vec::new(), levels: 4 },
        data_start: 16 << 20,
        migrations: Vec::new(),
        idle_tracking: Vec::new(),
        replays: Vec::new(),
        phase: String::new(),
    };
    if s.guest.layout == "kernel" {
        let mem_size = s.memslots.iter().map(|x| x.gpa.0 + x.size.0).max().unwrap_or(0);
        let kc = KernelConfig {
            mem_size,
            nodes: s.memslots.iter().filter(|x| !x.readonly).map(|x| (x.gpa.0, x.gpa.0 + x.size.0)).collect(),
            direct_map_shift: page_shift(&s.guest.page_size).unwrap_or(21),
            levels: if s.guest.paging == "5-level" { 5 } else { 4 },
            pcid: s.guest.pcid,
        };
        let mut k = GuestKernel::boot(&*kvm, &mut m.vcpus[0], kc).map_err(run_err)?;
        for _ in 0..s.guest.processes {
            k.create_process(&mut m.vcpus[0]).map_err(run_err)?;
        }
        k.switch_to(&mut m.vcpus[0], 1).map_err(run_err)?;
        m.guest = Guest::Kernel(Box::new(k));
        m.data_start = vmmu_guest::kernel::USER_BASE;
    } else {
        boot_identity(&mut m, s)?;
    }
    Ok(m)
}

fn stats_now(m: &Machine) -> (BTreeMap<String, i64>, HwSummary) {
    let mut st: BTreeMap<String, i64> = m.kvm.vm_stats().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    // The host side, as deltas per phase: frames allocated (negative: freed) and KSM's
    // counters (/sys/kernel/mm/ksm).
    let host = m.kvm.host();
    let (counts, ksm) = (host.frames().counts(), host.ksm_stats());
    st.insert("host_frames_4k".into(), counts.frames_4k as i64);
    st.insert("host_frames_2m".into(), counts.frames_2m as i64);
    st.insert("host_ksm_pages_shared".into(), ksm.pages_shared as i64);
    st.insert("host_ksm_pages_sharing".into(), ksm.pages_sharing as i64);
    let mut hw = HwSummary::default();
    for v in &m.vcpus {
        for (k, x) in v.stats() {
            *st.entry(k.to_string()).or_insert(0) += x;
        }
        let c = v.cpu();
        hw.tlb_hits += c.tlb().counters.hits;
        hw.tlb_misses += c.tlb().counters.misses;
        hw.walks += c.counters.walks;
        hw.walk_mem_refs += c.counters.walk_mem_refs;
    }
    (st, hw)
}

/// Runs one workload over [start, start+pages) on the guest.
fn run_workload(m: &mut Machine, w: Workload, start: u64, pages: u64) -> Result<u64, RunError> {
    match &mut m.guest {
        Guest::Kernel(k) => {
            let pid = current_pid(k);
            ensure_mapped(k, pid, start, pages)?;
            let st = workload::run(w, &mut KernelSpace { kernel: k, cpu: &mut m.vcpus[0] }, start, pages)
                .map_err(run_err)?;
            Ok(st.accesses)
        }
        Guest::Identity { .. } => {
            let n = m.vcpus.len() as u64;
            if n == 1 {
                let st =
                    workload::run(w, &mut FlatSpace { cpu: &mut m.vcpus[0] }, start, pages).map_err(identity_err)?;
                return Ok(st.accesses);
            }
            let per = pages.div_ceil(n);
            let results: Vec<Result<u64, KernelError>> = std::thread::scope(|sc| {
                let hs: Vec<_> = m
                    .vcpus
                    .iter_mut()
                    .enumerate()
                    .map(|(i, v)| {
                        sc.spawn(move || {
                            let s0 = i as u64 * per;
                            let cnt = per.min(pages.saturating_sub(s0));
                            let r = if cnt == 0 {
                                Ok(0)
                            } else {
                                workload::run(w, &mut FlatSpace { cpu: &mut *v }, start + s0 * 4096, cnt)
                                    .map(|s| s.accesses)
                            };
                            v.exit_guest();
                            r
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(KernelError::Invalid("vCPU thread panicked".into()))))
                    .collect()
            });
            let mut total = 0;
            for r in results {
                total += r.map_err(identity_err)?;
            }
            Ok(total)
        }
    }
}

/// A workload's failure under the identity layout, in its terms: there is no guest kernel to
/// handle a #PF, so a not-present one means the op touched an address the layout does not map.
fn identity_err(e: KernelError) -> RunError {
    match e {
        KernelError::Guest(vmmu::GuestError::Exception(x @ Exception::PageFault { error_code, .. }))
            if !error_code.is_present() =>
        {
            RunError::Failed(format!(
                "the guest took {x}: the identity layout maps only the memslots and [[mmio]] windows (gva = gpa), \
                 and has no guest kernel to handle a #PF"
            ))
        }
        KernelError::Guest(vmmu::GuestError::Exception(x)) => {
            RunError::Failed(format!("the guest took {x}, and the identity layout has no guest kernel to handle it"))
        }
        e => run_err(e),
    }
}

/// The address of the level-`level` guest entry mapping `va`, read through the identity map.
fn entry_addr(v: &mut Vcpu, va: u64, level: u8, levels: u8) -> Result<u64, RunError> {
    let mut table = v.cpu().paging().cr3 & 0x000f_ffff_ffff_f000;
    for l in (level + 1..=levels).rev() {
        let at = table + ((va >> (12 + 9 * (u32::from(l) - 1))) & 511) * 8;
        let e = v.read(Gva::new(at), 8).map_err(run_err)?;
        if e & 1 == 0 {
            return Err(RunError::Failed(format!("rewrite-entry: va {va:#x} has no level-{l} entry")));
        }
        if e & 0x80 != 0 {
            return Err(RunError::Failed(format!("rewrite-entry: va {va:#x} is mapped by a huge page at level {l}")));
        }
        table = e & 0x000f_ffff_ffff_f000;
    }
    Ok(table + ((va >> (12 + 9 * (u32::from(level) - 1))) & 511) * 8)
}

fn current_pid(k: &GuestKernel) -> u32 {
    k.current_pid().unwrap_or(1)
}

fn ensure_mapped(k: &mut GuestKernel, pid: u32, start: u64, pages: u64) -> Result<(), RunError> {
    let end = start + pages * 4096;
    let covered = k
        .processes()
        .iter()
        .find(|p| p.pid == pid)
        .is_some_and(|p| p.vmas.iter().any(|v| v.start <= start && v.end >= end));
    if !covered {
        k.mmap(pid, start & !4095, end - (start & !4095), true).map_err(run_err)?;
    }
    Ok(())
}

/// A workload by name, with the scenario's optional access count and seed.
fn make_workload(name: &str, pages: u64, accesses: Option<u64>, seed: Option<u64>) -> Result<Workload, RunError> {
    let mut w = Workload::parse(name, pages).ok_or_else(|| RunError::Config(format!("unknown workload `{name}`")))?;
    if let Workload::Random { accesses: a, seed: s } | Workload::Zipf { accesses: a, seed: s, .. } = &mut w {
        if let Some(x) = accesses {
            *a = x;
        }
        if let Some(x) = seed {
            *s = x;
        }
    }
    Ok(w)
}

fn run_op(m: &mut Machine, op: &Op) -> Result<u64, RunError> {
    match op {
        Op::Write { start, pages } => run_workload(m, Workload::FirstTouch, start.0, *pages),
        Op::Read { start, pages } => run_workload(m, Workload::Read, start.0, *pages),
        Op::Fetch { start, pages } => run_workload(m, Workload::Fetch, start.0, *pages),
        Op::ReadThenWrite { start, pages } => run_workload(m, Workload::ReadThenWrite, start.0, *pages),
        Op::Workload { name, start, pages, accesses, seed } => {
            let w = make_workload(name, *pages, *accesses, *seed)?;
            run_workload(m, w, start.0, *pages)
        }
        Op::Migrate { slot, workload, start, pages, accesses, seed, max_rounds, stop_pages } => {
            let plan = crate::migrate::Plan { slot: *slot, max_rounds: *max_rounds, stop_pages: *stop_pages };
            let mut next_seed = seed.unwrap_or(1);
            let mut guest_round = |m: &mut Machine| {
                let w = make_workload(workload, *pages, *accesses, Some(next_seed))?;
                next_seed += 1;
                run_workload(m, w, start.0, *pages)
            };
            let report = crate::migrate::run(m, &plan, &mut guest_round)?;
            let accesses = report.rounds.iter().map(|r| r.guest_accesses).sum();
            m.migrations.push(report);
            Ok(accesses)
        }
        Op::IdleTracking { slot, workload, start, pages, accesses, seed, passes } => {
            let mut guest_pass = |m: &mut Machine| {
                let w = make_workload(workload, *pages, *accesses, *seed)?;
                run_workload(m, w, start.0, *pages)
            };
            let report = crate::idle::run(m, *slot, *passes, &mut guest_pass)?;
            let accesses = report.passes.iter().map(|p| p.guest_accesses).sum();
            m.idle_tracking.push(report);
            Ok(accesses)
        }
        Op::Switch { process } => {
            if let Guest::Kernel(k) = &mut m.guest {
                k.switch_to(&mut m.vcpus[0], *process).map_err(run_err)?;
            }
            Ok(0)
        }
        Op::Munmap { start, pages } => {
            if let Guest::Kernel(k) = &mut m.guest {
                let pid = current_pid(k);
                k.munmap(&mut m.vcpus[0], pid, start.0, pages * 4096).map_err(run_err)?;
            }
            Ok(0)
        }
        Op::Invlpg { addr } => {
            for v in m.vcpus.iter_mut() {
                v.invlpg(Gva::new(addr.0));
            }
            Ok(0)
        }
        Op::MadviseDontneed { slot, offset, size }
        | Op::MigratePages { slot, offset, size }
        | Op::SwapOut { slot, offset, size }
        | Op::ThpSplit { slot, offset, size }
        | Op::ThpCollapse { slot, offset, size }
        | Op::KsmMerge { slot, offset, size } => {
            let name = match op {
                Op::MadviseDontneed { .. } => "madvise-dontneed",
                Op::MigratePages { .. } => "migrate-pages",
                Op::SwapOut { .. } => "swap-out",
                Op::ThpSplit { .. } => "thp-split",
                Op::KsmMerge { .. } => "ksm-merge",
                _ => "thp-collapse",
            };
            // Scenario::validate refuses these up front; this guards a scenario built in code.
            let (_, len, hva) = m.slots[*slot as usize];
            if offset.0.checked_add(size.0).is_none_or(|end| end > len) {
                return Err(RunError::Config(format!(
                    "{name}: offset {:#x} + size {:#x} runs past the end of memslot[{slot}] ({len:#x} bytes)",
                    offset.0, size.0
                )));
            }
            for v in m.vcpus.iter_mut() {
                v.exit_guest();
            }
            let host = m.kvm.host();
            let at = Hva(hva.raw() + offset.0);
            match op {
                Op::MadviseDontneed { .. } => host.madvise_dontneed(at, size.0).map_err(run_err)?,
                Op::MigratePages { .. } => {
                    host.migrate_pages(at, size.0).map_err(run_err)?;
                }
                Op::SwapOut { .. } => {
                    host.swap_out(at, size.0).map_err(run_err)?;
                }
                Op::ThpSplit { .. } => {
                    host.split_huge_pages(at, size.0).map_err(run_err)?;
                }
                Op::KsmMerge { .. } => {
                    host.ksm_merge(at, size.0).map_err(run_err)?;
                }
                _ => {
                    host.collapse_huge_pages(at, size.0).map_err(run_err)?;
                }
            }
            Ok(0)
        }
        Op::Fork | Op::Exec | Op::Exit { .. } | Op::ProcessChurn { .. } => {
            let Guest::Kernel(k) = &mut m.guest else { return Ok(0) };
            let cpu = &mut m.vcpus[0];
            let cur = current_pid(k);
            match op {
                Op::Fork => {
                    k.fork(cpu, cur).map_err(run_err)?;
                    Ok(0)
                }
                Op::Exec => {
                    k.exec(cpu, cur).map_err(run_err)?;
                    Ok(0)
                }
                Op::Exit { process } => {
                    k.exit(cpu, *process).map_err(run_err)?;
                    Ok(0)
                }
                Op::ProcessChurn { iterations, start, pages } => {
                    let mut accesses = 0;
                    ensure_mapped(k, cur, start.0, *pages)?;
                    for _ in 0..*iterations {
                        let child = k.fork(cpu, cur).map_err(run_err)?;
                        k.switch_to(cpu, child).map_err(run_err)?;
                        accesses +=
                            workload::run(Workload::FirstTouch, &mut KernelSpace { kernel: k, cpu }, start.0, *pages)
                                .map_err(run_err)?
                                .accesses;
                        // munmap the second half (PTE clears + INVLPG), then exec drops the rest.
                        let half = (*pages / 2) * 4096;
                        if half > 0 {
                            k.munmap(cpu, child, start.0 + half, *pages * 4096 - half).map_err(run_err)?;
                        }
                        k.exec(cpu, child).map_err(run_err)?;
                        ensure_mapped(k, child, start.0, *pages)?;
                        accesses +=
                            workload::run(Workload::FirstTouch, &mut KernelSpace { kernel: k, cpu }, start.0, *pages)
                                .map_err(run_err)?
                                .accesses;
                        k.switch_to(cpu, cur).map_err(run_err)?;
                        k.exit(cpu, child).map_err(run_err)?;
                    }
                    Ok(accesses)
                }
                _ => Ok(0),
            }
        }
        Op::RewriteEntry { va, level, clear, set, target } => {
            let Guest::Identity { levels, .. } = &m.guest else { return Ok(0) };
            let levels = *levels;
            let v = &mut m.vcpus[0];
            let at = entry_addr(v, va.0, *level, levels)?;
            let old = v.read(Gva::new(at), 8).map_err(run_err)?;
            let mut new = (old & !clear.0) | set.0;
            if let Some(t) = target {
                new = (new & !0x000f_ffff_ffff_f000) | (t.0 & 0x000f_ffff_ffff_f000);
            }
            v.write(Gva::new(at), 8, new).map_err(run_err)?;
            Ok(2)
        }
        Op::NewRoot => {
            let Guest::Identity { roots, .. } = &mut m.guest else { return Ok(0) };
            let v = &mut m.vcpus[0];
            let boot = roots[0];
            // A free page just below the data area, one per new root.
            let page = m.data_start - 4096 * (roots.len() as u64);
            for i in 0..512u64 {
                let e = v.read(Gva::new(boot + i * 8), 8).map_err(run_err)?;
                v.write(Gva::new(page + i * 8), 8, e).map_err(run_err)?;
            }
            roots.push(page);
            Ok(1024)
        }
        Op::SwitchRoot { root } => {
            let Guest::Identity { roots, .. } = &m.guest else { return Ok(0) };
            let cr3 = *roots
                .get(*root as usize)
                .ok_or_else(|| RunError::Config(format!("root: no root {root} (make one with new-root)")))?;
            for v in m.vcpus.iter_mut() {
                v.write_cr3(cr3).map_err(run_err)?;
            }
            Ok(0)
        }
        Op::NxRecovery { passes } => {
            for v in m.vcpus.iter_mut() {
                v.exit_guest();
            }
            for _ in 0..*passes {
                m.kvm.nx_huge_page_recovery();
            }
            Ok(0)
        }
        Op::Audit => {
            for v in m.vcpus.iter_mut() {
                v.exit_guest();
            }
            m.kvm.audit().map_err(run_err)?;
            Ok(0)
        }
        Op::Replay { trace } => {
            let Guest::Kernel(k) = &mut m.guest else { return Ok(0) };
            let r = crate::replay::run(k, &mut m.vcpus[0], std::path::Path::new(trace), &m.phase)?;
            let records = r.stats.records;
            m.replays.push(r);
            Ok(records)
        }
    }
}

/// The phases to run: the scenario's, or two passes of `--replay` or of `--workload`.
fn phases(s: &Scenario, opts: &RunOptions, data_start: u64) -> Vec<crate::scenario::Phase> {
    if let Some(t) = &opts.replay {
        let op = Op::Replay { trace: t.display().to_string() };
        return ["pass1", "pass2"]
            .iter()
            .map(|n| crate::scenario::Phase { name: n.to_string(), ops: vec![op.clone()] })
            .collect();
    }
    match (&opts.workload, opts.pages) {
        (None, None) => s.phases.clone(),
        (w, p) => {
            let name = w.clone().unwrap_or_else(|| "first-touch".into());
            let pages = p.unwrap_or(16384);
            let second = if name == "first-touch" { "re-touch".to_string() } else { name.clone() };
            let op = |n: &str| Op::Workload {
                name: n.to_string(),
                start: crate::scenario::Size(data_start),
                pages,
                accesses: None,
                seed: None,
            };
            vec![
                crate::scenario::Phase { name: "pass1".into(), ops: vec![op(&name)] },
                crate::scenario::Phase { name: "pass2".into(), ops: vec![op(&second)] },
            ]
        }
    }
}

/// Checks what the scenario names outside itself before anything runs: the trace file of
/// each `replay` op can be opened and is a vmmu trace (`phase[P].ops[I].trace: ...`).
fn precheck(s: &Scenario, opts: &RunOptions) -> Result<(), RunError> {
    if opts.replay.is_some() || opts.workload.is_some() || opts.pages.is_some() {
        return Ok(()); // the scenario's phases are replaced
    }
    for (pi, p) in s.phases.iter().enumerate() {
        for (oi, op) in p.ops.iter().enumerate() {
            if let Op::Replay { trace } = op {
                crate::replay::header_counts(std::path::Path::new(trace)).map_err(|e| {
                    RunError::Config(format!(
                        "phase[{pi}].ops[{oi}].trace: {}",
                        e.to_string().trim_start_matches("--replay: ")
                    ))
                })?;
            }
        }
    }
    Ok(())
}

/// Builds `s`'s machine and runs its phases (or `--workload`'s) in order, up to and including
/// `after_phase` (all of them when `None`), and returns the machine in that state (for
/// `vmmu explain`). Nothing is traced.
pub fn run_to(s: &Scenario, opts: &RunOptions, after_phase: Option<&str>) -> Result<Machine, RunError> {
    precheck(s, opts)?;
    let mut m = build(s, opts)?;
    let phases = phases(s, opts, m.data_start);
    if let Some(name) = after_phase {
        if !phases.iter().any(|p| p.name == name) {
            let names: Vec<&str> = phases.iter().map(|p| p.name.as_str()).collect();
            return Err(RunError::Config(format!("--after-phase: no phase `{name}` (phases: {})", names.join(", "))));
        }
    }
    for (pi, ph) in phases.iter().enumerate() {
        m.phase.clone_from(&ph.name);
        for (i, op) in ph.ops.iter().enumerate() {
            run_op(&mut m, op).map_err(|e| e.in_op((pi, &ph.name), i, op))?;
        }
        if Some(ph.name.as_str()) == after_phase {
            break;
        }
    }
    for v in m.vcpus.iter_mut() {
        v.exit_guest();
    }
    Ok(m)
}

/// Runs `s` once per MMU of its `compare` list (or once, with `--mmu` or no list).
pub fn run_compare(
    s: &Scenario,
    opts: &RunOptions,
    mut progress: impl FnMut(&str, f64),
) -> Result<Vec<RunResult>, RunError> {
    if opts.mmu.is_some() || s.compare.is_empty() {
        return Ok(vec![run(s, opts, progress)?]);
    }
    let mut out = Vec::new();
    for mmu in &s.compare {
        let o = RunOptions { mmu: Some(mmu.clone()), ..opts.clone() };
        out.push(run(s, &o, |p, f| progress(&format!("{mmu} {p}"), f))?);
    }
    Ok(out)
}

/// Runs `s`; `progress` is called with (phase name, fraction done) as ops complete.
pub fn run(s: &Scenario, opts: &RunOptions, mut progress: impl FnMut(&str, f64)) -> Result<RunResult, RunError> {
    if let Some(w) = &opts.workload {
        if Workload::parse(w, 1).is_none() {
            return Err(RunError::Config(format!("--workload: `{w}` is not one of {}", Workload::NAMES.join(", "))));
        }
    }
    if opts.pages == Some(0) {
        return Err(RunError::Config("--pages: must be > 0".into()));
    }
    if let Some(t) = &opts.replay {
        if opts.workload.is_some() || opts.pages.is_some() {
            return Err(RunError::Config("--replay: cannot be combined with --workload or --pages".into()));
        }
        if s.guest.layout != "kernel" {
            return Err(RunError::Config("--replay: needs the kernel layout (guest.layout = \"kernel\")".into()));
        }
        let ram: u64 = s.memslots.iter().filter(|x| !x.readonly).map(|x| x.size.0).sum();
        crate::replay::check_fits(t, ram)?;
    }
    precheck(s, opts)?;
    let mut m = build(s, opts)?;
    let tracer = &m.kvm.tracer;
    match opts.trace {
        TraceMode::Events => tracer.set_events(true),
        TraceMode::FunctionGraph => tracer.set_function_graph(true),
        TraceMode::Off => {}
    }
    let keep_records = opts.trace_records && opts.trace != TraceMode::Off;
    if keep_records {
        tracer.set_events(true);
        tracer.set_function_graph(true);
    }
    let stream = opts.trace_stream.clone().filter(|_| opts.trace == TraceMode::Events && !keep_records);
    if let Some(st) = &stream {
        let mut st = st.clone();
        if st.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed) > 0 {
            let r = std::io::Write::write_all(&mut st, b"\n");
            st.keep(r).map_err(|e| RunError::Failed(format!("writing the trace: {e}")))?;
        }
        tracer.stream_events_to(Box::new(st));
    }
    if opts.fault_timing {
        for v in m.vcpus.iter_mut() {
            v.set_fault_timing(true);
        }
    }
    let latency_now = |m: &Machine| {
        opts.fault_timing.then(|| {
            let mut h = LatencyHistogram::default();
            for v in &m.vcpus {
                if let Some(x) = v.fault_latency() {
                    h.merge(x);
                }
            }
            h
        })
    };
    let mut results = Vec::new();
    for (pi, ph) in phases(s, opts, m.data_start).into_iter().enumerate() {
        let (before, hw0) = stats_now(&m);
        let lat0 = latency_now(&m);
        let trace_start = if opts.trace == TraceMode::Events { m.kvm.tracer.len() } else { 0 };
        let t0 = Instant::now();
        let mut accesses = 0;
        let n = ph.ops.len().max(1);
        m.phase.clone_from(&ph.name);
        for (i, op) in ph.ops.iter().enumerate() {
            accesses += run_op(&mut m, op).map_err(|e| e.in_op((pi, &ph.name), i, op))?;
            progress(&ph.name, (i + 1) as f64 / n as f64);
            if stream.is_some() {
                if let Some(e) = m.kvm.tracer.stream_error() {
                    // The trace's reader went away (or its disk filled): stop here.
                    return Err(RunError::Failed(format!("writing the trace: {}", std::io::Error::from(e))));
                }
            }
        }
        let wall_ns = t0.elapsed().as_nanos() as u64;
        let (after, hw1) = stats_now(&m);
        let fault_latency = latency_now(&m).zip(lat0).map(|(a, b)| a.since(&b));
        let stats = after
            .iter()
            .map(|(k, v)| {
                (k.clone(), if GAUGES.contains(&k.as_str()) { *v } else { v - before.get(k).copied().unwrap_or(0) })
            })
            .collect();
        let hw = HwSummary {
            tlb_hits: hw1.tlb_hits - hw0.tlb_hits,
            tlb_misses: hw1.tlb_misses - hw0.tlb_misses,
            walks: hw1.walks - hw0.walks,
            walk_mem_refs: hw1.walk_mem_refs - hw0.walk_mem_refs,
        };
        let trace_end = if opts.trace == TraceMode::Events { m.kvm.tracer.len() } else { 0 };
        results.push(PhaseResult {
            name: ph.name.clone(),
            wall_ns,
            accesses,
            stats,
            hw,
            trace_events: trace_start..trace_end,
            fault_latency,
        });
    }
    for v in m.vcpus.iter_mut() {
        v.exit_guest();
    }
    let (stats, _) = stats_now(&m);
    let counts = m.kvm.host().frames().counts();
    let host = HostSummary {
        frames_4k: counts.frames_4k,
        frames_2m: counts.frames_2m,
        host_pt_pages: m.kvm.host().pt_pages(),
        mmu_table_bytes: stats.get("tdp_mmu_pages").copied().unwrap_or(0).max(0) as u64 * 4096,
    };
    let trace_records = if keep_records { m.kvm.tracer.take_records() } else { Vec::new() };
    if stream.is_some() {
        m.kvm.tracer.finish_stream().map_err(|e| RunError::Failed(format!("writing the trace: {e}")))?;
    }
    let trace = match opts.trace {
        _ if keep_records || stream.is_some() => None,
        TraceMode::Events => Some(m.kvm.tracer.render_events()),
        TraceMode::FunctionGraph => Some(m.kvm.tracer.render_function_graph()),
        TraceMode::Off => None,
    };
    Ok(RunResult {
        scenario: s.name.clone(),
        mmu: opts.mmu.clone().unwrap_or_else(|| s.vm.mmu.clone()),
        phases: results,
        stats,
        host,
        migrations: std::mem::take(&mut m.migrations),
        idle_tracking: std::mem::take(&mut m.idle_tracking),
        replays: std::mem::take(&mut m.replays),
        trace,
        trace_records,
    })
}
