//! The architectural registers that steer paging.
//!
//! All flag types keep unknown bits (`const _ = !0`), so a register value
//! round-trips through them losslessly.

use crate::mode::PagingMode;

bitflags::bitflags! {
    /// Control register 0.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Cr0: u64 {
        /// Protection enable.
        const PE = 1 << 0;
        /// Monitor coprocessor.
        const MP = 1 << 1;
        /// x87 emulation.
        const EM = 1 << 2;
        /// Task switched.
        const TS = 1 << 3;
        /// Extension type.
        const ET = 1 << 4;
        /// Numeric error.
        const NE = 1 << 5;
        /// Write protect: supervisor writes honour R/W.
        const WP = 1 << 16;
        /// Alignment mask.
        const AM = 1 << 18;
        /// Not write-through.
        const NW = 1 << 29;
        /// Cache disable.
        const CD = 1 << 30;
        /// Paging.
        const PG = 1 << 31;
        /// Keep all other bits.
        const _ = !0;
    }
}

bitflags::bitflags! {
    /// Control register 4.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Cr4: u64 {
        /// Virtual-8086 mode extensions.
        const VME = 1 << 0;
        /// Protected-mode virtual interrupts.
        const PVI = 1 << 1;
        /// Time stamp disable.
        const TSD = 1 << 2;
        /// Debugging extensions.
        const DE = 1 << 3;
        /// Page size extensions (4 MiB pages in 32-bit paging).
        const PSE = 1 << 4;
        /// Physical address extension.
        const PAE = 1 << 5;
        /// Machine-check enable.
        const MCE = 1 << 6;
        /// Page global enable.
        const PGE = 1 << 7;
        /// Performance-monitoring counter enable.
        const PCE = 1 << 8;
        /// OS FXSAVE/FXRSTOR support.
        const OSFXSR = 1 << 9;
        /// OS unmasked SIMD exceptions.
        const OSXMMEXCPT = 1 << 10;
        /// User-mode instruction prevention.
        const UMIP = 1 << 11;
        /// 57-bit linear addresses (5-level paging).
        const LA57 = 1 << 12;
        /// VMX enable.
        const VMXE = 1 << 13;
        /// SMX enable.
        const SMXE = 1 << 14;
        /// FSGSBASE instructions.
        const FSGSBASE = 1 << 16;
        /// Process-context identifiers.
        const PCIDE = 1 << 17;
        /// XSAVE enable.
        const OSXSAVE = 1 << 18;
        /// Supervisor-mode execution prevention.
        const SMEP = 1 << 20;
        /// Supervisor-mode access prevention.
        const SMAP = 1 << 21;
        /// Protection keys for user-mode pages.
        const PKE = 1 << 22;
        /// Control-flow enforcement.
        const CET = 1 << 23;
        /// Protection keys for supervisor-mode pages.
        const PKS = 1 << 24;
        /// Keep all other bits.
        const _ = !0;
    }
}

bitflags::bitflags! {
    /// The IA32_EFER MSR.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Efer: u64 {
        /// SYSCALL enable.
        const SCE = 1 << 0;
        /// Long mode enable.
        const LME = 1 << 8;
        /// Long mode active.
        const LMA = 1 << 10;
        /// Execute-disable (NX) enable.
        const NXE = 1 << 11;
        /// SVM enable (AMD).
        const SVME = 1 << 12;
        /// Long mode segment limit enable (AMD).
        const LMSLE = 1 << 13;
        /// Fast FXSAVE/FXRSTOR (AMD).
        const FFXSR = 1 << 14;
        /// Translation cache extension (AMD).
        const TCE = 1 << 15;
        /// Keep all other bits.
        const _ = !0;
    }
}

