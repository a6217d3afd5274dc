//! Reports: the seed tool's four PNG plots and a one-file `report.html`, drawn from a trace (or
//! a `compare.json`) in memory or on disk.
//!
//! Reading a file is kept apart from drawing it: [`read`] checks the JSON against the structure
//! the drawing needs (a JSON Schema, `trace-read.schema.json`, with the constraints of the
//! Token Heatmap trace schema on the fields we draw) and refuses unknown schema majors.

pub mod plot;

use crate::schema::compare::CompareReport;
use crate::schema::trace::{DistributionOut, Trace};
use anyhow::Context;
use logitprobe_backends::usage;
use plot::{HeatCell, HeatColumn, Series};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Trace schema major versions this build can read (Token Heatmap's 1.x and 2.x).
pub const KNOWN_MAJORS: [u64; 2] = [1, 2];

pub const ADAPTIVE_HEATMAP_PNG: &str = "adaptive_heatmap.png";
pub const ENTROPY_PNG: &str = "entropy.png";
pub const SELECTED_PROBABILITY_PNG: &str = "selected_probability.png";
pub const RAW_VS_PROCESSED_PNG: &str = "raw_vs_processed.png";
pub const REPORT_HTML: &str = "report.html";
pub const LOGIT_LENS_PNG: &str = "logit_lens.png";
pub const SELECTED_RANK_PNG: &str = "selected_rank_heatmap.png";
pub const ATTENTION_GRID_PNG: &str = "attention_layer_head_grid.png";

static READ_SCHEMA: &str = include_str!("trace-read.schema.json");
static TEMPLATE: &str = include_str!("report.html");

/// A file `report` can draw.
#[derive(Debug)]
pub enum ReportInput {
    Trace(Box<Trace>),
    Compare(Box<CompareReport>),
}

/// Reads a trace JSON (schema major 1 or 2) or a `compare.json`.
///
/// Errors are usage errors naming the file and the problem: unreadable, not JSON, an unknown
/// schema major, or the first schema violation with its JSON path.
pub fn read(path: &Path) -> anyhow::Result<ReportInput> {
    // A FIFO or a device would block the read forever.
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return Err(usage!(
            "{} is not a regular file; give a trace JSON or compare.json",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        usage!(
            "cannot read {}: {e}; give a trace JSON or compare.json",
            path.display()
        )
    })?;
    let value: Value = serde_json::from_str(&text).map_err(|e| {
        usage!(
            "{} is not JSON ({e}); give adaptive_token_trace.json or compare.json",
            path.display()
        )
    })?;
    if value.get("kind").and_then(Value::as_str) == Some(crate::schema::compare::KIND) {
        let report: CompareReport = serde_path_to_error::deserialize(&value).map_err(|e| {
            usage!(
                "{} is not a logitprobe compare.json: at {}: {}",
                path.display(),
                e.path(),
                short(&e.inner().to_string())
            )
        })?;
        // The plots index each position's B entries by the report's sides.
        let n_b = report.b.len();
        if n_b == 0 {
            return Err(usage!(
                "{} is not a logitprobe compare.json: at b: no side B",
                path.display()
            ));
        }
        if let Some((i, p)) = report
            .positions
            .iter()
            .enumerate()
            .find(|(_, p)| p.b.len() != n_b)
        {
            return Err(usage!(
                "{} is not a logitprobe compare.json: at positions[{i}].b: {} entries for {n_b} sides B",
                path.display(),
                p.b.len()
            ));
        }
        if report.summaries.len() != n_b {
            return Err(usage!(
                "{} is not a logitprobe compare.json: at summaries: {} entries for {n_b} sides B",
                path.display(),
                report.summaries.len()
            ));
        }
        return Ok(ReportInput::Compare(Box::new(report)));
    }
    trace_from_value(&value)
        .map_err(|e| usage!("{}: {e}", path.display()))
        .map(|t| ReportInput::Trace(Box::new(t)))
}

/// A validation message for a one-line error: the schema's messages quote the offending
/// value whole, which can be megabytes.
fn short(msg: &str) -> String {
    const MAX: usize = 240;
    let flat = msg.replace(['\n', '\r'], " ");
    if flat.chars().count() <= MAX {
        flat
    } else {
        let cut: String = flat.chars().take(MAX).collect();
        format!("{cut}… ({} characters)", flat.chars().count())
    }
}

/// Checks and converts a parsed trace document.
pub fn trace_from_value(value: &Value) -> Result<Trace, String> {
    let version = value
        .get("schema_version")
        .and_then(Value::as_str)
        .ok_or("not a Token Heatmap trace: no \"schema_version\" string at the top level")?;
    let major: u64 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| {
            format!(
                "schema_version \"{}\" is not a semantic version",
                logitprobe_backends::gguf::quoted(version, 40)
            )
        })?;
    if !KNOWN_MAJORS.contains(&major) {
        return Err(format!(
            "trace schema major version {major} ({}) is unknown to this build (it reads 1.x and 2.x); upgrade logitprobe or re-export the trace",
            logitprobe_backends::gguf::quoted(version, 40)
        ));
    }
    static VALIDATOR: OnceLock<jsonschema::Validator> = OnceLock::new();
    let validator = VALIDATOR.get_or_init(|| {
        let schema: Value = serde_json::from_str(READ_SCHEMA).expect("the read schema is JSON");
        jsonschema::validator_for(&schema).expect("the read schema is a valid JSON Schema")
    });
    if let Some(e) = validator.iter_errors(value).next() {
        let at = e.instance_path().to_string();
        let at = if at.is_empty() { "/".to_string() } else { at };
        return Err(format!(
            "not a valid trace: at {at}: {}",
            short(&e.to_string())
        ));
    }
    // What the schema cannot say (an id beyond u32) still names its place.
    serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let at = e.path().to_string();
        format!(
            "not a valid trace: at {at}: {}",
            short(&e.inner().to_string())
        )
    })
}

