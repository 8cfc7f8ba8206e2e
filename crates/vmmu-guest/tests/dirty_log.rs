//! Dirty logging (KVM_MEM_LOG_DIRTY_PAGES + KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG, the dirty
//! ring) in both of KVM's modes — write protection and D bits + PML — under every MMU: the
//! oracle is the guest kernel's own page tables — the frames behind the pages a workload wrote
//! are exactly the pages logged.

mod common;

use common::{region, Booted as Guest, MEM};
use std::collections::BTreeSet;
use vmmu::host::Backing;
use vmmu::memslot::MemslotFlags;
use vmmu::{MmuKind, VmConfig};
use vmmu_guest::kernel::USER_BASE;
use vmmu_guest::workload::{run, KernelSpace, Workload};

/// Boots a guest whose process has `pages` pages mapped and touched once; `pml` is
/// kvm_intel.pml (used only where EPT A/D bits are: TDP and legacy TDP).
fn guest(mmu: MmuKind, pml: bool, backing: Backing, pages: u64) -> Guest {
    common::boot(VmConfig { mmu, pml, ..Default::default() }, backing, pages)
}

impl Guest {
    fn set_logging(&self, on: bool) {
        let flags = if on { MemslotFlags::LOG_DIRTY_PAGES } else { MemslotFlags::empty() };
        self.kvm.set_user_memory_region(region(self.hva, flags)).unwrap();
    }

    fn write_pages(&mut self, first: u64, n: u64) {
        let space = &mut KernelSpace { kernel: &mut self.k, cpu: &mut self.cpu };
        run(Workload::ReTouch, space, USER_BASE + first * 4096, n).unwrap();
    }

    fn read_pages(&mut self, first: u64, n: u64) {
        let space = &mut KernelSpace { kernel: &mut self.k, cpu: &mut self.cpu };
        run(Workload::Read, space, USER_BASE + first * 4096, n).unwrap();
    }

    /// The gfns behind user pages [first, first + n), from the guest's own PTEs.
    fn gfns(&mut self, first: u64, n: u64) -> BTreeSet<u64> {
        (first..first + n)
            .map(|i| {
                let pte = self.k.user_pte(&mut self.cpu, self.pid, USER_BASE + i * 4096).unwrap().unwrap();
                (pte & 0x000f_ffff_ffff_f000) >> 12
            })
            .collect()
    }

    /// The gfns of the guest page tables that translate user pages [first, first + n): under
    /// TDP the walk itself writes them (EPT with A/D bits treats guest paging-structure
    /// accesses as writes; NPT as KVM models it), so they are dirtied by any access.
    fn table_gfns(&self, first: u64, n: u64) -> BTreeSet<u64> {
        (first..first + n).flat_map(|i| self.walk_tables(i)).collect()
    }

    /// The gfns of the four guest tables (PML4 first, PT last) that map user page `i`.
    fn walk_tables(&self, i: u64) -> [u64; 4] {
        let root = self.k.processes().iter().find(|p| p.pid == self.pid).unwrap().root.raw();
        let host = &self.host;
        let va = USER_BASE + i * 4096;
        let mut out = [0; 4];
        let mut table = root & !0xfff;
        for (n, level) in (1..=4u32).rev().enumerate() {
            out[n] = table >> 12;
            let idx = (va >> (12 + 9 * (level - 1))) & 511;
            let e = host.read(vmmu::host::Hva(self.hva.raw() + table + idx * 8), 8).unwrap();
            table = e & 0x000f_ffff_ffff_f000;
        }
        out
    }

    /// Checks a harvest: exactly `want`, plus (under TDP) page-table pages of the walks.
    fn check(&self, got: &BTreeSet<u64>, want: &BTreeSet<u64>, tables: &BTreeSet<u64>, what: &str) {
        let mmu = self.kvm.config().mmu;
        assert!(got.is_superset(want), "{mmu:?} {what}: missing {:?}", want.difference(got).collect::<Vec<_>>());
        let extra: BTreeSet<u64> = got.difference(want).copied().collect();
        if mmu == MmuKind::Shadow {
            assert!(extra.is_empty(), "{mmu:?} {what}: extra {extra:?}");
        } else {
            assert!(extra.is_subset(tables), "{mmu:?} {what}: extra {extra:?}, tables {tables:?}");
        }
    }

