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
use crate::bits;
use crate::entry::{Pte32, ADDR_MASK_1G, ADDR_MASK_2M, ADDR_MASK_4K};
use crate::mode::{PagingMode, PagingState};
use crate::regs::{cr3_base, Cr4, Efer};

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
        (false, _) => (Pte32(leaf_pte as u32).addr_4m(), PageSize::Size4M),
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
mod tests {
    use super::*;
    use crate::access::AccessKind;
    use crate::mem::{OutOfRange, VecMem};
    use crate::regs::{Cr0, Efer};
    use crate::testutil::{fixture, table, Fix};

    const MODES: [PagingMode; 4] = [PagingMode::Bits32, PagingMode::Pae, PagingMode::Level4, PagingMode::Level5];

    fn pf(ec: u32) -> Result<Translation, WalkError<OutOfRange>> {
        Err(WalkError::PageFault(PfErrorCode(ec)))
    }

    fn is_rsvd(r: &Result<Translation, WalkError<OutOfRange>>) -> bool {
        matches!(r, Err(WalkError::PageFault(ec)) if ec.contains(PfErrorCode::RSVD | PfErrorCode::P))
    }

    // ---------------------------------------------------------------- basic walks

    #[test]
    fn every_mode_and_page_size_translates() {
        let cases: &[(PagingMode, &[u8])] = &[
            (PagingMode::Bits32, &[1, 2]),
            (PagingMode::Pae, &[1, 2]),
            (PagingMode::Level4, &[1, 2, 3]),
            (PagingMode::Level5, &[1, 2, 3]),
        ];
        for &(mode, leaves) in cases {
            for &leaf in leaves {
                let mut f = fixture(mode, leaf);
                let t = f.walk(Access::read(0)).unwrap_or_else(|e| panic!("{mode} leaf {leaf}: {e:?}"));
                assert_eq!(t.gpa, f.expected_gpa(), "{mode} leaf {leaf}");
                assert_eq!(t.level, leaf);
                let want = match (mode, leaf) {
                    (_, 1) => PageSize::Size4K,
                    (PagingMode::Bits32, _) => PageSize::Size4M,
                    (_, 2) => PageSize::Size2M,
                    _ => PageSize::Size1G,
                };
                assert_eq!(t.size, want);
                assert_eq!(t.page_base(), Gpa(f.target));
                assert!(t.perms.writable && t.perms.user && !t.perms.nx && t.perms.dirty);
                for l in leaf..=mode.levels() {
                    assert_eq!(t.pte_gpas[usize::from(l - 1)], Gpa(f.at[usize::from(l - 1)]));
                    assert_eq!(t.ptes[usize::from(l - 1)], f.get(l), "{mode} level {l}");
                }
            }
        }
    }

    #[test]
    fn a_walk_resumed_from_the_pde_cache_matches_the_full_walk() {
        for mode in [PagingMode::Level4, PagingMode::Level5] {
            let mut f = fixture(mode, 1);
            let full = f.walk(Access::write(3)).unwrap();
            let e = pde_cache_entry(&full, &f.st).expect("a 4 KiB walk with A set above");
            assert_eq!((e.level, e.table), (1, f.at[0] & !0xfff), "{mode}");
            let opts = WalkOptions { set_ad: true, start: Some(e) };
            let t = walk(&mut f.mem, &f.st, f.gva, &Access::write(3), opts, &mut NoObserver).unwrap();
            assert!(pde_cache_entry(&t, &f.st).is_none(), "no entry from a resumed walk");
            assert_eq!((t.gpa, t.level, t.perms), (full.gpa, full.level, full.perms), "{mode}");
            // The levels above were not read: their slots are empty.
            assert_eq!(t.ptes[1], 0, "{mode}");
        }
        // PAE (and 32-bit) walks make no entry: this model caches 64-bit PDEs only.
        let mut f = fixture(PagingMode::Pae, 1);
        let full = f.walk(Access::read(0)).unwrap();
        assert!(pde_cache_entry(&full, &f.st).is_none());
    }

    #[test]
    fn non_paging_is_identity() {
        let mut mem = VecMem::new(0x1000);
        let st = PagingState::default();
        let t = walk(&mut mem, &st, Gva(0xdead_beef), &Access::write(3), WalkOptions::ARCH, &mut NoObserver).unwrap();
        assert_eq!(t.gpa, Gpa(0xdead_beef));
        assert_eq!(t.level, 0);
        assert_eq!(t.perms, PagePerms::ALL);
    }

