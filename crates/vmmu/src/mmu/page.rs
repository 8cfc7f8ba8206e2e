//! `struct kvm_mmu_page` and the shadow-page cache: the hash of pages by gfn
//! (`mmu_page_hash`, 4096 buckets), `active_mmu_pages` (newest first), and the map from a
//! table's frame back to its page (what `page->private` gives KVM).

use super::pte_list::PteList;
use super::role::Role;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

/// A fast hasher for the MMU's integer keys (gfns, pfns, rmap indices): a multiply-rotate
/// mix, as rustc's FxHash. The default SipHash guards against adversarial keys, which the
/// MMU's own integers are not.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    #[inline]
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }
    #[inline]
    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A `HashMap` with [`FxHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;
use x86_paging::addr::{Gfn, Hpa, Pfn};

/// `KVM_MMU_HASH_SHIFT`.
pub const KVM_MMU_HASH_SHIFT: u32 = 12;

/// A shadow page's name in [`MmuPages`]: its slot and the slot's generation. A slot is reused
/// after its page is freed, with the next generation, so an id kept across a free (a vCPU's
/// root, a page collected before a zap) never names the page that reuses the slot:
/// [`MmuPages::exists`] is false for it and [`MmuPages::get`] refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpId {
    index: u32,
    gen: u32,
}

impl SpId {
    /// An id no page ever has (a marker, e.g. for the set of PAE roots).
    pub const NONE: SpId = SpId { index: u32::MAX, gen: u32::MAX };

    fn slot(self) -> usize {
        self.index as usize
    }
}

impl std::fmt::Display for SpId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sp{}.{}", self.index, self.gen)
    }
}

/// One slot of [`MmuPages`]: the page, and the generation of the id that names it (bumped
/// when the page is freed).
#[derive(Debug, Default)]
struct Slot {
    gen: u32,
    page: Option<ShadowPage>,
}

/// `struct kvm_mmu_page`.
#[derive(Debug)]
pub struct ShadowPage {
    /// The guest table it shadows (indirect) or the first gfn it maps (direct).
    pub gfn: Gfn,
    /// Its role.
    pub role: Role,
    /// The table of 512 SPTEs.
    pub spt: Pfn,
    /// `shadowed_translation`: per SPTE, `gfn << 12 | access` of what it maps (indirect).
    pub shadowed_translation: Option<Box<[u64; 512]>>,
    /// The SPTEs that point to this page.
    pub parent_ptes: PteList,
    /// Out of sync with the guest table (level 1 only).
    pub unsync: bool,
    /// Children with unsync descendants.
    pub unsync_children: u32,
    /// Which SPTEs lead to unsync pages.
    pub unsync_child_bitmap: [u64; 8],
    /// Roots using it.
    pub root_count: u32,
    /// Emulated writes since a fault last used it.
    pub write_flooding_count: u32,
    /// Made by a fault for which huge pages were disallowed (the NX mitigation).
    pub nx_huge_page_disallowed: bool,
    /// `mmu_valid_gen` at creation.
    pub mmu_valid_gen: u64,
    /// Position in `active_mmu_pages`.
    seq: u64,
}

impl ShadowPage {
    /// The table's address.
    pub fn spt_hpa(&self) -> Hpa {
        self.spt.hpa()
    }

    /// Address of SPTE `index`.
    pub fn sptep(&self, index: u64) -> Hpa {
        self.spt.hpa().entry(index)
    }
}

/// All shadow pages of a VM.
#[derive(Debug, Default)]
pub struct MmuPages {
    pages: Vec<Slot>,
    free_slots: Vec<u32>,
    by_spt: FastMap<u64, SpId>,
    hash: FastMap<u64, Vec<SpId>>,
    active: BTreeMap<u64, SpId>,
    next_seq: u64,
}

/// `hash_64(gfn, KVM_MMU_HASH_SHIFT)`: the golden-ratio multiplicative hash.
pub fn kvm_page_table_hashfn(gfn: Gfn) -> u64 {
    gfn.raw().wrapping_mul(0x61C8_8646_80B5_83EB) >> (64 - KVM_MMU_HASH_SHIFT)
}

impl MmuPages {
    /// Adds a page at the head of `active_mmu_pages` and to its hash bucket.
    pub fn insert(&mut self, gfn: Gfn, role: Role, spt: Pfn, gen: u64) -> SpId {
        let seq = self.next_seq;
        self.next_seq += 1;
        let sp = ShadowPage {
            gfn,
            role,
            spt,
            shadowed_translation: if role.direct() == 0 { Some(Box::new([0; 512])) } else { None },
            parent_ptes: PteList::Empty,
            unsync: false,
            unsync_children: 0,
            unsync_child_bitmap: [0; 8],
            root_count: 0,
            write_flooding_count: 0,
            nx_huge_page_disallowed: false,
            mmu_valid_gen: gen,
            seq,
        };
        let id = match self.free_slots.pop() {
            Some(index) => {
                let slot = &mut self.pages[index as usize];
                slot.page = Some(sp);
                SpId { index, gen: slot.gen }
            }
            None => {
                let index = u32::try_from(self.pages.len()).expect("more than 2^32 shadow pages");
                self.pages.push(Slot { gen: 0, page: Some(sp) });
                SpId { index, gen: 0 }
            }
        };
        self.by_spt.insert(spt.raw(), id);
        self.hash.entry(kvm_page_table_hashfn(gfn)).or_default().push(id);
        self.active.insert(seq, id);
        id
    }

    /// Removes a page entirely (`kvm_mmu_free_shadow_page`); returns it.
    pub fn remove(&mut self, id: SpId) -> ShadowPage {
        assert!(self.exists(id), "freeing shadow page {id} twice");
        let slot = &mut self.pages[id.slot()];
        let sp = slot.page.take().expect("checked above");
        // Every id handed out for this page is stale from now on.
        slot.gen = slot.gen.wrapping_add(1);
        self.by_spt.remove(&sp.spt.raw());
        let h = kvm_page_table_hashfn(sp.gfn);
        if let Some(b) = self.hash.get_mut(&h) {
            b.retain(|x| *x != id);
            if b.is_empty() {
                self.hash.remove(&h);
            }
        }
        self.active.remove(&sp.seq);
        self.free_slots.push(id.index);
        sp
    }

    /// Takes a page off `active_mmu_pages` (a zapped root still in use stays allocated).
    pub fn deactivate(&mut self, id: SpId) {
        let seq = self.get(id).seq;
        self.active.remove(&seq);
    }

    /// The page.
    pub fn get(&self, id: SpId) -> &ShadowPage {
        match self.pages.get(id.slot()) {
            Some(Slot { gen, page: Some(p) }) if *gen == id.gen => p,
            _ => panic!("stale shadow page id {id}"),
        }
    }

    /// The page, mutably.
    pub fn get_mut(&mut self, id: SpId) -> &mut ShadowPage {
        match self.pages.get_mut(id.slot()) {
            Some(Slot { gen, page: Some(p) }) if *gen == id.gen => p,
            _ => panic!("stale shadow page id {id}"),
        }
    }

    /// Whether `id` names a live page.
    pub fn exists(&self, id: SpId) -> bool {
        self.pages.get(id.slot()).is_some_and(|s| s.gen == id.gen && s.page.is_some())
    }

    /// `sptep_to_sp`: the page holding the SPTE at `sptep`, and the SPTE's index.
    pub fn sptep_to_sp(&self, sptep: Hpa) -> Option<(SpId, u64)> {
        self.by_spt.get(&sptep.pfn().raw()).map(|id| (*id, sptep.entry_index()))
    }

    /// The page whose table is at `spt`.
    pub fn by_spt(&self, spt: Pfn) -> Option<SpId> {
        self.by_spt.get(&spt.raw()).copied()
    }

    /// The hash bucket of `gfn`.
    pub fn bucket(&self, gfn: Gfn) -> Vec<SpId> {
        self.hash.get(&kvm_page_table_hashfn(gfn)).cloned().unwrap_or_default()
    }

    /// Pages with `gfn` (`for_each_gfn_valid_sp`... the caller filters roles).
    pub fn with_gfn(&self, gfn: Gfn) -> Vec<SpId> {
        self.bucket(gfn).into_iter().filter(|id| self.get(*id).gfn == gfn).collect()
    }

    /// `active_mmu_pages`, oldest first.
    pub fn active_oldest_first(&self) -> Vec<SpId> {
        self.active.values().copied().collect()
    }

    /// Every live page.
    pub fn all(&self) -> Vec<SpId> {
        (0u32..)
            .zip(&self.pages)
            .filter(|(_, s)| s.page.is_some())
            .map(|(index, s)| SpId { index, gen: s.gen })
            .collect()
    }

    /// Number of pages on `active_mmu_pages`.
    pub fn active_len(&self) -> usize {
        self.active.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_id_never_names_the_page_that_reuses_its_slot() {
        let mut p = MmuPages::default();
        let a = p.insert(Gfn::new(1), Role::default(), Pfn::new(10), 0);
        let b = p.insert(Gfn::new(2), Role::default(), Pfn::new(11), 0);
        assert_ne!(a, b);
        assert_eq!(p.remove(a).gfn, Gfn::new(1));
        assert!(!p.exists(a));
        let c = p.insert(Gfn::new(3), Role::default(), Pfn::new(12), 0);
        assert_ne!(c, a, "the slot is reused under a new generation");
        assert!(p.exists(c) && !p.exists(a) && p.exists(b));
        assert_eq!(p.get(c).gfn, Gfn::new(3));
        assert_eq!(p.by_spt(Pfn::new(12)), Some(c));
        assert_eq!(p.sptep_to_sp(Pfn::new(12).hpa().entry(7)), Some((c, 7)));
        let mut all = p.all();
        all.sort();
        let mut want = vec![b, c];
        want.sort();
        assert_eq!(all, want);
        assert!(!p.exists(SpId::NONE));
    }

    #[test]
    #[should_panic(expected = "stale shadow page id")]
    fn reading_through_a_stale_id_panics() {
        let mut p = MmuPages::default();
        let a = p.insert(Gfn::new(1), Role::default(), Pfn::new(10), 0);
        p.remove(a);
        let _reuse = p.insert(Gfn::new(2), Role::default(), Pfn::new(11), 0);
        let _ = p.get(a);
    }
}
