//! The KVM-shaped API: a VM created from a config carrying KVM's module parameters,
//! memslots (KVM_SET_USER_MEMORY_REGION), vCPUs and their run loop, vCPU requests and remote
//! TLB flushes.
//!
//! A vCPU runs guest operations (loads, stores, fetches, CR writes, INVLPG) on the hardware
//! model; VM exits go to the MMU (`kvm_mmu_page_fault`), and accesses the MMU cannot map are
//! emulated and, for MMIO, handed to the VMM's devices.

use crate::host::{FrameAllocator, HostError, HostMm, MmuNotifier, PhysMem};
use crate::hw::cpu::{Cpu, CpuMode, Exception, Stop, VmExit};
use crate::memslot::{MemslotChange, MemslotError, MemslotFlags, Memslots, UserspaceMemoryRegion};
use crate::mmio_bus::{MmioBus, MmioDevice};
use crate::mmu::role::Role;
use crate::mmu::spte::SpteMasks;
use crate::mmu::tdp_mmu::{self, TdpRoot};
use crate::mmu::{KvmMmu, MmuError, RetPf};
use crate::stats::{LatencyHistogram, VcpuStats, VmStats};
use crate::sync::{Arc, AtomicU32, AtomicU64, AtomicU8, Mutex, Ordering, RwLock};
use crate::trace::Tracer;
use std::collections::BTreeMap;
use x86_paging::access::{AccessKind, PfErrorCode};
use x86_paging::addr::{Gpa, Gva, Pfn};
use x86_paging::ept::{EptQual, TdpExit};
use x86_paging::regs::{Cr0, Cr4, Efer};

mod config;
mod vcpu;

pub use config::{MmuKind, TdpKind, VmConfig};
pub use vcpu::{ept_violation_error_code, Vcpu, VcpuArch, VcpuMmu};
bitflags::bitflags! {
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2's flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct ManualDirtyLog: u64 {
        /// KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: KVM_GET_DIRTY_LOG only reads the log;
        /// KVM_CLEAR_DIRTY_LOG clears bits and write-protects their pages.
        const MANUAL_PROTECT_ENABLE = 1 << 0;
        /// KVM_DIRTY_LOG_INITIALLY_SET: enabling logging sets every bit instead of
        /// write-protecting the slot (protection then comes page by page with the clears).
        const INITIALLY_SET = 1 << 1;
    }
}

