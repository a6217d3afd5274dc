//! A Hugging Face model folder: `tokenizer.json` and the JSON files beside it
//! (`config.json`, `generation_config.json`, `tokenizer_config.json`, `genai_config.json`,
//! `chat_template.jinja`). Gives the tokenizer, BOS / EOS / end-of-generation ids, the BOS
//! rule, the chat template, the context length and token bytes, for any engine that runs
//! such a folder (ONNX Runtime today).

use crate::{usage, TokenId};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A model folder's tokenizer and configuration.
pub struct HfFolder {
    pub dir: PathBuf,
    tokenizer: tokenizers::Tokenizer,
    /// The same tokenizer with special-token text encoded as plain text.
    tokenizer_plain: tokenizers::Tokenizer,
    byte_level: bool,
    special: Vec<bool>,
    /// `get_vocab_size` builds the whole vocabulary map on every call: counted once.
    n_vocab: usize,
    pub config: Value,
    pub genai: Value,
    pub bos: Option<TokenId>,
    pub eos: Option<TokenId>,
    /// Every id that ends a generation, sorted.
    pub eog: Vec<TokenId>,
    /// Whether a plain prompt starts with BOS under the model's own rules.
    pub add_bos: bool,
    pub chat_template: Option<String>,
    /// The model's context length (`max_position_embeddings`, else genai's `context_length`).
    pub n_ctx_model: Option<usize>,
}

impl HfFolder {
    /// Reads the folder's tokenizer and configuration files.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let bad_tokenizer = |e: &dyn std::fmt::Display| {
            usage!(
                "cannot read {}: {e}; an ONNX model folder needs the tokenizer.json of its model",
                tok_path.display()
            )
        };
        let bytes = read_bounded(&tok_path).map_err(|e| bad_tokenizer(&e))?;
        let text = String::from_utf8(bytes).map_err(|e| bad_tokenizer(&e.utf8_error()))?;
        // tokenizers 0.22 panics (an `expect` in its decoder's deserializer) on JSON cut short
        // inside "decoder": the syntax is checked first, without building anything, and so is
        // the depth, before tokenizers sees it.
        serde_json::from_str::<Skipped>(&text).map_err(|e| bad_tokenizer(&e))?;
        let tokenizer: tokenizers::Tokenizer = text.parse().map_err(|e| bad_tokenizer(&e))?;
        let mut tokenizer_plain = tokenizer.clone();
        tokenizer_plain.set_encode_special_tokens(true);
        let config = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
        let gen_config = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let genai = read_json(&dir.join("genai_config.json"))?.unwrap_or(Value::Null);
        let tok_config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);

        let token_id = |t: Option<String>| t.and_then(|t| tokenizer.token_to_id(&t));
        let config_bos = ids_of(config.get("bos_token_id"), "config.json bos_token_id")?;
        let config_eos = ids_of(config.get("eos_token_id"), "config.json eos_token_id")?;
        let bos = token_id(token_text(tok_config.get("bos_token")))
            .or_else(|| config_bos.first().copied());
        let eos = token_id(token_text(tok_config.get("eos_token")))
            .or_else(|| config_eos.first().copied());
        let mut eog: Vec<TokenId> = ids_of(
            gen_config.get("eos_token_id"),
            "generation_config.json eos_token_id",
        )?;
        eog.extend(config_eos);
        eog.extend(ids_of(
            genai.pointer("/model/eos_token_id"),
            "genai_config.json eos_token_id",
        )?);
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
            _ => read_optional(&dir.join("chat_template.jinja"))?
                .map(|b| String::from_utf8_lossy(&b).into_owned()),
        };
        let n_ctx_model = config
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .or_else(|| {
                genai
                    .pointer("/model/context_length")
                    .and_then(Value::as_u64)
            })
            .map(|n| n as usize);
        let byte_level = tokenizer
            .get_decoder()
            .and_then(|d| serde_json::to_value(d).ok())
            .is_some_and(|v| v.get("type").and_then(Value::as_str) == Some("ByteLevel"));
        let mut special = vec![false; tokenizer.get_vocab_size(true)];
        for (id, t) in tokenizer.get_added_tokens_decoder() {
            if t.special && (id as usize) < special.len() {
                special[id as usize] = true;
            }
        }
        Ok(HfFolder {
            dir: dir.to_path_buf(),
            n_vocab: tokenizer.get_vocab_size(true),
            tokenizer,
            tokenizer_plain,
            byte_level,
            special,
            config,
            genai,
            bos,
            eos,
            eog,
            add_bos,
            chat_template,
            n_ctx_model,
        })
    }

    /// Number of ids the tokenizer defines (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.n_vocab
    }

    /// A config value by JSON pointer, looked for in `genai_config.json`, then `config.json`.
    pub fn size(&self, genai_pointer: &str, config_keys: &[&str]) -> Option<usize> {
        self.genai
            .pointer(genai_pointer)
            .and_then(Value::as_u64)
            .or_else(|| {
                config_keys
                    .iter()
                    .find_map(|k| self.config.get(k).and_then(Value::as_u64))
            })
            .map(|v| v as usize)
    }

    /// Token ids of `text` (see [`crate::LogitSource::tokenize`]).
    pub fn tokenize(
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
            if let Some(b) = self.bos {
                ids.insert(0, b);
            }
        }
        Ok(ids)
    }

    /// The bytes of one token: byte-level BPE pieces through GPT-2's table, SentencePiece
    /// pieces with `▁` as a space and `<0xNN>` as a raw byte, special tokens as their text.
    pub fn token_bytes(&self, id: TokenId) -> Option<Vec<u8>> {
        if id as usize >= self.vocab_size() {
            return None;
        }
        let piece = self.tokenizer.id_to_token(id)?;
        if self.is_special(id) {
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
        if let Some(hex) = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                return Some(vec![b]);
            }
        }
        Some(piece.replace('\u{2581}', " ").into_bytes())
    }

    pub fn is_special(&self, id: TokenId) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }
}

