//! The guest kernel's processes: fork with copy-on-write, exec, exit, munmap of shared
//! pages, context switches with and without PCIDs, and the TLB flushes all of them need.
//!
//! Every scenario runs twice, under the TDP MMU and on a bare machine with no hypervisor
//! ([`NativeMachine`]); both runs must see the same values and the kernel must count the
//! same events. Under TDP the MMU audit must pass at the end.

use std::collections::BTreeSet;
use std::sync::Arc;
use vmmu::host::{Backing, FrameAllocator, HostMm, PhysMem};
use vmmu::machine::{GuestCpu, NativeMachine};
use vmmu::memslot::{MemslotFlags, UserspaceMemoryRegion};
use vmmu::x86_paging::access::AccessKind;
use vmmu::x86_paging::addr::{Gpa, Hpa};
use vmmu::{Kvm, Vcpu, VmConfig};
use vmmu_guest::boot::BootMem;
use vmmu_guest::kernel::{KernelConfig, KernelStats, USER_BASE};
use vmmu_guest::{GuestKernel, KernelError};

const MEM: u64 = 256 << 20;
const PAGE: u64 = 4096;
const ADDR: u64 = 0x000f_ffff_ffff_f000;
const RW: u64 = 2;

fn tdp_vm(mem: u64) -> (Arc<Kvm>, Vcpu) {
    let frames = Arc::new(FrameAllocator::new(4 << 30).unwrap());
    let host = Arc::new(HostMm::new(frames).unwrap());
    let kvm = Kvm::new(VmConfig::default(), host.clone()).unwrap();
    let hva = host.mmap(mem, Backing::Anon4k, true, false).unwrap();
    kvm.set_user_memory_region(UserspaceMemoryRegion {
        slot: 0,
        flags: MemslotFlags::empty(),
        guest_phys_addr: 0,
        memory_size: mem,
        userspace_addr: hva,
    })
    .unwrap();
    let vcpu = kvm.create_vcpu().unwrap();
    (kvm, vcpu)
}

/// The bare machine's memory as firmware writes it (the machine itself is the CPU).
struct NativeMem(Arc<PhysMem>);

impl BootMem for NativeMem {
    fn write_phys(&self, gpa: Gpa, size: u8, val: u64) -> Result<(), String> {
        let hpa = Hpa::new(gpa.raw());
        if !self.0.contains(hpa, u64::from(size)) {
            return Err(format!("gpa {gpa:#x} is beyond physical memory"));
        }
        self.0.write(hpa, size, val);
        Ok(())
    }
    fn read_phys(&self, gpa: Gpa, size: u8) -> Result<u64, String> {
        let hpa = Hpa::new(gpa.raw());
        if !self.0.contains(hpa, u64::from(size)) {
            return Err(format!("gpa {gpa:#x} is beyond physical memory"));
        }
        Ok(self.0.read(hpa, size))
    }
}

/// What a scenario observed, compared between the two machines.
#[derive(Debug, PartialEq)]
struct Outcome<T> {
    value: T,
    stats: KernelStats,
}

/// Runs `$f(&mut GuestKernel, &mut cpu)` on a TDP VM and on a native machine with config
/// `$cfg`; checks both observed the same and audits the VM. Evaluates to the outcome.
macro_rules! both {
    ($cfg:expr, $f:expr) => {{
        let cfg: KernelConfig = $cfg;
        let (kvm, mut vcpu) = tdp_vm(cfg.mem_size);
        let mut k = GuestKernel::boot(&*kvm, &mut vcpu, cfg.clone()).unwrap();
        let tdp = Outcome { value: $f(&mut k, &mut vcpu), stats: k.stats };
        kvm.audit().unwrap();
        let mut native = NativeMachine::new(cfg.mem_size, 46).unwrap();
        let mem = NativeMem(native.mem().clone());
        let mut k = GuestKernel::boot(&mem, &mut native, cfg).unwrap();
        let nat = Outcome { value: $f(&mut k, &mut native), stats: k.stats };
        assert_eq!(tdp, nat, "TDP and native runs differ");
        tdp
    }};
}

