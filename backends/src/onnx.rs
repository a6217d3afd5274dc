//! ONNX causal-LM exports through ONNX Runtime (`ort`, library loaded at run time).
//!
//! Inputs and outputs are read from the session, never assumed per model family. Two export
//! layouts are known to run:
//! - optimum: `input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key|value`
//!   → `logits`, `present.{i}.key|value`. Prompts of different lengths go in one batch, left
//!   padded, with the mask and positions set per row.
//! - onnxruntime-genai: the same without `position_ids` (GroupQueryAttention derives positions
//!   from the mask and assumes the valid tokens lead each row), so each sequence runs as its
//!   own batch of one with its own KV cache.
//!
//! The KV cache stays in ONNX Runtime values between steps: `present` becomes the next step's
//! `past` without a copy (a copy only happens when finished sequences leave a batch).

use crate::{usage, EngineOptions, LogitSource, ModelInfo, TokenId};
use anyhow::Context as _;
use half::f16;
use ndarray::{Array2, Array4, ArrayViewD, Axis, Ix4};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One ONNX Runtime environment per process, ever.
static ENV: OnceLock<Result<(ort::environment::Environment, PathBuf), String>> = OnceLock::new();

/// Where ONNX Runtime is looked for, in order.
pub fn find_ort_lib(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return Ok(PathBuf::from(p));
    }
    // An onnxruntime (or onnxruntime-gpu) installed with pip, in the active Python or the
    // user's site-packages: both install the package `onnxruntime`.
    let py = std::process::Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
        .args([
            "-c",
            "import importlib.util as u, os; s = u.find_spec('onnxruntime'); print(os.path.dirname(s.origin) if s and s.origin else '')",
        ])
        .output();
    if let Ok(out) = py {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !dir.is_empty() {
            if let Some(lib) = newest_lib(&Path::new(&dir).join("capi")) {
                return Ok(lib);
            }
        }
    }
    let cache = std::env::var_os("LOGITPROBE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("logitprobe")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/logitprobe")));
    if let Some(lib) = cache.and_then(|c| newest_lib(&c.join("onnxruntime"))) {
        return Ok(lib);
    }
    Err(usage!(
        "no ONNX Runtime library found: run models/fetch onnxruntime, `pip install onnxruntime`, or pass --ort-lib /path/to/libonnxruntime.so"
    ))
}

fn newest_lib(dir: &Path) -> Option<PathBuf> {
    let mut libs: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (n.starts_with("libonnxruntime.so")
                || n == "libonnxruntime.dylib"
                || n == "onnxruntime.dll")
                && !n.contains("providers")
        })
        .collect();
    libs.sort();
    libs.pop()
}

fn environment(
    opts: &EngineOptions,
) -> anyhow::Result<(&'static ort::environment::Environment, &'static Path)> {
    let lib = find_ort_lib(opts.ort_lib.as_deref())?;
    let got = ENV.get_or_init(|| {
        if !lib.is_file() {
            return Err(format!(
                "ONNX Runtime library {} does not exist; fix --ort-lib / ORT_DYLIB_PATH or run models/fetch onnxruntime",
                lib.display()
            ));
        }
        let builder = ort::init_from(&lib).map_err(|e| {
            format!(
                "cannot load ONNX Runtime from {}: {e}; logitprobe needs ONNX Runtime 1.{}.x or newer (pip install onnxruntime)",
                lib.display(),
                ort::MINOR_VERSION
            )
        })?;
        let env = builder.with_name("logitprobe").build().map_err(|e| e.to_string())?;
        Ok((env, lib.clone()))
    });
    match got {
        Ok((env, lib)) => Ok((env, lib.as_path())),
        Err(e) => Err(usage!("{e}")),
    }
}

/// How this export wants its inputs.
#[derive(Debug, Clone)]
struct Layout {
    attention_mask: bool,
    position_ids: bool,
    /// (past key, past value, present key, present value) names per layer.
    kv: Vec<[String; 4]>,
    kv_dtype: TensorElementType,
    kv_heads: usize,
    head_dim: usize,
}

