//! The frame reader: one direction's byte stream in, frames out, every rule of RFC 6455 checked
//! on the way (reserved bits, opcodes, the masking rule of the direction, lengths, control
//! frames whole and short, fragmentation, the message size limit, close payloads).
//!
//! It holds no buffer. A caller hands it the bytes it has, learns what the next ones are (a data
//! header, a run of payload, a whole control frame, or "not enough yet") and how many they take,
//! and does with them what it needs: the relay rewrites them in place, the in-process peer copies
//! them into a message. Every limit is judged from a header before its payload is looked at, so
//! nothing is committed for a length a peer merely declares; a data payload is never held whole.

use crate::frame::{
    apply_mask, parse_close, parse_header, Header, MessageState, Opcode, Violation,
    MAX_CONTROL_PAYLOAD,
};

/// What the next bytes of the stream are. [`Frame::len`] says how many they take.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A data frame's header. Its payload follows as [`Frame::Payload`] runs.
    Header {
        /// The header, checked against the message in progress and the size limit.
        header: Header,
        /// The frame is empty and completes a message.
        message_end: bool,
    },
    /// `len` bytes of the payload of the data frame in progress, as they came (still masked).
    Payload {
        /// Bytes of payload at the start of the input.
        len: usize,
        /// The frame's masking key (a client's frame).
        mask: Option<[u8; 4]>,
        /// Where in the key stream these bytes start (for [`apply_mask`]).
        offset: usize,
        /// These bytes complete a message.
        message_end: bool,
    },
    /// A whole ping or pong: header and payload.
    Control {
        /// The header.
        header: Header,
    },
    /// A whole close frame, its payload checked (§5.5.1, §7.4): the code and reason, or `None`
    /// for a close without a status code.
    Close {
        /// The header.
        header: Header,
        /// The close's code and reason.
        close: Option<(u16, String)>,
    },
    /// The input ends inside a header or a control frame: call again with these bytes and more.
    Incomplete,
    /// A rule was broken: the stream is over.
    Violation(Violation),
}

impl Frame {
    /// Bytes of input this frame takes (0 for `Incomplete` and `Violation`).
    pub fn len(&self) -> usize {
        match self {
            Self::Header { header, .. } => header.header_len,
            Self::Payload { len, .. } => *len,
            Self::Control { header } | Self::Close { header, .. } => {
                header.header_len + header.len as usize
            }
            Self::Incomplete | Self::Violation(_) => 0,
        }
    }

    /// Whether this frame takes no input.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A data frame whose payload is still arriving.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    remaining: u64,
    mask: Option<[u8; 4]>,
    offset: usize,
    completes_message: bool,
}

/// Reads one direction's frames. See the module docs.
#[derive(Debug, Clone)]
pub struct FrameReader {
    from_client: bool,
    max_message_size: u64,
    message: MessageState,
    frame: Option<InFlight>,
}

impl FrameReader {
    /// A reader of the frames a client sends (`from_client`: they must be masked) or a server
    /// sends (they must not be), with messages of at most `max_message_size` bytes.
    pub fn new(from_client: bool, max_message_size: u64) -> Self {
        Self {
            from_client,
            max_message_size,
            message: MessageState::default(),
            frame: None,
        }
    }

    /// Whether the stream is inside a data frame's payload (a frame cannot be cut short there).
    pub fn in_frame(&self) -> bool {
        self.frame.is_some()
    }

