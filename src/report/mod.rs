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
use serde::Deserialize;
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
    let open = || {
        std::fs::File::open(path)
            .map(|f| serde_json::Deserializer::from_reader(std::io::BufReader::new(f)))
            .map_err(|e| {
                usage!(
                    "cannot read {}: {e}; give a trace JSON or compare.json",
                    path.display()
                )
            })
    };
    let not_json = |e: serde_json::Error| {
        usage!(
            "{} is not JSON ({e}); give adaptive_token_trace.json or compare.json",
            path.display()
        )
    };
    // Two passes over the file, never one JSON tree of it: the first reads what the file
    // is, the second reads it typed (a 20,000-step trace as a tree took 2.7 GB).
    let peek = Peek::deserialize(&mut open()?).map_err(not_json)?;
    if peek.kind.as_deref() == Some(crate::schema::compare::KIND) {
        return read_compare(path, &mut open()?).map(|c| ReportInput::Compare(Box::new(c)));
    }
    check_trace_version(peek.schema_version.as_ref())
        .map_err(|e| usage!("{}: {e}", path.display()))?;
    trace_from_json(&mut open()?)
        .map_err(|e| usage!("{}: {e}", path.display()))
        .map(|t| ReportInput::Trace(Box::new(t)))
}

/// What a report input is, read without keeping the rest: `kind` (compare.json's) and
/// `schema_version` (a trace's); anything that is not an object has neither.
#[derive(Default)]
struct Peek {
    kind: Option<String>,
    schema_version: Option<Value>,
}

impl<'de> serde::Deserialize<'de> for Peek {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Peek;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON document")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Peek, A::Error> {
                let mut peek = Peek::default();
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "kind" => {
                            let v: Value = map.next_value()?;
                            peek.kind = v.as_str().map(String::from);
                        }
                        "schema_version" => peek.schema_version = Some(map.next_value()?),
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(peek)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Peek, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Peek::default())
            }
            fn visit_bool<E>(self, _: bool) -> Result<Peek, E> {
                Ok(Peek::default())
            }
            fn visit_i64<E>(self, _: i64) -> Result<Peek, E> {
                Ok(Peek::default())
            }
            fn visit_u64<E>(self, _: u64) -> Result<Peek, E> {
                Ok(Peek::default())
            }
            fn visit_f64<E>(self, _: f64) -> Result<Peek, E> {
                Ok(Peek::default())
            }
            fn visit_str<E>(self, _: &str) -> Result<Peek, E> {
                Ok(Peek::default())
            }
            fn visit_unit<E>(self) -> Result<Peek, E> {
                Ok(Peek::default())
            }
        }
        d.deserialize_any(V)
    }
}

type JsonReader =
    serde_json::Deserializer<serde_json::de::IoRead<std::io::BufReader<std::fs::File>>>;

fn read_compare(path: &Path, json: &mut JsonReader) -> anyhow::Result<CompareReport> {
    let report: CompareReport = serde_path_to_error::deserialize(json).map_err(|e| {
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
    Ok(report)
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

/// Refuses a trace whose schema major this build does not read.
fn check_trace_version(version: Option<&Value>) -> Result<(), String> {
    let version = version
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
    Ok(())
}

/// The read schema, and the same schema with a step at its root.
fn validators() -> &'static (jsonschema::Validator, jsonschema::Validator) {
    static VALIDATORS: OnceLock<(jsonschema::Validator, jsonschema::Validator)> = OnceLock::new();
    VALIDATORS.get_or_init(|| {
        let schema: Value = serde_json::from_str(READ_SCHEMA).expect("the read schema is JSON");
        let step = serde_json::json!({"$ref": "#/$defs/Step", "$defs": schema["$defs"].clone()});
        (
            jsonschema::validator_for(&schema).expect("the read schema is a valid JSON Schema"),
            jsonschema::validator_for(&step).expect("the step schema is a valid JSON Schema"),
        )
    })
}

/// The first violation of `validator` by `value`, its place prefixed with `at`.
fn violation(validator: &jsonschema::Validator, value: &Value, at: &str) -> Result<(), String> {
    match validator.iter_errors(value).next() {
        Some(e) => {
            let at = format!("{at}{}", e.instance_path());
            let at = if at.is_empty() { "/".to_string() } else { at };
            Err(format!(
                "not a valid trace: at {at}: {}",
                short(&e.to_string())
            ))
        }
        None => Ok(()),
    }
}

/// Reads a trace one step at a time: each step is checked against the schema as a small
/// JSON tree and kept typed, so memory grows with the typed steps only. The rest of the
/// document is checked with its first step in place of all of them.
fn trace_from_json<'de, D>(json: D) -> Result<Trace, String>
where
    D: serde::Deserializer<'de, Error = serde_json::Error>,
{
    let problem = std::cell::RefCell::new(None);
    let read = serde::de::DeserializeSeed::deserialize(TopSeed { problem: &problem }, json);
    if let Some(p) = problem.into_inner() {
        return Err(p);
    }
    let (mut top, steps, first) =
        read.map_err(|e| format!("not a valid trace: {}", short(&e.to_string())))?;
    if let Some(first) = first {
        top.insert("steps".into(), Value::Array(vec![first]));
    }
    let top = Value::Object(top);
    violation(&validators().0, &top, "")?;
    let mut trace: Trace = serde_path_to_error::deserialize(top).map_err(|e| {
        format!(
            "not a valid trace: at {}: {}",
            e.path(),
            short(&e.inner().to_string())
        )
    })?;
    trace.steps = steps;
    Ok(trace)
}

/// The top-level object of a trace: every field as JSON but `steps`, which [`StepsSeed`]
/// reads. A problem found in a step is left in `problem` (serde's error would add a line
/// and column instead of the step's path).
struct TopSeed<'a> {
    problem: &'a std::cell::RefCell<Option<String>>,
}

type Top = (
    serde_json::Map<String, Value>,
    Vec<crate::schema::trace::Step>,
    Option<Value>,
);

impl<'de> serde::de::DeserializeSeed<'de> for TopSeed<'_> {
    type Value = Top;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Top, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for TopSeed<'_> {
    type Value = Top;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a trace object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
        let mut top = serde_json::Map::new();
        let (mut steps, mut first) = (Vec::new(), None);
        while let Some(key) = map.next_key::<String>()? {
            if key == "steps" {
                (steps, first) = map.next_value_seed(StepsSeed {
                    problem: self.problem,
                })?;
                top.insert(key, Value::Array(Vec::new()));
            } else {
                let v = map.next_value()?;
                top.insert(key, v);
            }
        }
        Ok((top, steps, first))
    }
}

