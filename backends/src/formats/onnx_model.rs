//! Reads the element types of an ONNX model's weights (its graph initializers) straight from
//! the protobuf, without loading the weights: `compare` and `inspect` name them beside a GGUF's
//! tensor types. Also finds the weights kept in other files (external data), which must lie
//! inside the model's folder.
//!
//! Only the few fields needed are decoded (ModelProto.graph = 7, GraphProto.initializer = 5,
//! TensorProto.dims = 1, TensorProto.data_type = 2); everything else, the weight bytes
//! included, is skipped by seeking, so a 600 MB model is walked in milliseconds.

use super::gguf::quoted;
use super::protobuf::{self, WireType};
use crate::usage;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

/// Parameters and tensors of one element type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TypeCount {
    pub params: u64,
    pub tensors: u64,
}

/// What the initializers hold (integer shape and index constants left out).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WeightTypes {
    /// By type name (`F32`, `F16`, `BF16`, `I8`, `U8`, `I4`, ...).
    pub types: BTreeMap<String, TypeCount>,
    /// Stored bits per stored element, over every initializer.
    pub bits_per_weight: f64,
}

/// ONNX TensorProto.DataType: (name, bits per element).
fn data_type(t: u64) -> (&'static str, u32) {
    match t {
        1 => ("F32", 32),
        2 => ("U8", 8),
        3 => ("I8", 8),
        4 => ("U16", 16),
        5 => ("I16", 16),
        6 => ("I32", 32),
        7 => ("I64", 64),
        9 => ("BOOL", 8),
        10 => ("F16", 16),
        11 => ("F64", 64),
        12 => ("U32", 32),
        13 => ("U64", 64),
        16 => ("BF16", 16),
        17..=20 => ("F8", 8),
        21 => ("U4", 4),
        22 => ("I4", 4),
        23 => ("F4", 4),
        _ => ("other", 0),
    }
}

struct Reader {
    r: BufReader<File>,
    pos: u64,
    /// The file's size: no length read from it may reach past it.
    len: u64,
}

impl Reader {
    fn byte(&mut self) -> io::Result<u8> {
        let mut b = [0u8; 1];
        self.r.read_exact(&mut b)?;
        self.pos += 1;
        Ok(b[0])
    }

    fn varint(&mut self) -> io::Result<u64> {
        let mut err = None;
        let v = protobuf::varint(|| match self.byte() {
            Ok(b) => Some(b),
            Err(e) => {
                err = Some(e);
                None
            }
        });
        match err {
            Some(e) => Err(e),
            None => v,
        }
    }

    /// Where `n` more bytes end; an error past the end of the file. A length is any varint
    /// up to 2^64 - 1: unchecked, it wrapped into a seek backwards, and a field that seeks
    /// back onto itself is read forever.
    fn end_of(&self, n: u64) -> io::Result<u64> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.len => Ok(end),
            _ => Err(protobuf::invalid(
                "a protobuf field runs past the end of the file",
            )),
        }
    }

    fn skip(&mut self, n: u64) -> io::Result<()> {
        let end = self.end_of(n)?;
        // `end_of` bounds `n` by the file's size, far below i64::MAX.
        self.r.seek_relative(n as i64)?;
        self.pos = end;
        Ok(())
    }

    /// Skips a field of wire type `wire` whose key was just read.
    fn skip_field(&mut self, wire: u64) -> io::Result<()> {
        match WireType::of(wire) {
            Ok(WireType::Varint) => self.varint().map(|_| ()),
            Ok(WireType::Len) => {
                let n = self.varint()?;
                self.skip(n)
            }
            Ok(w) => self.skip(w.fixed_len().expect("a fixed-size type")),
            Err(w) => Err(protobuf::invalid(&format!(
                "unsupported protobuf wire type {w}"
            ))),
        }
    }

    /// Calls `f(field, wire, self)` for each field until `end`; `f` must consume the field.
    fn fields(
        &mut self,
        end: u64,
        mut f: impl FnMut(u64, u64, &mut Reader) -> io::Result<()>,
    ) -> io::Result<()> {
        while self.pos < end {
            let key = self.varint()?;
            f(key >> 3, key & 7, self)?;
        }
        if self.pos != end {
            return Err(protobuf::invalid("a protobuf field runs past its message"));
        }
        Ok(())
    }
}

