//! The vCPU's TLB: combined GVA -> HPA translations tagged by (VPID, PCID), with the
//! rights they were filled with.
//!
//! Two direct-mapped arrays, as a real TLB has separate structures per page size: 4 KiB
//! translations indexed by the page number, and translations of 2 MiB or larger (the
//! combined size: the smaller of the guest page and the host/EPT page) indexed by the 2 MiB
//! frame number. A translation is cached at its combined size, but remembers the *guest*
//! page size: INVLPG of any address in a guest page drops every entry that came from it
//! (a guest 2 MiB page over 4 KiB EPT pages is "fractured" into 4 KiB entries). Flushing more
//! than the architecture requires is always allowed, and this TLB uses that freedom where it
//! keeps the model simple (for example on CR0/CR4/EFER/PKRU writes).

/// Number of 4 KiB entries (a power of two).
pub const TLB_ENTRIES: usize = 4096;
/// Number of large-page entries (a power of two).
pub const TLB_LARGE_ENTRIES: usize = 256;

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
    /// `(gva >> page_shift) + 1`; 0 marks an empty entry.
    pub key: u64,
    /// `vpid << 16 | pcid`.
    pub ctx: u32,
    /// Global page (matches any PCID of its VPID).
    pub global: bool,
    /// log2 of the size this entry translates (12, 21, 22 or 30).
    pub page_shift: u8,
    /// log2 of the guest page it came from (what INVLPG invalidates).
    pub guest_shift: u8,
    /// Host physical address of the start of the translated page.
    pub hpa_page: u64,
    /// Access classes allowed without a page walk (see [`class`]).
    pub allow: u16,
    /// [`Tlb`]'s flush generation when filled: older entries are gone.
    gen: u32,
    /// [`Tlb`]'s non-global flush generation when filled (global entries ignore it).
    gen_ng: u32,
}

impl TlbEntry {
    #[inline]
    fn matches_ctx(&self, ctx: u32) -> bool {
        self.ctx == ctx || (self.global && (self.ctx >> 16) == (ctx >> 16))
    }

    fn vpid(&self) -> u16 {
        (self.ctx >> 16) as u16
    }

    /// Whether the guest page this entry came from contains `gva`.
    fn guest_page_contains(&self, gva: u64) -> bool {
        let va = (self.key - 1) << self.page_shift;
        va >> self.guest_shift == gva >> self.guest_shift
    }
}

/// A translation to cache (see [`Tlb::fill`]): `hpa` is the host address of the translated
/// address itself, valid for the aligned `1 << page_shift` bytes around it; the guest page
/// was `1 << guest_shift` bytes.
#[derive(Clone, Copy, Debug)]
pub struct TlbFill {
    /// `vpid << 16 | pcid`.
    pub ctx: u32,
    /// Global page.
    pub global: bool,
    /// log2 of the size the translation is valid for (the combined page size).
    pub page_shift: u8,
    /// log2 of the guest page size.
    pub guest_shift: u8,
    /// Host physical address of the translated address itself.
    pub hpa: u64,
    /// Access classes allowed.
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
    /// Page walks that started from a paging-structure cache entry.
    pub psc_hits: u64,
}

/// Entries of the paging-structure cache (PDE cache).
pub const PSC_ENTRIES: usize = 256;

/// A PDE-cache entry: for one 2 MiB region of one context, where its page table is and the
/// rights of the levels above (SDM vol. 3, "Paging-Structure Caches"). Never global.
#[derive(Clone, Copy, Debug, Default)]
struct PscEntry {
    /// `(gva >> 21) + 1`; 0 = empty.
    key: u64,
    ctx: u32,
    gen: u32,
    gen_ng: u32,
    psc_gen: u32,
    start: Option<x86_paging::walk::WalkStart>,
}

