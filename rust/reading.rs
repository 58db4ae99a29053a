//! A connection accepted before its request was all there, read on a relay thread until it is.
//!
//! Most connections are accepted before their request arrives (the request follows the TCP
//! handshake by a round trip; over TLS by several). Rather than hand each such connection to
//! Python to wait on, the engine registers it on a relay thread, which reads it as it comes; once
//! the head is whole, the session is opened in place as one read at the accept would have been
//! (`opener.rs`), or the connection goes to Python with the bytes read ([`News::Handed`]).
//!
//! The limits are the Python path's: the head is at most [`upgrade::MAX_HEADER_BYTES`] (past it,
//! Python answers 431), the wait ends `handshake_timeout` after the accept (the connection is
//! then dropped without an answer, as Python drops one too slow), and past
//! `max_pending_upgrades` connections waited for at once a newcomer evicts the oldest
//! (`opener.rs`, `EVICT_AFTER`: not one younger than a second), and once the gateway is full
//! each connection waiting in the backlog evicts the oldest once it has waited a second too
//! (`accepting.rs`).

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::engine::FIRST_READ;
use crate::opener::Waiting;
use crate::scratch;
use crate::stream::Stream;
use crate::upgrade;

/// The stop (`Task::stop`'s code) that evicts a connection waited for: one too many are.
pub const EVICTED: u16 = 0;
/// The stop that drops a connection waited for: the gateway is closing.
pub const CLOSING: u16 = 1001;

/// A connection whose request is being read.
pub struct Reading {
    /// The client.
    pub(crate) client: Stream,
    /// What it sent so far.
    pub(crate) read: Vec<u8>,
    pub(crate) peer: Option<SocketAddr>,
    /// Its socket inherited the relayed sockets' options from the listener.
    pub(crate) prepared: bool,
    accepted: Instant,
    deadline: Option<Instant>,
    /// Its relay thread.
    pub(crate) worker: usize,
    /// Stopped: [`EVICTED`] or [`CLOSING`].
    stopped: Option<u16>,
    /// Counted among the connections waited for; tells Python if dropped unsettled.
    pub(crate) waiting: Waiting,
}

/// What a read came to.
pub enum Step {
    /// Nothing more to read until an event.
    Blocked,
    /// The head is whole (or over the limit): open the session, or hand it to Python.
    Whole,
    /// The client went away, failed, or took too long: dropped without an answer.
    Gone,
    /// Evicted: dropped without an answer.
    Evicted,
    /// Its TLS handshake (or a record) failed: closed with its alert, without a session.
    TlsFailed(String),
}

impl Reading {
    /// `client` (from `peer`; `prepared`: with the relayed sockets' options), accepted now with
    /// `read` read so far, read on relay thread `worker` for `timeout` at most.
    pub fn new(
        client: Stream,
        read: &[u8],
        (peer, prepared): (Option<SocketAddr>, bool),
        (worker, timeout): (usize, Duration),
        waiting: Waiting,
    ) -> Self {
        let accepted = Instant::now();
        Self {
            client,
            read: read.to_vec(),
            peer,
            prepared,
            accepted,
            deadline: accepted.checked_add(timeout),
            worker,
            stopped: None,
            waiting,
        }
    }

    /// Seconds since its accept.
    pub fn waited(&self) -> f64 {
        self.accepted.elapsed().as_secs_f64()
    }

    /// When the wait ends (`None`: a timeout too long to count).
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Drops it at its next step (its relay thread runs it next): `code` [`EVICTED`], or
    /// [`CLOSING`].
    pub fn stop(&mut self, code: u16) {
        self.stopped = Some(code);
    }

