//! A telephony provider's opening (`connected`, then `start`; Plivo's `start` alone) read from the
//! client's frames, without I/O, for the sessions the engine opens on the provider endpoints
//! (`open.rs`). Twilio's names the service host
//! (`start.customParameters._pipecatCloudServiceHost`), so that route is known only once `start`
//! is whole; Telnyx, Plivo and Exotel route from the URL, and their opening is read (for a short
//! while) only for the call's ids in the session's log line, as `sessions.peek_opening` does.
//!
//! It serves the common case only, like the upgrade recogniser: whole text frames, masked, at
//! most two messages, each at most [`MAX_MESSAGE_BYTES`], valid JSON objects with an `"event"`.
//! Anything else (a fragment, a ping, a close, a binary frame, JSON that `serde_json` refuses) is
//! [`Unsure`]: a Twilio stream then goes to Python, whose `providers.OpeningReader` has the one
//! implementation of every refusal and its close code; another provider's call is relayed
//! without its ids. So it is stricter than that reader, never looser, and where it reads an
//! opening the Python reader reads the same one. Every byte fed is kept: it goes to the bot
//! unchanged, or to Python.

use serde_json::Value;

/// Longest opening message taken, in bytes (`OpeningReader`'s default `max_message_bytes`).
pub const MAX_MESSAGE_BYTES: usize = 65536;

/// Messages read at most before `start` is whole (`OpeningReader`'s default `max_messages`).
const MAX_MESSAGES: usize = 2;

/// What the engine needs from a provider's opening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opening {
    /// Twilio's `start.customParameters._pipecatCloudServiceHost`, when a string (the others'
    /// is in their URL: `None`).
    pub service_host: Option<String>,
    /// The call's id (Twilio's `start.callSid`, Telnyx's `start.call_control_id`, Plivo's
    /// `start.callId`, Exotel's `start.call_sid`), when 1-128 visible ASCII characters.
    pub call_id: Option<String>,
    /// The stream's id (`start`'s, else the message's), bounded like `call_id`.
    pub stream_id: Option<String>,
}

/// Not an opening this reader takes: Python reads it (and answers it).
#[derive(Debug, PartialEq, Eq)]
pub struct Unsure;

/// A telephony provider (SPEC §6b).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Provider {
    /// `/ws/twilio`: routed by its `start` message.
    #[default]
    Twilio,
    /// `/ws/telnyx?serviceHost=…`.
    Telnyx,
    /// `/ws/plivo?serviceHost=…` (no `connected`).
    Plivo,
    /// `/ws/exotel?serviceHost=…`.
    Exotel,
}

impl Provider {
    /// The provider a path segment names (`/ws/{name}`).
    pub fn named(name: &str) -> Option<Self> {
        Some(match name {
            "twilio" => Self::Twilio,
            "telnyx" => Self::Telnyx,
            "plivo" => Self::Plivo,
            "exotel" => Self::Exotel,
            _ => return None,
        })
    }

    /// Its name, as in its path.
    pub fn name(self) -> &'static str {
        match self {
            Self::Twilio => "twilio",
            Self::Telnyx => "telnyx",
            Self::Plivo => "plivo",
            Self::Exotel => "exotel",
        }
    }

    /// Whether it sends `{"event": "connected"}` before `start` (Plivo sends `start` alone).
    fn sends_connected(self) -> bool {
        self != Self::Plivo
    }
}

/// Reads a provider's opening from the bytes the client sends after its 101 (Twilio's by
/// default).
#[derive(Default)]
pub struct OpeningReader {
    provider: Provider,
    raw: Vec<u8>,
    /// Offset in `raw` of the first frame not yet read.
    pos: usize,
    messages: usize,
    connected: bool,
}

impl OpeningReader {
    /// A reader of `provider`'s opening.
    pub fn new(provider: Provider) -> Self {
        Self {
            provider,
            ..Self::default()
        }
    }

    /// Whose opening it reads.
    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// Every byte fed so far, unchanged.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Takes every byte fed so far (what the bot is sent first, or Python is handed).
    pub fn into_raw(self) -> Vec<u8> {
        self.raw
    }

