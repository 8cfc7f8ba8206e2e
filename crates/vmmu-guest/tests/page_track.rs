//! Page-track notifiers (`kvm_page_track_register_notifier`): every write the emulator makes
//! to guest RAM reaches the registered notifiers and then the shadow MMU
//! (`kvm_mmu_track_write`); MMIO writes reach neither; deleting a memslot calls
//! `track_remove_region`. The emulator does not ask which MMU the VM runs.

mod pae_guest;

use pae_guest::{slot0, vm, MEM, MMIO};
use std::sync::{Arc, Mutex};
use vmmu::mmu::page_track::PageTrackNotifier;
use vmmu::x86_paging::addr::{Gfn, Gpa, Gva};
use vmmu::MmuKind;

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
