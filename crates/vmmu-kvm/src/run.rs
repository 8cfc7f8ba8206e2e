//! Runs a [`WorkloadSpec`] on `/dev/kvm` and reports KVM's statistics per phase.

use std::collections::BTreeMap;
use std::time::Instant;

use kvm_bindings::{kvm_segment, KVM_CAP_BINARY_STATS_FD, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::KvmError;
use crate::guest::{self, BuiltGuest};
use crate::host::HostKind;
use crate::spec::WorkloadSpec;
use crate::stats::{StatsFd, StatsSnapshot};
use crate::tracefs::{KvmTrace, TraceSession, PHASE_END_MARKER, RUN_START_MARKER};

/// One phase as measured on the real KVM.
#[derive(Clone, Debug, Serialize)]
pub struct KvmPhase {
    /// Phase name (`boot` for the implicit first phase).
    pub name: String,
    /// Wall time from resuming the vCPU to the phase's end exit, in nanoseconds.
    pub wall_ns: u64,
    /// VM statistics (`struct kvm_vm_stat`): counters as deltas over the phase, gauges
    /// (`pages_4k`, ...) and peaks as values at its end.
    pub vm: BTreeMap<String, u64>,
    /// vCPU statistics (`struct kvm_vcpu_stat`), the same way.
    pub vcpu: BTreeMap<String, u64>,
}

impl KvmPhase {
    /// A statistic by KVM name, from the vCPU or the VM statistics.
    pub fn stat(&self, name: &str) -> Option<u64> {
        self.vcpu.get(name).or_else(|| self.vm.get(name)).copied()
    }

    /// VM and vCPU statistics in one map (their names do not overlap).
    pub fn stats(&self) -> BTreeMap<String, u64> {
        let mut m = self.vm.clone();
        m.extend(self.vcpu.iter().map(|(k, v)| (k.clone(), *v)));
        m
    }
}

/// One KVM_TRANSLATE check of the final address space.
#[derive(Clone, Debug, Serialize)]
pub struct Translation {
    /// The guest-virtual address.
    pub gva: u64,
    /// The GPA the backend's page tables map it to.
    pub expected_gpa: u64,
    /// What KVM_TRANSLATE returned (None if not valid).
    pub kvm_gpa: Option<u64>,
}

/// The result of running one workload on the real KVM.
#[derive(Clone, Debug, Serialize)]
pub struct KvmRun {
    /// The workload's name.
    pub workload: String,
    /// The host kind (compare only with the matching vmmu MMU: [`HostKind::vmmu_mmu`]).
    pub host: HostKind,
    /// Phases in order, `boot` first.
    pub phases: Vec<KvmPhase>,
    /// KVM_TRANSLATE checks (all matched, or the run would have failed).
    pub translations: Vec<Translation>,
    /// Region pages whose final contents were checked against the backend's model.
    pub checked_writes: usize,
    /// Region leaf PTEs whose final A/D bits were checked against the backend's model.
    pub checked_ptes: usize,
}

impl KvmRun {
    /// A phase by name.
    pub fn phase(&self, name: &str) -> Option<&KvmPhase> {
        self.phases.iter().find(|p| p.name == name)
    }
}

/// Whether `/dev/kvm` can be opened here (tests use this to skip).
pub fn kvm_available() -> Result<(), KvmError> {
    Kvm::new().map(drop).map_err(|e| KvmError::NoKvm(e.to_string()))
}

/// Most exits a run may take before it is declared runaway (phase ends, #UD round trips and
/// emulation exits all stay far below this).
const MAX_EXITS: u64 = 10_000_000;

/// The VM, its vCPU and its memory, declared in drop order: the VM goes before its memory.
struct Machine {
    vcpu: VcpuFd,
    vm: VmFd,
    guest: BuiltGuest,
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: (selector & 3) as u8,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn setup_vcpu(kvm: &Kvm, m: &Machine) -> Result<(), KvmError> {
    let cpuid =
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|e| KvmError::ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
    m.vcpu.set_cpuid2(&cpuid).map_err(|e| KvmError::ioctl("KVM_SET_CPUID2", e))?;

    let mut s = m.vcpu.get_sregs().map_err(|e| KvmError::ioctl("KVM_GET_SREGS", e))?;
    // Start directly at CPL3 in 64-bit mode: CS/SS are the DPL-3 user segments.
    s.cs = segment(guest::SEL_UCODE, true);
    for seg in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
        *seg = segment(guest::SEL_UDATA, false);
    }
    s.tr = kvm_segment {
        base: guest::TSS_GPA,
        limit: guest::TSS_LIMIT,
        selector: guest::SEL_TSS,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    s.ldt = kvm_segment { type_: 0x2, present: 1, limit: 0xffff, unusable: 1, ..Default::default() };
    s.gdt.base = guest::GDT_GPA;
    s.gdt.limit = guest::GDT_LIMIT;
    s.idt.base = guest::IDT_GPA;
    s.idt.limit = guest::IDT_VECTORS * 16 - 1;
    // PG | WP | NE | ET | MP | PE; CR4.PAE; EFER.LME | LMA.
    s.cr0 = (1 << 31) | (1 << 16) | (1 << 5) | (1 << 4) | (1 << 1) | 1;
    s.cr4 = 1 << 5;
    s.efer = (1 << 8) | (1 << 10);
    s.cr3 = m.guest.roots[0];
    m.vcpu.set_sregs(&s).map_err(|e| KvmError::ioctl("KVM_SET_SREGS", e))?;

    let mut r = m.vcpu.get_regs().map_err(|e| KvmError::ioctl("KVM_GET_REGS", e))?;
    r.rip = m.guest.entry;
    r.rsp = guest::USTACK_TOP;
    r.rflags = 0x2; // IF clear, IOPL 0: port I/O goes through the TSS bitmap
    r.r15 = 1;
    m.vcpu.set_regs(&r).map_err(|e| KvmError::ioctl("KVM_SET_REGS", e))?;
    Ok(())
}

fn exception_name(v: u8) -> &'static str {
    match v {
        0 => "#DE",
        1 => "#DB",
        3 => "#BP",
        6 => "#UD (unknown request)",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        17 => "#AC",
        _ => "exception",
    }
}

fn fatal(m: &Machine, vector: u8) -> KvmError {
    let regs = m.vcpu.get_regs().unwrap_or_default();
    let sregs = m.vcpu.get_sregs().unwrap_or_default();
    let read = |a: u64| m.guest.mem.read_obj::<u64>(GuestAddress(a)).unwrap_or(0);
    let has_code = matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30);
    let (error_code, rip) = if has_code { (read(regs.rsp), read(regs.rsp + 8)) } else { (0, read(regs.rsp)) };
    KvmError::GuestException { vector, name: exception_name(vector), rip, error_code, cr2: sregs.cr2 }
}

