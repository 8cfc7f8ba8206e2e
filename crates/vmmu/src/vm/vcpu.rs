//! vCPUs (`struct kvm_vcpu`): creation-time state, the run loop (`vcpu_enter_guest`,
//! request servicing, exits to the MMU, emulation), guest operations (loads, stores,
//! fetches, CR writes, INVLPG, INVPCID) and teardown.

use super::*;

/// A vCPU's MMU state (`vcpu->arch.mmu` and its memory caches).
pub struct VcpuMmu {
    /// The MMU context: fault handler and root role (`kvm_init_mmu`).
    pub ctx: crate::mmu::mmu::MmuContext,
    /// The current root.
    pub root: Option<Arc<TdpRoot>>,
    /// `mmu_shadow_page_cache`: zeroed (non-present) table frames ready for the fault path.
    pub shadow_page_cache: Vec<Pfn>,
    /// Cached MMIO info (`vcpu->arch.mmio_gfn` and its generation).
    pub mmio_gfn: Option<(u64, u64)>,
}

impl VcpuMmu {
    /// A vCPU's MMU with context `ctx`, no root and empty caches.
    pub fn new(ctx: crate::mmu::mmu::MmuContext) -> Self {
        VcpuMmu { ctx, root: None, shadow_page_cache: Vec::new(), mmio_gfn: None }
    }
}

/// Exits one access may take before the VM is declared stuck.
const MAX_EXITS_PER_ACCESS: u32 = 10_000;

/// A vCPU: the hardware model plus KVM's per-vCPU state.
pub struct Vcpu {
    pub(crate) kvm: Arc<Kvm>,
    pub(crate) arch: VcpuArch,
}

/// The vCPU's own state (`struct kvm_vcpu` minus its `kvm` pointer): what the MMU code
/// takes as `vcpu`, next to a `&Kvm`, so a fault never touches the VM's reference count.
pub struct VcpuArch {
    pub(crate) id: u32,
    pub(crate) cpu: Cpu,
    pub(crate) shared: Arc<VcpuShared>,
    pub(crate) mmu: VcpuMmu,
    /// Per-vCPU statistics.
    pub stat: VcpuStats,
    pub(crate) slots: Arc<Memslots>,
    pub(crate) shadow: crate::mmu::shadow::VcpuShadow,
    /// The dirty ring, with KVM_CAP_DIRTY_LOG_RING.
    pub(crate) dirty_ring: Option<Arc<crate::dirty_log::DirtyRing>>,
    /// Per-fault timing, when turned on ([`Vcpu::set_fault_timing`]).
    pub(crate) fault_latency: Option<Box<LatencyHistogram>>,
}

impl std::ops::Deref for Vcpu {
    type Target = VcpuArch;
    fn deref(&self) -> &VcpuArch {
        &self.arch
    }
}

impl std::ops::DerefMut for Vcpu {
    fn deref_mut(&mut self) -> &mut VcpuArch {
        &mut self.arch
    }
}

enum ExitAction {
    Resume,
    Emulate,
}

impl VcpuArch {
    pub(crate) fn refresh_memslots(&mut self, kvm: &Kvm) {
        if self.slots.generation() != kvm.memslots_generation() {
            self.slots = kvm.memslots();
        }
    }
}

impl Vcpu {
    /// vCPU id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The VM.
    pub fn kvm(&self) -> &Arc<Kvm> {
        &self.kvm
    }

    /// The hardware model (registers, TLB, counters).
    pub fn cpu(&self) -> &Cpu {
        &self.cpu
    }

