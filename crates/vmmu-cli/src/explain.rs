//! `vmmu explain GVA`: the translation of one guest-virtual address on vCPU 0, step by step,
//! in the state a scenario left — as text and as an SVG diagram.
//!
//! Nothing here walks page tables itself: the walks are x86-paging's own (`walk_2d_with` for
//! TDP, `walk` for the guest walk through memslots and for the shadow walk), run read-only
//! (`WalkOptions::PEEK`) with a [`WalkObserver`] that sees every guest entry, over a
//! [`HostPhys`] that records every memory reference in order (and performs no write: a TDP
//! A/D update is recorded as one reference, not made). Each guest entry's references are then
//! split into the nested EPT/NPT walk of the guest table page (all but the last) and the read
//! of the entry itself (the last); what follows the last entry is the walk of the final GPA.
//!
//! This module makes the [`Explanation`] and decodes entries; its submodule `render` turns
//! it into the text `vmmu explain` prints ([`Explanation::text`]) and the SVG diagram
//! ([`Explanation::svg`]).

use std::cell::RefCell;
use vmmu::host::PhysMem;
use vmmu::hw::cpu::{CpuMode, NativeMem};
use vmmu::memslot::Memslots;
use vmmu::mmu::role::Role;
use vmmu::x86_paging::access::{Access, AccessKind};
use vmmu::x86_paging::addr::{Gpa, Gva, Hpa};
use vmmu::x86_paging::entry::{EptEntry, ADDR_MASK_1G, ADDR_MASK_2M, ADDR_MASK_4K};
use vmmu::x86_paging::ept::{HostPhys, TdpExit};
use vmmu::x86_paging::mode::{PagingMode, PagingState};
use vmmu::x86_paging::walk::{reserved_bits, walk, GuestPhys, WalkError, WalkObserver, WalkOptions};
use vmmu::x86_paging::walk2d::{walk_2d_with, Tdp, Walk2dError};
use vmmu::{Kvm, Vcpu};

mod render;

/// Why there is nothing to explain.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The vCPU runs without a hypervisor MMU (native mode).
    #[error("vCPU {0} runs natively (no TDP or shadow tables to explain)")]
    Native(u32),
}

/// One memory reference the walk made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRef {
    /// Host-physical address.
    pub hpa: u64,
    /// The value read (for an A/D update: the value before it).
    pub value: u64,
    /// The value an A/D update would write (not written: explain is read-only).
    pub update: Option<u64>,
}

/// The shadow page holding a table (shadow paging, the legacy TDP MMU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpInfo {
    /// Its role.
    pub role: Role,
    /// The guest table it shadows (indirect) or the first gfn it maps (direct).
    pub gfn: u64,
    /// Whether it is unsync.
    pub unsync: bool,
}

/// One entry of a TDP (EPT/NPT) or shadow table read by the walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableStep {
    /// Level (4 = PML4E ... 1 = PTE).
    pub level: u8,
    /// The table's host-physical address.
    pub table_hpa: u64,
    /// The entry's index in the table.
    pub index: u64,
    /// The entry.
    pub entry: u64,
    /// The shadow page of the table, if it is one.
    pub sp: Option<SpInfo>,
}

/// A TDP walk of one guest-physical address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NestedWalk {
    /// The guest-physical address translated.
    pub gpa: u64,
    /// Each TDP entry read, top level first.
    pub steps: Vec<TableStep>,
    /// TDP A/D updates the walk would make (each a memory reference).
    pub ad_updates: u32,
}

/// One guest paging-structure entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestStep {
    /// Level (4 = PML4E ... 1 = PTE).
    pub level: u8,
    /// The guest table's guest-physical address.
    pub table_gpa: u64,
    /// The entry's index.
    pub index: u64,
    /// The entry's guest-physical address.
    pub entry_gpa: u64,
    /// The entry.
    pub entry: u64,
    /// Where the entry was read in host memory (none for PAE PDPTE registers).
    pub entry_hpa: Option<u64>,
    /// The TDP walk of the guest table page (TDP only).
    pub nested: Option<NestedWalk>,
}

