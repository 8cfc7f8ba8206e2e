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

use crate::svg::Svg;
use std::cell::RefCell;
use std::fmt::Write as _;
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

/// The shadow page whose table is at `table_hpa`, if any. The shadow MMU's state is guarded
/// by `mmu_lock` held for write (KVM's shadow paths, even read-only ones such as the audit,
/// take `write_lock(&kvm->mmu_lock)`), so this takes it before the shadow lock, in the
/// order crates/vmmu uses.
fn sp_of(kvm: &Kvm, table_hpa: u64) -> Option<SpInfo> {
    let _w = kvm.mmu().mmu_lock.write();
    let s = kvm.mmu().shadow.lock();
    let id = s.pages.by_spt(Hpa::new(table_hpa).pfn())?;
    let p = s.pages.get(id);
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
            level: levels - steps.len() as u8,
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
            e.mem_refs = log.len() as u32;
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

fn kind_name(k: AccessKind) -> &'static str {
    match k {
        AccessKind::Read => "read",
        AccessKind::Write => "write",
        AccessKind::Fetch => "fetch",
    }
}

fn tdp_line(ept: bool, s: &TableStep) -> String {
    let leaf = s.level == 1 || s.entry & PS != 0;
    let bits = if ept { ept_bits(s.entry, leaf) } else { x86_bits(s.entry) };
    let present = if ept { s.entry & EptEntry::RWX != 0 } else { s.entry & P != 0 };
    let to = if !present {
        "not present".to_string()
    } else if leaf {
        format!("-> page HPA {:#x}", x86_addr(s.level, s.entry))
    } else {
        format!("-> table HPA {:#x}", s.entry & ADDR_MASK_4K)
    };
    let mut l = format!(
        "{} level {} ({:5}) table HPA {:#x} index {:3}  entry {:#018x}  {bits}  {to}",
        if ept { "EPT" } else { "NPT" },
        s.level,
        level_name(s.level),
        s.table_hpa,
        s.index,
        s.entry
    );
    if let Some(sp) = &s.sp {
        let _ = write!(l, "  [{}]", role_text(sp));
    }
    l
}

fn nested_text(out: &mut String, ept: bool, n: &NestedWalk, what: &str) {
    let _ = writeln!(out, "    {} walk of GPA {:#x} ({what}):", if ept { "EPT" } else { "NPT" }, n.gpa);
    for s in &n.steps {
        let _ = writeln!(out, "      {}", tdp_line(ept, s));
    }
    if n.ad_updates > 0 {
        let _ = writeln!(out, "      + {} A/D update(s) the hardware would make", n.ad_updates);
    }
}

