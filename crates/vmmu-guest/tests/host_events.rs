//! Host events under a running guest: page migration and swap-out/in. The guest-visible
//! effect is that nothing changes — it reads back what it wrote — while KVM's SPTEs were
//! zapped by the MMU notifier and fault back in on the new frames (pf_taken, the audit
//! checks every SPTE against the host mapping).

use std::sync::Arc;
use vmmu::host::{Backing, FrameAllocator, HostMm, Hva};
use vmmu::memslot::{MemslotFlags, UserspaceMemoryRegion};
use vmmu::x86_paging::access::AccessKind;
use vmmu::{Kvm, MmuKind, Vcpu, VmConfig};
use vmmu_guest::kernel::{KernelConfig, USER_BASE};
use vmmu_guest::workload::{run, KernelSpace, Workload};
use vmmu_guest::GuestKernel;

const MEM: u64 = 256 << 20;
const PAGES: u64 = 1024;

struct G {
    kvm: Arc<Kvm>,
    host: Arc<HostMm>,
    hva: Hva,
    cpu: Vcpu,
    k: GuestKernel,
}

fn guest(mmu: MmuKind, backing: Backing) -> G {
    let frames = Arc::new(FrameAllocator::new(4 << 30).unwrap());
    let host = Arc::new(HostMm::new(frames).unwrap());
    let kvm = Kvm::new(VmConfig { mmu, ..Default::default() }, host.clone()).unwrap();
    let hva = host.mmap(MEM, backing, true, false).unwrap();
    let r = UserspaceMemoryRegion {
        slot: 0,
        flags: MemslotFlags::empty(),
        guest_phys_addr: 0,
        memory_size: MEM,
        userspace_addr: hva,
    };
    kvm.set_user_memory_region(r).unwrap();
    let mut cpu = kvm.create_vcpu().unwrap();
    let mut k = GuestKernel::boot(&*kvm, &mut cpu, KernelConfig { mem_size: MEM, ..Default::default() }).unwrap();
    let pid = k.create_process(&mut cpu).unwrap();
    k.mmap(pid, USER_BASE, PAGES * 4096, true).unwrap();
    k.switch_to(&mut cpu, pid).unwrap();
    run(Workload::FirstTouch, &mut KernelSpace { kernel: &mut k, cpu: &mut cpu }, USER_BASE, PAGES).unwrap();
    let mut g = G { kvm, host, hva, cpu, k };
    for i in 0..PAGES {
        g.k.access(&mut g.cpu, USER_BASE + i * 4096 + 64, AccessKind::Write, 8, i * 0x9e37_79b9 + 1).unwrap();
    }
    g
}

impl G {
    fn check_contents(&mut self, what: &str) {
        for i in 0..PAGES {
            let v = self.k.access(&mut self.cpu, USER_BASE + i * 4096 + 64, AccessKind::Read, 8, 0).unwrap();
            assert_eq!(v, i * 0x9e37_79b9 + 1, "{what}: page {i}");
        }
    }

    fn host_pfn(&self, gpa: u64) -> u64 {
        self.host.get_user_page_fast_only(Hva(self.hva.raw() + gpa), false).map_or(0, |p| p.pfn.raw())
    }

    fn data_gpa(&mut self, i: u64) -> u64 {
        let pid = self.k.current_pid().unwrap();
        self.k.user_pte(&mut self.cpu, pid, USER_BASE + i * 4096).unwrap().unwrap() & 0x000f_ffff_ffff_f000
    }
}

fn migrate(mmu: MmuKind, backing: Backing) {
    let what = format!("{mmu:?} {backing:?} migrate");
    let mut g = guest(mmu, backing);
    let gpa = g.data_gpa(5);
    let before = g.host_pfn(gpa);
    let flushes = g.kvm.vm_stats()["remote_tlb_flush"];
    let moved = g.host.migrate_pages(g.hva, MEM).unwrap();
    assert!(moved >= PAGES, "{what}: {moved} pages moved");
    assert_ne!(g.host_pfn(gpa), before, "{what}: the page has a new frame");
    assert!(g.kvm.vm_stats()["remote_tlb_flush"] > flushes, "{what}: the notifier zapped and flushed");
    g.kvm.audit().unwrap();
    let taken = g.cpu.stat.pf_taken;
    g.check_contents(&what);
    assert!(g.cpu.stat.pf_taken > taken, "{what}: SPTEs faulted back in");
    g.kvm.audit().unwrap();
}

fn swap(mmu: MmuKind, backing: Backing) {
    let what = format!("{mmu:?} {backing:?} swap");
    let mut g = guest(mmu, backing);
    let gpa = g.data_gpa(5);
    let n = g.host.swap_out(g.hva, MEM).unwrap();
    assert!(n >= PAGES, "{what}: {n} pages swapped out");
    assert_eq!(g.host.swapped_pages(), n);
    assert_eq!(g.host_pfn(gpa), 0, "{what}: not mapped while swapped out");
    g.kvm.audit().unwrap();
    let taken = g.cpu.stat.pf_taken;
    g.check_contents(&what);
    assert!(g.cpu.stat.pf_taken > taken, "{what}: SPTEs faulted back in");
    assert!(g.host.swapped_pages() < n, "{what}: pages swapped back in");
    g.kvm.audit().unwrap();
    // Dropping swapped-out memory drops its swap entries: it reads zeroes after.
    g.host.madvise_dontneed(g.hva, MEM).unwrap();
    assert_eq!(g.host.swapped_pages(), 0, "{what}");
}

#[test]
fn tdp_migrate_and_swap() {
    for b in [Backing::Anon4k, Backing::Thp] {
        migrate(MmuKind::Tdp, b);
        swap(MmuKind::Tdp, b);
    }
}

#[test]
fn shadow_migrate_and_swap() {
    migrate(MmuKind::Shadow, Backing::Anon4k);
    swap(MmuKind::Shadow, Backing::Anon4k);
}

#[test]
fn legacy_tdp_migrate_and_swap() {
    for b in [Backing::Anon4k, Backing::Thp] {
        migrate(MmuKind::LegacyTdp, b);
        swap(MmuKind::LegacyTdp, b);
    }
}
