//! The scenario ops: what each `{ op = ... }` of a phase does to a [`Machine`]. The middle
//! layer of a run, above [`crate::machine`] and beside the ops with modules of their own
//! ([`crate::migrate`], [`crate::idle`], [`crate::replay`]); the runner
//! ([`crate::runner`]) calls [`run`] for each op of each phase.

use crate::error::{ConfigError, Failure, RunError};
use crate::machine::{current_pid, ensure_mapped, run_workload, Guest, Machine};
use crate::scenario::Op;
use vmmu::host::Hva;
use vmmu::x86_paging::addr::Gva;
use vmmu::Vcpu;
use vmmu_guest::workload::{self, KernelSpace, Workload};

/// The reports of the ops that make one (in a run's `--json` object).
#[derive(Debug, Clone, Default)]
pub struct Reports {
    /// The `migrate` ops' per-round reports.
    pub migrations: Vec<crate::migrate::MigrationReport>,
    /// The `idle-tracking` ops' per-pass reports.
    pub idle_tracking: Vec<crate::idle::IdleReport>,
    /// The `replay` ops' reports.
    pub replays: Vec<crate::replay::ReplayReport>,
    /// The `dirty-log-harvest` ops' reports.
    pub dirty_log: Vec<crate::dirty_log::Harvest>,
}

/// The address of the level-`level` guest entry mapping `va`, read through the identity map.
fn entry_addr(v: &mut Vcpu, va: u64, level: u8, levels: u8) -> Result<u64, Failure> {
    let mut table = v.cpu().paging().cr3 & 0x000f_ffff_ffff_f000;
    for l in (level + 1..=levels).rev() {
        let at = table + ((va >> (12 + 9 * (u32::from(l) - 1))) & 511) * 8;
        let e = v.read(Gva::new(at), 8)?;
        if e & 1 == 0 {
            return Err(Failure::NoEntry { va, level: l });
        }
        if e & 0x80 != 0 {
            return Err(Failure::HugeEntry { va, level: l });
        }
        table = e & 0x000f_ffff_ffff_f000;
    }
    Ok(table + ((va >> (12 + 9 * (u32::from(level) - 1))) & 511) * 8)
}

/// A workload by name, with the scenario's optional access count and seed.
fn make_workload(name: &str, pages: u64, accesses: Option<u64>, seed: Option<u64>) -> Result<Workload, ConfigError> {
    let mut w = Workload::parse(name, pages).ok_or_else(|| ConfigError::UnknownWorkload { name: name.to_string() })?;
    if let Workload::Random { accesses: a, seed: s } | Workload::Zipf { accesses: a, seed: s, .. } = &mut w {
        if let Some(x) = accesses {
            *a = x;
        }
        if let Some(x) = seed {
            *s = x;
        }
    }
    Ok(w)
}

