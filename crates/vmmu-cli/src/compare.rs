//! `vmmu compare`: one scenario on vmmu and on the real KVM (`/dev/kvm`), side by side.
//!
//! The scenario is an ordinary identity-layout scenario (CPL3, U/S set at every level, A/D
//! clear). vmmu runs it as `vmmu run` would, with the MMU that matches the host's KVM (shadow
//! with shadow, TDP with TDP: [`vmmu_kvm::HostKind::vmmu_mmu`]). For the real KVM its phases
//! are translated op by op into a [`WorkloadSpec`] ([`translate`]): `write`/`read` become
//! touches of the same pages, `rewrite-entry` (a level-1 retarget that clears A/D) CPL3 loads
//! of the four entries on the page's path and a CPL3 store to its PTE, `invlpg` and `switch-root` the same instructions in the guest's
//! ring-0 handler (entered with `int3`), `new-root` the same 512-entry copy of the boot root
//! by CPL3 loads and stores. docs/decisions/0008-compare-backend.md records why.
//!
//! The result ([`Comparison`]) holds, per phase, every MMU statistic either side reports with
//! vmmu's value, KVM's and the difference, and the wall time per fault of each side.
//! With `--trace events` ([`CompareOptions::trace_events`]) it also holds both sides'
//! tracepoints per phase, aligned ([`crate::compare_trace`]).

use crate::compare_trace::{self, Labels, TraceComparison};
use crate::error::{ConfigError, Failure, RunError};
use crate::runner::{self, PhaseResult, RunOptions, TraceMode};
use crate::scenario::{Op, Scenario};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use vmmu_kvm::{
    Access, HostKind, KernelEntry, KvmError, KvmPhase, PhaseSpec, RegionSpec, WorkloadSpec, DATA_GPA, PAGE,
};

/// Guest-physical (and, identity-mapped, guest-virtual) page of the real-KVM guest's code.
/// A scenario `read` of exactly this page stands for the KVM guest's instruction fetches
/// (which vmmu's scenario ops cannot express): it runs on vmmu and is left out of the
/// translation, because the KVM guest fetches its code anyway.
pub const KVM_CODE_PAGE: u64 = 0x10000;

/// Set this environment variable (to anything but `0`) to make `vmmu compare` behave as if
/// `/dev/kvm` could not be opened (the tests use it to check that path on a KVM host).
pub const NO_KVM_ENV: &str = "VMMU_COMPARE_NO_KVM";

/// The statistics every phase table shows (when either side reports them), in this order.
/// Any other statistic that is non-zero on either side is shown after them.
pub const MMU_STATS: &[&str] = &[
    "pf_taken",
    "pf_fixed",
    "pf_emulate",
    "pf_spurious",
    "pf_fast",
    "pf_mmio_spte_created",
    "pf_guest",
    "mmu_shadow_zapped",
    "mmu_pte_write",
    "mmu_pde_zapped",
    "mmu_flooded",
    "mmu_recycled",
    "mmu_cache_miss",
    "mmu_unsync",
    "invlpg",
    "tlb_flush",
    "remote_tlb_flush",
    "remote_tlb_flush_requests",
    "pages_4k",
    "pages_2m",
    "pages_1g",
    "max_mmu_rmap_size",
    "exits",
    "mmio_exits",
];

