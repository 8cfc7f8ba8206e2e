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
        assert_eq!(misconfig(res), want, "levels {levels} leaf {leaf} level {level} rwx {rwx:?} or {or:#x}: {res:?}");
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