/// Runs `spec` on a new VM on `/dev/kvm`: boots the guest at CPL3 in 64-bit mode, snapshots
/// the VM's and the vCPU's binary statistics at the end of every phase, and checks the result
/// against the backend's model of the guest (the bytes every write left, the A/D bits of every
/// region PTE, and KVM_TRANSLATE of a few addresses).
pub fn run_workload(spec: &WorkloadSpec) -> Result<KvmRun, KvmError> {
    run(spec, None)
}

/// [`run_workload`] with the real KVM's tracepoints captured from tracefs
/// ([`crate::tracefs`]): the `kvmmmu` events, `kvm_exit` and `kvm_page_fault` of the calling
/// thread (which runs the vCPU), split into phases at the phase-end exits. tracefs is restored
/// when this returns, on success or error. Needs root and tracefs at `/sys/kernel/tracing`.
pub fn run_workload_traced(spec: &WorkloadSpec) -> Result<(KvmRun, KvmTrace), KvmError> {
    let tid = crate::tracefs::current_tid()?;
    let session = TraceSession::start(tid)?;
    let run = run(spec, Some(&session))?;
    let trace = session.finish()?;
    if trace.phases.len() != run.phases.len() {
        return Err(KvmError::Trace(format!(
            "the trace has {} phase-end markers for {} phases",
            trace.phases.len(),
            run.phases.len()
        )));
    }
    Ok((run, trace))
}

