//! SPTEs: the entries of the MMU's own page tables (EPT, NPT or shadow), with KVM's software
//! bits, and the functions that build them (`make_spte`, `make_nonleaf_spte`,
//! `make_mmio_spte`, access tracking).
//!
//! Which hardware bits mean what depends on the table format, so the masks live in
//! [`SpteMasks`], set once per VM as KVM sets its `shadow_*_mask` globals.

use x86_paging::addr::{Gfn, Hpa, Pfn};

/// ACC_EXEC_MASK.
pub const ACC_EXEC: u8 = 1;
/// ACC_WRITE_MASK.
pub const ACC_WRITE: u8 = 2;
/// ACC_USER_MASK.
pub const ACC_USER: u8 = 4;
/// ACC_ALL.
pub const ACC_ALL: u8 = ACC_EXEC | ACC_WRITE | ACC_USER;

/// Bit 11: the software "shadow-present" bit (`SPTE_MMU_PRESENT_MASK`).
pub const SPTE_MMU_PRESENT: u64 = 1 << 11;
/// The value of a non-present SPTE (`SHADOW_NONPRESENT_VALUE`): bit 63, which in an EPT
/// entry suppresses #VE.
pub const SHADOW_NONPRESENT_VALUE: u64 = 1 << 63;
/// A SPTE frozen while it is being changed (`FROZEN_SPTE`): walkers that see it retry.
pub const FROZEN_SPTE: u64 = SHADOW_NONPRESENT_VALUE | 0x5a0;
/// SPTE bits 12..51: the pfn.
pub const SPTE_BASE_ADDR_MASK: u64 = ((1 << 52) - 1) & !0xfff;
/// Writable (bit 1 in both formats).
pub const PT_WRITABLE: u64 = 1 << 1;
/// Page size (bit 7 in both formats).
pub const PT_PAGE_SIZE: u64 = 1 << 7;
/// A/D type field, bits 52..53 (TDP only).
pub const SPTE_TDP_AD_MASK: u64 = 3 << 52;
/// A/D type: enabled.
pub const SPTE_TDP_AD_ENABLED: u64 = 0;
/// A/D type: disabled (access tracking instead).
pub const SPTE_TDP_AD_DISABLED: u64 = 1 << 52;
/// Saved R/X bits of an access-tracked SPTE live here (`SHADOW_ACC_TRACK_SAVED_BITS_SHIFT`).
pub const ACC_TRACK_SAVED_SHIFT: u32 = 54;
/// The saved bits (R and X) before shifting.
pub const ACC_TRACK_SAVED_MASK: u64 = 0x5;
/// MMIO generation: 19 bits, 0..7 in SPTE bits 3..10 and 8..18 in bits 52..62.
pub const MMIO_SPTE_GEN_MASK: u64 = (1 << 19) - 1;

// EPT bits.
const EPT_R: u64 = 1;
const EPT_W: u64 = 1 << 1;
const EPT_X: u64 = 1 << 2;
const EPT_RWX: u64 = 7;
const EPT_MT_WB: u64 = 6 << 3;
const EPT_IPAT: u64 = 1 << 6;
const EPT_A: u64 = 1 << 8;
const EPT_D: u64 = 1 << 9;
const EPT_SUPPRESS_VE: u64 = 1 << 63;
const EPT_HOST_WRITABLE: u64 = 1 << 57;
const EPT_MMU_WRITABLE: u64 = 1 << 58;
// 64-bit paging (NPT, shadow) bits.
const PT_P: u64 = 1;
const PT_U: u64 = 1 << 2;
const PT_A: u64 = 1 << 5;
const PT_D: u64 = 1 << 6;
const PT_NX: u64 = 1 << 63;
const HOST_WRITABLE: u64 = 1 << 9;
const MMU_WRITABLE: u64 = 1 << 10;

