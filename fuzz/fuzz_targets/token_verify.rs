//! `Keys::verify` (`token.rs`) on arbitrary text, as the gateway calls it for every token a client
//! attaches. Input: the token, verbatim (the seed corpus holds real tokens minted with
//! [`SECRETS`], so mutations start from the right shape).
//!
//! Asserted for every input:
//! - no panic;
//! - the documented order of checks: a token over `MAX_TOKEN_BYTES`, without exactly one `.`, with
//!   an empty first part or a symbol outside the URL-safe alphabet is `Malformed`; a signature is
//!   only judged (`BadSignature`) on a well-formed token whose MAC part is 43 symbols (32 bytes);
//! - an accepted token's claims are for `HOST`, unexpired at `NOW`, with a non-empty nonce, and
//!   minting those claims again gives a token that verifies to the same claims;
//! - nothing is allocated for an overlong token, and no single allocation exceeds the token limit.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use wsgate_core::token::{Keys, TokenError, MAX_TOKEN_BYTES};
use wsgate_core_fuzz::measure;

/// The deployment's secrets: the first signs, both verify (rotation).
const SECRETS: [&[u8]; 2] = [b"fuzz-secret-new", b"fuzz-secret-old"];
const HOST: &str = "my-agent.my-org";
/// The clock: seeds minted with `exp` after it verify, the others are expired.
const NOW: u64 = 1_800_000_000;

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys::new(&SECRETS).expect("two non-empty secrets"))
}

fn url_safe(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fuzz_target!(|data: &[u8]| {
    let token = String::from_utf8_lossy(data);
    let keys = keys();
    let (result, alloc) = measure(|| keys.verify(&token, HOST, NOW));
    assert!(
        alloc.largest <= MAX_TOKEN_BYTES,
        "{alloc:?} for a {}-byte token",
        token.len()
    );
    if token.len() > MAX_TOKEN_BYTES {
        assert_eq!(result, Err(TokenError::Malformed));
        assert_eq!(alloc.count, 0, "an overlong token was worked on");
        return;
    }
    let parts: Vec<&str> = token.split('.').collect();
    let well_formed = parts.len() == 2 && !parts[0].is_empty() && parts.iter().all(|p| url_safe(p));
    match result {
        Ok(claims) => {
            assert!(well_formed);
            assert_eq!(claims.sh, HOST);
            assert!(NOW < claims.exp && !claims.nonce.is_empty());
            if claims.body.is_none() {
                let again = keys.mint(&claims.sh, claims.exp, &claims.nonce, None);
                assert_eq!(keys.verify(&again, HOST, NOW), Ok(claims));
            }
        }
        Err(TokenError::Malformed) => {}
        Err(TokenError::BadSignature) => {
            assert!(well_formed, "signature judged on a malformed token");
            assert_eq!(
                parts[1].len(),
                43,
                "signature judged with a MAC that is not 32 bytes"
            );
        }
        Err(TokenError::WrongServiceHost | TokenError::Expired) => {
            // Only a genuine token gets this far: an unmutated seed.
            assert!(well_formed && parts[1].len() == 43);
        }
        Err(TokenError::BodyMissing | TokenError::BodyNotBound | TokenError::BodyMismatch) => {
            panic!("verify judged a body: that is Claims::check_body's work")
        }
    }
});
