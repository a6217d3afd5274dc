//! The mutation suite (issue 15): seeded generators of broken inputs (GGUF files, ONNX
//! folders, trace and compare.json files, configs and prompts files, parameter sets) and of
//! hostile ones (issue 32: GGUF header bombs, chat templates that loop or grow without end,
//! weights kept outside the model's folder), each run through the real binary with a time
//! limit, the hostile ones under a cap on memory too. Every case must end as a valid output
//! or a one-line error with exit 1 or 2: never a signal, a panic, a hang, an invalid output,
//! or a final file left looking complete beside an error.
//!
//! `MUTATION_SEED` picks the seed (printed either way) and `MUTATION_CASES` the number of
//! cases (2,000 by default); `scripts/fuzz --minutes N` runs it with fresh seeds until the
//! time is up.

mod common;
#[path = "common/onnx_data.rs"]
mod onnx_data;

use common::gguf::{array_value, nested_array_value, raw_header, Gguf, Val};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One generated case: the command line, and the files it reads, in its own folder.
struct Case {
    category: &'static str,
    what: String,
    args: Vec<String>,
    /// The folder a successful run writes (checked when the run succeeds).
    out: PathBuf,
    /// What a successful run's main output is.
    check: Check,
    /// Whether the run's address space is capped at [`MEMORY_CAP`]: the hostile categories,
    /// whose files ask for more memory than any real model needs.
    capped: bool,
    /// A signal sent this long after the start (SIGINT or SIGTERM, as Ctrl-C, `kill`, a
    /// job's time limit would).
    signal: Option<(i32, Duration)>,
}

impl Case {
    fn new(
        category: &'static str,
        what: String,
        args: Vec<String>,
        out: PathBuf,
        check: Check,
    ) -> Case {
        Case {
            category,
            what,
            args,
            out,
            check,
            capped: false,
            signal: None,
        }
    }

    /// Run under [`MEMORY_CAP`].
    fn capped(self) -> Case {
        Case {
            capped: true,
            ..self
        }
    }

    /// Sent `signal` while it runs.
    fn signalled(self, signal: (i32, Duration)) -> Case {
        Case {
            signal: Some(signal),
            ..self
        }
    }
}

/// The address space a capped case may take (the tiny models run in 256 MiB).
const MEMORY_CAP: u64 = 1 << 30;

#[derive(Clone, Copy)]
enum Check {
    /// A trace folder: adaptive_token_trace.json valid against Token Heatmap's schema.
    Trace,
    /// `report`: the PNGs and report.html are there.
    Report,
    /// `inspect`: anything printed.
    Inspect,
}

fn tiny_gguf() -> Vec<u8> {
    fs::read(common::tiny("tiny-q8_0.gguf")).unwrap()
}

/// Byte offsets of a GGUF's regions: after the counts, after each metadata entry, after each
/// tensor entry, the data start.
fn gguf_boundaries(b: &[u8]) -> Vec<usize> {
    let mut p = 24usize;
    let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap()) as usize;
    let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap()) as usize;
    let n_tensors = u64_at(8);
    let n_kv = u64_at(16);
    let mut out = vec![4, 8, 16, 24];
    fn skip_val(b: &[u8], p: &mut usize, ty: usize) {
        let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap()) as usize;
        let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap()) as usize;
        match ty {
            0 | 1 | 7 => *p += 1,
            2 | 3 => *p += 2,
            4..=6 => *p += 4,
            10..=12 => *p += 8,
            8 => *p += 8 + u64_at(*p),
            9 => {
                let et = u32_at(*p);
                let n = u64_at(*p + 4);
                *p += 12;
                for _ in 0..n {
                    skip_val(b, p, et);
                }
            }
            _ => unreachable!(),
        }
    }
    for _ in 0..n_kv {
        p += 8 + u64_at(p);
        let ty = u32_at(p);
        p += 4;
        skip_val(b, &mut p, ty);
        out.push(p);
    }
    for _ in 0..n_tensors {
        p += 8 + u64_at(p);
        let nd = u32_at(p);
        p += 4 + 8 * nd + 4 + 8;
        out.push(p);
    }
    out.push(p.div_ceil(32) * 32);
    out
}

/// Positions of GGUF string lengths and array counts (u64 fields) in the header.
fn gguf_length_fields(b: &[u8]) -> Vec<usize> {
    let bounds = gguf_boundaries(b);
    // Each metadata entry and tensor entry starts with its name's length.
    let mut v: Vec<usize> = bounds[3..bounds.len() - 1].to_vec();
    v.push(8);
    v.push(16);
    v
}