fn cfg(pcid: bool) -> KernelConfig {
    KernelConfig { mem_size: MEM, pcid, ..Default::default() }
}

fn rd<C: GuestCpu>(k: &mut GuestKernel, cpu: &mut C, va: u64) -> u64 {
    k.access(cpu, va, AccessKind::Read, 8, 0).unwrap()
}

fn wr<C: GuestCpu>(k: &mut GuestKernel, cpu: &mut C, va: u64, val: u64) {
    k.access(cpu, va, AccessKind::Write, 8, val).unwrap();
}

fn pte<C: GuestCpu>(k: &GuestKernel, cpu: &mut C, pid: u32, va: u64) -> u64 {
    k.user_pte(cpu, pid, va).unwrap().unwrap_or_else(|| panic!("pid {pid}: nothing mapped at {va:#x}"))
}

fn frame<C: GuestCpu>(k: &GuestKernel, cpu: &mut C, pid: u32, va: u64) -> u64 {
    pte(k, cpu, pid, va) & ADDR
}

/// A process with `pages` pages at USER_BASE, page `i` holding `tag + i`; it is current.
fn populated<C: GuestCpu>(k: &mut GuestKernel, cpu: &mut C, pages: u64, tag: u64) -> u32 {
    let pid = k.create_process(cpu).unwrap();
    k.mmap(pid, USER_BASE, pages * PAGE, true).unwrap();
    k.switch_to(cpu, pid).unwrap();
    for i in 0..pages {
        wr(k, cpu, USER_BASE + i * PAGE, tag + i);
    }
    pid
}

fn read_all<C: GuestCpu>(k: &mut GuestKernel, cpu: &mut C, pid: u32, pages: u64) -> Vec<u64> {
    k.switch_to(cpu, pid).unwrap();
    (0..pages).map(|i| rd(k, cpu, USER_BASE + i * PAGE)).collect()
}

fn tags(tag: u64, pages: u64) -> Vec<u64> {
    (0..pages).map(|i| tag + i).collect()
}

// ---- fork and copy-on-write ----------------------------------------------------------

fn child_writes<C: GuestCpu>(k: &mut GuestKernel, cpu: &mut C) -> Vec<u64> {
    let n = 8;
    let parent = populated(k, cpu, n, 0x100);
    let before = k.stats;
    let child = k.fork(cpu, parent).unwrap();
    assert_ne!(child, parent);
    assert_eq!(k.stats.forks, 1);
    assert_eq!(k.stats.pages_allocated, before.pages_allocated, "fork copies no data pages");
    assert_eq!(k.processes().iter().find(|p| p.pid == child).unwrap().vmas.len(), 1, "VMAs copied");
    for i in 0..n {
        let va = USER_BASE + i * PAGE;
        let (pp, cp) = (pte(k, cpu, parent, va), pte(k, cpu, child, va));
        assert_eq!(pp & ADDR, cp & ADDR, "page {i} shared");
        assert_eq!((pp & RW, cp & RW), (0, 0), "page {i} read-only in both");
        assert_eq!(k.share_count(Gpa::new(pp & ADDR)), 2);
    }
    assert_eq!(read_all(k, cpu, child, n), tags(0x100, n), "child sees the parent's data");
    for i in 0..n {
        wr(k, cpu, USER_BASE + i * PAGE, 0x200 + i);
    }
    assert_eq!(k.stats.cow_faults, n);
    assert_eq!(k.stats.cow_copies, n);
    assert_eq!(k.stats.pages_allocated, before.pages_allocated + n);
    let mine = read_all(k, cpu, child, n);
    assert_eq!(mine, tags(0x200, n), "child sees its own data");
    let theirs = read_all(k, cpu, parent, n);
    assert_eq!(theirs, tags(0x100, n), "parent still sees the old data");
    for i in 0..n {
        let va = USER_BASE + i * PAGE;
        let (pp, cp) = (pte(k, cpu, parent, va), pte(k, cpu, child, va));
        assert_ne!(pp & ADDR, cp & ADDR);
        assert_eq!(cp & RW, RW, "the child's copy is writable");
        assert_eq!(pp & RW, 0, "the parent's stays read-only until it writes");
        assert_eq!(k.share_count(Gpa::new(pp & ADDR)), 1);
    }
    [mine, theirs].concat()
}

