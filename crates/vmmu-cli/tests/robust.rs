//! Nothing crashes, bad input is refused up front (issue 9): output to a closed pipe or a
//! full disk, inputs that must be refused with exit status 2 and the field named, messages a
//! user can act on (one line each), and inputs read with a size cap.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmmu"))
}

/// Runs vmmu; returns (exit status, stdout, stderr).
fn vmmu(args: &[&str]) -> (i32, String, String) {
    let out = bin().args(args).output().expect("run vmmu");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmmu-robust-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn file(dir: &Path, name: &str, text: &str) -> String {
    let f = dir.join(name);
    std::fs::write(&f, text).unwrap();
    f.to_str().unwrap().to_string()
}

/// A small identity-layout scenario whose single phase runs `ops`.
fn identity(ops: &str) -> String {
    format!(
        "name = \"t\"\n[[memslot]]\ngpa = 0\nsize = \"64MiB\"\n[guest]\nlayout = \"identity\"\n\
         [[phase]]\nname = \"p\"\nops = [{ops}]\n"
    )
}

/// A kernel-layout scenario with `processes` processes whose single phase runs `ops`.
fn kernel(processes: u32, ops: &str) -> String {
    format!(
        "name = \"k\"\n[[memslot]]\ngpa = 0\nsize = \"256MiB\"\n[guest]\nlayout = \"kernel\"\nprocesses = {processes}\n\
         [[phase]]\nname = \"p\"\nops = [{ops}]\n"
    )
}

/// Asserts a refusal: exit status 2, nothing on stdout, one line on stderr naming `needle`.
fn refused(args: &[&str], needle: &str) -> String {
    let (code, out, err) = vmmu(args);
    assert_eq!(code, 2, "{args:?}: expected exit status 2:\n{err}");
    assert!(out.is_empty(), "{args:?}: nothing runs, nothing is printed: {out}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: one line:\n{err}");
    assert!(err.contains(needle), "{args:?}: the message names `{needle}`: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// A command to run: (name, args, environment).
type Cmd = (&'static str, Vec<String>, Vec<(&'static str, &'static str)>);

/// The commands that print, each quick.
fn printing_commands(d: &Path) -> Vec<Cmd> {
    let small = file(d, "small.toml", &identity("{ op = \"write\", start = \"32MiB\", pages = 16 }"));
    let compare = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/compare/first-touch.toml");
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        ("default-scenario", s(&["default-scenario"]), vec![]),
        ("run", s(&["run", &small, "--mmu", "tdp"]), vec![]),
        ("run --json", s(&["run", &small, "--json"]), vec![]),
        ("run --trace events", s(&["run", &small, "--mmu", "tdp", "--trace", "events"]), vec![]),
        ("explain", s(&["explain", "0x2000000", &small]), vec![]),
        ("compare", s(&["compare", compare.to_str().unwrap()]), vec![("VMMU_COMPARE_NO_KVM", "1")]),
        ("--help", s(&["run", "--help"]), vec![]),
    ]
}

#[test]
fn a_full_stdout_is_an_error_with_exit_status_1() {
    let d = dir("full");
    let mut cmds = printing_commands(&d);
    cmds.push(("bench", vec!["bench".into(), "--iters".into(), "1".into()], vec![]));
    for (name, args, env) in cmds {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
        let out = bin().args(&args).envs(env).stdout(full).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: exit status 1:\n{err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{name}: one line:\n{err}");
        assert!(
            err.contains("writing to standard output") && err.contains("No space left on device"),
            "{name}: names the write error: {err}"
        );
    }
}

#[test]
fn a_closed_pipe_ends_quietly() {
    let d = dir("pipe");
    for (name, args, env) in printing_commands(&d) {
        // The reader is gone before vmmu writes anything: every write gets EPIPE.
        let (r, w) = std::io::pipe().unwrap();
        drop(r);
        let out = bin().args(&args).envs(env).stdout(w).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{name}: quiet exit status 0:\n{err}");
        assert!(err.is_empty(), "{name}: no message on a closed pipe: {err}");
    }
}

#[test]
fn trace_piped_to_head_ends_quietly() {
    // `vmmu run --trace events | head -1`: the trace (megabytes) is much bigger than the
    // pipe's buffer, so vmmu is still writing when the reader goes away.
    let mut child = bin()
        .args(["run", "--mmu", "tdp", "--workload", "first-touch", "--pages", "4096", "--trace", "events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    // The trace streams as the run goes, ahead of the report.
    assert!(line.starts_with("# tracer: nop"), "{line}");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(101), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.is_empty(), "quietly: {err}");
}

#[test]
fn recording_to_a_closed_pipe_ends_quietly() {
    // `vmmu convert ... -o - | head -c 10`: the trace goes to standard output.
    let d = dir("rec");
    let log: String = (0..200_000).map(|i| format!(" L {:x},8\n", 0x1000_0000u64 + i * 4096)).collect();
    let input = file(&d, "log.txt", &log);
    let (r, w) = std::io::pipe().unwrap();
    drop(r);
    let out = bin().args(["convert", "--from", "lackey", &input, "-o", "-"]).stdout(w).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.is_empty(), "{err}");
}

#[test]
fn host_op_ranges_are_checked_before_the_run() {
    let d = dir("hostops");
    let ops = |o: &str| identity(&format!("{{ op = \"madvise-dontneed\", slot = 0, {o} }}"));
    // offset + size wraps past 2^64: accepted before, and it dropped the slot's first page.
    let wrap = file(&d, "wrap.toml", &ops("offset = \"0x1000\", size = \"0xfffffffffffff000\""));
    let e = refused(&["run", &wrap], "phase[0].ops[0].size");
    assert!(e.contains("past the end of memslot[0]"), "{e}");
    let beyond = file(&d, "beyond.toml", &ops("offset = \"0xfffffffffffff000\", size = \"0x2000\""));
    refused(&["run", &beyond], "phase[0].ops[0].offset");
    let unaligned = file(&d, "unaligned.toml", &ops("offset = \"0x1234\", size = \"0x1000\""));
    let e = refused(&["run", &unaligned], "phase[0].ops[0].offset");
    assert!(e.contains("0x1234") && e.contains("4 KiB"), "{e}");
    assert!(!e.contains("hva") && !e.contains("0x7f"), "the field, not a host address: {e}");
    let size = file(&d, "size.toml", &ops("offset = 0, size = 100"));
    refused(&["run", &size], "phase[0].ops[0].size");
    let empty = file(&d, "empty.toml", &ops("offset = 0, size = 0"));
    refused(&["run", &empty], "phase[0].ops[0].size");
}

#[test]
fn ops_that_cannot_run_are_refused_before_the_run() {
    let d = dir("ops");
    let cases = [
        ("level5.toml", identity("{ op = \"rewrite-entry\", va = \"32MiB\", level = 5 }"), "phase[0].ops[0].level"),
        ("fetch0.toml", identity("{ op = \"fetch\", start = \"32MiB\", pages = 0 }"), "phase[0].ops[0].pages"),
        (
            "wrap.toml",
            identity("{ op = \"write\", start = \"0xfffffffffffff000\", pages = 2 }"),
            "phase[0].ops[0].pages",
        ),
        ("root.toml", identity("{ op = \"new-root\" }, { op = \"switch-root\", root = 2 }"), "phase[0].ops[1].root"),
        ("switch.toml", kernel(2, "{ op = \"switch\", process = 3 }"), "phase[0].ops[0].process"),
        (
            "exited.toml",
            kernel(2, "{ op = \"exit\", process = 2 }, { op = \"switch\", process = 2 }"),
            "phase[0].ops[1].process",
        ),
        ("exit-current.toml", kernel(1, "{ op = \"exit\", process = 1 }"), "phase[0].ops[0].process"),
    ];
    for (name, text, field) in cases {
        let f = file(&d, name, &text);
        refused(&["run", &f], field);
        refused(&["explain", "0x1000", &f], field);
    }
    // A replay op's trace is opened before the first phase runs.
    let missing = file(
        &d,
        "replay.toml",
        &kernel(
            1,
            "{ op = \"write\", start = \"1GiB\", pages = 1 }, { op = \"replay\", trace = \"/nonexistent/t.vtrace\" }",
        ),
    );
    let e = refused(&["run", &missing], "phase[0].ops[1].trace");
    assert!(e.contains("/nonexistent/t.vtrace"), "{e}");
    // A forked child exists; a process made by fork can be switched to.
    let ok = file(&d, "fork.toml", &kernel(1, "{ op = \"fork\" }, { op = \"switch\", process = 2 }"));
    let (code, _, err) = vmmu(&["run", &ok, "--mmu", "tdp"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn flags_that_cannot_work_are_refused() {
    refused(&["run", "--trace-out", "/tmp/never-written.txt"], "--trace-out");
    refused(&["bench", "--iters", "0"], "--iters");
    refused(&["run", "--frobnicate"], "--frobnicate");
}

#[test]
fn unwritable_outputs_are_refused_before_the_run() {
    let d = dir("outputs");
    let not_a_dir = file(&d, "plain-file", "x");
    let under_file = format!("{not_a_dir}/out");
    refused(&["run", "--trace", "events", "--trace-out", &under_file], "--trace-out");
    refused(&["run", "--trace", "events", "--trace-out", d.to_str().unwrap()], "is a directory");
    refused(&["explain", "0x1000", "--svg", &under_file], "--svg");
    refused(&["sweep", "--out", &under_file], "--out");
}

#[test]
fn compare_refuses_regions_beyond_its_page_table_pool() {
    let d = dir("pool");
    // 300 page tables' worth of pages (one per 2 MiB): the real-KVM guest's pool holds 256.
    let text = "name = \"big\"\n[[memslot]]\ngpa = 0\nsize = \"2GiB\"\n\
                [guest]\nlayout = \"identity\"\nuser = true\n\
                [[phase]]\nname = \"p\"\nops = [{ op = \"write\", start = \"1GiB\", pages = 153600 }]\n";
    let f = file(&d, "big.toml", text);
    let out = bin().args(["compare", &f]).env("VMMU_COMPARE_NO_KVM", "1").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(out.stdout.is_empty(), "refused before running vmmu");
    assert!(err.contains("page-table pool") && err.contains("256 pages"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // The shipped comparison still fits.
    let ok = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/compare/first-touch.toml");
    let out = bin().args(["compare", ok.to_str().unwrap()]).env("VMMU_COMPARE_NO_KVM", "1").output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn scenario_input_is_capped() {
    let e = refused(&["run", "/dev/zero"], "16 MiB limit");
    assert!(e.contains("/dev/zero"), "{e}");
    refused(&["explain", "0x1000", "/dev/zero"], "16 MiB limit");
    refused(&["sweep", "--grid", "/dev/zero"], "16 MiB limit");
}

#[test]
fn lackey_input_without_newlines_is_refused() {
    let d = dir("lackey");
    let out = d.join("z.vtrace");
    let (code, _, err) = vmmu(&["convert", "--from", "lackey", "/dev/zero", "-o", out.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("longer than 65536 bytes"), "{err}");
}

#[test]
fn messages_say_what_is_wrong() {
    let d = dir("msgs");
    // `a = ` at the end of the file: the parser gives no text of its own.
    let f = file(&d, "eof.toml", "a = ");
    let e = refused(&["run", &f], "line 1, column 5");
    let problem = e.trim_end().rsplit("column 5:").next().unwrap().trim();
    assert!(problem.contains("ends in the middle"), "a problem, not nothing: {e}");
    // Sizes: what forms a size takes, not serde's "untagged enum Raw".
    for (name, v) in [("neg.toml", "-5"), ("float.toml", "1.5"), ("bool.toml", "true"), ("table.toml", "{ a = 1 }")] {
        let f = file(&d, name, &format!("name = \"x\"\n[[memslot]]\ngpa = 0\nsize = {v}\n"));
        let e = refused(&["run", &f], "line 4");
        assert!(e.contains("64MiB") && e.contains("0x1000") && !e.contains("untagged"), "{e}");
    }
}

#[test]
fn guest_exceptions_read_as_a_kvm_developer_reads_them() {
    let d = dir("pf");
    let f = file(&d, "pf.toml", &identity("{ op = \"read\", start = \"0xffff888000000000\", pages = 1 }"));
    for args in [&["run", &f, "--mmu", "tdp"][..], &["run", &f, "--mmu", "shadow"], &["explain", "0x1000", &f]] {
        let (code, _, err) = vmmu(args);
        assert_eq!(code, 1, "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line:\n{err}");
        assert!(
            err.contains("#PF at 0xffff888000000000, error code 0x0 [not-present read, supervisor]"),
            "{args:?}: {err}"
        );
        assert!(err.contains("phase[0].ops[0] (read in phase \"p\")"), "{err}");
        assert!(err.contains("identity layout"), "in the layout's terms: {err}");
        for bad in ["PageFault {", "PfErrorCode", "segmentation fault", "pid 0"] {
            assert!(!err.contains(bad), "{bad}: {err}");
        }
    }
}

#[test]
fn a_replay_header_too_large_names_the_header_field() {
    let d = dir("replay");
    let mut h = Vec::new();
    h.extend_from_slice(b"VMMUTRAC");
    h.extend_from_slice(&1u16.to_le_bytes()); // version
    h.extend_from_slice(&1u16.to_le_bytes()); // flags: counts valid
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&1u64.to_le_bytes()); // records
    h.extend_from_slice(&(u64::MAX / 3).to_le_bytes()); // distinct pages
    let f = d.join("huge.vtrace");
    std::fs::write(&f, &h).unwrap();
    let e = refused(&["run", "--replay", f.to_str().unwrap()], "distinct-page count");
    assert!(!e.contains("--guest-memory:"), "names no flag that was not given: {e}");
}

#[test]
fn a_trace_out_file_that_fills_up_is_an_error() {
    // The path can be opened (so the check before the run passes); every write then fails.
    let out = bin()
        .args(["run", "--mmu", "tdp", "--workload", "first-touch", "--pages", "64", "--trace", "events"])
        .args(["--trace-out", "/dev/full"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains("--trace-out /dev/full") && err.contains("No space left on device"), "{err}");
}
