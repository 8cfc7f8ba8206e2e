//! The Chrome / Perfetto trace-event JSON export (`vmmu run --trace-out FILE.json`): a run's
//! function spans and tracepoints on a timeline, one track per vCPU.
//!
//! Layout (the "JSON Object Format" of the Trace Event Format, which ui.perfetto.dev and
//! chrome://tracing load):
//!
//! - one process (`pid`) per run, named with a `process_name` metadata event;
//! - one thread (`tid`) per vCPU, named `vCPU n`, and one for VM-wide work done on host
//!   threads ([`HOST_CPU`]: MMU notifiers, dirty-log harvests, `kvm_mmu_zap_all_fast`),
//!   named `host / VM-wide`; every thread has `thread_name` and `thread_sort_index` metadata;
//! - each traced function call is a complete event (`"ph": "X"`, `ts` and `dur` in
//!   microseconds with nanosecond decimals), with a category saying what it is part of:
//!   `fault`, `exit`, `zap`, `tlb`, `notifier`, `dirty_log`, `emulate` or `mmu`;
//! - each tracepoint is a thread-scoped instant event (`"ph": "i"`, `"s": "t"`, category
//!   `kvmmmu`) whose `args` hold its formatted text under `"text"` and the `key value` pairs
//!   parsed from it (values as strings: the kernel prints most of them in hex).
//!
//! Events are sorted by time within a run. Large runs are capped: at most
//! [`ChromeOptions::max_events`] span and instant events are written (the earliest ones); a
//! capped file says so in a `vmmu_truncated` metadata event and [`ChromeSummary::dropped`].
//! The output is written through any [`std::io::Write`], event by event.

use super::{Rec, Record, Tracer, HOST_CPU};
use std::fmt::Write as _;
use std::io::{self, Write};

/// Export options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChromeOptions {
    /// Most span and instant events written per file (metadata events not counted).
    pub max_events: usize,
}

impl ChromeOptions {
    /// The default cap: one million events (about 150 MB of JSON, which the Perfetto UI
    /// still loads).
    pub const DEFAULT_MAX_EVENTS: usize = 1_000_000;
}

impl Default for ChromeOptions {
    fn default() -> Self {
        ChromeOptions { max_events: Self::DEFAULT_MAX_EVENTS }
    }
}

/// One run's records, exported as one process.
#[derive(Debug, Clone, Copy)]
pub struct ChromeProcess<'a> {
    /// The process name shown on the timeline (e.g. the scenario and the MMU).
    pub name: &'a str,
    /// The run's records ([`Tracer::take_records`]).
    pub records: &'a [Record],
}

/// What was written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChromeSummary {
    /// Span and instant events written.
    pub events: usize,
    /// Events left out by the cap.
    pub dropped: usize,
}

/// What a traced function is part of, for the event's category.
pub fn category(name: &str) -> &'static str {
    match name {
        "handle_ept_violation" | "handle_ept_misconfig" | "npf_interception" | "handle_exception_nmi" => "exit",
        "kvm_flush_remote_tlbs" => "tlb",
        "x86_emulate_instruction" => "emulate",
        n if n.starts_with("kvm_mmu_notifier") => "notifier",
        n if n.contains("dirty_log") => "dirty_log",
        n if n.contains("flush_tlb") => "tlb",
        n if n.contains("zap") => "zap",
        n if n.contains("page_fault")
            || n.contains("faultin")
            || n.ends_with("_map")
            || n == "mmu_topup_memory_caches"
            || n == "check_mmio_spte" =>
        {
            "fault"
        }
        _ => "mmu",
    }
}

/// The track of `cpu` in process `pid`: vCPU n is thread `pid * 1000 + n + 1`, host work
/// thread `pid * 1000 + 999` (thread ids stay unique across processes).
pub fn tid(pid: u32, cpu: u32) -> u64 {
    u64::from(pid) * 1000 + if cpu == HOST_CPU { 999 } else { u64::from(cpu.min(997)) + 1 }
}

/// The name of `cpu`'s track.
pub fn track_name(cpu: u32) -> String {
    if cpu == HOST_CPU {
        "host / VM-wide".to_string()
    } else {
        format!("vCPU {cpu}")
    }
}

/// A span or instant event before it is written.
struct Ev<'a> {
    ns: u64,
    dur_ns: Option<u64>,
    cpu: u32,
    name: &'static str,
    text: Option<&'a str>,
    unfinished: bool,
}