#[test]
fn fork_then_child_writes() {
    both!(cfg(false), child_writes);
    both!(cfg(true), child_writes);
}

fn parent_writes<C: GuestCpu>(k: &mut GuestKernel, cpu: &mut C) -> Vec<u64> {
    let n = 8;
    let parent = populated(k, cpu, n, 0x100);
    let child = k.fork(cpu, parent).unwrap();
    // The parent is still current: its writes must fault (fork flushed its TLB).
    for i in 0..n {
        wr(k, cpu, USER_BASE + i * PAGE, 0x300 + i);
    }
    assert_eq!(k.stats.cow_copies, n);
    let p = read_all(k, cpu, parent, n);
    assert_eq!(p, tags(0x300, n));
    let c = read_all(k, cpu, child, n);
    assert_eq!(c, tags(0x100, n), "the child keeps the data as of the fork");
    [p, c].concat()
}

#[test]
fn fork_then_parent_writes() {
    both!(cfg(false), parent_writes);
    both!(cfg(true), parent_writes);
}

fn read_sharing<C: GuestCpu>(k: &mut GuestKernel, cpu: &mut C) -> Vec<u64> {
    let n = 16;
    let parent = populated(k, cpu, n, 0x400);
    let free = k.free_frames();
    let child = k.fork(cpu, parent).unwrap();
    let pt = k.stats.pt_pages;
    let free_after_fork = k.free_frames();
    let mut seen = read_all(k, cpu, child, n);
    seen.extend(read_all(k, cpu, parent, n));
    seen.extend(read_all(k, cpu, child, n));
    assert_eq!(k.stats.cow_faults, 0, "reads never copy");
    assert_eq!(k.free_frames(), free_after_fork, "nothing allocated by reading");
    assert_eq!(k.stats.pt_pages, pt);
    // Only page tables were allocated by the fork (PML4 + PDPT + PD + PT).
    assert_eq!(free - free_after_fork, 4);
    for i in 0..n {
        let va = USER_BASE + i * PAGE;
        assert_eq!(frame(k, cpu, parent, va), frame(k, cpu, child, va));
    }
    seen
}

#[test]
fn read_only_sharing_until_a_write() {
    both!(cfg(false), read_sharing);
}

fn fast_path<C: GuestCpu>(k: &mut GuestKernel, cpu: &mut C) -> Vec<u64> {
    let parent = populated(k, cpu, 2, 0x500);
    let orig = frame(k, cpu, parent, USER_BASE);
    let child = k.fork(cpu, parent).unwrap();
    k.switch_to(cpu, child).unwrap();
    wr(k, cpu, USER_BASE, 0x600); // copies: the original frame is left to the parent alone
    assert_eq!(k.share_count(Gpa::new(orig)), 1);
    k.switch_to(cpu, parent).unwrap();
    let free = k.free_frames();
    wr(k, cpu, USER_BASE, 0x700); // share count 1: made writable in place
    assert_eq!(k.stats.cow_faults, 2);
    assert_eq!(k.stats.cow_copies, 1);
    assert_eq!(k.free_frames(), free, "no frame allocated");
    assert_eq!(frame(k, cpu, parent, USER_BASE), orig, "the parent kept its frame");
    assert_eq!(pte(k, cpu, parent, USER_BASE) & RW, RW);
    let faults = k.stats.page_faults;
    wr(k, cpu, USER_BASE, 0x701);
    assert_eq!(k.stats.page_faults, faults, "writable now: no more faults");
    let mut v = read_all(k, cpu, parent, 2);
    v.extend(read_all(k, cpu, child, 2));
    assert_eq!(v, vec![0x701, 0x501, 0x600, 0x501]);
    v
}

#[test]
fn share_count_one_fast_path() {
    both!(cfg(false), fast_path);
    both!(cfg(true), fast_path);
}