/// A graph input or output: its name, element type and dimensions (a number, or a symbolic
/// name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueInfo {
    pub name: String,
    /// ONNX TensorProto.DataType name (`F32`, `I64`, ...), `?` when absent.
    pub elem_type: String,
    pub dims: Vec<Dim>,
}

/// One dimension of a graph value's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    Named(String),
    Unknown,
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Named(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// What an ONNX graph takes, gives, and is built of, read without its weights.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GraphIo {
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    /// Nodes by op type (`domain:op` outside the default domain).
    pub ops: BTreeMap<String, usize>,
}

impl Reader {
    fn bytes(&mut self, n: u64) -> io::Result<Vec<u8>> {
        let n = usize::try_from(n).map_err(|_| io::Error::other("huge field"))?;
        if n > 1 << 20 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a name of more than 1 MiB",
            ));
        }
        let mut b = vec![0u8; n];
        self.r.read_exact(&mut b)?;
        self.pos += n as u64;
        Ok(b)
    }

    /// Calls `f` for each field of the embedded message whose key was just read.
    fn message(
        &mut self,
        f: impl FnMut(u64, u64, &mut Reader) -> io::Result<()>,
    ) -> io::Result<()> {
        let n = self.varint()?;
        let end = self.end_of(n)?;
        self.fields(end, f)
    }

    /// A length-delimited string field whose key was just read.
    fn string(&mut self) -> io::Result<String> {
        let n = self.varint()?;
        Ok(String::from_utf8_lossy(&self.bytes(n)?).into_owned())
    }

    /// A ValueInfoProto whose key was just read.
    fn value_info(&mut self) -> io::Result<ValueInfo> {
        let mut v = ValueInfo {
            name: String::new(),
            elem_type: "?".into(),
            dims: Vec::new(),
        };
        self.message(|field, wire, r| match (field, wire) {
            (1, 2) => {
                v.name = r.string()?;
                Ok(())
            }
            // TypeProto { tensor_type = 1: { elem_type = 1, shape = 2: { dim = 1 } } }
            (2, 2) => r.message(|field, wire, r| {
                if (field, wire) != (1, 2) {
                    return r.skip_field(wire);
                }
                r.message(|field, wire, r| match (field, wire) {
                    (1, 0) => {
                        v.elem_type = data_type(r.varint()?).0.to_string();
                        Ok(())
                    }
                    (2, 2) => r.message(|field, wire, r| {
                        if (field, wire) != (1, 2) {
                            return r.skip_field(wire);
                        }
                        let mut d = Dim::Unknown;
                        r.message(|field, wire, r| match (field, wire) {
                            (1, 0) => {
                                d = Dim::Fixed(r.varint()? as i64);
                                Ok(())
                            }
                            (2, 2) => {
                                d = Dim::Named(r.string()?);
                                Ok(())
                            }
                            _ => r.skip_field(wire),
                        })?;
                        v.dims.push(d);
                        Ok(())
                    }),
                    _ => r.skip_field(wire),
                })
            }),
            _ => r.skip_field(wire),
        })?;
        Ok(v)
    }
}

/// Calls `f(field, wire, reader)` for each field of the model's graph (ModelProto.graph = 7),
/// everything else skipped by seeking; `f` must consume the field.
fn graph_fields(
    path: &Path,
    mut f: impl FnMut(u64, u64, &mut Reader) -> io::Result<()>,
) -> io::Result<()> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut r = Reader {
        r: BufReader::new(file),
        pos: 0,
        len,
    };
    r.fields(len, |field, wire, r| {
        if field != 7 || wire != 2 {
            return r.skip_field(wire);
        }
        r.message(&mut f)
    })
}

