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
mod tests;
