//! A guest kernel model: it maps all of guest RAM in a direct map, builds its processes'
//! page tables with ordinary stores through that direct map, handles its own #PF by demand
//! paging, and switches address spaces with MOV CR3.
//!
//! Everything it does to guest memory goes through the vCPU, so under any MMU it meets the
//! same faults and write protection a real guest kernel would.
//!
//! Processes can [`fork`](GuestKernel::fork) (page tables copied, private pages shared
//! copy-on-write), [`exec`](GuestKernel::exec) (all user mappings dropped) and
//! [`exit`](GuestKernel::exit). Frames mapped by more than one PTE carry a share count; a
//! frame goes back to its node's free list only when its last mapping goes. Page-table
//! changes are flushed as Linux does: INVLPG for single pages of the current process, a CR3
//! reload for whole address spaces, and with PCIDs a process whose PTEs were downgraded
//! while it was not running is switched to without the no-flush bit (its PCID may still
//! hold the old translations).

use crate::boot::BootMem;
use crate::pagetable::{FrameBump, PageTableBuilder, PteFlags};
use std::collections::HashMap;
use vmmu::hw::cpu::Exception;
use vmmu::machine::GuestCpu;
use vmmu::x86_paging::access::AccessKind;
use vmmu::x86_paging::addr::{Gpa, Gva};
use vmmu::x86_paging::regs::{Cr0, Cr4, Efer};
use vmmu::GuestError;

mod lifecycle;

/// Base of the direct map of guest RAM (Linux's `PAGE_OFFSET` without KASLR).
pub const DIRECT_MAP: u64 = 0xffff_8880_0000_0000;
/// Where the workloads' user memory starts by default.
pub const USER_BASE: u64 = 0x4000_0000;
/// Guest-physical memory below this is left alone (real-mode area, firmware).
const LOW_RESERVED: u64 = 1 << 20;

/// Kernel configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelConfig {
    /// End of guest RAM (the direct map covers [0, mem_size)).
    pub mem_size: u64,
    /// Memory nodes (gpa ranges of RAM, e.g. one per memslot); empty = one node
    /// [0, mem_size). Process `n` allocates from node `(n - 1) % nodes`, like NUMA
    /// first-touch placement.
    pub nodes: Vec<(u64, u64)>,
    /// Page size of the direct map: 12 (4 KiB) or 21 (2 MiB).
    pub direct_map_shift: u32,
    /// Paging levels: 4 or 5.
    pub levels: u8,
    /// Use PCIDs: each process gets one and CR3 switches do not flush.
    pub pcid: bool,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig { mem_size: 1 << 30, nodes: Vec::new(), direct_map_shift: 21, levels: 4, pcid: false }
    }
}

/// Kernel failures.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum KernelError {
    /// The VM failed underneath.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// A user access outside its mappings (the process would get SIGSEGV).
    #[error("segmentation fault: pid {pid} {kind} at {va:#x} (error code {error_code:#x})")]
    Segfault {
        /// Process.
        pid: u32,
        /// Address.
        va: u64,
        /// Access.
        kind: AccessKind,
        /// #PF error code.
        error_code: u32,
    },
    /// Guest RAM exhausted.
    #[error("guest out of memory ({0} bytes of RAM)")]
    OutOfMemory(u64),
    /// Boot-time failure.
    #[error("boot failed: {0}")]
    Boot(String),
    /// Bad request.
    #[error("{0}")]
    Invalid(String),
}

/// A user mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vma {
    /// First address.
    pub start: u64,
    /// End address.
    pub end: u64,
    /// Writable.
    pub writable: bool,
    /// Executable (PTEs without NX); the workloads' mappings are not.
    pub executable: bool,
}

/// A process.
#[derive(Debug, Clone)]
pub struct Process {
    /// Process id.
    pub pid: u32,
    /// Its top-level table.
    pub root: Gpa,
    /// Its mappings.
    pub vmas: Vec<Vma>,
    /// PCID (when enabled).
    pub pcid: u16,
    /// Memory node its pages come from.
    pub node: usize,
}

