//! The plotting layer: PNG charts for `trace`, `report` and `compare`.
//!
//! Every chart is drawn with plotters into an RGB bitmap using one embedded font (DejaVu Sans
//! Mono, see `assets/fonts/`), so text renders the same on a fresh machine without system fonts.
//! Token text goes through [`label`] first: whitespace becomes a visible mark and characters
//! the font lacks become `<U+XXXX>`, never a tofu box.

use ab_glyph::Font;
use anyhow::anyhow;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSansMono.ttf");

/// The family name charts ask for; the embedded font is also registered under the generic
/// names plotters uses by default, so no drawing call can reach for a system font.
pub const FONT: &str = "logitprobe-mono";

fn font() -> &'static ab_glyph::FontRef<'static> {
    static FONT_REF: OnceLock<ab_glyph::FontRef<'static>> = OnceLock::new();
    FONT_REF.get_or_init(|| {
        for name in [FONT, "sans-serif", "serif", "monospace"] {
            for style in [FontStyle::Normal, FontStyle::Bold] {
                plotters::style::register_font(name, style, FONT_BYTES)
                    .unwrap_or_else(|_| panic!("the embedded font is a valid TrueType file"));
            }
        }
        ab_glyph::FontRef::try_from_slice(FONT_BYTES).expect("embedded font parses")
    })
}

/// How wide `text` is drawn at `px` pixels, in pixels: an image is made wide enough for its
/// title (a long model name on a short last page was cut at the right edge).
pub fn text_width(text: &str, px: f32) -> u32 {
    use ab_glyph::{Font, ScaleFont};
    let scaled = font().as_scaled(px);
    text.chars()
        .map(|c| scaled.h_advance(scaled.glyph_id(c)))
        .sum::<f32>()
        .ceil() as u32
}

/// Whether the embedded font can draw `c`.
pub fn has_glyph(c: char) -> bool {
    font().glyph_id(c).0 != 0
}

