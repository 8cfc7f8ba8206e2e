//! End-to-end: the guest kernel demand-pages a process under the TDP MMU.

use std::sync::Arc;
use vmmu::host::{Backing, FrameAllocator, HostMm};
use vmmu::memslot::{MemslotFlags, UserspaceMemoryRegion};
use vmmu::{Kvm, VmConfig};
use vmmu_guest::kernel::{KernelConfig, USER_BASE};
use vmmu_guest::workload::{run, KernelSpace, Workload};
use vmmu_guest::GuestKernel;

fn vm(backing: Backing, mem: u64) -> Arc<Kvm> {
    let frames = Arc::new(FrameAllocator::new(4 << 30).unwrap());
    let host = Arc::new(HostMm::new(frames).unwrap());
    let kvm = Kvm::new(VmConfig::default(), host.clone()).unwrap();
    let hva = host.mmap(mem, backing, true, false).unwrap();
    kvm.set_user_memory_region(UserspaceMemoryRegion {
        slot: 0,
        flags: MemslotFlags::empty(),
        guest_phys_addr: 0,
        memory_size: mem,
        userspace_addr: hva,
    })
    .unwrap();
    kvm
}

#[test]
fn first_touch_faults_once_per_page_then_never() {
    let kvm = vm(Backing::Anon4k, 256 << 20);
    let mut cpu = kvm.create_vcpu().unwrap();
    let mut k = GuestKernel::boot(&*kvm, &mut cpu, KernelConfig { mem_size: 256 << 20, ..Default::default() }).unwrap();
    let pid = k.create_process(&mut cpu).unwrap();
    let pages = 1024;
    k.mmap(pid, USER_BASE, pages * 4096, true).unwrap();
    k.switch_to(&mut cpu, pid).unwrap();
    let before = cpu.stat.clone();
    run(Workload::FirstTouch, &mut KernelSpace { kernel: &mut k, cpu: &mut cpu }, USER_BASE, pages).unwrap();
    let fixed = cpu.stat.pf_fixed - before.pf_fixed;
    assert!(fixed >= pages && fixed <= pages + 64, "pf_fixed {fixed}");
    assert_eq!(k.stats.page_faults, pages);
    let before = cpu.stat.clone();
    run(Workload::ReTouch, &mut KernelSpace { kernel: &mut k, cpu: &mut cpu }, USER_BASE, pages).unwrap();
    assert_eq!(cpu.stat.pf_taken, before.pf_taken, "second pass takes no faults");
    let rep = kvm.audit().unwrap();
    assert!(rep.leaves[0] >= pages);
}

#[test]
fn thp_backing_maps_2m() {
    let kvm = vm(Backing::Thp, 256 << 20);
    let mut cpu = kvm.create_vcpu().unwrap();
    let mut k = GuestKernel::boot(&*kvm, &mut cpu, KernelConfig { mem_size: 256 << 20, ..Default::default() }).unwrap();
    let pid = k.create_process(&mut cpu).unwrap();
    let pages = 4096;
    k.mmap(pid, USER_BASE, pages * 4096, true).unwrap();
    k.switch_to(&mut cpu, pid).unwrap();
    run(Workload::FirstTouch, &mut KernelSpace { kernel: &mut k, cpu: &mut cpu }, USER_BASE, pages).unwrap();
    let st = kvm.vm_stats();
    assert!(st["pages_2m"] > 0, "{st:?}");
    assert!(cpu.stat.pf_fixed < pages / 8, "pf_fixed {}", cpu.stat.pf_fixed);
    kvm.audit().unwrap();
}
