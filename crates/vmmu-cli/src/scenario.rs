//! Scenario files (TOML): what VM, what memory, what guest, then phases of operations.
//! The schema is documented in docs/scenarios.md.
//!
//! This module has the file's sections, parsing and validation; the ops of the phases
//! ([`Op`]) are in the submodule `op`.

use crate::size::parse_size;
use serde::{Deserialize, Deserializer};

mod op;
pub use op::Op;

/// A size or address: an integer or a string like "16MiB" or "0x1000".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Size(pub u64);

/// What a size looks like, for error messages.
pub const SIZE_FORMS: &str = "a size or address: an integer (4096) or a string like \"0x1000\", \"64MiB\" or \"1GiB\"";

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(SIZE_FORMS)
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v).map(Size).map_err(|_| E::custom(format!("{v} is negative; expected {SIZE_FORMS}")))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A whole scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name.
    pub name: String,
    /// What it shows.
    #[serde(default)]
    pub description: String,
    /// VM configuration.
    #[serde(default)]
    pub vm: VmSection,
    /// Guest memory.
    #[serde(rename = "memslot", default)]
    pub memslots: Vec<MemslotSection>,
    /// MMIO devices.
    #[serde(rename = "mmio", default)]
    pub mmio: Vec<MmioSection>,
    /// The guest.
    #[serde(default)]
    pub guest: GuestSection,
    /// Phases.
    #[serde(rename = "phase", default)]
    pub phases: Vec<Phase>,
    /// Run the scenario once per variant listed here and report them side by side; `--mmu`
    /// picks one. A variant is an MMU (`tdp`, `shadow`, `legacy-tdp`) optionally followed by
    /// `[vm]` settings that differ for it, e.g. `"tdp pml=false eager_page_split=false"`.
    #[serde(default)]
    pub compare: Vec<String>,
}

/// `[vm]`: KVM's module parameters and VM settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmSection {
    /// tdp | shadow | legacy-tdp.
    pub mmu: String,
    /// ept | npt.
    pub tdp: String,
    /// EPT A/D bits.
    pub eptad: bool,
    /// 4 or 5.
    pub max_tdp_level: u8,
    /// Guest MAXPHYADDR.
    pub maxphyaddr: u8,
    /// kvm.nx_huge_pages.
    pub nx_huge_pages: bool,
    /// kvm.nx_huge_pages_recovery_ratio (0: no recovery).
    pub nx_huge_pages_recovery_ratio: u32,
    /// kvm.nx_huge_pages_recovery_period_ms (0: one hour / ratio).
    pub nx_huge_pages_recovery_period_ms: u32,
    /// kvm.mmio_caching.
    pub mmio_caching: bool,
    /// Largest TDP page: "4k", "2m" or "1g".
    pub tdp_huge_page: String,
    /// kvm.eager_page_split (TDP MMU): enabling dirty logging splits huge pages at once.
    pub eager_page_split: bool,
    /// kvm_intel.pml: dirty logging with D bits and the page-modification log (EPT with
    /// A/D bits) instead of write protection.
    pub pml: bool,
    /// Host physical memory to model.
    pub host_memory: Size,
    /// KVM_SET_NR_MMU_PAGES after the memslots are created: the limit on shadow pages (at
    /// least 64, KVM_MIN_ALLOC_MMU_PAGES). None: KVM's default (memslot pages / 50, at least
    /// 64).
    pub nr_mmu_pages: Option<u64>,
    /// KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) with KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
    /// KVM_GET_DIRTY_LOG only reads the log, and `dirty-log-harvest` clears what it read with
    /// KVM_CLEAR_DIRTY_LOG.
    pub manual_dirty_log_protect: bool,
    /// With `manual_dirty_log_protect`, KVM_DIRTY_LOG_INITIALLY_SET too: a slot's log starts
    /// with every page set (and nothing write-protected) when logging is turned on.
    pub dirty_log_initially_set: bool,
}

