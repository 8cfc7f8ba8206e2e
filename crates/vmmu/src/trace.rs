//! Tracing in the kernel's formats: tracepoints (`--trace events`, one line per event in the
//! layout of the kernel's trace output, with the kvmmmu print formats) and the
//! function_graph tracer (`--trace function_graph`, nested calls with durations).
//!
//! Off by default; when off, an event or a function costs one relaxed load.

use crate::sync::{AtomicBool, Mutex, Ordering};
use std::fmt::Write as _;
use std::time::Instant;

pub mod chrome;

/// The `cpu` of VM-wide work done outside any vCPU (MMU notifiers, dirty-log harvests,
/// `kvm_mmu_zap_all_fast`): host threads.
pub const HOST_CPU: u32 = u32::MAX;

/// One recorded trace item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rec {
    /// A tracepoint with its formatted text (the kernel's print format).
    Event {
        /// Tracepoint name.
        name: &'static str,
        /// The formatted fields.
        text: String,
    },
    /// A traced function was entered.
    Enter(&'static str),
    /// A traced function returned.
    Exit(&'static str),
}

/// A trace item with its time and CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Nanoseconds since the tracer was created.
    pub ns: u64,
    /// The vCPU id, or [`HOST_CPU`].
    pub cpu: u32,
    /// What happened.
    pub rec: Rec,
}

/// The trace buffer of one VM.
pub struct Tracer {
    events: AtomicBool,
    graph: AtomicBool,
    start: Instant,
    buf: Mutex<Buf>,
}

/// The tracer's records, or with a stream set ([`Tracer::stream_events_to`]) the writer
/// events go to as they happen.
#[derive(Default)]
struct Buf {
    records: Vec<Record>,
    stream: Option<Box<dyn std::io::Write + Send>>,
    /// Events written to the stream so far.
    streamed: usize,
    /// The stream's first write error (nothing more is written after it).
    stream_error: Option<std::io::Error>,
}

/// The header `render_events` starts with (the kernel's `trace` file header for the nop
/// tracer).
const EVENTS_HEADER: &str = "# tracer: nop\n#\n#                                _-----=> irqs-off/BH-disabled\n#                               / _----=> need-resched\n#                              | / _---=> hardirq/softirq\n#                              || / _--=> preempt-depth\n#                              ||| / _-=> migrate-disable\n#                              |||| /     delay\n#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION\n#              | |         |   |||||     |         |\n";

/// One event line in the kernel's layout: vCPU n is task `vcpu-n`, pid 1000 + n, on CPU n;
/// host work ([`HOST_CPU`]: notifiers, harvests, zaps done by the VMM) is task `vmm`, pid 999,
/// on CPU 999 (the kernel shows the VMM thread that made the ioctl).
fn event_line(out: &mut impl std::fmt::Write, ns: u64, cpu: u32, name: &str, text: &dyn std::fmt::Display) {
    let (task, pid, on_cpu) = if cpu == HOST_CPU {
        ("vmm".to_string(), 999, 999)
    } else {
        (format!("vcpu-{cpu}"), 1000 + u64::from(cpu), cpu)
    };
    let _ = writeln!(
        out,
        "{:>16}-{:<7} [{:03}] ..... {:>6}.{:06}: {}: {}",
        task,
        pid,
        on_cpu,
        ns / 1_000_000_000,
        (ns / 1000) % 1_000_000,
        name,
        text
    );
}

impl Default for Tracer {
    fn default() -> Self {
        Tracer {
            events: AtomicBool::new(false),
            graph: AtomicBool::new(false),
            start: Instant::now(),
            buf: Mutex::new(Buf::default()),
        }
    }
}

/// Leaves a traced function when dropped.
pub struct FnGuard<'a> {
    tracer: &'a Tracer,
    cpu: u32,
    name: &'static str,
}