    #[test]
    fn observer_sees_every_element_top_down() {
        #[derive(Default)]
        struct Rec(Vec<(u8, Gpa, u64)>);
        impl WalkObserver for Rec {
            fn element(&mut self, level: u8, pte_gpa: Gpa, pte: u64) {
                self.0.push((level, pte_gpa, pte));
            }
        }
        for mode in MODES {
            let mut f = fixture(mode, 1);
            let mut rec = Rec::default();
            walk(&mut f.mem, &f.st, f.gva, &Access::read(0), WalkOptions::PEEK, &mut rec).unwrap();
            let levels: Vec<u8> = rec.0.iter().map(|e| e.0).collect();
            let want: Vec<u8> = (1..=mode.levels()).rev().collect();
            assert_eq!(levels, want, "{mode}");
            for (l, at, v) in rec.0 {
                assert_eq!(at, Gpa(f.at[usize::from(l - 1)]));
                assert_eq!(v, f.get(l));
            }
        }
    }

    #[test]
    fn table_outside_memory_is_mem_error() {
        let mut f = fixture(PagingMode::Level4, 1);
        f.set_flags(3, P | RW | US | A); // keep PD address
        let pdpte = f.get(3);
        f.put(3, (pdpte & !ADDR_MASK_4K) | 0x3f_0000_0000);
        assert!(matches!(f.walk(Access::read(0)), Err(WalkError::Mem(OutOfRange(_)))));
    }

    #[test]
    fn self_referencing_tables_terminate() {
        // Every level points at the same table: the walk ends at level 1 anyway.
        let mut mem = VecMem::new(0x10000);
        let st = PagingState::long_mode(0x1000);
        for i in 0..512u64 {
            mem.store_u64(0x1000 + i * 8, 0x1000 | P | RW | US | A | D).unwrap();
        }
        let t = walk(&mut mem, &st, Gva(0x1234_5678), &Access::read(3), WalkOptions::ARCH, &mut NoObserver).unwrap();
        assert_eq!(t.gpa, Gpa(0x1678));
    }

    // ---------------------------------------------------------------- canonical

    #[test]
    fn canonical_checks() {
        let mut f = fixture(PagingMode::Level4, 1);
        f.gva = Gva(0x0000_8000_0000_0000);
        assert_eq!(f.walk(Access::read(0)), Err(WalkError::NonCanonical));
        f.gva = Gva(0xfff0_0000_0000_0000);
        assert_eq!(f.walk(Access::read(0)), Err(WalkError::NonCanonical));
        let mut f = fixture(PagingMode::Level5, 1);
        f.gva = Gva(0x0100_0000_0000_0000);
        assert_eq!(f.walk(Access::read(0)), Err(WalkError::NonCanonical));
        // 48-bit non-canonical is canonical with LA57 (walks, and faults not-present).
        f.gva = Gva(0x0000_8000_0000_0000);
        assert_eq!(f.walk(Access::read(0)), pf(0));
        // PAE/32-bit ignore the upper half of the address.
        let mut f = fixture(PagingMode::Pae, 1);
        let want = f.expected_gpa();
        f.gva = Gva(f.gva.0 | 0xabcd_0000_0000_0000);
        assert_eq!(f.walk(Access::read(0)).unwrap().gpa, want);
    }

    // ---------------------------------------------------------------- reserved bits

    /// One reserved-bit rule: in `mode`, with the leaf at `leaf`, OR `bits`
    /// into the entry at `level` (after `prep`), and expect RSVD or success.
    struct Row {
        mode: PagingMode,
        leaf: u8,
        level: u8,
        bits: u64,
        rsvd: bool,
        prep: fn(&mut PagingState),
        what: &'static str,
    }

    fn none(_: &mut PagingState) {}
    fn no_nxe(st: &mut PagingState) {
        st.efer.remove(Efer::NXE);
    }
    fn no_gbpages(st: &mut PagingState) {
        st.gbpages = false;
    }
    fn maxphy36(st: &mut PagingState) {
        st.maxphyaddr = 36;
    }
    fn maxphy40(st: &mut PagingState) {
        st.maxphyaddr = 40;
    }
    fn maxphy52(st: &mut PagingState) {
        st.maxphyaddr = 52;
    }
    fn no_pse36(st: &mut PagingState) {
        st.pse36 = false;
    }

    fn bit(n: u32) -> u64 {
        1u64 << n
    }

