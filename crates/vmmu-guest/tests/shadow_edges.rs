//! Edge paths of the shadow MMU that a guest can reach, each checked against KVM's outcome
//! and the MMU audit (which cross-checks SPTEs, rmaps, parent pointers and page counts).

#[allow(dead_code)]
mod pae_guest;

use pae_guest::{vm, MMIO};
use vmmu::x86_paging::addr::Gva;
use vmmu::MmuKind;

/// PTE of gva 0x5000 in the guest's page table (PT at 0x3000, identity mapped).
const PTE_5000: u64 = 0x3000 + 5 * 8;

/// `mmu_set_spte` with no memslot behind the gfn over a present leaf SPTE: the old leaf
/// must go first (its rmap entry, the `pages_4k` count, a flush), then the MMIO SPTE.
/// Reached by a guest that rewrites an unsync leaf gPTE to point at MMIO and then writes
/// through it: the old SPTE is read-only (the gPTE's D bit was clear), so the write faults
/// and FNAME(fetch) lands on the present SPTE.
#[test]
fn mmio_gpte_over_a_present_spte_drops_the_old_leaf() {
    let (kvm, mut v, _) = vm(MmuKind::Shadow);
    // A read maps gfn 5 read-only (D clear in the gPTE).
    assert_eq!(v.read(Gva::new(0x5000), 8).unwrap(), 0);
    // The guest rewrites its own PTE: the page table (gfn 3) goes unsync, the write is not
    // trapped, and no INVLPG follows.
    v.write(Gva::new(PTE_5000), 8, MMIO | 0x3).unwrap();
    kvm.audit().unwrap();
    let pages_4k = kvm.vm_stats()["pages_4k"];
    let flushes = kvm.vm_stats()["remote_tlb_flush_requests"];
    let mmio_created = v.stats()["pf_mmio_spte_created"];
    // The write faults on the read-only SPTE; the walk now finds the MMIO gfn.
    v.write(Gva::new(0x5000), 4, 0x77).unwrap();
    assert_eq!(v.read(Gva::new(0x5000), 4).unwrap(), 0x77, "the access went to the device");
    assert_eq!(v.stats()["pf_mmio_spte_created"], mmio_created + 1);
    assert_eq!(kvm.vm_stats()["pages_4k"], pages_4k - 1, "the dropped leaf is no longer counted");
    assert!(kvm.vm_stats()["remote_tlb_flush_requests"] > flushes, "dropping a present SPTE flushes");
    kvm.audit().unwrap();
}

/// `detect_write_misaligned`: a 1-byte write is exempt only at the start of a guest entry;
/// anywhere else in an upper-level table it zaps the shadow page (`mmu_flooded`).
#[test]
fn one_byte_write_inside_a_pde_zaps_the_shadowed_directory() {
    let (kvm, mut v, _) = vm(MmuKind::Shadow);
    // Shadow the PD (gfn 2, write-tracked: writes to it are emulated).
    v.read(Gva::new(0x40_0000), 8).unwrap();
    let flooded = kvm.vm_stats()["mmu_flooded"];
    // Linux's clear_bit style: one byte at the start of PDE 7 is an ordinary PTE update.
    v.write(Gva::new(0x2000 + 7 * 8), 1, 0x83).unwrap();
    assert_eq!(kvm.vm_stats()["mmu_flooded"], flooded, "an aligned 1-byte write is not misaligned");
    // One byte in the middle of PDE 6 is no page-table update: the page goes.
    v.write(Gva::new(0x2000 + 6 * 8 + 3), 1, 0).unwrap();
    assert_eq!(kvm.vm_stats()["mmu_flooded"], flooded + 1, "a misaligned 1-byte write zaps the page");
    assert_eq!(v.read(Gva::new(0x40_0000), 8).unwrap(), 0, "the guest still runs");
    kvm.audit().unwrap();
}

/// `mmu_sync_children` gathers its flushes: one when write protection changed something,
/// one at the end for everything the syncs dropped — not one per synced page.
#[test]
fn syncing_many_unsync_pages_flushes_twice() {
    let (kvm, mut v, _) = vm(MmuKind::Shadow);
    use vmmu_guest::boot::BootMem;
    // Two more page tables (gfns 8 and 9, identity mapped by the first one) for
    // [2, 4) MiB and [4, 6) MiB.
    let m: &dyn BootMem = &*kvm;
    for (pt, base) in [(0x8000u64, 0x20_0000u64), (0x9000, 0x40_0000)] {
        for i in 0..512u64 {
            m.write_phys(vmmu::x86_paging::addr::Gpa::new(pt + i * 8), 8, (base + (i << 12)) | 3).unwrap();
        }
        m.write_phys(vmmu::x86_paging::addr::Gpa::new(0x2000 + (base >> 21) * 8), 8, pt | 3).unwrap();
    }
    // Shadow all three page tables, then let the guest rewrite one PTE in each: each table
    // goes unsync, and each SPTE behind the rewritten PTE is stale.
    let gvas = [0x1000u64, 0x20_1000, 0x40_1000];
    for g in gvas {
        v.read(Gva::new(g), 8).unwrap();
    }
    for (pt, g) in [(0x3000u64, gvas[0]), (0x8000, gvas[1]), (0x9000, gvas[2])] {
        let pte = pt + ((g >> 12) & 511) * 8;
        v.write(Gva::new(pte), 8, (0x60_0000 + (g & 0x1f_f000)) | 3).unwrap();
    }
    assert_eq!(kvm.vm_stats()["mmu_unsync"], 3, "three unsync page tables");
    let flushes = kvm.vm_stats()["remote_tlb_flush_requests"];
    // A CR3 load (same value) syncs the roots: the three pages are write-protected again
    // (one flush) and synced, dropping the three stale SPTEs (one flush at the end).
    v.write_cr3(0x1000).unwrap();
    v.read(Gva::new(0x40_0000 + 0x2000), 8).unwrap();
    assert_eq!(kvm.vm_stats()["remote_tlb_flush_requests"] - flushes, 2);
    assert_eq!(kvm.vm_stats()["mmu_unsync"], 0);
    kvm.audit().unwrap();
}

