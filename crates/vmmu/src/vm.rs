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
use x86_paging::ept::{EptConfig, EptQual, NptConfig, TdpExit};
use x86_paging::regs::{Cr0, Cr4, Efer};
use x86_paging::walk2d::Tdp;

/// Which MMU the VM uses (the `tdp_mmu` and `ept`/`npt` module parameters together).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MmuKind {
    /// Two-dimensional paging with the TDP MMU (tdp_mmu=Y).
    Tdp,
    /// Shadow paging (ept=N / npt=N).
    Shadow,
    /// Two-dimensional paging with the legacy MMU (tdp_mmu=N).
    LegacyTdp,
}

/// The TDP flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TdpKind {
    /// Intel EPT.
    Ept,
    /// AMD NPT.
    Npt,
}

/// A VM's configuration: KVM's module parameters and VM settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// MMU.
    pub mmu: MmuKind,
    /// EPT or NPT.
    pub tdp: TdpKind,
    /// kvm_intel.eptad: EPT A/D bits (else access tracking).
    pub eptad: bool,
    /// Largest TDP level the "hardware" supports (4 or 5).
    pub max_tdp_level: u8,
    /// Guest MAXPHYADDR (CPUID).
    pub maxphyaddr: u8,
    /// kvm.nx_huge_pages.
    pub nx_huge_pages: bool,
    /// kvm.nx_huge_pages_recovery_ratio: each recovery pass zaps 1/ratio of the tables the
    /// mitigation made (0: no recovery).
    pub nx_huge_pages_recovery_ratio: u32,
    /// kvm.nx_huge_pages_recovery_period_ms (0: one hour / ratio).
    pub nx_huge_pages_recovery_period_ms: u32,
    /// kvm.mmio_caching.
    pub mmio_caching: bool,
    /// Largest huge page the TDP MMU maps (2 = 2 MiB, 3 = 1 GiB).
    pub tdp_huge_page_level: u8,
    /// kvm.eager_page_split: enabling dirty logging splits the slot's huge SPTEs down to
    /// 4 KiB at once (TDP MMU), instead of on each first write.
    pub eager_page_split: bool,
    /// kvm_intel.pml: with EPT A/D bits, dirty logging clears D bits and reads the
    /// page-modification log instead of write-protecting (see [`crate::dirty_log`]).
    pub pml: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mmu: MmuKind::Tdp,
            tdp: TdpKind::Ept,
            eptad: true,
            max_tdp_level: 4,
            maxphyaddr: 46,
            nx_huge_pages: false,
            nx_huge_pages_recovery_ratio: 60,
            nx_huge_pages_recovery_period_ms: 0,
            mmio_caching: true,
            tdp_huge_page_level: 3,
            eager_page_split: true,
            pml: true,
        }
    }
}

impl VmConfig {
    /// `kvm_mmu_get_tdp_level`: 4-level unless 5-level is supported and MAXPHYADDR > 48.
    pub fn tdp_level(&self) -> u8 {
        if self.max_tdp_level == 5 && self.maxphyaddr <= 48 {
            4
        } else {
            self.max_tdp_level
        }
    }

    /// `calc_nx_huge_pages_recovery_period`: the recovery worker's period, None when the
    /// mitigation or the recovery is off.
    pub fn nx_huge_pages_recovery_period(&self) -> Option<std::time::Duration> {
        if !self.nx_huge_pages || self.nx_huge_pages_recovery_ratio == 0 {
            return None;
        }
        let ms = match self.nx_huge_pages_recovery_period_ms {
            0 => 60 * 60 * 1000 / self.nx_huge_pages_recovery_ratio.min(3600),
            ms => ms,
        };
        Some(std::time::Duration::from_millis(u64::from(ms)))
    }

