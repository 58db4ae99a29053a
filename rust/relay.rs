//! A relayed session: a client (we are its server) and a bot (we are its client), both past
//! their handshakes, as two pumps. Client → bot frames are re-masked with our own keys, bot →
//! client frames pass unchanged; what closes mean is the session core's.

use crate::counters::{Meter, Tally};
use crate::driver::{self, Driven, Io, Step};
use crate::pump::Pump;
use crate::session::{Action, Kind, Limits, Session, Side, Transform};
use crate::stream::Stream;

/// The bytes each side sent past its handshake, read by the control plane already.
pub struct Pending {
    /// From the client, past its upgrade request.
    pub client: Vec<u8>,
    /// From the bot, past its 101.
    pub bot: Vec<u8>,
}

/// Session `id` relaying `client` and `bot` until it ends, for a relay thread to run.
pub fn session(
    id: u64,
    client: Stream,
    bot: Stream,
    pending: Pending,
    limits: Limits,
    meter: Meter,
) -> Driven<Pair> {
    let max = limits.max_message_size;
    let io = Pair {
        up: Pump::new(Transform::Remask, max, pending.client),
        down: Pump::new(Transform::Keep, max, pending.bot),
        client,
        bot,
        up_first: false,
    };
    driver::drive(Session::new(id, Kind::Relay), io, limits.time_limit, meter)
}

/// Both directions: `up` client → bot, `down` bot → client.
pub struct Pair {
    up: Pump,
    down: Pump,
    client: Stream,
    bot: Stream,
    /// Which pump the next step tries first: they take turns, so neither starves the other.
    up_first: bool,
}

impl Pair {
    /// The pump that writes to `side`.
    fn towards(&mut self, side: Side) -> &mut Pump {
        match side {
            Side::Client => &mut self.down,
            Side::Bot => &mut self.up,
        }
    }

    /// One step of the pump from `src` (`up`: the client's), if it has anything to do.
    fn step_one(&mut self, up: bool) -> Option<Step> {
        let (pump, src, dst, sides) = if up {
            let sides = (Side::Client, Side::Bot);
            (&mut self.up, &self.client, &self.bot, sides)
        } else {
            let sides = (Side::Bot, Side::Client);
            (&mut self.down, &self.bot, &self.client, sides)
        };
        if !pump.has_work(src, dst) {
            return None;
        }
        match pump.step(src, dst).step(sides.0, sides.1) {
            Step::Blocked => None,
            step => Some(step),
        }
    }
}

impl Io for Pair {
    fn live(&self) -> bool {
        self.up.wants_poll(&self.bot) || self.down.wants_poll(&self.client)
    }

    fn step(&mut self) -> Step {
        let first = self.up_first;
        self.up_first = !first;
        self.step_one(first)
            .or_else(|| self.step_one(!first))
            .unwrap_or(Step::Blocked)
    }

    fn apply(&mut self, action: Action) {
        match action {
            Action::Close {
                to,
                code,
                reason,
                then_shutdown,
            } => self.towards(to).queue_close(code, &reason, then_shutdown),
            Action::Shutdown(side) => self.towards(side).shutdown_dst(),
            Action::Abandon(side) => self.towards(side).abandon_dst(),
            Action::Drop => {}
        }
    }

    fn tally(&self) -> Tally {
        let (messages_in, bytes_in) = self.up.counts();
        let (messages_out, bytes_out) = self.down.counts();
        Tally {
            messages_in,
            bytes_in,
            messages_out,
            bytes_out,
        }
    }

    fn stream(&self, side: usize) -> Option<&Stream> {
        match side {
            0 => Some(&self.client),
            1 => Some(&self.bot),
            _ => None,
        }
    }
}
