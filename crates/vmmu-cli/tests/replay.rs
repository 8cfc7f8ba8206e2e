//! Record and replay: real programs' memory traces (valgrind lackey) replayed as a guest
//! process under every MMU, the shipped traces in tests/data, the ChampSim and lackey
//! converters, and the errors a user meets.
//!
//! The shipped traces are made by `records_and_replays_real_programs` (run it with
//! `VMMU_UPDATE_TRACES=1` to write them again); tests that need valgrind say
//! "skipped: valgrind not found" and pass without it.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn vmmu(args: &[&str]) -> (i32, String, String) {
    vmmu_env(args, &[])
}

fn vmmu_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmmu"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run vmmu");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(args: &[&str]) -> Value {
    let (code, out, err) = vmmu(args);
    assert_eq!(code, 0, "vmmu {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn stat(p: &Value, name: &str) -> i64 {
    p["stats"][name].as_i64().unwrap_or_else(|| panic!("no stat {name} in {p}"))
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmmu-replay-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The counts in a trace's header: (records, distinct pages).
fn header(path: &Path) -> (u64, u64) {
    let f = std::fs::File::open(path).unwrap();
    let r = vmmu_guest::replay::TraceReader::new(std::io::BufReader::new(f)).unwrap();
    let c = r.header_counts().expect("a trace written to a file has its counts in the header");
    (c.records, c.distinct_pages)
}

/// Replays `trace` under TDP and shadow (one compare run) and legacy TDP, and checks what
/// must hold whatever the MMU. Returns the runs.
fn replay_and_check(trace: &Path) -> Vec<Value> {
    let (records, pages) = header(trace);
    assert!(records > 0 && pages > 0);
    let t = trace.to_str().unwrap();
    let cmp = json(&["run", "--replay", t, "--json"]);
    let mut runs = cmp["runs"].as_array().expect("tdp and shadow side by side").clone();
    runs.push(json(&["run", "--replay", t, "--mmu", "legacy-tdp", "--json"]));
    let mmus: Vec<&str> = runs.iter().map(|r| r["mmu"].as_str().unwrap()).collect();
    assert_eq!(mmus, ["tdp", "shadow", "legacy-tdp"]);
    for r in &runs {
        let mmu = r["mmu"].as_str().unwrap();
        let phases = r["phases"].as_array().unwrap();
        let reps = r["replays"].as_array().unwrap();
        assert_eq!((phases.len(), reps.len()), (2, 2), "{mmu}");
        for (p, rep) in phases.iter().zip(reps) {
            // One access per trace record, every record replayed.
            assert_eq!(p["accesses"].as_u64(), Some(records), "{mmu} {}", p["name"]);
            assert_eq!(rep["stats"]["records"].as_u64(), Some(records), "{mmu}");
            assert_eq!(rep["stats"]["distinct_pages"].as_u64(), Some(pages), "{mmu}");
            assert_eq!(rep["phase"], p["name"]);
        }
        let (s1, s2) = (&reps[0]["stats"], &reps[1]["stats"]);
        // First pass: one guest #PF per page (demand paging), each page mapped by the MMU
        // at least once; second pass: all resident.
        assert_eq!(s1["guest_page_faults"].as_u64(), Some(pages), "{mmu}");
        assert!(s1["regions_mapped"].as_u64().unwrap() > 0, "{mmu}");
        assert_eq!(s2["guest_page_faults"].as_u64(), Some(0), "{mmu}");
        assert_eq!(s2["regions_mapped"].as_u64(), Some(0), "{mmu}");
        let fixed = stat(&phases[0], "pf_fixed");
        assert!(fixed >= pages as i64, "{mmu}: pass1 pf_fixed {fixed} < {pages} distinct pages");
        assert_eq!(stat(&phases[1], "pf_fixed"), 0, "{mmu}: pass2 maps nothing new");
        if mmu == "shadow" {
            assert_eq!(stat(&phases[0], "pf_guest"), pages as i64, "shadow injects each guest #PF");
        }
    }
    // The guest sees the same memory under every MMU.
    for pass in 0..2 {
        let sums: Vec<&Value> = runs.iter().map(|r| &r["replays"][pass]["stats"]["checksum"]).collect();
        assert!(sums.iter().all(|s| *s == sums[0]), "pass {pass}: checksums differ: {sums:?}");
    }
    runs
}

fn summary_line(runs: &[Value]) -> String {
    runs.iter()
        .map(|r| {
            let p = &r["phases"][0];
            format!(
                "{} pass1 pf_taken {} pf_fixed {} exits {}",
                r["mmu"].as_str().unwrap(),
                stat(p, "pf_taken"),
                stat(p, "pf_fixed"),
                stat(p, "exits")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[test]
fn shipped_traces_replay_consistently_under_every_mmu() {
    for name in ["cc1.vtrace", "sqlite3.vtrace"] {
        let t = data_dir().join(name);
        let runs = replay_and_check(&t);
        eprintln!("{name}: {}", summary_line(&runs));
    }
}

fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").iter().flat_map(std::env::split_paths).map(|d| d.join(prog)).find(|c| c.is_file())
}

/// The real programs recorded: a compiler (gcc's cc1 on a small file, past its first
/// million accesses) and a database (sqlite3 building and querying an indexed table, past
/// its first ten million). Each trace is a 60,000-access window of the run.
fn programs(dir: &Path) -> Vec<(&'static str, Vec<String>, u64)> {
    let mut out = Vec::new();
    let cc1 = Command::new("gcc").arg("-print-prog-name=cc1").output().ok().and_then(|o| {
        let p = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        p.is_file().then_some(p)
    });
    match cc1 {
        Some(cc1) => {
            let src = dir.join("fib.c");
            std::fs::write(
                &src,
                "int printf(const char *, ...);\n\
                 static int fib(int n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }\n\
                 struct point { int x, y; };\n\
                 int main(void) {\n\
                 \x20 struct point p[8];\n\
                 \x20 for (int i = 0; i < 8; i++) { p[i].x = i; p[i].y = fib(i); }\n\
                 \x20 printf(\"%d\\n\", p[7].y);\n\
                 \x20 return 0;\n\
                 }\n",
            )
            .unwrap();
            let args = [cc1.to_str().unwrap(), "-quiet", "-O2", src.to_str().unwrap(), "-o", "/dev/null"];
            out.push(("cc1.vtrace", args.iter().map(|s| s.to_string()).collect(), 1_000_000));
        }
        None => eprintln!("cc1: skipped: gcc's cc1 not found"),
    }
    match which("sqlite3") {
        Some(sq) => {
            let sql = "create table t(x integer primary key, y text); \
                       with recursive c(i) as (select 1 union all select i+1 from c where i < 2000) \
                       insert into t select i, hex(randomblob(16)) from c; \
                       create index ty on t(y); select count(*), sum(x) from t where y > '8';";
            out.push(("sqlite3.vtrace", vec![sq.display().to_string(), ":memory:".into(), sql.into()], 10_000_000));
        }
        None => eprintln!("sqlite3: skipped: sqlite3 not found"),
    }
    out
}

#[test]
fn records_and_replays_real_programs() {
    if !vmmu_cli::record::valgrind_available() {
        eprintln!("skipped: valgrind not found");
        return;
    }
    let dir = tmp_dir("record");
    for (name, prog, skip) in programs(&dir) {
        let out = dir.join(name);
        let mut args = vec!["record", "-o", out.to_str().unwrap(), "--skip", "", "--limit", "60000", "--"];
        let skip = skip.to_string();
        args[4] = &skip;
        args.extend(prog.iter().map(String::as_str));
        let (code, text, err) = vmmu(&args);
        assert_eq!(code, 0, "{err}");
        assert!(text.contains("60000 records"), "{text}");
        assert!(text.contains("stopped at the record limit"), "{text}");
        let size = std::fs::metadata(&out).unwrap().len();
        assert!(size < 300 << 10, "{name}: {size} bytes");
        let (records, pages) = header(&out);
        assert_eq!(records, 60000);
        eprintln!("{name}: {size} bytes, {records} records, {pages} distinct pages");
        let runs = replay_and_check(&out);
        eprintln!("{name}: {}", summary_line(&runs));
        if std::env::var_os("VMMU_UPDATE_TRACES").is_some() {
            std::fs::create_dir_all(data_dir()).unwrap();
            std::fs::copy(&out, data_dir().join(name)).unwrap();
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn record_says_clearly_when_valgrind_is_missing() {
    let (code, _, err) =
        vmmu_env(&["record", "-o", "/dev/null", "--", "/bin/true"], &[("VMMU_VALGRIND", "/nonexistent/valgrind")]);
    assert_eq!(code, 1);
    assert!(err.contains("valgrind not found"), "{err}");
}

#[test]
fn record_of_a_missing_program_fails() {
    if !vmmu_cli::record::valgrind_available() {
        eprintln!("skipped: valgrind not found");
        return;
    }
    let dir = tmp_dir("missing");
    let out = dir.join("x.vtrace");
    let (code, _, err) = vmmu(&["record", "-o", out.to_str().unwrap(), "--", "/nonexistent/program"]);
    assert_eq!(code, 1);
    assert!(err.contains("traced nothing"), "{err}");
    assert!(!out.exists(), "no empty trace left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A lackey log of `pages` pages, one store each 4 KiB from `base`, with a fetch loop.
fn lackey_log(pages: u64, base: u64) -> String {
    let mut s = String::from("==1== Lackey, an example Valgrind tool\n");
    for i in 0..pages {
        s.push_str(&format!("I  {:08x},4\n S {:x},8\n", 0x401000 + (i % 64) * 4, base + i * 4096));
    }
    s.push_str(&format!(" M {base:x},4\n L {:x},32\n", base + 8));
    s
}

#[test]
fn converted_lackey_log_replays_and_guest_memory_is_checked() {
    let dir = tmp_dir("lackey");
    let log = dir.join("log.txt");
    std::fs::write(&log, lackey_log(3000, 0x7f00_0000_0000)).unwrap();
    let t = dir.join("t.vtrace");
    let (code, out, err) = vmmu(&["convert", "--from", "lackey", log.to_str().unwrap(), "-o", t.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("6002 records (I 3000, L 1, S 3000, M 1), 3001 distinct pages"), "{out}");
    replay_and_check(&t);

    // Too little guest memory for 3001 pages: said before the run.
    let (code, _, err) = vmmu(&["run", "--replay", t.to_str().unwrap(), "--guest-memory", "8MiB"]);
    assert_eq!(code, 2);
    assert!(err.contains("touches 3001 distinct pages") && err.contains("more than guest memory (8 MiB)"), "{err}");

    // Streamed to a pipe, the header has no counts: the run finds out when memory runs out.
    let piped = std::process::Command::new(env!("CARGO_BIN_EXE_vmmu"))
        .args(["convert", "--from", "lackey", log.to_str().unwrap(), "-o", "-"])
        .output()
        .unwrap();
    assert!(piped.status.success());
    let p = dir.join("piped.vtrace");
    std::fs::write(&p, &piped.stdout).unwrap();
    let (code, _, err) = vmmu(&["run", "--replay", p.to_str().unwrap(), "--mmu", "tdp", "--guest-memory", "8MiB"]);
    assert_eq!(code, 1);
    assert!(err.contains("guest memory (8 MiB) is full") && err.contains("more distinct pages"), "{err}");
    // ... and with enough memory it runs.
    let (code, out, err) =
        vmmu(&["run", "--replay", p.to_str().unwrap(), "--mmu", "shadow", "--guest-memory", "64MiB"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("6002 records"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn champsim_traces_convert_raw_and_xz() {
    use vmmu_guest::replay::champsim::Instr;
    let dir = tmp_dir("champsim");
    let mut raw = Vec::new();
    for i in 0..500u64 {
        let src = if i % 2 == 0 { [0x10_0000 + i * 4096, 0, 0, 0] } else { [0; 4] };
        let dst = if i % 3 == 0 { [0, 0x7ffe_0000_0000 + (i % 7) * 8] } else { [0; 2] };
        raw.extend_from_slice(&Instr { ip: 0x40_0000 + i * 4, destination_memory: dst, source_memory: src }.encode());
    }
    let f = dir.join("t.champsim");
    std::fs::write(&f, &raw).unwrap();
    let t = dir.join("t.vtrace");
    let (code, out, err) = vmmu(&["convert", "--from", "champsim", f.to_str().unwrap(), "-o", t.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    // 500 fetches, 250 loads, 167 stores.
    assert!(out.contains("917 records (I 500, L 250, S 167, M 0)"), "{out}");
    replay_and_check(&t);
    if which("xz").is_some() {
        let st = Command::new("xz").arg("-k").arg(&f).status().unwrap();
        assert!(st.success());
        let t2 = dir.join("t2.vtrace");
        let xzf = dir.join("t.champsim.xz");
        let (code, _, err) =
            vmmu(&["convert", "--from", "champsim", xzf.to_str().unwrap(), "-o", t2.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(std::fs::read(&t).unwrap(), std::fs::read(&t2).unwrap());
    } else {
        eprintln!("xz part skipped: xz not found");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn replay_errors_are_one_line() {
    let (code, _, err) = vmmu(&["run", "--replay", "/nonexistent.vtrace"]);
    assert_eq!(code, 2);
    assert!(err.contains("--replay: /nonexistent.vtrace"), "{err}");
    let (code, _, err) = vmmu(&["run", "--replay", "Cargo.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("not a vmmu trace"), "{err}");
    let t = data_dir().join("sqlite3.vtrace");
    let (code, _, err) = vmmu(&["run", "--replay", t.to_str().unwrap(), "--workload", "zipf"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot be combined"), "{err}");
}
