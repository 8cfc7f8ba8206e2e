//! Concurrency of the TDP MMU fault path and of host invalidations.
//!
//! - Two vCPU threads (one `Vcpu` moved into each) fault concurrently on overlapping ranges
//!   of the same guest memory, through the same identity-mapped guest page tables (built
//!   with `vmmu_guest::pagetable`, CPL 0), each writing distinct values to distinct bytes of
//!   the shared pages and reading them back. Afterwards one vCPU sees every value either
//!   thread wrote, the MMU audit passes, `pf_fixed` summed over the vCPUs covers every gfn
//!   touched, the `pages_4k` / `pages_2m` stats equal the audit's leaf counts (and, with
//!   4 KiB backing, the number of distinct gfns touched), and no vCPU returned an error.
//!   For 4 KiB and THP backing, EPT and NPT.
//! - Host coherence: a vCPU thread keeps writing and reading guest pages while the main
//!   thread repeatedly `madvise(MADV_DONTNEED)`s parts of the memslot's backing. When
//!   everything has stopped, each page reads (through the vCPU and through the VMM's own
//!   mapping, identically) 0 if it was dropped after its last write, or that last write;
//!   the audit passes.
//!
//! - Host coherence with two vCPU threads, for every MMU: each thread writes and reads back
//!   its own pages while the main thread runs random host events over the data pages —
//!   MADV_DONTNEED, page migration, swap-out, KSM merging, THP split and collapse. Every read
//!   returns 0 (dropped after the last write) or the thread's last write; afterwards the vCPU
//!   and the VMM read the same bytes and the audit finds no SPTE mapping a frame the host
//!   freed or moved.
//!
//! A vCPU thread never blocks while in guest mode: it calls `Vcpu::exit_guest` before
//! waiting on a barrier or finishing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use vmmu::host::{Backing, FrameAllocator, HostMm, Hva};
use vmmu::memslot::{MemslotFlags, UserspaceMemoryRegion};
use vmmu::x86_paging::addr::{Gpa, Gva};
use vmmu::x86_paging::regs::{Cr0, Cr4, Efer};
use vmmu::{GuestError, Kvm, TdpKind, Vcpu, VmConfig, VmError};
use vmmu_guest::pagetable::{FrameBump, PageTableBuilder, PteFlags};

/// Guest RAM: one memslot at gpa 0.
const MEM: u64 = 16 << 20;
/// Guest page tables: [1 MiB, 2 MiB).
const PT_START: u64 = 1 << 20;
/// The shared data pages start here.
const DATA: u64 = 4 << 20;
/// Shared data pages (8 MiB: four 2 MiB pages).
const PAGES: u64 = 2048;

struct Setup {
    kvm: Arc<Kvm>,
    hva: Hva,
    /// Guest page-table pages (all 4 KiB, all touched by every walk).
    pt_pages: u64,
    cr3: u64,
}

fn setup(tdp: TdpKind, backing: Backing) -> Setup {
    setup_cfg(VmConfig { tdp, ..VmConfig::default() }, backing)
}

fn setup_cfg(cfg: VmConfig, backing: Backing) -> Setup {
    let frames = Arc::new(FrameAllocator::new(4 * MEM).unwrap());
    let host = Arc::new(HostMm::new(frames).unwrap());
    let kvm = Kvm::new(cfg, host.clone()).unwrap();
    let hva = host.mmap(MEM, backing, true, false).unwrap();
    kvm.set_user_memory_region(UserspaceMemoryRegion {
        slot: 0,
        flags: MemslotFlags::empty(),
        guest_phys_addr: 0,
        memory_size: MEM,
        userspace_addr: hva,
    })
    .unwrap();
    // Identity map of all RAM with 2 MiB guest pages; A/D left clear so both vCPUs race to
    // set them in the shared PDEs.
    let mut alloc = FrameBump::new(PT_START, 2 << 20);
    let mut b = PageTableBuilder::new(&*kvm, &mut alloc, 4).unwrap();
    let flags = PteFlags { writable: true, user: false, nx: true, global: false, accessed: false, dirty: false };
    b.map_range(&mut alloc, 0, 0, MEM, 21, flags).unwrap();
    Setup { cr3: b.root.raw(), pt_pages: b.tables, kvm, hva }
}

fn boot(cpu: &mut Vcpu, cr3: u64) -> Result<(), GuestError> {
    cpu.set_cpl(0);
    cpu.write_cr4(Cr4::PAE)?;
    cpu.write_efer(Efer::LME | Efer::NXE)?;
    cpu.write_cr3(cr3)?;
    cpu.write_cr0(Cr0::PE | Cr0::PG | Cr0::WP)
}

