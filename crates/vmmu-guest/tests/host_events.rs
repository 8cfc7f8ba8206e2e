//! Host events under a running guest: page migration, swap-out/in, THP split and collapse,
//! KSM merging and the copy-on-write of the shared zero page. The guest-visible effect is
//! that nothing changes — it reads back what it wrote — while KVM's SPTEs were zapped by the
//! MMU notifier and fault back in on the new frames (pf_taken, the audit checks every SPTE
//! against the host mapping).

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
    let flushes = g.kvm.vm_stats()["remote_tlb_flush_requests"];
    let moved = g.host.migrate_pages(g.hva, MEM).unwrap();
    assert!(moved >= PAGES, "{what}: {moved} pages moved");
    assert_ne!(g.host_pfn(gpa), before, "{what}: the page has a new frame");
    assert!(g.kvm.vm_stats()["remote_tlb_flush_requests"] > flushes, "{what}: the notifier zapped and flushed");
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
                let slot = usize::try_from(i).unwrap();
                if rng.gen_bool(0.5) {
                    let v = rng.r#gen::<u64>();
                    k.access(&mut cpu, va, AccessKind::Write, 8, v).unwrap();
                    want[slot] = v;
                } else {
                    let got = k.access(&mut cpu, va, AccessKind::Read, 8, 0).unwrap();
                    assert_eq!(got, want[slot], "{mmu:?} seed {seed}: page {i} after {n} accesses");
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

/// KSM under a running guest: pages with equal contents are merged into shared read-only
/// frames (the notifier zaps KVM's SPTEs); the guest still reads its data, through read-only
/// SPTEs, and its next write to a merged page faults, copies it (COW, notifier again) and
/// lands in a private frame, leaving the other sharers alone.
fn ksm(mmu: MmuKind) {
    let what = format!("{mmu:?} KSM");
    let mut g = common::boot(VmConfig { mmu, ..Default::default() }, Backing::Anon4k, PAGES);
    // With the byte the boot's first touch wrote (i & 0xff at offset 0), the pages hold 256
    // distinct contents: KSM folds them into 256 frames.
    let val = |i: u64| i % 8 + 1;
    for i in 0..PAGES {
        g.k.access(&mut g.cpu, USER_BASE + i * 4096 + 64, AccessKind::Write, 8, val(i)).unwrap();
    }
    let frames = g.host.frames().counts().frames_4k;
    let flushes = g.kvm.vm_stats()["remote_tlb_flush_requests"];
    let merged = g.host.ksm_merge(g.hva, MEM).unwrap();
    let st = g.host.ksm_stats();
    assert!(merged >= PAGES, "{what}: {merged} pages merged");
    assert_eq!((st.pages_shared, st.pages_sharing), (256, PAGES - 256), "{what}: {st:?}");
    assert!(g.host.frames().counts().frames_4k <= frames - (PAGES - 256), "{what}: the duplicates' frames were freed");
    assert!(g.kvm.vm_stats()["remote_tlb_flush_requests"] > flushes, "{what}: the notifier zapped and flushed");
    g.kvm.audit().unwrap();
    let taken = g.cpu.stat.pf_taken;
    for i in 0..PAGES {
        let v = g.k.access(&mut g.cpu, USER_BASE + i * 4096 + 64, AccessKind::Read, 8, 0).unwrap();
        assert_eq!(v, val(i), "{what}: page {i} after the merge");
    }
    assert!(g.cpu.stat.pf_taken > taken, "{what}: the zapped SPTEs faulted back in, read-only");
    let (gpa0, gpa8) = (g.data_gpa(0), g.data_gpa(256));
    assert_eq!(g.host_pfn(gpa0), g.host_pfn(gpa8), "{what}: pages 0 and 256 share a frame");
    g.kvm.audit().unwrap();
    // A write to page 0: a fault, a private copy; page 8 keeps the shared frame and value.
    let taken = g.cpu.stat.pf_taken;
    g.k.access(&mut g.cpu, USER_BASE + 64, AccessKind::Write, 8, 99).unwrap();
    assert!(g.cpu.stat.pf_taken > taken, "{what}: the write to a shared page faulted");
    assert_ne!(g.host_pfn(gpa0), g.host_pfn(gpa8), "{what}: copy on write");
    let gpa512 = g.data_gpa(512);
    assert_eq!(g.host_pfn(gpa8), g.host_pfn(gpa512), "{what}: the other sharers keep the frame");
    let read = |g: &mut G, i: u64| g.k.access(&mut g.cpu, USER_BASE + i * 4096 + 64, AccessKind::Read, 8, 0).unwrap();
    assert_eq!((read(&mut g, 0), read(&mut g, 256)), (99, val(256)), "{what}");
    assert_eq!(g.host.ksm_stats().pages_sharing, st.pages_sharing - 1, "{what}");
    g.kvm.audit().unwrap();
}

#[test]
fn ksm_all_mmus() {
    ksm(MmuKind::Tdp);
    ksm(MmuKind::LegacyTdp);
    ksm(MmuKind::Shadow);
}

/// The shared zero page: a read of never-written guest memory maps the host's zero page
/// (read-only, no frame allocated); the first write faults again and the host replaces it
/// by a private frame (copy-on-write, the notifier zapping KVM's read-only SPTE). The guest
/// kernel clears the frames it hands out, so the reads go to free frames at the top of RAM
/// through its direct map.
fn zero_page_cow(mmu: MmuKind) {
    use vmmu::x86_paging::addr::Gva;
    use vmmu_guest::kernel::DIRECT_MAP;
    let what = format!("{mmu:?} zero page");
    let mut g = common::boot(VmConfig { mmu, ..Default::default() }, Backing::Anon4k, 1);
    g.cpu.set_cpl(0);
    let gpa = |i: u64| MEM - (64 - i) * 4096;
    let va = |i: u64| Gva::new(DIRECT_MAP + gpa(i));
    let frames = g.host.frames().counts().frames_4k;
    for i in 0..64 {
        assert_eq!(g.cpu.read(va(i), 8).unwrap(), 0, "{what}");
    }
    assert_eq!(g.host_pfn(gpa(0)), g.host.frames().zero_pfn().raw(), "{what}: reads map the shared zero page");
    let after_reads = g.host.frames().counts().frames_4k;
    assert!(after_reads - frames < 64, "{what}: the reads allocated no data frames");
    let (taken, flushes) = (g.cpu.stat.pf_taken, g.kvm.vm_stats()["remote_tlb_flush_requests"]);
    for i in 0..64 {
        g.cpu.write(va(i), 8, i + 1).unwrap();
    }
    assert!(g.cpu.stat.pf_taken >= taken + 64, "{what}: each first write faulted (read-only SPTE)");
    assert!(
        g.kvm.vm_stats()["remote_tlb_flush_requests"] > flushes,
        "{what}: the COW notifier zapped the zero-page SPTEs"
    );
    assert_ne!(g.host_pfn(gpa(0)), g.host.frames().zero_pfn().raw(), "{what}: a private frame now");
    assert!(g.host.frames().counts().frames_4k >= after_reads + 64, "{what}: 64 frames allocated by the writes");
    for i in 0..64 {
        assert_eq!(g.cpu.read(va(i), 8).unwrap(), i + 1, "{what}");
    }
    g.cpu.exit_guest();
    g.kvm.audit().unwrap();
}

#[test]
fn zero_page_cow_all_mmus() {
    zero_page_cow(MmuKind::Tdp);
    zero_page_cow(MmuKind::LegacyTdp);
    zero_page_cow(MmuKind::Shadow);
}

/// The VMM process exits under a running VM: the MMU notifier's `release` makes KVM zap
/// every mapping (kvm_mmu_zap_all), the address space is torn down without further
/// notification, and a guest access afterwards fails cleanly (no memory behind the memslot)
/// instead of reaching a freed frame.
fn release_on_exit_mmap(mmu: MmuKind) {
    let what = format!("{mmu:?} release");
    let mut g = guest(mmu, Backing::Anon4k);
    assert!(g.kvm.vm_stats()["pages_4k"] > 0);
    g.cpu.exit_guest();
    g.host.exit_mmap().unwrap();
    let st = g.kvm.vm_stats();
    assert_eq!((st["pages_4k"], st["pages_2m"]), (0, 0), "{what}: every SPTE zapped: {st:?}");
    g.kvm.audit().unwrap();
    let r = g.k.access(&mut g.cpu, USER_BASE + 64, AccessKind::Read, 8, 0);
    assert!(r.is_err(), "{what}: guest memory is gone: {r:?}");
    g.cpu.exit_guest();
}

#[test]
fn release_all_mmus() {
    release_on_exit_mmap(MmuKind::Tdp);
    release_on_exit_mmap(MmuKind::LegacyTdp);
    release_on_exit_mmap(MmuKind::Shadow);
}
