//! Bytes in the API: wherever bytes cross it (exec's stdin, stdout and stderr), they are
//! carried as base64 text, next to an `encoding` field that says so. Serial output and
//! command output are not UTF-8, so they are never sent as plain JSON strings.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How the byte fields of an object are encoded. Only `base64` (RFC 4648, with padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Base64,
}

pub fn encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Decodes `text`, which must be padded base64; the error says why not.
pub fn decode(text: &str) -> Result<Vec<u8>, String> {
    STANDARD.decode(text).map_err(|e| format!("is not valid base64: {e}"))
}

/// Bytes of base64 text that `n` bytes encode to.
pub const fn encoded_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_value_round_trips() {
        let all: Vec<u8> = (0..=255u8).chain([0xff, 0, 0x80]).collect();
        let text = encode(&all);
        assert_eq!(text.len(), encoded_len(all.len()));
        assert_eq!(decode(&text).unwrap(), all);
        assert_eq!(encode(b"\xffab"), "/2Fi");
        for bad in ["a", "@@@@", "YQ", "YQ==="] {
            assert!(decode(bad).is_err(), "{bad}");
        }
        assert_eq!(serde_json::to_value(Encoding::Base64).unwrap(), "base64");
    }
}