    /// KVM_GET_DIRTY_LOG on slot 0, as a set of gfns.
    fn harvest(&self) -> BTreeSet<u64> {
        bits_to_set(&self.kvm.get_dirty_log(0).unwrap())
    }
}

fn logs_exactly_the_written_pages(mmu: MmuKind, pml: bool) {
    let mut g = guest(mmu, pml, Backing::Anon4k, 512);
    assert_eq!(g.kvm.pml_in_use(), pml && mmu != MmuKind::Shadow);
    let pml = g.kvm.pml_in_use();
    // The oracle: look the frames up before logging starts (lookups only read).
    let a = g.gfns(0, 100);
    let b = g.gfns(300, 50);
    g.set_logging(true);
    g.harvest();
    assert!(g.harvest().is_empty(), "{mmu:?}: nothing ran, nothing is dirty");

    g.write_pages(0, 100);
    g.read_pages(100, 300);
    g.write_pages(300, 50);
    let want: BTreeSet<u64> = a.union(&b).copied().collect();
    let tables = g.table_gfns(0, 512);
    // A flags-only update that keeps logging on keeps the pending log.
    g.set_logging(true);
    let got = g.harvest();
    g.check(&got, &want, &tables, "first harvest");
    assert!(g.harvest().is_empty(), "{mmu:?}: the harvest cleared the log");

    // Harvesting re-armed the pages (write protection, or D bits cleared under PML): the
    // next write to each is logged too.
    let fast = g.cpu.stat.pf_fast;
    let taken = g.cpu.stat.pf_taken;
    g.write_pages(0, 100);
    let got = g.harvest();
    g.check(&got, &a, &tables, "second round");
    if pml {
        assert_eq!(g.cpu.stat.pf_taken, taken, "{mmu:?}: PML logs re-writes without a fault");
    } else {
        assert!(g.cpu.stat.pf_taken - taken >= 100, "{mmu:?}: each re-write faulted");
    }
    if mmu != MmuKind::Shadow && !pml {
        assert!(g.cpu.stat.pf_fast - fast >= 100, "{mmu:?}: re-writes are fixed by fast page fault");
    }

    // Demand paging while logging: the new data pages and the leaf table the guest kernel
    // stored PTEs into (an emulated, write-tracked store under shadow paging) are logged.
    g.k.mmap(g.pid, USER_BASE + 512 * 4096, 64 * 4096, true).unwrap();
    g.write_pages(512, 64);
    let mut want = g.gfns(512, 64);
    want.insert(g.walk_tables(512)[3]);
    let got = g.harvest();
    assert!(got.is_superset(&want), "{mmu:?}: demand paging: missing {:?}", want.difference(&got).collect::<Vec<_>>());

    // Reads alone dirty nothing.
    g.read_pages(0, 512);
    let got = g.harvest();
    g.check(&got, &BTreeSet::new(), &tables, "reads");
    g.kvm.audit().unwrap();

    // Logging off: writes fault no more and the log is gone.
    g.set_logging(false);
    g.write_pages(0, 100);
    let taken = g.cpu.stat.pf_taken;
    g.write_pages(0, 100);
    assert_eq!(g.cpu.stat.pf_taken, taken, "{mmu:?}: writable again");
    assert!(g.kvm.get_dirty_log(0).is_err(), "{mmu:?}: no log without LOG_DIRTY_PAGES");
    g.kvm.audit().unwrap();
}

#[test]
fn tdp_logs_exactly_the_written_pages() {
    logs_exactly_the_written_pages(MmuKind::Tdp, false);
}

#[test]
fn tdp_pml_logs_exactly_the_written_pages() {
    logs_exactly_the_written_pages(MmuKind::Tdp, true);
}

