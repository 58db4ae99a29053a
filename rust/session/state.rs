//! The state machine of one session: what each event means for both sides, and how the session
//! ended. No sockets and no clock here: the I/O layer reports [`Input`]s and carries out the
//! [`Action`]s; the one loop of `driver.rs` owns the timer and the command channel.
//!
//! Who gets which close (the table in `docs/ARCHITECTURE.md`, enforced here and only here):
//! - a side's close frame goes to the other side (relay), comes back as the bot's reply (echo),
//!   or is answered with its own code (in-process); it ends the session "by" that side;
//! - a side whose connection ends, or a write to it fails, ends the session by that side: the
//!   other side gets 1001 "client gone" or 1011 "bot lost";
//! - a side that breaks a rule gets 1009 (size), 1007 (UTF-8) or 1002 with the reason, the other
//!   side 1001 "client error" / "bot error", and the session ends "by" the gateway;
//! - a stop from the control plane, or the session time limit, closes both sides;
//! - the first of these names who ended the session; from then on the peers have the close
//!   timeout to finish, then both connections are dropped.

use std::time::Duration;

use crate::frame::Violation;

/// Who ended a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndedBy {
    /// The client closed or left.
    Client,
    /// The bot closed or was lost.
    Bot,
    /// The gateway: a protocol violation, a size limit, a shutdown or a time limit.
    Gateway,
}

impl EndedBy {
    /// `"client"`, `"bot"` or `"gateway"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Bot => "bot",
            Self::Gateway => "gateway",
        }
    }
}

/// How one session ended. Payloads never appear here, only counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The id the control plane gave the session.
    pub session_id: u64,
    /// The close frame the client sent: code and reason (1005 for a close without a code).
    pub client_close: Option<(u16, String)>,
    /// The close frame the bot sent (for the echo bot: the close it echoed; for an in-process
    /// bot: the close the gateway sent the client on its behalf).
    pub bot_close: Option<(u16, String)>,
    /// Who ended the session.
    pub ended_by: EndedBy,
    /// One line for the log.
    pub detail: String,
    /// The close code the session ended with: the code of the close frame that ended it (1005
    /// for one without a code), the gateway's own (a stop's, the time limit's 1000, a broken
    /// rule's 1002, 1007 or 1009), or 1006 when a connection ended without a close.
    pub code: u16,
    /// Data messages client → bot.
    pub messages_in: u64,
    /// Data messages bot → client.
    pub messages_out: u64,
    /// Payload bytes client → bot.
    pub bytes_in: u64,
    /// Payload bytes bot → client.
    pub bytes_out: u64,
}

impl Outcome {
    /// The outcome of a session that never got to end on its own (the engine stopped).
    pub fn new(session_id: u64) -> Self {
        Self {
            session_id,
            client_close: None,
            bot_close: None,
            ended_by: EndedBy::Gateway,
            detail: "engine stopped".into(),
            code: ABNORMAL,
            messages_in: 0,
            messages_out: 0,
            bytes_in: 0,
            bytes_out: 0,
        }
    }
}

/// The limits of one session.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest message (all fragments); over it the sender gets 1009.
    pub max_message_size: u64,
    /// After it both sides get 1000 "session time limit"; `None`: no limit.
    pub time_limit: Option<Duration>,
}

/// RFC 6455 §7.4.1: the code for a connection that ended without a close frame (never sent).
const ABNORMAL: u16 = 1006;

/// The close both sides get at the session time limit (SPEC §6).
pub const TIME_LIMIT_CLOSE: (u16, &str) = (1000, "session time limit");

/// One end of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The WebSocket client; the gateway is its server.
    Client,
    /// The bot: a server the gateway is a client of, the built-in echo, or Python in-process.
    Bot,
}

impl Side {
    fn index(self) -> usize {
        match self {
            Self::Client => 0,
            Self::Bot => 1,
        }
    }
}

/// What kind of bot serves the session: it decides who answers a client's close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A bot on a socket of its own: closes are forwarded and answered by the peers.
    Relay,
    /// The built-in echo bot: the client's frames, its close too, come back to it.
    Echo,
    /// A Python bot: the gateway speaks WebSocket with the client on its behalf.
    InProcess,
}