/// Per-batch state: the rows' sequence ids, their KV cache and mask.
struct Batch {
    rows: Vec<usize>,
    past: Vec<(DynValue, DynValue)>,
    /// `[rows, t]` attention mask, row-major.
    mask: Vec<i64>,
    t: usize,
    next_pos: Vec<i64>,
}

/// An ONNX export in ONNX Runtime.
pub struct OnnxSource {
    session: Session,
    layout: Layout,
    info: ModelInfo,
    tokenizer: tokenizers::Tokenizer,
    /// The same tokenizer with special-token text encoded as plain text.
    tokenizer_plain: tokenizers::Tokenizer,
    byte_level: bool,
    special: Vec<bool>,
    chat_template: Option<String>,
    batches: Vec<Batch>,
    n_seqs: usize,
}

fn read_json(path: &Path) -> anyhow::Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(t) => {
            Ok(Some(serde_json::from_str(&t).map_err(|e| {
                usage!("{} is not valid JSON: {e}", path.display())
            })?))
        }
        Err(_) => Ok(None),
    }
}

fn ids_of(v: Option<&Value>) -> Vec<TokenId> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as TokenId]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|n| n as TokenId)
            .collect(),
        _ => Vec::new(),
    }
}

/// Token text of a `tokenizer_config.json` entry (a string or an AddedToken object).
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

/// GPT-2's byte ↔ unicode table, inverted: the char a byte-level BPE piece uses → the byte.
fn byte_decoder() -> &'static std::collections::HashMap<char, u8> {
    static TABLE: OnceLock<std::collections::HashMap<char, u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .collect();
        let mut cs = bs.clone();
        let mut n = 0;
        for b in 0..256u32 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        bs.iter()
            .zip(&cs)
            .map(|(&b, &c)| (char::from_u32(c).expect("valid"), b as u8))
            .collect()
    })
}

fn tensor_dims(vt: &ValueType) -> Option<(TensorElementType, Vec<i64>)> {
    match vt {
        ValueType::Tensor { ty, shape, .. } => Some((*ty, shape.iter().copied().collect())),
        _ => None,
    }
}

impl OnnxSource {
    /// Opens a model folder (or a `.onnx` file inside one).
    pub fn open(path: &Path, opts: &EngineOptions) -> anyhow::Result<Self> {
        let (dir, model_file) = if path.is_dir() {
            let direct = path.join("model.onnx");
            let nested = path.join("onnx").join("model.onnx");
            let f = if direct.is_file() { direct } else { nested };
            (path.to_path_buf(), f)
        } else {
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            // tokenizer files sit beside the model, or one level up (onnx/model.onnx).
            let dir = if dir.join("tokenizer.json").is_file() || dir.parent().is_none() {
                dir
            } else {
                dir.parent().map(Path::to_path_buf).unwrap_or(dir)
            };
            (dir, path.to_path_buf())
        };
        if !model_file.is_file() {
            return Err(usage!(
                "no model.onnx in {}: give an ONNX model folder (optimum or onnxruntime-genai export) or the .onnx file",
                path.display()
            ));
        }
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| {
            usage!(
                "cannot read {}: {e}; an ONNX model folder needs the tokenizer.json of its model",
                tok_path.display()
            )
        })?;
        let mut tokenizer_plain = tokenizer.clone();
        tokenizer_plain.set_encode_special_tokens(true);

        let (env, lib) = environment(opts)?;
        let device = opts.device.as_deref().unwrap_or("cpu");
        let threads = opts.threads.unwrap_or(0);
        let (session, provider) = build_session(env, &model_file, device, threads)?;

