//! Dirty completeness under everything else the MMU does (DESIGN §3, "nothing lost"): a
//! random mix of guest accesses and every operation that changes SPTEs or TLBs — aging and
//! idle tracking (with and without A/D bits), NX huge page recovery, host events (NUMA
//! migration, swap, KSM, THP split and collapse, MADV_DONTNEED), write protection, zapping
//! all roots, CR3 switches and reloads, INVLPG — with dirty logging turned on and off at
//! random times, under the three MMUs, EPT and NPT, A/D bits on and off, PML on and off, with
//! the bitmap (KVM_GET_DIRTY_LOG, or KVM_CLEAR_DIRTY_LOG with manual protection) or the dirty
//! ring.
//!
//! Two oracles, both from the guest's side:
//! - every page the guest wrote while logging was on is in the next harvest (the test is
//!   sequential, so "next" is exact);
//! - every read returns the last value the guest wrote there (0 after MADV_DONTNEED), so no
//!   host event loses guest data.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proptest::prelude::*;
use vmmu::host::{Backing, FrameAllocator, HostMm, Hva};
use vmmu::memslot::{MemslotFlags, UserspaceMemoryRegion};
use vmmu::x86_paging::access::AccessKind;
use vmmu::x86_paging::addr::Gva;
use vmmu::{GuestError, Kvm, MmuKind, TdpKind, Vcpu, VmConfig, VmError};
use vmmu_guest::kernel::{KernelConfig, KernelError, USER_BASE};
use vmmu_guest::GuestKernel;

/// Guest RAM (one memslot at gpa 0).
const MEM: u64 = 64 << 20;
/// User pages of the process the mix runs in.
const PAGES: u64 = 96;
/// A second process, for CR3 switches.
const OTHER_PAGES: u64 = 4;

/// How userspace reads the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Harvest {
    /// KVM_GET_DIRTY_LOG (get and re-arm).
    Get,
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: KVM_GET_DIRTY_LOG reads, KVM_CLEAR_DIRTY_LOG
    /// clears and re-arms.
    ManualClear,
    /// KVM_CAP_DIRTY_LOG_RING: collect vCPU 0's ring, KVM_RESET_DIRTY_RINGS.
    Ring,
}

/// A VM configuration for one case.
#[derive(Debug, Clone)]
struct Setup {
    mmu: MmuKind,
    tdp: TdpKind,
    eptad: bool,
    pml: bool,
    nx_huge_pages: bool,
    eager_page_split: bool,
    thp: bool,
    harvest: Harvest,
}

/// Host-side events on a range of the guest's data pages.
#[derive(Debug, Clone, Copy)]
enum HostEvent {
    Migrate,
    Swap,
    Ksm,
    SplitThp,
    CollapseThp,
    DontNeed,
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64),
    Read(u64),
    Fetch(u64),
    /// Turn KVM_MEM_LOG_DIRTY_PAGES on or off.
    Logging(bool),
    Harvest,
    /// mmu_notifier clear_young: idle page tracking's marking, no TLB flush.
    ClearYoung(u64, u64),
    /// mmu_notifier clear_flush_young: reclaim's aging.
    ClearFlushYoung(u64, u64),
    TestYoung(u64, u64),
    /// /sys/kernel/mm/page_idle: mark the whole slot idle.
    IdleMark,
    NxRecovery,
    Host(HostEvent, u64, u64),
    /// kvm_mmu_slot_remove_write_access on the slot.
    WriteProtect,
    ZapAllFast,
    /// MOV CR3 with the same value (a full non-global flush; shadow paging syncs).
    Cr3Reload,
    /// Run the other process for a moment, then come back.
    SwitchProcess,
    Invlpg(u64),
}

fn page() -> impl Strategy<Value = u64> {
    0..PAGES
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..PAGES, 1..16u64)
}

