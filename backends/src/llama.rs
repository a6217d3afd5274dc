//! GGUF models through llama.cpp (`llama-cpp-2`).
//!
//! The model is memory-mapped once; the context (and so the KV cache) is sized for the number
//! of sequences of a batch, each with a KV stream of the full `--ctx-size`. Every decode call
//! feeds all sequences of a step in one `llama_decode` batch with distinct sequence ids,
//! asking logits only for each sequence's last token, with the CPU kernels that sum a row the
//! same way whatever shares its batch ([`crate::cpu_kernels`]); scoring with
//! `EngineOptions::fast_scoring` runs llama.cpp's fastest ones.

use crate::cpu_kernels::{CpuBackend, Kernels};
use crate::formats::gguf::{GgufHeader, LLAMA_CPP_ARCHS};
use crate::inside::{Architecture, CaptureSpec, Captured, FinalNorm, LensHead};
use crate::{usage, EngineOptions, FlashAttn, LogitSource, ModelInfo, TokenId, Vocab};
use anyhow::Context as _;
use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use ndarray::Array2;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// llama.cpp's backend may be initialized once per process.
static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

fn backend(verbose: bool) -> anyhow::Result<&'static LlamaBackend> {
    BACKEND
        .get_or_init(|| {
            let b = LlamaBackend::init().map_err(|e| e.to_string())?;
            if verbose {
                llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            } else {
                // SAFETY: `keep_errors` matches llama.cpp's log callback type, needs no user
                // data, and stays valid for the whole process (a plain function).
                unsafe { llama_cpp_sys_2::llama_log_set(Some(keep_errors), std::ptr::null_mut()) };
            }
            Ok(b)
        })
        .as_ref()
        .map_err(|e| anyhow::anyhow!("llama.cpp backend failed to start: {e}"))
}

/// llama.cpp's error lines since the last [`take_errors`], kept (the first few) instead of
/// printed: its null result on a bad file says nothing, its log says why.
static ERRORS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

unsafe extern "C" fn keep_errors(
    level: llama_cpp_sys_2::ggml_log_level,
    text: *const std::os::raw::c_char,
    _user_data: *mut std::os::raw::c_void,
) {
    if level != llama_cpp_sys_2::GGML_LOG_LEVEL_ERROR || text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string that lives for this call.
    let line = unsafe { std::ffi::CStr::from_ptr(text) }.to_string_lossy();
    if let Ok(mut errors) = ERRORS.lock() {
        if errors.len() < 8 {
            errors.push(line.trim().to_string());
        }
    }
}

/// The first of llama.cpp's error lines since the last call (the cause; the later ones say
/// what failed because of it), shortened for a one-line message.
fn take_errors() -> Option<String> {
    let mut errors = ERRORS.lock().ok()?;
    let first = errors.iter().find(|l| !l.is_empty()).cloned();
    errors.clear();
    first.map(|l| crate::formats::gguf::quoted(&l, 200))
}

type Ctx<'a> = LlamaContext<'a>;

self_cell::self_cell!(
    /// The model and a context that borrows it.
    struct ModelCtx {
        owner: LlamaModel,
        #[not_covariant]
        dependent: Ctx,
    }
);

/// A GGUF model in llama.cpp.
pub struct LlamaSource {
    /// Declared first, so dropped first: a context made with the eval callback holds a
    /// pointer to `capture`.
    state: State,
    /// The threadpools attached to a capturing context, dropped after it (field order).
    threadpools: Option<Threadpools>,
    /// The context's CPU backend, to pick its kernels per decode (None where the link did
    /// not note it: see [`crate::cpu_kernels`]).
    cpu: Option<CpuBackend>,
    /// What the eval callback looks for and copies (shared with it, see [`eval_callback`]).
    capture: Arc<Mutex<CaptureState>>,
    /// What the last decode captured, one entry per logits row.
    captured: Vec<Captured>,
    lens: Option<Arc<LensHead>>,
    path: PathBuf,
    arch: Architecture,
    /// Sliding-window size of the model's SWA layers (0: none).
    n_swa: usize,
    info: ModelInfo,
    opts: EngineOptions,
    /// Context length of each sequence.
    n_ctx: usize,
    /// The model's trained context (0: the file does not say).
    n_ctx_train: usize,
    n_batch: usize,
    /// n_batch of the current context (raised to the number of slots).
    n_batch_ctx: usize,
    /// Sequences the current context was made for.
    n_seqs: usize,
    /// Next position of each sequence.
    pos: Vec<i32>,
    chat_template: Option<String>,
    special: Vec<bool>,
}

fn cache_type(name: &str) -> anyhow::Result<KvCacheType> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "f32" => KvCacheType::F32,
        "f16" => KvCacheType::F16,
        "bf16" => KvCacheType::BF16,
        "q8_0" => KvCacheType::Q8_0,
        "q4_0" => KvCacheType::Q4_0,
        "q4_1" => KvCacheType::Q4_1,
        "q5_0" => KvCacheType::Q5_0,
        "q5_1" => KvCacheType::Q5_1,
        "iq4_nl" => KvCacheType::IQ4_NL,
        other => {
            return Err(usage!(
                "KV cache type '{other}' is not supported: use f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 or iq4_nl"
            ))
        }
    })
}