/// Something that happened to a session.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// The side sent a close frame (a relay or echo passed it on already): its code and
    /// reason, `None` without a code.
    Close(Side, Option<(u16, String)>),
    /// The side's connection ended without a close, or writing to it failed.
    Gone(Side),
    /// The side broke a rule; nothing it sent after that was passed on.
    Violation(Side, Violation),
    /// The control plane closes the session with this code and reason.
    Stop(u16, String),
    /// The session's timer went off: the time limit, or the close timeout once it is ending.
    Timer,
}

/// What the I/O layer must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send a close frame of the gateway's own to a side (none went there yet), then end our
    /// side of its TCP connection if `then_shutdown`.
    Close {
        /// Who gets it.
        to: Side,
        /// Its code.
        code: u16,
        /// Its reason.
        reason: String,
        /// End the TCP connection once it is written.
        then_shutdown: bool,
    },
    /// The side's close handshake is complete: end our side of its TCP connection once what is
    /// queued for it is written.
    Shutdown(Side),
    /// The side is gone: write nothing more to it.
    Abandon(Side),
    /// Drop both connections now.
    Drop,
}

/// One session's state. See the module docs.
#[derive(Debug)]
pub struct Session {
    kind: Kind,
    outcome: Outcome,
    ended: bool,
    closing: bool,
    /// A close went to the side (ours or passed on), or it is gone: nothing more goes there.
    close_sent: [bool; 2],
    /// The side sent its close or broke a rule: its stream is over.
    done_sending: [bool; 2],
}

impl Session {
    /// A session just handed over.
    pub fn new(session_id: u64, kind: Kind) -> Self {
        Self {
            kind,
            outcome: Outcome::new(session_id),
            ended: false,
            closing: false,
            close_sent: [false; 2],
            done_sending: [false; 2],
        }
    }

    /// Whether the session is ending (someone closed, left or broke a rule).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// True once, when the session starts ending: the timer then counts the close timeout
    /// instead of the time limit.
    pub fn take_closing(&mut self) -> bool {
        let now = self.ended && !self.closing;
        self.closing |= now;
        now
    }

    /// How it ended (the I/O layer adds the counts).
    pub fn into_outcome(self) -> Outcome {
        self.outcome
    }

    /// What `input` means, as actions in the order they are to be carried out.
    pub fn on(&mut self, input: Input) -> Vec<Action> {
        let mut todo = Vec::new();
        match input {
            Input::Timer if self.closing => {
                self.end(EndedBy::Gateway, ABNORMAL, "close timeout");
                todo.push(Action::Drop);
            }
            Input::Timer => {
                let (code, reason) = TIME_LIMIT_CLOSE;
                self.stop(code, reason.into(), &mut todo);
            }
            Input::Stop(code, reason) => self.stop(code, reason, &mut todo),
            Input::Close(side, close) => self.closed(side, close, &mut todo),
            Input::Gone(Side::Client) => {
                self.end(EndedBy::Client, ABNORMAL, "client gone");
                if self.kind == Kind::Relay {
                    self.abandon(Side::Client, &mut todo);
                    self.close(Side::Bot, 1001, "client gone", false, &mut todo);
                } else {
                    // Its bot is local: there is no one left to tell.
                    todo.push(Action::Drop);
                }
            }
            Input::Gone(Side::Bot) => {
                self.end(EndedBy::Bot, ABNORMAL, "bot lost");
                self.abandon(Side::Bot, &mut todo);
                self.close(Side::Client, 1011, "bot lost", true, &mut todo);
            }
            Input::Violation(side, v) => self.violation(side, &v, &mut todo),
        }
        todo
    }

    fn end(&mut self, by: EndedBy, code: u16, detail: impl Into<String>) {
        if !self.ended {
            self.ended = true;
            self.outcome.ended_by = by;
            self.outcome.code = code;
            self.outcome.detail = detail.into();
        }
    }

    fn close(&mut self, to: Side, code: u16, reason: &str, shut: bool, todo: &mut Vec<Action>) {
        let sent = &mut self.close_sent[to.index()];
        if !*sent {
            *sent = true;
            todo.push(Action::Close {
                to,
                code,
                reason: reason.to_owned(),
                then_shutdown: shut,
            });
        }
    }

