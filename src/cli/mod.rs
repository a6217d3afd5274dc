//! Command-line definitions. Every flag is documented here once and shown by `--help`.

pub mod config;
pub mod errors;

use clap::{Args, Parser, Subcommand, ValueEnum};
use logitprobe_backends::{usage, Backend, EngineOptions, FlashAttn};
use std::path::PathBuf;

const TRACE_HELP: &str = "\
SAMPLING CHAIN (in this order):
  1. penalties over the whole sequence so far, prompt included:
     --repeat-penalty (l/r for l>0, l*r for l<0), --presence-penalty, --frequency-penalty
  2. temperature (0 = greedy)   3. top-k   4. top-p   5. min-p (relative to the top token)
  The raw distribution is softmax(logits / T) before penalties and filters; processed is the
  output of the whole chain. Greedy probes raw at T = 1 and processed is the argmax alone.
  Each prompt draws from its own ChaCha20 stream (seed, prompt index).
OUTPUT FILES (in --out, or --out/prompt-NNN/ for several prompts):
  adaptive_token_trace.json (Token Heatmap schema 2.0.0), adaptive_token_trace.csv,
  generated.txt, run.json, steps.jsonl (streamed), the plots adaptive_heatmap.png (pages
  adaptive_heatmap_2.png ... past 100 steps), entropy.png, selected_probability.png,
  raw_vs_processed.png, and report.html (self-contained; open it in any browser).
  `logitprobe report FILE` draws the plots and report.html again from a trace file.
  With --format parquet: steps.parquet, candidates.parquet and prompts.parquet for all
  prompts, run.json and summary.csv in --out, no folder per prompt and no plots.";

#[derive(Parser, Debug)]
#[command(
    name = "logitprobe",
    version,
    about = "See how a language model picks each next token",
    long_about = "See how a language model picks each next token.\n\nLogits come from llama.cpp (GGUF) or ONNX Runtime (ONNX); one sampler and one probe \
                  turn them into a Token Heatmap trace: the top candidates with an adaptive k, their mass, the entropy, and the \
                  sampled token's probability, log-probability and rank, for the raw and the processed distribution."
)]
pub struct Cli {
    /// Show logs (and the engine's own log lines) on stderr; -vv for more.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate from one or more prompts and trace every step.
    #[command(after_long_help = TRACE_HELP, args_override_self = true)]
    Trace(Box<TraceArgs>),
    /// List the recommended models (aliases for --model) and which are cached.
    Models,
    /// Show what a model holds: architecture, sizes, tensor types, tokenizer, chat template.
    Inspect(InspectArgs),
    /// Show the token ids and pieces of a text; with two --model, where they differ.
    Tokenize(TokenizeArgs),
    /// Compare two engines or quantizations position by position (KL divergence, Δp, top-1).
    #[command(
        after_long_help = COMPARE_HELP,
        mut_arg("ctx_size", |a| a.help("Corpus chunk length in tokens; each side's context is at least this [default: 512]"))
    )]
    Compare(Box<CompareArgs>),
    /// Draw the plots and report.html again from a trace JSON or a compare.json.
    Report(ReportArgs),
    /// Serve the model over HTTP: OpenAI's /v1/completions and /v1/chat/completions with
    /// logprobs (and the probe), llama-server's /completion, and a live viewer at /.
    #[command(after_long_help = SERVE_HELP)]
    Serve(Box<ServeArgs>),
    /// Join the shards of a sharded trace or compare (--shard) into what one run writes
    Merge(MergeArgs),
    /// Run trace or compare on Slurm as a job array of shards and a merge job
    #[command(after_long_help = SLURM_HELP)]
    Slurm(SlurmArgs),
}

const SLURM_HELP: &str = "\
EXAMPLE: logitprobe slurm trace --shards 8 --time 2:00:00 --cpus-per-task 4 -- \\
           --model model.gguf --prompts-file eval.jsonl --seed 1 --out /shared/run1
  writes /shared/run1/slurm/array.sbatch (task K runs shard K) and merge.sbatch, submits the
  array and the merge after it (--dependency=afterok), and prints how to follow them.
RESUME: a task run again skips the prompts or chunks it finished: resubmit a failed one with
  sbatch --array=K OUT/slurm/array.sbatch, then logitprobe merge OUT.";

/// `logitprobe merge`.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The --out of the shards
    pub dir: PathBuf,
}