fn fork_of_fork<C: GuestCpu>(k: &mut GuestKernel, cpu: &mut C) -> Vec<u64> {
    let a = populated(k, cpu, 4, 0x10);
    let b = k.fork(cpu, a).unwrap();
    k.switch_to(cpu, b).unwrap();
    wr(k, cpu, USER_BASE + PAGE, 0x21); // b's own copy of page 1
    let c = k.fork(cpu, b).unwrap(); // b is current: flushed by the fork
    let f0 = frame(k, cpu, a, USER_BASE);
    assert_eq!(k.share_count(Gpa::new(f0)), 3, "page 0 shared by a, b and c");
    assert_eq!(k.share_count(Gpa::new(frame(k, cpu, b, USER_BASE + PAGE))), 2, "b's copy shared with c");
    wr(k, cpu, USER_BASE, 0x20); // b, current, writes page 0
    k.switch_to(cpu, c).unwrap();
    wr(k, cpu, USER_BASE + 2 * PAGE, 0x32);
    k.switch_to(cpu, a).unwrap();
    wr(k, cpu, USER_BASE + 3 * PAGE, 0x43);
    assert_eq!(k.share_count(Gpa::new(f0)), 2, "a and c");
    let mut v = Vec::new();
    for p in [a, b, c] {
        v.extend(read_all(k, cpu, p, 4));
    }
    assert_eq!(v, vec![0x10, 0x11, 0x12, 0x43, 0x20, 0x21, 0x12, 0x13, 0x10, 0x21, 0x32, 0x13]);
    v
}

#[test]
fn fork_of_a_fork() {
    both!(cfg(false), fork_of_fork);
    both!(cfg(true), fork_of_fork);
}

// ---- exec, exit, munmap ------------------------------------------------------------------

fn exec_frees<C: GuestCpu>(k: &mut GuestKernel, cpu: &mut C) -> Vec<u64> {
    let n = 32;
    let p = populated(k, cpu, n, 0x1000);
    let frames: BTreeSet<u64> = (0..n).map(|i| frame(k, cpu, p, USER_BASE + i * PAGE)).collect();
    let free = k.free_frames();
    let freed = k.exec(cpu, p).unwrap();
    assert_eq!(freed, n);
    assert_eq!(k.stats.execs, 1);
    assert_eq!(k.stats.pages_freed, n);
    assert_eq!(k.stats.pt_pages_freed, 3, "PDPT, PD and PT (the PML4 stays)");
    assert_eq!(k.free_frames(), free + n + 3);
    assert!(k.processes()[0].vmas.is_empty());
    assert_eq!(k.user_pte(cpu, p, USER_BASE).unwrap(), None);
    // Nothing left mapped: the old address faults as a segfault (no VMA).
    let e = k.access(cpu, USER_BASE, AccessKind::Read, 8, 0).unwrap_err();
    assert!(matches!(e, KernelError::Segfault { .. }), "{e:?}");
    // The new image reuses the freed frames (and zeroes them).
    k.mmap(p, USER_BASE, n * PAGE, true).unwrap();
    let v = (0..n).map(|i| rd(k, cpu, USER_BASE + i * PAGE)).collect::<Vec<_>>();
    assert!(v.iter().all(|&x| x == 0), "fresh pages are zero");
    let again: BTreeSet<u64> = (0..n).map(|i| frame(k, cpu, p, USER_BASE + i * PAGE)).collect();
    assert!(again.iter().filter(|f| frames.contains(f)).count() as u64 >= n - 3, "frames reused");
    assert_eq!(k.free_frames(), free);
    v
}

#[test]
fn exec_frees_memory() {
    both!(cfg(false), exec_frees);
    both!(cfg(true), exec_frees);
}

#[test]
fn exec_reuses_guest_memory_the_host_already_backs() {
    let (kvm, mut cpu) = tdp_vm(MEM);
    let mut k = GuestKernel::boot(&*kvm, &mut cpu, cfg(false)).unwrap();
    let p = populated(&mut k, &mut cpu, 64, 0);
    k.exec(&mut cpu, p).unwrap();
    k.mmap(p, USER_BASE, 64 * PAGE, true).unwrap();
    let fixed = cpu.stat.pf_fixed;
    for i in 0..64 {
        wr(&mut k, &mut cpu, USER_BASE + i * PAGE, i);
    }
    assert_eq!(cpu.stat.pf_fixed, fixed, "recycled frames need no new EPT mappings");
    kvm.audit().unwrap();
}