/// Token text as a chart shows it: `·` for a space, `⏎` for a newline, `→` for a tab, `<U+XXXX>`
/// for control characters and for anything the embedded font cannot draw (CJK, emoji).
pub fn label(token: &str) -> String {
    let mut out = String::with_capacity(token.len());
    for c in token.chars() {
        match c {
            ' ' => out.push('·'),
            '\n' => out.push('⏎'),
            '\t' => out.push('→'),
            c if c.is_control() || !has_glyph(c) => {
                out.push_str(&format!("<U+{:04X}>", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

/// `label`, cut to at most `max` characters with an ellipsis.
fn fit(token: &str, max: usize) -> String {
    let l = label(token);
    if l.chars().count() <= max {
        l
    } else {
        let mut s: String = l.chars().take(max.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

/// A drawing error. The PNG encoder keeps only the text of an I/O error (a full disk): its
/// OS error is made an `io::Error` again, so the message says just that and the binary
/// knows a full disk when it sees one.
fn err(path: &Path, e: impl std::fmt::Display) -> anyhow::Error {
    let text = e.to_string();
    let os_error = text
        .split("(os error ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|code| code.parse::<i32>().ok());
    match os_error {
        Some(code) => anyhow::Error::new(std::io::Error::from_raw_os_error(code))
            .context(format!("drawing {}", path.display())),
        None => anyhow!("drawing {}: {text}", path.display()),
    }
}

/// One cell of a heatmap column: a candidate, ranked.
#[derive(Debug, Clone)]
pub struct HeatCell {
    pub token: String,
    pub logprob: f64,
    pub selected: bool,
}

/// One generation step of a heatmap: its candidates by rank, `k_used` of them.
pub type HeatColumn = Vec<HeatCell>;

/// Steps per heatmap page: past this a trace is split into `name.png`, `name_2.png`, ... so
/// that every cell keeps a readable label.
pub const STEPS_PER_PAGE: usize = 100;

const CELL_W: u32 = 64;
const CELL_H: u32 = 16;
const LABEL_CHARS: usize = 9;
const MIN_WIDTH: u32 = 720;
const MIN_GRID_H: u32 = 128;

/// Colour scale bounds of a set of columns: the lowest shown log-probability (floored at −20
/// so one near-zero candidate does not wash out the rest) up to 0.
fn logprob_range<'a>(cols: impl Iterator<Item = &'a HeatColumn>) -> (f64, f64) {
    let lo = cols
        .flat_map(|c| c.iter())
        .map(|c| c.logprob)
        .filter(|l| l.is_finite())
        .fold(0.0f64, f64::min)
        .max(-20.0);
    (if lo > -1e-3 { -1.0 } else { lo }, 0.0)
}

fn heat_color(logprob: f64, (lo, hi): (f64, f64)) -> RGBColor {
    let v = if logprob.is_finite() {
        logprob.clamp(lo, hi)
    } else {
        lo
    };
    ViridisRGB.get_color_normalized(v as f32, lo as f32, hi as f32)
}

/// Draws the seed tool's adaptive heatmap: steps across, rank 1…`rows` down, colour =
/// log-probability, each cell labelled with its token, blank past that step's `k_used`, the
/// selected token outlined in red. Returns the files written (one per page of
/// [`STEPS_PER_PAGE`] steps).
pub fn adaptive_heatmap(
    path: &Path,
    title: &str,
    columns: &[HeatColumn],
    rows: usize,
) -> anyhow::Result<Vec<PathBuf>> {
    font();
    let range = logprob_range(columns.iter());
    let pages: Vec<&[HeatColumn]> = if columns.is_empty() {
        vec![&[]]
    } else {
        columns.chunks(STEPS_PER_PAGE).collect()
    };
    let n_pages = pages.len();
    let mut written = Vec::new();
    for (p, page) in pages.iter().enumerate() {
        let file = page_path(path, p);
        let first_step = p * STEPS_PER_PAGE;
        let title = if n_pages > 1 {
            format!(
                "{title} (steps {}–{}, page {}/{n_pages})",
                first_step,
                first_step + page.len().saturating_sub(1),
                p + 1
            )
        } else {
            title.to_string()
        };
        let rows = rows.max(1) as u32;
        let left = 56u32;
        let top = 40u32;
        let bottom = 44u32;
        let bar_w = 90u32;
        let grid_w = (page.len().max(1) as u32) * CELL_W;
        // Short traces (and a short last page) still get room for the title and a readable
        // colour bar.
        let width = (left + grid_w + bar_w + 10)
            .max(MIN_WIDTH)
            .max(left + text_width(&title, 16.0) + 16);
        let grid_h = (rows * CELL_H).max(MIN_GRID_H);
        let height = top + grid_h + bottom;
        {
            let root = BitMapBackend::new(&file, (width, height)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| err(&file, e))?;
            let text = |_: &str, size: f64| TextStyle::from((FONT, size).into_font());
            root.draw(&Text::new(title.clone(), (left as i32, 10), text("", 16.0)))
                .map_err(|e| err(&file, e))?;
            for r in 0..rows {
                let y = (top + r * CELL_H) as i32;
                if r == 0 || (r + 1) % 4 == 0 {
                    root.draw(&Text::new(
                        format!("{}", r + 1),
                        (left as i32 - 30, y + 2),
                        text("", 11.0),
                    ))
                    .map_err(|e| err(&file, e))?;
                }
            }
            root.draw(&Text::new(
                "rank",
                (left as i32 - 34, top as i32 - 14),
                text("", 11.0).color(&BLACK.mix(0.7)),
            ))
            .map_err(|e| err(&file, e))?;
            for (i, col) in page.iter().enumerate() {
                let x = (left + i as u32 * CELL_W) as i32;
                for (r, cell) in col.iter().take(rows as usize).enumerate() {
                    let y = (top + r as u32 * CELL_H) as i32;
                    let c = heat_color(cell.logprob, range);
                    root.draw(&Rectangle::new(
                        [(x, y), (x + CELL_W as i32 - 1, y + CELL_H as i32 - 1)],
                        c.filled(),
                    ))
                    .map_err(|e| err(&file, e))?;
                    // Viridis is dark at the low end: white text there, black on the light end.
                    let light = (c.0 as u32 + c.1 as u32 + c.2 as u32) > 380;
                    let fg = if light { BLACK } else { WHITE };
                    root.draw(&Text::new(
                        fit(&cell.token, LABEL_CHARS),
                        (x + 2, y + 2),
                        text("", 10.0).color(&fg),
                    ))
                    .map_err(|e| err(&file, e))?;
                    if cell.selected {
                        root.draw(&Rectangle::new(
                            [(x, y), (x + CELL_W as i32 - 1, y + CELL_H as i32 - 1)],
                            ShapeStyle::from(&RED).stroke_width(2),
                        ))
                        .map_err(|e| err(&file, e))?;
                    }
                }
                let step = first_step + i;
                if i == 0 || step.is_multiple_of(5) {
                    root.draw(&Text::new(
                        format!("{step}"),
                        (x + 2, (top + grid_h) as i32 + 4),
                        text("", 11.0),
                    ))
                    .map_err(|e| err(&file, e))?;
                }
            }
            root.draw(&Text::new(
                "generation step",
                (left as i32, (top + grid_h) as i32 + 22),
                text("", 12.0),
            ))
            .map_err(|e| err(&file, e))?;
            color_bar(
                &root,
                (left + grid_w + 14) as i32,
                top as i32,
                grid_h as i32,
                range,
                "logprob",
            )
            .map_err(|e| err(&file, e))?;
            root.present().map_err(|e| err(&file, e))?;
        }
        written.push(file);
    }
    Ok(written)
}

/// `name.png` for the first page, `name_2.png`, `name_3.png`, ... after it.
pub fn page_path(path: &Path, page: usize) -> PathBuf {
    if page == 0 {
        return path.to_path_buf();
    }
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!("{stem}_{}.png", page + 1))
}

type DrawResult<T> =
    Result<T, DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>;

fn color_bar(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    x: i32,
    y: i32,
    h: i32,
    (lo, hi): (f64, f64),
    name: &str,
) -> DrawResult<()> {
    let w = 16;
    for i in 0..h {
        let v = hi - (hi - lo) * i as f64 / (h - 1).max(1) as f64;
        area.draw(&Rectangle::new(
            [(x, y + i), (x + w, y + i + 1)],
            heat_color(v, (lo, hi)).filled(),
        ))?;
    }
    area.draw(&Rectangle::new(
        [(x, y), (x + w, y + h)],
        BLACK.stroke_width(1),
    ))?;
    let style = TextStyle::from((FONT, 10.0).into_font());
    for t in 0..=4 {
        let v = hi - (hi - lo) * t as f64 / 4.0;
        let ty = y + (h - 1) * t / 4;
        area.draw(&Text::new(
            format!("{v:.1}"),
            (x + w + 4, ty - 5),
            style.clone(),
        ))?;
    }
    area.draw(&Text::new(name.to_string(), (x - 2, y + h + 6), style))?;
    Ok(())
}

/// Two heatmaps side by side (e.g. raw and processed), colour only, with `k_used` of both
/// drawn per step underneath.
pub fn side_by_side_heatmaps(
    path: &Path,
    title: &str,
    panels: [(&str, &[HeatColumn]); 2],
    k_used: [(&str, &[f64]); 2],
    rows: usize,
) -> anyhow::Result<()> {
    font();
    let (w, h) = (1400u32, 820u32);
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let root = root.titled(title, (FONT, 18)).map_err(|e| err(path, e))?;
    let (maps, bottom) = root.split_vertically(540);
    let range = logprob_range(panels[0].1.iter().chain(panels[1].1.iter()));
    // One colour bar for both maps: they share the logprob range.
    let (maps, bar) = maps.split_horizontally(w - 86);
    color_bar(&bar, 8, 40, 440, range, "logprob").map_err(|e| err(path, e))?;
    let halves = maps.split_evenly((1, 2));
    let rows = rows.max(1);
    for (area, (name, cols)) in halves.iter().zip(panels) {
        let n = cols.len().max(1);
        let mut chart = ChartBuilder::on(area)
            .caption(name, (FONT, 15))
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(40)
            .build_cartesian_2d(0f64..n as f64, rows as f64..0f64)
            .map_err(|e| err(path, e))?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("generation step")
            .y_desc("rank")
            // Whole numbers: step i's column and rank r's row start at the tick.
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{:.0}", v + 1.0))
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 13))
            .draw()
            .map_err(|e| err(path, e))?;
        chart
            .draw_series(cols.iter().enumerate().flat_map(|(i, col)| {
                col.iter().take(rows).enumerate().map(move |(r, cell)| {
                    Rectangle::new(
                        [(i as f64, r as f64), (i as f64 + 1.0, r as f64 + 1.0)],
                        heat_color(cell.logprob, range).filled(),
                    )
                })
            }))
            .map_err(|e| err(path, e))?;
        chart
            .draw_series(cols.iter().enumerate().flat_map(|(i, col)| {
                col.iter()
                    .take(rows)
                    .enumerate()
                    .filter(|(_, c)| c.selected)
                    .map(move |(r, _)| {
                        Rectangle::new(
                            [(i as f64, r as f64), (i as f64 + 1.0, r as f64 + 1.0)],
                            ShapeStyle::from(&RED).stroke_width(1),
                        )
                    })
            }))
            .map_err(|e| err(path, e))?;
    }
    let series: Vec<Series> = k_used
        .iter()
        .zip([BLUE, RGBColor(230, 120, 0)])
        .map(|((name, v), color)| Series {
            name,
            values: v,
            color,
        })
        .collect();
    draw_lines(
        &bottom,
        "k_used per step",
        "generation step",
        "k_used",
        &series,
    )
    .map_err(|e| err(path, e))?;
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

/// A named line of a chart.
#[derive(Clone, Copy)]
pub struct Series<'a> {
    pub name: &'a str,
    pub values: &'a [f64],
    pub color: RGBColor,
}

/// The two colours charts use for the two sides (raw / processed, A / B).
pub const PAIR: [RGBColor; 2] = [RGBColor(31, 119, 180), RGBColor(230, 120, 0)];

/// A line chart of per-step values, 1200×500.
pub fn lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    font();
    let root = BitMapBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    draw_lines(&root, title, x_desc, y_desc, series).map_err(|e| err(path, e))?;
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

/// The line chart's margin and label areas, in pixels; [`legend_place`] sizes the plot by them.
const LINES_MARGIN: u32 = 12;
const LINES_X_LABELS: u32 = 36;
const LINES_Y_LABELS: u32 = 64;
/// The height of a 16-point caption and its gap.
const LINES_CAPTION: u32 = 30;

fn draw_lines(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> DrawResult<()> {
    let n = series
        .iter()
        .map(|s| s.values.len())
        .max()
        .unwrap_or(0)
        .max(2);
    let finite = || {
        series
            .iter()
            .flat_map(|s| s.values.iter())
            .filter(|v| v.is_finite())
    };
    let lo = finite().cloned().fold(f64::INFINITY, f64::min);
    let hi = finite().cloned().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() {
        (lo.min(0.0), hi)
    } else {
        (0.0, 1.0)
    };
    let (corner, headroom) = legend_place(area.dim_in_pixel(), series, n, lo, hi);
    let pad = ((hi - lo) * (0.05 + headroom)).max(1e-9);
    // Counts (k_used) get whole-number ticks, not "10.0".
    let whole = finite().all(|v| v.fract() == 0.0) && hi - lo >= 5.0;
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 16))
        .margin(LINES_MARGIN)
        .x_label_area_size(LINES_X_LABELS)
        .y_label_area_size(LINES_Y_LABELS)
        .build_cartesian_2d(0f64..(n - 1) as f64, lo..hi + pad)?;
    // Enough decimals to tell the ticks apart.
    let decimals = if whole {
        0
    } else {
        ((1.0 / (hi - lo + pad)).log10().ceil().max(0.0) as usize + 1).min(6)
    };
    let y_fmt = move |v: &f64| format!("{v:.decimals$}");
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&y_fmt)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 13))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for s in series {
        let color = s.color;
        // plotters draws wide strokes as one quad per segment: on thousands of steep segments
        // they spike past the axes, so long series get hairlines.
        let width = if s.values.len() > 300 { 1 } else { 2 };
        chart
            .draw_series(LineSeries::new(
                s.values
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(i, &v)| (i as f64, v)),
                color.stroke_width(width),
            ))?
            .label(s.name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
        if s.values.len() <= 200 {
            chart.draw_series(
                s.values
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(i, &v)| Circle::new((i as f64, v), 2, color.filled())),
            )?;
        }
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 12))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .position(corner)
        .draw()?;
    Ok(())
}

