//! `vmmu compare --trace events`: vmmu's tracepoints and the real KVM's, per phase, aligned.
//!
//! Both streams are parsed into [`TraceEvent`]s ([`vmmu_kvm::tracefs::parse_trace`]: vmmu
//! renders its events in the kernel's `trace` layout and print formats). Only the `kvmmmu`
//! events are aligned (vmmu emits no `kvm` subsystem events); the others are counted.
//!
//! # Normalisation
//!
//! Fields that cannot match between a model and a kernel are dropped: host pfns
//! (`kvm_mmu_spte_requested pfn`), SPTE values (they hold the host pfn: `kvm_mmu_set_spte`
//! keeps its `(rwxu)` summary), SPTE pointers (`at`, `sptep`), `old`/`new` SPTEs of
//! `fast_page_fault`, MMIO generations, timestamps. Guest page-table pages are at different
//! guest-physical addresses on the two sides (docs/compare.md (e)), so every gfn that is a
//! guest page table (the gfn of an indirect shadow page, or the target of a non-leaf guest
//! entry) is renamed `PT#n`, numbered per side in order of first appearance: the same walk on
//! both sides then prints the same. gfns of data pages, gvas, levels, roles, access bits,
//! error codes and guest PTE flags are kept.
//!
//! # Artifacts
//!
//! KVM-side walks of the real-KVM guest's own system area (below [`vmmu_kvm::DATA_GPA`]:
//! its code, TSS, stacks, IDT) that create no shadow page and no SPTE are the instruction
//! emulator's (or KVM_TRANSLATE's) `gva_to_gpa`, not shadow page faults: on PVM the phase-end
//! `out` and the ring-0 `int3` handlers are emulated, and the emulator fetches the
//! instruction and reads the TSS I/O bitmap through the guest's page tables. They are shown
//! (marked `~`) but never count as a divergence, and the count table shows KVM's counts with
//! and without them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

use serde::Serialize;
use vmmu_kvm::tracefs::TraceEvent;

/// Most aligned rows kept per phase in the JSON (the count table and the first divergence
/// are always complete).
pub const MAX_JSON_ROWS: usize = 20_000;

/// Rows of context the text report prints before the first divergence.
pub const CONTEXT_BEFORE: usize = 8;
/// Rows the text report prints from the first divergence on.
pub const CONTEXT_AFTER: usize = 16;

/// The subsystem whose events are aligned.
fn aligned_event(name: &str) -> bool {
    // kvmmmu event names (the kvm subsystem's are kvm_exit, kvm_page_fault, ...).
    matches!(
        name,
        "kvm_mmu_pagetable_walk"
            | "kvm_mmu_paging_element"
            | "kvm_mmu_set_accessed_bit"
            | "kvm_mmu_set_dirty_bit"
            | "kvm_mmu_walker_error"
            | "kvm_mmu_get_page"
            | "kvm_mmu_sync_page"
            | "kvm_mmu_unsync_page"
            | "kvm_mmu_prepare_zap_page"
            | "mark_mmio_spte"
            | "handle_mmio_page_fault"
            | "fast_page_fault"
            | "kvm_mmu_zap_all_fast"
            | "check_mmio_spte"
            | "kvm_mmu_set_spte"
            | "kvm_mmu_spte_requested"
            | "kvm_tdp_mmu_spte_changed"
            | "kvm_mmu_split_huge_page"
    )
}

const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// The value after `key` in a whitespace-separated field list.
fn field<'a>(fields: &'a str, key: &str) -> Option<&'a str> {
    let mut it = fields.split_whitespace();
    while let Some(t) = it.next() {
        if t == key {
            return it.next();
        }
    }
    None
}

/// Renames guest page-table gfns `PT#n` (per side, in order of first appearance).
#[derive(Debug, Default)]
pub struct Labels {
    tables: HashSet<u64>,
    names: HashMap<u64, usize>,
}

