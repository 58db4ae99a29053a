//! The WebSocket handshakes of a session opened in the data plane (`open.rs`), without I/O: the
//! client's upgrade request recognised, the bot's upgrade request and the check of its 101, and
//! the client's 101.
//!
//! The recogniser serves the common case only and says "not mine" for everything else: a request
//! it takes is one the Python control plane would take, with the same result (SPEC §2: path,
//! upgrade, service host, body). Anything it is unsure of — a refusal, a subprotocol, a token
//! segment, a query it does not know, a percent-escape — goes to the Python path, which has the
//! one implementation of every error. So it is stricter than the Python parser
//! (`python/wsgate/request.py`), never looser: `httparse` parses (its defaults refuse what the
//! Python parser refuses: whitespace before a colon, obsolete line folding), and a bare CR or LF
//! anywhere, or a target outside visible ASCII, is not taken.

use base64::Engine as _;
use sha1::{Digest, Sha1};

use crate::body::{self, DecodedBody};
use crate::opening::Provider;

/// Longest request head (or bot response head) read, in bytes: past it the Python path answers
/// 431 (a bot's: 502).
pub const MAX_HEADER_BYTES: usize = 8192;

/// More header fields than this and the Python parser answers 400: not taken.
const MAX_HEADERS: usize = 100;

/// RFC 6455 §1.3: the GUID appended to `Sec-WebSocket-Key` before hashing.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

const GENERIC: &str = "/ws/generic";

/// An upgrade request the data plane may open by itself: `/ws/generic`, or a URL-routed
/// provider's endpoint.
#[derive(Debug)]
pub struct Upgrade<'a> {
    /// The service host it names (not yet looked up).
    pub service_host: &'a str,
    /// Its `Sec-WebSocket-Key`.
    pub key: &'a str,
    /// Its `?body=`, decoded and checked.
    pub body: Option<DecodedBody>,
    /// The token it carries, from the first place present (`tokens.token_from_request`): an
    /// `Authorization: Bearer` header, the first `token` parameter, the path's last segment.
    /// `Err`: one the recogniser cannot read as Python would (another scheme, an escape): a
    /// `token` agent's request is then left to the Python path.
    pub token: Result<Option<&'a str>, Unsure>,
    /// Length of the head, `\r\n\r\n` included: what follows is the client's first frames.
    pub head_len: usize,
    /// The provider endpoint it came to (`/ws/{telnyx,plivo,exotel}`), `None` for
    /// `/ws/generic`.
    pub provider: Option<Provider>,
}

/// A token the recogniser cannot read as the Python path would.
#[derive(Debug, PartialEq, Eq)]
pub struct Unsure;

/// The head is over [`MAX_HEADER_BYTES`].
#[derive(Debug, PartialEq, Eq)]
pub struct TooLarge;

/// Where the head in `buf` ends (the index past its `\r\n\r\n`), `None` while it may still
/// come, or [`TooLarge`]: `_sockets._split_head`'s rule, for a request and a bot's answer alike.
pub fn split_head(buf: &[u8]) -> Result<Option<usize>, TooLarge> {
    match buf.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) if end > MAX_HEADER_BYTES => Err(TooLarge),
        Some(end) => Ok(Some(end + 4)),
        None if buf.len() >= MAX_HEADER_BYTES + 4 => Err(TooLarge),
        None => Ok(None),
    }
}

/// Every CR followed by LF and every LF preceded by CR (the Python parser splits on CRLF and
/// refuses a stray one anywhere).
fn crlf_only(head: &[u8]) -> bool {
    head.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => head.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && head[i - 1] == b'\r',
        _ => true,
    })
}

/// Comma-separated elements of every value of one header, trimmed, empty ones skipped.
fn elements<'b>(values: impl Iterator<Item = &'b [u8]>) -> impl Iterator<Item = &'b [u8]> {
    values
        .flat_map(|v| v.split(|&b| b == b','))
        .map(|e| e.trim_ascii())
        .filter(|e| !e.is_empty())
}