impl LlamaSource {
    /// Loads a GGUF file. The header is checked first (magic, truncation, architecture,
    /// tensor types), so bad files fail with a one-line error before llama.cpp sees them.
    pub fn open(path: &Path, opts: &EngineOptions) -> anyhow::Result<Self> {
        let (header, arch) = checked_header(path)?;
        let backend = backend(opts.verbose)?;
        if opts.n_gpu_layers > 0 && !backend.supports_gpu_offload() {
            return Err(crate::Error::NeedsGpuBuild {
                n_gpu_layers: opts.n_gpu_layers,
            }
            .into());
        }
        let cache_k = opts.cache_type_k.as_deref().unwrap_or("f16");
        let cache_v = opts.cache_type_v.as_deref().unwrap_or("f16");
        cache_type(cache_k)?;
        let v_type = cache_type(cache_v)?;
        if !matches!(
            v_type,
            KvCacheType::F32 | KvCacheType::F16 | KvCacheType::BF16
        ) && opts.flash_attn == FlashAttn::Off
        {
            return Err(crate::Error::QuantizedVNeedsFlashAttn {
                cache_type_v: cache_v.to_string(),
            }
            .into());
        }

        let params = LlamaModelParams::default()
            .with_n_gpu_layers(opts.n_gpu_layers)
            .with_use_mmap(true)
            // Repacked weights (Q4_0, the K-quants, IQ4_NL) run one kernel for each 4 rows of a
            // batch and another for the rest: a row's sums would depend on its batch. Decode
            // speed is the same without them (Gemma 3 Q4_K_M: 23.9 vs 23.6 tok/s, 1 thread).
            .with_use_extra_bufts(opts.fast_scoring);
        take_errors();
        let model = LlamaModel::load_from_file(backend, path, &params).map_err(|e| {
            match take_errors() {
                Some(why) => usage!("llama.cpp could not load {}: {why}", path.display()),
                None => usage!(
                    "llama.cpp could not load {}: {e} (run with -v for its log)",
                    path.display()
                ),
            }
        })?;

        let n_ctx_train = model.n_ctx_train() as usize;
        let n_ctx = opts.ctx_size.unwrap_or(n_ctx_train.min(4096)).max(8);
        if n_ctx > n_ctx_train && n_ctx_train > 0 {
            return Err(crate::Error::ContextBeyondModel {
                n_ctx,
                model_ctx: n_ctx_train,
            }
            .into());
        }
        let n_batch = opts.batch_size.unwrap_or(512).clamp(1, n_ctx);

        let vocab = model.vocab();
        let n_vocab = model.n_vocab() as usize;
        let to_id = |t: LlamaToken| (t.0 >= 0).then_some(t.0 as TokenId);
        let bos = to_id(vocab.bos());
        let eos = to_id(vocab.eos());
        let mut eog = Vec::new();
        let mut special = Vec::with_capacity(n_vocab);
        for id in 0..n_vocab as i32 {
            let t = LlamaToken(id);
            if vocab.is_eog(t) {
                eog.push(id as TokenId);
            }
            special.push(vocab.is_control(t));
        }
        let add_bos = vocab.should_add_bos();
        let chat_template = model
            .chat_template(None)
            .ok()
            .and_then(|t| t.to_string().ok());

        let types = header.tensor_types();
        let flash = match (opts.flash_attn, opts.n_gpu_layers) {
            (FlashAttn::On, _) => "on".to_string(),
            (FlashAttn::Off, _) => "off".to_string(),
            // On the CPU backend every layer supports the fused op, so llama.cpp's auto
            // resolves to on; with offload it decides per device at context creation.
            (FlashAttn::Auto, 0) => "on (auto)".to_string(),
            (FlashAttn::Auto, _) => "auto (decided by llama.cpp per device; see -v)".to_string(),
        };
        let mut details = serde_json::Map::new();
        details.insert("architecture".into(), arch.clone().into());
        details.insert("n_layer".into(), model.n_layer().into());
        details.insert("n_head".into(), model.n_head().into());
        details.insert("n_head_kv".into(), model.n_head_kv().into());
        details.insert("n_embd".into(), model.n_embd().into());
        details.insert("n_ctx_train".into(), n_ctx_train.into());
        details.insert("n_ctx".into(), n_ctx.into());
        details.insert("n_batch".into(), n_batch.into());
        details.insert(
            "threads".into(),
            opts.threads.unwrap_or_else(default_threads).into(),
        );
        details.insert(
            "threads_batch".into(),
            opts.threads_batch
                .or(opts.threads)
                .unwrap_or_else(default_threads)
                .into(),
        );
        details.insert("n_gpu_layers".into(), opts.n_gpu_layers.into());
        details.insert("flash_attn".into(), flash.into());
        details.insert("cache_type_k".into(), cache_k.into());
        details.insert("cache_type_v".into(), cache_v.into());
        details.insert(
            "file_type".into(),
            header
                .get("general.file_type")
                .and_then(|v| v.as_u64())
                .into(),
        );
        details.insert("llama_cpp_build".into(), build_info());
        details.insert("tensor_types".into(), serde_json::to_value(&types.by_type)?);
        details.insert("bits_per_weight".into(), types.bits_per_weight.into());
        details.insert("params".into(), types.params.into());

        let info = ModelInfo {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            engine: "llama.cpp".into(),
            engine_version: format!(
                "llama-cpp-2 0.1.160 (llama.cpp from llama-cpp-sys-2 {LLAMA_CPP_SYS_VERSION})"
            ),
            device: if opts.n_gpu_layers > 0 {
                "gpu".into()
            } else {
                "cpu".into()
            },
            n_vocab,
            tokenizer_vocab: vocab.n_tokens() as usize,
            n_ctx,
            bos,
            eos,
            eog,
            add_bos,
            logits_dtype: "float32".into(),
            details,
        };
        let head_dim = header
            .get(&format!("{arch}.attention.key_length"))
            .and_then(|v| v.as_u64())
            .map(|d| d as usize)
            .unwrap_or(model.n_embd() as usize / (model.n_head() as usize).max(1));
        let architecture = Architecture {
            n_layer: model.n_layer() as usize,
            n_head: model.n_head() as usize,
            n_head_kv: model.n_head_kv() as usize,
            head_dim,
            n_embd: model.n_embd() as usize,
        };
        // SAFETY: the model pointer is valid for this call (the model is alive and owned).
        let n_swa =
            usize::try_from(unsafe { llama_cpp_sys_2::llama_model_n_swa(model_ptr(&model)) })
                .unwrap_or(0);
        let mut src = LlamaSource {
            state: State::Model(model),
            threadpools: None,
            cpu: None,
            capture: Arc::default(),
            captured: Vec::new(),
            lens: None,
            path: path.to_path_buf(),
            arch: architecture,
            n_swa,
            info,
            opts: opts.clone(),
            n_ctx,
            n_ctx_train,
            n_batch,
            n_batch_ctx: n_batch,
            n_seqs: 0,
            pos: Vec::new(),
            chat_template,
            special,
        };
        src.make_context(1)?;
        let kernels = match (src.cpu.is_some(), opts.fast_scoring, opts.n_gpu_layers) {
            (true, false, 0) => "batch-invariant",
            (true, false, _) => "batch-invariant on the CPU (offloaded layers run the GPU's own)",
            (true, true, _) => "llama.cpp's fastest for scoring, as llama-perplexity runs",
            (false, ..) => {
                "llama.cpp's choice by batch shape (a token's logits may depend on its batch)"
            }
        };
        src.info
            .details
            .insert("cpu_kernels".into(), kernels.into());
        Ok(src)
    }

    fn model(&self) -> &LlamaModel {
        match &self.state {
            State::Model(m) => m,
            State::Ready(c) => c.borrow_owner(),
            State::Empty => unreachable!("the state is only empty inside make_context"),
        }
    }

