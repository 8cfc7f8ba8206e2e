//! Roots: the shadow root role, `kvm_mmu_load` / `kvm_mmu_unload`, the fast CR3 switch
//! (`kvm_mmu_new_pgd`, previous roots), syncing roots, obsolete roots and INVLPG.

use super::*;

/// The root role of the guest's current paging mode (`kvm_calc_cpu_role` + the shadow
/// root rules: efer_nx forced on), or None for modes not shadowed yet.
pub fn shadow_root_role(st: &x86_paging::mode::PagingState) -> Option<Role> {
    use x86_paging::mode::PagingMode;
    use x86_paging::regs::{Cr0, Cr4};
    let level = match st.mode() {
        PagingMode::Level4 => 4,
        PagingMode::Level5 => 5,
        // PAE and 32-bit guests are shadowed with PAE roots (PT32E_ROOT_LEVEL).
        PagingMode::Pae | PagingMode::Bits32 => 3,
        // Paging off: direct pages under PAE roots, identity-mapping the 4 GiB the guest
        // can address.
        PagingMode::NonPaging => {
            return Some(Role(0).with_level(3).with_direct(1).with_access(ACC_ALL).with_efer_nx(1).with_cr0_wp(1))
        }
    };
    let wp = st.cr0.contains(Cr0::WP);
    let four_byte = st.mode() == PagingMode::Bits32;
    Some(
        Role(0)
            .with_level(level)
            .with_access(ACC_ALL)
            .with_efer_nx(1)
            .with_cr0_wp(u32::from(wp))
            .with_smep_andnot_wp(u32::from(st.cr4.contains(Cr4::SMEP) && !wp))
            .with_smap_andnot_wp(u32::from(st.cr4.contains(Cr4::SMAP) && !wp))
            .with_has_4_byte_gpte(u32::from(four_byte)),
    )
}

fn set_hw_root(vcpu: &mut VcpuArch, root: Option<RootInfo>, level: u8, dummy: Hpa) {
    let hpa = root.map_or(dummy, |r| r.hpa);
    vcpu.cpu.set_mode(crate::hw::cpu::CpuMode::Shadow(crate::hw::cpu::ShadowRoot { root: hpa, level, pdptrs: [0; 4] }));
}

/// `kvm_mmu_load` under shadow paging (`mmu_alloc_shadow_roots` + `kvm_mmu_sync_roots` +
/// load): the root shadow page for the guest's CR3.
pub fn kvm_mmu_load(kvm: &Kvm, vcpu: &mut VcpuArch) -> Result<(), crate::host::HostError> {
    crate::mmu::mmu::mmu_topup_memory_caches(kvm, vcpu)?;
    let st = *vcpu.cpu.paging();
    let dummy = dummy_root(kvm)?;
    let Some(role) = shadow_root_role(&st) else {
        // Nothing to shadow yet (paging off, or a mode not handled): every access faults
        // into the MMU, which says why.
        set_hw_root(vcpu, None, 4, dummy);
        return Ok(());
    };
    let pgd = st.cr3 & 0x000f_ffff_ffff_f000;
    vcpu.shadow.root_role = role;
    if role.level() == 3 {
        // mmu_alloc_shadow_roots / mmu_alloc_direct_roots with a PAE root: one page per
        // PDPTE (the guest's PDPTRs, or for paging off the four 1 GiB identity quarters).
        let direct = role.direct() != 0;
        let four_byte = role.has_4_byte_gpte() != 0;
        let child = role.with_level(2);
        let pdptrs = st.pdptrs;
        with_ctx!(kvm, vcpu, |ctx| {
            let mut sps = [None; 4];
            let mut hw = [0u64; 4];
            for i in 0..4 {
                let gfn = if direct {
                    Gfn::new((i as u64) << 18)
                } else if four_byte {
                    // A 32-bit guest's page directory, shadowed by four PAE directories
                    // (quadrant i maps the guest's i-th GiB).
                    Gfn::new(pgd >> 12)
                } else if pdptrs[i] & 1 != 0 {
                    Gfn::new((pdptrs[i] & 0x000f_ffff_ffff_f000) >> 12)
                } else {
                    continue;
                };
                let role_i =
                    if four_byte { child.with_quadrant(u32::try_from(i).expect("four PDPTEs")) } else { child };
                let id = ctx.get_shadow_page(gfn, role_i);
                ctx.s.pages.get_mut(id).root_count += 1;
                if ctx.s.pages.get(id).unsync_children > 0 {
                    ctx.sync_children(id);
                }
                sps[i] = Some(id);
                hw[i] = ctx.s.pages.get(id).spt_hpa().raw() | 1;
            }
            ctx.commit_zap_page();
            let v = ctx.vcpu.as_mut().expect("vcpu");
            v.shadow.pae = Some(sps);
            v.shadow.root = Some(RootInfo { pgd, sp: PAE_ROOTS, hpa: dummy });
            v.cpu.set_mode(crate::hw::cpu::CpuMode::Shadow(crate::hw::cpu::ShadowRoot {
                root: dummy,
                level: 3,
                pdptrs: hw,
            }));
            v.cpu.flush_tlb_current();
        });
        return Ok(());
    }
    with_ctx!(kvm, vcpu, |ctx| {
        let id = ctx.get_shadow_page(Gfn::new(pgd >> 12), role);
        ctx.s.pages.get_mut(id).root_count += 1;
        let hpa = ctx.s.pages.get(id).spt_hpa();
        if ctx.s.pages.get(id).unsync_children > 0 {
            ctx.sync_children(id);
        }
        ctx.commit_zap_page();
        let v = ctx.vcpu.as_mut().expect("vcpu");
        v.shadow.root = Some(RootInfo { pgd, sp: id, hpa });
        set_hw_root(v, v.shadow.root, role.level(), dummy);
        v.cpu.flush_tlb_current();
    });
    Ok(())
}

