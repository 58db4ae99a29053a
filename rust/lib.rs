//! wsgate's native core: the data plane of the gateway.
//!
//! Plain Rust modules own the work (`frame`, `pump`, `relay`); only `py` knows Python, so
//! `cargo test --no-default-features` runs everything without an interpreter.
#![deny(missing_docs)]

pub mod body;
pub mod frame;
pub mod inproc;
pub mod limits;
pub mod pump;
pub mod relay;
pub mod token;

#[cfg(feature = "python")]
mod py;
