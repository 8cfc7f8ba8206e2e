//! `vmmu sweep`: runs a grid of configurations — MMU x host backing x guest page size x A/D
//! bits x workload — one generated scenario per cell, in parallel, and writes JSON Lines,
//! CSV, SVG plots and an HTML report.
//!
//! Each cell is an identity-layout guest (gva = gpa, the VMM builds the tables) with one
//! memslot at gpa 0 that holds the tables and `pages` data pages; the runner's `--workload`
//! phases run on it: `pass1` (the workload) and `pass2` (the same again; `re-touch` after
//! `first-touch`). What "A/D on/off" means depends on the MMU (see [`CellConfig::ad_means`]):
//! for `tdp` and `legacy-tdp` it is `kvm_intel.eptad` (EPT A/D bits; the guest's A/D bits
//! start clear either way), for `shadow`, which has no EPT, it is the guest's own page-table
//! A/D bits preset by the VMM (the shadow MMU never has to set them) or clear (KVM's guest
//! walk sets A, and D on a write, and maps clean pages read-only until written).
//!
//! vmmu has no simulated clock: times are measured wall times of the model (cells run in
//! parallel share the machine, so use `--jobs 1` for cleaner times). Fault latency is the
//! wall time of each MMU exit's handling, measured by the vCPU's optional fault timing
//! ([`vmmu::Vcpu::set_fault_timing`]), in power-of-two buckets.

use crate::chart::{BarChart, Unit};
use crate::machine::GAUGES;
use crate::runner::{self, RunOptions, RunResult};
use crate::scenario::{GuestSection, MemslotSection, Scenario, Size, VmSection};
use crate::svg::escape as esc;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;
use vmmu::stats::{LatencyHistogram, LATENCY_BUCKETS};

/// A sweep failure that stops the whole sweep (a failed cell does not: it is recorded).
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The grid is invalid.
    #[error("{0}")]
    Grid(String),
    /// Writing the outputs failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

fn on_off<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<bool>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        B(bool),
        S(String),
    }
    Vec::<Raw>::deserialize(d)?
        .into_iter()
        .map(|r| match r {
            Raw::B(b) => Ok(b),
            Raw::S(s) => match s.as_str() {
                "on" | "true" => Ok(true),
                "off" | "false" => Ok(false),
                _ => Err(serde::de::Error::custom(format!("ad: `{s}` is not on or off"))),
            },
        })
        .collect()
}

/// The axes of a sweep (a grid TOML file; every key optional, defaults in [`Grid::default`]).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Grid {
    /// MMUs: tdp, shadow, legacy-tdp.
    pub mmu: Vec<String>,
    /// Host backing of guest memory: 4k, thp.
    pub backing: Vec<String>,
    /// Guest page size of the identity map: 4k, 2m.
    pub guest_page: Vec<String>,
    /// A/D bits on and off (`true`/`false` or `"on"`/`"off"`); per MMU, see
    /// [`CellConfig::ad_means`].
    #[serde(deserialize_with = "on_off")]
    pub ad: Vec<bool>,
    /// Workloads: first-touch, re-touch, read-then-write, read, random, zipf.
    pub workload: Vec<String>,
    /// Data pages each workload covers (random and zipf make 16 accesses per page).
    pub pages: u64,
}

impl Default for Grid {
    /// 3 MMUs x 2 backings x 2 guest page sizes x A/D on/off x 4 workloads = 96 cells of
    /// 16384 pages (64 MiB).
    fn default() -> Self {
        let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect();
        Grid {
            mmu: v(&["tdp", "shadow", "legacy-tdp"]),
            backing: v(&["4k", "thp"]),
            guest_page: v(&["4k", "2m"]),
            ad: vec![true, false],
            workload: v(&["first-touch", "read-then-write", "random", "zipf"]),
            pages: 16384,
        }
    }
}

impl Grid {
    /// Parses a grid file and checks it.
    pub fn parse(text: &str) -> Result<Grid, SweepError> {
        let g: Grid = toml::from_str(text).map_err(|e| {
            let (at, problem) = crate::scenario::toml_error(text, &e);
            SweepError::Grid(format!("{at}: {problem}"))
        })?;
        g.validate()?;
        Ok(g)
    }

