//! The decoder inside an ONNX export's graph, found from its structure (never from one
//! model's node names): the residual stream after each layer, the attention softmax of each
//! layer, and the final norm and output head. The logit lens adds those values as extra
//! graph outputs and loads the result in place of the export.
//!
//! Only the protobuf fields needed are read (ModelProto.graph; GraphProto.node, .initializer,
//! .output; NodeProto.input, .output, .op_type, .domain, .attribute); weights are referenced
//! by their byte range and read only for the lens head.
//!
//! How the residual stream is found, in both layouts the engine runs:
//! - from the embedding lookup (the Gather of `input_ids`), a value of the stream is
//!   followed to the one Add that takes it as an input (standard-op exports: optimum), or to
//!   the `Skip*LayerNormalization` that takes it as its input or skip (onnxruntime-genai's
//!   builder), whose fourth output is the sum; two such steps make a decoder layer;
//! - the builder's final norm has no fourth output: the last layer's output is then the sum
//!   of the two inputs of that node, added up here.

use crate::formats::onnx_model::{check_external_data, external_data_file};
use crate::formats::protobuf::{self, WireType};
use crate::inside::FinalNorm;
use crate::Error;
use ndarray::Array2;
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A protobuf field as read off the wire.
#[derive(Debug, Clone, Copy)]
enum Wire<'a> {
    Varint(u64),
    Fixed64,
    /// The field's bytes and where they start in the buffer the reader walks.
    Bytes(&'a [u8], usize),
    Fixed32(u32),
}

/// Walks the fields of one protobuf message held in `buf[start..end]`.
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

fn bad(what: &str) -> Error {
    Error::GraphNotUnderstood {
        reason: format!("the model's protobuf is malformed ({what})"),
    }
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8], range: Range<usize>) -> Self {
        Fields {
            buf,
            pos: range.start,
            end: range.end,
        }
    }

    fn varint(&mut self) -> Result<u64, Error> {
        let (buf, pos) = (self.buf, &mut self.pos);
        protobuf::varint(|| {
            let b = buf.get(*pos).copied();
            *pos += 1;
            b
        })
        .map_err(|e| bad(&e.to_string()))
    }

    fn take(&mut self, n: usize) -> Result<(&'a [u8], usize), Error> {
        let start = self.pos;
        let end = start
            .checked_add(n)
            .filter(|&e| e <= self.end)
            .ok_or_else(|| bad("a field runs past its message"))?;
        self.pos = end;
        Ok((&self.buf[start..end], start))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Wire<'a>), Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.end {
            return None;
        }
        let field = (|| {
            let key = self.varint()?;
            let (field, wire) = protobuf::split_key(key);
            let wire = match wire.map_err(|w| bad(&format!("wire type {w}")))? {
                WireType::Varint => Wire::Varint(self.varint()?),
                WireType::Fixed64 => {
                    self.take(8)?;
                    Wire::Fixed64
                }
                WireType::Len => {
                    let n = usize::try_from(self.varint()?).map_err(|_| bad("huge length"))?;
                    let (b, at) = self.take(n)?;
                    Wire::Bytes(b, at)
                }
                WireType::Fixed32 => {
                    let (b, _) = self.take(4)?;
                    Wire::Fixed32(u32::from_le_bytes(b.try_into().expect("4 bytes")))
                }
            };
            Ok((field, wire))
        })();
        if field.is_err() {
            self.pos = self.end;
        }
        Some(field)
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Where an initializer's values are.
#[derive(Debug, Clone, PartialEq)]
enum Data {
    /// `raw_data`: little-endian values at this byte range of the model file.
    Raw(Range<usize>),
    /// Packed `float_data` at this byte range.
    Floats(Range<usize>),
    /// In a file beside the model (`external_data`): its location as the model names it,
    /// then, once [`Graph::parse`] has checked that it lies inside the model's folder, the
    /// file's real path.
    External {
        file: PathBuf,
        offset: u64,
        length: Option<u64>,
    },
    Empty,
}

/// A tensor stored in the model: an initializer or a Constant node's value.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Tensor {
    pub(super) dims: Vec<i64>,
    /// ONNX TensorProto.DataType (1 float32, 10 float16, 16 bfloat16 ...).
    pub(super) dtype: u64,
    data: Data,
}