impl Explanation {
    /// The explanation as text.
    pub fn text(&self, title: &str) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "vmmu explain {:#x}: {title}, vCPU {}, a {} at CPL {}",
            self.gva,
            self.vcpu,
            kind_name(self.access),
            self.cpl
        );
        let levels = self.guest_mode.levels();
        let _ = writeln!(o, "guest: {:?} paging ({levels} levels), CR3 {:#x}", self.guest_mode, self.cr3);
        let ept = match self.dim {
            Dimension::Tdp { ept, levels, ad, root } => {
                let _ = writeln!(
                    o,
                    "TDP: {} {levels}-level{}, root table at HPA {root:#x}",
                    if ept { "EPT" } else { "NPT" },
                    if ept {
                        if ad {
                            ", A/D bits on"
                        } else {
                            ", A/D bits off"
                        }
                    } else {
                        ""
                    }
                );
                ept
            }
            Dimension::Shadow { root, levels } => {
                let _ = writeln!(o, "shadow paging: {levels}-level shadow root at HPA {root:#x}");
                false
            }
        };
        let _ = writeln!(o);
        if matches!(self.dim, Dimension::Shadow { .. }) {
            let _ = writeln!(o, "1. the guest walk (KVM's FNAME(walk_addr), through memslots): GVA -> GPA");
        }
        for g in &self.guest {
            let _ = writeln!(
                o,
                "guest level {} ({}): table GPA {:#x}, index {}, entry at GPA {:#x}",
                g.level,
                level_name(g.level),
                g.table_gpa,
                g.index,
                g.entry_gpa
            );
            if let Some(n) = &g.nested {
                nested_text(&mut o, ept, n, "the guest table page");
            }
            let to = if g.entry & P == 0 {
                "not present".to_string()
            } else if is_leaf_any(g.level, g.entry, self.guest_mode) {
                format!("-> page GPA {:#x}", x86_addr(g.level, g.entry))
            } else {
                format!("-> next table GPA {:#x}", g.entry & ADDR_MASK_4K)
            };
            let at = g.entry_hpa.map(|h| format!("read at HPA {h:#x}: ")).unwrap_or_else(|| "register: ".into());
            let _ = writeln!(o, "    {at}{:#018x}  {}  {to}", g.entry, x86_bits(g.entry));
        }
        if let Some(gpa) = self.gpa {
            let _ = writeln!(o, "final GPA {gpa:#x}");
        }
        if let Some(n) = &self.final_nested {
            nested_text(&mut o, ept, n, if self.hpa.is_some() { "the final GPA" } else { "where it exited" });
        }
        if !self.shadow.is_empty() || matches!(self.dim, Dimension::Shadow { .. }) {
            if let Some(h) = self.slot_hpa {
                let _ = writeln!(o, "    through its memslot and the host page table: HPA {h:#x}");
            }
            let _ = writeln!(o, "\n2. the hardware walk of the shadow page tables: GVA -> HPA");
            for s in &self.shadow {
                let to = if s.entry & P == 0 {
                    "not present".to_string()
                } else if s.level == 1 || s.entry & PS != 0 {
                    format!("-> page HPA {:#x}", x86_addr(s.level, s.entry))
                } else {
                    format!("-> table HPA {:#x}", s.entry & ADDR_MASK_4K)
                };
                let _ = writeln!(
                    o,
                    "shadow level {} ({:5}) table HPA {:#x} index {:3}  SPTE {:#018x}  {}  {to}",
                    s.level,
                    level_name(s.level),
                    s.table_hpa,
                    s.index,
                    s.entry,
                    x86_bits(s.entry)
                );
                if let Some(sp) = &s.sp {
                    let _ = writeln!(o, "    shadow page: {}", role_text(sp));
                }
            }
        }
        let _ = writeln!(o);
        match (self.gpa, self.hpa) {
            (Some(g), Some(h)) => {
                let _ = writeln!(o, "result: GVA {:#x} -> GPA {g:#x} -> HPA {h:#x}", self.gva);
            }
            (_, Some(h)) => {
                let _ = writeln!(o, "result: GVA {:#x} -> HPA {h:#x}", self.gva);
            }
            _ => {}
        }
        if let (Some(a), Some(b)) = (self.slot_hpa, self.hpa) {
            let _ = writeln!(
                o,
                "the shadow SPTE {} the memslot translation",
                if a & !0xfff == b & !0xfff { "agrees with" } else { "DIFFERS from" }
            );
        }
        if let Some(f) = &self.failure {
            let _ = writeln!(o, "fault: {f}");
        }
        match self.walker_refs {
            Some(w) => {
                let _ = writeln!(o, "memory references: {} (x86-paging's walk_2d counts {w})", self.mem_refs);
            }
            None => {
                let what = match self.dim {
                    Dimension::Tdp { .. } => "made by the 2D walk up to the fault",
                    Dimension::Shadow { .. } => "the hardware walk of the shadow tables",
                };
                let _ = writeln!(o, "memory references: {} ({what})", self.mem_refs);
            }
        }
        o
    }
}

fn is_leaf_any(level: u8, e: u64, mode: PagingMode) -> bool {
    level == 1 || (e & PS != 0 && (level == 2 || (level == 3 && mode != PagingMode::Pae)))
}

/// Box geometry of the diagram.
const BW: f64 = 250.0;
const BH: f64 = 102.0;
const GX: f64 = 46.0;
const GY: f64 = 44.0;

