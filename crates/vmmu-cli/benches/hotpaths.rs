//! Criterion benches of the DESIGN §6 hot paths, one core, through the public API:
//!
//! - `access/tlb_hit`: a load that hits the TLB;
//! - `access/tlb_miss_2d_walk`: a load that misses the 4096-entry direct-mapped TLB (8192
//!   pages cycled) and walks populated 4-level guest x 4-level EPT tables;
//! - `tdp_fault/first_touch/{host_populated,host_allocates}`: one first-touch TDP fault on a
//!   fresh page per iteration, end to end (exit, fault, host frame, SPTE install, retry);
//! - `tdp_fault/fast_wrprot`: one write that takes one fast page fault (write-protected SPTE);
//! - `host_frames/*`: the host frame allocator: alloc+free of a reused 4 KiB frame, a 4 KiB
//!   frame never used before (amortizing one 2 MiB `MADV_POPULATE_WRITE` per 512), and one
//!   2 MiB chunk populate.
//!
//! Run: `cargo bench -p vmmu-cli --bench hotpaths -- --quick` (add a filter to pick benches).
//! Set-up work (building VMs, re-protecting SPTEs, new allocators) is never timed: the fault
//! and allocator benches use `iter_custom` and time only the operations themselves.

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use std::hint::black_box;
use std::time::{Duration, Instant};
use vmmu::host::FrameAllocator;
use vmmu::x86_paging::addr::Gva;
use vmmu_cli::bench::{machine, mem_for, warm_guest_tables};
use vmmu_cli::machine::Machine;

fn short<M: criterion::measurement::Measurement>(g: &mut BenchmarkGroup<'_, M>) {
    g.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(20);
}

fn access(c: &mut Criterion) {
    let mut g = c.benchmark_group("access");
    let mut m = machine("4k", true, "64MiB", 1).expect("vm");
    let base = m.data_start;
    let v = &mut m.vcpus[0];
    let pages = 8192u64;
    for p in 0..pages {
        v.write(Gva::new(base + p * 4096), 8, p).expect("touch");
    }

    let mut i = 0u64;
    g.bench_function("tlb_hit", |b| {
        b.iter(|| {
            i = (i + 1) & 0xff;
            black_box(v.read(Gva::new(base + i * 8), 8).expect("read"))
        })
    });

    // Cycling over twice the TLB's entries: every access misses and walks in 2D.
    let mut p = 0u64;
    g.bench_function("tlb_miss_2d_walk", |b| {
        b.iter(|| {
            p = if p + 1 == pages { 0 } else { p + 1 };
            black_box(v.read(Gva::new(base + p * 4096), 8).expect("read"))
        })
    });
    g.finish();
}

/// A VM with `PAGES` never-touched data pages and its guest page tables already mapped in
/// the EPT, so each write to a new data page takes exactly one TDP fault.
struct FaultVm {
    m: Machine,
    next: u64,
    end: u64,
}

const FAULT_VM_PAGES: u64 = 32_768;

impl FaultVm {
    fn new(prefault: bool) -> FaultVm {
        let mut m = machine("4k", prefault, &mem_for(FAULT_VM_PAGES * 4096), 1).expect("vm");
        warm_guest_tables(&mut m).expect("warm tables");
        let next = m.data_start;
        FaultVm { m, next, end: next + FAULT_VM_PAGES * 4096 }
    }
}

fn first_touch(c: &mut Criterion) {
    let mut g = c.benchmark_group("tdp_fault");
    short(&mut g);
    for (name, prefault) in [("first_touch/host_populated", true), ("first_touch/host_allocates", false)] {
        let mut vm = FaultVm::new(prefault);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    if vm.next == vm.end {
                        // Out of fresh pages: a new VM, built (and the old one dropped) untimed.
                        vm = FaultVm::new(prefault);
                    }
                    let k = left.min((vm.end - vm.next) / 4096);
                    let (start, v) = (vm.next, &mut vm.m.vcpus[0]);
                    let t = Instant::now();
                    for j in 0..k {
                        v.write(Gva::new(start + j * 4096), 1, 1).expect("write");
                    }
                    total += t.elapsed();
                    vm.next += k * 4096;
                    left -= k;
                }
                total
            })
        });
    }

    // Fast page fault: every SPTE write-protected (as enabling dirty logging does); each
    // timed write takes one fast page fault. Re-protecting is untimed.
    let mut m = machine("4k", true, "128MiB", 1).expect("vm");
    let base = m.data_start;
    let pages = 16_384u64;
    for p in 0..pages {
        m.vcpus[0].write(Gva::new(base + p * 4096), 8, p).expect("touch");
    }
    m.kvm.mmu_slot_remove_write_access(0).expect("wrprot");
    let mut next = 0u64;
    g.bench_function("fast_wrprot", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                if next == pages {
                    m.kvm.mmu_slot_remove_write_access(0).expect("wrprot");
                    next = 0;
                }
                let k = left.min(pages - next);
                let v = &mut m.vcpus[0];
                let t = Instant::now();
                for j in next..next + k {
                    v.write(Gva::new(base + j * 4096), 8, j).expect("write");
                }
                total += t.elapsed();
                next += k;
                left -= k;
            }
            total
        })
    });
    g.finish();
}

/// An allocator with `FRESH_FRAMES` never-used 4 KiB frames, starting on a chunk boundary.
struct Fresh {
    fa: FrameAllocator,
    left: u64,
}

const FRESH_FRAMES: u64 = 65_536;

impl Fresh {
    fn new() -> Fresh {
        let fa = FrameAllocator::new((FRESH_FRAMES + 4 * 512) * 4096).expect("allocator");
        // Finish the chunk the zero page was carved from; the alloc that populates the next
        // chunk leaves it with 511 frames, so FRESH_FRAMES - 511 more need whole chunks.
        loop {
            let c = fa.counts().chunks_populated;
            black_box(fa.alloc_4k().expect("alloc"));
            if fa.counts().chunks_populated != c {
                break;
            }
        }
        Fresh { fa, left: FRESH_FRAMES - 1 }
    }
}

fn host_frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("host_frames");
    let fa = FrameAllocator::new(64 << 20).expect("allocator");
    g.bench_function("alloc_free_4k_reused", |b| {
        b.iter(|| {
            let p = fa.alloc_4k().expect("alloc");
            fa.free_4k(black_box(p));
        })
    });
    drop(fa);
    short(&mut g);

    let mut f = Fresh::new();
    g.bench_function("alloc_4k_fresh", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                if f.left == 0 {
                    f = Fresh::new();
                }
                let k = left.min(f.left);
                let t = Instant::now();
                for _ in 0..k {
                    black_box(f.fa.alloc_4k().expect("alloc"));
                }
                total += t.elapsed();
                f.left -= k;
                left -= k;
            }
            total
        })
    });
    drop(f);

    // One iteration = one never-used 2 MiB chunk (one MADV_POPULATE_WRITE).
    const CHUNKS: u64 = 64;
    let new = || (FrameAllocator::new((CHUNKS + 4) * (2 << 20)).expect("allocator"), CHUNKS);
    let mut a = new();
    g.sample_size(10);
    g.bench_function("chunk_populate_2m", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                if a.1 == 0 {
                    a = new();
                }
                let k = left.min(a.1);
                let t = Instant::now();
                for _ in 0..k {
                    black_box(a.0.alloc_2m().expect("alloc"));
                }
                total += t.elapsed();
                a.1 -= k;
                left -= k;
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, access, first_touch, host_frames);
criterion_main!(benches);
