//! The guest page walker, for every paging mode.
//!
//! [`walk`] translates a linear address the way the processor does: it reads
//! one entry per level through [`GuestPhys`], checks presence and reserved
//! bits at every level, combines the permissions, checks them with
//! [`check_access`], and — only when the whole walk succeeded — sets the
//! accessed flags top-down and the dirty flag of the leaf with compare-and-
//! exchange. A lost compare-and-exchange restarts the walk, at most
//! [`MAX_WALK_RETRIES`] times.

use crate::access::{check_access, Access, PagePerms, PfErrorCode};
use crate::addr::{Gpa, Gva, PageSize};
use crate::entry::{Pte32, ADDR_MASK_1G, ADDR_MASK_2M, ADDR_MASK_4K};
use crate::mode::{PagingMode, PagingState};
use crate::regs::{cr3_base, Cr4, Efer};
use crate::{bits, low32};

/// How many times a walk is restarted after losing an A/D compare-and-exchange
/// race before it gives up with [`WalkError::Contended`].
pub const MAX_WALK_RETRIES: u32 = 16;

const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const G: u64 = 1 << 8;
const NX: u64 = 1 << 63;

/// Guest-physical memory as the walker sees it.
pub trait GuestPhys {
    /// Why an access failed (e.g. the address is outside guest memory, or a
    /// nested TDP walk exited).
    type Error;

    /// Reads a guest paging-structure entry of `size` bytes (4 or 8) at `gpa`;
    /// `gva` is the address being translated (for nested walks and tracing).
    fn read_pte(&mut self, gpa: Gpa, size: u8, gva: Gva) -> Result<u64, Self::Error>;

    /// Atomically replaces the `size`-byte entry at `gpa` with `new` if it still
    /// holds `old` (an A/D update). `Ok(false)` when the value had changed: the
    /// walker restarts.
    fn cmpxchg_pte(&mut self, gpa: Gpa, size: u8, old: u64, new: u64, gva: Gva) -> Result<bool, Self::Error>;
}

impl<M: GuestPhys + ?Sized> GuestPhys for &mut M {
    type Error = M::Error;

    #[inline]
    fn read_pte(&mut self, gpa: Gpa, size: u8, gva: Gva) -> Result<u64, Self::Error> {
        (**self).read_pte(gpa, size, gva)
    }

    #[inline]
    fn cmpxchg_pte(&mut self, gpa: Gpa, size: u8, old: u64, new: u64, gva: Gva) -> Result<bool, Self::Error> {
        (**self).cmpxchg_pte(gpa, size, old, new, gva)
    }
}

/// Hooks called while walking (the tracer and `explain` implement them).
/// Every method defaults to doing nothing. After a restart the elements are
/// reported again.
pub trait WalkObserver {
    /// The entry `pte` at `level` was read from `pte_gpa` (for PAE's level 3,
    /// the PDPTE register and the address it was loaded from).
    #[inline]
    fn element(&mut self, level: u8, pte_gpa: Gpa, pte: u64) {
        let _ = (level, pte_gpa, pte);
    }

    /// The accessed flag of the entry at `pte_gpa` was set.
    #[inline]
    fn set_accessed(&mut self, pte_gpa: Gpa) {
        let _ = pte_gpa;
    }

    /// The dirty flag of the entry at `pte_gpa` was set.
    #[inline]
    fn set_dirty(&mut self, pte_gpa: Gpa) {
        let _ = pte_gpa;
    }
}

/// An observer that ignores everything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoObserver;

impl WalkObserver for NoObserver {}

impl<O: WalkObserver + ?Sized> WalkObserver for &mut O {
    #[inline]
    fn element(&mut self, level: u8, pte_gpa: Gpa, pte: u64) {
        (**self).element(level, pte_gpa, pte);
    }

    #[inline]
    fn set_accessed(&mut self, pte_gpa: Gpa) {
        (**self).set_accessed(pte_gpa);
    }

    #[inline]
    fn set_dirty(&mut self, pte_gpa: Gpa) {
        (**self).set_dirty(pte_gpa);
    }
}

/// A successful translation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Translation {
    /// The guest-physical address of the accessed byte.
    pub gpa: Gpa,
    /// The size of the page mapping it.
    pub size: PageSize,
    /// The effective permissions.
    pub perms: PagePerms,
    /// The level of the leaf (1 = PTE, 2 = PDE, 3 = PDPTE; 0 without paging).
    pub level: u8,
    /// The entries walked, indexed by `level - 1` (after any A/D update; 0 for
    /// levels not walked). For PAE, index 2 holds the PDPTE register.
    pub ptes: [u64; 5],
    /// Where each entry lives, indexed by `level - 1`.
    pub pte_gpas: [Gpa; 5],
}