/// The byte offset in page `p` that thread `t` owns, and the 8-byte value it writes there.
/// `v` as an index (page numbers here are far below `usize::MAX`).
fn ix(v: u64) -> usize {
    usize::try_from(v).expect("index fits usize")
}

fn slot(t: u64, p: u64) -> (u64, u64) {
    ((p % 32) * 64 + t * 8, (t + 1) << 56 | p << 8 | 0x5a)
}

/// Thread `t`'s pages: both threads cover the middle half, in opposite directions.
fn pages_of(t: u64) -> Vec<u64> {
    if t == 0 {
        (0..PAGES * 3 / 4).collect()
    } else {
        (PAGES / 4..PAGES).rev().collect()
    }
}

fn two_vcpus_fault_concurrently(tdp: TdpKind, backing: Backing) {
    let s = setup(tdp, backing);
    let barrier = Arc::new(Barrier::new(2));
    let mut handles = Vec::new();
    for t in 0..2u64 {
        let mut cpu = s.kvm.create_vcpu().unwrap();
        let barrier = barrier.clone();
        let cr3 = s.cr3;
        handles.push(std::thread::spawn(move || -> (Vcpu, Result<(), String>) {
            let r = (|| -> Result<(), String> {
                boot(&mut cpu, cr3).map_err(|e| format!("boot: {e}"))?;
                cpu.exit_guest();
                barrier.wait();
                for p in pages_of(t) {
                    let (off, val) = slot(t, p);
                    let gva = Gva::new(DATA + p * 4096 + off);
                    cpu.write(gva, 8, val).map_err(|e| format!("vcpu {t}: write {gva:?}: {e}"))?;
                    // A byte of the other thread's slot in the same page: a read that races
                    // with the other vCPU's fault on this page.
                    let (o_off, _) = slot(1 - t, p);
                    cpu.read(Gva::new(DATA + p * 4096 + o_off + 7), 1).map_err(|e| format!("vcpu {t}: read: {e}"))?;
                }
                for p in pages_of(t) {
                    let (off, val) = slot(t, p);
                    let got = cpu
                        .read(Gva::new(DATA + p * 4096 + off), 8)
                        .map_err(|e| format!("vcpu {t}: read back: {e}"))?;
                    if got != val {
                        return Err(format!("vcpu {t}: page {p} reads {got:#x}, wrote {val:#x}"));
                    }
                }
                Ok(())
            })();
            cpu.exit_guest();
            (cpu, r)
        }));
    }
    let mut vcpus = Vec::new();
    for h in handles {
        let (cpu, r) = h.join().expect("vCPU thread panicked");
        r.unwrap_or_else(|e| panic!("{tdp:?} {backing:?}: {e}"));
        vcpus.push(cpu);
    }
    // Every value either thread wrote, seen from vCPU 0.
    let mut checker = vcpus.remove(0);
    for t in 0..2u64 {
        for p in pages_of(t) {
            let (off, val) = slot(t, p);
            let got = checker.read(Gva::new(DATA + p * 4096 + off), 8).unwrap();
            assert_eq!(got, val, "{tdp:?} {backing:?}: page {p} slot of vcpu {t}");
        }
    }
    checker.exit_guest();
    vcpus.push(checker);
    let rep = s.kvm.audit().unwrap_or_else(|e| panic!("{tdp:?} {backing:?}: {e}"));
    let st = s.kvm.vm_stats();
    let pf_fixed: u64 = vcpus.iter().map(|v| v.stat.pf_fixed).sum();
    assert_eq!(st["pages_4k"], rep.leaves[0] as i64, "{st:?} {rep:?}");
    assert_eq!(st["pages_2m"], rep.leaves[1] as i64, "{st:?} {rep:?}");
    assert_eq!(st["pages_1g"], rep.leaves[2] as i64, "{st:?} {rep:?}");
    match backing {
        Backing::Anon4k => {
            // Every data page and every guest page-table page, each mapped once.
            let gfns = PAGES + s.pt_pages;
            assert!(pf_fixed >= gfns, "{tdp:?}: pf_fixed {pf_fixed} < {gfns} gfns touched");
            assert_eq!(
                u64::try_from(st["pages_4k"]).unwrap(),
                gfns,
                "{tdp:?}: 4 KiB leaves vs distinct gfns touched; {st:?}"
            );
            assert_eq!(st["pages_2m"] + st["pages_1g"], 0, "{st:?}");
        }
        Backing::Thp => {
            // The data (four 2 MiB pages) and the tables' 2 MiB page.
            assert!(st["pages_2m"] >= (PAGES / 512) as i64, "{tdp:?}: {st:?}");
            assert!(pf_fixed >= PAGES / 512, "{tdp:?}: pf_fixed {pf_fixed}");
        }
    }
    drop(vcpus);
}

