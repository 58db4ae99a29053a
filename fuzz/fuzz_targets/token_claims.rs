//! The claims parser behind the signature (`token.rs`): `token_verify` cannot forge a MAC, so it
//! reaches the payload only through its seeds. Here the input is the payload's bytes, and the
//! harness signs them correctly (base64url, HMAC-SHA256 with the first secret), as a holder of
//! the secret could. Asserted for every input:
//! - no panic, and never `BadSignature`: the signature is right;
//! - an accepted payload is UTF-8 (RFC 8259 §8.1; `tests/token_reference.py` refuses it
//!   otherwise) and a JSON object whose `sh`, `exp` and `nonce` are the claims returned,
//!   for `HOST`, unexpired at `NOW`, with a non-empty nonce;
//! - `WrongServiceHost` only for a payload whose `sh` is another host, `Expired` only for one
//!   whose `exp` is not after `NOW`.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sha2::Sha256;
use wsgate_core::token::{Keys, TokenError};

const SECRET: &[u8] = b"fuzz-secret-new";
const HOST: &str = "my-agent.my-org";
const NOW: u64 = 1_800_000_000;

fuzz_target!(|payload: &[u8]| {
    let first = URL_SAFE_NO_PAD.encode(payload);
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET).unwrap();
    mac.update(first.as_bytes());
    let token = format!(
        "{first}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    );
    let keys = Keys::new(&[SECRET]).unwrap();
    let json = serde_json::from_slice::<Value>(payload);
    // `Value` refuses numbers beyond f64 (`1E400`) that the grammar allows and the claims parser
    // skips in unknown fields: no oracle for those payloads.
    if json
        .as_ref()
        .is_err_and(|e| e.to_string().starts_with("number out of range"))
    {
        let verdict = keys.verify(&token, HOST, NOW);
        assert_ne!(verdict, Err(TokenError::BadSignature));
        return;
    }
    let json = json.ok();
    let field = |name: &str| {
        json.as_ref()
            .and_then(|v| v.as_object()?.get(name).cloned())
    };
    match keys.verify(&token, HOST, NOW) {
        Ok(claims) => {
            assert!(
                std::str::from_utf8(payload).is_ok(),
                "a payload that is not UTF-8 accepted"
            );
            assert_eq!(field("sh"), Some(Value::from(claims.sh.as_str())));
            assert_eq!(field("exp"), Some(Value::from(claims.exp)));
            assert_eq!(field("nonce"), Some(Value::from(claims.nonce.as_str())));
            let bd = field("bd").filter(|v| !v.is_null());
            assert_eq!(bd, claims.body.clone().map(Value::from));
            assert!(claims.sh == HOST && NOW < claims.exp && !claims.nonce.is_empty());
        }
        Err(TokenError::Malformed) => {}
        Err(TokenError::BadSignature) => panic!("a correctly signed token judged unsigned"),
        Err(TokenError::WrongServiceHost) => {
            let sh = field("sh");
            assert!(
                sh.as_ref().is_some_and(|s| s.is_string() && *s != HOST),
                "{sh:?}"
            );
        }
        Err(TokenError::Expired) => {
            let exp = field("exp").and_then(|e| e.as_u64());
            assert!(exp.is_some_and(|e| e <= NOW), "{exp:?}");
        }
        Err(TokenError::BodyMissing | TokenError::BodyNotBound | TokenError::BodyMismatch) => {
            panic!("verify judged a body: that is Claims::check_body's work")
        }
    }
});
