//! The session core, Sans-I/O: everything a session decides, with no socket, task or clock in
//! it, so that all of it is tested (and fuzzed) on plain bytes.
//!
//! - [`reader`]: one direction's bytes in, frames out, every rule and limit of RFC 6455 checked;
//! - [`forward`]: a relayed direction, rewritten in place on top of the reader (the pump's work);
//! - [`assemble`]: whole messages on top of the reader (the in-process peer's work);
//! - [`state`]: the per-session state machine: who gets which close, who ended the session.
//!
//! The I/O layers only move bytes and report what happened: `pump.rs` (a socket pair, used by
//! `relay.rs` and `echo.rs`) and `inproc.rs`; `driver.rs` is the one loop that feeds them, the
//! command channel and the timer into [`state::Session`].

pub mod assemble;
pub mod forward;
pub mod reader;
pub mod state;

pub use assemble::{Assembler, Inbound};
pub use forward::{Forwarded, Forwarder, OwnClose, Transform};
pub use reader::{Frame, FrameReader};
pub use state::{Action, EndedBy, Input, Kind, Limits, Outcome, Session, Side, TIME_LIMIT_CLOSE};
