//! A small, safe reader of GGUF headers: metadata, tensor types and sizes.
//!
//! It runs before llama.cpp sees a file, so a truncated download, a file that is not GGUF or
//! an architecture llama.cpp does not know gives a one-line error instead of an abort inside
//! C++, and it tells users what a file really holds (a "Q4_K_M" GGUF is a mix of types).

use crate::usage;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

/// A metadata value. Arrays keep their length and, for small ones, their values.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Value {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array { len: u64, items: Vec<Value> },
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::UInt(v) => Some(v),
            Value::Int(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Float(v) => Some(v),
            Value::UInt(v) => Some(v as f64),
            Value::Int(v) => Some(v as f64),
            _ => None,
        }
    }
}

/// `s` for an error message: escaped, and cut to `max` characters (a corrupt length can make
/// a key name megabytes of binary).
pub fn quoted(s: &str, max: usize) -> String {
    let escaped: String = s.chars().flat_map(char::escape_debug).collect();
    if escaped.chars().count() <= max {
        escaped
    } else {
        let cut: String = escaped.chars().take(max).collect();
        format!("{cut}… ({} bytes)", s.len())
    }
}

/// What the vocabulary's token list holds that llama.cpp cannot take.
#[derive(Debug, Clone, Default)]
pub struct TokenList {
    /// The first token that is not UTF-8, by id.
    pub not_utf8: Option<usize>,
    /// The first token that repeats an earlier one: its id and the earlier id.
    pub duplicate: Option<(usize, usize)>,
    /// Whether SentencePiece's byte token for a newline (`<0x0A>`) is there.
    pub has_newline_byte: bool,
}

/// One tensor's header entry.
#[derive(Debug, Clone, Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub offset: u64,
}

impl TensorInfo {
    /// The element count; [`GgufHeader::read`] refuses a tensor whose count overflows, so
    /// the saturation never shows in a header it gives.
    pub fn n_elements(&self) -> u64 {
        self.checked_elements().unwrap_or(u64::MAX)
    }

    /// The element count, `None` when it overflows u64 (dimensions straight from the file).
    fn checked_elements(&self) -> Option<u64> {
        if self.dims.contains(&0) {
            return Some(0);
        }
        self.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d))
    }
}

/// What a GGUF file's header says.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub data_offset: u64,
    pub file_size: u64,
    /// What `tokenizer.ggml.tokens` holds, when the file has one.
    pub tokens: Option<TokenList>,
}

/// A ggml tensor type: name, elements per block, bytes per block.
pub fn ggml_type(t: u32) -> Option<(&'static str, u64, u64)> {
    Some(match t {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        9 => ("Q8_1", 32, 36),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        16 => ("IQ2_XXS", 256, 66),
        17 => ("IQ2_XS", 256, 74),
        18 => ("IQ3_XXS", 256, 98),
        19 => ("IQ1_S", 256, 50),
        20 => ("IQ4_NL", 32, 18),
        21 => ("IQ3_S", 256, 110),
        22 => ("IQ2_S", 256, 82),
        23 => ("IQ4_XS", 256, 136),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", 256, 56),
        30 => ("BF16", 1, 2),
        34 => ("TQ1_0", 256, 54),
        35 => ("TQ2_0", 256, 66),
        39 => ("MXFP4", 32, 17),
        40 => ("NVFP4", 64, 36),
        41 => ("Q1_0", 128, 18),
        42 => ("Q2_0", 64, 18),
        _ => return None,
    })
}