/// Errors of the VM API.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum VmError {
    /// A bad memslot update.
    #[error(transparent)]
    Memslot(#[from] MemslotError),
    /// The host failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The MMU failed (KVM_RUN would return an error).
    #[error(transparent)]
    Mmu(#[from] MmuError),
    /// A configuration this build does not implement.
    #[error("unsupported configuration: {0}")]
    Unsupported(String),
    /// A bad configuration value.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// An access kept exiting without progress.
    #[error("vCPU {vcpu} made no progress on an access at gva {gva:#x} after {exits} exits (last exit: {last})")]
    Stuck {
        /// vCPU id.
        vcpu: u32,
        /// The access.
        gva: u64,
        /// Exits taken.
        exits: u32,
        /// The last exit.
        last: String,
    },
    /// KVM_EXIT_DIRTY_RING_FULL: the vCPU's dirty ring reached its soft limit; collect the
    /// ring, call KVM_RESET_DIRTY_RINGS and run the vCPU again.
    #[error("vCPU {vcpu}: dirty ring full (KVM_EXIT_DIRTY_RING_FULL): collect it and reset the rings")]
    DirtyRingFull {
        /// vCPU id.
        vcpu: u32,
    },
}

/// What stops a guest operation: an exception for the guest, or a VM failure.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum GuestError {
    /// The guest takes an exception (its kernel handles it).
    #[error("guest exception {0}")]
    Exception(Exception),
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// `KVM_MAX_VCPUS` on x86: vCPUs one VM may create.
pub const KVM_MAX_VCPUS: u32 = 4096;

/// Bit numbers of vCPU requests (KVM_REQ_*).
pub mod req {
    /// KVM_REQ_TLB_FLUSH.
    pub const TLB_FLUSH: u64 = 1 << 0;
    /// KVM_REQ_MMU_SYNC.
    pub const MMU_SYNC: u64 = 1 << 3;
    /// KVM_REQ_LOAD_MMU_PGD.
    pub const LOAD_MMU_PGD: u64 = 1 << 5;
    /// KVM_REQ_TLB_FLUSH_CURRENT.
    pub const TLB_FLUSH_CURRENT: u64 = 1 << 26;
    /// KVM_REQ_TLB_FLUSH_GUEST.
    pub const TLB_FLUSH_GUEST: u64 = 1 << 27;
    /// KVM_REQ_MMU_FREE_OBSOLETE_ROOTS.
    pub const MMU_FREE_OBSOLETE_ROOTS: u64 = 1 << 31;
    /// KVM_REQ_UPDATE_CPU_DIRTY_LOGGING: turn the page-modification log on or off.
    pub const UPDATE_CPU_DIRTY_LOGGING: u64 = 1 << 30;
    /// KVM_REQ_DIRTY_RING_SOFT_FULL: exit to userspace until the ring is reset.
    pub const DIRTY_RING_SOFT_FULL: u64 = 1 << 32;
    /// Not a request: what `kvm_vcpu_kick`'s IPI does, a VM exit. The vCPU clears it on its
    /// next entry, after the exit that emptied its page-modification log.
    pub const KICK: u64 = 1 << 33;
}

/// vCPU modes (`vcpu->mode`).
pub mod mode {
    /// Not running guest code.
    pub const OUTSIDE_GUEST_MODE: u8 = 0;
    /// Running guest code (the hardware may walk SPTEs and use its TLB).
    pub const IN_GUEST_MODE: u8 = 1;
    /// In a lockless walk of the SPTEs (fast page fault).
    pub const READING_SHADOW_PAGE_TABLES: u8 = 3;
}

/// What other threads may see of a vCPU: its mode and pending requests. Aligned to its own
/// cache lines: every guest operation writes `mode`, and vCPUs must not share that line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct VcpuShared {
    /// vCPU id.
    pub id: u32,
    /// `vcpu->mode`.
    pub mode: AtomicU8,
    /// `vcpu->requests`.
    pub requests: AtomicU64,
    /// This vCPU's side of `kvm->srcu`: odd while it handles an exit (and emulates), i.e.
    /// while it may act on a memslot snapshot. See [`Kvm::synchronize_srcu`].
    srcu: AtomicU64,
}

/// An exit being handled (`srcu_read_lock(&kvm->srcu)` .. `srcu_read_unlock`).
struct SrcuReadGuard<'a>(&'a AtomicU64);

impl Drop for SrcuReadGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

impl VcpuShared {
    /// Enters an SRCU read-side section: the cheap side of the asymmetric barrier, as for
    /// `mode` (the memslot updater pays with `heavy_barrier`).
    fn srcu_read_lock(&self) -> SrcuReadGuard<'_> {
        self.srcu.fetch_add(1, Ordering::Relaxed);
        crate::sync::barrier::light_barrier();
        SrcuReadGuard(&self.srcu)
    }

    /// The vCPU's side of the entry handshake (`vcpu_enter_guest`: `smp_store_mb(vcpu->mode,
    /// IN_GUEST_MODE)`, then `kvm_request_pending`): publish guest mode, then look at the
    /// requests. Returns whether one is pending, in which case the caller leaves guest mode
    /// (SeqCst), services them and tries again. Pairs with [`make_request_and_wait`].
    #[inline]
    pub(crate) fn enter_guest_mode(&self) -> bool {
        self.mode.store(mode::IN_GUEST_MODE, Ordering::Relaxed);
        crate::sync::barrier::light_barrier();
        self.requests.load(Ordering::Relaxed) != 0
    }

    /// Waits until this vCPU has consumed request `bit` (made by the caller) or is in no mode
    /// `busy` accepts: the "IPI" of `kvm_make_all_cpus_request` with KVM_REQUEST_WAIT. The
    /// caller has made the request and run `heavy_barrier` first.
    pub(crate) fn wait_for_request(&self, bit: u64, busy: impl Fn(u8) -> bool) {
        let mut spins = 0u32;
        while self.requests.load(Ordering::SeqCst) & bit != 0 && busy(self.mode.load(Ordering::SeqCst)) {
            spins += 1;
            if spins > 64 {
                crate::sync::thread::yield_now();
            } else {
                crate::sync::spin_loop();
            }
        }
    }
}

