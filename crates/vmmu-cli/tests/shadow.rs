//! The shadow MMU's mechanisms, by their counters, on guests whose page tables are stated
//! exactly (identity layouts built before the run) — the done criteria of the shadow-paging
//! issue — with the audit after every step.

use vmmu::x86_paging::addr::Gva;
use vmmu::Vcpu;
use vmmu_cli::machine::{build, Machine};
use vmmu_cli::runner::RunOptions;
use vmmu_cli::scenario::Scenario;

fn machine(slots: &str, guest: &str) -> Machine {
    let toml = format!("name = \"t\"\n[vm]\nmmu = \"shadow\"\n{slots}\n[guest]\nlayout = \"identity\"\n{guest}\n");
    let s = Scenario::parse(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    build(&s, None).unwrap_or_else(|e| panic!("{e}"))
}

fn st(v: &Vcpu, name: &str) -> i64 {
    v.stats()[name]
}

fn vmst(m: &Machine, name: &str) -> i64 {
    m.kvm.vm_stats()[name]
}

/// The guest-physical (= identity virtual) address of the level-`level` entry mapping `va`,
/// found by reading the guest's own tables through the vCPU.
fn entry_addr(v: &mut Vcpu, va: u64, level: u8) -> u64 {
    let mut table = v.cpu().paging().cr3 & 0x000f_ffff_ffff_f000;
    for l in (level..=4).rev() {
        let at = table + ((va >> (12 + 9 * (u32::from(l) - 1))) & 511) * 8;
        if l == level {
            return at;
        }
        table = v.read(Gva::new(at), 8).unwrap() & 0x000f_ffff_ffff_f000;
    }
    unreachable!("level {level} is within 1..=4")
}

#[test]
fn first_touch_faults_once_per_page_with_one_shadow_page_per_guest_table() {
    let mut m = machine("[[memslot]]\ngpa = 0\nsize = \"256MiB\"\n", "page_size = \"4k\"");
    let base = m.data_start;
    // (Booting ran a few instructions with paging off: direct roots for that mode.)
    let misses = vmst(&m, "mmu_cache_miss");
    let v = &mut m.vcpus[0];
    for p in 0..16384 {
        v.write(Gva::new(base + p * 4096), 1, 1).unwrap();
    }
    assert_eq!(st(v, "pf_fixed"), 16384);
    // PML4 + PDPT + PD + 32 page tables.
    assert_eq!(vmst(&m, "mmu_cache_miss") - misses, 3 + 32);
    let v = &mut m.vcpus[0];
    let taken = st(v, "pf_taken");
    for p in 0..16384 {
        v.write(Gva::new(base + p * 4096), 1, 2).unwrap();
    }
    assert_eq!(st(v, "pf_taken"), taken, "second pass is free");
    m.kvm.audit().unwrap();
}

#[test]
fn prefetch_maps_eight_pages_per_fault_when_gptes_are_accessed() {
    let mut m = machine(
        "[[memslot]]\ngpa = 0\nsize = \"256MiB\"\nprefault = true\n",
        "page_size = \"4k\"\naccessed_dirty = \"preset\"",
    );
    let base = m.data_start;
    let v = &mut m.vcpus[0];
    for p in 0..16384 {
        v.write(Gva::new(base + p * 4096), 1, 1).unwrap();
    }
    assert_eq!(st(v, "pf_fixed"), 2048);
    assert_eq!(vmst(&m, "pages_4k"), 16384);
    m.kvm.audit().unwrap();
}

#[test]
fn rewriting_a_pte_goes_unsync_once_then_costs_one_fault_invlpg_and_flush() {
    let mut m = machine("[[memslot]]\ngpa = 0\nsize = \"256MiB\"\n", "page_size = \"4k\"");
    let x = m.data_start;
    let other = x + 100 * 4096;
    let v = &mut m.vcpus[0];
    v.write(Gva::new(x), 8, 0x1111).unwrap();
    v.write(Gva::new(other), 8, 0x2222).unwrap();
    let pte_at = entry_addr(v, x, 1);
    let pte = v.read(Gva::new(pte_at), 8).unwrap();
    let flip = x ^ other;
    for i in 0..10 {
        let v = &mut m.vcpus[0];
        let before = (st(v, "pf_fixed"), st(v, "invlpg"), st(v, "tlb_flush"));
        let new = if i % 2 == 0 { pte ^ flip } else { pte };
        v.write(Gva::new(pte_at), 8, new).unwrap();
        v.invlpg(Gva::new(x));
        let want = if i % 2 == 0 { 0x2222 } else { 0x1111 };
        assert_eq!(v.read(Gva::new(x), 8).unwrap(), want, "iteration {i}: the new translation after INVLPG");
        let after = (st(v, "pf_fixed"), st(v, "invlpg"), st(v, "tlb_flush"));
        if i == 0 {
            assert_eq!(vmst(&m, "mmu_unsync"), 1, "the page table went unsync");
            assert_eq!(after.0 - before.0, 2, "the first write to the table faults once (unsync)");
        } else {
            assert_eq!((after.0 - before.0, after.1 - before.1, after.2 - before.2), (1, 1, 1), "iteration {i}");
        }
        m.kvm.audit().unwrap();
    }
    assert_eq!(vmst(&m, "mmu_unsync"), 1);
    assert_eq!(vmst(&m, "mmu_pte_write"), 0, "no emulated writes: the table is unsync");
}

#[test]
fn rewriting_a_pde_is_emulated_and_three_writes_flood_the_page() {
    // The data lives in the second GiB, so its page directory is not on the path through
    // which the guest writes it (as a kernel writes user page tables through its direct map).
    let mut m = machine("[[memslot]]\ngpa = 0\nsize = \"2GiB\"\n", "page_size = \"4k\"");
    let x = 1u64 << 30;
    let v = &mut m.vcpus[0];
    v.write(Gva::new(x), 8, 7).unwrap();
    let pde_at = entry_addr(v, x, 2);
    let pde = v.read(Gva::new(pde_at), 8).unwrap();
    m.kvm.audit().unwrap();
    for i in 0..3 {
        let v = &mut m.vcpus[0];
        let (emul, pte_write, pde_zapped) =
            (st(v, "pf_emulate"), vmst(&m, "mmu_pte_write"), vmst(&m, "mmu_pde_zapped"));
        let v = &mut m.vcpus[0];
        v.write(Gva::new(pde_at), 8, pde).unwrap();
        let v = &m.vcpus[0];
        assert_eq!(st(v, "pf_emulate") - emul, 1, "write {i} is emulated");
        assert_eq!(vmst(&m, "mmu_pte_write") - pte_write, 1);
        let zapped = vmst(&m, "mmu_pde_zapped") - pde_zapped;
        if i < 2 {
            assert_eq!(zapped, 1, "write {i} zaps the PDE's SPTE");
            assert_eq!(vmst(&m, "mmu_flooded"), 0);
        } else {
            assert_eq!(vmst(&m, "mmu_flooded"), 1, "the third write floods the page");
            assert_eq!(vmst(&m, "mmu_shadow_zapped"), 1);
        }
        m.kvm.audit().unwrap();
    }
    let v = &mut m.vcpus[0];
    assert_eq!(v.read(Gva::new(x), 8).unwrap(), 7, "the mapping still works after the zap");
    m.kvm.audit().unwrap();
}

#[test]
fn cr3_switch_reuses_a_cached_root() {
    let mut m = machine("[[memslot]]\ngpa = 0\nsize = \"64MiB\"\n", "page_size = \"4k\"");
    let base = m.data_start;
    let v = &mut m.vcpus[0];
    v.write(Gva::new(base), 8, 5).unwrap();
    let cr3 = v.cpu().paging().cr3;
    // A second root: a copy of the PML4 in another page, built by guest stores.
    let copy = base + 0x10_0000;
    for i in 0..512u64 {
        let e = v.read(Gva::new(cr3 + i * 8), 8).unwrap();
        v.write(Gva::new(copy + i * 8), 8, e).unwrap();
    }
    let misses = vmst(&m, "mmu_cache_miss");
    let v = &mut m.vcpus[0];
    v.write_cr3(copy).unwrap();
    assert_eq!(v.read(Gva::new(base), 8).unwrap(), 5);
    assert_eq!(vmst(&m, "mmu_cache_miss") - misses, 1, "one new root page; the rest are shared");
    for _ in 0..5 {
        let v = &mut m.vcpus[0];
        v.write_cr3(cr3).unwrap();
        assert_eq!(v.read(Gva::new(base), 8).unwrap(), 5);
        v.write_cr3(copy).unwrap();
        assert_eq!(v.read(Gva::new(base), 8).unwrap(), 5);
    }
    assert_eq!(vmst(&m, "mmu_cache_miss") - misses, 1, "switching back and forth hits prev_roots");
    m.kvm.audit().unwrap();
}

#[test]
fn guest_page_faults_are_injected_with_the_guests_error_code() {
    let mut m = machine("[[memslot]]\ngpa = 0\nsize = \"64MiB\"\n", "page_size = \"4k\"");
    let v = &mut m.vcpus[0];
    let e = v.write(Gva::new(0x8000_0000), 4, 1).unwrap_err();
    assert!(
        matches!(e, vmmu::GuestError::Exception(vmmu::hw::cpu::Exception::PageFault { cr2: 0x8000_0000, error_code }) if error_code.0 == 2),
        "{e:?}"
    );
    assert_eq!(st(v, "pf_guest"), 1, "KVM injected it");
}

#[test]
fn shadow_runs_the_default_scenario_and_audits() {
    let s = Scenario::parse(vmmu_cli::DEFAULT_SCENARIO).unwrap();
    let opts = RunOptions { mmu: Some("shadow".into()), ..Default::default() };
    let r = vmmu_cli::runner::run(&s, &opts, |_, _| {}).unwrap();
    assert_eq!(r.mmu, "shadow");
    let p1 = &r.phases[0];
    assert!(p1.stats["pf_guest"] >= 16384, "the guest kernel's own faults are injected");
    assert!(p1.stats["mmu_unsync"] > 0);
    assert_eq!(r.phases[1].stats["pf_taken"], 0, "second pass free");
}

fn legacy(slots: &str, guest: &str) -> Machine {
    let toml = format!("name = \"t\"\n[vm]\nmmu = \"legacy-tdp\"\n{slots}\n[guest]\nlayout = \"identity\"\n{guest}\n");
    build(&Scenario::parse(&toml).unwrap(), None).unwrap()
}

#[test]
fn legacy_tdp_maps_through_direct_shadow_pages() {
    for tdp in ["ept", "npt"] {
        let mut m = legacy(
            &format!("tdp = \"{tdp}\"\n[[memslot]]\ngpa = 0\nsize = \"64MiB\"\n[[mmio]]\ngpa = \"0x80000000\"\nsize = \"4KiB\"\n"),
            "page_size = \"4k\"",
        );
        let base = m.data_start;
        let v = &mut m.vcpus[0];
        for p in 0..512 {
            v.write(Gva::new(base + p * 4096), 8, p).unwrap();
        }
        for p in 0..512 {
            assert_eq!(v.read(Gva::new(base + p * 4096), 8).unwrap(), p);
        }
        assert!(st(v, "pf_fixed") >= 512 / 8, "{tdp}");
        // Direct shadow pages: a root, then one page per level per 1 GiB / 2 MiB touched.
        assert!(vmst(&m, "mmu_cache_miss") >= 4, "{tdp}");
        assert_eq!(vmst(&m, "tdp_mmu_pages"), 0, "not the TDP MMU");
        let v = &mut m.vcpus[0];
        v.write(Gva::new(0x8000_0000), 8, 3).unwrap();
        assert_eq!(v.read(Gva::new(0x8000_0000), 8).unwrap(), 3);
        assert_eq!(st(v, "pf_mmio_spte_created"), 1, "{tdp}");
        m.kvm.audit().unwrap();
        // A host invalidation zaps through the rmaps.
        let hva = vmmu::host::Hva(m.slots[0].2.raw() + base);
        m.kvm.host().madvise_dontneed(hva, 4096).unwrap();
        let v = &mut m.vcpus[0];
        assert_eq!(v.read(Gva::new(base), 8).unwrap(), 0, "{tdp}: the dropped page reads zeroes");
        m.kvm.audit().unwrap();
        // Write protection (dirty-log style) then fast page faults fix writes.
        m.kvm.mmu_slot_remove_write_access(0).unwrap();
        let v = &mut m.vcpus[0];
        let fast = st(v, "pf_fast");
        v.write(Gva::new(base + 4096), 8, 9).unwrap();
        assert!(st(v, "pf_fast") > fast, "{tdp}");
        m.kvm.audit().unwrap();
    }
}

#[test]
fn shadow_host_invalidation_zaps_through_the_rmaps() {
    let mut m = machine("[[memslot]]\ngpa = 0\nsize = \"64MiB\"\n", "page_size = \"4k\"");
    let base = m.data_start;
    let v = &mut m.vcpus[0];
    v.write(Gva::new(base), 8, 0x55).unwrap();
    let hva = vmmu::host::Hva(m.slots[0].2.raw() + base);
    m.kvm.host().madvise_dontneed(hva, 4096).unwrap();
    m.kvm.audit().unwrap();
    let v = &mut m.vcpus[0];
    assert_eq!(v.read(Gva::new(base), 8).unwrap(), 0);
    m.kvm.audit().unwrap();
}

#[test]
fn page_limit_recycles_the_oldest_shadow_pages() {
    let mut m = machine("[[memslot]]\ngpa = 0\nsize = \"1GiB\"\n", "page_size = \"4k\"");
    assert_eq!(m.kvm.mmu_pages().1, (1u64 << 30 >> 12) / 50, "default: memslot pages / 50");
    m.kvm.set_nr_mmu_pages(40);
    assert_eq!(m.kvm.mmu_pages().1, 40);
    let base = m.data_start;
    let v = &mut m.vcpus[0];
    // 128 MiB: 64 guest page tables, more than the limit allows.
    for p in 0..32768u64 {
        v.write(Gva::new(base + p * 4096), 8, p).unwrap();
    }
    assert!(vmst(&m, "mmu_recycled") > 0);
    assert!(m.kvm.mmu_pages().0 <= 40);
    m.kvm.audit().unwrap();
    let v = &mut m.vcpus[0];
    for p in (0..32768u64).step_by(97) {
        assert_eq!(v.read(Gva::new(base + p * 4096), 8).unwrap(), p, "recycling loses no data");
    }
    m.kvm.audit().unwrap();
}

#[test]
fn shadow_tracepoints_use_the_kernel_text() {
    let toml = "name = \"t\"\n[vm]\nmmu = \"shadow\"\n[[memslot]]\ngpa = 0\nsize = \"64MiB\"\n[guest]\nlayout = \"identity\"\n[[phase]]\nname = \"p\"\nops = [{ op = \"write\", start = \"16MiB\", pages = 4 }]\n";
    let s = Scenario::parse(toml).unwrap();
    let r = vmmu_cli::runner::run(
        &s,
        &RunOptions { trace: vmmu_cli::runner::TraceMode::Events, ..Default::default() },
        |_, _| {},
    )
    .unwrap();
    let t = r.trace.unwrap();
    let get_page = t.lines().find(|l| l.contains("kvm_mmu_get_page: ")).expect("kvm_mmu_get_page");
    let text = get_page.split("kvm_mmu_get_page: ").nth(1).unwrap();
    assert!(text.starts_with("sp gen 0 gfn ") && text.ends_with(" l4 8-byte q0 wux nxe ad root 0 sync new"), "{text}");
    assert!(t.contains("kvm_mmu_pagetable_walk: addr 1000000 pferr 2 W"), "walk event");
    assert!(t.contains("kvm_mmu_paging_element: pte "), "paging element");
    assert!(t.contains("kvm_mmu_set_accessed_bit: gpa "), "A bit");
    assert!(t.contains("kvm_mmu_set_dirty_bit: gpa "), "D bit");
    assert!(t.contains("kvm_mmu_set_spte: gfn 1000 spte "), "set_spte");
}

#[test]
fn more_than_a_thousand_mappings_of_one_gfn_are_recycled() {
    let mut m = machine("[[memslot]]\ngpa = 0\nsize = \"256MiB\"\n", "page_size = \"4k\"");
    let base = m.data_start;
    let target = base + (8 << 20);
    let v = &mut m.vcpus[0];
    v.write(Gva::new(target), 8, 0x77).unwrap();
    // The guest points 1,100 PTEs (of three page tables) at the same frame.
    let n = 1100u64;
    for i in 0..n {
        let va = base + i * 4096;
        v.read(Gva::new(va), 8).unwrap(); // make sure the path exists
        let at = entry_addr(v, va, 1);
        let e = v.read(Gva::new(at), 8).unwrap();
        v.write(Gva::new(at), 8, (e & 0xfff) | target).unwrap();
        v.invlpg(Gva::new(va));
    }
    for i in 0..n {
        assert_eq!(v.read(Gva::new(base + i * 4096), 8).unwrap(), 0x77, "alias {i}");
    }
    assert!(vmst(&m, "max_mmu_rmap_size") > 1000, "{}", vmst(&m, "max_mmu_rmap_size"));
    m.kvm.audit().unwrap();
    let v = &mut m.vcpus[0];
    // After the recycle every alias still reads the frame (refaulting as needed).
    for i in (0..n).step_by(7) {
        assert_eq!(v.read(Gva::new(base + i * 4096), 8).unwrap(), 0x77);
    }
    m.kvm.audit().unwrap();
}