#[test]
fn legacy_tdp_logs_exactly_the_written_pages() {
    logs_exactly_the_written_pages(MmuKind::LegacyTdp, false);
}

#[test]
fn legacy_tdp_pml_logs_exactly_the_written_pages() {
    logs_exactly_the_written_pages(MmuKind::LegacyTdp, true);
}

#[test]
fn shadow_logs_exactly_the_written_pages() {
    logs_exactly_the_written_pages(MmuKind::Shadow, true);
}

fn huge_pages_are_logged_at_4k_and_come_back_when_logging_stops(eager_page_split: bool, pml: bool) {
    let pages = 4096;
    let cfg = VmConfig { eager_page_split, pml, ..Default::default() };
    let mut g = common::boot(cfg, Backing::Thp, pages);
    let huge = g.kvm.vm_stats()["pages_2m"];
    assert!(huge > 0);
    let w = g.gfns(1000, 3);
    g.set_logging(true);
    let st = g.kvm.vm_stats();
    if eager_page_split {
        assert_eq!(st["pages_2m"], 0, "eager split: no huge SPTE left {st:?}");
        assert!(st["pages_4k"] >= huge * 512, "{st:?}");
    } else {
        assert_eq!(st["pages_2m"], huge, "lazy: huge SPTEs stay until written {st:?}");
    }
    g.harvest();
    let (fast, fixed, taken) = (g.cpu.stat.pf_fast, g.cpu.stat.pf_fixed, g.cpu.stat.pf_taken);
    g.write_pages(1000, 3);
    if eager_page_split && pml {
        assert_eq!(g.cpu.stat.pf_taken, taken, "eager split + PML: the split SPTEs stay writable, D cleared");
    } else if eager_page_split {
        // pf_fixed counts fast fixes too: every fix was a fast one, none split a page.
        assert!(g.cpu.stat.pf_fast - fast >= 3, "eager split: 4 KiB fast page faults");
        assert_eq!(g.cpu.stat.pf_fixed - fixed, g.cpu.stat.pf_fast - fast, "eager split: no slow-path fault");
    } else {
        assert!(g.cpu.stat.pf_fixed > fixed, "lazy: the first write splits in the slow path");
    }
    let tables = g.table_gfns(1000, 3);
    let got = g.harvest();
    g.check(&got, &w, &tables, "one 4 KiB page per write, not the whole 2 MiB page");
    let st = g.kvm.vm_stats();
    assert!(st["pages_4k"] >= 3, "the written huge page was split: {st:?}");
    g.kvm.audit().unwrap();

    // Logging off: kvm_mmu_recover_huge_pages makes the huge pages whole again in place
    // (no refault); a write-protected one is made writable by a fast page fault.
    g.set_logging(false);
    let st = g.kvm.vm_stats();
    assert!(st["pages_2m"] >= huge, "huge pages recovered in place: {st:?}");
    g.kvm.audit().unwrap();
    let (fast, fixed) = (g.cpu.stat.pf_fast, g.cpu.stat.pf_fixed);
    g.write_pages(0, pages);
    assert_eq!(g.cpu.stat.pf_fixed - fixed, g.cpu.stat.pf_fast - fast, "no slow-path fault after recovery");
    assert!(g.cpu.stat.pf_fixed - fixed <= u64::try_from(huge).unwrap(), "at most one fast fault per huge page");
    assert!(g.kvm.vm_stats()["pages_2m"] >= huge, "still huge");
    g.kvm.audit().unwrap();
}