fn run(spec: &WorkloadSpec, trace: Option<&TraceSession>) -> Result<KvmRun, KvmError> {
    let host = HostKind::detect();
    let kvm = Kvm::new().map_err(|e| KvmError::NoKvm(e.to_string()))?;
    if kvm.check_extension_raw(KVM_CAP_BINARY_STATS_FD.into()) <= 0 {
        return Err(KvmError::MissingCap("KVM_CAP_BINARY_STATS_FD"));
    }
    let built = guest::build(spec)?;
    let vm = kvm.create_vm().map_err(|e| KvmError::ioctl("KVM_CREATE_VM", e))?;
    crate::sys::register_memory(&vm, &built.mem).map_err(|e| KvmError::ioctl("KVM_SET_USER_MEMORY_REGION", e))?;
    if let Some(n) = spec.nr_mmu_pages {
        crate::sys::set_nr_mmu_pages(&vm, n).map_err(|e| KvmError::ioctl("KVM_SET_NR_MMU_PAGES", e))?;
    }
    let vcpu = vm.create_vcpu(0).map_err(|e| KvmError::ioctl("KVM_CREATE_VCPU", e))?;
    let mut m = Machine { vcpu, vm, guest: built };
    setup_vcpu(&kvm, &m)?;

    let vm_stats = StatsFd::open(&m.vm)?;
    let vcpu_stats = StatsFd::open(&m.vcpu)?;
    let names: Vec<String> =
        std::iter::once("boot".to_string()).chain(spec.phases.iter().map(|p| p.name.clone())).collect();

    let mut phases = Vec::new();
    let mut before: (StatsSnapshot, StatsSnapshot) = (vm_stats.read()?, vcpu_stats.read()?);
    if let Some(t) = trace {
        t.marker(RUN_START_MARKER)?;
    }
    let mut started = Instant::now();
    let mut exits = 0u64;
    loop {
        exits += 1;
        if exits > MAX_EXITS {
            return Err(KvmError::Runaway(exits));
        }
        let exit = m.vcpu.run();
        let stop = Instant::now();
        let event = match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut v = [0u8; 4];
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                Ok((port, u32::from_le_bytes(v)))
            }
            Ok(other) => Err(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(KvmError::ioctl("KVM_RUN", e)),
        };
        let rip = || m.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
        match event {
            Ok((guest::PORT_PHASE, index)) => {
                let index = index as usize;
                if index != phases.len() || index >= names.len() {
                    return Err(KvmError::UnexpectedExit {
                        exit: format!("end of phase {index} out of order"),
                        rip: rip(),
                        phase: phases.len(),
                    });
                }
                if let Some(t) = trace {
                    t.marker(&format!("{PHASE_END_MARKER} {index}"))?;
                }
                let after = (vm_stats.read()?, vcpu_stats.read()?);
                phases.push(KvmPhase {
                    name: names[index].clone(),
                    wall_ns: u64::try_from(stop.duration_since(started).as_nanos()).unwrap_or(u64::MAX),
                    vm: after.0.delta_since(&before.0),
                    vcpu: after.1.delta_since(&before.1),
                });
                before = after;
            }
            Ok((guest::PORT_DONE, _)) if phases.len() == names.len() => break,
            Ok((port, value)) => {
                // A fatal exception reports its vector, which fits 8 bits; anything else on the
                // port is as unexpected as a write to another port.
                return Err(match u8::try_from(value) {
                    Ok(vector) if port == guest::PORT_FATAL => fatal(&m, vector),
                    _ => KvmError::UnexpectedExit {
                        exit: format!("IoOut port {port:#x} value {value:#x}"),
                        rip: rip(),
                        phase: phases.len(),
                    },
                });
            }
            Err(exit) => return Err(KvmError::UnexpectedExit { exit, rip: rip(), phase: phases.len() }),
        }
        started = Instant::now();
    }

    let translations = check(&mut m)?;
    Ok(KvmRun {
        workload: spec.name.clone(),
        host,
        phases,
        translations,
        checked_writes: m.guest.expected.writes.len(),
        checked_ptes: m.guest.expected.ptes.len(),
    })
}

/// The oracles: every write landed in the frame the guest's tables said, every region PTE has
/// the A/D bits the accesses imply, and KVM_TRANSLATE agrees with the tables.
fn check(m: &mut Machine) -> Result<Vec<Translation>, KvmError> {
    let e = &m.guest.expected;
    let mem: &GuestMemoryMmap = &m.guest.mem;
    let read = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).map_err(|e| KvmError::Memory(e.to_string()));
    let mut bad = Vec::new();
    for (&gpa, &want) in &e.writes {
        let got = read(gpa)?;
        if got != want && bad.len() < 8 {
            bad.push(format!("frame {gpa:#x} holds {got} but the last write to it stored {want}"));
        }
    }
    for (&at, &want) in &e.ptes {
        let got = read(at)?;
        if got != want && bad.len() < 8 {
            bad.push(format!("PTE at {at:#x} is {got:#x}, expected {want:#x} (A/D bits after the accesses)"));
        }
    }
    if !bad.is_empty() {
        return Err(KvmError::TranslateMismatch(format!(
            "the guest's memory disagrees with the model: {}",
            bad.join("; ")
        )));
    }
    let mut out = Vec::new();
    for &(gva, gpa) in &e.translations {
        let t = m.vcpu.translate_gva(gva).map_err(|err| KvmError::ioctl("KVM_TRANSLATE", err))?;
        let kvm_gpa = (t.valid != 0).then_some(t.physical_address);
        out.push(Translation { gva, expected_gpa: gpa, kvm_gpa });
        if kvm_gpa != Some(gpa) {
            return Err(KvmError::TranslateMismatch(format!(
                "GVA {gva:#x} should map to GPA {gpa:#x} but KVM_TRANSLATE gives {kvm_gpa:x?}"
            )));
        }
    }
    Ok(out)
}