#[derive(Debug, Clone)]
struct Node {
    start: u64,
    next: u64,
    end: u64,
    free: Vec<u64>,
}

/// What the kernel did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct KernelStats {
    /// #PF handled.
    pub page_faults: u64,
    /// Data pages allocated.
    pub pages_allocated: u64,
    /// Page-table pages allocated.
    pub pt_pages: u64,
    /// Address-space switches.
    pub context_switches: u64,
    /// INVLPGs issued.
    pub invlpgs: u64,
    /// Full flushes of a process's translations: CR3 reloads of the current process after
    /// fork/exec, and CR3 switches with PCIDs made without the no-flush bit because the
    /// PCID could hold stale (or another process's) translations.
    pub tlb_flushes: u64,
    /// Processes forked.
    pub forks: u64,
    /// Execs (address spaces emptied).
    pub execs: u64,
    /// Processes exited.
    pub exits: u64,
    /// Write-protection faults on copy-on-write pages.
    pub cow_faults: u64,
    /// Copy-on-write faults that copied the page (the rest reused a frame no longer shared).
    pub cow_copies: u64,
    /// Data frames returned to the free lists (their last mapping gone).
    pub pages_freed: u64,
    /// Page-table pages returned to the free lists.
    pub pt_pages_freed: u64,
}

/// The guest kernel.
pub struct GuestKernel {
    cfg: KernelConfig,
    kernel_root: Gpa,
    nodes: Vec<Node>,
    processes: Vec<Process>,
    current: Option<usize>,
    next_pid: u32,
    /// Share counts of frames mapped by more than one PTE (a frame not here is mapped once,
    /// or free).
    shared: HashMap<u64, u32>,
    /// PCID -> the process whose translations that PCID holds, when they are known not to
    /// be stale: only a switch to that process may set the no-flush bit.
    pcid_clean: HashMap<u16, u32>,
    /// Counters.
    pub stats: KernelStats,
}

const ADDR: u64 = 0x000f_ffff_ffff_f000;
const P: u64 = 1;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
/// Page-fault error code bits.
const PF_P: u32 = 1;
const PF_W: u32 = 1 << 1;
const PF_RSVD: u32 = 1 << 3;
/// Top-level entries of the user half (the lower 256 of 512).
const USER_SLOTS: u64 = 256;

impl GuestKernel {
    /// Boots: the boot loader (a VMM write) builds the direct map of all RAM, then the
    /// kernel turns on 4/5-level paging with NX, WP and global pages.
    pub fn boot<M: BootMem + ?Sized, C: GuestCpu>(
        mem: &M,
        cpu: &mut C,
        cfg: KernelConfig,
    ) -> Result<Self, KernelError> {
        if !matches!(cfg.direct_map_shift, 12 | 21) || !matches!(cfg.levels, 4 | 5) {
            return Err(KernelError::Invalid(format!(
                "unsupported kernel layout: direct map shift {}, {} levels",
                cfg.direct_map_shift, cfg.levels
            )));
        }
        let mut alloc = FrameBump::new(LOW_RESERVED, cfg.mem_size);
        let mut b = PageTableBuilder::new(mem, &mut alloc, cfg.levels).map_err(KernelError::Boot)?;
        let mut flags = PteFlags::KERNEL_DATA;
        flags.accessed = true;
        flags.dirty = true;
        b.map_range(&mut alloc, DIRECT_MAP, 0, cfg.mem_size, cfg.direct_map_shift, flags).map_err(KernelError::Boot)?;
        let root = b.root;
        let tables_end = alloc.next();
        let ranges = if cfg.nodes.is_empty() { vec![(0, cfg.mem_size)] } else { cfg.nodes.clone() };
        let nodes = ranges
            .iter()
            .map(|&(s, e)| Node {
                start: s,
                next: s
                    .max(LOW_RESERVED)
                    .max(if s <= tables_end && tables_end < e { tables_end } else { 0 })
                    .next_multiple_of(4096),
                end: e.min(cfg.mem_size),
                free: Vec::new(),
            })
            .collect();
        let mut cr4 = Cr4::PAE | Cr4::PGE;
        if cfg.levels == 5 {
            cr4 |= Cr4::LA57;
        }
        if cfg.pcid {
            cr4 |= Cr4::PCIDE;
        }
        cpu.set_cpl(0);
        cpu.write_cr4(cr4)?;
        cpu.write_efer(Efer::LME | Efer::NXE | Efer::SCE)?;
        cpu.write_cr3(root.raw())?;
        cpu.write_cr0(Cr0::PE | Cr0::WP | Cr0::PG)?;
        Ok(GuestKernel {
            cfg,
            kernel_root: root,
            nodes,
            processes: Vec::new(),
            current: None,
            next_pid: 1,
            shared: HashMap::new(),
            pcid_clean: HashMap::new(),
            stats: KernelStats::default(),
        })
    }

