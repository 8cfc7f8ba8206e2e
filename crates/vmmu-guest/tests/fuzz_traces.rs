//! Fuzzing the memory-trace readers (issue 9): vmmu's binary trace format, valgrind
//! lackey's text and ChampSim's binary records. A proptest-driven generator with a bounded
//! number of cases (well under a second in CI): arbitrary bytes, and valid traces mutated
//! (bytes flipped, cut, inserted, headers with extreme counts).
//!
//! The property: reading never panics and ends (every record consumes input), and each
//! input either reads to the end or stops at an error that is one non-empty line.

use proptest::prelude::*;
use proptest::test_runner::Config;
use std::io::Cursor;
use vmmu_guest::replay::champsim::ChampSimReader;
use vmmu_guest::replay::format::{Kind, Record, TraceReader, TraceWriter, HEADER_LEN};
use vmmu_guest::replay::lackey;

fn one_line(what: &str, e: &dyn std::fmt::Display) -> Result<(), TestCaseError> {
    let m = e.to_string();
    prop_assert!(!m.trim().is_empty(), "{}: empty error message", what);
    prop_assert!(!m.contains('\n') && !m.contains('\r'), "{}: multi-line error: {:?}", what, m);
    Ok(())
}

/// Reads a vmmu trace to its end or first error.
fn read_vtrace(bytes: &[u8]) -> Result<(), TestCaseError> {
    let r = match TraceReader::new(Cursor::new(bytes)) {
        Ok(r) => r,
        Err(e) => return one_line("TraceReader::new", &e),
    };
    let _ = r.header_counts().map(|c| vmmu_guest::replay::guest_memory_for(c.distinct_pages));
    let mut n = 0usize;
    for rec in r {
        match rec {
            Ok(rec) => {
                let pages = rec.pages();
                prop_assert!(pages.start() <= pages.end());
                n += 1;
                // Every record takes at least one byte (its tag): the reader ends.
                prop_assert!(n <= bytes.len(), "more records than bytes");
            }
            Err(e) => return one_line("TraceReader", &e),
        }
    }
    Ok(())
}

fn read_lackey(bytes: &[u8]) -> Result<(), TestCaseError> {
    let mut w = TraceWriter::new(Vec::new()).unwrap();
    match lackey::convert(bytes, &mut w, 0, None) {
        Ok(st) => prop_assert!(st.lines <= bytes.len() as u64 + 1),
        Err(e) => one_line("lackey::convert", &e)?,
    }
    Ok(())
}

fn read_champsim(bytes: &[u8]) -> Result<(), TestCaseError> {
    for r in ChampSimReader::new(bytes) {
        if let Err(e) = r {
            return one_line("ChampSimReader", &e);
        }
    }
    Ok(())
}

fn record() -> impl Strategy<Value = Record> {
    (0u8..4, prop_oneof![1u32..=16, 0u32..=1 << 14], prop_oneof![any::<u64>(), 0u64..1 << 47])
        .prop_map(|(k, size, addr)| Record { kind: Kind::from_code(k), size, addr })
}

/// A valid trace: header (with or without counts), records, end marker.
fn vtrace() -> impl Strategy<Value = Vec<u8>> {
    (prop::collection::vec(record(), 0..64), any::<bool>()).prop_map(|(recs, seekable)| {
        let mut w = TraceWriter::new(Cursor::new(Vec::new())).unwrap();
        for r in recs {
            w.write(r).unwrap();
        }
        if seekable {
            w.finish_seekable().unwrap().0.into_inner()
        } else {
            w.finish().unwrap().0.into_inner()
        }
    })
}

/// Mutates `b`: flip a byte, cut, insert bytes, or overwrite a header count with `count`.
fn mutate(mut b: Vec<u8>, how: u8, at: usize, val: u8, count: u64) -> Vec<u8> {
    let at = at % (b.len() + 1);
    match how % 5 {
        0 if at < b.len() => b[at] ^= val | 1,
        1 => b.truncate(at),
        2 => {
            b.splice(at..at, std::iter::repeat_n(val, usize::from(val % 16) + 1));
        }
        3 if b.len() >= HEADER_LEN => {
            b[10] |= 1; // counts valid
            b[16..24].copy_from_slice(&count.to_le_bytes());
        }
        _ if b.len() >= HEADER_LEN => {
            b[10] |= 1;
            b[24..32].copy_from_slice(&count.to_le_bytes());
        }
        _ => {}
    }
    b
}

fn lackey_line() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (prop::sample::select(vec!["I ", " L", " S", " M"]), any::<u64>(), 0u32..64)
            .prop_map(|(k, a, s)| format!("{k} {a:08x},{s}\n")),
        1 => Just("==1234== Command: ./a.out\n".to_string()),
        1 => "[ -~]{0,30}\n".prop_map(String::from),
        1 => "[ILSM ]{1,3}[0-9a-fA-FxX,]{0,20}[0-9]{0,12}\n?".prop_map(String::from),
    ]
}

fn cfg(cases: u32) -> Config {
    Config { cases, ..Config::default() }
}

proptest! {
    #![proptest_config(cfg(1024))]

    #[test]
    fn vtrace_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        read_vtrace(&bytes)?;
        // Behind a valid magic and version, so the records are read too.
        let mut b = b"VMMUTRAC\x01\x00".to_vec();
        b.extend_from_slice(&bytes);
        read_vtrace(&b)?;
    }

    #[test]
    fn vtrace_mutated(t in vtrace(), how in any::<u8>(), at in any::<usize>(), val in any::<u8>(), count in any::<u64>()) {
        read_vtrace(&t)?;
        read_vtrace(&mutate(t, how, at, val, count))?;
    }

    #[test]
    fn lackey_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        read_lackey(&bytes)?;
    }

    #[test]
    fn lackey_near_valid(lines in prop::collection::vec(lackey_line(), 0..40)) {
        read_lackey(lines.concat().as_bytes())?;
    }

    #[test]
    fn champsim_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        read_champsim(&bytes)?;
    }
}

#[test]
fn header_counts_that_overflow_size_nothing() {
    // A header whose distinct-page count overflows the guest-memory calculation.
    assert_eq!(vmmu_guest::replay::guest_memory_for(u64::MAX / 3), None);
    assert_eq!(vmmu_guest::replay::guest_memory_for(0), Some(64 << 20));
    assert_eq!(vmmu_guest::replay::guest_memory_for(1), Some(128 << 20));
    assert_eq!(vmmu_guest::replay::guest_memory_for(8192), Some(128 << 20));
}