fn op() -> impl Strategy<Value = Op> {
    let host = prop_oneof![
        Just(HostEvent::Migrate),
        Just(HostEvent::Swap),
        Just(HostEvent::Ksm),
        Just(HostEvent::SplitThp),
        Just(HostEvent::CollapseThp),
        Just(HostEvent::DontNeed),
    ];
    prop_oneof![
        12 => page().prop_map(Op::Write),
        4 => page().prop_map(Op::Read),
        2 => page().prop_map(Op::Fetch),
        3 => any::<bool>().prop_map(Op::Logging),
        5 => Just(Op::Harvest),
        4 => range().prop_map(|(a, n)| Op::ClearYoung(a, n)),
        2 => range().prop_map(|(a, n)| Op::ClearFlushYoung(a, n)),
        1 => range().prop_map(|(a, n)| Op::TestYoung(a, n)),
        3 => Just(Op::IdleMark),
        1 => Just(Op::NxRecovery),
        3 => (host, range()).prop_map(|(h, (a, n))| Op::Host(h, a, n)),
        1 => Just(Op::WriteProtect),
        1 => Just(Op::ZapAllFast),
        2 => Just(Op::Cr3Reload),
        1 => Just(Op::SwitchProcess),
        2 => page().prop_map(Op::Invlpg),
    ]
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        prop_oneof![Just(MmuKind::Tdp), Just(MmuKind::LegacyTdp), Just(MmuKind::Shadow)],
        prop_oneof![3 => Just(TdpKind::Ept), 1 => Just(TdpKind::Npt)],
        any::<[bool; 5]>(),
        prop_oneof![Just(Harvest::Get), Just(Harvest::ManualClear), Just(Harvest::Ring)],
    )
        .prop_map(|(mmu, tdp, [eptad, pml, nx_huge_pages, eager_page_split, thp], harvest)| Setup {
            mmu,
            tdp,
            eptad,
            pml,
            nx_huge_pages,
            eager_page_split,
            thp,
            harvest,
        })
}

/// The guest and what the oracles know.
struct Mix {
    setup: Setup,
    kvm: Arc<Kvm>,
    host: Arc<HostMm>,
    hva: Hva,
    cpu: Vcpu,
    k: GuestKernel,
    pid: u32,
    other: u32,
    /// The gfn behind each user page (the guest never remaps them).
    gfn: Vec<u64>,
    /// The last value written at offset 0 of each user page.
    value: Vec<u64>,
    next_value: u64,
    logging: bool,
    /// Pages written since the last harvest, with logging on: the next harvest must hold them.
    pending: BTreeMap<u64, usize>,
    /// The op number, for messages.
    step: usize,
}

/// `v` as an index (page numbers here are far below `usize::MAX`).
fn ix(v: u64) -> usize {
    usize::try_from(v).expect("index fits usize")
}

fn region(hva: Hva, logging: bool) -> UserspaceMemoryRegion {
    let flags = if logging { MemslotFlags::LOG_DIRTY_PAGES } else { MemslotFlags::empty() };
    UserspaceMemoryRegion { slot: 0, flags, guest_phys_addr: 0, memory_size: MEM, userspace_addr: hva }
}

fn is_ring_full(e: &KernelError) -> bool {
    matches!(e, KernelError::Guest(GuestError::Vm(VmError::DirtyRingFull { .. })))
}