/// A configuration file of the folder: `None` when there is none; an error when it is not a
/// UTF-8 JSON object (a broken file is never taken as an absent one).
fn read_json(path: &Path) -> anyhow::Result<Option<Value>> {
    let Some(bytes) = read_optional(path)? else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        usage!(
            "{} is not UTF-8 ({e}); restore the file from the model's repository",
            path.display()
        )
    })?;
    let v: Value = serde_json::from_str(text)
        .map_err(|e| usage!("{} is not valid JSON: {e}", path.display()))?;
    if !v.is_object() {
        return Err(usage!(
            "{} is JSON but not an object ({}); restore the file from the model's repository",
            path.display(),
            match v {
                Value::Array(_) => "an array",
                Value::Null => "null",
                Value::String(_) => "a string",
                Value::Number(_) => "a number",
                _ => "a boolean",
            }
        ));
    }
    Ok(Some(v))
}

/// A JSON value, read and dropped. serde_json skips a `serde::de::IgnoredAny` without
/// counting its depth; this one nests through `deserialize_any`, so serde_json's recursion
/// limit (128 levels) refuses a file nested deeper.
struct Skipped;

impl<'de> serde::Deserialize<'de> for Skipped {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SkippedVisitor)
    }
}

struct SkippedVisitor;

impl<'de> serde::de::Visitor<'de> for SkippedVisitor {
    type Value = Skipped;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Skipped, E> {
        Ok(Skipped)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Skipped, E> {
        Ok(Skipped)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Skipped, E> {
        Ok(Skipped)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Skipped, E> {
        Ok(Skipped)
    }
    fn visit_str<E>(self, _: &str) -> Result<Skipped, E> {
        Ok(Skipped)
    }
    fn visit_unit<E>(self) -> Result<Skipped, E> {
        Ok(Skipped)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Skipped, A::Error> {
        while seq.next_element::<Skipped>()?.is_some() {}
        Ok(Skipped)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Skipped, A::Error> {
        while map.next_entry::<Skipped, Skipped>()?.is_some() {}
        Ok(Skipped)
    }
}

/// The most a file of the folder may hold. The largest real `tokenizer.json`s are about
/// 35 MB (Gemma 3's 262k-token vocabulary); parsing one takes some ten times its size in
/// memory, so 128 MiB keeps any real folder and stops a hostile one at a few gigabytes.
const MAX_FILE_BYTES: u64 = 128 << 20;

/// Why a file of the folder was not read.
#[derive(Debug)]
enum Unreadable {
    Io(std::io::Error),
    /// A FIFO blocks the read and a device never ends it.
    NotAFile,
    /// Its size, or `None` when it grew past the bound while read.
    TooLarge(Option<u64>),
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unreadable::Io(e) => write!(f, "{e}"),
            Unreadable::NotAFile => f.write_str("it is not a regular file"),
            Unreadable::TooLarge(size) => write!(
                f,
                "it holds {}, more than the {} a model folder's file may hold",
                size.map_or("more".into(), crate::human_bytes),
                crate::human_bytes(MAX_FILE_BYTES)
            ),
        }
    }
}

/// The bytes of a file of the folder, at most [`MAX_FILE_BYTES`]: its size is checked before
/// reading, and the read stops past the bound for a file that grows meanwhile.
fn read_bounded(path: &Path) -> Result<Vec<u8>, Unreadable> {
    let meta = std::fs::metadata(path).map_err(Unreadable::Io)?;
    if !meta.is_file() {
        return Err(Unreadable::NotAFile);
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(Unreadable::TooLarge(Some(meta.len())));
    }
    let file = std::fs::File::open(path).map_err(Unreadable::Io)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, MAX_FILE_BYTES + 1),
        &mut bytes,
    )
    .map_err(Unreadable::Io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Unreadable::TooLarge(None));
    }
    Ok(bytes)
}

