//! Pre-copy live migration over dirty logging, as a VMM does it: turn on
//! KVM_MEM_LOG_DIRTY_PAGES, copy all of guest memory, then rounds of "let the guest run,
//! KVM_GET_DIRTY_LOG, copy what it reports" until the dirty set is small, and a final
//! stop-and-copy. The destination is held in this process, sparse: only pages that hold data
//! are copied (the initial copy skips pages the host never populated, as a VMM reading
//! /proc/PID/pagemap does, and zero pages), so a migration costs what the guest uses, not
//! the slot's size. At the end it must equal guest memory page for page, which checks the
//! log's completeness end to end.

use crate::error::{ConfigError, Failure, RunError};
use crate::machine::Machine;
use std::collections::BTreeMap;
use std::time::Instant;
use vmmu::host::Hva;
use vmmu::memslot::MemslotFlags;
use vmmu::x86_paging::addr::Hpa;

/// What to migrate and when to stop.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Scenario memslot index.
    pub slot: u32,
    /// Most rounds after the initial copy.
    pub max_rounds: u32,
    /// Stop-and-copy once a round dirties at most this many pages.
    pub stop_pages: u64,
}

/// One round.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Round {
    /// 0 = the initial full copy.
    pub round: u32,
    /// Whether this round was the stop-and-copy (guest paused while copying).
    pub stop_and_copy: bool,
    /// Guest accesses made while the round ran.
    pub guest_accesses: u64,
    /// Wall time of the guest's work.
    pub guest_ns: u64,
    /// Guest page faults intercepted during the round (pf_taken), of which fixed by fast
    /// page fault (pf_fast): the cost dirty logging puts on the guest.
    pub pf_taken: u64,
    /// Of `pf_taken`, fixed by fast page fault.
    pub pf_fast: u64,
    /// Pages KVM_GET_DIRTY_LOG reported (round 0: the whole slot).
    pub dirty_pages: u64,
    /// Time of KVM_GET_DIRTY_LOG (round 0: of enabling logging).
    pub harvest_ns: u64,
    /// Time to copy the pages.
    pub copy_ns: u64,
}

/// A migration's result.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MigrationReport {
    /// The memslot migrated (KVM slot id).
    pub slot: u32,
    /// Its size in pages.
    pub slot_pages: u64,
    /// How KVM logged: "write protection" or "D bits + PML", and whether enabling split huge
    /// pages eagerly.
    pub mode: String,
    /// The rounds, initial copy first.
    pub rounds: Vec<Round>,
    /// Estimated downtime: the stop-and-copy round's harvest and copy.
    pub downtime_ns: u64,
    /// Pages sent in all (round 0 counts the whole slot: the pages not copied are sent as
    /// "zero page" markers, as QEMU does).
    pub copied_pages: u64,
    /// Pages the destination holds at the end (the ones with data).
    pub dest_pages: u64,
    /// Memory the destination holds at the end: `dest_pages` x 4096.
    pub dest_bytes: u64,
}

/// The destination's memory: page index in the slot -> contents; a page not here is zero.
type Dest = BTreeMap<u64, Box<[u64]>>;

/// Reads page `i` of the slot from guest memory, as the VMM reads its own mapping.
fn read_page(m: &Machine, hva: Hva, i: u64) -> Result<Box<[u64]>, Failure> {
    let host = m.kvm.host();
    let page = host
        .get_user_page(Hva(hva.raw() + i * 4096), false)
        .map_err(|source| Failure::MigrateRead { page: i, source })?;
    let mem = host.frames().mem();
    let base = page.pfn.hpa().raw();
    Ok((0..512u64).map(|w| mem.load(Hpa::new(base + w * 8))).collect())
}

/// Copies page `i` of the slot into the destination.
fn copy_page(m: &Machine, hva: Hva, i: u64, dst: &mut Dest) -> Result<(), Failure> {
    dst.insert(i, read_page(m, hva, i)?);
    Ok(())
}

/// The pages of the slot that hold data (mapped to a frame that is not a zero page, or
/// swapped out), as indexes into the slot.
fn data_pages(m: &Machine, hva: Hva, size: u64) -> Vec<u64> {
    m.kvm.host().resident_pages(hva, size).into_iter().map(|a| (a.raw() - hva.raw()) / 4096).collect()
}

fn fault_counts(m: &Machine) -> (u64, u64) {
    m.vcpus.iter().fold((0, 0), |(t, f), v| (t + v.stat.pf_taken, f + v.stat.pf_fast))
}

