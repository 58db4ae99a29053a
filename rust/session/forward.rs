//! One direction of a relayed session, without its sockets: the bytes read from the source are
//! rewritten, in the buffer they were read into, into exactly the bytes the destination gets.
//!
//! - bot → client ([`Transform::Keep`]): server frames are unmasked on both hops, bytes pass as
//!   they came;
//! - client → bot ([`Transform::Remask`]): the gateway is the bot's client, and RFC 6455 §5.3
//!   wants a fresh masking key per frame, so each frame gets our own random key, unmasking and
//!   re-masking folded into one XOR pass (`client_key ^ our_key`);
//! - echo ([`Transform::Echo`]): client frames go back unmasked, a ping comes back as a pong.
//!
//! The rewritten header is never longer than the one read (it keeps or loses a 4-byte key), so
//! the output never overtakes the input and one buffer serves both. A header or control frame
//! cut by the end of a read waits in [`Forwarder::carry`] (at most 139 bytes) for the caller to
//! put it in front of the next read. After the source's close frame or a broken rule nothing more
//! is forwarded; after a close to the destination nothing more is written there.

use crate::frame::MAX_HEADER_LEN;
use crate::frame::{apply_mask, close_frame, header_len, write_header, Header, Opcode, Violation};

use super::reader::{Frame, FrameReader};

/// How frames leave a direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transform {
    /// Bot → client: unchanged.
    Keep,
    /// Client → bot: re-masked with a fresh key of ours.
    Remask,
    /// Client → itself (echo bot): unmasked; pings answered as pongs.
    Echo,
}

/// What [`Forwarder::forward`] found in a buffer besides frames to pass on.
#[derive(Debug, PartialEq, Eq)]
pub enum Forwarded {
    /// Frames only (or a part of one).
    Frames,
    /// The source's close frame, passed on last: its code and reason, `None` without a code.
    Close(Option<(u16, String)>),
    /// The source broke a rule; the frames before it were passed on, nothing after it.
    Violation(Violation),
}

/// A close of the gateway's own for the destination, from [`Forwarder::close`].
#[derive(Debug, PartialEq, Eq)]
pub enum OwnClose {
    /// A close went there already, or it is gone: nothing to send.
    Muted,
    /// Part of a frame went there: a close cannot follow it, end the connection instead.
    MidFrame,
    /// Send this frame.
    Frame(Vec<u8>),
}

/// One direction. See the module docs.
#[derive(Debug)]
pub struct Forwarder {
    reader: FrameReader,
    transform: Transform,
    /// Key to XOR the payload of the data frame in progress with (`None`: bytes pass unchanged).
    key: Option<[u8; 4]>,
    carry: Vec<u8>,
    discard: bool,
    muted: bool,
    messages: u64,
    bytes: u64,
}

impl Forwarder {
    /// A direction that passes frames as `transform` says, refusing messages over
    /// `max_message_size` bytes. Client frames (`Remask`, `Echo`) must be masked, server frames
    /// (`Keep`) must not be.
    pub fn new(transform: Transform, max_message_size: u64) -> Self {
        Self {
            reader: FrameReader::new(transform != Transform::Keep, max_message_size),
            transform,
            key: None,
            carry: Vec::new(),
            discard: false,
            muted: false,
            messages: 0,
            bytes: 0,
        }
    }

    /// The start of a header or control frame that the last buffer ended in: it goes in front
    /// of the next one.
    pub fn carry(&self) -> &[u8] {
        &self.carry
    }

    /// The carry was put in front of a new buffer.
    pub fn clear_carry(&mut self) {
        self.carry.clear();
    }

    /// The source's stream is over (it sent a close or broke a rule): what it still sends is
    /// read and dropped.
    pub fn discarding(&self) -> bool {
        self.discard
    }

    /// Nothing more goes to the destination: a close went there, or it is gone.
    pub fn muted(&self) -> bool {
        self.muted
    }

    /// The destination is gone.
    pub fn mute(&mut self) {
        self.muted = true;
    }

    /// Data messages completed so far.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Payload bytes of data frames passed on so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// A close frame of the gateway's own for the destination (masked towards a bot). Either
    /// way the destination gets nothing after it.
    pub fn close(&mut self, code: u16, reason: &str) -> OwnClose {
        if self.muted {
            return OwnClose::Muted;
        }
        self.muted = true;
        if self.reader.in_frame() {
            return OwnClose::MidFrame;
        }
        let mask = (self.transform == Transform::Remask).then(rand::random::<[u8; 4]>);
        OwnClose::Frame(close_frame(code, reason, mask))
    }

