//! Token text as users should see it.
//!
//! Pieces are bytes. A piece that is not valid UTF-8 on its own (a fragment of a multi-byte
//! character split by byte-level BPE) is shown with `<0xNN>` escapes for the bytes that do not
//! decode, never dropped or replaced silently. An id the tokenizer does not define (a padded
//! logits column) is shown as `<id:N>`.

pub mod chat;

use logitprobe_backends::{TokenId, Vocab};
use std::collections::HashMap;

/// Shows `bytes` as text, escaping bytes that are not part of valid UTF-8 as `<0xNN>`.
///
/// ```
/// assert_eq!(logitprobe::text::show_bytes(b" Paris"), " Paris");
/// assert_eq!(logitprobe::text::show_bytes(&[0xe2, 0x82]), "<0xE2><0x82>");
/// ```
pub fn show_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("<0x{b:02X}>"));
        }
    }
    out
}

/// Memoized id → display text (a trace asks for the same ids many times, and engines' piece
/// look-ups go through FFI).
#[derive(Default)]
pub struct Pieces {
    cache: HashMap<TokenId, String>,
}

impl Pieces {
    /// The display text of one token of `source`.
    pub fn get(&mut self, source: &dyn Vocab, id: TokenId) -> String {
        self.cache
            .entry(id)
            .or_insert_with(|| match source.token_bytes(id) {
                Some(b) => show_bytes(&b),
                None => format!("<id:{id}>"),
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_without_a_piece() {
        let src = logitprobe_backends::test_source::TestSource::new(300, 0);
        let mut pieces = Pieces::default();
        assert_eq!(pieces.get(&src, 299), "<id:299>");
        assert_eq!(pieces.get(&src, 65), "A");
        assert_eq!(pieces.get(&src, 0xE2), "<0xE2>");
    }

    #[test]
    fn escapes_only_invalid_bytes() {
        assert_eq!(show_bytes("é".as_bytes()), "é");
        assert_eq!(show_bytes(&[b'a', 0xff, b'b']), "a<0xFF>b");
        assert_eq!(show_bytes(b""), "");
    }
}
