//! The only `unsafe` code of the crate: the kernel calls that kvm-ioctls either lacks
//! (`KVM_GET_STATS_FD`, `KVM_SET_NR_MMU_PAGES`) or marks unsafe (`KVM_SET_USER_MEMORY_REGION`).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use kvm_bindings::{kvm_userspace_memory_region, KVMIO};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

// `KVM_GET_STATS_FD` is `_IO(KVMIO, 0xce)` (include/uapi/linux/kvm.h). It is valid on a VM fd
// and on a vCPU fd when the host has `KVM_CAP_BINARY_STATS_FD`.
vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);

// `KVM_SET_NR_MMU_PAGES` is `_IO(KVMIO, 0x44)`, on a VM fd, with the page count as the
// argument itself (not a pointer).
vmm_sys_util::ioctl_io_nr!(KVM_SET_NR_MMU_PAGES, KVMIO, 0x44);

/// Issues `KVM_SET_NR_MMU_PAGES` on a VM: the limit on its shadow pages.
pub(crate) fn set_nr_mmu_pages(vm: &VmFd, pages: u64) -> io::Result<()> {
    let arg = std::ffi::c_ulong::try_from(pages).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: KVM_SET_NR_MMU_PAGES takes its argument by value and reads or writes no user
    // memory; `vm` is an open VM descriptor borrowed for the duration of the call.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_val(vm, KVM_SET_NR_MMU_PAGES(), arg) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Issues `KVM_GET_STATS_FD` on a VM or vCPU file descriptor and returns the statistics file.
pub(crate) fn get_stats_fd(fd: &impl AsRawFd) -> io::Result<File> {
    // SAFETY: KVM_GET_STATS_FD takes no argument and reads or writes no user memory; `fd` is an
    // open descriptor borrowed for the duration of the call, and the result is checked below.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl(fd, KVM_GET_STATS_FD()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the kernel returned a new file descriptor that nothing else owns;
    // the `File` takes ownership and closes it on drop.
    Ok(unsafe { File::from_raw_fd(ret) })
}

/// Registers every region of `mem` as a memslot of `vm` (slot numbers from 0, in order).
///
/// `vm` must not outlive `mem`: the owner keeps both and drops the VM first
/// (`run::Machine` declares the VM field before the memory field).
pub(crate) fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> io::Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem.get_host_address(region.start_addr()).map_err(|e| io::Error::other(e.to_string()))?;
        let slot =
            u32::try_from(slot).map_err(|_| io::Error::other(format!("memory region {slot}: too many slots")))?;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host..host + len` is a live anonymous mapping owned by `mem`, which the
        // caller keeps alive for as long as the VM exists (see the function docs); the slot
        // does not overlap any other slot because the regions of `mem` are disjoint.
        unsafe { vm.set_user_memory_region(desc) }.map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(())
}
