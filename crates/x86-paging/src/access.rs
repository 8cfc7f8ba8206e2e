//! Access kinds, the `#PF` error code and the paging permission rules.

use core::fmt;

use crate::mode::{PagingMode, PagingState};
use crate::regs::{Cr0, Cr4};

/// What an access does with the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum AccessKind {
    /// A data read.
    #[default]
    Read,
    /// A data write (including the write half of a read-modify-write).
    Write,
    /// An instruction fetch.
    Fetch,
}

impl fmt::Display for AccessKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccessKind::Read => "read",
            AccessKind::Write => "write",
            AccessKind::Fetch => "fetch",
        })
    }
}

/// One linear-address access, as the permission rules see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Access {
    /// Read, write or fetch.
    pub kind: AccessKind,
    /// Current privilege level (0..=3); only 3 is user mode.
    pub cpl: u8,
    /// An implicit supervisor-mode access (GDT/LDT/IDT/TSS, shadow stack of the
    /// kernel, ...) made regardless of CPL: it is a supervisor access and
    /// EFLAGS.AC does not override SMAP for it.
    pub implicit_supervisor: bool,
    /// EFLAGS.AC at the time of the access (SMAP override for explicit supervisor accesses).
    pub eflags_ac: bool,
}

impl Access {
    /// An explicit access of `kind` at `cpl`.
    #[inline]
    pub const fn new(kind: AccessKind, cpl: u8) -> Self {
        Access { kind, cpl, implicit_supervisor: false, eflags_ac: false }
    }

    /// An explicit data read at `cpl`.
    #[inline]
    pub const fn read(cpl: u8) -> Self {
        Self::new(AccessKind::Read, cpl)
    }

    /// An explicit data write at `cpl`.
    #[inline]
    pub const fn write(cpl: u8) -> Self {
        Self::new(AccessKind::Write, cpl)
    }

    /// An instruction fetch at `cpl`.
    #[inline]
    pub const fn fetch(cpl: u8) -> Self {
        Self::new(AccessKind::Fetch, cpl)
    }

    /// An implicit supervisor-mode access of `kind` made while at `cpl`.
    #[inline]
    pub const fn implicit(kind: AccessKind, cpl: u8) -> Self {
        Access { kind, cpl, implicit_supervisor: true, eflags_ac: false }
    }

    /// The same access with EFLAGS.AC = `ac`.
    #[inline]
    pub const fn with_ac(mut self, ac: bool) -> Self {
        self.eflags_ac = ac;
        self
    }

    /// Whether this is a user-mode access (CPL 3 and not an implicit supervisor access).
    #[inline]
    pub const fn is_user(&self) -> bool {
        self.cpl == 3 && !self.implicit_supervisor
    }

    /// Whether this is a write.
    #[inline]
    pub const fn is_write(&self) -> bool {
        matches!(self.kind, AccessKind::Write)
    }

    /// Whether this is an instruction fetch.
    #[inline]
    pub const fn is_fetch(&self) -> bool {
        matches!(self.kind, AccessKind::Fetch)
    }
}

/// The page-fault error code pushed by `#PF` (bitflags over the raw `u32`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PfErrorCode(pub u32);

bitflags::bitflags! {
    impl PfErrorCode: u32 {
        /// The fault was a protection (or reserved-bit) fault on a present entry.
        const P = 1 << 0;
        /// The access was a write.
        const W = 1 << 1;
        /// The access was a user-mode access.
        const U = 1 << 2;
        /// A reserved bit was set in a present paging-structure entry.
        const RSVD = 1 << 3;
        /// The access was an instruction fetch (reported only with SMEP or PAE-format NX).
        const ID = 1 << 4;
        /// The fault was caused by protection keys.
        const PK = 1 << 5;
    }
}

impl PfErrorCode {
    /// The access-describing bits of an error code for `access` under `st`:
    /// W for writes, U for user-mode accesses, and ID for instruction fetches when
    /// CR4.SMEP = 1 or (PAE/4/5-level paging and EFER.NXE = 1) (SDM vol. 3 §4.7).
    #[inline]
    pub fn for_access(st: &PagingState, access: &Access) -> PfErrorCode {
        let mut ec = 0;
        if access.is_write() {
            ec |= Self::W.0;
        }
        if access.is_user() {
            ec |= Self::U.0;
        }
        if access.is_fetch() && (st.cr4.contains(Cr4::SMEP) || st.nx_enabled()) {
            ec |= Self::ID.0;
        }
        PfErrorCode(ec)
    }

