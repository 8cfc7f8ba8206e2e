//! A trace record's access size is bounded: a corrupt size (up to 4 GiB) is refused with a
//! message naming the record, instead of being replayed as half a billion 8-byte accesses.

use std::sync::Arc;
use vmmu::host::{Backing, FrameAllocator, HostMm};
use vmmu::memslot::{MemslotFlags, UserspaceMemoryRegion};
use vmmu::{Kvm, VmConfig};
use vmmu_guest::kernel::{KernelConfig, USER_BASE};
use vmmu_guest::replay::{replay, Kind, Record, ReplayError, MAX_ACCESS_BYTES};
use vmmu_guest::GuestKernel;

#[test]
fn records_wider_than_the_limit_are_refused() {
    const MEM: u64 = 64 << 20;
    let host = Arc::new(HostMm::new(Arc::new(FrameAllocator::new(1 << 30).unwrap())).unwrap());
    let kvm = Kvm::new(VmConfig::default(), host.clone()).unwrap();
    let hva = host.mmap(MEM, Backing::Anon4k, true, false).unwrap();
    let r = UserspaceMemoryRegion {
        slot: 0,
        flags: MemslotFlags::empty(),
        guest_phys_addr: 0,
        memory_size: MEM,
        userspace_addr: hva,
    };
    kvm.set_user_memory_region(r).unwrap();
    let mut cpu = kvm.create_vcpu().unwrap();
    let mut k = GuestKernel::boot(&*kvm, &mut cpu, KernelConfig { mem_size: MEM, ..Default::default() }).unwrap();
    let pid = k.create_process(&mut cpu).unwrap();
    k.switch_to(&mut cpu, pid).unwrap();
    let mut g = (k, cpu);
    let ok = Record { kind: Kind::Load, size: MAX_ACCESS_BYTES, addr: USER_BASE };
    let st = replay(&mut g.0, &mut g.1, [Ok::<_, std::io::Error>(ok)]).unwrap();
    assert_eq!(st.operations, u64::from(MAX_ACCESS_BYTES / 8), "the widest record is replayed in 8-byte pieces");

    let wide = Record { kind: Kind::Store, size: u32::MAX, addr: USER_BASE };
    let recs = [Ok::<_, std::io::Error>(ok), Ok(wide)];
    match replay(&mut g.0, &mut g.1, recs) {
        Err(e @ ReplayError::TooWide { record: 1, size: u32::MAX, .. }) => {
            let m = e.to_string();
            assert!(m.starts_with("record 1: an access of 4294967295 bytes") && m.contains("65536-byte limit"), "{m}");
        }
        r => panic!("a 4 GiB access: {r:?}"),
    }
}
