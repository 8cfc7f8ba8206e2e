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
