//! The two-dimensional walk: a guest walk whose every guest-physical access is
//! itself translated by a TDP (EPT or NPT) walk, as the hardware does with
//! nested paging.

use crate::access::{Access, AccessKind, PfErrorCode};
use crate::addr::{Gpa, Gva, Hpa, PageSize};
use crate::ept::{ept_walk, npt_walk, EptAccess, EptConfig, EptTranslation, HostPhys, NptConfig, TdpExit};
use crate::mode::PagingState;
use crate::walk::{walk, GuestPhys, Translation, WalkError, WalkObserver, WalkOptions};

/// The second dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tdp {
    /// Intel EPT.
    Ept(EptConfig),
    /// AMD nested paging.
    Npt(NptConfig),
}

impl Tdp {
    /// Translates `gpa` with [`ept_walk`] or [`npt_walk`].
    #[inline]
    pub fn walk<H: HostPhys>(&self, h: &H, gpa: Gpa, acc: &EptAccess) -> Result<EptTranslation, TdpExit> {
        match self {
            Tdp::Ept(cfg) => ept_walk(h, cfg, gpa, acc),
            Tdp::Npt(cfg) => npt_walk(h, cfg, gpa, acc),
        }
    }

    /// The number of levels of the TDP tables.
    #[inline]
    pub const fn levels(&self) -> u8 {
        match self {
            Tdp::Ept(c) => c.walk_levels(),
            Tdp::Npt(c) => {
                if c.levels == 5 {
                    5
                } else {
                    4
                }
            }
        }
    }
}

/// A successful 2D translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation2d {
    /// The host-physical address of the accessed byte.
    pub hpa: Hpa,
    /// The guest-physical address of the accessed byte.
    pub gpa: Gpa,
    /// The guest dimension.
    pub guest: Translation,
    /// The host (TDP) page size of the final translation.
    pub host_size: PageSize,
    /// The final guest-physical page is writable in the TDP tables.
    pub host_writable: bool,
    /// The final guest-physical page is executable in the TDP tables.
    pub host_exec: bool,
    /// The TDP leaf is dirty (always true for EPT without A/D).
    pub host_dirty: bool,
    /// Memory references: guest entry reads and A/D updates, plus every TDP
    /// entry read and TDP A/D update on the way (24 for a 4-level guest on
    /// 4-level EPT with nothing cached and no A/D update).
    pub mem_refs: u32,
}

/// Up to six guest frame numbers (five guest page-table pages and the final page) whose TDP
/// dirty flag one 2D walk set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DirtiedGfns {
    gfns: [u64; 6],
    len: u8,
}

impl DirtiedGfns {
    /// Records `gpa`'s frame (ignored past six, which a walk cannot reach).
    #[inline]
    pub fn push(&mut self, gpa: Gpa) {
        if let Some(slot) = self.gfns.get_mut(usize::from(self.len)) {
            *slot = gpa.0 >> 12;
            self.len += 1;
        }
    }

    /// The recorded frame numbers, in walk order.
    #[inline]
    pub fn as_slice(&self) -> &[u64] {
        &self.gfns[..usize::from(self.len)]
    }

    /// Whether nothing was recorded.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Why a 2D walk failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Walk2dError {
    /// Inject `#PF` into the guest with this error code.
    #[error("guest page fault, error code {0}")]
    Guest(PfErrorCode),
    /// The linear address is not canonical (`#GP`).
    #[error("non-canonical address")]
    NonCanonical,
    /// The TDP walk exited (EPT violation / misconfiguration, NPF).
    #[error(transparent)]
    Exit(TdpExit),
    /// Guest or TDP entries kept changing under the walker (see
    /// [`WalkError::Contended`]); retry the access.
    #[error("paging entries kept changing under the walker")]
    Contended,
}

impl From<TdpExit> for Walk2dError {
    fn from(e: TdpExit) -> Self {
        match e {
            TdpExit::Contended { .. } => Walk2dError::Contended,
            e => Walk2dError::Exit(e),
        }
    }
}

/// Number of entries of a [`GpaCache`].
pub const GPA_CACHE_ENTRIES: usize = 64;