fn gguf_case(rng: &mut ChaCha8Rng, dir: &Path) -> (String, PathBuf) {
    let base = tiny_gguf();
    let bounds = gguf_boundaries(&base);
    let header_end = *bounds.last().unwrap();
    let path = dir.join("m.gguf");
    let kind = rng.random_range(0..9);
    let what;
    let bytes: Vec<u8> = match kind {
        0 => {
            let at = bounds[rng.random_range(0..bounds.len())];
            let at = (at + rng.random_range(0..3)).min(base.len());
            what = format!("truncated at region boundary {at}");
            base[..at].to_vec()
        }
        1 => {
            let at = rng.random_range(0..base.len());
            what = format!("truncated at {at}");
            base[..at].to_vec()
        }
        2 => {
            let mut b = base.clone();
            let n = rng.random_range(1..8);
            let mut at = Vec::new();
            for _ in 0..n {
                let i = rng.random_range(4..header_end);
                b[i] ^= 1 << rng.random_range(0..8);
                at.push(i);
            }
            what = format!("header bits flipped at {at:?}");
            b
        }
        3 => {
            let mut b = base.clone();
            let fields = gguf_length_fields(&b);
            let at = fields[rng.random_range(0..fields.len())];
            let v: u64 = match rng.random_range(0..4) {
                0 => u64::MAX,
                1 => 1 << 40,
                2 => rng.random::<u32>() as u64,
                _ => rng.random(),
            };
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            what = format!("length or count at {at} set to {v}");
            b
        }
        _ => {
            // Typed metadata mutations through the rewriter.
            let mut g = Gguf::read(&common::tiny("tiny-q8_0.gguf"));
            let arch = g.architecture();
            let keys = [
                format!("{arch}.block_count"),
                format!("{arch}.context_length"),
                format!("{arch}.embedding_length"),
                format!("{arch}.attention.head_count"),
                format!("{arch}.attention.head_count_kv"),
                format!("{arch}.attention.layer_norm_rms_epsilon"),
                format!("{arch}.rope.freq_base"),
                format!("{arch}.vocab_size"),
                "general.alignment".to_string(),
                "general.architecture".to_string(),
                "tokenizer.ggml.model".to_string(),
                "tokenizer.ggml.bos_token_id".to_string(),
                "tokenizer.ggml.eos_token_id".to_string(),
                "tokenizer.chat_template".to_string(),
            ];
            let key = keys[rng.random_range(0..keys.len())].clone();
            let v = match rng.random_range(0..9) {
                0 => Val::U32(0),
                1 => Val::U32(u32::MAX),
                2 => Val::U32(rng.random_range(0..2048)),
                3 => Val::F32([-1.0, f32::NAN, f32::INFINITY, 0.0, 1e-30][rng.random_range(0..5)]),
                4 => Val::U64(rng.random()),
                5 => Val::Str(
                    ["none", "llama", "gpt2", "bert", "", "\u{0}", "{% for %}"]
                        [rng.random_range(0..7)]
                    .as_bytes()
                    .to_vec(),
                ),
                6 => Val::Str((0..rng.random_range(0..64)).map(|_| rng.random()).collect()),
                7 => Val::Bool(true),
                _ => Val::I32(-rng.random_range(1..1000)),
            };
            what = format!("{key} = {v:?}");
            if rng.random_bool(0.15) {
                // A vocabulary mutation as well.
                let t = g.tokens_mut();
                let n = t.len();
                let i = rng.random_range(1..n);
                match rng.random_range(0..3) {
                    0 => t[i] = t[i - 1].clone(),
                    1 => t[i] = Val::Str(vec![0xff]),
                    _ => t.truncate(rng.random_range(0..n)),
                }
            }
            g.set(&key, v);
            g.write(&path);
            return (what, path);
        }
    };
    fs::write(&path, bytes).unwrap();
    (what, path)
}

/// A copy of the tiny optimum export with one thing broken.
fn onnx_case(rng: &mut ChaCha8Rng, dir: &Path) -> (String, PathBuf) {
    let src = common::tiny(if rng.random_bool(0.5) {
        "optimum"
    } else {
        "genai"
    });
    let dst = dir.join("model");
    fs::create_dir_all(&dst).unwrap();
    for e in fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let model = dst.join("model.onnx");
    let names = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "genai_config.json",
    ];
    let what = match rng.random_range(0..7) {
        0 => {
            let b = fs::read(&model).unwrap();
            let at = rng.random_range(0..b.len());
            fs::write(&model, &b[..at]).unwrap();
            format!("model.onnx truncated at {at}")
        }
        1 => {
            let mut b = fs::read(&model).unwrap();
            let n = rng.random_range(1..16);
            for _ in 0..n {
                let i = rng.random_range(0..b.len().min(4096));
                b[i] = rng.random();
            }
            fs::write(&model, b).unwrap();
            format!("{n} bytes of model.onnx's first 4 KiB changed")
        }
        2 => {
            // Rename an input or output in place (same length, so the protobuf stays valid).
            let swaps: [(&[u8], &[u8]); 6] = [
                (b"input_ids", b"input_idz"),
                (b"attention_mask", b"attention_masq"),
                (b"position_ids", b"position_idz"),
                (b"logits", b"logitz"),
                (b"present", b"presenz"),
                (b"past_key_values", b"past_key_valuez"),
            ];
            let (from, to) = swaps[rng.random_range(0..swaps.len())];
            let mut b = fs::read(&model).unwrap();
            let mut i = 0;
            let every = rng.random_bool(0.5);
            let mut n = 0;
            while i + from.len() <= b.len() {
                if &b[i..i + from.len()] == from {
                    b[i..i + from.len()].copy_from_slice(to);
                    n += 1;
                    if !every {
                        break;
                    }
                }
                i += 1;
            }
            fs::write(&model, b).unwrap();
            format!("{} renamed ({n} places)", String::from_utf8_lossy(from))
        }
        3 => {
            let f = names[rng.random_range(0..names.len())];
            let _ = fs::remove_file(dst.join(f));
            format!("{f} removed")
        }
        4 => {
            let f = names[rng.random_range(0..names.len())];
            let p = dst.join(f);
            let content: Vec<u8> = match rng.random_range(0..6) {
                0 => b"[]".to_vec(),
                1 => b"\xff\xfe not utf-8".to_vec(),
                2 => b"{\"eos_token_id\": 4294967303, \"bos_token_id\": -1}".to_vec(),
                3 => b"null".to_vec(),
                4 => {
                    let b = fs::read(&p).unwrap_or_default();
                    let at = rng.random_range(0..b.len().max(1));
                    b[..at.min(b.len())].to_vec()
                }
                _ => b"{\"vocab_size\": 0, \"max_position_embeddings\": 0, \"num_hidden_layers\": 99}"
                    .to_vec(),
            };
            fs::write(&p, &content).unwrap();
            format!(
                "{f} replaced by {:?}",
                String::from_utf8_lossy(&content[..content.len().min(40)])
            )
        }
        5 => {
            fs::remove_file(&model).unwrap();
            fs::write(dst.join("model.onnx"), b"").unwrap();
            "model.onnx empty".into()
        }
        _ => {
            // A JSON value of the right file but the wrong type at a key the engine reads.
            let p = dst.join("config.json");
            let mut v: Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
            let keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            let k = keys[rng.random_range(0..keys.len())].clone();
            let nv = [
                Value::Null,
                Value::from("x"),
                Value::from(-1),
                Value::from(1e300),
                Value::from(u64::MAX),
                serde_json::json!([1, 2]),
            ][rng.random_range(0..6)]
            .clone();
            v[&k] = nv.clone();
            fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
            format!("config.json {k} = {nv}")
        }
    };
    (what, dst)
}

