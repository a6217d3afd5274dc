//! A trace as Arrow tables: what `trace --format parquet` writes (see [`super::parquet`]) and
//! what the Python package hands to pyarrow.
//!
//! Three tables, each value exactly the one in the JSON trace's `steps` (the same `f64`s):
//!
//! - **steps** ([`steps_schema`]): one row per prompt and step: the selected token, and for the
//!   raw and the processed distribution its entropy, `k_used`, `top_mass_used` and the selected
//!   token's probability, log-probability and rank;
//! - **candidates** ([`candidates_schema`]): one row per prompt, step, distribution (`raw`,
//!   `processed`) and kept candidate, in the JSON's order (raw first, then processed, each by
//!   rank);
//! - **prompts** ([`prompts_schema`]): one row per prompt: its text, token counts, stop reason,
//!   generated text and the summary of its steps that `summary.csv` holds.
//!
//! [`TraceTables`] accumulates rows in Arrow builders and hands them out as
//! [`RecordBatch`]es; [`steps_from_batches`] reads the steps back.

use crate::schema::trace::{CandidateOut, DistributionOut, SelectedToken, Step};
use arrow_array::builder::{Float64Builder, StringBuilder, StringDictionaryBuilder, UInt32Builder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int8Type, UInt32Type};
use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

/// The two distributions of a step, in the order the candidates table lists them.
pub const DISTRIBUTIONS: [&str; 2] = ["raw", "processed"];

/// The per-distribution columns of the steps table, after its `raw_` or `processed_` prefix.
const DIST_COLUMNS: [(&str, DataType); 6] = [
    ("entropy", DataType::Float64),
    ("k_used", DataType::UInt32),
    ("top_mass_used", DataType::Float64),
    ("selected_prob", DataType::Float64),
    ("selected_logprob", DataType::Float64),
    ("selected_rank", DataType::UInt32),
];

/// The steps table: `prompt_index`, `step`, `token_id`, `token`, then `raw_entropy`,
/// `raw_k_used`, `raw_top_mass_used`, `raw_selected_prob`, `raw_selected_logprob`,
/// `raw_selected_rank` and the same six with `processed_`.
pub fn steps_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let mut fields = vec![
                Field::new("prompt_index", DataType::UInt32, false),
                Field::new("step", DataType::UInt32, false),
                Field::new("token_id", DataType::UInt32, false),
                Field::new("token", DataType::Utf8, false),
            ];
            for d in DISTRIBUTIONS {
                for (name, ty) in &DIST_COLUMNS {
                    fields.push(Field::new(format!("{d}_{name}"), ty.clone(), false));
                }
            }
            Arc::new(Schema::new(fields))
        })
        .clone()
}

/// The `distribution` column's type: `raw` / `processed`, dictionary-encoded.
fn distribution_type() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int8), Box::new(DataType::Utf8))
}

/// The candidates table: `prompt_index`, `step`, `distribution` (`raw` or `processed`,
/// dictionary-encoded), `rank` (1-based), `token_id`, `token`, `prob`, `logprob`.
pub fn candidates_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("prompt_index", DataType::UInt32, false),
                Field::new("step", DataType::UInt32, false),
                Field::new("distribution", distribution_type(), false),
                Field::new("rank", DataType::UInt32, false),
                Field::new("token_id", DataType::UInt32, false),
                Field::new("token", DataType::Utf8, false),
                Field::new("prob", DataType::Float64, false),
                Field::new("logprob", DataType::Float64, false),
            ]))
        })
        .clone()
}

/// The prompts table: one row per prompt (see [`PromptRow`] for each column).
pub fn prompts_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("prompt_index", DataType::UInt32, false),
                Field::new("prompt", DataType::Utf8, false),
                Field::new("system_prompt", DataType::Utf8, true),
                Field::new("prompt_tokens", DataType::UInt32, false),
                Field::new("generated_tokens", DataType::UInt32, false),
                Field::new("stop_reason", DataType::Utf8, false),
                Field::new("generated_text", DataType::Utf8, false),
                Field::new("mean_entropy_raw", DataType::Float64, true),
                Field::new("mean_entropy_processed", DataType::Float64, true),
                Field::new("lowest_raw_selected_prob", DataType::Float64, true),
                Field::new("lowest_raw_selected_step", DataType::UInt32, true),
            ]))
        })
        .clone()
}

