//! The machine a scenario runs on: builds the host, the VM, its memslots and vCPUs from a
//! scenario and boots the guest (the guest kernel, or the identity layout's page tables);
//! runs a workload on the guest; and reads the VM's statistics. The bottom layer of a run:
//! the ops ([`crate::ops`], [`crate::migrate`], [`crate::idle`], [`crate::replay`]) act on
//! a [`Machine`], and the runner ([`crate::runner`]) drives them through the phases.

use crate::error::{ConfigError, Failure, RunError};
use crate::scenario::{page_shift, Scenario};
use std::collections::BTreeMap;
use std::sync::Arc;
use vmmu::host::{Backing, FrameAllocator, HostMm, Hva};
use vmmu::hw::cpu::Exception;
use vmmu::memslot::{MemslotFlags, UserspaceMemoryRegion};
use vmmu::mmio_bus::LatchDevice;
use vmmu::x86_paging::addr::Gpa;
use vmmu::x86_paging::regs::{Cr0, Cr4, Efer};
use vmmu::{Kvm, ManualDirtyLog, MmuKind, TdpKind, Vcpu, VmConfig};
use vmmu_guest::kernel::{KernelConfig, KernelError};
use vmmu_guest::pagetable::{FrameBump, PageTableBuilder, PteFlags};
use vmmu_guest::workload::{self, FlatSpace, KernelSpace, Workload};
use vmmu_guest::GuestKernel;

/// Hardware counters of a phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct HwSummary {
    /// TLB hits.
    pub tlb_hits: u64,
    /// TLB misses.
    pub tlb_misses: u64,
    /// Page walks.
    pub walks: u64,
    /// Memory references made by page walks.
    pub walk_mem_refs: u64,
}

/// Statistics that are values (gauges), not counters: reported at a phase's end, not as
/// deltas.
pub const GAUGES: &[&str] = &[
    "pages_4k",
    "pages_2m",
    "pages_1g",
    "tdp_mmu_pages",
    "mmu_unsync",
    "nx_lpage_splits",
    "max_mmu_rmap_size",
    "max_mmu_page_hash_collisions",
];

/// The guest as set up for the run.
pub(crate) enum Guest {
    Kernel(Box<GuestKernel>),
    /// Identity layout, with the top-level tables the guest can switch among (boot first).
    Identity {
        roots: Vec<u64>,
        levels: u8,
    },
}

/// A built VM with its vCPUs and booted guest.
pub struct Machine {
    /// The VM.
    pub kvm: Arc<Kvm>,
    /// Its vCPUs.
    pub vcpus: Vec<Vcpu>,
    /// Memslots: (gpa, size, hva).
    pub slots: Vec<(u64, u64, Hva)>,
    pub(crate) guest: Guest,
    /// Where workload data starts (identity: after the page tables; kernel: USER_BASE).
    pub data_start: u64,
    /// Whether KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is enabled (`vm.manual_dirty_log_protect`):
    /// a dirty-log harvest then clears what it read with KVM_CLEAR_DIRTY_LOG.
    pub manual_dirty_log_protect: bool,
}

/// The page-table level whose leaf maps a page of `size`: "4k" 1, "2m" 2, "1g" 3 (also for a
/// name that is none of them, which validation refuses before a run).
fn leaf_level(size: &str) -> u8 {
    match page_shift(size) {
        Some(12) => 1,
        Some(21) => 2,
        _ => 3,
    }
}

fn vm_config(s: &Scenario, variant: &str) -> Result<VmConfig, ConfigError> {
    let (mmu, v) = s.vm.variant(variant).map_err(ConfigError::Mmu)?;
    Ok(VmConfig {
        mmu: match mmu.as_str() {
            "tdp" => MmuKind::Tdp,
            "shadow" => MmuKind::Shadow,
            _ => MmuKind::LegacyTdp,
        },
        tdp: if v.tdp == "npt" { TdpKind::Npt } else { TdpKind::Ept },
        eptad: v.eptad,
        max_tdp_level: v.max_tdp_level,
        maxphyaddr: v.maxphyaddr,
        nx_huge_pages: v.nx_huge_pages,
        nx_huge_pages_recovery_ratio: v.nx_huge_pages_recovery_ratio,
        nx_huge_pages_recovery_period_ms: v.nx_huge_pages_recovery_period_ms,
        mmio_caching: v.mmio_caching,
        tdp_huge_page_level: leaf_level(&v.tdp_huge_page),
        eager_page_split: v.eager_page_split,
        pml: v.pml,
    })
}