/// The tiny GGUF with a header that claims more than the file holds: counts past its size,
/// arrays of 2^60 elements and more, arrays nested deep, tensors whose sizes or offsets pass
/// 2^64, an alignment past any file.
fn header_bomb_case(rng: &mut ChaCha8Rng, dir: &Path) -> (String, PathBuf) {
    let path = dir.join("m.gguf");
    let huge = |rng: &mut ChaCha8Rng| -> u64 {
        [1 << 24, 1 << 32, 1 << 60, 1 << 61, 1 << 62, u64::MAX][rng.random_range(0..6)]
            - rng.random_range(0..3)
    };
    let what = match rng.random_range(0..6) {
        0 => {
            let (n_tensors, n_kv) = (huge(rng), rng.random_range(0..3));
            fs::write(&path, raw_header(n_tensors, n_kv, &[0; 64])).unwrap();
            return (
                format!("{n_tensors} tensors, {n_kv} keys in 88 bytes"),
                path,
            );
        }
        1 => {
            let mut b = tiny_gguf();
            let at = [8, 16][rng.random_range(0..2)];
            let v = huge(rng);
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            fs::write(&path, b).unwrap();
            return (format!("count at {at} set to {v}"), path);
        }
        2 => {
            let et = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12][rng.random_range(0..12)];
            let n = huge(rng);
            let mut g = Gguf::read(&common::tiny("tiny-q8_0.gguf"));
            g.set("bomb.array", Val::Raw(9, array_value(et, n, &[0; 16])));
            g.write(&path);
            format!("an array of {n} elements of type {et}")
        }
        3 => {
            let depth = [2, 1000, 100_000, 1_000_000][rng.random_range(0..4)];
            let mut g = Gguf::read(&common::tiny("tiny-q8_0.gguf"));
            g.set("bomb.nested", Val::Raw(9, nested_array_value(depth)));
            g.write(&path);
            format!("arrays nested {depth} deep")
        }
        4 => {
            let mut b = tiny_gguf();
            let (dims, offset) = gguf_tensor_fields(&b)[0].clone();
            let (at, v) = if rng.random_bool(0.5) {
                (dims[rng.random_range(0..dims.len())], huge(rng))
            } else {
                (offset, u64::MAX - rng.random_range(0..4096))
            };
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            fs::write(&path, b).unwrap();
            format!("first tensor's field at {at} set to {v}")
        }
        _ => {
            let v = huge(rng);
            let mut g = Gguf::read(&common::tiny("tiny-q8_0.gguf"));
            g.set("general.alignment", Val::U64(v));
            g.write(&path);
            format!("general.alignment = {v}")
        }
    };
    (what, path)
}

/// Where each tensor entry of a GGUF keeps its dimensions and its offset (u64 fields).
fn gguf_tensor_fields(b: &[u8]) -> Vec<(Vec<usize>, usize)> {
    let bounds = gguf_boundaries(b);
    let n_kv = u64::from_le_bytes(b[16..24].try_into().unwrap()) as usize;
    let entries = &bounds[3 + n_kv..bounds.len() - 1];
    entries
        .windows(2)
        .map(|w| {
            let name_len = u64::from_le_bytes(b[w[0]..w[0] + 8].try_into().unwrap()) as usize;
            let nd_at = w[0] + 8 + name_len;
            let nd = u32::from_le_bytes(b[nd_at..nd_at + 4].try_into().unwrap()) as usize;
            let dims = (0..nd).map(|i| nd_at + 4 + 8 * i).collect();
            (dims, w[1] - 8)
        })
        .collect()
}

