//! Decoding of the `?body=` query value (SPEC §4).
//!
//! The value is base64 of a JSON document, as it appeared in the query string. Decoding is
//! lenient about the encoding and strict about the result:
//!
//! - percent-escapes are decoded first (a malformed escape is "not base64");
//! - a space and a literal `+` both read as `+` (a `+` is often turned into a space on the way);
//! - the standard and URL-safe alphabets are both accepted, even mixed in one value;
//! - padding is optional, but padding that is present must be correct (`AA==`, never `AA=`);
//! - non-zero trailing bits in the last symbol are ignored, as Python's `base64.b64decode` does.
//!   Bodies are not authenticated, so canonical encoding buys nothing here; tokens, whose bytes
//!   are signed, are strict instead (see `token.rs`).
//!
//! The decoded size is computed from the encoded length and checked against
//! [`MAX_BODY_BYTES`] before anything is decoded, and input too long to possibly fit is refused
//! before it is even percent-decoded, so the work done on any input is bounded.

use std::fmt;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;

/// Largest `?body=` JSON document, in bytes after base64 decoding (SPEC §4).
pub const MAX_BODY_BYTES: usize = 4096;

/// Deepest nesting of arrays and objects in a `?body=` document. JSON allows any depth, but the
/// bot parses the body (Python's `json.loads` fails from depth ~1000 with a `RecursionError`,
/// not a `ValueError`), so a 4 KB body of 2,000 brackets must not reach it.
pub const MAX_BODY_DEPTH: usize = 64;

/// Standard alphabet (URL-safe symbols are mapped onto it first), no padding (stripped and
/// checked first), trailing bits ignored.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(true),
);

/// Longest base64 text of a [`MAX_BODY_BYTES`] document, with padding.
const MAX_ENCODED_LEN: usize = MAX_BODY_BYTES.div_ceil(3) * 4;

/// Longest raw query value that can still hold a document within the limit: every symbol
/// percent-escaped (`%XX`, three bytes each).
const MAX_RAW_LEN: usize = 3 * MAX_ENCODED_LEN;

/// A `?body=` value that passed every check.
#[derive(Clone, PartialEq, Eq)]
pub struct DecodedBody {
    /// The JSON document exactly as the client encoded it (never re-serialised); the bot gets it
    /// as `body`.
    pub json: String,
    /// The same bytes as standard, padded base64, percent-encoded for a query value, ready to be
    /// appended as `?body=` to the upstream URL.
    pub upstream_value: String,
}

impl fmt::Debug for DecodedBody {
    // Bodies are client payloads: lengths only, so they never reach logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecodedBody")
            .field("json_len", &self.json.len())
            .field("upstream_value_len", &self.upstream_value.len())
            .finish()
    }
}

/// Why a `?body=` value was refused. What each means for the request (its HTTP status) is the
/// control plane's to say.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    /// The document is over the size cap.
    #[error("body is {size} bytes after decoding, over the {max}-byte limit")]
    TooLarge {
        /// Decoded size in bytes; for input too long to be worth decoding, a lower bound on it
        /// (still over `max`).
        size: usize,
        /// The cap, [`MAX_BODY_BYTES`].
        max: usize,
    },
    /// The value is not percent-encoded base64.
    #[error("body is not base64")]
    NotBase64,
    /// The decoded bytes are not a UTF-8 JSON document.
    #[error("body is not a UTF-8 JSON document")]
    NotJson,
    /// The document nests arrays and objects deeper than [`MAX_BODY_DEPTH`].
    #[error("body nests deeper than {max} levels")]
    TooDeep {
        /// The cap, [`MAX_BODY_DEPTH`].
        max: usize,
    },
}

impl BodyError {
    /// One-line plain-text reason for the answer; never echoes the input.
    #[must_use]
    pub fn reason(&self) -> String {
        self.to_string()
    }
}