    /// (Re)creates the context for `n_slots` slots of `n_ctx` tokens each. The KV cache is
    /// not unified: each slot gets its own stream of cells, so a sequence's cells are laid out
    /// in position order from cell 0 whatever the other slots hold, and its attention sums run
    /// in the same order as when it runs alone (a unified cache interleaves the slots' cells).
    fn make_context(&mut self, n_slots: usize) -> anyhow::Result<()> {
        if n_slots > LLAMA_MAX_SEQ {
            return Err(crate::Error::TooManySlots {
                slots: n_slots,
                max: LLAMA_MAX_SEQ,
            }
            .into());
        }
        let kv_bytes = self.kv_cache_bytes(n_slots);
        if self.opts.n_gpu_layers == 0 {
            if let Some(avail) = mem_available() {
                if kv_bytes > avail {
                    return Err(crate::Error::KvCacheTooLarge {
                        slots: n_slots,
                        n_ctx: self.n_ctx,
                        needed_bytes: kv_bytes,
                        available_bytes: avail,
                    }
                    .into());
                }
            }
        }
        let model = match std::mem::replace(&mut self.state, State::Empty) {
            State::Model(m) => m,
            State::Ready(c) => c.into_owner(),
            State::Empty => unreachable!("the state is only empty inside make_context"),
        };
        let backend = backend(self.opts.verbose)?;
        let threads = self.opts.threads.unwrap_or_else(default_threads) as i32;
        let threads_batch = self.opts.threads_batch.map_or(threads, |t| t as i32);
        let total = (self.n_ctx * n_slots) as u32;
        // Every slot may ask for its logits in one decode: llama.cpp sizes its output buffer
        // by n_batch and aborts past it.
        let n_batch = self.n_batch.max(n_slots) as u32;
        let (capturing, attention) = match self.capture.lock() {
            Ok(c) => (!c.spec.is_empty(), !c.spec.attention_layers.is_empty()),
            Err(_) => anyhow::bail!("the capture state was poisoned by a panic"),
        };
        // Attention weights exist only without flash attention (set_capture refused `on`).
        let flash = match self.opts.flash_attn {
            _ if attention => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED,
            FlashAttn::On => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED,
            FlashAttn::Off => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED,
            FlashAttn::Auto => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_AUTO,
        };
        let mut params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(total))
            .with_n_batch(n_batch)
            .with_n_ubatch(n_batch)
            .with_n_seq_max(n_slots as u32)
            .with_kv_unified(false)
            .with_n_threads(threads)
            .with_n_threads_batch(threads_batch)
            .with_type_k(cache_type(
                self.opts.cache_type_k.as_deref().unwrap_or("f16"),
            )?)
            .with_type_v(cache_type(
                self.opts.cache_type_v.as_deref().unwrap_or("f16"),
            )?)
            .with_flash_attention_policy(flash);
        if capturing {
            let user_data = Arc::as_ptr(&self.capture)
                .cast_mut()
                .cast::<std::ffi::c_void>();
            // SAFETY: `user_data` points into `self.capture`, an Arc this source holds for
            // as long as the context lives (the context is dropped first, see the field
            // order), and the callback only takes shared references to the Mutex in it;
            // `eval_callback` catches panics.
            params = unsafe { params.with_cb_eval(Some(eval_callback), user_data) };
        }
        // The old context is gone: so can its threadpools be.
        self.threadpools = None;
        self.cpu = None;
        CpuBackend::before_context();
        match ModelCtx::try_new_or_recover(model, |m| m.new_context(backend, params)) {
            Ok(mut cell) => {
                self.cpu = CpuBackend::of_new_context();
                if capturing {
                    // Each node the callback asks for ends a graph compute, and without a
                    // threadpool ggml starts and joins its threads for every one: 31 times a
                    // token with the lens on 30 layers, where one late thread stalls the
                    // others at the barrier (tens of ms on a busy machine). Persistent
                    // threads that sleep between computes avoid both.
                    let pools = Threadpools::new(threads, threads_batch)?;
                    cell.with_dependent_mut(|_, ctx| {
                        // SAFETY: both pools live in `self.threadpools`, dropped after this
                        // context (field order, and make_context drops the context first).
                        unsafe {
                            llama_cpp_sys_2::llama_attach_threadpool(
                                ctx.as_raw_mut(),
                                pools.decode,
                                pools.batch,
                            )
                        }
                    });
                    self.threadpools = Some(pools);
                }
                self.state = State::Ready(cell);
                self.n_seqs = n_slots;
                self.n_batch_ctx = n_batch as usize;
                Ok(())
            }
            Err((model, e)) => {
                self.state = State::Model(model);
                Err(crate::Error::KvCacheAlloc {
                    slots: n_slots,
                    n_ctx: self.n_ctx,
                    needed_bytes: kv_bytes,
                    reason: format!("llama.cpp: {e}"),
                }
                .into())
            }
        }
    }

    /// Bytes of the KV cache for `n_slots` slots, as llama.cpp will allocate it: per layer,
    /// K and V rows of `n_head_kv * head_dim` entries for every cell (a slot's cells are
    /// rounded up to a multiple of 256).
    fn kv_cache_bytes(&self, n_slots: usize) -> u64 {
        let model = self.model();
        let n_head = (model.n_head() as u64).max(1);
        let head_dim = model.n_embd() as u64 / n_head;
        let row = model.n_head_kv() as u64 * head_dim;
        let cells = if n_slots > 1 {
            (self.n_ctx as u64).div_ceil(256) * 256 * n_slots as u64
        } else {
            self.n_ctx as u64
        };
        let size = |t: Option<&str>| type_bytes_x32(t.unwrap_or("f16"));
        let per_cell = row
            * (size(self.opts.cache_type_k.as_deref()) + size(self.opts.cache_type_v.as_deref()))
            / 32;
        model.n_layer() as u64 * cells * per_cell
    }

    /// Runs `items` (sequence, position, token, logits wanted) through llama.cpp in chunks of
    /// at most `n_batch` tokens, copying each wanted row into `out` as soon as it exists
    /// (the next chunk overwrites llama.cpp's logits buffer).
    fn run(
        &mut self,
        items: &[(i32, i32, TokenId, Option<usize>)],
        out: &mut Array2<f32>,
        attention_rows: bool,
        kernels: Kernels,
    ) -> anyhow::Result<()> {
        self.captured.clear();
        if let Some(cpu) = &mut self.cpu {
            // SAFETY: `cpu` was noted for the context in `self.state`, which lives on (a new
            // context replaces `self.cpu` as it is made).
            unsafe { cpu.set(kernels) };
        }
        let capturing = !self
            .capture
            .lock()
            .map_err(|_| anyhow::anyhow!("the capture state was poisoned by a panic"))?
            .spec
            .is_empty();
        if capturing {
            return self.run_capturing(items, out, attention_rows);
        }
        let n_vocab = self.info.n_vocab;
        let n_batch = self.n_batch_ctx;
        let n_seqs = self.n_seqs.max(1) as i32;
        let State::Ready(cell) = &mut self.state else {
            anyhow::bail!("llama.cpp context missing");
        };
        cell.with_dependent_mut(|_, ctx| -> anyhow::Result<()> {
            let mut batch = LlamaBatch::new(n_batch, n_seqs);
            for chunk in items.chunks(n_batch) {
                decode_chunk(ctx, &mut batch, chunk, out, n_vocab)?;
            }
            Ok(())
        })
    }

    /// [`LlamaSource::run`] with the eval callback on: one sequence per `llama_decode`, so
    /// that a ubatch is that sequence's tokens in order and the callback's rows map to
    /// positions; each logits row gets its [`Captured`].
    fn run_capturing(
        &mut self,
        items: &[(i32, i32, TokenId, Option<usize>)],
        out: &mut Array2<f32>,
        attention_rows: bool,
    ) -> anyhow::Result<()> {
        let n_vocab = self.info.n_vocab;
        let n_batch = self.n_batch_ctx;
        let n_seqs = self.n_seqs.max(1) as i32;
        let capture = Arc::clone(&self.capture);
        let poisoned = || anyhow::anyhow!("the capture state was poisoned by a panic");
        let State::Ready(cell) = &mut self.state else {
            anyhow::bail!("llama.cpp context missing");
        };
        let captured = &mut self.captured;
        let mut start = 0;
        while start < items.len() {
            let seq = items[start].0;
            let end = start + items[start..].iter().take_while(|i| i.0 == seq).count();
            let entry = &items[start..end];
            for (c, chunk) in entry.chunks(n_batch).enumerate() {
                let last_chunk = (c + 1) * n_batch >= entry.len();
                {
                    let mut st = capture.lock().map_err(|_| poisoned())?;
                    st.begin_decode((attention_rows && last_chunk).then(|| chunk.len() - 1));
                }
                cell.with_dependent_mut(|_, ctx| {
                    let mut batch = LlamaBatch::new(n_batch, n_seqs);
                    decode_chunk(ctx, &mut batch, chunk, out, n_vocab)
                })?;
                let st = capture.lock().map_err(|_| poisoned())?;
                st.rows_of(chunk, captured)?;
            }
            start = end;
        }
        Ok(())
    }

    fn clear_kv(&mut self) {
        if let State::Ready(cell) = &mut self.state {
            cell.with_dependent_mut(|_, ctx| ctx.clear_kv_cache());
        }
    }
}

/// One `llama_decode` of `chunk` (sequence, position, token, logits row wanted), each wanted
/// row copied into `out` at once: the next call overwrites llama.cpp's logits buffer.
fn decode_chunk(
    ctx: &mut Ctx<'_>,
    batch: &mut LlamaBatch,
    chunk: &[(i32, i32, TokenId, Option<usize>)],
    out: &mut Array2<f32>,
    n_vocab: usize,
) -> anyhow::Result<()> {
    batch.clear();
    for &(seq, pos, tok, row) in chunk {
        batch.add(LlamaToken(tok as i32), pos, &[seq], row.is_some())?;
    }
    ctx.decode(batch)
        .map_err(|e| anyhow::anyhow!("llama_decode failed: {e}"))?;
    for (i, &(_, _, _, row)) in chunk.iter().enumerate() {
        if let Some(r) = row {
            let logits = ctx.get_logits_ith(i as i32);
            out.row_mut(r)
                .as_slice_mut()
                .expect("standard layout")
                .copy_from_slice(&logits[..n_vocab]);
        }
    }
    Ok(())
}

