//! A guest kernel model: it maps all of guest RAM in a direct map, builds its processes'
//! page tables with ordinary stores through that direct map, handles its own #PF by demand
//! paging, and switches address spaces with MOV CR3.
//!
//! Everything it does to guest memory goes through the vCPU, so under any MMU it meets the
//! same faults and write protection a real guest kernel would.

use crate::boot::BootMem;
use crate::pagetable::{FrameBump, PageTableBuilder, PteFlags};
use vmmu::hw::cpu::Exception;
use vmmu::machine::GuestCpu;
use vmmu::x86_paging::access::AccessKind;
use vmmu::x86_paging::addr::{Gpa, Gva};
use vmmu::x86_paging::regs::{Cr0, Cr4, Efer};
use vmmu::GuestError;

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
}

/// The guest kernel.
pub struct GuestKernel {
    cfg: KernelConfig,
    kernel_root: Gpa,
    nodes: Vec<Node>,
    processes: Vec<Process>,
    current: Option<usize>,
    /// Counters.
    pub stats: KernelStats,
}

const ADDR: u64 = 0x000f_ffff_ffff_f000;

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
        for off in (0..4096).step_by(8) {
            Self::kwrite(cpu, f + off, 0)?;
        }
        Ok(f)
    }

    /// Creates a process sharing the kernel half of the address space.
    pub fn create_process<C: GuestCpu>(&mut self, cpu: &mut C) -> Result<u32, KernelError> {
        let prev = self.enter_kernel(cpu);
        let node = self.processes.len() % self.nodes.len();
        let root = self.alloc_frame(cpu, node)?;
        self.stats.pt_pages += 1;
        for i in 256..512u64 {
            let e = Self::kread(cpu, self.kernel_root.raw() + i * 8)?;
            if e != 0 {
                Self::kwrite(cpu, root + i * 8, e)?;
            }
        }
        cpu.set_cpl(prev);
        let pid = self.processes.len() as u32 + 1;
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

    /// Adds an anonymous mapping [start, start+len) to a process (no pages yet).
    pub fn mmap(&mut self, pid: u32, start: u64, len: u64, writable: bool) -> Result<(), KernelError> {
        if !start.is_multiple_of(4096) || len == 0 || start.checked_add(len).is_none_or(|e| e > 1 << 47) {
            return Err(KernelError::Invalid(format!("bad mmap range {start:#x}+{len:#x}")));
        }
        let i = self.proc_index(pid)?;
        self.processes[i].vmas.push(Vma { start, end: start + len.next_multiple_of(4096), writable });
        Ok(())
    }

    /// Switches to process `pid` (MOV CR3; with PCIDs, without flushing).
    pub fn switch_to<C: GuestCpu>(&mut self, cpu: &mut C, pid: u32) -> Result<(), KernelError> {
        let i = self.proc_index(pid)?;
        if self.current == Some(i) {
            return Ok(());
        }
        let p = &self.processes[i];
        let cr3 = if self.cfg.pcid { p.root.raw() | u64::from(p.pcid) | (1 << 63) } else { p.root.raw() };
        let prev = self.enter_kernel(cpu);
        cpu.write_cr3(cr3)?;
        cpu.set_cpl(prev);
        self.current = Some(i);
        self.stats.context_switches += 1;
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

    /// The #PF handler: demand-allocates the page (and any missing page tables).
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
        if ec & 1 != 0 {
            // A protection fault inside a VMA: nothing this kernel can fix (no COW yet).
            return Err(segv);
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
                e & ADDR
            };
        }
        let idx = (cr2 >> 12) & 511;
        let frame = self.alloc_frame(cpu, node)?;
        self.stats.pages_allocated += 1;
        let w = if vma.writable { 2 } else { 0 };
        Self::kwrite(cpu, table + idx * 8, frame | 0x5 | w | (1 << 63))?;
        Ok(())
    }

    /// munmap: clears the PTEs of [start, start+len) with stores, frees the frames and
    /// flushes each page with INVLPG (the current process) — what Linux's zap + flush does.
    pub fn munmap<C: GuestCpu>(&mut self, cpu: &mut C, pid: u32, start: u64, len: u64) -> Result<u64, KernelError> {
        let i = self.proc_index(pid)?;
        let prev = self.enter_kernel(cpu);
        let end = start + len;
        let mut freed = 0;
        let mut va = start & !4095;
        while va < end {
            if let Some(pte_at) = self.pte_addr(cpu, i, va)? {
                let e = Self::kread(cpu, pte_at)?;
                if e & 1 != 0 {
                    Self::kwrite(cpu, pte_at, 0)?;
                    let f = e & ADDR;
                    let node = self.nodes.iter().position(|n| f < n.end).unwrap_or(0);
                    self.nodes[node].free.push(f);
                    freed += 1;
                    if self.current == Some(i) {
                        cpu.invlpg(Gva::new(va));
                        self.stats.invlpgs += 1;
                    }
                }
            }
            va += 4096;
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
        Ok(freed)
    }

    fn pte_addr<C: GuestCpu>(&self, cpu: &mut C, i: usize, va: u64) -> Result<Option<u64>, KernelError> {
        let mut table = self.processes[i].root.raw();
        for level in (2..=self.cfg.levels).rev() {
            let idx = (va >> (12 + 9 * (u32::from(level) - 1))) & 511;
            let e = Self::kread(cpu, table + idx * 8)?;
            if e & 1 == 0 {
                return Ok(None);
            }
            table = e & ADDR;
        }
        Ok(Some(table + ((va >> 12) & 511) * 8))
    }
}
