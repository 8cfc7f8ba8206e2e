use super::*;
use crate::sync::AtomicUsize;

fn mm() -> HostMm {
    HostMm::new(Arc::new(FrameAllocator::new(256 << 20).unwrap())).unwrap()
}

#[test]
fn read_maps_zero_page_write_allocates() {
    let mm = mm();
    let hva = mm.mmap(1 << 20, Backing::Anon4k, true, false).unwrap();
    let r = mm.get_user_page(hva, false).unwrap();
    assert_eq!(r.pfn, mm.frames().zero_pfn());
    assert!(!r.writable);
    assert_eq!(mm.read(hva, 8).unwrap(), 0);
    mm.write(hva, 8, 77).unwrap();
    let w = mm.get_user_page(hva, false).unwrap();
    assert!(w.writable);
    assert_ne!(w.pfn, mm.frames().zero_pfn());
    assert_eq!(mm.read(hva, 8).unwrap(), 77);
    assert_eq!(mm.host_mapping_level(hva), 1);
}

#[test]
fn ksm_merges_identical_pages_and_copies_on_write() {
    let mm = mm();
    let hva = mm.mmap(16 << 12, Backing::Anon4k, true, false).unwrap();
    let at = |i: u64| Hva(hva.0 + i * 4096);
    // Pages 0..4 hold 1, pages 4..8 hold 2, page 8 holds 3 (unique), the rest untouched.
    for i in 0..9 {
        mm.write(at(i), 8, [1, 2, 3][(i / 4).min(2) as usize]).unwrap();
    }
    let before = mm.frames().counts().frames_4k;
    assert_eq!(mm.ksm_merge(hva, 16 << 12).unwrap(), 8);
    assert_eq!(mm.ksm_stats(), KsmStats { pages_shared: 2, pages_sharing: 6 });
    assert_eq!(mm.frames().counts().frames_4k, before - 6, "six private frames freed");
    let p0 = mm.get_user_page(at(0), false).unwrap();
    assert!(!p0.writable, "merged pages are mapped read-only");
    assert_eq!(mm.get_user_page(at(3), false).unwrap().pfn, p0.pfn);
    assert!(mm.get_user_page(at(8), false).unwrap().writable, "a unique page stays private");
    assert_eq!(mm.ksm_merge(hva, 16 << 12).unwrap(), 0, "nothing left to merge");
    // A write copies the shared page: the rest of its contents come along.
    mm.write(Hva(at(2).0 + 8), 8, 99).unwrap();
    assert_eq!((mm.read(at(2), 8).unwrap(), mm.read(Hva(at(2).0 + 8), 8).unwrap()), (1, 99));
    assert_eq!(mm.read(Hva(at(1).0 + 8), 8).unwrap(), 0, "the others still share the old contents");
    assert_eq!(mm.ksm_stats(), KsmStats { pages_shared: 2, pages_sharing: 5 });
    // Dropping every mapping frees the shared frames.
    mm.madvise_dontneed(hva, 16 << 12).unwrap();
    assert_eq!(mm.ksm_stats(), KsmStats::default());
    assert_eq!(mm.frames().counts().frames_4k, before - 9);
}

#[test]
fn thp_maps_2m_only_when_aligned_range_fits() {
    let mm = mm();
    let hva = mm.mmap(5 << 20, Backing::Thp, true, false).unwrap();
    mm.write(hva, 1, 1).unwrap();
    assert_eq!(mm.host_mapping_level(hva), 2);
    // The last 1 MiB is not a whole huge page: 4 KiB.
    let tail = Hva(hva.0 + (4 << 20) + 4096);
    mm.write(tail, 1, 1).unwrap();
    assert_eq!(mm.host_mapping_level(tail), 1);
    // Read of an untouched huge range maps the huge zero page.
    let mid = Hva(hva.0 + (2 << 20) + 8192);
    let p = mm.get_user_page(mid, false).unwrap();
    assert!(mm.frames().is_zero_pfn(p.pfn) && p.level == 2 && !p.writable);
}

struct Count(AtomicUsize);
impl MmuNotifier for Count {
    fn invalidate_range_start(&self, _: HvaRange, _: MmuNotifyEvent) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn invalidate_range_end(&self, _: HvaRange, _: MmuNotifyEvent) {}
}

