//! Fuzzing the inputs a user hands the command (issue 9): the scenario parser and its
//! checks, sizes, sweep grids, and the compare translation of the scenarios that parse. A
//! proptest-driven generator with a bounded number of cases (a few seconds in CI): arbitrary
//! bytes, TOML-like text, generated near-valid scenarios, and the shipped scenarios mutated.
//!
//! The property: nothing panics, and every input is either accepted or refused with an error
//! that is one non-empty line. Generated scenarios that are accepted and small are also run
//! (in-process, every MMU the scenario names): they finish or fail with one line. Failures shrink to a minimal input; proptest keeps them in
//! `fuzz_inputs.proptest-regressions` to be re-run first.

use proptest::prelude::*;
use proptest::test_runner::Config;
use vmmu_cli::scenario::Scenario;

/// Asserts the error property: one line, not empty.
fn one_line(what: &str, e: &dyn std::fmt::Display) -> Result<(), TestCaseError> {
    let m = e.to_string();
    prop_assert!(!m.trim().is_empty(), "{}: empty error message", what);
    prop_assert!(!m.contains('\n') && !m.contains('\r'), "{}: multi-line error: {:?}", what, m);
    Ok(())
}

/// Parses `text` as a scenario and checks the property; a scenario that parses is also
/// translated for `vmmu compare` (which must accept or refuse it, never panic).
fn check_scenario(text: &str) -> Result<(), TestCaseError> {
    match Scenario::parse(text) {
        Ok(s) => {
            if let Err(e) = vmmu_cli::compare::translate(&s) {
                one_line("compare::translate", &e)?;
            }
            for v in &s.compare {
                if let Err(e) = s.vm.variant(v) {
                    one_line("variant", &e)?;
                }
            }
        }
        Err(e) => one_line("Scenario::parse", &e)?,
    }
    Ok(())
}

/// The shipped scenarios, as mutation seeds.
fn shipped() -> Vec<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios");
    let mut out = Vec::new();
    for d in [root.clone(), root.join("compare")] {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                out.push(std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    assert!(out.len() >= 10, "the shipped scenarios are found");
    out
}

/// Values at the edges: sizes in every form, wrong types, numbers around the limits.
fn edge_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("1".to_string()),
        Just("-1".to_string()),
        Just("4096".to_string()),
        Just("18446744073709551615".to_string()),
        Just("18446744073709551616".to_string()),
        Just("9223372036854775807".to_string()),
        Just("-9223372036854775808".to_string()),
        Just("1.5".to_string()),
        Just("nan".to_string()),
        Just("inf".to_string()),
        Just("true".to_string()),
        Just("\"\"".to_string()),
        Just("\"0x\"".to_string()),
        Just("\"0xfffffffffffff000\"".to_string()),
        Just("\"0xffffffffffffffff\"".to_string()),
        Just("\"64MiB\"".to_string()),
        Just("\"1TiB\"".to_string()),
        Just("\"99999999999TiB\"".to_string()),
        Just("\"16 parsecs\"".to_string()),
        Just("\"4k\"".to_string()),
        Just("\"2m\"".to_string()),
        Just("\"1g\"".to_string()),
        Just("\"5-level\"".to_string()),
        Just("\"identity\"".to_string()),
        Just("\"kernel\"".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("[1, \"a\"]".to_string()),
        Just("{ a = 1 }".to_string()),
        Just("1979-05-27".to_string()),
        (0u64..=u64::MAX).prop_map(|n| n.to_string()),
        (0u64..=u64::MAX).prop_map(|n| format!("\"{n:#x}\"")),
        (0u64..1 << 20, prop::sample::select(vec!["", "k", "KiB", "M", "MiB", "G", "GiB", "T", "TiB", "B", "x"]))
            .prop_map(|(n, u)| format!("\"{n}{u}\"")),
        (0u32..70).prop_map(|n| n.to_string()),
    ]
}

/// An address: mostly one a scenario would use, sometimes an edge.
fn addr() -> impl Strategy<Value = String> {
    prop_oneof![
        30 => prop::sample::select(vec!["\"32MiB\"", "\"0x2000000\"", "\"1GiB\"", "0x10000", "\"0x7f0000000000\"", "0"])
            .prop_map(String::from),
        1 => edge_value(),
    ]
}

/// A count (pages, iterations, ...): mostly small, sometimes an edge.
fn count() -> impl Strategy<Value = String> {
    prop_oneof![30 => (1u64..64).prop_map(|n| n.to_string()), 1 => edge_value()]
}

/// A small index (slot, process, root, level).
fn index() -> impl Strategy<Value = String> {
    prop_oneof![30 => (0u32..6).prop_map(|n| n.to_string()), 1 => edge_value()]
}

