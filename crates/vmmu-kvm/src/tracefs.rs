//! The real KVM's tracepoints for one run, from tracefs (`/sys/kernel/tracing`).
//!
//! [`TraceSession::start`] makes a private trace *instance* (`instances/vmmu-kvm-PID-TID`: its
//! own ring buffer, event switches, PID filter and `trace_marker`, so nothing global is
//! touched and other tracefs users are not disturbed), enables [`TRACE_EVENTS`] in it, and
//! filters them to one task with `set_event_pid` (the vCPU thread's TID: KVM's MMU
//! tracepoints fire in the context of the thread in `KVM_RUN`, and `set_event_pid` matches
//! the task's kernel pid, which is the thread's TID). The backend writes a
//! `trace_marker` line at every phase end ([`TraceSession::marker`]), so the events split into
//! phases exactly. Dropping the session turns tracing off and removes the instance, on
//! success and on error alike. If instances cannot be made (an old kernel), the top-level
//! buffer is used instead and every file the session writes is restored afterwards; its
//! buffer is not cleared (the session reads only what follows its own start marker).
//!
//! [`parse_trace`] turns the text of a `trace` file (the kernel's, or vmmu's own
//! `--trace events` output, which uses the same layout) into [`TraceEvent`]s.
//!
//! All of it is plain file I/O: no `unsafe`.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::KvmError;

/// Where tracefs is expected.
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// The events a session enables: the whole `kvmmmu` subsystem, plus `kvm_exit` and
/// `kvm_page_fault` from the `kvm` subsystem (one per exit and per guest page fault KVM
/// handles: the anchors to align the MMU events with). Missing ones are skipped.
pub const TRACE_EVENTS: &[&str] = &["kvmmmu", "kvm/kvm_exit", "kvm/kvm_page_fault"];

/// The `trace_marker` text the backend writes when phase `N` ends: `vmmu-phase-end N`.
pub const PHASE_END_MARKER: &str = "vmmu-phase-end";
/// The `trace_marker` text written just before the first `KVM_RUN`.
pub const RUN_START_MARKER: &str = "vmmu-run-start";
/// The name of `trace_marker` lines in the `trace` file.
pub const MARKER_EVENT: &str = "tracing_mark_write";

/// The message for every tracefs failure.
const NEEDS: &str = "tracing needs root and tracefs at /sys/kernel/tracing";

/// Per-CPU ring buffer size of the session's instance, in KiB (one first-touch fault is
/// about fifteen events of ~60 bytes; 16 MiB per CPU holds tens of thousands of faults).
const BUFFER_KB: u32 = 16 * 1024;

fn trace_err(what: impl std::fmt::Display) -> KvmError {
    KvmError::Trace(format!("{NEEDS}: {what}"))
}

/// One event of a `trace` file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TraceEvent {
    /// Timestamp in nanoseconds (the trace clock's; microsecond resolution in the text).
    pub ts_ns: u64,
    /// CPU column.
    pub cpu: u32,
    /// Task name.
    pub task: String,
    /// Task pid (the thread's TID).
    pub pid: i64,
    /// Event name (`kvm_mmu_get_page`, `tracing_mark_write`, ...).
    pub name: String,
    /// The event's printed fields, as the print format renders them.
    pub fields: String,
}

impl TraceEvent {
    /// Whether this is a `trace_marker` line whose text starts with `prefix`.
    pub fn is_marker(&self, prefix: &str) -> bool {
        self.name == MARKER_EVENT && self.fields.starts_with(prefix)
    }
}

/// Parses the text of a tracefs `trace` file (or vmmu's `--trace events` output, which has the
/// same layout) into events. Comment lines (`#`) and lines that do not have the
/// `TASK-PID [CPU] FLAGS TIMESTAMP: NAME: FIELDS` layout are skipped.
pub fn parse_trace(text: &str) -> Vec<TraceEvent> {
    text.lines().filter_map(parse_line).collect()
}