/// `logitprobe slurm`.
#[derive(Args, Debug)]
pub struct SlurmArgs {
    #[command(subcommand)]
    pub command: SlurmCommand,
}

#[derive(Subcommand, Debug)]
pub enum SlurmCommand {
    /// Submit a sharded `trace` (of a --prompts-file) and its merge
    Trace(SlurmSubmitArgs),
    /// Submit a sharded `compare` (of a --text-file) and its merge
    Compare(SlurmSubmitArgs),
    /// Show which shards of a run are done, running or missing
    Status {
        /// The run's --out
        dir: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct SlurmSubmitArgs {
    /// Shards: tasks of the job array
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub shards: usize,
    /// Partition to run in [default: the cluster's]
    #[arg(long, value_name = "P")]
    pub partition: Option<String>,
    /// Time limit of each task (sbatch's --time, e.g. 1:00:00)
    #[arg(long, value_name = "T")]
    pub time: Option<String>,
    /// CPUs of each task
    #[arg(long, value_name = "C")]
    pub cpus_per_task: Option<usize>,
    /// Memory of each task (sbatch's --mem, e.g. 8G)
    #[arg(long, value_name = "M")]
    pub mem: Option<String>,
    /// Print the scripts; submit nothing
    #[arg(long)]
    pub dry_run: bool,
    /// The command's own flags, after `--`
    #[arg(last = true, required = true, value_name = "FLAGS")]
    pub args: Vec<String>,
}

const SERVE_HELP: &str = "\
ENDPOINTS: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, POST /completion
  (llama-server's, with n_probs and post_sampling_probs), GET /health, GET /metrics
  (Prometheus), GET / (live viewer).
LOGPROBS: raw_logprobs (default) = log-softmax of the logits at temperature 1, what evaluation
  harnesses expect (vLLM's and llama-server's /v1 meaning); processed_logprobs = the
  distribution the sampler drew from (after penalties, temperature, top-k/top-p/min-p;
  filtered tokens get -9999). A request with \"probe\": true also gets each token's raw and
  processed blocks, as `trace` writes them.
DETERMINISM: each choice draws from the ChaCha20 stream (request seed, choice index), so the
  same request gives the same tokens whatever else the server is doing.";

const COMPARE_HELP: &str = "\
SIDES: --a and --b take BACKEND:MODEL, BACKEND one of llama, onnx, test, e.g.
  --a llama:models/tiny/tiny-f32.gguf --b onnx:models/tiny/optimum
  --b can be repeated: A is scored once and each B is compared with it.
ENGINE FLAGS: each engine flag has an --a- and a --b- form (--a-flash-attn off,
  --b-cache-type-k f32); the plain form sets both sides. --ctx-size is the corpus chunk
  length (default 512) and each side's context is at least that.
INPUTS (one of):
  --text-file FILE   cut into --ctx-size chunks as llama-perplexity does; the second half
                     of each chunk is scored (--score-all: every position)
  --prompt TEXT      A generates --max-new-tokens with the sampling flags, then both score it
  --trace FILE       re-score the tokens of an adaptive_token_trace.json
STATISTICS use llama-perplexity --kl-divergence's names: PPL, Cor(ln PPL), Mean KLD ± err,
  percentiles, Δp (p_B − p_A of the actual next token), RMS Δp, Same top p.";

/// Generates a struct of engine flags for one side of `compare`, each named with the side's
/// prefix; clap needs the literal names.
macro_rules! side_engine_args {
    ($name:ident, $side:literal, $heading:literal, $threads:tt, $ctx:tt, $batch:tt, $ngl:tt,
     $fa:tt, $ctk:tt, $ctv:tt, $dev:tt, $ort:tt) => {
        // Each flag gets its long name as its id too: flattened structs that share field
        // names would otherwise share one clap id, and one flag would set every side.
        #[derive(Args, Debug, Clone, Default)]
        #[command(next_help_heading = $heading)]
        pub struct $name {
            #[arg(id = $threads, long = $threads, value_name = "N", help = concat!("--threads for side ", $side, " only"))]
            pub threads: Option<usize>,
            #[arg(id = $ctx, long = $ctx, value_name = "N", help = concat!("Context of side ", $side, " (at least --ctx-size)"))]
            pub ctx_size: Option<usize>,
            #[arg(id = $batch, long = $batch, value_name = "N", help = concat!("--batch-size for side ", $side, " only"))]
            pub batch_size: Option<usize>,
            #[arg(id = $ngl, long = $ngl, value_name = "N", help = concat!("--n-gpu-layers for side ", $side, " only"))]
            pub n_gpu_layers: Option<u32>,
            #[arg(id = $fa, long = $fa, value_enum, value_name = "WHEN", help = concat!("--flash-attn for side ", $side, " only"))]
            pub flash_attn: Option<FlashAttnArg>,
            #[arg(id = $ctk, long = $ctk, value_name = "TYPE", help = concat!("--cache-type-k for side ", $side, " only"))]
            pub cache_type_k: Option<String>,
            #[arg(id = $ctv, long = $ctv, value_name = "TYPE", help = concat!("--cache-type-v for side ", $side, " only"))]
            pub cache_type_v: Option<String>,
            #[arg(id = $dev, long = $dev, value_name = "DEVICE", help = concat!("--device for side ", $side, " only"))]
            pub device: Option<String>,
            #[arg(id = $ort, long = $ort, value_name = "PATH", help = concat!("--ort-lib for side ", $side, " only"))]
            pub ort_lib: Option<PathBuf>,
        }

        impl $name {
            /// The side's own flags over the shared ones.
            pub fn over(&self, base: &EngineArgs) -> EngineArgs {
                EngineArgs {
                    threads: self.threads.or(base.threads),
                    threads_batch: base.threads_batch,
                    ctx_size: self.ctx_size.or(base.ctx_size),
                    batch_size: self.batch_size.or(base.batch_size),
                    n_gpu_layers: self.n_gpu_layers.or(base.n_gpu_layers),
                    flash_attn: self.flash_attn.or(base.flash_attn),
                    cache_type_k: self.cache_type_k.clone().or(base.cache_type_k.clone()),
                    cache_type_v: self.cache_type_v.clone().or(base.cache_type_v.clone()),
                    device: self.device.clone().or(base.device.clone()),
                    ort_lib: self.ort_lib.clone().or(base.ort_lib.clone()),
                    fast_scoring: base.fast_scoring,
                }
            }
        }
    };
}

side_engine_args!(
    AEngineArgs,
    "A",
    "Engine flags of side A",
    "a-threads",
    "a-ctx-size",
    "a-batch-size",
    "a-n-gpu-layers",
    "a-flash-attn",
    "a-cache-type-k",
    "a-cache-type-v",
    "a-device",
    "a-ort-lib"
);
side_engine_args!(
    BEngineArgs,
    "B",
    "Engine flags of side B (every --b)",
    "b-threads",
    "b-ctx-size",
    "b-batch-size",
    "b-n-gpu-layers",
    "b-flash-attn",
    "b-cache-type-k",
    "b-cache-type-v",
    "b-device",
    "b-ort-lib"
);

/// `logitprobe compare`.
#[derive(Args, Debug, Default)]
#[command(group(clap::ArgGroup::new("input").args(["text_file", "prompt", "trace"])))]
pub struct CompareArgs {
    /// Side A, the base: BACKEND:MODEL (e.g. llama:model-f16.gguf); may be left out when
    /// --reference holds A's rows for the whole input
    #[arg(long, value_name = "BACKEND:MODEL")]
    pub a: Option<String>,
    /// Side B, compared with A: BACKEND:MODEL; repeat for a quantization ladder (each B is
    /// loaded alone, after the one before it is dropped)
    #[arg(long, value_name = "BACKEND:MODEL")]
    pub b: Vec<String>,
    /// Folder of A's reference: A's rows are written there, or reused when it holds them for
    /// the same A, input and settings [default: OUT/reference]
    #[arg(long, value_name = "DIR")]
    pub reference: Option<PathBuf>,
    /// Keep A's logits of this run, up to this many GB, in an unnamed temporary file beside
    /// the reference, so that each B reads them instead of replaying A's output head (it is
    /// never the reference, and never more than half the disk's free space); 0 replays
    #[arg(long, value_name = "GB", default_value_t = 32.0)]
    pub a_logits_spill_gb: f64,
    /// Load A and every B at once and score each chunk on all of them, without a reference
    /// (what --lens does; the numbers are the same)
    #[arg(long)]
    pub sides_together: bool,
    /// A as a llama-perplexity --kl-divergence-base FILE: its tokens are the input, its
    /// 16-bit rows A's distributions, and KLD, Δp and same top are computed as
    /// llama-perplexity computes them
    #[arg(long, value_name = "FILE", conflicts_with_all = ["a", "reference", "text_file", "prompt", "trace", "sides_together", "lens"])]
    pub a_logits: Option<PathBuf>,
    /// llama.cpp's CPU kernels for scoring: batch-invariant gives each token the number
    /// trace and serve give it, whatever the chunk; batched runs llama-perplexity's
    /// (tinyBLAS, repacked weights), faster on F16 and Q8_0, for holding results against
    /// published llama-perplexity tables
    #[arg(
        long,
        value_enum,
        value_name = "KIND",
        default_value = "batch-invariant"
    )]
    pub scoring_kernels: ScoringKernels,
    /// Also score A along llama.cpp's other kernels and report that A-against-A KLD beside
    /// each B's: the arithmetic's share of a small KLD (one more pass of A)
    #[arg(long)]
    pub noise_floor: bool,
    /// Corpus to score, cut into --ctx-size chunks
    #[arg(long, value_name = "FILE")]
    pub text_file: Option<PathBuf>,
    /// Prompt that A continues (--max-new-tokens, sampling flags); both sides then score it
    #[arg(long, short = 'p')]
    pub prompt: Option<String>,
    /// Re-score the tokens of an existing adaptive_token_trace.json
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Score every position of a chunk, not only its second half
    #[arg(long)]
    pub score_all: bool,
    /// Score at most this many chunks of the corpus [default: all]
    #[arg(long, value_name = "N")]
    pub chunks: Option<usize>,
    /// Also compare the logit lens: at each scored position, KL(A‖B) of the two sides' lens
    /// distributions at each layer, summarized per layer (where in the depth they part ways)
    #[arg(long)]
    pub lens: bool,
    /// Layers --lens compares: all, or numbers such as 0,3,7 [default: all]
    #[arg(long, value_name = "all|LIST", requires = "lens")]
    pub lens_layers: Option<String>,
    /// Wrap --prompt in A's chat template
    #[arg(long)]
    pub use_chat_template: bool,
    /// System message (with --use-chat-template)
    #[arg(long)]
    pub system_prompt: Option<String>,
    /// Sampling of A's continuation of --prompt
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// Output folder [default: outputs/compare]
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Output format: json writes compare.json and compare.csv; parquet also writes
    /// positions.parquet (a row per position and B) [default: json]
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub format: Option<OutputFormat>,
    /// Engine flags for both sides; --ctx-size is also the corpus chunk length [default: 512]
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub a_engine: AEngineArgs,
    #[command(flatten)]
    pub b_engine: BEngineArgs,
    #[command(flatten)]
    pub shard: ShardArgs,
}

/// Which of llama.cpp's CPU kernels `compare` scores with.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ScoringKernels {
    /// Each row summed as if alone in its batch: the numbers of trace and serve.
    #[default]
    BatchInvariant,
    /// llama.cpp's batched kernels, as llama-perplexity runs them.
    Batched,
}