impl Mix {
    fn new(setup: Setup) -> Mix {
        let cfg = VmConfig {
            mmu: setup.mmu,
            tdp: setup.tdp,
            eptad: setup.eptad,
            pml: setup.pml,
            nx_huge_pages: setup.nx_huge_pages,
            eager_page_split: setup.eager_page_split,
            ..Default::default()
        };
        let frames = Arc::new(FrameAllocator::new(1 << 30).unwrap());
        let host = Arc::new(HostMm::new(frames).unwrap());
        let kvm = Kvm::new(cfg, host.clone()).unwrap();
        match setup.harvest {
            Harvest::Ring => kvm.enable_dirty_ring(1 << 16).unwrap(),
            Harvest::ManualClear => kvm.enable_manual_dirty_log_protect(1).unwrap(),
            Harvest::Get => {}
        }
        let backing = if setup.thp { Backing::Thp } else { Backing::Anon4k };
        let hva = host.mmap(MEM, backing, true, false).unwrap();
        kvm.set_user_memory_region(region(hva, false)).unwrap();
        let mut cpu = kvm.create_vcpu().unwrap();
        let mut k = GuestKernel::boot(&*kvm, &mut cpu, KernelConfig { mem_size: MEM, ..Default::default() }).unwrap();
        let other = k.create_process(&mut cpu).unwrap();
        k.mmap_prot(other, USER_BASE, OTHER_PAGES * 4096, true, false).unwrap();
        let pid = k.create_process(&mut cpu).unwrap();
        // Executable, so fetches run (and, with the NX mitigation, split huge pages).
        k.mmap_prot(pid, USER_BASE, PAGES * 4096, true, true).unwrap();
        k.switch_to(&mut cpu, other).unwrap();
        for i in 0..OTHER_PAGES {
            k.access(&mut cpu, USER_BASE + i * 4096, AccessKind::Write, 8, i).unwrap();
        }
        k.switch_to(&mut cpu, pid).unwrap();
        let mut value = Vec::new();
        for i in 0..PAGES {
            k.access(&mut cpu, USER_BASE + i * 4096, AccessKind::Write, 8, i + 1).unwrap();
            value.push(i + 1);
        }
        let gfn = (0..PAGES)
            .map(|i| {
                let pte = k.user_pte(&mut cpu, pid, USER_BASE + i * 4096).unwrap().unwrap();
                (pte & 0x000f_ffff_ffff_f000) >> 12
            })
            .collect();
        Mix {
            setup,
            kvm,
            host,
            hva,
            cpu,
            k,
            pid,
            other,
            gfn,
            value,
            next_value: PAGES + 1,
            logging: false,
            pending: BTreeMap::new(),
            step: 0,
        }
    }

    fn va(p: u64) -> u64 {
        USER_BASE + p * 4096
    }

    /// The host address of user page `p`'s frame.
    fn page_hva(&self, p: u64) -> Hva {
        Hva(self.hva.raw() + self.gfn[ix(p)] * 4096)
    }

    /// One guest access, harvesting when the vCPU stops on a full dirty ring.
    fn access(&mut self, p: u64, kind: AccessKind, val: u64) -> u64 {
        loop {
            let size = if kind == AccessKind::Fetch { 1 } else { 8 };
            match self.k.access(&mut self.cpu, Self::va(p), kind, size, val) {
                Ok(v) => return v,
                Err(e) if is_ring_full(&e) => self.harvest(),
                Err(e) => panic!("{:?} step {}: {kind:?} of page {p}: {e}", self.setup, self.step),
            }
        }
    }

    /// The gfns userspace reads from the log now (and re-arms).
    fn read_log(&mut self) -> BTreeSet<u64> {
        match self.setup.harvest {
            Harvest::Get => bits(&self.kvm.get_dirty_log(0).unwrap()),
            Harvest::ManualClear => {
                let bm = self.kvm.get_dirty_log(0).unwrap();
                self.kvm.clear_dirty_log(0, 0, MEM / 4096, &bm).unwrap();
                bits(&bm)
            }
            Harvest::Ring => {
                let ring = self.kvm.dirty_ring(self.cpu.id()).unwrap();
                let mut got = BTreeSet::new();
                ring.collect(|g| {
                    got.insert(g.offset);
                });
                self.kvm.reset_dirty_rings();
                got
            }
        }
    }

    /// A harvest, checked: every page written since the last one is there.
    fn harvest(&mut self) {
        if !self.logging {
            return;
        }
        let got = self.read_log();
        let missing: Vec<String> = self
            .pending
            .iter()
            .filter(|(g, _)| !got.contains(g))
            .map(|(g, at)| format!("gfn {g:#x} (written at step {at})"))
            .collect();
        assert!(
            missing.is_empty(),
            "{:?}: the harvest at step {} lost writes: {}",
            self.setup,
            self.step,
            missing.join(", ")
        );
        self.pending.clear();
    }

    fn set_logging(&mut self, on: bool) {
        if on == self.logging {
            return;
        }
        self.kvm.set_user_memory_region(region(self.hva, on)).unwrap();
        self.logging = on;
        // Turning logging off drops the log; turning it on starts from an empty one.
        self.pending.clear();
        if on && self.setup.harvest == Harvest::Ring {
            // Entries from an earlier logging period are not part of this one.
            self.read_log();
        }
    }