/// A head's fields: (name, value trimmed), as `request.parse_header_lines` keeps them.
type Fields<'b> = Vec<(&'b [u8], &'b [u8])>;

/// The values of header `name` (ASCII case-insensitive), in order. An iterator, not a list: a
/// head is checked once per session, and each list was an allocation.
fn values<'f, 'b: 'f>(
    fields: &'f [(&'b [u8], &'b [u8])],
    name: &'f str,
) -> impl Iterator<Item = &'b [u8]> + 'f {
    fields
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| *v)
}

/// The one value of header `name`; `None` if it has none, or more than one.
fn only<'b>(mut values: impl Iterator<Item = &'b [u8]>) -> Option<&'b [u8]> {
    let first = values.next()?;
    values.next().is_none().then_some(first)
}

fn has_element<'b>(values: impl Iterator<Item = &'b [u8]>, want: &[u8]) -> bool {
    elements(values).any(|e| e.eq_ignore_ascii_case(want))
}

/// Base64 of exactly 16 bytes, padded, standard alphabet (RFC 6455 §4.1).
fn valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|k| k.len() == 16)
}

/// A service host as it may appear unescaped (`names.SERVICE_HOST` allows a subset of these; the
/// route table, whose keys are valid service hosts, decides).
fn plain_host(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
}

/// An upgrade request's head, checked as far as every endpoint the data plane opens needs.
struct Checked<'a> {
    /// The request target, visible ASCII without a fragment.
    target: &'a str,
    key: &'a str,
    /// Its `Authorization` fields.
    authorization: Vec<&'a [u8]>,
    head_len: usize,
}

/// The head at the start of `buf`, if it is a WebSocket upgrade the Python parser takes, with
/// no body, no subprotocol and a valid key (see the module docs).
fn checked(buf: &[u8]) -> Option<Checked<'_>> {
    let head_len = split_head(buf).ok().flatten()?;
    let head = &buf[..head_len];
    // httparse skips empty lines before the request line; the Python parser refuses them.
    if !crlf_only(head) || head.starts_with(b"\r\n") {
        return None;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head_len => {}
        _ => return None,
    }
    if req.method != Some("GET") || req.version != Some(1) {
        return None;
    }
    let target = req.path?;
    if !target.bytes().all(|b| (0x21..=0x7e).contains(&b)) || target.contains('#') {
        return None;
    }
    let fields: Fields<'_> = (req.headers.iter())
        .map(|h| (h.name.as_bytes(), h.value.trim_ascii()))
        .collect();
    let fields = fields.as_slice();
    let one = |name| only(values(fields, name));
    let mut lengths = values(fields, "content-length");
    let no_body = match lengths.next() {
        None => true,
        Some(length) => length == b"0" && lengths.next().is_none(),
    };
    if one("host").is_none()
        || !no_body
        || values(fields, "transfer-encoding").next().is_some()
        || !has_element(values(fields, "upgrade"), b"websocket")
        || !has_element(values(fields, "connection"), b"upgrade")
        || one("sec-websocket-version") != Some(b"13")
        || elements(values(fields, "sec-websocket-protocol"))
            .next()
            .is_some()
    {
        return None;
    }
    let key = one("sec-websocket-key").filter(|k| valid_key(k))?;
    Some(Checked {
        target,
        key: std::str::from_utf8(key).ok()?,
        authorization: values(fields, "authorization").collect(),
        head_len,
    })
}

