//! ONNX causal-LM exports through ONNX Runtime (`ort`, library loaded at run time).
//!
//! Inputs and outputs are read from the session, never assumed per model family. Two export
//! layouts are known to run:
//! - optimum: `input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key|value`
//!   → `logits`, `present.{i}.key|value`;
//! - onnxruntime-genai: the same without `position_ids` (GroupQueryAttention derives positions
//!   from the mask), with KV sizes that may be symbolic and are then read from
//!   `genai_config.json`.
//!
//! Each slot keeps its own KV cache in ONNX Runtime values: `present` becomes the next step's
//! `past` without a copy. A slot runs as its own batch of one. ONNX Runtime's CPU kernels are
//! not batch-invariant (a left-padded row's softmax sums group other lanes), so a prompt's
//! numbers would otherwise depend on what else is decoding; one row per run keeps them equal
//! to a run of that prompt alone.

mod graph;
mod layout;
mod runtime;

pub use runtime::find_ort_lib;

use crate::hf::HfFolder;
use crate::inside::{Architecture, CaptureSpec, Captured, LensHead};
use crate::{usage, EngineOptions, LogitSource, ModelInfo, TokenId};
use anyhow::Context as _;
use graph::{Decoder, Graph, Hidden};
use half::f16;
use layout::{dtype_name, read_layout, tensor_dims, KvHint, Layout};
use ndarray::{Array2, ArrayViewD, Axis};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType};
use runtime::{build_session, environment, ModelBytes};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One slot's KV cache: `[1, kv_heads, t, head_dim]` per layer.
struct SlotKv {
    past: Vec<(DynValue, DynValue)>,
    t: usize,
}

/// An ONNX export in ONNX Runtime.
pub struct OnnxSource {
    session: Session,
    layout: Layout,
    info: ModelInfo,
    folder: HfFolder,
    slots: Vec<Option<SlotKv>>,
    model_file: PathBuf,
    env: &'static ort::environment::Environment,
    device: String,
    threads: usize,
    arch: Architecture,
    /// The graph's decoder, read on the first look inside.
    decoder: Option<(Graph, Decoder)>,
    /// The extra outputs the session was built with, when capture is on.
    capture: Option<CaptureOutputs>,
    captured: Vec<Captured>,
    lens: Option<Arc<LensHead>>,
}

/// What the capturing session outputs beyond logits and the KV cache.
#[derive(Debug, Clone)]
struct CaptureOutputs {
    /// Each asked layer's output.
    hidden: Vec<Hidden>,
    /// Each asked layer's attention softmax, `[1, n_head, seq, total]`.
    attention: Vec<String>,
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
        let folder = HfFolder::open(&dir)?;

        let (env, lib) = environment(opts)?;
        let device = opts.device.as_deref().unwrap_or("cpu");
        let threads = opts.threads.unwrap_or(0);
        let (session, provider) =
            build_session(env, ModelBytes::File(&model_file), device, threads)?;