/// `kvm_make_all_cpus_request(kvm, bit | KVM_REQUEST_WAIT)`, the requester's side of the
/// handshake with [`VcpuShared::enter_guest_mode`]: sets `bit` on every vCPU, then waits until
/// each vCPU other than `me` that is in guest mode or walking SPTEs locklessly has consumed
/// it. When this returns, no vCPU can still act on what the request invalidates (a TLB
/// entry, a table about to be freed): it has either serviced the request or will see it
/// before its next guest access. Returns whether some vCPU had to be waited for (an "IPI",
/// what `remote_tlb_flush` counts).
pub(crate) fn make_request_and_wait(vcpus: &[Arc<VcpuShared>], me: Option<u32>, bit: u64) -> bool {
    for v in vcpus {
        v.requests.fetch_or(bit, Ordering::SeqCst);
    }
    // Every vCPU thread now either shows us IN_GUEST_MODE / READING_SHADOW_PAGE_TABLES, or
    // will see the request before its next access. With no other vCPU there is nobody to
    // wait for: the caller sees its own request on its next entry.
    if vcpus.iter().any(|v| Some(v.id) != me) {
        crate::sync::barrier::heavy_barrier();
    }
    let mut kicked = false;
    for v in vcpus.iter().filter(|v| Some(v.id) != me) {
        kicked |= v.mode.load(Ordering::SeqCst) != mode::OUTSIDE_GUEST_MODE;
        v.wait_for_request(bit, |m| matches!(m, mode::IN_GUEST_MODE | mode::READING_SHADOW_PAGE_TABLES));
    }
    kicked
}

/// A VM (`struct kvm`).
pub struct Kvm {
    pub(crate) config: VmConfig,
    pub(crate) host: Arc<HostMm>,
    pub(crate) mmu: KvmMmu,
    /// VM-wide statistics.
    pub stats: VmStats,
    /// Trace buffer.
    pub tracer: Tracer,
    memslots: RwLock<Arc<Memslots>>,
    memslots_gen: AtomicU64,
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 flags ([`ManualDirtyLog`] bits).
    pub(crate) manual_dirty_log: AtomicU64,
    /// Memslots logging dirty pages with PML (`cpu_dirty_logging_count`).
    pub(crate) cpu_dirty_logging_count: AtomicU32,
    /// Entries per vCPU dirty ring (0 = none).
    pub(crate) dirty_ring_entries: AtomicU32,
    /// Every vCPU's dirty ring.
    pub(crate) dirty_rings: Mutex<Vec<Arc<crate::dirty_log::DirtyRing>>>,
    slots_lock: Mutex<()>,
    pub(crate) vcpus: RwLock<Vec<Arc<VcpuShared>>>,
    mmio: RwLock<MmioBus>,
    next_vcpu: AtomicU32,
    n_vcpus_live: AtomicU32,
    notifier: Mutex<Option<Arc<dyn MmuNotifier>>>,
}

struct Notifier(crate::sync::Weak<Kvm>);

impl MmuNotifier for Notifier {
    fn invalidate_range_start(&self, range: crate::host::HvaRange, _ev: crate::host::MmuNotifyEvent) {
        if let Some(kvm) = self.0.upgrade() {
            crate::mmu::mmu_notifier::invalidate_range_start(&kvm, range);
        }
    }
    fn invalidate_range_end(&self, range: crate::host::HvaRange, _ev: crate::host::MmuNotifyEvent) {
        if let Some(kvm) = self.0.upgrade() {
            crate::mmu::mmu_notifier::invalidate_range_end(&kvm, range);
        }
    }
    fn release(&self) {
        // kvm_mmu_notifier_release -> kvm_flush_shadow_all -> kvm_mmu_zap_all.
        if let Some(kvm) = self.0.upgrade() {
            kvm.kvm_mmu_zap_all_fast();
        }
    }
    fn clear_flush_young(&self, range: crate::host::HvaRange) -> bool {
        use crate::mmu::mmu_notifier::{age_hva_range, Aging};
        self.0.upgrade().is_some_and(|kvm| age_hva_range(&kvm, range, Aging::ClearFlush))
    }
    fn clear_young(&self, range: crate::host::HvaRange) -> bool {
        use crate::mmu::mmu_notifier::{age_hva_range, Aging};
        self.0.upgrade().is_some_and(|kvm| age_hva_range(&kvm, range, Aging::Clear))
    }
    fn test_young(&self, range: crate::host::HvaRange) -> bool {
        use crate::mmu::mmu_notifier::{age_hva_range, Aging};
        self.0.upgrade().is_some_and(|kvm| age_hva_range(&kvm, range, Aging::Test))
    }
}