    fn rows() -> Vec<Row> {
        use PagingMode::*;
        let r = |mode, leaf, level, bits, rsvd, prep: fn(&mut PagingState), what| Row {
            mode,
            leaf,
            level,
            bits,
            rsvd,
            prep,
            what,
        };
        let mut v = vec![
            // 4/5-level: PS at PML4E/PML5E.
            r(Level4, 1, 4, PS, true, none, "PML4E.PS"),
            r(Level5, 1, 5, PS, true, none, "PML5E.PS"),
            r(Level5, 1, 4, PS, true, none, "PML4E.PS (5-level)"),
            // 1 GiB pages only with gbpages.
            r(Level4, 3, 3, 0, false, none, "1G leaf"),
            r(Level4, 3, 3, 0, true, no_gbpages, "1G leaf without gbpages"),
            r(Level5, 3, 3, 0, true, no_gbpages, "1G leaf without gbpages (5-level)"),
            // Large-leaf alignment bits; PAT bit 12 is fine, bit 30 / 21 are address bits.
            r(Level4, 3, 3, bit(12), false, none, "1G PAT"),
            r(Level4, 3, 3, bit(30), false, none, "1G address bit 30"),
            r(Level4, 2, 2, bit(12), false, none, "2M PAT"),
            r(Level4, 2, 2, bit(21), false, none, "2M address bit 21"),
            r(Pae, 2, 2, bit(12), false, none, "PAE 2M PAT"),
            // PTE bit 7 is PAT.
            r(Level4, 1, 1, PS, false, none, "PTE.PAT"),
            r(Pae, 1, 1, PS, false, none, "PAE PTE.PAT"),
            // NX with NXE is fine at every level.
            r(Level4, 1, 4, NX, false, none, "PML4E.XD with NXE"),
            r(Level4, 1, 1, NX, false, none, "PTE.XD with NXE"),
            r(Pae, 1, 2, NX, false, none, "PAE PDE.XD with NXE"),
            // 4-level: bits 52..62 are ignored (62:59 = pkey).
            r(Level4, 1, 1, bit(52) | bit(58) | bit(62), false, none, "4-level ignored high bits"),
            r(Level4, 1, 4, bit(52) | bit(62), false, none, "PML4E ignored high bits"),
            // MAXPHYADDR = 52: no high reserved bits in 4-level.
            r(Level4, 1, 1, bit(51), false, maxphy52, "bit 51 with MAXPHYADDR 52"),
            r(Level4, 1, 3, bit(35), false, maxphy36, "bit 35 with MAXPHYADDR 36"),
            r(Level4, 1, 3, bit(36), true, maxphy36, "bit 36 with MAXPHYADDR 36"),
            // PAE PDPTE.
            r(Pae, 1, 3, bit(3) | bit(4), false, none, "PDPTE PWT/PCD"),
            r(Pae, 1, 3, bit(9) | bit(10) | bit(11), false, none, "PDPTE ignored 9-11"),
            r(Pae, 1, 3, bit(63), true, none, "PDPTE bit 63 (even with NXE)"),
            r(Pae, 1, 3, bit(46), true, none, "PDPTE bit 46"),
            r(Pae, 1, 3, bit(52), true, none, "PDPTE bit 52"),
            r(Pae, 1, 3, bit(40), true, maxphy40, "PDPTE bit 40 with MAXPHYADDR 40"),
            r(Pae, 1, 3, bit(39), false, maxphy40, "PDPTE bit 39 with MAXPHYADDR 40"),
            // PAE PDE/PTE: bits M..62 reserved.
            r(Pae, 1, 2, bit(52), true, none, "PAE PDE bit 52"),
            r(Pae, 1, 2, bit(62), true, none, "PAE PDE bit 62"),
            r(Pae, 1, 1, bit(46), true, none, "PAE PTE bit 46"),
            r(Pae, 1, 1, bit(62), true, none, "PAE PTE bit 62"),
            r(Pae, 2, 2, bit(62), true, none, "PAE 2M leaf bit 62"),
            // 32-bit: nothing reserved in 4K entries.
            r(Bits32, 1, 1, PS | bit(9), false, none, "32-bit PTE PAT/avail"),
            r(Bits32, 1, 2, bit(8), false, none, "32-bit PDE ignored G"),
        ];
        // Every bit of 2M / 1G alignment is reserved.
        for b in 13..=20 {
            v.push(r(Level4, 2, 2, bit(b), true, none, "2M leaf bits 13-20"));
            v.push(r(Level5, 2, 2, bit(b), true, none, "2M leaf bits 13-20 (5-level)"));
            v.push(r(Pae, 2, 2, bit(b), true, none, "PAE 2M leaf bits 13-20"));
        }
        for b in 13..=29 {
            v.push(r(Level4, 3, 3, bit(b), true, none, "1G leaf bits 13-29"));
        }
        // PAE PDPTE fixed reserved bits.
        for b in [1, 2, 5, 6, 7, 8] {
            v.push(r(Pae, 1, 3, bit(b), true, none, "PDPTE bits 1-2, 5-8"));
        }
        // MAXPHYADDR..51 reserved at every level of every 64-bit mode.
        for (mode, top) in [(Level4, 4u8), (Level5, 5), (Pae, 2)] {
            for level in 1..=top {
                v.push(r(mode, 1, level, bit(46), true, none, "bit MAXPHYADDR"));
                v.push(r(mode, 1, level, bit(51), true, none, "bit 51"));
                // NX without NXE.
                v.push(r(mode, 1, level, NX, true, no_nxe, "XD without NXE"));
            }
        }
        v.push(r(Level4, 2, 2, NX, true, no_nxe, "2M leaf XD without NXE"));
        v.push(r(Level4, 3, 3, NX, true, no_nxe, "1G leaf XD without NXE"));
        // 32-bit PSE / PSE-36: address bits 13..(13 + M - 32), rest of 13..21 reserved.
        for b in 13..=21u32 {
            let r36 = b >= 17; // M = 36: 4 address bits (13-16)
            v.push(r(Bits32, 2, 2, bit(b), r36, maxphy36, "PSE-36, MAXPHYADDR 36"));
            v.push(r(Bits32, 2, 2, bit(b), b == 21, maxphy40, "PSE-36, MAXPHYADDR 40"));
            v.push(r(Bits32, 2, 2, bit(b), b == 21, none, "PSE-36, MAXPHYADDR 46 (capped at 40)"));
            v.push(r(Bits32, 2, 2, bit(b), true, no_pse36, "PSE without PSE-36"));
        }
        v
    }