/// Parses one `trace` line.
pub fn parse_line(line: &str) -> Option<TraceEvent> {
    if line.trim_start().starts_with('#') {
        return None;
    }
    // The CPU column: the first "[digits]".
    let (lb, rb) = line.match_indices('[').find_map(|(i, _)| {
        let rest = &line[i + 1..];
        let end = rest.find(']')?;
        (end > 0 && rest[..end].bytes().all(|b| b.is_ascii_digit())).then_some((i, i + 1 + end))
    })?;
    let cpu: u32 = line[lb + 1..rb].parse().ok()?;
    let (task, pid) = line[..lb].trim().rsplit_once('-')?;
    let pid: i64 = pid.trim().parse().ok()?;
    let rest = &line[rb + 1..];
    // Flags (optional) and the timestamp, which ends with ": ".
    let colon = rest.find(": ")?;
    let ts = rest[..colon].split_whitespace().last()?;
    let (secs, frac) = ts.split_once('.').unwrap_or((ts, "0"));
    let secs: u64 = secs.parse().ok()?;
    let frac_ns: u64 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    let after = &rest[colon + 2..];
    let (name, fields) = match after.split_once(": ") {
        Some((n, f)) => (n, f),
        None => (after.trim_end_matches(':'), ""),
    };
    if name.is_empty() || name.contains(' ') {
        return None;
    }
    Some(TraceEvent {
        ts_ns: secs * 1_000_000_000 + frac_ns,
        cpu,
        task: task.to_string(),
        pid,
        name: name.to_string(),
        fields: fields.trim_end().to_string(),
    })
}

/// What one run's trace holds, split at the backend's markers.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KvmTrace {
    /// Events before the first `KVM_RUN` (VM and vCPU creation, `KVM_SET_SREGS`).
    pub setup: Vec<TraceEvent>,
    /// Events per phase (`boot` first), split at the phase-end markers.
    pub phases: Vec<Vec<TraceEvent>>,
    /// Events after the last phase end (the `done` exit, VM teardown in this thread).
    pub after: Vec<TraceEvent>,
    /// Events the ring buffer dropped (`entries-in-buffer/entries-written`); non-zero means
    /// the capture is incomplete.
    pub lost: u64,
    /// How the events were captured (instance or top level, and the PID filter).
    pub how: String,
    /// Requested events that this kernel does not have.
    pub missing_events: Vec<String>,
}

/// A tracefs capture in progress; dropping it turns tracing off and restores tracefs.
#[derive(Debug)]
pub struct TraceSession {
    /// The instance directory (or the tracefs root in the fallback).
    dir: PathBuf,
    /// Whether `dir` is an instance this session made (removed on drop).
    instance: bool,
    /// Files to restore on drop (fallback only), in reverse order of writing.
    restore: Vec<(PathBuf, String)>,
    /// The TID the events are filtered to.
    tid: u32,
    /// Requested events that this kernel does not have.
    missing: Vec<String>,
    /// Top-level buffer only: a token appended to every marker, so that only this session's
    /// markers (and the events after its start marker) count. Empty for an instance.
    nonce: String,
}

/// The calling thread's TID (from `/proc/thread-self`, a link to `PID/task/TID`).
pub fn current_tid() -> Result<u32, KvmError> {
    let link = fs::read_link("/proc/thread-self").map_err(|e| trace_err(format!("/proc/thread-self: {e}")))?;
    link.file_name()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| trace_err(format!("/proc/thread-self points at {}", link.display())))
}

fn write_file(path: &Path, text: &str) -> Result<(), KvmError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| trace_err(format!("{}: {e}", path.display())))?;
    f.write_all(text.as_bytes()).map_err(|e| trace_err(format!("writing {:?} to {}: {e}", text, path.display())))
}

fn append_file(path: &Path, text: &str) -> Result<(), KvmError> {
    let mut f =
        fs::OpenOptions::new().append(true).open(path).map_err(|e| trace_err(format!("{}: {e}", path.display())))?;
    f.write_all(text.as_bytes()).map_err(|e| trace_err(format!("writing {:?} to {}: {e}", text, path.display())))
}

impl TraceSession {
    /// Starts capturing [`TRACE_EVENTS`] for thread `tid` (the thread that will call
    /// `KVM_RUN`). Fails with "tracing needs root and tracefs at /sys/kernel/tracing: ..."
    /// when tracefs is not mounted or not writable.
    pub fn start(tid: u32) -> Result<Self, KvmError> {
        Self::start_at(Path::new(TRACEFS), tid)
    }

