//! The vCPU's TLB: combined GVA -> HPA translations tagged by (VPID, PCID), with the
//! permissions they were filled with.
//!
//! Direct-mapped and indexed by the 4 KiB virtual page number. A large page is cached as
//! 4 KiB pieces (splintering, which the architecture allows); each piece remembers its page
//! size so INVLPG of any address in a large page drops every piece of it. Flushing more than
//! the architecture requires is always allowed, and this TLB uses that freedom where it keeps
//! the model simple (for example on CR0/CR4/EFER/PKRU writes).

/// Number of entries (a power of two).
pub const TLB_ENTRIES: usize = 4096;

/// Access classes a TLB entry allows, one bit each: kind (read, write, fetch) x
/// (supervisor with EFLAGS.AC=0, supervisor with AC=1, user).
pub mod class {
    /// Bit index for an access: `kind` 0 read, 1 write, 2 fetch; `mode` 0 supervisor AC=0,
    /// 1 supervisor AC=1, 2 user.
    #[inline]
    pub const fn bit(kind: usize, mode: usize) -> u16 {
        1 << (mode * 3 + kind)
    }
    /// All nine classes.
    pub const ALL: u16 = 0x1ff;
}

/// One cached translation.
#[derive(Clone, Copy, Debug, Default)]
pub struct TlbEntry {
    /// `vpn + 1`; 0 marks an empty entry.
    pub key: u64,
    /// `vpid << 16 | pcid`.
    pub ctx: u32,
    /// Global page (matches any PCID of its VPID).
    pub global: bool,
    /// log2 of the page size the translation came from (12, 21, 22 or 30).
    pub page_shift: u8,
    /// Host physical address of the 4 KiB page.
    pub hpa_page: u64,
    /// Access classes allowed without a page walk (see [`class`]).
    pub allow: u16,
}

/// TLB hit/miss/flush counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TlbCounters {
    /// Lookups that hit.
    pub hits: u64,
    /// Lookups that missed (or hit an entry that did not allow the access).
    pub misses: u64,
    /// Whole-TLB or whole-context flushes.
    pub flushes: u64,
}

/// The TLB.
pub struct Tlb {
    entries: Box<[TlbEntry]>,
    /// Whether any entry came from a page larger than 4 KiB (INVLPG must then scan).
    has_large: bool,
    /// Counters.
    pub counters: TlbCounters,
}

impl Default for Tlb {
    fn default() -> Self {
        Self::new()
    }
}

#[inline]
fn slot(vpn: u64) -> usize {
    (vpn as usize) & (TLB_ENTRIES - 1)
}

impl Tlb {
    /// An empty TLB.
    pub fn new() -> Self {
        Tlb {
            entries: vec![TlbEntry::default(); TLB_ENTRIES].into_boxed_slice(),
            has_large: false,
            counters: TlbCounters::default(),
        }
    }

    /// Looks up `vpn` in context `ctx`; returns the entry if it allows access class `bit`.
    #[inline]
    pub fn lookup(&mut self, vpn: u64, ctx: u32, bit: u16) -> Option<u64> {
        let e = &self.entries[slot(vpn)];
        if e.key == vpn + 1 && (e.ctx == ctx || (e.global && (e.ctx >> 16) == (ctx >> 16))) && e.allow & bit != 0 {
            self.counters.hits += 1;
            Some(e.hpa_page)
        } else {
            self.counters.misses += 1;
            None
        }
    }

    /// Caches a translation.
    #[inline]
    pub fn fill(&mut self, vpn: u64, ctx: u32, global: bool, page_shift: u8, hpa_page: u64, allow: u16) {
        if page_shift > 12 {
            self.has_large = true;
        }
        self.entries[slot(vpn)] = TlbEntry { key: vpn + 1, ctx, global, page_shift, hpa_page, allow };
    }

    /// Drops everything (INVEPT all-context / INVVPID all-context / VPID disabled).
    pub fn flush_all(&mut self) {
        self.entries.fill(TlbEntry::default());
        self.has_large = false;
        self.counters.flushes += 1;
    }

