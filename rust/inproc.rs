//! Sessions served by an in-process Python bot: the engine speaks WebSocket with the client and
//! Python sees whole messages.
//!
//! Inbound, frames are checked and reassembled here (text must be UTF-8: else 1007), pings are
//! answered, and each whole message is queued for Python with the engine's other news, behind
//! the same doorbell. Python tells the engine how much it has consumed; past `inbox_limit`
//! undelivered bytes the session stops reading its client, so a bot that never reads costs a
//! bounded amount of memory and the client meets TCP backpressure.
//!
//! Outbound, Python's `send` frames the message into a per-session outbox and wakes the session
//! task, which writes it. `send` returns the bytes queued; past `send_buffer_limit` Python waits
//! for a `Drained` message, queued once the outbox has emptied to half the limit.

use std::io::ErrorKind;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::time::{sleep_until, Instant};

use crate::frame::{
    apply_mask, close_frame, parse_close, parse_header, write_header, MessageState, Opcode,
    MAX_HEADER_LEN,
};
use crate::pump::READ_BUF;
use crate::relay::{Command, EndedBy, Outcome, CLOSE_TIMEOUT};

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
struct OutState {
    buf: Vec<u8>,
    /// Bytes the session task took from `buf` and has not finished writing.
    writing: usize,
    /// A send went over the limit: Python waits for `Drained`.
    over: bool,
    /// No more sends: a close went (or is queued) to the client, or the session ended.
    closed: bool,
}

/// The part of an in-process session that Python's calls reach.
pub struct Handle {
    out: Mutex<OutState>,
    out_wake: Notify,
    send_buffer_limit: usize,
    undelivered: AtomicUsize,
    credit_wake: Notify,
    inbox_limit: usize,
}

impl Handle {
    /// A handle with these limits, in bytes.
    pub fn new(inbox_limit: usize, send_buffer_limit: usize) -> Self {
        Self {
            out: Mutex::new(OutState::default()),
            out_wake: Notify::new(),
            send_buffer_limit,
            undelivered: AtomicUsize::new(0),
            credit_wake: Notify::new(),
            inbox_limit,
        }
    }

    fn out(&self) -> std::sync::MutexGuard<'_, OutState> {
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
        self.out_wake.notify_one();
        Some(queued)
    }

    /// Python's bot took `n` bytes of delivered messages.
    pub fn consumed(&self, n: usize) {
        let _ = self
            .undelivered
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
        self.credit_wake.notify_one();
    }

    fn queue_close(&self, code: u16, reason: &str) {
        let mut st = self.out();
        if !st.closed {
            st.closed = true;
            st.buf.extend_from_slice(&close_frame(code, reason, None));
        }
        drop(st);
        self.out_wake.notify_one();
    }

    fn queue_pong(&self, payload: &[u8]) {
        let mut st = self.out();
        if !st.closed {
            push_frame(&mut st.buf, Opcode::PONG, payload);
        }
        drop(st);
        self.out_wake.notify_one();
    }
}

fn push_frame(buf: &mut Vec<u8>, opcode: Opcode, payload: &[u8]) {
    let mut hb = [0u8; MAX_HEADER_LEN];
    let n = write_header(&mut hb, true, opcode, None, payload.len() as u64);
    buf.extend_from_slice(&hb[..n]);
    buf.extend_from_slice(payload);
}

/// What the client's bytes amounted to.
#[derive(Debug, PartialEq, Eq)]
enum Inbound {
    Message(Delivery),
    Ping(Vec<u8>),
    Close(Option<(u16, String)>),
    Violation(u16, String),
}

/// Reassembles client frames into messages, judging each header before its payload.
struct Assembler {
    max: u64,
    state: MessageState,
    msg: Vec<u8>,
    text: bool,
    /// The data frame whose payload is arriving: bytes left, key, key offset, FIN.
    frame: Option<(u64, [u8; 4], usize, bool)>,
}

impl Assembler {
    fn new(max: u64) -> Self {
        Self {
            max,
            state: MessageState::default(),
            msg: Vec::new(),
            text: false,
            frame: None,
        }
    }

