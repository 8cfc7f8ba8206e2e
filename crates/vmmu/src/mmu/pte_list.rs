//! `pte_list`: the list of SPTE pointers behind an rmap head or a shadow page's
//! `parent_ptes` — empty, one pointer, or a chain of descriptors of 14 pointers, new
//! descriptors at the head and every tail descriptor full, as KVM keeps it.

use x86_paging::addr::Hpa;

/// Pointers per descriptor (`PTE_LIST_EXT`).
pub const PTE_LIST_EXT: usize = 14;

/// One descriptor (`struct pte_list_desc`).
#[derive(Debug, Clone)]
pub struct PteListDesc {
    sptes: [Hpa; PTE_LIST_EXT],
    count: usize,
}

/// A list of SPTE addresses (`struct kvm_rmap_head` / `parent_ptes`).
#[derive(Debug, Clone, Default)]
pub enum PteList {
    /// No SPTE.
    #[default]
    Empty,
    /// Exactly one SPTE (KVM stores the pointer itself in the head).
    One(Hpa),
    /// Descriptors; index 0 is the head (the only one that may be partly full).
    Many(Vec<PteListDesc>),
}

impl PteList {
    /// `pte_list_add`: adds `spte`; returns the count before the add.
    pub fn add(&mut self, spte: Hpa) -> usize {
        match self {
            PteList::Empty => {
                *self = PteList::One(spte);
                0
            }
            PteList::One(first) => {
                let mut d = PteListDesc { sptes: [Hpa::new(0); PTE_LIST_EXT], count: 2 };
                d.sptes[0] = *first;
                d.sptes[1] = spte;
                *self = PteList::Many(vec![d]);
                1
            }
            PteList::Many(descs) => {
                let before = self_count(descs);
                if descs[0].count == PTE_LIST_EXT {
                    // The head is full: a new descriptor becomes the head.
                    let mut d = PteListDesc { sptes: [Hpa::new(0); PTE_LIST_EXT], count: 1 };
                    d.sptes[0] = spte;
                    descs.insert(0, d);
                } else {
                    let h = &mut descs[0];
                    h.sptes[h.count] = spte;
                    h.count += 1;
                }
                before
            }
        }
    }

    /// `pte_list_remove`: removes `spte`; returns whether it was there. The hole is filled
    /// with the head's last entry, and an empty head is freed.
    pub fn remove(&mut self, spte: Hpa) -> bool {
        match self {
            PteList::Empty => false,
            PteList::One(x) => {
                if *x == spte {
                    *self = PteList::Empty;
                    true
                } else {
                    false
                }
            }
            PteList::Many(descs) => {
                let Some((di, si)) = descs
                    .iter()
                    .enumerate()
                    .find_map(|(di, d)| d.sptes[..d.count].iter().position(|s| *s == spte).map(|si| (di, si)))
                else {
                    return false;
                };
                let head = &mut descs[0];
                head.count -= 1;
                let last = head.sptes[head.count];
                descs[di].sptes[si] = last;
                if descs[0].count == 0 {
                    descs.remove(0);
                }
                let n = self_count(descs);
                if n == 1 {
                    let only = descs[0].sptes[0];
                    *self = PteList::One(only);
                } else if n == 0 {
                    *self = PteList::Empty;
                }
                true
            }
        }
    }

    /// `pte_list_count`.
    pub fn len(&self) -> usize {
        match self {
            PteList::Empty => 0,
            PteList::One(_) => 1,
            PteList::Many(d) => self_count(d),
        }
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        matches!(self, PteList::Empty)
    }

    /// The SPTE addresses (a copy: callers usually modify the list while walking it).
    pub fn to_vec(&self) -> Vec<Hpa> {
        match self {
            PteList::Empty => Vec::new(),
            PteList::One(x) => vec![*x],
            PteList::Many(d) => d.iter().flat_map(|d| d.sptes[..d.count].iter().copied()).collect(),
        }
    }

    /// Whether `spte` is in the list.
    pub fn contains(&self, spte: Hpa) -> bool {
        match self {
            PteList::Empty => false,
            PteList::One(x) => *x == spte,
            PteList::Many(d) => d.iter().any(|d| d.sptes[..d.count].contains(&spte)),
        }
    }
}

fn self_count(d: &[PteListDesc]) -> usize {
    d.iter().map(|d| d.count).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_remove_keeps_kvm_shape() {
        let mut l = PteList::default();
        for i in 0..40u64 {
            assert_eq!(l.add(Hpa::new(i * 8)), crate::num::usize_of(i));
        }
        assert_eq!(l.len(), 40);
        if let PteList::Many(d) = &l {
            assert_eq!(d.len(), 3);
            assert!(d[1..].iter().all(|d| d.count == PTE_LIST_EXT), "tail descriptors are full");
        } else {
            panic!("{l:?}");
        }
        for i in (0..40u64).rev().step_by(3) {
            assert!(l.remove(Hpa::new(i * 8)));
            assert!(!l.remove(Hpa::new(i * 8)));
        }
        if let PteList::Many(d) = &l {
            assert!(d[1..].iter().all(|d| d.count == PTE_LIST_EXT));
        }
        let mut v = l.to_vec();
        v.sort();
        let want: Vec<Hpa> = (0..40u64).filter(|i| (39 - i) % 3 != 0).map(|i| Hpa::new(i * 8)).collect();
        assert_eq!(v, want);
        for h in want {
            l.remove(h);
        }
        assert!(l.is_empty());
    }
}