/// One row of the prompts table.
///
/// The summary fields (`mean_entropy_*`, `lowest_raw_selected_*`) are those of `summary.csv`;
/// [`PromptRow::with_steps`] fills them from the prompt's steps, and they are null where they
/// are `None` (a prompt without steps).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptRow {
    /// The prompt's global index (its line in a prompts file, 0-based).
    pub prompt_index: usize,
    /// The user's prompt before any chat template.
    pub prompt: String,
    pub system_prompt: Option<String>,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// As run.json names it: `end_of_generation`, `max_new_tokens`, `interrupted`, ...
    pub stop_reason: String,
    /// The prompt and the generated text, special tokens skipped: the JSON trace's
    /// `metadata.generated_text`.
    pub generated_text: String,
    pub mean_entropy_raw: Option<f64>,
    pub mean_entropy_processed: Option<f64>,
    /// The lowest probability of a selected token in the raw distribution, and its step
    /// (the first such step on a tie).
    pub lowest_raw_selected_prob: Option<f64>,
    pub lowest_raw_selected_step: Option<usize>,
}

impl PromptRow {
    /// This row with its summary fields computed from `steps`, as summary.csv computes them.
    pub fn with_steps(mut self, steps: &[Step]) -> Self {
        if steps.is_empty() {
            self.mean_entropy_raw = None;
            self.mean_entropy_processed = None;
            self.lowest_raw_selected_prob = None;
            self.lowest_raw_selected_step = None;
            return self;
        }
        let n = steps.len() as f64;
        self.mean_entropy_raw = Some(steps.iter().map(|s| s.raw.entropy).sum::<f64>() / n);
        self.mean_entropy_processed =
            Some(steps.iter().map(|s| s.processed.entropy).sum::<f64>() / n);
        let lowest = steps.iter().min_by(|a, b| {
            a.raw
                .selected_prob
                .total_cmp(&b.raw.selected_prob)
                .then(a.step.cmp(&b.step))
        });
        self.lowest_raw_selected_prob = lowest.map(|s| s.raw.selected_prob);
        self.lowest_raw_selected_step = lowest.map(|s| s.step);
        self
    }
}

/// A count or index as the tables' `UInt32`; larger values do not occur (a step, a rank and a
/// vocabulary are far below 2^32), and are clamped rather than wrapped.
fn u32_of(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// The builders of one distribution's six step columns.
#[derive(Default)]
struct DistColumns {
    entropy: Float64Builder,
    k_used: UInt32Builder,
    top_mass_used: Float64Builder,
    selected_prob: Float64Builder,
    selected_logprob: Float64Builder,
    selected_rank: UInt32Builder,
}

impl DistColumns {
    fn push(&mut self, d: &DistributionOut) {
        self.entropy.append_value(d.entropy);
        self.k_used.append_value(u32_of(d.k_used));
        self.top_mass_used.append_value(d.top_mass_used);
        self.selected_prob.append_value(d.selected_prob);
        self.selected_logprob.append_value(d.selected_logprob);
        self.selected_rank.append_value(u32_of(d.selected_rank));
    }

    /// In [`DIST_COLUMNS`]' order.
    fn finish(&mut self, out: &mut Vec<ArrayRef>) {
        out.push(Arc::new(self.entropy.finish()));
        out.push(Arc::new(self.k_used.finish()));
        out.push(Arc::new(self.top_mass_used.finish()));
        out.push(Arc::new(self.selected_prob.finish()));
        out.push(Arc::new(self.selected_logprob.finish()));
        out.push(Arc::new(self.selected_rank.finish()));
    }
}

#[derive(Default)]
struct StepColumns {
    prompt_index: UInt32Builder,
    step: UInt32Builder,
    token_id: UInt32Builder,
    token: StringBuilder,
    raw: DistColumns,
    processed: DistColumns,
}

#[derive(Default)]
struct CandidateColumns {
    prompt_index: UInt32Builder,
    step: UInt32Builder,
    distribution: StringDictionaryBuilder<Int8Type>,
    rank: UInt32Builder,
    token_id: UInt32Builder,
    token: StringBuilder,
    prob: Float64Builder,
    logprob: Float64Builder,
}

#[derive(Default)]
struct PromptColumns {
    prompt_index: UInt32Builder,
    prompt: StringBuilder,
    system_prompt: StringBuilder,
    prompt_tokens: UInt32Builder,
    generated_tokens: UInt32Builder,
    stop_reason: StringBuilder,
    generated_text: StringBuilder,
    mean_entropy_raw: Float64Builder,
    mean_entropy_processed: Float64Builder,
    lowest_raw_selected_prob: Float64Builder,
    lowest_raw_selected_step: UInt32Builder,
}

/// Accumulates rows; `finish` hands out RecordBatches and empties the builder.
#[derive(Default)]
pub struct TraceTables {
    steps: StepColumns,
    candidates: CandidateColumns,
    prompts: PromptColumns,
    step_rows: usize,
    candidate_rows: usize,
    prompt_rows: usize,
}

impl std::fmt::Debug for TraceTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceTables")
            .field("step_rows", &self.step_rows)
            .field("candidate_rows", &self.candidate_rows)
            .field("prompt_rows", &self.prompt_rows)
            .finish()
    }
}

