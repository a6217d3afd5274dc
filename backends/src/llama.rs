//! GGUF models through llama.cpp (`llama-cpp-2`).
//!
//! The model is memory-mapped once; the context (and so the KV cache) is sized for the number
//! of sequences of a batch, all of them in one unified KV cache so each gets the full
//! `--ctx-size`. Every decode call feeds all sequences of a step in one `llama_decode` batch
//! with distinct sequence ids, asking logits only for each sequence's last token.

use crate::gguf::{GgufHeader, LLAMA_CPP_ARCHS};
use crate::{usage, EngineOptions, FlashAttn, LogitSource, ModelInfo, TokenId};
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
use std::path::Path;
use std::sync::OnceLock;

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
    first.map(|l| crate::gguf::quoted(&l, 200))
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
    state: State,
    info: ModelInfo,
    opts: EngineOptions,
    /// Context length of each sequence.
    n_ctx: usize,
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
            .with_use_mmap(true);
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
        details.insert("tensor_types".into(), serde_json::to_value(&types.by_type)?);
        details.insert("bits_per_weight".into(), types.bits_per_weight.into());
        details.insert("params".into(), types.params.into());

        let info = ModelInfo {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            engine: "llama.cpp".into(),
            engine_version: "llama-cpp-2 0.1.160 (llama.cpp from llama-cpp-sys-2 0.1.161)".into(),
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
        let mut src = LlamaSource {
            state: State::Model(model),
            info,
            opts: opts.clone(),
            n_ctx,
            n_batch,
            n_batch_ctx: n_batch,
            n_seqs: 0,
            pos: Vec::new(),
            chat_template,
            special,
        };
        src.make_context(1)?;
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
        let flash = match self.opts.flash_attn {
            FlashAttn::On => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED,
            FlashAttn::Off => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED,
            FlashAttn::Auto => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_AUTO,
        };
        let params = LlamaContextParams::default()
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
        match ModelCtx::try_new_or_recover(model, |m| m.new_context(backend, params)) {
            Ok(cell) => {
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
    ) -> anyhow::Result<()> {
        let n_vocab = self.info.n_vocab;
        let n_batch = self.n_batch_ctx;
        let n_seqs = self.n_seqs.max(1) as i32;
        let State::Ready(cell) = &mut self.state else {
            anyhow::bail!("llama.cpp context missing");
        };
        cell.with_dependent_mut(|_, ctx| -> anyhow::Result<()> {
            let mut batch = LlamaBatch::new(n_batch, n_seqs);
            for chunk in items.chunks(n_batch) {
                batch.clear();
                for &(seq, pos, tok, row) in chunk {
                    batch.add(LlamaToken(tok as i32), pos, &[seq], row.is_some())?;
                }
                ctx.decode(&mut batch)
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
            }
            Ok(())
        })
    }

    fn clear_kv(&mut self) {
        if let State::Ready(cell) = &mut self.state {
            cell.with_dependent_mut(|_, ctx| ctx.clear_kv_cache());
        }
    }
}

enum State {
    Model(LlamaModel),
    Ready(ModelCtx),
    Empty,
}

impl LogitSource for LlamaSource {
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
        let n_ctx = n_tokens.max(1).next_multiple_of(256);
        if n_ctx >= self.n_ctx {
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
        self.run(&items, &mut out)?;
        Ok(out)
    }

    fn score(&mut self, tokens: &[TokenId]) -> anyhow::Result<Array2<f32>> {
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
        let items: Vec<_> = tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| (0, i as i32, t, Some(i)))
            .collect();
        let mut out = Array2::zeros((tokens.len(), self.info.n_vocab));
        self.run(&items, &mut out)?;
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
