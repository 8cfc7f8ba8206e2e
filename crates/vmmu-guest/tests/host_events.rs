//! Host events under a running guest: page migration and swap-out/in. The guest-visible
//! effect is that nothing changes — it reads back what it wrote — while KVM's SPTEs were
//! zapped by the MMU notifier and fault back in on the new frames (pf_taken, the audit
//! checks every SPTE against the host mapping).

mod common;

use common::{Booted as G, MEM};
use vmmu::host::{Backing, Hva};
use vmmu::x86_paging::access::AccessKind;
use vmmu::{MmuKind, VmConfig};
use vmmu_guest::kernel::USER_BASE;

const PAGES: u64 = 1024;

/// A booted guest that stored a known value in each of its `PAGES` pages.
fn guest(mmu: MmuKind, backing: Backing) -> G {
    let mut g = common::boot(VmConfig { mmu, ..Default::default() }, backing, PAGES);
    for i in 0..PAGES {
        g.k.access(&mut g.cpu, USER_BASE + i * 4096 + 64, AccessKind::Write, 8, i * 0x9e37_79b9 + 1).unwrap();
    }
    g
}

impl G {
    fn check_contents(&mut self, what: &str) {
        for i in 0..PAGES {
            let v = self.k.access(&mut self.cpu, USER_BASE + i * 4096 + 64, AccessKind::Read, 8, 0).unwrap();
            assert_eq!(v, i * 0x9e37_79b9 + 1, "{what}: page {i}");
        }
    }

    fn host_pfn(&self, gpa: u64) -> u64 {
        self.host.get_user_page_fast_only(Hva(self.hva.raw() + gpa), false).map_or(0, |p| p.pfn.raw())
    }

    fn data_gpa(&mut self, i: u64) -> u64 {
        let pid = self.pid;
        self.k.user_pte(&mut self.cpu, pid, USER_BASE + i * 4096).unwrap().unwrap() & 0x000f_ffff_ffff_f000
    }
}

fn migrate(mmu: MmuKind, backing: Backing) {
    let what = format!("{mmu:?} {backing:?} migrate");
    let mut g = guest(mmu, backing);
    let gpa = g.data_gpa(5);
    let before = g.host_pfn(gpa);
    let flushes = g.kvm.vm_stats()["remote_tlb_flush"];
    let moved = g.host.migrate_pages(g.hva, MEM).unwrap();
    assert!(moved >= PAGES, "{what}: {moved} pages moved");
    assert_ne!(g.host_pfn(gpa), before, "{what}: the page has a new frame");
    assert!(g.kvm.vm_stats()["remote_tlb_flush"] > flushes, "{what}: the notifier zapped and flushed");
    g.kvm.audit().unwrap();
    let taken = g.cpu.stat.pf_taken;
    g.check_contents(&what);
    assert!(g.cpu.stat.pf_taken > taken, "{what}: SPTEs faulted back in");
    g.kvm.audit().unwrap();
}

fn swap(mmu: MmuKind, backing: Backing) {
    let what = format!("{mmu:?} {backing:?} swap");
    let mut g = guest(mmu, backing);
    let gpa = g.data_gpa(5);
    let n = g.host.swap_out(g.hva, MEM).unwrap();
    assert!(n >= PAGES, "{what}: {n} pages swapped out");
    assert_eq!(g.host.swapped_pages(), n);
    assert_eq!(g.host_pfn(gpa), 0, "{what}: not mapped while swapped out");
    g.kvm.audit().unwrap();
    let taken = g.cpu.stat.pf_taken;
    g.check_contents(&what);
    assert!(g.cpu.stat.pf_taken > taken, "{what}: SPTEs faulted back in");
    assert!(g.host.swapped_pages() < n, "{what}: pages swapped back in");
    g.kvm.audit().unwrap();
    // Dropping swapped-out memory drops its swap entries: it reads zeroes after.
    g.host.madvise_dontneed(g.hva, MEM).unwrap();
    assert_eq!(g.host.swapped_pages(), 0, "{what}");
}

#[test]
fn tdp_migrate_and_swap() {
    for b in [Backing::Anon4k, Backing::Thp] {
        migrate(MmuKind::Tdp, b);
        swap(MmuKind::Tdp, b);
    }
}

#[test]
fn shadow_migrate_and_swap() {
    migrate(MmuKind::Shadow, Backing::Anon4k);
    swap(MmuKind::Shadow, Backing::Anon4k);
}