/// The request head at the start of `buf`, if it is a generic-endpoint upgrade the data plane
/// may open (see the module docs); `None` leaves it to the Python path.
pub fn recognise(buf: &[u8]) -> Option<Upgrade<'_>> {
    let Checked {
        target,
        key,
        authorization,
        head_len,
    } = checked(buf)?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (mut host, path_token, provider) = match path.strip_prefix(GENERIC) {
        Some("") => (None, None, None),
        Some(rest) => {
            let (host, token) = with_token(rest.strip_prefix('/')?)?;
            if !plain_host(host) {
                return None;
            }
            (Some(host), token, None)
        }
        // `/ws/{provider}[/{token}]`, routed by `?serviceHost=` (Twilio, by its opening, is
        // `recognise_twilio`'s).
        None => {
            let (name, token) = with_token(path.strip_prefix("/ws/")?)?;
            let provider = Provider::named(name).filter(|&p| p != Provider::Twilio)?;
            (None, token, Some(provider))
        }
    };
    let (mut body_raw, mut query_token) = (None, None);
    for piece in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
        match name {
            "serviceHost" if host.is_none() && plain_host(value) => host = Some(value),
            "body" if body_raw.is_none() => body_raw = Some(value),
            // The first one counts; one the Python path would unquote is not read here.
            "token" if query_token.is_none() => {
                query_token = Some(if value.contains('%') {
                    Err(Unsure)
                } else {
                    Ok(value)
                })
            }
            "token" => {}
            _ => return None, // twice, both ways, escaped, or a parameter of its own
        }
    }
    let host = host?;
    let token = match (authorization.as_slice(), query_token, path_token) {
        ([], None, t) => Ok(t),
        ([], Some(t), _) => t.map(Some),
        ([value], _, _) => bearer(value).map(Some),
        _ => Err(Unsure), // several: the Python path joins them
    };
    let body = match body_raw {
        None => None,
        Some(raw) => Some(body::decode_body(raw).ok()?),
    };
    Some(Upgrade {
        service_host: host,
        key,
        body,
        token,
        head_len,
        provider,
    })
}

/// `name` or `name/token` (a path's last segments): the token is not empty and needs no
/// unquoting (escapes are unquoted strictly by the Python path: 404 when not UTF-8).
fn with_token(segments: &str) -> Option<(&str, Option<&str>)> {
    match segments.split_once('/') {
        None => Some((segments, None)),
        Some((name, token)) if !token.is_empty() && !token.contains(['/', '%']) => {
            Some((name, Some(token)))
        }
        Some(_) => None,
    }
}

/// A `/ws/twilio` upgrade the data plane may answer and read the opening of.
#[derive(Debug, PartialEq, Eq)]
pub struct TwilioUpgrade<'a> {
    /// Its `Sec-WebSocket-Key`.
    pub key: &'a str,
    /// Its token, the path's last segment (`/ws/twilio/{token}`), as a stream URL carries one
    /// (`None`: its session is named on the 101, as `connection._twilio` names one without).
    pub token: Option<&'a str>,
    /// Length of the head, `\r\n\r\n` included.
    pub head_len: usize,
}

/// A `/ws/twilio[/{token}]` upgrade the data plane may answer and read the opening of: no
/// query (Twilio drops a stream URL's), no `Authorization` (it sends none), a token segment
/// that needs no unquoting.
pub fn recognise_twilio(buf: &[u8]) -> Option<TwilioUpgrade<'_>> {
    // Every other request is recognised elsewhere or not at all: no second parse of its head.
    if !(buf.starts_with(b"GET /ws/twilio ") || buf.starts_with(b"GET /ws/twilio/")) {
        return None;
    }
    let c = checked(buf)?;
    if !c.authorization.is_empty() || c.target.contains('?') {
        return None;
    }
    let (name, token) = with_token(c.target.strip_prefix("/ws/")?)?;
    if name != "twilio" {
        return None;
    }
    Some(TwilioUpgrade {
        key: c.key,
        token,
        head_len: c.head_len,
    })
}

/// The credentials of `Authorization: Bearer <credentials>` (another scheme: [`Unsure`]).
fn bearer(value: &[u8]) -> Result<&str, Unsure> {
    let value = std::str::from_utf8(value).map_err(|_| Unsure)?;
    let (scheme, credentials) = value.split_once(' ').ok_or(Unsure)?;
    let credentials = credentials.trim_matches([' ', '\t']);
    if scheme.eq_ignore_ascii_case("bearer") && !credentials.is_empty() {
        Ok(credentials)
    } else {
        Err(Unsure)
    }
}

