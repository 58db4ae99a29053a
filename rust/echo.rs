//! The built-in echo bot: one pump from the client back to itself. Frames come back unmasked, a
//! ping as a pong, the client's close as the bot's reply.

use crate::counters::{Meter, Tally};
use crate::driver::{self, Driven, Io, Step};
use crate::pump::Pump;
use crate::session::{Action, Kind, Limits, Session, Side, Transform};
use crate::stream::Stream;

/// Session `id` serving `client` until it ends, for a relay thread to run. `pending`: what the
/// client sent past its upgrade request.
pub fn session(
    id: u64,
    client: Stream,
    pending: Vec<u8>,
    limits: Limits,
    meter: Meter,
) -> Driven<impl Io + Send> {
    let pump = Pump::new(Transform::Echo, limits.max_message_size, pending);
    let io = Echo { pump, client };
    driver::drive(Session::new(id, Kind::Echo), io, limits.time_limit, meter)
}

struct Echo {
    pump: Pump,
    client: Stream,
}

impl Io for Echo {
    fn live(&self) -> bool {
        self.pump.wants_poll(&self.client)
    }

    fn step(&mut self) -> Step {
        // The client is both ends of the pump.
        let ev = self.pump.step(&self.client, &self.client);
        ev.step(Side::Client, Side::Client)
    }

    fn apply(&mut self, action: Action) {
        // The core sends an echo session's actions to the client only.
        match action {
            Action::Close {
                code,
                reason,
                then_shutdown,
                ..
            } => self.pump.queue_close(code, &reason, then_shutdown),
            Action::Shutdown(_) => self.pump.shutdown_dst(),
            Action::Abandon(_) => self.pump.abandon_dst(),
            Action::Drop => {}
        }
    }

    fn tally(&self) -> Tally {
        let (messages, bytes) = self.pump.counts();
        Tally {
            messages_in: messages,
            bytes_in: bytes,
            messages_out: messages,
            bytes_out: bytes,
        }
    }

    fn stream(&self, side: usize) -> Option<&Stream> {
        (side == 0).then_some(&self.client)
    }
}
