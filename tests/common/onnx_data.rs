//! ONNX models whose weights live in another file (external data), made from a model that
//! holds them inline: for the tests of where that file may be. Only the protobuf fields on
//! the way are decoded (ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto.name = 8,
//! .raw_data = 9, .external_data = 13, .data_location = 14).

use std::path::Path;

fn varint(b: &[u8], p: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let x = b[*p];
        *p += 1;
        v |= u64::from(x & 0x7f) << shift;
        if x < 0x80 {
            break;
        }
    }
    v
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_field(out: &mut Vec<u8>, field: u64, body: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, body.len() as u64);
    out.extend_from_slice(body);
}

/// A field of a message.
struct Field<'a> {
    number: u64,
    /// The field as written: key, length and body.
    whole: &'a [u8],
    /// The body of a length-delimited field.
    body: Option<&'a [u8]>,
}

/// A message's fields.
fn fields(b: &[u8]) -> Vec<Field<'_>> {
    let mut out = Vec::new();
    let mut p = 0;
    while p < b.len() {
        let start = p;
        let key = varint(b, &mut p);
        let body = match key & 7 {
            0 => {
                varint(b, &mut p);
                None
            }
            1 => {
                p += 8;
                None
            }
            2 => {
                let n = varint(b, &mut p) as usize;
                p += n;
                Some(&b[p - n..p])
            }
            5 => {
                p += 4;
                None
            }
            w => panic!("wire type {w}"),
        };
        out.push(Field {
            number: key >> 3,
            whole: &b[start..p],
            body,
        });
    }
    out
}

/// `model` (ModelProto bytes) with its first initializer of 64 bytes of raw data or more
/// moved to external data at `location`: the new model, the tensor's name, and the bytes
/// that file must hold.
pub fn externalize(model: &[u8], location: &str) -> (Vec<u8>, String, Vec<u8>) {
    let mut out = Vec::new();
    let mut moved = None;
    for f in fields(model) {
        let (7, Some(graph)) = (f.number, f.body) else {
            out.extend_from_slice(f.whole);
            continue;
        };
        let mut g = Vec::new();
        for gf in fields(graph) {
            let ext = match (gf.number, gf.body, &moved) {
                (5, Some(t), None) => external(t, location),
                _ => None,
            };
            match ext {
                Some((tensor, name, data)) => {
                    put_field(&mut g, 5, &tensor);
                    moved = Some((name, data));
                }
                None => g.extend_from_slice(gf.whole),
            }
        }
        put_field(&mut out, 7, &g);
    }
    let (name, data) = moved.expect("an initializer with 64 bytes of raw data");
    (out, name, data)
}

/// The TensorProto `t` with its raw data at `location`, its name and the data; `None` for a
/// tensor of less than 64 bytes of raw data.
fn external(t: &[u8], location: &str) -> Option<(Vec<u8>, String, Vec<u8>)> {
    let fs = fields(t);
    let body = |n: u64| fs.iter().find(|f| f.number == n).and_then(|f| f.body);
    let data = body(9).filter(|d| d.len() >= 64)?.to_vec();
    let name = body(8)
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .unwrap_or_default();
    let mut out = Vec::new();
    for f in &fs {
        if !matches!(f.number, 9 | 13 | 14) {
            out.extend_from_slice(f.whole);
        }
    }
    let length = data.len().to_string();
    for (k, v) in [("location", location), ("offset", "0"), ("length", &length)] {
        let mut entry = Vec::new();
        put_field(&mut entry, 1, k.as_bytes());
        put_field(&mut entry, 2, v.as_bytes());
        put_field(&mut out, 13, &entry);
    }
    put_varint(&mut out, 14 << 3);
    put_varint(&mut out, 1);
    Some((out, name, data))
}

/// A copy of the model folder `src` at `dst` whose model keeps a weight at `location`, which
/// the caller fills; the tensor's name and its bytes.
pub fn copy_with_external(src: &Path, dst: &Path, location: &str) -> (String, Vec<u8>) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let model = std::fs::read(dst.join("model.onnx")).unwrap();
    let (model, name, data) = externalize(&model, location);
    std::fs::write(dst.join("model.onnx"), model).unwrap();
    (name, data)
}