/// Where the legend of [`draw_lines`] hides no point: the first corner of the plot whose box
/// holds none, or the upper right with room added above the data (the share of the y range
/// to add). The plot's size is estimated from the area's, less the caption, labels and
/// margins `draw_lines` gives them.
fn legend_place(
    (width, height): (u32, u32),
    series: &[Series],
    n: usize,
    lo: f64,
    hi: f64,
) -> (SeriesLabelPosition, f64) {
    let plot_w = f64::from(width.saturating_sub(LINES_Y_LABELS + 2 * LINES_MARGIN)).max(100.0);
    let plot_h =
        f64::from(height.saturating_sub(LINES_CAPTION + LINES_X_LABELS + 2 * LINES_MARGIN))
            .max(60.0);
    // plotters' box: a sample line, the labels at ~7 px a character, a row per series, and
    // its margin from the plot's edge; a few pixels to spare on each.
    let chars = series
        .iter()
        .map(|s| s.name.chars().count())
        .max()
        .unwrap_or(0);
    let box_w = 50.0 + 7.5 * chars as f64;
    let box_h = 20.0 + 18.0 * series.len() as f64;
    let (fx, fy) = ((box_w / plot_w).min(1.0), (box_h / plot_h).min(0.9));
    let top = hi + (hi - lo) * 0.05;
    let span = (top - lo).max(1e-9);
    let x_span = (n - 1) as f64;
    let free = |right: bool, upper: bool| {
        !series.iter().any(|s| {
            s.values.iter().enumerate().any(|(i, &v)| {
                let x = i as f64 / x_span;
                let y = (v - lo) / span;
                v.is_finite()
                    && if right { x >= 1.0 - fx } else { x <= fx }
                    && if upper { y >= 1.0 - fy } else { y <= fy }
            })
        })
    };
    for (corner, right, upper) in [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ] {
        if free(right, upper) {
            return (corner, 0.0);
        }
    }
    // Grow the axis until the data stays below the box: its top share 1 − fy holds them.
    (SeriesLabelPosition::UpperRight, 1.05 * fy / (1.0 - fy))
}

