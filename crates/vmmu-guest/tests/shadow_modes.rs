//! Shadow paging of PAE and non-paging guests against the native machine: the same accesses,
//! the same data, the same #PF, the same guest A/D bits; page-table rewrites made by guest
//! stores and flushed with INVLPG or a CR3 reload; the MMU audit after every step.

use std::sync::Arc;
use vmmu::host::{Backing, FrameAllocator, HostMm};
use vmmu::machine::{GuestCpu, NativeMachine};
use vmmu::memslot::{MemslotFlags, UserspaceMemoryRegion};
use vmmu::x86_paging::addr::{Gpa, Gva};
use vmmu::x86_paging::regs::{Cr0, Cr4, Efer};
use vmmu::{GuestError, Kvm, MmuKind, Vcpu, VmConfig};
use vmmu_guest::boot::BootMem;

const MEM: u64 = 16 << 20;

fn vm() -> (Arc<Kvm>, Vcpu) {
    let host = Arc::new(HostMm::new(Arc::new(FrameAllocator::new(256 << 20).unwrap())).unwrap());
    let kvm = Kvm::new(VmConfig { mmu: MmuKind::Shadow, ..Default::default() }, host.clone()).unwrap();
    let hva = host.mmap(MEM, Backing::Anon4k, true, false).unwrap();
    kvm.set_user_memory_region(UserspaceMemoryRegion {
        slot: 0,
        flags: MemslotFlags::empty(),
        guest_phys_addr: 0,
        memory_size: MEM,
        userspace_addr: hva,
    })
    .unwrap();
    let v = kvm.create_vcpu().unwrap();
    (kvm, v)
}

/// PAE tables: PDPT at 0x1000, PD at 0x2000 (first GiB), PTs from 0x3000 mapping
/// [0, 8 MiB) with 4 KiB pages, and [8, 16) MiB with 2 MiB pages. Everything supervisor,
/// writable, A/D clear.
fn build_pae(m: &dyn BootMem) {
    m.write_phys(Gpa::new(0x1000), 8, 0x2000 | 1).unwrap();
    for pd in 0..8u64 {
        let pt = 0x3000 + pd * 0x1000;
        m.write_phys(Gpa::new(0x2000 + pd * 8), 8, pt | 3).unwrap();
        for i in 0..512u64 {
            let pa = (pd << 21) + (i << 12);
            m.write_phys(Gpa::new(pt + i * 8), 8, pa | 3).unwrap();
        }
    }
    for pd in 4..8u64 {
        m.write_phys(Gpa::new(0x2000 + pd * 8 + 32), 8, ((pd + 4) << 21) | 0x83).unwrap();
    }
}

fn boot_pae(c: &mut dyn GuestCpu) {
    c.write_cr4(Cr4::PAE).unwrap();
    c.write_efer(Efer::NXE).unwrap();
    c.write_cr3(0x1000).unwrap();
    c.write_cr0(Cr0::PE | Cr0::PG | Cr0::WP).unwrap();
}

fn same(a: Result<u64, GuestError>, b: Result<u64, GuestError>, what: &str) {
    assert_eq!(a, b, "{what}: native vs shadow");
}

#[test]
fn pae_guest_under_shadow_paging_matches_native() {
    let native = NativeMachine::new(MEM, 46).unwrap();
    let (kvm, mut v) = vm();
    build_pae(&native);
    build_pae(&*kvm);
    let mut n = native;
    boot_pae(&mut n);
    boot_pae(&mut v);
    // Accesses over 4 KiB and 2 MiB guest pages.
    for i in 0..256u64 {
        let a = Gva::new(0x40_0000 + i * 0x3_1000 % 0xc0_0000);
        n.write(a, 8, i).unwrap();
        v.write(a, 8, i).unwrap();
        same(n.read(a, 8), v.read(a, 8), "read back");
    }
    kvm.audit().unwrap();
    // Unmapped (beyond the PD): the same #PF.
    same(n.read(Gva::new(0x4000_0000), 8), v.read(Gva::new(0x4000_0000), 8), "unmapped");
    // The guest remaps a page by storing to its PTE, then INVLPG.
    let x = Gva::new(0x40_0000);
    let pte = Gva::new(0x3000 + 2 * 0x1000); // PT of [4, 6) MiB, entry 0
    n.write(Gva::new(0x50_0000), 8, 0xabc).unwrap();
    v.write(Gva::new(0x50_0000), 8, 0xabc).unwrap();
    for (i, target) in [0x50_0000u64, 0x40_0000, 0x50_0000].iter().enumerate() {
        let e = n.read(pte, 8).unwrap() & !0x000f_ffff_ffff_f000 | target;
        n.write(pte, 8, e).unwrap();
        v.write(pte, 8, e).unwrap();
        n.invlpg(x);
        v.invlpg(x);
        same(n.read(x, 8), v.read(x, 8), &format!("after remap {i}"));
        kvm.audit().unwrap();
    }
    // A PDE rewrite (emulated under shadow), then a CR3 reload.
    let pde = Gva::new(0x2000 + 2 * 8);
    let e = n.read(pde, 8).unwrap();
    n.write(pde, 8, e & !1).unwrap();
    v.write(pde, 8, e & !1).unwrap();
    n.write_cr3(0x1000).unwrap();
    v.write_cr3(0x1000).unwrap();
    same(n.read(x, 8), v.read(x, 8), "PDE cleared");
    n.write(pde, 8, e).unwrap();
    v.write(pde, 8, e).unwrap();
    n.write_cr3(0x1000).unwrap();
    v.write_cr3(0x1000).unwrap();
    same(n.read(x, 8), v.read(x, 8), "PDE restored");
    // Guest A/D bits agree everywhere in the tables.
    for a in (0x1000..0xb000u64).step_by(8) {
        assert_eq!(native_read(&n, a), kvm.read_phys(Gpa::new(a), 8).unwrap(), "table word at {a:#x}");
    }
    kvm.audit().unwrap();
}

