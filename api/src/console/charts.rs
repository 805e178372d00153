//! Charts drawn as SVG on the server. Geometry only approximates (a bar's length is a float);
//! every figure a person reads is the exact decimal string, in the chart's labels and in
//! the table each chart stands beside.

use maud::{Markup, html};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

/// One labelled bar.
#[derive(Debug, Clone)]
pub struct Bar {
    /// What it measures.
    pub label: String,
    /// Its value (negative bars grow leftwards from the axis).
    pub value: Decimal,
}

fn to_f64(d: Decimal) -> f64 {
    d.to_f64().unwrap_or(0.0)
}

/// Horizontal bars with their exact values, titled for screen readers by `title`.
pub fn bars(title: &str, bars: &[Bar]) -> Markup {
    let row = 26.0;
    let label_w = 110.0;
    let value_w = 120.0;
    let width = 560.0;
    let plot = width - label_w - value_w;
    let max = bars
        .iter()
        .map(|b| to_f64(b.value).abs())
        .fold(0.0_f64, f64::max);
    let has_negative = bars.iter().any(|b| b.value < Decimal::ZERO);
    // With negative bars the axis sits in the middle.
    let axis = if has_negative { plot / 2.0 } else { 0.0 };
    let span = if has_negative { plot / 2.0 } else { plot };
    let height = row * bars.len() as f64 + 4.0;
    html! {
        svg class="chart" role="img" viewBox={ "0 0 " (width) " " (height) } width=(width) height=(height) {
            title { (title) }
            @for (i, b) in bars.iter().enumerate() {
                @let y = 2.0 + row * i as f64;
                @let len = if max > 0.0 { to_f64(b.value).abs() / max * span } else { 0.0 };
                @let x = if b.value < Decimal::ZERO { label_w + axis - len } else { label_w + axis };
                text x=(label_w - 8.0) y=(y + row * 0.62) text-anchor="end" class="label" { (b.label) }
                rect x=(x) y=(y + 4.0) width=(len.max(1.0)) height=(row - 8.0)
                    class={ "bar" @if b.value < Decimal::ZERO { " negative" } } {}
                text x=(label_w + plot + 8.0) y=(y + row * 0.62) class="value" { (b.value) }
            }
            @if has_negative {
                line x1=(label_w + axis) x2=(label_w + axis) y1="0" y2=(height) class="axis" {}
            }
        }
    }
}

/// One month of money in and out.
#[derive(Debug, Clone)]
pub struct MonthBars {
    /// `YYYY-MM`.
    pub month: String,
    /// Money in.
    pub inflow: Decimal,
    /// Money out.
    pub outflow: Decimal,
}

/// Paired columns per month (in above the axis, out below), titled by `title`.
pub fn months(title: &str, months: &[MonthBars]) -> Markup {
    let col = 44.0;
    let height = 200.0;
    let mid = height / 2.0;
    let left = 8.0;
    let width = (left + col * months.len() as f64 + 8.0).max(200.0);
    let max = months
        .iter()
        .flat_map(|m| [to_f64(m.inflow).abs(), to_f64(m.outflow).abs()])
        .fold(0.0_f64, f64::max);
    let scale = |d: Decimal| {
        if max > 0.0 {
            to_f64(d).abs() / max * (mid - 22.0)
        } else {
            0.0
        }
    };
    html! {
        svg class="chart" role="img" viewBox={ "0 0 " (width) " " (height) } width=(width) height=(height) {
            title { (title) }
            line x1="0" x2=(width) y1=(mid) y2=(mid) class="axis" {}
            @for (i, m) in months.iter().enumerate() {
                @let x = left + col * i as f64;
                @let up = scale(m.inflow);
                @let down = scale(m.outflow);
                rect x=(x + 8.0) y=(mid - up) width=(col - 16.0) height=(up.max(0.5)) class="bar in" {
                    title { (m.month) " in " (m.inflow) }
                }
                rect x=(x + 8.0) y=(mid) width=(col - 16.0) height=(down.max(0.5)) class="bar out" {
                    title { (m.month) " out " (m.outflow) }
                }
                text x=(x + col / 2.0) y=(height - 4.0) text-anchor="middle" class="label small" { (m.month.get(2..).unwrap_or(&m.month)) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_carry_exact_values_and_scale_to_the_largest() {
        let svg = bars(
            "AR aging",
            &[
                Bar {
                    label: "current".into(),
                    value: Decimal::new(100_050, 2),
                },
                Bar {
                    label: "1_30".into(),
                    value: Decimal::new(50_025, 2),
                },
            ],
        )
        .into_string();
        assert!(svg.contains("1000.50") && svg.contains("500.25"));
        assert!(svg.contains("width=\"330\""), "{svg}");
        assert!(svg.contains("width=\"165\""), "{svg}");
        assert!(svg.contains("<title>AR aging</title>"));
    }
}
