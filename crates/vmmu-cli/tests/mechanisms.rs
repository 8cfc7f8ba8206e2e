//! The TDP MMU's mechanisms, each shown by its observable effect (a stat, an SPTE, a guest
//! result) on a VM built from an inline scenario: MMIO SPTEs and their generation, read-only
//! memslots, the zero page's copy-on-write, fast page fault, host invalidations, memslot
//! deletion, 5-level TDP, NPT, EPT without A/D bits, huge pages and the NX mitigation.

use vmmu::x86_paging::addr::Gva;
use vmmu::{GuestError, Vcpu};
use vmmu_cli::machine::{build, Machine};
use vmmu_cli::scenario::Scenario;

fn machine(extra_vm: &str, slots: &str, guest: &str) -> Machine {
    let toml = format!("name = \"t\"\n[vm]\n{extra_vm}\n{slots}\n[guest]\nlayout = \"identity\"\n{guest}\n");
    let s = Scenario::parse(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    build(&s, None).unwrap_or_else(|e| panic!("{e}"))
}

fn simple(extra_vm: &str) -> Machine {
    machine(extra_vm, "[[memslot]]\ngpa = 0\nsize = \"64MiB\"\n", "")
}

fn st(v: &Vcpu, name: &str) -> i64 {
    v.stats()[name]
}

fn vmst(m: &Machine, name: &str) -> i64 {
    m.kvm.vm_stats()[name]
}

#[test]
fn mmio_spte_is_created_cached_and_regenerated() {
    let mut m =
        machine("", "[[memslot]]\ngpa = 0\nsize = \"64MiB\"\n[[mmio]]\ngpa = \"0x80000000\"\nsize = \"4KiB\"\n", "");
    let v = &mut m.vcpus[0];
    let dev = Gva::new(0x8000_0000);
    v.write(dev, 4, 0x1234).unwrap();
    assert_eq!(st(v, "pf_mmio_spte_created"), 1);
    assert_eq!(st(v, "pf_emulate"), 1);
    assert_eq!(st(v, "mmio_exits"), 1);
    // The MMIO SPTE now turns the next access into a misconfig exit handled without a fault.
    let taken = st(v, "pf_taken");
    assert_eq!(v.read(dev, 4).unwrap(), 0x1234, "the latch device reads back the write");
    assert_eq!(st(v, "pf_taken"), taken, "MMIO SPTE hit: no page fault");
    assert_eq!(st(v, "mmio_exits"), 2);
    // A memslot change bumps the generation: the old MMIO SPTE is stale and is rebuilt.
    let hva = m.kvm.host().mmap(4096, vmmu::host::Backing::Anon4k, true, false).unwrap();
    m.kvm
        .set_user_memory_region(vmmu::memslot::UserspaceMemoryRegion {
            slot: 7,
            flags: Default::default(),
            guest_phys_addr: 0x9000_0000,
            memory_size: 4096,
            userspace_addr: hva,
        })
        .unwrap();
    let v = &mut m.vcpus[0];
    assert_eq!(v.read(dev, 4).unwrap(), 0x1234);
    assert_eq!(st(v, "pf_mmio_spte_created"), 2, "stale generation: a new MMIO SPTE");
    m.kvm.audit().unwrap();
}

#[test]
fn mmio_without_caching_emulates_every_time() {
    let mut m = machine(
        "mmio_caching = false",
        "[[memslot]]\ngpa = 0\nsize = \"64MiB\"\n[[mmio]]\ngpa = \"0x80000000\"\nsize = \"4KiB\"\n",
        "",
    );
    let v = &mut m.vcpus[0];
    for i in 0..3 {
        v.write(Gva::new(0x8000_0000), 8, i).unwrap();
    }
    assert_eq!(st(v, "pf_mmio_spte_created"), 0);
    assert_eq!(st(v, "pf_emulate"), 3);
    assert_eq!(v.read(Gva::new(0x8000_0000), 8).unwrap(), 2);
}

#[test]
fn an_address_the_guest_did_not_map_is_a_guest_page_fault() {
    let mut m = simple("");
    let v = &mut m.vcpus[0];
    let e = v.write(Gva::new(0x8000_0000), 4, 1).unwrap_err();
    match e {
        GuestError::Exception(vmmu::hw::cpu::Exception::PageFault { cr2, error_code }) => {
            assert_eq!(cr2, 0x8000_0000);
            assert_eq!(error_code.0, 0x2, "not present, write, supervisor");
            assert_eq!(v.cr2(), 0x8000_0000);
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(st(v, "pf_guest"), 0, "delivered by the hardware under TDP, not injected by KVM");
}

#[test]
fn readonly_memslot_reads_and_turns_writes_into_mmio_exits() {
    let mut m = machine(
        "",
        "[[memslot]]\ngpa = 0\nsize = \"64MiB\"\n[[memslot]]\ngpa = \"64MiB\"\nsize = \"2MiB\"\nreadonly = true\n",
        "",
    );
    // The VMM loads the ROM contents through its own mapping.
    let hva = m.slots[1].2;
    m.kvm.host().write(hva, 8, 0xfeed).unwrap();
    let v = &mut m.vcpus[0];
    let rom = Gva::new(64 << 20);
    assert_eq!(v.read(rom, 8).unwrap(), 0xfeed);
    let fixed = st(v, "pf_fixed");
    v.write(rom, 8, 0xbad).unwrap();
    assert_eq!(st(v, "mmio_exits"), 1, "a write to a read-only memslot exits to the VMM");
    assert_eq!(st(v, "pf_emulate"), 1);
    assert_eq!(st(v, "pf_fixed"), fixed);
    assert_eq!(v.read(rom, 8).unwrap(), 0xfeed, "ROM unchanged");
    m.kvm.audit().unwrap();
}

#[test]
fn read_then_write_breaks_the_zero_page_cow() {
    let mut m = simple("");
    let a = Gva::new(m.data_start);
    let v = &mut m.vcpus[0];
    // Warm up: the guest's page-table pages and a neighbour get mapped first.
    v.read(Gva::new(m.data_start + 4096), 8).unwrap();
    let (t0, f0) = (st(v, "pf_taken"), st(v, "pf_fixed"));
    assert_eq!(v.read(a, 8).unwrap(), 0);
    assert_eq!((st(v, "pf_taken") - t0, st(v, "pf_fixed") - f0), (1, 1), "read fault maps the zero page");
    v.write(a, 8, 42).unwrap();
    // Write fault: get_user_pages breaks COW, the MMU notifier zaps the read-only SPTE and the
    // racing fault is stale (retried); the retry maps the new page.
    assert_eq!(st(v, "pf_taken") - t0, 3);
    assert_eq!(st(v, "pf_fixed") - f0, 2);
    assert_eq!(v.read(a, 8).unwrap(), 42);
    assert!(vmst(&m, "remote_tlb_flush_requests") >= 1);
    m.kvm.audit().unwrap();
}

#[test]
fn fast_page_fault_fixes_write_protected_sptes_without_the_slow_path() {
    let mut m = simple("");
    let base = m.data_start;
    let v = &mut m.vcpus[0];
    for p in 0..64 {
        v.write(Gva::new(base + p * 4096), 8, p).unwrap();
    }
    m.kvm.mmu_slot_remove_write_access(0).unwrap();
    let v = &mut m.vcpus[0];
    let (taken, fast) = (st(v, "pf_taken"), st(v, "pf_fast"));
    for p in 0..64 {
        assert_eq!(v.read(Gva::new(base + p * 4096), 8).unwrap(), p);
    }
    // Data reads need no fault; only the guest's page-table pages do (the walk's accesses to
    // them are writes for EPT A/D purposes), and those are fixed by the fast path.
    let pt = st(v, "pf_taken") - taken;
    assert!(pt <= 8 && st(v, "pf_fast") - fast == pt, "{:?}", v.stats());
    let (taken, fast, fixed) = (st(v, "pf_taken"), st(v, "pf_fast"), st(v, "pf_fixed"));
    for p in 0..64 {
        v.write(Gva::new(base + p * 4096), 8, p + 1).unwrap();
    }
    let fast = st(v, "pf_fast") - fast;
    assert_eq!(fast, 64, "one fast fault per data page");
    assert_eq!(st(v, "pf_taken") - taken, fast, "every fault was fixed by the fast path: {:?}", v.stats());
    // As in KVM, a fast fix returns RET_PF_FIXED, which kvm_mmu_do_page_fault counts too.
    assert_eq!(st(v, "pf_fixed") - fixed, 64);
    assert_eq!(st(v, "pf_spurious"), 0);
    m.kvm.audit().unwrap();
}

#[test]
fn dontneed_under_a_running_guest_reads_zeroes() {
    let mut m = simple("");
    let base = m.data_start;
    let v = &mut m.vcpus[0];
    v.write(Gva::new(base), 8, 0x77).unwrap();
    assert_eq!(v.read(Gva::new(base), 8).unwrap(), 0x77);
    let hva = vmmu::host::Hva(m.slots[0].2.raw() + base);
    m.kvm.host().madvise_dontneed(hva, 4096).unwrap();
    let v = &mut m.vcpus[0];
    let flushes = st(v, "tlb_flush");
    assert_eq!(v.read(Gva::new(base), 8).unwrap(), 0, "the dropped page reads as zeroes");
    assert!(st(v, "tlb_flush") > flushes, "the invalidation flushed the vCPU's TLB");
    m.kvm.audit().unwrap();
}

#[test]
fn deleting_a_memslot_zaps_all_roots_fast() {
    let mut m =
        machine("", "[[memslot]]\ngpa = 0\nsize = \"64MiB\"\n[[memslot]]\ngpa = \"64MiB\"\nsize = \"2MiB\"\n", "");
    let v = &mut m.vcpus[0];
    let a = Gva::new(64 << 20);
    v.write(a, 8, 5).unwrap();
    let old_root = m.kvm.mmu().roots.lock()[0].hpa;
    let flushes = vmst(&m, "remote_tlb_flush_requests");
    m.kvm
        .set_user_memory_region(vmmu::memslot::UserspaceMemoryRegion {
            slot: 1,
            flags: Default::default(),
            guest_phys_addr: 64 << 20,
            memory_size: 0,
            userspace_addr: m.slots[1].2,
        })
        .unwrap();
    let v = &mut m.vcpus[0];
    // The gpa is now MMIO with nothing behind it: all ones; the old root was replaced.
    assert_eq!(v.read(a, 8).unwrap(), u64::MAX);
    assert!(st(v, "pf_mmio_spte_created") >= 1);
    let roots = m.kvm.mmu().roots.lock().clone();
    assert_eq!(roots.len(), 1, "the obsolete root was dropped");
    assert!(roots[0].hpa != old_root || !roots[0].is_invalid());
    assert!(!roots[0].is_invalid());
    assert!(vmst(&m, "remote_tlb_flush_requests") > flushes);
    m.kvm.audit().unwrap();
}

#[test]
fn five_level_tdp_only_when_maxphyaddr_needs_it() {
    for (maxphy, level) in [(46, 4u8), (52, 5)] {
        let mut m = simple(&format!("max_tdp_level = 5\nmaxphyaddr = {maxphy}"));
        let base = m.data_start;
        let v = &mut m.vcpus[0];
        v.write(Gva::new(base), 8, 9).unwrap();
        assert_eq!(v.read(Gva::new(base), 8).unwrap(), 9);
        let roots = m.kvm.mmu().roots.lock().clone();
        assert_eq!(roots[0].role.level(), level, "maxphyaddr {maxphy}");
        m.kvm.audit().unwrap();
    }
}

#[test]
fn npt_and_ept_without_ad_bits_map_and_handle_mmio() {
    for vm in ["tdp = \"npt\"", "eptad = false"] {
        let mut m = machine(
            vm,
            "[[memslot]]\ngpa = 0\nsize = \"64MiB\"\n[[mmio]]\ngpa = \"0x80000000\"\nsize = \"4KiB\"\n",
            "",
        );
        let base = m.data_start;
        let v = &mut m.vcpus[0];
        for p in 0..32 {
            v.write(Gva::new(base + p * 4096), 8, p).unwrap();
        }
        for p in 0..32 {
            assert_eq!(v.read(Gva::new(base + p * 4096), 8).unwrap(), p);
        }
        v.write(Gva::new(0x8000_0000), 8, 3).unwrap();
        assert_eq!(v.read(Gva::new(0x8000_0000), 8).unwrap(), 3, "{vm}");
        assert_eq!(st(v, "pf_mmio_spte_created"), 1, "{vm}");
        m.kvm.audit().unwrap();
    }
}

#[test]
fn huge_pages_follow_host_guest_and_config_limits() {
    let slots = "[[memslot]]\ngpa = 0\nsize = \"64MiB\"\n[[memslot]]\ngpa = \"1GiB\"\nsize = \"64MiB\"\nbacking = \"thp\"\nguest_page_size = \"2m\"\n";
    for (vm, want_2m) in [("", true), ("tdp_huge_page = \"4k\"", false)] {
        let mut m = machine(vm, slots, "");
        let v = &mut m.vcpus[0];
        for p in 0..8 {
            v.write(Gva::new((1 << 30) + p * (2 << 20)), 8, p).unwrap();
        }
        assert_eq!(m.kvm.vm_stats()["pages_2m"] >= 8, want_2m, "{vm}");
        m.kvm.audit().unwrap();
    }
}

#[test]
fn nx_huge_pages_split_executable_huge_pages() {
    let slots = "[[memslot]]\ngpa = 0\nsize = \"64MiB\"\n[[memslot]]\ngpa = \"1GiB\"\nsize = \"64MiB\"\nbacking = \"thp\"\nguest_page_size = \"2m\"\n";
    let mut m = machine("nx_huge_pages = true", slots, "");
    let v = &mut m.vcpus[0];
    // A data access maps 2 MiB (not executable); a fetch splits it.
    v.write(Gva::new(1 << 30), 8, 0x90).unwrap();
    assert_eq!(m.kvm.vm_stats()["pages_2m"], 1);
    let v = &mut m.vcpus[0];
    v.fetch(Gva::new((1 << 30) + 0x10), 1).unwrap();
    let s = m.kvm.vm_stats();
    assert_eq!(s["pages_2m"], 0);
    assert!(s["pages_4k"] >= 512, "split into 512 small SPTEs");
    // A fetch in a fresh huge region maps 4 KiB directly and counts an NX split.
    let v = &mut m.vcpus[0];
    v.fetch(Gva::new((1 << 30) + (4 << 20)), 1).unwrap();
    assert!(m.kvm.vm_stats()["nx_lpage_splits"] >= 1);
    m.kvm.audit().unwrap();
}

/// The NX huge page mitigation and its recovery worker, for every MMU: fetches from huge
/// guest pages are mapped 4 KiB below tables the mitigation made (nx_lpage_splits counts
/// them); a recovery pass zaps ceil(nx_lpage_splits / ratio) of them, oldest first; data
/// accesses then map the ranges huge again, and fetching again splits them again.
#[test]
fn nx_huge_page_recovery_zaps_split_pages_per_ratio() {
    let slots = "[[memslot]]\ngpa = 0\nsize = \"64MiB\"\n[[memslot]]\ngpa = \"1GiB\"\nsize = \"64MiB\"\nbacking = \"thp\"\nguest_page_size = \"2m\"\n";
    for mmu in ["tdp", "legacy-tdp", "shadow"] {
        let vm = format!("mmu = \"{mmu}\"\nnx_huge_pages = true\nnx_huge_pages_recovery_ratio = 2");
        let mut m = machine(&vm, slots, "");
        let region = |r: u64| Gva::new((1 << 30) + r * (2 << 20));
        // Fault the regions in with writes (host THPs), then fetch from four of them.
        for r in 0..8 {
            m.vcpus[0].write(region(r), 8, 0x90).unwrap();
        }
        let huge = vmst(&m, "pages_2m");
        assert_eq!(huge, 8, "{mmu}: data accesses map 2 MiB");
        for r in 0..4 {
            m.vcpus[0].fetch(region(r), 1).unwrap();
        }
        assert_eq!(vmst(&m, "nx_lpage_splits"), 4, "{mmu}: one tracked table per fetched huge page");
        assert_eq!(vmst(&m, "pages_2m"), 4, "{mmu}: the fetched huge pages were split");
        assert_eq!(m.kvm.possible_nx_huge_pages(), 4);
        m.kvm.audit().unwrap();
        // ratio 2: a pass zaps ceil(4 / 2) = 2 tables, then ceil(2 / 2) = 1, then 1.
        m.vcpus[0].exit_guest();
        assert_eq!(m.kvm.nx_huge_page_recovery(), 2, "{mmu}");
        assert_eq!(vmst(&m, "nx_lpage_splits"), 2, "{mmu}");
        m.kvm.audit().unwrap();
        // The zapped ranges (the oldest: regions 0 and 1) map huge again on a data access.
        for r in 0..4 {
            m.vcpus[0].read(region(r), 8).unwrap();
        }
        assert_eq!(vmst(&m, "pages_2m"), 6, "{mmu}: two ranges huge again");
        assert_eq!(m.kvm.nx_huge_page_recovery(), 1);
        assert_eq!(m.kvm.nx_huge_page_recovery(), 1);
        assert_eq!(vmst(&m, "nx_lpage_splits"), 0, "{mmu}");
        assert_eq!(m.kvm.nx_huge_page_recovery(), 0, "{mmu}: nothing left");
        // Executing again splits again.
        m.vcpus[0].fetch(region(0), 1).unwrap();
        assert_eq!(vmst(&m, "nx_lpage_splits"), 1, "{mmu}");
        m.kvm.audit().unwrap();
        assert_eq!(m.vcpus[0].read(region(0), 8).unwrap(), 0x90, "{mmu}: contents kept");
    }
}

#[test]
fn nx_recovery_period_follows_kvm() {
    let cfg = vmmu::VmConfig { nx_huge_pages: true, ..Default::default() };
    assert_eq!(cfg.nx_huge_pages_recovery_period(), Some(std::time::Duration::from_secs(60)), "1 h / ratio 60");
    let cfg = vmmu::VmConfig { nx_huge_pages_recovery_period_ms: 250, ..cfg };
    assert_eq!(cfg.nx_huge_pages_recovery_period(), Some(std::time::Duration::from_millis(250)));
    assert_eq!(vmmu::VmConfig { nx_huge_pages_recovery_ratio: 0, ..cfg.clone() }.nx_huge_pages_recovery_period(), None);
    assert_eq!(vmmu::VmConfig { nx_huge_pages: false, ..cfg }.nx_huge_pages_recovery_period(), None);
}

#[test]
fn nx_recovery_worker_thread_runs_per_period() {
    let slots = "[[memslot]]\ngpa = 0\nsize = \"64MiB\"\n[[memslot]]\ngpa = \"1GiB\"\nsize = \"64MiB\"\nbacking = \"thp\"\nguest_page_size = \"2m\"\n";
    let vm = "nx_huge_pages = true\nnx_huge_pages_recovery_ratio = 1\nnx_huge_pages_recovery_period_ms = 5";
    let mut m = machine(vm, slots, "");
    for r in 0..3u64 {
        m.vcpus[0].fetch(Gva::new((1 << 30) + r * (2 << 20)), 1).unwrap();
    }
    m.vcpus[0].exit_guest();
    assert_eq!(vmst(&m, "nx_lpage_splits"), 3);
    let worker = m.kvm.start_nx_huge_page_recovery().expect("recovery is on");
    let t0 = std::time::Instant::now();
    while vmst(&m, "nx_lpage_splits") != 0 {
        assert!(t0.elapsed() < std::time::Duration::from_secs(20), "the worker never ran");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    drop(worker);
    m.kvm.audit().unwrap();
}

/// The MMIO generation wraps: an MMIO SPTE keeps 19 bits of the memslot generation, so after
/// 2^19 memslot updates an old one could look current; KVM zaps everything when the low 19
/// bits wrap to 0 (kvm_mmu_invalidate_mmio_sptes -> kvm_mmu_zap_all_fast). Before the wrap
/// the stale MMIO SPTE is still there (regenerated lazily on its next use); at the wrap it
/// goes with every other SPTE.
#[test]
fn mmio_generation_wrap_zaps_all() {
    let mut m =
        machine("", "[[memslot]]\ngpa = 0\nsize = \"64MiB\"\n[[mmio]]\ngpa = \"0x80000000\"\nsize = \"4KiB\"\n", "");
    let dev = Gva::new(0x8000_0000);
    m.vcpus[0].write(dev, 4, 0x1234).unwrap();
    m.vcpus[0].exit_guest();
    assert_eq!(m.kvm.audit().unwrap().mmio_sptes, 1);
    let region = m.kvm.memslots().iter().next().unwrap().region();
    let wrap = 1u64 << 19;
    // Flags-only updates that change nothing still bump the generation.
    while !(m.kvm.memslots().generation() + 1).is_multiple_of(wrap) {
        m.kvm.set_user_memory_region(region).unwrap();
    }
    let rep = m.kvm.audit().unwrap();
    assert_eq!(rep.mmio_sptes, 1, "one update before the wrap the stale MMIO SPTE is still there");
    assert!(rep.leaves[0] > 0);
    m.kvm.set_user_memory_region(region).unwrap();
    assert_eq!(m.kvm.memslots().generation() % wrap, 0);
    let rep = m.kvm.audit().unwrap();
    assert_eq!((rep.mmio_sptes, rep.leaves[0]), (0, 0), "the wrap zapped everything");
    let v = &mut m.vcpus[0];
    let created = st(v, "pf_mmio_spte_created");
    assert_eq!(v.read(dev, 4).unwrap(), 0x1234);
    assert_eq!(st(v, "pf_mmio_spte_created"), created + 1, "a fresh MMIO SPTE after the wrap");
}