impl Tensor {
    fn parse(buf: &[u8], range: Range<usize>) -> Result<(String, Tensor), Error> {
        let mut t = Tensor {
            dims: Vec::new(),
            dtype: 0,
            data: Data::Empty,
        };
        let mut name = String::new();
        let mut external: Vec<(String, String)> = Vec::new();
        for f in Fields::new(buf, range) {
            match f? {
                (1, Wire::Varint(d)) => t.dims.push(d as i64),
                (1, Wire::Bytes(b, at)) => {
                    let mut r = Fields::new(buf, at..at + b.len());
                    while r.pos < r.end {
                        t.dims.push(r.varint()? as i64);
                    }
                }
                (2, Wire::Varint(d)) => t.dtype = d,
                (4, Wire::Bytes(b, at)) => t.data = Data::Floats(at..at + b.len()),
                (8, Wire::Bytes(b, _)) => name = text(b),
                (9, Wire::Bytes(b, at)) => t.data = Data::Raw(at..at + b.len()),
                (13, Wire::Bytes(b, at)) => {
                    let (mut k, mut v) = (String::new(), String::new());
                    for f in Fields::new(buf, at..at + b.len()) {
                        match f? {
                            (1, Wire::Bytes(b, _)) => k = text(b),
                            (2, Wire::Bytes(b, _)) => v = text(b),
                            _ => {}
                        }
                    }
                    external.push((k, v));
                }
                _ => {}
            }
        }
        if !external.is_empty() {
            let get = |k: &str| external.iter().find(|(key, _)| key == k).map(|(_, v)| v);
            t.data = Data::External {
                file: get("location").map(PathBuf::from).unwrap_or_default(),
                offset: get("offset").and_then(|v| v.parse().ok()).unwrap_or(0),
                length: get("length").and_then(|v| v.parse().ok()),
            };
        }
        Ok((name, t))
    }

    fn elements(&self) -> usize {
        self.dims.iter().map(|&d| d.max(0) as usize).product()
    }
}

/// A node attribute the decoder search reads.
#[derive(Debug, Clone, PartialEq)]
enum Attr {
    Float(f32),
    Int(i64),
    Ints(Vec<i64>),
    Tensor(Tensor),
    Other,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Node {
    pub(super) op: String,
    pub(super) domain: String,
    pub(super) inputs: Vec<String>,
    pub(super) outputs: Vec<String>,
    attrs: Vec<(String, Attr)>,
}

impl Node {
    fn parse(buf: &[u8], range: Range<usize>) -> Result<Node, Error> {
        let mut n = Node {
            op: String::new(),
            domain: String::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            attrs: Vec::new(),
        };
        for f in Fields::new(buf, range) {
            match f? {
                (1, Wire::Bytes(b, _)) => n.inputs.push(text(b)),
                (2, Wire::Bytes(b, _)) => n.outputs.push(text(b)),
                (4, Wire::Bytes(b, _)) => n.op = text(b),
                (7, Wire::Bytes(b, _)) => n.domain = text(b),
                (5, Wire::Bytes(b, at)) => {
                    let (mut name, mut attr) = (String::new(), Attr::Other);
                    let mut ints = Vec::new();
                    for f in Fields::new(buf, at..at + b.len()) {
                        match f? {
                            (1, Wire::Bytes(b, _)) => name = text(b),
                            (2, Wire::Fixed32(v)) => attr = Attr::Float(f32::from_bits(v)),
                            (3, Wire::Varint(v)) => attr = Attr::Int(v as i64),
                            (5, Wire::Bytes(b, at)) => {
                                attr = Attr::Tensor(Tensor::parse(buf, at..at + b.len())?.1)
                            }
                            (8, Wire::Varint(v)) => ints.push(v as i64),
                            (8, Wire::Bytes(b, at)) => {
                                let mut r = Fields::new(buf, at..at + b.len());
                                while r.pos < r.end {
                                    ints.push(r.varint()? as i64);
                                }
                            }
                            _ => {}
                        }
                    }
                    if !ints.is_empty() {
                        attr = Attr::Ints(ints);
                    }
                    n.attrs.push((name, attr));
                }
                _ => {}
            }
        }
        Ok(n)
    }

