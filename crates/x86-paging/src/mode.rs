//! Paging modes and the register snapshot a walk runs against.

use core::fmt;

use crate::addr::{Gpa, Gva};
use crate::bits;
use crate::regs::{cr3_base, Cr0, Cr4, Efer};
use crate::walk::GuestPhys;

/// The paging mode selected by CR0.PG, CR4.PAE, EFER.LMA and CR4.LA57.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum PagingMode {
    /// CR0.PG = 0: linear addresses are physical addresses.
    #[default]
    NonPaging,
    /// 32-bit paging (2 levels of 4-byte entries).
    Bits32,
    /// PAE paging (4 PDPTE registers + 2 levels of 8-byte entries).
    Pae,
    /// 4-level paging (48-bit linear addresses).
    Level4,
    /// 5-level paging (57-bit linear addresses).
    Level5,
}

impl PagingMode {
    /// Number of paging-structure levels walked: 0, 2, 3 (the PDPTEs count), 4 or 5.
    #[inline]
    pub const fn levels(self) -> u8 {
        match self {
            PagingMode::NonPaging => 0,
            PagingMode::Bits32 => 2,
            PagingMode::Pae => 3,
            PagingMode::Level4 => 4,
            PagingMode::Level5 => 5,
        }
    }

    /// Whether entries are 8 bytes wide and have an NX bit (PAE, 4-level, 5-level).
    #[inline]
    pub const fn is_pae_format(self) -> bool {
        matches!(self, PagingMode::Pae | PagingMode::Level4 | PagingMode::Level5)
    }

    /// Whether this is IA-32e paging (4- or 5-level): canonical checks, protection keys.
    #[inline]
    pub const fn is_long(self) -> bool {
        matches!(self, PagingMode::Level4 | PagingMode::Level5)
    }

    /// Size in bytes of one paging-structure entry (0 without paging).
    #[inline]
    pub const fn entry_size(self) -> u8 {
        match self {
            PagingMode::NonPaging => 0,
            PagingMode::Bits32 => 4,
            _ => 8,
        }
    }

    /// Number of implemented linear-address bits (32, 48 or 57).
    #[inline]
    pub const fn va_bits(self) -> u32 {
        match self {
            PagingMode::Level4 => 48,
            PagingMode::Level5 => 57,
            _ => 32,
        }
    }

    /// Whether `gva` is canonical in this mode (always true outside 4/5-level paging).
    #[inline]
    pub const fn is_canonical(self, gva: Gva) -> bool {
        if !self.is_long() {
            return true;
        }
        let sh = 64 - self.va_bits();
        ((gva.0 << sh).cast_signed() >> sh).cast_unsigned() == gva.0
    }
}

impl fmt::Display for PagingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PagingMode::NonPaging => "non-paging",
            PagingMode::Bits32 => "32-bit",
            PagingMode::Pae => "PAE",
            PagingMode::Level4 => "4-level",
            PagingMode::Level5 => "5-level",
        })
    }
}

/// Everything about the vCPU that a page walk depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PagingState {
    /// CR0.
    pub cr0: Cr0,
    /// CR3 (raw).
    pub cr3: u64,
    /// CR4.
    pub cr4: Cr4,
    /// IA32_EFER.
    pub efer: Efer,
    /// The PKRU register (2 bits per key: AD = bit 2k, WD = bit 2k+1).
    pub pkru: u32,
    /// The four PAE PDPTE registers (loaded by MOV CR3 etc., see [`PagingState::load_pdptrs`]).
    pub pdptrs: [u64; 4],
    /// CPUID MAXPHYADDR (default 46).
    pub maxphyaddr: u8,
    /// CPUID 1 GiB page support (default true).
    pub gbpages: bool,
    /// CPUID PSE-36 support (default true).
    pub pse36: bool,
}

impl Default for PagingState {
    fn default() -> Self {
        PagingState {
            cr0: Cr0::empty(),
            cr3: 0,
            cr4: Cr4::empty(),
            efer: Efer::empty(),
            pkru: 0,
            pdptrs: [0; 4],
            maxphyaddr: 46,
            gbpages: true,
            pse36: true,
        }
    }
}

/// Error loading the PAE PDPTE registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PdptrError<E> {
    /// A present PDPTE has reserved bits set (MOV to CR3/CR0/CR4 would #GP).
    #[error("PDPTE {index} = {value:#x} has reserved bits set")]
    Reserved {
        /// Which of the four PDPTEs (0..=3).
        index: u8,
        /// Its value.
        value: u64,
    },
    /// The PDPT could not be read.
    #[error("reading the PDPT failed")]
    Mem(E),
}

impl PagingState {
    /// The active paging mode: PG=0 -> non-paging; LMA -> LA57 ? 5-level : 4-level;
    /// else PAE ? PAE : 32-bit.
    #[inline]
    pub fn mode(&self) -> PagingMode {
        if !self.cr0.contains(Cr0::PG) {
            PagingMode::NonPaging
        } else if self.efer.contains(Efer::LMA) {
            if self.cr4.contains(Cr4::LA57) {
                PagingMode::Level5
            } else {
                PagingMode::Level4
            }
        } else if self.cr4.contains(Cr4::PAE) {
            PagingMode::Pae
        } else {
            PagingMode::Bits32
        }
    }

    /// A 4-level (long mode) state with the usual kernel settings:
    /// PG|PE|WP, PAE, LME|LMA|NXE, the given CR3.
    pub fn long_mode(cr3: u64) -> Self {
        PagingState {
            cr0: Cr0::PG | Cr0::PE | Cr0::WP,
            cr3,
            cr4: Cr4::PAE,
            efer: Efer::LME | Efer::LMA | Efer::NXE,
            ..Default::default()
        }
    }