#[test]
fn cow_of_zero_page_and_dontneed_notify() {
    let mm = mm();
    let n = Arc::new(Count(AtomicUsize::new(0)));
    mm.register_notifier(n.clone());
    let hva = mm.mmap(1 << 20, Backing::Anon4k, true, false).unwrap();
    mm.read(hva, 1).unwrap();
    assert_eq!(n.0.load(Ordering::Relaxed), 0);
    mm.write(hva, 1, 5).unwrap();
    assert_eq!(n.0.load(Ordering::Relaxed), 1, "zero-page COW notifies");
    mm.madvise_dontneed(hva, 4096).unwrap();
    assert_eq!(n.0.load(Ordering::Relaxed), 2);
    assert_eq!(mm.read(hva, 1).unwrap(), 0, "reads zeroes after MADV_DONTNEED");
    mm.munmap(hva, 1 << 20).unwrap();
    assert_eq!(mm.get_user_page(hva, false), Err(HostError::BadAddress(hva.0)));
}

#[test]
fn prefault_allocates_everything() {
    let mm = mm();
    let before = mm.frames().counts().frames_4k;
    let hva = mm.mmap(64 * 4096, Backing::Anon4k, true, true).unwrap();
    assert!(mm.frames().counts().frames_4k >= before + 64);
    assert!(mm.get_user_page_fast_only(Hva(hva.0 + 63 * 4096), true).is_some());
    let readonly = mm.mmap(4096, Backing::Anon4k, false, false).unwrap();
    assert_eq!(mm.write(readonly, 1, 1), Err(HostError::ReadOnly(readonly.0)));
}

#[test]
fn resident_pages_are_the_data_pages_only() {
    let mm = mm();
    let len = 1u64 << 40;
    let hva = mm.mmap(len, Backing::Thp, true, false).unwrap();
    assert!(mm.resident_pages(hva, len).is_empty());
    let at = |off: u64| Hva(hva.0 + off);
    mm.write(at(5 << 30), 8, 1).unwrap(); // a THP: 512 pages
    mm.write(at(len - 4096), 8, 2).unwrap(); // the last 2 MiB: a THP too
    mm.read(at(7 << 30), 8).unwrap(); // the huge zero page: no data
    let r = mm.resident_pages(hva, len);
    assert_eq!(r.len(), 1024);
    assert_eq!(r[0], at(5 << 30));
    assert_eq!(r[1023], at(len - 4096));
    assert!(r.windows(2).all(|w| w[0] < w[1]));
    // A sub-range, and swapped-out pages still count.
    assert_eq!(mm.resident_pages(at((5 << 30) + 4096), 8192), vec![at((5 << 30) + 4096), at((5 << 30) + 8192)]);
    assert_eq!(mm.swap_out(at(5 << 30), 2 << 20).unwrap(), 512);
    assert_eq!(mm.resident_pages(hva, len).len(), 1024);
    mm.madvise_dontneed(at(5 << 30), 2 << 20).unwrap();
    assert_eq!(mm.resident_pages(hva, len).len(), 512);
}

#[test]
fn prefault_beyond_host_memory_is_refused_before_allocating() {
    let mm = mm();
    let size = mm.frames().mem().size();
    let before = mm.frames().counts();
    let free = mm.frames().free_bytes();
    for backing in [Backing::Anon4k, Backing::Thp] {
        let e = mm.mmap(size, backing, true, true).unwrap_err();
        let HostError::PrefaultTooBig { len, needed, free: f, size: s } = e.clone() else { panic!("{e}") };
        assert_eq!((len, f, s), (size, free, size));
        assert!(needed > free, "{e}");
        assert!(e.to_string().contains("host_memory"), "{e}");
    }
    assert_eq!(mm.frames().counts(), before, "nothing was allocated");
    assert_eq!(mm.frames().free_bytes(), free);
    // No VMA was left behind, and the same size without prefault maps lazily.
    let hva = mm.mmap(size, Backing::Anon4k, true, false).unwrap();
    assert_eq!(mm.frames().counts(), before);
    mm.write(hva, 8, 7).unwrap();
    let used = free - mm.frames().free_bytes();
    assert!((2 * 4096..=5 * 4096).contains(&used), "one page and its host page tables: {used} bytes");
}
