//! How a VMM writes guest memory before the guest runs (loading a kernel, building boot page
//! tables): through its own mapping of the memslots, never through the vCPU.

use vmmu::host::Hva;
use vmmu::machine::NativeMachine;
use vmmu::x86_paging::addr::{Gpa, Hpa};
use vmmu::Kvm;

/// Guest-physical memory as the VMM (or firmware) writes it.
pub trait BootMem {
    /// Writes `size` bytes at `gpa`.
    fn write_phys(&self, gpa: Gpa, size: u8, val: u64) -> Result<(), String>;
    /// Reads `size` bytes at `gpa`.
    fn read_phys(&self, gpa: Gpa, size: u8) -> Result<u64, String>;
}

fn hva_of(kvm: &Kvm, gpa: Gpa) -> Result<Hva, String> {
    let slots = kvm.memslots();
    let slot = slots.find(gpa.gfn()).ok_or_else(|| format!("gpa {gpa:#x} is outside every memslot"))?;
    Ok(Hva(slot.gfn_to_hva(gpa.gfn()).raw() + gpa.page_offset()))
}

impl BootMem for Kvm {
    fn write_phys(&self, gpa: Gpa, size: u8, val: u64) -> Result<(), String> {
        self.host().write(hva_of(self, gpa)?, size, val).map_err(|e| e.to_string())
    }
    fn read_phys(&self, gpa: Gpa, size: u8) -> Result<u64, String> {
        self.host().read(hva_of(self, gpa)?, size).map_err(|e| e.to_string())
    }
}

impl BootMem for NativeMachine {
    fn write_phys(&self, gpa: Gpa, size: u8, val: u64) -> Result<(), String> {
        let hpa = Hpa::new(gpa.raw());
        if !self.mem().contains(hpa, u64::from(size)) {
            return Err(format!("gpa {gpa:#x} is beyond physical memory"));
        }
        self.mem().write(hpa, size, val);
        Ok(())
    }
    fn read_phys(&self, gpa: Gpa, size: u8) -> Result<u64, String> {
        let hpa = Hpa::new(gpa.raw());
        if !self.mem().contains(hpa, u64::from(size)) {
            return Err(format!("gpa {gpa:#x} is beyond physical memory"));
        }
        Ok(self.mem().read(hpa, size))
    }
}

/// Host physical memory used directly as guest physical memory (a machine without a
/// hypervisor), so a test can boot a [`NativeMachine`] while also lending it as the CPU.
impl BootMem for vmmu::host::PhysMem {
    fn write_phys(&self, gpa: Gpa, size: u8, val: u64) -> Result<(), String> {
        let hpa = Hpa::new(gpa.raw());
        if !self.contains(hpa, u64::from(size)) {
            return Err(format!("gpa {gpa:#x} is beyond physical memory"));
        }
        self.write(hpa, size, val);
        Ok(())
    }
    fn read_phys(&self, gpa: Gpa, size: u8) -> Result<u64, String> {
        let hpa = Hpa::new(gpa.raw());
        if !self.contains(hpa, u64::from(size)) {
            return Err(format!("gpa {gpa:#x} is beyond physical memory"));
        }
        Ok(self.read(hpa, size))
    }
}