/// With 4 KiB host pages nothing can become huge when logging stops: KVM keeps every SPTE
/// (`kvm_mmu_zap_collapsible_sptes` / `recover_huge_pages` find nothing to do), so the next
/// write to each page is one fault that makes the SPTE writable again (a fast page fault
/// under TDP), or none (PML: W kept, D cleared) — not a refault of the whole slot.
fn disabling_logging_keeps_4k_sptes(mmu: MmuKind, pml: bool) {
    let pages = 256;
    let mut g = guest(mmu, pml, Backing::Anon4k, pages);
    g.set_logging(true);
    g.write_pages(0, pages);
    g.harvest();
    let pml = g.kvm.pml_in_use();
    let before = g.kvm.vm_stats();
    g.set_logging(false);
    let after = g.kvm.vm_stats();
    assert_eq!(after["pages_4k"], before["pages_4k"], "{mmu:?}: every SPTE kept");
    // Under TDP the walk's A/D updates write the guest's page tables too (EPT A/D).
    let tables = if mmu == MmuKind::Shadow { 0 } else { g.table_gfns(0, pages).len() as u64 };
    let (taken, fast, fixed) = (g.cpu.stat.pf_taken, g.cpu.stat.pf_fast, g.cpu.stat.pf_fixed);
    g.write_pages(0, pages);
    let faults = g.cpu.stat.pf_taken - taken;
    if pml {
        assert_eq!(faults, 0, "{mmu:?} PML: the SPTEs stayed writable");
    } else {
        assert!((pages..=pages + tables).contains(&faults), "{mmu:?}: one fault per write-protected page: {faults}");
        assert_eq!(g.cpu.stat.pf_fixed - fixed, faults, "{mmu:?}: each fixed in place");
        // Shadow paging has no fast page fault (FNAME(page_fault) does not try it).
        let want_fast = if mmu == MmuKind::Shadow { 0 } else { faults };
        assert_eq!(g.cpu.stat.pf_fast - fast, want_fast, "{mmu:?}: fast page faults");
    }
    assert_eq!(g.kvm.vm_stats()["pages_4k"], before["pages_4k"], "{mmu:?}: no SPTE made again");
    g.kvm.audit().unwrap();
}

#[test]
fn disabling_logging_keeps_4k_sptes_all_mmus() {
    for mmu in [MmuKind::Tdp, MmuKind::LegacyTdp, MmuKind::Shadow] {
        disabling_logging_keeps_4k_sptes(mmu, false);
    }
    disabling_logging_keeps_4k_sptes(MmuKind::Tdp, true);
}

#[test]
fn huge_pages_eager_split() {
    huge_pages_are_logged_at_4k_and_come_back_when_logging_stops(true, false);
}

#[test]
fn huge_pages_lazy_split() {
    huge_pages_are_logged_at_4k_and_come_back_when_logging_stops(false, false);
}

#[test]
fn huge_pages_eager_split_pml() {
    huge_pages_are_logged_at_4k_and_come_back_when_logging_stops(true, true);
}

#[test]
fn huge_pages_lazy_split_pml() {
    huge_pages_are_logged_at_4k_and_come_back_when_logging_stops(false, true);
}

#[test]
fn get_dirty_log_rejects_bad_slots() {
    let g = guest(MmuKind::Tdp, true, Backing::Anon4k, 1);
    let e = g.kvm.get_dirty_log(7).unwrap_err().to_string();
    assert!(e.contains('7'), "{e}");
    let e = g.kvm.get_dirty_log(0).unwrap_err().to_string();
    assert!(e.contains("LOG_DIRTY_PAGES"), "{e}");
}

/// Dirty completeness (DESIGN §3): with another thread harvesting the log while the vCPU
/// writes, every write shows up in a harvest that returned after the write — the last harvest
/// of a page may race with the write, but then that same harvest or a later one reports it.
fn completeness_with_racing_harvests(mmu: MmuKind, pml: bool, writes: &[u16]) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let pages = 256u64;
    let mut g = guest(mmu, pml, Backing::Anon4k, pages);
    let gfn: Vec<u64> = (0..pages).map(|i| g.gfns(i, 1).into_iter().next().unwrap()).collect();
    g.set_logging(true);
    g.harvest();
    let kvm = g.kvm.clone();
    let done_harvests = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let mut harvests: Vec<BTreeSet<u64>> = Vec::new();
    let mut log: Vec<(u64, usize)> = Vec::new();
    std::thread::scope(|s| {
        let harvester = s.spawn(|| {
            let mut out = Vec::new();
            while !stop.load(Ordering::Acquire) {
                out.push(bits_to_set(&kvm.get_dirty_log(0).unwrap()));
                done_harvests.fetch_add(1, Ordering::SeqCst);
                std::thread::yield_now();
            }
            out
        });
        for &w in writes {
            let p = u64::from(w) % pages;
            g.write_pages(p, 1);
            log.push((p, done_harvests.load(Ordering::SeqCst)));
        }
        stop.store(true, Ordering::Release);
        harvests = harvester.join().unwrap();
    });
    harvests.push(g.harvest());
    check_every_write_harvested(&format!("{mmu:?}"), &log, &harvests, &gfn);
    g.kvm.audit().unwrap();
}