enum State {
    Model(LlamaModel),
    Ready(ModelCtx),
    Empty,
}

impl Vocab for LlamaSource {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenize(
        &self,
        text: &str,
        add_bos: bool,
        parse_special: bool,
    ) -> anyhow::Result<Vec<TokenId>> {
        let vocab = self.model().vocab();
        let mut ids: Vec<TokenId> = vocab
            .tokenize(text.as_bytes(), false, parse_special)
            .into_iter()
            .map(|t| t.0 as TokenId)
            .collect();
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
        Some(
            self.model()
                .vocab()
                .token_to_piece(LlamaToken(id as i32), true, None),
        )
    }

    fn is_special(&self, id: TokenId) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    fn chat_template(&self) -> Option<String> {
        self.chat_template.clone()
    }
}

impl LogitSource for LlamaSource {
    fn begin(&mut self, n_slots: usize) -> anyhow::Result<()> {
        if n_slots != self.n_seqs {
            self.make_context(n_slots.max(1))?;
        } else {
            self.clear_kv();
        }
        self.pos = vec![0; n_slots];
        Ok(())
    }

    fn fit_context(&mut self, n_tokens: usize) -> anyhow::Result<()> {
        // llama.cpp pads a sequence's cells to 256: a smaller context saves nothing.
        let mut n_ctx = n_tokens.max(1).next_multiple_of(256);
        // The default context (4096 at most) grows to what the job needs, up to the model's
        // trained context; one the user gave only shrinks.
        let grows = self.opts.ctx_size.is_none() && n_ctx > self.n_ctx;
        if grows && self.n_ctx_train > 0 {
            n_ctx = n_ctx.min(self.n_ctx_train);
        }
        if n_ctx == self.n_ctx || (n_ctx > self.n_ctx && !grows) {
            return Ok(());
        }
        self.n_ctx = n_ctx;
        self.n_batch = self.n_batch.min(n_ctx);
        self.info.n_ctx = n_ctx;
        self.info.details.insert("n_ctx".into(), n_ctx.into());
        self.info
            .details
            .insert("n_batch".into(), self.n_batch.into());
        self.make_context(self.n_seqs.max(1))
    }

    fn clear_slot(&mut self, slot: usize) -> anyhow::Result<()> {
        let pos = self
            .pos
            .get_mut(slot)
            .context("clear_slot: slot was not made by begin()")?;
        *pos = 0;
        if let State::Ready(cell) = &mut self.state {
            cell.with_dependent_mut(|_, ctx| ctx.clear_kv_cache_seq(Some(slot as u32), None, None))
                .map_err(|e| anyhow::anyhow!("llama.cpp could not clear slot {slot}: {e}"))?;
        }
        Ok(())
    }

    fn decode_rows(
        &mut self,
        batch: &[(usize, &[TokenId])],
        every_position: &[bool],
    ) -> anyhow::Result<Array2<f32>> {
        let mut items = Vec::new();
        let mut row = 0;
        for (entry, &(seq, tokens)) in batch.iter().enumerate() {
            let every = every_position.get(entry).copied().unwrap_or(false);
            anyhow::ensure!(!tokens.is_empty(), "decode: sequence {seq} got no tokens");
            let start = *self
                .pos
                .get(seq)
                .context("decode: sequence was not started with begin()")?;
            if start as usize + tokens.len() > self.n_ctx {
                return Err(crate::Error::ContextFull {
                    what: format!("sequence {seq}"),
                    needed: start as usize + tokens.len(),
                    n_ctx: self.n_ctx,
                }
                .into());
            }
            let last = tokens.len() - 1;
            for (i, &t) in tokens.iter().enumerate() {
                anyhow::ensure!(
                    (t as usize) < self.info.n_vocab,
                    "token id {t} is outside the vocabulary"
                );
                let wanted = every || i == last;
                items.push((seq as i32, start + i as i32, t, wanted.then_some(row)));
                row += usize::from(wanted);
            }
            self.pos[seq] = start + tokens.len() as i32;
        }
        let mut out = Array2::zeros((row, self.info.n_vocab));
        self.run(&items, &mut out, true, Kernels::BatchInvariant)?;
        Ok(out)
    }

    fn architecture(&self) -> Option<Architecture> {
        Some(self.arch)
    }

    fn decode_rate(&mut self, threads: usize, steps: usize) -> anyhow::Result<Option<f64>> {
        self.begin(1)?;
        let set = |src: &mut LlamaSource, t: i32, tb: i32| {
            if let State::Ready(cell) = &mut src.state {
                // SAFETY: the context is alive for this call; thread counts are positive.
                cell.with_dependent_mut(|_, ctx| unsafe {
                    llama_cpp_sys_2::llama_set_n_threads(ctx.as_raw_mut(), t, tb)
                });
            }
        };
        let threads_now = self.opts.threads.unwrap_or_else(default_threads) as i32;
        let batch_now = self.opts.threads_batch.map_or(threads_now, |t| t as i32);
        set(self, threads.max(1) as i32, threads.max(1) as i32);
        let prompt = self.tokenize("The quick brown fox jumps over the lazy dog", true, false)?;
        let measured = (|| -> anyhow::Result<f64> {
            self.decode(&[(0, prompt.as_slice())])?;
            let tok = [*prompt.last().unwrap_or(&0)];
            let start = std::time::Instant::now();
            for _ in 0..steps.max(1) {
                self.decode(&[(0, &tok)])?;
            }
            Ok(steps.max(1) as f64 / start.elapsed().as_secs_f64().max(1e-9))
        })();
        set(self, threads_now, batch_now);
        self.clear_kv();
        Ok(Some(measured?))
    }

    fn set_capture(&mut self, spec: &CaptureSpec) -> anyhow::Result<()> {
        spec.check(self.arch.n_layer)?;
        if !spec.attention_layers.is_empty() {
            if self.opts.flash_attn == FlashAttn::On {
                return Err(crate::Error::AttentionNeedsFlashAttnOff.into());
            }
            // Past the window, sliding-window layers reuse cells: a column is no longer a
            // position.
            if self.n_swa > 0 && self.n_ctx > self.n_swa {
                return Err(crate::Error::AttentionWindowed {
                    n_swa: self.n_swa,
                    n_ctx: self.n_ctx,
                }
                .into());
            }
        }
        {
            let mut st = self
                .capture
                .lock()
                .map_err(|_| anyhow::anyhow!("the capture state was poisoned by a panic"))?;
            if st.spec == *spec {
                return Ok(());
            }
            st.spec = spec.clone();
        }
        if !spec.attention_layers.is_empty() {
            self.info
                .details
                .insert("flash_attn".into(), "off (attention capture)".into());
        }
        // The callback is a context parameter: a new context picks it up.
        self.make_context(self.n_seqs.max(1))
    }

    fn take_captured(&mut self) -> Vec<Captured> {
        std::mem::take(&mut self.captured)
    }

    fn lens_head(&mut self) -> anyhow::Result<Arc<LensHead>> {
        if let Some(h) = &self.lens {
            return Ok(Arc::clone(h));
        }
        let head = Arc::new(read_lens_head(&self.path)?);
        self.lens = Some(Arc::clone(&head));
        Ok(head)
    }

    fn score_from(&mut self, tokens: &[TokenId], first: usize) -> anyhow::Result<Array2<f32>> {
        if tokens.len() > self.n_ctx {
            return Err(crate::Error::ContextFull {
                what: "scoring a text".into(),
                needed: tokens.len(),
                n_ctx: self.n_ctx,
            }
            .into());
        }
        if self.n_seqs == 0 {
            self.make_context(1)?;
        }
        self.clear_kv();
        for p in &mut self.pos {
            *p = 0;
        }
        let first = first.min(tokens.len());
        let items: Vec<_> = tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| (0, i as i32, t, i.checked_sub(first)))
            .collect();
        let mut out = Array2::zeros((tokens.len() - first, self.info.n_vocab));
        let kernels = if self.opts.fast_scoring {
            Kernels::Fastest
        } else {
            Kernels::BatchInvariant
        };
        self.run(&items, &mut out, false, kernels)?;
        // The KV cache now holds this sequence: the next decode must begin() again.
        self.clear_kv();
        Ok(out)
    }
}