impl Labels {
    /// Learns the guest page-table gfns of a whole stream (shadow pages' gfns, non-leaf
    /// guest entries' targets).
    pub fn learn(events: &[TraceEvent]) -> Self {
        let mut tables = HashSet::new();
        for e in events {
            match e.name.as_str() {
                "kvm_mmu_get_page" | "kvm_mmu_sync_page" | "kvm_mmu_unsync_page" | "kvm_mmu_prepare_zap_page"
                    if !e.fields.contains(" direct") =>
                {
                    if let Some(g) = field(&e.fields, "gfn").and_then(hex) {
                        tables.insert(g);
                    }
                }
                "kvm_mmu_paging_element" => {
                    let pte = field(&e.fields, "pte").and_then(hex);
                    let level: Option<u32> = field(&e.fields, "level").and_then(|l| l.parse().ok());
                    if let (Some(pte), Some(level)) = (pte, level) {
                        let large = (level == 2 || level == 3) && pte & 0x80 != 0;
                        if level > 1 && !large {
                            tables.insert((pte & PTE_ADDR) >> 12);
                        }
                    }
                }
                _ => {}
            }
        }
        Labels { tables, names: HashMap::new() }
    }

    fn name(&mut self, gfn: u64) -> Option<String> {
        if !self.tables.contains(&gfn) {
            return None;
        }
        let n = self.names.len();
        let i = *self.names.entry(gfn).or_insert(n);
        Some(format!("PT#{i}"))
    }

    fn gfn(&mut self, v: &str) -> String {
        match hex(v).and_then(|g| self.name(g)) {
            Some(l) => l,
            None => v.to_string(),
        }
    }

    fn addr(&mut self, v: &str) -> String {
        match hex(v).and_then(|a| self.name(a >> 12).map(|l| (l, a & 0xfff))) {
            Some((l, 0)) => l,
            Some((l, off)) => format!("{l}+{off:x}"),
            None => v.to_string(),
        }
    }

    fn pte(&mut self, v: &str) -> String {
        match hex(v).and_then(|p| self.name((p & PTE_ADDR) >> 12).map(|l| (l, p & !PTE_ADDR))) {
            Some((l, flags)) => format!("{l}|{flags:x}"),
            None => v.to_string(),
        }
    }

    /// The event with machine-specific fields dropped and table gfns renamed.
    pub fn normalise(&mut self, e: &TraceEvent) -> String {
        let mut out: Vec<String> = Vec::new();
        let mut toks = e.fields.split_whitespace().peekable();
        while let Some(t) = toks.next() {
            match t {
                // Host-side values: pfns, SPTEs and their addresses, MMIO generations.
                "pfn" | "spte" | "at" | "sptep" | "old" | "new" | "old_spte" | "new_spte" | "kvm_gen" | "spte-gen"
                | "used_pages" | "gen" | "errno"
                    if e.name != "kvm_mmu_get_page"
                        && e.name != "kvm_mmu_sync_page"
                        && e.name != "kvm_mmu_unsync_page"
                        && e.name != "kvm_mmu_prepare_zap_page"
                        && !(t == "new" && toks.peek().is_none()) =>
                {
                    toks.next();
                }
                _ if t.starts_with("sptep:") => {}
                "gfn" => {
                    out.push(t.into());
                    if let Some(v) = toks.next() {
                        out.push(self.gfn(v));
                    }
                }
                "addr" | "gpa" | "gva" => {
                    out.push(t.into());
                    if let Some(v) = toks.next() {
                        out.push(self.addr(v));
                    }
                }
                "pte" => {
                    out.push(t.into());
                    if let Some(v) = toks.next() {
                        out.push(self.pte(v));
                    }
                }
                _ => out.push(t.into()),
            }
        }
        format!("{}: {}", e.name, out.join(" "))
    }
}

