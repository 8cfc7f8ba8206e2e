//! A small PAE guest built by hand for edge-path tests: PDPT at 0x1000, PD at 0x2000, PT at
//! 0x3000 mapping [0, 2 MiB) with 4 KiB pages (supervisor, writable, A/D clear), 2 MiB pages
//! for [2, 16) MiB, and a 2 MiB page over the device window at [`MMIO`]. Virtual addresses
//! equal physical ones.

use std::sync::Arc;
use vmmu::host::{Backing, FrameAllocator, HostMm};
use vmmu::memslot::{MemslotFlags, UserspaceMemoryRegion};
use vmmu::mmio_bus::LatchDevice;
use vmmu::x86_paging::addr::Gpa;
use vmmu::x86_paging::regs::{Cr0, Cr4, Efer};
use vmmu::{Kvm, MmuKind, Vcpu, VmConfig};
use vmmu_guest::boot::BootMem;

/// Guest RAM.
pub const MEM: u64 = 16 << 20;
/// A device window above guest RAM (a latch: reads return the last value written).
pub const MMIO: u64 = 0x1000_0000;

/// Slot 0: `size` bytes at gpa 0 from the VMM's `hva`.
pub fn slot0(hva: u64, size: u64) -> UserspaceMemoryRegion {
    UserspaceMemoryRegion {
        slot: 0,
        flags: MemslotFlags::empty(),
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: vmmu::host::Hva(hva),
    }
}

/// The guest on a VM running `mmu`, booted into PAE paging; returns the VM, its vCPU and
/// the VMM address of guest RAM.
pub fn vm(mmu: MmuKind) -> (Arc<Kvm>, Vcpu, u64) {
    let host = Arc::new(HostMm::new(Arc::new(FrameAllocator::new(256 << 20).unwrap())).unwrap());
    let kvm = Kvm::new(VmConfig { mmu, ..Default::default() }, host.clone()).unwrap();
    let hva = host.mmap(MEM, Backing::Anon4k, true, false).unwrap();
    kvm.set_user_memory_region(slot0(hva.raw(), MEM)).unwrap();
    kvm.register_mmio(Gpa::new(MMIO), 0x1000, Arc::new(LatchDevice::default()));
    let m: &dyn BootMem = &*kvm;
    m.write_phys(Gpa::new(0x1000), 8, 0x2000 | 1).unwrap();
    m.write_phys(Gpa::new(0x2000), 8, 0x3000 | 3).unwrap();
    for i in 0..512u64 {
        m.write_phys(Gpa::new(0x3000 + i * 8), 8, (i << 12) | 3).unwrap();
    }
    for pd in 1..8u64 {
        m.write_phys(Gpa::new(0x2000 + pd * 8), 8, (pd << 21) | 0x83).unwrap();
    }
    m.write_phys(Gpa::new(0x2000 + (MMIO >> 21) * 8), 8, MMIO | 0x83).unwrap();
    let mut v = kvm.create_vcpu().unwrap();
    v.write_cr4(Cr4::PAE).unwrap();
    v.write_efer(Efer::NXE).unwrap();
    v.write_cr3(0x1000).unwrap();
    v.write_cr0(Cr0::PE | Cr0::PG | Cr0::WP).unwrap();
    (kvm, v, hva.raw())
}
