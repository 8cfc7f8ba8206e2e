//! `vmmu bench`: the hot paths of DESIGN §6 measured end to end through the public API, on
//! one core. (Criterion benches of the same paths live in crates/vmmu/benches.)

use crate::runner::{build, Machine, RunOptions};
use crate::scenario::Scenario;
use std::time::Instant;
use vmmu::x86_paging::addr::Gva;

/// One measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    /// What was measured.
    pub name: &'static str,
    /// Nanoseconds per operation.
    pub ns_per_op: f64,
    /// Operations timed.
    pub ops: u64,
    /// The DESIGN target, in ns.
    pub target_ns: f64,
}

fn machine(backing: &str, prefault: bool, mem: &str) -> Result<Machine, String> {
    let toml = format!(
        "name = \"bench\"\n[[memslot]]\ngpa = 0\nsize = \"{mem}\"\nbacking = \"{backing}\"\nprefault = {prefault}\n[guest]\nlayout = \"identity\"\npage_size = \"4k\"\naccessed_dirty = \"preset\"\n"
    );
    let s = Scenario::parse(&toml).map_err(|e| e.to_string())?;
    build(&s, &RunOptions::default()).map_err(|e| e.to_string())
}

fn time(mut f: impl FnMut() -> Result<(), String>) -> Result<f64, String> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_nanos() as f64)
}

/// Runs every benchmark with about `iters` operations each.
pub fn run_all(iters: u64) -> Result<Vec<BenchResult>, String> {
    let mut out = Vec::new();
    let e = |e: vmmu::GuestError| e.to_string();

    // TLB hit: the same 8 bytes again and again.
    let mut m = machine("4k", true, "64MiB")?;
    let base = m.data_start;
    let v = &mut m.vcpus[0];
    v.write(Gva::new(base), 8, 1).map_err(e)?;
    let n = iters * 10;
    let mut sum = 0u64;
    let t = time(|| {
        for i in 0..n {
            sum = sum.wrapping_add(v.read(Gva::new(base + (i & 0xff) * 8), 8).map_err(e)?);
        }
        Ok(())
    })?;
    std::hint::black_box(sum);
    out.push(BenchResult { name: "access, TLB hit", ns_per_op: t / n as f64, ops: n, target_ns: 3.0 });

    // TLB miss: 8192 pages cycle through a 4096-entry direct-mapped TLB; EPT and guest
    // tables are populated, so each access is one 2D walk over cached tables.
    let pages = 8192u64;
    for p in 0..pages {
        v.write(Gva::new(base + p * 4096), 8, p).map_err(e)?;
    }
    let n = iters.max(pages);
    let t = time(|| {
        for i in 0..n {
            sum = sum.wrapping_add(v.read(Gva::new(base + (i % pages) * 4096), 8).map_err(e)?);
        }
        Ok(())
    })?;
    std::hint::black_box(sum);
    out.push(BenchResult {
        name: "access, TLB miss (2D walk, 4-level x 4-level)",
        ns_per_op: t / n as f64,
        ops: n,
        target_ns: 25.0,
    });

    // Fast page fault: write-protect the slot (as dirty logging does), then write each page.
    m.kvm.mmu_slot_remove_write_access(0).map_err(|e| e.to_string())?;
    let v = &mut m.vcpus[0];
    let before = v.stat.pf_fast;
    let t = time(|| {
        for p in 0..pages {
            v.write(Gva::new(base + p * 4096), 8, p).map_err(e)?;
        }
        Ok(())
    })?;
    let fixed = (v.stat.pf_fast - before).max(1);
    out.push(BenchResult {
        name: "fast page fault (write-protect fix), end to end",
        ns_per_op: t / fixed as f64,
        ops: fixed,
        target_ns: 60.0,
    });
    drop(m);

    // First-touch TDP fault with the host memory already populated, and with the host
    // allocating on the fault.
    for (name, prefault) in
        [("first-touch TDP fault, host memory populated", true), ("first-touch TDP fault, host allocates", false)]
    {
        let pages = iters.clamp(4096, 262_144);
        let mem = format!("{}MiB", ((pages * 4096) >> 20) + 64);
        let mut m = machine("4k", prefault, &mem)?;
        let base = m.data_start;
        let v = &mut m.vcpus[0];
        let before = v.stat.pf_fixed;
        let t = time(|| {
            for p in 0..pages {
                v.write(Gva::new(base + p * 4096), 1, 1).map_err(e)?;
            }
            Ok(())
        })?;
        let faults = (v.stat.pf_fixed - before).max(1);
        out.push(BenchResult { name, ns_per_op: t / faults as f64, ops: faults, target_ns: 150.0 });
    }
    Ok(out)
}

/// A table.
pub fn text(r: &[BenchResult]) -> String {
    let mut s = format!("{:<52} {:>12} {:>10} {:>10}\n", "benchmark", "ns/op", "target", "ops");
    for b in r {
        s += &format!("{:<52} {:>12.1} {:>10.0} {:>10}\n", b.name, b.ns_per_op, b.target_ns, b.ops);
    }
    s
}

/// JSON.
pub fn json(r: &[BenchResult]) -> String {
    serde_json::to_string_pretty(r).unwrap_or_default()
}
