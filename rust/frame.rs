//! WebSocket frame headers (RFC 6455 §5.2): parse and check a header, rewrite its mask, build
//! close frames. Payloads are never read here: every limit is judged from the header alone, so
//! nothing is allocated for a length a peer merely declares.

use std::fmt;

/// Largest frame header: 2 bytes, an 8-byte extended length and a 4-byte masking key.
pub const MAX_HEADER_LEN: usize = 14;
/// RFC 6455 §5.5: "All control frames MUST have a payload length of 125 bytes or less".
pub use crate::limits::MAX_CONTROL_PAYLOAD;

/// A frame's opcode (RFC 6455 §5.2), as a typed tree rather than a raw nibble: data frames
/// carry a message, control frames manage the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    /// A frame of a text or binary message.
    Data(Data),
    /// A control frame: at most 125 bytes, never fragmented, may come between fragments.
    Control(Control),
}

/// The opcodes of data frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Data {
    /// 0x0: the next fragment of a text or binary message.
    Continue,
    /// 0x1: the first (or only) frame of a text message.
    Text,
    /// 0x2: the first (or only) frame of a binary message.
    Binary,
}

/// The opcodes of control frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// 0x8: close.
    Close,
    /// 0x9: ping.
    Ping,
    /// 0xA: pong.
    Pong,
}

impl Opcode {
    /// Close.
    pub const CLOSE: Self = Self::Control(Control::Close);
    /// Ping.
    pub const PING: Self = Self::Control(Control::Ping);
    /// Pong.
    pub const PONG: Self = Self::Control(Control::Pong);
    /// Continuation.
    pub const CONTINUE: Self = Self::Data(Data::Continue);
    /// Text.
    pub const TEXT: Self = Self::Data(Data::Text);
    /// Binary.
    pub const BINARY: Self = Self::Data(Data::Binary);

    fn from_nibble(n: u8) -> Option<Self> {
        Some(match n {
            0x0 => Self::CONTINUE,
            0x1 => Self::TEXT,
            0x2 => Self::BINARY,
            0x8 => Self::CLOSE,
            0x9 => Self::PING,
            0xA => Self::PONG,
            _ => return None,
        })
    }

    /// The 4-bit code on the wire.
    pub fn nibble(self) -> u8 {
        match self {
            Self::Data(Data::Continue) => 0x0,
            Self::Data(Data::Text) => 0x1,
            Self::Data(Data::Binary) => 0x2,
            Self::Control(Control::Close) => 0x8,
            Self::Control(Control::Ping) => 0x9,
            Self::Control(Control::Pong) => 0xA,
        }
    }

    /// Close, ping and pong.
    pub fn is_control(self) -> bool {
        matches!(self, Self::Control(_))
    }
}

/// A parsed frame header.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Last frame of its message.
    pub fin: bool,
    /// What the frame carries.
    pub opcode: Opcode,
    /// The masking key, for a masked frame.
    pub mask: Option<[u8; 4]>,
    /// Declared payload length.
    pub len: u64,
    /// Bytes the header takes on the wire (2 to 14).
    pub header_len: usize,
}

impl fmt::Debug for Header {
    // The masking key is left out: it is noise in a log and says nothing about the frame.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Header")
            .field("fin", &self.fin)
            .field("opcode", &self.opcode)
            .field("masked", &self.mask.is_some())
            .field("len", &self.len)
            .finish()
    }
}

/// A frame or message a peer must not send; each maps to one close code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// RSV1-3 set, but no extension was negotiated.
    #[error("reserved bits set")]
    ReservedBits,
    /// An opcode RFC 6455 does not define.
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    /// A client frame without a mask (§5.1: the server MUST close).
    #[error("unmasked client frame")]
    Unmasked,
    /// A server frame with a mask (§5.1: the client MUST close).
    #[error("masked server frame")]
    Masked,
    /// A 64-bit length with its most significant bit set (§5.2).
    #[error("invalid frame length")]
    BadLength,
    /// A control frame over 125 bytes.
    #[error("control frame too long")]
    ControlTooLong,
    /// A control frame without FIN.
    #[error("fragmented control frame")]
    ControlFragmented,
    /// A continuation frame with no message started.
    #[error("continuation without a message")]
    UnexpectedContinuation,
    /// A new text or binary frame while a fragmented message is open.
    #[error("new message inside a fragmented one")]
    ExpectedContinuation,
    /// A close payload of one byte, an invalid code or a reason that is not UTF-8.
    #[error("invalid close frame")]
    BadClose,
    /// A text message that is not UTF-8 (RFC 6455 §8.1: the endpoint MUST fail the connection).
    /// Judged only where messages are reassembled: a relay passes text through unread.
    #[error("invalid UTF-8 in a text message")]
    InvalidUtf8,
    /// A message over the size limit.
    #[error("message of {size} bytes over the {max}-byte limit")]
    TooBig {
        /// Bytes the message has declared so far.
        size: u64,
        /// The limit.
        max: u64,
    },
}

