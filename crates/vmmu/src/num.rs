//! The integer conversions the MMU makes all the time, each written once with the reason it
//! cannot lose information (so the `cast_possible_truncation` lint stays on everywhere else).

use std::time::Duration;

// vmmu models x86-64 hosts and only builds for 64-bit ones: u64 <-> usize is lossless.
const _: () = assert!(usize::BITS == 64, "vmmu needs a 64-bit host");

/// A `u64` index or count as `usize` (lossless on the 64-bit hosts vmmu builds for).
#[inline]
pub(crate) const fn usize_of(x: u64) -> usize {
    // usize is 64 bits wide (asserted above).
    #[allow(clippy::cast_possible_truncation)]
    let n = x as usize;
    n
}

/// The low 32 bits of `x` (a 4-byte guest entry, a 32-bit register image).
#[inline]
pub(crate) const fn low32(x: u64) -> u32 {
    // Truncating to the low half is the point.
    #[allow(clippy::cast_possible_truncation)]
    let v = x as u32;
    v
}

/// The low 8 bits of `x` (an access-rights field already masked by the caller).
#[inline]
pub(crate) const fn low8(x: u64) -> u8 {
    // Truncating to the low byte is the point.
    #[allow(clippy::cast_possible_truncation)]
    let v = x as u8;
    v
}

/// A duration in nanoseconds, saturating after 584 years.
#[inline]
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions() {
        assert_eq!(usize_of(u64::MAX), usize::MAX);
        assert_eq!(low32(0x1_2345_6789), 0x2345_6789);
        assert_eq!(low8(0x1ff), 0xff);
        assert_eq!(nanos(Duration::from_micros(3)), 3000);
        assert_eq!(nanos(Duration::MAX), u64::MAX);
    }
}
