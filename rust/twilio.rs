//! A `/ws/twilio` connection the engine answered and reads the opening of, on its relay thread.
//!
//! Twilio's stream URL cannot name the agent: it comes in the `start` message, after the upgrade
//! (SPEC §6b). So the engine answers the 101 at once (naming the session as
//! `connection._twilio` does, unless the stream URL has a token, which names it), reads
//! `connected` and `start` ([`OpeningReader`]), checks the token for the agent `start` names,
//! and then opens the session as a generic one would be, with every byte it read sent to the bot
//! first. Whatever it does not take (an opening it is unsure of, an agent it does not route, a
//! token missing, refused or spent, no place left, a failed connect) goes to Python with the head
//! and the bytes read, marked answered ([`News::Handed`]'s `answered`): Python goes on from its
//! 101 and answers with the close frame it would have.
//!
//! The Python path's limits hold: the opening is read for `handshake_timeout` from the 101, and
//! the connection stays among those waited for (`max_pending_upgrades`) until `start` is whole:
//! evicted, or too slow, it goes to Python with no time left, which closes it 1008 "no start
//! message in time" as it closes its own.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::frame::{encode_frame, Opcode};
use crate::opener::Waiting;
use crate::opening::{Opening, OpeningReader, Unsure};
use crate::reading::EVICTED;
use crate::scratch;
use crate::stream::Stream;
use crate::upgrade;

/// A connection answered 101 on `/ws/twilio`, its opening being read.
pub struct Answering {
    pub(crate) client: Stream,
    /// The request's head, for Python if it goes there.
    pub(crate) head: Vec<u8>,
    pub(crate) reader: OpeningReader,
    /// What came behind the head, fed to the reader at the first step.
    behind: Vec<u8>,
    /// Its token (`/ws/twilio/{token}`).
    pub(crate) token: Option<String>,
    /// The id its 101 named (`None`: with a token, none).
    pub(crate) session_uuid: Option<String>,
    answered: Instant,
    timeout: Duration,
    deadline: Option<Instant>,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) prepared: bool,
    pub(crate) worker: usize,
    stopped: Option<u16>,
    /// Counted among the connections waited for until `start` is whole.
    pub(crate) waiting: Waiting,
    /// The 101, while a TLS connection's queued handshake records keep it from going.
    unsent: Vec<u8>,
}

/// What a read of the opening came to.
pub enum Heard {
    /// Nothing more to read until an event.
    Blocked,
    /// `start` is whole.
    Opening(Opening),
    /// Not an opening the engine takes, or the client closed: Python's to answer.
    NotMine,
    /// Evicted, or `handshake_timeout` passed: Python closes it, with no time left.
    OutOfTime,
    /// Stopped because the gateway is closing: dropped.
    Gone,
}

