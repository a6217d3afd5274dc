//! A GGUF rewriter for tests: reads a file's metadata entries as typed values and its tensor
//! table as it is, and writes the file again with entries changed, added or removed (the
//! tensor data is copied unchanged, placed at the alignment the new metadata says).

use std::path::Path;

/// A metadata value, with the GGUF type it is written as.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    U32(u32),
    I32(i32),
    F32(f32),
    U64(u64),
    Bool(bool),
    Str(Vec<u8>),
    /// Element type and the elements.
    Arr(u32, Vec<Val>),
    /// Any other fixed-size scalar: its type and bytes.
    Raw(u32, Vec<u8>),
}

pub struct Gguf {
    pub version: u32,
    pub kv: Vec<(String, Val)>,
    /// The tensor table, bytes as in the file (names, dims, types, offsets).
    tensor_table: Vec<u8>,
    n_tensors: u64,
    /// The tensor data, from the first tensor's start to the end of the file.
    data: Vec<u8>,
}

struct Cur<'a> {
    b: &'a [u8],
    p: usize,
}

impl Cur<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.b[self.p..self.p + n];
        self.p += n;
        s
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn bytes(&mut self) -> Vec<u8> {
        let n = self.u64() as usize;
        self.take(n).to_vec()
    }
    fn val(&mut self, ty: u32) -> Val {
        match ty {
            4 => Val::U32(self.u32()),
            5 => Val::I32(self.u32() as i32),
            6 => Val::F32(f32::from_bits(self.u32())),
            7 => Val::Bool(self.take(1)[0] != 0),
            8 => Val::Str(self.bytes()),
            9 => {
                let et = self.u32();
                let n = self.u64();
                Val::Arr(et, (0..n).map(|_| self.val(et)).collect())
            }
            10 => Val::U64(self.u64()),
            0 | 1 => Val::Raw(ty, self.take(1).to_vec()),
            2 | 3 => Val::Raw(ty, self.take(2).to_vec()),
            11 | 12 => Val::Raw(ty, self.take(8).to_vec()),
            t => panic!("GGUF value type {t}"),
        }
    }
}

fn ty(v: &Val) -> u32 {
    match v {
        Val::U32(_) => 4,
        Val::I32(_) => 5,
        Val::F32(_) => 6,
        Val::Bool(_) => 7,
        Val::Str(_) => 8,
        Val::Arr(..) => 9,
        Val::U64(_) => 10,
        Val::Raw(t, _) => *t,
    }
}

fn put(out: &mut Vec<u8>, v: &Val) {
    match v {
        Val::U32(x) => out.extend(x.to_le_bytes()),
        Val::I32(x) => out.extend(x.to_le_bytes()),
        Val::F32(x) => out.extend(x.to_bits().to_le_bytes()),
        Val::U64(x) => out.extend(x.to_le_bytes()),
        Val::Bool(b) => out.push(*b as u8),
        Val::Str(s) => {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s);
        }
        Val::Arr(et, items) => {
            out.extend(et.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for i in items {
                put(out, i);
            }
        }
        Val::Raw(_, b) => out.extend(b),
    }
}

impl Gguf {
    pub fn read(path: &Path) -> Gguf {
        let b = std::fs::read(path).unwrap();
        let mut c = Cur { b: &b, p: 0 };
        assert_eq!(c.take(4), b"GGUF");
        let version = c.u32();
        let n_tensors = c.u64();
        let n_kv = c.u64();
        let mut kv = Vec::new();
        for _ in 0..n_kv {
            let key = String::from_utf8(c.bytes()).unwrap();
            let t = c.u32();
            kv.push((key, c.val(t)));
        }
        let table_start = c.p;
        for _ in 0..n_tensors {
            c.bytes();
            let nd = c.u32();
            for _ in 0..nd {
                c.u64();
            }
            c.u32();
            c.u64();
        }
        let tensor_table = b[table_start..c.p].to_vec();
        let align =
            kv.iter()
                .find(|(k, _)| k == "general.alignment")
                .map_or(32, |(_, v)| match v {
                    Val::U32(a) => *a as usize,
                    _ => 32,
                });
        let data_start = c.p.div_ceil(align) * align;
        Gguf {
            version,
            kv,
            tensor_table,
            n_tensors,
            data: b[data_start..].to_vec(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Val> {
        self.kv.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Sets (or adds) `key`.
    pub fn set(&mut self, key: &str, v: Val) -> &mut Self {
        match self.kv.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = v,
            None => self.kv.push((key.to_string(), v)),
        }
        self
    }

    pub fn architecture(&self) -> String {
        match self.get("general.architecture") {
            Some(Val::Str(s)) => String::from_utf8(s.clone()).unwrap(),
            _ => panic!("no architecture"),
        }
    }

    /// The vocabulary's tokens, to change in place.
    pub fn tokens_mut(&mut self) -> &mut Vec<Val> {
        match self
            .kv
            .iter_mut()
            .find(|(k, _)| k == "tokenizer.ggml.tokens")
        {
            Some((_, Val::Arr(_, items))) => items,
            _ => panic!("no token list"),
        }
    }

    pub fn write(&self, path: &Path) {
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(self.version.to_le_bytes());
        out.extend(self.n_tensors.to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            out.extend((k.len() as u64).to_le_bytes());
            out.extend(k.as_bytes());
            out.extend(ty(v).to_le_bytes());
            put(&mut out, v);
        }
        out.extend(&self.tensor_table);
        let align = match self.get("general.alignment") {
            Some(Val::U32(a)) if *a > 0 => *a as usize,
            _ => 32,
        };
        out.resize(out.len().div_ceil(align) * align, 0);
        out.extend(&self.data);
        std::fs::write(path, out).unwrap();
    }
}

/// The start of a GGUF v3 file whose counts say what they are told, true or not, followed by
/// `body`: for headers built to be refused.
pub fn raw_header(n_tensors: u64, n_kv: u64, body: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b.extend(body);
    b
}

/// A tensor entry of a GGUF header, as written after the metadata.
pub fn tensor_entry(name: &str, dims: &[u64], ggml_type: u32, offset: u64) -> Vec<u8> {
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

/// An array value as it is written after its type (9): the element type, the count it
/// claims, then `items` (what the file really holds). With [`Val::Raw`]`(9, ..)` it goes into
/// a [`Gguf`].
pub fn array_value(et: u32, n: u64, items: &[u8]) -> Vec<u8> {
    let mut b = et.to_le_bytes().to_vec();
    b.extend(n.to_le_bytes());
    b.extend(items);
    b
}

/// An array value nested `depth` arrays deep, around one empty array of u32.
pub fn nested_array_value(depth: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(12 * (depth + 1));
    for _ in 0..depth {
        b.extend(array_value(9, 1, &[]));
    }
    b.extend(array_value(4, 0, &[]));
    b
}

/// A metadata entry `key` of GGUF type `ty` whose value is `value` as it is.
pub fn raw_kv(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
    let mut b = (key.len() as u64).to_le_bytes().to_vec();
    b.extend(key.as_bytes());
    b.extend(ty.to_le_bytes());
    b.extend(value);
    b
}