impl Drop for FnGuard<'_> {
    fn drop(&mut self) {
        self.tracer.push(self.cpu, Rec::Exit(self.name));
    }
}

impl Tracer {
    /// Turns tracepoints on or off.
    pub fn set_events(&self, on: bool) {
        self.events.store(on, Ordering::Relaxed);
    }

    /// Turns the function_graph tracer on or off.
    pub fn set_function_graph(&self, on: bool) {
        self.graph.store(on, Ordering::Relaxed);
    }

    /// Whether tracepoints are on.
    #[inline]
    pub fn events_on(&self) -> bool {
        self.events.load(Ordering::Relaxed)
    }

    fn push(&self, cpu: u32, rec: Rec) {
        let ns = crate::num::nanos(self.start.elapsed());
        self.buf.lock().records.push(Record { ns, cpu, rec });
    }

    /// Records tracepoint `name` with its already formatted text (call only when
    /// [`Tracer::events_on`]); while streaming, writes its line instead.
    pub fn event(&self, cpu: u32, name: &'static str, args: std::fmt::Arguments<'_>) {
        let ns = crate::num::nanos(self.start.elapsed());
        let mut buf = self.buf.lock();
        let b = &mut *buf;
        match &mut b.stream {
            Some(out) => {
                if b.stream_error.is_none() {
                    let mut line = String::new();
                    event_line(&mut line, ns, cpu, name, &args);
                    if let Err(e) = out.write_all(line.as_bytes()) {
                        b.stream_error = Some(e);
                    }
                }
                b.streamed += 1;
            }
            None => b.records.push(Record { ns, cpu, rec: Rec::Event { name, text: args.to_string() } }),
        }
    }

    /// Streams events from now on: the header of [`Tracer::render_events`] is written to
    /// `out`, then each event's line as it happens, instead of keeping the events in memory
    /// (function_graph records are still kept). The text is what `render_events` would
    /// have produced. End with [`Tracer::finish_stream`].
    pub fn stream_events_to(&self, mut out: Box<dyn std::io::Write + Send>) {
        let mut b = self.buf.lock();
        b.stream_error = out.write_all(EVENTS_HEADER.as_bytes()).err();
        b.stream = Some(out);
    }

    /// The first error writing the event stream, if any (later events were dropped).
    pub fn stream_error(&self) -> Option<std::io::ErrorKind> {
        self.buf.lock().stream_error.as_ref().map(|e| e.kind())
    }

    /// Ends streaming: flushes and drops the writer; returns its first error.
    pub fn finish_stream(&self) -> std::io::Result<()> {
        let mut b = self.buf.lock();
        let flushed = b.stream.take().map_or(Ok(()), |mut out| out.flush());
        match b.stream_error.take() {
            Some(e) => Err(e),
            None => flushed,
        }
    }

