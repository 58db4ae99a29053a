//! Deciding and starting the sessions the data plane opens by itself (`open.rs`), wherever the
//! request was read: by the engine as it accepted the connection, or by a relay thread that
//! waited for it (`reading.rs`).
//!
//! One [`Opener`] per engine, shared with its relay threads: the route table, the place counts,
//! the token checks, the bot's connect, and where the news goes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::counters::{Counters, Served};
use crate::engine::{Item, Shared};
use crate::open::{self, Client, Fast, News, Route};
use crate::sockets::{dialled_options, prepare};
use crate::stream::Stream;
use crate::upgrade;

/// The routes by service host.
pub type Routes = Arc<HashMap<String, Arc<Route>>>;

/// How long, and for how many connections at once, relay threads wait for requests that had not
/// arrived when their connection was accepted (none until the control plane says).
#[derive(Clone, Copy, Debug)]
pub struct Wait {
    /// From the accept to the request's whole head (the gateway's `handshake_timeout`).
    pub timeout: Duration,
    /// Connections waited for at once (the gateway's `max_pending_upgrades`); past it, the
    /// oldest is evicted (dropped unanswered, as the control plane evicts its own). 0: none is
    /// waited for (each goes to the control plane unread).
    pub most: usize,
}

/// What opening a session needs. See the module docs.
pub struct Opener {
    routes: Mutex<Routes>,
    shared: Arc<Shared>,
    counters: Arc<Counters>,
    dead_peer_timeout: Duration,
    wait: Mutex<Wait>,
    /// Connections whose request a relay thread waits for now.
    waiting: Mutex<Waited>,
    /// The listener's TLS (`None`: plain).
    tls: Mutex<Option<Arc<rustls::ServerConfig>>>,
    /// Where every opened session's news goes: one for all (a clone is a count, not an
    /// allocation, per open).
    tell: open::Tell,
}

/// A connection waited for: its id and its relay thread.
pub(crate) type Waiter = (u64, usize);

/// The connections waited for: their ids and relay threads, oldest first (with ids of those
/// since settled, skipped when met), and the ids still waited for.
#[derive(Default)]
struct Waited {
    /// Each with when it began to be waited for.
    order: VecDeque<(Waiter, Instant)>,
    live: HashSet<u64>,
}

/// A connection waited for less than this is not evicted for `max_pending_upgrades`: its
/// request may be on its way, or in its socket unread while its relay thread accepts a burst
/// (2,000 clients connecting at once lost half their connections to evictions, benches/README.md
/// "Session opens, round 10"; 5,000 lost 3,000 while the young were evicted past twice the
/// limit, round 11). A real client's request follows its connect within a round trip (a TLS
/// handshake's few); a slow or idle connection (slowloris) outlives this and is evicted as
/// newcomers come. When the gateway holds all it may (`max_connections`) and a connection
/// waits in the backlog, the oldest gives way too once it has waited this long (`accepting.rs`,
/// `listener.py` `_try_room`: one per newcomer), so idle connections hold a full gateway this
/// long at most. Python's own waits keep the same rule (`admission.EVICT_AFTER`).
pub const EVICT_AFTER: Duration = Duration::from_secs(1);

impl Waited {
    /// The oldest still waited for, now no longer counted.
    fn oldest(&mut self) -> Option<Waiter> {
        self.oldest_if(|_| true)
    }

    /// What a newcomer at `now` evicts to make room under `most`: the oldest ones that have
    /// waited [`EVICT_AFTER`] at least (now no longer counted).
    fn victims(&mut self, most: usize, now: Instant) -> Vec<Waiter> {
        let mut victims = Vec::new();
        let before = now.checked_sub(EVICT_AFTER);
        let old = |since: Instant| before.is_some_and(|b| since <= b);
        while self.live.len() >= most {
            match self.oldest_if(old) {
                Some(victim) => victims.push(victim),
                None => break,
            }
        }
        victims
    }

    /// The oldest still waited for, if `old_enough` of when it began, now no longer counted.
    fn oldest_if(&mut self, old_enough: impl Fn(Instant) -> bool) -> Option<Waiter> {
        while let Some(&((id, worker), since)) = self.order.front() {
            if !self.live.contains(&id) {
                self.order.pop_front(); // settled since
                continue;
            }
            if !old_enough(since) {
                return None;
            }
            self.order.pop_front();
            self.live.remove(&id);
            return Some((id, worker));
        }
        None
    }

