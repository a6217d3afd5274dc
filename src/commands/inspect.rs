//! `logitprobe inspect`: what a model file holds, before probing it. Reads metadata only (the
//! GGUF header and llama.cpp's vocabulary-only load; the ONNX graph's inputs, outputs and op
//! types, its config and tokenizer files), never the weights, and prints both formats' facts
//! the same way.

use crate::cli::InspectArgs;
#[cfg(feature = "llama")]
use logitprobe_backends::gguf::{GgufHeader, Value};
use logitprobe_backends::{usage, Backend, TokenId};
use std::path::Path;

/// The facts both formats print, in one order.
struct Facts {
    format: String,
    architecture: Option<String>,
    sizes: Vec<(&'static str, String)>,
    params: u64,
    bits_per_weight: f64,
    types: Vec<(String, u64, u64)>,
    tokenizer: String,
    bos: String,
    eos: String,
    add_bos: String,
    eog: Vec<String>,
    chat_template: Option<String>,
    extra: Vec<(String, String)>,
}

fn print(path: &Path, f: &Facts) {
    println!("model: {}", path.display());
    println!("format: {}", f.format);
    if let Some(a) = &f.architecture {
        println!("architecture: {a}");
    }
    for (label, v) in &f.sizes {
        println!("{label}: {v}");
    }
    println!(
        "parameters: {} ({:.2} bits per weight)",
        f.params, f.bits_per_weight
    );
    println!("tensor types:");
    for (name, tensors, params) in &f.types {
        println!(
            "  {name:<8} {tensors:>4} tensors {params:>12} params ({:.1}%)",
            100.0 * *params as f64 / f.params.max(1) as f64
        );
    }
    for (k, v) in &f.extra {
        println!("{k}: {v}");
    }
    println!("tokenizer: {}", f.tokenizer);
    println!("bos: {}  eos: {}  add_bos: {}", f.bos, f.eos, f.add_bos);
    println!("end-of-generation: {}", f.eog.join(", "));
    match &f.chat_template {
        Some(t) => {
            let lines: Vec<&str> = t.lines().collect();
            println!("chat template: {} lines", lines.len());
            for l in lines.iter().take(12) {
                println!("  | {l}");
            }
            if lines.len() > 12 {
                println!("  | … ({} more lines)", lines.len() - 12);
            }
        }
        None => println!("chat template: none (give one with --chat-template NAME|JINJA)"),
    }
}

/// `id "piece"`.
fn id_piece(id: TokenId, piece: &[u8]) -> String {
    format!("{id} {:?}", String::from_utf8_lossy(piece))
}

pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let InspectArgs {
        model,
        model_file,
        backend,
    } = args;
    let backend = logitprobe::hub::infer_backend(model, backend.map(Into::into));
    let resolved = logitprobe::hub::resolve(backend, model, model_file.as_deref())?;
    let path = Path::new(&resolved.path);
    // A FIFO or a device would block the header read forever.
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
        return Err(usage!(
            "{} is not a regular file or folder; give a .gguf file or an ONNX folder",
            path.display()
        ));
    }
    let facts = match backend {
        Backend::Llama => gguf_facts(path)?,
        Backend::Onnx => onnx_facts(path)?,
        Backend::Test => {
            return Err(usage!(
                "the test backend has no model file to inspect; give a .gguf file or an ONNX folder"
            ))
        }
    };
    print(path, &facts);
    Ok(())
}