impl Explanation {
    /// The walk as an SVG diagram. TDP: a grid with a row per guest level (and one for the
    /// final GPA), the TDP walk of that row's guest-physical access in columns (top level
    /// first) and the guest entry at the right; arrows follow the references. Shadow: the
    /// guest walk on the first row, the shadow walk on the second.
    pub fn svg(&self, title: &str) -> String {
        match self.dim {
            Dimension::Tdp { ept, levels, .. } => self.svg_2d(title, ept, levels),
            Dimension::Shadow { .. } => self.svg_shadow(title),
        }
    }

    fn header(&self, s: &mut Svg, title: &str, sub: &str) {
        s.text(GX, 30.0, 17.0, "bold", "#111", &format!("vmmu explain {:#x} — {title}", self.gva));
        s.text(GX, 52.0, 12.0, "normal", "#333", sub);
    }

    fn footer(&self, s: &mut Svg, y: f64) {
        let res = match (self.gpa, self.hpa) {
            (Some(g), Some(h)) => format!("GVA {:#x} -> GPA {g:#x} -> HPA {h:#x}", self.gva),
            (_, Some(h)) => format!("GVA {:#x} -> HPA {h:#x}", self.gva),
            _ => format!("GVA {:#x}: no translation", self.gva),
        };
        s.text(GX, y, 13.0, "bold", "#111", &res);
        let refs = match self.walker_refs {
            Some(w) => format!("memory references: {} (walk_2d: {w})", self.mem_refs),
            None => format!("memory references: {} (hardware walk, up to any fault)", self.mem_refs),
        };
        s.text(GX, y + 20.0, 12.0, "normal", "#333", &refs);
        if let Some(f) = &self.failure {
            s.text(GX, y + 40.0, 12.0, "bold", "#b00", &format!("fault: {f}"));
        }
    }

    fn tdp_box(s: &mut Svg, x: f64, y: f64, ept: bool, st: &TableStep) {
        let present = if ept { st.entry & EptEntry::RWX != 0 } else { st.entry & P != 0 };
        let leaf = st.level == 1 || st.entry & PS != 0;
        let (fill, stroke) = if !present { ("#fde2e2", "#b00") } else { ("#e3eefc", "#3566a8") };
        let mut lines = vec![
            format!("table HPA {:#x}", st.table_hpa),
            format!("index {}  entry {:#x}", st.index, st.entry),
            if ept { ept_bits(st.entry, leaf) } else { x86_bits(st.entry) },
        ];
        lines.push(if !present {
            "NOT PRESENT".into()
        } else if leaf {
            format!("page HPA {:#x}", x86_addr(st.level, st.entry))
        } else {
            format!("next HPA {:#x}", st.entry & ADDR_MASK_4K)
        });
        let title = format!("{} L{} {}", if ept { "EPT" } else { "NPT" }, st.level, level_name(st.level));
        s.text_box(x, y, BW, BH, fill, stroke, &title, &lines);
    }

    fn guest_box(s: &mut Svg, x: f64, y: f64, g: &GuestStep, mode: PagingMode, label: &str) {
        let present = g.entry & P != 0;
        let (fill, stroke) = if !present { ("#fde2e2", "#b00") } else { ("#e6f4e3", "#3b7d32") };
        let to = if !present {
            "NOT PRESENT".to_string()
        } else if is_leaf_any(g.level, g.entry, mode) {
            format!("page GPA {:#x}", x86_addr(g.level, g.entry))
        } else {
            format!("next table GPA {:#x}", g.entry & ADDR_MASK_4K)
        };
        let lines = vec![
            format!("table GPA {:#x} index {}", g.table_gpa, g.index),
            format!("entry {:#x}", g.entry),
            x86_bits(g.entry),
            to,
        ];
        s.text_box(x, y, BW, BH, fill, stroke, &format!("{label} L{} {}", g.level, level_name(g.level)), &lines);
    }