/// The `Sec-WebSocket-Accept` value that answers `Sec-WebSocket-Key: key`.
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// A fresh random `Sec-WebSocket-Key`.
pub fn new_key() -> String {
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>())
}

/// A random (version 4) UUID, as Python's `str(uuid.uuid4())` writes it.
pub fn new_uuid() -> String {
    uuid4(rand::random::<[u8; 16]>())
}

/// The session id of the token with this nonce, as `tokens.session_id_for` derives it: a
/// version 4 UUID made of SHA-256 of the nonce (one-way, and the same on every gateway).
pub fn session_id_for(nonce: &str) -> String {
    use sha2::{Digest as _, Sha256};
    let digest = Sha256::new()
        .chain_update(b"wsgate session id\x00")
        .chain_update(nonce.as_bytes())
        .finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    uuid4(b)
}

/// `b` as a version 4, RFC 4122 variant UUID.
fn uuid4(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    // Written in place: one allocation (a `format!` per byte was 18 a session).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut uuid = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            uuid.push('-');
        }
        uuid.push(char::from(HEX[usize::from(x >> 4)]));
        uuid.push(char::from(HEX[usize::from(x & 0x0f)]));
    }
    uuid
}

/// The upgrade request sent to the bot, byte for byte what `handshake.upstream_request` builds
/// without subprotocols: `resource` is the upstream URL's path and query, the body's value
/// appended to it.
pub fn bot_request(
    resource: &str,
    host_header: &str,
    key: &str,
    session_uuid: &str,
    body: Option<&DecodedBody>,
) -> Vec<u8> {
    let mut target = resource.to_owned();
    if let Some(b) = body {
        target.push(if resource.contains('?') { '&' } else { '?' });
        target.push_str("body=");
        target.push_str(&b.upstream_value);
    }
    format!(
        "GET {target} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
         X-Daily-Session-Id: {session_uuid}\r\n\r\n"
    )
    .into_bytes()
}

/// Whether `head` (the bot's response head, `\r\n\r\n` included) is a 101 that
/// `handshake.check_upstream_response` accepts for our `key` with no subprotocol offered: the
/// same rules, written out rather than parsed by httparse, which refuses some answers that
/// check takes (a control character in the reason phrase) and takes some it refuses (empty
/// lines before the status line). False is not a verdict: the Python check says what is wrong.
pub fn bot_accepted(head: &[u8], key: &str) -> bool {
    let Some(head) = head.strip_suffix(b"\r\n\r\n") else {
        return false;
    };
    let mut lines = split_crlf(head);
    let status = lines.next().unwrap_or_default();
    let (version, rest) = match status.iter().position(|&b| b == b' ') {
        Some(i) => (&status[..i], &status[i + 1..]),
        None => (status, &b""[..]),
    };
    let code_ok = rest.len() >= 3
        && rest[..3].iter().all(u8::is_ascii_digit)
        && (rest.len() == 3 || rest[3] == b' ');
    if version != b"HTTP/1.1" || !code_ok || &rest[..3] != b"101" {
        return false;
    }
    // `request.parse_header_lines`: at most 100, each `token ":" value`, the value visible
    // ASCII, obs-text, space and tab, stripped of spaces and tabs.
    let mut fields: Fields<'_> = Vec::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return false;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value_ok = value.iter().all(|&b| b == b'\t' || b >= 0x20 && b != 0x7f);
        if fields.len() == MAX_HEADERS || name.is_empty() || !name.iter().all(is_tchar) || !value_ok
        {
            return false;
        }
        fields.push((name, value.trim_ascii()));
    }
    only(elements(values(&fields, "upgrade"))).is_some_and(|u| u.eq_ignore_ascii_case(b"websocket"))
        && has_element(values(&fields, "connection"), b"upgrade")
        && only(values(&fields, "sec-websocket-accept"))
            .is_some_and(|a| a == accept_key(key).as_bytes())
        && elements(values(&fields, "sec-websocket-extensions"))
            .next()
            .is_none()
        && elements(values(&fields, "sec-websocket-protocol"))
            .next()
            .is_none()
}

