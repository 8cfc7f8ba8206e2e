//! `union kvm_mmu_page_role`: what a shadow page translates, packed in 32 bits with KVM's
//! bit positions.

macro_rules! role_bits {
    ($($(#[$doc:meta])* $get:ident / $set:ident : $shift:expr, $width:expr;)*) => {
        impl Role {
            $(
                $(#[$doc])*
                #[inline]
                pub const fn $get(self) -> u32 {
                    (self.0 >> $shift) & ((1 << $width) - 1)
                }
                #[doc = concat!("Returns the role with `", stringify!($get), "` set.")]
                #[inline]
                pub const fn $set(self, v: u32) -> Role {
                    let m = ((1u32 << $width) - 1) << $shift;
                    Role((self.0 & !m) | ((v << $shift) & m))
                }
            )*
        }
    };
}

/// The page role word.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Role(pub u32);

role_bits! {
    /// The guest uses 4-byte (32-bit non-PAE) entries.
    has_4_byte_gpte / with_has_4_byte_gpte: 4, 1;
    /// Quadrant of a 32-bit guest table shadowed by PAE tables.
    quadrant / with_quadrant: 5, 2;
    /// No guest table is shadowed.
    direct / with_direct: 7, 1;
    /// Zapped or obsolete.
    invalid / with_invalid: 11, 1;
    /// EFER.NX.
    efer_nx / with_efer_nx: 12, 1;
    /// CR0.WP.
    cr0_wp / with_cr0_wp: 13, 1;
    /// CR4.SMEP && !CR0.WP.
    smep_andnot_wp / with_smep_andnot_wp: 14, 1;
    /// CR4.SMAP && !CR0.WP.
    smap_andnot_wp / with_smap_andnot_wp: 15, 1;
    /// A/D bits disabled (access tracking).
    ad_disabled / with_ad_disabled: 16, 1;
    /// Belongs to an L2 MMU.
    guest_mode / with_guest_mode: 17, 1;
    /// Pass-through level.
    passthrough / with_passthrough: 18, 1;
    /// Address space (SMM).
    smm / with_smm: 24, 8;
}

impl Role {
    /// Level (1 = 4 KiB table ... 5 = PML5): bits 0-3.
    #[inline]
    pub const fn level(self) -> u8 {
        crate::num::low8((self.0 & 0xf) as u64)
    }

    /// ACC_* rights inherited from upper guest entries: bits 8-10.
    #[inline]
    pub const fn access(self) -> u8 {
        crate::num::low8(((self.0 >> 8) & 7) as u64)
    }

    /// Returns the role with `access` set (only its low 3 bits are kept).
    #[inline]
    pub const fn with_access(self, access: u8) -> Role {
        Role((self.0 & !(7 << 8)) | ((access as u32 & 7) << 8))
    }

    /// Returns the role with `level` set (only its low 4 bits are kept).
    #[inline]
    pub const fn with_level(self, level: u8) -> Role {
        Role((self.0 & !0xf) | (level as u32 & 0xf))
    }
}

impl std::fmt::Debug for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Role({:#x}: l{} direct {} access {} invalid {} ad_disabled {})",
            self.0,
            self.level(),
            self.direct(),
            self.access(),
            self.invalid(),
            self.ad_disabled()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_at_kvm_positions() {
        let r = Role(0)
            .with_level(4)
            .with_direct(1)
            .with_access(7)
            .with_efer_nx(1)
            .with_cr0_wp(1)
            .with_ad_disabled(1)
            .with_smm(1);
        assert_eq!(r.0, 4 | 1 << 7 | 7 << 8 | 1 << 12 | 1 << 13 | 1 << 16 | 1 << 24);
        assert_eq!((r.level(), r.direct(), r.access(), r.invalid(), r.smm()), (4, 1, 7, 0, 1));
        assert_eq!(r.with_invalid(1).invalid(), 1);
        assert_eq!(r.with_quadrant(3).quadrant(), 3);
        assert_eq!(r.with_level(99).level(), 99 & 15);
    }
}