impl TraceTables {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rows of one prompt: its steps (schema `Step`s as in a trace file), one row each in the
    /// steps table and one per kept candidate of each distribution in the candidates table.
    pub fn push_steps(&mut self, prompt_index: usize, steps: &[Step]) {
        let p = u32_of(prompt_index);
        let s = &mut self.steps;
        let c = &mut self.candidates;
        for step in steps {
            let n = u32_of(step.step);
            s.prompt_index.append_value(p);
            s.step.append_value(n);
            s.token_id.append_value(step.selected.token_id);
            s.token.append_value(&step.selected.token);
            s.raw.push(&step.raw);
            s.processed.push(&step.processed);
            for (name, d) in DISTRIBUTIONS.iter().zip([&step.raw, &step.processed]) {
                for cand in &d.candidates {
                    c.prompt_index.append_value(p);
                    c.step.append_value(n);
                    c.distribution.append_value(name);
                    c.rank.append_value(u32_of(cand.rank));
                    c.token_id.append_value(cand.token_id);
                    c.token.append_value(&cand.token);
                    c.prob.append_value(cand.prob);
                    c.logprob.append_value(cand.logprob);
                }
                self.candidate_rows += d.candidates.len();
            }
        }
        self.step_rows += steps.len();
    }

    /// One row of the prompts table.
    pub fn push_prompt(&mut self, row: &PromptRow) {
        let p = &mut self.prompts;
        p.prompt_index.append_value(u32_of(row.prompt_index));
        p.prompt.append_value(&row.prompt);
        p.system_prompt.append_option(row.system_prompt.as_deref());
        p.prompt_tokens.append_value(u32_of(row.prompt_tokens));
        p.generated_tokens
            .append_value(u32_of(row.generated_tokens));
        p.stop_reason.append_value(&row.stop_reason);
        p.generated_text.append_value(&row.generated_text);
        p.mean_entropy_raw.append_option(row.mean_entropy_raw);
        p.mean_entropy_processed
            .append_option(row.mean_entropy_processed);
        p.lowest_raw_selected_prob
            .append_option(row.lowest_raw_selected_prob);
        p.lowest_raw_selected_step
            .append_option(row.lowest_raw_selected_step.map(u32_of));
        self.prompt_rows += 1;
    }

    /// Rows in the steps table not yet finished.
    pub fn step_rows(&self) -> usize {
        self.step_rows
    }

    /// Rows in the candidates table not yet finished.
    pub fn candidate_rows(&self) -> usize {
        self.candidate_rows
    }

    /// Rows in the prompts table not yet finished.
    pub fn prompt_rows(&self) -> usize {
        self.prompt_rows
    }