    /// Enters traced function `name`; the guard records its exit.
    #[inline]
    pub fn func(&self, cpu: u32, name: &'static str) -> Option<FnGuard<'_>> {
        if !self.graph.load(Ordering::Relaxed) {
            return None;
        }
        self.push(cpu, Rec::Enter(name));
        Some(FnGuard { tracer: self, cpu, name })
    }

    /// Drops everything recorded.
    pub fn clear(&self) {
        self.buf.lock().records.clear();
    }

    /// Number of recorded items, events streamed included.
    pub fn len(&self) -> usize {
        let b = self.buf.lock();
        b.records.len() + b.streamed
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes everything recorded, oldest first, leaving the buffer empty (for exporters such
    /// as [`chrome::write_chrome_json`]).
    pub fn take_records(&self) -> Vec<Record> {
        std::mem::take(&mut self.buf.lock().records)
    }

    /// Renders the tracepoints as the kernel's `trace` file does.
    pub fn render_events(&self) -> String {
        let buf = self.buf.lock();
        let mut out = String::from(EVENTS_HEADER);
        for r in buf.records.iter() {
            if let Rec::Event { name, text } = &r.rec {
                event_line(&mut out, r.ns, r.cpu, name, text);
            }
        }
        out
    }

    /// Renders the function_graph trace as the kernel's function_graph tracer does: per
    /// CPU, nested calls with braces, durations on the closing line (or on the line of a
    /// leaf call).
    pub fn render_function_graph(&self) -> String {
        let buf = self.buf.lock();
        let mut out = String::from("# tracer: function_graph\n#\n# CPU  DURATION                  FUNCTION CALLS\n# |     |   |                     |   |   |   |\n");
        let recs: Vec<&Record> = buf.records.iter().filter(|r| !matches!(r.rec, Rec::Event { .. })).collect();
        render_graph(&mut out, &recs);
        out
    }
}

/// Renders function entry/exit records: per CPU a stack of open calls; a call whose next
/// record on the same CPU is its own exit is a leaf and prints on one line.
fn render_graph(out: &mut String, recs: &[&Record]) {
    let mut stacks: std::collections::BTreeMap<u32, Vec<(&'static str, u64)>> = Default::default();
    let mut i = 0;
    let mut consumed = vec![false; recs.len()];
    while i < recs.len() {
        if consumed[i] {
            i += 1;
            continue;
        }
        let r = recs[i];
        let stack = stacks.entry(r.cpu).or_default();
        match r.rec {
            Rec::Enter(name) => {
                let next = recs[i + 1..]
                    .iter()
                    .enumerate()
                    .find(|(k, n)| !consumed[i + 1 + k] && n.cpu == r.cpu)
                    .map(|(k, _)| i + 1 + k);
                match next.map(|j| (j, &recs[j].rec)) {
                    Some((j, Rec::Exit(n2))) if *n2 == name => {
                        let d = recs[j].ns.saturating_sub(r.ns);
                        let _ =
                            writeln!(out, "{:>2}) {}|  {}{}();", r.cpu, duration(d), "  ".repeat(stack.len()), name);
                        consumed[j] = true;
                    }
                    _ => {
                        let _ = writeln!(out, "{:>2}) {:14}|  {}{}() {{", r.cpu, "", "  ".repeat(stack.len()), name);
                        stack.push((name, r.ns));
                    }
                }
            }
            Rec::Exit(_) => {
                if let Some((_, t0)) = stack.pop() {
                    let _ = writeln!(
                        out,
                        "{:>2}) {}|  {}}}",
                        r.cpu,
                        duration(r.ns.saturating_sub(t0)),
                        "  ".repeat(stack.len())
                    );
                }
            }
            Rec::Event { .. } => {}
        }
        i += 1;
    }
}

/// A duration in the function_graph column format: 14 characters, "  1.234 us    ".
fn duration(ns: u64) -> String {
    format!("{:>7} us    ", format!("{}.{:03}", ns / 1000, ns % 1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_render_in_kernel_layout() {
        let t = Tracer::default();
        t.set_events(true);
        if t.events_on() {
            t.event(0, "kvm_mmu_spte_requested", format_args!("gfn {:x} pfn {:x} level {}", 0x100, 0x2a3f, 1));
        }
        let s = t.render_events();
        let line = s.lines().last().unwrap();
        assert!(line.contains("[000] ....."), "{line}");
        assert!(line.ends_with("kvm_mmu_spte_requested: gfn 100 pfn 2a3f level 1"), "{line}");
    }

    /// Host work (HOST_CPU = u32::MAX) renders as the VMM's task; before, `1000 + cpu`
    /// overflowed (a panic in debug builds, a wrapped pid in release).
    #[test]
    fn host_events_render_as_the_vmm_task() {
        let t = Tracer::default();
        t.set_events(true);
        t.event(HOST_CPU, "kvm_mmu_zap_all_fast", format_args!("kvm-mmu-valid-gen 1 used_pages 0"));
        t.event(7, "kvm_mmu_spte_requested", format_args!("gfn 1 pfn 2 level 1"));
        let s = t.render_events();
        let lines: Vec<&str> = s.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(lines[0].trim_start().starts_with("vmm-999     [999] ....."), "{}", lines[0]);
        assert!(lines[1].trim_start().starts_with("vcpu-7-1007    [007] ....."), "{}", lines[1]);
    }

    #[test]
    fn function_graph_nests_and_folds_leaves() {
        let t = Tracer::default();
        t.set_function_graph(true);
        {
            let _a = t.func(0, "kvm_tdp_page_fault");
            {
                let _b = t.func(0, "fast_page_fault");
            }
            {
                let _c = t.func(0, "kvm_tdp_mmu_map");
                let _d = t.func(0, "tdp_mmu_set_spte_atomic");
            }
        }
        let s = t.render_function_graph();
        let body: Vec<&str> = s.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(body[0].ends_with("|  kvm_tdp_page_fault() {"), "{s}");
        assert!(body[1].contains(" us ") && body[1].ends_with("|    fast_page_fault();"), "{s}");
        assert!(body[2].ends_with("|    kvm_tdp_mmu_map() {"), "{s}");
        assert!(body[3].ends_with("|      tdp_mmu_set_spte_atomic();"), "{s}");
        assert!(body[4].contains(" us ") && body[4].ends_with("|    }"), "{s}");
        assert!(body[5].ends_with("|  }"), "{s}");
    }

    /// A writer that keeps what it was given, shared with the test.
    #[derive(Clone, Default)]
    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The timestamp field of each event line blanked (it differs between two tracers).
    fn untimed(s: &str) -> Vec<String> {
        s.lines()
            .map(|l| match l.split_once(": ") {
                Some((a, b)) if !l.starts_with('#') => format!("{}|{b}", &a[..a.len() - 13]),
                _ => l.to_string(),
            })
            .collect()
    }

    #[test]
    fn streamed_events_are_written_as_they_happen_and_not_kept() {
        let (buffered, streamed) = (Tracer::default(), Tracer::default());
        let sink = Sink::default();
        streamed.stream_events_to(Box::new(sink.clone()));
        for t in [&buffered, &streamed] {
            t.set_events(true);
        }
        for i in 0..1000u64 {
            for t in [&buffered, &streamed] {
                t.event((i % 3) as u32, "kvm_mmu_spte_requested", format_args!("gfn {i:x} pfn {:x} level 1", i + 7));
            }
            // The event's line is out before the next event happens, and nothing is held.
            let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
            assert!(out.ends_with(&format!("gfn {i:x} pfn {:x} level 1\n", i + 7)), "{out}");
            assert!(streamed.buf.lock().records.is_empty());
        }
        assert_eq!(streamed.len(), 1000, "streamed events still count (phase ranges)");
        streamed.finish_stream().unwrap();
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let rendered = buffered.render_events();
        assert_eq!(out.len(), rendered.len());
        assert_eq!(untimed(&out), untimed(&rendered), "the same text as the buffered trace");
        // After the stream ends, events are kept again.
        streamed.event(0, "kvm_mmu_spte_requested", format_args!("late"));
        assert_eq!(streamed.buf.lock().records.len(), 1);
    }

    #[test]
    fn stream_errors_are_kept_and_stop_the_writes() {
        struct Full(u32);
        impl std::io::Write for Full {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                self.0 += 1;
                Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let t = Tracer::default();
        t.set_events(true);
        t.stream_events_to(Box::new(Full(0)));
        assert_eq!(t.stream_error(), Some(std::io::ErrorKind::BrokenPipe));
        t.event(0, "kvm_mmu_spte_requested", format_args!("x"));
        assert_eq!(t.finish_stream().unwrap_err().kind(), std::io::ErrorKind::BrokenPipe);
        assert!(t.finish_stream().is_ok(), "the error is reported once");
    }
}
