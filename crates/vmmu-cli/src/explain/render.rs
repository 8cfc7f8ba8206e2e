//! The rendering of an [`Explanation`]: the step-by-step text `vmmu explain` prints and the
//! SVG diagram of `--svg`. Everything here reads the finished explanation; the walks are
//! made in the parent module.

use super::{
    ept_bits, level_name, role_text, x86_addr, x86_bits, Dimension, Explanation, GuestStep, NestedWalk, TableStep, P,
    PS,
};
use crate::svg::Svg;
use std::fmt::Write as _;
use vmmu::x86_paging::access::AccessKind;
use vmmu::x86_paging::entry::{EptEntry, ADDR_MASK_4K};
use vmmu::x86_paging::mode::PagingMode;

fn kind_name(k: AccessKind) -> &'static str {
    match k {
        AccessKind::Read => "read",
        AccessKind::Write => "write",
        AccessKind::Fetch => "fetch",
    }
}

fn tdp_line(ept: bool, s: &TableStep) -> String {
    let leaf = s.level == 1 || s.entry & PS != 0;
    let bits = if ept { ept_bits(s.entry, leaf) } else { x86_bits(s.entry) };
    let present = if ept { s.entry & EptEntry::RWX != 0 } else { s.entry & P != 0 };
    let to = if !present {
        "not present".to_string()
    } else if leaf {
        format!("-> page HPA {:#x}", x86_addr(s.level, s.entry))
    } else {
        format!("-> table HPA {:#x}", s.entry & ADDR_MASK_4K)
    };
    let mut l = format!(
        "{} level {} ({:5}) table HPA {:#x} index {:3}  entry {:#018x}  {bits}  {to}",
        if ept { "EPT" } else { "NPT" },
        s.level,
        level_name(s.level),
        s.table_hpa,
        s.index,
        s.entry
    );
    if let Some(sp) = &s.sp {
        let _ = write!(l, "  [{}]", role_text(sp));
    }
    l
}

fn nested_text(out: &mut String, ept: bool, n: &NestedWalk, what: &str) {
    let _ = writeln!(out, "    {} walk of GPA {:#x} ({what}):", if ept { "EPT" } else { "NPT" }, n.gpa);
    for s in &n.steps {
        let _ = writeln!(out, "      {}", tdp_line(ept, s));
    }
    if n.ad_updates > 0 {
        let _ = writeln!(out, "      + {} A/D update(s) the hardware would make", n.ad_updates);
    }
}

