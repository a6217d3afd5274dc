//! The names of the files a run writes into its folder (Token Heatmap's, plus ours).

pub const STEPS_JSONL: &str = "steps.jsonl";
pub const TRACE_JSON: &str = "adaptive_token_trace.json";
pub const TRACE_CSV: &str = "adaptive_token_trace.csv";
pub const GENERATED_TXT: &str = "generated.txt";
/// The run's record: its settings, engine and, once finished, its timings.
pub const RUN_JSON: &str = "run.json";
pub const SUMMARY_CSV: &str = "summary.csv";
