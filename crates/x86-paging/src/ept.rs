//! The TDP walks: Intel EPT and AMD NPT.
//!
//! Both translate a guest-physical address to a host-physical one through
//! tables in host memory ([`HostPhys`]) and either succeed with an
//! [`EptTranslation`] or fail with the VM exit the hardware would take
//! ([`TdpExit`]).

use core::convert::Infallible;
use core::fmt;

use crate::access::{Access, AccessKind};
use crate::addr::{Gpa, Gva, Hpa, PageSize};
use crate::bits;
use crate::entry::{EptEntry, ADDR_MASK_1G, ADDR_MASK_2M, ADDR_MASK_4K};
use crate::mode::PagingState;
use crate::regs::{Cr0, Cr4, Efer};
use crate::walk::{walk, GuestPhys, NoObserver, WalkError, WalkOptions, MAX_WALK_RETRIES};

/// Host-physical memory holding the TDP tables (and, for the 2D walk, the
/// guest's memory). Accesses outside memory are the implementor's business
/// (e.g. [`crate::VecMem`] reads 0 there, which is a not-present entry).
pub trait HostPhys {
    /// Reads the 8-byte-aligned quadword at `hpa`.
    fn read_u64(&self, hpa: Hpa) -> u64;
    /// Atomically replaces the quadword at `hpa` with `new` if it holds `old`;
    /// `false` if it did not (nothing written).
    fn cmpxchg_u64(&self, hpa: Hpa, old: u64, new: u64) -> bool;
}

impl<H: HostPhys + ?Sized> HostPhys for &H {
    #[inline]
    fn read_u64(&self, hpa: Hpa) -> u64 {
        (**self).read_u64(hpa)
    }

    #[inline]
    fn cmpxchg_u64(&self, hpa: Hpa, old: u64, new: u64) -> bool {
        (**self).cmpxchg_u64(hpa, old, new)
    }
}

/// An EPT configuration (the EPTP plus the capabilities that matter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EptConfig {
    /// Address of the EPT PML4 (or PML5) table (EPTP bits 51:12).
    pub root: Hpa,
    /// Page-walk length: 4 or 5 (anything but 5 walks 4 levels).
    pub levels: u8,
    /// EPTP bit 6: accessed/dirty flags enabled.
    pub ad_enabled: bool,
    /// Execute-only translations supported (IA32_VMX_EPT_VPID_CAP bit 0).
    pub execute_only: bool,
    /// 1 GiB EPT pages supported (IA32_VMX_EPT_VPID_CAP bit 17).
    pub gbpages: bool,
    /// MAXPHYADDR of the host (bits at and above it, up to 51, are reserved).
    pub maxphyaddr: u8,
}

impl EptConfig {
    /// A 4-level EPT rooted at `root`, A/D disabled, execute-only and 1 GiB
    /// pages supported, MAXPHYADDR 46.
    pub const fn new(root: Hpa) -> Self {
        EptConfig { root, levels: 4, ad_enabled: false, execute_only: true, gbpages: true, maxphyaddr: 46 }
    }

    /// The number of levels actually walked (5 if `levels == 5`, else 4).
    #[inline]
    pub const fn walk_levels(&self) -> u8 {
        if self.levels == 5 {
            5
        } else {
            4
        }
    }
}

/// An AMD nested-paging configuration. The nested tables use the host's
/// 64-bit paging format (4- or 5-level).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NptConfig {
    /// nCR3: the nested PML4 (or PML5) table.
    pub root: Hpa,
    /// 4 or 5 (anything but 5 walks 4 levels).
    pub levels: u8,
    /// The host's EFER.NXE (NX bits honoured, otherwise reserved).
    pub nxe: bool,
    /// 1 GiB pages supported.
    pub gbpages: bool,
    /// Host MAXPHYADDR.
    pub maxphyaddr: u8,
}

impl NptConfig {
    /// A 4-level nested table at `root` with NX enabled, 1 GiB pages, MAXPHYADDR 46.
    pub const fn new(root: Hpa) -> Self {
        NptConfig { root, levels: 4, nxe: true, gbpages: true, maxphyaddr: 46 }
    }

    /// The paging state the nested walk runs under (long mode, CR0.WP, no SMEP/SMAP/PKE).
    pub fn paging_state(&self) -> PagingState {
        let mut efer = Efer::LME | Efer::LMA;
        if self.nxe {
            efer |= Efer::NXE;
        }
        let mut cr4 = Cr4::PAE | Cr4::PSE;
        if self.levels == 5 {
            cr4 |= Cr4::LA57;
        }
        PagingState {
            cr0: Cr0::PG | Cr0::PE | Cr0::WP,
            cr3: self.root.0,
            cr4,
            efer,
            pkru: 0,
            pdptrs: [0; 4],
            maxphyaddr: self.maxphyaddr,
            gbpages: self.gbpages,
            pse36: true,
        }
    }
}