impl Explanation {
    /// The explanation as text.
    pub fn text(&self, title: &str) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "vmmu explain {:#x}: {title}, vCPU {}, a {} at CPL {}",
            self.gva,
            self.vcpu,
            kind_name(self.access),
            self.cpl
        );
        let levels = self.guest_mode.levels();
        let _ = writeln!(o, "guest: {:?} paging ({levels} levels), CR3 {:#x}", self.guest_mode, self.cr3);
        let ept = match self.dim {
            Dimension::Tdp { ept, levels, ad, root } => {
                let _ = writeln!(
                    o,
                    "TDP: {} {levels}-level{}, root table at HPA {root:#x}",
                    if ept { "EPT" } else { "NPT" },
                    if ept {
                        if ad {
                            ", A/D bits on"
                        } else {
                            ", A/D bits off"
                        }
                    } else {
                        ""
                    }
                );
                ept
            }
            Dimension::Shadow { root, levels } => {
                let _ = writeln!(o, "shadow paging: {levels}-level shadow root at HPA {root:#x}");
                false
            }
        };
        let _ = writeln!(o);
        if matches!(self.dim, Dimension::Shadow { .. }) {
            let _ = writeln!(o, "1. the guest walk (KVM's FNAME(walk_addr), through memslots): GVA -> GPA");
        }
        for g in &self.guest {
            let _ = writeln!(
                o,
                "guest level {} ({}): table GPA {:#x}, index {}, entry at GPA {:#x}",
                g.level,
                level_name(g.level),
                g.table_gpa,
                g.index,
                g.entry_gpa
            );
            if let Some(n) = &g.nested {
                nested_text(&mut o, ept, n, "the guest table page");
            }
            let to = if g.entry & P == 0 {
                "not present".to_string()
            } else if is_leaf_any(g.level, g.entry, self.guest_mode) {
                format!("-> page GPA {:#x}", x86_addr(g.level, g.entry))
            } else {
                format!("-> next table GPA {:#x}", g.entry & ADDR_MASK_4K)
            };
            let at = g.entry_hpa.map(|h| format!("read at HPA {h:#x}: ")).unwrap_or_else(|| "register: ".into());
            let _ = writeln!(o, "    {at}{:#018x}  {}  {to}", g.entry, x86_bits(g.entry));
        }
        if let Some(gpa) = self.gpa {
            let _ = writeln!(o, "final GPA {gpa:#x}");
        }
        if let Some(n) = &self.final_nested {
            nested_text(&mut o, ept, n, if self.hpa.is_some() { "the final GPA" } else { "where it exited" });
        }
        if !self.shadow.is_empty() || matches!(self.dim, Dimension::Shadow { .. }) {
            if let Some(h) = self.slot_hpa {
                let _ = writeln!(o, "    through its memslot and the host page table: HPA {h:#x}");
            }
            let _ = writeln!(o, "\n2. the hardware walk of the shadow page tables: GVA -> HPA");
            for s in &self.shadow {
                let to = if s.entry & P == 0 {
                    "not present".to_string()
                } else if s.level == 1 || s.entry & PS != 0 {
                    format!("-> page HPA {:#x}", x86_addr(s.level, s.entry))
                } else {
                    format!("-> table HPA {:#x}", s.entry & ADDR_MASK_4K)
                };
                let _ = writeln!(
                    o,
                    "shadow level {} ({:5}) table HPA {:#x} index {:3}  SPTE {:#018x}  {}  {to}",
                    s.level,
                    level_name(s.level),
                    s.table_hpa,
                    s.index,
                    s.entry,
                    x86_bits(s.entry)
                );
                if let Some(sp) = &s.sp {
                    let _ = writeln!(o, "    shadow page: {}", role_text(sp));
                }
            }
        }
        let _ = writeln!(o);
        match (self.gpa, self.hpa) {
            (Some(g), Some(h)) => {
                let _ = writeln!(o, "result: GVA {:#x} -> GPA {g:#x} -> HPA {h:#x}", self.gva);
            }
            (_, Some(h)) => {
                let _ = writeln!(o, "result: GVA {:#x} -> HPA {h:#x}", self.gva);
            }
            _ => {}
        }
        if let (Some(a), Some(b)) = (self.slot_hpa, self.hpa) {
            let _ = writeln!(
                o,
                "the shadow SPTE {} the memslot translation",
                if a & !0xfff == b & !0xfff { "agrees with" } else { "DIFFERS from" }
            );
        }
        if let Some(f) = &self.failure {
            let _ = writeln!(o, "fault: {f}");
        }
        match self.walker_refs {
            Some(w) => {
                let _ = writeln!(o, "memory references: {} (x86-paging's walk_2d counts {w})", self.mem_refs);
            }
            None => {
                let what = match self.dim {
                    Dimension::Tdp { .. } => "made by the 2D walk up to the fault",
                    Dimension::Shadow { .. } => "the hardware walk of the shadow tables",
                };
                let _ = writeln!(o, "memory references: {} ({what})", self.mem_refs);
            }
        }
        o
    }
}

fn is_leaf_any(level: u8, e: u64, mode: PagingMode) -> bool {
    level == 1 || (e & PS != 0 && (level == 2 || (level == 3 && mode != PagingMode::Pae)))
}

/// Box geometry of the diagram.
const BW: f64 = 250.0;
const BH: f64 = 102.0;
const GX: f64 = 46.0;
const GY: f64 = 44.0;