fn exec_child<C: GuestCpu>(k: &mut GuestKernel, cpu: &mut C) -> Vec<u64> {
    let n = 8;
    let parent = populated(k, cpu, n, 0x40);
    let child = k.fork(cpu, parent).unwrap();
    k.switch_to(cpu, child).unwrap();
    // exec of the current process: everything shared, so no data frame is freed.
    assert_eq!(k.exec(cpu, child).unwrap(), 0);
    assert_eq!(k.stats.pages_freed, 0);
    assert_eq!(k.share_count(Gpa::new(frame(k, cpu, parent, USER_BASE))), 1);
    k.switch_to(cpu, parent).unwrap();
    for i in 0..n {
        wr(k, cpu, USER_BASE + i * PAGE, 0x80 + i);
    }
    assert_eq!((k.stats.cow_faults, k.stats.cow_copies), (n, 0), "all reused in place");
    read_all(k, cpu, parent, n)
}

#[test]
fn exec_of_a_child_drops_shares() {
    both!(cfg(false), exec_child);
    both!(cfg(true), exec_child);
}

fn exit_child<C: GuestCpu>(k: &mut GuestKernel, cpu: &mut C) -> Vec<u64> {
    let n = 4;
    let parent = populated(k, cpu, n, 0x40);
    let free = k.free_frames();
    let child = k.fork(cpu, parent).unwrap();
    k.switch_to(cpu, child).unwrap();
    wr(k, cpu, USER_BASE, 0x99); // one private page
    let e = k.exit(cpu, child).unwrap_err();
    assert!(matches!(e, KernelError::Invalid(_)), "the current process cannot exit: {e:?}");
    k.switch_to(cpu, parent).unwrap();
    assert_eq!(k.exit(cpu, child).unwrap(), 1, "only the private copy is freed");
    assert_eq!(k.stats.exits, 1);
    assert_eq!(k.free_frames(), free, "every frame of the child is back");
    assert_eq!(k.processes().len(), 1);
    assert!(k.switch_to(cpu, child).is_err());
    assert_eq!(k.current_pid(), Some(parent));
    let next = k.create_process(cpu).unwrap();
    assert!(next > child, "pids are not reused");
    for i in 0..n {
        wr(k, cpu, USER_BASE + i * PAGE, 0x50 + i);
    }
    assert_eq!(k.stats.cow_copies, 1, "the parent's writes reuse its frames");
    read_all(k, cpu, parent, n)
}

#[test]
fn exit_frees_everything() {
    both!(cfg(false), exit_child);
    both!(cfg(true), exit_child);
}

fn munmap_shared<C: GuestCpu>(k: &mut GuestKernel, cpu: &mut C) -> Vec<u64> {
    let n = 8;
    let parent = populated(k, cpu, n, 0x70);
    let child = k.fork(cpu, parent).unwrap();
    let free = k.free_frames();
    assert_eq!(k.munmap(cpu, parent, USER_BASE, n * PAGE).unwrap(), n);
    assert_eq!(k.free_frames(), free, "shared frames stay with the child");
    assert_eq!(k.stats.pages_freed, 0);
    let e = k.access(cpu, USER_BASE, AccessKind::Read, 8, 0).unwrap_err();
    assert!(matches!(e, KernelError::Segfault { .. }), "the parent's mapping is gone: {e:?}");
    let mut v = read_all(k, cpu, child, n);
    assert_eq!(v, tags(0x70, n));
    wr(k, cpu, USER_BASE, 0x77);
    assert_eq!(k.stats.cow_copies, 0, "the child alone maps them now");
    // munmap of a process that is not current (the parent is switched away from)
    k.switch_to(cpu, parent).unwrap();
    assert_eq!(k.munmap(cpu, child, USER_BASE, n * PAGE).unwrap(), n);
    assert_eq!(k.free_frames(), free + n);
    assert_eq!(k.stats.pages_freed, n);
    v.push(k.free_frames());
    v
}