/// Marks the KVM-side artifacts: walk groups (a `kvm_mmu_pagetable_walk` with the
/// paging-element, accessed and dirty events after it) of addresses below `system_end` that
/// are followed by no fault outcome (SPTE requested or set, walker error, ...) before the next
/// walk.
pub fn artifacts(events: &[TraceEvent], system_end: u64) -> Vec<bool> {
    let mut out = vec![false; events.len()];
    let mut i = 0;
    while i < events.len() {
        if events[i].name != "kvm_mmu_pagetable_walk" {
            i += 1;
            continue;
        }
        let addr = field(&events[i].fields, "addr").and_then(hex).unwrap_or(u64::MAX);
        let mut j = i + 1;
        while j < events.len()
            && matches!(
                events[j].name.as_str(),
                "kvm_mmu_paging_element" | "kvm_mmu_set_accessed_bit" | "kvm_mmu_set_dirty_bit"
            )
        {
            j += 1;
        }
        // A shadow page fault's walk is followed, before the next walk, by the fault's outcome:
        // an SPTE requested or set, a walker error, a fast-path or MMIO event, an unsync. A root
        // allocation alone (`kvm_mmu_get_page` after an emulated `mov cr3`) is not one.
        let next_walk =
            events[j..].iter().position(|e| e.name == "kvm_mmu_pagetable_walk").map_or(events.len(), |p| j + p);
        let followed_by_fault_work = events[j..next_walk].iter().any(|e| {
            matches!(
                e.name.as_str(),
                "kvm_mmu_spte_requested"
                    | "kvm_mmu_set_spte"
                    | "kvm_mmu_walker_error"
                    | "fast_page_fault"
                    | "mark_mmio_spte"
                    | "handle_mmio_page_fault"
                    | "kvm_mmu_unsync_page"
            )
        });
        if addr < system_end && !followed_by_fault_work {
            out[i..j].iter_mut().for_each(|x| *x = true);
        }
        i = j;
    }
    out
}

/// One row of the aligned streams.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Row {
    /// vmmu's event (normalised), if this row has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmmu: Option<String>,
    /// KVM's event (normalised), if this row has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kvm: Option<String>,
    /// `=` the same on both sides, `!` both sides have an event here and they differ, `<`
    /// vmmu only, `>` KVM only, `~` a KVM-side artifact (see the module docs).
    pub mark: char,
}

/// Aligns two normalised streams with a shortest-edit-script diff (Myers), pairing the
/// deletions and insertions of one hunk side by side. Falls back to pairing by position when
/// the streams differ in more than `max_edits` places.
pub fn align(a: &[String], b: &[String], max_edits: usize) -> Vec<Row> {
    let ops = myers(a, b, max_edits).unwrap_or_else(|| {
        let n = a.len().max(b.len());
        (0..n)
            .map(|i| match (i < a.len(), i < b.len()) {
                (true, true) if a[i] == b[i] => Edit::Same(i, i),
                (true, true) => Edit::Change(i, i),
                (true, false) => Edit::Del(i),
                _ => Edit::Ins(i),
            })
            .collect()
    });
    // Pair the deletions and insertions between two matches.
    let mut rows = Vec::new();
    let mut dels: Vec<usize> = Vec::new();
    let mut ins: Vec<usize> = Vec::new();
    let flush = |rows: &mut Vec<Row>, dels: &mut Vec<usize>, ins: &mut Vec<usize>| {
        let n = dels.len().max(ins.len());
        for k in 0..n {
            let (v, w) = (dels.get(k).map(|&i| a[i].clone()), ins.get(k).map(|&j| b[j].clone()));
            let mark = match (&v, &w) {
                (Some(_), Some(_)) => '!',
                (Some(_), None) => '<',
                _ => '>',
            };
            rows.push(Row { vmmu: v, kvm: w, mark });
        }
        dels.clear();
        ins.clear();
    };
    for op in ops {
        match op {
            Edit::Same(i, j) => {
                flush(&mut rows, &mut dels, &mut ins);
                rows.push(Row { vmmu: Some(a[i].clone()), kvm: Some(b[j].clone()), mark: '=' });
            }
            Edit::Change(i, j) => {
                flush(&mut rows, &mut dels, &mut ins);
                rows.push(Row { vmmu: Some(a[i].clone()), kvm: Some(b[j].clone()), mark: '!' });
            }
            Edit::Del(i) => dels.push(i),
            Edit::Ins(j) => ins.push(j),
        }
    }
    flush(&mut rows, &mut dels, &mut ins);
    rows
}