impl VmSection {
    /// This section with a comparison variant applied: `MMU [key=value ...]`, where keys are
    /// the boolean settings pml, eptad, eager_page_split, nx_huge_pages, mmio_caching and
    /// `tdp` (ept | npt). Returns the MMU name and the settings.
    pub fn variant(&self, v: &str) -> Result<(String, VmSection), String> {
        let mut words = v.split_whitespace();
        let mmu = words.next().ok_or("an empty variant (expected an MMU: tdp, shadow or legacy-tdp)")?;
        if !["tdp", "shadow", "legacy-tdp"].contains(&mmu) {
            return Err(format!("`{mmu}` is not one of tdp, shadow, legacy-tdp"));
        }
        let mut out = self.clone();
        for w in words {
            let (k, val) = w.split_once('=').ok_or_else(|| format!("`{w}` is not key=value"))?;
            let flag = || match val {
                "true" | "on" | "1" => Ok(true),
                "false" | "off" | "0" => Ok(false),
                _ => Err(format!("`{k}={val}`: expected true or false")),
            };
            match k {
                "pml" => out.pml = flag()?,
                "eptad" => out.eptad = flag()?,
                "eager_page_split" => out.eager_page_split = flag()?,
                "nx_huge_pages" => out.nx_huge_pages = flag()?,
                "mmio_caching" => out.mmio_caching = flag()?,
                "tdp" if ["ept", "npt"].contains(&val) => out.tdp = val.into(),
                "tdp" => return Err(format!("`tdp={val}`: expected ept or npt")),
                _ => {
                    return Err(format!(
                        "unknown setting `{k}` (known: pml, eptad, eager_page_split, nx_huge_pages, mmio_caching, tdp)"
                    ))
                }
            }
        }
        Ok((mmu.to_string(), out))
    }
}

impl Default for VmSection {
    fn default() -> Self {
        VmSection {
            mmu: "tdp".into(),
            tdp: "ept".into(),
            eptad: true,
            max_tdp_level: 4,
            maxphyaddr: 46,
            nx_huge_pages: false,
            nx_huge_pages_recovery_ratio: 60,
            nx_huge_pages_recovery_period_ms: 0,
            mmio_caching: true,
            tdp_huge_page: "1g".into(),
            eager_page_split: true,
            pml: true,
            host_memory: Size(16 << 30),
            nr_mmu_pages: None,
            manual_dirty_log_protect: false,
            dirty_log_initially_set: false,
        }
    }
}

/// `[[memslot]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemslotSection {
    /// First gpa.
    pub gpa: Size,
    /// Size.
    pub size: Size,
    /// "4k" or "thp".
    #[serde(default = "default_backing")]
    pub backing: String,
    /// Allocate all host memory up front.
    #[serde(default)]
    pub prefault: bool,
    /// KVM_MEM_READONLY.
    #[serde(default)]
    pub readonly: bool,
    /// Guest page size of the identity map over this slot ("4k", "2m", "1g"); default
    /// `guest.page_size`.
    #[serde(default)]
    pub guest_page_size: Option<String>,
}

fn default_backing() -> String {
    "4k".into()
}

/// `[[mmio]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmioSection {
    /// First gpa.
    pub gpa: Size,
    /// Window size.
    pub size: Size,
    /// "latch": every register reads back the last value written.
    #[serde(default = "default_device")]
    pub device: String,
}

fn default_device() -> String {
    "latch".into()
}

/// `[guest]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestSection {
    /// "4-level" or "5-level".
    pub paging: String,
    /// "kernel" (the guest kernel demand-pages a process) or "identity" (gva = gpa tables
    /// built by the VMM before the run).
    pub layout: String,
    /// Page size: of the identity map, or of the kernel's direct map ("4k", "2m").
    pub page_size: String,
    /// Identity layout: "clear" or "preset" A/D bits.
    pub accessed_dirty: String,
    /// Identity layout: pages are user pages and the guest runs at CPL 3.
    pub user: bool,
    /// Number of vCPUs (identity layout: the ops' pages are split among them, each on its
    /// own thread).
    pub vcpus: u32,
    /// Kernel layout: number of processes.
    pub processes: u32,
    /// Kernel layout: use PCIDs.
    pub pcid: bool,
}