    /// Reads what the client sent since.
    pub fn step(&mut self, now: Instant) -> Step {
        match self.stopped {
            Some(EVICTED) => return Step::Evicted,
            Some(_) => return Step::Gone,
            None => {}
        }
        if self.deadline.is_some_and(|d| now >= d) {
            return Step::Gone;
        }
        // TLS: handshake records the socket did not take at once.
        if self.client.pending_out() && self.client.may_write() {
            match self.client.write(&[]) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return Step::Gone,
            }
        }
        scratch::with(4096, |buf| {
            loop {
                if !self.client.may_read() {
                    return Step::Blocked;
                }
                let room = (FIRST_READ - self.read.len()).min(buf.len());
                match self.client.read(&mut buf[..room]) {
                    Ok(0) => return Step::Gone,
                    Ok(n) => {
                        if n < room && !self.client.is_tls() {
                            self.client.read_drained(); // emptied (as a pump's short read)
                        }
                        self.read.extend_from_slice(&buf[..n]);
                        let whole = !matches!(upgrade::split_head(&self.read), Ok(None));
                        if whole || self.read.len() >= FIRST_READ {
                            return Step::Whole;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Blocked,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::InvalidData && self.client.is_tls() => {
                        return Step::TlsFailed(e.to_string())
                    }
                    Err(_) => return Step::Gone,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    //! Through the engine's own entry points, on loopback TCP: a connection accepted before its
    //! request is read on its relay thread, then opened, handed to Python with what it sent, or
    //! dropped (and Python told), within the limits of the wait.

    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::time::Duration;

    use crate::engine::{Accepted, Engine};
    use crate::open::tests::{
        accept_one, answer_101, news, read_head, relays_the_bots_frame, route, upgrade,
    };
    use crate::open::News;
    use crate::opener::Wait;
    use crate::upgrade::MAX_HEADER_BYTES;

    /// An engine routing `a.b` to `bot`, waiting `timeout_ms` for up to `most` requests.
    fn engine(bot: std::net::SocketAddr, timeout_ms: u64, most: usize) -> Engine {
        let engine = Engine::new(1, Duration::from_secs(60)).unwrap();
        engine.set_routes(vec![route("a.b", bot, 5, 5000)]).unwrap();
        let timeout = Duration::from_millis(timeout_ms);
        engine.set_wait(Wait { timeout, most });
        engine
    }

    /// A bot's listening socket, and an [`engine`] routing `a.b` to it.
    fn with_bot(timeout_ms: u64, most: usize) -> (TcpListener, Engine) {
        let bot_l = TcpListener::bind("127.0.0.1:0").unwrap();
        let engine = engine(bot_l.local_addr().unwrap(), timeout_ms, most);
        (bot_l, engine)
    }

    /// A listening gateway socket and a client connected to it that sent nothing yet.
    fn silent_client() -> (TcpListener, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (l, c)
    }

    #[test]
    fn a_request_sent_after_the_accept_is_read_there_and_opened() {
        let (bot_l, engine) = with_bot(5000, 8);
        let (l, mut client) = silent_client();
        assert!(matches!(accept_one(&engine, &l), Accepted::Opening));
        assert_eq!(engine.waiting(), 1);
        // In two writes: the relay thread reads on until the head is whole.
        let request = upgrade("/ws/generic/a.b");
        let (first, rest) = request.split_at(20);
        client.write_all(first.as_bytes()).unwrap();
        // Not a synchronisation (it passes either way): time for the relay thread to read the
        // first piece alone, as a head arriving in several segments is read.
        std::thread::sleep(Duration::from_millis(20));
        client.write_all(rest.as_bytes()).unwrap();
        let (mut bot, _) = bot_l.accept().unwrap();
        bot.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        answer_101(&mut bot);
        assert!(read_head(&mut client).starts_with("HTTP/1.1 101 "));
        assert!(matches!(news(&engine), News::Opened { .. }));
        assert_eq!(engine.waiting(), 0);
        relays_the_bots_frame(&mut bot, &mut client);
    }

    #[test]
    fn a_request_not_the_engines_is_handed_with_its_bytes() {
        let (_bot, engine) = with_bot(5000, 8);
        let (l, mut client) = silent_client();
        assert!(matches!(accept_one(&engine, &l), Accepted::Opening));
        let request = "GET /livez HTTP/1.1\r\nHost: gw\r\n\r\n";
        client.write_all(request.as_bytes()).unwrap();
        let News::Handed {
            client: Some(mut answer_on),
            read,
            waited,
            ..
        } = news(&engine)
        else {
            panic!("not handed with its socket")
        };
        assert_eq!(read, request.as_bytes());
        assert!(waited >= 0.0);
        // The socket is Python's to answer on; the engine's copy is closed.
        answer_on.0.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        assert!(read_head(&mut client).starts_with("HTTP/1.1 200"));
        assert_eq!(engine.waiting(), 0);
        assert_eq!(engine.places(None), 0);
    }

    #[test]
    fn a_head_over_the_limit_is_handed_for_its_431() {
        let (_bot, engine) = with_bot(5000, 8);
        let (l, mut client) = silent_client();
        assert!(matches!(accept_one(&engine, &l), Accepted::Opening));
        let long = format!(
            "GET /ws/generic/a.b HTTP/1.1\r\nX: {}",
            "x".repeat(MAX_HEADER_BYTES)
        );
        client.write_all(long.as_bytes()).unwrap();
        let News::Handed {
            client: Some(_),
            read,
            ..
        } = news(&engine)
        else {
            panic!("not handed")
        };
        assert!(
            read.len() > MAX_HEADER_BYTES,
            "what it sent, past the limit"
        );
        assert!(long.as_bytes().starts_with(&read));
    }

    #[test]
    fn a_client_gone_or_too_slow_is_dropped_and_python_told() {
        let (_bot, engine) = with_bot(200, 8);
        // Gone before its request.
        let (l, client) = silent_client();
        assert!(matches!(accept_one(&engine, &l), Accepted::Opening));
        client.shutdown(Shutdown::Both).unwrap();
        assert!(matches!(news(&engine), News::Handed { client: None, .. }));
        // Half a request, then nothing: dropped at the timeout, without an answer.
        let (l, mut client) = silent_client();
        assert!(matches!(accept_one(&engine, &l), Accepted::Opening));
        client
            .write_all(b"GET /ws/generic/a.b HTTP/1.1\r\n")
            .unwrap();
        let News::Handed {
            client: None,
            waited,
            ..
        } = news(&engine)
        else {
            panic!("not dropped")
        };
        assert!(waited >= 0.2, "dropped after {waited} s");
        let mut b = [0u8; 1];
        assert_eq!(client.read(&mut b).unwrap(), 0, "closed, no answer");
        assert_eq!(engine.waiting(), 0);
    }

    #[test]
    fn past_the_room_the_oldest_is_evicted() {
        let (bot_l, engine) = with_bot(5000, 1);
        let (l, mut first) = silent_client();
        assert!(matches!(accept_one(&engine, &l), Accepted::Opening));
        // Once the first has had its time (what is under test), a second evicts it.
        std::thread::sleep(crate::opener::EVICT_AFTER);
        let (l, mut second) = silent_client();
        assert!(matches!(accept_one(&engine, &l), Accepted::Opening));
        let News::Handed {
            client: None,
            evicted: true,
            ..
        } = news(&engine)
        else {
            panic!("not evicted")
        };
        let mut b = [0u8; 1];
        assert_eq!(
            first.read(&mut b).unwrap(),
            0,
            "the oldest, closed unanswered"
        );
        assert_eq!(engine.waiting(), 1);
        // The newcomer is still waited for: its request opens.
        second
            .write_all(upgrade("/ws/generic/a.b").as_bytes())
            .unwrap();
        let _bot = bot_l.accept().unwrap();
        // No longer counted once it opened (just after its bot's connect).
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while engine.waiting() != 0 {
            assert!(std::time::Instant::now() < end, "still counted");
            std::thread::yield_now();
        }
        // And at the gateway's close, every one is evicted.
        let (l, mut third) = silent_client();
        assert!(matches!(accept_one(&engine, &l), Accepted::Opening));
        engine.stop_waiting();
        let n = news(&engine);
        // Dropped, not evicted for the limit (Python counts no eviction).
        assert!(
            matches!(
                n,
                News::Handed {
                    client: None,
                    evicted: false,
                    ..
                }
            ),
            "{n:?}"
        );
        assert_eq!(third.read(&mut b).unwrap(), 0);
    }

    #[test]
    fn a_shutdown_drops_the_connections_waited_for_and_tells_python() {
        let (_bot, mut engine) = with_bot(60_000, 8);
        let (l, _client) = silent_client();
        assert!(matches!(accept_one(&engine, &l), Accepted::Opening));
        engine.shutdown();
        assert!(matches!(news(&engine), News::Handed { client: None, .. }));
        assert_eq!(engine.waiting(), 0);
    }

    #[test]
    fn an_eviction_never_stops_a_connection_already_being_opened() {
        // One place to wait in: each second connection evicts the first unless the first's
        // request (sent a few microseconds before) is being opened; then the first must open
        // and stay open, never be stopped (a stop reaching it would close it with code 0).
        let bot_l = TcpListener::bind("127.0.0.1:0").unwrap();
        let bot = bot_l.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            for s in bot_l.incoming() {
                let Ok(mut s) = s else { return };
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                answer_101(&mut s);
                kept.push(s);
            }
        });
        let engine = Engine::new(1, Duration::from_secs(60)).unwrap();
        engine
            .set_routes(vec![route("a.b", bot, 100_000, 5000)])
            .unwrap();
        let timeout = Duration::from_secs(5);
        engine.set_wait(Wait { timeout, most: 1 });
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let request = upgrade("/ws/generic/a.b");
        let mut opened = 0;
        for i in 0..200 {
            let mut first = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            assert!(matches!(accept_one(&engine, &l), Accepted::Opening));
            first.write_all(request.as_bytes()).unwrap();
            let spin = std::time::Instant::now() + Duration::from_micros(i % 60);
            while std::time::Instant::now() < spin {}
            let _second = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            assert!(matches!(accept_one(&engine, &l), Accepted::Opening));
            first
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match first.read(&mut b) {
                    Ok(1) => head.push(b[0]),
                    _ => break, // evicted before its request was read: closed unanswered
                }
            }
            if head.is_empty() {
                continue;
            }
            assert!(head.starts_with(b"HTTP/1.1 101"), "{i}");
            opened += 1;
            // A bounded look for a close that must not come.
            first
                .set_read_timeout(Some(Duration::from_millis(10)))
                .unwrap();
            assert!(first.read(&mut b).is_err(), "{i}: opened, then stopped");
            let _ = engine.drain();
        }
        assert!(
            opened > 0,
            "no first connection opened: the race was not run"
        );
    }
}