/// What a TDP walk is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EptAccess {
    /// The access type.
    pub kind: AccessKind,
    /// The linear address being translated, if any (exit qualification bit 7).
    pub gva: Option<Gva>,
    /// The access is to a guest paging-structure entry (a guest walk or its
    /// A/D update), not to the final guest-physical address.
    pub paging_structure: bool,
}

impl EptAccess {
    /// An access to the translation of `gva` (the final guest-physical address).
    #[inline]
    pub const fn final_gpa(kind: AccessKind, gva: Option<Gva>) -> Self {
        EptAccess { kind, gva, paging_structure: false }
    }

    /// A guest paging-structure access (read, or write for an A/D update) while translating `gva`.
    #[inline]
    pub const fn guest_table(kind: AccessKind, gva: Gva) -> Self {
        EptAccess { kind, gva: Some(gva), paging_structure: true }
    }
}

/// A successful TDP translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EptTranslation {
    /// The host-physical address of the accessed byte.
    pub hpa: Hpa,
    /// The host page size.
    pub size: PageSize,
    /// The leaf level (1..=3).
    pub level: u8,
    /// Readable (AND over the levels).
    pub r: bool,
    /// Writable (AND over the levels).
    pub w: bool,
    /// Executable (AND over the levels; NPT: no NX anywhere).
    pub x: bool,
    /// The leaf's dirty flag after this walk (always true when A/D is disabled).
    pub dirty: bool,
    /// This walk set the leaf's dirty flag (0 -> 1): the event the page-modification log
    /// (PML) records. Always false for NPT, which has no such log.
    pub dirtied: bool,
    /// Memory references made: every table entry read plus every A/D
    /// compare-and-exchange (over all restarts).
    pub refs: u32,
}

/// The exit qualification of an EPT violation (SDM vol. 3, table "Exit
/// Qualification for EPT Violations"), bitflags over the raw `u64`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EptQual(pub u64);

bitflags::bitflags! {
    impl EptQual: u64 {
        /// Bit 0: the access was a data read.
        const READ = 1 << 0;
        /// Bit 1: the access was a data write.
        const WRITE = 1 << 1;
        /// Bit 2: the access was an instruction fetch.
        const FETCH = 1 << 2;
        /// Bit 3: AND of the R bits of the entries walked.
        const READABLE = 1 << 3;
        /// Bit 4: AND of the W bits of the entries walked.
        const WRITABLE = 1 << 4;
        /// Bit 5: AND of the X bits of the entries walked.
        const EXECUTABLE = 1 << 5;
        /// Bit 7: the guest linear-address field is valid.
        const GVA_VALID = 1 << 7;
        /// Bit 8 (with bit 7): the access was to the translation of the linear
        /// address (clear: to a guest paging-structure entry).
        const GVA_TRANSLATED = 1 << 8;
    }
}

impl fmt::Debug for EptQual {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EptQual({:#x}: {})", self.0, self)
    }
}

impl fmt::Display for EptQual {
    /// `R|W|X|r|w|x|gva|final` style: the access bits upper case, the
    /// permission bits lower case.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(u64, &str); 8] = [
            (1 << 0, "R"),
            (1 << 1, "W"),
            (1 << 2, "X"),
            (1 << 3, "r"),
            (1 << 4, "w"),
            (1 << 5, "x"),
            (1 << 7, "gva"),
            (1 << 8, "final"),
        ];
        let mut rest = self.0;
        let mut first = true;
        for (mask, name) in NAMES {
            if rest & mask != 0 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
                rest &= !mask;
            }
        }
        if rest != 0 {
            if !first {
                f.write_str("|")?;
            }
            write!(f, "{rest:#x}")?;
        }
        Ok(())
    }
}

/// NPF error code bit 32: the fault was on the final guest-physical address.
pub const NPF_GUEST_FINAL: u64 = 1 << 32;
/// NPF error code bit 33: the fault was on a guest page-table access.
pub const NPF_GUEST_PAGE: u64 = 1 << 33;

/// Why a TDP walk failed: the VM exit the hardware would take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum TdpExit {
    /// EPT violation.
    #[error("EPT violation at {gpa} (qualification {qualification})")]
    EptViolation {
        /// The guest-physical address.
        gpa: Gpa,
        /// The guest linear address, when valid.
        gva: Option<Gva>,
        /// The exit qualification.
        qualification: EptQual,
    },
    /// EPT misconfiguration.
    #[error("EPT misconfiguration at {gpa}")]
    EptMisconfig {
        /// The guest-physical address.
        gpa: Gpa,
    },
    /// AMD nested page fault (`#VMEXIT(NPF)`): EXITINFO1 = `error_code`, EXITINFO2 = `gpa`.
    #[error("nested page fault at {gpa} (error code {error_code:#x})")]
    Npf {
        /// The guest-physical address.
        gpa: Gpa,
        /// P/W/U/RSVD/ID in bits 0-4, [`NPF_GUEST_FINAL`] or [`NPF_GUEST_PAGE`].
        error_code: u64,
    },
    /// Not an architectural exit: the A/D compare-and-exchange on the TDP
    /// tables lost [`MAX_WALK_RETRIES`] + 1 races in a row. Retry the access.
    #[error("TDP entries for {gpa} kept changing under the walker")]
    Contended {
        /// The guest-physical address.
        gpa: Gpa,
    },
}

