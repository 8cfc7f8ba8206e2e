//! KVM's binary statistics (`KVM_GET_STATS_FD`, Documentation/virt/kvm/api.rst §4.133):
//! a safe reader over the stats file of a VM or a vCPU.
//!
//! The file holds a header, an id string, one descriptor per statistic (flags, exponent,
//! size, offset, bucket size and the statistic's name) and a data block of `u64`s. The header
//! and descriptors never change for the life of the fd, so [`StatsFd`] parses them once and
//! each [`StatsFd::read`] re-reads only the data block with `pread`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use serde::Serialize;

use crate::error::KvmError;

/// `KVM_STATS_TYPE_*`: how a statistic's value evolves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatKind {
    /// A counter that only grows (`KVM_STATS_TYPE_CUMULATIVE`).
    Cumulative,
    /// A value at this instant, e.g. `pages_4k` (`KVM_STATS_TYPE_INSTANT`).
    Instant,
    /// A high-water mark, e.g. `max_mmu_rmap_size` (`KVM_STATS_TYPE_PEAK`).
    Peak,
    /// A histogram with linear buckets (`KVM_STATS_TYPE_LINEAR_HIST`).
    LinearHist,
    /// A histogram with power-of-two buckets (`KVM_STATS_TYPE_LOG_HIST`).
    LogHist,
    /// A type this reader does not know (the raw type field).
    Unknown(u32),
}

impl StatKind {
    fn from_flags(flags: u32) -> Self {
        match flags & kvm_bindings::KVM_STATS_TYPE_MASK {
            kvm_bindings::KVM_STATS_TYPE_CUMULATIVE => Self::Cumulative,
            kvm_bindings::KVM_STATS_TYPE_INSTANT => Self::Instant,
            kvm_bindings::KVM_STATS_TYPE_PEAK => Self::Peak,
            kvm_bindings::KVM_STATS_TYPE_LINEAR_HIST => Self::LinearHist,
            kvm_bindings::KVM_STATS_TYPE_LOG_HIST => Self::LogHist,
            t => Self::Unknown(t),
        }
    }

    /// Whether a per-phase delta of this statistic is meaningful (counters), as opposed to
    /// reporting its value at the end of the phase (gauges and peaks).
    pub fn is_counter(self) -> bool {
        matches!(self, Self::Cumulative | Self::LinearHist | Self::LogHist)
    }
}

/// One statistic's descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatDesc {
    /// KVM's name, e.g. `pf_fixed`.
    pub name: String,
    /// Type from the descriptor flags.
    pub kind: StatKind,
    /// Unit bits of the flags (`KVM_STATS_UNIT_*`, already shifted into place as in the uapi).
    pub unit: u32,
    /// Base-10 or base-2 exponent of the unit.
    pub exponent: i16,
    /// Number of `u64` values (1 for scalars, the bucket count for histograms).
    pub size: u16,
    /// Byte offset of the values inside the data block.
    pub offset: u32,
    /// Bucket width of a linear histogram.
    pub bucket_size: u32,
}

/// The parsed header and descriptors of a stats file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsLayout {
    /// The id string (`kvm-<pid>` for a VM, `kvm-<pid>/vcpu-<n>` for a vCPU).
    pub id: String,
    /// Every descriptor, in file order.
    pub descs: Vec<StatDesc>,
    /// File offset of the data block.
    pub data_offset: u64,
    /// Bytes of the data block covering every descriptor.
    pub data_len: usize,
}

const HEADER_LEN: usize = 24;
const DESC_FIXED_LEN: usize = 16;

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