/// The translation mechanism explained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    /// Two-dimensional paging.
    Tdp {
        /// EPT (true) or NPT.
        ept: bool,
        /// TDP table levels.
        levels: u8,
        /// EPT A/D bits enabled.
        ad: bool,
        /// The TDP root table.
        root: u64,
    },
    /// Shadow paging.
    Shadow {
        /// The shadow root table.
        root: u64,
        /// Shadow paging levels.
        levels: u8,
    },
}

/// A translation, step by step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The address.
    pub gva: u64,
    /// The vCPU.
    pub vcpu: u32,
    /// The access explained.
    pub access: AccessKind,
    /// The vCPU's CPL.
    pub cpl: u8,
    /// The guest's paging mode.
    pub guest_mode: PagingMode,
    /// Guest CR3.
    pub cr3: u64,
    /// TDP or shadow.
    pub dim: Dimension,
    /// The guest walk (under shadow paging: KVM's software walk through memslots).
    pub guest: Vec<GuestStep>,
    /// TDP: the walk of the final GPA (or of the GPA whose TDP walk failed).
    pub final_nested: Option<NestedWalk>,
    /// Shadow: the hardware walk of the shadow tables.
    pub shadow: Vec<TableStep>,
    /// The final guest-physical address, if the guest walk succeeded.
    pub gpa: Option<u64>,
    /// The final host-physical address, if the whole walk succeeded.
    pub hpa: Option<u64>,
    /// Shadow: the final GPA through the memslot and the host page table (should equal `hpa`).
    pub slot_hpa: Option<u64>,
    /// Memory references the hardware walk made (TDP: the 2D walk; shadow: the SPTE reads).
    pub mem_refs: u32,
    /// The same count as x86-paging's 2D walker reports it (`Translation2d::mem_refs`).
    pub walker_refs: Option<u32>,
    /// Why the walk failed, if it did.
    pub failure: Option<String>,
}

/// Host memory that records every reference and writes nothing.
struct Recorder<'a> {
    mem: &'a PhysMem,
    log: RefCell<Vec<MemRef>>,
}

impl HostPhys for Recorder<'_> {
    fn read_u64(&self, hpa: Hpa) -> u64 {
        let value = HostPhys::read_u64(self.mem, hpa);
        self.log.borrow_mut().push(MemRef { hpa: hpa.raw(), value, update: None });
        value
    }
    fn cmpxchg_u64(&self, hpa: Hpa, old: u64, new: u64) -> bool {
        self.log.borrow_mut().push(MemRef { hpa: hpa.raw(), value: old, update: Some(new) });
        true
    }
}

/// Guest entries seen by the walker, each with the references made since the previous one.
struct Elements<'a, 'b> {
    rec: &'a Recorder<'b>,
    mark: usize,
    seen: Vec<(u8, u64, u64, Vec<MemRef>)>,
}

impl WalkObserver for Elements<'_, '_> {
    fn element(&mut self, level: u8, pte_gpa: Gpa, pte: u64) {
        let log = self.rec.log.borrow();
        self.seen.push((level, pte_gpa.raw(), pte, log[self.mark..].to_vec()));
        self.mark = log.len();
    }
}

/// Guest memory through memslots and the VMM's page table, without faulting anything in.
struct SlotMem<'a> {
    kvm: &'a Kvm,
    slots: &'a Memslots,
    mem: &'a PhysMem,
    /// The host address of each read, in order.
    reads: RefCell<Vec<u64>>,
}

impl SlotMem<'_> {
    fn hpa(&self, gpa: u64) -> Result<u64, String> {
        let g = Gpa::new(gpa);
        let slot = self.slots.find(g.gfn()).ok_or_else(|| format!("GPA {gpa:#x} is in no memslot"))?;
        let hva = slot.gfn_to_hva(g.gfn());
        let page = self
            .kvm
            .host()
            .get_user_page_fast_only(hva, false)
            .ok_or_else(|| format!("GPA {gpa:#x} (HVA {:#x}) is not resident in the host", hva.raw()))?;
        Ok(page.pfn.hpa().raw() + g.page_offset())
    }
}