/// The tiny GGUF with a chat template that loops, recurses or grows without end, is too
/// large, nests too deep to parse, or is a real one.
fn template_case(rng: &mut ChaCha8Rng, dir: &Path) -> (String, PathBuf) {
    let n = |rng: &mut ChaCha8Rng| [10, 1000, 100_000][rng.random_range(0..3)];
    let template = match rng.random_range(0..8) {
        0 => format!(
            "{{% for i in range({}) %}}{{% for j in range({}) %}}{{{{ j }}}}{{% endfor %}}{{% endfor %}}",
            n(rng),
            n(rng)
        ),
        1 => "{% macro f(n) %}{{ f(n + 1) }}{{ f(n + 2) }}{% endmacro %}{{ f(0) }}".into(),
        2 => format!(
            "{{% set s = 'x' * {} %}}{{% for i in range({}) %}}{{{{ s }}}}{{% endfor %}}",
            [1, 1000, 10_000_000, 100_000_000][rng.random_range(0..4)],
            n(rng)
        ),
        3 => format!(
            "{{% for m in messages * {} %}}{{{{ m.content * {} }}}}{{% endfor %}}",
            n(rng),
            n(rng)
        ),
        4 => "{{ bos_token }}".repeat(rng.random_range(1..250_000)),
        5 => {
            let d = n(rng);
            format!("{{{{ {}1{} }}}}", "(".repeat(d), ")".repeat(d))
        }
        // A value doubled in a loop, never written out.
        6 => format!(
            "{{% set ns = namespace(s='x', l=['x']) %}}{{% for i in range({}) %}}{{% set ns.s = ns.s ~ ns.s %}}{{% set ns.l = ns.l + ns.l %}}{{% endfor %}}{{{{ ns.l|join|length }}}}",
            [4, 20, 40, 64][rng.random_range(0..4)]
        ),
        _ => "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            .into(),
    };
    let mut g = Gguf::read(&common::tiny("tiny-q8_0.gguf"));
    g.set(
        "tokenizer.chat_template",
        Val::Str(template.as_bytes().to_vec()),
    );
    let path = dir.join("m.gguf");
    g.write(&path);
    let shown: String = template.chars().take(120).collect();
    (format!("{} bytes: {shown}", template.len()), path)
}

/// A copy of a tiny ONNX export whose first weight lives in another file, named by a location
/// inside its folder or out of it (`..`, an absolute path, a link out), or none at all.
fn external_data_case(rng: &mut ChaCha8Rng, dir: &Path) -> (String, PathBuf) {
    let src = common::tiny(if rng.random_bool(0.5) {
        "optimum"
    } else {
        "genai"
    });
    let dst = dir.join("model");
    let outside = dir.join("outside.bin");
    let long = "a".repeat(5000);
    let locations = [
        "weights.bin",
        "sub/weights.bin",
        "../outside.bin",
        "sub/../../outside.bin",
        outside.to_str().unwrap(),
        "link.bin",
        "link-dir/outside.bin",
        "missing.bin",
        "",
        "/dev/zero",
        long.as_str(),
    ];
    let location = locations[rng.random_range(0..locations.len())];
    let (name, data) = onnx_data::copy_with_external(&src, &dst, location);
    // Every place a location may lead holds the data, so only the check stops a read.
    fs::write(&outside, &data).unwrap();
    fs::create_dir_all(dst.join("sub")).unwrap();
    for f in ["weights.bin", "sub/weights.bin"] {
        fs::write(dst.join(f), &data).unwrap();
    }
    std::os::unix::fs::symlink(&outside, dst.join("link.bin")).unwrap();
    std::os::unix::fs::symlink(dir, dst.join("link-dir")).unwrap();
    let shown: String = location.chars().take(60).collect();
    (format!("{name} kept in {shown:?}"), dst)
}

/// A JSON value changed at a random place: removed, retyped, extreme, or the file cut.
fn mutate_json(rng: &mut ChaCha8Rng, v: &mut Value, depth: usize) -> String {
    match v {
        Value::Object(m) if !m.is_empty() => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = keys[rng.random_range(0..keys.len())].clone();
            if depth > 0 && rng.random_bool(0.6) {
                let inner = mutate_json(rng, m.get_mut(&k).unwrap(), depth - 1);
                return format!("{k}.{inner}");
            }
            if rng.random_bool(0.3) {
                m.remove(&k);
                return format!("{k} removed");
            }
            let nv = extreme(rng);
            let shown = nv.to_string();
            m.insert(k.clone(), nv);
            format!("{k} = {}", &shown[..shown.len().min(40)])
        }
        Value::Array(a) if !a.is_empty() => {
            let i = rng.random_range(0..a.len());
            if depth > 0 && rng.random_bool(0.7) {
                let inner = mutate_json(rng, &mut a[i], depth - 1);
                return format!("[{i}].{inner}");
            }
            if rng.random_bool(0.5) {
                let n = a.len();
                // Many copies: a long array.
                let item = a[i].clone();
                a.extend(std::iter::repeat_n(item, rng.random_range(1..2000)));
                return format!("[{i}] repeated (was {n})");
            }
            a[i] = extreme(rng);
            format!("[{i}] = extreme")
        }
        _ => {
            *v = extreme(rng);
            "value = extreme".into()
        }
    }
}

fn extreme(rng: &mut ChaCha8Rng) -> Value {
    match rng.random_range(0..10) {
        0 => Value::Null,
        1 => Value::from(-1),
        2 => Value::from(u64::MAX),
        3 => Value::from(1e308),
        4 => Value::from(-1e308),
        5 => Value::from("x".repeat(rng.random_range(0..5000))),
        6 => serde_json::json!({}),
        7 => serde_json::json!([]),
        8 => Value::from(200000),
        _ => Value::from(true),
    }
}

/// A trace or compare.json of our own, made once per run, to mutate.
struct Seeds {
    trace: Value,
    compare: Value,
}

