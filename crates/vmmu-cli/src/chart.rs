//! Bar charts for `vmmu sweep`'s plots, as SVG: grouped bar charts with a linear or
//! logarithmic y axis and a multi-level x axis (outer levels label runs of groups).
//!
//! Every bar is a `<rect class="bar">` carrying `data-group`, `data-series` and `data-value`
//! attributes and a `<title>` (the tooltip), so tests and tools can read the values back.

use crate::svg::escape as esc;
use std::fmt::Write as _;

/// Colours of the series, in order (colour-blind-safe Okabe–Ito palette).
pub const PALETTE: &[&str] = &["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"];

/// A grouped bar chart.
#[derive(Debug, Clone)]
pub struct BarChart {
    /// Title above the plot.
    pub title: String,
    /// Y axis label.
    pub y_label: String,
    /// X axis title under the labels (may be empty).
    pub x_label: String,
    /// Per group, its labels from the outermost level to the innermost (every group has the
    /// same number of levels). Adjacent groups with equal outer labels share one.
    pub groups: Vec<Vec<String>>,
    /// Series names (one bar per series in each group), with the legend.
    pub series: Vec<String>,
    /// `values[group][series]`; `None` draws no bar (a failed cell).
    pub values: Vec<Vec<Option<f64>>>,
    /// Logarithmic y axis (base 10); zero values get a zero-height bar and a "0" mark.
    pub log_y: bool,
    /// Formats a value for the tooltip and the axis.
    pub unit: Unit,
}

/// How values are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Plain counts (1k, 10k, 1M on the axis).
    Count,
    /// Milliseconds.
    Millis,
}

impl Unit {
    fn axis(self, v: f64) -> String {
        match self {
            Unit::Count => si(v),
            Unit::Millis => format!("{} ms", trim(v)),
        }
    }

    // A count's value, shown whole: the bars' values are counts (whole, >= 0) stored as f64.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn exact(self, v: f64) -> String {
        match self {
            Unit::Count => format!("{}", v as u64),
            Unit::Millis => format!("{v:.2} ms"),
        }
    }
}

fn trim(v: f64) -> String {
    if v >= 1.0 && v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn si(v: f64) -> String {
    match v {
        x if x >= 1e9 => format!("{}G", trim(x / 1e9)),
        x if x >= 1e6 => format!("{}M", trim(x / 1e6)),
        x if x >= 1e3 => format!("{}k", trim(x / 1e3)),
        x => trim(x),
    }
}

/// Rough width of `s` in pixels at `size` px in a sans-serif font.
fn text_width(s: &str, size: f64) -> f64 {
    s.chars().count() as f64 * size * 0.56
}

/// Ticks of a linear axis from 0 to at least `max`: (top of axis, tick values).
// `top / step` is a whole number from 1 to 5: the step is picked so that 5 steps reach `max`.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn linear_ticks(max: f64) -> (f64, Vec<f64>) {
    let max = if max > 0.0 { max } else { 1.0 };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| s * 5.0 >= max).unwrap_or(10.0 * mag);
    let top = (max / step).ceil() * step;
    let n = (top / step).round() as usize;
    (top, (0..=n).map(|i| i as f64 * step).collect())
}

/// A whole decade exponent (a floored or ceiled log10) as an integer.
// log10 of a finite positive f64 is within ±324, and the callers pass it floored or ceiled.
#[allow(clippy::cast_possible_truncation)]
fn decade(e: f64) -> i32 {
    e as i32
}