        let layout = read_layout(&session, &model_file)?;
        let config = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
        let gen_config = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let genai = read_json(&dir.join("genai_config.json"))?.unwrap_or(Value::Null);
        let tok_config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);

        let logits_out = session
            .outputs()
            .iter()
            .find(|o| o.name() == "logits")
            .expect("checked in read_layout");
        let (logits_ty, logits_shape) =
            tensor_dims(logits_out.dtype()).context("logits is not a tensor")?;
        let n_vocab = match logits_shape.last() {
            Some(&d) if d > 0 => d as usize,
            _ => config
                .get("vocab_size")
                .and_then(Value::as_u64)
                .or_else(|| genai.pointer("/model/vocab_size").and_then(Value::as_u64))
                .map(|v| v as usize)
                .ok_or_else(|| {
                    usage!(
                        "{}: the logits width is dynamic and config.json has no vocab_size",
                        model_file.display()
                    )
                })?,
        };
        let tokenizer_vocab = tokenizer.get_vocab_size(true);
        if tokenizer_vocab > n_vocab {
            return Err(usage!(
                "the tokenizer defines {tokenizer_vocab} tokens but the model's logits have {n_vocab}: tokenizer.json belongs to another model"
            ));
        }

        let token_id = |t: Option<String>| t.and_then(|t| tokenizer.token_to_id(&t));
        let bos = token_id(token_text(tok_config.get("bos_token")))
            .or_else(|| ids_of(config.get("bos_token_id")).first().copied());
        let eos = token_id(token_text(tok_config.get("eos_token")))
            .or_else(|| ids_of(config.get("eos_token_id")).first().copied());
        let mut eog: Vec<TokenId> = ids_of(gen_config.get("eos_token_id"));
        eog.extend(ids_of(config.get("eos_token_id")));
        eog.extend(ids_of(genai.pointer("/model/eos_token_id")));
        eog.extend(eos);
        eog.sort_unstable();
        eog.dedup();
        // BOS rule: tokenizer_config's add_bos_token when it says, else what the tokenizer's
        // own post-processor does.
        let add_bos = match tok_config.get("add_bos_token").and_then(Value::as_bool) {
            Some(b) => b,
            None => match (
                bos,
                tokenizer.encode("a", true),
                tokenizer.encode("a", false),
            ) {
                (Some(b), Ok(with), Ok(without)) => {
                    with.get_ids().first() == Some(&b) && without.get_ids().first() != Some(&b)
                }
                _ => false,
            },
        };
        let chat_template = match tok_config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(String::from),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        let n_ctx_model = config
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .or_else(|| {
                genai
                    .pointer("/model/context_length")
                    .and_then(Value::as_u64)
            })
            .unwrap_or(4096) as usize;
        let n_ctx = opts.ctx_size.unwrap_or(n_ctx_model.min(4096));
        if n_ctx > n_ctx_model {
            return Err(usage!(
                "--ctx-size {n_ctx} is beyond the model's context {n_ctx_model}; use --ctx-size {n_ctx_model} or less"
            ));
        }
        let byte_level = tokenizer
            .get_decoder()
            .and_then(|d| serde_json::to_value(d).ok())
            .is_some_and(|v| v.get("type").and_then(Value::as_str) == Some("ByteLevel"));
        let mut special = vec![false; n_vocab];
        for (id, t) in tokenizer.get_added_tokens_decoder() {
            if t.special && (id as usize) < n_vocab {
                special[id as usize] = true;
            }
        }

        let mut details = serde_json::Map::new();
        details.insert(
            "layout".into(),
            if layout.position_ids {
                "optimum (position_ids)"
            } else {
                "onnxruntime-genai (no position_ids)"
            }
            .into(),
        );
        details.insert("execution_provider".into(), provider.clone().into());
        details.insert(
            "threads".into(),
            opts.threads.map_or(Value::from("ort default"), Value::from),
        );
        details.insert("n_layer".into(), layout.kv.len().into());
        details.insert("kv_heads".into(), layout.kv_heads.into());
        details.insert("head_dim".into(), layout.head_dim.into());
        details.insert("kv_dtype".into(), dtype_name(layout.kv_dtype).into());
        details.insert("ort_library".into(), lib.display().to_string().into());
        details.insert("n_ctx".into(), n_ctx.into());
        details.insert("model_file".into(), model_file.display().to_string().into());
        // Weight types are a description, not a requirement: a protobuf this reader cannot
        // walk still loads and runs.
        match crate::onnx_proto::weight_types(&model_file) {
            Ok(w) => {
                details.insert(
                    "tensor_types".into(),
                    serde_json::to_value(&w.types).unwrap_or_default(),
                );
                details.insert("bits_per_weight".into(), w.bits_per_weight.into());
            }
            Err(e) => tracing::debug!("weight types of {}: {e}", model_file.display()),
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(OnnxSource {
            info: ModelInfo {
                name,
                engine: "onnxruntime".into(),
                engine_version: format!(
                    "ort 2.0.0-rc.15 (ONNX Runtime API {})",
                    ort::MINOR_VERSION
                ),
                device: if provider == "CUDAExecutionProvider" {
                    "cuda".into()
                } else {
                    "cpu".into()
                },
                n_vocab,
                tokenizer_vocab,
                n_ctx,
                bos,
                eos,
                eog,
                add_bos,
                logits_dtype: dtype_name(logits_ty).into(),
                details,
            },
            session,
            layout,
            tokenizer,
            tokenizer_plain,
            byte_level,
            special,
            chat_template,
            batches: Vec::new(),
            n_seqs: 0,
        })
    }

    fn empty_past(&self, rows: usize) -> anyhow::Result<Vec<(DynValue, DynValue)>> {
        let shape = [rows, self.layout.kv_heads, 0, self.layout.head_dim];
        let make = || -> anyhow::Result<DynValue> {
            Ok(match self.layout.kv_dtype {
                TensorElementType::Float16 => {
                    Tensor::<f16>::from_array((shape, Vec::<f16>::new()))?.into_dyn()
                }
                _ => Tensor::<f32>::from_array((shape, Vec::<f32>::new()))?.into_dyn(),
            })
        };
        (0..self.layout.kv.len())
            .map(|_| Ok((make()?, make()?)))
            .collect()
    }

    /// One forward pass of `ids` (`[rows, len]`) on top of `batch`; returns the logits of the
    /// positions in `want` (row, position) and updates the batch's KV cache and mask.
    fn forward(
        &mut self,
        b: usize,
        ids: &[i64],
        len: usize,
        new_mask: &[i64],
        pos: &[i64],
        want: &[(usize, usize)],
    ) -> anyhow::Result<Array2<f32>> {
        let rows = self.batches[b].rows.len();
        let t = self.batches[b].t + len;
        let mut mask = Vec::with_capacity(rows * t);
        for r in 0..rows {
            let old = &self.batches[b].mask[r * self.batches[b].t..(r + 1) * self.batches[b].t];
            mask.extend_from_slice(old);
            mask.extend_from_slice(&new_mask[r * len..(r + 1) * len]);
        }
        let mut inputs: Vec<(String, SessionInputValue)> =
            Vec::with_capacity(3 + 2 * self.layout.kv.len());
        inputs.push((
            "input_ids".into(),
            Tensor::<i64>::from_array(([rows, len], ids.to_vec()))?.into(),
        ));
        if self.layout.attention_mask {
            inputs.push((
                "attention_mask".into(),
                Tensor::<i64>::from_array(([rows, t], mask.clone()))?.into(),
            ));
        }
        if self.layout.position_ids {
            inputs.push((
                "position_ids".into(),
                Tensor::<i64>::from_array(([rows, len], pos.to_vec()))?.into(),
            ));
        }
        let batch = &self.batches[b];
        for (names, (k, v)) in self.layout.kv.iter().zip(&batch.past) {
            inputs.push((names[0].clone(), k.into()));
            inputs.push((names[1].clone(), v.into()));
        }
        let mut outputs = self
            .session
            .run(inputs)
            .map_err(|e| anyhow::anyhow!("ONNX Runtime run failed: {e}"))?;
        let logits = outputs.remove("logits").context("no logits output")?;
        let n_vocab = self.info.n_vocab;
        let mut out = Array2::<f32>::zeros((want.len(), n_vocab));
        {
            let view: ArrayViewD<f32>;
            let owned;
            let lv = match logits.try_extract_array::<f32>() {
                Ok(v) => v,
                Err(_) => {
                    let h = logits
                        .try_extract_array::<f16>()
                        .context("logits are neither float32 nor float16")?;
                    owned = h.mapv(f32::from);
                    view = owned.view();
                    view
                }
            };
            anyhow::ensure!(
                lv.ndim() == 3 && lv.shape()[2] == n_vocab,
                "logits have shape {:?}, expected [batch, seq, {n_vocab}]",
                lv.shape()
            );
            let out_len = lv.shape()[1];
            for (i, &(r, p)) in want.iter().enumerate() {
                // Exports that emit only the last position give [batch, 1, vocab].
                let p = if out_len == len { p } else { out_len - 1 };
                out.row_mut(i)
                    .assign(&lv.index_axis(Axis(0), r).index_axis(Axis(0), p));
            }
        }
        let mut past = Vec::with_capacity(self.layout.kv.len());
        for names in &self.layout.kv {
            let k = outputs
                .remove(&names[2])
                .with_context(|| format!("no {} output", names[2]))?;
            let v = outputs
                .remove(&names[3])
                .with_context(|| format!("no {} output", names[3]))?;
            past.push((k, v));
        }
        drop(outputs);
        let batch = &mut self.batches[b];
        batch.past = past;
        batch.mask = mask;
        batch.t = t;
        Ok(out)
    }

    /// Keeps only `keep` rows (batch row indices, in the new order) of batch `b`.
    fn compact(&mut self, b: usize, keep: &[usize]) -> anyhow::Result<()> {
        let batch = &mut self.batches[b];
        let t = batch.t;
        let mut mask = Vec::with_capacity(keep.len() * t);
        for &r in keep {
            mask.extend_from_slice(&batch.mask[r * t..(r + 1) * t]);
        }
        let mut past = Vec::with_capacity(batch.past.len());
        for (k, v) in &batch.past {
            past.push((select_rows(k, keep)?, select_rows(v, keep)?));
        }
        batch.rows = keep.iter().map(|&r| batch.rows[r]).collect();
        batch.next_pos = keep.iter().map(|&r| batch.next_pos[r]).collect();
        batch.mask = mask;
        batch.past = past;
        Ok(())
    }

    fn check_ctx(&self, seq: usize, len: usize) -> anyhow::Result<()> {
        if len > self.info.n_ctx {
            return Err(usage!(
                "sequence {seq} needs {len} tokens but --ctx-size is {}; raise --ctx-size or shorten the prompt",
                self.info.n_ctx
            ));
        }
        Ok(())
    }
}