impl GuestPhys for SlotMem<'_> {
    type Error = String;
    fn read_pte(&mut self, gpa: Gpa, size: u8, _gva: Gva) -> Result<u64, String> {
        let h = self.hpa(gpa.raw())?;
        self.reads.borrow_mut().push(h);
        Ok(self.mem.read(Hpa::new(h), size))
    }
    fn cmpxchg_pte(&mut self, _: Gpa, _: u8, _: u64, _: u64, _: Gva) -> Result<bool, String> {
        Ok(true)
    }
}

/// Shadow entries seen by the hardware walk.
#[derive(Default)]
struct Sptes(Vec<(u8, u64, u64)>);

impl WalkObserver for Sptes {
    fn element(&mut self, level: u8, pte_gpa: Gpa, pte: u64) {
        self.0.push((level, pte_gpa.raw(), pte));
    }
}

/// The shadow page whose table is at `table_hpa`, if any: asked of the MMU
/// ([`Kvm::shadow_page_info`]), which takes `mmu_lock` and the shadow state as KVM's shadow
/// paths do.
fn sp_of(kvm: &Kvm, table_hpa: u64) -> Option<SpInfo> {
    let p = kvm.shadow_page_info(Hpa::new(table_hpa).pfn())?;
    Some(SpInfo { role: p.role, gfn: p.gfn.raw(), unsync: p.unsync })
}

/// Splits the references of one TDP walk (reads top-down, then A/D updates) into steps.
fn nested_walk(kvm: &Kvm, gpa: u64, levels: u8, refs: &[MemRef]) -> NestedWalk {
    let mut steps = Vec::new();
    let mut ad = 0;
    for r in refs {
        if r.update.is_some() {
            ad += 1;
            continue;
        }
        let table = r.hpa & !0xfff;
        steps.push(TableStep {
            level: levels.saturating_sub(u8::try_from(steps.len()).unwrap_or(u8::MAX)),
            table_hpa: table,
            index: (r.hpa & 0xfff) / 8,
            entry: r.value,
            sp: sp_of(kvm, table),
        });
    }
    NestedWalk { gpa, steps, ad_updates: ad }
}