    /// Takes the next bytes from the client: the opening once `start` is whole, `None` while
    /// more are needed. After `Some` or `Unsure`, nothing more is to be fed.
    pub fn feed(&mut self, data: &[u8]) -> Result<Option<Opening>, Unsure> {
        self.raw.extend_from_slice(data);
        loop {
            let Some((payload, end)) = self.whole_text_frame()? else {
                return Ok(None);
            };
            self.pos = end;
            self.messages += 1;
            let message: Value = serde_json::from_slice(&payload).map_err(|_| Unsure)?;
            let event = message.get("event").and_then(Value::as_str).ok_or(Unsure)?;
            match event {
                "start" => return Ok(Some(opening_of(self.provider, &message))),
                "connected"
                    if self.provider.sends_connected()
                        && !self.connected
                        && self.messages < MAX_MESSAGES =>
                {
                    self.connected = true;
                }
                _ => return Err(Unsure),
            }
        }
    }

    /// The unmasked payload of the whole text frame at `pos` and where it ends, `None` while it
    /// has not all arrived, or [`Unsure`] for any other frame.
    fn whole_text_frame(&self) -> Result<Option<(Vec<u8>, usize)>, Unsure> {
        let buf = &self.raw[self.pos..];
        if buf.len() < 2 {
            return Ok(None);
        }
        // FIN, no reserved bit, text; masked.
        if buf[0] != 0x81 || buf[1] & 0x80 == 0 {
            return Err(Unsure);
        }
        let (length, size) = match buf[1] & 0x7f {
            126 if buf.len() < 4 => return Ok(None),
            126 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
            127 => return Err(Unsure), // over 65,535 bytes: over the limit
            n => (usize::from(n), 2),
        };
        if length > MAX_MESSAGE_BYTES {
            return Err(Unsure);
        }
        let start = size + 4;
        if buf.len() < start + length {
            return Ok(None);
        }
        let key = [buf[size], buf[size + 1], buf[size + 2], buf[size + 3]];
        let payload = buf[start..start + length]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        Ok(Some((payload, self.pos + start + length)))
    }
}