impl StatsLayout {
    /// Parses the header, id and descriptors from the start of a stats file (`file` must hold
    /// at least the bytes up to the end of the descriptor block).
    pub fn parse(file: &[u8]) -> Result<Self, String> {
        let bad = |what: &str| format!("malformed KVM stats header: {what}");
        let _flags = u32_at(file, 0).ok_or_else(|| bad("shorter than its header"))?;
        let name_size = u32_at(file, 4).ok_or_else(|| bad("no name_size"))? as usize;
        let num_desc = u32_at(file, 8).ok_or_else(|| bad("no num_desc"))? as usize;
        let id_offset = u32_at(file, 12).ok_or_else(|| bad("no id_offset"))? as usize;
        let desc_offset = u32_at(file, 16).ok_or_else(|| bad("no desc_offset"))? as usize;
        let data_offset = u32_at(file, 20).ok_or_else(|| bad("no data_offset"))? as u64;
        if name_size == 0 {
            return Err(bad("name_size is 0"));
        }
        let id = c_string(file.get(id_offset..id_offset + name_size).ok_or_else(|| bad("id string out of bounds"))?);
        let stride = DESC_FIXED_LEN + name_size;
        let mut descs = Vec::with_capacity(num_desc);
        let mut data_len = 0usize;
        for i in 0..num_desc {
            let d = desc_offset + i * stride;
            let raw = file.get(d..d + stride).ok_or_else(|| bad(&format!("descriptor {i} out of bounds")))?;
            let flags = u32_at(raw, 0).expect("in bounds");
            let desc = StatDesc {
                kind: StatKind::from_flags(flags),
                unit: flags & kvm_bindings::KVM_STATS_UNIT_MASK,
                exponent: u16_at(raw, 4).expect("in bounds") as i16,
                size: u16_at(raw, 6).expect("in bounds"),
                offset: u32_at(raw, 8).expect("in bounds"),
                bucket_size: u32_at(raw, 12).expect("in bounds"),
                name: c_string(&raw[DESC_FIXED_LEN..]),
            };
            data_len = data_len.max(desc.offset as usize + 8 * desc.size as usize);
            descs.push(desc);
        }
        Ok(Self { id, descs, data_offset, data_len })
    }

    /// Decodes a data block read at [`Self::data_offset`] into one [`StatValue`] per
    /// descriptor.
    pub fn decode(&self, data: &[u8]) -> Vec<StatValue> {
        self.descs
            .iter()
            .map(|d| {
                let values = (0..d.size as usize)
                    .map(|k| {
                        let off = d.offset as usize + 8 * k;
                        data.get(off..off + 8).map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes"))).unwrap_or(0)
                    })
                    .collect();
                StatValue { name: d.name.clone(), kind: d.kind, values }
            })
            .collect()
    }
}

/// One statistic's values at one instant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatValue {
    /// KVM's name.
    pub name: String,
    /// Its type.
    pub kind: StatKind,
    /// One value for a scalar, one per bucket for a histogram.
    pub values: Vec<u64>,
}

/// A snapshot of every statistic of one stats file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// Every statistic by name.
    pub stats: BTreeMap<String, StatValue>,
}

impl StatsSnapshot {
    /// The scalar statistics (and the sum of each histogram's buckets) by KVM name.
    pub fn scalars(&self) -> BTreeMap<String, u64> {
        self.stats.iter().map(|(k, v)| (k.clone(), v.values.iter().copied().fold(0u64, u64::wrapping_add))).collect()
    }

    /// The value of one scalar statistic.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.stats.get(name).map(|v| v.values.iter().copied().fold(0, u64::wrapping_add))
    }

    /// What happened between `earlier` and `self`: counters (and histogram totals) as
    /// differences, gauges (`pages_4k`, ...) and peaks as their value in `self`.
    pub fn delta_since(&self, earlier: &StatsSnapshot) -> BTreeMap<String, u64> {
        self.stats
            .iter()
            .map(|(name, now)| {
                let total = |v: &StatValue| v.values.iter().copied().fold(0u64, u64::wrapping_add);
                let value = if now.kind.is_counter() {
                    let before = earlier.stats.get(name).map(total).unwrap_or(0);
                    total(now).wrapping_sub(before)
                } else {
                    total(now)
                };
                (name.clone(), value)
            })
            .collect()
    }
}

/// An open KVM statistics file of a VM or a vCPU, with its layout parsed.
#[derive(Debug)]
pub struct StatsFd {
    file: File,
    layout: StatsLayout,
}

impl StatsFd {
    /// Opens the statistics of a VM fd or vCPU fd (`KVM_GET_STATS_FD`) and parses its layout.
    pub fn open(fd: &impl AsRawFd) -> Result<Self, KvmError> {
        let file = crate::sys::get_stats_fd(fd).map_err(|e| KvmError::StatsFd(e.to_string()))?;
        Self::from_file(file)
    }

    /// Parses the layout of an already open stats file.
    pub fn from_file(file: File) -> Result<Self, KvmError> {
        let header = read_exact_at(&file, 0, HEADER_LEN)?;
        let name_size = u32_at(&header, 4).unwrap_or(0) as usize;
        let num_desc = u32_at(&header, 8).unwrap_or(0) as usize;
        let id_end = u32_at(&header, 12).unwrap_or(0) as usize + name_size;
        let desc_end = u32_at(&header, 16).unwrap_or(0) as usize + num_desc * (DESC_FIXED_LEN + name_size);
        let head = read_exact_at(&file, 0, id_end.max(desc_end))?;
        let layout = StatsLayout::parse(&head).map_err(KvmError::StatsFormat)?;
        Ok(Self { file, layout })
    }

