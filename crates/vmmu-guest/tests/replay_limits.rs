//! A trace record's access size is bounded: a corrupt size (up to 4 GiB) is refused with a
//! message naming the record, instead of being replayed as half a billion 8-byte accesses.

mod common;

use vmmu::host::Backing;
use vmmu::VmConfig;
use vmmu_guest::kernel::USER_BASE;
use vmmu_guest::replay::{replay, Kind, Record, ReplayError, MAX_ACCESS_BYTES};

#[test]
fn records_wider_than_the_limit_are_refused() {
    let mut g = common::boot(VmConfig::default(), Backing::Anon4k, 1);
    let ok = Record { kind: Kind::Load, size: MAX_ACCESS_BYTES, addr: USER_BASE };
    let st = replay(&mut g.k, &mut g.cpu, [Ok::<_, std::io::Error>(ok)]).unwrap();
    assert_eq!(st.operations, u64::from(MAX_ACCESS_BYTES / 8), "the widest record is replayed in 8-byte pieces");

    let wide = Record { kind: Kind::Store, size: u32::MAX, addr: USER_BASE };
    let recs = [Ok::<_, std::io::Error>(ok), Ok(wide)];
    match replay(&mut g.k, &mut g.cpu, recs) {
        Err(e @ ReplayError::TooWide { record: 1, size: u32::MAX, .. }) => {
            let m = e.to_string();
            assert!(m.starts_with("record 1: an access of 4294967295 bytes") && m.contains("65536-byte limit"), "{m}");
        }
        r => panic!("a 4 GiB access: {r:?}"),
    }
}
