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
//! Each slot keeps its own KV cache in ONNX Runtime values. Where the export says
//! `past_present_share_buffer` (onnxruntime-genai's builder does for GroupQueryAttention) and
//! the session runs on the CPU, the cache is one `[1, kv_heads, capacity, head_dim]` buffer per
//! layer and per K/V, bound through an I/O binding as both `past` and `present`: the op writes
//! the new positions in place, as onnxruntime-genai runs it, and nothing is allocated or copied
//! per step. Otherwise `present` becomes the next step's `past` without a copy (the graph's
//! Concat copies the past into a new present each step).
//!
//! A slot runs as its own batch of one. ONNX Runtime's CPU kernels are not batch-invariant (a
//! left-padded row's softmax sums group other lanes), so a prompt's numbers would otherwise
//! depend on what else is decoding; one row per run keeps them equal to a run of that prompt
//! alone.

mod graph;
mod layout;
mod runtime;

pub use runtime::find_ort_lib;

use crate::hf::HfFolder;
use crate::inside::{Architecture, CaptureSpec, Captured, LensHead};
use crate::{usage, EngineOptions, LogitSource, ModelInfo, TokenId, Vocab};
use anyhow::Context as _;
use graph::{Decoder, Graph, Hidden};
use half::f16;
use layout::{dtype_name, read_layout, tensor_dims, KvHint, Layout};
use ndarray::{Array2, ArrayViewD, ArrayViewMut2, Axis};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session, SessionInputValue, SessionOutputs};
use ort::value::{DynTensor, DynValue, Tensor, TensorElementType};
use runtime::{build_session, environment, ModelBytes};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One slot's KV cache, `t` positions long.
struct SlotKv {
    cache: Cache,
    t: usize,
}

enum Cache {
    /// `[1, kv_heads, t, head_dim]` per layer: the last run's `present` outputs.
    Grown(Vec<(DynValue, DynValue)>),
    /// `[1, kv_heads, cap, head_dim]` per layer, the first `t` positions valid: bound as both
    /// `past` and `present`, so GroupQueryAttention appends in place.
    Shared {
        bufs: Vec<(DynTensor, DynTensor)>,
        cap: usize,
        /// These buffers bound as the past and present of the session numbered `.0`
        /// ([`OnnxSource::session_gen`]); bound again when the buffers or the session change.
        binding: Option<Box<(u64, IoBinding)>>,
    },
}

/// Positions a shared KV buffer holds at first when the job's length is not known
/// ([`LogitSource::fit_context`]); it doubles when a sequence outgrows it.
const SHARED_KV_START: usize = 256;

/// An ONNX export in ONNX Runtime.
pub struct OnnxSource {
    session: Session,
    layout: Layout,
    info: ModelInfo,
    folder: HfFolder,
    slots: Vec<Option<SlotKv>>,
    /// Whether the KV cache lives in shared past/present buffers (see the module comment).
    shared_kv: bool,
    /// Initial capacity of a shared KV buffer: what the job needs, when it said so.
    kv_reserve: usize,
    /// Counts the sessions built (the look inside rebuilds it): a binding belongs to one.
    session_gen: u64,
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
        // Weights kept outside the model's folder are refused before ONNX Runtime reads them.
        crate::formats::onnx_model::check_external_data(&model_file)?;
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

