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
//! session (at its start) and once per scrape.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, PoisonError, RwLock};

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
}

/// What one agent's counters held when read.
#[derive(Clone, Debug, PartialEq, Eq)]
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
                Snapshot {
                    name: a.name.clone(),
                    opened: a.opened.load(Relaxed),
                    active_upstream: active(Served::Upstream),
                    active_inprocess: active(Served::InProcess),
                    active_builtin: active(Served::Builtin),
                    tally,
                }
            })
            .collect()
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

    #[test]
    fn shards_keep_threads_off_each_others_cache_lines() {
        assert_eq!(std::mem::align_of::<Shard>(), 128);
        assert_eq!(std::mem::size_of::<Shard>(), 128);
    }
}