/// Explains the translation of `gva` for `access` on `vcpu`, in the VM's current state.
pub fn explain(kvm: &Kvm, vcpu: &Vcpu, gva: u64, access: AccessKind) -> Result<Explanation, ExplainError> {
    let cpu = vcpu.cpu();
    let st: PagingState = *cpu.paging();
    let acc = Access { kind: access, cpl: cpu.cpl(), implicit_supervisor: false, eflags_ac: cpu.eflags_ac() };
    let mut e = Explanation {
        gva,
        vcpu: vcpu.id(),
        access,
        cpl: cpu.cpl(),
        guest_mode: st.mode(),
        cr3: st.cr3,
        dim: Dimension::Shadow { root: 0, levels: 0 },
        guest: vec![],
        final_nested: None,
        shadow: vec![],
        gpa: None,
        hpa: None,
        slot_hpa: None,
        mem_refs: 0,
        walker_refs: None,
        failure: None,
    };
    let mem: &PhysMem = cpu.mem();
    match cpu.mode() {
        CpuMode::Native => return Err(ExplainError::Native(vcpu.id())),
        CpuMode::Tdp(tdp) => {
            let (ept, ad, root) = match tdp {
                Tdp::Ept(c) => (true, c.ad_enabled, c.root.raw()),
                Tdp::Npt(c) => (false, true, c.root.raw()),
            };
            let levels = tdp.levels();
            e.dim = Dimension::Tdp { ept, levels, ad, root };
            let rec = Recorder { mem, log: RefCell::new(Vec::new()) };
            let mut obs = Elements { rec: &rec, mark: 0, seen: vec![] };
            let r = walk_2d_with(&rec, tdp, &st, Gva::new(gva), &acc, WalkOptions::PEEK, &mut obs);
            let (seen, mark) = (obs.seen, obs.mark);
            let log = rec.log.into_inner();
            e.mem_refs = u32::try_from(log.len()).unwrap_or(u32::MAX);
            for (level, entry_gpa, entry, refs) in seen {
                let (nested, entry_hpa) = match refs.split_last() {
                    Some((last, walk)) => {
                        (Some(nested_walk(kvm, entry_gpa & !0xfff, levels, walk)), Some(last.hpa | (entry_gpa & 7)))
                    }
                    None => (None, None),
                };
                e.guest.push(guest_step(&st, level, entry_gpa, entry, entry_hpa, nested));
            }
            let tail = &log[mark..];
            match r {
                Ok(t) => {
                    e.gpa = Some(t.gpa.raw());
                    e.hpa = Some(t.hpa.raw());
                    e.walker_refs = Some(t.mem_refs);
                    e.final_nested = Some(nested_walk(kvm, t.gpa.raw(), levels, tail));
                }
                Err(Walk2dError::Guest(ec)) => e.failure = Some(guest_failure(&st, &e.guest, &acc, ec.0.into())),
                Err(Walk2dError::NonCanonical) => e.failure = Some("the GVA is not canonical (#GP)".into()),
                Err(Walk2dError::Contended) => e.failure = Some("entries kept changing under the walker".into()),
                Err(Walk2dError::Exit(x)) => {
                    let gpa = match x {
                        TdpExit::EptViolation { gpa, .. }
                        | TdpExit::EptMisconfig { gpa }
                        | TdpExit::Npf { gpa, .. }
                        | TdpExit::Contended { gpa } => gpa.raw(),
                    };
                    let n = nested_walk(kvm, gpa, levels, tail);
                    if e.guest.last().is_some_and(|g| g.level == 1 || is_leaf(&st, g.level, g.entry)) {
                        e.gpa = Some(gpa);
                    }
                    e.failure = Some(tdp_failure(&x, ept, &n, access, ad));
                    e.final_nested = Some(n);
                }
            }
        }
        CpuMode::Shadow(root) => {
            e.dim = Dimension::Shadow { root: root.root.raw(), levels: root.level };
            // KVM's view: the guest walk in software through memslots.
            let slots = kvm.memslots();
            let mut sm = SlotMem { kvm, slots: &slots, mem, reads: RefCell::new(vec![]) };
            let mut seen = Sptes::default();
            let g = walk(&mut sm, &st, Gva::new(gva), &acc, WalkOptions::PEEK, &mut seen);
            let reads = sm.reads.borrow().clone();
            let mut ri = 0;
            for (level, entry_gpa, entry) in seen.0 {
                // A PAE PDPTE comes from its register, not memory.
                let from_mem = !(st.mode() == PagingMode::Pae && level == 3);
                let entry_hpa = if from_mem {
                    ri += 1;
                    reads.get(ri - 1).copied()
                } else {
                    None
                };
                e.guest.push(guest_step(&st, level, entry_gpa, entry, entry_hpa, None));
            }
            match g {
                Ok(t) => {
                    e.gpa = Some(t.gpa.raw());
                    e.slot_hpa = sm.hpa(t.gpa.raw()).ok();
                }
                Err(WalkError::PageFault(ec)) => {
                    e.failure = Some(guest_failure(&st, &e.guest, &acc, ec.0.into()));
                }
                Err(WalkError::NonCanonical) => e.failure = Some("the GVA is not canonical (#GP)".into()),
                Err(WalkError::Mem(m)) => e.failure = Some(format!("the guest walk could not read a table: {m}")),
                Err(WalkError::Contended) => e.failure = Some("entries kept changing under the walker".into()),
            }
            // The hardware's view: the shadow tables.
            let hw = cpu.hw_state();
            let mut sptes = Sptes::default();
            let s = walk(&mut NativeMem(mem), &hw, Gva::new(gva), &acc, WalkOptions::PEEK, &mut sptes);
            for (level, sptep, spte) in sptes.0 {
                let table = sptep & !0xfff;
                let from_mem = !(hw.mode() == PagingMode::Pae && level == 3);
                e.mem_refs += u32::from(from_mem);
                e.shadow.push(TableStep {
                    level,
                    table_hpa: table,
                    index: (sptep & 0xfff) / 8,
                    entry: spte,
                    sp: sp_of(kvm, table),
                });
            }
            match s {
                Ok(t) => e.hpa = Some(t.gpa.raw()),
                Err(WalkError::PageFault(ec)) if e.failure.is_none() => {
                    let why = guest_failure(&hw, &e.guest_like_shadow(), &acc, ec.0.into());
                    e.failure = Some(format!(
                        "the guest's own walk succeeds, but the shadow walk faults: {why} — a shadow #PF that \
                         KVM fixes (FNAME(page_fault) builds the missing SPTEs) on the next access"
                    ));
                }
                Err(_) => {}
            }
        }
    }
    Ok(e)
}