/// The completeness oracle: write `i` to page `p`, made when `h` harvests had completed
/// (`log[i] = (p, h)`), shows up in harvest `h` or a later one.
fn check_every_write_harvested(what: &str, log: &[(u64, usize)], harvests: &[BTreeSet<u64>], gfn: &[u64]) {
    for (i, &(p, h)) in log.iter().enumerate() {
        let g = gfn[usize::try_from(p).unwrap()];
        assert!(
            harvests[h.min(harvests.len() - 1)..].iter().any(|set| set.contains(&g)),
            "{what}: write #{i} to page {p} (gfn {g:#x}) after {h} harvests is in no later harvest"
        );
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 12, ..Default::default() })]

    #[test]
    fn dirty_completeness_with_racing_harvests(
        writes in proptest::collection::vec(0u16..256, 1..400),
        mmu in proptest::sample::select(vec![MmuKind::Tdp, MmuKind::LegacyTdp, MmuKind::Shadow]),
        pml: bool,
    ) {
        completeness_with_racing_harvests(mmu, pml, &writes);
    }
}

fn bits_to_set(bm: &[u64]) -> BTreeSet<u64> {
    bm.iter()
        .enumerate()
        .flat_map(|(w, &bits)| (0..64).filter(move |b| bits & (1 << b) != 0).map(move |b| w as u64 * 64 + b))
        .collect()
}

/// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with INITIALLY_SET: enabling logging marks every page
/// and protects nothing; GET only reads; CLEAR clears and write-protects exactly what it is
/// given, so only those pages fault (and are logged) on their next write.
fn manual_protect_initially_set(mmu: MmuKind, pml: bool) {
    let mut g = guest(mmu, pml, Backing::Anon4k, 512);
    g.kvm
        .enable_manual_dirty_log_protect(
            (vmmu::ManualDirtyLog::MANUAL_PROTECT_ENABLE | vmmu::ManualDirtyLog::INITIALLY_SET).bits(),
        )
        .unwrap();
    g.set_logging(true);
    let npages = MEM / 4096;
    let bm = g.kvm.get_dirty_log(0).unwrap();
    assert_eq!(bits_to_set(&bm).len() as u64, npages, "{mmu:?}: initially set");
    assert_eq!(g.kvm.get_dirty_log(0).unwrap(), bm, "{mmu:?}: GET does not clear under manual protect");

    // Nothing was write-protected: writes take no faults.
    let taken = g.cpu.stat.pf_taken;
    g.write_pages(0, 512);
    assert_eq!(g.cpu.stat.pf_taken, taken, "{mmu:?}: INITIALLY_SET protects nothing up front");

    // (The oracle's lookups walk the guest's tables, which dirties them under TDP: do them first.)
    let a = g.gfns(0, 40);
    // Clear the whole log: every mapped page is write-protected now.
    g.kvm.clear_dirty_log(0, 0, npages, &vec![u64::MAX; npages.div_ceil(64) as usize]).unwrap();
    let got = bits_to_set(&g.kvm.get_dirty_log(0).unwrap());
    let tables = g.table_gfns(0, 512);
    g.check(&got, &BTreeSet::new(), &tables, "after clearing everything");

    g.write_pages(0, 40);
    let got = bits_to_set(&g.kvm.get_dirty_log(0).unwrap());
    g.check(&got, &a, &tables, "writes after the clear");

    // Clear only the first 64-page block's bits: pages outside it stay logged (and writable).
    let first = *a.iter().next().unwrap();
    let block = first / 64 * 64;
    let word = g.kvm.get_dirty_log(0).unwrap()[(block / 64) as usize];
    g.kvm.clear_dirty_log(0, block, 64, &[word]).unwrap();
    let left = bits_to_set(&g.kvm.get_dirty_log(0).unwrap());
    assert!(left.iter().all(|&p| p < block || p >= block + 64), "{mmu:?}: block cleared");
    assert_eq!(left, got.iter().copied().filter(|&p| p < block || p >= block + 64).collect(), "{mmu:?}: rest kept");

    // Misuse is reported.
    for (fp, n, why) in [(1, 64, "multiple of 64"), (0, 63, "multiple of 64"), (npages, 64, "past the slot")] {
        let e = g.kvm.clear_dirty_log(0, fp, n, &[u64::MAX; 2]).unwrap_err().to_string();
        assert!(e.contains(why), "{e}");
    }
    assert!(g.kvm.enable_manual_dirty_log_protect(2).is_err(), "INITIALLY_SET alone");
    assert!(g.kvm.enable_manual_dirty_log_protect(8).is_err(), "unknown flag");
    g.kvm.audit().unwrap();
}