    /// Consumes what it can of `inbuf`; stops at a close or a violation.
    fn feed(&mut self, inbuf: &mut Vec<u8>, out: &mut Vec<Inbound>) -> bool {
        let mut r = 0;
        let mut stop = false;
        while !stop {
            if let Some((left, key, offset, fin)) = &mut self.frame {
                let take = (inbuf.len() - r).min(usize::try_from(*left).unwrap_or(usize::MAX));
                if take == 0 {
                    break;
                }
                let start = self.msg.len();
                self.msg.extend_from_slice(&inbuf[r..r + take]);
                apply_mask(&mut self.msg[start..], *key, *offset);
                r += take;
                *left -= take as u64;
                *offset += take;
                if *left == 0 {
                    let fin = *fin;
                    self.frame = None;
                    if fin {
                        stop = self.finish(out);
                    }
                }
                continue;
            }
            let h = match parse_header(&inbuf[r..], true) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(v) => {
                    out.push(Inbound::Violation(v.close_code(), v.to_string()));
                    break;
                }
            };
            if let Err(v) = self.state.check(&h, self.max) {
                out.push(Inbound::Violation(v.close_code(), v.to_string()));
                break;
            }
            let key = h.mask.unwrap_or_default();
            if h.opcode.is_control() {
                let total = h.header_len + h.len as usize;
                if inbuf.len() - r < total {
                    break;
                }
                let mut payload = inbuf[r + h.header_len..r + total].to_vec();
                apply_mask(&mut payload, key, 0);
                r += total;
                match h.opcode {
                    Opcode::PING => out.push(Inbound::Ping(payload)),
                    Opcode::CLOSE => {
                        out.push(match parse_close(&payload) {
                            Ok(c) => Inbound::Close(c),
                            Err(v) => Inbound::Violation(v.close_code(), v.to_string()),
                        });
                        stop = true;
                    }
                    _ => {} // an unsolicited pong needs no answer
                }
                continue;
            }
            if h.opcode != Opcode::CONTINUE {
                self.msg.clear();
                self.text = h.opcode == Opcode::TEXT;
            }
            r += h.header_len;
            if h.len > 0 {
                self.frame = Some((h.len, key, 0, h.fin));
            } else if h.fin {
                stop = self.finish(out);
            }
        }
        inbuf.drain(..r);
        stop
    }

    fn finish(&mut self, out: &mut Vec<Inbound>) -> bool {
        let bytes = std::mem::take(&mut self.msg);
        if !self.text {
            out.push(Inbound::Message(Delivery::Binary(bytes)));
            return false;
        }
        match String::from_utf8(bytes) {
            Ok(s) => {
                out.push(Inbound::Message(Delivery::Text(s)));
                false
            }
            Err(_) => {
                // RFC 6455 §8.1: an endpoint MUST fail the connection on invalid UTF-8 text.
                out.push(Inbound::Violation(
                    1007,
                    "invalid UTF-8 in a text message".into(),
                ));
                true
            }
        }
    }
}