    #[test]
    fn reserved_bits_table() {
        for row in rows() {
            let mut f = fixture(row.mode, row.leaf);
            (row.prep)(&mut f.st);
            f.or(row.level, row.bits);
            for access in [Access::read(0), Access::write(3), Access::fetch(3)] {
                let res = f.peek(access);
                let ctx = format!(
                    "{} ({} leaf {} level {} bits {:#x}) {:?}: {:?}",
                    row.what, row.mode, row.leaf, row.level, row.bits, access.kind, res
                );
                if row.rsvd {
                    let want = PfErrorCode::for_access(&f.st, &access) | PfErrorCode::P | PfErrorCode::RSVD;
                    assert_eq!(res, Err(WalkError::PageFault(want)), "{ctx}");
                } else {
                    assert!(!is_rsvd(&res), "{ctx}");
                }
                assert_eq!(reserved_bits(&f.st, row.level, f.get(row.level)) != 0, row.rsvd, "reserved_bits: {ctx}");
            }
        }
    }

    #[test]
    fn reserved_bits_in_not_present_entries_are_ignored() {
        for mode in [PagingMode::Pae, PagingMode::Level4] {
            let mut f = fixture(mode, 1);
            f.put(1, bit(51) | bit(62) | NX);
            f.st.efer.remove(Efer::NXE);
            assert_eq!(f.walk(Access::read(0)), pf(0), "{mode}");
        }
    }

    #[test]
    fn rsvd_fault_beats_not_present_below_and_permissions() {
        let mut f = fixture(PagingMode::Level4, 1);
        f.or(3, bit(50));
        f.put(1, 0);
        f.clear(2, US);
        assert_eq!(f.walk(Access::read(3)), pf(0b1101)); // P|U|RSVD
    }

    #[test]
    fn pse_disabled_ignores_ps_in_32bit_pde() {
        let mut f = fixture(PagingMode::Bits32, 1);
        // PS set but CR4.PSE clear: the PDE still points to a page table.
        f.or(2, PS | bit(13) | bit(17));
        f.st.cr4.remove(Cr4::PSE);
        // Bits 13 and 17 are now address bits of the page table pointer.
        let pt = f.get(2) & 0xffff_f000;
        let idx = (f.gva.0 >> 12) & 0x3ff;
        f.mem.store_u32(pt + idx * 4, (0x55_5000 | P | RW | US | A | D) as u32).unwrap();
        let t = f.walk(Access::read(0)).unwrap();
        assert_eq!(t.level, 1);
        assert_eq!(t.gpa, Gpa(0x55_5678));
    }

    #[test]
    fn pse36_high_address_bits() {
        let mut f = fixture(PagingMode::Bits32, 2);
        f.or(2, bit(13) | bit(16)); // physical bits 32 and 35
        f.st.maxphyaddr = 36;
        let t = f.walk(Access::read(0)).unwrap();
        assert_eq!(t.gpa.0, f.expected_gpa().0 | (1 << 32) | (1 << 35));
        assert_eq!(t.size, PageSize::Size4M);
        f.or(2, bit(20)); // physical bit 39: fine with MAXPHYADDR 40
        f.st.maxphyaddr = 40;
        assert_eq!(f.walk(Access::read(0)).unwrap().gpa.0 >> 32, 0b1000_1001);
    }

    // ---------------------------------------------------------------- error codes

    #[test]
    fn not_present_error_codes() {
        for mode in MODES {
            for level in 1..=mode.levels() {
                let mut f = fixture(mode, 1);
                f.clear(level, P);
                assert_eq!(f.walk(Access::read(0)), pf(0), "{mode} {level}");
                assert_eq!(f.walk(Access::write(3)), pf(0b110), "{mode} {level}");
                // Fetch: ID only with NXE in PAE formats (set in these states) or SMEP.
                let id = if mode == PagingMode::Bits32 { 0 } else { 0x10 };
                assert_eq!(f.walk(Access::fetch(3)), pf(0b100 | id), "{mode} {level}");
            }
        }
    }