    /// Statistics of this vCPU by KVM name.
    pub fn stats(&self) -> BTreeMap<&'static str, i64> {
        self.stat.snapshot()
    }

    /// Turns per-fault timing on (an empty histogram) or off (dropped). When on, the
    /// handling of each MMU exit (EPT violation / misconfiguration, NPF, intercepted #PF:
    /// `kvm_mmu_page_fault` and the memslot refresh before it) is timed with
    /// `Instant::now()` and recorded in [`Vcpu::fault_latency`]; the hardware's walk and the
    /// retried access are not included, nor is instruction emulation. Off by default: then
    /// it costs one branch per exit.
    pub fn set_fault_timing(&mut self, on: bool) {
        self.arch.fault_latency = on.then(Box::default);
    }

    /// The per-fault handling times recorded since timing was turned on.
    pub fn fault_latency(&self) -> Option<&LatencyHistogram> {
        self.arch.fault_latency.as_deref()
    }

    /// The requests `vcpu_enter_guest` services before entering the guest.
    fn service_requests(&mut self) -> Result<(), VmError> {
        let r = self.shared.requests.swap(0, Ordering::AcqRel);
        if r & req::DIRTY_RING_SOFT_FULL != 0 && self.arch.dirty_ring.as_ref().is_some_and(|d| d.soft_full()) {
            // kvm_dirty_ring_check_request: exit to userspace, and again on every entry until
            // the ring is reset. The other requests stay pending for that entry.
            self.shared.requests.fetch_or(r & !req::KICK, Ordering::AcqRel);
            return Err(VmError::DirtyRingFull { vcpu: self.arch.id });
        }
        if r & req::UPDATE_CPU_DIRTY_LOGGING != 0 {
            // vmx_update_cpu_dirty_logging.
            let on = self.kvm.cpu_dirty_logging();
            if !on {
                self.flush_pml();
            }
            self.cpu.set_pml(on);
        }
        if r & req::MMU_FREE_OBSOLETE_ROOTS != 0 {
            if let Some(root) = self.arch.mmu.root.take_if(|r| r.is_invalid()) {
                tdp_mmu::kvm_tdp_mmu_put_root(&self.kvm, &root);
            }
            crate::mmu::shadow::kvm_mmu_free_obsolete_roots(&self.kvm, &mut self.arch);
        }
        if r & req::MMU_SYNC != 0 {
            crate::mmu::shadow::kvm_mmu_sync_roots(&self.kvm, &mut self.arch);
        }
        if r & req::LOAD_MMU_PGD != 0 {
            crate::mmu::shadow::kvm_mmu_load_pgd(&self.kvm, &mut self.arch);
        }
        // KVM's order: KVM_REQ_TLB_FLUSH, then kvm_service_local_tlb_flush_requests (CURRENT,
        // then GUEST).
        let mut r = r;
        if r & req::TLB_FLUSH != 0 {
            let _f = self.kvm.tracer.func(self.arch.id, "kvm_vcpu_flush_tlb_all");
            self.arch.stat.tlb_flush += 1;
            self.arch.cpu.flush_tlb_all();
            // kvm_vcpu_flush_tlb_all: flushing every context flushes the current one too.
            r &= !req::TLB_FLUSH_CURRENT;
        }
        if r & req::TLB_FLUSH_CURRENT != 0 {
            let _f = self.kvm.tracer.func(self.arch.id, "kvm_vcpu_flush_tlb_current");
            self.arch.stat.tlb_flush += 1;
            self.arch.cpu.flush_tlb_current();
        }
        if r & req::TLB_FLUSH_GUEST != 0 {
            // kvm_vcpu_flush_tlb_guest: sync the roots (and drop previous roots with unsync
            // pages), then flush.
            let _f = self.kvm.tracer.func(self.arch.id, "kvm_vcpu_flush_tlb_guest");
            crate::mmu::shadow::kvm_mmu_sync_roots(&self.kvm, &mut self.arch);
            crate::mmu::shadow::kvm_mmu_sync_prev_roots(&self.kvm, &mut self.arch);
            self.arch.stat.tlb_flush += 1;
            self.arch.cpu.flush_tlb_all();
        }
        Ok(())
    }

    /// `vmx_flush_pml_buffer`: every page in the page-modification log is marked dirty
    /// (`kvm_vcpu_mark_page_dirty`), into the dirty ring if there is one.
    #[cold]
    fn flush_pml(&mut self) {
        let VcpuArch { cpu, slots, dirty_ring, .. } = &mut self.arch;
        cpu.drain_pml(|gfn| {
            let gfn = x86_paging::addr::Gfn::new(gfn);
            if let Some(slot) = slots.find(gfn) {
                crate::dirty_log::mark_page_dirty_in_slot(dirty_ring.as_deref(), slot, gfn);
            }
        });
    }

    /// Enters guest mode for one operation (`vcpu_enter_guest`): publish IN_GUEST_MODE,
    /// then look at requests; anything pending is serviced outside guest mode first.
    #[inline]
    fn enter(&mut self) -> Result<(), VmError> {
        if self.shared.enter_guest_mode() || (self.mmu.root.is_none() && self.shadow.root.is_none()) {
            self.enter_slow()?;
        }
        Ok(())
    }

    #[cold]
    fn enter_slow(&mut self) -> Result<(), VmError> {
        loop {
            self.shared.mode.store(mode::OUTSIDE_GUEST_MODE, Ordering::SeqCst);
            self.service_requests()?;
            if self.mmu.root.is_none() && self.shadow.root.is_none() {
                crate::mmu::mmu::kvm_mmu_load(&self.kvm, &mut self.arch)?;
            }
            self.shared.mode.store(mode::IN_GUEST_MODE, Ordering::SeqCst);
            if self.shared.requests.load(Ordering::SeqCst) == 0 {
                return Ok(());
            }
        }
    }

    /// Leaves guest mode after an operation: an exit, so the page-modification log is
    /// emptied first (a vCPU outside guest mode never holds logged pages).
    #[inline]
    fn leave(&mut self) {
        if self.cpu.pml_pending() {
            self.leave_flush_pml();
        }
        self.shared.mode.store(mode::OUTSIDE_GUEST_MODE, Ordering::Release);
    }

    #[cold]
    #[inline(never)]
    fn leave_flush_pml(&mut self) {
        self.arch.refresh_memslots(&self.kvm);
        self.flush_pml();
    }

    /// Leaves guest mode. vCPUs are in guest mode only while an operation runs, so this is
    /// only needed by code that keeps a vCPU in guest mode by hand; kept for API users.
    pub fn exit_guest(&mut self) {
        self.leave();
    }

    fn handle_exit(&mut self, x: VmExit) -> Result<ExitAction, VmError> {
        let Vcpu { kvm, arch } = self;
        // The exit handler (vmx/svm_handle_exit's dispatch), as a span of its own.
        let _f = kvm.tracer.func(
            arch.id,
            match x {
                VmExit::Tdp(TdpExit::EptViolation { .. }) => "handle_ept_violation",
                VmExit::Tdp(TdpExit::EptMisconfig { .. }) => "handle_ept_misconfig",
                VmExit::Tdp(TdpExit::Npf { .. } | TdpExit::Contended { .. }) => "npf_interception",
                VmExit::PageFault { .. } => "handle_exception_nmi",
                VmExit::PmlFull => "handle_pml_full",
            },
        );
        let t0 = arch.fault_latency.is_some().then(std::time::Instant::now);
        arch.stat.exits += 1;
        arch.refresh_memslots(kvm);
        let (addr, ec) = match x {
            VmExit::Tdp(TdpExit::EptViolation { gpa, qualification, .. }) => {
                (gpa.raw(), ept_violation_error_code(qualification))
            }
            VmExit::Tdp(TdpExit::EptMisconfig { gpa }) => (gpa.raw(), crate::mmu::page_fault::PFERR_RSVD),
            VmExit::Tdp(TdpExit::Npf { gpa, error_code }) => (gpa.raw(), error_code),
            VmExit::Tdp(TdpExit::Contended { .. }) => return Ok(ExitAction::Resume),
            VmExit::PageFault { gva, error_code } => (gva.raw(), u64::from(error_code.0)),
            // handle_pml_full: the log was emptied on the way out; run again.
            VmExit::PmlFull => return Ok(ExitAction::Resume),
        };
        let r = crate::mmu::page_fault::kvm_mmu_page_fault(kvm, arch, addr, ec);
        if let (Some(t0), Some(h)) = (t0, arch.fault_latency.as_deref_mut()) {
            h.record(crate::num::nanos(t0.elapsed()));
        }
        let r = r?;
        Ok(if r == RetPf::Emulate { ExitAction::Emulate } else { ExitAction::Resume })
    }

    /// Runs a hardware operation, handling exits until it completes; `emulate` performs it
    /// in software when the MMU says so.
    #[inline(always)]
    fn run_op<T>(
        &mut self,
        gva: u64,
        mut op: impl FnMut(&mut Cpu) -> Result<T, Stop>,
        emulate: impl FnOnce(&mut Self) -> Result<T, GuestError>,
    ) -> Result<T, GuestError> {
        self.enter()?;
        let r = op(&mut self.cpu);
        self.leave();
        match r {
            Ok(v) => Ok(v),
            Err(stop) => self.run_op_slow(gva, stop, op, emulate),
        }
    }

    #[cold]
    fn run_op_slow<T>(
        &mut self,
        gva: u64,
        mut stop: Stop,
        mut op: impl FnMut(&mut Cpu) -> Result<T, Stop>,
        emulate: impl FnOnce(&mut Self) -> Result<T, GuestError>,
    ) -> Result<T, GuestError> {
        let mut exits = 0u32;
        let shared = self.shared.clone();
        loop {
            match stop {
                Stop::Exception(e) => {
                    if let Exception::PageFault { cr2, .. } = e {
                        self.cpu.cr2 = cr2;
                    }
                    return Err(GuestError::Exception(e));
                }
                Stop::Exit(x) => {
                    if self.kvm.mmu.mmu_invalidate_in_progress.load(Ordering::Relaxed) == 0 {
                        exits += 1;
                    } else {
                        // The host is invalidating: faults retry until it is done. That is
                        // progress elsewhere, not a stuck vCPU; let the other thread run.
                        crate::sync::thread::yield_now();
                    }
                    if exits > MAX_EXITS_PER_ACCESS {
                        return Err(VmError::Stuck { vcpu: self.id, gva, exits, last: x.to_string() }.into());
                    }
                    // The exit and any emulation it asks for act on one memslot snapshot.
                    let _srcu = shared.srcu_read_lock();
                    let action = self.handle_exit(x)?;
                    if let Some((cr2, ec)) = self.arch.shadow.pending_pf.take() {
                        // A fault the guest itself caused: inject it.
                        self.cpu.cr2 = cr2;
                        return Err(GuestError::Exception(Exception::PageFault { cr2, error_code: PfErrorCode(ec) }));
                    }
                    if let ExitAction::Emulate = action {
                        return emulate(self);
                    }
                }
            }
            self.enter()?;
            let r = op(&mut self.cpu);
            self.leave();
            match r {
                Ok(v) => return Ok(v),
                Err(s) => stop = s,
            }
        }
    }

    /// A guest load of `size` (1..=8) bytes.
    #[inline]
    pub fn read(&mut self, gva: Gva, size: u8) -> Result<u64, GuestError> {
        self.run_op(
            gva.raw(),
            |c| c.read(gva, size),
            |v| crate::emulate::emulate_access(&v.kvm, &mut v.arch, gva, size, AccessKind::Read, 0),
        )
    }

    /// A guest store of `size` (1..=8) bytes.
    #[inline]
    pub fn write(&mut self, gva: Gva, size: u8, val: u64) -> Result<(), GuestError> {
        self.run_op(
            gva.raw(),
            |c| c.write(gva, size, val),
            |v| crate::emulate::emulate_access(&v.kvm, &mut v.arch, gva, size, AccessKind::Write, val).map(|_| ()),
        )
    }

    /// A guest instruction fetch of `size` bytes.
    pub fn fetch(&mut self, gva: Gva, size: u8) -> Result<u64, GuestError> {
        self.run_op(
            gva.raw(),
            |c| c.fetch(gva, size),
            |v| crate::emulate::emulate_access(&v.kvm, &mut v.arch, gva, size, AccessKind::Fetch, 0),
        )
    }

    fn gp<T>(_: &mut Self) -> Result<T, GuestError> {
        // The PDPT of a PAE guest lies outside guest RAM: KVM's load_pdptrs fails -> #GP.
        Err(GuestError::Exception(Exception::GeneralProtection))
    }

    fn shadowing(&self) -> bool {
        !self.mmu.ctx.direct
    }

    /// `load_pdptrs` under shadow paging: when the guest is about to be in PAE paging with
    /// the registers `next`, read its four PDPTEs through the memslots; a present PDPTE with
    /// reserved bits makes the CR write take #GP (and change nothing).
    fn shadow_pdptrs(&self, next: &x86_paging::mode::PagingState) -> Result<Option<[u64; 4]>, GuestError> {
        if !self.shadowing() || next.mode() != x86_paging::mode::PagingMode::Pae {
            return Ok(None);
        }
        let bus = self.kvm.mmio_bus();
        let slots = self.kvm.memslots();
        let mut mem = crate::guest_mem::KvmGuestMem::new(self.kvm.host(), &slots, &bus);
        let mut p = [0u64; 4];
        for (i, e) in p.iter_mut().enumerate() {
            *e = mem.read(next.pdpte_gpa(i), 8);
            if *e & 1 != 0 && *e & next.pdpte_reserved_mask() != 0 {
                return Err(GuestError::Exception(Exception::GeneralProtection));
            }
        }
        Ok(Some(p))
    }

    /// The paging registers after a CR/EFER write (EFER.LMA follows LME and PG).
    fn next_state(&self, f: impl FnOnce(&mut x86_paging::mode::PagingState)) -> x86_paging::mode::PagingState {
        let mut st = *self.cpu.paging();
        f(&mut st);
        if st.efer.contains(Efer::LME) && st.cr0.contains(Cr0::PG) {
            st.efer |= Efer::LMA;
        } else {
            st.efer.remove(Efer::LMA);
        }
        st
    }

    /// After an intercepted CR0/CR4/EFER write under shadow paging: a changed role means new
    /// roots (`kvm_mmu_reset_context`).
    fn after_cr_write(&mut self, before: Option<Role>, before_mode: x86_paging::mode::PagingMode) {
        let st = *self.cpu.paging();
        // In PAE mode the write may also have reloaded the PDPTRs the roots were made from.
        if crate::mmu::shadow::shadow_root_role(&st) != before
            || st.mode() != before_mode
            || st.mode() == x86_paging::mode::PagingMode::Pae
        {
            let Vcpu { kvm, arch } = self;
            crate::mmu::shadow::kvm_mmu_reset_context(kvm, arch);
        }
    }

    /// MOV to CR0.
    pub fn write_cr0(&mut self, v: Cr0) -> Result<(), GuestError> {
        let (role, mode) = (crate::mmu::shadow::shadow_root_role(self.cpu.paging()), self.cpu.paging().mode());
        let pdptrs = self.shadow_pdptrs(&self.next_state(|s| s.cr0 = v))?;
        self.run_op(0, |c| c.write_cr0(v), Self::gp)?;
        if let Some(p) = pdptrs {
            self.cpu.set_guest_pdptrs(p);
        }
        if self.shadowing() {
            self.after_cr_write(role, mode);
        }
        Ok(())
    }

    /// MOV to CR4. Under shadow paging PKU is not offered (as KVM does without TDP):
    /// setting CR4.PKE takes #GP.
    pub fn write_cr4(&mut self, v: Cr4) -> Result<(), GuestError> {
        if self.shadowing() && v.contains(Cr4::PKE) {
            return Err(GuestError::Exception(Exception::GeneralProtection));
        }
        let (role, mode) = (crate::mmu::shadow::shadow_root_role(self.cpu.paging()), self.cpu.paging().mode());
        let pdptrs = self.shadow_pdptrs(&self.next_state(|s| s.cr4 = v))?;
        let old = self.cpu.paging().cr4;
        self.run_op(0, |c| c.write_cr4(v), Self::gp)?;
        if let Some(p) = pdptrs {
            self.cpu.set_guest_pdptrs(p);
        }
        if self.shadowing() && (old ^ v).intersects(Cr4::PGE | Cr4::PCIDE) {
            // kvm_post_set_cr4 -> KVM_REQ_TLB_FLUSH_GUEST: under shadow paging a guest TLB
            // flush syncs the unsync pages of the roots.
            self.arch.shared.requests.fetch_or(req::TLB_FLUSH_GUEST, Ordering::SeqCst);
        }
        if self.shadowing() {
            self.after_cr_write(role, mode);
        }
        Ok(())
    }

    /// WRMSR EFER.
    pub fn write_efer(&mut self, v: Efer) -> Result<(), GuestError> {
        let (role, mode) = (crate::mmu::shadow::shadow_root_role(self.cpu.paging()), self.cpu.paging().mode());
        let pdptrs = self.shadow_pdptrs(&self.next_state(|s| s.efer = v - Efer::LMA))?;
        self.run_op(0, |c| c.write_efer(v), Self::gp)?;
        if let Some(p) = pdptrs {
            self.cpu.set_guest_pdptrs(p);
        }
        if self.shadowing() {
            self.after_cr_write(role, mode);
        }
        Ok(())
    }

    /// MOV to CR3. Under shadow paging it is intercepted: `kvm_set_cr3` switches roots
    /// (`kvm_mmu_new_pgd`) and, unless the no-flush bit is set, syncs unsync pages and flushes.
    pub fn write_cr3(&mut self, v: u64) -> Result<(), GuestError> {
        let pdptrs = self.shadow_pdptrs(&self.next_state(|s| s.cr3 = v & !(1 << 63)))?;
        self.run_op(0, |c| c.write_cr3(v), Self::gp)?;
        if let Some(p) = pdptrs {
            self.cpu.set_guest_pdptrs(p);
        }
        if self.shadowing() {
            let noflush = self.cpu.paging().cr4.contains(Cr4::PCIDE) && v & (1 << 63) != 0;
            let Vcpu { kvm, arch } = self;
            crate::mmu::shadow::kvm_mmu_new_pgd(kvm, arch, v & !(1 << 63));
            if !noflush {
                arch.shared.requests.fetch_or(req::MMU_SYNC | req::TLB_FLUSH_CURRENT, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// WRPKRU.
    pub fn write_pkru(&mut self, v: u32) {
        self.cpu.write_pkru(v)
    }

    /// Sets CPL (a privilege transition).
    pub fn set_cpl(&mut self, cpl: u8) {
        self.cpu.set_cpl(cpl)
    }

    /// STAC / CLAC.
    pub fn set_ac(&mut self, ac: bool) {
        self.cpu.set_ac(ac)
    }

    /// INVLPG: not intercepted with TDP (the hardware flushes its own TLB); intercepted under
    /// shadow paging (`kvm_mmu_invlpg`).
    pub fn invlpg(&mut self, gva: Gva) {
        if self.shadowing() {
            let Vcpu { kvm, arch } = self;
            crate::mmu::shadow::kvm_mmu_invlpg(kvm, arch, gva);
        } else {
            self.cpu.invlpg(gva)
        }
    }

    /// INVPCID (under shadow paging, an individual-address flush syncs like INVLPG and the
    /// context flushes sync all unsync pages).
    pub fn invpcid(&mut self, kind: u8, pcid: u16, gva: Gva) -> Result<(), GuestError> {
        self.cpu.invpcid(kind, pcid, gva).map_err(|s| match s {
            Stop::Exception(e) => GuestError::Exception(e),
            Stop::Exit(_) => GuestError::Exception(Exception::GeneralProtection),
        })?;
        if self.shadowing() {
            if kind == 0 {
                let Vcpu { kvm, arch } = self;
                crate::mmu::shadow::kvm_mmu_invlpg(kvm, arch, gva);
            } else {
                self.arch.shared.requests.fetch_or(req::MMU_SYNC | req::TLB_FLUSH_CURRENT, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// CR2.
    pub fn cr2(&self) -> u64 {
        self.cpu.cr2
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        self.exit_guest();
        crate::mmu::shadow::kvm_mmu_unload(&self.kvm, &mut self.arch);
        if let Some(root) = self.mmu.root.take() {
            tdp_mmu::kvm_tdp_mmu_put_root(&self.kvm, &root);
        }
        for p in self.arch.mmu.shadow_page_cache.drain(..) {
            self.kvm.frames().free_4k(p);
        }
        self.kvm.vcpus.write().retain(|v| v.id != self.id);
        self.kvm.n_vcpus_live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `handle_ept_violation`: the page-fault error code KVM derives from the exit
/// qualification (EPT read -> PFERR_USER, the entry's R/W/X -> PFERR_PRESENT, final
/// translation vs paging-structure access -> PFERR_GUEST_FINAL / PFERR_GUEST_PAGE).
pub fn ept_violation_error_code(q: EptQual) -> u64 {
    use crate::mmu::page_fault::*;
    let mut ec = 0;
    if q.contains(EptQual::READ) {
        ec |= PFERR_USER;
    }
    if q.contains(EptQual::WRITE) {
        ec |= PFERR_WRITE;
    }
    if q.contains(EptQual::FETCH) {
        ec |= PFERR_FETCH;
    }
    if q.intersects(EptQual::READABLE | EptQual::WRITABLE | EptQual::EXECUTABLE) {
        ec |= PFERR_PRESENT;
    }
    if q.contains(EptQual::GVA_VALID) {
        ec |= if q.contains(EptQual::GVA_TRANSLATED) { PFERR_GUEST_FINAL } else { PFERR_GUEST_PAGE };
    }
    ec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ept_violation_error_codes_follow_handle_ept_violation() {
        use crate::mmu::page_fault::*;
        let q = EptQual::WRITE | EptQual::READABLE | EptQual::GVA_VALID | EptQual::GVA_TRANSLATED;
        assert_eq!(ept_violation_error_code(q), PFERR_WRITE | PFERR_PRESENT | PFERR_GUEST_FINAL);
        let q = EptQual::READ | EptQual::GVA_VALID;
        assert_eq!(ept_violation_error_code(q), PFERR_USER | PFERR_GUEST_PAGE);
        assert_eq!(ept_violation_error_code(EptQual::FETCH), PFERR_FETCH);
    }
}
