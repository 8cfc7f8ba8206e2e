//! The VMM's MMIO devices: where an emulated access to a gpa outside every memslot (or a
//! write to a read-only memslot) ends, as KVM_EXIT_MMIO does in a real VMM.

use crate::sync::{Arc, AtomicU64, Ordering};
use x86_paging::addr::Gpa;

/// A device register window.
pub trait MmioDevice: Send + Sync {
    /// A read of `size` bytes at `offset` into the device.
    fn read(&self, offset: u64, size: u8) -> u64;
    /// A write.
    fn write(&self, offset: u64, size: u8, val: u64);
}

/// A device whose every register reads back the last value written to the window.
#[derive(Debug, Default)]
pub struct LatchDevice(AtomicU64);

impl MmioDevice for LatchDevice {
    fn read(&self, _offset: u64, size: u8) -> u64 {
        self.0.load(Ordering::Relaxed) & (u64::MAX >> (64 - 8 * u32::from(size)))
    }
    fn write(&self, _offset: u64, _size: u8, val: u64) {
        self.0.store(val, Ordering::Relaxed);
    }
}

/// The MMIO bus: devices by gpa range. Reads of unclaimed addresses return all ones and
/// writes to them are dropped (open bus).
#[derive(Default, Clone)]
pub struct MmioBus {
    devices: Vec<(u64, u64, Arc<dyn MmioDevice>)>,
}

impl MmioBus {
    /// Places `dev` at [gpa, gpa+len).
    pub fn register(&mut self, gpa: Gpa, len: u64, dev: Arc<dyn MmioDevice>) {
        self.devices.push((gpa.raw(), len, dev));
    }

    fn find(&self, gpa: Gpa) -> Option<(u64, &Arc<dyn MmioDevice>)> {
        self.devices.iter().find(|(s, l, _)| gpa.raw() >= *s && gpa.raw() < s + l).map(|(s, _, d)| (gpa.raw() - s, d))
    }

    /// An MMIO read.
    pub fn read(&self, gpa: Gpa, size: u8) -> u64 {
        match self.find(gpa) {
            Some((off, d)) => d.read(off, size),
            None => u64::MAX >> (64 - 8 * u32::from(size)),
        }
    }

    /// An MMIO write.
    pub fn write(&self, gpa: Gpa, size: u8, val: u64) {
        if let Some((off, d)) = self.find(gpa) {
            d.write(off, size, val)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latch_reads_back_and_open_bus_reads_ones() {
        let mut b = MmioBus::default();
        b.register(Gpa::new(0xfee0_0000), 0x1000, Arc::new(LatchDevice::default()));
        b.write(Gpa::new(0xfee0_0010), 4, 0x1234);
        assert_eq!(b.read(Gpa::new(0xfee0_0000), 4), 0x1234);
        assert_eq!(b.read(Gpa::new(0x1000), 2), 0xffff);
    }
}
