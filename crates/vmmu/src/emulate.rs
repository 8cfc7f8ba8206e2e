//! The instruction emulator's memory side: when the MMU returns RET_PF_EMULATE, KVM walks
//! the guest's page tables in software (through memslots) and performs the access itself —
//! to guest RAM through the VMM's mapping, or to an MMIO device (KVM_EXIT_MMIO).

use crate::hw::cpu::Exception;
use crate::memslot::Memslots;
use crate::mmio_bus::MmioBus;
use crate::vm::{GuestError, Kvm, VcpuArch};
use std::convert::Infallible;
use x86_paging::access::{Access, AccessKind};
use x86_paging::addr::{Gpa, Gva, Hpa};
use x86_paging::walk::{walk, GuestPhys, NoObserver, WalkError, WalkOptions};

/// Guest-physical memory as KVM sees it: memslots backed by the VMM's mapping, and the MMIO
/// bus for everything else (`kvm_vcpu_read_guest` plus the emulator's MMIO path).
pub struct KvmGuestMem<'a> {
    kvm: &'a Kvm,
    slots: &'a Memslots,
    bus: &'a MmioBus,
    ring: Option<&'a crate::dirty_log::DirtyRing>,
    /// MMIO accesses made.
    pub mmio_accesses: u64,
}

impl<'a> KvmGuestMem<'a> {
    /// A view over `kvm`'s memory with the memslots `slots`.
    pub fn new(kvm: &'a Kvm, slots: &'a Memslots, bus: &'a MmioBus) -> Self {
        KvmGuestMem { kvm, slots, bus, ring: None, mmio_accesses: 0 }
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
        let p = self.kvm.host().get_user_page(hva, write).ok()?;
        Some(Hpa::new(p.pfn.hpa().raw() + gpa.page_offset()))
    }

    /// Reads `size` bytes (within one page) at `gpa`.
    pub fn read(&mut self, gpa: Gpa, size: u8) -> u64 {
        match self.host_addr(gpa, false) {
            Some(h) => self.kvm.mem().read(h, size),
            None => {
                self.mmio_accesses += 1;
                self.bus.read(gpa, size)
            }
        }
    }

    /// Writes `size` bytes (within one page) at `gpa`.
    pub fn write(&mut self, gpa: Gpa, size: u8, val: u64) {
        match self.host_addr(gpa, true) {
            Some(h) => self.kvm.mem().write(h, size, val),
            None => {
                self.mmio_accesses += 1;
                self.bus.write(gpa, size, val)
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
        let mem = self.kvm.mem();
        if size == 8 {
            return Ok(mem.cmpxchg(h, old, new).is_ok());
        }
        let word = Hpa::new(h.raw() & !7);
        let shift = (h.raw() & 7) * 8;
        let cur = mem.load(word);
        if (cur >> shift) as u32 != old as u32 {
            return Ok(false);
        }
        let m = 0xffff_ffffu64 << shift;
        Ok(mem.cmpxchg(word, cur, (cur & !m) | ((new & 0xffff_ffff) << shift)).is_ok())
    }
}

/// Emulates one guest access (`x86_emulate_instruction` for a load or store).
pub fn emulate_access(
    kvm: &Kvm,
    vcpu: &mut VcpuArch,
    gva: Gva,
    size: u8,
    kind: AccessKind,
    val: u64,
) -> Result<u64, GuestError> {
    let _f = kvm.tracer.func(vcpu.id, "x86_emulate_instruction");
    vcpu.refresh_memslots(kvm);
    let slots = vcpu.slots.clone();
    let bus = kvm.mmio_bus();
    let ring = vcpu.dirty_ring.clone();
    let mut mem = KvmGuestMem::new(kvm, &slots, &bus).with_ring(ring.as_deref());
    let st = *vcpu.cpu.paging();
    let access = Access { kind, cpl: vcpu.cpu.cpl(), implicit_supervisor: false, eflags_ac: vcpu.cpu.eflags_ac() };
    let in_page = 4096 - (gva.raw() & 0xfff);
    let first = u64::from(size).min(in_page) as u8;
    let mut gpas = [(Gpa::new(0), 0u8); 2];
    let parts: &[(u64, u8)] = if first < size { &[(0, first), (first as u64, size - first)] } else { &[(0, size)] };
    for (i, (off, len)) in parts.iter().enumerate() {
        let a = Gva::new(gva.raw() + off);
        let t = loop {
            match walk(&mut mem, &st, a, &access, WalkOptions::ARCH, &mut NoObserver) {
                Ok(t) => break t,
                Err(WalkError::Contended) => continue,
                Err(WalkError::PageFault(ec)) => {
                    vcpu.stat.pf_guest += 1;
                    vcpu.cpu.cr2 = a.raw();
                    return Err(GuestError::Exception(Exception::PageFault { cr2: a.raw(), error_code: ec }));
                }
                Err(WalkError::NonCanonical) => return Err(GuestError::Exception(Exception::GeneralProtection)),
                Err(WalkError::Mem(never)) => match never {},
            }
        };
        gpas[i] = (t.gpa, *len);
    }
    let mut out = 0u64;
    let mut shift = 0;
    for (gpa, len) in gpas.iter().take(parts.len()) {
        match kind {
            AccessKind::Write => {
                mem.write(*gpa, *len, val >> shift);
                if kvm.config().mmu == crate::vm::MmuKind::Shadow {
                    // The page-track notifier: the write may hit a shadowed guest table.
                    crate::mmu::shadow::kvm_mmu_track_write(kvm, vcpu, *gpa, *len);
                }
            }
            _ => out |= mem.read(*gpa, *len) << shift,
        }
        shift += 8 * u32::from(*len);
    }
    if mem.mmio_accesses > 0 {
        vcpu.stat.mmio_exits += 1;
    }
    Ok(out)
}
