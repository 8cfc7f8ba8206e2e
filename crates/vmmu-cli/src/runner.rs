//! Runs a scenario: builds its [`Machine`], drives the guest through the phases op by op
//! ([`crate::ops`]) and collects KVM's statistics per phase into a [`RunResult`]. The top
//! layer of a run: it uses [`crate::machine`] and the ops, which never use it.

use crate::error::{ConfigError, Failure, OpAt, RunError};
use crate::machine::{build, stats_now, HwSummary, Machine, GAUGES};
use crate::ops::{self, Reports};
use crate::scenario::{Op, Scenario};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use vmmu::stats::LatencyHistogram;
use vmmu_guest::workload::Workload;

/// Which tracer to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceMode {
    /// No tracing.
    Off,
    /// Tracepoints.
    Events,
    /// The function_graph tracer.
    FunctionGraph,
}

/// Command-line overrides.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// `--mmu`.
    pub mmu: Option<String>,
    /// `--workload` (replaces the phases with two passes of it).
    pub workload: Option<String>,
    /// `--pages`.
    pub pages: Option<u64>,
    /// `--trace`.
    pub trace: TraceMode,
    /// `--replay`: replaces the phases with two passes over this trace.
    pub replay: Option<std::path::PathBuf>,
    /// Keep the raw trace records ([`RunResult::trace_records`]) instead of rendering them
    /// as text, recording both tracepoints and function spans whatever `trace` says (for
    /// the Chrome/Perfetto export, `--trace-out FILE.json`). Only with `trace` on.
    pub trace_records: bool,
    /// Time each MMU exit's handling ([`vmmu::Vcpu::set_fault_timing`]) and report a
    /// histogram per phase in [`PhaseResult::fault_latency`] (used by `vmmu sweep`).
    pub fault_timing: bool,
    /// With `trace` = events (and not `trace_records`): write the trace here as the run
    /// goes instead of keeping it ([`RunResult::trace`] is then `None`).
    pub trace_stream: Option<TraceStream>,
}

/// Where a `--trace events` trace is written as the run goes, shared by the runs of a
/// compare list (their traces separated by an empty line, as when they are printed at the
/// end). It keeps its first write error.
#[derive(Clone)]
pub struct TraceStream {
    out: Arc<std::sync::Mutex<Box<dyn std::io::Write + Send>>>,
    runs: Arc<std::sync::atomic::AtomicUsize>,
    error: Arc<std::sync::Mutex<Option<(std::io::ErrorKind, String)>>>,
}

impl std::fmt::Debug for TraceStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceStream").field("error", &self.error()).finish_non_exhaustive()
    }
}

impl TraceStream {
    /// A stream into `out`.
    pub fn new(out: Box<dyn std::io::Write + Send>) -> Self {
        TraceStream { out: Arc::new(std::sync::Mutex::new(out)), runs: Arc::default(), error: Arc::default() }
    }

    /// The kind of the first write error, if any.
    pub fn error(&self) -> Option<std::io::ErrorKind> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(k, _)| *k)
    }

    /// The first write error as the system reported it, if any.
    pub fn error_message(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(_, m)| m.clone())
    }

    fn keep<T>(&self, r: std::io::Result<T>) -> std::io::Result<T> {
        if let Err(e) = &r {
            self.error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(|| (e.kind(), e.to_string()));
        }
        r
    }
}

impl std::io::Write for TraceStream {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let r = self.out.lock().unwrap_or_else(|e| e.into_inner()).write(b);
        self.keep(r)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let r = self.out.lock().unwrap_or_else(|e| e.into_inner()).flush();
        self.keep(r)
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            mmu: None,
            workload: None,
            pages: None,
            trace: TraceMode::Off,
            replay: None,
            trace_records: false,
            fault_timing: false,
            trace_stream: None,
        }
    }
}

