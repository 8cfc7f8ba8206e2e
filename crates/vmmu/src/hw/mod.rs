//! The hardware model: what the CPU does, knowing nothing of the MMU.
//!
//! A software vCPU ([`cpu::Cpu`]) holds the registers paging depends on and a TLB
//! ([`tlb::Tlb`]); it reads page-table bytes (the guest's, and in TDP mode the EPT/NPT tables
//! the hypervisor built), sets A/D bits as hardware does, and stops with a guest exception or
//! a VM exit. The hypervisor side hands exits to the MMU and resumes.

pub mod cpu;
pub mod tlb;

pub use cpu::{Cpu, CpuMode, Exception, HwCounters, Stop};
pub use tlb::Tlb;
