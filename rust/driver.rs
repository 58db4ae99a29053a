//! The one loop every session runs, whatever serves it: at each turn its relay thread gives it
//! (`shard.rs`), it feeds the session core ([`Session`]) what happened — a stop from the control
//! plane, its deadline, and the I/O its sockets' readiness allows ([`Io`]: `relay.rs`, `echo.rs`,
//! `inproc/`) — and hands the core's actions back to the I/O layer.
//!
//! One deadline per session: first the time limit, then, once the session is ending, the close
//! timeout. Nothing but the sockets is looked at per message: the stop and the deadline are a
//! field each, read once per turn.
//!
//! After each turn the loop publishes what the session carried to its agent's live counters
//! ([`Meter`]): a few relaxed atomic adds per turn, nothing per message.

use std::time::{Duration, Instant};

use crate::counters::{Meter, Tally};
use crate::limits::CLOSE_TIMEOUT;
use crate::session::{Action, Input, Outcome, Session};
use crate::shard::{Run, Task, BUDGET};
use crate::stream::Stream;

/// What one call to [`Io::step`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Something the session core must hear of.
    Input(Input),
    /// Bytes moved; there may be more to do.
    Progress,
    /// Nothing more can be done until an event on a socket (or mail for the session).
    Blocked,
}

/// The sockets of one kind of session, as the loop drives them.
pub trait Io {
    /// Whether anything is left to read, write or shut down.
    fn live(&self) -> bool;

    /// Does the next piece of I/O that the sockets' readiness allows, without waiting.
    fn step(&mut self) -> Step;

    /// Carries out one of the core's actions (never [`Action::Drop`]: the loop ends then).
    fn apply(&mut self, action: Action);

    /// Data messages and payload bytes carried so far, each way.
    fn tally(&self) -> Tally;

    /// Its sockets: 0 the client's, 1 the bot's when it has one.
    fn stream(&self, side: usize) -> Option<&Stream>;

    /// Once it is over: the client's socket, if it is to be read to its EOF ([`Task::linger`]).
    fn linger(&mut self) -> Option<Stream> {
        None
    }
}

/// A session with its I/O, as a relay thread runs it. See the module docs.
pub struct Driven<I> {
    session: Session,
    io: I,
    deadline: Option<Instant>,
    stop: Option<(u16, String)>,
    /// The core said to drop both connections.
    dropped: bool,
    meter: Meter,
}

/// Session `session` on `io`, ended by the gateway after `time_limit` if it has one; `meter`
/// hears of its traffic as it goes.
pub fn drive<I: Io>(
    session: Session,
    io: I,
    time_limit: Option<Duration>,
    meter: Meter,
) -> Driven<I> {
    Driven {
        session,
        io,
        deadline: time_limit.map(|t| Instant::now() + t),
        stop: None,
        dropped: false,
        meter,
    }
}

impl<I: Io> Driven<I> {
    fn feed(&mut self, input: Input) {
        for action in self.session.on(input) {
            if action == Action::Drop {
                self.dropped = true;
                break;
            }
            self.io.apply(action);
        }
        if self.session.take_closing() {
            self.deadline = Some(Instant::now() + CLOSE_TIMEOUT);
        }
    }
}

impl<I: Io + Send> Task for Driven<I> {
    fn stream(&self, side: usize) -> Option<&Stream> {
        self.io.stream(side)
    }

    fn linger(&mut self) -> Option<Stream> {
        self.io.linger()
    }

    fn run(&mut self, now: Instant) -> Run {
        if let Some((code, reason)) = self.stop.take() {
            self.feed(Input::Stop(code, reason));
        }
        if self.deadline.is_some_and(|d| d <= now) {
            self.deadline = None;
            self.feed(Input::Timer);
        }
        let mut run = Run::More;
        for _ in 0..BUDGET {
            if self.dropped || !self.io.live() {
                run = Run::Done;
                break;
            }
            match self.io.step() {
                Step::Input(input) => self.feed(input),
                Step::Progress => {}
                Step::Blocked => {
                    run = Run::Blocked;
                    break;
                }
            }
        }
        self.meter.publish(self.io.tally());
        run
    }

    fn stop(&mut self, code: u16, reason: String) {
        self.stop = Some((code, reason));
    }

    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    fn finish(self: Box<Self>) -> Outcome {
        let Driven {
            session,
            io,
            mut meter,
            ..
        } = *self;
        let mut outcome = session.into_outcome();
        let t = io.tally();
        meter.publish(t);
        (outcome.messages_in, outcome.bytes_in) = (t.messages_in, t.bytes_in);
        (outcome.messages_out, outcome.bytes_out) = (t.messages_out, t.bytes_out);
        outcome
    }
}
