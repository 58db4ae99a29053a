//! Live counters per agent, read when the control plane is scraped for metrics: sessions opened,
//! sessions active by what serves them, and data messages and payload bytes each way; and each
//! live session's own messages and bytes ([`Live`]), read when its agent's sessions are listed.
//!
//! An agent is registered once ([`Counters::register`]) and named by its index from then on.
//! Each session holds a [`Meter`] on its agent's counters; the session loop (`driver.rs`)
//! publishes what the session's I/O counted since its last turn. So nothing is done per message,
//! and per turn of the loop (one read) at most four relaxed atomic adds, on a cache line that only
//! the session's own worker thread writes: every agent has one shard per worker thread, summed when
//! read. No lock and no allocation after registration; the registry's lock is taken once per
//! session (at its start; twice for a session the engine opened) and once per scrape.
//!
//! The sessions the engine opens by itself (`open.rs`) are also counted here as they end, and
//! their dials as they succeed ([`AgentEnds`]): the histograms and the close counts that the
//! control plane keeps for the sessions it handed over, so that Python does nothing per
//! session for them but log its line. One lock of the agent's per dial and per end, held for
//! a few additions.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use crate::session::{EndedBy, Outcome};

/// Upper bounds, in seconds, of the histogram of bot dials (`_core.DIAL_BUCKETS`, the
/// metrics' buckets for every dial): milliseconds nearby, up to `dial_timeout`.
pub const DIAL_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Upper bounds, in seconds, of the histogram of session durations (`_core.DURATION_BUCKETS`):
/// voice calls last seconds to hours.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
];
/// Kinds of end ([`EndKind`]) kept apart per agent; past it, a gateway's end is kept without
/// its reason (an error, to the metrics). A client cannot add kinds (see [`EndKind`]); only an
/// embedder closing sessions with reasons of its own could, and this bounds what that keeps.
const MAX_END_KINDS: usize = 64;

/// What serves a session, as the metrics name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// A bot the gateway dialled (a relayed session).
    Upstream,
    /// A Python bot in the gateway's process.
    InProcess,
    /// The built-in echo bot.
    Builtin,
}

impl Served {
    fn index(self) -> usize {
        match self {
            Self::Upstream => 0,
            Self::InProcess => 1,
            Self::Builtin => 2,
        }
    }
}

/// Data messages and payload bytes a session has carried so far, each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Data messages client → bot.
    pub messages_in: u64,
    /// Payload bytes client → bot.
    pub bytes_in: u64,
    /// Data messages bot → client.
    pub messages_out: u64,
    /// Payload bytes bot → client.
    pub bytes_out: u64,
}

impl Tally {
    fn add(&mut self, other: &Self) {
        self.messages_in += other.messages_in;
        self.bytes_in += other.bytes_in;
        self.messages_out += other.messages_out;
        self.bytes_out += other.bytes_out;
    }
}

/// One worker thread's share of an agent's traffic, alone on its cache lines (128 bytes: two
/// lines, as the adjacent-line prefetcher of x86 fetches them in pairs) so that threads never
/// write to the same one.
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    messages_in: AtomicU64,
    bytes_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_out: AtomicU64,
}

impl Shard {
    fn read(&self) -> Tally {
        Tally {
            messages_in: self.messages_in.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            messages_out: self.messages_out.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
        }
    }
}

/// One live session's messages and bytes so far, each way: what its [`Meter`] published last.
/// Written only by the session's own worker thread (relaxed stores of the totals, so a reader
/// never sees a sum half-made), read by whoever lists sessions.
#[derive(Default)]
pub struct Live {
    messages_in: AtomicU64,
    bytes_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_out: AtomicU64,
}

impl Live {
    /// What the session had carried when its meter last published.
    pub fn read(&self) -> Tally {
        Tally {
            messages_in: self.messages_in.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            messages_out: self.messages_out.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
        }
    }

    fn store(&self, t: Tally) {
        self.messages_in.store(t.messages_in, Relaxed);
        self.bytes_in.store(t.bytes_in, Relaxed);
        self.messages_out.store(t.messages_out, Relaxed);
        self.bytes_out.store(t.bytes_out, Relaxed);
    }
}

/// Adds `now - before` to `counter`, if anything changed.
fn bump(counter: &AtomicU64, now: u64, before: u64) {
    if now != before {
        counter.fetch_add(now.wrapping_sub(before), Relaxed);
    }
}