/// Runs `op` on `m` in the phase named `phase`, adding its report (if it makes one) to
/// `reports`; returns the guest accesses the op made.
pub fn run(m: &mut Machine, op: &Op, phase: &str, reports: &mut Reports) -> Result<u64, RunError> {
    match op {
        Op::Write { start, pages } => run_workload(m, Workload::FirstTouch, start.0, *pages),
        Op::Read { start, pages } => run_workload(m, Workload::Read, start.0, *pages),
        Op::Fetch { start, pages } => run_workload(m, Workload::Fetch, start.0, *pages),
        Op::ReadThenWrite { start, pages } => run_workload(m, Workload::ReadThenWrite, start.0, *pages),
        Op::Workload { name, start, pages, accesses, seed } => {
            let w = make_workload(name, *pages, *accesses, *seed)?;
            run_workload(m, w, start.0, *pages)
        }
        Op::Migrate { slot, workload, start, pages, accesses, seed, max_rounds, stop_pages } => {
            let plan = crate::migrate::Plan { slot: *slot, max_rounds: *max_rounds, stop_pages: *stop_pages };
            let mut next_seed = seed.unwrap_or(1);
            let mut guest_round = |m: &mut Machine| {
                let w = make_workload(workload, *pages, *accesses, Some(next_seed))?;
                next_seed += 1;
                run_workload(m, w, start.0, *pages)
            };
            let report = crate::migrate::run(m, &plan, &mut guest_round)?;
            let accesses = report.rounds.iter().map(|r| r.guest_accesses).sum();
            reports.migrations.push(report);
            Ok(accesses)
        }
        Op::IdleTracking { slot, workload, start, pages, accesses, seed, passes } => {
            let mut guest_pass = |m: &mut Machine| {
                let w = make_workload(workload, *pages, *accesses, *seed)?;
                run_workload(m, w, start.0, *pages)
            };
            let report = crate::idle::run(m, *slot, *passes, &mut guest_pass)?;
            let accesses = report.passes.iter().map(|p| p.guest_accesses).sum();
            reports.idle_tracking.push(report);
            Ok(accesses)
        }
        Op::Switch { process } => {
            if let Guest::Kernel(k) = &mut m.guest {
                k.switch_to(&mut m.vcpus[0], *process).map_err(Failure::from)?;
            }
            Ok(0)
        }
        Op::Munmap { start, pages } => {
            if let Guest::Kernel(k) = &mut m.guest {
                let pid = current_pid(k);
                k.munmap(&mut m.vcpus[0], pid, start.0, pages * 4096).map_err(Failure::from)?;
            }
            Ok(0)
        }
        Op::Invlpg { addr } => {
            for v in m.vcpus.iter_mut() {
                v.invlpg(Gva::new(addr.0));
            }
            Ok(0)
        }
        Op::MadviseDontneed { slot, offset, size }
        | Op::MigratePages { slot, offset, size }
        | Op::SwapOut { slot, offset, size }
        | Op::ThpSplit { slot, offset, size }
        | Op::ThpCollapse { slot, offset, size }
        | Op::KsmMerge { slot, offset, size } => {
            let name = match op {
                Op::MadviseDontneed { .. } => "madvise-dontneed",
                Op::MigratePages { .. } => "migrate-pages",
                Op::SwapOut { .. } => "swap-out",
                Op::ThpSplit { .. } => "thp-split",
                Op::KsmMerge { .. } => "ksm-merge",
                _ => "thp-collapse",
            };
            // Scenario::validate refuses these up front; this guards a scenario built in code.
            let (_, len, hva) = m.slots[*slot as usize];
            if offset.0.checked_add(size.0).is_none_or(|end| end > len) {
                return Err(
                    ConfigError::HostOpRange { op: name, offset: offset.0, size: size.0, slot: *slot, len }.into()
                );
            }
            for v in m.vcpus.iter_mut() {
                v.exit_guest();
            }
            let host = m.kvm.host();
            let at = Hva(hva.raw() + offset.0);
            match op {
                Op::MadviseDontneed { .. } => host.madvise_dontneed(at, size.0).map_err(Failure::from)?,
                Op::MigratePages { .. } => {
                    host.migrate_pages(at, size.0).map_err(Failure::from)?;
                }
                Op::SwapOut { .. } => {
                    host.swap_out(at, size.0).map_err(Failure::from)?;
                }
                Op::ThpSplit { .. } => {
                    host.split_huge_pages(at, size.0).map_err(Failure::from)?;
                }
                Op::KsmMerge { .. } => {
                    host.ksm_merge(at, size.0).map_err(Failure::from)?;
                }
                _ => {
                    host.collapse_huge_pages(at, size.0).map_err(Failure::from)?;
                }
            }
            Ok(0)
        }
        Op::Fork | Op::Exec | Op::Exit { .. } | Op::ProcessChurn { .. } => {
            let Guest::Kernel(k) = &mut m.guest else { return Ok(0) };
            let cpu = &mut m.vcpus[0];
            let cur = current_pid(k);
            match op {
                Op::Fork => {
                    k.fork(cpu, cur).map_err(Failure::from)?;
                    Ok(0)
                }
                Op::Exec => {
                    k.exec(cpu, cur).map_err(Failure::from)?;
                    Ok(0)
                }
                Op::Exit { process } => {
                    k.exit(cpu, *process).map_err(Failure::from)?;
                    Ok(0)
                }
                Op::ProcessChurn { iterations, start, pages } => {
                    let mut accesses = 0;
                    ensure_mapped(k, cur, start.0, *pages)?;
                    for _ in 0..*iterations {
                        let child = k.fork(cpu, cur).map_err(Failure::from)?;
                        k.switch_to(cpu, child).map_err(Failure::from)?;
                        accesses +=
                            workload::run(Workload::FirstTouch, &mut KernelSpace { kernel: k, cpu }, start.0, *pages)
                                .map_err(Failure::from)?
                                .accesses;
                        // munmap the second half (PTE clears + INVLPG), then exec drops the rest.
                        let half = (*pages / 2) * 4096;
                        if half > 0 {
                            k.munmap(cpu, child, start.0 + half, *pages * 4096 - half).map_err(Failure::from)?;
                        }
                        k.exec(cpu, child).map_err(Failure::from)?;
                        ensure_mapped(k, child, start.0, *pages)?;
                        accesses +=
                            workload::run(Workload::FirstTouch, &mut KernelSpace { kernel: k, cpu }, start.0, *pages)
                                .map_err(Failure::from)?
                                .accesses;
                        k.switch_to(cpu, cur).map_err(Failure::from)?;
                        k.exit(cpu, child).map_err(Failure::from)?;
                    }
                    Ok(accesses)
                }
                _ => Ok(0),
            }
        }
        Op::RewriteEntry { va, level, clear, set, target } => {
            let Guest::Identity { levels, .. } = &m.guest else { return Ok(0) };
            let levels = *levels;
            let v = &mut m.vcpus[0];
            let at = entry_addr(v, va.0, *level, levels)?;
            let old = v.read(Gva::new(at), 8).map_err(Failure::from)?;
            let mut new = (old & !clear.0) | set.0;
            if let Some(t) = target {
                new = (new & !0x000f_ffff_ffff_f000) | (t.0 & 0x000f_ffff_ffff_f000);
            }
            v.write(Gva::new(at), 8, new).map_err(Failure::from)?;
            Ok(2)
        }
        Op::NewRoot => {
            let Guest::Identity { roots, .. } = &mut m.guest else { return Ok(0) };
            let v = &mut m.vcpus[0];
            let boot = roots[0];
            // A free page just below the data area, one per new root.
            let page = m.data_start - 4096 * (roots.len() as u64);
            for i in 0..512u64 {
                let e = v.read(Gva::new(boot + i * 8), 8).map_err(Failure::from)?;
                v.write(Gva::new(page + i * 8), 8, e).map_err(Failure::from)?;
            }
            roots.push(page);
            Ok(1024)
        }
        Op::SwitchRoot { root } => {
            let Guest::Identity { roots, .. } = &m.guest else { return Ok(0) };
            let cr3 = *roots.get(*root as usize).ok_or(ConfigError::NoRoot { root: *root })?;
            for v in m.vcpus.iter_mut() {
                v.write_cr3(cr3).map_err(Failure::from)?;
            }
            Ok(0)
        }
        Op::NxRecovery { passes } => {
            for v in m.vcpus.iter_mut() {
                v.exit_guest();
            }
            for _ in 0..*passes {
                m.kvm.nx_huge_page_recovery();
            }
            Ok(0)
        }
        Op::Audit => {
            for v in m.vcpus.iter_mut() {
                v.exit_guest();
            }
            m.kvm.audit().map_err(Failure::from)?;
            Ok(0)
        }
        Op::SetNrMmuPages { nr_mmu_pages } => {
            for v in m.vcpus.iter_mut() {
                v.exit_guest();
            }
            m.kvm.set_nr_mmu_pages(*nr_mmu_pages);
            Ok(0)
        }
        Op::DirtyLogStart { slot } => crate::dirty_log::set_logging(m, *slot, true).map(|()| 0),
        Op::DirtyLogStop { slot } => crate::dirty_log::set_logging(m, *slot, false).map(|()| 0),
        Op::DirtyLogHarvest { slot } => {
            reports.dirty_log.push(crate::dirty_log::harvest(m, *slot, phase)?);
            Ok(0)
        }
        Op::Replay { trace } => {
            let Guest::Kernel(k) = &mut m.guest else { return Ok(0) };
            let r = crate::replay::run(k, &mut m.vcpus[0], std::path::Path::new(trace), phase)?;
            let records = r.stats.records;
            reports.replays.push(r);
            Ok(records)
        }
    }
}
