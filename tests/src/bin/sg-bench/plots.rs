//! The SVG plots of results.md (plotters, SVG back end: text is left to the SVG viewer's
//! fonts, so nothing here needs a font library). Lines are medians; bars span min to max.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::{
    classifier::{self, CASES},
    control, forward,
    report::All,
    stats::Summary,
};

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(127, 127, 127),
];

fn e<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow!("plotting: {err:?}")
}

/// One line: label, points (x, min, median, max).
struct Series {
    label: String,
    color: RGBColor,
    points: Vec<(f64, f64, f64, f64)>,
}

fn series(label: &str, color: RGBColor, xs: &[usize], samples: &[Vec<f64>], scale: f64) -> Series {
    Series {
        label: label.to_string(),
        color,
        points: xs
            .iter()
            .zip(samples)
            .filter(|(_, v)| !v.is_empty())
            .map(|(x, v)| {
                let s = Summary::of(v);
                (*x as f64, s.min * scale, s.median * scale, s.max * scale)
            })
            .collect(),
    }
}

#[allow(clippy::too_many_arguments)]
fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    x_range: (f64, f64),
    log_y: bool,
    lines: &[Series],
) -> Result<()> {
    let root = SVGBackend::new(path, (820, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let ymax = lines
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.3))
        .fold(0.0f64, f64::max)
        * 1.15;
    let ymin = lines
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(f64::INFINITY, f64::min)
        .max(1e-9)
        * 0.8;
    let mut chart = ChartBuilder::on(&root);
    chart
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70);
    let x = (x_range.0..x_range.1).log_scale();
    // The two y axes are different coordinate types, so the drawing is spelled once here
    // and expanded for each.
    macro_rules! draw {
        ($c:ident, $legend:expr) => {{
            $c.configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .x_label_formatter(&|v| format!("{v:.0}"))
                .y_label_formatter(&|v| human(*v))
                .draw()
                .map_err(e)?;
            for s in lines {
                let col = s.color;
                $c.draw_series(LineSeries::new(
                    s.points.iter().map(|p| (p.0, p.2)),
                    col.stroke_width(2),
                ))
                .map_err(e)?
                .label(s.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2)));
                $c.draw_series(s.points.iter().map(|p| Circle::new((p.0, p.2), 3, col.filled())))
                    .map_err(e)?;
                $c.draw_series(
                    s.points
                        .iter()
                        .map(|p| PathElement::new(vec![(p.0, p.1), (p.0, p.3)], col.stroke_width(1))),
                )
                .map_err(e)?;
            }
            $c.configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position($legend)
                .draw()
                .map_err(e)?;
        }};
    }
    if log_y {
        let mut c = chart.build_cartesian_2d(x, (ymin..ymax).log_scale()).map_err(e)?;
        draw!(c, SeriesLabelPosition::LowerLeft);
    } else {
        let mut c = chart.build_cartesian_2d(x, 0.0..ymax).map_err(e)?;
        draw!(c, SeriesLabelPosition::UpperLeft);
    }
    root.present().map_err(e)?;
    Ok(())
}

fn human(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.3}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.3}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

pub fn classifier(dir: &Path, c: &classifier::Results) -> Result<()> {
    let mut lines: Vec<Series> = CASES
        .iter()
        .enumerate()
        .map(|(i, case)| series(case.short(), PALETTE[i], &classifier::RULES, &c.cost[i], 1.0))
        .collect();
    lines.push(series(
        "distinct new flows",
        PALETTE[4],
        &classifier::RULES,
        &c.distinct,
        1.0,
    ));
    let floor: Vec<f64> = c.floor.iter().flatten().copied().collect();
    lines.push(series(
        "pass-through floor",
        PALETTE[5],
        &classifier::RULES,
        &vec![floor; classifier::RULES.len()],
        1.0,
    ));
    line_chart(
        &dir.join("classifier.svg"),
        "sg classifier cost per packet (BPF_PROG_TEST_RUN)",
        "security-group rules on the port",
        "ns per packet",
        (0.8, 13_000.0),
        false,
        &lines,
    )
}