/// A histogram of `values` over `bins` equal bins of log10(value) (positive values only; the
/// count of zeros is written in the caption), 1000×500.
pub fn log_histogram(
    path: &Path,
    title: &str,
    x_desc: &str,
    values: &[f64],
    bins: usize,
) -> anyhow::Result<()> {
    font();
    let positive: Vec<f64> = values
        .iter()
        .filter(|v| **v > 0.0 && v.is_finite())
        .map(|v| v.log10())
        .collect();
    let zeros = values.len() - positive.len();
    let lo = positive.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = positive.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() {
        (lo.floor(), hi.ceil().max(lo.floor() + 1.0))
    } else {
        (-12.0, 0.0)
    };
    let bins = bins.max(1);
    let width = (hi - lo) / bins as f64;
    let mut counts = vec![0u64; bins];
    for v in &positive {
        let b = (((v - lo) / width) as usize).min(bins - 1);
        counts[b] += 1;
    }
    let top = counts.iter().cloned().max().unwrap_or(0).max(1) as f64;
    let root = BitMapBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let caption = if zeros > 0 {
        format!("{title} ({zeros} exact zeros not shown)")
    } else {
        title.to_string()
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, (FONT, 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(lo..hi, 0f64..top * 1.05)
        .map_err(|e| err(path, e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("positions")
        .x_label_formatter(&|v| format!("1e{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 13))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| err(path, e))?;
    chart
        .draw_series(counts.iter().enumerate().map(|(i, &c)| {
            let x0 = lo + i as f64 * width;
            Rectangle::new(
                [(x0, 0.0), (x0 + width, c as f64)],
                PAIR[0].mix(0.8).filled(),
            )
        }))
        .map_err(|e| err(path, e))?;
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

/// One model of a quantization ladder on the Pareto plot.
pub struct LadderPoint<'a> {
    pub label: &'a str,
    /// Bits per weight.
    pub x: f64,
    /// Mean KL(A‖B), nats (> 0).
    pub y: f64,
}

/// Bits per weight against mean KLD on a log scale, each model labelled, the Pareto frontier
/// (no other model both smaller and closer to A) joined and filled; 1000×600.
pub fn pareto(path: &Path, title: &str, points: &[LadderPoint]) -> anyhow::Result<()> {
    font();
    let mut points: Vec<&LadderPoint> = points
        .iter()
        .filter(|p| p.x.is_finite() && p.y.is_finite() && p.y > 0.0)
        .collect();
    points.sort_by(|a, b| a.x.total_cmp(&b.x));
    let (xlo, xhi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.x), hi.max(p.x))
        });
    let (ylo, yhi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.y), hi.max(p.y))
        });
    let (xlo, xhi) = if xlo.is_finite() {
        let pad = ((xhi - xlo) * 0.12).max(0.5);
        ((xlo - pad).max(0.0), xhi + pad * 2.5)
    } else {
        (0.0, 16.0)
    };
    let (ylo, yhi) = if ylo.is_finite() {
        (
            10f64.powf(ylo.log10().floor()),
            10f64.powf(yhi.log10().ceil().max(ylo.log10().floor() + 1.0)),
        )
    } else {
        (1e-4, 1.0)
    };
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 16))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(72)
        .build_cartesian_2d(xlo..xhi, (ylo..yhi).log_scale())
        .map_err(|e| err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("bits per weight")
        .y_desc("mean KL(A‖B), nats (log scale)")
        .y_label_formatter(&|v| format!("{v:.0e}"))
        .x_label_formatter(&|v| format!("{v:.1}"))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 13))
        .draw()
        .map_err(|e| err(path, e))?;
    // The frontier: the models no other beats on both size and KLD, joined smallest first;
    // the others are drawn hollow.
    let dominated = |p: &LadderPoint| {
        points
            .iter()
            .any(|q| q.x <= p.x && q.y <= p.y && (q.x < p.x || q.y < p.y))
    };
    chart
        .draw_series(LineSeries::new(
            points.iter().filter(|p| !dominated(p)).map(|p| (p.x, p.y)),
            PAIR[0].mix(0.5).stroke_width(2),
        ))
        .map_err(|e| err(path, e))?;
    chart
        .draw_series(points.iter().map(|p| {
            let style = if dominated(p) {
                PAIR[0].stroke_width(2)
            } else {
                PAIR[0].filled()
            };
            EmptyElement::at((p.x, p.y))
                + Circle::new((0, 0), 6, style)
                + Text::new(p.label.to_string(), (10, -8), (FONT, 14).into_font())
        }))
        .map_err(|e| err(path, e))?;
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

