//! Guest writes to shadowed page tables (`kvm_mmu_track_write`): stale SPTEs zapped,
//! misaligned or flooding writes zap the page.

use super::*;

/// `kvm_mmu_track_write`: the emulator wrote `bytes` at `gpa`, which may be a shadowed guest
/// page table: zap the SPTEs the written entries made stale, and zap pages that are written
/// misaligned or flooded with writes no fault uses.
pub fn kvm_mmu_track_write(kvm: &Kvm, vcpu: &mut VcpuArch, gpa: x86_paging::addr::Gpa, bytes: u8) {
    // No page shadows a guest table, so none is write-protected: nothing to do, and no
    // reason to take mmu_lock (a TDP MMU VM always leaves here).
    if kvm.mmu.indirect_shadow_pages.load(Ordering::Acquire) == 0 {
        return;
    }
    with_ctx!(kvm, vcpu, |ctx| {
        if kvm.mmu.indirect_shadow_pages.load(Ordering::Relaxed) == 0 {
            return;
        }
        kvm.stats.mmu_pte_write.add(1);
        let bus = kvm.mmio_bus(); // mmu_pte_write_fetch_gpte: a 4-byte write to 8-byte entries reads the whole entry.
        let four_byte_guest =
            ctx.vcpu.as_ref().is_some_and(|v| v.cpu.paging().mode() == x86_paging::mode::PagingMode::Bits32);
        let (at, size) = match bytes {
            4 if !four_byte_guest => (gpa.raw() & !7, 8),
            4 | 8 => (gpa.raw(), bytes),
            _ => (gpa.raw(), 0),
        };
        let gentry = if size == 0 {
            0
        } else {
            crate::guest_mem::KvmGuestMem::new(kvm.host(), &ctx.slots, &bus).read(x86_paging::addr::Gpa::new(at), size)
        };
        let mut flush = false;
        for id in ctx.s.pages.with_gfn(gpa.gfn()) {
            if !ctx.s.pages.exists(id) {
                continue;
            }
            let (direct, invalid, level, four, quadrant) = {
                let sp = ctx.s.pages.get(id);
                (
                    sp.role.direct() != 0,
                    sp.role.invalid() != 0,
                    sp.role.level(),
                    sp.role.has_4_byte_gpte() != 0,
                    sp.role.quadrant(),
                )
            };
            if direct || invalid {
                continue;
            }
            let offset = gpa.raw() & 0xfff;
            let pte_size = if four { 4 } else { 8 };
            let misaligned =
                bytes != 1 && (((offset ^ (offset + u64::from(bytes) - 1)) & !(pte_size - 1)) != 0 || bytes < 4);
            // get_written_sptes: a 4-byte entry is shadowed by one 8-byte SPTE in the page of
            // its quadrant, a 4-byte PDE (4 MiB) by two.
            let (mut spte_off, mut nspte) = (offset, 1u64);
            if four {
                spte_off <<= 1;
                if level == 2 {
                    spte_off &= !7;
                    spte_off <<= 1;
                    nspte = 2;
                }
                if spte_off >> 12 != u64::from(quadrant) {
                    continue;
                }
                spte_off &= 0xfff;
            }
            let flooded = level > 1 && {
                let sp = ctx.s.pages.get_mut(id);
                sp.write_flooding_count += 1;
                sp.write_flooding_count >= 3
            };
            if misaligned || flooded {
                ctx.prepare_zap_page(id);
                kvm.stats.mmu_flooded.add(1);
                continue;
            }
            for k in 0..nspte {
                let sptep = ctx.s.pages.get(id).sptep(spte_off / 8 + k);
                let old = Spte(kvm.mem().load(sptep));
                ctx.zap_pte(sptep);
                flush |= old.is_shadow_present();
                if gentry != 0 && level > 1 {
                    kvm.stats.mmu_pde_zapped.add(1);
                }
            }
        }
        ctx.commit_zap_page();
        if flush {
            kvm.flush_remote_tlbs(Some(ctx.cpu));
        }
    });
}
