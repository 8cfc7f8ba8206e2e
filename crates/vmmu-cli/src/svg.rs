//! A small SVG writer: boxes with lines of text, and arrows (for `vmmu explain --svg`).

use std::fmt::Write as _;

/// An SVG document being drawn.
pub struct Svg {
    width: f64,
    height: f64,
    body: String,
}

/// `s` with the XML special characters escaped.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c => o.push(c),
        }
    }
    o
}

impl Svg {
    /// An empty drawing of `width` x `height` user units (pixels).
    pub fn new(width: f64, height: f64) -> Self {
        Svg { width, height, body: String::new() }
    }

    /// A rectangle with rounded corners, filled with `fill`, outlined with `stroke`.
    pub fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str, stroke: &str) {
        let _ = writeln!(
            self.body,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" rx="5" fill="{}" stroke="{}" stroke-width="1.2"/>"#,
            escape(fill),
            escape(stroke)
        );
    }

    /// One line of text whose baseline starts at (`x`, `y`); `weight` is `normal` or `bold`.
    pub fn text(&mut self, x: f64, y: f64, size: f64, weight: &str, fill: &str, s: &str) {
        let _ = writeln!(
            self.body,
            r#"<text x="{x:.1}" y="{y:.1}" font-size="{size:.1}" font-weight="{}" fill="{}">{}</text>"#,
            escape(weight),
            escape(fill),
            escape(s)
        );
    }

    /// A box with a bold title line and further lines of monospace text.
    #[allow(clippy::too_many_arguments)]
    pub fn text_box(
        &mut self,
        x: f64,
        y: f64,
        w: f64,
        h: f64,
        fill: &str,
        stroke: &str,
        title: &str,
        lines: &[String],
    ) {
        self.rect(x, y, w, h, fill, stroke);
        self.text(x + 7.0, y + 16.0, 12.5, "bold", "#111", title);
        for (i, l) in lines.iter().enumerate() {
            self.text(x + 7.0, y + 32.0 + 14.0 * i as f64, 11.0, "normal", "#222", l);
        }
    }

    /// An arrow from (`x1`, `y1`) to (`x2`, `y2`), with an optional label at its middle.
    #[allow(clippy::too_many_arguments)]
    pub fn arrow(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, color: &str, dashed: bool, label: Option<&str>) {
        let _ = writeln!(
            self.body,
            r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="{}" stroke-width="1.6"{} marker-end="url(#arrow)"/>"#,
            escape(color),
            if dashed { r#" stroke-dasharray="5,3""# } else { "" }
        );
        if let Some(l) = label {
            self.text((x1 + x2) / 2.0 + 4.0, (y1 + y2) / 2.0 - 4.0, 10.0, "normal", "#555", l);
        }
    }

    /// The finished document.
    pub fn finish(self) -> String {
        format!(
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?>"#,
                "\n",
                r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}" font-family="DejaVu Sans Mono, Menlo, Consolas, monospace">"#,
                "\n<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\" fill=\"#444\"/></marker></defs>\n",
                r#"<rect x="0" y="0" width="{w:.0}" height="{h:.0}" fill="white"/>"#,
                "\n{body}</svg>\n"
            ),
            w = self.width,
            h = self.height,
            body = self.body
        )
    }
}