/// Sets PTEs `first..first + 8` of the first page table (gvas `first << 12` on, identity) to
/// present, writable and accessed (prefetchable), except those in `not_accessed`, and has the
/// VMM touch the pages (prefetch maps only pages the host already maps writable).
fn accessed_group(kvm: &vmmu::Kvm, first: u64, not_accessed: &[u64]) {
    use vmmu::x86_paging::addr::Gpa;
    use vmmu_guest::boot::BootMem;
    let m: &dyn BootMem = kvm;
    for i in first..first + 8 {
        let a = if not_accessed.contains(&i) { 0 } else { 0x20 };
        m.write_phys(Gpa::new(0x3000 + i * 8), 8, (i << 12) | 3 | a).unwrap();
        m.write_phys(Gpa::new(i << 12), 8, i).unwrap();
    }
}

/// FNAME(fetch) prefetches after a fix *or an emulation* (an MMIO SPTE), and not after a
/// spurious fault: an MMIO access maps its accessed neighbours.
#[test]
fn an_mmio_fault_prefetches_its_neighbours() {
    let (kvm, mut v, _) = vm(MmuKind::Shadow);
    accessed_group(&kvm, 0x10, &[]);
    use vmmu_guest::boot::BootMem;
    let m: &dyn BootMem = &*kvm;
    // Entry 0x10 of the group points at the device window.
    m.write_phys(vmmu::x86_paging::addr::Gpa::new(0x3000 + 0x10 * 8), 8, MMIO | 0x23).unwrap();
    v.write(Gva::new(0x10_000), 4, 5).unwrap();
    assert_eq!(v.read(Gva::new(0x10_000), 4).unwrap(), 5);
    let fixed = v.stats()["pf_fixed"];
    for i in 0x11..0x18u64 {
        v.read(Gva::new(i << 12), 8).unwrap();
    }
    assert_eq!(v.stats()["pf_fixed"], fixed, "the seven neighbours were prefetched with the MMIO SPTE");
    kvm.audit().unwrap();
}

/// FNAME(pte_prefetch) stops at the first guest entry it cannot prefetch (here one whose
/// Accessed bit is clear): the entries after it are not mapped.
#[test]
fn prefetch_stops_at_the_first_unusable_gpte() {
    let (kvm, mut v, _) = vm(MmuKind::Shadow);
    accessed_group(&kvm, 0x20, &[0x22]);
    v.read(Gva::new(0x20_000), 8).unwrap();
    let fixed = v.stats()["pf_fixed"];
    v.read(Gva::new(0x21_000), 8).unwrap();
    assert_eq!(v.stats()["pf_fixed"], fixed, "0x21 was prefetched");
    v.read(Gva::new(0x23_000), 8).unwrap();
    assert_eq!(v.stats()["pf_fixed"], fixed + 1, "0x23 comes after the unusable 0x22: not prefetched");
    kvm.audit().unwrap();
}

/// Prefetch takes only host pages mapped writable (`kvm_prefetch_pages` is
/// get_user_pages_fast_only with FOLL_WRITE): neighbours the VMM has only read (the shared
/// zero page) are left to fault.
#[test]
fn prefetch_skips_pages_the_host_maps_read_only() {
    use vmmu::x86_paging::addr::Gpa;
    use vmmu_guest::boot::BootMem;
    let (kvm, mut v, hva) = vm(MmuKind::Shadow);
    let m: &dyn BootMem = &*kvm;
    for i in 0x30..0x38u64 {
        m.write_phys(Gpa::new(0x3000 + i * 8), 8, (i << 12) | 0x23).unwrap();
        // The VMM reads the page: the host maps the zero page, read-only.
        assert_eq!(kvm.host().read(vmmu::host::Hva(hva + (i << 12)), 8).unwrap(), 0);
    }
    v.read(Gva::new(0x30_000), 8).unwrap();
    let fixed = v.stats()["pf_fixed"];
    v.read(Gva::new(0x31_000), 8).unwrap();
    assert_eq!(v.stats()["pf_fixed"], fixed + 1, "a zero-page neighbour is not prefetched");
    kvm.audit().unwrap();
}

/// `tdp_mmu_pages` counts the tables linked below a root (`tdp_account_mmu_page`), not the
/// roots: one 4 KiB mapping under 4-level EPT needs a PDPT, a PD and a PT.
#[test]
fn tdp_mmu_pages_does_not_count_roots() {
    let (kvm, mut v, _) = vm(MmuKind::Tdp);
    v.read(Gva::new(0x5000), 8).unwrap();
    assert_eq!(kvm.vm_stats()["tdp_mmu_pages"], 3);
    kvm.audit().unwrap();
}