/// `bytes.split(b"\r\n")`.
fn split_crlf(mut s: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        match s.windows(2).position(|w| w == b"\r\n") {
            Some(i) => {
                let line = &s[..i];
                s = &s[i + 2..];
                Some(line)
            }
            None => {
                done = true;
                Some(s)
            }
        }
    })
}

/// An RFC 9110 token character (a header name's).
fn is_tchar(b: &u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b)
}

/// The 101 that opens the client's WebSocket, as `handshake.switching_protocols` writes it with
/// no subprotocol and the session's id.
pub fn switching_protocols(client_key: &str, session_uuid: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\nX-Session-Id: {session_uuid}\r\n\r\n",
        accept_key(client_key)
    )
    .into_bytes()
}

/// The same without a session id (a token's session is named once the token is checked).
pub fn switching_protocols_unnamed(client_key: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(client_key)
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request(target: &str, extra: &str) -> Vec<u8> {
        format!(
            "GET {target} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn url_routed_providers_are_taken_as_generic_requests_are() {
        use crate::opening::Provider;
        let r = request("/ws/plivo/tok?serviceHost=a.b&body=e30", "");
        let u = recognise(&r).unwrap();
        assert_eq!((u.service_host, u.token), ("a.b", Ok(Some("tok"))));
        assert_eq!(u.provider, Some(Provider::Plivo));
        assert!(u.body.is_some());
        assert_eq!(
            recognise(&request("/ws/generic/a.b", "")).unwrap().provider,
            None
        );
        // A token segment beside the query's host: read as the Python path reads it.
        let r = request("/ws/telnyx/t?serviceHost=a.b", "");
        let u = recognise(&r).unwrap();
        assert_eq!((u.service_host, u.token), ("a.b", Ok(Some("t"))));
        for target in [
            "/ws/telnyx",                     // no service host: Python's 400
            "/ws/twilio?serviceHost=a.b",     // Twilio's comes in its opening
            "/ws/telnyx/t/x?serviceHost=a.b", // one segment at most
            "/ws/telnyx/%41?serviceHost=a.b", // escaped: Python unquotes it
            "/ws/other?serviceHost=a.b",      // no such provider
        ] {
            assert!(recognise(&request(target, "")).is_none(), "{target}");
        }
    }

    #[test]
    fn twilio_is_taken_with_a_path_token_at_most_and_no_query_or_subprotocol() {
        let r = request("/ws/twilio", "");
        let plain = TwilioUpgrade {
            key: KEY,
            token: None,
            head_len: r.len(),
        };
        assert_eq!(recognise_twilio(&r), Some(plain));
        assert!(recognise(&r).is_none(), "not a generic upgrade");
        let r = request("/ws/twilio/tok.en", "");
        assert_eq!(recognise_twilio(&r).and_then(|u| u.token), Some("tok.en"));
        for (target, extra) in [
            ("/ws/twilio/t/x", ""),
            ("/ws/twilio/%41", ""),
            ("/ws/twilio?token=t", ""),
            ("/ws/twilio?body=e30", ""),
            ("/ws/twilio/", ""),
            ("/ws/twilio", "Authorization: Bearer t\r\n"),
            ("/ws/twilio", "Sec-WebSocket-Protocol: audio\r\n"),
            ("/ws/generic/a.b", ""),
            ("/ws/twilioX", ""),
        ] {
            assert!(
                recognise_twilio(&request(target, extra)).is_none(),
                "{target} {extra}"
            );
        }
    }

    #[test]
    fn the_accept_key_is_rfc_6455s_example() {
        assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn takes_both_forms_of_the_generic_endpoint() {
        let path = request("/ws/generic/a.b", "");
        let up = recognise(&path).unwrap();
        assert_eq!(
            (up.service_host, up.key, up.head_len),
            ("a.b", KEY, path.len())
        );
        let query = request("/ws/generic?serviceHost=a.b", "");
        assert_eq!(recognise(&query).unwrap().service_host, "a.b");
    }

    #[test]
    fn the_bytes_after_the_head_are_not_part_of_it() {
        let mut buf = request("/ws/generic/a.b", "");
        let len = buf.len();
        buf.extend_from_slice(b"\x81\x80abcd");
        assert_eq!(recognise(&buf).unwrap().head_len, len);
    }

    #[test]
    fn a_body_is_decoded() {
        // {"a":1}
        let req = request("/ws/generic/a.b?body=eyJhIjoxfQ%3D%3D", "");
        let up = recognise(&req).unwrap();
        let body = up.body.unwrap();
        assert_eq!(body.json, r#"{"a":1}"#);
        let req = bot_request("/ws?x=1", "bot:80", "k", "u", Some(&body));
        assert!(req.starts_with(b"GET /ws?x=1&body=eyJhIjoxfQ%3D%3D HTTP/1.1\r\nHost: bot:80\r\n"));
    }

    #[test]
    fn leaves_everything_else_to_the_python_path() {
        for (target, extra) in [
            ("/ws/generic", ""),                     // no service host: 400
            ("/ws/generic/a.b/t%6Fk", ""),           // an escaped token segment
            ("/ws/generic/a.b/tok/x", ""),           // three segments: 404
            ("/ws/generic/a%2Eb", ""),               // escaped
            ("/ws/generic/a.b?serviceHost=a.b", ""), // both ways: 400
            ("/ws/generic?serviceHost=a.b&serviceHost=a.b", ""),
            ("/ws/generic/a.b?room=x", ""),  // a parameter of its own
            ("/ws/generic/a.b?body=!!", ""), // a bad body: 400
            ("/ws/twilio", ""),              // a provider
            ("/ws/generic/a.b", "Sec-WebSocket-Protocol: p\r\n"),
            ("/ws/generic/a.b", "Host: again\r\n"), // two Host: 400
            ("/ws/generic/a.b", "Content-Length: 3\r\n"), // a body: 400
            ("/ws/generic/a.b", "Transfer-Encoding: chunked\r\n"),
            ("/ws/generic/a.b", "Sec-WebSocket-Version: 8\r\n"),
            ("/ws/generic/a.b", "Bad Name: x\r\n"), // 400
            ("/ws/generic/a.b", "X-Folded: a\r\n b\r\n"), // obsolete folding: 400
        ] {
            assert!(
                recognise(&request(target, extra)).is_none(),
                "{target} {extra:?}"
            );
        }
        assert!(recognise(&request("/ws/generic/a.b", "Content-Length: 0\r\n")).is_some());
        let lengths = request(
            "/ws/generic/a.b",
            "Content-Length: 0\r\nContent-Length: 0\r\n",
        );
        assert!(recognise(&lengths).is_none(), "two, even of 0: 400");
        let bare_lf = request("/ws/generic/a.b", "X: y\n");
        assert!(recognise(&bare_lf).is_none());
        let post = String::from_utf8(request("/ws/generic/a.b", "")).unwrap();
        assert!(recognise(post.replacen("GET", "POST", 1).as_bytes()).is_none());
        let old = post.replacen("HTTP/1.1", "HTTP/1.0", 1);
        assert!(recognise(old.as_bytes()).is_none());
        let bad_key = post.replace(KEY, "c2hvcnQ=");
        assert!(recognise(bad_key.as_bytes()).is_none());
        assert!(
            recognise(&post.as_bytes()[..post.len() - 2]).is_none(),
            "not all there"
        );
    }

    #[test]
    fn the_token_comes_from_the_first_place_present() {
        let token = |target: &str, extra: &str| {
            let req = request(target, extra);
            let up = recognise(&req).unwrap();
            up.token.map(|t| t.map(str::to_owned))
        };
        let got = |s: &str| Ok(Some(s.to_owned()));
        assert_eq!(token("/ws/generic/a.b", ""), Ok(None));
        assert_eq!(token("/ws/generic/a.b/p", ""), got("p"));
        assert_eq!(token("/ws/generic/a.b/p?token=q&token=r", ""), got("q"));
        let bearer = "Authorization: Bearer  h \r\n";
        assert_eq!(token("/ws/generic/a.b/p?token=q", bearer), got("h"));
        // What the Python path would read otherwise is left to it.
        assert_eq!(token("/ws/generic/a.b?token=%71", ""), Err(Unsure));
        assert_eq!(
            token("/ws/generic/a.b", "Authorization: Basic eA==\r\n"),
            Err(Unsure)
        );
    }

    #[test]
    fn a_tokens_session_id_is_the_python_paths() {
        // str(uuid.UUID(bytes=sha256(b"wsgate session id\x00nonce-1").digest()[:16], version=4))
        assert_eq!(
            session_id_for("nonce-1"),
            "713f2ab2-cd4e-46e8-85ab-a670125b6b98"
        );
    }

    #[test]
    fn an_oversized_head_is_not_taken() {
        let big = request(
            "/ws/generic/a.b",
            &format!("X: {}\r\n", "a".repeat(MAX_HEADER_BYTES)),
        );
        assert!(recognise(&big).is_none());
    }

    #[test]
    fn a_bot_101_is_checked_against_our_key() {
        let ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            accept_key(KEY)
        );
        assert!(bot_accepted(ok.as_bytes(), KEY));
        assert!(!bot_accepted(ok.as_bytes(), "AAAAAAAAAAAAAAAAAAAAAA=="));
        let ext = ok.replace("\r\n\r\n", "\r\nSec-WebSocket-Extensions: x\r\n\r\n");
        assert!(!bot_accepted(ext.as_bytes(), KEY));
        let proto = ok.replace("\r\n\r\n", "\r\nSec-WebSocket-Protocol: p\r\n\r\n");
        assert!(!bot_accepted(proto.as_bytes(), KEY));
        assert!(!bot_accepted(ok.replace("101", "200").as_bytes(), KEY));
        // As the Python check: the reason phrase is not looked at; an empty line first is.
        let reason = ok.replace("Switching Protocols", "Go\x01Ahead");
        assert!(bot_accepted(reason.as_bytes(), KEY));
        assert!(!bot_accepted(format!("\r\n{ok}").as_bytes(), KEY));
        let folded = ok.replace("\r\n\r\n", "\r\nX: a\r\n b\r\n\r\n");
        assert!(!bot_accepted(folded.as_bytes(), KEY));
        // One upgrade, to websocket, and one accept: anything more is not a 101 we relay.
        for more in [
            "Upgrade: websocket, h2c",
            "Upgrade: websocket",
            "Sec-WebSocket-Accept: x",
        ] {
            let twice = ok.replace("\r\n\r\n", &format!("\r\n{more}\r\n\r\n"));
            assert!(!bot_accepted(twice.as_bytes(), KEY), "{more}");
        }
        let listed = ok.replace("Connection: Upgrade", "Connection: keep-alive, Upgrade");
        assert!(bot_accepted(listed.as_bytes(), KEY));
    }

    #[test]
    fn an_empty_line_before_the_request_is_not_taken() {
        let mut req = b"\r\n".to_vec();
        req.extend(request("/ws/generic/a.b", ""));
        assert!(recognise(&req).is_none());
    }

    #[test]
    fn a_uuid_is_written_as_pythons_uuid_module_writes_it() {
        // str(uuid.UUID(bytes=..., version=4))
        let counting: [u8; 16] = std::array::from_fn(|i| i as u8);
        assert_eq!(uuid4(counting), "00010203-0405-4607-8809-0a0b0c0d0e0f");
        assert_eq!(uuid4([0xff; 16]), "ffffffff-ffff-4fff-bfff-ffffffffffff");
    }

    #[test]
    fn the_client_101_names_the_session() {
        let uuid = new_uuid();
        assert_eq!(uuid.len(), 36);
        assert_eq!(&uuid[14..15], "4");
        let text = String::from_utf8(switching_protocols(KEY, &uuid)).unwrap();
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.ends_with(&format!("X-Session-Id: {uuid}\r\n\r\n")));
    }
}