impl Explanation {
    /// The walk as an SVG diagram. TDP: a grid with a row per guest level (and one for the
    /// final GPA), the TDP walk of that row's guest-physical access in columns (top level
    /// first) and the guest entry at the right; arrows follow the references. Shadow: the
    /// guest walk on the first row, the shadow walk on the second.
    pub fn svg(&self, title: &str) -> String {
        match self.dim {
            Dimension::Tdp { ept, levels, .. } => self.svg_2d(title, ept, levels),
            Dimension::Shadow { .. } => self.svg_shadow(title),
        }
    }

    fn header(&self, s: &mut Svg, title: &str, sub: &str) {
        s.text(GX, 30.0, 17.0, "bold", "#111", &format!("vmmu explain {:#x} — {title}", self.gva));
        s.text(GX, 52.0, 12.0, "normal", "#333", sub);
    }

    fn footer(&self, s: &mut Svg, y: f64) {
        let res = match (self.gpa, self.hpa) {
            (Some(g), Some(h)) => format!("GVA {:#x} -> GPA {g:#x} -> HPA {h:#x}", self.gva),
            (_, Some(h)) => format!("GVA {:#x} -> HPA {h:#x}", self.gva),
            _ => format!("GVA {:#x}: no translation", self.gva),
        };
        s.text(GX, y, 13.0, "bold", "#111", &res);
        let refs = match self.walker_refs {
            Some(w) => format!("memory references: {} (walk_2d: {w})", self.mem_refs),
            None => format!("memory references: {} (hardware walk, up to any fault)", self.mem_refs),
        };
        s.text(GX, y + 20.0, 12.0, "normal", "#333", &refs);
        if let Some(f) = &self.failure {
            s.text(GX, y + 40.0, 12.0, "bold", "#b00", &format!("fault: {f}"));
        }
    }

    fn tdp_box(s: &mut Svg, x: f64, y: f64, ept: bool, st: &TableStep) {
        let present = if ept { st.entry & EptEntry::RWX != 0 } else { st.entry & P != 0 };
        let leaf = st.level == 1 || st.entry & PS != 0;
        let (fill, stroke) = if !present { ("#fde2e2", "#b00") } else { ("#e3eefc", "#3566a8") };
        let mut lines = vec![
            format!("table HPA {:#x}", st.table_hpa),
            format!("index {}  entry {:#x}", st.index, st.entry),
            if ept { ept_bits(st.entry, leaf) } else { x86_bits(st.entry) },
        ];
        lines.push(if !present {
            "NOT PRESENT".into()
        } else if leaf {
            format!("page HPA {:#x}", x86_addr(st.level, st.entry))
        } else {
            format!("next HPA {:#x}", st.entry & ADDR_MASK_4K)
        });
        let title = format!("{} L{} {}", if ept { "EPT" } else { "NPT" }, st.level, level_name(st.level));
        s.text_box(x, y, BW, BH, fill, stroke, &title, &lines);
    }

    fn guest_box(s: &mut Svg, x: f64, y: f64, g: &GuestStep, mode: PagingMode, label: &str) {
        let present = g.entry & P != 0;
        let (fill, stroke) = if !present { ("#fde2e2", "#b00") } else { ("#e6f4e3", "#3b7d32") };
        let to = if !present {
            "NOT PRESENT".to_string()
        } else if is_leaf_any(g.level, g.entry, mode) {
            format!("page GPA {:#x}", x86_addr(g.level, g.entry))
        } else {
            format!("next table GPA {:#x}", g.entry & ADDR_MASK_4K)
        };
        let lines = vec![
            format!("table GPA {:#x} index {}", g.table_gpa, g.index),
            format!("entry {:#x}", g.entry),
            x86_bits(g.entry),
            to,
        ];
        s.text_box(x, y, BW, BH, fill, stroke, &format!("{label} L{} {}", g.level, level_name(g.level)), &lines);
    }