    /// Checks every axis value.
    pub fn validate(&self) -> Result<(), SweepError> {
        let check = |axis: &str, vals: &[String], known: &[&str]| {
            if vals.is_empty() {
                return Err(SweepError::Grid(format!("{axis}: needs at least one value")));
            }
            for v in vals {
                if !known.contains(&v.as_str()) {
                    return Err(SweepError::Grid(format!("{axis}: `{v}` is not one of {}", known.join(", "))));
                }
            }
            Ok(())
        };
        check("mmu", &self.mmu, &["tdp", "shadow", "legacy-tdp"])?;
        check("backing", &self.backing, &["4k", "thp"])?;
        check("guest_page", &self.guest_page, &["4k", "2m"])?;
        check("workload", &self.workload, vmmu_guest::Workload::NAMES)?;
        if self.ad.is_empty() {
            return Err(SweepError::Grid("ad: needs at least one value".into()));
        }
        if self.pages == 0 || self.pages > (1 << 22) {
            return Err(SweepError::Grid("pages: must be 1..=4194304".into()));
        }
        Ok(())
    }

    /// The cells, outermost axis first: backing, guest page, A/D, workload, MMU.
    pub fn cells(&self) -> Vec<CellConfig> {
        let mut out = Vec::new();
        for b in &self.backing {
            for gp in &self.guest_page {
                for &ad in &self.ad {
                    for w in &self.workload {
                        for m in &self.mmu {
                            out.push(CellConfig {
                                mmu: m.clone(),
                                backing: b.clone(),
                                guest_page: gp.clone(),
                                ad,
                                workload: w.clone(),
                                pages: self.pages,
                            });
                        }
                    }
                }
            }
        }
        out
    }
}

/// One configuration of the grid.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CellConfig {
    /// tdp, shadow or legacy-tdp.
    pub mmu: String,
    /// Host backing: 4k or thp.
    pub backing: String,
    /// Guest page size: 4k or 2m.
    pub guest_page: String,
    /// A/D bits on (see [`CellConfig::ad_means`]).
    pub ad: bool,
    /// The workload.
    pub workload: String,
    /// Data pages.
    pub pages: u64,
}

const MIB: u64 = 1 << 20;

impl CellConfig {
    /// The cell's name: `mmu/backing/guest_page/ad-on|off/workload`.
    pub fn id(&self) -> String {
        format!("{}/{}/{}/ad-{}/{}", self.mmu, self.backing, self.guest_page, onoff(self.ad), self.workload)
    }

    /// What "A/D on/off" sets for this cell's MMU.
    pub fn ad_means(&self) -> &'static str {
        match (self.mmu.as_str(), self.ad) {
            ("shadow", true) => "guest A/D preset",
            ("shadow", false) => "guest A/D clear",
            (_, true) => "eptad=on",
            (_, false) => "eptad=off",
        }
    }

    /// The x-axis labels of the cell's group (every axis but the MMU), outermost first.
    fn group_labels(&self) -> Vec<String> {
        vec![
            format!("host {}", self.backing),
            format!("guest {}", self.guest_page),
            format!("A/D {}", onoff(self.ad)),
            self.workload.clone(),
        ]
    }

    /// The memslot size: the identity tables (from 1 MiB), the data area (from the first
    /// 16 MiB boundary at least 1 MiB after the tables, as the runner places it) and the
    /// data pages, rounded up to 2 MiB.
    fn memslot_size(&self) -> u64 {
        let data_start = |size: u64| {
            let total_pages = size / 4096;
            let table_bytes = (total_pages / 512 + total_pages / (512 * 512) + 64) * 4096;
            let end = MIB + table_bytes;
            (end + MIB).next_multiple_of(16 * MIB)
        };
        let mut size = (16 * MIB + self.pages * 4096).next_multiple_of(2 * MIB);
        loop {
            let need = (data_start(size) + self.pages * 4096).next_multiple_of(2 * MIB);
            if need <= size {
                return size;
            }
            size = need;
        }
    }

    /// The generated scenario (run with [`CellConfig::run_options`]).
    pub fn scenario(&self) -> Scenario {
        let shadow = self.mmu == "shadow";
        Scenario {
            name: format!("sweep {}", self.id()),
            description: format!(
                "vmmu sweep cell: {} MMU, host {} backing, guest {} pages ({}), {} over {} pages",
                self.mmu,
                self.backing,
                self.guest_page,
                self.ad_means(),
                self.workload,
                self.pages
            ),
            vm: VmSection { mmu: self.mmu.clone(), eptad: if shadow { true } else { self.ad }, ..VmSection::default() },
            memslots: vec![MemslotSection {
                gpa: Size(0),
                size: Size(self.memslot_size()),
                backing: self.backing.clone(),
                prefault: false,
                readonly: false,
                guest_page_size: None,
            }],
            mmio: Vec::new(),
            guest: GuestSection {
                layout: "identity".into(),
                page_size: self.guest_page.clone(),
                accessed_dirty: if shadow && self.ad { "preset" } else { "clear" }.into(),
                ..GuestSection::default()
            },
            phases: Vec::new(),
            compare: Vec::new(),
        }
    }

    /// The run options: the workload's two passes, with fault timing.
    pub fn run_options(&self) -> RunOptions {
        RunOptions {
            mmu: Some(self.mmu.clone()),
            workload: Some(self.workload.clone()),
            pages: Some(self.pages),
            fault_timing: true,
            ..RunOptions::default()
        }
    }
}