    /// The steps pushed since the last call, as one batch of [`steps_schema`].
    pub fn finish_steps(&mut self) -> RecordBatch {
        let s = &mut self.steps;
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(s.prompt_index.finish()),
            Arc::new(s.step.finish()),
            Arc::new(s.token_id.finish()),
            Arc::new(s.token.finish()),
        ];
        s.raw.finish(&mut columns);
        s.processed.finish(&mut columns);
        self.step_rows = 0;
        RecordBatch::try_new(steps_schema(), columns).expect("the steps columns fit their schema")
    }

    /// The candidates pushed since the last call, as one batch of [`candidates_schema`].
    pub fn finish_candidates(&mut self) -> RecordBatch {
        let c = &mut self.candidates;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(c.prompt_index.finish()),
            Arc::new(c.step.finish()),
            Arc::new(c.distribution.finish()),
            Arc::new(c.rank.finish()),
            Arc::new(c.token_id.finish()),
            Arc::new(c.token.finish()),
            Arc::new(c.prob.finish()),
            Arc::new(c.logprob.finish()),
        ];
        self.candidate_rows = 0;
        RecordBatch::try_new(candidates_schema(), columns)
            .expect("the candidates columns fit their schema")
    }

    /// The prompts pushed since the last call, as one batch of [`prompts_schema`].
    pub fn finish_prompts(&mut self) -> RecordBatch {
        let p = &mut self.prompts;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(p.prompt_index.finish()),
            Arc::new(p.prompt.finish()),
            Arc::new(p.system_prompt.finish()),
            Arc::new(p.prompt_tokens.finish()),
            Arc::new(p.generated_tokens.finish()),
            Arc::new(p.stop_reason.finish()),
            Arc::new(p.generated_text.finish()),
            Arc::new(p.mean_entropy_raw.finish()),
            Arc::new(p.mean_entropy_processed.finish()),
            Arc::new(p.lowest_raw_selected_prob.finish()),
            Arc::new(p.lowest_raw_selected_step.finish()),
        ];
        self.prompt_rows = 0;
        RecordBatch::try_new(prompts_schema(), columns)
            .expect("the prompts columns fit their schema")
    }
}

/// The steps of each prompt back from the steps and candidates tables (as
/// [`TraceTables`] wrote them, in any number of batches): the inverse of
/// [`TraceTables::push_steps`], value for value. Steps without candidate rows keep empty lists;
/// `logit_lens` and `attention` have no columns and come back `None`.
pub fn steps_from_batches(
    steps: &[RecordBatch],
    candidates: &[RecordBatch],
) -> Result<BTreeMap<usize, Vec<Step>>, ArrowError> {
    let mut prompts: BTreeMap<usize, Vec<Step>> = BTreeMap::new();
    // Where each (prompt, step) is: its prompt's list and its place in it.
    let mut at: HashMap<(u32, u32), usize> = HashMap::new();
    for b in steps {
        let (prompt, step) = (u32_column(b, "prompt_index")?, u32_column(b, "step")?);
        let (token_id, token) = (u32_column(b, "token_id")?, str_column(b, "token")?);
        let raw = DistReader::new(b, "raw")?;
        let processed = DistReader::new(b, "processed")?;
        for i in 0..b.num_rows() {
            let list = prompts.entry(prompt.value(i) as usize).or_default();
            at.insert((prompt.value(i), step.value(i)), list.len());
            list.push(Step {
                step: step.value(i) as usize,
                selected: SelectedToken {
                    token_id: token_id.value(i),
                    token: token.value(i).to_string(),
                },
                raw: raw.row(i),
                processed: processed.row(i),
                logit_lens: None,
                attention: None,
            });
        }
    }
    for b in candidates {
        let (prompt, step) = (u32_column(b, "prompt_index")?, u32_column(b, "step")?);
        let distribution = b
            .column_by_name("distribution")
            .and_then(|c| c.as_dictionary_opt::<Int8Type>())
            .ok_or_else(|| missing("distribution"))?;
        let names = distribution
            .values()
            .as_string_opt::<i32>()
            .ok_or_else(|| missing("distribution"))?;
        let (rank, token_id) = (u32_column(b, "rank")?, u32_column(b, "token_id")?);
        let token = str_column(b, "token")?;
        let (prob, logprob) = (f64_column(b, "prob")?, f64_column(b, "logprob")?);
        for i in 0..b.num_rows() {
            let key = (prompt.value(i), step.value(i));
            let place = at.get(&key).copied().ok_or_else(|| {
                ArrowError::InvalidArgumentError(format!(
                    "a candidate of prompt {} step {} has no step row",
                    key.0, key.1
                ))
            })?;
            let s = &mut prompts.get_mut(&(key.0 as usize)).expect("indexed above")[place];
            let name = names.value(distribution.keys().value(i) as usize);
            let d = if name == DISTRIBUTIONS[0] {
                &mut s.raw
            } else {
                &mut s.processed
            };
            d.candidates.push(CandidateOut {
                rank: rank.value(i) as usize,
                token_id: token_id.value(i),
                token: token.value(i).to_string(),
                prob: prob.value(i),
                logprob: logprob.value(i),
            });
        }
    }
    Ok(prompts)
}

