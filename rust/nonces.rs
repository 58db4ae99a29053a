//! Spent token nonces in this process (SPEC §3's replay store, in memory): a set whose entries
//! leave when their token expires. One set serves the Python path (`replay.MemoryReplayStore`)
//! and the sessions the engine opens by itself (`open.rs`), so a token is used once whichever
//! path its session takes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Mutex, PoisonError};

/// The set is full: more live tokens than it may hold (the caller fails closed: 503).
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

#[derive(Default)]
struct Set {
    /// nonce -> (exp, claimed). A released nonce stays, unclaimed, until it expires: it keeps
    /// its one heap entry, so claim-release cycles add nothing.
    entries: HashMap<String, (u64, bool)>,
    /// (exp, nonce) in expiry order: expired entries are dropped from the front.
    heap: BinaryHeap<Reverse<(u64, String)>>,
}

/// Spent nonces, at most `max_entries` live at once. See the module docs.
pub struct Nonces {
    set: Mutex<Set>,
    max_entries: usize,
}

impl Nonces {
    /// An empty set holding at most `max_entries` nonces.
    pub fn new(max_entries: usize) -> Self {
        Self {
            set: Mutex::new(Set::default()),
            max_entries: max_entries.max(1),
        }
    }

    fn set(&self) -> std::sync::MutexGuard<'_, Set> {
        self.set.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Uses up `nonce` (its token expires at `exp`) at Unix second `now`: true the first time
    /// (or after a [`release`](Self::release)), false once used.
    ///
    /// # Errors
    ///
    /// [`Full`] when `max_entries` live nonces are held already.
    pub fn claim(&self, nonce: &str, exp: u64, now: u64) -> Result<bool, Full> {
        let mut set = self.set();
        // A token is refused from second `exp` on (`token.rs`), so its nonce can go then.
        while let Some(Reverse((t, _))) = set.heap.peek() {
            if *t > now {
                break;
            }
            let Some(Reverse((_, gone))) = set.heap.pop() else {
                break;
            };
            set.entries.remove(&gone);
        }
        if let Some(entry) = set.entries.get_mut(nonce) {
            if entry.1 {
                return Ok(false);
            }
            entry.1 = true;
            return Ok(true);
        }
        if set.entries.len() >= self.max_entries {
            return Err(Full);
        }
        set.entries.insert(nonce.to_owned(), (exp, true));
        set.heap.push(Reverse((exp, nonce.to_owned())));
        Ok(true)
    }

    /// Gives back a claimed nonce whose session did not start: its token may be used again.
    pub fn release(&self, nonce: &str) {
        if let Some(entry) = self.set().entries.get_mut(nonce) {
            entry.1 = false;
        }
    }

    /// Nonces claimed now (expired ones included until the next claim).
    pub fn len(&self) -> usize {
        self.set()
            .entries
            .values()
            .filter(|(_, claimed)| *claimed)
            .count()
    }

    /// Entries held now: claimed nonces, and released ones until they expire.
    pub fn entries(&self) -> usize {
        self.set().entries.len()
    }

    /// Whether none is claimed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every nonce.
    pub fn clear(&self) {
        let mut set = self.set();
        set.entries.clear();
        set.heap.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_is_used_once_until_released_and_leaves_at_its_expiry() {
        let n = Nonces::new(10);
        assert_eq!(n.claim("a", 100, 50), Ok(true));
        assert_eq!(n.claim("a", 100, 60), Ok(false));
        n.release("a");
        assert_eq!(n.claim("a", 100, 70), Ok(true));
        assert_eq!(n.len(), 1);
        // At its expiry it leaves: a token with it would be refused as expired before this.
        assert_eq!(n.claim("b", 200, 100), Ok(true));
        assert_eq!(n.len(), 1, "a is gone");
    }

    #[test]
    fn a_full_set_refuses_new_nonces_and_frees_room_as_they_expire() {
        let n = Nonces::new(2);
        assert_eq!(n.claim("a", 10, 0), Ok(true));
        assert_eq!(n.claim("b", 20, 0), Ok(true));
        assert_eq!(n.claim("c", 30, 5), Err(Full));
        assert_eq!(n.claim("c", 30, 10), Ok(true), "a expired at 10");
    }
}