fn onoff(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// One cell's outcome.
#[derive(Debug, Clone)]
pub struct CellResult {
    /// Its configuration.
    pub config: CellConfig,
    /// The run, or why it failed.
    pub run: Result<RunResult, String>,
    /// Wall time of the whole cell (building the VM and booting included).
    pub cell_wall_ns: u64,
}

impl CellResult {
    /// Counters summed over the phases; gauges at the last phase's end.
    pub fn totals(&self) -> BTreeMap<String, i64> {
        let mut t = BTreeMap::new();
        if let Ok(r) = &self.run {
            for p in &r.phases {
                for (k, v) in &p.stats {
                    if GAUGES.contains(&k.as_str()) {
                        t.insert(k.clone(), *v);
                    } else {
                        *t.entry(k.clone()).or_insert(0) += v;
                    }
                }
                for (k, v) in [
                    ("tlb_hits", p.hw.tlb_hits),
                    ("tlb_misses", p.hw.tlb_misses),
                    ("walks", p.hw.walks),
                    ("walk_mem_refs", p.hw.walk_mem_refs),
                    ("accesses", p.accesses),
                ] {
                    *t.entry(k.to_string()).or_insert(0) += v as i64;
                }
            }
        }
        t
    }

    /// Wall time of the phases (the workload; not building and booting).
    pub fn wall_ns(&self) -> u64 {
        self.run.as_ref().map_or(0, |r| r.phases.iter().map(|p| p.wall_ns).sum())
    }

    /// The fault-handling times of all phases.
    pub fn fault_latency(&self) -> LatencyHistogram {
        let mut h = LatencyHistogram::default();
        if let Ok(r) = &self.run {
            for p in &r.phases {
                if let Some(x) = &p.fault_latency {
                    h.merge(x);
                }
            }
        }
        h
    }
}

/// Runs the cells on `jobs` threads (at least 1); `progress(done, total, cell)` is called
/// as each cell finishes. Results are in the order of `cells`.
pub fn run_cells(
    cells: &[CellConfig],
    jobs: usize,
    progress: &(dyn Fn(usize, usize, &CellResult) + Sync),
) -> Vec<CellResult> {
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let slots: Mutex<Vec<Option<CellResult>>> = Mutex::new(vec![None; cells.len()]);
    std::thread::scope(|sc| {
        for _ in 0..jobs.clamp(1, cells.len().max(1)) {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(c) = cells.get(i) else { break };
                let r = run_cell(c);
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                progress(n, cells.len(), &r);
                slots.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
            });
        }
    });
    slots
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .zip(cells)
        .map(|(r, c)| {
            r.unwrap_or_else(|| CellResult {
                config: c.clone(),
                run: Err("cell thread panicked".into()),
                cell_wall_ns: 0,
            })
        })
        .collect()
}