/// The ids (and Twilio's service host) of a `start` message, as `providers._opening_of` reads
/// them; a field missing or malformed is `None`.
fn opening_of(provider: Provider, message: &Value) -> Opening {
    let start = message.get("start").filter(|s| s.is_object());
    let field = |name: &str| fixed_id(start.and_then(|s| s.get(name)));
    let top = |name: &str| fixed_id(message.get(name));
    let (call_id, stream_id) = match provider {
        Provider::Twilio => (
            field("callSid"),
            field("streamSid").or_else(|| top("streamSid")),
        ),
        Provider::Telnyx => (field("call_control_id"), top("stream_id")),
        Provider::Plivo => (
            field("callId"),
            field("streamId").or_else(|| top("streamId")),
        ),
        Provider::Exotel => (
            field("call_sid"),
            field("stream_sid").or_else(|| top("stream_sid")),
        ),
    };
    let service_host = match provider {
        Provider::Twilio => start
            .and_then(|s| s.get("customParameters"))
            .filter(|p| p.is_object())
            .and_then(|p| p.get("_pipecatCloudServiceHost"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        _ => None,
    };
    Opening {
        service_host,
        call_id,
        stream_id,
    }
}

/// A call or stream id: a string of 1-128 visible ASCII characters (they end up in log lines).
fn fixed_id(value: Option<&Value>) -> Option<String> {
    let s = value?.as_str()?;
    let ok = (1..=128).contains(&s.len()) && s.bytes().all(|b| (0x21..=0x7e).contains(&b));
    ok.then(|| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![b0];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 65536 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        out
    }

    fn text(payload: &str) -> Vec<u8> {
        frame(0x81, payload.as_bytes())
    }

    const CONNECTED: &str = r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#;
    const START: &str = r#"{"event":"start","sequenceNumber":"1","start":{"accountSid":"AC1",
        "streamSid":"MZ1","callSid":"CA1","tracks":["inbound"],"customParameters":
        {"_pipecatCloudServiceHost":"agent.org"}},"streamSid":"MZ0"}"#;

    fn twilio(host: &str) -> Opening {
        Opening {
            service_host: Some(host.into()),
            call_id: Some("CA1".into()),
            stream_id: Some("MZ1".into()),
        }
    }

    #[test]
    fn connected_then_start_in_any_split_is_read_and_kept_whole() {
        let mut bytes = text(CONNECTED);
        bytes.extend(text(START));
        bytes.extend(frame(0x81, b"{\"event\":\"media\"}")); // behind it: kept, not read
        let start_end = bytes.len() - frame(0x81, b"{\"event\":\"media\"}").len();
        for cut in 0..start_end {
            let mut r = OpeningReader::default();
            assert_eq!(r.feed(&bytes[..cut]), Ok(None), "cut at {cut}");
            assert_eq!(r.feed(&bytes[cut..]), Ok(Some(twilio("agent.org"))));
            assert_eq!(r.raw(), &bytes[..]);
        }
    }

    #[test]
    fn start_alone_is_an_opening_and_its_fields_are_read_as_python_reads_them() {
        let mut r = OpeningReader::default();
        assert_eq!(r.feed(&text(START)), Ok(Some(twilio("agent.org"))));
        // A stream id from the message when start has none; ids not 1-128 visible ASCII, a
        // host that is not a string: None (Python's route then refuses it).
        let odd = r#"{"event":"start","streamSid":"MZ0","start":{"callSid":"C A",
            "customParameters":{"_pipecatCloudServiceHost":7}}}"#;
        let long = format!(
            r#"{{"event":"start","start":{{"callSid":"{}"}}}}"#,
            "C".repeat(129)
        );
        let none = Opening {
            service_host: None,
            call_id: None,
            stream_id: None,
        };
        let mut r = OpeningReader::default();
        let read = r.feed(&text(odd)).unwrap().unwrap();
        assert_eq!(read.stream_id.as_deref(), Some("MZ0"));
        assert_eq!((read.service_host, read.call_id), (None, None));
        let mut r = OpeningReader::default();
        assert_eq!(r.feed(&text(&long)), Ok(Some(none.clone())));
        let mut r = OpeningReader::default();
        assert_eq!(
            r.feed(&text(r#"{"event":"start","start":[]}"#)),
            Ok(Some(none))
        );
    }

    #[test]
    fn each_providers_ids_are_read_where_it_puts_them() {
        let cases = [
            (
                Provider::Telnyx,
                vec![
                    r#"{"event":"connected","version":"1.0.0"}"#,
                    r#"{"event":"start","start":{"call_control_id":"v3:Md"},"stream_id":"32de"}"#,
                ],
                ("v3:Md", "32de"),
            ),
            (
                Provider::Plivo,
                vec![r#"{"event":"start","start":{"callId":"1234","streamId":"8765"}}"#],
                ("1234", "8765"),
            ),
            (
                Provider::Exotel,
                vec![
                    r#"{"event":"connected"}"#,
                    r#"{"event":"start","stream_sid":"c3e1","start":{"call_sid":"b6a1"}}"#,
                ],
                ("b6a1", "c3e1"),
            ),
        ];
        for (provider, messages, (call, stream)) in cases {
            let bytes: Vec<u8> = messages.iter().flat_map(|m| text(m)).collect();
            let mut r = OpeningReader::new(provider);
            let read = r.feed(&bytes).unwrap().unwrap();
            assert_eq!(read.call_id.as_deref(), Some(call), "{provider:?}");
            assert_eq!(read.stream_id.as_deref(), Some(stream), "{provider:?}");
            assert_eq!(read.service_host, None, "routed from the URL");
        }
        // Plivo sends no `connected`: one is not an opening of its.
        let mut r = OpeningReader::new(Provider::Plivo);
        assert_eq!(r.feed(&text(CONNECTED)), Err(Unsure));
    }

    #[test]
    fn anything_else_is_left_to_python() {
        let big = format!(
            r#"{{"event":"connected","pad":"{}"}}"#,
            "x".repeat(MAX_MESSAGE_BYTES)
        );
        let cases: Vec<Vec<u8>> = vec![
            frame(0x01, CONNECTED.as_bytes()),                    // a fragment
            frame(0x89, b""),                                     // a ping
            frame(0x88, &[0x03, 0xe8]),                           // a close
            frame(0x82, START.as_bytes()),                        // binary
            frame(0xc1, START.as_bytes()),                        // a reserved bit
            text(&big),                                           // over the size limit
            text("{\"event\":\"start\""),                         // not JSON
            text("[1]"),                                          // not an object
            text("{\"type\":\"start\"}"),                         // no event
            text("{\"event\":\"media\"}"),                        // not an opening event
            [text(CONNECTED), text(CONNECTED)].concat(),          // connected twice
            frame(0x81, b"{\"event\":\"start\",\"x\":\"\xff\"}"), // not UTF-8
            b"\x81\x05hello".to_vec(),                            // unmasked
        ];
        for case in cases {
            let mut r = OpeningReader::default();
            assert_eq!(r.feed(&case), Err(Unsure), "{case:?}");
        }
    }
}