    /// MAXPHYADDR clamped to the architectural range 32..=52.
    #[inline]
    pub fn maxphy(&self) -> u32 {
        u32::from(self.maxphyaddr).clamp(32, 52)
    }

    /// Whether EFER.NXE is set *and* the mode has an NX bit (PAE/4/5-level).
    #[inline]
    pub fn nx_enabled(&self) -> bool {
        self.efer.contains(Efer::NXE) && self.mode().is_pae_format()
    }

    /// Reserved bits of a PAE PDPTE: 1-2, 5-8 and MAXPHYADDR..=63.
    #[inline]
    pub fn pdpte_reserved_mask(&self) -> u64 {
        bits(1, 2) | bits(5, 8) | bits(self.maxphy(), 63)
    }

    /// The guest-physical address of PDPTE `index` (0..=3) for the current CR3.
    #[inline]
    pub fn pdpte_gpa(&self, index: usize) -> Gpa {
        Gpa(cr3_base(self.cr3, PagingMode::Pae) + 8 * (index as u64 & 3))
    }

    /// Loads the four PAE PDPTEs from the 32-byte aligned table at CR3 bits 31:5,
    /// as MOV to CR3 does in PAE mode. A present PDPTE with reserved bits set
    /// (bits 1-2, 5-8, MAXPHYADDR..=63) fails with [`PdptrError::Reserved`] and
    /// leaves `pdptrs` unchanged (the instruction would #GP).
    pub fn load_pdptrs<M: GuestPhys>(&mut self, mem: &mut M) -> Result<(), PdptrError<M::Error>> {
        let mut new = [0u64; 4];
        let rsvd = self.pdpte_reserved_mask();
        for (i, slot) in (0u8..).zip(new.iter_mut()) {
            let v = mem.read_pte(self.pdpte_gpa(usize::from(i)), 8, Gva(0)).map_err(PdptrError::Mem)?;
            if v & 1 != 0 && v & rsvd != 0 {
                return Err(PdptrError::Reserved { index: i, value: v });
            }
            *slot = v;
        }
        self.pdptrs = new;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::VecMem;

    #[test]
    fn mode_selection() {
        let mut st = PagingState::default();
        assert_eq!(st.mode(), PagingMode::NonPaging);
        st.cr0 = Cr0::PG | Cr0::PE;
        assert_eq!(st.mode(), PagingMode::Bits32);
        st.cr4 = Cr4::PAE;
        assert_eq!(st.mode(), PagingMode::Pae);
        st.efer = Efer::LME | Efer::LMA;
        assert_eq!(st.mode(), PagingMode::Level4);
        st.cr4 |= Cr4::LA57;
        assert_eq!(st.mode(), PagingMode::Level5);
        st.cr0 = Cr0::PE;
        assert_eq!(st.mode(), PagingMode::NonPaging);
        let levels: Vec<u8> =
            [PagingMode::NonPaging, PagingMode::Bits32, PagingMode::Pae, PagingMode::Level4, PagingMode::Level5]
                .iter()
                .map(|m| m.levels())
                .collect();
        assert_eq!(levels, [0, 2, 3, 4, 5]);
    }

    #[test]
    fn defaults() {
        let st = PagingState::default();
        assert_eq!(st.maxphyaddr, 46);
        assert!(st.gbpages && st.pse36);
    }

    #[test]
    fn canonical() {
        let m4 = PagingMode::Level4;
        assert!(m4.is_canonical(Gva(0x0000_7fff_ffff_ffff)));
        assert!(m4.is_canonical(Gva(0xffff_8000_0000_0000)));
        assert!(!m4.is_canonical(Gva(0x0000_8000_0000_0000)));
        assert!(!m4.is_canonical(Gva(0xfff7_8000_0000_0000)));
        let m5 = PagingMode::Level5;
        assert!(m5.is_canonical(Gva(0x00ff_ffff_ffff_ffff)));
        assert!(m5.is_canonical(Gva(0xff00_0000_0000_0000)));
        assert!(!m5.is_canonical(Gva(0x0100_0000_0000_0000)));
        assert!(PagingMode::Pae.is_canonical(Gva(0x0100_0000_0000_0000)));
    }

    #[test]
    fn load_pdptrs_ok_and_reserved() {
        let mut mem = VecMem::new(0x10000);
        let mut st = PagingState { cr0: Cr0::PG | Cr0::PE, cr4: Cr4::PAE, cr3: 0x2020, ..Default::default() };
        mem.store_u64(Gpa(0x2020), 0x3001).unwrap();
        mem.store_u64(Gpa(0x2028), 0).unwrap();
        mem.store_u64(Gpa(0x2030), 0x4001 | (1 << 3) | (1 << 4)).unwrap();
        mem.store_u64(Gpa(0x2038), 0xdead_0000).unwrap(); // not present: reserved bits ignored
        st.load_pdptrs(&mut mem).unwrap();
        assert_eq!(st.pdptrs, [0x3001, 0, 0x4019, 0xdead_0000]);

        for bad in [1u64 << 1, 1 << 2, 1 << 5, 1 << 8, 1 << 46, 1 << 63] {
            mem.store_u64(Gpa(0x2028), 0x5001 | bad).unwrap();
            let before = st.pdptrs;
            assert_eq!(st.load_pdptrs(&mut mem), Err(PdptrError::Reserved { index: 1, value: 0x5001 | bad }));
            assert_eq!(st.pdptrs, before);
        }
        st.cr3 = 0x1_0000_0000 - 0x10; // table past the end of memory
        assert!(matches!(st.load_pdptrs(&mut mem), Err(PdptrError::Mem(_))));
    }
}
