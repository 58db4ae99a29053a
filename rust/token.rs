//! Session tokens (SPEC §3): minting and stateless verification.
//!
//! Wire format: `base64url(JSON {"sh","exp","nonce"[,"bd"]}) + "." +
//! base64url(HMAC-SHA256(secret, first part))`, both parts unpadded. The MAC covers the first
//! part's ASCII text, not the decoded JSON.
//!
//! `bd` (ours) binds the session body: base64url of SHA-256 of the body's JSON bytes, as
//! `/start` was given them. A token without `bd` binds *no* body. [`Claims::check_body`] holds
//! the `?body=` of the upgrade to the binding, so a token holder cannot swap the body that the
//! backend which called `/start` vouched for.
//!
//! Invariants, all enforced by [`verify`] in this order:
//! - work is bounded: a token over [`MAX_TOKEN_BYTES`] is refused before anything is decoded;
//! - both parts are *canonical* base64url (no padding, no `+`/`/`, no non-zero trailing bits), so
//!   each accepted token has exactly one spelling and a replay store keyed on it cannot be
//!   sidestepped by re-encoding;
//! - the signature is compared in constant time, against every accepted secret in turn (rotation:
//!   the first secret signs, all verify);
//! - the payload is only parsed once its signature is good;
//! - tokens, nonces and secrets never appear in `Debug` or error text.
//!
//! One-time use (replay) is not judged here: the caller records the verified token's nonce.

use std::fmt;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::TryRngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Lifetime of a session token minted by `/start`, in seconds (SPEC §3: five minutes).
pub const TOKEN_TTL_SECONDS: u64 = 300;

/// Longest session token accepted, in bytes; longer ones are refused as malformed before any
/// decoding or MAC work. A minted token for the longest service host (127 bytes) is about 300.
pub const MAX_TOKEN_BYTES: usize = 2048;

type HmacSha256 = Hmac<Sha256>;

/// URL-safe alphabet, no padding written or accepted, non-zero trailing bits refused: decoding
/// accepts exactly the strings that encoding produces.
const STRICT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(false),
);

/// HMAC-SHA256 output length.
const MAC_BYTES: usize = 32;

/// The verified payload of a token.
#[derive(Clone, PartialEq, Eq)]
pub struct Claims {
    /// Service host (`{agent}.{org}`) the token is bound to.
    pub sh: String,
    /// Expiry, Unix seconds: the token is refused from this second on.
    pub exp: u64,
    /// Random value unique to this token; the key for the replay store.
    pub nonce: String,
    /// The `bd` claim: the digest ([`body_digest`]) of the only body this token opens a session
    /// with, or `None`: no body at all.
    pub body: Option<String>,
}