/// Runs the migration; `guest` runs one round of guest work and returns its accesses.
pub fn run(
    m: &mut Machine,
    plan: &Plan,
    guest: &mut dyn FnMut(&mut Machine) -> Result<u64, RunError>,
) -> Result<MigrationReport, RunError> {
    let (gpa, size, hva) =
        *m.slots.get(plan.slot as usize).ok_or(ConfigError::NoMemslot { op: "migrate", slot: plan.slot })?;
    let slots = m.kvm.memslots();
    let slot =
        slots.iter().find(|s| s.base_gfn.raw() == gpa >> 12).ok_or(Failure::MigrateUnregistered { slot: plan.slot })?;
    let mut region = slot.region();
    let base_flags = region.flags;
    region.flags |= MemslotFlags::LOG_DIRTY_PAGES;
    drop(slots);
    let npages = size / 4096;
    let mut dst = Dest::new();
    let cfg = m.kvm.config();
    let mode = format!(
        "{}{}",
        if m.kvm.pml_in_use() { "D bits + PML" } else { "write protection" },
        if cfg.eager_page_split && cfg.mmu == vmmu::MmuKind::Tdp { ", eager page split" } else { "" }
    );
    let mut report = MigrationReport { slot: region.slot, slot_pages: npages, mode, ..Default::default() };
    let kvm_err = Failure::MigrateVm;
    for v in m.vcpus.iter_mut() {
        v.exit_guest();
    }

    // Round 0: logging on, then the whole slot copied (the pages with data; the rest are
    // zero on both sides).
    let t = Instant::now();
    m.kvm.set_user_memory_region(region).map_err(kvm_err)?;
    let harvest_ns = crate::clock::elapsed_ns(t);
    let t = Instant::now();
    for i in data_pages(m, hva, size) {
        copy_page(m, hva, i, &mut dst)?;
    }
    let copy_ns = crate::clock::elapsed_ns(t);
    report.rounds.push(Round { dirty_pages: npages, harvest_ns, copy_ns, ..Default::default() });
    report.copied_pages = npages;

    for round in 1..=plan.max_rounds {
        let (taken0, fast0) = fault_counts(m);
        let t = Instant::now();
        let guest_accesses = guest(m)?;
        let guest_ns = crate::clock::elapsed_ns(t);
        for v in m.vcpus.iter_mut() {
            v.exit_guest();
        }
        let (taken1, fast1) = fault_counts(m);
        let t = Instant::now();
        let bitmap = m.kvm.get_dirty_log(region.slot).map_err(kvm_err)?;
        let harvest_ns = crate::clock::elapsed_ns(t);
        let t = Instant::now();
        let mut dirty = 0;
        for (w, bits) in bitmap.iter().enumerate() {
            let mut b = *bits;
            while b != 0 {
                let i = w as u64 * 64 + u64::from(b.trailing_zeros());
                b &= b - 1;
                copy_page(m, hva, i, &mut dst)?;
                dirty += 1;
            }
        }
        let copy_ns = crate::clock::elapsed_ns(t);
        report.copied_pages += dirty;
        let last = dirty <= plan.stop_pages || round == plan.max_rounds;
        report.rounds.push(Round {
            round,
            stop_and_copy: last,
            guest_accesses,
            guest_ns,
            pf_taken: taken1 - taken0,
            pf_fast: fast1 - fast0,
            dirty_pages: dirty,
            harvest_ns,
            copy_ns,
        });
        if last {
            report.downtime_ns = harvest_ns + copy_ns;
            break;
        }
    }

    // The destination must now be guest memory, page for page: the pages it holds equal
    // the source's, and every source page with data is among them unless it is all zero.
    // Pages in neither are zero on both sides.
    let mut differ = Vec::new();
    for (&i, copy) in &dst {
        if read_page(m, hva, i)? != *copy {
            differ.push(i);
        }
    }
    for i in data_pages(m, hva, size) {
        if !dst.contains_key(&i) && read_page(m, hva, i)?.iter().any(|&w| w != 0) {
            differ.push(i);
        }
    }
    differ.sort_unstable();
    if !differ.is_empty() {
        return Err(Failure::MigrateMismatch {
            pages: differ.len(),
            slot: plan.slot,
            first_gfns: differ.iter().take(8).map(|i| (gpa >> 12) + i).collect(),
        }
        .into());
    }
    report.dest_pages = dst.len() as u64;
    report.dest_bytes = report.dest_pages * 4096;
    region.flags = base_flags;
    m.kvm.set_user_memory_region(region).map_err(kvm_err)?;
    Ok(report)
}
