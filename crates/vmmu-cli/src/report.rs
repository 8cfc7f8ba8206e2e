//! Reports: a readable table, or one JSON object (`--json`, the contract in DESIGN §5).

use crate::runner::RunResult;
use std::fmt::Write as _;

/// The statistics the table always shows, in this order.
const COLUMNS: &[&str] = &[
    "pf_taken",
    "pf_fixed",
    "pf_fast",
    "pf_spurious",
    "pf_emulate",
    "pf_mmio_spte_created",
    "exits",
    "mmio_exits",
    "tlb_flush",
    "remote_tlb_flush",
    "pages_4k",
    "pages_2m",
    "pages_1g",
    "tdp_mmu_pages",
];

fn human_ns(ns: u64) -> String {
    match ns {
        0..=9_999 => format!("{ns} ns"),
        10_000..=9_999_999 => format!("{:.1} us", ns as f64 / 1e3),
        10_000_000..=9_999_999_999 => format!("{:.1} ms", ns as f64 / 1e6),
        _ => format!("{:.2} s", ns as f64 / 1e9),
    }
}

/// The readable report.
pub fn text(r: &RunResult, description: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "vmmu run: scenario \"{}\", mmu {}", r.scenario, r.mmu);
    if !description.is_empty() {
        for line in textwrap(description, 92) {
            let _ = writeln!(out, "  {line}");
        }
    }
    let _ = writeln!(out);
    let mut header = format!("{:<12} {:>10} {:>10}", "phase", "wall", "accesses");
    for c in COLUMNS {
        let _ = write!(header, " {:>w$}", c, w = c.len().max(6));
    }
    let _ = writeln!(out, "{header}");
    for p in &r.phases {
        let mut line = format!("{:<12} {:>10} {:>10}", p.name, human_ns(p.wall_ns), p.accesses);
        for c in COLUMNS {
            let _ = write!(line, " {:>w$}", p.stats.get(*c).copied().unwrap_or(0), w = c.len().max(6));
        }
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out);
    for p in &r.phases {
        let taken = p.stats.get("pf_taken").copied().unwrap_or(0);
        let mut extras: Vec<String> = p
            .stats
            .iter()
            .filter(|(k, v)| **v != 0 && !COLUMNS.contains(&k.as_str()))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if let Some(taken) = u64::try_from(taken).ok().filter(|&t| t > 0) {
            extras.push(format!("wall per fault {}", human_ns(p.wall_ns / taken)));
        }
        if let Some(n) = p.dirty_pages_harvested {
            extras.push(format!("dirty pages harvested {n}"));
        }
        if p.accesses > 0 {
            extras.push(format!("{:.1} M accesses/s", p.accesses as f64 * 1e3 / p.wall_ns.max(1) as f64));
        }
        extras.push(format!("tlb hits {} misses {} walk refs {}", p.hw.tlb_hits, p.hw.tlb_misses, p.hw.walk_mem_refs));
        let _ = writeln!(out, "{:<12} {}", p.name, extras.join(", "));
    }
    for mig in &r.migrations {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "live migration (pre-copy, dirty logging by {}) of memslot {}, {} pages:",
            mig.mode, mig.slot, mig.slot_pages
        );
        let _ = writeln!(
            out,
            "{:>5} {:>10} {:>10} {:>9} {:>9} {:>10} {:>10} {:>10}  note",
            "round", "guest", "accesses", "pf_taken", "pf_fast", "dirty", "harvest", "copy"
        );
        for rd in &mig.rounds {
            let note = match (rd.round, rd.stop_and_copy) {
                (0, _) => "logging on (harvest = enabling), full copy",
                (_, true) => "stop-and-copy (guest paused)",
                _ => "",
            };
            let _ = writeln!(
                out,
                "{:>5} {:>10} {:>10} {:>9} {:>9} {:>10} {:>10} {:>10}  {note}",
                rd.round,
                human_ns(rd.guest_ns),
                rd.guest_accesses,
                rd.pf_taken,
                rd.pf_fast,
                rd.dirty_pages,
                human_ns(rd.harvest_ns),
                human_ns(rd.copy_ns)
            );
        }
        let _ = writeln!(
            out,
            "copied {} pages ({} MiB) in all; estimated downtime {} (last harvest + copy); the copy matches guest memory",
            mig.copied_pages,
            (mig.copied_pages * 4096) >> 20,
            human_ns(mig.downtime_ns)
        );
        let _ = writeln!(
            out,
            "destination holds {} pages with data ({} KiB; the other {} pages of the slot are zero)",
            mig.dest_pages,
            mig.dest_bytes >> 10,
            mig.slot_pages - mig.dest_pages
        );
    }
    if !r.dirty_log.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "dirty log harvests:");
        let _ = writeln!(out, "{:<12} {:>5} {:>12} {:>10}  how", "phase", "slot", "dirty pages", "time");
        for h in &r.dirty_log {
            let _ = writeln!(
                out,
                "{:<12} {:>5} {:>12} {:>10}  {}",
                h.phase,
                h.slot,
                h.dirty_pages,
                human_ns(h.harvest_ns),
                if h.cleared { "KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG" } else { "KVM_GET_DIRTY_LOG" }
            );
        }
    }
    for idle in &r.idle_tracking {
        let _ = writeln!(out);
        let _ = writeln!(out, "idle page tracking over memslot {}, {} pages:", idle.slot, idle.slot_pages);
        let _ = writeln!(
            out,
            "{:>4} {:>10} {:>10} {:>10} {:>9} {:>9} {:>8} {:>10}",
            "pass", "mark", "guest", "accesses", "pf_taken", "pf_fast", "young", "read"
        );
        for p in &idle.passes {
            let _ = writeln!(
                out,
                "{:>4} {:>10} {:>10} {:>10} {:>9} {:>9} {:>8} {:>10}{}",
                p.pass,
                human_ns(p.mark_ns),
                human_ns(p.guest_ns),
                p.guest_accesses,
                p.pf_taken,
                p.pf_fast,
                p.young_pages,
                human_ns(p.read_ns),
                if p.pass == 0 { "  baseline (not marked)" } else { "" }
            );
        }
        let base = idle.passes[0].guest_ns.max(1) as f64;
        let _ = writeln!(
            out,
            "guest slowdown per marking pass: {}{} ({:+.1} % of the baseline pass)",
            if idle.slowdown_ns < 0 { "-" } else { "+" },
            human_ns(idle.slowdown_ns.unsigned_abs()),
            idle.slowdown_ns as f64 * 100.0 / base
        );
    }
    if !r.replays.is_empty() {
        let _ = writeln!(out);
        out.push_str(&crate::replay::text(&r.replays));
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "host: {} 4 KiB frames + {} 2 MiB frames in use, {} host page-table pages, MMU tables {} KiB",
        r.host.frames_4k,
        r.host.frames_2m,
        r.host.host_pt_pages,
        r.host.mmu_table_bytes / 1024
    );
    out
}