impl Claims {
    /// Checks the session body of the upgrade (its JSON bytes, `None` without `?body=`) against
    /// the body this token binds.
    ///
    /// # Errors
    ///
    /// [`TokenError::BodyMissing`], [`TokenError::BodyNotBound`] or [`TokenError::BodyMismatch`].
    pub fn check_body(&self, body: Option<&[u8]>) -> Result<(), TokenError> {
        match (&self.body, body) {
            (None, None) => Ok(()),
            (Some(_), None) => Err(TokenError::BodyMissing),
            (None, Some(_)) => Err(TokenError::BodyNotBound),
            (Some(bound), Some(body)) => {
                // Not a secret, but compared without early exit all the same.
                let given = body_digest(body);
                let differ = bound.len() != given.len()
                    || bound
                        .bytes()
                        .zip(given.bytes())
                        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                        != 0;
                if differ {
                    Err(TokenError::BodyMismatch)
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// The `bd` claim of a body: base64url (unpadded) of SHA-256 of its JSON bytes.
#[must_use]
pub fn body_digest(body: &[u8]) -> String {
    STRICT.encode(Sha256::digest(body))
}

impl fmt::Debug for Claims {
    // The nonce identifies a live token in the replay store: kept out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claims")
            .field("sh", &self.sh)
            .field("exp", &self.exp)
            .field("binds_body", &self.body.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a token was refused (the control plane answers each with 403, SPEC §3).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not a token of this format: too long, bad structure or encoding, or a signed payload
    /// that lacks `sh`, `exp` or a non-empty `nonce`.
    #[error("token is malformed")]
    Malformed,
    /// Well formed, but signed by none of the accepted secrets.
    #[error("token signature is invalid")]
    BadSignature,
    /// Genuine, but for another service host.
    #[error("token is for another service host")]
    WrongServiceHost,
    /// Genuine, but past its expiry.
    #[error("token has expired")]
    Expired,
    /// The token binds a body and the upgrade carries none.
    #[error("token was issued with a body: ?body= is missing")]
    BodyMissing,
    /// The token binds no body and the upgrade carries one.
    #[error("token was issued without a body: ?body= is not allowed")]
    BodyNotBound,
    /// The upgrade's body is not the one the token binds.
    #[error("?body= differs from the body the token was issued with")]
    BodyMismatch,
}

impl TokenError {
    /// One-line plain-text reason for the answer; never echoes the token.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed => "token is malformed",
            Self::BadSignature => "token signature is invalid",
            Self::WrongServiceHost => "token is for another service host",
            Self::Expired => "token has expired",
            Self::BodyMissing => "token was issued with a body: ?body= is missing",
            Self::BodyNotBound => "token was issued without a body: ?body= is not allowed",
            Self::BodyMismatch => "?body= differs from the body the token was issued with",
        }
    }
}

#[derive(Serialize)]
struct PayloadOut<'a> {
    sh: &'a str,
    exp: u64,
    nonce: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    bd: Option<&'a str>,
}

// Unknown fields are ignored (the public service may add some); duplicates are refused by serde.
#[derive(Deserialize)]
struct PayloadIn<'a> {
    // Borrowed when it has no escapes (always, for tokens we mint): no allocation to compare.
    #[serde(borrow)]
    sh: std::borrow::Cow<'a, str>,
    exp: u64,
    nonce: String,
    #[serde(default)]
    bd: Option<String>,
}

/// Mints a token for `service_host`, valid until `exp` (Unix seconds), signed with `secret`,
/// binding `body` (a session body's JSON bytes; `None`: the token opens a session without one).
///
/// `nonce` should come from [`new_nonce`]; an empty one yields a token [`verify`] refuses.
#[must_use]
pub fn mint(
    secret: &[u8],
    service_host: &str,
    exp: u64,
    nonce: &str,
    body: Option<&[u8]>,
) -> String {
    mint_with(&keyed(secret), service_host, exp, nonce, body)
}

fn mint_with(
    key: &HmacSha256,
    service_host: &str,
    exp: u64,
    nonce: &str,
    body: Option<&[u8]>,
) -> String {
    let digest = body.map(body_digest);
    let payload = serde_json::to_vec(&PayloadOut {
        sh: service_host,
        exp,
        nonce,
        bd: digest.as_deref(),
    })
    .expect("two strings and an integer always serialise");
    let mut token = STRICT.encode(payload);
    let mut mac = key.clone();
    mac.update(token.as_bytes());
    let mac = mac.finalize().into_bytes();
    token.push('.');
    STRICT.encode_string(mac, &mut token);
    token
}

/// Verifies `token` for `service_host` at time `now` (Unix seconds) against each of `secrets`
/// and returns its claims. See the module doc for the order of checks.
///
/// # Errors
///
/// The first failed check, in this order: [`TokenError::Malformed`] (length, structure,
/// encoding), [`TokenError::BadSignature`], [`TokenError::Malformed`] (payload),
/// [`TokenError::WrongServiceHost`], [`TokenError::Expired`].
pub fn verify(
    secrets: &[&[u8]],
    token: &str,
    service_host: &str,
    now: u64,
) -> Result<Claims, TokenError> {
    let keys: Vec<HmacSha256> = secrets.iter().map(|s| keyed(s)).collect();
    verify_with(&keys, token, service_host, now)
}

fn verify_with(
    keys: &[HmacSha256],
    token: &str,
    service_host: &str,
    now: u64,
) -> Result<Claims, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::Malformed);
    }
    let (payload_part, mac_part) = token.split_once('.').ok_or(TokenError::Malformed)?;
    if payload_part.is_empty() || mac_part.contains('.') {
        return Err(TokenError::Malformed);
    }
    let payload = STRICT
        .decode(payload_part)
        .map_err(|_| TokenError::Malformed)?;
    let mac = STRICT.decode(mac_part).map_err(|_| TokenError::Malformed)?;
    if mac.len() != MAC_BYTES {
        return Err(TokenError::Malformed);
    }
    // `verify_slice` compares in constant time.
    let signed = keys.iter().any(|key| {
        let mut m = key.clone();
        m.update(payload_part.as_bytes());
        m.verify_slice(&mac).is_ok()
    });
    if !signed {
        return Err(TokenError::BadSignature);
    }
    let claims = parse_payload(&payload)?;
    if claims.sh != service_host {
        return Err(TokenError::WrongServiceHost);
    }
    if now >= claims.exp {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

/// A fresh nonce: 16 bytes straight from the OS's CSPRNG, base64url without padding (22
/// characters).
///
/// `OsRng` rather than `rand::rng()`: the thread-local generator is not reseeded on `fork`, and
/// the Python side may fork workers after importing the extension; duplicate nonces across
/// workers would collide in the replay store. One syscall per `/start` is nothing.
///
/// # Panics
///
/// If the OS random source fails, which no supported platform does once booted.
#[must_use]
pub fn new_nonce() -> String {
    let mut bytes = [0; 16];
    OsRng
        .try_fill_bytes(&mut bytes)
        .expect("the OS random source is available");
    STRICT.encode(bytes)
}

/// An HMAC keyed with `secret`: its inner and outer pads hashed once, cloned per token.
fn keyed(secret: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length")
}

/// The signing secrets of a deployment, keyed once: the first signs, all verify (rotation).
/// Its `Debug` shows only how many there are.
#[derive(Clone)]
pub struct Keys {
    keys: Vec<HmacSha256>,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keys({} secrets)", self.keys.len())
    }
}