#[test]
fn two_vcpus_ept_4k() {
    two_vcpus_fault_concurrently(TdpKind::Ept, Backing::Anon4k);
}

#[test]
fn two_vcpus_ept_thp() {
    two_vcpus_fault_concurrently(TdpKind::Ept, Backing::Thp);
}

#[test]
fn two_vcpus_npt_4k() {
    two_vcpus_fault_concurrently(TdpKind::Npt, Backing::Anon4k);
}

#[test]
fn two_vcpus_npt_thp() {
    two_vcpus_fault_concurrently(TdpKind::Npt, Backing::Thp);
}

/// Repeats the two-vCPU race a few times on fresh VMs (races are probabilistic).
#[test]
fn two_vcpus_repeated() {
    for i in 0..4 {
        let tdp = if i % 2 == 0 { TdpKind::Ept } else { TdpKind::Npt };
        let backing = if i / 2 == 0 { Backing::Anon4k } else { Backing::Thp };
        two_vcpus_fault_concurrently(tdp, backing);
    }
}

/// Runs a guest access; `VmError::Stuck` while the host is still invalidating is retried.
///
/// The vCPU gives up on an access after 10,000 exits (`MAX_EXITS_PER_ACCESS` in vm/vcpu.rs), and a
/// fault on a gfn inside an in-progress invalidation returns RET_PF_RETRY immediately, so one
/// long MADV_DONTNEED (zeroing and freeing 2 MiB) can exhaust that budget although nothing is
/// wrong (see the report). Once the host has stopped, `Stuck` is a real failure.
fn retry_stuck<T>(
    stop: &AtomicBool,
    stuck: &mut u64,
    mut f: impl FnMut() -> Result<T, GuestError>,
) -> Result<T, GuestError> {
    loop {
        match f() {
            Err(GuestError::Vm(VmError::Stuck { .. })) if !stop.load(Ordering::Relaxed) => *stuck += 1,
            r => return r,
        }
    }
}

/// How the host drops pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drops {
    /// Runs of 1..=16 pages (splitting THPs), and sometimes a whole 2 MiB page.
    Mixed,
    /// Only whole, aligned 2 MiB ranges (no THP split).
    Whole2m,
}