    fn settled(&mut self, id: u64) {
        self.live.remove(&id);
        // Settled ones leave the order when met; past twice the live ones it is rebuilt.
        if self.order.len() > 2 * self.live.len() + 64 {
            let live = &self.live;
            self.order.retain(|((id, _), _)| live.contains(id));
        }
    }
}

/// What [`Opener::open`] came to.
pub enum Verdict {
    /// The session, dialling its bot: for relay thread `worker` to run.
    Started(Box<Fast>),
    /// Not the data plane's to open (not recognised, not routed, refused, or no place left):
    /// the client, for the control plane.
    Back(Stream),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Opener {
    pub(crate) fn new(
        shared: Arc<Shared>,
        counters: Arc<Counters>,
        dead_peer_timeout: Duration,
    ) -> Self {
        let told = shared.clone();
        let tell: open::Tell = Arc::new(move |news| match news {
            // Nothing in Python waits for it: kept by the engine, it goes to Python with the
            // session's outcome, or when the Session API asks for it.
            News::Opened { .. } => told.opened(news),
            _ => told.push(Item::Open(news)),
        });
        Self {
            routes: Mutex::new(Arc::new(HashMap::new())),
            shared,
            counters,
            tell,
            dead_peer_timeout,
            wait: Mutex::new(Wait {
                timeout: Duration::ZERO,
                most: 0,
            }),
            waiting: Mutex::default(),
            tls: Mutex::new(None),
        }
    }

    /// The route table now.
    pub fn routes(&self) -> Routes {
        lock(&self.routes).clone()
    }

    pub(crate) fn set_routes(&self, routes: Routes) {
        *lock(&self.routes) = routes;
    }

    /// The TLS new connections get (`None`: plain): their handshake is read on a relay thread
    /// with their request. Connections already taken keep theirs.
    pub fn set_tls(&self, config: Option<Arc<rustls::ServerConfig>>) {
        *lock(&self.tls) = config;
    }

    /// The TLS new connections get.
    pub fn tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        lock(&self.tls).clone()
    }

    /// How requests not there at the accept are waited for (see [`Wait`]).
    pub fn set_wait(&self, wait: Wait) {
        *lock(&self.wait) = wait;
    }

    /// How long a request, or a `/ws/twilio` opening after its 101, is waited for.
    pub fn wait_timeout(&self) -> Duration {
        lock(&self.wait).timeout
    }

    /// Starts waiting for the request of connection `id` on relay thread `worker`, unless no
    /// connection is waited for: the time to wait, its place among those waited for (until the
    /// guard is dropped) and, when that made too many, the oldest others to evict (see
    /// [`EVICT_AFTER`]).
    pub(crate) fn start_waiting(
        self: &Arc<Self>,
        id: u64,
        worker: usize,
    ) -> Option<(Duration, Waiting, Vec<Waiter>)> {
        let wait = *lock(&self.wait);
        if wait.most == 0 {
            return None;
        }
        let mut waited = lock(&self.waiting);
        // The newcomer is never the victim: it has had no time to send anything yet; nor is
        // any other so young (see EVICT_AFTER).
        let now = Instant::now();
        let victims = waited.victims(wait.most, now);
        waited.order.push_back(((id, worker), now));
        waited.live.insert(id);
        let waiting = Waiting {
            opener: self.clone(),
            id,
            told: false,
        };
        Some((wait.timeout, waiting, victims))
    }

    /// How long the connection waited for longest has waited (`None`: none is).
    pub(crate) fn oldest_wait(&self) -> Option<Duration> {
        let mut waited = lock(&self.waiting);
        waited.oldest_if(|_| false); // drops the settled ones in front, takes none
        let since = waited.order.front().map(|&(_, since)| since)?;
        Some(since.elapsed())
    }

    /// The connection waited for longest (no longer counted), for the caller to evict: the
    /// gateway is full and a newcomer waits for room.
    pub(crate) fn oldest_waiting(&self) -> Option<Waiter> {
        lock(&self.waiting).oldest()
    }