fn workload_name() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["\"first-touch\"", "\"re-touch\"", "\"random\"", "\"zipf\"", "\"sideways\""])
        .prop_map(String::from)
}

/// One scenario op: mostly with the fields its kind takes (values plausible or at the
/// edges), sometimes any kind with any fields.
fn op() -> impl Strategy<Value = String> {
    let f = |k: &'static str, v: BoxedStrategy<String>| v.prop_map(move |v| format!("{k} = {v}")).boxed();
    let opt = |k: &'static str, v: BoxedStrategy<String>| {
        prop::option::of(v).prop_map(move |v| v.map_or(String::new(), |v| format!("{k} = {v}"))).boxed()
    };
    let a = || addr().boxed();
    let c = || count().boxed();
    let i = || index().boxed();
    let w = || workload_name().boxed();
    let kind = |name: &'static str, fields: Vec<BoxedStrategy<String>>| {
        fields.prop_map(move |fs| {
            let mut s = format!("{{ op = \"{name}\"");
            for x in fs.iter().filter(|x| !x.is_empty()) {
                s.push_str(", ");
                s.push_str(x);
            }
            s + " }"
        })
    };
    let typed = prop_oneof![
        prop::sample::select(vec!["write", "read", "fetch", "read-then-write", "munmap"])
            .prop_flat_map(move |n| kind(n, vec![f("start", a()), f("pages", c())])),
        kind(
            "workload",
            vec![f("name", w()), f("start", a()), f("pages", c()), opt("accesses", c()), opt("seed", c())]
        ),
        prop::sample::select(vec!["switch", "exit"]).prop_flat_map(move |n| kind(n, vec![f("process", i())])),
        kind("invlpg", vec![f("addr", a())]),
        prop::sample::select(vec![
            "madvise-dontneed",
            "migrate-pages",
            "swap-out",
            "thp-split",
            "thp-collapse",
            "ksm-merge"
        ])
        .prop_flat_map(move |n| kind(n, vec![f("slot", i()), f("offset", a()), f("size", a())])),
        kind("nx-recovery", vec![opt("passes", c())]),
        kind("set-nr-mmu-pages", vec![f("nr_mmu_pages", c())]),
        prop::sample::select(vec!["dirty-log-start", "dirty-log-stop", "dirty-log-harvest"])
            .prop_flat_map(move |n| kind(n, vec![f("slot", i())])),
        prop::sample::select(vec!["fork", "exec", "new-root", "audit"]).prop_map(|n| format!("{{ op = \"{n}\" }}")),
        kind("process-churn", vec![f("iterations", c()), f("start", a()), f("pages", c())]),
        kind(
            "rewrite-entry",
            vec![f("va", a()), f("level", i()), opt("clear", a()), opt("set", a()), opt("target", a())]
        ),
        kind("switch-root", vec![f("root", i())]),
        kind(
            "migrate",
            vec![
                f("slot", i()),
                f("workload", w()),
                f("start", a()),
                f("pages", c()),
                opt("max_rounds", c()),
                opt("stop_pages", c())
            ]
        ),
        kind(
            "idle-tracking",
            vec![f("slot", i()), f("workload", w()), f("start", a()), f("pages", c()), opt("passes", c())]
        ),
        Just("{ op = \"replay\", trace = \"/nonexistent/t.vtrace\" }".to_string()),
    ];
    let fields = vec![
        "start",
        "pages",
        "slot",
        "offset",
        "size",
        "process",
        "addr",
        "va",
        "level",
        "clear",
        "set",
        "target",
        "root",
        "iterations",
        "passes",
        "max_rounds",
        "stop_pages",
        "accesses",
        "seed",
        "name",
        "workload",
        "trace",
        "nr_mmu_pages",
    ];
    let names =
        vec!["write", "read", "fetch", "workload", "switch", "munmap", "swap-out", "rewrite-entry", "migrate", "bogus"];
    let any_fields = (
        prop::sample::select(names),
        prop::collection::vec((prop::sample::select(fields), prop_oneof![edge_value(), workload_name()]), 0..6),
    )
        .prop_map(|(name, fs)| {
            let mut s = format!("{{ op = \"{name}\"");
            for (f, v) in fs {
                s.push_str(&format!(", {f} = {v}"));
            }
            s + " }"
        });
    prop_oneof![20 => typed, 1 => any_fields]
}