/// The TLB.
pub struct Tlb {
    entries: Box<[TlbEntry]>,
    large: Box<[TlbEntry]>,
    /// Flushing everything bumps this (O(1), instead of clearing 4,352 entries).
    gen: u32,
    /// Flushing every non-global entry bumps this.
    gen_ng: u32,
    /// Whether any 4 KiB entry came from a larger guest page (INVLPG must then scan).
    fractured: bool,
    /// The paging-structure cache (PDE cache), invalidated with the TLB's non-global
    /// entries, and entirely by INVLPG and single-context flushes (which the SDM allows:
    /// they must invalidate at least the entries of the current PCID).
    psc: Box<[PscEntry]>,
    /// Bumped to drop every PDE-cache entry.
    psc_gen: u32,
    /// Counters.
    pub counters: TlbCounters,
}

impl Default for Tlb {
    fn default() -> Self {
        Self::new()
    }
}

/// The bits of a page number that pick a 4 KiB entry's slot.
const SLOT_MASK: u64 = TLB_ENTRIES as u64 - 1;
/// The bits of a 2 MiB frame number that pick a large entry's slot.
const LARGE_SLOT_MASK: u64 = TLB_LARGE_ENTRIES as u64 - 1;
/// The bits of a PDE-cache key (2 MiB frame number + 1) that pick its slot.
const PSC_SLOT_MASK: u64 = PSC_ENTRIES as u64 - 1;

#[inline]
fn slot(vpn: u64) -> usize {
    (vpn & SLOT_MASK) as usize
}

#[inline]
fn large_slot(gva: u64) -> usize {
    ((gva >> 21) & LARGE_SLOT_MASK) as usize
}

#[inline]
fn psc_slot(key: u64) -> usize {
    (key & PSC_SLOT_MASK) as usize
}

impl Tlb {
    /// An empty TLB.
    pub fn new() -> Self {
        Tlb {
            entries: vec![TlbEntry::default(); TLB_ENTRIES].into_boxed_slice(),
            large: vec![TlbEntry::default(); TLB_LARGE_ENTRIES].into_boxed_slice(),
            gen: 1,
            gen_ng: 1,
            fractured: false,
            psc: vec![PscEntry::default(); PSC_ENTRIES].into_boxed_slice(),
            psc_gen: 1,
            counters: TlbCounters::default(),
        }
    }

    /// The PDE-cache entry for `gva` in context `ctx`, if one survived the flushes.
    #[inline]
    pub fn psc_lookup(&self, gva: u64, ctx: u32) -> Option<x86_paging::walk::WalkStart> {
        let key = (gva >> 21) + 1;
        let e = &self.psc[psc_slot(key)];
        (e.key == key && e.ctx == ctx && e.gen == self.gen && e.gen_ng == self.gen_ng && e.psc_gen == self.psc_gen)
            .then_some(e.start)
            .flatten()
    }

    /// Caches where the walks of `gva`'s 2 MiB region in context `ctx` resume.
    #[inline]
    pub fn psc_fill(&mut self, gva: u64, ctx: u32, start: x86_paging::walk::WalkStart) {
        let key = (gva >> 21) + 1;
        self.psc[psc_slot(key)] =
            PscEntry { key, ctx, gen: self.gen, gen_ng: self.gen_ng, psc_gen: self.psc_gen, start: Some(start) };
    }

    /// Drops every PDE-cache entry.
    fn psc_flush(&mut self) {
        self.psc_gen = self.psc_gen.wrapping_add(1);
        if self.psc_gen == 0 {
            self.psc.fill(PscEntry::default());
            self.psc_gen = 1;
        }
    }

    /// Looks `gva` up in context `ctx`; returns the host physical address if an entry allows
    /// access class `bit`.
    #[inline(always)]
    pub fn lookup(&mut self, gva: u64, ctx: u32, bit: u16) -> Option<u64> {
        let vpn = gva >> 12;
        let e = &self.entries[slot(vpn)];
        if e.key == vpn + 1 && e.matches_ctx(ctx) && e.allow & bit != 0 && self.live(e) {
            self.counters.hits += 1;
            return Some(e.hpa_page | (gva & 0xfff));
        }
        self.lookup_large(gva, ctx, bit)
    }