    /// Every connection waited for now (no longer counted), for the caller to evict.
    pub(crate) fn stop_waiting(&self) -> Vec<Waiter> {
        let mut waited = lock(&self.waiting);
        std::iter::from_fn(|| waited.oldest()).collect()
    }

    /// Connections whose request a relay thread waits for now.
    pub fn waiting(&self) -> usize {
        lock(&self.waiting).live.len()
    }

    /// Queues news for Python, ringing the doorbell.
    pub(crate) fn tell(&self, news: News) {
        self.shared.push(Item::Open(news));
    }

    /// Opens session `id` on relay thread `worker` if `read` (the request's whole head and what
    /// followed it) is one the route table serves and its agent has a place left; otherwise
    /// gives the client back. `prepared`: the client's socket options came from the listener.
    pub fn open(
        &self,
        routes: &Routes,
        client: Stream,
        read: &[u8],
        prepared: bool,
        (id, worker): (u64, usize),
    ) -> Verdict {
        if routes.is_empty() || read.is_empty() {
            return Verdict::Back(client);
        }
        let Some(upgrade) = upgrade::recognise(read) else {
            return Verdict::Back(client);
        };
        let Some(route) = routes.get(upgrade.service_host) else {
            return Verdict::Back(client);
        };
        // A token agent's token, checked as the Python path checks it; any refusal is its to
        // answer (403), so the token is left unused here.
        let checked = match &route.tokens {
            None => None,
            Some(tokens) => match check_token(tokens, &upgrade, &route.service_host) {
                Some(claims) => Some((tokens, claims)),
                None => return Verdict::Back(client),
            },
        };
        if !open::take(&route.place, route.max_sessions) {
            return Verdict::Back(client); // the Python path answers 503
        }
        let route = route.clone();
        let Ok(claimed) = claim(checked, &route.place) else {
            return Verdict::Back(client);
        };
        let start = Start {
            client_key: upgrade.key.to_owned(),
            body: upgrade.body,
            client_pending: read[upgrade.head_len..].to_vec(),
            answered: None,
            peek: upgrade.provider,
            claimed,
        };
        self.start(route, client, start, prepared, (id, worker))
    }

    /// Opens the session of a `/ws/twilio` stream answered 101 whose opening named `opening`'s
    /// service host, if the route table serves it without a token and its agent has a place
    /// left; otherwise gives the client back (Python answers it, with a close frame).
    pub fn open_answered(
        &self,
        client: Stream,
        (client_pending, answered): (Vec<u8>, open::Answered),
        (service_host, token): (&str, Option<&str>),
        prepared: bool,
        (id, worker): (u64, usize),
    ) -> Verdict {
        let routes = self.routes();
        let Some(route) = routes.get(service_host) else {
            return Verdict::Back(client);
        };
        // A token agent's token, checked as the Python path checks it once `start` names the
        // agent (no body on this endpoint); any refusal is Python's to answer.
        let checked = match (&route.tokens, token) {
            (None, _) => None, // a `none` agent: any token is not looked at
            (Some(tokens), Some(token)) => {
                let Ok(claims) = tokens.keys.verify(token, service_host, unix_now()) else {
                    return Verdict::Back(client);
                };
                if claims.check_body(None).is_err() {
                    return Verdict::Back(client);
                }
                Some((tokens, claims))
            }
            (Some(_), None) => return Verdict::Back(client),
        };
        if !open::take(&route.place, route.max_sessions) {
            return Verdict::Back(client);
        }
        let Ok(claimed) = claim(checked, &route.place) else {
            return Verdict::Back(client);
        };
        let start = Start {
            client_key: String::new(), // answered: no 101 to write
            body: None,
            client_pending,
            answered: Some(answered),
            peek: None,
            claimed,
        };
        self.start(route.clone(), client, start, prepared, (id, worker))
    }