impl BarChart {
    /// The chart as a standalone SVG document.
    pub fn render(&self) -> String {
        let ns = self.series.len().max(1);
        let levels = self.groups.first().map_or(0, Vec::len);
        let bar_w = if ns == 1 { 14.0 } else { 9.0 };
        let gap = 8.0;
        let group_w = ns as f64 * bar_w + gap;
        let inner_labels: Vec<&str> = self.groups.iter().map(|g| g.last().map_or("", String::as_str)).collect();
        let inner_h = inner_labels.iter().map(|l| text_width(l, 11.0)).fold(0.0, f64::max) * 0.71 + 14.0;
        let outer_h = levels.saturating_sub(1) as f64 * 18.0;
        let left = 78.0;
        let right = 24.0;
        let top = 64.0;
        let plot_h = 300.0;
        let plot_w = (self.groups.len() as f64 * group_w).max(200.0);
        let legend_w: f64 = self.series.iter().map(|s| text_width(s, 12.0) + 34.0).sum();
        let x_title_h = if self.x_label.is_empty() { 0.0 } else { 22.0 };
        // Wide enough for the plot, the legend, the (bold) title and the x axis title.
        let width = (left + plot_w + right)
            .max(left + legend_w + right)
            .max(left + text_width(&self.title, 16.0) * 1.12 + right)
            .max(text_width(&self.x_label, 12.0) + 40.0);
        let height = top + plot_h + inner_h + outer_h + x_title_h + 16.0;
        let base_y = top + plot_h;

        let vals: Vec<f64> = self.values.iter().flatten().flatten().copied().collect();
        let vmax = vals.iter().copied().fold(0.0, f64::max);
        // Map a value to a y coordinate, and the tick values.
        let (ticks, scale): (Vec<f64>, Box<dyn Fn(f64) -> f64>) = if self.log_y {
            let minpos = vals.iter().copied().filter(|v| *v > 0.0).fold(f64::INFINITY, f64::min);
            let lo = if minpos.is_finite() { minpos.log10().floor() } else { 0.0 };
            let hi = if vmax > 0.0 { vmax.log10().ceil().max(lo + 1.0) } else { lo + 1.0 };
            let ticks = (decade(lo)..=decade(hi)).map(|e| 10f64.powi(e)).collect();
            // The axis starts a quarter decade below the lowest tick, so the smallest value
            // (e.g. a count of 1) still gets a visible bar.
            let bottom = lo - 0.25;
            (
                ticks,
                Box::new(
                    move |v: f64| {
                        if v <= 0.0 {
                            base_y
                        } else {
                            base_y - (v.log10() - bottom) / (hi - bottom) * plot_h
                        }
                    },
                ),
            )
        } else {
            let (axis_top, ticks) = linear_ticks(vmax);
            (ticks, Box::new(move |v: f64| base_y - v / axis_top * plot_h))
        };

        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"#
        );
        let _ = writeln!(s, r#"<rect x="0" y="0" width="{width:.0}" height="{height:.0}" fill="white"/>"#);
        let _ =
            writeln!(s, r#"<text x="{left:.0}" y="24" font-size="16" font-weight="bold">{}</text>"#, esc(&self.title));
        // Legend.
        let mut lx = left;
        for (i, name) in self.series.iter().enumerate() {
            let c = PALETTE[i % PALETTE.len()];
            let _ = writeln!(
                s,
                r#"<rect class="legend" x="{lx:.1}" y="36" width="14" height="12" fill="{c}"/><text x="{:.1}" y="46.5" font-size="12">{}</text>"#,
                lx + 19.0,
                esc(name)
            );
            lx += text_width(name, 12.0) + 34.0;
        }
        // Y grid, ticks and label.
        for t in &ticks {
            let y = scale(*t);
            let _ = writeln!(
                s,
                r##"<line x1="{left:.1}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd" stroke-width="1"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
                left + plot_w,
                left - 6.0,
                y + 4.0,
                esc(&self.unit.axis(*t))
            );
        }
        let _ = writeln!(
            s,
            r#"<text transform="translate(16 {:.1}) rotate(-90)" font-size="12" text-anchor="middle">{}{}</text>"#,
            top + plot_h / 2.0,
            esc(&self.y_label),
            if self.log_y { " (log scale)" } else { "" }
        );
        // Bars.
        for (gi, g) in self.groups.iter().enumerate() {
            let gx = left + gi as f64 * group_w + gap / 2.0;
            for (si_, name) in self.series.iter().enumerate() {
                let Some(v) = self.values.get(gi).and_then(|r| r.get(si_)).copied().flatten() else { continue };
                let x = gx + si_ as f64 * bar_w;
                let y = scale(v).min(base_y);
                let h = base_y - y;
                let c = PALETTE[si_ % PALETTE.len()];
                let label = g.join(" / ");
                let _ = writeln!(
                    s,
                    r#"<rect class="bar" data-group="{}" data-series="{}" data-value="{v}" x="{x:.1}" y="{y:.1}" width="{:.1}" height="{h:.1}" fill="{c}"><title>{} — {}: {}</title></rect>"#,
                    esc(&label),
                    esc(name),
                    bar_w - 1.0,
                    esc(&label),
                    esc(name),
                    esc(&self.unit.exact(v))
                );
                if v == 0.0 {
                    let _ = writeln!(
                        s,
                        r##"<text x="{:.1}" y="{:.1}" font-size="8" text-anchor="middle" fill="#555">0</text>"##,
                        x + bar_w / 2.0,
                        base_y - 2.0
                    );
                }
            }
        }
        // Axes.
        let _ = writeln!(
            s,
            r##"<line x1="{left:.1}" x2="{:.1}" y1="{base_y:.1}" y2="{base_y:.1}" stroke="#333"/><line x1="{left:.1}" x2="{left:.1}" y1="{top:.1}" y2="{base_y:.1}" stroke="#333"/>"##,
            left + plot_w
        );
        // Innermost labels, rotated.
        for (gi, l) in inner_labels.iter().enumerate() {
            let cx = left + gi as f64 * group_w + group_w / 2.0;
            let _ = writeln!(
                s,
                r#"<text class="xlabel" transform="translate({:.1} {:.1}) rotate(-45)" font-size="11" text-anchor="end">{}</text>"#,
                cx + 3.0,
                base_y + 12.0,
                esc(l)
            );
        }
        // Outer levels: runs of equal labels (with equal outer prefixes), innermost-but-one
        // first, each a row further down, with separators between runs.
        for lvl in (0..levels.saturating_sub(1)).rev() {
            let row = (levels - 2 - lvl) as f64;
            let y = base_y + inner_h + row * 18.0 + 12.0;
            let mut start = 0;
            while start < self.groups.len() {
                let mut end = start + 1;
                while end < self.groups.len() && self.groups[end][..=lvl] == self.groups[start][..=lvl] {
                    end += 1;
                }
                let x0 = left + start as f64 * group_w;
                let x1 = left + end as f64 * group_w;
                let label = &self.groups[start][lvl];
                let _ = writeln!(
                    s,
                    r##"<text class="xgroup" x="{:.1}" y="{y:.1}" font-size="12" text-anchor="middle">{}</text><line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#999"/>"##,
                    (x0 + x1) / 2.0,
                    esc(label),
                    x0 + 3.0,
                    x1 - 3.0,
                    y - 13.0,
                    y - 13.0
                );
                start = end;
            }
        }
        // Separators in the plot between runs of groups: solid where an outer level changes,
        // dashed where only an inner one does.
        for gi in 1..self.groups.len() {
            let Some(lvl) = (0..levels.saturating_sub(1)).find(|&l| self.groups[gi][..=l] != self.groups[gi - 1][..=l])
            else {
                continue;
            };
            let x = left + gi as f64 * group_w;
            let style = match lvl {
                0 => r##"stroke="#777""##,
                1 => r##"stroke="#aaa""##,
                _ => r##"stroke="#ccc" stroke-dasharray="3 3""##,
            };
            let _ =
                writeln!(s, r#"<line class="sep" x1="{x:.1}" x2="{x:.1}" y1="{top:.1}" y2="{base_y:.1}" {style}/>"#);
        }
        if !self.x_label.is_empty() {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text>"#,
                (left + plot_w / 2.0).max(text_width(&self.x_label, 12.0) / 2.0 + 20.0),
                height - 10.0,
                esc(&self.x_label)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks() {
        assert_eq!(linear_ticks(9.0).1, vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(linear_ticks(100.0).0, 100.0);
        assert_eq!(si(16384.0), "16.384k");
        assert_eq!(si(1e6), "1M");
        assert_eq!(esc("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }

    #[test]
    fn one_bar_per_value() {
        let c = BarChart {
            title: "t".into(),
            y_label: "y".into(),
            x_label: String::new(),
            groups: vec![vec!["a".into(), "x".into()], vec!["a".into(), "y".into()], vec!["b".into(), "x".into()]],
            series: vec!["s1".into(), "s2".into()],
            values: vec![vec![Some(1.0), Some(10.0)], vec![Some(0.0), None], vec![Some(100.0), Some(5.0)]],
            log_y: true,
            unit: Unit::Count,
        };
        let svg = c.render();
        assert_eq!(svg.matches(r#"class="bar""#).count(), 5);
        assert_eq!(svg.matches(r#"class="xgroup""#).count(), 2);
    }
}
