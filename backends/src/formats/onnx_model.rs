//! Reads the element types of an ONNX model's weights (its graph initializers) straight from
//! the protobuf, without loading the weights: `compare` and `inspect` name them beside a GGUF's
//! tensor types.
//!
//! Only the few fields needed are decoded (ModelProto.graph = 7, GraphProto.initializer = 5,
//! TensorProto.dims = 1, TensorProto.data_type = 2); everything else, the weight bytes
//! included, is skipped by seeking, so a 600 MB model is walked in milliseconds.

use super::protobuf::{self, WireType};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

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

    fn skip(&mut self, n: u64) -> io::Result<()> {
        self.r.seek_relative(n as i64)?;
        self.pos += n;
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
        let end = self.pos + n;
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
                let end = r.pos + n;
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
}