impl Translation {
    /// The guest-physical address of the first byte of the mapped page.
    #[inline]
    pub const fn page_base(&self) -> Gpa {
        Gpa(self.gpa.0 & !self.size.offset_mask())
    }
}

/// Why a walk failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum WalkError<E> {
    /// Inject `#PF` with this error code (CR2 = the linear address).
    #[error("page fault, error code {0}")]
    PageFault(PfErrorCode),
    /// The address is not canonical in 4/5-level paging (`#GP`, or `#SS` for stack accesses).
    #[error("non-canonical address")]
    NonCanonical,
    /// A paging-structure access failed.
    #[error("paging-structure access failed: {0}")]
    Mem(E),
    /// The A/D compare-and-exchange lost [`MAX_WALK_RETRIES`] + 1 races in a row
    /// (another agent keeps rewriting the entries). Nothing is injected; the
    /// caller should retry the access later (e.g. re-enter the guest so the
    /// instruction re-executes, like KVM's `RET_PF_RETRY`).
    #[error("page-table entries kept changing under the walker")]
    Contended,
}

/// Walk options.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WalkOptions {
    /// Set accessed/dirty flags (the architectural walk). `false` is a "peek"
    /// (explain / debugging): same checks, no writes.
    pub set_ad: bool,
    /// Start below the top, from a paging-structure cache entry (64-bit modes only).
    pub start: Option<WalkStart>,
}

/// Where a walk resumes when a paging-structure cache holds the upper levels (SDM vol. 3,
/// "Paging-Structure Caches"): the table to read next, its level, and the R/W, U/S and XD
/// rights the levels above granted. The levels above are not read, and their A flags not
/// set (a paging-structure cache entry is only made from entries whose A flag is set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WalkStart {
    /// Level of the table to read next (1 = the page table).
    pub level: u8,
    /// Guest-physical base of that table.
    pub table: u64,
    /// Writable at every level above.
    pub writable: bool,
    /// User at every level above.
    pub user: bool,
    /// XD at some level above.
    pub nx: bool,
}

impl WalkOptions {
    /// The architectural walk: A/D flags are updated.
    pub const ARCH: WalkOptions = WalkOptions { set_ad: true, start: None };
    /// A read-only walk: nothing is written.
    pub const PEEK: WalkOptions = WalkOptions { set_ad: false, start: None };
}

impl Default for WalkOptions {
    /// [`WalkOptions::ARCH`].
    fn default() -> Self {
        Self::ARCH
    }
}

/// Reserved-bit masks of one paging configuration, computed once per walk.
#[derive(Clone, Copy, Debug)]
struct Rsvd {
    mode: PagingMode,
    /// Bits reserved in every entry of a PAE/4/5-level walk (high address bits, NX without NXE).
    base: u64,
    /// The extra bits reserved in a 4 MiB 32-bit PDE.
    pde4m: u64,
    gbpages: bool,
    pse: bool,
    pdpte: u64,
}

impl Rsvd {
    #[inline]
    fn new(st: &PagingState, mode: PagingMode) -> Self {
        let m = st.maxphy();
        let no_nx = if st.efer.contains(Efer::NXE) { 0 } else { NX };
        let base = match mode {
            PagingMode::Pae => bits(m, 62) | no_nx,
            PagingMode::Level4 | PagingMode::Level5 => bits(m, 51) | no_nx,
            PagingMode::NonPaging | PagingMode::Bits32 => 0,
        };
        // PSE-36: bits 13..(13 + min(M, 40) - 32) carry address bits 32.., the rest of 13..=21 is reserved.
        let high = if st.pse36 { m.min(40) - 32 } else { 0 };
        Rsvd {
            mode,
            base,
            pde4m: bits(13 + high, 21),
            gbpages: st.gbpages,
            pse: st.cr4.contains(Cr4::PSE),
            pdpte: st.pdpte_reserved_mask(),
        }
    }