/// Architectures the vendored llama.cpp (llama-cpp-sys-2 0.1.161, `llama-arch.cpp`) loads.
pub const LLAMA_CPP_ARCHS: &[&str] = &[
    "llama",
    "llama4",
    "deci",
    "falcon",
    "grok",
    "gpt2",
    "gptj",
    "gptneox",
    "mpt",
    "baichuan",
    "starcoder",
    "refact",
    "bert",
    "modern-bert",
    "nomic-bert",
    "nomic-bert-moe",
    "neo-bert",
    "jina-bert-v2",
    "jina-bert-v3",
    "eurobert",
    "bloom",
    "stablelm",
    "qwen",
    "qwen2",
    "qwen2moe",
    "qwen2vl",
    "qwen3",
    "qwen3moe",
    "qwen3next",
    "qwen3vl",
    "qwen3vlmoe",
    "qwen35",
    "qwen35moe",
    "clef",
    "qwen4exp",
    "phi2",
    "phi3",
    "phimoe",
    "plamo",
    "plamo2",
    "plamo3",
    "codeshell",
    "orion",
    "internlm2",
    "minicpm",
    "minicpm3",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3n",
    "gemma4",
    "gemma4-assistant",
    "gemma-embedding",
    "starcoder2",
    "mamba",
    "mamba2",
    "maple",
    "jamba",
    "falcon-h1",
    "xverse",
    "command-r",
    "cohere2",
    "cohere2moe",
    "dbrx",
    "olmo",
    "olmo2",
    "olmoe",
    "muse-glimmer",
    "openelm",
    "arctic",
    "deepseek",
    "deepseek2",
    "deepseek2-ocr",
    "deepseek32",
    "deepseek4",
    "chatglm",
    "glm4",
    "glm4moe",
    "glm-dsa",
    "bitnet",
    "t5",
    "t5encoder",
    "jais",
    "jais2",
    "nemotron",
    "nemotron_h",
    "nemotron_h_moe",
    "exaone",
    "exaone4",
    "exaone-moe",
    "rwkv6",
    "rwkv6qwen2",
    "rwkv7",
    "arwkv7",
    "granite",
    "granitemoe",
    "granitehybrid",
    "graniteswitch",
    "granite_swa",
    "chameleon",
    "wavtokenizer-dec",
    "plm",
    "bailingmoe",
    "bailingmoe2",
    "bailingmoe3",
    "dots1",
    "dots3note",
    "arcee",
    "afmoe",
    "laguna",
    "ernie4_5",
    "ernie4_5-moe",
    "hunyuan-moe",
    "hunyuan-dense",
    "hunyuan_vl",
    "hy_v3",
    "hy_v4",
    "smollm3",
    "gpt-oss",
    "lfm2",
    "lfm2moe",
    "dream",
    "smallthinker",
    "llada",
    "llada-moe",
    "seed_oss",
    "grovemoe",
    "apertus",
    "minimax-01",
    "hrm_text",
    "minimax-m2",
    "minimax-m3",
    "cogvlm",
    "rnd1",
    "pangu-embedded",
    "mistral3",
    "eagle3",
    "dflash",
    "mistral4",
    "paddleocr",
    "mimo2",
    "step35",
    "spark2_5",
    "llama-embed",
    "maincoder",
    "kimi-linear",
    "kimi-k3",
    "glm5-next",
    "talkie",
    "mellum",
    "nanbeige",
];

/// Arrays longer than this keep only their length (token lists run to 150k entries).
const KEEP_ARRAY: u64 = 64;

/// The fewest bytes a metadata entry takes: key length, value type, a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// The fewest bytes a tensor entry takes: name length, dimension count, type, offset.
const MIN_TENSOR_BYTES: u64 = 8 + 4 + 4 + 8;

struct Reader<R: Read> {
    r: R,
    pos: u64,
    file_size: u64,
}