        let n_heads = folder.size(
            "/model/decoder/num_attention_heads",
            &["num_attention_heads"],
        );
        let hidden = folder.size("/model/decoder/hidden_size", &["hidden_size"]);
        let hint = KvHint {
            kv_heads: folder.size(
                "/model/decoder/num_key_value_heads",
                &["num_key_value_heads", "num_attention_heads"],
            ),
            head_dim: folder
                .size("/model/decoder/head_size", &["head_dim"])
                .or_else(|| Some(hidden? / n_heads.filter(|&n| n > 0)?)),
        };
        let layout = read_layout(&session, &model_file, hint)?;
        let config = &folder.config;

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
                .or_else(|| {
                    folder
                        .genai
                        .pointer("/model/vocab_size")
                        .and_then(Value::as_u64)
                })
                .map(|v| v as usize)
                .ok_or_else(|| {
                    usage!(
                        "{}: the logits width is dynamic and config.json has no vocab_size",
                        model_file.display()
                    )
                })?,
        };
        let tokenizer_vocab = folder.vocab_size();
        if tokenizer_vocab > n_vocab {
            return Err(usage!(
                "the tokenizer defines {tokenizer_vocab} tokens but the model's logits have {n_vocab}: tokenizer.json belongs to another model"
            ));
        }
        let n_ctx_model = folder.n_ctx_model.unwrap_or(4096);
        let n_ctx = opts.ctx_size.unwrap_or(n_ctx_model.min(4096));
        if n_ctx > n_ctx_model {
            return Err(crate::Error::ContextBeyondModel {
                n_ctx,
                model_ctx: n_ctx_model,
            }
            .into());
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
        if !layout.from_config.is_empty() {
            // The builder's graphs name the head size symbolically ('kv_cache_dim').
            details.insert(
                "kv_sizes_from_config".into(),
                serde_json::to_value(&layout.from_config)?,
            );
        }
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
        let arch = Architecture {
            n_layer: layout.kv.len(),
            n_head: n_heads.unwrap_or(layout.kv_heads),
            n_head_kv: layout.kv_heads,
            head_dim: layout.head_dim,
            n_embd: hidden.unwrap_or(n_heads.unwrap_or(layout.kv_heads) * layout.head_dim),
        };
        Ok(OnnxSource {
            model_file: model_file.clone(),
            env,
            device: device.to_string(),
            threads,
            arch,
            decoder: None,
            capture: None,
            captured: Vec::new(),
            lens: None,
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
                bos: folder.bos,
                eos: folder.eos,
                eog: folder.eog.clone(),
                add_bos: folder.add_bos,
                logits_dtype: dtype_name(logits_ty).into(),
                details,
            },
            session,
            layout,
            folder,
            slots: Vec::new(),
        })
    }

    fn empty_past(&self) -> anyhow::Result<Vec<(DynValue, DynValue)>> {
        let shape = [1, self.layout.kv_heads, 0, self.layout.head_dim];
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

    /// One forward pass of `ids` on top of `kv` (a batch of one); returns the logits of the
    /// positions in `want` and moves the KV cache forward.
    fn forward(
        &mut self,
        kv: &mut SlotKv,
        ids: &[TokenId],
        want: &[usize],
        attention: bool,
    ) -> anyhow::Result<Array2<f32>> {
        let len = ids.len();
        let start = kv.t;
        let t = start + len;
        let mut inputs: Vec<(String, SessionInputValue)> =
            Vec::with_capacity(3 + 2 * self.layout.kv.len());
        inputs.push((
            "input_ids".into(),
            Tensor::<i64>::from_array((
                [1, len],
                ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(),
            ))?
            .into(),
        ));
        if self.layout.attention_mask {
            inputs.push((
                "attention_mask".into(),
                Tensor::<i64>::from_array(([1, t], vec![1i64; t]))?.into(),
            ));
        }
        if self.layout.position_ids {
            inputs.push((
                "position_ids".into(),
                Tensor::<i64>::from_array((
                    [1, len],
                    (start as i64..t as i64).collect::<Vec<_>>(),
                ))?
                .into(),
            ));
        }
        for (names, (k, v)) in self.layout.kv.iter().zip(&kv.past) {
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
            let shape = lv.shape();
            // Exports that emit only the last position give [1, 1, vocab].
            let ok = lv.ndim() == 3
                && shape[0] == 1
                && shape[2] == n_vocab
                && (shape[1] == len || (shape[1] == 1 && want.iter().all(|&p| p == len - 1)));
            if !ok {
                return Err(usage!(
                    "the model's logits have shape {shape:?} for a batch of 1 and {len} tokens; expected [1, {len}, {n_vocab}] (or [1, 1, {n_vocab}]): the export's logits output is not a causal LM's"
                ));
            }
            let out_len = shape[1];
            for (i, &p) in want.iter().enumerate() {
                let p = if out_len == len { p } else { 0 };
                out.row_mut(i)
                    .assign(&lv.index_axis(Axis(0), 0).index_axis(Axis(0), p));
            }
        }
        if let Some(cap) = &self.capture {
            let got = captured_rows(&mut outputs, cap, want, len, start, attention)?;
            self.captured.extend(got);
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
        kv.past = past;
        kv.t = t;
        Ok(out)
    }

    fn check_ctx(&self, seq: usize, len: usize) -> anyhow::Result<()> {
        if len > self.info.n_ctx {
            return Err(crate::Error::ContextFull {
                what: format!("sequence {seq}"),
                needed: len,
                n_ctx: self.info.n_ctx,
            }
            .into());
        }
        Ok(())
    }
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
        self.folder.tokenize(text, add_bos, parse_special)
    }

    fn token_bytes(&self, id: TokenId) -> Option<Vec<u8>> {
        self.folder.token_bytes(id)
    }

    fn is_special(&self, id: TokenId) -> bool {
        self.folder.is_special(id)
    }

    fn chat_template(&self) -> Option<String> {
        self.folder.chat_template.clone()
    }

    fn begin(&mut self, n_slots: usize) -> anyhow::Result<()> {
        crate::check_slots(n_slots)?;
        self.slots.clear();
        self.slots.resize_with(n_slots, || None);
        Ok(())
    }

    fn clear_slot(&mut self, slot: usize) -> anyhow::Result<()> {
        *self
            .slots
            .get_mut(slot)
            .context("clear_slot: slot was not made by begin()")? = None;
        Ok(())
    }

    fn decode_rows(
        &mut self,
        batch: &[(usize, &[TokenId])],
        every_position: &[bool],
    ) -> anyhow::Result<Array2<f32>> {
        for &(seq, tokens) in batch {
            anyhow::ensure!(!tokens.is_empty(), "decode: sequence {seq} got no tokens");
            anyhow::ensure!(
                seq < self.slots.len(),
                "decode: sequence {seq} was not started with begin()"
            );
            for &t in tokens {
                anyhow::ensure!(
                    (t as usize) < self.info.n_vocab,
                    "token id {t} is outside the vocabulary"
                );
            }
        }
        let n_rows = crate::rows_of(batch, every_position);
        self.captured.clear();
        let mut out = Array2::<f32>::zeros((n_rows, self.info.n_vocab));
        let mut row = 0;
        for (entry, &(seq, tokens)) in batch.iter().enumerate() {
            let every = every_position.get(entry).copied().unwrap_or(false);
            let mut kv = match self.slots[seq].take() {
                Some(kv) => kv,
                None => SlotKv {
                    past: self.empty_past()?,
                    t: 0,
                },
            };
            self.check_ctx(seq, kv.t + tokens.len())?;
            let want: Vec<usize> = if every {
                (0..tokens.len()).collect()
            } else {
                vec![tokens.len() - 1]
            };
            let logits = self.forward(&mut kv, tokens, &want, true)?;
            self.slots[seq] = Some(kv);
            out.slice_mut(ndarray::s![row..row + want.len(), ..])
                .assign(&logits);
            row += want.len();
        }
        Ok(out)
    }

    fn architecture(&self) -> Option<Architecture> {
        Some(self.arch)
    }

    fn set_capture(&mut self, spec: &CaptureSpec) -> anyhow::Result<()> {
        spec.check(self.arch.n_layer)?;
        if spec.is_empty() {
            if self.capture.take().is_some() {
                self.session = build_session(
                    self.env,
                    ModelBytes::File(&self.model_file),
                    &self.device,
                    self.threads,
                )?
                .0;
            }
            return Ok(());
        }
        let bytes = std::fs::read(&self.model_file)
            .with_context(|| format!("reading {} to look inside it", self.model_file.display()))?;
        if self.decoder.is_none() {
            let graph = Graph::parse(&bytes, &self.model_file)?;
            let decoder = graph.decoder(self.arch.n_layer)?;
            self.decoder = Some((graph, decoder));
        }
        let (graph, decoder) = self.decoder.as_ref().expect("just read");
        let hidden: Vec<Hidden> = spec
            .hidden_layers
            .iter()
            .map(|&l| decoder.layers[l].clone())
            .collect();
        let attention: Vec<String> = if spec.attention_layers.is_empty() {
            Vec::new()
        } else {
            let softmax = decoder.softmax.clone()?;
            spec.attention_layers
                .iter()
                .map(|&l| softmax[l].clone())
                .collect()
        };
        let mut names: Vec<String> = Vec::new();
        for v in hidden
            .iter()
            .flat_map(Hidden::values)
            .chain(attention.iter().map(String::as_str))
        {
            if !names.iter().any(|n| n == v) && !graph.outputs.iter().any(|o| o == v) {
                names.push(v.to_string());
            }
        }
        let model = graph.with_outputs(&bytes, &names);
        drop(bytes);
        let dir = self.model_file.parent().unwrap_or(Path::new("."));
        self.session = build_session(
            self.env,
            ModelBytes::Memory {
                bytes: &model,
                dir,
                external_data: graph.has_external_data(),
            },
            &self.device,
            self.threads,
        )?
        .0;
        self.capture = Some(CaptureOutputs { hidden, attention });
        Ok(())
    }

    fn take_captured(&mut self) -> Vec<Captured> {
        std::mem::take(&mut self.captured)
    }

    fn lens_head(&mut self) -> anyhow::Result<Arc<LensHead>> {
        if let Some(h) = &self.lens {
            return Ok(Arc::clone(h));
        }
        let graph = match &self.decoder {
            Some((g, _)) => g.clone(),
            None => {
                let bytes = std::fs::read(&self.model_file)?;
                Graph::parse(&bytes, &self.model_file)?
            }
        };
        let head = Arc::new(graph.lens_head()?);
        self.lens = Some(Arc::clone(&head));
        Ok(head)
    }

    fn score_from(&mut self, tokens: &[TokenId], first: usize) -> anyhow::Result<Array2<f32>> {
        self.check_ctx(0, tokens.len())?;
        let first = first.min(tokens.len());
        let mut kv = SlotKv {
            past: self.empty_past()?,
            t: 0,
        };
        self.captured.clear();
        let mut out = Array2::<f32>::zeros((tokens.len() - first, self.info.n_vocab));
        // Chunks keep the [1, len, vocab] logits tensor small on long texts.
        const CHUNK: usize = 512;
        let mut row = 0;
        for (c, chunk) in tokens.chunks(CHUNK).enumerate() {
            let start = c * CHUNK;
            let want: Vec<usize> = (first.saturating_sub(start)..chunk.len()).collect();
            let logits = self.forward(&mut kv, chunk, &want, false)?;
            out.slice_mut(ndarray::s![row..row + want.len(), ..])
                .assign(&logits);
            row += want.len();
        }
        Ok(out)
    }
}