impl Keys {
    /// Keys for `secrets`; `None` if there are none or one is empty (HMAC would accept an
    /// empty key, which signs nothing worth checking).
    pub fn new<S: AsRef<[u8]>>(secrets: &[S]) -> Option<Self> {
        if secrets.is_empty() || secrets.iter().any(|s| s.as_ref().is_empty()) {
            return None;
        }
        Some(Self {
            keys: secrets.iter().map(|s| keyed(s.as_ref())).collect(),
        })
    }

    /// [`mint`] with the first secret.
    #[must_use]
    pub fn mint(&self, service_host: &str, exp: u64, nonce: &str, body: Option<&[u8]>) -> String {
        mint_with(&self.keys[0], service_host, exp, nonce, body)
    }

    /// [`verify`] against every secret.
    ///
    /// # Errors
    ///
    /// As [`verify`].
    pub fn verify(&self, token: &str, service_host: &str, now: u64) -> Result<Claims, TokenError> {
        verify_with(&self.keys, token, service_host, now)
    }
}

fn parse_payload(payload: &[u8]) -> Result<Claims, TokenError> {
    // serde would also read a struct from a JSON array (`["h", 1, "n"]`); only objects are tokens.
    if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(TokenError::Malformed);
    }
    // UTF-8 first: serde_json does not check strings it skips (unknown fields), and the spec's
    // reference refuses a payload that is not UTF-8 anywhere (found by fuzz/token_claims).
    let text = std::str::from_utf8(payload).map_err(|_| TokenError::Malformed)?;
    let PayloadIn { sh, exp, nonce, bd } =
        serde_json::from_str(text).map_err(|_| TokenError::Malformed)?;
    if nonce.is_empty() {
        return Err(TokenError::Malformed);
    }
    Ok(Claims {
        sh: sh.into_owned(),
        exp,
        nonce,
        body: bd,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SECRET: &[u8] = b"secret";
    const HOST: &str = "my-agent.my-org";
    const EXP: u64 = 1_712_800_000;
    const URL_SAFE: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

    fn token() -> String {
        mint(SECRET, HOST, EXP, "abc123", None)
    }

    #[test]
    fn the_token_limits_have_their_specified_values() {
        assert_eq!(TOKEN_TTL_SECONDS, 5 * 60);
        assert_eq!(MAX_TOKEN_BYTES, 2048);
    }

    /// A token whose first part is `payload_part` verbatim, correctly signed with [`SECRET`].
    fn signed(payload_part: &str) -> String {
        let mut mac = keyed(SECRET);
        mac.update(payload_part.as_bytes());
        let mac = mac.finalize().into_bytes();
        format!("{payload_part}.{}", STRICT.encode(mac))
    }

    fn signed_json(json: &str) -> String {
        signed(&STRICT.encode(json))
    }

    #[test]
    fn a_signed_payload_that_is_not_utf8_anywhere_is_malformed() {
        let payload =
            b"{\"x\":\"\xff\",\"sh\":\"my-agent.my-org\",\"exp\":1900000000,\"nonce\":\"n\"}";
        let token = signed(&STRICT.encode(payload));
        assert_eq!(
            verify(&[SECRET], &token, "my-agent.my-org", 0),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn prepared_keys_mint_and_verify_like_the_plain_functions() {
        let keys = Keys::new(&[b"new".as_slice(), SECRET]).unwrap();
        assert_eq!(
            keys.mint(HOST, EXP, "n", None),
            mint(b"new", HOST, EXP, "n", None)
        );
        let old = token();
        assert_eq!(
            keys.verify(&old, HOST, EXP - 1),
            verify(&[SECRET], &old, HOST, EXP - 1)
        );
        assert!(Keys::new::<&[u8]>(&[]).is_none());
        assert!(Keys::new(&[b"".as_slice()]).is_none());
        assert_eq!(format!("{keys:?}"), "Keys(2 secrets)");
    }

    #[test]
    fn the_wire_format_matches_the_spec_example() {
        // Computed independently with Python's json, hmac and base64 modules.
        assert_eq!(
            token(),
            "eyJzaCI6Im15LWFnZW50Lm15LW9yZyIsImV4cCI6MTcxMjgwMDAwMCwibm9uY2UiOiJhYmMxMjMifQ\
             .jTfdkMpUvkOcLILAv9cR9C9OUYVtq8gM42bm7_PTbag"
        );
    }

    #[test]
    fn a_minted_token_verifies_and_returns_its_claims() {
        let claims = verify(&[SECRET], &token(), HOST, EXP - 1).unwrap();
        assert_eq!(
            claims,
            Claims {
                sh: HOST.into(),
                exp: EXP,
                nonce: "abc123".into(),
                body: None
            }
        );
    }

    #[test]
    fn a_token_binds_the_body_it_was_minted_with_and_only_that_one() {
        let body: &[u8] = br#"{"who":"A"}"#;
        let bound = mint(SECRET, HOST, EXP, "n", Some(body));
        let claims = verify(&[SECRET], &bound, HOST, 0).unwrap();
        assert_eq!(claims.body.as_deref(), Some(body_digest(body).as_str()));
        assert_eq!(claims.check_body(Some(body)), Ok(()));
        assert_eq!(
            claims.check_body(Some(br#"{"who":"EVIL","admin":true}"#)),
            Err(TokenError::BodyMismatch)
        );
        assert_eq!(
            claims.check_body(Some(br#"{"who": "A"}"#)),
            Err(TokenError::BodyMismatch),
            "the bytes are bound, not a re-serialisation"
        );
        assert_eq!(claims.check_body(None), Err(TokenError::BodyMissing));
        let unbound = verify(&[SECRET], &token(), HOST, 0).unwrap();
        assert_eq!(unbound.check_body(None), Ok(()));
        assert_eq!(
            unbound.check_body(Some(b"{}")),
            Err(TokenError::BodyNotBound)
        );
    }

    #[test]
    fn a_token_without_a_body_keeps_the_public_three_claim_payload() {
        let payload = token().split_once('.').unwrap().0.to_owned();
        let json = STRICT.decode(payload).unwrap();
        assert_eq!(
            json,
            br#"{"sh":"my-agent.my-org","exp":1712800000,"nonce":"abc123"}"#
        );
    }

    #[test]
    fn a_token_is_expired_from_its_exp_second_on() {
        assert_eq!(
            verify(&[SECRET], &token(), HOST, EXP),
            Err(TokenError::Expired)
        );
        assert_eq!(
            verify(&[SECRET], &token(), HOST, u64::MAX),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn a_token_for_another_service_host_is_refused() {
        let err = verify(&[SECRET], &token(), "other.my-org", 0).unwrap_err();
        assert_eq!(err, TokenError::WrongServiceHost);
    }

    #[test]
    fn a_token_signed_with_another_secret_is_refused() {
        let err = verify(&[b"other".as_slice()], &token(), HOST, 0).unwrap_err();
        assert_eq!(err, TokenError::BadSignature);
        assert_eq!(
            verify(&[], &token(), HOST, 0),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn during_rotation_a_token_signed_with_the_old_secret_still_verifies() {
        let new: &[u8] = b"new secret";
        let old = mint(SECRET, HOST, EXP, "n", None);
        let fresh = mint(new, HOST, EXP, "n", None);
        assert!(verify(&[new, SECRET], &old, HOST, 0).is_ok());
        assert!(verify(&[new, SECRET], &fresh, HOST, 0).is_ok());
        assert_eq!(verify(&[new], &old, HOST, 0), Err(TokenError::BadSignature));
    }

    #[test]
    fn structurally_broken_tokens_are_malformed() {
        let good = token();
        let (payload, mac) = good.split_once('.').unwrap();
        for bad in [
            String::new(),
            ".".into(),
            payload.into(),
            format!("{payload}."),
            format!(".{mac}"),
            format!("{payload}.{mac}.{mac}"),
            format!("{payload}..{mac}"),
            format!("{payload}.{}", &mac[..42]),
            format!("{payload}.{mac}AAAA"),
            format!("{payload}=.{mac}"),
            format!("{payload} .{mac}"),
        ] {
            assert_eq!(
                verify(&[SECRET], &bad, HOST, 0),
                Err(TokenError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn an_overlong_token_is_malformed_even_when_correctly_signed() {
        let long = mint(SECRET, &"h".repeat(MAX_TOKEN_BYTES), EXP, "n", None);
        assert_eq!(
            verify(&[SECRET], &long, HOST, 0),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn a_correctly_signed_but_non_canonical_payload_is_malformed() {
        let canonical = STRICT.encode(r#"{"sh":"my-agent.my-org","exp":9,"nonce":"n"}"#);
        // The last symbol carries unused low bits (zero when canonical): set the lowest one.
        assert_ne!(canonical.len() % 4, 0);
        let (head, last) = canonical.split_at(canonical.len() - 1);
        let next = URL_SAFE.find(last).unwrap() + 1;
        let trailing_bits = format!("{head}{}", &URL_SAFE[next..=next]);
        assert!(verify(&[SECRET], &signed(&canonical), HOST, 0).is_ok());
        for part in [trailing_bits, format!("{canonical}==")] {
            let err = verify(&[SECRET], &signed(&part), HOST, 0).unwrap_err();
            assert_eq!(err, TokenError::Malformed, "{part}");
        }
    }

    #[test]
    fn a_correctly_signed_payload_must_hold_sh_exp_and_a_nonce() {
        for json in [
            "not json",
            r#"["my-agent.my-org",9,"n"]"#,
            r#"{"exp":9,"nonce":"n"}"#,
            r#"{"sh":"my-agent.my-org","nonce":"n"}"#,
            r#"{"sh":"my-agent.my-org","exp":9}"#,
            r#"{"sh":"my-agent.my-org","exp":9,"nonce":""}"#,
            r#"{"sh":"my-agent.my-org","exp":-9,"nonce":"n"}"#,
            r#"{"sh":"my-agent.my-org","exp":9.5,"nonce":"n"}"#,
            r#"{"sh":"my-agent.my-org","exp":"9","nonce":"n"}"#,
            r#"{"sh":1,"exp":9,"nonce":"n"}"#,
            r#"{"sh":"my-agent.my-org","exp":9,"nonce":"n","sh":"my-agent.my-org"}"#,
        ] {
            let err = verify(&[SECRET], &signed_json(json), HOST, 0).unwrap_err();
            assert_eq!(err, TokenError::Malformed, "{json}");
        }
    }

    #[test]
    fn unknown_payload_fields_are_ignored() {
        let json = r#" {"iat":1,"sh":"my-agent.my-org","exp":9,"nonce":"n","x":{"y":[]}}"#;
        let claims = verify(&[SECRET], &signed_json(json), HOST, 0).unwrap();
        assert_eq!((claims.exp, claims.nonce.as_str()), (9, "n"));
    }

    #[test]
    fn the_signature_is_checked_before_the_payload_is_read() {
        let forged = format!("{}.{}", STRICT.encode("not json"), STRICT.encode([0; 32]));
        assert_eq!(
            verify(&[SECRET], &forged, HOST, 0),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn reasons_are_one_line_match_display_and_never_echo_the_token() {
        for err in [
            TokenError::Malformed,
            TokenError::BadSignature,
            TokenError::WrongServiceHost,
            TokenError::Expired,
            TokenError::BodyMissing,
            TokenError::BodyNotBound,
            TokenError::BodyMismatch,
        ] {
            assert_eq!(err.reason(), err.to_string());
            assert!(!err.reason().contains('\n'));
        }
    }

    #[test]
    fn debug_of_claims_leaves_out_the_nonce() {
        let claims = verify(
            &[SECRET],
            &mint(SECRET, HOST, EXP, "zznoncezz", None),
            HOST,
            0,
        )
        .unwrap();
        let debug = format!("{claims:?}");
        assert!(
            debug.contains(HOST) && debug.contains("1712800000"),
            "{debug}"
        );
        assert!(!debug.contains("zz"), "{debug}");
    }

    #[test]
    fn nonces_are_16_random_bytes_in_canonical_base64url() {
        let a = new_nonce();
        assert_eq!(a.len(), 22);
        assert_eq!(STRICT.decode(&a).unwrap().len(), 16);
        assert_ne!(a, new_nonce());
    }

    /// A secret, a service host and a token minted with them, valid at time 0.
    fn any_token() -> impl Strategy<Value = (Vec<u8>, String, String)> {
        (
            prop::collection::vec(any::<u8>(), 1..64),
            ".{0,40}",
            1u64..,
            ".{1,30}",
        )
            .prop_map(|(secret, sh, exp, nonce)| {
                let token = mint(&secret, &sh, exp, &nonce, None);
                (secret, sh, token)
            })
    }

    proptest! {
        #[test]
        fn mint_then_verify_round_trips(
            secret in prop::collection::vec(any::<u8>(), 0..100),
            sh in ".*",
            nonce in ".+",
            exp in 1u64..,
            now_before in any::<u64>(),
        ) {
            let now = now_before % exp;
            let token = mint(&secret, &sh, exp, &nonce, None);
            let claims = verify(&[b"another".as_slice(), &secret], &token, &sh, now).unwrap();
            prop_assert_eq!(claims, Claims { sh, exp, nonce, body: None });
        }

        #[test]
        fn arbitrary_text_never_verifies_and_never_panics(text in ".{0,300}") {
            prop_assert!(verify(&[SECRET], &text, HOST, 0).is_err());
        }

        #[test]
        fn any_single_byte_change_is_refused(
            (secret, sh, token) in any_token(),
            at in any::<prop::sample::Index>(),
            with in any::<char>(),
        ) {
            let at = at.index(token.len());
            let mut mutant = token.clone();
            mutant.replace_range(at..=at, with.encode_utf8(&mut [0; 4]));
            prop_assume!(mutant != token);
            prop_assert!(verify(&[&secret], &token, &sh, 0).is_ok());
            prop_assert!(verify(&[&secret], &mutant, &sh, 0).is_err());
        }

        #[test]
        fn any_truncation_is_refused(
            (secret, sh, token) in any_token(),
            len in any::<prop::sample::Index>(),
        ) {
            let len = len.index(token.len());
            prop_assert!(verify(&[&secret], &token[..len], &sh, 0).is_err());
        }

        #[test]
        fn appended_padding_is_refused((secret, sh, token) in any_token(), pads in 1usize..4) {
            let (payload, mac) = token.split_once('.').unwrap();
            let pads = "=".repeat(pads);
            for padded in [format!("{token}{pads}"), format!("{payload}{pads}.{mac}")] {
                prop_assert_eq!(verify(&[&secret], &padded, &sh, 0), Err(TokenError::Malformed));
            }
        }

        #[test]
        fn the_standard_alphabet_is_refused(
            (secret, sh, token) in any_token(),
            which in any::<prop::sample::Index>(),
        ) {
            let spots: Vec<usize> = token.match_indices(['-', '_']).map(|(i, _)| i).collect();
            prop_assume!(!spots.is_empty());
            let at = spots[which.index(spots.len())];
            let standard = if token.as_bytes()[at] == b'-' { "+" } else { "/" };
            let mut mutant = token.clone();
            mutant.replace_range(at..=at, standard);
            prop_assert_eq!(verify(&[&secret], &mutant, &sh, 0), Err(TokenError::Malformed));
        }
    }
}