    /// The reserved bits that `pte` at `level` has set (0 = fine).
    #[inline]
    fn check(&self, level: u8, pte: u64) -> u64 {
        let mask = match self.mode {
            PagingMode::NonPaging => 0,
            PagingMode::Bits32 => {
                if level == 2 && pte & PS != 0 && self.pse {
                    self.pde4m
                } else {
                    0
                }
            }
            PagingMode::Pae | PagingMode::Level4 | PagingMode::Level5 => match level {
                5 | 4 => self.base | PS,
                3 if self.mode == PagingMode::Pae => self.pdpte,
                3 if pte & PS != 0 => {
                    if self.gbpages {
                        self.base | bits(13, 29)
                    } else {
                        self.base | PS
                    }
                }
                2 if pte & PS != 0 => self.base | bits(13, 20),
                _ => self.base,
            },
        };
        pte & mask
    }
}

/// The reserved bits set in `pte` at `level` (1..=5) under `st`'s paging mode
/// (0 when none): MAXPHYADDR, NX without EFER.NXE, the PS rules per level,
/// 1 GiB pages without `gbpages`, large-page address alignment, PSE-36 and the
/// PAE PDPTE rules (level 3 in PAE mode).
pub fn reserved_bits(st: &PagingState, level: u8, pte: u64) -> u64 {
    Rsvd::new(st, st.mode()).check(level, pte)
}

/// The paging-structure cache entry a completed 64-bit walk to a 4 KiB page allows: resume at
/// its page table with the rights of the levels above (None for other modes and page sizes,
/// and for walks that themselves started from a cache entry: they read no upper entry, so
/// none has its A flag).
pub fn pde_cache_entry(t: &Translation, st: &PagingState) -> Option<WalkStart> {
    let mode = st.mode();
    if !mode.is_long() || t.level != 1 {
        return None;
    }
    let nx_on = st.efer.contains(Efer::NXE);
    let (mut writable, mut user, mut nx) = (true, true, false);
    for &pte in &t.ptes[1..usize::from(mode.levels())] {
        if pte & A == 0 {
            return None;
        }
        writable &= pte & RW != 0;
        user &= pte & US != 0;
        nx |= nx_on && pte & NX != 0;
    }
    Some(WalkStart { level: 1, table: t.pte_gpas[0].0 & ADDR_MASK_4K, writable, user, nx })
}

/// Translates `gva` for `access` under `st`, reading (and, with
/// `opts.set_ad`, updating) the guest paging structures in `mem`.
///
/// * Without paging the translation is the identity with all permissions.
/// * 4/5-level paging: a non-canonical `gva` fails with [`WalkError::NonCanonical`].
/// * A not-present entry faults with P=0, an entry with reserved bits with
///   P|RSVD; a permission violation with P (and PK for protection keys). Every
///   error code carries W/U/ID for the access (see [`PfErrorCode::for_access`]).
/// * On success with `opts.set_ad`, every entry used that lacks A gets it,
///   top-down (PAE PDPTEs have no A flag and come from `st.pdptrs`), and a
///   write sets D in the leaf in the same compare-and-exchange as the leaf's A.
///   A lost race restarts the walk; after [`MAX_WALK_RETRIES`] restarts the
///   walk fails with [`WalkError::Contended`].
#[inline]
pub fn walk<M: GuestPhys, O: WalkObserver>(
    mem: &mut M,
    st: &PagingState,
    gva: Gva,
    access: &Access,
    opts: WalkOptions,
    obs: &mut O,
) -> Result<Translation, WalkError<M::Error>> {
    let mode = st.mode();
    if mode == PagingMode::NonPaging {
        // Without paging the processor is in real or 32-bit protected mode: linear
        // addresses are 32 bits and map 1:1.
        return Ok(Translation {
            gpa: Gpa(gva.0 & 0xffff_ffff),
            size: PageSize::Size4K,
            perms: PagePerms::ALL,
            level: 0,
            ptes: [0; 5],
            pte_gpas: [Gpa(0); 5],
        });
    }
    if !mode.is_canonical(gva) {
        return Err(WalkError::NonCanonical);
    }
    let rsvd = Rsvd::new(st, mode);
    for _ in 0..=MAX_WALK_RETRIES {
        if let Some(t) = walk_once(mem, st, &rsvd, gva, access, opts, obs)? {
            return Ok(t);
        }
    }
    Err(WalkError::Contended)
}