#[cfg(feature = "llama")]
fn gguf_facts(path: &Path) -> anyhow::Result<Facts> {
    let h = GgufHeader::read(path)?;
    let arch = h.architecture().unwrap_or("?").to_string();
    let get = |k: &str| h.get(&format!("{arch}.{k}")).and_then(Value::as_u64);
    let mut sizes = Vec::new();
    for (label, key) in [
        ("layers", "block_count"),
        ("hidden size", "embedding_length"),
        ("heads", "attention.head_count"),
        ("KV heads", "attention.head_count_kv"),
        ("head dim", "attention.key_length"),
        ("feed-forward", "feed_forward_length"),
        ("context length", "context_length"),
        ("sliding window", "attention.sliding_window"),
    ] {
        if let Some(v) = get(key) {
            sizes.push((label, v.to_string()));
        }
    }
    let t = h.tensor_types();
    let s = |k: &str| h.get(k).and_then(Value::as_str).map(String::from);
    // The vocabulary as llama.cpp reads it (ids that end generation, the template), without
    // the weights.
    let v = logitprobe_backends::llama::vocab_facts(path)?;
    let piece =
        |t: &Option<(TokenId, Vec<u8>)>| t.as_ref().map_or("-".into(), |(id, p)| id_piece(*id, p));
    Ok(Facts {
        format: format!(
            "GGUF v{} ({} tensors, {:.1} MB)",
            h.version,
            h.tensors.len(),
            h.file_size as f64 / 1e6
        ),
        architecture: Some(arch.clone()),
        sizes,
        params: t.params,
        bits_per_weight: t.bits_per_weight,
        types: t
            .by_type
            .iter()
            .map(|(n, c)| (n.clone(), c.tensors as u64, c.params))
            .collect(),
        tokenizer: format!(
            "{} (pre-tokenizer {}), {} tokens",
            s("tokenizer.ggml.model").unwrap_or("?".into()),
            s("tokenizer.ggml.pre").unwrap_or("default".into()),
            v.n_tokens
        ),
        bos: piece(&v.bos),
        eos: piece(&v.eos),
        add_bos: v.add_bos.to_string(),
        eog: v.eog.iter().map(|(id, p)| id_piece(*id, p)).collect(),
        chat_template: v.chat_template,
        extra: Vec::new(),
    })
}

#[cfg(not(feature = "llama"))]
fn gguf_facts(_: &Path) -> anyhow::Result<Facts> {
    Err(logitprobe_backends::Error::EngineNotBuilt { engine: "llama" }.into())
}