fn host_coherence(tdp: TdpKind, backing: Backing, drops: Drops) {
    let s = setup(tdp, backing);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(Barrier::new(2));
    let mut cpu = s.kvm.create_vcpu().unwrap();
    let cr3 = s.cr3;
    let writer = {
        let stop = stop.clone();
        let started = started.clone();
        std::thread::spawn(move || -> (Vcpu, Result<Vec<u64>, String>) {
            let r = (|| -> Result<Vec<u64>, String> {
                boot(&mut cpu, cr3).map_err(|e| format!("boot: {e}"))?;
                cpu.exit_guest();
                started.wait();
                let mut last = vec![0u64; ix(PAGES)];
                let mut stuck = 0u64;
                let mut x = 0x2545_f491_4f6c_dd1du64;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) || n < 20_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let p = x % PAGES;
                    n += 1;
                    let gva = Gva::new(DATA + p * 4096);
                    let got = retry_stuck(&stop, &mut stuck, || cpu.read(gva, 8)).map_err(|e| format!("read: {e}"))?;
                    // Only 0 (dropped) or this thread's last write can be there.
                    if got != 0 && got != last[ix(p)] {
                        return Err(format!("page {p} reads {got:#x}; last written {:#x}", last[ix(p)]));
                    }
                    let val = n << 16 | p;
                    retry_stuck(&stop, &mut stuck, || cpu.write(gva, 8, val)).map_err(|e| format!("write: {e}"))?;
                    last[ix(p)] = val;
                }
                if stuck > 0 {
                    eprintln!("{tdp:?} {backing:?}: {stuck} accesses hit VmError::Stuck during the invalidation storm and were retried");
                }
                Ok(last)
            })();
            cpu.exit_guest();
            (cpu, r)
        })
    };
    started.wait();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..400 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let first = x % PAGES;
        let len = (1 + (x >> 20) % 16).min(PAGES - first);
        let hva = Hva(s.hva.raw() + DATA + first * 4096);
        if drops == Drops::Mixed {
            s.kvm.host().madvise_dontneed(hva, len * 4096).unwrap();
        }
        if x & 0x700 == 0 || drops == Drops::Whole2m {
            // Now and then a whole 2 MiB-aligned range (a THP drop rather than a split).
            let base = Hva(s.hva.raw() + DATA + (first & !511) * 4096);
            s.kvm.host().madvise_dontneed(base, 2 << 20).unwrap();
        }
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Relaxed);
    let (mut cpu, r) = writer.join().expect("vCPU thread panicked");
    let last = r.unwrap_or_else(|e| panic!("{tdp:?} {backing:?}: {e}"));
    s.kvm.audit().unwrap_or_else(|e| panic!("{tdp:?} {backing:?}: {e}"));
    for p in 0..PAGES {
        let gva = Gva::new(DATA + p * 4096);
        let guest = cpu.read(gva, 8).unwrap();
        let vmm = s.kvm.host().read(Hva(s.hva.raw() + DATA + p * 4096), 8).unwrap();
        assert_eq!(guest, vmm, "{tdp:?} {backing:?}: page {p}: the vCPU and the VMM see different bytes");
        assert!(
            guest == 0 || guest == last[ix(p)],
            "{tdp:?} {backing:?}: page {p} reads {guest:#x}; last written {:#x}",
            last[ix(p)]
        );
    }
    cpu.exit_guest();
    s.kvm.audit().unwrap_or_else(|e| panic!("{tdp:?} {backing:?}: {e}"));
    // The guest tables were never dropped: they still read back through the VMM.
    assert_ne!(vmmu_guest::boot::BootMem::read_phys(&*s.kvm, Gpa::new(s.cr3), 8).unwrap(), 0);
}

#[test]
fn host_coherence_ept_4k() {
    host_coherence(TdpKind::Ept, Backing::Anon4k, Drops::Mixed);
}

#[test]
fn host_coherence_npt_4k() {
    host_coherence(TdpKind::Npt, Backing::Anon4k, Drops::Mixed);
}

#[test]
fn host_coherence_ept_thp_whole_2m() {
    host_coherence(TdpKind::Ept, Backing::Thp, Drops::Whole2m);
}

#[test]
fn host_coherence_npt_thp_whole_2m() {
    host_coherence(TdpKind::Npt, Backing::Thp, Drops::Whole2m);
}

/// Regression: a partial MADV_DONTNEED of a THP splits the PMD and frees 4 KiB frames of
/// the huge page; the MMU notifier must cover the whole 2 MiB (as Linux's `__split_huge_pmd`
/// does), or a vCPU faulting on another gfn of the same huge page installs a 2 MiB SPTE over
/// frames that are then freed and reused. Racy: the loop below usually hit it before the fix.
#[test]
fn host_coherence_thp_partial_drops() {
    for _ in 0..40 {
        host_coherence(TdpKind::Ept, Backing::Thp, Drops::Mixed);
        host_coherence(TdpKind::Npt, Backing::Thp, Drops::Mixed);
    }
}