    /// [`TraceSession::start`] with another tracefs mount point.
    pub fn start_at(root: &Path, tid: u32) -> Result<Self, KvmError> {
        if !root.join("trace").exists() || !root.join("events/kvmmmu").exists() {
            return Err(trace_err(format!(
                "{} has no trace file or no events/kvmmmu (is tracefs mounted and the kvm module loaded?)",
                root.display()
            )));
        }
        remove_stale_instances(root);
        let name = format!("vmmu-kvm-{}-{tid}", std::process::id());
        let inst = root.join("instances").join(&name);
        let mut s = match fs::create_dir(&inst) {
            Ok(()) => TraceSession {
                dir: inst,
                instance: true,
                restore: Vec::new(),
                tid,
                missing: Vec::new(),
                nonce: String::new(),
            },
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(trace_err(format!("cannot create {}: {e}", inst.display())))
            }
            Err(_) => TraceSession {
                dir: root.to_path_buf(),
                instance: false,
                restore: Vec::new(),
                tid,
                missing: Vec::new(),
                nonce: format!("{name}-{}", std::time::UNIX_EPOCH.elapsed().map(|d| d.as_nanos()).unwrap_or(0)),
            },
        };
        // From here on, `s` restores tracefs if anything fails (Drop).
        s.set("tracing_on", "0")?;
        if s.instance {
            s.set("buffer_size_kb", &BUFFER_KB.to_string())?;
        }
        s.set("set_event_pid", &tid.to_string())?;
        for ev in TRACE_EVENTS {
            let enable = s.dir.join("events").join(ev).join("enable");
            if !enable.exists() {
                s.missing.push(ev.to_string());
                continue;
            }
            s.set(&format!("events/{ev}/enable"), "1")?;
        }
        if s.instance {
            write_file(&s.dir.join("trace"), "")?; // clears the (new) buffer
        }
        s.set("tracing_on", "1")?;
        Ok(s)
    }

    /// Writes `file` (relative to the session's directory), remembering its old contents when
    /// working on the top-level buffer.
    fn set(&mut self, file: &str, value: &str) -> Result<(), KvmError> {
        let path = self.dir.join(file);
        if !self.instance {
            let old = fs::read_to_string(&path).map_err(|e| trace_err(format!("{}: {e}", path.display())))?;
            self.restore.push((path.clone(), old));
        }
        write_file(&path, value)
    }

    /// Writes `text` into the trace buffer as a `tracing_mark_write` line.
    pub fn marker(&self, text: &str) -> Result<(), KvmError> {
        let line = if self.nonce.is_empty() { text.to_string() } else { format!("{text} {}", self.nonce) };
        append_file(&self.dir.join("trace_marker"), &line)
    }

    /// The TID the events are filtered to.
    pub fn tid(&self) -> u32 {
        self.tid
    }

    /// Stops tracing and reads the buffer, split at the markers.
    pub fn finish(mut self) -> Result<KvmTrace, KvmError> {
        self.set("tracing_on", "0")?;
        let path = self.dir.join("trace");
        let text = fs::read_to_string(&path).map_err(|e| trace_err(format!("{}: {e}", path.display())))?;
        let mut t = split(&text, &self.nonce);
        t.how = format!(
            "{} {}, set_event_pid {} (the vCPU thread), events {}",
            if self.instance { "tracefs instance" } else { "top-level tracefs buffer (no instances)" },
            self.dir.display(),
            self.tid,
            TRACE_EVENTS
                .iter()
                .filter(|e| !self.missing.iter().any(|m| m == *e))
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
        t.missing_events = self.missing.clone();
        Ok(t)
    }
}

/// Splits a `trace` file's text at the backend's markers; with a `nonce` (top-level buffer)
/// only markers carrying it count and everything before the start marker is dropped.
fn split(text: &str, nonce: &str) -> KvmTrace {
    let mut t = KvmTrace::default();
    for l in text.lines() {
        // "# entries-in-buffer/entries-written: 11/11   #P:2"
        if let Some(rest) = l.strip_prefix("# entries-in-buffer/entries-written: ") {
            let nums: Vec<u64> =
                rest.split(|c: char| c == '/' || c.is_whitespace()).take(2).filter_map(|x| x.parse().ok()).collect();
            if let [a, b] = nums[..] {
                t.lost += b.saturating_sub(a);
            }
        }
    }
    let ours = |e: &TraceEvent| nonce.is_empty() || e.fields.ends_with(nonce);
    let mut started = nonce.is_empty();
    let mut current: Vec<TraceEvent> = Vec::new();
    let mut in_setup = true;
    for e in parse_trace(text) {
        if e.is_marker(RUN_START_MARKER) && ours(&e) {
            started = true;
            if nonce.is_empty() {
                t.setup = std::mem::take(&mut current);
            } else {
                current.clear();
            }
            in_setup = false;
            continue;
        }
        if !started {
            continue;
        }
        if e.is_marker(PHASE_END_MARKER) && ours(&e) {
            t.phases.push(std::mem::take(&mut current));
            continue;
        }
        if e.name == MARKER_EVENT {
            continue;
        }
        current.push(e);
    }
    if in_setup {
        t.setup = current;
    } else {
        t.after = current;
    }
    t
}