#[test]
fn munmap_of_shared_pages() {
    both!(cfg(false), munmap_shared);
    both!(cfg(true), munmap_shared);
}

/// A vCPU that counts the guest memory accesses made through it.
struct Counting<'a, C> {
    cpu: &'a mut C,
    accesses: u64,
}

impl<C: GuestCpu> GuestCpu for Counting<'_, C> {
    fn read(&mut self, gva: vmmu::x86_paging::addr::Gva, size: u8) -> Result<u64, vmmu::GuestError> {
        self.accesses += 1;
        self.cpu.read(gva, size)
    }
    fn write(&mut self, gva: vmmu::x86_paging::addr::Gva, size: u8, val: u64) -> Result<(), vmmu::GuestError> {
        self.accesses += 1;
        self.cpu.write(gva, size, val)
    }
    fn fetch(&mut self, gva: vmmu::x86_paging::addr::Gva, size: u8) -> Result<u64, vmmu::GuestError> {
        self.accesses += 1;
        self.cpu.fetch(gva, size)
    }
    fn write_cr0(&mut self, v: vmmu::x86_paging::regs::Cr0) -> Result<(), vmmu::GuestError> {
        self.cpu.write_cr0(v)
    }
    fn write_cr4(&mut self, v: vmmu::x86_paging::regs::Cr4) -> Result<(), vmmu::GuestError> {
        self.cpu.write_cr4(v)
    }
    fn write_efer(&mut self, v: vmmu::x86_paging::regs::Efer) -> Result<(), vmmu::GuestError> {
        self.cpu.write_efer(v)
    }
    fn write_cr3(&mut self, v: u64) -> Result<(), vmmu::GuestError> {
        self.cpu.write_cr3(v)
    }
    fn invlpg(&mut self, gva: vmmu::x86_paging::addr::Gva) {
        self.cpu.invlpg(gva)
    }
    fn set_cpl(&mut self, cpl: u8) {
        self.cpu.set_cpl(cpl)
    }
    fn set_ac(&mut self, ac: bool) {
        self.cpu.set_ac(ac)
    }
    fn write_pkru(&mut self, v: u32) {
        self.cpu.write_pkru(v)
    }
    fn paging(&self) -> vmmu::x86_paging::mode::PagingState {
        self.cpu.paging()
    }
}

/// munmap of a 1 TiB range with four pages mapped in it walks only the page tables that
/// exist: the kernel's accesses are bounded by the tables present (a walk of every 4 KiB page
/// of the range would make 2^28 of them and take minutes).
fn munmap_huge_sparse<C: GuestCpu>(k: &mut GuestKernel, cpu: &mut C) -> Vec<u64> {
    const TIB: u64 = 1 << 40;
    let pid = k.create_process(cpu).unwrap();
    k.mmap(pid, TIB, TIB, true).unwrap();
    k.switch_to(cpu, pid).unwrap();
    // Pages in different top-level, 1 GiB and 2 MiB regions, and the last page of the range.
    let vas = [TIB, TIB + (1 << 30) + (5 << 21), TIB + (300 << 30) + 4096, 2 * TIB - PAGE];
    for (i, &va) in vas.iter().enumerate() {
        wr(k, cpu, va, 0x500 + i as u64);
    }
    let invlpgs = k.stats.invlpgs;
    let mut counting = Counting { cpu: &mut *cpu, accesses: 0 };
    assert_eq!(k.munmap(&mut counting, pid, TIB, TIB).unwrap(), 4);
    // The range holds 9 user tables (2 PDPTs, 3 PDs, 4 PTs): the walk reads each of their
    // 512 entries at most once per level above it plus once more (a PTE: 4 walk reads and
    // the PTE), and clears 4 PTEs.
    assert!(counting.accesses <= 9 * 512 * 5 + 4, "munmap made {} guest accesses", counting.accesses);
    assert_eq!(k.stats.invlpgs - invlpgs, 4);
    for va in vas {
        assert_eq!(k.user_pte(cpu, pid, va).unwrap(), None, "{va:#x} still mapped");
    }
    assert!(k.processes().iter().find(|p| p.pid == pid).unwrap().vmas.is_empty());
    vec![k.free_frames()]
}