/// Runs one cell (a panic in the model is caught and recorded as the cell's failure).
pub fn run_cell(c: &CellConfig) -> CellResult {
    let t0 = Instant::now();
    let s = c.scenario();
    let run = match s.validate() {
        Err(e) => Err(format!("generated scenario: {e}")),
        Ok(()) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            runner::run(&s, &c.run_options(), |_, _| {}).map_err(|e| e.to_string())
        }))
        .unwrap_or_else(|p| {
            Err(format!(
                "panicked: {}",
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            ))
        }),
    };
    CellResult { config: c.clone(), run, cell_wall_ns: t0.elapsed().as_nanos() as u64 }
}

/// Statistics in the CSV's totals columns and the JSON's `totals`, in order.
pub const TOTAL_COLUMNS: &[&str] = &[
    "accesses",
    "pf_taken",
    "pf_fixed",
    "pf_fast",
    "pf_spurious",
    "pf_emulate",
    "pf_guest",
    "exits",
    "tlb_flush",
    "remote_tlb_flush",
    "remote_tlb_flush_requests",
    "invlpg",
    "mmu_cache_miss",
    "mmu_shadow_zapped",
    "mmu_pte_write",
    "mmu_unsync",
    "pages_4k",
    "pages_2m",
    "pages_1g",
    "tdp_mmu_pages",
    "tlb_hits",
    "tlb_misses",
    "walks",
    "walk_mem_refs",
];

/// Per-phase columns of the CSV (prefixed with the phase name).
pub const PHASE_COLUMNS: &[&str] = &["wall_ns", "accesses", "pf_taken", "pf_fixed", "pf_fast", "exits", "tlb_flush"];

/// The fault-latency columns of the CSV.
pub const LATENCY_COLUMNS: &[&str] =
    &["fault_count", "fault_sum_ns", "fault_mean_ns", "fault_p50_ns", "fault_p99_ns", "fault_max_ns"];

/// The phases of every cell (the runner's `--workload` passes).
pub const PHASES: &[&str] = &["pass1", "pass2"];

/// The configuration columns of the CSV.
pub const CONFIG_COLUMNS: &[&str] =
    &["cell", "mmu", "backing", "guest_page", "ad", "ad_means", "workload", "pages", "status", "error"];