/// What can go wrong before or while comparing. A variant that wraps an underlying error
/// carries it as its source and, as the crate's errors do ([`crate::error`]), includes its
/// text in the message: print with `{}`, not by walking the chain.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// The scenario or the options cannot be compared (exit status 2).
    #[error("{0}")]
    Config(String),
    /// The real-KVM backend refuses the translated workload (exit status 2).
    #[error("compare: {0}")]
    Spec(#[source] KvmError),
    /// The real KVM could not be used or traced (exit status 1).
    #[error("real KVM: {0}")]
    Kvm(#[source] KvmError),
    /// The real KVM's run failed (exit status 1).
    #[error("real KVM run failed: {0}")]
    KvmRun(#[source] KvmError),
    /// The vmmu side refused the scenario (exit status 2).
    #[error("{0}")]
    RunConfig(#[source] ConfigError),
    /// The vmmu side's run failed (exit status 1).
    #[error("vmmu run failed: {0}")]
    RunFailed(#[source] Failure),
}

impl CompareError {
    /// Whether the error is bad input (the scenario or the options: exit status 2) rather
    /// than a failed run (exit status 1).
    pub fn is_config(&self) -> bool {
        matches!(self, CompareError::Config(_) | CompareError::Spec(_) | CompareError::RunConfig(_))
    }
}

/// Options of `vmmu compare`.
#[derive(Debug, Clone, Default)]
pub struct CompareOptions {
    /// `--mmu`: must be the MMU that matches the host's KVM when `/dev/kvm` is usable.
    pub mmu: Option<String>,
    /// Behave as if `/dev/kvm` were not available (see [`NO_KVM_ENV`]).
    pub no_kvm: bool,
    /// `--trace events`: also capture both sides' tracepoints and align them
    /// ([`crate::compare_trace`]).
    pub trace_events: bool,
}

/// A scenario translated for the real KVM.
#[derive(Debug, Clone, Serialize)]
pub struct Translation {
    /// The workload the real-KVM backend runs.
    pub spec: WorkloadSpec,
    /// Whether the scenario's first phase is `boot`, compared with the KVM guest's implicit
    /// boot phase (its ops are not translated).
    pub boot_phase: bool,
    /// What the translation left out or changed, for the report.
    pub notes: Vec<String>,
}

fn cfg(msg: impl Into<String>) -> CompareError {
    CompareError::Config(msg.into())
}

/// Refuses every scenario setting the real-KVM side cannot be given, naming it: the KVM
/// module parameters vmmu models per VM (the real host has its own, fixed at module load),
/// the model's host memory, a `compare` list of vmmu variants, memslot features the
/// backend's one plain anonymous memslot at GPA 0 does not have, and the kernel layout's
/// settings. What is carried: `vm.nr_mmu_pages` (KVM_SET_NR_MMU_PAGES on the real VM) and
/// `memslot[0].size` (the real VM's memslot is as large).
fn refuse_uncarried(s: &Scenario) -> Result<(), CompareError> {
    let d = crate::scenario::VmSection::default();
    let v = &s.vm;
    let module = |field: &str, differs: bool, what: &str| {
        if differs {
            Err(cfg(format!(
                "compare: vm.{field} is set to something else than its default; {what} cannot be set on the real \
                 KVM per VM (it is the host's, fixed at module load), so the two sides would not run alike: remove it"
            )))
        } else {
            Ok(())
        }
    };
    module("tdp", v.tdp != d.tdp, "the TDP kind (EPT or NPT) is the host CPU's and")?;
    module("eptad", v.eptad != d.eptad, "kvm_intel.eptad")?;
    module("max_tdp_level", v.max_tdp_level != d.max_tdp_level, "the TDP level")?;
    module("maxphyaddr", v.maxphyaddr != d.maxphyaddr, "the guest MAXPHYADDR (the backend passes the host's CPUID)")?;
    module("nx_huge_pages", v.nx_huge_pages != d.nx_huge_pages, "kvm.nx_huge_pages")?;
    module(
        "nx_huge_pages_recovery_ratio",
        v.nx_huge_pages_recovery_ratio != d.nx_huge_pages_recovery_ratio,
        "kvm.nx_huge_pages_recovery_ratio",
    )?;
    module(
        "nx_huge_pages_recovery_period_ms",
        v.nx_huge_pages_recovery_period_ms != d.nx_huge_pages_recovery_period_ms,
        "kvm.nx_huge_pages_recovery_period_ms",
    )?;
    module("mmio_caching", v.mmio_caching != d.mmio_caching, "kvm.mmio_caching")?;
    module("tdp_huge_page", v.tdp_huge_page != d.tdp_huge_page, "the largest TDP page")?;
    module("eager_page_split", v.eager_page_split != d.eager_page_split, "kvm.eager_page_split")?;
    module("pml", v.pml != d.pml, "kvm_intel.pml")?;
    module("host_memory", v.host_memory != d.host_memory, "the model's host memory (the real host has what it has)")?;
    let no =
        |field: &str, set: bool, why: &str| if set { Err(cfg(format!("compare: {field}: {why}"))) } else { Ok(()) };
    no(
        "vm.manual_dirty_log_protect",
        v.manual_dirty_log_protect || v.dirty_log_initially_set,
        "dirty logging is not carried to the real KVM (its guest runs all phases without the VMM in between)",
    )?;
    no(
        "compare",
        !s.compare.is_empty(),
        "a list of vmmu variants; vmmu compare runs one vmmu MMU, the host's kind (remove the list)",
    )?;
    no("guest.processes", s.guest.processes != 1, "a kernel-layout setting; the identity layout has no processes")?;
    no("guest.pcid", s.guest.pcid, "a kernel-layout setting; the real-KVM guest does not use PCIDs")?;
    no(
        "memslot",
        s.memslots.len() != 1,
        "the real-KVM guest has one memslot (at GPA 0); the scenario must have exactly one",
    )?;
    let m = &s.memslots[0];
    no("memslot[0].gpa", m.gpa.0 != 0, "the real-KVM guest's memslot starts at GPA 0")?;
    no(
        "memslot[0].backing",
        m.backing != "4k",
        "the real-KVM guest's memory is plain anonymous memory; THP backing is not carried",
    )?;
    no(
        "memslot[0].prefault",
        m.prefault,
        "the real-KVM guest's memory is populated on first touch; prefaulting is not carried",
    )?;
    no(
        "memslot[0].readonly",
        m.readonly,
        "the real-KVM guest's memslot is writable (KVM_MEM_READONLY is not carried)",
    )?;
    Ok(())
}

/// Translates an identity-layout scenario into the [`WorkloadSpec`] the real-KVM backend runs:
/// the same pages touched in the same order, the same PTE rewrites, `invlpg`s, root copies
/// and CR3 switches. Errors name what cannot be run on the real KVM.
pub fn translate(s: &Scenario) -> Result<Translation, CompareError> {
    let g = &s.guest;
    let need = |ok: bool, what: &str| if ok { Ok(()) } else { Err(cfg(format!("compare: {what}"))) };
    need(g.layout == "identity", "needs `guest.layout = \"identity\"` (the real-KVM guest has no guest kernel)")?;
    need(g.paging == "4-level", "needs 4-level paging")?;
    need(g.page_size == "4k", "needs 4 KiB guest pages (`guest.page_size = \"4k\"`)")?;
    need(
        s.memslots.iter().all(|m| matches!(m.guest_page_size.as_deref(), None | Some("4k"))),
        "needs 4 KiB guest pages in every memslot",
    )?;
    need(
        g.accessed_dirty == "clear",
        "needs `guest.accessed_dirty = \"clear\"` (the KVM guest's PTEs start with A/D clear)",
    )?;
    need(
        g.user,
        "needs `guest.user = true`: the real-KVM guest runs its workload at CPL3 with U/S set at every level \
         (on a PVM host CPL0 code is emulated and takes no shadow faults)",
    )?;
    need(g.vcpus == 1, "needs one vCPU")?;
    need(s.mmio.is_empty(), "cannot model [[mmio]] devices on the real KVM")?;
    refuse_uncarried(s)?;

    let phases = &s.phases;
    let boot_phase = phases.first().is_some_and(|p| p.name == "boot");
    let mut notes = Vec::new();
    // The KVM guest's instruction fetches from its code page: a `fetch` inside that page (or,
    // less exactly, a `read` of it) stands for them.
    let is_code_read = |op: &Op| match op {
        Op::Fetch { start, pages: 1 } => start.0 / PAGE == KVM_CODE_PAGE / PAGE,
        Op::Read { start, pages: 1 } => start.0 == KVM_CODE_PAGE,
        _ => false,
    };
    if boot_phase {
        for (i, op) in phases[0].ops.iter().enumerate() {
            if !is_code_read(op) {
                return Err(cfg(format!(
                    "compare: phase[0] (boot) stands for the KVM guest's own boot and may only `fetch` (or `read`) its \
                     code page ({KVM_CODE_PAGE:#x}, 1 page); ops[{i}] is something else"
                )));
            }
        }
        notes.push(format!(
            "phase boot: KVM's implicit boot phase (the guest's first instruction fetch); vmmu fetches from the code page {KVM_CODE_PAGE:#x}"
        ));
    }

    // Pages the workload uses, merged into regions (identity: gva = gpa).
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let page_of = |a: u64| a / PAGE;
    for (pi, p) in phases.iter().enumerate().skip(usize::from(boot_phase)) {
        for (oi, op) in p.ops.iter().enumerate() {
            let at = |field: &str| format!("compare: phase[{pi}].ops[{oi}].{field}");
            let mut add = |first: u64, pages: u64, field: &str| -> Result<(), CompareError> {
                if first * PAGE < DATA_GPA {
                    return Err(cfg(format!(
                        "{}: {:#x} is below {DATA_GPA:#x}, the real-KVM guest's system area (only a 1-page `fetch` or `read` \
                         of its code page {KVM_CODE_PAGE:#x} may be there)",
                        at(field),
                        first * PAGE
                    )));
                }
                ranges.push((first, first + pages));
                Ok(())
            };
            match op {
                _ if is_code_read(op) => {}
                Op::Write { start, pages } | Op::Read { start, pages } | Op::ReadThenWrite { start, pages } => {
                    if start.0 % PAGE != 0 {
                        return Err(cfg(format!("{}: must be page aligned to compare", at("start"))));
                    }
                    add(page_of(start.0), *pages, "start")?;
                }
                Op::Invlpg { addr } => add(page_of(addr.0), 1, "addr")?,
                Op::RewriteEntry { va, .. } => add(page_of(va.0), 1, "va")?,
                Op::NewRoot | Op::SwitchRoot { .. } | Op::Audit => {}
                other => {
                    return Err(cfg(format!(
                        "{}: `{}` has no real-KVM translation (compare supports write, read, read-then-write, \
                         invlpg, rewrite-entry, new-root, switch-root, audit)",
                        at("op"),
                        other.name()
                    )))
                }
            }
        }
    }
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (a, b) in ranges {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    let roots = 1 + phases.iter().flat_map(|p| p.ops.iter()).filter(|o| matches!(o, Op::NewRoot)).count();
    if roots > 4 {
        return Err(cfg(format!("compare: {} roots (boot + new-root ops); the real-KVM guest supports 4", roots)));
    }
    let regions: Vec<RegionSpec> =
        merged.iter().map(|&(a, b)| RegionSpec { gva: a * PAGE, pages: b - a, gpa: vec![a * PAGE; roots] }).collect();
    let locate = |addr: u64| -> (usize, u64) {
        let pg = addr / PAGE;
        let i = merged.iter().position(|&(a, b)| pg >= a && pg < b).expect("every op's page is in a region");
        (i, pg - merged[i].0)
    };

    let mut out_phases = Vec::new();
    let mut current_root = 0usize;
    let mut made_roots = 1usize;
    for (pi, p) in phases.iter().enumerate().skip(usize::from(boot_phase)) {
        let mut ops = Vec::new();
        for (oi, op) in p.ops.iter().enumerate() {
            let at = |field: &str| format!("compare: phase[{pi}].ops[{oi}].{field}");
            let touch = |start: u64, pages: u64, access: Access| {
                let (region, first) = locate(start);
                vmmu_kvm::Op::Touch { region, first, pages, access }
            };
            match op {
                _ if is_code_read(op) => notes.push(format!(
                    "phase {}: the access to the code page {KVM_CODE_PAGE:#x} stands for the KVM guest's instruction fetch (not translated)",
                    p.name
                )),
                Op::Write { start, pages } => ops.push(touch(start.0, *pages, Access::Write)),
                Op::Read { start, pages } => ops.push(touch(start.0, *pages, Access::Read)),
                Op::ReadThenWrite { start, pages } => {
                    ops.push(touch(start.0, *pages, Access::Read));
                    ops.push(touch(start.0, *pages, Access::Write));
                }
                Op::Invlpg { addr } => {
                    let (region, page) = locate(addr.0);
                    ops.push(vmmu_kvm::Op::Invlpg { region, page });
                }
                Op::RewriteEntry { va, level, clear, set, target } => {
                    const AD: u64 = 0x60;
                    let Some(t) = target else {
                        return Err(cfg(format!("{}: compare needs a `target` (a PTE retarget)", at("target"))));
                    };
                    if *level != 1 || clear.0 & AD != AD || clear.0 & !AD != 0 || set.0 != 0 {
                        return Err(cfg(format!(
                            "{}: compare translates only level-1 retargets that clear the A/D bits \
                             (`level = 1, clear = \"0x60\", target = ...`): the real-KVM guest stores P|RW|US|target",
                            at("op")
                        )));
                    }
                    if t.0 % PAGE != 0 || t.0 < DATA_GPA {
                        return Err(cfg(format!("{}: must be page aligned and >= {DATA_GPA:#x}", at("target"))));
                    }
                    let (region, page) = locate(va.0);
                    // vmmu's rewrite-entry loads the PML4E, PDPTE, PDE and the old PTE first.
                    ops.push(vmmu_kvm::Op::WalkPte { root: current_root, region, page });
                    ops.push(vmmu_kvm::Op::SetPte { root: current_root, region, page, gpa: t.0 });
                }
                Op::NewRoot => {
                    ops.push(vmmu_kvm::Op::CopyRoot(made_roots));
                    made_roots += 1;
                }
                Op::SwitchRoot { root } => {
                    let r = *root as usize;
                    if r >= made_roots {
                        return Err(cfg(format!("{}: no root {r} yet (make one with new-root)", at("root"))));
                    }
                    current_root = r;
                    ops.push(vmmu_kvm::Op::SwitchRoot(r));
                }
                Op::Audit => {}
                _ => unreachable!("rejected above"),
            }
        }
        out_phases.push(PhaseSpec { name: p.name.clone(), ops, repeat: 1 });
    }
    if phases.iter().any(|p| p.ops.iter().any(|o| matches!(o, Op::Audit))) {
        notes.push("`audit` checks vmmu's invariants only (no guest-visible work, nothing to translate)".into());
    }
    notes.push(
        "the KVM guest enters ring 0 for invlpg / mov cr3 with int3 (a trap: its handler writes no memory)".into(),
    );
    if let Some(n) = s.vm.nr_mmu_pages {
        notes.push(format!("vm.nr_mmu_pages: KVM_SET_NR_MMU_PAGES({n}) on both sides"));
    }
    let spec = WorkloadSpec {
        name: s.name.clone(),
        roots,
        kernel_entry: KernelEntry::Int3,
        regions,
        phases: out_phases,
        // The same memslot size on both sides (refuse_uncarried: one memslot at GPA 0), so
        // KVM's default shadow-page limit (memslot pages / 50) is the same.
        memory: s.memslots[0].size.0,
        nr_mmu_pages: s.vm.nr_mmu_pages,
    };
    // Checked here, before either side runs, with or without /dev/kvm: a scenario the
    // real-KVM guest cannot be built for is an input error.
    vmmu_kvm::check_spec(&spec).map_err(CompareError::Spec)?;
    Ok(Translation { spec, boot_phase, notes })
}

/// One statistic of one phase on both sides.
#[derive(Debug, Clone, Serialize)]
pub struct StatRow {
    /// KVM's name.
    pub name: String,
    /// vmmu's value (None: vmmu has no such statistic, or did not run this phase).
    pub vmmu: Option<i64>,
    /// KVM's value (None: KVM has no such statistic, or did not run).
    pub kvm: Option<i64>,
    /// KVM minus vmmu, when both have it.
    pub difference: Option<i64>,
    /// Both sides report it, the values differ, and the statistic is not noise here
    /// (`noise`): a counted difference.
    pub differs: bool,
    /// A gauge: both values are the statistic at the phase's end, not a delta over it.
    pub gauge: bool,
    /// Why this statistic is noise by nature in this phase on this kind of host (shown, never
    /// counted as a difference); None for a statistic that is compared.
    pub noise: Option<String>,
}

/// One side's timing of a phase.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timing {
    /// Wall time of the phase.
    pub wall_ns: u64,
    /// Wall time divided by `pf_taken` (None without faults).
    pub wall_per_fault_ns: Option<u64>,
}

/// One phase side by side.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseComparison {
    /// Phase name.
    pub name: String,
    /// The host kind (as in [`Comparison::host`]), repeated so each phase stands alone.
    pub host: String,
    /// Whether the phase ran on both sides (KVM's implicit `boot` runs on KVM only unless the
    /// scenario has a `boot` phase).
    pub compared: bool,
    /// vmmu's timing.
    pub vmmu: Option<Timing>,
    /// KVM's timing.
    pub kvm: Option<Timing>,
    /// Statistics both sides know, or that are non-zero on the side that knows them.
    pub stats: Vec<StatRow>,
}

/// A statistic that differs.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Difference {
    /// Phase.
    pub phase: String,
    /// Statistic.
    pub stat: String,
    /// vmmu's value.
    pub vmmu: i64,
    /// KVM's value.
    pub kvm: i64,
    /// KVM minus vmmu.
    pub difference: i64,
}

/// What a comparison counted, over the phases both sides ran.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    /// Statistics both sides report, in compared phases, that are not noise.
    pub compared: usize,
    /// Of those, equal on both sides.
    pub equal: usize,
    /// Of those, different (the `differences`).
    pub differing: usize,
    /// Statistics classed as noise whose values differ (shown, not counted).
    pub noise_differing: usize,
}

/// Why statistic `stat` is noise by nature in phase `phase` (not MMU behaviour, so never a
/// difference), or None. docs/compare.md explains each.
pub fn noise(phase: &str, stat: &str) -> Option<&'static str> {
    match (phase, stat) {
        (_, "exits") => Some(
            "KVM's exits also count the backend's phase-end exit, host interrupts and preemptions, and on PVM two \
             per ring-0 round trip (docs/compare.md (c))",
        ),
        ("boot", "tlb_flush") => Some(
            "the set-up flush: KVM services it on the first KVM_RUN, inside boot; vmmu before the first phase \
             (docs/compare.md (a))",
        ),
        _ => None,
    }
}