    fn attr(&self, name: &str) -> Option<&Attr> {
        self.attrs.iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }

    fn float_attr(&self, name: &str) -> Option<f32> {
        match self.attr(name)? {
            Attr::Float(v) => Some(*v),
            _ => None,
        }
    }

    fn int_attr(&self, name: &str) -> Option<i64> {
        match self.attr(name)? {
            Attr::Int(v) => Some(*v),
            _ => None,
        }
    }
}

/// The parts of an ONNX model's graph the decoder search reads.
#[derive(Debug, Clone)]
pub(super) struct Graph {
    pub(super) nodes: Vec<Node>,
    initializers: HashMap<String, Tensor>,
    pub(super) outputs: Vec<String>,
    /// The byte range of the whole `graph` field (key, length and body) in the model.
    field: Range<usize>,
    /// The byte range of the graph message's body.
    body: Range<usize>,
    /// The model file, for initializer data.
    file: PathBuf,
}

impl Graph {
    /// Reads the graph of the model `bytes` (the contents of `file`); a model whose tensors
    /// keep their data outside its folder is refused here, before a session is built from it
    /// or a weight read.
    pub(super) fn parse(bytes: &[u8], file: &Path) -> anyhow::Result<Graph> {
        let mut model = Fields::new(bytes, 0..bytes.len());
        let mut graph = None;
        while model.pos < model.end {
            let field_start = model.pos;
            if let (7, Wire::Bytes(b, at)) = model.next().expect("not at the end")? {
                graph = Some((field_start..at + b.len(), at..at + b.len()));
            }
        }
        let (field, body) = graph.ok_or_else(|| bad("no graph"))?;
        let mut g = Graph {
            nodes: Vec::new(),
            initializers: HashMap::new(),
            outputs: Vec::new(),
            field,
            body: body.clone(),
            file: file.to_path_buf(),
        };
        for f in Fields::new(bytes, body) {
            match f? {
                (1, Wire::Bytes(b, at)) => g.nodes.push(Node::parse(bytes, at..at + b.len())?),
                (5, Wire::Bytes(b, at)) => {
                    let (name, t) = Tensor::parse(bytes, at..at + b.len())?;
                    g.initializers.insert(name, t);
                }
                (12, Wire::Bytes(b, at)) => {
                    for f in Fields::new(bytes, at..at + b.len()) {
                        if let (1, Wire::Bytes(name, _)) = f? {
                            g.outputs.push(text(name));
                        }
                    }
                }
                _ => {}
            }
        }
        // The session reads every tensor's data, subgraphs' too; the lens reads some itself.
        check_external_data(file)?;
        g.resolve_external_data()?;
        Ok(g)
    }

    /// Puts the real path of each initializer's and Constant value's external data in its
    /// place, refusing a location outside the model's folder (see [`external_data_file`]).
    fn resolve_external_data(&mut self) -> anyhow::Result<()> {
        let model = self.file.clone();
        let resolve = |name: &str, t: &mut Tensor| -> anyhow::Result<()> {
            if let Data::External { file, .. } = &mut t.data {
                *file = external_data_file(&model, name, &file.to_string_lossy())?;
            }
            Ok(())
        };
        for (name, t) in &mut self.initializers {
            resolve(name, t)?;
        }
        for n in self.nodes.iter_mut().filter(|n| n.op == "Constant") {
            let name = n.outputs.first().cloned().unwrap_or_default();
            for (_, a) in &mut n.attrs {
                if let Attr::Tensor(t) = a {
                    resolve(&name, t)?;
                }
            }
        }
        Ok(())
    }

    /// The model `bytes` with `names` added as float outputs of its graph (appended to the
    /// graph message, whose length prefix grows).
    pub(super) fn with_outputs(&self, bytes: &[u8], names: &[String]) -> Vec<u8> {
        let mut extra = Vec::new();
        for name in names {
            // ValueInfoProto { name = 1, type = 2: TypeProto { tensor_type = 1: { elem_type = 1 } } }
            let mut tensor = Vec::new();
            put_varint(&mut tensor, 1 << 3);
            put_varint(&mut tensor, 1);
            let mut ty = Vec::new();
            put_bytes(&mut ty, 1, &tensor);
            let mut vi = Vec::new();
            put_bytes(&mut vi, 1, name.as_bytes());
            put_bytes(&mut vi, 2, &ty);
            put_bytes(&mut extra, 12, &vi);
        }
        let mut out = Vec::with_capacity(bytes.len() + extra.len() + 16);
        out.extend_from_slice(&bytes[..self.field.start]);
        put_varint(&mut out, 7 << 3 | 2);
        put_varint(&mut out, (self.body.len() + extra.len()) as u64);
        out.extend_from_slice(&bytes[self.body.clone()]);
        out.extend_from_slice(&extra);
        out.extend_from_slice(&bytes[self.field.end..]);
        out
    }

