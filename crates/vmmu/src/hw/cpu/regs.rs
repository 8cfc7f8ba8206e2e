//! The vCPU's control-register writes (MOV to CR0/CR3/CR4, WRMSR IA32_EFER, WRPKRU, with the
//! PDPTE loads of PAE paging) and its TLB-maintenance instructions (INVLPG, INVPCID, and the
//! flushes KVM requests).

use super::{Cpu, CpuMode, Exception, NativeMem, Stop, VmExit};
use crate::host::PhysMem;
use x86_paging::access::AccessKind;
use x86_paging::addr::{Gpa, Gva};
use x86_paging::ept::{EptAccess, TdpExit};
use x86_paging::mode::{PagingMode, PdptrError};
use x86_paging::regs::{Cr0, Cr4, Efer};
use x86_paging::walk::GuestPhys;
use x86_paging::walk2d::Tdp;

impl Cpu {
    fn load_pdptrs(&mut self) -> Result<(), Stop> {
        let r = match &self.mode {
            CpuMode::Native => self.st.load_pdptrs(&mut NativeMem(&self.mem)).map_err(|e| match e {
                PdptrError::Reserved { .. } => Stop::Exception(Exception::GeneralProtection),
                PdptrError::Mem(never) => match never {},
            }),
            CpuMode::Tdp(tdp) => {
                let tdp = *tdp;
                let mut m = TdpPhys { mem: &self.mem, tdp: &tdp };
                self.st.load_pdptrs(&mut m).map_err(|e| match e {
                    PdptrError::Reserved { .. } => Stop::Exception(Exception::GeneralProtection),
                    PdptrError::Mem(x) => Stop::Exit(VmExit::Tdp(x)),
                })
            }
            // The hypervisor intercepts CR writes and loads the guest's PDPTEs itself.
            CpuMode::Shadow(_) => Ok(()),
        };
        r
    }

    fn pae_paging(&self) -> bool {
        self.st.mode() == PagingMode::Pae
    }

    fn regs_changed(&mut self) -> Result<(), Stop> {
        if self.st.efer.contains(Efer::LME) && self.st.cr0.contains(Cr0::PG) {
            self.st.efer |= Efer::LMA;
        } else {
            self.st.efer.remove(Efer::LMA);
        }
        if self.pae_paging() {
            self.load_pdptrs()?;
        }
        self.recompute_perm_table();
        self.refresh_cached();
        // Flushing more than required is always allowed; these writes are rare.
        self.tlb.flush_vpid(self.vpid);
        Ok(())
    }

    /// MOV to CR0.
    pub fn write_cr0(&mut self, v: Cr0) -> Result<(), Stop> {
        let old = self.st;
        self.st.cr0 = v;
        self.regs_changed().inspect_err(|_| self.st = old)
    }

    /// MOV to CR4.
    pub fn write_cr4(&mut self, v: Cr4) -> Result<(), Stop> {
        let old = self.st;
        self.st.cr4 = v;
        self.regs_changed().inspect_err(|_| self.st = old)
    }

    /// WRMSR IA32_EFER (LMA is computed, as hardware does).
    pub fn write_efer(&mut self, v: Efer) -> Result<(), Stop> {
        let old = self.st;
        self.st.efer = v - Efer::LMA;
        self.regs_changed().inspect_err(|_| self.st = old)
    }

    /// WRPKRU. (This TLB caches PKRU-derived rights, so it flushes; allowed, not required.)
    pub fn write_pkru(&mut self, v: u32) {
        self.st.pkru = v;
        self.tlb.flush_vpid(self.vpid);
    }

    /// MOV to CR3: loads PDPTRs in PAE mode; flushes non-global translations of the new PCID
    /// unless CR4.PCIDE and bit 63 (no-flush) are set.
    pub fn write_cr3(&mut self, v: u64) -> Result<(), Stop> {
        let pcide = self.st.cr4.contains(Cr4::PCIDE);
        let noflush = pcide && v & (1 << 63) != 0;
        let old = self.st;
        self.st.cr3 = v & !(1 << 63);
        if self.pae_paging() {
            self.load_pdptrs().inspect_err(|_| self.st = old)?;
        }
        self.refresh_cached();
        if !noflush {
            if pcide {
                self.tlb.flush_pcid(self.vpid, (self.st.cr3 & 0xfff) as u16, false);
            } else {
                self.tlb.flush_vpid_nonglobal(self.vpid, false);
            }
        }
        Ok(())
    }

    /// INVLPG: drops the translations of the page holding `gva` for the current PCID, and
    /// global ones. A non-canonical address is a no-op.
    pub fn invlpg(&mut self, gva: Gva) {
        let pcid = (self.ctx() & 0xfff) as u16;
        self.tlb.flush_addr(self.vpid, Some(pcid), gva.raw());
    }

    /// INVPCID of `kind` 0 (individual address), 1 (single context), 2 (all contexts with
    /// globals) or 3 (all contexts except globals).
    pub fn invpcid(&mut self, kind: u8, pcid: u16, gva: Gva) -> Result<(), Stop> {
        match kind {
            0 => self.tlb.flush_addr(self.vpid, Some(pcid & 0xfff), gva.raw()),
            1 => self.tlb.flush_pcid(self.vpid, pcid & 0xfff, false),
            2 => self.tlb.flush_vpid_nonglobal(self.vpid, true),
            3 => self.tlb.flush_vpid_nonglobal(self.vpid, false),
            _ => return Err(Stop::Exception(Exception::GeneralProtection)),
        }
        Ok(())
    }

    /// Flushes every translation of this vCPU's VPID (what KVM's TLB flush requests do:
    /// INVEPT / INVVPID of the current context).
    pub fn flush_tlb_current(&mut self) {
        self.tlb.flush_vpid(self.vpid);
        self.gpa_cache.flush();
    }

    /// Flushes the whole TLB.
    pub fn flush_tlb_all(&mut self) {
        self.tlb.flush_all();
        self.gpa_cache.flush();
    }
}

/// Guest-physical memory as seen through the TDP tables, for accesses the CPU makes outside a
/// linear-address walk (the PDPTE loads of MOV CR3 in PAE mode).
struct TdpPhys<'a> {
    mem: &'a PhysMem,
    tdp: &'a Tdp,
}

impl GuestPhys for TdpPhys<'_> {
    type Error = TdpExit;
    fn read_pte(&mut self, gpa: Gpa, size: u8, _gva: Gva) -> Result<u64, TdpExit> {
        let acc = EptAccess { kind: AccessKind::Read, gva: None, paging_structure: true };
        let t = self.tdp.walk(self.mem, gpa, &acc)?;
        Ok(self.mem.read(t.hpa, size))
    }
    fn cmpxchg_pte(&mut self, gpa: Gpa, _size: u8, old: u64, new: u64, _gva: Gva) -> Result<bool, TdpExit> {
        let acc = EptAccess { kind: AccessKind::Write, gva: None, paging_structure: true };
        let t = self.tdp.walk(self.mem, gpa, &acc)?;
        Ok(self.mem.cmpxchg(t.hpa, old, new).is_ok())
    }
}