fn make_seeds(dir: &Path) -> Seeds {
    let t = dir.join("seed-trace");
    let o = common::run(&[
        "trace",
        "--backend",
        "test",
        "--model",
        "300:3",
        "--prompt",
        "seed",
        "--seed",
        "1",
        "--max-new-tokens",
        "12",
        "--no-plots",
        "--out",
        t.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let c = dir.join("seed-compare");
    let o = common::run(&[
        "compare",
        "--a",
        "test:300:1",
        "--b",
        "test:300:2",
        "--prompt",
        "seed",
        "--seed",
        "1",
        "--max-new-tokens",
        "12",
        "--out",
        c.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let read = |p: PathBuf| serde_json::from_slice(&fs::read(p).unwrap()).unwrap();
    Seeds {
        trace: read(t.join("adaptive_token_trace.json")),
        compare: read(c.join("compare.json")),
    }
}

fn report_case(
    rng: &mut ChaCha8Rng,
    dir: &Path,
    seeds: &Seeds,
    compare: bool,
) -> (String, PathBuf) {
    let mut v = if compare {
        seeds.compare.clone()
    } else {
        seeds.trace.clone()
    };
    let n = rng.random_range(1..4);
    let mut what = Vec::new();
    for _ in 0..n {
        what.push(mutate_json(rng, &mut v, 4));
    }
    let mut bytes = serde_json::to_vec(&v).unwrap();
    if rng.random_bool(0.1) {
        let at = rng.random_range(0..bytes.len());
        bytes.truncate(at);
        what.push(format!("cut at {at}"));
    }
    let p = dir.join(if compare {
        "compare.json"
    } else {
        "trace.json"
    });
    fs::write(&p, bytes).unwrap();
    (what.join("; "), p)
}

/// Random trace flags (on the test source or the tiny GGUF), some of them out of range.
fn params_case(rng: &mut ChaCha8Rng) -> (String, Vec<String>) {
    let mut args: Vec<String> = Vec::new();
    fn push(args: &mut Vec<String>, a: &str, v: String) {
        args.push(a.to_string());
        args.push(v);
    }
    let pick = |rng: &mut ChaCha8Rng, xs: &[&str]| xs[rng.random_range(0..xs.len())].to_string();
    if rng.random_bool(0.25) {
        push(
            &mut args,
            "--model",
            common::tiny("tiny-f32.gguf").display().to_string(),
        );
        // llama.cpp's threads spin waiting for each other: on a loaded machine (the suite
        // runs cases side by side) more than one collapses decoding.
        push(&mut args, "--threads", "1".into());
    } else {
        push(&mut args, "--backend", "test".into());
        push(
            &mut args,
            "--model",
            format!("{}:{}", rng.random_range(2..3000), rng.random_range(0..9)),
        );
    }
    let floats = [
        "0", "1e-40", "1e-5", "0.5", "1", "2", "1e4", "1e38", "-1", "nan", "inf", "1e-4",
    ];
    for (flag, p) in [
        ("--temperature", 0.7),
        ("--top-p", 0.4),
        ("--min-p", 0.3),
        ("--repeat-penalty", 0.3),
        ("--presence-penalty", 0.2),
        ("--frequency-penalty", 0.2),
        ("--mass-threshold", 0.2),
    ] {
        if rng.random_bool(p) {
            // Mostly values the flag accepts, so most sets run; the rest anything.
            let v = if rng.random_bool(0.6) {
                pick(rng, &["0.5", "1", "0.9", "0.05", "1.1"])
            } else {
                pick(rng, &floats)
            };
            push(&mut args, flag, v);
        }
    }
    let ints = [
        "0",
        "1",
        "2",
        "7",
        "64",
        "300",
        "100000",
        "-3",
        "18446744073709551615",
    ];
    for (flag, p) in [
        ("--top-k", 0.3),
        ("--min-k", 0.2),
        ("--max-k", 0.2),
        ("--max-new-tokens", 0.5),
        ("--parallel", 0.2),
        ("--ctx-size", 0.15),
        ("--batch-size", 0.1),
        ("--threads", 0.1),
        ("--seed", 0.5),
    ] {
        if rng.random_bool(p) {
            let v = if rng.random_bool(0.6) {
                pick(rng, &["1", "2", "7", "16", "40"])
            } else {
                pick(rng, &ints)
            };
            // Keep runs short: a valid max-new-tokens stays small.
            let v = if flag == "--max-new-tokens" && v.parse::<u64>().is_ok_and(|n| n > 64) {
                "64".into()
            } else {
                v
            };
            push(&mut args, flag, v);
        }
    }
    if !args.iter().any(|a| a == "--max-new-tokens") {
        push(&mut args, "--max-new-tokens", "8".into());
    }
    let n_prompts = rng.random_range(1..5);
    for _ in 0..n_prompts {
        let p = match rng.random_range(0..12) {
            0 => String::new(),
            1 => "<|im_start|>user".into(),
            2 => "x".repeat(rng.random_range(1..3000)),
            3 => "\u{1F600} émoji ✓".into(),
            _ => "The capital of France is".into(),
        };
        push(&mut args, "--prompt", p);
    }
    if rng.random_bool(0.2) {
        push(&mut args, "--stop", pick(rng, &["", "\n", "a", "e"]));
    }
    if rng.random_bool(0.1) {
        args.push("--use-chat-template".into());
    }
    let shown = args
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(" ");
    (shown.chars().take(200).collect(), args)
}

/// A config file or prompts file of random content.
fn config_case(rng: &mut ChaCha8Rng, dir: &Path) -> (String, Vec<String>) {
    if rng.random_bool(0.5) {
        let keys = [
            "temperature",
            "top_p",
            "top_k",
            "sample_top_k",
            "min_k",
            "max_k",
            "seed",
            "prompt",
            "max_new_tokens",
            "capture_attention",
            "capture_logit_lens",
            "flash_attn",
            "backend",
            "parallel",
            "stop",
            "unknown_key",
            "threads",
            "ctx_size",
            "use_chat_template",
        ];
        let vals = [
            "0.5",
            "-1",
            "hot",
            "[1, 2]",
            "{a: 1}",
            "true",
            "null",
            "1e400",
            "''",
            "99999999999999999999",
        ];
        let mut text = String::new();
        for _ in 0..rng.random_range(0..6) {
            text.push_str(&format!(
                "{}: {}\n",
                keys[rng.random_range(0..keys.len())],
                vals[rng.random_range(0..vals.len())]
            ));
        }
        if rng.random_bool(0.1) {
            text = "- just\n- a list\n".into();
        }
        if rng.random_bool(0.05) {
            text = "\u{feff}\t: : ::\n".into();
        }
        let p = dir.join("c.yaml");
        fs::write(&p, &text).unwrap();
        let args = vec![
            "--config".into(),
            p.display().to_string(),
            "--backend".into(),
            "test".into(),
            "--model".into(),
            "300:0".into(),
            "--prompt".into(),
            "hi".into(),
            "--max-new-tokens".into(),
            "4".into(),
        ];
        (
            format!("config {:?}", text.chars().take(120).collect::<String>()),
            args,
        )
    } else {
        let mut lines: Vec<Vec<u8>> = Vec::new();
        for _ in 0..rng.random_range(0..8) {
            lines.push(match rng.random_range(0..8) {
                0 => b"".to_vec(),
                1 => b"{\"prompt\": \"a\"}".to_vec(),
                2 => b"{\"prompt\": 1}".to_vec(),
                3 => b"{\"prompt\": \"a\", \"system_prompt\": \"s\"}".to_vec(),
                4 => vec![0xff, 0xfe, b'a'],
                5 => b"{\"prompt\": \"\"}".to_vec(),
                6 => b"\xEF\xBB\xBF{\"prompt\": \"bom\"}".to_vec(),
                _ => b"plain prompt text".to_vec(),
            });
        }
        let p = dir.join("p.txt");
        fs::write(&p, lines.join(&b"\n"[..])).unwrap();
        let args = vec![
            "--prompts-file".into(),
            p.display().to_string(),
            "--backend".into(),
            "test".into(),
            "--model".into(),
            "300:0".into(),
            "--max-new-tokens".into(),
            "3".into(),
        ];
        (format!("prompts file of {} lines", lines.len()), args)
    }
}

/// A trace of a few prompts with SIGINT or SIGTERM at a random moment, from the first
/// instant (before the handler could exist, issue 32 item 5) to well into the run.
fn signal_case(rng: &mut ChaCha8Rng, out: &str) -> (String, Vec<String>, (i32, Duration)) {
    let sig = if rng.random_bool(0.5) {
        libc::SIGINT
    } else {
        libc::SIGTERM
    };
    // Half of them in the first 20 ms, where the early-SIGINT bug lived.
    let ms = if rng.random_bool(0.5) {
        rng.random_range(0..20)
    } else {
        rng.random_range(20..400)
    };
    let mut args: Vec<String> = [
        "trace",
        "--backend",
        "test",
        "--model",
        "300:0:-100",
        "--prompt",
        "one",
        "--prompt",
        "two",
        "--max-new-tokens",
        "400",
        "--threads",
        "1",
        "--out",
        out,
    ]
    .map(String::from)
    .to_vec();
    if rng.random_bool(0.5) {
        args.push("--no-plots".into());
    }
    let name = if sig == libc::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    };
    (
        format!("{name} after {ms} ms"),
        args,
        (sig, Duration::from_millis(ms)),
    )
}

/// `--config` or `--prompts-file` naming what cannot be read as a file: a FIFO nothing
/// writes to, an endless device, a folder (issue 32 item 4).
fn config_stream_case(rng: &mut ChaCha8Rng, dir: &Path) -> (String, Vec<String>) {
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path in the case's own folder.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let fifo = fifo.display().to_string();
    let path = [fifo.as_str(), "/dev/zero", "/dev/urandom", "/dev/null", "/"]
        [rng.random_range(0..5)]
    .to_string();
    // A FIFO as a prompts file is waited for (10 s, tests/many_prompts.rs): not here.
    let flag = if path != fifo && rng.random_bool(0.3) {
        "--prompts-file"
    } else {
        "--config"
    };
    let mut args: Vec<String> = ["trace", "--backend", "test", "--model", "300:0"]
        .map(String::from)
        .to_vec();
    args.extend([flag.to_string(), path.clone()]);
    if flag == "--config" {
        args.extend(["--prompt".into(), "hi".into()]);
    }
    (format!("{flag} {path}"), args)
}

fn generate(i: usize, seed: u64, root: &Path, seeds: &Seeds) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let dir = root.join(format!("case-{i:05}"));
    fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out");
    let out_s = out.display().to_string();
    let trace_common = |m: String, backend: &str| -> Vec<String> {
        vec![
            "trace".into(),
            "--backend".into(),
            backend.into(),
            "--model".into(),
            m,
            "--prompt".into(),
            "t1 t2".into(),
            "--max-new-tokens".into(),
            "3".into(),
            "--threads".into(),
            "1".into(),
            "--no-plots".into(),
            "--out".into(),
            out_s.clone(),
        ]
    };
    // The mix of categories: 34 % GGUF, 13 % ONNX, 5 % each header bombs, hostile chat
    // templates and external data, 10 % traces, 5 % compare.json, 5 % configs and prompts
    // files, 4 % signals, 2 % configs that are streams or devices, 12 % parameter sets.
    let r = rng.random_range(0..100);
    if r < 34 {
        let (what, p) = gguf_case(&mut rng, &dir);
        if rng.random_bool(0.2) {
            return Case::new(
                "gguf",
                what,
                vec!["inspect".into(), "--model".into(), p.display().to_string()],
                out,
                Check::Inspect,
            );
        }
        return Case::new(
            "gguf",
            what,
            trace_common(p.display().to_string(), "llama"),
            out,
            Check::Trace,
        );
    }
    if r < 47 {
        let (what, p) = onnx_case(&mut rng, &dir);
        return Case::new(
            "onnx",
            what,
            trace_common(p.display().to_string(), "onnx"),
            out,
            Check::Trace,
        );
    }
    if r < 52 {
        let (what, p) = header_bomb_case(&mut rng, &dir);
        let (args, check) = if rng.random_bool(0.5) {
            let args = vec!["inspect".into(), "--model".into(), p.display().to_string()];
            (args, Check::Inspect)
        } else {
            (trace_common(p.display().to_string(), "llama"), Check::Trace)
        };
        return Case::new("header bomb", what, args, out, check).capped();
    }
    if r < 57 {
        let (what, p) = template_case(&mut rng, &dir);
        let mut args = trace_common(p.display().to_string(), "llama");
        args.push("--use-chat-template".into());
        return Case::new("hostile template", what, args, out, Check::Trace).capped();
    }
    if r < 62 {
        let (what, p) = external_data_case(&mut rng, &dir);
        return Case::new(
            "external data",
            what,
            trace_common(p.display().to_string(), "onnx"),
            out,
            Check::Trace,
        )
        .capped();
    }
    if r < 77 {
        let compare = r >= 72;
        let (what, p) = report_case(&mut rng, &dir, seeds, compare);
        return Case::new(
            if compare {
                "compare.json"
            } else {
                "trace file"
            },
            what,
            vec![
                "report".into(),
                p.display().to_string(),
                "--out".into(),
                out_s,
            ],
            out,
            Check::Report,
        );
    }
    if r < 82 {
        let (what, mut args) = config_case(&mut rng, &dir);
        args.insert(0, "trace".into());
        args.extend(["--no-plots".into(), "--out".into(), out_s]);
        return Case::new("config/prompts", what, args, out, Check::Trace);
    }
    if r < 86 {
        let (what, args, signal) = signal_case(&mut rng, &out_s);
        return Case::new("signals", what, args, out, Check::Trace).signalled(signal);
    }
    if r < 88 {
        let (what, mut args) = config_stream_case(&mut rng, &dir);
        args.extend(["--no-plots".into(), "--out".into(), out_s]);
        return Case::new("config stream", what, args, out, Check::Trace).capped();
    }
    let (what, mut args) = params_case(&mut rng);
    args.insert(0, "trace".into());
    args.extend(["--no-plots".into(), "--out".into(), out_s]);
    Case::new("parameters", what, args, out, Check::Trace)
}

/// How a case that passed ended.
enum Outcome {
    Output,
    Error,
}

/// Runs a case with a time limit: how it ended, or what went wrong.
fn run_case(case: &Case, limit: Duration) -> Result<Outcome, String> {
    match run_checked(case, limit) {
        None => Ok(Outcome::Output),
        Some(Ok(())) => Ok(Outcome::Error),
        Some(Err(e)) => Err(e),
    }
}

/// `None`: a valid output; `Some(Ok)`: a proper error; `Some(Err)`: a failure.
fn run_checked(case: &Case, limit: Duration) -> Option<Result<(), String>> {
    let fail = |s: String| Some(Err(s));
    let mut cmd = common::bin();
    cmd.args(&case.args)
        .env_remove("LOGITPROBE_SHARDS")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if case.capped {
        common::cap_address_space(&mut cmd, MEMORY_CAP);
    }
    if case.signal.is_some() {
        common::default_signals(&mut cmd);
    }
    let mut child = cmd.spawn().unwrap();
    if let Some((sig, after)) = case.signal {
        std::thread::sleep(after);
        // SAFETY: kill(2) on our own child, not yet waited for.
        unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    }
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut { stderr }, &mut s).ok();
        s
    });
    let Some(status) = common::wait_or_kill(&mut child, limit) else {
        return fail(format!("hung (killed after {limit:?})"));
    };
    let err = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        // A signal before main installs the handler (the dynamic loader's few ms) kills
        // the process: fine while it has created nothing.
        if case.signal.map(|s| s.0) == Some(sig) && !case.out.exists() {
            return Some(Ok(()));
        }
        return fail(format!("killed by signal {sig}; stderr: {}", tail(&err)));
    }
    if err.contains("panicked") || status.code() == Some(101) {
        return fail(format!("panicked: {}", tail(&err)));
    }
    match status.code() {
        Some(0) => check_output(case).map(Err),
        // Stopped by the signal: the README's promise is exit 130 (SIGINT) or 143 (SIGTERM)
        // with a run.json that says interrupted, whatever the moment.
        Some(c @ (130 | 143)) if case.signal.is_some() => {
            let want = if case.signal.map(|s| s.0) == Some(libc::SIGINT) {
                130
            } else {
                143
            };
            if c != want {
                return fail(format!("exit {c} for a signal that should give {want}"));
            }
            let run: Option<Value> = fs::read(case.out.join("run.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            match run {
                Some(r) if r["interrupted"] == true => Some(Ok(())),
                Some(_) => fail("run.json does not say interrupted".into()),
                None => fail(format!("exit {c} and no run.json: {}", tail(&err))),
            }
        }
        Some(1) | Some(2) => {
            let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
            if lines.len() != 1 || !lines[0].starts_with("error: ") {
                return fail(format!("not a one-line error: {}", tail(&err)));
            }
            if lines[0].len() > 2000 {
                return fail(format!("a {}-byte error line", lines[0].len()));
            }
            if case.out.join("adaptive_token_trace.json").exists()
                || case.out.join("report.html").exists()
            {
                return fail("a complete-looking output beside the error".into());
            }
            Some(Ok(()))
        }
        Some(c) => fail(format!("exit {c}: {}", tail(&err))),
        None => fail("no exit code".into()),
    }
}

