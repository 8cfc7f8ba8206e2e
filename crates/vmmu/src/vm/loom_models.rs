//! loom models of the vCPU request handshake (run with `scripts/loom`, which builds with
//! `--cfg vmmu_loom` so that [`crate::sync`] hands out loom's primitives).
//!
//! The property is the one remote TLB flushes and deferred freeing rely on: once
//! [`make_request_and_wait`] returns, no vCPU still uses a translation the request
//! invalidated. The model's vCPU caches a translation to an "old page" in its TLB; the
//! requester retires the translation, flushes, and then reuses the old page (writes a
//! poison value). A vCPU access through the stale TLB entry that could read the poison is
//! a use-after-free, and loom explores every interleaving and every value the memory model
//! allows each load to see.

use super::{make_request_and_wait, mode, req, VcpuShared};
use crate::sync::{thread, Arc, AtomicU64, Ordering};

/// What the old page holds while it is still the vCPU's page, and after its reuse.
const DATA: u64 = 1;
const POISON: u64 = 0xdead;

/// The vCPU: one guest access with the real entry handshake; a pending request is serviced
/// outside guest mode (as `enter_slow` does) before the access runs.
fn vcpu_access(v: &VcpuShared, tlb_valid: &AtomicU64, old_page: &AtomicU64) {
    if v.enter_guest_mode() {
        loop {
            v.mode.store(mode::OUTSIDE_GUEST_MODE, Ordering::SeqCst);
            if v.requests.swap(0, Ordering::AcqRel) & req::TLB_FLUSH != 0 {
                tlb_valid.store(0, Ordering::Relaxed);
            }
            v.mode.store(mode::IN_GUEST_MODE, Ordering::SeqCst);
            if v.requests.load(Ordering::SeqCst) == 0 {
                break;
            }
        }
    }
    if tlb_valid.load(Ordering::Relaxed) == 1 {
        // A TLB hit on the old translation: the page must still be the vCPU's.
        assert_eq!(old_page.load(Ordering::Relaxed), DATA, "vCPU read a page freed after a remote TLB flush");
    }
    v.mode.store(mode::OUTSIDE_GUEST_MODE, Ordering::Release);
}

#[test]
fn remote_flush_waits_for_a_vcpu_in_guest_mode() {
    loom::model(|| {
        let v = Arc::new(VcpuShared { id: 0, ..Default::default() });
        let tlb_valid = Arc::new(AtomicU64::new(1));
        let old_page = Arc::new(AtomicU64::new(DATA));
        let t = {
            let (v, tlb_valid, old_page) = (v.clone(), tlb_valid.clone(), old_page.clone());
            thread::spawn(move || vcpu_access(&v, &tlb_valid, &old_page))
        };
        // The requester (another vCPU or the host): flush, then free and reuse the page.
        make_request_and_wait(std::slice::from_ref(&v), None, req::TLB_FLUSH);
        old_page.store(POISON, Ordering::Relaxed);
        t.join().unwrap();
    });
}

#[test]
fn a_vcpu_that_misses_the_wait_sees_the_request_on_its_next_entry() {
    loom::model(|| {
        let v = Arc::new(VcpuShared { id: 0, ..Default::default() });
        let tlb_valid = Arc::new(AtomicU64::new(1));
        let old_page = Arc::new(AtomicU64::new(DATA));
        let t = {
            let (v, tlb_valid, old_page) = (v.clone(), tlb_valid.clone(), old_page.clone());
            thread::spawn(move || {
                // Two accesses: whichever the flush lands between, neither may read the
                // reused page.
                vcpu_access(&v, &tlb_valid, &old_page);
                vcpu_access(&v, &tlb_valid, &old_page);
            })
        };
        make_request_and_wait(std::slice::from_ref(&v), None, req::TLB_FLUSH);
        old_page.store(POISON, Ordering::Relaxed);
        t.join().unwrap();
    });
}