/// The table format's meaning of each SPTE bit (KVM's `shadow_*_mask` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpteMasks {
    /// EPT format (else 64-bit paging format: NPT or shadow).
    pub ept: bool,
    /// Hardware A/D bits are used (`kvm_ad_enabled`).
    pub ad_enabled: bool,
    /// `shadow_present_mask`.
    pub present: u64,
    /// `shadow_user_mask` (EPT: R; else U).
    pub user: u64,
    /// `shadow_x_mask` (EPT: X).
    pub x: u64,
    /// `shadow_nx_mask` (non-EPT: NX).
    pub nx: u64,
    /// `shadow_accessed_mask` (0 when A/D are disabled).
    pub accessed: u64,
    /// `shadow_dirty_mask` (0 when A/D are disabled).
    pub dirty: u64,
    /// `shadow_host_writable_mask`.
    pub host_writable: u64,
    /// `shadow_mmu_writable_mask`.
    pub mmu_writable: u64,
    /// `shadow_acc_track_mask` (EPT: RWX).
    pub acc_track: u64,
    /// Memory type bits of a leaf (EPT: WB | IPAT).
    pub memtype: u64,
    /// `shadow_mmio_value`.
    pub mmio_value: u64,
    /// `shadow_mmio_mask`.
    pub mmio_mask: u64,
    /// `shadow_mmio_access_mask`.
    pub mmio_access: u64,
}

impl SpteMasks {
    /// EPT masks (`kvm_mmu_set_ept_masks`), with or without EPT A/D bits.
    pub fn ept(ad_enabled: bool) -> Self {
        SpteMasks {
            ept: true,
            ad_enabled,
            present: EPT_R | EPT_SUPPRESS_VE,
            user: EPT_R,
            x: EPT_X,
            nx: 0,
            accessed: if ad_enabled { EPT_A } else { 0 },
            dirty: if ad_enabled { EPT_D } else { 0 },
            host_writable: EPT_HOST_WRITABLE,
            mmu_writable: EPT_MMU_WRITABLE,
            acc_track: EPT_RWX,
            memtype: EPT_MT_WB | EPT_IPAT,
            mmio_value: EPT_W | EPT_X,
            mmio_mask: EPT_RWX | EPT_SUPPRESS_VE,
            mmio_access: 0,
        }
    }

    /// Masks for the 64-bit paging format: NPT and shadow paging
    /// (`kvm_mmu_reset_all_pte_masks`). MMIO SPTEs use reserved bit 51.
    pub fn x86_64() -> Self {
        SpteMasks {
            ept: false,
            ad_enabled: true,
            present: PT_P,
            user: PT_U,
            x: 0,
            nx: PT_NX,
            accessed: PT_A,
            dirty: PT_D,
            host_writable: HOST_WRITABLE,
            mmu_writable: MMU_WRITABLE,
            acc_track: 0,
            memtype: 0,
            mmio_value: (1 << 51) | PT_P,
            mmio_mask: (1 << 51) | PT_P,
            mmio_access: (ACC_WRITE | ACC_USER) as u64,
        }
    }
}

/// A SPTE value.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct Spte(pub u64);

impl std::fmt::Debug for Spte {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Spte({:#x})", self.0)
    }
}

impl Spte {
    /// The non-present value.
    pub const NONPRESENT: Spte = Spte(SHADOW_NONPRESENT_VALUE);

    /// `is_shadow_present_pte`.
    #[inline]
    pub fn is_shadow_present(self) -> bool {
        self.0 & SPTE_MMU_PRESENT != 0
    }

    /// `is_large_pte`.
    #[inline]
    pub fn is_large(self) -> bool {
        self.0 & PT_PAGE_SIZE != 0
    }

    /// `is_last_spte`: a leaf at `level`.
    #[inline]
    pub fn is_last(self, level: u8) -> bool {
        level == 1 || self.is_large()
    }

    /// `is_frozen_spte`.
    #[inline]
    pub fn is_frozen(self) -> bool {
        self.0 == FROZEN_SPTE
    }

    /// The pfn (leaf) or child table (non-leaf).
    #[inline]
    pub fn pfn(self) -> Pfn {
        Pfn::new((self.0 & SPTE_BASE_ADDR_MASK) >> 12)
    }