/// Microseconds with three decimals (nanosecond precision).
fn us(ns: u64) -> String {
    format!("{}.{:03}", ns / 1000, ns % 1000)
}

/// `s` as a JSON string literal.
fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// The `key value` pairs of a tracepoint's text: a key is a word of lowercase letters, digits
/// and `_` that is not itself a hex number, followed by a token that is not a key; `key:value`
/// tokens count too. Anything else (flags such as `(rwx)`) is only in the raw text.
pub fn parse_fields(text: &str) -> Vec<(&str, &str)> {
    fn is_key(t: &str) -> bool {
        t.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            && t.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !t.chars().all(|c| c.is_ascii_hexdigit())
    }
    let toks: Vec<&str> = text.split_whitespace().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let t = toks[i];
        if let Some((k, v)) = t.split_once(':').filter(|(k, v)| is_key(k) && !v.is_empty()) {
            out.push((k, v));
            i += 1;
        } else if is_key(t) && i + 1 < toks.len() && !is_key(toks[i + 1]) {
            out.push((t, toks[i + 1]));
            i += 2;
        } else {
            i += 1;
        }
    }
    out
}

/// Pairs the function entries and exits of one run into spans, keeps the tracepoints, and
/// sorts both by time (stable: a parent span before the children that start with it).
fn events(records: &[Record]) -> Vec<Ev<'_>> {
    let mut out: Vec<Ev<'_>> = Vec::with_capacity(records.len());
    let mut stacks: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for r in records {
        match &r.rec {
            Rec::Event { name, text } => {
                out.push(Ev { ns: r.ns, dur_ns: None, cpu: r.cpu, name, text: Some(text), unfinished: false })
            }
            Rec::Enter(name) => {
                stacks.entry(r.cpu).or_default().push(out.len());
                out.push(Ev { ns: r.ns, dur_ns: Some(0), cpu: r.cpu, name, text: None, unfinished: true });
            }
            Rec::Exit(_) => {
                if let Some(i) = stacks.get_mut(&r.cpu).and_then(|s| s.pop()) {
                    out[i].dur_ns = Some(r.ns.saturating_sub(out[i].ns));
                    out[i].unfinished = false;
                }
            }
        }
    }
    // Calls still open when the records end (the buffer was taken mid-call) end there.
    let last = records.last().map_or(0, |r| r.ns);
    for e in out.iter_mut().filter(|e| e.unfinished) {
        e.dur_ns = Some(last.saturating_sub(e.ns));
    }
    out.sort_by_key(|e| e.ns);
    out
}

