//! The software vCPU: registers, TLB, page walks (native 1D or 2D over EPT/NPT), data
//! accesses on real bytes, exceptions and VM exits.
//!
//! This file holds the vCPU's state, its translation (TLB lookup, page walk, TLB fill) and
//! the data accesses built on it; the control-register writes and the TLB-maintenance
//! instructions are in the child module `regs`.

mod regs;
#[cfg(test)]
mod tests;

use super::tlb::{class, Tlb, TlbFill};
use crate::host::PhysMem;
use crate::sync::Arc;
use std::convert::Infallible;
use x86_paging::access::{check_access, Access, AccessKind, PagePerms, PfErrorCode};
use x86_paging::addr::{Gpa, Gva, Hpa, PageSize};
use x86_paging::ept::{HostPhys, TdpExit};
use x86_paging::mode::{PagingMode, PagingState};
use x86_paging::regs::{Cr0, Cr4, Efer};
use x86_paging::walk::{pde_cache_entry, walk, GuestPhys, NoObserver, WalkError, WalkOptions};
use x86_paging::walk2d::{walk_2d_logged, DirtiedGfns, GpaCache, Tdp, Walk2dError};

impl HostPhys for PhysMem {
    #[inline]
    fn read_u64(&self, hpa: Hpa) -> u64 {
        self.load(hpa)
    }
    #[inline]
    fn cmpxchg_u64(&self, hpa: Hpa, old: u64, new: u64) -> bool {
        self.cmpxchg(hpa, old, new).is_ok()
    }
}

/// Guest-physical memory of a machine without a hypervisor: gpa = hpa. Addresses beyond
/// memory read as all ones and ignore writes (open bus), so a guest table pointing there sees
/// an entry with reserved bits set.
pub struct NativeMem<'a>(pub &'a PhysMem);

impl GuestPhys for NativeMem<'_> {
    type Error = Infallible;
    #[inline]
    fn read_pte(&mut self, gpa: Gpa, size: u8, _gva: Gva) -> Result<u64, Infallible> {
        Ok(if self.0.contains(Hpa::new(gpa.raw()), u64::from(size)) {
            self.0.read(Hpa::new(gpa.raw()), size)
        } else {
            u64::MAX >> (64 - 8 * u32::from(size))
        })
    }
    #[inline]
    fn cmpxchg_pte(&mut self, gpa: Gpa, size: u8, old: u64, new: u64, _gva: Gva) -> Result<bool, Infallible> {
        let hpa = Hpa::new(gpa.raw());
        if !self.0.contains(hpa, u64::from(size)) {
            return Ok(true);
        }
        if size == 8 {
            return Ok(self.0.cmpxchg(hpa, old, new).is_ok());
        }
        // A 4-byte entry: compare-exchange the aligned word holding it.
        let word = Hpa::new(hpa.raw() & !7);
        let shift = (hpa.raw() & 7) * 8;
        let cur = self.0.load(word);
        if (cur >> shift) & 0xffff_ffff != old & 0xffff_ffff {
            return Ok(false);
        }
        let m = 0xffff_ffffu64 << shift;
        let next = (cur & !m) | ((new & 0xffff_ffff) << shift);
        Ok(self.0.cmpxchg(word, cur, next).is_ok())
    }
}

/// How guest-physical addresses reach host memory.
#[derive(Debug, Clone)]
pub enum CpuMode {
    /// No hypervisor: the guest's page tables are walked directly and gpa = hpa (the oracle).
    Native,
    /// Two-dimensional paging over the hypervisor's EPT or NPT tables.
    Tdp(Tdp),
    /// Shadow paging: the hardware walks the hypervisor's shadow tables (64-bit format)
    /// instead of the guest's, and every #PF is intercepted.
    Shadow(ShadowRoot),
}

/// What the hardware runs on under shadow paging: the shadow root and its paging mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowRoot {
    /// The shadow root table (host CR3).
    pub root: Hpa,
    /// Shadow paging levels: 3 (PAE, PDPTEs in `pdptrs`), 4 or 5.
    pub level: u8,
    /// The PDPTEs of a PAE shadow root.
    pub pdptrs: [u64; 4],
}