fn tail(s: &str) -> String {
    let t: String = s
        .chars()
        .rev()
        .take(600)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    t.replace('\n', " | ")
}

fn schema() -> &'static jsonschema::Validator {
    static V: std::sync::OnceLock<jsonschema::Validator> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        let s: Value = serde_json::from_slice(
            &fs::read(common::tokenheat("tokenheat-trace.schema.json")).unwrap(),
        )
        .unwrap();
        jsonschema::validator_for(&s).unwrap()
    })
}

fn check_output(case: &Case) -> Option<String> {
    match case.check {
        Check::Inspect => None,
        Check::Report => {
            for f in ["adaptive_heatmap.png", "kld_per_position.png"] {
                if case.out.join(f).is_file() {
                    return None;
                }
            }
            if case.out.join("report.html").is_file() {
                return None;
            }
            Some("report succeeded but drew nothing".into())
        }
        Check::Trace => {
            // One prompt writes into --out; several into prompt-NNN folders.
            let mut traces = Vec::new();
            let single = case.out.join("adaptive_token_trace.json");
            if single.is_file() {
                traces.push(single);
            } else if let Ok(rd) = fs::read_dir(&case.out) {
                for e in rd.flatten() {
                    let p = e.path().join("adaptive_token_trace.json");
                    if p.is_file() {
                        traces.push(p);
                    }
                }
            }
            if traces.is_empty() {
                return Some("trace succeeded but wrote no trace".into());
            }
            for t in traces {
                let v: Value = match serde_json::from_slice(&fs::read(&t).unwrap()) {
                    Ok(v) => v,
                    Err(e) => return Some(format!("{} is not JSON: {e}", t.display())),
                };
                let first = schema().iter_errors(&v).next().map(|e| {
                    format!(
                        "{} fails the schema at {}: {e}",
                        t.display(),
                        e.instance_path()
                    )
                });
                if first.is_some() {
                    return first;
                }
            }
            None
        }
    }
}