/// Looking inside the model (Token Heatmap's flags and trace blocks).
#[derive(Args, Debug, Default, Clone)]
#[command(next_help_heading = "Inside the model")]
pub struct InsideArgs {
    /// Record the logit lens at each step: each decoder layer's output read through the
    /// model's final norm and output head (top-k, entropy, the selected token's rank and
    /// probability at that layer); costs a head product per layer per step
    #[arg(long)]
    pub capture_logit_lens: bool,
    /// Layers the lens reads: all, or numbers such as 0,3,7 [default: all]
    #[arg(long, value_name = "all|LIST", requires = "capture_logit_lens")]
    pub lens_layers: Option<String>,
    /// Candidates kept per lens layer [default: 8]
    #[arg(long, value_name = "K", requires = "capture_logit_lens")]
    pub lens_top_k: Option<usize>,
    /// The lens over every prompt position too (the trace's prompt_logit_lens)
    #[arg(long, requires = "capture_logit_lens")]
    pub lens_prompt: bool,
    /// The step logit_lens.png shows [default: 0]
    #[arg(long, value_name = "STEP")]
    pub lens_step: Option<usize>,
    /// Record attention summaries at each step (per layer: entropy, weight on the current
    /// and the first position, most-attended positions, each head's numbers); llama.cpp
    /// runs without flash attention then, ONNX needs an export with standard-op attention
    #[arg(long)]
    pub capture_attention: bool,
    /// Layers whose attention is summarized: all, or numbers such as 0,3,7 [default: all]
    #[arg(long, value_name = "all|LIST", requires = "capture_attention")]
    pub attention_layers: Option<String>,
    /// Most-attended positions kept per layer [default: 8]
    #[arg(long, value_name = "K", requires = "capture_attention")]
    pub attention_top_k: Option<usize>,
}