fn missing(name: &str) -> ArrowError {
    ArrowError::SchemaError(format!("the table has no column {name:?} of its type"))
}

fn u32_column<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a UInt32Array, ArrowError> {
    b.column_by_name(name)
        .and_then(|c| c.as_primitive_opt::<UInt32Type>())
        .ok_or_else(|| missing(name))
}

fn f64_column<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a Float64Array, ArrowError> {
    b.column_by_name(name)
        .and_then(|c| c.as_primitive_opt::<Float64Type>())
        .ok_or_else(|| missing(name))
}

fn str_column<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a StringArray, ArrowError> {
    b.column_by_name(name)
        .and_then(|c| c.as_string_opt::<i32>())
        .ok_or_else(|| missing(name))
}

/// The six columns of one distribution in a steps batch.
struct DistReader<'a> {
    entropy: &'a Float64Array,
    k_used: &'a UInt32Array,
    top_mass_used: &'a Float64Array,
    selected_prob: &'a Float64Array,
    selected_logprob: &'a Float64Array,
    selected_rank: &'a UInt32Array,
}

impl<'a> DistReader<'a> {
    fn new(b: &'a RecordBatch, d: &str) -> Result<Self, ArrowError> {
        Ok(DistReader {
            entropy: f64_column(b, &format!("{d}_entropy"))?,
            k_used: u32_column(b, &format!("{d}_k_used"))?,
            top_mass_used: f64_column(b, &format!("{d}_top_mass_used"))?,
            selected_prob: f64_column(b, &format!("{d}_selected_prob"))?,
            selected_logprob: f64_column(b, &format!("{d}_selected_logprob"))?,
            selected_rank: u32_column(b, &format!("{d}_selected_rank"))?,
        })
    }