    fn host_event(&mut self, h: HostEvent, first: u64, n: u64) {
        let pages: Vec<u64> = (first..(first + n).min(PAGES)).collect();
        for &p in &pages {
            let at = self.page_hva(p);
            // THP operations work on whole 2 MiB regions.
            let huge = Hva(at.raw() & !((2 << 20) - 1));
            match h {
                HostEvent::Migrate => drop(self.host.migrate_pages(at, 4096).unwrap()),
                HostEvent::Swap => drop(self.host.swap_out(at, 4096).unwrap()),
                HostEvent::Ksm => drop(self.host.ksm_merge(at, 4096).unwrap()),
                HostEvent::SplitThp => drop(self.host.split_huge_pages(huge, 2 << 20).unwrap()),
                HostEvent::CollapseThp => drop(self.host.collapse_huge_pages(huge, 2 << 20).unwrap()),
                HostEvent::DontNeed => {
                    self.host.madvise_dontneed(at, 4096).unwrap();
                    self.value[ix(p)] = 0;
                }
            }
        }
    }

    fn run(&mut self, op: &Op) {
        match *op {
            Op::Write(p) => {
                let v = self.next_value;
                self.next_value += 1;
                self.access(p, AccessKind::Write, v);
                self.value[ix(p)] = v;
                if self.logging {
                    self.pending.entry(self.gfn[ix(p)]).or_insert(self.step);
                }
            }
            Op::Read(p) => {
                let got = self.access(p, AccessKind::Read, 0);
                assert_eq!(got, self.value[ix(p)], "{:?} step {}: page {p} lost data", self.setup, self.step);
            }
            Op::Fetch(p) => {
                self.access(p, AccessKind::Fetch, 0);
            }
            Op::Logging(on) => self.set_logging(on),
            Op::Harvest => self.harvest(),
            Op::ClearYoung(a, n) => {
                for p in a..(a + n).min(PAGES) {
                    self.host.clear_young(self.page_hva(p), 4096);
                }
            }
            Op::ClearFlushYoung(a, n) => {
                for p in a..(a + n).min(PAGES) {
                    self.host.clear_flush_young(self.page_hva(p), 4096);
                }
            }
            Op::TestYoung(a, n) => {
                for p in a..(a + n).min(PAGES) {
                    self.host.test_young(self.page_hva(p), 4096);
                }
            }
            Op::IdleMark => self.host.page_idle_mark(self.hva, MEM),
            Op::NxRecovery => drop(self.kvm.nx_huge_page_recovery()),
            Op::Host(h, a, n) => self.host_event(h, a, n),
            Op::WriteProtect => self.kvm.mmu_slot_remove_write_access(0).unwrap(),
            Op::ZapAllFast => self.kvm.kvm_mmu_zap_all_fast(),
            Op::Cr3Reload => {
                let cr3 = self.cpu.cpu().paging().cr3;
                self.cpu.write_cr3(cr3).unwrap();
            }
            Op::SwitchProcess => {
                self.k.switch_to(&mut self.cpu, self.other).unwrap();
                loop {
                    match self.k.access(&mut self.cpu, USER_BASE, AccessKind::Read, 8, 0) {
                        Ok(_) => break,
                        Err(e) if is_ring_full(&e) => self.harvest(),
                        Err(e) => panic!("{:?} step {}: the other process: {e}", self.setup, self.step),
                    }
                }
                self.k.switch_to(&mut self.cpu, self.pid).unwrap();
            }
            Op::Invlpg(p) => self.cpu.invlpg(Gva::new(Self::va(p))),
        }
    }
}

fn bits(bm: &[u64]) -> BTreeSet<u64> {
    bm.iter()
        .enumerate()
        .flat_map(|(w, &b)| (0..64).filter(move |i| b & (1 << i) != 0).map(move |i| w as u64 * 64 + i))
        .collect()
}

fn run_mix(setup: Setup, ops: &[Op]) {
    let mut m = Mix::new(setup);
    for (i, op) in ops.iter().enumerate() {
        m.step = i;
        m.run(op);
    }
    m.step = ops.len();
    m.harvest();
    // Every page still holds what the guest last wrote.
    for p in 0..PAGES {
        m.run(&Op::Read(p));
    }
    m.kvm.audit().unwrap_or_else(|e| panic!("{:?}: audit: {e}", m.setup));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn dirty_completeness_under_every_spte_and_tlb_operation(
        setup in setup(),
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        run_mix(setup, &ops);
    }
}