    /// `kvm_ad_enabled`.
    pub fn ad_enabled(&self) -> bool {
        self.tdp == TdpKind::Npt || self.eptad
    }
}

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

    /// Waits until this vCPU has consumed request `bit` (made by the caller) or is in no mode
    /// `busy` accepts: the "IPI" of `kvm_make_all_cpus_request` with KVM_REQUEST_WAIT. The
    /// caller has made the request and run `heavy_barrier` first.
    pub(crate) fn wait_for_request(&self, bit: u64, busy: impl Fn(u8) -> bool) {
        let mut spins = 0u32;
        while self.requests.load(Ordering::SeqCst) & bit != 0 && busy(self.mode.load(Ordering::SeqCst)) {
            spins += 1;
            if spins > 64 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
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

struct Notifier(std::sync::Weak<Kvm>);

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
        match config.mmu {
            MmuKind::Tdp | MmuKind::Shadow | MmuKind::LegacyTdp => {}
        }
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
            config,
            host,
            mmu: KvmMmu::new(masks),
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
            // kvm_arch_flush_shadow_memslot -> kvm_mmu_zap_all_fast.
            self.kvm_mmu_zap_all_fast();
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

    /// Zaps every leaf mapping of memslot `slot` (both MMUs) and flushes.
    pub(crate) fn zap_slot_leaves(&self, slot: u32) {
        let slots = self.memslots();
        let Some(s) = slots.by_id(slot) else { return };
        let (start, end) = (s.base_gfn, s.end_gfn());
        let _w = self.mmu.mmu_lock.write();
        let mut flush = false;
        for r in tdp_mmu::unzapped_roots(self) {
            flush |= tdp_mmu::tdp_mmu_zap_leafs(self, u32::MAX, &r, start, end);
        }
        let mut sh = self.mmu.shadow.lock();
        let mut ctx =
            crate::mmu::shadow::Ctx { kvm: self, s: &mut sh, slots: slots.clone(), vcpu: None, cpu: u32::MAX };
        flush |= ctx.unmap_gfn_range(start, end);
        drop(sh);
        self.flush_and_free_deferred(None, flush);
    }

    pub(crate) fn memslots_generation(&self) -> u64 {
        self.memslots_gen.load(Ordering::Acquire)
    }

    /// KVM_CREATE_VCPU.
    pub fn create_vcpu(self: &Arc<Self>) -> Result<Vcpu, VmError> {
        let id = self.next_vcpu.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(VcpuShared { id, ..Default::default() });
        if self.pml_in_use() {
            // vmx_vcpu_create: PML follows the logging slots from the start.
            shared.requests.fetch_or(req::UPDATE_CPU_DIRTY_LOGGING, Ordering::Relaxed);
        }
        let dirty_ring = self.new_dirty_ring(shared.clone());
        self.vcpus.write().push(shared.clone());
        self.n_vcpus_live.fetch_add(1, Ordering::Relaxed);
        let cpu = Cpu::new(self.host.frames().mem().clone(), CpuMode::Native, (id + 1) as u16, self.config.maxphyaddr);
        Ok(Vcpu {
            kvm: self.clone(),
            arch: VcpuArch {
                id,
                cpu,
                shared,
                mmu: VcpuMmu::default(),
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
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
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
        for v in &vcpus {
            v.requests.fetch_or(req::TLB_FLUSH, Ordering::SeqCst);
        }
        // Every vCPU thread now either shows us IN_GUEST_MODE / READING_SHADOW_PAGE_TABLES,
        // or will see the request before its next access (the "IPI"). With no other vCPU
        // there is nobody to wait for: the caller sees its own request on its next entry.
        if vcpus.iter().any(|v| Some(v.id) != me) {
            crate::sync::barrier::heavy_barrier();
        }
        // kvm_make_all_cpus_request: only a vCPU other than the caller that is not outside
        // guest mode needs the IPI (KVM_REQ_TLB_FLUSH waits); remote_tlb_flush counts the
        // flushes that sent one.
        let mut kicked = false;
        for v in vcpus.iter().filter(|v| Some(v.id) != me) {
            kicked |= v.mode.load(Ordering::SeqCst) != mode::OUTSIDE_GUEST_MODE;
            v.wait_for_request(req::TLB_FLUSH, |m| matches!(m, mode::IN_GUEST_MODE | mode::READING_SHADOW_PAGE_TABLES));
        }
        if kicked {
            self.stats.remote_tlb_flush.add(1);
        }
    }

    /// Frees page-table frames unlinked earlier, after a remote flush. The caller holds
    /// `mmu_lock` for write, so no fault-path walker holds a pointer into them; the flush
    /// guarantees no vCPU is still walking them in hardware or in fast page fault.
    pub(crate) fn flush_and_free_deferred(&self, me: Option<u32>, need_flush: bool) {
        let pending = std::mem::take(&mut *self.mmu.deferred_free.lock());
        if need_flush || !pending.is_empty() {
            self.flush_remote_tlbs(me);
        }
        for p in pending {
            self.frames().free_4k(p);
        }
    }

    /// `kvm_mmu_zap_all_fast`: makes every root obsolete, has the vCPUs drop them and zaps
    /// their contents (memslot delete/move).
    pub fn kvm_mmu_zap_all_fast(&self) {
        let _f = self.tracer.func(crate::trace::HOST_CPU, "kvm_mmu_zap_all_fast");
        {
            let _w = self.mmu.mmu_lock.write();
            let gen = self.mmu.mmu_valid_gen.fetch_xor(1, Ordering::AcqRel) ^ 1;
            if self.tracer.events_on() {
                self.tracer.event(
                    crate::trace::HOST_CPU,
                    "kvm_mmu_zap_all_fast",
                    format_args!("kvm-mmu-valid-gen {} used_pages {:x}", gen, 0),
                );
            }
            tdp_mmu::kvm_tdp_mmu_invalidate_all_roots(self);
            // The shadow MMU: zap every page now; roots in use are freed when released.
            let mut s = self.mmu.shadow.lock();
            s.mmu_valid_gen ^= 1;
            let mut ctx =
                crate::mmu::shadow::Ctx { kvm: self, s: &mut s, slots: self.memslots(), vcpu: None, cpu: u32::MAX };
            ctx.zap_all();
            drop(s);
            self.make_all_cpus_request(req::MMU_FREE_OBSOLETE_ROOTS);
        }
        tdp_mmu::kvm_tdp_mmu_zap_invalidated_roots(self);
        let _w = self.mmu.mmu_lock.write();
        self.flush_and_free_deferred(None, true);
    }

    /// Write-protects every mapping of memslot `slot` (`kvm_mmu_slot_remove_write_access`,
    /// what enabling dirty logging does first): writes then take fast page faults.
    pub fn mmu_slot_remove_write_access(&self, slot: u32) -> Result<(), VmError> {
        let slots = self.memslots();
        let s = slots.by_id(slot).ok_or(VmError::Memslot(MemslotError::NoSuchSlot(slot)))?;
        let (start, end) = (s.base_gfn.raw(), s.end_gfn().raw());
        drop(slots);
        self.rearm_range(start, end, crate::dirty_log::Rearm::WriteProtect);
        // Unconditionally, as every caller of KVM's does: an SPTE already read-only
        // (access-tracked, not flushed by aging) may still be writable in a TLB.
        self.flush_remote_tlbs(None);
        Ok(())
    }

    /// KVM_SET_NR_MMU_PAGES: the limit on shadow pages (0 = the default, memslot pages / 50,
    /// at least 64); pages beyond it are recycled, oldest first (`kvm_mmu_change_mmu_pages`).
    pub fn set_nr_mmu_pages(&self, n: u64) {
        let _w = self.mmu.mmu_lock.write();
        let mut s = self.mmu.shadow.lock();
        s.n_requested_mmu_pages = n;
        let slots = self.memslots();
        s.update_n_max(&slots);
        let over = s.n_used_mmu_pages.saturating_sub(s.n_max_mmu_pages);
        if over > 0 {
            let mut ctx = crate::mmu::shadow::Ctx { kvm: self, s: &mut s, slots, vcpu: None, cpu: u32::MAX };
            ctx.zap_oldest_mmu_pages(over);
        }
    }

    /// (`n_used_mmu_pages`, `n_max_mmu_pages`) of the shadow MMU.
    pub fn mmu_pages(&self) -> (u64, u64) {
        let s = self.mmu.shadow.lock();
        (s.n_used_mmu_pages, s.n_max_mmu_pages)
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

/// A vCPU's MMU state (`vcpu->arch.mmu` and its memory caches).
#[derive(Default)]
pub struct VcpuMmu {
    /// The current root.
    pub root: Option<Arc<TdpRoot>>,
    /// `mmu_shadow_page_cache`: zeroed (non-present) table frames ready for the fault path.
    pub shadow_page_cache: Vec<Pfn>,
    /// Cached MMIO info (`vcpu->arch.mmio_gfn` and its generation).
    pub mmio_gfn: Option<(u64, u64)>,
}

/// KVM's per-vCPU cache capacity (`KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE`).
const MEMORY_CACHE_CAPACITY: usize = 40;
/// Minimum table frames before taking mmu_lock.
const SHADOW_PAGE_CACHE_MIN: usize = 5;
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
    /// `mmu_topup_memory_caches`.
    pub(crate) fn mmu_topup_memory_caches(&mut self, kvm: &Kvm) -> Result<(), HostError> {
        if self.mmu.shadow_page_cache.len() >= SHADOW_PAGE_CACHE_MIN {
            return Ok(());
        }
        while self.mmu.shadow_page_cache.len() < MEMORY_CACHE_CAPACITY {
            let p = kvm.frames().alloc_4k()?;
            tdp_mmu::init_table(kvm, p);
            self.mmu.shadow_page_cache.push(p);
        }
        Ok(())
    }

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

    /// `kvm_mmu_load`: allocates (or shares) the root and points the hardware at it.
    fn kvm_mmu_load(&mut self) -> Result<(), VmError> {
        let kvm = self.kvm.clone();
        if kvm.config.mmu == MmuKind::Shadow {
            crate::mmu::shadow::kvm_mmu_load(&kvm, &mut self.arch)?;
            return Ok(());
        }
        let cfg = &kvm.config;
        let (root_hpa, root_level) = if cfg.mmu == MmuKind::LegacyTdp {
            let r = crate::mmu::shadow::kvm_mmu_load_direct(&kvm, &mut self.arch)?;
            (r.hpa, cfg.tdp_level())
        } else {
            self.mmu_topup_memory_caches(&kvm)?;
            let role = crate::mmu::shadow::direct_root_role(cfg);
            let root = tdp_mmu::kvm_tdp_mmu_alloc_root(&kvm, role)?;
            let r = (root.hpa, root.level());
            self.mmu.root = Some(root);
            r
        };
        let tdp = match cfg.tdp {
            TdpKind::Ept => Tdp::Ept(EptConfig {
                root: root_hpa,
                levels: root_level,
                ad_enabled: cfg.eptad,
                execute_only: true,
                gbpages: true,
                maxphyaddr: 46,
            }),
            TdpKind::Npt => {
                Tdp::Npt(NptConfig { root: root_hpa, levels: root_level, nxe: true, gbpages: true, maxphyaddr: 46 })
            }
        };
        self.cpu.set_mode(CpuMode::Tdp(tdp));
        self.cpu.flush_tlb_current();
        Ok(())
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
        if r & req::TLB_FLUSH_GUEST != 0 {
            // kvm_vcpu_flush_tlb_guest: sync the roots (and drop previous roots with unsync
            // pages), then flush.
            let _f = self.kvm.tracer.func(self.arch.id, "kvm_vcpu_flush_tlb_guest");
            crate::mmu::shadow::kvm_mmu_sync_roots(&self.kvm, &mut self.arch);
            crate::mmu::shadow::kvm_mmu_sync_prev_roots(&self.kvm, &mut self.arch);
            self.arch.stat.tlb_flush += 1;
            self.arch.cpu.flush_tlb_all();
        }
        if r & req::TLB_FLUSH != 0 {
            let _f = self.kvm.tracer.func(self.arch.id, "kvm_vcpu_flush_tlb_all");
            self.arch.stat.tlb_flush += 1;
            self.arch.cpu.flush_tlb_all();
        }
        if r & req::TLB_FLUSH_CURRENT != 0 {
            let _f = self.kvm.tracer.func(self.arch.id, "kvm_vcpu_flush_tlb_current");
            self.arch.stat.tlb_flush += 1;
            self.arch.cpu.flush_tlb_current();
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
        self.shared.mode.store(mode::IN_GUEST_MODE, Ordering::Relaxed);
        crate::sync::barrier::light_barrier();
        if self.shared.requests.load(Ordering::Relaxed) != 0 || (self.mmu.root.is_none() && self.shadow.root.is_none())
        {
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
                self.kvm_mmu_load()?;
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
            h.record(t0.elapsed().as_nanos() as u64);
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
                        std::thread::yield_now();
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
        self.kvm.config.mmu == MmuKind::Shadow
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
        let mut mem = crate::emulate::KvmGuestMem::new(&self.kvm, &slots, &bus);
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
            crate::mmu::shadow::kvm_mmu_invlpg(kvm, arch, gva.raw());
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
                crate::mmu::shadow::kvm_mmu_invlpg(kvm, arch, gva.raw());
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
    fn vm_is_shared_and_vcpus_move_between_threads() {
        fn shared<T: Send + Sync>() {}
        fn movable<T: Send>() {}
        shared::<Kvm>();
        shared::<Arc<Kvm>>();
        movable::<Vcpu>();
    }

    #[test]
    fn tdp_level_rule() {
        let c = |max_tdp_level, maxphyaddr| VmConfig { max_tdp_level, maxphyaddr, ..Default::default() }.tdp_level();
        assert_eq!(c(4, 46), 4);
        assert_eq!(c(5, 46), 4, "5-level supported but not needed");
        assert_eq!(c(5, 48), 4);
        assert_eq!(c(5, 52), 5);
    }

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