    fn svg_2d(&self, title: &str, ept: bool, levels: u8) -> String {
        let cols = f64::from(levels) + 1.0;
        let rows = self.guest.len() as f64 + 1.0;
        let top = 120.0;
        let left = GX + 150.0;
        let w = left + cols * (BW + GX) + 20.0;
        let h = top + rows * (BH + GY) + 80.0;
        let mut s = Svg::new(w, h);
        let dim = if ept { "EPT" } else { "NPT" };
        self.header(
            &mut s,
            title,
            &format!(
                "2D walk: {:?} guest paging (rows) x {levels}-level {dim} (columns), vCPU {}, {} at CPL {}",
                self.guest_mode,
                self.vcpu,
                kind_name(self.access),
                self.cpl
            ),
        );
        for c in 0..levels {
            let x = left + f64::from(c) * (BW + GX);
            s.text(x + 4.0, top - 14.0, 13.0, "bold", "#3566a8", &format!("{dim} level {}", levels - c));
        }
        s.text(left + cols.mul_add(BW + GX, -(BW + GX)) + 4.0, top - 14.0, 13.0, "bold", "#3b7d32", "guest entry");
        let col_x = |step: &TableStep| left + f64::from(levels - step.level) * (BW + GX);
        let gx = left + f64::from(levels) * (BW + GX);
        let mut prev_guest: Option<(f64, f64)> = None;
        let rows_iter = self
            .guest
            .iter()
            .map(|g| (Some(g), g.nested.as_ref()))
            .chain(std::iter::once((None, self.final_nested.as_ref())));
        for (r, (g, nested)) in rows_iter.enumerate() {
            let y = top + r as f64 * (BH + GY);
            let (label, gpa) = match (g, nested) {
                (Some(g), _) => (format!("guest level {}", g.level), g.table_gpa),
                (None, Some(n)) => ("final GPA".to_string(), n.gpa),
                (None, None) => continue,
            };
            s.text(GX, y + BH / 2.0 - 4.0, 12.0, "bold", "#333", &label);
            s.text(GX, y + BH / 2.0 + 12.0, 11.0, "normal", "#333", &format!("GPA {gpa:#x}"));
            let mut last: Option<(f64, f64)> = None;
            if let Some((px, py)) = prev_guest {
                // The previous guest entry gives this row's guest-physical address.
                let first_x = nested.and_then(|n| n.steps.first()).map_or(gx, col_x);
                s.arrow(px + BW / 2.0, py + BH, first_x + BW / 2.0, y, "#3b7d32", true, Some("GPA"));
            }
            if let Some(n) = nested {
                for st in &n.steps {
                    let x = col_x(st);
                    Self::tdp_box(&mut s, x, y, ept, st);
                    if let Some((lx, ly)) = last {
                        s.arrow(lx + BW, ly + BH / 2.0, x, y + BH / 2.0, "#3566a8", false, None);
                    }
                    last = Some((x, y));
                }
            }
            match g {
                Some(g) => {
                    Self::guest_box(&mut s, gx, y, g, self.guest_mode, "guest");
                    if let Some((lx, ly)) = last {
                        s.arrow(lx + BW, ly + BH / 2.0, gx, y + BH / 2.0, "#3566a8", false, None);
                    }
                    prev_guest = Some((gx, y));
                }
                None => {
                    if let (Some(h), Some((lx, ly))) = (self.hpa, last) {
                        let lines = vec![format!("HPA {h:#x}"), format!("GPA {:#x}", self.gpa.unwrap_or(0))];
                        s.text_box(gx, y, BW, BH, "#fff4d6", "#a87b00", "final page", &lines);
                        s.arrow(lx + BW, ly + BH / 2.0, gx, y + BH / 2.0, "#a87b00", false, None);
                    }
                }
            }
        }
        self.footer(&mut s, top + rows * (BH + GY) + 10.0);
        s.finish()
    }