#[test]
fn munmap_of_a_huge_range_walks_only_what_is_mapped() {
    both!(cfg(false), munmap_huge_sparse);
}

#[test]
fn freed_frames_go_back_to_their_node() {
    let half = MEM / 2;
    let c = KernelConfig { nodes: vec![(0, half), (half, MEM)], ..cfg(false) };
    fn scenario<C: GuestCpu>(k: &mut GuestKernel, cpu: &mut C) -> Vec<u64> {
        let half = MEM / 2;
        let a = k.create_process(cpu).unwrap(); // node 0
        let b = populated(k, cpu, 8, 0); // node 1
        let fb: Vec<u64> = (0..8).map(|i| frame(k, cpu, b, USER_BASE + i * PAGE)).collect();
        assert!(fb.iter().all(|&f| f >= half), "{fb:x?}");
        k.switch_to(cpu, a).unwrap();
        k.exit(cpu, b).unwrap();
        // Process 3 (node 0) must not take node 1's frames; process 4 (node 1) takes them.
        let c = populated(k, cpu, 8, 0);
        let fc: Vec<u64> = (0..8).map(|i| frame(k, cpu, c, USER_BASE + i * PAGE)).collect();
        assert!(fc.iter().all(|&f| f < half), "{fc:x?}");
        let d = populated(k, cpu, 8, 0);
        let fd: BTreeSet<u64> = (0..8).map(|i| frame(k, cpu, d, USER_BASE + i * PAGE)).collect();
        let old: BTreeSet<u64> = fb.iter().copied().collect();
        assert!(fd.iter().all(|&f| f >= half), "{fd:x?}");
        assert!(fd.intersection(&old).count() >= 5, "node 1's freed frames reused");
        fd.into_iter().collect()
    }
    both!(c, scenario);
}

// ---- TLB flushes: stale writable translations must not survive a fork -----------------

/// The parent (current) has a writable translation of its page in the TLB when it forks;
/// without the fork's CR3 reload its next write would go through it into the shared frame.
fn stale_current<C: GuestCpu>(k: &mut GuestKernel, cpu: &mut C) -> Vec<u64> {
    let parent = populated(k, cpu, 1, 0xaaaa);
    wr(k, cpu, USER_BASE, 0xaaaa); // the writable translation is in the TLB now
    let child = k.fork(cpu, parent).unwrap();
    assert_eq!(k.current_pid(), Some(parent));
    wr(k, cpu, USER_BASE, 0xbbbb);
    let c = read_all(k, cpu, child, 1);
    assert_eq!(c, vec![0xaaaa], "the parent's write reached the child's page");
    assert_eq!(k.stats.cow_faults, 1, "the parent's write faulted");
    let p = read_all(k, cpu, parent, 1);
    assert_eq!(p, vec![0xbbbb]);
    [p, c].concat()
}

#[test]
fn fork_flushes_the_current_parent() {
    both!(cfg(false), stale_current);
    both!(cfg(true), stale_current);
}