impl Violation {
    /// The close code the violator gets: 1009 for size, 1007 for text that is not UTF-8, 1002
    /// for every protocol error.
    pub fn close_code(&self) -> u16 {
        match self {
            Self::TooBig { .. } => 1009,
            Self::InvalidUtf8 => 1007,
            _ => 1002,
        }
    }
}

/// Parses the header at the start of `buf`. `Ok(None)`: not all of it has arrived yet.
///
/// `from_client` says which rule of §5.1 applies: client frames must be masked, server frames
/// must not be.
pub fn parse_header(buf: &[u8], from_client: bool) -> Result<Option<Header>, Violation> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(Violation::ReservedBits);
    }
    let opcode = Opcode::from_nibble(b0 & 0x0F).ok_or(Violation::UnknownOpcode(b0 & 0x0F))?;
    let fin = b0 & 0x80 != 0;
    let masked = b1 & 0x80 != 0;
    if masked != from_client {
        return Err(if from_client {
            Violation::Unmasked
        } else {
            Violation::Masked
        });
    }
    let (len, mut pos) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(Violation::BadLength);
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode.is_control() {
        if !fin {
            return Err(Violation::ControlFragmented);
        }
        if len > MAX_CONTROL_PAYLOAD as u64 {
            return Err(Violation::ControlTooLong);
        }
    }
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let key = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(key)
    } else {
        None
    };
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        len,
        header_len: pos,
    }))
}

/// Tracks fragmentation and the size of the message in progress on one direction.
#[derive(Debug, Default, Clone)]
pub struct MessageState {
    open: bool,
    size: u64,
}

impl MessageState {
    /// Checks a data or control header against the message in progress and the size limit.
    /// Returns whether the frame completes a data message.
    pub fn check(&mut self, h: &Header, max_message_size: u64) -> Result<bool, Violation> {
        match h.opcode {
            Opcode::Control(_) => return Ok(false),
            Opcode::Data(Data::Continue) => {
                if !self.open {
                    return Err(Violation::UnexpectedContinuation);
                }
                self.size = self.size.saturating_add(h.len);
            }
            Opcode::Data(Data::Text | Data::Binary) => {
                if self.open {
                    return Err(Violation::ExpectedContinuation);
                }
                self.size = h.len;
            }
        }
        if self.size > max_message_size {
            return Err(Violation::TooBig {
                size: self.size,
                max: max_message_size,
            });
        }
        self.open = !h.fin;
        Ok(h.fin)
    }
}

/// XORs `buf` with `key`, starting at byte `offset` of the key stream (RFC 6455 §5.3).
/// Unmasking with one key and masking with another is one call with `k1 ^ k2`.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], offset: usize) {
    // The key as it stands at `offset`: byte i of it masks byte i of `buf`.
    let k = u32::from_le_bytes(key)
        .rotate_right(8 * (offset % 4) as u32)
        .to_le_bytes();
    #[cfg(target_arch = "x86_64")]
    let buf = if buf.len() >= 64 && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above; the answer is cached).
        let done = unsafe { mask_avx2(buf, k) };
        // The rest is under 32 bytes and starts at phase 0 of `k` (32 is a multiple of 4).
        &mut buf[done..]
    } else {
        buf
    };
    if !buf.is_empty() {
        mask_words(buf, k);
    }
}

/// XORs the 32-byte blocks at the start of `buf` with `k` repeated; returns how many bytes that
/// was (the rest, under 32, is left as it was).
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn mask_avx2(buf: &mut [u8], k: [u8; 4]) -> usize {
    use std::arch::x86_64::{
        __m256i, _mm256_loadu_si256, _mm256_set1_epi32, _mm256_storeu_si256, _mm256_xor_si256,
    };
    let m = _mm256_set1_epi32(i32::from_ne_bytes(k));
    let done = buf.len() / 32 * 32;
    for c in buf.chunks_exact_mut(32) {
        let p = c.as_mut_ptr().cast::<__m256i>();
        // SAFETY: `c` is 32 bytes we may read and write; loadu/storeu take any alignment.
        unsafe { _mm256_storeu_si256(p, _mm256_xor_si256(_mm256_loadu_si256(p), m)) };
    }
    done
}