    fn abandon(&mut self, side: Side, todo: &mut Vec<Action>) {
        self.close_sent[side.index()] = true;
        todo.push(Action::Abandon(side));
    }

    /// A stop or the time limit: both sides get the close (an in-process bot's is recorded as
    /// its own, since the gateway sends it on its behalf).
    fn stop(&mut self, code: u16, reason: String, todo: &mut Vec<Action>) {
        self.end(EndedBy::Gateway, code, reason.as_str());
        if self.kind == Kind::InProcess && !self.close_sent[Side::Client.index()] {
            self.outcome.bot_close = Some((code, reason.clone()));
        }
        self.close(Side::Client, code, &reason, false, todo);
        if self.kind == Kind::Relay {
            self.close(Side::Bot, code, &reason, false, todo);
        }
    }

    fn closed(&mut self, side: Side, close: Option<(u16, String)>, todo: &mut Vec<Action>) {
        let close = close.unwrap_or((1005, String::new()));
        let code = close.0;
        self.done_sending[side.index()] = true;
        match (self.kind, side) {
            (Kind::Relay, Side::Client) => {
                self.outcome.client_close = Some(close);
                self.end(EndedBy::Client, code, "client closed");
                self.close_sent[Side::Bot.index()] = true;
                // The client answered (or opened) a close handshake: when a close went to it
                // too, the handshake on its hop is complete.
                if self.close_sent[Side::Client.index()] {
                    todo.push(Action::Shutdown(Side::Client));
                }
            }
            (Kind::Relay, Side::Bot) => {
                self.outcome.bot_close = Some(close);
                self.end(EndedBy::Bot, code, "bot closed");
                self.close_sent[Side::Client.index()] = true;
                // The client closed first (or broke a rule): this was the reply, the hop is done.
                if self.done_sending[Side::Client.index()] {
                    todo.push(Action::Shutdown(Side::Client));
                }
            }
            (Kind::Echo, _) => {
                // Echoed back as the bot's reply: the handshake is complete.
                self.outcome.client_close = Some(close.clone());
                self.outcome.bot_close = Some(close);
                self.end(EndedBy::Client, code, "client closed");
                self.close_sent[Side::Client.index()] = true;
                todo.push(Action::Shutdown(Side::Client));
            }
            (Kind::InProcess, _) => {
                self.end(EndedBy::Client, code, "client closed");
                // Answered with the client's own code; Python's bot gets a disconnect.
                let reply = if close.0 == 1005 { 1000 } else { close.0 };
                if !self.close_sent[Side::Client.index()] {
                    self.outcome.bot_close = Some((reply, String::new()));
                }
                self.outcome.client_close = Some(close);
                self.close(Side::Client, reply, "", false, todo);
                todo.push(Action::Shutdown(Side::Client));
            }
        }
    }