/// How a grid maps values to colours: viridis over `[lo, hi]`, on a log scale or not, and
/// reversed (low values bright) or not.
#[derive(Debug, Clone, Copy)]
pub struct GridScale {
    pub lo: f64,
    pub hi: f64,
    pub log: bool,
    pub reversed: bool,
}

impl GridScale {
    /// Where `v` falls in the colour ramp, 0 to 1.
    fn t(&self, v: f64) -> f64 {
        let f = |x: f64| if self.log { x.max(1e-300).log10() } else { x };
        let (a, b) = (f(self.lo), f(self.hi));
        let t = if b > a {
            (f(v.clamp(self.lo, self.hi)) - a) / (b - a)
        } else {
            0.5
        };
        if self.reversed {
            1.0 - t
        } else {
            t
        }
    }

    fn color(&self, v: f64) -> RGBColor {
        ViridisRGB.get_color_normalized(self.t(v) as f32, 0.0, 1.0)
    }
}

/// One cell of a [`grid`]: its value, an optional label, and whether to outline it.
#[derive(Debug, Clone, Default)]
pub struct GridCell {
    pub value: Option<f64>,
    pub text: Option<String>,
    pub outlined: bool,
}

/// A labelled grid chart (rows top to bottom, columns left to right), each cell coloured by
/// its value on `scale` and written with its label, a colour bar at the right. Cells without
/// a value are light grey. Wide grids shrink their cells and drop the labels.
#[allow(clippy::too_many_arguments)]
pub fn grid(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    x_labels: &[String],
    y_labels: &[String],
    cells: &[Vec<GridCell>],
    scale: GridScale,
    bar_name: &str,
) -> anyhow::Result<()> {
    font();
    let n_rows = y_labels.len().max(1) as u32;
    let n_cols = x_labels.len().max(1) as u32;
    let labelled = cells.iter().flatten().any(|c| c.text.is_some());
    // Cells wide enough for a 9-character label, narrower past 4,000 px of grid.
    let want_w = if labelled { CELL_W } else { 28 };
    let cell_w = want_w.min((4000 / n_cols).max(3));
    let show_text = labelled && cell_w >= 40;
    let cell_h = if n_rows > 120 { 8 } else { 18 };
    let (left, top, bottom, bar_w) = (64u32, 44u32, 52u32, 110u32);
    let grid_w = n_cols * cell_w;
    let grid_h = n_rows * cell_h;
    // Wide enough for the title too, and no wider.
    let title_w = left + text_width(title, 16.0) + 16;
    let width = (left + grid_w + bar_w).max(MIN_WIDTH).max(title_w);
    let height = top + grid_h.max(MIN_GRID_H) + bottom;
    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let text = |size: f64| TextStyle::from((FONT, size).into_font());
    root.draw(&Text::new(title.to_string(), (left as i32, 12), text(16.0)))
        .map_err(|e| err(path, e))?;
    let every = |n: u32, px: u32, need: u32| (need.div_ceil(px.max(1))).max(1).min(n.max(1));
    let y_every = every(n_rows, cell_h, 14);
    for (r, l) in y_labels.iter().enumerate() {
        if (r as u32).is_multiple_of(y_every) {
            let y = (top + r as u32 * cell_h) as i32 + (cell_h as i32 - 11) / 2;
            root.draw(&Text::new(fit(l, 7), (8, y), text(11.0)))
                .map_err(|e| err(path, e))?;
        }
    }
    let x_every = every(n_cols, cell_w, 30);
    for (c, l) in x_labels.iter().enumerate() {
        if (c as u32).is_multiple_of(x_every) {
            let x = (left + c as u32 * cell_w) as i32 + 2;
            root.draw(&Text::new(
                fit(l, 5),
                (x, (top + grid_h) as i32 + 4),
                text(11.0),
            ))
            .map_err(|e| err(path, e))?;
        }
    }
    root.draw(&Text::new(
        x_desc.to_string(),
        (left as i32, (top + grid_h) as i32 + 24),
        text(12.0),
    ))
    .map_err(|e| err(path, e))?;
    root.draw(&Text::new(
        y_desc.to_string(),
        (8, top as i32 - 16),
        text(11.0).color(&BLACK.mix(0.7)),
    ))
    .map_err(|e| err(path, e))?;
    for (r, row) in cells.iter().enumerate().take(n_rows as usize) {
        for (c, cell) in row.iter().enumerate().take(n_cols as usize) {
            let x = (left + c as u32 * cell_w) as i32;
            let y = (top + r as u32 * cell_h) as i32;
            let rect = [(x, y), (x + cell_w as i32 - 1, y + cell_h as i32 - 1)];
            let fill = match cell.value {
                Some(v) if v.is_finite() => scale.color(v),
                _ => RGBColor(232, 232, 232),
            };
            root.draw(&Rectangle::new(rect, fill.filled()))
                .map_err(|e| err(path, e))?;
            if let (true, Some(t)) = (show_text, &cell.text) {
                let light = (fill.0 as u32 + fill.1 as u32 + fill.2 as u32) > 380;
                let fg = if light { BLACK } else { WHITE };
                let chars = ((cell_w - 4) / 7) as usize;
                root.draw(&Text::new(
                    fit(t, chars.max(1)),
                    (x + 2, y + (cell_h as i32 - 11) / 2),
                    text(10.0).color(&fg),
                ))
                .map_err(|e| err(path, e))?;
            }
            if cell.outlined {
                root.draw(&Rectangle::new(
                    rect,
                    ShapeStyle::from(&RED).stroke_width(2),
                ))
                .map_err(|e| err(path, e))?;
            }
        }
    }
    // The colour bar, with its ticks in the scale's own terms.
    let (bx, bh) = ((left + grid_w + 16) as i32, grid_h.max(MIN_GRID_H) as i32);
    for i in 0..bh {
        let t = 1.0 - i as f64 / (bh - 1).max(1) as f64;
        let t = if scale.reversed { 1.0 - t } else { t };
        root.draw(&Rectangle::new(
            [(bx, top as i32 + i), (bx + 16, top as i32 + i + 1)],
            ViridisRGB.get_color_normalized(t as f32, 0.0, 1.0).filled(),
        ))
        .map_err(|e| err(path, e))?;
    }
    root.draw(&Rectangle::new(
        [(bx, top as i32), (bx + 16, top as i32 + bh)],
        BLACK.stroke_width(1),
    ))
    .map_err(|e| err(path, e))?;
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        let v = if scale.log {
            let (a, b) = (scale.lo.max(1e-300).log10(), scale.hi.max(1e-300).log10());
            10f64.powf(b - (b - a) * f)
        } else {
            scale.hi - (scale.hi - scale.lo) * f
        };
        let label = if v.abs() >= 1000.0 || (scale.log && v >= 1.0) {
            format!("{v:.0}")
        } else if v.abs() >= 10.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.2}")
        };
        let ty = top as i32 + ((bh - 1) as f64 * f) as i32;
        root.draw(&Text::new(label, (bx + 20, ty - 5), text(10.0)))
            .map_err(|e| err(path, e))?;
    }
    root.draw(&Text::new(
        bar_name.to_string(),
        (bx - 4, top as i32 + bh + 8),
        text(10.0),
    ))
    .map_err(|e| err(path, e))?;
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The legend goes to a corner no point lies under; with every corner taken, the axis
    /// grows until the points stay below the box in the upper right.
    #[test]
    fn the_legend_hides_no_point() {
        fn place(v: &[f64]) -> (SeriesLabelPosition, f64) {
            let series = Series {
                name: "processed",
                values: v,
                color: BLACK,
            };
            let hi = v.iter().cloned().fold(f64::MIN, f64::max);
            legend_place((1200, 500), &[series, series], v.len(), 0.0, hi)
        }
        // High at the right end only: the upper left is free.
        let rising = [0.0, 0.1, 0.2, 0.5, 0.9, 1.0];
        assert!(matches!(place(&rising), (SeriesLabelPosition::UpperLeft, h) if h == 0.0));
        assert!(matches!(
            place(&[0.5, 0.6, 0.5, 0.1]),
            (SeriesLabelPosition::UpperRight, h) if h == 0.0
        ));
        // High and low at both ends.
        let zigzag: Vec<f64> = (0..40).map(|i| f64::from(i % 2)).collect();
        let (corner, headroom) = place(&zigzag);
        assert!(matches!(corner, SeriesLabelPosition::UpperRight));
        let plot_h = 500 - LINES_CAPTION - LINES_X_LABELS - 2 * LINES_MARGIN;
        let box_share = (20.0 + 18.0 * 2.0) / f64::from(plot_h);
        let top = 1.0 + 0.05 + headroom;
        assert!(
            1.0 / top <= 1.0 - box_share,
            "the points reach the box: {headroom}"
        );
    }

    #[test]
    fn labels_make_whitespace_visible_and_name_missing_glyphs() {
        assert_eq!(label(" the\n"), "·the⏎");
        assert_eq!(label("a\tb"), "a→b");
        assert_eq!(label("\u{1}"), "<U+0001>");
        assert_eq!(label("é"), "é");
        assert_eq!(label("日本"), "<U+65E5><U+672C>");
        assert_eq!(label("🙂"), "<U+1F642>");
        assert_eq!(fit("abcdefghijkl", 5), "abcd…");
    }

    /// The ink columns of `text` drawn at x = 0 in a 200 × 60 image.
    fn ink_columns(text: &str) -> (usize, usize) {
        font();
        let (w, h) = (200usize, 60usize);
        let mut buf = vec![255u8; w * h * 3];
        {
            let root =
                BitMapBackend::with_buffer(&mut buf, (w as u32, h as u32)).into_drawing_area();
            root.draw(&Text::new(
                text.to_string(),
                (0, 10),
                (FONT, 40).into_font(),
            ))
            .unwrap();
            root.present().unwrap();
        }
        let inked: Vec<usize> = (0..w)
            .filter(|&x| (0..h).any(|y| buf[(y * w + x) * 3] < 128))
            .collect();
        (inked[0], *inked.last().unwrap())
    }

    /// Issue 14 point 12: plotters drew each glyph flush left in its advance (its side
    /// bearing dropped), so "3.5" read "3. 5". The patched plotters (vendor/plotters) places
    /// the ink at the bearing: a monospace '.' sits in the middle of its cell.
    #[test]
    fn narrow_glyphs_sit_at_their_side_bearing() {
        let (dot_start, dot_end) = ink_columns(".");
        let (m_start, m_end) = ink_columns("M");
        let cell = m_end + m_start; // about the advance: M's ink spans nearly all of it
        assert!(
            dot_start * 4 >= cell,
            "'.' ink starts at x = {dot_start} of a {cell} px cell: drawn flush left"
        );
        let centre = (dot_start + dot_end) as f64 / 2.0;
        assert!(
            (centre - cell as f64 / 2.0).abs() <= cell as f64 * 0.15,
            "'.' centred in its cell: {dot_start}..{dot_end} of {cell}"
        );
    }

    #[test]
    fn later_pages_get_numbered_names() {
        let p = Path::new("/x/adaptive_heatmap.png");
        assert_eq!(page_path(p, 0), p);
        assert_eq!(page_path(p, 1), Path::new("/x/adaptive_heatmap_2.png"));
    }
}
