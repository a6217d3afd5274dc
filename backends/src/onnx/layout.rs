//! How an export wants its inputs: the names of its KV cache inputs and outputs per layer,
//! and the shapes and dtypes of the cache, read from the session (never assumed per family).

use crate::usage;
use anyhow::Context as _;
use ort::session::Session;
use ort::value::{TensorElementType, ValueType};
use std::path::Path;

/// How this export wants its inputs.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    pub(super) attention_mask: bool,
    pub(super) position_ids: bool,
    /// (past key, past value, present key, present value) names per layer.
    pub(super) kv: Vec<[String; 4]>,
    pub(super) kv_dtype: TensorElementType,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    /// KV sizes the graph leaves symbolic, taken from the folder's config files instead.
    pub(super) from_config: Vec<&'static str>,
}

pub(super) fn tensor_dims(vt: &ValueType) -> Option<(TensorElementType, Vec<i64>)> {
    match vt {
        ValueType::Tensor { ty, shape, .. } => Some((*ty, shape.iter().copied().collect())),
        _ => None,
    }
}

pub(super) fn dtype_name(t: TensorElementType) -> &'static str {
    match t {
        TensorElementType::Float32 => "float32",
        TensorElementType::Float16 => "float16",
        TensorElementType::Bfloat16 => "bfloat16",
        _ => "other",
    }
}

/// KV sizes an export may leave symbolic (onnxruntime-genai's builder writes
/// `['batch_size', n, 'past_sequence_length', 'kv_cache_dim']`), from the folder's
/// `genai_config.json` or `config.json`.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct KvHint {
    pub(super) kv_heads: Option<usize>,
    pub(super) head_dim: Option<usize>,
}

pub(super) fn read_layout(session: &Session, model: &Path, hint: KvHint) -> anyhow::Result<Layout> {
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
    // Every input the graph declares must be one we feed: an export that renamed one
    // (`attention_mask` to `mask`) otherwise fails inside ONNX Runtime's first run with
    // "Missing Input".
    let fed = |n: &str| {
        matches!(n, "input_ids" | "attention_mask" | "position_ids")
            || n.starts_with("past_key_values.")
    };
    let unknown: Vec<&str> = inputs.iter().copied().filter(|n| !fed(n)).collect();
    if let Some(first) = unknown.first() {
        let lacking: Vec<&str> = ["attention_mask", "position_ids"]
            .into_iter()
            .filter(|n| !inputs.contains(n))
            .collect();
        return Err(usage!(
            "{shown}: input {first:?} is not one this engine feeds (input_ids, attention_mask, position_ids, past_key_values.N.key/.value){}; the graph's inputs are {}: export it again with optimum (--task text-generation-with-past) or onnxruntime-genai's builder",
            if lacking.is_empty() {
                String::new()
            } else {
                format!(", and the graph has no {}: was one renamed?", lacking.join(" or "))
            },
            inputs.join(", ")
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
    let dim = |d: i64, h: Option<usize>| if d > 0 { Some(d as usize) } else { h };
    let (kv_heads, head_dim) = match shape.as_slice() {
        [_, h, _, d] => (dim(*h, hint.kv_heads), dim(*d, hint.head_dim)),
        _ => (None, None),
    };
    let (Some(kv_heads), Some(head_dim)) = (kv_heads, head_dim) else {
        return Err(usage!(
            "{shown}: KV inputs have shape {shape:?}; expected [batch, kv_heads, past, head_dim], with symbolic sizes given by genai_config.json (model.decoder.num_key_value_heads, head_size) or config.json (num_key_value_heads, head_dim)"
        ));
    };
    if !matches!(
        kv_dtype,
        TensorElementType::Float32 | TensorElementType::Float16
    ) {
        return Err(usage!(
            "{shown}: KV cache of type {kv_dtype:?} is not supported (float32 or float16)"
        ));
    }
    kv.sort_by_key(|(i, _)| *i);
    let mut from_config = Vec::new();
    if let [_, h, _, d] = shape.as_slice() {
        if *h <= 0 {
            from_config.push("kv_heads");
        }
        if *d <= 0 {
            from_config.push("head_dim");
        }
    }
    Ok(Layout {
        from_config,
        attention_mask: inputs.contains(&"attention_mask"),
        position_ids: inputs.contains(&"position_ids"),
        kv: kv.into_iter().map(|(_, n)| n).collect(),
        kv_dtype,
        kv_heads,
        head_dim,
    })
}
