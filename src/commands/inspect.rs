//! `logitprobe inspect`: what a model file holds, before probing it.

use crate::cli::InspectArgs;
use logitprobe_backends::gguf::{GgufHeader, Value};
use logitprobe_backends::{Backend, LogitSource};
use std::path::Path;

pub fn run(args: &crate::cli::InspectArgs, verbose: bool) -> anyhow::Result<()> {
    let InspectArgs {
        model,
        model_file,
        backend,
        engine,
    } = args;
    let backend = crate::models::infer_backend(model, backend.map(Into::into));
    let resolved = crate::models::resolve(backend, model, model_file.as_deref())?;
    let path = Path::new(&resolved.path);
    // A FIFO or a device would block the header read forever.
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
        return Err(logitprobe_backends::usage!(
            "{} is not a regular file or folder; give a .gguf file or an ONNX folder",
            path.display()
        ));
    }
    println!("model: {}", path.display());
    if backend == Backend::Llama {
        let h = GgufHeader::read(path)?;
        let arch = h.architecture().unwrap_or("?").to_string();
        let get = |k: &str| h.get(&format!("{arch}.{k}")).and_then(Value::as_u64);
        println!(
            "format: GGUF v{} ({} tensors, {:.1} MB)",
            h.version,
            h.tensors.len(),
            h.file_size as f64 / 1e6
        );
        println!("architecture: {arch}");
        for (label, key) in [
            ("layers", "block_count"),
            ("hidden size", "embedding_length"),
            ("heads", "attention.head_count"),
            ("KV heads", "attention.head_count_kv"),
            ("feed-forward", "feed_forward_length"),
            ("context length", "context_length"),
        ] {
            if let Some(v) = get(key) {
                println!("{label}: {v}");
            }
        }
        let t = h.tensor_types();
        println!(
            "parameters: {} ({:.2} bits per weight)",
            t.params, t.bits_per_weight
        );
        println!("tensor types:");
        for (name, c) in &t.by_type {
            println!(
                "  {name:<8} {:>4} tensors {:>12} params ({:.1}%)",
                c.tensors,
                c.params,
                100.0 * c.params as f64 / t.params.max(1) as f64
            );
        }
        let s = |k: &str| h.get(k).and_then(Value::as_str).map(String::from);
        let n_tokens = match h.get("tokenizer.ggml.tokens") {
            Some(Value::Array { len, .. }) => *len,
            _ => 0,
        };
        println!(
            "tokenizer: {} (pre-tokenizer {}), {} tokens",
            s("tokenizer.ggml.model").unwrap_or("?".into()),
            s("tokenizer.ggml.pre").unwrap_or("default".into()),
            n_tokens
        );
        let id = |k: &str| {
            h.get(k)
                .and_then(Value::as_u64)
                .map_or("-".to_string(), |v| v.to_string())
        };
        println!(
            "bos: {}  eos: {}  add_bos: {}",
            id("tokenizer.ggml.bos_token_id"),
            id("tokenizer.ggml.eos_token_id"),
            h.get("tokenizer.ggml.add_bos_token")
                .and_then(Value::as_bool)
                .map_or("unset (llama.cpp decides by tokenizer type)".into(), |b| b
                    .to_string())
        );
        println!(
            "chat template: {}",
            if h.get("tokenizer.chat_template").is_some() {
                "yes"
            } else {
                "no"
            }
        );
    } else {
        let src = logitprobe_backends::open(backend, &resolved.path, &engine.options(verbose)?)?;
        let i = src.info();
        println!("format: ONNX ({} on {})", i.engine_version, i.device);
        for (k, v) in &i.details {
            println!("{k}: {v}");
        }
        println!(
            "logits: {} x {} ({} tokenizer ids)",
            i.logits_dtype, i.n_vocab, i.tokenizer_vocab
        );
        println!("context length: {}", i.n_ctx);
        let piece = |t: Option<u32>| {
            t.map_or("-".into(), |t| {
                format!(
                    "{t} {:?}",
                    src.token_bytes(t)
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default()
                )
            })
        };
        println!(
            "bos: {}  eos: {}  add_bos: {}  end-of-generation ids: {:?}",
            piece(i.bos),
            piece(i.eos),
            i.add_bos,
            i.eog
        );
        println!(
            "chat template: {}",
            if src.chat_template().is_some() {
                "yes"
            } else {
                "no"
            }
        );
    }
    Ok(())
}