    #[inline]
    fn lookup_large(&mut self, gva: u64, ctx: u32, bit: u16) -> Option<u64> {
        let e = &self.large[large_slot(gva)];
        if e.key != 0 && e.key == (gva >> e.page_shift) + 1 && e.matches_ctx(ctx) && e.allow & bit != 0 && self.live(e)
        {
            self.counters.hits += 1;
            return Some(e.hpa_page + (gva & ((1u64 << e.page_shift) - 1)));
        }
        self.counters.misses += 1;
        None
    }

    /// Whether `e` survived the flushes since it was filled.
    #[inline]
    fn live(&self, e: &TlbEntry) -> bool {
        e.gen == self.gen && (e.global || e.gen_ng == self.gen_ng)
    }

    /// Caches the translation of `gva` described by `f`.
    #[inline]
    pub fn fill(&mut self, gva: u64, f: TlbFill) {
        let TlbFill { ctx, global, page_shift, guest_shift, hpa, allow } = f;
        let mask = (1u64 << page_shift) - 1;
        let e = TlbEntry {
            key: (gva >> page_shift) + 1,
            ctx,
            global,
            page_shift,
            guest_shift,
            hpa_page: hpa & !mask,
            allow,
            gen: self.gen,
            gen_ng: self.gen_ng,
        };
        if page_shift > 12 {
            self.large[large_slot(gva)] = e;
        } else {
            if guest_shift > 12 {
                self.fractured = true;
            }
            self.entries[slot(gva >> 12)] = e;
        }
    }

    /// Drops everything (INVEPT all-context / INVVPID all-context / VPID disabled).
    pub fn flush_all(&mut self) {
        self.bump_gen();
        self.counters.flushes += 1;
    }

    fn bump_gen(&mut self) {
        self.gen = self.gen.wrapping_add(1);
        if self.gen == 0 {
            // Wrapped: really clear, so no entry of a former epoch comes back.
            self.entries.fill(TlbEntry::default());
            self.large.fill(TlbEntry::default());
            self.psc.fill(PscEntry::default());
            self.gen = 1;
        }
        self.fractured = false;
    }

    fn retain(&mut self, mut keep: impl FnMut(&TlbEntry) -> bool) {
        for e in self.entries.iter_mut().chain(self.large.iter_mut()) {
            if e.key != 0 && !keep(e) {
                *e = TlbEntry::default();
            }
        }
    }

    /// Drops every entry of one VPID (INVVPID single-context, INVEPT of its EPTP).
    pub fn flush_vpid(&mut self, vpid: u16) {
        // A vCPU's TLB holds its own VPID only (each vCPU has its own TLB), so dropping a
        // VPID's entries is dropping everything.
        let _ = vpid;
        self.bump_gen();
        self.counters.flushes += 1;
    }

    /// Drops the entries of one PCID; global entries survive unless `globals` is set.
    pub fn flush_pcid(&mut self, vpid: u16, pcid: u16, globals: bool) {
        let ctx = (u32::from(vpid) << 16) | u32::from(pcid);
        self.retain(|e| !(e.ctx == ctx && (globals || !e.global)));
        self.psc_flush();
        self.counters.flushes += 1;
    }

    /// Drops every non-global entry of a VPID, in all PCIDs (INVPCID all-context without
    /// globals); with `globals`, global entries too.
    pub fn flush_vpid_nonglobal(&mut self, vpid: u16, globals: bool) {
        let _ = vpid;
        if globals {
            self.bump_gen();
        } else {
            self.gen_ng = self.gen_ng.wrapping_add(1);
            if self.gen_ng == 0 {
                self.retain(|e| e.global);
                self.psc.fill(PscEntry::default());
                self.gen_ng = 1;
            }
        }
        self.counters.flushes += 1;
    }