    fn svg_2d(&self, title: &str, ept: bool, levels: u8) -> String {
        let cols = f64::from(levels) + 1.0;
        let rows = self.guest.len() as f64 + 1.0;
        let top = 120.0;
        let left = GX + 150.0;
        let w = left + cols * (BW + GX) + 20.0;
        let h = top + rows * (BH + GY) + 80.0;
        let mut s = Svg::new(w, h);
        let dim = if ept { "EPT" } else { "NPT" };
        self.header(
            &mut s,
            title,
            &format!(
                "2D walk: {:?} guest paging (rows) x {levels}-level {dim} (columns), vCPU {}, {} at CPL {}",
                self.guest_mode,
                self.vcpu,
                kind_name(self.access),
                self.cpl
            ),
        );
        for c in 0..levels {
            let x = left + f64::from(c) * (BW + GX);
            s.text(x + 4.0, top - 14.0, 13.0, "bold", "#3566a8", &format!("{dim} level {}", levels - c));
        }
        s.text(left + cols.mul_add(BW + GX, -(BW + GX)) + 4.0, top - 14.0, 13.0, "bold", "#3b7d32", "guest entry");
        let col_x = |step: &TableStep| left + f64::from(levels - step.level) * (BW + GX);
        let gx = left + f64::from(levels) * (BW + GX);
        let mut prev_guest: Option<(f64, f64)> = None;
        let rows_iter = self
            .guest
            .iter()
            .map(|g| (Some(g), g.nested.as_ref()))
            .chain(std::iter::once((None, self.final_nested.as_ref())));
        for (r, (g, nested)) in rows_iter.enumerate() {
            let y = top + r as f64 * (BH + GY);
            let (label, gpa) = match (g, nested) {
                (Some(g), _) => (format!("guest level {}", g.level), g.table_gpa),
                (None, Some(n)) => ("final GPA".to_string(), n.gpa),
                (None, None) => continue,
            };
            s.text(GX, y + BH / 2.0 - 4.0, 12.0, "bold", "#333", &label);
            s.text(GX, y + BH / 2.0 + 12.0, 11.0, "normal", "#333", &format!("GPA {gpa:#x}"));
            let mut last: Option<(f64, f64)> = None;
            if let Some((px, py)) = prev_guest {
                // The previous guest entry gives this row's guest-physical address.
                let first_x = nested.and_then(|n| n.steps.first()).map_or(gx, col_x);
                s.arrow(px + BW / 2.0, py + BH, first_x + BW / 2.0, y, "#3b7d32", true, Some("GPA"));
            }
            if let Some(n) = nested {
                for st in &n.steps {
                    let x = col_x(st);
                    Self::tdp_box(&mut s, x, y, ept, st);
                    if let Some((lx, ly)) = last {
                        s.arrow(lx + BW, ly + BH / 2.0, x, y + BH / 2.0, "#3566a8", false, None);
                    }
                    last = Some((x, y));
                }
            }
            match g {
                Some(g) => {
                    Self::guest_box(&mut s, gx, y, g, self.guest_mode, "guest");
                    if let Some((lx, ly)) = last {
                        s.arrow(lx + BW, ly + BH / 2.0, gx, y + BH / 2.0, "#3566a8", false, None);
                    }
                    prev_guest = Some((gx, y));
                }
                None => {
                    if let (Some(h), Some((lx, ly))) = (self.hpa, last) {
                        let lines = vec![format!("HPA {h:#x}"), format!("GPA {:#x}", self.gpa.unwrap_or(0))];
                        s.text_box(gx, y, BW, BH, "#fff4d6", "#a87b00", "final page", &lines);
                        s.arrow(lx + BW, ly + BH / 2.0, gx, y + BH / 2.0, "#a87b00", false, None);
                    }
                }
            }
        }
        self.footer(&mut s, top + rows * (BH + GY) + 10.0);
        s.finish()
    }