    /// Rewrites `buf`, the source's next bytes (after the carry), in place into exactly the
    /// bytes to write to the destination. A frame cut at the end of `buf` goes on with the next
    /// buffer.
    pub fn forward(&mut self, buf: &mut Vec<u8>) -> Forwarded {
        if self.discard {
            buf.clear();
            return Forwarded::Frames;
        }
        let n = buf.len();
        let muted = self.muted;
        let (mut r, mut w) = (0usize, 0usize);
        let mut found = Forwarded::Frames;
        // Our masking keys come from the thread's generator, looked up once per read.
        let mut keys = Keys(None);
        while r < n {
            // The usual case first: a whole small data frame, header and payload in one go.
            // Its header is in the shortest form, so it stays as it is but for our key.
            if self.transform != Transform::Echo {
                if let Some(f) = self.reader.whole_data_frame(&buf[r..]) {
                    let (body, end) = (r + f.header_len, r + f.header_len + f.len);
                    // A client's frame (the masking rule is checked): re-masked with our key.
                    if let Some(k) = f.mask {
                        let ours = keys.next();
                        buf[body - 4..body].copy_from_slice(&ours);
                        let both = std::array::from_fn(|i| k[i] ^ ours[i]);
                        apply_mask(&mut buf[body..end], both, 0);
                    }
                    if w != r {
                        buf.copy_within(r..end, w);
                    }
                    w += end - r;
                    r = end;
                    self.bytes += f.len as u64;
                    self.messages += u64::from(f.message_end);
                    continue;
                }
            }
            let frame = self.reader.next(&buf[r..]);
            let len = frame.len();
            match frame {
                Frame::Payload {
                    offset,
                    message_end,
                    ..
                } => {
                    if let Some(key) = self.key {
                        apply_mask(&mut buf[r..r + len], key, offset);
                    }
                    if w != r {
                        buf.copy_within(r..r + len, w);
                    }
                    w += len;
                    self.bytes += len as u64;
                    self.messages += u64::from(message_end);
                }
                Frame::Header {
                    header,
                    message_end,
                } => {
                    let (key, hn) = self.rewrite_header(buf, r, w, &header, &mut keys);
                    self.key = key;
                    w += hn;
                    self.messages += u64::from(message_end);
                }
                Frame::Control { header } => {
                    w = self.pass_control(buf, r, w, &header, &mut keys);
                }
                Frame::Close { header, close } => {
                    w = self.pass_control(buf, r, w, &header, &mut keys);
                    self.muted = true;
                    self.discard = true;
                    found = Forwarded::Close(close);
                    break;
                }
                Frame::Incomplete => {
                    // Exactly what is needed (at most 139 bytes), not a doubled capacity.
                    self.carry.reserve_exact(n - r);
                    self.carry.extend_from_slice(&buf[r..]);
                    break;
                }
                Frame::Violation(v) => {
                    self.discard = true;
                    found = Forwarded::Violation(v);
                    break;
                }
            }
            r += len;
        }
        buf.truncate(w);
        if muted {
            // A close went to the destination earlier: nothing may follow it.
            buf.clear();
        }
        found
    }

    /// Passes the whole control frame read at `r` on at `w`; returns where output goes on.
    fn pass_control(
        &self,
        buf: &mut [u8],
        r: usize,
        w: usize,
        h: &Header,
        keys: &mut Keys,
    ) -> usize {
        let (key, hn) = self.rewrite_header(buf, r, w, h, keys);
        let (from, end, to) = (r + h.header_len, r + h.header_len + h.len as usize, w + hn);
        if let Some(k) = key {
            apply_mask(&mut buf[from..end], k, 0);
        }
        buf.copy_within(from..end, to);
        to + h.len as usize
    }

    /// Writes the outgoing header for `h`, read at `r`, at `w`. Returns the key to XOR the
    /// payload with and the new header's length (never longer than the old one, so it cannot
    /// reach the payload).
    fn rewrite_header(
        &self,
        buf: &mut [u8],
        r: usize,
        w: usize,
        h: &Header,
        keys: &mut Keys,
    ) -> (Option<[u8; 4]>, usize) {
        let (opcode, out_mask, key) = match (self.transform, h.mask) {
            (Transform::Keep, _) => (h.opcode, None, None),
            (Transform::Remask, Some(k)) => {
                let ours = keys.next();
                let both = [
                    k[0] ^ ours[0],
                    k[1] ^ ours[1],
                    k[2] ^ ours[2],
                    k[3] ^ ours[3],
                ];
                (h.opcode, Some(ours), Some(both))
            }
            (Transform::Echo, k) if h.opcode == Opcode::PING => (Opcode::PONG, None, k),
            (Transform::Echo, k) => (h.opcode, None, k),
            (Transform::Remask, None) => unreachable!("client frames are checked to be masked"),
        };
        // The usual case: the header stays where it is, as long as it was (a relay keeps or
        // drops no mask, and the sender used the shortest length form), so its bytes are
        // already the ones to send but for our key.
        let same_len = h.header_len == header_len(h.len, out_mask.is_some());
        if r == w && opcode == h.opcode && out_mask.is_some() == h.mask.is_some() && same_len {
            if let Some(ours) = out_mask {
                buf[r + h.header_len - 4..r + h.header_len].copy_from_slice(&ours);
            }
            return (key, h.header_len);
        }
        let mut hb = [0u8; MAX_HEADER_LEN];
        let hn = write_header(&mut hb, h.fin, opcode, out_mask, h.len);
        debug_assert!(hn <= h.header_len);
        buf[w..w + hn].copy_from_slice(&hb[..hn]);
        (key, hn)
    }
}