/// The most page-table memory the identity layout builds before the run: enough for 32 GiB
/// of 4 KiB pages, 16 TiB of 2 MiB pages or the whole guest-physical space in 1 GiB pages.
pub const IDENTITY_TABLES_LIMIT: u64 = 64 << 20;

/// Refuses an identity layout whose page tables, all built before the first phase, would
/// take more than [`IDENTITY_TABLES_LIMIT`] (a 1 TiB slot of 4 KiB pages: 2 GiB and most
/// of a minute).
fn check_identity_tables(s: &Scenario, levels: u8) -> Result<(), ConfigError> {
    use vmmu_guest::pagetable::tables_needed;
    let mut ranges = Vec::new();
    for ms in &s.memslots {
        let shift = page_shift(ms.guest_page_size.as_deref().unwrap_or(&s.guest.page_size)).unwrap_or(12);
        ranges.push((ms.gpa.0, ms.size.0, shift));
    }
    for mm in &s.mmio {
        ranges.push((mm.gpa.0 & !4095, mm.size.0.next_multiple_of(4096), 12));
    }
    let bytes = (1 + tables_needed(&ranges, levels)) * 4096; // with the root
    if bytes > IDENTITY_TABLES_LIMIT {
        // Name the slot that needs the most.
        let (i, (_, size, shift)) = ranges[..s.memslots.len()]
            .iter()
            .enumerate()
            .max_by_key(|(_, r)| tables_needed(&[**r], levels))
            .map(|(i, r)| (i, *r))
            .unwrap_or((0, (0, 0, 12)));
        return Err(ConfigError::IdentityTooBig {
            slot: i,
            size,
            page_kib: (1u64 << shift) >> 10,
            bytes,
            limit: IDENTITY_TABLES_LIMIT,
        });
    }
    Ok(())
}

fn boot_identity(m: &mut Machine, s: &Scenario) -> Result<(), RunError> {
    let (base, size, _) = m.slots[0];
    let total_pages: u64 = s.memslots.iter().map(|x| x.size.0 / 4096).sum();
    let table_bytes = (total_pages / 512 + total_pages / (512 * 512) + 64) * 4096;
    let start = base + (1 << 20);
    let end = start + table_bytes;
    if end > base + size {
        return Err(ConfigError::IdentityNoRoom { table_bytes }.into());
    }
    let levels = if s.guest.paging == "5-level" { 5 } else { 4 };
    check_identity_tables(s, levels)?;
    let mut alloc = FrameBump::new(start, end);
    let mut b = PageTableBuilder::new(&*m.kvm, &mut alloc, levels).map_err(ConfigError::PageTables)?;
    let preset = s.guest.accessed_dirty == "preset";
    b.accessed = preset;
    let flags =
        PteFlags { writable: true, user: s.guest.user, nx: false, global: false, accessed: preset, dirty: preset };
    for (i, ms) in s.memslots.iter().enumerate() {
        let shift = page_shift(ms.guest_page_size.as_deref().unwrap_or(&s.guest.page_size)).unwrap_or(12);
        let step = 1u64 << shift;
        if ms.gpa.0 % step != 0 || ms.size.0 % step != 0 {
            return Err(ConfigError::IdentityAlignment { slot: i }.into());
        }
        b.map_range(&mut alloc, ms.gpa.0, ms.gpa.0, ms.size.0, shift, flags).map_err(ConfigError::PageTables)?;
    }
    for mm in &s.mmio {
        b.map_range(&mut alloc, mm.gpa.0 & !4095, mm.gpa.0 & !4095, mm.size.0.next_multiple_of(4096), 12, flags)
            .map_err(ConfigError::PageTables)?;
    }
    let root = b.root.raw();
    m.guest = Guest::Identity { roots: vec![root], levels };
    for v in m.vcpus.iter_mut() {
        let mut cr4 = Cr4::PAE | Cr4::PGE;
        if levels == 5 {
            cr4 |= Cr4::LA57;
        }
        v.write_cr4(cr4).map_err(Failure::from)?;
        v.write_efer(Efer::LME | Efer::NXE).map_err(Failure::from)?;
        v.write_cr3(root).map_err(Failure::from)?;
        v.write_cr0(Cr0::PE | Cr0::WP | Cr0::PG).map_err(Failure::from)?;
        v.set_cpl(if s.guest.user { 3 } else { 0 });
    }
    // At least 1 MiB of free pages between the tables and the data (for new-root).
    m.data_start = (end + (1 << 20) + (16 << 20) - 1) & !((16 << 20) - 1);
    Ok(())
}

