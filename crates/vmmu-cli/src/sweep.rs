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
//!
//! This module has the grid, the cells and their runs; the submodule `output` writes the
//! results (CSV, JSON Lines, the plots and the HTML report), re-exported here.

use crate::error::RunError;
use crate::machine::GAUGES;
use crate::runner::{self, RunOptions, RunResult};
use crate::scenario::{GuestSection, MemslotSection, Scenario, Size, VmSection};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;
use vmmu::stats::LatencyHistogram;

mod output;
pub use output::{
    csv, csv_header, csv_row, html, json, latency_by_mmu, latency_range, plots, write_outputs, SweepInfo,
    CONFIG_COLUMNS, FILES, LATENCY_COLUMNS, PHASES, PHASE_COLUMNS, PLOTS, TOTAL_COLUMNS,
};

/// A sweep failure that stops the whole sweep (a failed cell does not: it is recorded). A
/// variant that wraps an underlying error carries it as its source and, as the crate's errors
/// do ([`crate::error`]), includes its text in the message: print with `{}`, not by walking
/// the chain.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The grid is invalid.
    #[error("{0}")]
    Grid(String),
    /// The grid file is not TOML of the grid's shape.
    #[error("{at}: {problem}")]
    Toml {
        /// Where: `line L, column C` (or `file`).
        at: String,
        /// The parser's message, on one line ([`crate::scenario::toml_error`]).
        problem: String,
        /// The parser's error.
        source: Box<toml::de::Error>,
    },
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
            SweepError::Toml { at, problem, source: Box::new(e) }
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

/// Why a cell has no results (recorded in its row; the sweep goes on).
#[derive(Debug, thiserror::Error)]
pub enum CellError {
    /// The cell's generated scenario does not validate (a bug in [`CellConfig::scenario`]).
    #[error("generated scenario: {0}")]
    Scenario(#[source] crate::scenario::ScenarioError),
    /// The run refused the cell or failed.
    #[error("{0}")]
    Run(#[source] RunError),
    /// The model panicked; the panic's message.
    #[error("panicked: {0}")]
    Panicked(String),
    /// The thread running the cell panicked outside the cell's run.
    #[error("cell thread panicked")]
    ThreadPanicked,
}

/// One cell's outcome.
#[derive(Debug)]
pub struct CellResult {
    /// Its configuration.
    pub config: CellConfig,
    /// The run, or why it failed.
    pub run: Result<RunResult, CellError>,
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
    let slots: Mutex<Vec<Option<CellResult>>> = Mutex::new(cells.iter().map(|_| None).collect());
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
            r.unwrap_or_else(|| CellResult { config: c.clone(), run: Err(CellError::ThreadPanicked), cell_wall_ns: 0 })
        })
        .collect()
}

/// Runs one cell (a panic in the model is caught and recorded as the cell's failure).
pub fn run_cell(c: &CellConfig) -> CellResult {
    let t0 = Instant::now();
    let s = c.scenario();
    let run = match s.validate() {
        Err(e) => Err(CellError::Scenario(e)),
        Ok(()) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            runner::run(&s, &c.run_options(), |_, _| {}).map_err(CellError::Run)
        }))
        .unwrap_or_else(|p| {
            Err(CellError::Panicked(
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default(),
            ))
        }),
    };
    CellResult { config: c.clone(), run, cell_wall_ns: crate::clock::elapsed_ns(t0) }
}

#[cfg(test)]
mod tests;