/// The inputs, outputs and op types of the ONNX model at `path`, its weights skipped by
/// seeking (a 600 MB model is read in milliseconds).
pub fn graph_io(path: &Path) -> io::Result<GraphIo> {
    let mut out = GraphIo::default();
    let mut initializers = std::collections::HashSet::new();
    graph_fields(path, |field, wire, r| match (field, wire) {
        (11, 2) => {
            out.inputs.push(r.value_info()?);
            Ok(())
        }
        (12, 2) => {
            out.outputs.push(r.value_info()?);
            Ok(())
        }
        // An initializer's name (TensorProto.name = 8), its data skipped.
        (5, 2) => r.message(|field, wire, r| match (field, wire) {
            (8, 2) => {
                initializers.insert(r.string()?);
                Ok(())
            }
            _ => r.skip_field(wire),
        }),
        (1, 2) => {
            let (mut op, mut domain) = (String::new(), String::new());
            r.message(|field, wire, r| match (field, wire) {
                (4, 2) => {
                    op = r.string()?;
                    Ok(())
                }
                (7, 2) => {
                    domain = r.string()?;
                    Ok(())
                }
                _ => r.skip_field(wire),
            })?;
            let key = if domain.is_empty() || domain == "ai.onnx" {
                op
            } else {
                format!("{domain}:{op}")
            };
            *out.ops.entry(key).or_default() += 1;
            Ok(())
        }
        _ => r.skip_field(wire),
    })?;
    // Exports of IR version 3 and older list every initializer as an input too.
    out.inputs.retain(|i| !initializers.contains(&i.name));
    Ok(out)
}

/// The weight types of the ONNX model at `path`.
pub fn weight_types(path: &Path) -> io::Result<WeightTypes> {
    let mut out = WeightTypes::default();
    let (mut bits, mut elems) = (0u128, 0u128);
    graph_fields(path, |field, wire, r| {
        if field != 5 || wire != 2 {
            return r.skip_field(wire);
        }
        let (mut count, mut dtype) = (1u64, 0u64);
        r.message(|field, wire, r| match (field, wire) {
            (1, 0) => {
                count = count.saturating_mul(r.varint()?);
                Ok(())
            }
            (1, 2) => {
                let n = r.varint()?;
                let end = r.end_of(n)?;
                while r.pos < end {
                    count = count.saturating_mul(r.varint()?);
                }
                Ok(())
            }
            (2, 0) => {
                dtype = r.varint()?;
                Ok(())
            }
            _ => r.skip_field(wire),
        })?;
        let (name, b) = data_type(dtype);
        // Shapes, axes and indices, not weights (quantized weights are U8/I4/U4).
        if matches!(name, "I64" | "I32" | "BOOL") {
            return Ok(());
        }
        let e = out.types.entry(name.to_string()).or_default();
        e.params += count;
        e.tensors += 1;
        bits += u128::from(count) * u128::from(b);
        elems += u128::from(count);
        Ok(())
    })?;
    out.bits_per_weight = if elems > 0 {
        bits as f64 / elems as f64
    } else {
        0.0
    };
    Ok(out)
}

/// The file that holds tensor `tensor`'s external data, named `location` by the model file
/// `model`. It must lie inside the model's folder: an absolute location, a `..` step or a
/// link out of the folder would let a model file make the engine read any file on the
/// machine.
pub fn external_data_file(model: &Path, tensor: &str, location: &str) -> anyhow::Result<PathBuf> {
    let dir = match model.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let (shown_model, tensor) = (model.display(), quoted(tensor, 80));
    let refuse = |why: String| {
        usage!(
            "{shown_model}: tensor {tensor} keeps its data in \"{}\", {why} outside the model's folder {}; a model may read only files inside its folder: put the data file there, named relative to it",
            quoted(location, 200),
            dir.display()
        )
    };
    let rel = Path::new(location);
    if location.is_empty() {
        return Err(usage!(
            "{shown_model}: tensor {tensor} keeps its data in another file but names none; export the model again"
        ));
    }
    if rel.is_absolute() {
        return Err(refuse("an absolute path".into()));
    }
    if rel.components().any(|c| c == Component::ParentDir) {
        return Err(refuse("a path that climbs through '..'".into()));
    }
    let unreadable = |e: io::Error| {
        usage!(
            "{shown_model}: tensor {tensor} keeps its data in \"{}\", which cannot be read in the model's folder {} ({e}); download the model's data files with it",
            quoted(location, 200),
            dir.display()
        )
    };
    let real = dir.join(rel).canonicalize().map_err(unreadable)?;
    let real_dir = dir.canonicalize().map_err(unreadable)?;
    if !real.starts_with(&real_dir) {
        return Err(refuse(format!("a link to {}", real.display())));
    }
    Ok(real)
}