/// One phase's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PhaseResult {
    /// Name.
    pub name: String,
    /// Wall time.
    pub wall_ns: u64,
    /// Guest accesses made by the workload ops (not counting the guest kernel's own).
    pub accesses: u64,
    /// KVM statistics: counters as deltas over the phase, gauges (pages_*, tdp_mmu_pages)
    /// as values at its end.
    pub stats: BTreeMap<String, i64>,
    /// Hardware-model counters.
    pub hw: HwSummary,
    /// Pages the phase's `dirty-log-harvest` ops reported dirty, all together (None: the
    /// phase harvested nothing; its harvests one by one are in [`RunResult::dirty_log`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_pages_harvested: Option<u64>,
    /// With `--trace events`: the phase's events, as an index range into the event lines of
    /// [`RunResult::trace`] (the lines that are not `#` comments), so a trace can be split
    /// into phases exactly. Empty otherwise.
    #[serde(skip)]
    pub trace_events: std::ops::Range<usize>,
    /// Per-fault handling times over the phase, all vCPUs together (with
    /// [`RunOptions::fault_timing`]; not in the `--json` object).
    #[serde(skip)]
    pub fault_latency: Option<LatencyHistogram>,
}

/// A whole run's result (the `--json` object).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunResult {
    /// Scenario name.
    pub scenario: String,
    /// MMU.
    pub mmu: String,
    /// Phases.
    pub phases: Vec<PhaseResult>,
    /// Statistics at the end of the run (including boot).
    pub stats: BTreeMap<String, i64>,
    /// Host-side accounting.
    pub host: HostSummary,
    /// The `migrate` ops' per-round reports.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub migrations: Vec<crate::migrate::MigrationReport>,
    /// The `idle-tracking` ops' per-pass reports.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub idle_tracking: Vec<crate::idle::IdleReport>,
    /// The `replay` ops' reports.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replays: Vec<crate::replay::ReplayReport>,
    /// The `dirty-log-harvest` ops' reports, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dirty_log: Vec<crate::dirty_log::Harvest>,
    /// Rendered trace, if tracing.
    #[serde(skip)]
    pub trace: Option<String>,
    /// The raw trace records, with [`RunOptions::trace_records`].
    #[serde(skip)]
    pub trace_records: Vec<vmmu::trace::Record>,
}

/// What the host spent.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct HostSummary {
    /// 4 KiB host frames in use (guest memory, page tables, MMU tables).
    pub frames_4k: u64,
    /// 2 MiB host frames in use.
    pub frames_2m: u64,
    /// Host page-table pages of the VMM's address space.
    pub host_pt_pages: u64,
    /// MMU page-table pages (tdp_mmu_pages) as bytes.
    pub mmu_table_bytes: u64,
}

/// Where op `index` of phase `phase` (named `name`) is, for its errors.
fn op_at(phase: usize, name: &str, index: usize, op: &Op) -> OpAt {
    OpAt { phase, phase_name: name.to_string(), index, op: op.name() }
}

/// The phases to run: the scenario's, or two passes of `--replay` or of `--workload`. The
/// error: `--pages` pages from the data area run past the end of the address space.
fn phases(s: &Scenario, opts: &RunOptions, data_start: u64) -> Result<Vec<crate::scenario::Phase>, ConfigError> {
    if let Some(t) = &opts.replay {
        let op = Op::Replay { trace: t.display().to_string() };
        return Ok(["pass1", "pass2"]
            .iter()
            .map(|n| crate::scenario::Phase { name: n.to_string(), ops: vec![op.clone()] })
            .collect());
    }
    match (&opts.workload, opts.pages) {
        (None, None) => Ok(s.phases.clone()),
        (w, p) => {
            let name = w.clone().unwrap_or_else(|| "first-touch".into());
            let pages = p.unwrap_or(16384);
            // As the scenario's own ops are checked (Scenario::validate).
            if pages.checked_mul(4096).and_then(|b| data_start.checked_add(b)).is_none() {
                return Err(ConfigError::PagesPastEnd { pages, start: data_start });
            }
            let second = if name == "first-touch" { "re-touch".to_string() } else { name.clone() };
            let op = |n: &str| Op::Workload {
                name: n.to_string(),
                start: crate::scenario::Size(data_start),
                pages,
                accesses: None,
                seed: None,
            };
            Ok(vec![
                crate::scenario::Phase { name: "pass1".into(), ops: vec![op(&name)] },
                crate::scenario::Phase { name: "pass2".into(), ops: vec![op(&second)] },
            ])
        }
    }
}