    /// The child table's address (non-leaf).
    #[inline]
    pub fn child(self) -> Hpa {
        Hpa::new(self.0 & SPTE_BASE_ADDR_MASK)
    }

    /// `is_writable_pte`.
    #[inline]
    pub fn is_writable(self) -> bool {
        self.0 & PT_WRITABLE != 0
    }

    /// `is_mmu_writable_spte`.
    #[inline]
    pub fn is_mmu_writable(self, m: &SpteMasks) -> bool {
        self.0 & m.mmu_writable != 0
    }

    /// `is_executable_pte`.
    #[inline]
    pub fn is_executable(self, m: &SpteMasks) -> bool {
        (self.0 & (m.x | m.nx)) == m.x
    }

    /// Whether the SPTE uses A/D bits (`spte_ad_enabled`).
    #[inline]
    pub fn ad_enabled(self, m: &SpteMasks) -> bool {
        !m.ept || self.0 & SPTE_TDP_AD_MASK != SPTE_TDP_AD_DISABLED
    }

    /// `is_access_track_spte`: made non-present by aging without A/D bits.
    #[inline]
    pub fn is_access_track(self, m: &SpteMasks) -> bool {
        !self.ad_enabled(m) && self.0 & m.acc_track == 0
    }

    /// `is_accessed_spte`.
    #[inline]
    pub fn is_accessed(self, m: &SpteMasks) -> bool {
        if self.ad_enabled(m) {
            self.0 & m.accessed != 0
        } else {
            !self.is_access_track(m)
        }
    }

    /// `is_mmio_spte`.
    #[inline]
    pub fn is_mmio(self, m: &SpteMasks) -> bool {
        self.0 & m.mmio_mask == m.mmio_value
    }

    /// The generation stored in an MMIO SPTE.
    pub fn mmio_gen(self) -> u64 {
        ((self.0 >> 3) & 0xff) | (((self.0 >> 52) & 0x7ff) << 8)
    }

    /// The gfn stored in an MMIO SPTE.
    pub fn mmio_gfn(self, m: &SpteMasks) -> Gfn {
        let addr_mask = SPTE_BASE_ADDR_MASK & !m.mmio_mask & !(0x7ff << 52);
        Gfn::new((self.0 & addr_mask) >> 12)
    }

