//! Dirty logging: KVM_MEM_LOG_DIRTY_PAGES, KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG, the
//! per-vCPU dirty ring (KVM_CAP_DIRTY_LOG_RING) and the page-modification log (PML).
//!
//! KVM finds out that a page was written in one of two ways, chosen by the hardware:
//! - **write protection** (shadow paging, NPT, EPT without A/D or with `pml` off): every
//!   SPTE of a logged slot loses W; the first write to each page faults, fast page fault makes
//!   the SPTE writable again and marks the page dirty; a harvest write-protects what it
//!   reported.
//! - **D bits + PML** (EPT with A/D bits and `kvm_intel.pml`): 4 KiB SPTEs keep W and lose
//!   their D bit; the processor sets D on the next write and appends the page to the vCPU's
//!   page-modification log, which KVM empties into the log on every exit; a harvest clears the
//!   D bits of what it reported. Huge SPTEs are still write-protected, so a write splits them.
//!
//! Marks go to the slot's bitmap, or with a dirty ring to the running vCPU's ring
//! (`mark_page_dirty_in_slot`). Marks made with no vCPU running go to the bitmap, which this
//! model always keeps (KVM's KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP behaviour).

use crate::memslot::{Memslot, MemslotError, Memslots};
use crate::sync::{Arc, AtomicU32, AtomicU64, Mutex, Ordering};
use crate::vm::{mode, req, Kvm, ManualDirtyLog, VcpuShared, VmError};
use x86_paging::addr::Gfn;

/// `KVM_DIRTY_GFN_F_DIRTY`: the entry holds a dirty page for userspace to collect.
pub const KVM_DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// `KVM_DIRTY_GFN_F_RESET`: userspace collected the entry; KVM_RESET_DIRTY_RINGS may
/// re-protect the page and recycle the entry.
pub const KVM_DIRTY_GFN_F_RESET: u32 = 1 << 1;
/// `KVM_DIRTY_RING_RSVD_ENTRIES`: entries kept free past the soft limit, for the marks a
/// vCPU makes between the limit being reached and its exit.
pub const KVM_DIRTY_RING_RSVD_ENTRIES: u32 = 64;
/// The page-modification log's capacity, as ring entries.
const PML_ENTRIES_U32: u32 = {
    assert!(crate::hw::cpu::PML_ENTRIES <= u32::MAX as usize);
    crate::num::low32(crate::hw::cpu::PML_ENTRIES as u64)
};
/// `KVM_DIRTY_RING_MAX_ENTRIES`.
pub const KVM_DIRTY_RING_MAX_ENTRIES: u32 = 65536;
/// `sizeof(struct kvm_dirty_gfn)`: the ring size KVM_CAP_DIRTY_LOG_RING takes is in bytes.
pub const KVM_DIRTY_GFN_SIZE: u32 = 16;

/// One collected dirty page: `struct kvm_dirty_gfn` without its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DirtyGfn {
    /// Memslot id (address space 0).
    pub slot: u32,
    /// Page offset in the memslot.
    pub offset: u64,
}

#[derive(Debug, Default)]
struct RingEntry {
    flags: AtomicU32,
    slot: AtomicU32,
    offset: AtomicU64,
}

/// A vCPU's dirty ring (`struct kvm_dirty_ring` plus the array userspace maps).
///
/// The vCPU pushes entries flagged DIRTY; userspace collects them ([`DirtyRing::collect`],
/// which flags them RESET, as a VMM does on the mmap'ed array) and calls
/// [`Kvm::reset_dirty_rings`], which re-protects the collected pages and recycles the
/// entries. Once `soft_limit` entries are in use the vCPU exits with
/// [`VmError::DirtyRingFull`] before running more guest code, until a reset frees entries.
#[derive(Debug)]
pub struct DirtyRing {
    entries: Box<[RingEntry]>,
    /// Entries pushed (`dirty_index`); written by the vCPU only.
    dirty_index: AtomicU32,
    /// Entries recycled by KVM_RESET_DIRTY_RINGS (`reset_index`).
    reset_index: AtomicU32,
    soft_limit: u32,
    /// Userspace's collection cursor (the VMM's `fetch_index`).
    fetch_index: Mutex<u32>,
    owner: Arc<VcpuShared>,
    /// Marks that found the ring completely full and went to the slot's bitmap instead.
    pub overflows: AtomicU64,
}