/// Checks what the scenario names outside itself before anything runs: the trace file of
/// each `replay` op can be opened and is a vmmu trace (`phase[P].ops[I].trace: ...`).
fn precheck(s: &Scenario, opts: &RunOptions) -> Result<(), RunError> {
    if opts.replay.is_some() || opts.workload.is_some() || opts.pages.is_some() {
        return Ok(()); // the scenario's phases are replaced
    }
    for (pi, p) in s.phases.iter().enumerate() {
        for (oi, op) in p.ops.iter().enumerate() {
            if let Op::Replay { trace } = op {
                crate::replay::header_counts(std::path::Path::new(trace)).map_err(|source| ConfigError::ReplayOp {
                    phase: pi,
                    index: oi,
                    source,
                })?;
            }
        }
    }
    Ok(())
}

/// Builds `s`'s machine and runs its phases (or `--workload`'s) in order, up to and including
/// `after_phase` (all of them when `None`), and returns the machine in that state (for
/// `vmmu explain`). Nothing is traced.
pub fn run_to(s: &Scenario, opts: &RunOptions, after_phase: Option<&str>) -> Result<Machine, RunError> {
    precheck(s, opts)?;
    let mut m = build(s, opts.mmu.as_deref())?;
    let phases = phases(s, opts, m.data_start)?;
    if let Some(name) = after_phase {
        if !phases.iter().any(|p| p.name == name) {
            let phases = phases.iter().map(|p| p.name.clone()).collect();
            return Err(ConfigError::NoPhase { name: name.to_string(), phases }.into());
        }
    }
    let mut reports = Reports::default(); // not reported: explain looks at the machine
    for (pi, ph) in phases.iter().enumerate() {
        for (i, op) in ph.ops.iter().enumerate() {
            ops::run(&mut m, op, &ph.name, &mut reports).map_err(|e| e.in_op(op_at(pi, &ph.name, i, op)))?;
        }
        if Some(ph.name.as_str()) == after_phase {
            break;
        }
    }
    for v in m.vcpus.iter_mut() {
        v.exit_guest();
    }
    Ok(m)
}

/// Runs `s` once per MMU of its `compare` list (or once, with `--mmu` or no list).
pub fn run_compare(
    s: &Scenario,
    opts: &RunOptions,
    mut progress: impl FnMut(&str, f64),
) -> Result<Vec<RunResult>, RunError> {
    if opts.mmu.is_some() || s.compare.is_empty() {
        return Ok(vec![run(s, opts, progress)?]);
    }
    let mut out = Vec::new();
    for mmu in &s.compare {
        let o = RunOptions { mmu: Some(mmu.clone()), ..opts.clone() };
        out.push(run(s, &o, |p, f| progress(&format!("{mmu} {p}"), f))?);
    }
    Ok(out)
}

