//! `--trace-out FILE.json`: the Chrome/Perfetto trace-event export loads as valid trace-event
//! JSON — required keys per phase type, per-track time order, nesting, named tracks, a fault
//! span on every vCPU track, a host track for VM-wide work.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmmu-perfetto-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// Runs `vmmu run ARGS --trace-out FILE` and parses FILE.
fn trace(args: &[&str], file: &str) -> Value {
    let out = tmp(file);
    let o =
        Command::new(env!("CARGO_BIN_EXE_vmmu")).args(args).arg("--trace-out").arg(&out).output().expect("run vmmu");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&out).expect("the trace file is written");
    let _ = std::fs::remove_file(&out);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON: {e}"))
}

/// A track: (pid, tid).
type Track = (u64, u64);

/// What a valid file holds, for the checks each test adds.
struct Checked {
    /// Track names from the thread_name metadata.
    names: BTreeMap<Track, String>,
    /// Categories of the complete events per track.
    span_cats: BTreeMap<Track, BTreeSet<String>>,
    /// Names of the complete events per track.
    span_names: BTreeMap<Track, BTreeSet<String>>,
    /// Instant events.
    instants: Vec<Value>,
}

fn num(e: &Value, k: &str) -> f64 {
    e[k].as_f64().unwrap_or_else(|| panic!("`{k}` is not a number in {e}"))
}

/// Validates the trace-event schema and returns what the file holds.
fn validate(v: &Value) -> Checked {
    assert_eq!(v["displayTimeUnit"], "ns");
    let evs = v["traceEvents"].as_array().expect("traceEvents is an array");
    assert!(!evs.is_empty());
    let mut c =
        Checked { names: BTreeMap::new(), span_cats: BTreeMap::new(), span_names: BTreeMap::new(), instants: vec![] };
    let mut used: BTreeSet<Track> = BTreeSet::new();
    let mut processes: BTreeSet<u64> = BTreeSet::new();
    // Per track: the last X start and the stack of open X ends (for nesting).
    let mut last_ts: BTreeMap<Track, f64> = BTreeMap::new();
    let mut open: BTreeMap<Track, Vec<f64>> = BTreeMap::new();
    for e in evs {
        let ph = e["ph"].as_str().unwrap_or_else(|| panic!("no ph in {e}"));
        assert!(e["name"].is_string(), "no name in {e}");
        let track = (
            e["pid"].as_u64().unwrap_or_else(|| panic!("no pid in {e}")),
            e["tid"].as_u64().unwrap_or_else(|| panic!("no tid in {e}")),
        );
        match ph {
            "M" => {
                let name = e["name"].as_str().unwrap();
                match name {
                    "thread_name" => {
                        c.names.insert(track, e["args"]["name"].as_str().expect("thread_name has args.name").into());
                    }
                    "process_name" => {
                        assert!(e["args"]["name"].is_string(), "{e}");
                        processes.insert(track.0);
                    }
                    "thread_sort_index" => assert!(e["args"]["sort_index"].is_i64(), "{e}"),
                    other => panic!("unexpected metadata event {other}"),
                }
            }
            "X" => {
                let (ts, dur) = (num(e, "ts"), num(e, "dur"));
                assert!(ts >= 0.0 && dur >= 0.0, "{e}");
                assert!(e["cat"].is_string(), "{e}");
                let prev = last_ts.insert(track, ts).unwrap_or(0.0);
                assert!(ts >= prev, "X events out of order on {track:?}: {ts} after {prev}");
                // Spans on one track nest: each starts after its parent starts and ends by
                // the time the parent ends (times are printed to the nanosecond).
                let stack = open.entry(track).or_default();
                while stack.last().is_some_and(|&end| end <= ts) {
                    stack.pop();
                }
                if let Some(&parent_end) = stack.last() {
                    assert!(ts + dur <= parent_end + 0.0015, "{e} overlaps its parent (ends {parent_end})");
                }
                stack.push(ts + dur);
                c.span_cats.entry(track).or_default().insert(e["cat"].as_str().unwrap().into());
                c.span_names.entry(track).or_default().insert(e["name"].as_str().unwrap().into());
                used.insert(track);
            }
            "i" => {
                assert!(num(e, "ts") >= 0.0);
                assert!(["t", "p", "g"].contains(&e["s"].as_str().unwrap_or("")), "{e}");
                assert!(e["args"]["text"].is_string(), "{e}");
                c.instants.push(e.clone());
                used.insert(track);
            }
            other => panic!("unexpected phase {other} in {e}"),
        }
    }
    for t in &used {
        assert!(c.names.contains_key(t), "track {t:?} has no thread_name");
        assert!(processes.contains(&t.0), "process {} has no process_name", t.0);
    }
    // At least one fault span per vCPU.
    for (t, name) in &c.names {
        if name.starts_with("vCPU") {
            assert!(c.span_cats.get(t).is_some_and(|s| s.contains("fault")), "{name} ({t:?}) has no fault span");
        }
    }
    c
}

