//! A VM's configuration: KVM's module parameters (`tdp_mmu`, `ept`/`npt`, `eptad`,
//! `nx_huge_pages`, `eager_page_split`, `pml`, ...) and VM settings.

/// Which MMU the VM uses (the `tdp_mmu` and `ept`/`npt` module parameters together).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MmuKind {
    /// Two-dimensional paging with the TDP MMU (tdp_mmu=Y).
    Tdp,
    /// Shadow paging (ept=N / npt=N).
    Shadow,
    /// Two-dimensional paging with the legacy MMU (tdp_mmu=N).
    LegacyTdp,
}

/// The TDP flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TdpKind {
    /// Intel EPT.
    Ept,
    /// AMD NPT.
    Npt,
}

/// A VM's configuration: KVM's module parameters and VM settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// MMU.
    pub mmu: MmuKind,
    /// EPT or NPT.
    pub tdp: TdpKind,
    /// kvm_intel.eptad: EPT A/D bits (else access tracking).
    pub eptad: bool,
    /// Largest TDP level the "hardware" supports (4 or 5).
    pub max_tdp_level: u8,
    /// Guest MAXPHYADDR (CPUID).
    pub maxphyaddr: u8,
    /// kvm.nx_huge_pages.
    pub nx_huge_pages: bool,
    /// kvm.nx_huge_pages_recovery_ratio: each recovery pass zaps 1/ratio of the tables the
    /// mitigation made (0: no recovery).
    pub nx_huge_pages_recovery_ratio: u32,
    /// kvm.nx_huge_pages_recovery_period_ms (0: one hour / ratio).
    pub nx_huge_pages_recovery_period_ms: u32,
    /// kvm.mmio_caching.
    pub mmio_caching: bool,
    /// Largest huge page the TDP MMU maps (2 = 2 MiB, 3 = 1 GiB).
    pub tdp_huge_page_level: u8,
    /// kvm.eager_page_split: enabling dirty logging splits the slot's huge SPTEs down to
    /// 4 KiB at once (TDP MMU), instead of on each first write.
    pub eager_page_split: bool,
    /// kvm_intel.pml: with EPT A/D bits, dirty logging clears D bits and reads the
    /// page-modification log instead of write-protecting (see [`crate::dirty_log`]).
    pub pml: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mmu: MmuKind::Tdp,
            tdp: TdpKind::Ept,
            eptad: true,
            max_tdp_level: 4,
            maxphyaddr: 46,
            nx_huge_pages: false,
            nx_huge_pages_recovery_ratio: 60,
            nx_huge_pages_recovery_period_ms: 0,
            mmio_caching: true,
            tdp_huge_page_level: 3,
            eager_page_split: true,
            pml: true,
        }
    }
}

impl VmConfig {
    /// `kvm_mmu_get_tdp_level`: 4-level unless 5-level is supported and MAXPHYADDR > 48.
    pub fn tdp_level(&self) -> u8 {
        if self.max_tdp_level == 5 && self.maxphyaddr <= 48 {
            4
        } else {
            self.max_tdp_level
        }
    }

    /// `calc_nx_huge_pages_recovery_period`: the recovery worker's period, None when the
    /// mitigation or the recovery is off.
    pub fn nx_huge_pages_recovery_period(&self) -> Option<std::time::Duration> {
        if !self.nx_huge_pages || self.nx_huge_pages_recovery_ratio == 0 {
            return None;
        }
        let ms = match self.nx_huge_pages_recovery_period_ms {
            0 => 60 * 60 * 1000 / self.nx_huge_pages_recovery_ratio.min(3600),
            ms => ms,
        };
        Some(std::time::Duration::from_millis(u64::from(ms)))
    }

    /// `kvm_ad_enabled`.
    pub fn ad_enabled(&self) -> bool {
        self.tdp == TdpKind::Npt || self.eptad
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tdp_level_rule() {
        let c = |max_tdp_level, maxphyaddr| VmConfig { max_tdp_level, maxphyaddr, ..Default::default() }.tdp_level();
        assert_eq!(c(4, 46), 4);
        assert_eq!(c(5, 46), 4, "5-level supported but not needed");
        assert_eq!(c(5, 48), 4);
        assert_eq!(c(5, 52), 5);
    }
}