    /// Whether any initializer keeps its data in another file.
    pub(super) fn has_external_data(&self) -> bool {
        self.initializers
            .values()
            .any(|t| matches!(t.data, Data::External { .. }))
    }

    fn producer(&self, value: &str) -> Option<&Node> {
        self.nodes
            .iter()
            .find(|n| n.outputs.iter().any(|o| o == value))
    }

    /// A stored tensor by value name: an initializer, or a Constant node's value.
    fn stored(&self, value: &str) -> Option<&Tensor> {
        if let Some(t) = self.initializers.get(value) {
            return Some(t);
        }
        let n = self.producer(value)?;
        match (n.op.as_str(), n.attr("value")) {
            ("Constant", Some(Attr::Tensor(t))) => Some(t),
            _ => None,
        }
    }

    /// The values of a stored float tensor, as f32.
    fn floats(&self, t: &Tensor) -> Result<Vec<f32>, Error> {
        let unreadable = |reason: String| Error::LensHeadUnreadable { reason };
        let bytes = match &t.data {
            Data::Raw(r) | Data::Floats(r) => read_range(&self.file, r.start as u64, r.len())?,
            Data::External {
                file,
                offset,
                length,
            } => {
                let size = match t.dtype {
                    1 => 4,
                    10 | 16 => 2,
                    d => return Err(unreadable(format!("a weight of ONNX type {d}"))),
                };
                let len = length.map_or(t.elements() * size, |l| l as usize);
                read_range(file, *offset, len)?
            }
            Data::Empty => return Err(unreadable("a weight without data".into())),
        };
        let out: Vec<f32> = match t.dtype {
            1 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            10 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            d => return Err(unreadable(format!("a weight of ONNX type {d}"))),
        };
        if out.len() != t.elements() {
            return Err(unreadable(format!(
                "a weight of shape {:?} holds {} values",
                t.dims,
                out.len()
            )));
        }
        Ok(out)
    }
}

fn read_range(path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, Error> {
    use std::io::{Read, Seek};
    let fail = |e: std::io::Error| Error::LensHeadUnreadable {
        reason: format!("reading {}: {e}", path.display()),
    };
    let mut f = std::fs::File::open(path).map_err(fail)?;
    f.seek(std::io::SeekFrom::Start(offset)).map_err(fail)?;
    let mut b = vec![0u8; len];
    f.read_exact(&mut b).map_err(fail)?;
    Ok(b)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, field: u64, b: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// How to get a decoder layer's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Hidden {
    /// A value of the graph.
    Value(String),
    /// The sum of two values (the builder's final norm adds them inside and keeps no sum).
    Sum(String, String),
}

impl Hidden {
    pub(super) fn values(&self) -> Vec<&str> {
        match self {
            Hidden::Value(v) => vec![v],
            Hidden::Sum(a, b) => vec![a, b],
        }
    }
}

/// The decoder as the graph shows it.
#[derive(Debug, Clone)]
pub(super) struct Decoder {
    /// Each layer's output.
    pub(super) layers: Vec<Hidden>,
    /// Each layer's attention softmax output, where attention is built from standard ops.
    pub(super) softmax: Result<Vec<String>, Error>,
}

/// Ops that compute attention in one node (their weights are no value of the graph).
const FUSED_ATTENTION: &[&str] = &[
    "GroupQueryAttention",
    "MultiHeadAttention",
    "Attention",
    "PackedMultiHeadAttention",
    "PackedAttention",
    "SparseAttention",
    "DecoderMaskedMultiHeadAttention",
];

fn is_skip_norm(op: &str) -> bool {
    matches!(
        op,
        "SkipSimplifiedLayerNormalization" | "SkipLayerNormalization"
    )
}

impl Graph {
    /// Finds the `n_layer` decoder layers.
    pub(super) fn decoder(&self, n_layer: usize) -> Result<Decoder, Error> {
        let not_understood = |reason: String| Error::GraphNotUnderstood { reason };
        let mut consumers: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for (slot, input) in n.inputs.iter().enumerate() {
                consumers.entry(input.as_str()).or_default().push((i, slot));
            }
        }
        let embed = self
            .nodes
            .iter()
            .find(|n| n.op.starts_with("Gather") && n.inputs.iter().any(|i| i == "input_ids"))
            .and_then(|n| n.outputs.first())
            .ok_or_else(|| not_understood("no embedding lookup (Gather of input_ids)".into()))?;
        let nodes_of =
            |v: &str| -> Vec<(usize, usize)> { consumers.get(v).cloned().unwrap_or_default() };
        let mut stream: Vec<Hidden> = Vec::new();
        let mut r = embed.clone();
        // A scale of the embeddings (Gemma multiplies them by sqrt(hidden)) comes first.
        for _ in 0..4 {
            let next = nodes_of(&r);
            let joins = next.iter().any(|&(i, _)| {
                let op = self.nodes[i].op.as_str();
                op == "Add" || is_skip_norm(op)
            });
            match next.as_slice() {
                [(i, _)]
                    if !joins && matches!(self.nodes[*i].op.as_str(), "Mul" | "Div" | "Cast") =>
                {
                    r = self.nodes[*i].outputs[0].clone();
                }
                _ => break,
            }
        }
        loop {
            let next = nodes_of(&r);
            let adds: Vec<usize> = next
                .iter()
                .filter(|&&(i, _)| {
                    let n = &self.nodes[i];
                    n.op == "Add" && n.inputs.len() == 2 && n.inputs[0] != n.inputs[1]
                })
                .map(|&(i, _)| i)
                .collect();
            let skips: Vec<usize> = next
                .iter()
                .filter(|&&(i, slot)| is_skip_norm(&self.nodes[i].op) && slot < 2)
                .map(|&(i, _)| i)
                .collect();
            match (adds.as_slice(), skips.as_slice()) {
                ([i], []) => {
                    r = self.nodes[*i].outputs[0].clone();
                    stream.push(Hidden::Value(r.clone()));
                }
                ([], [i]) => {
                    let n = &self.nodes[*i];
                    match n.outputs.get(3).filter(|o| !o.is_empty()) {
                        Some(sum) => {
                            r = sum.clone();
                            stream.push(Hidden::Value(r.clone()));
                        }
                        None => {
                            stream.push(Hidden::Sum(n.inputs[0].clone(), n.inputs[1].clone()));
                            break;
                        }
                    }
                }
                ([], []) => break,
                _ => {
                    return Err(not_understood(format!(
                        "the residual value {r} feeds {} additions",
                        adds.len() + skips.len()
                    )))
                }
            }
            if stream.len() > 4 * n_layer + 4 {
                return Err(not_understood("the residual stream does not end".into()));
            }
        }
        // Pre-norm blocks add twice per layer (attention, then MLP); parallel blocks once.
        let layers = if stream.len() == 2 * n_layer {
            stream.into_iter().skip(1).step_by(2).collect()
        } else if stream.len() == n_layer {
            stream
        } else {
            return Err(not_understood(format!(
                "the residual stream has {} additions for {n_layer} layers",
                stream.len()
            )));
        };
        let fused = self
            .nodes
            .iter()
            .find(|n| FUSED_ATTENTION.contains(&n.op.as_str()));
        let softmax = match fused {
            Some(n) => Err(Error::AttentionFused { op: n.op.clone() }),
            None => {
                let s: Vec<String> = self
                    .nodes
                    .iter()
                    .filter(|n| n.op == "Softmax")
                    .map(|n| n.outputs[0].clone())
                    .collect();
                if s.len() == n_layer {
                    Ok(s)
                } else {
                    Err(not_understood(format!(
                        "{} Softmax nodes for {n_layer} layers; attention cannot be told apart",
                        s.len()
                    )))
                }
            }
        };
        Ok(Decoder { layers, softmax })
    }

    /// The final norm and output head behind the `logits` output.
    pub(super) fn lens_head(&self) -> Result<crate::LensHead, Error> {
        let unreadable = |reason: String| Error::LensHeadUnreadable { reason };
        let mut v = "logits".to_string();
        let mut bias = None;
        // Through casts, identities and a bias addition to the head's matrix product.
        let head = loop {
            let n = self
                .producer(&v)
                .ok_or_else(|| unreadable(format!("nothing produces {v}")))?;
            match n.op.as_str() {
                "Identity" | "Cast" => v = n.inputs[0].clone(),
                "Add" => {
                    let (b, other) = match (self.stored(&n.inputs[0]), self.stored(&n.inputs[1])) {
                        (Some(t), None) => (t, &n.inputs[1]),
                        (None, Some(t)) => (t, &n.inputs[0]),
                        _ => {
                            return Err(unreadable(
                                "the logits come from an addition of two computed values".into(),
                            ))
                        }
                    };
                    bias = Some(self.floats(b)?);
                    v = other.clone();
                }
                "MatMul" | "Gemm" => break n,
                op => {
                    return Err(unreadable(format!(
                        "the logits come from a {op} node, not a matrix product"
                    )))
                }
            }
        };
        let (w, stored_as_vocab_rows) = match self.stored(&head.inputs[1]) {
            Some(t) => {
                let trans_b = head.op == "Gemm" && head.int_attr("transB") == Some(1);
                (t, trans_b)
            }
            None => {
                // Tied embeddings: the embedding matrix through a Transpose.
                let p = self.producer(&head.inputs[1]);
                match p
                    .filter(|p| p.op == "Transpose")
                    .and_then(|p| self.stored(&p.inputs[0]))
                {
                    Some(t) => (t, true),
                    None => {
                        return Err(unreadable(format!(
                            "the head's weight {} is not stored in the model",
                            head.inputs[1]
                        )))
                    }
                }
            }
        };
        if w.dims.len() != 2 {
            return Err(unreadable(format!(
                "the head's weight has shape {:?}",
                w.dims
            )));
        }
        let (r, c) = (w.dims[0] as usize, w.dims[1] as usize);
        let values = self.floats(w)?;
        let m = Array2::from_shape_vec((r, c), values).expect("checked element count");
        let m = if stored_as_vocab_rows {
            m
        } else {
            m.t().as_standard_layout().into_owned()
        };
        if head.op == "Gemm" {
            if let Some(c) = head.inputs.get(2).and_then(|c| self.stored(c)) {
                bias = Some(self.floats(c)?);
            }
        }
        let norm = self.final_norm(&head.inputs[0])?;
        let mut lens = crate::LensHead::new(norm, m)?;
        if let Some(b) = bias {
            lens = lens.with_bias(b)?;
        }
        Ok(lens)
    }

    /// The norm that produces `value`: a fused (Skip)SimplifiedLayerNormalization or
    /// LayerNormalization, or RMSNorm built from standard ops (`x / sqrt(mean(x²) + eps) * w`).
    fn final_norm(&self, value: &str) -> Result<FinalNorm, Error> {
        let unreadable = |reason: String| Error::LensHeadUnreadable { reason };
        let n = self
            .producer(value)
            .ok_or_else(|| unreadable(format!("nothing produces the head's input {value}")))?;
        let weight = |i: usize| -> Result<Vec<f32>, Error> {
            let name = n
                .inputs
                .get(i)
                .ok_or_else(|| unreadable(format!("{} has no input {i}", n.op)))?;
            let t = self
                .stored(name)
                .ok_or_else(|| unreadable(format!("{}'s weight {name} is computed", n.op)))?;
            self.floats(t)
        };
        let eps = n.float_attr("epsilon").unwrap_or(1e-5);
        match n.op.as_str() {
            "SimplifiedLayerNormalization" => Ok(FinalNorm::Rms {
                weight: weight(1)?,
                eps,
            }),
            "SkipSimplifiedLayerNormalization" => Ok(FinalNorm::Rms {
                weight: weight(2)?,
                eps,
            }),
            "LayerNormalization" => Ok(FinalNorm::Layer {
                weight: weight(1)?,
                bias: n
                    .inputs
                    .get(2)
                    .filter(|b| !b.is_empty())
                    .map(|_| weight(2))
                    .transpose()?,
                eps,
            }),
            "SkipLayerNormalization" => Ok(FinalNorm::Layer {
                weight: weight(2)?,
                bias: n
                    .inputs
                    .get(3)
                    .filter(|b| !b.is_empty())
                    .map(|_| weight(3))
                    .transpose()?,
                eps,
            }),
            "Mul" => {
                let (w, x) = match (self.stored(&n.inputs[0]), self.stored(&n.inputs[1])) {
                    (Some(t), None) if t.dims.len() == 1 => (t, &n.inputs[1]),
                    (None, Some(t)) if t.dims.len() == 1 => (t, &n.inputs[0]),
                    _ => {
                        return Err(unreadable(
                            "the final norm's scale is not a stored vector".into(),
                        ))
                    }
                };
                let (eps, rms) = self.rms_eps(x)?;
                if !rms {
                    return Err(unreadable(
                        "the final norm is neither RMSNorm nor a LayerNormalization node".into(),
                    ));
                }
                Ok(FinalNorm::Rms {
                    weight: self.floats(w)?,
                    eps,
                })
            }
            op => Err(unreadable(format!(
                "the head's input comes from a {op} node, not a norm"
            ))),
        }
    }

    /// In the few nodes before `value`: the epsilon added to the mean square, and whether
    /// they compute RMSNorm (a ReduceMean, no subtraction of the mean).
    fn rms_eps(&self, value: &str) -> Result<(f32, bool), Error> {
        let mut seen = vec![value.to_string()];
        let mut frontier = vec![value.to_string()];
        let (mut eps, mut mean, mut sub) = (None, false, false);
        for _ in 0..8 {
            let mut next = Vec::new();
            for v in &frontier {
                let Some(n) = self.producer(v) else { continue };
                match n.op.as_str() {
                    "ReduceMean" => mean = true,
                    "Sub" => sub = true,
                    "Add" => {
                        for i in &n.inputs {
                            if let Some(t) = self.stored(i) {
                                if t.elements() == 1 && t.dtype == 1 {
                                    eps = self.floats(t)?.first().copied();
                                }
                            }
                        }
                    }
                    _ => {}
                }
                if mean && eps.is_some() {
                    break;
                }
                for i in &n.inputs {
                    if !seen.contains(i) && self.stored(i).is_none() {
                        seen.push(i.clone());
                        next.push(i.clone());
                    }
                }
            }
            frontier = next;
        }
        match eps {
            Some(e) => Ok((e, mean && !sub)),
            None => Err(Error::LensHeadUnreadable {
                reason: "no epsilon found in the final norm".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> Node {
        Node {
            op: op.into(),
            domain: String::new(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            attrs: Vec::new(),
        }
    }

    fn graph(nodes: Vec<Node>) -> Graph {
        Graph {
            nodes,
            initializers: HashMap::new(),
            outputs: vec!["logits".into()],
            field: 0..0,
            body: 0..0,
            file: PathBuf::new(),
        }
    }

    #[test]
    fn residual_adds_and_skip_norms_make_layers() {
        // Two pre-norm layers from standard ops: each adds an attention and an MLP branch.
        let g = graph(vec![
            node("Gather", &["embed", "input_ids"], &["e"]),
            node("Mul", &["e", "e"], &["sq0"]),
            node("MatMul", &["sq0", "w"], &["attn0"]),
            node("Add", &["e", "attn0"], &["r1"]),
            node("MatMul", &["r1", "w"], &["mlp0"]),
            node("Add", &["r1", "mlp0"], &["r2"]),
            node("Softmax", &["s0"], &["p0"]),
            node("MatMul", &["r2", "w"], &["attn1"]),
            node("Add", &["r2", "attn1"], &["r3"]),
            node("Softmax", &["s1"], &["p1"]),
            node("MatMul", &["r3", "w"], &["mlp1"]),
            node("Add", &["r3", "mlp1"], &["r4"]),
        ]);
        let d = g.decoder(2).unwrap();
        assert_eq!(
            d.layers,
            vec![Hidden::Value("r2".into()), Hidden::Value("r4".into())]
        );
        assert_eq!(d.softmax.unwrap(), vec!["p0".to_string(), "p1".to_string()]);
        assert!(
            g.decoder(3).is_err(),
            "a layer count the graph does not show"
        );

        // The builder's layout: skip norms carry the stream, the final one keeps no sum.
        let g = graph(vec![
            node("Gather", &["embed", "input_ids"], &["e"]),
            node("SimplifiedLayerNormalization", &["e", "g"], &["n0"]),
            node(
                "SkipSimplifiedLayerNormalization",
                &["a0", "e", "g"],
                &["n1", "", "", "r1"],
            ),
            node(
                "SkipSimplifiedLayerNormalization",
                &["m0", "r1", "g"],
                &["n2", "", "", "r2"],
            ),
            node("GroupQueryAttention", &["q"], &["a1"]),
            node(
                "SkipSimplifiedLayerNormalization",
                &["a1", "r2", "g"],
                &["n3", "", "", "r3"],
            ),
            node(
                "SkipSimplifiedLayerNormalization",
                &["m1", "r3", "g"],
                &["final"],
            ),
        ]);
        let d = g.decoder(2).unwrap();
        assert_eq!(
            d.layers,
            vec![
                Hidden::Value("r2".into()),
                Hidden::Sum("m1".into(), "r3".into())
            ]
        );
        assert!(matches!(d.softmax, Err(Error::AttentionFused { .. })));
    }

    #[test]
    fn outputs_are_appended_to_the_graph() {
        let mut graph_body = Vec::new();
        put_bytes(&mut graph_body, 2, b"g");
        let mut model = Vec::new();
        put_varint(&mut model, 1 << 3);
        put_varint(&mut model, 9);
        put_bytes(&mut model, 7, &graph_body);
        put_bytes(&mut model, 15, b"after");
        let g = Graph::parse(&model, Path::new("m.onnx")).unwrap();
        let out = g.with_outputs(&model, &["h0".into(), "h1".into()]);
        let g2 = Graph::parse(&out, Path::new("m.onnx")).unwrap();
        assert_eq!(g2.outputs, vec!["h0".to_string(), "h1".to_string()]);
        assert!(out.ends_with(&[15 << 3 | 2, 5, b'a', b'f', b't', b'e', b'r']));
    }

    /// A model whose one initializer, `w`, keeps 16 bytes of floats in the file `location`.
    fn external_model(location: &str) -> Vec<u8> {
        let mut t = Vec::new();
        put_varint(&mut t, 1 << 3);
        put_varint(&mut t, 4);
        put_varint(&mut t, 2 << 3);
        put_varint(&mut t, 1);
        put_bytes(&mut t, 8, b"w");
        for (k, v) in [("location", location), ("length", "16")] {
            let mut entry = Vec::new();
            put_bytes(&mut entry, 1, k.as_bytes());
            put_bytes(&mut entry, 2, v.as_bytes());
            put_bytes(&mut t, 13, &entry);
        }
        let mut graph = Vec::new();
        put_bytes(&mut graph, 5, &t);
        let mut model = Vec::new();
        put_bytes(&mut model, 7, &graph);
        model
    }

    #[test]
    fn external_data_is_read_only_inside_the_model_folder() {
        let root = std::env::temp_dir().join(format!("graph-ext-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("model")).unwrap();
        let values: Vec<u8> = [1f32, 2., 3., 4.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        std::fs::write(root.join("model/w.bin"), &values).unwrap();
        std::fs::write(root.join("secret.bin"), &values).unwrap();
        let file = root.join("model/model.onnx");
        let parse = |location: &str| {
            let bytes = external_model(location);
            std::fs::write(&file, &bytes).unwrap();
            Graph::parse(&bytes, &file)
        };
        let g = parse("w.bin").unwrap();
        assert_eq!(g.floats(&g.initializers["w"]).unwrap(), [1., 2., 3., 4.]);
        // The lens read these with `dir.join(location)`, wherever they pointed.
        for location in ["../secret.bin", root.join("secret.bin").to_str().unwrap()] {
            let e = parse(location).unwrap_err().to_string();
            assert!(
                e.contains("tensor w keeps its data in")
                    && e.contains("outside the model's folder"),
                "{location}: {e}"
            );
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}