struct Agent {
    name: String,
    opened: AtomicU64,
    /// Live sessions by [`Served::index`].
    active: [AtomicU64; 3],
    shards: Box<[Shard]>,
    /// Dials and ends of the sessions the engine opened by itself.
    ends: Mutex<Ends>,
}

/// Observations in buckets: `counts[i]` those at most `bounds[i]` and above the bound before,
/// the last those above every bound; and their sum.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// One more than the bounds (empty until the first observation).
    pub counts: Vec<u64>,
    /// The sum of the values observed.
    pub sum: f64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], value: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; bounds.len() + 1];
        }
        self.counts[bounds.partition_point(|&b| b < value)] += 1;
        self.sum += value;
    }
}

/// How a session ended, as the metrics tell ends apart: who ended it, its close code as its
/// label keeps it (1000-1015 as they are, 3000 for any 3xxx, 4000 for any 4xxx, 0 for any
/// other), and for the gateway's own ends with 1000 or 1001 the reason, which tells a time
/// limit, a drain or a stop (the control plane's closes) from an error (Python names the
/// `ended_by` label from these: `metrics._ended_by`). Any other end of the gateway's is told
/// by its code alone (1009: a limit; else an error): its reason is a broken rule's, and may
/// hold what a client chose (a message's declared size, an opcode), so it is not kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndKind {
    /// Who ended it.
    pub ended_by: EndedBy,
    /// Its close code's class.
    pub code: u16,
    /// The gateway's reason (empty for a client's or a bot's end).
    pub detail: String,
}

impl EndKind {
    /// `outcome`'s code class, and the reason that counts (see above; `""`: none).
    fn of(outcome: &Outcome) -> (u16, &str) {
        let code = match outcome.code {
            c @ 1000..=1015 => c,
            3000..=3999 => 3000,
            4000..=4999 => 4000,
            _ => 0,
        };
        let told = outcome.ended_by == EndedBy::Gateway && matches!(code, 1000 | 1001);
        (code, if told { &outcome.detail } else { "" })
    }

    fn is(&self, ended_by: EndedBy, code: u16, detail: &str) -> bool {
        (self.ended_by, self.code, self.detail.as_str()) == (ended_by, code, detail)
    }
}

#[derive(Default)]
struct Ends {
    dials: Histogram,
    durations: Histogram,
    closed: Vec<(EndKind, u64)>,
}

impl Ends {
    fn ended(&mut self, outcome: &Outcome, seconds: f64) {
        self.durations.observe(&DURATION_BUCKETS, seconds);
        let by = outcome.ended_by;
        let (code, mut detail) = EndKind::of(outcome);
        let find = |d: &str| self.closed.iter().position(|(k, _)| k.is(by, code, d));
        let mut same = find(detail);
        if same.is_none() && self.closed.len() >= MAX_END_KINDS {
            detail = "";
            same = find(detail);
        }
        match same {
            Some(i) => self.closed[i].1 += 1,
            None => self.closed.push((
                EndKind {
                    ended_by: by,
                    code,
                    detail: detail.to_owned(),
                },
                1,
            )),
        }
    }
}

/// A session's hold on its agent's [`Ends`] (a session the engine opened by itself).
pub struct AgentEnds(Arc<Agent>);

impl AgentEnds {
    /// Its bot answered 101, `seconds` after the dial began.
    pub fn dialled(&self, seconds: f64) {
        self.0.ends().dials.observe(&DIAL_BUCKETS, seconds);
    }

    /// It ended with `outcome`, `seconds` after it opened.
    pub fn ended(&self, outcome: &Outcome, seconds: f64) {
        self.0.ends().ended(outcome, seconds);
    }
}

impl Agent {
    fn ends(&self) -> std::sync::MutexGuard<'_, Ends> {
        self.ends.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What one agent's counters held when read.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// The name it was registered with.
    pub name: String,
    /// Sessions started so far.
    pub opened: u64,
    /// Live sessions served by a dialled bot.
    pub active_upstream: u64,
    /// Live sessions served by an in-process bot.
    pub active_inprocess: u64,
    /// Live sessions served by the built-in echo bot.
    pub active_builtin: u64,
    /// Messages and bytes so far, each way, of ended and live sessions.
    pub tally: Tally,
    /// The dials of the sessions the engine opened by itself.
    pub dials: Histogram,
    /// How long those lasted, of those ended.
    pub durations: Histogram,
    /// How those ended, and how many ended so.
    pub closed: Vec<(EndKind, u64)>,
}