impl DirtyRing {
    pub(crate) fn new(entries: u32, reserved: u32, owner: Arc<VcpuShared>) -> Self {
        DirtyRing {
            entries: (0..entries).map(|_| RingEntry::default()).collect(),
            dirty_index: AtomicU32::new(0),
            reset_index: AtomicU32::new(0),
            soft_limit: entries - reserved,
            fetch_index: Mutex::new(0),
            owner,
            overflows: AtomicU64::new(0),
        }
    }

    /// Number of entries.
    pub fn size(&self) -> u32 {
        u32::try_from(self.entries.len()).expect("ring sizes are checked against KVM_DIRTY_RING_MAX_ENTRIES")
    }

    /// Entries pushed and not yet recycled (`kvm_dirty_ring_used`).
    pub fn used(&self) -> u32 {
        self.dirty_index.load(Ordering::Acquire).wrapping_sub(self.reset_index.load(Ordering::Acquire))
    }

    /// `kvm_dirty_ring_soft_full`.
    pub fn soft_full(&self) -> bool {
        self.used() >= self.soft_limit
    }

    fn entry(&self, index: u32) -> &RingEntry {
        &self.entries[(index as usize) & (self.entries.len() - 1)]
    }

    /// The entries pushed and not yet recycled (collected or not), oldest first.
    pub fn pending(&self) -> Vec<DirtyGfn> {
        let (start, end) = (self.reset_index.load(Ordering::Acquire), self.dirty_index.load(Ordering::Acquire));
        let mut out = Vec::with_capacity(end.wrapping_sub(start) as usize);
        let mut i = start;
        while i != end {
            let e = self.entry(i);
            out.push(DirtyGfn { slot: e.slot.load(Ordering::Relaxed), offset: e.offset.load(Ordering::Relaxed) });
            i = i.wrapping_add(1);
        }
        out
    }

    /// `kvm_dirty_ring_push`; false when the ring is completely full (the caller logs the
    /// page in the bitmap instead of losing it).
    fn push(&self, slot: u32, offset: u64) -> bool {
        let index = self.dirty_index.load(Ordering::Relaxed);
        if index.wrapping_sub(self.reset_index.load(Ordering::Acquire)) as usize >= self.entries.len() {
            self.overflows.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let e = self.entry(index);
        e.slot.store(slot, Ordering::Relaxed);
        e.offset.store(offset, Ordering::Relaxed);
        e.flags.store(KVM_DIRTY_GFN_F_DIRTY, Ordering::Release);
        self.dirty_index.store(index.wrapping_add(1), Ordering::Release);
        if self.soft_full() {
            self.owner.requests.fetch_or(req::DIRTY_RING_SOFT_FULL, Ordering::SeqCst);
        }
        true
    }

    /// Userspace's harvest: every entry flagged DIRTY from the collection cursor on, in ring
    /// order, is passed to `f` and flagged RESET. Returns the number collected. Safe to call
    /// from any thread while the vCPU runs.
    pub fn collect(&self, mut f: impl FnMut(DirtyGfn)) -> u32 {
        let mut cursor = self.fetch_index.lock();
        let mut n = 0;
        loop {
            let e = self.entry(*cursor);
            if e.flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                return n;
            }
            f(DirtyGfn { slot: e.slot.load(Ordering::Relaxed), offset: e.offset.load(Ordering::Relaxed) });
            e.flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            *cursor = cursor.wrapping_add(1);
            n += 1;
        }
    }

    /// `kvm_dirty_ring_reset`: recycles the collected entries in order, passing each run of
    /// pages to `protect` as (slot, first page offset, mask of 64 pages), as KVM coalesces
    /// them. Returns the number of entries recycled.
    fn reset(&self, mut protect: impl FnMut(u32, u64, u64)) -> u32 {
        let mut index = self.reset_index.load(Ordering::Acquire);
        let end = self.dirty_index.load(Ordering::Acquire);
        let mut run: Option<(u32, u64, u64)> = None;
        let mut n = 0;
        while index != end {
            let e = self.entry(index);
            if e.flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_RESET == 0 {
                break;
            }
            let (slot, offset) = (e.slot.load(Ordering::Relaxed), e.offset.load(Ordering::Relaxed));
            e.flags.store(0, Ordering::Release);
            index = index.wrapping_add(1);
            n += 1;
            // Coalesce pages within 64 of the run's first page, as KVM does.
            if let Some((s, base, mask)) = run.as_mut() {
                if *s == slot && offset >= *base && offset - *base < 64 {
                    *mask |= 1 << (offset - *base);
                    continue;
                }
                protect(*s, *base, *mask);
            }
            run = Some((slot, offset, 1));
        }
        if let Some((s, base, mask)) = run {
            protect(s, base, mask);
        }
        self.reset_index.store(index, Ordering::Release);
        n
    }
}