/// Removes instances left behind by sessions whose process no longer exists (a run killed
/// by a signal cannot run its destructor).
fn remove_stale_instances(root: &Path) {
    let Ok(dir) = fs::read_dir(root.join("instances")) else { return };
    for ent in dir.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("vmmu-kvm-").and_then(|r| r.split('-').next()) else { continue };
        if !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir(ent.path());
        }
    }
}

impl Drop for TraceSession {
    fn drop(&mut self) {
        if self.instance {
            let _ = write_file(&self.dir.join("tracing_on"), "0");
            let _ = fs::remove_dir(&self.dir);
        } else {
            for (path, old) in self.restore.drain(..).rev() {
                let _ = restore_file(&path, &old);
            }
        }
    }
}

/// Restores a top-level tracefs file from what it read before.
fn restore_file(path: &Path, old: &str) -> Result<(), KvmError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    match name {
        // "7 (expanded: 1408)" -> "7"; the per-event `enable` files read "0", "1", or "X" for
        // a subsystem with mixed states (left as the session found them by writing 0 only).
        "buffer_size_kb" => write_file(path, old.split_whitespace().next().unwrap_or("1408")),
        "enable" => write_file(path, if old.trim() == "1" { "1" } else { "0" }),
        "set_event_pid" => {
            write_file(path, "")?;
            for pid in old.split_whitespace() {
                append_file(path, pid)?;
            }
            Ok(())
        }
        _ => write_file(path, old.trim()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_and_vmmu_lines() {
        let k = "         vmmu-2412    [001] ..... 12345.678901: kvm_mmu_get_page: sp gen 0 gfn 100 l4 8-byte q0 wux nxe ad root 0 sync new";
        let e = parse_line(k).unwrap();
        assert_eq!((e.cpu, e.pid, e.task.as_str()), (1, 2412, "vmmu"));
        assert_eq!(e.ts_ns, 12_345_678_901_000);
        assert_eq!(e.name, "kvm_mmu_get_page");
        assert!(e.fields.starts_with("sp gen 0 gfn 100"));
        let v = "          vcpu-0-1000    [000] .....      0.648543: kvm_mmu_pagetable_walk: addr 10000 pferr 4 U";
        let e = parse_line(v).unwrap();
        assert_eq!((e.task.as_str(), e.pid, e.name.as_str()), ("vcpu-0", 1000, "kvm_mmu_pagetable_walk"));
        assert_eq!(e.fields, "addr 10000 pferr 4 U");
        let m = " <...>-77 [000] d..1.   5.000001: tracing_mark_write: vmmu-phase-end 3";
        assert!(parse_line(m).unwrap().is_marker(PHASE_END_MARKER));
        assert!(parse_line("# tracer: nop").is_none());
    }

    #[test]
    fn missing_tracefs_is_a_clear_error() {
        let e = TraceSession::start_at(Path::new("/nonexistent/tracing"), 1).unwrap_err().to_string();
        assert!(e.starts_with("tracing needs root and tracefs at /sys/kernel/tracing"), "{e}");
    }

    #[test]
    fn splits_at_markers_and_counts_lost() {
        let l = |ts: u32, name: &str, f: &str| format!(" t-1 [000] ..... 1.{ts:06}: {name}: {f}\n");
        let mut text = String::from("# entries-in-buffer/entries-written: 9/12   #P:2\n");
        text += &l(1, "kvm_exit", "setup");
        text += &l(2, MARKER_EVENT, RUN_START_MARKER);
        text += &l(3, "kvm_mmu_get_page", "a");
        text += &l(4, MARKER_EVENT, "vmmu-phase-end 0");
        text += &l(5, "kvm_mmu_set_spte", "b");
        text += &l(6, "kvm_mmu_set_spte", "c");
        text += &l(7, MARKER_EVENT, "vmmu-phase-end 1");
        text += &l(8, "kvm_exit", "done");
        let t = split(&text, "");
        assert_eq!(t.lost, 3);
        assert_eq!(t.setup.len(), 1);
        assert_eq!(t.phases.iter().map(Vec::len).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(t.after[0].fields, "done");
    }
}