/// A near-valid scenario: every section, with values mostly plausible, some at the edges.
fn scenario() -> impl Strategy<Value = String> {
    let memslot = (edge_value(), edge_value(), prop::sample::select(vec!["\"4k\"", "\"thp\"", "\"huge\""]))
        .prop_map(|(g, s, b)| format!("[[memslot]]\ngpa = {g}\nsize = {s}\nbacking = {b}\n"));
    let good_slot =
        (prop::sample::select(vec!["\"64MiB\"", "\"1GiB\"", "\"2MiB\""]), any::<bool>()).prop_map(|(size, thp)| {
            format!("[[memslot]]\ngpa = 0\nsize = {size}\nbacking = {}\n", if thp { "\"thp\"" } else { "\"4k\"" })
        });
    let second_slot = Just("[[memslot]]\ngpa = \"4GiB\"\nsize = \"64MiB\"\n".to_string());
    let guest = (
        prop_oneof![8 => prop::sample::select(vec!["\"kernel\"", "\"identity\""]), 1 => Just("\"flat\"")],
        prop_oneof![8 => Just("\"4-level\""), 2 => Just("\"5-level\""), 1 => Just("\"2-level\"")],
        prop::sample::select(vec!["\"4k\"", "\"2m\"", "\"1g\""]),
        prop_oneof![8 => Just(1u32), 2 => 0u32..4],
        prop_oneof![8 => 1u32..4, 1 => Just(0u32)],
        any::<bool>(),
    )
        .prop_map(|(l, p, ps, v, n, u)| {
            format!("[guest]\nlayout = {l}\npaging = {p}\npage_size = {ps}\nvcpus = {v}\nprocesses = {n}\nuser = {u}\n")
        });
    let vm = (
        prop_oneof![
            10 => prop::sample::select(vec!["\"tdp\"", "\"shadow\"", "\"legacy-tdp\""]),
            1 => Just("\"x\"")
        ],
        prop_oneof![8 => Just("\"16GiB\"".to_string()), 1 => edge_value()],
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(m, h, ad, pml)| format!("[vm]\nmmu = {m}\nhost_memory = {h}\neptad = {ad}\npml = {pml}\n"));
    let phase =
        (prop_oneof![8 => Just("\"p\""), 1 => Just("\"boot\""), 1 => Just("\"\"")], prop::collection::vec(op(), 0..6))
            .prop_map(|(n, ops)| format!("[[phase]]\nname = {n}\nops = [{}]\n", ops.join(", ")));
    (
        prop::option::of(vm),
        prop_oneof![
            8 => good_slot.prop_map(|s| vec![s]),
            2 => (good_slot_twice(), second_slot).prop_map(|(a, b)| vec![a, b]),
            1 => prop::collection::vec(memslot, 0..3)
        ],
        prop::option::of(guest),
        prop::collection::vec(phase, 0..4),
        prop_oneof![
            8 => Just(None),
            4 => Just(Some("[\"tdp\", \"shadow\"]")),
            1 => prop::sample::select(vec!["[\"tdp pml=maybe\"]", "[\"\"]", "[\"shadow eptad=false\"]"]).prop_map(Some)
        ],
    )
        .prop_map(|(vm, slots, guest, phases, compare)| {
            let mut s = String::from("name = \"fuzz\"\n");
            if let Some(c) = compare {
                s.push_str(&format!("compare = {c}\n"));
            }
            s.push_str(&vm.unwrap_or_default());
            s.push_str(&slots.concat());
            s.push_str(&guest.unwrap_or_default());
            s.push_str(&phases.concat());
            s
        })
}

fn good_slot_twice() -> impl Strategy<Value = String> {
    Just("[[memslot]]\ngpa = 0\nsize = \"1GiB\"\n".to_string())
}

/// A mutation of `text`: cut it, delete a span, insert a token, or duplicate a line.
fn mutate(text: &str, how: u8, at: usize, len: usize, token: &str) -> String {
    let b = text.as_bytes();
    let at = at % (b.len() + 1);
    let end = (at + len).min(b.len());
    let mut out: Vec<u8> = match how % 4 {
        0 => b[..at].to_vec(),
        1 => [&b[..at], &b[end..]].concat(),
        2 => [&b[..at], token.as_bytes(), &b[at..]].concat(),
        _ => {
            let line_start = b[..at].iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1);
            let line_end = b[at..].iter().position(|&c| c == b'\n').map_or(b.len(), |i| at + i + 1);
            [&b[..line_end], &b[line_start..line_end], &b[line_end..]].concat()
        }
    };
    out.truncate(1 << 16);
    String::from_utf8_lossy(&out).into_owned()
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        edge_value(),
        prop::sample::select(vec!["=", "[", "]", "[[", "]]", "{", "}", ",", "\"", "'", "\n", "#", "\\", "\u{0}", "é"])
            .prop_map(String::from),
        "[a-z_]{1,12} = ".prop_map(String::from),
    ]
}