impl InsideArgs {
    /// The look inside the model the flags ask for; errors name the flag.
    pub fn config(&self) -> anyhow::Result<logitprobe::lens::InsideConfig> {
        use logitprobe::lens::Layers;
        let layers = |flag: &str, v: &Option<String>| -> anyhow::Result<Layers> {
            match v {
                Some(s) => Layers::parse(s).map_err(|e| usage!("{flag} {e}")),
                None => Ok(Layers::All),
            }
        };
        let top_k = |flag: &str, v: Option<usize>| -> anyhow::Result<usize> {
            match v {
                Some(0) => Err(usage!("{flag} 0 keeps nothing: use 1 or more")),
                Some(k) => Ok(k),
                None => Ok(8),
            }
        };
        Ok(logitprobe::lens::InsideConfig {
            lens: if self.capture_logit_lens {
                Some((
                    layers("--lens-layers", &self.lens_layers)?,
                    top_k("--lens-top-k", self.lens_top_k)?,
                ))
            } else {
                None
            },
            lens_prompt: self.capture_logit_lens && self.lens_prompt,
            attention: if self.capture_attention {
                Some((
                    layers("--attention-layers", &self.attention_layers)?,
                    top_k("--attention-top-k", self.attention_top_k)?,
                ))
            } else {
                None
            },
        })
    }
}

