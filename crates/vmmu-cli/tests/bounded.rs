//! Big inputs in bounded time and memory (issue 9, items 2 and 3): a migration of a 1 TiB
//! slot holds only the pages with data, an identity layout over a 1 TiB slot builds page
//! tables only for what the phases touch, KVM's memslot limit, and `--trace events` written
//! as the run goes.

use std::path::PathBuf;
use std::process::Command;

fn vmmu(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmmu")).args(args).output().expect("run vmmu");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(args: &[&str]) -> serde_json::Value {
    let (code, out, err) = vmmu(args);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Writes `text` to a scenario file of its own.
fn scenario(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmmu-bounded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join(format!("{name}.toml"));
    std::fs::write(&f, text).unwrap();
    f
}

#[test]
fn migrating_a_1tib_slot_holds_only_the_pages_with_data() {
    // 1 TiB of guest RAM mapped with 1 GiB guest pages; the guest writes 64 pages before
    // and during the migration.
    let f = scenario(
        "migrate-1tib",
        r#"
name = "migrate-1tib"
[vm]
host_memory = "1GiB"
[[memslot]]
gpa = "0"
size = "1TiB"
[guest]
layout = "identity"
page_size = "1g"
[[phase]]
name = "populate"
ops = [{ op = "write", start = "4GiB", pages = 64 }]
[[phase]]
name = "migrate"
ops = [{ op = "migrate", slot = 0, workload = "random", start = "4GiB", pages = 64, accesses = 200, max_rounds = 3, stop_pages = 0 }]
"#,
    );
    for mmu in ["tdp", "shadow"] {
        let v = json(&["run", f.to_str().unwrap(), "--mmu", mmu, "--json"]);
        let mig = &v["migrations"][0];
        assert_eq!(mig["slot_pages"].as_u64(), Some(1 << 28), "{mmu}");
        let dest = mig["dest_pages"].as_u64().unwrap();
        // The 64 data pages and the guest's page tables (root, PDPTs), nothing else.
        assert!((64..64 + 16).contains(&dest), "{mmu}: destination holds {dest} pages");
        assert_eq!(mig["dest_bytes"].as_u64(), Some(dest * 4096), "{mmu}");
        let rounds = mig["rounds"].as_array().unwrap();
        assert_eq!(rounds[0]["dirty_pages"].as_u64(), Some(1 << 28), "{mmu}: round 0 sends the whole slot");
        assert!(rounds[1]["dirty_pages"].as_u64().unwrap() > 0, "{mmu}");
    }
    let (code, out, err) = vmmu(&["run", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("the copy matches guest memory") && out.contains("destination holds"), "{out}");
}

#[test]
fn trace_events_are_streamed_as_the_run_goes() {
    use std::io::{BufRead, BufReader};
    // A run of some seconds' worth of faults: the trace's first lines arrive on the pipe
    // before the report (which is printed when the run ends), and when the reader goes
    // away the run stops quietly.
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmmu"))
        .args(["run", "--mmu", "tdp", "--workload", "first-touch", "--pages", "200000", "--trace", "events"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "# tracer: nop", "the trace comes first, as the run goes");
    let event = lines.find(|l| l.as_ref().is_ok_and(|l| !l.starts_with('#'))).unwrap().unwrap();
    assert!(event.contains("vcpu-0-1000") && event.contains(": kvm_"), "{event}");
    drop(lines);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn trace_out_file_holds_the_streamed_trace_and_the_report_stays_on_stdout() {
    let dir = std::env::temp_dir().join(format!("vmmu-bounded-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("t.txt");
    let (code, out, err) = vmmu(&[
        "run",
        "--workload",
        "first-touch",
        "--pages",
        "64",
        "--trace",
        "events",
        "--trace-out",
        f.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("pass1") && !out.contains("# tracer"), "{out}");
    let t = std::fs::read_to_string(&f).unwrap();
    assert!(t.starts_with("# tracer: nop\n"), "{t}");
    assert!(t.lines().filter(|l| l.contains("kvm_mmu_spte_requested")).count() >= 64, "{t}");
    // A --trace-out that cannot be created is refused before the run.
    let bad = dir.join("no/such/dir/t.txt");
    let (code, _, err) = vmmu(&["run", "--trace", "events", "--trace-out", bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--trace-out") && err.lines().count() == 1, "{err}");
}

#[test]
fn identity_layout_refuses_page_tables_beyond_its_limit_before_building_them() {
    let text = |page: &str| {
        format!(
            "name = \"identity-1tib\"\n[vm]\nhost_memory = \"1GiB\"\n[[memslot]]\ngpa = \"0\"\nsize = \"1TiB\"\n\
             [guest]\nlayout = \"identity\"\npage_size = \"{page}\"\n[[phase]]\nname = \"p\"\n\
             ops = [{{ op = \"write\", start = \"4GiB\", pages = 16 }}]\n"
        )
    };
    // 4 KiB pages over 1 TiB: 2 GiB of tables, refused up front with the limit named.
    let f = scenario("identity-1tib-4k", &text("4k"));
    let (code, out, err) = vmmu(&["run", f.to_str().unwrap(), "--json"]);
    assert_eq!(code, 2, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    for w in ["memslot[0]", "need 2151690240 bytes of guest page tables", "67108864 bytes (64 MiB)", "guest_page_size"]
    {
        assert!(err.contains(w), "{w} missing from: {err}");
    }
    // 2 MiB pages over the same slot: 1026 tables, built in bounded memory; the guest's
    // tables and its 16 pages are what the host holds.
    let f = scenario("identity-1tib-2m", &text("2m"));
    let v = json(&["run", f.to_str().unwrap(), "--json"]);
    let frames = v["host"]["frames_4k"].as_u64().unwrap() + 512 * v["host"]["frames_2m"].as_u64().unwrap();
    assert!(frames < 1100 + 16 + 512, "host frames: {frames}");
}
