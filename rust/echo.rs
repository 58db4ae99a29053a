//! The built-in echo bot: one pump from the client back to itself. Frames come back unmasked, a
//! ping as a pong, the client's close as the bot's reply.

use std::future::Future;

use crate::counters::{Meter, Tally};
use crate::driver::{self, Commands, Io};
use crate::pump::Pump;
use crate::session::{Action, Input, Kind, Limits, Outcome, Session, Side, Transform};
use crate::stream::Stream;

/// Serves session `id`'s client until the session ends. `pending`: what the client sent past
/// its upgrade request.
pub fn run(
    id: u64,
    client: &Stream,
    pending: Vec<u8>,
    limits: Limits,
    commands: Commands,
    meter: Meter,
) -> impl Future<Output = Outcome> + '_ {
    let pump = Pump::new(
        client,
        client,
        Transform::Echo,
        limits.max_message_size,
        pending,
    );
    let io = Echo { pump };
    driver::run(
        Session::new(id, Kind::Echo),
        io,
        limits.time_limit,
        commands,
        meter,
    )
}

struct Echo<'a> {
    pump: Pump<'a>,
}

impl Io for Echo<'_> {
    fn live(&self) -> bool {
        self.pump.wants_poll()
    }

    async fn step(&mut self) -> Option<Input> {
        // The client is both ends of the pump.
        self.pump.step().await.input(Side::Client, Side::Client)
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
}