impl Kvm {
    /// KVM_CREATE_VM: a VM whose guest memory will come from `host`.
    pub fn new(config: VmConfig, host: Arc<HostMm>) -> Result<Arc<Kvm>, VmError> {
        crate::sync::barrier::init();
        if !(36..=52).contains(&config.maxphyaddr) {
            return Err(VmError::InvalidConfig(format!("maxphyaddr {} is outside 36..=52", config.maxphyaddr)));
        }
        if !matches!(config.max_tdp_level, 4 | 5) {
            return Err(VmError::InvalidConfig(format!("max_tdp_level {} must be 4 or 5", config.max_tdp_level)));
        }
        if config.maxphyaddr > 48 && config.tdp_level() < 5 {
            // A 4-level EPT/NPT translates only 48 bits of guest-physical address; KVM never
            // advertises a MAXPHYADDR its TDP cannot map.
            return Err(VmError::InvalidConfig(format!(
                "maxphyaddr {} needs 5-level TDP (max_tdp_level = 5); 4-level TDP maps 48 bits",
                config.maxphyaddr
            )));
        }
        if !(1..=3).contains(&config.tdp_huge_page_level) {
            return Err(VmError::InvalidConfig(format!(
                "tdp_huge_page_level {} must be 1, 2 or 3",
                config.tdp_huge_page_level
            )));
        }
        let masks = match (config.mmu, config.tdp) {
            // Shadow page tables use the 64-bit paging format.
            (MmuKind::Shadow, _) | (_, TdpKind::Npt) => SpteMasks::x86_64(),
            (_, TdpKind::Ept) => SpteMasks::ept(config.eptad),
        };
        let kvm = Arc::new(Kvm {
            host,
            mmu: KvmMmu::new(config.mmu, masks),
            stats: VmStats::default(),
            tracer: Tracer::default(),
            memslots: RwLock::new(Arc::new(Memslots::default())),
            memslots_gen: AtomicU64::new(0),
            manual_dirty_log: AtomicU64::new(0),
            cpu_dirty_logging_count: AtomicU32::new(0),
            dirty_ring_entries: AtomicU32::new(0),
            dirty_rings: Mutex::new(Vec::new()),
            slots_lock: Mutex::new(()),
            vcpus: RwLock::new(Vec::new()),
            mmio: RwLock::new(MmioBus::default()),
            next_vcpu: AtomicU32::new(0),
            n_vcpus_live: AtomicU32::new(0),
            notifier: Mutex::new(None),
            config,
        });
        let n: Arc<dyn MmuNotifier> = Arc::new(Notifier(Arc::downgrade(&kvm)));
        kvm.host.register_notifier(n.clone());
        *kvm.notifier.lock() = Some(n);
        Ok(kvm)
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The VMM's address space.
    pub fn host(&self) -> &Arc<HostMm> {
        &self.host
    }

    /// Host physical memory.
    #[inline]
    pub(crate) fn mem(&self) -> &PhysMem {
        self.host.frames().mem()
    }

    pub(crate) fn frames(&self) -> &FrameAllocator {
        self.host.frames()
    }

    pub(crate) fn nx_huge_pages(&self) -> bool {
        self.config.nx_huge_pages
    }

    /// The current memslots.
    pub fn memslots(&self) -> Arc<Memslots> {
        self.memslots.read().clone()
    }

    /// The MMU state (for the audit and reports).
    pub fn mmu(&self) -> &KvmMmu {
        &self.mmu
    }

    /// Places an MMIO device at [gpa, gpa+len).
    pub fn register_mmio(&self, gpa: Gpa, len: u64, dev: Arc<dyn MmioDevice>) {
        self.mmio.write().register(gpa, len, dev);
    }

    /// The MMIO bus (a read guard: devices are added rarely, looked up on every emulation).
    pub(crate) fn mmio_bus(&self) -> crate::sync::RwLockReadGuard<'_, MmioBus> {
        self.mmio.read()
    }