/// `mark_page_dirty_in_slot`: logs `gfn` of `slot` in the running vCPU's dirty ring if there
/// is one, else in the slot's bitmap. Does nothing for a slot that is not logging.
#[inline]
pub(crate) fn mark_page_dirty_in_slot(ring: Option<&DirtyRing>, slot: &Memslot, gfn: Gfn) {
    if !slot.dirty_logging() {
        return;
    }
    match ring {
        Some(r) if r.push(slot.id, gfn.raw() - slot.base_gfn.raw()) => {}
        _ => slot.mark_page_dirty(gfn),
    }
}

impl Kvm {
    /// Whether dirty logging uses D bits and the page-modification log rather than write
    /// protection: `kvm_intel.pml` with EPT A/D bits (not under shadow paging, not NPT).
    pub fn pml_in_use(&self) -> bool {
        let c = &self.config;
        c.pml && c.eptad && c.tdp == crate::vm::TdpKind::Ept && self.mmu.tdp_enabled()
    }

    /// `kvm_mmu_update_cpu_dirty_logging`: with PML, counts the logging slots and asks every
    /// vCPU to turn its log on or off (KVM_REQ_UPDATE_CPU_DIRTY_LOGGING).
    pub(crate) fn update_cpu_dirty_logging(&self, enable: bool) {
        if !self.pml_in_use() {
            return;
        }
        if enable {
            self.cpu_dirty_logging_count.fetch_add(1, Ordering::AcqRel);
        } else {
            self.cpu_dirty_logging_count.fetch_sub(1, Ordering::AcqRel);
        }
        self.make_all_cpus_request(req::UPDATE_CPU_DIRTY_LOGGING);
    }

    /// Whether vCPUs should run with the page-modification log on.
    pub(crate) fn cpu_dirty_logging(&self) -> bool {
        self.cpu_dirty_logging_count.load(Ordering::Acquire) > 0
    }

    /// KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): `flags` 0 turns manual protection
    /// off. Takes effect for slots whose logging is turned on afterwards.
    pub fn enable_manual_dirty_log_protect(&self, flags: u64) -> Result<(), VmError> {
        let f = ManualDirtyLog::from_bits(flags).ok_or_else(|| {
            VmError::InvalidConfig(format!(
                "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: unknown flags {:#x} (known: MANUAL_PROTECT_ENABLE = 1, INITIALLY_SET = 2)",
                flags & !ManualDirtyLog::all().bits()
            ))
        })?;
        if f == ManualDirtyLog::INITIALLY_SET {
            return Err(VmError::InvalidConfig(
                "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: INITIALLY_SET needs MANUAL_PROTECT_ENABLE".into(),
            ));
        }
        self.manual_dirty_log.store(f.bits(), Ordering::Release);
        Ok(())
    }

    fn manual_dirty_log(&self) -> ManualDirtyLog {
        ManualDirtyLog::from_bits_truncate(self.manual_dirty_log.load(Ordering::Acquire))
    }

    pub(crate) fn dirty_log_initially_set(&self) -> bool {
        self.manual_dirty_log().contains(ManualDirtyLog::MANUAL_PROTECT_ENABLE | ManualDirtyLog::INITIALLY_SET)
    }

    /// The logging memslot `slot` (for the dirty-log ioctls).
    fn logging_slot(&self, slots: &Memslots, slot: u32) -> Result<Arc<Memslot>, VmError> {
        if self.dirty_ring_size() != 0 {
            return Err(VmError::InvalidConfig(format!(
                "memslot {slot}: KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG are not available with a dirty ring \
                 (collect the vCPUs' rings and call KVM_RESET_DIRTY_RINGS)"
            )));
        }
        let s = slots.by_id(slot).ok_or(VmError::Memslot(MemslotError::NoSuchSlot(slot)))?;
        if !s.dirty_logging() {
            return Err(VmError::InvalidConfig(format!(
                "memslot {slot} does not log dirty pages (KVM_MEM_LOG_DIRTY_PAGES)"
            )));
        }
        Ok(s.clone())
    }