/// The deepest nesting of arrays and objects in a valid JSON text (strings skipped).
fn nesting_depth(json: &[u8]) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in json {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Decodes a `?body=` value, `raw` being exactly as it appeared in the query string (still
/// percent-encoded). See the module doc for what is accepted.
///
/// # Errors
///
/// [`BodyError::TooLarge`] over [`MAX_BODY_BYTES`] (judged before decoding),
/// [`BodyError::NotBase64`], then [`BodyError::NotJson`].
pub fn decode_body(raw: &str) -> Result<DecodedBody, BodyError> {
    if raw.len() > MAX_RAW_LEN {
        return Err(BodyError::TooLarge {
            size: min_decoded_len(raw.len()),
            max: MAX_BODY_BYTES,
        });
    }
    let text = unescape(raw.as_bytes())?;
    let data = strip_padding(&text)?;
    if data.len() % 4 == 1 {
        // Six bits cannot end a byte: no base64 text has this length.
        return Err(BodyError::NotBase64);
    }
    let size = decoded_len(data.len());
    if size > MAX_BODY_BYTES {
        return Err(BodyError::TooLarge {
            size,
            max: MAX_BODY_BYTES,
        });
    }
    let bytes = LENIENT.decode(data).map_err(|_| BodyError::NotBase64)?;
    check_json(&bytes)?;
    let json = String::from_utf8(bytes).map_err(|_| BodyError::NotJson)?;
    let upstream_value = query_escape(&STANDARD.encode(json.as_bytes()));
    Ok(DecodedBody {
        json,
        upstream_value,
    })
}

/// Checks a body document's bytes: at most [`MAX_BODY_BYTES`], UTF-8 JSON, nested at most
/// [`MAX_BODY_DEPTH`] levels. The one check of a body, whether it came as `?body=` (after
/// [`decode_body`]'s base64 step) or in a `/start` request, so both refuse the same documents.
///
/// # Errors
///
/// [`BodyError::TooLarge`], then [`BodyError::NotJson`], then [`BodyError::TooDeep`].
pub fn check_json(document: &[u8]) -> Result<(), BodyError> {
    if document.len() > MAX_BODY_BYTES {
        return Err(BodyError::TooLarge {
            size: document.len(),
            max: MAX_BODY_BYTES,
        });
    }
    let text = std::str::from_utf8(document).map_err(|_| BodyError::NotJson)?;
    serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|_| BodyError::NotJson)?;
    if nesting_depth(document) > MAX_BODY_DEPTH {
        return Err(BodyError::TooDeep {
            max: MAX_BODY_DEPTH,
        });
    }
    Ok(())
}

/// Exact decoded length of `n` base64 symbols without padding (`n % 4 != 1`): six bits each,
/// rounded down to whole bytes.
const fn decoded_len(n: usize) -> usize {
    n / 4 * 3 + (n % 4) * 3 / 4
}

/// Lower bound on the decoded length of a raw value of `raw_len` bytes: each symbol takes at most
/// three raw bytes, and at most two symbols are padding.
fn min_decoded_len(raw_len: usize) -> usize {
    decoded_len(raw_len.div_ceil(3).saturating_sub(2))
}

/// Percent-decodes `raw` into base64 text over the standard alphabet: space becomes `+`, and the
/// URL-safe `-` and `_` become `+` and `/`. Anything left outside the alphabet is caught by the
/// base64 decoder.
fn unescape(raw: &[u8]) -> Result<Vec<u8>, BodyError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let mut byte = raw[i];
        if byte == b'%' {
            let (Some(hi), Some(lo)) = (
                raw.get(i + 1).and_then(|&b| hex_value(b)),
                raw.get(i + 2).and_then(|&b| hex_value(b)),
            ) else {
                return Err(BodyError::NotBase64);
            };
            byte = hi << 4 | lo;
            i += 3;
        } else {
            i += 1;
        }
        out.push(match byte {
            b' ' | b'-' => b'+',
            b'_' => b'/',
            other => other,
        });
    }
    Ok(out)
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// Returns `text` without its padding, refusing padding that is present but not canonical (the
/// base64 crate's "indifferent" mode would accept `AA=`).
fn strip_padding(text: &[u8]) -> Result<&[u8], BodyError> {
    let data_len = text.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
    let padding = text.len() - data_len;
    if padding > 0 && (padding > 2 || text.len() % 4 != 0) {
        return Err(BodyError::NotBase64);
    }
    Ok(&text[..data_len])
}