fn select_rows(v: &DynValue, keep: &[usize]) -> anyhow::Result<DynValue> {
    if let Ok(a) = v.try_extract_array::<f32>() {
        let a = a.into_dimensionality::<Ix4>()?.select(Axis(0), keep);
        return Ok(Tensor::from_array(a)?.into_dyn());
    }
    let a: Array4<f16> = v
        .try_extract_array::<f16>()?
        .into_dimensionality::<Ix4>()?
        .select(Axis(0), keep);
    Ok(Tensor::from_array(a)?.into_dyn())
}

fn dtype_name(t: TensorElementType) -> &'static str {
    match t {
        TensorElementType::Float32 => "float32",
        TensorElementType::Float16 => "float16",
        TensorElementType::Bfloat16 => "bfloat16",
        _ => "other",
    }
}

/// Builds the session on the asked device. `ort::Error<SessionBuilder>` is not Send, so the
/// builder chain stays inside an `ort::Result` function.
fn build_session(
    env: &ort::environment::Environment,
    model: &Path,
    device: &str,
    threads: usize,
) -> anyhow::Result<(Session, String)> {
    fn build(
        env: &ort::environment::Environment,
        model: &Path,
        cuda: bool,
        threads: usize,
    ) -> ort::Result<Session> {
        let mut b = Session::builder(env)?;
        if threads > 0 {
            b = b
                .with_intra_threads(threads)
                .map_err(ort::Error::<()>::from)?;
        }
        if cuda {
            b = b
                .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
                .map_err(ort::Error::<()>::from)?;
        }
        b.commit_from_file(model)
    }
    let fail = |e: ort::Error| {
        let msg = e.to_string();
        if msg.contains("Protobuf parsing failed")
            || msg.contains("ModelProto")
            || msg.contains("INVALID_PROTOBUF")
        {
            usage!(
                "{} is not a valid ONNX model: {}",
                model.display(),
                msg.lines().next().unwrap_or("")
            )
        } else {
            usage!(
                "ONNX Runtime could not load {}: {}",
                model.display(),
                msg.lines().next().unwrap_or("")
            )
        }
    };
    match device {
        "cpu" => Ok((build(env, model, false, threads).map_err(fail)?, "CPUExecutionProvider".into())),
        "cuda" => match build(env, model, true, threads) {
            Ok(s) => Ok((s, "CUDAExecutionProvider".into())),
            Err(e) => Err(usage!(
                "--device cuda: the CUDA execution provider cannot register ({}); install onnxruntime-gpu with CUDA 13 and cuDNN 9, or use --device cpu",
                e.to_string().lines().next().unwrap_or("")
            )),
        },
        "auto" => match build(env, model, true, threads) {
            Ok(s) => {
                tracing::info!("--device auto picked CUDA");
                eprintln!("device auto: using CUDA");
                Ok((s, "CUDAExecutionProvider".into()))
            }
            Err(e) => {
                eprintln!("device auto: CUDA unavailable ({}), using CPU", e.to_string().lines().next().unwrap_or(""));
                Ok((build(env, model, false, threads).map_err(fail)?, "CPUExecutionProvider".into()))
            }
        },
        other => Err(usage!("--device {other} is unknown: use cpu, cuda or auto")),
    }
}