/// A float output as f32 values with its shape (float16 outputs widened).
fn float_output(v: &DynValue, name: &str) -> anyhow::Result<ndarray::ArrayD<f32>> {
    match v.try_extract_array::<f32>() {
        Ok(a) => Ok(a.to_owned()),
        Err(_) => Ok(v
            .try_extract_array::<f16>()
            .with_context(|| format!("{name} is neither float32 nor float16"))?
            .mapv(f32::from)),
    }
}

/// The captures of the positions `want` of one forward pass of `len` tokens starting at
/// position `start`: each asked layer's output, and at the last position (when `attention`)
/// each asked layer's attention weights.
fn captured_rows(
    outputs: &mut ort::session::SessionOutputs<'_>,
    cap: &CaptureOutputs,
    want: &[usize],
    len: usize,
    start: usize,
    attention: bool,
) -> anyhow::Result<Vec<Captured>> {
    let fetch = |name: &str| -> anyhow::Result<ndarray::ArrayD<f32>> {
        let v = outputs
            .get(name)
            .with_context(|| format!("the capturing session has no output {name}"))?;
        float_output(v, name)
    };
    let mut layers = Vec::with_capacity(cap.hidden.len());
    for h in &cap.hidden {
        let a = match h {
            Hidden::Value(v) => fetch(v)?,
            Hidden::Sum(a, b) => fetch(a)? + fetch(b)?,
        };
        anyhow::ensure!(
            a.ndim() == 3 && a.shape()[0] == 1 && a.shape()[1] == len,
            "a layer output has shape {:?} for a batch of 1 and {len} tokens",
            a.shape()
        );
        layers.push(a);
    }
    let mut weights = Vec::with_capacity(cap.attention.len());
    if attention {
        for name in &cap.attention {
            let a = fetch(name)?;
            anyhow::ensure!(
                a.ndim() == 4
                    && a.shape()[0] == 1
                    && a.shape()[2] == len
                    && a.shape()[3] == start + len,
                "attention weights {name} have shape {:?} for {len} new of {} tokens",
                a.shape(),
                start + len
            );
            weights.push(a);
        }
    }
    let mut out = Vec::with_capacity(want.len());
    for &p in want {
        let mut c = Captured::default();
        if !layers.is_empty() {
            let width = layers[0].shape()[2];
            let mut h = Array2::zeros((layers.len(), width));
            for (mut row, a) in h.outer_iter_mut().zip(&layers) {
                row.assign(&a.index_axis(Axis(0), 0).index_axis(Axis(0), p));
            }
            c.hidden = Some(h);
        }
        if attention && p == len - 1 {
            for a in &weights {
                let w = a.index_axis(Axis(0), 0);
                let n_head = w.shape()[0];
                let mut m = Array2::zeros((n_head, start + len));
                for (hd, mut row) in m.outer_iter_mut().enumerate() {
                    row.assign(&w.index_axis(Axis(0), hd).index_axis(Axis(0), p));
                }
                c.attention.push(m);
            }
        }
        out.push(c);
    }
    Ok(out)
}