const EPT_A: u64 = EptEntry::ACCESSED;
const EPT_D: u64 = EptEntry::DIRTY;
const EPT_PS: u64 = EptEntry::HUGE;

/// Memory types 2, 3 and 7 are reserved (bit `mt` set = misconfiguration).
const BAD_MEMTYPES: u8 = (1 << 2) | (1 << 3) | (1 << 7);

/// The per-configuration facts the EPT checks need, computed once per walk.
#[derive(Clone, Copy)]
struct EptRules {
    /// Bits MAXPHYADDR..=51.
    high: u64,
    /// Bit `rwx` set when that R/W/X combination is allowed (present ones only).
    rwx_ok: u8,
    gbpages: bool,
}

impl EptRules {
    #[inline]
    fn new(cfg: &EptConfig) -> Self {
        // 001 R, 011 RW, 101 RX, 111 RWX always; 100 X with execute-only.
        let mut rwx_ok = (1 << 0b001) | (1 << 0b011) | (1 << 0b101) | (1 << 0b111);
        if cfg.execute_only {
            rwx_ok |= 1 << 0b100;
        }
        EptRules { high: bits(u32::from(cfg.maxphyaddr).clamp(32, 52), 51), rwx_ok, gbpages: cfg.gbpages }
    }

    /// Whether the present entry `e` at `level` is misconfigured; `leaf` says
    /// whether it maps a page (level 1, or bit 7 at any other level: at levels
    /// 4/5 and for 1 GiB pages without `gbpages` that bit is itself reserved).
    #[inline]
    fn misconfigured(&self, level: u8, leaf: bool, e: u64) -> bool {
        let rsvd = match (leaf, level) {
            (true, 1) => self.high,
            (true, 2) => self.high | bits(12, 20),
            (true, 3) if self.gbpages => self.high | bits(12, 29),
            (true, _) => EPT_PS,
            (false, 2 | 3) => self.high | bits(3, 6),
            (false, _) => self.high | bits(3, 7),
        };
        (self.rwx_ok >> (e & 7)) & 1 == 0 || e & rsvd != 0 || (leaf && (BAD_MEMTYPES >> ((e >> 3) & 7)) & 1 != 0)
    }
}

/// Translates `gpa` through the EPT at `cfg.root` for `acc`.
///
/// * An entry is present iff any of bits 0..=2 is set; a not-present entry is an
///   EPT violation.
/// * A present entry is an EPT misconfiguration if it is writable but not
///   readable, execute-only without `execute_only`, has reserved bits
///   (PML5E/PML4E bits 7:3, non-leaf PDPTE/PDE bits 6:3, a 1 GiB leaf without
///   `gbpages`, large-leaf address bits 29:12 / 20:12, bits MAXPHYADDR..=51),
///   or is a leaf with memory type 2, 3 or 7. Misconfigurations are found
///   entry by entry, so they take precedence over permission violations.
/// * The access needs R (read), W (write) or X (fetch) in every entry, else an
///   EPT violation whose qualification carries the access type, the ANDed
///   R/W/X (all 0 when an entry was not present), and bits 7/8 from `acc`.
/// * With `ad_enabled`, guest paging-structure accesses are writes (the
///   qualification then has both bits 0 and 1, per the SDM's footnote to the
///   exit-qualification table), and on success A is set in every entry used,
///   top-down, and D in the leaf for writes, by [`HostPhys::cmpxchg_u64`]; a
///   lost race restarts the walk, at most [`MAX_WALK_RETRIES`] times, then
///   [`TdpExit::Contended`].
///
/// Only bits below `12 + 9 * levels` of `gpa` select entries (the SDM: 4-level
/// EPT uses bits 47:0).
pub fn ept_walk<H: HostPhys>(h: &H, cfg: &EptConfig, gpa: Gpa, acc: &EptAccess) -> Result<EptTranslation, TdpExit> {
    let rules = EptRules::new(cfg);
    let mut refs = 0u32;
    for _ in 0..=MAX_WALK_RETRIES {
        if let Some(t) = ept_walk_once(h, cfg, &rules, gpa, acc, &mut refs)? {
            return Ok(t);
        }
    }
    Err(TdpExit::Contended { gpa })
}

/// The EPT violation for `acc` at `gpa`, with `perm` the AND of the R/W/X bits walked.
#[cold]
fn ept_violation(cfg: &EptConfig, gpa: Gpa, acc: &EptAccess, perm: u64) -> TdpExit {
    let access = if cfg.ad_enabled && acc.paging_structure {
        EptQual::READ | EptQual::WRITE
    } else {
        match acc.kind {
            AccessKind::Read => EptQual::READ,
            AccessKind::Write => EptQual::WRITE,
            AccessKind::Fetch => EptQual::FETCH,
        }
    };
    let mut q = access | EptQual((perm & 7) << 3);
    if acc.gva.is_some() {
        q |= EptQual::GVA_VALID;
        if !acc.paging_structure {
            q |= EptQual::GVA_TRANSLATED;
        }
    }
    TdpExit::EptViolation { gpa, gva: acc.gva, qualification: q }
}