fn read_layout(session: &Session, model: &Path) -> anyhow::Result<Layout> {
    let shown = model.display();
    let inputs: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
    let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
    if !outputs.contains(&"logits") {
        return Err(usage!(
            "{shown} has no 'logits' output (outputs: {}); export it as a causal LM (optimum --task text-generation-with-past)",
            outputs.join(", ")
        ));
    }
    if !inputs.contains(&"input_ids") {
        return Err(usage!(
            "{shown} has no 'input_ids' input; it is not a causal LM export"
        ));
    }
    let mut kv = Vec::new();
    let mut kv_meta = None;
    for name in &inputs {
        let Some(rest) = name.strip_prefix("past_key_values.") else {
            continue;
        };
        let Some(layer) = rest.strip_suffix(".key") else {
            continue;
        };
        let value = format!("past_key_values.{layer}.value");
        let pk = format!("present.{layer}.key");
        let pv = format!("present.{layer}.value");
        if !inputs.contains(&value.as_str())
            || !outputs.contains(&pk.as_str())
            || !outputs.contains(&pv.as_str())
        {
            return Err(usage!(
                "{shown}: KV input {name} has no matching {value} / {pk} / {pv}; the export's cache inputs and outputs do not pair"
            ));
        }
        let idx: usize = layer
            .parse()
            .map_err(|_| usage!("{shown}: KV input {name} has no layer number"))?;
        let input = session
            .inputs()
            .iter()
            .find(|i| i.name() == *name)
            .expect("listed");
        let (ty, shape) = tensor_dims(input.dtype()).context("KV input is not a tensor")?;
        kv_meta.get_or_insert((ty, shape));
        kv.push((idx, [name.to_string(), value, pk, pv]));
    }
    let unpaired: Vec<&&str> = inputs
        .iter()
        .filter(|n| {
            n.starts_with("past_key_values.")
                && !kv
                    .iter()
                    .any(|(_, names)| names[0] == **n || names[1] == **n)
        })
        .collect();
    if !unpaired.is_empty() {
        return Err(usage!(
            "{shown}: KV inputs {unpaired:?} do not pair with present.* outputs"
        ));
    }
    let (kv_dtype, shape) = kv_meta.ok_or_else(|| {
        usage!("{shown} has no past_key_values inputs: export it with the KV cache (optimum --task text-generation-with-past)")
    })?;
    if shape.len() != 4 || shape[1] <= 0 || shape[3] <= 0 {
        return Err(usage!(
            "{shown}: KV inputs have shape {shape:?}; expected [batch, kv_heads, past, head_dim]"
        ));
    }
    if !matches!(
        kv_dtype,
        TensorElementType::Float32 | TensorElementType::Float16
    ) {
        return Err(usage!(
            "{shown}: KV cache of type {kv_dtype:?} is not supported (float32 or float16)"
        ));
    }
    kv.sort_by_key(|(i, _)| *i);
    Ok(Layout {
        attention_mask: inputs.contains(&"attention_mask"),
        position_ids: inputs.contains(&"position_ids"),
        kv: kv.into_iter().map(|(_, n)| n).collect(),
        kv_dtype,
        kv_heads: shape[1] as usize,
        head_dim: shape[3] as usize,
    })
}