    /// KVM_SET_USER_MEMORY_REGION.
    pub fn set_user_memory_region(&self, r: UserspaceMemoryRegion) -> Result<(), VmError> {
        let _s = self.slots_lock.lock();
        let cur = self.memslots();
        if let Some(old) = cur.by_id(r.slot) {
            if r.memory_size != 0
                && old.flags.contains(MemslotFlags::READONLY) != r.flags.contains(MemslotFlags::READONLY)
            {
                return Err(VmError::InvalidConfig(format!(
                    "memslot {}: KVM_MEM_READONLY cannot change on an existing slot",
                    r.slot
                )));
            }
        }
        drop(cur);
        let logging = r.memory_size != 0 && r.flags.contains(MemslotFlags::LOG_DIRTY_PAGES);
        let (new, change, old, initially_set) = {
            // The set is changed in place when no vCPU holds it (creating slots before the
            // vCPUs run: O(log n) each, not a copy of every slot); a set a vCPU still holds
            // is copied first and the copy published.
            let mut cur = self.memslots.write();
            let set = Arc::make_mut(&mut *cur);
            let (change, old) = set.apply(&r, self.config.maxphyaddr)?;
            let was_logging = old.as_ref().is_some_and(|o| o.dirty_logging());
            let initially_set = logging && !was_logging && self.dirty_log_initially_set();
            if initially_set {
                // Every page starts dirty; nothing is write-protected until userspace clears.
                if let Some(s) = set.by_id(r.slot) {
                    s.set_all_dirty();
                }
            }
            (cur.clone(), change, old, initially_set)
        };
        let was_logging = old.as_ref().is_some_and(|o| o.dirty_logging());
        if matches!(change, MemslotChange::Create | MemslotChange::Delete) {
            // kvm_arch_commit_memory_region: the default shadow-page limit follows RAM.
            self.mmu.shadow.lock().update_n_max(&new);
        }
        let gen = new.generation();
        drop(new);
        self.memslots_gen.fetch_add(1, Ordering::AcqRel);
        // kvm_swap_active_memslots: wait for every exit handler that may still act on the
        // old slots before changing mappings for the new ones, or a fault that raced with
        // turning logging on could map a page writable (or huge) without logging it.
        self.synchronize_srcu();
        if gen & crate::mmu::spte::MMIO_SPTE_GEN_MASK == 0 {
            // kvm_mmu_invalidate_mmio_sptes: the 19 generation bits an MMIO SPTE holds
            // wrapped, so an old MMIO SPTE could look current again: zap everything.
            self.kvm_mmu_zap_all_fast();
        }
        if matches!(change, MemslotChange::Delete | MemslotChange::Move) {
            // kvm_arch_flush_shadow_memslot: kvm_mmu_zap_all_fast, then
            // kvm_page_track_delete_slot.
            self.kvm_mmu_zap_all_fast();
            if let Some(o) = &old {
                self.kvm_page_track_delete_slot(o.base_gfn, o.npages);
            }
        }
        if logging != was_logging {
            // Toggling KVM_MEM_LOG_DIRTY_PAGES, deletion included.
            self.update_cpu_dirty_logging(logging);
        }
        if change != MemslotChange::Delete {
            self.kvm_mmu_slot_apply_flags(r.slot, was_logging, logging, change, initially_set)?;
        }
        Ok(())
    }

    pub(crate) fn memslots_generation(&self) -> u64 {
        self.memslots_gen.load(Ordering::Acquire)
    }