#[inline]
fn ept_walk_once<H: HostPhys>(
    h: &H,
    cfg: &EptConfig,
    rules: &EptRules,
    gpa: Gpa,
    acc: &EptAccess,
    refs: &mut u32,
) -> Result<Option<EptTranslation>, TdpExit> {
    let levels = cfg.walk_levels();
    let as_write = acc.kind == AccessKind::Write || (cfg.ad_enabled && acc.paging_structure);
    let need = match acc.kind {
        _ if as_write => EptEntry::WRITE,
        AccessKind::Read => EptEntry::READ,
        AccessKind::Write => EptEntry::WRITE,
        AccessKind::Fetch => EptEntry::EXEC,
    };
    let mut used = [(Hpa(0), 0u64); 5];
    let mut perm = EptEntry::RWX;
    let mut table = cfg.root.0 & ADDR_MASK_4K;
    let mut level = levels;
    let leaf = loop {
        let idx = (gpa.0 >> (12 + 9 * u32::from(level - 1))) & 511;
        let at = Hpa(table + idx * 8);
        let e = h.read_u64(at);
        *refs += 1;
        used[usize::from(level - 1)] = (at, e);
        if e & EptEntry::RWX == 0 {
            return Err(ept_violation(cfg, gpa, acc, 0));
        }
        let is_leaf = level == 1 || e & EPT_PS != 0;
        if rules.misconfigured(level, is_leaf, e) {
            return Err(TdpExit::EptMisconfig { gpa });
        }
        perm &= e;
        if is_leaf {
            break e;
        }
        table = e & ADDR_MASK_4K;
        level -= 1;
    };
    if perm & need == 0 {
        return Err(ept_violation(cfg, gpa, acc, perm));
    }
    let mut dirty = true;
    let mut dirtied = false;
    if cfg.ad_enabled {
        for l in (level..=levels).rev() {
            let (at, old) = used[usize::from(l - 1)];
            let new = old | EPT_A | if l == level && as_write { EPT_D } else { 0 };
            if l == level {
                dirty = new & EPT_D != 0;
                dirtied = dirty && old & EPT_D == 0;
            }
            if new != old {
                *refs += 1;
                if !h.cmpxchg_u64(at, old, new) {
                    return Ok(None);
                }
            }
        }
    }
    let size = PageSize::for_level(level);
    let base = match level {
        3 => leaf & ADDR_MASK_1G,
        2 => leaf & ADDR_MASK_2M,
        _ => leaf & ADDR_MASK_4K,
    };
    Ok(Some(EptTranslation {
        hpa: Hpa(base | (gpa.0 & size.offset_mask())),
        size,
        level,
        r: perm & EptEntry::READ != 0,
        w: perm & EptEntry::WRITE != 0,
        x: perm & EptEntry::EXEC != 0,
        dirty,
        dirtied,
        refs: *refs,
    }))
}

/// [`GuestPhys`] over host memory for the NPT walk (guest-physical = host-physical
/// for the nested tables themselves), counting references.
struct NptTables<'a, H: ?Sized> {
    h: &'a H,
    refs: u32,
}

impl<H: HostPhys + ?Sized> GuestPhys for NptTables<'_, H> {
    type Error = Infallible;

    #[inline]
    fn read_pte(&mut self, gpa: Gpa, _size: u8, _gva: Gva) -> Result<u64, Infallible> {
        self.refs += 1;
        Ok(self.h.read_u64(Hpa(gpa.0)))
    }

    #[inline]
    fn cmpxchg_pte(&mut self, gpa: Gpa, _size: u8, old: u64, new: u64, _gva: Gva) -> Result<bool, Infallible> {
        self.refs += 1;
        Ok(self.h.cmpxchg_u64(Hpa(gpa.0), old, new))
    }
}

