//! `OpeningReader` (`opening.rs`) on arbitrary bytes after a provider endpoint's 101: the first
//! byte picks the provider (its top two bits) and where the input is cut (the others, times 4),
//! the rest is fed in two pieces (the second only if the first settles nothing).
//!
//! Asserted for every input:
//! - no panic; the verdict (an opening, "not mine", or more needed) does not depend on where
//!   the bytes were cut, and every byte fed is kept, unchanged;
//! - an opening's call and stream ids are 1-128 visible ASCII characters (they reach log lines);
//! - an opening comes only from whole masked text frames, the last one a JSON `start`;
//! - no single allocation is larger than what was fed plus one message's limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate_core::opening::{Opening, OpeningReader, Provider, Unsure, MAX_MESSAGE_BYTES};
use wsgate_core_fuzz::measure;

fn read(provider: Provider, pieces: &[&[u8]]) -> (Result<Option<Opening>, Unsure>, Vec<u8>) {
    let mut r = OpeningReader::new(provider);
    let mut verdict = Ok(None);
    for piece in pieces {
        verdict = r.feed(piece);
        if !matches!(verdict, Ok(None)) {
            break;
        }
    }
    (verdict, r.into_raw())
}

fn id_ok(id: &Option<String>) -> bool {
    id.as_ref()
        .is_none_or(|s| (1..=128).contains(&s.len()) && s.bytes().all(|b| (0x21..=0x7e).contains(&b)))
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, bytes)) = data.split_first() else {
        return;
    };
    let providers = [Provider::Twilio, Provider::Telnyx, Provider::Plivo, Provider::Exotel];
    let provider = providers[usize::from(first >> 6)];
    let cut = (usize::from(first & 0x3f) * 4).min(bytes.len());
    let (whole, kept) = read(provider, &[bytes]);
    assert_eq!(kept, bytes, "bytes fed are kept");
    let ((split, kept_split), alloc) =
        measure(|| read(provider, &[&bytes[..cut], &bytes[cut..]]));
    assert!(alloc.largest <= bytes.len() + MAX_MESSAGE_BYTES, "{alloc:?}");
    // Cut before the verdict: the same verdict, and the same bytes kept up to it.
    assert_eq!(split, whole, "cut at {cut}");
    assert!(bytes.starts_with(&kept_split));
    if let Ok(Some(opening)) = &whole {
        assert!(id_ok(&opening.call_id) && id_ok(&opening.stream_id), "{opening:?}");
        assert!(provider == Provider::Twilio || opening.service_host.is_none());
        assert!(bytes[0] == 0x81 && bytes[1] & 0x80 != 0, "a masked text frame first");
    }
});
