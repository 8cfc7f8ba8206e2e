//! [`VecMem`]: a flat, thread-safe memory for tests and examples.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{Gpa, Gva, Hpa};
use crate::ept::HostPhys;
use crate::low32;
use crate::walk::GuestPhys;

/// An access outside a [`VecMem`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("address {0} is outside memory")]
pub struct OutOfRange(pub Gpa);

/// A flat memory of 64-bit atomic words starting at address 0. It serves as
/// guest-physical memory ([`GuestPhys`], errors are [`OutOfRange`]) and as
/// host-physical memory ([`HostPhys`]: reads outside return 0, a not-present
/// entry; compare-and-exchange outside fails). All methods take `&self`, so
/// one `VecMem` can be shared between threads.
#[derive(Debug, Default)]
pub struct VecMem {
    words: Vec<AtomicU64>,
}

impl VecMem {
    /// A zero-filled memory of `bytes` bytes (rounded up to a multiple of 8).
    pub fn new(bytes: u64) -> Self {
        let n = bytes.div_ceil(8);
        VecMem { words: (0..n).map(|_| AtomicU64::new(0)).collect() }
    }

    /// The size in bytes.
    #[inline]
    pub fn len(&self) -> u64 {
        self.words.len() as u64 * 8
    }

    /// Whether the memory has no bytes.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    #[inline]
    fn word(&self, addr: u64) -> Result<&AtomicU64, OutOfRange> {
        usize::try_from(addr / 8).ok().and_then(|i| self.words.get(i)).ok_or(OutOfRange(Gpa(addr)))
    }

    #[inline]
    fn check(&self, addr: u64, size: u64) -> Result<(), OutOfRange> {
        match addr.checked_add(size) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(OutOfRange(Gpa(addr))),
        }
    }

    /// Reads `buf.len()` bytes at `addr` (not atomic as a whole).
    pub fn load_bytes(&self, addr: impl Into<u64>, buf: &mut [u8]) -> Result<(), OutOfRange> {
        let addr = addr.into();
        self.check(addr, buf.len() as u64)?;
        for (i, b) in buf.iter_mut().enumerate() {
            let a = addr + i as u64;
            let w = self.word(a)?.load(Ordering::Acquire);
            *b = w.to_le_bytes()[(a & 7) as usize];
        }
        Ok(())
    }

    /// Writes `buf` at `addr` (each byte atomically, not the whole).
    pub fn store_bytes(&self, addr: impl Into<u64>, buf: &[u8]) -> Result<(), OutOfRange> {
        let addr = addr.into();
        self.check(addr, buf.len() as u64)?;
        for (i, &b) in buf.iter().enumerate() {
            let a = addr + i as u64;
            let sh = (a & 7) * 8;
            let w = self.word(a)?;
            let _ = w.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some((v & !(0xff << sh)) | (u64::from(b) << sh))
            });
        }
        Ok(())
    }

    /// Reads the little-endian `u64` at `addr` (atomic when 8-aligned).
    #[inline]
    pub fn load_u64(&self, addr: impl Into<u64>) -> Result<u64, OutOfRange> {
        let addr = addr.into();
        if addr & 7 == 0 {
            return Ok(self.word(addr)?.load(Ordering::Acquire));
        }
        let mut b = [0u8; 8];
        self.load_bytes(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes the little-endian `u64` at `addr` (atomic when 8-aligned).
    #[inline]
    pub fn store_u64(&self, addr: impl Into<u64>, v: u64) -> Result<(), OutOfRange> {
        let addr = addr.into();
        if addr & 7 == 0 {
            self.word(addr)?.store(v, Ordering::Release);
            return Ok(());
        }
        self.store_bytes(addr, &v.to_le_bytes())
    }

    /// Reads the little-endian `u32` at `addr` (atomic when 4-aligned).
    #[inline]
    pub fn load_u32(&self, addr: impl Into<u64>) -> Result<u32, OutOfRange> {
        let addr = addr.into();
        if addr & 3 == 0 {
            let w = self.word(addr)?.load(Ordering::Acquire);
            return Ok(low32(w >> ((addr & 4) * 8)));
        }
        let mut b = [0u8; 4];
        self.load_bytes(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes the little-endian `u32` at `addr` (atomic when 4-aligned).
    #[inline]
    pub fn store_u32(&self, addr: impl Into<u64>, v: u32) -> Result<(), OutOfRange> {
        let addr = addr.into();
        if addr & 3 == 0 {
            let sh = (addr & 4) * 8;
            let _ = self.word(addr)?.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                Some((w & !(0xffff_ffff << sh)) | (u64::from(v) << sh))
            });
            return Ok(());
        }
        self.store_bytes(addr, &v.to_le_bytes())
    }

    /// Compare-and-exchange of the 8-aligned `u64` at `addr`: `Ok(true)` if it
    /// held `old` and now holds `new`.
    #[inline]
    pub fn cmpxchg_u64_at(&self, addr: impl Into<u64>, old: u64, new: u64) -> Result<bool, OutOfRange> {
        let addr = addr.into();
        if addr & 7 != 0 {
            return self.cmpxchg_slow(addr, 8, old, new);
        }
        Ok(self.word(addr)?.compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire).is_ok())
    }

    /// Compare-and-exchange of the 4-aligned `u32` at `addr` (the other half of
    /// the containing word may change concurrently without failing it).
    #[inline]
    pub fn cmpxchg_u32_at(&self, addr: impl Into<u64>, old: u32, new: u32) -> Result<bool, OutOfRange> {
        let addr = addr.into();
        if addr & 3 != 0 {
            return self.cmpxchg_slow(addr, 4, u64::from(old), u64::from(new));
        }
        let sh = (addr & 4) * 8;
        let mask = 0xffff_ffffu64 << sh;
        Ok(self
            .word(addr)?
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                ((w & mask) >> sh == u64::from(old)).then_some((w & !mask) | (u64::from(new) << sh))
            })
            .is_ok())
    }

    /// Unaligned compare-and-exchange: not atomic (test memory only).
    fn cmpxchg_slow(&self, addr: u64, size: usize, old: u64, new: u64) -> Result<bool, OutOfRange> {
        let mut b = [0u8; 8];
        self.load_bytes(addr, &mut b[..size])?;
        let cur = u64::from_le_bytes(b);
        let mask = if size == 8 { u64::MAX } else { (1 << (size * 8)) - 1 };
        if cur & mask != old & mask {
            return Ok(false);
        }
        self.store_bytes(addr, &new.to_le_bytes()[..size])?;
        Ok(true)
    }
}