pub fn forwarding(dir: &Path, f: &forward::Results) -> Result<()> {
    let udp: Vec<Series> = forward::SETUPS
        .iter()
        .enumerate()
        .map(|(i, s)| series(s.name(), PALETTE[i], &forward::RULES, &f.delivered[i], 1.0))
        .collect();
    line_chart(
        &dir.join("forwarding_udp.svg"),
        "New-flow UDP through the compute node (delivered)",
        "security-group rules on the port",
        "packets per second",
        (8.0, 6_500.0),
        true,
        &udp,
    )?;
    let tcp: Vec<Series> = forward::SETUPS
        .iter()
        .enumerate()
        .map(|(i, s)| series(s.name(), PALETTE[i], &forward::RULES, &f.tcp[i], 1.0))
        .collect();
    line_chart(
        &dir.join("forwarding_tcp.svg"),
        "One established TCP stream (iperf3)",
        "security-group rules on the port",
        "bits per second",
        (8.0, 6_500.0),
        false,
        &tcp,
    )
}

pub fn control(dir: &Path, c: &control::Results) -> Result<()> {
    let short = |name: &str| -> String {
        if name.contains("20 distinct") {
            "sync 200×422".into()
        } else if name.contains("own policy") {
            "sync 200×422 (200 pol.)".into()
        } else if name.contains("1,000 ports") {
            "sync 1000×50".into()
        } else if name.starts_with("one rule added") {
            "rule added".into()
        } else if name.starts_with("one rule removed") {
            "rule removed".into()
        } else if name.contains("member added") {
            "member added".into()
        } else if name.contains("member removed") {
            "member removed".into()
        } else {
            name.into()
        }
    };
    let mut groups: Vec<(String, [Summary; 3])> = c
        .scenarios
        .iter()
        .map(|s| {
            (
                short(&s.name),
                [Summary::of(&s.sg), Summary::of(&s.legacy), Summary::of(&s.nft)],
            )
        })
        .collect();
    groups.push((
        "agent restart".into(),
        [
            Summary::of(&c.restart.sg),
            Summary::of(&c.restart.legacy),
            Summary::of(&c.restart.nft),
        ],
    ));
    let path = dir.join("control.svg");
    let root = SVGBackend::new(&path, (960, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let ymax = groups
        .iter()
        .flat_map(|g| g.1.iter().map(|s| s.max))
        .fold(0.0f64, f64::max)
        * 1e3
        * 2.0;
    let ymin = groups
        .iter()
        .flat_map(|g| g.1.iter().map(|s| s.min))
        .fold(f64::INFINITY, f64::min)
        * 1e3
        / 2.0;
    let n = groups.len();
    let labels: Vec<String> = groups.iter().map(|g| g.0.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Control plane: time per operation (log scale)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), (ymin.max(1e-3)..ymax).log_scale())
        .map_err(e)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|v| {
            let i = v.round() as i64;
            if (v - i as f64).abs() < 0.01 && i >= 0 && (i as usize) < labels.len() {
                labels[i as usize].clone()
            } else {
                String::new()
            }
        })
        .y_desc("milliseconds")
        .y_label_formatter(&|v| human(*v))
        .draw()
        .map_err(e)?;
    for (k, name) in ["sg", "iptables-legacy", "iptables-nft"].iter().enumerate() {
        let col = PALETTE[[3, 1, 2][k]];
        let w = 0.25;
        let off = (k as f64 - 1.0) * w;
        chart
            .draw_series(
                groups
                    .iter()
                    .enumerate()
                    .filter(|(_, g)| g.1[k].n > 0)
                    .map(|(i, g)| {
                        let x0 = i as f64 + off - w / 2.0;
                        Rectangle::new(
                            [(x0, ymin.max(1e-3)), (x0 + w * 0.9, g.1[k].median * 1e3)],
                            col.filled(),
                        )
                    }),
            )
            .map_err(e)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], col.filled()));
        chart
            .draw_series(
                groups
                    .iter()
                    .enumerate()
                    .filter(|(_, g)| g.1[k].n > 1)
                    .map(|(i, g)| {
                        let x = i as f64 + off - w / 2.0 + w * 0.45;
                        PathElement::new(vec![(x, g.1[k].min * 1e3), (x, g.1[k].max * 1e3)], BLACK)
                    }),
            )
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

pub fn all(dir: &Path, a: &All) -> Result<()> {
    if let Some(c) = &a.classifier {
        classifier(dir, c)?;
    }
    if let Some(f) = &a.forward {
        forwarding(dir, f)?;
    }
    if let Some(c) = &a.control {
        control(dir, c)?;
    }
    Ok(())
}