/// Which part of a job this process runs (see "On a cluster" in the README).
#[derive(Args, Debug, Default, Clone)]
#[command(next_help_heading = "Sharding")]
pub struct ShardArgs {
    /// Run shard K of N: the units (prompts of --prompts-file, chunks of --text-file) whose
    /// index i has i mod N = K, into a shared --out; `logitprobe merge` joins the shards
    /// [default: a Slurm array task's SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of
    /// SLURM_ARRAY_TASK_COUNT]
    #[arg(long, value_name = "K/N")]
    pub shard: Option<String>,
    /// Shard count; this task is shard SLURM_ARRAY_TASK_ID (Slurm) or JOB_COMPLETION_INDEX
    /// (Kubernetes Indexed Job)
    #[arg(long, value_name = "N", env = "LOGITPROBE_SHARDS")]
    pub shards: Option<usize>,
}

impl ShardArgs {
    /// The shard of this process, if the job is sharded.
    pub fn resolve(&self) -> anyhow::Result<Option<logitprobe::cluster::shard::Shard>> {
        use logitprobe::cluster::shard::{parse_shard, Shard, ShardError};
        let flag = |e: ShardError| {
            match e {
            ShardError::Malformed(s) => usage!("--shard {s:?} is not K/N: use e.g. --shard 0/4"),
            ShardError::NoShards => usage!("--shards 0 runs nothing: use 1 or more"),
            ShardError::CountsDiffer { given, count } => usage!(
                "--shard says {count} shards and --shards (or LOGITPROBE_SHARDS) {given}: give one"
            ),
            ShardError::NoIndex { count } => usage!(
                "--shards {count} needs this task's number: run it as a Slurm array task or a Kubernetes Indexed Job, or give --shard K/{count}"
            ),
            e => usage!("{e}"),
        }
        };
        let given = self
            .shard
            .as_deref()
            .map(parse_shard)
            .transpose()
            .map_err(flag)?;
        Shard::resolve(given, self.shards, |k| std::env::var(k).ok()).map_err(flag)
    }

    /// Whether sharding was asked for here rather than found in a scheduler's environment.
    pub fn asked(&self) -> bool {
        self.shard.is_some() || self.shards.is_some()
    }
}

/// `logitprobe report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// adaptive_token_trace.json (ours or Token Heatmap's, schema 1.x or 2.x) or compare.json
    pub input: PathBuf,
    /// Output folder [default: report]
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// The step logit_lens.png shows, for a trace with the logit lens
    #[arg(long, value_name = "STEP", default_value_t = 0)]
    pub lens_step: usize,
}

