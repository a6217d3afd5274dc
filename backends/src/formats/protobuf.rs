//! Protocol Buffers' wire format, the one reader both ONNX readers use: base-128 varints, a
//! key's field number and wire type, and how many bytes a field of each type takes. The ONNX
//! model file is a `ModelProto` on this wire; `onnx_model` streams it from disk (its weights
//! skipped by seeking) and `onnx::graph` walks it in memory.

use std::io;

/// How a field's value is laid out on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireType {
    Varint,
    Fixed64,
    /// A varint length, then that many bytes (strings, bytes, embedded messages, packed
    /// repeated fields).
    Len,
    Fixed32,
}

impl WireType {
    /// The wire type in a key's low three bits; `Err` with the number for the group types
    /// (3, 4: deprecated, not in ONNX) and the undefined ones.
    pub fn of(key: u64) -> Result<Self, u64> {
        match key & 7 {
            0 => Ok(WireType::Varint),
            1 => Ok(WireType::Fixed64),
            2 => Ok(WireType::Len),
            5 => Ok(WireType::Fixed32),
            w => Err(w),
        }
    }

    /// The number of bytes a value of a fixed-size type takes.
    pub fn fixed_len(self) -> Option<u64> {
        match self {
            WireType::Fixed64 => Some(8),
            WireType::Fixed32 => Some(4),
            WireType::Varint | WireType::Len => None,
        }
    }
}

/// A field's key: its number and wire type.
pub fn split_key(key: u64) -> (u64, Result<WireType, u64>) {
    (key >> 3, WireType::of(key))
}

/// A varint read a byte at a time from `next` (`None`: the input ended inside it).
pub fn varint(mut next: impl FnMut() -> Option<u8>) -> io::Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = next().ok_or_else(|| invalid("truncated varint"))?;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(invalid("varint too long"))
}

pub fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_keys() {
        let mut bytes = [0xac, 0x02].into_iter();
        assert_eq!(varint(|| bytes.next()).unwrap(), 300);
        let mut cut = [0x80].into_iter();
        assert!(varint(|| cut.next()).is_err());
        let mut long = std::iter::repeat(0xff);
        assert!(varint(|| long.next()).is_err());
        assert_eq!(split_key(0x3a), (7, Ok(WireType::Len)));
        assert_eq!(split_key(0x0b), (1, Err(3)));
        assert_eq!(WireType::Fixed32.fixed_len(), Some(4));
    }
}
