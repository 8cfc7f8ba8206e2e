//! Statistics with KVM's exact names, split as KVM splits them into VM-wide counters
//! (`struct kvm_vm_stat`, updated from any thread) and per-vCPU counters
//! (`struct kvm_vcpu_stat`, updated only by the vCPU's own thread).

use crate::sync::percpu::PercpuCounter;
use crate::sync::{AtomicU64, Ordering};
use std::collections::BTreeMap;

macro_rules! vm_stats {
    (counters { $($(#[$doc:meta])* $name:ident),* $(,)? } peaks { $($(#[$pdoc:meta])* $peak:ident),* $(,)? }) => {
        /// VM-wide statistics (`struct kvm_vm_stat`): per-CPU counters, so that vCPU threads
        /// updating them do not share a cache line.
        #[derive(Debug, Default)]
        pub struct VmStats {
            $($(#[$doc])* pub $name: PercpuCounter,)*
            $($(#[$pdoc])* pub $peak: PercpuCounter,)*
        }

        impl VmStats {
            /// Every counter by its KVM name.
            pub fn snapshot(&self) -> BTreeMap<&'static str, i64> {
                let mut m = BTreeMap::new();
                $(m.insert(stringify!($name), self.$name.sum());)*
                $(m.insert(stringify!($peak), self.$peak.max());)*
                m
            }
        }
    };
}

vm_stats! {
    counters {
    /// `kvm_flush_remote_tlbs` calls that flushed.
    remote_tlb_flush,
    /// `kvm_flush_remote_tlbs` calls.
    remote_tlb_flush_requests,
    /// Shadow pages zapped.
    mmu_shadow_zapped,
    /// Emulated writes to shadowed guest page tables.
    mmu_pte_write,
    /// Non-leaf SPTEs zapped by such writes.
    mmu_pde_zapped,
    /// Shadow pages zapped for write flooding or misaligned writes.
    mmu_flooded,
    /// Shadow pages recycled to stay under the page limit.
    mmu_recycled,
    /// Shadow-page cache misses.
    mmu_cache_miss,
    /// Unsync shadow pages.
    mmu_unsync,
    /// Leaf SPTEs mapping 4 KiB.
    pages_4k,
    /// Leaf SPTEs mapping 2 MiB.
    pages_2m,
    /// Leaf SPTEs mapping 1 GiB.
    pages_1g,
    /// Huge pages split because of the NX huge page mitigation.
    nx_lpage_splits,
    }
    peaks {
    /// Peak rmap length.
    max_mmu_rmap_size,
    /// Peak shadow-page hash collisions.
    max_mmu_page_hash_collisions,
    }
}

impl VmStats {
    /// Adds `delta` to the page counter of `level` (`kvm_update_page_stats`).
    #[inline]
    pub fn update_page_stats(&self, level: u8, delta: i64) {
        let c = match level {
            1 => &self.pages_4k,
            2 => &self.pages_2m,
            _ => &self.pages_1g,
        };
        c.add(delta);
    }
}

macro_rules! vcpu_stats {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Per-vCPU statistics (`struct kvm_vcpu_stat`).
        #[derive(Debug, Default, Clone, PartialEq, Eq)]
        pub struct VcpuStats {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl VcpuStats {
            /// Every counter by its KVM name.
            pub fn snapshot(&self) -> BTreeMap<&'static str, i64> {
                let mut m = BTreeMap::new();
                $(m.insert(stringify!($name), self.$name as i64);)*
                m
            }
        }
    };
}

vcpu_stats! {
    /// Page faults handled by the MMU.
    pf_taken,
    /// Faults that installed a mapping.
    pf_fixed,
    /// Faults fixed (or found spurious) by the lockless fast path.
    pf_fast,
    /// Faults that found the mapping already there.
    pf_spurious,
    /// Faults that needed instruction emulation.
    pf_emulate,
    /// MMIO SPTEs created.
    pf_mmio_spte_created,
    /// Page faults injected into the guest.
    pf_guest,
    /// Local TLB flushes.
    tlb_flush,
    /// INVLPG / INVPCID handled.
    invlpg,
    /// VM exits.
    exits,
    /// Exits to the VMM for MMIO.
    mmio_exits,
}

/// A monotonic counter readable from other threads (used for values the vCPU shares).
#[derive(Debug, Default)]
pub struct SharedCounter(AtomicU64);

impl SharedCounter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// The value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Buckets of a [`LatencyHistogram`]: bucket `i` counts durations in `[2^i, 2^(i+1))` ns
/// (bucket 0 also holds 0 ns; the last one holds everything from `2^39` ns, about 9 minutes).
pub const LATENCY_BUCKETS: usize = 40;

/// Durations in power-of-two nanosecond buckets: the optional per-fault timing of a vCPU
/// ([`crate::Vcpu::set_fault_timing`]), which measures each MMU exit's handling
/// (`kvm_mmu_page_fault` and the memslot refresh before it) with [`std::time::Instant`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Counts per bucket (see [`LATENCY_BUCKETS`]).
    pub buckets: [u64; LATENCY_BUCKETS],
    /// Durations recorded.
    pub count: u64,
    /// Their sum.
    pub sum_ns: u64,
    /// The longest.
    pub max_ns: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { buckets: [0; LATENCY_BUCKETS], count: 0, sum_ns: 0, max_ns: 0 }
    }
}

impl LatencyHistogram {
    /// The bucket a duration falls in.
    #[inline]
    pub fn bucket_of(ns: u64) -> usize {
        ((63 - ns.max(1).leading_zeros()) as usize).min(LATENCY_BUCKETS - 1)
    }

    /// Records one duration.
    #[inline]
    pub fn record(&mut self, ns: u64) {
        self.buckets[Self::bucket_of(ns)] += 1;
        self.count += 1;
        self.sum_ns += ns;
        self.max_ns = self.max_ns.max(ns);
    }

    /// Adds `other`'s durations to these.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.sum_ns += other.sum_ns;
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// The durations recorded since `earlier` (a copy of this histogram taken before); the
    /// maximum is the later one's (a histogram cannot tell where it was reached).
    pub fn since(&self, earlier: &LatencyHistogram) -> LatencyHistogram {
        let mut d = self.clone();
        for (a, b) in d.buckets.iter_mut().zip(earlier.buckets.iter()) {
            *a = a.saturating_sub(*b);
        }
        d.count = d.count.saturating_sub(earlier.count);
        d.sum_ns = d.sum_ns.saturating_sub(earlier.sum_ns);
        d
    }

    /// The upper bound (exclusive, `2^(i+1)` ns) of the bucket holding quantile `q` (0..=1),
    /// or 0 when empty.
    pub fn quantile_upper_ns(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        // q is in 0..=1 (clamped), so the product is in 0..=count: no sign, no truncation.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let want = ((self.count as f64 * q.clamp(0.0, 1.0)).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= want {
                return 1u64 << (i + 1);
            }
        }
        1u64 << LATENCY_BUCKETS
    }
}

/// Merges stat maps by summing values of equal names.
pub fn sum_into(acc: &mut BTreeMap<&'static str, i64>, add: &BTreeMap<&'static str, i64>) {
    for (k, v) in add {
        *acc.entry(k).or_insert(0) += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_kvms() {
        let vm = VmStats::default();
        vm.update_page_stats(2, 3);
        let s = vm.snapshot();
        assert_eq!(s["pages_2m"], 3);
        for n in ["remote_tlb_flush", "remote_tlb_flush_requests", "pages_4k", "pages_1g", "mmu_cache_miss"] {
            assert!(s.contains_key(n), "{n}");
        }
        let v = VcpuStats { pf_fixed: 2, ..Default::default() };
        let s = v.snapshot();
        for n in [
            "pf_taken",
            "pf_fixed",
            "pf_fast",
            "pf_spurious",
            "pf_emulate",
            "pf_mmio_spte_created",
            "tlb_flush",
            "exits",
        ] {
            assert!(s.contains_key(n), "{n}");
        }
        assert_eq!(s["pf_fixed"], 2);
    }

    #[test]
    fn latency_buckets() {
        assert_eq!(LatencyHistogram::bucket_of(0), 0);
        assert_eq!(LatencyHistogram::bucket_of(1), 0);
        assert_eq!(LatencyHistogram::bucket_of(1023), 9);
        assert_eq!(LatencyHistogram::bucket_of(1024), 10);
        assert_eq!(LatencyHistogram::bucket_of(u64::MAX), LATENCY_BUCKETS - 1);
        let mut h = LatencyHistogram::default();
        for ns in [100, 200, 300, 5000] {
            h.record(ns);
        }
        let before = h.clone();
        h.record(70_000);
        assert_eq!((h.count, h.sum_ns, h.max_ns), (5, 75_600, 70_000));
        assert_eq!(h.quantile_upper_ns(0.5), 512);
        assert_eq!(h.quantile_upper_ns(1.0), 131_072);
        let d = h.since(&before);
        assert_eq!((d.count, d.sum_ns, d.buckets[16]), (1, 70_000, 1));
    }
}