bitflags::bitflags! {
    /// RFLAGS (only the bits paging cares about are named, plus the classic ones).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Rflags: u64 {
        /// Carry.
        const CF = 1 << 0;
        /// Reserved, always 1.
        const FIXED = 1 << 1;
        /// Parity.
        const PF = 1 << 2;
        /// Auxiliary carry.
        const AF = 1 << 4;
        /// Zero.
        const ZF = 1 << 6;
        /// Sign.
        const SF = 1 << 7;
        /// Trap.
        const TF = 1 << 8;
        /// Interrupt enable.
        const IF = 1 << 9;
        /// Direction.
        const DF = 1 << 10;
        /// Overflow.
        const OF = 1 << 11;
        /// Resume.
        const RF = 1 << 16;
        /// Virtual-8086 mode.
        const VM = 1 << 17;
        /// Alignment check / access control (SMAP override).
        const AC = 1 << 18;
        /// Keep all other bits.
        const _ = !0;
    }
}

/// CR3 bit 63 on MOV to CR3 with CR4.PCIDE=1: do not flush the PCID's TLB entries.
pub const CR3_NOFLUSH: u64 = 1 << 63;

/// The guest-physical base of the top-level paging structure named by `cr3`
/// in `mode`:
///
/// * 32-bit paging: bits 31:12;
/// * PAE paging: bits 31:5 (the 32-byte aligned PDPT);
/// * 4/5-level paging: bits 51:12 (PCID / PWT / PCD, the no-flush bit and
///   the LAM bits are stripped);
/// * no paging: 0.
#[inline]
pub const fn cr3_base(cr3: u64, mode: PagingMode) -> u64 {
    match mode {
        PagingMode::NonPaging => 0,
        PagingMode::Bits32 => cr3 & 0xffff_f000,
        PagingMode::Pae => cr3 & 0xffff_ffe0,
        PagingMode::Level4 | PagingMode::Level5 => cr3 & 0x000f_ffff_ffff_f000,
    }
}

/// The PCID field of CR3 (bits 11:0; meaningful only with CR4.PCIDE=1).
#[inline]
pub const fn cr3_pcid(cr3: u64) -> u16 {
    (cr3 & 0xfff) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_positions() {
        assert_eq!(Cr0::WP.bits(), 1 << 16);
        assert_eq!(Cr0::PG.bits(), 1 << 31);
        assert_eq!(Cr4::PSE.bits(), 1 << 4);
        assert_eq!(Cr4::PAE.bits(), 1 << 5);
        assert_eq!(Cr4::PGE.bits(), 1 << 7);
        assert_eq!(Cr4::LA57.bits(), 1 << 12);
        assert_eq!(Cr4::PCIDE.bits(), 1 << 17);
        assert_eq!(Cr4::SMEP.bits(), 1 << 20);
        assert_eq!(Cr4::SMAP.bits(), 1 << 21);
        assert_eq!(Cr4::PKE.bits(), 1 << 22);
        assert_eq!(Efer::LME.bits(), 1 << 8);
        assert_eq!(Efer::LMA.bits(), 1 << 10);
        assert_eq!(Efer::NXE.bits(), 1 << 11);
        assert_eq!(Rflags::AC.bits(), 1 << 18);
    }

    #[test]
    fn unknown_bits_round_trip() {
        let v = 0x8000_0000_0001_0033u64 | (1 << 40);
        assert_eq!(Cr0::from_bits_retain(v).bits(), v);
        assert_eq!(Cr0::from_bits_truncate(v).bits(), v);
    }

    #[test]
    fn cr3_helpers() {
        let cr3 = CR3_NOFLUSH | 0x0000_0012_3456_7000 | 0x5a5;
        assert_eq!(cr3_base(cr3, PagingMode::Level4), 0x12_3456_7000);
        assert_eq!(cr3_base(cr3, PagingMode::Level5), 0x12_3456_7000);
        assert_eq!(cr3_base(cr3, PagingMode::Bits32), 0x3456_7000);
        assert_eq!(cr3_base(0x1234_5fe8, PagingMode::Pae), 0x1234_5fe0);
        assert_eq!(cr3_base(cr3, PagingMode::NonPaging), 0);
        assert_eq!(cr3_pcid(cr3), 0x5a5);
    }
}