        // The builder writes past_present_share_buffer for GroupQueryAttention, which then
        // appends the new positions into a past buffer that is also its present output. Only
        // on the CPU: there the buffers are plain host memory.
        let shared_kv = provider == "CPUExecutionProvider"
            && !layout.position_ids
            && folder
                .genai
                .pointer("/search/past_present_share_buffer")
                .and_then(Value::as_bool)
                == Some(true);
        let mut details = serde_json::Map::new();
        details.insert(
            "kv_cache".into(),
            if shared_kv {
                "shared past/present buffers (past_present_share_buffer)"
            } else {
                "present becomes past"
            }
            .into(),
        );
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
        match crate::formats::onnx_model::weight_types(&model_file) {
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
            shared_kv,
            kv_reserve: SHARED_KV_START,
            session_gen: 0,
        })
    }

    /// An empty KV cache for a new sequence.
    fn new_cache(&self) -> anyhow::Result<SlotKv> {
        let cache = if self.shared_kv {
            Cache::Shared {
                bufs: Vec::new(),
                cap: 0,
                binding: None,
            }
        } else {
            Cache::Grown(self.empty_past()?)
        };
        Ok(SlotKv { cache, t: 0 })
    }

    /// Makes a shared cache hold at least `needed` positions: new buffers of twice the
    /// capacity (at least the job's length, at most the context), the valid positions copied
    /// over. Amortised, a sequence copies each position about once.
    fn reserve(&self, kv: &mut SlotKv, needed: usize) -> anyhow::Result<()> {
        let Cache::Shared { bufs, cap, binding } = &mut kv.cache else {
            return Ok(());
        };
        if needed <= *cap {
            return Ok(());
        }
        let new_cap = needed
            .max(*cap * 2)
            .max(self.kv_reserve)
            .min(self.info.n_ctx.max(needed));
        let (heads, dim) = (self.layout.kv_heads, self.layout.head_dim);
        let bytes = [heads, new_cap, dim, elem_size(self.layout.kv_dtype)]
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .with_context(|| {
                format!("a KV buffer of {heads} heads × {new_cap} positions × {dim} is too large")
            })?;
        let make = || -> anyhow::Result<DynTensor> {
            let mut t = DynTensor::new(
                &Allocator::default(),
                self.layout.kv_dtype,
                [1, heads, new_cap, dim],
            )?;
            if bytes > 0 {
                // SAFETY: `Tensor::new` leaves its memory uninitialised; the pointer is the
                // start of this CPU tensor's data, `bytes` bytes long (its shape times the
                // element size, checked above), zeroed here before any slice of it is made.
                // Zero is 0.0 in float32 and float16; positions past `t` are never read.
                unsafe { std::ptr::write_bytes(t.data_ptr_mut().cast::<u8>(), 0, bytes) };
            }
            Ok(t)
        };
        let mut grown = Vec::with_capacity(self.layout.kv.len());
        for _ in 0..self.layout.kv.len() {
            grown.push((make()?, make()?));
        }
        for ((ok, ov), (nk, nv)) in bufs.iter().zip(grown.iter_mut()) {
            for (old, new) in [(ok, nk), (ov, nv)] {
                match self.layout.kv_dtype {
                    TensorElementType::Float16 => {
                        copy_positions::<f16>(old, new, heads, kv.t * dim)?
                    }
                    _ => copy_positions::<f32>(old, new, heads, kv.t * dim)?,
                }
            }
        }
        *bufs = grown;
        *cap = new_cap;
        *binding = None;
        Ok(())
    }

    /// A binding of a shared cache's buffers as the session's past and present.
    fn bind_cache(&self, bufs: &mut [(DynTensor, DynTensor)]) -> anyhow::Result<IoBinding> {
        let mut b = self.session.create_binding()?;
        for (names, (k, v)) in self.layout.kv.iter().zip(bufs.iter_mut()) {
            b.bind_input(names[0].as_str(), &*k)?;
            b.bind_input(names[1].as_str(), &*v)?;
            b.bind_output(names[2].as_str(), &mut *k)?;
            b.bind_output(names[3].as_str(), &mut *v)?;
        }
        Ok(b)
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

    /// One forward pass of `ids` on top of `kv` (a batch of one): writes the logits of the
    /// positions in `want` into the rows of `out` and moves the KV cache forward.
    fn forward(
        &mut self,
        kv: &mut SlotKv,
        ids: &[TokenId],
        want: &[usize],
        attention: bool,
        out: ArrayViewMut2<f32>,
    ) -> anyhow::Result<()> {
        let len = ids.len();
        let start = kv.t;
        let t = start + len;
        let input_ids = Tensor::<i64>::from_array((
            [1, len],
            ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(),
        ))?;
        let mask = if self.layout.attention_mask {
            Some(Tensor::<i64>::from_array(([1, t], vec![1i64; t]))?)
        } else {
            None
        };
        let positions = if self.layout.position_ids {
            Some(Tensor::<i64>::from_array((
                [1, len],
                (start as i64..t as i64).collect::<Vec<_>>(),
            ))?)
        } else {
            None
        };
        self.reserve(kv, t)?;
        let fail = |e: ort::Error| anyhow::anyhow!("ONNX Runtime run failed: {e}");
        let pass = Pass {
            n_vocab: self.info.n_vocab,
            len,
            start,
            want,
            attention,
        };
        match &mut kv.cache {
            Cache::Shared { bufs, binding, .. } => {
                if binding.as_ref().map(|b| b.0) != Some(self.session_gen) {
                    *binding = Some(Box::new((self.session_gen, self.bind_cache(bufs)?)));
                }
                let (_, b) = &mut **binding.as_mut().expect("just bound");
                b.bind_input("input_ids", &input_ids)?;
                if let Some(m) = &mask {
                    b.bind_input("attention_mask", m)?;
                }
                if let Some(p) = &positions {
                    b.bind_input("position_ids", p)?;
                }
                // The other outputs (logits, captured values) go to host memory that ONNX
                // Runtime allocates for this run's shapes: bound again each run, since a
                // binding keeps the last run's output as the next one's preallocated buffer.
                let host = MemoryInfo::new(
                    AllocationDevice::CPU,
                    0,
                    AllocatorType::Device,
                    MemoryType::Default,
                )?;
                for o in self.session.outputs() {
                    let name = o.name();
                    if !self.layout.kv.iter().any(|n| n[2] == name || n[3] == name) {
                        b.bind_output_to_device(name, &host)?;
                    }
                }
                let mut outputs = self.session.run_binding(b).map_err(fail)?;
                take_logits(
                    &mut outputs,
                    pass,
                    self.capture.as_ref(),
                    &mut self.captured,
                    out,
                )?;
            }
            Cache::Grown(past) => {
                let mut inputs: Vec<(&str, SessionInputValue)> =
                    Vec::with_capacity(3 + 2 * self.layout.kv.len());
                inputs.push(("input_ids", (&input_ids).into()));
                if let Some(m) = &mask {
                    inputs.push(("attention_mask", m.into()));
                }
                if let Some(p) = &positions {
                    inputs.push(("position_ids", p.into()));
                }
                for (names, (k, v)) in self.layout.kv.iter().zip(past.iter()) {
                    inputs.push((names[0].as_str(), k.into()));
                    inputs.push((names[1].as_str(), v.into()));
                }
                let mut outputs = self.session.run(inputs).map_err(fail)?;
                take_logits(
                    &mut outputs,
                    pass,
                    self.capture.as_ref(),
                    &mut self.captured,
                    out,
                )?;
                let mut next = Vec::with_capacity(self.layout.kv.len());
                for names in &self.layout.kv {
                    let k = outputs
                        .remove(&names[2])
                        .with_context(|| format!("no {} output", names[2]))?;
                    let v = outputs
                        .remove(&names[3])
                        .with_context(|| format!("no {} output", names[3]))?;
                    next.push((k, v));
                }
                drop(outputs);
                *past = next;
            }
        }
        kv.t = t;
        Ok(())
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

impl Vocab for OnnxSource {
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
}

impl LogitSource for OnnxSource {
    fn begin(&mut self, n_slots: usize) -> anyhow::Result<()> {
        crate::check_slots(n_slots)?;
        self.slots.clear();
        self.slots.resize_with(n_slots, || None);
        Ok(())
    }

    fn clear_slot(&mut self, slot: usize) -> anyhow::Result<()> {
        let kv = self
            .slots
            .get_mut(slot)
            .context("clear_slot: slot was not made by begin()")?;
        match kv {
            // The next sequence writes over the shared buffers from position 0: no positions
            // at or past `t` are ever read.
            Some(SlotKv {
                cache: Cache::Shared { .. },
                t,
            }) => *t = 0,
            _ => *kv = None,
        }
        Ok(())
    }

    fn fit_context(&mut self, n_tokens: usize) -> anyhow::Result<()> {
        // The context stays the model's; a shared KV buffer starts at the job's length, so
        // that a sequence of the job never grows it.
        self.kv_reserve = n_tokens.clamp(1, self.info.n_ctx.max(1));
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
                None => self.new_cache()?,
            };
            self.check_ctx(seq, kv.t + tokens.len())?;
            let want: Vec<usize> = if every {
                (0..tokens.len()).collect()
            } else {
                vec![tokens.len() - 1]
            };
            let rows = out.slice_mut(ndarray::s![row..row + want.len(), ..]);
            self.forward(&mut kv, tokens, &want, true, rows)?;
            self.slots[seq] = Some(kv);
            row += want.len();
        }
        Ok(out)
    }

    fn architecture(&self) -> Option<Architecture> {
        Some(self.arch)
    }

    fn set_capture(&mut self, spec: &CaptureSpec) -> anyhow::Result<()> {
        spec.check(self.arch.n_layer)?;
        if spec.head_input {
            // The final norm's output is an internal value the exports do not name alike;
            // a comparison's reference keeps this engine's logits whole instead.
            return Err(crate::Error::CaptureUnsupported {
                engine: self.info.engine.clone(),
            }
            .into());
        }
        if spec.is_empty() {
            if self.capture.take().is_some() {
                self.session = build_session(
                    self.env,
                    ModelBytes::File(&self.model_file),
                    &self.device,
                    self.threads,
                )?
                .0;
                self.session_gen += 1;
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
        self.session_gen += 1;
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
        let mut kv = self.new_cache()?;
        self.reserve(&mut kv, tokens.len())?;
        self.captured.clear();
        let mut out = Array2::<f32>::zeros((tokens.len() - first, self.info.n_vocab));
        // Chunks keep the [1, len, vocab] logits tensor small on long texts.
        const CHUNK: usize = 512;
        let mut row = 0;
        for (c, chunk) in tokens.chunks(CHUNK).enumerate() {
            let start = c * CHUNK;
            let want: Vec<usize> = (first.saturating_sub(start)..chunk.len()).collect();
            let rows = out.slice_mut(ndarray::s![row..row + want.len(), ..]);
            self.forward(&mut kv, chunk, &want, false, rows)?;
            row += want.len();
        }
        Ok(out)
    }
}

/// What one forward pass ran and wants back.
struct Pass<'a> {
    n_vocab: usize,
    /// New tokens in the run, the first at position `start`.
    len: usize,
    start: usize,
    /// The positions (of the `len`) whose logits are wanted.
    want: &'a [usize],
    /// Whether attention weights are captured (at the last position).
    attention: bool,
}

/// Copies the logits of the positions `pass.want` of a run into `out`, and adds what the look
/// inside captured to `captured`.
fn take_logits(
    outputs: &mut SessionOutputs<'_>,
    pass: Pass<'_>,
    capture: Option<&CaptureOutputs>,
    captured: &mut Vec<Captured>,
    mut out: ArrayViewMut2<f32>,
) -> anyhow::Result<()> {
    let Pass {
        n_vocab,
        len,
        start,
        want,
        attention,
    } = pass;
    {
        let logits = outputs.get("logits").context("no logits output")?;
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
    if let Some(cap) = capture {
        let got = captured_rows(outputs, cap, want, len, start, attention)?;
        captured.extend(got);
    }
    Ok(())
}

/// Bytes of one KV element (float32 or float16, the types [`layout::read_layout`] accepts).
fn elem_size(t: TensorElementType) -> usize {
    match t {
        TensorElementType::Float16 | TensorElementType::Bfloat16 => 2,
        _ => 4,
    }
}

/// Copies the first `n` values of each of the `heads` planes of `old` to the start of the same
/// plane of `new`: the valid positions of a `[1, heads, cap, head_dim]` KV buffer moved into a
/// larger one (planes of `cap * head_dim` values each).
fn copy_positions<T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug>(
    old: &DynTensor,
    new: &mut DynTensor,
    heads: usize,
    n: usize,
) -> anyhow::Result<()> {
    if n == 0 || heads == 0 {
        return Ok(());
    }
    let (_, src) = old.try_extract_tensor::<T>()?;
    let (_, dst) = new.try_extract_tensor_mut::<T>()?;
    let (src_plane, dst_plane) = (src.len() / heads, dst.len() / heads);
    anyhow::ensure!(
        n <= src_plane && src_plane <= dst_plane,
        "KV buffer sizes do not match"
    );
    for h in 0..heads {
        dst[h * dst_plane..h * dst_plane + n]
            .copy_from_slice(&src[h * src_plane..h * src_plane + n]);
    }
    Ok(())
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