    /// The kernel's own top-level table.
    pub fn kernel_root(&self) -> Gpa {
        self.kernel_root
    }

    /// The current process.
    pub fn current_pid(&self) -> Option<u32> {
        self.current.map(|i| self.processes[i].pid)
    }

    /// The process list.
    pub fn processes(&self) -> &[Process] {
        &self.processes
    }

    fn kread<C: GuestCpu>(cpu: &mut C, gpa: u64) -> Result<u64, KernelError> {
        Ok(cpu.read(Gva::new(DIRECT_MAP + gpa), 8)?)
    }

    fn kwrite<C: GuestCpu>(cpu: &mut C, gpa: u64, val: u64) -> Result<(), KernelError> {
        Ok(cpu.write(Gva::new(DIRECT_MAP + gpa), 8, val)?)
    }

    /// Allocates a frame and clears it with stores (clear_page).
    fn alloc_frame<C: GuestCpu>(&mut self, cpu: &mut C, node: usize) -> Result<u64, KernelError> {
        let f = self.take_frame(node)?;
        for off in (0..4096).step_by(8) {
            Self::kwrite(cpu, f + off, 0)?;
        }
        Ok(f)
    }

    /// Takes a frame from `node` (or the next node with memory), contents as they are.
    fn take_frame(&mut self, node: usize) -> Result<u64, KernelError> {
        let n = self.nodes.len();
        let f = (0..n)
            .map(|i| (node + i) % n)
            .find_map(|i| {
                let nd = &mut self.nodes[i];
                nd.free.pop().or_else(|| {
                    (nd.next + 4096 <= nd.end).then(|| {
                        nd.next += 4096;
                        nd.next - 4096
                    })
                })
            })
            .ok_or(KernelError::OutOfMemory(self.cfg.mem_size))?;
        Ok(f)
    }

    /// Returns a frame to the free list of the node it belongs to. A frame outside every
    /// node (only a corrupted PTE could name one) is dropped rather than handed out later.
    fn free_frame(&mut self, f: u64) {
        if let Some(nd) = self.nodes.iter_mut().find(|n| n.start <= f && f < n.end) {
            nd.free.push(f);
        }
    }

    /// Drops one mapping of data frame `f`: the frame is freed when it was the last one.
    /// Returns whether it was freed.
    fn put_frame(&mut self, f: u64) -> bool {
        if let Some(c) = self.shared.get_mut(&f) {
            *c -= 1;
            if *c <= 1 {
                self.shared.remove(&f);
            }
            return false;
        }
        self.free_frame(f);
        self.stats.pages_freed += 1;
        true
    }

    /// How many PTEs map data frame `frame` as the kernel counts them: more than 1 while it
    /// is shared copy-on-write, else 1 (also for a frame that is not mapped at all).
    pub fn share_count(&self, frame: Gpa) -> u32 {
        self.shared.get(&frame.raw()).copied().unwrap_or(1)
    }