impl Default for GuestSection {
    fn default() -> Self {
        GuestSection {
            paging: "4-level".into(),
            layout: "kernel".into(),
            page_size: "4k".into(),
            accessed_dirty: "clear".into(),
            user: false,
            vcpus: 1,
            processes: 1,
            pcid: false,
        }
    }
}

/// `[[phase]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// Name.
    pub name: String,
    /// Operations, in order.
    pub ops: Vec<Op>,
}

/// A scenario problem: the field and what is wrong with it. Control characters the
/// scenario's own text brought in (a value echoed back) print escaped, so an error stays one
/// line. When the text is not TOML of the scenario's shape, the TOML parser's error is the
/// source (its message, on one line, is `problem`; its own text spans several lines): print
/// with `{}`, not by walking the chain.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{}: {}", printable(.field), printable(.problem))]
pub struct ScenarioError {
    /// Which field (for a TOML error: `line L, column C`, or `file`).
    pub field: String,
    /// What is wrong.
    pub problem: String,
    /// The TOML parser's error, if the text did not parse.
    #[source]
    pub source: Option<Box<toml::de::Error>>,
}

/// `s` with control characters escaped (`\r`, `\n`, `\u{1b}`).
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

fn err(field: impl Into<String>, problem: impl Into<String>) -> ScenarioError {
    ScenarioError { field: field.into(), problem: problem.into(), source: None }
}

/// Parses a page size name to its shift.
pub fn page_shift(s: &str) -> Option<u32> {
    match s.to_ascii_lowercase().as_str() {
        "4k" | "4kib" => Some(12),
        "2m" | "2mib" => Some(21),
        "1g" | "1gib" => Some(30),
        _ => None,
    }
}

/// A TOML error as (where, problem), each one line: `line L, column C` (or `file`) and the
/// parser's message, which is never empty (the parser gives none when the text stops where
/// it needs more, as in `a = `).
pub fn toml_error(text: &str, e: &toml::de::Error) -> (String, String) {
    let msg = e.message().split('\n').map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
    // The text up to the error (a span off a char boundary falls back to the one before).
    let before = |at: usize| {
        let mut at = at.min(text.len());
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        &text[..at]
    };
    let at_end = e.span().is_some_and(|sp| text[before(sp.start).len()..].trim().is_empty());
    let msg = match msg {
        // The parser names nothing when the text stops where it needs more (`a = `).
        m if m.is_empty() && at_end => {
            "the file ends in the middle of an item (a key without a value, an unclosed `[` or quote?)".into()
        }
        m if m.is_empty() => "not valid TOML here".into(),
        m => m,
    };
    let at = e.span().map(|sp| {
        let before = before(sp.start);
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!("line {line}, column {col}")
    });
    (at.unwrap_or_else(|| "file".into()), msg)
}

