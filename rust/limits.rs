//! Every size and time limit of the data plane, in one place.
//!
//! The Python control plane reads these through the extension module, so no number here is ever
//! repeated in Python. Each limit is pinned by a test below: changing one is a behaviour change
//! (SPEC §2–§4), not a refactor.

use std::time::Duration;

/// Largest `?body=` JSON document, in bytes after base64 decoding (SPEC §4); larger is a 413.
pub const MAX_BODY_BYTES: usize = 4096;

/// Largest upgrade request line plus headers, in bytes (SPEC §2); larger is a 431.
pub const MAX_HEADER_BYTES: usize = 8192;

/// Deepest nesting of arrays and objects in a `?body=` document; deeper is a 400. JSON allows any
/// depth, but the bot parses the body (Python's `json.loads` fails from depth ~1000 with a
/// `RecursionError`, not a `ValueError`), so a 4 KB body of 2,000 brackets must not reach it.
pub const MAX_BODY_DEPTH: usize = 64;

/// Default largest WebSocket message relayed, in bytes, when a service sets none (1 MiB).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1 << 20;

/// Lifetime of a session token minted by `/start`, in seconds (SPEC §3: five minutes).
pub const TOKEN_TTL_SECONDS: u64 = 300;

/// Largest payload of a WebSocket control frame, in bytes (RFC 6455 §5.5: "125 bytes or less").
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Bytes read from a socket at once. While the destination is slow, a pump holds at most this
/// much and stops reading its source: backpressure reaches the sender through TCP.
pub const READ_BUF: usize = 16 * 1024;

/// How long a session may take to finish once one side closed (a close handshake, or the other
/// side noticing), before the gateway drops both connections.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest session token accepted, in bytes; longer ones are refused as malformed before any
/// decoding or MAC work. A minted token for the longest service host (127 bytes) is about 300.
pub const MAX_TOKEN_BYTES: usize = 2048;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_have_their_specified_values() {
        assert_eq!(MAX_BODY_BYTES, 4096);
        assert_eq!(MAX_HEADER_BYTES, 8192);
        assert_eq!(DEFAULT_MAX_MESSAGE_SIZE, 1_048_576);
        assert_eq!(TOKEN_TTL_SECONDS, 5 * 60);
        assert_eq!(MAX_CONTROL_PAYLOAD, 125);
        assert_eq!(MAX_TOKEN_BYTES, 2048);
        assert_eq!(MAX_BODY_DEPTH, 64);
        assert_eq!(READ_BUF, 16_384);
        assert_eq!(CLOSE_TIMEOUT, Duration::from_secs(5));
    }
}