    /// Frames the allocator can still hand out (free lists plus never-used memory).
    pub fn free_frames(&self) -> u64 {
        self.nodes.iter().map(|n| n.free.len() as u64 + n.end.saturating_sub(n.next) / 4096).sum()
    }

    /// The address of the table an entry at level > 1 points to, checked: large pages are
    /// never used in the user half and a table must lie in RAM.
    fn table_of(&self, e: u64) -> Result<u64, KernelError> {
        let t = e & ADDR;
        if e & PS != 0 || t >= self.cfg.mem_size {
            return Err(KernelError::Invalid(format!("corrupt user page-table entry {e:#x}")));
        }
        Ok(t)
    }

    /// The data frame a present user leaf maps, checked to lie in RAM.
    fn frame_of(&self, e: u64) -> Result<u64, KernelError> {
        let f = e & ADDR;
        if f >= self.cfg.mem_size {
            return Err(KernelError::Invalid(format!("corrupt user PTE {e:#x}")));
        }
        Ok(f)
    }

    /// Creates a process sharing the kernel half of the address space. Process ids start
    /// at 1 and are never reused.
    pub fn create_process<C: GuestCpu>(&mut self, cpu: &mut C) -> Result<u32, KernelError> {
        let prev = self.enter_kernel(cpu);
        let r = self.new_process(cpu);
        cpu.set_cpl(prev);
        r
    }

    /// Allocates a top-level table, copies the kernel half into it and adds the process
    /// (empty user half, no VMAs). Runs in the kernel.
    fn new_process<C: GuestCpu>(&mut self, cpu: &mut C) -> Result<u32, KernelError> {
        let pid = self.next_pid;
        let node = (pid as usize).wrapping_sub(1) % self.nodes.len();
        let root = self.alloc_frame(cpu, node)?;
        self.stats.pt_pages += 1;
        for i in USER_SLOTS..512 {
            let e = match Self::kread(cpu, self.kernel_root.raw() + i * 8) {
                Ok(e) => e,
                Err(err) => {
                    self.free_frame(root);
                    return Err(err);
                }
            };
            if e != 0 {
                if let Err(err) = Self::kwrite(cpu, root + i * 8, e) {
                    self.free_frame(root);
                    return Err(err);
                }
            }
        }
        self.next_pid = pid.checked_add(1).ok_or_else(|| KernelError::Invalid("out of process ids".into()))?;
        // pid % 4095 + 1 is in 1..=4095 (a PCID other than 0), so it fits u16.
        #[allow(clippy::cast_possible_truncation)]
        let pcid = if self.cfg.pcid { (pid % 4095 + 1) as u16 } else { 0 };
        self.processes.push(Process { pid, root: Gpa::new(root), vmas: Vec::new(), pcid, node });
        Ok(pid)
    }

    fn proc_index(&self, pid: u32) -> Result<usize, KernelError> {
        self.processes
            .iter()
            .position(|p| p.pid == pid)
            .ok_or_else(|| KernelError::Invalid(format!("no process {pid}")))
    }

    /// Adds an anonymous mapping [start, start+len) to a process (no pages yet), not
    /// executable.
    pub fn mmap(&mut self, pid: u32, start: u64, len: u64, writable: bool) -> Result<(), KernelError> {
        self.mmap_prot(pid, start, len, writable, false)
    }

    /// Adds an anonymous mapping [start, start+len) with the given protection (its PTEs
    /// get NX unless `executable`).
    pub fn mmap_prot(
        &mut self,
        pid: u32,
        start: u64,
        len: u64,
        writable: bool,
        executable: bool,
    ) -> Result<(), KernelError> {
        if !start.is_multiple_of(4096) || len == 0 || start.checked_add(len).is_none_or(|e| e > 1 << 47) {
            return Err(KernelError::Invalid(format!("bad mmap range {start:#x}+{len:#x}")));
        }
        let i = self.proc_index(pid)?;
        self.processes[i].vmas.push(Vma { start, end: start + len.next_multiple_of(4096), writable, executable });
        Ok(())
    }

