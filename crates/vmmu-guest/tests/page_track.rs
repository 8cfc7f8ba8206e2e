//! Page-track notifiers (`kvm_page_track_register_notifier`): every write the emulator makes
//! to guest RAM reaches the registered notifiers and then the shadow MMU
//! (`kvm_mmu_track_write`); MMIO writes reach neither; deleting a memslot calls
//! `track_remove_region`. The emulator does not ask which MMU the VM runs.

use std::sync::{Arc, Mutex};
use vmmu::host::{Backing, FrameAllocator, HostMm};
use vmmu::memslot::{MemslotFlags, UserspaceMemoryRegion};
use vmmu::mmio_bus::LatchDevice;
use vmmu::mmu::page_track::PageTrackNotifier;
use vmmu::x86_paging::addr::{Gfn, Gpa, Gva};
use vmmu::x86_paging::regs::{Cr0, Cr4, Efer};
use vmmu::{Kvm, MmuKind, Vcpu, VmConfig};
use vmmu_guest::boot::BootMem;

const MEM: u64 = 16 << 20;
/// A device window above guest RAM, mapped by the guest at the same virtual address.
const MMIO: u64 = 0x1000_0000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Write { gpa: u64, new: u64, bytes: u8 },
    RemoveRegion { gfn: u64, npages: u64 },
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Event>>);

impl PageTrackNotifier for Recorder {
    fn track_write(&self, gpa: Gpa, new: u64, bytes: u8) {
        self.0.lock().unwrap().push(Event::Write { gpa: gpa.raw(), new, bytes });
    }
    fn track_remove_region(&self, gfn: Gfn, npages: u64) {
        self.0.lock().unwrap().push(Event::RemoveRegion { gfn: gfn.raw(), npages });
    }
}

impl Recorder {
    fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn slot0(hva: u64, size: u64) -> UserspaceMemoryRegion {
    UserspaceMemoryRegion {
        slot: 0,
        flags: MemslotFlags::empty(),
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: vmmu::host::Hva(hva),
    }
}

/// A PAE guest: PDPT at 0x1000, PD at 0x2000, PT at 0x3000 mapping [0, 2 MiB) with 4 KiB
/// pages, 2 MiB pages for [2, 16) MiB and for the device window at `MMIO`.
fn vm(mmu: MmuKind) -> (Arc<Kvm>, Vcpu, u64) {
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

#[test]
fn shadow_mmu_guest_table_writes_reach_notifiers_and_the_mmu() {
    let (kvm, mut v, hva) = vm(MmuKind::Shadow);
    let rec = Arc::new(Recorder::default());
    let n: Arc<dyn PageTrackNotifier> = rec.clone();
    kvm.kvm_page_track_register_notifier(n.clone());
    // Shadow the PD (gfn 2, an upper-level table: write-tracked) and the 2 MiB mapping.
    assert_eq!(v.read(Gva::new(0x40_0000), 8).unwrap(), 0);
    assert_eq!(rec.take(), vec![], "reads are not tracked writes");
    let pte_writes = kvm.vm_stats()["mmu_pte_write"];
    // The guest rewrites PD entry 7 through the identity mapping: the write is emulated.
    let new = (7u64 << 21) | 0x83 | 1 << 63;
    v.write(Gva::new(0x2000 + 7 * 8), 8, new).unwrap();
    assert_eq!(rec.take(), vec![Event::Write { gpa: 0x2038, new, bytes: 8 }]);
    assert_eq!(kvm.vm_stats()["mmu_pte_write"], pte_writes + 1, "the shadow MMU saw it after the notifier");
    // A 4-byte write reports its 4 bytes, not the rest of the operand.
    v.write(Gva::new(0x2000 + 6 * 8 + 4), 4, 0x8000_0000).unwrap();
    assert_eq!(rec.take(), vec![Event::Write { gpa: 0x2034, new: 0x8000_0000, bytes: 4 }]);
    // Ordinary data writes run on the hardware: nothing to notify.
    v.write(Gva::new(0x40_0000), 8, 5).unwrap();
    assert_eq!(rec.take(), vec![]);
    // An emulated MMIO write goes to the device, not to the notifiers nor the MMU
    // (emulator_write_phys fails for MMIO, so kvm_page_track_write never runs).
    let pte_writes = kvm.vm_stats()["mmu_pte_write"];
    v.write(Gva::new(MMIO), 4, 0xabcd).unwrap();
    assert_eq!(v.read(Gva::new(MMIO), 4).unwrap(), 0xabcd);
    assert_eq!(rec.take(), vec![]);
    assert_eq!(kvm.vm_stats()["mmu_pte_write"], pte_writes, "MMIO writes are not tracked writes");
    kvm.audit().unwrap();
    // Deleting the memslot tells the notifiers which gfns went away.
    drop(v);
    kvm.set_user_memory_region(slot0(hva, 0)).unwrap();
    assert_eq!(rec.take(), vec![Event::RemoveRegion { gfn: 0, npages: MEM >> 12 }]);
    assert!(kvm.kvm_page_track_unregister_notifier(&n));
    assert!(!kvm.kvm_page_track_unregister_notifier(&n), "already gone");
}

#[test]
fn tdp_mmu_has_no_shadowed_tables_but_notifiers_still_hear_ram_writes() {
    let (kvm, mut v, _) = vm(MmuKind::Tdp);
    let rec = Arc::new(Recorder::default());
    kvm.kvm_page_track_register_notifier(rec.clone());
    // Guest page-table writes run on the hardware under TDP (nothing is write-protected).
    v.write(Gva::new(0x2000 + 7 * 8), 8, (7u64 << 21) | 0x83).unwrap();
    v.write(Gva::new(0x40_0000), 8, 1).unwrap();
    v.write(Gva::new(MMIO), 8, 7).unwrap();
    assert_eq!(v.read(Gva::new(MMIO), 8).unwrap(), 7);
    assert_eq!(rec.take(), vec![], "no emulated RAM write happened");
    assert_eq!(kvm.vm_stats()["mmu_pte_write"], 0);
    kvm.audit().unwrap();
}