/// The parent is not current when forked; with PCIDs its PCID still holds a writable
/// translation, and a switch back with the no-flush bit would keep it.
fn stale_switched_away<C: GuestCpu>(k: &mut GuestKernel, cpu: &mut C) -> Vec<u64> {
    // Another process, using addresses whose TLB slots differ from the parent's.
    let other = k.create_process(cpu).unwrap();
    let other_va = USER_BASE + 0x10_0000;
    k.mmap(other, other_va, PAGE, true).unwrap();
    let parent = populated(k, cpu, 1, 0xaaaa);
    wr(k, cpu, USER_BASE, 0xaaaa);
    k.switch_to(cpu, other).unwrap();
    wr(k, cpu, other_va, 1);
    let child = k.fork(cpu, parent).unwrap();
    let flushes = k.stats.tlb_flushes;
    k.switch_to(cpu, parent).unwrap();
    if k.processes()[0].pcid != 0 {
        assert_eq!(k.stats.tlb_flushes, flushes + 1, "the switch back flushed the parent's PCID");
    }
    wr(k, cpu, USER_BASE, 0xbbbb);
    let c = read_all(k, cpu, child, 1);
    assert_eq!(c, vec![0xaaaa], "the parent's write reached the child's page");
    assert_eq!(k.stats.cow_faults, 1, "the parent's write faulted");
    // Once flushed, switches keep the PCID's translations again.
    k.switch_to(cpu, other).unwrap();
    let flushes = k.stats.tlb_flushes;
    k.switch_to(cpu, parent).unwrap();
    assert_eq!(k.stats.tlb_flushes, flushes, "a clean PCID is switched to without a flush");
    let p = read_all(k, cpu, parent, 1);
    assert_eq!(p, vec![0xbbbb]);
    [p, c].concat()
}

#[test]
fn fork_of_a_parent_switched_away_from() {
    both!(cfg(false), stale_switched_away);
    both!(cfg(true), stale_switched_away);
}

/// munmap of a process that is not current frees its frame; another process gets the frame.
/// With PCIDs the unmapped process's PCID still translates the address to that frame, so
/// the switch back must flush it.
fn stale_munmap<C: GuestCpu>(k: &mut GuestKernel, cpu: &mut C) -> Vec<u64> {
    let other = k.create_process(cpu).unwrap();
    let other_va = USER_BASE + 0x10_0000;
    k.mmap(other, other_va, 2 * PAGE, true).unwrap();
    k.switch_to(cpu, other).unwrap();
    wr(k, cpu, other_va, 1); // its page tables exist now
    let p = populated(k, cpu, 1, 0x5555);
    let f = frame(k, cpu, p, USER_BASE);
    k.switch_to(cpu, other).unwrap();
    assert_eq!(k.munmap(cpu, p, USER_BASE, PAGE).unwrap(), 1);
    wr(k, cpu, other_va + PAGE, 0x6666);
    assert_eq!(frame(k, cpu, other, other_va + PAGE), f, "the freed frame went to the other process");
    k.switch_to(cpu, p).unwrap();
    let e = k.access(cpu, USER_BASE, AccessKind::Read, 8, 0);
    assert!(matches!(e, Err(KernelError::Segfault { .. })), "read another process's page: {e:?}");
    vec![f]
}

#[test]
fn munmap_of_a_process_switched_away_from() {
    both!(cfg(false), stale_munmap);
    both!(cfg(true), stale_munmap);
}

/// Many switches among forked processes with PCIDs: each keeps its own view.
fn switch_storm<C: GuestCpu>(k: &mut GuestKernel, cpu: &mut C) -> Vec<u64> {
    let n = 4;
    let root = populated(k, cpu, n, 0);
    let mut pids = vec![root];
    for _ in 0..3 {
        let last = *pids.last().unwrap();
        pids.push(k.fork(cpu, last).unwrap());
    }
    for round in 0..5u64 {
        for (j, &p) in pids.iter().enumerate() {
            k.switch_to(cpu, p).unwrap();
            let i = (round + j as u64) % n;
            wr(k, cpu, USER_BASE + i * PAGE, (p as u64) << 16 | round << 8 | i);
        }
    }
    let mut v = Vec::new();
    for &p in &pids {
        v.extend(read_all(k, cpu, p, n));
    }
    for (j, &p) in pids.iter().enumerate() {
        for i in 0..n {
            let last = (0..5u64).filter(|r| (r + j as u64) % n == i).max();
            let want = last.map_or(i, |r| (p as u64) << 16 | r << 8 | i);
            assert_eq!(v[usize::try_from(j as u64 * n + i).unwrap()], want, "pid {p} page {i}");
        }
    }
    v
}

#[test]
fn context_switches_keep_views_apart() {
    both!(cfg(false), switch_storm);
    both!(cfg(true), switch_storm);
}