/// `logitprobe inspect`: reads metadata only, never the weights.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// GGUF file, ONNX folder, Hugging Face repo id or catalogue alias
    #[arg(long, short = 'm')]
    pub model: String,
    /// File inside a repo or folder
    #[arg(long)]
    pub model_file: Option<String>,
    /// Engine [default: llama for .gguf, onnx for folders and .onnx]
    #[arg(long, value_enum)]
    pub backend: Option<BackendArg>,
}

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// Text to tokenize
    pub text: String,
    /// Model (give it twice to compare two tokenizers)
    #[arg(long, short = 'm', required = true)]
    pub model: Vec<String>,
    /// File inside a repo or folder
    #[arg(long)]
    pub model_file: Option<String>,
    /// Engine [default: llama for .gguf, onnx for folders and .onnx]
    #[arg(long, value_enum)]
    pub backend: Option<BackendArg>,
    /// Parse special-token text such as <|im_start|> into its id
    #[arg(long)]
    pub special: bool,
    /// Add BOS [default: the model's own rule]
    #[arg(long)]
    pub add_bos: Option<bool>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
pub enum BackendArg {
    /// GGUF models through llama.cpp
    Llama,
    /// ONNX exports through ONNX Runtime
    Onnx,
    /// deterministic in-memory test source; --model VOCAB[:SEED[:EOS_BIAS]]
    Test,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Llama => Backend::Llama,
            BackendArg::Onnx => Backend::Onnx,
            BackendArg::Test => Backend::Test,
        }
    }
}