/// llama.cpp's `LLAMA_MAX_SEQ`: the most sequences one context can hold.
pub const LLAMA_MAX_SEQ: usize = 256;

/// Bytes of 32 entries of a KV cache type (quantized types come in blocks of 32).
fn type_bytes_x32(name: &str) -> u64 {
    match name.to_ascii_lowercase().as_str() {
        "f32" => 128,
        "q8_0" => 34,
        "q4_0" | "iq4_nl" => 18,
        "q4_1" => 20,
        "q5_0" => 22,
        "q5_1" => 24,
        _ => 64,
    }
}

/// MemAvailable of /proc/meminfo, where there is one.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// llama.cpp's own default: the physical cores.
fn default_threads() -> usize {
    crate::physical_cores()
}

/// ggml threadpools for decoding and for prompt batches, freed on drop.
struct Threadpools {
    decode: *mut llama_cpp_sys_2::ggml_threadpool,
    batch: *mut llama_cpp_sys_2::ggml_threadpool,
}

impl Threadpools {
    fn new(threads: i32, threads_batch: i32) -> anyhow::Result<Threadpools> {
        let make = |n: i32| {
            // SAFETY: plain value initialization of the params, then a pool made from them.
            unsafe {
                let mut p = llama_cpp_sys_2::ggml_threadpool_params_default(n);
                // Workers sleep between computes instead of spinning: the lens works on the
                // same cores right after a decode.
                p.poll = 0;
                llama_cpp_sys_2::ggml_threadpool_new(&mut p)
            }
        };
        let decode = make(threads);
        let batch = make(threads_batch);
        let pools = Threadpools { decode, batch };
        anyhow::ensure!(
            !pools.decode.is_null() && !pools.batch.is_null(),
            "ggml could not start a threadpool"
        );
        Ok(pools)
    }
}

impl Drop for Threadpools {
    fn drop(&mut self) {
        for p in [self.decode, self.batch] {
            if !p.is_null() {
                // SAFETY: made by ggml_threadpool_new, freed once, after the context using
                // it is gone.
                unsafe { llama_cpp_sys_2::ggml_threadpool_free(p) };
            }
        }
    }
}

/// The llama.cpp this logitprobe carries (`llama-cpp-sys-2` vendors its sources without git
/// metadata, so llama.cpp's own build number reads 0 and its commit "unknown"): the crate and
/// the llama-cpp-rs commit it was published from, ggml's version as the library reports it,
/// its build options, and the CPU features the build uses.
pub const LLAMA_CPP_SYS_VERSION: &str = "0.1.161";
const LLAMA_CPP_RS_COMMIT: &str = "e7af607ebd5ec2932709ef918c17cca2f9b0fce4";

fn build_info() -> serde_json::Value {
    let text = |p: *const std::os::raw::c_char| {
        if p.is_null() {
            return String::new();
        }
        // SAFETY: ggml and llama.cpp return static NUL-terminated strings.
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .trim()
            .to_string()
    };
    // SAFETY: both return pointers to static strings; no arguments.
    let (ggml, system) = unsafe {
        (
            text(llama_cpp_sys_2::ggml_version()),
            text(llama_cpp_sys_2::llama_print_system_info()),
        )
    };
    serde_json::json!({
        "crate": format!("llama-cpp-sys-2 {LLAMA_CPP_SYS_VERSION}"),
        "llama_cpp_rs_commit": LLAMA_CPP_RS_COMMIT,
        "ggml_version": ggml,
        "llamafile": option_env!("GGML_LLAMAFILE").unwrap_or("ON (llama.cpp's default)"),
        "system_info": system,
    })
}

/// The GGUF's header and architecture, once every check that keeps llama.cpp from aborting
/// on it has passed.
fn checked_header(path: &Path) -> anyhow::Result<(GgufHeader, String)> {
    if !path.is_file() {
        return Err(usage!(
            "model {} not found: give the path of a .gguf file",
            path.display()
        ));
    }
    let header = GgufHeader::read(path)?;
    let arch = header
        .architecture()
        .ok_or_else(|| {
            usage!(
                "{} has no general.architecture: not a model GGUF",
                path.display()
            )
        })?
        .to_string();
    if !LLAMA_CPP_ARCHS.contains(&arch.as_str()) {
        return Err(usage!(
            "{}: architecture '{arch}' is unknown to the llama.cpp built into this logitprobe; update logitprobe or convert the model",
            path.display()
        ));
    }
    if header.get(&format!("{arch}.block_count")).is_none() {
        return Err(usage!(
            "{}: architecture '{arch}' metadata is incomplete (no {arch}.block_count)",
            path.display()
        ));
    }
    // What llama.cpp asserts on (an abort, not an error) is refused here.
    header.check_for_llama_cpp(&arch).map_err(|why| {
        usage!(
            "{}: {why}; the file is damaged: download or convert it again",
            path.display()
        )
    })?;
    Ok((header, arch))
}

/// What a GGUF's vocabulary says, as llama.cpp reads it.
#[derive(Debug, Clone)]
pub struct VocabFacts {
    pub n_tokens: usize,
    /// BOS and EOS with their pieces.
    pub bos: Option<(TokenId, Vec<u8>)>,
    pub eos: Option<(TokenId, Vec<u8>)>,
    pub add_bos: bool,
    /// Every id that ends a generation, with its piece.
    pub eog: Vec<(TokenId, Vec<u8>)>,
    pub chat_template: Option<String>,
}

/// The vocabulary facts of a GGUF, loaded by llama.cpp without its weights (`vocab_only`): the
/// same end-of-generation set and template the engine uses, in milliseconds.
pub fn vocab_facts(path: &Path) -> anyhow::Result<VocabFacts> {
    checked_header(path)?;
    let backend = backend(false)?;
    let params = LlamaModelParams::default().with_vocab_only(true);
    take_errors();
    let model =
        LlamaModel::load_from_file(backend, path, &params).map_err(|e| match take_errors() {
            Some(why) => usage!("llama.cpp could not read {}: {why}", path.display()),
            None => usage!("llama.cpp could not read {}: {e}", path.display()),
        })?;
    let vocab = model.vocab();
    let n = vocab.n_tokens() as usize;
    let with_piece = |t: LlamaToken| {
        (t.0 >= 0 && (t.0 as usize) < n)
            .then(|| (t.0 as TokenId, vocab.token_to_piece(t, true, None)))
    };
    let eog = (0..n as i32)
        .map(LlamaToken)
        .filter(|&t| vocab.is_eog(t))
        .map(|t| (t.0 as TokenId, vocab.token_to_piece(t, true, None)))
        .collect();
    Ok(VocabFacts {
        n_tokens: n,
        bos: with_piece(vocab.bos()),
        eos: with_piece(vocab.eos()),
        add_bos: vocab.should_add_bos(),
        eog,
        chat_template: model
            .chat_template(None)
            .ok()
            .and_then(|t| t.to_string().ok()),
    })
}

/// The raw model pointer of a llama-cpp-2 model, for the few calls it does not wrap.
fn model_ptr(model: &LlamaModel) -> *mut llama_cpp_sys_2::llama_model {
    // SAFETY: `LlamaModel` is `#[repr(transparent)]` over a non-null `*mut llama_model`
    // (llama-cpp-2's `Ptr`), so reading the first pointer-sized field reads that pointer.
    unsafe { *(model as *const LlamaModel).cast::<*mut llama_cpp_sys_2::llama_model>() }
}