#[derive(Debug, Clone, Copy)]
enum Edit {
    Same(usize, usize),
    Change(usize, usize),
    Del(usize),
    Ins(usize),
}

/// An index of the edit graph as a slice index. Myers' algorithm works on signed diagonals
/// (`k = x - y` may be negative), but every index it takes into a slice (`off + k` with
/// `|k| < off`, and `x`, `y`, `d` themselves) is non-negative by construction.
// Never negative (see above): the cast loses nothing.
#[allow(clippy::cast_sign_loss)]
fn ix(i: isize) -> usize {
    debug_assert!(i >= 0, "negative edit-graph index {i}");
    i as usize
}

/// Myers' O((N+M)D) shortest edit script; None when D > `max_edits`.
fn myers(a: &[String], b: &[String], max_edits: usize) -> Option<Vec<Edit>> {
    let (n, m) = (a.len() as isize, b.len() as isize);
    let limit = (a.len() + b.len()).min(max_edits);
    let off = limit as isize + 1;
    let mut v = vec![0isize; 2 * limit + 3];
    let mut trace: Vec<Vec<isize>> = Vec::new();
    let mut found = None;
    for d in 0..=limit as isize {
        // Keep only the diagonals -d..=d of this round.
        trace.push(v[ix(off - d)..=ix(off + d)].to_vec());
        let mut k = -d;
        while k <= d {
            let down = k == -d || (k != d && v[ix(off + k - 1)] < v[ix(off + k + 1)]);
            let mut x = if down { v[ix(off + k + 1)] } else { v[ix(off + k - 1)] + 1 };
            let mut y = x - k;
            while x < n && y < m && a[ix(x)] == b[ix(y)] {
                x += 1;
                y += 1;
            }
            v[ix(off + k)] = x;
            if x >= n && y >= m {
                found = Some(d);
                break;
            }
            k += 2;
        }
        if found.is_some() {
            break;
        }
    }
    let dmax = found?;
    // Backtrack: trace[d] holds V before round d, on diagonals -d..=d.
    let mut edits = Vec::new();
    let (mut x, mut y) = (n, m);
    for d in (1..=dmax).rev() {
        let vd = &trace[ix(d)];
        let get = |k: isize| vd[ix(k + d)];
        let k = x - y;
        let down = k == -d || (k != d && get(k - 1) < get(k + 1));
        let pk = if down { k + 1 } else { k - 1 };
        let px = get(pk);
        let py = px - pk;
        while x > px && y > py {
            x -= 1;
            y -= 1;
            edits.push(Edit::Same(ix(x), ix(y)));
        }
        if down {
            y -= 1;
            edits.push(Edit::Ins(ix(y)));
        } else {
            x -= 1;
            edits.push(Edit::Del(ix(x)));
        }
        debug_assert_eq!((x, y), (px, py));
    }
    while x > 0 && y > 0 {
        x -= 1;
        y -= 1;
        edits.push(Edit::Same(ix(x), ix(y)));
    }
    edits.reverse();
    Some(edits)
}

/// Counts of one event name in one phase.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EventCount {
    /// Event name.
    pub name: String,
    /// vmmu's count.
    pub vmmu: usize,
    /// KVM's count (everything the capture saw).
    pub kvm: usize,
    /// KVM's count without the artifacts (emulator / KVM_TRANSLATE walks).
    pub kvm_without_artifacts: usize,
}

/// The first row where the two sides differ (artifacts aside).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Divergence {
    /// Row index in [`PhaseTrace::rows`].
    pub row: usize,
    /// vmmu's event there (None: KVM has an event vmmu lacks).
    pub vmmu: Option<String>,
    /// KVM's event there (None: vmmu has an event KVM lacks).
    pub kvm: Option<String>,
}