impl LogitSource for OnnxSource {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenize(
        &self,
        text: &str,
        add_bos: bool,
        parse_special: bool,
    ) -> anyhow::Result<Vec<TokenId>> {
        let tok = if parse_special {
            &self.tokenizer
        } else {
            &self.tokenizer_plain
        };
        let enc = tok
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        if add_bos {
            if let Some(b) = self.info.bos {
                ids.insert(0, b);
            }
        }
        Ok(ids)
    }

    fn token_bytes(&self, id: TokenId) -> Option<Vec<u8>> {
        if id as usize >= self.info.tokenizer_vocab {
            return None;
        }
        let piece = self.tokenizer.id_to_token(id)?;
        if self.special.get(id as usize).copied().unwrap_or(false) {
            return Some(piece.into_bytes());
        }
        if self.byte_level {
            let table = byte_decoder();
            if let Some(bytes) = piece
                .chars()
                .map(|c| table.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
            {
                return Some(bytes);
            }
            return Some(piece.into_bytes());
        }
        // SentencePiece-style vocabularies: ▁ is a space, <0xNN> a raw byte.
        if let Some(hex) = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                return Some(vec![b]);
            }
        }
        Some(piece.replace('\u{2581}', " ").into_bytes())
    }

    fn is_special(&self, id: TokenId) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    fn chat_template(&self) -> Option<String> {
        self.chat_template.clone()
    }

    fn begin(&mut self, n_seqs: usize) -> anyhow::Result<()> {
        self.batches.clear();
        self.n_seqs = n_seqs;
        Ok(())
    }

    fn decode(&mut self, batch: &[(usize, &[TokenId])]) -> anyhow::Result<Array2<f32>> {
        for &(seq, tokens) in batch {
            anyhow::ensure!(!tokens.is_empty(), "decode: sequence {seq} got no tokens");
            anyhow::ensure!(
                seq < self.n_seqs,
                "decode: sequence {seq} was not started with begin()"
            );
            for &t in tokens {
                anyhow::ensure!(
                    (t as usize) < self.info.n_vocab,
                    "token id {t} is outside the vocabulary"
                );
            }
        }
        let n_vocab = self.info.n_vocab;
        let mut out = Array2::<f32>::zeros((batch.len(), n_vocab));
        // Sequences that have no state yet start in a new batch; the others continue theirs.
        let fresh: Vec<usize> = (0..batch.len())
            .filter(|&i| !self.batches.iter().any(|b| b.rows.contains(&batch[i].0)))
            .collect();
        if !fresh.is_empty() {
            let groups: Vec<Vec<usize>> = if self.layout.position_ids {
                vec![fresh.clone()]
            } else {
                fresh.iter().map(|&i| vec![i]).collect()
            };
            for group in groups {
                let rows = group.len();
                let lmax = group.iter().map(|&i| batch[i].1.len()).max().unwrap_or(0);
                let (mut ids, mut mask, mut pos) = (Vec::new(), Vec::new(), Vec::new());
                for &i in &group {
                    let (seq, toks) = batch[i];
                    self.check_ctx(seq, toks.len())?;
                    let pad = lmax - toks.len();
                    for j in 0..lmax {
                        let real = j >= pad;
                        ids.push(if real { i64::from(toks[j - pad]) } else { 0 });
                        mask.push(i64::from(real));
                        pos.push(if real { (j - pad) as i64 } else { 0 });
                    }
                }
                let past = self.empty_past(rows)?;
                self.batches.push(Batch {
                    rows: group.iter().map(|&i| batch[i].0).collect(),
                    past,
                    mask: Vec::new(),
                    t: 0,
                    next_pos: group.iter().map(|&i| batch[i].1.len() as i64).collect(),
                });
                let b = self.batches.len() - 1;
                let want: Vec<(usize, usize)> = (0..rows).map(|r| (r, lmax - 1)).collect();
                let logits = self.forward(b, &ids, lmax, &mask, &pos, &want)?;
                for (r, &i) in group.iter().enumerate() {
                    out.row_mut(i).assign(&logits.row(r));
                }
            }
        }
        // Continuing sequences, one forward per batch they belong to.
        for b in 0..self.batches.len() {
            let members: Vec<usize> = (0..batch.len())
                .filter(|&i| !fresh.contains(&i) && self.batches[b].rows.contains(&batch[i].0))
                .collect();
            if members.is_empty() {
                continue;
            }
            let len = batch[members[0]].1.len();
            anyhow::ensure!(
                members.iter().all(|&i| batch[i].1.len() == len),
                "decode: sequences of one batch must advance by the same number of tokens"
            );
            let keep: Vec<usize> = members
                .iter()
                .map(|&i| {
                    self.batches[b]
                        .rows
                        .iter()
                        .position(|&s| s == batch[i].0)
                        .expect("member")
                })
                .collect();
            if keep.len() != self.batches[b].rows.len()
                || keep.iter().enumerate().any(|(a, &r)| a != r)
            {
                self.compact(b, &keep)?;
            }
            let rows = members.len();
            let (mut ids, mut pos) = (Vec::new(), Vec::new());
            for (r, &i) in members.iter().enumerate() {
                let (seq, toks) = batch[i];
                let start = self.batches[b].next_pos[r];
                self.check_ctx(seq, start as usize + len)?;
                ids.extend(toks.iter().map(|&t| i64::from(t)));
                pos.extend((0..len as i64).map(|j| start + j));
                self.batches[b].next_pos[r] = start + len as i64;
            }
            let mask = vec![1i64; rows * len];
            let want: Vec<(usize, usize)> = (0..rows).map(|r| (r, len - 1)).collect();
            let logits = self.forward(b, &ids, len, &mask, &pos, &want)?;
            for (r, &i) in members.iter().enumerate() {
                out.row_mut(i).assign(&logits.row(r));
            }
        }
        Ok(out)
    }

    fn score(&mut self, tokens: &[TokenId]) -> anyhow::Result<Array2<f32>> {
        self.check_ctx(0, tokens.len())?;
        let saved = std::mem::take(&mut self.batches);
        let result = (|| {
            self.batches.push(Batch {
                rows: vec![usize::MAX],
                past: self.empty_past(1)?,
                mask: Vec::new(),
                t: 0,
                next_pos: vec![0],
            });
            let mut out = Array2::<f32>::zeros((tokens.len(), self.info.n_vocab));
            // Chunks keep the [1, len, vocab] logits tensor small on long texts.
            const CHUNK: usize = 512;
            for (c, chunk) in tokens.chunks(CHUNK).enumerate() {
                let start = (c * CHUNK) as i64;
                let ids: Vec<i64> = chunk.iter().map(|&t| i64::from(t)).collect();
                let pos: Vec<i64> = (0..chunk.len() as i64).map(|j| start + j).collect();
                let mask = vec![1i64; chunk.len()];
                let want: Vec<(usize, usize)> = (0..chunk.len()).map(|p| (0, p)).collect();
                let logits = self.forward(0, &ids, chunk.len(), &mask, &pos, &want)?;
                out.slice_mut(ndarray::s![c * CHUNK..c * CHUNK + chunk.len(), ..])
                    .assign(&logits);
            }
            Ok(out)
        })();
        self.batches = saved;
        result
    }
}