/// What the eval callback looks for in the graph, and what it copied during one decode call.
#[derive(Debug, Default)]
struct CaptureState {
    spec: CaptureSpec,
    /// The ubatch row whose attention weights are copied (the sequence's last token), if any.
    attention_row: Option<usize>,
    /// Per asked hidden layer: (rows, the `[rows, n_embd]` data of `l_out-<layer>`).
    l_out: Vec<Option<(usize, Vec<f32>)>>,
    /// Per asked attention layer: (n_kv, n_head, `[n_head, n_kv]` weights of the row).
    kq: Vec<Option<(usize, usize, Vec<f32>)>>,
    /// (rows, the `[rows, n_embd]` data of `result_norm`): the output head's input, one row
    /// per logits row.
    head_input: Option<(usize, Vec<f32>)>,
    /// Per asked named tensor, its data in this decode.
    named: Vec<Option<Vec<f32>>>,
    /// The first thing that went wrong inside the callback (it cannot return an error).
    error: Option<String>,
}

/// A graph tensor the capture wants: the index of its layer in the asked lists.
#[derive(Debug, Clone, Copy)]
enum Wanted {
    Hidden(usize),
    Attention(usize),
    HeadInput,
    Named(usize),
}

impl CaptureState {
    fn begin_decode(&mut self, attention_row: Option<usize>) {
        self.attention_row = attention_row;
        self.l_out = vec![None; self.spec.hidden_layers.len()];
        self.kq = vec![None; self.spec.attention_layers.len()];
        self.head_input = None;
        self.named = vec![None; self.spec.named.len()];
        self.error = None;
    }

    /// Layer outputs are named `l_out-<layer>`, attention weights `kq_soft_max-<layer>`
    /// (llama.cpp's `cb(cur, name, il)` in every architecture's graph), the final norm's
    /// output `result_norm`.
    fn wanted(&self, name: &[u8]) -> Option<Wanted> {
        if self.spec.head_input && name == b"result_norm" {
            return Some(Wanted::HeadInput);
        }
        if let Some(i) = self.spec.named.iter().position(|n| n.as_bytes() == name) {
            return Some(Wanted::Named(i));
        }
        let layer = |prefix: &[u8]| -> Option<usize> {
            std::str::from_utf8(name.strip_prefix(prefix)?)
                .ok()?
                .parse()
                .ok()
        };
        if let Some(l) = layer(b"l_out-") {
            return self
                .spec
                .hidden_layers
                .binary_search(&l)
                .ok()
                .map(Wanted::Hidden);
        }
        if self.attention_row.is_some() {
            if let Some(l) = layer(b"kq_soft_max-") {
                return self
                    .spec
                    .attention_layers
                    .binary_search(&l)
                    .ok()
                    .map(Wanted::Attention);
            }
        }
        None
    }

    /// Copies what `wanted` asks of `t` out of llama.cpp's buffer (valid only during the
    /// callback).
    fn copy(&mut self, wanted: Wanted, t: &llama_cpp_sys_2::ggml_tensor) -> Result<(), String> {
        // SAFETY: `t` is the live tensor llama.cpp passed to this callback.
        let contiguous = unsafe { llama_cpp_sys_2::ggml_is_contiguous(t) };
        let ne = t.ne.map(|n| usize::try_from(n).unwrap_or(0));
        if let Wanted::Named(i) = wanted {
            // A view or an F16 tensor stays None: the caller asked by name, maybe wrongly.
            if t.type_ == llama_cpp_sys_2::GGML_TYPE_F32 && contiguous {
                let mut data = vec![0f32; ne.iter().product()];
                // SAFETY: `data` holds every f32 value of the contiguous tensor.
                unsafe {
                    llama_cpp_sys_2::ggml_backend_tensor_get(
                        t,
                        data.as_mut_ptr().cast(),
                        0,
                        data.len() * 4,
                    )
                };
                self.named[i] = Some(data);
            }
            return Ok(());
        }
        if t.type_ != llama_cpp_sys_2::GGML_TYPE_F32 || !contiguous {
            return Err(format!(
                "llama.cpp's {} is not a contiguous f32 tensor",
                String::from_utf8_lossy(tensor_name(t))
            ));
        }
        match wanted {
            Wanted::Hidden(_) | Wanted::HeadInput => {
                let mut data = vec![0f32; ne[0] * ne[1]];
                // SAFETY: `data` holds exactly the tensor's ne0 * ne1 f32 values (checked
                // contiguous f32 of that shape, ne2 = ne3 = 1 for a layer output).
                if ne[2] * ne[3] != 1 {
                    return Err("a layer output with more than two dimensions".into());
                }
                unsafe {
                    llama_cpp_sys_2::ggml_backend_tensor_get(
                        t,
                        data.as_mut_ptr().cast(),
                        0,
                        data.len() * 4,
                    )
                };
                match wanted {
                    Wanted::Hidden(i) => self.l_out[i] = Some((ne[1], data)),
                    _ => self.head_input = Some((ne[1], data)),
                }
            }
            Wanted::Named(_) => {}
            Wanted::Attention(i) => {
                let row = self.attention_row.unwrap_or(0);
                let (n_kv, n_tokens, n_head) = (ne[0], ne[1], ne[2]);
                if ne[3] != 1 || row >= n_tokens {
                    return Err(format!(
                        "attention weights of shape {ne:?} have no row {row} of one sequence"
                    ));
                }
                let mut data = vec![0f32; n_head * n_kv];
                for h in 0..n_head {
                    let offset = h * t.nb[2] + row * t.nb[1];
                    // SAFETY: the head's row of n_kv f32 values lies inside the tensor
                    // (row < ne1, h < ne2, contiguous), and the destination slice holds them.
                    unsafe {
                        llama_cpp_sys_2::ggml_backend_tensor_get(
                            t,
                            data[h * n_kv..].as_mut_ptr().cast(),
                            offset,
                            n_kv * 4,
                        )
                    };
                }
                self.kq[i] = Some((n_kv, n_head, data));
            }
        }
        Ok(())
    }

    /// The captures of the logits rows of one decoded chunk (one sequence's tokens in order),
    /// appended to `out` in row order.
    fn rows_of(
        &self,
        chunk: &[(i32, i32, TokenId, Option<usize>)],
        out: &mut Vec<Captured>,
    ) -> anyhow::Result<()> {
        if let Some(e) = &self.error {
            anyhow::bail!("reading inside the model failed: {e}");
        }
        let n_out = chunk.iter().filter(|i| i.3.is_some()).count();
        let mut k = 0;
        for (i, &(_, pos, _, row)) in chunk.iter().enumerate() {
            if row.is_none() {
                continue;
            }
            let mut got = Captured::default();
            if !self.spec.hidden_layers.is_empty() {
                let mut rows = Vec::with_capacity(self.spec.hidden_layers.len());
                for (j, layer) in self.spec.hidden_layers.iter().enumerate() {
                    let Some((n_rows, data)) = &self.l_out[j] else {
                        anyhow::bail!("llama.cpp's graph has no output of layer {layer}");
                    };
                    // The last layer keeps only the rows whose logits were asked for.
                    let r = if *n_rows == chunk.len() {
                        i
                    } else if *n_rows == n_out {
                        k
                    } else {
                        anyhow::bail!(
                            "layer {layer}'s output has {n_rows} rows for {} tokens ({n_out} with logits)",
                            chunk.len()
                        );
                    };
                    let width = data.len() / n_rows.max(&1);
                    rows.push(&data[r * width..(r + 1) * width]);
                }
                let width = rows[0].len();
                let mut hidden = Array2::zeros((rows.len(), width));
                for (mut dst, src) in hidden.outer_iter_mut().zip(rows) {
                    dst.assign(&ndarray::ArrayView1::from(src));
                }
                got.hidden = Some(hidden);
            }
            if self.attention_row == Some(i) {
                let n_pos = pos as usize + 1;
                for (j, layer) in self.spec.attention_layers.iter().enumerate() {
                    let Some((n_kv, n_head, data)) = &self.kq[j] else {
                        anyhow::bail!("llama.cpp's graph has no attention weights of layer {layer} (is flash attention on?)");
                    };
                    anyhow::ensure!(
                        *n_kv >= n_pos,
                        "layer {layer}'s attention covers {n_kv} cells for position {pos}"
                    );
                    let mut w = Array2::zeros((*n_head, n_pos));
                    for (h, mut dst) in w.outer_iter_mut().enumerate() {
                        dst.assign(&ndarray::ArrayView1::from(
                            &data[h * n_kv..h * n_kv + n_pos],
                        ));
                    }
                    got.attention.push(w);
                }
            }
            if self.spec.head_input {
                let Some((n_rows, data)) = &self.head_input else {
                    anyhow::bail!("llama.cpp's graph has no result_norm (the output head's input)");
                };
                anyhow::ensure!(
                    *n_rows == n_out,
                    "result_norm has {n_rows} rows for {n_out} logits rows"
                );
                let width = data.len() / n_rows.max(&1);
                got.head_input = Some(data[k * width..(k + 1) * width].to_vec());
            }
            if k == 0 {
                got.named = self.named.clone();
            }
            out.push(got);
            k += 1;
        }
        Ok(())
    }
}