/// The CSV header: configuration, wall times, totals, fault latency, per-phase columns.
pub fn csv_header() -> Vec<String> {
    let mut h: Vec<String> = CONFIG_COLUMNS.iter().map(|s| s.to_string()).collect();
    h.push("wall_ns".into());
    h.push("cell_wall_ns".into());
    h.extend(TOTAL_COLUMNS.iter().map(|s| s.to_string()));
    h.extend(LATENCY_COLUMNS.iter().map(|s| s.to_string()));
    for p in PHASES {
        h.extend(PHASE_COLUMNS.iter().map(|c| format!("{p}_{c}")));
    }
    h
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The latency summary: (count, sum, mean, p50 bucket bound, p99 bucket bound, max).
fn latency_summary(h: &LatencyHistogram) -> [u64; 6] {
    [
        h.count,
        h.sum_ns,
        h.sum_ns.checked_div(h.count).unwrap_or(0),
        h.quantile_upper_ns(0.5),
        h.quantile_upper_ns(0.99),
        h.max_ns,
    ]
}

/// One CSV row (same columns as [`csv_header`]).
pub fn csv_row(r: &CellResult) -> Vec<String> {
    let c = &r.config;
    let (status, error) = match &r.run {
        Ok(_) => ("ok", String::new()),
        Err(e) => ("error", e.clone()),
    };
    let mut row = vec![
        c.id(),
        c.mmu.clone(),
        c.backing.clone(),
        c.guest_page.clone(),
        onoff(c.ad).into(),
        c.ad_means().into(),
        c.workload.clone(),
        c.pages.to_string(),
        status.into(),
        error,
    ];
    let ok = r.run.is_ok();
    let num = |v: i64| if ok { v.to_string() } else { String::new() };
    row.push(num(r.wall_ns() as i64));
    row.push(r.cell_wall_ns.to_string());
    let t = r.totals();
    row.extend(TOTAL_COLUMNS.iter().map(|k| num(t.get(*k).copied().unwrap_or(0))));
    row.extend(latency_summary(&r.fault_latency()).iter().map(|v| num(*v as i64)));
    for pname in PHASES {
        let p = r.run.as_ref().ok().and_then(|x| x.phases.iter().find(|p| p.name == *pname));
        for col in PHASE_COLUMNS {
            row.push(match (p, *col) {
                (None, _) => String::new(),
                (Some(p), "wall_ns") => p.wall_ns.to_string(),
                (Some(p), "accesses") => p.accesses.to_string(),
                (Some(p), k) => p.stats.get(k).copied().unwrap_or(0).to_string(),
            });
        }
    }
    row
}

/// The whole CSV.
pub fn csv(results: &[CellResult]) -> String {
    let mut out = csv_header().join(",");
    out.push('\n');
    for r in results {
        out.push_str(&csv_row(r).iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    out
}

fn latency_json(h: &LatencyHistogram) -> serde_json::Value {
    let [count, sum, mean, p50, p99, max] = latency_summary(h);
    let buckets: Vec<_> = h
        .buckets
        .iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .map(|(i, c)| serde_json::json!({ "ge_ns": if i == 0 { 0 } else { 1u64 << i }, "lt_ns": 1u64 << (i + 1), "count": c }))
        .collect();
    serde_json::json!({
        "count": count, "sum_ns": sum, "mean_ns": mean, "p50_upper_ns": p50, "p99_upper_ns": p99,
        "max_ns": max, "buckets": buckets,
    })
}

/// One cell as a JSON object (a line of results.jsonl).
pub fn json(r: &CellResult) -> serde_json::Value {
    let c = &r.config;
    let config = serde_json::json!({
        "mmu": c.mmu, "backing": c.backing, "guest_page": c.guest_page, "ad": c.ad,
        "ad_means": c.ad_means(), "workload": c.workload, "pages": c.pages,
    });
    match &r.run {
        Err(e) => serde_json::json!({
            "cell": c.id(), "config": config, "status": "error", "error": e, "cell_wall_ns": r.cell_wall_ns,
        }),
        Ok(run) => {
            let phases: Vec<_> = run
                .phases
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "name": p.name, "wall_ns": p.wall_ns, "accesses": p.accesses, "stats": p.stats,
                        "hw": p.hw,
                        "fault_latency": latency_json(p.fault_latency.as_ref().unwrap_or(&LatencyHistogram::default())),
                    })
                })
                .collect();
            let t = r.totals();
            let totals: serde_json::Map<String, serde_json::Value> =
                TOTAL_COLUMNS.iter().map(|k| (k.to_string(), t.get(*k).copied().unwrap_or(0).into())).collect();
            serde_json::json!({
                "cell": c.id(), "config": config, "status": "ok", "wall_ns": r.wall_ns(),
                "cell_wall_ns": r.cell_wall_ns, "totals": totals, "fault_latency": latency_json(&r.fault_latency()),
                "phases": phases, "host": run.host,
            })
        }
    }
}

/// The plots written, as (file name, caption).
pub const PLOTS: &[(&str, &str)] = &[
    ("faults.svg", "MMU page faults (pf_taken, both passes) per configuration"),
    ("exits.svg", "VM exits (both passes) per configuration"),
    ("time.svg", "Wall time of the workload (both passes) per configuration"),
    ("fault-latency.svg", "Fault-handling latency histogram (all cells of each MMU)"),
];

/// The MMUs in the results, in grid order.
fn mmus(results: &[CellResult]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in results {
        if !out.contains(&r.config.mmu) {
            out.push(r.config.mmu.clone());
        }
    }
    out
}

