//! Bytes in JSON, as `walq dump --format json` writes them: a string when the
//! bytes are UTF-8, else `{"hex": "..."}`; records and their headers in that form.

use serde::Deserialize;
use serde_json::{Value, json};

/// Bytes as JSON: a string when UTF-8, else `{"hex": "..."}`.
pub(crate) fn bytes(b: &[u8]) -> Value {
    match std::str::from_utf8(b) {
        Ok(s) => Value::String(s.to_string()),
        Err(_) => {
            let mut hex = String::with_capacity(b.len() * 2);
            for byte in b {
                hex.push_str(&format!("{byte:02x}"));
            }
            json!({ "hex": hex })
        }
    }
}

/// Bytes as a client sends them in JSON: a string (its UTF-8 bytes) or `{"hex": "..."}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum InBytes {
    Text(String),
    Hex { hex: String },
}

impl InBytes {
    pub(crate) fn into_bytes(self) -> Result<Vec<u8>, String> {
        match self {
            InBytes::Text(s) => Ok(s.into_bytes()),
            InBytes::Hex { hex } => {
                if hex.len() % 2 != 0 {
                    return Err("hex has an odd number of digits".into());
                }
                (0..hex.len())
                    .step_by(2)
                    .map(|i| {
                        hex.get(i..i + 2)
                            .and_then(|d| u8::from_str_radix(d, 16).ok())
                            .ok_or_else(|| format!("{hex:?} is not hex"))
                    })
                    .collect()
            }
        }
    }
}

/// Record headers, `(name, value)` in order.
pub(crate) type HeaderPairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Headers as a client sends them: `[[name, value], ...]` (order and
/// repeats kept) or `{"name": value, ...}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum InHeaders {
    Pairs(Vec<(InBytes, InBytes)>),
    Map(serde_json::Map<String, Value>),
}

impl InHeaders {
    pub(crate) fn into_pairs(self) -> Result<HeaderPairs, String> {
        match self {
            InHeaders::Pairs(p) => {
                p.into_iter().map(|(n, v)| Ok((n.into_bytes()?, v.into_bytes()?))).collect()
            }
            InHeaders::Map(m) => m
                .into_iter()
                .map(|(n, v)| {
                    let v: InBytes = serde_json::from_value(v).map_err(|e| format!("header {n:?}: {e}"))?;
                    Ok((n.into_bytes(), v.into_bytes()?))
                })
                .collect(),
        }
    }
}

/// A record read from the log, as the API returns it.
pub(crate) fn record(r: &walq::OwnedRecord) -> Value {
    json!({
        "offset": r.offset,
        "timestamp_ms": r.timestamp_ms,
        "key": r.key.as_deref().map(bytes),
        "headers": r.headers.iter().map(|(n, v)| json!([bytes(n), bytes(v)])).collect::<Vec<_>>(),
        "value": bytes(&r.value),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_as_text_or_hex() {
        for b in [&b"plain"[..], &[0xff, 0x00, 0x10][..], b""] {
            let v = bytes(b);
            let back: InBytes = serde_json::from_value(v).unwrap();
            assert_eq!(back.into_bytes().unwrap(), b);
        }
        let odd: InBytes = serde_json::from_value(json!({"hex": "abc"})).unwrap();
        assert!(odd.into_bytes().is_err());
        let bad: InBytes = serde_json::from_value(json!({"hex": "zz"})).unwrap();
        assert!(bad.into_bytes().is_err());
        // Multi-byte characters must not split a hex slice mid-character.
        let wide: InBytes = serde_json::from_value(json!({"hex": "éé"})).unwrap();
        assert!(wide.into_bytes().is_err());
    }

    #[test]
    fn headers_as_pairs_or_map() {
        let p: InHeaders = serde_json::from_value(json!([["a", "1"], ["a", {"hex": "02"}]])).unwrap();
        assert_eq!(p.into_pairs().unwrap(), vec![(b"a".to_vec(), b"1".to_vec()), (b"a".to_vec(), vec![2])]);
        let m: InHeaders = serde_json::from_value(json!({"reply_to": "r"})).unwrap();
        assert_eq!(m.into_pairs().unwrap(), vec![(b"reply_to".to_vec(), b"r".to_vec())]);
    }
}
