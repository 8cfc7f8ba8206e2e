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
//! A vCPU thread never blocks while in guest mode: it calls `Vcpu::exit_guest` before
//! waiting on a barrier or finishing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use vmmu::host::{Backing, FrameAllocator, HostMm, Hva};
use vmmu::memslot::{MemslotFlags, UserspaceMemoryRegion};
use vmmu::x86_paging::addr::{Gpa, Gva};
use vmmu::x86_paging::regs::{Cr0, Cr4, Efer};
use vmmu::{GuestError, Kvm, TdpKind, Vcpu, VmConfig};
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
    let frames = Arc::new(FrameAllocator::new(4 * MEM).unwrap());
    let host = Arc::new(HostMm::new(frames).unwrap());
    let kvm = Kvm::new(VmConfig { tdp, ..VmConfig::default() }, host.clone()).unwrap();
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
            assert_eq!(st["pages_4k"] as u64, gfns, "{tdp:?}: 4 KiB leaves vs distinct gfns touched; {st:?}");
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

fn host_coherence(tdp: TdpKind, backing: Backing) {
    let s = setup(tdp, backing);
    if std::env::var_os("VMMU_TRACE").is_some() {
        s.kvm.tracer.set_events(true);
    }
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
                let mut last = vec![0u64; PAGES as usize];
                let mut x = 0x2545_f491_4f6c_dd1du64;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) || n < 20_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let p = x % PAGES;
                    n += 1;
                    let gva = Gva::new(DATA + p * 4096);
                    let got = match cpu.read(gva, 8) {
                        Ok(v) => v,
                        Err(e) => {
                            return Err(format!("read: {e}; stats {:?}; vm {:?}", cpu.stats(), cpu.kvm().vm_stats()))
                        }
                    };
                    // Only 0 (dropped) or this thread's last write can be there.
                    if got != 0 && got != last[p as usize] {
                        return Err(format!("page {p} reads {got:#x}; last written {:#x}", last[p as usize]));
                    }
                    let val = n << 16 | p;
                    cpu.write(gva, 8, val).map_err(|e| format!("write: {e}"))?;
                    last[p as usize] = val;
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
        s.kvm.host().madvise_dontneed(hva, len * 4096).unwrap();
        if x & 0x700 == 0 {
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
            guest == 0 || guest == last[p as usize],
            "{tdp:?} {backing:?}: page {p} reads {guest:#x}; last written {:#x}",
            last[p as usize]
        );
    }
    cpu.exit_guest();
    s.kvm.audit().unwrap_or_else(|e| panic!("{tdp:?} {backing:?}: {e}"));
    // The guest tables were never dropped: they still read back through the VMM.
    assert_ne!(vmmu_guest::boot::BootMem::read_phys(&*s.kvm, Gpa::new(s.cr3), 8).unwrap(), 0);
}

#[test]
fn host_coherence_ept_4k() {
    host_coherence(TdpKind::Ept, Backing::Anon4k);
}

#[test]
fn host_coherence_ept_thp() {
    host_coherence(TdpKind::Ept, Backing::Thp);
}

#[test]
fn host_coherence_npt_4k() {
    host_coherence(TdpKind::Npt, Backing::Anon4k);
}

#[test]
fn host_coherence_npt_thp() {
    host_coherence(TdpKind::Npt, Backing::Thp);
}

#[test]
fn scratch_single_thread_dontneed() {
    let s = setup(TdpKind::Ept, Backing::Anon4k);
    let mut cpu = s.kvm.create_vcpu().unwrap();
    boot(&mut cpu, s.cr3).unwrap();
    let gva = Gva::new(DATA);
    cpu.write(gva, 8, 5).unwrap();
    assert_eq!(cpu.read(gva, 8).unwrap(), 5);
    cpu.exit_guest();
    s.kvm.host().madvise_dontneed(Hva(s.hva.raw() + DATA), 4096).unwrap();
    eprintln!("stats {:?}", cpu.stats());
    let r = cpu.read(gva, 8);
    eprintln!("after: {r:?} stats {:?}", cpu.stats());
    r.unwrap();
}