/// Two vCPU threads (thread t owns the pages p with p % 2 == t) against random host events.
fn host_coherence_two_vcpus(mmu: vmmu::MmuKind, backing: Backing, seed: u64) {
    let what = format!("{mmu:?} {backing:?} seed {seed}");
    let s = setup_cfg(VmConfig { mmu, ..VmConfig::default() }, backing);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(Barrier::new(3));
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let mut cpu = s.kvm.create_vcpu().unwrap();
            let (stop, started, cr3, what) = (stop.clone(), started.clone(), s.cr3, what.clone());
            let progress = progress.clone();
            std::thread::spawn(move || -> (Vcpu, Result<Vec<u64>, String>) {
                let r = (|| -> Result<Vec<u64>, String> {
                    boot(&mut cpu, cr3).map_err(|e| format!("boot: {e}"))?;
                    cpu.exit_guest();
                    started.wait();
                    let mut last = vec![0u64; ix(PAGES)];
                    let mut stuck = 0u64;
                    let mut x = 0x2545_f491_4f6c_dd1du64 ^ (seed << 8) ^ t;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) || n < 10_000 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let p = (x % (PAGES / 2)) * 2 + t;
                        n += 1;
                        let gva = Gva::new(DATA + p * 4096);
                        let got =
                            retry_stuck(&stop, &mut stuck, || cpu.read(gva, 8)).map_err(|e| format!("read: {e}"))?;
                        if got != 0 && got != last[ix(p)] {
                            return Err(format!("{what}: page {p} reads {got:#x}; last written {:#x}", last[ix(p)]));
                        }
                        // Few distinct values, so KSM finds identical pages to merge.
                        let val = (n % 3 + 1) << 8 | t;
                        retry_stuck(&stop, &mut stuck, || cpu.write(gva, 8, val)).map_err(|e| format!("write: {e}"))?;
                        last[ix(p)] = val;
                        progress.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(last)
                })();
                cpu.exit_guest();
                (cpu, r)
            })
        })
        .collect();
    started.wait();
    let host = s.kvm.host().clone();
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    // Pages (or huge pages) each kind of event changed.
    let mut done = [0u64; 6];
    let mut issued = [0u64; 6];
    let mut events = 0;
    // Events keep coming while the vCPUs run: at least 120, and until they made 20,000
    // accesses between them.
    while events < 120 || progress.load(Ordering::Relaxed) < 20_000 {
        events += 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let first = x % PAGES;
        let len = (1 + (x >> 20) % 64).min(PAGES - first);
        let at = Hva(s.hva.raw() + DATA + first * 4096);
        let whole = Hva(s.hva.raw() + DATA + (first & !511) * 4096);
        let kind = ((x >> 40) % 6) as usize;
        issued[kind] += 1;
        done[kind] += match kind {
            0 => host.madvise_dontneed(at, len * 4096).map(|()| len).unwrap(),
            1 => host.migrate_pages(at, len * 4096).unwrap(),
            2 => host.swap_out(at, len * 4096).unwrap(),
            3 => host.ksm_merge(at, len * 4096).unwrap(),
            4 => host.split_huge_pages(whole, 2 << 20).unwrap(),
            _ => host.collapse_huge_pages(whole, 2 << 20).unwrap(),
        };
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Relaxed);
    eprintln!("{what}: pages dropped, migrated, swapped, KSM-merged; huge pages split, collapsed: {done:?}");
    // How much each event changes depends on how far the vCPUs got (a dropped page has
    // nothing to swap or merge), so: every kind ran, and the contents-keeping ones moved pages.
    assert!(issued.iter().all(|&n| n > 0), "{what}: every kind of event ran: {issued:?}");
    assert!(done[1] + done[2] + done[3] > 0, "{what}: migration, swap or KSM changed something: {done:?}");
    let mut cpus = Vec::new();
    let mut lasts = Vec::new();
    for th in threads {
        let (cpu, r) = th.join().expect("vCPU thread panicked");
        lasts.push(r.unwrap_or_else(|e| panic!("{e}")));
        cpus.push(cpu);
    }
    s.kvm.audit().unwrap_or_else(|e| panic!("{what}: {e}"));
    let cpu = &mut cpus[0];
    for p in 0..PAGES {
        let gva = Gva::new(DATA + p * 4096);
        let guest = cpu.read(gva, 8).unwrap();
        let vmm = host.read(Hva(s.hva.raw() + DATA + p * 4096), 8).unwrap();
        assert_eq!(guest, vmm, "{what}: page {p}: the vCPU and the VMM see different bytes");
        let last = lasts[ix(p % 2)][ix(p)];
        assert!(guest == 0 || guest == last, "{what}: page {p} reads {guest:#x}; last written {last:#x}");
    }
    cpu.exit_guest();
    s.kvm.audit().unwrap_or_else(|e| panic!("{what}: {e}"));
}

#[test]
fn host_coherence_two_vcpus_all_mmus() {
    for seed in 1..=2 {
        for mmu in [vmmu::MmuKind::Tdp, vmmu::MmuKind::LegacyTdp, vmmu::MmuKind::Shadow] {
            host_coherence_two_vcpus(mmu, Backing::Anon4k, seed);
            host_coherence_two_vcpus(mmu, Backing::Thp, seed);
        }
    }
}

/// The address of the guest PDE mapping `va` in `s`'s identity tables (2 MiB pages).
fn pde_gpa(s: &Setup, va: u64) -> u64 {
    use vmmu_guest::boot::BootMem;
    let mut table = s.cr3 & !0xfff;
    for level in [4u32, 3] {
        let e = s.kvm.read_phys(Gpa::new(table + ((va >> (12 + 9 * (level - 1))) & 511) * 8), 8).unwrap();
        table = e & 0x000f_ffff_ffff_f000;
    }
    table + ((va >> 21) & 511) * 8
}