/// One attempt; `Ok(None)` when an A/D update lost a race.
#[inline(always)]
fn walk_once<M: GuestPhys, O: WalkObserver>(
    mem: &mut M,
    st: &PagingState,
    rsvd: &Rsvd,
    gva: Gva,
    access: &Access,
    opts: WalkOptions,
    obs: &mut O,
) -> Result<Option<Translation>, WalkError<M::Error>> {
    let mode = rsvd.mode;
    let fault = |extra: PfErrorCode| WalkError::PageFault(PfErrorCode::for_access(st, access) | extra);
    let mut t = Translation::default();
    let wide = mode.is_pae_format();
    let esize: u8 = if wide { 8 } else { 4 };
    let (index_bits, va) =
        if wide { (9, if mode.is_long() { gva.0 } else { gva.0 & 0xffff_ffff }) } else { (10, gva.0 & 0xffff_ffff) };
    let index_mask = (1u64 << index_bits) - 1;
    let (table, top) = match mode {
        PagingMode::Pae => {
            let idx = ((va >> 30) & 3) as usize;
            let pdpte = st.pdptrs[idx];
            let at = st.pdpte_gpa(idx);
            obs.element(3, at, pdpte);
            t.ptes[2] = pdpte;
            t.pte_gpas[2] = at;
            if pdpte & P == 0 {
                return Err(fault(PfErrorCode(0)));
            }
            if pdpte & rsvd.pdpte != 0 {
                return Err(fault(PfErrorCode::P | PfErrorCode::RSVD));
            }
            (pdpte & ADDR_MASK_4K, 2u8)
        }
        _ => (cr3_base(st.cr3, mode), mode.levels()),
    };

    let nx_on = wide && st.efer.contains(Efer::NXE);
    let (mut writable, mut user, mut nx) = (true, true, false);
    let (mut table, top) = match opts.start {
        Some(s) if mode.is_long() && (1..top).contains(&s.level) => {
            (writable, user, nx) = (s.writable, s.user, s.nx);
            (s.table & ADDR_MASK_4K, s.level)
        }
        _ => (table, top),
    };
    let mut level = top;
    let leaf_pte = loop {
        let shift = 12 + index_bits * u32::from(level - 1);
        let idx = (va >> shift) & index_mask;
        let pte_gpa = Gpa(table + idx * u64::from(esize));
        let pte = mem.read_pte(pte_gpa, esize, gva).map_err(WalkError::Mem)?;
        obs.element(level, pte_gpa, pte);
        let slot = usize::from(level - 1);
        t.ptes[slot] = pte;
        t.pte_gpas[slot] = pte_gpa;
        if pte & P == 0 {
            return Err(fault(PfErrorCode(0)));
        }
        if rsvd.check(level, pte) != 0 {
            return Err(fault(PfErrorCode::P | PfErrorCode::RSVD));
        }
        writable &= pte & RW != 0;
        user &= pte & US != 0;
        nx |= nx_on && pte & NX != 0;
        let leaf = level == 1 || (pte & PS != 0 && if wide { level <= 3 } else { rsvd.pse });
        if leaf {
            break pte;
        }
        table = pte & ADDR_MASK_4K;
        level -= 1;
    };

    // A 32-bit entry read as u64 has nothing above bit 31, so the 64-bit
    // 4 KiB mask serves both formats.
    let (base, size) = match (wide, level) {
        (_, 1) => (leaf_pte & ADDR_MASK_4K, PageSize::Size4K),
        (true, 2) => (leaf_pte & ADDR_MASK_2M, PageSize::Size2M),
        (true, _) => (leaf_pte & ADDR_MASK_1G, PageSize::Size1G),
        (false, _) => (Pte32(low32(leaf_pte)).addr_4m(), PageSize::Size4M),
    };
    let gpa = base | (va & size.offset_mask());
    t.gpa = Gpa(gpa);
    t.size = size;
    t.level = level;
    t.perms = PagePerms {
        writable,
        user,
        nx,
        global: leaf_pte & G != 0,
        pkey: if mode.is_long() { ((leaf_pte >> 59) & 0xf) as u8 } else { 0 },
        dirty: leaf_pte & D != 0,
    };
    check_access(&t.perms, st, access).map_err(WalkError::PageFault)?;

    if opts.set_ad {
        let write = access.is_write();
        for l in (level..=top).rev() {
            let slot = usize::from(l - 1);
            let old = t.ptes[slot];
            let new = old | A | if l == level && write { D } else { 0 };
            if new == old {
                continue;
            }
            let at = t.pte_gpas[slot];
            if !mem.cmpxchg_pte(at, esize, old, new, gva).map_err(WalkError::Mem)? {
                return Ok(None);
            }
            t.ptes[slot] = new;
            if old & A == 0 {
                obs.set_accessed(at);
            }
            if (new & !old) & D != 0 {
                obs.set_dirty(at);
                t.perms.dirty = true;
            }
        }
    }
    Ok(Some(t))
}

#[cfg(test)]
mod tests;
