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
        // mmu_pte_write_fetch_gpte: with PAE paging (CR4.PAE: PAE and 64-bit guests) a 4-byte
        // write is half of an 8-byte entry, so the whole entry is read and the write is
        // treated as 8 bytes at the entry (for the checks below too).
        let pae = ctx.vcpu.as_ref().is_some_and(|v| v.cpu.paging().cr4.contains(x86_paging::regs::Cr4::PAE));
        let (gpa, bytes) = if pae && bytes == 4 { (gpa.raw() & !7, 8u8) } else { (gpa.raw(), bytes) };
        let bus = kvm.mmio_bus();
        let gentry = match bytes {
            4 | 8 => crate::guest_mem::KvmGuestMem::new(kvm.host(), &ctx.slots, &bus)
                .read(x86_paging::addr::Gpa::new(gpa), bytes),
            _ => 0,
        };
        drop(bus);
        kvm.stats.mmu_pte_write.add(1);
        let mut flush = false;
        let gfn = x86_paging::addr::Gpa::new(gpa).gfn();
        for id in ctx.s.pages.with_gfn(gfn) {
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
            // for_each_gfn_valid_sp_with_gptes.
            if direct || invalid {
                continue;
            }
            let offset = gpa & 0xfff;
            if detect_write_misaligned(offset, bytes, four) || ctx.detect_write_flooding(id, level) {
                ctx.prepare_zap_page(id);
                kvm.stats.mmu_flooded.add(1);
                continue;
            }
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
        ctx.remote_flush_or_zap(flush);
    });
}

/// `detect_write_misaligned`: a write that is not within one guest entry, or smaller than 4
/// bytes, suggests the page is no page table any more. A 1-byte write at the start of an
/// entry is exempt (Linux's `clear_bit` updates status bits with one `andb`).
fn detect_write_misaligned(offset: u64, bytes: u8, four_byte_gpte: bool) -> bool {
    let pte_size: u64 = if four_byte_gpte { 4 } else { 8 };
    if offset & (pte_size - 1) == 0 && bytes == 1 {
        return false;
    }
    let crosses = (offset ^ (offset + u64::from(bytes) - 1)) & !(pte_size - 1) != 0;
    crosses || bytes < 4
}

impl Ctx<'_> {
    /// `detect_write_flooding`: the third emulated write to an upper-level table that no
    /// fault used in between means it is probably no longer one (leaf tables can go unsync
    /// instead, so they are exempt).
    fn detect_write_flooding(&mut self, id: SpId, level: u8) -> bool {
        if level == 1 {
            return false;
        }
        let sp = self.s.pages.get_mut(id);
        sp.write_flooding_count += 1;
        sp.write_flooding_count >= 3
    }
}

#[cfg(test)]
mod tests {
    use super::detect_write_misaligned;

    #[test]
    fn misaligned_writes_as_kvm_detects_them() {
        // Aligned 4- and 8-byte writes to 8-byte entries are fine.
        assert!(!detect_write_misaligned(0x10, 8, false));
        assert!(!detect_write_misaligned(0x14, 4, false));
        // Crossing an entry, or smaller than 4 bytes.
        assert!(detect_write_misaligned(0x14, 8, false));
        assert!(detect_write_misaligned(0x12, 2, false));
        // A 1-byte write is exempt only at the start of an entry.
        assert!(!detect_write_misaligned(0x18, 1, false));
        assert!(detect_write_misaligned(0x19, 1, false));
        assert!(!detect_write_misaligned(0x1c, 1, true));
        assert!(detect_write_misaligned(0x1d, 1, true));
        // 8 bytes over two 4-byte entries.
        assert!(detect_write_misaligned(0x10, 8, true));
    }
}