#[test]
fn legacy_tdp_migrate_and_swap() {
    for b in [Backing::Anon4k, Backing::Thp] {
        migrate(MmuKind::LegacyTdp, b);
        swap(MmuKind::LegacyTdp, b);
    }
}

/// Host coherence under concurrency: a vCPU thread keeps writing and reading back its pages
/// while the host thread migrates and swaps random ranges of guest memory under it. Every
/// read returns the last value the guest wrote there (migration and swap keep contents), and
/// the audit finds no SPTE mapping a frame the host freed or moved.
fn coherence_with_concurrent_host_events(mmu: MmuKind, seed: u64) {
    use rand::{Rng, SeedableRng};
    let G { kvm, host, hva, mut cpu, mut k, .. } = guest(mmu, Backing::Anon4k);
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let stop = &stop;
        let guest = s.spawn(move || {
            let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
            let mut want: Vec<u64> = (0..PAGES).map(|i| i * 0x9e37_79b9 + 1).collect();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Acquire) || n < 2000 {
                let i = rng.gen_range(0..PAGES);
                let va = USER_BASE + i * 4096 + 64;
                if rng.gen_bool(0.5) {
                    let v = rng.r#gen::<u64>();
                    k.access(&mut cpu, va, AccessKind::Write, 8, v).unwrap();
                    want[i as usize] = v;
                } else {
                    let got = k.access(&mut cpu, va, AccessKind::Read, 8, 0).unwrap();
                    assert_eq!(got, want[i as usize], "{mmu:?} seed {seed}: page {i} after {n} accesses");
                }
                n += 1;
            }
            cpu.exit_guest();
            n
        });
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed ^ 0x5555);
        for _ in 0..40 {
            let pages = MEM / 4096;
            let first = rng.gen_range(0..pages);
            let len = rng.gen_range(1..=256u64).min(pages - first);
            let at = Hva(hva.raw() + first * 4096);
            if rng.gen_bool(0.5) {
                host.migrate_pages(at, len * 4096).unwrap();
            } else {
                host.swap_out(at, len * 4096).unwrap();
            }
            std::thread::yield_now();
        }
        stop.store(true, std::sync::atomic::Ordering::Release);
        guest.join().unwrap();
    });
    kvm.audit().unwrap();
}

#[test]
fn host_coherence_with_concurrent_events() {
    for seed in 1..=4 {
        coherence_with_concurrent_host_events(MmuKind::Tdp, seed);
        coherence_with_concurrent_host_events(MmuKind::LegacyTdp, seed);
        coherence_with_concurrent_host_events(MmuKind::Shadow, seed);
    }
}

/// THP split and collapse under a running guest: after a split KVM's huge SPTEs are gone and
/// the guest refaults at 4 KiB (the host maps the range small); after khugepaged-style
/// collapse the guest's next faults map 2 MiB again. Contents survive both.
fn thp_split_and_collapse(mmu: MmuKind) {
    let what = format!("{mmu:?} THP");
    let mut g = guest(mmu, Backing::Thp);
    let huge = |g: &G| g.kvm.vm_stats()["pages_2m"];
    if mmu != MmuKind::Shadow {
        assert!(huge(&g) > 0, "{what}: THP-backed memory mapped huge");
    }
    let split = g.host.split_huge_pages(g.hva, MEM).unwrap();
    assert!(split > 0, "{what}: {split} huge pages split");
    assert_eq!(huge(&g), 0, "{what}: the split zapped the huge SPTEs");
    g.check_contents(&what);
    assert_eq!(huge(&g), 0, "{what}: refaulted at 4 KiB");
    g.kvm.audit().unwrap();
    let made = g.host.collapse_huge_pages(g.hva, MEM).unwrap();
    assert!(made > 0, "{what}: {made} huge pages collapsed");
    g.kvm.audit().unwrap();
    g.check_contents(&what);
    if mmu != MmuKind::Shadow {
        assert!(huge(&g) > 0, "{what}: huge again after the collapse");
    }
    g.kvm.audit().unwrap();
    // 4 KiB-backed memory is never collapsed.
    let g4 = guest(mmu, Backing::Anon4k);
    assert_eq!(g4.host.collapse_huge_pages(g4.hva, MEM).unwrap(), 0, "{what}");
}

#[test]
fn thp_split_and_collapse_all_mmus() {
    thp_split_and_collapse(MmuKind::Tdp);
    thp_split_and_collapse(MmuKind::LegacyTdp);
    thp_split_and_collapse(MmuKind::Shadow);
}