/// Writes a PNG through a temporary sibling and a rename, so a failed drawing never leaves a
/// file that looks complete.
pub fn atomic_png<T>(
    path: &Path,
    draw: impl FnOnce(&Path) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let name = path.file_name().context("plot path has no file name")?;
    let tmp = path.with_file_name(format!(".{}.partial.png", name.to_string_lossy()));
    match draw(&tmp) {
        Ok(v) => {
            std::fs::rename(&tmp, path)
                .with_context(|| format!("moving {} into place", path.display()))?;
            Ok(v)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn columns(
    trace: &Trace,
    pick: impl Fn(&crate::schema::trace::Step) -> &DistributionOut,
) -> Vec<HeatColumn> {
    trace
        .steps
        .iter()
        .map(|s| {
            let d = pick(s);
            d.candidates
                .iter()
                .take(d.k_used.min(MAX_HEATMAP_ROWS))
                .map(|c| HeatCell {
                    token: c.token.clone(),
                    logprob: c.logprob,
                    selected: c.token_id == s.selected.token_id,
                })
                .collect()
        })
        .collect()
}

/// The most ranks a heatmap draws: a step can keep 200,000 candidates (max_k is the user's),
/// and a row per candidate would be a 7 GB image. The titles say when ranks were left out.
pub const MAX_HEATMAP_ROWS: usize = 256;

/// Heatmap rows: rank 1 … the largest k_used of the trace (never more than max_k), so a
/// trace that never needs 64 candidates is not mostly blank; at most [`MAX_HEATMAP_ROWS`].
fn heatmap_rows(trace: &Trace) -> usize {
    let used = trace
        .steps
        .iter()
        .flat_map(|s| {
            [
                s.raw.k_used.min(s.raw.candidates.len()),
                s.processed.k_used.min(s.processed.candidates.len()),
            ]
        })
        .max()
        .unwrap_or(1);
    used.clamp(1, trace.metadata.probe_config.max_k.max(1))
}

/// Draws the four plots of a trace into `dir`; returns the files written.
pub fn trace_plots(dir: &Path, trace: &Trace) -> anyhow::Result<Vec<PathBuf>> {
    let model = &short_name(&trace.metadata.model);
    let needed = heatmap_rows(trace);
    let rows = needed.min(MAX_HEATMAP_ROWS);
    let cut = if needed > rows {
        format!(" · ranks 1–{rows} of {needed}")
    } else {
        String::new()
    };
    let raw = columns(trace, |s| &s.raw);
    let processed = columns(trace, |s| &s.processed);
    let mut written = Vec::new();

    let heat = dir.join(ADAPTIVE_HEATMAP_PNG);
    let title = format!("adaptive top-k (raw) · {model}{cut}");
    // Pages after the first are written directly: only the first carries the seed's name.
    let pages = atomic_png(&heat, |tmp| {
        let files = plot::adaptive_heatmap(tmp, &title, &raw, rows)?;
        let mut out = Vec::new();
        for (i, f) in files.iter().enumerate() {
            if i == 0 {
                out.push(heat.clone());
            } else {
                let dest = plot::page_path(&heat, i);
                std::fs::rename(f, &dest)?;
                out.push(dest);
            }
        }
        let mut p = files.len();
        while plot::page_path(&heat, p).exists() {
            let _ = std::fs::remove_file(plot::page_path(&heat, p));
            p += 1;
        }
        Ok(out)
    })?;
    written.extend(pages);

    let per_step = |f: fn(&DistributionOut) -> f64| -> [Vec<f64>; 2] {
        [
            trace.steps.iter().map(|s| f(&s.raw)).collect(),
            trace.steps.iter().map(|s| f(&s.processed)).collect(),
        ]
    };
    fn pair(v: &[Vec<f64>; 2]) -> Vec<Series<'_>> {
        vec![
            Series {
                name: "raw",
                values: &v[0],
                color: plot::PAIR[0],
            },
            Series {
                name: "processed",
                values: &v[1],
                color: plot::PAIR[1],
            },
        ]
    }
    let entropy = per_step(|d| d.entropy);
    let path = dir.join(ENTROPY_PNG);
    atomic_png(&path, |tmp| {
        plot::lines(
            tmp,
            &format!("entropy per step · {model}"),
            "generation step",
            "entropy (nats)",
            &pair(&entropy),
        )
    })?;
    written.push(path);

    let selected = per_step(|d| d.selected_prob);
    let path = dir.join(SELECTED_PROBABILITY_PNG);
    atomic_png(&path, |tmp| {
        plot::lines(
            tmp,
            &format!("selected token probability · {model}"),
            "generation step",
            "selected_prob",
            &pair(&selected),
        )
    })?;
    written.push(path);

    let k_used = per_step(|d| d.k_used as f64);
    let path = dir.join(RAW_VS_PROCESSED_PNG);
    atomic_png(&path, |tmp| {
        plot::side_by_side_heatmaps(
            tmp,
            &format!("raw vs processed · {model}{cut}"),
            [("raw", &raw), ("processed", &processed)],
            [("raw k_used", &k_used[0]), ("processed k_used", &k_used[1])],
            rows,
        )
    })?;
    written.push(path);
    Ok(written)
}

/// The plots of what the trace saw inside the model, drawn when its steps carry them:
/// `logit_lens.png` (each lens layer's top candidates at `lens_step`), the selected token's
/// rank by layer and step (`selected_rank_heatmap.png`), and each captured layer's heads'
/// attention entropy at `lens_step` (`attention_layer_head_grid.png`).
pub fn inside_plots(dir: &Path, trace: &Trace, lens_step: usize) -> anyhow::Result<Vec<PathBuf>> {
    use crate::report::plot::{GridCell, GridScale};
    let model = short_name(&trace.metadata.model);
    let mut written = Vec::new();
    let lens_steps: Vec<&crate::schema::trace::Step> = trace
        .steps
        .iter()
        .filter(|s| s.logit_lens.is_some())
        .collect();
    if let Some(first) = lens_steps.first() {
        let at = lens_steps
            .iter()
            .find(|s| s.step == lens_step)
            .copied()
            .unwrap_or(first);
        let layers = at.logit_lens.as_deref().unwrap_or_default();
        let k = layers
            .iter()
            .map(|l| l.top_k.len())
            .max()
            .unwrap_or(0)
            .clamp(1, 64);
        let cells: Vec<Vec<GridCell>> = layers
            .iter()
            .map(|l| {
                (0..k)
                    .map(|r| match l.top_k.get(r) {
                        Some(c) => GridCell {
                            value: Some(c.prob),
                            text: Some(c.token.clone()),
                            outlined: c.token_id == at.selected.token_id,
                        },
                        None => GridCell::default(),
                    })
                    .collect()
            })
            .collect();
        let path = dir.join(LOGIT_LENS_PNG);
        atomic_png(&path, |tmp| {
            crate::report::plot::grid(
                tmp,
                &format!(
                    "logit lens at step {} (selected {}) · {model}",
                    at.step,
                    crate::report::plot::label(&at.selected.token)
                ),
                "top-k rank",
                "layer",
                &(1..=k).map(|r| r.to_string()).collect::<Vec<_>>(),
                &layers
                    .iter()
                    .map(|l| l.layer_idx.to_string())
                    .collect::<Vec<_>>(),
                &cells,
                GridScale {
                    lo: 0.0,
                    hi: 1.0,
                    log: false,
                    reversed: false,
                },
                "probability",
            )
        })?;
        written.push(path);

        let mut ids: Vec<usize> = lens_steps
            .iter()
            .flat_map(|s| s.logit_lens.iter().flatten().map(|l| l.layer_idx))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let max_rank = lens_steps
            .iter()
            .flat_map(|s| s.logit_lens.iter().flatten().map(|l| l.selected_token_rank))
            .max()
            .unwrap_or(1)
            .max(2);
        let cells: Vec<Vec<GridCell>> = ids
            .iter()
            .map(|&layer| {
                lens_steps
                    .iter()
                    .map(|s| {
                        let l = s.logit_lens.iter().flatten().find(|l| l.layer_idx == layer);
                        GridCell {
                            value: l.map(|l| l.selected_token_rank as f64),
                            text: l.map(|l| compact(l.selected_token_rank)),
                            outlined: false,
                        }
                    })
                    .collect()
            })
            .collect();
        let path = dir.join(SELECTED_RANK_PNG);
        atomic_png(&path, |tmp| {
            crate::report::plot::grid(
                tmp,
                &format!("selected token's rank by layer (log scale) · {model}"),
                "generation step",
                "layer",
                &lens_steps
                    .iter()
                    .map(|s| s.step.to_string())
                    .collect::<Vec<_>>(),
                &ids.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
                &cells,
                GridScale {
                    lo: 1.0,
                    hi: max_rank as f64,
                    log: true,
                    reversed: true,
                },
                "rank",
            )
        })?;
        written.push(path);
    }
    let attention_steps: Vec<&crate::schema::trace::Step> = trace
        .steps
        .iter()
        .filter(|s| s.attention.is_some())
        .collect();
    if let Some(first) = attention_steps.first() {
        let at = attention_steps
            .iter()
            .find(|s| s.step == lens_step)
            .copied()
            .unwrap_or(first);
        let layers = at.attention.as_deref().unwrap_or_default();
        let heads = layers
            .iter()
            .map(|l| l.per_head.as_ref().map_or(1, |p| p.entropy.len()))
            .max()
            .unwrap_or(1);
        let values: Vec<Vec<f64>> = layers
            .iter()
            .map(|l| match &l.per_head {
                Some(p) => p.entropy.clone(),
                // Without per-head numbers, the layer mean stands for every head.
                None => vec![l.entropy; heads],
            })
            .collect();
        let lo = values
            .iter()
            .flatten()
            .copied()
            .fold(f64::INFINITY, f64::min);
        let hi = values
            .iter()
            .flatten()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        let (lo, hi) = if lo.is_finite() && hi > lo {
            (lo, hi)
        } else {
            (0.0, hi.max(1.0))
        };
        let cells: Vec<Vec<GridCell>> = values
            .iter()
            .map(|row| {
                (0..heads)
                    .map(|h| GridCell {
                        value: row.get(h).copied(),
                        text: row.get(h).map(|v| format!("{v:.2}")),
                        outlined: false,
                    })
                    .collect()
            })
            .collect();
        let path = dir.join(ATTENTION_GRID_PNG);
        atomic_png(&path, |tmp| {
            crate::report::plot::grid(
                tmp,
                &format!(
                    "attention entropy by layer and head at step {} · {model}",
                    at.step
                ),
                "head",
                "layer",
                &(0..heads).map(|h| h.to_string()).collect::<Vec<_>>(),
                &layers
                    .iter()
                    .map(|l| l.layer.to_string())
                    .collect::<Vec<_>>(),
                &cells,
                GridScale {
                    lo,
                    hi,
                    log: false,
                    reversed: false,
                },
                "entropy (nats)",
            )
        })?;
        written.push(path);
    }
    Ok(written)
}

/// A rank in at most 5 characters: 42, 1234, 12k, 262k.
fn compact(rank: usize) -> String {
    if rank < 10_000 {
        rank.to_string()
    } else {
        format!("{}k", rank / 1000)
    }
}

/// Writes `report.html`: the template with `data` (a trace or a compare report) inlined.
pub fn write_html(
    dir: &Path,
    title: &str,
    data: &impl serde::Serialize,
    marks: &TraceMarks,
) -> anyhow::Result<PathBuf> {
    // `<` appears only inside JSON strings, where \u003c means the same; this keeps `</script>`
    // inside a token from closing the data block.
    let json = serde_json::to_string(data)?.replace('<', "\\u003c");
    let marks = serde_json::to_string(marks)?.replace('<', "\\u003c");
    let mut env = minijinja::Environment::new();
    env.add_template("report.html", TEMPLATE)?;
    let html = env
        .get_template("report.html")?
        .render(minijinja::context! {
            title => title,
            version => env!("CARGO_PKG_VERSION"),
            data => minijinja::Value::from_safe_string(json),
            marks => minijinja::Value::from_safe_string(marks),
        })?;
    let path = dir.join(REPORT_HTML);
    crate::util::write_atomic(&path, |w| {
        w.write_all(html.as_bytes())?;
        Ok(())
    })?;
    Ok(path)
}

/// A model name as a title shows it: at most 80 characters, keeping the end (the file name
/// of a path). A trace can hold any string there; laying out megabytes of it takes minutes.
pub fn short_name(name: &str) -> String {
    const MAX: usize = 80;
    let n = name.chars().count();
    if n <= MAX {
        return name.to_string();
    }
    let tail: String = name.chars().skip(n - (MAX - 1)).collect();
    format!("…{tail}")
}

/// Plots and HTML of one trace.
pub fn write_trace_report(
    dir: &Path,
    trace: &Trace,
    marks: &TraceMarks,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = trace_plots(dir, trace)?;
    files.extend(inside_plots(dir, trace, marks.lens_step)?);
    let title = format!("logitprobe · {}", short_name(&trace.metadata.model));
    files.push(write_html(dir, &title, trace, marks)?);
    Ok(files)
}

/// What the report shows about a trace's steps that Token Heatmap's schema has no room for
/// (its steps take no other fields): from the run, or from the run.json beside a trace.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TraceMarks {
    /// Steps whose logits row had no finite entry: the probabilities shown (1.0, entropy 0)
    /// are the greedy fallback's, not the model's.
    pub degenerate_steps: Vec<usize>,
    /// The step the logit-lens table (logit_lens.png) and the attention grid show.
    pub lens_step: usize,
}

impl TraceMarks {
    /// The marks in the `run.json` of a trace's folder, if it has one for this prompt.
    pub fn beside(trace_path: &Path, trace: &Trace) -> TraceMarks {
        let run = trace_path.with_file_name(crate::schema::layout::RUN_JSON);
        let Some(v) = std::fs::read(&run)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        else {
            return TraceMarks::default();
        };
        let p = &v["prompts"][0];
        if p["prompt"].as_str() != Some(trace.metadata.prompt.as_str()) {
            return TraceMarks::default();
        }
        let steps = p["degenerate_steps"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64().map(|n| n as usize))
                    .filter(|&n| n < trace.steps.len())
                    .collect()
            })
            .unwrap_or_default();
        TraceMarks {
            degenerate_steps: steps,
            lens_step: 0,
        }
    }
}

