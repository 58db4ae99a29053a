//! The session core's frame stream (`rust/session/`): a `Forwarder` rewriting one direction in
//! place, and the `Assembler` reassembling the same bytes into messages, both on `FrameReader`.
//!
//! Input: a byte choosing `max_message_size`, a byte choosing the direction (bot → client
//! `Keep`, client → bot `Remask`, client → echo `Echo`), two bytes placing two cuts, then the
//! stream. Asserted for every input:
//! - no panic;
//! - forwarding the stream whole or in three reads cut anywhere (the carry put in front of each
//!   read, as the pump does) gives the same frames, the same close or violation and the same
//!   counts;
//! - the output is never longer than the input, holds only whole headers, and is valid traffic
//!   for the destination (the masking rule of its hop, no broken rule) carrying the input's
//!   frames: same FIN, same opcode (a ping comes back from the echo as a pong), same payload
//!   bytes once unmasked (towards a bot, under keys of the gateway's: random, so not compared);
//! - on a client stream the Assembler agrees with what was forwarded: the same messages in
//!   order, the same pings, the same close or violation (it may stop earlier, at a text message
//!   that is not UTF-8, which a relay passes through unread);
//! - forwarding commits no memory for a length a peer declares: no allocation over the largest
//!   carry (a header plus a control frame, 139 bytes), whatever the stream says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate_core::frame::{
    apply_mask, parse_header, Data, Opcode, Violation, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN,
};
use wsgate_core::limits::DEFAULT_MAX_MESSAGE_SIZE;
use wsgate_core::session::{
    Assembler, Forwarded, Forwarder, Frame, FrameReader, Inbound, Transform,
};
use wsgate_core_fuzz::measure;

static WARM_UP: std::sync::Once = std::sync::Once::new();

/// A frame as it travels: FIN, opcode, payload (unmasked; the last frame's may be cut short),
/// masking key, whether the payload is all there.
type Plain = (bool, Opcode, Vec<u8>, Option<[u8; 4]>, bool);

fuzz_target!(|data: &[u8]| {
    let [limit, direction, cut_a, cut_b, stream @ ..] = data else {
        return;
    };
    WARM_UP.call_once(|| {
        // The first masking key a thread draws sets up its random generator (a one-time
        // allocation per thread, not per frame): out of the measured calls.
        let mut frame = wsgate_core::frame::encode_frame(true, Opcode::TEXT, b"", Some([1; 4]));
        Forwarder::new(Transform::Remask, 1).forward(&mut frame);
    });
    let max = match limit % 6 {
        0 => 0,
        1 => 125,
        2 => 65_536,
        3 => DEFAULT_MAX_MESSAGE_SIZE as u64,
        4 => u64::MAX,
        _ => u64::from(*limit),
    };
    let transform = [Transform::Keep, Transform::Remask, Transform::Echo][*direction as usize % 3];
    let from_client = transform != Transform::Keep;
    let to_bot = transform == Transform::Remask;
    let at = |b: u8| stream.len() * usize::from(b) / 256;
    let (a, b) = (at(*cut_a).min(at(*cut_b)), at(*cut_a).max(at(*cut_b)));

    let whole = forward(transform, max, stream, &[]);
    let pieces = forward(transform, max, stream, &[a, b]);
    assert!(whole.out.len() <= stream.len(), "output overtook the input");
    assert_valid_for_its_hop(&whole.out, to_bot);
    let sent = frames_of(&whole.out, to_bot);
    assert_eq!(
        plain(&sent),
        plain(&frames_of(&pieces.out, to_bot)),
        "cuts at {a}, {b}"
    );
    assert_eq!((&whole.end, whole.counts), (&pieces.end, pieces.counts));

    // The frames forwarded are the input's first ones, rewritten only as the hop requires.
    let received = frames_of(stream, from_client);
    assert!(received.len() >= sent.len());
    let received = &received[..sent.len()];
    for (got, out) in received.iter().zip(&sent) {
        let opcode = match (transform, got.1) {
            (Transform::Echo, Opcode::PING) => Opcode::PONG,
            (_, op) => op,
        };
        assert_eq!((got.0, opcode, &got.2), (out.0, out.1, &out.2));
    }
    let data_bytes: usize = sent
        .iter()
        .filter(|f| !f.1.is_control())
        .map(|f| f.2.len())
        .sum();
    assert_eq!(whole.counts.1, data_bytes as u64);

    if from_client {
        agree_with_assembler(stream, max, received, &whole.end);
    }
});