#[test]
fn tdp_manual_protect_initially_set() {
    manual_protect_initially_set(MmuKind::Tdp, false);
    manual_protect_initially_set(MmuKind::Tdp, true);
}

#[test]
fn shadow_manual_protect_initially_set() {
    manual_protect_initially_set(MmuKind::Shadow, true);
}

#[test]
fn legacy_tdp_manual_protect_initially_set() {
    manual_protect_initially_set(MmuKind::LegacyTdp, false);
    manual_protect_initially_set(MmuKind::LegacyTdp, true);
}

/// A guest whose vCPU has a dirty ring of `ring_bytes`.
fn ring_guest(mmu: MmuKind, pml: bool, pages: u64, ring_bytes: u32) -> Guest {
    let cfg = VmConfig { mmu, pml, ..Default::default() };
    common::boot_with(cfg, Backing::Anon4k, pages, |kvm| kvm.enable_dirty_ring(ring_bytes).unwrap())
}

impl Guest {
    /// Userspace's harvest of vCPU 0's ring (gfns of slot 0), then KVM_RESET_DIRTY_RINGS.
    fn harvest_ring(&self) -> BTreeSet<u64> {
        let ring = self.kvm.dirty_ring(self.cpu.id()).expect("a dirty ring");
        let mut got = BTreeSet::new();
        ring.collect(|g| {
            assert_eq!(g.slot, 0);
            got.insert(g.offset);
        });
        self.kvm.reset_dirty_rings();
        got
    }