    /// What the bytes at the start of `input` are. The caller consumes [`Frame::len`] of them
    /// and calls again with the rest; after `Incomplete` it keeps the rest and adds more.
    #[inline]
    pub fn next(&mut self, input: &[u8]) -> Frame {
        if input.is_empty() {
            return Frame::Incomplete;
        }
        if let Some(f) = &mut self.frame {
            let len = input
                .len()
                .min(usize::try_from(f.remaining).unwrap_or(usize::MAX));
            let (mask, offset) = (f.mask, f.offset);
            f.remaining -= len as u64;
            f.offset += len;
            let frame_end = f.remaining == 0;
            let message_end = frame_end && f.completes_message;
            if frame_end {
                self.frame = None;
            }
            return Frame::Payload {
                len,
                mask,
                offset,
                message_end,
            };
        }
        let header = match parse_header(input, self.from_client) {
            Ok(Some(h)) => h,
            Ok(None) => return Frame::Incomplete,
            Err(v) => return Frame::Violation(v),
        };
        // A control header is checked again when its frame is re-read whole; `check` leaves
        // the message state alone for control frames, so that is harmless.
        let completes_message = match self.message.check(&header, self.max_message_size) {
            Ok(c) => c,
            Err(v) => return Frame::Violation(v),
        };
        if header.opcode.is_control() {
            // Handled whole (at most 139 bytes): a close must be read before it is passed on.
            let total = header.header_len + header.len as usize;
            if input.len() < total {
                return Frame::Incomplete;
            }
            if header.opcode != Opcode::CLOSE {
                return Frame::Control { header };
            }
            let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
            let p = &mut payload[..header.len as usize];
            p.copy_from_slice(&input[header.header_len..total]);
            if let Some(key) = header.mask {
                apply_mask(p, key, 0);
            }
            return match parse_close(p) {
                Ok(close) => Frame::Close { header, close },
                Err(v) => Frame::Violation(v),
            };
        }
        if header.len > 0 {
            self.frame = Some(InFlight {
                remaining: header.len,
                mask: header.mask,
                offset: 0,
                completes_message,
            });
        }
        Frame::Header {
            header,
            message_end: completes_message && header.len == 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{close_frame, encode_frame};

    const KEY: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

    /// Everything `reader` makes of `wire` handed over in two pieces cut at `cut`, payload runs
    /// merged per frame (how they are split depends on the cut) and unmasked.
    fn read_in_two(wire: &[u8], cut: usize, from_client: bool, max: u64) -> Vec<String> {
        let mut reader = FrameReader::new(from_client, max);
        let mut seen = Vec::new();
        let mut pending = wire[..cut].to_vec();
        let mut rest = &wire[cut..];
        let mut payload = Vec::new();
        loop {
            let mut r = 0;
            loop {
                let f = reader.next(&pending[r..]);
                let n = f.len();
                match &f {
                    Frame::Payload {
                        len,
                        mask,
                        offset,
                        message_end,
                    } => {
                        let start = payload.len();
                        payload.extend_from_slice(&pending[r..r + len]);
                        if let Some(k) = mask {
                            apply_mask(&mut payload[start..], *k, *offset);
                        }
                        if !reader.in_frame() {
                            seen.push(format!("payload {payload:?} end={message_end}"));
                            payload.clear();
                        }
                    }
                    Frame::Header {
                        header,
                        message_end,
                    } => seen.push(format!(
                        "{:?} fin={} len={} end={message_end}",
                        header.opcode, header.fin, header.len
                    )),
                    Frame::Control { header } => seen.push(format!("{:?}", header.opcode)),
                    Frame::Close { close, .. } => seen.push(format!("close {close:?}")),
                    Frame::Incomplete => break,
                    Frame::Violation(v) => {
                        seen.push(format!("violation {v:?}"));
                        return seen;
                    }
                }
                r += n;
            }
            pending.drain(..r);
            if rest.is_empty() {
                return seen;
            }
            pending.extend_from_slice(rest);
            rest = &[];
        }
    }

    #[test]
    fn a_stream_cut_anywhere_reads_as_the_same_frames() {
        let mut wire = encode_frame(false, Opcode::TEXT, b"hel", Some(KEY));
        wire.extend(encode_frame(true, Opcode::PING, b"p", Some(KEY)));
        wire.extend(encode_frame(
            true,
            Opcode::CONTINUE,
            "lo é".as_bytes(),
            Some(KEY),
        ));
        wire.extend(encode_frame(true, Opcode::BINARY, &[], Some(KEY)));
        wire.extend(encode_frame(true, Opcode::BINARY, &[7; 300], Some(KEY)));
        wire.extend(close_frame(1000, "bye", Some(KEY)));
        let whole = read_in_two(&wire, wire.len(), true, 1000);
        assert_eq!(whole.len(), 9, "{whole:#?}");
        assert_eq!(whole[8], "close Some((1000, \"bye\"))");
        for cut in 0..wire.len() {
            assert_eq!(read_in_two(&wire, cut, true, 1000), whole, "cut at {cut}");
        }
    }

    #[test]
    fn each_direction_has_its_masking_rule() {
        let masked = encode_frame(true, Opcode::TEXT, b"x", Some(KEY));
        let plain = encode_frame(true, Opcode::TEXT, b"x", None);
        let read = |wire: &[u8], from_client| FrameReader::new(from_client, 10).next(wire);
        assert_eq!(read(&plain, true), Frame::Violation(Violation::Unmasked));
        assert_eq!(read(&masked, false), Frame::Violation(Violation::Masked));
        assert!(matches!(read(&masked, true), Frame::Header { .. }));
        assert!(matches!(read(&plain, false), Frame::Header { .. }));
    }

    #[test]
    fn a_message_over_the_limit_is_refused_at_the_header_that_declares_it() {
        let mut reader = FrameReader::new(false, 10);
        let first = encode_frame(false, Opcode::BINARY, &[0; 6], None);
        assert!(matches!(reader.next(&first), Frame::Header { .. }));
        assert!(matches!(
            reader.next(&first[2..]),
            Frame::Payload { len: 6, .. }
        ));
        // Only the header of the second fragment is given: its declared length is enough.
        let second = encode_frame(true, Opcode::CONTINUE, &[0; 5], None);
        assert_eq!(
            reader.next(&second[..2]),
            Frame::Violation(Violation::TooBig { size: 11, max: 10 })
        );
    }

    #[test]
    fn a_huge_declared_payload_is_handed_out_as_it_arrives_never_held() {
        let mut reader = FrameReader::new(false, u64::MAX);
        let mut wire = [0u8; 10];
        crate::frame::write_header(&mut wire, true, Opcode::BINARY, None, 1 << 40);
        assert!(matches!(reader.next(&wire), Frame::Header { .. }));
        let chunk = [0u8; 100];
        assert_eq!(
            reader.next(&chunk),
            Frame::Payload {
                len: 100,
                mask: None,
                offset: 0,
                message_end: false
            }
        );
        assert!(reader.in_frame());
    }

    #[test]
    fn control_frames_wait_until_they_are_whole() {
        let ping = encode_frame(true, Opcode::PING, b"abc", None);
        let mut reader = FrameReader::new(false, 10);
        for cut in 0..ping.len() {
            assert_eq!(reader.next(&ping[..cut]), Frame::Incomplete, "cut at {cut}");
        }
        let f = reader.next(&ping);
        assert_eq!(f.len(), ping.len());
        assert!(matches!(f, Frame::Control { .. }));
    }

    #[test]
    fn a_close_with_a_bad_payload_is_a_violation() {
        let mut one_byte = encode_frame(true, Opcode::CLOSE, &[3], Some(KEY));
        let mut reserved = encode_frame(true, Opcode::CLOSE, &1005u16.to_be_bytes(), Some(KEY));
        for wire in [&mut one_byte, &mut reserved] {
            assert_eq!(
                FrameReader::new(true, 10).next(wire),
                Frame::Violation(Violation::BadClose)
            );
        }
        let empty = encode_frame(true, Opcode::CLOSE, &[], Some(KEY));
        assert!(matches!(
            FrameReader::new(true, 10).next(&empty),
            Frame::Close { close: None, .. }
        ));
    }

    #[test]
    fn a_ping_may_come_between_fragments_but_a_new_message_may_not() {
        let mut reader = FrameReader::new(false, 100);
        let start = encode_frame(false, Opcode::TEXT, b"a", None);
        assert!(matches!(reader.next(&start), Frame::Header { .. }));
        assert!(matches!(reader.next(&start[2..]), Frame::Payload { .. }));
        let ping = encode_frame(true, Opcode::PING, b"", None);
        assert!(matches!(reader.next(&ping), Frame::Control { .. }));
        let other = encode_frame(true, Opcode::BINARY, b"b", None);
        assert_eq!(
            reader.next(&other),
            Frame::Violation(Violation::ExpectedContinuation)
        );
    }
}
