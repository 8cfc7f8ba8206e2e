use super::*;
use x86_paging::regs::{Cr0, Cr4, Efer};

#[test]
fn exceptions_print_as_kvm_developers_read_them() {
    let pf = |cr2, ec| Exception::PageFault { cr2, error_code: PfErrorCode(ec) }.to_string();
    assert_eq!(
        pf(0xffff_8880_0000_0000, 0),
        "#PF at 0xffff888000000000, error code 0x0 [not-present read, supervisor]"
    );
    assert_eq!(pf(0x1000, 0x7), "#PF at 0x1000, error code 0x7 [protection write, user]");
    assert_eq!(pf(0x1000, 0x15), "#PF at 0x1000, error code 0x15 [protection fetch, user]");
    assert_eq!(pf(0x1000, 0x9), "#PF at 0x1000, error code 0x9 [reserved-bit read, supervisor]");
    assert_eq!(pf(0x1000, 0x23), "#PF at 0x1000, error code 0x23 [protection write, supervisor, protection-key]");
    assert!(Exception::GeneralProtection.to_string().starts_with("#GP"));
    let e = crate::GuestError::Exception(Exception::PageFault { cr2: 0x2000, error_code: PfErrorCode(2) });
    assert_eq!(e.to_string(), "guest exception #PF at 0x2000, error code 0x2 [not-present write, supervisor]");
}

const P: u64 = 1;
const RW: u64 = 2;
const G: u64 = 1 << 8;

/// A native machine with a 4-level identity map of one page at `VA` -> `PA`, with the
/// leaf flags `leaf`, built at 0x1000.. .
fn machine(leaf: u64) -> Cpu {
    let mem = Arc::new(PhysMem::new(4 << 20).unwrap());
    let w = |a: u64, v: u64| mem.store(Hpa::new(a), v);
    w(0x1000, 0x2000 | P | RW);
    w(0x2000, 0x3000 | P | RW);
    w(0x3000, 0x4000 | P | RW);
    w(0x4000 + 8 * 0x10, 0x10_0000 | leaf);
    w(0x10_0000, 0x1111);
    w(0x20_0000, 0x2222);
    let mut c = Cpu::new(mem, CpuMode::Native, 1, 46);
    c.write_cr4(Cr4::PAE | Cr4::PGE | Cr4::PCIDE).unwrap();
    c.write_efer(Efer::LME | Efer::NXE).unwrap();
    c.write_cr3(0x1000 | 5).unwrap();
    c.write_cr0(Cr0::PE | Cr0::PG | Cr0::WP).unwrap();
    c
}

const VA: u64 = 0x10_000;

/// Re-points the leaf at the second data page behind the TLB's back.
fn retarget(c: &Cpu) {
    c.mem().store(Hpa::new(0x4000 + 8 * 0x10), 0x20_0000 | P | RW);
}

#[test]
fn cr3_write_flushes_its_pcid_unless_noflush() {
    let mut c = machine(P | RW);
    assert_eq!(c.read(Gva::new(VA), 8), Ok(0x1111));
    retarget(&c);
    assert_eq!(c.read(Gva::new(VA), 8), Ok(0x1111), "stale translation until a flush");
    c.write_cr3(0x1000 | 5 | (1 << 63)).unwrap();
    assert_eq!(c.read(Gva::new(VA), 8), Ok(0x1111), "CR3 with the no-flush bit keeps the PCID's entries");
    c.write_cr3(0x1000 | 5).unwrap();
    assert_eq!(c.read(Gva::new(VA), 8), Ok(0x2222), "CR3 without it flushes them");
}

