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

/// A whole data frame at the start of the input, from [`FrameReader::whole_data_frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Whole {
    /// Bytes of its header, which is in the shortest form for its length.
    pub header_len: usize,
    /// Bytes of its payload, all in the input after the header.
    pub len: usize,
    /// Its masking key (a client's frame).
    pub mask: Option<[u8; 4]>,
    /// It completes a message.
    pub message_end: bool,
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

    /// The fast path of a relay, where a read usually holds several whole small frames: when
    /// `input` starts with a whole text, binary or continuation frame (header and all of its
    /// payload) whose header passes every rule [`next`](Self::next) checks and gives its length
    /// in the shortest form of at most 16 bits, that frame; its `header_len + len` bytes are
    /// consumed. Otherwise (inside a frame, a control frame, a frame not all there, a longer
    /// length form, a broken rule) `None`, with nothing consumed and the reader unchanged:
    /// [`next`](Self::next) then takes the bytes as usual.
    #[inline]
    pub fn whole_data_frame(&mut self, input: &[u8]) -> Option<Whole> {
        if self.frame.is_some() || input.len() < 2 {
            return None;
        }
        let (b0, b1) = (input[0], input[1]);
        // No reserved bit, a data opcode (0, 1 or 2), the masking rule of the direction.
        if b0 & 0x7F > 2 || (b1 & 0x80 != 0) != self.from_client {
            return None;
        }
        let (len, mut header_len) = match b1 & 0x7F {
            126 if input.len() >= 4 => (usize::from(u16::from_be_bytes([input[2], input[3]])), 4),
            n if n < 126 => (usize::from(n), 2),
            _ => return None,
        };
        if header_len == 4 && len < 126 {
            return None; // not the shortest form: `next` takes it (the forwarder rewrites it)
        }
        let mask = if self.from_client {
            let k = input.get(header_len..header_len + 4)?;
            header_len += 4;
            Some([k[0], k[1], k[2], k[3]])
        } else {
            None
        };
        if input.len() - header_len < len {
            return None;
        }
        let fin = b0 & 0x80 != 0;
        let opcode = match b0 & 0x0F {
            0 => Opcode::CONTINUE,
            1 => Opcode::TEXT,
            _ => Opcode::BINARY,
        };
        let header = Header {
            fin,
            opcode,
            mask,
            len: len as u64,
            header_len,
        };
        // Checked on a copy: a header that breaks a rule leaves the state as it was, for
        // `next` to report the violation from it (with the same figures).
        let mut message = self.message.clone();
        let message_end = message.check(&header, self.max_message_size).ok()?;
        self.message = message;
        Some(Whole {
            header_len,
            len,
            mask,
            message_end,
        })
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

    /// What `input` reads as, frame by frame (data frames whole: payload unmasked, and whether
    /// it completes a message), with the fast path of whole data frames (`fast`) or without;
    /// and the bytes consumed.
    fn read_all(input: &[u8], fast: bool) -> (Vec<String>, usize) {
        let mut reader = FrameReader::new(true, 1 << 20);
        let (mut seen, mut r, mut payload) = (Vec::new(), 0, Vec::new());
        loop {
            if fast {
                if let Some(w) = reader.whole_data_frame(&input[r..]) {
                    let body = r + w.header_len;
                    let mut p = input[body..body + w.len].to_vec();
                    apply_mask(&mut p, w.mask.unwrap(), 0);
                    seen.push(format!("data {p:?} end={}", w.message_end));
                    r = body + w.len;
                    continue;
                }
            }
            let f = reader.next(&input[r..]);
            match &f {
                Frame::Header {
                    header,
                    message_end,
                } if header.len == 0 => {
                    seen.push(format!("data [] end={message_end}"));
                }
                Frame::Header { .. } => {} // its payload makes the entry
                Frame::Payload {
                    len,
                    mask,
                    offset,
                    message_end,
                } => {
                    let start = payload.len();
                    payload.extend_from_slice(&input[r..r + len]);
                    apply_mask(&mut payload[start..], mask.unwrap(), *offset);
                    if !reader.in_frame() {
                        seen.push(format!("data {payload:?} end={message_end}"));
                        payload.clear();
                    }
                }
                Frame::Incomplete => return (seen, r),
                Frame::Violation(v) => {
                    seen.push(format!("violation {v:?}"));
                    return (seen, r);
                }
                other => seen.push(format!("{other:?}")),
            }
            r += f.len();
        }
    }

    #[test]
    fn whole_data_frames_read_the_fast_way_as_they_read_frame_by_frame() {
        let mut wire = encode_frame(false, Opcode::TEXT, b"hel", Some(KEY));
        wire.extend(encode_frame(true, Opcode::PING, b"p", Some(KEY)));
        wire.extend(encode_frame(true, Opcode::CONTINUE, b"lo", Some(KEY)));
        wire.extend(encode_frame(true, Opcode::BINARY, &[7; 300], Some(KEY)));
        wire.extend(encode_frame(true, Opcode::BINARY, &[], Some(KEY)));
        // 5 bytes announced in the 16-bit form: whole, but left to `next`.
        wire.extend([0x82, 0x80 | 126, 0, 5]);
        wire.extend(KEY);
        wire.extend([1, 2, 3, 4, 5]);
        wire.extend(encode_frame(true, Opcode::BINARY, &[1; 70_000], Some(KEY)));
        // A new message inside a fragmented one: the fast way leaves it to `next`.
        wire.extend(encode_frame(false, Opcode::TEXT, b"a", Some(KEY)));
        wire.extend(encode_frame(true, Opcode::BINARY, b"b", Some(KEY)));
        let (all, _) = read_all(&wire, false);
        assert_eq!(all.len(), 9, "{all:#?}");
        assert!(all[8].starts_with("violation ExpectedContinuation"));
        for cut in (0..wire.len()).step_by(7).chain([wire.len()]) {
            assert_eq!(
                read_all(&wire[..cut], true),
                read_all(&wire[..cut], false),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn the_fast_way_leaves_a_broken_rule_and_the_state_it_found_to_next() {
        let mut reader = FrameReader::new(false, 10);
        let first = encode_frame(false, Opcode::BINARY, &[0; 6], None);
        assert!(reader.whole_data_frame(&first).is_some());
        let second = encode_frame(true, Opcode::CONTINUE, &[0; 5], None);
        assert_eq!(reader.whole_data_frame(&second), None);
        assert_eq!(
            reader.next(&second),
            Frame::Violation(Violation::TooBig { size: 11, max: 10 })
        );
        let read =
            |wire: &[u8], from_client| FrameReader::new(from_client, 10).whole_data_frame(wire);
        assert_eq!(
            read(&encode_frame(true, Opcode::CONTINUE, b"x", None), false),
            None
        );
        assert_eq!(
            read(&encode_frame(true, Opcode::TEXT, b"x", Some(KEY)), false),
            None
        );
        assert_eq!(
            read(&encode_frame(true, Opcode::TEXT, b"x", None), true),
            None
        );
        assert_eq!(read(&[0xC2, 0x00], false), None, "reserved bits");
        assert_eq!(read(&[0x83, 0x00], false), None, "unknown opcode");
        assert!(read(&[0x82, 0x00], false).is_some());
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