/// A VM exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// An EPT/NPT exit.
    Tdp(TdpExit),
    /// An intercepted #PF (shadow paging): the linear address and the hardware error code.
    PageFault {
        /// CR2.
        gva: Gva,
        /// Error code.
        error_code: PfErrorCode,
    },
    /// The page-modification log is full (VMX "page-modification log full" exit).
    PmlFull,
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Tdp(x) => write!(f, "{x}"),
            VmExit::PageFault { gva, error_code } => write!(f, "#PF intercept at {gva} ({error_code})"),
            VmExit::PmlFull => write!(f, "page-modification log full"),
        }
    }
}

/// A guest exception, delivered to the guest model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exception {
    /// #PF with CR2 and the error code.
    PageFault {
        /// Faulting linear address.
        cr2: u64,
        /// Error code.
        error_code: PfErrorCode,
    },
    /// #GP (non-canonical address, bad PDPTE on a CR3 load).
    GeneralProtection,
}

impl std::fmt::Display for Exception {
    /// As a KVM developer reads it: `#PF at 0xffff888000000000, error code 0x2 [not-present
    /// write, supervisor]` (the error code's bits in words: not-present / protection /
    /// reserved-bit, read / write / fetch, user / supervisor, protection-key), or `#GP`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Exception::PageFault { cr2, error_code: ec } => {
                let why = if ec.contains(PfErrorCode::RSVD) {
                    "reserved-bit"
                } else if ec.contains(PfErrorCode::P) {
                    "protection"
                } else {
                    "not-present"
                };
                let access = if ec.contains(PfErrorCode::ID) {
                    "fetch"
                } else if ec.contains(PfErrorCode::W) {
                    "write"
                } else {
                    "read"
                };
                let mode = if ec.contains(PfErrorCode::U) { "user" } else { "supervisor" };
                write!(f, "#PF at {cr2:#x}, error code {:#x} [{why} {access}, {mode}", ec.0)?;
                if ec.contains(PfErrorCode::PK) {
                    f.write_str(", protection-key")?;
                }
                f.write_str("]")
            }
            Exception::GeneralProtection => f.write_str("#GP (non-canonical address or reserved PDPTE bits)"),
        }
    }
}

/// Why the vCPU stopped executing an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The guest takes an exception.
    Exception(Exception),
    /// A VM exit to the hypervisor; the operation is retried after it is handled.
    Exit(VmExit),
}

/// Hardware event counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HwCounters {
    /// Guest accesses performed (reads, writes, fetches).
    pub accesses: u64,
    /// Page walks (TLB misses).
    pub walks: u64,
    /// Memory references made by page walks.
    pub walk_mem_refs: u64,
}

// Perm-table index bits.
const PB_W: usize = 1;
const PB_U: usize = 2;
const PB_NX: usize = 4;
const PB_D: usize = 8;
const PB_PKAD: usize = 16;
const PB_PKWD: usize = 32;

/// The software vCPU.
pub struct Cpu {
    mem: Arc<PhysMem>,
    st: PagingState,
    cpl: u8,
    eflags_ac: bool,
    /// CR2 as last written by a #PF.
    pub cr2: u64,
    vpid: u16,
    mode: CpuMode,
    tlb: Tlb,
    perm_table: [u16; 64],
    /// Cached guest-physical mappings of guest page-table pages (flushed with INVEPT).
    gpa_cache: GpaCache,
    ctx: u32,
    mode_index: usize,
    /// The page-modification log, when the hypervisor enabled it.
    pml: Option<Box<PmlLog>>,
    /// Counters.
    pub counters: HwCounters,
}

/// Entries of the VMX page-modification log (one 4 KiB page of guest-physical addresses).
pub const PML_ENTRIES: usize = 512;

/// The page-modification log (VMX PML): with EPT A/D bits on, each time the processor sets
/// an EPT leaf's dirty flag it appends the guest-physical page to the log; when the log is
/// full the vCPU exits ([`VmExit::PmlFull`]) and the hypervisor empties it.
///
/// The model logs the (at most six) pages one walk dirtied, then exits if the log reached
/// [`PML_ENTRIES`]; the hardware exits just before the write that would overflow. Either
/// way no dirtied page is missed.
#[derive(Debug)]
struct PmlLog {
    gfns: Vec<u64>,
}

fn kind_index(k: AccessKind) -> usize {
    match k {
        AccessKind::Read => 0,
        AccessKind::Write => 1,
        AccessKind::Fetch => 2,
    }
}