    /// The access bits stored in an MMIO SPTE.
    pub fn mmio_access(self, m: &SpteMasks) -> u8 {
        crate::num::low8(self.0 & m.mmio_access)
    }
}

/// Everything `make_spte` needs to know.
#[derive(Debug, Clone, Copy)]
pub struct SpteRequest {
    /// Level of the leaf (1 = 4 KiB).
    pub level: u8,
    /// Frame to map (for a huge page, the first frame).
    pub pfn: Pfn,
    /// ACC_* rights.
    pub access: u8,
    /// A prefetched (not accessed) mapping.
    pub prefetch: bool,
    /// Being rebuilt by sync (keeps A).
    pub synchronizing: bool,
    /// The host maps the page writable.
    pub host_writable: bool,
    /// The NX huge page mitigation is on: huge pages are never executable.
    pub nx_huge_pages: bool,
    /// The shadow page holding the SPTE has A/D disabled.
    pub ad_disabled: bool,
}

/// `make_spte` for a leaf; `wrprot` (the second value) says that write access was requested
/// but withheld. `try_unsync` is asked whether the gfn may be mapped writable (the shadow
/// MMU's `mmu_try_to_unsync_pages`); the TDP MMU always says yes.
pub fn make_spte(m: &SpteMasks, r: &SpteRequest, old: Spte, try_unsync: impl FnOnce() -> bool) -> (Spte, bool) {
    let mut spte = SPTE_MMU_PRESENT | m.present;
    if m.ept {
        spte |= if r.ad_disabled || !m.ad_enabled { SPTE_TDP_AD_DISABLED } else { SPTE_TDP_AD_ENABLED };
    }
    if !r.prefetch || r.synchronizing {
        spte |= m.accessed;
    }
    let mut access = r.access;
    if r.level > 1 && r.nx_huge_pages {
        access &= !ACC_EXEC;
    }
    if access & ACC_EXEC != 0 {
        spte |= m.x;
    } else {
        spte |= m.nx;
    }
    if access & ACC_USER != 0 {
        spte |= m.user;
    }
    if r.level > 1 {
        spte |= PT_PAGE_SIZE;
    }
    spte |= m.memtype;
    if r.host_writable {
        spte |= m.host_writable;
    } else {
        access &= !ACC_WRITE;
    }
    spte |= r.pfn.hpa().raw();
    let mut wrprot = false;
    if access & ACC_WRITE != 0 {
        spte |= PT_WRITABLE | m.mmu_writable;
        if !Spte(old.0).is_writable() && !try_unsync() {
            wrprot = true;
            access &= !ACC_WRITE;
            spte &= !(PT_WRITABLE | m.mmu_writable);
        }
    }
    if access & ACC_WRITE != 0 {
        spte |= m.dirty;
    }
    let mut s = Spte(spte);
    if r.prefetch && !r.synchronizing {
        s = mark_spte_for_access_track(m, s);
    }
    (s, wrprot)
}

/// `make_nonleaf_spte`: a link to a child table.
pub fn make_nonleaf_spte(m: &SpteMasks, child: Hpa, ad_disabled: bool) -> Spte {
    let mut spte = SPTE_MMU_PRESENT | child.raw() | m.present | PT_WRITABLE | m.user | m.x;
    if m.ept && (ad_disabled || !m.ad_enabled) {
        spte |= SPTE_TDP_AD_DISABLED;
    } else {
        spte |= m.accessed;
    }
    Spte(spte)
}

/// `make_small_spte`: child `index` of a huge SPTE being split into a table at `level - 1`.
pub fn make_small_spte(m: &SpteMasks, huge: Spte, level: u8, index: u64, nx_huge_pages: bool) -> Spte {
    let child_level = level - 1;
    let pages = 1u64 << (9 * u32::from(child_level - 1));
    let mut s = huge.0 + ((index * pages) << 12);
    if child_level == 1 {
        s &= !PT_PAGE_SIZE;
        // Huge pages lose X under the NX mitigation; a 4 KiB piece may execute again.
        if nx_huge_pages {
            return make_spte_executable(m, Spte(s));
        }
    }
    Spte(s)
}

/// `make_huge_spte`: the level-`level` SPTE for the huge page that `small` (a present leaf
/// inside it) belongs to — the same permissions and state, the huge bit, the address aligned
/// to the level; not executable under the NX mitigation.
pub fn make_huge_spte(m: &SpteMasks, small: Spte, level: u8, nx_huge_pages: bool) -> Spte {
    debug_assert!(level > 1 && small.is_shadow_present(), "make_huge_spte: {small:?} at level {level}");
    let size = 1u64 << (12 + 9 * u32::from(level - 1));
    let s = Spte((small.0 | PT_PAGE_SIZE) & (!(size - 1) | 0xfff));
    if nx_huge_pages {
        modify_spte_protections(m, s, m.nx, m.x)
    } else {
        s
    }
}

/// `modify_spte_protections`: sets and clears permission bits of a leaf SPTE. An
/// access-tracked SPTE keeps its R/X in the saved bits, so it is restored, changed and
/// marked again — setting X on the live bits would leave an SPTE that is neither
/// access-tracked nor valid (X with saved R: a later W gives W without R, a misconfiguration).
pub fn modify_spte_protections(m: &SpteMasks, spte: Spte, set: u64, clear: u64) -> Spte {
    debug_assert_eq!(set & clear, 0, "modify_spte_protections: {set:#x} both set and cleared");
    let tracked = spte.is_access_track(m);
    let mut s = if tracked { restore_acc_track_spte(spte) } else { spte };
    s = Spte((s.0 | set) & !clear);
    if tracked {
        s = mark_spte_for_access_track(m, s);
    }
    s
}

/// `make_spte_executable`.
pub fn make_spte_executable(m: &SpteMasks, spte: Spte) -> Spte {
    modify_spte_protections(m, spte, m.x, m.nx)
}

/// `make_mmio_spte`: a non-present SPTE that faults as "reserved" / EPT misconfiguration and
/// carries the gfn, the access and the memslot generation.
pub fn make_mmio_spte(m: &SpteMasks, gfn: Gfn, access: u8, gen: u64) -> Spte {
    let gen = gen & MMIO_SPTE_GEN_MASK;
    let gen_bits = ((gen & 0xff) << 3) | ((gen >> 8) << 52);
    Spte(gen_bits | m.mmio_value | (u64::from(access) & m.mmio_access) | gfn.gpa().raw())
}

/// `mark_spte_for_access_track`: clear A; without A/D bits, save R/X and make the SPTE
/// non-present to hardware.
pub fn mark_spte_for_access_track(m: &SpteMasks, spte: Spte) -> Spte {
    if spte.ad_enabled(m) {
        return Spte(spte.0 & !m.accessed);
    }
    if spte.is_access_track(m) {
        return spte;
    }
    let saved = (spte.0 & ACC_TRACK_SAVED_MASK) << ACC_TRACK_SAVED_SHIFT;
    Spte((spte.0 & !m.acc_track & !(ACC_TRACK_SAVED_MASK << ACC_TRACK_SAVED_SHIFT)) | saved)
}

/// `restore_acc_track_spte`.
pub fn restore_acc_track_spte(spte: Spte) -> Spte {
    let saved = (spte.0 >> ACC_TRACK_SAVED_SHIFT) & ACC_TRACK_SAVED_MASK;
    Spte((spte.0 & !(ACC_TRACK_SAVED_MASK << ACC_TRACK_SAVED_SHIFT)) | saved)
}

/// The text of the `kvm_mmu_set_spte` tracepoint (mmutrace.h): the SPTE and its R/W/X/U
/// view; the U column is empty in formats without a user bit (EPT).
pub fn set_spte_trace(m: &SpteMasks, gfn: Gfn, spte: Spte, level: u8, sptep: Hpa) -> String {
    let u = if m.user == 0 {
        ""
    } else if spte.0 & m.user != 0 {
        "u"
    } else {
        "-"
    };
    format!(
        "gfn {:x} spte {:x} (r{}{}{}) level {} at {:x}",
        gfn.raw(),
        spte.0,
        if spte.is_writable() { "w" } else { "-" },
        if spte.is_executable(m) { "x" } else { "-" },
        u,
        level,
        sptep.raw()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use x86_paging::entry::EptEntry;

    fn req(level: u8) -> SpteRequest {
        SpteRequest {
            level,
            pfn: Pfn::new(0x2a3f),
            access: ACC_ALL,
            prefetch: false,
            synchronizing: false,
            host_writable: true,
            nx_huge_pages: false,
            ad_disabled: false,
        }
    }

    #[test]
    fn ept_leaf_has_kvm_bits() {
        let m = SpteMasks::ept(true);
        let (s, wrprot) = make_spte(&m, &req(1), Spte::NONPRESENT, || true);
        assert!(!wrprot);
        assert!(s.is_shadow_present() && s.is_writable() && s.is_mmu_writable(&m) && s.is_executable(&m));
        assert_eq!(s.pfn(), Pfn::new(0x2a3f));
        let e = EptEntry(s.0);
        assert!(e.readable() && e.writable() && e.executable() && e.accessed() && e.dirty());
        assert_eq!(e.memtype(), 6);
        assert_eq!(s.0 & (EPT_HOST_WRITABLE | EPT_MMU_WRITABLE), EPT_HOST_WRITABLE | EPT_MMU_WRITABLE);
        assert_eq!(s.0 & SPTE_TDP_AD_MASK, SPTE_TDP_AD_ENABLED);
    }

    #[test]
    fn readonly_host_page_is_not_writable() {
        let m = SpteMasks::ept(true);
        let (s, _) = make_spte(&m, &SpteRequest { host_writable: false, ..req(1) }, Spte::NONPRESENT, || true);
        assert!(!s.is_writable() && !s.is_mmu_writable(&m) && s.0 & EPT_D == 0);
    }

    #[test]
    fn access_tracking_round_trip() {
        let m = SpteMasks::ept(false);
        let (s, _) = make_spte(&m, &req(1), Spte::NONPRESENT, || true);
        assert_eq!(s.0 & SPTE_TDP_AD_MASK, SPTE_TDP_AD_DISABLED);
        let t = mark_spte_for_access_track(&m, s);
        assert!(t.is_access_track(&m) && t.is_shadow_present() && t.0 & EPT_RWX == 0);
        let r = restore_acc_track_spte(t);
        assert_eq!(r.0 | PT_WRITABLE, s.0 | PT_WRITABLE);
        assert!(r.0 & EPT_R != 0 && r.0 & EPT_X != 0);
    }

    #[test]
    fn mmio_spte_round_trip_and_misconfig() {
        for m in [SpteMasks::ept(true), SpteMasks::x86_64()] {
            for gen in [0u64, 1, 0xff, 0x100, 0x7ffff] {
                let s = make_mmio_spte(&m, Gfn::new(0xfee00), ACC_ALL, gen);
                assert!(s.is_mmio(&m) && !s.is_shadow_present());
                assert_eq!(s.mmio_gen(), gen);
                assert_eq!(s.mmio_gfn(&m), Gfn::new(0xfee00));
            }
        }
        // EPT: W+X without R is a misconfiguration to hardware.
        let s = make_mmio_spte(&SpteMasks::ept(true), Gfn::new(5), ACC_ALL, 3);
        assert_eq!(s.0 & 7, 0b110);
        assert!(!Spte::NONPRESENT.is_mmio(&SpteMasks::ept(true)));
        assert!(!Spte::NONPRESENT.is_shadow_present() && !Spte(FROZEN_SPTE).is_shadow_present());
    }

    #[test]
    fn huge_and_split() {
        let m = SpteMasks::x86_64();
        let (h, _) = make_spte(
            &m,
            &SpteRequest { nx_huge_pages: true, pfn: Pfn::new(0x200), ..req(2) },
            Spte::NONPRESENT,
            || true,
        );
        assert!(h.is_large() && !h.is_executable(&m));
        let c = make_small_spte(&m, h, 2, 3, true);
        assert!(!c.is_large() && c.is_executable(&m));
        assert_eq!(c.pfn(), Pfn::new(0x203));
        let n = make_nonleaf_spte(&m, Hpa::new(0x5000), false);
        assert!(n.is_shadow_present() && !n.is_large() && n.child() == Hpa::new(0x5000));
    }

    /// Splitting an access-tracked huge SPTE under the NX mitigation: the 4 KiB children
    /// get X in their saved bits and stay access-tracked (never X next to saved bits, which
    /// a later write would turn into W without R: an EPT misconfiguration).
    #[test]
    fn split_of_access_tracked_huge_spte_stays_access_tracked() {
        let m = SpteMasks::ept(false);
        let (h, _) = make_spte(
            &m,
            &SpteRequest { nx_huge_pages: true, pfn: Pfn::new(0x200), ..req(2) },
            Spte::NONPRESENT,
            || true,
        );
        assert!(h.is_large() && !h.is_executable(&m) && h.0 & EPT_R != 0);
        let t = mark_spte_for_access_track(&m, h);
        assert!(t.is_access_track(&m));
        let c = make_small_spte(&m, t, 2, 7, true);
        assert!(c.is_access_track(&m) && c.0 & EPT_RWX == 0, "child {c:?}");
        assert_eq!(c.pfn(), Pfn::new(0x207));
        let r = restore_acc_track_spte(c);
        assert!(r.0 & EPT_R != 0 && r.is_executable(&m) && !r.is_large(), "restored {r:?}");
        // Not access-tracked: X is simply set.
        let c = make_small_spte(&m, h, 2, 7, true);
        assert!(!c.is_access_track(&m) && c.is_executable(&m) && c.0 & EPT_R != 0);
        assert_eq!(modify_spte_protections(&m, c, 0, m.x), Spte(c.0 & !m.x));
    }
}
