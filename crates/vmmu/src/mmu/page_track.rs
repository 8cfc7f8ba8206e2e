//! Write tracking (`page_track`): a count per gfn of reasons the gfn must never be mapped
//! writable — upper-level guest page tables that have shadow pages. A write to a tracked
//! gfn is emulated, and the MMU is told about it.
//!
//! Guest writes reach the MMU the way KVM routes them: the emulator calls
//! [`kvm_page_track_write`] after every write it performs, which tells the registered
//! [`PageTrackNotifier`]s (KVM's `kvm_page_track_notifier_node`s, e.g. KVMGT) and then the
//! shadow MMU (`kvm_mmu_track_write`). The emulator never asks which MMU the VM runs.

use crate::sync::{Arc, AtomicBool, Ordering, RwLock};
use crate::vm::{Kvm, VcpuArch};
use x86_paging::addr::{Gfn, Gpa};

/// A page-track notifier (`struct kvm_page_track_notifier_node`): told about every write
/// the emulator makes to guest memory and about memslots going away.
pub trait PageTrackNotifier: Send + Sync {
    /// `track_write`: the guest wrote `bytes` bytes (value `new`, little-endian) at `gpa`;
    /// memory already holds the new value.
    fn track_write(&self, gpa: Gpa, new: u64, bytes: u8);
    /// `track_remove_region`: the memslot covering [`gfn`, `gfn + npages`) was deleted or
    /// moved.
    fn track_remove_region(&self, _gfn: Gfn, _npages: u64) {}
}

/// The registered notifiers (`kvm->arch.track_notifier_head`).
#[derive(Default)]
pub struct PageTrackNotifiers {
    list: RwLock<Vec<Arc<dyn PageTrackNotifier>>>,
    /// Whether `list` is non-empty, read without the lock on every emulated write.
    any: AtomicBool,
}

impl std::fmt::Debug for PageTrackNotifiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageTrackNotifiers").field("registered", &self.list.read().len()).finish()
    }
}

impl PageTrackNotifiers {
    fn each(&self, mut f: impl FnMut(&dyn PageTrackNotifier)) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let list = self.list.read().clone();
        for n in &list {
            f(n.as_ref());
        }
    }
}

impl Kvm {
    /// `kvm_page_track_register_notifier`.
    pub fn kvm_page_track_register_notifier(&self, n: Arc<dyn PageTrackNotifier>) {
        let t = &self.mmu.page_track_notifiers;
        let mut list = t.list.write();
        list.push(n);
        t.any.store(true, Ordering::Release);
    }

    /// `kvm_page_track_unregister_notifier`: removes `n` (compared by address); returns
    /// whether it was registered.
    pub fn kvm_page_track_unregister_notifier(&self, n: &Arc<dyn PageTrackNotifier>) -> bool {
        let t = &self.mmu.page_track_notifiers;
        let mut list = t.list.write();
        let before = list.len();
        list.retain(|x| !Arc::ptr_eq(x, n));
        t.any.store(!list.is_empty(), Ordering::Release);
        list.len() != before
    }

    /// `kvm_page_track_delete_slot`: tells the notifiers a memslot went away.
    pub(crate) fn kvm_page_track_delete_slot(&self, gfn: Gfn, npages: u64) {
        self.mmu.page_track_notifiers.each(|n| n.track_remove_region(gfn, npages));
    }
}

/// `kvm_page_track_write`: the emulator wrote `bytes` bytes (`new`) at `gpa`. The external
/// notifiers first, then the MMU (`kvm_mmu_track_write`, which returns at once unless some
/// shadow page shadows a guest page table).
pub fn kvm_page_track_write(kvm: &Kvm, vcpu: &mut VcpuArch, gpa: Gpa, new: u64, bytes: u8) {
    kvm.mmu.page_track_notifiers.each(|n| n.track_write(gpa, new, bytes));
    super::shadow::kvm_mmu_track_write(kvm, vcpu, gpa, bytes);
}

/// `gfn_write_track` counters.
#[derive(Debug, Default)]
pub struct WriteTrack {
    count: super::page::FastMap<u64, u16>,
}

impl WriteTrack {
    /// `__kvm_write_track_add_gfn`.
    pub fn add(&mut self, gfn: Gfn) {
        let c = self.count.entry(gfn.raw()).or_insert(0);
        *c = c.saturating_add(1);
    }

    /// `__kvm_write_track_remove_gfn`.
    pub fn remove(&mut self, gfn: Gfn) {
        if let Some(c) = self.count.get_mut(&gfn.raw()) {
            *c -= 1;
            if *c == 0 {
                self.count.remove(&gfn.raw());
            }
        }
    }

    /// `kvm_gfn_is_write_tracked`.
    pub fn is_tracked(&self, gfn: Gfn) -> bool {
        self.count.contains_key(&gfn.raw())
    }

    /// Every tracked gfn (for the audit).
    pub fn tracked(&self) -> Vec<Gfn> {
        self.count.keys().map(|g| Gfn::new(*g)).collect()
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.count.clear();
    }
}