/// A whole comparison (the `--json` object).
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Scenario name.
    pub scenario: String,
    /// The host kind (vendor module, paging, tdp_mmu, nested, ...).
    pub host: HostKind,
    /// The host kind as one line.
    pub host_description: String,
    /// The vmmu MMU run (the host's kind when `/dev/kvm` is usable).
    pub mmu: String,
    /// Whether the real KVM ran.
    pub kvm_available: bool,
    /// Why it did not, when it did not.
    pub kvm_unavailable_reason: Option<String>,
    /// The workload the real KVM ran (or would have run).
    pub kvm_workload: WorkloadSpec,
    /// What the translation left out or changed.
    pub notes: Vec<String>,
    /// Phases in order.
    pub phases: Vec<PhaseComparison>,
    /// Every statistic that differs in a compared phase (noise excluded).
    pub differences: Vec<Difference>,
    /// Statistics that differ in a compared phase but are noise by nature ([`noise`]).
    pub noise_differences: Vec<Difference>,
    /// Statistics compared, equal and differing, over the compared phases.
    pub summary: Summary,
    /// With `--trace events` and a usable `/dev/kvm`: both event streams per phase, aligned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceComparison>,
}

/// Runs `s` on vmmu and, when `/dev/kvm` is usable, on the real KVM, and puts them side by side.
pub fn compare(s: &Scenario, opts: &CompareOptions) -> Result<Comparison, CompareError> {
    let tr = translate(s)?;
    let host = HostKind::detect();
    let kvm_ok = if opts.no_kvm {
        Err(format!("disabled by {NO_KVM_ENV}"))
    } else {
        vmmu_kvm::kvm_available().map_err(|e| e.to_string())
    };
    let host_mmu = host.vmmu_mmu();
    let mmu = match (&opts.mmu, &kvm_ok) {
        (Some(m), Ok(())) if m != host_mmu => {
            return Err(cfg(format!(
                "--mmu {m}: this host's KVM uses {} ({host}); vmmu compares only like with like (--mmu {host_mmu})",
                host_mmu
            )))
        }
        (Some(m), _) => m.clone(),
        (None, Ok(())) => host_mmu.to_string(),
        (None, Err(_)) if host.vendor != vmmu_kvm::Vendor::Unknown => host_mmu.to_string(),
        (None, Err(_)) => s.vm.mmu.clone(),
    };
    let mut notes = tr.notes.clone();
    if s.vm.mmu != mmu {
        notes.push(format!(
            "vm.mmu = {} is replaced by {mmu}: vmmu compare runs the kind of MMU this host's KVM uses",
            s.vm.mmu
        ));
    }
    let tracing = opts.trace_events && kvm_ok.is_ok();
    let run_opts = RunOptions {
        mmu: Some(mmu.clone()),
        trace: if tracing { TraceMode::Events } else { TraceMode::Off },
        ..RunOptions::default()
    };
    let vm = runner::run(s, &run_opts, |_, _| {}).map_err(|e| match e {
        RunError::Config(e) => CompareError::RunConfig(e),
        RunError::Failed(e) => CompareError::RunFailed(e),
    })?;
    let kvm_err = |e: KvmError| match e {
        KvmError::NoKvm(_) | KvmError::Trace(_) => CompareError::Kvm(e),
        e => CompareError::KvmRun(e),
    };
    let (kvm, kvm_trace) = match &kvm_ok {
        Ok(()) if tracing => {
            let (run, trace) = vmmu_kvm::run_workload_traced(&tr.spec).map_err(kvm_err)?;
            (Some(run), Some(trace))
        }
        Ok(()) => (Some(vmmu_kvm::run_workload(&tr.spec).map_err(kvm_err)?), None),
        Err(_) => (None, None),
    };

    let host_line = host.to_string();
    let kvm_phases: Vec<Option<&KvmPhase>> = match &kvm {
        Some(run) => run.phases.iter().map(Some).collect(),
        None => Vec::new(),
    };
    // (name, vmmu phase, KVM phase) in order.
    let mut rows: Vec<(String, Option<&PhaseResult>, Option<&KvmPhase>, bool)> = Vec::new();
    if !tr.boot_phase && kvm.is_some() {
        rows.push(("boot".into(), None, kvm_phases[0], false));
    }
    for (i, p) in vm.phases.iter().enumerate() {
        let k =
            if kvm.is_some() { kvm_phases.get(if tr.boot_phase { i } else { i + 1 }).copied().flatten() } else { None };
        rows.push((p.name.clone(), Some(p), k, true));
    }

    let trace = kvm_trace.map(|kt| {
        let vmmu_events = vmmu_kvm::tracefs::parse_trace(vm.trace.as_deref().unwrap_or(""));
        let vmmu_setup = vm.phases.first().map_or(0, |p| p.trace_events.start);
        let mut vl = Labels::learn(&vmmu_events);
        let all_kvm: Vec<_> = kt.setup.iter().chain(kt.phases.iter().flatten()).chain(&kt.after).cloned().collect();
        let mut kl = Labels::learn(&all_kvm);
        let mut tphases = Vec::new();
        for (i, (name, v, _, _)) in rows.iter().enumerate() {
            let ve = v.map(|p| {
                let r = &p.trace_events;
                &vmmu_events[r.start.min(vmmu_events.len())..r.end.min(vmmu_events.len())]
            });
            // Row i is KVM's phase i: (the implicit boot,) then vmmu's phases in order.
            let ke = kt.phases.get(i).map(Vec::as_slice);
            tphases.push(compare_trace::compare_phase(name, ve, ke, &mut vl, &mut kl, vmmu_kvm::DATA_GPA));
        }
        TraceComparison {
            kvm_capture: kt.how.clone(),
            kvm_lost: kt.lost,
            kvm_missing_events: kt.missing_events.clone(),
            kvm_setup_events: kt.setup.len(),
            kvm_after_events: kt.after.len(),
            vmmu_setup_events: vmmu_setup,
            phases: tphases,
        }
    });

    let mut phases = Vec::new();
    let mut differences = Vec::new();
    let mut noise_differences = Vec::new();
    let mut summary = Summary::default();
    for (name, v, k, both) in rows {
        let kstats: BTreeMap<String, i64> =
            k.map(|k| k.stats().into_iter().map(|(n, x)| (n, x as i64)).collect()).unwrap_or_default();
        let vstats = v.map(|v| v.stats.clone()).unwrap_or_default();
        let vmmu_known: BTreeSet<&String> = vm.stats.keys().collect();
        let kvm_known: BTreeSet<&String> = kstats.keys().collect();
        let mut names: Vec<String> = MMU_STATS
            .iter()
            .filter(|n| vmmu_known.iter().any(|k| k == n) || kvm_known.iter().any(|k| k == n))
            .map(|n| n.to_string())
            .collect();
        let extra: BTreeSet<String> = vstats
            .iter()
            .chain(kstats.iter())
            .filter(|(n, x)| **x != 0 && !MMU_STATS.contains(&n.as_str()))
            .map(|(n, _)| n.clone())
            .collect();
        // Statistics both sides know first, then one side's own.
        let (shared, own): (Vec<String>, Vec<String>) =
            extra.into_iter().partition(|n| vmmu_known.contains(n) && kvm_known.contains(n));
        names.extend(shared);
        names.extend(own);
        let stats: Vec<StatRow> = names
            .into_iter()
            .map(|n| {
                let vv = v.and(vstats.get(&n).copied());
                let kv = k.and(kstats.get(&n).copied());
                let difference = match (vv, kv) {
                    (Some(a), Some(b)) => Some(b - a),
                    _ => None,
                };
                let why = noise(&name, &n);
                let unequal = both && difference.is_some_and(|d| d != 0);
                let differs = unequal && why.is_none();
                let diff = || Difference {
                    phase: name.clone(),
                    stat: n.clone(),
                    vmmu: vv.unwrap_or(0),
                    kvm: kv.unwrap_or(0),
                    difference: difference.unwrap_or(0),
                };
                if both && difference.is_some() {
                    match (why, unequal) {
                        (Some(_), true) => {
                            summary.noise_differing += 1;
                            noise_differences.push(diff());
                        }
                        (Some(_), false) => {}
                        (None, true) => {
                            summary.compared += 1;
                            summary.differing += 1;
                            differences.push(diff());
                        }
                        (None, false) => {
                            summary.compared += 1;
                            summary.equal += 1;
                        }
                    }
                }
                let gauge = crate::machine::GAUGES.contains(&n.as_str());
                StatRow { name: n, vmmu: vv, kvm: kv, difference, differs, gauge, noise: why.map(str::to_string) }
            })
            .collect();
        let timing = |wall_ns: u64, faults: Option<i64>| Timing {
            wall_ns,
            wall_per_fault_ns: faults.and_then(|f| u64::try_from(f).ok()).filter(|&f| f > 0).map(|f| wall_ns / f),
        };
        phases.push(PhaseComparison {
            name,
            host: host_line.clone(),
            compared: both && v.is_some() && k.is_some(),
            vmmu: v.map(|p| timing(p.wall_ns, p.stats.get("pf_taken").copied())),
            kvm: k.map(|p| timing(p.wall_ns, p.stat("pf_taken").map(|x| x as i64))),
            stats,
        });
    }
    Ok(Comparison {
        scenario: s.name.clone(),
        host_description: host_line,
        host,
        mmu,
        kvm_available: kvm.is_some(),
        kvm_unavailable_reason: kvm_ok.err(),
        kvm_workload: tr.spec,
        notes,
        phases,
        differences,
        noise_differences,
        summary,
        trace,
    })
}