    /// KVM_CREATE_VCPU. At most [`KVM_MAX_VCPUS`] per VM, as x86 KVM (`kvm->max_vcpus`).
    pub fn create_vcpu(self: &Arc<Self>) -> Result<Vcpu, VmError> {
        let id = self
            .next_vcpu
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < KVM_MAX_VCPUS).then_some(n + 1))
            .map_err(|_| VmError::InvalidConfig(format!("KVM_CREATE_VCPU: a VM has at most {KVM_MAX_VCPUS} vCPUs")))?;
        // VPIDs 1..=KVM_MAX_VCPUS: each vCPU tags its TLB entries with its own.
        let vpid = u16::try_from(id + 1).expect("KVM_MAX_VCPUS fits a VPID");
        let shared = Arc::new(VcpuShared { id, ..Default::default() });
        if self.pml_in_use() {
            // vmx_vcpu_create: PML follows the logging slots from the start.
            shared.requests.fetch_or(req::UPDATE_CPU_DIRTY_LOGGING, Ordering::Relaxed);
        }
        let dirty_ring = self.new_dirty_ring(shared.clone());
        self.vcpus.write().push(shared.clone());
        self.n_vcpus_live.fetch_add(1, Ordering::Relaxed);
        let cpu = Cpu::new(self.host.frames().mem().clone(), CpuMode::Native, vpid, self.config.maxphyaddr);
        Ok(Vcpu {
            kvm: self.clone(),
            arch: VcpuArch {
                id,
                cpu,
                shared,
                mmu: VcpuMmu::new(crate::mmu::mmu::kvm_init_mmu(&self.mmu)),
                stat: VcpuStats::default(),
                slots: self.memslots(),
                shadow: Default::default(),
                dirty_ring,
                fault_latency: None,
            },
        })
    }

    /// `synchronize_srcu_expedited(&kvm->srcu)`: returns once every vCPU that was handling
    /// an exit when this was called has finished it. vCPUs that start one later see the
    /// memslots published before the call.
    pub(crate) fn synchronize_srcu(&self) {
        let vcpus = self.vcpus.read().clone();
        crate::sync::barrier::heavy_barrier();
        for v in &vcpus {
            let seen = v.srcu.load(Ordering::Acquire);
            if seen % 2 == 0 {
                continue;
            }
            let mut spins = 0u32;
            while v.srcu.load(Ordering::Acquire) == seen {
                spins += 1;
                if spins > 64 {
                    crate::sync::thread::yield_now();
                } else {
                    crate::sync::spin_loop();
                }
            }
        }
    }

    /// `kvm_make_all_cpus_request`.
    pub(crate) fn make_all_cpus_request(&self, r: u64) {
        for v in self.vcpus.read().iter() {
            v.requests.fetch_or(r, Ordering::SeqCst);
        }
    }

    /// `kvm_flush_remote_tlbs`: asks every vCPU to flush its TLB and waits until each one
    /// that is running guest code (or walking SPTEs locklessly) has seen the request.
    /// `me` is the calling vCPU, which flushes on its next entry.
    pub fn flush_remote_tlbs(&self, me: Option<u32>) {
        let _f = self.tracer.func(me.unwrap_or(crate::trace::HOST_CPU), "kvm_flush_remote_tlbs");
        self.stats.remote_tlb_flush_requests.add(1);
        let vcpus = self.vcpus.read().clone();
        if make_request_and_wait(&vcpus, me, req::TLB_FLUSH) {
            self.stats.remote_tlb_flush.add(1);
        }
    }

    /// VM statistics by KVM name.
    pub fn vm_stats(&self) -> BTreeMap<&'static str, i64> {
        let mut m = self.stats.snapshot();
        m.insert("tdp_mmu_pages", self.mmu.tdp_mmu_pages.sum());
        m
    }

    /// Checks the MMU's invariants (see [`crate::mmu::audit`]).
    pub fn audit(&self) -> Result<crate::mmu::audit::AuditReport, crate::mmu::audit::AuditError> {
        crate::mmu::audit::audit(self)
    }
}

impl Drop for Kvm {
    fn drop(&mut self) {
        // kvm_mmu_zap_all on teardown (mmu_notifier release): return every table to the host.
        let roots: Vec<Arc<TdpRoot>> = std::mem::take(&mut *self.mmu.roots.lock());
        for r in &roots {
            if !r.zapped.swap(true, Ordering::AcqRel) {
                tdp_mmu::tdp_mmu_zap_root(self, r, false);
            }
            self.frames().free_4k(r.hpa.pfn());
        }
        for p in std::mem::take(&mut *self.mmu.deferred_free.lock()) {
            self.frames().free_4k(p);
        }
        let s = self.mmu.shadow.get_mut();
        for id in s.pages.all() {
            let sp = s.pages.remove(id);
            self.host.frames().free_4k(sp.spt);
        }
        if let Some(p) = self.mmu.shadow_dummy_root.get_mut().take() {
            self.host.frames().free_4k(p);
        }
        if let Some(n) = self.notifier.lock().take() {
            self.host.unregister_notifier(&n);
        }
    }
}

#[cfg(all(test, vmmu_loom))]
mod loom_models;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_is_shared_and_vcpus_move_between_threads() {
        fn shared<T: Send + Sync>() {}
        fn movable<T: Send>() {}
        shared::<Kvm>();
        shared::<Arc<Kvm>>();
        movable::<Vcpu>();
    }
}
