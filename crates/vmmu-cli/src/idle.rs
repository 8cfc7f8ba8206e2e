//! What idle page tracking costs the guest, after KVM's access_tracking_perf_test: the host
//! marks guest memory idle (MMU notifier clear_young) between passes of the same guest
//! workload, and reads the idle bitmap back (test_young). With A/D bits marking only clears
//! Accessed bits; without them every SPTE becomes access-tracked and the guest's next access
//! to each page is a fast page fault.

use crate::error::{ConfigError, RunError};
use crate::machine::Machine;
use std::time::Instant;
use vmmu::host::Hva;

/// One pass.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Pass {
    /// 0 = the baseline (no marking before it).
    pub pass: u32,
    /// Time to mark the slot idle before the pass (0 for the baseline).
    pub mark_ns: u64,
    /// The guest's time for the workload.
    pub guest_ns: u64,
    /// Guest accesses.
    pub guest_accesses: u64,
    /// Page faults intercepted during the pass.
    pub pf_taken: u64,
    /// Of those, fixed by fast page fault (access-tracked SPTEs restored).
    pub pf_fast: u64,
    /// Pages of the slot found accessed when the bitmap was read after the pass.
    pub young_pages: u64,
    /// Time to read the idle bitmap of the slot.
    pub read_ns: u64,
}

/// The whole measurement.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct IdleReport {
    /// Scenario memslot index.
    pub slot: u32,
    /// Its pages.
    pub slot_pages: u64,
    /// Baseline first.
    pub passes: Vec<Pass>,
    /// Mean guest time of the marked passes minus the baseline's, per pass.
    pub slowdown_ns: i64,
}

fn faults(m: &Machine) -> (u64, u64) {
    m.vcpus.iter().fold((0, 0), |(t, f), v| (t + v.stat.pf_taken, f + v.stat.pf_fast))
}

/// Runs the baseline and `passes` marked passes; `guest` runs the workload once.
pub fn run(
    m: &mut Machine,
    slot: u32,
    passes: u32,
    guest: &mut dyn FnMut(&mut Machine) -> Result<u64, RunError>,
) -> Result<IdleReport, RunError> {
    let (_, size, hva) = *m.slots.get(slot as usize).ok_or(ConfigError::NoMemslot { op: "idle-tracking", slot })?;
    let npages = size / 4096;
    let mut report = IdleReport { slot, slot_pages: npages, ..Default::default() };
    for pass in 0..=passes {
        for v in m.vcpus.iter_mut() {
            v.exit_guest();
        }
        let t = Instant::now();
        if pass > 0 {
            m.kvm.host().page_idle_mark(hva, size);
        }
        let mark_ns = if pass > 0 { crate::clock::elapsed_ns(t) } else { 0 };
        let (t0, f0) = faults(m);
        let t = Instant::now();
        let guest_accesses = guest(m)?;
        let guest_ns = crate::clock::elapsed_ns(t);
        let (t1, f1) = faults(m);
        for v in m.vcpus.iter_mut() {
            v.exit_guest();
        }
        let t = Instant::now();
        let young_pages = if pass > 0 {
            (0..npages).filter(|i| !m.kvm.host().page_idle_read(Hva(hva.raw() + i * 4096))).count() as u64
        } else {
            0
        };
        let read_ns = if pass > 0 { crate::clock::elapsed_ns(t) } else { 0 };
        report.passes.push(Pass {
            pass,
            mark_ns,
            guest_ns,
            guest_accesses,
            pf_taken: t1 - t0,
            pf_fast: f1 - f0,
            young_pages,
            read_ns,
        });
    }
    let base = report.passes[0].guest_ns as i64;
    let marked: i64 = report.passes[1..].iter().map(|p| p.guest_ns as i64).sum();
    report.slowdown_ns = marked / i64::from(passes) - base;
    Ok(report)
}
