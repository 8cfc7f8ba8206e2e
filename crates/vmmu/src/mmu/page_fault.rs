//! The fault path: `kvm_mmu_page_fault` -> `kvm_mmu_do_page_fault` -> `kvm_tdp_page_fault`
//! -> `fast_page_fault` / `kvm_faultin_pfn` / `is_page_fault_stale` / `kvm_tdp_mmu_map`, with
//! `struct kvm_page_fault`, the RET_PF_* results and the pf_* accounting.

use super::tdp_iter::pages_at;
use super::{fast_pf, mmio, tdp_mmu, MmuError};
use crate::host::{HostError, Hva};
use crate::memslot::Memslots;
use crate::sync::Ordering;
use crate::vm::{Kvm, VcpuArch};
use x86_paging::addr::{Gfn, Gpa, Pfn};

/// PFERR_PRESENT_MASK.
pub const PFERR_PRESENT: u64 = 1 << 0;
/// PFERR_WRITE_MASK.
pub const PFERR_WRITE: u64 = 1 << 1;
/// PFERR_USER_MASK.
pub const PFERR_USER: u64 = 1 << 2;
/// PFERR_RSVD_MASK.
pub const PFERR_RSVD: u64 = 1 << 3;
/// PFERR_FETCH_MASK.
pub const PFERR_FETCH: u64 = 1 << 4;
/// PFERR_PK_MASK.
pub const PFERR_PK: u64 = 1 << 5;
/// PFERR_GUEST_FINAL_MASK.
pub const PFERR_GUEST_FINAL: u64 = 1 << 32;
/// PFERR_GUEST_PAGE_MASK.
pub const PFERR_GUEST_PAGE: u64 = 1 << 33;

/// KVM_MAX_HUGEPAGE_LEVEL (1 GiB).
pub const KVM_MAX_HUGEPAGE_LEVEL: u8 = 3;

/// RET_PF_* results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetPf {
    /// So far so good, keep handling the fault.
    Continue,
    /// Let the vCPU retry the access.
    Retry,
    /// Emulate the instruction.
    Emulate,
    /// The fast path could not handle it: take the slow path.
    Invalid,
    /// A mapping was installed.
    Fixed,
    /// The mapping was already there.
    Spurious,
}

/// `struct kvm_page_fault`.
#[derive(Debug, Clone)]
pub struct KvmPageFault {
    /// The faulting gpa.
    pub addr: Gpa,
    /// The error code (PFERR_*).
    pub error_code: u64,
    /// A prefetch, not a real fault.
    pub prefetch: bool,
    /// Instruction fetch.
    pub exec: bool,
    /// Write.
    pub write: bool,
    /// The translation was present (a protection fault).
    pub present: bool,
    /// Reserved bits (MMIO SPTE).
    pub rsvd: bool,
    /// User access.
    pub user: bool,
    /// Under TDP.
    pub is_tdp: bool,
    /// NX huge page mitigation on.
    pub nx_huge_page_workaround_enabled: bool,
    /// A huge page is not allowed (exec under the mitigation).
    pub huge_page_disallowed: bool,
    /// Highest level the fault may map.
    pub max_level: u8,
    /// Level the memslot and host allow.
    pub req_level: u8,
    /// Level that will be mapped.
    pub goal_level: u8,
    /// The gfn.
    pub gfn: Gfn,
    /// Its memslot, as an index into the vCPU's memslots snapshot (None: MMIO). An index,
    /// not a reference-counted pointer, so faults on several vCPUs do not write a shared
    /// count.
    pub slot: Option<usize>,
    /// `mmu_invalidate_seq` when the pfn was looked up.
    pub mmu_seq: u64,
    /// The host frame (masked to the goal level).
    pub pfn: Pfn,
    /// The host address.
    pub hva: Hva,
    /// The host maps the page writable.
    pub map_writable: bool,
    /// The level at which the host maps the page (1 = 4 KiB, 2 = 2 MiB).
    pub host_level: u8,
}

impl KvmPageFault {
    /// A fault for the shadow MMU: `addr` is the guest-physical address the guest walk gave.
    pub fn new_shadow(kvm: &Kvm, addr: Gpa, error_code: u64) -> Self {
        let mut f = Self::new(kvm, addr, error_code, false);
        f.is_tdp = false;
        f
    }

    pub(crate) fn new(kvm: &Kvm, addr: Gpa, error_code: u64, prefetch: bool) -> Self {
        let nx = kvm.config().nx_huge_pages;
        KvmPageFault {
            addr,
            error_code,
            prefetch,
            exec: error_code & PFERR_FETCH != 0,
            write: error_code & PFERR_WRITE != 0,
            present: error_code & PFERR_PRESENT != 0,
            rsvd: error_code & PFERR_RSVD != 0,
            user: error_code & PFERR_USER != 0,
            is_tdp: true,
            nx_huge_page_workaround_enabled: nx,
            huge_page_disallowed: false,
            max_level: KVM_MAX_HUGEPAGE_LEVEL,
            req_level: 1,
            goal_level: 1,
            gfn: addr.gfn(),
            slot: None,
            mmu_seq: 0,
            pfn: Pfn::new(0),
            hva: Hva(0),
            map_writable: false,
            host_level: 1,
        }
    }
}