/// log2 of a page size, as the TLB keeps it.
// Lossless: a page shift is 12, 21, 22 or 30.
#[allow(clippy::cast_possible_truncation)]
fn page_shift(size: PageSize) -> u8 {
    size.shift() as u8
}

fn kind_mask(k: usize) -> u16 {
    class::bit(k, 0) | class::bit(k, 1) | class::bit(k, 2)
}

impl Cpu {
    /// A vCPU in real mode (paging off) over `mem`, tagged with `vpid`.
    pub fn new(mem: Arc<PhysMem>, mode: CpuMode, vpid: u16, maxphyaddr: u8) -> Self {
        let mut c = Cpu {
            mem,
            st: PagingState { maxphyaddr, ..PagingState::default() },
            cpl: 0,
            eflags_ac: false,
            cr2: 0,
            vpid,
            mode,
            tlb: Tlb::new(),
            perm_table: [0; 64],
            gpa_cache: GpaCache::new(),
            ctx: 0,
            mode_index: 0,
            pml: None,
            counters: HwCounters::default(),
        };
        c.recompute_perm_table();
        c.refresh_cached();
        c
    }

    /// The paging registers.
    pub fn paging(&self) -> &PagingState {
        &self.st
    }

    /// Current privilege level.
    pub fn cpl(&self) -> u8 {
        self.cpl
    }

    /// The TLB (for counters and tests).
    pub fn tlb(&self) -> &Tlb {
        &self.tlb
    }

    /// The translation mode.
    pub fn mode(&self) -> &CpuMode {
        &self.mode
    }

    /// Host memory the vCPU reads.
    pub fn mem(&self) -> &Arc<PhysMem> {
        &self.mem
    }

    /// Turns the page-modification log on or off (the secondary execution control "enable
    /// PML"). Turning it off drops nothing: take the entries with [`Cpu::drain_pml`] first.
    pub fn set_pml(&mut self, on: bool) {
        match (on, self.pml.is_some()) {
            (true, false) => self.pml = Some(Box::new(PmlLog { gfns: Vec::with_capacity(PML_ENTRIES + 6) })),
            (false, true) if !self.pml_pending() => self.pml = None,
            _ => {}
        }
    }

    /// Whether the page-modification log is on.
    pub fn pml_enabled(&self) -> bool {
        self.pml.is_some()
    }

    /// Whether the page-modification log holds entries.
    #[inline]
    pub fn pml_pending(&self) -> bool {
        self.pml.as_ref().is_some_and(|p| !p.gfns.is_empty())
    }

    /// Empties the page-modification log, oldest entry first, passing each logged guest
    /// frame number to `f`.
    pub fn drain_pml(&mut self, mut f: impl FnMut(u64)) {
        if let Some(p) = self.pml.as_mut() {
            p.gfns.drain(..).for_each(&mut f);
        }
    }

    /// Sets the TDP tables (the hypervisor loads an EPTP / nCR3). Hardware does not flush on
    /// this; the hypervisor flushes as it needs.
    pub fn set_mode(&mut self, mode: CpuMode) {
        self.mode = mode;
        self.gpa_cache.flush();
        self.recompute_perm_table();
    }

    /// Sets CPL (a privilege change; no TLB effect).
    pub fn set_cpl(&mut self, cpl: u8) {
        self.cpl = cpl & 3;
        self.refresh_cached();
    }

    /// Sets EFLAGS.AC (STAC/CLAC).
    pub fn set_ac(&mut self, ac: bool) {
        self.eflags_ac = ac;
        self.refresh_cached();
    }

    /// EFLAGS.AC.
    pub fn eflags_ac(&self) -> bool {
        self.eflags_ac
    }