/// Serves one client for an in-process bot until the session ends. `deliver` queues a message
/// for Python (and rings the doorbell).
pub(crate) async fn run(
    id: u64,
    client: &TcpStream,
    pending: Vec<u8>,
    max_message_size: u64,
    handle: &Handle,
    mut commands: mpsc::UnboundedReceiver<Command>,
    deliver: impl Fn(Message),
) -> Outcome {
    let mut o = Outcome::new(id);
    let mut ended = false;
    let mut asm = Assembler::new(max_message_size);
    let mut inbuf = pending;
    let mut events = Vec::new();
    let mut reading = true;
    let mut client_closed = false;
    let mut out: Vec<u8> = Vec::new();
    let mut out_pos = 0;
    let mut deadline: Option<Instant> = None;
    let mut commands_open = true;
    loop {
        // Judge what has arrived before waiting for more.
        if reading && !inbuf.is_empty() {
            if asm.feed(&mut inbuf, &mut events) {
                reading = false;
            }
            for ev in events.drain(..) {
                match ev {
                    Inbound::Message(d) => {
                        let n = match &d {
                            Delivery::Text(s) => s.len(),
                            Delivery::Binary(b) => b.len(),
                            Delivery::Drained => 0,
                        };
                        o.messages_in += 1;
                        o.bytes_in += n as u64;
                        handle.undelivered.fetch_add(n, Ordering::AcqRel);
                        deliver(Message {
                            session_id: id,
                            data: d,
                        });
                    }
                    Inbound::Ping(p) => handle.queue_pong(&p),
                    Inbound::Close(c) => {
                        let c = c.unwrap_or((1005, String::new()));
                        o.end(EndedBy::Client, "client closed", &mut ended);
                        // Reply with the client's code: Python's bot gets a disconnect.
                        let reply = if c.0 == 1005 { 1000 } else { c.0 };
                        if !handle.out().closed {
                            o.bot_close = Some((reply, String::new()));
                        }
                        handle.queue_close(reply, "");
                        o.client_close = Some(c);
                        client_closed = true;
                        inbuf = Vec::new();
                    }
                    Inbound::Violation(code, reason) => {
                        o.end(EndedBy::Gateway, format!("client: {reason}"), &mut ended);
                        o.bot_close = Some((code, reason.clone()));
                        handle.queue_close(code, &reason);
                        inbuf = Vec::new();
                    }
                }
            }
        }
        if out_pos == out.len() {
            out.clear();
            out_pos = 0;
            let mut st = handle.out();
            st.writing = 0;
            if st.over && st.buf.len() <= handle.send_buffer_limit / 2 {
                st.over = false;
                deliver(Message {
                    session_id: id,
                    data: Delivery::Drained,
                });
            }
            if !st.buf.is_empty() {
                std::mem::swap(&mut out, &mut st.buf);
                st.writing = out.len();
            } else if st.closed && (client_closed || !reading) {
                // Our close is written and the client's came (or it broke the protocol).
                drop(st);
                let _ = socket2::SockRef::from(client).shutdown(std::net::Shutdown::Write);
                break;
            }
        }
        if ended && deadline.is_none() {
            deadline = Some(Instant::now() + CLOSE_TIMEOUT);
        }
        let has_credit = handle.undelivered.load(Ordering::Acquire) < handle.inbox_limit;
        tokio::select! {
            r = client.readable(), if reading && has_credit => {
                if r.is_err() {
                    o.end(EndedBy::Client, "client gone", &mut ended);
                    break;
                }
                inbuf.reserve(READ_BUF);
                match client.try_read_buf(&mut inbuf) {
                    Ok(0) => {
                        o.end(EndedBy::Client, "client gone", &mut ended);
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => {
                        o.end(EndedBy::Client, "client gone", &mut ended);
                        break;
                    }
                }
            }
            r = client.readable(), if !reading && !client_closed => {
                // After our close: read and drop until the client's close reply or EOF.
                let mut sink = Vec::with_capacity(READ_BUF);
                match r.and_then(|()| client.try_read_buf(&mut sink)) {
                    Ok(0) => break,
                    Err(e) if e.kind() != ErrorKind::WouldBlock => break,
                    _ => {}
                }
            }
            _ = handle.credit_wake.notified(), if reading && !has_credit => {}
            _ = handle.out_wake.notified(), if out_pos == out.len() => {}
            w = client.writable(), if out_pos < out.len() => {
                if w.is_err() {
                    o.end(EndedBy::Client, "client gone", &mut ended);
                    break;
                }
                match client.try_write(&out[out_pos..]) {
                    Ok(n) => out_pos += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => {
                        o.end(EndedBy::Client, "client gone", &mut ended);
                        break;
                    }
                }
            }
            cmd = commands.recv(), if commands_open => match cmd {
                Some(Command::Close(code, reason)) => {
                    o.end(EndedBy::Gateway, reason.clone(), &mut ended);
                    if !handle.out().closed {
                        o.bot_close = Some((code, reason.clone()));
                    }
                    handle.queue_close(code, &reason);
                }
                None => commands_open = false,
            },
            _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                o.end(EndedBy::Gateway, "close timeout", &mut ended);
                break;
            }
        }
    }
    handle.out().closed = true;
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(fin: bool, opcode: Opcode, payload: &[u8]) -> Vec<u8> {
        crate::frame::encode_frame(fin, opcode, payload, Some([7, 7, 9, 1]))
    }

    #[test]
    fn messages_split_anywhere_reassemble_whole() {
        let mut wire = masked(false, Opcode::TEXT, b"hel");
        wire.extend(masked(true, Opcode::PING, b"p"));
        wire.extend(masked(true, Opcode::CONTINUE, "lo é".as_bytes()));
        wire.extend(masked(true, Opcode::BINARY, &[0, 1, 2]));
        for cut in 0..wire.len() {
            let mut asm = Assembler::new(100);
            let mut out = Vec::new();
            let mut inbuf = wire[..cut].to_vec();
            asm.feed(&mut inbuf, &mut out);
            inbuf.extend_from_slice(&wire[cut..]);
            asm.feed(&mut inbuf, &mut out);
            assert_eq!(
                out,
                vec![
                    Inbound::Ping(b"p".to_vec()),
                    Inbound::Message(Delivery::Text("hello é".into())),
                    Inbound::Message(Delivery::Binary(vec![0, 1, 2])),
                ],
                "cut at {cut}"
            );
            assert!(inbuf.is_empty());
        }
    }

    #[test]
    fn invalid_utf8_text_is_a_1007_and_oversize_a_1009() {
        let mut asm = Assembler::new(100);
        let mut out = Vec::new();
        assert!(asm.feed(&mut masked(true, Opcode::TEXT, &[0xFF]), &mut out));
        assert!(matches!(out[0], Inbound::Violation(1007, _)));
        let mut asm = Assembler::new(2);
        let mut out = Vec::new();
        asm.feed(&mut masked(true, Opcode::BINARY, b"abc"), &mut out);
        assert!(matches!(out[0], Inbound::Violation(1009, _)));
    }

    #[test]
    fn sends_past_the_limit_report_it_and_stop_after_a_close() {
        let h = Handle::new(10, 8);
        assert_eq!(h.send(true, b"hi"), Some(4));
        assert_eq!(h.send(false, b"12345"), Some(11));
        assert!(h.out().over);
        h.queue_close(1000, "");
        assert_eq!(h.send(true, b"late"), None);
    }
}