/// What forwarding a stream gave.
struct Run {
    out: Vec<u8>,
    end: Forwarded,
    counts: (u64, u64),
}

/// Forwards `stream` in reads cut at `cuts`, as a pump does.
fn forward(transform: Transform, max: u64, stream: &[u8], cuts: &[usize]) -> Run {
    let mut fwd = Forwarder::new(transform, max);
    let mut out = Vec::new();
    let mut end = Forwarded::Frames;
    let mut start = 0;
    for &stop in cuts.iter().chain([stream.len()].iter()) {
        let mut buf = fwd.carry().to_vec();
        fwd.clear_carry();
        buf.extend_from_slice(&stream[start..stop]);
        start = stop;
        let (found, alloc) = measure(|| fwd.forward(&mut buf));
        assert!(
            alloc.largest <= MAX_HEADER_LEN + MAX_CONTROL_PAYLOAD,
            "forward allocated {alloc:?}"
        );
        out.extend_from_slice(&buf);
        if found != Forwarded::Frames {
            end = found;
            break;
        }
    }
    Run {
        out,
        end,
        counts: (fwd.messages(), fwd.bytes()),
    }
}

/// Forwarded output breaks no rule of its hop and ends, if inside a frame, inside a payload.
fn assert_valid_for_its_hop(out: &[u8], masked: bool) {
    let mut reader = FrameReader::new(masked, u64::MAX);
    let mut r = 0;
    loop {
        let f = reader.next(&out[r..]);
        match f {
            Frame::Incomplete => break,
            Frame::Violation(v) => panic!("forwarded output breaks a rule: {v:?}"),
            _ => r += f.len(),
        }
    }
    assert_eq!(
        r,
        out.len(),
        "output ends inside a header or a control frame"
    );
}

/// The frames of `wire` under the masking rule `masked`, up to the first header that is
/// incomplete or broken (the last frame's payload may be cut short).
fn frames_of(wire: &[u8], masked: bool) -> Vec<Plain> {
    let mut frames = Vec::new();
    let mut r = 0;
    while let Ok(Some(h)) = parse_header(&wire[r..], masked) {
        let body = r + h.header_len;
        let end = (body as u64).saturating_add(h.len).min(wire.len() as u64) as usize;
        let mut p = wire[body..end].to_vec();
        if let Some(k) = h.mask {
            apply_mask(&mut p, k, 0);
        }
        let whole = p.len() as u64 == h.len;
        frames.push((h.fin, h.opcode, p, h.mask, whole));
        r = end;
    }
    frames
}

fn plain(frames: &[Plain]) -> Vec<(bool, Opcode, &[u8])> {
    frames
        .iter()
        .map(|(fin, op, p, _, _)| (*fin, *op, &p[..]))
        .collect()
}

/// The Assembler, fed the same client stream, sees what was forwarded (`received`: the input's
/// frames that were): the same messages and pings in order, then the same end.
fn agree_with_assembler(stream: &[u8], max: u64, received: &[Plain], end: &Forwarded) {
    let mut asm = Assembler::new(max);
    let mut inbuf = stream.to_vec();
    let mut got = Vec::new();
    asm.feed(&mut inbuf, &mut got);
    let mut expected = Vec::new();
    let mut message: Option<(bool, Vec<u8>)> = None;
    for (fin, opcode, payload, _, whole) in received {
        if !whole {
            break; // the stream ends inside this frame: no message or ping from it yet
        }
        match opcode {
            Opcode::Data(kind) => {
                let m = message.get_or_insert_with(|| (*kind == Data::Text, Vec::new()));
                m.1.extend_from_slice(payload);
                if *fin {
                    let (text, bytes) = message.take().expect("a message in progress");
                    if !text {
                        expected.push(Inbound::Binary(bytes));
                        continue;
                    }
                    let Ok(text) = String::from_utf8(bytes) else {
                        // The Assembler judges text and stops there; a relay passes it unread.
                        expected.push(Inbound::Violation(Violation::InvalidUtf8));
                        assert_eq!(got, expected);
                        return;
                    };
                    expected.push(Inbound::Text(text));
                }
            }
            &Opcode::PING => expected.push(Inbound::Ping(payload.clone())),
            Opcode::Control(_) => {}
        }
    }
    match end {
        Forwarded::Frames => {}
        Forwarded::Close(c) => expected.push(Inbound::Close(c.clone())),
        Forwarded::Violation(v) => expected.push(Inbound::Violation(v.clone())),
    }
    assert_eq!(got, expected);
}
