//! wsgate's native core: the data plane of the gateway.
//!
//! The session core (`session`, on the wire codec `frame`) decides everything and does no I/O;
//! `pump`, `relay`, `echo` and `inproc` move bytes for it, `driver` is the one loop every session
//! runs, `shard` the relay thread that runs it, and `engine` owns the threads and the queue to
//! Python. Only `py` knows Python, so `cargo test --no-default-features` runs everything without
//! an interpreter.
#![deny(missing_docs)]

pub mod accepting;
pub mod body;
pub mod counters;
pub mod driver;
pub mod echo;
pub mod engine;
pub mod frame;
pub mod inproc;
pub mod limits;
pub mod memory;
pub mod nonces;
pub mod open;
pub mod opener;
pub mod opening;
pub mod pump;
pub mod reading;
pub mod relay;
pub mod scratch;
pub mod session;
pub mod session_line;
pub mod shard;
mod sockets;
pub mod stream;
pub mod tls;
pub mod token;
pub mod twilio;
pub mod upgrade;

#[cfg(feature = "python")]
mod py;
#[cfg(feature = "python")]
mod py_open;
#[cfg(feature = "python")]
mod py_tls;
