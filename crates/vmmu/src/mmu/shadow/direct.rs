//! The legacy TDP MMU (tdp_mmu=N): direct shadow pages, its root and `direct_map`.

use super::*;

/// The legacy MMU's TDP root role (`kvm_calc_tdp_mmu_root_page_role`).
pub fn direct_root_role(cfg: &crate::vm::VmConfig) -> Role {
    Role(0)
        .with_level(cfg.tdp_level())
        .with_direct(1)
        .with_access(ACC_ALL)
        .with_cr0_wp(1)
        .with_efer_nx(1)
        .with_ad_disabled(u32::from(!cfg.ad_enabled()))
}

/// `mmu_alloc_direct_roots` for the legacy MMU (tdp_mmu=N): a direct root shadow page.
pub fn kvm_mmu_load_direct(kvm: &Kvm, vcpu: &mut VcpuArch) -> Result<RootInfo, crate::host::HostError> {
    crate::mmu::mmu::mmu_topup_memory_caches(kvm, vcpu)?;
    let role = direct_root_role(kvm.config());
    vcpu.shadow.root_role = role;
    let root = with_ctx!(kvm, vcpu, |ctx| {
        let id = ctx.get_shadow_page(Gfn::new(0), role);
        ctx.s.pages.get_mut(id).root_count += 1;
        RootInfo { pgd: 0, sp: id, hpa: ctx.s.pages.get(id).spt_hpa() }
    });
    vcpu.shadow.root = Some(root);
    Ok(root)
}

/// `direct_page_fault` from `mmu_lock` on: `make_mmu_pages_available`,
/// `is_page_fault_stale`, `direct_map`.
pub fn direct_page_fault_locked(
    kvm: &Kvm,
    vcpu: &mut VcpuArch,
    fault: &mut crate::mmu::page_fault::KvmPageFault,
) -> RetPf {
    let Some(root) = vcpu.shadow.root else { return RetPf::Retry };
    with_ctx!(kvm, vcpu, |ctx| {
        ctx.make_mmu_pages_available();
        if !ctx.s.pages.exists(root.sp) || ctx.s.pages.get(root.sp).role.invalid() != 0 {
            return RetPf::Retry;
        }
        if fault.slot.is_some() && crate::mmu::page_fault::mmu_invalidate_retry_gfn(kvm, fault.mmu_seq, fault.gfn) {
            return RetPf::Retry;
        }
        ctx.direct_map(root.sp, fault)
    })
}

impl Ctx<'_> {
    /// The direct levels of a fault's shadow walk — all of `direct_map`'s, and those of
    /// FNAME(fetch)'s second loop (a guest huge page mapped by smaller SPTEs): down to
    /// `fault.goal_level` (lowered by `disallowed_hugepage_adjust` under the NX mitigation),
    /// linking a direct page of rights `access` wherever no table is (accounted as an NX
    /// split when the fault disallowed a huge page) and replacing one made for other rights
    /// (`validate_direct_spte`). Leaves `it` at the goal level's entry; `Err(Retry)` when a
    /// table has no shadow page.
    pub(crate) fn walk_direct_levels(
        &mut self,
        it: &mut ShadowWalk,
        fault: &mut crate::mmu::page_fault::KvmPageFault,
        access: u8,
    ) -> Result<(), RetPf> {
        loop {
            let level = it.level;
            let sptep = it.sptep(&self.s.pages);
            let spte = self.load(sptep);
            if fault.nx_huge_page_workaround_enabled {
                self.disallowed_hugepage_adjust(fault, spte, level);
            }
            if level <= fault.goal_level {
                return Ok(());
            }
            if spte.is_shadow_present() && !spte.is_large() {
                let Some(c) = self.s.pages.by_spt(spte.pfn()) else { return Err(RetPf::Retry) };
                if self.s.pages.get(c).role.access() == access {
                    it.descend(c);
                    continue;
                }
                // validate_direct_spte: a direct child made for other rights is replaced.
                self.zap_pte(sptep);
                self.kvm.flush_remote_tlbs(Some(self.cpu));
            }
            let base = fault.gfn.align_down(level);
            let role = child_role_at(self.s.pages.get(it.sp).role, it.index(), true, access);
            let c = self.get_shadow_page(base, role);
            self.link_shadow_page(sptep, c);
            if fault.huge_page_disallowed {
                self.account_nx_huge_page(c, level, fault.req_level >= level);
            }
            it.descend(c);
        }
    }

    /// `direct_map`: the legacy TDP fault's walk — direct shadow pages down to the goal
    /// level, then `mmu_set_spte` and `direct_pte_prefetch`.
    pub fn direct_map(&mut self, root: SpId, fault: &mut crate::mmu::page_fault::KvmPageFault) -> RetPf {
        let _f = self.kvm.tracer.func(self.cpu, "direct_map");
        {
            let slots = self.slots.clone();
            crate::mmu::page_fault::kvm_mmu_hugepage_adjust(self.kvm, &slots, fault);
        }
        if self.kvm.tracer.events_on() {
            self.kvm.tracer.event(
                self.cpu,
                "kvm_mmu_spte_requested",
                format_args!("gfn {:x} pfn {:x} level {}", fault.gfn.raw(), fault.pfn.raw(), fault.goal_level),
            );
        }
        let gfn = fault.gfn.raw();
        let mut it = ShadowWalk::new(&self.s.pages, root, gfn << 12);
        if let Err(r) = self.walk_direct_levels(&mut it, fault, ACC_ALL) {
            return r;
        }
        let (sp, level) = (it.sp, it.level);
        let sptep = it.sptep(&self.s.pages);
        let pfn = fault.slot.map(|_| fault.pfn);
        let base = Gfn::new(gfn).align_down(level);
        let r = self.mmu_set_spte(sptep, ACC_ALL, base, pfn, fault.map_writable, false, fault.write);
        if r != RetPf::Spurious {
            crate::mmu::paging_tmpl::pte_prefetch_pub(self, sp, sptep);
        }
        r
    }
}