    /// Dials the bot of a session whose place (and token) is taken; the place and the token are
    /// given back, and the client too, if the dial cannot start.
    fn start(
        &self,
        route: Arc<Route>,
        client: Stream,
        start: Start,
        prepared: bool,
        (id, worker): (u64, usize),
    ) -> Verdict {
        let Start {
            client_key,
            body,
            client_pending,
            answered,
            peek,
            claimed,
        } = start;
        // The bot's connect; a client given back if it cannot start (no descriptor left: the
        // Python path fails the same way, in its own words).
        let dpt = self.dead_peer_timeout;
        let dialled = connect(route.bot).and_then(|(bot, failed)| {
            // Non-blocking since its creation; the client's options came from the listener
            // when the engine accepted it (`prepared`).
            dialled_options(&socket2::SockRef::from(&bot), route.bot, dpt)?;
            if !prepared {
                prepare(client.socket(), dpt)?;
            }
            Ok((bot, failed))
        });
        let Ok((bot, failed)) = dialled else {
            open::give(&route.place);
            if let Some(c) = claimed {
                c.nonces.release(&c.nonce);
            }
            return Verdict::Back(client);
        };
        let hold = Arc::new(open::Hold::new(route.place.clone()));
        let Ok(live) = self.shared.register(id, worker, Some(hold.clone())) else {
            unreachable!("ids are unique");
        };
        let meter = self
            .counters
            .later(route.agent, Served::Upstream, worker, live);
        let o = open::Open {
            route,
            client_key,
            body,
            client_pending,
            answered,
            peek,
            meter,
            tell: self.tell.clone(),
            claimed,
            hold,
            connections: self.shared.connections(),
        };
        Verdict::Started(Box::new(Fast::new(
            id,
            client,
            Stream::plain(bot),
            failed,
            o,
        )))
    }
}

/// A session to dial, beside its route and its client.
struct Start {
    client_key: String,
    body: Option<crate::body::DecodedBody>,
    client_pending: Vec<u8>,
    answered: Option<open::Answered>,
    peek: Option<crate::opening::Provider>,
    claimed: Option<open::Claimed>,
}

/// A connection counted among those waited for, until dropped. Python counts it from its accept,
/// so it hears how it ended: opened (the session's own news), handed to it, or, if dropped
/// without either (the client gone, too slow, the engine stopping), gone.
pub struct Waiting {
    opener: Arc<Opener>,
    id: u64,
    told: bool,
}

impl Waiting {
    /// The opener it was counted by.
    pub fn opener(&self) -> &Arc<Opener> {
        &self.opener
    }

    /// Takes it out of those an eviction may pick, before it is opened: false if one picked it
    /// already (it is evicted then).
    pub fn claim(&self) -> bool {
        lock(&self.opener.waiting).live.remove(&self.id)
    }

    /// Whether it is still waited for (an eviction has not picked it; its stop may be on its
    /// way).
    pub fn is_live(&self) -> bool {
        lock(&self.opener.waiting).live.contains(&self.id)
    }

    /// It opened: its session's news tells Python.
    pub fn opened(mut self) {
        self.told = true;
    }

    /// A `/ws/twilio` stream answered 101 naming `session_uuid` (`None`: none, it has a token)
    /// goes to Python: the client (`None`: gone), its head and what it sent after it, the
    /// seconds since the 101 (all of `handshake_timeout`: none left), `evicted` if one too many
    /// were waited for.
    pub fn hand_answered(
        self,
        client: Option<Client>,
        peer: Option<SocketAddr>,
        read: Vec<u8>,
        (waited, evicted): (f64, bool),
        session_uuid: Option<String>,
    ) {
        // "": answered without an id (a token names its session).
        let answered = Some(session_uuid.unwrap_or_default());
        self.settle(client, peer, read, (waited, evicted), (None, answered));
    }

    /// It goes to Python: the client (`None`: gone, or `evicted`) and its TLS, what it sent
    /// and how long it was waited for.
    pub fn hand(
        self,
        client: Option<Client>,
        peer: Option<SocketAddr>,
        read: Vec<u8>,
        (waited, evicted): (f64, bool),
        tls_error: Option<String>,
    ) {
        self.settle(client, peer, read, (waited, evicted), (tls_error, None));
    }

    fn settle(
        mut self,
        client: Option<Client>,
        peer: Option<SocketAddr>,
        read: Vec<u8>,
        (waited, evicted): (f64, bool),
        (tls_error, answered): (Option<String>, Option<String>),
    ) {
        self.told = true;
        // No longer counted when Python hears of it.
        lock(&self.opener.waiting).settled(self.id);
        self.opener.tell(News::Handed {
            client,
            peer,
            read,
            waited,
            evicted,
            tls_error,
            answered,
        });
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        lock(&self.opener.waiting).settled(self.id);
        if !self.told {
            self.opener.tell(News::Handed {
                client: None,
                peer: None,
                read: Vec::new(),
                waited: 0.0,
                evicted: false,
                tls_error: None,
                answered: None,
            });
        }
    }
}