impl Explanation {
    /// The shadow steps as guest steps (for the failure decoder).
    fn guest_like_shadow(&self) -> Vec<GuestStep> {
        self.shadow
            .iter()
            .map(|s| GuestStep {
                level: s.level,
                table_gpa: s.table_hpa,
                index: s.index,
                entry_gpa: s.table_hpa + s.index * 8,
                entry: s.entry,
                entry_hpa: None,
                nested: None,
            })
            .collect()
    }
}

fn guest_step(
    st: &PagingState,
    level: u8,
    entry_gpa: u64,
    entry: u64,
    entry_hpa: Option<u64>,
    nested: Option<NestedWalk>,
) -> GuestStep {
    let esize = if st.mode() == PagingMode::Bits32 { 4 } else { 8 };
    GuestStep {
        level,
        table_gpa: entry_gpa & !0xfff,
        index: (entry_gpa & 0xfff) / esize,
        entry_gpa,
        entry,
        entry_hpa,
        nested,
    }
}

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;

fn is_leaf(st: &PagingState, level: u8, e: u64) -> bool {
    level == 1 || (level <= 3 && e & PS != 0 && !(st.mode() == PagingMode::Pae && level == 3))
}

/// The name of an entry at `level`.
pub fn level_name(level: u8) -> &'static str {
    match level {
        5 => "PML5E",
        4 => "PML4E",
        3 => "PDPTE",
        2 => "PDE",
        1 => "PTE",
        _ => "entry",
    }
}

/// The address an x86 entry at `level` points to (the next table, or the page).
fn x86_addr(level: u8, e: u64) -> u64 {
    if level == 3 && e & PS != 0 {
        e & ADDR_MASK_1G
    } else if level == 2 && e & PS != 0 {
        e & ADDR_MASK_2M
    } else {
        e & ADDR_MASK_4K
    }
}

/// An x86 (guest, NPT or shadow) entry's bits.
pub fn x86_bits(e: u64) -> String {
    let b = |m: u64| u8::from(e & m != 0);
    format!("P={} RW={} US={} A={} D={} PS={} NX={}", b(P), b(RW), b(US), b(A), b(D), b(PS), b(NX))
}

/// An EPT entry's bits (the memory type only for a leaf, the only place it means anything).
pub fn ept_bits(e: u64, leaf: bool) -> String {
    let b = |m: u64| u8::from(e & m != 0);
    let mt = match ((e & EptEntry::MEMTYPE_MASK) >> EptEntry::MEMTYPE_SHIFT) as u8 {
        EptEntry::MT_UC => "UC",
        EptEntry::MT_WC => "WC",
        EptEntry::MT_WT => "WT",
        EptEntry::MT_WP => "WP",
        EptEntry::MT_WB => "WB",
        _ => "rsvd",
    };
    format!(
        "R={} W={} X={} A={} D={} PS={}{}",
        b(EptEntry::READ),
        b(EptEntry::WRITE),
        b(EptEntry::EXEC),
        b(EptEntry::ACCESSED),
        b(EptEntry::DIRTY),
        b(EptEntry::HUGE),
        if leaf { format!(" mt={mt}") } else { String::new() }
    )
}

/// A shadow page's role, in the kvm_mmu_get_page tracepoint's words.
pub fn role_text(sp: &SpInfo) -> String {
    const ACC: [&str; 8] = ["---", "--x", "w--", "w-x", "-u-", "-ux", "wu-", "wux"];
    let r = sp.role;
    format!(
        "sp gfn {:#x} l{} {} access {} q{}{}{}",
        sp.gfn,
        r.level(),
        if r.direct() != 0 { "direct" } else { "indirect" },
        ACC[r.access() as usize & 7],
        r.quadrant(),
        if sp.unsync { " unsync" } else { "" },
        if r.invalid() != 0 { " invalid" } else { "" }
    )
}