/// `kvm_mmu_page_fault`: the entry from an EPT violation / misconfiguration / NPF exit.
pub fn kvm_mmu_page_fault(kvm: &Kvm, vcpu: &mut VcpuArch, cr2_or_gpa: u64, error_code: u64) -> Result<RetPf, MmuError> {
    let _f = kvm.tracer.func(vcpu.id, "kvm_mmu_page_fault");
    let mut r = RetPf::Invalid;
    if error_code & PFERR_RSVD != 0 {
        r = mmio::handle_mmio_page_fault(kvm, vcpu, cr2_or_gpa);
        if r == RetPf::Emulate {
            return Ok(r);
        }
    }
    if r == RetPf::Invalid {
        r = kvm_mmu_do_page_fault(kvm, vcpu, cr2_or_gpa, error_code, false)?;
    }
    Ok(r)
}

/// `kvm_mmu_do_page_fault`: builds the fault and accounts the result.
pub fn kvm_mmu_do_page_fault(
    kvm: &Kvm,
    vcpu: &mut VcpuArch,
    cr2_or_gpa: u64,
    error_code: u64,
    prefetch: bool,
) -> Result<RetPf, MmuError> {
    let _f = kvm.tracer.func(vcpu.id, "kvm_mmu_do_page_fault");
    if !prefetch {
        vcpu.stat.pf_taken += 1;
    }
    let r = (vcpu.mmu.ctx.page_fault)(kvm, vcpu, cr2_or_gpa, error_code, prefetch)?;
    match r {
        RetPf::Fixed => vcpu.stat.pf_fixed += 1,
        RetPf::Emulate if !prefetch => vcpu.stat.pf_emulate += 1,
        RetPf::Spurious if !prefetch => vcpu.stat.pf_spurious += 1,
        _ => {}
    }
    Ok(r)
}

/// `kvm_tdp_page_fault` -> `kvm_tdp_mmu_page_fault`.
pub fn kvm_tdp_page_fault(kvm: &Kvm, vcpu: &mut VcpuArch, fault: &mut KvmPageFault) -> Result<RetPf, MmuError> {
    let _f = kvm.tracer.func(vcpu.id, "kvm_tdp_page_fault");
    // page_fault_handle_page_track: with only TDP roots no gfn is write-tracked.
    let r = fast_pf::fast_page_fault(kvm, vcpu, fault);
    if r != RetPf::Invalid {
        return Ok(r);
    }
    {
        let _t = kvm.tracer.func(vcpu.id, "mmu_topup_memory_caches");
        super::mmu::mmu_topup_memory_caches(kvm, vcpu)
            .map_err(|e| MmuError::OutOfMemory { gpa: fault.addr.raw(), source: e })?;
    }
    let r = kvm_faultin_pfn(kvm, vcpu, fault)?;
    if r != RetPf::Continue {
        return Ok(r);
    }
    if !kvm.mmu.tdp_mmu_enabled() {
        // direct_page_fault: the legacy MMU takes mmu_lock for write.
        return Ok(super::shadow::direct_page_fault_locked(kvm, vcpu, fault));
    }
    let _r = kvm.mmu.mmu_lock.read();
    if is_page_fault_stale(kvm, vcpu, fault) {
        return Ok(RetPf::Retry);
    }
    Ok(tdp_mmu::kvm_tdp_mmu_map(kvm, vcpu, fault))
}

/// `mmu_invalidate_retry_gfn`: an invalidation of `gfn` is in progress, or one completed
/// since `mmu_seq` was read.
pub fn mmu_invalidate_retry_gfn(kvm: &Kvm, mmu_seq: u64, gfn: Gfn) -> bool {
    let m = &kvm.mmu;
    if m.mmu_invalidate_in_progress.load(Ordering::Acquire) != 0 {
        let (s, e) =
            (m.mmu_invalidate_range_start.load(Ordering::Acquire), m.mmu_invalidate_range_end.load(Ordering::Acquire));
        if gfn.raw() >= s && gfn.raw() < e {
            return true;
        }
    }
    m.mmu_invalidate_seq.load(Ordering::Acquire) != mmu_seq
}