/// The issue 9 reproducer: with EPT A/D bits off, idle tracking makes every SPTE of the slot
/// access-tracked without flushing, so enabling dirty logging finds nothing writable to
/// protect — and must still flush, or the vCPU keeps writing through its TLB unlogged.
#[test]
fn enabling_logging_after_idle_tracking_logs_every_write() {
    for mmu in [MmuKind::Tdp, MmuKind::LegacyTdp, MmuKind::Shadow] {
        let mut ops = vec![Op::IdleMark, Op::Logging(true)];
        ops.extend((0..PAGES).map(Op::Write));
        ops.push(Op::Harvest);
        run_mix(fixed(mmu, Harvest::Get), &ops);
    }
}

/// The same for a harvest: a page logged, then aged (access-tracked, not flushed), is
/// reported; re-arming finds its SPTE already read-only, and the harvest must flush anyway.
#[test]
fn harvesting_an_aged_page_logs_its_next_write() {
    for mmu in [MmuKind::Tdp, MmuKind::LegacyTdp, MmuKind::Shadow] {
        for harvest in [Harvest::Get, Harvest::ManualClear, Harvest::Ring] {
            let ops = [Op::Logging(true), Op::Write(3), Op::ClearYoung(3, 1), Op::Harvest, Op::Write(3), Op::Harvest];
            run_mix(fixed(mmu, harvest), &ops);
        }
    }
}

/// Shadow paging: a CR3 reload makes the next entry sync the unsync guest page tables; when
/// logging was turned on in between, a sync that makes an SPTE writable logs the page in
/// the slot's new dirty bitmap, not in the one the vCPU saw last.
#[test]
fn sync_after_logging_is_enabled_logs_in_the_current_slot() {
    for harvest in [Harvest::Get, Harvest::Ring] {
        run_mix(fixed(MmuKind::Shadow, harvest), &[Op::Cr3Reload, Op::Logging(true), Op::Write(0), Op::Harvest]);
        run_mix(
            fixed(MmuKind::Shadow, harvest),
            &[Op::Write(5), Op::Logging(true), Op::Invlpg(5), Op::Write(5), Op::Harvest],
        );
    }
}

/// EPT without A/D bits (so aging access-tracks SPTEs), write protection, 4 KiB pages.
fn fixed(mmu: MmuKind, harvest: Harvest) -> Setup {
    Setup {
        mmu,
        tdp: TdpKind::Ept,
        eptad: false,
        pml: false,
        nx_huge_pages: false,
        eager_page_split: true,
        thp: false,
        harvest,
    }
}

/// EPT without A/D bits, THP and the NX mitigation: an aged (access-tracked) huge SPTE is
/// split by an instruction fetch; its 4 KiB children must stay access-tracked, with X in the
/// saved bits. Before the fix they got X beside the saved bits, the next write made them
/// W+X without R, and the vCPU looped on EPT misconfigurations.
#[test]
fn nx_split_of_an_aged_huge_page_then_write() {
    let setup = Setup { nx_huge_pages: true, eager_page_split: false, thp: true, ..fixed(MmuKind::Tdp, Harvest::Get) };
    run_mix(setup, &[Op::ClearYoung(0, 1), Op::Fetch(0), Op::Cr3Reload, Op::Write(0), Op::Read(1)]);
}

