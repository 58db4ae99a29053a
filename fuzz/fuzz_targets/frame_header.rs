//! Frame headers, message state and close payloads (`frame.rs`), as a relay direction sees them.
//!
//! Input: one byte choosing `max_message_size`, then a stream of frames. The stream is walked
//! under both masking rules of RFC 6455 §5.1 as `pump.rs` walks it: parse a header, check it
//! against the message in progress, skip the payload (data) or read it whole (control, close),
//! stop at the first violation. Asserted for every input:
//! - no panic;
//! - `parse_header` answers `Ok(None)` only while the header is incomplete, and never for a
//!   prefix of a header it accepts; an accepted header is 2-14 bytes, read from those bytes
//!   alone, consistent with the RFC's layout and re-encodes to the same header;
//! - every refusal is a `Violation` whose rule really is broken by the bytes (an oracle written
//!   from RFC 6455 §5.2/§5.4/§5.5/§7.4, not from the code), with close code 1002 or 1009;
//! - `MessageState::check` agrees with a model of fragmentation and the size limit;
//! - `parse_header` and `MessageState::check` allocate nothing at all, whatever length a frame
//!   declares, and `parse_close` allocates at most its 123-byte reason.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate_core::frame::{
    apply_mask, close_code_is_valid, close_frame, parse_close, parse_header, write_header, Data,
    Header, MessageState, Opcode, Violation, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN,
};
use wsgate_core::limits::DEFAULT_MAX_MESSAGE_SIZE;
use wsgate_core_fuzz::measure;

/// Frames walked per input at most; a stream of empty frames is otherwise as long as the input.
const MAX_FRAMES: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((&choice, stream)) = data.split_first() else {
        return;
    };
    let max = match choice % 6 {
        0 => 0,
        1 => 125,
        2 => 65_536,
        3 => DEFAULT_MAX_MESSAGE_SIZE as u64,
        4 => u64::MAX,
        _ => u64::from(choice),
    };
    for from_client in [true, false] {
        walk(stream, from_client, max);
    }
});

/// The fragmentation model: is a message open, and its size so far (saturating).
#[derive(Default)]
struct Model {
    open: bool,
    size: u64,
}

fn walk(stream: &[u8], from_client: bool, max: u64) {
    let mut state = MessageState::default();
    let mut model = Model::default();
    let mut r = 0;
    for _ in 0..MAX_FRAMES {
        let buf = &stream[r..];
        let (parsed, alloc) = measure(|| parse_header(buf, from_client));
        assert_eq!(alloc.count, 0, "parse_header allocated: {alloc:?}");
        let h = match parsed {
            Ok(None) => {
                assert!(buf.len() < needed(buf), "Ok(None) for a whole header");
                return;
            }
            Err(v) => {
                assert!(
                    justified(&v, buf, from_client),
                    "{v:?} not justified by {buf:02x?}"
                );
                assert!(!matches!(
                    v,
                    Violation::UnexpectedContinuation
                        | Violation::ExpectedContinuation
                        | Violation::BadClose
                        | Violation::TooBig { .. }
                ));
                assert_eq!(v.close_code(), 1002);
                return;
            }
            Ok(Some(h)) => h,
        };
        check_accepted(&h, buf, from_client);

        let (checked, alloc) = measure(|| state.check(&h, max));
        assert_eq!(alloc.count, 0, "MessageState::check allocated: {alloc:?}");
        let expected = model_check(&mut model, &h, max);
        assert_eq!(checked, expected, "{h:?} with max {max}");
        if let Err(v) = checked {
            assert_eq!(
                v.close_code(),
                if matches!(v, Violation::TooBig { .. }) {
                    1009
                } else {
                    1002
                }
            );
            return;
        }

        let body = &buf[h.header_len..];
        if h.opcode.is_control() {
            // Read whole, as the pump does: h.len <= 125 was checked by parse_header.
            let len = h.len as usize;
            if body.len() < len {
                return;
            }
            let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
            let p = &mut payload[..len];
            p.copy_from_slice(&body[..len]);
            if let Some(key) = h.mask {
                apply_mask(p, key, 0);
            }
            if h.opcode == Opcode::CLOSE {
                check_close(p);
                return;
            }
            r += h.header_len + len;
        } else {
            // A data payload is skipped, never held: whatever its declared length.
            let skip = usize::try_from(h.len).unwrap_or(usize::MAX).min(body.len());
            r += h.header_len + skip;
            if (skip as u64) < h.len {
                return;
            }
        }
    }
}

/// Bytes a header needs given its first two bytes (2 when those are missing).
fn needed(buf: &[u8]) -> usize {
    let Some(&b1) = buf.get(1) else {
        return 2;
    };
    let ext = match b1 & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
}