impl Scenario {
    /// Parses TOML text; the error is one line (it may name a line and column).
    pub fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| {
            let (field, problem) = toml_error(text, &e);
            ScenarioError { field, problem, source: Some(Box::new(e)) }
        })?;
        s.validate()?;
        Ok(s)
    }

    /// Checks what the schema cannot.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        if !["tdp", "shadow", "legacy-tdp"].contains(&self.vm.mmu.as_str()) {
            return Err(err("vm.mmu", format!("`{}` is not one of tdp, shadow, legacy-tdp", self.vm.mmu)));
        }
        if !["ept", "npt"].contains(&self.vm.tdp.as_str()) {
            return Err(err("vm.tdp", format!("`{}` is not one of ept, npt", self.vm.tdp)));
        }
        if page_shift(&self.vm.tdp_huge_page).is_none() {
            return Err(err("vm.tdp_huge_page", format!("`{}` is not one of 4k, 2m, 1g", self.vm.tdp_huge_page)));
        }
        if let Some(n) = self.vm.nr_mmu_pages {
            check_nr_mmu_pages(n).map_err(|e| err("vm.nr_mmu_pages", e))?;
        }
        if self.vm.dirty_log_initially_set && !self.vm.manual_dirty_log_protect {
            return Err(err(
                "vm.dirty_log_initially_set",
                "needs vm.manual_dirty_log_protect = true (KVM refuses KVM_DIRTY_LOG_INITIALLY_SET without \
                 KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)",
            ));
        }
        for (i, m) in self.compare.iter().enumerate() {
            self.vm.variant(m).map_err(|e| err(format!("compare[{i}]"), e))?;
        }
        if self.memslots.is_empty() {
            return Err(err("memslot", "a scenario needs at least one [[memslot]]"));
        }
        for (i, m) in self.memslots.iter().enumerate() {
            if m.size.0 == 0 || m.size.0 % 4096 != 0 || m.gpa.0 % 4096 != 0 {
                return Err(err(format!("memslot[{i}]"), "gpa and size must be non-zero multiples of 4 KiB"));
            }
            if !["4k", "thp"].contains(&m.backing.as_str()) {
                return Err(err(format!("memslot[{i}].backing"), format!("`{}` is not one of 4k, thp", m.backing)));
            }
            if let Some(p) = &m.guest_page_size {
                if page_shift(p).is_none() {
                    return Err(err(
                        format!("memslot[{i}].guest_page_size"),
                        format!("`{p}` is not one of 4k, 2m, 1g"),
                    ));
                }
            }
        }
        for (i, m) in self.mmio.iter().enumerate() {
            if m.device != "latch" {
                return Err(err(format!("mmio[{i}].device"), format!("`{}` is not a known device (latch)", m.device)));
            }
        }
        let g = &self.guest;
        if !["4-level", "5-level"].contains(&g.paging.as_str()) {
            return Err(err("guest.paging", format!("`{}`: scenario guests use 4-level or 5-level paging (the walker supports every mode; the scenario layouts build 64-bit tables)", g.paging)));
        }
        if !["kernel", "identity"].contains(&g.layout.as_str()) {
            return Err(err("guest.layout", format!("`{}` is not one of kernel, identity", g.layout)));
        }
        if page_shift(&g.page_size).is_none() || (g.layout == "kernel" && g.page_size == "1g") {
            return Err(err(
                "guest.page_size",
                format!(
                    "`{}` is not a page size this layout supports (4k, 2m{})",
                    g.page_size,
                    if g.layout == "identity" { ", 1g" } else { "" }
                ),
            ));
        }
        if !["clear", "preset"].contains(&g.accessed_dirty.as_str()) {
            return Err(err("guest.accessed_dirty", format!("`{}` is not one of clear, preset", g.accessed_dirty)));
        }
        if g.vcpus == 0 || g.vcpus > 64 {
            return Err(err("guest.vcpus", "must be 1..=64"));
        }
        if g.layout == "kernel" && g.vcpus != 1 {
            return Err(err("guest.vcpus", "the kernel layout runs one vCPU"));
        }
        if g.layout == "kernel" && self.memslots[0].gpa.0 != 0 {
            return Err(err("memslot[0].gpa", "the kernel layout needs guest RAM at gpa 0 in the first memslot"));
        }
        if g.processes == 0 {
            return Err(err("guest.processes", "must be at least 1"));
        }
        let levels: u8 = if g.paging == "5-level" { 5 } else { 4 };
        // What the ops find when they run, in order: the processes (kernel layout) and the
        // top-level tables (identity layout).
        let mut procs = ProcessTracker::new(g.processes);
        let mut roots: u64 = 1;
        // Which memslots log dirty pages when each op runs.
        let mut logging = vec![false; self.memslots.len()];
        for (pi, p) in self.phases.iter().enumerate() {
            for (oi, op) in p.ops.iter().enumerate() {
                let f = |x: &str| format!("phase[{pi}].ops[{oi}].{x}");
                if op.slot().is_some_and(|slot| slot as usize >= self.memslots.len()) {
                    return Err(err(
                        f("slot"),
                        format!("no such memslot (the scenario has {}, numbered from 0)", self.memslots.len()),
                    ));
                }
                if let Some((start, pages)) = op.range() {
                    if pages.checked_mul(4096).and_then(|b| start.checked_add(b)).is_none() {
                        return Err(err(
                            f("pages"),
                            format!("{start:#x} + {pages} pages runs past the end of the 64-bit address space"),
                        ));
                    }
                }
                if let Some((slot, offset, size)) = op.host_range() {
                    let len = self.memslots[slot as usize].size.0;
                    if offset % 4096 != 0 {
                        return Err(err(f("offset"), format!("{offset:#x} is not a multiple of 4 KiB")));
                    }
                    if size == 0 || size % 4096 != 0 {
                        return Err(err(f("size"), format!("{size:#x} is not a non-zero multiple of 4 KiB")));
                    }
                    if offset >= len {
                        return Err(err(
                            f("offset"),
                            format!("{offset:#x} is beyond memslot[{slot}], which is {len:#x} bytes"),
                        ));
                    }
                    if offset.checked_add(size).is_none_or(|end| end > len) {
                        return Err(err(
                            f("size"),
                            format!(
                                "offset {offset:#x} + size {size:#x} runs past the end of memslot[{slot}], \
                                 which is {len:#x} bytes"
                            ),
                        ));
                    }
                }
                match *op {
                    Op::SetNrMmuPages { nr_mmu_pages } => {
                        check_nr_mmu_pages(nr_mmu_pages).map_err(|e| err(f("nr_mmu_pages"), e))?;
                    }
                    Op::DirtyLogStart { slot } if logging[slot as usize] => {
                        return Err(err(
                            f("slot"),
                            format!("memslot {slot} already logs dirty pages here (an earlier dirty-log-start)"),
                        ))
                    }
                    Op::DirtyLogStop { slot } | Op::DirtyLogHarvest { slot } if !logging[slot as usize] => {
                        return Err(err(
                            f("slot"),
                            format!(
                                "memslot {slot} does not log dirty pages when this op runs (KVM_GET_DIRTY_LOG \
                                 would fail with ENOENT): put a dirty-log-start for it before"
                            ),
                        ))
                    }
                    Op::DirtyLogStart { slot } => logging[slot as usize] = true,
                    Op::DirtyLogStop { slot } => logging[slot as usize] = false,
                    _ => {}
                }
                match op {
                    Op::RewriteEntry { level, .. } if *level > levels => {
                        return Err(err(
                            f("level"),
                            format!("{level}, but the guest has {levels}-level paging (guest.paging): 1..={levels}"),
                        ))
                    }
                    Op::NewRoot if g.layout == "identity" => roots += 1,
                    Op::SwitchRoot { root } if g.layout == "identity" && u64::from(*root) >= roots => {
                        return Err(err(
                            f("root"),
                            format!(
                                "no root {root} at this point: 0 is the boot tables, and each new-root before \
                                 this op makes the next ({} so far)",
                                roots - 1
                            ),
                        ))
                    }
                    _ if g.layout == "kernel" => procs.step(op).map_err(|e| err(f("process"), e))?,
                    _ => {}
                }
                if let Some((field, name, pages)) = op.workload() {
                    if vmmu_guest::Workload::parse(name, pages).is_none() {
                        return Err(err(
                            f(field),
                            format!("`{name}` is not one of {}", vmmu_guest::Workload::NAMES.join(", ")),
                        ));
                    }
                    if pages == 0 {
                        return Err(err(f("pages"), "must be > 0"));
                    }
                }
                match op {
                    Op::Write { pages, .. }
                    | Op::Read { pages, .. }
                    | Op::Fetch { pages, .. }
                    | Op::ReadThenWrite { pages, .. }
                    | Op::Munmap { pages, .. }
                        if *pages == 0 =>
                    {
                        return Err(err(f("pages"), "must be > 0"))
                    }
                    Op::RewriteEntry { level, .. } if !(1..=5).contains(level) => {
                        return Err(err(f("level"), "must be 1..=5"))
                    }
                    Op::RewriteEntry { .. } | Op::NewRoot | Op::SwitchRoot { .. } if g.layout != "identity" => {
                        return Err(err(format!("phase[{pi}].ops[{oi}].op"), "needs the identity layout"))
                    }
                    Op::Switch { process } | Op::Exit { process } if *process == 0 => {
                        return Err(err(f("process"), "process numbers start at 1"))
                    }
                    Op::ProcessChurn { iterations: 0, .. } | Op::ProcessChurn { pages: 0, .. } => {
                        return Err(err(f("iterations"), "iterations and pages must be > 0"))
                    }
                    Op::Switch { .. }
                    | Op::Munmap { .. }
                    | Op::Fork
                    | Op::Exec
                    | Op::Exit { .. }
                    | Op::ProcessChurn { .. }
                    | Op::Replay { .. }
                        if g.layout != "kernel" =>
                    {
                        return Err(err(format!("phase[{pi}].ops[{oi}].op"), "needs the kernel layout"))
                    }
                    Op::Migrate { max_rounds: 0, .. } => return Err(err(f("max_rounds"), "must be > 0")),
                    Op::IdleTracking { passes: 0, .. } => return Err(err(f("passes"), "must be > 0")),
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// KVM's lower bound for KVM_SET_NR_MMU_PAGES (`KVM_MIN_ALLOC_MMU_PAGES`): the ioctl returns
/// EINVAL below it.
pub const MIN_NR_MMU_PAGES: u64 = 64;

/// Checks a KVM_SET_NR_MMU_PAGES value as KVM does (`kvm_vm_ioctl_set_nr_mmu_pages`).
fn check_nr_mmu_pages(n: u64) -> Result<(), String> {
    if n < MIN_NR_MMU_PAGES {
        return Err(format!(
            "{n} is below KVM's minimum of {MIN_NR_MMU_PAGES} (KVM_MIN_ALLOC_MMU_PAGES): KVM_SET_NR_MMU_PAGES \
             returns EINVAL"
        ));
    }
    Ok(())
}

/// The guest kernel's processes as the ops change them, to refuse an op that names a
/// process that will not exist when it runs (pids as the kernel gives them: 1..=processes
/// at boot, each fork the next one).
struct ProcessTracker {
    booted: u32,
    forked: std::collections::BTreeSet<u32>,
    exited: std::collections::BTreeSet<u32>,
    next: u64,
    current: u32,
}

impl ProcessTracker {
    fn new(processes: u32) -> Self {
        ProcessTracker {
            booted: processes,
            forked: Default::default(),
            exited: Default::default(),
            next: u64::from(processes) + 1,
            current: 1,
        }
    }

    fn alive(&self, pid: u32) -> bool {
        (pid >= 1 && pid <= self.booted || self.forked.contains(&pid)) && !self.exited.contains(&pid)
    }

    fn missing(&self, pid: u32) -> String {
        format!(
            "there is no process {pid} when this op runs (guest.processes boots 1..={}, each fork adds the next \
             pid{})",
            self.booted,
            if self.exited.is_empty() { String::new() } else { format!("; {} exited before", self.exited.len()) }
        )
    }

    fn step(&mut self, op: &Op) -> Result<(), String> {
        match *op {
            Op::Fork => {
                self.forked.insert(u32::try_from(self.next).map_err(|_| "out of process ids".to_string())?);
                self.next += 1;
            }
            Op::ProcessChurn { iterations, .. } => self.next += u64::from(iterations),
            Op::Switch { process } if !self.alive(process) => return Err(self.missing(process)),
            Op::Switch { process } => self.current = process,
            Op::Exit { process } if !self.alive(process) => return Err(self.missing(process)),
            Op::Exit { process } if process == self.current => {
                return Err(format!("process {process} is the current one and cannot exit (switch away first)"))
            }
            Op::Exit { process } => {
                self.exited.insert(process);
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