#[derive(Clone, Copy, Default)]
struct GpaCacheEntry {
    /// `gfn + 1`; 0 = empty.
    key: u64,
    hpa_page: u64,
    read_ok: bool,
    write_ok: bool,
}

/// A cache of guest-physical mappings (gpa -> hpa through the EPT/NPT tables) for the guest
/// page-table pages a 2D walk reads: what the SDM calls guest-physical mappings cached by the
/// processor. With it warm, a 4-level x 4-level walk makes 4 guest-entry references plus the
/// final 4-level TDP walk instead of 24.
///
/// Like the hardware's, it is invalidated only by INVEPT-class flushes ([`GpaCache::flush`]);
/// an entry that does not allow an access is not used (the walk re-reads the TDP tables),
/// so a mapping made more permissive needs no flush.
#[derive(Clone)]
pub struct GpaCache {
    entries: [GpaCacheEntry; GPA_CACHE_ENTRIES],
    /// Lookups that hit.
    pub hits: u64,
}

impl Default for GpaCache {
    fn default() -> Self {
        GpaCache { entries: [GpaCacheEntry::default(); GPA_CACHE_ENTRIES], hits: 0 }
    }
}

impl GpaCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops every entry (INVEPT).
    pub fn flush(&mut self) {
        self.entries = [GpaCacheEntry::default(); GPA_CACHE_ENTRIES];
    }

    #[inline]
    // Only the low bits survive the mask, and a usize holds at least 32 of them.
    #[allow(clippy::cast_possible_truncation)]
    fn slot(gfn: u64) -> usize {
        (gfn as usize) & (GPA_CACHE_ENTRIES - 1)
    }

    #[inline]
    fn lookup(&mut self, gpa: Gpa, write: bool) -> Option<Hpa> {
        let gfn = gpa.0 >> 12;
        let e = &self.entries[Self::slot(gfn)];
        if e.key == gfn + 1 && (if write { e.write_ok } else { e.read_ok }) {
            self.hits += 1;
            return Some(Hpa(e.hpa_page | (gpa.0 & 0xfff)));
        }
        None
    }

    #[inline]
    fn fill(&mut self, gpa: Gpa, hpa: Hpa, read_ok: bool, write_ok: bool) {
        let gfn = gpa.0 >> 12;
        self.entries[Self::slot(gfn)] = GpaCacheEntry { key: gfn + 1, hpa_page: hpa.0 & !0xfff, read_ok, write_ok };
    }
}

/// Guest memory seen through the TDP tables.
struct Nested<'a, H: ?Sized> {
    h: &'a H,
    tdp: &'a Tdp,
    refs: u32,
    cache: Option<&'a mut GpaCache>,
    dirtied: &'a mut DirtiedGfns,
}

impl<H: HostPhys + ?Sized> Nested<'_, H> {
    /// Whether the TDP treats every guest paging-structure access as a write (EPT with A/D
    /// bits; NPT as KVM models it).
    #[inline]
    fn table_reads_are_writes(&self) -> bool {
        match self.tdp {
            Tdp::Ept(c) => c.ad_enabled,
            Tdp::Npt(_) => true,
        }
    }

    #[inline]
    fn translate(&mut self, gpa: Gpa, kind: AccessKind, gva: Gva) -> Result<Hpa, TdpExit> {
        let as_write = kind == AccessKind::Write || self.table_reads_are_writes();
        if let Some(c) = self.cache.as_deref_mut() {
            if let Some(h) = c.lookup(gpa, as_write) {
                return Ok(h);
            }
        }
        let t = self.tdp.walk(&self.h, gpa, &EptAccess::guest_table(kind, gva))?;
        self.refs += t.refs;
        if t.dirtied {
            self.dirtied.push(gpa);
        }
        let write_ok = t.w && t.dirty;
        let read_ok = if self.table_reads_are_writes() { write_ok } else { t.r };
        if let Some(c) = self.cache.as_deref_mut() {
            c.fill(gpa, t.hpa, read_ok, write_ok);
        }
        Ok(t.hpa)
    }
}