    fn retain(&mut self, mut keep: impl FnMut(&TlbEntry) -> bool) {
        for e in self.entries.iter_mut() {
            if e.key != 0 && !keep(e) {
                *e = TlbEntry::default();
            }
        }
    }

    /// Drops every entry of one VPID (INVVPID single-context, INVEPT of its EPTP).
    pub fn flush_vpid(&mut self, vpid: u16) {
        self.retain(|e| (e.ctx >> 16) as u16 != vpid);
        self.counters.flushes += 1;
    }

    /// Drops the entries of one PCID; global entries survive unless `globals` is set.
    pub fn flush_pcid(&mut self, vpid: u16, pcid: u16, globals: bool) {
        let ctx = (u32::from(vpid) << 16) | u32::from(pcid);
        self.retain(|e| !(e.ctx == ctx && (globals || !e.global)));
        self.counters.flushes += 1;
    }

    /// Drops every non-global entry of a VPID, in all PCIDs (INVPCID all-context without
    /// globals); with `globals`, global entries too.
    pub fn flush_vpid_nonglobal(&mut self, vpid: u16, globals: bool) {
        self.retain(|e| !((e.ctx >> 16) as u16 == vpid && (globals || !e.global)));
        self.counters.flushes += 1;
    }

    /// Drops the translations of the page containing `gva` (INVLPG / INVPCID individual):
    /// for `pcid` (None = every PCID), always including global entries.
    pub fn flush_addr(&mut self, vpid: u16, pcid: Option<u16>, gva: u64) {
        let vpn = gva >> 12;
        let matches_ctx = |e: &TlbEntry| {
            (e.ctx >> 16) as u16 == vpid && (e.global || pcid.is_none_or(|p| (e.ctx & 0xffff) as u16 == p))
        };
        let i = slot(vpn);
        if self.entries[i].key == vpn + 1 && matches_ctx(&self.entries[i]) {
            self.entries[i] = TlbEntry::default();
        }
        if self.has_large {
            self.retain(|e| {
                let shift = u32::from(e.page_shift);
                !(shift > 12 && matches_ctx(e) && ((e.key - 1) << 12) >> shift == gva >> shift)
            });
        }
    }

    /// Number of valid entries (for tests and reports).
    pub fn len(&self) -> usize {
        self.entries.iter().filter(|e| e.key != 0).count()
    }

    /// Whether the TLB holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: u16 = class::bit(0, 0);

    #[test]
    fn hit_miss_and_context_tags() {
        let mut t = Tlb::new();
        t.fill(5, 1 << 16 | 3, false, 12, 0x7000, class::ALL);
        assert_eq!(t.lookup(5, 1 << 16 | 3, R), Some(0x7000));
        assert_eq!(t.lookup(5, 1 << 16 | 4, R), None, "other PCID");
        assert_eq!(t.lookup(5, 2 << 16 | 3, R), None, "other VPID");
        t.fill(6, 1 << 16 | 3, true, 12, 0x8000, R);
        assert_eq!(t.lookup(6, 1 << 16 | 9, R), Some(0x8000), "global matches any PCID");
        assert_eq!(t.lookup(6, 1 << 16 | 9, class::bit(1, 0)), None, "write not allowed");
        t.flush_pcid(1, 3, false);
        assert_eq!(t.lookup(5, 1 << 16 | 3, R), None);
        assert_eq!(t.lookup(6, 1 << 16 | 3, R), Some(0x8000), "globals survive");
    }

    #[test]
    fn invlpg_drops_all_pieces_of_a_large_page() {
        let mut t = Tlb::new();
        let ctx = 1 << 16;
        for i in 0..4u64 {
            t.fill(0x200 + i, ctx, false, 21, 0x100000 + i * 4096, class::ALL);
        }
        t.fill(0x400, ctx, false, 12, 0x9000, class::ALL);
        t.flush_addr(1, Some(0), 0x200 * 4096 + 3 * 4096 + 5);
        for i in 0..4u64 {
            assert_eq!(t.lookup(0x200 + i, ctx, R), None);
        }
        assert_eq!(t.lookup(0x400, ctx, R), Some(0x9000));
    }
}
