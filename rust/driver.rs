//! The one loop every session runs, whatever serves it: it waits for the first of a command from
//! the control plane, the session's timer and the next I/O event, feeds it to the session core
//! ([`Session`]) and hands the core's actions back to the I/O layer ([`Io`]: `relay.rs`,
//! `echo.rs`, `inproc.rs`).
//!
//! One timer per session, created once and reset rather than a fresh `Sleep` per turn: first the
//! time limit, then, once the session is ending, the close timeout.
//!
//! After each turn the loop publishes what the session carried to its agent's live counters
//! ([`Meter`]): a few relaxed atomic adds per read, nothing per message.

use std::future::Future;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::{sleep_until, Instant};

use crate::counters::{Meter, Tally};
use crate::limits::CLOSE_TIMEOUT;
use crate::session::{Action, Input, Outcome, Session};

/// A request from the control plane to a live session.
#[derive(Debug)]
pub enum Command {
    /// Close both sides with this code and reason.
    Close(u16, String),
}

/// Where a session hears of its command: one at most, as a session stops only once (a second
/// stop would change nothing). A oneshot channel is ~100 bytes where an unbounded one allocates
/// a block of 32 slots up front (~1.5 KB): most of what an idle session held.
pub type Commands = oneshot::Receiver<Command>;

/// The sockets of one kind of session, as the loop drives them.
pub trait Io {
    /// Whether anything is left to read, write or shut down.
    fn live(&self) -> bool;

    /// Waits for the next I/O and does it: what the session core must hear of, or `None` for
    /// mere progress. Cancel-safe: the loop drops it when a command or the timer comes first,
    /// so whatever was read and not yet written stays in `self`, never in the future.
    fn step(&mut self) -> impl Future<Output = Option<Input>> + Send;

    /// Carries out one of the core's actions (never [`Action::Drop`]: the loop ends then).
    fn apply(&mut self, action: Action);

    /// Data messages and payload bytes carried so far, each way.
    fn tally(&self) -> Tally;
}

/// Runs a session until its I/O is done or the core drops it, and returns how it ended;
/// `meter` hears of its traffic as it goes.
///
/// A plain `fn` around an `async move` block, not an `async fn`: an `async fn` keeps each
/// argument twice in its future (as the argument and as the local it is moved into), and this
/// future is most of what an idle session costs.
pub fn run(
    mut session: Session,
    mut io: impl Io,
    time_limit: Option<Duration>,
    mut commands: Commands,
    mut meter: Meter,
) -> impl Future<Output = Outcome> {
    // Far enough never to fire; tokio's wheel clamps it.
    let first = Instant::now() + time_limit.unwrap_or(Duration::from_secs(365 * 86400));
    async move {
        let timer = sleep_until(first);
        tokio::pin!(timer);
        let mut commands_open = true;
        'session: while io.live() {
            let input = tokio::select! {
                cmd = &mut commands, if commands_open => {
                    commands_open = false; // a oneshot answers once
                    match cmd {
                        Ok(Command::Close(code, reason)) => Input::Stop(code, reason),
                        Err(_) => continue,
                    }
                },
                () = &mut timer => Input::Timer,
                input = io.step() => {
                    meter.publish(io.tally());
                    match input {
                        Some(input) => input,
                        None => continue,
                    }
                }
            };
            for action in session.on(input) {
                if action == Action::Drop {
                    break 'session;
                }
                io.apply(action);
            }
            if session.take_closing() {
                timer.as_mut().reset(Instant::now() + CLOSE_TIMEOUT);
            }
        }
        let mut outcome = session.into_outcome();
        let t = io.tally();
        meter.publish(t);
        (outcome.messages_in, outcome.bytes_in) = (t.messages_in, t.bytes_in);
        (outcome.messages_out, outcome.bytes_out) = (t.messages_out, t.bytes_out);
        outcome
    }
}