/// `--format` of trace and compare.
#[derive(Copy, Clone, Debug, Default, ValueEnum, PartialEq, Eq)]
pub enum OutputFormat {
    /// JSON (and CSV) files, as Token Heatmap writes them
    #[default]
    Json,
    /// Apache Parquet tables, zstd-compressed
    Parquet,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
pub enum FlashAttnArg {
    On,
    Off,
    Auto,
}

/// Generation and sampling flags, shared by `trace` and `compare --prompt`.
#[derive(Args, Debug, Clone, Default)]
pub struct SamplingArgs {
    /// Tokens to generate per prompt [default: 64]
    #[arg(long, value_name = "N")]
    pub max_new_tokens: Option<usize>,
    /// Go on past end-of-generation tokens to --max-new-tokens (for benchmarks: every
    /// prompt the same length)
    #[arg(long)]
    pub ignore_eos: bool,
    /// Sampling temperature; 0 = greedy [default: 0.8]
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    pub temperature: Option<f64>,
    /// Top-p (nucleus) mass; 1 = off [default: 0.95]
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    /// Top-k; 0 = off [default: 0]
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Min-p, relative to the top token's probability; 0 = off [default: 0]
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub min_p: Option<f64>,
    /// Repetition penalty; 1 = off [default: 1]
    #[arg(long, value_name = "R", allow_negative_numbers = true)]
    pub repeat_penalty: Option<f32>,
    /// Presence penalty; 0 = off [default: 0]
    #[arg(long, value_name = "X", allow_negative_numbers = true)]
    pub presence_penalty: Option<f32>,
    /// Frequency penalty; 0 = off [default: 0]
    #[arg(long, value_name = "X", allow_negative_numbers = true)]
    pub frequency_penalty: Option<f32>,
    /// Random seed [default: a fresh one, recorded in run.json / compare.json]
    #[arg(long)]
    pub seed: Option<u64>,
}

/// The probe's adaptive-k flags, shared by `trace` and `compare`.
#[derive(Args, Debug, Clone, Default)]
pub struct ProbeArgs {
    /// Fewest candidates the probe keeps per step (per position in compare) [default: 8]
    #[arg(long, value_name = "K")]
    pub min_k: Option<usize>,
    /// Most candidates the probe keeps [default: 64]
    #[arg(long, value_name = "K")]
    pub max_k: Option<usize>,
    /// Keep the smallest k whose probability mass reaches this [default: 0.95]
    #[arg(long, value_name = "M", allow_negative_numbers = true)]
    pub mass_threshold: Option<f64>,
}

impl ProbeArgs {
    /// The probe settings, Token Heatmap's defaults where a flag is absent; errors name the flag.
    pub fn config(&self) -> anyhow::Result<logitprobe::dist::probe::ProbeConfig> {
        let probe = logitprobe::dist::probe::ProbeConfig {
            min_k: self.min_k.unwrap_or(8),
            max_k: self.max_k.unwrap_or(64),
            mass_threshold: self.mass_threshold.unwrap_or(0.95),
            eps: 1e-12,
        };
        probe.validate()?;
        Ok(probe)
    }
}

/// Engine flags, shared by every command that loads a model.
#[derive(Args, Debug, Clone, Default)]
pub struct EngineArgs {
    /// CPU threads for generation [default: llama.cpp: the physical cores, as llama.cpp
    /// counts them; ONNX Runtime: its own]. On a busy machine fewer threads are faster:
    /// llama.cpp's threads wait for each other at every op
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// llama.cpp: CPU threads for prompt processing and scoring [default: --threads]
    #[arg(long, value_name = "N")]
    pub threads_batch: Option<usize>,
    /// Context length per sequence in tokens [default: trace on llama.cpp: what the job needs,
    /// the longest prompt plus --max-new-tokens rounded up to 256; else the model's, at most 4096]
    #[arg(long, value_name = "N")]
    pub ctx_size: Option<usize>,
    /// llama.cpp: batch size for prompt evaluation and scoring [default: 512]
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// llama.cpp: layers to offload to the GPU (needs a build with llama-cuda, -metal or -vulkan)
    #[arg(long, value_name = "N")]
    pub n_gpu_layers: Option<u32>,
    /// llama.cpp: flash attention; it changes the distributions slightly [default: auto]
    #[arg(long, value_enum, value_name = "WHEN")]
    pub flash_attn: Option<FlashAttnArg>,
    /// llama.cpp: K cache type (f16, f32, bf16, q8_0, q4_0 ...) [default: f16; f32 for exact comparisons]
    #[arg(long, value_name = "TYPE")]
    pub cache_type_k: Option<String>,
    /// llama.cpp: V cache type [default: f16]
    #[arg(long, value_name = "TYPE")]
    pub cache_type_v: Option<String>,
    /// ONNX Runtime: cpu, cuda or auto [default: cpu]
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,
    /// ONNX Runtime shared library (libonnxruntime.so) [env: ORT_DYLIB_PATH]
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
    /// Score with llama.cpp's batched kernels (compare's --scoring-kernels batched).
    #[arg(skip)]
    pub fast_scoring: bool,
}

impl EngineArgs {
    /// The engine options; thread counts out of range are refused with the machine's count.
    pub fn options(&self, verbose: bool) -> anyhow::Result<EngineOptions> {
        let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
        for (flag, t) in [
            ("--threads", self.threads),
            ("--threads-batch", self.threads_batch),
        ] {
            match t {
                Some(0) => {
                    return Err(usage!(
                        "{flag} 0 runs nothing: use 1 to {} (this machine has {logical} logical CPUs)",
                        4 * logical
                    ))
                }
                Some(n) if n > 4 * logical => {
                    return Err(usage!(
                        "{flag} {n} is far more than this machine's {logical} logical CPUs: use at most {} (the default is {}, its physical cores)",
                        4 * logical,
                        logitprobe_backends::physical_cores()
                    ))
                }
                _ => {}
            }
        }
        Ok(EngineOptions {
            threads: self.threads,
            threads_batch: self.threads_batch,
            ctx_size: self.ctx_size,
            batch_size: self.batch_size,
            n_gpu_layers: self.n_gpu_layers.unwrap_or(0),
            flash_attn: match self.flash_attn {
                Some(FlashAttnArg::On) => FlashAttn::On,
                Some(FlashAttnArg::Off) => FlashAttn::Off,
                Some(FlashAttnArg::Auto) | None => FlashAttn::Auto,
            },
            cache_type_k: self.cache_type_k.clone(),
            cache_type_v: self.cache_type_v.clone(),
            device: self.device.clone(),
            ort_lib: self.ort_lib.clone(),
            verbose,
            fast_scoring: self.fast_scoring,
        })
    }
}

/// `logitprobe trace`. Options without a value here take it from `--config`, then from the
/// defaults shown in `--help` (Token Heatmap's).
#[derive(Args, Debug, Default)]
pub struct TraceArgs {
    /// Engine that runs the model [default: from the path: llama for .gguf, onnx for folders and .onnx]
    #[arg(long, value_enum)]
    pub backend: Option<BackendArg>,
    /// Model: a GGUF file, an ONNX folder (or a file in it), a Hugging Face repo id, or a catalogue alias
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// File inside a Hugging Face repo (e.g. onnx/model.onnx, qwen2.5-0.5b-instruct-q4_k_m.gguf)
    #[arg(long)]
    pub model_file: Option<String>,
    /// Prompt to generate from; repeat for a batch
    #[arg(long, short = 'p')]
    pub prompt: Vec<String>,
    /// Prompts, one per line, or JSONL lines with "prompt" and optional "system_prompt"
    #[arg(long, value_name = "FILE")]
    pub prompts_file: Option<PathBuf>,
    /// System message (with --use-chat-template)
    #[arg(long)]
    pub system_prompt: Option<String>,
    /// Wrap each prompt in the model's own chat template
    #[arg(long)]
    pub use_chat_template: bool,
    /// A chat template instead of the model's (implies --use-chat-template): a name
    /// (chatml, gemma, llama3, phi3) or the Jinja source itself, as llama.cpp takes it
    #[arg(long, value_name = "NAME|JINJA", conflicts_with = "chat_template_file")]
    pub chat_template: Option<String>,
    /// A chat template read from a Jinja file (implies --use-chat-template)
    #[arg(long, value_name = "FILE")]
    pub chat_template_file: Option<PathBuf>,
    /// Tokenize special-token text in a plain prompt (<|im_start|>) as text, not as its id
    #[arg(long)]
    pub no_parse_special: bool,
    /// Sequences decoded together, each in a slot with its own KV cache; when one ends, the
    /// next prompt takes its slot [default: the number of prompts, at most 8, fewer when
    /// their KV cache does not fit in memory]
    #[arg(long, value_name = "N")]
    pub parallel: Option<usize>,
    /// End a sequence where its generated text contains STRING (not part of the output);
    /// repeat for several
    #[arg(long, value_name = "STRING")]
    pub stop: Vec<String>,
    /// Skip each prompt's plots and report.html (`logitprobe report` draws them later)
    #[arg(long)]
    pub no_plots: bool,
    /// Output format: json, a folder per prompt (trace JSON and CSV, plots, report.html); or
    /// parquet, three zstd tables for the whole run (steps.parquet, candidates.parquet,
    /// prompts.parquet) and no plots [default: json]
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub format: Option<OutputFormat>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// Output folder [default: outputs]
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// YAML file of options (our long flag names with underscores); flags override it
    #[arg(long, value_name = "FILE.yaml")]
    pub config: Option<PathBuf>,
    /// Sample without probing (for benchmarks: the trace then holds no distributions)
    #[arg(long, hide = true)]
    pub no_probe: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub inside: InsideArgs,
    #[command(flatten)]
    pub shard: ShardArgs,
}

/// `logitprobe serve`.
#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// Engine that runs the model [default: from the path: llama for .gguf, onnx for folders and .onnx]
    #[arg(long, value_enum)]
    pub backend: Option<BackendArg>,
    /// Model: a GGUF file, an ONNX folder, a Hugging Face repo id, or a catalogue alias
    #[arg(long, short = 'm')]
    pub model: String,
    /// File inside a Hugging Face repo
    #[arg(long)]
    pub model_file: Option<String>,
    /// The model id clients send and /v1/models lists [default: the model's name]
    #[arg(long, value_name = "NAME")]
    pub alias: Option<String>,
    /// Address to listen on; anything but 127.0.0.1 / localhost exposes the server
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start)
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences decoded together (slots); requests beyond wait in the queue [default: 4]
    #[arg(long, value_name = "N")]
    pub parallel: Option<usize>,
    /// Requests that may wait for a slot; more get 503
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_queue: usize,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health
    #[arg(
        long,
        value_name = "KEY",
        env = "LOGITPROBE_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// Most top logprobs a request may ask for
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub max_logprobs: usize,
    /// What a logprob means: raw_logprobs or processed_logprobs (see below)
    #[arg(long, value_enum, value_name = "MODE", default_value = "raw_logprobs")]
    pub logprobs_mode: logitprobe::dist::logprobs::LogprobsMode,
    /// Largest request body in bytes
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    #[command(flatten)]
    pub probe: ProbeArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}