    fn violation(&mut self, side: Side, v: &Violation, todo: &mut Vec<Action>) {
        let (code, reason) = (v.close_code(), v.to_string());
        self.done_sending[side.index()] = true;
        match (self.kind, side) {
            (Kind::InProcess, _) => {
                self.end(EndedBy::Gateway, code, format!("client: {reason}"));
                // What Python's bot is told it was disconnected with.
                self.outcome.bot_close = Some((code, reason.clone()));
                self.close(Side::Client, code, &reason, false, todo);
                // Its stream is over: once our close is out, so is the session.
                todo.push(Action::Shutdown(Side::Client));
            }
            (_, Side::Client) => {
                self.end(EndedBy::Gateway, code, format!("client: {reason}"));
                self.close(Side::Client, code, &reason, true, todo);
                if self.kind == Kind::Relay {
                    self.close(Side::Bot, 1001, "client error", false, todo);
                }
            }
            (_, Side::Bot) => {
                self.end(EndedBy::Gateway, code, format!("bot: {reason}"));
                self.close(Side::Bot, code, &reason, false, todo);
                self.close(Side::Client, 1001, "bot error", true, todo);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(to: Side, code: u16, reason: &str, then_shutdown: bool) -> Action {
        Action::Close {
            to,
            code,
            reason: reason.into(),
            then_shutdown,
        }
    }

    fn relay() -> Session {
        Session::new(7, Kind::Relay)
    }

    #[test]
    fn a_client_close_ends_the_session_by_the_client_and_its_reply_completes_the_hop() {
        let mut s = relay();
        let c = Some((4000, "bye".into()));
        assert_eq!(s.on(Input::Close(Side::Client, c)), vec![]);
        assert_eq!(
            s.on(Input::Close(Side::Bot, Some((4000, "ok".into())))),
            vec![Action::Shutdown(Side::Client)]
        );
        let o = s.into_outcome();
        assert_eq!(
            (o.ended_by, o.detail.as_str()),
            (EndedBy::Client, "client closed")
        );
        assert_eq!(o.client_close, Some((4000, "bye".into())));
        assert_eq!(o.bot_close, Some((4000, "ok".into())));
    }

    #[test]
    fn a_bot_close_ends_the_session_by_the_bot_and_the_client_reply_completes_the_hop() {
        let mut s = relay();
        assert_eq!(s.on(Input::Close(Side::Bot, None)), vec![]);
        assert_eq!(
            s.on(Input::Close(Side::Client, None)),
            vec![Action::Shutdown(Side::Client)]
        );
        let o = s.into_outcome();
        assert_eq!(
            (o.ended_by, o.detail.as_str()),
            (EndedBy::Bot, "bot closed")
        );
        assert_eq!(
            o.bot_close,
            Some((1005, String::new())),
            "no code reads as 1005"
        );
    }

    #[test]
    fn a_client_that_leaves_gets_the_bot_a_1001() {
        let mut s = relay();
        assert_eq!(
            s.on(Input::Gone(Side::Client)),
            vec![
                Action::Abandon(Side::Client),
                close(Side::Bot, 1001, "client gone", false)
            ]
        );
        assert_eq!(s.into_outcome().ended_by, EndedBy::Client);
    }

    #[test]
    fn a_lost_bot_gets_the_client_a_1011_and_then_the_end_of_its_connection() {
        let mut s = relay();
        assert_eq!(
            s.on(Input::Gone(Side::Bot)),
            vec![
                Action::Abandon(Side::Bot),
                close(Side::Client, 1011, "bot lost", true)
            ]
        );
        assert_eq!(s.into_outcome().detail, "bot lost");
    }

    #[test]
    fn a_rule_broken_by_a_side_gets_it_the_code_and_the_other_side_a_1001() {
        let mut s = relay();
        let v = Violation::TooBig { size: 11, max: 10 };
        assert_eq!(
            s.on(Input::Violation(Side::Client, v.clone())),
            vec![
                close(Side::Client, 1009, &v.to_string(), true),
                close(Side::Bot, 1001, "client error", false)
            ]
        );
        assert_eq!(s.into_outcome().ended_by, EndedBy::Gateway);
        let mut s = relay();
        assert_eq!(
            s.on(Input::Violation(Side::Bot, Violation::ReservedBits)),
            vec![
                close(Side::Bot, 1002, "reserved bits set", false),
                close(Side::Client, 1001, "bot error", true)
            ]
        );
        assert_eq!(s.into_outcome().detail, "bot: reserved bits set");
    }

    #[test]
    fn the_time_limit_closes_both_sides_and_the_close_timeout_then_drops_them() {
        let mut s = relay();
        assert!(!s.take_closing());
        assert_eq!(
            s.on(Input::Timer),
            vec![
                close(Side::Client, 1000, "session time limit", false),
                close(Side::Bot, 1000, "session time limit", false)
            ]
        );
        assert!(s.take_closing(), "the timer now counts the close timeout");
        assert!(!s.take_closing(), "only once");
        assert_eq!(s.on(Input::Timer), vec![Action::Drop]);
        let o = s.into_outcome();
        assert_eq!(
            (o.ended_by, o.detail.as_str()),
            (EndedBy::Gateway, "session time limit")
        );
    }

    #[test]
    fn only_the_first_end_names_who_ended_it_and_no_side_gets_two_closes() {
        let mut s = relay();
        assert_eq!(s.on(Input::Stop(1001, "shutting down".into())).len(), 2);
        assert_eq!(s.on(Input::Stop(1000, "again".into())), vec![]);
        assert_eq!(
            s.on(Input::Gone(Side::Bot)),
            vec![Action::Abandon(Side::Bot)]
        );
        assert_eq!(s.into_outcome().detail, "shutting down");
    }

    #[test]
    fn the_outcome_names_the_code_that_ended_the_session() {
        let code = |kind: Kind, inputs: Vec<Input>| {
            let mut s = Session::new(1, kind);
            for input in inputs {
                s.on(input);
            }
            s.into_outcome().code
        };
        let relay = Kind::Relay;
        let client_close = Input::Close(Side::Client, Some((4001, "x".into())));
        assert_eq!(code(relay, vec![client_close]), 4001);
        assert_eq!(code(relay, vec![Input::Close(Side::Bot, None)]), 1005);
        assert_eq!(code(relay, vec![Input::Gone(Side::Client)]), 1006);
        assert_eq!(code(relay, vec![Input::Gone(Side::Bot)]), 1006);
        assert_eq!(code(relay, vec![Input::Timer]), 1000);
        assert_eq!(code(relay, vec![Input::Stop(1001, "bye".into())]), 1001);
        let big = Violation::TooBig { size: 2, max: 1 };
        assert_eq!(code(relay, vec![Input::Violation(Side::Bot, big)]), 1009);
        let utf8 = Input::Violation(Side::Client, Violation::InvalidUtf8);
        assert_eq!(code(Kind::InProcess, vec![utf8]), 1007);
        let echo_close = Input::Close(Side::Client, Some((1000, String::new())));
        assert_eq!(code(Kind::Echo, vec![echo_close]), 1000);
        assert_eq!(code(relay, vec![]), 1006, "the engine stopped it");
        let first = vec![Input::Gone(Side::Bot), Input::Stop(1001, "late".into())];
        assert_eq!(code(relay, first), 1006, "the first end names it");
    }

    #[test]
    fn the_echo_bot_answers_a_close_with_the_same_close() {
        let mut s = Session::new(1, Kind::Echo);
        let c = Some((1000, "done".into()));
        assert_eq!(
            s.on(Input::Close(Side::Client, c.clone())),
            vec![Action::Shutdown(Side::Client)]
        );
        let o = s.into_outcome();
        assert_eq!((o.client_close.clone(), o.bot_close), (c.clone(), c));
    }

    #[test]
    fn a_local_bot_session_ends_at_once_when_its_client_leaves() {
        for kind in [Kind::Echo, Kind::InProcess] {
            let mut s = Session::new(1, kind);
            assert_eq!(s.on(Input::Gone(Side::Client)), vec![Action::Drop]);
            assert_eq!(s.into_outcome().detail, "client gone");
        }
    }

    #[test]
    fn an_in_process_bot_answers_a_close_with_the_clients_code() {
        let mut s = Session::new(1, Kind::InProcess);
        assert_eq!(
            s.on(Input::Close(Side::Client, None)),
            vec![
                close(Side::Client, 1000, "", false),
                Action::Shutdown(Side::Client)
            ]
        );
        let o = s.into_outcome();
        assert_eq!(o.client_close, Some((1005, String::new())));
        assert_eq!(
            o.bot_close,
            Some((1000, String::new())),
            "1005 is answered with 1000"
        );
    }

    #[test]
    fn after_an_in_process_stop_the_clients_reply_completes_the_handshake() {
        let mut s = Session::new(1, Kind::InProcess);
        assert_eq!(
            s.on(Input::Stop(4001, "bye".into())),
            vec![close(Side::Client, 4001, "bye", false)]
        );
        assert_eq!(
            s.on(Input::Close(Side::Client, Some((4001, String::new())))),
            vec![Action::Shutdown(Side::Client)]
        );
        let o = s.into_outcome();
        assert_eq!(o.bot_close, Some((4001, "bye".into())));
        assert_eq!(o.ended_by, EndedBy::Gateway);
    }

    #[test]
    fn an_in_process_bot_is_told_the_code_its_client_was_closed_with() {
        let mut s = Session::new(1, Kind::InProcess);
        let reason = Violation::InvalidUtf8.to_string();
        assert_eq!(
            s.on(Input::Violation(Side::Client, Violation::InvalidUtf8)),
            vec![
                close(Side::Client, 1007, &reason, false),
                Action::Shutdown(Side::Client)
            ]
        );
        assert_eq!(s.into_outcome().bot_close, Some((1007, reason)));
    }
}