/// Translates `gpa` through AMD nested page tables.
///
/// The nested tables use the 64-bit paging format under
/// [`NptConfig::paging_state`] (reserved bits, NX, 1 GiB pages as in 4/5-level
/// paging), every access is a user access, and A/D flags are always updated.
/// Guest paging-structure accesses (`acc.paging_structure`) are treated as
/// user *writes*, as KVM's nested walker does (`nested_access =
/// PFERR_WRITE_MASK | PFERR_USER_MASK` when A/D bits exist); confidence:
/// medium — the APM's wording on this was not re-checked.
///
/// A failure is [`TdpExit::Npf`] with the `#PF`-style error code (P/W/U/RSVD/ID,
/// ID when fetching with NX enabled) plus [`NPF_GUEST_FINAL`] (bit 32) for the
/// final guest-physical address or [`NPF_GUEST_PAGE`] (bit 33) for a guest
/// page-table access (bit positions as in KVM's `PFERR_GUEST_FINAL_MASK` /
/// `PFERR_GUEST_PAGE_MASK`; confidence: high).
pub fn npt_walk<H: HostPhys>(h: &H, cfg: &NptConfig, gpa: Gpa, acc: &EptAccess) -> Result<EptTranslation, TdpExit> {
    let st = cfg.paging_state();
    let kind = if acc.paging_structure { AccessKind::Write } else { acc.kind };
    let access = Access::new(kind, 3);
    // Only the bits the table depth translates select entries; keep the
    // address canonical so the long-mode walker accepts it.
    let va_mask = (1u64 << st.mode().va_bits()) - 1;
    let mut tables = NptTables { h, refs: 0 };
    let res = walk(&mut tables, &st, Gva(gpa.0 & va_mask), &access, WalkOptions::ARCH, &mut NoObserver);
    let refs = tables.refs;
    match res {
        Ok(t) => Ok(EptTranslation {
            hpa: Hpa(t.gpa.0),
            size: t.size,
            level: t.level,
            r: true,
            w: t.perms.writable,
            x: !t.perms.nx,
            dirty: t.perms.dirty,
            dirtied: false,
            refs,
        }),
        Err(WalkError::PageFault(ec)) => Err(TdpExit::Npf {
            gpa,
            error_code: u64::from(ec.0) | if acc.paging_structure { NPF_GUEST_PAGE } else { NPF_GUEST_FINAL },
        }),
        Err(WalkError::Contended) => Err(TdpExit::Contended { gpa }),
        Err(WalkError::NonCanonical) => unreachable_noncanonical(gpa),
        Err(WalkError::Mem(never)) => match never {},
    }
}