fn human_ns(ns: u64) -> String {
    match ns {
        0..=9_999 => format!("{ns} ns"),
        10_000..=9_999_999 => format!("{:.1} us", ns as f64 / 1e3),
        _ => format!("{:.1} ms", ns as f64 / 1e6),
    }
}

/// The readable report: a header with the host kind, then per phase a table
/// `stat | vmmu | KVM | difference` with every difference marked `DIFFERS`.
pub fn text(c: &Comparison, description: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "vmmu compare: scenario \"{}\"", c.scenario);
    if !description.is_empty() {
        let _ = writeln!(out, "  {}", description.split_whitespace().collect::<Vec<_>>().join(" "));
    }
    let _ = writeln!(out, "host: {}", c.host_description);
    let _ = writeln!(out, "vmmu: --mmu {} (the kind of MMU this host's KVM uses: like with like)", c.mmu);
    match &c.kvm_unavailable_reason {
        None => {
            let w = &c.kvm_workload;
            let _ = writeln!(
                out,
                "KVM:  /dev/kvm, {} region(s), {} root(s), {} phase(s) after boot, guest at CPL3",
                w.regions.len(),
                w.roots,
                w.phases.len()
            );
        }
        Some(r) => {
            let _ = writeln!(out, "KVM:  not available ({r}); only the vmmu column is shown");
        }
    }
    for n in &c.notes {
        let _ = writeln!(out, "note: {n}");
    }
    for p in &c.phases {
        let _ = writeln!(out);
        let what = if p.compared {
            ""
        } else if p.vmmu.is_none() {
            "  (KVM only: the guest's first instructions; not compared)"
        } else {
            "  (vmmu only)"
        };
        let _ = writeln!(out, "phase \"{}\"{what}", p.name);
        let _ = writeln!(out, "  {:<28} {:>12} {:>12} {:>11}", "stat", "vmmu", "KVM", "difference");
        let cell = |x: Option<i64>, ran: bool| match (x, ran) {
            (Some(v), _) => v.to_string(),
            (None, true) => "-".into(),
            (None, false) => "n/a".into(),
        };
        for s in &p.stats {
            let diff = match s.difference {
                Some(0) => "0".to_string(),
                Some(d) => format!("{d:+}"),
                None if s.vmmu.is_some() && p.kvm.is_some() => "(vmmu only)".into(),
                None if s.kvm.is_some() && p.vmmu.is_some() => "(KVM only)".into(),
                None => String::new(),
            };
            let unequal = p.compared && s.difference.is_some_and(|d| d != 0);
            let flag = match (&s.noise, s.differs) {
                (_, true) => "  DIFFERS",
                (Some(_), false) if unequal => "  noise (not counted)",
                _ => "",
            };
            let name = if s.gauge { format!("{} (at end)", s.name) } else { s.name.clone() };
            let _ = writeln!(
                out,
                "  {:<28} {:>12} {:>12} {:>11}{flag}",
                name,
                cell(s.vmmu, p.vmmu.is_some()),
                cell(s.kvm, p.kvm.is_some()),
                diff
            );
        }
        let t = |x: Option<Timing>, per: bool| match x {
            Some(t) if per => t.wall_per_fault_ns.map(human_ns).unwrap_or_else(|| "-".into()),
            Some(t) => human_ns(t.wall_ns),
            None => "n/a".into(),
        };
        let _ = writeln!(out, "  {:<28} {:>12} {:>12}", "wall", t(p.vmmu, false), t(p.kvm, false));
        let _ = writeln!(out, "  {:<28} {:>12} {:>12}", "wall per fault", t(p.vmmu, true), t(p.kvm, true));
    }
    if let Some(t) = &c.trace {
        out.push_str(&compare_trace::text(t));
    }
    let _ = writeln!(out);
    if !c.kvm_available {
        let _ = writeln!(out, "no comparison: /dev/kvm not available");
        return out;
    }
    let m = &c.summary;
    let _ = writeln!(
        out,
        "summary: {} statistic(s) compared, {} equal, {} differ; {} noise-only difference(s) shown, not counted",
        m.compared, m.equal, m.differing, m.noise_differing
    );
    let _ = writeln!(
        out,
        "{} statistic(s) differ{}",
        c.differences.len(),
        if c.differences.is_empty() { "" } else { " (docs/compare.md explains why):" }
    );
    for d in &c.differences {
        let _ = writeln!(out, "  DIFFERS {}/{}: vmmu {} KVM {} ({:+})", d.phase, d.stat, d.vmmu, d.kvm, d.difference);
    }
    for d in &c.noise_differences {
        let _ = writeln!(
            out,
            "  noise   {}/{}: vmmu {} KVM {} ({:+}): {}",
            d.phase,
            d.stat,
            d.vmmu,
            d.kvm,
            d.difference,
            noise(&d.phase, &d.stat).unwrap_or("")
        );
    }
    out
}

/// The `--json` object.
pub fn json(c: &Comparison) -> String {
    serde_json::to_string_pretty(c).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}
