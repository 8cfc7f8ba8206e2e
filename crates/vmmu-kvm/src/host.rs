//! What kind of KVM host `/dev/kvm` is: the vendor module (VMX, SVM or PVM), whether two
//! dimensional paging (EPT/NPT) is on, and whether the TDP MMU is on. Only like can be compared
//! with like: a shadow-paging host with vmmu's shadow MMU, a TDP host with vmmu's TDP MMU (or
//! the legacy TDP MMU when `tdp_mmu=N`).
//!
//! Read from `/sys/module/{kvm,kvm_intel,kvm_amd,kvm_pvm}/parameters` and `/proc/cpuinfo`.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// The KVM vendor module behind `/dev/kvm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Vendor {
    /// `kvm_intel` (VMX).
    Vmx,
    /// `kvm_amd` (SVM).
    Svm,
    /// `kvm_pvm`: the PVM vendor module, with no hardware virtualization (guest user code runs
    /// natively under shadow page tables, guest CPL0 code is emulated).
    Pvm,
    /// None of the above is loaded (or /sys/module is not readable).
    Unknown,
}

/// How KVM maps guest memory on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Paging {
    /// EPT/NPT with the TDP MMU (`tdp_mmu=Y`): compare with vmmu `--mmu tdp`.
    Tdp,
    /// EPT/NPT with the legacy MMU's direct shadow pages (`tdp_mmu=N`): vmmu `--mmu legacy-tdp`.
    LegacyTdp,
    /// Shadow paging (no EPT/NPT, or PVM): vmmu `--mmu shadow`.
    Shadow,
}

/// The kind of KVM host, as detected from sysfs and /proc.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostKind {
    /// The vendor module.
    pub vendor: Vendor,
    /// The paging KVM uses for guests.
    pub paging: Paging,
    /// `kvm.tdp_mmu`, when readable.
    pub tdp_mmu: Option<bool>,
    /// `kvm_intel.ept` or `kvm_amd.npt`, when the module is loaded.
    pub ept_npt: Option<bool>,
    /// Whether this host is itself a guest (`hypervisor` in /proc/cpuinfo flags).
    pub nested: bool,
    /// Whether the CPU advertises `vmx` or `svm`.
    pub hw_virt_flag: bool,
    /// Loaded modules whose name starts with `kvm`.
    pub kvm_modules: Vec<String>,
}

impl HostKind {
    /// Detects the host kind of this machine.
    pub fn detect() -> Self {
        Self::detect_from(Path::new("/"))
    }

    /// Detects the host kind from a root directory holding `sys/module/...` and
    /// `proc/cpuinfo` (`/` for this machine; a fake tree in tests).
    pub fn detect_from(root: &Path) -> Self {
        let module_dir = root.join("sys/module");
        let mut kvm_modules: Vec<String> = fs::read_dir(&module_dir)
            .map(|it| {
                it.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("kvm"))
                    .collect()
            })
            .unwrap_or_default();
        kvm_modules.sort();
        let has = |m: &str| kvm_modules.iter().any(|n| n == m);
        let param = |m: &str, p: &str| -> Option<bool> {
            let path: PathBuf = module_dir.join(m).join("parameters").join(p);
            parse_bool(&fs::read_to_string(path).ok()?)
        };
        let (vendor, ept_npt) = if has("kvm_pvm") {
            (Vendor::Pvm, None)
        } else if has("kvm_intel") {
            (Vendor::Vmx, param("kvm_intel", "ept"))
        } else if has("kvm_amd") {
            (Vendor::Svm, param("kvm_amd", "npt"))
        } else {
            (Vendor::Unknown, None)
        };
        let tdp_mmu = param("kvm", "tdp_mmu");
        let paging = match (vendor, ept_npt) {
            (Vendor::Vmx | Vendor::Svm, Some(true)) => {
                if tdp_mmu == Some(false) {
                    Paging::LegacyTdp
                } else {
                    Paging::Tdp
                }
            }
            _ => Paging::Shadow,
        };
        let flags: Vec<String> = fs::read_to_string(root.join("proc/cpuinfo"))
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("flags"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, f)| f.split_whitespace().map(str::to_owned).collect())
            })
            .unwrap_or_default();
        let flag = |f: &str| flags.iter().any(|x| x == f);
        HostKind {
            vendor,
            paging,
            tdp_mmu,
            ept_npt,
            nested: flag("hypervisor"),
            hw_virt_flag: flag("vmx") || flag("svm"),
            kvm_modules,
        }
    }

    /// The vmmu MMU to compare this host with (`vmmu run --mmu ...`).
    pub fn vmmu_mmu(&self) -> &'static str {
        match self.paging {
            Paging::Tdp => "tdp",
            Paging::LegacyTdp => "legacy-tdp",
            Paging::Shadow => "shadow",
        }
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim() {
        "Y" | "y" | "1" => Some(true),
        "N" | "n" | "0" => Some(false),
        _ => None,
    }
}