/// One B of a quantization ladder, as the ladder table, plot and report show it.
#[derive(Debug, Clone)]
pub struct LadderRow {
    /// `B`, `B1`, ... as in the other tables.
    pub name: String,
    /// The model's file name.
    pub model: String,
    pub bytes: Option<u64>,
    pub bits_per_weight: Option<f64>,
    pub ppl_ratio: f64,
    pub ppl_ratio_err: f64,
    pub kld_mean: f64,
    pub kld_p99: f64,
    pub same_top_p: f64,
    pub rms_delta_p: f64,
    /// How often B's greedy (top-1) choice is not A's: 1 − same top p.
    pub flips: f64,
}

/// The ladder, smallest model first (the order of B's as given where sizes are unknown).
pub fn ladder_rows(report: &CompareReport) -> Vec<LadderRow> {
    let mut rows: Vec<LadderRow> = report
        .summaries
        .iter()
        .zip(&report.b)
        .enumerate()
        .map(|(i, (s, b))| LadderRow {
            name: crate::schema::compare::b_name(i, report.b.len()),
            model: std::path::Path::new(&b.model_path)
                .file_name()
                .map_or_else(|| b.model.clone(), |n| n.to_string_lossy().into_owned()),
            bytes: b.model_bytes,
            bits_per_weight: b.details.get("bits_per_weight").and_then(|v| v.as_f64()),
            ppl_ratio: s.ppl_ratio,
            ppl_ratio_err: s.ppl_ratio_err,
            kld_mean: s.kld.mean,
            kld_p99: s.kld.p99,
            same_top_p: s.same_top_p,
            rms_delta_p: s.rms_delta_p,
            flips: 1.0 - s.same_top_p,
        })
        .collect();
    rows.sort_by_key(|r| r.bytes.unwrap_or(u64::MAX));
    rows
}