    fn svg_shadow(&self, title: &str) -> String {
        let n = self.guest.len().max(self.shadow.len()) as f64 + 1.0;
        let left = GX + 150.0;
        let w = left + n * (BW + GX) + 20.0;
        let top = 110.0;
        let h = top + 2.0 * (BH + GY + 40.0) + 40.0;
        let mut s = Svg::new(w, h);
        self.header(
            &mut s,
            title,
            &format!(
                "shadow paging: the guest walk (KVM, through memslots) and the hardware walk of the shadow tables; {} at CPL {}",
                kind_name(self.access),
                self.cpl
            ),
        );
        let y0 = top;
        s.text(GX, y0 + BH / 2.0, 11.5, "bold", "#333", "guest walk");
        s.text(GX, y0 + BH / 2.0 + 15.0, 11.0, "normal", "#333", "GVA -> GPA");
        let mut last: Option<f64> = None;
        for (i, g) in self.guest.iter().enumerate() {
            let x = left + i as f64 * (BW + GX);
            Self::guest_box(&mut s, x, y0, g, self.guest_mode, "guest");
            if let Some(lx) = last {
                s.arrow(lx + BW, y0 + BH / 2.0, x, y0 + BH / 2.0, "#3b7d32", false, None);
            }
            last = Some(x);
        }
        if let (Some(gpa), Some(lx)) = (self.gpa, last) {
            let x = lx + BW + GX;
            let mut lines = vec![format!("GPA {gpa:#x}")];
            if let Some(h) = self.slot_hpa {
                lines.push(format!("memslot -> HPA {h:#x}"));
            }
            s.text_box(x, y0, BW, BH, "#fff4d6", "#a87b00", "guest-physical", &lines);
            s.arrow(lx + BW, y0 + BH / 2.0, x, y0 + BH / 2.0, "#a87b00", false, None);
        }
        let y1 = y0 + BH + GY + 40.0;
        s.text(GX, y1 + BH / 2.0, 11.5, "bold", "#333", "shadow walk");
        s.text(GX, y1 + BH / 2.0 + 15.0, 11.0, "normal", "#333", "GVA -> HPA");
        let mut last: Option<f64> = None;
        for (i, st) in self.shadow.iter().enumerate() {
            let x = left + i as f64 * (BW + GX);
            let present = st.entry & P != 0;
            let (fill, stroke) = if !present { ("#fde2e2", "#b00") } else { ("#e3eefc", "#3566a8") };
            let mut lines = vec![
                format!("table HPA {:#x} index {}", st.table_hpa, st.index),
                format!("SPTE {:#x}", st.entry),
                x86_bits(st.entry),
            ];
            if let Some(sp) = &st.sp {
                // Two lines: the box is narrower than the whole role.
                let t = role_text(sp);
                let cut = t.match_indices(' ').nth(4).map_or(t.len(), |(i, _)| i);
                lines.push(t[..cut].to_string());
                lines.push(format!("   {}", t[cut..].trim()));
            }
            s.text_box(x, y1, BW, BH, fill, stroke, &format!("shadow L{} {}", st.level, level_name(st.level)), &lines);
            if let Some(lx) = last {
                s.arrow(lx + BW, y1 + BH / 2.0, x, y1 + BH / 2.0, "#3566a8", false, None);
            }
            // Each shadow page shadows the guest table of the same level.
            if let Some(gi) = self.guest.iter().position(|g| g.level == st.level) {
                let gxp = left + gi as f64 * (BW + GX);
                s.arrow(x + BW / 2.0, y1, gxp + BW / 2.0, y0 + BH, "#999", true, Some("shadows"));
            }
            last = Some(x);
        }
        if let (Some(h), Some(lx)) = (self.hpa, last) {
            let x = lx + BW + GX;
            s.text_box(x, y1, BW, BH, "#fff4d6", "#a87b00", "final page", &[format!("HPA {h:#x}")]);
            s.arrow(lx + BW, y1 + BH / 2.0, x, y1 + BH / 2.0, "#a87b00", false, None);
        }
        self.footer(&mut s, y1 + BH + 40.0);
        s.finish()
    }
}