/// The PDE cache: a walk to a 4 KiB page caches where its page table is, so the next TLB
/// miss in the same 2 MiB region reads only the PTE. A PDE re-pointed behind the CPU's
/// back is not seen until a flush (as the SDM allows); INVLPG drops the cache.
#[test]
fn pde_cache_resumes_walks_at_the_page_table_until_a_flush() {
    let mut c = machine(P | RW);
    let w = |c: &Cpu, a: u64, v: u64| c.mem().store(Hpa::new(a), v);
    // A second page table at 0x5000 maps VA to the second data page.
    w(&c, 0x5000 + 8 * 0x10, 0x20_0000 | P | RW);
    w(&c, 0x4000 + 8 * 0x11, 0x10_0000 | P | RW); // VA + 4 KiB, same 2 MiB region
    w(&c, 0x4000 + 8 * 0x12, 0x10_0000 | P | RW); // VA + 8 KiB: old table, first page
    w(&c, 0x5000 + 8 * 0x12, 0x20_0000 | P | RW); // ... new table, second page
    assert_eq!(c.read(Gva::new(VA), 8), Ok(0x1111));
    let (walks, refs, hits) = (c.counters.walks, c.counters.walk_mem_refs, c.tlb.counters.psc_hits);
    assert_eq!(c.read(Gva::new(VA + 0x1000), 8), Ok(0x1111), "the neighbour maps the first data page too");
    assert_eq!(c.tlb.counters.psc_hits, hits + 1, "the second walk started at the page table");
    assert_eq!((c.counters.walks - walks, c.counters.walk_mem_refs - refs), (1, 1), "one reference: the PTE");
    // The PDE now points at the other page table; the cache still has the old one.
    w(&c, 0x3000, 0x5000 | P | RW | (1 << 5));
    assert_eq!(c.read(Gva::new(VA + 0x2000), 8), Ok(0x1111), "a TLB miss still resumes at the cached (old) table");
    c.tlb.flush_addr(1, Some(5), VA); // drops VA's TLB entry and, with it, the PDE cache
    assert_eq!(c.read(Gva::new(VA), 8), Ok(0x2222), "INVLPG dropped the PDE cache: the new table is walked");
}

#[test]
fn other_pcids_keep_their_entries() {
    let mut c = machine(P | RW);
    assert_eq!(c.read(Gva::new(VA), 8), Ok(0x1111));
    retarget(&c);
    c.write_cr3(0x1000 | 6).unwrap(); // switch to PCID 6 (flushes PCID 6 only)
                                      // (Not touching VA here: the direct-mapped TLB would evict PCID 5's entry, which the
                                      // architecture allows at any time.)
    c.write_cr3(0x1000 | 5 | (1 << 63)).unwrap(); // back to PCID 5 without flushing
    assert_eq!(c.read(Gva::new(VA), 8), Ok(0x1111), "PCID 5's entry survived");
    c.invpcid(1, 5, Gva::new(0)).unwrap(); // single-context
    assert_eq!(c.read(Gva::new(VA), 8), Ok(0x2222));
}

#[test]
fn global_pages_survive_cr3_writes_but_not_invpcid_all() {
    let mut c = machine(P | RW | G);
    assert_eq!(c.read(Gva::new(VA), 8), Ok(0x1111));
    retarget(&c);
    c.write_cr3(0x1000 | 5).unwrap();
    assert_eq!(c.read(Gva::new(VA), 8), Ok(0x1111), "global entry survives MOV CR3");
    c.invpcid(3, 0, Gva::new(0)).unwrap(); // all contexts, except globals
    assert_eq!(c.read(Gva::new(VA), 8), Ok(0x1111));
    c.invpcid(2, 0, Gva::new(0)).unwrap(); // all contexts, including globals
    assert_eq!(c.read(Gva::new(VA), 8), Ok(0x2222));
}

#[test]
fn invlpg_and_invpcid_individual_drop_one_address() {
    let mut c = machine(P | RW | G);
    assert_eq!(c.read(Gva::new(VA), 8), Ok(0x1111));
    retarget(&c);
    c.invlpg(Gva::new(VA + 0x10));
    assert_eq!(c.read(Gva::new(VA), 8), Ok(0x2222), "INVLPG drops global entries too");
    c.mem().store(Hpa::new(0x4000 + 8 * 0x10), 0x10_0000 | P | RW);
    c.invpcid(0, 5, Gva::new(VA)).unwrap();
    assert_eq!(c.read(Gva::new(VA), 8), Ok(0x1111));
    assert_eq!(c.invpcid(4, 0, Gva::new(0)), Err(Stop::Exception(Exception::GeneralProtection)));
}

#[test]
fn a_write_through_a_clean_tlb_entry_walks_again_and_sets_dirty() {
    let mut c = machine(P | RW);
    assert_eq!(c.read(Gva::new(VA), 8), Ok(0x1111));
    let pte = |c: &Cpu| c.mem().load(Hpa::new(0x4000 + 8 * 0x10));
    assert_eq!(pte(&c) & 0x60, 0x20, "read sets A only");
    let walks = c.counters.walks;
    c.write(Gva::new(VA), 8, 5).unwrap();
    assert_eq!(c.counters.walks, walks + 1, "the write could not use the clean entry");
    assert_eq!(pte(&c) & 0x60, 0x60, "and set D");
    c.write(Gva::new(VA), 8, 6).unwrap();
    assert_eq!(c.counters.walks, walks + 1, "now it can");
}