impl VecMem {
    #[inline]
    fn read_entry(&self, gpa: Gpa, size: u8) -> Result<u64, OutOfRange> {
        if size == 4 {
            self.load_u32(gpa).map(u64::from)
        } else {
            self.load_u64(gpa)
        }
    }

    #[inline]
    fn cmpxchg_entry(&self, gpa: Gpa, size: u8, old: u64, new: u64) -> Result<bool, OutOfRange> {
        if size == 4 {
            self.cmpxchg_u32_at(gpa, low32(old), low32(new))
        } else {
            self.cmpxchg_u64_at(gpa, old, new)
        }
    }
}

/// Entries are 4 bytes when `size == 4`, else 8.
impl GuestPhys for VecMem {
    type Error = OutOfRange;

    #[inline]
    fn read_pte(&mut self, gpa: Gpa, size: u8, _gva: Gva) -> Result<u64, OutOfRange> {
        self.read_entry(gpa, size)
    }

    #[inline]
    fn cmpxchg_pte(&mut self, gpa: Gpa, size: u8, old: u64, new: u64, _gva: Gva) -> Result<bool, OutOfRange> {
        self.cmpxchg_entry(gpa, size, old, new)
    }
}

/// A shared reference works too (the memory is atomic).
impl GuestPhys for &VecMem {
    type Error = OutOfRange;

    #[inline]
    fn read_pte(&mut self, gpa: Gpa, size: u8, _gva: Gva) -> Result<u64, OutOfRange> {
        self.read_entry(gpa, size)
    }

    #[inline]
    fn cmpxchg_pte(&mut self, gpa: Gpa, size: u8, old: u64, new: u64, _gva: Gva) -> Result<bool, OutOfRange> {
        self.cmpxchg_entry(gpa, size, old, new)
    }
}

impl HostPhys for VecMem {
    #[inline]
    fn read_u64(&self, hpa: Hpa) -> u64 {
        if hpa.0 & 7 == 0 {
            return usize::try_from(hpa.0 >> 3)
                .ok()
                .and_then(|i| self.words.get(i))
                .map_or(0, |w| w.load(Ordering::Acquire));
        }
        self.load_u64(hpa).unwrap_or(0)
    }