#[cfg(feature = "onnx")]
fn onnx_facts(path: &Path) -> anyhow::Result<Facts> {
    use logitprobe_backends::formats::onnx_model;
    let (dir, file) = if path.is_dir() {
        let direct = path.join("model.onnx");
        let f = if direct.is_file() {
            direct
        } else {
            path.join("onnx").join("model.onnx")
        };
        (path.to_path_buf(), f)
    } else {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let dir = if dir.join("tokenizer.json").is_file() {
            dir
        } else {
            dir.parent().map(Path::to_path_buf).unwrap_or(dir)
        };
        (dir, path.to_path_buf())
    };
    if !file.is_file() {
        return Err(usage!(
            "no model.onnx in {}: give an ONNX model folder or the .onnx file",
            path.display()
        ));
    }
    let bad = |e: std::io::Error| usage!("{} is not a readable ONNX model: {e}", file.display());
    let io = onnx_model::graph_io(&file).map_err(bad)?;
    let weights = onnx_model::weight_types(&file).map_err(bad)?;
    let folder = logitprobe_backends::hf::HfFolder::open(&dir)?;
    let size = |genai: &str, keys: &[&str]| folder.size(genai, keys);
    let mut sizes = Vec::new();
    for (label, genai, keys) in [
        (
            "layers",
            "/model/decoder/num_hidden_layers",
            &["num_hidden_layers"][..],
        ),
        (
            "hidden size",
            "/model/decoder/hidden_size",
            &["hidden_size"],
        ),
        (
            "heads",
            "/model/decoder/num_attention_heads",
            &["num_attention_heads"],
        ),
        (
            "KV heads",
            "/model/decoder/num_key_value_heads",
            &["num_key_value_heads"],
        ),
        ("head dim", "/model/decoder/head_size", &["head_dim"]),
        ("feed-forward", "", &["intermediate_size"]),
    ] {
        if let Some(v) = size(genai, keys) {
            sizes.push((label, v.to_string()));
        }
    }
    if let Some(n) = folder.n_ctx_model {
        sizes.push(("context length", n.to_string()));
    }
    let params: u64 = weights.types.values().map(|c| c.params).sum();
    let shape = |v: &onnx_model::ValueInfo| {
        let d: Vec<String> = v.dims.iter().map(ToString::to_string).collect();
        format!("{} {} [{}]", v.name, v.elem_type, d.join(", "))
    };
    // The KV cache's inputs and outputs are one per layer: shown once.
    let list = |vs: &[onnx_model::ValueInfo], kv: &str| {
        let mut out: Vec<String> = vs
            .iter()
            .filter(|v| !v.name.starts_with(kv))
            .map(shape)
            .collect();
        let n = vs.iter().filter(|v| v.name.starts_with(kv)).count();
        if let Some(first) = vs.iter().find(|v| v.name.starts_with(kv)) {
            out.push(format!("{} (and {} more like it)", shape(first), n - 1));
        }
        out.join("; ")
    };
    let has = |op: &str| io.ops.keys().any(|k| k.ends_with(op));
    let layout = if io.inputs.iter().any(|i| i.name == "position_ids") {
        "optimum layout (position_ids)"
    } else {
        "onnxruntime-genai layout (no position_ids)"
    };
    let fused: Vec<&str> = [
        "GroupQueryAttention",
        "MultiHeadAttention",
        "SkipSimplifiedLayerNormalization",
        "SimplifiedLayerNormalization",
        "MatMulNBits",
        "GatherBlockQuantized",
    ]
    .into_iter()
    .filter(|op| has(op))
    .collect();
    let mut extra = vec![
        ("inputs".to_string(), list(&io.inputs, "past_key_values.")),
        ("outputs".to_string(), list(&io.outputs, "present.")),
        (
            "ops".to_string(),
            format!(
                "{} nodes of {} types{}",
                io.ops.values().sum::<usize>(),
                io.ops.len(),
                if fused.is_empty() {
                    String::from(", standard ops only")
                } else {
                    format!(", fused: {}", fused.join(", "))
                }
            ),
        ),
    ];
    if has("GroupQueryAttention") || has("MultiHeadAttention") {
        extra.push((
            "attention".into(),
            "fused: the logit lens works, --capture-attention does not".into(),
        ));
    }
    let piece = |id: Option<TokenId>| {
        id.map_or("-".into(), |id| {
            id_piece(id, &folder.token_bytes(id).unwrap_or_default())
        })
    };
    let model_type = folder
        .config
        .get("model_type")
        .and_then(|v| v.as_str())
        .or_else(|| folder.genai.pointer("/model/type").and_then(|v| v.as_str()))
        .map(String::from);
    Ok(Facts {
        format: format!(
            "ONNX, {layout} ({:.1} MB{})",
            std::fs::metadata(&file).map_or(0, |m| m.len()) as f64 / 1e6,
            if dir.join("genai_config.json").is_file() {
                ", genai_config.json"
            } else {
                ""
            }
        ),
        architecture: model_type,
        sizes,
        params,
        bits_per_weight: weights.bits_per_weight,
        types: weights
            .types
            .iter()
            .map(|(n, c)| (n.clone(), c.tensors, c.params))
            .collect(),
        tokenizer: format!("tokenizer.json, {} tokens", folder.vocab_size()),
        bos: piece(folder.bos),
        eos: piece(folder.eos),
        add_bos: folder.add_bos.to_string(),
        eog: folder.eog.iter().map(|&id| piece(Some(id))).collect(),
        chat_template: folder.chat_template.clone(),
        extra,
    })
}

#[cfg(not(feature = "onnx"))]
fn onnx_facts(_: &Path) -> anyhow::Result<Facts> {
    Err(logitprobe_backends::Error::EngineNotBuilt { engine: "onnx" }.into())
}