/// Every registered agent's counters. See the module docs.
pub struct Counters {
    agents: RwLock<Vec<Arc<Agent>>>,
    shards: usize,
}

impl Counters {
    /// Counters for sessions spread over `shards` worker threads.
    pub fn new(shards: usize) -> Self {
        Self {
            agents: RwLock::new(Vec::new()),
            shards: shards.max(1),
        }
    }

    /// The index of the agent called `name`, registered now if it is new.
    pub fn register(&self, name: &str) -> usize {
        let mut agents = self.agents.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = agents.iter().position(|a| a.name == name) {
            return i;
        }
        agents.push(Arc::new(Agent {
            name: name.to_owned(),
            opened: AtomicU64::new(0),
            active: Default::default(),
            shards: (0..self.shards).map(|_| Shard::default()).collect(),
            ends: Mutex::default(),
        }));
        agents.len() - 1
    }

    /// Whether `index` names a registered agent (or is `None`: no agent).
    pub fn knows(&self, index: Option<usize>) -> bool {
        let agents = self.agents.read().unwrap_or_else(PoisonError::into_inner);
        index.map_or(true, |i| i < agents.len())
    }

    /// A meter for a session of agent `index` served as `served` on worker thread `shard`: it
    /// counts the session as opened, and as active until it is dropped. A session of no agent
    /// (`None`, or an index never registered: see [`knows`](Self::knows)) is not counted.
    pub fn meter(&self, index: Option<usize>, served: Served, shard: usize) -> Meter {
        let agents = self.agents.read().unwrap_or_else(PoisonError::into_inner);
        let Some(agent) = index.and_then(|i| agents.get(i)) else {
            return Meter::none();
        };
        agent.opened.fetch_add(1, Relaxed);
        agent.active[served.index()].fetch_add(1, Relaxed);
        Meter {
            counted: Some((agent.clone(), shard % self.shards)),
            served,
            published: Tally::default(),
            live: None,
        }
    }

    /// The dials and ends of agent `index`, for a session the engine opened by itself (`None`:
    /// not counted, as [`meter`](Self::meter)).
    pub fn ends(&self, index: Option<usize>) -> Option<AgentEnds> {
        let agents = self.agents.read().unwrap_or_else(PoisonError::into_inner);
        index
            .and_then(|i| agents.get(i))
            .map(|a| AgentEnds(a.clone()))
    }

    /// What makes the meter of a session of agent `index` served as `served` on worker thread
    /// `shard`, publishing to `live`, once the session is counted (a session the engine opens:
    /// once it is relayed); as [`meter`](Self::meter) then.
    pub fn later(
        self: &Arc<Self>,
        index: Option<usize>,
        served: Served,
        shard: usize,
        live: Arc<Live>,
    ) -> Later {
        Later {
            counters: self.clone(),
            index,
            served,
            shard,
            live,
        }
    }

    /// Every agent's counters, in the order they were registered.
    pub fn snapshot(&self) -> Vec<Snapshot> {
        let agents = self.agents.read().unwrap_or_else(PoisonError::into_inner);
        agents
            .iter()
            .map(|a| {
                let mut tally = Tally::default();
                for shard in a.shards.iter() {
                    tally.add(&shard.read());
                }
                let active = |s: Served| a.active[s.index()].load(Relaxed);
                let ends = a.ends();
                Snapshot {
                    name: a.name.clone(),
                    opened: a.opened.load(Relaxed),
                    active_upstream: active(Served::Upstream),
                    active_inprocess: active(Served::InProcess),
                    active_builtin: active(Served::Builtin),
                    tally,
                    dials: ends.dials.clone(),
                    durations: ends.durations.clone(),
                    closed: ends.closed.clone(),
                }
            })
            .collect()
    }
}

/// A session's meter, to be made when it is counted ([`Counters::later`]).
pub struct Later {
    counters: Arc<Counters>,
    index: Option<usize>,
    served: Served,
    shard: usize,
    live: Arc<Live>,
}

impl Later {
    /// Where the session's dial and end are counted, if it is the engine's own (see
    /// [`Counters::ends`]).
    pub fn ends(&self) -> Option<AgentEnds> {
        self.counters.ends(self.index)
    }

