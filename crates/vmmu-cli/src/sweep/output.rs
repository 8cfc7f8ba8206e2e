//! The sweep's outputs: results.jsonl and results.csv (a row per cell), the SVG plots and
//! index.html, from the cells' results.

use super::{onoff, CellResult, Grid, SweepError};
use crate::chart::{BarChart, Unit};
use crate::svg::escape as esc;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use vmmu::stats::{LatencyHistogram, LATENCY_BUCKETS};

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

pub(super) fn csv_field(s: &str) -> String {
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
        Err(e) => ("error", e.to_string()),
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
            "cell": c.id(), "config": config, "status": "error", "error": e.to_string(), "cell_wall_ns": r.cell_wall_ns,
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
pub(super) fn human_ns(ns: u64) -> String {
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
                let _ = write!(
                    h,
                    "<td class=\"l err\" colspan=\"{}\">failed: {}</td>",
                    cols.len() + 3,
                    esc(&e.to_string())
                );
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