/// The masked address is always canonical; should the impossible happen,
/// report a not-present NPF rather than panic.
#[cold]
fn unreachable_noncanonical(gpa: Gpa) -> Result<EptTranslation, TdpExit> {
    Err(TdpExit::Npf { gpa, error_code: NPF_GUEST_FINAL })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::VecMem;
    use crate::testutil::{HostTables, EPT_RWX, EPT_WB};

    const GPA: u64 = 0x0000_1234_5678_9abc & 0x0000_ffff_ffff_ffff;

    struct Ept {
        t: HostTables,
        cfg: EptConfig,
        at: [u64; 5],
    }

    /// `GPA` mapped to host 0x40_0000 (page base, aligned to the leaf size) with a
    /// leaf at `leaf_level`, all entries RWX + WB on the leaf.
    fn ept(levels: u8, leaf_level: u8) -> Ept {
        let mut t = HostTables::new(0x10_0000);
        let root = t.alloc();
        let target = 0x4000_0000u64;
        let at = t.map(root, levels, GPA, target, leaf_level, EPT_RWX, EPT_RWX | EPT_WB);
        let mut cfg = EptConfig::new(Hpa(root));
        cfg.levels = levels;
        Ept { t, cfg, at }
    }

    impl Ept {
        fn get(&self, level: u8) -> u64 {
            self.t.mem.load_u64(self.at[usize::from(level - 1)]).unwrap()
        }
        fn put(&self, level: u8, v: u64) {
            self.t.mem.store_u64(self.at[usize::from(level - 1)], v).unwrap();
        }
        fn or(&self, level: u8, b: u64) {
            self.put(level, self.get(level) | b);
        }
        fn clear(&self, level: u8, b: u64) {
            self.put(level, self.get(level) & !b);
        }
        fn go(&self, acc: EptAccess) -> Result<EptTranslation, TdpExit> {
            ept_walk(&self.t.mem, &self.cfg, Gpa(GPA), &acc)
        }
        fn read(&self) -> Result<EptTranslation, TdpExit> {
            self.go(EptAccess::final_gpa(AccessKind::Read, Some(Gva(0x7000))))
        }
    }

    fn qual(r: Result<EptTranslation, TdpExit>) -> u64 {
        match r {
            Err(TdpExit::EptViolation { qualification, gpa, .. }) => {
                assert_eq!(gpa, Gpa(GPA));
                qualification.0
            }
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    fn misconfig(r: Result<EptTranslation, TdpExit>) -> bool {
        matches!(r, Err(TdpExit::EptMisconfig { gpa }) if gpa == Gpa(GPA))
    }

    #[test]
    fn translates_every_page_size_and_depth() {
        for (levels, leaf, size, refs) in [
            (4, 1, PageSize::Size4K, 4),
            (4, 2, PageSize::Size2M, 3),
            (4, 3, PageSize::Size1G, 2),
            (5, 1, PageSize::Size4K, 5),
            (5, 3, PageSize::Size1G, 3),
        ] {
            let e = ept(levels, leaf);
            let t = e.read().unwrap();
            assert_eq!(t.size, size);
            assert_eq!(t.level, leaf);
            assert_eq!(t.hpa, Hpa(0x4000_0000 | (GPA & size.offset_mask())));
            assert_eq!((t.r, t.w, t.x, t.dirty), (true, true, true, true));
            assert_eq!(t.refs, refs, "levels {levels} leaf {leaf}");
        }
    }

    #[test]
    fn permissions_are_anded_over_levels() {
        let e = ept(4, 1);
        e.clear(3, EptEntry::EXEC);
        e.clear(1, EptEntry::WRITE);
        let t = e.read().unwrap();
        assert_eq!((t.r, t.w, t.x), (true, false, false));
        let gva = Some(Gva(0x7000));
        let q = qual(e.go(EptAccess::final_gpa(AccessKind::Write, gva)));
        assert_eq!(q, 0b10 | 0b1000 | 0x80 | 0x100);
        let q = qual(e.go(EptAccess::final_gpa(AccessKind::Fetch, gva)));
        assert_eq!(q, 0b100 | 0b1000 | 0x180);
    }

    #[test]
    fn not_present_violation_at_every_level() {
        for level in 1..=4 {
            let e = ept(4, 1);
            e.put(level, 0xfff0_0000_0000_0000 | EptEntry::HUGE | (7 << 3)); // garbage, R/W/X clear
            let q = qual(e.read());
            assert_eq!(q, 0b1 | 0x180, "level {level}: bits 3-5 are 0");
            let q = qual(e.go(EptAccess::final_gpa(AccessKind::Fetch, None)));
            assert_eq!(q, 0b100, "no gva: bits 7/8 clear");
        }
    }

    #[test]
    fn qualification_bits_7_and_8() {
        let e = ept(4, 1);
        e.clear(1, EptEntry::READ | EptEntry::WRITE);
        let gva = Gva(0x1234);
        let walk_read = EptAccess::guest_table(AccessKind::Read, gva);
        let q = qual(e.go(walk_read));
        assert_eq!(q, 0b1 | 0b100000 | 0x80, "paging-structure access: bit 8 clear");
        let q = qual(e.go(EptAccess::final_gpa(AccessKind::Read, Some(gva))));
        assert_eq!(q, 0b1 | 0b100000 | 0x180);
        match e.go(EptAccess::final_gpa(AccessKind::Read, Some(gva))) {
            Err(TdpExit::EptViolation { gva: g, .. }) => assert_eq!(g, Some(gva)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn execute_only() {
        let e = ept(4, 1);
        e.put(1, (e.get(1) & !7) | EptEntry::EXEC);
        let t = e.go(EptAccess::final_gpa(AccessKind::Fetch, None)).unwrap();
        assert_eq!((t.r, t.w, t.x), (false, false, true));
        assert_eq!(qual(e.go(EptAccess::final_gpa(AccessKind::Read, None))), 0b1 | 0b100000);
        let mut e = e;
        e.cfg.execute_only = false;
        assert!(misconfig(e.read()));
    }

    #[test]
    fn misconfigurations() {
        let bit = |n: u32| 1u64 << n;
        // (levels, leaf level, level to change, new R/W/X or None, bits to OR, misconfig?)
        type Case = (u8, u8, u8, Option<u64>, u64, bool);
        let mut cases: Vec<Case> = vec![
            (4, 1, 1, Some(0b010), 0, true),                                         // W only
            (4, 1, 3, Some(0b110), 0, true),                                         // W+X, no R
            (4, 1, 4, Some(0b010), 0, true),                                         // W only, non-leaf
            (4, 1, 1, Some(0b011), 0, false),                                        // RW fine
            (4, 1, 1, Some(0b001), 0, false),                                        // R only fine
            (4, 1, 1, Some(0b101), 0, false),                                        // RX fine
            (4, 1, 1, None, EptEntry::HUGE, false),                                  // PTE bit 7 ignored
            (4, 1, 1, None, bit(10) | bit(11) | bit(52) | bit(62) | bit(63), false), // ignored/user-exec/SVE
            (4, 1, 4, None, bit(8) | bit(10) | bit(11), false),
            (4, 3, 3, None, bit(30), false), // 1G address bit
            (4, 2, 2, None, bit(21), false), // 2M address bit
            (4, 2, 2, None, EptEntry::IGNORE_PAT, false),
        ];
        for b in 3..=7 {
            cases.push((4, 1, 4, None, bit(b), true)); // PML4E 7:3
            cases.push((5, 1, 5, None, bit(b), true)); // PML5E 7:3
            cases.push((5, 1, 4, None, bit(b), true));
        }
        for b in 3..=6 {
            cases.push((4, 1, 3, None, bit(b), true)); // non-leaf PDPTE 6:3
            cases.push((4, 1, 2, None, bit(b), true)); // non-leaf PDE 6:3
        }
        for b in 12..=29 {
            cases.push((4, 3, 3, None, bit(b), true)); // 1G leaf address 29:12
        }
        for b in 12..=20 {
            cases.push((4, 2, 2, None, bit(b), true)); // 2M leaf address 20:12
        }
        for level in 1..=4 {
            cases.push((4, 1, level, None, bit(46), true)); // >= MAXPHYADDR
            cases.push((4, 1, level, None, bit(51), true));
            cases.push((4, 1, level, None, bit(45), false));
        }
        for (levels, leaf, level, rwx, or, want) in cases {
            let e = ept(levels, leaf);
            if let Some(rwx) = rwx {
                e.put(level, (e.get(level) & !7) | rwx);
            }
            e.or(level, or);
            let res = e.go(EptAccess::final_gpa(AccessKind::Read, None));
            assert_eq!(
                misconfig(res),
                want,
                "levels {levels} leaf {leaf} level {level} rwx {rwx:?} or {or:#x}: {res:?}"
            );
        }
    }

    #[test]
    fn memtype_on_leaves() {
        for leaf in 1..=3 {
            for mt in 0..8u64 {
                let e = ept(4, leaf);
                e.put(leaf, (e.get(leaf) & !(7 << 3)) | (mt << 3));
                let bad = matches!(mt, 2 | 3 | 7);
                assert_eq!(misconfig(e.read()), bad, "leaf {leaf} memtype {mt}");
            }
        }
    }

    #[test]
    fn gbpages_required_for_1g_leaves() {
        let mut e = ept(4, 3);
        assert!(e.read().is_ok());
        e.cfg.gbpages = false;
        assert!(misconfig(e.read()));
    }

    #[test]
    fn smaller_maxphyaddr() {
        let mut e = ept(4, 1);
        e.cfg.maxphyaddr = 36;
        e.or(2, 1 << 36);
        assert!(misconfig(e.read()));
        e.clear(2, 1 << 36);
        e.or(2, 1 << 35);
        assert!(!misconfig(e.read()));
    }

    #[test]
    fn misconfig_beats_permission_violation() {
        let e = ept(4, 1);
        e.clear(1, EptEntry::WRITE);
        e.or(1, 3 << 3); // memtype 3 (with WB bits: 6|3 = 7)
        assert!(misconfig(e.go(EptAccess::final_gpa(AccessKind::Write, None))));
    }

    // ------------------------------------------------------------ A/D

    fn ad(levels: u8, leaf: u8) -> Ept {
        let mut e = ept(levels, leaf);
        e.cfg.ad_enabled = true;
        e
    }

    #[test]
    fn ad_disabled_writes_nothing() {
        let e = ept(4, 1);
        let t = e.go(EptAccess::final_gpa(AccessKind::Write, None)).unwrap();
        assert!(t.dirty);
        for l in 1..=4 {
            assert_eq!(e.get(l) & (EptEntry::ACCESSED | EptEntry::DIRTY), 0);
        }
    }

    #[test]
    fn accessed_on_all_dirty_on_leaf_for_writes() {
        for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
            let e = ad(4, 1);
            let t = e.go(EptAccess::final_gpa(kind, None)).unwrap();
            let write = kind == AccessKind::Write;
            for l in 1..=4 {
                assert_ne!(e.get(l) & EptEntry::ACCESSED, 0, "{kind} level {l}");
            }
            assert_eq!(e.get(1) & EptEntry::DIRTY != 0, write);
            for l in 2..=4 {
                assert_eq!(e.get(l) & EptEntry::DIRTY, 0);
            }
            assert_eq!(t.dirty, write);
            assert_eq!(t.refs, 4 + 4, "reads plus A updates");
            // Second walk: nothing left to update.
            let t2 = e.go(EptAccess::final_gpa(kind, None)).unwrap();
            assert_eq!(t2.refs, 4);
            assert_eq!(t2.dirty, write);
        }
    }

    #[test]
    fn ad_on_large_leaf() {
        let e = ad(4, 2);
        e.go(EptAccess::final_gpa(AccessKind::Write, None)).unwrap();
        let m = EptEntry::ACCESSED | EptEntry::DIRTY;
        assert_eq!(e.get(2) & m, m);
        assert_eq!(e.get(3) & m, EptEntry::ACCESSED);
    }

    #[test]
    fn no_ad_on_violation() {
        let e = ad(4, 1);
        e.clear(1, EptEntry::WRITE);
        assert!(e.go(EptAccess::final_gpa(AccessKind::Write, None)).is_err());
        for l in 1..=4 {
            assert_eq!(e.get(l) & EptEntry::ACCESSED, 0);
        }
    }

    #[test]
    fn guest_paging_structure_accesses_are_writes_with_ad() {
        let e = ad(4, 1);
        let gva = Gva(0xabc000);
        let t = e.go(EptAccess::guest_table(AccessKind::Read, gva)).unwrap();
        assert!(t.dirty);
        assert_ne!(e.get(1) & EptEntry::DIRTY, 0);
        // A read-only guest page table: violation with both R and W access bits.
        e.clear(1, EptEntry::WRITE);
        let q = qual(e.go(EptAccess::guest_table(AccessKind::Read, gva)));
        assert_eq!(q, 0b11 | 0b101000 | 0x80);
        // Without A/D it is a plain read.
        let mut e = e;
        e.cfg.ad_enabled = false;
        assert!(e.go(EptAccess::guest_table(AccessKind::Read, gva)).is_ok());
    }

    struct AlwaysRacing<'a>(&'a VecMem);

    impl HostPhys for AlwaysRacing<'_> {
        fn read_u64(&self, hpa: Hpa) -> u64 {
            self.0.read_u64(hpa)
        }
        fn cmpxchg_u64(&self, _: Hpa, _: u64, _: u64) -> bool {
            false
        }
    }

    #[test]
    fn ad_race_is_bounded() {
        let e = ad(4, 1);
        let res = ept_walk(&AlwaysRacing(&e.t.mem), &e.cfg, Gpa(GPA), &EptAccess::final_gpa(AccessKind::Read, None));
        assert_eq!(res, Err(TdpExit::Contended { gpa: Gpa(GPA) }));
    }

    #[test]
    fn qualification_display() {
        assert_eq!(EptQual(0x1ab).to_string(), "R|W|r|x|gva|final");
        assert_eq!(EptQual(0).to_string(), "");
        assert_eq!(EptQual(1 << 12).to_string(), "0x1000");
    }

    // ------------------------------------------------------------ NPT

    const NP_P: u64 = 1;
    const NP_RW: u64 = 2;
    const NP_US: u64 = 4;
    const NP_A: u64 = 1 << 5;
    const NP_D: u64 = 1 << 6;

    struct Npt {
        t: HostTables,
        cfg: NptConfig,
        at: [u64; 5],
    }

    fn npt(levels: u8, leaf: u8) -> Npt {
        let mut t = HostTables::new(0x10_0000);
        let root = t.alloc();
        let f = NP_P | NP_RW | NP_US;
        let at = t.map(root, levels, GPA, 0x4000_0000, leaf, f, f);
        let mut cfg = NptConfig::new(Hpa(root));
        cfg.levels = levels;
        Npt { t, cfg, at }
    }

    impl Npt {
        fn get(&self, level: u8) -> u64 {
            self.t.mem.load_u64(self.at[usize::from(level - 1)]).unwrap()
        }
        fn put(&self, level: u8, v: u64) {
            self.t.mem.store_u64(self.at[usize::from(level - 1)], v).unwrap();
        }
        fn go(&self, acc: EptAccess) -> Result<EptTranslation, TdpExit> {
            npt_walk(&self.t.mem, &self.cfg, Gpa(GPA), &acc)
        }
    }

    fn npf(r: Result<EptTranslation, TdpExit>) -> u64 {
        match r {
            Err(TdpExit::Npf { gpa, error_code }) => {
                assert_eq!(gpa, Gpa(GPA));
                error_code
            }
            other => panic!("expected NPF, got {other:?}"),
        }
    }

    #[test]
    fn npt_translates_and_sets_ad() {
        for (levels, leaf) in [(4, 1), (4, 2), (4, 3), (5, 1)] {
            let n = npt(levels, leaf);
            let t = n.go(EptAccess::final_gpa(AccessKind::Write, None)).unwrap();
            let size = PageSize::for_level(leaf);
            assert_eq!(t.hpa, Hpa(0x4000_0000 | (GPA & size.offset_mask())));
            assert_eq!((t.r, t.w, t.x, t.dirty), (true, true, true, true));
            let walked = u32::from(levels - leaf + 1);
            assert_eq!(t.refs, 2 * walked, "reads + A/D updates");
            assert_eq!(n.get(leaf) & (NP_A | NP_D), NP_A | NP_D);
        }
    }

    #[test]
    fn npt_faults() {
        let fin = NPF_GUEST_FINAL;
        let page = NPF_GUEST_PAGE;
        let n = npt(4, 1);
        n.put(1, 0);
        // Not present: P=0, U always set.
        assert_eq!(npf(n.go(EptAccess::final_gpa(AccessKind::Read, None))), fin | 0b100);
        // Guest page-table accesses are user writes.
        let acc = EptAccess::guest_table(AccessKind::Read, Gva(0));
        assert_eq!(npf(n.go(acc)), page | 0b110);
        // Read-only: protection fault on write.
        n.put(1, 0x4000_0000 | NP_P | NP_US);
        assert!(n.go(EptAccess::final_gpa(AccessKind::Read, None)).is_ok());
        assert_eq!(npf(n.go(EptAccess::final_gpa(AccessKind::Write, None))), fin | 0b111);
        // Supervisor-only nested entries fault (every access is a user access).
        n.put(1, 0x4000_0000 | NP_P | NP_RW);
        assert_eq!(npf(n.go(EptAccess::final_gpa(AccessKind::Read, None))), fin | 0b101);
        // NX: fetch faults with ID.
        n.put(1, 0x4000_0000 | NP_P | NP_RW | NP_US | (1 << 63));
        assert_eq!(npf(n.go(EptAccess::final_gpa(AccessKind::Fetch, None))), fin | 0b10101);
        // Reserved bit.
        n.put(1, 0x4000_0000 | NP_P | NP_RW | NP_US | (1 << 50));
        assert_eq!(npf(n.go(EptAccess::final_gpa(AccessKind::Read, None))), fin | 0b1101);
        // NX without host NXE is reserved.
        let mut n = n;
        n.cfg.nxe = false;
        n.put(1, 0x4000_0000 | NP_P | NP_RW | NP_US | (1 << 63));
        assert_eq!(npf(n.go(EptAccess::final_gpa(AccessKind::Read, None))), fin | 0b1101);
    }
}
