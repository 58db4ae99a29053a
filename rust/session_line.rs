//! The log line of a session the engine opened and Python never adopted, written here rather
//! than in Python: a gateway opening thousands of sessions a second logs a line for each, and
//! built in Python those lines were most of Python's time per session (benches/README.md,
//! "Session opens, round 10"). Python still decides where the lines go and writes them
//! (`logs.write_session_lines`); it calls into here only when they go to its own handler, whose
//! format this copies.
//!
//! The text is `sessions.log_outcome`'s message and the JSON `logs._json_line` of
//! `logs.session_fields`, byte for byte (tests/test_logs.py compares them on real sessions).
//! As there: codes only, never a close reason, a body or a token.

use std::fmt::Write as _;

use crate::open::News;
use crate::session::{EndedBy, Outcome};

/// The close reason of the gateway's drain (`server.py`): such an end is `gateway_drain`.
pub const DRAIN_REASON: &str = "gateway shutting down";

/// The end of a session the engine opened and Python never adopted.
pub struct Told {
    /// How it ended.
    pub outcome: Outcome,
    /// When it was told (`CLOCK_MONOTONIC` seconds).
    pub ended_at: f64,
    /// Its news (a [`News::Opened`]).
    pub news: News,
}

/// What a line shows of a session's news.
struct Shown<'a> {
    service_host: &'a str,
    session_uuid: &'a str,
    /// The provider's name and call id, for a provider's session.
    call: Option<(&'static str, Option<&'a str>)>,
    seconds: f64,
}

impl Told {
    fn shown(&self) -> Shown<'_> {
        let News::Opened {
            session_uuid,
            service_host,
            opened_at,
            call,
            ..
        } = &self.news
        else {
            unreachable!("only opened sessions are told");
        };
        Shown {
            service_host,
            session_uuid,
            call: call
                .as_ref()
                .map(|c| (c.provider.name(), c.call_id.as_deref())),
            seconds: (self.ended_at - opened_at).max(0.0),
        }
    }

    /// `sessions.log_outcome`'s message: ``session 7 echo.demo <uuid> ended by client (…) after
    /// 0.2 s; client close 1000, bot close 1000; in 1 msgs 5 B, out 1 msgs 5 B``.
    pub fn message(&self, out: &mut String) {
        let s = self.shown();
        let o = &self.outcome;
        let _ = write!(
            out,
            "session {} {} {}",
            o.session_id, s.service_host, s.session_uuid
        );
        if let Some((provider, call_id)) = s.call {
            let _ = write!(out, " via {provider} call {}", call_id.unwrap_or("-"));
        }
        let _ = write!(
            out,
            " ended by {} ({}) after {:.1} s; client close {}, bot close {}; in {} msgs {} B, \
             out {} msgs {} B",
            o.ended_by.as_str(),
            o.detail,
            s.seconds,
            Code(&o.client_close, "-"),
            Code(&o.bot_close, "-"),
            o.messages_in,
            o.bytes_in,
            o.messages_out,
            o.bytes_out,
        );
    }

    /// `logs._json_line` of a ``session_end`` line at `ts` (its ``ts`` field, made by Python).
    pub fn json(&self, ts: &str, out: &mut String) {
        let s = self.shown();
        let o = &self.outcome;
        let mut message = String::with_capacity(160);
        self.message(&mut message);
        out.push_str("{\"ts\": ");
        json_str(out, ts);
        out.push_str(", \"level\": \"info\", \"event\": \"session_end\", \"message\": ");
        json_str(out, &message);
        out.push_str(", \"agent\": ");
        json_str(out, s.service_host);
        out.push_str(", \"session_id\": ");
        json_str(out, s.session_uuid);
        let _ = write!(out, ", \"session\": {}, \"ended_by\": ", o.session_id);
        json_str(out, ended_by_label(o));
        out.push_str(", \"detail\": ");
        json_str(out, &o.detail);
        let _ = write!(
            out,
            ", \"code\": \"{}\", \"client_close\": {}, \"bot_close\": {}, \"duration\": {}, \
             \"messages_client_to_bot\": {}, \"bytes_client_to_bot\": {}, \
             \"messages_bot_to_client\": {}, \"bytes_bot_to_client\": {}",
            CodeLabel(o.code),
            Code(&o.client_close, "null"),
            Code(&o.bot_close, "null"),
            Rounded(s.seconds),
            o.messages_in,
            o.bytes_in,
            o.messages_out,
            o.bytes_out,
        );
        if let Some((provider, call_id)) = s.call {
            let _ = write!(out, ", \"provider\": \"{provider}\", \"call_id\": ");
            match call_id {
                Some(id) => json_str(out, id),
                None => out.push_str("null"),
            }
        }
        out.push('}');
    }
}