/// Whether the bytes really break the rule `v` names (RFC 6455 §5.1, §5.2, §5.5).
fn justified(v: &Violation, buf: &[u8], from_client: bool) -> bool {
    let (b0, b1) = (buf[0], buf[1]);
    let opcode = b0 & 0x0F;
    let control = opcode >= 0x8;
    let declared = |n: usize| -> Option<u64> {
        match b1 & 0x7F {
            126 if n >= 4 => Some(u64::from(u16::from_be_bytes([buf[2], buf[3]]))),
            127 if n >= 10 => Some(u64::from_be_bytes(buf[2..10].try_into().unwrap())),
            126 | 127 => None,
            l => Some(u64::from(l)),
        }
    };
    match v {
        Violation::ReservedBits => b0 & 0x70 != 0,
        Violation::UnknownOpcode(n) => *n == opcode && matches!(opcode, 0x3..=0x7 | 0xB..=0xF),
        Violation::Unmasked => from_client && b1 & 0x80 == 0,
        Violation::Masked => !from_client && b1 & 0x80 != 0,
        Violation::BadLength => {
            b1 & 0x7F == 127 && declared(buf.len()).is_some_and(|l| l >> 63 == 1)
        }
        Violation::ControlFragmented => control && b0 & 0x80 == 0,
        Violation::ControlTooLong => control && declared(buf.len()).is_some_and(|l| l > 125),
        _ => false,
    }
}

/// An accepted header: its layout matches the bytes and it re-encodes to itself.
fn check_accepted(h: &Header, buf: &[u8], from_client: bool) {
    let b0 = buf[0];
    assert!((2..=MAX_HEADER_LEN).contains(&h.header_len), "{h:?}");
    assert_eq!(h.header_len, needed(buf));
    assert!(h.header_len <= buf.len());
    assert_eq!(h.fin, b0 & 0x80 != 0);
    assert_eq!(b0 & 0x70, 0, "reserved bits accepted");
    assert_eq!(
        h.mask.is_some(),
        from_client,
        "masking rule of §5.1 not applied"
    );
    assert_eq!(h.len >> 63, 0, "a length with the top bit set accepted");
    if h.opcode.is_control() {
        assert!(
            h.fin && h.len <= MAX_CONTROL_PAYLOAD as u64,
            "bad control frame accepted: {h:?}"
        );
    }
    if let Some(key) = h.mask {
        assert_eq!(key[..], buf[h.header_len - 4..h.header_len]);
    }
    // Read from the header's own bytes alone: the payload was not looked at.
    assert_eq!(
        parse_header(&buf[..h.header_len], from_client),
        Ok(Some(*h))
    );
    // Every shorter prefix is "not yet", never an error and never a different header.
    for cut in 0..h.header_len {
        assert_eq!(
            parse_header(&buf[..cut], from_client),
            Ok(None),
            "prefix of {cut} bytes"
        );
    }
    // The shortest encoding of the same frame parses back to the same header.
    let mut out = [0u8; MAX_HEADER_LEN];
    let n = write_header(&mut out, h.fin, h.opcode, h.mask, h.len);
    assert_eq!(out[0], b0, "the typed opcode writes the first byte back");
    assert!(n <= h.header_len);
    let again = parse_header(&out[..n], from_client).unwrap().unwrap();
    assert_eq!(
        (again.fin, again.opcode, again.mask, again.len),
        (h.fin, h.opcode, h.mask, h.len)
    );
    assert_eq!(again.header_len, n);
}

/// The fragmentation and size rules, written from RFC 6455 §5.4 and the size limit.
fn model_check(m: &mut Model, h: &Header, max: u64) -> Result<bool, Violation> {
    match h.opcode {
        Opcode::Control(_) => return Ok(false),
        Opcode::Data(Data::Continue) if !m.open => return Err(Violation::UnexpectedContinuation),
        Opcode::Data(Data::Continue) => m.size = m.size.saturating_add(h.len),
        Opcode::Data(_) if m.open => return Err(Violation::ExpectedContinuation),
        Opcode::Data(_) => m.size = h.len,
    }
    if m.size > max {
        return Err(Violation::TooBig { size: m.size, max });
    }
    m.open = !h.fin;
    Ok(h.fin)
}

/// A close payload: refused exactly when §5.5.1/§7.4 say so; an accepted one is rebuilt.
fn check_close(p: &[u8]) {
    let (parsed, alloc) = measure(|| parse_close(p));
    assert!(
        alloc.largest <= MAX_CONTROL_PAYLOAD - 2,
        "parse_close allocated {alloc:?}"
    );
    match parsed {
        Ok(None) => assert!(p.is_empty()),
        Ok(Some((code, reason))) => {
            assert!(p.len() >= 2 && close_code_is_valid(code));
            assert_eq!(code, u16::from_be_bytes([p[0], p[1]]));
            assert_eq!(reason.as_bytes(), &p[2..]);
            assert!(!matches!(code, 0..=999 | 1004..=1006 | 1015..=2999 | 5000..));
            // What the gateway would send back with the same code and reason parses to them.
            let key = [p[0], p[1], 0x5A, 0xA5];
            let frame = close_frame(code, &reason, Some(key));
            let h = parse_header(&frame, true).unwrap().unwrap();
            let mut back = frame[h.header_len..].to_vec();
            apply_mask(&mut back, key, 0);
            assert_eq!(parse_close(&back), Ok(Some((code, reason))));
        }
        Err(v) => {
            assert_eq!(v, Violation::BadClose);
            assert_eq!(v.close_code(), 1002);
            let code_ok = p.len() >= 2 && close_code_is_valid(u16::from_be_bytes([p[0], p[1]]));
            assert!(
                p.len() == 1 || !code_ok || std::str::from_utf8(&p[2..]).is_err(),
                "a valid close payload refused: {p:02x?}"
            );
        }
    }
}