/// Builds the host, the VM, memslots and vCPUs, and boots the guest, with the MMU `mmu`
/// (`--mmu`; the scenario's `vm.mmu` when `None`).
pub fn build(s: &Scenario, mmu: Option<&str>) -> Result<Machine, RunError> {
    let cfg = vm_config(s, mmu.unwrap_or(&s.vm.mmu))?;
    let frames = Arc::new(FrameAllocator::new(s.vm.host_memory.0).map_err(ConfigError::Host)?);
    let host = Arc::new(HostMm::new(frames).map_err(ConfigError::Host)?);
    let kvm = Kvm::new(cfg, host.clone()).map_err(ConfigError::Vm)?;
    if s.vm.manual_dirty_log_protect {
        let mut flags = ManualDirtyLog::MANUAL_PROTECT_ENABLE;
        if s.vm.dirty_log_initially_set {
            flags |= ManualDirtyLog::INITIALLY_SET;
        }
        kvm.enable_manual_dirty_log_protect(flags.bits()).map_err(ConfigError::ManualDirtyLog)?;
    }
    let mut slots = Vec::new();
    for (i, ms) in s.memslots.iter().enumerate() {
        let backing = if ms.backing == "thp" { Backing::Thp } else { Backing::Anon4k };
        let hva = host
            .mmap(ms.size.0, backing, true, ms.prefault)
            .map_err(|source| ConfigError::MemslotMap { index: i, source })?;
        let flags = if ms.readonly { MemslotFlags::READONLY } else { MemslotFlags::empty() };
        kvm.set_user_memory_region(UserspaceMemoryRegion {
            // An index past u32 (never: a scenario file is at most 16 MiB) saturates to an id
            // the VM refuses, as it does every id from KVM_USER_MEM_SLOTS on: memslot[i]'s error.
            slot: u32::try_from(i).unwrap_or(u32::MAX),
            flags,
            guest_phys_addr: ms.gpa.0,
            memory_size: ms.size.0,
            userspace_addr: hva,
        })
        .map_err(|source| ConfigError::Memslot { index: i, source })?;
        slots.push((ms.gpa.0, ms.size.0, hva));
    }
    if let Some(n) = s.vm.nr_mmu_pages {
        // Scenario::validate refuses values KVM would (below KVM_MIN_ALLOC_MMU_PAGES).
        kvm.set_nr_mmu_pages(n);
    }
    for mm in &s.mmio {
        kvm.register_mmio(Gpa::new(mm.gpa.0), mm.size.0, Arc::new(LatchDevice::default()));
    }
    let mut vcpus = Vec::new();
    for _ in 0..s.guest.vcpus {
        vcpus.push(kvm.create_vcpu().map_err(ConfigError::Vm)?);
    }
    let mut m = Machine {
        kvm: kvm.clone(),
        vcpus,
        slots,
        guest: Guest::Identity { roots: Vec::new(), levels: 4 },
        data_start: 16 << 20,
        manual_dirty_log_protect: s.vm.manual_dirty_log_protect,
    };
    if s.guest.layout == "kernel" {
        let mem_size = s.memslots.iter().map(|x| x.gpa.0 + x.size.0).max().unwrap_or(0);
        let kc = KernelConfig {
            mem_size,
            nodes: s.memslots.iter().filter(|x| !x.readonly).map(|x| (x.gpa.0, x.gpa.0 + x.size.0)).collect(),
            direct_map_shift: page_shift(&s.guest.page_size).unwrap_or(21),
            levels: if s.guest.paging == "5-level" { 5 } else { 4 },
            pcid: s.guest.pcid,
        };
        let mut k = GuestKernel::boot(&*kvm, &mut m.vcpus[0], kc).map_err(Failure::from)?;
        for _ in 0..s.guest.processes {
            k.create_process(&mut m.vcpus[0]).map_err(Failure::from)?;
        }
        k.switch_to(&mut m.vcpus[0], 1).map_err(Failure::from)?;
        m.guest = Guest::Kernel(Box::new(k));
        m.data_start = vmmu_guest::kernel::USER_BASE;
    } else {
        boot_identity(&mut m, s)?;
    }
    Ok(m)
}

