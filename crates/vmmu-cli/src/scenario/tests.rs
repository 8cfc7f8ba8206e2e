use super::*;

#[test]
fn default_scenario_parses() {
    let s = Scenario::parse(crate::DEFAULT_SCENARIO).unwrap();
    assert!(!s.phases.is_empty());
}

/// Found by tests/fuzz_inputs.rs: a value with a carriage return was echoed into the
/// message, which then spanned two lines.
#[test]
fn echoed_values_keep_errors_on_one_line() {
    let e = Scenario::parse("name = \"x\"\n[guest]\nlayout = \"ke\\rnel\"\n[[memslot]]\ngpa = 0\nsize = \"1GiB\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("`ke\\rnel`") && !e.contains('\r'), "{e:?}");
}

#[test]
fn errors_name_the_field() {
    let e =
        Scenario::parse("name = \"x\"\n[vm]\nmmu = \"hyper\"\n[[memslot]]\ngpa = 0\nsize = \"1GiB\"\n").unwrap_err();
    assert_eq!(e.field, "vm.mmu");
    let e = Scenario::parse("name = \"x\"\n[[memslot]]\ngpa = 0\nsize = \"12 parsecs\"\n").unwrap_err();
    assert!(e.to_string().contains("parsecs"), "{e}");
    assert!(e.field.starts_with("line 4"), "{e}");
    let e = Scenario::parse("name = \"x\"\nbogus = 1\n").unwrap_err();
    assert!(e.problem.contains("bogus"), "{e}");
    let e = Scenario::parse("name = \"x\"\n[[memslot]]\ngpa = 0\nsize = \"1MiB\"\n[[phase]]\nname = \"p\"\nops = [{ op = \"write\", start = 0, pages = 0 }]\n").unwrap_err();
    assert_eq!(e.field, "phase[0].ops[0].pages");
}

#[test]
fn a_toml_error_is_the_source_and_is_named_once() {
    use std::error::Error as _;
    let e = Scenario::parse("name = \"x\"\n[[memslot]]\ngpa = 0\nsize = [1]\n").unwrap_err();
    assert_eq!(e.field, "line 4, column 8");
    let toml = e.source().and_then(|s| s.downcast_ref::<Box<toml::de::Error>>()).expect("the toml::de::Error");
    let shown = e.to_string();
    assert!(shown.starts_with("line 4, column 8: "), "{shown}");
    assert!(shown.contains(toml.message().lines().next().unwrap()), "{shown} / {toml}");
    assert!(!shown.contains('\n'), "{shown:?}");
    // A problem of the scenario's own (not the parser's) has no source.
    let e = Scenario::parse("name = \"x\"\n").unwrap_err();
    assert_eq!(e.field, "memslot");
    assert!(e.source().is_none());
}