/// Writes `procs` as one trace-event JSON object (`{"traceEvents": [...], "displayTimeUnit":
/// "ns"}`), process `i` with pid `i + 1`.
pub fn write_chrome_json<W: Write>(
    w: &mut W,
    procs: &[ChromeProcess<'_>],
    opts: &ChromeOptions,
) -> io::Result<ChromeSummary> {
    let mut sum = ChromeSummary::default();
    let mut first = true;
    let mut line = |w: &mut W, s: &str| -> io::Result<()> {
        w.write_all(if first { b"\n" } else { b",\n" })?;
        first = false;
        w.write_all(s.as_bytes())
    };
    w.write_all(b"{\"displayTimeUnit\": \"ns\", \"traceEvents\": [")?;
    for (i, p) in procs.iter().enumerate() {
        let pid = u32::try_from(i + 1).unwrap_or(u32::MAX);
        line(
            w,
            &format!(
                r#"{{"name": "process_name", "ph": "M", "pid": {pid}, "tid": {}, "args": {{"name": {}}}}}"#,
                tid(pid, HOST_CPU),
                json_str(p.name)
            ),
        )?;
        let mut cpus: Vec<u32> = p.records.iter().map(|r| r.cpu).collect();
        cpus.sort_unstable();
        cpus.dedup();
        for &cpu in &cpus {
            let t = tid(pid, cpu);
            line(
                w,
                &format!(
                    r#"{{"name": "thread_name", "ph": "M", "pid": {pid}, "tid": {t}, "args": {{"name": {}}}}}"#,
                    json_str(&track_name(cpu))
                ),
            )?;
            let order = if cpu == HOST_CPU { 1000 } else { cpu };
            line(
                w,
                &format!(
                    r#"{{"name": "thread_sort_index", "ph": "M", "pid": {pid}, "tid": {t}, "args": {{"sort_index": {order}}}}}"#
                ),
            )?;
        }
        let evs = events(p.records);
        let room = opts.max_events.saturating_sub(sum.events);
        let keep = evs.len().min(room);
        sum.dropped += evs.len() - keep;
        for e in &evs[..keep] {
            let t = tid(pid, e.cpu);
            let s = match (e.dur_ns, e.text) {
                (Some(d), _) => format!(
                    r#"{{"name": {}, "cat": "{}", "ph": "X", "ts": {}, "dur": {}, "pid": {pid}, "tid": {t}{}}}"#,
                    json_str(e.name),
                    category(e.name),
                    us(e.ns),
                    us(d),
                    if e.unfinished { r#", "args": {"unfinished": true}"# } else { "" }
                ),
                (None, text) => {
                    let text = text.unwrap_or("");
                    let mut args = format!(r#""text": {}"#, json_str(text));
                    for (k, v) in parse_fields(text) {
                        if k != "text" {
                            let _ = write!(args, ", {}: {}", json_str(k), json_str(v));
                        }
                    }
                    format!(
                        r#"{{"name": {}, "cat": "kvmmmu", "ph": "i", "s": "t", "ts": {}, "pid": {pid}, "tid": {t}, "args": {{{args}}}}}"#,
                        json_str(e.name),
                        us(e.ns)
                    )
                }
            };
            line(w, &s)?;
        }
        sum.events += keep;
    }
    if sum.dropped > 0 {
        line(
            w,
            &format!(
                r#"{{"name": "vmmu_truncated", "ph": "M", "pid": 1, "tid": {}, "args": {{"written": {}, "dropped": {}}}}}"#,
                tid(1, HOST_CPU),
                sum.events,
                sum.dropped
            ),
        )?;
    }
    w.write_all(b"\n]}\n")?;
    Ok(sum)
}

impl Tracer {
    /// This tracer's records (not taken) as one trace-event JSON object, process `name`.
    pub fn render_chrome_json(&self, name: &str) -> String {
        let records = self.buf.lock().records.clone();
        let mut out = Vec::new();
        let _ = write_chrome_json(&mut out, &[ChromeProcess { name, records: &records }], &ChromeOptions::default());
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_parse_from_kernel_formats() {
        assert_eq!(parse_fields("gfn 100 pfn 2a3f level 1"), vec![("gfn", "100"), ("pfn", "2a3f"), ("level", "1")]);
        assert_eq!(
            parse_fields("gfn 1f spte 600000001f007 (rwx) level 1 at 7f2008"),
            vec![("gfn", "1f"), ("spte", "600000001f007"), ("level", "1"), ("at", "7f2008")]
        );
        assert_eq!(parse_fields("sptep:00000000deadbeef gfn abc"), vec![("sptep", "00000000deadbeef"), ("gfn", "abc")]);
    }

    #[test]
    fn spans_pair_and_tracks_are_named() {
        let t = Tracer::default();
        t.set_function_graph(true);
        t.set_events(true);
        {
            let _a = t.func(0, "kvm_tdp_page_fault");
            let _b = t.func(0, "kvm_faultin_pfn");
            t.event(0, "kvm_mmu_spte_requested", format_args!("gfn 1 pfn 2 level 1"));
        }
        {
            let _c = t.func(HOST_CPU, "kvm_mmu_notifier_invalidate_range_start");
        }
        let s = t.render_chrome_json("run \"x\"");
        assert!(
            s.contains(r#""name": "thread_name", "ph": "M", "pid": 1, "tid": 1001, "args": {"name": "vCPU 0"}"#),
            "{s}"
        );
        assert!(s.contains(r#""args": {"name": "host / VM-wide"}"#), "{s}");
        assert!(s.contains(r#""name": "kvm_tdp_page_fault", "cat": "fault", "ph": "X""#), "{s}");
        assert!(s.contains(r#""cat": "notifier""#), "{s}");
        assert!(s.contains(r#""args": {"text": "gfn 1 pfn 2 level 1", "gfn": "1", "pfn": "2", "level": "1"}"#), "{s}");
        assert!(s.contains(r#"run \"x\""#));
        let mut out = Vec::new();
        let recs = t.take_records();
        let sum = write_chrome_json(
            &mut out,
            &[ChromeProcess { name: "p", records: &recs }],
            &ChromeOptions { max_events: 2 },
        )
        .unwrap();
        assert_eq!(sum, ChromeSummary { events: 2, dropped: 2 });
        assert!(String::from_utf8(out).unwrap().contains("vmmu_truncated"));
        assert!(t.is_empty());
    }
}