    /// Drops the translations of the guest page containing `gva` (INVLPG / INVPCID
    /// individual): for `pcid` (None = every PCID), always including global entries.
    pub fn flush_addr(&mut self, vpid: u16, pcid: Option<u16>, gva: u64) {
        let hit = |e: &TlbEntry| {
            e.key != 0
                && e.vpid() == vpid
                && (e.global || pcid.is_none_or(|p| (e.ctx & 0xffff) as u16 == p))
                && e.guest_page_contains(gva)
        };
        self.psc_flush();
        let i = slot(gva >> 12);
        if hit(&self.entries[i]) {
            self.entries[i] = TlbEntry::default();
        }
        for e in self.large.iter_mut() {
            if hit(e) {
                *e = TlbEntry::default();
            }
        }
        if self.fractured {
            for e in self.entries.iter_mut() {
                if e.guest_shift > 12 && hit(e) {
                    *e = TlbEntry::default();
                }
            }
        }
    }

    /// Number of valid entries (for tests and reports).
    pub fn len(&self) -> usize {
        self.entries.iter().chain(self.large.iter()).filter(|e| e.key != 0 && self.live(e)).count()
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
        t.fill(
            0x5000,
            TlbFill {
                ctx: 1 << 16 | 3,
                global: false,
                page_shift: 12,
                guest_shift: 12,
                hpa: 0x7000,
                allow: class::ALL,
            },
        );
        assert_eq!(t.lookup(0x5008, 1 << 16 | 3, R), Some(0x7008));
        assert_eq!(t.lookup(0x5000, 1 << 16 | 4, R), None, "other PCID");
        assert_eq!(t.lookup(0x5000, 2 << 16 | 3, R), None, "other VPID");
        t.fill(
            0x6000,
            TlbFill { ctx: 1 << 16 | 3, global: true, page_shift: 12, guest_shift: 12, hpa: 0x8000, allow: R },
        );
        assert_eq!(t.lookup(0x6000, 1 << 16 | 9, R), Some(0x8000), "global matches any PCID");
        assert_eq!(t.lookup(0x6000, 1 << 16 | 9, class::bit(1, 0)), None, "write not allowed");
        t.flush_pcid(1, 3, false);
        assert_eq!(t.lookup(0x5000, 1 << 16 | 3, R), None);
        assert_eq!(t.lookup(0x6000, 1 << 16 | 3, R), Some(0x8000), "globals survive");
    }

    #[test]
    fn large_entries_translate_the_whole_page() {
        let mut t = Tlb::new();
        let ctx = 1 << 16;
        t.fill(
            0x4020_1234,
            TlbFill { ctx, global: false, page_shift: 21, guest_shift: 21, hpa: 0x1_0000_1234, allow: class::ALL },
        );
        assert_eq!(t.lookup(0x4020_0000, ctx, R), Some(0x1_0000_0000));
        assert_eq!(t.lookup(0x403f_fff8, ctx, R), Some(0x1_001f_fff8));
        assert_eq!(t.lookup(0x4040_0000, ctx, R), None);
        t.flush_addr(1, Some(0), 0x4030_0000);
        assert_eq!(t.lookup(0x4020_0000, ctx, R), None, "INVLPG anywhere in the page drops it");
    }

    #[test]
    fn invlpg_drops_all_pieces_of_a_fractured_guest_page() {
        let mut t = Tlb::new();
        let ctx = 1 << 16;
        for i in 0..4u64 {
            t.fill(
                0x20_0000 + i * 4096,
                TlbFill {
                    ctx,
                    global: false,
                    page_shift: 12,
                    guest_shift: 21,
                    hpa: 0x100000 + i * 4096,
                    allow: class::ALL,
                },
            );
        }
        t.fill(
            0x40_0000,
            TlbFill { ctx, global: false, page_shift: 12, guest_shift: 12, hpa: 0x9000, allow: class::ALL },
        );
        t.flush_addr(1, Some(0), 0x20_0000 + 3 * 4096 + 5);
        for i in 0..4u64 {
            assert_eq!(t.lookup(0x20_0000 + i * 4096, ctx, R), None);
        }
        assert_eq!(t.lookup(0x40_0000, ctx, R), Some(0x9000));
    }
}