fn textwrap(s: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for w in s.split_whitespace() {
        if !cur.is_empty() && cur.len() + 1 + w.len() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(w);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

/// The `--json` object.
pub fn json(r: &RunResult) -> String {
    serde_json::to_string_pretty(r).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// The `--json` output of a comparison: `{"scenario", "runs": [run objects]}`.
pub fn json_compare(runs: &[RunResult]) -> String {
    let v = serde_json::json!({ "scenario": runs.first().map(|r| r.scenario.clone()), "runs": runs });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// A side-by-side table of the MMUs of a comparison: per phase, the main counters and the
/// wall time of each.
pub fn side_by_side(runs: &[RunResult]) -> String {
    let mut out = String::new();
    let names: Vec<&str> = runs.iter().map(|r| r.mmu.as_str()).collect();
    let _ = writeln!(out, "side by side: {}", names.join(" vs "));
    let _ = writeln!(
        out,
        "(wall includes the host kernel populating the VM's memory on first touch, which the first run \
         pays most; the counters are deterministic)"
    );
    let cols = ["pf_taken", "pf_fixed", "pf_emulate", "pf_guest", "exits", "tlb_flush", "mmu_cache_miss", "mmu_unsync"];
    let mw = runs.iter().map(|r| r.mmu.len()).max().unwrap_or(0).max(10);
    let mut h = format!("{:<12} {:>mw$}", "phase", "mmu");
    for c in ["wall"].iter().chain(cols.iter()) {
        let _ = write!(h, " {:>w$}", c, w = c.len().max(9));
    }
    let _ = writeln!(out, "{h}");
    let n = runs.iter().map(|r| r.phases.len()).max().unwrap_or(0);
    for i in 0..n {
        for r in runs {
            let Some(p) = r.phases.get(i) else { continue };
            let mut line = format!("{:<12} {:>mw$} {:>9}", p.name, r.mmu, human_ns(p.wall_ns));
            for c in cols {
                let _ = write!(line, " {:>w$}", p.stats.get(c).copied().unwrap_or(0), w = c.len().max(9));
            }
            let _ = writeln!(out, "{line}");
        }
    }
    out
}