    /// The meter, counting the session from now on.
    pub fn meter(self) -> Meter {
        let m = self.counters.meter(self.index, self.served, self.shard);
        m.showing(self.live)
    }
}

/// One session's hold on its agent's counters: it adds what the session carried as the
/// session goes, and counts the session as no longer active when dropped. It also keeps the
/// session's own [`Live`] totals, if it was given one ([`showing`](Self::showing)).
pub struct Meter {
    counted: Option<(Arc<Agent>, usize)>,
    served: Served,
    published: Tally,
    live: Option<Arc<Live>>,
}

impl Meter {
    /// A meter that counts nothing (a session of no registered agent).
    pub fn none() -> Self {
        Self {
            counted: None,
            served: Served::Upstream,
            published: Tally::default(),
            live: None,
        }
    }

    /// The same meter, also publishing the session's totals to `live`.
    #[must_use]
    pub fn showing(mut self, live: Arc<Live>) -> Self {
        self.live = Some(live);
        self
    }

    /// The session has carried `now` in all: adds what is new since the last call.
    #[inline]
    pub fn publish(&mut self, now: Tally) {
        let before = self.published;
        if now == before {
            return;
        }
        if let Some(live) = &self.live {
            live.store(now);
        }
        if let Some((agent, shard)) = &self.counted {
            let s = &agent.shards[*shard];
            bump(&s.messages_in, now.messages_in, before.messages_in);
            bump(&s.bytes_in, now.bytes_in, before.bytes_in);
            bump(&s.messages_out, now.messages_out, before.messages_out);
            bump(&s.bytes_out, now.bytes_out, before.bytes_out);
        }
        self.published = now;
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if let Some((agent, _)) = &self.counted {
            agent.active[self.served.index()].fetch_sub(1, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(messages_in: u64, bytes_in: u64, messages_out: u64, bytes_out: u64) -> Tally {
        Tally {
            messages_in,
            bytes_in,
            messages_out,
            bytes_out,
        }
    }

    #[test]
    fn an_agent_registered_twice_keeps_its_index() {
        let c = Counters::new(2);
        assert_eq!(c.register("a.o"), 0);
        assert_eq!(c.register("b.o"), 1);
        assert_eq!(c.register("a.o"), 0);
        assert_eq!(c.snapshot().len(), 2);
    }

    #[test]
    fn a_meter_counts_its_session_active_until_dropped_and_its_traffic_once() {
        let c = Counters::new(2);
        let a = c.register("a.o");
        let mut m1 = c.meter(Some(a), Served::Upstream, 0);
        let mut m2 = c.meter(Some(a), Served::InProcess, 1);
        m1.publish(tally(1, 10, 0, 0));
        m1.publish(tally(3, 30, 1, 5));
        m1.publish(tally(3, 30, 1, 5));
        m2.publish(tally(2, 2, 2, 2));
        let s = &c.snapshot()[0];
        assert_eq!((s.opened, s.active_upstream, s.active_inprocess), (2, 1, 1));
        assert_eq!(s.tally, tally(5, 32, 3, 7));
        drop(m1);
        drop(m2);
        let s = &c.snapshot()[0];
        assert_eq!((s.opened, s.active_upstream, s.active_inprocess), (2, 0, 0));
        assert_eq!(s.tally, tally(5, 32, 3, 7), "totals outlive their sessions");
    }

    #[test]
    fn sessions_of_no_agent_are_not_counted_and_unknown_agents_are_refused() {
        let c = Counters::new(1);
        let mut m = c.meter(None, Served::Builtin, 0);
        m.publish(tally(1, 1, 1, 1));
        assert!(c.knows(None));
        assert!(!c.knows(Some(0)));
        drop(c.meter(Some(0), Served::Builtin, 0));
        assert!(c.snapshot().is_empty());
    }

    #[test]
    fn a_sessions_live_totals_follow_its_meter_with_or_without_an_agent() {
        let c = Counters::new(1);
        let a = c.register("a.o");
        let (counted, alone) = (Arc::new(Live::default()), Arc::new(Live::default()));
        let mut m1 = c
            .meter(Some(a), Served::Upstream, 0)
            .showing(counted.clone());
        let mut m2 = Meter::none().showing(alone.clone());
        m1.publish(tally(1, 10, 0, 0));
        m1.publish(tally(2, 15, 1, 4));
        m2.publish(tally(7, 70, 6, 60));
        assert_eq!(
            counted.read(),
            tally(2, 15, 1, 4),
            "totals, not what was added last"
        );
        assert_eq!(alone.read(), tally(7, 70, 6, 60));
        assert_eq!(c.snapshot()[0].tally, tally(2, 15, 1, 4));
        drop(m1);
        assert_eq!(
            counted.read(),
            tally(2, 15, 1, 4),
            "still readable by whoever holds it"
        );
    }

    fn ended(by: EndedBy, code: u16, detail: &str) -> Outcome {
        let mut o = Outcome::new(1);
        (o.ended_by, o.code, o.detail) = (by, code, detail.into());
        o
    }

    #[test]
    fn a_histogram_puts_a_value_on_a_bound_in_that_bounds_bucket() {
        let mut h = Histogram::default();
        for v in [0.0005, 0.001, 0.0011, 10.0, 10.5] {
            h.observe(&DIAL_BUCKETS, v);
        }
        let mut want = vec![0; DIAL_BUCKETS.len() + 1];
        (want[0], want[1], want[12], want[13]) = (2, 1, 1, 1);
        assert_eq!(h.counts, want);
        assert!((h.sum - 20.5026).abs() < 1e-9);
    }

    #[test]
    fn an_engine_sessions_dial_and_end_are_counted_by_kind_of_end() {
        let c = Counters::new(1);
        let a = c.register("a.o");
        assert!(c.ends(None).is_none() && c.ends(Some(1)).is_none());
        let ends = c.ends(Some(a)).expect("registered");
        ends.dialled(0.002);
        ends.ended(&ended(EndedBy::Client, 1000, "client closed"), 2.0);
        ends.ended(&ended(EndedBy::Client, 1000, "client closed again"), 3.0);
        ends.ended(&ended(EndedBy::Bot, 4321, "bot closed"), 0.1);
        ends.ended(&ended(EndedBy::Bot, 4999, "bot closed"), 0.1);
        ends.ended(&ended(EndedBy::Gateway, 1000, "session stopped"), 20000.0);
        ends.ended(&ended(EndedBy::Client, 2000, ""), 1.0);
        ends.ended(
            &ended(EndedBy::Gateway, 1009, "client: message of 2001 bytes"),
            1.0,
        );
        ends.ended(
            &ended(EndedBy::Gateway, 1009, "client: message of 2002 bytes"),
            1.0,
        );
        let s = &c.snapshot()[0];
        assert_eq!(s.dials.counts.iter().sum::<u64>(), 1);
        assert_eq!(s.dials.counts[1], 1, "0.002 s: at most 0.0025");
        assert_eq!(s.durations.counts.iter().sum::<u64>(), 8);
        assert_eq!(s.durations.counts[DURATION_BUCKETS.len()], 1, "past 4 h");
        let kind = |ended_by, code, detail: &str| EndKind {
            ended_by,
            code,
            detail: detail.into(),
        };
        assert_eq!(
            s.closed,
            vec![
                (kind(EndedBy::Client, 1000, ""), 2),
                (kind(EndedBy::Bot, 4000, ""), 2),
                (kind(EndedBy::Gateway, 1000, "session stopped"), 1),
                (kind(EndedBy::Client, 0, ""), 1),
                (kind(EndedBy::Gateway, 1009, ""), 2),
            ],
            "a peer's reason is not kept, nor a broken rule's; codes by their label's class"
        );
    }

    #[test]
    fn the_kinds_of_end_kept_are_bounded() {
        let c = Counters::new(1);
        let ends = c.ends(Some(c.register("a.o"))).expect("registered");
        for i in 0..(MAX_END_KINDS + 10) {
            ends.ended(&ended(EndedBy::Gateway, 1000, &format!("reason {i}")), 1.0);
        }
        let closed = &c.snapshot()[0].closed;
        assert_eq!(closed.len(), MAX_END_KINDS + 1);
        assert_eq!(closed.iter().map(|(_, n)| n).sum::<u64>(), 74);
        let last = &closed[MAX_END_KINDS];
        assert_eq!(
            (last.0.detail.as_str(), last.1),
            ("", 10),
            "without its reason"
        );
    }

    #[test]
    fn shards_keep_threads_off_each_others_cache_lines() {
        assert_eq!(std::mem::align_of::<Shard>(), 128);
        assert_eq!(std::mem::size_of::<Shard>(), 128);
    }
}
