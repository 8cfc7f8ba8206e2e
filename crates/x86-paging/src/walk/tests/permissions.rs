//! Permission checks against an independent oracle, and protection keys.

use super::*;

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