    /// The paging state the hardware actually walks with: the guest's, or under shadow
    /// paging the shadow root with CR0.WP and EFER.NX forced on and PKE off, as KVM runs
    /// shadowed guests (the SPTEs encode the guest's own WP/NX semantics).
    pub fn hw_state(&self) -> PagingState {
        match &self.mode {
            CpuMode::Shadow(r) => {
                let mut s = self.st;
                s.cr0 |= Cr0::PG | Cr0::PE | Cr0::WP;
                s.efer = Efer::NXE | if r.level >= 4 { Efer::LME | Efer::LMA } else { Efer::empty() };
                // SMEP/SMAP/PKE are off in hardware while the guest is not paging (its direct
                // shadow pages are user pages), as vmx_set_cr4 does.
                let keep = if self.st.cr0.contains(Cr0::PG) {
                    Cr4::SMEP | Cr4::SMAP | Cr4::PGE | Cr4::PCIDE
                } else {
                    Cr4::PGE | Cr4::PCIDE
                };
                s.cr4 = (s.cr4 & keep) | Cr4::PAE;
                if r.level == 5 {
                    s.cr4 |= Cr4::LA57;
                }
                s.cr3 = r.root.raw();
                s.pdptrs = r.pdptrs;
                s.maxphyaddr = 46;
                s.gbpages = true;
                s
            }
            _ => self.st,
        }
    }

    /// Loads the guest's PDPTE registers (the hypervisor does it under shadow paging).
    pub fn set_guest_pdptrs(&mut self, pdptrs: [u64; 4]) {
        self.st.pdptrs = pdptrs;
    }