/// Why the guest walk faulted: the level and the bit.
fn guest_failure(st: &PagingState, steps: &[GuestStep], acc: &Access, ec: u64) -> String {
    let Some(last) = steps.last() else {
        return format!("#PF error code {ec:#x}");
    };
    let l = last.level;
    if last.entry & P == 0 {
        return format!("not present: the level-{l} {} has P=0 (#PF error code {ec:#x})", level_name(l));
    }
    let rsvd = reserved_bits(st, l, last.entry);
    if rsvd != 0 {
        return format!("reserved bits {rsvd:#x} set in the level-{l} {} (#PF error code {ec:#x})", level_name(l));
    }
    let first = |m: u64, set: bool| steps.iter().find(|s| (s.entry & m != 0) == set).map(|s| s.level);
    let why = match acc.kind {
        AccessKind::Write => first(RW, false).map(|lv| format!("RW=0 at level {lv} ({}): a write", level_name(lv))),
        AccessKind::Fetch => first(NX, true).map(|lv| format!("NX=1 at level {lv} ({}): a fetch", level_name(lv))),
        AccessKind::Read => None,
    };
    let user = (acc.cpl == 3).then(|| first(US, false)).flatten();
    match (user, why) {
        (Some(lv), _) => format!("US=0 at level {lv} ({}): a user access (#PF error code {ec:#x})", level_name(lv)),
        (None, Some(w)) => format!("{w} (#PF error code {ec:#x})"),
        (None, None) => format!("a protection violation (#PF error code {ec:#x})"),
    }
}

/// Why the TDP walk exited: the EPT/NPT level and the bit.
fn tdp_failure(x: &TdpExit, ept: bool, n: &NestedWalk, access: AccessKind, ad: bool) -> String {
    let last = n.steps.last();
    let lvl = last.map_or(0, |s| s.level);
    match x {
        TdpExit::EptMisconfig { gpa } => {
            format!(
                "EPT misconfiguration at level {lvl} for GPA {:#x} (entry {:#x})",
                gpa.raw(),
                last.map_or(0, |s| s.entry)
            )
        }
        TdpExit::EptViolation { gpa, qualification, .. } => {
            let e = last.map_or(0, |s| s.entry);
            let what = if e & EptEntry::RWX == 0 {
                format!("the level-{lvl} EPT {} is not present (R=W=X=0)", level_name(lvl))
            } else {
                let need = match access {
                    _ if ad && n.gpa != gpa.raw() => "W (EPT A/D: guest table accesses are writes)",
                    AccessKind::Read => "R",
                    AccessKind::Write => "W",
                    AccessKind::Fetch => "X",
                };
                let missing: Vec<String> = n
                    .steps
                    .iter()
                    .filter(|s| {
                        s.entry
                            & match access {
                                AccessKind::Read => EptEntry::READ,
                                AccessKind::Write => EptEntry::WRITE,
                                AccessKind::Fetch => EptEntry::EXEC,
                            }
                            == 0
                    })
                    .map(|s| format!("level {}", s.level))
                    .collect();
                format!(
                    "the access needs {need}, missing at {}",
                    if missing.is_empty() { "?".into() } else { missing.join(", ") }
                )
            };
            format!("EPT violation for GPA {:#x}: {what} (exit qualification {:#x})", gpa.raw(), qualification.0)
        }
        TdpExit::Npf { gpa, error_code } => {
            let e = last.map_or(0, |s| s.entry);
            let what = if e & P == 0 {
                format!("the level-{lvl} NPT {} is not present (P=0)", level_name(lvl))
            } else {
                "a protection violation".into()
            };
            let _ = ept;
            format!("nested page fault for GPA {:#x}: {what} (error code {error_code:#x})", gpa.raw())
        }
        TdpExit::Contended { gpa } => format!("TDP entries for {:#x} kept changing", gpa.raw()),
    }
}