fn cfg(cases: u32) -> Config {
    Config { cases, ..Config::default() }
}

proptest! {
    #![proptest_config(cfg(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_scenario(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn toml_like_text_never_panics(text in "([a-z_\\[\\]{}=,.\"'0-9 \n#-]|phase|memslot|ops|op|size|gpa){0,80}") {
        check_scenario(&text)?;
    }
}

proptest! {
    #![proptest_config(cfg(4096))]

    #[test]
    fn near_valid_scenarios_are_accepted_or_refused_in_one_line(text in scenario()) {
        check_scenario(&text)?;
    }

    #[test]
    fn mutated_near_valid_scenarios_never_panic(
        text in scenario(), how in any::<u8>(), at in any::<usize>(), len in 0usize..40, tok in token(),
    ) {
        check_scenario(&mutate(&text, how, at, len, &tok))?;
    }

    #[test]
    fn mutated_shipped_scenarios_never_panic(
        which in any::<prop::sample::Index>(), how in any::<u8>(), at in any::<usize>(), len in 0usize..40,
        tok in token(),
    ) {
        let seeds = shipped();
        check_scenario(&mutate(which.get(&seeds).as_str(), how, at, len, &tok))?;
    }

    #[test]
    fn sizes_parse_or_say_what_a_size_is(s in "(0x)?[0-9a-fA-FxX_ ]{0,24}[kKmMgGtTiIbB]{0,3}") {
        if let Err(e) = vmmu_cli::size::parse_size(&s) {
            one_line("parse_size", &e)?;
        }
    }

    #[test]
    fn sweep_grids_never_panic(text in "(mmu|backing|guest_page|ad|workload|pages|[\\[\\]=,\" \n]|tdp|4k|true|[0-9]){0,60}") {
        match vmmu_cli::sweep::Grid::parse(&text) {
            Ok(g) => {
                if let Err(e) = g.validate() {
                    one_line("Grid::validate", &e)?;
                }
            }
            Err(e) => one_line("Grid::parse", &e)?,
        }
    }
}

#[test]
fn every_shipped_scenario_still_parses() {
    for s in shipped() {
        Scenario::parse(&s).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A bound on the work a scenario's ops ask for (pages touched, accesses, rounds), so the
/// run fuzz stays within seconds; bigger scenarios are the business of the limits tests.
fn small_enough(s: &Scenario) -> bool {
    use vmmu_cli::scenario::Op;
    let mut work = 0u64;
    for op in s.phases.iter().flat_map(|p| &p.ops) {
        work = work.saturating_add(match op {
            Op::Write { pages, .. }
            | Op::Read { pages, .. }
            | Op::Fetch { pages, .. }
            | Op::ReadThenWrite { pages, .. }
            | Op::Munmap { pages, .. } => *pages,
            Op::Workload { pages, accesses, .. } => pages.saturating_add(accesses.unwrap_or(0)),
            Op::ProcessChurn { iterations, pages, .. } => u64::from(*iterations).saturating_mul(*pages),
            Op::Migrate { pages, accesses, max_rounds, .. } => pages
                .saturating_add(accesses.unwrap_or(0))
                .saturating_mul(u64::from(*max_rounds))
                .saturating_add(1 << 14),
            Op::IdleTracking { pages, accesses, passes, .. } => {
                pages.saturating_add(accesses.unwrap_or(0)).saturating_mul(u64::from(*passes)).saturating_add(1 << 14)
            }
            Op::MadviseDontneed { size, .. }
            | Op::MigratePages { size, .. }
            | Op::SwapOut { size, .. }
            | Op::ThpSplit { size, .. }
            | Op::ThpCollapse { size, .. }
            | Op::KsmMerge { size, .. } => size.0 >> 12,
            Op::NxRecovery { passes } => u64::from(*passes),
            _ => 1,
        });
    }
    let memory: u64 = s.memslots.iter().map(|m| m.size.0).sum();
    work <= 1 << 16 && memory <= 2 << 30 && s.memslots.iter().all(|m| !m.prefault)
}

proptest! {
    #![proptest_config(cfg(200))]

    /// Scenarios that parse also run without a panic: they finish, or fail with one line.
    #[test]
    fn accepted_scenarios_run_or_fail_in_one_line(text in scenario()) {
        if let Ok(s) = Scenario::parse(&text) {
            if small_enough(&s) {
                let opts = vmmu_cli::runner::RunOptions { mmu: Some(s.vm.mmu.clone()), ..Default::default() };
                if let Err(e) = vmmu_cli::runner::run(&s, &opts, |_, _| {}) {
                    one_line("runner::run", &e)?;
                }
            }
        }
    }
}