    fn recompute_perm_table(&mut self) {
        let paging = self.hw_state().mode() != PagingMode::NonPaging;
        for idx in 0..64usize {
            if !paging {
                self.perm_table[idx] = class::ALL;
                continue;
            }
            let perms = PagePerms {
                writable: idx & PB_W != 0,
                user: idx & PB_U != 0,
                nx: idx & PB_NX != 0,
                global: false,
                pkey: 1,
                dirty: idx & PB_D != 0,
            };
            let mut st = self.hw_state();
            st.pkru = ((idx & PB_PKAD != 0) as u32) << 2 | ((idx & PB_PKWD != 0) as u32) << 3;
            let mut allow = 0u16;
            for mode in 0..3usize {
                for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
                    let access = Access {
                        kind,
                        cpl: if mode == 2 { 3 } else { 0 },
                        implicit_supervisor: false,
                        eflags_ac: mode == 1,
                    };
                    if check_access(&perms, &st, &access).is_ok() && (kind != AccessKind::Write || perms.dirty) {
                        allow |= class::bit(kind_index(kind), mode);
                    }
                }
            }
            self.perm_table[idx] = allow;
        }
    }

    fn perm_index(&self, p: &PagePerms) -> usize {
        let pk = (self.st.pkru >> (2 * u32::from(p.pkey & 15))) as usize & 3;
        ((p.writable as usize) * PB_W)
            | ((p.user as usize) * PB_U)
            | ((p.nx as usize) * PB_NX)
            | ((p.dirty as usize) * PB_D)
            | ((pk & 1) * PB_PKAD)
            | ((pk >> 1) * PB_PKWD)
    }

    /// The TLB tag of the current context, `vpid << 16 | pcid` (recomputed by
    /// [`Cpu::refresh_cached`] whenever CR3 or CR4 changes).
    #[inline]
    fn ctx(&self) -> u32 {
        self.ctx
    }

    /// The access-class mode of the current CPL and EFLAGS.AC (see `tlb::class`).
    #[inline]
    fn mode_index(&self) -> usize {
        self.mode_index
    }

    fn refresh_cached(&mut self) {
        let pcid = if self.st.cr4.contains(Cr4::PCIDE) { (self.st.cr3 & 0xfff) as u32 } else { 0 };
        self.ctx = (u32::from(self.vpid) << 16) | pcid;
        self.mode_index = if self.cpl == 3 { 2 } else { self.eflags_ac as usize };
    }

    /// Translates `gva` for an access of `kind`: the TLB, else a page walk that fills it.
    #[inline(always)]
    pub fn translate(&mut self, gva: Gva, kind: AccessKind) -> Result<Hpa, Stop> {
        let bit = class::bit(kind_index(kind), self.mode_index());
        if let Some(hpa) = self.tlb.lookup(gva.raw(), self.ctx(), bit) {
            return Ok(Hpa::new(hpa));
        }
        self.translate_slow(gva, kind)
    }

    #[cold]
    fn translate_slow(&mut self, gva: Gva, kind: AccessKind) -> Result<Hpa, Stop> {
        let access = Access { kind, cpl: self.cpl, implicit_supervisor: false, eflags_ac: self.eflags_ac };
        self.counters.walks += 1;
        // The paging-structure cache: a walk may resume at the page table.
        let start = self.tlb.psc_lookup(gva.raw(), self.ctx());
        if start.is_some() {
            self.tlb.counters.psc_hits += 1;
        }
        let opts = WalkOptions { set_ad: true, start };
        let (hpa, perms, shift, guest_shift, host_allow) = match &self.mode {
            CpuMode::Native => {
                let t = loop {
                    match walk(&mut NativeMem(&self.mem), &self.st, gva, &access, opts, &mut NoObserver) {
                        Ok(t) => break t,
                        // Another CPU kept changing the entries: walk again.
                        Err(WalkError::Contended) => continue,
                        Err(WalkError::PageFault(ec)) => return Err(self.page_fault(gva, ec)),
                        Err(WalkError::NonCanonical) => return Err(Stop::Exception(Exception::GeneralProtection)),
                        Err(WalkError::Mem(never)) => match never {},
                    }
                };
                self.counters.walk_mem_refs += u64::from(start.map_or(self.st.mode().levels(), |s| s.level));
                if let Some(e) = pde_cache_entry(&t, &self.st) {
                    self.tlb.psc_fill(gva.raw(), self.ctx, e);
                }
                let guest_shift = page_shift(t.size);
                let page = t.gpa.raw() & !((1u64 << guest_shift) - 1);
                let shift = if self.mem.contains(Hpa::new(page), 1 << guest_shift) {
                    guest_shift
                } else if self.mem.contains(Hpa::new(t.gpa.raw() & !0xfff), 4096) {
                    12
                } else {
                    // Open bus: serve the access but never cache it.
                    return Ok(Hpa::new(t.gpa.raw()));
                };
                (Hpa::new(t.gpa.raw()), t.perms, shift, guest_shift, class::ALL)
            }
            CpuMode::Tdp(tdp) => {
                let mut dirtied = DirtiedGfns::default();
                let r = loop {
                    match walk_2d_logged(
                        &*self.mem,
                        tdp,
                        &self.st,
                        gva,
                        &access,
                        opts,
                        Some(&mut self.gpa_cache),
                        &mut dirtied,
                        &mut NoObserver,
                    ) {
                        Err(Walk2dError::Contended) => continue,
                        r => break r,
                    }
                };
                // The page-modification log records each D flag as the walk sets it, whether
                // or not the access then completes.
                let pml_full = !dirtied.is_empty() && self.log_dirtied(&dirtied);
                let t = match r {
                    Ok(t) => t,
                    Err(Walk2dError::Guest(ec)) => return Err(self.page_fault(gva, ec)),
                    Err(Walk2dError::NonCanonical) => return Err(Stop::Exception(Exception::GeneralProtection)),
                    Err(Walk2dError::Exit(x)) => return Err(Stop::Exit(VmExit::Tdp(x))),
                    Err(Walk2dError::Contended) => unreachable!("retried above"),
                };
                if pml_full {
                    // Nothing cached: the access is retried after the exit.
                    return Err(Stop::Exit(VmExit::PmlFull));
                }
                self.counters.walk_mem_refs += u64::from(t.mem_refs);
                if let Some(e) = pde_cache_entry(&t.guest, &self.st) {
                    self.tlb.psc_fill(gva.raw(), self.ctx, e);
                }
                let mut allow = kind_mask(0);
                if t.host_writable && t.host_dirty {
                    allow |= kind_mask(1);
                }
                if t.host_exec {
                    allow |= kind_mask(2);
                }
                // The combined translation is as large as the smaller of the two pages; it
                // remembers the guest page size, which is what INVLPG invalidates.
                let guest_shift = page_shift(t.guest.size);
                let shift = guest_shift.min(page_shift(t.host_size));
                (t.hpa, t.guest.perms, shift, guest_shift, allow)
            }
            CpuMode::Shadow(_) => {
                let hw = self.hw_state();
                let t = loop {
                    match walk(&mut NativeMem(&self.mem), &hw, gva, &access, opts, &mut NoObserver) {
                        Ok(t) => break t,
                        Err(WalkError::Contended) => continue,
                        // Every #PF is intercepted: the hypervisor decides whether the guest
                        // sees it.
                        Err(WalkError::PageFault(ec)) => {
                            return Err(Stop::Exit(VmExit::PageFault { gva, error_code: ec }));
                        }
                        Err(WalkError::NonCanonical) => return Err(Stop::Exception(Exception::GeneralProtection)),
                        Err(WalkError::Mem(never)) => match never {},
                    }
                };
                self.counters.walk_mem_refs += u64::from(start.map_or(hw.mode().levels(), |s| s.level));
                if let Some(e) = pde_cache_entry(&t, &hw) {
                    self.tlb.psc_fill(gva.raw(), self.ctx, e);
                }
                let shift = page_shift(t.size);
                (Hpa::new(t.gpa.raw()), t.perms, shift, shift, class::ALL)
            }
        };
        let allow = self.perm_table[self.perm_index(&perms)] & host_allow;
        let global = perms.global && self.st.cr4.contains(Cr4::PGE);
        let fill = TlbFill { ctx: self.ctx(), global, page_shift: shift, guest_shift, hpa: hpa.raw(), allow };
        self.tlb.fill(gva.raw(), fill);
        Ok(hpa)
    }

    /// Appends `dirtied` to the page-modification log if it is on; true when the log is
    /// full (the vCPU must exit).
    fn log_dirtied(&mut self, dirtied: &DirtiedGfns) -> bool {
        match self.pml.as_mut() {
            Some(p) => {
                p.gfns.extend_from_slice(dirtied.as_slice());
                p.gfns.len() >= PML_ENTRIES
            }
            None => false,
        }
    }

    fn page_fault(&self, gva: Gva, ec: PfErrorCode) -> Stop {
        Stop::Exception(Exception::PageFault { cr2: gva.raw(), error_code: ec })
    }

    #[inline(always)]
    fn data_read(&self, hpa: Hpa, size: u8) -> u64 {
        if self.mem.contains(hpa, u64::from(size)) {
            self.mem.read(hpa, size)
        } else {
            u64::MAX >> (64 - 8 * u32::from(size))
        }
    }

    #[inline(always)]
    fn data_write(&self, hpa: Hpa, size: u8, val: u64) {
        if self.mem.contains(hpa, u64::from(size)) {
            self.mem.write(hpa, size, val)
        }
    }

    /// Translates the one or two pages an access touches, before touching any byte.
    #[inline(always)]
    fn translate_span(&mut self, gva: Gva, size: u8, kind: AccessKind) -> Result<(Hpa, Option<(Hpa, u8)>), Stop> {
        assert!((1..=8).contains(&size), "access size {size} must be 1..=8 bytes");
        let first = self.translate(gva, kind)?;
        let in_page = 4096 - (gva.raw() & 0xfff);
        // The access crosses a page when fewer bytes than it needs are left in the first.
        let Some(n) = u8::try_from(in_page).ok().filter(|&n| n < size) else {
            return Ok((first, None));
        };
        let second = self.translate(Gva::new(gva.raw() + in_page), kind)?;
        Ok((first, Some((second, n))))
    }

    /// Reads `size` (1..=8) bytes at `gva`.
    #[inline(always)]
    pub fn read(&mut self, gva: Gva, size: u8) -> Result<u64, Stop> {
        self.load(gva, size, AccessKind::Read)
    }

    /// Fetches `size` (1..=8) instruction bytes at `gva`.
    pub fn fetch(&mut self, gva: Gva, size: u8) -> Result<u64, Stop> {
        self.load(gva, size, AccessKind::Fetch)
    }

    #[inline(always)]
    fn load(&mut self, gva: Gva, size: u8, kind: AccessKind) -> Result<u64, Stop> {
        let (a, split) = self.translate_span(gva, size, kind)?;
        self.counters.accesses += 1;
        Ok(match split {
            None => self.data_read(a, size),
            Some((b, n)) => self.data_read(a, n) | (self.data_read(b, size - n) << (8 * u32::from(n))),
        })
    }

    /// Writes `size` (1..=8) bytes at `gva`.
    #[inline(always)]
    pub fn write(&mut self, gva: Gva, size: u8, val: u64) -> Result<(), Stop> {
        let (a, split) = self.translate_span(gva, size, AccessKind::Write)?;
        self.counters.accesses += 1;
        match split {
            None => self.data_write(a, size, val),
            Some((b, n)) => {
                self.data_write(a, n, val);
                self.data_write(b, size - n, val >> (8 * u32::from(n)));
            }
        }
        Ok(())
    }
}
