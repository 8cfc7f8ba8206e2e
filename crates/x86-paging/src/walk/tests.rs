use super::*;
use crate::access::AccessKind;
use crate::mem::{OutOfRange, VecMem};
use crate::regs::{Cr0, Efer};
use crate::testutil::{fixture, table, Fix};

mod permissions;

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
    f.mem.store_u32(pt + idx * 4, u32::try_from(0x55_5000 | P | RW | US | A | D).unwrap()).unwrap();
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