    /// Switches to process `pid` (MOV CR3). With PCIDs the switch keeps the PCID's
    /// translations (no-flush bit) when they are known to be the process's own and current;
    /// otherwise (first use of the PCID by this process, or PTEs of the process downgraded
    /// while it was not running) it flushes the PCID.
    pub fn switch_to<C: GuestCpu>(&mut self, cpu: &mut C, pid: u32) -> Result<(), KernelError> {
        let i = self.proc_index(pid)?;
        if self.current == Some(i) {
            return Ok(());
        }
        let p = &self.processes[i];
        let keep = self.cfg.pcid && self.pcid_clean.get(&p.pcid) == Some(&pid);
        let cr3 = self.cr3_of(i, keep);
        let pcid = p.pcid;
        let prev = self.enter_kernel(cpu);
        cpu.write_cr3(cr3)?;
        cpu.set_cpl(prev);
        if self.cfg.pcid {
            if !keep {
                self.stats.tlb_flushes += 1;
            }
            self.pcid_clean.insert(pcid, pid);
        }
        self.current = Some(i);
        self.stats.context_switches += 1;
        Ok(())
    }

    /// The CR3 value of process `i`; `keep` sets the no-flush bit (PCIDs only).
    fn cr3_of(&self, i: usize, keep: bool) -> u64 {
        let p = &self.processes[i];
        if self.cfg.pcid {
            p.root.raw() | u64::from(p.pcid) | (u64::from(keep) << 63)
        } else {
            p.root.raw()
        }
    }

    /// After PTEs of process `i` were downgraded (write-protected or cleared): flushes its
    /// translations if it is current (CR3 reload, without the no-flush bit), otherwise makes
    /// sure the next switch to it flushes its PCID. (Without PCIDs every switch flushes.)
    fn flush_process<C: GuestCpu>(&mut self, cpu: &mut C, i: usize) -> Result<(), KernelError> {
        let (pid, pcid) = (self.processes[i].pid, self.processes[i].pcid);
        if self.current == Some(i) {
            cpu.write_cr3(self.cr3_of(i, false))?;
            self.stats.tlb_flushes += 1;
            if self.cfg.pcid {
                self.pcid_clean.insert(pcid, pid);
            }
        } else if self.cfg.pcid && self.pcid_clean.get(&pcid) == Some(&pid) {
            self.pcid_clean.remove(&pcid);
        }
        Ok(())
    }

    fn enter_kernel<C: GuestCpu>(&self, cpu: &mut C) -> u8 {
        let prev = if self.current.is_some() { 3 } else { 0 };
        cpu.set_cpl(0);
        prev
    }

