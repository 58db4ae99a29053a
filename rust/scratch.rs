//! A scratch buffer per thread for the reads whose bytes are copied out at once (a request's
//! head at the accept, a request read on a relay thread, a bot's 101): zeroed once per thread,
//! not at every read. A `[0u8; 4096]` or `vec![0; n]` per call is a memset of it each time:
//! a tenth of the instructions of a session's open (callgrind, benches/README.md "Session
//! opens, round 5").

use std::cell::RefCell;

/// The buffer's size: the largest read taken through it.
pub const SIZE: usize = 16 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SIZE].into_boxed_slice());
}

/// Runs `f` with `len` bytes (at most [`SIZE`]) of this thread's scratch buffer, whose contents
/// are whatever an earlier read left there. Should `f` ask again from inside, it gets a buffer
/// of its own.
pub fn with<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    assert!(len <= SIZE, "a scratch read of {len} bytes");
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf[..len]),
        Err(_) => f(&mut vec![0u8; len]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nested_call_gets_a_buffer_of_its_own() {
        with(8, |outer| {
            outer.copy_from_slice(b"outer...");
            with(4, |inner| {
                assert_eq!(inner.len(), 4);
                inner.copy_from_slice(b"in..");
            });
            assert_eq!(outer, b"outer...");
        });
        // The thread's buffer kept what the outer call wrote: nothing zeroes it.
        with(8, |again| assert_eq!(again, b"outer..."));
    }
}