    #[test]
    fn id_bit_rules() {
        // (mode, NXE, SMEP) -> ID on a fetch fault
        for mode in MODES {
            for nxe in [false, true] {
                for smep in [false, true] {
                    let mut f = fixture(mode, 1);
                    f.st.efer.set(Efer::NXE, nxe);
                    f.st.cr4.set(Cr4::SMEP, smep);
                    f.clear(1, P);
                    let id = smep || (nxe && mode != PagingMode::Bits32);
                    let want = if id { 0x14 } else { 0x4 };
                    assert_eq!(f.walk(Access::fetch(3)), pf(want), "{mode} nxe={nxe} smep={smep}");
                    assert_eq!(f.walk(Access::read(3)), pf(0x4));
                }
            }
        }
    }

    #[test]
    fn implicit_supervisor_access_has_no_u_bit() {
        let mut f = fixture(PagingMode::Level4, 1);
        f.clear(1, P);
        assert_eq!(f.walk(Access::implicit(AccessKind::Read, 3)), pf(0));
        assert_eq!(f.walk(Access::read(3)), pf(4));
    }

    // ---------------------------------------------------------------- permissions

    #[derive(Clone, Copy, Debug)]
    struct Flags {
        p: bool,
        w: bool,
        u: bool,
        nx: bool,
    }

    impl Flags {
        fn bits(self) -> u64 {
            let mut v = A | D;
            if self.p {
                v |= P;
            }
            if self.w {
                v |= RW;
            }
            if self.u {
                v |= US;
            }
            if self.nx {
                v |= NX;
            }
            v
        }
    }

    #[derive(Clone, Copy, Debug)]
    struct Cfg {
        wp: bool,
        nxe: bool,
        smep: bool,
        smap: bool,
        ac: bool,
        user: bool,
        kind: AccessKind,
    }

    /// An independent statement of SDM vol. 3 §4.6/§4.7 for a 2-entry walk
    /// (PDE then PTE; any upper levels are P|RW|US), written as a table of
    /// cases. `pae_format`: PAE/4-level (XD bit, ID with NXE) vs 32-bit paging.
    fn oracle(pde: Flags, pte: Flags, c: Cfg, pae_format: bool) -> Result<(), u32> {
        const PRESENT: u32 = 1;
        const WRITE: u32 = 2;
        const USER: u32 = 4;
        const RSVD: u32 = 8;
        const FETCH: u32 = 16;
        let mut code = 0;
        if c.kind == AccessKind::Write {
            code |= WRITE;
        }
        if c.user {
            code |= USER;
        }
        if c.kind == AccessKind::Fetch && (c.smep || (c.nxe && pae_format)) {
            code |= FETCH;
        }
        // The walk visits the PDE, then the PTE.
        for e in [pde, pte] {
            if !e.p {
                return Err(code);
            }
            if e.nx && !c.nxe {
                return Err(code | PRESENT | RSVD);
            }
        }
        let user_page = pde.u && pte.u;
        let writable = pde.w && pte.w;
        let no_exec = c.nxe && (pde.nx || pte.nx);
        let smap_blocks = c.smap && user_page && !c.ac;
        let allowed = match (c.user, c.kind) {
            (true, AccessKind::Read) => user_page,
            (true, AccessKind::Write) => user_page && writable,
            (true, AccessKind::Fetch) => user_page && !no_exec,
            (false, AccessKind::Read) => !smap_blocks,
            (false, AccessKind::Write) => !smap_blocks && (writable || !c.wp),
            (false, AccessKind::Fetch) => {
                let smep_blocks = c.smep && user_page;
                !no_exec && !smep_blocks
            }
        };
        if allowed {
            Ok(())
        } else {
            Err(code | PRESENT)
        }
    }

    fn all_flags() -> impl Iterator<Item = Flags> {
        (0..16u8).map(|b| Flags { p: b & 1 != 0, w: b & 2 != 0, u: b & 4 != 0, nx: b & 8 != 0 })
    }