    /// Writes user page `p`, harvesting the ring whenever the vCPU exits because it is full.
    /// Returns the harvests made on the way.
    fn write_page_ring(&mut self, p: u64) -> Vec<BTreeSet<u64>> {
        let mut harvests = Vec::new();
        loop {
            let space = &mut KernelSpace { kernel: &mut self.k, cpu: &mut self.cpu };
            match run(Workload::ReTouch, space, USER_BASE + p * 4096, 1) {
                Ok(_) => return harvests,
                Err(vmmu_guest::kernel::KernelError::Guest(vmmu::GuestError::Vm(vmmu::VmError::DirtyRingFull {
                    vcpu,
                }))) => {
                    assert_eq!(vcpu, self.cpu.id());
                    harvests.push(self.harvest_ring());
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}

/// KVM_CAP_DIRTY_LOG_RING: written pages are pushed to the vCPU's ring, a full ring stops
/// the vCPU (KVM_EXIT_DIRTY_RING_FULL) until userspace collects and resets, and a reset
/// re-arms logging for the collected pages.
fn dirty_ring_logs_writes_and_stops_when_full(mmu: MmuKind, pml: bool) {
    let pages = 1024;
    let mut g = ring_guest(mmu, pml, pages, 16384);
    let ring = g.kvm.dirty_ring(g.cpu.id()).unwrap();
    assert_eq!(ring.size(), 1024);
    let gfn: Vec<u64> = (0..pages).map(|i| g.gfns(i, 1).into_iter().next().unwrap()).collect();
    g.set_logging(true);
    let e = g.kvm.get_dirty_log(0).unwrap_err().to_string();
    assert!(e.contains("dirty ring"), "{e}");
    g.harvest_ring();

    // A few writes: exactly their pages (plus, under TDP, the tables the walks dirtied).
    for p in 0..50 {
        assert!(g.write_page_ring(p).is_empty(), "{mmu:?}: 50 pages do not fill the ring");
    }
    let want: BTreeSet<u64> = gfn[..50].iter().copied().collect();
    let tables = g.table_gfns(0, 50);
    let got = g.harvest_ring();
    g.check(&got, &want, &tables, "ring");
    g.kvm.audit().unwrap();

    // Re-writing the collected pages after the reset logs them again.
    for p in 0..50 {
        g.write_page_ring(p);
    }
    let got = g.harvest_ring();
    g.check(&got, &want, &tables, "ring after reset");

    // More pages than the soft limit: the vCPU exits, we harvest, it goes on; nothing lost.
    let mut all = BTreeSet::new();
    for p in 0..pages {
        all.extend(g.write_page_ring(p).into_iter().flatten());
    }
    all.extend(g.harvest_ring());
    let want: BTreeSet<u64> = gfn.iter().copied().collect();
    assert!(all.is_superset(&want), "{mmu:?}: missing {:?}", want.difference(&all).collect::<Vec<_>>());
    assert_eq!(
        ring.overflows.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the soft limit kept the ring from overflowing"
    );
    g.kvm.audit().unwrap();
}

#[test]
fn dirty_ring_tdp() {
    dirty_ring_logs_writes_and_stops_when_full(MmuKind::Tdp, false);
    dirty_ring_logs_writes_and_stops_when_full(MmuKind::Tdp, true);
}

#[test]
fn dirty_ring_legacy_tdp_and_shadow() {
    dirty_ring_logs_writes_and_stops_when_full(MmuKind::LegacyTdp, true);
    dirty_ring_logs_writes_and_stops_when_full(MmuKind::Shadow, false);
}

#[test]
fn dirty_ring_rejects_bad_sizes() {
    let frames = std::sync::Arc::new(vmmu::host::FrameAllocator::new(1 << 30).unwrap());
    let host = std::sync::Arc::new(vmmu::host::HostMm::new(frames).unwrap());
    for (pml, bytes, why) in [
        (false, 4000, "power of two"),
        (false, 2048, "at least 4096"),
        (true, 4096, "reserved"),
        (false, 1 << 21, "at most"),
    ] {
        let kvm = vmmu::Kvm::new(VmConfig { pml, ..Default::default() }, host.clone()).unwrap();
        let e = kvm.enable_dirty_ring(bytes).unwrap_err().to_string();
        assert!(e.contains(why), "{bytes}: {e}");
    }
    let kvm = vmmu::Kvm::new(VmConfig::default(), host.clone()).unwrap();
    kvm.enable_dirty_ring(1 << 16).unwrap();
    assert!(kvm.enable_dirty_ring(1 << 16).unwrap_err().to_string().contains("already"));
    let kvm = vmmu::Kvm::new(VmConfig::default(), host).unwrap();
    let _vcpu = kvm.create_vcpu().unwrap();
    assert!(kvm.enable_dirty_ring(1 << 16).unwrap_err().to_string().contains("before any vCPU"));
}

/// Dirty completeness with the ring: another thread collects and resets the rings while the
/// vCPU writes; every write appears in a collection made after it started.
fn ring_completeness_with_racing_resets(mmu: MmuKind, pml: bool, writes: &[u16]) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let pages = 256u64;
    let mut g = ring_guest(mmu, pml, pages, 16384);
    let gfn: Vec<u64> = (0..pages).map(|i| g.gfns(i, 1).into_iter().next().unwrap()).collect();
    g.set_logging(true);
    g.harvest_ring();
    let kvm = g.kvm.clone();
    let ring = kvm.dirty_ring(g.cpu.id()).unwrap();
    let done = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let mut harvests: Vec<BTreeSet<u64>> = Vec::new();
    let mut log: Vec<(u64, usize)> = Vec::new();
    std::thread::scope(|s| {
        let harvester = s.spawn(|| {
            let mut out = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let mut set = BTreeSet::new();
                ring.collect(|g| {
                    set.insert(g.offset);
                });
                kvm.reset_dirty_rings();
                out.push(set);
                done.fetch_add(1, Ordering::SeqCst);
                std::thread::yield_now();
            }
            out
        });
        for &w in writes {
            let p = u64::from(w) % pages;
            let before = done.load(Ordering::SeqCst);
            loop {
                let space = &mut KernelSpace { kernel: &mut g.k, cpu: &mut g.cpu };
                match run(Workload::ReTouch, space, USER_BASE + p * 4096, 1) {
                    Ok(_) => break,
                    // Full: the other thread is collecting; run again once it has.
                    Err(vmmu_guest::kernel::KernelError::Guest(vmmu::GuestError::Vm(
                        vmmu::VmError::DirtyRingFull { .. },
                    ))) => std::thread::yield_now(),
                    Err(e) => panic!("{e}"),
                }
            }
            log.push((p, before));
        }
        stop.store(true, Ordering::Release);
        harvests = harvester.join().unwrap();
    });
    harvests.push(g.harvest_ring());
    check_every_write_harvested(&format!("{mmu:?} pml={pml}"), &log, &harvests, &gfn);
    g.kvm.audit().unwrap();
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 12, ..Default::default() })]

    #[test]
    fn dirty_ring_completeness_with_racing_resets(
        writes in proptest::collection::vec(0u16..256, 1..400),
        mmu in proptest::sample::select(vec![MmuKind::Tdp, MmuKind::LegacyTdp, MmuKind::Shadow]),
        pml: bool,
    ) {
        ring_completeness_with_racing_resets(mmu, pml, &writes);
    }
}