    /// A user-mode access by the current process, with demand paging: a #PF inside a VMA
    /// is handled and the access retried.
    pub fn access<C: GuestCpu>(
        &mut self,
        cpu: &mut C,
        va: u64,
        kind: AccessKind,
        size: u8,
        val: u64,
    ) -> Result<u64, KernelError> {
        let i = self.current.ok_or_else(|| KernelError::Invalid("no current process".into()))?;
        cpu.set_cpl(3);
        for _ in 0..8 {
            let r = match kind {
                AccessKind::Read => cpu.read(Gva::new(va), size),
                AccessKind::Write => cpu.write(Gva::new(va), size, val).map(|_| 0),
                AccessKind::Fetch => cpu.fetch(Gva::new(va), size),
            };
            match r {
                Ok(v) => return Ok(v),
                Err(GuestError::Exception(Exception::PageFault { cr2, error_code })) => {
                    self.handle_page_fault(cpu, i, cr2, error_code.0, kind)?;
                    cpu.set_cpl(3);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(KernelError::Invalid(format!("access at {va:#x} kept faulting")))
    }

    /// The #PF handler: demand-allocates the page (and any missing page tables), or resolves
    /// a write to a copy-on-write page.
    fn handle_page_fault<C: GuestCpu>(
        &mut self,
        cpu: &mut C,
        i: usize,
        cr2: u64,
        ec: u32,
        kind: AccessKind,
    ) -> Result<(), KernelError> {
        cpu.set_cpl(0);
        self.stats.page_faults += 1;
        let p = &self.processes[i];
        let (pid, node) = (p.pid, p.node);
        let vma = p.vmas.iter().find(|v| cr2 >= v.start && cr2 < v.end).copied();
        let segv = KernelError::Segfault { pid, va: cr2, kind, error_code: ec };
        let Some(vma) = vma else { return Err(segv) };
        if ec & PF_P != 0 {
            // A protection fault inside a VMA: only a write to a copy-on-write page of a
            // writable mapping can be fixed.
            if ec & (PF_P | PF_W | PF_RSVD) != PF_P | PF_W || !vma.writable {
                return Err(segv);
            }
            return self.cow_fault(cpu, i, cr2, node, segv);
        }
        let mut table = p.root.raw();
        for level in (2..=self.cfg.levels).rev() {
            let idx = (cr2 >> (12 + 9 * (u32::from(level) - 1))) & 511;
            let e = Self::kread(cpu, table + idx * 8)?;
            table = if e & 1 == 0 {
                let t = self.alloc_frame(cpu, node)?;
                self.stats.pt_pages += 1;
                Self::kwrite(cpu, table + idx * 8, t | 0x7)?;
                t
            } else {
                self.table_of(e)?
            };
        }
        let idx = (cr2 >> 12) & 511;
        let frame = self.alloc_frame(cpu, node)?;
        self.stats.pages_allocated += 1;
        let w = if vma.writable { RW } else { 0 };
        let nx = if vma.executable { 0 } else { 1 << 63 };
        Self::kwrite(cpu, table + idx * 8, frame | 0x5 | w | nx)?;
        Ok(())
    }

    /// A write-protection fault on a present, read-only PTE in a writable VMA: copy-on-write.
    /// A frame no longer shared is made writable again in place; a shared one is copied
    /// (512 loads and 512 stores through the direct map) to a new frame the PTE then maps
    /// writable, the old frame loses a mapping and the address is INVLPG'd.
    fn cow_fault<C: GuestCpu>(
        &mut self,
        cpu: &mut C,
        i: usize,
        cr2: u64,
        node: usize,
        segv: KernelError,
    ) -> Result<(), KernelError> {
        let Some(pte_at) = self.pte_addr(cpu, i, cr2)? else {
            // Gone since the fault was raised: retrying faults afresh.
            return Ok(());
        };
        let e = Self::kread(cpu, pte_at)?;
        if e & P == 0 || e & RW != 0 {
            // Already fixed (a spurious fault from a stale read-only translation): retry.
            return Ok(());
        }
        if e & US == 0 {
            return Err(segv);
        }
        let old = self.frame_of(e)?;
        self.stats.cow_faults += 1;
        if self.share_count(Gpa::new(old)) == 1 {
            // wp_page_reuse: only this PTE maps the frame. Upgrading rights needs no flush.
            Self::kwrite(cpu, pte_at, e | RW | A | D)?;
            return Ok(());
        }
        let new = self.take_frame(node)?;
        let copied = (0..4096u64).step_by(8).try_for_each(|off| {
            let v = Self::kread(cpu, old + off)?;
            Self::kwrite(cpu, new + off, v)
        });
        if let Err(err) = copied.and_then(|()| Self::kwrite(cpu, pte_at, new | (e & !ADDR) | RW | A | D)) {
            self.free_frame(new);
            return Err(err);
        }
        self.stats.pages_allocated += 1;
        self.stats.cow_copies += 1;
        self.put_frame(old);
        cpu.invlpg(Gva::new(cr2 & !4095));
        self.stats.invlpgs += 1;
        Ok(())
    }

    /// munmap: clears the PTEs of [start, start+len) with stores, drops the frames' mappings
    /// (a frame shared copy-on-write is freed only with its last mapping) and flushes each
    /// page with INVLPG if the process is current — what Linux's zap + flush does; for a
    /// process not running, its next switch flushes instead. Returns the number of pages
    /// unmapped. Page-table pages left empty are kept until exec or exit (Linux, too, frees
    /// them only when no VMA covers their range any more).
    pub fn munmap<C: GuestCpu>(&mut self, cpu: &mut C, pid: u32, start: u64, len: u64) -> Result<u64, KernelError> {
        let i = self.proc_index(pid)?;
        let prev = self.enter_kernel(cpu);
        let end = start.saturating_add(len).min(1 << 47);
        let mut unmapped = 0;
        let mut va = start & !4095;
        while va < end {
            match self.pte_walk(cpu, i, va)? {
                Ok(pte_at) => {
                    let e = Self::kread(cpu, pte_at)?;
                    if e & 1 != 0 {
                        Self::kwrite(cpu, pte_at, 0)?;
                        let f = self.frame_of(e)?;
                        self.put_frame(f);
                        unmapped += 1;
                        if self.current == Some(i) {
                            cpu.invlpg(Gva::new(va));
                            self.stats.invlpgs += 1;
                        }
                    }
                    va += 4096;
                }
                // Nothing is mapped under a non-present entry: skip the whole range it
                // covers (zap_pmd_range / zap_pud_range skip empty entries), so the walk
                // costs what is mapped, not the length of the range.
                Err(level) => va = (va | ((1u64 << (12 + 9 * (u32::from(level) - 1))) - 1)).saturating_add(1),
            }
        }
        if unmapped > 0 && self.current != Some(i) {
            self.flush_process(cpu, i)?;
        }
        let p = &mut self.processes[i];
        let mut vmas = Vec::new();
        for v in &p.vmas {
            if v.end <= start || v.start >= end {
                vmas.push(*v);
                continue;
            }
            if v.start < start {
                vmas.push(Vma { end: start, ..*v });
            }
            if v.end > end {
                vmas.push(Vma { start: end, ..*v });
            }
        }
        p.vmas = vmas;
        cpu.set_cpl(prev);
        Ok(unmapped)
    }

    fn pte_addr<C: GuestCpu>(&self, cpu: &mut C, i: usize, va: u64) -> Result<Option<u64>, KernelError> {
        Ok(self.pte_walk(cpu, i, va)?.ok())
    }

    /// Walks process `i`'s tables to the PTE for `va`: its address, or the level (2 and up)
    /// of the first non-present entry on the way.
    fn pte_walk<C: GuestCpu>(&self, cpu: &mut C, i: usize, va: u64) -> Result<Result<u64, u8>, KernelError> {
        let mut table = self.processes[i].root.raw();
        for level in (2..=self.cfg.levels).rev() {
            let idx = (va >> (12 + 9 * (u32::from(level) - 1))) & 511;
            let e = Self::kread(cpu, table + idx * 8)?;
            if e & 1 == 0 {
                return Ok(Err(level));
            }
            table = self.table_of(e)?;
        }
        Ok(Ok(table + ((va >> 12) & 511) * 8))
    }

    /// The PTE mapping user address `va` in process `pid` (read by the kernel through the
    /// direct map), or None if no page is mapped there.
    pub fn user_pte<C: GuestCpu>(&self, cpu: &mut C, pid: u32, va: u64) -> Result<Option<u64>, KernelError> {
        let i = self.proc_index(pid)?;
        if va >= 1 << 47 {
            return Ok(None);
        }
        let prev = self.enter_kernel(cpu);
        let r = self.pte_addr(cpu, i, va).and_then(|at| match at {
            Some(at) => Self::kread(cpu, at).map(|e| (e & P != 0).then_some(e)),
            None => Ok(None),
        });
        cpu.set_cpl(prev);
        r
    }
}