/// The VM's statistics now (KVM's VM and vCPU statistics, with the host's frames and KSM
/// counters), and the hardware model's counters summed over the vCPUs.
pub fn stats_now(m: &Machine) -> (BTreeMap<String, i64>, HwSummary) {
    let mut st: BTreeMap<String, i64> = m.kvm.vm_stats().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    // The host side, as deltas per phase: frames allocated (negative: freed) and KSM's
    // counters (/sys/kernel/mm/ksm).
    let host = m.kvm.host();
    let (counts, ksm) = (host.frames().counts(), host.ksm_stats());
    st.insert("host_frames_4k".into(), counts.frames_4k as i64);
    st.insert("host_frames_2m".into(), counts.frames_2m as i64);
    st.insert("host_ksm_pages_shared".into(), ksm.pages_shared as i64);
    st.insert("host_ksm_pages_sharing".into(), ksm.pages_sharing as i64);
    let mut hw = HwSummary::default();
    for v in &m.vcpus {
        for (k, x) in v.stats() {
            *st.entry(k.to_string()).or_insert(0) += x;
        }
        let c = v.cpu();
        hw.tlb_hits += c.tlb().counters.hits;
        hw.tlb_misses += c.tlb().counters.misses;
        hw.walks += c.counters.walks;
        hw.walk_mem_refs += c.counters.walk_mem_refs;
    }
    (st, hw)
}

/// Runs one workload over [start, start+pages) on the guest.
pub fn run_workload(m: &mut Machine, w: Workload, start: u64, pages: u64) -> Result<u64, RunError> {
    match &mut m.guest {
        Guest::Kernel(k) => {
            let pid = current_pid(k);
            ensure_mapped(k, pid, start, pages)?;
            let st = workload::run(w, &mut KernelSpace { kernel: k, cpu: &mut m.vcpus[0] }, start, pages)
                .map_err(Failure::from)?;
            Ok(st.accesses)
        }
        Guest::Identity { .. } => {
            let n = m.vcpus.len() as u64;
            if n == 1 {
                let st =
                    workload::run(w, &mut FlatSpace { cpu: &mut m.vcpus[0] }, start, pages).map_err(identity_err)?;
                return Ok(st.accesses);
            }
            let per = pages.div_ceil(n);
            let results: Vec<Result<u64, KernelError>> = std::thread::scope(|sc| {
                let hs: Vec<_> = m
                    .vcpus
                    .iter_mut()
                    .enumerate()
                    .map(|(i, v)| {
                        sc.spawn(move || {
                            let s0 = i as u64 * per;
                            let cnt = per.min(pages.saturating_sub(s0));
                            let r = if cnt == 0 {
                                Ok(0)
                            } else {
                                workload::run(w, &mut FlatSpace { cpu: &mut *v }, start + s0 * 4096, cnt)
                                    .map(|s| s.accesses)
                            };
                            v.exit_guest();
                            r
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(KernelError::Invalid("vCPU thread panicked".into()))))
                    .collect()
            });
            let mut total = 0;
            for r in results {
                total += r.map_err(identity_err)?;
            }
            Ok(total)
        }
    }
}

/// A workload's failure under the identity layout, in its terms: there is no guest kernel to
/// handle a #PF, so a not-present one means the op touched an address the layout does not map.
fn identity_err(e: KernelError) -> Failure {
    match e {
        KernelError::Guest(vmmu::GuestError::Exception(x @ Exception::PageFault { error_code, .. }))
            if !error_code.is_present() =>
        {
            Failure::IdentityUnmapped { exception: x }
        }
        KernelError::Guest(vmmu::GuestError::Exception(x)) => Failure::IdentityException { exception: x },
        e => Failure::Kernel(e),
    }
}

/// The guest kernel's current process (pid 1 if none).
pub(crate) fn current_pid(k: &GuestKernel) -> u32 {
    k.current_pid().unwrap_or(1)
}

/// Maps [start, start+pages) in process `pid` unless one of its VMAs covers it already.
pub(crate) fn ensure_mapped(k: &mut GuestKernel, pid: u32, start: u64, pages: u64) -> Result<(), Failure> {
    let end = start + pages * 4096;
    let covered = k
        .processes()
        .iter()
        .find(|p| p.pid == pid)
        .is_some_and(|p| p.vmas.iter().any(|v| v.start <= start && v.end >= end));
    if !covered {
        k.mmap(pid, start & !4095, end - (start & !4095), true)?;
    }
    Ok(())
}
