//! The part of an in-process session that Python's calls reach: the outbox Python's `send`
//! fills and the session writes, and the count of delivered bytes Python has not consumed (the
//! inbox's backpressure). A call that gives the session something to do gives it a turn on its
//! relay thread (one poke until the session has looked again, however many calls).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::frame::{close_frame, write_header, Opcode, MAX_HEADER_LEN};
use crate::shard::Poker;

/// What an in-process session tells Python, besides its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// A whole text message from the client.
    Text(String),
    /// A whole binary message from the client.
    Binary(Vec<u8>),
    /// The outbox, once over its limit, has emptied to half of it: sending may go on.
    Drained,
}

/// A message for Python about one in-process session.
#[derive(Debug, Clone)]
pub struct Message {
    /// The session.
    pub session_id: u64,
    /// What happened.
    pub data: Delivery,
}

#[derive(Default)]
pub(super) struct OutState {
    pub(super) buf: Vec<u8>,
    /// Bytes the session task took from `buf` and has not finished writing.
    pub(super) writing: usize,
    /// A send went over the limit: Python waits for `Drained`.
    pub(super) over: bool,
    /// No more sends: a close went (or is queued) to the client, or the session ended.
    pub(super) closed: bool,
}

/// The part of an in-process session that Python's calls reach.
pub struct Handle {
    pub(super) out: Mutex<OutState>,
    pub(super) send_buffer_limit: usize,
    pub(super) undelivered: AtomicUsize,
    pub(super) inbox_limit: usize,
    /// Gives the session a turn; `None` in tests without a relay thread.
    poker: Option<Poker>,
    /// A poke went since the session last looked.
    poked: AtomicBool,
    /// Data messages Python's bot queued for the client, and their payload bytes.
    sent_messages: AtomicU64,
    sent_bytes: AtomicU64,
}

impl Handle {
    /// A handle with these limits, in bytes, for a session that `poker` wakes.
    pub fn new(inbox_limit: usize, send_buffer_limit: usize, poker: Option<Poker>) -> Self {
        Self {
            out: Mutex::new(OutState::default()),
            send_buffer_limit,
            undelivered: AtomicUsize::new(0),
            inbox_limit,
            poker,
            poked: AtomicBool::new(false),
            sent_messages: AtomicU64::new(0),
            sent_bytes: AtomicU64::new(0),
        }
    }

    pub(super) fn out(&self) -> std::sync::MutexGuard<'_, OutState> {
        self.out
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a message for the client. Returns the bytes now queued, or `None` once the
    /// session is closing (the message is dropped, as Starlette drops sends after a close).
    pub fn send(&self, text: bool, data: &[u8]) -> Option<usize> {
        let queued = {
            let mut st = self.out();
            if st.closed {
                return None;
            }
            push_frame(
                &mut st.buf,
                if text { Opcode::TEXT } else { Opcode::BINARY },
                data,
            );
            let queued = st.buf.len() + st.writing;
            if queued > self.send_buffer_limit {
                st.over = true;
            }
            queued
        };
        // Counted once queued; a send after the close (dropped above) is not.
        self.sent_messages.fetch_add(1, Ordering::Relaxed);
        self.sent_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.wake();
        Some(queued)
    }

    /// Data messages Python's bot queued for the client so far, and their payload bytes.
    pub fn sent(&self) -> (u64, u64) {
        (
            self.sent_messages.load(Ordering::Relaxed),
            self.sent_bytes.load(Ordering::Relaxed),
        )
    }

    /// Python's bot took `n` bytes of delivered messages.
    pub fn consumed(&self, n: usize) {
        let before = self
            .undelivered
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            })
            .unwrap_or(0);
        // Only a session out of credit waits for this.
        if before >= self.inbox_limit && before.saturating_sub(n) < self.inbox_limit {
            self.wake();
        }
    }

    /// Gives the session a turn, unless one is due already.
    fn wake(&self) {
        if !self.poked.swap(true, Ordering::SeqCst) {
            if let Some(p) = &self.poker {
                p.poke();
            }
        }
    }

    /// The session is looking at the handle now: the next call must wake it again.
    pub(super) fn rearm(&self) {
        self.poked.store(false, Ordering::SeqCst);
    }

    /// Queues our close for the client (called during the session's turn: no wake needed).
    pub(super) fn queue_close(&self, code: u16, reason: &str) {
        let mut st = self.out();
        if !st.closed {
            st.closed = true;
            st.buf.extend_from_slice(&close_frame(code, reason, None));
        }
    }

    /// Queues a pong for the client (called during the session's turn: no wake needed).
    pub(super) fn queue_pong(&self, payload: &[u8]) {
        let mut st = self.out();
        if !st.closed {
            push_frame(&mut st.buf, Opcode::PONG, payload);
        }
    }
}

fn push_frame(buf: &mut Vec<u8>, opcode: Opcode, payload: &[u8]) {
    let mut hb = [0u8; MAX_HEADER_LEN];
    let n = write_header(&mut hb, true, opcode, None, payload.len() as u64);
    buf.extend_from_slice(&hb[..n]);
    buf.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_past_the_limit_report_it_and_stop_after_a_close() {
        let h = Handle::new(10, 8, None);
        assert_eq!(h.send(true, b"hi"), Some(4));
        assert_eq!(h.send(false, b"12345"), Some(11));
        assert!(h.out().over);
        h.queue_close(1000, "");
        assert_eq!(h.send(true, b"late"), None);
        assert_eq!(h.sent(), (2, 7), "a send after the close is not counted");
    }
}