impl<H: HostPhys + ?Sized> GuestPhys for Nested<'_, H> {
    type Error = TdpExit;

    #[inline]
    fn read_pte(&mut self, gpa: Gpa, size: u8, gva: Gva) -> Result<u64, TdpExit> {
        let hpa = self.translate(gpa, AccessKind::Read, gva)?;
        self.refs += 1;
        let word = self.h.read_u64(Hpa(hpa.0 & !7));
        Ok(if size == 4 { (word >> ((hpa.0 & 4) * 8)) & 0xffff_ffff } else { word })
    }

    #[inline]
    fn cmpxchg_pte(&mut self, gpa: Gpa, size: u8, old: u64, new: u64, gva: Gva) -> Result<bool, TdpExit> {
        let hpa = self.translate(gpa, AccessKind::Write, gva)?;
        let aligned = Hpa(hpa.0 & !7);
        self.refs += 1;
        if size != 4 {
            return Ok(self.h.cmpxchg_u64(aligned, old, new));
        }
        // A 4-byte entry: compare-and-exchange the containing quadword.
        let shift = (hpa.0 & 4) * 8;
        let word = self.h.read_u64(aligned);
        if (word >> shift) & 0xffff_ffff != old & 0xffff_ffff {
            return Ok(false);
        }
        self.refs += 1;
        let new_word = (word & !(0xffff_ffffu64 << shift)) | ((new & 0xffff_ffff) << shift);
        Ok(self.h.cmpxchg_u64(aligned, word, new_word))
    }
}

/// The 2D walk with the architectural A/D updates (see [`walk_2d_with`]).
pub fn walk_2d<H: HostPhys, O: WalkObserver>(
    h: &H,
    tdp: &Tdp,
    st: &PagingState,
    gva: Gva,
    access: &Access,
    obs: &mut O,
) -> Result<Translation2d, Walk2dError> {
    walk_2d_with(h, tdp, st, gva, access, WalkOptions::ARCH, obs)
}

/// Translates `gva` through the guest tables (`st`) and the TDP tables.
///
/// Every guest paging-structure read goes through the TDP walk as
/// `EptAccess { kind: Read, gva: Some(gva), paging_structure: true }` and every
/// guest A/D update as the same with `kind: Write`; the final guest-physical
/// address goes through the TDP walk with the access's real kind and
/// `paging_structure: false`. Guest faults come back as
/// [`Walk2dError::Guest`], TDP exits as [`Walk2dError::Exit`].
///
/// With `opts.set_ad == false` the guest A/D flags are left alone (TDP A/D
/// flags are still updated, as the TDP walks always do when enabled).
pub fn walk_2d_with<H: HostPhys, O: WalkObserver>(
    h: &H,
    tdp: &Tdp,
    st: &PagingState,
    gva: Gva,
    access: &Access,
    opts: WalkOptions,
    obs: &mut O,
) -> Result<Translation2d, Walk2dError> {
    walk_2d_cached(h, tdp, st, gva, access, opts, None, obs)
}

/// [`walk_2d_with`] using (and filling) a cache of guest-physical mappings for the guest's
/// page-table pages; references served by the cache are not memory references.
#[allow(clippy::too_many_arguments)]
pub fn walk_2d_cached<H: HostPhys, O: WalkObserver>(
    h: &H,
    tdp: &Tdp,
    st: &PagingState,
    gva: Gva,
    access: &Access,
    opts: WalkOptions,
    cache: Option<&mut GpaCache>,
    obs: &mut O,
) -> Result<Translation2d, Walk2dError> {
    walk_2d_logged(h, tdp, st, gva, access, opts, cache, &mut DirtiedGfns::default(), obs)
}