/// Percent-encodes standard base64 for a query value: `+`, `/` and `=` are the only symbols that
/// need it.
fn query_escape(b64: &str) -> String {
    let mut out = String::with_capacity(b64.len() + b64.len() / 2);
    for c in b64.chars() {
        match c {
            '+' => out.push_str("%2B"),
            '/' => out.push_str("%2F"),
            '=' => out.push_str("%3D"),
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    use proptest::prelude::*;

    use super::*;

    /// A document whose standard base64 holds `+`, `/` and padding, so every variant differs.
    const DOC: &str = r#"{"k":"??>>~~","n":[1,2.5,null,true]} "#;

    fn percent_decode(s: &str) -> Vec<u8> {
        unescape(s.as_bytes()).unwrap()
    }

    fn escape_all(s: &str) -> String {
        s.bytes().map(|b| format!("%{b:02x}")).collect()
    }

    /// Every way a client may send `bytes`, per SPEC §4.
    fn variants(bytes: &[u8]) -> Vec<String> {
        let std = STANDARD.encode(bytes);
        let url = URL_SAFE.encode(bytes);
        let mixed: String = std
            .chars()
            .enumerate()
            .map(|(i, c)| match (i % 2, c) {
                (0, '+') => '-',
                (0, '/') => '_',
                _ => c,
            })
            .collect();
        vec![
            std.clone(),
            STANDARD_NO_PAD.encode(bytes),
            url.clone(),
            URL_SAFE_NO_PAD.encode(bytes),
            mixed,
            std.replace('+', " "),
            std.replace('+', "%20"),
            query_escape(&std),
            query_escape(&std)
                .replace("%2B", "%2b")
                .replace("%2F", "%2f")
                .replace("%3D", "%3d"),
            escape_all(&std),
            escape_all(&url).to_uppercase(),
        ]
    }

    #[test]
    fn every_encoding_variant_gives_the_same_json() {
        for raw in variants(DOC.as_bytes()) {
            let body = decode_body(&raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!(body.json, DOC, "{raw}");
            assert_eq!(body.upstream_value, query_escape(&STANDARD.encode(DOC)));
        }
    }

    #[test]
    fn the_json_is_passed_on_unchanged_not_reserialised() {
        let doc = "{ \"b\" : 1,\n \"a\": \"\\u00e9\" }";
        assert_eq!(decode_body(&STANDARD.encode(doc)).unwrap().json, doc);
    }

    #[test]
    fn any_json_value_is_accepted() {
        for doc in ["1", "\"s\"", "null", "[]", "{}", " true "] {
            assert_eq!(decode_body(&STANDARD.encode(doc)).unwrap().json, doc);
        }
    }

    #[test]
    fn upstream_value_is_padded_standard_base64_escaped_for_a_query() {
        // ["???>"] is WyI/Pz8+Il0= in standard base64, WyI_Pz8-Il0 URL-safe unpadded.
        let body = decode_body("WyI_Pz8-Il0").unwrap();
        assert_eq!(body.json, r#"["???>"]"#);
        assert_eq!(body.upstream_value, "WyI%2FPz8%2BIl0%3D");
    }

    #[test]
    fn a_document_of_exactly_the_limit_is_accepted() {
        let doc = format!("\"{}\"", "a".repeat(MAX_BODY_BYTES - 2));
        assert_eq!(decode_body(&STANDARD.encode(&doc)).unwrap().json, doc);
        assert_eq!(
            decode_body(&escape_all(&STANDARD.encode(&doc)))
                .unwrap()
                .json,
            doc
        );
    }

    #[test]
    fn the_body_limits_have_their_specified_values() {
        assert_eq!(MAX_BODY_BYTES, 4096);
        assert_eq!(MAX_BODY_DEPTH, 64);
    }

    #[test]
    fn a_document_one_byte_over_the_limit_is_too_large() {
        let doc = format!("\"{}\"", "a".repeat(MAX_BODY_BYTES - 1));
        for raw in [STANDARD.encode(&doc), STANDARD_NO_PAD.encode(&doc)] {
            let err = decode_body(&raw).unwrap_err();
            assert_eq!(
                err,
                BodyError::TooLarge {
                    size: 4097,
                    max: 4096
                }
            );
        }
    }

    #[test]
    fn oversized_input_is_too_large_even_when_it_is_not_base64() {
        // The size is judged from the length alone, before any symbol is looked at.
        let err = decode_body(&"!".repeat(MAX_ENCODED_LEN + 4)).unwrap_err();
        assert!(matches!(err, BodyError::TooLarge { .. }), "{err:?}");
    }

    #[test]
    fn absurdly_long_input_is_refused_before_decoding_with_a_size_over_the_limit() {
        let err = decode_body(&"%".repeat(10 * MAX_RAW_LEN)).unwrap_err();
        assert!(matches!(err, BodyError::TooLarge { size, max: 4096 } if size > 4096));
        // Just over the raw bound, the lower bound is still over the limit.
        assert!(min_decoded_len(MAX_RAW_LEN + 1) > MAX_BODY_BYTES);
        assert!(min_decoded_len(usize::MAX) > MAX_BODY_BYTES);
    }

    #[test]
    fn the_raw_bound_admits_a_fully_escaped_document_of_the_limit() {
        let encoded = STANDARD.encode([0; MAX_BODY_BYTES]);
        assert_eq!(MAX_ENCODED_LEN, encoded.len());
        assert_eq!(MAX_RAW_LEN, escape_all(&encoded).len());
    }

    #[test]
    fn text_that_is_not_base64_is_refused_as_such() {
        for raw in [
            "e30*",      // '*' is in neither alphabet
            "e3=",       // short padding: "e3==" would be right
            "e30==",     // too much padding
            "ZTMw=",     // one pad after a complete quad
            "e3=0",      // padding in the middle
            "e",         // one symbol cannot make a byte
            "e30%",      // truncated escape
            "e30%2",     // truncated escape
            "e30%zz",    // not hex
            "e30%C3%A9", // escaped non-ASCII
            "=",
            "====",
        ] {
            let err = decode_body(raw).unwrap_err();
            assert_eq!(err, BodyError::NotBase64, "{raw}");
        }
    }

    #[test]
    fn correct_padding_is_accepted() {
        assert_eq!(decode_body("e30").unwrap().json, "{}");
        assert_eq!(decode_body("e30=").unwrap().json, "{}");
        assert_eq!(decode_body("MQ==").unwrap().json, "1");
        assert_eq!(decode_body("MQ%3D%3D").unwrap().json, "1");
        assert_eq!(decode_body("MQ").unwrap().json, "1");
    }

    #[test]
    fn non_zero_trailing_bits_are_ignored_like_python() {
        // "MQ" is "1"; "MR" differs only in the four bits after the last byte.
        assert_eq!(decode_body("MR==").unwrap().json, "1");
        assert_eq!(decode_body("MR").unwrap().json, "1");
    }

    #[test]
    fn base64_of_something_that_is_not_json_is_refused_as_such() {
        for doc in ["", "{", "not json", "{\"a\":1}x", "NaN", "'s'"] {
            let err = decode_body(&STANDARD.encode(doc)).unwrap_err();
            assert_eq!(err, BodyError::NotJson, "{doc:?}");
        }
    }

    #[test]
    fn invalid_utf8_is_not_json_even_inside_a_json_string() {
        let err = decode_body(&STANDARD.encode(b"\"\xff\"")).unwrap_err();
        assert_eq!(err, BodyError::NotJson);
    }

    #[test]
    fn nesting_is_capped_and_brackets_inside_strings_do_not_count() {
        let ok = format!(
            "{}{}",
            "[".repeat(MAX_BODY_DEPTH),
            "]".repeat(MAX_BODY_DEPTH)
        );
        assert!(decode_body(&STANDARD.encode(&ok)).is_ok());
        let deep = format!("[{ok}]");
        let err = decode_body(&STANDARD.encode(&deep)).unwrap_err();
        assert_eq!(
            err,
            BodyError::TooDeep {
                max: MAX_BODY_DEPTH
            }
        );
        let in_string = format!("{{\"a\": \"{}\\\"\"}}", "[".repeat(500));
        assert!(
            decode_body(&STANDARD.encode(&in_string)).is_ok(),
            "{in_string}"
        );
    }

    #[test]
    fn a_document_checked_directly_is_judged_like_a_decoded_one() {
        let at_cap = format!("\"{}\"", "a".repeat(MAX_BODY_BYTES - 2));
        let over = format!("\"{}\"", "a".repeat(MAX_BODY_BYTES - 1));
        let deep = format!("{}{}", "[".repeat(102), "]".repeat(102));
        for doc in [
            at_cap.as_str(),
            &over,
            &deep,
            "{\"a\":1}",
            "not json",
            "\"\\ud800\"",
        ] {
            assert_eq!(
                check_json(doc.as_bytes()),
                decode_body(&STANDARD.encode(doc)).map(|_| ()),
                "{doc:?}"
            );
        }
        assert_eq!(check_json(b"\"\xff\""), Err(BodyError::NotJson));
    }

    #[test]
    fn reasons_are_one_line_and_never_echo_the_input() {
        let errors = [
            decode_body(&STANDARD.encode("\"zzsecretzz\"x")).unwrap_err(),
            decode_body("zzsecretzz*").unwrap_err(),
            decode_body(&"z".repeat(MAX_RAW_LEN + 1)).unwrap_err(),
        ];
        for err in errors {
            let reason = err.reason();
            assert!(!reason.contains("zz") && !reason.contains('\n'), "{reason}");
        }
    }

    #[test]
    fn debug_of_a_decoded_body_shows_lengths_only() {
        let body = decode_body(&STANDARD.encode("\"zzsecretzz\"")).unwrap();
        assert!(!format!("{body:?}").contains("zz"));
    }

    /// JSON documents of up to 4096 bytes: arbitrary values, compact or pretty, or one long
    /// string of arbitrary characters.
    fn json_doc() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            ".{0,20}".prop_map(serde_json::Value::from),
        ];
        let value = leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
                prop::collection::btree_map(".{0,10}", inner, 0..8)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        });
        prop_oneof![
            (value, any::<bool>()).prop_map(|(v, pretty)| if pretty {
                serde_json::to_string_pretty(&v).unwrap()
            } else {
                serde_json::to_string(&v).unwrap()
            }),
            ".{0,1500}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        ]
        .prop_filter("within the limit", |doc| doc.len() <= MAX_BODY_BYTES)
    }

    proptest! {
        #[test]
        fn every_variant_of_any_document_round_trips(doc in json_doc()) {
            let want = query_escape(&STANDARD.encode(&doc));
            for raw in variants(doc.as_bytes()) {
                let body = decode_body(&raw).unwrap();
                prop_assert_eq!(&body.json, &doc);
                prop_assert_eq!(&body.upstream_value, &want);
                let upstream = STANDARD.decode(percent_decode(&body.upstream_value)).unwrap();
                prop_assert_eq!(upstream, doc.as_bytes());
            }
        }

        #[test]
        fn arbitrary_input_never_panics_and_errors_have_a_one_line_reason(raw in ".{0,64}") {
            if let Err(err) = decode_body(&raw) {
                prop_assert!(!err.reason().is_empty() && !err.reason().contains('\n'));
            }
        }

        #[test]
        fn oversized_documents_are_too_large_with_their_size(extra in 1usize..200) {
            let doc = format!("\"{}\"", "a".repeat(MAX_BODY_BYTES - 2 + extra));
            for raw in variants(doc.as_bytes()) {
                let err = decode_body(&raw).unwrap_err();
                let BodyError::TooLarge { size, max: MAX_BODY_BYTES } = err else {
                    return Err(TestCaseError::fail(format!("{err:?}")));
                };
                if raw.len() <= MAX_RAW_LEN {
                    prop_assert_eq!(size, doc.len());
                } else {
                    // Refused on the raw length alone: a lower bound, still over the limit.
                    prop_assert!(size > MAX_BODY_BYTES && size <= doc.len());
                }
            }
        }
    }
}