/// Logging turned on and off while the vCPU runs on another thread, with zaps and aging in
/// between so the vCPU keeps faulting: every write that started after logging was on (and
/// ended before it went off) is in a harvest made after it — no fault that raced with the
/// memslot update may map a page writable behind the log's back.
fn logging_toggled_under_a_running_vcpu(setup: Setup, periods: usize, seed: u64) {
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let mut m = Mix::new(setup.clone());
    let (kvm, host, hva) = (m.kvm.clone(), m.host.clone(), m.hva);
    let gfn = m.gfn.clone();
    // Even: logging off; odd: on (period k = epoch / 2). Harvests count within the run.
    let epoch = AtomicUsize::new(0);
    let harvests_done = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let ring = setup.harvest == Harvest::Ring;
    let read_log = |kvm: &Kvm| -> BTreeSet<u64> {
        match setup.harvest {
            Harvest::Get => bits(&kvm.get_dirty_log(0).unwrap()),
            Harvest::ManualClear => {
                let bm = kvm.get_dirty_log(0).unwrap();
                kvm.clear_dirty_log(0, 0, MEM / 4096, &bm).unwrap();
                bits(&bm)
            }
            Harvest::Ring => {
                let mut got = BTreeSet::new();
                kvm.dirty_ring(0).unwrap().collect(|g| {
                    got.insert(g.offset);
                });
                kvm.reset_dirty_rings();
                got
            }
        }
    };
    // (epoch, index of the first harvest that must hold it) per write, and the harvests.
    let mut writes: Vec<(u64, usize, usize)> = Vec::new();
    let mut harvests: Vec<(usize, BTreeSet<u64>)> = Vec::new();
    std::thread::scope(|s| {
        let host_thread = s.spawn(|| {
            let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
            let mut out = Vec::new();
            for _ in 0..periods {
                kvm.set_user_memory_region(region(hva, true)).unwrap();
                let e = epoch.fetch_add(1, Ordering::SeqCst) + 1;
                for _ in 0..rng.gen_range(1..6) {
                    match rng.gen_range(0..4) {
                        0 => kvm.kvm_mmu_zap_all_fast(),
                        1 => drop(host.clear_young(hva, MEM)),
                        2 => drop(host.clear_flush_young(hva, MEM)),
                        _ => {}
                    }
                    std::thread::yield_now();
                    out.push((e, read_log(&kvm)));
                    harvests_done.fetch_add(1, Ordering::SeqCst);
                }
                // Close the period, then one last harvest: it comes after every write the
                // vCPU counted in the period.
                epoch.fetch_add(1, Ordering::SeqCst);
                out.push((e, read_log(&kvm)));
                harvests_done.fetch_add(1, Ordering::SeqCst);
                kvm.set_user_memory_region(region(hva, false)).unwrap();
                if ring {
                    read_log(&kvm); // what the off period leaves behind is not this period's
                }
                std::thread::yield_now();
            }
            stop.store(true, Ordering::SeqCst);
            out
        });
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed ^ 0x5eed);
        while !stop.load(Ordering::SeqCst) {
            let p = rng.gen_range(0..PAGES);
            let (e0, h0) = (epoch.load(Ordering::SeqCst), harvests_done.load(Ordering::SeqCst));
            m.access(p, AccessKind::Write, e0 as u64);
            let e1 = epoch.load(Ordering::SeqCst);
            if e0 % 2 == 1 && e0 == e1 {
                writes.push((p, e0, h0));
            }
        }
        harvests = host_thread.join().unwrap();
    });
    for (i, &(p, e, h)) in writes.iter().enumerate() {
        let g = gfn[ix(p)];
        assert!(
            harvests.iter().skip(h).filter(|(he, _)| *he == e).any(|(_, set)| set.contains(&g)),
            "{setup:?} seed {seed}: write #{i} to page {p} (gfn {g:#x}) in logging period {} after {h} harvests is in no later harvest of that period",
            e / 2
        );
    }
    m.kvm.audit().unwrap_or_else(|e| panic!("{setup:?}: audit: {e}"));
}

#[test]
fn logging_toggled_under_a_running_vcpu_loses_no_write() {
    let mut seed = 1;
    for mmu in [MmuKind::Tdp, MmuKind::LegacyTdp, MmuKind::Shadow] {
        for (eptad, pml) in [(false, false), (true, false), (true, true)] {
            for harvest in [Harvest::Get, Harvest::Ring] {
                for thp in [false, true] {
                    let setup = Setup { eptad, pml, thp, eager_page_split: !thp, ..fixed(mmu, harvest) };
                    logging_toggled_under_a_running_vcpu(setup, 24, seed);
                    seed += 1;
                }
            }
        }
    }
}