/// The legacy TDP MMU over THP: while logging, writes map 4 KiB in direct pages; when it
/// stops, `kvm_mmu_zap_collapsible_sptes` drops exactly those (direct, below the level the
/// host allows), so the next accesses map 2 MiB again. Nothing else is zapped.
#[test]
fn legacy_tdp_zaps_only_collapsible_sptes_when_logging_stops() {
    let pages = 2048;
    let mut g = guest(MmuKind::LegacyTdp, false, Backing::Thp, pages);
    g.set_logging(true);
    // A quarter of the pages: the huge pages behind the rest are not written.
    g.write_pages(0, pages / 4);
    g.harvest();
    let logging = g.kvm.vm_stats();
    assert!(logging["pages_4k"] >= pages as i64 / 4, "writes while logging map 4 KiB: {logging:?}");
    assert!(logging["pages_2m"] > 0, "regions not written while logging stay huge: {logging:?}");
    g.set_logging(false);
    let off = g.kvm.vm_stats();
    assert_eq!(off["pages_4k"], 0, "every 4 KiB SPTE of a THP-backed slot is collapsible: {off:?}");
    assert_eq!(off["pages_2m"], logging["pages_2m"], "huge SPTEs are kept: {off:?}");
    g.kvm.audit().unwrap();
    g.write_pages(0, pages);
    let after = g.kvm.vm_stats();
    assert!(after["pages_2m"] > off["pages_2m"] && after["pages_4k"] == 0, "huge again: {after:?}");
    g.kvm.audit().unwrap();
}