/// The NUL-terminated name of a ggml tensor.
fn tensor_name(t: &llama_cpp_sys_2::ggml_tensor) -> &[u8] {
    // SAFETY: `name` is a plain array of 64 c_char; reading it as bytes is always valid.
    let bytes: &[u8] = unsafe { std::slice::from_raw_parts(t.name.as_ptr().cast(), t.name.len()) };
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

/// llama.cpp's eval callback (`cb_eval`): answers whether a graph node is one the capture
/// wants (ask phase), and copies it when llama.cpp has computed it (data phase).
unsafe extern "C" fn eval_callback(
    t: *mut llama_cpp_sys_2::ggml_tensor,
    ask: bool,
    user_data: *mut std::ffi::c_void,
) -> bool {
    // In the data phase, `false` would cancel the rest of the graph: always go on.
    if t.is_null() || user_data.is_null() {
        return !ask;
    }
    // SAFETY: `user_data` is the `Mutex<CaptureState>` inside the Arc the source keeps for
    // as long as this context lives (see `make_context`); `t` is valid for this call.
    let (state, t) = unsafe {
        (
            &*user_data.cast_const().cast::<Mutex<CaptureState>>(),
            &*t.cast_const(),
        )
    };
    // A panic must not unwind into C++.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let Ok(mut st) = state.lock() else {
            return !ask;
        };
        let Some(wanted) = st.wanted(tensor_name(t)) else {
            return !ask;
        };
        if ask {
            return true;
        }
        if let Err(e) = st.copy(wanted, t) {
            st.error.get_or_insert(e);
        }
        true
    }))
    .unwrap_or(!ask)
}

/// Architectures whose graph ends in RMSNorm(`output_norm`) → `output` (or the tied
/// `token_embd`), as the vendored llama.cpp builds them (`src/models/<arch>.cpp`), with what
/// each does to the logits after the head.
const LENS_ARCHS: &str = "llama, mistral3, qwen2, qwen2moe, qwen3, qwen3moe, gemma, gemma2, gemma3, phi3, granite, olmo2, smollm3";

/// The final norm and output head of a GGUF, read without loading the model: the output head
/// in its own type, multiplied with ggml's one-row kernels as llama.cpp's batch-invariant
/// path does, so [`LensHead::head_logits`] of a row's captured head input is that row's
/// logits.
pub fn output_head(path: &Path) -> anyhow::Result<LensHead> {
    read_lens_head(path)
}

/// The lens head of a GGUF: the final norm and output head, dequantized to f32 with ggml's
/// own routines.
fn read_lens_head(path: &Path) -> anyhow::Result<LensHead> {
    let header = GgufHeader::read(path)?;
    let arch = header.architecture().unwrap_or_default().to_string();
    let key = |k: &str| header.get(&format!("{arch}.{k}")).and_then(|v| v.as_f64());
    let (scale, softcap) = match arch.as_str() {
        "llama" | "mistral3" | "qwen2" | "qwen2moe" | "qwen3" | "qwen3moe" | "gemma" | "phi3"
        | "olmo2" | "smollm3" => (1.0, None),
        "gemma2" => (1.0, Some(key("final_logit_softcapping").unwrap_or(30.0))),
        "gemma3" => (1.0, key("final_logit_softcapping").filter(|&c| c != 0.0)),
        "granite" => match key("logit_scale") {
            Some(s) if s != 0.0 => (1.0 / s, None),
            _ => {
                return Err(crate::Error::LensHeadUnreadable {
                    reason: "granite's logit_scale is missing or 0".into(),
                }
                .into())
            }
        },
        _ => {
            return Err(crate::Error::LensUnknownArchitecture {
                arch,
                known: LENS_ARCHS,
            }
            .into())
        }
    };
    let eps =
        key("attention.layer_norm_rms_epsilon").ok_or_else(|| crate::Error::LensHeadUnreadable {
            reason: format!("{arch}.attention.layer_norm_rms_epsilon is missing"),
        })? as f32;
    let norm = read_tensor(path, &header, "output_norm.weight")?.ok_or_else(|| {
        crate::Error::LensHeadUnreadable {
            reason: "the GGUF has no output_norm.weight".into(),
        }
    })?;
    // Tied embeddings: llama.cpp uses token_embd.weight when there is no output.weight.
    let head = match GgmlRows::read(path, &header, "output.weight")? {
        Some(h) => Some(h),
        None => GgmlRows::read(path, &header, "token_embd.weight")?,
    };
    let mut lens = LensHead::new(
        FinalNorm::Rms {
            weight: norm.into_raw_vec_and_offset().0,
            eps,
        },
        head.ok_or_else(|| crate::Error::LensHeadUnreadable {
            reason: "the GGUF has neither output.weight nor token_embd.weight".into(),
        })?,
    )?
    .with_scale(scale as f32);
    if let Some(bias) = read_tensor(path, &header, "output.bias")? {
        lens = lens.with_bias(bias.into_raw_vec_and_offset().0)?;
    }
    if let Some(cap) = softcap {
        lens = lens.with_softcap(cap as f32);
    }
    Ok(lens)
}

/// An output head as llama.cpp keeps it: its rows in the GGUF's own type, multiplied as
/// llama.cpp's CPU kernels do (the input row quantized to the type's `vec_dot_type`, then
/// `vec_dot` per vocabulary row, or tinyBLAS's sums where the batch-invariant kernels run
/// tinyBLAS: [`crate::cpu_kernels::head_block`]). A quantized head thus gives the lens the engine's own
/// activation quantization, and the last layer's lens equals its logits.
#[derive(Debug)]
struct GgmlRows {
    ty: llama_cpp_sys_2::ggml_type,
    n_vocab: usize,
    n_embd: usize,
    row_bytes: usize,
    data: Vec<u8>,
    /// Bytes of one input row in the vec_dot type.
    input_bytes: usize,
    from_float: unsafe extern "C" fn(*const f32, *mut std::ffi::c_void, i64),
    vec_dot: unsafe extern "C" fn(
        std::os::raw::c_int,
        *mut f32,
        usize,
        *const std::ffi::c_void,
        usize,
        *const std::ffi::c_void,
        usize,
        std::os::raw::c_int,
    ),
}