/// Refuses a model whose tensors keep their data outside its folder (see
/// [`external_data_file`]), before an engine reads the model. A protobuf this walk cannot
/// read is left to the engine, which says what is wrong with it.
pub fn check_external_data(model: &Path) -> anyhow::Result<()> {
    let Ok(tensors) = external_data(model) else {
        return Ok(());
    };
    for (tensor, location) in tensors {
        external_data_file(model, &tensor, &location)?;
    }
    Ok(())
}

/// How deep subgraphs (the bodies of If, Loop and Scan nodes) may nest: protobuf's own
/// parser stops at 100 levels of messages, and each subgraph is several.
const MAX_SUBGRAPH_DEPTH: usize = 32;

/// Each tensor of the model at `path` that keeps its data in another file: its name and
/// location. Tensors are looked for wherever ONNX puts them: initializers, sparse
/// initializers, node attributes, the subgraphs of control-flow nodes, and functions.
pub fn external_data(path: &Path) -> io::Result<Vec<(String, String)>> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut r = Reader {
        r: BufReader::new(file),
        pos: 0,
        len,
    };
    let mut out = Vec::new();
    r.fields(len, |field, wire, r| match (field, wire) {
        // ModelProto.graph, .functions (FunctionProto.node = 7)
        (7, 2) => r.message(|f, w, r| graph_tensors(f, w, r, &mut out, 0)),
        (25, 2) => r.message(|f, w, r| match (f, w) {
            (7, 2) => r.message(|f, w, r| node_tensors(f, w, r, &mut out, 0)),
            _ => r.skip_field(w),
        }),
        _ => r.skip_field(wire),
    })?;
    Ok(out)
}

/// A GraphProto field: nodes (1), initializers (5), sparse initializers (15).
fn graph_tensors(
    field: u64,
    wire: u64,
    r: &mut Reader,
    out: &mut Vec<(String, String)>,
    depth: usize,
) -> io::Result<()> {
    match (field, wire) {
        (1, 2) => r.message(|f, w, r| node_tensors(f, w, r, out, depth)),
        (5, 2) => tensor_location(r, out),
        (15, 2) => sparse_tensor(r, out),
        _ => r.skip_field(wire),
    }
}

/// A NodeProto field: its attributes (5), whose tensors are `t` (5) and `tensors` (10),
/// subgraphs `g` (6) and `graphs` (11), sparse tensors (22, 23).
fn node_tensors(
    field: u64,
    wire: u64,
    r: &mut Reader,
    out: &mut Vec<(String, String)>,
    depth: usize,
) -> io::Result<()> {
    if (field, wire) != (5, 2) {
        return r.skip_field(wire);
    }
    r.message(|f, w, r| match (f, w) {
        (5, 2) | (10, 2) => tensor_location(r, out),
        (22, 2) | (23, 2) => sparse_tensor(r, out),
        (6, 2) | (11, 2) if depth < MAX_SUBGRAPH_DEPTH => {
            r.message(|f, w, r| graph_tensors(f, w, r, out, depth + 1))
        }
        (6, 2) | (11, 2) => Err(protobuf::invalid("subgraphs nested too deep")),
        _ => r.skip_field(w),
    })
}

/// A SparseTensorProto: its values (1) and indices (2) are tensors.
fn sparse_tensor(r: &mut Reader, out: &mut Vec<(String, String)>) -> io::Result<()> {
    r.message(|f, w, r| match (f, w) {
        (1, 2) | (2, 2) => tensor_location(r, out),
        _ => r.skip_field(w),
    })
}

