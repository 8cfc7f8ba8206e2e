//! Workloads: first-touch, re-touch, read-then-write, and random access over a working set
//! (uniform or zipf), run against an address space.

use crate::kernel::{GuestKernel, KernelError};
use rand::{Rng, SeedableRng};
use rand_distr::Distribution;
use rand_xoshiro::Xoshiro256PlusPlus;
use vmmu::machine::GuestCpu;
use vmmu::x86_paging::access::AccessKind;
use vmmu::x86_paging::addr::Gva;

/// A workload's name and parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Workload {
    /// Write one byte to each page.
    FirstTouch,
    /// Write each page again (same as first-touch; named for the second pass).
    ReTouch,
    /// Read each page, then write each page.
    ReadThenWrite,
    /// Read each page.
    Read,
    /// Fetch one instruction byte from each page (execute).
    Fetch,
    /// `accesses` random 8-byte accesses (reads and writes alternating) over the pages.
    Random {
        /// Number of accesses.
        accesses: u64,
        /// Seed.
        seed: u64,
    },
    /// Like `Random` but page popularity follows a zipf law with exponent `theta`.
    Zipf {
        /// Number of accesses.
        accesses: u64,
        /// Exponent.
        theta: f64,
        /// Seed.
        seed: u64,
    },
}

impl Workload {
    /// Parses a workload name (`first-touch`, `re-touch`, `read-then-write`, `read`,
    /// `random`, `zipf`) with default parameters for `pages` pages.
    pub fn parse(name: &str, pages: u64) -> Option<Workload> {
        Some(match name {
            "first-touch" => Workload::FirstTouch,
            "re-touch" => Workload::ReTouch,
            "read-then-write" => Workload::ReadThenWrite,
            "read" => Workload::Read,
            "fetch" => Workload::Fetch,
            "random" => Workload::Random { accesses: pages * 16, seed: 1 },
            "zipf" => Workload::Zipf { accesses: pages * 16, theta: 0.99, seed: 1 },
            _ => return None,
        })
    }

    /// The names `parse` accepts.
    pub const NAMES: &'static [&'static str] =
        &["first-touch", "re-touch", "read-then-write", "read", "fetch", "random", "zipf"];
}

/// What a workload did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WorkloadStats {
    /// Accesses made.
    pub accesses: u64,
    /// Sum of the values read (so reads are observable).
    pub checksum: u64,
}

/// Where a workload's accesses go.
pub trait Space {
    /// One access.
    fn access(&mut self, va: u64, kind: AccessKind, size: u8, val: u64) -> Result<u64, KernelError>;
}

/// A process's address space under the guest kernel (demand paged).
pub struct KernelSpace<'a, C: GuestCpu> {
    /// The kernel.
    pub kernel: &'a mut GuestKernel,
    /// The CPU.
    pub cpu: &'a mut C,
}

impl<C: GuestCpu> Space for KernelSpace<'_, C> {
    #[inline]
    fn access(&mut self, va: u64, kind: AccessKind, size: u8, val: u64) -> Result<u64, KernelError> {
        self.kernel.access(self.cpu, va, kind, size, val)
    }
}

/// An address space whose page tables were built before the run (identity layout); a guest
/// exception (#PF, #GP) is a failure, returned as [`KernelError::Guest`].
pub struct FlatSpace<'a, C: GuestCpu> {
    /// The CPU.
    pub cpu: &'a mut C,
}

impl<C: GuestCpu> Space for FlatSpace<'_, C> {
    #[inline]
    fn access(&mut self, va: u64, kind: AccessKind, size: u8, val: u64) -> Result<u64, KernelError> {
        let r = match kind {
            AccessKind::Read => self.cpu.read(Gva::new(va), size),
            AccessKind::Write => self.cpu.write(Gva::new(va), size, val).map(|_| 0),
            AccessKind::Fetch => self.cpu.fetch(Gva::new(va), size),
        };
        // No process and no kernel to handle it: the exception itself is the error
        // (`guest exception #PF at ..., error code ... [...]`), not a process's SIGSEGV.
        r.map_err(KernelError::Guest)
    }
}

/// Runs `w` over `pages` pages from `start`.
pub fn run<S: Space>(w: Workload, space: &mut S, start: u64, pages: u64) -> Result<WorkloadStats, KernelError> {
    let mut st = WorkloadStats::default();
    let page = |i: u64| start + i * 4096;
    match w {
        Workload::FirstTouch | Workload::ReTouch => {
            for i in 0..pages {
                space.access(page(i), AccessKind::Write, 1, i & 0xff)?;
                st.accesses += 1;
            }
        }
        Workload::Read => {
            for i in 0..pages {
                st.checksum = st.checksum.wrapping_add(space.access(page(i), AccessKind::Read, 8, 0)?);
                st.accesses += 1;
            }
        }
        Workload::Fetch => {
            for i in 0..pages {
                st.checksum = st.checksum.wrapping_add(space.access(page(i), AccessKind::Fetch, 1, 0)?);
                st.accesses += 1;
            }
        }
        Workload::ReadThenWrite => {
            for i in 0..pages {
                st.checksum = st.checksum.wrapping_add(space.access(page(i), AccessKind::Read, 8, 0)?);
            }
            for i in 0..pages {
                space.access(page(i), AccessKind::Write, 8, i)?;
            }
            st.accesses += 2 * pages;
        }
        Workload::Random { accesses, seed } => {
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
            for n in 0..accesses {
                let p = rng.gen_range(0..pages.max(1));
                let off = rng.gen_range(0..512u64) * 8;
                let kind = if n % 2 == 0 { AccessKind::Read } else { AccessKind::Write };
                st.checksum = st.checksum.wrapping_add(space.access(page(p) + off, kind, 8, n)?);
                st.accesses += 1;
            }
        }
        Workload::Zipf { accesses, theta, seed } => {
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
            let z =
                rand_distr::Zipf::new(pages.max(1), theta).map_err(|e| KernelError::Invalid(format!("zipf: {e}")))?;
            for n in 0..accesses {
                // Zipf samples are whole numbers in 1..=pages; `as` saturates anything else.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let p = (z.sample(&mut rng) as u64).saturating_sub(1).min(pages.max(1) - 1);
                let off = rng.gen_range(0..512u64) * 8;
                let kind = if n % 2 == 0 { AccessKind::Read } else { AccessKind::Write };
                st.checksum = st.checksum.wrapping_add(space.access(page(p) + off, kind, 8, n)?);
                st.accesses += 1;
            }
        }
    }
    Ok(st)
}
