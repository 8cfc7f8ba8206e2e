//! What guest code can do to a CPU, implemented by a KVM vCPU and by a bare machine with no
//! hypervisor (the oracle the transparency property compares against).

use crate::host::PhysMem;
use crate::hw::cpu::{Cpu, CpuMode, Stop};
use crate::sync::Arc;
use crate::vm::{GuestError, Vcpu};
use x86_paging::addr::Gva;
use x86_paging::mode::PagingState;
use x86_paging::regs::{Cr0, Cr4, Efer};

/// The operations guest code performs: loads, stores, fetches, control-register writes,
/// TLB maintenance, privilege changes. An exception comes back as
/// [`GuestError::Exception`] for the guest's own handler.
pub trait GuestCpu {
    /// Load.
    fn read(&mut self, gva: Gva, size: u8) -> Result<u64, GuestError>;
    /// Store.
    fn write(&mut self, gva: Gva, size: u8, val: u64) -> Result<(), GuestError>;
    /// Instruction fetch.
    fn fetch(&mut self, gva: Gva, size: u8) -> Result<u64, GuestError>;
    /// MOV CR0.
    fn write_cr0(&mut self, v: Cr0) -> Result<(), GuestError>;
    /// MOV CR4.
    fn write_cr4(&mut self, v: Cr4) -> Result<(), GuestError>;
    /// WRMSR EFER.
    fn write_efer(&mut self, v: Efer) -> Result<(), GuestError>;
    /// MOV CR3.
    fn write_cr3(&mut self, v: u64) -> Result<(), GuestError>;
    /// INVLPG.
    fn invlpg(&mut self, gva: Gva);
    /// Privilege level change.
    fn set_cpl(&mut self, cpl: u8);
    /// STAC/CLAC.
    fn set_ac(&mut self, ac: bool);
    /// WRPKRU.
    fn write_pkru(&mut self, v: u32);
    /// The paging registers.
    fn paging(&self) -> PagingState;
}

impl GuestCpu for Vcpu {
    fn read(&mut self, gva: Gva, size: u8) -> Result<u64, GuestError> {
        Vcpu::read(self, gva, size)
    }
    fn write(&mut self, gva: Gva, size: u8, val: u64) -> Result<(), GuestError> {
        Vcpu::write(self, gva, size, val)
    }
    fn fetch(&mut self, gva: Gva, size: u8) -> Result<u64, GuestError> {
        Vcpu::fetch(self, gva, size)
    }
    fn write_cr0(&mut self, v: Cr0) -> Result<(), GuestError> {
        Vcpu::write_cr0(self, v)
    }
    fn write_cr4(&mut self, v: Cr4) -> Result<(), GuestError> {
        Vcpu::write_cr4(self, v)
    }
    fn write_efer(&mut self, v: Efer) -> Result<(), GuestError> {
        Vcpu::write_efer(self, v)
    }
    fn write_cr3(&mut self, v: u64) -> Result<(), GuestError> {
        Vcpu::write_cr3(self, v)
    }
    fn invlpg(&mut self, gva: Gva) {
        Vcpu::invlpg(self, gva)
    }
    fn set_cpl(&mut self, cpl: u8) {
        Vcpu::set_cpl(self, cpl)
    }
    fn set_ac(&mut self, ac: bool) {
        Vcpu::set_ac(self, ac)
    }
    fn write_pkru(&mut self, v: u32) {
        Vcpu::write_pkru(self, v)
    }
    fn paging(&self) -> PagingState {
        *self.cpu().paging()
    }
}

/// A machine with no hypervisor: the guest's page tables are walked directly and guest
/// physical memory is host memory (gpa = hpa).
pub struct NativeMachine {
    cpu: Cpu,
}

impl NativeMachine {
    /// A machine with `size` bytes of physical memory.
    pub fn new(size: u64, maxphyaddr: u8) -> Result<Self, crate::host::HostError> {
        let mem = Arc::new(PhysMem::new(size)?);
        Ok(NativeMachine { cpu: Cpu::new(mem, CpuMode::Native, 1, maxphyaddr) })
    }

    /// Physical memory (to load it before running, as firmware would).
    pub fn mem(&self) -> &Arc<PhysMem> {
        self.cpu.mem()
    }

    /// The CPU.
    pub fn cpu(&self) -> &Cpu {
        &self.cpu
    }
}

fn native<T>(r: Result<T, Stop>) -> Result<T, GuestError> {
    r.map_err(|s| match s {
        Stop::Exception(e) => GuestError::Exception(e),
        Stop::Exit(_) => unreachable!("a machine without a hypervisor takes no VM exits"),
    })
}

impl GuestCpu for NativeMachine {
    fn read(&mut self, gva: Gva, size: u8) -> Result<u64, GuestError> {
        native(self.cpu.read(gva, size))
    }
    fn write(&mut self, gva: Gva, size: u8, val: u64) -> Result<(), GuestError> {
        native(self.cpu.write(gva, size, val))
    }
    fn fetch(&mut self, gva: Gva, size: u8) -> Result<u64, GuestError> {
        native(self.cpu.fetch(gva, size))
    }
    fn write_cr0(&mut self, v: Cr0) -> Result<(), GuestError> {
        native(self.cpu.write_cr0(v))
    }
    fn write_cr4(&mut self, v: Cr4) -> Result<(), GuestError> {
        native(self.cpu.write_cr4(v))
    }
    fn write_efer(&mut self, v: Efer) -> Result<(), GuestError> {
        native(self.cpu.write_efer(v))
    }
    fn write_cr3(&mut self, v: u64) -> Result<(), GuestError> {
        native(self.cpu.write_cr3(v))
    }
    fn invlpg(&mut self, gva: Gva) {
        self.cpu.invlpg(gva)
    }
    fn set_cpl(&mut self, cpl: u8) {
        self.cpu.set_cpl(cpl)
    }
    fn set_ac(&mut self, ac: bool) {
        self.cpu.set_ac(ac)
    }
    fn write_pkru(&mut self, v: u32) {
        self.cpu.write_pkru(v)
    }
    fn paging(&self) -> PagingState {
        *self.cpu.paging()
    }
}