/// [`apply_mask`] without vector extensions beyond the baseline, at phase 0 of `k`.
fn mask_words(buf: &mut [u8], k: [u8; 4]) {
    // 32 bytes at a time, a fixed-size XOR the compiler makes vector instructions of; then 8
    // at a time; then bytes. Each step is a multiple of four long, so each starts at phase 0.
    let k32: [u8; 32] = std::array::from_fn(|i| k[i % 4]);
    let mut wide = buf.chunks_exact_mut(32);
    for c in &mut wide {
        for (b, m) in c.iter_mut().zip(&k32) {
            *b ^= m;
        }
    }
    let k8 = u64::from(u32::from_ne_bytes(k)) * 0x1_0000_0001; // `k` twice
    let mut chunks = wide.into_remainder().chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ k8).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= k[i % 4];
    }
}

/// The length of the header [`write_header`] writes for a `len`-byte payload: the shortest form
/// of the length, and the masking key if `masked`.
pub fn header_len(len: u64, masked: bool) -> usize {
    let ext = if len < 126 {
        0
    } else if len <= u64::from(u16::MAX) {
        2
    } else {
        8
    };
    2 + ext + if masked { 4 } else { 0 }
}

/// Writes a header into `out` and returns its length. `out` must hold [`MAX_HEADER_LEN`] bytes.
/// `fin`: the last frame of its message (always, for a control frame).
pub fn write_header(
    out: &mut [u8],
    fin: bool,
    opcode: Opcode,
    mask: Option<[u8; 4]>,
    len: u64,
) -> usize {
    out[0] = u8::from(fin) << 7 | opcode.nibble();
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut pos = if len < 126 {
        out[1] = mask_bit | len as u8;
        2
    } else if len <= u64::from(u16::MAX) {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&len.to_be_bytes());
        10
    };
    if let Some(key) = mask {
        out[pos..pos + 4].copy_from_slice(&key);
        pos += 4;
    }
    pos
}

/// Reads an (unmasked) close payload: `None` for an empty one (no status code), otherwise the
/// code and reason, checked as §5.5.1 and §7.4 require.
pub fn parse_close(payload: &[u8]) -> Result<Option<(u16, String)>, Violation> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(Violation::BadClose),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code_is_valid(code) {
                return Err(Violation::BadClose);
            }
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| Violation::BadClose)?;
            Ok(Some((code, reason.to_owned())))
        }
    }
}

