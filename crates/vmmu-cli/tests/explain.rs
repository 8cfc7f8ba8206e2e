//! `vmmu explain`: on the default scenario after its first phase, the TDP explanation lists 4
//! guest levels with a 4-level EPT walk each (and one for the final GPA), 24 memory
//! references as x86-paging counts them; the shadow one lists the guest walk and 4 SPTEs in
//! shadow pages; both end at the HPA the vCPU's own translation uses; the SVG is XML.

use std::process::Command;
use vmmu::x86_paging::access::AccessKind;
use vmmu::x86_paging::addr::{Gva, Hpa};
use vmmu_cli::explain::{explain, Dimension, Explanation};
use vmmu_cli::machine::Machine;
use vmmu_cli::runner::{run_to, RunOptions};
use vmmu_cli::scenario::Scenario;
use vmmu_cli::DEFAULT_SCENARIO;

/// The first page pass1 writes (the default scenario's `start = "1GiB"`).
const GVA: u64 = 0x4000_0000;

fn machine(mmu: &str) -> Machine {
    let s = Scenario::parse(DEFAULT_SCENARIO).unwrap();
    run_to(&s, &RunOptions { mmu: Some(mmu.into()), ..Default::default() }, Some("pass1")).unwrap()
}

/// The vCPU's own translation of `GVA` ends at `hpa`: a store through the vCPU lands there.
fn vcpu_translation_lands_at(m: &mut Machine, hpa: u64) {
    const MARK: u64 = 0x5eed_cafe_f00d_beef;
    m.vcpus[0].write(Gva::new(GVA), 8, MARK).unwrap();
    assert_eq!(m.vcpus[0].cpu().mem().load(Hpa::new(hpa)), MARK, "the store did not land at HPA {hpa:#x}");
}

fn check_svg(e: &Explanation) {
    let svg = e.svg("test");
    let doc = roxmltree::Document::parse(&svg).unwrap_or_else(|err| panic!("not XML: {err}\n{svg}"));
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    assert!(doc.descendants().filter(|n| n.has_tag_name("rect")).count() > 5);
}

#[test]
fn tdp_explains_the_2d_walk() {
    let mut m = machine("tdp");
    let e = explain(&m.kvm, &m.vcpus[0], GVA, AccessKind::Read).unwrap();
    assert!(e.failure.is_none(), "{:?}", e.failure);
    assert!(matches!(e.dim, Dimension::Tdp { ept: true, levels: 4, .. }));
    assert_eq!(e.guest.iter().map(|g| g.level).collect::<Vec<_>>(), [4, 3, 2, 1]);
    for g in &e.guest {
        let n = g.nested.as_ref().expect("each guest table access has an EPT walk");
        assert_eq!(n.steps.iter().map(|s| s.level).collect::<Vec<_>>(), [4, 3, 2, 1], "{g:?}");
        assert_eq!(n.gpa, g.table_gpa);
    }
    let f = e.final_nested.as_ref().unwrap();
    assert_eq!(f.steps.len(), 4);
    assert_eq!(Some(f.gpa), e.gpa);
    // 4 x (4 EPT + 1 guest entry) + 4: the cold 2D walk, as walk_2d counts it.
    assert_eq!(e.mem_refs, 24);
    assert_eq!(e.walker_refs, Some(24));
    let text = e.text("test");
    for l in 1..=4 {
        assert!(text.contains(&format!("guest level {l} (")), "{text}");
    }
    assert_eq!(text.lines().filter(|l| l.trim_start().starts_with("EPT level")).count(), 20, "{text}");
    assert!(text.contains("memory references: 24"), "{text}");
    let hpa = e.hpa.unwrap();
    assert!(text.contains(&format!("-> HPA {hpa:#x}")), "{text}");
    check_svg(&e);
    vcpu_translation_lands_at(&mut m, hpa);
}

#[test]
fn shadow_explains_the_guest_and_shadow_walks() {
    let mut m = machine("shadow");
    let e = explain(&m.kvm, &m.vcpus[0], GVA, AccessKind::Read).unwrap();
    assert!(e.failure.is_none(), "{:?}", e.failure);
    assert!(matches!(e.dim, Dimension::Shadow { levels: 4, .. }));
    assert_eq!(e.guest.iter().map(|g| g.level).collect::<Vec<_>>(), [4, 3, 2, 1]);
    assert_eq!(e.shadow.iter().map(|s| s.level).collect::<Vec<_>>(), [4, 3, 2, 1]);
    for (s, g) in e.shadow.iter().zip(&e.guest) {
        let sp = s.sp.expect("every shadow table is a shadow page");
        assert_eq!(sp.role.level(), s.level);
        assert_eq!(sp.role.direct(), 0);
        // Each shadow page shadows the guest table of its level.
        assert_eq!(sp.gfn, g.table_gpa >> 12);
    }
    let hpa = e.hpa.unwrap();
    assert_eq!(e.slot_hpa, Some(hpa), "the SPTE maps what the memslot maps");
    assert_eq!(e.mem_refs, 4);
    let text = e.text("test");
    assert!(text.contains("shadow page: sp gfn"), "{text}");
    assert!(text.contains("agrees with the memslot translation"), "{text}");
    check_svg(&e);
    vcpu_translation_lands_at(&mut m, hpa);
}

#[test]
fn unmapped_address_explains_the_fault() {
    let m = machine("tdp");
    let e = explain(&m.kvm, &m.vcpus[0], 0x7f00_0000, AccessKind::Read).unwrap();
    let f = e.failure.as_deref().expect("a fault");
    assert!(f.contains("P=0"), "{f}");
    assert!(e.hpa.is_none());
}

#[test]
fn cli_writes_text_and_svg() {
    let dir = std::env::temp_dir().join(format!("vmmu-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("walk.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_vmmu"))
        .args(["explain", "0x40000000", "--mmu", "tdp", "--after-phase", "pass1", "--svg"])
        .arg(&svg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("result: GVA 0x40000000 -> GPA"), "{text}");
    roxmltree::Document::parse(&std::fs::read_to_string(&svg).unwrap()).unwrap();
    let bad =
        Command::new(env!("CARGO_BIN_EXE_vmmu")).args(["explain", "0x1000", "--after-phase", "nope"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no phase `nope`"));
    let _ = std::fs::remove_dir_all(&dir);
}
