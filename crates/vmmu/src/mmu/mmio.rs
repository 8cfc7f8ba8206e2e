//! MMIO SPTEs: `handle_mmio_page_fault`, `check_mmio_spte` and the cached MMIO info.
//!
//! An access to a gfn outside every memslot leaves an MMIO SPTE behind (an EPT
//! misconfiguration value, or reserved bit 51 for NPT) that records the gfn and the memslot
//! generation; the next access exits with "reserved"/misconfig and is sent to emulation
//! without a page-table walk, unless the generation changed since.

use super::page_fault::RetPf;
use super::spte::{Spte, MMIO_SPTE_GEN_MASK};
use crate::vm::{Kvm, VcpuArch};
use x86_paging::addr::{Gfn, Gpa, Gva, Hpa};

/// The error code flags as the kernel's `__print_flags` prints them ("P|W|U").
pub fn pferr_flags(ec: u64) -> String {
    let names = [(0, "P"), (1, "W"), (2, "U"), (5, "PK"), (6, "SS"), (15, "SGX"), (3, "RSVD"), (4, "F")];
    let v: Vec<&str> = names.iter().filter(|(b, _)| ec & (1 << b) != 0).map(|(_, n)| *n).collect();
    v.join("|")
}

/// `check_mmio_spte`: whether the SPTE's generation is the memslots' current one.
fn check_mmio_spte(kvm: &Kvm, vcpu: &VcpuArch, spte: Spte) -> bool {
    let kvm_gen = vcpu.slots.generation() & MMIO_SPTE_GEN_MASK;
    let spte_gen = spte.mmio_gen();
    if kvm.tracer.events_on() {
        kvm.tracer.event(
            vcpu.id,
            "check_mmio_spte",
            format_args!(
                "spte {:x} kvm_gen {:x} spte-gen {:x} valid {}",
                spte.0,
                kvm_gen,
                spte_gen,
                (kvm_gen == spte_gen) as u8
            ),
        );
    }
    kvm_gen == spte_gen
}

/// The table and level of the shadow root that translates `gva` (the vCPU's reference
/// keeps the root itself alive after the shadow lock is dropped).
fn shadow_root_table(kvm: &Kvm, vcpu: &VcpuArch, gva: Gva) -> Option<(Hpa, u8)> {
    let (sp, level) = vcpu.shadow.root_for(gva)?;
    let s = kvm.mmu.shadow.lock();
    s.pages.exists(sp).then(|| (s.pages.get(sp).spt_hpa(), level))
}

/// `handle_mmio_page_fault`: `addr` is the gpa (TDP) or the gva (shadow paging).
pub fn handle_mmio_page_fault(kvm: &Kvm, vcpu: &mut VcpuArch, addr: u64) -> RetPf {
    let _f = kvm.tracer.func(vcpu.id, "handle_mmio_page_fault");
    vcpu.refresh_memslots(kvm);
    let direct = vcpu.mmu.ctx.direct;
    // mmio_info_in_cache: by gpa for a direct MMU, by gva for a shadow one.
    let key = if direct { addr >> 12 } else { addr >> 12 | 1 << 63 };
    if vcpu.mmu.mmio_gfn == Some((key, vcpu.slots.generation())) {
        return RetPf::Emulate;
    }
    let m = kvm.mmu().masks;
    let spte = if direct {
        let (root_hpa, root_level) = match (vcpu.mmu.root.as_deref(), vcpu.shadow.root) {
            (Some(r), _) => (r.hpa, r.level()),
            (None, Some(r)) => (r.hpa, vcpu.shadow.root_role.level()),
            (None, None) => return RetPf::Retry,
        };
        // get_mmio_spte: the lockless walk to the last SPTE.
        super::fast_pf::walk_shadow_page_lockless_begin(vcpu);
        let (_, spte, _) = super::tdp_iter::last_spte(kvm.mem(), root_hpa, root_level, Gpa::new(addr).gfn());
        super::fast_pf::walk_shadow_page_lockless_end(vcpu);
        spte
    } else {
        // get_mmio_spte for an indirect MMU: the same lockless last-SPTE lookup, indexed by
        // the gva, from the root's table. No lock is taken inside the bracket: a remote flush
        // made under the shadow lock waits for this vCPU.
        let Some((table, level)) = shadow_root_table(kvm, vcpu, Gva::new(addr)) else { return RetPf::Retry };
        super::fast_pf::walk_shadow_page_lockless_begin(vcpu);
        let (_, spte, _) = super::tdp_iter::last_spte(kvm.mem(), table, level, Gfn::new(addr >> 12));
        super::fast_pf::walk_shadow_page_lockless_end(vcpu);
        spte
    };
    if spte.is_mmio(&m) {
        let gfn = spte.mmio_gfn(&m);
        let access = spte.mmio_access(&m);
        if !check_mmio_spte(kvm, vcpu, spte) {
            return RetPf::Invalid;
        }
        if kvm.tracer.events_on() {
            kvm.tracer.event(
                vcpu.id,
                "handle_mmio_page_fault",
                format_args!("addr:{:x} gfn {:x} access {:x}", 0, gfn.raw(), access),
            );
        }
        vcpu.mmu.mmio_gfn = Some((if direct { gfn.raw() } else { key }, vcpu.slots.generation()));
        return RetPf::Emulate;
    }
    // The SPTE was zapped by someone else: let the vCPU fault again.
    RetPf::Retry
}

#[cfg(test)]
mod tests {
    #[test]
    fn flags_print_like_the_kernel() {
        assert_eq!(super::pferr_flags(0x3), "P|W");
        assert_eq!(super::pferr_flags(0x1c), "U|RSVD|F");
        assert_eq!(super::pferr_flags(0), "");
    }
}
