//! `vmmu sweep` on a tiny grid: the CSV (header, one row per cell), the JSON Lines, the SVG
//! plots (well-formed XML, one bar per cell or per latency bin and MMU, values matching the
//! data) and index.html (the table and every plot).

use std::collections::BTreeMap;
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

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmmu-sweep-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const GRID: &str = r#"
mmu = ["tdp", "shadow"]
backing = ["4k"]
guest_page = ["4k", "2m"]
ad = ["on"]
workload = ["first-touch", "zipf"]
pages = 48
"#;
const CELLS: usize = 8;
const MMUS: usize = 2;

/// The bars of an SVG plot: (group, series, value).
fn bars(svg: &str) -> Vec<(String, String, f64)> {
    let doc = roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("SVG is not well-formed XML: {e}"));
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc.descendants()
        .filter(|n| n.has_tag_name("rect") && n.attribute("class") == Some("bar"))
        .map(|n| {
            (
                n.attribute("data-group").unwrap().to_string(),
                n.attribute("data-series").unwrap().to_string(),
                n.attribute("data-value").unwrap().parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn tiny_grid_writes_csv_jsonl_plots_and_report() {
    let dir = tempdir("tiny");
    let grid = dir.join("grid.toml");
    std::fs::write(&grid, GRID).unwrap();
    let out = dir.join("out");
    let (code, _, err) =
        vmmu(&["sweep", "--grid", grid.to_str().unwrap(), "--out", out.to_str().unwrap(), "--jobs", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("{CELLS} cells ({CELLS} ok, 0 failed)")), "no summary line: {err}");

    // CSV: the header and one row per cell, every row as wide as the header.
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    for col in [
        "cell",
        "mmu",
        "backing",
        "guest_page",
        "ad",
        "ad_means",
        "workload",
        "pages",
        "status",
        "wall_ns",
        "pf_taken",
        "pf_fixed",
        "exits",
        "tlb_flush",
        "pages_4k",
        "pages_2m",
        "fault_count",
        "fault_p50_ns",
        "pass1_pf_taken",
        "pass2_wall_ns",
    ] {
        assert!(header.contains(&col), "CSV header lacks {col}: {header:?}");
    }
    let rows: Vec<BTreeMap<&str, &str>> = lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), header.len(), "row width: {l}");
            header.iter().copied().zip(f).collect()
        })
        .collect();
    assert_eq!(rows.len(), CELLS);
    for r in &rows {
        assert_eq!(r["status"], "ok");
        assert_eq!(r["pages"], "48");
        let n = |k: &str| r[k].parse::<u64>().unwrap_or_else(|_| panic!("{k} = {:?}", r[k]));
        assert!(n("pf_taken") > 0 && n("pf_taken") == n("pass1_pf_taken") + n("pass2_pf_taken"), "{r:?}");
        assert!(n("fault_count") > 0 && n("fault_count") <= n("exits"), "{r:?}");
        let expect_ad = if r["mmu"] == "shadow" { "guest A/D preset" } else { "eptad=on" };
        assert_eq!(r["ad_means"], expect_ad);
    }
    let sum = |k: &str| rows.iter().map(|r| r[k].parse::<f64>().unwrap()).sum::<f64>();

    // JSON Lines: one object per cell, same cells as the CSV.
    let jsonl = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let objs: Vec<serde_json::Value> =
        jsonl.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert_eq!(objs.len(), CELLS);
    for (o, r) in objs.iter().zip(&rows) {
        assert_eq!(o["cell"], r["cell"]);
        assert_eq!(o["status"], "ok");
        assert_eq!(o["phases"].as_array().unwrap().len(), 2);
        assert_eq!(o["totals"]["pf_taken"].as_u64().unwrap().to_string(), r["pf_taken"]);
        let lat = &o["fault_latency"];
        let in_buckets: u64 = lat["buckets"].as_array().unwrap().iter().map(|b| b["count"].as_u64().unwrap()).sum();
        assert_eq!(in_buckets, lat["count"].as_u64().unwrap());
    }

    // Per-configuration plots: one bar per cell, the values the CSV has.
    for (file, col, scale) in
        [("faults.svg", "pf_taken", 1.0), ("exits.svg", "exits", 1.0), ("time.svg", "wall_ns", 1e6)]
    {
        let b = bars(&std::fs::read_to_string(out.join(file)).unwrap());
        assert_eq!(b.len(), CELLS, "{file}");
        let total: f64 = b.iter().map(|x| x.2).sum();
        assert!((total - sum(col) / scale).abs() <= 1e-6 * total.max(1.0), "{file}: {total} vs {}", sum(col) / scale);
        assert_eq!(b.iter().filter(|x| x.1 == "shadow").count(), CELLS / MMUS, "{file}");
    }

    // The latency histogram: one bar per bin and MMU, bins from the first to the last
    // non-empty bucket of any cell, counts adding up to every fault timed.
    let b = bars(&std::fs::read_to_string(out.join("fault-latency.svg")).unwrap());
    let lows: Vec<u64> = objs
        .iter()
        .flat_map(|o| o["fault_latency"]["buckets"].as_array().unwrap().iter().map(|b| b["lt_ns"].as_u64().unwrap()))
        .collect();
    let bins = (lows.iter().max().unwrap().trailing_zeros() - lows.iter().min().unwrap().trailing_zeros() + 1) as usize;
    assert_eq!(b.len(), bins * MMUS, "latency bars");
    assert_eq!(b.iter().map(|x| x.2).sum::<f64>(), sum("fault_count"));

    // index.html: the table with every cell, and every plot (inline and linked).
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(html.contains("<table class=\"cells\">"));
    for r in &rows {
        assert!(html.contains(&format!("<td class=\"l\">{}</td>", r["cell"])), "{} not in the table", r["cell"]);
    }
    for f in ["faults.svg", "exits.svg", "time.svg", "fault-latency.svg"] {
        assert!(html.contains(&format!("href=\"{f}\"")), "{f} not referenced");
    }
    assert_eq!(html.matches("<svg ").count(), 4);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_grids_are_refused() {
    let dir = tempdir("bad");
    let grid = dir.join("grid.toml");
    std::fs::write(&grid, "mmu = [\"vmx\"]\n").unwrap();
    let (code, _, err) = vmmu(&["sweep", "--grid", grid.to_str().unwrap(), "--out", dir.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("mmu") && err.contains("vmx"), "{err}");
    std::fs::write(&grid, "mmu = [\"tdp\"]\n").unwrap();
    let (code, _, err) = vmmu(&["sweep", "--grid", grid.to_str().unwrap(), "--pages", "0"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--pages"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A grid file that is not TOML of the grid's shape: one line naming the file, where, and the
/// parser's problem once (the TOML error is the error's source, and not printed again).
#[test]
fn a_grid_that_does_not_parse_is_named_once() {
    let dir = tempdir("toml");
    let grid = dir.join("grid.toml");
    std::fs::write(&grid, "pages = \"many\"\n").unwrap();
    let (code, out, err) = vmmu(&["sweep", "--grid", grid.to_str().unwrap(), "--out", dir.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(out.is_empty(), "{out}");
    let prefix = format!("vmmu sweep: {}: line 1, column 9: ", grid.display());
    assert!(err.starts_with(&prefix), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(err.matches("invalid type").count(), 1, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
