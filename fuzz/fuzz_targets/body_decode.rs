//! `decode_body` (`body.rs`) on arbitrary `?body=` values, exactly as they would appear in a
//! query string. Run with `-max_len=17000` so values past the raw-length bound are reached.
//!
//! Asserted for every input:
//! - no panic; every refusal is a `BodyError` (`TooLarge` with a size over the 4096-byte cap,
//!   `NotBase64`, `NotJson`, `TooDeep` at the 64-level cap) with a one-line reason (the statuses
//!   they get, 413 and 400, are the control plane's: `tests/test_body.py`);
//! - an accepted document is at most 4096 bytes of UTF-8 JSON (checked with serde_json's `Value`,
//!   which also refuses numbers beyond f64 that the grammar allows), its
//!   `upstream_value` is padded standard base64 escaped for a query (only `[A-Za-z0-9%]`), which
//!   percent- and base64-decodes back to exactly the document, and which `decode_body` itself
//!   accepts as the same body (the gateway's output is valid input);
//! - a value longer than any encoding of a 4096-byte document is refused without allocating, and
//!   no input makes a single allocation larger than that bound.
#![no_main]

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use wsgate_core::body::{decode_body, BodyError, MAX_BODY_BYTES, MAX_BODY_DEPTH};
use wsgate_core_fuzz::measure;

/// Longest raw value worth decoding: padded base64 of the cap, every symbol escaped as `%XX`
/// (SPEC §4; `MAX_RAW_LEN` in `body.rs`, recomputed here from the spec).
const MAX_RAW_LEN: usize = 3 * (MAX_BODY_BYTES.div_ceil(3) * 4);

fn unescape_upstream(value: &str) -> String {
    value
        .replace("%2B", "+")
        .replace("%2F", "/")
        .replace("%3D", "=")
}

fuzz_target!(|data: &[u8]| {
    let raw = String::from_utf8_lossy(data);
    let (result, alloc) = measure(|| decode_body(&raw));
    assert!(
        alloc.largest <= MAX_RAW_LEN,
        "{alloc:?} for a {}-byte value",
        raw.len()
    );
    if raw.len() > MAX_RAW_LEN {
        assert!(
            matches!(result, Err(BodyError::TooLarge { .. })),
            "{result:?}"
        );
        assert_eq!(alloc.count, 0, "an overlong value was worked on");
    }
    match result {
        Ok(body) => {
            assert!(body.json.len() <= MAX_BODY_BYTES);
            // RFC 8259 §6 lets a parser limit the range of numbers, and `Value` does (`1E400`
            // is out of f64's range); the grammar allows it, and so do Python's and JS's parsers.
            if let Err(e) = serde_json::from_str::<serde_json::Value>(&body.json) {
                assert!(
                    e.to_string().starts_with("number out of range"),
                    "accepted: {e}"
                );
            }
            let v = &body.upstream_value;
            assert!(
                v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'%'),
                "{v}"
            );
            let b64 = unescape_upstream(v);
            assert_eq!(b64.len() % 4, 0, "upstream value is padded");
            assert_eq!(
                STANDARD.decode(&b64).expect("standard base64"),
                body.json.as_bytes()
            );
            assert_eq!(
                decode_body(v).as_ref(),
                Ok(&body),
                "the upstream value is not accepted"
            );
        }
        Err(err) => {
            match err {
                BodyError::TooLarge { size, max } => {
                    assert_eq!(max, MAX_BODY_BYTES);
                    assert!(size > MAX_BODY_BYTES);
                }
                BodyError::NotBase64 | BodyError::NotJson => {}
                BodyError::TooDeep { max } => assert_eq!(max, MAX_BODY_DEPTH),
            }
            assert!(!err.reason().contains('\n'));
        }
    }
});