    /// Row `i`, its candidates still to come.
    fn row(&self, i: usize) -> DistributionOut {
        DistributionOut {
            k_used: self.k_used.value(i) as usize,
            entropy: self.entropy.value(i),
            top_mass_used: self.top_mass_used.value(i),
            selected_prob: self.selected_prob.value(i),
            selected_logprob: self.selected_logprob.value(i),
            selected_rank: self.selected_rank.value(i) as usize,
            candidates: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Array;

    fn dist(seed: f64, n: usize) -> DistributionOut {
        DistributionOut {
            k_used: n,
            entropy: 1.0 / 3.0 + seed,
            top_mass_used: 0.1 + 0.2 + seed,
            selected_prob: std::f64::consts::PI / (4.0 + seed),
            selected_logprob: (std::f64::consts::PI / (4.0 + seed)).ln(),
            selected_rank: 1 + seed as usize,
            candidates: (0..n)
                .map(|i| CandidateOut {
                    rank: i + 1,
                    token_id: (7 * i + seed as usize) as u32,
                    token: format!("tok {i} «{seed}»"),
                    prob: 1.0 / (i as f64 + 3.0 + seed),
                    logprob: (1.0 / (i as f64 + 3.0 + seed)).ln(),
                })
                .collect(),
        }
    }

    fn steps(n: usize) -> Vec<Step> {
        (0..n)
            .map(|i| Step {
                step: i,
                selected: SelectedToken {
                    token_id: 100 + i as u32,
                    token: format!("s{i}\n"),
                },
                raw: dist(i as f64, 3 + i % 2),
                processed: dist(0.5 + i as f64, 1 + i % 3),
                logit_lens: None,
                attention: None,
            })
            .collect()
    }

    fn u32s(b: &RecordBatch, name: &str) -> Vec<u32> {
        b.column_by_name(name)
            .unwrap()
            .as_primitive::<UInt32Type>()
            .values()
            .to_vec()
    }

    fn f64s(b: &RecordBatch, name: &str) -> Vec<f64> {
        b.column_by_name(name)
            .unwrap()
            .as_primitive::<Float64Type>()
            .values()
            .to_vec()
    }

    fn strs(b: &RecordBatch, name: &str) -> Vec<String> {
        b.column_by_name(name)
            .unwrap()
            .as_string::<i32>()
            .iter()
            .map(|s| s.unwrap().to_string())
            .collect()
    }

    /// Every column equals the steps' values, bit for bit, and in their order.
    #[test]
    fn columns_equal_the_steps() {
        let a = steps(5);
        let b = steps(2);
        let mut t = TraceTables::new();
        t.push_steps(3, &a);
        t.push_steps(9, &b);
        let all: Vec<(usize, &Step)> = a
            .iter()
            .map(|s| (3, s))
            .chain(b.iter().map(|s| (9, s)))
            .collect();
        assert_eq!(t.step_rows(), 7);
        let n_cand: usize = all
            .iter()
            .map(|(_, s)| s.raw.candidates.len() + s.processed.candidates.len())
            .sum();
        assert_eq!(t.candidate_rows(), n_cand);

        let sb = t.finish_steps();
        assert_eq!(sb.schema(), steps_schema());
        assert_eq!(sb.num_rows(), 7);
        assert_eq!(t.step_rows(), 0);
        let ucol =
            |f: fn(&Step) -> usize| all.iter().map(|(_, s)| f(s) as u32).collect::<Vec<u32>>();
        assert_eq!(
            u32s(&sb, "prompt_index"),
            all.iter().map(|(p, _)| *p as u32).collect::<Vec<_>>()
        );
        assert_eq!(u32s(&sb, "step"), ucol(|s| s.step));
        assert_eq!(
            u32s(&sb, "token_id"),
            all.iter()
                .map(|(_, s)| s.selected.token_id)
                .collect::<Vec<_>>()
        );
        assert_eq!(
            strs(&sb, "token"),
            all.iter()
                .map(|(_, s)| s.selected.token.clone())
                .collect::<Vec<_>>()
        );
        type Get = fn(&Step) -> &DistributionOut;
        let dists: [(&str, Get); 2] = [("raw", |s| &s.raw), ("processed", |s| &s.processed)];
        for (name, get) in dists {
            let fcol = |f: &dyn Fn(&DistributionOut) -> f64| -> Vec<u64> {
                all.iter().map(|(_, s)| f(get(s)).to_bits()).collect()
            };
            let bits = |c: &str| -> Vec<u64> {
                f64s(&sb, &format!("{name}_{c}"))
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            assert_eq!(bits("entropy"), fcol(&|d| d.entropy));
            assert_eq!(bits("top_mass_used"), fcol(&|d| d.top_mass_used));
            assert_eq!(bits("selected_prob"), fcol(&|d| d.selected_prob));
            assert_eq!(bits("selected_logprob"), fcol(&|d| d.selected_logprob));
            let ucol = |f: &dyn Fn(&DistributionOut) -> usize| -> Vec<u32> {
                all.iter().map(|(_, s)| f(get(s)) as u32).collect()
            };
            assert_eq!(u32s(&sb, &format!("{name}_k_used")), ucol(&|d| d.k_used));
            assert_eq!(
                u32s(&sb, &format!("{name}_selected_rank")),
                ucol(&|d| d.selected_rank)
            );
        }

        let cb = t.finish_candidates();
        assert_eq!(cb.schema(), candidates_schema());
        assert_eq!(cb.num_rows(), n_cand);
        assert_eq!(t.candidate_rows(), 0);
        let mut want = Vec::new();
        for (p, s) in &all {
            for (name, d) in [("raw", &s.raw), ("processed", &s.processed)] {
                for c in &d.candidates {
                    want.push((
                        *p as u32,
                        s.step as u32,
                        name.to_string(),
                        c.rank as u32,
                        c.token_id,
                        c.token.clone(),
                        c.prob.to_bits(),
                        c.logprob.to_bits(),
                    ));
                }
            }
        }
        let dist = cb
            .column_by_name("distribution")
            .unwrap()
            .as_dictionary::<Int8Type>();
        let dict = dist.values().as_string::<i32>();
        let names: Vec<String> = dist
            .keys()
            .values()
            .iter()
            .map(|&k| dict.value(k as usize).to_string())
            .collect();
        let (pi, st, rk, ti, tk, pr, lp) = (
            u32s(&cb, "prompt_index"),
            u32s(&cb, "step"),
            u32s(&cb, "rank"),
            u32s(&cb, "token_id"),
            strs(&cb, "token"),
            f64s(&cb, "prob"),
            f64s(&cb, "logprob"),
        );
        let got: Vec<_> = (0..cb.num_rows())
            .map(|i| {
                (
                    pi[i],
                    st[i],
                    names[i].clone(),
                    rk[i],
                    ti[i],
                    tk[i].clone(),
                    pr[i].to_bits(),
                    lp[i].to_bits(),
                )
            })
            .collect();
        assert_eq!(got, want);

        // Emptied: the next batches hold only what follows.
        t.push_steps(10, &b[..1]);
        assert_eq!(t.finish_steps().num_rows(), 1);
        assert_eq!(
            t.finish_candidates().num_rows(),
            b[0].raw.candidates.len() + b[0].processed.candidates.len()
        );
    }

    #[test]
    fn prompt_rows_and_their_summary() {
        let s = steps(4);
        let row = PromptRow {
            prompt_index: 2,
            prompt: "Hi".into(),
            system_prompt: Some("Be brief.".into()),
            prompt_tokens: 3,
            generated_tokens: 4,
            stop_reason: "max_new_tokens".into(),
            generated_text: "Hi there".into(),
            ..Default::default()
        }
        .with_steps(&s);
        assert_eq!(row.lowest_raw_selected_step, Some(3));
        assert_eq!(row.lowest_raw_selected_prob, Some(s[3].raw.selected_prob));
        let mean = s.iter().map(|s| s.raw.entropy).sum::<f64>() / 4.0;
        assert_eq!(row.mean_entropy_raw, Some(mean));
        let empty = PromptRow {
            prompt_index: 5,
            stop_reason: "interrupted".into(),
            ..Default::default()
        }
        .with_steps(&[]);
        let mut t = TraceTables::new();
        t.push_prompt(&row);
        t.push_prompt(&empty);
        assert_eq!(t.prompt_rows(), 2);
        let b = t.finish_prompts();
        assert_eq!(b.schema(), prompts_schema());
        assert_eq!(u32s(&b, "prompt_index"), [2, 5]);
        assert_eq!(strs(&b, "stop_reason"), ["max_new_tokens", "interrupted"]);
        let sys = b.column_by_name("system_prompt").unwrap();
        assert!(sys.is_valid(0) && sys.is_null(1));
        let low = b.column_by_name("lowest_raw_selected_step").unwrap();
        assert!(low.is_valid(0) && low.is_null(1));
        assert_eq!(t.prompt_rows(), 0);
    }

    /// The steps come back from their tables, value for value, whatever the batches.
    #[test]
    fn steps_come_back_from_the_tables() {
        let (a, b) = (steps(5), steps(2));
        let mut t = TraceTables::new();
        t.push_steps(3, &a);
        let (s1, c1) = (t.finish_steps(), t.finish_candidates());
        t.push_steps(9, &b);
        t.push_steps(11, &[]);
        let (s2, c2) = (t.finish_steps(), t.finish_candidates());
        let back = steps_from_batches(&[s1.clone(), s2], &[c1, c2]).unwrap();
        assert_eq!(back.len(), 2, "a prompt without steps has no rows");
        assert_eq!(back[&3], a);
        assert_eq!(back[&9], b);
        let orphan = steps_from_batches(
            &[],
            &[{
                t.push_steps(1, &a[..1]);
                t.finish_steps();
                t.finish_candidates()
            }],
        );
        assert!(orphan.unwrap_err().to_string().contains("has no step row"));
        let wrong = steps_from_batches(&[s1.project(&[0, 1]).unwrap()], &[]);
        assert!(wrong.unwrap_err().to_string().contains("token_id"));
    }
}