#[test]
fn mutated_inputs_never_crash() {
    let seed: u64 = std::env::var("MUTATION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    let cases: usize = std::env::var("MUTATION_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    println!("mutation suite: seed {seed}, {cases} cases (MUTATION_SEED={seed} to repeat)");
    let root = tempfile::tempdir().unwrap();
    let seeds = make_seeds(root.path());
    let next = AtomicUsize::new(0);
    let counts: Mutex<BTreeMap<&'static str, (usize, usize, usize)>> = Mutex::new(BTreeMap::new());
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 4);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= cases {
                    break;
                }
                let case = generate(i, seed, root.path(), &seeds);
                let result = run_case(&case, Duration::from_secs(60));
                {
                    let mut c = counts.lock().unwrap();
                    let e = c.entry(case.category).or_default();
                    e.0 += 1;
                    match &result {
                        Ok(Outcome::Output) => e.1 += 1,
                        Ok(Outcome::Error) => e.2 += 1,
                        Err(_) => {}
                    }
                }
                if let Err(why) = result {
                    failures.lock().unwrap().push(format!(
                        "case {i} [{}] {}: {why}\n    logitprobe {}",
                        case.category,
                        case.what,
                        case.args
                            .iter()
                            .map(|a| format!("{a:?}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                            .chars()
                            .take(400)
                            .collect::<String>()
                    ));
                }
                let _ = fs::remove_dir_all(root.path().join(format!("case-{i:05}")));
            });
        }
    });
    println!(
        "{:<16} {:>6} {:>8} {:>8} {:>8}",
        "category", "cases", "outputs", "errors", "failed"
    );
    let failures = failures.into_inner().unwrap();
    let counts = counts.into_inner().unwrap();
    for (cat, (n, ok, errs)) in &counts {
        println!("{cat:<16} {n:>6} {ok:>8} {errs:>8} {:>8}", n - ok - errs);
    }
    println!(
        "{cases} cases in {:.1} s on {workers} workers",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed (MUTATION_SEED={seed}):\n{}",
        failures.len(),
        failures
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