/// A file of the folder beside the tokenizer: `None` when there is none.
fn read_optional(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    match read_bounded(path) {
        Ok(b) => Ok(Some(b)),
        Err(Unreadable::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e @ Unreadable::Io(_)) => Err(usage!("cannot read {}: {e}", path.display())),
        Err(e) => Err(usage!(
            "cannot read {}: {e}; restore the file from the model's repository",
            path.display()
        )),
    }
}

/// Token ids of a config entry (a number or a list); an id no token id can hold (above
/// u32, negative) is an error rather than wrapped around to another token.
fn ids_of(v: Option<&Value>, what: &str) -> anyhow::Result<Vec<TokenId>> {
    let one = |x: &Value| -> anyhow::Result<Option<TokenId>> {
        match x {
            Value::Number(n) => match n.as_u64().and_then(|n| TokenId::try_from(n).ok()) {
                Some(id) => Ok(Some(id)),
                None => Err(usage!(
                    "{what} {n} is not a token id (0 to {}); fix the model's configuration",
                    TokenId::MAX
                )),
            },
            _ => Ok(None),
        }
    };
    match v {
        Some(Value::Array(a)) => Ok(a
            .iter()
            .map(one)
            .collect::<anyhow::Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect()),
        Some(x) => Ok(one(x)?.into_iter().collect()),
        None => Ok(Vec::new()),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder of its own under the temp dir, removed when dropped.
    struct Folder(PathBuf);

    impl Folder {
        fn new(name: &str) -> Folder {
            let p = std::env::temp_dir().join(format!("hf-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Folder(p)
        }
    }

    impl Drop for Folder {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn refused(dir: &Path) -> String {
        match HfFolder::open(dir) {
            Ok(_) => panic!("{} was opened", dir.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn files_past_the_bound_are_refused_unread() {
        // Sparse: a gigabyte on paper, nothing on disk; reading it took a gigabyte of memory.
        let f = Folder::new("big");
        let tok = f.0.join("tokenizer.json");
        std::fs::File::create(&tok)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let e = refused(&f.0);
        assert!(
            e.contains("tokenizer.json: it holds 1.0 GiB, more than the 128 MiB a model folder's file may hold"),
            "{e}"
        );
        std::fs::write(
            &tok,
            r#"{"model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}"#,
        )
        .unwrap();
        std::fs::File::create(f.0.join("config.json"))
            .unwrap()
            .set_len(200 << 20)
            .unwrap();
        let e = refused(&f.0);
        assert!(
            e.contains("config.json: it holds 200 MiB, more than the 128 MiB")
                && e.contains("restore the file"),
            "{e}"
        );
    }

    #[test]
    fn a_device_in_place_of_a_file_is_refused() {
        // /dev/zero never ends: an unbounded read grew until memory ran out.
        let f = Folder::new("device");
        std::os::unix::fs::symlink("/dev/zero", f.0.join("tokenizer.json")).unwrap();
        let e = refused(&f.0);
        assert!(
            e.contains("tokenizer.json: it is not a regular file"),
            "{e}"
        );
    }

    #[test]
    fn json_nested_past_serde_jsons_limit_is_refused() {
        let f = Folder::new("nested");
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        std::fs::write(f.0.join("tokenizer.json"), &deep).unwrap();
        let e = refused(&f.0);
        assert!(e.contains("recursion limit exceeded"), "{e}");
        std::fs::write(
            f.0.join("tokenizer.json"),
            r#"{"model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}"#,
        )
        .unwrap();
        std::fs::write(f.0.join("config.json"), format!("{{\"a\": {deep}}}")).unwrap();
        let e = refused(&f.0);
        assert!(e.contains("recursion limit exceeded"), "{e}");
    }
}