/// One phase's event streams side by side.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseTrace {
    /// Phase name.
    pub name: String,
    /// Whether both sides ran the phase (else one column is empty and nothing diverges).
    pub compared: bool,
    /// vmmu's aligned events in the phase.
    pub vmmu_events: usize,
    /// KVM's aligned (kvmmmu) events in the phase, artifacts included.
    pub kvm_events: usize,
    /// Of those, artifacts.
    pub kvm_artifacts: usize,
    /// Rows on which both sides have the same event.
    pub same: usize,
    /// The first divergence, if any.
    pub first_divergence: Option<Divergence>,
    /// Per event name (every event either side emitted in the phase, kvm subsystem included).
    pub counts: Vec<EventCount>,
    /// The aligned rows (at most [`MAX_JSON_ROWS`]).
    pub rows: Vec<Row>,
    /// Whether `rows` was cut at [`MAX_JSON_ROWS`].
    pub rows_truncated: bool,
}

/// The whole trace comparison (`--json`: `trace`).
#[derive(Debug, Clone, Serialize)]
pub struct TraceComparison {
    /// How KVM's events were captured (tracefs instance, PID filter, events).
    pub kvm_capture: String,
    /// Events KVM's ring buffer dropped (0 for a complete capture).
    pub kvm_lost: u64,
    /// Requested KVM events this kernel does not have.
    pub kvm_missing_events: Vec<String>,
    /// KVM events before the first KVM_RUN (VM creation), not compared.
    pub kvm_setup_events: usize,
    /// KVM events after the last phase (the backend's KVM_TRANSLATE oracle, VM teardown), not
    /// compared.
    pub kvm_after_events: usize,
    /// vmmu events before its first phase (building the machine), not compared.
    pub vmmu_setup_events: usize,
    /// Phases in order.
    pub phases: Vec<PhaseTrace>,
}

/// Compares one phase. `vmmu`/`kvm` are None when that side did not run the phase.
pub fn compare_phase(
    name: &str,
    vmmu: Option<&[TraceEvent]>,
    kvm: Option<&[TraceEvent]>,
    vlabels: &mut Labels,
    klabels: &mut Labels,
    system_end: u64,
) -> PhaseTrace {
    let compared = vmmu.is_some() && kvm.is_some();
    let v: Vec<&TraceEvent> = vmmu.unwrap_or(&[]).iter().filter(|e| aligned_event(&e.name)).collect();
    let kall: &[TraceEvent] = kvm.unwrap_or(&[]);
    let kart_all = artifacts(kall, system_end);
    let mut counts: BTreeMap<String, EventCount> = BTreeMap::new();
    for e in vmmu.unwrap_or(&[]) {
        counts
            .entry(e.name.clone())
            .or_insert_with(|| EventCount { name: e.name.clone(), vmmu: 0, kvm: 0, kvm_without_artifacts: 0 })
            .vmmu += 1;
    }
    for (e, art) in kall.iter().zip(&kart_all) {
        let c = counts.entry(e.name.clone()).or_insert_with(|| EventCount {
            name: e.name.clone(),
            vmmu: 0,
            kvm: 0,
            kvm_without_artifacts: 0,
        });
        c.kvm += 1;
        if !art {
            c.kvm_without_artifacts += 1;
        }
    }
    let vn: Vec<String> = v.iter().map(|e| vlabels.normalise(e)).collect();
    // KVM's aligned events, with the artifacts set aside and merged back in KVM order.
    let mut kn: Vec<String> = Vec::new();
    let mut kart: Vec<(usize, String)> = Vec::new(); // (index of the next non-artifact, text)
    let mut kvm_events = 0;
    for (e, art) in kall.iter().zip(&kart_all) {
        if !aligned_event(&e.name) {
            continue;
        }
        kvm_events += 1;
        let t = klabels.normalise(e);
        if *art {
            kart.push((kn.len(), t));
        } else {
            kn.push(t);
        }
    }
    let kvm_artifacts = kart.len();
    let core = align(&vn, &kn, 2000);
    let mut rows = Vec::with_capacity(core.len() + kart.len());
    let mut next_k = 0usize;
    let mut art = kart.into_iter().peekable();
    for r in core {
        if r.kvm.is_some() {
            while let Some((_, t)) = art.next_if(|(at, _)| *at <= next_k) {
                rows.push(Row { vmmu: None, kvm: Some(t), mark: '~' });
            }
            next_k += 1;
        }
        rows.push(r);
    }
    rows.extend(art.map(|(_, t)| Row { vmmu: None, kvm: Some(t), mark: '~' }));
    let same = rows.iter().filter(|r| r.mark == '=').count();
    let first_divergence = if compared {
        rows.iter().position(|r| matches!(r.mark, '!' | '<' | '>')).map(|i| Divergence {
            row: i,
            vmmu: rows[i].vmmu.clone(),
            kvm: rows[i].kvm.clone(),
        })
    } else {
        None
    };
    let rows_truncated = rows.len() > MAX_JSON_ROWS;
    rows.truncate(MAX_JSON_ROWS);
    PhaseTrace {
        name: name.to_string(),
        compared,
        vmmu_events: vn.len(),
        kvm_events,
        kvm_artifacts,
        same,
        first_divergence,
        counts: counts.into_values().collect(),
        rows,
        rows_truncated,
    }
}

