//! Whole messages out of a client's frame stream, for a bot that wants messages rather than
//! frames (the in-process peer). A user of [`FrameReader`]: the rules are the reader's, and on
//! top of them text must be UTF-8 (RFC 6455 §8.1; else 1007).

use crate::frame::{apply_mask, Opcode, Violation};

use super::reader::{Frame, FrameReader};

/// What a client's bytes amounted to.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// A whole text message.
    Text(String),
    /// A whole binary message.
    Binary(Vec<u8>),
    /// A ping, with its payload: it wants a pong.
    Ping(Vec<u8>),
    /// The client's close: its code and reason, `None` without a code. Nothing follows it.
    Close(Option<(u16, String)>),
    /// The client broke a rule. Nothing follows it.
    Violation(Violation),
}

/// Reassembles a client's frames into messages. Data payloads are copied into the message as
/// they arrive; every limit was judged from their headers first.
#[derive(Debug)]
pub struct Assembler {
    reader: FrameReader,
    msg: Vec<u8>,
    text: bool,
}

impl Assembler {
    /// An assembler of client messages of at most `max_message_size` bytes.
    pub fn new(max_message_size: u64) -> Self {
        Self {
            reader: FrameReader::new(true, max_message_size),
            msg: Vec::new(),
            text: false,
        }
    }

    /// Consumes what it can of `inbuf` (the rest stays for more bytes) and appends what it
    /// amounted to. Returns true once the stream is over: a close or a broken rule came.
    pub fn feed(&mut self, inbuf: &mut Vec<u8>, out: &mut Vec<Inbound>) -> bool {
        let mut r = 0;
        let mut over = false;
        while !over && r < inbuf.len() {
            let frame = self.reader.next(&inbuf[r..]);
            let len = frame.len();
            match frame {
                Frame::Header {
                    header,
                    message_end,
                } => {
                    if header.opcode != Opcode::CONTINUE {
                        self.msg.clear();
                        self.text = header.opcode == Opcode::TEXT;
                    }
                    if message_end {
                        over = self.finish(out);
                    }
                }
                Frame::Payload {
                    mask,
                    offset,
                    message_end,
                    ..
                } => {
                    let start = self.msg.len();
                    self.msg.extend_from_slice(&inbuf[r..r + len]);
                    if let Some(key) = mask {
                        apply_mask(&mut self.msg[start..], key, offset);
                    }
                    if message_end {
                        over = self.finish(out);
                    }
                }
                Frame::Control { header } => {
                    // An unsolicited pong needs no answer.
                    if header.opcode == Opcode::PING {
                        let from = r + header.header_len;
                        let mut payload = inbuf[from..r + len].to_vec();
                        if let Some(key) = header.mask {
                            apply_mask(&mut payload, key, 0);
                        }
                        out.push(Inbound::Ping(payload));
                    }
                }
                Frame::Close { close, .. } => {
                    out.push(Inbound::Close(close));
                    over = true;
                }
                Frame::Incomplete => break,
                Frame::Violation(v) => {
                    out.push(Inbound::Violation(v));
                    over = true;
                }
            }
            r += len;
        }
        inbuf.drain(..r);
        over
    }

    /// A message is complete; returns true when it broke a rule.
    fn finish(&mut self, out: &mut Vec<Inbound>) -> bool {
        let bytes = std::mem::take(&mut self.msg);
        if !self.text {
            out.push(Inbound::Binary(bytes));
            return false;
        }
        match String::from_utf8(bytes) {
            Ok(s) => {
                out.push(Inbound::Text(s));
                false
            }
            Err(_) => {
                out.push(Inbound::Violation(Violation::InvalidUtf8));
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{close_frame, encode_frame};

    fn masked(fin: bool, opcode: Opcode, payload: &[u8]) -> Vec<u8> {
        encode_frame(fin, opcode, payload, Some([7, 7, 9, 1]))
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
                    Inbound::Text("hello é".into()),
                    Inbound::Binary(vec![0, 1, 2]),
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
        assert_eq!(out[0], Inbound::Violation(Violation::InvalidUtf8));
        assert_eq!(Violation::InvalidUtf8.close_code(), 1007);
        let mut asm = Assembler::new(2);
        let mut out = Vec::new();
        asm.feed(&mut masked(true, Opcode::BINARY, b"abc"), &mut out);
        assert!(matches!(&out[0], Inbound::Violation(v) if v.close_code() == 1009));
    }

    #[test]
    fn nothing_is_read_after_a_broken_rule_or_a_close() {
        let late = masked(true, Opcode::TEXT, b"late");
        for first in [
            masked(true, Opcode::BINARY, b"abc"), // over the 2-byte limit
            encode_frame(true, Opcode::TEXT, b"x", None), // unmasked
            close_frame(1000, "", Some([1, 2, 3, 4])),
        ] {
            let mut asm = Assembler::new(2);
            let mut out = Vec::new();
            let mut inbuf = first.clone();
            inbuf.extend_from_slice(&late);
            assert!(asm.feed(&mut inbuf, &mut out), "{out:?}");
            assert_eq!(out.len(), 1);
            assert!(matches!(out[0], Inbound::Violation(_) | Inbound::Close(_)));
        }
    }
}