/// The slot-rmap-range walk (write protection, clear-dirty, aging, notifier unmaps) has two
/// ways to the same entries: gfn by gfn, or one pass over the rmap heads when the range is
/// wider than what is mapped (so a 1 TiB slot costs what it maps). Both must agree on any
/// range, level bounds included, with 4 KiB and (legacy TDP over THP) 2 MiB mappings.
#[test]
fn rmap_range_walks_agree() {
    use rand::{Rng, SeedableRng};
    for mmu in [MmuKind::Shadow, MmuKind::LegacyTdp] {
        let m = Mix::new(Setup { thp: true, eager_page_split: false, ..fixed(mmu, Harvest::Get) });
        let sh = m.kvm.mmu().shadow.lock();
        let slots = m.kvm.memslots();
        assert!(sh.rmaps.heads() > 0, "{mmu:?}: the guest has mappings");
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(9);
        let pages = MEM / 4096;
        let mut levels_seen = BTreeSet::new();
        for i in 0..400 {
            let a = if i == 0 { 0 } else { rng.gen_range(0..pages) };
            let span = rng.gen_range(1..4096);
            let b = if i == 0 { pages } else { rng.gen_range(a..=pages.min(a + span)) };
            let (lo, hi) = if i % 3 == 0 { (1, 3) } else { (rng.gen_range(1..=3u8), 3) };
            let (start, end) = (vmmu::x86_paging::addr::Gfn::new(a), vmmu::x86_paging::addr::Gfn::new(b));
            let by_gfn: BTreeSet<_> = sh.rmap_range_by_gfn(&slots, start, end, lo, hi).into_iter().collect();
            let by_heads: BTreeSet<_> = sh.rmap_range_by_heads(start, end, lo, hi).into_iter().collect();
            assert_eq!(by_gfn, by_heads, "{mmu:?}: gfns [{a:#x}, {b:#x}) levels {lo}..={hi}");
            levels_seen.extend(by_gfn.iter().map(|&(l, _)| l));
        }
        if mmu == MmuKind::Shadow {
            assert!(levels_seen.contains(&1), "{mmu:?}: 4 KiB entries compared");
        } else {
            assert!(levels_seen.contains(&2), "{mmu:?}: 2 MiB entries (THP under direct pages) compared");
        }
    }
}

/// A remote flush (the one a harvest asks for) and the guest's own MOV CR3 flush pending at
/// the same entry: KVM's `kvm_vcpu_flush_tlb_all` clears KVM_REQ_TLB_FLUSH_CURRENT, so the
/// vCPU flushes (and counts `tlb_flush`) once, not twice.
#[test]
fn a_full_flush_subsumes_the_current_context_flush() {
    let tlb_flushes = |with_remote: bool| {
        let mut m = Mix::new(fixed(MmuKind::Shadow, Harvest::Get));
        let cr3 = m.cpu.cpu().paging().cr3;
        m.cpu.write_cr3(cr3).unwrap(); // KVM_REQ_MMU_SYNC | KVM_REQ_TLB_FLUSH_CURRENT
        if with_remote {
            m.kvm.flush_remote_tlbs(None); // KVM_REQ_TLB_FLUSH
        }
        let before = m.cpu.stats()["tlb_flush"];
        m.run(&Op::Read(0));
        m.cpu.stats()["tlb_flush"] - before
    };
    let alone = tlb_flushes(false);
    assert!(alone >= 1, "the CR3 write flushes at the next entry");
    assert_eq!(tlb_flushes(true), alone, "the full flush covers the current context's");
}

/// `kvm_mmu_split_huge_page` traces the huge SPTE that was split (as
/// `tdp_mmu_split_huge_page` does), not the link that replaced it: eager splitting when
/// logging starts over THP.
#[test]
fn split_trace_shows_the_huge_spte() {
    let mut m = Mix::new(Setup { thp: true, eager_page_split: true, ..fixed(MmuKind::Tdp, Harvest::Get) });
    m.kvm.tracer.set_events(true);
    m.run(&Op::Logging(true));
    let records = m.kvm.tracer.take_records();
    let lines: Vec<String> =
        records.iter().map(|r| format!("{r:?}")).filter(|r| r.contains("kvm_mmu_split_huge_page")).collect();
    assert!(!lines.is_empty(), "enabling logging over THP splits huge pages");
    for l in &lines {
        let spte = l.split("spte ").nth(1).and_then(|t| t.split(' ').next()).unwrap();
        let spte = u64::from_str_radix(spte, 16).unwrap();
        assert!(spte & (1 << 7) != 0 && l.contains("level 2 errno 0"), "a huge level-2 leaf: {l}");
    }
}