struct StepsSeed<'a> {
    problem: &'a std::cell::RefCell<Option<String>>,
}

type Steps = (Vec<crate::schema::trace::Step>, Option<Value>);

impl<'de> serde::de::DeserializeSeed<'de> for StepsSeed<'_> {
    type Value = Steps;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Steps, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for StepsSeed<'_> {
    type Value = Steps;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of steps")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Steps, A::Error> {
        use serde::de::Error;
        let (mut steps, mut first) = (Vec::new(), None);
        while let Some(v) = seq.next_element::<Value>()? {
            let i = steps.len();
            let step = violation(&validators().1, &v, &format!("/steps/{i}")).and_then(|()| {
                serde_path_to_error::deserialize(&v).map_err(|e| {
                    format!(
                        "not a valid trace: at steps[{i}].{}: {}",
                        e.path(),
                        short(&e.inner().to_string())
                    )
                })
            });
            match step {
                Ok(step) => steps.push(step),
                Err(p) => {
                    *self.problem.borrow_mut() = Some(p);
                    return Err(A::Error::custom("a step is not valid"));
                }
            }
            if first.is_none() {
                first = Some(v);
            }
        }
        Ok((steps, first))
    }
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
    // The data (a whole trace, tens of MB) goes straight from the typed steps into the file:
    // the page is rendered around a mark, and the JSON written where the mark is. The mark
    // is random, so no title can hold it.
    let mark = {
        use std::hash::{BuildHasher, Hasher};
        let n = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        format!("\u{0}logitprobe-data-{n:016x}\u{0}")
    };
    let marks = serde_json::to_string(marks)?.replace('<', "\\u003c");
    let mut env = minijinja::Environment::new();
    env.add_template("report.html", TEMPLATE)?;
    let html = env
        .get_template("report.html")?
        .render(minijinja::context! {
            title => title,
            version => env!("CARGO_PKG_VERSION"),
            data => minijinja::Value::from_safe_string(mark.clone()),
            marks => minijinja::Value::from_safe_string(marks),
        })?;
    let (head, tail) = html
        .split_once(&mark)
        .context("the report template has no place for its data")?;
    let path = dir.join(REPORT_HTML);
    crate::util::write_atomic(&path, |w| {
        w.write_all(head.as_bytes())?;
        serde_json::to_writer(ScriptSafe(&mut *w), data)?;
        w.write_all(tail.as_bytes())?;
        Ok(())
    })?;
    Ok(path)
}

/// Writes JSON with every `<` as `\u003c`, which means the same inside a JSON string (the
/// only place `<` can be): a `</script>` inside a token cannot close the data block.
struct ScriptSafe<W>(W);

impl<W: std::io::Write> std::io::Write for ScriptSafe<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // `<` is one byte in UTF-8 and never inside a longer character.
        for (i, part) in buf.split(|&b| b == b'<').enumerate() {
            if i > 0 {
                self.0.write_all(b"\\u003c")?;
            }
            self.0.write_all(part)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
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