impl GgmlRows {
    /// The tensor `name` of the GGUF, `None` when the file has none.
    fn read(path: &Path, header: &GgufHeader, name: &str) -> anyhow::Result<Option<GgmlRows>> {
        let unreadable = |reason: String| crate::Error::LensHeadUnreadable { reason };
        let Some(info) = header.tensors.iter().find(|t| t.name == name) else {
            return Ok(None);
        };
        let ty = info.ggml_type;
        if ty >= llama_cpp_sys_2::GGML_TYPE_COUNT {
            return Err(unreadable(format!("{name} has type {ty}, unknown to ggml")).into());
        }
        let n_embd = *info.dims.first().unwrap_or(&1) as usize;
        let n_vocab = info.n_elements() as usize / n_embd.max(1);
        // SAFETY: ggml_cpu_init only fills ggml's CPU tables (idempotent); a type id below
        // GGML_TYPE_COUNT indexes those static tables.
        let (cpu, dot_type) = unsafe {
            llama_cpp_sys_2::ggml_cpu_init();
            let cpu = &*llama_cpp_sys_2::ggml_get_type_traits_cpu(ty);
            (
                cpu,
                &*llama_cpp_sys_2::ggml_get_type_traits_cpu(cpu.vec_dot_type),
            )
        };
        let (Some(vec_dot), Some(from_float)) = (cpu.vec_dot, dot_type.from_float) else {
            return Err(unreadable(format!(
                "ggml's CPU backend cannot multiply {name} (type {ty})"
            ))
            .into());
        };
        // SAFETY: as above, valid type ids.
        let (row_bytes, input_bytes) = unsafe {
            (
                llama_cpp_sys_2::ggml_row_size(ty, n_embd as i64),
                llama_cpp_sys_2::ggml_row_size(cpu.vec_dot_type, n_embd as i64),
            )
        };
        if n_embd == 0 || row_bytes == 0 {
            return Err(unreadable(format!("{name} has rows of {n_embd}")).into());
        }
        use std::io::{Read as _, Seek as _};
        let mut file = std::fs::File::open(path)?;
        file.seek(std::io::SeekFrom::Start(header.data_offset + info.offset))?;
        let mut data = vec![0u8; row_bytes * n_vocab];
        file.read_exact(&mut data)
            .map_err(|e| unreadable(format!("{name} cannot be read: {e}")))?;
        Ok(Some(GgmlRows {
            ty,
            n_vocab,
            n_embd,
            row_bytes,
            data,
            input_bytes,
            from_float,
            vec_dot,
        }))
    }
}

impl crate::inside::HeadMatrix for GgmlRows {
    fn n_vocab(&self) -> usize {
        self.n_vocab
    }
    fn n_embd(&self) -> usize {
        self.n_embd
    }
    fn bytes(&self) -> usize {
        self.data.len()
    }
    fn product(&self, x: ndarray::ArrayView2<'_, f32>) -> Array2<f32> {
        // Each input row in the vec_dot type, once; then the vocabulary split across threads.
        let q: Vec<Vec<u8>> = x
            .outer_iter()
            .map(|xr| {
                let xr = xr.as_standard_layout();
                let mut q = vec![0u8; self.input_bytes];
                // SAFETY: `xr` holds n_embd f32 values and `q` the bytes of n_embd values in
                // the vec_dot type, what from_float reads and writes for k = n_embd.
                unsafe {
                    (self.from_float)(xr.as_ptr(), q.as_mut_ptr().cast(), self.n_embd as i64)
                };
                q
            })
            .collect();
        let mut out = Array2::zeros((x.nrows(), self.n_vocab));
        // A block of head rows stays in cache while every input row goes past it: the head
        // (525 MB on a 128k vocabulary) is read from memory once per call, not once per input
        // row. Each logit is still one vec_dot (or one tinyBLAS chain), so the numbers do not
        // change.
        const BLOCK: usize = 32;
        let inputs: Vec<&[u8]> = q.iter().map(Vec::as_slice).collect();
        crate::inside::split_vocab(self.n_vocab, &mut out, |range, mut part| {
            for b0 in range.clone().step_by(BLOCK) {
                let b1 = (b0 + BLOCK).min(range.end);
                let block = &self.data[b0 * self.row_bytes..b1 * self.row_bytes];
                let (lo, hi) = (b0 - range.start, b1 - range.start);
                let mut sums: Vec<&mut [f32]> = part
                    .outer_iter_mut()
                    .filter_map(|yr| yr.into_slice().map(|y| &mut y[lo..hi]))
                    .collect();
                if sums.len() == inputs.len()
                    && crate::cpu_kernels::head_block(
                        self.ty,
                        self.n_vocab,
                        block,
                        self.row_bytes,
                        &inputs,
                        self.n_embd,
                        &mut sums,
                    )
                {
                    continue;
                }
                drop(sums);
                for (q, mut yr) in q.iter().zip(part.outer_iter_mut()) {
                    for v in b0..b1 {
                        let row = &self.data[v * self.row_bytes..(v + 1) * self.row_bytes];
                        let y = &mut yr[v - range.start];
                        // SAFETY: `row` is one row of n_embd values of the head's type and
                        // `q` one of its vec_dot type; one result (nrc 1) goes to `y`.
                        unsafe {
                            (self.vec_dot)(
                                self.n_embd as std::os::raw::c_int,
                                y,
                                0,
                                row.as_ptr().cast(),
                                0,
                                q.as_ptr().cast(),
                                0,
                                1,
                            )
                        };
                    }
                }
            }
        });
        out
    }
}

/// A tensor of the GGUF as `[rows, ne0]` f32 (a vector is one row), dequantized by ggml's
/// `to_float`; `None` when the file has no tensor of that name.
fn read_tensor(
    path: &Path,
    header: &GgufHeader,
    name: &str,
) -> anyhow::Result<Option<Array2<f32>>> {
    use std::io::{Read as _, Seek as _};
    let Some(info) = header.tensors.iter().find(|t| t.name == name) else {
        return Ok(None);
    };
    let unreadable = |reason: String| crate::Error::LensHeadUnreadable { reason };
    let ne0 = *info.dims.first().unwrap_or(&1) as usize;
    let rows = (info.n_elements() as usize) / ne0.max(1);
    let (type_name, block, block_bytes) = crate::formats::gguf::ggml_type(info.ggml_type)
        .ok_or_else(|| unreadable(format!("{name} has an unknown type {}", info.ggml_type)))?;
    if !(ne0 as u64).is_multiple_of(block) {
        return Err(unreadable(format!(
            "{name} rows of {ne0} are not whole {type_name} blocks"
        ))
        .into());
    }
    let row_bytes = ne0 / block as usize * block_bytes as usize;
    let mut file = std::fs::File::open(path)?;
    file.seek(std::io::SeekFrom::Start(header.data_offset + info.offset))?;
    let mut bytes = vec![0u8; row_bytes * rows];
    file.read_exact(&mut bytes)
        .map_err(|e| unreadable(format!("{name} cannot be read: {e}")))?;
    let mut out = Array2::<f32>::zeros((rows, ne0));
    let dst = out.as_slice_mut().expect("standard layout");
    if info.ggml_type == llama_cpp_sys_2::GGML_TYPE_F32 {
        for (d, s) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
            *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        }
        return Ok(Some(out));
    }
    if info.ggml_type >= llama_cpp_sys_2::GGML_TYPE_COUNT {
        return Err(unreadable(format!("{name} has type {type_name}, unknown to ggml")).into());
    }
    // SAFETY: a type id below GGML_TYPE_COUNT indexes ggml's static table of type traits.
    let traits = unsafe { &*llama_cpp_sys_2::ggml_get_type_traits(info.ggml_type) };
    let to_float = traits
        .to_float
        .ok_or_else(|| unreadable(format!("ggml cannot dequantize {name} ({type_name})")))?;
    for (src, dst) in bytes.chunks_exact(row_bytes).zip(dst.chunks_exact_mut(ne0)) {
        // SAFETY: `src` holds one row of ne0 / block whole blocks of this type, `dst` ne0
        // floats: what to_float reads and writes for k = ne0.
        unsafe { to_float(src.as_ptr().cast(), dst.as_mut_ptr(), ne0 as i64) };
    }
    Ok(Some(out))
}