/// The claims of the token `upgrade` carries for `service_host`, if it passes every check the
/// Python path makes before using it up (signature, service host, expiry, body binding).
fn check_token(
    tokens: &open::Tokens,
    upgrade: &upgrade::Upgrade<'_>,
    service_host: &str,
) -> Option<crate::token::Claims> {
    let token = upgrade.token.as_ref().ok().copied().flatten()?;
    let claims = tokens.keys.verify(token, service_host, unix_now()).ok()?;
    let body = upgrade.body.as_ref().map(|b| b.json.as_bytes());
    claims.check_body(body).ok()?;
    Some(claims)
}

/// Uses up a checked token, after the capacity check as the Python path does (a 503 does not
/// burn it). `Err`: replayed (403) or the set full (503), its place given back.
fn claim(
    checked: Option<(&open::Tokens, crate::token::Claims)>,
    place: &std::sync::atomic::AtomicUsize,
) -> Result<Option<open::Claimed>, ()> {
    let Some((tokens, claims)) = checked else {
        return Ok(None);
    };
    let started = Instant::now();
    if tokens.nonces.claim(&claims.nonce, claims.exp, unix_now()) != Ok(true) {
        open::give(place);
        return Err(());
    }
    Ok(Some(open::Claimed {
        nonces: tokens.nonces.clone(),
        nonce: claims.nonce,
        calls: vec![started.elapsed().as_secs_f64()],
    }))
}

/// Unix seconds now, as tokens count them.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A non-blocking socket connecting to `addr`, and the connect's error if it failed at once.
fn connect(addr: SocketAddr) -> io::Result<(TcpStream, Option<io::Error>)> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.nonblocking(),
        None,
    )?;
    let failed = match sock.connect(&addr.into()) {
        Ok(()) => None,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => None,
        Err(e) => Some(e),
    };
    Ok((TcpStream::from(sock), failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waited(at: &[Instant]) -> Waited {
        let mut w = Waited::default();
        for (id, &since) in at.iter().enumerate() {
            w.order.push_back(((id as u64, 0), since));
            w.live.insert(id as u64);
        }
        w
    }

    #[test]
    fn past_the_most_the_oldest_are_evicted_once_they_have_waited_a_second() {
        let t0 = Instant::now();
        let quarter = EVICT_AFTER / 4;
        let mut w = waited(&[t0, t0 + quarter, t0 + 2 * quarter, t0 + 3 * quarter]);
        // Under the most, or all too young: nobody.
        assert_eq!(w.victims(5, t0 + EVICT_AFTER * 2), []);
        assert_eq!(w.victims(3, t0 + quarter), []);
        assert_eq!(w.live.len(), 4);
        // Those that have waited EVICT_AFTER, down to one less than the most (the newcomer's
        // place), not the younger ones.
        assert_eq!(w.victims(2, t0 + EVICT_AFTER + quarter), [(0, 0), (1, 0)]);
        assert_eq!(w.victims(2, t0 + EVICT_AFTER + quarter), []);
        // One settled meanwhile is skipped.
        w.settled(2);
        assert_eq!(w.victims(1, t0 + EVICT_AFTER * 2), [(3, 0)]);
        assert_eq!(w.victims(0, t0 + EVICT_AFTER * 2), []);
    }

    #[test]
    fn the_young_are_not_evicted_however_many_wait() {
        let t0 = Instant::now();
        let mut w = waited(&[t0; 50]);
        // Fifty young ones waited for, twenty-five times the most: none goes for its age.
        assert_eq!(w.victims(2, t0), []);
        assert_eq!(w.live.len(), 50);
        // Once they have waited EVICT_AFTER, a newcomer evicts them down to the most.
        let later = t0 + EVICT_AFTER;
        w.order.push_back(((99, 0), later));
        w.live.insert(99);
        assert_eq!(w.victims(2, later).len(), 50);
        assert_eq!(w.live.iter().collect::<Vec<_>>(), [&99]);
        assert_eq!(w.victims(1, later), []);
    }
}
