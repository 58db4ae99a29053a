//! Every size and time limit of the data plane, in one place: what a session may send and how
//! long it may take to end. Limits of the control plane live with what they limit (`body.rs`,
//! `token.rs`, the HTTP head in `py.rs`).
//!
//! The Python control plane reads these through the extension module, so no number here is ever
//! repeated in Python. Each limit is pinned by a test below: changing one is a behaviour change,
//! not a refactor.

use std::time::Duration;

/// Default largest WebSocket message relayed, in bytes, when a service sets none (1 MiB).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1 << 20;

/// Largest payload of a WebSocket control frame, in bytes (RFC 6455 §5.5: "125 bytes or less").
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Bytes read from a socket at once. While the destination is slow, a pump holds at most this
/// much and stops reading its source: backpressure reaches the sender through TCP.
pub const READ_BUF: usize = 16 * 1024;

/// How long a session may take to finish once one side closed (a close handshake, or the other
/// side noticing), before the gateway drops both connections.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_have_their_specified_values() {
        assert_eq!(DEFAULT_MAX_MESSAGE_SIZE, 1_048_576);
        assert_eq!(MAX_CONTROL_PAYLOAD, 125);
        assert_eq!(READ_BUF, 16_384);
        assert_eq!(CLOSE_TIMEOUT, Duration::from_secs(5));
    }
}