impl Answering {
    /// Answers `client`'s upgrade `up` (`read`: its head and any frames behind it), to be read
    /// on relay thread `worker` for `timeout`. `None` if the 101 could not be written whole (the
    /// client gone: `waiting` tells Python when dropped).
    pub fn new(
        client: Stream,
        (read, up): (&[u8], &upgrade::TwilioUpgrade<'_>),
        (peer, prepared): (Option<SocketAddr>, bool),
        (worker, timeout): (usize, Duration),
        waiting: Waiting,
    ) -> Option<Self> {
        // Named now unless a token names it, once checked (`connection._twilio`).
        let session_uuid = up.token.is_none().then(upgrade::new_uuid);
        let answer = match &session_uuid {
            Some(uuid) => upgrade::switching_protocols(up.key, uuid),
            None => upgrade::switching_protocols_unnamed(up.key),
        };
        let unsent = client.write_or_hold(answer).ok()?;
        let answered = Instant::now();
        Some(Self {
            client,
            head: read[..up.head_len].to_vec(),
            reader: OpeningReader::default(),
            behind: read[up.head_len..].to_vec(),
            token: up.token.map(str::to_owned),
            session_uuid,
            answered,
            timeout,
            deadline: answered.checked_add(timeout),
            peer,
            prepared,
            worker,
            stopped: None,
            waiting,
            unsent,
        })
    }

    /// Seconds since its 101.
    pub fn waited(&self) -> f64 {
        self.answered.elapsed().as_secs_f64()
    }

    /// Its `handshake_timeout`, in seconds: what Python is told it waited when out of time.
    pub fn timeout(&self) -> f64 {
        self.timeout.as_secs_f64()
    }

    /// Everything it read: the head, then every byte after it.
    pub fn take_read(&mut self) -> Vec<u8> {
        let mut read = std::mem::take(&mut self.head);
        read.extend_from_slice(self.reader.raw());
        read.append(&mut self.behind);
        read
    }

    /// When the opening is out of time (`None`: a timeout too long to count).
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether it was evicted.
    pub fn evicted(&self) -> bool {
        self.stopped == Some(EVICTED)
    }

    /// Ends it at its next step: [`EVICTED`], or the gateway closing.
    pub fn stop(&mut self, code: u16) {
        self.stopped = Some(code);
    }

    /// Reads what the client sent since.
    pub fn step(&mut self, now: Instant) -> Heard {
        match self.stopped {
            Some(EVICTED) => return Heard::OutOfTime,
            Some(_) => {
                // The gateway is closing: the close Python gives the openings it reads.
                let mut close = 1008u16.to_be_bytes().to_vec();
                close.extend_from_slice(b"no start message in time");
                let _ = self
                    .client
                    .write(&encode_frame(true, Opcode::CLOSE, &close, None));
                return Heard::Gone;
            }
            None => {}
        }
        // TLS: records (the 101's too) the socket did not take at once. Nothing comes before
        // the client has its 101.
        match self.client.flush_held(&mut self.unsent) {
            Ok(true) => {}
            Ok(false) => return Heard::Blocked,
            Err(_) => return Heard::NotMine,
        }
        if self.deadline.is_some_and(|d| now >= d) {
            return Heard::OutOfTime;
        }
        match read_opening(&self.client, &mut self.reader, &mut self.behind) {
            None => Heard::Blocked,
            Some(Some(opening)) => Heard::Opening(opening),
            // Closed (Python reads the end as its own), or not an opening the engine takes.
            Some(None) => Heard::NotMine,
        }
    }
}

/// Feeds `reader` what came behind the head (`behind`, then emptied), then what `client` sends:
/// `None` until it can read more, then the opening, or `Some(None)` if it will not be read (not
/// one the reader takes, the client's end or an error: whoever goes on meets them).
pub(crate) fn read_opening(
    client: &Stream,
    reader: &mut OpeningReader,
    behind: &mut Vec<u8>,
) -> Option<Option<Opening>> {
    let fed = |reader: &mut OpeningReader, bytes: &[u8]| match reader.feed(bytes) {
        Ok(None) => None,
        Ok(Some(opening)) => Some(Some(opening)),
        Err(Unsure) => Some(None),
    };
    let behind = std::mem::take(behind);
    if !behind.is_empty() {
        if let Some(done) = fed(reader, &behind) {
            return Some(done);
        }
    }
    scratch::with(4096, |buf| loop {
        if !client.may_read() {
            return None;
        }
        match client.read(buf) {
            Ok(0) => return Some(None),
            Ok(n) => {
                if n < buf.len() && !client.is_tls() {
                    client.read_drained(); // emptied (as a pump's short read)
                }
                if let Some(done) = fed(reader, &buf[..n]) {
                    return Some(done);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Some(None),
        }
    })
}

#[cfg(test)]
mod tests {
    //! Through the engine's own entry points, on loopback TCP: a `/ws/twilio` stream is answered,
    //! its opening read, and its session opened with the opening sent to the bot first; what the
    //! engine does not take goes to Python marked answered, with every byte it read.

    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    use crate::engine::{Accepted, Engine};
    use crate::frame::{encode_frame, Opcode};
    use crate::open::tests::{accept_one, answer_101, header, news, read_head, route, upgrade};
    use crate::open::{Call, News};
    use crate::opener::Wait;

    const CONNECTED: &str = r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#;

    fn start(host: &str) -> String {
        format!(
            r#"{{"event":"start","start":{{"streamSid":"MZ1","callSid":"CA1",
            "customParameters":{{"_pipecatCloudServiceHost":"{host}"}}}},"streamSid":"MZ1"}}"#
        )
    }

    fn masked(text: &str) -> Vec<u8> {
        encode_frame(true, Opcode::TEXT, text.as_bytes(), Some([1, 2, 3, 4]))
    }

    /// The payloads of the masked text frames in `bytes`.
    fn payloads(mut bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let (len, at) = match bytes[1] & 0x7f {
                126 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
                n => (usize::from(n), 2),
            };
            let key = &bytes[at..at + 4];
            let payload = &bytes[at + 4..at + 4 + len];
            let text = payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]);
            out.push(String::from_utf8(text.collect()).unwrap());
            bytes = &bytes[at + 4 + len..];
        }
        out
    }

    /// A bot's listening socket and an engine routing `a.b` to it, waiting `timeout_ms`.
    fn with_bot(timeout_ms: u64) -> (TcpListener, Engine) {
        with_bot_waiting(timeout_ms, 8)
    }

    /// The same, waiting for `most` connections at once.
    fn with_bot_waiting(timeout_ms: u64, most: usize) -> (TcpListener, Engine) {
        let bot_l = TcpListener::bind("127.0.0.1:0").unwrap();
        let engine = Engine::new(1, Duration::from_secs(60)).unwrap();
        let r = route("a.b", bot_l.local_addr().unwrap(), 5, 5000);
        engine.set_routes(vec![r]).unwrap();
        let timeout = Duration::from_millis(timeout_ms);
        engine.set_wait(Wait { timeout, most });
        (bot_l, engine)
    }

    /// A gateway socket and a client that sent `sent` to it, accepted by `engine`.
    fn accepted(engine: &Engine, sent: &[u8]) -> TcpStream {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(sent).unwrap();
        assert!(matches!(accept_one(engine, &l), Accepted::Opening));
        c
    }

    #[test]
    fn a_stream_is_answered_then_opened_with_its_opening_sent_first() {
        let (bot_l, engine) = with_bot(5000);
        let opening = [masked(CONNECTED), masked(&start("a.b"))].concat();
        // The head and `connected` in one write, `start` after the 101: read on the thread.
        let sent = [upgrade("/ws/twilio").as_bytes(), &masked(CONNECTED)].concat();
        let mut client = accepted(&engine, &sent);
        let head = read_head(&mut client);
        assert!(head.starts_with("HTTP/1.1 101 "));
        let uuid = header(&head, "X-Session-Id").unwrap().to_owned();
        client.write_all(&masked(&start("a.b"))).unwrap();
        let (mut bot, _) = bot_l.accept().unwrap();
        bot.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let request = answer_101(&mut bot);
        assert!(request.starts_with("GET /ws HTTP/1.1\r\n"));
        assert_eq!(header(&request, "X-Daily-Session-Id"), Some(uuid.as_str()));
        // The opening first, the same messages (masked again by the gateway, as it relays).
        let mut got = vec![0; opening.len()];
        bot.read_exact(&mut got).unwrap();
        assert_eq!(payloads(&got), [CONNECTED.to_owned(), start("a.b")]);
        let News::Opened {
            session_uuid, call, ..
        } = news(&engine)
        else {
            panic!("not opened");
        };
        assert_eq!(session_uuid, uuid);
        let ids = (Some("CA1".to_owned()), Some("MZ1".to_owned()));
        assert_eq!(
            call,
            Some(Call {
                provider: crate::opening::Provider::Twilio,
                call_id: ids.0,
                stream_id: ids.1
            })
        );
        assert_eq!(engine.places(Some("a.b")), 1);
        assert_eq!(engine.waiting(), 0);
        // No second 101: the bot's first frame is the next thing the client reads.
        let frame = encode_frame(true, Opcode::TEXT, b"hello", None);
        bot.write_all(&frame).unwrap();
        let mut got = vec![0; frame.len()];
        client.read_exact(&mut got).unwrap();
        assert_eq!(got, frame);
    }

    #[test]
    fn an_opening_it_does_not_route_goes_to_python_answered_with_all_it_read() {
        let (_bot, engine) = with_bot(5000);
        let head = upgrade("/ws/twilio");
        let frames = [masked(CONNECTED), masked(&start("x.y"))].concat();
        let mut client = accepted(&engine, &[head.as_bytes(), &frames].concat());
        let answer = read_head(&mut client);
        let News::Handed {
            client: Some(_),
            read,
            answered: Some(uuid),
            evicted: false,
            ..
        } = news(&engine)
        else {
            panic!("not handed answered");
        };
        assert_eq!(header(&answer, "X-Session-Id"), Some(uuid.as_str()));
        assert_eq!(read, [head.as_bytes(), &frames].concat());
        assert_eq!(engine.places(None), 0);
        assert_eq!(engine.waiting(), 0);
    }

    #[test]
    fn an_opening_not_whole_in_time_goes_to_python_with_no_time_left() {
        let (bot_l, engine) = with_bot(200);
        bot_l.set_nonblocking(true).unwrap();
        let sent = [upgrade("/ws/twilio").as_bytes(), &masked(CONNECTED)].concat();
        let mut client = accepted(&engine, &sent);
        read_head(&mut client);
        let News::Handed {
            client: Some(_),
            read,
            waited,
            answered: Some(_),
            ..
        } = news(&engine)
        else {
            panic!("not handed answered");
        };
        assert_eq!(read, sent);
        assert!((waited - 0.2).abs() < 1e-9, "all of the timeout: {waited}");
        assert!(bot_l.accept().is_err(), "nothing dialled");
    }

    #[test]
    fn an_evicted_stream_goes_to_python_evicted_with_no_time_left() {
        let (_bot, engine) = with_bot_waiting(5000, 1);
        let sent = [upgrade("/ws/twilio").as_bytes(), &masked(CONNECTED)].concat();
        let mut first = accepted(&engine, &sent);
        read_head(&mut first);
        assert_eq!(engine.waiting(), 1, "its opening is waited for");
        // Once it has had its time (what is under test), one more connection to wait for
        // evicts the oldest, the stream.
        std::thread::sleep(crate::opener::EVICT_AFTER);
        let _second = accepted(&engine, b"GET /ws/gen");
        let News::Handed {
            client: Some(_),
            read,
            waited,
            evicted: true,
            answered: Some(_),
            ..
        } = news(&engine)
        else {
            panic!("not handed evicted");
        };
        assert_eq!(read, sent);
        assert!(
            (waited - 5.0).abs() < 1e-9,
            "none of the timeout left: {waited}"
        );
    }

    #[test]
    fn a_stream_waiting_when_the_gateway_closes_gets_the_close_python_gives() {
        let (_bot, engine) = with_bot(5000);
        let sent = [upgrade("/ws/twilio").as_bytes(), &masked(CONNECTED)].concat();
        let mut client = accepted(&engine, &sent);
        read_head(&mut client);
        engine.stop_waiting();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        let mut close = vec![0x88, 26, 0x03, 0xf0];
        close.extend_from_slice(b"no start message in time");
        assert_eq!(rest, close);
        assert!(matches!(news(&engine), News::Handed { client: None, .. }));
    }

    #[test]
    fn a_url_routed_providers_opening_is_read_for_its_ids_then_relayed_first() {
        let (bot_l, engine) = with_bot(5000);
        let telnyx_start =
            r#"{"event":"start","start":{"call_control_id":"v3:Md"},"stream_id":"32"}"#;
        let opening = [masked(CONNECTED), masked(telnyx_start)].concat();
        let mut client = accepted(&engine, upgrade("/ws/telnyx?serviceHost=a.b").as_bytes());
        let (mut bot, _) = bot_l.accept().unwrap();
        bot.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        answer_101(&mut bot);
        assert!(read_head(&mut client).starts_with("HTTP/1.1 101 "));
        client.write_all(&opening).unwrap();
        let mut got = vec![0; opening.len()];
        bot.read_exact(&mut got).unwrap();
        assert_eq!(payloads(&got), [CONNECTED, telnyx_start]);
        let News::Opened { call, .. } = news(&engine) else {
            panic!("not opened");
        };
        let ids = (Some("v3:Md".to_owned()), Some("32".to_owned()));
        let provider = crate::opening::Provider::Telnyx;
        assert_eq!(
            call,
            Some(Call {
                provider,
                call_id: ids.0,
                stream_id: ids.1
            })
        );
    }

    #[test]
    fn a_late_opening_counts_in_neither_the_dial_nor_the_session() {
        let (bot_l, engine) = with_bot(5000);
        let start = r#"{"event":"start","start":{"callId":"1234"}}"#;
        let mut client = accepted(&engine, upgrade("/ws/plivo?serviceHost=a.b").as_bytes());
        let (mut bot, _) = bot_l.accept().unwrap();
        bot.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        answer_101(&mut bot);
        assert!(read_head(&mut client).starts_with("HTTP/1.1 101 "));
        // The scenario, not a synchronisation: a provider that sends its opening late.
        std::thread::sleep(Duration::from_millis(400));
        let sent = crate::open::tests::monotonic();
        client.write_all(&masked(start)).unwrap();
        let News::Opened {
            dial_seconds,
            opened_at,
            call,
            ..
        } = news(&engine)
        else {
            panic!("not opened");
        };
        assert!(dial_seconds < 0.4, "the dial took {dial_seconds} s");
        assert!(
            opened_at >= sent,
            "counted from its opening, as Python counts"
        );
        assert_eq!(call.and_then(|c| c.call_id).as_deref(), Some("1234"));
    }

    #[test]
    fn a_token_in_the_stream_url_is_checked_once_start_names_its_agent_and_used_up() {
        use std::sync::Arc;
        let bot_l = TcpListener::bind("127.0.0.1:0").unwrap();
        let engine = Engine::new(1, Duration::from_secs(60)).unwrap();
        let keys = Arc::new(crate::token::Keys::new(&["twilio-secret-0123456789"]).unwrap());
        let mut r = route("a.b", bot_l.local_addr().unwrap(), 5, 5000);
        r.tokens = Some(crate::open::Tokens {
            keys: keys.clone(),
            nonces: Arc::new(crate::nonces::Nonces::new(100)),
        });
        engine.set_routes(vec![r]).unwrap();
        engine.set_wait(Wait {
            timeout: Duration::from_secs(5),
            most: 8,
        });
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 60;
        let token = keys.mint("a.b", exp, "nonce-1", None);
        let target = format!("/ws/twilio/{token}");
        let sent = [upgrade(&target).as_bytes(), &masked(&start("a.b"))].concat();
        let mut client = accepted(&engine, &sent);
        let head = read_head(&mut client);
        assert!(head.starts_with("HTTP/1.1 101 "));
        assert_eq!(
            header(&head, "X-Session-Id"),
            None,
            "a token names its session"
        );
        let (mut bot, _) = bot_l.accept().unwrap();
        bot.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let request = answer_101(&mut bot);
        let named = crate::upgrade::session_id_for("nonce-1");
        assert_eq!(header(&request, "X-Daily-Session-Id"), Some(named.as_str()));
        assert!(matches!(news(&engine), News::Opened { .. }));
        // Used up: the same URL again goes to Python (which refuses it), answered, unnamed.
        let mut again = accepted(&engine, &sent);
        read_head(&mut again);
        let News::Handed { answered, .. } = news(&engine) else {
            panic!("not handed");
        };
        assert_eq!(answered.as_deref(), Some(""));
        assert_eq!(engine.places(Some("a.b")), 1, "the first session's only");
    }
}