/// The text report of the event streams: per phase a summary, the rows around the first
/// divergence (`>>> first divergence` before it) side by side, and the count table.
pub fn text(t: &TraceComparison) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\ntrace events: KVM captured from {}", t.kvm_capture);
    if t.kvm_lost > 0 {
        let _ =
            writeln!(out, "WARNING: KVM's trace buffer dropped {} events; the KVM column is incomplete", t.kvm_lost);
    }
    if !t.kvm_missing_events.is_empty() {
        let _ = writeln!(out, "note: this kernel has no {}", t.kvm_missing_events.join(", "));
    }
    let _ = writeln!(
        out,
        "not compared: vmmu {} set-up events, KVM {} set-up and {} after the last phase (KVM_TRANSLATE oracle, teardown)",
        t.vmmu_setup_events, t.kvm_setup_events, t.kvm_after_events
    );
    let _ = writeln!(
        out,
        "rows: '=' same, '!' differ, '<' vmmu only, '>' KVM only, '~' KVM emulator/KVM_TRANSLATE walk (not a divergence)"
    );
    let w = t
        .phases
        .iter()
        .flat_map(|p| p.rows.iter().take(64))
        .filter_map(|r| r.vmmu.as_ref().map(String::len))
        .max()
        .unwrap_or(40)
        .clamp(40, 80);
    for p in &t.phases {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "phase \"{}\" events: vmmu {}, KVM {} ({} artifacts), {} rows the same{}",
            p.name,
            p.vmmu_events,
            p.kvm_events,
            p.kvm_artifacts,
            p.same,
            if p.compared { "" } else { "  (one side only: not compared)" }
        );
        let (from, to) = match &p.first_divergence {
            Some(d) => (d.row.saturating_sub(CONTEXT_BEFORE), d.row + CONTEXT_AFTER),
            None => (0, CONTEXT_BEFORE.min(4)),
        };
        let _ = writeln!(out, "  {:<3} {:<w$} | KVM", "", "vmmu");
        if from > 0 {
            let _ = writeln!(out, "  ... {from} rows");
        }
        for (i, r) in p.rows.iter().enumerate().skip(from).take(to - from) {
            if p.first_divergence.as_ref().is_some_and(|d| d.row == i) {
                let _ = writeln!(out, "  >>> first divergence");
            }
            let _ = writeln!(
                out,
                "  {:<3} {:<w$} | {}",
                r.mark,
                r.vmmu.as_deref().unwrap_or(""),
                r.kvm.as_deref().unwrap_or("")
            );
        }
        if p.rows.len() > to {
            let _ = writeln!(out, "  ... {} more rows (--json has them)", p.rows.len() - to);
        }
        match &p.first_divergence {
            None if p.compared => {
                let _ = writeln!(out, "  no divergence");
            }
            _ => {}
        }
        let _ = writeln!(out, "  {:<28} {:>8} {:>8} {:>16}", "event", "vmmu", "KVM", "KVM w/o artif.");
        for c in &p.counts {
            let flag = if p.compared && c.vmmu != c.kvm_without_artifacts { "  differs" } else { "" };
            let _ = writeln!(out, "  {:<28} {:>8} {:>8} {:>16}{flag}", c.name, c.vmmu, c.kvm, c.kvm_without_artifacts);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn myers_aligns_and_pairs_changes() {
        let a = s(&["a", "b", "c", "d"]);
        let b = s(&["a", "x", "c", "d", "e"]);
        let rows = align(&a, &b, 100);
        let marks: String = rows.iter().map(|r| r.mark).collect();
        assert_eq!(marks, "=!==>");
        assert_eq!(rows[1].vmmu.as_deref(), Some("b"));
        assert_eq!(rows[1].kvm.as_deref(), Some("x"));
        let rows = align(&a, &a, 0);
        assert!(rows.iter().all(|r| r.mark == '='));
        let rows = align(&s(&[]), &s(&["z"]), 10);
        assert_eq!(rows.len(), 1);
        // Falls back to positions when the edit distance is too large.
        let rows = align(&s(&["a", "b"]), &s(&["c", "d"]), 1);
        assert_eq!(rows.iter().map(|r| r.mark).collect::<String>(), "!!");
    }

    fn ev(name: &str, fields: &str) -> TraceEvent {
        TraceEvent { ts_ns: 0, cpu: 0, task: "t".into(), pid: 1, name: name.into(), fields: fields.into() }
    }

    #[test]
    fn normalises_tables_and_host_values() {
        let evs = vec![
            ev("kvm_mmu_get_page", "sp gen 0 gfn 303 l2 8-byte q0 wux nxe ad root 0 sync new"),
            ev("kvm_mmu_paging_element", "pte 304027 level 2"),
            ev("kvm_mmu_paging_element", "pte 40000007 level 1"),
            ev("kvm_mmu_set_accessed_bit", "gpa 304008"),
            ev("kvm_mmu_spte_requested", "gfn 40000 pfn 636 level 1"),
            ev("kvm_mmu_set_spte", "gfn 40000 spte 636e67 (rwxu) level 1 at 629000"),
        ];
        let mut l = Labels::learn(&evs);
        let n: Vec<String> = evs.iter().map(|e| l.normalise(e)).collect();
        assert_eq!(n[0], "kvm_mmu_get_page: sp gen 0 gfn PT#0 l2 8-byte q0 wux nxe ad root 0 sync new");
        assert_eq!(n[1], "kvm_mmu_paging_element: pte PT#1|27 level 2");
        assert_eq!(n[2], "kvm_mmu_paging_element: pte 40000007 level 1");
        assert_eq!(n[3], "kvm_mmu_set_accessed_bit: gpa PT#1+8");
        assert_eq!(n[4], "kvm_mmu_spte_requested: gfn 40000 level 1");
        assert_eq!(n[5], "kvm_mmu_set_spte: gfn 40000 (rwxu) level 1");
    }

    #[test]
    fn emulator_walks_are_artifacts() {
        let evs = vec![
            ev("kvm_mmu_pagetable_walk", "addr 10000 pferr 14 U|F"),
            ev("kvm_mmu_paging_element", "pte 10007 level 1"),
            ev("kvm_mmu_spte_requested", "gfn 10 pfn 1 level 1"),
            ev("kvm_mmu_pagetable_walk", "addr 3066 pferr 0"),
            ev("kvm_mmu_paging_element", "pte 3027 level 1"),
            ev("kvm_mmu_pagetable_walk", "addr 102f7 pferr 10 F"),
            ev("kvm_mmu_get_page", "sp gen 0 gfn 106 l4 8-byte q0 wux nxe ad root 0 sync new"),
            ev("kvm_mmu_pagetable_walk", "addr 40000000 pferr 6 W|U"),
            ev("kvm_mmu_set_dirty_bit", "gpa 105000"),
        ];
        assert_eq!(artifacts(&evs, 0x20_0000), [false, false, false, true, true, true, false, false, false]);
    }
}