/// `kvm_faultin_pfn`: memslot lookup and hva -> pfn (get_user_pages), or the no-slot (MMIO)
/// and read-only-slot cases.
pub fn kvm_faultin_pfn(kvm: &Kvm, vcpu: &mut VcpuArch, fault: &mut KvmPageFault) -> Result<RetPf, MmuError> {
    let _f = kvm.tracer.func(vcpu.id, "kvm_faultin_pfn");
    fault.mmu_seq = kvm.mmu.mmu_invalidate_seq.load(Ordering::Acquire);
    let Some(slot_index) = vcpu.slots.find_index(fault.gfn) else {
        return Ok(kvm_handle_noslot_fault(kvm, vcpu, fault));
    };
    let slot = vcpu.slots.at(slot_index);
    if fault.write && slot.readonly() {
        // KVM_PFN_ERR_RO_FAULT: the write is emulated and exits to the VMM as MMIO.
        return Ok(RetPf::Emulate);
    }
    if mmu_invalidate_retry_gfn(kvm, fault.mmu_seq, fault.gfn) {
        return Ok(RetPf::Retry);
    }
    let hva = slot.gfn_to_hva(fault.gfn);
    let host = kvm.host();
    let want_writable = !slot.readonly();
    let gup = |write| {
        host.get_user_page(hva, write).map_err(|e| match e {
            HostError::OutOfMemory { .. } => MmuError::OutOfMemory { gpa: fault.addr.raw(), source: e },
            _ => MmuError::MemoryFault { gpa: fault.addr.raw(), hva: hva.raw() },
        })
    };
    // hva_to_pfn: a read fault still asks for a writable mapping if one exists already.
    let fast = if want_writable { host.get_user_page_fast_only(hva, true) } else { None };
    let (page, writable) = match (fault.write, fast) {
        (false, Some(p)) => (p, true),
        _ => {
            let p = gup(fault.write)?;
            (p, p.writable && want_writable)
        }
    };
    fault.slot = Some(slot_index);
    fault.hva = hva;
    fault.pfn = page.pfn;
    fault.map_writable = writable;
    fault.host_level = page.level;
    Ok(RetPf::Continue)
}

/// `kvm_handle_noslot_fault`: an access outside every memslot.
fn kvm_handle_noslot_fault(kvm: &Kvm, vcpu: &mut VcpuArch, fault: &mut KvmPageFault) -> RetPf {
    vcpu.mmu.mmio_gfn = Some((fault.gfn.raw(), vcpu.slots.generation()));
    if !kvm.config().mmio_caching {
        return RetPf::Emulate;
    }
    // kvm_mmu_max_gfn: an MMIO SPTE cannot encode a gfn beyond the host's address width.
    if fault.gfn.raw() >= 1 << (46 - 12) {
        return RetPf::Emulate;
    }
    fault.slot = None;
    RetPf::Continue
}

/// `is_page_fault_stale`: the root became obsolete, or an invalidation raced with the pfn
/// lookup.
pub fn is_page_fault_stale(kvm: &Kvm, vcpu: &VcpuArch, fault: &KvmPageFault) -> bool {
    match &vcpu.mmu.root {
        None => true,
        Some(r) if r.is_invalid() => true,
        Some(_) => fault.slot.is_some() && mmu_invalidate_retry_gfn(kvm, fault.mmu_seq, fault.gfn),
    }
}

/// `kvm_mmu_max_mapping_level`: the largest level `gfn` of `slot` may be mapped at — what
/// the memslot (lpage_info: alignment, write tracking) and the host mapping allow, capped by
/// the largest huge page the MMU maps. Dirty logging is the caller's business.
pub fn kvm_mmu_max_mapping_level(kvm: &Kvm, slot: &crate::memslot::Memslot, gfn: Gfn) -> u8 {
    let mut level = kvm.config().tdp_huge_page_level.min(3);
    while level > 1 && slot.lpage_disallowed(gfn, level) {
        level -= 1;
    }
    if level > 1 {
        level = level.min(kvm.host().host_mapping_level(slot.gfn_to_hva(gfn)));
    }
    level
}

/// `kvm_mmu_hugepage_adjust`: the largest level the memslot (lpage_info) and the host
/// mapping allow, unless the NX mitigation forbids a huge page for this fetch.
///
/// The host mapping level (`host_pfn_mapping_level`) is the one get_user_pages saw when
/// the pfn was looked up; a later change of the host mapping raises an MMU-notifier
/// invalidation, which makes the fault stale, so this is as safe as KVM's re-read.
pub fn kvm_mmu_hugepage_adjust(kvm: &Kvm, slots: &Memslots, fault: &mut KvmPageFault) {
    fault.huge_page_disallowed = fault.exec && fault.nx_huge_page_workaround_enabled;
    let Some(slot) = fault.slot.map(|i| slots.at(i)) else { return };
    // Dirty logging maps 4 KiB, so each write is logged at page granularity.
    if fault.max_level == 1 || slot.dirty_logging() {
        return;
    }
    let mut level = fault.max_level.min(kvm.config().tdp_huge_page_level);
    while level > 1 && slot.lpage_disallowed(fault.gfn, level) {
        level -= 1;
    }
    if level > 1 {
        level = level.min(fault.host_level);
    }
    fault.req_level = level;
    if level <= 1 || fault.huge_page_disallowed {
        return;
    }
    fault.goal_level = level;
    fault.pfn = Pfn::new(fault.pfn.raw() & !(pages_at(level) - 1));
}
