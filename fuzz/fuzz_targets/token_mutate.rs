//! Minted tokens (`token.rs`) with one byte changed: never accepted. Input, structured by
//! `arbitrary`: a secret, claims, a clock, and where and how to change the token.
//!
//! Asserted for every input:
//! - `Keys::new` refuses exactly an empty secret;
//! - the minted token verifies to its own claims before its expiry (or is refused as documented:
//!   `Malformed` when over `MAX_TOKEN_BYTES` or with an empty nonce, `Expired` from `exp` on);
//! - any one byte replaced by a different one (kept only when the result is still a string),
//!   any truncation, and any byte appended, is refused;
//! - the same token checked against another secret is `BadSignature` (or `Malformed`, as above).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use wsgate_core::token::{Keys, TokenError, MAX_TOKEN_BYTES};

#[derive(Arbitrary, Debug)]
struct Input {
    secret: Vec<u8>,
    sh: String,
    exp: u64,
    nonce: String,
    now: u64,
    at: usize,
    byte: u8,
    cut: usize,
}

fuzz_target!(|input: Input| {
    let Input {
        secret,
        sh,
        exp,
        nonce,
        now,
        at,
        byte,
        cut,
    } = input;
    let Some(keys) = Keys::new(&[&secret]) else {
        assert!(secret.is_empty());
        return;
    };
    let token = keys.mint(&sh, exp, &nonce, None);
    let now = if exp == 0 { 0 } else { now % exp };
    let verdict = keys.verify(&token, &sh, now);
    if token.len() > MAX_TOKEN_BYTES || nonce.is_empty() {
        assert_eq!(verdict, Err(TokenError::Malformed));
    } else if exp == 0 {
        assert_eq!(verdict, Err(TokenError::Expired));
    } else {
        let claims = verdict.expect("a fresh token verifies");
        assert_eq!(
            (claims.sh.as_str(), claims.exp, claims.nonce.as_str()),
            (&*sh, exp, &*nonce)
        );
    }

    let other = Keys::new(&[[secret.as_slice(), b"!"].concat()]).unwrap();
    let foreign = other.verify(&token, &sh, now);
    assert!(
        matches!(
            foreign,
            Err(TokenError::BadSignature | TokenError::Malformed)
        ),
        "{foreign:?}"
    );

    let mut bytes = token.clone().into_bytes();
    let at = at % bytes.len();
    if bytes[at] != byte {
        bytes[at] = byte;
        if let Ok(mutant) = String::from_utf8(bytes) {
            let got = keys.verify(&mutant, &sh, now);
            assert!(
                got.is_err(),
                "byte {at} of a token changed to {byte:#04x} and still accepted"
            );
        }
    }
    let cut = cut % token.len();
    assert!(
        keys.verify(&token[..cut], &sh, now).is_err(),
        "truncated to {cut} bytes and accepted"
    );
    let mut longer = token.clone();
    longer.push(char::from(byte & 0x7F));
    assert!(
        keys.verify(&longer, &sh, now).is_err(),
        "{byte:#04x} appended and accepted"
    );
});