    /// `kvm_arch_sync_dirty_log`: with PML, kicks every vCPU out of guest mode so the pages
    /// in its page-modification log reach the dirty log (a vCPU empties its log on every
    /// exit). Returns once each vCPU that was running guest code has exited.
    pub fn sync_dirty_log(&self) {
        if !self.pml_in_use() {
            return;
        }
        let vcpus = self.vcpus.read().clone();
        for v in &vcpus {
            v.requests.fetch_or(req::KICK, Ordering::SeqCst);
        }
        // As for a remote flush: a vCPU entering guest mode now either sees the kick or is
        // seen in guest mode (vCPUs publish their mode with a light barrier).
        crate::sync::barrier::heavy_barrier();
        for v in &vcpus {
            v.wait_for_request(req::KICK, |m| m == mode::IN_GUEST_MODE);
        }
    }

    /// KVM_GET_DIRTY_LOG: the pages of memslot `slot` written since the last call (one bit
    /// per page, bit i of word i/64 = page i of the slot). Without manual protection the log
    /// is cleared and those pages are re-armed, so their next write is logged
    /// (`kvm_arch_mmu_enable_log_dirty_pt_masked`: write protection, or clearing D bits
    /// under PML); with it, the log is only read and [`Kvm::clear_dirty_log`] does that.
    pub fn get_dirty_log(&self, slot: u32) -> Result<Vec<u64>, VmError> {
        let _f = self.tracer.func(crate::trace::HOST_CPU, "kvm_vm_ioctl_get_dirty_log");
        let slots = self.memslots();
        let s = self.logging_slot(&slots, slot)?;
        self.sync_dirty_log();
        if self.manual_dirty_log().contains(ManualDirtyLog::MANUAL_PROTECT_ENABLE) {
            return Ok(s.read_dirty_bitmap());
        }
        let bitmap = s.take_dirty_bitmap();
        self.rearm_masked(&s, 0, &bitmap);
        // kvm_get_dirty_log_protect flushes when any page was reported, changed SPTE or
        // not (a reported page may be writable in a TLB behind a read-only SPTE).
        if bitmap.iter().any(|&w| w != 0) {
            self.flush_remote_tlbs(None);
        }
        Ok(bitmap)
    }

    /// KVM_CLEAR_DIRTY_LOG: for pages [first_page, first_page + num_pages) of memslot `slot`,
    /// clears the log bits set in `bitmap` (bit i = page first_page + i) and re-arms those
    /// pages. `first_page` must be a multiple of 64, and so must `num_pages` unless the
    /// range ends at the end of the slot.
    pub fn clear_dirty_log(&self, slot: u32, first_page: u64, num_pages: u64, bitmap: &[u64]) -> Result<(), VmError> {
        let _f = self.tracer.func(crate::trace::HOST_CPU, "kvm_vm_ioctl_clear_dirty_log");
        let slots = self.memslots();
        let s = self.logging_slot(&slots, slot)?;
        let bad = |why: String| Err(VmError::InvalidConfig(format!("KVM_CLEAR_DIRTY_LOG on memslot {slot}: {why}")));
        if !first_page.is_multiple_of(64) {
            return bad(format!("first_page {first_page} is not a multiple of 64"));
        }
        let end = first_page.checked_add(num_pages).filter(|&e| e <= s.npages);
        let Some(end) = end else {
            return bad(format!("pages {first_page}+{num_pages} go past the slot's {} pages", s.npages));
        };
        if !num_pages.is_multiple_of(64) && end != s.npages {
            return bad(format!("num_pages {num_pages} is not a multiple of 64 and does not reach the slot's end"));
        }
        let words = crate::num::usize_of(num_pages.div_ceil(64));
        if bitmap.len() < words {
            return bad(format!("the bitmap has {} words, {num_pages} pages need {words}", bitmap.len()));
        }
        let mut mask: Vec<u64> = bitmap[..words].to_vec();
        if !num_pages.is_multiple_of(64) {
            mask[words - 1] &= (1u64 << (num_pages % 64)) - 1;
        }
        self.sync_dirty_log();
        let cleared = s.clear_dirty_bits(first_page / 64, &mask);
        self.rearm_masked(&s, first_page, &cleared);
        // As for KVM_GET_DIRTY_LOG: a flush whenever a log bit was really cleared.
        if cleared.iter().any(|&w| w != 0) {
            self.flush_remote_tlbs(None);
        }
        Ok(())
    }

