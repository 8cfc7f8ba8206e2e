//! Dirty logging as scenario ops, as a VMM drives it: `dirty-log-start` / `dirty-log-stop`
//! toggle KVM_MEM_LOG_DIRTY_PAGES on a memslot (KVM_SET_USER_MEMORY_REGION with the slot's
//! other flags kept), `dirty-log-harvest` reads the log with KVM_GET_DIRTY_LOG and, with
//! manual protection (`vm.manual_dirty_log_protect`), clears what it read with
//! KVM_CLEAR_DIRTY_LOG, which re-arms those pages. Each harvest is reported
//! ([`Harvest`]); the runner sums them per phase.

use crate::error::{ConfigError, Failure, RunError};
use crate::machine::Machine;
use std::time::Instant;
use vmmu::memslot::{MemslotFlags, UserspaceMemoryRegion};

/// One `dirty-log-harvest`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Harvest {
    /// The phase it ran in.
    pub phase: String,
    /// The memslot (scenario index = KVM slot id).
    pub slot: u32,
    /// Pages KVM_GET_DIRTY_LOG reported dirty.
    pub dirty_pages: u64,
    /// Whether the reported pages were then cleared with KVM_CLEAR_DIRTY_LOG (manual
    /// protection); without it KVM_GET_DIRTY_LOG clears and re-arms them itself.
    pub cleared: bool,
    /// Time of the ioctls (KVM_GET_DIRTY_LOG, and KVM_CLEAR_DIRTY_LOG when `cleared`).
    pub harvest_ns: u64,
}

/// The KVM memslot region of scenario memslot `slot`, as registered now.
fn region(m: &Machine, slot: u32, op: &'static str) -> Result<UserspaceMemoryRegion, RunError> {
    let (gpa, _, _) = *m.slots.get(slot as usize).ok_or(ConfigError::NoMemslot { op, slot })?;
    let slots = m.kvm.memslots();
    let s = slots.iter().find(|s| s.base_gfn.raw() == gpa >> 12).ok_or(Failure::DirtyLogUnregistered { slot })?;
    Ok(s.region())
}

/// Turns dirty logging of scenario memslot `slot` on (`on`) or off.
pub fn set_logging(m: &mut Machine, slot: u32, on: bool) -> Result<(), RunError> {
    let op = if on { "dirty-log-start" } else { "dirty-log-stop" };
    let mut r = region(m, slot, op)?;
    r.flags.set(MemslotFlags::LOG_DIRTY_PAGES, on);
    // The VMM changes memslots with its vCPUs outside the guest.
    for v in m.vcpus.iter_mut() {
        v.exit_guest();
    }
    m.kvm.set_user_memory_region(r).map_err(|source| Failure::DirtyLog { op, slot, source })?;
    Ok(())
}

/// Harvests scenario memslot `slot`'s dirty log in phase `phase`.
pub fn harvest(m: &mut Machine, slot: u32, phase: &str) -> Result<Harvest, RunError> {
    let op = "dirty-log-harvest";
    let r = region(m, slot, op)?;
    for v in m.vcpus.iter_mut() {
        v.exit_guest();
    }
    let manual = m.manual_dirty_log_protect;
    let t = Instant::now();
    let bitmap = m.kvm.get_dirty_log(r.slot).map_err(|source| Failure::DirtyLog { op, slot, source })?;
    if manual {
        m.kvm.clear_dirty_log(r.slot, 0, r.memory_size / 4096, &bitmap).map_err(|source| Failure::DirtyLog {
            op,
            slot,
            source,
        })?;
    }
    let harvest_ns = crate::clock::elapsed_ns(t);
    let dirty_pages = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
    Ok(Harvest { phase: phase.to_string(), slot, dirty_pages, cleared: manual, harvest_ns })
}