impl<R: Read> Reader<R> {
    /// Where `n` more bytes end; an error when the file does not hold them (a length read from
    /// the file can be anything up to 2^64 - 1, so the sum is checked, not wrapped).
    fn end_of(&self, n: u64) -> anyhow::Result<u64> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.file_size => Ok(end),
            _ => anyhow::bail!("truncated header"),
        }
    }
    fn bytes(&mut self, n: u64) -> anyhow::Result<Vec<u8>> {
        let end = self.end_of(n)?;
        let mut buf = vec![0u8; n as usize];
        self.r.read_exact(&mut buf)?;
        self.pos = end;
        Ok(buf)
    }
    fn skip(&mut self, n: u64) -> anyhow::Result<()> {
        let end = self.end_of(n)?;
        std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink())?;
        self.pos = end;
        Ok(())
    }
    /// Refuses a count of `n` items of at least `each` bytes that the rest of the file cannot
    /// hold, before anything is read or allocated for them.
    fn fits(&self, n: u64, each: u64, what: &str) -> anyhow::Result<()> {
        let left = self.file_size.saturating_sub(self.pos);
        if u128::from(n) * u128::from(each) > u128::from(left) {
            anyhow::bail!(
                "{what} of {n} elements, more than the {left} bytes left in the file hold"
            );
        }
        Ok(())
    }
    fn u32(&mut self) -> anyhow::Result<u32> {
        Ok(u32::from_le_bytes(
            self.bytes(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> anyhow::Result<u64> {
        Ok(u64::from_le_bytes(
            self.bytes(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self) -> anyhow::Result<String> {
        let n = self.u64()?;
        anyhow::ensure!(n < (1 << 30), "string of {n} bytes");
        Ok(String::from_utf8_lossy(&self.bytes(n)?).into_owned())
    }
    /// A key or tensor name: GGUF bounds them at 65535 bytes.
    fn name(&mut self) -> anyhow::Result<String> {
        let n = self.u64()?;
        anyhow::ensure!(n <= 65535, "a name of {n} bytes");
        Ok(String::from_utf8_lossy(&self.bytes(n)?).into_owned())
    }
    /// The vocabulary (an array of strings), checked token by token; only its length is kept.
    fn token_list(&mut self) -> anyhow::Result<(Value, TokenList)> {
        let et = self.u32()?;
        let n = self.u64()?;
        anyhow::ensure!(
            et == 8,
            "tokenizer.ggml.tokens is an array of type {et}, not strings"
        );
        // Each token is at least its 8-byte length.
        self.fits(n, 8, "a token list")?;
        let mut list = TokenList::default();
        let mut seen = std::collections::HashMap::new();
        for id in 0..n as usize {
            let len = self.u64()?;
            anyhow::ensure!(len < (1 << 20), "token {id} of {len} bytes");
            let bytes = self.bytes(len)?;
            if std::str::from_utf8(&bytes).is_err() {
                list.not_utf8.get_or_insert(id);
            }
            if bytes == b"<0x0A>" {
                list.has_newline_byte = true;
            }
            if let Some(&first) = seen.get(&bytes) {
                list.duplicate.get_or_insert((id, first));
            } else {
                seen.insert(bytes, id);
            }
        }
        Ok((
            Value::Array {
                len: n,
                items: Vec::new(),
            },
            list,
        ))
    }
    fn value(&mut self, ty: u32, keep: bool) -> anyhow::Result<Value> {
        Ok(match ty {
            0 => Value::UInt(u64::from(self.bytes(1)?[0])),
            1 => Value::Int(i64::from(self.bytes(1)?[0] as i8)),
            2 => Value::UInt(u64::from(u16::from_le_bytes(
                self.bytes(2)?.try_into().expect("2"),
            ))),
            3 => Value::Int(i64::from(i16::from_le_bytes(
                self.bytes(2)?.try_into().expect("2"),
            ))),
            4 => Value::UInt(u64::from(self.u32()?)),
            5 => Value::Int(i64::from(self.u32()? as i32)),
            6 => Value::Float(f64::from(f32::from_bits(self.u32()?))),
            7 => Value::Bool(self.bytes(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => self.array(keep)?,
            10 => Value::UInt(self.u64()?),
            11 => Value::Int(self.u64()? as i64),
            12 => Value::Float(f64::from_bits(self.u64()?)),
            t => anyhow::bail!("unknown metadata value type {t}"),
        })
    }
    /// An array value whose type was just read: its element type, count and elements.
    fn array(&mut self, keep: bool) -> anyhow::Result<Value> {
        let et = self.u32()?;
        let n = self.u64()?;
        // llama.cpp refuses arrays of arrays; reading them here would recurse once per
        // nesting level, and a few megabytes of nested headers overflow the stack.
        anyhow::ensure!(et != 9, "an array of arrays, which llama.cpp does not read");
        let fixed = match et {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        // A string is at least its 8-byte length.
        self.fits(n, fixed.unwrap_or(8), "an array")?;
        let keep_items = keep && n <= KEEP_ARRAY;
        let mut items = Vec::new();
        match (fixed, keep_items) {
            // `fits` bounds the product by the file's size.
            (Some(size), false) => self.skip(size * n)?,
            _ => {
                for _ in 0..n {
                    let v = self.value(et, keep_items)?;
                    if keep_items {
                        items.push(v);
                    }
                }
            }
        }
        Ok(Value::Array { len: n, items })
    }
}

impl GgufHeader {
    /// Reads and checks the header of `path`: magic, version, every metadata entry and tensor
    /// entry, known tensor types, and that the tensor data fits in the file.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let shown = path.display();
        let file = File::open(path).map_err(|e| crate::Error::ModelUnreadable {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let file_size = file.metadata()?.len();
        let mut r = Reader {
            r: BufReader::with_capacity(1 << 20, file),
            pos: 0,
            file_size,
        };
        let not_gguf = || {
            crate::Error::NotGguf {
                path: path.to_path_buf(),
            }
            .into()
        };
        let magic = r.bytes(4).map_err(|_| not_gguf())?;
        if magic != b"GGUF" {
            return Err(not_gguf());
        }
        let truncated = |what: &str, e: anyhow::Error| {
            usage!("{shown} is truncated or corrupt ({what}: {e}); download it again")
        };
        let version = r.u32().map_err(|e| truncated("version", e))?;
        if !(2..=3).contains(&version) {
            return Err(usage!(
                "{shown} is GGUF version {version}; llama.cpp reads versions 2 and 3"
            ));
        }
        let n_tensors = r.u64().map_err(|e| truncated("tensor count", e))?;
        let n_kv = r.u64().map_err(|e| truncated("metadata count", e))?;
        // Each entry takes some bytes of the file: counts the rest of it cannot hold are
        // refused before anything is read or reserved for them.
        let left = file_size - r.pos;
        let needed = u128::from(n_tensors) * u128::from(MIN_TENSOR_BYTES)
            + u128::from(n_kv) * u128::from(MIN_KV_BYTES);
        if n_tensors > 1 << 24 || n_kv > 1 << 24 || needed > u128::from(left) {
            return Err(truncated(
                "counts",
                anyhow::anyhow!(
                    "{n_tensors} tensors and {n_kv} keys, more than the {left} bytes after them hold"
                ),
            ));
        }
        let mut metadata = BTreeMap::new();
        let mut tokens = None;
        for _ in 0..n_kv {
            let key = r.name().map_err(|e| truncated("metadata", e))?;
            let ty = r.u32().map_err(|e| truncated("metadata", e))?;
            let shown_key = quoted(&key, 80);
            let v = if key == "tokenizer.ggml.tokens" && ty == 9 {
                let (v, list) = r
                    .token_list()
                    .map_err(|e| truncated(&format!("metadata {shown_key}"), e))?;
                tokens = Some(list);
                v
            } else {
                r.value(ty, true)
                    .map_err(|e| truncated(&format!("metadata {shown_key}"), e))?
            };
            metadata.insert(key, v);
        }
        // Grown entry by entry, never sized from the count: each entry is read from the file
        // before it takes memory.
        let mut tensors = Vec::new();
        for _ in 0..n_tensors {
            let name = r.name().map_err(|e| truncated("tensor info", e))?;
            let nd = r.u32().map_err(|e| truncated("tensor info", e))?;
            if nd > 8 {
                return Err(truncated(
                    "tensor info",
                    anyhow::anyhow!("{} has {nd} dimensions", quoted(&name, 80)),
                ));
            }
            let dims = (0..nd)
                .map(|_| r.u64())
                .collect::<anyhow::Result<Vec<_>>>()
                .map_err(|e| truncated("tensor info", e))?;
            let ggml_type = r.u32().map_err(|e| truncated("tensor info", e))?;
            let offset = r.u64().map_err(|e| truncated("tensor info", e))?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32)
            .max(1);
        let data_offset = r
            .pos
            .div_ceil(alignment)
            .checked_mul(alignment)
            .ok_or_else(|| {
                usage!("{shown} is corrupt: general.alignment {alignment} puts its tensor data past any file; download it again")
            })?;
        let header = GgufHeader {
            version,
            metadata,
            tensors,
            data_offset,
            file_size,
            tokens,
        };
        let mut end = data_offset;
        for t in &header.tensors {
            let (_, blck, size) = ggml_type(t.ggml_type).ok_or_else(|| {
                usage!(
                    "{shown}: tensor {} has ggml type {} that this logitprobe does not know; update logitprobe or requantize the model",
                    quoted(&t.name, 80),
                    t.ggml_type
                )
            })?;
            let t_end = t
                .checked_elements()
                .and_then(|n| n.div_ceil(blck).checked_mul(size))
                .and_then(|bytes| data_offset.checked_add(t.offset)?.checked_add(bytes))
                .ok_or_else(|| {
                    usage!(
                        "{shown} is corrupt: tensor {} (dimensions {:?}, offset {}) ends past any file; download it again",
                        quoted(&t.name, 80),
                        t.dims,
                        t.offset
                    )
                })?;
            end = end.max(t_end);
        }
        if end > file_size {
            return Err(usage!(
                "{shown} is truncated: its tensors need {end} bytes but the file has {file_size}; download it again"
            ));
        }
        Ok(header)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// Refuses what llama.cpp asserts on (an abort of the whole process, which no caller can
    /// catch) rather than reports: a layer count outside 1..=512, an alignment that is not a
    /// power of two of at least 8, a context length beyond 2^31 - 1, a norm epsilon that is
    /// not a positive number, and a vocabulary with a non-UTF-8 or repeated token, no
    /// tokenizer, or a SentencePiece tokenizer without its byte tokens.
    pub fn check_for_llama_cpp(&self, arch: &str) -> Result<(), String> {
        let key = |k: &str| format!("{arch}.{k}");
        if let Some(v) = self.get(&key("block_count")) {
            match v.as_u64() {
                Some(n) if (1..=512).contains(&n) => {}
                _ => {
                    return Err(format!(
                        "{arch}.block_count is {}, outside the 1 to 512 layers llama.cpp holds",
                        shown_value(v)
                    ))
                }
            }
        }
        if let Some(v) = self.get("general.alignment") {
            match v.as_u64() {
                Some(a) if a >= 8 && a.is_power_of_two() => {}
                _ => {
                    return Err(format!(
                        "general.alignment is {}, not a power of two of at least 8",
                        shown_value(v)
                    ))
                }
            }
        }
        if let Some(v) = self.get(&key("context_length")) {
            if v.as_u64().is_none_or(|n| n > i32::MAX as u64) {
                return Err(format!(
                    "{arch}.context_length is {}, beyond the 2^31 - 1 tokens llama.cpp counts",
                    shown_value(v)
                ));
            }
        }
        for k in [
            "attention.layer_norm_rms_epsilon",
            "attention.layer_norm_epsilon",
        ] {
            if let Some(v) = self.get(&key(k)) {
                if !v.as_f64().is_some_and(|e| e.is_finite() && e > 0.0) {
                    return Err(format!(
                        "{arch}.{k} is {}, not a positive number",
                        shown_value(v)
                    ));
                }
            }
        }
        let model = self.get("tokenizer.ggml.model").and_then(Value::as_str);
        if matches!(model, Some("none") | Some("no_vocab")) {
            return Err(format!(
                "tokenizer.ggml.model is {:?}: the file has no tokenizer, and logitprobe needs one",
                model.unwrap_or("")
            ));
        }
        if let Some(t) = &self.tokens {
            if let Some(id) = t.not_utf8 {
                return Err(format!("token {id} of tokenizer.ggml.tokens is not UTF-8"));
            }
            if let Some((id, first)) = t.duplicate {
                return Err(format!(
                    "token {id} of tokenizer.ggml.tokens repeats token {first}"
                ));
            }
            if model == Some("llama") && !t.has_newline_byte {
                return Err(
                    "tokenizer.ggml.model is \"llama\" (SentencePiece) but the vocabulary lacks its byte tokens (<0x0A>): a BPE vocabulary needs \"gpt2\"".into(),
                );
            }
        }
        Ok(())
    }

    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }

    /// Parameter count per tensor type, and the weighted bits per weight.
    pub fn tensor_types(&self) -> TensorTypes {
        let mut by_type: BTreeMap<String, TypeCount> = BTreeMap::new();
        let (mut bits, mut params) = (0f64, 0u64);
        for t in &self.tensors {
            let (name, blck, size) = ggml_type(t.ggml_type).unwrap_or(("?", 1, 0));
            let n = t.n_elements();
            let e = by_type.entry(name.to_string()).or_default();
            e.tensors += 1;
            // Tensors may overlap in the file, so their counts can add up past u64.
            e.params = e.params.saturating_add(n);
            bits += n.div_ceil(blck) as f64 * (size * 8) as f64;
            params = params.saturating_add(n);
        }
        TensorTypes {
            by_type,
            params,
            bits_per_weight: if params > 0 {
                bits / params as f64
            } else {
                0.0
            },
        }
    }
}

/// A metadata value for an error message.
fn shown_value(v: &Value) -> String {
    match v {
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Str(s) => format!("\"{}\"", quoted(s, 80)),
        Value::Array { len, .. } => format!("an array of {len}"),
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeCount {
    pub tensors: usize,
    pub params: u64,
}

/// What a model's weights are stored as.
#[derive(Debug, Clone, Serialize)]
pub struct TensorTypes {
    pub by_type: BTreeMap<String, TypeCount>,
    pub params: u64,
    pub bits_per_weight: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 file: the counts, then `body` (metadata and tensor entries, as bytes).
    fn gguf(n_tensors: u64, n_kv: u64, body: &[u8]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(n_tensors.to_le_bytes());
        b.extend(n_kv.to_le_bytes());
        b.extend(body);
        b
    }

    /// A metadata entry whose value is an array of `n` elements of type `et`, followed by
    /// `items` (what the file really holds).
    fn array_kv(key: &str, et: u32, n: u64, items: &[u8]) -> Vec<u8> {
        let mut b = (key.len() as u64).to_le_bytes().to_vec();
        b.extend(key.as_bytes());
        b.extend(9u32.to_le_bytes());
        b.extend(et.to_le_bytes());
        b.extend(n.to_le_bytes());
        b.extend(items);
        b
    }

    /// A tensor entry.
    fn tensor(name: &str, dims: &[u64], ggml_type: u32, offset: u64) -> Vec<u8> {
        let mut b = (name.len() as u64).to_le_bytes().to_vec();
        b.extend(name.as_bytes());
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ggml_type.to_le_bytes());
        b.extend(offset.to_le_bytes());
        b
    }

    /// `GgufHeader::read`'s error for `bytes`, which must be refused.
    fn refused(name: &str, bytes: &[u8]) -> String {
        let path =
            std::env::temp_dir().join(format!("gguf-bomb-{}-{name}.gguf", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let r = GgufHeader::read(&path);
        std::fs::remove_file(&path).unwrap();
        match r {
            Ok(h) => panic!("{name} was read: {:?}", h.metadata),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn array_lengths_that_wrap_around_are_refused() {
        // 4 bytes × 2^62 and 8 bytes × 2^61 are 2^64: a wrapping product skips nothing.
        for (et, n) in [
            (4u32, 1u64 << 62),
            (10, 1 << 61),
            (6, 1 << 62),
            (0, 1 << 60),
        ] {
            let e = refused(
                &format!("array-{et}"),
                &gguf(0, 1, &array_kv("a", et, n, &[])),
            );
            assert!(
                e.contains(&format!("an array of {n} elements")),
                "type {et}: {e}"
            );
        }
        // A byte count next to 2^64: the end position wraps past the file's size.
        let e = refused(
            "array-end",
            &gguf(0, 1, &array_kv("a", 0, u64::MAX - 3, &[])),
        );
        assert!(
            e.contains("an array of 18446744073709551612 elements"),
            "{e}"
        );
        // A string array's count is bounded by its 8-byte lengths.
        let e = refused("strings", &gguf(0, 1, &array_kv("a", 8, 1 << 40, &[0; 16])));
        assert!(e.contains("an array of 1099511627776 elements"), "{e}");
        let e = refused(
            "tokens",
            &gguf(
                0,
                1,
                &array_kv("tokenizer.ggml.tokens", 8, 1 << 40, &[0; 16]),
            ),
        );
        assert!(e.contains("a token list of 1099511627776 elements"), "{e}");
    }

    #[test]
    fn counts_the_file_cannot_hold_are_refused_before_reading() {
        // 2^24 tensors passed the old bound and reserved a gigabyte for their entries.
        let e = refused("tensors", &gguf(1 << 24, 0, &[]));
        assert!(
            e.contains("16777216 tensors and 0 keys, more than the 0 bytes after them hold"),
            "{e}"
        );
        let e = refused("keys", &gguf(0, 1_000_000, &[0; 64]));
        assert!(
            e.contains("0 tensors and 1000000 keys, more than the 64 bytes after them hold"),
            "{e}"
        );
        let e = refused("both", &gguf(u64::MAX, u64::MAX, &[]));
        assert!(e.contains("tensors and"), "{e}");
    }

    #[test]
    fn arrays_of_arrays_are_refused_without_recursing() {
        // Each level is 12 bytes; a million of them overflowed the stack of a recursive read.
        let mut nested = Vec::new();
        for _ in 0..1_000_000 {
            nested.extend(9u32.to_le_bytes());
            nested.extend(1u64.to_le_bytes());
        }
        let e = refused("nested", &gguf(0, 1, &array_kv("a", 9, 1, &nested)));
        assert!(e.contains("an array of arrays"), "{e}");
    }

    #[test]
    fn tensor_sizes_past_any_file_are_refused() {
        let data_at = |body: &[u8]| (24 + body.len()).div_ceil(32) * 32;
        for (name, t) in [
            // 2^32 × 2^32 × 2 elements wrap to 0.
            ("dims", tensor("w", &[1 << 32, 1 << 32, 2], 0, 0)),
            // 2^62 F32 elements are 2^64 bytes.
            ("bytes", tensor("w", &[1 << 62], 0, 0)),
            // An offset that wraps the end around to the data start.
            ("offset", tensor("w", &[8], 0, u64::MAX - 7)),
        ] {
            let mut b = gguf(1, 0, &t);
            b.resize(data_at(&t) + 64, 0);
            let e = refused(name, &b);
            assert!(
                e.contains("tensor w (dimensions") && e.contains("ends past any file"),
                "{name}: {e}"
            );
        }
    }
}
