//! `vmmu bench`: the hot paths and targets of DESIGN §6 measured end to end through the
//! public API. Criterion benches of the single-thread paths live in
//! crates/vmmu-cli/benches/hotpaths.rs and share the VM builders below.
//!
//! Every result is a timed run: `ns_per_op` is its wall time per operation. Targets that are
//! not times (throughput, scaling, memory overhead) are reported as `value` in `unit`, with
//! the DESIGN target in the same unit in `target`.

use crate::error::RunError;
use crate::machine::{build, Machine};
use crate::scenario::Scenario;
use std::hint::black_box;
use std::sync::Barrier;
use std::time::Instant;
use vmmu::host::{FrameAllocator, HostError};
use vmmu::x86_paging::addr::Gva;
use vmmu::{GuestError, Vcpu, VmError};

/// Why a benchmark could not run. A variant that wraps an underlying error carries it as its
/// source and prints its text: print with `{}`, not by walking the chain.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The iteration count is out of range ([`check_iters`]).
    #[error("iterations: {0}")]
    Iters(String),
    /// A benchmark VM's scenario does not parse (a bug in the benchmark).
    #[error("{0}")]
    Scenario(#[from] crate::scenario::ScenarioError),
    /// A benchmark VM cannot be built.
    #[error("{0}")]
    Build(#[from] RunError),
    /// A vCPU access or control-register write failed.
    #[error("{0}")]
    Guest(#[from] GuestError),
    /// A host frame allocation failed.
    #[error("{0}")]
    Host(#[from] HostError),
    /// A VM ioctl (memslot update, dirty log, write protection) failed.
    #[error("{0}")]
    Vm(#[from] VmError),
    /// A vCPU thread of a parallel run panicked.
    #[error("vCPU thread panicked")]
    ThreadPanicked,
    /// A parallel run was given no vCPUs.
    #[error("no vCPUs")]
    NoVcpus,
    /// The VM has no memslot to log.
    #[error("no memslot")]
    NoMemslot,
    /// An aging pass found no young page (the touched pages were not mapped as accessed).
    #[error("{0}: no young page found")]
    NoYoungPage(&'static str),
}

/// One measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    /// What was measured.
    pub name: &'static str,
    /// Wall-clock nanoseconds per operation of the timed run.
    pub ns_per_op: f64,
    /// Operations timed.
    pub ops: u64,
    /// The DESIGN target in ns per operation, when the target is a time (else null).
    pub target_ns: Option<f64>,
    /// The headline number, in `unit` (for time targets, `ns_per_op`).
    pub value: f64,
    /// Unit of `value` and `target`.
    pub unit: &'static str,
    /// The DESIGN target in `unit`, if it sets one.
    pub target: Option<f64>,
    /// Whether a larger `value` is better (throughput, speedup) rather than smaller.
    pub higher_is_better: bool,
    /// What was counted, and how.
    pub note: String,
}

impl BenchResult {
    fn time(name: &'static str, ns: f64, ops: u64, target_ns: Option<f64>) -> Self {
        BenchResult {
            name,
            ns_per_op: ns / ops.max(1) as f64,
            ops,
            target_ns,
            value: ns / ops.max(1) as f64,
            unit: "ns/op",
            target: target_ns,
            higher_is_better: false,
            note: String::new(),
        }
    }

    fn note(mut self, note: String) -> Self {
        self.note = note;
        self
    }

    /// Whether the value meets the DESIGN target (None without a target).
    pub fn meets_target(&self) -> Option<bool> {
        self.target.map(|t| if self.higher_is_better { self.value >= t } else { self.value <= t })
    }
}

/// A VM with one memslot at gpa 0 of `mem` (a scenario size such as "64MiB") backed by
/// `backing` ("4k" or "thp"), `vcpus` vCPUs, and an identity-mapped 4-level guest with 4 KiB
/// guest pages and A/D bits preset. Workload data starts at `Machine::data_start`.
pub fn machine(backing: &str, prefault: bool, mem: &str, vcpus: u32) -> Result<Machine, BenchError> {
    machine_vm("", backing, prefault, mem, vcpus)
}

/// [`machine`] with extra `[vm]` settings (TOML lines).
pub fn machine_vm(vm: &str, backing: &str, prefault: bool, mem: &str, vcpus: u32) -> Result<Machine, BenchError> {
    let toml = format!(
        "name = \"bench\"\n[vm]\n{vm}\n[[memslot]]\ngpa = 0\nsize = \"{mem}\"\nbacking = \"{backing}\"\nprefault = {prefault}\n[guest]\nlayout = \"identity\"\npage_size = \"4k\"\naccessed_dirty = \"preset\"\nvcpus = {vcpus}\n"
    );
    let s = Scenario::parse(&toml)?;
    build(&s, None).map_err(BenchError::from)
}

/// A memslot size for `bytes` of workload data after the identity tables: rounded up to
/// 2 MiB, plus 64 MiB for the tables and the gap before `data_start`.
pub fn mem_for(bytes: u64) -> String {
    format!("{}MiB", bytes.div_ceil(2 << 20) * 2 + 64)
}

/// Maps the guest's own page tables in the EPT (one read of every page from 1 MiB, where the
/// identity tables start, to `data_start`), so that later first touches of data pages take
/// exactly one TDP fault each.
pub fn warm_guest_tables(m: &mut Machine) -> Result<(), BenchError> {
    let end = m.data_start;
    let v = &mut m.vcpus[0];
    for a in ((1u64 << 20)..end).step_by(4096) {
        v.read(Gva::new(a), 8)?;
    }
    Ok(())
}

/// Writes one byte to each of `pages` pages from `start`.
pub fn touch(v: &mut Vcpu, start: u64, pages: u64) -> Result<(), BenchError> {
    for p in 0..pages {
        v.write(Gva::new(start + p * 4096), 1, 1)?;
    }
    Ok(())
}

/// A parallel run's wall time, and how long its threads were actually on a CPU.
#[derive(Debug, Clone, Copy)]
pub struct ParallelRun {
    /// From the first thread's start to the last one's finish.
    pub wall_ns: f64,
    /// Sum over the threads of their on-CPU time (Linux schedstat), if available.
    pub on_cpu_ns: Option<f64>,
}

/// This thread's on-CPU time so far (the first field of /proc/thread-self/schedstat).
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat").ok()?.split_whitespace().next()?.parse().ok()
}

/// Has each vCPU, on its own thread, touch `pages` pages from its start address; all start
/// together (a barrier).
pub fn touch_parallel(vcpus: &mut [Vcpu], starts: &[u64], pages: u64) -> Result<ParallelRun, BenchError> {
    type Span = (Instant, Instant, Option<u64>);
    let barrier = Barrier::new(vcpus.len());
    let spans: Vec<Result<Span, BenchError>> = std::thread::scope(|s| {
        let hs: Vec<_> = vcpus
            .iter_mut()
            .zip(starts)
            .map(|(v, &start)| {
                let b = &barrier;
                s.spawn(move || {
                    b.wait();
                    let c0 = thread_cpu_ns();
                    let t0 = Instant::now();
                    touch(v, start, pages)?;
                    let t1 = Instant::now();
                    let cpu = match (c0, thread_cpu_ns()) {
                        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                        _ => None,
                    };
                    Ok((t0, t1, cpu))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(Err(BenchError::ThreadPanicked))).collect()
    });
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    let mut on_cpu = Some(0u64);
    for r in spans {
        let (a, b, cpu) = r?;
        first = Some(first.map_or(a, |f| f.min(a)));
        last = Some(last.map_or(b, |l| l.max(b)));
        on_cpu = on_cpu.zip(cpu).map(|(x, y)| x + y);
    }
    match (first, last) {
        (Some(a), Some(b)) => {
            Ok(ParallelRun { wall_ns: b.duration_since(a).as_nanos() as f64, on_cpu_ns: on_cpu.map(|c| c as f64) })
        }
        _ => Err(BenchError::NoVcpus),
    }
}

fn time(mut f: impl FnMut() -> Result<(), BenchError>) -> Result<f64, BenchError> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_nanos() as f64)
}

fn pf_fixed(vcpus: &[Vcpu]) -> u64 {
    vcpus.iter().map(|v| v.stat.pf_fixed).sum()
}

/// Most iterations `--iters` takes (the hot-path benchmarks run 10 x iters operations).
pub const MAX_ITERS: u64 = 1 << 40;

/// Checks an iteration count: at least 1 (0 would time nothing and divide by zero), at most
/// [`MAX_ITERS`].
pub fn check_iters(iters: u64) -> Result<(), String> {
    if iters == 0 {
        return Err("must be at least 1 (0 iterations measure nothing)".into());
    }
    if iters > MAX_ITERS {
        return Err(format!("{iters} is more than the {MAX_ITERS} this benchmark takes"));
    }
    Ok(())
}

/// Runs every benchmark with about `iters` operations each (1..=[`MAX_ITERS`]).
pub fn run_all(iters: u64) -> Result<Vec<BenchResult>, BenchError> {
    check_iters(iters).map_err(BenchError::Iters)?;
    let mut out = Vec::new();

    // TLB hit: the same 8 bytes again and again.
    let mut m = machine("4k", true, "64MiB", 1)?;
    let base = m.data_start;
    let v = &mut m.vcpus[0];
    v.write(Gva::new(base), 8, 1)?;
    let n = iters * 10;
    let mut sum = 0u64;
    let t = time(|| {
        for i in 0..n {
            sum = sum.wrapping_add(v.read(Gva::new(base + (i & 0xff) * 8), 8)?);
        }
        Ok(())
    })?;
    black_box(sum);
    out.push(BenchResult::time("access, TLB hit", t, n, Some(3.0)));

    // Simulation speed on a TLB-friendly workload: sequential 8-byte reads over 8 pages
    // (4096 accesses per pass, every one a TLB hit after the first pass).
    let sim_pages = 8u64;
    for p in 0..sim_pages {
        v.write(Gva::new(base + p * 4096), 8, p)?;
    }
    let words = sim_pages * 512;
    let n = iters * 10;
    let t = time(|| {
        for i in 0..n {
            sum = sum.wrapping_add(v.read(Gva::new(base + (i % words) * 8), 8)?);
        }
        Ok(())
    })?;
    black_box(sum);
    let mut r = BenchResult::time("simulation speed, TLB-friendly workload", t, n, None);
    r.value = 1e3 / r.ns_per_op;
    r.unit = "M accesses/s";
    r.target = Some(100.0);
    r.higher_is_better = true;
    out.push(r.note(format!("sequential 8-byte reads over {sim_pages} pages through Vcpu::read, one thread")));

    // TLB miss: 8192 pages cycle through a 4096-entry direct-mapped TLB; EPT and guest
    // tables are populated, so each access is one 2D walk over cached tables.
    let pages = 8192u64;
    for p in 0..pages {
        v.write(Gva::new(base + p * 4096), 8, p)?;
    }
    let n = iters.max(pages);
    let (h0, m0) = (v.cpu().tlb().counters.hits, v.cpu().tlb().counters.misses);
    let t = time(|| {
        for i in 0..n {
            sum = sum.wrapping_add(v.read(Gva::new(base + (i % pages) * 4096), 8)?);
        }
        Ok(())
    })?;
    black_box(sum);
    let (h1, m1) = (v.cpu().tlb().counters.hits, v.cpu().tlb().counters.misses);
    out.push(BenchResult::time("access, TLB miss (2D walk, 4-level x 4-level)", t, n, Some(25.0)).note(format!(
        "{pages} pages cycled; TLB misses {} / hits {} over the run",
        m1 - m0,
        h1 - h0
    )));

    // Fast page fault: write-protect the slot (as dirty logging does), then write each page.
    m.kvm.mmu_slot_remove_write_access(0)?;
    let v = &mut m.vcpus[0];
    let before = v.stat.pf_fast;
    let t = time(|| {
        for p in 0..pages {
            v.write(Gva::new(base + p * 4096), 8, p)?;
        }
        Ok(())
    })?;
    let fixed = (v.stat.pf_fast - before).max(1);
    out.push(
        BenchResult::time("fast page fault (write-protect fix), end to end", t, fixed, Some(60.0))
            .note(format!("{pages} writes after mmu_slot_remove_write_access; counted by pf_fast")),
    );
    drop(m);

    // First-touch TDP fault with the host memory already populated, and with the host
    // allocating on the fault.
    for (name, prefault) in
        [("first-touch TDP fault, host memory populated", true), ("first-touch TDP fault, host allocates", false)]
    {
        let pages = iters.clamp(4096, 262_144);
        let mut m = machine("4k", prefault, &mem_for(pages * 4096), 1)?;
        let base = m.data_start;
        let v = &mut m.vcpus[0];
        let before = v.stat.pf_fixed;
        let t = time(|| touch(v, base, pages))?;
        let faults = (v.stat.pf_fixed - before).max(1);
        out.push(
            BenchResult::time(name, t, faults, Some(150.0))
                .note(format!("{pages} pages written once; counted by pf_fixed (includes guest page-table pages)")),
        );
    }

    out.extend(frame_alloc(iters)?);
    out.extend(fault_scaling(iters)?);
    out.extend(memory_overhead(iters)?);
    out.extend(dirty_log(iters)?);
    out.extend(aging(iters)?);
    out.extend(shadow(iters)?);
    Ok(out)
}

/// A shadow-paging VM like [`machine`] (A/D bits clear, so prefetch does not hide faults),
/// with the data in the second GiB so its page directory is not on the path through which
/// the guest writes it.
fn shadow_machine(mem: &str) -> Result<Machine, BenchError> {
    let toml = format!(
        "name = \"bench\"\n[vm]\nmmu = \"shadow\"\n[[memslot]]\ngpa = 0\nsize = \"{mem}\"\nprefault = true\n[guest]\nlayout = \"identity\"\npage_size = \"4k\"\n"
    );
    let s = Scenario::parse(&toml)?;
    build(&s, None).map_err(BenchError::from)
}

/// The address of the level-`level` guest entry mapping `va` (identity layout).
fn entry_addr(v: &mut Vcpu, va: u64, level: u8) -> Result<u64, BenchError> {
    let mut table = v.cpu().paging().cr3 & 0x000f_ffff_ffff_f000;
    for l in (level + 1..=4).rev() {
        let at = table + ((va >> (12 + 9 * (u32::from(l) - 1))) & 511) * 8;
        table = v.read(Gva::new(at), 8)? & 0x000f_ffff_ffff_f000;
    }
    Ok(table + ((va >> (12 + 9 * (u32::from(level) - 1))) & 511) * 8)
}

/// Shadow paging: a fault end to end, a guest write to a write-tracked page table, a CR3
/// switch to a cached root.
fn shadow(iters: u64) -> Result<Vec<BenchResult>, BenchError> {
    let mut out = Vec::new();
    let pages = iters.clamp(4096, 65_536);
    let mut m = shadow_machine(&format!("{}MiB", 2048 + ((pages * 4096) >> 20)))?;
    let base = 1u64 << 30;
    let v = &mut m.vcpus[0];
    let before = v.stat.pf_fixed;
    let t = time(|| touch(v, base, pages))?;
    let faults = (v.stat.pf_fixed - before).max(1);
    out.push(
        BenchResult::time("shadow fault end to end (first touch)", t, faults, None)
            .note(format!("{pages} pages written once under shadow paging; #PF intercept, guest walk, fetch, rmap, retry; counted by pf_fixed")),
    );

    // A write to a page directory the shadow MMU write-tracks: #PF, emulation, track_write.
    let pde_at = entry_addr(v, base, 2)?;
    let pde = v.read(Gva::new(pde_at), 8)?;
    let rounds = (iters / 10).clamp(1000, 20_000);
    let emulate0 = v.stat.pf_emulate;
    let mut write_ns = 0.0;
    for i in 0..rounds {
        let t0 = Instant::now();
        v.write(Gva::new(pde_at), 8, pde)?;
        write_ns += t0.elapsed().as_nanos() as f64;
        // A fault through the directory relinks it and resets its write-flooding count.
        v.read(Gva::new(base + (i % 512) * 4096), 8)?;
    }
    let emulated = v.stat.pf_emulate - emulate0;
    out.push(
        BenchResult::time("shadow: guest PTE write through write tracking", write_ns, rounds, Some(400.0)).note(format!(
            "{rounds} guest stores to a write-tracked page directory ({emulated} emulated): #PF intercept, emulation, kvm_mmu_track_write; the store only is timed"
        )),
    );

    // CR3 switches between two roots the vCPU keeps in prev_roots.
    let cr3 = v.cpu().paging().cr3;
    let copy = base + (pages * 4096) + 0x10_0000;
    v.write(Gva::new(copy), 8, 0)?;
    for i in 0..512u64 {
        let x = v.read(Gva::new(cr3 + i * 8), 8)?;
        v.write(Gva::new(copy + i * 8), 8, x)?;
    }
    v.write_cr3(copy)?;
    v.read(Gva::new(base), 8)?;
    let misses = m.kvm.vm_stats()["mmu_cache_miss"];
    let v = &mut m.vcpus[0];
    let n = (iters / 10).clamp(1000, 20_000);
    let t = time(|| {
        for i in 0..n {
            v.write_cr3(if i % 2 == 0 { cr3 } else { copy })?;
            v.read(Gva::new(base), 8)?;
        }
        Ok(())
    })?;
    let new_pages = m.kvm.vm_stats()["mmu_cache_miss"] - misses;
    out.push(BenchResult::time("shadow: CR3 switch to a cached root (+1 access)", t, n, None).note(format!(
        "{n} MOV CR3 between two roots kept in prev_roots, each followed by one load (TLB refill); {new_pages} shadow pages created meanwhile"
    )));
    Ok(out)
}

/// Host frame allocation: 4 KiB frames never used before (amortizing one 2 MiB
/// `MADV_POPULATE_WRITE` per 512 frames), and the 2 MiB chunk populate itself.
fn frame_alloc(iters: u64) -> Result<Vec<BenchResult>, BenchError> {
    let frames = iters.clamp(4096, 131_072).next_multiple_of(512);
    let fa = FrameAllocator::new((frames + 4 * 512) * 4096)?;
    // Use up the chunk the allocator is carving (its zero page came from it), so the timed
    // run starts on a chunk boundary: exactly one populate per 512 frames.
    loop {
        let c = fa.counts().chunks_populated;
        black_box(fa.alloc_4k()?);
        if fa.counts().chunks_populated != c {
            break;
        }
    }
    let c0 = fa.counts().chunks_populated;
    let t = time(|| {
        for _ in 0..frames {
            black_box(fa.alloc_4k()?);
        }
        Ok(())
    })?;
    let chunks = fa.counts().chunks_populated - c0;
    drop(fa);
    let fresh = BenchResult::time("host frame allocation, fresh 4 KiB frame (amortized)", t, frames, None).note(
        format!("{frames} never-used frames; {chunks} chunks populated (one madvise(MADV_POPULATE_WRITE) of 2 MiB each, no per-4 KiB kernel fault)"),
    );

    let n = (frames / 512).max(8);
    let fa = FrameAllocator::new((n + 4) * (2 << 20))?;
    let t = time(|| {
        for _ in 0..n {
            black_box(fa.alloc_2m()?);
        }
        Ok(())
    })?;
    drop(fa);
    let per_chunk = t / n as f64;
    let chunk = BenchResult::time("host frame allocation, 2 MiB chunk populate", t, n, None)
        .note(format!("alloc_2m of never-used chunks = {:.1} ns per 4 KiB", per_chunk / 512.0));
    Ok(vec![fresh, chunk])
}

/// TDP fault throughput from 1 and 2 vCPU threads of one VM, each first-touching its own
/// disjoint range through identity-mapped tables (host memory populated). Best of 3 rounds,
/// alternating, each on fresh pages.
fn fault_scaling(iters: u64) -> Result<Vec<BenchResult>, BenchError> {
    let per = (iters / 4).clamp(2048, 65_536);
    let rounds = 3u64;
    let mut m = machine("4k", true, &mem_for(rounds * 3 * per * 4096), 2)?;
    warm_guest_tables(&mut m)?;
    let mut next = m.data_start;
    // The best round (least wall ns per fault) of each: (wall ns, faults, on-CPU ns).
    type Round = (f64, u64, Option<f64>);
    let mut best1: Option<Round> = None;
    let mut best2: Option<Round> = None;
    let keep = |best: &mut Option<Round>, r: ParallelRun, faults: u64| {
        let faults = faults.max(1);
        let better = match *best {
            Some((bt, bf, _)) => (r.wall_ns / faults as f64) < bt / bf as f64,
            None => true,
        };
        if better {
            *best = Some((r.wall_ns, faults, r.on_cpu_ns));
        }
    };
    for _ in 0..rounds {
        let f0 = pf_fixed(&m.vcpus);
        let r1 = touch_parallel(&mut m.vcpus[..1], &[next], per)?;
        let f1 = pf_fixed(&m.vcpus);
        next += per * 4096;
        let r2 = touch_parallel(&mut m.vcpus, &[next, next + per * 4096], per)?;
        let f2 = pf_fixed(&m.vcpus);
        next += 2 * per * 4096;
        keep(&mut best1, r1, f1 - f0);
        keep(&mut best2, r2, f2 - f1);
    }
    let (best1, faults1, cpu1) = best1.unwrap_or((1.0, 1, None));
    let (best2, faults2, cpu2) = best2.unwrap_or((1.0, 1, None));
    // How busy the threads were: on-CPU time / (threads x wall). Well below 100 % means
    // another process had the CPUs, and the ratio says more about the machine than the MMU.
    let busy = |cpu: Option<f64>, threads: f64, wall: f64| {
        cpu.map_or_else(|| "n/a".to_string(), |c| format!("{:.0} %", c * 100.0 / (threads * wall)))
    };
    let (busy1, busy2) = (busy(cpu1, 1.0, best1), busy(cpu2, 2.0, best2));
    let mut one = BenchResult::time("TDP fault throughput, 1 vCPU thread", best1, faults1, None);
    one.value = 1e9 / one.ns_per_op;
    one.unit = "faults/s";
    one.higher_is_better = true;
    let mut two = BenchResult::time("TDP fault throughput, 2 vCPU threads", best2, faults2, None);
    two.value = 1e9 / two.ns_per_op;
    two.unit = "faults/s";
    two.higher_is_better = true;
    let mut ratio = BenchResult::time("TDP fault throughput, 2 threads vs 1", best2, faults2, None);
    ratio.value = two.value / one.value;
    ratio.unit = "x";
    ratio.target = Some(1.7);
    ratio.higher_is_better = true;
    let how = format!(
        "{per} first touches per thread per round, host memory populated; best of {rounds} rounds; ns/op is wall time / all faults"
    );
    Ok(vec![
        one.note(format!("{how}; thread on a CPU {busy1} of the wall time")),
        two.note(format!("{how}; threads on a CPU {busy2} of the wall time")),
        ratio.note(format!("{how}; CPU busy: 1 thread {busy1}, 2 threads {busy2} (below ~95 % other load skews it)")),
    ])
}

/// MMU page-table memory per touched guest page, for 4 KiB and THP host backing.
fn memory_overhead(iters: u64) -> Result<Vec<BenchResult>, BenchError> {
    let mut out = Vec::new();
    for (name, backing) in [
        ("memory overhead per touched 4 KiB page, 4 KiB backing", "4k"),
        ("memory overhead per touched 4 KiB page, THP backing", "thp"),
    ] {
        let pages = iters.clamp(8192, 262_144).next_multiple_of(512);
        let mut m = machine(backing, false, &mem_for(pages * 4096), 1)?;
        let base = m.data_start;
        let t = time(|| touch(&mut m.vcpus[0], base, pages))?;
        let stats = m.kvm.vm_stats();
        let tables = u64::try_from(stats.get("tdp_mmu_pages").copied().unwrap_or(0)).unwrap_or(0);
        let (p4k, p2m) = (stats.get("pages_4k").copied().unwrap_or(0), stats.get("pages_2m").copied().unwrap_or(0));
        let host_pt = m.kvm.host().pt_pages();
        let touched = pages * 4096;
        let mut r = BenchResult::time(name, t, pages, None);
        r.value = (tables * 4096) as f64 * 100.0 / touched as f64;
        r.unit = "%";
        r.target = Some(0.01);
        out.push(r.note(format!(
            "tdp_mmu_pages {tables} x 4 KiB / {pages} touched data pages ({p4k} 4 KiB + {p2m} 2 MiB SPTEs); counts every TDP table level incl. the root and the tables mapping the guest's own page tables; not counted: the vCPU's preallocated table-page cache, per-table metadata on the Rust heap, the guest's page tables, and the VMM's host page tables ({host_pt} pages = {:.3} %)",
            (host_pt * 4096) as f64 * 100.0 / touched as f64
        )));
    }
    Ok(out)
}

/// The region of `m`'s data memslot (its largest) with KVM_MEM_LOG_DIRTY_PAGES added.
fn logging_region(m: &Machine) -> Result<vmmu::memslot::UserspaceMemoryRegion, BenchError> {
    let slots = m.kvm.memslots();
    let mut r = slots.iter().max_by_key(|s| s.npages).ok_or(BenchError::NoMemslot)?.region();
    r.flags |= vmmu::memslot::MemslotFlags::LOG_DIRTY_PAGES;
    Ok(r)
}

/// Dirty logging under the TDP MMU, in both of KVM's modes (write protection, and D bits with
/// the page-modification log): turning KVM_MEM_LOG_DIRTY_PAGES on over mapped memory, the same
/// over THP with eager splitting, and KVM_GET_DIRTY_LOG after the guest wrote every page.
fn dirty_log(iters: u64) -> Result<Vec<BenchResult>, BenchError> {
    let pages = iters.clamp(8192, 262_144).next_multiple_of(512);
    let mut out = Vec::new();
    for (mode, pml) in [("write protection", false), ("D bits + PML", true)] {
        let vm = format!("pml = {pml}");
        let mut m = machine_vm(&vm, "4k", true, &mem_for(pages * 4096), 1)?;
        let base = m.data_start;
        touch(&mut m.vcpus[0], base, pages)?;
        let region = logging_region(&m)?;
        let slot_bytes = region.memory_size;
        let mapped = m.kvm.vm_stats().get("pages_4k").copied().unwrap_or(0);
        let t = time(|| m.kvm.set_user_memory_region(region).map_err(BenchError::from))?;
        let name = if pml {
            "enable dirty logging (PML: clear D bits)"
        } else {
            "enable dirty logging (write-protect the slot)"
        };
        let mut r = BenchResult::time(name, t, 1, None);
        r.value = t / 1e6 * (1u64 << 30) as f64 / slot_bytes as f64;
        r.unit = "ms/GiB";
        out.push(r.note(format!(
            "KVM_SET_USER_MEMORY_REGION adding LOG_DIRTY_PAGES to a {} MiB slot with {mapped} 4 KiB SPTEs mapped ({mode}); scaled to 1 GiB",
            slot_bytes >> 20
        )));

        // The same over THP backing: enabling also splits every 2 MiB SPTE (eager_page_split).
        {
            let mut t = machine_vm(&vm, "thp", true, &mem_for(pages * 4096), 1)?;
            let base = t.data_start;
            touch(&mut t.vcpus[0], base, pages)?;
            let r2 = logging_region(&t)?;
            let huge = t.kvm.vm_stats().get("pages_2m").copied().unwrap_or(0);
            let ns = time(|| t.kvm.set_user_memory_region(r2).map_err(BenchError::from))?;
            let after = t.kvm.vm_stats().get("pages_2m").copied().unwrap_or(0);
            let name = if pml {
                "enable dirty logging with eager split (THP, PML)"
            } else {
                "enable dirty logging with eager split (THP)"
            };
            let mut r = BenchResult::time(name, ns, 1, None);
            r.value = ns / 1e6 * (1u64 << 30) as f64 / (huge.max(1) as f64 * (2 << 20) as f64);
            r.unit = "ms/GiB";
            out.push(r.note(format!(
                "{huge} 2 MiB SPTEs split to 4 KiB ({after} left) and re-armed ({mode}); scaled to 1 GiB of huge-mapped memory"
            )));
        }

        m.kvm.get_dirty_log(region.slot)?;
        touch(&mut m.vcpus[0], base, pages)?;
        m.vcpus[0].exit_guest();
        let mut dirty = 0u64;
        let t = time(|| {
            dirty = m.kvm.get_dirty_log(region.slot)?.iter().map(|w| u64::from(w.count_ones())).sum();
            Ok(())
        })?;
        let name = if pml { "KVM_GET_DIRTY_LOG, per dirty page (PML)" } else { "KVM_GET_DIRTY_LOG, per dirty page" };
        out.push(BenchResult::time(name, t, dirty.max(1), None).note(format!(
            "{dirty} dirty pages harvested (the {pages} written plus guest page-table pages the walks dirtied), each re-armed ({mode}); one TLB flush"
        )));
    }
    Ok(out)
}

/// Aging: one clear_young pass (the MMU notifier, as idle page tracking calls it) over a
/// slot whose pages are all mapped and accessed, with EPT A/D bits and without them.
fn aging(iters: u64) -> Result<Vec<BenchResult>, BenchError> {
    let mut out = Vec::new();
    for (name, eptad) in
        [("aging pass (clear_young), A/D bits", true), ("aging pass (clear_young), access tracking", false)]
    {
        let pages = iters.clamp(8192, 262_144).next_multiple_of(512);
        let toml = format!(
            "name = \"bench\"\n[vm]\neptad = {eptad}\n[[memslot]]\ngpa = 0\nsize = \"{}\"\nprefault = true\n[guest]\nlayout = \"identity\"\npage_size = \"4k\"\naccessed_dirty = \"preset\"\n",
            mem_for(pages * 4096)
        );
        let sc = Scenario::parse(&toml)?;
        let mut m = build(&sc, None)?;
        let base = m.data_start;
        touch(&mut m.vcpus[0], base, pages)?;
        m.vcpus[0].exit_guest();
        let (_, size, hva) = m.slots[0];
        let mapped = u64::try_from(m.kvm.vm_stats().get("pages_4k").copied().unwrap_or(0)).unwrap_or(0).max(1);
        let mut young = false;
        let t = time(|| {
            young = m.kvm.host().clear_young(hva, size);
            Ok(())
        })?;
        if !young {
            return Err(BenchError::NoYoungPage(name));
        }
        out.push(BenchResult::time(name, t, mapped, Some(10.0)).note(format!(
            "one clear_young over a {} MiB slot with {mapped} 4 KiB SPTEs, all accessed; ns per mapped page",
            size >> 20
        )));
    }
    Ok(out)
}

fn fmt_value(v: f64) -> String {
    if v.abs() >= 1e6 {
        format!("{:.3e}", v)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// A table, then the notes.
pub fn text(r: &[BenchResult]) -> String {
    let mut s = format!(
        "{:<56} {:>10} {:>12} {:<13} {:>8} {:>4} {:>9}\n",
        "benchmark", "ns/op", "value", "unit", "target", "ok", "ops"
    );
    for b in r {
        let target = b.target.map(|t| format!("{}{}", if b.higher_is_better { ">=" } else { "<=" }, fmt_value(t)));
        let ok = match b.meets_target() {
            Some(true) => "yes",
            Some(false) => "no",
            None => "",
        };
        s += &format!(
            "{:<56} {:>10.1} {:>12} {:<13} {:>8} {:>4} {:>9}\n",
            b.name,
            b.ns_per_op,
            fmt_value(b.value),
            b.unit,
            target.unwrap_or_default(),
            ok,
            b.ops
        );
    }
    s += "\nnotes:\n";
    for b in r.iter().filter(|b| !b.note.is_empty()) {
        s += &format!("  {}: {}\n", b.name, b.note);
    }
    s
}

/// JSON.
pub fn json(r: &[BenchResult]) -> String {
    serde_json::to_string_pretty(r).unwrap_or_default()
}