/// Runs `s`; `progress` is called with (phase name, fraction done) as ops complete.
pub fn run(s: &Scenario, opts: &RunOptions, mut progress: impl FnMut(&str, f64)) -> Result<RunResult, RunError> {
    if let Some(w) = &opts.workload {
        if Workload::parse(w, 1).is_none() {
            return Err(ConfigError::BadWorkload { name: w.clone() }.into());
        }
    }
    if opts.pages == Some(0) {
        return Err(ConfigError::ZeroPages.into());
    }
    if let Some(t) = &opts.replay {
        if opts.workload.is_some() || opts.pages.is_some() {
            return Err(ConfigError::ReplayWithWorkload.into());
        }
        if s.guest.layout != "kernel" {
            return Err(ConfigError::ReplayLayout.into());
        }
        let ram: u64 = s.memslots.iter().filter(|x| !x.readonly).map(|x| x.size.0).sum();
        crate::replay::check_fits(t, ram).map_err(ConfigError::Replay)?;
    }
    precheck(s, opts)?;
    let mut m = build(s, opts.mmu.as_deref())?;
    let tracer = &m.kvm.tracer;
    match opts.trace {
        TraceMode::Events => tracer.set_events(true),
        TraceMode::FunctionGraph => tracer.set_function_graph(true),
        TraceMode::Off => {}
    }
    let keep_records = opts.trace_records && opts.trace != TraceMode::Off;
    if keep_records {
        tracer.set_events(true);
        tracer.set_function_graph(true);
    }
    let stream = opts.trace_stream.clone().filter(|_| opts.trace == TraceMode::Events && !keep_records);
    if let Some(st) = &stream {
        let mut st = st.clone();
        if st.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed) > 0 {
            let r = std::io::Write::write_all(&mut st, b"\n");
            st.keep(r).map_err(Failure::TraceWrite)?;
        }
        tracer.stream_events_to(Box::new(st));
    }
    if opts.fault_timing {
        for v in m.vcpus.iter_mut() {
            v.set_fault_timing(true);
        }
    }
    let latency_now = |m: &Machine| {
        opts.fault_timing.then(|| {
            let mut h = LatencyHistogram::default();
            for v in &m.vcpus {
                if let Some(x) = v.fault_latency() {
                    h.merge(x);
                }
            }
            h
        })
    };
    let mut results = Vec::new();
    let mut reports = Reports::default();
    for (pi, ph) in phases(s, opts, m.data_start)?.into_iter().enumerate() {
        let (before, hw0) = stats_now(&m);
        let lat0 = latency_now(&m);
        let trace_start = if opts.trace == TraceMode::Events { m.kvm.tracer.len() } else { 0 };
        let harvests0 = reports.dirty_log.len();
        let t0 = Instant::now();
        let mut accesses = 0;
        let n = ph.ops.len().max(1);
        for (i, op) in ph.ops.iter().enumerate() {
            accesses +=
                ops::run(&mut m, op, &ph.name, &mut reports).map_err(|e| e.in_op(op_at(pi, &ph.name, i, op)))?;
            progress(&ph.name, (i + 1) as f64 / n as f64);
            if stream.is_some() {
                if let Some(e) = m.kvm.tracer.stream_error() {
                    // The trace's reader went away (or its disk filled): stop here.
                    return Err(Failure::TraceWrite(std::io::Error::from(e)).into());
                }
            }
        }
        let wall_ns = crate::clock::elapsed_ns(t0);
        let (after, hw1) = stats_now(&m);
        let fault_latency = latency_now(&m).zip(lat0).map(|(a, b)| a.since(&b));
        let stats = after
            .iter()
            .map(|(k, v)| {
                (k.clone(), if GAUGES.contains(&k.as_str()) { *v } else { v - before.get(k).copied().unwrap_or(0) })
            })
            .collect();
        let hw = HwSummary {
            tlb_hits: hw1.tlb_hits - hw0.tlb_hits,
            tlb_misses: hw1.tlb_misses - hw0.tlb_misses,
            walks: hw1.walks - hw0.walks,
            walk_mem_refs: hw1.walk_mem_refs - hw0.walk_mem_refs,
        };
        let trace_end = if opts.trace == TraceMode::Events { m.kvm.tracer.len() } else { 0 };
        results.push(PhaseResult {
            name: ph.name.clone(),
            wall_ns,
            accesses,
            stats,
            hw,
            dirty_pages_harvested: (reports.dirty_log.len() > harvests0)
                .then(|| reports.dirty_log[harvests0..].iter().map(|h| h.dirty_pages).sum()),
            trace_events: trace_start..trace_end,
            fault_latency,
        });
    }
    for v in m.vcpus.iter_mut() {
        v.exit_guest();
    }
    let (stats, _) = stats_now(&m);
    let counts = m.kvm.host().frames().counts();
    let host = HostSummary {
        frames_4k: counts.frames_4k,
        frames_2m: counts.frames_2m,
        host_pt_pages: m.kvm.host().pt_pages(),
        // The TDP MMU's tables: those below the roots (tdp_mmu_pages) and the roots.
        mmu_table_bytes: (u64::try_from(stats.get("tdp_mmu_pages").copied().unwrap_or(0)).unwrap_or(0)
            + m.kvm.mmu().roots.lock().len() as u64)
            * 4096,
    };
    let trace_records = if keep_records { m.kvm.tracer.take_records() } else { Vec::new() };
    if stream.is_some() {
        m.kvm.tracer.finish_stream().map_err(Failure::TraceWrite)?;
    }
    let trace = match opts.trace {
        _ if keep_records || stream.is_some() => None,
        TraceMode::Events => Some(m.kvm.tracer.render_events()),
        TraceMode::FunctionGraph => Some(m.kvm.tracer.render_function_graph()),
        TraceMode::Off => None,
    };
    Ok(RunResult {
        scenario: s.name.clone(),
        mmu: opts.mmu.clone().unwrap_or_else(|| s.vm.mmu.clone()),
        phases: results,
        stats,
        host,
        migrations: reports.migrations,
        idle_tracking: reports.idle_tracking,
        replays: reports.replays,
        dirty_log: reports.dirty_log,
        trace,
        trace_records,
    })
}