/// A bar chart of one value per cell: a group per configuration (all axes but the MMU), a
/// bar per MMU.
fn per_config_chart(
    results: &[CellResult],
    title: &str,
    y_label: &str,
    unit: Unit,
    value: impl Fn(&CellResult) -> f64,
) -> BarChart {
    let series = mmus(results);
    let mut groups: Vec<Vec<String>> = Vec::new();
    let mut values: Vec<Vec<Option<f64>>> = Vec::new();
    for r in results {
        let g = r.config.group_labels();
        let gi = match groups.iter().position(|x| *x == g) {
            Some(i) => i,
            None => {
                groups.push(g);
                values.push(vec![None; series.len()]);
                groups.len() - 1
            }
        };
        let si = series.iter().position(|m| *m == r.config.mmu).unwrap_or(0);
        values[gi][si] = r.run.is_ok().then(|| value(r));
    }
    BarChart {
        title: title.into(),
        y_label: y_label.into(),
        x_label: "configuration: host backing / guest page size / A/D bits / workload".into(),
        groups,
        series,
        values,
        log_y: true,
        unit,
    }
}

/// The bucket range shown by the latency histogram: from the first to the last non-empty
/// bucket over all MMUs.
pub fn latency_range(hists: &[LatencyHistogram]) -> std::ops::RangeInclusive<usize> {
    let nonempty = |i: &usize| hists.iter().any(|h| h.buckets[*i] > 0);
    let lo = (0..LATENCY_BUCKETS).find(nonempty).unwrap_or(0);
    let hi = (0..LATENCY_BUCKETS).rev().find(nonempty).unwrap_or(0);
    lo..=hi
}

/// A duration with three significant digits: 512 ns, 1.02 µs, 65.5 µs, 1.05 ms.
fn human_ns(ns: u64) -> String {
    let (v, unit) = match ns {
        0..=999 => return format!("{ns} ns"),
        1_000..=999_999 => (ns as f64 / 1e3, "µs"),
        1_000_000..=999_999_999 => (ns as f64 / 1e6, "ms"),
        _ => (ns as f64 / 1e9, "s"),
    };
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$} {unit}")
}

/// The fault-latency histogram per MMU, over all cells of each.
pub fn latency_by_mmu(results: &[CellResult]) -> Vec<(String, LatencyHistogram)> {
    mmus(results)
        .into_iter()
        .map(|m| {
            let mut h = LatencyHistogram::default();
            for r in results.iter().filter(|r| r.config.mmu == m) {
                h.merge(&r.fault_latency());
            }
            (m, h)
        })
        .collect()
}

fn latency_chart(results: &[CellResult]) -> BarChart {
    let by = latency_by_mmu(results);
    let hists: Vec<LatencyHistogram> = by.iter().map(|(_, h)| h.clone()).collect();
    let range = latency_range(&hists);
    let groups = range.clone().map(|i| vec![format!("≥{}", human_ns(if i == 0 { 0 } else { 1 << i }))]).collect();
    let values = range.map(|i| hists.iter().map(|h| Some(h.buckets[i] as f64)).collect()).collect();
    BarChart {
        title: "Fault-handling latency (each MMU exit's handling, all cells)".into(),
        y_label: "faults".into(),
        x_label: "handling time, power-of-two buckets (lower bound shown)".into(),
        groups,
        series: by.into_iter().map(|(m, _)| m).collect(),
        values,
        log_y: true,
        unit: Unit::Count,
    }
}

/// The SVG plots, as (file name, document), in the order of [`PLOTS`].
pub fn plots(results: &[CellResult]) -> Vec<(&'static str, String)> {
    let get = |k: &'static str| move |r: &CellResult| r.totals().get(k).copied().unwrap_or(0) as f64;
    vec![
        (
            PLOTS[0].0,
            per_config_chart(
                results,
                "MMU page faults per configuration (pf_taken)",
                "faults",
                Unit::Count,
                get("pf_taken"),
            )
            .render(),
        ),
        (
            PLOTS[1].0,
            per_config_chart(results, "VM exits per configuration", "exits", Unit::Count, get("exits")).render(),
        ),
        (
            PLOTS[2].0,
            per_config_chart(
                results,
                "Workload wall time per configuration (measured)",
                "wall time",
                Unit::Millis,
                |r| r.wall_ns() as f64 / 1e6,
            )
            .render(),
        ),
        (PLOTS[3].0, latency_chart(results).render()),
    ]
}