/// The lines of `told`, each `line` then `terminator`, in chunks of whole lines of at most
/// `limit` bytes (a line longer than that alone), each with how many lines it holds: one write
/// each stays atomic on a pipe.
pub fn chunks(
    told: &[Told],
    terminator: &str,
    limit: usize,
    mut line: impl FnMut(&Told, &mut String),
) -> Vec<(String, usize)> {
    let mut done = Vec::new();
    let mut chunk = (String::new(), 0);
    let mut one = String::with_capacity(256);
    for t in told {
        one.clear();
        line(t, &mut one);
        one.push_str(terminator);
        if chunk.1 > 0 && chunk.0.len() + one.len() > limit {
            done.push(std::mem::take(&mut chunk));
        }
        chunk.0.push_str(&one);
        chunk.1 += 1;
    }
    if chunk.1 > 0 {
        done.push(chunk);
    }
    done
}

/// `metrics.ended_by` of a session that is not an in-process bot's and was not stopped through
/// the Session API (never adopted, it could not be): the ``ended_by`` label.
pub fn ended_by_label(o: &Outcome) -> &'static str {
    match o.ended_by {
        EndedBy::Client => "client",
        EndedBy::Bot => "bot",
        EndedBy::Gateway if o.detail == crate::session::TIME_LIMIT_CLOSE.1 || o.code == 1009 => {
            "gateway_limit"
        }
        EndedBy::Gateway if o.detail == DRAIN_REASON => "gateway_drain",
        EndedBy::Gateway => "error",
    }
}

/// A close's code, or what stands for none (`-` in the text line, `null` in JSON).
struct Code<'a>(&'a Option<(u16, String)>, &'static str);

impl std::fmt::Display for Code<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some((code, _)) => write!(f, "{code}"),
            None => f.write_str(self.1),
        }
    }
}

/// `metrics.close_code_label`: 1000-1015 as they are, `3xxx`, `4xxx`, else `other`.
struct CodeLabel(u16);

impl std::fmt::Display for CodeLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            c @ 1000..=1015 => write!(f, "{c}"),
            c @ 3000..=4999 => write!(f, "{}xxx", c / 1000),
            _ => f.write_str("other"),
        }
    }
}

/// Python's `repr(round(x, 3))` for a duration (finite, at least 0, far below 1e16): Rust's
/// fixed formatting rounds the exact binary value as Python's `round` does, and its shortest
/// form is `repr`'s but for the `.0` of a whole number.
struct Rounded(f64);

impl std::fmt::Display for Rounded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rounded: f64 = format!("{:.3}", self.0).parse().unwrap_or(self.0);
        if rounded.fract() == 0.0 {
            write!(f, "{rounded:.1}")
        } else {
            write!(f, "{rounded}")
        }
    }
}