/// A TensorProto: its name (8) and, when it has one, the `location` of its external data
/// (13, key 1 and value 2), its data skipped.
fn tensor_location(r: &mut Reader, out: &mut Vec<(String, String)>) -> io::Result<()> {
    let (mut name, mut location) = (String::new(), None);
    r.message(|f, w, r| match (f, w) {
        (8, 2) => {
            name = r.string()?;
            Ok(())
        }
        (13, 2) => {
            let (mut key, mut value) = (String::new(), String::new());
            r.message(|f, w, r| match (f, w) {
                (1, 2) => {
                    key = r.string()?;
                    Ok(())
                }
                (2, 2) => {
                    value = r.string()?;
                    Ok(())
                }
                _ => r.skip_field(w),
            })?;
            if key == "location" {
                location = Some(value);
            }
            Ok(())
        }
        _ => r.skip_field(w),
    })?;
    if let Some(l) = location {
        out.push((name, l));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn field(num: u64, body: &[u8], out: &mut Vec<u8>) {
        varint(num << 3 | 2, out);
        varint(body.len() as u64, out);
        out.extend_from_slice(body);
    }

    /// A TensorProto with packed or unpacked dims, a type, a name and raw data.
    fn tensor(dims: &[u64], dtype: u64, packed: bool) -> Vec<u8> {
        let mut t = Vec::new();
        if packed {
            let mut d = Vec::new();
            for &x in dims {
                varint(x, &mut d);
            }
            field(1, &d, &mut t);
        } else {
            for &x in dims {
                varint(1 << 3, &mut t);
                varint(x, &mut t);
            }
        }
        varint(2 << 3, &mut t);
        varint(dtype, &mut t);
        field(8, b"w", &mut t);
        field(9, &[0u8; 40], &mut t);
        t
    }

    #[test]
    fn counts_initializers_by_type() {
        let mut graph = Vec::new();
        field(1, b"node bytes to skip", &mut graph);
        field(5, &tensor(&[4, 8], 1, true), &mut graph);
        field(5, &tensor(&[16], 10, false), &mut graph);
        field(5, &tensor(&[2, 2], 1, false), &mut graph);
        field(5, &tensor(&[3], 7, true), &mut graph); // an I64 shape constant
        let mut model = Vec::new();
        varint(1 << 3, &mut model); // ir_version
        varint(9, &mut model);
        field(7, &graph, &mut model);
        let dir = std::env::temp_dir().join(format!("onnx-proto-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.onnx");
        std::fs::write(&path, &model).unwrap();
        let w = weight_types(&path).unwrap();
        assert_eq!(
            w.types["F32"],
            TypeCount {
                params: 36,
                tensors: 2
            }
        );
        assert_eq!(
            w.types["F16"],
            TypeCount {
                params: 16,
                tensors: 1
            }
        );
        assert!(!w.types.contains_key("I64"));
        assert!((w.bits_per_weight - (36.0 * 32.0 + 16.0 * 16.0) / 52.0).abs() < 1e-12);
        // A truncated file is an error, not a wrong answer.
        std::fs::write(&path, &model[..model.len() - 10]).unwrap();
        assert!(weight_types(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A TensorProto named `name` whose data is in the file `location`.
    fn external_tensor(name: &str, location: &str) -> Vec<u8> {
        let mut t = Vec::new();
        varint(1 << 3, &mut t);
        varint(4, &mut t);
        varint(2 << 3, &mut t);
        varint(1, &mut t);
        field(8, name.as_bytes(), &mut t);
        for (k, v) in [("location", location), ("offset", "0"), ("length", "16")] {
            let mut entry = Vec::new();
            field(1, k.as_bytes(), &mut entry);
            field(2, v.as_bytes(), &mut entry);
            field(13, &entry, &mut t);
        }
        varint(14 << 3, &mut t);
        varint(1, &mut t);
        t
    }

    /// A model whose graph holds `graph` (GraphProto fields).
    fn model(graph: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        varint(1 << 3, &mut m);
        varint(9, &mut m);
        field(7, graph, &mut m);
        m
    }

    /// An If node whose then-branch holds a Constant whose value is `tensor`.
    fn if_node_with(tensor: &[u8]) -> Vec<u8> {
        let mut attr = Vec::new();
        field(1, b"value", &mut attr);
        field(5, tensor, &mut attr);
        let mut constant = Vec::new();
        field(4, b"Constant", &mut constant);
        field(5, &attr, &mut constant);
        let mut branch = Vec::new();
        field(1, &constant, &mut branch);
        let mut g_attr = Vec::new();
        field(1, b"then_branch", &mut g_attr);
        field(6, &branch, &mut g_attr);
        let mut node = Vec::new();
        field(4, b"If", &mut node);
        field(5, &g_attr, &mut node);
        node
    }

    /// A folder of its own under the temp dir, removed when dropped.
    struct Folder(std::path::PathBuf);

    impl Drop for Folder {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn folder(name: &str) -> Folder {
        let p = std::env::temp_dir().join(format!("onnx-ext-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(p.join("model")).unwrap();
        std::fs::write(p.join("model/w.bin"), [0u8; 16]).unwrap();
        std::fs::write(p.join("outside.bin"), [0u8; 16]).unwrap();
        Folder(p)
    }

    #[test]
    fn external_data_outside_the_folder_is_refused() {
        let f = folder("refused");
        let path = f.0.join("model/model.onnx");
        let outside = f.0.join("outside.bin");
        std::os::unix::fs::symlink(&outside, f.0.join("model/link.bin")).unwrap();
        let check = |graph: &[u8]| {
            std::fs::write(&path, model(graph)).unwrap();
            check_external_data(&path).map_err(|e| e.to_string())
        };
        let mut g = Vec::new();
        field(5, &external_tensor("inside", "w.bin"), &mut g);
        check(&g).unwrap();
        for (location, why) in [
            ("../outside.bin", "a path that climbs through '..'"),
            ("sub/../../outside.bin", "a path that climbs through '..'"),
            (outside.to_str().unwrap(), "an absolute path"),
            ("link.bin", "a link to"),
        ] {
            let mut g = Vec::new();
            field(5, &external_tensor("embed", location), &mut g);
            let e = check(&g).unwrap_err();
            assert!(
                e.contains(&format!(
                    "tensor embed keeps its data in \"{location}\", {why}"
                )) && e.contains("outside the model's folder"),
                "{location}: {e}"
            );
        }
        let mut g = Vec::new();
        field(5, &external_tensor("gone", "gone.bin"), &mut g);
        let e = check(&g).unwrap_err();
        assert!(e.contains("which cannot be read"), "{e}");
        // A Constant inside a subgraph, and a sparse initializer's values.
        let mut g = Vec::new();
        field(
            1,
            &if_node_with(&external_tensor("c", "../outside.bin")),
            &mut g,
        );
        let e = check(&g).unwrap_err();
        assert!(e.contains("tensor c keeps its data"), "{e}");
        let mut sparse = Vec::new();
        field(1, &external_tensor("s", "/etc/passwd"), &mut sparse);
        let mut g = Vec::new();
        field(15, &sparse, &mut g);
        let e = check(&g).unwrap_err();
        assert!(e.contains("tensor s keeps its data"), "{e}");
    }

    #[test]
    fn a_length_past_the_end_is_an_error_not_a_loop() {
        // A field whose length, 2^64 - 11, wrapped into a seek back onto its own key: the
        // walk read it forever.
        let f = folder("loop");
        let path = f.0.join("model/model.onnx");
        let mut b = vec![1 << 3 | 2];
        varint(u64::MAX - 10, &mut b);
        b.extend([0u8; 20]);
        std::fs::write(&path, b).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            tx.send((
                graph_io(&p).is_err(),
                weight_types(&p).is_err(),
                external_data(&p).is_err(),
            ))
            .unwrap();
        });
        let errs = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the walk ends");
        assert_eq!(errs, (true, true, true));
    }
}
