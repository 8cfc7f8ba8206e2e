//! Process lifecycle: [`fork`](GuestKernel::fork) copies a user address space
//! copy-on-write, [`exec`](GuestKernel::exec) and [`exit`](GuestKernel::exit) tear one down.

use super::{GuestKernel, KernelError, A, P, RW, USER_SLOTS};
use vmmu::machine::GuestCpu;

impl GuestKernel {
    /// fork: a new process whose user half is a copy of `pid`'s. New page tables are
    /// allocated (on the child's node) and filled with stores; every present user leaf is
    /// shared, the writable ones copy-on-write: R/W cleared in both parent and child (the
    /// child's copy also old, A clear, as Linux's copy_present_pte makes it) and the frame's
    /// share count raised. The VMAs are copied. The parent's translations are then flushed:
    /// a CR3 reload if it is current, else on its next switch. Returns the child's pid.
    pub fn fork<C: GuestCpu>(&mut self, cpu: &mut C, pid: u32) -> Result<u32, KernelError> {
        let pi = self.proc_index(pid)?;
        let prev = self.enter_kernel(cpu);
        let r = self.fork_inner(cpu, pi);
        cpu.set_cpl(prev);
        r
    }

    fn fork_inner<C: GuestCpu>(&mut self, cpu: &mut C, pi: usize) -> Result<u32, KernelError> {
        let child = self.new_process(cpu)?;
        let ci = self.processes.len() - 1;
        let (proot, croot, node) =
            (self.processes[pi].root.raw(), self.processes[ci].root.raw(), self.processes[ci].node);
        self.processes[ci].vmas = self.processes[pi].vmas.clone();
        let copied = self.copy_table(cpu, proot, croot, self.cfg.levels, node, USER_SLOTS);
        // The parent's PTEs may have been write-protected even if the copy failed half way.
        let flushed = self.flush_process(cpu, pi);
        if let Err(e) = copied.and(flushed) {
            // Undo the child (best effort: the error that stopped the fork is what matters).
            let _ = self.drop_process(cpu, ci);
            return Err(e);
        }
        self.stats.forks += 1;
        Ok(child)
    }

    /// Copies the first `n` entries of table `src` (at paging level `level`) into `dst`,
    /// recursively, sharing the leaves copy-on-write (see [`GuestKernel::fork`]).
    fn copy_table<C: GuestCpu>(
        &mut self,
        cpu: &mut C,
        src: u64,
        dst: u64,
        level: u8,
        node: usize,
        n: u64,
    ) -> Result<(), KernelError> {
        for idx in 0..n {
            let e = Self::kread(cpu, src + idx * 8)?;
            if e & P == 0 {
                continue;
            }
            if level > 1 {
                let from = self.table_of(e)?;
                let t = self.alloc_frame(cpu, node)?;
                self.stats.pt_pages += 1;
                if let Err(err) = Self::kwrite(cpu, dst + idx * 8, t | 0x7) {
                    self.free_frame(t);
                    self.stats.pt_pages_freed += 1;
                    return Err(err);
                }
                self.copy_table(cpu, from, t, level - 1, node, 512)?;
            } else {
                let f = self.frame_of(e)?;
                let mut ce = e & !A;
                if e & RW != 0 {
                    Self::kwrite(cpu, src + idx * 8, e & !RW)?;
                    ce &= !RW;
                }
                Self::kwrite(cpu, dst + idx * 8, ce)?;
                *self.shared.entry(f).or_insert(1) += 1;
            }
        }
        Ok(())
    }

    /// Drops every user mapping of process `i`: the top-level user entries are cleared with
    /// stores, its translations flushed, then its user page-table pages freed and its data
    /// frames' mappings dropped (mmu_gather order: nothing is freed while a TLB could still
    /// reach it). Returns the number of data frames freed. Runs in the kernel.
    fn drop_user<C: GuestCpu>(&mut self, cpu: &mut C, i: usize) -> Result<u64, KernelError> {
        let root = self.processes[i].root.raw();
        let (mut leaves, mut tables) = (Vec::new(), Vec::new());
        let mut cleared = false;
        for idx in 0..USER_SLOTS {
            let e = Self::kread(cpu, root + idx * 8)?;
            if e & P == 0 {
                continue;
            }
            let t = self.table_of(e)?;
            self.collect(cpu, t, self.cfg.levels - 1, &mut leaves, &mut tables)?;
            tables.push(t);
            Self::kwrite(cpu, root + idx * 8, 0)?;
            cleared = true;
        }
        if cleared {
            self.flush_process(cpu, i)?;
        }
        let mut freed = 0;
        for f in leaves {
            freed += u64::from(self.put_frame(f));
        }
        self.stats.pt_pages_freed += tables.len() as u64;
        for t in tables {
            self.free_frame(t);
        }
        Ok(freed)
    }

    /// Gathers the data frames and page-table pages under table `t` at paging level `level`.
    fn collect<C: GuestCpu>(
        &self,
        cpu: &mut C,
        t: u64,
        level: u8,
        leaves: &mut Vec<u64>,
        tables: &mut Vec<u64>,
    ) -> Result<(), KernelError> {
        for idx in 0..512 {
            let e = Self::kread(cpu, t + idx * 8)?;
            if e & P == 0 {
                continue;
            }
            if level > 1 {
                let sub = self.table_of(e)?;
                self.collect(cpu, sub, level - 1, leaves, tables)?;
                tables.push(sub);
            } else {
                leaves.push(self.frame_of(e)?);
            }
        }
        Ok(())
    }

    /// exec: drops all of process `pid`'s user mappings (frames freed with their last
    /// mapping, user page-table pages freed, top-level user entries cleared with stores),
    /// clears its VMAs and flushes its translations (a CR3 reload if it is current). Returns
    /// the number of data frames freed.
    pub fn exec<C: GuestCpu>(&mut self, cpu: &mut C, pid: u32) -> Result<u64, KernelError> {
        let i = self.proc_index(pid)?;
        let prev = self.enter_kernel(cpu);
        let r = self.drop_user(cpu, i);
        cpu.set_cpl(prev);
        let freed = r?;
        self.processes[i].vmas.clear();
        self.stats.execs += 1;
        Ok(freed)
    }

    /// exit: drops the process's user mappings as [`GuestKernel::exec`] does, frees its
    /// top-level table and removes it. The current process cannot exit (switch away
    /// first). Returns the number of data frames freed.
    pub fn exit<C: GuestCpu>(&mut self, cpu: &mut C, pid: u32) -> Result<u64, KernelError> {
        let i = self.proc_index(pid)?;
        if self.current == Some(i) {
            return Err(KernelError::Invalid(format!("process {pid} is current and cannot exit")));
        }
        let prev = self.enter_kernel(cpu);
        let r = self.drop_process(cpu, i);
        cpu.set_cpl(prev);
        let freed = r?;
        self.stats.exits += 1;
        Ok(freed)
    }

    /// Drops process `i` (not current): its user mappings, its top-level table, its entry.
    fn drop_process<C: GuestCpu>(&mut self, cpu: &mut C, i: usize) -> Result<u64, KernelError> {
        let freed = self.drop_user(cpu, i)?;
        let p = self.processes.remove(i);
        if let Some(c) = self.current {
            if c > i {
                self.current = Some(c - 1);
            }
        }
        if self.pcid_clean.get(&p.pcid) == Some(&p.pid) {
            self.pcid_clean.remove(&p.pcid);
        }
        self.free_frame(p.root.raw());
        self.stats.pt_pages_freed += 1;
        Ok(freed)
    }
}