/// A page of non-present SPTEs the hardware runs on when there is no root yet.
fn dummy_root(kvm: &Kvm) -> Result<Hpa, crate::host::HostError> {
    let mut d = kvm.mmu.shadow_dummy_root.lock();
    if let Some(p) = *d {
        return Ok(p.hpa());
    }
    let p = kvm.frames().alloc_4k()?;
    crate::mmu::tdp_mmu::init_table(kvm, p);
    *d = Some(p);
    Ok(p.hpa())
}

/// `kvm_mmu_free_roots` (all of them): drops the current and previous roots.
pub fn kvm_mmu_unload(kvm: &Kvm, vcpu: &mut VcpuArch) {
    let roots = vcpu.shadow.all_roots();
    vcpu.shadow.prev_roots.clear();
    vcpu.shadow.root = None;
    vcpu.shadow.pae = None;
    if roots.is_empty() {
        return;
    }
    with_ctx!(kvm, vcpu, |ctx| {
        for r in roots {
            ctx.put_root(r);
        }
    });
}

/// `kvm_mmu_reset_context`: the guest changed CR0/CR4/EFER bits the role depends on.
pub fn kvm_mmu_reset_context(kvm: &Kvm, vcpu: &mut VcpuArch) {
    kvm_mmu_unload(kvm, vcpu);
}

/// `kvm_mmu_load_pgd` (KVM_REQ_LOAD_MMU_PGD): points the hardware at the current root.
pub fn kvm_mmu_load_pgd(kvm: &Kvm, vcpu: &mut VcpuArch) {
    if let Some(r) = vcpu.shadow.root {
        let dummy = dummy_root(kvm).unwrap_or(r.hpa);
        let level = vcpu.shadow.root_role.level();
        set_hw_root(vcpu, Some(r), level, dummy);
    }
}

/// `kvm_mmu_new_pgd` with the fast switch: the current root joins `prev_roots` and a cached
/// root for the new CR3 (same role) is reused (loaded into the hardware by
/// KVM_REQ_LOAD_MMU_PGD); on a miss the least recent is freed and a root is made at the next
/// entry.
pub fn kvm_mmu_new_pgd(kvm: &Kvm, vcpu: &mut VcpuArch, new_cr3: u64) {
    let pgd = new_cr3 & 0x000f_ffff_ffff_f000;
    let role = vcpu.shadow.root_role;
    let Some(cur) = vcpu.shadow.root else { return };
    if vcpu.shadow.pae.is_some() {
        // A PAE root has no page of its own to cache: it is freed (fast_pgd_switch).
        kvm_mmu_unload(kvm, vcpu);
        return;
    }
    if cur.pgd == pgd {
        return;
    }
    let hit = {
        let s = kvm.mmu.shadow.lock();
        vcpu.shadow.prev_roots.iter().position(|r| {
            r.pgd == pgd
                && s.pages.exists(r.sp)
                && s.pages.get(r.sp).role == role
                && s.pages.get(r.sp).role.invalid() == 0
        })
    };
    vcpu.shadow.prev_roots.insert(0, cur);
    let mut evict = Vec::new();
    match hit {
        Some(i) => {
            // fast_pgd_switch: the cached root becomes current; the hardware is pointed at
            // it on the next entry (KVM_REQ_LOAD_MMU_PGD).
            let r = vcpu.shadow.prev_roots.remove(i + 1);
            vcpu.shadow.root = Some(r);
            kvm.mmu.shadow.lock().pages.get_mut(r.sp).write_flooding_count = 0;
            vcpu.shared.requests.fetch_or(crate::vm::req::LOAD_MMU_PGD, crate::sync::Ordering::SeqCst);
        }
        None => {
            vcpu.shadow.root = None;
        }
    }
    while vcpu.shadow.prev_roots.len() > KVM_MMU_NUM_PREV_ROOTS {
        evict.extend(vcpu.shadow.prev_roots.pop());
    }
    if !evict.is_empty() {
        with_ctx!(kvm, vcpu, |ctx| {
            for r in evict {
                ctx.put_root(r.sp);
            }
        });
    }
}