/// `s` as a JSON string, escaped as Python's `json.dumps(..., ensure_ascii=False)` does (and
/// serde_json: `"`, `\`, the short escapes, other control characters as `\u00xx`).
fn json_str(out: &mut String, s: &str) {
    // (Not written into `out`'s bytes: taking them back as a String would check the whole line
    // again for each field.)
    out.push_str(&serde_json::to_string(s).expect("a str always serializes"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::open::Call;
    use crate::opening::Provider;

    fn told(outcome: Outcome, call: Option<Call>) -> Told {
        Told {
            outcome,
            ended_at: 12.34,
            news: News::Opened {
                session_id: 7,
                session_uuid: "u-1".into(),
                service_host: "echo.demo".into(),
                dial_seconds: 0.001,
                store_seconds: Vec::new(),
                opened_at: 10.0,
                call,
            },
        }
    }

    fn outcome(ended_by: EndedBy, code: u16, detail: &str) -> Outcome {
        Outcome {
            ended_by,
            code,
            detail: detail.into(),
            client_close: Some((code, "bye".into())),
            messages_in: 1,
            bytes_in: 5,
            ..Outcome::new(7)
        }
    }

    #[test]
    fn a_generic_sessions_line_shows_its_codes_and_counts_not_its_close_reasons() {
        let t = told(outcome(EndedBy::Client, 1000, "client closed"), None);
        let mut line = String::new();
        t.message(&mut line);
        assert_eq!(
            line,
            "session 7 echo.demo u-1 ended by client (client closed) after 2.3 s; client close \
             1000, bot close -; in 1 msgs 5 B, out 0 msgs 0 B"
        );
        let mut json = String::new();
        t.json("2026-12-03T07:40:01.123Z", &mut json);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["message"], line.as_str());
        assert_eq!(v["ended_by"], "client");
        assert_eq!(v["code"], "1000");
        assert_eq!(v["duration"], 2.34);
        assert!(v["bot_close"].is_null());
        assert!(v.get("provider").is_none());
        assert!(!json.contains("bye"));
    }

    #[test]
    fn a_providers_line_names_its_call_or_a_dash() {
        let call = |call_id: Option<&str>| Call {
            provider: Provider::Telnyx,
            call_id: call_id.map(str::to_owned),
            stream_id: None,
        };
        for (id, shown) in [(Some("CA\"1"), "CA\"1"), (None, "-")] {
            let t = told(outcome(EndedBy::Bot, 1000, "bot closed"), Some(call(id)));
            let mut line = String::new();
            t.message(&mut line);
            assert!(line.contains(&format!(" u-1 via telnyx call {shown} ended by bot ")));
            let mut json = String::new();
            t.json("ts", &mut json);
            let v: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(v["provider"], "telnyx");
            assert_eq!(v["call_id"].as_str(), id);
        }
    }

    #[test]
    fn the_gateways_ends_are_labelled_as_the_metrics_label_them() {
        let limit = crate::session::TIME_LIMIT_CLOSE.1;
        for (code, detail, label) in [
            (1000, limit, "gateway_limit"),
            (1009, "message too big", "gateway_limit"),
            (1001, DRAIN_REASON, "gateway_drain"),
            (1002, "bad frame", "error"),
            (1006, "engine stopped", "error"),
        ] {
            let o = outcome(EndedBy::Gateway, code, detail);
            assert_eq!(ended_by_label(&o), label, "{code} {detail}");
        }
        let labels: Vec<String> = [1000, 1015, 1016, 3001, 4999, 5000, 0]
            .map(|c| CodeLabel(c).to_string())
            .into();
        assert_eq!(
            labels,
            ["1000", "1015", "other", "3xxx", "4xxx", "other", "other"]
        );
    }

    #[test]
    fn durations_are_rounded_to_milliseconds_as_python_shows_them() {
        let shown =
            [0.0, 2.0, 0.0004, 0.0005, 0.0015, 1.23456, 14400.0].map(|x| Rounded(x).to_string());
        assert_eq!(
            shown,
            ["0.0", "2.0", "0.0", "0.001", "0.002", "1.235", "14400.0"]
        );
    }

    #[test]
    fn lines_are_chunked_whole_within_the_limit() {
        let all: Vec<Told> = (0..5)
            .map(|_| told(outcome(EndedBy::Client, 1000, "client closed"), None))
            .collect();
        let mut one = String::new();
        all[0].message(&mut one);
        let size = one.len() + 1;
        let two = chunks(&all, "\n", 2 * size, |t, out| t.message(out));
        assert_eq!(
            two.iter().map(|(c, n)| (c.len(), *n)).collect::<Vec<_>>(),
            [(2 * size, 2), (2 * size, 2), (size, 1)]
        );
        assert_eq!(
            chunks(&all[..1], "\n", 10, |t, out| t.message(out)).len(),
            1
        );
    }
}