    fn svg_shadow(&self, title: &str) -> String {
        let n = self.guest.len().max(self.shadow.len()) as f64 + 1.0;
        let left = GX + 150.0;
        let w = left + n * (BW + GX) + 20.0;
        let top = 110.0;
        let h = top + 2.0 * (BH + GY + 40.0) + 40.0;
        let mut s = Svg::new(w, h);
        self.header(
            &mut s,
            title,
            &format!(
                "shadow paging: the guest walk (KVM, through memslots) and the hardware walk of the shadow tables; {} at CPL {}",
                kind_name(self.access),
                self.cpl
            ),
        );
        let y0 = top;
        s.text(GX, y0 + BH / 2.0, 11.5, "bold", "#333", "guest walk");
        s.text(GX, y0 + BH / 2.0 + 15.0, 11.0, "normal", "#333", "GVA -> GPA");
        let mut last: Option<f64> = None;
        for (i, g) in self.guest.iter().enumerate() {
            let x = left + i as f64 * (BW + GX);
            Self::guest_box(&mut s, x, y0, g, self.guest_mode, "guest");
            if let Some(lx) = last {
                s.arrow(lx + BW, y0 + BH / 2.0, x, y0 + BH / 2.0, "#3b7d32", false, None);
            }
            last = Some(x);
        }
        if let (Some(gpa), Some(lx)) = (self.gpa, last) {
            let x = lx + BW + GX;
            let mut lines = vec![format!("GPA {gpa:#x}")];
            if let Some(h) = self.slot_hpa {
                lines.push(format!("memslot -> HPA {h:#x}"));
            }
            s.text_box(x, y0, BW, BH, "#fff4d6", "#a87b00", "guest-physical", &lines);
            s.arrow(lx + BW, y0 + BH / 2.0, x, y0 + BH / 2.0, "#a87b00", false, None);
        }
        let y1 = y0 + BH + GY + 40.0;
        s.text(GX, y1 + BH / 2.0, 11.5, "bold", "#333", "shadow walk");
        s.text(GX, y1 + BH / 2.0 + 15.0, 11.0, "normal", "#333", "GVA -> HPA");
        let mut last: Option<f64> = None;
        for (i, st) in self.shadow.iter().enumerate() {
            let x = left + i as f64 * (BW + GX);
            let present = st.entry & P != 0;
            let (fill, stroke) = if !present { ("#fde2e2", "#b00") } else { ("#e3eefc", "#3566a8") };
            let mut lines = vec![
                format!("table HPA {:#x} index {}", st.table_hpa, st.index),
                format!("SPTE {:#x}", st.entry),
                x86_bits(st.entry),
            ];
            if let Some(sp) = &st.sp {
                // Two lines: the box is narrower than the whole role.
                let t = role_text(sp);
                let cut = t.match_indices(' ').nth(4).map_or(t.len(), |(i, _)| i);
                lines.push(t[..cut].to_string());
                lines.push(format!("   {}", t[cut..].trim()));
            }
            s.text_box(x, y1, BW, BH, fill, stroke, &format!("shadow L{} {}", st.level, level_name(st.level)), &lines);
            if let Some(lx) = last {
                s.arrow(lx + BW, y1 + BH / 2.0, x, y1 + BH / 2.0, "#3566a8", false, None);
            }
            // Each shadow page shadows the guest table of the same level.
            if let Some(gi) = self.guest.iter().position(|g| g.level == st.level) {
                let gxp = left + gi as f64 * (BW + GX);
                s.arrow(x + BW / 2.0, y1, gxp + BW / 2.0, y0 + BH, "#999", true, Some("shadows"));
            }
            last = Some(x);
        }
        if let (Some(h), Some(lx)) = (self.hpa, last) {
            let x = lx + BW + GX;
            s.text_box(x, y1, BW, BH, "#fff4d6", "#a87b00", "final page", &[format!("HPA {h:#x}")]);
            s.arrow(lx + BW, y1 + BH / 2.0, x, y1 + BH / 2.0, "#a87b00", false, None);
        }
        self.footer(&mut s, y1 + BH + 40.0);
        s.finish()
    }
}