pub const KLD_PER_POSITION_PNG: &str = "kld_per_position.png";
pub const KLD_HISTOGRAM_PNG: &str = "kld_histogram.png";
/// Bits per weight against mean KLD, one point per B that reports its bits per weight.
pub const LADDER_PARETO_PNG: &str = "ladder_pareto.png";
pub const DELTA_ENTROPY_PNG: &str = "delta_entropy_per_position.png";
pub const LENS_KLD_PNG: &str = "lens_kld_per_layer.png";

/// Colours for up to a handful of B sides; they repeat past that.
const B_COLORS: [plotters::style::RGBColor; 5] = [
    plot::PAIR[0],
    plot::PAIR[1],
    plotters::style::RGBColor(44, 160, 44),
    plotters::style::RGBColor(214, 39, 40),
    plotters::style::RGBColor(148, 103, 189),
];

/// The compare plots (KLD per position, KLD histogram per B, Δentropy per position) and the
/// compare view of `report.html`.
pub fn write_compare_report(dir: &Path, report: &CompareReport) -> anyhow::Result<Vec<PathBuf>> {
    let n_b = report.b.len();
    let names: Vec<String> = (0..n_b)
        .map(|i| crate::schema::compare::b_name(i, n_b))
        .collect();
    let per_b = |f: fn(&crate::schema::compare::BAt) -> f64| -> Vec<Vec<f64>> {
        (0..n_b)
            .map(|bi| report.positions.iter().map(|p| f(&p.b[bi])).collect())
            .collect()
    };
    fn b_series<'a>(names: &'a [String], v: &'a [Vec<f64>]) -> Vec<Series<'a>> {
        v.iter()
            .enumerate()
            .map(|(i, values)| Series {
                name: &names[i],
                values,
                color: B_COLORS[i % B_COLORS.len()],
            })
            .collect()
    }
    let mut written = Vec::new();
    let kld = per_b(|b| b.kld);
    let path = dir.join(KLD_PER_POSITION_PNG);
    atomic_png(&path, |tmp| {
        plot::lines(
            tmp,
            "KL(A‖B) per scored position",
            "scored position",
            "KLD (nats)",
            &b_series(&names, &kld),
        )
    })?;
    written.push(path);
    for (bi, values) in kld.iter().enumerate() {
        let path = if bi == 0 {
            dir.join(KLD_HISTOGRAM_PNG)
        } else {
            dir.join(format!("kld_histogram_b{}.png", bi + 1))
        };
        let title = format!("KL(A‖{}) histogram · {}", names[bi], report.b[bi].label);
        atomic_png(&path, |tmp| {
            plot::log_histogram(tmp, &title, "KLD (nats, log scale)", values, 48)
        })?;
        written.push(path);
    }
    let dent = per_b(|b| b.delta_entropy);
    let path = dir.join(DELTA_ENTROPY_PNG);
    atomic_png(&path, |tmp| {
        plot::lines(
            tmp,
            "Δentropy (B − A) per scored position",
            "scored position",
            "Δentropy (nats)",
            &b_series(&names, &dent),
        )
    })?;
    written.push(path);
    let ladder = ladder_rows(report);
    let labels: Vec<String> = ladder
        .iter()
        .map(|r| format!("{} {}", r.name, r.model.trim_end_matches(".gguf")))
        .collect();
    let points: Vec<plot::LadderPoint> = ladder
        .iter()
        .zip(&labels)
        .filter_map(|(r, label)| {
            Some(plot::LadderPoint {
                label,
                x: r.bits_per_weight?,
                y: r.kld_mean,
            })
        })
        .filter(|p| p.y > 0.0)
        .collect();
    if !points.is_empty() {
        let path = dir.join(LADDER_PARETO_PNG);
        let a = &report.a;
        let a_bpw = a
            .details
            .get("bits_per_weight")
            .and_then(|v| v.as_f64())
            .map_or(String::new(), |b| format!(", {b:.2} bpw"));
        let title = format!(
            "quantization ladder: mean KL from A ({}{a_bpw}); line: the Pareto frontier",
            std::path::Path::new(&a.model_path)
                .file_name()
                .map_or_else(|| a.label.clone(), |n| n.to_string_lossy().into_owned())
        );
        atomic_png(&path, |tmp| plot::pareto(tmp, &title, &points))?;
        written.push(path);
    }
    if let Some(layers) = &report.lens_layers {
        // log10 of each layer's mean KL: the early layers differ by orders of magnitude.
        let lens: Vec<Vec<f64>> = report
            .summaries
            .iter()
            .map(|s| {
                s.lens
                    .iter()
                    .flatten()
                    .map(|l| l.kld.mean.max(1e-12).log10())
                    .collect()
            })
            .collect();
        let path = dir.join(LENS_KLD_PNG);
        let x = if layers.iter().enumerate().all(|(i, &l)| i == l) {
            "layer".to_string()
        } else {
            format!(
                "lens layer (layers {})",
                crate::lens::Layers::List(layers.clone())
            )
        };
        atomic_png(&path, |tmp| {
            plot::lines(
                tmp,
                "logit lens: mean KL(A‖B) per layer",
                &x,
                "log10 mean KLD (nats)",
                &b_series(&names, &lens),
            )
        })?;
        written.push(path);
    }
    written.push(write_html(
        dir,
        "logitprobe compare",
        report,
        &TraceMarks::default(),
    )?);
    Ok(written)
}