    #[test]
    fn exhaustive_permissions_against_oracle() {
        let mut checked = 0u32;
        for mode in [PagingMode::Level4, PagingMode::Pae, PagingMode::Bits32] {
            let pae_format = mode != PagingMode::Bits32;
            let mut f = fixture(mode, 1);
            // 32-bit entries have no XD bit.
            for pde in all_flags().filter(|e| pae_format || !e.nx) {
                f.set_flags(2, pde.bits());
                for pte in all_flags().filter(|e| pae_format || !e.nx) {
                    f.set_flags(1, pte.bits());
                    for cfg_bits in 0..32u8 {
                        let b = |i: u8| cfg_bits & (1 << i) != 0;
                        f.st.cr0.set(Cr0::WP, b(0));
                        f.st.efer.set(Efer::NXE, b(1));
                        f.st.cr4.set(Cr4::SMEP, b(2));
                        f.st.cr4.set(Cr4::SMAP, b(3));
                        for user in [false, true] {
                            for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
                                let c = Cfg { wp: b(0), nxe: b(1), smep: b(2), smap: b(3), ac: b(4), user, kind };
                                let access = Access::new(kind, if user { 3 } else { 0 }).with_ac(c.ac);
                                let got = f.peek(access).map(|_| ()).map_err(|e| match e {
                                    WalkError::PageFault(ec) => ec.0,
                                    other => panic!("{other:?}"),
                                });
                                let want = oracle(pde, pte, c, pae_format);
                                assert_eq!(got, want, "{mode} pde={pde:?} pte={pte:?} {c:?}");
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(checked, (2 * 16 * 16 + 8 * 8) * 32 * 6);
    }

    #[test]
    fn check_access_matches_walk_on_tlb_hit() {
        // The perms of a successful peek, re-checked by check_access, agree with the walk.
        let mut f = fixture(PagingMode::Level4, 1);
        let t = f.peek(Access::read(3)).unwrap();
        f.st.cr4 |= Cr4::SMAP;
        assert_eq!(
            check_access(&t.perms, &f.st, &Access::read(0)),
            f.peek(Access::read(0)).map(|_| ()).map_err(|e| match e {
                WalkError::PageFault(ec) => ec,
                _ => unreachable!(),
            })
        );
    }

    #[test]
    fn smap_with_implicit_and_ac() {
        let mut f = fixture(PagingMode::Level4, 1);
        f.st.cr4 |= Cr4::SMAP;
        // Explicit supervisor access with AC=1: allowed.
        assert!(f.peek(Access::read(0).with_ac(true)).is_ok());
        assert!(f.peek(Access::write(0).with_ac(true)).is_ok());
        // Implicit supervisor access: AC does not help, at any CPL.
        for cpl in [0, 3] {
            let acc = Access::implicit(AccessKind::Read, cpl).with_ac(true);
            assert_eq!(f.peek(acc), pf(1), "cpl {cpl}");
        }
        // SMAP does not affect fetches.
        assert!(f.peek(Access::fetch(0)).is_ok());
        // Supervisor pages are unaffected.
        f.clear(1, US);
        assert!(f.peek(Access::read(0)).is_ok());
    }

    #[test]
    fn smep_and_wp_in_32bit_paging() {
        let mut f = fixture(PagingMode::Bits32, 1);
        f.st.cr4 |= Cr4::SMEP;
        assert_eq!(f.peek(Access::fetch(0)), pf(0x11));
        f.clear(1, RW);
        assert_eq!(f.peek(Access::write(0)), pf(0x3));
        f.st.cr0.remove(Cr0::WP);
        assert!(f.peek(Access::write(0)).is_ok());
        assert_eq!(f.peek(Access::write(3)), pf(0x7));
        // No NX in 32-bit paging even with EFER.NXE.
        f.st.efer |= Efer::NXE;
        f.st.cr4.remove(Cr4::SMEP);
        assert!(f.peek(Access::fetch(0)).is_ok());
    }

    #[test]
    fn large_page_permissions_combine_with_upper_levels() {
        let mut f = fixture(PagingMode::Level4, 3);
        f.clear(4, RW);
        f.or(3, NX);
        let t = f.peek(Access::read(3)).unwrap();
        assert!(!t.perms.writable && t.perms.user && t.perms.nx);
        assert_eq!(f.peek(Access::write(3)), pf(0x7));
        assert_eq!(f.peek(Access::fetch(3)), pf(0x15));
    }

    // ---------------------------------------------------------------- protection keys

    fn pk_fixture(key: u8) -> Fix {
        let mut f = fixture(PagingMode::Level4, 1);
        f.st.cr4 |= Cr4::PKE;
        f.or(1, u64::from(key) << 59);
        f
    }

    #[test]
    fn pkey_comes_from_the_leaf() {
        let mut f = pk_fixture(11);
        f.or(2, 5 << 59); // ignored in non-leaf entries
        assert_eq!(f.peek(Access::read(3)).unwrap().perms.pkey, 11);
        let mut f = fixture(PagingMode::Level4, 2);
        f.or(2, 7u64 << 59);
        assert_eq!(f.peek(Access::read(3)).unwrap().perms.pkey, 7);
    }

    #[test]
    fn pkey_access_disable() {
        let mut f = pk_fixture(3);
        f.st.pkru = 1 << 6; // AD3
        assert_eq!(f.peek(Access::read(3)), pf(0x25));
        assert_eq!(f.peek(Access::write(3)), pf(0x27));
        // Supervisor data accesses to user pages are checked too.
        assert_eq!(f.peek(Access::read(0)), pf(0x21));
        // Fetches are not.
        assert!(f.peek(Access::fetch(3)).is_ok());
        // Other keys are not affected.
        f.st.pkru = 1 << 4;
        assert!(f.peek(Access::read(3)).is_ok());
    }

    #[test]
    fn pkey_write_disable() {
        let mut f = pk_fixture(15);
        f.st.pkru = 1 << 31; // WD15
        assert!(f.peek(Access::read(3)).is_ok());
        assert_eq!(f.peek(Access::write(3)), pf(0x27));
        // Supervisor write: only with CR0.WP.
        assert_eq!(f.peek(Access::write(0)), pf(0x23));
        f.st.cr0.remove(Cr0::WP);
        assert!(f.peek(Access::write(0)).is_ok());
        assert_eq!(f.peek(Access::write(3)), pf(0x27));
    }

    #[test]
    fn pkey_only_for_user_pages_with_pke_in_long_mode() {
        let mut f = pk_fixture(1);
        f.st.pkru = 0b1100; // AD1|WD1
        f.clear(1, US);
        assert!(f.peek(Access::read(0)).is_ok(), "supervisor page");
        f.or(1, US);
        f.st.cr4.remove(Cr4::PKE);
        assert!(f.peek(Access::write(3)).is_ok(), "PKE clear");
        // PAE paging has no protection keys (bits 62:59 are reserved there).
        let mut f = fixture(PagingMode::Pae, 1);
        f.st.cr4 |= Cr4::PKE;
        f.st.pkru = u32::MAX;
        assert!(f.peek(Access::write(3)).is_ok());
        assert_eq!(f.peek(Access::read(3)).unwrap().perms.pkey, 0);
    }

    #[test]
    fn pkey_bit_accompanies_other_faults() {
        let mut f = pk_fixture(2);
        f.st.pkru = 1 << 5; // WD2
        f.clear(1, RW);
        assert_eq!(f.peek(Access::write(3)), pf(0x27));
        f.st.pkru = 0;
        assert_eq!(f.peek(Access::write(3)), pf(0x07));
    }

    // ---------------------------------------------------------------- A/D updates

    #[derive(Default)]
    struct AdRec {
        elements: u32,
        accessed: Vec<Gpa>,
        dirty: Vec<Gpa>,
    }

    impl WalkObserver for AdRec {
        fn element(&mut self, _: u8, _: Gpa, _: u64) {
            self.elements += 1;
        }
        fn set_accessed(&mut self, at: Gpa) {
            self.accessed.push(at);
        }
        fn set_dirty(&mut self, at: Gpa) {
            self.dirty.push(at);
        }
    }

    fn clear_ad(f: &mut Fix) {
        for l in f.leaf_level..=f.mode.levels() {
            if !(f.mode == PagingMode::Pae && l == 3) {
                f.clear(l, A | D);
            }
        }
    }

    #[test]
    fn accessed_on_every_level_top_down_dirty_only_for_writes() {
        for mode in MODES {
            for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
                let mut f = fixture(mode, 1);
                clear_ad(&mut f);
                let mut rec = AdRec::default();
                let t = walk(&mut f.mem, &f.st, f.gva, &Access::new(kind, 3), WalkOptions::ARCH, &mut rec).unwrap();
                let top = if mode == PagingMode::Pae { 2 } else { mode.levels() };
                let want: Vec<Gpa> = (1..=top).rev().map(|l| Gpa(f.at[usize::from(l - 1)])).collect();
                assert_eq!(rec.accessed, want, "{mode} {kind}");
                for l in 1..=top {
                    assert_ne!(f.get(l) & A, 0, "{mode} {kind} level {l}");
                    assert_eq!(t.ptes[usize::from(l - 1)], f.get(l));
                }
                let write = kind == AccessKind::Write;
                assert_eq!(f.get(1) & D != 0, write, "{mode} {kind}");
                assert_eq!(rec.dirty, if write { vec![Gpa(f.at[0])] } else { vec![] });
                assert_eq!(t.perms.dirty, write);
                for l in 2..=top {
                    assert_eq!(f.get(l) & D, 0, "no D on non-leaf");
                }
                if mode == PagingMode::Pae {
                    assert_eq!(f.mem.load_u64(f.at[2]).unwrap(), table(2) | P, "PDPTE untouched");
                }
            }
        }
    }

    #[test]
    fn dirty_on_large_leaves() {
        for (mode, leaf) in [(PagingMode::Level4, 2), (PagingMode::Level4, 3), (PagingMode::Bits32, 2)] {
            let mut f = fixture(mode, leaf);
            clear_ad(&mut f);
            f.walk(Access::write(0)).unwrap();
            assert_eq!(f.get(leaf) & (A | D), A | D, "{mode} leaf {leaf}");
            if leaf < mode.levels() {
                assert_eq!(f.get(leaf + 1) & (A | D), A);
            }
        }
    }

    #[test]
    fn no_ad_updates_on_faults_or_peeks() {
        for mode in MODES {
            let mut f = fixture(mode, 1);
            clear_ad(&mut f);
            f.clear(1, RW);
            let before: Vec<u64> = (1..=mode.levels()).map(|l| f.get(l)).collect();
            assert!(matches!(f.walk(Access::write(3)), Err(WalkError::PageFault(_))));
            f.clear(1, P);
            assert_eq!(f.walk(Access::read(3)), pf(4));
            f.or(1, P);
            f.peek(Access::read(3)).unwrap();
            let after: Vec<u64> = (1..=mode.levels()).map(|l| f.get(l)).collect();
            assert_eq!(before, after, "{mode}");
        }
    }

    #[test]
    fn ad_update_preserves_neighbouring_32bit_entry() {
        let mut f = fixture(PagingMode::Bits32, 1);
        clear_ad(&mut f);
        let other = f.at[0] ^ 4;
        f.mem.store_u32(other, 0xdead_b007).unwrap();
        f.walk(Access::write(3)).unwrap();
        assert_eq!(f.mem.load_u32(other).unwrap(), 0xdead_b007);
        assert_eq!(f.get(1) & (A | D), A | D);
    }

    /// Memory whose entries another "CPU" rewrites right before the first
    /// `races` compare-and-exchanges.
    struct Racy<'a> {
        mem: &'a VecMem,
        races: u32,
        cmpxchgs: u32,
    }

    impl GuestPhys for Racy<'_> {
        type Error = OutOfRange;
        fn read_pte(&mut self, gpa: Gpa, size: u8, gva: Gva) -> Result<u64, OutOfRange> {
            let mut m = self.mem;
            m.read_pte(gpa, size, gva)
        }
        fn cmpxchg_pte(&mut self, gpa: Gpa, size: u8, old: u64, new: u64, gva: Gva) -> Result<bool, OutOfRange> {
            self.cmpxchgs += 1;
            if self.races > 0 {
                self.races -= 1;
                // Flip an ignored bit (bit 9).
                let cur = self.mem.load_u64(gpa)?;
                self.mem.store_u64(gpa, cur ^ (1 << 9))?;
            }
            let mut m = self.mem;
            m.cmpxchg_pte(gpa, size, old, new, gva)
        }
    }

    #[test]
    fn lost_race_restarts_the_walk() {
        let mut f = fixture(PagingMode::Level4, 1);
        clear_ad(&mut f);
        let mut racy = Racy { mem: &f.mem, races: 1, cmpxchgs: 0 };
        let mut rec = AdRec::default();
        let t = walk(&mut racy, &f.st, f.gva, &Access::write(3), WalkOptions::ARCH, &mut rec).unwrap();
        // First attempt: 4 reads, PML4E cmpxchg fails; second: 4 reads, 4 cmpxchgs.
        assert_eq!(rec.elements, 8);
        assert_eq!(racy.cmpxchgs, 5);
        assert_eq!(f.get(4) & (A | (1 << 9)), A | (1 << 9), "the racing write survives");
        for l in 1..=4 {
            assert_ne!(f.get(l) & A, 0);
            assert_eq!(t.ptes[usize::from(l - 1)], f.get(l));
        }
        assert_ne!(f.get(1) & D, 0);
    }

    #[test]
    fn endless_races_give_contended() {
        let mut f = fixture(PagingMode::Level4, 1);
        clear_ad(&mut f);
        let mut racy = Racy { mem: &f.mem, races: u32::MAX, cmpxchgs: 0 };
        let res = walk(&mut racy, &f.st, f.gva, &Access::read(3), WalkOptions::ARCH, &mut NoObserver);
        assert_eq!(res, Err(WalkError::Contended));
        assert_eq!(racy.cmpxchgs, MAX_WALK_RETRIES + 1);
    }

    #[test]
    fn five_level_walk_reads_five_entries() {
        let mut f = fixture(PagingMode::Level5, 1);
        clear_ad(&mut f);
        let mut rec = AdRec::default();
        let t = walk(&mut f.mem, &f.st, f.gva, &Access::read(0), WalkOptions::ARCH, &mut rec).unwrap();
        assert_eq!(rec.elements, 5);
        assert_eq!(rec.accessed.len(), 5);
        assert_eq!(t.gpa, f.expected_gpa());
        // The 5-level index comes from bits 56:48.
        assert_eq!(f.at[4], table(5) + 0x05a * 8);
    }

    #[test]
    fn pae_walk_uses_pdpte_registers_not_memory() {
        let mut f = fixture(PagingMode::Pae, 1);
        // Memory says not present; the register (loaded earlier) says present.
        f.mem.store_u64(f.at[2], 0).unwrap();
        assert!(f.walk(Access::read(0)).is_ok());
        let idx = ((f.gva.0 >> 30) & 3) as usize;
        f.st.pdptrs[idx] = 0;
        assert_eq!(f.walk(Access::read(0)), pf(0));
    }
}