/// Codes a peer may put on the wire (RFC 6455 §7.4, IANA registry): 1004-1006 and 1015 are
/// reserved, 1016-2999 unassigned, and nothing under 1000 or from 5000 on exists.
pub fn close_code_is_valid(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A whole close frame with `code` and `reason` (cut to fit 125 bytes on a char boundary),
/// masked with `mask` when given.
pub fn close_frame(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode_frame(true, Opcode::CLOSE, &payload, mask)
}

/// A whole frame: header and `payload`, masked with `mask` when given.
pub fn encode_frame(fin: bool, opcode: Opcode, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![0u8; MAX_HEADER_LEN];
    let n = write_header(&mut out, fin, opcode, mask, payload.len() as u64);
    out.truncate(n);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key, 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lengths_of_every_size_class_round_trip() {
        for len in [0u64, 125, 126, 65535, 65536, 1 << 40] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let mut out = [0u8; MAX_HEADER_LEN];
                let n = write_header(&mut out, true, Opcode::BINARY, mask, len);
                let h = parse_header(&out[..n], mask.is_some()).unwrap().unwrap();
                assert_eq!((h.len, h.header_len, h.mask, h.fin), (len, n, mask, true));
                assert_eq!(header_len(len, mask.is_some()), n);
                assert_eq!(h.opcode, Opcode::BINARY);
                for cut in 0..n {
                    assert_eq!(parse_header(&out[..cut], mask.is_some()), Ok(None));
                }
            }
        }
    }

    #[test]
    fn masking_rules_of_each_hop_are_enforced() {
        assert_eq!(parse_header(&[0x81, 0x00], true), Err(Violation::Unmasked));
        assert_eq!(
            parse_header(&[0x81, 0x80, 0, 0, 0, 0], false),
            Err(Violation::Masked)
        );
    }

    #[test]
    fn reserved_bits_and_unknown_opcodes_are_violations() {
        assert_eq!(
            parse_header(&[0xC1, 0x00], false),
            Err(Violation::ReservedBits)
        );
        assert_eq!(
            parse_header(&[0x83, 0x00], false),
            Err(Violation::UnknownOpcode(3))
        );
        assert_eq!(
            parse_header(&[0x8B, 0x00], false),
            Err(Violation::UnknownOpcode(0xB))
        );
    }

    #[test]
    fn control_frames_must_be_short_and_whole() {
        assert_eq!(
            parse_header(&[0x89, 126, 0, 126], false),
            Err(Violation::ControlTooLong)
        );
        assert_eq!(
            parse_header(&[0x09, 0], false),
            Err(Violation::ControlFragmented)
        );
    }

    #[test]
    fn a_length_with_the_top_bit_set_is_refused_before_anything_else() {
        let h = [0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(parse_header(&h, false), Err(Violation::BadLength));
    }

    #[test]
    fn fragmentation_rules_and_the_size_limit_are_tracked_per_message() {
        let hdr = |fin: bool, opcode: Opcode, len: u64| {
            let mut out = [0u8; MAX_HEADER_LEN];
            let n = write_header(&mut out, fin, opcode, None, len);
            parse_header(&out[..n], false).unwrap().unwrap()
        };
        let mut m = MessageState::default();
        assert_eq!(
            m.check(&hdr(false, Opcode::CONTINUE, 1), 10),
            Err(Violation::UnexpectedContinuation)
        );
        assert_eq!(m.check(&hdr(false, Opcode::TEXT, 4), 10), Ok(false));
        assert_eq!(
            m.check(&hdr(true, Opcode::PING, 4), 10),
            Ok(false),
            "ping between fragments"
        );
        assert_eq!(
            m.check(&hdr(false, Opcode::BINARY, 1), 10),
            Err(Violation::ExpectedContinuation)
        );
        let mut m = MessageState::default();
        m.check(&hdr(false, Opcode::TEXT, 4), 10).unwrap();
        assert_eq!(m.check(&hdr(true, Opcode::CONTINUE, 6), 10), Ok(true));
        let mut m = MessageState::default();
        m.check(&hdr(false, Opcode::BINARY, 6), 10).unwrap();
        assert_eq!(
            m.check(&hdr(true, Opcode::CONTINUE, 5), 10),
            Err(Violation::TooBig { size: 11, max: 10 })
        );
        assert_eq!(Violation::TooBig { size: 11, max: 10 }.close_code(), 1009);
    }

    #[test]
    fn remasking_in_one_pass_equals_unmask_then_mask() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let (k1, k2) = ([9, 8, 7, 6], [1, 2, 3, 4]);
        for offset in 0..4 {
            let mut a = data.clone();
            apply_mask(&mut a, k1, offset);
            let mut b = a.clone();
            apply_mask(&mut a, k1, offset);
            assert_eq!(a, data);
            let both = [k1[0] ^ k2[0], k1[1] ^ k2[1], k1[2] ^ k2[2], k1[3] ^ k2[3]];
            apply_mask(&mut b, both, offset);
            apply_mask(&mut b, k2, offset);
            assert_eq!(b, data);
        }
    }

    #[test]
    fn masking_xors_each_byte_with_the_key_byte_of_its_position() {
        let key = [0x0F, 0xF0, 0x55, 0xAA];
        for len in 0..80 {
            let data: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(31)).collect();
            for offset in 0..8 {
                let mut got = data.clone();
                apply_mask(&mut got, key, offset);
                let expected: Vec<u8> = (data.iter().enumerate())
                    .map(|(i, b)| b ^ key[(offset + i) % 4])
                    .collect();
                assert_eq!(got, expected, "len {len} offset {offset}");
            }
        }
    }

    #[test]
    fn masking_a_split_payload_matches_masking_it_whole() {
        let data: Vec<u8> = (0..77u8).collect();
        let key = [0xA1, 0xB2, 0xC3, 0xD4];
        let mut whole = data.clone();
        apply_mask(&mut whole, key, 0);
        for cut in 0..data.len() {
            let mut parts = data.clone();
            let (a, b) = parts.split_at_mut(cut);
            apply_mask(a, key, 0);
            apply_mask(b, key, cut);
            assert_eq!(parts, whole);
        }
    }

    #[test]
    fn close_payloads_are_checked() {
        assert_eq!(parse_close(&[]), Ok(None));
        assert_eq!(parse_close(&[3]), Err(Violation::BadClose));
        for bad in [999u16, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert_eq!(
                parse_close(&bad.to_be_bytes()),
                Err(Violation::BadClose),
                "{bad}"
            );
        }
        let mut p = 4000u16.to_be_bytes().to_vec();
        p.extend_from_slice(&[0xFF]);
        assert_eq!(parse_close(&p), Err(Violation::BadClose));
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.extend_from_slice("bye".as_bytes());
        assert_eq!(parse_close(&p), Ok(Some((1000, "bye".into()))));
    }

    #[test]
    fn close_frames_built_here_parse_back_and_fit_a_control_frame() {
        let long = "é".repeat(100);
        let key = [5, 6, 7, 8];
        let f = close_frame(1001, &long, Some(key));
        let h = parse_header(&f, true).unwrap().unwrap();
        assert!(h.len <= 125);
        let mut p = f[h.header_len..].to_vec();
        apply_mask(&mut p, key, 0);
        let (code, reason) = parse_close(&p).unwrap().unwrap();
        assert_eq!(code, 1001);
        assert!(long.starts_with(&reason));
        assert_eq!(encode_frame(true, Opcode::CLOSE, &p, Some(key)), f);
    }
}