/// Fresh masking keys for one buffer: 32 bits of the thread's generator (ChaCha, seeded from the
/// OS) each, the generator looked up at the first one only.
struct Keys(Option<rand::rngs::ThreadRng>);

impl Keys {
    fn next(&mut self) -> [u8; 4] {
        use rand::RngCore;
        self.0
            .get_or_insert_with(rand::rng)
            .next_u32()
            .to_ne_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_frame, parse_header};

    const KEY: [u8; 4] = [0xA5, 0x5A, 0x0F, 0xF0];

    /// Client traffic: fragments, a ping between them, empty and long frames.
    fn client_wire() -> Vec<u8> {
        let mut wire = encode_frame(false, Opcode::TEXT, b"hel", Some(KEY));
        wire.extend(encode_frame(true, Opcode::PING, b"?", Some(KEY)));
        wire.extend(encode_frame(
            true,
            Opcode::CONTINUE,
            "lo é".as_bytes(),
            Some(KEY),
        ));
        wire.extend(encode_frame(true, Opcode::BINARY, &[], Some(KEY)));
        let long: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        wire.extend(encode_frame(true, Opcode::BINARY, &long, Some(KEY)));
        wire
    }

    /// Forwards `wire` in pieces cut at `cuts`, as a pump does: each read after the carry.
    fn forward_in_pieces(fwd: &mut Forwarder, wire: &[u8], cuts: &[usize]) -> (Vec<u8>, Forwarded) {
        let mut out = Vec::new();
        let mut last = Forwarded::Frames;
        let mut start = 0;
        for &end in cuts.iter().chain([wire.len()].iter()) {
            let mut buf = fwd.carry().to_vec();
            fwd.clear_carry();
            buf.extend_from_slice(&wire[start..end]);
            start = end;
            last = fwd.forward(&mut buf);
            out.extend_from_slice(&buf);
            if last != Forwarded::Frames {
                break;
            }
        }
        (out, last)
    }

    /// A frame as (fin, opcode, unmasked payload).
    type Plain = (bool, Opcode, Vec<u8>);

    /// Each frame of `wire` (`masked`: a client's), and the masking keys seen.
    fn frames_of(wire: &[u8], masked: bool) -> (Vec<Plain>, Vec<[u8; 4]>) {
        let (mut frames, mut keys, mut r) = (Vec::new(), Vec::new(), 0);
        while r < wire.len() {
            let h = parse_header(&wire[r..], masked).unwrap().unwrap();
            let body = r + h.header_len;
            let mut p = wire[body..body + h.len as usize].to_vec();
            if let Some(k) = h.mask {
                apply_mask(&mut p, k, 0);
                keys.push(k);
            }
            frames.push((h.fin, h.opcode, p));
            r = body + h.len as usize;
        }
        (frames, keys)
    }

    #[test]
    fn bot_frames_pass_unchanged_however_the_reads_cut_them() {
        let (frames, _) = frames_of(&client_wire(), true);
        let mut wire = Vec::new();
        for (fin, op, p) in &frames {
            wire.extend(encode_frame(*fin, *op, p, None));
        }
        for cut in (0..wire.len()).step_by(7).chain(0..40) {
            let mut fwd = Forwarder::new(Transform::Keep, 1 << 20);
            let (out, last) = forward_in_pieces(&mut fwd, &wire, &[cut]);
            assert_eq!(
                (out == wire, last),
                (true, Forwarded::Frames),
                "cut at {cut}"
            );
            assert_eq!((fwd.messages(), fwd.bytes()), (3, 3 + 5 + 70_000));
        }
    }

    #[test]
    fn client_frames_reach_the_bot_with_the_same_payloads_under_fresh_keys() {
        let wire = client_wire();
        let (sent, client_keys) = frames_of(&wire, true);
        for cut in (0..wire.len()).step_by(11).chain(0..40) {
            let mut fwd = Forwarder::new(Transform::Remask, 1 << 20);
            let (out, _) = forward_in_pieces(&mut fwd, &wire, &[cut, cut + 3]);
            assert_eq!(out.len(), wire.len(), "cut at {cut}");
            let (got, our_keys) = frames_of(&out, true);
            assert_eq!(got, sent, "cut at {cut}");
            assert!(our_keys.iter().all(|k| !client_keys.contains(k)));
        }
    }

