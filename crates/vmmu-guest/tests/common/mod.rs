//! Setup shared by the guest-level tests: a VM over a fresh host with one memslot of `MEM`
//! bytes at gpa 0, the guest kernel booted, and one process with `pages` pages mapped at
//! `USER_BASE`, current and touched once (so every page is mapped by the MMU).

use std::sync::Arc;
use vmmu::host::{Backing, FrameAllocator, HostMm, Hva};
use vmmu::memslot::{MemslotFlags, UserspaceMemoryRegion};
use vmmu::{Kvm, Vcpu, VmConfig};
use vmmu_guest::kernel::{KernelConfig, USER_BASE};
use vmmu_guest::workload::{run, KernelSpace, Workload};
use vmmu_guest::GuestKernel;

/// Guest RAM.
pub const MEM: u64 = 256 << 20;

/// A booted guest.
pub struct Booted {
    pub kvm: Arc<Kvm>,
    pub host: Arc<HostMm>,
    /// Where the memslot's memory is in the VMM.
    pub hva: Hva,
    pub cpu: Vcpu,
    pub k: GuestKernel,
    pub pid: u32,
}

/// Slot 0 over `hva` with `flags`.
pub fn region(hva: Hva, flags: MemslotFlags) -> UserspaceMemoryRegion {
    UserspaceMemoryRegion { slot: 0, flags, guest_phys_addr: 0, memory_size: MEM, userspace_addr: hva }
}

/// Boots the guest described in the module docs.
pub fn boot(cfg: VmConfig, backing: Backing, pages: u64) -> Booted {
    boot_with(cfg, backing, pages, |_| {})
}

/// [`boot`], calling `setup` on the VM before its memslot and vCPU exist (for capabilities
/// that must come first, such as the dirty ring).
pub fn boot_with(cfg: VmConfig, backing: Backing, pages: u64, setup: impl FnOnce(&Kvm)) -> Booted {
    let frames = Arc::new(FrameAllocator::new(4 << 30).unwrap());
    let host = Arc::new(HostMm::new(frames).unwrap());
    let kvm = Kvm::new(cfg, host.clone()).unwrap();
    setup(&kvm);
    let hva = host.mmap(MEM, backing, true, false).unwrap();
    kvm.set_user_memory_region(region(hva, MemslotFlags::empty())).unwrap();
    let mut cpu = kvm.create_vcpu().unwrap();
    let mut k = GuestKernel::boot(&*kvm, &mut cpu, KernelConfig { mem_size: MEM, ..Default::default() }).unwrap();
    let pid = k.create_process(&mut cpu).unwrap();
    k.mmap(pid, USER_BASE, pages * 4096, true).unwrap();
    k.switch_to(&mut cpu, pid).unwrap();
    run(Workload::FirstTouch, &mut KernelSpace { kernel: &mut k, cpu: &mut cpu }, USER_BASE, pages).unwrap();
    Booted { kvm, host, hva, cpu, k, pid }
}