/// `kvm_mmu_sync_roots`: syncs every unsync page below the current root.
pub fn kvm_mmu_sync_roots(kvm: &Kvm, vcpu: &mut VcpuArch) {
    if vcpu.shadow.root.is_none() {
        return;
    }
    let roots: Vec<SpId> = match &vcpu.shadow.pae {
        Some(p) => p.iter().flatten().copied().collect(),
        None => vcpu.shadow.root.iter().map(|r| r.sp).collect(),
    };
    with_ctx!(kvm, vcpu, |ctx| {
        for r in roots {
            if ctx.s.pages.exists(r) && ctx.s.pages.get(r).unsync_children > 0 {
                ctx.sync_children(r);
            }
        }
        ctx.commit_zap_page();
    });
}

/// `kvm_mmu_sync_prev_roots`: previous roots with unsync pages are dropped (they will be
/// rebuilt, in sync, if the guest switches back).
pub fn kvm_mmu_sync_prev_roots(kvm: &Kvm, vcpu: &mut VcpuArch) {
    let unsync: Vec<RootInfo> = {
        let s = kvm.mmu.shadow.lock();
        vcpu.shadow
            .prev_roots
            .iter()
            .filter(|r| s.pages.exists(r.sp) && s.pages.get(r.sp).unsync_children > 0)
            .copied()
            .collect()
    };
    if unsync.is_empty() {
        return;
    }
    vcpu.shadow.prev_roots.retain(|r| !unsync.contains(r));
    with_ctx!(kvm, vcpu, |ctx| {
        for r in unsync {
            ctx.put_root(r.sp);
        }
    });
}

/// `kvm_mmu_free_obsolete_roots`: drops roots that were zapped.
pub fn kvm_mmu_free_obsolete_roots(kvm: &Kvm, vcpu: &mut VcpuArch) {
    if let Some(p) = vcpu.shadow.pae {
        let gone = {
            let s = kvm.mmu.shadow.lock();
            p.iter().flatten().any(|sp| !s.pages.exists(*sp) || s.pages.get(*sp).role.invalid() != 0)
        };
        if gone {
            kvm_mmu_unload(kvm, vcpu);
        }
        return;
    }
    let obsolete = |r: &RootInfo| {
        let s = kvm.mmu.shadow.lock();
        !s.pages.exists(r.sp) || s.pages.get(r.sp).role.invalid() != 0
    };
    let mut drop = Vec::new();
    if vcpu.shadow.root.as_ref().is_some_and(obsolete) {
        drop.extend(vcpu.shadow.root.take());
    }
    let (keep, gone): (Vec<RootInfo>, Vec<RootInfo>) = vcpu.shadow.prev_roots.drain(..).partition(|r| !obsolete(r));
    vcpu.shadow.prev_roots = keep;
    drop.extend(gone);
    if !drop.is_empty() {
        with_ctx!(kvm, vcpu, |ctx| {
            for r in drop {
                ctx.put_root(r.sp);
            }
        });
    }
}

/// `kvm_mmu_invlpg` under shadow paging: syncs the SPTE of `gva` in unsync pages on every
/// root's path, then the hardware drops its TLB entry.
pub fn kvm_mmu_invlpg(kvm: &Kvm, vcpu: &mut VcpuArch, gva: x86_paging::addr::Gva) {
    vcpu.stat.invlpg += 1;
    let roots: Vec<SpId> = match &vcpu.shadow.pae {
        Some(_) => vcpu.shadow.root_for(gva).map(|(sp, _)| sp).into_iter().collect(),
        None => vcpu.shadow.root.iter().chain(vcpu.shadow.prev_roots.iter()).map(|r| r.sp).collect(),
    };
    with_ctx!(kvm, vcpu, |ctx| {
        for r in roots {
            crate::mmu::paging_tmpl::invlpg(&mut ctx, r, gva);
        }
        ctx.commit_zap_page();
    });
    vcpu.cpu.invlpg(gva);
}