    #[test]
    fn the_echo_bot_sends_frames_back_unmasked_and_answers_a_ping_with_a_pong() {
        let wire = client_wire();
        let (mut expected, _) = frames_of(&wire, true);
        expected[1].1 = Opcode::PONG;
        let mut fwd = Forwarder::new(Transform::Echo, 1 << 20);
        let (out, _) = forward_in_pieces(&mut fwd, &wire, &[5]);
        assert_eq!(frames_of(&out, false).0, expected);
    }

    #[test]
    fn the_source_close_is_passed_on_last_and_nothing_follows_it() {
        let mut wire = encode_frame(true, Opcode::TEXT, b"a", None);
        wire.extend(close_frame(1000, "bye", None));
        let after = encode_frame(true, Opcode::TEXT, b"late", None);
        wire.extend(&after);
        let mut fwd = Forwarder::new(Transform::Keep, 100);
        let mut buf = wire.clone();
        let found = fwd.forward(&mut buf);
        assert_eq!(found, Forwarded::Close(Some((1000, "bye".into()))));
        assert_eq!(buf, wire[..wire.len() - after.len()]);
        assert!(fwd.discarding() && fwd.muted());
        let mut more = after.clone();
        assert_eq!(fwd.forward(&mut more), Forwarded::Frames);
        assert!(more.is_empty());
    }

    #[test]
    fn frames_before_a_broken_rule_are_passed_on_and_none_after_it() {
        let good = encode_frame(true, Opcode::BINARY, b"ok", None);
        let mut wire = good.clone();
        wire.extend(encode_frame(true, Opcode::BINARY, &[0; 11], None));
        let mut fwd = Forwarder::new(Transform::Keep, 10);
        let mut buf = wire;
        let found = fwd.forward(&mut buf);
        assert_eq!(
            found,
            Forwarded::Violation(Violation::TooBig { size: 11, max: 10 })
        );
        assert_eq!(buf, good);
        assert!(fwd.discarding());
    }

    #[test]
    fn after_a_close_to_the_destination_nothing_more_is_written_there() {
        let mut fwd = Forwarder::new(Transform::Remask, 100);
        let OwnClose::Frame(frame) = fwd.close(1001, "going") else {
            panic!("no close frame");
        };
        let h = parse_header(&frame, true).unwrap().unwrap();
        assert_eq!(h.opcode, Opcode::CLOSE, "towards a bot, masked");
        assert_eq!(fwd.close(1000, "again"), OwnClose::Muted);
        let mut buf = encode_frame(true, Opcode::TEXT, b"x", Some(KEY));
        fwd.forward(&mut buf);
        assert!(buf.is_empty());
    }

    #[test]
    fn a_length_in_a_longer_form_than_needed_goes_on_in_the_shortest() {
        // 5 bytes announced in the 16-bit form, then a frame in the shortest form behind it.
        let mut bot = vec![0x82, 126, 0, 5];
        bot.extend_from_slice(b"hello");
        bot.extend(encode_frame(true, Opcode::TEXT, b"next", None));
        let mut fwd = Forwarder::new(Transform::Keep, 100);
        let mut buf = bot;
        assert_eq!(fwd.forward(&mut buf), Forwarded::Frames);
        let mut expected = encode_frame(true, Opcode::BINARY, b"hello", None);
        expected.extend(encode_frame(true, Opcode::TEXT, b"next", None));
        assert_eq!(buf, expected);

        let mut client = vec![0x82, 0x80 | 126, 0, 5];
        client.extend_from_slice(&KEY);
        let mut payload = *b"hello";
        apply_mask(&mut payload, KEY, 0);
        client.extend_from_slice(&payload);
        client.extend(encode_frame(true, Opcode::TEXT, b"next", Some(KEY)));
        let mut fwd = Forwarder::new(Transform::Remask, 100);
        let mut buf = client;
        assert_eq!(fwd.forward(&mut buf), Forwarded::Frames);
        let (frames, keys) = frames_of(&buf, true);
        assert_eq!(
            buf.len(),
            6 + 5 + 6 + 4,
            "both headers in the shortest form"
        );
        assert_eq!(
            frames,
            [
                (true, Opcode::BINARY, b"hello".to_vec()),
                (true, Opcode::TEXT, b"next".to_vec())
            ]
        );
        assert!(!keys.contains(&KEY));
    }

    #[test]
    fn a_close_cannot_cut_a_frame_short() {
        let wire = encode_frame(true, Opcode::BINARY, &[1; 100], None);
        let mut fwd = Forwarder::new(Transform::Keep, 1000);
        let mut buf = wire[..50].to_vec();
        fwd.forward(&mut buf);
        assert_eq!(fwd.close(1000, ""), OwnClose::MidFrame);
    }
}