/// Remote TLB flushes across vCPU threads, as KVM counts them: the main thread retargets a
/// guest PDE between two 2 MiB frames holding different values and calls
/// `kvm_flush_remote_tlbs`; two vCPU threads read through that PDE all along. A read that
/// starts after a flush returned (and ends before the next retarget) must see the new
/// target: the flush reached every vCPU in guest mode before returning. Every call counts in
/// remote_tlb_flush_requests; remote_tlb_flush counts only the calls that found another vCPU
/// in guest mode to kick; each vCPU's tlb_flush counts the requests it serviced.
fn remote_flush_reaches_running_vcpus(mmu: vmmu::MmuKind) {
    use std::sync::atomic::AtomicU64;
    use vmmu_guest::boot::BootMem;
    let s = setup_cfg(VmConfig { mmu, ..VmConfig::default() }, Backing::Anon4k);
    let (va, x, y) = (DATA, DATA, DATA + (2 << 20));
    s.kvm.write_phys(Gpa::new(x), 8, 0x1111).unwrap();
    s.kvm.write_phys(Gpa::new(y), 8, 0x2222).unwrap();
    let pde = pde_gpa(&s, va);
    let pde0 = s.kvm.read_phys(Gpa::new(pde), 8).unwrap();
    let gen = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(Barrier::new(3));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let mut cpu = s.kvm.create_vcpu().unwrap();
            let (gen, stop, started, cr3) = (gen.clone(), stop.clone(), started.clone(), s.cr3);
            std::thread::spawn(move || {
                boot(&mut cpu, cr3).unwrap();
                cpu.read(Gva::new(x), 8).unwrap();
                cpu.read(Gva::new(y), 8).unwrap();
                cpu.exit_guest();
                started.wait();
                let mut checked = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let g0 = gen.load(Ordering::SeqCst);
                    let v = cpu.read(Gva::new(va), 8).unwrap();
                    let g1 = gen.load(Ordering::SeqCst);
                    // gen is odd while a retarget is in flight (either value may show),
                    // 2g once flush g returned.
                    if g0 == g1 && g0 % 2 == 0 {
                        let want = if (g0 / 2) % 2 == 0 { 0x1111 } else { 0x2222 };
                        assert_eq!(v, want, "{mmu:?}: a read after flush {g0} saw a stale translation");
                        checked += 1;
                    }
                }
                cpu.exit_guest();
                (cpu, checked)
            })
        })
        .collect();
    started.wait();
    let flushes = 500u64;
    let requests0 = s.kvm.vm_stats()["remote_tlb_flush_requests"];
    for g in 1..=flushes {
        let target = if g % 2 == 0 { x } else { y };
        gen.store(2 * g - 1, Ordering::SeqCst);
        s.kvm.write_phys(Gpa::new(pde), 8, (pde0 & !0x000f_ffff_ffe0_0000) | target).unwrap();
        s.kvm.flush_remote_tlbs(None);
        gen.store(2 * g, Ordering::SeqCst);
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Release);
    let mut checked = 0;
    let mut tlb_flushes = Vec::new();
    for t in threads {
        let (cpu, n) = t.join().expect("vCPU thread panicked");
        checked += n;
        tlb_flushes.push(cpu.stats()["tlb_flush"]);
    }
    let st = s.kvm.vm_stats();
    assert_eq!(st["remote_tlb_flush_requests"] - requests0, flushes as i64, "{mmu:?}: one request per call");
    assert!(st["remote_tlb_flush"] > 0, "{mmu:?}: some calls had to kick a running vCPU: {st:?}");
    assert!(st["remote_tlb_flush"] <= st["remote_tlb_flush_requests"], "{mmu:?}: {st:?}");
    for f in tlb_flushes {
        // Requests coalesce: a vCPU services at most one flush per request, at least one.
        assert!(f >= 1 && f <= st["remote_tlb_flush_requests"], "{mmu:?}: tlb_flush {f}");
    }
    assert!(checked > 0, "{mmu:?}: the readers checked something");
    s.kvm.audit().unwrap();
}

#[test]
fn remote_tlb_flush_reaches_running_vcpus() {
    remote_flush_reaches_running_vcpus(vmmu::MmuKind::Tdp);
    remote_flush_reaches_running_vcpus(vmmu::MmuKind::LegacyTdp);
}