fn native_read(n: &NativeMachine, gpa: u64) -> u64 {
    n.read_phys(Gpa::new(gpa), 8).unwrap()
}

#[test]
fn non_paging_guest_under_shadow_paging_matches_native() {
    let mut n = NativeMachine::new(MEM, 46).unwrap();
    let (kvm, mut v) = vm();
    for i in 0..512u64 {
        let a = Gva::new(i * 0x7_3000 % MEM);
        n.write(a, 8, i).unwrap();
        v.write(a, 8, i).unwrap();
        same(n.read(a, 8), v.read(a, 8), "identity");
    }
    // Beyond RAM: open bus natively, MMIO (all ones) under the VM.
    same(n.read(Gva::new(0x8000_0000), 8), v.read(Gva::new(0x8000_0000), 8), "beyond RAM");
    kvm.audit().unwrap();
    // Then turn PAE paging on: the roots change mode.
    build_pae(&n);
    build_pae(&*kvm);
    boot_pae(&mut n);
    boot_pae(&mut v);
    same(n.read(Gva::new(0x40_0000), 8), v.read(Gva::new(0x40_0000), 8), "after enabling paging");
    kvm.audit().unwrap();
}

/// 32-bit tables: PD at 0x1000 (1024 4-byte entries); PTs from 0x2000 mapping [0, 8 MiB) with
/// 4 KiB pages; 4 MiB PSE pages for [8, 16) MiB. Supervisor, writable, A/D clear.
fn build_32(m: &dyn BootMem) {
    for pd in 0..2u64 {
        let pt = 0x2000 + pd * 0x1000;
        m.write_phys(Gpa::new(0x1000 + pd * 4), 4, pt | 3).unwrap();
        for i in 0..1024u64 {
            m.write_phys(Gpa::new(pt + i * 4), 4, ((pd << 22) + (i << 12)) | 3).unwrap();
        }
    }
    for pd in 2..4u64 {
        m.write_phys(Gpa::new(0x1000 + pd * 4), 4, (pd << 22) | 0x83).unwrap();
    }
}

fn boot_32(c: &mut dyn GuestCpu) {
    c.write_cr4(Cr4::PSE).unwrap();
    c.write_cr3(0x1000).unwrap();
    c.write_cr0(Cr0::PE | Cr0::PG | Cr0::WP).unwrap();
}

#[test]
fn thirty_two_bit_guest_under_shadow_paging_matches_native() {
    let native = NativeMachine::new(MEM, 46).unwrap();
    let (kvm, mut v) = vm();
    build_32(&native);
    build_32(&*kvm);
    let mut n = native;
    boot_32(&mut n);
    boot_32(&mut v);
    // Accesses across both halves of each guest page table and both 4 MiB pages.
    for i in 0..512u64 {
        let a = Gva::new(0x10_0000 + i * 0x2_9000 % 0xf0_0000);
        n.write(a, 4, i).unwrap();
        v.write(a, 4, i).unwrap();
        same(n.read(a, 4), v.read(a, 4), "read back");
    }
    kvm.audit().unwrap();
    same(n.read(Gva::new(0x4000_0000), 4), v.read(Gva::new(0x4000_0000), 4), "unmapped PDE");
    // Remap a page in the upper half of a guest page table (bit 21 set: quadrant 1).
    let x = Gva::new(0x30_0000);
    let pte = Gva::new(0x2000 + (0x30_0000 >> 12) * 4);
    n.write(Gva::new(0x31_0000), 4, 0xabc).unwrap();
    v.write(Gva::new(0x31_0000), 4, 0xabc).unwrap();
    for (i, target) in [0x31_0000u64, 0x30_0000, 0x31_0000].iter().enumerate() {
        let e = (n.read(pte, 4).unwrap() & 0xfff) | target;
        n.write(pte, 4, e).unwrap();
        v.write(pte, 4, e).unwrap();
        n.invlpg(x);
        v.invlpg(x);
        same(n.read(x, 4), v.read(x, 4), &format!("after remap {i}"));
        kvm.audit().unwrap();
    }
    // Clear and restore a 4 MiB PDE with 4-byte stores (emulated: the PD is write-tracked).
    let pde = Gva::new(0x1000 + 3 * 4);
    let big = Gva::new(0xd0_0000);
    same(n.read(big, 4), v.read(big, 4), "4 MiB page");
    let e = n.read(pde, 4).unwrap();
    n.write(pde, 4, e & !1).unwrap();
    v.write(pde, 4, e & !1).unwrap();
    n.write_cr3(0x1000).unwrap();
    v.write_cr3(0x1000).unwrap();
    same(n.read(big, 4), v.read(big, 4), "4 MiB PDE cleared");
    n.write(pde, 4, e).unwrap();
    v.write(pde, 4, e).unwrap();
    n.write_cr3(0x1000).unwrap();
    v.write_cr3(0x1000).unwrap();
    same(n.read(big, 4), v.read(big, 4), "4 MiB PDE restored");
    for a in (0x1000..0x4000u64).step_by(4) {
        assert_eq!(
            n.read_phys(Gpa::new(a), 4).unwrap(),
            kvm.read_phys(Gpa::new(a), 4).unwrap(),
            "table entry at {a:#x}"
        );
    }
    kvm.audit().unwrap();
}