/// [`walk_2d_cached`] that also records in `dirtied` every guest-physical page whose TDP
/// leaf dirty flag the walk set (0 -> 1): guest page-table pages written by A/D updates (EPT
/// with A/D bits treats every guest paging-structure access as a write) and the final page
/// of a write — what the page-modification log records. The record is made as the flags
/// are set, so it holds even when the walk then fails (a guest fault, an EPT violation on
/// a later step).
#[allow(clippy::too_many_arguments)]
pub fn walk_2d_logged<H: HostPhys, O: WalkObserver>(
    h: &H,
    tdp: &Tdp,
    st: &PagingState,
    gva: Gva,
    access: &Access,
    opts: WalkOptions,
    cache: Option<&mut GpaCache>,
    dirtied: &mut DirtiedGfns,
    obs: &mut O,
) -> Result<Translation2d, Walk2dError> {
    let mut nested = Nested { h, tdp, refs: 0, cache, dirtied };
    let guest = walk(&mut nested, st, gva, access, opts, obs).map_err(|e| match e {
        WalkError::PageFault(ec) => Walk2dError::Guest(ec),
        WalkError::NonCanonical => Walk2dError::NonCanonical,
        WalkError::Mem(exit) => exit.into(),
        WalkError::Contended => Walk2dError::Contended,
    })?;
    let host = tdp.walk(h, guest.gpa, &EptAccess::final_gpa(access.kind, Some(gva)))?;
    let dirtied = nested.dirtied;
    if host.dirtied {
        dirtied.push(guest.gpa);
    }
    Ok(Translation2d {
        hpa: host.hpa,
        gpa: guest.gpa,
        guest,
        host_size: host.size,
        host_writable: host.w,
        host_exec: host.x,
        host_dirty: host.dirty,
        mem_refs: nested.refs + host.refs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::EptEntry;
    use crate::ept::{EptQual, NPF_GUEST_FINAL, NPF_GUEST_PAGE};
    use crate::mode::PagingMode;
    use crate::testutil::{fixture, table, Fix, HostTables, A, D, EPT_RWX, EPT_WB, P, RW, US};
    use crate::walk::NoObserver;

    /// Guest-physical [0, 2M) lives at host 4M; the 2M guest region holding the
    /// data page lives at host 6M.
    const GUEST_BASE: u64 = 0x40_0000;
    const DATA_BASE: u64 = 0x60_0000;
    const REGION: u64 = 0x20_0000;

    struct TwoD {
        host: HostTables,
        tdp: Tdp,
        fix: Fix,
        /// host entries of the TDP mapping of each guest-physical 2M region by level
        tdp_root: u64,
        tdp_levels: u8,
        npt: bool,
    }

    impl TwoD {
        fn new(mode: PagingMode, guest_leaf: u8, tdp_leaf: u8, tdp_levels: u8, npt: bool) -> Self {
            let fix = fixture(mode, guest_leaf);
            let mut host = HostTables::new(0x80_0000);
            let root = host.alloc();
            let (nonleaf, leaf) = if npt { (P | RW | US, P | RW | US) } else { (EPT_RWX, EPT_RWX | EPT_WB) };
            let data_region = fix.expected_gpa().0 & !(REGION - 1);
            for (g, h) in [(0, GUEST_BASE), (data_region, DATA_BASE)] {
                let step = if tdp_leaf == 2 { REGION } else { 0x1000 };
                let mut off = 0;
                while off < REGION {
                    host.map(root, tdp_levels, g + off, h + off, tdp_leaf, nonleaf, leaf);
                    off += step;
                }
            }
            // Copy the guest's tables into host memory.
            let mut a = 0;
            while a < fix.mem.len() {
                let v = fix.mem.load_u64(a).unwrap();
                host.mem.store_u64(GUEST_BASE + a, v).unwrap();
                a += 8;
            }
            let tdp = if npt {
                let mut c = NptConfig::new(Hpa(root));
                c.levels = tdp_levels;
                Tdp::Npt(c)
            } else {
                let mut c = EptConfig::new(Hpa(root));
                c.levels = tdp_levels;
                Tdp::Ept(c)
            };
            TwoD { host, tdp, fix, tdp_root: root, tdp_levels, npt }
        }

        fn go(&self, access: Access) -> Result<Translation2d, Walk2dError> {
            walk_2d(&self.host.mem, &self.tdp, &self.fix.st, self.fix.gva, &access, &mut NoObserver)
        }

        /// The guest entry at `level`, as stored in host memory.
        fn guest_entry(&self, level: u8) -> u64 {
            let at = GUEST_BASE + self.fix.at[usize::from(level - 1)];
            if self.fix.mode == PagingMode::Bits32 {
                u64::from(self.host.mem.load_u32(at).unwrap())
            } else {
                self.host.mem.load_u64(at).unwrap()
            }
        }

        fn set_guest_entry(&self, level: u8, v: u64) {
            let at = GUEST_BASE + self.fix.at[usize::from(level - 1)];
            if self.fix.mode == PagingMode::Bits32 {
                self.host.mem.store_u32(at, crate::low32(v)).unwrap();
            } else {
                self.host.mem.store_u64(at, v).unwrap();
            }
        }

        /// Rewrites the TDP leaf mapping guest-physical `gpa` (4K TDP pages only).
        fn tdp_leaf_at(&self, gpa: u64) -> u64 {
            let mut t = self.tdp_root;
            for level in (2..=self.tdp_levels).rev() {
                let idx = (gpa >> (12 + 9 * (u32::from(level) - 1))) & 511;
                t = self.host.mem.load_u64(t + idx * 8).unwrap() & 0x000f_ffff_ffff_f000;
            }
            t + ((gpa >> 12) & 511) * 8
        }

        fn expected_hpa(&self) -> Hpa {
            let gpa = self.fix.expected_gpa().0;
            Hpa(DATA_BASE + (gpa & (REGION - 1)))
        }
    }

    #[test]
    fn four_by_four_makes_24_references() {
        for npt in [false, true] {
            let w = TwoD::new(PagingMode::Level4, 1, 1, 4, npt);
            let t = w.go(Access::read(3)).unwrap();
            assert_eq!(t.gpa, w.fix.expected_gpa());
            assert_eq!(t.hpa, w.expected_hpa());
            assert_eq!(t.guest.level, 1);
            assert_eq!(t.host_size, PageSize::Size4K);
            assert!(t.host_writable && t.host_exec);
            if !npt {
                assert_eq!(t.mem_refs, 24, "4 guest reads x (4 EPT reads + 1) + 4 EPT reads");
            }
            // Once every A flag is set (NPT sets them on first use), it is 24 again.
            let t = w.go(Access::read(3)).unwrap();
            assert_eq!(t.mem_refs, 24, "npt={npt}");
        }
    }

    #[test]
    fn large_pages_make_fewer_references() {
        // (guest mode, guest leaf, TDP leaf, TDP levels, refs)
        for (mode, gl, hl, hlv, refs) in [
            (PagingMode::Level4, 2, 1, 4, 3 * 5 + 4),
            (PagingMode::Level4, 1, 2, 4, 4 * 4 + 3),
            (PagingMode::Level4, 2, 2, 4, 3 * 4 + 3),
            (PagingMode::Level4, 3, 2, 4, 2 * 4 + 3),
            (PagingMode::Level5, 1, 1, 5, 5 * 6 + 5),
            (PagingMode::Level5, 1, 1, 4, 5 * 5 + 4),
            (PagingMode::Pae, 1, 1, 4, 2 * 5 + 4),
            (PagingMode::Bits32, 1, 1, 4, 2 * 5 + 4),
            (PagingMode::Bits32, 2, 2, 4, 4 + 3),
            (PagingMode::NonPaging, 0, 1, 4, 4),
        ] {
            let w = TwoD::new(mode, gl.max(1), hl, hlv, false);
            let t = w.go(Access::read(0)).unwrap_or_else(|e| panic!("{mode} {gl} {hl}: {e:?}"));
            assert_eq!(t.mem_refs, refs, "{mode} guest leaf {gl} tdp leaf {hl} tdp levels {hlv}");
            assert_eq!(t.hpa, w.expected_hpa(), "{mode}");
        }
    }

    #[test]
    fn guest_faults_are_injected() {
        let w = TwoD::new(PagingMode::Level4, 1, 1, 4, false);
        w.set_guest_entry(1, w.guest_entry(1) & !RW);
        assert_eq!(w.go(Access::write(3)), Err(Walk2dError::Guest(PfErrorCode(0b111))));
        w.set_guest_entry(2, 0);
        assert_eq!(w.go(Access::read(3)), Err(Walk2dError::Guest(PfErrorCode(0b100))));
        let mut w = w;
        w.fix.gva = Gva(0x0000_8000_0000_0000);
        assert_eq!(w.go(Access::read(3)), Err(Walk2dError::NonCanonical));
    }

    #[test]
    fn ept_violation_on_a_guest_page_table() {
        let w = TwoD::new(PagingMode::Level4, 1, 1, 4, false);
        // Unmap the guest page directory's page in EPT.
        let leaf = w.tdp_leaf_at(table(2));
        w.host.mem.store_u64(leaf, 0).unwrap();
        match w.go(Access::read(3)) {
            Err(Walk2dError::Exit(TdpExit::EptViolation { gpa, gva, qualification })) => {
                assert_eq!(gpa, Gpa(w.fix.at[1]));
                assert_eq!(gva, Some(w.fix.gva));
                assert_eq!(qualification, EptQual::READ | EptQual::GVA_VALID);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ept_violation_on_the_final_access() {
        let w = TwoD::new(PagingMode::Level4, 1, 1, 4, false);
        let leaf = w.tdp_leaf_at(w.fix.expected_gpa().0);
        let v = w.host.mem.load_u64(leaf).unwrap();
        w.host.mem.store_u64(leaf, v & !EptEntry::WRITE).unwrap();
        let t = w.go(Access::read(3)).unwrap();
        assert!(!t.host_writable);
        match w.go(Access::write(3)) {
            Err(Walk2dError::Exit(TdpExit::EptViolation { gpa, qualification, .. })) => {
                assert_eq!(gpa, w.fix.expected_gpa());
                assert_eq!(
                    qualification,
                    EptQual::WRITE
                        | EptQual::READABLE
                        | EptQual::EXECUTABLE
                        | EptQual::GVA_VALID
                        | EptQual::GVA_TRANSLATED
                );
            }
            other => panic!("{other:?}"),
        }
        // Misconfiguration comes back as an exit too.
        w.host.mem.store_u64(leaf, v & !EptEntry::READ).unwrap();
        assert!(matches!(w.go(Access::read(3)), Err(Walk2dError::Exit(TdpExit::EptMisconfig { .. }))));
    }

    #[test]
    fn guest_ad_updates_go_through_the_tdp() {
        for mode in [PagingMode::Level4, PagingMode::Bits32] {
            let w = TwoD::new(mode, 1, 1, 4, false);
            let levels = mode.levels();
            for l in 1..=levels {
                w.set_guest_entry(l, w.guest_entry(l) & !(A | D));
            }
            let t = w.go(Access::write(3)).unwrap();
            for l in 1..=levels {
                assert_ne!(w.guest_entry(l) & A, 0, "{mode} level {l}");
            }
            assert_ne!(w.guest_entry(1) & D, 0);
            assert!(t.guest.perms.dirty);
            let per_update = if mode == PagingMode::Bits32 { 4 + 2 } else { 4 + 1 };
            let reads = u32::from(levels) * 5 + 4;
            assert_eq!(t.mem_refs, reads + u32::from(levels) * per_update, "{mode}");
        }
    }

    #[test]
    fn ept_ad_marks_guest_tables_dirty() {
        let mut w = TwoD::new(PagingMode::Level4, 1, 1, 4, false);
        if let Tdp::Ept(c) = &mut w.tdp {
            c.ad_enabled = true;
        }
        let logged = |access: Access| {
            let mut d = DirtiedGfns::default();
            let st = &w.fix.st;
            let t = walk_2d_logged(
                &w.host.mem,
                &w.tdp,
                st,
                w.fix.gva,
                &access,
                WalkOptions::ARCH,
                None,
                &mut d,
                &mut NoObserver,
            );
            (t.unwrap(), d)
        };
        let (t, dirtied) = logged(Access::read(3));
        assert!(!t.host_dirty, "the data page was only read");
        // PML would log the four guest table pages, top level first, and not the data page.
        let tables: Vec<u64> = (1..=4u8).rev().map(|l| w.fix.at[usize::from(l - 1)] >> 12).collect();
        assert_eq!(dirtied.as_slice(), tables.as_slice());
        let m = EptEntry::ACCESSED | EptEntry::DIRTY;
        for l in 1..=4u8 {
            let pt_leaf = w.tdp_leaf_at(w.fix.at[usize::from(l - 1)] & !0xfff);
            assert_eq!(w.host.mem.load_u64(pt_leaf).unwrap() & m, m, "guest table level {l}");
        }
        let data_leaf = w.tdp_leaf_at(w.fix.expected_gpa().0);
        assert_eq!(w.host.mem.load_u64(data_leaf).unwrap() & m, EptEntry::ACCESSED);
        let (t, dirtied) = logged(Access::write(3));
        assert!(t.host_dirty);
        assert_eq!(t.mem_refs, 24 + 1, "only the data page's D flag was left to set");
        assert_eq!(dirtied.as_slice(), &[w.fix.expected_gpa().0 >> 12]);
        let (_, dirtied) = logged(Access::write(3));
        assert!(dirtied.is_empty(), "D was already set: nothing new to log");
    }

    #[test]
    fn a_failed_walk_still_reports_the_tables_it_dirtied() {
        let mut w = TwoD::new(PagingMode::Level4, 1, 1, 4, false);
        if let Tdp::Ept(c) = &mut w.tdp {
            c.ad_enabled = true;
        }
        // The data page is not mapped in EPT: the walk sets D on the four guest tables' EPT
        // leaves, then exits on the final access.
        w.host.mem.store_u64(w.tdp_leaf_at(w.fix.expected_gpa().0), 0).unwrap();
        let mut d = DirtiedGfns::default();
        let r = walk_2d_logged(
            &w.host.mem,
            &w.tdp,
            &w.fix.st,
            w.fix.gva,
            &Access::read(3),
            WalkOptions::ARCH,
            None,
            &mut d,
            &mut NoObserver,
        );
        assert!(matches!(r, Err(Walk2dError::Exit(TdpExit::EptViolation { .. }))), "{r:?}");
        assert_eq!(d.as_slice().len(), 4, "the page-modification log must still see the tables");
    }

    #[test]
    fn npt_fault_bits() {
        let w = TwoD::new(PagingMode::Level4, 1, 1, 4, true);
        let leaf = w.tdp_leaf_at(table(3));
        w.host.mem.store_u64(leaf, 0).unwrap();
        match w.go(Access::read(0)) {
            Err(Walk2dError::Exit(TdpExit::Npf { gpa, error_code })) => {
                assert_eq!(gpa, Gpa(w.fix.at[2]));
                assert_eq!(error_code, NPF_GUEST_PAGE | 0b110);
            }
            other => panic!("{other:?}"),
        }
        let w = TwoD::new(PagingMode::Level4, 1, 1, 4, true);
        let leaf = w.tdp_leaf_at(w.fix.expected_gpa().0);
        w.host.mem.store_u64(leaf, 0).unwrap();
        match w.go(Access::fetch(0)) {
            Err(Walk2dError::Exit(TdpExit::Npf { gpa, error_code })) => {
                assert_eq!(gpa, w.fix.expected_gpa());
                assert_eq!(error_code, NPF_GUEST_FINAL | 0b10100);
            }
            other => panic!("{other:?}"),
        }
        assert!(w.npt);
    }

    #[test]
    fn peek_leaves_guest_flags_alone() {
        let w = TwoD::new(PagingMode::Level4, 1, 1, 4, false);
        w.set_guest_entry(1, w.guest_entry(1) & !(A | D));
        let before = w.guest_entry(1);
        let t = walk_2d_with(
            &w.host.mem,
            &w.tdp,
            &w.fix.st,
            w.fix.gva,
            &Access::write(3),
            WalkOptions::PEEK,
            &mut NoObserver,
        )
        .unwrap();
        assert_eq!(w.guest_entry(1), before);
        assert_eq!(t.mem_refs, 24);
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;
    use crate::mem::VecMem;
    use crate::walk::NoObserver;

    /// A 4-level guest over a 4-level EPT, identity-mapped 1:1 in host memory.
    fn setup(ad: bool) -> (VecMem, Tdp, PagingState) {
        let mem = VecMem::new(0x40_0000);
        // Present, writable, accessed (and dirty on the leaf): the walks update nothing.
        let (p, rw) = (1u64, 2u64 | 0x20 | 0x40);
        // Guest tables at 0x1000.. (PML4, PDPT, PD, PT), data at 0x10_0000.
        for (at, next) in [(0x1000u64, 0x2000u64), (0x2000, 0x3000), (0x3000, 0x4000)] {
            mem.store_u64(at, next | p | rw).unwrap();
        }
        mem.store_u64(0x4000u64 + 0x100 * 8, 0x10_0000 | p | rw).unwrap();
        // EPT at 0x20_0000..: identity map of the first 2 MiB with 4 KiB pages.
        // EPT A/D preset as well.
        let (r, w, x) = (1u64 | 0x100 | 0x200, 2u64, 4u64);
        for (at, next) in [(0x20_0000u64, 0x20_1000u64), (0x20_1000, 0x20_2000), (0x20_2000, 0x20_3000)] {
            mem.store_u64(at, next | r | w | x).unwrap();
        }
        for i in 0..512u64 {
            mem.store_u64(0x20_3000 + i * 8, (i << 12) | r | w | x | (6 << 3)).unwrap();
        }
        let mut cfg = crate::ept::EptConfig::new(Hpa(0x20_0000));
        cfg.ad_enabled = ad;
        let st = PagingState::long_mode(0x1000);
        (mem, Tdp::Ept(cfg), st)
    }

    #[test]
    fn warm_cache_cuts_references_and_gives_the_same_translation() {
        for ad in [false, true] {
            let (mem, tdp, st) = setup(ad);
            let gva = Gva(0x10_0000);
            let acc = Access::read(0);
            let cold = walk_2d(&mem, &tdp, &st, gva, &acc, &mut NoObserver).unwrap();
            assert_eq!(cold.mem_refs, 24);
            let mut cache = GpaCache::new();
            let a = walk_2d_cached(&mem, &tdp, &st, gva, &acc, WalkOptions::ARCH, Some(&mut cache), &mut NoObserver)
                .unwrap();
            let b = walk_2d_cached(&mem, &tdp, &st, gva, &acc, WalkOptions::ARCH, Some(&mut cache), &mut NoObserver)
                .unwrap();
            assert_eq!((a.hpa, b.hpa), (cold.hpa, cold.hpa));
            assert_eq!(b.mem_refs, 4 + 4, "4 guest entries + the final 4-level TDP walk (ad {ad})");
            assert!(cache.hits >= 4);
            cache.flush();
            let c = walk_2d_cached(&mem, &tdp, &st, gva, &acc, WalkOptions::ARCH, Some(&mut cache), &mut NoObserver)
                .unwrap();
            assert_eq!(c.mem_refs, a.mem_refs, "flushed: cold again");
        }
    }

    #[test]
    fn an_entry_without_the_right_is_not_used() {
        let (mem, tdp, st) = setup(false);
        // The guest leaf is clean: a write must set its D bit (a write to the PT page).
        mem.store_u64(0x4000u64 + 0x100 * 8, 0x10_0000 | 1 | 2 | 0x20).unwrap();
        let mut cache = GpaCache::new();
        let gva = Gva(0x10_0000);
        walk_2d_cached(&mem, &tdp, &st, gva, &Access::read(0), WalkOptions::ARCH, Some(&mut cache), &mut NoObserver)
            .unwrap();
        // Make the guest PT page read-only in the EPT; the cached (read-only-verified?) rights
        // must not let an A/D write through: the walk re-reads the EPT and exits.
        mem.store_u64(0x20_3000u64 + 4 * 8, (4u64 << 12) | 1 | 4 | 0x300 | (6 << 3)).unwrap();
        let mut c2 = GpaCache::new();
        walk_2d_cached(&mem, &tdp, &st, gva, &Access::read(0), WalkOptions::PEEK, Some(&mut c2), &mut NoObserver)
            .unwrap();
        let r =
            walk_2d_cached(&mem, &tdp, &st, gva, &Access::write(0), WalkOptions::ARCH, Some(&mut c2), &mut NoObserver);
        assert!(matches!(r, Err(Walk2dError::Exit(TdpExit::EptViolation { .. }))), "{r:?}");
    }
}
