//! Guest memory as KVM reads and writes it (`kvm_vcpu_read_guest`, `kvm_vcpu_write_guest`
//! and the emulator's MMIO path): gpa -> memslot -> the VMM's mapping -> host memory, or
//! the MMIO bus where no memslot is. Used by the emulator and by the shadow MMU, which reads
//! guest page-table entries through it; it calls neither.

use crate::host::HostMm;
use crate::memslot::Memslots;
use crate::mmio_bus::MmioBus;
use std::convert::Infallible;
use x86_paging::addr::{Gpa, Gva, Hpa};
use x86_paging::walk::GuestPhys;

/// Guest-physical memory as KVM sees it: memslots backed by the VMM's mapping, and the MMIO
/// bus for everything else (`kvm_vcpu_read_guest` plus the emulator's MMIO path).
pub struct KvmGuestMem<'a> {
    host: &'a HostMm,
    slots: &'a Memslots,
    bus: &'a MmioBus,
    ring: Option<&'a crate::dirty_log::DirtyRing>,
    /// MMIO accesses made.
    pub mmio_accesses: u64,
}

impl<'a> KvmGuestMem<'a> {
    /// A view over the memory the VMM's address space `host` maps, with the memslots
    /// `slots` and the MMIO bus `bus`.
    pub fn new(host: &'a HostMm, slots: &'a Memslots, bus: &'a MmioBus) -> Self {
        KvmGuestMem { host, slots, bus, ring: None, mmio_accesses: 0 }
    }

    /// Marks written pages in `ring` (the running vCPU's dirty ring) instead of the bitmap.
    pub fn with_ring(mut self, ring: Option<&'a crate::dirty_log::DirtyRing>) -> Self {
        self.ring = ring;
        self
    }

    /// Host address of `gpa` if it is guest RAM (writable when `write`).
    fn host_addr(&self, gpa: Gpa, write: bool) -> Option<Hpa> {
        let slot = self.slots.find(gpa.gfn())?;
        if write && slot.readonly() {
            return None;
        }
        if write {
            // kvm_vcpu_write_guest marks the page dirty.
            crate::dirty_log::mark_page_dirty_in_slot(self.ring, slot, gpa.gfn());
        }
        let hva = slot.gfn_to_hva(gpa.gfn());
        let p = self.host.get_user_page(hva, write).ok()?;
        Some(Hpa::new(p.pfn.hpa().raw() + gpa.page_offset()))
    }

    /// Reads `size` bytes (within one page) at `gpa`.
    pub fn read(&mut self, gpa: Gpa, size: u8) -> u64 {
        match self.host_addr(gpa, false) {
            Some(h) => self.host.frames().mem().read(h, size),
            None => {
                self.mmio_accesses += 1;
                self.bus.read(gpa, size)
            }
        }
    }

    /// Writes `size` bytes (within one page) at `gpa`: to guest RAM (returns true) or, where
    /// no writable memslot is, to the MMIO bus (returns false).
    pub fn write(&mut self, gpa: Gpa, size: u8, val: u64) -> bool {
        match self.host_addr(gpa, true) {
            Some(h) => {
                self.host.frames().mem().write(h, size, val);
                true
            }
            None => {
                self.mmio_accesses += 1;
                self.bus.write(gpa, size, val);
                false
            }
        }
    }
}

impl GuestPhys for KvmGuestMem<'_> {
    type Error = Infallible;
    fn read_pte(&mut self, gpa: Gpa, size: u8, _gva: Gva) -> Result<u64, Infallible> {
        Ok(self.read(gpa, size))
    }
    fn cmpxchg_pte(&mut self, gpa: Gpa, size: u8, old: u64, new: u64, _gva: Gva) -> Result<bool, Infallible> {
        let Some(h) = self.host_addr(gpa, true) else {
            // A/D bits of a table in MMIO or read-only memory cannot be set; hardware would
            // write to the device. Treat it as done.
            return Ok(true);
        };
        let mem = self.host.frames().mem();
        if size == 8 {
            return Ok(mem.cmpxchg(h, old, new).is_ok());
        }
        let word = Hpa::new(h.raw() & !7);
        let shift = (h.raw() & 7) * 8;
        let cur = mem.load(word);
        if crate::num::low32(cur >> shift) != crate::num::low32(old) {
            return Ok(false);
        }
        let m = 0xffff_ffffu64 << shift;
        Ok(mem.cmpxchg(word, cur, (cur & !m) | ((new & 0xffff_ffff) << shift)).is_ok())
    }
}