    /// KVM_CAP_DIRTY_LOG_RING: gives every vCPU a dirty ring of `size_bytes` bytes (16 per
    /// entry), which then replaces KVM_GET_DIRTY_LOG. Must come before the first vCPU.
    pub fn enable_dirty_ring(&self, size_bytes: u32) -> Result<(), VmError> {
        let reserved = self.dirty_ring_reserved();
        let bad = |why: String| Err(VmError::InvalidConfig(format!("KVM_CAP_DIRTY_LOG_RING size {size_bytes}: {why}")));
        if !size_bytes.is_power_of_two() || size_bytes < 4096 {
            return bad("must be a power of two of at least 4096 bytes".into());
        }
        if size_bytes > KVM_DIRTY_RING_MAX_ENTRIES * KVM_DIRTY_GFN_SIZE {
            return bad(format!("at most {} bytes", KVM_DIRTY_RING_MAX_ENTRIES * KVM_DIRTY_GFN_SIZE));
        }
        if size_bytes < reserved * KVM_DIRTY_GFN_SIZE {
            return bad(format!(
                "smaller than the {reserved} reserved entries ({} bytes; PML reserves a full log)",
                reserved * KVM_DIRTY_GFN_SIZE
            ));
        }
        if !self.vcpus.read().is_empty() {
            return bad("must be enabled before any vCPU is created".into());
        }
        if self
            .dirty_ring_entries
            .compare_exchange(0, size_bytes / KVM_DIRTY_GFN_SIZE, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return bad("the dirty ring is already enabled".into());
        }
        Ok(())
    }

    /// Entries per vCPU dirty ring (0 = no dirty ring).
    pub fn dirty_ring_size(&self) -> u32 {
        self.dirty_ring_entries.load(Ordering::Acquire)
    }

    /// `kvm_dirty_ring_get_rsvd_entries`: the slack past the soft limit; a vCPU with PML may
    /// empty a whole log into the ring before it can exit.
    fn dirty_ring_reserved(&self) -> u32 {
        KVM_DIRTY_RING_RSVD_ENTRIES + if self.pml_in_use() { PML_ENTRIES_U32 } else { 0 }
    }

    pub(crate) fn new_dirty_ring(&self, owner: Arc<VcpuShared>) -> Option<Arc<DirtyRing>> {
        let n = self.dirty_ring_size();
        (n != 0).then(|| {
            let r = Arc::new(DirtyRing::new(n, self.dirty_ring_reserved(), owner));
            self.dirty_rings.lock().push(r.clone());
            r
        })
    }

    /// The dirty ring of vCPU `vcpu` (what the VMM mmaps), if rings are enabled.
    pub fn dirty_ring(&self, vcpu: u32) -> Option<Arc<DirtyRing>> {
        self.dirty_rings.lock().iter().find(|r| r.owner.id == vcpu).cloned()
    }

    /// KVM_RESET_DIRTY_RINGS: recycles every collected entry of every vCPU's ring and
    /// re-arms logging for their pages (one TLB flush at the end). Returns the number of
    /// entries recycled.
    pub fn reset_dirty_rings(&self) -> u64 {
        let rings = self.dirty_rings.lock().clone();
        let slots = self.memslots();
        let mut cleared = 0u64;
        for r in rings {
            cleared += u64::from(r.reset(|slot, offset, mask| {
                if let Some(s) = slots.by_id(slot).filter(|s| s.dirty_logging()) {
                    // Pages past a slot that shrank since are ignored, as KVM does.
                    let mask =
                        if offset < s.npages { mask & (u64::MAX >> (64 - (s.npages - offset).min(64))) } else { 0 };
                    self.rearm_masked(s, offset, &[mask]);
                }
            }));
        }
        // kvm_vm_ioctl_reset_dirty_pages flushes whenever an entry was recycled.
        if cleared != 0 {
            self.flush_remote_tlbs(None);
        }
        cleared
    }
}