#[test]
fn function_graph_trace_is_valid_trace_event_json() {
    let v = trace(&["run", "--workload", "first-touch", "--pages", "256", "--trace", "function_graph"], "fg.json");
    let c = validate(&v);
    // The default scenario compares TDP and shadow: one process each, vCPU 0 in both.
    let vcpus: Vec<_> = c.names.iter().filter(|(_, n)| n.as_str() == "vCPU 0").collect();
    assert_eq!(vcpus.len(), 2, "{:?}", c.names);
    let all: BTreeSet<String> = c.span_names.values().flatten().cloned().collect();
    for f in ["kvm_mmu_page_fault", "kvm_tdp_page_fault", "fast_page_fault", "kvm_faultin_pfn", "kvm_tdp_mmu_map"] {
        assert!(all.contains(f), "no {f} span: {all:?}");
    }
    for f in ["paging64_page_fault", "handle_ept_violation", "handle_exception_nmi"] {
        assert!(all.contains(f), "no {f} span: {all:?}");
    }
    let cats: BTreeSet<String> = c.span_cats.values().flatten().cloned().collect();
    assert!(cats.contains("exit") && cats.contains("tlb"), "{cats:?}");
}

#[test]
fn events_trace_has_tracepoints_with_fields_and_spans() {
    let v =
        trace(&["run", "--mmu", "tdp", "--workload", "first-touch", "--pages", "256", "--trace", "events"], "ev.json");
    let c = validate(&v);
    let req: Vec<&Value> = c.instants.iter().filter(|e| e["name"] == "kvm_mmu_spte_requested").collect();
    assert!(req.len() >= 256, "{} kvm_mmu_spte_requested", req.len());
    let a = &req[0]["args"];
    for k in ["gfn", "pfn", "level"] {
        assert!(a[k].as_str().is_some_and(|s| u64::from_str_radix(s, 16).is_ok()), "{k} in {a}");
    }
    assert!(c.instants.iter().any(|e| e["name"] == "kvm_tdp_mmu_spte_changed" && e["args"]["old_spte"].is_string()));
}

#[test]
fn two_vcpus_get_a_track_each_and_host_work_its_own() {
    let v = trace(
        &["run", concat!(env!("CARGO_MANIFEST_DIR"), "/../../scenarios/two-vcpus.toml"), "--trace", "events"],
        "two.json",
    );
    let c = validate(&v);
    let names: BTreeSet<&str> = c.names.values().map(|s| s.as_str()).collect();
    assert!(names.contains("vCPU 0") && names.contains("vCPU 1"), "{names:?}");

    let v = trace(
        &["run", concat!(env!("CARGO_MANIFEST_DIR"), "/../../scenarios/dontneed.toml"), "--trace", "function_graph"],
        "dontneed.json",
    );
    let c = validate(&v);
    let (host, _) = c.names.iter().find(|(_, n)| n.as_str() == "host / VM-wide").expect("a host track");
    let cats = &c.span_cats[host];
    assert!(cats.contains("notifier") && cats.contains("zap") && cats.contains("tlb"), "{cats:?}");
    assert!(c.span_names[host].contains("kvm_mmu_notifier_invalidate_range_start"));
}
