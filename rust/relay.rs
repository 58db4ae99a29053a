//! A relayed session: a client (we are its server) and a bot (we are its client), both past
//! their handshakes, as two pumps. Client → bot frames are re-masked with our own keys, bot →
//! client frames pass unchanged; what closes mean is the session core's.

use std::future::Future;

use crate::counters::{Meter, Tally};
use crate::driver::{self, Commands, Io};
use crate::pump::Pump;
use crate::session::{Action, Input, Kind, Limits, Outcome, Session, Side, Transform};
use crate::stream::Stream;

/// The bytes each side sent past its handshake, read by the control plane already.
pub struct Pending {
    /// From the client, past its upgrade request.
    pub client: Vec<u8>,
    /// From the bot, past its 101.
    pub bot: Vec<u8>,
}

/// Relays session `id` until it ends. (A plain `fn` returning the driver's future, so that the
/// pumps are not kept twice in it: see `driver::run`.)
pub fn run<'a>(
    id: u64,
    client: &'a Stream,
    bot: &'a Stream,
    pending: Pending,
    limits: Limits,
    commands: Commands,
    meter: Meter,
) -> impl Future<Output = Outcome> + 'a {
    let max = limits.max_message_size;
    let io = Pair {
        up: Pump::new(client, bot, Transform::Remask, max, pending.client),
        down: Pump::new(bot, client, Transform::Keep, max, pending.bot),
    };
    driver::run(
        Session::new(id, Kind::Relay),
        io,
        limits.time_limit,
        commands,
        meter,
    )
}

/// Both directions: `up` client → bot, `down` bot → client.
struct Pair<'a> {
    up: Pump<'a>,
    down: Pump<'a>,
}

impl<'a> Pair<'a> {
    /// The pump that writes to `side`.
    fn towards(&mut self, side: Side) -> &mut Pump<'a> {
        match side {
            Side::Client => &mut self.down,
            Side::Bot => &mut self.up,
        }
    }
}

impl Io for Pair<'_> {
    fn live(&self) -> bool {
        self.up.wants_poll() || self.down.wants_poll()
    }

    async fn step(&mut self) -> Option<Input> {
        tokio::select! {
            ev = self.up.step(), if self.up.wants_poll() => ev.input(Side::Client, Side::Bot),
            ev = self.down.step(), if self.down.wants_poll() => ev.input(Side::Bot, Side::Client),
        }
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
}