impl fmt::Display for HostKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vendor = match self.vendor {
            Vendor::Vmx => "VMX (kvm_intel)",
            Vendor::Svm => "SVM (kvm_amd)",
            Vendor::Pvm => "PVM (kvm_pvm)",
            Vendor::Unknown => "unknown vendor",
        };
        let paging = match self.paging {
            Paging::Tdp => "TDP (EPT/NPT) with the TDP MMU",
            Paging::LegacyTdp => "TDP (EPT/NPT) with the legacy MMU",
            Paging::Shadow => "shadow paging",
        };
        write!(f, "{vendor}, {paging}")?;
        if let Some(t) = self.tdp_mmu {
            write!(f, ", tdp_mmu={}", if t { 'Y' } else { 'N' })?;
        }
        if self.nested {
            write!(f, ", nested (running under a hypervisor)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_root(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("vmmu-kvm-host-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for (path, content) in files {
            let p = root.join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, content).unwrap();
        }
        root
    }

    #[test]
    fn pvm_host_is_shadow() {
        let root = fake_root(
            "pvm",
            &[
                ("sys/module/kvm/parameters/tdp_mmu", "N\n"),
                ("sys/module/kvm_pvm/parameters/force", "N\n"),
                ("proc/cpuinfo", "flags\t\t: fpu pae lm hypervisor\n"),
            ],
        );
        let h = HostKind::detect_from(&root);
        assert_eq!(h.vendor, Vendor::Pvm);
        assert_eq!(h.paging, Paging::Shadow);
        assert_eq!(h.tdp_mmu, Some(false));
        assert!(h.nested && !h.hw_virt_flag);
        assert_eq!(h.vmmu_mmu(), "shadow");
        assert_eq!(h.to_string(), "PVM (kvm_pvm), shadow paging, tdp_mmu=N, nested (running under a hypervisor)");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn vmx_with_ept_and_tdp_mmu() {
        let root = fake_root(
            "vmx",
            &[
                ("sys/module/kvm/parameters/tdp_mmu", "Y\n"),
                ("sys/module/kvm_intel/parameters/ept", "Y\n"),
                ("proc/cpuinfo", "flags\t\t: fpu vmx lm\n"),
            ],
        );
        let h = HostKind::detect_from(&root);
        assert_eq!((h.vendor, h.paging, h.ept_npt), (Vendor::Vmx, Paging::Tdp, Some(true)));
        assert!(h.hw_virt_flag && !h.nested);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn svm_without_npt_is_shadow_and_legacy_tdp_when_tdp_mmu_off() {
        let root = fake_root(
            "svm",
            &[("sys/module/kvm/parameters/tdp_mmu", "N\n"), ("sys/module/kvm_amd/parameters/npt", "0\n")],
        );
        assert_eq!(HostKind::detect_from(&root).paging, Paging::Shadow);
        fs::write(root.join("sys/module/kvm_amd/parameters/npt"), "1\n").unwrap();
        assert_eq!(HostKind::detect_from(&root).paging, Paging::LegacyTdp);
        fs::remove_dir_all(root).unwrap();
    }
}