    /// The parsed header and descriptors.
    pub fn layout(&self) -> &StatsLayout {
        &self.layout
    }

    /// Reads the current value of every statistic.
    pub fn read(&self) -> Result<StatsSnapshot, KvmError> {
        let data = read_exact_at(&self.file, self.layout.data_offset, self.layout.data_len)?;
        Ok(StatsSnapshot { stats: self.layout.decode(&data).into_iter().map(|v| (v.name.clone(), v)).collect() })
    }
}

fn read_exact_at(file: &File, offset: u64, len: usize) -> Result<Vec<u8>, KvmError> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)
        .map_err(|e: io::Error| KvmError::StatsFd(format!("reading {len} bytes at {offset}: {e}")))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a stats file image the way KVM lays it out.
    fn image(name_size: usize, stats: &[(&str, u32, u16, &[u64])]) -> Vec<u8> {
        let id_offset = HEADER_LEN;
        let desc_offset = id_offset + name_size;
        let stride = DESC_FIXED_LEN + name_size;
        let data_offset = desc_offset + stats.len() * stride;
        let u32_of = |v: usize| u32::try_from(v).unwrap();
        let mut f = Vec::new();
        for v in [0, name_size, stats.len(), id_offset, desc_offset, data_offset] {
            f.extend_from_slice(&u32_of(v).to_ne_bytes());
        }
        let mut id = b"kvm-42".to_vec();
        id.resize(name_size, 0);
        f.extend_from_slice(&id);
        let mut data = Vec::new();
        for (name, flags, size, values) in stats {
            f.extend_from_slice(&flags.to_ne_bytes());
            f.extend_from_slice(&0i16.to_ne_bytes());
            f.extend_from_slice(&size.to_ne_bytes());
            f.extend_from_slice(&u32_of(data.len()).to_ne_bytes());
            f.extend_from_slice(&0u32.to_ne_bytes());
            let mut n = name.as_bytes().to_vec();
            n.resize(name_size, 0);
            f.extend_from_slice(&n);
            for v in *values {
                data.extend_from_slice(&v.to_ne_bytes());
            }
        }
        f.extend_from_slice(&data);
        f
    }

    #[test]
    fn parses_header_descriptors_and_data() {
        let f = image(
            48,
            &[
                ("pf_fixed", kvm_bindings::KVM_STATS_TYPE_CUMULATIVE, 1, &[7]),
                ("pages_4k", kvm_bindings::KVM_STATS_TYPE_INSTANT, 1, &[3]),
                ("halt_wait_hist", kvm_bindings::KVM_STATS_TYPE_LOG_HIST, 3, &[1, 2, 3]),
            ],
        );
        let layout = StatsLayout::parse(&f).unwrap();
        assert_eq!(layout.id, "kvm-42");
        assert_eq!(layout.descs.len(), 3);
        assert_eq!(layout.descs[2].size, 3);
        assert_eq!(layout.data_len, 5 * 8);
        let data_offset = usize::try_from(layout.data_offset).unwrap();
        let values = layout.decode(&f[data_offset..]);
        let snap = StatsSnapshot { stats: values.into_iter().map(|v| (v.name.clone(), v)).collect() };
        assert_eq!(snap.get("pf_fixed"), Some(7));
        assert_eq!(snap.get("halt_wait_hist"), Some(6));

        let later_f = image(
            48,
            &[
                ("pf_fixed", kvm_bindings::KVM_STATS_TYPE_CUMULATIVE, 1, &[19]),
                ("pages_4k", kvm_bindings::KVM_STATS_TYPE_INSTANT, 1, &[5]),
                ("halt_wait_hist", kvm_bindings::KVM_STATS_TYPE_LOG_HIST, 3, &[1, 2, 4]),
            ],
        );
        let later = StatsSnapshot {
            stats: layout.decode(&later_f[data_offset..]).into_iter().map(|v| (v.name.clone(), v)).collect(),
        };
        let d = later.delta_since(&snap);
        assert_eq!(d["pf_fixed"], 12);
        assert_eq!(d["pages_4k"], 5, "gauges report their value, not a difference");
        assert_eq!(d["halt_wait_hist"], 1);
    }

    #[test]
    fn rejects_truncated_files() {
        let f = image(32, &[("pf_fixed", 0, 1, &[1])]);
        assert!(StatsLayout::parse(&f[..10]).is_err());
        assert!(StatsLayout::parse(&f[..HEADER_LEN + 40]).is_err());
    }
}