    /// Whether the fault was on a present entry (protection or reserved bit).
    #[inline]
    pub const fn is_present(self) -> bool {
        self.0 & 1 != 0
    }

    /// Whether this is a reserved-bit fault.
    #[inline]
    pub const fn is_rsvd(self) -> bool {
        self.0 & (1 << 3) != 0
    }
}

impl fmt::Display for PfErrorCode {
    /// Like the kernel's `__print_flags(err, "|", ...)` over KVM's page-fault flag
    /// names: `P|W|U|RSVD|F|PK` (F is the instruction-fetch/ID bit, as in KVM's
    /// trace output); leftover bits print as hex; no bits print as nothing.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(u32, &str); 6] =
            [(1 << 0, "P"), (1 << 1, "W"), (1 << 2, "U"), (1 << 3, "RSVD"), (1 << 4, "F"), (1 << 5, "PK")];
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

impl fmt::Debug for PfErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PfErrorCode({:#x}: {})", self.0, self)
    }
}

/// The effective permissions of a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PagePerms {
    /// R/W ANDed over all levels.
    pub writable: bool,
    /// U/S ANDed over all levels (a user-mode page).
    pub user: bool,
    /// XD ORed over all levels (only when NX is enabled and the mode has it).
    pub nx: bool,
    /// The leaf's G bit.
    pub global: bool,
    /// The leaf's protection key (bits 62:59; 4/5-level paging only, else 0).
    pub pkey: u8,
    /// The leaf's D bit.
    pub dirty: bool,
}

impl PagePerms {
    /// Everything allowed (no paging): writable, user, executable, dirty.
    pub const ALL: PagePerms = PagePerms { writable: true, user: true, nx: false, global: false, pkey: 0, dirty: true };
}

/// The protection-key fault condition of SDM §4.6.2: 4/5-level paging, CR4.PKE,
/// a data access to a user-mode page, and PKRU.AD for the key, or PKRU.WD for a
/// write that is a user-mode access or happens with CR0.WP = 1.
#[inline]
fn pkey_fault(perms: &PagePerms, st: &PagingState, mode: PagingMode, access: &Access) -> bool {
    if access.is_fetch() || !perms.user || !mode.is_long() || !st.cr4.contains(Cr4::PKE) {
        return false;
    }
    let k = u32::from(perms.pkey & 15);
    let ad = st.pkru >> (2 * k) & 1 != 0;
    let wd = st.pkru >> (2 * k + 1) & 1 != 0;
    ad || (wd && access.is_write() && (access.is_user() || st.cr0.contains(Cr0::WP)))
}