    #[inline]
    fn cmpxchg_u64(&self, hpa: Hpa, old: u64, new: u64) -> bool {
        self.cmpxchg_u64_at(hpa, old, new).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_bounds() {
        let m = VecMem::new(13);
        assert_eq!(m.len(), 16);
        assert!(!m.is_empty());
        assert!(VecMem::new(0).is_empty());
        assert_eq!(m.load_u64(8u64), Ok(0));
        assert_eq!(m.load_u64(16u64), Err(OutOfRange(Gpa(16))));
        assert_eq!(m.load_u64(9u64), Err(OutOfRange(Gpa(9))));
        assert_eq!(m.load_u32(12u64), Ok(0));
        assert_eq!(m.load_u32(13u64), Err(OutOfRange(Gpa(13))));
        assert_eq!(m.store_u64(u64::MAX - 3, 1), Err(OutOfRange(Gpa(u64::MAX - 3))));
        assert_eq!(m.read_u64(Hpa(1 << 40)), 0);
        assert!(!m.cmpxchg_u64(Hpa(1 << 40), 0, 1));
    }

    #[test]
    fn little_endian_halves_and_unaligned() {
        let m = VecMem::new(32);
        m.store_u64(8u64, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(m.load_u32(8u64), Ok(0x5566_7788));
        assert_eq!(m.load_u32(12u64), Ok(0x1122_3344));
        m.store_u32(12u64, 0xaabb_ccdd).unwrap();
        assert_eq!(m.load_u64(8u64), Ok(0xaabb_ccdd_5566_7788));
        m.store_u64(13u64, 0x0102_0304_0506_0708).unwrap();
        assert_eq!(m.load_u64(13u64), Ok(0x0102_0304_0506_0708));
        assert_eq!(m.load_u32(8u64), Ok(0x5566_7788));
        let mut b = [0u8; 3];
        m.load_bytes(13u64, &mut b).unwrap();
        assert_eq!(b, [8, 7, 6]);
        m.store_bytes(2u64, &[0xee, 0xff]).unwrap();
        assert_eq!(m.load_u32(0u64), Ok(0xffee_0000));
    }

    #[test]
    fn compare_and_exchange() {
        let mut m = VecMem::new(64);
        m.store_u64(16u64, 5).unwrap();
        assert!(!m.cmpxchg_u64(Hpa(16), 4, 9));
        assert!(m.cmpxchg_u64(Hpa(16), 5, 9));
        assert_eq!(m.read_u64(Hpa(16)), 9);
        // 4-byte entries leave the other half alone.
        m.store_u64(24u64, 0xffff_ffff_0000_0001).unwrap();
        assert_eq!(m.cmpxchg_pte(Gpa(24), 4, 1, 0x21, Gva(0)), Ok(true));
        assert_eq!(m.cmpxchg_pte(Gpa(24), 4, 1, 0x21, Gva(0)), Ok(false));
        assert_eq!(m.read_pte(Gpa(24), 8, Gva(0)), Ok(0xffff_ffff_0000_0021));
        assert_eq!(m.read_pte(Gpa(28), 4, Gva(0)), Ok(0xffff_ffff));
        assert_eq!(m.cmpxchg_pte(Gpa(28), 4, 0xffff_ffff, 7, Gva(0)), Ok(true));
        assert_eq!(m.load_u64(24u64), Ok(0x0000_0007_0000_0021));
        // Unaligned compare-and-exchange.
        assert_eq!(m.cmpxchg_u64_at(33u64, 0, 0xabcd), Ok(true));
        assert_eq!(m.load_u64(33u64), Ok(0xabcd));
        assert_eq!(m.cmpxchg_u32_at(34u64, 0, 1), Ok(false));
        assert_eq!(m.read_pte(Gpa(64), 8, Gva(0)), Err(OutOfRange(Gpa(64))));
        let mut r = &m;
        assert_eq!(r.read_pte(Gpa(16), 8, Gva(0)), Ok(9));
        assert_eq!(r.cmpxchg_pte(Gpa(16), 8, 9, 10, Gva(0)), Ok(true));
    }

    #[test]
    fn shared_between_threads() {
        let m = VecMem::new(8);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        loop {
                            let v = m.read_u64(Hpa(0));
                            if m.cmpxchg_u64(Hpa(0), v, v + 1) {
                                break;
                            }
                        }
                    }
                });
            }
        });
        assert_eq!(m.read_u64(Hpa(0)), 4000);
    }
}
