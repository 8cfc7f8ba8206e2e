use super::output::{csv_field, human_ns};
use super::*;

#[test]
fn default_grid_and_cells() {
    let g = Grid::default();
    g.validate().unwrap();
    let cells = g.cells();
    assert_eq!(cells.len(), 96);
    assert_eq!(cells[0].id(), "tdp/4k/4k/ad-on/first-touch");
    for c in &cells {
        c.scenario().validate().unwrap();
        assert!(c.memslot_size() >= 16 * MIB + c.pages * 4096);
    }
    let shadow_off = cells.iter().find(|c| c.mmu == "shadow" && !c.ad).unwrap().scenario();
    assert_eq!(shadow_off.guest.accessed_dirty, "clear");
    let tdp_off = cells.iter().find(|c| c.mmu == "tdp" && !c.ad).unwrap().scenario();
    assert!(!tdp_off.vm.eptad);
}

#[test]
fn grid_files() {
    let g = Grid::parse("mmu = [\"shadow\"]\nad = [\"off\", true]\npages = 8\n").unwrap();
    assert_eq!((g.mmu.len(), g.ad.clone(), g.pages, g.workload.len()), (1, vec![false, true], 8, 4));
    assert!(Grid::parse("mmu = [\"ept\"]").unwrap_err().to_string().contains("mmu"));
    assert!(Grid::parse("colour = [\"red\"]").is_err());
    assert!(Grid::parse("ad = [\"maybe\"]").is_err());
}

#[test]
fn bucket_labels() {
    assert_eq!(human_ns(512), "512 ns");
    assert_eq!(human_ns(1024), "1.02 µs");
    assert_eq!(human_ns(65536), "65.5 µs");
    assert_eq!(human_ns(1 << 20), "1.05 ms");
}

#[test]
fn csv_quotes() {
    assert_eq!(csv_field("a,b"), "\"a,b\"");
    assert_eq!(csv_field("x"), "x");
}

#[test]
fn a_grid_that_is_not_toml_keeps_the_parser_error_as_its_source() {
    use std::error::Error as _;
    let e = Grid::parse("pages = \"many\"\n").unwrap_err();
    let SweepError::Toml { at, problem, .. } = &e else { panic!("not a TOML error: {e:?}") };
    assert_eq!(at, "line 1, column 9");
    assert!(problem.contains("invalid type"), "{problem}");
    let source = e.source().expect("the TOML error is the source");
    let toml = source.downcast_ref::<Box<toml::de::Error>>().expect("a toml::de::Error");
    assert!(toml.message().contains("invalid type"), "{toml}");
    // Printed with `{}` (as `vmmu sweep` prints it), the problem is named once, on one line.
    let shown = e.to_string();
    assert_eq!(shown.matches("invalid type").count(), 1, "{shown}");
    assert!(!shown.contains('\n'), "{shown:?}");
    // A grid the crate itself refuses has no source.
    assert!(Grid::parse("mmu = [\"ept\"]").unwrap_err().source().is_none());
}

#[test]
fn a_cell_that_cannot_run_keeps_why() {
    use std::error::Error as _;
    let mut c = Grid::default().cells().remove(0);
    c.mmu = "ept".into();
    let r = run_cell(&c);
    let e = r.run.as_ref().expect_err("an invalid MMU cannot run");
    assert!(matches!(e, CellError::Scenario(_)), "{e:?}");
    let s = e.source().and_then(|s| s.downcast_ref::<crate::scenario::ScenarioError>()).expect("the ScenarioError");
    assert_eq!(s.field, "vm.mmu");
    assert_eq!(e.to_string(), format!("generated scenario: {s}"));
}