/// Checks `access` against the effective permissions `perms` of a translation.
///
/// Returns the full `#PF` error code on a fault (P set, plus W/U/ID for the
/// access and PK when protection keys forbid it). The rules (SDM vol. 3 §4.6):
///
/// * user-mode accesses need U/S = 1; user writes also need R/W = 1;
/// * supervisor writes need R/W = 1 only when CR0.WP = 1 (to any page);
/// * fetches fault on NX pages (when NX is enabled);
/// * SMEP: supervisor fetches from user pages fault;
/// * SMAP: supervisor data accesses to user pages fault unless EFLAGS.AC = 1
///   and the access is explicit;
/// * PKU: see [`PagePerms::pkey`]; may also fault on its own.
///
/// Without paging nothing faults.
#[inline]
pub fn check_access(perms: &PagePerms, state: &PagingState, access: &Access) -> Result<(), PfErrorCode> {
    let mode = state.mode();
    if mode == PagingMode::NonPaging {
        return Ok(());
    }
    let user_mode = access.is_user();
    let mut fault = match access.kind {
        AccessKind::Fetch => {
            (perms.nx && state.nx_enabled())
                || if user_mode { !perms.user } else { perms.user && state.cr4.contains(Cr4::SMEP) }
        }
        AccessKind::Read | AccessKind::Write => {
            // EFLAGS.AC lifts SMAP only for explicit supervisor accesses.
            let ac_override = access.eflags_ac && !access.implicit_supervisor;
            let write_denied = access.is_write() && !perms.writable && (user_mode || state.cr0.contains(Cr0::WP));
            let us_denied =
                if user_mode { !perms.user } else { perms.user && state.cr4.contains(Cr4::SMAP) && !ac_override };
            write_denied || us_denied
        }
    };
    let pk = pkey_fault(perms, state, mode, access);
    fault |= pk;
    if !fault {
        return Ok(());
    }
    let mut ec = PfErrorCode::for_access(state, access) | PfErrorCode::P;
    if pk {
        ec |= PfErrorCode::PK;
    }
    Err(ec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regs::Efer;

    fn long_mode() -> PagingState {
        PagingState::long_mode(0x1000)
    }

    fn user_rw() -> PagePerms {
        PagePerms { writable: true, user: true, ..Default::default() }
    }

    #[test]
    fn display_like_print_flags() {
        assert_eq!(PfErrorCode(0).to_string(), "");
        assert_eq!((PfErrorCode::P | PfErrorCode::W | PfErrorCode::U).to_string(), "P|W|U");
        assert_eq!(PfErrorCode(0x3f).to_string(), "P|W|U|RSVD|F|PK");
        assert_eq!(PfErrorCode(0x8001).to_string(), "P|0x8000");
        assert_eq!(PfErrorCode(0x8000).to_string(), "0x8000");
        assert_eq!(format!("{:?}", PfErrorCode(5)), "PfErrorCode(0x5: P|U)");
    }

    #[test]
    fn error_code_bits() {
        assert_eq!(PfErrorCode::P.0, 1);
        assert_eq!(PfErrorCode::W.0, 2);
        assert_eq!(PfErrorCode::U.0, 4);
        assert_eq!(PfErrorCode::RSVD.0, 8);
        assert_eq!(PfErrorCode::ID.0, 16);
        assert_eq!(PfErrorCode::PK.0, 32);
        assert!(PfErrorCode(9).is_present() && PfErrorCode(9).is_rsvd());
    }

    #[test]
    fn access_constructors() {
        assert!(Access::read(3).is_user());
        assert!(!Access::read(0).is_user());
        assert!(!Access::implicit(AccessKind::Read, 3).is_user());
        assert!(Access::write(1).is_write());
        assert!(Access::fetch(3).is_fetch());
        assert!(Access::read(0).with_ac(true).eflags_ac);
    }

    #[test]
    fn non_paging_allows_everything() {
        let st = PagingState::default();
        let none = PagePerms::default();
        for a in [Access::read(3), Access::write(3), Access::fetch(0)] {
            assert_eq!(check_access(&none, &st, &a), Ok(()));
        }
    }

    #[test]
    fn nx_needs_nxe() {
        let mut st = long_mode();
        let p = PagePerms { nx: true, ..user_rw() };
        assert_eq!(check_access(&p, &st, &Access::fetch(3)), Err(PfErrorCode(0x15)));
        st.efer.remove(Efer::NXE);
        assert_eq!(check_access(&p, &st, &Access::fetch(3)), Ok(()));
    }

    #[test]
    fn pkru_bits_per_key() {
        let mut st = long_mode();
        st.cr4 |= Cr4::PKE;
        for key in 0..16u8 {
            let p = PagePerms { pkey: key, ..user_rw() };
            st.pkru = 1 << (2 * key);
            assert_eq!(check_access(&p, &st, &Access::read(3)), Err(PfErrorCode(0x25)));
            st.pkru = 2 << (2 * key);
            assert_eq!(check_access(&p, &st, &Access::read(3)), Ok(()));
            assert_eq!(check_access(&p, &st, &Access::write(3)), Err(PfErrorCode(0x27)));
            st.pkru = !(3 << (2 * key));
            assert_eq!(check_access(&p, &st, &Access::write(3)), Ok(()));
        }
    }

    #[test]
    fn pkey_with_implicit_supervisor_access() {
        let mut st = long_mode();
        st.cr4 |= Cr4::PKE;
        st.pkru = 0b10; // WD0
        let p = user_rw();
        let implicit = Access::implicit(AccessKind::Write, 3);
        // Supervisor write with CR0.WP=1 honours WD.
        assert_eq!(check_access(&p, &st, &implicit), Err(PfErrorCode(0x23)));
        st.cr0.remove(Cr0::WP);
        assert_eq!(check_access(&p, &st, &implicit), Ok(()));
    }
}
