//! The instruction emulator's memory side: when the MMU returns RET_PF_EMULATE, KVM walks
//! the guest's page tables in software (through memslots) and performs the access itself —
//! to guest RAM through the VMM's mapping, or to an MMIO device (KVM_EXIT_MMIO).

use crate::guest_mem::KvmGuestMem;
use crate::hw::cpu::Exception;
use crate::vm::{GuestError, Kvm, VcpuArch};
use x86_paging::access::{Access, AccessKind};
use x86_paging::addr::{Gpa, Gva};
use x86_paging::walk::{walk, NoObserver, WalkError, WalkOptions};

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
    let mut mem = KvmGuestMem::new(kvm.host(), &slots, &bus).with_ring(ring.as_deref());
    let st = *vcpu.cpu.paging();
    let access = Access { kind, cpl: vcpu.cpu.cpl(), implicit_supervisor: false, eflags_ac: vcpu.cpu.eflags_ac() };
    let in_page = 4096 - (gva.raw() & 0xfff);
    let first = u8::try_from(u64::from(size).min(in_page)).unwrap_or(size);
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
                // emulator_write_phys: a write to guest RAM, then the page-track notifiers
                // (it may have hit a shadowed guest page table); MMIO goes to the device.
                let part = (val >> shift) & (u64::MAX >> (64 - 8 * u32::from(*len)));
                if mem.write(*gpa, *len, part) {
                    crate::mmu::page_track::kvm_page_track_write(kvm, vcpu, *gpa, part, *len);
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