/// What the sweep was, for the report.
#[derive(Debug, Clone)]
pub struct SweepInfo {
    /// The grid.
    pub grid: Grid,
    /// Threads used.
    pub jobs: usize,
    /// Wall time of the whole sweep.
    pub wall_ns: u64,
}

/// The HTML report: a summary, the plots inline (each also linked as its file) and the
/// table of every cell. Self-contained (no scripts, styles inline).
pub fn html(results: &[CellResult], info: &SweepInfo, plots: &[(&str, String)]) -> String {
    let mut h = String::new();
    let failed = results.iter().filter(|r| r.run.is_err()).count();
    let _ = writeln!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>vmmu sweep</title>\n<style>\
body{{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;margin:1.5em;color:#222}}\
table{{border-collapse:collapse;font-size:12px}}th,td{{border:1px solid #ccc;padding:2px 6px;text-align:right}}\
td.l,th.l{{text-align:left}}tr:nth-child(even){{background:#f4f4f4}}figure{{margin:1.5em 0;overflow-x:auto}}\
figcaption{{font-size:13px;color:#555}}.err{{color:#b00}}</style></head><body>"
    );
    let g = &info.grid;
    let _ = writeln!(h, "<h1>vmmu sweep</h1>");
    let _ = writeln!(
        h,
        "<p>{} cells ({} ok, {} failed) in {:.1} s on {} threads. Grid: mmu [{}] × host backing [{}] × guest page [{}] \
         × A/D [{}] × workload [{}], {} pages each. Every cell is an identity-layout guest running the workload twice \
         (<code>pass1</code>, <code>pass2</code>; <code>re-touch</code> after <code>first-touch</code>).</p>",
        results.len(),
        results.len() - failed,
        failed,
        info.wall_ns as f64 / 1e9,
        info.jobs,
        esc(&g.mmu.join(", ")),
        esc(&g.backing.join(", ")),
        esc(&g.guest_page.join(", ")),
        g.ad.iter().map(|b| onoff(*b)).collect::<Vec<_>>().join(", "),
        esc(&g.workload.join(", ")),
        g.pages
    );
    let _ = writeln!(
        h,
        "<p>A/D on/off: for <code>tdp</code> and <code>legacy-tdp</code> it is <code>eptad</code> (EPT A/D bits; the \
         guest's A/D bits start clear); for <code>shadow</code> it is the guest's page-table A/D bits preset or clear. \
         Times are measured wall times of the model (vmmu has no simulated clock), with cells running in parallel; \
         fault latency is each MMU exit's handling time.</p>"
    );
    for (i, (name, svg)) in plots.iter().enumerate() {
        let caption = PLOTS.iter().find(|p| p.0 == *name).map_or("", |p| p.1);
        let body = svg.trim_start_matches(|c| c != '<');
        let _ = writeln!(
            h,
            "<figure id=\"plot{i}\">{body}<figcaption>{} (<a href=\"{name}\">{name}</a>)</figcaption></figure>",
            esc(caption)
        );
    }
    // Fault latency per MMU.
    let _ = writeln!(h, "<h2>Fault latency per MMU</h2>\n<table class=\"latency\"><tr><th class=\"l\">mmu</th><th>faults</th><th>mean</th><th>p50 ≤</th><th>p99 ≤</th><th>max</th></tr>");
    for (m, lat) in latency_by_mmu(results) {
        let [count, _, mean, p50, p99, max] = latency_summary(&lat);
        let _ = writeln!(
            h,
            "<tr><td class=\"l\">{}</td><td>{count}</td><td>{mean} ns</td><td>{p50} ns</td><td>{p99} ns</td><td>{max} ns</td></tr>",
            esc(&m)
        );
    }
    let _ = writeln!(h, "</table>");
    // The cells.
    let cols = ["pf_taken", "pf_fixed", "pf_fast", "pf_guest", "exits", "tlb_flush", "pages_4k", "pages_2m"];
    let _ = writeln!(h, "<h2>Cells</h2>\n<table class=\"cells\"><tr><th class=\"l\">cell</th><th class=\"l\">mmu</th><th class=\"l\">backing</th><th class=\"l\">guest page</th><th class=\"l\">A/D</th><th class=\"l\">workload</th>");
    for c in cols {
        let _ = write!(h, "<th>{c}</th>");
    }
    let _ = writeln!(h, "<th>wall ms</th><th>fault mean ns</th><th>fault p99 ≤ ns</th></tr>");
    for r in results {
        let c = &r.config;
        let _ = write!(
            h,
            "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td>",
            esc(&c.id()),
            esc(&c.mmu),
            esc(&c.backing),
            esc(&c.guest_page),
            esc(c.ad_means()),
            esc(&c.workload)
        );
        match &r.run {
            Err(e) => {
                let _ = write!(h, "<td class=\"l err\" colspan=\"{}\">failed: {}</td>", cols.len() + 3, esc(e));
            }
            Ok(_) => {
                let t = r.totals();
                for k in cols {
                    let _ = write!(h, "<td>{}</td>", t.get(k).copied().unwrap_or(0));
                }
                let [_, _, mean, _, p99, _] = latency_summary(&r.fault_latency());
                let _ = write!(h, "<td>{:.2}</td><td>{mean}</td><td>{p99}</td>", r.wall_ns() as f64 / 1e6);
            }
        }
        let _ = writeln!(h, "</tr>");
    }
    let _ = writeln!(
        h,
        "</table>\n<p>Data: <a href=\"results.csv\">results.csv</a>, <a href=\"results.jsonl\">results.jsonl</a>.</p></body></html>"
    );
    h
}

/// The files written into the output directory.
pub const FILES: &[&str] =
    &["results.jsonl", "results.csv", "faults.svg", "exits.svg", "time.svg", "fault-latency.svg", "index.html"];

/// Writes results.jsonl, results.csv, the plots and index.html into `dir` (created).
pub fn write_outputs(dir: &Path, results: &[CellResult], info: &SweepInfo) -> Result<(), SweepError> {
    let io = |path: PathBuf| move |source| SweepError::Io { path, source };
    std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(io(p))
    };
    let mut jsonl = String::new();
    for r in results {
        jsonl.push_str(&json(r).to_string());
        jsonl.push('\n');
    }
    write("results.jsonl", &jsonl)?;
    write("results.csv", &csv(results))?;
    let plots = plots(results);
    for (name, svg) in &plots {
        write(name, svg)?;
    }
    write("index.html", &html(results, info, &plots))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_grid_and_cells() {
        let g = Grid::default();
        g.validate().unwrap();
        let cells = g.cells();
        assert_eq!(cells.len(), 96);
        assert_eq!(cells[0].id(), "tdp/4k/4k/ad-on/first-touch");
        for c in &cells {
            c.scenario().validate().unwrap();
            assert!(c.memslot_size() >= 16 * MIB + c.pages * 4096);
        }
        let shadow_off = cells.iter().find(|c| c.mmu == "shadow" && !c.ad).unwrap().scenario();
        assert_eq!(shadow_off.guest.accessed_dirty, "clear");
        let tdp_off = cells.iter().find(|c| c.mmu == "tdp" && !c.ad).unwrap().scenario();
        assert!(!tdp_off.vm.eptad);
    }

    #[test]
    fn grid_files() {
        let g = Grid::parse("mmu = [\"shadow\"]\nad = [\"off\", true]\npages = 8\n").unwrap();
        assert_eq!((g.mmu.len(), g.ad.clone(), g.pages, g.workload.len()), (1, vec![false, true], 8, 4));
        assert!(Grid::parse("mmu = [\"ept\"]").unwrap_err().to_string().contains("mmu"));
        assert!(Grid::parse("colour = [\"red\"]").is_err());
        assert!(Grid::parse("ad = [\"maybe\"]").is_err());
    }

    #[test]
    fn bucket_labels() {
        assert_eq!(human_ns(512), "512 ns");
        assert_eq!(human_ns(1024), "1.02 µs");
        assert_eq!(human_ns(65536), "65.5 µs");
        assert_eq!(human_ns(1 << 20), "1.05 ms");
    }

    #[test]
    fn csv_quotes() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("x"), "x");
    }
}
